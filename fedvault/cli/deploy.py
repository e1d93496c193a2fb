"""`fedvault server start`, `fedvault client start` and `fedvault run`: the deployment commands."""

from __future__ import annotations

import errno
import signal
import socket
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from fedvault.cli.options import (
    CentralClipOption,
    CentralDpOption,
    CentralNoiseOption,
    DeltaOption,
    EpsilonOption,
    MinSitesOption,
    ModelOption,
    NoCentralDpOption,
    NoDpOption,
    NoiseOption,
    OutOption,
    ResumeOption,
    RoundsOption,
    StrategyOption,
    central_dp_choice,
    flags_layer,
    new_run_dir,
    resumable_run,
    scenario_path,
)
from fedvault.cli.output import console, err_console, print_summary
from fedvault.common.config import build_config, read_toml
from fedvault.common.config_values import site_default
from fedvault.common.errors import ConfigError, FederationError
from fedvault.common.registry import ACCOUNTANTS
from fedvault.runtime.kits import load_kit, parse_listen_address

#: How long `client start` retries a refused activation
#: (fedvault.client.deploy.REACTIVATION_WINDOW_S; repeated here so that `--help` does not
#: import the deployment code).
REACTIVATION_WINDOW_S = 45.0
#: A site's defaults, from the [site] table of common/defaults.toml (read here rather than from
#: the ledger, which imports Opacus and torch, which `--help` must not wait for).
DEFAULT_MAX_EPSILON: float = site_default("max-epsilon")
DEFAULT_SITE_DELTA: float = site_default("delta")
DEFAULT_SITE_ACCOUNTANT: str = site_default("accountant")

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


def check_port_free(host: str, port: int) -> None:
    """Refuse a Fleet API port another program listens on, before the SuperLink is started."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                return  # not ours to judge (e.g. an address of another machine): Flower says
            raise FederationError(
                f"port {port} on {host} is in use by another program; the coordinator's "
                "Fleet API cannot listen there",
                hint="Stop that program, or give `fedvault server start` another "
                "--listen HOST:PORT (and sites the matching address).",
            ) from err


def check_site_flags(
    *,
    threads: int,
    max_epsilon: float,
    delta: float,
    accountant: str,
    max_rounds_per_run: int,
    max_evaluations_per_run: int,
) -> None:
    """`client start`'s own numbers, checked before anything is read, named by their flags."""
    hint = "`fedvault client start --help` lists the site's flags."
    rules = (
        ("--threads", threads, threads >= 0, ">= 0"),
        ("--max-epsilon", max_epsilon, max_epsilon > 0, "> 0"),
        ("--delta", delta, 0 < delta < 1, "in (0, 1)"),
        ("--max-rounds-per-run", max_rounds_per_run, max_rounds_per_run >= 1, ">= 1"),
        ("--max-evaluations-per-run", max_evaluations_per_run, max_evaluations_per_run > 0, "> 0"),
    )
    for flag, value, ok, rule in rules:
        if not ok:
            raise ConfigError(f"{flag} must be {rule}, got {value:g}", hint=hint)
    if accountant not in ACCOUNTANTS:
        raise ConfigError(
            f"--accountant must be {' or '.join(ACCOUNTANTS.names)}, got {accountant!r}", hint=hint
        )


