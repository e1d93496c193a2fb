"""Tests for client/worker.py and client/dispatch.py: the warm site worker and its dispatcher.

The tasks here are Flower's own `flwr-clientapp` command line without a SuperNode behind it
(``--help``, a missing token): enough to see which process ran it, where its output went and
with what exit code. tests/client/test_ledger_crash.py and tests/test_readme_deploy.py run
real tasks through the worker in a deployment.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fedvault.client.deploy import NODE_CONFIG_FILE, write_node_config
from fedvault.client.launcher import write_launcher_script
from fedvault.client.site import site_file
from fedvault.client.worker import SOCKET_NAME, _reseed, receive_task
from tests.deployment import write_site_csvs

WARM_UP_S = 180.0  # importing torch, Opacus and Flower on a loaded 2-core machine


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    state: Path
    log: Path
    script: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, count: int = 1, timeout: float = WARM_UP_S) -> None:
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.log_text())) < count:
            assert self.proc.poll() is None, self.log_text()
            assert time.monotonic() < deadline, f"no {pattern!r} in: {self.log_text()}"
            time.sleep(0.1)

    def task(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The site's `flwr-clientapp` script, as Flower's SuperExec would run it."""
        return subprocess.run(
            [str(self.script), *args], capture_output=True, text=True, timeout=300, check=False
        )


def start_worker(tmp_path: Path) -> Worker:
    state = tmp_path / "state"
    state.mkdir(mode=0o700, parents=True)
    [data] = write_site_csvs(tmp_path, 1)
    node_config = write_node_config(
        state / NODE_CONFIG_FILE,
        {"site-name": "site-a", "data-path": str(data), "label-column": "diagnosis"},
    )
    log = state / "worker.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "fedvault.client.worker", "--site", "site-a",
             "--state", str(state), "--node-config", str(node_config),
             "--parent-pid", str(os.getpid())],
            stdout=handle, stderr=subprocess.STDOUT,
        )  # fmt: skip
    script = write_launcher_script(state, site="site-a", worker_socket=state / SOCKET_NAME)
    return Worker(proc, state, log, script)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    started = start_worker(tmp_path_factory.mktemp("worker"))
    try:
        started.wait_for(r"ready in")
        yield started
    finally:
        if started.proc.poll() is None:
            started.proc.kill()
        started.proc.wait(timeout=30)


@pytest.mark.integration
def test_a_task_runs_in_the_warm_worker_with_the_dispatchers_streams(worker: Worker) -> None:
    # Execute: Flower's flwr-clientapp --help, through the site's script
    before = worker.log_text().count("started")
    result = worker.task("--help")

    # Assert: the worker forked a task for it; its output came back on our stdout
    assert result.returncode == 0, result.stderr
    assert "--runtime-api-address" in result.stdout  # Flower's own parser answered
    worker.wait_for(r"task \d+ ended: exit 0")
    assert worker.log_text().count("started") == before + 1
    mode = stat.S_IMODE((worker.state / SOCKET_NAME).stat().st_mode)
    assert mode & 0o077 == 0  # only the site's own user may hand the worker a task


@pytest.mark.integration
def test_a_failing_task_does_not_take_the_worker_down(worker: Worker) -> None:
    # Execute: a task Flower refuses (an empty token), then an ordinary one
    failed = worker.task("--token", "")
    after = worker.task("--help")

    # Assert: the failure was reported as Flower reports it; the worker served the next one
    assert failed.returncode == 1
    assert "does not contain a token" in failed.stderr
    assert after.returncode == 0, after.stderr
    assert worker.proc.poll() is None


@pytest.mark.integration
def test_without_a_worker_a_task_runs_cold(tmp_path: Path) -> None:
    # Prepare: a worker that was killed (its socket file stays behind) and one never started
    dead = start_worker(tmp_path / "dead")
    dead.wait_for(r"ready in")
    dead.proc.send_signal(signal.SIGKILL)
    dead.proc.wait(timeout=30)
    assert (dead.state / SOCKET_NAME).exists()

    # Execute
    result = dead.task("--help")

    # Assert: the cold launcher (a fresh, isolated interpreter) answered instead
    assert result.returncode == 0, result.stderr
    assert "--runtime-api-address" in result.stdout
    assert "task" not in dead.log_text().split("ready in", 1)[1]


