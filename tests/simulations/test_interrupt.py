"""A live run folder is locked, and Ctrl-C leaves a marker and the exact `--resume` command.

The journey: `fedvault simulate --rounds 10 --out D` runs; once round 1 is checkpointed (and
its ServerApp frozen meanwhile), a `--resume D` and a second run with `--out D` are refused
(exit 11, naming the running PID);
then the run gets SIGINT, as Ctrl-C would send it: it exits 130 with one line holding the
`--resume` command and leaves ``D/INTERRUPTED``. A lock file naming a dead PID is then
planted in D (as a SIGKILLed run would leave it) and the printed command, run as printed,
takes it over and finishes the run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedvault.common.errors import EXIT_INTERRUPTED, InUseError
from fedvault.common.locks import RUN_LOCK
from fedvault.common.report import ROUNDS_FILE, SUMMARY_FILE, read_jsonl
from fedvault.simulations.runner import INTERRUPTED_FILE
from tests.deployment import ProcessTrees, process_label, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROUNDS = 10


def _env(tmpdir: Path) -> dict[str, str]:
    return {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "TMPDIR": str(tmpdir)}


def _fedvault(cwd: Path, tmpdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedvault", *args],
        capture_output=True, text=True, cwd=cwd, env=_env(tmpdir), timeout=600, check=False,
    )  # fmt: skip


def _rounds(run_dir: Path) -> list[int]:
    """The rounds the run finished so far (0: the initial model's evaluation)."""
    rows = read_jsonl(run_dir / ROUNDS_FILE) if (run_dir / ROUNDS_FILE).is_file() else []
    return [int(row["round"]) for row in rows]


def _dead_pid() -> int:
    """A PID that no process has now (a child that has exited and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def journey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("interrupt")
    short_tmp = Path(tempfile.mkdtemp(prefix="fvint-"))  # Ray's socket paths must be short
    run_dir = tmp / "run"
    trees = ProcessTrees()
    outcome: dict[str, Any] = {"run_dir": run_dir, "trees": trees}
    log = tmp / "first.txt"
    with log.open("w") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedvault", "simulate", "--rounds", str(ROUNDS),
             "--out", str(run_dir)],
            stdout=handle, stderr=subprocess.STDOUT, cwd=tmp, env=_env(short_tmp),
        )  # fmt: skip
    outcome["pid"] = proc.pid
    try:
        wait_until(
            lambda: bool(trees.remember(proc.pid)) and _rounds(run_dir)[-1:] >= [1],
            "round 1", timeout=400, procs=[proc],
        )  # fmt: skip
        # Hold the run after round 1 (its ServerApp frozen) so the checks cannot race its end.
        (simulation,) = [
            p for p in trees.remember(proc.pid) if "flwr-simulation" in process_label(p)
        ]
        os.kill(simulation, signal.SIGSTOP)
        try:
            outcome["resume_while_running"] = _fedvault(
                tmp, short_tmp, "simulate", "--resume", str(run_dir)
            )
            outcome["second_run_same_out"] = _fedvault(
                tmp, short_tmp, "simulate", "--rounds", "2", "--out", str(run_dir)
            )
            trees.remember(proc.pid)
            assert proc.poll() is None, "the run ended while its ServerApp was frozen"
            proc.send_signal(signal.SIGINT)  # still frozen: the run cannot finish meanwhile
            proc.wait(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):  # stopped with its run, normally
                os.kill(simulation, signal.SIGCONT)
        outcome["code"] = proc.returncode
        outcome["output"] = log.read_text()
        outcome["marker"] = (run_dir / INTERRUPTED_FILE).read_text()
        outcome["lock_left"] = (run_dir / RUN_LOCK).exists()
        outcome["rounds_at_interrupt"] = _rounds(run_dir)
        outcome["alive_after_interrupt"] = trees.alive()

        # A SIGKILLed run's lock file names a PID that is gone: it must not block anyone.
        (run_dir / RUN_LOCK).write_text(f"pid={_dead_pid()}\nsince=earlier\ncommand=killed\n")
        lines = [line for line in outcome["output"].splitlines() if "--resume" in line]
        command = lines[-1].split("resume with: ", 1)[-1] if lines else "fedvault"
        words = shlex.split(command)
        assert words[0] == "fedvault", command
        outcome["resumed"] = _fedvault(tmp, short_tmp, *words[1:])
        outcome["rounds_after_resume"] = _rounds(run_dir)
        yield outcome
    finally:
        if proc.poll() is None:
            trees.kill(proc.pid)
            proc.wait(timeout=30)
        trees.kill_survivors()
        shutil.rmtree(short_tmp, ignore_errors=True)


def test_resume_of_a_running_run_is_refused_naming_its_pid(journey: dict[str, Any]) -> None:
    result = journey["resume_while_running"]

    assert result.returncode == InUseError.exit_code, result.stderr
    assert f"PID {journey['pid']}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_second_run_into_a_running_runs_folder_is_refused_naming_its_pid(
    journey: dict[str, Any],
) -> None:
    result = journey["second_run_same_out"]

    assert result.returncode == InUseError.exit_code, result.stderr
    assert f"PID {journey['pid']}" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_exits_130_with_one_line_holding_the_resume_command(
    journey: dict[str, Any],
) -> None:
    lines = [line for line in journey["output"].splitlines() if "interrupted" in line]

    assert journey["code"] == EXIT_INTERRUPTED
    assert len(lines) == 1, journey["output"][-3000:]
    expected = f"fedvault simulate --resume {shlex.quote(str(journey['run_dir'].resolve()))}"
    assert lines[0].endswith(f"resume with: {expected}"), lines
    assert "Traceback" not in journey["output"]


def test_ctrl_c_leaves_a_marker_with_time_reason_and_command_and_no_lock(
    journey: dict[str, Any],
) -> None:
    marker = journey["marker"]

    assert re.search(r"^interrupted: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", marker, re.MULTILINE)
    assert "reason: SIGINT (Ctrl-C)" in marker
    assert "resume: fedvault simulate --resume " in marker
    assert not journey["lock_left"]


def test_ctrl_c_stops_every_process_of_the_run(journey: dict[str, Any]) -> None:
    assert journey["alive_after_interrupt"] == []


def test_the_printed_command_takes_over_a_stale_lock_and_finishes_the_run(
    journey: dict[str, Any],
) -> None:
    result = journey["resumed"]
    run_dir = journey["run_dir"]

    assert result.returncode == 0, result.stderr[-3000:]
    assert journey["rounds_after_resume"] == list(range(ROUNDS + 1))  # each round once
    assert journey["rounds_at_interrupt"][-1] < ROUNDS
    assert (run_dir / SUMMARY_FILE).is_file()
    assert not (run_dir / INTERRUPTED_FILE).exists()
    assert not (run_dir / RUN_LOCK).exists()
