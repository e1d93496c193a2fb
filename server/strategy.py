"""Strategy registry (Flower's FedAvg/FedProx/FedAdam, optional central DP), round recording."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from common.config import FedvaultConfig, check_central_dp_strategy
from common.errors import BUDGET_REFUSAL_CODE, FederationError

logger = logging.getLogger(__name__)


#: The metric every site's train reply carries as 1.0: central DP weights all sites equally.
UNIT_WEIGHT_KEY = "unit-weight"


class UnitWeightFedAvg(FedAvg):
    """Flower's FedAvg for central DP: training is ``FedAvg.aggregate_train`` weighted by
    ``unit-weight`` (the equal weights Flower's accounted DP wrapper requires); evaluation
    replies carry no ``unit-weight``, so their metrics are averaged by ``num-examples``.
    """

    def __init__(self, **common: Any) -> None:
        super().__init__(weighted_by_key=UNIT_WEIGHT_KEY, **common)
        self.evaluation = FedAvg(**common)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.evaluation.aggregate_evaluate(server_round, replies)


def _fedavg(cfg: FedvaultConfig, **common: Any) -> Strategy:
    if cfg.privacy.central:
        return UnitWeightFedAvg(**common)
    return FedAvg(**common)


def _fedprox(cfg: FedvaultConfig, **common: Any) -> Strategy:
    return FedProx(proximal_mu=cfg.federation.proximal_mu, **common)


def _fedadam(cfg: FedvaultConfig, **common: Any) -> Strategy:
    return FedAdam(
        eta=cfg.federation.server_learning_rate, eta_l=cfg.training.learning_rate, **common
    )


STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "fedavg": _fedavg,
    "fedprox": _fedprox,
    "fedadam": _fedadam,
}


def build_strategy(cfg: FedvaultConfig) -> Strategy:
    """Flower strategy named in the config, sampling every site in every round.

    With ``privacy.central`` the strategy is wrapped in Flower's
    ``DifferentialPrivacyServerSideFixedClipping`` (central DP with fixed clipping,
    McMahan et al. 2018, https://arxiv.org/abs/1710.06963): each site's update is clipped to
    ``central_clipping_norm``, the equally weighted FedAvg mean gets Gaussian noise of std
    ``central_noise_multiplier * central_clipping_norm / sites``, and Flower's RDP accountant
    composes one Gaussian release per round at the site level. Every site is sampled every
    round, so there is no amplification by sampling. The accountant requires a reply from
    every site: a round in which any site failed is not released (the model is not updated
    that round and no epsilon is spent); ``ReportingStrategy`` logs a warning naming it.
    """
    sites = cfg.federation.sites
    if cfg.privacy.central:
        check_central_dp_strategy(cfg.federation.strategy)  # parse() checked; replace() may not
    inner = STRATEGIES[cfg.federation.strategy](
        cfg,
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=sites,
        min_evaluate_nodes=sites,
        min_available_nodes=sites,
    )
    if not cfg.privacy.central:
        return inner
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=cfg.privacy.target_delta,
            population_size=sites,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    return DifferentialPrivacyServerSideFixedClipping(
        inner,
        cfg.privacy.central_noise_multiplier,
        cfg.privacy.central_clipping_norm,
        num_sampled_clients=sites,
        accountant=accountant,
    )


def central_dp_report(strategy: Strategy) -> dict[str, Any] | None:
    """Site-level central DP settings and epsilon spent so far; None when central DP is off.

    ``strategy`` is what ``build_strategy`` returned (``ReportingStrategy.inner``).
    """
    if not isinstance(strategy, DifferentialPrivacyServerSideFixedClipping):
        return None
    spent = strategy.privacy_spent()
    if spent is None:
        return None
    return {
        "noise_multiplier": strategy.noise_multiplier,
        "clipping_norm": strategy.clipping_norm,
        "epsilon": spent.epsilon,
        "delta": spent.delta,
        "releases": spent.num_releases,
        "accounting": spent.accounting_method,
        "level": "site",
    }


def site_of(reply: Message, names: dict[int, str]) -> str:
    """The site name a reply came from (its own ``site`` record, else its node id)."""
    if not reply.has_error() and "site" in reply.content:
        record = reply.content["site"]
        if isinstance(record, ConfigRecord) and "name" in record:
            return str(record["name"])
    node = reply.metadata.src_node_id
    return names.get(node, f"node-{node}")


class ReportingStrategy(Strategy):
    """Delegates every step to ``inner`` and keeps each round's per-site replies.

    Keeps the replies' metrics (never their arrays) for ``train_metrics``/``eval_metrics``;
    failures are recorded per site in ``failures``.
    """

    def __init__(self, inner: Strategy, site_names: dict[int, str], *, min_sites: int = 1) -> None:
        self.inner = inner
        self.site_names = site_names
        self.min_sites = min_sites
        self.train_metrics: dict[int, dict[str, dict[str, float]]] = {}
        self.eval_metrics: dict[int, dict[str, dict[str, float]]] = {}
        self.failures: dict[int, dict[str, str]] = {}
        #: Rounds a site refused because its privacy budget would be exceeded (a subset
        #: of ``failures``): the site is well, it protects its data.
        self.refusals: dict[int, dict[str, str]] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def _record(
        self,
        server_round: int,
        replies: list[Message],
        into: dict[int, dict[str, dict[str, float]]],
    ) -> None:
        per_site = into.setdefault(server_round, {})
        for reply in replies:
            site = site_of(reply, self.site_names)
            if reply.has_error():
                reason = reply.error.reason or f"error code {reply.error.code}"
                self.failures.setdefault(server_round, {})[site] = reason
                if reply.error.code == BUDGET_REFUSAL_CODE:
                    self.refusals.setdefault(server_round, {})[site] = reason
                    logger.warning("round %d: site %s refused: %s", server_round, site, reason)
                else:
                    logger.warning("round %d: site %s failed: %s", server_round, site, reason)
                continue
            metrics = reply.content.get("metrics")
            if isinstance(metrics, MetricRecord):
                per_site[site] = {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._record(server_round, replies, self.train_metrics)
        good = [r for r in replies if not r.has_error()]
        if len(good) < self.min_sites:
            failed = self.failures.get(server_round, {})
            why = "; ".join(f"{site}: {reason}" for site, reason in sorted(failed.items()))
            raise FederationError(
                f"round {server_round} ended the run: {len(good)} site(s) sent an update, "
                f"min_sites is {self.min_sites}" + (f" ({why})" if why else ""),
                hint="Sites that refuse have spent their privacy budget; others failed or "
                "timed out. The rounds before this one are kept in the run directory.",
            )
        arrays, metrics = self.inner.aggregate_train(server_round, good)
        central = self.inner
        if (
            arrays is None
            and isinstance(central, DifferentialPrivacyServerSideFixedClipping)
            and len(good) < central.num_sampled_clients
        ):
            logger.warning(
                "round %d: only %d of %d sites replied; central DP releases only a round with "
                "every site, so the model is not updated this round (no epsilon spent)",
                server_round,
                len(good),
                central.num_sampled_clients,
            )
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        self._record(server_round, replies, self.eval_metrics)
        return self.inner.aggregate_evaluate(
            server_round, [r for r in replies if not r.has_error()]
        )
