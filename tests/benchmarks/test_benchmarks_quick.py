"""Integration: the benchmarks' --quick modes run end to end and write well-formed JSON.

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

from benchmarks.accounting import ACCOUNTANTS
from benchmarks.dp_overhead import BASELINE, DATASETS, VARIANTS
from fedvault.common.data import load_dataset

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
MACHINE_KEYS = {"date", "cpu_model", "cores", "versions", "load_average"}


def _run(module: str, out: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| " in done.stdout  # a table was printed
    payload: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    assert payload["quick"] is True
    assert payload["machine"].keys() >= MACHINE_KEYS
    assert len(payload["machine"]["load_average"]) == 3
    return payload


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_dp_overhead_quick_writes_ratios_for_every_variant(tmp_path: Path) -> None:
    # Prepare / Execute
    payload = _run("benchmarks.dp_overhead", tmp_path / "dp.json")

    # Assert
    assert payload["benchmark"] == "dp_overhead"
    assert payload["cases"]
    for case in payload["cases"]:
        assert {"case", "batch_size", "rows", "steps", "variants", "goal_met"} <= case.keys()
        assert case["rows"] > 0 and case["steps"] > 0
        records = {v["variant"]: v for v in case["variants"]}
        assert set(records) == set(VARIANTS)
        assert records[BASELINE]["status"] == "ok"
        assert records[BASELINE]["ratio"] == pytest.approx(1.0)
        for record in records.values():
            if record["status"] == "ok":
                assert _positive(record["samples_per_s"]), record
                assert _positive(record["ratio"]), record
                assert all(_positive(t) for t in record["round_s"]), record
            else:
                assert record["status"] == "n/a" and record["reason"], record
        assert records["fedvault DP"]["status"] == "ok"  # fedvault's own path always runs
        assert _positive(case["best_dp_ratio"])


def test_accounting_quick_agrees_with_independent_accountants(tmp_path: Path) -> None:
    # Prepare / Execute
    payload = _run("benchmarks.accounting", tmp_path / "accounting.json")

    # Assert
    assert payload["benchmark"] == "accounting"
    assert payload["histories"]
    for history in payload["histories"]:
        results = history["accountants"]
        assert set(results) == set(ACCOUNTANTS)
        for values in results.values():
            assert _positive(values["epsilon"]) and math.isfinite(values["rel_diff"])
        # Independent implementations of the same bounds must agree; RDP is an upper bound
        # on the tight PLD/PRV value.
        rdp = results["opacus rdp"]["epsilon"]
        assert results["fedvault rdp"]["epsilon"] == pytest.approx(rdp, rel=1e-9)
        assert results["dp-accounting rdp"]["epsilon"] == pytest.approx(rdp, rel=1e-2)
        assert results["fedvault prv"]["epsilon"] == pytest.approx(
            results["dp-accounting pld"]["epsilon"], rel=0.03
        )
        assert rdp >= results["dp-accounting pld"]["epsilon"]
        if history["target_epsilon"] is not None:
            assert results["fedvault prv"]["epsilon"] <= history["target_epsilon"]


@pytest.mark.parametrize("name", ["breast-cancer", "credit", "digits"])
def test_benchmark_shapes_match_the_datasets(name: str) -> None:
    # The throughput benchmark uses synthetic data of these shapes; they must be the real ones.
    dataset = load_dataset(name)
    assert DATASETS[name] == (dataset.feature_shape, dataset.num_classes, len(dataset))
