"""Integration: benchmarks.round_overhead --quick runs a real TLS deployment and a simulation.

No timing thresholds: only that both federations ran every site and the overhead adds up,
and that every site's process tree was measured before and after the run. Unit tests beside
it: the scaled site data and the process-tree memory reading.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.round_overhead import (
    SITES,
    STARTUP_IMPORTS,
    data_scales,
    process_tree,
    scaled_rows,
    tree_memory,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_round_overhead_quick_measures_both_federations(tmp_path: Path) -> None:
    # Execute
    out = tmp_path / "rounds.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.round_overhead", "--quick", "--out", str(out),
         "--keep", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=880, cwd=REPO, check=False,
    )  # fmt: skip

    # Assert
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| deployment |" in done.stdout and "| simulation |" in done.stdout
    payload = json.loads(out.read_text(encoding="utf-8"))
    assert payload["benchmark"] == "round_overhead" and payload["quick"] is True
    runs = {run["mode"]: run for run in payload["runs"]}
    assert set(runs) == {"deployment", "simulation"}
    assert payload["data_scales"] == [1]  # --quick measures the sites' data as it is
    assert [(s["mode"], s["data_scale"]) for s in payload["summaries"]] == [
        ("deployment", 1),
        ("simulation", 1),
    ]
    for run in runs.values():
        (only,) = run["rounds"]
        assert only["round"] == 1 and only["sites"] == len(SITES)
        assert only["slowest_train_seconds"] > 0  # every site timed its own training
        expected = only["round_seconds"] - only["slowest_train_seconds"]
        expected -= only["slowest_eval_seconds"]
        assert math.isclose(only["overhead_seconds"], expected, abs_tol=0.01)
        assert 0 < only["epsilon"] <= 1.0 + 1e-6
    for run in runs.values():  # breast-cancer's 569 rows, split in three
        assert run["data_scale"] == 1 and set(run["site_rows"]) == set(SITES)
        assert sum(run["site_rows"].values()) == 569
    # every site's whole process tree, once connected and again after the run
    memory = runs["deployment"]["site_memory"]
    assert [(m["site"], m["when"]) for m in memory] == [
        *((site, "before run") for site in SITES),
        *((site, "after run") for site in SITES),
    ]
    for m in memory:
        assert m["data_scale"] == 1 and m["processes"] == len(m["tree"]) >= 2
        assert {"zombies", "settled"} <= set(m)
        assert m["rss_mib"] == round(sum(p["rss_kib"] for p in m["tree"]) / 1024, 1) > 50
        assert m["pss_mib"] is None or 0 < m["pss_mib"] <= m["rss_mib"]
        assert "fedvault client start" in m["tree"][0]["command"]  # the tree's root
    assert re.search(r"^\| 1× +\| hospital-a \| before run +\| \d+ ", done.stdout, re.M)
    # the deployment really ran over TLS with its own sites' ledgers
    sites = tmp_path / "runs" / "x1" / "federation" / "sites"
    assert all((sites / site / "state" / "privacy-ledger.sqlite").exists() for site in SITES)
    assert [row["what"] for row in payload["startup_imports"]] == list(STARTUP_IMPORTS)
    assert all(row["seconds"] > 0 for row in payload["startup_imports"])


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
