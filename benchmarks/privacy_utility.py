"""How much accuracy privacy costs: real fedvault simulations at several ε against no DP.

Every run is a whole fedvault simulation (``fedvault.simulations.runner.simulate``: a private
SuperLink in simulation mode, the Flower Simulation Engine, fedvault's ServerApp and
ClientApp, Opacus DP-SGD at each site), built from a shipped scenario plus the same config
layer the ``fedvault simulate`` flags make (``fedvault.cli.options.flags_layer``). Nothing here
trains a model itself.

Full mode:

- Fashion-MNIST (``simulations/fashion_mnist.toml``: 5 sites, the tanh CNN), partitions
  iid and dirichlet(α = 0.5), target ε ∈ {1, 3, 8} at δ = 1e-5 and non-private: once as
  ``--no-dp`` runs it (the scenario's learning rate, set for clipped DP-SGD steps and too
  large for raw gradients) and once at a plain-SGD rate (0.1); reported beside published
  centralized DP-SGD results at ε = 3. ``--rounds`` and ``--set`` change the scenario's
  training settings, and are recorded in the results.
- Breast cancer, 3 hospitals (``simulations/hospitals.toml``): ε = 1 against non-private
  over several seeds, beside FLamby's heart-disease finding that ε = 1 costs about one
  accuracy point.

``--quick`` runs the hospitals scenario only (2 rounds, one seed): no Fashion-MNIST needed.

Accuracy is fedvault's federated evaluation: each site's own held-out test rows
(``data.test-fraction`` = 20 % of its partition), weighted by their number. For
Fashion-MNIST the 70,000 images (train + t10k files) are pooled before they are split into
sites, so training uses 56,000 images and the test rows are 14,000 drawn from the pool, not
the official 10,000-image test set the published numbers use. "Best round" is the highest
per-round accuracy on those same test rows (an optimistic, test-selected figure); "final"
is the last round's and the one to quote.

Anchors: Tramèr & Boneh, "Differentially Private Learning Needs Better Features (or Much
More Data)", ICLR 2021; Papernot et al., "Tempered Sigmoid Activations for Deep Learning
with Differential Privacy", AAAI 2021; Ogier du Terrail et al., "FLamby: Datasets and
Benchmarks for Cross-Silo Federated Learning in Realistic Healthcare Settings", NeurIPS
2022. DP-SGD: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    SCENARIO_DIR,
    describe_machine,
    load_average,
    machine_info,
    parse_args,
    print_table,
    save_results,
    write_json,
)
from fedvault.cli.options import flags_layer
from fedvault.common.config import FedvaultConfig, build_config, merge, read_toml
from fedvault.common.data import DEFAULT_FASHION_MNIST_DIR
from fedvault.common.report import ROUNDS_FILE, read_jsonl

MODULE = "benchmarks.privacy_utility"
DELTA = 1e-5
FASHION_EPSILONS: tuple[float, ...] = (1.0, 3.0, 8.0)
#: (partition, Dirichlet α or None).
FASHION_PARTITIONS: tuple[tuple[str, float | None], ...] = (("iid", None), ("dirichlet", 0.5))
HOSPITAL_EPSILON = 1.0
HOSPITAL_SEEDS_FULL: tuple[int, ...] = (0, 1, 2)
QUICK_HOSPITAL_ROUNDS = 2
#: The issue's goal: federated Fashion-MNIST accuracy at ε = 3 at least this.
GOAL_ACCURACY = 0.86
GOAL_EPSILON = 3.0
#: Published centralized DP-SGD results on Fashion-MNIST at ε = 3 (δ = 1e-5).
ANCHORS: tuple[tuple[str, float, float], ...] = (
    ("Tramèr & Boneh 2021, end-to-end CNN (centralized)", 3.0, 0.860),
    ("Tramèr & Boneh 2021, ScatterNet + CNN (centralized)", 3.0, 0.897),
    ("Papernot et al. 2021, tempered-sigmoid CNN (centralized)", 3.0, 0.861),
)
FLAMBY_ANCHOR = "FLamby heart-disease (Ogier du Terrail et al. 2022): ε = 1 costs ≈ 1 point"
FASHION_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
#: Learning rates of the non-private Fashion-MNIST runs: the scenario's (None: exactly what
#: ``--no-dp`` runs; it is set for clipped DP-SGD steps) and 0.1, a common plain-SGD rate for
#: small CNNs, chosen before any run, not tuned.
BASELINE_LEARNING_RATES: tuple[float | None, ...] = (None, 0.1)
INSTALL_COMMAND = ("apt-get", "install", "-y", "dataset-fashion-mnist")


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One simulation: a scenario, its partition, a target ε (None: no DP) and a seed."""

    study: str
    scenario: str
    partition: str
    alpha: float | None
    epsilon: float | None
    seed: int | None
    rounds: int | None
    overrides: dict[str, Any]
    tag: str = ""

    @property
    def label(self) -> str:
        part = self.partition if self.alpha is None else f"{self.partition}(α={self.alpha:g})"
        privacy = "non-private" if self.epsilon is None else f"ε={self.epsilon:g}"
        seed = "" if self.seed is None else f" seed {self.seed}"
        tag = f" {self.tag}" if self.tag else ""
        return f"{self.study} {part} {privacy}{tag}{seed}"

    def config(self) -> FedvaultConfig:
        """The scenario file ⊕ the flags `fedvault simulate` would get ⊕ any overrides."""
        flags = flags_layer(
            sites=None,
            rounds=self.rounds,
            dataset=None,
            label_column=None,
            partition=self.partition,
            alpha=self.alpha,
            epsilon=self.epsilon,
            noise_multiplier=None,
            no_dp=self.epsilon is None,
            delta=DELTA,
            seed=self.seed,
            strategy=None,
            model=None,
            central_dp=None,
            central_noise_multiplier=None,
            central_clipping_norm=None,
        )
        return build_config(read_toml(SCENARIO_DIR / self.scenario), merge(flags, self.overrides))


