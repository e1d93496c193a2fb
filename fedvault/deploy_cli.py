"""`fedvault server start`, `fedvault client start` and `fedvault run`: the deployment commands."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from common.config import build_config, read_toml
from common.errors import ConfigError
from common.report import RunDirectory
from server.provision import load_kit
from simulations.cli import (
    DeltaOption,
    EpsilonOption,
    ModelOption,
    NoDpOption,
    NoiseOption,
    OutOption,
    RoundsOption,
    StrategyOption,
    console,
    err_console,
    flags_layer,
    new_run_dir,
    print_summary,
    scenario_path,
)

server_app = typer.Typer(help="The coordinator: run the federation's SuperLink.")
client_app = typer.Typer(help="A partner site: run this site's SuperNode.")

KitOption = Annotated[
    Path, typer.Option("--kit", help="Startup kit folder made by `fedvault provision`.")
]


def _stop_flag() -> threading.Event:
    """An event set by SIGTERM or Ctrl-C, so the command stops its children cleanly."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


@server_app.command("start")
def server_start(
    kit: KitOption,
    listen: Annotated[
        str | None,
        typer.Option(
            help="Fleet API listen address HOST:PORT (default 0.0.0.0 and the kit's port)."
        ),
    ] = None,
) -> None:
    """Start the federation's SuperLink: gRPC + TLS, only provisioned sites may join.

    Runs until Ctrl-C or SIGTERM, then stops the SuperLink and everything it started.
    """
    from server.deploy import serve_until_stopped, start_coordinator

    server_kit = load_kit(kit, role="server")
    stop = _stop_flag()
    coordinator = start_coordinator(server_kit, listen=listen)
    console.print(
        f"[bold]fedvault server[/bold] federation {server_kit.federation}: Fleet API (gRPC + TLS) "
        f"on {coordinator.fleet_address}, {len(coordinator.registered)} site(s) registered: "
        f"{', '.join(coordinator.registered)}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"ready: waiting for sites; submit a run with `fedvault run --kit {kit}`; Ctrl-C stops",
        highlight=False,
        soft_wrap=True,
    )
    serve_until_stopped(coordinator, stop.is_set)
    console.print("coordinator stopped")


@client_app.command("start")
def client_start(
    kit: KitOption,
    data: Annotated[
        Path, typer.Option("--data", help="This site's CSV file (never leaves the site).")
    ],
    label_column: Annotated[
        str, typer.Option(help="Label column of the CSV; every site must use the same one.")
    ] = "label",
    device: Annotated[
        str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")
    ] = "auto",
) -> None:
    """Connect this partner site to its federation and train when the coordinator asks.

    The data file is checked first, with the same rules as `fedvault simulate`; then the
    coordinator's TLS certificate is checked against the kit's federation CA. Runs until
    Ctrl-C or SIGTERM.
    """
    from client.deploy import serve_until_stopped, start_site

    site_kit = load_kit(kit, role="site")
    stop = _stop_flag()
    site = start_site(site_kit, data=data, label_column=label_column, device=device)
    console.print(
        f"[bold]fedvault client[/bold] site {site.name} of federation {site_kit.federation}: "
        f"{site.rows} rows in {data}, connecting to {site_kit.server_address} over TLS",
        highlight=False,
        soft_wrap=True,
    )
    serve_until_stopped(site, stop.is_set)
    console.print(f"site {site.name} stopped")


def run_command(
    kit: KitOption,
    scenario: Annotated[
        str | None,
        typer.Argument(help="Scenario TOML (training and privacy settings); default: defaults."),
    ] = None,
    sites: Annotated[
        int | None,
        typer.Option(help="Sites that must take part (default: every provisioned site)."),
    ] = None,
    rounds: RoundsOption = None,
    epsilon: EpsilonOption = None,
    noise_multiplier: NoiseOption = None,
    no_dp: NoDpOption = False,
    delta: DeltaOption = None,
    strategy: StrategyOption = None,
    model: ModelOption = None,
    out: OutOption = None,
) -> None:
    """Submit a federated run to this coordinator's SuperLink over TLS and follow it.

    Shows the same per-round progress as `fedvault simulate` and writes the same run
    directory. Run it on the coordinator, while `fedvault server start` is running.
    """
    from server.deploy import CONNECTION, running_coordinator
    from server.runs import run_app

    server_kit = load_kit(kit, role="server")
    home, control = running_coordinator(server_kit)
    provisioned = len(server_kit.site_public_keys)
    if sites is not None and not 1 <= sites <= provisioned:
        raise ConfigError(
            f"sites must be in [1, {provisioned}] (the provisioned sites), got {sites}"
        )
    base: dict[str, Any] = read_toml(scenario_path(scenario)) if scenario else {}
    deployment = {
        "federation": {"sites": sites or provisioned, "site-names": []},
        "data": {"dataset": "site-files"},
    }
    flags = flags_layer(
        sites=None,
        rounds=rounds,
        dataset=None,
        label_column=None,
        partition=None,
        alpha=None,
        epsilon=epsilon,
        noise_multiplier=noise_multiplier,
        no_dp=no_dp,
        delta=delta,
        seed=None,
        strategy=strategy,
        model=model,
    )
    cfg = build_config(base, deployment, flags)
    run_dir = new_run_dir(cfg.name, out)
    console.print(
        f"[bold]fedvault run[/bold] {cfg.name} on federation {server_kit.federation} "
        f"({control}, TLS): {cfg.federation.sites} sites × {cfg.federation.rounds} rounds",
        highlight=False,
        soft_wrap=True,
    )
    summary = run_app(
        cfg,
        RunDirectory(run_dir.resolve()),
        flwr_home=home,
        connection=CONNECTION,
        watched=[],
        echo=lambda line: console.print(line, highlight=False),
    )
    print_summary(summary, run_dir.resolve(), title="fedvault run finished")


__all__ = ["client_app", "err_console", "run_command", "server_app"]
