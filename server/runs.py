"""Submit the fedvault Flower App to a SuperLink with `flwr run` and follow it to its outcome.

Shared by `fedvault simulate` (a private SuperLink in simulation mode) and `fedvault run`
(the federation's SuperLink over TLS): one submission path, one run directory format.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fedvault.common import errors
from fedvault.common.checkpoint import CHECKPOINT_FILE, drop_rows_after, load_checkpoint
from fedvault.common.config import FedvaultConfig
from fedvault.common.progress import PROGRESS_FILE
from fedvault.common.report import (
    CONFIG_FILE,
    ERROR_FILE,
    FLOWER_LOG,
    ROUNDS_FILE,
    SUMMARY_FILE,
    RunDirectory,
    format_progress,
    read_jsonl,
)
from fedvault.runtime.processes import QUIET_ENV, ManagedProcess, flower_bin, write_app_dir

Echo = Callable[[str], None]


def fedvault_version() -> str:
    try:
        return importlib.metadata.version("fedvault")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def coordinator_run_config(nodes: Mapping[str, int], ledger_record: Path) -> dict[str, str]:
    """The coordinator's own run config for `fedvault run`: who is who, and the ledger record.

    ``site-nodes`` maps each node id the SuperLink authenticated to its provisioned site (a
    JSON string ``{"<node id>": "<site>"}``): the ServerApp files replies under it, never
    under a name a reply carries. ``ledger-record`` is the absolute path of the file where
    the ServerApp keeps each site's ledger head across runs; ``progress-record``, beside it,
    the coordinator's progress file (common/progress.py) that `fedvault server start` follows.
    """
    by_node = {str(node_id): site for site, node_id in sorted(nodes.items())}
    return {
        "site-nodes": json.dumps(by_node, sort_keys=True),
        "ledger-record": str(Path(ledger_record).resolve()),
        "progress-record": str((Path(ledger_record).parent / PROGRESS_FILE).resolve()),
    }


def follow(
    run_dir: RunDirectory,
    submit: ManagedProcess,
    watched: list[ManagedProcess],
    total_rounds: int,
    echo: Echo,
    poll_seconds: float = 0.25,
    shown: int = 0,
) -> None:
    """Echo a progress line per finished round until ``submit`` exits (after ``shown`` rows)."""
    while True:
        done = submit.poll() is not None
        rows = read_jsonl(run_dir.file(ROUNDS_FILE))
        for row in rows[shown:]:
            echo(format_progress(row, total_rounds))
        shown = len(rows)
        if done:
            return
        for proc in watched:
            if proc.poll() is not None:
                raise errors.FederationError(
                    f"{Path(proc.args[0]).name} stopped unexpectedly (exit code {proc.poll()})",
                    hint=f"See {proc.log_path}",
                )
        time.sleep(poll_seconds)


def last_error_line(log_path: Path) -> str | None:
    """The last line of the Flower log that reads like an error, to name the cause."""
    if not log_path.is_file():
        return None
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    for line in reversed(lines):
        text = line.strip()
        if text and ("Error" in text or "Exception" in text) and not text.startswith("File "):
            return text[:300]
    return None


def outcome(run_dir: RunDirectory) -> dict[str, Any]:
    """The run's summary, or the fedvault error the ServerApp recorded, or a runtime error.

    A run that ended early (too few sites left) has both; its error wins.
    """
    if run_dir.file(ERROR_FILE).is_file():
        info = json.loads(run_dir.file(ERROR_FILE).read_text(encoding="utf-8"))
        classes = {cls.__name__: cls for cls in errors.ERROR_CLASSES}
        cls = classes.get(info.get("error", ""), errors.FederationError)
        raise cls(str(info.get("message", "the run failed")), hint=info.get("hint"))
    if run_dir.file(SUMMARY_FILE).is_file():
        return dict(json.loads(run_dir.file(SUMMARY_FILE).read_text(encoding="utf-8")))
    cause = last_error_line(run_dir.file(FLOWER_LOG))
    hint = f"See {run_dir.file(FLOWER_LOG)} for the Flower runtime's log."
    if run_dir.file(CHECKPOINT_FILE).is_file():
        hint += f" Every finished round is checkpointed: continue with --resume {run_dir.path}"
    raise errors.FederationError(
        "the run ended without a result" + (f": {cause}" if cause else ""), hint=hint
    )


def run_app(
    cfg: FedvaultConfig,
    run_dir: RunDirectory,
    *,
    flwr_home: Path,
    connection: str,
    watched: list[ManagedProcess],
    echo: Echo,
    federation_config: str | None = None,
    site_run_config: dict[str, str] | None = None,
    clientapp: str = "fedvault.client.app:app",
    resume: bool = False,
) -> dict[str, Any]:
    """Submit ``cfg`` through the SuperLink ``connection`` and follow it; returns the summary.

    The ServerApp writes ``run_dir`` (it must be on this machine's file system, as it is for
    a simulation and for `fedvault run` on the coordinator). ``site_run_config`` carries
    simulated sites' own settings (their ledgers); real sites ignore it and read only their
    SuperNode's node config; `fedvault run` passes ``coordinator_run_config`` through it.
    """
    if resume:  # the last attempt's outcome files would read as this attempt's
        for stale in (ERROR_FILE, SUMMARY_FILE):
            run_dir.file(stale).unlink(missing_ok=True)
        drop_rows_after(run_dir, load_checkpoint(run_dir.path).round)
    else:
        run_dir.write_text(CONFIG_FILE, cfg.to_toml())
    with tempfile.TemporaryDirectory(prefix="fedvault-submit-") as tmp_name:
        tmp = Path(tmp_name)
        app_dir = write_app_dir(tmp / "app", fedvault_version(), clientapp=clientapp)
        overrides = tmp / "run-config.toml"
        overrides.write_text(
            tomli_w.dumps(
                {
                    "scenario-toml": cfg.to_toml(),
                    "out-dir": str(run_dir.path),
                    "run-id": run_dir.path.name,
                    "resume": resume,
                    **(site_run_config or {}),
                }
            ),
            encoding="utf-8",
        )
        args = [flower_bin("flwr"), "run", str(app_dir), connection, "--run-config", str(overrides)]
        if federation_config:
            args += ["--federation-config", federation_config]
        submit = ManagedProcess(
            [*args, "--stream"],
            log_path=run_dir.file(FLOWER_LOG),
            env={"FLWR_HOME": str(flwr_home)},
        )
        try:
            shown = len(read_jsonl(run_dir.file(ROUNDS_FILE))) if resume else 0
            follow(run_dir, submit, watched, cfg.federation.rounds, echo, shown=shown)
        except BaseException:  # Ctrl-C or a failure here: the run must not go on at the SuperLink
            stop_run(run_dir, flwr_home=flwr_home, connection=connection)
            raise
        finally:
            submit.stop()
    return outcome(run_dir)


def stop_run(run_dir: RunDirectory, *, flwr_home: Path, connection: str) -> None:
    """Ask the SuperLink to stop the run `flwr run` started (its id is in the Flower log)."""
    log = run_dir.file(FLOWER_LOG)
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    found = re.findall(r"Successfully started run (\d+)", text)
    if not found:
        return
    env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(flwr_home)}
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            [flower_bin("flwr"), "stop", found[-1], connection],
            capture_output=True, timeout=30, env=env, check=False,
        )  # fmt: skip
