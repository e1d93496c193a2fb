"""Integration: the scale benchmark's --quick mode runs a real simulation and measures it.

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

from benchmarks.scale import DATASET, QUICK_ROUNDS, QUICK_SITES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
MACHINE_KEYS = {"date", "cpu_model", "cores", "versions", "load_average"}


def test_scale_quick_runs_every_site_and_measures_the_whole_process_tree(
    tmp_path: Path,
) -> None:
    # Prepare
    out = tmp_path / "scale.json"

    # Execute
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=REPO,
    )

    # Assert: a table, well-formed JSON, the machine described
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| sites" in done.stdout
    payload: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    assert payload["benchmark"] == "scale"
    assert payload["quick"] is True
    assert payload["machine"].keys() >= MACHINE_KEYS
    assert len(payload["machine"]["load_average"]) == 3
    assert [r["sites"] for r in payload["results"]] == list(QUICK_SITES)
    for result in payload["results"]:
        sites, rounds = result["sites"], result["rounds"]
        assert rounds == QUICK_ROUNDS and result["dataset"] == DATASET
        # every site trained in every round, none failed or refused
        assert result["trained_sites_per_round"] == [sites] * rounds
        assert not result["failed_sites"] and not result["refused_sites"]
        # the whole tree was measured: Flower's and Ray's processes, not this one alone
        assert result["peak_rss_bytes"] > 0 and result["peak_pss_bytes"] > 0
        assert result["peak_processes"] > 3
        labels = {p["process"] for p in result["memory_at_peak"]}
        assert "flower-superlink" in labels
        assert any(label.startswith("ray::") for label in labels)
        assert result["cpu_s"] > 0
        assert result["wall_s"] > 0 and len(result["round_s"]) == rounds
        # DP was on and its composed epsilon stayed within the default target
        assert 0 < result["epsilon"] <= result["target_epsilon"]
        assert all(sigma > 0 for sigma in result["noise_multiplier"])
        assert math.isfinite(result["final_accuracy"]) and 0 <= result["final_accuracy"] <= 1
        # no Flower or Ray process of the run outlived it
        assert result["leftover_processes"] == []
