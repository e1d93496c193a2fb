"""Every command's --help renders whole at 80 columns; --version names fedvault and its deps."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from importlib.metadata import version

import click
import pytest
import typer.main
import typer.rich_utils
from typer.testing import CliRunner

from fedvault.cli.app import app
from fedvault.common.errors import EXIT_CODES, EXIT_OK
from tests.readme import README

from .conftest import CliResult

pytestmark = pytest.mark.unit

WIDTH = 80


def commands(command: click.Command, path: list[str]) -> Iterator[tuple[list[str], click.Command]]:
    """Every command and group under ``command``, with the words that name it."""
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from commands(sub, [*path, name])


EVERY_COMMAND = list(commands(typer.main.get_command(app), []))


def help_at(path: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", WIDTH)
    result = CliRunner().invoke(app, [*path, "--help"], env={"NO_COLOR": "1"})
    assert result.exit_code == EXIT_OK, result.output
    return result.output


def joined(text: str) -> str:
    """Help text as one line: panel borders dropped, wrapped lines joined."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def exit_code_lines(help_text: str) -> dict[int, str]:
    """Help lines of the form `CODE: TEXT` (optionally bulleted), one exit code per line."""
    found: dict[int, str] = {}
    for line in help_text.splitlines():
        match = re.fullmatch(r"\s*(?:[•*-]\s+)?(\d+): (.+?)\s*", line)
        if match:
            found[int(match.group(1))] = match.group(2)
    return found


@pytest.mark.parametrize(
    ("path", "command"), EVERY_COMMAND, ids=[" ".join(p) or "fedvault" for p, _ in EVERY_COMMAND]
)
def test_help_shows_every_option_name_whole_at_80_columns(
    path: list[str], command: click.Command, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Execute
    text = help_at(path, monkeypatch)

    # Assert
    names = [
        name
        for param in command.params
        if isinstance(param, click.Option)
        for name in (*param.opts, *param.secondary_opts)
    ] + ["--help"]
    for name in names:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"{name} cut in:\n{text}"
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= WIDTH


@pytest.mark.parametrize(
    ("path", "command"), EVERY_COMMAND, ids=[" ".join(p) or "fedvault" for p, _ in EVERY_COMMAND]
)
def test_help_has_no_garbled_default_or_placeholder(
    path: list[str], command: click.Command, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Execute
    text = joined(help_at(path, monkeypatch))

    # Assert: markdown ate no <placeholder> and left no escaped bracket
    assert "runs/-" not in text
    assert "//" not in text
    assert "\\[" not in text
    assert "()" not in text


def test_placeholders_in_option_help_are_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    # Execute
    simulate = joined(help_at(["simulate"], monkeypatch))
    provision = joined(help_at(["provision"], monkeypatch))

    # Assert
    assert (
        "(default: runs/NAME-YYYYmmdd-HHMMSS, NAME the scenario's name, or the --dataset's "
        "when no scenario is given)"
    ) in simulate
    assert "sites/SITE/ (one kit per site)" in provision


def test_root_and_simulate_help_list_every_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    # Execute
    root = help_at([], monkeypatch)
    simulate = help_at(["simulate"], monkeypatch)

    # Assert
    assert exit_code_lines(root) == EXIT_CODES
    assert exit_code_lines(simulate) == EXIT_CODES
    for flag in ("--epsilon", "--noise-multiplier", "--no-dp", "--out", "--sites", "--dataset"):
        assert flag in simulate


def test_version_names_fedvault_and_the_libraries_it_runs_on(
    fedvault_cli: Callable[..., CliResult],
) -> None:
    # Execute
    result = fedvault_cli("--version")

    # Assert
    assert result.code == EXIT_OK
    assert result.err == ""
    line = result.out.strip()
    assert line.startswith(f"fedvault {version('fedvault')} (")
    for library in ("flwr", "torch", "opacus"):
        assert f"{library} {version(library)}" in line


def test_the_readme_lists_every_exit_code() -> None:
    # Prepare
    readme = README.read_text(encoding="utf-8")
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]

    # Execute
    codes = {int(code) for code in re.findall(r"^\| (\d+) \|", section, flags=re.MULTILINE)}

    # Assert
    assert codes == set(EXIT_CODES)


ARGUMENTS = [
    (path, param)
    for path, command in EVERY_COMMAND
    for param in command.params
    if isinstance(param, click.Argument) and getattr(param, "help", None)
]


@pytest.mark.parametrize(
    ("path", "param"), ARGUMENTS, ids=[f"{' '.join(p)} {a.name}" for p, a in ARGUMENTS]
)
def test_help_shows_what_each_argument_is(
    path: list[str], param: click.Argument, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Typer < 0.21 (Flower's cap) drops an argument's help with click 8.5: pinned below it.
    text = joined(help_at(path, monkeypatch))
    assert " ".join(str(getattr(param, "help", "")).split()[:4]) in text


def test_every_positional_argument_has_help() -> None:
    assert {" ".join(p) for p, _ in ARGUMENTS} >= {"simulate", "export"}
