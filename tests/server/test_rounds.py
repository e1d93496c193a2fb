"""Tests for server/rounds.py: a run's rounds, in sequence or with evaluation pipelined.

The strategy and the sites are scripted stand-ins that log every step; the real strategy and
real sites run these rounds in every simulation and deployment test.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any, cast

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedvault.common.errors import FederationError
from fedvault.server import grid as grid_module
from fedvault.server.grid import PromptGrid
from fedvault.server.rounds import Rounds
from tests.server.test_grid import PushPullGrid

pytestmark = pytest.mark.unit

SITES = (1, 2)


def model(name: str) -> ArrayRecord:
    """A stand-in global model, told apart by its name."""
    return cast(ArrayRecord, SimpleNamespace(name=name))


def message(kind: str, server_round: int, node: int) -> Message:
    return cast(Message, SimpleNamespace(kind=kind, round=server_round, node=node))


class Sites(PushPullGrid):
    """Every pushed instruction is answered by the next pull, unless held back: ``late``
    replies (by kind) come one pull after the others."""

    def __init__(self, log: list[str], *, late: str = "") -> None:
        self.log = log
        self.late = late
        self.pushed: dict[str, Any] = {}
        self.pulls = 0

    def get_node_ids(self) -> Iterable[int]:
        return SITES

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for m in messages:
            mid = f"{m.kind}-{m.round}-{m.node}"  # type: ignore[attr-defined]
            self.pushed[mid] = (m, self.pulls)
            ids.append(mid)
        self.log.append("push " + " ".join(sorted({i.rsplit("-", 1)[0] for i in ids})))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        out = []
        for mid in message_ids:
            sent, at = self.pushed[mid]
            if self.pulls > at + (2 if sent.kind == self.late else 1):
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid),
                                           kind=sent.kind, round=sent.round))  # fmt: skip
        return cast(list[Message], out)


class Scripted(Strategy):
    """Logs each configure/aggregate; round r's aggregation gives the model "m<r>"."""

    def __init__(self, log: list[str], *, fail_round: int | None = None) -> None:
        self.log = log
        self.fail_round = fail_round

    def summary(self) -> None:
        pass

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.log.append(f"configure train {server_round} on {arrays.name}")  # type: ignore[attr-defined]
        return [message("train", server_round, n) for n in SITES]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        got = sorted(r.round for r in replies)  # type: ignore[attr-defined]
        self.log.append(f"aggregate train {server_round} {got}")
        if server_round == self.fail_round:
            raise FederationError(f"round {server_round} ended the run")
        return model(f"m{server_round}"), None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.log.append(f"configure evaluate {server_round} on {arrays.name}")  # type: ignore[attr-defined]
        return [message("evaluate", server_round, n) for n in SITES]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        got = sorted(r.round for r in replies)  # type: ignore[attr-defined]
        self.log.append(f"aggregate evaluate {server_round} {got}")
        return None


def run(
    *, pipelined: bool, first: int = 1, last: int = 2, evaluate_first: bool = True,
    late: str = "", fail_round: int | None = None,
) -> tuple[list[str], list[str], str]:  # fmt: skip
    """(everything that happened, what was reported, the final model's name)."""
    log: list[str] = []
    reported: list[str] = []

    def report(server_round: int, arrays: ArrayRecord) -> None:
        entry = f"report {server_round} {arrays.name}"  # type: ignore[attr-defined]
        log.append(entry)
        reported.append(entry)

    rounds = Rounds(Scripted(log, fail_round=fail_round), PromptGrid(Sites(log, late=late)),
                    timeout=60, report=report, pipelined=pipelined)  # fmt: skip
    final = rounds.run(model("m0"), first=first, last=last, evaluate_first=evaluate_first)
    return log, reported, final.name  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grid_module.time, "sleep", lambda s: None)


def test_pipelined_rounds_send_each_evaluation_with_the_next_rounds_training() -> None:
    log, _, final = run(pipelined=True)

    assert log == [
        "configure evaluate 0 on m0",
        "configure train 1 on m0",
        "push evaluate-0",
        "push train-1",  # both out before any reply is pulled
        "aggregate evaluate 0 [0, 0]",
        "report 0 m0",
        "aggregate train 1 [1, 1]",
        "configure evaluate 1 on m1",
        "configure train 2 on m1",
        "push evaluate-1",
        "push train-2",
        "aggregate evaluate 1 [1, 1]",
        "report 1 m1",
        "aggregate train 2 [2, 2]",
        "configure evaluate 2 on m2",  # the last round's model: evaluated alone
        "push evaluate-2",
        "aggregate evaluate 2 [2, 2]",
        "report 2 m2",
    ]
    assert final == "m2"


def test_in_sequence_each_round_trains_then_evaluates_and_reports_the_same() -> None:
    log, reported, final = run(pipelined=False)
    _, reported_pipelined, final_pipelined = run(pipelined=True)

    pushes = [line for line in log if line.startswith("push")]
    assert pushes == ["push evaluate-0", "push train-1", "push evaluate-1", "push train-2",
                      "push evaluate-2"]  # fmt: skip
    assert log.index("report 0 m0") < log.index("push train-1")  # one exchange at a time
    assert reported == reported_pipelined == ["report 0 m0", "report 1 m1", "report 2 m2"]
    assert final == final_pipelined == "m2"


def test_an_evaluation_answered_after_the_training_is_still_reported_first() -> None:
    log, reported, _ = run(pipelined=True, late="evaluate")

    assert log.index("report 0 m0") < log.index("aggregate train 1 [1, 1]")
    assert log.index("report 1 m1") < log.index("aggregate train 2 [2, 2]")
    assert reported == ["report 0 m0", "report 1 m1", "report 2 m2"]


@pytest.mark.parametrize("pipelined", [True, False])
def test_a_resumed_run_goes_on_under_its_real_round_numbers(pipelined: bool) -> None:
    # Prepare: the checkpoint holds round 2 (its model "m0" here), evaluated and reported
    log, reported, final = run(pipelined=pipelined, first=3, last=4, evaluate_first=False)

    assert "configure train 3 on m0" in log
    assert not any(line.startswith("configure evaluate 2") for line in log)
    assert reported == ["report 3 m3", "report 4 m4"]
    assert final == "m4"


def test_a_round_that_ends_the_run_comes_after_the_previous_rounds_report() -> None:
    log: list[str] = []
    rounds = Rounds(Scripted(log, fail_round=2), PromptGrid(Sites(log)), timeout=60,
                    report=lambda r, a: log.append(f"report {r}"), pipelined=True)  # fmt: skip

    with pytest.raises(FederationError, match="round 2 ended the run"):
        rounds.run(model("m0"), first=1, last=3, evaluate_first=True)

    # round 1's evaluation was out with round 2's training: reported before the run ended
    assert log[-2:] == ["report 1", "aggregate train 2 [2, 2]"]
