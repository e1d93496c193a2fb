"""Tests for common/site_privacy.py: a site's own gate, planning sigma and reserving each round.

Ledgers are real files; every epsilon is checked against compute_epsilon on the events the
ledger holds, and every planned sigma against Opacus' own calibration.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opacus.accountants.utils import get_noise_multiplier

from fedvault.common.errors import ConfigError, PrivacyBudgetExceeded
from fedvault.common.fingerprint import dataset_fingerprint
from fedvault.common.ledger import LedgerEntry, PrivacyLedger
from fedvault.common.privacy import PrivacyEvent, compute_epsilon
from fedvault.common.site_privacy import (
    MAX_NOISE_INFLATION,
    RoundPlan,
    SimulatedSitePolicy,
    SitePrivacy,
    parse_site_max_epsilon,
)

pytestmark = pytest.mark.unit

DELTA = 1e-5
SITES = ("site-1", "site-2", "hospital-b")
DATASET = dataset_fingerprint(np.arange(12.0).reshape(6, 2), np.array([0, 1] * 3))
#: Hypothesis with rdp (~0.1 s an epsilon, a calibration ~1 s): few fixed examples.
FAST = settings(max_examples=2, deadline=None, derandomize=True, database=None)
#: Relative band around max_epsilon within which either outcome of a reserve is accepted.
EDGE = 1e-9

Triple = tuple[float, float, int]


def gate(
    folder: Path,
    *,
    run_id: str = "run-b",
    max_epsilon: float | None = None,
    accountant: str = "rdp",
) -> SitePrivacy:
    return SitePrivacy(
        site="site-1",
        ledger_path=folder / "site-1.sqlite",
        dataset=DATASET,
        run_id=run_id,
        max_epsilon=max_epsilon,
        delta=DELTA,
        accountant=accountant,
    )


def record(site: SitePrivacy, history: Sequence[Triple], *, run_id: str = "run-a") -> None:
    """Earlier rounds of the dataset, as another run (by default) left them in the ledger."""
    with PrivacyLedger(site.ledger_path) as ledger:
        for i, (sigma, q, steps) in enumerate(history, start=1):
            entry = LedgerEntry(DATASET, run_id, i, sigma, q, steps, DELTA, site.accountant)
            ledger.record(entry)


def entries(site: SitePrivacy) -> list[LedgerEntry]:
    with PrivacyLedger(site.ledger_path) as ledger:
        return ledger.entries()


def epsilon(history: Sequence[Triple], accountant: str = "rdp") -> float:
    return compute_epsilon(
        [PrivacyEvent(*t) for t in history], delta=DELTA, accountant=accountant, warn_weak=False
    )


def opacus_sigma(target: float, q: float, steps: int, accountant: str) -> float:
    """Opacus' own calibration for a fresh history, at the tolerance fedvault asks of it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(
                target_epsilon=target,
                target_delta=DELTA,
                sample_rate=q,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.005,
            )
        )


def reserve(
    site: SitePrivacy, triple: Triple, *, server_round: int = 1, target: float | None = None
) -> float | None:
    """The reserved epsilon, or None when the gate refused."""
    sigma, q, steps = triple
    plan = RoundPlan(noise_multiplier=sigma, sample_rate=q, steps=steps)
    try:
        return site.reserve(plan, server_round=server_round, target_epsilon=target).epsilon
    except PrivacyBudgetExceeded:
        return None


triples = st.tuples(st.floats(0.5, 5.0), st.floats(0.01, 0.5), st.integers(1, 200))


# --- parse_site_max_epsilon ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["3"], {"*": 3.0}),
        (["2.5", "hospital-b=1.5"], {"*": 2.5, "hospital-b": 1.5}),
        ([" site-1=0.75 "], {"site-1": 0.75}),
        ([], {}),
    ],
)
def test_site_max_epsilon_takes_e_for_every_site_or_site_equals_e(
    values: list[str], expected: dict[str, float]
) -> None:
    assert parse_site_max_epsilon(values, SITES) == expected


