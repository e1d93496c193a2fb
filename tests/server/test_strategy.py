"""Tests for server/strategy.py: the strategy registry and the per-site reporting wrapper.

Replies are built as the SuperLink delivers them to the ServerApp (with full metadata), and
``ReportingStrategy`` wraps a real Flower ``FedAvg``, so the aggregation checked here is
Flower's own, fed only the replies the wrapper lets through.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import cast

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod
from flwr.supercore.task_identity import TaskIdentity

from fedvault.common.config import STRATEGIES as CONFIG_STRATEGIES
from fedvault.common.config import FedvaultConfig, parse_toml_text
from fedvault.common.errors import (
    BUDGET_REFUSAL_CODE,
    LEDGER_REFUSAL_CODE,
    POLICY_REFUSAL_CODE,
    ConfigError,
    FederationError,
    UpdateRejected,
)
from fedvault.common.validation import default_update_norm_bound, steps_for
from fedvault.server.ledger_watch import LedgerWatch, SeenLedger
from fedvault.server.strategy import (
    LEDGER_SEEN,
    LEDGER_STATUS,
    STRATEGIES,
    ReportingStrategy,
    build_strategy,
    central_dp_report,
    site_of,
)
from fedvault.server.update_validation import UpdateValidation, noise_multiplier_ceiling

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

    # Assert: the right Flower class; every connected site trains and evaluates every round,
    # and Flower never waits for more than min-sites (a site that is gone cannot block it)
    assert type(strategy) is expected
    assert isinstance(strategy, FedAvg)
    assert strategy.fraction_train == 1.0
    assert strategy.fraction_evaluate == 1.0
    assert strategy.min_train_nodes == cfg.federation.min_sites == 1
    assert strategy.min_evaluate_nodes == 1
    assert strategy.min_available_nodes == 1


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


def test_site_of_trusts_the_node_id_over_the_name_a_reply_claims() -> None:
    # Prepare: node 7 answered the schema query as "from-map", then claims to be "alpha"
    message = eval_reply(7, "alpha", n=10, accuracy=0.5, loss=1.0)

    # Execute / Assert: a site cannot file its replies under another site's name; a node
    # that joined after the schema query is named by its own record
    assert site_of(message, {7: "from-map"}) == "from-map"
    assert site_of(message, {}) == "alpha"


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


def counts_reply(node: int, site: str, confusion: list[int]) -> Message:
    metrics = MetricRecord(
        {"num-examples": sum(confusion), "accuracy": 0.5, "loss": 0.7, "confusion": confusion}
    )
    content = RecordDict({"metrics": metrics, "site": ConfigRecord({"name": site})})
    return reply(node, content, "evaluate")


def test_aggregate_evaluate_keeps_each_sites_counts_and_leaves_an_odd_one_out() -> None:
    # Prepare: beta's confusion matrix has another size (Flower would abort the average)
    replies = [
        counts_reply(101, "alpha", [3, 1, 2, 4]),
        counts_reply(202, "beta", [3, 1, 2, 4, 0, 0, 0, 0, 1]),
        counts_reply(303, "gamma", [5, 0, 0, 5]),
    ]
    strategy = ReportingStrategy(FedAvg(), {})

    # Execute
    metrics = strategy.aggregate_evaluate(1, replies)

    # Assert: the counts are recorded as lists; the average is of scalars only
    assert strategy.eval_metrics[1]["alpha"]["confusion"] == [3.0, 1.0, 2.0, 4.0]
    assert strategy.eval_metrics[1]["beta"]["confusion"][-1] == 1.0
    assert metrics is not None
    assert "confusion" not in metrics
    assert metrics["loss"] == pytest.approx(0.7)
    assert strategy.failures == {}


def test_a_failure_without_a_reason_is_recorded_by_its_error_code() -> None:
    # Prepare
    failed = Message(Error(code=1008), metadata=reply_metadata(5, "train"))  # type: ignore[call-overload]
    ok = train_reply(6, "beta", {"w": np.ones(3)}, n=10, eps=0.5)
    strategy = ReportingStrategy(FedAvg(), {})

    # Execute
    aggregated, _ = strategy.aggregate_train(1, [failed, ok])

    # Assert: the other site is aggregated, and the failed one is reported by its code
    assert aggregated is not None
    assert strategy.failures == {1: {"node-5": "error code 1008"}}
    assert strategy.refusals == {}


def test_a_budget_refusal_is_recorded_apart_from_failures_and_the_round_goes_on() -> None:
    # Prepare: one site refuses (privacy budget), one trains
    reason = "PrivacyBudgetExceeded: site alpha refuses round 2: privacy budget exhausted"
    refused = Message(
        Error(code=BUDGET_REFUSAL_CODE, reason=reason), metadata=reply_metadata(1, "train")
    )  # type: ignore[call-overload]
    strategy = ReportingStrategy(FedAvg(), {1: "alpha"}, min_sites=1)

    # Execute
    aggregated, _ = strategy.aggregate_train(
        2, [refused, train_reply(2, "beta", {"w": np.ones(3)}, n=10, eps=0.5)]
    )

    # Assert
    assert aggregated is not None
    assert strategy.refusals == {2: {"alpha": reason}}
    assert strategy.failures == {2: {"alpha": reason}}


def test_too_few_updates_end_the_run_naming_who_refused() -> None:
    # Prepare: two of three sites refuse, min_sites is 2
    replies = [
        Message(Error(code=BUDGET_REFUSAL_CODE, reason=f"site {name}: privacy budget exhausted"),
                metadata=reply_metadata(node, "train"))  # type: ignore[call-overload]
        for node, name in ((1, "alpha"), (2, "beta"))
    ] + [train_reply(3, "gamma", {"w": np.ones(3)}, n=10, eps=0.5)]  # fmt: skip
    strategy = ReportingStrategy(FedAvg(), {1: "alpha", 2: "beta"}, min_sites=2)

    # Execute / Assert
    with pytest.raises(FederationError) as raised:
        strategy.aggregate_train(4, replies)
    message = str(raised.value)
    assert "round 4 ended the run: 1 site(s) sent an update, min_sites is 2" in message
    assert "alpha: site alpha: privacy budget exhausted" in message and "beta" in message
    assert set(strategy.refusals[4]) == {"alpha", "beta"}


def test_rounds_are_kept_apart() -> None:
    # Prepare
    strategy = ReportingStrategy(FedAvg(), {})

    # Execute
    strategy.aggregate_evaluate(1, [eval_reply(1, "alpha", n=10, accuracy=0.6, loss=0.5)])
    strategy.aggregate_evaluate(2, [eval_reply(1, "alpha", n=10, accuracy=0.7, loss=0.4)])

    # Assert
    assert strategy.eval_metrics[1]["alpha"]["accuracy"] == pytest.approx(0.6)
    assert strategy.eval_metrics[2]["alpha"]["accuracy"] == pytest.approx(0.7)


# --- central DP (Flower's server-side fixed clipping + RDP accounting) -----------------------


def central_config(*, sites: int, sigma: float, clip: float, delta: float = 1e-5) -> FedvaultConfig:
    return config(
        "fedavg",
        sites=sites,
        extra=f"""
