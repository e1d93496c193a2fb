"""Sample-level privacy accounting for DP-SGD, composed over a site's whole training history.

A site's history is the list of every DP-SGD phase it ran, each with its own
``noise_multiplier`` (sigma), Poisson ``sample_rate`` (q) and number of ``steps``. The
spent epsilon is the composition of that whole history for a fixed ``delta`` — it is
never reset between rounds (Flower's Opacus example creates a fresh PrivacyEngine
each round, which under-reports epsilon by a factor that grows with the rounds).

Accountants are Opacus' own:
- ``prv``: Gopi, Lee & Wutschitz, "Numerical Composition of Differential Privacy",
  NeurIPS 2021 (privacy random variables; tight, the default);
- ``rdp``: Mironov, "Rényi Differential Privacy", CSF 2017, with the subsampled Gaussian
  analysis of Mironov, Talwar & Zhang 2019 (looser upper bound).

Both run with one change that leaves every result bit for bit as Opacus computes it: the
RDP of one subsampled-Gaussian step (Opacus' pure-Python series, up to a second per
(σ, q) at large σ; PRV computes it twice per ε to size its domain) is memoised per (q, σ),
since RDP composes linearly in the steps. Calibrations are memoised too: simulated sites
with the same (target, δ, q, steps) share one result per process.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import Domain
from opacus.accountants.registry import register_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedvault.common.config import MAX_MEANINGFUL_EPSILON
from fedvault.common.errors import ConfigError, PrivacyBudgetExceeded
from fedvault.common.registry import ACCOUNTANTS as ACCOUNTANT_REGISTRY

logger = logging.getLogger(__name__)

#: The smallest noise multiplier calibration returns: below it DP-SGD adds almost nothing.
MIN_NOISE_MULTIPLIER = 0.05
#: Accountants fedvault accepts (common/registry.py); names as in Opacus' accountant registry.
ACCOUNTANTS: tuple[str, ...] = ACCOUNTANT_REGISTRY.names


@dataclass(frozen=True)
class PrivacyEvent:
    """One DP-SGD phase: ``steps`` noisy steps at ``noise_multiplier`` and ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ConfigError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")


def check_accountant(name: str) -> str:
    """Return ``name`` if it is a known accountant, else raise ConfigError listing them."""
    return ACCOUNTANT_REGISTRY.check(name)


@functools.lru_cache(maxsize=4096)
def _rdp_of_one_step(sample_rate: float, noise_multiplier: float) -> npt.NDArray[np.float64]:
    """RDP of one Poisson-subsampled Gaussian step at Opacus' default orders (read-only).

    Mironov, Talwar & Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism",
    2019, as Opacus computes it; n steps have n times this RDP (Mironov 2017, Prop. 1),
    which is exactly how Opacus' ``compute_rdp`` scales it.
    """
    rdp = np.asarray(
        rdp_analysis.compute_rdp(
            q=sample_rate,
            noise_multiplier=noise_multiplier,
            steps=1,
            orders=RDPAccountant.DEFAULT_ALPHAS,
        ),
        dtype=np.float64,
    )
    rdp.flags.writeable = False
    return rdp


class MemoRDPAccountant(RDPAccountant):
    """Opacus' RDPAccountant with the per-step RDP memoised; the same ε bit for bit."""

    def get_privacy_spent(
        self, *, delta: float, alphas: list[float | int] | None = None
    ) -> tuple[float, float]:
        if alphas is not None and list(alphas) != self.DEFAULT_ALPHAS:
            return super().get_privacy_spent(delta=delta, alphas=alphas)
        if not self.history:
            return 0, 0
        rdp = sum(  # the same sum, in the same order, as Opacus
            [_rdp_of_one_step(q, sigma) * steps for (sigma, q, steps) in self.history]
        )
        eps, best_alpha = rdp_analysis.get_privacy_spent(
            orders=self.DEFAULT_ALPHAS, rdp=rdp, delta=delta
        )
        return float(eps), float(best_alpha)


class MemoPRVAccountant(PRVAccountant):
    """Opacus' PRVAccountant whose domain sizing uses the memoised RDP; the same ε bit for bit.

    ``_get_domain`` and its safe domain size are Opacus 1.6's (``prv.py`` and
    ``analysis/prv/domain.py``; Gopi et al. 2021, remark 5.6) with ``MemoRDPAccountant`` in
    place of ``RDPAccountant``; tests check the result equals Opacus' own.
    """

    def _get_domain(
        self,
        prvs: list[Any],
        num_self_compositions: list[int],
        eps_error: float,
        delta_error: float,
    ) -> Domain:
        total = sum(num_self_compositions)
        rdp = MemoRDPAccountant()
        rdp.history = [
            (prv.noise_multiplier, prv.sample_rate, n)
            for prv, n in zip(prvs, num_self_compositions, strict=True)
        ]
        size = rdp.get_epsilon(delta_error / 4)
        for prv in prvs:
            rdp = MemoRDPAccountant()
            rdp.history = [(prv.noise_multiplier, prv.sample_rate, 1)]
            size = max(size, rdp.get_epsilon(delta=delta_error / (8 * total)))
        size = max(size, eps_error) + 3
        mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
        return Domain.create_aligned(-size, size, mesh_size)


