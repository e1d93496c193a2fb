"""Integration: the privacy/utility benchmark's --quick mode runs real simulations end to end.

No timing thresholds: the machine may be loaded; only the shape and sanity of results count.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.privacy_utility import HOSPITAL_EPSILON, QUICK_HOSPITAL_ROUNDS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
MACHINE_KEYS = {"date", "cpu_model", "cores", "versions", "load_average"}


def _accuracy(value: object) -> bool:
    return isinstance(value, float) and 0 < value <= 1


def test_privacy_utility_quick_compares_epsilon_one_with_no_dp(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "privacy_utility.json"

    # Execute
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.privacy_utility", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=580,
        cwd=REPO,
    )

    # Assert
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| " in done.stdout  # a table was printed
    payload: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    assert payload["benchmark"] == "privacy_utility"
    assert payload["quick"] is True and payload["complete"] is True
    assert payload["machine"].keys() >= MACHINE_KEYS
    runs = payload["runs"]
    assert {r["study"] for r in runs} == {"hospitals"}  # quick mode needs no Fashion-MNIST
    private = [r for r in runs if r["dp"]]
    public = [r for r in runs if not r["dp"]]
    assert len(private) == 1 and len(public) == 1
    for run in runs:
        assert run["rounds"] == QUICK_HOSPITAL_ROUNDS
        assert len(run["accuracy_by_round"]) == QUICK_HOSPITAL_ROUNDS
        assert _accuracy(run["final_accuracy"]) and _accuracy(run["best_accuracy"]), run
        assert run["best_accuracy"] >= run["final_accuracy"]
        assert not run["failed_sites"] and run["ended_early"] is None
        assert math.isfinite(run["wall_s"]) and run["wall_s"] > 0
    (dp,) = private
    # The accountant spent some budget, and never more than the target it calibrated to.
    assert dp["target_epsilon"] == HOSPITAL_EPSILON
    assert 0 < dp["epsilon"] <= HOSPITAL_EPSILON * (1 + 1e-9)
    assert dp["noise_multiplier"] > 0 and dp["delta"] == pytest.approx(1e-5)
    (baseline,) = public
    assert baseline["epsilon"] is None and baseline["noise_multiplier"] is None
    # Training did something: the non-private model beats its own initial weights.
    assert baseline["final_accuracy"] > baseline["initial_accuracy"]
    summary = payload["hospitals"]
    assert summary["seeds"] == [0]
    assert summary["cost_mean"] == pytest.approx(dp["final_accuracy"] - baseline["final_accuracy"])