[privacy]
target-delta = {delta}
central = true
central-noise-multiplier = {sigma}
central-clipping-norm = {clip}
""",
    )


@pytest.fixture
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The task identity Flower sets in a ServerApp process (configure_train's Messages use it)."""
    for attribute, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attribute, value)


class NodesGrid:
    """Just enough of a Grid for Flower's FedAvg.configure_train: the connected node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def unit_weight_reply(node: int, weights: dict[str, np.ndarray], *, n: int) -> Message:
    """A site's train reply as client/app.py sends it: one MetricRecord with unit-weight 1.0."""
    metrics = MetricRecord({"num-examples": n, "unit-weight": 1.0, "epsilon": 0.3})
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v.copy()) for k, v in weights.items()}),
            "metrics": metrics,
            "site": ConfigRecord({"name": f"site-{node}"}),
        }
    )
    return reply(node, content, "train")


def configure(
    strategy: DifferentialPrivacyServerSideFixedClipping | ReportingStrategy,
    server_round: int,
    global_weights: dict[str, np.ndarray],
    nodes: list[int],
) -> None:
    """Run configure_train as Strategy.start does (sets the global model and the round's event)."""
    arrays = ArrayRecord({k: Array(v.copy()) for k, v in global_weights.items()})
    messages = strategy.configure_train(
        server_round, arrays, ConfigRecord(), cast(Grid, NodesGrid(nodes))
    )
    assert len(list(messages)) == len(nodes)


def independent_rdp_epsilon(sigma: float, releases: int, delta: float) -> float:
    """Google dp-accounting directly: one Gaussian mechanism composed ``releases`` times."""
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(sigma), releases)
    return float(accountant.get_epsilon(delta))


def test_build_strategy_with_central_dp_wraps_fedavg_weighted_by_unit_weight() -> None:
    # Execute
    strategy = build_strategy(central_config(sites=3, sigma=0.7, clip=2.5, delta=1e-6))

    # Assert: Flower's own wrapper around a plain, equally weighted FedAvg sampling every site
    assert type(strategy) is DifferentialPrivacyServerSideFixedClipping
    inner = strategy.strategy
    assert isinstance(inner, FedAvg)
    assert type(inner).aggregate_train is FedAvg.aggregate_train  # Flower's own averaging
    assert inner.weighted_by_key == "unit-weight"
    assert inner.fraction_train == 1.0 and inner.min_train_nodes == 3
    assert strategy.noise_multiplier == 0.7
    assert strategy.clipping_norm == 2.5
    assert strategy.num_sampled_clients == 3
    # Assert: site-level accounting without amplification, over the sites, at the run's delta
    assert strategy.accountant is not None
    accounting = strategy.accountant.config
    assert accounting.sampling_method is SamplingMethod.NO_AMPLIFICATION
    assert accounting.neighboring_relation is NeighboringRelation.ADD_OR_REMOVE_ONE
    assert accounting.population_size == 3
    assert accounting.target_delta == 1e-6


