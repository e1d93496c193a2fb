"""fedvault ClientApp: a partner site's schema, DP training and evaluation handlers (Message API).

Thin Flower wiring: each handler reads the run's configuration and the site's state, calls
into common/ and answers with records. In a deployment Flower starts a fresh process for
every message, so what only training needs (Opacus, the ledger and its accountants) is
imported in the train handler: an evaluation or schema query never pays for it.

Privacy lives in the site's own ledger (common/site_privacy.py): each round is reserved
there, durably, before training, and the epsilon reported is the composition of the data's
whole history, across every run.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedvault.client.site import Site, resolve_site
from fedvault.client.site_progress import reports_progress
from fedvault.common.config import FedvaultConfig, parse_toml_text
from fedvault.common.errors import (
    REFUSAL_CODE_BASE,
    ConfigError,
    FedvaultError,
    PrivacyBudgetExceeded,
)
from fedvault.common.models import build_model, default_model_for
from fedvault.common.training import evaluate_counts, resolve_device

if TYPE_CHECKING:
    from fedvault.common.site_privacy import Reservation, RoundPlan, SitePolicy, SitePrivacy

logger = logging.getLogger(__name__)

app = ClientApp()

#: Train instructions carry the ledger length the coordinator saw last from this site
#: (``{"count": N}``); train replies carry the ledger's status (LedgerStatus.record()).
LEDGER_SEEN = "ledger-seen"
LEDGER_STATUS = "ledger"
PRIVACY_STATE = "fedvault-privacy"  # the noise multiplier planned for this run
STEPS_STATE = "fedvault-steps"  # cumulative local steps, with or without DP

Handler = Callable[[Message, Context], Message]


def refuses_cleanly(handler: Handler) -> Handler:
    """Turn a fedvault error into an error reply with a one-line reason (no traceback)."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except FedvaultError as err:
            logger.warning("refusing %s: %s (%s)", msg.metadata.message_type, err, err.hint)
            reason = f"{type(err).__name__}: {err} (hint: {err.hint})"
            return Message(
                Error(code=REFUSAL_CODE_BASE + err.exit_code, reason=reason), reply_to=msg
            )

    return wrapper


def _setup(context: Context) -> tuple[FedvaultConfig, Site]:
    text = str(context.run_config.get("scenario-toml", ""))
    cfg = parse_toml_text(text)
    # Simulated sites share this machine, one CPU each (simulation.cpus-per-site); a real
    # site uses torch's default (every core) unless it set `fedvault client start --threads`.
    if "partition-id" in context.node_config:
        torch.set_num_threads(max(1, int(cfg.simulation.cpus_per_site)))
    elif (threads := int(str(context.node_config.get("threads", 0)))) > 0:
        torch.set_num_threads(threads)
    return cfg, resolve_site(cfg, text, context.node_config)


def _model_for(cfg: FedvaultConfig, site: Site, arrays: ArrayRecord) -> torch.nn.Module:
    model = build_model(_model_name(cfg, site), site.data.feature_shape, site.data.num_classes)
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def _is_deployed(context: Context) -> bool:
    """A real site (`fedvault client start`), not a simulated SuperNode."""
    return "data-path" in context.node_config


def _site_policy(cfg: FedvaultConfig, context: Context) -> SitePolicy:
    """What this site accepts: a real site's own settings from its node config; a simulated
    site (the simulation's user is both site and coordinator) takes the scenario's."""
    from fedvault.common.site_privacy import SitePolicy

    if _is_deployed(context):
        return SitePolicy.from_node_config(context.node_config)
    return SitePolicy(
        delta=cfg.privacy.target_delta,
        accountant=cfg.privacy.accountant,
        max_rounds_per_run=None,
        max_evaluations_per_run=None,
        allow_non_private=True,
    )


def _model_name(cfg: FedvaultConfig, site: Site) -> str:
    return cfg.model.name if cfg.model.name != "auto" else default_model_for(site.data.kind)


def _check_run(cfg: FedvaultConfig, site: Site, policy: SitePolicy) -> None:
    """Refuse a run whose δ, accountant or model this site does not accept (every message)."""
    policy.check_run(
        site=site.name,
        delta=cfg.privacy.target_delta,
        accountant=cfg.privacy.accountant,
        model=_model_name(cfg, site),
        train_rows=len(site.data.train_y) if cfg.privacy.enabled else 0,
    )


def _run_id(context: Context) -> str:
    return str(context.run_config.get("run-id", "") or f"flwr-run-{context.run_id}")


