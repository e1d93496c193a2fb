"""`fedvault simulate`: scenario and flags in, validated config and checked data, then the run."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedvault.common.config import FedvaultConfig, build_config, read_toml
from fedvault.common.errors import ConfigError

# torch, Opacus, scikit-learn and numpy are imported inside the commands that use them, so
# that `fedvault --help` answers at once (tests/fedvault/test_cli_imports.py checks it).
if TYPE_CHECKING:
    from fedvault.common.site_privacy import SimulatedSitePolicy

DEFAULT_SCENARIO = "hospitals"
console = Console()
err_console = Console(stderr=True)


def scenario_path(name_or_path: str) -> Path:
    """A scenario file path, or the name of one shipped in simulations/ (e.g. ``banks``)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        raise ConfigError(
            f"scenario {path} is a directory, not a TOML file",
            hint="Give a scenario .toml file, or a shipped scenario name (hospitals, banks ...).",
        )
    if path.suffix == ".toml" or path.exists():
        return path
    shipped = resources.files("fedvault.simulations").joinpath(
        f"{name_or_path.replace('-', '_')}.toml"
    )
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(
        p.name.removesuffix(".toml").replace("_", "-")
        for p in resources.files("fedvault.simulations").iterdir()
        if p.name.endswith(".toml")
    )
    raise ConfigError(
        f"unknown scenario '{name_or_path}'; give a .toml file or one of: {', '.join(names)}"
    )


def dataset_run_name(dataset: str) -> str:
    """A run's name from its ``--dataset``: the CSV file's stem, or the built-in dataset's name.

    Used when no scenario names the run, so that `--dataset csv:loans.csv` is not "hospitals".
    """
    stem = Path(dataset.removeprefix("csv:")).stem
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "dataset"


def scenario_layer(scenario: str | None, dataset: str | None) -> dict[str, Any]:
    """The scenario's settings (the default scenario's when none is given).

    With no scenario but a ``--dataset``, the run is named after its data, not the default
    scenario (its label, and its default run directory ``runs/NAME-...``).
    """
    layer = read_toml(scenario_path(scenario or DEFAULT_SCENARIO))
    if scenario is None and dataset is not None:
        layer["name"] = dataset_run_name(dataset)
    return layer


def flags_layer(
    *,
    sites: int | None,
    rounds: int | None,
    dataset: str | None,
    label_column: str | None,
    partition: str | None,
    alpha: float | None,
    epsilon: float | None,
    noise_multiplier: float | None,
    no_dp: bool,
    delta: float | None,
    seed: int | None,
    strategy: str | None,
    model: str | None,
    central_dp: bool | None,
    central_noise_multiplier: float | None,
    central_clipping_norm: float | None,
    min_sites: int | None = None,
) -> dict[str, Any]:
    """The command-line flags as a config layer (only the flags that were given)."""
    chosen = [
        name
        for name, given in (
            ("--epsilon", epsilon is not None),
            ("--noise-multiplier", noise_multiplier is not None),
            ("--no-dp", no_dp),
        )
        if given
    ]
    if len(chosen) > 1:
        raise ConfigError(
            f"use only one of --epsilon, --noise-multiplier, --no-dp (got {' and '.join(chosen)})"
        )
    layer: dict[str, dict[str, Any]] = {"federation": {}, "data": {}, "privacy": {}, "model": {}}
    top: dict[str, Any] = {}
    if sites is not None:
        layer["federation"]["sites"] = sites
        layer["federation"]["site-names"] = []  # names of a scenario no longer fit
    if rounds is not None:
        layer["federation"]["rounds"] = rounds
    if min_sites is not None:
        layer["federation"]["min-sites"] = min_sites
    if strategy is not None:
        layer["federation"]["strategy"] = strategy
    if dataset is not None:
        layer["data"]["dataset"] = dataset
    if label_column is not None:
        layer["data"]["label-column"] = label_column
    if partition is not None:
        layer["data"]["partition"] = partition
    if alpha is not None:
        layer["data"]["alpha"] = alpha
    if model is not None:
        layer["model"]["name"] = model
    if epsilon is not None:
        layer["privacy"].update({"enabled": True, "target-epsilon": epsilon})
    if noise_multiplier is not None:
        layer["privacy"].update({"enabled": True, "noise-multiplier": noise_multiplier})
    if no_dp:
        layer["privacy"]["enabled"] = False
    if delta is not None:
        layer["privacy"]["target-delta"] = delta
    if central_dp is not None:
        layer["privacy"]["central"] = central_dp
    if central_noise_multiplier is not None:
        layer["privacy"]["central-noise-multiplier"] = central_noise_multiplier
    if central_clipping_norm is not None:
        layer["privacy"]["central-clipping-norm"] = central_clipping_norm
    if seed is not None:
        top["seed"] = seed
    return {**top, **{k: v for k, v in layer.items() if v}}