def test_central_dp_evaluation_averages_metrics_by_examples_without_unit_weight() -> None:
    # Prepare: evaluation replies as client/app.py sends them (num-examples, no unit-weight)
    strategy = build_strategy(central_config(sites=2, sigma=1.0, clip=1.0))
    replies = [
        eval_reply(1, "alpha", n=10, accuracy=0.9, loss=0.2),
        eval_reply(2, "beta", n=30, accuracy=0.5, loss=0.8),
    ]

    # Execute
    metrics = strategy.aggregate_evaluate(1, replies)

    # Assert
    assert metrics is not None
    assert metrics["accuracy"] == pytest.approx((10 * 0.9 + 30 * 0.5) / 40)


def test_without_central_dp_fedavg_is_weighted_by_examples_and_there_is_no_report() -> None:
    # Execute
    strategy = build_strategy(config("fedavg"))

    # Assert
    assert type(strategy) is FedAvg
    assert strategy.weighted_by_key == "num-examples"
    assert central_dp_report(strategy) is None


@pytest.mark.parametrize("name", ["fedprox", "fedadam"])
def test_central_dp_with_another_strategy_is_a_config_error(name: str) -> None:
    # Prepare: a config that bypassed parse() (dataclasses.replace), so build_strategy must check
    cfg = central_config(sites=3, sigma=1.0, clip=1.0)
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, strategy=name))

    # Execute / Assert: refused by build_strategy, and already when the config is validated
    with pytest.raises(ConfigError, match=f"central DP needs strategy fedavg, got '{name}'"):
        build_strategy(cfg)
    with pytest.raises(ConfigError, match=f"got '{name}'"):
        config(name, extra="[privacy]\ncentral = true")


@pytest.mark.usefixtures("serverapp_identity")
def test_central_dp_adds_gaussian_noise_of_std_sigma_clip_over_sites() -> None:
    # Prepare: 4 sites with small updates (norm well below C, so none is clipped)
    sites, sigma, clip = 4, 0.8, 2.0
    np.random.seed(1234)  # Flower draws the noise from numpy's global generator
    rng = np.random.default_rng(7)
    global_weights = {"w": np.zeros((100, 100), dtype=np.float64)}
    updates = [{"w": rng.normal(scale=1e-3, size=(100, 100))} for _ in range(sites)]
    assert all(np.linalg.norm(u["w"]) < clip for u in updates)
    strategy = build_strategy(central_config(sites=sites, sigma=sigma, clip=clip))
    assert isinstance(strategy, DifferentialPrivacyServerSideFixedClipping)
    configure(strategy, 1, global_weights, [1, 2, 3, 4])
    replies = [
        unit_weight_reply(node, u, n=10 * node)
        for node, u in zip([1, 2, 3, 4], updates, strict=True)
    ]

    # Execute
    aggregated, metrics = strategy.aggregate_train(1, replies)

    # Assert: result = equal-weight mean + N(0, (sigma*C/n)^2) noise, element by element
    assert aggregated is not None and metrics is not None
    mean = np.mean([u["w"] for u in updates], axis=0)
    noise = aggregated["w"].numpy() - mean
    expected_std = sigma * clip / sites
    assert abs(noise.std() - expected_std) < 0.1 * expected_std
    assert abs(noise.mean()) < 0.05 * expected_std
    assert noise.std() > 100 * np.abs(mean).max()  # the noise dominates these tiny updates


@pytest.mark.usefixtures("serverapp_identity")
def test_central_dp_clips_each_update_above_the_clipping_norm_and_weights_sites_equally() -> None:
    # Prepare: site 1's update has norm 10, site 2's norm 0.5, C = 1; noise made negligible
    clip = 1.0
    global_weights = {"w": np.full((2, 2), 3.0), "b": np.zeros(2)}
    big = {"w": global_weights["w"] + 5.0, "b": np.zeros(2)}  # update norm sqrt(4 * 25) = 10
    small = {"w": global_weights["w"].copy(), "b": np.array([0.3, 0.4])}  # update norm 0.5
    strategy = build_strategy(central_config(sites=2, sigma=1e-4, clip=clip))
    assert isinstance(strategy, DifferentialPrivacyServerSideFixedClipping)
    configure(strategy, 1, global_weights, [1, 2])

    # Execute: very different example counts, which must not matter under central DP
    aggregated, _ = strategy.aggregate_train(
        1, [unit_weight_reply(1, big, n=1000), unit_weight_reply(2, small, n=10)]
    )

    # Assert: site 1's update scaled down to norm C (each w entry +0.5), site 2's kept; mean of 2
    assert aggregated is not None
    np.testing.assert_allclose(aggregated["w"].numpy(), np.full((2, 2), 3.0 + 0.5 / 2), atol=1e-3)
    np.testing.assert_allclose(aggregated["b"].numpy(), [0.15, 0.2], atol=1e-3)


