"""The run's report.html: one self-contained page (inline CSS, plots as base64 PNG, no script).

Written at the end of every run (``fedvault simulate`` and ``fedvault run``) from what the
run directory already holds: rounds.jsonl, metrics.jsonl, summary.json, config.toml and
the plots, so it can be rebuilt for any run directory with ``write_report``. It holds no
data row: only the per-round aggregates, per-site metrics, privacy figures and settings.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedvault.common.report import (
    CONFIG_FILE,
    METRICS_FILE,
    PLOT_FILE,
    REPORT_FILE,
    ROUNDS_FILE,
    SITE_PLOT_FILE,
    SUMMARY_FILE,
    RunDirectory,
    read_jsonl,
    save_figure,
)

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; color: #1b1f24; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; font-size: 1.25em;
     border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; }
.sub { color: #57606a; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.6em; text-align: right; }
th { background: #f6f8fa; } td.l, th.l { text-align: left; }
.over { background: #ffd7d5; } .warn { color: #a40e26; } .ok { color: #1a7f37; }
img { max-width: 100%; border: 1px solid #d0d7de; margin: 0.4em 0; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #57606a; font-size: 0.9em; }
"""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _delta(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float) else _fmt(value)


def _table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], *, left: int = 1, classes: Any = None
) -> str:
    """An HTML table; the first ``left`` columns left-aligned; cells are pre-escaped strings."""
    head = "".join(
        f'<th class="{"l" if i < left else ""}">{html.escape(h)}</th>' for i, h in enumerate(header)
    )
    body = []
    for r, row in enumerate(rows):
        cells = []
        for i, cell in enumerate(row):
            css = ["l"] if i < left else []
            if classes is not None and classes(r, i):
                css.append(classes(r, i))
            cells.append(f'<td class="{" ".join(css)}">{cell}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(data: bytes | None, alt: str) -> str:
    if not data:
        return ""
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


# --- plots ------------------------------------------------------------------------------


def plot_sites(
    run_dir: RunDirectory, rounds: Sequence[Mapping[str, Any]], metrics: Sequence[Mapping[str, Any]]
) -> Path | None:
    """site_curves.png: accuracy and loss per site and overall, ε per site against its cap,
    and the overall classification metrics, per round. None when no round was recorded."""
    if not rounds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted({str(r["site"]) for r in metrics})
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(sites)}
    xs = [int(r["round"]) for r in rounds]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=100)
    (ax_acc, ax_loss), (ax_eps, ax_cls) = axes

    def series(site: str, key: str) -> tuple[list[int], list[float]]:
        rows = sorted((r for r in metrics if r["site"] == site), key=lambda r: r["round"])
        return [int(r["round"]) for r in rows], [
            math.nan if r.get(key) is None else float(r[key]) for r in rows
        ]

    for ax, key, label in ((ax_acc, "accuracy", "accuracy"), (ax_loss, "loss", "loss")):
        for site in sites:
            ax.plot(*series(site, key), "o-", ms=3, color=colors[site], label=site)
        overall = [math.nan if r.get(key) is None else float(r[key]) for r in rounds]
        ax.plot(xs, overall, "k--", lw=2, label="all sites")
        ax.set_title(f"{label} on each site's test split")
        ax.set_xlabel("round")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend(fontsize=8)
    for site in sites:
        trained = [r for r in metrics if r["site"] == site and r["round"] > 0]
        rx, ry = series(site, "epsilon")
        ax_eps.plot(
            rx[1:] if rx and rx[0] == 0 else rx,
            ry[1:] if rx and rx[0] == 0 else ry,
            "s-",
            ms=3,
            color=colors[site],
            label=site,
        )
        caps = [r["max_epsilon"] for r in trained if r.get("max_epsilon")]
        if caps:
            ax_eps.axhline(caps[-1], color=colors[site], ls=":", lw=1.5, label=f"{site} cap")
    capped = any(r.get("max_epsilon") for r in metrics)
    ax_eps.set_title(
        "ε spent per site (every run on its data)"
        + (" and its cap (dotted)" if capped else "; no site set a cap")
    )
    ax_eps.set_xlabel("round")
    ax_eps.set_ylim(bottom=0)
    ax_eps.legend(fontsize=8)
    for key, label in (
        ("accuracy", "accuracy"),
        ("balanced_accuracy", "balanced accuracy"),
        ("macro_f1", "macro F1"),
        ("roc_auc", "ROC AUC"),
    ):
        values = [math.nan if r.get(key) is None else float(r[key]) for r in rounds]
        if not all(math.isnan(v) for v in values):
            ax_cls.plot(xs, values, "o-", ms=3, label=label)
    ax_cls.set_title("classification metrics, all sites' test rows together")
    ax_cls.set_xlabel("round")
    ax_cls.set_ylim(0, 1)
    ax_cls.legend(fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, run_dir.file(SITE_PLOT_FILE))


