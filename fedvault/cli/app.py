"""The `fedvault` command: one red line and a hint for every fedvault error, never a traceback."""

from __future__ import annotations

import logging
import signal
import sys
import tempfile
import traceback
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedvault.cli import EXIT_HELP
from fedvault.cli.deploy import client_app, run_command, server_app
from fedvault.cli.export import export_command
from fedvault.cli.provision import provision_app
from fedvault.cli.simulate import simulate_command
from fedvault.common.errors import EXIT_INTERRUPTED, ConfigError, FedvaultError, RunInterrupted

app = typer.Typer(
    name="fedvault",
    help="Privacy-preserving federated learning: Flower + Opacus DP-SGD, "
    "per-site privacy accounting.",
    epilog=EXIT_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
app.command("simulate", epilog=EXIT_HELP)(simulate_command)
app.add_typer(provision_app, name="provision", epilog=EXIT_HELP)
app.add_typer(server_app, name="server")
app.add_typer(client_app, name="client")
app.command("run", epilog=EXIT_HELP)(run_command)
app.command("export", epilog=EXIT_HELP)(export_command)


def versions() -> str:
    """fedvault's version and those of the libraries it runs on, read without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (
        f"fedvault {installed('fedvault')} ("
        + ", ".join(f"{name} {installed(name)}" for name in ("flwr", "torch", "opacus"))
        + ")"
    )


def _print_version(value: bool) -> None:
    if value:
        typer.echo(versions())
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Show fedvault's version (and Flower's, torch's, Opacus's) and exit.",
            callback=_print_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """Privacy-preserving federated learning: Flower + Opacus DP-SGD, per-site privacy accounting.

    Start with `fedvault simulate`: three simulated hospitals, epsilon = 1.
    """


def command_name(argv: list[str]) -> str:
    """The command the user ran (``fedvault client start``): the words before its options."""
    import click

    words = ["fedvault"]
    command: click.Command = typer.main.get_command(app)
    for arg in argv:
        if not isinstance(command, click.Group) or arg.startswith("-"):
            break
        sub = command.commands.get(arg)
        if sub is None:
            break
        words.append(arg)
        command = sub
    return " ".join(words)


def hint_for(err: FedvaultError, argv: list[str]) -> str:
    """The error's hint; the generic "see --help" hint names the command the user ran."""
    command = command_name(argv)
    if err.hint in (FedvaultError.default_hint, ConfigError.default_hint) and command not in (
        "fedvault",
        "fedvault simulate",
    ):
        return f"Check the flags and their values: `{command} --help` lists them."
    return err.hint


err_console = Console(stderr=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)  # the reason a run's marker names


def _interruption(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM behind an exit, if one is in its chain of causes."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None or isinstance(seen, KeyboardInterrupt):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _say_interrupted(err: KeyboardInterrupt) -> None:
    """One line: a run's own (with its `--resume` command), or that everything was stopped."""
    line = str(err) if isinstance(err, RunInterrupted) else ""
    err_console.print(
        line or "interrupted; everything started was stopped",
        style="yellow", markup=False, highlight=False, soft_wrap=True,
    )  # fmt: skip


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM (a service manager, `kill`) takes the same clean path as Ctrl-C: every process
    # fedvault started is stopped and a submitted run is stopped at the SuperLink.
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background by a shell
        signal.signal(signal.SIGINT, _interrupt)
    try:
        app()
    except FedvaultError as err:
        # escape(): a message's own brackets ("in [federation]") are text, not Rich markup
        message, hint = escape(str(err)), escape(hint_for(err, sys.argv[1:]))
        err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
        err_console.print(f"[dim]hint: {hint}[/dim]", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt as err:
        _say_interrupted(err)
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit as done:  # Typer turns Ctrl-C into a silent exit 130: say what happened
        interruption = _interruption(done)
        if interruption is not None:
            _say_interrupted(interruption)
        raise
    except Exception as err:  # a bug, not a user error: keep the traceback, show one line
        with tempfile.NamedTemporaryFile(
            "w", prefix="fedvault-crash-", suffix=".txt", delete=False
        ) as handle:
            traceback.print_exc(file=handle)
        err_console.print(
            f"[bold red]internal error:[/bold red] {type(err).__name__}: {escape(str(err))}",
            highlight=False,
        )
        err_console.print(f"[dim]hint: this is a fedvault bug; traceback in {handle.name}[/dim]")
        sys.exit(1)
