"""`fedvault export`: a finished run directory into MLflow and/or TensorBoard (optional extras)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedvault.common.errors import ConfigError


def export_command(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="A finished run directory (`fedvault simulate --out DIR`, `fedvault run`).",
            show_default=False,
        ),
    ],
    mlflow: Annotated[
        str | None,
        typer.Option(
            "--mlflow",
            metavar="PATH|URI",
            help="MLflow target: a local SQLite store file (created if missing; artifacts in "
            "a folder named after it + '-artifacts', beside it) or a tracking URI "
            "(with a sqlite, http or https scheme). Needs the `mlflow` extra.",
            show_default=False,
        ),
    ] = None,
    experiment: Annotated[
        str, typer.Option("--experiment", help="MLflow experiment the run is logged in.")
    ] = "fedvault",
    tensorboard: Annotated[
        Path | None,
        typer.Option(
            "--tensorboard",
            metavar="DIR",
            help="Write TensorBoard event files in a folder of DIR named after the run "
            "directory (view: `tensorboard --logdir DIR`). Needs the `tensorboard` extra.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Export a finished run: per-round and per-site accuracy, loss, ε (and the config,
    report and plots to MLflow). A run already exported to a target is not logged twice."""
    from fedvault.common.exports import export_mlflow, export_tensorboard, read_run

    if mlflow is None and tensorboard is None:
        raise ConfigError(
            "fedvault export needs a target: --mlflow PATH|URI and/or --tensorboard DIR",
            hint="e.g. fedvault export RUN_DIR --mlflow mlflow.db --tensorboard tb-logs",
        )
    run = read_run(run_dir)
    if mlflow is not None:
        run_id, logged = export_mlflow(run, mlflow, experiment=experiment)
        done = "logged as" if logged else "already exported as"
        typer.echo(f"mlflow: {run_dir} {done} run {run_id}, experiment {experiment!r}, {mlflow}")
    if tensorboard is not None:
        folder = export_tensorboard(run, tensorboard)
        typer.echo(f"tensorboard: {folder} (view: tensorboard --logdir {tensorboard})")
