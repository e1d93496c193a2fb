"""`fedvault simulate` draws the plots and report.html itself, once the ServerApp wrote
summary.json (simulations/runner.py ReportDrawer), so Flower's wind-down overlaps them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import fedvault.common.report_html
from fedvault.common.report import (
    PLOT_FILE,
    REPORT_FILE,
    SITE_PLOT_FILE,
    SUMMARY_FILE,
    RunDirectory,
)
from fedvault.simulations.runner import ReportDrawer
from tests.common.test_report_html import make_run

pytestmark = pytest.mark.unit


def run_without_summary(tmp_path: Path) -> tuple[RunDirectory, dict[str, Any]]:
    """A run directory as the ServerApp leaves it just before its summary (nothing drawn)."""
    run = make_run(tmp_path)
    summary = json.loads(run.file(SUMMARY_FILE).read_text(encoding="utf-8"))
    for name in (SUMMARY_FILE, PLOT_FILE):
        run.file(name).unlink()
    return run, summary


def test_the_plots_and_report_are_drawn_from_the_summary_the_run_writes(tmp_path: Path) -> None:
    # Prepare
    run, summary = run_without_summary(tmp_path)
    said: list[str] = []
    drawer = ReportDrawer(run, said.append, poll_seconds=0.01)

    # Execute: the summary comes while the drawer watches
    run.write_json(SUMMARY_FILE, summary)
    drawer.finish()

    # Assert
    page = run.file(REPORT_FILE).read_text(encoding="utf-8")
    assert run.file(PLOT_FILE).read_bytes().startswith(b"\x89PNG")
    assert run.file(SITE_PLOT_FILE).read_bytes().startswith(b"\x89PNG")
    assert page.count('src="data:image/png;base64,') == 2
    assert "hospitals" in page and said == []


def test_a_run_without_a_summary_gets_no_report(tmp_path: Path) -> None:
    # Prepare
    run, _ = run_without_summary(tmp_path)

    # Execute
    ReportDrawer(run, print, poll_seconds=0.01).finish()

    # Assert
    assert not run.file(REPORT_FILE).exists() and not run.file(PLOT_FILE).exists()


def test_an_earlier_attempts_summary_is_never_drawn_from(tmp_path: Path) -> None:
    # Prepare: a resumed run's folder still holds the summary of the attempt before
    run = make_run(tmp_path)
    run.file(PLOT_FILE).unlink()

    # Execute: this attempt ends without a summary of its own
    ReportDrawer(run, print, poll_seconds=0.01).finish()

    # Assert
    assert not run.file(SUMMARY_FILE).exists()
    assert not run.file(REPORT_FILE).exists() and not run.file(PLOT_FILE).exists()


def test_a_report_that_fails_is_said_and_does_not_fail_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    run, summary = run_without_summary(tmp_path)

    def broken(_run: RunDirectory) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(fedvault.common.report_html, "write_report", broken)
    said: list[str] = []
    drawer = ReportDrawer(run, said.append, poll_seconds=0.01)

    # Execute
    run.write_json(SUMMARY_FILE, summary)
    drawer.finish()

    # Assert
    assert said == ["report.html could not be written: OSError('disk full')"]
    assert not run.file(REPORT_FILE).exists()