@server_app.command("start")
def server_start(
    kit: KitOption,
    listen: Annotated[
        str | None,
        typer.Option(
            help="Fleet API listen address HOST:PORT (default 0.0.0.0, every interface, and "
            "the kit's port)."
        ),
    ] = None,
) -> None:
    """Start the federation's SuperLink: gRPC + TLS, only provisioned sites may join.

    Registers every provisioned site's key (never a revoked one) and records the node id
    each is authenticated as. Runs until Ctrl-C or SIGTERM, then stops the SuperLink and
    everything it started.
    """
    from fedvault.common.locks import SERVER_LOCK, check, holding
    from fedvault.server.deploy import serve_until_stopped, start_coordinator

    server_kit = load_kit(kit, role="server")
    # one coordinator per kit: a second `server start` is told which PID serves it (before
    # the port check, which it would fail with a less useful message)
    lock = server_kit.path / "state" / SERVER_LOCK
    what = f"the coordinator's kit {server_kit.path}"
    check(lock, what)
    check_port_free(*parse_listen_address(listen or f"0.0.0.0:{server_kit.port}"))
    lock.parent.mkdir(mode=0o700, exist_ok=True)  # the kit's private state folder
    with holding(lock, what):
        stop = _stop_flag()
        coordinator = start_coordinator(server_kit, listen=listen)
        console.print(
            f"[bold]fedvault server[/bold] federation {server_kit.federation}: Fleet API "
            f"(gRPC + TLS) on {coordinator.fleet_address}, {len(coordinator.registered)} "
            f"site(s) registered: {', '.join(coordinator.registered)}",
            highlight=False,
            soft_wrap=True,
        )
        revoked = sorted(set(server_kit.revoked.values()))
        if revoked:
            console.print(
                f"revoked, not registered: {', '.join(revoked)}"
                + (
                    f" (unregistered now: {', '.join(coordinator.unregistered)})"
                    if coordinator.unregistered
                    else ""
                ),
                highlight=False,
                soft_wrap=True,
            )
        console.print(
            f"ready: waiting for sites; submit a run with `fedvault run --kit {kit}`; Ctrl-C stops",
            highlight=False,
            soft_wrap=True,
        )
        serve_until_stopped(
            coordinator,
            stop.is_set,
            kit=server_kit,
            report=lambda line: console.print(line, highlight=False, soft_wrap=True),
        )
    console.print("coordinator stopped")  # the kit is free again: a new `server start` may go


