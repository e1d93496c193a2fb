"""Test-only ClientApps: fedvault's own handlers, with one simulated site corrupting its updates.

Nothing in fedvault can select these: no config key, flag or coordinator message makes a
site misbehave. Only tests name them, through the Python-level
``simulate(..., clientapp="tests.misbehaving_client:<app>")``; Flower's processes import
this module from the repository root on PYTHONPATH.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from fedvault.client import app as fedvault_client
from fedvault.common.config import FedvaultConfig, parse_toml_text
from fedvault.common.validation import default_update_norm_bound

#: The simulated site that misbehaves (partition-id 4 is "site-5").
BAD_PARTITION = 4
BAD_SITE = "site-5"
#: ``poisoning``'s update has this share of the norm bound in force, so it passes validation.
POISON_SHARE_OF_BOUND = 0.9
#: ``poisoning`` without any norm bound in force: a scaled sign flip of the honest update.
POISON_FACTOR_UNBOUNDED = -10.0

Weights = dict[str, np.ndarray]
Corruption = Callable[[int, Weights, Weights, FedvaultConfig, MetricRecord], Weights]


def _norm(update: Weights, reference: Weights) -> float:
    return float(np.sqrt(sum(np.sum((update[k] - reference[k]) ** 2) for k in reference)))


def in_turn(server_round: int, sent: Weights, trained: Weights, *_: object) -> Weights:
    """Round 1: three NaN values; round 2: one row too many; round 3: the update scaled 1e6×.

    The first two corrupt the largest array (a model's weight matrix)."""
    largest = max(sorted(trained), key=lambda k: trained[k].size)
    if server_round == 1:
        bad = {k: v.copy() for k, v in trained.items()}
        bad[largest].flat[:3] = np.nan
        return bad
    if server_round == 2:
        bad = dict(trained)
        bad[largest] = np.concatenate([bad[largest], bad[largest][:1]])
        return bad
    if server_round == 3:
        return {k: (sent[k] + 1e6 * (v - sent[k])).astype(v.dtype) for k, v in trained.items()}
    return trained


def against_the_bound(
    server_round: int, sent: Weights, trained: Weights, cfg: FedvaultConfig, metrics: MetricRecord
) -> Weights:
    """Every round: the honest update reversed, scaled to just under the norm bound the
    coordinator applies (the explicit max-update-norm, or the DP-SGD bound for this site)."""
    del server_round
    bound = cfg.validation.max_update_norm
    if bound <= 0 and cfg.privacy.enabled:
        bound = default_update_norm_bound(
            num_params=sum(int(v.size) for v in sent.values()),
            num_examples=int(cast(float, metrics["num-examples"])),
            batch_size=cfg.training.batch_size,
            local_epochs=cfg.training.local_epochs,
            learning_rate=cfg.training.learning_rate,
            momentum=cfg.training.momentum,
            max_grad_norm=cfg.privacy.max_grad_norm,
            noise_multiplier=float(cast(float, metrics["noise-multiplier"])),
        )
    length = _norm(trained, sent)
    factor = (
        -POISON_SHARE_OF_BOUND * bound / length
        if bound > 0 and length > 0
        else POISON_FACTOR_UNBOUNDED
    )
    return {k: (sent[k] + factor * (v - sent[k])).astype(v.dtype) for k, v in trained.items()}


def _misbehaving_app(corrupt: Corruption) -> ClientApp:
    app = ClientApp()
    app.query("schema")(fedvault_client.schema)
    app.evaluate()(fedvault_client.evaluate_global)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = fedvault_client.train(msg, context)
        if reply.has_error() or int(str(context.node_config["partition-id"])) != BAD_PARTITION:
            return reply
        config = msg.content.config_records["config"]
        server_round = int(cast(int, config.get("server-round", 0)))
        sent = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
        trained = {k: v.numpy() for k, v in reply.content.array_records["arrays"].items()}
        cfg = parse_toml_text(str(context.run_config.get("scenario-toml", "")))
        metrics = reply.content.metric_records["metrics"]
        bad = corrupt(server_round, sent, trained, cfg, metrics)
        reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in bad.items()})
        return reply

    return app


#: NaN in round 1, a wrong shape in round 2, a 1e6× scaled update in round 3.
misbehaving = _misbehaving_app(in_turn)
#: A reversed update just within the norm bound, every round (model poisoning).
poisoning = _misbehaving_app(against_the_bound)
