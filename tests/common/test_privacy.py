"""Tests for common/privacy.py: epsilon composed over a site's whole history, and calibration.

Every epsilon is checked against an independent computation: Opacus' PRVAccountant stepped
one DP-SGD step at a time, and Google's dp-accounting PLD accountant.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedvault.common.config import MAX_MEANINGFUL_EPSILON
from fedvault.common.errors import ConfigError, PrivacyBudgetExceeded
from fedvault.common.fingerprint import dataset_fingerprint
from fedvault.common.ledger import LedgerEntry, PrivacyLedger
from fedvault.common.privacy import (
    ACCOUNTANTS,
    MemoPRVAccountant,
    MemoRDPAccountant,
    PrivacyEvent,
    calibrate_after_history,
    calibrate_noise_multiplier,
    check_accountant,
    compute_epsilon,
)

pytestmark = pytest.mark.unit

DELTA = 1e-5
#: (sigma, q, steps) phases with different noise and sampling, as sites with changing plans.
MIXED = ((1.5, 0.1, 40), (1.0, 0.05, 60), (2.0, 0.2, 25))
#: PRV takes ~0.2 s per epsilon: a few fixed (derandomized) examples keep the file fast.
FAST = settings(max_examples=4, deadline=None, derandomize=True, database=None)


def events(triples: Sequence[tuple[float, float, int]]) -> list[PrivacyEvent]:
    return [PrivacyEvent(s, q, n) for s, q, n in triples]


def prv_reference(triples: Sequence[tuple[float, float, int]], delta: float = DELTA) -> float:
    """Opacus' PRV accountant, driven the way a training loop drives it: one step at a time."""
    accountant = PRVAccountant()
    for sigma, q, steps in triples:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


def pld_reference(triples: Sequence[tuple[float, float, int]], delta: float = DELTA) -> float:
    """Google dp-accounting's privacy-loss-distribution accountant (a different implementation)."""
    accountant = PLDAccountant()
    for sigma, q, steps in triples:
        step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(step, steps))
    return float(accountant.get_epsilon(delta))


# --- compute_epsilon ----------------------------------------------------------------------


def test_epsilon_of_one_phase_equals_opacus_prv_stepped_per_step() -> None:
    triple = (1.1, 0.08, 50)

    epsilon = compute_epsilon(events([triple]), delta=DELTA)

    assert epsilon == pytest.approx(prv_reference([triple]), rel=0.02)
    assert epsilon > 0


def test_epsilon_of_a_mixed_history_equals_independent_prv_and_pld() -> None:
    history = events(MIXED)

    epsilon = compute_epsilon(history, delta=DELTA)

    assert epsilon == pytest.approx(prv_reference(MIXED), rel=0.02)
    pld = pld_reference(MIXED)
    assert epsilon == pytest.approx(pld, rel=0.02)
    assert epsilon >= 0.98 * pld  # PRV is an upper bound: never optimistic beyond tolerance


def test_prv_epsilon_agrees_with_pld_on_a_homogeneous_run() -> None:
    triple = (0.9, 0.02, 150)

    epsilon = compute_epsilon(events([triple]), delta=DELTA)

    pld = pld_reference([triple])
    assert epsilon == pytest.approx(pld, rel=0.02)
    assert epsilon >= 0.98 * pld


def test_epsilon_composes_across_rounds_and_is_never_reset() -> None:
    one_round = (1.0, 0.1, 20)

    after_one = compute_epsilon(events([one_round]), delta=DELTA)
    after_three = compute_epsilon(events([one_round] * 3), delta=DELTA)

    assert after_three == pytest.approx(prv_reference([(1.0, 0.1, 60)]), rel=0.02)
    assert after_three > after_one
    # What a per-round reset would report (the epsilon of one round alone) is far lower.
    assert after_one * 1.3 < after_three


def test_rdp_is_a_looser_bound_than_prv_on_the_same_history() -> None:
    history = events(MIXED)

    prv = compute_epsilon(history, delta=DELTA, accountant="prv")
    rdp = compute_epsilon(history, delta=DELTA, accountant="rdp")

    assert rdp >= prv
    assert rdp == pytest.approx(prv, rel=0.5)  # same mechanism: the same order of magnitude


