"""End to end wall time: `fedvault simulate` beside Flower's own ``examples/opacus`` (issue 13).

Both sides run the same task on Flower's Simulation Engine: 3 breast-cancer sites, the
logistic model, DP-SGD with the same noise multiplier σ, the same number of rounds.

- **fedvault**: ``fedvault simulate --rounds R --noise-multiplier σ --out DIR`` (the
  shipped ``hospitals`` scenario), the whole command, from spawning it to its exit.
- **example**: the offline copy of Flower's ``examples/opacus`` in
  ``benchmarks/flower_opacus/`` (what was changed is written at the top of each file and in
  its README), run as that example's README runs it, ``flwr run .`` on the Simulation
  Engine, here against a local SuperLink started exactly as ``fedvault simulate`` starts its
  own (simulations/runner.py): ``flower-superlink --insecure --simulation --host 127.0.0.1
  --port P --disable-runtime-dependency-installation``, its own FLWR_HOME, the same quiet
  environment (fedvault.runtime.processes.QUIET_ENV), and ``flwr run APP CONNECTION --run-config
  "num-server-rounds=R noise-multiplier=σ" --federation-config "num-supernodes=3
  client-resources-num-cpus=1" --stream``. Timed from starting the SuperLink to having
  stopped it.

Runs are interleaved in pairs, the order alternating (A B, B A, A B, …) so that a load
change on the machine falls on both sides. Each run's stdout lines are timestamped as they
arrive, which gives where its time went: start-up until the first round begins, each round,
and the end. The import time of each side's command-line entry point is measured apart, in
fresh interpreters.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    describe_machine,
    load_average,
    machine_info,
    median,
    parse_args,
    print_table,
    save_results,
)
from fedvault.runtime.processes import QUIET_ENV, flower_bin, free_port

MODULE = "benchmarks.vs_flower_opacus"
EXAMPLE_DIR = Path(__file__).resolve().parent / "flower_opacus"
#: The upstream commit the example was copied from (adap/flower, examples/opacus).
EXAMPLE_COMMIT = "fdef7afb1dca3030553be302366cfd285ed6632c"
SITES = 3
NOISE_MULTIPLIER = 2.285
ROUNDS, QUICK_ROUNDS = 5, 1
PAIRS, QUICK_PAIRS = 3, 1
RUN_TIMEOUT = 600.0
SIDES = ("fedvault", "example")
#: Each command-line entry point's import, timed in a fresh interpreter.
CLI_IMPORTS = {
    "fedvault: CLI": "import fedvault.cli.app",
    # what `fedvault simulate` imports before its first line (its data check) ...
    "fedvault: + data check": (
        "import fedvault.cli.app, fedvault.common.data, fedvault.common.partition"
    ),
    # ... and before it starts its SuperLink
    "fedvault: + fedvault.simulations.runner": (
        "import fedvault.cli.app, fedvault.common.data, fedvault.common.partition, "
        "fedvault.simulations.runner"
    ),
    "example: flwr CLI": "import flwr.cli.app",  # the `flwr` command (`flwr run`)
}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _env(flwr_home: Path | None = None) -> dict[str, str]:
    env = {**os.environ, **QUIET_ENV, "NO_COLOR": "1", "COLUMNS": "200"}
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def _timed_lines(
    args: list[str], env: dict[str, str], started: float, timeout: float
) -> tuple[int, list[tuple[float, str]]]:
    """Run ``args`` to its exit; its exit code and each output line with its arrival time.

    Times are seconds since ``started`` (a ``time.perf_counter()`` value).
    """
    lines: list[tuple[float, str]] = []
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
        errors="replace", start_new_session=True,
    )  # fmt: skip
    deadline = started + timeout
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.perf_counter() - started, ANSI.sub("", line.rstrip("\n"))))
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{args!r} ran past {timeout:.0f} s")
        return proc.wait(timeout=max(1.0, deadline - time.perf_counter())), lines
    finally:
        if proc.poll() is None:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    """SIGTERM ``proc``'s session (it was started in its own), SIGKILL what remains."""
    from benchmarks.round_overhead import process_tree

    tree = process_tree(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    for pid in tree:  # whatever outlived the SIGTERM, by the pids this tree had
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=10)


