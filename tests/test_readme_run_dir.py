"""README's table of run-directory files names every file fedvault writes into a run directory."""

from __future__ import annotations

import pytest

from fedvault.common import report
from fedvault.common.checkpoint import CHECKPOINT_FILE
from fedvault.common.locks import RUN_LOCK
from fedvault.simulations.runner import INTERRUPTED_FILE
from tests.readme import README

pytestmark = pytest.mark.unit


#: Every name written into a run directory (LEDGER_RECORD_FILE goes inside ledgers/).
RUN_DIR_NAMES = (
    report.CONFIG_FILE,
    report.METRICS_FILE,
    report.ROUNDS_FILE,
    report.SUMMARY_FILE,
    report.MODEL_FILE,
    report.PLOT_FILE,
    report.SITE_PLOT_FILE,
    report.REPORT_FILE,
    report.ERROR_FILE,
    report.FLOWER_LOG,
    report.SITE_POLICY_FILE,
    f"{report.LEDGERS_DIR}/",
    CHECKPOINT_FILE,
    RUN_LOCK,
    INTERRUPTED_FILE,
)


def _table_rows() -> dict[str, list[str]]:
    """The run-directory table's rows: file name -> its other cells."""
    text = README.read_text(encoding="utf-8")
    table = text.split("| file | what it holds | can it hold anything sensitive? |", 1)[1]
    rows: dict[str, list[str]] = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_every_run_directory_file_is_documented_with_what_it_holds_and_its_sensitivity() -> None:
    # Execute
    rows = _table_rows()

    # Assert: each name has a row with both cells filled, and no row names a file never written
    assert sorted(rows) == sorted(RUN_DIR_NAMES)
    for name, cells in rows.items():
        assert len(cells) == 2 and all(cells), name
    assert report.LEDGER_RECORD_FILE in rows[f"{report.LEDGERS_DIR}/"][0]