def test_a_site_max_epsilon_for_a_site_not_in_the_simulation_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="names site 'hospital-z', which is not in") as info:
        parse_site_max_epsilon(["hospital-z=1"], SITES)

    assert info.value.hint == "Sites: site-1, site-2, hospital-b"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "--site-max-epsilon must be > 0, got '0' in '0'"),
        ("-1", "--site-max-epsilon must be > 0, got '-1' in '-1'"),
        ("site-1=0", "--site-max-epsilon must be > 0, got '0' in 'site-1=0'"),
        ("inf", "--site-max-epsilon must be > 0, got 'inf' in 'inf'"),
        ("nan", "--site-max-epsilon must be > 0, got 'nan' in 'nan'"),
        ("lots", "--site-max-epsilon must be > 0, got 'lots' in 'lots'"),
        ("site-1=x", "--site-max-epsilon must be > 0, got 'x' in 'site-1=x'"),
        ("site-1=", "takes E or SITE=E, got 'site-1='"),
        ("a=b=c", "takes E or SITE=E, got 'a=b=c'"),
        ("1 2", "takes E or SITE=E, got '1 2'"),
        ("", "takes E or SITE=E, got ''"),
    ],
)
def test_a_non_positive_or_garbled_site_max_epsilon_is_a_config_error_naming_it(
    text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_site_max_epsilon([text], SITES)

    assert message in str(info.value)


# --- SimulatedSitePolicy -------------------------------------------------------------------


def test_simulated_site_policy_round_trips_through_the_run_config() -> None:
    policy = SimulatedSitePolicy(
        ledger_dir="/runs/x/ledgers", max_epsilon={"*": 3.0, "site-2": 1.5}
    )

    run_config = policy.run_config()

    assert all(isinstance(value, str) for value in run_config.values())  # Flower config values
    assert set(run_config) == {"simulated-ledger-dir", "simulated-site-max-epsilon"}
    assert SimulatedSitePolicy.from_run_config(run_config) == policy
    assert SimulatedSitePolicy.from_run_config(SimulatedSitePolicy().run_config()) == (
        SimulatedSitePolicy()
    )


def test_an_empty_or_absent_policy_in_the_run_config_means_the_defaults() -> None:
    empty = {"simulated-ledger-dir": "", "simulated-site-max-epsilon": ""}  # pyproject defaults

    assert SimulatedSitePolicy.from_run_config(empty) == SimulatedSitePolicy()
    assert SimulatedSitePolicy.from_run_config({}) == SimulatedSitePolicy()


@pytest.mark.parametrize("text", ["{bad json", "[1, 2]", '{"*": "lots"}', '"3"'])
def test_a_malformed_simulated_max_epsilon_is_a_config_error_quoting_it(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        SimulatedSitePolicy.from_run_config({"simulated-site-max-epsilon": text})

    assert repr(text) in str(info.value)


def test_a_site_cap_overrides_the_star_cap_and_no_cap_is_none() -> None:
    both = SimulatedSitePolicy(max_epsilon={"*": 3.0, "site-2": 1.5})
    only_site_2 = SimulatedSitePolicy(max_epsilon={"site-2": 1.5})

    assert both.max_epsilon_for("site-2") == 1.5
    assert both.max_epsilon_for("site-1") == 3.0
    assert only_site_2.max_epsilon_for("site-1") is None
    assert SimulatedSitePolicy().max_epsilon_for("site-1") is None


def test_each_simulated_site_has_its_own_ledger_file_and_none_without_a_folder() -> None:
    policy = SimulatedSitePolicy(ledger_dir="/runs/x/ledgers")

    assert policy.ledger_path("site-1") == Path("/runs/x/ledgers/site-1.sqlite")
    assert policy.ledger_path("site-2") != policy.ledger_path("site-1")
    with pytest.raises(ConfigError, match="this simulated site has no ledger folder"):
        SimulatedSitePolicy().ledger_path("site-1")


# --- plan_noise_multiplier -----------------------------------------------------------------


def test_plan_on_an_empty_ledger_is_opacus_calibration_for_the_run_target(tmp_path: Path) -> None:
    site = gate(tmp_path, accountant="prv")

    sigma = site.plan_noise_multiplier(target_epsilon=1.0, sample_rate=0.1, steps_left=30)

    assert sigma == pytest.approx(opacus_sigma(1.0, 0.1, 30, "prv"), rel=1e-9)
    assert entries(site) == []  # planning records nothing


def test_without_a_site_max_other_runs_do_not_change_the_plan(tmp_path: Path) -> None:
    site = gate(tmp_path)
    record(site, [(1.0, 0.2, 100)])  # another run spent a lot

    sigma = site.plan_noise_multiplier(target_epsilon=1.0, sample_rate=0.1, steps_left=30)

    assert sigma == pytest.approx(opacus_sigma(1.0, 0.1, 30, "rdp"), rel=1e-9)


def test_a_replan_mid_run_counts_the_runs_own_rounds_against_its_target(tmp_path: Path) -> None:
    # Prepare: this run already trained one round (say, before its SuperNode restarted)
    site = gate(tmp_path, run_id="run-b")
    record(site, [(2.0, 0.1, 10)], run_id="run-b")

    sigma = site.plan_noise_multiplier(target_epsilon=1.0, sample_rate=0.1, steps_left=20)

    assert epsilon([(2.0, 0.1, 10), (sigma, 0.1, 20)]) <= 1.0
    assert sigma > opacus_sigma(1.0, 0.1, 20, "rdp")  # the round already spent counts


@FAST
@given(
    history=st.lists(
        st.tuples(st.floats(0.8, 3.0), st.floats(0.01, 0.3), st.integers(1, 60)),
        min_size=1,
        max_size=2,
    ),
    q=st.floats(0.02, 0.3),
    steps=st.integers(5, 60),
    target=st.floats(0.5, 3.0),
    remaining=st.floats(0.05, 3.0),
)
@example(history=[(2.0, 0.05, 50)], q=0.1, steps=30, target=1.0, remaining=0.3)  # raised x1.2
@example(history=[(2.0, 0.05, 50)], q=0.1, steps=30, target=1.0, remaining=0.01)  # ceiling
def test_a_planned_sigma_fits_the_site_max_within_the_inflation_cap(
    history: list[Triple], q: float, steps: int, target: float, remaining: float
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        spent = epsilon(history)
        max_epsilon = spent + remaining
        site = gate(Path(folder), max_epsilon=max_epsilon)
        record(site, history)

        sigma = site.plan_noise_multiplier(target_epsilon=target, sample_rate=q, steps_left=steps)
        reserved = reserve(site, (sigma, q, steps), target=target)

    run_only = opacus_sigma(target, q, steps, "rdp")
    total = epsilon([*history, (sigma, q, steps)])
    assert run_only * (1 - EDGE) <= sigma <= MAX_NOISE_INFLATION * run_only * (1 + EDGE)
    if sigma < MAX_NOISE_INFLATION * run_only * (1 - EDGE):
        # Not at the ceiling: the whole run fits in the max, and the ledger admits it.
        assert total <= max_epsilon * (1 + EDGE)
        assert reserved == pytest.approx(total, rel=1e-9)
        if sigma > run_only * (1 + 0.02):  # raised for the max: raised just enough
            assert epsilon([*history, (sigma * (1 - 2 * 0.01), q, steps)]) > max_epsilon
    else:
        # At the ceiling: the ledger decides, and admits only what fits.
        assert (reserved is not None) == (total <= max_epsilon * (1 + EDGE))


def test_a_site_with_its_budget_spent_plans_the_ceiling_and_its_round_is_refused(
    tmp_path: Path,
) -> None:
    site = gate(tmp_path, max_epsilon=2.0)
    record(site, [(1.0, 0.2, 100)])  # far past 2
    before = entries(site)

    sigma = site.plan_noise_multiplier(target_epsilon=1.0, sample_rate=0.1, steps_left=30)

    assert sigma == pytest.approx(MAX_NOISE_INFLATION * opacus_sigma(1.0, 0.1, 30, "rdp"))
    with pytest.raises(PrivacyBudgetExceeded, match="privacy budget exhausted"):
        site.reserve(
            RoundPlan(noise_multiplier=sigma, sample_rate=0.1, steps=10),
            server_round=1,
            target_epsilon=1.0,
        )
    assert entries(site) == before


def test_a_site_max_below_a_fresh_run_never_inflates_sigma_past_the_cap(tmp_path: Path) -> None:
    site = gate(tmp_path, max_epsilon=0.1, accountant="prv")

    sigma = site.plan_noise_multiplier(target_epsilon=1.0, sample_rate=0.1, steps_left=10)

    assert sigma <= MAX_NOISE_INFLATION * opacus_sigma(1.0, 0.1, 10, "prv") * (1 + EDGE)


def test_a_generous_site_max_does_not_stop_a_fresh_run(tmp_path: Path) -> None:
    site = gate(tmp_path, max_epsilon=100.0)  # `fedvault client start --max-epsilon 100`

    sigma = site.plan_noise_multiplier(target_epsilon=1.0, sample_rate=0.1, steps_left=30)

    assert sigma == pytest.approx(opacus_sigma(1.0, 0.1, 30, "rdp"), rel=1e-9)


# --- reserve -------------------------------------------------------------------------------


@settings(max_examples=8, deadline=None, derandomize=True, database=None)
@given(
    history=st.lists(triples, max_size=1),
    round_=triples,
    max_epsilon=st.floats(0.5, 5.0),
)
@example(history=[(1.0, 0.1, 10)], round_=(1.2, 0.05, 20), max_epsilon=1.0)
def test_reserve_refuses_exactly_when_the_projected_epsilon_would_pass_the_max(
    history: list[Triple], round_: Triple, max_epsilon: float
) -> None:
    expected = epsilon([*history, round_])
    with tempfile.TemporaryDirectory() as folder:
        site = gate(Path(folder), max_epsilon=max_epsilon)
        record(site, history)
        before = entries(site)

        reserved = reserve(site, round_, server_round=7)

        after = entries(site)

    if abs(expected - max_epsilon) <= EDGE * max_epsilon:
        return  # on the boundary itself either answer is right
    if expected > max_epsilon:
        assert reserved is None
        assert after == before
    else:
        assert reserved == pytest.approx(expected, rel=1e-9)
        assert after[: len(before)] == before
        assert [(e.run_id, e.round) for e in after[len(before) :]] == [("run-b", 7)]
        assert (after[-1].noise_multiplier, after[-1].sample_rate, after[-1].steps) == round_


def test_reserve_admits_a_round_that_lands_exactly_on_the_max_and_refuses_one_ulp_less(
    tmp_path: Path,
) -> None:
    round_ = (1.2, 0.05, 20)
    exact = epsilon([round_])
    on_the_max = gate(tmp_path / "a", max_epsilon=exact)
    just_below = gate(tmp_path / "b", max_epsilon=math.nextafter(exact, 0.0))

    assert reserve(on_the_max, round_) == exact
    assert reserve(just_below, round_) is None
    assert len(entries(on_the_max)) == 1
    assert entries(just_below) == []


def test_a_refusal_names_the_site_and_its_max_but_never_the_fingerprint(tmp_path: Path) -> None:
    site = gate(tmp_path, max_epsilon=1.0)
    record(site, [(1.0, 0.2, 100)])
    spent = epsilon([(1.0, 0.2, 100)])

    with pytest.raises(PrivacyBudgetExceeded) as refused:
        site.reserve(
            RoundPlan(noise_multiplier=2.0, sample_rate=0.1, steps=10),
            server_round=3,
            target_epsilon=None,
        )

    assert str(refused.value) == (
        f"site site-1 refuses round 3: privacy budget exhausted (its data has spent epsilon "
        f"{spent:.3f} of its max_epsilon 1; this round would pass it)"
    )
    assert "sha256" not in str(refused.value) + refused.value.hint
    assert "fedvault client budget" in refused.value.hint


def test_reserve_refuses_a_round_past_the_runs_target_and_counts_only_this_run(
    tmp_path: Path,
) -> None:
    # Prepare: another run already spent a lot; this run's target is its own share
    site = gate(tmp_path, run_id="run-b")
    record(site, [(1.0, 0.2, 100)], run_id="run-a")
    round_ = (2.0, 0.1, 10)
    run_share = epsilon([round_])
    target = (run_share + epsilon([round_, round_])) / 2  # one round fits, two do not

    # Execute
    first = site.reserve(
        RoundPlan(noise_multiplier=2.0, sample_rate=0.1, steps=10),
        server_round=1,
        target_epsilon=target,
    )
    with pytest.raises(PrivacyBudgetExceeded, match="above the run's target_epsilon") as refused:
        site.reserve(
            RoundPlan(noise_multiplier=2.0, sample_rate=0.1, steps=10),
            server_round=2,
            target_epsilon=target,
        )

    # Assert
    assert first.run_epsilon == pytest.approx(run_share, rel=1e-9)
    assert first.epsilon == pytest.approx(epsilon([(1.0, 0.2, 100), round_]), rel=1e-9)
    assert first.max_epsilon is None
    assert "refuses round 2" in str(refused.value)
    assert [(e.run_id, e.round) for e in entries(site)] == [("run-a", 1), ("run-b", 1)]


@settings(max_examples=4, deadline=None, derandomize=True, database=None)
@given(rounds=st.lists(triples, min_size=2, max_size=4))
def test_reserved_epsilon_never_decreases_from_round_to_round(rounds: list[Triple]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        site = gate(Path(folder))
        reservations = [
            site.reserve(
                RoundPlan(noise_multiplier=s, sample_rate=q, steps=n),
                server_round=i,
                target_epsilon=None,
            )
            for i, (s, q, n) in enumerate(rounds, start=1)
        ]

    epsilons = [r.epsilon for r in reservations]
    assert all(later >= earlier for earlier, later in itertools.pairwise(epsilons))
    assert [r.run_epsilon for r in reservations] == pytest.approx(epsilons, rel=1e-9)


@settings(max_examples=3, deadline=None, derandomize=True, database=None)
@given(
    prior=st.tuples(st.floats(0.8, 3.0), st.floats(0.01, 0.3), st.integers(1, 60)),
    sigma=st.floats(0.8, 3.0),
    q=st.floats(0.01, 0.3),
    steps=st.integers(1, 100),
    more=st.integers(1, 100),
)
def test_reserved_epsilon_never_decreases_with_more_steps(
    prior: Triple, sigma: float, q: float, steps: int, more: int
) -> None:
    reserved = []
    for n in (steps, steps + more):
        with tempfile.TemporaryDirectory() as folder:
            site = gate(Path(folder), accountant="prv")
            record(site, [prior])
            reserved.append(reserve(site, (sigma, q, n)))

    fewer, later = reserved
    assert fewer is not None and later is not None
    assert later >= fewer
