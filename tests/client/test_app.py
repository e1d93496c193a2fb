"""Tests for client/app.py: the real ClientApp handlers, driven in-process round after round.

Messages are built as the SuperLink delivers them (with a message id) and dispatched by the
ClientApp itself (``app(message, context)``), so the routing by message type is exercised
too. One Context is reused across rounds, as a SuperNode does for a run. Every test gives
its sites their own ledger folder (simulated sites) or ledger file (a real site), and every
epsilon is checked against the ledger's entries recomputed independently.
"""

from __future__ import annotations

import csv
import itertools
import math
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from opacus.accountants import PRVAccountant

import fedvault.client.app as client_app
import fedvault.common.privacy
import fedvault.common.training
from fedvault.client.site import resolve_site
from fedvault.common.config import parse_toml_text
from fedvault.common.data import load_dataset
from fedvault.common.errors import BUDGET_REFUSAL_CODE, REFUSAL_CODE_BASE, ConfigError
from fedvault.common.fingerprint import dataset_fingerprint
from fedvault.common.ledger import LedgerEntry, PrivacyLedger
from fedvault.common.metrics import DEFAULT_SCORE_BINS
from fedvault.common.models import build_model
from fedvault.common.site_privacy import MAX_NOISE_INFLATION, SimulatedSitePolicy, SitePrivacy
from fedvault.common.training import TrainingOutcome

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
NON_PRIVATE = SCENARIO + "enabled = false\n"
#: A fixed sigma: no calibration, for tests about where a round is recorded, not its sigma.
FIXED_SIGMA = 1.7
FIXED = SCENARIO.replace(f"target-epsilon = {TARGET_EPSILON}", f"noise-multiplier = {FIXED_SIGMA}")
#: A real site's own table (see real_site_context): CSV_FEATURES columns and a label.
CSV_FEATURES = 5
_message_ids = itertools.count(1)


def site_context(
    scenario: str = SCENARIO,
    *,
    ledger_dir: Path,
    run_id: str = "run-a",
    max_epsilon: Mapping[str, float] | None = None,
    partition: int = 0,
    partitions: int = 2,
) -> Context:
    """A simulated site's context; its ledger lives in ``ledger_dir`` (one folder per test)."""
    policy = SimulatedSitePolicy(ledger_dir=str(ledger_dir), max_epsilon=max_epsilon or {})
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": partition, "num-partitions": partitions},
        state=RecordDict(),
        run_config={
            "scenario-toml": scenario,
            "out-dir": "",
            "run-id": run_id,
            **policy.run_config(),
        },
    )


