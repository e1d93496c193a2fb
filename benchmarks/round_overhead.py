"""Per-round overhead of a real deployment beside the same federation in simulation (issue 6, Q2).

A deployment here is the whole product on loopback: ``fedvault provision`` (TLS, site keys),
``fedvault server start``, three ``fedvault client start`` (each a Flower SuperNode with its
own privacy ledger) and ``fedvault run``. The simulation is ``fedvault simulate`` of the
hospitals scenario: the same three-site breast-cancer federation, model and privacy
settings. Both run the same number of rounds back to back in one process.

The overhead of a round is its wall time (``rounds.jsonl``) minus the slowest site's local
training and the slowest site's evaluation (``train_seconds`` and ``eval_seconds`` in
``metrics.jsonl``, which each site times itself). Whatever remains is the framework: message
delivery, starting the ClientApp, loading the site's data, the ledger, aggregation.

It also profiles what a deployment pays per message: Flower 1.39 starts a fresh
``flwr-clientapp`` process for every message (train and evaluate), which imports Flower
and then fedvault's ClientApp, and its SuperNode, SuperExec and ServerApp poll each other
at fixed intervals. Those are measured (imports, as separate processes) or read from
Flower's source (intervals) and printed as a table of where a round's time goes.
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
from server.launch import free_port

MODULE = "benchmarks.round_overhead"
SITES = ("hospital-a", "hospital-b", "hospital-c")
GOAL_SECONDS = 1.0
EPSILON = "1.0"
#: What a fresh ClientApp process imports before it can answer a message, cumulatively:
#: Flower's own entry point; fedvault's ClientApp (all an evaluation needs); what training
#: adds (Opacus, the ledger, DP training); and torch._dynamo, which torch imports the first
#: time a process builds an optimizer.
STARTUP_IMPORTS = {
    "flwr-clientapp (Flower)": "import flwr.supernode.cli.flwr_clientapp",
    "+ client.app (evaluate path)": "import flwr.supernode.cli.flwr_clientapp, client.app",
    "+ Opacus, ledger, DP training (train path)": (
        "import flwr.supernode.cli.flwr_clientapp, client.app, common.site_privacy, common.training"
    ),
    "+ torch._dynamo (first optimizer)": (
        "import flwr.supernode.cli.flwr_clientapp, client.app, common.site_privacy, "
        "common.training, torch._dynamo"
    ),
}


def _env() -> dict[str, str]:
    return {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}


def _fedvault(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedvault", *args]


@contextmanager
def _background(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A long-running fedvault command, stopped with SIGTERM (its own clean shutdown)."""
    with log.open("wb") as handle:
        proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=_env())
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


def _site_csvs(folder: Path) -> list[Path]:
    """breast-cancer split into one CSV per site, as real sites would hold it."""
    data = load_breast_cancer()
    names = [f"f{i}" for i in range(data.data.shape[1])]
    order = np.random.default_rng(0).permutation(len(data.target))
    paths = []
    for index, rows in enumerate(np.array_split(order, len(SITES))):
        path = folder / f"site{index}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([*names, "diagnosis"])
            writer.writerows([*data.data[row], int(data.target[row])] for row in rows)
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


def deployment(folder: Path, rounds: int) -> dict[str, Any]:
    """Provision, start a coordinator and three sites, run ``rounds``; the run's records."""
    port = free_port()
    kit = folder / "federation"
    _checked(
        _fedvault("provision", "--name", "bench", "--server-address", f"127.0.0.1:{port}",
                  "--sites", ",".join(SITES), "--out", str(kit)),
        timeout=120,
    )  # fmt: skip
    csvs = _site_csvs(folder)
    server_log = folder / "server.log"
    with _background(
        _fedvault("server", "start", "--kit", str(kit / "server"), "--listen", f"127.0.0.1:{port}"),
        server_log,
    ) as server:
        _wait_for(server_log, r"^ready:", server, timeout=180)
        with _sites(kit, csvs, folder):
            run_dir = folder / "deployment-run"
            wall = _checked(
                _fedvault("run", "--kit", str(kit / "server"), "--rounds", str(rounds),
                          "--epsilon", EPSILON, "--out", str(run_dir)),
                timeout=300 + 120 * rounds,
            )  # fmt: skip
    return _records("deployment", run_dir, wall)