def fashion_settings(
    *,
    epsilons: Sequence[float],
    partitions: Sequence[tuple[str, float | None]],
    rounds: int | None,
    overrides: dict[str, Any],
    baseline_learning_rates: Sequence[float | None],
) -> list[Setting]:
    """Fashion-MNIST: each partition at each target ε and without DP.

    A non-private run is made at each of ``baseline_learning_rates`` (None: the scenario's,
    exactly what ``--no-dp`` runs). The scenario's rate is tuned for clipped DP-SGD steps;
    without clipping it can be far too large, so a non-private rate is run beside it. The
    goal's ε and the non-private runs come first, so a cut-short run still answers the main
    question.
    """
    privacy: list[tuple[float | None, float | None]] = [
        *((epsilon, None) for epsilon in epsilons),
        *((None, rate) for rate in baseline_learning_rates),
    ]
    first = [p for p in privacy if p[0] is None or p[0] == GOAL_EPSILON]
    rest = [p for p in privacy if p not in first]
    return [
        Setting(
            study="fashion-mnist",
            scenario="fashion_mnist.toml",
            partition=partition,
            alpha=alpha,
            epsilon=epsilon,
            seed=None,
            rounds=rounds,
            overrides=overrides
            if rate is None
            else merge(overrides, {"training": {"learning-rate": rate}}),
            tag="" if rate is None else f"lr={rate:g}",
        )
        for group in (first, rest)
        for partition, alpha in partitions
        for epsilon, rate in group
    ]


def hospital_settings(*, seeds: Sequence[int], rounds: int | None) -> list[Setting]:
    """Breast cancer, 3 hospitals: ε = 1 and non-private, for each seed (interleaved)."""
    return [
        Setting(
            study="hospitals",
            scenario="hospitals.toml",
            partition="iid",
            alpha=None,
            epsilon=epsilon,
            seed=seed,
            rounds=rounds,
            overrides={},
        )
        for seed in seeds
        for epsilon in (HOSPITAL_EPSILON, None)
    ]


