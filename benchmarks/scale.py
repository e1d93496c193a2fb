"""Whole-federation scale: wall time and peak memory of a real simulation at 10-100 sites.

Each case is a real ``fedvault simulate`` run (``fedvault.simulations.runner.simulate``: a private
SuperLink in simulation mode, ``flwr run``, Flower's Simulation Engine on Ray) of N sites ×
R rounds on the SYNTHETIC ``credit`` table (6000 rows: 60 per site at 100 sites), with DP-SGD
on at fedvault's default privacy settings (target ε, δ, clipping, PRV accounting). It
measures:

- wall time of the whole ``simulate()`` call (SuperLink start to every process stopped) and
  the ServerApp's own time, and the median seconds per training round;
- peak memory of the whole process tree: this process and every descendant (SuperLink,
  SuperExec, ``flwr run``, ``flwr-simulation``, the ServerApp, Ray's GCS, raylet, agents
  and workers), sampled from /proc every ``--interval`` seconds (0.5 s). Summed RSS counts shared
  pages (libraries, Ray's shared-memory object store) once per process that maps them, so
  it over-states what the tree takes; summed PSS (proportional set size, Linux
  ``smaps_rollup``, read every fourth sample: it costs milliseconds per process) shares
  them out and is the tighter figure. Both are reported;
- CPU seconds of the whole tree (user + system, summed over its processes as last
  sampled; a process's last half second before it exits is missed): on a shared
  machine the wall time depends on the load, the CPU time much less;
- that every site trained in every round (metrics rows per round = sites) and the final
  accuracy and ε (max over sites) from the run's own summary, and that no process of the
  run outlived it.

The sampling thread and ``simulate()``'s own follow loop run in this process: its CPU
(``benchmarks.scale`` in the tables) is partly measurement overhead.

Issue goal: 100 sites × 3 rounds within 60 s and 4 GB on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    describe_machine,
    load_average,
    machine_info,
    parse_args,
    print_table,
    save_results,
)
from fedvault.common.config import FedvaultConfig, build_config
from fedvault.common.report import METRICS_FILE, ROUNDS_FILE, read_jsonl
from fedvault.runtime.processes import descendants

MODULE = "benchmarks.scale"
DATASET = "credit"
FULL_SITES: tuple[int, ...] = (10, 50, 100)
FULL_ROUNDS = 3
QUICK_SITES: tuple[int, ...] = (10,)
QUICK_ROUNDS = 1
#: Issue goal for the largest case: wall seconds and GB (10**9 bytes) of memory.
GOAL_SITES = 100
GOAL_SECONDS = 60.0
GOAL_BYTES = 4 * 10**9
GIB = 2**30
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def scale_config(sites: int, rounds: int) -> FedvaultConfig:
    """fedvault's defaults (DP on, default privacy) on the credit table with ``sites`` sites."""
    return build_config(
        {
            "name": f"scale-{sites}",
            "federation": {"sites": sites, "rounds": rounds},
            "data": {"dataset": DATASET},
        }
    )


def _label(pid: int) -> str:
    """A short name for a process: Ray's title (``ray::…``) or its program or script name."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if not args:
        return "?"
    if args[0].startswith("ray::"):
        return args[0].split()[0]
    program = Path(args[0]).name
    if program.startswith("python") and len(args) > 1:
        script = next((a for a in args[1:] if not a.startswith("-")), args[1])
        return Path(script).name
    return program


def _rss(pid: int) -> int | None:
    """RSS of ``pid`` in bytes (statm: cheap)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def _rss_pss(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) of ``pid`` in bytes, from smaps_rollup (PSS = RSS where it is unreadable)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        rss_only = _rss(pid)
        return None if rss_only is None else (rss_only, rss_only)
    rss = pss = 0
    for line in text.splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
    return rss, pss


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (field 3, the state, is index 0)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


