"""fedvault ClientApp: a partner site's schema, DP training and evaluation handlers (Message API).

Thin Flower wiring: each handler reads the run's configuration and the site's state, calls
into common/ and answers with records. The site's privacy history (every DP-SGD phase it
ran in this run) lives in ``context.state`` so epsilon is composed across all rounds.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import cast

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

from client.site import Site, resolve_site
from common.config import FedvaultConfig, parse_toml_text
from common.errors import FedvaultError, PrivacyBudgetExceeded
from common.models import build_model, default_model_for
from common.privacy import PrivacyEvent, calibrate_noise_multiplier, compute_epsilon
from common.training import (
    TrainingPlan,
    evaluate,
    resolve_device,
    sample_rate_for,
    steps_per_epoch,
)
from common.training import train as train_locally

logger = logging.getLogger(__name__)

app = ClientApp()

PRIVACY_STATE = "fedvault-privacy"  # key of the site's privacy history in context.state
STEPS_STATE = "fedvault-steps"  # cumulative local steps, with or without DP
#: Error replies for fedvault refusals carry this plus the error's exit code.
REFUSAL_CODE_BASE = 1000

Handler = Callable[[Message, Context], Message]


def refuses_cleanly(handler: Handler) -> Handler:
    """Turn a fedvault error into an error reply with a one-line reason (no traceback)."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except FedvaultError as err:
            logger.warning("refusing %s: %s", msg.metadata.message_type, err)
            reason = f"{type(err).__name__}: {err}"
            return Message(
                Error(code=REFUSAL_CODE_BASE + err.exit_code, reason=reason), reply_to=msg
            )

    return wrapper


def _setup(context: Context) -> tuple[FedvaultConfig, Site]:
    text = str(context.run_config.get("scenario-toml", ""))
    cfg = parse_toml_text(text)
    if "partition-id" in context.node_config:
        # Simulated sites share this machine, one CPU each (simulation.cpus-per-site); a real
        # site's SuperNode keeps torch's default and uses all of its own cores.
        torch.set_num_threads(max(1, int(cfg.simulation.cpus_per_site)))
    return cfg, resolve_site(cfg, text, context.node_config)


def _model_for(cfg: FedvaultConfig, site: Site, arrays: ArrayRecord) -> torch.nn.Module:
    name = cfg.model.name if cfg.model.name != "auto" else default_model_for(site.data.kind)
    model = build_model(name, site.data.feature_shape, site.data.num_classes)
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def _history(context: Context) -> list[PrivacyEvent]:
    if PRIVACY_STATE not in context.state.config_records:
        return []
    record = context.state.config_records[PRIVACY_STATE]
    sigmas, rates, steps = (
        cast(list[float], record[k]) for k in ("noise-multiplier", "sample-rate", "steps")
    )
    return [
        PrivacyEvent(float(s), float(q), int(n))
        for s, q, n in zip(sigmas, rates, steps, strict=True)
    ]


def _save_history(context: Context, history: list[PrivacyEvent], planned_sigma: float) -> None:
    context.state[PRIVACY_STATE] = ConfigRecord(
        {
            "noise-multiplier": [e.noise_multiplier for e in history],
            "sample-rate": [e.sample_rate for e in history],
            "steps": [e.steps for e in history],
            "planned-noise-multiplier": planned_sigma,
        }
    )


def _noise_multiplier(cfg: FedvaultConfig, site: Site, context: Context) -> float | None:
    """Sigma for this site: fixed, or calibrated once for the whole planned run."""
    if not cfg.privacy.enabled:
        return None
    if cfg.privacy.noise_multiplier is not None:
        return cfg.privacy.noise_multiplier
    if PRIVACY_STATE in context.state.config_records:
        record = context.state.config_records[PRIVACY_STATE]
        return float(cast(float, record["planned-noise-multiplier"]))
    n_train, batch = len(site.data.train_y), cfg.training.batch_size
    planned_steps = (
        cfg.federation.rounds * cfg.training.local_epochs * steps_per_epoch(n_train, batch)
    )
    return calibrate_noise_multiplier(
        target_epsilon=cfg.privacy.target_epsilon or 0.0,  # config guarantees one of the two
        delta=cfg.privacy.target_delta,
        sample_rate=sample_rate_for(n_train, batch),
        steps=planned_steps,
        accountant=cfg.privacy.accountant,
    )


