"""Tests for client/app.py: the real ClientApp handlers, driven in-process round after round.

Messages are built as the SuperLink delivers them (with a message id) and dispatched by the
ClientApp itself (``app(message, context)``), so the routing by message type is exercised
too. One Context is reused across rounds, as a SuperNode does for a run.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from opacus.accountants import PRVAccountant

import client.app as client_app
from common.errors import ConfigError, PrivacyBudgetExceeded
from common.models import build_model

pytestmark = pytest.mark.unit

TARGET_EPSILON = 1.0
DELTA = 1e-5
ROUNDS = 3
SCENARIO = f"""
name = "unit"
[federation]
sites = 2
rounds = {ROUNDS}
[data]
dataset = "breast-cancer"
[privacy]
target-epsilon = {TARGET_EPSILON}
target-delta = {DELTA}
"""
_message_ids = itertools.count(1)


def site_context(scenario: str = SCENARIO, *, partition: int = 0, partitions: int = 2) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": partition, "num-partitions": partitions},
        state=RecordDict(),
        run_config={"scenario-toml": scenario, "out-dir": ""},
    )


def server_message(content: RecordDict, message_type: str) -> Message:
    """A message from the ServerApp (node 0) to node 1, as the SuperLink delivers it."""
    metadata = Metadata(
        run_id=1,
        message_id=f"msg-{next(_message_ids)}",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    # `metadata=` is how Flower itself rebuilds a delivered message (absent from the overloads).
    return Message(content, metadata=metadata)  # type: ignore[call-overload]


def initial_model() -> torch.nn.Module:
    return build_model("logistic", (30,), 2, seed=0)


def train_message(model: torch.nn.Module, server_round: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "config": ConfigRecord({"server-round": server_round}),
        }
    )
    return server_message(content, "train")


def evaluate_message(model: torch.nn.Module) -> Message:
    return server_message(RecordDict({"arrays": ArrayRecord(model.state_dict())}), "evaluate")


def weights_of(reply: Message) -> dict[str, torch.Tensor]:
    record = reply.content["arrays"]
    assert isinstance(record, ArrayRecord)
    return dict(record.to_torch_state_dict())


def metrics_of(reply: Message) -> dict[str, Any]:
    record = reply.content["metrics"]
    assert isinstance(record, MetricRecord)
    return dict(record)


def prv_epsilon(sigma: float, q: float, steps: int, delta: float = DELTA) -> float:
    """Independent recomputation: Opacus' PRVAccountant stepped once per DP-SGD step."""
    accountant = PRVAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


@dataclass
class Run:
    """What one site reported over a whole planned run."""

    context: Context
    requests: list[Message]
    replies: list[Message]
    metrics: list[dict[str, Any]]
    calibrations: int
    final_model: torch.nn.Module


