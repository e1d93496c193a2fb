"""Tests for common/report_html.py: report.html from a run directory's files (no Flower run;
tests/simulations/test_simulate.py renders a real run's report in a browser)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from fedvault.common.report import (
    CONFIG_FILE,
    METRICS_FILE,
    PLOT_FILE,
    REPORT_FILE,
    ROUNDS_FILE,
    SITE_PLOT_FILE,
    SUMMARY_FILE,
    RunDirectory,
    classification_section,
    round_row,
    site_rows,
)
from fedvault.common.report_html import write_report

pytestmark = pytest.mark.unit

HOSTILE = '<script>alert("x")</script>'


def evals(accuracy_a: float) -> dict[str, dict[str, Any]]:
    return {
        "alpha": {
            "num-examples": 4.0,
            "accuracy": accuracy_a,
            "loss": 0.5,
            "confusion": [2.0, 0.0, 1.0, 1.0],
        },
        HOSTILE: {
            "num-examples": 2.0,
            "accuracy": 0.5,
            "loss": 0.9,
            "confusion": [1.0, 0.0, 1.0, 0.0],
        },
    }


def train(epsilon: float) -> dict[str, dict[str, Any]]:
    site = {
        "num-examples": 10.0,
        "epsilon": epsilon,
        "run-epsilon": epsilon,
        "delta": 1e-5,
        "noise-multiplier": 2.0,
        "sample-rate": 0.1,
        "steps": 5,
        "round-steps": 5,
        "max-epsilon": 0.8,
    }
    return {"alpha": site, HOSTILE: {**site, "max-epsilon": 0.0}}


def make_run(tmp_path: Path) -> RunDirectory:
    """A run directory as the ServerApp leaves it: 2 rounds, one refusal, one rejection."""
    run = RunDirectory(tmp_path / "run")
    run.write_text(CONFIG_FILE, 'name = "hospitals"\n[privacy]\ntarget-epsilon = 1.0\n')
    metrics: list[dict[str, Any]] = []
    rounds = []
    for rnd, (t, e) in enumerate(
        [({}, evals(0.25)), (train(0.5), evals(0.5)), (train(0.9), evals(0.75))]
    ):
        rows = site_rows(rnd, t, e)
        metrics += rows
        rounds.append(
            round_row(
                rnd,
                rows,
                round_seconds=1.0,
                elapsed_seconds=rnd + 1.0,
                evals=e,
                refused_sites=["gamma"] if rnd == 2 else [],
                failed_sites=["gamma"] if rnd == 2 else [],
                rejected_sites={"delta": "norm 9 exceeds 3"} if rnd == 1 else {},
            )
        )
    run.append_rows(METRICS_FILE, metrics)
    run.append_rows(ROUNDS_FILE, rounds)
    run.plot(rounds)
    run.write_json(
        SUMMARY_FILE,
        {
            "name": "hospitals",
            "site_names": ["alpha", HOSTILE],
            "epsilon": 0.9,
            "site_epsilon": {"alpha": 0.9, HOSTILE: 0.9},
            "refused_sites": {"gamma": "PrivacyBudgetExceeded: gamma is over its budget"},
            "failed_sites": {"gamma": "refused"},
            "classification": classification_section(rounds, metrics),
            "privacy": {
                "sites": {
                    "alpha": {
                        "epsilon": 0.9,
                        "run_epsilon": 0.9,
                        "max_epsilon": 0.8,
                        "refused_rounds": [],
                    }
                }
            },
            "versions": {"flwr": "1.39.0"},
            "ended_early": None,
        },
    )
    return run


def test_report_is_one_self_contained_page_with_both_plots(tmp_path: Path) -> None:
    run = make_run(tmp_path)

    page = write_report(run).read_text(encoding="utf-8")

    assert run.file(SITE_PLOT_FILE).read_bytes().startswith(b"\x89PNG")
    assert run.file(PLOT_FILE).is_file()
    assert page.count('src="data:image/png;base64,') == 2
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script" not in page and "@import" not in page and "url(" not in page


def test_report_holds_metrics_privacy_incidents_and_config(tmp_path: Path) -> None:
    run = make_run(tmp_path)

    page = write_report(run).read_text(encoding="utf-8")

    assert "0.750" in page  # alpha's accuracy in round 2
    assert "balanced acc." in page and "macro F1" in page and "predicted 1" in page
    assert "gamma is over its budget" in page  # the refusal, with its reason
    assert "norm 9 exceeds 3" in page  # the rejected update
    assert "target-epsilon = 1.0" in page  # the effective configuration
    assert "1.39.0" in page  # versions
    # alpha's ε 0.9 is over its cap 0.8 in round 2: that cell is marked
    assert re.search(r'<td class="over">0\.900</td>', page)


def test_a_hostile_site_name_is_shown_as_text_never_as_markup(tmp_path: Path) -> None:
    run = make_run(tmp_path)

    page = write_report(run).read_text(encoding="utf-8")

    assert HOSTILE not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page


def test_a_run_directory_without_a_summary_still_gets_a_report(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    run.file(SUMMARY_FILE).unlink()

    page = write_report(run).read_text(encoding="utf-8")

    assert run.file(REPORT_FILE).is_file()
    assert "Metrics per round" in page
    assert json.loads(run.file(ROUNDS_FILE).read_text().splitlines()[0])["round"] == 0
