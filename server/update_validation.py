"""Update validation: each train reply checked against the round's global model first."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fedvault.common.config import FedvaultConfig
from fedvault.common.errors import PrivacyBudgetExceeded, UpdateRejected
from fedvault.common.site_privacy import MAX_NOISE_INFLATION
from fedvault.common.validation import (
    check_finite,
    default_update_norm_bound,
    steps_for,
    validate_update,
)
from fedvault.server.failures import FailureBook

logger = logging.getLogger(__name__)

#: Slack on the noise multiplier a site may report under a target epsilon, over what the
#: coordinator computes: the site's own bisection after a restart is accurate to 1 %.
NOISE_MULTIPLIER_SLACK = 1.1


@functools.lru_cache(maxsize=64)
def noise_multiplier_ceiling(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The largest sigma an honest site may train with under ``target_epsilon``.

    A site calibrates sigma once for the whole run (client/app.py), at most
    ``MAX_NOISE_INFLATION`` times the calibration for the run's planned steps when its own
    lifetime budget is short (common/site_privacy.py); the coordinator repeats that
    calibration (one per distinct site size, cached) so a site cannot loosen its own update
    bound by reporting a larger sigma.
    """
    # Opacus' accountants, imported only for a target-epsilon run: the ServerApp starts (in a
    # simulation, beside the ClientApp's and Ray's start) without them.
    from fedvault.common.privacy import calibrate_noise_multiplier

    sigma = calibrate_noise_multiplier(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,
    )
    return NOISE_MULTIPLIER_SLACK * MAX_NOISE_INFLATION * sigma


def finite_number(metrics: MetricRecord | None, key: str) -> float | None:
    """The metric ``key`` as a finite float; None when it is missing, not a number or infinite."""
    value = metrics.get(key) if metrics is not None else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True, kw_only=True)
class UpdateValidation:
    """How ``ReportingStrategy`` checks each train reply before aggregation.

    ``max_update_norm > 0`` is the norm bound, DP or not. Otherwise, with DP-SGD on
    (``dp_sgd``), the bound is derived per reply by ``default_update_norm_bound``: from the
    reply's own row count n (the number FedAvg already weights it by), with q and steps
    recomputed from n and the config (never the reply's own q or steps), and sigma from the
    config when it fixes one, else the reply's sigma capped at
    ``noise_multiplier_ceiling`` (what the config's target epsilon allows a site of n rows).
    A site can therefore not loosen its bound beyond what its row count implies. Without
    DP and without ``max_update_norm`` only structure and finiteness are checked.
    """

    enabled: bool = True
    max_update_norm: float = 0.0
    dp_sgd: FedvaultConfig | None = None

    @classmethod
    def from_config(cls, cfg: FedvaultConfig) -> UpdateValidation:
        return cls(
            enabled=cfg.validation.enabled,
            max_update_norm=cfg.validation.max_update_norm,
            dp_sgd=cfg if cfg.privacy.enabled else None,
        )

    def warm_up(self, site_rows: Iterable[int]) -> None:
        """Compute the sigma ceilings for these training-row counts ahead of the replies.

        The ceiling is a calibration (seconds of Opacus' RDP arithmetic); run this in the
        background while the sites train, so round 1's validation finds it cached.
        """
        cfg = self.dp_sgd
        if self.max_update_norm > 0 or cfg is None or cfg.privacy.noise_multiplier is not None:
            return
        for n in sorted(set(site_rows)):
            q, steps = steps_for(n, cfg.training.batch_size, cfg.training.local_epochs)
            with contextlib.suppress(PrivacyBudgetExceeded):  # bound_for reports it
                noise_multiplier_ceiling(
                    target_epsilon=cfg.privacy.target_epsilon or 0.0,
                    delta=cfg.privacy.target_delta,
                    sample_rate=q,
                    steps=cfg.federation.rounds * steps,
                    accountant=cfg.privacy.accountant,
                )

    def bound_for(self, metrics: MetricRecord | None, num_params: int) -> float | None:
        """The norm bound for one reply (None: no norm check); UpdateRejected if it cannot
        be derived from what the reply reports."""
        if self.max_update_norm > 0:
            return self.max_update_norm
        cfg = self.dp_sgd
        if cfg is None:
            return None
        rows = finite_number(metrics, "num-examples")
        if rows is None or rows < 1 or rows != int(rows):
            raise UpdateRejected(
                f"reports no valid num-examples (got {rows}), needed for the bound"
            )
        n, training = int(rows), cfg.training
        if cfg.privacy.noise_multiplier is not None:
            sigma = cfg.privacy.noise_multiplier
        else:
            q, steps = steps_for(n, training.batch_size, training.local_epochs)
            try:
                ceiling = noise_multiplier_ceiling(
                    target_epsilon=cfg.privacy.target_epsilon or 0.0,
                    delta=cfg.privacy.target_delta,
                    sample_rate=q,
                    steps=cfg.federation.rounds * steps,
                    accountant=cfg.privacy.accountant,
                )
            except PrivacyBudgetExceeded as err:
                raise UpdateRejected(f"no DP-SGD update is possible for {n} rows: {err}") from err
            reported = finite_number(metrics, "noise-multiplier")
            sigma = ceiling if reported is None else min(max(reported, 0.0), ceiling)
        return default_update_norm_bound(
            num_params=num_params,
            num_examples=n,
            batch_size=training.batch_size,
            local_epochs=training.local_epochs,
            learning_rate=training.learning_rate,
            momentum=training.momentum,
            max_grad_norm=cfg.privacy.max_grad_norm,
            noise_multiplier=sigma,
        )