def missing_fashion_files(folder: Path) -> list[str]:
    """The Fashion-MNIST IDX files (plain or .gz) absent from ``folder``."""
    return [
        stem
        for stem in FASHION_FILES
        if not (folder / f"{stem}.gz").is_file() and not (folder / stem).is_file()
    ]


def ensure_fashion_mnist(folder: Path, *, install: bool) -> str | None:
    """None when the data are there (installing Debian's package first if asked), else why not.

    The only source is the Debian package ``dataset-fashion-mnist``; nothing is downloaded
    from anywhere else.
    """
    missing = missing_fashion_files(folder)
    if not missing:
        return None
    command = shlex.join(INSTALL_COMMAND)
    if install and folder == DEFAULT_FASHION_MNIST_DIR:
        as_root = os.geteuid() == 0 if hasattr(os, "geteuid") else False
        full = list(INSTALL_COMMAND) if as_root else ["sudo", *INSTALL_COMMAND]
        print(f"installing Fashion-MNIST: {shlex.join(full)}", flush=True)
        done = subprocess.run(full, check=False)
        if done.returncode == 0 and not missing_fashion_files(folder):
            return None
        return f"`{shlex.join(full)}` failed (exit code {done.returncode})"
    return (
        f"Fashion-MNIST files missing in {folder}: {', '.join(missing)}. Install them with "
        f"`{command}` (as root), or run with --install-data, or benchmarks/setup.sh"
    )


def run_one(setting: Setting, runs_dir: Path, index: int) -> dict[str, Any]:
    """Simulate ``setting`` through the real Flower Simulation Engine; its result record."""
    from fedvault.simulations.runner import simulate  # imports Flower

    cfg = setting.config()
    run_path = runs_dir / f"{index:02d}-{re.sub(r'[^A-Za-z0-9.]+', '-', setting.label)}"
    started = time.perf_counter()
    summary = simulate(cfg, run_path, echo=lambda line: print(f"    {line}", flush=True))
    wall = time.perf_counter() - started
    rounds = [r for r in read_jsonl(run_path / ROUNDS_FILE) if r["round"] >= 1]
    scored = [r for r in rounds if r["accuracy"] is not None]
    best = max(scored, key=lambda r: r["accuracy"]) if scored else None
    sigmas = sorted(set((summary.get("noise_multiplier") or {}).values())) if summary["dp"] else []
    return {
        "study": setting.study,
        "label": setting.label,
        "scenario": setting.scenario,
        "partition": setting.partition,
        "alpha": setting.alpha,
        "seed": cfg.seed,
        "dp": bool(summary["dp"]),
        "target_epsilon": setting.epsilon,
        "epsilon": summary["epsilon"] if summary["dp"] else None,
        "delta": cfg.privacy.target_delta if summary["dp"] else None,
        "noise_multiplier": sigmas[-1] if sigmas else None,
        "accountant": cfg.privacy.accountant if summary["dp"] else None,
        "sites": cfg.federation.sites,
        "rounds": cfg.federation.rounds,
        "model": summary.get("model"),
        "batch_size": cfg.training.batch_size,
        "learning_rate": cfg.training.learning_rate,
        "momentum": cfg.training.momentum,
        "local_epochs": cfg.training.local_epochs,
        "max_grad_norm": cfg.privacy.max_grad_norm,
        "overrides": setting.overrides,
        "initial_accuracy": summary.get("initial_accuracy"),
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": best["accuracy"] if best else None,
        "best_round": best["round"] if best else None,
        "accuracy_by_round": [r["accuracy"] for r in rounds],
        "failed_sites": summary.get("failed_sites") or {},
        "ended_early": summary.get("ended_early"),
        "wall_s": wall,
        "server_wall_s": summary["wall_seconds"],
        "load_average": load_average(),
    }


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def _eps(record: dict[str, Any]) -> str:
    if not record["dp"]:
        return "none (no DP)"
    return f"{record['epsilon']:.2f} (target {record['target_epsilon']:g})"


