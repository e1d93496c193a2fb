"""Per-round overhead of a real deployment beside the same federation in simulation (issue 6, Q2).

A deployment here is the whole product on loopback: ``fedvault provision`` (TLS, site keys),
``fedvault server start``, three ``fedvault client start`` (each a Flower SuperNode with its
own privacy ledger) and ``fedvault run``. The simulation is ``fedvault simulate`` of the
hospitals scenario: the same three-site breast-cancer federation, model and privacy
settings. Both run the same number of rounds back to back in one process.

The deployment runs once per data scale (``--data-scale``, by default 1, 10 and 100; 1 with
``--quick``): each site's CSV holds its breast-cancer rows repeated that many times, every
copy after the first with small seeded noise (1% of each feature's spread) so no two rows
are equal. Each scale is a fresh federation (its own kit, coordinator and sites, in folder
``x<scale>``); the simulation runs once, on the scenario's own data (1×).

The overhead of a round is its wall time (``rounds.jsonl``) minus the slowest site's local
training and the slowest site's evaluation (``train_seconds`` and ``eval_seconds`` in
``metrics.jsonl``, which each site times itself). Whatever remains is the framework: message
delivery, starting the ClientApp, loading the site's data, the ledger, aggregation.

It also profiles what a deployment pays per message: Flower 1.39 starts a fresh
``flwr-clientapp`` process for every message (train and evaluate), which imports Flower
and then fedvault's ClientApp, and its SuperNode, SuperExec and ServerApp poll each other
at fixed intervals. Those are measured (imports, as separate processes) or read from
Flower's source (intervals) and printed as a table of where a round's time goes.

And what an idle site holds in memory: once its sites are connected, before the run and
again after it, the whole process tree of each ``fedvault client start`` (its SuperNode,
SuperExec and whatever they keep running), summed: resident set (``VmRSS`` in
``/proc/PID/status``) and, where ``/proc/PID/smaps_rollup`` is readable, proportional set
size (PSS), which counts a page shared by n processes (forked workers) as 1/n in each.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_breast_cancer

from benchmarks.common import (
    describe_machine,
    load_average,
    machine_info,
    parse_args,
    print_table,
    save_results,
)
from fedvault.client.supernode import ACTIVE_POLL_S, ACTIVE_WINDOW_S, IDLE_POLL_S, REPLY_POLL_S
from fedvault.runtime.processes import free_port
from fedvault.server.grid import REPLY_POLL_INTERVAL

MODULE = "benchmarks.round_overhead"
SITES = ("hospital-a", "hospital-b", "hospital-c")
GOAL_SECONDS = 1.0
EPSILON = "1.0"
#: Data scales measured by default, and with ``--quick``.
DATA_SCALES = (1, 10, 100)
QUICK_DATA_SCALES = (1,)
#: Noise added to every repeated row: this fraction of the feature's standard deviation.
ROW_NOISE = 0.01
#: A process tree's memory counts as settled when two samples this far apart agree.
SETTLE_SECONDS = 1.0
SETTLE_TIMEOUT = 20.0
#: What a fresh ClientApp process imports before it can answer a message, cumulatively:
#: Flower's own entry point; fedvault's ClientApp (all an evaluation needs); what training
#: adds (Opacus, the ledger, DP training); and torch._dynamo, which torch imports the first
#: time a process builds an optimizer.
STARTUP_IMPORTS = {
    "flwr-clientapp (Flower)": "import flwr.supernode.cli.flwr_clientapp",
    "+ fedvault.client.app (evaluate path)": (
        "import flwr.supernode.cli.flwr_clientapp, fedvault.client.app"
    ),
    "+ Opacus, ledger, DP training (train path)": (
        "import flwr.supernode.cli.flwr_clientapp, fedvault.client.app, "
        "fedvault.common.site_privacy, fedvault.common.training"
    ),
    "+ torch._dynamo (first optimizer)": (
        "import flwr.supernode.cli.flwr_clientapp, fedvault.client.app, "
        "fedvault.common.site_privacy, fedvault.common.training, torch._dynamo"
    ),
}


def _env() -> dict[str, str]:
    return {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}


def _fedvault(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedvault", *args]


@contextmanager
def _background(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A long-running fedvault command, stopped with SIGTERM (its own clean shutdown); if the
    benchmark itself is killed, its watchdog stops the command's whole tree."""
    from fedvault.runtime.watchdog import guard

    with log.open("wb") as handle:
        proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=_env())
    guard(proc.pid)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if re.search(pattern, text, re.MULTILINE):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{text[-2000:]}")
        time.sleep(0.3)
    raise RuntimeError(f"timed out waiting for {pattern!r} in {log}")


