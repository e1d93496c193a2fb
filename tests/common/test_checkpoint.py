"""Tests for common/checkpoint.py: atomic per-round checkpoints and trimming rows on resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedvault.common.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    config_digest,
    drop_rows_after,
    load_checkpoint,
    report_from_json,
    report_to_json,
    save_checkpoint,
)
from fedvault.common.errors import ConfigError
from fedvault.common.report import METRICS_FILE, ROUNDS_FILE, RunDirectory, read_jsonl

pytestmark = pytest.mark.unit


def checkpoint(round_: int = 2) -> Checkpoint:
    return Checkpoint(
        round=round_,
        total_rounds=4,
        config_sha256=config_digest("name = 'x'\n"),
        model={"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)},
        strategy_arrays={"m_t": {"w": np.full((2, 3), 0.5)}},
        strategy_json={"central_dp_accountant": {"releases": 2}},
        report={"refusals": {"1": {"site-a": "budget"}}},
    )


def test_a_checkpoint_reads_back_exactly_as_written(tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path)
    written = checkpoint()

    save_checkpoint(run_dir, written)
    read = load_checkpoint(tmp_path)

    assert (read.round, read.total_rounds, read.config_sha256) == (2, 4, written.config_sha256)
    assert set(read.model) == {"w", "b"}
    assert torch.equal(read.model["w"], written.model["w"])
    assert np.array_equal(read.strategy_arrays["m_t"]["w"], np.full((2, 3), 0.5))
    assert read.strategy_json == written.strategy_json
    assert read.report == written.report
    assert not read.finished
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]  # no temporary left


def test_a_newer_checkpoint_replaces_the_old_one(tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path)

    save_checkpoint(run_dir, checkpoint(1))
    save_checkpoint(run_dir, checkpoint(4))

    assert load_checkpoint(tmp_path).round == 4
    assert load_checkpoint(tmp_path).finished


def test_a_missing_checkpoint_is_a_one_line_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"has no checkpoint\.pt: nothing to resume"):
        load_checkpoint(tmp_path)


def test_a_damaged_checkpoint_is_refused_not_unpickled(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")

    with pytest.raises(ConfigError, match="is not a readable fedvault checkpoint"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_holding_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    # weights_only loading: a pickled object (here a set) is never executed or accepted
    torch.save({"format": 1, "round": 1, "payload": {1, 2}}, tmp_path / CHECKPOINT_FILE)

    with pytest.raises(ConfigError):
        load_checkpoint(tmp_path)


def test_rows_of_rounds_after_the_checkpoint_are_dropped(tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path)
    run_dir.append_rows(ROUNDS_FILE, [{"round": r} for r in range(4)])
    run_dir.append_rows(METRICS_FILE, [{"round": r, "site": s} for r in range(4) for s in "ab"])

    dropped = drop_rows_after(run_dir, 2)

    assert dropped == 1 + 2
    assert [r["round"] for r in read_jsonl(tmp_path / ROUNDS_FILE)] == [0, 1, 2]
    assert {r["round"] for r in read_jsonl(tmp_path / METRICS_FILE)} == {0, 1, 2}
    assert drop_rows_after(run_dir, 2) == 0


def test_report_records_survive_json_with_integer_rounds() -> None:
    records = {"refusals": {3: {"a": "budget"}}, "failures": {1: {"b": "gone"}}}

    data = report_to_json(records)

    assert report_from_json(data, "refusals") == {3: {"a": "budget"}}
    assert report_from_json(data, "failures") == {1: {"b": "gone"}}
    assert report_from_json(data, "rejections") == {}


def test_the_config_digest_changes_with_the_config() -> None:
    assert config_digest("a = 1\n") == config_digest("a = 1\n")
    assert config_digest("a = 1\n") != config_digest("a = 2\n")