def _points(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:+.1f}"


def _fashion_order(record: dict[str, Any]) -> tuple[Any, ...]:
    """iid first, rounds, then the private runs by ε, then the non-private ones by rate."""
    return (
        record["partition"] != "iid",
        record["partition"],
        record["alpha"] or 0.0,
        record["rounds"],
        not record["dp"],
        record["target_epsilon"] or 0.0,
        record["learning_rate"],
    )


def fashion_table(records: list[dict[str, Any]]) -> None:
    """One row per Fashion-MNIST run: accuracy, its cost against no DP, ε, σ, time.

    The cost is against the best non-private run of the same partition and rounds (the
    larger baseline makes the cost of privacy look larger, never smaller).
    """
    baselines: dict[tuple[Any, ...], float] = {}
    for r in records:
        key = (r["partition"], r["alpha"], r["rounds"])
        if not r["dp"] and r["final_accuracy"] is not None:
            baselines[key] = max(baselines.get(key, 0.0), r["final_accuracy"])
    rows = []
    for r in sorted(records, key=_fashion_order):
        base = baselines.get((r["partition"], r["alpha"], r["rounds"]))
        cost = None if base is None or not r["dp"] else r["final_accuracy"] - base
        partition = r["partition"] + ("" if r["alpha"] is None else f" α={r['alpha']:g}")
        rows.append(
            [
                partition,
                _eps(r),
                "—" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}",
                f"{r['learning_rate']:g}",
                r["rounds"],
                _pct(r["final_accuracy"]),
                f"{_pct(r['best_accuracy'])} (r{r['best_round']})",
                _points(cost),
                f"{r['wall_s']:.0f}",
            ]
        )
    print_table(
        f"Fashion-MNIST, {records[0]['sites']} sites, CNN, δ = {DELTA:g}: federated test "
        "accuracy (sites' held-out rows)",
        [
            "partition",
            "ε spent (target)",
            "σ",
            "lr",
            "rounds",
            "final acc",
            "best-round acc",
            "Δ vs best no-DP (points)",
            "wall s",
        ],
        rows,
    )


def goal_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goal, per partition: final accuracy at ε = 3 at least GOAL_ACCURACY."""
    return [
        {
            "partition": r["partition"],
            "alpha": r["alpha"],
            "final_accuracy": r["final_accuracy"],
            "epsilon": r["epsilon"],
            "met": r["final_accuracy"] is not None and r["final_accuracy"] >= GOAL_ACCURACY,
        }
        for r in records
        if r["dp"] and r["target_epsilon"] == GOAL_EPSILON
    ]


def anchors_table(records: list[dict[str, Any]], goals: list[dict[str, Any]]) -> None:
    """Published centralized results beside fedvault's federated ones at ε = 3."""
    rows: list[list[object]] = [
        [name, f"{eps:g}", _pct(acc), "published, official test set"] for name, eps, acc in ANCHORS
    ]
    for goal in goals:
        partition = goal["partition"] + ("" if goal["alpha"] is None else f" α={goal['alpha']:g}")
        rows.append(
            [
                f"fedvault, {records[0]['sites']} sites, {partition} (federated)",
                f"{goal['epsilon']:.2f}",
                _pct(goal["final_accuracy"]),
                f"goal ≥ {100 * GOAL_ACCURACY:.0f} %: {'met' if goal['met'] else 'not met'}",
            ]
        )
    print_table(
        f"Fashion-MNIST at ε ≈ {GOAL_EPSILON:g}: fedvault beside published centralized DP-SGD",
        ["model / setting", "ε", "accuracy", "note"],
        rows,
    )