@pytest.mark.parametrize("history", [[], [PrivacyEvent(1.0, 0.1, 0)]], ids=["empty", "no-steps"])
@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_a_history_without_steps_has_spent_nothing(
    history: list[PrivacyEvent], accountant: str
) -> None:
    assert compute_epsilon(history, delta=DELTA, accountant=accountant) == 0.0


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0])
def test_compute_epsilon_rejects_delta_outside_0_1(delta: float) -> None:
    with pytest.raises(ConfigError, match=r"target_delta must be in \(0, 1\)"):
        compute_epsilon(events([(1.0, 0.1, 10)]), delta=delta)


def test_unknown_accountant_is_a_config_error_listing_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown accountant 'gdp'; choose one of: prv, rdp"):
        compute_epsilon(events([(1.0, 0.1, 10)]), delta=DELTA, accountant="gdp")
    assert check_accountant("rdp") == "rdp"


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "message"),
    [
        (0.0, 0.1, 1, "noise_multiplier must be > 0, got 0.0"),
        (1.0, 0.0, 1, r"sample_rate must be in \(0, 1\], got 0.0"),
        (1.0, 1.5, 1, r"sample_rate must be in \(0, 1\], got 1.5"),
        (1.0, 0.1, -1, "steps must be >= 0, got -1"),
    ],
)
def test_privacy_event_rejects_out_of_range_values(
    sigma: float, q: float, steps: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        PrivacyEvent(sigma, q, steps)


@FAST
@given(
    sigma=st.floats(0.7, 3.0),
    q=st.floats(0.01, 0.4),
    steps=st.integers(1, 80),
    more=st.integers(1, 80),
)
def test_epsilon_never_decreases_with_more_steps(
    sigma: float, q: float, steps: int, more: int
) -> None:
    fewer = compute_epsilon(events([(sigma, q, steps)]), delta=DELTA)
    later = compute_epsilon(events([(sigma, q, steps + more)]), delta=DELTA)

    assert later >= fewer


@FAST
@given(
    sigma=st.floats(0.8, 3.0),
    q=st.floats(0.01, 0.25),
    steps=st.integers(1, 20),
    rounds=st.integers(1, 3),
)
def test_epsilon_grows_with_every_round(sigma: float, q: float, steps: int, rounds: int) -> None:
    phase = (sigma, q, steps)

    before = compute_epsilon(events([phase] * rounds), delta=DELTA)
    after = compute_epsilon(events([phase] * (rounds + 1)), delta=DELTA)

    assert after > before


# --- calibrate_noise_multiplier ---------------------------------------------------------


@pytest.mark.parametrize(("accountant", "target"), [("prv", 1.0), ("rdp", 3.0)])
def test_calibrated_sigma_spends_just_under_the_target(accountant: str, target: float) -> None:
    q, steps = 0.05, 100

    sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, accountant=accountant
    )

    spent = compute_epsilon(events([(sigma, q, steps)]), delta=DELTA, accountant=accountant)
    assert 0.95 * target <= spent <= target


def test_calibrated_sigma_spread_over_rounds_stays_within_the_target() -> None:
    q, rounds, steps_per_round = 0.1, 3, 10
    sigma = calibrate_noise_multiplier(
        target_epsilon=1.0, delta=DELTA, sample_rate=q, steps=rounds * steps_per_round
    )

    spent = compute_epsilon(events([(sigma, q, steps_per_round)] * rounds), delta=DELTA)

    assert 0.95 <= spent <= 1.0 * 1.01  # PRV's numerical slack on a split history


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Opacus' log(1 - q) at q = 1
def test_unreachable_target_raises_privacy_budget_exceeded_with_a_hint() -> None:
    with pytest.raises(PrivacyBudgetExceeded, match=r"cannot reach target_epsilon=0\.0001") as info:
        calibrate_noise_multiplier(target_epsilon=1e-4, delta=DELTA, sample_rate=1.0, steps=1000)

    assert "fewer rounds" in info.value.hint


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_epsilon": 0}, "target_epsilon must be > 0, got 0"),
        ({"target_epsilon": -1.0}, "target_epsilon must be > 0, got -1.0"),
        ({"steps": 0}, "planned steps must be > 0, got 0"),
        ({"accountant": "gdp"}, "unknown accountant 'gdp'"),
    ],
)
def test_calibration_rejects_invalid_settings_as_config_errors(
    kwargs: dict[str, object], message: str
) -> None:
    settings_: dict[str, object] = {
        "target_epsilon": 1.0,
        "delta": DELTA,
        "sample_rate": 0.1,
        "steps": 10,
    }
    settings_.update(kwargs)

    with pytest.raises(ConfigError, match=message):
        calibrate_noise_multiplier(**settings_)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")