@pytest.mark.usefixtures("serverapp_identity")
def test_central_dp_report_epsilon_matches_dp_accounting_and_grows_with_rounds() -> None:
    # Prepare
    sites, sigma, delta = 3, 1.3, 1e-5
    strategy = build_strategy(central_config(sites=sites, sigma=sigma, clip=1.0, delta=delta))
    global_weights = arrays(0)
    epsilons: list[float] = []

    # Execute: three rounds, as Strategy.start drives them
    for server_round in (1, 2, 3):
        configure(strategy, server_round, global_weights, [1, 2, 3])
        replies = [unit_weight_reply(node, arrays(node), n=20) for node in (1, 2, 3)]
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        assert aggregated is not None
        report = central_dp_report(strategy)
        assert report is not None
        epsilons.append(report["epsilon"])

        # Assert: Flower's epsilon is dp-accounting's for `server_round` Gaussian releases
        expected = independent_rdp_epsilon(sigma, server_round, delta)
        assert report["epsilon"] == pytest.approx(expected, rel=1e-6)
        assert report["releases"] == server_round

    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert report == {
        "noise_multiplier": sigma,
        "clipping_norm": 1.0,
        "epsilon": epsilons[2],
        "delta": delta,
        "releases": 3,
        "accounting": "rdp",
        "level": "site",
    }


@pytest.mark.usefixtures("serverapp_identity")
def test_a_central_dp_round_with_a_failed_site_is_not_released_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: round 1 complete, round 2 with one of three sites refusing
    strategy = ReportingStrategy(
        build_strategy(central_config(sites=3, sigma=1.0, clip=1.0)), {3: "gamma"}
    )
    configure(strategy, 1, arrays(0), [1, 2, 3])
    strategy.aggregate_train(1, [unit_weight_reply(n, arrays(n), n=5) for n in (1, 2, 3)])
    released = central_dp_report(strategy.inner)
    configure(strategy, 2, arrays(0), [1, 2, 3])
    replies = [unit_weight_reply(1, arrays(1), n=5), unit_weight_reply(2, arrays(2), n=5)]

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedvault.server.strategy"):
        aggregated, metrics = strategy.aggregate_train(2, [*replies, error_reply(3, "boom")])

    # Assert: no model update, no epsilon spent, the failure recorded and the round named
    assert (aggregated, metrics) == (None, None)
    assert released is not None and released["releases"] == 1
    assert central_dp_report(strategy.inner) == released
    assert strategy.failures == {2: {"gamma": "boom"}}
    assert any(
        "round 2: only 2 of 3 sites replied" in r.getMessage() and "not updated" in r.getMessage()
        for r in caplog.records
    )


# --- update validation before aggregation ------------------------------------------------------


def global_model() -> dict[str, np.ndarray]:
    """A logistic model of 30 features and 2 classes, as the hospitals train."""
    rng = np.random.default_rng(0)
    return {
        "0.weight": rng.normal(size=(2, 30)).astype(np.float32),
        "0.bias": rng.normal(size=(2,)).astype(np.float32),
    }


def trained(global_weights: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """An honest site's model: the global model moved a little (‖Δ‖ ≈ 0.4)."""
    rng = np.random.default_rng(seed)
    return {
        k: (v + rng.normal(scale=0.05, size=v.shape)).astype(np.float32)
        for k, v in global_weights.items()
    }


def site_reply(node: int, site: str, weights: dict[str, np.ndarray], **metrics: float) -> Message:
    """A train reply shaped like client/app.py's: arrays, metrics, the site's name."""
    values: dict[str, float] = {
        "num-examples": 120, "epsilon": 0.3, "noise-multiplier": 1.0, "sample-rate": 0.25,
        "round-steps": 4,
    }  # fmt: skip
    values.update(metrics)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v.copy()) for k, v in weights.items()}),
            "metrics": MetricRecord(values),  # type: ignore[arg-type]
            "site": ConfigRecord({"name": site}),
        }
    )
    return reply(node, content, "train")


def dp_config(*, sites: int = 5, strategy: str = "fedavg", privacy: str = "") -> FedvaultConfig:
    """DP-SGD with a fixed sigma = 1 (unless ``privacy`` says otherwise), 1 epoch, B = 32."""
    return config(strategy, sites=sites, extra=f"[privacy]\n{privacy or 'noise-multiplier = 1.0'}")


