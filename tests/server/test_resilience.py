"""Integration: a federation survives a site dying mid-round and the coordinator dying mid-run.

Real processes on loopback over TLS, as tests/server/test_deployment.py runs them: three
provisioned sites, `fedvault server start`, one `fedvault client start` per site, then
`fedvault run` of a 4-round scenario with ``min-sites = 2``. Crashes are SIGKILLs of a
command's whole process tree (the fedvault command, the Flower SuperLink or SuperNode it
started in a session of its own, and their SuperExec/ServerApp/ClientApp children), as an
OOM kill or a power cut would leave them: nothing gets to clean up.

1. A site dies the moment its round-2 training starts (its write-ahead ledger entry for
   round 2 is the signal). Flower's SuperLink answers messages to a node whose heartbeat
   expired with NODE_UNAVAILABLE, so the round ends after at most the heartbeat patience
   (2 x 10 s with fedvault's SuperNode, client/supernode.py), not the 120 s round timeout;
   the run goes on with two sites and records the dropout. The site is restarted after
   that round and trains again in round 3 or 4.
2. The coordinator (`fedvault server start` and its SuperLink, SuperExec and ServerApp,
   plus the `fedvault run` following it) dies right after round 2's checkpoint. The sites
   keep running; their SuperNodes retry until a restarted `fedvault server start` (same
   kit, same SuperLink database) is back, and `fedvault run --resume RUN_DIR` runs rounds 3
   and 4 under the same run id, so each site's ledger and epsilon continue.

Every process seen is proven gone at the end, by PID and start time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import pytest

from fedvault.common.checkpoint import load_checkpoint
from fedvault.common.errors import ConfigError
from fedvault.common.ledger import KIT_LEDGER
from fedvault.common.report import METRICS_FILE, ROUNDS_FILE, SUMMARY_FILE, read_jsonl
from fedvault.runtime.processes import descendants
from tests.deployment import (
    ProcessTrees,
    fedvault_process,
    flower_processes_of,
    ledger_entries,
    provision,
    wait_for,
    wait_until,
    write_site_csvs,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(600, method="signal"),  # a whole journey; teardown still runs
]

SITES = ["hospital-a", "hospital-b", "hospital-c"]
VICTIM = "hospital-c"
ROUNDS = 4
ROUND_TIMEOUT_S = 120.0
SCENARIO = f"""\
name = "resilience"

[federation]
rounds = {ROUNDS}
min-sites = 2
round-timeout = {ROUND_TIMEOUT_S}
connect-timeout = 120.0

