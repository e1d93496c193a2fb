"""Helpers for tests that run real fedvault deployment processes on loopback."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer

from server.launch import free_port


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
