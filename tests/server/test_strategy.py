"""Tests for server/strategy.py: the strategy registry and the per-site reporting wrapper.

Replies are built as the SuperLink delivers them to the ServerApp (with full metadata), and
``ReportingStrategy`` wraps a real Flower ``FedAvg``, so the aggregation checked here is
Flower's own, fed only the replies the wrapper lets through.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from common.config import STRATEGIES as CONFIG_STRATEGIES
from common.config import FedvaultConfig, parse_toml_text
from server.strategy import STRATEGIES, ReportingStrategy, build_strategy, site_of

pytestmark = pytest.mark.unit

_message_ids = itertools.count(1)
BUDGET_REASON = "PrivacyBudgetExceeded: site gamma refuses round 2: epsilon would reach 1.3"


def config(strategy: str, *, sites: int = 4, extra: str = "") -> FedvaultConfig:
    return parse_toml_text(
        f"""
[federation]
sites = {sites}
strategy = "{strategy}"
{extra}
"""
    )


def reply_metadata(node: int, message_type: str) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"reply-{next(_message_ids)}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="instruction",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )


def reply(node: int, content: RecordDict, message_type: str = "train") -> Message:
    """A site's reply as the SuperLink hands it to the ServerApp."""
    # `metadata=` is how Flower itself rebuilds a delivered message (absent from the overloads).
    return Message(content, metadata=reply_metadata(node, message_type))  # type: ignore[call-overload]


def error_reply(node: int, reason: str, message_type: str = "train") -> Message:
    error = Error(code=1005, reason=reason)
    return Message(error, metadata=reply_metadata(node, message_type))  # type: ignore[call-overload]


def arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "weight": rng.normal(size=(2, 3)).astype(np.float32),
        "bias": rng.normal(size=(2,)).astype(np.float32),
    }


def train_reply(
    node: int, site: str, weights: dict[str, np.ndarray], *, n: int, eps: float
) -> Message:
    metrics = MetricRecord(
        {"num-examples": n, "epsilon": eps, "noise-multiplier": 1.1, "steps": 7, "train-loss": 0.4}
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v.copy()) for k, v in weights.items()}),
            "metrics": metrics,
            "site": ConfigRecord({"name": site}),
        }
    )
    return reply(node, content, "train")


def eval_reply(node: int, site: str, *, n: int, accuracy: float, loss: float) -> Message:
    metrics = MetricRecord({"num-examples": n, "accuracy": accuracy, "loss": loss})
    content = RecordDict({"metrics": metrics, "site": ConfigRecord({"name": site})})
    return reply(node, content, "evaluate")


# --- build_strategy ------------------------------------------------------------------------------


def test_every_strategy_the_config_accepts_has_a_builder() -> None:
    # Assert: the config's list of names and the registry agree (no name that crashes at run time)
    assert set(CONFIG_STRATEGIES) == set(STRATEGIES)


@pytest.mark.parametrize(
    ("name", "expected"), [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam)]
)
def test_build_strategy_returns_flowers_strategy_sampling_every_site(
    name: str, expected: type[FedAvg]
) -> None:
    # Prepare
    cfg = config(name, sites=4)

    # Execute
    strategy = build_strategy(cfg)

    # Assert: the right Flower class, and every site trains and evaluates every round
    assert type(strategy) is expected
    assert isinstance(strategy, FedAvg)
    assert strategy.fraction_train == 1.0
    assert strategy.fraction_evaluate == 1.0
    assert strategy.min_train_nodes == 4
    assert strategy.min_evaluate_nodes == 4
    assert strategy.min_available_nodes == 4


def test_fedprox_takes_its_proximal_mu_from_the_config() -> None:
    # Execute
    strategy = build_strategy(config("fedprox", extra="proximal-mu = 0.37"))

    # Assert
    assert isinstance(strategy, FedProx)
    assert strategy.proximal_mu == pytest.approx(0.37)


def test_fedadam_takes_the_server_learning_rate_as_eta() -> None:
    # Execute
    strategy = build_strategy(config("fedadam", extra="server-learning-rate = 0.025"))

    # Assert
    assert isinstance(strategy, FedAdam)
    assert strategy.eta == pytest.approx(0.025)


# --- site_of -------------------------------------------------------------------------------------


def test_site_of_prefers_the_replys_own_site_record() -> None:
    # Prepare
    message = eval_reply(7, "alpha", n=10, accuracy=0.5, loss=1.0)

    # Execute / Assert: the record wins over the node-id map
    assert site_of(message, {7: "from-map"}) == "alpha"


