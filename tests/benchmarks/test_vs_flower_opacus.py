"""benchmarks.vs_flower_opacus: its orchestration, arithmetic, tables and log parsing.

main() runs in this process with both sides' runs replaced by canned records: the fedvault
side's `fedvault simulate` is what tests/simulations/test_simulate.py runs. Which side is
faster is the benchmark's finding (benchmarks/RESULTS.md), not a test's.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest

from benchmarks import vs_flower_opacus
from benchmarks.vs_flower_opacus import (
    CLI_IMPORTS,
    SIDES,
    TIMELINE,
    _example_accuracies,
    _example_max_epsilon,
    _phases,
    pair_orders,
    timeline,
)
from tests.benchmarks.conftest import recorder, run_main, table_rows


def canned_run(side: str, wall: float, marks: list[float]) -> dict[str, Any]:
    """What run_fedvault / run_example return, for a run with round marks ``marks``."""
    timeline = {step: float(index + 1) for index, step in enumerate(TIMELINE)}
    return {"side": side, "wall_seconds": wall, "timeline": timeline, **_phases(marks, wall),
            "rounds": len(marks) - 1, "final_accuracy": 0.9, "max_epsilon": 1.0}  # fmt: skip


@pytest.mark.unit
def test_quick_main_runs_one_pair_and_compares_the_medians(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: canned runs in place of `fedvault simulate` and the example's `flwr run`
    fedvault_calls, fake_fedvault = recorder(
        lambda folder, rounds, sigma: canned_run("fedvault", 30.0, [10.0, 25.0])
    )
    example_calls, fake_example = recorder(
        lambda folder, rounds, sigma: canned_run("example", 20.0, [5.0, 18.0])
    )
    monkeypatch.setattr(vs_flower_opacus, "run_fedvault", fake_fedvault)
    monkeypatch.setattr(vs_flower_opacus, "run_example", fake_example)
    monkeypatch.setattr(
        vs_flower_opacus, "cli_imports",
        lambda repeats: [{"what": w, "import": i, "seconds": 0.1} for w, i in CLI_IMPORTS.items()],
    )  # fmt: skip

    # Execute
    printed, payload = run_main(vs_flower_opacus, tmp_path, capsys)

    # Assert: --quick is one pair of one round at σ = 2.285, fedvault first, each in its folder
    assert payload["settings"] == {
        "sites": 3, "rounds": 1, "noise_multiplier": 2.285, "pairs": 1,
        "model": "logistic", "dataset": "breast-cancer",
    }  # fmt: skip
    assert [(c[0].name, c[1], c[2]) for c in fedvault_calls] == [("pair1-fedvault", 1, 2.285)]
    assert [(c[0].name, c[1], c[2]) for c in example_calls] == [("pair1-example", 1, 2.285)]
    (pair,) = payload["pairs"]
    assert pair["order"] == ["fedvault", "example"]
    assert all(len(pair[side]["load_average_before"]) == 3 for side in SIDES)
    summary = payload["summary"]
    assert (summary["fedvault_median_seconds"], summary["example_median_seconds"]) == (30.0, 20.0)
    assert summary["ratio_of_medians"] == 1.5 == summary["median_pair_ratio"]
    assert summary["fedvault_at_or_below"] is False
    assert summary["profile"]["fedvault"]["startup_seconds"] == 10.0
    assert summary["profile"]["example"]["first_round_seconds"] == 13.0
    assert summary["profile"]["example"]["later_rounds_median_seconds"] is None
    assert [row["what"] for row in payload["cli_imports"]] == list(CLI_IMPORTS)
    # the tables and the verdict
    (row,) = table_rows(printed, "1")
    assert row[1:5] == ["fedvault example", "30.0", "20.0", "1.5"]
    assert table_rows(printed, "fedvault")[0][1:3] == ["30.0", "1.0"]  # wall s, superlink_up
    assert table_rows(printed, "example")[0][1] == "20.0"
    assert "ratio 1.5: fedvault is ABOVE the example" in printed


@pytest.mark.unit
def test_timeline_reads_each_step_from_a_superlink_log(tmp_path: Path) -> None:
    # Prepare: a SuperLink log with colour codes, as uvicorn writes it
    spawned = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC).timestamp()
    log = tmp_path / "superlink.log"
    log.write_text(
        "2026-01-01T12:00:01.500000Z \x1b[32mINFO\x1b[0m Uvicorn running on http://127.0.0.1\n"
        "2026-01-01T12:00:03.250000Z INFO POST /v1/control/start-run 200\n"
        "2026-01-01T12:00:04.000000Z INFO POST /v1/runtime/pull-task-input 200\n"
        "2026-01-01T12:00:09.000000Z INFO POST /v1/runtime/pull-task-input 200\n",
        encoding="utf-8",
    )

    # Execute
    marks = timeline(log, spawned)

    # Assert: each step's first line, in seconds from spawning; a step never logged is None
    assert marks == {
        "superlink_up": 1.5, "run_submitted": 3.25, "simulation_started": 4.0,
        "simulation_done": None,
    }  # fmt: skip
    assert timeline(tmp_path / "missing.log", spawned) == dict.fromkeys(TIMELINE)


@pytest.mark.unit
def test_the_examples_accuracy_and_epsilon_are_read_from_its_printed_result() -> None:
    # Prepare: the tail of `flwr run --stream` for two rounds
    text = """[ROUND 1/2]
{'max_epsilon': '0.71'}
[ROUND 2/2]
{'max_epsilon': '1.00'}
Strategy execution finished
Aggregated ClientApp-side Evaluate Metrics:
{ 1: {'accuracy': '8.5e-01'},
  2: {'accuracy': '0.9'}}
ServerApp-side Evaluate Metrics:
{ 1: {'accuracy': '0.1'}}"""
    lines = [(float(i), line) for i, line in enumerate(text.splitlines())]

    # Execute / Assert: the clients' federated accuracies, not the server's; the last ε
    assert _example_accuracies(lines) == [0.85, 0.9]
    assert _example_max_epsilon(lines) == 1.0
    assert _example_max_epsilon([]) is None


@pytest.mark.unit
def test_pairs_alternate_which_side_runs_first() -> None:
    assert pair_orders(1) == [("fedvault", "example")]
    assert pair_orders(4) == [
        ("fedvault", "example"),
        ("example", "fedvault"),
        ("fedvault", "example"),
        ("example", "fedvault"),
    ]


@pytest.mark.unit
def test_phases_split_a_run_into_startup_rounds_and_end() -> None:
    # round 1 begins at 10 s, round 2 at 13 s, the last round ends at 17 s, exit at 20 s
    assert _phases([10.0, 13.0, 17.0], 20.0) == {
        "startup_seconds": 10.0,
        "round_seconds": [3.0, 4.0],
        "end_seconds": 3.0,
    }
    # a mark not found: no profile rather than a wrong one
    assert _phases([10.0, None], 20.0)["startup_seconds"] is None
