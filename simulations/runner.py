"""`fedvault simulate`: run the fedvault Flower App on Flower's Simulation Engine (Ray).

A private SuperLink in simulation mode is started on a free loopback port with its own
FLWR_HOME, the app is submitted with `flwr run` (exactly as `fedvault run` submits it to a
real federation), per-round progress is read from the run directory as the ServerApp
writes it, and every process is stopped by process group at the end, whatever happens.
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from common import errors
from common.config import FedvaultConfig
from common.report import (
    CONFIG_FILE,
    ERROR_FILE,
    FLOWER_LOG,
    ROUNDS_FILE,
    SUMMARY_FILE,
    RunDirectory,
    format_progress,
    read_jsonl,
)
from server.launch import (
    ManagedProcess,
    flower_bin,
    free_port,
    wait_http_ready,
    write_app_dir,
    write_connection,
)

CONNECTION = "fedvault-simulation"
Echo = Callable[[str], None]


def _version() -> str:
    try:
        return importlib.metadata.version("fedvault")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def follow(
    run_dir: RunDirectory,
    submit: ManagedProcess,
    watched: list[ManagedProcess],
    total_rounds: int,
    echo: Echo,
    poll_seconds: float = 0.25,
) -> None:
    """Echo a progress line per finished round until ``submit`` exits."""
    shown = 0
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
    """The run's summary, or the fedvault error the ServerApp recorded, or a runtime error."""
    if run_dir.file(SUMMARY_FILE).is_file():
        return dict(json.loads(run_dir.file(SUMMARY_FILE).read_text(encoding="utf-8")))
    if run_dir.file(ERROR_FILE).is_file():
        info = json.loads(run_dir.file(ERROR_FILE).read_text(encoding="utf-8"))
        classes = {cls.__name__: cls for cls in errors.ERROR_CLASSES}
        cls = classes.get(info.get("error", ""), errors.FederationError)
        raise cls(str(info.get("message", "the run failed")), hint=info.get("hint"))
    cause = last_error_line(run_dir.file(FLOWER_LOG))
    raise errors.FederationError(
        "the run ended without a result" + (f": {cause}" if cause else ""),
        hint=f"See {run_dir.file(FLOWER_LOG)} for the Flower runtime's log.",
    )


def simulate(cfg: FedvaultConfig, run_path: Path, *, echo: Echo) -> dict[str, Any]:
    """Run ``cfg`` in simulation, writing ``run_path``; returns the summary."""
    run_dir = RunDirectory(run_path.resolve())
    run_dir.write_text(CONFIG_FILE, cfg.to_toml())
    with tempfile.TemporaryDirectory(prefix="fedvault-sim-") as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "flwr-home"
        app_dir = write_app_dir(tmp / "app", _version())
        port = free_port()
        write_connection(home, CONNECTION, f"127.0.0.1:{port}", root_cert=None)
        overrides = tmp / "run-config.toml"
        overrides.write_text(
            tomli_w.dumps({"scenario-toml": cfg.to_toml(), "out-dir": str(run_dir.path)}),
            encoding="utf-8",
        )
        env = {"FLWR_HOME": str(home)}
        log_path = run_dir.file(FLOWER_LOG)
        superlink = ManagedProcess(
            [
                flower_bin("flower-superlink"),
                "--insecure",
                "--simulation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
            ],
            log_path=log_path,
            env=env,
        )
        submit: ManagedProcess | None = None
        try:
            wait_http_ready(port, superlink)
            federation = (
                f"num-supernodes={cfg.federation.sites} "
                f"client-resources-num-cpus={cfg.simulation.cpus_per_site:g}"
            )
            submit = ManagedProcess(
                [
                    flower_bin("flwr"),
                    "run",
                    str(app_dir),
                    CONNECTION,
                    "--run-config",
                    str(overrides),
                    "--federation-config",
                    federation,
                    "--stream",
                ],
                log_path=log_path,
                env=env,
            )
            follow(run_dir, submit, [superlink], cfg.federation.rounds, echo)
        finally:
            if submit is not None:
                submit.stop()
            superlink.stop()
    return outcome(run_dir)