def simulated_site_policy(
    cfg: FedvaultConfig,
    ledger_dir: Path | None,
    max_epsilon: list[str],
    *,
    saved: Path | None = None,
) -> SimulatedSitePolicy:
    """The simulated sites' own privacy settings (`--ledger-dir`, `--site-max-epsilon`).

    A resumed simulation starts from the settings its first attempt saved (``saved``), so
    its sites keep their ledgers and caps; flags given again replace them.
    """
    from fedvault.common.site_privacy import SimulatedSitePolicy, parse_site_max_epsilon

    if ledger_dir is not None:
        must_be_folder(ledger_dir, "--ledger-dir", what="the sites' ledgers")
    names = [cfg.site_name(i) for i in range(cfg.federation.sites)]
    policy = SimulatedSitePolicy()
    if saved is not None and saved.is_file():
        policy = SimulatedSitePolicy.from_run_config(json.loads(saved.read_text("utf-8")))
    return SimulatedSitePolicy(
        ledger_dir=str(ledger_dir.expanduser().resolve()) if ledger_dir else policy.ledger_dir,
        max_epsilon=parse_site_max_epsilon(max_epsilon, names)
        if max_epsilon
        else policy.max_epsilon,
    )


def resumable_run(
    run_dir: Path, *, scenario: str | None, flags: dict[str, Any], out: Path | None
) -> tuple[FedvaultConfig, Path]:
    """The configuration and folder of a run to resume; refused if anything would change it."""
    from fedvault.common.checkpoint import load_checkpoint
    from fedvault.common.locks import RUN_LOCK, check
    from fedvault.common.report import CONFIG_FILE, SUMMARY_FILE

    check(run_dir / RUN_LOCK, f"run directory {run_dir}")  # a live run: name its PID
    if scenario is not None or flags or out is not None:
        raise ConfigError(
            f"--resume continues {run_dir} with its own config.toml; it takes no scenario, "
            "--out or run settings (rounds, privacy, data, strategy ...)",
            hint="Drop them; only --ledger-dir and --site-max-epsilon (the sites' own "
            "settings) may be given again.",
        )
    config = run_dir / CONFIG_FILE
    if not config.is_file():
        raise ConfigError(
            f"{run_dir} is not a fedvault run directory (no {CONFIG_FILE})",
            hint="Give the folder a run wrote (its --out).",
        )
    cfg = build_config(read_toml(config))
    checkpoint = load_checkpoint(run_dir)
    if checkpoint.finished and (run_dir / SUMMARY_FILE).is_file():
        raise ConfigError(
            f"{run_dir} already finished all {checkpoint.total_rounds} rounds; nothing to resume"
        )
    return cfg, run_dir


def check_data(cfg: FedvaultConfig) -> str:
    """Load the dataset and split it into sites now, so bad data fails before any process starts."""
    from fedvault.common.data import load_dataset
    from fedvault.common.partition import check_delta_fits, partition_indices, train_rows_for

    dataset = load_dataset(
        cfg.data.dataset,
        label_column=cfg.data.label_column or None,
        data_dir=Path(cfg.data.data_dir) if cfg.data.data_dir else None,
        seed=cfg.seed,
    )
    parts = partition_indices(
        dataset.labels,
        cfg.federation.sites,
        method=cfg.data.partition,
        alpha=cfg.data.alpha,
        seed=cfg.seed,
    )
    if cfg.privacy.enabled:  # each simulated site would refuse a δ its rows cannot carry
        check_delta_fits(
            cfg.privacy.target_delta,
            {
                cfg.site_name(i): train_rows_for(len(part), cfg.data.test_fraction)
                for i, part in enumerate(parts)
            },
        )
    return f"{len(dataset)} rows, {dataset.num_classes} classes, features {dataset.feature_shape}"