def test_site_of_falls_back_to_the_node_id_map_then_to_the_node_id() -> None:
    # Prepare: an error reply carries no content, so no site record
    failed = error_reply(9, "boom")
    unnamed = reply(11, RecordDict({"metrics": MetricRecord({"num-examples": 1})}))

    # Execute / Assert
    assert site_of(failed, {9: "gamma"}) == "gamma"
    assert site_of(unnamed, {9: "gamma"}) == "node-11"
    assert site_of(failed, {}) == "node-9"


# --- ReportingStrategy ---------------------------------------------------------------------------


def test_aggregate_train_records_sites_and_failures_and_averages_only_good_replies() -> None:
    # Prepare: two good sites of different sizes and one that refuses (budget exhausted)
    w_alpha, w_beta = arrays(1), arrays(2)
    replies = [
        train_reply(101, "alpha", w_alpha, n=30, eps=0.41),
        error_reply(303, BUDGET_REASON),
        train_reply(202, "beta", w_beta, n=90, eps=0.52),
    ]
    names = {101: "alpha", 202: "beta", 303: "gamma"}
    strategy = ReportingStrategy(FedAvg(), names)

    # Execute
    aggregated, metrics = strategy.aggregate_train(2, replies)

    # Assert: per-site metrics under the site names, the failure with its reason
    assert set(strategy.train_metrics[2]) == {"alpha", "beta"}
    assert strategy.train_metrics[2]["alpha"]["epsilon"] == pytest.approx(0.41)
    assert strategy.train_metrics[2]["alpha"]["num-examples"] == 30
    assert strategy.train_metrics[2]["beta"]["epsilon"] == pytest.approx(0.52)
    assert strategy.train_metrics[2]["beta"]["steps"] == 7
    assert strategy.failures == {2: {"gamma": BUDGET_REASON}}
    assert strategy.eval_metrics == {}
    # Assert: arrays are the num-examples-weighted mean of alpha and beta only
    assert aggregated is not None
    result = {k: v.numpy() for k, v in aggregated.items()}
    assert set(result) == {"weight", "bias"}
    for key in result:
        expected = (30 * w_alpha[key] + 90 * w_beta[key]) / 120
        np.testing.assert_allclose(result[key], expected, rtol=1e-6, atol=1e-6)
        assert not np.allclose(result[key], (w_alpha[key] + w_beta[key]) / 2)  # weights matter
    assert metrics is not None
    assert metrics["epsilon"] == pytest.approx((30 * 0.41 + 90 * 0.52) / 120)


def test_aggregate_evaluate_records_sites_and_failures_and_averages_only_good_replies() -> None:
    # Prepare
    replies = [
        eval_reply(101, "alpha", n=10, accuracy=0.9, loss=0.2),
        eval_reply(202, "beta", n=30, accuracy=0.5, loss=0.8),
        error_reply(303, "DataError: site gamma could not read its data", "evaluate"),
    ]
    strategy = ReportingStrategy(FedAvg(), {303: "gamma"})

    # Execute
    metrics = strategy.aggregate_evaluate(0, replies)

    # Assert
    assert strategy.eval_metrics[0] == {
        "alpha": {"num-examples": 10.0, "accuracy": pytest.approx(0.9), "loss": pytest.approx(0.2)},
        "beta": {"num-examples": 30.0, "accuracy": pytest.approx(0.5), "loss": pytest.approx(0.8)},
    }
    assert strategy.failures == {0: {"gamma": "DataError: site gamma could not read its data"}}
    assert strategy.train_metrics == {}
    assert metrics is not None
    assert metrics["accuracy"] == pytest.approx((10 * 0.9 + 30 * 0.5) / 40)
    assert metrics["loss"] == pytest.approx((10 * 0.2 + 30 * 0.8) / 40)


def test_a_failure_without_a_reason_is_recorded_by_its_error_code() -> None:
    # Prepare
    failed = Message(Error(code=1008), metadata=reply_metadata(5, "train"))  # type: ignore[call-overload]
    strategy = ReportingStrategy(FedAvg(), {})

    # Execute
    aggregated, _ = strategy.aggregate_train(1, [failed])

    # Assert: nothing to aggregate, and the site is still reported as failed
    assert aggregated is None
    assert strategy.failures == {1: {"node-5": "error code 1008"}}


def test_rounds_are_kept_apart() -> None:
    # Prepare
    strategy = ReportingStrategy(FedAvg(), {})

    # Execute
    strategy.aggregate_evaluate(1, [eval_reply(1, "alpha", n=10, accuracy=0.6, loss=0.5)])
    strategy.aggregate_evaluate(2, [eval_reply(1, "alpha", n=10, accuracy=0.7, loss=0.4)])

    # Assert
    assert strategy.eval_metrics[1]["alpha"]["accuracy"] == pytest.approx(0.6)
    assert strategy.eval_metrics[2]["alpha"]["accuracy"] == pytest.approx(0.7)