[privacy]
target-epsilon = 1.0
target-delta = 1e-5
"""


def _logged_pids(*logs: Path) -> list[int]:
    """Every PID fedvault logged as started or stopped (children and descendants included)."""
    pids: set[int] = set()
    for log in logs:
        text = log.read_text(errors="replace") if log.exists() else ""
        pids.update(int(p) for p in re.findall(r"fedvault: started pid=(\d+)", text))
        for found in re.findall(r"descendants=\[([\d, ]*)\]", text):
            pids.update(int(p) for p in found.split(",") if p.strip())
    return sorted(pids)


class Federation:
    """A provisioned 3-site federation whose commands run as real processes.

    Each command runs under ``fedvault_process`` (SIGTERM at the end); ``kill`` SIGKILLs a
    command's whole tree instead. ``stop`` stops everything still running and records what
    survived anything (``survivors``), which must be nothing.
    """

    def __init__(self, tmp: Path, stack: ExitStack) -> None:
        self.tmp = tmp
        self.stack = stack
        self.trees = ProcessTrees()
        self.federation, self.port = provision(tmp, SITES)
        self.server_kit = self.federation / "server"
        self.csvs = dict(zip(SITES, write_site_csvs(tmp, len(SITES)), strict=True))
        self.scenario = tmp / "scenario.toml"
        self.scenario.write_text(SCENARIO, encoding="utf-8")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.sites: dict[str, subprocess.Popen[bytes]] = {}
        self.server: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self.survivors: list[str] = []
        self.stopped = False

    def _start(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}-{len(self.logs)}.log"
        proc = self.stack.enter_context(fedvault_process(args, log))
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def start_server(self) -> subprocess.Popen[bytes]:
        self.server = proc = self._start(
            ["server", "start", "--kit", str(self.server_kit),
             "--listen", f"127.0.0.1:{self.port}"],
            "server",
        )  # fmt: skip
        wait_for(self.logs[-1], r"^ready:", proc, timeout=90)
        return proc

    def start_sites(self, sites: list[str]) -> None:
        """`fedvault client start` for ``sites``, all at once; wait until each is up."""
        started = []
        for site in sites:
            proc = self._start(
                ["client", "start", "--kit", str(self.federation / "sites" / site),
                 "--data", str(self.csvs[site]), "--label-column", "diagnosis",
                 "--device", "cpu"],
                site,
            )  # fmt: skip
            self.sites[site] = proc
            started.append((proc, self.logs[-1]))
        for proc, log in started:
            wait_for(log, r"fedvault client site", proc, timeout=120)

    def ensure_sites(self) -> None:
        """Restart any site that is not running (a journey before may have left one dead)."""
        self.start_sites(
            [s for s in SITES if s not in self.sites or self.sites[s].poll() is not None]
        )

    def start_run(self, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        proc = self._start(["run", "--kit", str(self.server_kit), *args], "run")
        return proc, self.logs[-1]

    def serverapp_pid(self) -> int:
        """The running `flwr-serverapp` (the coordinator's SuperExec starts it per run)."""
        assert self.server is not None
        for pid in descendants(self.server.pid):
            with suppress(OSError):
                if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        raise AssertionError("no flwr-serverapp is running")

    def ledger(self, site: str) -> Path:
        return self.federation / "sites" / site / KIT_LEDGER

    def kill(self, *procs: subprocess.Popen[bytes]) -> list[str]:
        """SIGKILL the whole trees of ``procs`` at once; what was killed, for the log."""
        killed = self.trees.kill(*(p.pid for p in procs))
        for proc in procs:
            proc.wait(timeout=10)
        return killed

    def flower_logs(self) -> list[Path]:
        return [
            self.server_kit / "state" / "superlink.log",
            *(self.federation / "sites" / s / "state" / "supernode.log" for s in SITES),
        ]

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        for proc in self.procs:  # remember every tree before it is asked to stop
            if proc.poll() is None:
                self.trees.remember(proc.pid)
        for proc in self.sites.values():  # sites first, while their coordinator still runs
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.sites.values():
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        self.stack.close()  # SIGTERM (then SIGKILL) to whatever still runs, newest first
        self.survivors = self.trees.kill_survivors()
        self.survivors += [str(p) for p in flower_processes_of(_logged_pids(*self.flower_logs()))]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """One federation for both journeys (own kits, port, FLWR_HOMEs and TMPDIR), running."""
    tmp = tmp_path_factory.mktemp("resilience")
    (tmp / "tmp").mkdir()
    with ExitStack() as stack:
        monkey = stack.enter_context(pytest.MonkeyPatch.context())
        monkey.setenv("TMPDIR", str(tmp / "tmp"))
        fed = Federation(tmp, stack)
        try:
            fed.start_server()
            fed.start_sites(SITES)
            yield fed
        finally:
            fed.stop()


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / ROUNDS_FILE)


def _has_round(run_dir: Path, n: int) -> bool:
    return any(r["round"] == n for r in _rounds(run_dir))


def _trained(run_dir: Path) -> set[tuple[int, str]]:
    """(round, site) of every DP-SGD update the coordinator aggregated."""
    rows = read_jsonl(run_dir / METRICS_FILE)
    return {(r["round"], r["site"]) for r in rows if r["round"] > 0 and r["round_steps"] > 0}


# --- 1. a site dies mid-round ---------------------------------------------------------------


