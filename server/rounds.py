"""A run's rounds: train at the sites, evaluate the new global model there, report the round.

Flower's ``Strategy.start`` runs each round as two exchanges, one after the other: the train
instructions, then, once their replies are aggregated, the evaluate instructions for the new
model. fedvault drives the same strategy calls (configure, aggregate) itself, for two
reasons:

- a resumed run goes on from its checkpointed round under the run's real round numbers;
- in a deployment the exchanges are **pipelined**: evaluating round r's model and training
  round r + 1 both need only that model, so their instructions go out together. A site's
  SuperNode handles its messages one at a time, so each site evaluates, then trains at once,
  without waiting for the coordinator in between, and the coordinator writes round r's row
  and checkpoint while the sites train. What is trained, evaluated and reported is the same
  as in the sequential order; only the wait between the two exchanges goes.

A simulation runs them in sequence: Flower's Simulation Engine may run two messages for one
site at the same time, each on its own copy of the site's context, and the copy written back
last would undo the other's context state (the run's σ plan).
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from fedvault.server.grid import PromptGrid

#: Called with a round number and its global model once its evaluation is aggregated.
Report = Callable[[int, ArrayRecord], None]


class Rounds:
    """Rounds ``first``..``last`` of ``strategy`` over ``grid``, each reported by ``report``."""

    def __init__(
        self,
        strategy: Strategy,
        grid: PromptGrid,
        *,
        timeout: float,
        report: Report,
        pipelined: bool,
    ) -> None:
        self.strategy = strategy
        self.grid = grid
        self.timeout = timeout
        self.report = report
        self.pipelined = pipelined

    def run(
        self, arrays: ArrayRecord, *, first: int, last: int, evaluate_first: bool
    ) -> ArrayRecord:
        """The global model after round ``last``. With ``evaluate_first`` the given model is
        evaluated and reported first, as round ``first - 1`` (a new run's baseline, round 0)."""
        how = " (each evaluation sent with the next round's training)" if self.pipelined else ""
        log(INFO, "fedvault: rounds %d to %d%s", first, last, how)
        pending = first - 1 if evaluate_first else None  # a model not yet evaluated
        for server_round in range(first, last + 1):
            log(INFO, "[ROUND %d/%d]", server_round, last)
            if pending is not None and not self.pipelined:
                self._evaluate(pending, arrays)
                pending = None
            exchanges: list[tuple[list[Message], Callable[[list[Message]], None]]] = []
            if pending is not None:
                exchanges.append(self._evaluation(pending, arrays))
            trained: list[Message] = []
            exchanges.append((self._configure_train(server_round, arrays), trained.extend))
            self.grid.send_and_receive_in_turn(exchanges, timeout=self.timeout)
            new_arrays, _ = self.strategy.aggregate_train(server_round, trained)
            arrays = new_arrays if new_arrays is not None else arrays  # as Strategy.start
            pending = server_round
        if pending is not None:
            self._evaluate(pending, arrays)
        return arrays

    def _configure_train(self, server_round: int, arrays: ArrayRecord) -> list[Message]:
        return list(self.strategy.configure_train(server_round, arrays, ConfigRecord(), self.grid))

    def _evaluation(
        self, server_round: int, arrays: ArrayRecord
    ) -> tuple[list[Message], Callable[[list[Message]], None]]:
        """The evaluate instructions of a round, and what is done with their replies."""
        messages = list(
            self.strategy.configure_evaluate(server_round, arrays, ConfigRecord(), self.grid)
        )

        def aggregate_and_report(replies: list[Message]) -> None:
            self.strategy.aggregate_evaluate(server_round, replies)
            self.report(server_round, arrays)

        return messages, aggregate_and_report

    def _evaluate(self, server_round: int, arrays: ArrayRecord) -> None:
        self.grid.send_and_receive_in_turn([self._evaluation(server_round, arrays)],
                                           timeout=self.timeout)  # fmt: skip
