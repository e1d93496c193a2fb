"""Tests for client/site_progress.py: one progress event per message a deployed site handled."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata

from fedvault.client.site_progress import PROGRESS_PATH_KEY, reports_progress
from fedvault.common.errors import POLICY_REFUSAL_CODE
from fedvault.common.progress import Follower

pytestmark = pytest.mark.unit


def _message(kind: str, server_round: int) -> Message:
    metadata = Metadata(
        run_id=7, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
        group_id="", created_at=time.time(), ttl=3600.0, message_type=kind,
    )  # fmt: skip
    content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
    return Message(content, metadata=metadata)  # type: ignore[call-overload]


def _context(node_config: dict[str, str]) -> Context:
    return Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config={})  # fmt: skip


def test_a_handled_message_and_a_refusal_are_reported(tmp_path: Path) -> None:
    # Prepare: a train handler that answers, one that refuses
    path = tmp_path / "progress.jsonl"
    context = _context({PROGRESS_PATH_KEY: str(path)})

    @reports_progress
    def trains(msg: Message, ctx: Context) -> Message:
        metrics = MetricRecord({"num-examples": 120, "epsilon": 0.5, "max-epsilon": 4.0})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    @reports_progress
    def refuses(msg: Message, ctx: Context) -> Message:
        return Message(Error(code=POLICY_REFUSAL_CODE, reason="SiteRefusal: no"), reply_to=msg)

    # Execute
    trains(_message("train", 2), context)
    refuses(_message("train", 3), context)

    # Assert: counts, ε and the refusal; never a weight or a row
    trained, refused = Follower(path, from_start=True).new_events()
    assert (trained["kind"], trained["round"], trained["rows"]) == ("train", 2, 120)
    assert (trained["epsilon"], trained["max_epsilon"]) == (0.5, 4.0)
    assert refused["refused"] == "SiteRefusal: no" and refused["round"] == 3
    assert set(trained) <= {"time", "kind", "round", "run", "seconds", "rows", "epsilon",
                            "max_epsilon", "accuracy"}  # fmt: skip


def test_a_raising_handler_is_reported_failed_and_still_raises(tmp_path: Path) -> None:
    path = tmp_path / "progress.jsonl"

    @reports_progress
    def breaks(msg: Message, ctx: Context) -> Message:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        breaks(_message("evaluate", 1), _context({PROGRESS_PATH_KEY: str(path)}))

    [event] = Follower(path, from_start=True).new_events()
    assert event["kind"] == "evaluate" and "failed" in event


def test_a_simulated_site_writes_no_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where a default, relative progress file would land

    @reports_progress
    def answers(msg: Message, ctx: Context) -> Message:
        return Message(RecordDict(), reply_to=msg)

    answers(_message("train", 1), _context({"partition-id": "0"}))

    assert list(tmp_path.iterdir()) == []
