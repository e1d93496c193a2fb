"""Integration: `fedvault simulate --central-dp` reports site-level ε apart from the sites' ε."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import rdp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(200)]


def _simulate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # As in test_simulate.py: a private SuperLink on a free loopback port with its own
    # FLWR_HOME (simulations/runner.py), run from a temporary working directory.
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "fedvault", "simulate", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env=env,
    )


def test_central_dp_run_reports_site_level_epsilon_apart_from_sample_level(
    tmp_path: Path,
) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    sigma, rounds, delta = 0.5, 2, 1e-5

    # Execute
    proc = _simulate(
        tmp_path,
        "--rounds",
        str(rounds),
        "--central-dp",
        "--central-noise-multiplier",
        str(sigma),
        "--central-clipping-norm",
        "5",
        "--out",
        str(run_dir),
    )

    # Assert: the run completed and wrote both privacy levels, each where it belongs
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    central = summary["central_dp"]
    assert central["level"] == "site" and central["accounting"] == "rdp"
    assert (central["noise_multiplier"], central["clipping_norm"]) == (sigma, 5.0)
    assert central["releases"] == rounds  # every site replied every round: each round released
    independent = rdp.RdpAccountant()
    independent.compose(dp_accounting.GaussianDpEvent(sigma), rounds)
    assert central["epsilon"] == pytest.approx(independent.get_epsilon(delta), rel=1e-6)
    assert central["delta"] == delta
    assert 0 < summary["epsilon"] <= 1.0  # the sites' sample-level DP-SGD ε (target 1)
    assert summary["epsilon"] != central["epsilon"]
    # Assert: the table shows the central DP row next to the sample-level one
    row = re.search(
        r"central DP \(site-level\)\s*│\s*ε = (\d+\.\d{3}) at δ = 1e-05, σ = 0\.5, clip 5, "
        r"2 releases",
        proc.stdout,
    )
    assert row, proc.stdout[-2000:]
    assert float(row.group(1)) == pytest.approx(central["epsilon"], abs=5e-4)
    assert "privacy spent" in proc.stdout
    assert (
        "central DP on (site-level): σ = 0.5, clipping norm 5"
        in (run_dir / "flower.log").read_text()
    )
