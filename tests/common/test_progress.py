"""Tests for common/progress.py: events appended, followed and printed as one line each."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fedvault.common.progress import (
    Follower,
    append_event,
    format_coordinator_event,
    format_site_event,
)

pytestmark = pytest.mark.unit


def test_a_follower_sees_only_new_complete_events(tmp_path: Path) -> None:
    # Prepare: an event from before the follower started
    path = tmp_path / "progress.jsonl"
    append_event(path, kind="train", round=1)
    follower = Follower(path)

    # Execute: a new event, then half a line (a writer caught mid-write), then its end
    append_event(path, kind="evaluate", round=1)
    first = follower.new_events()
    with path.open("a") as handle:
        handle.write('{"kind": "train", ')
    torn = follower.new_events()
    with path.open("a") as handle:
        handle.write('"round": 2}\n')
    completed = follower.new_events()

    # Assert
    assert [e["kind"] for e in first] == ["evaluate"]
    assert torn == []
    assert completed == [{"kind": "train", "round": 2}]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [e["kind"] for e in Follower(path, from_start=True).new_events()] == [
        "train", "evaluate", "train",
    ]  # fmt: skip


def test_an_unwritable_progress_file_never_fails_the_work(tmp_path: Path) -> None:
    append_event(tmp_path / "missing" / "progress.jsonl", kind="train")  # no error
    append_event(None, kind="train")
    assert not (tmp_path / "missing").exists()


def test_site_lines_say_round_kind_rows_seconds_and_epsilon_or_the_refusal() -> None:
    trained = {"kind": "train", "round": 3, "rows": 120, "seconds": 1.234,
               "epsilon": 0.8421, "max_epsilon": 10.0}  # fmt: skip
    refused = {"kind": "train", "round": 4, "refused": "SiteRefusal: delta 0.99 is not 1e-05"}

    assert format_site_event(trained) == "round 3   train       120 rows  1.23 s  ε 0.842 / cap 10"
    assert format_site_event(refused) == (
        "round 4   train    REFUSED: SiteRefusal: delta 0.99 is not 1e-05"
    )
    assert format_site_event({"kind": "schema", "rows": 9, "seconds": 0.1}).startswith(
        "run setup schema"
    )


def test_coordinator_lines_for_a_runs_start_rounds_and_end() -> None:
    start = {"event": "start", "run": "r1", "rounds": 3, "sites": ["a", "b"]}
    line = {"event": "round", "run": "r1", "line": "round 1/3  accuracy 0.900"}
    end = {"event": "end", "run": "r1", "outcome": "finished", "epsilon": 0.5, "accuracy": 0.9}

    assert format_coordinator_event(start) == "run r1 started: 3 rounds; sites a, b"
    assert format_coordinator_event(line) == "run r1: round 1/3  accuracy 0.900"
    assert format_coordinator_event(end) == ("run r1 ended: finished, max ε 0.500, accuracy 0.900")