@pytest.mark.parametrize(
    "kwargs",
    [{"delta": 0.0}, {"delta": 1.5}, {"sample_rate": 1.5}],
    ids=["delta-0", "delta-1.5", "q-1.5"],
)
def test_calibration_rejects_invalid_delta_and_sample_rate(kwargs: dict[str, float]) -> None:
    settings_: dict[str, float] = {
        "target_epsilon": 1.0,
        "delta": DELTA,
        "sample_rate": 0.1,
        "steps": 10,
    }
    settings_.update(kwargs)

    with pytest.raises(ConfigError):
        calibrate_noise_multiplier(**settings_)  # type: ignore[arg-type]


def test_tiny_noise_reports_the_rdp_upper_bound_instead_of_exhausting_prv() -> None:
    # sigma = 0.01 sends Opacus' PRV domain computation into minutes and gigabytes
    history = [PrivacyEvent(noise_multiplier=0.01, sample_rate=0.1, steps=50)]

    epsilon = compute_epsilon(history, delta=DELTA, accountant="prv")
    rdp = compute_epsilon(history, delta=DELTA, accountant="rdp")

    assert epsilon == rdp > MAX_MEANINGFUL_EPSILON  # an upper bound: never an under-estimate


def test_calibration_refuses_targets_without_meaningful_protection() -> None:
    with pytest.raises(ConfigError, match="target_epsilon must be <= 50"):
        calibrate_noise_multiplier(target_epsilon=1000, delta=DELTA, sample_rate=0.1, steps=50)


def test_a_long_history_of_identical_rounds_equals_its_merged_form() -> None:
    # 60 rounds at the same (sigma, q): the same mechanism as one phase of 60x the steps
    rounds = [PrivacyEvent(noise_multiplier=1.1, sample_rate=0.05, steps=20)] * 60
    merged = [PrivacyEvent(noise_multiplier=1.1, sample_rate=0.05, steps=1200)]

    assert compute_epsilon(rounds, delta=DELTA) == pytest.approx(
        compute_epsilon(merged, delta=DELTA), rel=1e-9
    )


# --- calibrate_after_history ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("accountant", "prior", "target"),
    [("prv", ((2.0, 0.05, 50),), 1.2), ("rdp", ((1.5, 0.1, 40),), 3.0)],
    ids=["prv", "rdp"],
)
def test_sigma_after_a_history_is_the_smallest_that_keeps_the_whole_history_in_target(
    accountant: str, prior: tuple[tuple[float, float, int], ...], target: float
) -> None:
    q, steps, rel_tolerance = 0.1, 30, 0.01

    sigma = calibrate_after_history(
        target_epsilon=target,
        delta=DELTA,
        sample_rate=q,
        steps=steps,
        prior=events(prior),
        accountant=accountant,
        rel_tolerance=rel_tolerance,
    )

    def total(noise: float) -> float:
        return compute_epsilon(
            events([*prior, (noise, q, steps)]), delta=DELTA, accountant=accountant
        )

    assert total(sigma) <= target
    assert total(sigma * (1 - 2 * rel_tolerance)) > target  # no needless noise
    # The history costs: more noise than a fresh run with the same target needs.
    fresh = calibrate_noise_multiplier(
        target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, accountant=accountant
    )
    assert sigma > fresh


