"""What the run commands print: the end-of-run summary and the privacy-by-site table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


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