# --- sections ---------------------------------------------------------------------------


def _overview(summary: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]) -> str:
    cls = (summary.get("classification") or {}).get("overall") or {}
    auc = cls.get("roc_auc")
    auc_text = _fmt(auc)
    if auc is not None and cls.get("roc_auc_error_bound") is not None:
        auc_text += f" (± {cls['roc_auc_error_bound']:.4f} binning)"
    central = summary.get("central_dp")
    items = [
        (
            "final accuracy",
            f"{_fmt(summary.get('final_accuracy'))} "
            f"(initial {_fmt(summary.get('initial_accuracy'))})",
        ),
        ("balanced accuracy", _fmt(cls.get("balanced_accuracy"))),
        ("macro F1", _fmt(cls.get("macro_f1"))),
        ("ROC AUC", auc_text),
        ("final loss", _fmt(summary.get("final_loss"), 4)),
        (
            "privacy spent",
            f"ε = {_fmt(summary.get('epsilon'))} (max over sites, every run on "
            f"their data), δ = {_delta(summary.get('delta'))}, accountant "
            f"{_fmt(summary.get('accountant'))}",
        ),
        ("target ε", _fmt(summary.get("target_epsilon"))),
        ("DP-SGD at the sites", _fmt(summary.get("dp"))),
        (
            "central DP",
            "off"
            if not central
            else f"ε = {_fmt(central.get('epsilon'))}, "
            f"σ = {_fmt(central.get('noise_multiplier'))}, "
            f"clipping {_fmt(central.get('clipping_norm'))}",
        ),
        ("rounds × sites", f"{_fmt(summary.get('rounds'))} × {_fmt(summary.get('sites'))}"),
    ]
    table = _table(["", "value"], ([html.escape(k), v] for k, v in items), left=2)
    note = (
        '<p class="note">Metrics are computed at each site on its own test split; the '
        "coordinator adds up the sites' confusion matrices (and, for ROC AUC, histograms of "
        "predicted scores), so no prediction of any row leaves a site.</p>"
    )
    return f"<h2>Result</h2>{table}{note}"


#: Column headers of :func:`_metric_cells`, in its order.
METRIC_HEADERS = ("accuracy", "balanced acc.", "macro F1", "ROC AUC", "loss")


def _metric_cells(row: Mapping[str, Any]) -> list[str]:
    """Accuracy, balanced accuracy, macro F1, ROC AUC and loss of a rounds or metrics row."""
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")
    return [*(_fmt(row.get(key)) for key in keys), _fmt(row.get("loss"), 4)]


def _round_table(rounds: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        [
            "initial" if r["round"] == 0 else _fmt(r["round"]),
            *_metric_cells(r),
            _fmt(r.get("epsilon")),
            _fmt(r.get("sites")),
            _fmt(r.get("round_seconds"), 1),
            _fmt(r.get("elapsed_seconds"), 1),
        ]
        for r in rounds
    ]
    header = [
        "round",
        *METRIC_HEADERS,
        "max ε",
        "sites evaluated",
        "round s",
        "total s",
    ]
    return "<h2>Metrics per round (all sites' test rows together)</h2>" + _table(header, rows)


def _site_table(metrics: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        [
            _fmt(r["site"]),
            _fmt(r["round"]),
            *_metric_cells(r),
            _fmt(r.get("test_examples")),
            _fmt(r.get("num_examples")),
            _fmt(r.get("train_seconds"), 2),
            _fmt(r.get("eval_seconds"), 2),
        ]
        for r in sorted(metrics, key=lambda r: (str(r["site"]), r["round"]))
    ]
    header = [
        "site",
        "round",
        *METRIC_HEADERS,
        "test rows",
        "train rows",
        "train s",
        "eval s",
    ]
    return "<h2>Metrics per site and round (each site's own test split)</h2>" + _table(
        header, rows, left=1
    )