def _first(lines: list[tuple[float, str]], pattern: str) -> float | None:
    found = [t for t, text in lines if re.search(pattern, text)]
    return round(found[0], 3) if found else None


def _phases(marks: list[float | None], end: float) -> dict[str, Any]:
    """Start-up (until round 1 begins), each round, and the end (last round to exit)."""
    if any(mark is None for mark in marks):
        return {"startup_seconds": None, "round_seconds": [], "end_seconds": None}
    times = [float(mark) for mark in marks if mark is not None]
    return {
        "startup_seconds": round(times[0], 3),
        "round_seconds": [round(b - a, 3) for a, b in itertools.pairwise(times)],
        "end_seconds": round(end - times[-1], 3),
    }


#: SuperLink log lines (uvicorn, UTC timestamps) that mark a run's steps, on both sides.
TIMELINE = {
    "superlink_up": r"Uvicorn running on",
    "run_submitted": r"POST /v1/control/start-run",
    "simulation_started": r"POST /v1/runtime/pull-task-input",  # the SuperExec took the run
    "simulation_done": r"POST /v1/runtime/push-task-output",
}
STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z ")


def timeline(log: Path, spawned: float) -> dict[str, float | None]:
    """Seconds from ``spawned`` (a ``time.time()``) to each TIMELINE step in a SuperLink log."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    marks: dict[str, float | None] = {}
    for step, pattern in TIMELINE.items():
        marks[step] = None
        for line in ANSI.sub("", text).splitlines():
            stamp = STAMP.match(line)
            if stamp and re.search(pattern, line):
                when = datetime.datetime.fromisoformat(stamp.group(1) + "+00:00").timestamp()
                marks[step] = round(when - spawned, 3)
                break
    return marks


def run_fedvault(folder: Path, rounds: int, sigma: float) -> dict[str, Any]:
    """One ``fedvault simulate`` run, timed from spawning the command to its exit."""
    folder.mkdir(parents=True)
    out = folder / "fedvault-run"
    args = [sys.executable, "-m", "fedvault", "simulate", "--rounds", str(rounds),
            "--noise-multiplier", f"{sigma:g}", "--out", str(out)]  # fmt: skip
    spawned, started = time.time(), time.perf_counter()
    code, lines = _timed_lines(args, _env(), started, RUN_TIMEOUT)
    wall = time.perf_counter() - started
    if code != 0 or not (out / "summary.json").is_file():
        tail = "\n".join(text for _, text in lines[-40:])
        raise RuntimeError(f"fedvault simulate exited with {code}:\n{tail}")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    # round k begins when round k-1's line is printed (round 0: the initial evaluation)
    marks = [_first(lines, rf"^round {k}/{rounds}\b") for k in range(1, rounds + 1)]
    round0 = _first(lines, r"^initial model accuracy")
    profile = _phases([round0, *marks], wall)
    return {
        "side": "fedvault",
        "wall_seconds": round(wall, 3),
        "first_output_seconds": round(lines[0][0], 3) if lines else None,
        "timeline": timeline(out / "flower.log", spawned),
        "round0_done_seconds": round0,
        **profile,
        "round0_eval_seconds": next((r["round_seconds"] for r in rows if r["round"] == 0), None),
        "serverapp_round_seconds": [r["round_seconds"] for r in rows if r["round"] > 0],
        "rounds": sum(1 for r in rows if r["round"] > 0),
        "final_accuracy": summary.get("final_accuracy"),
        "max_epsilon": summary.get("epsilon"),
    }


def _example_accuracies(lines: list[tuple[float, str]]) -> list[float]:
    """The per-round federated accuracies from the ServerApp's printed Result."""
    text = "\n".join(t for _, t in lines)
    block = text.rsplit("Aggregated ClientApp-side Evaluate Metrics:", 1)[-1]
    block = block.split("ServerApp-side Evaluate Metrics:", 1)[0]
    return [float(v) for v in re.findall(r"\d+: \{'accuracy': '([0-9.e+-]+)'", block)]


