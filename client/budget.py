"""`fedvault client budget`: the epsilon each dataset has spent, read from the site's own ledger."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fedvault.common.data import load_dataset
from fedvault.common.errors import ConfigError, LedgerError
from fedvault.common.fingerprint import dataset_fingerprint, short_fingerprint
from fedvault.common.ledger import GENESIS, KIT_LEDGER, DatasetSummary, PrivacyLedger, read_anchor
from fedvault.common.privacy import check_accountant
from fedvault.runtime.kits import load_kit

logger = logging.getLogger(__name__)

_WHERE_HINT = (
    f"--kit DIR reads DIR/{KIT_LEDGER.as_posix()}, the ledger `fedvault client start --kit DIR` "
    "keeps; --ledger PATH reads a ledger file directly."
)


def ledger_location(*, kit: Path | None, ledger: Path | None) -> Path:
    """The ledger file to read: ``kit / KIT_LEDGER`` of a checked site kit, or ``ledger``."""
    if kit is not None and ledger is None:
        return load_kit(kit, role="site").path / KIT_LEDGER
    if ledger is not None and kit is None:
        return Path(ledger).expanduser().resolve()
    raise ConfigError(
        f"give exactly one of --kit and --ledger, got {'both' if kit else 'neither'}",
        hint=_WHERE_HINT,
    )


def _check_settings(*, max_epsilon: float, delta: float, accountant: str) -> None:
    if not (math.isfinite(max_epsilon) and max_epsilon > 0):
        raise ConfigError(
            f"--max-epsilon must be > 0, got {max_epsilon:g}",
            hint="Pass the same --max-epsilon as `fedvault client start` on this site.",
        )
    if not 0 < delta < 1:
        raise ConfigError(
            f"--delta must be in (0, 1), got {delta:g}",
            hint="Pass the same --delta as `fedvault client start` on this site (default 1e-05).",
        )
    check_accountant(accountant)


def budget_report(
    ledger_path: Path, *, max_epsilon: float, delta: float, accountant: str
) -> dict[str, Any]:
    """Per dataset in the ledger: its DatasetSummary, ``remaining_epsilon`` and ``exhausted``.

    ``remaining_epsilon`` is ``max(0, max_epsilon - epsilon)``; ``exhausted`` is true when it
    is 0. A missing ledger file is a ConfigError and is never created.
    """
    _check_settings(max_epsilon=max_epsilon, delta=delta, accountant=accountant)
    path = Path(ledger_path)
    if not path.exists() and read_anchor(path) is not None:
        raise LedgerError(
            f"the privacy ledger {path} is missing, but its anchor says it held entries: "
            "it was deleted or moved",
            hint="Restore the ledger from its backup; `fedvault client budget --verify` "
            "lists what is wrong.",
        )
    if not path.exists():
        raise ConfigError(
            f"no privacy ledger at {path}: this site has not trained yet",
            hint="The ledger appears after the site's first DP round. " + _WHERE_HINT,
        )
    if not path.is_file():
        raise ConfigError(f"the privacy ledger {path} is not a file", hint=_WHERE_HINT)
    with PrivacyLedger(path) as ledger:
        summaries = ledger.summary(delta=delta, accountant=accountant)
    datasets = [_with_remaining(summary, max_epsilon) for summary in summaries]
    logger.info("ledger %s: %d dataset(s) at delta=%g (%s)", path, len(datasets), delta, accountant)
    return {
        "ledger": str(path),
        "delta": delta,
        "accountant": accountant,
        "max_epsilon": max_epsilon,
        "datasets": datasets,
    }


def _with_remaining(summary: DatasetSummary, max_epsilon: float) -> dict[str, Any]:
    remaining = max(0.0, max_epsilon - summary["epsilon"])
    return {**summary, "remaining_epsilon": remaining, "exhausted": remaining == 0.0}


def _when(recorded_at: str) -> str:
    return datetime.fromisoformat(recorded_at).strftime("%Y-%m-%d %H:%M:%S")


def render_budget(report: dict[str, Any], console: Console) -> None:
    """Print ``report`` (from ``budget_report``): one table per dataset, then its runs."""
    console.print(
        f"[bold]privacy ledger[/bold] {escape(report['ledger'])}: δ = {report['delta']:g}, "
        f"accountant {report['accountant']}, max ε = {report['max_epsilon']:g} per dataset "
        "(this site's cap)",
        highlight=False,
        soft_wrap=True,
    )
    if not report["datasets"]:
        console.print("no entries: this ledger has recorded no training yet", highlight=False)
        return
    for dataset in report["datasets"]:
        console.print(_dataset_table(dataset, report["max_epsilon"]))
        console.print(_runs_table(dataset))
        if dataset["exhausted"]:
            console.print(
                f"[bold red]budget exhausted:[/bold red] [red]dataset {dataset['short']} has "
                f"spent ε = {dataset['epsilon']:.3f} of its {report['max_epsilon']:g}; this "
                "site refuses to train on it again[/red]",
                highlight=False,
                soft_wrap=True,
            )


def _dataset_table(dataset: dict[str, Any], max_epsilon: float) -> Table:
    remaining = f"{dataset['remaining_epsilon']:.3f}"
    table = Table(title=f"dataset {dataset['short']}", show_header=False, title_style="bold")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("ε spent", f"{dataset['epsilon']:.3f} of {max_epsilon:g}")
    table.add_row(
        "ε remaining",
        f"[bold red]{remaining} (exhausted)[/bold red]" if dataset["exhausted"] else remaining,
    )
    table.add_row("runs", str(dataset["runs"]))
    table.add_row("rounds", str(dataset["rounds"]))
    table.add_row("DP-SGD steps", str(dataset["steps"]))
    table.add_row("first trained (UTC)", _when(dataset["first_recorded_at"]))
    table.add_row("last trained (UTC)", _when(dataset["last_recorded_at"]))
    return table


def _runs_table(dataset: dict[str, Any]) -> Table:
    table = Table(title=f"runs on {dataset['short']}", title_style="bold")
    table.add_column("run id")
    table.add_column("rounds", justify="right")
    table.add_column("steps", justify="right")
    table.add_column("ε of this run", justify="right")
    table.add_column("cumulative ε", justify="right")
    table.add_column("last trained (UTC)")
    for run in dataset["per_run"]:
        table.add_row(
            Text(run["run_id"]),
            str(run["rounds"]),
            str(run["steps"]),
            f"{run['epsilon']:.3f}",
            f"{run['cumulative_epsilon']:.3f}",
            _when(run["last_recorded_at"]),
        )
    return table


# --- verify -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LedgerCheck:
    """What `fedvault client budget --verify` found: the ledger's head and every problem."""

    ledger: str
    count: int
    head: str
    datasets: int
    problems: list[str]

    @property
    def intact(self) -> bool:
        return not self.problems