#: fedvault's accountant names -> the (memoised) Opacus accountant classes behind them, and
#: the names they are registered under in Opacus' registry (for ``get_noise_multiplier``).
_MEMO_ACCOUNTANTS: dict[str, type[IAccountant]] = ACCOUNTANT_REGISTRY.bind(
    {"prv": MemoPRVAccountant, "rdp": MemoRDPAccountant}
)
_REGISTERED = {name: f"fedvault-memo-{name}" for name in _MEMO_ACCOUNTANTS}
for _name, _cls in _MEMO_ACCOUNTANTS.items():
    register_accountant(_REGISTERED[_name], _cls, force=True)


Phases = tuple[tuple[float, float, int], ...]


def _accountant_phases(history: Iterable[PrivacyEvent]) -> Phases:
    """``history`` as Opacus accountant entries (sigma, q, steps): phases of zero steps left
    out, equal (sigma, q) merged (unlike ledger.py's ``_events_merged_by_plan``, which keeps
    PrivacyEvents, zero-step ones included).

    Opacus accountants compose heterogeneous (sigma, q, steps) triples. Phases with the same
    (sigma, q) are merged first: composing n steps at once is the same mechanism as n
    separate steps, and PRV's cost grows with the number of entries (a 60-round history:
    about 39 s unmerged, about 1 s merged). Order: first appearance, as before.
    """
    steps: dict[tuple[float, float], int] = {}
    for event in history:
        if event.steps > 0:
            key = (event.noise_multiplier, event.sample_rate)
            steps[key] = steps.get(key, 0) + event.steps
    return tuple((sigma, q, n) for (sigma, q), n in steps.items())


def _accountant_for(phases: Phases, accountant: str) -> IAccountant:
    acc = _MEMO_ACCOUNTANTS[check_accountant(accountant)]()
    acc.history = list(phases)
    return acc


@functools.lru_cache(maxsize=1024)
def _epsilon_of(phases: Phases, delta: float, accountant: str) -> tuple[float, bool]:
    """(epsilon, whether it is PRV's RDP fallback) of merged ``phases``: a pure function.

    Memoised: simulated sites sharing a process and a history (same sigma, q, steps) and
    a site asked twice for the same history compute it once.
    """
    with warnings.catch_warnings():
        # PRV sizes its domain with an RDP bound whose alpha-range notice is irrelevant here.
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        if accountant == "prv":
            rdp_bound = float(_accountant_for(phases, "rdp").get_epsilon(delta=delta))
            if rdp_bound > MAX_MEANINGFUL_EPSILON:
                return rdp_bound, True
        return float(_accountant_for(phases, accountant).get_epsilon(delta=delta)), False


def compute_epsilon(
    history: Sequence[PrivacyEvent],
    *,
    delta: float,
    accountant: str = ACCOUNTANT_REGISTRY.default,
    warn_weak: bool = True,
) -> float:
    """Epsilon spent at ``delta`` by the composition of every event in ``history``.

    An empty history (or one with zero steps) has spent nothing: 0.0. With ``prv``, an
    epsilon whose RDP upper bound exceeds MAX_MEANINGFUL_EPSILON is reported as that bound
    (never an under-estimate), with a warning unless ``warn_weak`` is false.
    """
    if not 0 < delta < 1:
        raise ConfigError(f"target_delta must be in (0, 1), got {delta}")
    phases = _accountant_phases(history)
    check_accountant(accountant)
    if not phases:
        return 0.0
    epsilon, is_rdp_bound = _epsilon_of(phases, delta, accountant)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        # PRV's numerical estimate at an absurd delta (0.99) can come out negative: never a value.
        raise ConfigError(
            f"the {accountant} accountant gave epsilon {epsilon!r} at delta {delta:g}: "
            "that is not a privacy guarantee",
            hint="Use a small delta (below 1 / the site's training rows; 1e-5 by default).",
        )
    if is_rdp_bound:
        logger.log(
            logging.WARNING if warn_weak else logging.DEBUG,
            "epsilon is above %g (RDP bound %.4g): reporting the RDP upper bound, "
            "PRV is not computed for such weak privacy",
            MAX_MEANINGFUL_EPSILON,
            epsilon,
        )
    return epsilon


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = ACCOUNTANT_REGISTRY.default,
) -> float:
    """Smallest noise multiplier whose ``steps`` steps at ``sample_rate`` stay within the target.

    Calibrated once for the whole planned run (rounds × local epochs × steps per epoch),
    so the final composed epsilon is at most ``target_epsilon``.
    """
    if not target_epsilon > 0:
        raise ConfigError(f"target_epsilon must be > 0, got {target_epsilon}")
    if target_epsilon > MAX_MEANINGFUL_EPSILON:
        raise ConfigError(
            f"target_epsilon must be <= {MAX_MEANINGFUL_EPSILON:g}, got {target_epsilon:g}",
            hint="Above that DP protects nothing; use --no-dp for a non-private baseline.",
        )
    if not 0 < delta < 1:
        raise ConfigError(f"target_delta must be in (0, 1), got {delta}")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps <= 0:
        raise ConfigError(f"planned steps must be > 0, got {steps}")
    try:
        sigma = _opacus_calibration(
            target_epsilon, delta, sample_rate, steps, check_accountant(accountant)
        )
    except ValueError as err:  # Opacus raises ValueError when the target is unreachable
        raise PrivacyBudgetExceeded(
            f"cannot reach target_epsilon={target_epsilon} at delta={delta} with "
            f"{steps} steps at sample_rate={sample_rate:.4g}: {err}",
            hint="Raise the target epsilon, or train fewer rounds/epochs.",
        ) from err
    logger.info(
        "calibrated noise_multiplier=%.4f for target_epsilon=%s, delta=%s, q=%.4g, steps=%d (%s)",
        sigma,
        target_epsilon,
        delta,
        sample_rate,
        steps,
        accountant,
    )
    return float(sigma)