def print_summary(
    summary: dict[str, Any], run_dir: Path, *, title: str = "fedvault simulation finished"
) -> None:
    """The end-of-run table: accuracy, privacy spent, size, time, where the results are."""
    table = Table(title=title, show_header=False, title_style="bold")
    table.add_column(style="bold")
    table.add_column()
    table.add_row(
        "final accuracy",
        f"{summary['final_accuracy']:.3f}"
        + (
            f"  (initial {summary['initial_accuracy']:.3f})"
            if summary.get("initial_accuracy") is not None
            else ""
        ),
    )
    if summary["dp"]:
        table.add_row(
            "privacy spent",
            f"ε = {summary['epsilon']:.3f} (max over sites, every run on their data), "
            f"δ = {summary['delta']:g}, accountant {summary['accountant']}",
        )
    elif summary.get("central_dp"):
        table.add_row("privacy spent", "[yellow]none at the sites: trained without DP-SGD[/yellow]")
    else:
        table.add_row("privacy", "[yellow]none: trained without differential privacy[/yellow]")
    central = summary.get("central_dp")
    if central:
        table.add_row(
            "central DP (site-level)",
            f"ε = {central['epsilon']:.3f} at δ = {central['delta']:g}, "
            f"σ = {central['noise_multiplier']:g}, clip {central['clipping_norm']:g}, "
            f"{central['releases']} releases",
        )
    table.add_row("rounds × sites", f"{summary['rounds']} × {summary['sites']}")
    table.add_row("wall time", f"{summary['wall_seconds']:.1f} s in the ServerApp")
    refused = summary.get("refused_sites") or {}
    if refused:
        table.add_row(
            "[red]refused sites[/red]",
            "; ".join(f"{site}: {reason}" for site, reason in sorted(refused.items())),
        )
    failed = sorted(set(summary.get("failed_sites") or {}) - set(refused))
    if failed:
        table.add_row("failed sites", ", ".join(failed))
    table.add_row("run directory", str(run_dir))
    console.print(table)
    privacy = summary.get("privacy") or {}
    if privacy.get("enabled") and privacy.get("sites"):
        console.print(privacy_table(privacy))