def write_site_csv(path: Path, rows: int = 240, seed: int = 0) -> Path:
    """A real site's data file: columns f0..f4 and an (almost) linearly separable label."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(rows, CSV_FEATURES)).round(4)
    labels = (features[:, 0] + 0.5 * features[:, 1] > 0).astype(int)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*(f"f{i}" for i in range(CSV_FEATURES)), "label"])
        writer.writerows([*row, label] for row, label in zip(features, labels, strict=True))
    return path


def real_site_context(
    data_path: Path,
    scenario: str = SCENARIO,
    *,
    coordinator: Mapping[str, str] | None = None,
    **node: str,
) -> Context:
    """A real site's context: its node config as `fedvault client start` writes it.

    ``node`` adds or overrides node config entries (``ledger_path`` → ``ledger-path``);
    ``coordinator`` adds run config entries the coordinator sends.
    """
    node_config: dict[str, bool | float | int | str] = {
        "data-path": str(data_path),
        "site-name": "hospital-a",
        "label-column": "label",
        "max-epsilon": "5.0",
        "allow-non-private": "false",
        **{key.replace("_", "-"): value for key, value in node.items()},
    }
    return Context(
        run_id=1,
        node_id=1,
        node_config=node_config,
        state=RecordDict(),
        run_config={
            "scenario-toml": scenario,
            "out-dir": "",
            "run-id": "run-a",
            **(coordinator or {}),
        },
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


def initial_model(features: int = 30) -> torch.nn.Module:
    return build_model("logistic", (features,), 2, seed=0)


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
    assert not reply.has_error(), reply.error.reason
    record = reply.content["metrics"]
    assert isinstance(record, MetricRecord)
    return dict(record)


def reply_text(reply: Message) -> str:
    """Everything a reply tells the coordinator besides weights: its reason, configs, metrics."""
    if reply.has_error():
        return str(reply.error.reason)
    return repr(
        {
            name: dict(record)
            for name, record in reply.content.items()
            if isinstance(record, ConfigRecord | MetricRecord)
        }
    )


def assert_budget_refusal(reply: Message, *needles: str) -> None:
    """A clean privacy refusal: the budget code, a one-line reason, no fingerprint."""
    assert reply.has_error()
    assert reply.error.code == BUDGET_REFUSAL_CODE
    reason = reply.error.reason
    assert reason is not None
    assert reason.startswith("PrivacyBudgetExceeded: ")
    for needle in needles:
        assert needle in reason
    assert "Traceback" not in reason
    assert "\n" not in reason
    assert "sha256:" not in reason  # the fingerprint stays on the site


def ledger_entries(path: Path) -> list[LedgerEntry]:
    """Every entry of a ledger file; [] when the site never created it."""
    if not path.exists():
        return []
    with PrivacyLedger(path) as ledger:
        return ledger.entries()


def site_ledger(ledger_dir: Path, site: str = "site-1") -> Path:
    """Where a simulated site keeps its ledger (SimulatedSitePolicy.ledger_path)."""
    return SimulatedSitePolicy(ledger_dir=str(ledger_dir)).ledger_path(site)


def triples(entries: Sequence[LedgerEntry]) -> list[tuple[float, float, int]]:
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]


def prv_epsilon(history: Sequence[tuple[float, float, int]], delta: float = DELTA) -> float:
    """Independent recomputation: Opacus' PRVAccountant stepped once per DP-SGD step."""
    accountant = PRVAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


def train_rounds(context: Context, model: torch.nn.Module, rounds: Sequence[int]) -> list[Message]:
    """The site trains ``rounds``, each on the model it returned the round before."""
    replies = []
    for server_round in rounds:
        reply = client_app.app(train_message(model, server_round), context)
        if not reply.has_error():
            model.load_state_dict(weights_of(reply))
        replies.append(reply)
    return replies