def _site_privacy(
    cfg: FedvaultConfig, site: Site, context: Context, policy: SitePolicy
) -> SitePrivacy:
    """This site's privacy gate: its own ledger, max_epsilon, δ and accountant, never the
    coordinator's.

    A real site's come from its SuperNode's node config (``fedvault client start``); a
    simulated site's from the simulation's own run config entries.
    """
    from fedvault.common.ledger import DEFAULT_MAX_EPSILON
    from fedvault.common.site_privacy import SimulatedSitePolicy, SitePrivacy

    node = context.node_config
    max_epsilon: float | None
    if _is_deployed(context):
        if not str(node.get("ledger-path", "")):
            raise ConfigError(
                f"site {site.name} has no privacy ledger configured",
                hint="Start partner sites with `fedvault client start`; it keeps the ledger "
                "in the kit's state folder (or --ledger PATH).",
            )
        ledger_path = Path(str(node["ledger-path"]))
        text = str(node.get("max-epsilon", DEFAULT_MAX_EPSILON))
        try:
            max_epsilon = float(text)
        except ValueError:
            max_epsilon = math.nan
        if not (math.isfinite(max_epsilon) and max_epsilon > 0):
            raise ConfigError(
                f"site {site.name}: max-epsilon must be > 0, got {text!r} in its node config",
                hint="Start partner sites with `fedvault client start --max-epsilon E`.",
            )
    else:
        simulated = SimulatedSitePolicy.from_run_config(context.run_config)
        ledger_path = simulated.ledger_path(site.name)
        max_epsilon = simulated.max_epsilon_for(site.name)
    return SitePrivacy(
        site=site.name,
        ledger_path=ledger_path,
        dataset=site.fingerprint,
        run_id=_run_id(context),
        max_epsilon=max_epsilon,
        delta=policy.delta,
        accountant=policy.accountant,
        max_rounds_per_run=policy.max_rounds_per_run,
        # A real site's data file must stay the dataset its ledger declared (`client start
        # --new-dataset` declares a new one); a simulated site's partition is declared as is.
        new_dataset=not _is_deployed(context),
    )


def _refuse_non_private(site: Site, policy: SitePolicy) -> None:
    """A real site trains without DP only if it said so itself (`--allow-non-private`)."""
    if not policy.allow_non_private:
        raise PrivacyBudgetExceeded(
            f"site {site.name} refuses to train without differential privacy: this run has "
            "privacy disabled, and the site's data may only be used with DP-SGD",
            hint="Run with DP, or start the site with `fedvault client start "
            "--allow-non-private` if it really agrees to a non-private baseline.",
        )


def _round_plan(
    cfg: FedvaultConfig, site: Site, gate: SitePrivacy, context: Context, server_round: int
) -> RoundPlan:
    """The exact DP-SGD phase of this round; sigma planned once per run, on the site."""
    from fedvault.common.site_privacy import RoundPlan
    from fedvault.common.training import sample_rate_for, steps_per_epoch

    n_train, batch = len(site.data.train_y), cfg.training.batch_size
    q = sample_rate_for(n_train, batch)
    steps = cfg.training.local_epochs * steps_per_epoch(n_train, batch)
    planned = context.state.config_records.get(PRIVACY_STATE)
    if cfg.privacy.noise_multiplier is not None:
        sigma = cfg.privacy.noise_multiplier
    elif planned is not None:
        sigma = float(cast(float, planned["noise-multiplier"]))
    else:
        rounds_left = max(1, cfg.federation.rounds - server_round + 1)
        sigma = gate.plan_noise_multiplier(
            target_epsilon=cfg.privacy.target_epsilon or 0.0,  # config guarantees one of two
            sample_rate=q,
            steps_left=rounds_left * steps,
        )
        context.state[PRIVACY_STATE] = ConfigRecord({"noise-multiplier": sigma})
    return RoundPlan(noise_multiplier=sigma, sample_rate=q, steps=steps)


def _int_or_zero(value: object) -> int:
    """A non-negative count from the coordinator's message (anything else: 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0
    return max(0, int(value))


@app.query("schema")
@reports_progress
@refuses_cleanly
def schema(msg: Message, context: Context) -> Message:
    """Describe the site's data shape (never its rows) so the coordinator can build the model."""
    _, site = _setup(context)
    record = ConfigRecord(
        {
            "site": site.name,
            "feature-shape": list(site.data.feature_shape),
            "num-classes": site.data.num_classes,
            "kind": site.data.kind,
            "train-rows": len(site.data.train_y),
            "test-rows": len(site.data.test_y),
        }
    )
    return Message(RecordDict({"schema": record}), reply_to=msg)


