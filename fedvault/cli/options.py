"""What `fedvault simulate` and `fedvault run` share: their flags, the flags' config layer,
the scenario file, and the run folder (new, or one to resume)."""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer

from fedvault.common.config import FedvaultConfig, build_config, read_toml
from fedvault.common.errors import ConfigError
from fedvault.common.registry import STRATEGIES


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
        help=STRATEGIES.help_text() + " (the robust ones' settings, trim-fraction and "
        "krum-byzantine, go in a scenario's [federation])."
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
