"""Helpers for tests that run real fedvault deployment processes on loopback."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer

from fedvault.runtime.processes import descendants, free_port, session_members


def fedvault_env() -> dict[str, str]:
    return {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}


def write_site_csvs(folder: Path, sites: int, *, label: str = "diagnosis") -> list[Path]:
    """Split breast-cancer into one CSV per site (string labels), as real sites would hold."""
    data = load_breast_cancer()
    names = [f"f{i}" for i in range(data.data.shape[1])]
    order = np.random.default_rng(0).permutation(len(data.target))
    paths = []
    for index, rows in enumerate(np.array_split(order, sites)):
        path = folder / f"site{index}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([*names, label])
            for row in rows:
                writer.writerow([*data.data[row], ("malignant", "benign")[data.target[row]]])
        paths.append(path)
    return paths


def provision(folder: Path, sites: list[str], *, name: str = "demo") -> tuple[Path, int]:
    """`fedvault provision` for a federation on a free loopback port; returns (dir, port)."""
    port = free_port()
    out = folder / name
    result = subprocess.run(
        [sys.executable, "-m", "fedvault", "provision", "--name", name,
         "--server-address", f"127.0.0.1:{port}", "--sites", ",".join(sites), "--out", str(out)],
        capture_output=True, text=True, timeout=60, env=fedvault_env(), check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out, port


@contextmanager
def fedvault_process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A long-running `fedvault ...` command, stopped with SIGTERM (then SIGKILL) at the end."""
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedvault", *args],
            stdout=handle, stderr=subprocess.STDOUT, env=fedvault_env(),
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def wait_for(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Wait until ``log`` matches ``pattern``; fail early (with the log) if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if re.search(pattern, text, re.MULTILINE):
            return text
        if proc.poll() is not None:
            raise AssertionError(
                f"process exited with {proc.returncode} before {pattern!r}:\n{text}"
            )
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {pattern!r}:\n{text[-3000:]}")


def flower_processes_of(pids: list[int]) -> list[int]:
    """Which of ``pids`` still run (zombies excluded)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.append(pid)
    return alive


# --- processes killed on purpose (tests/server/test_resilience.py) ------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_label(pid: int) -> str:
    """``pid name`` for logs: the program of its command line (python scripts by script)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"{pid} ?"
    words = [Path(a.decode(errors="replace")).name for a in args if a]
    if words and words[0].startswith("python"):  # python [-I] -m fedvault run, python flwr run
        words = words[1:]
        while words and words[0].startswith("-"):  # the interpreter's own options
            flag, words = words[0], words[1:]
            if flag == "-m":
                break
    name = words[:1] + [w for w in words[1:2] if not w.startswith("-")]
    return f"{pid} {' '.join(name)}"


class ProcessTrees:
    """Every process seen in the trees of commands a test started, by PID and start time.

    A tree is a command's descendants (``fedvault.runtime.processes.descendants``) plus every
    process in a session one of them leads: Flower and fedvault start their helpers in sessions of
    their own, and a helper orphaned by a kill is found by its session. ``kill`` SIGKILLs a
    tree the way a crash or an OOM kill would; ``alive`` proves at the end that nothing of
    what was seen survived (a recycled PID is told apart by its start time).
    """

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}  # pid -> kernel start time

    def _still_ours(self, pid: int) -> bool:
        fields = _stat_fields(pid)
        return fields is not None and fields[0] != "Z" and fields[19] == self.seen.get(pid)

    def remember(self, root: int) -> list[int]:
        """``root``'s tree as of now (remembered); the live PIDs in it."""
        tree: set[int] = set()
        todo = [root]
        while todo:
            pid = todo.pop()
            fields = _stat_fields(pid)
            if pid in tree or fields is None or fields[0] == "Z":
                continue
            tree.add(pid)
            self.seen.setdefault(pid, fields[19])
            todo.extend(descendants(pid))
            if int(fields[3]) == pid:  # a session leader: its session is part of the tree
                todo.extend(session_members(pid))
        return sorted(tree)

    def kill(self, *roots: int) -> list[str]:
        """SIGKILL the trees of ``roots`` at once (snapshot first); ``pid name`` of each."""
        killed: list[str] = []
        for _ in range(5):  # a process may start a child between snapshot and kill
            tree = sorted({pid for root in roots for pid in self.remember(root)})
            tree = [pid for pid in tree if self._still_ours(pid)]
            if not tree:
                break
            labels = {pid: process_label(pid) for pid in tree}
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(labels[pid])
            time.sleep(0.2)
        return killed

    def alive(self) -> list[str]:
        return [process_label(pid) for pid in sorted(self.seen) if self._still_ours(pid)]

    def kill_survivors(self) -> list[str]:
        survivors = [pid for pid in sorted(self.seen) if self._still_ours(pid)]
        labels = [process_label(pid) for pid in survivors]
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return labels


def ledger_entries(path: Path) -> list[tuple[str, int]]:
    """(run id, round) of a site's privacy ledger entries, read-only while the site writes."""
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT run_id, round FROM entries ORDER BY seq").fetchall()
    except sqlite3.OperationalError:  # created, schema not written yet
        return []
    finally:
        conn.close()
    return [(str(run_id), int(rnd)) for run_id, rnd in rows]


def wait_until(
    ready: Callable[[], bool],
    what: str,
    timeout: float,
    procs: Sequence[subprocess.Popen[bytes]] = (),
    poll: float = 0.1,
) -> float:
    """Poll ``ready`` until true (seconds waited); fail if ``timeout`` passes or a proc exits."""
    start = time.monotonic()
    while not ready():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"pid {proc.pid} exited with {proc.returncode} before {what}")
        time.sleep(poll)
    return time.monotonic() - start
