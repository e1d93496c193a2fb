"""`fedvault simulate --resume`: a simulation killed mid-run continues from its checkpoint.

The journey: `fedvault simulate --rounds 4` runs until its checkpoint says round 2; then the
``flwr-simulation`` process (ServerApp and ClientApps, under the simulation's own SuperLink)
is SIGKILLed, as an OOM kill would. Flower's SuperLink notices the dead run only when its
heartbeat expires (2 x 30 s), so the command must end by itself within about a minute, with
one error line whose hint names `--resume`. `fedvault simulate --resume DIR` then runs rounds
3 and 4: every round appears once, the sites' epsilon keeps growing (their ledgers and the
run id are the same), and every process of both attempts is gone.

The refusals (`--resume` with run settings, on a finished run, on a folder without a
checkpoint) are decided before any Flower process starts, on run folders made here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedvault.cli.options import scenario_path
from fedvault.common.checkpoint import Checkpoint, config_digest, load_checkpoint, save_checkpoint
from fedvault.common.config import build_config, read_toml
from fedvault.common.errors import ConfigError, FederationError
from fedvault.common.report import (
    CONFIG_FILE,
    METRICS_FILE,
    ROUNDS_FILE,
    SUMMARY_FILE,
    RunDirectory,
    read_jsonl,
)
from tests.conftest import CliResult
from tests.deployment import ProcessTrees, process_label

ROUNDS = 4
SITES = ["hospital-a", "hospital-b", "hospital-c"]
#: Flower marks a run whose process stopped heartbeating as failed after 2 x 30 s; the
#: killed simulation's command must be over well within this.
EXIT_AFTER_KILL_LIMIT_S = 150.0


def _env(tmpdir: Path) -> dict[str, str]:
    return {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "TMPDIR": str(tmpdir)}


def _simulate(
    cwd: Path, tmpdir: Path, trees: ProcessTrees, *args: str, timeout: float = 300
) -> tuple[int, str, str, float]:
    """`fedvault simulate ARGS`, its process tree remembered while it runs; (code, out, err, s)."""
    start = time.monotonic()
    with (cwd / "stdout.txt").open("w+") as out, (cwd / "stderr.txt").open("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedvault", "simulate", *args],
            stdout=out, stderr=err, cwd=cwd, env=_env(tmpdir),
        )  # fmt: skip
        try:
            while proc.poll() is None and time.monotonic() - start < timeout:
                trees.remember(proc.pid)
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                trees.kill(proc.pid)
        proc.wait(timeout=30)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), time.monotonic() - start


@pytest.fixture(scope="module")
def short_tmpdir() -> Iterator[Path]:
    """A TMPDIR of the simulations' own, short enough for Ray's socket paths."""
    path = Path(tempfile.mkdtemp(prefix="fvres-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def crash_and_resume(
    tmp_path_factory: pytest.TempPathFactory, short_tmpdir: Path
) -> dict[str, Any]:
    """Kill the simulation process after round 2's checkpoint, then resume the run."""
    tmp = tmp_path_factory.mktemp("resume")
    run_dir = tmp / "run"
    trees = ProcessTrees()
    outcome: dict[str, Any] = {"run_dir": run_dir, "trees": trees}
    (tmp / "first").mkdir()
    first_out = (tmp / "first" / "stdout.txt").open("w")
    first_err = (tmp / "first" / "stderr.txt").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedvault", "simulate", "--rounds", str(ROUNDS),
         "--out", str(run_dir)],
        stdout=first_out, stderr=first_err, cwd=tmp / "first", env=_env(short_tmpdir),
    )  # fmt: skip
    try:
        checkpointed = 0
        while checkpointed < 2:
            assert proc.poll() is None, f"simulate exited with {proc.returncode} before round 2"
            assert time.monotonic() - t0 < 300, "no round-2 checkpoint within 300 s"
            trees.remember(proc.pid)
            with contextlib.suppress(ConfigError):
                checkpointed = load_checkpoint(run_dir).round
            time.sleep(0.05)
        simulation = [
            pid for pid in trees.remember(proc.pid) if "flwr-simulation" in process_label(pid)
        ]
        assert len(simulation) == 1, [process_label(p) for p in trees.remember(proc.pid)]
        # Only that process, as an OOM kill would: Ray's processes under it are orphaned,
        # and `fedvault simulate` must still stop every one of them.
        outcome["killed"] = process_label(simulation[0])
        os.kill(simulation[0], signal.SIGKILL)
        killed_at = time.monotonic()
        outcome["checkpoint_at_kill"] = load_checkpoint(run_dir).round
        print(f"{killed_at - t0:.1f}s: round 2 checkpointed; killed {outcome['killed']}")
        while proc.poll() is None and time.monotonic() - killed_at < 240:
            trees.remember(proc.pid)
            time.sleep(0.2)
        outcome["exit_after_kill_s"] = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            trees.kill(proc.pid)
        proc.wait(timeout=30)
        first_out.close()
        first_err.close()
    outcome["first_code"] = proc.returncode
    outcome["first_err"] = (tmp / "first" / "stderr.txt").read_text()
    outcome["first_out"] = (tmp / "first" / "stdout.txt").read_text()
    print(f"simulate exited {proc.returncode} {outcome['exit_after_kill_s']:.1f}s after the kill")
    print(outcome["first_err"])

    (tmp / "second").mkdir()
    code, out, err, seconds = _simulate(
        tmp / "second", short_tmpdir, trees, "--resume", str(run_dir)
    )
    outcome.update(resume_code=code, resume_out=out, resume_err=err, resume_s=seconds)
    print(f"resume exited {code} after {seconds:.1f}s\n{out[-2500:]}{err[-2500:]}")
    return outcome


