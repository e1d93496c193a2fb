"""DP-SGD vs plain SGD training throughput for every built-in model (issue 6, question 1).

For each case (a built-in model on data shaped like a built-in dataset, at fedvault's default
batch size or a shipped scenario's) it times one local training round of:

- ``fedvault non-DP``, ``fedvault DP`` and ``fedvault DP opacus``: fedvault's own
  ``fedvault.common.training.train``: its lean plain-SGD step (one permutation per epoch cut into
  index tensors, torch's foreach SGD), DP-SGD with Poisson sampling in the engine fedvault
  chooses (``training.grad-sample-mode = "auto"``: the book-keeping engine of
  common/bk_dpsgd.py for every built-in model), and DP-SGD in the Opacus grad-sample mode
  fedvault would choose without BK (``auto_opacus_mode``; the tables name both);
- ``torch plain``: the same SGD loop written directly, with no fedvault around it, over a
  stock ``DataLoader`` (per-row fetch and collate);
- ``opacus M`` for M in hooks, functorch, ew, ghost: ``PrivacyEngine.make_private(...,
  grad_sample_mode=M)`` around that same loop (ghost is Opacus' fast gradient clipping,
  ``GradSampleModuleFastGradientClipping``, whose criterion wrapper runs two backward passes).

A round includes everything a site does per round (data loader, ``make_private``, training,
detaching hooks); for the direct variants the training loop alone is timed as well ("steps
only"). The variants run interleaved (A, B, C, … then the order rotated) with one unrecorded
warm-up round each, so machine load hits them alike; each reports the median over repeats
and the median of per-repeat time ratios against ``fedvault non-DP`` (or, steps only,
against ``torch plain``). Data are synthetic tensors of the datasets' shapes (the cost of
a step does not depend on the values), the same for every variant of a case; a round holds
as many rows as one site trains on in that scenario, capped at ``--max-steps`` batches.
Poisson sampling makes a round's batch sizes random: samples/s counts the expected rows.

The "noise floor" of a case is what drawing the Gaussian noise alone adds to the plain
round: 1 + steps × (one draw of as many normals as the model has parameters) / plain round.

DP-SGD: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016. Ghost clipping:
Li et al., "Large Language Models Can Be Strong Differentially Private Learners", ICLR 2022.
Book-keeping: Bu, Wang, Zha, Karypis, "Differentially Private Optimization on Large Model at
Small Cost", ICML 2023.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import site
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import (
    SCENARIO_DIR,
    describe_machine,
    load_average,
    machine_info,
    median,
    parse_args,
    print_table,
    save_results,
)
from fedvault.common.config import FedvaultConfig, build_config, read_toml
from fedvault.common.models import build_model, default_model_for
from fedvault.common.training import (
    TrainingPlan,
    auto_grad_sample_mode,
    auto_opacus_mode,
    steps_per_epoch,
    train,
)

MODULE = "benchmarks.dp_overhead"
#: Opacus grad-sample modes compared (Opacus 1.6 names).
MODES: tuple[str, ...] = ("hooks", "functorch", "ew", "ghost")
BASELINE = "fedvault non-DP"
PLAIN = "torch plain"
FEDVAULT_DP = "fedvault DP"
FEDVAULT_OPACUS = "fedvault DP opacus"
VARIANTS: tuple[str, ...] = (
    BASELINE,
    FEDVAULT_DP,
    FEDVAULT_OPACUS,
    PLAIN,
    *(f"opacus {m}" for m in MODES),
)
DP_VARIANTS: tuple[str, ...] = (FEDVAULT_DP, FEDVAULT_OPACUS, *(f"opacus {m}" for m in MODES))
#: Issue 6's goal: DP-SGD at most this many times slower than plain SGD, for every model.
GOAL_RATIO = 1.5
#: Any sigma will do: the noise's cost does not depend on its scale.
NOISE_MULTIPLIER = 1.0
#: Built-in datasets: feature shape, classes and rows (fashion-mnist: 60,000 + 10,000 IDX
#: images; the others as common/data.py loads them).
DATASETS: dict[str, tuple[tuple[int, ...], int, int]] = {
    "breast-cancer": ((30,), 2, 569),
    "credit": ((12,), 2, 6000),
    "digits": ((1, 8, 8), 10, 1797),
    "fashion-mnist": ((1, 28, 28), 10, 70000),
}
#: Every built-in model on the data it is meant for, at the default batch size. The MLP
#: runs on tables and on flattened 28×28 images (784 inputs: the "wide MLP" anchor).
DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (
    ("logistic", "breast-cancer"),
    ("mlp", "breast-cancer"),
    ("mlp", "fashion-mnist"),
    ("cnn", "digits"),
    ("cnn", "fashion-mnist"),
)
QUICK_PAIRS: tuple[tuple[str, str], ...] = (("logistic", "breast-cancer"), ("cnn", "digits"))


@dataclass(frozen=True, kw_only=True)
class Case:
    """One model on one data shape at one batch size, with the training settings around it."""

    model: str
    dataset: str
    batch_size: int
    rows: int
    site_rows: int
    learning_rate: float
    momentum: float
    max_grad_norm: float
    accountant: str
    sources: tuple[str, ...]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return DATASETS[self.dataset][0]

    @property
    def num_classes(self) -> int:
        return DATASETS[self.dataset][1]

    @property
    def steps(self) -> int:
        return steps_per_epoch(self.rows, self.batch_size)

    @property
    def name(self) -> str:
        shape = "×".join(str(s) for s in self.feature_shape)
        return f"{self.model} {self.dataset} ({shape}) B={self.batch_size}"

    def plan(self, *, dp: bool, mode: str = "auto") -> TrainingPlan:
        return TrainingPlan(
            local_epochs=1,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            momentum=self.momentum,
            max_grad_norm=self.max_grad_norm,
            noise_multiplier=NOISE_MULTIPLIER if dp else None,
            accountant=self.accountant,
            grad_sample_mode=mode,
        )


@dataclass(frozen=True)
class Timing:
    """One round: its whole wall time and, for the direct variants, the training loop's."""

    round_s: float
    loop_s: float | None = None
    #: The process' CPU time for the round: on a loaded machine, less disturbed than wall time.
    cpu_s: float | None = None


