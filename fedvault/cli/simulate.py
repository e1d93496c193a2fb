"""`fedvault simulate`: scenario and flags in, validated config and checked data, then the run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

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
    must_be_folder,
    new_run_dir,
    resumable_run,
    scenario_path,
)
from fedvault.cli.output import (
    console,
    err_console,
    print_summary,
)
from fedvault.common.config import FedvaultConfig, build_config, read_toml

# torch, Opacus, scikit-learn and numpy are imported inside the commands that use them, so
# that `fedvault --help` answers at once (tests/fedvault/test_cli_imports.py checks it).
if TYPE_CHECKING:
    from fedvault.common.site_privacy import SimulatedSitePolicy

DEFAULT_SCENARIO = "hospitals"


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