@dataclass
class TreeMemory:
    """Samples the summed RSS/PSS and CPU time of a process tree in a background thread.

    The tree is ``root`` and its live descendants, plus any process seen in it before and
    still alive (a daemon re-parented to init after its parent exited still counts).
    """

    root: int = field(default_factory=os.getpid)
    interval: float = 0.5
    #: PSS (smaps_rollup walks every mapping: milliseconds per process) every this many samples.
    pss_every: int = 4
    peak_rss: int = 0
    peak_pss: int = 0
    peak_processes: int = 0
    samples: int = 0
    #: Per-process RSS by label at the moment of peak RSS (label -> [count, bytes]).
    at_peak: dict[str, list[int]] = field(default_factory=dict)
    _seen: dict[int, int] = field(default_factory=dict)
    #: pid -> (label, CPU seconds at its last sample), kept after the process exits.
    _cpu: dict[int, tuple[str, float]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _start_time(self, pid: int) -> int | None:
        fields = _stat_fields(pid)
        try:
            return int(fields[19]) if fields else None
        except (IndexError, ValueError):
            return None

    @property
    def cpu_seconds(self) -> float:
        """User + system CPU seconds of every process seen, as last sampled."""
        return sum(seconds for _, seconds in self._cpu.values())

    def leftovers(self, grace: float = 5.0) -> list[str]:
        """Processes of the tree other than the root (and the root's own watchdog, which lives
        as long as the root: fedvault/runtime/watchdog.py) still alive (after ``grace`` seconds)."""
        from fedvault.runtime.watchdog import watchdog_pid

        spare = {self.root, watchdog_pid() if self.root == os.getpid() else None}
        deadline = time.monotonic() + grace
        while True:
            alive = []
            for pid, started in self._seen.items():
                fields = _stat_fields(pid)
                if pid not in spare and fields and fields[0] != "Z" and fields[19] == str(started):
                    alive.append(f"{pid} {_label(pid)}")
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds by process label."""
        out: dict[str, float] = {}
        for label, seconds in self._cpu.values():
            out[label] = out.get(label, 0.0) + seconds
        return out

    def sample(self) -> None:
        """Take one sample now."""
        for pid in [self.root, *descendants(self.root)]:
            if pid not in self._seen:
                started = self._start_time(pid)
                if started is not None:
                    self._seen[pid] = started
        rss = pss = 0
        with_pss = self.samples % self.pss_every == 0
        per: dict[str, list[int]] = {}
        for pid, started in list(self._seen.items()):
            fields = _stat_fields(pid)
            if fields is None or fields[19] != str(started):  # gone (or its PID recycled)
                del self._seen[pid]
                continue
            if with_pss:
                sizes = _rss_pss(pid)
            else:
                size = _rss(pid)
                sizes = None if size is None else (size, 0)
            if sizes is None:
                continue
            rss += sizes[0]
            pss += sizes[1]
            label = _label(pid)
            if label == "?" and pid in self._cpu:  # exiting: keep the name it had
                label = self._cpu[pid][0]
            self._cpu[pid] = (label, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
            entry = per.setdefault(label, [0, 0])
            entry[0] += 1
            entry[1] += sizes[0]
        self.samples += 1
        self.peak_pss = max(self.peak_pss, pss)
        if rss > self.peak_rss:
            self.peak_rss = rss
            self.at_peak = per
            self.peak_processes = sum(count for count, _ in per.values())

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread = threading.Thread(target=self._loop, name="tree-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def run_case(sites: int, rounds: int, *, interval: float, keep: Path | None) -> dict[str, Any]:
    """One real simulation of ``sites`` × ``rounds``; its timings, peak memory and results."""
    from fedvault.simulations.runner import simulate  # imports Flower

    cfg = scale_config(sites, rounds)
    with tempfile.TemporaryDirectory(prefix="fedvault-scale-") as tmp:
        run_path = (keep or Path(tmp)) / f"scale-{sites}x{rounds}"
        lines: list[str] = []
        started = time.perf_counter()
        with TreeMemory(interval=interval) as memory:
            summary = simulate(cfg, run_path, echo=lines.append)
        wall = time.perf_counter() - started
        leftovers = memory.leftovers()
        rounds_rows = read_jsonl(run_path / ROUNDS_FILE)
        metrics = read_jsonl(run_path / METRICS_FILE)
    trained = [r for r in rounds_rows if r["round"] > 0]
    per_round = [float(r["round_seconds"]) for r in trained]
    rows_per_round = {
        rnd: sum(1 for m in metrics if m["round"] == rnd and m["round_steps"] > 0)
        for rnd in range(1, rounds + 1)
    }
    top = sorted(memory.at_peak.items(), key=lambda item: -item[1][1])
    return {
        "sites": sites,
        "rounds": rounds,
        "dataset": DATASET,
        "rows_per_site": sorted({int(m["num_examples"]) for m in metrics if m["round"] > 0}),
        "wall_s": wall,
        "serverapp_s": float(summary["wall_seconds"]),
        "round_s": per_round,
        "median_round_s": statistics.median(per_round) if per_round else None,
        # Outside the ServerApp: SuperLink, flwr run, SuperExec and simulation start, Ray's
        # start, and stopping it all; then, inside, until the initial model was evaluated:
        # waiting for the sites, the schema query (every worker's first ClientApp call)
        # and the evaluation.
        "outside_serverapp_s": wall - float(summary["wall_seconds"]),
        "until_initial_eval_s": float(rounds_rows[0]["elapsed_seconds"]) if rounds_rows else None,
        "cpu_s": memory.cpu_seconds,
        "cpu_s_by_process": dict(
            sorted(memory.cpu_by_process().items(), key=lambda item: -item[1])
        ),
        "peak_rss_bytes": memory.peak_rss,
        "peak_pss_bytes": memory.peak_pss,
        "peak_processes": memory.peak_processes,
        "memory_samples": memory.samples,
        "memory_at_peak": [
            {"process": label, "count": count, "rss_bytes": size} for label, (count, size) in top
        ],
        "trained_sites_per_round": [rows_per_round[r] for r in sorted(rows_per_round)],
        "final_accuracy": summary["final_accuracy"],
        "epsilon": summary["epsilon"],
        "target_epsilon": summary["target_epsilon"],
        "delta": summary["delta"],
        "accountant": summary["accountant"],
        "noise_multiplier": sorted(set(summary["noise_multiplier"].values())),
        "leftover_processes": leftovers,
        "failed_sites": summary["failed_sites"],
        "refused_sites": summary["refused_sites"],
        "load_average": load_average(),
    }


def goal_status(case: dict[str, Any]) -> dict[str, Any]:
    """Whether the case meets the issue's time and memory goal (only the goal's site count)."""
    time_ok = case["wall_s"] <= GOAL_SECONDS
    memory_ok = case["peak_rss_bytes"] <= GOAL_BYTES
    return {"time_met": time_ok, "memory_met": memory_ok, "met": time_ok and memory_ok}


def print_tables(cases: Sequence[dict[str, Any]]) -> None:
    """The results table and, for the largest case, the processes that held the memory."""
    print_table(
        "Scale: real simulation on the Flower Simulation Engine, DP on (default privacy), "
        f"{DATASET} table; peak memory = whole process tree",
        ["sites", "rounds", "rows/site", "wall s", "CPU s", "peak GiB (RSS)", "peak GiB (PSS)",
         "processes", "s/round", "accuracy", "ε (target)", "trained/round"],
        [
            [
                c["sites"],
                c["rounds"],
                "/".join(str(n) for n in c["rows_per_site"]),
                f"{c['wall_s']:.1f}",
                f"{c['cpu_s']:.0f}",
                f"{c['peak_rss_bytes'] / GIB:.2f}",
                f"{c['peak_pss_bytes'] / GIB:.2f}",
                c["peak_processes"],
                f"{c['median_round_s']:.1f}" if c["median_round_s"] is not None else "—",
                f"{c['final_accuracy']:.3f}",
                f"{c['epsilon']:.3f} ({c['target_epsilon']:g})",
                ",".join(str(n) for n in c["trained_sites_per_round"]),
            ]
            for c in cases
        ],
    )  # fmt: skip
    largest = max(cases, key=lambda c: c["sites"])
    cpu = largest["cpu_s_by_process"]
    print_table(
        f"Processes at peak memory, {largest['sites']} sites (RSS; shared pages in each), "
        "and their CPU seconds over the whole run",
        ["process", "count", "RSS GiB", "CPU s"],
        [
            [p["process"], p["count"], f"{p['rss_bytes'] / GIB:.2f}",
             f"{cpu.get(p['process'], 0.0):.1f}"]
            for p in largest["memory_at_peak"][:12]
        ],
    )  # fmt: skip


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sites", type=int, nargs="*", default=None, help="site counts to run (one case each)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds per case")
    parser.add_argument(
        "--interval", type=float, default=0.5, help="seconds between memory samples"
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep the run directories under this folder"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cases one after another, print the tables, write the JSON; 0 on success."""
    args = parse_args(MODULE, "Wall time and peak memory at 10-100 sites.", argv, _add_arguments)
    sites = tuple(args.sites) if args.sites else (QUICK_SITES if args.quick else FULL_SITES)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else FULL_ROUNDS)
    machine = machine_info()
    print(f"{args.command}\n{describe_machine(machine)}", flush=True)
    started = time.perf_counter()
    cases: list[dict[str, Any]] = []
    for count in sites:
        case = run_case(count, rounds, interval=args.interval, keep=args.keep)
        if count == GOAL_SITES:
            case["goal"] = goal_status(case)
        cases.append(case)
        print(
            f"  {count} sites × {rounds} rounds: {case['wall_s']:.1f} s "
            f"({case['cpu_s']:.0f} CPU s), peak "
            f"{case['peak_rss_bytes'] / GIB:.2f} GiB RSS, load {case['load_average']}",
            flush=True,
        )
    print_tables(cases)
    goal = next((c["goal"] for c in cases if "goal" in c), None)
    if goal is not None:
        print(
            f"\ngoal ({GOAL_SITES} sites ≤ {GOAL_SECONDS:g} s and ≤ {GOAL_BYTES / 1e9:g} GB): "
            f"time {'met' if goal['time_met'] else 'NOT met'}, "
            f"memory {'met' if goal['memory_met'] else 'NOT met'}"
        )
    elapsed = time.perf_counter() - started
    load_after = load_average()
    print(f"\n{len(cases)} cases in {elapsed:.1f} s; load average now {load_after}")
    payload = {
        "benchmark": "scale",
        "command": args.command,
        "quick": args.quick,
        "machine": machine,
        "settings": {
            "dataset": DATASET,
            "rounds": rounds,
            "sites": list(sites),
            "privacy": "defaults (common/defaults.toml [privacy])",
            "memory": "summed RSS and PSS of this process and all its descendants, "
            f"sampled every {args.interval:g} s",
            "goal": {"sites": GOAL_SITES, "seconds": GOAL_SECONDS, "bytes": GOAL_BYTES},
        },
        "results": cases,
        "seconds": elapsed,
        "load_average_after": load_after,
    }
    save_results(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
