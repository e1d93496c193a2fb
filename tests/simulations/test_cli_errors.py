"""Tests for `fedvault simulate` on bad input: one error line, a hint, a numbered exit code.

Every case here is rejected while the config and data are checked, before any Flower
process starts, so each runs the real command in a subprocess in about two seconds.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.data import DATASETS, load_dataset
from common.errors import (
    EXIT_CODES,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    DataError,
    FedvaultError,
)

pytestmark = pytest.mark.unit

GOOD_ROWS = 40


def run_fedvault(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m fedvault ARGS` as a user would, with plain (uncoloured) output."""
    return subprocess.run(
        [sys.executable, "-m", "fedvault", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
    )


def good_csv_text() -> str:
    """A small valid table: two numeric features, a two-class label, GOOD_ROWS rows."""
    rows = [f"{30 + i},{18.5 + (i % 7) * 1.5},{i % 2}" for i in range(GOOD_ROWS)]
    return "age,bmi,outcome\n" + "\n".join(rows) + "\n"


def write_inputs(folder: Path) -> None:
    """The files the bad-input cases point at, each derived from the same good table."""
    good = good_csv_text()
    (folder / "good.csv").write_text(good, encoding="utf-8")
    lines = good.splitlines()
    age, _bmi, outcome = lines[5].split(",")  # data row 5 is file line 6
    lines[5] = f"{age},abc,{outcome}"
    (folder / "non_numeric.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "empty.csv").write_bytes(b"")
    (folder / "header_only.csv").write_text("age,bmi,outcome\n", encoding="utf-8")
    (folder / "broken.toml").write_text('name = "broken\n[federation\nsites = 3\n')


def non_empty_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


# Each case: flags (with {tmp} standing for the test's folder), the error class whose exit
# code is expected, and the facts the error line must state.
BAD_INPUT_CASES = [
    pytest.param(
        ["--dataset", "imagenet"],
        DataError,
        ["'imagenet'", *DATASETS, "csv:PATH"],
        id="unknown-dataset",
    ),
    pytest.param(
        ["--dataset", "csv:{tmp}/absent.csv", "--label-column", "outcome"],
        DataError,
        ["not found", "{tmp}/absent.csv"],
        id="missing-file",
    ),
    pytest.param(
        ["--dataset", "csv:{tmp}/good.csv"],
        ConfigError,
        ["csv:{tmp}/good.csv", "needs a label column"],
        id="csv-without-label-column-flag",
    ),
    pytest.param(
        ["--dataset", "csv:{tmp}/good.csv", "--label-column", "diagnosis"],
        DataError,
        ["'diagnosis'", "not found", "available columns: age, bmi, outcome"],
        id="missing-label-column",
    ),
    pytest.param(
        ["--dataset", "csv:{tmp}/non_numeric.csv", "--label-column", "outcome"],
        DataError,
        ["{tmp}/non_numeric.csv", "line 6", "'bmi'", "non-numeric", "'abc'"],
        id="non-numeric-feature",
    ),
    pytest.param(
        ["--dataset", "csv:{tmp}/empty.csv", "--label-column", "outcome"],
        DataError,
        ["{tmp}/empty.csv", "no data rows"],
        id="empty-csv",
    ),
    pytest.param(
        ["--dataset", "csv:{tmp}/header_only.csv", "--label-column", "outcome"],
        DataError,
        ["{tmp}/header_only.csv", "no data rows"],
        id="header-only-csv",
    ),
    pytest.param(
        ["--epsilon", "0"],
        ConfigError,
        ["target_epsilon must be > 0", "got 0"],
        id="epsilon-zero",
    ),
    pytest.param(
        ["--epsilon", "-1"],
        ConfigError,
        ["target_epsilon must be > 0", "got -1"],
        id="epsilon-negative",
    ),
    pytest.param(
        ["--dataset", "breast-cancer", "--sites", "100"],
        DataError,
        ["cannot split", "569 rows", "100 sites"],
        id="more-sites-than-rows",
    ),
    pytest.param(
        ["--epsilon", "1", "--no-dp"],
        ConfigError,
        ["only one of --epsilon, --noise-multiplier, --no-dp", "--epsilon and --no-dp"],
        id="epsilon-with-no-dp",
    ),
    pytest.param(
        ["atlantis"],
        ConfigError,
        ["unknown scenario 'atlantis'", "hospitals", "banks", "fashion-mnist"],
        id="unknown-scenario",
    ),
    pytest.param(
        ["{tmp}/broken.toml"],
        ConfigError,
        ["{tmp}/broken.toml", "not valid TOML"],
        id="malformed-scenario-toml",
    ),
    pytest.param(
        ["{tmp}/absent.toml"],
        ConfigError,
        ["scenario file not found", "{tmp}/absent.toml"],
        id="missing-scenario-toml",
    ),
]


@pytest.mark.parametrize(("flags", "error", "facts"), BAD_INPUT_CASES)
def test_simulate_rejects_bad_input_with_one_line_hint_and_exit_code(
    tmp_path: Path, flags: list[str], error: type[FedvaultError], facts: list[str]
) -> None:
    # Prepare
    write_inputs(tmp_path)
    run_dir = tmp_path / "run"
    args = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]

    # Execute
    result = run_fedvault(tmp_path, "simulate", *args, "--out", str(run_dir))

    # Assert
    assert result.returncode == error.exit_code, result.stderr
    lines = non_empty_lines(result.stderr)
    assert len(lines) == 2, f"expected an error line and a hint, got:\n{result.stderr}"
    error_line, hint_line = lines
    assert error_line.startswith("error:")
    for fact in facts:
        assert fact.replace("{tmp}", str(tmp_path)) in error_line
    assert hint_line.startswith("hint:") and len(hint_line) > len("hint: ")
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""  # the run banner is printed only once input is accepted
    assert files_under(run_dir) == []
    assert files_under(tmp_path / "runs") == []


def test_good_csv_the_bad_cases_derive_from_is_accepted(tmp_path: Path) -> None:
    # Prepare
    write_inputs(tmp_path)

    # Execute
    dataset = load_dataset(f"csv:{tmp_path / 'good.csv'}", label_column="outcome")

    # Assert
    assert len(dataset) == GOOD_ROWS
    assert dataset.feature_shape == (2,)
    assert dataset.num_classes == 2


@pytest.mark.parametrize(
    "flags",
    [["--dataset", "breast-cancer", "--sites", "100"], ["--dataset", "imagenet"]],
    ids=["more-sites-than-rows", "unknown-dataset"],
)
def test_hint_does_not_send_user_to_a_data_file_they_did_not_give(
    tmp_path: Path, flags: list[str]
) -> None:
    # Prepare
    run_dir = tmp_path / "run"

    # Execute
    result = run_fedvault(tmp_path, "simulate", *flags, "--out", str(run_dir))

    # Assert
    assert result.returncode == DataError.exit_code
    hint_line = non_empty_lines(result.stderr)[-1]
    assert hint_line.startswith("hint:")
    assert "data file" not in hint_line


def test_usage_error_exits_2_without_traceback(tmp_path: Path) -> None:
    # Prepare
    run_dir = tmp_path / "run"

    # Execute
    result = run_fedvault(tmp_path, "simulate", "--sites", "notanumber", "--out", str(run_dir))

    # Assert
    assert result.returncode == EXIT_USAGE
    assert "--sites" in result.stderr
    assert "notanumber" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert files_under(run_dir) == []


def exit_code_lines(help_text: str) -> dict[int, str]:
    """Help lines of the form `CODE: TEXT` (optionally bulleted), one exit code per line."""
    found: dict[int, str] = {}
    for line in help_text.splitlines():
        match = re.fullmatch(r"\s*(?:[•*-]\s+)?(\d+): (.+?)\s*", line)
        if match:
            found[int(match.group(1))] = match.group(2)
    return found


def test_root_help_lists_the_simulate_command(tmp_path: Path) -> None:
    # Execute
    result = run_fedvault(tmp_path, "--help")

    # Assert
    assert result.returncode == EXIT_OK
    assert "simulate" in result.stdout
    assert "Exit codes" in result.stdout


def test_root_help_lists_every_exit_code_on_its_own_line(tmp_path: Path) -> None:
    # Execute
    result = run_fedvault(tmp_path, "--help")

    # Assert
    assert result.returncode == EXIT_OK
    assert exit_code_lines(result.stdout) == EXIT_CODES


def test_simulate_help_lists_privacy_and_output_flags(tmp_path: Path) -> None:
    # Execute
    result = run_fedvault(tmp_path, "simulate", "--help")

    # Assert
    assert result.returncode == EXIT_OK
    for flag in ("--epsilon", "--noise-multiplier", "--no-dp", "--out", "--sites", "--dataset"):
        assert flag in result.stdout
    assert files_under(tmp_path / "runs") == []


def test_simulate_help_lists_every_exit_code(tmp_path: Path) -> None:
    # Execute
    result = run_fedvault(tmp_path, "simulate", "--help")

    # Assert
    assert result.returncode == EXIT_OK
    assert exit_code_lines(result.stdout) == EXIT_CODES