def hospital_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed accuracies with and without DP, their means and the mean cost in points."""
    by_seed: dict[int, dict[str, float]] = {}
    for r in records:
        by_seed.setdefault(r["seed"], {})["dp" if r["dp"] else "no_dp"] = r["final_accuracy"]
    paired = {s: v for s, v in by_seed.items() if {"dp", "no_dp"} <= v.keys()}
    dp = [v["dp"] for v in paired.values()]
    no_dp = [v["no_dp"] for v in paired.values()]
    costs = [v["dp"] - v["no_dp"] for v in paired.values()]

    def spread(values: list[float]) -> float | None:
        return statistics.stdev(values) if len(values) > 1 else None

    return {
        "seeds": sorted(paired),
        "dp_mean": statistics.fmean(dp) if dp else None,
        "dp_sd": spread(dp),
        "no_dp_mean": statistics.fmean(no_dp) if no_dp else None,
        "no_dp_sd": spread(no_dp),
        "cost_mean": statistics.fmean(costs) if costs else None,
        "cost_sd": spread(costs),
        "anchor": FLAMBY_ANCHOR,
    }


def hospitals_table(records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Per run, then the mean over seeds, beside FLamby's anchor."""
    rows: list[list[object]] = [
        [
            r["seed"],
            _eps(r),
            "—" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}",
            r["rounds"],
            _pct(r["final_accuracy"]),
            f"{_pct(r['best_accuracy'])} (r{r['best_round']})",
            f"{r['wall_s']:.0f}",
        ]
        for r in records
    ]
    print_table(
        f"Breast cancer, {records[0]['sites']} hospitals, logistic regression, δ = {DELTA:g}",
        ["seed", "ε spent (target)", "σ", "rounds", "final acc", "best-round acc", "wall s"],
        rows,
    )

    def mean_sd(mean: float | None, sd: float | None, *, points: bool = False) -> str:
        if mean is None:
            return "—"
        text = _points(mean) if points else _pct(mean)
        return text + ("" if sd is None else f" ± {100 * sd:.1f}")

    print_table(
        f"Cost of ε = {HOSPITAL_EPSILON:g} over seeds {summary['seeds']} (mean ± sd)",
        ["non-private acc", f"ε = {HOSPITAL_EPSILON:g} acc", "Δ (points)", "anchor"],
        [
            [
                mean_sd(summary["no_dp_mean"], summary["no_dp_sd"]),
                mean_sd(summary["dp_mean"], summary["dp_sd"]),
                mean_sd(summary["cost_mean"], summary["cost_sd"], points=True),
                FLAMBY_ANCHOR,
            ]
        ],
    )


def print_results(result: dict[str, Any]) -> None:
    """All tables of a results payload (this run's, or one read back with --tables-from)."""
    records = result["runs"]
    fashion_records = [r for r in records if r["study"] == "fashion-mnist"]
    hospital_records = [r for r in records if r["study"] == "hospitals"]
    if fashion_records:
        fashion_table(fashion_records)
        goals = goal_rows(fashion_records)
        if goals:
            anchors_table(fashion_records, goals)
    if hospital_records:
        hospitals_table(hospital_records, hospital_summary(hospital_records))