def norm_of(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    return float(
        np.sqrt(sum(np.sum((update[k].astype(np.float64) - reference[k]) ** 2) for k in reference))
    )


@pytest.mark.usefixtures("serverapp_identity")
def test_nan_wrong_shape_and_scaled_updates_are_rejected_with_their_reason_and_excluded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: two honest sites and three that misbehave, DP-SGD's derived norm bound
    cfg = dp_config()
    start = global_model()
    alpha, beta = trained(start, 1), trained(start, 2)
    nan = trained(start, 3)
    nan["0.weight"][1, :3] = np.nan
    wrong_shape = {"0.weight": np.zeros((3, 30), dtype=np.float32), "0.bias": start["0.bias"]}
    scaled = {k: start[k] + 1e6 * (v - start[k]) for k, v in trained(start, 5).items()}
    names = {1: "alpha", 2: "beta", 3: "gamma", 4: "delta", 5: "omega"}
    strategy = ReportingStrategy(
        build_strategy(cfg), names, validation=UpdateValidation.from_config(cfg)
    )
    configure(strategy, 1, start, list(names))
    bound = strategy.validation.bound_for(MetricRecord({"num-examples": 120}), 62)
    replies = [
        site_reply(1, "alpha", alpha, **{"num-examples": 100}),
        site_reply(3, "gamma", nan),
        site_reply(4, "delta", wrong_shape),
        site_reply(5, "omega", scaled),
        site_reply(2, "beta", beta, **{"num-examples": 140}),
    ]

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedvault.server.strategy"):
        aggregated, metrics = strategy.aggregate_train(1, replies)

    # Assert: each misbehaving site rejected with its own reason, recorded and logged
    assert bound is not None and 1.0 < bound < 20.0
    rejected = strategy.rejections[1]
    assert set(rejected) == {"gamma", "delta", "omega"}
    assert rejected["gamma"] == "non-finite values in '0.weight': 3 of 60"
    assert rejected["delta"] == "shape of '0.weight' is (3, 30), the global model's is (2, 30)"
    assert rejected["omega"].startswith("update norm ")
    assert rejected["omega"].endswith(f"is above the bound {bound:.4g}")
    assert float(rejected["omega"].split()[2]) > 1e5
    assert strategy.failures[1] == {s: f"update rejected: {r}" for s, r in rejected.items()}
    for site, reason in rejected.items():
        assert f"round 1: update from site {site} rejected: {reason}" in caplog.text
    # Assert: the aggregate is exactly the example-weighted mean of the two honest sites
    assert aggregated is not None and metrics is not None
    for key in start:
        result = aggregated[key].numpy()
        assert np.all(np.isfinite(result))
        np.testing.assert_allclose(result, (100 * alpha[key] + 140 * beta[key]) / 240, rtol=1e-6)
    assert strategy.update_norms[1] == {
        "alpha": pytest.approx(norm_of(alpha, start), rel=1e-6),
        "beta": pytest.approx(norm_of(beta, start), rel=1e-6),
    }


@pytest.mark.usefixtures("serverapp_identity")
def test_rejections_count_against_min_sites_and_the_error_names_them() -> None:
    # Prepare
    start = global_model()
    nan = {k: np.full_like(v, np.nan) for k, v in start.items()}
    strategy = ReportingStrategy(FedAvg(), {}, min_sites=2)
    configure(strategy, 3, start, [1, 2])

    # Execute / Assert
    with pytest.raises(FederationError) as raised:
        strategy.aggregate_train(
            3, [site_reply(1, "alpha", trained(start, 1)), site_reply(2, "beta", nan)]
        )
    assert "1 site(s) sent an update, min_sites is 2" in str(raised.value)
    assert "beta: update rejected: non-finite values in '0.bias': 2 of 2" in str(raised.value)


@pytest.mark.usefixtures("serverapp_identity")
def test_replies_flower_could_not_aggregate_are_rejected_instead_of_ending_the_round() -> None:
    # Prepare: a NaN weight (FedAvg would produce a NaN model), an odd metric (Flower aborts
    # the whole round when metric names differ), and an unreadable array payload
    start = global_model()
    garbage = site_reply(5, "epsilon", trained(start, 5))
    junk = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"not an array")
    garbage.content.array_records["arrays"]["0.bias"] = junk
    replies = [
        site_reply(1, "alpha", trained(start, 1)),
        site_reply(2, "beta", trained(start, 2), **{"num-examples": float("nan")}),
        site_reply(3, "gamma", trained(start, 3), **{"extra": 1.0}),
        site_reply(4, "delta", trained(start, 4)),
        garbage,
    ]
    strategy = ReportingStrategy(FedAvg(), {})
    configure(strategy, 1, start, [1, 2, 3, 4, 5])

    # Execute
    aggregated, _ = strategy.aggregate_train(1, replies)

    # Assert
    rejected = strategy.rejections[1]
    assert set(rejected) == {"beta", "gamma", "epsilon"}
    assert rejected["beta"] == "metric 'num-examples' must be a finite number > 0"
    assert rejected["gamma"] == "metrics ['extra'] differ from the other sites'"
    assert rejected["epsilon"] == "arrays could not be decoded (ValueError)"
    # Assert: alpha and delta were aggregated, and the result is finite
    assert aggregated is not None
    assert all(np.all(np.isfinite(aggregated[k].numpy())) for k in start)
    assert set(strategy.update_norms[1]) == {"alpha", "delta", "gamma"}  # gamma's arrays were fine


def test_without_a_recorded_global_model_finiteness_is_still_checked() -> None:
    # Prepare: aggregate_train driven by hand, configure_train never ran
    strategy = ReportingStrategy(FedAvg(), {})
    nan = {"w": np.array([1.0, np.nan])}

    # Execute
    aggregated, _ = strategy.aggregate_train(
        1,
        [
            train_reply(1, "alpha", {"w": np.ones(2)}, n=10, eps=0.1),
            train_reply(2, "b", nan, n=10, eps=0.1),
        ],
    )

    # Assert
    assert strategy.rejections == {1: {"b": "non-finite values in 'w': 1 of 2"}}
    assert aggregated is not None
    np.testing.assert_array_equal(aggregated["w"].numpy(), np.ones(2))


