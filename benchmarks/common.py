"""Shared benchmark plumbing: command line, machine description, Markdown tables, JSON output."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: The shipped scenario files (simulations/*.toml) the benchmarks take their settings from.
SCENARIO_DIR = Path(__file__).resolve().parent.parent / "simulations"
#: Distributions whose versions every result records.
VERSIONED = ("torch", "opacus", "flwr", "numpy", "dp-accounting", "scikit-learn")


def parse_args(
    module: str,
    description: str,
    argv: Sequence[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The common options (``--quick``, ``--out``) plus the benchmark's own.

    The namespace also carries ``command``: the exact command line, for the results file.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument(
        "--quick", action="store_true", help="short smoke mode (seconds to minutes)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    if add_arguments is not None:
        add_arguments(parser)
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(args_list)
    args.command = shlex.join(["python", "-m", module, *args_list])
    return args


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    """Total memory in GiB from /proc/meminfo, None where there is none."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (os.getloadavg)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:  # not available on this platform
        return []


def versions() -> dict[str, str]:
    """Installed versions of the distributions that decide the results."""
    found: dict[str, str] = {}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine_info() -> dict[str, Any]:
    """Date, CPU, cores, memory, Python and library versions, and the current load average."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
        "load_average": load_average(),
    }


def describe_machine(info: dict[str, Any]) -> str:
    """One line for the top of a benchmark's output."""
    load = ", ".join(f"{value:g}" for value in info["load_average"]) or "n/a"
    libs = ", ".join(f"{name} {version}" for name, version in info["versions"].items())
    return (
        f"{info['date']} | {info['cpu_model']}, {info['cores']} cores "
        f"({info['usable_cores']} usable), {info['memory_gib']} GiB | Python {info['python']} | "
        f"{libs} | load average {load}"
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table (what RESULTS.md holds), columns padded to align."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            + " |"
        )

    rule = "| " + " | ".join("-" * width for width in widths) + " |"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a titled Markdown table."""
    print(f"\n{title}\n")
    print(markdown_table(headers, rows), flush=True)


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence."""
    return float(statistics.median(values))


def finite_or_none(value: Any) -> Any:
    """Recursively replace non-finite floats with None, so the JSON stays strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(item) for item in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as strict JSON (no NaN/Infinity), creating the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(finite_or_none(payload), indent=2, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")


def save_results(path: Path | None, payload: dict[str, Any]) -> None:
    """The benchmark's final results to ``path`` (``--out``), said on stdout; None: nothing."""
    if path is not None:
        write_json(path, payload)
        print(f"wrote {path}")