def merge_results(paths: Sequence[Path]) -> dict[str, Any]:
    """One payload from results files (``--tables-from A B``): their runs, in order."""
    parts = [json.loads(path.read_text(encoding="utf-8")) for path in paths]

    def listed(part: dict[str, Any], key: str) -> list[Any]:  # a merged file holds lists
        value = part[key]
        return list(value) if isinstance(value, list) else [value]

    for path, part in zip(paths, parts, strict=True):
        state = "complete" if part.get("complete") else "partial"
        print(f"{path}: {len(part['runs'])} runs ({state})")
        for command, machine in zip(listed(part, "command"), listed(part, "machine"), strict=True):
            print(f"  {command}\n    {describe_machine(machine)}")
    if len(parts) == 1:
        return dict(parts[0])
    runs = [run for part in parts for run in part["runs"]]
    fashion = [r for r in runs if r["study"] == "fashion-mnist"]
    hospitals = [r for r in runs if r["study"] == "hospitals"]
    return {
        **parts[0],
        "command": [c for part in parts for c in listed(part, "command")],
        "complete": all(part.get("complete") for part in parts),
        "machine": [m for part in parts for m in listed(part, "machine")],
        "settings": [s for part in parts for s in listed(part, "settings")],
        "runs": runs,
        "fashion_goal": goal_rows(fashion),
        "hospitals": hospital_summary(hospitals) if hospitals else None,
        "seconds": sum(part["seconds"] for part in parts),
        "load_average_after": parts[-1]["load_average_after"],
        "merged_from": [str(path) for path in paths],
    }


def parse_override(text: str) -> dict[str, Any]:
    """``section.key=VALUE`` (VALUE in TOML syntax) as a config layer."""
    key, sep, value = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not section or not name:
        raise argparse.ArgumentTypeError(
            f"--set needs SECTION.KEY=VALUE, e.g. training.learning-rate=4.0, got {text!r}"
        )
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError as err:
        raise argparse.ArgumentTypeError(f"--set {key}: {value!r} is not a TOML value") from err
    return {section: {name: parsed}}


def _partition(text: str) -> tuple[str, float | None]:
    name, _, alpha = text.partition(":")
    if name not in ("iid", "dirichlet"):
        raise argparse.ArgumentTypeError(f"partition must be iid or dirichlet[:ALPHA], got {text}")
    if name == "iid":
        return name, None
    return name, float(alpha) if alpha else 0.5


