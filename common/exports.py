"""Export a finished run directory to the tools people already use: MLflow and TensorBoard.

Both read only the run directory's own files (``rounds.jsonl``, ``metrics.jsonl``,
``summary.json``, ``config.toml``) and write what the report shows: the overall metrics of
every round (accuracy, loss, balanced accuracy, macro F1, ROC AUC, max ε) and each site's
(accuracy, loss, ε spent so far), step = round; MLflow also gets the effective configuration
as parameters, the summary as tags, and the report, plots and summary as artifacts. Counts
and aggregates only, as in the report: no weights, no rows.

The libraries are optional extras (``fedvault[mlflow]``: mlflow-skinny with SQLAlchemy and
Alembic for a local SQLite store; ``fedvault[tensorboard]``: tensorboardX) and imported only
here, when an export runs. MLflow 3 no longer writes its plain-folder store, so a local path
given as the MLflow target becomes a SQLite store at that path, its artifacts in a folder
beside it; anything with a scheme (``sqlite:///…``, ``http://…``) is passed to MLflow as a
tracking URI. A run is exported once per target: its MLflow run is tagged with the run
directory's identity, and its TensorBoard folder must not exist yet.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedvault.common.errors import ConfigError
from fedvault.common.report import (
    CONFIG_FILE,
    METRICS_FILE,
    PLOT_FILE,
    REPORT_FILE,
    ROUNDS_FILE,
    SITE_PLOT_FILE,
    SUMMARY_FILE,
    read_jsonl,
)

logger = logging.getLogger(__name__)

#: The overall metrics of a round (rounds.jsonl keys), exported as ``overall/<key>``.
ROUND_METRICS = ("accuracy", "loss", "balanced_accuracy", "macro_f1", "roc_auc", "epsilon")
#: A site's metrics of a round (metrics.jsonl keys), exported as ``site/<site>/<key>``.
SITE_METRICS = ("accuracy", "loss", "epsilon")
#: Files of a run directory attached to its MLflow run, when present.
ARTIFACTS = (REPORT_FILE, PLOT_FILE, SITE_PLOT_FILE, SUMMARY_FILE, CONFIG_FILE)
#: The MLflow tag that names the run directory a run was exported from.
SOURCE_TAG = "fedvault.run_dir_id"
EXTRA_HINT = (
    "Install the optional extra: pip install 'fedvault[{extra}]' (./setup.sh's dev set has it)."
)


@dataclass(frozen=True)
class RunRecord:
    """What a run directory holds, read once: the series to export and the run's identity."""

    path: Path
    name: str
    identity: str
    summary: Mapping[str, Any]
    params: Mapping[str, str]
    overall: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    sites: list[tuple[int, str, dict[str, float]]] = field(default_factory=list)

    def scalars(self) -> Iterator[tuple[str, float, int]]:
        """Every (tag, value, round) to export, overall first."""
        for rnd, values in self.overall:
            for key, value in values.items():
                yield f"overall/{key}", value, rnd
        for rnd, site, values in self.sites:
            for key, value in values.items():
                yield f"site/{site}/{key}", value, rnd