def counting(calls: list[str], name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return function(*args, **kwargs)

    return counted


@dataclass
class Run:
    """What one site reported over a whole planned run, and what its ledger holds after it."""

    context: Context
    ledger_dir: Path
    requests: list[Message]
    replies: list[Message]
    metrics: list[dict[str, Any]]
    entries: list[LedgerEntry]
    plans: int
    calibrations: int
    final_model: torch.nn.Module


@pytest.fixture(scope="module")
def planned_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Site 1 of 2 trains ROUNDS rounds of run 'run-a' on a fresh ledger, no site max."""
    ledger_dir = tmp_path_factory.mktemp("planned") / "ledgers"
    calls: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        # Count where fedvault.client.app's gate looks them up: the method on the class, and the
        # calibration in fedvault.common.privacy's namespace (the gate imports it when it plans).
        plan = SitePrivacy.plan_noise_multiplier
        calibrate = fedvault.common.privacy.calibrate_after_history
        patch.setattr(SitePrivacy, "plan_noise_multiplier", counting(calls, "plan", plan))
        patch.setattr(
            fedvault.common.privacy,
            "calibrate_after_history",
            counting(calls, "calibrate", calibrate),
        )
        context, model = site_context(ledger_dir=ledger_dir), initial_model()
        requests, replies = [], []
        for server_round in range(1, ROUNDS + 1):
            request = train_message(model, server_round)
            reply = client_app.app(request, context)
            model.load_state_dict(weights_of(reply))
            requests.append(request)
            replies.append(reply)
    return Run(
        context=context,
        ledger_dir=ledger_dir,
        requests=requests,
        replies=replies,
        metrics=[metrics_of(r) for r in replies],
        entries=ledger_entries(site_ledger(ledger_dir)),
        plans=calls.count("plan"),
        calibrations=calls.count("calibrate"),
        final_model=model,
    )


def copy_ledgers(run: Run, tmp_path: Path) -> Path:
    """A private copy of the planned run's ledger folder, for a test that writes to it."""
    return Path(shutil.copytree(run.ledger_dir, tmp_path / "ledgers"))


# --- privacy accounting across rounds ------------------------------------------------------------


def test_reported_epsilon_equals_an_independent_prv_recomputation_of_the_ledger(
    planned_run: Run,
) -> None:
    for server_round, metrics in enumerate(planned_run.metrics, start=1):
        expected = prv_epsilon(triples(planned_run.entries[:server_round]))

        assert metrics["epsilon"] == pytest.approx(expected, rel=0.02)
        assert metrics["delta"] == DELTA


def test_epsilon_grows_every_round_and_ends_within_the_target(planned_run: Run) -> None:
    epsilons = [m["epsilon"] for m in planned_run.metrics]

    assert all(later > earlier for earlier, later in itertools.pairwise(epsilons))
    assert epsilons[0] > 0
    assert epsilons[-1] <= TARGET_EPSILON * 1.01  # PRV numerical slack
    assert epsilons[-1] >= 0.9 * TARGET_EPSILON  # calibrated for the run, not over-noised
    # A first run on a fresh ledger: the run's share is the dataset's whole history.
    assert [m["run-epsilon"] for m in planned_run.metrics] == pytest.approx(epsilons, rel=1e-6)
    assert {m["max-epsilon"] for m in planned_run.metrics} == {0.0}  # this site sets no max


def test_noise_multiplier_is_planned_once_for_the_whole_run(planned_run: Run) -> None:
    sigmas = {m["noise-multiplier"] for m in planned_run.metrics}

    assert len(sigmas) == 1
    sigma = sigmas.pop()
    assert sigma > 0
    assert planned_run.plans == 1
    assert planned_run.calibrations == 1
    record = planned_run.context.state[client_app.PRIVACY_STATE]
    assert isinstance(record, ConfigRecord)
    assert record["noise-multiplier"] == sigma


def test_the_ledger_holds_each_round_exactly_as_it_was_trained(planned_run: Run) -> None:
    cfg = parse_toml_text(SCENARIO)
    node_config = site_context(ledger_dir=planned_run.ledger_dir).node_config
    site = resolve_site(cfg, SCENARIO, node_config)

    entries = planned_run.entries

    assert [(e.run_id, e.round) for e in entries] == [("run-a", r) for r in range(1, ROUNDS + 1)]
    for entry, metrics in zip(entries, planned_run.metrics, strict=True):
        assert entry.noise_multiplier == metrics["noise-multiplier"]
        assert entry.sample_rate == metrics["sample-rate"]
        assert entry.steps == metrics["round-steps"]
        assert (entry.delta, entry.accountant) == (DELTA, "prv")
        assert entry.dataset == site.fingerprint


def test_steps_are_cumulative_and_match_the_sample_rate(planned_run: Run) -> None:
    first = planned_run.metrics[0]
    per_round = math.ceil(first["num-examples"] / 32)  # default batch-size

    assert [m["round-steps"] for m in planned_run.metrics] == [per_round] * ROUNDS
    assert [m["steps"] for m in planned_run.metrics] == [per_round * r for r in (1, 2, 3)]
    assert first["sample-rate"] == pytest.approx(1 / per_round)


def test_a_fresh_ledger_folder_starts_from_nothing_and_spends_like_round_one(
    planned_run: Run, tmp_path: Path
) -> None:
    reply = client_app.app(train_message(initial_model(), 1), site_context(ledger_dir=tmp_path))

    fresh = metrics_of(reply)
    assert fresh["steps"] == planned_run.metrics[0]["steps"]
    assert fresh["epsilon"] == pytest.approx(planned_run.metrics[0]["epsilon"], rel=1e-6)
    assert fresh["epsilon"] < planned_run.metrics[-1]["epsilon"]
    assert len(ledger_entries(site_ledger(tmp_path))) == 1
    assert len(ledger_entries(site_ledger(planned_run.ledger_dir))) == ROUNDS  # untouched


def test_a_second_run_on_the_same_ledger_keeps_spending_while_its_run_epsilon_restarts(
    planned_run: Run, tmp_path: Path
) -> None:
    # Prepare: the site's ledger after run-a, and a new run (new context, new run id)
    ledger_dir = copy_ledgers(planned_run, tmp_path)
    context = site_context(ledger_dir=ledger_dir, run_id="run-b")

    # Execute
    replies = train_rounds(context, planned_run.final_model, [1, 2])

    # Assert: epsilon is the dataset's whole history; run-epsilon is this run's share alone
    first, second = (metrics_of(r) for r in replies)
    first_run = planned_run.metrics
    assert first["epsilon"] > first_run[-1]["epsilon"]
    assert second["epsilon"] > first["epsilon"]
    assert first["run-epsilon"] == pytest.approx(first_run[0]["run-epsilon"], rel=1e-6)
    assert second["run-epsilon"] == pytest.approx(first_run[1]["run-epsilon"], rel=1e-6)
    assert second["run-epsilon"] < first_run[-1]["epsilon"] < first["epsilon"]
    entries = ledger_entries(site_ledger(ledger_dir))
    assert [(e.run_id, e.round) for e in entries[ROUNDS:]] == [("run-b", 1), ("run-b", 2)]
    assert entries[:ROUNDS] == planned_run.entries
    assert second["epsilon"] == pytest.approx(prv_epsilon(triples(entries)), rel=0.02)


# --- write-ahead: the round is in the ledger before training -------------------------------------


def test_the_round_is_in_the_ledger_with_its_exact_plan_before_training_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: training that first reads the ledger file, as another process would
    context = site_context(ledger_dir=tmp_path)
    seen: list[LedgerEntry] = []
    planned_sigmas: list[float | None] = []
    real_train = fedvault.common.training.train

    def reading_train(*args: Any, **kwargs: Any) -> TrainingOutcome:
        seen.extend(ledger_entries(site_ledger(tmp_path)))
        planned_sigmas.append(kwargs["plan"].noise_multiplier)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(fedvault.common.training, "train", reading_train)

    # Execute
    metrics = metrics_of(client_app.app(train_message(initial_model(), 1), context))

    # Assert: the entry was durable before training, and is exactly what training then ran
    assert len(seen) == 1
    entry = seen[0]
    assert (entry.run_id, entry.round) == ("run-a", 1)
    assert entry.noise_multiplier == metrics["noise-multiplier"] == planned_sigmas[0]
    assert entry.sample_rate == metrics["sample-rate"]
    assert entry.steps == metrics["round-steps"]


def test_a_crash_during_training_over_counts_and_never_under_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the site's process dies in the middle of round 1's training
    context = site_context(FIXED, ledger_dir=tmp_path)

    def crash(*args: Any, **kwargs: Any) -> TrainingOutcome:
        raise RuntimeError("power cut in the middle of DP-SGD")

    monkeypatch.setattr(fedvault.common.training, "train", crash)

    # Execute: the crash, then the coordinator sends round 1 again after the restart
    with pytest.raises(RuntimeError, match="power cut"):
        client_app.app(train_message(initial_model(), 1), context)
    after_crash = ledger_entries(site_ledger(tmp_path))
    monkeypatch.undo()
    retried = metrics_of(client_app.app(train_message(initial_model(), 1), context))

    # Assert: the crashed round stays counted; the retry is counted on top of it
    assert [(e.run_id, e.round) for e in after_crash] == [("run-a", 1)]
    entries = ledger_entries(site_ledger(tmp_path))
    assert entries[0] == after_crash[0]
    assert [(e.run_id, e.round) for e in entries] == [("run-a", 1), ("run-a", 1)]
    assert retried["epsilon"] == pytest.approx(prv_epsilon(triples(entries)), rel=0.02)
    one_round = prv_epsilon(triples(entries[:1]))
    assert retried["epsilon"] > 1.1 * one_round  # the untrained round is never forgotten


# --- refusals ------------------------------------------------------------------------------------


def test_a_round_beyond_the_run_target_is_refused_before_training(
    planned_run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a copy of the site's state and ledger after its ROUNDS planned rounds
    ledger_dir = copy_ledgers(planned_run, tmp_path)
    context = site_context(ledger_dir=ledger_dir)
    context.state = RecordDict(dict(planned_run.context.state.items()))
    spent_before = planned_run.metrics[-1]["epsilon"]

    def must_not_train(*args: Any, **kwargs: Any) -> TrainingOutcome:
        raise AssertionError("a refused round must not train")

    monkeypatch.setattr(fedvault.common.training, "train", must_not_train)

    # Execute: the coordinator asks for one round more than the run's privacy target allows
    reply = client_app.app(train_message(planned_run.final_model, ROUNDS + 1), context)

    # Assert: refused with the budget code, and nothing was recorded
    assert_budget_refusal(
        reply, f"site site-1 refuses round {ROUNDS + 1}", f"target_epsilon {TARGET_EPSILON:g}"
    )
    assert ledger_entries(site_ledger(ledger_dir)) == planned_run.entries
    assert len(planned_run.entries) == ROUNDS
    assert spent_before <= TARGET_EPSILON * 1.01


@pytest.mark.parametrize("cap", [{"site-1": 0.5}, {"*": 0.5, "site-2": 50.0}], ids=["site", "*"])
def test_a_site_whose_budget_is_exhausted_refuses_and_records_nothing(
    planned_run: Run, tmp_path: Path, cap: dict[str, float]
) -> None:
    # Prepare: the data already spent ~TARGET_EPSILON in run-a; the site's max is below it
    ledger_dir = copy_ledgers(planned_run, tmp_path)
    context = site_context(ledger_dir=ledger_dir, run_id="run-b", max_epsilon=cap)

    # Execute
    reply = client_app.app(train_message(planned_run.final_model, 1), context)

    # Assert
    assert_budget_refusal(
        reply,
        "site site-1 refuses round 1: privacy budget exhausted",
        "max_epsilon 0.5",
        f"spent epsilon {planned_run.metrics[-1]['epsilon']:.3f}",
    )
    assert ledger_entries(site_ledger(ledger_dir)) == planned_run.entries


def test_a_site_near_its_max_raises_sigma_and_ends_the_run_within_it(
    planned_run: Run, tmp_path: Path
) -> None:
    # Prepare: the remaining budget (0.2) is below the run's target (1.0), but not spent
    ledger_dir = copy_ledgers(planned_run, tmp_path)
    max_epsilon = round(planned_run.metrics[-1]["epsilon"] + 0.2, 3)
    context = site_context(ledger_dir=ledger_dir, run_id="run-b", max_epsilon={"*": max_epsilon})

    # Execute: a whole run
    replies = train_rounds(context, planned_run.final_model, range(1, ROUNDS + 1))

    # Assert: every round trained, with more noise than the run alone needs, within the max
    metrics = [metrics_of(r) for r in replies]
    sigma, run_only = metrics[0]["noise-multiplier"], planned_run.metrics[0]["noise-multiplier"]
    assert {m["noise-multiplier"] for m in metrics} == {sigma}
    assert 1.05 * run_only < sigma <= MAX_NOISE_INFLATION * run_only
    assert {m["max-epsilon"] for m in metrics} == {max_epsilon}
    assert metrics[-1]["epsilon"] <= max_epsilon
    assert metrics[-1]["epsilon"] >= max_epsilon - 0.05  # raised just enough, not more
    assert metrics[-1]["run-epsilon"] < TARGET_EPSILON
    entries = ledger_entries(site_ledger(ledger_dir))
    assert metrics[-1]["epsilon"] == pytest.approx(prv_epsilon(triples(entries)), rel=0.02)


# --- a real site: its own file, ledger and cap ---------------------------------------------------


def test_a_real_site_trains_on_its_own_file_and_writes_its_own_ledger(tmp_path: Path) -> None:
    # Prepare: the coordinator's run config names a simulated ledger folder and a cap that
    # no round could fit in; a real site must ignore both
    data = write_site_csv(tmp_path / "site.csv")
    ledger = tmp_path / "site" / "state" / "privacy-ledger.sqlite"
    elsewhere = tmp_path / "coordinator-ledgers"
    coordinator = SimulatedSitePolicy(ledger_dir=str(elsewhere), max_epsilon={"*": 0.01})
    context = real_site_context(
        data, FIXED, ledger_path=str(ledger), coordinator=coordinator.run_config()
    )

    # Execute
    reply = client_app.app(train_message(initial_model(CSV_FEATURES), 1), context)

    # Assert: trained under the site's own ledger and cap
    metrics = metrics_of(reply)
    assert reply.content["site"]["name"] == "hospital-a"
    assert metrics["max-epsilon"] == 5.0
    entries = ledger_entries(ledger)
    assert [(e.run_id, e.round) for e in entries] == [("run-a", 1)]
    loaded = load_dataset(f"csv:{data}", label_column="label")
    assert entries[0].dataset == dataset_fingerprint(loaded.features, loaded.labels)
    assert triples(entries) == [(FIXED_SIGMA, metrics["sample-rate"], metrics["round-steps"])]
    assert metrics["epsilon"] == pytest.approx(prv_epsilon(triples(entries)), rel=0.02)
    assert metrics["epsilon"] > 0.01  # the coordinator's cap would have refused this round
    assert not elsewhere.exists()
    assert "sha256:" not in reply_text(reply)


def test_a_real_site_applies_its_own_max_epsilon_never_the_coordinators(tmp_path: Path) -> None:
    # Prepare: the site's data already spent a lot; its own cap is 2, the coordinator says 50
    data = write_site_csv(tmp_path / "site.csv")
    loaded = load_dataset(f"csv:{data}", label_column="label")
    ledger = tmp_path / "site-ledger.sqlite"
    earlier = LedgerEntry(
        dataset_fingerprint(loaded.features, loaded.labels),
        "earlier",
        1,
        0.8,
        0.5,
        50,
        DELTA,
        "prv",
    )
    with PrivacyLedger(ledger) as site_ledger_file:
        site_ledger_file.record(earlier)
    elsewhere = tmp_path / "coordinator-ledgers"
    coordinator = SimulatedSitePolicy(ledger_dir=str(elsewhere), max_epsilon={"*": 50.0})
    context = real_site_context(
        data, FIXED, ledger_path=str(ledger), max_epsilon="2", coordinator=coordinator.run_config()
    )

    # Execute
    reply = client_app.app(train_message(initial_model(CSV_FEATURES), 1), context)

    # Assert
    assert_budget_refusal(
        reply, "site hospital-a refuses round 1: privacy budget exhausted", "max_epsilon 2"
    )
    assert ledger_entries(ledger) == [earlier]
    assert not elsewhere.exists()


def test_a_real_site_without_a_ledger_path_refuses_as_a_config_error(tmp_path: Path) -> None:
    context = real_site_context(
        write_site_csv(tmp_path / "site.csv"),
        FIXED,
        coordinator=SimulatedSitePolicy(ledger_dir=str(tmp_path / "coordinator")).run_config(),
    )

    reply = client_app.app(train_message(initial_model(CSV_FEATURES), 1), context)

    assert reply.has_error()
    assert reply.error.code == REFUSAL_CODE_BASE + ConfigError.exit_code
    reason = "ConfigError: site hospital-a has no privacy ledger configured"
    assert reply.error.reason.startswith(reason)
    assert not (tmp_path / "coordinator").exists()


def test_a_real_site_refuses_a_non_private_run_unless_it_allows_one(tmp_path: Path) -> None:
    data = write_site_csv(tmp_path / "site.csv")
    ledger = tmp_path / "ledger.sqlite"
    model = initial_model(CSV_FEATURES)

    refused = client_app.app(
        train_message(model, 1), real_site_context(data, NON_PRIVATE, ledger_path=str(ledger))
    )
    allowed = client_app.app(
        train_message(model, 1),
        real_site_context(data, NON_PRIVATE, ledger_path=str(ledger), allow_non_private="true"),
    )

    assert_budget_refusal(refused, "site hospital-a refuses to train without differential privacy")
    metrics = metrics_of(allowed)
    assert (metrics["epsilon"], metrics["noise-multiplier"]) == (0.0, 0.0)
    assert metrics["round-steps"] > 0
    assert ledger_entries(ledger) == []


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


def test_evaluate_reports_loss_accuracy_and_test_rows(planned_run: Run, tmp_path: Path) -> None:
    context = site_context(ledger_dir=tmp_path)
    schema = query_schema(context)

    before = metrics_of(client_app.app(evaluate_message(initial_model()), context))
    after = metrics_of(client_app.app(evaluate_message(planned_run.final_model), context))

    assert before.keys() == after.keys() == {
        "num-examples", "loss", "accuracy", "eval-seconds", "confusion", "score-histogram",
    }  # fmt: skip
    assert after["num-examples"] == schema["test-rows"]
    # counts only: a 2 × 2 confusion matrix and a 2 × 100-bin histogram, both over the test rows
    assert len(after["confusion"]) == 4 and sum(after["confusion"]) == schema["test-rows"]
    assert len(after["score-histogram"]) == 2 * DEFAULT_SCORE_BINS == 200
    assert sum(after["score-histogram"]) == schema["test-rows"]
    assert 0.0 <= after["accuracy"] <= 1.0
    assert after["loss"] < before["loss"]
    assert after["accuracy"] >= 0.8


def test_no_reply_carries_the_datasets_fingerprint(planned_run: Run) -> None:
    context = site_context(ledger_dir=planned_run.ledger_dir)
    replies = [
        *planned_run.replies,
        client_app.app(server_message(RecordDict(), "query.schema"), context),
        client_app.app(evaluate_message(planned_run.final_model), context),
    ]
    fingerprint = planned_run.entries[0].dataset

    for reply in replies:
        text = reply_text(reply)
        assert "sha256:" not in text
        assert fingerprint[len("sha256:") :][:12] not in text


# --- schema query --------------------------------------------------------------------------------


def query_schema(context: Context) -> dict[str, Any]:
    reply = client_app.app(server_message(RecordDict(), "query.schema"), context)
    assert set(reply.content.keys()) == {"schema"}
    return dict(reply.content["schema"])


def test_schema_describes_the_data_shape_without_any_rows(tmp_path: Path) -> None:
    schema = query_schema(site_context(ledger_dir=tmp_path))

    assert schema["feature-shape"] == [30]
    assert schema["num-classes"] == 2
    assert schema["kind"] == "table"
    assert schema["site"] == "site-1"
    assert schema["train-rows"] > schema["test-rows"] > 0
    for value in schema.values():  # scalars and the short shape list only: no data
        assert not isinstance(value, list | tuple) or len(value) <= 4


def test_the_two_sites_together_hold_the_whole_dataset(tmp_path: Path) -> None:
    schemas = [query_schema(site_context(ledger_dir=tmp_path, partition=p)) for p in (0, 1)]

    assert sum(s["train-rows"] + s["test-rows"] for s in schemas) == 569
    assert [s["site"] for s in schemas] == ["site-1", "site-2"]


# --- other privacy settings and errors -----------------------------------------------------------


def test_fixed_noise_multiplier_is_used_as_given_and_never_calibrated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> float:
        raise AssertionError("calibration must not run with a fixed noise multiplier")

    monkeypatch.setattr(SitePrivacy, "plan_noise_multiplier", refuse)
    monkeypatch.setattr(fedvault.common.privacy, "calibrate_after_history", refuse)
    context = site_context(FIXED, ledger_dir=tmp_path)

    metrics = metrics_of(client_app.app(train_message(initial_model(), 1), context))

    assert metrics["noise-multiplier"] == FIXED_SIGMA
    expected = prv_epsilon([(FIXED_SIGMA, metrics["sample-rate"], metrics["steps"])])
    assert metrics["epsilon"] == pytest.approx(expected, rel=0.02)
    assert triples(ledger_entries(site_ledger(tmp_path))) == [
        (FIXED_SIGMA, metrics["sample-rate"], metrics["round-steps"])
    ]


def test_without_privacy_no_epsilon_is_spent_or_recorded(tmp_path: Path) -> None:
    context = site_context(NON_PRIVATE, ledger_dir=tmp_path / "ledgers")

    metrics = metrics_of(client_app.app(train_message(initial_model(), 1), context))

    assert (metrics["epsilon"], metrics["delta"], metrics["noise-multiplier"]) == (0.0, 0.0, 0.0)
    assert metrics["round-steps"] > 0
    assert client_app.PRIVACY_STATE not in context.state
    assert not (tmp_path / "ledgers").exists()


def test_a_node_count_that_disagrees_with_the_scenario_is_refused_as_a_config_error(
    tmp_path: Path,
) -> None:
    context = site_context(ledger_dir=tmp_path, partitions=3)

    reply = client_app.app(server_message(RecordDict(), "query.schema"), context)

    assert reply.has_error()
    assert reply.error.code == REFUSAL_CODE_BASE + ConfigError.exit_code
    assert reply.error.reason is not None
    assert reply.error.reason.startswith("ConfigError: the simulation has 3 SuperNodes")
    assert "Traceback" not in reply.error.reason


def test_steps_are_cumulative_without_privacy_too(tmp_path: Path) -> None:
    context = site_context(NON_PRIVATE, ledger_dir=tmp_path)
    model = initial_model()

    first = metrics_of(client_app.app(train_message(model, 1), context))
    second = metrics_of(client_app.app(train_message(model, 2), context))

    assert second["steps"] == first["steps"] + second["round-steps"] > first["steps"]


def test_a_real_site_trains_on_the_threads_it_was_started_with(tmp_path: Path) -> None:
    # Prepare: `fedvault client start --threads 1` puts threads = "1" in the node config
    data = write_site_csv(tmp_path / "site.csv")
    ledger = tmp_path / "state" / "privacy-ledger.sqlite"
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        context = real_site_context(data, FIXED, ledger_path=str(ledger), threads="1")

        # Execute
        reply = client_app.app(train_message(initial_model(CSV_FEATURES), 1), context)

        # Assert
        assert not reply.has_error(), reply_text(reply)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_loading_the_clientapp_does_not_import_opacus_or_the_ledger() -> None:
    # A deployed site starts a fresh process per message: an evaluation or schema query must
    # not pay for what only training needs (Opacus, the accountants, the ledger).
    code = (
        "import sys, fedvault.client.app\n"
        "heavy = ('opacus', 'fedvault.common.privacy', 'fedvault.common.ledger')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