def privacy_table(privacy: dict[str, Any]) -> Table:
    """Per site: epsilon of this run, of all runs on its data (its ledger), cap, sigma, q."""
    table = Table(
        title="privacy by site (ε total: every run on its data)",
        title_style="bold",
    )
    table.add_column("site", no_wrap=True)
    for column in ("ε run", "ε total", "max ε", "σ", "q", "steps"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("refused")

    def number(value: Any, spec: str = ".3f") -> str:
        return "—" if value is None else format(value, spec)

    for site, row in sorted(privacy["sites"].items()):
        refused_rounds = row.get("refused_rounds") or []
        table.add_row(
            site,
            number(row.get("run_epsilon")),
            number(row.get("epsilon")),
            number(row.get("max_epsilon"), "g"),
            number(row.get("noise_multiplier"), ".3f"),
            number(row.get("sample_rate"), ".4f"),
            str(row.get("steps", 0)),
            f"[red]rounds {','.join(map(str, refused_rounds))}[/red]" if refused_rounds else "",
        )
    return table


# Options shared by `fedvault simulate` and `fedvault run` (one definition, one help text).
RoundsOption = Annotated[int | None, typer.Option(help="Federated rounds.")]
MinSitesOption = Annotated[
    int | None,
    typer.Option(
        help="Updates a round needs to count; with fewer (sites refused or failed) the run "
        "ends with the reason. Default 1."
    ),
]
EpsilonOption = Annotated[
    float | None,
    typer.Option(
        "--epsilon", help="Target ε per site for the whole run; noise is calibrated to it."
    ),
]
NoiseOption = Annotated[
    float | None, typer.Option(help="Fix the DP-SGD noise multiplier σ instead of a target ε.")
]
NoDpOption = Annotated[
    bool, typer.Option("--no-dp", help="Train without differential privacy (non-private baseline).")
]
DeltaOption = Annotated[float | None, typer.Option("--delta", help="Target δ.")]
# Two plain flags rather than one --central-dp/--no-central-dp pair: the pair's second name
# takes a help column of its own, which cut long option names short at 80 columns.
CentralDpOption = Annotated[
    bool,
    typer.Option(
        "--central-dp",
        help="Central DP: the coordinator clips each site's update and adds Gaussian noise to "
        "the mean (site-level ε, reported apart from the sites' ε; fedavg only). "
        "Default: from the scenario.",
        show_default=False,
    ),
]
NoCentralDpOption = Annotated[
    bool,
    typer.Option(
        "--no-central-dp",
        help="No central DP, whatever the scenario says.",
        show_default=False,
    ),
]


def central_dp_choice(central_dp: bool, no_central_dp: bool) -> bool | None:
    """--central-dp → True, --no-central-dp → False, neither → the scenario's setting."""
    if central_dp and no_central_dp:
        raise ConfigError(
            "use only one of --central-dp and --no-central-dp (got both)",
            hint="Drop one of them.",
        )
    return True if central_dp else False if no_central_dp else None


CentralNoiseOption = Annotated[
    float | None,
    typer.Option(help="Central DP noise multiplier σ on the aggregate (with --central-dp)."),
]
CentralClipOption = Annotated[
    float | None,
    typer.Option(help="Central DP clipping norm of each site's update (with --central-dp)."),
]
StrategyOption = Annotated[
    str | None,
    typer.Option(
        help="fedavg, fedprox, fedadam, or robust aggregation: trimmed-mean, median, krum "
        "(their settings, trim-fraction and krum-byzantine, go in a scenario's [federation])."
    ),
]
ModelOption = Annotated[str | None, typer.Option(help="auto, logistic, mlp or cnn.")]
ResumeOption = Annotated[
    Path | None,
    typer.Option(
        help="Continue an interrupted run from its last checkpoint (its run directory), with "
        "its own configuration; it ends with the same number of rounds.",
        show_default=False,
    ),
]
OutOption = Annotated[
    Path | None,
    typer.Option(
        help="Run directory, new or empty (default: runs/NAME-YYYYmmdd-HHMMSS, NAME the "
        "scenario's name, or the --dataset's when no scenario is given).",
        show_default=False,
    ),
]


def must_be_folder(path: Path, flag: str, *, what: str) -> None:
    """Refuse ``path`` now if it, or a folder it would be made in, is a file."""
    for place in (path, *path.parents):
        if place.exists() and not place.is_dir():
            named = f"{flag} {path} is" if place == path else f"{flag} {path}: {place} is"
            raise ConfigError(
                f"{named} a file, not a folder",
                hint=f"Give {flag} a folder for {what}: a new one, or one that exists.",
            )
        if place.exists():
            return


def new_run_dir(name: str, out: Path | None) -> Path:
    """The run directory to write: ``out`` or runs/<name>-<UTC time>; never an old run's."""
    run_dir = out or Path("runs") / f"{name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    must_be_folder(run_dir, "--out", what="the run directory")
    from fedvault.common.locks import RUN_LOCK, check

    check(run_dir / RUN_LOCK, f"run directory {run_dir}")  # a live run: name its PID
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"run directory {run_dir} already exists and is not empty",
            hint="Choose another --out, or remove the old run.",
        )
    return run_dir