@pytest.mark.parametrize(
    ("accountant", "prior"),
    [("prv", []), ("rdp", [PrivacyEvent(1.0, 0.1, 0)])],
    ids=["empty", "no-steps"],
)
def test_sigma_after_an_empty_history_is_opacus_own_calibration(
    accountant: str, prior: list[PrivacyEvent]
) -> None:
    sigma = calibrate_after_history(
        target_epsilon=1.0,
        delta=DELTA,
        sample_rate=0.1,
        steps=30,
        prior=prior,
        accountant=accountant,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opacus = get_noise_multiplier(
            target_epsilon=1.0,
            target_delta=DELTA,
            sample_rate=0.1,
            steps=30,
            accountant=accountant,
            epsilon_tolerance=0.005,
        )
    assert sigma == pytest.approx(opacus, rel=1e-9)


@pytest.mark.parametrize(
    "history",
    [((4.96, 0.5, 2),), ((4.96, 0.5, 6), (1.1, 0.01, 100)), MIXED, ((0.8, 0.2, 30), (1.5, 1.0, 3))],
    ids=["large-sigma", "two-phases", "mixed", "weak-and-q=1"],
)
@pytest.mark.parametrize(
    ("memo", "opacus"),
    [(MemoPRVAccountant, PRVAccountant), (MemoRDPAccountant, RDPAccountant)],
    ids=["prv", "rdp"],
)
def test_memoised_accountants_give_opacus_own_epsilon_bit_for_bit(
    memo: type[PRVAccountant | RDPAccountant],
    opacus: type[PRVAccountant | RDPAccountant],
    history: tuple[tuple[float, float, int], ...],
) -> None:
    # Prepare: Opacus' own accountant, and the memoised one asked twice (the second time
    # from the memo: it must not drift)
    reference, memoised = opacus(), memo()
    reference.history, memoised.history = list(history), list(history)

    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = reference.get_epsilon(delta=DELTA)
        first, again = memoised.get_epsilon(delta=DELTA), memoised.get_epsilon(delta=DELTA)

    # Assert: identical floats, not merely close
    assert first == expected
    assert again == expected


def test_repeated_calibration_is_memoised_and_equals_the_first() -> None:
    kwargs = {"target_epsilon": 1.0, "delta": DELTA, "sample_rate": 0.5, "steps": 6}

    first = calibrate_noise_multiplier(**kwargs)
    again = calibrate_noise_multiplier(**kwargs)

    assert again == first
    assert compute_epsilon(events([(first, 0.5, 6)]), delta=DELTA) <= 1.0


def test_a_history_already_past_the_target_cannot_be_calibrated_for() -> None:
    prior = events([(1.5, 0.1, 40)])  # rdp: ~2.6
    spent = compute_epsilon(prior, delta=DELTA, accountant="rdp")

    with pytest.raises(PrivacyBudgetExceeded, match=f"{spent:.4g} is already spent") as info:
        calibrate_after_history(
            target_epsilon=2.0,
            delta=DELTA,
            sample_rate=0.1,
            steps=10,
            prior=prior,
            accountant="rdp",
        )

    assert info.value.hint == "The remaining budget is too small for this run."


def test_a_target_that_only_more_noise_than_allowed_could_reach_is_refused() -> None:
    prior = events([(1.5, 0.1, 40)])
    spent = compute_epsilon(prior, delta=DELTA, accountant="rdp")

    with pytest.raises(PrivacyBudgetExceeded, match="even noise_multiplier=2 would pass"):
        calibrate_after_history(
            target_epsilon=spent + 0.01,
            delta=DELTA,
            sample_rate=0.1,
            steps=30,
            prior=prior,
            accountant="rdp",
            max_noise_multiplier=2.0,
        )


# --- a ledger's spent epsilon against an independent accountant -----------------------------


def test_a_heterogeneous_ledger_history_spends_what_google_pld_computes(tmp_path: Path) -> None:
    # Prepare: two runs on one dataset, with changing sigma, q and steps (one plan repeated)
    dataset = dataset_fingerprint(np.arange(8.0).reshape(4, 2), np.array([0, 1, 0, 1]))
    history = [
        ("run-1", *MIXED[0]),
        ("run-1", *MIXED[1]),
        ("run-2", *MIXED[2]),
        ("run-2", *MIXED[0]),
    ]
    with PrivacyLedger(tmp_path / "ledger.sqlite") as ledger:
        for i, (run_id, sigma, q, steps) in enumerate(history, start=1):
            ledger.record(LedgerEntry(dataset, run_id, i, sigma, q, steps, DELTA, "prv"))

        # Execute
        spent = ledger.spent(dataset, delta=DELTA)

    # Assert
    pld = pld_reference([(sigma, q, steps) for _, sigma, q, steps in history])
    assert spent == pytest.approx(pld, rel=0.02)
    assert spent >= 0.98 * pld  # never optimistic beyond tolerance