@pytest.mark.integration
def test_the_worker_stops_when_its_parent_dies(tmp_path: Path) -> None:
    # Prepare: a parent that starts the worker in its own session and is then SIGKILLed
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    [data] = write_site_csvs(tmp_path, 1)
    node_config = write_node_config(
        state / NODE_CONFIG_FILE,
        {"site-name": "site-a", "data-path": str(data), "label-column": "diagnosis"},
    )
    code = (
        "import os, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-I', '-m', 'fedvault.client.worker', '--site', 'a',"
        f" '--state', {str(state)!r}, '--node-config', {str(node_config)!r},"
        " '--parent-pid', str(os.getpid())],"
        f" stdout=open({str(state / 'worker.log')!r}, 'wb'), stderr=subprocess.STDOUT,"
        " start_new_session=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    assert parent.stdout is not None
    worker_pid = int(parent.stdout.readline())

    # Execute
    parent.kill()
    parent.wait(timeout=30)

    # Assert: the worker, once warm, noticed and left (its socket too)
    deadline = time.monotonic() + WARM_UP_S
    while _alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(worker_pid):
        os.kill(worker_pid, signal.SIGKILL)
        pytest.fail("the worker outlived its parent")
    assert "is gone: the worker stops" in (state / "worker.log").read_text()
    assert not (state / SOCKET_NAME).exists()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --- fork and state (unit) -----------------------------------------------------------------


def _forked(reseed: bool) -> tuple[int, float, float]:
    """(torch seed, a NumPy draw, a Python draw) in a fork of this process."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            if reseed:
                _reseed()
            draws = f"{torch.initial_seed()} {np.random.random()} {random.random()}"
            os.write(write, draws.encode())
        finally:
            os._exit(0)
    os.close(write)
    text = os.read(read, 200).decode()
    os.close(read)
    os.waitpid(pid, 0)
    seed, numpy_draw, python_draw = text.split()
    return int(seed), float(numpy_draw), float(python_draw)


@pytest.mark.unit
def test_each_task_process_draws_fresh_random_state() -> None:
    # Without reseeding, two forks repeat their parent's torch and NumPy random state exactly
    # (Python's own `random` reseeds itself in a fork child)
    assert _forked(reseed=False)[:2] == _forked(reseed=False)[:2]

    # Each task process reseeds every generator from OS entropy
    first, second = _forked(reseed=True), _forked(reseed=True)
    assert all(a != b for a, b in zip(first, second, strict=True))


@pytest.mark.unit
def test_the_site_file_is_read_again_only_when_it_changed(tmp_path: Path) -> None:
    # Prepare
    [data] = write_site_csvs(tmp_path, 1)
    first = site_file(str(data), "diagnosis")

    # Execute: an unchanged file, then one cell changed (same size)
    same = site_file(str(data), "diagnosis")
    text = data.read_text()
    cell = text.splitlines()[1].split(",")[0]
    data.write_text(text.replace(cell, cell[:-1] + ("1" if cell[-1] != "1" else "2"), 1))
    changed = site_file(str(data), "diagnosis")

    # Assert: the same read object until the content changed; then a new fingerprint
    assert same is first
    assert changed is not first and changed.fingerprint != first.fingerprint
    assert len(changed.dataset) == len(first.dataset)


@pytest.mark.unit
def test_a_malformed_task_is_refused_and_its_streams_are_not_kept() -> None:
    # Prepare: a task whose JSON names no arguments, sent with three descriptors
    ours, theirs = socket.socketpair()
    read, write = os.pipe()
    body = b'{"env": {}}'
    socket.send_fds(theirs, [struct.pack(">I", len(body))], [read, read, write])
    theirs.sendall(body)

    before = _pipes()

    # Execute / Assert
    with pytest.raises(ValueError, match="no argv"):
        receive_task(ours)
    assert _pipes() == before  # the copies the worker received were closed again
    for sock in (ours, theirs):
        sock.close()
    os.close(read)
    os.close(write)


def _pipes() -> set[int]:
    """This process's open descriptors that are pipes."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(os.fstat(int(name)).st_mode):
                found.add(int(name))
    return found