def verify_ledger(
    ledger_path: Path, *, data: Path | None = None, label_column: str | None = None
) -> LedgerCheck:
    """Check the ledger's chain, triggers, tables and anchor (PrivacyLedger.verify); with
    ``data``, also that the file is the dataset the ledger last declared. Creates no file.

    A ledger file that is missing while its anchor remains is a problem, not an error; a
    missing ledger without an anchor is a ConfigError, as for the report.
    """
    path = Path(ledger_path)
    if data is not None and not label_column:
        raise ConfigError(
            "--data needs --label-column (the same as `fedvault client start`)",
            hint="e.g. fedvault client budget --verify --data site.csv --label-column label",
        )
    if not path.exists():
        anchor = read_anchor(path)
        if anchor is None:
            raise ConfigError(
                f"no privacy ledger at {path}: this site has not trained yet",
                hint="The ledger appears after the site's first DP round. " + _WHERE_HINT,
            )
        return LedgerCheck(
            ledger=str(path),
            count=0,
            head=GENESIS,
            datasets=0,
            problems=[
                f"the ledger file is missing, but its anchor (written {anchor.updated_at}) "
                f"recorded {anchor.count} entries and {anchor.datasets} dataset declaration(s): "
                "it was deleted or moved"
            ],
        )
    if not path.is_file():
        raise ConfigError(f"the privacy ledger {path} is not a file", hint=_WHERE_HINT)
    with PrivacyLedger(path) as ledger:
        problems = ledger.verify()
        head = ledger.head()
        current = ledger.current_dataset()
        datasets = len(ledger.declared_datasets())
    if data is not None and label_column:
        fingerprint = data_fingerprint(data, label_column)
        if current is not None and fingerprint != current:
            problems.append(
                "the data file's fingerprint is not the dataset this ledger last declared "
                f"({short_fingerprint(current)} declared, {short_fingerprint(fingerprint)} in "
                f"{data})"
            )
    logger.info("ledger %s verified: %d problem(s)", path, len(problems))
    return LedgerCheck(
        ledger=str(path), count=head.count, head=head.hash, datasets=datasets, problems=problems
    )


def data_fingerprint(data: Path, label_column: str) -> str:
    """The fingerprint a deployed site's ledger keys ``data`` by (client/site.py's loader)."""
    dataset = load_dataset(f"csv:{data}", label_column=label_column)
    return dataset_fingerprint(dataset.features, dataset.labels)


def render_check(check: LedgerCheck, console: Console) -> None:
    """One line when intact; otherwise every problem, one per line."""
    if check.intact:
        console.print(
            f"ledger intact: {check.count} entries, head {check.head[:12]}…, "
            f"{check.datasets} dataset(s)",
            highlight=False,
            soft_wrap=True,
        )
        return
    for problem in check.problems:
        console.print(Text(problem, style="red"), soft_wrap=True)
