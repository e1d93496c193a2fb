"""Tests for `fedvault provision` and `provision add-site`, through typer's CliRunner."""

from __future__ import annotations

import tomllib
from pathlib import Path

import click
import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from fedvault.cli import provision as provision_cli
from fedvault.cli.provision import provision_app
from fedvault.common.errors import ProvisioningError

pytestmark = pytest.mark.unit

runner = CliRunner()


def cli() -> typer.Typer:
    """A root app holding provision_app the way fedvault/cli/app.py registers it."""
    app = typer.Typer(rich_markup_mode="markdown", pretty_exceptions_enable=False)
    app.add_typer(provision_app, name="provision")

    @app.callback()
    def _root() -> None:
        """Test root."""

    return app


def invoke(*args: str) -> click.testing.Result:
    return runner.invoke(cli(), ["provision", *args], env={"NO_COLOR": "1", "COLUMNS": "200"})


def provision_args(out: Path, *extra: str) -> list[str]:
    return [
        "--name",
        "demo",
        "--server-address",
        "127.0.0.1:9092",
        "--sites",
        "clinic-a, clinic-b",
        "--sites",
        "clinic-c",
        "--out",
        str(out),
        *extra,
    ]


def test_provision_writes_the_federation(tmp_path: Path) -> None:
    out = tmp_path / "fed"

    result = invoke(*provision_args(out, "--validity-days", "30"))

    assert result.exit_code == 0, result.output
    meta = tomllib.loads((out / "federation.toml").read_text())
    assert meta["sites"] == ["clinic-a", "clinic-b", "clinic-c"]
    assert meta["server-address"] == "127.0.0.1:9092"
    for site in meta["sites"]:
        assert (out / "sites" / site / "site.key").is_file()
        assert (out / "server" / "sites" / f"{site}.pub").is_file()
        assert str(out / "sites" / site) in result.output
    assert (out / "server" / "server.pem").is_file()
    assert "authority" in result.output


def test_kit_paths_are_printed_whole_on_a_narrow_console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a console narrower than the paths (a deep TMPDIR, a small terminal)
    monkeypatch.setattr(provision_cli.console, "width", 40)
    out = tmp_path / "a-folder-name-long-enough-to-pass-forty-columns" / "fed"

    # Execute
    result = invoke(*provision_args(out))

    # Assert: each kit's path stands whole on its line, as a user copies it
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for site in ("clinic-a", "clinic-b", "clinic-c"):
        assert f"  site {site}: {out / 'sites' / site}" in lines
    assert f"  coordinator: {out / 'server'}" in lines


def test_existing_federation_is_refused_with_a_fedvault_error_and_no_traceback(
    tmp_path: Path,
) -> None:
    out = tmp_path / "fed"
    assert invoke(*provision_args(out)).exit_code == 0
    before = (out / "authority" / "ca.pem").read_bytes()

    refused = invoke(*provision_args(out))
    forced = invoke(*provision_args(out, "--force"))

    assert isinstance(refused.exception, ProvisioningError)
    assert "already holds a federation" in str(refused.exception)
    assert "Traceback" not in refused.output
    assert forced.exit_code == 0, forced.output
    assert (out / "authority" / "ca.pem").read_bytes() != before


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--validity-days", "0", "got 0"),
        ("--server-address", "nowhere", "'nowhere'"),
        ("--sites", "a,,b", "site name"),
        ("--name", "two words", "'two words'"),
    ],
)
def test_bad_values_raise_provisioning_errors(
    tmp_path: Path, flag: str, value: str, message: str
) -> None:
    args = provision_args(tmp_path / "fed", "--validity-days", "30")
    args[args.index(flag) + 1] = value

    result = invoke(*args)

    assert isinstance(result.exception, ProvisioningError)
    assert message in str(result.exception)
    assert not (tmp_path / "fed").exists()


def test_missing_options_are_a_usage_error(tmp_path: Path) -> None:
    result = invoke("--name", "demo", "--out", str(tmp_path / "fed"))

    assert result.exit_code == 2
    assert "--server-address" in result.output and "--sites" in result.output
    assert not (tmp_path / "fed").exists()


def test_add_site_adds_one_kit(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    assert invoke(*provision_args(out)).exit_code == 0
    server_pem = (out / "server" / "server.pem").read_bytes()

    result = invoke("add-site", "--out", str(out), "--site", "clinic-d")
    duplicate = invoke("add-site", "--out", str(out), "--site", "clinic-d")

    assert result.exit_code == 0, result.output
    assert (out / "sites" / "clinic-d" / "site.key").is_file()
    assert (out / "server" / "sites" / "clinic-d.pub").is_file()
    assert (out / "server" / "server.pem").read_bytes() == server_pem
    assert isinstance(duplicate.exception, ProvisioningError)


def test_add_site_refuses_provision_options(tmp_path: Path) -> None:
    result = invoke("--name", "demo", "add-site", "--out", str(tmp_path), "--site", "x")

    assert result.exit_code == 2
    assert "--name" in result.output


def test_add_site_without_a_federation_is_a_provisioning_error(tmp_path: Path) -> None:
    result = invoke("add-site", "--out", str(tmp_path), "--site", "clinic-d")

    assert isinstance(result.exception, ProvisioningError)
    assert "certificate authority" in str(result.exception)


def test_every_option_has_help_text() -> None:
    group = get_command(cli()).commands["provision"]  # type: ignore[attr-defined]
    commands = [group, *group.commands.values()]

    for command in commands:
        options = [p for p in command.params if isinstance(p, click.Option)]
        assert options
        for option in options:
            assert option.help and len(option.help) > 15, (command.name, option.name)
    assert set(group.commands) == {"add-site", "revoke-site"}


def test_help_lists_the_options_and_exit_codes() -> None:
    result = invoke("--help")

    assert result.exit_code == 0
    for flag in ("--name", "--server-address", "--sites", "--out", "--validity-days", "--force"):
        assert flag in result.output
    assert "add-site" in result.output
    assert "7: keys, certificates or startup kit unusable" in result.output
