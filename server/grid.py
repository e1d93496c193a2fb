"""A Grid that collects the sites' replies as they arrive instead of every 3 seconds.

Flower 1.39's ``HttpGrid.send_and_receive`` (what a ServerApp gets in a real deployment)
pushes the messages, then pulls the replies with a hard-coded ``time.sleep(3)`` between
pulls: a round's replies wait on average 1.5 s after the last site answered, twice per
round (train, evaluate). ``PromptGrid`` wraps whatever Grid Flower hands the ServerApp and
does the same push-then-pull with Flower's own ``push_messages`` / ``pull_messages`` at a
short interval; everything else is the wrapped Grid's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

#: Seconds between pulls while replies are outstanding (Flower's HttpGrid: 3 s).
REPLY_POLL_INTERVAL = 0.05
#: First retry of a reply object the SuperLink does not hold yet (Flower 1.39.0: 1 s, doubling).
PULL_BACKOFF_S = 0.02


def prompt_object_pulls() -> None:
    """Flower's HttpGrid pulls a reply's objects with ``pull_objects``, whose first retry after
    a missing object (the SuperLink has the reply, not yet its content) waits 1 s; make it
    :data:`PULL_BACKOFF_S` on flwr 1.39.0 (client/supernode.py does the same at the sites)."""
    import flwr
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    defaults = pull_objects.__kwdefaults__ or {}
    if flwr.__version__ == "1.39.0" and defaults.get("initial_backoff") == 1:
        defaults["initial_backoff"] = PULL_BACKOFF_S


class PromptGrid(Grid):
    """``inner`` with a ``send_and_receive`` that pulls every ``poll_interval`` seconds."""

    def __init__(self, inner: Grid, *, poll_interval: float = REPLY_POLL_INTERVAL) -> None:
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
        self.inner = inner
        self.poll_interval = poll_interval
        prompt_object_pulls()

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``; pull replies until all came or ``timeout`` seconds passed."""
        replies: list[Message] = []
        self.send_and_receive_in_turn([(messages, replies.extend)], timeout=timeout)
        return replies

    def send_and_receive_in_turn(
        self,
        exchanges: Sequence[tuple[Iterable[Message], Callable[[list[Message]], None]]],
        *,
        timeout: float | None = None,
    ) -> None:
        """Push every exchange's messages at once, then hand each exchange its replies.

        An exchange is (messages, handler). Its handler gets the replies as soon as all have
        come (or ``timeout`` seconds after the push, with those that came), and never before
        the handlers of the exchanges listed before it: replies are handled in the order the
        exchanges are given, while the later exchanges' messages are already at the sites.
        """
        waiting = [set(self.push_messages(messages)) for messages, _ in exchanges]
        replies: list[list[Message]] = [[] for _ in exchanges]
        deadline = None if timeout is None else time.monotonic() + timeout
        handled = 0

        def hand_over(*, all_of_them: bool) -> int:
            done = handled
            while done < len(exchanges) and (all_of_them or not waiting[done]):
                exchanges[done][1](replies[done])
                done += 1
            return done

        while handled < len(exchanges) and (deadline is None or time.monotonic() < deadline):
            outstanding = set().union(*waiting[handled:])
            for reply in self.pull_messages(outstanding) if outstanding else ():
                answered = reply.metadata.reply_to_message_id
                for k in range(handled, len(exchanges)):
                    if answered in waiting[k]:
                        waiting[k].discard(answered)
                        replies[k].append(reply)
                        break
            handled = hand_over(all_of_them=False)
            if handled < len(exchanges):
                time.sleep(self.poll_interval)
        hand_over(all_of_them=True)  # past the deadline: with the replies that came

    def __getattr__(self, name: str) -> Any:  # anything else Flower may reach for
        if name == "inner":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)