def scaled_rows(
    features: np.ndarray, labels: np.ndarray, scale: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``features`` repeated ``scale`` times, copies after the first with seeded noise.

    The noise is normal with ``ROW_NOISE`` times each feature's standard deviation, so the
    copies are distinct rows with the same distribution; labels are repeated as they are.
    """
    if scale < 1:
        raise ValueError(f"data scale must be >= 1, got {scale}")
    copies = np.tile(features, (scale, 1))
    spread = features.std(axis=0) * ROW_NOISE
    noise = rng.normal(0.0, 1.0, size=(len(copies) - len(features), features.shape[1]))
    copies[len(features) :] += noise * spread
    return copies, np.tile(labels, scale)


def _site_csvs(folder: Path, scale: int = 1) -> list[Path]:
    """breast-cancer split into one CSV per site, as real sites would hold it, ``scale``×."""
    data = load_breast_cancer()
    names = [f"f{i}" for i in range(data.data.shape[1])]
    order = np.random.default_rng(0).permutation(len(data.target))
    rng = np.random.default_rng(scale)
    paths = []
    for index, rows in enumerate(np.array_split(order, len(SITES))):
        features, labels = scaled_rows(data.data[rows], data.target[rows], scale, rng)
        path = folder / f"site{index}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([*names, "diagnosis"])
            writer.writerows(
                [*(repr(float(x)) for x in row), int(label)]
                for row, label in zip(features, labels, strict=True)
            )
        paths.append(path)
    return paths


def _checked(args: list[str], timeout: float) -> float:
    """Run a fedvault command to completion; its wall time in seconds."""
    started = time.perf_counter()
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=_env(), check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{args!r} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def deployment(folder: Path, rounds: int, scale: int = 1) -> dict[str, Any]:
    """Provision, start a coordinator and three sites, run ``rounds``; the run's records.

    The sites hold their CSVs at ``scale``× (:func:`scaled_rows`); the records also hold
    each site's process-tree memory once connected (before the run) and after the run.
    """
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    kit = folder / "federation"
    _checked(
        _fedvault("provision", "--name", "bench", "--server-address", f"127.0.0.1:{port}",
                  "--sites", ",".join(SITES), "--out", str(kit)),
        timeout=120,
    )  # fmt: skip
    csvs = _site_csvs(folder, scale)
    server_log = folder / "server.log"
    with _background(
        _fedvault("server", "start", "--kit", str(kit / "server"), "--listen", f"127.0.0.1:{port}"),
        server_log,
    ) as server:
        _wait_for(server_log, r"^ready:", server, timeout=180)
        with _sites(kit, csvs, folder) as sites:
            memory = site_memory(sites, "before run")
            run_dir = folder / "deployment-run"
            wall = _checked(
                _fedvault("run", "--kit", str(kit / "server"), "--rounds", str(rounds),
                          "--epsilon", EPSILON, "--out", str(run_dir)),
                timeout=300 + 120 * rounds * max(1, scale // 10),
            )  # fmt: skip
            memory += site_memory(sites, "after run")
    record = _records("deployment", run_dir, wall, scale)
    record["site_memory"] = [{"data_scale": scale, **row} for row in memory]
    return record


@contextmanager
def _sites(
    kit: Path, csvs: Sequence[Path], folder: Path
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Start every site and wait until each is connected; the running `fedvault client start`s."""
    with ExitStack() as stack:
        procs = {}
        for site, data in zip(SITES, csvs, strict=True):
            log = folder / f"{site}.log"
            proc = stack.enter_context(_background(_site_command(kit, site, data), log))
            _wait_for(log, r"fedvault client site", proc, timeout=180)
            procs[site] = proc
        yield procs


def _site_command(kit: Path, site: str, data: Path) -> list[str]:
    # Three sites share this machine: one thread each, as a simulated site gets one CPU.
    return _fedvault("client", "start", "--kit", str(kit / "sites" / site), "--data", str(data),
                     "--label-column", "diagnosis", "--device", "cpu",
                     "--threads", "1")  # fmt: skip


def simulation(folder: Path, rounds: int) -> dict[str, Any]:
    """``fedvault simulate hospitals`` for the same number of rounds; the run's records."""
    run_dir = folder / "simulation-run"
    wall = _checked(
        _fedvault("simulate", "hospitals", "--rounds", str(rounds), "--epsilon", EPSILON,
                  "--out", str(run_dir)),
        timeout=300 + 120 * rounds,
    )  # fmt: skip
    return _records("simulation", run_dir, wall)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _records(mode: str, run_dir: Path, wall: float, scale: int = 1) -> dict[str, Any]:
    """Per round: wall time, the slowest site's training and evaluation, the overhead.

    Also each site's rows (training + test) as the sites reported them in round 1.
    """
    metrics = _jsonl(run_dir / "metrics.jsonl")
    site_rows = {
        m["site"]: int(m["num_examples"]) + int(m["test_examples"])
        for m in metrics
        if m["round"] == 1
    }
    rounds = []
    for row in _jsonl(run_dir / "rounds.jsonl"):
        if row["round"] == 0:  # the initial model's evaluation, schema query and start-up
            continue
        sites = [m for m in metrics if m["round"] == row["round"]]
        train = max(float(m["train_seconds"] or 0.0) for m in sites)
        evaluate = max(float(m["eval_seconds"] or 0.0) for m in sites)
        rounds.append(
            {
                "round": row["round"],
                "sites": len(sites),
                "round_seconds": row["round_seconds"],
                "slowest_train_seconds": round(train, 4),
                "slowest_eval_seconds": round(evaluate, 4),
                "overhead_seconds": round(row["round_seconds"] - train - evaluate, 3),
                "accuracy": row["accuracy"],
                "epsilon": row["epsilon"],
            }
        )
    return {
        "mode": mode,
        "data_scale": scale,
        "site_rows": site_rows,
        "command_seconds": round(wall, 2),
        "rounds": rounds,
    }


# --- an idle site's memory -----------------------------------------------------------------


def _parents() -> dict[int, int]:
    """Every process's parent, from /proc/PID/stat."""
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text(encoding="utf-8", errors="replace")
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now, root first."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        tree.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return tree


def _field(path: Path, field: str) -> str:
    """The value of the ``field:`` line of a /proc file ("" where it has no such line)."""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(f"{field}:"):
            return line.split(":", 1)[1].strip()
    return ""


def _kib(path: Path, field: str) -> int:
    """A ``field:    123 kB`` line of a /proc file, in KiB (0 where there is no such line)."""
    value = _field(path, field)
    return int(value.split()[0]) if value else 0


def _command(pid: int) -> str:
    words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    text = " ".join([Path(words[0].decode(errors="replace")).name,
                     *(w.decode(errors="replace") for w in words[1:] if w)])  # fmt: skip
    return text if len(text) <= 80 else text[:77] + "..."


def tree_memory(root: int) -> dict[str, Any]:
    """RSS (and PSS where readable) of ``root``'s process tree: summed, and per process.

    ``pss_mib`` is None where any live process's ``smaps_rollup`` cannot be read. Zombies
    (exited, not yet reaped: they hold no memory) are counted apart, in ``zombies``.
    """
    processes: list[dict[str, Any]] = []
    rss_total, pss_total, pss_readable, zombies = 0, 0, True, 0
    for pid in process_tree(root):
        status = Path(f"/proc/{pid}/status")
        try:
            if _field(status, "State").startswith("Z"):
                zombies += 1
                continue
            rss = _kib(status, "VmRSS")
            command = _command(pid)
        except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
            continue
        try:
            pss: int | None = _kib(Path(f"/proc/{pid}/smaps_rollup"), "Pss")
        except OSError:  # not readable (another user's, hardened /proc, old kernel) or gone
            if not Path(f"/proc/{pid}").exists():
                continue
            pss = None
        rss_total += rss
        if pss is None:
            pss_readable = False
        else:
            pss_total += pss
        processes.append({"pid": pid, "command": command, "rss_kib": rss, "pss_kib": pss})
    return {
        "processes": len(processes),
        "rss_mib": round(rss_total / 1024, 1),
        "pss_mib": round(pss_total / 1024, 1) if pss_readable else None,
        "zombies": zombies,
        "tree": processes,
    }


def settled_memory(root: int) -> dict[str, Any]:
    """:func:`tree_memory` once the tree stops changing (same processes, RSS within 2%)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    previous = tree_memory(root)
    while True:
        time.sleep(SETTLE_SECONDS)
        sample = tree_memory(root)
        same = [p["pid"] for p in sample["tree"]] == [p["pid"] for p in previous["tree"]]
        steady = abs(sample["rss_mib"] - previous["rss_mib"]) <= 0.02 * previous["rss_mib"]
        if (same and steady) or time.monotonic() > deadline:
            return {**sample, "settled": same and steady}
        previous = sample


def site_memory(sites: dict[str, subprocess.Popen[bytes]], when: str) -> list[dict[str, Any]]:
    """Each running site's process-tree memory, once settled."""
    return [
        {"site": site, "when": when, **settled_memory(proc.pid)} for site, proc in sites.items()
    ]


def startup_profile(repeats: int) -> list[dict[str, Any]]:
    """Wall time of the imports a fresh ClientApp process does, each in a new interpreter."""
    results = []
    for label, statement in STARTUP_IMPORTS.items():
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", statement], check=True, env=_env())
            times.append(time.perf_counter() - started)
        results.append({"what": label, "seconds": round(statistics.median(times), 3)})
    return results


def _flower_intervals() -> list[dict[str, Any]]:
    """Flower 1.39's fixed waits on a message's path (read from its source, not measured)."""
    return [
        {"where": "SuperNode: idle pull of the SuperLink (start_client_internal.py)",
         "seconds": 3.0, "configurable": "no (hard-coded time.sleep(3)); "
         f"client/supernode.py makes it {ACTIVE_POLL_S:g} s for {ACTIVE_WINDOW_S:g} s "
         f"after a message, else {IDLE_POLL_S:g} s"},
        {"where": "SuperExec: poll for a task to launch (run_superexec.py)",
         "seconds": 1.0, "configurable": "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"},
        {"where": "SuperNode: wait for the ClientApp's reply (start_client_internal.py)",
         "seconds": 0.5, "configurable": f"no; client/supernode.py makes it {REPLY_POLL_S:g} s"},
        {"where": "ServerApp: HttpGrid.send_and_receive reply poll (http_grid.py)",
         "seconds": 3.0, "configurable": "no; fedvault's server polls itself "
         f"(server/grid.py, every {REPLY_POLL_INTERVAL:g} s)"},
    ]  # fmt: skip


def summarize(record: dict[str, Any]) -> dict[str, Any]:
    rounds = record["rounds"]

    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in rounds), 3) if rounds else float("nan")

    return {
        "mode": record["mode"],
        "data_scale": record.get("data_scale", 1),
        "rows_per_site": max(record.get("site_rows", {}).values(), default=None),
        "rounds": len(rounds),
        "round_seconds": med("round_seconds"),
        "slowest_train_seconds": med("slowest_train_seconds"),
        "slowest_eval_seconds": med("slowest_eval_seconds"),
        "overhead_seconds": med("overhead_seconds"),
        "final_accuracy": rounds[-1]["accuracy"] if rounds else None,
        "final_epsilon": rounds[-1]["epsilon"] if rounds else None,
    }