@dataclass
class VariantResult:
    """A variant's timings in one case, or why it could not run."""

    variant: str
    timings: list[Timing] = field(default_factory=list)
    failure: str | None = None


def site_train_rows(total_rows: int, sites: int, test_fraction: float) -> int:
    """Training rows of the largest site of an even split, as common/partition.py cuts it.

    For a Dirichlet split (``banks``) this is the mean share; its sites vary around it.
    """
    per_site = math.ceil(total_rows / sites)
    test = min(max(1, round(per_site * test_fraction)), per_site - 1)
    return per_site - test


def _case_for(cfg: FedvaultConfig, model: str, dataset: str, max_steps: int, source: str) -> Case:
    site_rows = site_train_rows(DATASETS[dataset][2], cfg.federation.sites, cfg.data.test_fraction)
    batch = cfg.training.batch_size
    return Case(
        model=model,
        dataset=dataset,
        batch_size=batch,
        rows=min(site_rows, batch * max_steps),
        site_rows=site_rows,
        learning_rate=cfg.training.learning_rate,
        momentum=cfg.training.momentum,
        max_grad_norm=cfg.privacy.max_grad_norm,
        accountant=cfg.privacy.accountant,
        sources=(source,),
    )


def build_cases(*, quick: bool, max_steps: int, selected: Sequence[str] = ()) -> list[Case]:
    """Default-config cases for every built-in model, then each shipped scenario's own case.

    A scenario whose (model, dataset, batch size) is already listed only adds its name to
    that case's sources. ``selected`` keeps the cases whose name contains any of its strings.
    """
    defaults = build_config()
    cases: dict[tuple[str, str, int], Case] = {}
    for model, dataset in QUICK_PAIRS if quick else DEFAULT_PAIRS:
        case = _case_for(defaults, model, dataset, max_steps, "defaults")
        cases[(model, dataset, case.batch_size)] = case
    if not quick:
        for path in sorted(SCENARIO_DIR.glob("*.toml")):
            cfg = build_config(read_toml(path))
            dataset = cfg.data.dataset
            if dataset not in DATASETS:
                continue
            kind = "image" if len(DATASETS[dataset][0]) == 3 else "table"
            model = default_model_for(kind) if cfg.model.name == "auto" else cfg.model.name
            source = f"simulations/{path.name}"
            key = (model, dataset, cfg.training.batch_size)
            if key in cases:
                cases[key] = replace(cases[key], sources=(*cases[key].sources, source))
            else:
                cases[key] = _case_for(cfg, model, dataset, max_steps, source)
    chosen = list(cases.values())
    if selected:
        chosen = [c for c in chosen if any(s in c.name for s in selected)]
    return chosen