def run_example(folder: Path, rounds: int, sigma: float) -> dict[str, Any]:
    """One run of the example: its SuperLink started, ``flwr run --stream``, SuperLink stopped."""
    home = folder / "example-flwr-home"
    home.mkdir(parents=True)
    port = free_port()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n[superlink.local]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n',
        encoding="utf-8",
    )
    env = _env(home)
    spawned, started = time.time(), time.perf_counter()
    with (folder / "example-superlink.log").open("wb") as log:
        superlink = subprocess.Popen(
            [flower_bin("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
             "--port", str(port), "--disable-runtime-dependency-installation"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_ready(port, superlink)
        ready = time.perf_counter() - started
        code, lines = _timed_lines(
            [flower_bin("flwr"), "run", str(EXAMPLE_DIR), "local",
             "--run-config", f"num-server-rounds={rounds} noise-multiplier={sigma:g}",
             "--federation-config", f"num-supernodes={SITES} client-resources-num-cpus=1",
             "--stream"],
            env, started, RUN_TIMEOUT,
        )  # fmt: skip
    finally:
        _stop_group(superlink)
    wall = time.perf_counter() - started
    (folder / "example-run.log").write_text("\n".join(t for _, t in lines) + "\n")
    finished = _first(lines, r"Strategy execution finished")
    accuracies = _example_accuracies(lines)
    if code != 0 or finished is None or len(accuracies) != rounds:
        tail = "\n".join(text for _, text in lines[-40:])
        raise RuntimeError(f"the example's flwr run exited with {code}:\n{tail}")
    marks = [_first(lines, rf"\[ROUND {k}/{rounds}\]") for k in range(1, rounds + 1)]
    profile = _phases([*marks, finished], wall)
    return {
        "side": "example",
        "wall_seconds": round(wall, 3),
        "superlink_ready_seconds": round(ready, 3),
        "timeline": timeline(folder / "example-superlink.log", spawned),
        "run_started_seconds": _first(lines, r"Successfully started run"),
        **profile,
        "rounds": len(accuracies),
        "final_accuracy": accuracies[-1],
        "max_epsilon": _example_max_epsilon(lines),
    }


def _example_max_epsilon(lines: list[tuple[float, str]]) -> float | None:
    """The last round's max ε the example reports (its ε is per round: a fresh engine each)."""
    values = re.findall(r"'max_epsilon': '([0-9.e+-]+)'", "\n".join(t for _, t in lines))
    return float(values[-1]) if values else None


def _wait_ready(port: int, proc: subprocess.Popen[Any], timeout: float = 120.0) -> None:
    """Wait for the SuperLink's /health, as simulations/runner.py does (wait_http_ready)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"flower-superlink did not become ready within {timeout:.0f} s")


def pair_orders(pairs: int) -> list[tuple[str, str]]:
    """The interleaving: A B, B A, A B, … (A = fedvault)."""
    return [SIDES if index % 2 == 0 else SIDES[::-1] for index in range(pairs)]


def cli_imports(repeats: int) -> list[dict[str, Any]]:
    """Median wall time of each side's command-line import, each in a fresh interpreter."""
    results = []
    for what, statement in CLI_IMPORTS.items():
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", statement], check=True, env=_env())
            times.append(time.perf_counter() - started)
        results.append({"what": what, "import": statement,
                        "seconds": round(statistics.median(times), 3)})  # fmt: skip
    return results


def summarize(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median wall time of each side over the pairs, their ratio, and the median profile."""

    def med(values: Sequence[float | None]) -> float | None:
        present = [float(v) for v in values if v is not None]
        return round(median(present), 3) if present else None

    def profile(side: str) -> dict[str, Any]:
        runs = [p[side] for p in pairs]
        return {
            **{step: med([r["timeline"][step] for r in runs]) for step in TIMELINE},
            "startup_seconds": med([r["startup_seconds"] for r in runs]),
            "first_round_seconds": med([r["round_seconds"][0] for r in runs if r["round_seconds"]]),
            "later_rounds_median_seconds": med([s for r in runs for s in r["round_seconds"][1:]]),
            "end_seconds": med([r["end_seconds"] for r in runs]),
        }

    fedvault = med([p["fedvault"]["wall_seconds"] for p in pairs])
    example = med([p["example"]["wall_seconds"] for p in pairs])
    ratios = [p["fedvault"]["wall_seconds"] / p["example"]["wall_seconds"] for p in pairs]
    return {
        "fedvault_median_seconds": fedvault,
        "example_median_seconds": example,
        "ratio_of_medians": round(fedvault / example, 3) if fedvault and example else None,
        "median_pair_ratio": round(median(ratios), 3),
        "fedvault_at_or_below": bool(fedvault is not None and example and fedvault <= example),
        "profile": {side: profile(side) for side in SIDES},
    }


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pairs",
        type=int,
        default=None,
        help=f"interleaved pairs (default {PAIRS}; --quick {QUICK_PAIRS})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"federated rounds (default {ROUNDS}; --quick {QUICK_ROUNDS})",
    )
    parser.add_argument(
        "--noise-multiplier",
        type=float,
        default=NOISE_MULTIPLIER,
        help=f"DP-SGD noise multiplier σ of both sides (default {NOISE_MULTIPLIER})",
    )
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the runs and logs in this new folder")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(
        MODULE,
        "fedvault simulate beside Flower's examples/opacus on the same task, interleaved.",
        argv,
        _add_arguments,
    )
    pairs = args.pairs or (QUICK_PAIRS if args.quick else PAIRS)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    sigma = float(args.noise_multiplier)
    info = machine_info()
    print(describe_machine(info))
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedvault-vs-opacus-") as tmp:
        folder = Path(tmp)
        if args.keep is not None:
            args.keep.mkdir(parents=True)
            folder = args.keep
        runners = {"fedvault": run_fedvault, "example": run_example}
        for index, order in enumerate(pair_orders(pairs)):
            pair: dict[str, Any] = {"pair": index + 1, "order": list(order)}
            for side in order:
                print(f"pair {index + 1}/{pairs}: {side}, {rounds} round(s), σ = {sigma:g} ...",
                      flush=True)  # fmt: skip
                load = load_average()
                pair[side] = {**runners[side](folder / f"pair{index + 1}-{side}", rounds, sigma),
                              "load_average_before": load}  # fmt: skip
                print(f"  {pair[side]['wall_seconds']:.1f} s", flush=True)
            results.append(pair)
    imports = cli_imports(1 if args.quick else 3)
    summary = summarize(results)
    print_table(
        f"Wall time per run: {SITES} breast-cancer sites, logistic, {rounds} round(s), "
        f"σ = {sigma:g}",
        ["pair", "order", "fedvault s", "example s", "fedvault / example", "1-min load before"],
        [
            [p["pair"], " ".join(p["order"]), p["fedvault"]["wall_seconds"],
             p["example"]["wall_seconds"],
             round(p["fedvault"]["wall_seconds"] / p["example"]["wall_seconds"], 2),
             " / ".join(f"{p[s]['load_average_before'][0]:g}" for s in p["order"])]
            for p in results
        ],
    )  # fmt: skip
    steps = [*TIMELINE, "startup_seconds", "first_round_seconds",
             "later_rounds_median_seconds", "end_seconds"]  # fmt: skip
    print_table(
        "Where the time goes (median over the pairs; seconds since the command started, "
        "then durations)",
        ["side", "wall s", *steps],
        [
            [side, summary[f"{side}_median_seconds"],
             *(summary["profile"][side][step] for step in steps)]
            for side in SIDES
        ],
    )  # fmt: skip
    print_table(
        "Imports before each side starts its SuperLink, each in a fresh interpreter (median)",
        ["what", "import", "seconds"],
        [[row["what"], row["import"], row["seconds"]] for row in imports],
    )
    verdict = "at or below" if summary["fedvault_at_or_below"] else "ABOVE"
    print(f"\nfedvault median {summary['fedvault_median_seconds']} s, example median "
          f"{summary['example_median_seconds']} s, ratio {summary['ratio_of_medians']}: "
          f"fedvault is {verdict} the example", flush=True)  # fmt: skip
    payload = {
        "benchmark": "vs_flower_opacus",
        "quick": args.quick,
        "command": args.command,
        "machine": info,
        "load_average_end": load_average(),
        "example": {
            "dir": str(EXAMPLE_DIR.relative_to(EXAMPLE_DIR.parents[1])),
            "upstream": f"adap/flower examples/opacus @ {EXAMPLE_COMMIT}",
        },
        "settings": {
            "sites": SITES,
            "rounds": rounds,
            "noise_multiplier": sigma,
            "pairs": pairs,
            "model": "logistic",
            "dataset": "breast-cancer",
        },
        "pairs": results,
        "summary": summary,
        "cli_imports": imports,
    }
    save_results(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
