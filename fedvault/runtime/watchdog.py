"""A watchdog that stops every process a fedvault command started once that command dies.

Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp ...) in
sessions of their own, and a parent-death signal reaches only a direct child, so a
SIGKILLed `fedvault simulate` used to leave its SuperLink and SuperExec running forever.
The first process fedvault starts also starts this watchdog, in a session of its own (a
terminal's hangup or Ctrl-C does not reach it), with a pipe as its stdin whose write end
only the fedvault command holds. The command writes each started PID into the pipe
(``guard``); the watchdog follows those trees in /proc, remembering every descendant and
every session one of them leads (an orphan stays in its session). When the pipe reaches
end-of-file or the watchdog is re-parented, the command is gone however it died: the
watchdog asks what is left to stop (SIGTERM), waits briefly, then SIGKILLs the rest and
exits. A command that stopped its processes itself leaves nothing to do, and at a normal
exit it waits for its watchdog to end, so no process of it outlives it.

Run as ``python -I -m fedvault.runtime.watchdog --parent-pid PID``; it imports only the standard
library, so it starts in a few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

#: Seconds between scans of /proc while a guarded tree runs (a scan reads every process's
#: stat file: about 10 ms on a busy machine).
SCAN_SECONDS = 1.0
#: How long the processes left behind get to stop on SIGTERM before they are SIGKILLed.
GRACE_SECONDS = 3.0


# --------------------------------------------------------------------------- in fedvault


_lock = threading.Lock()
_pipe: IO[bytes] | None = None
_watchdog: subprocess.Popen[bytes] | None = None


def _start() -> IO[bytes] | None:
    global _pipe, _watchdog
    if _pipe is not None and _watchdog is not None and _watchdog.poll() is None:
        return _pipe
    try:
        _watchdog = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-m",
                "fedvault.runtime.watchdog",
                "--parent-pid",
                str(os.getpid()),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError:
        _pipe = _watchdog = None
        return None
    _pipe = _watchdog.stdin
    atexit.register(_close, _watchdog)
    return _pipe


def _close(watchdog: subprocess.Popen[bytes]) -> None:
    """At a normal exit: end the watchdog's pipe and wait, so it is gone before we are."""
    with contextlib.suppress(OSError):
        if watchdog.stdin is not None:
            watchdog.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        watchdog.wait(timeout=GRACE_SECONDS + 5)


def ensure_watchdog() -> None:
    """Start this process's watchdog now (before a child exists that it must follow)."""
    with _lock:
        _start()


def guard(pid: int) -> None:
    """Have this process's watchdog stop ``pid`` and its whole tree if this process dies."""
    with _lock:
        pipe = _start()
        if pipe is None:
            return
        try:
            pipe.write(f"{pid}\n".encode())
            pipe.flush()
        except OSError:  # the watchdog died; the next guard starts another
            global _watchdog
            _watchdog = None


def watchdog_pid() -> int | None:
    """PID of this process's running watchdog, if any (for tests and logs)."""
    return _watchdog.pid if _watchdog is not None and _watchdog.poll() is None else None


# --------------------------------------------------------------------------- the watchdog


@dataclass(frozen=True)
class _Stat:
    state: str
    ppid: int
    session: int
    start: int


def _stats() -> dict[int, _Stat]:
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            found[int(stat.parent.name)] = _Stat(
                fields[0], int(fields[1]), int(fields[3]), int(fields[19])
            )
        except (OSError, IndexError, ValueError):
            continue
    return found


@dataclass
class Tracker:
    """Every process of the guarded trees seen so far (PID -> start time) and their sessions."""

    spare: frozenset[int]
    seen: dict[int, int] = field(default_factory=dict)
    sessions: set[int] = field(default_factory=set)

    def add_root(self, pid: int) -> None:
        stat = _stats().get(pid)
        if stat is not None and pid not in self.spare:
            self.seen.setdefault(pid, stat.start)

    def scan(self, *, forget_dead: bool = True) -> list[int]:
        """Extend the trees from /proc; the live PIDs in them (the dead are forgotten)."""
        stats = _stats()
        children: dict[int, list[int]] = {}
        members: dict[int, list[int]] = {}
        for pid, stat in stats.items():
            if stat.state != "Z":
                children.setdefault(stat.ppid, []).append(pid)
                members.setdefault(stat.session, []).append(pid)

        def ours(pid: int) -> bool:
            stat = stats.get(pid)
            return stat is not None and stat.state != "Z" and stat.start == self.seen.get(pid)

        todo = [pid for pid in self.seen if ours(pid)]
        todo += [pid for sid in self.sessions for pid in members.get(sid, [])]
        live: set[int] = set()
        while todo:
            pid = todo.pop()
            found = stats.get(pid)
            if pid in live or pid in self.spare or found is None or found.state == "Z":
                continue
            self.seen[pid] = found.start  # a recycled PID, if any, was reached through our tree
            live.add(pid)
            if found.session == pid:  # a session leader: its session belongs to the tree
                self.sessions.add(pid)
                todo.extend(members.get(pid, []))
            todo.extend(children.get(pid, []))
        if forget_dead:
            self.seen = {pid: start for pid, start in self.seen.items() if pid in live}
            self.sessions = {sid for sid in self.sessions if members.get(sid)}
        return sorted(live)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def sweep(tracker: Tracker, grace: float = GRACE_SECONDS) -> list[int]:
    """Stop every live process of the tracked trees: SIGTERM, then SIGKILL; what was left."""
    left = tracker.scan(forget_dead=False)
    if not left:
        return []
    _signal_all(left, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and tracker.scan(forget_dead=False):
        time.sleep(0.1)
    for _ in range(50):  # a process may fork between a scan and the kill
        live = tracker.scan(forget_dead=False)
        if not live:
            break
        _signal_all(live, signal.SIGSTOP)  # frozen, nothing forks meanwhile
        _signal_all(tracker.scan(forget_dead=False), signal.SIGKILL)
        time.sleep(0.05)
    return left


def watch(parent: int, stream: int = 0, scan_seconds: float = SCAN_SECONDS) -> list[int]:
    """Follow the PIDs written to ``stream`` until ``parent`` is gone; then sweep."""
    tracker = Tracker(spare=frozenset({parent, os.getpid()}))
    pending = b""
    while True:
        timeout = scan_seconds if tracker.seen else 5 * scan_seconds
        ready, _, _ = select.select([stream], [], [], timeout)
        if ready:
            data = os.read(stream, 4096)
            if not data:
                break
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip().isdigit():
                    tracker.add_root(int(line))
        if os.getppid() != parent:
            break
        if tracker.seen:
            tracker.scan()
    return sweep(tracker)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedvault.runtime.watchdog")
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    watch(args.parent_pid)


if __name__ == "__main__":
    main()
