"""benchmarks.dp_overhead and benchmarks.accounting: orchestration, ratios and tables, canned.

main() runs in this process with the timed training rounds replaced by stand-ins of known
durations, so every ratio has an exact expected value. The training the rounds time is
fedvault's own DP-SGD path, tested in tests/common/test_training.py, test_training_modes.py
and test_bk_dpsgd.py; the accountants' agreement is tested in tests/common/test_privacy.py.
Here the benchmark's own wiring of the independent accountants is checked on a short history.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import accounting, dp_overhead
from benchmarks.accounting import ACCOUNTANTS, REFERENCE, History, compare
from benchmarks.dp_overhead import (
    BASELINE,
    DATASETS,
    FEDVAULT_DP,
    GOAL_RATIO,
    PLAIN,
    QUICK_PAIRS,
    VARIANTS,
    Case,
    Timing,
)
from fedvault.common.data import load_dataset
from fedvault.common.privacy import PrivacyEvent
from tests.benchmarks.conftest import run_main, table_rows

pytestmark = pytest.mark.unit

#: Each variant's round time as a multiple of the baseline's; None: the variant cannot run.
FACTORS: dict[str, float | None] = {
    BASELINE: 1.0, PLAIN: 0.5, FEDVAULT_DP: 1.25, "fedvault DP opacus": 2.0,
    "opacus hooks": 3.0, "opacus functorch": 4.0, "opacus ew": None, "opacus ghost": 1.2,
}  # fmt: skip
#: Call n of every variant but the baseline is off by this factor: the per-round ratios differ.
JITTER = {1: 1.0, 2: 1.1, 3: 0.9, 4: 1.0}


def jitter(variant: str, call: int) -> float:
    return 1.0 if variant == BASELINE else JITTER[call]


def canned_runners(case: Case, data: object) -> dict[str, Any]:
    """Stand-ins for the real rounds: call n of a variant takes n × its factor × jitter s."""
    calls = dict.fromkeys(VARIANTS, 0)

    def runner(variant: str) -> Any:
        def run() -> Timing:
            factor = FACTORS[variant]
            if factor is None:
                raise RuntimeError("ew cannot handle this layer\nsecond line")
            calls[variant] += 1
            seconds = factor * calls[variant] * jitter(variant, calls[variant])
            direct = variant == PLAIN or variant.startswith("opacus")
            return Timing(
                round_s=seconds, loop_s=seconds / 2 if direct else None, cpu_s=2 * seconds
            )

        return run

    return {variant: runner(variant) for variant in VARIANTS}


def test_quick_main_measures_every_variant_and_reports_exact_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    assert set(FACTORS) == set(VARIANTS)
    monkeypatch.setattr(dp_overhead, "runners", canned_runners)

    # Execute
    printed, payload = run_main(dp_overhead, tmp_path, capsys)

    # Assert: --quick is 3 recorded rounds (after a warm-up) of at most 3 steps per case
    assert payload["benchmark"] == "dp_overhead"
    assert payload["settings"]["repeats"] == 3 and payload["settings"]["max_steps"] == 3
    assert [(c["model"], c["dataset"]) for c in payload["cases"]] == list(QUICK_PAIRS)
    for case in payload["cases"]:
        assert 0 < case["steps"] <= 3 and case["rows"] <= 3 * case["batch_size"]
        records = {v["variant"]: v for v in case["variants"]}
        assert set(records) == set(VARIANTS)
        # calls 2..4 are recorded: per-round ratios factor × (1.1, 0.9, 1.0), median the factor
        for variant, factor in FACTORS.items():
            record = records[variant]
            if factor is None:
                assert record == {
                    "variant": variant, "status": "n/a",
                    "reason": "RuntimeError: ew cannot handle this layer",
                }  # fmt: skip
                continue
            rounds = [factor * n * jitter(variant, n) for n in (2, 3, 4)]
            assert record["round_s"] == rounds
            assert record["samples_per_s"] == pytest.approx(case["rows"] / sorted(rounds)[1])
            assert record["ratio"] == pytest.approx(factor)
            assert record["cpu_ratio"] == pytest.approx(factor)
            if variant == PLAIN or variant.startswith("opacus"):
                assert record["loop_ratio"] == pytest.approx(factor / FACTORS[PLAIN])
                assert record["setup_s"] == pytest.approx(sorted(rounds)[1] / 2)
            else:
                assert record["loop_ratio"] is None and record["setup_s"] is None
        assert case["best_dp_variant"] == "opacus ghost"
        assert case["best_dp_ratio"] == pytest.approx(1.2)
        assert case["fedvault_dp_ratio"] == pytest.approx(1.25)
        assert GOAL_RATIO >= 1.25 and case["goal_met"] is True
        assert case["noise_draw_s"] > 0 and case["noise_floor_ratio"] > 1
    # the tables: samples/s, slowdowns with the goal and the failed variant's reason
    name = payload["cases"][0]["case"]
    _, slowdown, cpu, steps = table_rows(printed, name)
    assert "n/a (RuntimeError: ew cannot handle this layer)" in slowdown
    assert slowdown[VARIANTS.index(FEDVAULT_DP) + 1] == "1.25"
    assert slowdown[-2:] == ["opacus ghost 1.20×", "met"]
    assert cpu[1 + VARIANTS.index("opacus hooks") - 1] == "3.00"
    assert steps[2:4] == ["6.00", "8.00"]  # hooks, functorch: loop ratio over the plain loop


def test_a_failing_baseline_stops_the_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(case: Case, data: object) -> dict[str, Any]:
        runs = canned_runners(case, data)

        def fail() -> Timing:
            raise RuntimeError("out of memory")

        return {**runs, BASELINE: fail}

    monkeypatch.setattr(dp_overhead, "runners", broken)
    with pytest.raises(RuntimeError, match="the baseline failed: RuntimeError: out of memory"):
        dp_overhead.main(["--quick", "--cases", "logistic"])


@pytest.mark.parametrize("name", ["breast-cancer", "credit", "digits"])
def test_benchmark_shapes_match_the_datasets(name: str) -> None:
    # The throughput benchmark uses synthetic data of these shapes; they must be the real ones.
    dataset = load_dataset(name)
    assert DATASETS[name] == (dataset.feature_shape, dataset.num_classes, len(dataset))


#: A short two-phase history: each accountant takes well under a second on it.
SHORT = History(
    name="short",
    description="two phases",
    events=(PrivacyEvent(1.1, 0.2, 5), PrivacyEvent(1.1, 0.2, 5), PrivacyEvent(1.5, 0.1, 10)),
    target_epsilon=3.0,
)


def test_the_benchmarks_accountants_agree_on_a_short_history() -> None:
    # Execute: fedvault's, Opacus' and dp-accounting's own implementations, as wired here
    record = compare(SHORT)

    # Assert: independent implementations of the same bounds agree; RDP bounds PLD/PRV above
    results = record["accountants"]
    assert set(results) == set(ACCOUNTANTS)
    assert (record["rows"], record["phases"], record["steps"]) == (3, 2, 20)
    rdp = results["opacus rdp"]["epsilon"]
    assert results["fedvault rdp"]["epsilon"] == pytest.approx(rdp, rel=1e-9)
    assert results["dp-accounting rdp"]["epsilon"] == pytest.approx(rdp, rel=1e-2)
    pld = results[REFERENCE]["epsilon"]
    assert results["fedvault prv"]["epsilon"] == pytest.approx(pld, rel=0.03)
    assert rdp >= pld > 0
    for values in results.values():
        assert values["rel_diff"] == pytest.approx((values["epsilon"] - pld) / pld)
        assert math.isfinite(values["seconds"])


def test_quick_accounting_main_tabulates_each_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: one canned history; every accountant answers a fixed ε
    built: list[bool] = []

    def canned_histories(*, quick: bool) -> list[History]:
        built.append(quick)
        return [SHORT]

    epsilons = {name: 1.0 + index / 10 for index, name in enumerate(ACCOUNTANTS)}
    monkeypatch.setattr(accounting, "histories", canned_histories)
    monkeypatch.setattr(
        accounting,
        "epsilon_functions",
        lambda: {name: (lambda events, e=e: e) for name, e in epsilons.items()},
    )

    # Execute
    printed, payload = run_main(accounting, tmp_path, capsys)

    # Assert
    assert built == [True]
    assert payload["benchmark"] == "accounting"
    assert payload["settings"]["accountants"] == list(ACCOUNTANTS)
    (history,) = payload["histories"]
    reference = epsilons[REFERENCE]
    for name, epsilon in epsilons.items():
        assert history["accountants"][name]["epsilon"] == epsilon
        assert history["accountants"][name]["rel_diff"] == pytest.approx(
            (epsilon - reference) / reference
        )
    eps_row, diff_row, _ = table_rows(printed, "short")
    assert eps_row[1:4] == ["3/2/20", "mixed", "3"]
    assert eps_row[4:] == [f"{epsilons[name]:.4f}" for name in ACCOUNTANTS]
    others = [name for name in ACCOUNTANTS if name != REFERENCE]
    assert diff_row[1:] == [
        f"{100 * (epsilons[name] - reference) / reference:+.2f} %" for name in others
    ]