def synthetic_data(case: Case, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal features of the case's shape and uniformly drawn labels (fixed seed)."""
    rng = np.random.default_rng(0)
    n = case.rows if rows is None else rows
    features = rng.standard_normal((n, *case.feature_shape), dtype=np.float32)
    labels = rng.integers(0, case.num_classes, size=n, dtype=np.int64)
    return features, labels


def _fresh_model(case: Case) -> nn.Module:
    return build_model(case.model, case.feature_shape, case.num_classes, seed=0)


def run_fedvault(
    case: Case, data: tuple[np.ndarray, np.ndarray], *, dp: bool, mode: str = "auto"
) -> Timing:
    """One round of fedvault's ``train()`` on a freshly built model (building not timed)."""
    model = _fresh_model(case)
    plan = case.plan(dp=dp, mode=mode)
    start, cpu_start = time.perf_counter(), time.process_time()
    train(model, data[0], data[1], plan=plan, device=torch.device("cpu"))
    return Timing(round_s=time.perf_counter() - start, cpu_s=time.process_time() - cpu_start)


def run_direct(case: Case, data: tuple[np.ndarray, np.ndarray], *, mode: str | None) -> Timing:
    """One round of a hand-written SGD loop; with ``mode``, made private by Opacus in that mode.

    Mirrors what ``train()`` does per round (data loader, optimizer, ``make_private`` with
    Poisson sampling, detaching the hooks afterwards) without fedvault's bookkeeping.
    """
    model = _fresh_model(case)
    start, cpu_start = time.perf_counter(), time.process_time()
    dataset = TensorDataset(torch.from_numpy(data[0]), torch.from_numpy(data[1]))
    loader: DataLoader[Any] = DataLoader(dataset, batch_size=case.batch_size, shuffle=True)
    optimizer: torch.optim.Optimizer = torch.optim.SGD(
        model.parameters(), lr=case.learning_rate, momentum=case.momentum
    )
    criterion: Callable[..., Any] = nn.CrossEntropyLoss()
    module: nn.Module = model
    if mode is not None:
        engine = PrivacyEngine(accountant=case.accountant, secure_mode=False)
        prepared: tuple[Any, ...] = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=case.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=mode,
        )
        if len(prepared) == 4:  # ghost: the criterion wrapper runs both backward passes
            module, optimizer, criterion, loader = prepared
        else:
            module, optimizer, loader = prepared
    loop_start = time.perf_counter()
    for batch_x, batch_y in loader:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(module(batch_x), batch_y)
        loss.backward()
        optimizer.step()
    loop_end = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    if isinstance(module, AbstractGradSampleModule):
        module._close()
    return Timing(
        round_s=time.perf_counter() - start,
        loop_s=loop_end - loop_start,
        cpu_s=time.process_time() - cpu_start,
    )


def runners(case: Case, data: tuple[np.ndarray, np.ndarray]) -> dict[str, Callable[[], Timing]]:
    """Every variant's one-round function, by name."""
    table: dict[str, Callable[[], Timing]] = {
        BASELINE: lambda: run_fedvault(case, data, dp=False),
        FEDVAULT_DP: lambda: run_fedvault(case, data, dp=True),
        FEDVAULT_OPACUS: lambda: run_fedvault(
            case, data, dp=True, mode=auto_opacus_mode(_fresh_model(case), case.batch_size)
        ),
        PLAIN: lambda: run_direct(case, data, mode=None),
    }
    for mode in MODES:
        table[f"opacus {mode}"] = lambda mode=mode: run_direct(case, data, mode=mode)  # type: ignore[misc]
    return table


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    reason = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return reason if len(reason) <= 100 else reason[:97] + "..."


