"""benchmarks.privacy_utility: its settings, orchestration, summary and tables over recorded runs.

The real simulations its --quick mode runs (breast cancer, 3 hospitals, ε = 1 beside no DP)
are the path tests/simulations/test_simulate.py runs (ε within target, loss going down); here
main() runs in this process with run_one answering the runs a real --quick run recorded
(benchmarks/results/privacy_utility_quick_bk.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import privacy_utility
from benchmarks.privacy_utility import (
    FLAMBY_ANCHOR,
    HOSPITAL_EPSILON,
    QUICK_HOSPITAL_ROUNDS,
    Setting,
    hospital_settings,
)
from tests.benchmarks.conftest import recorder, run_main, table_rows

pytestmark = pytest.mark.unit

RESULTS = Path(privacy_utility.__file__).resolve().parent / "results"


def recorded_quick_runs() -> dict[bool, dict[str, Any]]:
    """The DP and the non-private run of a real --quick run, by whether DP was on."""
    payload = json.loads((RESULTS / "privacy_utility_quick_bk.json").read_text(encoding="utf-8"))
    return {run["dp"]: run for run in payload["runs"]}


def test_quick_settings_are_one_seed_at_epsilon_one_and_without_dp() -> None:
    # Execute
    dp, public = hospital_settings(seeds=[0], rounds=QUICK_HOSPITAL_ROUNDS)
    private_cfg, public_cfg = dp.config(), public.config()

    # Assert: what `fedvault simulate hospitals` would run with these flags
    assert (dp.epsilon, public.epsilon) == (HOSPITAL_EPSILON, None)
    assert private_cfg.privacy.target_epsilon == HOSPITAL_EPSILON
    assert private_cfg.privacy.target_delta == pytest.approx(1e-5)
    assert private_cfg.federation.rounds == public_cfg.federation.rounds == QUICK_HOSPITAL_ROUNDS
    assert private_cfg.federation.sites == public_cfg.federation.sites == 3
    assert private_cfg.seed == public_cfg.seed == 0
    assert private_cfg.privacy.enabled and not public_cfg.privacy.enabled
    assert (
        dp.label == "hospitals iid ε=1 seed 0"
        and public.label == "hospitals iid non-private seed 0"
    )


def test_quick_main_compares_epsilon_one_with_no_dp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    recorded = recorded_quick_runs()
    calls, fake = recorder(lambda setting, runs_dir, index: recorded[setting.epsilon is not None])
    monkeypatch.setattr(privacy_utility, "run_one", fake)

    # Execute
    printed, payload = run_main(privacy_utility, tmp_path, capsys)

    # Assert: --quick needs no Fashion-MNIST, runs ε = 1 then no DP, one seed
    settings: list[Setting] = [call[0] for call in calls]
    assert [(s.study, s.epsilon, s.seed, s.rounds) for s in settings] == [
        ("hospitals", HOSPITAL_EPSILON, 0, QUICK_HOSPITAL_ROUNDS),
        ("hospitals", None, 0, QUICK_HOSPITAL_ROUNDS),
    ]
    assert [call[2] for call in calls] == [1, 2]
    assert payload["benchmark"] == "privacy_utility" and payload["complete"] is True
    assert payload["settings"]["hospital_seeds"] == [0]
    assert payload["settings"]["hospital_rounds"] == QUICK_HOSPITAL_ROUNDS
    assert payload["settings"]["fashion_epsilons"] == [] and payload["fashion_goal"] == []
    dp, public = recorded[True], recorded[False]
    summary = payload["hospitals"]
    assert summary["seeds"] == [0] and summary["anchor"] == FLAMBY_ANCHOR
    assert summary["cost_mean"] == pytest.approx(dp["final_accuracy"] - public["final_accuracy"])
    assert summary["dp_sd"] is None  # one seed: no spread
    # the tables: each run, then the cost of ε = 1 in points
    rows = table_rows(printed, "0")
    assert [row[1] for row in rows] == [f"{dp['epsilon']:.2f} (target 1)", "none (no DP)"]
    assert rows[0][4] == f"{100 * dp['final_accuracy']:.1f} %"
    assert f"{100 * summary['cost_mean']:+.1f}" in printed


def test_a_run_that_fails_leaves_the_finished_runs_in_a_partial_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the second simulation dies
    recorded = recorded_quick_runs()

    def first_only(setting: Setting, runs_dir: Path, index: int) -> dict[str, Any]:
        if index == 2:
            raise RuntimeError("simulation failed")
        return recorded[True]

    monkeypatch.setattr(privacy_utility, "run_one", first_only)
    out = tmp_path / "partial.json"

    # Execute
    with pytest.raises(RuntimeError, match="simulation failed"):
        privacy_utility.main(["--quick", "--out", str(out)])

    # Assert
    partial = json.loads(out.read_text(encoding="utf-8"))
    assert partial["complete"] is False and len(partial["runs"]) == 1


def test_tables_from_reprints_a_recorded_full_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    recorded = RESULTS / "privacy_utility.json"
    runs = json.loads(recorded.read_text(encoding="utf-8"))["runs"]

    # Execute
    code = privacy_utility.main(["--tables-from", str(recorded), "--out", str(tmp_path / "r.json")])

    # Assert: every run's table row is back, and the file is the recorded one
    printed = capsys.readouterr().out
    assert code == 0
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["runs"] == runs
    hospitals = [r for r in runs if r["study"] == "hospitals"]
    assert len(table_rows(printed, str(hospitals[0]["seed"]))) >= 1
    assert FLAMBY_ANCHOR in printed