def simulate_command(
    scenario: Annotated[
        str | None,
        typer.Argument(
            help="Scenario TOML file, or a shipped scenario name: hospitals (default), banks, "
            "fashion-mnist.",
            show_default=False,
        ),
    ] = None,
    sites: Annotated[int | None, typer.Option(help="Number of simulated partner sites.")] = None,
    rounds: RoundsOption = None,
    min_sites: MinSitesOption = None,
    dataset: Annotated[
        str | None,
        typer.Option(help="breast-cancer, digits, credit (synthetic), fashion-mnist, or csv:PATH."),
    ] = None,
    label_column: Annotated[
        str | None, typer.Option(help="Label column of a csv:PATH dataset.")
    ] = None,
    partition: Annotated[
        str | None,
        typer.Option(help="How rows are split into sites: iid or dirichlet (label skew)."),
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help="Dirichlet concentration; smaller = more skew.")
    ] = None,
    epsilon: EpsilonOption = None,
    noise_multiplier: NoiseOption = None,
    no_dp: NoDpOption = False,
    delta: DeltaOption = None,
    central_dp: CentralDpOption = False,
    no_central_dp: NoCentralDpOption = False,
    central_noise_multiplier: CentralNoiseOption = None,
    central_clipping_norm: CentralClipOption = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed for partitioning and initial weights (never for DP noise)."),
    ] = None,
    strategy: StrategyOption = None,
    model: ModelOption = None,
    ledger_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder of the simulated sites' privacy ledgers (one per site). Reuse it "
            "across runs to compose ε over every run on the same data "
            "(default: a fresh one in the run directory).",
        ),
    ] = None,
    site_max_epsilon: Annotated[
        list[str] | None,
        typer.Option(
            help="A simulated site's lifetime ε cap, as the site itself would set it: E for "
            "every site, or SITE=E for one (repeatable). A site refuses rounds past it.",
            show_default=False,
        ),
    ] = None,
    out: OutOption = None,
    resume: ResumeOption = None,
) -> None:
    """Simulate a federation of partner sites on this machine (Flower Simulation Engine).

    Each simulated site trains on its own share of the data with DP-SGD; the
    coordinator aggregates; you see accuracy and the ε spent round by round. Results go to
    the run directory: config.toml, metrics.jsonl, summary.json, model.pt and a plot.
    """
    from fedvault.common.checkpoint import load_checkpoint
    from fedvault.common.report import SITE_POLICY_FILE

    base = scenario_layer(scenario, dataset) if resume is None else {}
    flags = flags_layer(
        sites=sites,
        rounds=rounds,
        min_sites=min_sites,
        dataset=dataset,
        label_column=label_column,
        partition=partition,
        alpha=alpha,
        epsilon=epsilon,
        noise_multiplier=noise_multiplier,
        no_dp=no_dp,
        delta=delta,
        seed=seed,
        strategy=strategy,
        model=model,
        central_dp=central_dp_choice(central_dp, no_central_dp),
        central_noise_multiplier=central_noise_multiplier,
        central_clipping_norm=central_clipping_norm,
    )
    if resume is not None:
        cfg, run_dir = resumable_run(resume, scenario=scenario, flags=flags, out=out)
        site_policy = simulated_site_policy(
            cfg, ledger_dir, site_max_epsilon or [], saved=run_dir / SITE_POLICY_FILE
        )
    else:
        cfg = build_config(base, flags=flags)
        site_policy = simulated_site_policy(cfg, ledger_dir, site_max_epsilon or [])
        run_dir = new_run_dir(cfg.name, out)
    described = check_data(cfg)

    privacy = (
        f"target ε = {cfg.privacy.target_epsilon:g}" if cfg.privacy.target_epsilon is not None
        else f"σ = {cfg.privacy.noise_multiplier:g}"
    ) if cfg.privacy.enabled else "NO differential privacy"  # fmt: skip
    if cfg.privacy.central:
        privacy = (
            f"{privacy if cfg.privacy.enabled else 'no DP-SGD at the sites'}, central DP σ = "
            f"{cfg.privacy.central_noise_multiplier:g} clip {cfg.privacy.central_clipping_norm:g}"
        )
    console.print(
        f"[bold]fedvault simulate[/bold] {cfg.name}: {cfg.federation.sites} sites × "
        f"{cfg.federation.rounds} rounds on {cfg.data.dataset} ({described}), "
        f"{cfg.federation.strategy}, {privacy}, δ = {cfg.privacy.target_delta:g}"
    )
    err_console.print(
        "[yellow]warning: local simulation uses a SuperLink in insecure (plaintext) mode on "
        "127.0.0.1 — for local simulation only; real federations use TLS.[/yellow]"
    )
    from fedvault.simulations.runner import simulate  # imports Flower; keep --help fast

    if resume is not None:
        console.print(f"resuming {run_dir} after round {load_checkpoint(run_dir).round}")
    summary = simulate(
        cfg,
        run_dir,
        site_policy=site_policy,
        echo=lambda line: console.print(line, highlight=False),
        resume=resume is not None,
    )
    print_summary(summary, run_dir.resolve())