def measure(
    run: dict[str, Callable[[], Timing]], variants: Sequence[str], repeats: int
) -> dict[str, VariantResult]:
    """Run the variants interleaved: one warm-up round each, then ``repeats`` recorded rounds.

    Round r runs the variants in the listed order rotated by r, so no variant always follows
    the same one. A variant that raises is marked with the reason and not run again.
    """
    results = {v: VariantResult(v) for v in variants}
    for r in range(repeats + 1):
        shift = r % len(variants)
        for variant in [*variants[shift:], *variants[:shift]]:
            result = results[variant]
            if result.failure is not None:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    timing = run[variant]()
            except Exception as err:  # e.g. a grad-sample mode that cannot handle a layer
                result.failure = _reason(err)
                result.timings.clear()
                continue
            if r > 0:
                result.timings.append(timing)
    return results


def _ratios(
    results: dict[str, VariantResult], variant: str, baseline: str, *, loop: bool
) -> list[float]:
    ours, theirs = results[variant].timings, results[baseline].timings
    if loop:
        return [
            a.loop_s / b.loop_s
            for a, b in zip(ours, theirs, strict=True)
            if a.loop_s is not None and b.loop_s is not None
        ]
    return [a.round_s / b.round_s for a, b in zip(ours, theirs, strict=True)]


def _cpu_ratios(results: dict[str, VariantResult], variant: str) -> list[float]:
    ours, theirs = results[variant].timings, results[BASELINE].timings
    return [
        a.cpu_s / b.cpu_s
        for a, b in zip(ours, theirs, strict=True)
        if a.cpu_s is not None and b.cpu_s
    ]


def noise_seconds(case: Case, draws: int = 200) -> float:
    """Median time of one noise draw as the BK engine makes it (in place, one buffer)."""
    size = sum(p.numel() for p in _fresh_model(case).parameters())
    buffer = torch.empty(size)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(draws + 1):
        start = time.perf_counter()
        buffer.normal_(0.0, 1.0, generator=generator)
        times.append(time.perf_counter() - start)
    return median(times[1:])


def summarise(case: Case, results: dict[str, VariantResult]) -> dict[str, Any]:
    """The JSON record of one case: per variant median samples/s and slowdown ratios."""
    if results[BASELINE].failure is not None:
        raise RuntimeError(f"{case.name}: the baseline failed: {results[BASELINE].failure}")
    variants: list[dict[str, Any]] = []
    for name, result in results.items():
        if result.failure is not None:
            variants.append({"variant": name, "status": "n/a", "reason": result.failure})
            continue
        round_times = [t.round_s for t in result.timings]
        loop_times = [t.loop_s for t in result.timings if t.loop_s is not None]
        setup_times = [t.round_s - t.loop_s for t in result.timings if t.loop_s is not None]
        record: dict[str, Any] = {
            "variant": name,
            "status": "ok",
            "round_s": round_times,
            "samples_per_s": case.rows / median(round_times),
            "ratio": median(_ratios(results, name, BASELINE, loop=False)),
            "cpu_ratio": median(_cpu_ratios(results, name)) if _cpu_ratios(results, name) else None,
            "loop_samples_per_s": case.rows / median(loop_times) if loop_times else None,
            "loop_ratio": None,
            "setup_s": median(setup_times) if setup_times else None,
        }
        if loop_times and results[PLAIN].failure is None:
            record["loop_ratio"] = median(_ratios(results, name, PLAIN, loop=True))
        variants.append(record)
    by_name = {v["variant"]: v for v in variants}
    dp_ok = [by_name[v] for v in DP_VARIANTS if by_name[v]["status"] == "ok"]
    best = min(dp_ok, key=lambda v: v["ratio"]) if dp_ok else None
    fedvault_dp = by_name[FEDVAULT_DP]
    noise_s = noise_seconds(case)
    plain_round = median([t.round_s for t in results[BASELINE].timings])
    return {
        "case": case.name,
        "model": case.model,
        "dataset": case.dataset,
        "feature_shape": list(case.feature_shape),
        "num_classes": case.num_classes,
        "batch_size": case.batch_size,
        "site_rows": case.site_rows,
        "rows": case.rows,
        "steps": case.steps,
        "sources": list(case.sources),
        "variants": variants,
        "best_dp_variant": best["variant"] if best else None,
        "best_dp_ratio": best["ratio"] if best else None,
        "fedvault_dp_ratio": fedvault_dp.get("ratio"),
        "fedvault_dp_mode": auto_grad_sample_mode(_fresh_model(case), case.batch_size),
        "fedvault_opacus_mode": auto_opacus_mode(_fresh_model(case), case.batch_size),
        "noise_draw_s": noise_s,
        "noise_floor_ratio": 1.0 + case.steps * noise_s / plain_round,
        "goal_met": fedvault_dp["status"] == "ok" and fedvault_dp["ratio"] <= GOAL_RATIO,
        "goal_reachable_by_mode": best is not None and best["ratio"] <= GOAL_RATIO,
    }


