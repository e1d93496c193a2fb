"""Helpers for the benchmark tests: a benchmark's main() in this process, over canned runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

#: What every results file says about the machine it ran on.
MACHINE_KEYS = {"date", "cpu_model", "cores", "versions", "load_average"}


def run_main(
    module: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[str, dict[str, Any]]:
    """``python -m MODULE --quick --out FILE ARGS`` through module.main: its stdout and JSON."""
    out = tmp_path / "results.json"
    capsys.readouterr()
    code = module.main(["--quick", "--out", str(out), *args])
    printed = capsys.readouterr().out
    assert code == 0, printed
    payload: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    assert payload["quick"] is True
    assert payload["command"].startswith(f"python -m {module.MODULE} --quick --out ")
    assert payload["machine"].keys() >= MACHINE_KEYS
    assert len(payload["machine"]["load_average"]) == 3
    return printed, payload


def table_rows(printed: str, first_cell: str) -> list[list[str]]:
    """The cells of every markdown table row whose first cell is ``first_cell``."""
    rows = []
    for line in printed.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def recorder(result: Callable[..., Any]) -> tuple[list[tuple[Any, ...]], Callable[..., Any]]:
    """A stand-in that records each call's arguments and answers ``result(*args)``."""
    calls: list[tuple[Any, ...]] = []

    def stand_in(*args: Any, **kwargs: Any) -> Any:
        calls.append((*args, *kwargs.values()))
        return result(*args, **kwargs)

    return calls, stand_in
