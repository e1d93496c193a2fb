"""A site's own policy against a careless or hostile coordinator (client/app.py, site_privacy).

The real ClientApp handlers are driven in-process with a real site's node config (as
`fedvault client start` writes it) and real ledger files. Each test is an abuse a coordinator
could try through the run config — another δ, another accountant, weaker noise, a model or
more rounds or evaluations than the site accepts, a changed data file — and checks that the
site refuses it and that its ε, at its own δ and accountant, never passes its cap.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

import fedvault.client.app as client_app
import fedvault.client.site
from fedvault.common.errors import LEDGER_REFUSAL_CODE, POLICY_REFUSAL_CODE, ConfigError
from fedvault.common.ledger import PrivacyLedger
from fedvault.common.site_privacy import SitePolicy
from tests.client.test_app import (
    CSV_FEATURES,
    FIXED,
    SCENARIO,
    evaluate_message,
    initial_model,
    ledger_entries,
    metrics_of,
    prv_epsilon,
    real_site_context,
    train_message,
    train_rounds,
    triples,
    write_site_csv,
)

pytestmark = pytest.mark.unit

SITE_DELTA = 1e-5


@pytest.fixture(autouse=True)
def _fresh_site_cache() -> None:
    """Each test's data file is read afresh (the deployed-site loader caches by file identity)."""
    fedvault.client.site._site_file.cache_clear()
    fedvault.client.site._split_site.cache_clear()


def assert_policy_refusal(reply: Message, *needles: str) -> None:
    assert reply.has_error()
    error = reply.error
    assert error.code == POLICY_REFUSAL_CODE, error.reason
    assert error.reason.startswith("SiteRefusal: ")
    for needle in needles:
        assert needle in error.reason
    assert "\n" not in error.reason


def site(tmp_path: Path, scenario: str = SCENARIO, **node: str) -> tuple[Path, Context]:
    data = write_site_csv(tmp_path / "site.csv")
    ledger = tmp_path / "ledger.sqlite"
    return ledger, real_site_context(data, scenario, ledger_path=str(ledger), **node)


def test_a_run_asking_for_delta_099_is_refused_and_spends_nothing(tmp_path: Path) -> None:
    # Prepare: the coordinator's scenario asks for δ = 0.99 (where PRV's ε even turns negative)
    ledger, context = site(
        tmp_path, SCENARIO.replace(f"target-delta = {1e-5}", "target-delta = 0.99")
    )

    # Execute
    replies = train_rounds(context, initial_model(CSV_FEATURES), [1, 2])

    # Assert
    for reply in replies:
        assert_policy_refusal(reply, "delta 0.99", "composes at 1e-05")
    assert ledger_entries(ledger) == []


def test_a_run_asking_for_another_accountant_is_refused(tmp_path: Path) -> None:
    ledger, context = site(tmp_path, SCENARIO + 'accountant = "rdp"\n')

    [reply] = train_rounds(context, initial_model(CSV_FEATURES), [1])

    assert_policy_refusal(reply, "rdp accountant", "uses prv")
    assert ledger_entries(ledger) == []


def test_weak_noise_from_the_coordinator_never_takes_the_site_past_its_cap(tmp_path: Path) -> None:
    # Prepare: the coordinator fixes σ = 2 (3 rounds would fit a cap of 2) and plans 40 rounds
    weak = SCENARIO.replace("target-epsilon = 1.0", "noise-multiplier = 2.0").replace(
        "rounds = 3", "rounds = 40"
    )
    ledger, context = site(tmp_path, weak, max_epsilon="2.0")

    # Execute: the coordinator keeps asking, round after round
    replies = train_rounds(context, initial_model(CSV_FEATURES), range(1, 8))

    # Assert: some rounds trained, the rest were refused, and the ledger's ε at the site's own
    # δ (recomputed independently with Opacus' PRV accountant) is within the cap
    trained = [r for r in replies if not r.has_error()]
    assert trained and len(trained) < len(replies)
    entries = ledger_entries(ledger)
    assert {e.delta for e in entries} == {SITE_DELTA}
    assert {e.accountant for e in entries} == {"prv"}
    assert prv_epsilon(triples(entries), delta=SITE_DELTA) <= 2.0 * 1.001
    assert max(metrics_of(r)["epsilon"] for r in trained) <= 2.0


def test_a_site_delta_not_below_one_over_its_rows_is_refused(tmp_path: Path) -> None:
    # Prepare: 240 rows, 192 for training; the site itself was started with δ = 0.01
    scenario = SCENARIO.replace(f"target-delta = {1e-5}", "target-delta = 0.01")
    ledger, context = site(tmp_path, scenario, delta="0.01")

    [reply] = train_rounds(context, initial_model(CSV_FEATURES), [1])

    assert_policy_refusal(reply, "not below 1 / its 192 training rows")
    assert ledger_entries(ledger) == []