def _cell(record: dict[str, Any], key: str, fmt: str) -> str:
    if record["status"] != "ok":
        return f"n/a ({record['reason']})"
    value = record.get(key)
    return "—" if value is None else format(value, fmt)


def _setup_cell(records: dict[str, dict[str, Any]], direct: Sequence[str]) -> str:
    ok = [records[n] for n in direct if records[n]["status"] == "ok"]
    best = min(ok, key=lambda r: r["loop_ratio"] or math.inf) if ok else None
    parts = [records[PLAIN], records["opacus hooks"], best]
    return " / ".join(
        "—" if r is None or r["status"] != "ok" else f"{1000 * r['setup_s']:.1f}" for r in parts
    ) + (f" ({best['variant'].split()[-1]})" if best else "")


def print_tables(cases: list[dict[str, Any]], repeats: int) -> None:
    """Samples/s, round slowdowns with the goal, and steps-only slowdowns."""
    lookup = [{v["variant"]: v for v in c["variants"]} for c in cases]
    print_table(
        f"Throughput, samples/s (median of {repeats} interleaved rounds; a round = all a site "
        "does per round)",
        ["case", "rows/steps", *VARIANTS],
        [
            [
                c["case"],
                f"{c['rows']}/{c['steps']}",
                *(_cell(v[n], "samples_per_s", ".0f") for n in VARIANTS),
            ]
            for c, v in zip(cases, lookup, strict=True)
        ],
    )
    slow = [n for n in VARIANTS if n != BASELINE]
    print_table(
        f"Slowdown × vs {BASELINE} (median of per-round time ratios; goal ≤ {GOAL_RATIO}×)",
        ["case", "fedvault modes", *slow, "noise floor", "best DP", f"goal ≤ {GOAL_RATIO}×"],
        [
            [
                c["case"],
                f"{c['fedvault_dp_mode']} / {c['fedvault_opacus_mode']}",
                *(_cell(v[n], "ratio", ".2f") for n in slow),
                f"{c['noise_floor_ratio']:.2f}",
                f"{c['best_dp_variant']} {c['best_dp_ratio']:.2f}×"
                if c["best_dp_variant"]
                else "—",
                ("met" if c["goal_met"] else "not met")
                + (
                    ""
                    if c["goal_met"] or not c["goal_reachable_by_mode"]
                    else "; mode choice would"
                ),
            ]
            for c, v in zip(cases, lookup, strict=True)
        ],
    )
    print_table(
        f"CPU-time slowdown × vs {BASELINE} (median of per-round process CPU-time ratios)",
        ["case", *slow],
        [
            [c["case"], *(_cell(v[n], "cpu_ratio", ".2f") for n in slow)]
            for c, v in zip(cases, lookup, strict=True)
        ],
    )
    direct = [f"opacus {m}" for m in MODES]
    print_table(
        f"Steps only (make_private and loader set-up excluded): slowdown × vs {PLAIN} loop",
        ["case", f"{PLAIN} samples/s", *direct, "set-up+teardown ms: plain / hooks / best"],
        [
            [
                c["case"],
                _cell(v[PLAIN], "loop_samples_per_s", ".0f"),
                *(_cell(v[n], "loop_ratio", ".2f") for n in direct),
                _setup_cell(v, direct),
            ]
            for c, v in zip(cases, lookup, strict=True)
        ],
    )


def _strip_paths(text: str) -> str:
    for prefix in sorted({*site.getsitepackages(), str(Path.cwd())}, key=len, reverse=True):
        text = text.replace(prefix + "/", "")
    return text