@pytest.fixture(scope="module")
def planned_run() -> Run:
    """Site 1 of 2 trains ROUNDS rounds, each on the model it returned the round before."""
    calls = []
    calibrate = client_app.calibrate_noise_multiplier

    def counting_calibrate(**kwargs: Any) -> float:
        calls.append(kwargs)
        return calibrate(**kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(client_app, "calibrate_noise_multiplier", counting_calibrate)
        context, model = site_context(), initial_model()
        requests, replies = [], []
        for server_round in range(1, ROUNDS + 1):
            request = train_message(model, server_round)
            reply = client_app.app(request, context)
            model.load_state_dict(weights_of(reply))
            requests.append(request)
            replies.append(reply)
    return Run(
        context=context,
        requests=requests,
        replies=replies,
        metrics=[metrics_of(r) for r in replies],
        calibrations=len(calls),
        final_model=model,
    )


# --- privacy accounting across rounds ------------------------------------------------------------


def test_reported_epsilon_equals_an_independent_prv_recomputation(planned_run: Run) -> None:
    for metrics in planned_run.metrics:
        expected = prv_epsilon(
            metrics["noise-multiplier"], metrics["sample-rate"], metrics["steps"]
        )

        assert metrics["epsilon"] == pytest.approx(expected, rel=0.02)
        assert metrics["delta"] == DELTA


def test_epsilon_grows_every_round_and_ends_within_the_target(planned_run: Run) -> None:
    epsilons = [m["epsilon"] for m in planned_run.metrics]

    assert all(later > earlier for earlier, later in itertools.pairwise(epsilons))
    assert epsilons[0] > 0
    assert epsilons[-1] <= TARGET_EPSILON * 1.01  # PRV numerical slack
    assert epsilons[-1] >= 0.9 * TARGET_EPSILON  # calibrated for the run, not over-noised


def test_noise_multiplier_is_calibrated_once_for_the_whole_run(planned_run: Run) -> None:
    sigmas = {m["noise-multiplier"] for m in planned_run.metrics}

    assert len(sigmas) == 1
    assert sigmas.pop() > 0
    assert planned_run.calibrations == 1


def test_steps_are_cumulative_and_match_the_sample_rate(planned_run: Run) -> None:
    first = planned_run.metrics[0]
    per_round = math.ceil(first["num-examples"] / 32)  # default batch-size

    assert [m["round-steps"] for m in planned_run.metrics] == [per_round] * ROUNDS
    assert [m["steps"] for m in planned_run.metrics] == [per_round * r for r in (1, 2, 3)]
    assert first["sample-rate"] == pytest.approx(1 / per_round)


def test_site_keeps_its_whole_privacy_history_in_the_context_state(planned_run: Run) -> None:
    record = planned_run.context.state[client_app.PRIVACY_STATE]
    last = planned_run.metrics[-1]

    assert isinstance(record, ConfigRecord)
    assert list(record["steps"]) == [last["round-steps"]] * ROUNDS  # type: ignore[arg-type]
    assert list(record["noise-multiplier"]) == [last["noise-multiplier"]] * ROUNDS  # type: ignore[arg-type]
    assert record["planned-noise-multiplier"] == last["noise-multiplier"]


def test_a_fresh_context_starts_a_new_ledger_and_spends_like_round_one(planned_run: Run) -> None:
    reply = client_app.app(train_message(initial_model(), 1), site_context())

    fresh = metrics_of(reply)
    assert fresh["steps"] == planned_run.metrics[0]["steps"]
    assert fresh["epsilon"] == pytest.approx(planned_run.metrics[0]["epsilon"], rel=1e-6)
    assert fresh["epsilon"] < planned_run.metrics[-1]["epsilon"]


# --- the replies ---------------------------------------------------------------------------------


def test_train_reply_answers_the_request_and_names_the_site(planned_run: Run) -> None:
    request, reply = planned_run.requests[0], planned_run.replies[0]

    assert reply.metadata.reply_to_message_id == request.metadata.message_id
    assert (reply.metadata.src_node_id, reply.metadata.dst_node_id) == (1, 0)
    assert reply.metadata.message_type == "train"
    assert reply.content["site"]["name"] == "site-1"
    assert planned_run.metrics[0]["num-examples"] > 0


def test_train_reply_carries_updated_weights(planned_run: Run) -> None:
    sent = initial_model().state_dict()
    returned = weights_of(planned_run.replies[0])

    assert returned.keys() == sent.keys()
    assert not all(torch.equal(sent[k], returned[k]) for k in sent)


def test_evaluate_reports_loss_accuracy_and_test_rows(planned_run: Run) -> None:
    context = site_context()
    schema = query_schema(context)

    before = metrics_of(client_app.app(evaluate_message(initial_model()), context))
    after = metrics_of(client_app.app(evaluate_message(planned_run.final_model), context))

    assert before.keys() == after.keys() == {"num-examples", "loss", "accuracy"}
    assert after["num-examples"] == schema["test-rows"]
    assert 0.0 <= after["accuracy"] <= 1.0
    assert after["loss"] < before["loss"]
    assert after["accuracy"] >= 0.8


# --- schema query --------------------------------------------------------------------------------


def query_schema(context: Context) -> dict[str, Any]:
    reply = client_app.app(server_message(RecordDict(), "query.schema"), context)
    assert set(reply.content.keys()) == {"schema"}
    return dict(reply.content["schema"])


def test_schema_describes_the_data_shape_without_any_rows() -> None:
    schema = query_schema(site_context())

    assert schema["feature-shape"] == [30]
    assert schema["num-classes"] == 2
    assert schema["kind"] == "table"
    assert schema["site"] == "site-1"
    assert schema["train-rows"] > schema["test-rows"] > 0
    for value in schema.values():  # scalars and the short shape list only: no data
        assert not isinstance(value, list | tuple) or len(value) <= 4


def test_the_two_sites_together_hold_the_whole_dataset() -> None:
    schemas = [query_schema(site_context(partition=p)) for p in (0, 1)]

    assert sum(s["train-rows"] + s["test-rows"] for s in schemas) == 569
    assert [s["site"] for s in schemas] == ["site-1", "site-2"]


# --- other privacy settings and errors -----------------------------------------------------------


def test_fixed_noise_multiplier_is_used_as_given_and_never_calibrated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(**kwargs: Any) -> float:
        raise AssertionError("calibration must not run with a fixed noise multiplier")

    monkeypatch.setattr(client_app, "calibrate_noise_multiplier", refuse)
    scenario = SCENARIO.replace(f"target-epsilon = {TARGET_EPSILON}", "noise-multiplier = 1.7")

    metrics = metrics_of(client_app.app(train_message(initial_model(), 1), site_context(scenario)))

    assert metrics["noise-multiplier"] == 1.7
    expected = prv_epsilon(1.7, metrics["sample-rate"], metrics["steps"])
    assert metrics["epsilon"] == pytest.approx(expected, rel=0.02)


def test_without_privacy_no_epsilon_is_spent_or_reported() -> None:
    scenario = SCENARIO + "enabled = false\n"
    context = site_context(scenario)

    metrics = metrics_of(client_app.app(train_message(initial_model(), 1), context))

    assert (metrics["epsilon"], metrics["delta"], metrics["noise-multiplier"]) == (0.0, 0.0, 0.0)
    assert metrics["round-steps"] > 0
    assert client_app.PRIVACY_STATE not in context.state


def test_a_node_count_that_disagrees_with_the_scenario_is_refused_as_a_config_error() -> None:
    context = site_context(partitions=3)

    reply = client_app.app(server_message(RecordDict(), "query.schema"), context)

    assert reply.has_error()
    assert reply.error.code == client_app.REFUSAL_CODE_BASE + ConfigError.exit_code
    assert reply.error.reason is not None
    assert reply.error.reason.startswith("ConfigError: the simulation has 3 SuperNodes")
    assert "Traceback" not in reply.error.reason


def test_a_round_beyond_the_planned_run_is_refused_before_training(planned_run: Run) -> None:
    # Prepare: a copy of the site's state after its ROUNDS planned rounds (epsilon ~ target)
    context = site_context()
    context.state = RecordDict(dict(planned_run.context.state.items()))
    spent_before = metrics_of(planned_run.replies[-1])["epsilon"]

    # Execute: the coordinator asks for one round more than the run's privacy target allows
    reply = client_app.app(train_message(planned_run.final_model, ROUNDS + 1), context)

    # Assert: refused with the budget error, and nothing was spent or recorded
    assert reply.has_error()
    assert reply.error.code == client_app.REFUSAL_CODE_BASE + PrivacyBudgetExceeded.exit_code
    assert reply.error.reason is not None
    assert f"refuses round {ROUNDS + 1}" in reply.error.reason
    assert f"target_epsilon {TARGET_EPSILON:g}" in reply.error.reason
    history = client_app._history(context)
    assert len(history) == ROUNDS
    assert spent_before <= TARGET_EPSILON


def test_steps_are_cumulative_without_privacy_too() -> None:
    context = site_context(SCENARIO + "enabled = false\n")
    model = initial_model()

    first = metrics_of(client_app.app(train_message(model, 1), context))
    second = metrics_of(client_app.app(train_message(model, 2), context))

    assert second["steps"] == first["steps"] + second["round-steps"] > first["steps"]