@pytest.mark.usefixtures("serverapp_identity")
def test_with_validation_off_a_nan_update_reaches_the_aggregate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    cfg = config("fedavg", extra="[validation]\nenabled = false")
    start = global_model()
    nan = {k: np.full_like(v, np.nan) for k, v in start.items()}
    with caplog.at_level(logging.WARNING, logger="fedvault.server.strategy"):
        strategy = ReportingStrategy(FedAvg(), {}, validation=UpdateValidation.from_config(cfg))
    configure(strategy, 1, start, [1, 2])

    # Execute
    aggregated, _ = strategy.aggregate_train(
        1, [site_reply(1, "alpha", trained(start, 1)), site_reply(2, "beta", nan)]
    )

    # Assert: nothing rejected, and the switch is loud
    assert strategy.rejections == {}
    assert aggregated is not None and np.isnan(aggregated["0.bias"].numpy()).all()
    assert "update validation is OFF" in caplog.text


def test_the_norm_bound_comes_from_max_update_norm_or_dp_sgd_or_is_absent() -> None:
    metrics = MetricRecord({"num-examples": 120, "noise-multiplier": 1.0})

    explicit = UpdateValidation.from_config(
        config("fedavg", extra="[validation]\nmax-update-norm = 3.5")
    )
    no_dp = UpdateValidation.from_config(config("fedavg", extra="[privacy]\nenabled = false"))
    derived = UpdateValidation.from_config(dp_config())

    assert explicit.bound_for(metrics, 62) == 3.5
    assert no_dp.bound_for(metrics, 62) is None
    assert derived.bound_for(metrics, 62) == pytest.approx(
        default_update_norm_bound(
            num_params=62,
            num_examples=120,
            batch_size=32,
            local_epochs=1,
            learning_rate=0.5,
            momentum=0.0,
            max_grad_norm=1.0,
            noise_multiplier=1.0,
        )
    )


def test_a_site_cannot_loosen_its_own_bound_by_what_it_reports() -> None:
    # Prepare: sigma is fixed by the config; then calibrated by the sites for a target epsilon
    fixed = UpdateValidation.from_config(dp_config())
    target = UpdateValidation.from_config(dp_config(privacy="target-epsilon = 1.0"))
    honest = {"num-examples": 120, "noise-multiplier": 1.0, "sample-rate": 0.25, "round-steps": 4}
    inflated = {**honest, "noise-multiplier": 1000.0, "sample-rate": 1.0, "round-steps": 10**6}
    q, steps = steps_for(120, 32, 1)
    ceiling = noise_multiplier_ceiling(
        target_epsilon=1.0, delta=1e-5, sample_rate=q, steps=5 * steps, accountant="prv"
    )

    def bound(validation: UpdateValidation, metrics: dict[str, float]) -> float | None:
        return validation.bound_for(MetricRecord(metrics), 62)  # type: ignore[arg-type]

    # Execute / Assert: a fixed sigma is the config's; q and steps follow from n and the config
    assert bound(fixed, inflated) == bound(fixed, honest)
    # Assert: a reported sigma counts only up to what the target epsilon allows n rows
    assert 1.0 < ceiling < 50.0
    assert bound(target, inflated) == pytest.approx(
        bound(target, {**honest, "noise-multiplier": ceiling})
    )
    assert bound(target, honest) < bound(target, inflated)  # type: ignore[operator]
    with pytest.raises(UpdateRejected, match=r"reports no valid num-examples \(got None\)"):
        bound(fixed, {"noise-multiplier": 1.0})


def test_warm_up_computes_the_ceilings_round_one_will_need() -> None:
    # Prepare: sites of 130 and 170 rows (sizes no other test uses), sigma from a target
    target = UpdateValidation.from_config(dp_config(privacy="target-epsilon = 1.5"))
    noise_multiplier_ceiling.cache_clear()

    # Execute
    target.warm_up([130, 170, 130])
    warmed = noise_multiplier_ceiling.cache_info()
    target.bound_for(MetricRecord({"num-examples": 170, "noise-multiplier": 1.0}), 62)

    # Assert: one calibration per distinct size, and round one's bound found it cached
    assert (warmed.misses, warmed.currsize) == (2, 2)
    after = noise_multiplier_ceiling.cache_info()
    assert (after.hits, after.misses) == (warmed.hits + 1, 2)
    # a fixed sigma needs no calibration
    noise_multiplier_ceiling.cache_clear()
    UpdateValidation.from_config(dp_config()).warm_up([130])
    assert noise_multiplier_ceiling.cache_info().currsize == 0


# --- robust aggregation: Flower's FedTrimmedAvg, FedMedian, Krum --------------------------------


