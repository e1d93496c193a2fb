"""Tests for server/app.py helpers: waiting for sites and checking their data schemas agree.

A small fake Grid stands in for the SuperLink: it records what the ServerApp sends and answers
with replies built as the SuperLink delivers them. Building the instruction messages needs a
run identity, which a real ServerApp process has; the ``run_identity`` fixture sets one.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.app.metadata import Metadata
from flwr.supercore.task_identity import TaskIdentity

from fedvault.common.errors import ConfigError, FederationError
from fedvault.server.app import SCHEMA_QUERY, query_schemas, site_nodes, wait_for_sites

pytestmark = pytest.mark.unit

_message_ids = itertools.count(1)


class FakeGrid:
    """The two Grid calls the helpers use: node ids, and one send-and-receive exchange."""

    def __init__(self, node_ids: Iterable[int], replies: list[Message] | None = None) -> None:
        self.node_ids = list(node_ids)
        self.replies = replies or []
        self.sent: list[Message] = []
        self.timeouts: list[float | None] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        self.sent.extend(messages)
        self.timeouts.append(timeout)
        return list(self.replies)


@pytest.fixture(autouse=True)
def run_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The run identity a ServerApp process has (Flower needs it to create messages)."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    yield


def reply_metadata(node: int) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"reply-{next(_message_ids)}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="schema-query",
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type=SCHEMA_QUERY,
    )


def schema_reply(node: int, site: str, **overrides: Any) -> Message:
    schema: dict[str, Any] = {
        "site": site,
        "feature-shape": [30],
        "num-classes": 2,
        "kind": "tabular",
        "train-rows": 100,
        "test-rows": 25,
    }
    schema.update(overrides)
    content = RecordDict({"schema": ConfigRecord(schema)})
    # `metadata=` is how Flower itself rebuilds a delivered message (absent from the overloads).
    return Message(content, metadata=reply_metadata(node))  # type: ignore[call-overload]


def schema_error(node: int, reason: str) -> Message:
    error = Error(code=1004, reason=reason)
    return Message(error, metadata=reply_metadata(node))  # type: ignore[call-overload]


# --- query_schemas -------------------------------------------------------------------------------


def test_consistent_schemas_are_returned_by_node() -> None:
    # Prepare
    grid = FakeGrid(
        [11, 22],
        [schema_reply(22, "beta", **{"train-rows": 80}), schema_reply(11, "alpha")],
    )

    # Execute
    schemas = query_schemas(grid, [11, 22], timeout=7.0)  # type: ignore[arg-type]

    # Assert: one schema query per node, with the round timeout; answers keyed by node
    assert sorted(m.metadata.dst_node_id for m in grid.sent) == [11, 22]
    assert {m.metadata.message_type for m in grid.sent} == {SCHEMA_QUERY}
    assert grid.timeouts == [7.0]
    assert set(schemas) == {11, 22}
    assert schemas[11]["site"] == "alpha"
    assert schemas[22]["site"] == "beta"
    assert schemas[22]["train-rows"] == 80
    assert list(schemas[11]["feature-shape"]) == [30]
    assert schemas[11]["num-classes"] == 2


@pytest.mark.parametrize(
    ("key", "value"), [("feature-shape", [31]), ("num-classes", 3), ("kind", "image")]
)
def test_sites_that_disagree_on_the_schema_are_refused_naming_both(key: str, value: Any) -> None:
    # Prepare
    grid = FakeGrid([1, 2], [schema_reply(1, "alpha"), schema_reply(2, "beta", **{key: value})])

    # Execute
    with pytest.raises(FederationError) as info:
        query_schemas(grid, [1, 2], timeout=5.0)  # type: ignore[arg-type]

    # Assert
    message = str(info.value)
    assert f"disagree on {key}" in message
    assert "alpha" in message
    assert "beta" in message


def test_two_sites_with_the_same_name_are_refused() -> None:
    # Prepare
    grid = FakeGrid([1, 2], [schema_reply(1, "alpha"), schema_reply(2, "alpha")])

    # Execute / Assert
    with pytest.raises(FederationError, match=r"same name.*alpha"):
        query_schemas(grid, [1, 2], timeout=5.0)  # type: ignore[arg-type]


def test_a_site_that_cannot_load_its_data_fails_the_query_with_its_reason() -> None:
    # Prepare
    reason = "DataError: data file /srv/site/data.csv has no label column 'diagnosis'"
    grid = FakeGrid([1, 2], [schema_reply(1, "alpha"), schema_error(2, reason)])

    # Execute
    with pytest.raises(FederationError) as info:
        query_schemas(grid, [1, 2], timeout=5.0)  # type: ignore[arg-type]

    # Assert
    assert reason in str(info.value)
    assert "node 2" in str(info.value)


def test_a_site_that_does_not_answer_in_time_fails_the_query() -> None:
    # Prepare: three nodes asked, two answer
    grid = FakeGrid([1, 2, 3], [schema_reply(1, "alpha"), schema_reply(3, "gamma")])

    # Execute / Assert
    with pytest.raises(FederationError, match="1 site\\(s\\) did not answer"):
        query_schemas(grid, [1, 2, 3], timeout=5.0)  # type: ignore[arg-type]


# --- wait_for_sites ------------------------------------------------------------------------------


def test_wait_for_sites_returns_the_first_n_node_ids() -> None:
    # Prepare
    grid = FakeGrid([42, 7, 19, 3])

    # Execute
    started = time.monotonic()
    nodes = wait_for_sites(grid, 3, timeout=30.0)  # type: ignore[arg-type]

    # Assert: lowest ids first, without waiting
    assert nodes == [3, 7, 19]
    assert time.monotonic() - started < 1.0


def test_wait_for_sites_waits_for_a_late_site() -> None:
    # Prepare: the second site connects after the first poll
    class LateGrid(FakeGrid):
        polls = 0

        def get_node_ids(self) -> Iterable[int]:
            self.polls += 1
            return [5] if self.polls == 1 else [5, 9]

    grid = LateGrid([])

    # Execute
    nodes = wait_for_sites(grid, 2, timeout=10.0)  # type: ignore[arg-type]

    # Assert
    assert nodes == [5, 9]
    assert grid.polls == 2


def test_wait_for_sites_gives_up_after_its_timeout_saying_how_many_came() -> None:
    # Prepare
    grid = FakeGrid([8])

    # Execute
    started = time.monotonic()
    with pytest.raises(FederationError, match="only 1 of 3 sites connected") as info:
        wait_for_sites(grid, 3, timeout=1.0)  # type: ignore[arg-type]
    took = time.monotonic() - started

    # Assert: it did wait its timeout, and not much longer
    assert 1.0 <= took < 5.0
    assert "fedvault client start" in info.value.hint


# --- identity from authentication ----------------------------------------------------------------


def test_in_a_deployment_schemas_are_filed_under_the_authenticated_site_not_the_claimed_one() -> (
    None
):
    # Prepare: node 11 authenticated as alpha claims to be beta; node 22 (beta) tells the truth
    grid = FakeGrid([11, 22], [schema_reply(11, "beta"), schema_reply(22, "beta")])

    # Execute
    schemas = query_schemas(grid, [11, 22], 5.0, {11: "alpha", 22: "beta"})  # type: ignore[arg-type]

    # Assert: no "same name" error, and alpha is alpha
    assert schemas[11]["site"] == "alpha"
    assert schemas[22]["site"] == "beta"


def test_site_nodes_reads_the_coordinators_authenticated_map() -> None:
    assert site_nodes({"site-nodes": '{"11": "alpha", "22": "beta"}'}) == {11: "alpha", 22: "beta"}
    assert site_nodes({"site-nodes": ""}) == {}
    assert site_nodes({}) == {}
    with pytest.raises(ConfigError):
        site_nodes({"site-nodes": '["alpha"]'})
    with pytest.raises(ConfigError):
        site_nodes({"site-nodes": '{"x": "alpha"}'})