@contextmanager
def _sites(kit: Path, csvs: Sequence[Path], folder: Path) -> Iterator[None]:
    with ExitStack() as stack:
        for site, data in zip(SITES, csvs, strict=True):
            log = folder / f"{site}.log"
            proc = stack.enter_context(_background(_site_command(kit, site, data), log))
            _wait_for(log, r"fedvault client site", proc, timeout=180)
        yield


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


def _records(mode: str, run_dir: Path, wall: float) -> dict[str, Any]:
    """Per round: wall time, the slowest site's training and evaluation, the overhead."""
    metrics = _jsonl(run_dir / "metrics.jsonl")
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
    return {"mode": mode, "command_seconds": round(wall, 2), "rounds": rounds}


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
         "seconds": 3.0, "configurable": "no (hard-coded time.sleep(3))"},
        {"where": "SuperExec: poll for a task to launch (run_superexec.py)",
         "seconds": 1.0, "configurable": "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"},
        {"where": "SuperNode: wait for the ClientApp's reply (start_client_internal.py)",
         "seconds": 0.5, "configurable": "no"},
        {"where": "ServerApp: HttpGrid.send_and_receive reply poll (http_grid.py)",
         "seconds": 3.0, "configurable": "no; fedvault's server polls itself"},
    ]  # fmt: skip


def summarize(record: dict[str, Any]) -> dict[str, Any]:
    rounds = record["rounds"]

    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in rounds), 3) if rounds else float("nan")

    return {
        "mode": record["mode"],
        "rounds": len(rounds),
        "round_seconds": med("round_seconds"),
        "slowest_train_seconds": med("slowest_train_seconds"),
        "slowest_eval_seconds": med("slowest_eval_seconds"),
        "overhead_seconds": med("overhead_seconds"),
        "final_accuracy": rounds[-1]["accuracy"] if rounds else None,
        "final_epsilon": rounds[-1]["epsilon"] if rounds else None,
    }


def _add_keep(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep the runs and logs in this new folder"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(
        MODULE,
        "Per-round overhead of a 3-site TLS deployment on loopback beside the same simulation.",
        argv,
        _add_keep,
    )
    rounds = 1 if args.quick else 4
    info = machine_info()
    print(describe_machine(info))
    with tempfile.TemporaryDirectory(prefix="fedvault-bench-") as tmp:
        folder = Path(tmp)
        if args.keep is not None:
            args.keep.mkdir(parents=True)
            folder = args.keep
        print(f"deployment: 3 sites over TLS on loopback, {rounds} round(s) ...", flush=True)
        deployed = deployment(folder, rounds)
        print(f"simulation: the same federation, {rounds} round(s) ...", flush=True)
        simulated = simulation(folder, rounds)
    startup = startup_profile(1 if args.quick else 3)
    summaries = [summarize(deployed), summarize(simulated)]
    dep, sim = summaries
    ratio = dep["overhead_seconds"] / sim["overhead_seconds"] if sim["overhead_seconds"] else None
    print_table(
        f"Per-round overhead (median of {rounds} round(s); goal ≤ {GOAL_SECONDS:g} s)",
        ["mode", "round s", "slowest train s", "slowest eval s", "overhead s", "goal"],
        [
            [s["mode"], s["round_seconds"], s["slowest_train_seconds"],
             s["slowest_eval_seconds"], s["overhead_seconds"],
             "met" if s["overhead_seconds"] <= GOAL_SECONDS else "not met"]
            for s in summaries
        ],
    )  # fmt: skip
    if ratio is not None:
        print(f"deployment overhead / simulation overhead: {ratio:.1f}×")
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
        "runs": [deployed, simulated],
        "startup_imports": startup,
        "flower_intervals": _flower_intervals(),
    }
    save_results(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