def test_build_strategy_builds_flowers_robust_strategies_with_the_configured_parameters() -> None:
    # Execute
    trimmed = build_strategy(config("trimmed-mean", sites=5, extra="trim-fraction = 0.3"))
    median = build_strategy(config("median", sites=5))
    krum = build_strategy(config("krum", sites=7, extra="krum-byzantine = 2"))

    # Assert
    assert type(trimmed) is FedTrimmedAvg and trimmed.beta == pytest.approx(0.3)
    assert type(median) is FedMedian
    assert type(krum) is Krum and krum.num_malicious_nodes == 2 and krum.num_nodes_to_select == 1
    for strategy in (trimmed, median, krum):
        assert isinstance(strategy, FedAvg) and strategy.fraction_train == 1.0


def test_an_unknown_strategy_that_bypassed_the_config_lists_the_valid_names() -> None:
    cfg = config("fedavg")
    cfg = dataclasses.replace(
        cfg, federation=dataclasses.replace(cfg.federation, strategy="bulyan")
    )

    with pytest.raises(ConfigError, match="unknown strategy 'bulyan'; choose one of: fedavg, "):
        build_strategy(cfg)


Weights = dict[str, np.ndarray]


def poisoned_round(
    strategy_name: str, start: Weights
) -> tuple[ReportingStrategy, list[Weights], Weights]:
    """Five sites, the last poisoned: it sends 0.9 × the norm bound against the honest
    direction, so validation (on, DP-SGD bound) lets it through."""
    cfg = dp_config(strategy=strategy_name, sites=5)
    strategy = ReportingStrategy(
        build_strategy(cfg), {}, validation=UpdateValidation.from_config(cfg)
    )
    honest = [trained({k: v + 0.2 for k, v in start.items()}, seed) for seed in range(1, 5)]
    bound = strategy.validation.bound_for(MetricRecord({"num-examples": 120}), 62)
    assert bound is not None
    direction = {k: np.mean([h[k] for h in honest], axis=0) - start[k] for k in start}
    length = norm_of({k: start[k] + direction[k] for k in start}, start)
    poison = {k: (start[k] - 0.9 * bound / length * direction[k]).astype(np.float32) for k in start}
    return strategy, honest, poison


@pytest.mark.usefixtures("serverapp_identity")
def test_krum_picks_an_honest_update_when_one_of_five_is_poisoned() -> None:
    # Prepare
    start = global_model()
    strategy, honest, poison = poisoned_round("krum", start)
    configure(strategy, 1, start, [1, 2, 3, 4, 5])
    replies = [site_reply(i + 1, f"site-{i + 1}", w) for i, w in enumerate([*honest, poison])]

    # Execute
    aggregated, _ = strategy.aggregate_train(1, replies)

    # Assert: the poison passed validation, and Krum returned exactly one honest site's model
    assert strategy.rejections == {}
    assert aggregated is not None
    chosen = {k: aggregated[k].numpy() for k in start}
    matches = [
        i for i, h in enumerate(honest) if all(np.array_equal(chosen[k], h[k]) for k in start)
    ]
    assert len(matches) == 1


@pytest.mark.usefixtures("serverapp_identity")
@pytest.mark.parametrize("name", ["trimmed-mean", "median"])
def test_trimmed_mean_and_median_stay_within_the_honest_updates_while_fedavg_is_dragged_off(
    name: str,
) -> None:
    # Prepare
    start = global_model()
    robust, honest, poison = poisoned_round(name, start)
    plain, _, _ = poisoned_round("fedavg", start)
    for strategy in (robust, plain):
        configure(strategy, 1, start, [1, 2, 3, 4, 5])

    # Execute
    results = {}
    for label, strategy in (("robust", robust), ("fedavg", plain)):
        replies = [site_reply(i + 1, f"site-{i + 1}", w) for i, w in enumerate([*honest, poison])]
        aggregated, _ = strategy.aggregate_train(1, replies)
        assert aggregated is not None
        results[label] = {k: aggregated[k].numpy() for k in start}

    # Assert: every coordinate of the robust aggregate lies within the honest sites' range;
    # FedAvg's moves the model against the honest direction
    for key in start:
        low = np.min([h[key] for h in honest], axis=0)
        high = np.max([h[key] for h in honest], axis=0)
        assert np.all(
            (results["robust"][key] >= low - 1e-6) & (results["robust"][key] <= high + 1e-6)
        )
    honest_mean = {k: np.mean([h[k] for h in honest], axis=0) for k in start}
    assert norm_of(results["robust"], honest_mean) < 0.5
    assert norm_of(results["fedavg"], honest_mean) > 1.0


# --- identity from authentication, row counts from the schema step -----------------------------


def test_a_site_claiming_100x_its_schema_rows_gets_no_more_weight_than_its_schema_rows() -> None:
    # Prepare: alpha reported 30 training rows at the schema step, now claims 3,000
    w_alpha, w_beta = arrays(1), arrays(2)
    names = {101: "alpha", 202: "beta"}
    strategy = ReportingStrategy(
        FedAvg(), names, schema_rows={"alpha": 30, "beta": 90}, max_site_rows=1_000_000
    )
    replies = [
        train_reply(101, "alpha", w_alpha, n=3000, eps=0.4),
        train_reply(202, "beta", w_beta, n=90, eps=0.4),
    ]

    # Execute
    aggregated, _ = strategy.aggregate_train(1, replies)

    # Assert: the mean is weighted 30 : 90, as the schema said, not 3000 : 90
    assert aggregated is not None
    for key, value in aggregated.items():
        expected = (30 * w_alpha[key] + 90 * w_beta[key]) / 120
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert strategy.train_metrics[1]["alpha"]["num-examples"] == 30