def _confusion(matrix: Sequence[Sequence[int]], title: str) -> str:
    k = len(matrix)
    rows = [[f"true {i}", *(_fmt(v) for v in row)] for i, row in enumerate(matrix)]
    return f"<h3>{html.escape(title)}</h3>" + _table(
        ["", *(f"predicted {j}" for j in range(k))], rows
    )


def _confusion_section(summary: Mapping[str, Any]) -> str:
    cls = summary.get("classification")
    if not cls:
        return "<h2>Confusion matrix</h2><p>No round was evaluated.</p>"
    parts = [f"<h2>Confusion matrix of the final model (round {_fmt(cls['round'])})</h2>"]
    overall = cls.get("overall") or {}
    if overall.get("confusion"):
        parts.append(_confusion(overall["confusion"], "all sites' test rows together"))
    for site, metrics in sorted((cls.get("sites") or {}).items()):
        if metrics.get("confusion"):
            parts.append(_confusion(metrics["confusion"], site))
    return "".join(parts)


def _privacy_section(summary: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]]) -> str:
    privacy = summary.get("privacy") or {}
    sites: Mapping[str, Any] = privacy.get("sites") or {}
    by_site = [
        [
            _fmt(site),
            _fmt(info.get("run_epsilon")),
            _fmt(info.get("epsilon")),
            _fmt(info.get("max_epsilon")),
            _fmt(info.get("noise_multiplier")),
            _fmt(info.get("sample_rate"), 4),
            _fmt(info.get("steps")),
            _fmt(info.get("rounds_trained")),
            _fmt(", ".join(str(r) for r in info.get("refused_rounds", []))),
        ]
        for site, info in sorted(sites.items())
    ]
    header = [
        "site",
        "ε run",
        "ε total",
        "max ε (cap)",
        "σ",
        "q",
        "steps",
        "rounds trained",
        "refused rounds",
    ]
    parts = [
        "<h2>Privacy by site</h2>",
        f'<p class="note">{_fmt(privacy.get("level", ""))}; accountant '
        f"{_fmt(privacy.get('accountant'))}, δ = {_delta(privacy.get('delta'))}. "
        "“ε total” composes every run recorded in the site's ledger, “ε run” is this "
        "run's share; “max ε” is the site's own cap.</p>",
        _table(header, by_site) if by_site else "<p>No site trained with DP-SGD.</p>",
    ]
    trained = [r for r in metrics if r["round"] > 0]
    rounds = sorted({int(r["round"]) for r in trained})
    names = sorted({str(r["site"]) for r in trained})
    if rounds and names:
        eps = {(str(r["site"]), int(r["round"])): r for r in trained}
        caps = {
            s: next(
                (
                    r.get("max_epsilon")
                    for r in reversed(trained)
                    if r["site"] == s and r.get("max_epsilon")
                ),
                None,
            )
            for s in names
        }
        grid = [
            [
                _fmt(s),
                _fmt(caps[s]),
                *(_fmt(eps[s, n]["epsilon"]) if (s, n) in eps else "—" for n in rounds),
            ]
            for s in names
        ]

        def over(r: int, i: int) -> str | None:
            site, cap = names[r], caps[names[r]]
            if i < 2 or cap is None or (site, rounds[i - 2]) not in eps:
                return None
            return "over" if eps[site, rounds[i - 2]]["epsilon"] >= cap else None

        parts.append("<h3>ε per site per round against its cap</h3>")
        parts.append(_table(["site", "cap", *(f"round {n}" for n in rounds)], grid, classes=over))
    return "".join(parts)