def weight_key(strategy: Strategy) -> str:
    """The metric Flower's (possibly wrapped) FedAvg family weights replies by."""
    while not hasattr(strategy, "weighted_by_key") and hasattr(strategy, "strategy"):
        strategy = strategy.strategy
    return str(getattr(strategy, "weighted_by_key", "num-examples"))


class UpdateScreen:
    """Validates a round's train replies against the global model sent that round.

    A rejected update is excluded from aggregation, recorded in the ``book`` (its
    ``rejections`` and ``failures``) and logged with the site and the reason; the norm of
    every accepted update is kept in ``update_norms``.
    """

    def __init__(
        self,
        validation: UpdateValidation,
        *,
        inner: Strategy,
        book: FailureBook,
        site_of: Callable[[Message], str],
    ) -> None:
        self.validation = validation
        self.inner = inner
        self.book = book
        self.site_of = site_of
        #: ‖site model − global model‖ of every accepted update: round → site → norm.
        self.update_norms: dict[int, dict[str, float]] = {}
        self._reference: tuple[int, dict[str, np.ndarray]] | None = None

    def remember_global_model(self, server_round: int, arrays: ArrayRecord) -> None:
        """The round's global model: what the round's updates are checked against."""
        self._reference = (server_round, {k: v.numpy() for k, v in arrays.items()})

    def screen(self, server_round: int, replies: list[Message]) -> list[Message]:
        """The replies whose update passes validation; the others are rejected and recorded."""
        reference = None
        if self._reference is not None and self._reference[0] == server_round:
            reference = self._reference[1]
        else:  # only when driven by hand: Strategy.start always configures the round first
            logger.warning(
                "round %d: no global model recorded for this round; checking finiteness only",
                server_round,
            )
        accepted: list[Message] = []
        for reply in replies:
            site = self.site_of(reply)
            try:
                norm = self._check(reply, reference)
            except UpdateRejected as err:
                self.book.reject(server_round, site, str(err))
                continue
            if norm is not None:
                self.update_norms.setdefault(server_round, {})[site] = norm
                logger.info("round %d: site %s update norm %.4g", server_round, site, norm)
            accepted.append(reply)
        # Flower aborts the whole round when replies' metric names differ: keep the most
        # common set of names and reject the odd ones out instead.
        names = [frozenset(r.content.metric_records["metrics"].keys()) for r in accepted]
        if len(set(names)) > 1:
            usual = Counter(names).most_common(1)[0][0]
            for reply, keys in zip(list(accepted), names, strict=True):
                if keys != usual:
                    odd = sorted(keys ^ usual)
                    self.book.reject(
                        server_round,
                        self.site_of(reply),
                        f"metrics {odd} differ from the other sites'",
                    )
                    accepted.remove(reply)
        return accepted

    def _check(self, reply: Message, reference: dict[str, np.ndarray] | None) -> float | None:
        """Validate one train reply; its update norm (None without a reference)."""
        content = reply.content
        if list(content.array_records) != ["arrays"]:
            raise UpdateRejected(
                f"expected one ArrayRecord 'arrays', got {sorted(content.array_records)}"
            )
        if list(content.metric_records) != ["metrics"]:
            raise UpdateRejected(
                f"expected one MetricRecord 'metrics', got {sorted(content.metric_records)}"
            )
        metrics = content.metric_records["metrics"]
        for key in sorted({"num-examples", weight_key(self.inner)}):
            weight = finite_number(metrics, key)
            if weight is None or weight <= 0:
                raise UpdateRejected(f"metric '{key}' must be a finite number > 0")
        try:
            update = {k: v.numpy() for k, v in content.array_records["arrays"].items()}
        except Exception as err:  # a malformed payload may fail to decode in any way
            raise UpdateRejected(f"arrays could not be decoded ({type(err).__name__})") from err
        if reference is None:
            check_finite(update)
            return None
        num_params = sum(int(np.size(v)) for v in reference.values())
        return validate_update(
            update, reference, max_norm=self.validation.bound_for(metrics, num_params)
        )