def test_a_model_the_site_does_not_accept_is_refused_for_training_and_evaluation(
    tmp_path: Path,
) -> None:
    ledger, context = site(tmp_path, models="mlp")
    model = initial_model(CSV_FEATURES)

    train = client_app.app(train_message(model, 1), context)
    evaluation = client_app.app(evaluate_message(model), context)

    assert_policy_refusal(train, "model 'logistic'", "accepts mlp")
    assert_policy_refusal(evaluation, "model 'logistic'")
    assert ledger_entries(ledger) == []


def test_rounds_past_the_sites_max_rounds_per_run_are_refused(tmp_path: Path) -> None:
    ledger, context = site(tmp_path, max_rounds_per_run="2")

    replies = train_rounds(context, initial_model(CSV_FEATURES), [1, 2, 3])

    assert not replies[0].has_error() and not replies[1].has_error()
    assert_policy_refusal(replies[2], "at most 2 rounds per run")
    assert [e.round for e in ledger_entries(ledger)] == [1, 2]


def test_evaluation_replies_past_the_sites_cap_are_refused(tmp_path: Path) -> None:
    _, context = site(tmp_path, max_evaluations_per_run="2")
    model = initial_model(CSV_FEATURES)

    replies = [client_app.app(evaluate_message(model), context) for _ in range(3)]

    assert not replies[0].has_error() and not replies[1].has_error()
    assert_policy_refusal(replies[2])


def test_a_changed_data_file_is_refused_as_a_ledger_error_not_a_fresh_budget(
    tmp_path: Path,
) -> None:
    # Prepare: the site trained a round on its file; then one cell changes by 0.001
    ledger, context = site(tmp_path)
    model = initial_model(CSV_FEATURES)
    [first] = train_rounds(context, model, [1])
    assert not first.has_error()
    data = tmp_path / "site.csv"
    rows = list(csv.reader(data.open()))
    rows[1][0] = f"{float(rows[1][0]) + 0.001:.4f}"
    with data.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)  # noticed by its identity: no cache is cleared

    # Execute
    [second] = train_rounds(context, model, [2])

    # Assert
    assert second.has_error() and second.error.code == LEDGER_REFUSAL_CODE
    assert "--new-dataset" in second.error.reason
    assert [e.round for e in ledger_entries(ledger)] == [1]


def test_each_train_reply_carries_the_ledgers_head_and_answers_the_seen_count(
    tmp_path: Path,
) -> None:
    # Prepare: two rounds; the second instruction says the coordinator saw 1 entry
    ledger, context = site(tmp_path)
    model = initial_model(CSV_FEATURES)
    [first] = train_rounds(context, model, [1])
    message = train_message(model, 2)
    message.content[client_app.LEDGER_SEEN] = ConfigRecord({"count": 1})

    # Execute
    second = client_app.app(message, context)

    # Assert: the statuses match the ledger's own chain
    with PrivacyLedger(ledger) as book:
        head, at_one = book.head(), book.hash_at(1)
    status_1 = dict(first.content[client_app.LEDGER_STATUS])
    status_2 = dict(second.content[client_app.LEDGER_STATUS])
    assert status_1["count"] == 1 and status_1["hash-at-seen"] == "0" * 64
    assert status_2["count"] == 2 == head.count and status_2["head"] == head.hash
    assert status_2["hash-at-seen"] == at_one == status_1["head"]
    assert status_2["datasets"] == 1


def test_site_policy_from_node_config_validates_every_setting() -> None:
    policy = SitePolicy.from_node_config(
        {"delta": 1e-6, "accountant": "rdp", "models": "mlp, cnn", "max-rounds-per-run": 7}
    )
    assert (policy.delta, policy.accountant, policy.models) == (1e-6, "rdp", ("mlp", "cnn"))
    assert policy.max_rounds_per_run == 7 and policy.allow_non_private is False
    for bad in ({"delta": 1.5}, {"accountant": "gdp"}, {"models": "resnet"},
                {"max-rounds-per-run": 0}, {"delta": "abc"}):  # fmt: skip
        with pytest.raises(ConfigError):
            SitePolicy.from_node_config(bad)
    assert SitePolicy.from_node_config({"allow-non-private": True}).allow_non_private
    assert SitePolicy.from_node_config({"allow-non-private": "true"}).allow_non_private


def test_the_coordinators_ledger_seen_count_cannot_break_the_site(tmp_path: Path) -> None:
    # Prepare: hostile counts
    _, context = site(tmp_path, FIXED)
    model = initial_model(CSV_FEATURES)
    for server_round, bad in enumerate((-5, 10**9, 1.5e300, "x"), start=1):
        message = train_message(model, server_round)
        message.content[client_app.LEDGER_SEEN] = ConfigRecord({"count": bad})
        reply = client_app.app(message, context)
        assert not reply.has_error(), reply.error.reason
        assert isinstance(reply.content["arrays"], ArrayRecord)
    assert torch.is_tensor(next(iter(model.state_dict().values())))