def _numbers(row: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    return {
        k: float(row[k])
        for k in keys
        if isinstance(row.get(k), int | float) and not isinstance(row.get(k), bool)
    }


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


def read_run(run_dir: Path) -> RunRecord:
    """The run in ``run_dir``; a ConfigError listing every file that is missing or unreadable."""
    if not run_dir.is_dir():
        raise ConfigError(
            f"run directory {run_dir} does not exist" if not run_dir.exists()
            else f"{run_dir} is a file, not a run directory",
            hint="Give the folder a run wrote (`fedvault simulate --out DIR`, `fedvault run`).",
        )  # fmt: skip
    problems: list[str] = []
    loaded: dict[str, Any] = {}
    for name in (ROUNDS_FILE, METRICS_FILE, SUMMARY_FILE):
        path = run_dir / name
        try:
            if name == SUMMARY_FILE:
                loaded[name] = json.loads(path.read_text(encoding="utf-8"))
            elif not path.is_file():
                raise FileNotFoundError(path)
            else:
                loaded[name] = read_jsonl(path)
        except FileNotFoundError:
            problems.append(f"{name} is missing")
        except (OSError, ValueError) as err:
            problems.append(f"{name} cannot be read ({type(err).__name__})")
    params: dict[str, str] = {}
    config = run_dir / CONFIG_FILE
    if config.exists():
        try:
            params = _flatten(tomllib.loads(config.read_text(encoding="utf-8")))
        except (OSError, tomllib.TOMLDecodeError) as err:
            problems.append(f"{CONFIG_FILE} cannot be read ({type(err).__name__})")
    if problems:
        raise ConfigError(
            f"{run_dir} is not a complete fedvault run directory: {'; '.join(problems)}",
            hint="Export a run that has finished (or ended early); "
            "an interrupted run finishes with --resume first.",
        )
    summary = loaded[SUMMARY_FILE]
    stat = run_dir.resolve().stat()
    started = str(summary.get("started_at", ""))
    return RunRecord(
        path=run_dir,
        name=str(summary.get("name") or run_dir.name),
        identity=f"{run_dir.resolve()}@{started or stat.st_ino}",
        summary=summary,
        params=params,
        overall=[(int(r["round"]), _numbers(r, ROUND_METRICS)) for r in loaded[ROUNDS_FILE]],
        sites=[
            (int(r["round"]), str(r["site"]), _numbers(r, SITE_METRICS))
            for r in loaded[METRICS_FILE]
        ],
    )


def _summary_tags(summary: Mapping[str, Any]) -> dict[str, str]:
    keys = ("dataset", "model", "strategy", "accountant", "delta", "epsilon", "rounds",
            "final_accuracy", "started_at", "ended_early")  # fmt: skip
    tags = {f"fedvault.{k}": str(summary[k]) for k in keys if summary.get(k) is not None}
    for site, reason in sorted((summary.get("failed_sites") or {}).items()):
        tags[f"fedvault.failed.{site}"] = str(reason)[:500]
    return tags


def _optional(module: str, *, flag: str, extra: str) -> Any:
    """``module`` of an optional extra, imported now; a ConfigError naming ``extra`` if absent."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f"{flag} needs {module.split('.')[0]}, which is not installed ({err.name})",
            hint=EXTRA_HINT.format(extra=extra),
        ) from err


def mlflow_target(target: str) -> tuple[str, Path | None]:
    """The tracking URI for ``target`` and, for a local store, the artifact folder beside it."""
    if "://" in target or target.startswith("sqlite:"):
        return target, None
    path = Path(target).expanduser().resolve()
    if path.is_dir():
        raise ConfigError(
            f"--mlflow {target} is a folder; MLflow 3 keeps a local store in one SQLite file",
            hint=f"Give a file name, e.g. --mlflow {Path(target) / 'mlflow.db'}",
        )
    if not path.parent.is_dir():
        raise ConfigError(
            f"--mlflow {target}: folder {path.parent} does not exist",
            hint="Create the folder first, or give a path in an existing one.",
        )
    return f"sqlite:///{path}", path.with_name(f"{path.stem}-artifacts")


def export_mlflow(run: RunRecord, target: str, *, experiment: str) -> tuple[str, bool]:
    """Log ``run`` as one MLflow run in ``experiment`` at ``target``: its MLflow run id, and
    whether it was logged now (False: the run directory had been exported there before, and
    that run's id is returned instead of logging it twice)."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no INFO lines on a terminal
    entities = _optional("mlflow.entities", flag="--mlflow", extra="mlflow")
    tracking = _optional("mlflow.tracking", flag="--mlflow", extra="mlflow")
    uri, artifacts = mlflow_target(target)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    client = tracking.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        location = artifacts.as_uri() if artifacts is not None else None
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = found.experiment_id
    escaped = run.identity.replace("'", "\\'")
    previous = client.search_runs(
        [experiment_id], filter_string=f"tags.`{SOURCE_TAG}` = '{escaped}'", max_results=1
    )
    if previous:
        return str(previous[0].info.run_id), False
    mlflow_run = client.create_run(
        experiment_id,
        run_name=f"{run.name} ({run.path.name})",
        tags={SOURCE_TAG: run.identity, **_summary_tags(run.summary)},
    )
    run_id = str(mlflow_run.info.run_id)
    try:
        stamp = int(mlflow_run.info.start_time)
        params = [entities.Param(k[:250], v[:6000]) for k, v in sorted(run.params.items())]
        metrics = [entities.Metric(tag, value, stamp, step) for tag, value, step in run.scalars()]
        for start in range(0, max(len(params), len(metrics)), 100):
            client.log_batch(
                run_id, metrics=metrics[start : start + 100], params=params[start : start + 100]
            )
        for name in ARTIFACTS:
            if (run.path / name).is_file():
                client.log_artifact(run_id, str(run.path / name))
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id, True


def export_tensorboard(run: RunRecord, logdir: Path) -> Path:
    """Write ``run``'s scalars as TensorBoard event files in ``logdir/<run folder name>``."""
    tensorboard_x = _optional("tensorboardX", flag="--tensorboard", extra="tensorboard")
    if logdir.exists() and not logdir.is_dir():
        raise ConfigError(
            f"--tensorboard {logdir} is a file", hint="Give a folder (created if missing)."
        )
    target = logdir / run.path.resolve().name
    if target.exists():
        raise ConfigError(
            f"{target} exists: this run was exported there already",
            hint="Remove that folder to export the run again, or give another --tensorboard.",
        )
    target.mkdir(parents=True)
    writer = tensorboard_x.SummaryWriter(logdir=str(target), flush_secs=1)
    try:
        for tag, value, step in run.scalars():
            writer.add_scalar(tag, value, global_step=step)
        config = "\n".join(f"    {k} = {v}" for k, v in sorted(run.params.items()))
        writer.add_text("config", config or f"(no {CONFIG_FILE})", global_step=0)
    finally:
        writer.close()
    return target