@server_app.command("status")
def server_status(
    kit: KitOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Show the running coordinator: which sites are connected, and the latest run's progress.

    Asks the SuperLink that `fedvault server start` runs for this kit (its Control API, on
    this machine); reads nothing from the sites.
    """
    import json

    from fedvault.server.deploy import coordinator_status

    status = coordinator_status(load_kit(kit, role="server"))
    if as_json:
        typer.echo(json.dumps(status, indent=2))
        return
    online = sum(state == "online" for state in status["sites"].values())
    console.print(
        f"coordinator pid {status['pid']}, Fleet API on {status['fleet']} (since "
        f"{status['started']}); {online}/{len(status['sites'])} site(s) online",
        highlight=False,
        soft_wrap=True,
    )
    for site, state in status["sites"].items():
        console.print(f"  {site:<24} {state}", highlight=False, soft_wrap=True)
    for line in status["run"] or ["no run yet"]:
        console.print(line, highlight=False, soft_wrap=True)


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
    threads: Annotated[
        int,
        typer.Option(
            help="CPU threads for training and evaluation; 0 = torch's default (every core). "
            "Set it when the machine is shared: small models train slower on busy cores.",
        ),
    ] = 0,
    max_epsilon: Annotated[
        float,
        typer.Option(
            help="This site's lifetime ε cap for its data, across every run of every "
            "federation (set here, never by the coordinator). Rounds past it are refused.",
        ),
    ] = DEFAULT_MAX_EPSILON,
    ledger: Annotated[
        Path | None,
        typer.Option(
            help="The site's privacy ledger file (default: state/privacy-ledger.sqlite in "
            "the kit). Keep it: it is the record of the ε this data has spent.",
        ),
    ] = None,
    allow_non_private: Annotated[
        bool,
        typer.Option(
            "--allow-non-private",
            help="Also train in runs without differential privacy (refused by default).",
        ),
    ] = False,
    delta: Annotated[
        float,
        typer.Option(
            "--delta",
            help="This site's δ: every ε of its data is composed at this δ, whatever a run "
            "asks. Must be below 1/rows of the data file; fixed in the ledger at first start.",
        ),
    ] = DEFAULT_SITE_DELTA,
    accountant: Annotated[
        str,
        typer.Option(
            "--accountant",
            help=f"This site's privacy accountant: {ACCOUNTANTS.help_text()}; fixed in the "
            "ledger at first start.",
        ),
    ] = DEFAULT_SITE_ACCOUNTANT,
    models: Annotated[
        str,
        typer.Option(
            "--models",
            help="Models this site trains, comma-separated built-in names (logistic, mlp, "
            "cnn); empty: every built-in model. Runs asking for another are refused.",
        ),
    ] = "",
    max_rounds_per_run: Annotated[
        int,
        typer.Option(help="Training rounds this site answers per run; later ones are refused."),
    ] = site_default("max-rounds-per-run"),
    max_evaluations_per_run: Annotated[
        int,
        typer.Option(
            help="Evaluation replies this site sends per run: an un-budgeted channel, so capped.",
        ),
    ] = site_default("max-evaluations-per-run"),
    new_dataset: Annotated[
        bool,
        typer.Option(
            "--new-dataset",
            help="The data file changed on purpose: record it as a new dataset in the ledger "
            "(without it, a changed file is refused rather than given a fresh budget).",
        ),
    ] = False,
    rejoin_wait: Annotated[
        float,
        typer.Option(
            help="Seconds to keep retrying when the coordinator refuses to activate this "
            "site: after a crash it keeps the old connection open for up to 20 seconds.",
        ),
    ] = REACTIVATION_WINDOW_S,
) -> None:
    """Connect this partner site to its federation and train when the coordinator asks.

    The data file is checked first, with the same rules as `fedvault simulate`; then the
    coordinator's TLS certificate is checked against the kit's federation CA. Every DP
    round is recorded in the site's privacy ledger before training; see it with
    `fedvault client budget`. Runs until Ctrl-C or SIGTERM.
    """
    check_site_flags(
        threads=threads,
        max_epsilon=max_epsilon,
        delta=delta,
        accountant=accountant,
        max_rounds_per_run=max_rounds_per_run,
        max_evaluations_per_run=max_evaluations_per_run,
    )
    from fedvault.client.deploy import (
        SitePrivacySettings,
        parse_models,
        serve_until_stopped,
        start_site,
    )

    site_kit = load_kit(kit, role="site")
    privacy = SitePrivacySettings(
        ledger=ledger,
        max_epsilon=max_epsilon,
        allow_non_private=allow_non_private,
        delta=delta,
        accountant=accountant,
        models=parse_models(models),
        max_rounds_per_run=max_rounds_per_run,
        max_evaluations_per_run=max_evaluations_per_run,
        new_dataset=new_dataset,
    )
    stop = _stop_flag()
    site = start_site(
        site_kit,
        data=data,
        label_column=label_column,
        device=device,
        threads=threads,
        privacy=privacy,
    )
    console.print(
        f"[bold]fedvault client[/bold] site {site.name} of federation {site_kit.federation}: "
        f"{site.rows} rows in {data}, connecting to {site_kit.server_address} over TLS; "
        f"privacy ledger {site.ledger} (δ {delta:g}, accountant {accountant}, max ε "
        f"{max_epsilon:g}" + (", non-private runs allowed)" if allow_non_private else ")"),
        highlight=False,
        soft_wrap=True,
    )
    serve_until_stopped(
        site,
        stop.is_set,
        echo=lambda line: err_console.print(f"[yellow]{line}[/yellow]", highlight=False),
        report=lambda line: console.print(
            f"site {site.name}: {line}", highlight=False, soft_wrap=True
        ),
        retry_window=rejoin_wait,
    )
    console.print(f"site {site.name} stopped")


@client_app.command("budget")
def client_budget(
    kit: Annotated[
        Path | None,
        typer.Option(
            "--kit",
            help="This site's startup kit folder; reads the ledger `fedvault client start` "
            "keeps in it (state/privacy-ledger.sqlite).",
        ),
    ] = None,
    ledger: Annotated[
        Path | None, typer.Option("--ledger", help="A privacy ledger file, named directly.")
    ] = None,
    max_epsilon: Annotated[
        float | None,
        typer.Option(
            "--max-epsilon",
            help="This site's lifetime ε cap per dataset, set by the site, never by the "
            "coordinator; pass the same value as `fedvault client start --max-epsilon` "
            f"(default: {DEFAULT_MAX_EPSILON:g}).",
            show_default=False,
        ),
    ] = None,
    delta: Annotated[
        float, typer.Option(help="δ at which each dataset's history is composed.")
    ] = DEFAULT_SITE_DELTA,
    accountant: Annotated[str, typer.Option(help=ACCOUNTANTS.help_text() + ".")] = (
        DEFAULT_SITE_ACCOUNTANT
    ),
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document instead of tables.")
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Check the ledger instead: its hash chain, append-only triggers, tables and "
            "anchor; lists every problem and exits 9 if there is one.",
        ),
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="With --verify: this site's data file; checks it is the dataset the ledger "
            "last declared.",
        ),
    ] = None,
    label_column: Annotated[
        str | None,
        typer.Option("--label-column", help="With --data: the label column of the file."),
    ] = None,
) -> None:
    """Show the privacy budget this site's data has spent: per dataset, and per run.

    Reads only the site's own privacy ledger: ε spent (every run composed), ε remaining
    under the site's cap, and each run's share. Adds no entry and never creates a ledger.
    """
    import json

    from fedvault.client.budget import (
        budget_report,
        ledger_location,
        render_budget,
        render_check,
        verify_ledger,
    )
    from fedvault.common.errors import LedgerError

    if verify:
        check = verify_ledger(
            ledger_location(kit=kit, ledger=ledger), data=data, label_column=label_column
        )
        render_check(check, console)
        if not check.intact:
            err_console.print(f"[dim]hint: {LedgerError.default_hint}[/dim]", highlight=False)
            raise typer.Exit(LedgerError.exit_code)
        return
    if data is not None or label_column is not None:
        raise ConfigError(
            "--data and --label-column go with --verify",
            hint="fedvault client budget --verify --data FILE --label-column COL",
        )
    report = budget_report(
        ledger_location(kit=kit, ledger=ledger),
        max_epsilon=DEFAULT_MAX_EPSILON if max_epsilon is None else max_epsilon,
        delta=delta,
        accountant=accountant,
    )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        render_budget(report, console)


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
    min_sites: MinSitesOption = None,
    epsilon: EpsilonOption = None,
    noise_multiplier: NoiseOption = None,
    no_dp: NoDpOption = False,
    delta: DeltaOption = None,
    central_dp: CentralDpOption = False,
    no_central_dp: NoCentralDpOption = False,
    central_noise_multiplier: CentralNoiseOption = None,
    central_clipping_norm: CentralClipOption = None,
    strategy: StrategyOption = None,
    model: ModelOption = None,
    out: OutOption = None,
    resume: ResumeOption = None,
) -> None:
    """Submit a federated run to this coordinator's SuperLink over TLS and follow it.

    Shows the same per-round progress as `fedvault simulate` and writes the same run
    directory. Run it on the coordinator, while `fedvault server start` is running. After
    a crash, `--resume RUN_DIR` continues from the last finished round.
    """
    from fedvault.common.locks import RUN_LOCK, holding
    from fedvault.common.report import RunDirectory
    from fedvault.server.deploy import (
        CONNECTION,
        ledger_record_path,
        running_coordinator,
        site_nodes,
    )
    from fedvault.server.runs import coordinator_run_config, run_app

    server_kit = load_kit(kit, role="server")
    provisioned = len(server_kit.site_public_keys)
    if sites is not None and not 1 <= sites <= provisioned:
        raise ConfigError(
            f"--sites must be in [1, {provisioned}] (the provisioned sites), got {sites}",
            hint=f"Give --sites a number of sites from 1 to {provisioned}, or leave it out "
            "to wait for every provisioned site.",
            setting="--sites",
        )
    base: dict[str, Any] = read_toml(scenario_path(scenario)) if scenario and not resume else {}
    every_site = sites in (None, provisioned)
    deployment = {
        "federation": {
            "sites": sites or provisioned,
            # every provisioned site is expected: a slow start names the missing ones
            "site-names": sorted(server_kit.site_public_keys) if every_site else [],
        },
        "data": {"dataset": "site-files"},
    }
    flags = flags_layer(
        sites=None,
        rounds=rounds,
        min_sites=min_sites,
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
        central_dp=central_dp_choice(central_dp, no_central_dp),
        central_noise_multiplier=central_noise_multiplier,
        central_clipping_norm=central_clipping_norm,
    )
    if resume is not None:
        given = flags if sites is None else {**flags, "sites": sites}
        cfg, run_dir = resumable_run(resume, scenario=scenario, flags=given, out=out)
    else:
        cfg = build_config(base, deployment, flags=flags)
        run_dir = new_run_dir(cfg.name, out)
    home, control = running_coordinator(server_kit)  # settings are checked before this
    # one command writes a run directory at a time: a second `run --resume` (or a simulate
    # given the same --out) is refused naming this PID, as `fedvault simulate` does
    with holding(run_dir / RUN_LOCK, f"run directory {run_dir}"):
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
            site_run_config=coordinator_run_config(
                site_nodes(server_kit), ledger_record_path(server_kit)
            ),
            resume=resume is not None,
        )
    print_summary(summary, run_dir.resolve(), title="fedvault run finished")


__all__ = ["client_app", "err_console", "run_command", "server_app"]