def _rate(text: str) -> float | None:
    return None if text == "scenario" else float(text)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--install-data",
        action="store_true",
        help=f"install Fashion-MNIST first if missing (`{shlex.join(INSTALL_COMMAND)}`)",
    )
    parser.add_argument(
        "--epsilons",
        type=float,
        nargs="*",
        default=list(FASHION_EPSILONS),
        help="Fashion-MNIST target ε values",
    )
    parser.add_argument(
        "--partitions",
        type=_partition,
        nargs="+",
        default=list(FASHION_PARTITIONS),
        help="Fashion-MNIST partitions: iid, dirichlet[:ALPHA] (default: iid dirichlet:0.5)",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the non-private Fashion-MNIST runs"
    )
    parser.add_argument(
        "--baseline-learning-rates",
        type=_rate,
        nargs="+",
        default=list(BASELINE_LEARNING_RATES),
        metavar="LR",
        help="learning rates of the non-private Fashion-MNIST runs; 'scenario' = the "
        "scenario's (what --no-dp runs). Default: scenario "
        + " ".join(f"{r:g}" for r in BASELINE_LEARNING_RATES if r is not None),
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="Fashion-MNIST rounds (default: the scenario's)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        type=parse_override,
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a Fashion-MNIST scenario setting, e.g. training.learning-rate=4.0",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help=f"hospital seeds (default {list(HOSPITAL_SEEDS_FULL)}; quick: 0)",
    )
    parser.add_argument("--skip-fashion", action="store_true", help="no Fashion-MNIST runs")
    parser.add_argument("--skip-hospitals", action="store_true", help="no hospital runs")
    parser.add_argument(
        "--tables-from",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="run nothing: print the tables of results files (partial ones too), merged; "
        "with --out, write the merged results",
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=None,
        help="keep every run directory here (default: a temporary folder, removed)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulations, print the tables, write the JSON; 0 on success."""
    args = parse_args(
        MODULE, "Accuracy with and without DP, real simulations.", argv, _add_arguments
    )
    if args.tables_from:
        result = merge_results(args.tables_from)
        print_results(result)
        save_results(args.out, result)
        return 0
    machine = machine_info()
    print(f"{args.command}\n{describe_machine(machine)}", flush=True)
    overrides: dict[str, Any] = {}
    for layer in args.overrides:
        overrides = merge(overrides, layer)
    fashion: list[Setting] = []
    if not args.quick and not args.skip_fashion:
        data_dir = build_config(read_toml(SCENARIO_DIR / "fashion_mnist.toml")).data.data_dir
        folder = Path(data_dir).expanduser() if data_dir else DEFAULT_FASHION_MNIST_DIR
        problem = ensure_fashion_mnist(folder, install=args.install_data)
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        fashion = fashion_settings(
            epsilons=args.epsilons,
            partitions=args.partitions,
            rounds=args.rounds,
            overrides=overrides,
            baseline_learning_rates=[] if args.no_baseline else args.baseline_learning_rates,
        )
    hospitals: list[Setting] = []
    if not args.skip_hospitals:
        seeds = args.seeds or ([0] if args.quick else list(HOSPITAL_SEEDS_FULL))
        hospitals = hospital_settings(
            seeds=seeds, rounds=QUICK_HOSPITAL_ROUNDS if args.quick else None
        )
    settings = [*fashion, *hospitals]
    if not settings:
        print("nothing to run", file=sys.stderr)
        return 2
    started = time.perf_counter()
    settings_record = {
        "delta": DELTA,
        "fashion_epsilons": list(args.epsilons) if fashion else [],
        "fashion_partitions": [list(p) for p in args.partitions] if fashion else [],
        "fashion_rounds": args.rounds,
        "fashion_baseline_learning_rates": []
        if args.no_baseline or not fashion
        else args.baseline_learning_rates,
        "fashion_overrides": overrides,
        "hospital_epsilon": HOSPITAL_EPSILON,
        "hospital_seeds": sorted({s.seed for s in hospitals if s.seed is not None}),
        "hospital_rounds": QUICK_HOSPITAL_ROUNDS if args.quick else None,
        "goal": {"epsilon": GOAL_EPSILON, "accuracy": GOAL_ACCURACY},
        "accuracy": "federated evaluation: each site's held-out 20 % of its partition, "
        "weighted by rows; Fashion-MNIST train + t10k pooled before the split",
    }
    records: list[dict[str, Any]] = []

    def payload(*, complete: bool) -> dict[str, Any]:
        fashion_records = [r for r in records if r["study"] == "fashion-mnist"]
        hospital_records = [r for r in records if r["study"] == "hospitals"]
        return {
            "benchmark": "privacy_utility",
            "command": args.command,
            "quick": args.quick,
            "complete": complete,
            "machine": machine,
            "settings": settings_record,
            "anchors": [{"name": n, "epsilon": e, "accuracy": a} for n, e, a in ANCHORS],
            "runs": records,
            "fashion_goal": goal_rows(fashion_records),
            "hospitals": hospital_summary(hospital_records) if hospital_records else None,
            "seconds": time.perf_counter() - started,
            "load_average_after": load_average(),
        }

    with tempfile.TemporaryDirectory(prefix="fedvault-privacy-utility-") as tmp:
        runs_dir = args.runs_dir or Path(tmp)
        for index, setting in enumerate(settings, start=1):
            print(f"\n[{index}/{len(settings)}] {setting.label}", flush=True)
            record = run_one(setting, runs_dir, index)
            records.append(record)
            print(
                f"  final accuracy {record['final_accuracy']:.4f}, ε {record['epsilon']}, "
                f"{record['wall_s']:.0f} s, load {record['load_average']}",
                flush=True,
            )
            if args.out is not None and index < len(settings):
                write_json(args.out, payload(complete=False))  # partial results survive
    result = payload(complete=True)
    print_results(result)
    print(
        f"\n{len(records)} simulations in {result['seconds']:.0f} s; "
        f"load average now {result['load_average_after']}"
    )
    save_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
