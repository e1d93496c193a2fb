"""Tests for common/report.py: crash-safe run-directory files and the per-round aggregation."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from fedvault.common import report
from fedvault.common.report import (
    METRIC_COLUMNS,
    PLOT_FILE,
    RunDirectory,
    format_progress,
    read_jsonl,
    round_row,
    site_rows,
)

pytestmark = pytest.mark.unit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def round_rows(count: int = 3) -> list[dict[str, Any]]:
    return [{"round": r, "accuracy": 0.5 + 0.1 * r, "epsilon": 0.3 * r} for r in range(count)]


def train_metrics(epsilon: float, *, examples: int = 100) -> dict[str, float]:
    return {
        "num-examples": examples,
        "epsilon": epsilon,
        "delta": 1e-5,
        "noise-multiplier": 1.1,
        "sample-rate": 0.25,
        "steps": 8,
        "round-steps": 4,
    }


def eval_metrics(accuracy: float, loss: float, examples: int) -> dict[str, float]:
    return {"accuracy": accuracy, "loss": loss, "num-examples": examples}


# --- files ------------------------------------------------------------------------------------


def test_append_rows_adds_rows_that_read_jsonl_returns_in_order(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")

    run.append_rows("m.jsonl", [{"round": 1}, {"round": 2}])
    run.append_rows("m.jsonl", [{"round": 3}])

    assert read_jsonl(run.file("m.jsonl")) == [{"round": 1}, {"round": 2}, {"round": 3}]


def test_read_jsonl_skips_a_torn_last_line(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)
    run.append_rows("m.jsonl", [{"round": 1}, {"round": 2}])
    with run.file("m.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"round": 3, "acc')  # a crash mid-write

    assert read_jsonl(run.file("m.jsonl")) == [{"round": 1}, {"round": 2}]


def test_rows_appended_after_a_torn_line_are_kept(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)
    run.append_rows("m.jsonl", [{"round": 1}])
    with run.file("m.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"round": 2, "acc')

    run.append_rows("m.jsonl", [{"round": 2}])

    assert read_jsonl(run.file("m.jsonl")) == [{"round": 1}, {"round": 2}]


def test_read_jsonl_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def test_write_json_writes_the_object_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)

    run.write_json("summary.json", {"rounds": 3, "epsilon": 0.9})
    run.write_json("summary.json", {"rounds": 4, "epsilon": 1.0})

    assert json.loads(run.file("summary.json").read_text()) == {"rounds": 4, "epsilon": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunDirectory(tmp_path)
    run.write_json("summary.json", {"rounds": 3})

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(report.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        run.write_json("summary.json", {"rounds": 4})

    assert json.loads(run.file("summary.json").read_text()) == {"rounds": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_save_model_writes_a_loadable_state_dict(tmp_path: Path) -> None:
    import torch

    run = RunDirectory(tmp_path)
    state = {"weight": torch.arange(6.0).reshape(2, 3)}

    run.save_model(state)

    loaded = torch.load(run.file(report.MODEL_FILE), weights_only=True)
    assert torch.equal(loaded["weight"], state["weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [report.MODEL_FILE]


def test_plot_writes_a_non_empty_png_and_nothing_else(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)

    path = run.plot(round_rows(3))

    assert path == run.file(PLOT_FILE)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == [PLOT_FILE]


# --- aggregation ------------------------------------------------------------------------------


def test_site_rows_carry_every_metric_column_per_site() -> None:
    rows = site_rows(
        2,
        {"site-1": train_metrics(0.5), "site-2": train_metrics(0.7)},
        {"site-1": eval_metrics(0.9, 0.2, 10), "site-2": eval_metrics(0.6, 0.5, 30)},
    )

    assert [r["site"] for r in rows] == ["site-1", "site-2"]
    for row in rows:
        assert set(METRIC_COLUMNS) <= row.keys()
        assert row["round"] == 2
    assert rows[1]["epsilon"] == 0.7
    assert (rows[1]["num_examples"], rows[1]["test_examples"]) == (100, 30)
    assert (rows[1]["steps"], rows[1]["round_steps"]) == (8, 4)


def test_round_zero_rows_have_no_privacy_spent() -> None:
    rows = site_rows(0, {}, {"site-1": eval_metrics(0.5, 0.7, 10)})

    assert rows[0]["epsilon"] == 0.0
    assert rows[0]["steps"] == 0
    assert rows[0]["accuracy"] == 0.5


def test_round_row_weights_accuracy_by_test_examples_and_takes_max_epsilon() -> None:
    rows = site_rows(
        1,
        {"a": train_metrics(0.4), "b": train_metrics(0.9), "c": train_metrics(0.6)},
        {"a": eval_metrics(1.0, 0.1, 10), "b": eval_metrics(0.5, 0.7, 30)},
    )

    row = round_row(1, rows, round_seconds=1.23456, elapsed_seconds=5.0, failed_sites=["c"])

    assert row["accuracy"] == pytest.approx((1.0 * 10 + 0.5 * 30) / 40)
    assert row["loss"] == pytest.approx((0.1 * 10 + 0.7 * 30) / 40)
    assert row["epsilon"] == 0.9
    assert row["sites"] == 2  # c trained but was not evaluated
    assert row["failed_sites"] == ["c"]
    assert row["round_seconds"] == 1.235


def test_round_row_without_evaluations_has_no_accuracy() -> None:
    row = round_row(1, [], round_seconds=0.0, elapsed_seconds=0.0)

    assert (row["accuracy"], row["loss"], row["epsilon"], row["sites"]) == (None, None, 0.0, 0)


def test_format_progress_shows_round_accuracy_and_epsilon() -> None:
    row = {
        "round": 2,
        "accuracy": 0.91234,
        "loss": 0.25,
        "epsilon": 0.8768,
        "round_seconds": 1.2,
        "elapsed_seconds": 3.4,
        "failed_sites": ["site-3"],
    }

    line = format_progress(row, total_rounds=5)

    assert line.startswith("round 2/5")
    assert "accuracy 0.912" in line
    assert "max ε 0.877" in line
    assert "failed: site-3" in line


def test_format_progress_labels_round_zero_as_the_initial_model() -> None:
    row = round_row(0, [], round_seconds=0.5, elapsed_seconds=0.5)

    line = format_progress(row, total_rounds=3)

    assert line.startswith("initial model")
    assert "accuracy n/a" in line


def test_rows_are_written_as_plain_json(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)
    row = round_row(1, [], round_seconds=0.1, elapsed_seconds=0.2)

    run.append_rows("rounds.jsonl", [row])

    assert read_jsonl(run.file("rounds.jsonl")) == [row]
    assert os.path.getsize(run.file("rounds.jsonl")) > 0


def test_privacy_section_lists_every_trained_round_and_each_sites_last_state() -> None:
    train = {
        1: {"a": {**train_metrics(0.4), "run-epsilon": 0.4, "max-epsilon": 3.0}},
        2: {"a": {**train_metrics(0.7), "run-epsilon": 0.6, "max-epsilon": 3.0}},
    }
    rows = [row for rnd, per in train.items() for row in site_rows(rnd, per, {})]

    section = report.privacy_section(rows, {}, enabled=True, accountant="prv", delta=1e-5)

    assert [(r["round"], r["epsilon"], r["run_epsilon"]) for r in section["per_round"]] == [
        (1, 0.4, 0.4),
        (2, 0.7, 0.6),
    ]
    assert all(r["accountant"] == "prv" for r in section["per_round"])
    site = section["sites"]["a"]
    assert (site["epsilon"], site["run_epsilon"], site["max_epsilon"]) == (0.7, 0.6, 3.0)
    assert site["rounds_trained"] == 2
    assert site["refused_rounds"] == []


def test_privacy_section_names_refusing_sites_and_their_rounds() -> None:
    rows = site_rows(1, {"a": train_metrics(0.4)}, {})
    refusals = {1: {"b": "site b refuses round 1: privacy budget exhausted"},
                2: {"b": "site b refuses round 2: privacy budget exhausted"}}  # fmt: skip

    section = report.privacy_section(rows, refusals, enabled=True, accountant="rdp", delta=1e-5)

    assert section["sites"]["b"]["refused_rounds"] == [1, 2]
    assert section["sites"]["b"]["rounds_trained"] == 0
    assert [(r["round"], r["site"]) for r in section["refusals"]] == [(1, "b"), (2, "b")]
    assert "b" not in {r["site"] for r in section["per_round"]}


def test_format_progress_separates_refusals_from_failures() -> None:
    row = round_row(3, [], round_seconds=1, elapsed_seconds=2,
                    failed_sites=["b", "c"], refused_sites=["b"])  # fmt: skip

    line = format_progress(row, 5)

    assert "refused: b" in line
    assert "failed: c" in line
    assert "failed: b" not in line
