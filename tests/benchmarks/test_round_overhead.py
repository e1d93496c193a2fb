"""benchmarks.round_overhead: its records, tables and ratios over canned runs; its own parts.

The real TLS deployment its --quick mode starts is the one tests/server/test_deployment.py
runs; the simulation, tests/simulations/test_simulate.py's. Here main() runs in this process
with both replaced by canned run directories, so its orchestration, arithmetic and tables are
checked in milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import round_overhead
from benchmarks.round_overhead import (
    SITES,
    STARTUP_IMPORTS,
    _records,
    data_scales,
    process_tree,
    scaled_rows,
    tree_memory,
)
from tests.benchmarks.conftest import recorder, run_main, table_rows


def write_run(run_dir: Path, rounds: list[tuple[float, float, float]]) -> None:
    """A run directory as `fedvault run`/`simulate` leaves it: metrics.jsonl and rounds.jsonl.

    ``rounds``: per round, (round seconds, a factor on each site's train/eval seconds, ε).
    """
    run_dir.mkdir(parents=True)
    rows = [{"round": 0, "round_seconds": 4.0, "accuracy": 0.6, "epsilon": 0.0}]
    metrics = []
    for number, (seconds, factor, epsilon) in enumerate(rounds, start=1):
        rows.append(
            {"round": number, "round_seconds": seconds, "accuracy": 0.9, "epsilon": epsilon}
        )
        for index, site in enumerate(SITES):  # 190 rows each, 38 held out: 569 in all
            metrics.append({
                "site": site, "round": number, "num_examples": 152 - (index == 2),
                "test_examples": 38, "train_seconds": factor * (index + 1),
                "eval_seconds": None if index else factor / 10,
            })  # fmt: skip
    (run_dir / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


@pytest.mark.unit
def test_records_time_each_round_by_its_slowest_site_and_skip_the_initial_evaluation(
    tmp_path: Path,
) -> None:
    # Prepare
    write_run(tmp_path / "run", [(5.0, 0.5, 0.4), (3.0, 0.25, 0.7)])

    # Execute
    record = _records("deployment", tmp_path / "run", 12.3456, scale=10)

    # Assert: round 0 skipped; train 3 × factor (site c), eval factor / 10 (site a), rest overhead
    assert record["mode"] == "deployment" and record["data_scale"] == 10
    assert record["command_seconds"] == 12.35
    assert record["site_rows"] == {"hospital-a": 190, "hospital-b": 190, "hospital-c": 189}
    assert [r["round"] for r in record["rounds"]] == [1, 2]
    first, second = record["rounds"]
    assert first["sites"] == 3 and first["slowest_train_seconds"] == 1.5
    assert first["slowest_eval_seconds"] == 0.05
    assert first["overhead_seconds"] == round(5.0 - 1.5 - 0.05, 3)
    assert second["overhead_seconds"] == round(3.0 - 0.75 - 0.025, 3)
    assert (second["epsilon"], second["accuracy"]) == (0.7, 0.9)


def _memory(site: str, when: str) -> dict[str, Any]:
    tree = [{"pid": 10, "rss_kib": 200 * 1024, "command": "fedvault client start"}]
    return {"site": site, "when": when, "processes": 1, "zombies": 0, "settled": True,
            "rss_mib": 200.0, "pss_mib": None, "tree": tree}  # fmt: skip


@pytest.mark.unit
def test_quick_main_compares_the_deployment_with_the_simulation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: canned runs in place of the real TLS deployment and simulation
    write_run(tmp_path / "deployed", [(5.0, 0.5, 0.9)])  # overhead 3.45 s: goal not met
    write_run(tmp_path / "simulated", [(2.0, 0.5, 0.9)])  # overhead 0.45 s: met

    def deployed(folder: Path, rounds: int, scale: int = 1) -> dict[str, Any]:
        record = round_overhead._records("deployment", tmp_path / "deployed", 30.0, scale)
        memory = [_memory(s, w) for w in ("before run", "after run") for s in SITES]
        return {**record, "site_memory": [{"data_scale": scale, **m} for m in memory]}

    deployments, fake_deployment = recorder(deployed)
    simulations, fake_simulation = recorder(
        lambda folder, rounds: round_overhead._records("simulation", tmp_path / "simulated", 9.0)
    )
    monkeypatch.setattr(round_overhead, "deployment", fake_deployment)
    monkeypatch.setattr(round_overhead, "simulation", fake_simulation)
    monkeypatch.setattr(
        round_overhead, "startup_profile",
        lambda repeats: [{"what": what, "seconds": 0.5} for what in STARTUP_IMPORTS],
    )  # fmt: skip

    # Execute
    printed, payload = run_main(round_overhead, tmp_path, capsys)

    # Assert: --quick is one round at the data as it is, deployment then simulation
    assert [call[1:] for call in deployments] == [(1, 1)] and [c[1] for c in simulations] == [1]
    assert payload["benchmark"] == "round_overhead" and payload["data_scales"] == [1]
    assert [run["mode"] for run in payload["runs"]] == ["deployment", "simulation"]
    deployment, simulation = payload["summaries"]
    assert (deployment["mode"], deployment["data_scale"], deployment["rows_per_site"]) == (
        "deployment", 1, 190,
    )  # fmt: skip
    assert deployment["overhead_seconds"] == 3.45 and simulation["overhead_seconds"] == 0.45
    assert (
        deployment["overhead_vs_simulation"] == round(3.45 / 0.45, 1) == payload["overhead_ratio"]
    )
    assert "overhead_vs_simulation" not in simulation
    assert deployment["final_epsilon"] == 0.9 and deployment["final_accuracy"] == 0.9
    # the tables: one row per mode with its goal, one per site and moment, the imports
    (dep_row,) = table_rows(printed, "deployment")
    (sim_row,) = table_rows(printed, "simulation")
    assert dep_row[1:] == ["1×", "190", "5.0", "1.5", "0.05", "3.45", "7.7", "not met"]
    assert sim_row[-2:] == ["", "met"]
    assert re.search(r"^\| 1× +\| hospital-a \| before run +\| 1 +\| 200.0 +\| n/a", printed, re.M)
    assert len(table_rows(printed, "1×")) == 2 * len(SITES)
    assert [row["what"] for row in payload["startup_imports"]] == list(STARTUP_IMPORTS)
    assert payload["flower_intervals"] and all(
        w["seconds"] > 0 for w in payload["flower_intervals"]
    )


# --- the parts, without processes ----------------------------------------------------------


@pytest.mark.unit
def test_scaled_rows_repeat_the_data_with_distinct_noisy_copies() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    features = rng.normal(10.0, 2.0, size=(50, 4))
    labels = rng.integers(0, 2, size=50)

    # Execute
    scaled, scaled_labels = scaled_rows(features, labels, 10, np.random.default_rng(1))

    # Assert: 10× the rows, the first copy exact, no two rows equal, close to their original
    assert scaled.shape == (500, 4) and list(scaled_labels) == list(labels) * 10
    assert np.array_equal(scaled[:50], features)
    assert len({tuple(row) for row in scaled}) == 500
    drift = np.abs(scaled - np.tile(features, (10, 1))).max(axis=0)
    assert np.all(drift < 0.1 * features.std(axis=0))
    # seeded: the same data twice; scale 1 is the data itself
    again, _ = scaled_rows(features, labels, 10, np.random.default_rng(1))
    assert np.array_equal(scaled, again)
    assert np.array_equal(scaled_rows(features, labels, 1, rng)[0], features)
    with pytest.raises(ValueError, match="got 0"):
        scaled_rows(features, labels, 0, rng)


@pytest.mark.unit
def test_data_scale_option_refuses_what_is_not_a_scale() -> None:
    assert data_scales("1,10,100") == (1, 10, 100)
    for bad in ("0", "1,1", "2.5", "", "-3"):
        with pytest.raises(argparse.ArgumentTypeError, match="got"):
            data_scales(bad)


@pytest.mark.integration  # starts processes
def test_tree_memory_sums_a_process_and_its_children() -> None:
    # Prepare: a shell with two children, each holding 30 MiB of its own, touched, and a
    # third whose own child has exited unreaped (a zombie)
    hold = "import time; b = bytearray(30 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
    hold += "time.sleep(60)"
    child = f'{sys.executable} -c "{hold}"'
    reaper = "import os, time; os.fork() or os._exit(0); time.sleep(60)"
    unreaped = f'{sys.executable} -c "{reaper}"'
    shell = subprocess.Popen(["sh", "-c", f"{child} & {child} & {unreaped} & wait"])
    try:
        # Execute: read until both children hold their memory (a few seconds at most)
        for _ in range(100):
            memory = tree_memory(shell.pid)
            if memory["processes"] == 4 and memory["zombies"] and memory["rss_mib"] >= 60:
                break
            time.sleep(0.2)

        # Assert: the shell first, its live children counted, RSS summed over the tree
        assert memory["processes"] == 4 and memory["tree"][0]["pid"] == shell.pid
        assert memory["zombies"] == 1  # counted apart, holding no memory
        assert memory["rss_mib"] >= 60
        assert memory["rss_mib"] == round(sum(p["rss_kib"] for p in memory["tree"]) / 1024, 1)
        if memory["pss_mib"] is not None:  # smaps_rollup is readable here
            assert 60 <= memory["pss_mib"] <= memory["rss_mib"]
    finally:
        for pid in process_tree(shell.pid)[1:]:  # the children, by their own pids
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shell.kill()
        shell.wait()
