"""benchmarks.vs_flower_opacus: --quick runs fedvault and Flower's opacus example, well-formed JSON.

No timing thresholds: which side is faster on a loaded machine is the benchmark's finding
(benchmarks/RESULTS.md), not a test's. Unit tests beside it: the interleaving and the
phase arithmetic.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.vs_flower_opacus import CLI_IMPORTS, SIDES, TIMELINE, _phases, pair_orders

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_vs_flower_opacus_quick_runs_both_sides_and_writes_every_pair(tmp_path: Path) -> None:
    # Execute: one pair, one round
    out = tmp_path / "vs.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.vs_flower_opacus", "--quick", "--out", str(out),
         "--keep", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=880, cwd=REPO, check=False,
    )  # fmt: skip

    # Assert: the tables were printed and the JSON holds both runs of the pair
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| fedvault |" in done.stdout and "| example  |" in done.stdout
    payload = json.loads(out.read_text(encoding="utf-8"))
    assert payload["benchmark"] == "vs_flower_opacus" and payload["quick"] is True
    assert len(payload["machine"]["load_average"]) == 3
    assert payload["settings"] == {
        "sites": 3, "rounds": 1, "noise_multiplier": 2.285, "pairs": 1,
        "model": "logistic", "dataset": "breast-cancer",
    }  # fmt: skip
    (pair,) = payload["pairs"]
    assert pair["order"] == ["fedvault", "example"]
    for side in SIDES:
        run = pair[side]
        assert run["side"] == side and run["rounds"] == 1
        assert 0 <= run["final_accuracy"] <= 1
        # the same σ on both sides: one round of 1 epoch at σ = 2.285, q = 0.2, gives ε ≈ 1
        assert math.isclose(run["max_epsilon"], 1.0, abs_tol=0.01)
        assert len(run["load_average_before"]) == 3
        # each phase was found in the run's output and SuperLink log, in order
        marks = [run["timeline"][step] for step in TIMELINE]
        assert all(m is not None for m in marks) and marks == sorted(marks)
        assert marks[-1] < run["wall_seconds"]
        assert len(run["round_seconds"]) == 1
        total = run["startup_seconds"] + sum(run["round_seconds"]) + run["end_seconds"]
        assert math.isclose(total, run["wall_seconds"], abs_tol=0.01)
    summary = payload["summary"]
    assert summary["fedvault_median_seconds"] == pair["fedvault"]["wall_seconds"]
    assert summary["example_median_seconds"] == pair["example"]["wall_seconds"]
    expected = pair["fedvault"]["wall_seconds"] / pair["example"]["wall_seconds"]
    assert math.isclose(summary["ratio_of_medians"], expected, abs_tol=0.001)
    assert summary["fedvault_at_or_below"] == (expected <= 1)
    assert [row["what"] for row in payload["cli_imports"]] == list(CLI_IMPORTS)
    # the example ran from the offline copy, on its own SuperLink with its own FLWR_HOME
    example_log = (tmp_path / "runs" / "pair1-example" / "example-run.log").read_text()
    assert "Successfully installed opacus-fl" in example_log
    assert "epsilon(delta=1e-05)=1.00, noise=2.285" in example_log  # a site's own line


@pytest.mark.unit
def test_pairs_alternate_which_side_runs_first() -> None:
    assert pair_orders(1) == [("fedvault", "example")]
    assert pair_orders(4) == [
        ("fedvault", "example"),
        ("example", "fedvault"),
        ("fedvault", "example"),
        ("example", "fedvault"),
    ]


@pytest.mark.unit
def test_phases_split_a_run_into_startup_rounds_and_end() -> None:
    # round 1 begins at 10 s, round 2 at 13 s, the last round ends at 17 s, exit at 20 s
    assert _phases([10.0, 13.0, 17.0], 20.0) == {
        "startup_seconds": 10.0,
        "round_seconds": [3.0, 4.0],
        "end_seconds": 3.0,
    }
    # a mark not found: no profile rather than a wrong one
    assert _phases([10.0, None], 20.0)["startup_seconds"] is None
