"""Integration: benchmarks.round_overhead --quick runs a real TLS deployment and a simulation.

No timing thresholds: only that both federations ran every site and the overhead adds up.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.round_overhead import SITES, STARTUP_IMPORTS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]


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
    for run in runs.values():
        (only,) = run["rounds"]
        assert only["round"] == 1 and only["sites"] == len(SITES)
        assert only["slowest_train_seconds"] > 0  # every site timed its own training
        expected = only["round_seconds"] - only["slowest_train_seconds"]
        expected -= only["slowest_eval_seconds"]
        assert math.isclose(only["overhead_seconds"], expected, abs_tol=0.01)
        assert 0 < only["epsilon"] <= 1.0 + 1e-6
    # the deployment really ran over TLS with its own sites' ledgers
    sites = tmp_path / "runs" / "federation" / "sites"
    assert all((sites / site / "state" / "privacy-ledger.sqlite").exists() for site in SITES)
    assert [row["what"] for row in payload["startup_imports"]] == list(STARTUP_IMPORTS)
    assert all(row["seconds"] > 0 for row in payload["startup_imports"])
