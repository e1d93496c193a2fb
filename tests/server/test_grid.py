"""Tests for server/grid.py: replies are collected as they arrive, everything else delegated.

The wrapped Grid here is a scripted stand-in for Flower's HttpGrid (its replies arrive on
a given pull); the real one is wrapped in every deployment test (tests/server/).
"""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import cast

import pytest
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedvault.server import grid as grid_module
from fedvault.server.grid import PULL_BACKOFF_S, REPLY_POLL_INTERVAL, PromptGrid

pytestmark = pytest.mark.unit


def _reply(to: str) -> Message:
    """What PromptGrid reads of a reply: the message it answers."""
    return cast(Message, SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=to)))


def _messages(count: int) -> list[Message]:
    return [cast(Message, SimpleNamespace(index=i)) for i in range(count)]


class PushPullGrid(Grid):
    """A stand-in for the Grid PromptGrid wraps: only pushes and pulls (and node ids) work."""

    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        raise NotImplementedError

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise AssertionError("PromptGrid must not fall back to the wrapped 3-second poll")


class ScriptedGrid(PushPullGrid):
    """Replies to message ``i`` become pullable on pull number ``arrive_on[i]``."""

    def __init__(self, arrive_on: list[int]) -> None:
        self.arrive_on = arrive_on
        self.pulls = 0
        self.pushed: list[str] = []

    def get_node_ids(self) -> Iterable[int]:
        return [7, 8]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.pushed = [f"m{i}" for i, _ in enumerate(messages)]
        return list(self.pushed)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        wanted = set(message_ids)
        return [
            _reply(mid)
            for mid, pull in zip(self.pushed, self.arrive_on, strict=True)
            if pull == self.pulls and mid in wanted
        ]


def test_replies_are_pulled_at_the_short_interval_until_all_arrived(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    sleeps: list[float] = []
    monkeypatch.setattr(grid_module.time, "sleep", sleeps.append)
    inner = ScriptedGrid(arrive_on=[1, 4, 2])
    messages = _messages(3)

    # Execute
    replies = list(PromptGrid(inner).send_and_receive(messages, timeout=60))

    # Assert
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert inner.pulls == 4  # stops at the pull that brought the last reply
    assert sleeps == [REPLY_POLL_INTERVAL] * 3


def test_a_timeout_returns_the_replies_that_came(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a clock that advances 1 s per sleep; one site never answers
    clock = [0.0]
    monkeypatch.setattr(grid_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(grid_module.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + 1))
    inner = ScriptedGrid(arrive_on=[2, 10**6])
    messages = _messages(2)

    # Execute
    replies = list(PromptGrid(inner, poll_interval=1.0).send_and_receive(messages, timeout=5))

    # Assert
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert inner.pulls == 5


def test_everything_else_is_the_wrapped_grid() -> None:
    inner = ScriptedGrid(arrive_on=[])
    assert list(PromptGrid(inner).get_node_ids()) == [7, 8]
    assert PromptGrid(inner).arrive_on == []  # attributes Flower might reach for
    with pytest.raises(ValueError, match="poll_interval must be > 0, got 0"):
        PromptGrid(inner, poll_interval=0)


@pytest.mark.unit
def test_a_prompt_grid_makes_reply_object_pulls_retry_promptly() -> None:
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    defaults = pull_objects.__kwdefaults__
    assert defaults is not None
    saved = dict(defaults)
    try:
        defaults["initial_backoff"] = 1  # Flower 1.39.0's own
        PromptGrid(ScriptedGrid(arrive_on=[]))
        assert defaults["initial_backoff"] == PULL_BACKOFF_S
        assert {k: v for k, v in defaults.items() if k != "initial_backoff"} == {
            k: v for k, v in saved.items() if k != "initial_backoff"
        }
    finally:
        defaults.update(saved)