@pytest.mark.integration
def test_a_killed_simulation_ends_with_a_resume_hint(crash_and_resume: dict[str, Any]) -> None:
    err: str = crash_and_resume["first_err"]

    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]

    assert crash_and_resume["checkpoint_at_kill"] == 2
    assert crash_and_resume["killed"], "the flwr-simulation process was not found"
    assert crash_and_resume["first_code"] == FederationError.exit_code
    assert crash_and_resume["exit_after_kill_s"] < EXIT_AFTER_KILL_LIMIT_S  # no hang
    assert len(errors) == 1, err
    hint = [line for line in lines if line.startswith("hint:")]
    assert len(hint) == 1 and f"--resume {crash_and_resume['run_dir']}" in hint[0], err
    assert "Traceback" not in err + crash_and_resume["first_out"]


@pytest.mark.integration
def test_the_resumed_run_finishes_every_round_once(crash_and_resume: dict[str, Any]) -> None:
    run_dir: Path = crash_and_resume["run_dir"]

    rounds = [r["round"] for r in read_jsonl(run_dir / ROUNDS_FILE)]
    metrics = read_jsonl(run_dir / METRICS_FILE)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())

    assert crash_and_resume["resume_code"] == 0, crash_and_resume["resume_err"][-3000:]
    assert f"resuming {run_dir} after round 2" in crash_and_resume["resume_out"]
    assert re.search(r"round 4/4\s+accuracy \d\.\d{3}", crash_and_resume["resume_out"])
    assert "round 1/4" not in crash_and_resume["resume_out"]  # done rounds are not re-run
    assert rounds == list(range(ROUNDS + 1))
    assert sorted((r["round"], r["site"]) for r in metrics) == sorted(
        (n, s) for n in range(ROUNDS + 1) for s in SITES
    )
    assert summary["rounds"] == ROUNDS
    assert load_checkpoint(run_dir).round == ROUNDS


@pytest.mark.integration
def test_epsilon_keeps_growing_across_the_crash(crash_and_resume: dict[str, Any]) -> None:
    run_dir: Path = crash_and_resume["run_dir"]

    metrics = read_jsonl(run_dir / METRICS_FILE)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())

    for site in SITES:
        eps = {r["round"]: r["epsilon"] for r in metrics if r["site"] == site}
        assert eps[1] < eps[2] < eps[3] <= eps[4], (site, eps)
        assert eps[4] <= 1.0 + 1e-6  # the run's target epsilon still holds
    assert summary["epsilon"] == max(r["epsilon"] for r in metrics)


@pytest.mark.integration
def test_no_process_of_either_attempt_is_left(crash_and_resume: dict[str, Any]) -> None:
    trees: ProcessTrees = crash_and_resume["trees"]

    alive = trees.alive()
    trees.kill_survivors()

    assert len(trees.seen) >= 5  # SuperLink, SuperExec, flwr run, flwr-simulation, Ray ...
    assert alive == []


# --- refusals: decided before any Flower process starts, so run in this process -------------


def _run_folder(path: Path, *, done: int, finished: bool = False) -> Path:
    """A run directory as a 4-round hospitals run leaves it after ``done`` rounds."""
    cfg = build_config(read_toml(scenario_path("hospitals")), {"federation": {"rounds": ROUNDS}})
    run_dir = RunDirectory(path)
    run_dir.write_text(CONFIG_FILE, cfg.to_toml())
    save_checkpoint(
        run_dir,
        Checkpoint(
            round=done,
            total_rounds=ROUNDS,
            config_sha256=config_digest(cfg.to_toml()),
            model={"w": torch.zeros(2)},
        ),
    )
    if finished:
        run_dir.write_json(SUMMARY_FILE, {"rounds": ROUNDS})
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _one_error_line(result: CliResult) -> str:
    lines = result.err_lines
    assert result.code == ConfigError.exit_code == 3, result.out + result.err
    assert [line.startswith("error:") for line in lines].count(True) == 1, result.err
    assert "Traceback" not in result.out + result.err
    assert "resuming" not in result.out
    return next(line for line in lines if line.startswith("error:"))


@pytest.fixture
def refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fedvault_cli: Callable[..., CliResult]
) -> Callable[..., CliResult]:
    """`fedvault simulate ARGS` from tmp_path, through fedvault.cli.app.main in this process."""
    monkeypatch.chdir(tmp_path)
    return lambda *args: fedvault_cli("simulate", *args)


@pytest.mark.unit
def test_resume_with_run_settings_is_refused(
    tmp_path: Path, refused: Callable[..., CliResult]
) -> None:
    run_dir = _run_folder(tmp_path / "run", done=2)
    before = _snapshot(run_dir)

    result = refused("--resume", str(run_dir), "--rounds", "5")

    assert "--resume" in _one_error_line(result)
    assert _snapshot(run_dir) == before


@pytest.mark.unit
def test_resume_of_a_finished_run_is_refused(
    tmp_path: Path, refused: Callable[..., CliResult]
) -> None:
    run_dir = _run_folder(tmp_path / "run", done=ROUNDS, finished=True)
    before = _snapshot(run_dir)

    result = refused("--resume", str(run_dir))

    assert "already finished" in _one_error_line(result)
    assert _snapshot(run_dir) == before


@pytest.mark.unit
def test_resume_of_a_folder_without_checkpoint_is_refused(
    tmp_path: Path, refused: Callable[..., CliResult]
) -> None:
    run_dir = _run_folder(tmp_path / "run", done=2)
    (run_dir / "checkpoint.pt").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()

    no_checkpoint = refused("--resume", str(run_dir))
    no_run = refused("--resume", str(empty))

    assert "checkpoint.pt" in _one_error_line(no_checkpoint)
    assert "not a fedvault run directory" in _one_error_line(no_run)
    assert list(empty.iterdir()) == []