@app.train()
@reports_progress
@refuses_cleanly
def train(msg: Message, context: Context) -> Message:
    """One round of local DP-SGD on the received global model, reserved in the ledger first."""
    from fedvault.common.training import TrainingPlan
    from fedvault.common.training import train as train_locally

    cfg, site = _setup(context)
    policy = _site_policy(cfg, context)
    _check_run(cfg, site, policy)
    config = msg.content.config_records["config"]
    server_round = int(cast(int, config.get("server-round", 0)))
    model = _model_for(cfg, site, msg.content.array_records["arrays"])
    plan: RoundPlan | None = None
    reservation: Reservation | None = None
    if cfg.privacy.enabled:
        gate = _site_privacy(cfg, site, context, policy)
        plan = _round_plan(cfg, site, gate, context, server_round)
        seen = msg.content.config_records.get(LEDGER_SEEN)
        # Write-ahead: durable in the site's ledger before any training happens.
        reservation = gate.reserve(
            plan,
            server_round=server_round,
            target_epsilon=cfg.privacy.target_epsilon,
            seen_count=_int_or_zero(seen.get("count") if seen is not None else 0),
        )
    else:
        _refuse_non_private(site, policy)
    training = TrainingPlan(
        local_epochs=cfg.training.local_epochs,
        batch_size=cfg.training.batch_size,
        learning_rate=cfg.training.learning_rate,
        momentum=cfg.training.momentum,
        proximal_mu=float(cast(float, config.get("proximal-mu", 0.0))),
        max_grad_norm=cfg.privacy.max_grad_norm,
        noise_multiplier=plan.noise_multiplier if plan else None,
        accountant=cfg.privacy.accountant,
        grad_sample_mode=cfg.training.grad_sample_mode,
    )
    started = time.perf_counter()
    outcome = train_locally(
        model,
        site.data.train_x,
        site.data.train_y,
        plan=training,
        device=resolve_device(str(context.node_config.get("device", cfg.training.device))),
    )
    train_seconds = time.perf_counter() - started
    if plan is not None and outcome.event != plan.event:
        # The ledger holds what was reserved; never send an update it does not cover.
        raise FedvaultError(
            f"site {site.name}: DP-SGD ran {outcome.event}, not the reserved {plan.event}"
        )
    steps_record = context.state.config_records.get(STEPS_STATE)
    total_steps = outcome.steps + (int(cast(int, steps_record["total"])) if steps_record else 0)
    if reservation is not None:  # the ledger knows this run's steps, even across a resume
        total_steps = reservation.run_steps
    context.state[STEPS_STATE] = ConfigRecord({"total": total_steps})
    epsilon = reservation.epsilon if reservation else 0.0
    logger.info(
        "site %s round %s: %d steps, epsilon=%.4f", site.name, server_round, outcome.steps, epsilon
    )
    metrics = MetricRecord(
        {
            "num-examples": outcome.num_examples,
            "unit-weight": 1.0,  # equal weights, for central DP's accounted aggregation
            "epsilon": epsilon,
            "run-epsilon": reservation.run_epsilon if reservation else 0.0,
            "max-epsilon": (reservation.max_epsilon or 0.0) if reservation else 0.0,
            "delta": cfg.privacy.target_delta if plan else 0.0,
            "noise-multiplier": plan.noise_multiplier if plan else 0.0,
            "sample-rate": outcome.sample_rate,
            "steps": total_steps,
            "round-steps": outcome.steps,
            "train-seconds": train_seconds,
        }
    )
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
        "arrays": ArrayRecord(state),
        "metrics": metrics,
        "site": ConfigRecord({"name": site.name}),
    }
    if reservation is not None:  # the ledger's chain head: the coordinator checks it never forgets
        records[LEDGER_STATUS] = ConfigRecord(reservation.ledger.record())
    return Message(RecordDict(records), reply_to=msg)


@app.evaluate()
@reports_progress
@refuses_cleanly
def evaluate_global(msg: Message, context: Context) -> Message:
    """Loss, accuracy and classification counts (confusion matrix; for a binary task the
    histogram of class-1 scores, common/metrics.py) of the received global model on the
    site's own test split."""
    cfg, site = _setup(context)
    policy = _site_policy(cfg, context)
    _check_run(cfg, site, policy)
    if _is_deployed(context) and policy.max_evaluations_per_run is not None:
        # Evaluation replies spend no ε but say how the model fits the site's rows: capped.
        from fedvault.common.ledger import PrivacyLedger

        with PrivacyLedger(Path(str(context.node_config["ledger-path"]))) as ledger:
            ledger.record_evaluation(
                _run_id(context),
                int(cast(int, msg.content.config_records["config"].get("server-round", 0)))
                if "config" in msg.content.config_records
                else 0,
                max_per_run=policy.max_evaluations_per_run,
            )
    model = _model_for(cfg, site, msg.content.array_records["arrays"])
    device = resolve_device(str(context.node_config.get("device", cfg.training.device)))
    started = time.perf_counter()
    result = evaluate_counts(model, site.data.test_x, site.data.test_y, device=device)
    metrics = MetricRecord(
        {
            "num-examples": len(site.data.test_y),
            "loss": result.loss,
            "accuracy": result.accuracy,
            "eval-seconds": time.perf_counter() - started,
            # Counts only (confusion matrix, binned scores), never a row's prediction.
            **result.statistics.to_record(),
        }
    )
    content = RecordDict({"metrics": metrics, "site": ConfigRecord({"name": site.name})})
    return Message(content, reply_to=msg)
