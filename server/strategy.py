"""Strategy registry (Flower's FedAvg family, robust aggregation, central DP), update validation."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
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
from fedvault.common.errors import (
    BUDGET_REFUSAL_CODE,
    LEDGER_REFUSAL_CODE,
    POLICY_REFUSAL_CODE,
    ConfigError,
    FederationError,
    PrivacyBudgetExceeded,
    UpdateRejected,
)
from fedvault.common.site_privacy import MAX_NOISE_INFLATION
from fedvault.common.validation import (
    check_finite,
    default_update_norm_bound,
    steps_for,
    validate_update,
)
from fedvault.server.ledger_watch import LedgerWatch

logger = logging.getLogger(__name__)


#: Error codes of a site's deliberate refusal (its budget, its ledger, its policy): the
#: site is well and protects its data; recorded apart from failures.
REFUSAL_CODES = frozenset({BUDGET_REFUSAL_CODE, LEDGER_REFUSAL_CODE, POLICY_REFUSAL_CODE})
#: Per-site instruction record and reply record of the ledger check (client/app.py).
LEDGER_SEEN = "ledger-seen"
LEDGER_STATUS = "ledger"

#: The metric every site's train reply carries as 1.0: central DP weights all sites equally.
UNIT_WEIGHT_KEY = "unit-weight"
#: The two kinds of instruction a round sends (keys of ReportingStrategy._sent).
TRAIN, EVALUATE = "train", "evaluate"


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
STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "fedavg": _fedavg,
    "fedprox": _fedprox,
    "fedadam": _fedadam,
    "trimmed-mean": _trimmed_mean,
    "median": _median,
    "krum": _krum,
}


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
    if cfg.federation.strategy not in STRATEGIES:
        raise ConfigError(
            f"unknown strategy '{cfg.federation.strategy}'; choose one of: " + ", ".join(STRATEGIES)
        )
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


def _finite_number(metrics: MetricRecord | None, key: str) -> float | None:
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
        rows = _finite_number(metrics, "num-examples")
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
            reported = _finite_number(metrics, "noise-multiplier")
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


def _weight_key(strategy: Strategy) -> str:
    """The metric Flower's (possibly wrapped) FedAvg family weights replies by."""
    while not hasattr(strategy, "weighted_by_key") and hasattr(strategy, "strategy"):
        strategy = strategy.strategy
    return str(getattr(strategy, "weighted_by_key", "num-examples"))


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

    Keeps the replies' metrics (never their arrays) for ``train_metrics``/``eval_metrics``;
    failures are recorded per site in ``failures``. Each successful train reply is validated
    against the global model sent that round (``validation``, on by default): a rejected
    update is excluded from aggregation, recorded in ``rejections`` and ``failures``, and
    logged with the site and the reason.
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
        #: Sites whose ledger forgot, rewrote its history, declared a new dataset, or that
        #: refused because their own ledger is broken: round → site → what happened.
        self.ledger_alerts: dict[int, dict[str, str]] = {}
        self.min_sites = min_sites
        self.required_sites = required_sites if required_sites is not None else min_sites
        self.round_timeout = round_timeout
        self.validation = validation if validation is not None else UpdateValidation()
        if not self.validation.enabled:
            logger.warning("update validation is OFF: every site's update is aggregated as is")
        #: Updates excluded by validation (a subset of ``failures``): round → site → reason.
        self.rejections: dict[int, dict[str, str]] = {}
        #: ‖site model − global model‖ of every accepted update: round → site → norm.
        self.update_norms: dict[int, dict[str, float]] = {}
        self._reference: tuple[int, dict[str, np.ndarray]] | None = None
        #: Each reply's metrics (numbers; lists of numbers for an evaluation's counts):
        #: round → site → name → value.
        self.train_metrics: dict[int, dict[str, dict[str, Any]]] = {}
        self.eval_metrics: dict[int, dict[str, dict[str, Any]]] = {}
        self.failures: dict[int, dict[str, str]] = {}
        #: Rounds a site refused because its privacy budget would be exceeded (a subset
        #: of ``failures``): the site is well, it protects its data.
        self.refusals: dict[int, dict[str, str]] = {}
        #: The last instructions configured, train and evaluate apart (a deployment sends a
        #: round's evaluation with the next round's training); Flower's Grid sets each one's
        #: message id in place as it sends it, so error replies can be traced to their
        #: destination.
        self._sent: dict[str, list[Message]] = {TRAIN: [], EVALUATE: []}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.validation.enabled:  # the round's global model: what updates are checked against
            self._reference = (server_round, {k: v.numpy() for k, v in arrays.items()})
        self._wait_for_sites(server_round, grid)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if self.ledger_watch is not None:
            messages = [self._with_ledger_seen(m) for m in messages]
        self._sent[TRAIN] = self._with_deadline(messages)
        return self._sent[TRAIN]

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

    def _wait_for_sites(self, server_round: int, grid: Grid, poll: float = 1.0) -> None:
        """Wait at most ``round_timeout`` for ``required_sites`` connected sites, else end."""
        deadline = time.monotonic() + self.round_timeout
        while len(nodes := set(grid.get_node_ids())) < self.required_sites:
            if time.monotonic() > deadline:
                missing = sorted(n for node, n in self.site_names.items() if node not in nodes)
                raise FederationError(
                    f"round {server_round} could not start: {len(nodes)} site(s) connected, "
                    f"{self.required_sites} needed, after waiting {self.round_timeout:g} s"
                    + (f"; not connected: {', '.join(missing)}" if missing else ""),
                    hint="A site that restarts `fedvault client start` rejoins at the next "
                    "round; the rounds so far are checkpointed (--resume RUN_DIR).",
                )
            time.sleep(poll)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._wait_for_sites(server_round, grid)
        self._sent[EVALUATE] = self._with_deadline(
            self.inner.configure_evaluate(server_round, arrays, config, grid)
        )
        return self._sent[EVALUATE]

    def _with_deadline(self, messages: Iterable[Message]) -> list[Message]:
        """The round's instructions, each expiring at the round's deadline: a site that comes
        back late never trains (and spends privacy budget) for a round already closed."""
        out = list(messages)
        for message in out:
            message.metadata.ttl = min(message.metadata.ttl, self.round_timeout)
        return out

    def _record(
        self,
        server_round: int,
        replies: list[Message],
        into: dict[int, dict[str, dict[str, Any]]],
    ) -> None:
        per_site = into.setdefault(server_round, {})
        instructions = self._sent[TRAIN if into is self.train_metrics else EVALUATE]
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in instructions}
        answered = {
            sent.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) for r in replies
        }
        for node in sorted({m.metadata.dst_node_id for m in instructions} - answered):
            site = self.site_names.get(node, f"node-{node}")
            reason = "no reply before the round's deadline (round-timeout)"
            self.failures.setdefault(server_round, {})[site] = reason
            logger.warning("round %d: site %s failed: %s", server_round, site, reason)
        for reply in replies:
            site = site_of(reply, self.site_names, sent, trust_reported=self.trust_reported_names)
            if reply.has_error():
                reason = reply.error.reason or f"error code {reply.error.code}"
                self.failures.setdefault(server_round, {})[site] = reason
                if reply.error.code in REFUSAL_CODES:
                    self.refusals.setdefault(server_round, {})[site] = reason
                    logger.warning("round %d: site %s refused: %s", server_round, site, reason)
                else:
                    logger.warning("round %d: site %s failed: %s", server_round, site, reason)
                if reply.error.code == LEDGER_REFUSAL_CODE:
                    self.ledger_alerts.setdefault(server_round, {})[site] = reason
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
            self.ledger_alerts.setdefault(server_round, {})[site] = alert

    def _fix_row_counts(self, replies: list[Message]) -> None:
        """Weights and bounds use the rows each site reported at the schema step (capped):
        a reply claiming more has its ``num-examples`` lowered to that, and is logged."""
        if not self.schema_rows:
            return
        for reply in replies:
            site = site_of(reply, self.site_names, trust_reported=self.trust_reported_names)
            metrics = reply.content.metric_records.get("metrics")
            fixed = self.schema_rows.get(site)
            if metrics is None or fixed is None:
                continue
            claimed = _finite_number(metrics, "num-examples")
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
            good = self._validate(server_round, good)
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

    def _reject(self, server_round: int, site: str, reason: str) -> None:
        self.rejections.setdefault(server_round, {})[site] = reason
        self.failures.setdefault(server_round, {})[site] = f"update rejected: {reason}"
        logger.warning("round %d: update from site %s rejected: %s", server_round, site, reason)

    def _validate(self, server_round: int, replies: list[Message]) -> list[Message]:
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
            site = site_of(reply, self.site_names, trust_reported=self.trust_reported_names)
            try:
                norm = self._check(reply, reference)
            except UpdateRejected as err:
                self._reject(server_round, site, str(err))
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
                    self._reject(
                        server_round,
                        site_of(reply, self.site_names, trust_reported=self.trust_reported_names),
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
        for key in sorted({"num-examples", _weight_key(self.inner)}):
            weight = _finite_number(metrics, key)
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
                    site = site_of(reply, self.site_names, trust_reported=self.trust_reported_names)
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
