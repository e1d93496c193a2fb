"""Message lifetimes: a round's instructions expire at its deadline, kept to trace replies."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message

#: The two kinds of instruction a round sends.
TRAIN, EVALUATE = "train", "evaluate"


class SentInstructions:
    """The last instructions configured, train and evaluate apart, each expiring at the
    round's deadline.

    A deployment sends a round's evaluation with the next round's training; Flower's Grid
    sets each instruction's message id in place as it sends it, so an error reply can be
    traced to its destination (``destinations``).
    """

    def __init__(self, *, round_timeout: float) -> None:
        self.round_timeout = round_timeout
        self._sent: dict[str, list[Message]] = {TRAIN: [], EVALUATE: []}

    def send(self, kind: str, messages: Iterable[Message]) -> list[Message]:
        """The round's ``kind`` instructions, each expiring at the round's deadline: a site
        that comes back late never trains (and spends privacy budget) for a round already
        closed. Kept as the last ``kind`` instructions sent."""
        out = list(messages)
        for message in out:
            message.metadata.ttl = min(message.metadata.ttl, self.round_timeout)
        self._sent[kind] = out
        return out

    def last(self, kind: str) -> list[Message]:
        """The last ``kind`` instructions sent."""
        return self._sent[kind]

    def destinations(self, kind: str) -> dict[str, int]:
        """Message id → destination node of each of the last ``kind`` instructions."""
        return {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent[kind]}