@functools.lru_cache(maxsize=256)
def _opacus_calibration(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Opacus' ``get_noise_multiplier`` (its own bisection) on the memoised accountant.

    A pure function of its arguments, so memoised: simulated sites sharing a process and a
    (target, δ, q, steps) calibrate once. Raises ValueError when the target is unreachable.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=_REGISTERED[accountant],
                epsilon_tolerance=0.005,
            )
        )


def calibrate_after_history(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: Sequence[PrivacyEvent],
    accountant: str = ACCOUNTANT_REGISTRY.default,
    max_noise_multiplier: float = 1e3,
    rel_tolerance: float = 0.01,
) -> float:
    """Smallest sigma (to ``rel_tolerance``) whose ``steps`` added to ``prior`` stay within target.

    Opacus' ``get_noise_multiplier`` calibrates a fresh history only; a site that already
    spent part of its budget needs the whole history composed. This bisects sigma on a log
    scale with ``compute_epsilon`` (the same accountant that reports), always returning a
    sigma whose composed epsilon is at most ``target_epsilon``. With an empty ``prior`` it
    is Opacus' own calibration. Raises PrivacyBudgetExceeded when even
    ``max_noise_multiplier`` would take the history past the target.
    """
    if not prior or not any(e.steps for e in prior):
        sigma = calibrate_noise_multiplier(
            target_epsilon=target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
        if sigma > max_noise_multiplier:
            raise PrivacyBudgetExceeded(
                f"{steps} steps at sample_rate={sample_rate:.4g} fit in "
                f"target_epsilon={target_epsilon:g} only with noise_multiplier {sigma:.4g}, "
                f"above the allowed {max_noise_multiplier:g}",
                hint="The remaining budget is too small for this run.",
            )
        return sigma
    if not target_epsilon > 0:
        raise ConfigError(f"target_epsilon must be > 0, got {target_epsilon}")
    if steps <= 0:
        raise ConfigError(f"planned steps must be > 0, got {steps}")

    def epsilon_at(sigma: float) -> float:
        return compute_epsilon(
            [*prior, PrivacyEvent(sigma, sample_rate, steps)],
            delta=delta,
            accountant=accountant,
            warn_weak=False,
        )

    spent = compute_epsilon(prior, delta=delta, accountant=accountant)
    if spent >= target_epsilon or epsilon_at(max_noise_multiplier) > target_epsilon:
        raise PrivacyBudgetExceeded(
            f"{steps} more steps at sample_rate={sample_rate:.4g} cannot fit in "
            f"target_epsilon={target_epsilon:g}: {spent:.4g} is already spent, and even "
            f"noise_multiplier={max_noise_multiplier:g} would pass the target",
            hint="The remaining budget is too small for this run.",
        )
    # Bracket [low, high] with epsilon_at(high) <= target < epsilon_at(low), then bisect.
    low, high = MIN_NOISE_MULTIPLIER, 1.0
    if epsilon_at(high) <= target_epsilon:
        if epsilon_at(low) <= target_epsilon:
            return low
    else:
        while epsilon_at(high) > target_epsilon:
            low, high = high, min(2 * high, max_noise_multiplier)
    while (high - low) / high > rel_tolerance:
        mid = math.sqrt(low * high)
        if epsilon_at(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    logger.info(
        "calibrated noise_multiplier=%.4f for %d more steps after %.4f spent (target %g, %s)",
        high,
        steps,
        spent,
        target_epsilon,
        accountant,
    )
    return high
