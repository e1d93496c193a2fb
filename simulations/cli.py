"""`fedvault simulate`: scenario and flags in, validated config and checked data, then the run."""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from common.config import FedvaultConfig, build_config, read_toml
from common.data import load_dataset
from common.errors import ConfigError
from common.partition import partition_indices

DEFAULT_SCENARIO = "hospitals"
console = Console()
err_console = Console(stderr=True)


def scenario_path(name_or_path: str) -> Path:
    """A scenario file path, or the name of one shipped in simulations/ (e.g. ``banks``)."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" or path.exists():
        return path
    shipped = resources.files("simulations").joinpath(f"{name_or_path.replace('-', '_')}.toml")
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(
        p.name.removesuffix(".toml").replace("_", "-")
        for p in resources.files("simulations").iterdir()
        if p.name.endswith(".toml")
    )
    raise ConfigError(
        f"unknown scenario '{name_or_path}'; give a .toml file or one of: {', '.join(names)}"
    )


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
    if seed is not None:
        top["seed"] = seed
    return {**top, **{k: v for k, v in layer.items() if v}}


def check_data(cfg: FedvaultConfig) -> str:
    """Load the dataset and split it into sites now, so bad data fails before any process starts."""
    dataset = load_dataset(
        cfg.data.dataset,
        label_column=cfg.data.label_column or None,
        data_dir=Path(cfg.data.data_dir) if cfg.data.data_dir else None,
        seed=cfg.seed,
    )
    partition_indices(
        dataset.labels,
        cfg.federation.sites,
        method=cfg.data.partition,
        alpha=cfg.data.alpha,
        seed=cfg.seed,
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
            f"ε = {summary['epsilon']:.3f} (max over sites), "
            f"δ = {summary['delta']:g}, accountant {summary['accountant']}",
        )
    else:
        table.add_row("privacy", "[yellow]none: trained without differential privacy[/yellow]")
    table.add_row("rounds × sites", f"{summary['rounds']} × {summary['sites']}")
    table.add_row("wall time", f"{summary['wall_seconds']:.1f} s in the ServerApp")
    if summary.get("failed_sites"):
        table.add_row("failed sites", ", ".join(sorted(summary["failed_sites"])))
    table.add_row("run directory", str(run_dir))
    console.print(table)


# Options shared by `fedvault simulate` and `fedvault run` (one definition, one help text).
RoundsOption = Annotated[int | None, typer.Option(help="Federated rounds.")]
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
StrategyOption = Annotated[str | None, typer.Option(help="fedavg, fedprox or fedadam.")]
ModelOption = Annotated[str | None, typer.Option(help="auto, logistic, mlp or cnn.")]
OutOption = Annotated[
    Path | None, typer.Option(help="Run directory (default: runs/<scenario>-<UTC time>).")
]


def new_run_dir(name: str, out: Path | None) -> Path:
    """The run directory to write: ``out`` or runs/<name>-<UTC time>; never an old run's."""
    run_dir = out or Path("runs") / f"{name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
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
    seed: Annotated[
        int | None,
        typer.Option(help="Seed for partitioning and initial weights (never for DP noise)."),
    ] = None,
    strategy: StrategyOption = None,
    model: ModelOption = None,
    out: OutOption = None,
) -> None:
    """Simulate a federation of partner sites on this machine (Flower Simulation Engine).

    Each simulated site trains on its own share of the data with DP-SGD (Opacus); the
    coordinator aggregates; you see accuracy and the ε spent round by round. Results go to
    the run directory: config.toml, metrics.jsonl, summary.json, model.pt and a plot.
    """
    base = read_toml(scenario_path(scenario or DEFAULT_SCENARIO))
    flags = flags_layer(
        sites=sites,
        rounds=rounds,
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
    )
    cfg = build_config(base, flags)
    described = check_data(cfg)
    run_dir = new_run_dir(cfg.name, out)

    privacy = (
        f"target ε = {cfg.privacy.target_epsilon:g}" if cfg.privacy.target_epsilon is not None
        else f"σ = {cfg.privacy.noise_multiplier:g}"
    ) if cfg.privacy.enabled else "NO differential privacy"  # fmt: skip
    console.print(
        f"[bold]fedvault simulate[/bold] {cfg.name}: {cfg.federation.sites} sites × "
        f"{cfg.federation.rounds} rounds on {cfg.data.dataset} ({described}), "
        f"{cfg.federation.strategy}, {privacy}, δ = {cfg.privacy.target_delta:g}"
    )
    err_console.print(
        "[yellow]warning: local simulation uses a SuperLink in insecure (plaintext) mode on "
        "127.0.0.1 — for local simulation only; real federations use TLS.[/yellow]"
    )
    from simulations.runner import simulate  # imports Flower; keep --help fast

    summary = simulate(cfg, run_dir, echo=lambda line: console.print(line, highlight=False))
    print_summary(summary, run_dir.resolve())