def test_schema_rows_are_capped_by_max_site_rows() -> None:
    # Prepare: alpha claimed 10^9 rows at the schema step; the cap is 100
    w_alpha, w_beta = arrays(3), arrays(4)
    strategy = ReportingStrategy(
        FedAvg(), {1: "alpha", 2: "beta"}, schema_rows={"alpha": 10**9, "beta": 100},
        max_site_rows=100,
    )  # fmt: skip

    # Execute
    aggregated, _ = strategy.aggregate_train(
        1,
        [train_reply(1, "alpha", w_alpha, n=10**9, eps=0.1),
         train_reply(2, "beta", w_beta, n=100, eps=0.1)],
    )  # fmt: skip

    # Assert: equal weights
    assert aggregated is not None
    for key, value in aggregated.items():
        expected = (w_alpha[key] + w_beta[key]) / 2
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_in_a_deployment_a_reply_carrying_another_sites_name_is_filed_under_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: node 101 authenticated as alpha; its reply says it is beta. A node that joined
    # after the schema query and is not in the authenticated map is never named by its word.
    strategy = ReportingStrategy(FedAvg(), {101: "alpha", 202: "beta"}, trust_reported_names=False)
    replies = [
        train_reply(101, "beta", arrays(1), n=30, eps=0.4),
        train_reply(202, "beta", arrays(2), n=30, eps=0.5),
        train_reply(303, "gamma", arrays(3), n=30, eps=0.6),
    ]

    # Execute
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(1, replies)

    # Assert
    assert strategy.train_metrics[1]["alpha"]["epsilon"] == pytest.approx(0.4)
    assert strategy.train_metrics[1]["beta"]["epsilon"] == pytest.approx(0.5)
    assert "gamma" not in strategy.train_metrics[1]
    assert strategy.train_metrics[1]["node-303"]["epsilon"] == pytest.approx(0.6)
    assert "claims to come from 'beta'" in caplog.text


def test_each_train_instruction_carries_the_ledger_count_seen_from_its_own_site(
    serverapp_identity: None,
) -> None:
    # Prepare: the coordinator saw 4 entries from alpha, none from beta
    watch = LedgerWatch()
    watch.sites["alpha"] = SeenLedger(count=4, head="a" * 64, datasets=1, run_id="r", round=1,
                                      at="")  # fmt: skip
    strategy = ReportingStrategy(FedAvg(), {1: "alpha", 2: "beta"}, ledger_watch=watch)
    global_arrays = ArrayRecord({k: Array(v) for k, v in arrays(1).items()})

    # Execute
    messages = list(
        strategy.configure_train(1, global_arrays, ConfigRecord({"lr": 0.1}),
                                 cast(Grid, NodesGrid([1, 2])))
    )  # fmt: skip

    # Assert: per-site counts, the round's arrays and config untouched
    seen = {m.metadata.dst_node_id: m.content[LEDGER_SEEN]["count"] for m in messages}
    assert seen == {1: 4, 2: 0}
    for message in messages:
        assert message.content["config"]["lr"] == 0.1
        assert message.metadata.ttl <= strategy.round_timeout
        assert set(message.content.array_records) == {"arrays"}


def test_ledger_refusals_and_ledger_alerts_are_recorded_for_the_site() -> None:
    # Prepare: alpha refuses because its own ledger is broken; beta's head went backwards;
    # gamma refuses under its policy
    watch = LedgerWatch()
    watch.sites["beta"] = SeenLedger(count=9, head="b" * 64, datasets=1, run_id="r0", round=3,
                                     at="")  # fmt: skip
    strategy = ReportingStrategy(FedAvg(), {1: "alpha", 2: "beta", 3: "gamma"}, ledger_watch=watch)
    beta = train_reply(2, "beta", arrays(2), n=10, eps=0.2)
    beta.content[LEDGER_STATUS] = ConfigRecord(
        {"count": 1, "head": "c" * 64, "hash-at-seen": "c" * 64, "datasets": 1}
    )
    replies = [
        Message(Error(code=LEDGER_REFUSAL_CODE, reason="LedgerError: lost its history"),
                metadata=reply_metadata(1, "train")),  # type: ignore[call-overload]
        beta,
        Message(Error(code=POLICY_REFUSAL_CODE, reason="SiteRefusal: delta"),
                metadata=reply_metadata(3, "train")),  # type: ignore[call-overload]
    ]  # fmt: skip

    # Execute
    strategy.aggregate_train(1, replies)

    # Assert
    assert set(strategy.ledger_alerts[1]) == {"alpha", "beta"}
    assert "went backwards" in strategy.ledger_alerts[1]["beta"]
    assert set(strategy.refusals[1]) == {"alpha", "gamma"}