@pytest.fixture(scope="module")
def dropout(federation: Federation) -> dict[str, Any]:
    """Kill the victim site when its round-2 training starts; restart it after that round."""
    fed = federation
    run_dir = fed.tmp / "dropout-run"
    outcome: dict[str, Any] = {"run_dir": run_dir}
    t0 = time.monotonic()
    run, run_log = fed.start_run(str(fed.scenario), "--out", str(run_dir))

    wait_until(
        lambda: (run_dir.name, 2) in ledger_entries(fed.ledger(VICTIM)),
        f"{VICTIM} to reserve round 2 in its ledger",
        timeout=300,
        procs=[run],
        poll=0.02,
    )
    killed_at = time.monotonic()
    outcome["killed"] = fed.kill(fed.sites[VICTIM])
    print(f"{killed_at - t0:.1f}s: round 2 started at {VICTIM}; killed {outcome['killed']}")

    # Restart at once: the new SuperNode's activation is refused (and retried by `client
    # start`) until the SuperLink marks the dead node offline, which also ends round 2.
    restarted_at = time.monotonic()
    fed.start_sites([VICTIM])
    wait_until(lambda: _has_round(run_dir, 2), "round 2 to end", timeout=200, procs=[run])
    outcome["dropout_round_s"] = time.monotonic() - killed_at
    print(f"round 2 ended {outcome['dropout_round_s']:.1f}s after the kill")

    # Rounds now take a second or two: hold the ServerApp (SIGSTOP, well inside Flower's
    # 60 s run heartbeat) until the same kit has activated the same node again, so that
    # there are rounds left for it to rejoin.
    serverapp = fed.serverapp_pid()
    os.kill(serverapp, signal.SIGSTOP)
    try:
        victim_log = fed.logs[-1]
        wait_until(
            lambda: "connected to the coordinator as node" in victim_log.read_text(),
            f"{VICTIM} to connect again", timeout=45, procs=[fed.sites[VICTIM]],
        )  # fmt: skip
    finally:
        os.kill(serverapp, signal.SIGCONT)
    outcome["rounds_done_at_restart"] = max(r["round"] for r in _rounds(run_dir))
    print(
        f"{VICTIM} restarted and connected in {time.monotonic() - restarted_at:.1f}s, "
        f"after round {outcome['rounds_done_at_restart']} had ended"
    )

    outcome["code"] = run.wait(timeout=400)
    outcome["output"] = run_log.read_text(errors="replace")
    outcome["ledger"] = ledger_entries(fed.ledger(VICTIM))
    print(f"run exited {outcome['code']} after {time.monotonic() - t0:.1f}s")
    print(outcome["output"][-3000:])
    return outcome


def test_the_run_completes_every_round_without_the_dead_site(dropout: dict[str, Any]) -> None:
    run_dir: Path = dropout["run_dir"]

    rounds = _rounds(run_dir)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())

    assert dropout["code"] == 0, dropout["output"][-4000:]
    assert "Traceback" not in dropout["output"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    assert summary["rounds"] == ROUNDS and summary["ended_early"] is None
    assert any("fedvault.client.supernode" in k for k in dropout["killed"]), dropout["killed"]


def test_the_dropout_is_recorded_and_the_others_train_every_round(
    dropout: dict[str, Any],
) -> None:
    run_dir: Path = dropout["run_dir"]

    trained = _trained(run_dir)
    by_round = {r["round"]: r for r in _rounds(run_dir)}
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())

    # On failure, say what each round recorded (who failed and why) and what was trained.
    why = {
        n: {k: r.get(k) for k in ("sites", "failed_sites", "rejected_sites") if k in r}
        for n, r in by_round.items()
    }
    context = f"rounds: {why}; trained: {sorted(trained)}; summary: {summary.get('failed_sites')}"
    for site in SITES[:2]:
        assert {n for n, s in trained if s == site} == set(range(1, ROUNDS + 1)), (
            f"{site}: {context}"
        )
    assert (1, VICTIM) in trained and (2, VICTIM) not in trained
    assert VICTIM in by_round[2]["failed_sites"], by_round[2]
    assert VICTIM in summary["failed_sites"], summary["failed_sites"]
    assert by_round[2]["sites"] == 2
    assert f"failed: {VICTIM}" in dropout["output"]  # the progress line names it


def test_the_dropout_round_ends_on_the_heartbeat_not_the_round_timeout(
    dropout: dict[str, Any],
) -> None:
    run_dir: Path = dropout["run_dir"]

    reason = json.loads((run_dir / SUMMARY_FILE).read_text())["failed_sites"].get(VICTIM, "")

    print(f"round 2 ended {dropout['dropout_round_s']:.1f}s after the kill")
    assert "Node Unavailable" in reason  # Flower's answer for an expired heartbeat
    assert dropout["dropout_round_s"] < ROUND_TIMEOUT_S


def test_the_restarted_site_trains_again(dropout: dict[str, Any]) -> None:
    run_dir: Path = dropout["run_dir"]

    victim_rounds = sorted(n for n, s in _trained(run_dir) if s == VICTIM)
    ledger_rounds = [n for run, n in dropout["ledger"] if run == run_dir.name]

    rejoined = [n for n in victim_rounds if n > 2]
    assert rejoined, f"{VICTIM} trained in rounds {victim_rounds} only"
    assert rejoined == list(range(rejoined[0], ROUNDS + 1))  # once back, every round
    assert set(victim_rounds) <= set(ledger_rounds)  # every update is in its ledger
    assert 2 in ledger_rounds  # the round it died in was reserved: it counts


# --- 2. the coordinator dies between rounds ---------------------------------------------------


