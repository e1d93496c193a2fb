"""Strategy registry (Flower's FedAvg/FedProx/FedAdam) and a wrapper that records each round."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from common.config import FedvaultConfig

logger = logging.getLogger(__name__)


def _fedavg(cfg: FedvaultConfig, **common: Any) -> Strategy:
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
    """Flower strategy named in the config, sampling every site in every round."""
    sites = cfg.federation.sites
    return STRATEGIES[cfg.federation.strategy](
        cfg,
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=sites,
        min_evaluate_nodes=sites,
        min_available_nodes=sites,
    )


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

    def __init__(self, inner: Strategy, site_names: dict[int, str]) -> None:
        self.inner = inner
        self.site_names = site_names
        self.train_metrics: dict[int, dict[str, dict[str, float]]] = {}
        self.eval_metrics: dict[int, dict[str, dict[str, float]]] = {}
        self.failures: dict[int, dict[str, str]] = {}

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
        return self.inner.aggregate_train(server_round, [r for r in replies if not r.has_error()])

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        self._record(server_round, replies, self.eval_metrics)
        return self.inner.aggregate_evaluate(
            server_round, [r for r in replies if not r.has_error()]
        )