def _incidents(summary: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]) -> str:
    rows: list[list[str]] = []
    for r in rounds:
        refused = set(r.get("refused_sites") or ())
        rejected: Mapping[str, str] = r.get("rejected_sites") or {}
        for site in sorted(refused):
            reason = (summary.get("refused_sites") or {}).get(site, "")
            rows.append([_fmt(r["round"]), _fmt(site), "refused", _fmt(reason)])
        for site, reason in sorted(rejected.items()):
            rows.append([_fmt(r["round"]), _fmt(site), "update rejected", _fmt(reason)])
        for site, reason in sorted((r.get("ledger_alerts") or {}).items()):
            rows.append([_fmt(r["round"]), _fmt(site), "LEDGER ALERT", _fmt(reason)])
        for site in r.get("failed_sites") or ():
            if site not in refused and site not in rejected:
                reason = (summary.get("failed_sites") or {}).get(site, "")
                rows.append([_fmt(r["round"]), _fmt(site), "failed", _fmt(reason)])
    parts = ["<h2>Failures, refusals and rejected updates</h2>"]
    if summary.get("ended_early"):
        parts.append(f'<p class="warn">The run ended early: {_fmt(summary["ended_early"])}</p>')
    if rows:
        parts.append(_table(["round", "site", "what", "reason"], rows, left=4))
    else:
        parts.append(
            '<p class="ok">None: every site answered every round and every update '
            "passed validation.</p>"
        )
    return "".join(parts)


def _versions(summary: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]]) -> str:
    versions: Mapping[str, Any] = summary.get("versions") or {}
    rows = [[_fmt(k), _fmt(v)] for k, v in sorted(versions.items())]
    rows += [
        ["started (UTC)", _fmt(summary.get("started_at"))],
        ["wall time in the ServerApp", f"{_fmt(summary.get('wall_seconds'), 1)} s"],
    ]
    for site in sorted({str(r["site"]) for r in metrics}):
        train = [
            r["train_seconds"]
            for r in metrics
            if r["site"] == site and r.get("train_seconds") is not None
        ]
        evals = [
            r["eval_seconds"]
            for r in metrics
            if r["site"] == site and r.get("eval_seconds") is not None
        ]
        rows.append(
            [
                f"{_fmt(site)}: training / evaluation",
                f"{_fmt(sum(train), 2)} s / {_fmt(sum(evals), 2)} s in {len(train)} / {len(evals)} "
                "rounds",
            ]
        )
    return "<h2>Versions and timings</h2>" + _table(["", "value"], rows, left=2)


def render_report(
    *,
    summary: Mapping[str, Any],
    rounds: Sequence[Mapping[str, Any]],
    metrics: Sequence[Mapping[str, Any]],
    config_text: str,
    plots: Mapping[str, bytes | None],
) -> str:
    """The whole page as a string; every value from the run files is HTML-escaped."""
    name = _fmt(summary.get("name", "run"))
    status = (
        '<span class="warn">ended early</span>'
        if summary.get("ended_early")
        else '<span class="ok">finished</span>'
    )
    sub = (
        f"{_fmt(summary.get('dataset'))}, model {_fmt(summary.get('model'))}, strategy "
        f"{_fmt(summary.get('strategy'))}, sites: {_fmt(', '.join(summary.get('site_names', [])))}"
        f" — {status}, started {_fmt(summary.get('started_at'))} UTC"
    )
    body = [
        f"<h1>fedvault run report: {name}</h1><p class='sub'>{sub}</p>",
        _overview(summary, rounds),
        "<h2>Per round</h2>",
        _img(plots.get(PLOT_FILE), "accuracy and max ε per round"),
        _img(plots.get(SITE_PLOT_FILE), "per-site accuracy, loss and ε per round"),
        _round_table(rounds),
        _site_table(metrics),
        _confusion_section(summary),
        _privacy_section(summary, metrics),
        _incidents(summary, rounds),
        f"<h2>Effective configuration</h2><pre>{html.escape(config_text)}</pre>",
        _versions(summary, metrics),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>fedvault report: {name}</title><style>{CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def write_report(run_dir: RunDirectory) -> Path:
    """Write site_curves.png and report.html from the run directory's files; their path."""
    summary_path = run_dir.file(SUMMARY_FILE)
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    rounds = read_jsonl(run_dir.file(ROUNDS_FILE))
    metrics = read_jsonl(run_dir.file(METRICS_FILE))
    plot_sites(run_dir, rounds, metrics)
    config = run_dir.file(CONFIG_FILE)
    plots = {
        name: run_dir.file(name).read_bytes() if run_dir.file(name).is_file() else None
        for name in (PLOT_FILE, SITE_PLOT_FILE)
    }
    run_dir.write_text(
        REPORT_FILE,
        render_report(
            summary=summary,
            rounds=rounds,
            metrics=metrics,
            config_text=config.read_text(encoding="utf-8") if config.is_file() else "",
            plots=plots,
        ),
    )
    return run_dir.file(REPORT_FILE)