def data_scales(text: str) -> tuple[int, ...]:
    """``--data-scale``: comma-separated whole factors >= 1, e.g. ``1,10,100``."""
    try:
        scales = tuple(int(word) for word in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"data scales must be whole numbers like 1,10,100, got {text!r}"
        ) from None
    if not scales or min(scales) < 1 or len(set(scales)) != len(scales):
        raise argparse.ArgumentTypeError(f"data scales must be distinct and >= 1, got {text!r}")
    return scales


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep the runs and logs in this new folder"
    )
    parser.add_argument(
        "--data-scale", type=data_scales, default=None, metavar="N[,N...]",
        help="repeat each site's rows N times, one deployment per N "
        f"(default {','.join(map(str, DATA_SCALES))}; "
        f"with --quick {','.join(map(str, QUICK_DATA_SCALES))})",
    )  # fmt: skip


def _mib(value: float | None) -> object:
    return "n/a" if value is None else value


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(
        MODULE,
        "Per-round overhead of a 3-site TLS deployment on loopback beside the same simulation.",
        argv,
        _add_arguments,
    )
    rounds = 1 if args.quick else 4
    scales = args.data_scale or (QUICK_DATA_SCALES if args.quick else DATA_SCALES)
    info = machine_info()
    print(describe_machine(info))
    with tempfile.TemporaryDirectory(prefix="fedvault-bench-") as tmp:
        folder = Path(tmp)
        if args.keep is not None:
            args.keep.mkdir(parents=True)
            folder = args.keep
        deployed = []
        for scale in scales:
            print(f"deployment: 3 sites over TLS on loopback, data {scale}×, {rounds} round(s) ...",
                  flush=True)  # fmt: skip
            deployed.append(deployment(folder / f"x{scale}", rounds, scale))
        print(f"simulation: the same federation, {rounds} round(s) ...", flush=True)
        simulated = simulation(folder, rounds)
    startup = startup_profile(1 if args.quick else 3)
    summaries = [*(summarize(run) for run in deployed), summarize(simulated)]
    sim = summaries[-1]
    for summary in summaries[:-1]:
        summary["overhead_vs_simulation"] = (
            round(summary["overhead_seconds"] / sim["overhead_seconds"], 1)
            if sim["overhead_seconds"]
            else None
        )
    ratio = summaries[0]["overhead_vs_simulation"]  # the first scale's (1× by default)
    print_table(
        f"Per-round overhead (median of {rounds} round(s); goal ≤ {GOAL_SECONDS:g} s)",
        ["mode", "data", "rows/site", "round s", "slowest train s", "slowest eval s",
         "overhead s", "× simulation", "goal"],
        [
            [s["mode"], f"{s['data_scale']}×", s["rows_per_site"], s["round_seconds"],
             s["slowest_train_seconds"], s["slowest_eval_seconds"], s["overhead_seconds"],
             s.get("overhead_vs_simulation", ""),
             "met" if s["overhead_seconds"] <= GOAL_SECONDS else "not met"]
            for s in summaries
        ],
    )  # fmt: skip
    memory = [row for run in deployed for row in run["site_memory"]]
    print_table(
        "An idle site's memory: each `fedvault client start` process tree, summed",
        ["data", "site", "when", "processes", "RSS MiB", "PSS MiB"],
        [
            [f"{m['data_scale']}×", m["site"], m["when"], m["processes"], m["rss_mib"],
             _mib(m["pss_mib"])]
            for m in memory
        ],
    )  # fmt: skip
    print_table(
        "Per message in a deployment: a fresh ClientApp process's imports (median, cumulative)",
        ["what", "seconds"],
        [[s["what"], s["seconds"]] for s in startup],
    )
    print_table(
        "Flower 1.39's fixed waits on a message's path (from its source)",
        ["where", "interval s", "configurable"],
        [[w["where"], w["seconds"], w["configurable"]] for w in _flower_intervals()],
    )
    payload = {
        "benchmark": "round_overhead",
        "quick": args.quick,
        "command": args.command,
        "machine": info,
        "load_average_end": load_average(),
        "goal_seconds": GOAL_SECONDS,
        "summaries": summaries,
        "overhead_ratio": ratio,
        "data_scales": list(scales),
        "runs": [*deployed, simulated],
        "startup_imports": startup,
        "flower_intervals": _flower_intervals(),
    }
    save_results(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
