"""benchmarks.scale: its orchestration, goal and tables over canned cases; its memory sampler.

The real simulation its --quick mode runs (10 sites, DP on, every site trained, no process
left behind) is the path tests/simulations/test_simulate.py runs; here main() runs in this
process with run_case replaced by canned cases, TreeMemory measures a small real tree, and
one real 3-site run is the suite's only real benchmark run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import scale
from benchmarks.scale import (
    DATASET,
    GIB,
    GOAL_BYTES,
    GOAL_SECONDS,
    GOAL_SITES,
    QUICK_ROUNDS,
    QUICK_SITES,
    TreeMemory,
    goal_status,
)
from fedvault.runtime.processes import descendants
from tests.benchmarks.conftest import recorder, run_main, table_rows

REPO = Path(__file__).resolve().parents[2]


def canned_case(sites: int, rounds: int, *, wall: float = 20.0) -> dict[str, Any]:
    """What run_case returns, for a run where every site trained in every round."""
    return {
        "sites": sites, "rounds": rounds, "dataset": DATASET, "rows_per_site": [240, 241],
        "wall_s": wall, "round_s": [2.0] * rounds, "median_round_s": 2.0, "cpu_s": 55.4,
        "cpu_s_by_process": {"ray::ClientAppActor": 40.0, "flower-superlink": 2.5},
        "peak_rss_bytes": 3 * GIB, "peak_pss_bytes": 2 * GIB, "peak_processes": 14,
        "memory_at_peak": [
            {"process": "ray::ClientAppActor", "count": 10, "rss_bytes": 2 * GIB},
            {"process": "flower-superlink", "count": 1, "rss_bytes": GIB // 4},
        ],
        "trained_sites_per_round": [sites] * rounds, "final_accuracy": 0.81,
        "epsilon": 0.95, "target_epsilon": 1.0, "noise_multiplier": [1.1],
        "leftover_processes": [], "failed_sites": {}, "refused_sites": {},
        "load_average": [1.0, 1.0, 1.0],
    }  # fmt: skip


@pytest.mark.unit
def test_quick_main_runs_the_quick_cases_and_tabulates_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    calls, fake = recorder(lambda sites, rounds, **_: canned_case(sites, rounds))
    monkeypatch.setattr(scale, "run_case", fake)

    # Execute
    printed, payload = run_main(scale, tmp_path, capsys)

    # Assert: --quick is QUICK_SITES × QUICK_ROUNDS, sampled every 0.5 s, nothing kept
    assert [call[:2] for call in calls] == [(s, QUICK_ROUNDS) for s in QUICK_SITES]
    assert all(call[2:] == (0.5, None) for call in calls)
    assert payload["benchmark"] == "scale" and payload["settings"]["dataset"] == DATASET
    assert payload["settings"]["sites"] == list(QUICK_SITES)
    assert payload["settings"]["rounds"] == QUICK_ROUNDS
    assert [case["sites"] for case in payload["results"]] == list(QUICK_SITES)
    assert all("goal" not in case for case in payload["results"])  # no goal-size case
    (row,) = table_rows(printed, str(QUICK_SITES[0]))
    assert row[1:8] == [str(QUICK_ROUNDS), "240/241", "20.0", "55", "3.00", "2.00", "14"]
    assert row[9:] == ["0.810", "0.950 (1)", str(QUICK_SITES[0])]
    # the processes at peak, with each one's CPU seconds
    assert table_rows(printed, "ray::ClientAppActor")[0][1:] == ["10", "2.00", "40.0"]
    assert table_rows(printed, "flower-superlink")[0][1:] == ["1", "0.25", "2.5"]


@pytest.mark.unit
def test_the_goal_case_is_judged_on_time_and_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the goal-size case over time, within memory
    slow = canned_case(GOAL_SITES, 1, wall=GOAL_SECONDS + 1)
    monkeypatch.setattr(scale, "run_case", lambda *_, **__: slow)

    # Execute
    printed, payload = run_main(scale, tmp_path, capsys, "--sites", str(GOAL_SITES))

    # Assert
    (case,) = payload["results"]
    assert case["goal"] == {"time_met": False, "memory_met": True, "met": False}
    assert "time NOT met, memory met" in printed
    at_goal = {"wall_s": GOAL_SECONDS, "peak_rss_bytes": GOAL_BYTES}
    assert goal_status(at_goal)["met"] is True
    assert goal_status({**at_goal, "peak_rss_bytes": GOAL_BYTES + 1})["memory_met"] is False


@pytest.mark.integration  # starts processes
def test_tree_memory_sums_the_tree_and_names_what_outlives_the_run() -> None:
    # Prepare: a shell whose child holds 40 MiB of its own, touched
    hold = "import time; b = bytearray(40 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
    hold += "time.sleep(60)"
    shell = subprocess.Popen(["sh", "-c", f'{sys.executable} -c "{hold}" & wait'])
    try:
        # Execute: sample until the child holds its memory (a few seconds at most)
        with TreeMemory(root=shell.pid, interval=0.05, pss_every=1) as memory:
            for _ in range(200):
                if memory.peak_rss >= 40 * 2**20 and memory.peak_processes == 2:
                    break
                time.sleep(0.1)
        (child,) = descendants(shell.pid)
        alive = memory.leftovers(grace=0)

        # Assert: both processes counted, the child's memory in the peak, PSS read too
        assert memory.peak_processes == 2 and memory.samples > 1
        assert memory.peak_rss >= 40 * 2**20 and memory.peak_pss > 0
        assert sum(count for count, _ in memory.at_peak.values()) == 2
        assert alive == [f"{child} {scale._label(child)}"]  # the root itself is no leftover
        os.kill(child, signal.SIGKILL)
        assert memory.leftovers(grace=5) == []
        assert memory.cpu_seconds >= 0 and set(memory.cpu_by_process()) == set(memory.at_peak)
    finally:
        for pid in descendants(shell.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shell.kill()
        shell.wait()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_the_benchmark_runs_a_real_simulation_and_measures_its_whole_process_tree(
    tmp_path: Path,
) -> None:
    # The one real benchmark run the suite keeps: the benchmarks' own process code (argument
    # parsing, run_case reading a real run's files, TreeMemory on Flower's and Ray's
    # processes) has no other test. Three sites, one round: the smallest real federation.
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--quick", "--sites", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=280, cwd=REPO, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| sites" in done.stdout
    (result,) = json.loads(out.read_text(encoding="utf-8"))["results"]
    assert (result["sites"], result["rounds"], result["dataset"]) == (3, QUICK_ROUNDS, DATASET)
    # every site trained, none failed or was refused; DP on and within its target
    assert result["trained_sites_per_round"] == [3] and len(result["round_s"]) == 1
    assert not result["failed_sites"] and not result["refused_sites"]
    assert 0 < result["epsilon"] <= result["target_epsilon"]
    assert 0 <= result["final_accuracy"] <= 1 and result["cpu_s"] > 0
    # the whole tree was measured: Flower's and Ray's processes, not this one alone
    assert result["peak_rss_bytes"] > 0 and result["peak_pss_bytes"] > 0
    labels = {p["process"] for p in result["memory_at_peak"]}
    assert "flower-superlink" in labels and any(label.startswith("ray::") for label in labels)
    # no Flower or Ray process of the run outlived it
    assert result["leftover_processes"] == []
