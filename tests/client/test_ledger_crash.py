"""Integration: SIGKILL sites' ClientApp processes at random moments; no ledger under-counts.

A real deployment over TLS on loopback: a coordinator, one healthy site and six victim
sites, each victim with its own privacy ledger. A SuperNode runs every message in a task
process that the site's warm worker forks (client/worker.py; a cold ``flwr-clientapp``
launch when no worker answers); that process reserves the round in the site's ledger,
trains and replies. For half the victims a seeded-time kill takes the warm worker down with
its task, and `fedvault client start` must replace it. Round 1 runs clean; in rounds 2
and 3 a watcher SIGKILLs each victim's training process, either the moment its write-ahead
ledger entry lands (the window between the ledger write and the reply) or at a seeded
uniform time of its life.
Evaluation processes are never killed. Afterwards, for every victim: each update the
coordinator received is in the ledger with the same (sigma, q, steps), and the ledger's
epsilon is at least the epsilon those updates imply, after every trial and at the end.

Why six victims: Flower 1.39 notices a killed ClientApp only when its task heartbeat
expires (30 s after the last heartbeat with fedvault's SuperNode, client/supernode.py; 60 s
with Flower's), and a SuperNode handles one message at a time, so each victim gives one
trial per round of half a minute or more; victims die in parallel.
Set FEDVAULT_CRASH_SEED to replay a schedule of kill modes and delays.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedvault.client.worker import TASK_PROCESS_NAME
from fedvault.common.data import load_dataset
from fedvault.common.fingerprint import dataset_fingerprint
from fedvault.common.ledger import KIT_LEDGER, PrivacyLedger
from fedvault.common.privacy import PrivacyEvent, compute_epsilon
from fedvault.common.report import METRICS_FILE, ROUNDS_FILE, SUMMARY_FILE, read_jsonl
from tests.deployment import (
    fedvault_env,
    fedvault_process,
    flower_processes_of,
    provision,
    wait_for,
    write_site_csvs,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

VICTIMS = [f"victim-{i}" for i in range(1, 7)]
HEALTHY = "healthy"
ROUNDS = 3
FIRST_KILL_ROUND = 2  # round 1 runs clean: every site delivers, its training is timed
#: Above Flower's detection of a killed ClientApp (<= 30 s after its last heartbeat, plus a
#: relaunch when it dies before its task started), so a victim's round ends inside it.
ROUND_TIMEOUT_S = 120.0
NOISE_MULTIPLIER = 1.0
DELTA = 1e-5
ACCOUNTANT = "prv"
MAX_EPSILON = 50.0  # far above what the rounds spend: no round is refused
SEED_ENV = "FEDVAULT_CRASH_SEED"
CLEAN, AFTER_WRITE, UNIFORM = "clean", "after-write", "uniform"
WATCH_POLL_S = 0.05
LEDGER_POLL_S = 0.003
#: A uniform kill is due at a seeded time in [0, L): L is UNIFORM_SPAN times the life of the
#: site's training process in the clean round (start-up, ledger write, DP-SGD, reply, exit),
#: a little less so that a kill rarely comes after a faster process has already gone.
UNIFORM_SPAN = 0.9
DEFAULT_LIFETIME_S = 20.0
_RECEIVING = re.compile(r"Receiving: (\S+) message")


# --- processes ---------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, kernel start time) of ``pid``, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _process_table() -> dict[int, tuple[str, int, int]]:
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _stat(int(entry.name))
        if stat is not None:
            table[int(entry.name)] = stat
    return table


def _tree(root: int, table: dict[int, tuple[str, int, int]]) -> list[int]:
    """``root`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for pid, (state, ppid, _) in table.items():
        if state != "Z":
            children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _sent_replies(supernode_log: Path) -> int:
    """How many training replies the SuperNode has sent on to the coordinator."""
    return supernode_log.read_text(errors="replace").count("Sending: train message")


def _is_clientapp(pid: int) -> bool:
    """A process running a ClientApp task: a warm worker's task process (client/worker.py
    names it), or a cold launch (`python -I -m fedvault.client.launcher`, when no worker answered).
    The site's `flwr-clientapp` dispatcher only waits for one of these: it is not one."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return comm == TASK_PROCESS_NAME or _is_cold_launch(pid)


def _is_cold_launch(pid: int) -> bool:
    """`python -I -m fedvault.client.launcher ...` itself (the dispatcher only names it)."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return words[1:4] == [b"-I", b"-m", b"fedvault.client.launcher"]


def _still_running(pid: int, started: int) -> bool:
    """The very process (same kernel start time) is alive and not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z" and stat[2] == started


def _logged_pids(*logs: Path) -> set[int]:
    """Every PID fedvault logged as started or stopped (children and descendants included)."""
    pids: set[int] = set()
    for log in logs:
        text = log.read_text(errors="replace") if log.exists() else ""
        pids.update(int(p) for p in re.findall(r"fedvault: started pid=(\d+)", text))
        for found in re.findall(r"descendants=\[([\d, ]*)\]", text):
            pids.update(int(p) for p in found.split(",") if p.strip())
    return pids


# --- the ledger, read-only while sites write it -----------------------------------------

LedgerRow = tuple[int, str, int, float, float, int]  # seq, run_id, round, sigma, q, steps


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        yield conn
    finally:
        conn.close()


def _ledger_rows(path: Path) -> list[LedgerRow]:
    with _read_only(path) as conn:
        rows = conn.execute(
            "SELECT seq, run_id, round, noise_multiplier, sample_rate, steps FROM entries "
            "ORDER BY seq"
        ).fetchall()
    return [(int(a), str(b), int(c), float(d), float(e), int(f)) for a, b, c, d, e, f in rows]


def _last_seq(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM entries").fetchone()[0])


# --- epsilon --------------------------------------------------------------------------------

_EPSILONS: dict[tuple[tuple[float, float, int], ...], float] = {}


def _epsilon(events: Sequence[tuple[float, float, int]]) -> float:
    """PRV epsilon of (sigma, q, steps) events, equal (sigma, q) merged as the ledger does."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in events:
        steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    key = tuple(sorted((sigma, q, n) for (sigma, q), n in steps.items()))
    if key not in _EPSILONS:
        merged = [PrivacyEvent(sigma, q, n) for sigma, q, n in key]
        _EPSILONS[key] = compute_epsilon(merged, delta=DELTA, accountant=ACCOUNTANT)
    return _EPSILONS[key]


# --- the killer -----------------------------------------------------------------------------


@dataclass
class Trial:
    """One victim training process and what happened to it (times: seconds since submission)."""

    site: str
    round: int
    mode: str
    pid: int
    seen_at: float
    span: float | None = None  # uniform mode: the delay was drawn from [0, span)
    delay: float | None = None  # uniform mode: planned seconds after it was seen
    written_at: float | None = None  # its ledger entry landed
    replied_at: float | None = None  # its SuperNode sent the reply on (clean rounds)
    killed_at: float | None = None
    exited_at: float | None = None  # it ended by itself
    killed: bool = False
    entry_at_kill: bool = False  # the ledger held this round when the process died
    written_round: int | None = None  # round of the entry it wrote
    relaunched: list[int] = field(default_factory=list)  # Flower's new processes, same round
    worker: int | None = None  # the warm worker that forked it (None: a cold launch)
    worker_killed: bool = False  # the worker was SIGKILLed with it


@dataclass
class Victim:
    name: str
    root: int  # the `fedvault client start` process
    ledger: Path
    log: Path  # the SuperNode's log: which message each new process serves
    lifetime: float = DEFAULT_LIFETIME_S  # of its last training process that ran clean
    trials: dict[int, Trial] = field(default_factory=dict)


class Killer:
    """Watches the deployment's processes; SIGKILLs each victim's training processes."""

    def __init__(self, victims: list[Victim], run_dir: Path, seed: int) -> None:
        self.victims = victims
        self.run_dir = run_dir
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.roots: list[int] = [v.root for v in victims]
        self.seen: dict[int, int] = {}  # every process of the deployment: pid -> start time
        self.snapshots: dict[int, dict[str, list[LedgerRow]]] = {}  # round -> site -> rows
        self.errors: list[str] = []
        self._t0 = time.monotonic()
        self._known: set[int] = set()  # clientapp processes already handled
        self.parents: dict[int, int] = {}  # clientapp process -> its parent when first seen
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, name="killer", daemon=True)

    def now(self) -> float:
        return time.monotonic() - self._t0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._watcher.start()

    def add_root(self, pid: int) -> None:
        with self._lock:
            self.roots.append(pid)

    def stop(self) -> None:
        self._stop.set()
        self._watcher.join(timeout=30)
        for thread in self._threads:
            thread.join(timeout=30)
        self.sample()

    def trials(self) -> list[Trial]:
        return sorted((t for v in self.victims for t in v.trials.values()), key=lambda t: t.seen_at)

    def sample(self) -> dict[int, tuple[str, int, int]]:
        """Remember every live process under the roots (with its start time)."""
        table = _process_table()
        with self._lock:
            roots = list(self.roots)
        for root in roots:
            for pid in _tree(root, table):
                if pid in table:
                    self.seen.setdefault(pid, table[pid][2])
        return table

    def _watch(self) -> None:
        try:
            while not self._stop.is_set():
                table = self.sample()
                for victim in self.victims:
                    for pid in _tree(victim.root, table):
                        if pid in table and pid not in self._known and _is_clientapp(pid):
                            self._known.add(pid)
                            # a ClientApp's own forks carry its command line for a moment
                            if not _is_clientapp(table[pid][1]):
                                self.parents[pid] = table[pid][1]
                                self._new_process(victim, pid, table[pid][2])
                self._snapshot_rounds()
                time.sleep(WATCH_POLL_S)
        except Exception as err:  # surfaced by the test, never swallowed
            self.errors.append(f"watcher: {type(err).__name__}: {err}")

    def _new_process(self, victim: Victim, pid: int, started: int) -> None:
        seen_at = self.now()
        kinds = _RECEIVING.findall(victim.log.read_text(errors="replace"))
        if not kinds or kinds[-1] != "train":
            return  # a schema query or an evaluation: never killed
        server_round = kinds.count("train")  # one train message per site per round
        if server_round in victim.trials:  # Flower relaunched a task whose process died
            victim.trials[server_round].relaunched.append(pid)
            return
        index = VICTIMS.index(victim.name)
        mode = AFTER_WRITE if (index + server_round + self.seed) % 2 == 0 else UNIFORM
        if server_round < FIRST_KILL_ROUND:
            mode = CLEAN
        trial = Trial(victim.name, server_round, mode, pid, seen_at)
        if not _is_cold_launch(pid):
            trial.worker = self.parents.get(pid)
        if mode == UNIFORM:
            trial.span = UNIFORM_SPAN * victim.lifetime
            trial.delay = float(self.rng.uniform(0.0, trial.span))
        victim.trials[server_round] = trial
        thread = threading.Thread(target=self._execute, args=(victim, trial, started), daemon=True)
        self._threads.append(thread)
        thread.start()

    def _snapshot_rounds(self) -> None:
        for row in read_jsonl(self.run_dir / ROUNDS_FILE):
            server_round = int(row["round"])
            if server_round > 0 and server_round not in self.snapshots:
                self.snapshots[server_round] = {
                    v.name: _ledger_rows(v.ledger) for v in self.victims
                }

    def _execute(self, victim: Victim, trial: Trial, started: int) -> None:
        try:
            self._follow(victim, trial, started)
        except Exception as err:
            self.errors.append(f"trial {trial.site} round {trial.round}: {err!r}")

    def _follow(self, victim: Victim, trial: Trial, started: int) -> None:
        """Watch one training process: its ledger write, then its kill or its exit."""
        try:
            pidfd = os.pidfd_open(trial.pid)
        except ProcessLookupError:
            return
        try:

            def exited(wait: float = 0.0) -> bool:
                return bool(select.select([pidfd], [], [], wait)[0])

            due = float("inf") if trial.delay is None else trial.seen_at + trial.delay
            sent, next_look = _sent_replies(victim.log), 0.0

            def look_for_reply() -> None:
                nonlocal next_look
                if trial.replied_at is None and self.now() >= next_look:
                    next_look = self.now() + WATCH_POLL_S
                    if _sent_replies(victim.log) > sent:
                        trial.replied_at = self.now()

            with _read_only(victim.ledger) as conn:
                before = _last_seq(conn)
                while not exited(LEDGER_POLL_S) and self.now() < due:
                    if trial.written_at is None and _last_seq(conn) != before:
                        trial.written_at = self.now()
                        if trial.mode == AFTER_WRITE:
                            break
                    if trial.written_at is not None:
                        look_for_reply()
            if exited():
                trial.exited_at = self.now()
            elif _still_running(trial.pid, started):
                if trial.mode == UNIFORM and trial.worker and VICTIMS.index(victim.name) % 2:
                    # the warm worker dies with its task: `client start` must replace it
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(trial.worker, signal.SIGKILL)
                        trial.worker_killed = True
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                trial.killed, trial.killed_at = True, self.now()
            exited(10.0)
            if trial.mode == CLEAN and trial.exited_at is not None:
                victim.lifetime = trial.exited_at - trial.seen_at
                end = self.now() + 5.0  # the SuperNode may send the reply on after the exit
                while trial.replied_at is None and self.now() < end:
                    look_for_reply()
                    time.sleep(WATCH_POLL_S)
        finally:
            os.close(pidfd)
        rows = [r for r in _ledger_rows(victim.ledger) if r[2] == trial.round]
        trial.entry_at_kill = trial.killed and bool(rows)
        if trial.written_at is not None and rows:
            trial.written_round = rows[-1][2]


# --- the deployment -------------------------------------------------------------------------


@dataclass
class CrashRun:
    seed: int
    run: subprocess.CompletedProcess[str]
    run_dir: Path
    setup_s: float  # provisioning and starting the coordinator and sites
    wall_s: float
    killer: Killer
    ledgers: dict[str, Path]
    fingerprints: dict[str, str]
    logs: list[Path]
    site_codes: list[int | None]
    server_code: int | None
    worker_logs: dict[str, Path] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def received(self, site: str) -> dict[int, dict[str, Any]]:
        """The coordinator's metrics row of every round whose update from ``site`` arrived."""
        return {
            int(r["round"]): r
            for r in self.metrics
            if r["site"] == site and r["round"] > 0 and r["round_steps"] > 0
        }


def _scenario(folder: Path) -> Path:
    path = folder / "crash.toml"
    path.write_text(
        'name = "ledger-crash"\n'
        f"[federation]\nrounds = {ROUNDS}\nround-timeout = {ROUND_TIMEOUT_S}\nmin-sites = 1\n"
        f"[privacy]\nnoise-multiplier = {NOISE_MULTIPLIER}\ntarget-delta = {DELTA}\n"
        f'accountant = "{ACCOUNTANT}"\n',
        encoding="utf-8",
    )
    return path


def _fingerprint(csv_path: Path) -> str:
    data = load_dataset(f"csv:{csv_path}", label_column="diagnosis")
    return dataset_fingerprint(data.features, data.labels)


@pytest.fixture(scope="module")
def crash(tmp_path_factory: pytest.TempPathFactory) -> CrashRun:
    """One deployment run with the killer on; the tests below inspect what it left."""
    seed = int(os.environ.get(SEED_ENV, secrets.randbits(31)))
    tmp = tmp_path_factory.mktemp("crash")
    print(f"\nledger crash test: seed {seed} (replay with {SEED_ENV}={seed})")
    sites = [*VICTIMS, HEALTHY]
    federation, port = provision(tmp, sites)
    csvs = dict(zip(sites, write_site_csvs(tmp, len(sites)), strict=True))
    kits = {site: federation / "sites" / site for site in sites}
    server_kit = federation / "server"
    run_dir = tmp / "run"
    server_log = tmp / "server.log"
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(
            fedvault_process(
                ["server", "start", "--kit", str(server_kit), "--listen", f"127.0.0.1:{port}"],
                server_log,
            )
        )
        wait_for(server_log, r"^ready:", server, timeout=90)
        procs: dict[str, subprocess.Popen[bytes]] = {}
        for site in sites:
            args = ["client", "start", "--kit", str(kits[site]), "--data", str(csvs[site]),
                    "--label-column", "diagnosis", "--device", "cpu",
                    "--max-epsilon", str(MAX_EPSILON)]  # fmt: skip
            procs[site] = stack.enter_context(fedvault_process(args, tmp / f"{site}.log"))
        for site in sites:
            wait_for(tmp / f"{site}.log", r"fedvault client site", procs[site], timeout=120)
        victims = [
            Victim(v, procs[v].pid, kits[v] / KIT_LEDGER, kits[v] / "state" / "supernode.log")
            for v in VICTIMS
        ]
        killer = Killer(victims, run_dir, seed)
        for root in (server.pid, procs[HEALTHY].pid):
            killer.add_root(root)
        killer.start()
        setup = time.monotonic() - started
        with (tmp / "run.log").open("w+") as out:
            submit = subprocess.Popen(
                [sys.executable, "-m", "fedvault", "run", "--kit", str(server_kit),
                 str(_scenario(tmp)), "--out", str(run_dir)],
                stdout=out, stderr=subprocess.STDOUT, text=True, env=fedvault_env(),
            )  # fmt: skip
            killer.add_root(submit.pid)
            try:
                submit.wait(timeout=1000)
            finally:
                if submit.poll() is None:
                    submit.kill()
                    submit.wait(timeout=30)
                killer.stop()
            out.seek(0)
            run = subprocess.CompletedProcess(submit.args, submit.returncode, out.read(), "")
    wall = time.monotonic() - started
    killer.sample()
    result = CrashRun(
        seed=seed,
        run=run,
        run_dir=run_dir,
        setup_s=setup,
        wall_s=wall,
        killer=killer,
        ledgers={v.name: v.ledger for v in victims},
        fingerprints={v: _fingerprint(csvs[v]) for v in VICTIMS},
        logs=[
            server_kit / "state" / "superlink.log",
            *(kits[s] / "state" / "supernode.log" for s in sites),
            *(kits[s] / "state" / "worker.log" for s in sites),
            run_dir / "flower.log",
        ],
        site_codes=[procs[s].returncode for s in sites],
        server_code=server.returncode,
        metrics=read_jsonl(run_dir / METRICS_FILE),
        worker_logs={v: kits[v] / "state" / "worker.log" for v in VICTIMS},
    )
    if (run_dir / SUMMARY_FILE).is_file():
        result.summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    _print_table(result)
    return result


def _prefix_epsilons(crash: CrashRun, trial: Trial) -> tuple[float, float] | None:
    """(ledger epsilon, received epsilon) over rounds <= the trial's, when that round ended."""
    snapshot = crash.killer.snapshots.get(trial.round)
    if snapshot is None:
        return None
    ledger = [(s, q, n) for _, _, r, s, q, n in snapshot[trial.site] if r <= trial.round]
    received = [
        (row["noise_multiplier"], row["sample_rate"], row["round_steps"])
        for r, row in crash.received(trial.site).items()
        if r <= trial.round
    ]
    return _epsilon(ledger), _epsilon(received)


def _outcome(crash: CrashRun, trial: Trial) -> str:
    got = trial.round in crash.received(trial.site)
    if trial.mode == CLEAN:
        return "clean round: delivered" if got else "clean round: NOT delivered"
    if not trial.killed:
        return "exited before the kill"
    if trial.entry_at_kill and not got:
        return "over-count (in ledger, never received)"
    if not trial.entry_at_kill and not got:
        return "lost before the ledger write"
    if not trial.entry_at_kill and got:
        if trial.relaunched:
            return "killed before its task started; Flower relaunched it, delivered"
        return "UNDER-COUNT: received, not in the ledger"
    return "killed after its reply left: delivered"


def _after(trial: Trial, moment: float | None) -> str:
    return "-" if moment is None else f"{moment - trial.seen_at:.2f}"


def _row(crash: CrashRun, number: int, trial: Trial) -> list[str]:
    eps = _prefix_epsilons(crash, trial)
    return [
        str(number),
        trial.site,
        str(trial.round),
        str(trial.pid),
        trial.mode,
        f"{trial.delay:.2f}/{trial.span:.1f}" if trial.delay is not None else "-",
        f"{trial.seen_at:.2f}",
        _after(trial, trial.written_at),
        _after(trial, trial.replied_at),
        _after(trial, trial.killed_at),
        _after(trial, trial.exited_at),
        "yes" if trial.entry_at_kill or (trial.mode == CLEAN and trial.written_at) else "no",
        "yes" if trial.round in crash.received(trial.site) else "no",
        f"{eps[0]:.4f}" if eps else "-",
        f"{eps[1]:.4f}" if eps else "-",
        _outcome(crash, trial) + (f" (as {trial.relaunched})" if trial.relaunched else ""),
    ]


def _print_table(crash: CrashRun) -> None:
    """The per-trial table (visible with ``pytest -s``).

    ``seen``: seconds from submission until the process was seen; ``+write``, ``+reply`` (its
    SuperNode sent the reply on), ``+kill``, ``+exit``: seconds after that; ``entry``: the
    ledger held the round when the process died; ``recv``: the coordinator got the update;
    epsilons over rounds up to the trial's, in the ledger as that round ended.
    """
    print(
        f"\nledger crash test: seed {crash.seed}, {len(VICTIMS)} victims x {ROUNDS} rounds, "
        f"wall {crash.wall_s:.0f} s (setup {crash.setup_s:.0f} s); times from submission"
    )
    header = ["#", "site", "rnd", "pid", "mode", "delay/L", "seen", "+write", "+reply", "+kill",
              "+exit", "entry", "recv", "eps_ledger", "eps_recv", "outcome"]  # fmt: skip
    rows = [header] + [_row(crash, n, t) for n, t in enumerate(crash.killer.trials(), 1)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for row in rows:
        print(" ".join(c.rjust(w) for c, w in zip(row, widths, strict=False)), row[-1])
    failed = crash.summary.get("failed_sites", {})
    for site, reason in sorted(failed.items()):
        print(f"coordinator: {site} failed: {reason}")


# --- the properties -------------------------------------------------------------------------


def test_the_run_completes_with_the_healthy_site(crash: CrashRun) -> None:
    assert crash.killer.errors == []
    assert crash.run.returncode == 0, crash.run.stdout[-4000:]
    assert f"round {ROUNDS}/{ROUNDS}" in crash.run.stdout
    assert set(crash.received(HEALTHY)) == set(range(1, ROUNDS + 1))
    for site in VICTIMS:  # the clean round
        assert set(range(1, FIRST_KILL_ROUND)) <= set(crash.received(site)), site


def test_enough_processes_were_killed_some_right_after_the_ledger_write(
    crash: CrashRun,
) -> None:
    trials = crash.killer.trials()

    killed = [t for t in trials if t.killed]
    over = [t for t in killed if t.entry_at_kill and t.round not in crash.received(t.site)]

    assert len(killed) >= 10, f"only {len(killed)} processes killed"
    assert len(over) >= 3, f"only {len(over)} kills between the ledger write and the reply"
    # the round a training process served is read from the SuperNode's log; the entry agrees
    assert all(t.written_round in (None, t.round) for t in trials)


def test_tasks_ran_in_warm_workers_and_killed_workers_were_replaced(crash: CrashRun) -> None:
    trials = crash.killer.trials()
    killed_workers = [t for t in trials if t.worker_killed]

    # every clean-round task was forked by its site's warm worker, none launched cold
    assert all(t.worker is not None for t in trials if t.round < FIRST_KILL_ROUND), trials
    assert killed_workers, "no warm worker was killed with its task"
    for trial in killed_workers:
        # `fedvault client start` started a new worker, which warmed up again
        readies = crash.worker_logs[trial.site].read_text().count("ready in")
        assert readies >= 2, (trial.site, crash.worker_logs[trial.site].read_text()[-2000:])
    assert crash.site_codes == [0] * len(crash.site_codes)  # no site was restarted by hand


def test_every_received_update_is_in_the_ledger_before_the_round_ends(crash: CrashRun) -> None:
    assert all(crash.received(site) for site in VICTIMS)  # at least the clean round
    for site in VICTIMS:
        for server_round, row in crash.received(site).items():
            snapshot = crash.killer.snapshots[server_round][site]

            matching = [
                r
                for r in snapshot
                if r[2] == server_round
                and r[3] == row["noise_multiplier"]
                and r[4] == row["sample_rate"]
                and r[5] == row["round_steps"]
            ]

            assert len(matching) == 1, (site, server_round, row, snapshot)


def test_ledger_epsilon_covers_received_updates_after_every_trial(crash: CrashRun) -> None:
    trials = crash.killer.trials()

    prefixes = {(t.site, t.round): _prefix_epsilons(crash, t) for t in trials}

    assert len(prefixes) >= len(VICTIMS) * ROUNDS
    assert all(eps is not None for eps in prefixes.values()), prefixes
    for key, eps in prefixes.items():
        assert eps is not None
        assert eps[0] >= eps[1], key


def test_ledger_epsilon_covers_received_updates_at_the_end(crash: CrashRun) -> None:
    for site in VICTIMS:
        received = [
            (r["noise_multiplier"], r["sample_rate"], r["round_steps"])
            for r in crash.received(site).values()
        ]
        with PrivacyLedger(crash.ledgers[site]) as ledger:
            datasets = ledger.datasets()
            spent = ledger.spent(crash.fingerprints[site], delta=DELTA, accountant=ACCOUNTANT)

        assert datasets == [crash.fingerprints[site]]
        assert spent >= _epsilon(received), site


def test_no_process_is_left(crash: CrashRun) -> None:
    logged = _logged_pids(*crash.logs)
    seen = crash.killer.seen

    survivors = [pid for pid, started in seen.items() if _still_running(pid, started)]
    unseen = sorted(logged - set(seen))

    assert crash.server_code == 0
    assert crash.site_codes == [0] * (len(VICTIMS) + 1)
    assert len(seen) >= 3 * (len(VICTIMS) + 1)  # each site: client, SuperNode, SuperExec
    assert survivors == []
    assert flower_processes_of(unseen) == []
