"""Strategy registry (Flower's FedAvg family, robust aggregation, central DP) and the
ReportingStrategy that wraps it: per-site replies recorded, updates validated, failures kept."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedvault.common.config import FedvaultConfig, check_central_dp_strategy
from fedvault.common.errors import FederationError
from fedvault.common.registry import STRATEGIES as STRATEGY_REGISTRY
from fedvault.server.failures import FailureBook
from fedvault.server.ledger_watch import LedgerWatch
from fedvault.server.message_lifetimes import EVALUATE, TRAIN, SentInstructions
from fedvault.server.site_wait import SiteWait
from fedvault.server.update_validation import UpdateScreen, UpdateValidation, finite_number

logger = logging.getLogger(__name__)


#: Per-site instruction record and reply record of the ledger check (client/app.py).
LEDGER_SEEN = "ledger-seen"
LEDGER_STATUS = "ledger"

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


def _trimmed_mean(cfg: FedvaultConfig, **common: Any) -> Strategy:
    return FedTrimmedAvg(beta=cfg.federation.trim_fraction, **common)


def _median(cfg: FedvaultConfig, **common: Any) -> Strategy:
    return FedMedian(**common)


def _krum(cfg: FedvaultConfig, **common: Any) -> Strategy:
    return Krum(num_malicious_nodes=cfg.federation.krum_byzantine, **common)


#: Flower's strategies by config name. Robust aggregation: trimmed mean (Yin et al., ICML
#: 2018, https://arxiv.org/abs/1803.01498) and coordinate-wise median, both unweighted by
#: row counts; Krum (Blanchard et al., NeurIPS 2017) keeps the one update closest to its
#: n - f - 2 nearest neighbours.
STRATEGIES: dict[str, Callable[..., Strategy]] = STRATEGY_REGISTRY.bind(
    {
        "fedavg": _fedavg,
        "fedprox": _fedprox,
        "fedadam": _fedadam,
        "trimmed-mean": _trimmed_mean,
        "median": _median,
        "krum": _krum,
    }
)


def required_sites(cfg: FedvaultConfig) -> int:
    """Sites that must be connected for a round to start: min-sites, or all of them with
    central DP (its accountant is calibrated for every site in every round)."""
    return cfg.federation.sites if cfg.privacy.central else cfg.federation.min_sites


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
    STRATEGY_REGISTRY.check(cfg.federation.strategy)
    # Every connected site is sampled (fraction 1.0). Flower waits, without a deadline, for
    # min_available_nodes; ReportingStrategy waits first, with the round's deadline, for
    # required_sites(cfg), so Flower never blocks on a site that is gone.
    required = required_sites(cfg)
    inner = STRATEGIES[cfg.federation.strategy](
        cfg,
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=required,
        min_evaluate_nodes=required,
        min_available_nodes=required,
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


def site_of(
    reply: Message,
    names: dict[int, str],
    sent: Mapping[str, int] | None = None,
    *,
    trust_reported: bool = True,
) -> str:
    """The site name a reply came from, by its (authenticated) node id first.

    ``names`` maps the node ids that answered the start-of-run schema query to their names,
    so a site cannot have its replies filed under another site's name. A node that joined
    later is named by its reply's own ``site`` record (only when ``trust_reported``: in a
    deployment every name comes from authentication), else by its node id. An error reply
    the SuperLink wrote itself for a node that went away (Flower's NODE_UNAVAILABLE, once
    its heartbeat expired) carries the SuperLink's node id: ``sent`` (message id of each
    instruction -> its destination node) names the node it stands for.
    """
    node = reply.metadata.src_node_id
    if node not in names and reply.has_error() and sent:
        node = sent.get(reply.metadata.reply_to_message_id, node)
    if node in names:
        return names[node]
    if trust_reported and not reply.has_error() and "site" in reply.content:
        record = reply.content["site"]
        if isinstance(record, ConfigRecord) and "name" in record:
            return str(record["name"])
    return f"node-{node}"


class ReportingStrategy(Strategy):
    """Delegates every step to ``inner`` and keeps each round's per-site replies.

    Keeps the replies' metrics (never their arrays) for ``train_metrics``/``eval_metrics``.
    Its other jobs go to one collaborator each: ``site_wait`` waits for the sites a round
    needs, ``instructions`` makes each round's messages expire at its deadline, ``book``
    records failures per site (``failures``, ``refusals``, ``rejections``, ``ledger_alerts``)
    and ``screen`` validates each successful train reply against the global model sent that
    round (``validation``, on by default): a rejected update is excluded from aggregation,
    recorded in ``rejections`` and ``failures``, and logged with the site and the reason.
    """

    def __init__(
        self,
        inner: Strategy,
        site_names: dict[int, str],
        *,
        min_sites: int = 1,
        validation: UpdateValidation | None = None,
        required_sites: int | None = None,
        round_timeout: float = 600.0,
        trust_reported_names: bool = True,
        schema_rows: Mapping[str, int] | None = None,
        max_site_rows: int | None = None,
        ledger_watch: LedgerWatch | None = None,
        run_id: str = "",
    ) -> None:
        self.inner = inner
        self.site_names = site_names
        #: False in a deployment: a node is only ever the site the SuperLink authenticated.
        self.trust_reported_names = trust_reported_names
        #: Training rows each site reported at the schema step (capped at ``max_site_rows``):
        #: what FedAvg weights it by and its update bound assume, whatever a reply claims.
        self.schema_rows = {
            site: min(rows, max_site_rows) if max_site_rows else rows
            for site, rows in (schema_rows or {}).items()
        }
        self.ledger_watch = ledger_watch
        self.run_id = run_id
        self.min_sites = min_sites
        self.site_wait = SiteWait(
            required_sites=required_sites if required_sites is not None else min_sites,
            round_timeout=round_timeout,
            site_names=site_names,
        )
        self.instructions = SentInstructions(round_timeout=round_timeout)
        self.book = FailureBook()
        self.validation = validation if validation is not None else UpdateValidation()
        if not self.validation.enabled:
            logger.warning("update validation is OFF: every site's update is aggregated as is")
        self.screen = UpdateScreen(
            self.validation, inner=inner, book=self.book, site_of=self._site_of
        )
        #: Each reply's metrics (numbers; lists of numbers for an evaluation's counts):
        #: round → site → name → value.
        self.train_metrics: dict[int, dict[str, dict[str, Any]]] = {}
        self.eval_metrics: dict[int, dict[str, dict[str, Any]]] = {}

    @property
    def required_sites(self) -> int:
        """Sites that must be connected for a round to start."""
        return self.site_wait.required_sites

    @property
    def round_timeout(self) -> float:
        """Seconds a round waits for sites, and the lifetime of its instructions."""
        return self.site_wait.round_timeout

    @property
    def failures(self) -> dict[int, dict[str, str]]:
        """Sites that sent no usable reply: round → site → reason."""
        return self.book.failures

    @property
    def refusals(self) -> dict[int, dict[str, str]]:
        """Rounds a site refused (its budget, ledger or policy; a subset of ``failures``)."""
        return self.book.refusals

    @property
    def rejections(self) -> dict[int, dict[str, str]]:
        """Updates excluded by validation (a subset of ``failures``): round → site → reason."""
        return self.book.rejections

    @property
    def ledger_alerts(self) -> dict[int, dict[str, str]]:
        """Sites whose ledger does not add up: round → site → what happened."""
        return self.book.ledger_alerts

    @property
    def update_norms(self) -> dict[int, dict[str, float]]:
        """‖site model − global model‖ of every accepted update: round → site → norm."""
        return self.screen.update_norms

    def _site_of(self, reply: Message) -> str:
        return site_of(reply, self.site_names, trust_reported=self.trust_reported_names)

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.validation.enabled:  # the round's global model: what updates are checked against
            self.screen.remember_global_model(server_round, arrays)
        self.site_wait.wait(server_round, grid)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if self.ledger_watch is not None:
            messages = [self._with_ledger_seen(m) for m in messages]
        return self.instructions.send(TRAIN, messages)

    def _with_ledger_seen(self, message: Message) -> Message:
        """The instruction, with the ledger length the coordinator saw last from its site.

        Flower's strategies share one RecordDict between all sites' messages: each site gets
        its own copy (the same records, by reference) plus its own ``ledger-seen`` count.
        """
        node = message.metadata.dst_node_id
        site = self.site_names.get(node, f"node-{node}")
        assert self.ledger_watch is not None
        content = RecordDict(dict(message.content.items()))
        content[LEDGER_SEEN] = ConfigRecord({"count": self.ledger_watch.seen_count(site)})
        out = Message(
            content=content,
            dst_node_id=node,
            message_type=message.metadata.message_type,
            group_id=message.metadata.group_id,
        )
        out.metadata.ttl = message.metadata.ttl
        return out

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.site_wait.wait(server_round, grid)
        return self.instructions.send(
            EVALUATE, self.inner.configure_evaluate(server_round, arrays, config, grid)
        )

    def _record(
        self,
        server_round: int,
        replies: list[Message],
        into: dict[int, dict[str, dict[str, Any]]],
    ) -> None:
        per_site = into.setdefault(server_round, {})
        kind = TRAIN if into is self.train_metrics else EVALUATE
        sent = self.instructions.destinations(kind)
        answered = {
            sent.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) for r in replies
        }
        for node in sorted(
            {m.metadata.dst_node_id for m in self.instructions.last(kind)} - answered
        ):
            self.book.missed(server_round, self.site_names.get(node, f"node-{node}"))
        for reply in replies:
            site = site_of(reply, self.site_names, sent, trust_reported=self.trust_reported_names)
            if reply.has_error():
                self.book.error_reply(server_round, site, reply)
                continue
            self._check_reported_name(server_round, site, reply)
            if into is self.train_metrics and self.ledger_watch is not None:
                self._observe_ledger(server_round, site, reply)
            metrics = reply.content.get("metrics")
            if isinstance(metrics, MetricRecord):
                per_site[site] = {
                    k: [float(x) for x in v] if isinstance(v, list) else float(v)
                    for k, v in metrics.items()
                }

    def _check_reported_name(self, server_round: int, site: str, reply: Message) -> None:
        """A reply naming another site than the one authenticated is filed under the
        authenticated one, and logged."""
        record = reply.content.get("site")
        if self.trust_reported_names or not isinstance(record, ConfigRecord):
            return
        claimed = str(record.get("name", site))
        if claimed != site:
            logger.warning(
                "round %d: a reply from site %s claims to come from %r; filed under %s",
                server_round,
                site,
                claimed,
                site,
            )

    def _observe_ledger(self, server_round: int, site: str, reply: Message) -> None:
        assert self.ledger_watch is not None
        status = reply.content.get(LEDGER_STATUS)
        fields = dict(status.items()) if isinstance(status, ConfigRecord) else {}
        alert = self.ledger_watch.observe(
            site, fields, run_id=self.run_id, server_round=server_round
        )
        if alert:
            self.book.ledger_alert(server_round, site, alert)

    def _fix_row_counts(self, replies: list[Message]) -> None:
        """Weights and bounds use the rows each site reported at the schema step (capped):
        a reply claiming more has its ``num-examples`` lowered to that, and is logged."""
        if not self.schema_rows:
            return
        for reply in replies:
            site = self._site_of(reply)
            metrics = reply.content.metric_records.get("metrics")
            fixed = self.schema_rows.get(site)
            if metrics is None or fixed is None:
                continue
            claimed = finite_number(metrics, "num-examples")
            if claimed is not None and claimed > fixed:
                logger.warning(
                    "site %s claims %g training rows, %d at the schema step: counted as %d",
                    site,
                    claimed,
                    fixed,
                    fixed,
                )
                metrics["num-examples"] = fixed

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._fix_row_counts([r for r in replies if not r.has_error()])
        self._record(server_round, replies, self.train_metrics)
        good = [r for r in replies if not r.has_error()]
        if self.validation.enabled:
            good = self.screen.screen(server_round, good)
        if len(good) < self.min_sites:
            why = self.book.why(server_round)
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
        """Record each site's evaluation; Flower averages the scalar metrics of the replies
        that agree on the metrics' names and list lengths (an odd one out is logged and left
        out: Flower would abort the round). The per-site counts (confusion matrix, score
        histogram) are aggregated from ``eval_metrics`` by common/metrics.py, not here."""
        replies = list(replies)
        self._record(server_round, replies, self.eval_metrics)
        good = [r for r in replies if not r.has_error()]
        shapes = [_metric_shape(r) for r in good]
        if len(set(shapes)) > 1:
            usual = Counter(shapes).most_common(1)[0][0]
            for reply, shape in zip(list(good), shapes, strict=True):
                if shape != usual:
                    site = self._site_of(reply)
                    logger.warning(
                        "round %d: evaluation from site %s left out of the average: its "
                        "metrics differ from the other sites'",
                        server_round,
                        site,
                    )
                    good.remove(reply)
        aggregated = self.inner.aggregate_evaluate(server_round, good)
        if aggregated is None:
            return None
        return MetricRecord({k: v for k, v in aggregated.items() if not isinstance(v, list)})


def _metric_shape(reply: Message) -> tuple[tuple[str, int], ...]:
    """The names of a reply's metrics with each list's length (-1 for a number)."""
    records = reply.content.metric_records
    metrics = records.get("metrics") if len(records) == 1 else None
    if metrics is None:
        return (("<records>", len(records)),)
    return tuple(sorted((k, len(v) if isinstance(v, list) else -1) for k, v in metrics.items()))
