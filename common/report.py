"""The run directory: effective config, per-round metrics, summary, final model and plot.

Rows are appended and fsync'd as each round ends, and every other file is written
atomically (temporary file, then rename), so a crash loses at most the round in flight.
Nothing here ever writes raw data rows; the model file holds the global model only.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedvault.common.metrics import classification_metrics, combine, statistics_from_metrics

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"  # one row per site per round
ROUNDS_FILE = "rounds.jsonl"  # one aggregated row per round (drives the progress display)
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.pt"
PLOT_FILE = "accuracy_epsilon.png"
SITE_PLOT_FILE = "site_curves.png"  # per-site accuracy, loss, ε against its cap
REPORT_FILE = "report.html"  # self-contained report (common/report_html.py)
#: Run config key naming who draws the plots and report.html once summary.json is written:
#: the ServerApp (the default: `fedvault run`, `flwr run .`) or, set to REPORT_BY_COMMAND, the
#: command that follows the run (`fedvault simulate` draws them while Flower winds down).
REPORT_WRITER = "report-writer"
REPORT_BY_COMMAND = "command"
ERROR_FILE = "error.json"
FLOWER_LOG = "flower.log"
SITE_POLICY_FILE = "simulation.json"  # simulated sites' own settings, for --resume
#: The coordinator's record of each simulated site's ledger head, in the ledger folder.
LEDGER_RECORD_FILE = "coordinator-ledger-record.json"
LEDGERS_DIR = "ledgers"  # simulated sites' privacy ledgers, unless --ledger-dir says otherwise

#: Columns every metrics.jsonl row has (issue contract; more may follow).
METRIC_COLUMNS: tuple[str, ...] = (
    "round", "site", "accuracy", "loss", "num_examples", "epsilon", "delta",
    "noise_multiplier", "sample_rate", "steps",
)  # fmt: skip


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig: Any, out: Path) -> Path:
    """Write a matplotlib figure as PNG atomically (a temporary file, then rename) and close it."""
    import matplotlib.pyplot as plt

    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete rows of a JSON-lines file (a torn last line from a crash is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunDirectory:
    """One run's output folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_text(self, name: str, text: str) -> None:
        atomic_write_bytes(self.file(name), text.encode("utf-8"))

    def write_json(self, name: str, obj: Mapping[str, Any]) -> None:
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def append_rows(self, name: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append JSON rows and fsync, so a finished round survives a crash."""
        lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        path = self.file(name)
        if path.is_file() and path.stat().st_size > 0:
            with path.open("rb") as existing:
                existing.seek(-1, os.SEEK_END)
                if existing.read(1) != b"\n":  # a torn last line (crash mid-write)
                    lines = "\n" + lines
        with path.open("a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())

    def save_model(self, state_dict: Mapping[str, Any]) -> None:
        """Save the global model's state_dict atomically (torch format)."""
        import io

        import torch

        buffer = io.BytesIO()
        torch.save(dict(state_dict), buffer)
        atomic_write_bytes(self.file(MODEL_FILE), buffer.getvalue())

    def plot(self, rounds: Sequence[Mapping[str, Any]]) -> Path:
        """PNG of global accuracy and max epsilon per round."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xs = [int(r["round"]) for r in rounds]
        fig, ax_acc = plt.subplots(figsize=(7, 4), dpi=110)
        accuracy = [math.nan if r["accuracy"] is None else r["accuracy"] for r in rounds]
        ax_acc.plot(xs, accuracy, "o-", color="tab:blue", label="accuracy")
        ax_acc.set_xlabel("round")
        ax_acc.set_ylabel("accuracy (sites' test splits)", color="tab:blue")
        ax_acc.set_ylim(0, 1)
        ax_eps = ax_acc.twinx()
        ax_eps.plot(xs, [r["epsilon"] for r in rounds], "s--", color="tab:red", label="max ε")
        ax_eps.set_ylabel("ε spent (max over sites)", color="tab:red")
        ax_eps.set_ylim(bottom=0)
        ax_acc.set_xticks(xs)
        ax_acc.grid(alpha=0.3)
        ax_acc.set_title("fedvault: accuracy and privacy spent per round")
        fig.tight_layout()
        return save_figure(fig, self.file(PLOT_FILE))


#: Classification metrics of rounds.jsonl and metrics.jsonl rows (common/metrics.py);
#: None where a site sent no (or malformed) counts, ``roc_auc`` None unless binary.
CLASSIFICATION_COLUMNS: tuple[str, ...] = (
    "balanced_accuracy", "macro_f1", "roc_auc", "roc_auc_error_bound", "confusion",
)  # fmt: skip


def _site_statistics(evals: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Each evaluated site's well-formed counts (common/metrics.SiteStatistics)."""
    out = {}
    for site, e in sorted(evals.items()):
        stats = statistics_from_metrics(e, test_rows=int(e.get("num-examples", 0)))
        if stats is not None:
            out[site] = stats
    return out


def classification_row(evals: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The accuracy and CLASSIFICATION_COLUMNS of all sites' test rows together, from the sum
    of their counts, and the sites whose counts went in (``classification_sites``)."""
    stats = _site_statistics(evals)
    try:
        total = combine(stats.values())
    except ValueError:  # sites disagree on the classes: no aggregate is meaningful
        total = None
    metrics = classification_metrics(total) if total is not None else {}
    row = {key: metrics.get(key) for key in ("accuracy", *CLASSIFICATION_COLUMNS)}
    row["classification_sites"] = sorted(stats) if total is not None else []
    return row


def site_rows(
    server_round: int,
    train: Mapping[str, Mapping[str, Any]],
    evals: Mapping[str, Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """One metrics.jsonl row per site that was evaluated in ``server_round``.

    ``num_examples`` is the site's training rows, ``test_examples`` its test rows; epsilon,
    sigma, q and ``steps`` (cumulative DP-SGD steps) come from its training reply — zero in
    round 0, which evaluates the initial model before any training. ``train_seconds`` and
    ``eval_seconds`` are the site's own time in local training and in evaluation. The
    CLASSIFICATION_COLUMNS are the site's own, from its own counts.
    """
    rows = []
    stats = _site_statistics(evals)
    for site in sorted(set(evals) | set(train)):
        t, e = train.get(site, {}), evals.get(site, {})
        own = classification_metrics(stats[site]) if site in stats else {}
        rows.append(
            {
                "round": server_round,
                "site": site,
                "accuracy": e.get("accuracy"),
                "loss": e.get("loss"),
                "num_examples": int(t.get("num-examples", 0)),
                "test_examples": int(e.get("num-examples", 0)),
                "epsilon": t.get("epsilon", 0.0),
                "delta": t.get("delta", 0.0),
                "noise_multiplier": t.get("noise-multiplier", 0.0),
                "sample_rate": t.get("sample-rate", 0.0),
                "steps": int(t.get("steps", 0)),
                "round_steps": int(t.get("round-steps", 0)),
                "run_epsilon": t.get("run-epsilon", 0.0),
                "max_epsilon": t.get("max-epsilon") or None,
                "train_seconds": t.get("train-seconds"),
                "eval_seconds": e.get("eval-seconds"),
                **{key: own.get(key) for key in CLASSIFICATION_COLUMNS},
            }
        )
    return rows


def classification_section(
    rounds: Sequence[Mapping[str, Any]], metrics: Sequence[Mapping[str, Any]]
) -> dict[str, Any] | None:
    """summary.json's ``classification``: the last evaluated round's metrics, overall (from
    all sites' counts together) and per site (each from its own); None before any round."""
    evaluated = [r for r in rounds if r.get("confusion") is not None]
    if not evaluated:
        return None
    last = evaluated[-1]
    columns = ("accuracy", *CLASSIFICATION_COLUMNS)
    return {
        "round": last["round"],
        "overall": {key: last.get(key) for key in (*columns, "classification_sites")},
        "sites": {
            r["site"]: {key: r.get(key) for key in columns}
            for r in metrics
            if r["round"] == last["round"] and r.get("confusion") is not None
        },
    }


def privacy_section(
    metrics: Sequence[Mapping[str, Any]],
    refusals: Mapping[int, Mapping[str, str]],
    *,
    enabled: bool,
    accountant: str,
    delta: float,
) -> dict[str, Any]:
    """The run report's privacy section: every site's DP-SGD, round by round, and refusals.

    ``epsilon`` is the composition of the site's data's whole ledger history (every run),
    ``run_epsilon`` this run's share alone; both at ``delta`` with ``accountant``.
    """
    per_round = [
        {
            "round": r["round"],
            "site": r["site"],
            "epsilon": r["epsilon"],
            "run_epsilon": r.get("run_epsilon", 0.0),
            "noise_multiplier": r["noise_multiplier"],
            "sample_rate": r["sample_rate"],
            "round_steps": r.get("round_steps", 0),
            "steps": r["steps"],
            "delta": r["delta"],
            "accountant": accountant,
        }
        for r in metrics
        if r["round"] > 0 and r.get("round_steps", 0) > 0
    ]
    sites: dict[str, dict[str, Any]] = {}
    for row in per_round:
        sites[row["site"]] = {
            "epsilon": row["epsilon"],
            "run_epsilon": row["run_epsilon"],
            "noise_multiplier": row["noise_multiplier"],
            "sample_rate": row["sample_rate"],
            "steps": row["steps"],
            "rounds_trained": sites.get(row["site"], {}).get("rounds_trained", 0) + 1,
            "refused_rounds": [],
        }
    for r in metrics:
        if r.get("max_epsilon") and r["site"] in sites:
            sites[r["site"]]["max_epsilon"] = r["max_epsilon"]
    refused: list[dict[str, Any]] = [
        {"round": rnd, "site": site, "reason": reason}
        for rnd, per_site in sorted(refusals.items())
        for site, reason in sorted(per_site.items())
    ]
    for item in refused:
        entry = sites.setdefault(
            item["site"], {"epsilon": None, "rounds_trained": 0, "refused_rounds": []}
        )
        entry["refused_rounds"].append(item["round"])
    return {
        "enabled": enabled,
        "level": "sample-level DP-SGD at each site",
        "accountant": accountant,
        "delta": delta if enabled else 0.0,
        "sites": sites,
        "per_round": per_round,
        "refusals": refused,
    }


def round_row(
    server_round: int,
    rows: Sequence[Mapping[str, Any]],
    *,
    round_seconds: float,
    elapsed_seconds: float,
    failed_sites: Sequence[str] = (),
    refused_sites: Sequence[str] = (),
    rejected_sites: Mapping[str, str] | None = None,
    ledger_alerts: Mapping[str, str] | None = None,
    evals: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Aggregate one round: test-size-weighted accuracy and loss, max epsilon over sites,
    and, from ``evals`` (the sites' evaluation metrics), ``classification_row``.

    ``rejected_sites`` maps each site whose update failed validation to the reason;
    ``ledger_alerts`` each site whose privacy ledger forgot or rewrote its history (or that
    declared a new dataset, or refused because its own ledger is broken) to what happened.
    """
    evaluated = [r for r in rows if r["accuracy"] is not None and r["test_examples"] > 0]
    total = sum(r["test_examples"] for r in evaluated)
    accuracy = sum(r["accuracy"] * r["test_examples"] for r in evaluated) / total if total else None
    loss = sum(r["loss"] * r["test_examples"] for r in evaluated) / total if total else None
    return {
        # the classification metrics from counts; accuracy stays the test-size-weighted mean
        # of the sites' own (equal to the counts' when every site sent counts)
        **classification_row(evals or {}),
        "round": server_round,
        "accuracy": accuracy,
        "loss": loss,
        "epsilon": max((float(r["epsilon"]) for r in rows), default=0.0),
        "sites": len(evaluated),
        "failed_sites": list(failed_sites),
        "refused_sites": list(refused_sites),
        "rejected_sites": dict(sorted((rejected_sites or {}).items())),
        "ledger_alerts": dict(sorted((ledger_alerts or {}).items())),
        "round_seconds": round(round_seconds, 3),
        "elapsed_seconds": round(elapsed_seconds, 3),
    }


def _short(reason: str, width: int = 48) -> str:
    return reason if len(reason) <= width else reason[: width - 1].rstrip() + "…"


def format_progress(row: Mapping[str, Any], total_rounds: int) -> str:
    """The one-line progress report of a round, as the terminal shows it."""
    acc = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
    loss = "n/a" if row["loss"] is None else f"{row['loss']:.4f}"
    label = "initial model" if row["round"] == 0 else f"round {row['round']}/{total_rounds}"
    line = (
        f"{label:<13} accuracy {acc}  loss {loss}  max ε {row['epsilon']:.3f}  "
        f"{row['round_seconds']:.1f}s (total {row['elapsed_seconds']:.1f}s)"
    )
    refused = set(row.get("refused_sites", ()))
    if refused:
        line += f"  refused: {', '.join(sorted(refused))}"
    alerts: Mapping[str, str] = row.get("ledger_alerts") or {}
    if alerts:
        line += "  LEDGER ALERT: " + ", ".join(
            f"{site} ({_short(reason, 72)})" for site, reason in sorted(alerts.items())
        )
    rejected: Mapping[str, str] = row.get("rejected_sites") or {}
    if rejected:
        line += "  rejected: " + ", ".join(
            f"{site} ({_short(reason)})" for site, reason in sorted(rejected.items())
        )
    failed = [s for s in row.get("failed_sites", ()) if s not in refused and s not in rejected]
    if failed:
        line += f"  failed: {', '.join(failed)}"
    return line