@pytest.fixture(scope="module")
def coordinator_crash(federation: Federation) -> dict[str, Any]:
    """Kill the coordinator after round 2's checkpoint; restart it and --resume the run."""
    fed = federation
    fed.ensure_sites()
    run_dir = fed.tmp / "crash-run"
    outcome: dict[str, Any] = {"run_dir": run_dir}
    t0 = time.monotonic()
    run, _ = fed.start_run(str(fed.scenario), "--out", str(run_dir))

    def checkpointed() -> int:
        try:
            return load_checkpoint(run_dir).round
        except ConfigError:
            return 0

    wait_until(lambda: checkpointed() >= 2, "round 2's checkpoint", 300, [run], poll=0.02)
    assert fed.server is not None
    outcome["killed"] = fed.kill(run, fed.server)
    outcome["checkpoint_at_kill"] = checkpointed()
    print(f"{time.monotonic() - t0:.1f}s: killed {outcome['killed']}")

    # The sites keep running: their SuperNodes retry while the SuperLink is down.
    down_at = time.monotonic()
    fed.start_server()
    outcome["down_s"] = time.monotonic() - down_at
    resumed, resumed_log = fed.start_run("--resume", str(run_dir))
    outcome["code"] = resumed.wait(timeout=400)
    outcome["output"] = resumed_log.read_text(errors="replace")
    print(
        f"coordinator down {outcome['down_s']:.1f}s; resumed run exited "
        f"{outcome['code']} after {time.monotonic() - down_at:.1f}s"
    )
    print(outcome["output"][-3000:])
    outcome["sites_alive"] = {s: fed.sites[s].poll() is None for s in SITES}
    outcome["ledgers"] = {s: ledger_entries(fed.ledger(s)) for s in SITES}
    return outcome


def test_the_resumed_run_finishes_all_rounds(coordinator_crash: dict[str, Any]) -> None:
    run_dir: Path = coordinator_crash["run_dir"]

    rounds = [r["round"] for r in _rounds(run_dir)]
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())

    assert coordinator_crash["code"] == 0, coordinator_crash["output"][-4000:]
    assert coordinator_crash["checkpoint_at_kill"] == 2
    assert "round 1/4" not in coordinator_crash["output"]  # done rounds are not run again
    assert re.search(r"round 4/4\s+accuracy \d\.\d{3}", coordinator_crash["output"])
    assert sorted(rounds) == list(range(ROUNDS + 1))  # each round exactly once
    assert summary["rounds"] == ROUNDS
    killed = coordinator_crash["killed"]
    for program in ("flower-superlink", "flwr-serverapp", "fedvault run"):
        assert any(program in k for k in killed), (program, killed)


def test_metrics_cover_every_round_from_every_site(coordinator_crash: dict[str, Any]) -> None:
    run_dir: Path = coordinator_crash["run_dir"]

    rows = read_jsonl(run_dir / METRICS_FILE)
    per_round = Counter(r["round"] for r in rows)

    assert dict(per_round) == {n: len(SITES) for n in range(ROUNDS + 1)}
    assert _trained(run_dir) == {(n, s) for n in range(1, ROUNDS + 1) for s in SITES}


def test_each_ledger_continues_under_the_same_run_id(coordinator_crash: dict[str, Any]) -> None:
    run_dir: Path = coordinator_crash["run_dir"]

    rows = read_jsonl(run_dir / METRICS_FILE)

    for site in SITES:
        counts = Counter(n for run, n in coordinator_crash["ledgers"][site] if run == run_dir.name)
        assert set(counts) == set(range(1, ROUNDS + 1)), (site, counts)
        assert counts[1] == counts[2] == counts[4] == 1, (site, counts)
        assert counts[3] in (1, 2), (site, counts)  # in flight at the crash: may count twice
        eps = {r["round"]: r["epsilon"] for r in rows if r["site"] == site}
        assert eps[3] > eps[2] > eps[1] > 0, (site, eps)


def test_the_sites_ride_out_the_coordinator_outage(coordinator_crash: dict[str, Any]) -> None:
    assert coordinator_crash["sites_alive"] == {s: True for s in SITES}


# --- last: everything stops -----------------------------------------------------------------


def test_every_process_is_gone_after_the_crashes_and_the_stop(federation: Federation) -> None:
    federation.stop()

    assert federation.survivors == []
    assert len(federation.trees.seen) >= 8  # SuperLink, SuperNodes and their children were seen
    assert not (federation.server_kit / "state" / "server.json").exists()