def _check_budget(
    cfg: FedvaultConfig,
    site: Site,
    history: list[PrivacyEvent],
    sigma: float | None,
    server_round: object,
) -> tuple[PrivacyEvent, float] | None:
    """Refuse a round that would take this site past the run's target epsilon.

    Returns the round's projected privacy event and the epsilon it would bring, so the
    handler need not recompute it when training does exactly that.
    """
    if sigma is None:
        return None
    n_train, batch = len(site.data.train_y), cfg.training.batch_size
    event = PrivacyEvent(
        noise_multiplier=sigma,
        sample_rate=sample_rate_for(n_train, batch),
        steps=cfg.training.local_epochs * steps_per_epoch(n_train, batch),
    )
    projected = compute_epsilon(
        [*history, event], delta=cfg.privacy.target_delta, accountant=cfg.privacy.accountant
    )
    target = cfg.privacy.target_epsilon
    if target is not None and projected > target:
        raise PrivacyBudgetExceeded(
            f"site {site.name} refuses round {server_round}: it would bring its epsilon to "
            f"{projected:.3f}, above the run's target_epsilon {target:g}",
            hint="The run asked for more training than its privacy target allows.",
        )
    return event, projected


@app.query("schema")
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
@refuses_cleanly
def train(msg: Message, context: Context) -> Message:
    """One round of local DP-SGD on the received global model."""
    cfg, site = _setup(context)
    config = msg.content.config_records["config"]
    model = _model_for(cfg, site, msg.content.array_records["arrays"])
    sigma = _noise_multiplier(cfg, site, context)
    history = _history(context)
    projected = _check_budget(cfg, site, history, sigma, config.get("server-round"))
    plan = TrainingPlan(
        local_epochs=cfg.training.local_epochs,
        batch_size=cfg.training.batch_size,
        learning_rate=cfg.training.learning_rate,
        momentum=cfg.training.momentum,
        proximal_mu=float(cast(float, config.get("proximal-mu", 0.0))),
        max_grad_norm=cfg.privacy.max_grad_norm,
        noise_multiplier=sigma,
        accountant=cfg.privacy.accountant,
    )
    outcome = train_locally(
        model,
        site.data.train_x,
        site.data.train_y,
        plan=plan,
        device=resolve_device(str(context.node_config.get("device", cfg.training.device))),
    )
    epsilon = 0.0
    if outcome.event is not None and sigma is not None:
        history.append(outcome.event)
        _save_history(context, history, sigma)
        if projected is not None and projected[0] == outcome.event:
            epsilon = projected[1]  # what Opacus did is what was projected
        else:
            epsilon = compute_epsilon(
                history, delta=cfg.privacy.target_delta, accountant=cfg.privacy.accountant
            )
    steps_record = context.state.config_records.get(STEPS_STATE)
    total_steps = outcome.steps + (int(cast(int, steps_record["total"])) if steps_record else 0)
    context.state[STEPS_STATE] = ConfigRecord({"total": total_steps})
    logger.info(
        "site %s round %s: %d steps, epsilon=%.4f",
        site.name,
        config.get("server-round"),
        outcome.steps,
        epsilon,
    )
    metrics = MetricRecord(
        {
            "num-examples": outcome.num_examples,
            "epsilon": epsilon,
            "delta": cfg.privacy.target_delta if sigma is not None else 0.0,
            "noise-multiplier": sigma or 0.0,
            "sample-rate": outcome.sample_rate,
            "steps": total_steps,
            "round-steps": outcome.steps,
        }
    )
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": metrics,
            "site": ConfigRecord({"name": site.name}),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
@refuses_cleanly
def evaluate_global(msg: Message, context: Context) -> Message:
    """Loss and accuracy of the received global model on the site's own test split."""
    cfg, site = _setup(context)
    model = _model_for(cfg, site, msg.content.array_records["arrays"])
    device = resolve_device(str(context.node_config.get("device", cfg.training.device)))
    loss, accuracy = evaluate(model, site.data.test_x, site.data.test_y, device=device)
    metrics = MetricRecord(
        {"num-examples": len(site.data.test_y), "loss": loss, "accuracy": accuracy}
    )
    content = RecordDict({"metrics": metrics, "site": ConfigRecord({"name": site.name})})
    return Message(content, reply_to=msg)