def profile_train(
    case: Case, *, steps: int = 1, calls: int = 20, top: int = 10
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """cProfile of ``calls`` DP ``train()`` calls of ``steps`` steps each (one round each).

    Returns the top entries by cumulative and by own time, totals over all calls (one call
    is a few milliseconds: single calls are dominated by noise on a loaded machine), and
    the time per call of each of COMPONENTS. One
    unprofiled warm-up call first, so first-use costs (lazy imports, allocator growth) are
    left out. With ``steps=1`` the round's rows are one expected batch (q = 1).
    """
    data = synthetic_data(case, rows=case.batch_size * steps)
    plan = case.plan(dp=True)
    device = torch.device("cpu")
    profiler = cProfile.Profile()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(_fresh_model(case), data[0], data[1], plan=plan, device=device)
        for _ in range(calls):
            model = _fresh_model(case)
            profiler.enable()
            train(model, data[0], data[1], plan=plan, device=device)
            profiler.disable()
    tables: dict[str, str] = {}
    for order in ("cumulative", "tottime"):
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats(order).print_stats(top)
        tables[order] = _strip_paths(stream.getvalue().strip())
    return tables, breakdown(pstats.Stats(profiler), calls)


#: Where a DP train() call spends its time: (component, file suffix, function name). Times
#: are cumulative (a component includes what it calls); rows marked ↳ are parts of the
#: row above. The names are Opacus 1.6's and torch 2.x's.
_GSM = "opacus/grad_sample/grad_sample_module.py"
_GHOST = "opacus/grad_sample/grad_sample_module_fast_gradient_clipping.py"
_OPTIMIZER = "opacus/optimizers/optimizer.py"
_GHOST_OPTIMIZER = "opacus/optimizers/optimizer_fast_gradient_clipping.py"
COMPONENTS: tuple[tuple[str, str | tuple[str, ...], str], ...] = (
    ("train() in all", "common/training.py", "train"),
    ("BK: engine set-up (flat buffers, views)", "common/bk_dpsgd.py", "__init__"),
    ("BK: Poisson sampling", "common/bk_dpsgd.py", "poisson_batches"),
    ("BK: clipped sum (forward, backward to layer outputs, norms, sums)", "common/bk_dpsgd.py",
     "_accumulate_clipped"),
    ("↳ backward to the layer outputs", "torch/autograd/__init__.py", "grad"),
    ("BK: noise (one in-place draw)", "common/bk_dpsgd.py", "draw_noise"),
    ("BK: SGD update (one flat buffer)", "common/flat_sgd.py", "step"),
    ("make_private: wrap model, Poisson loader, DP optimizer", "opacus/privacy_engine.py",
     "make_private"),
    ("data loading: Poisson sampler (rows then cut by index)", "opacus/utils/uniform_sampler.py",
     "__iter__"),
    ("forward, with activation-capture hooks",
     (_GSM, "opacus/grad_sample/gsm_base.py", "opacus/grad_sample/gsm_exp_weights.py"),
     "forward"),
    ("loss", "torch/nn/modules/loss.py", "forward"),
    ("backward (ghost: both passes)", "torch/_tensor.py", "backward"),
    ("↳ per-sample gradient (ghost: norm) hooks", (_GSM, _GHOST), "capture_backprops_hook"),
    ("↳↳ grad_sample buffers (zero-fill + copy)", _GSM, "create_or_accumulate_grad_sample"),
    ("DP optimizer step", _OPTIMIZER, "step"),
    ("↳ per-sample norms and clipping", _OPTIMIZER, "clip_and_accumulate"),
    ("↳ noise", (_OPTIMIZER, _GHOST_OPTIMIZER), "add_noise"),
    ("teardown: detach hooks", "opacus/grad_sample/gsm_base.py", "_close"),
    ("teardown: clear gradients", "common/training.py", "_clear_gradients"),
)  # fmt: skip


OTHER = (
    "other: engine, optimizer and loader construction, cutting batches by index, zero_grad, "
    "parameter copies"
)


def breakdown(stats: pstats.Stats, calls: int) -> list[dict[str, Any]]:
    """Milliseconds per train() call and share of train() for each of COMPONENTS."""
    table: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]

    def cumulative(suffix: str | tuple[str, ...], function: str) -> float:
        return sum(
            row[3]
            for (filename, _, name), row in table.items()
            if name == function and filename.replace("\\", "/").endswith(suffix)
        )

    seconds = [cumulative(suffix, function) for _, suffix, function in COMPONENTS]
    total = seconds[0] or math.inf
    parts = [label for label, _, _ in COMPONENTS]
    top_level = sum(t for label, t in zip(parts[1:], seconds[1:], strict=True) if "↳" not in label)
    rows = [*zip(parts, seconds, strict=True), (OTHER, max(0.0, seconds[0] - top_level))]
    return [
        {"component": label, "ms_per_call": 1000 * t / calls, "share": t / total}
        for label, t in rows
    ]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=None, help="recorded rounds per variant")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="cap on the batches (steps) in one round"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: as a simulated site)"
    )
    parser.add_argument(
        "--cases", nargs="*", default=(), help="only cases whose name contains one of these"
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        const="worst",
        default=None,
        help="cProfile fedvault DP train() for the worst case (or the case named)",
    )
    parser.add_argument(
        "--profile-steps", type=int, default=1, help="DP steps in each profiled train() call"
    )
    parser.add_argument(
        "--profile-calls", type=int, default=20, help="train() calls profiled (totals shown)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print its tables, write its JSON; 0 on success."""
    args = parse_args(MODULE, "DP-SGD vs plain SGD throughput per model.", argv, _add_arguments)
    repeats = args.repeats or (3 if args.quick else 7)
    max_steps = args.max_steps or (3 if args.quick else 20)
    torch.set_num_threads(args.threads)
    machine = machine_info()
    print(f"{args.command}\n{describe_machine(machine)}, torch threads {args.threads}")
    started = time.perf_counter()
    cases = build_cases(quick=args.quick, max_steps=max_steps, selected=args.cases)
    if not cases:
        print(f"no case matches {args.cases}", file=sys.stderr)
        return 2
    summaries: list[dict[str, Any]] = []
    for case in cases:
        case_start = time.perf_counter()
        data = synthetic_data(case)
        results = measure(runners(case, data), VARIANTS, repeats)
        summary = summarise(case, results)
        summary["load_average"] = load_average()
        summary["seconds"] = time.perf_counter() - case_start
        summaries.append(summary)
        print(
            f"  {case.name}: {case.rows} rows, {case.steps} steps, "
            f"{summary['seconds']:.1f} s, load {summary['load_average']}",
            flush=True,
        )
    print_tables(summaries, repeats)
    profile: dict[str, Any] | None = None
    if args.profile is not None:
        if args.profile == "worst":
            worst = max(summaries, key=lambda s: s["fedvault_dp_ratio"] or 0.0)
            target = next(c for c in cases if c.name == worst["case"])
        else:
            target = next((c for c in cases if args.profile in c.name), cases[0])
        tables, parts = profile_train(target, steps=args.profile_steps, calls=args.profile_calls)
        profile = {
            "case": target.name,
            "steps": args.profile_steps,
            "calls": args.profile_calls,
            "top_cumulative": tables["cumulative"],
            "top_tottime": tables["tottime"],
            "breakdown": parts,
        }
        for order, text in tables.items():
            print(
                f"\ncProfile of {args.profile_calls} fedvault DP train() calls of "
                f"{args.profile_steps} step(s), {target.name}, by {order} time:\n\n{text}"
            )
        print_table(
            f"Where one DP train() call of {args.profile_steps} step(s) spends its time "
            f"({target.name}; cProfile, mean of {args.profile_calls} calls; cProfile's own "
            "overhead inflates Python-heavy parts)",
            ["component", "ms per call", "share of train()"],
            [
                [p["component"], f"{p['ms_per_call']:.3f}", f"{100 * p['share']:.0f} %"]
                for p in parts
            ],
        )
    elapsed = time.perf_counter() - started
    load_after = load_average()
    print(f"\n{len(cases)} cases in {elapsed:.1f} s; load average now {load_after}")
    payload = {
        "benchmark": "dp_overhead",
        "command": args.command,
        "quick": args.quick,
        "machine": machine,
        "settings": {
            "repeats": repeats,
            "max_steps": max_steps,
            "torch_threads": args.threads,
            "noise_multiplier": NOISE_MULTIPLIER,
            "goal_ratio": GOAL_RATIO,
            "data": "synthetic standard-normal features and uniform labels of each dataset's "
            "shape; rows = one site's training rows, capped at max_steps batches",
        },
        "cases": summaries,
        "profile": profile,
        "seconds": elapsed,
        "load_average_after": load_after,
    }
    save_results(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
