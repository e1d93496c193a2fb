"""A site's warm worker: Flower, torch and Opacus imported and the site's data read once.

Flower 1.39 starts a fresh `flwr-clientapp` process for every message (two per site per
round); each would import Flower, torch, Opacus and scikit-learn and read, split, scale and
fingerprint the site's whole data file again. `fedvault client start` instead runs this
worker beside its SuperNode (``python -I -m fedvault.client.worker``). It imports what a task needs,
reads the site's data file once, then listens on a Unix socket in the site's 0700 state
folder. The site's `flwr-clientapp` (client/dispatch.py) hands each task to it; the worker
forks a **task process** that runs the same code as the cold launcher (client/launcher.py:
the bundle gate, then Flower's own ClientApp loop: pull the inputs with the task's token,
run fedvault's handler, push the reply) and exits.

What this keeps true:
- Nothing leaks between tasks: every task is a fresh fork of the same warm state, which
  never runs a task itself; each task reseeds Python's, NumPy's and torch's generators from
  OS entropy (a fork would otherwise repeat the parent's random state in every task).
  DP noise comes from its own generator seeded from OS entropy in any case.
- A failing task never takes the worker down; a dead worker is restarted by `fedvault
  client start`, and until it is back the dispatcher runs tasks cold.
- A changed data file is noticed before each task by its cheap identity (size, mtime,
  inode, hash of its first and last MiB; client/site.py) and read and fingerprinted again.
- CUDA is initialised only in a task process: the worker never touches torch's devices,
  and it runs no torch operation (a thread pool created before a fork would not survive
  it).
- The worker exits when `fedvault client start` dies (it polls its parent), so a SIGKILLed
  site leaves no warm worker behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

logger = logging.getLogger("fedvault.worker")

SOCKET_NAME = "worker.sock"
#: The task process's name (``/proc/PID/comm``), so an operator (and the crash test) can
#: tell the worker's task processes apart from the worker itself.
TASK_PROCESS_NAME = "fv-clientapp"
MAX_TASK_BYTES = 4 * 1024 * 1024  # a task's JSON (arguments, environment)
POLL_S = 0.5


# --- warming up -------------------------------------------------------------------------


def read_node_config(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        return tomllib.load(handle)


def warm_up(node_config: dict[str, Any]) -> float:
    """Import what a task needs and read the site's data once; seconds taken."""
    started = time.perf_counter()
    import flwr.supernode.cli.flwr_clientapp  # noqa: F401  Flower's ClientApp loop
    import opacus  # noqa: F401
    import torch._dynamo  # noqa: F401  imported by torch at a process's first optimizer

    import fedvault.client.app
    import fedvault.common.site_privacy
    import fedvault.common.training  # noqa: F401
    from fedvault.client.site import deployed_site
    from fedvault.common.config import parse_toml_text

    defaults = parse_toml_text("")
    site = deployed_site(
        str(node_config.get("site-name", "site")),
        str(node_config["data-path"]),
        str(node_config["label-column"]),
        defaults.seed,
        defaults.data.test_fraction,
    )
    logger.info(
        "site %s: %d training rows ready (fingerprint %s…)",
        site.name, len(site.data.train_y), site.fingerprint[:12],
    )  # fmt: skip
    return time.perf_counter() - started


def refresh_data(node_config: dict[str, Any]) -> None:
    """Re-read the site's data file if its cheap identity changed (before forking a task)."""
    from fedvault.client.site import site_file

    try:
        site_file(str(node_config["data-path"]), str(node_config["label-column"]))
    except Exception as err:  # the task will meet the same problem and refuse, with a reason
        logger.warning("site data could not be read: %s", err)


# --- one task ---------------------------------------------------------------------------


def receive_task(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The dispatcher's task (client/dispatch.py's protocol) and its standard streams."""
    header, fds, _, _ = socket.recv_fds(conn, 4, 3)
    try:
        if len(header) != 4 or len(fds) != 3:
            raise ValueError("malformed task header")
        (size,) = struct.unpack(">I", header)
        if size > MAX_TASK_BYTES:
            raise ValueError(f"task of {size} bytes")
        body = b""
        while len(body) < size and (chunk := conn.recv(size - len(body))):
            body += chunk
        task = json.loads(body)
        if not isinstance(task, dict) or not isinstance(task.get("argv"), list):
            raise ValueError("no argv")
    except (OSError, ValueError):  # a malformed task: its descriptors are not kept
        for fd in fds:
            os.close(fd)
        raise
    return task, fds


def _send(conn: socket.socket, **reply: int) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(reply).encode() + b"\n")


def _reseed() -> None:
    """Fresh random state in a task process: a fork copies the worker's."""
    import numpy as np
    import torch

    random.seed()
    np.random.seed()
    torch.seed()


def run_task(conn: socket.socket, task: dict[str, Any], fds: list[int], *, site: str,
             state: Path) -> int:  # fmt: skip
    """In the forked task process: become the `flwr-clientapp` the dispatcher stands for."""
    from fedvault.client.launcher import run_flower_clientapp

    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(TASK_PROCESS_NAME)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115  the dispatcher's own streams
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    root = logging.getLogger()  # as in a cold launch: the worker's own handler goes
    for handler in list(root.handlers):
        root.removeHandler(handler)
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in dict(task.get("env", {})).items()})
    with contextlib.suppress(OSError):
        os.chdir(str(task.get("cwd", "/")))
    _reseed()
    _send(conn, pid=os.getpid())
    code = 1
    try:
        run_flower_clientapp([str(a) for a in task["argv"]], site=site, state=state)
        code = 0
    except SystemExit as exit_:
        if isinstance(exit_.code, str):  # sys.exit("message"), as the interpreter shows it
            print(exit_.code, file=sys.stderr)
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException as err:  # reported on the SuperNode's log; the worker lives on
        print(f"fedvault: task failed: {type(err).__name__}: {err}", file=sys.stderr)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    _send(conn, exit=code)
    return code


def fork_task(conn: socket.socket, listener: socket.socket, *, site: str, state: Path) -> int:
    """Read one task from ``conn`` and fork its task process; the child's PID."""
    task, fds = receive_task(conn)
    pid = os.fork()
    if pid == 0:  # the task process: never returns
        code = 1
        try:
            listener.close()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            code = run_task(conn, task, fds, site=site, state=state)
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)
    return pid


# --- the worker -------------------------------------------------------------------------


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _reap(children: set[int]) -> None:
    for pid in list(children):
        with contextlib.suppress(ChildProcessError):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                continue
            logger.info("task %d ended: exit %s", pid, os.waitstatus_to_exitcode(status))
        children.discard(pid)


def listen(path: Path) -> socket.socket:
    """A Unix socket at ``path`` (a stale one from a dead worker is replaced), owner-only."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(16)
    return listener


def serve(listener: socket.socket, node_config: dict[str, Any], *, site: str, state: Path,
          parent: int) -> None:  # fmt: skip
    """Fork a task process per connection until SIGTERM or the parent's death."""
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: set[int] = set()
    while not stopping.is_set():
        if os.getppid() != parent:
            logger.info("fedvault client start (pid %d) is gone: the worker stops", parent)
            break
        _reap(children)
        if not selector.select(timeout=POLL_S):
            continue
        with contextlib.suppress(BlockingIOError, InterruptedError):
            conn, _ = listener.accept()
            with conn:
                if _peer_uid(conn) != os.getuid():
                    logger.warning("refused a connection from another user")
                    continue
                refresh_data(node_config)
                try:
                    pid = fork_task(conn, listener, site=site, state=state)
                    children.add(pid)
                    logger.info("task %d started", pid)
                except (OSError, ValueError) as err:
                    logger.warning("could not start a task: %s", err)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -I -m fedvault.client.worker")
    parser.add_argument("--site", required=True)
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--node-config", required=True, type=Path)
    parser.add_argument("--parent-pid", required=True, type=int, help="`fedvault client start`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="fedvault worker: %(message)s")
    logger.setLevel(logging.INFO)
    node_config = read_node_config(args.node_config)
    listener = listen(args.state / SOCKET_NAME)  # tasks wait in its backlog while warming up
    try:
        seconds = warm_up(node_config)
        # Native BLAS pools (OpenBLAS) reset themselves in a fork; a Python thread could
        # hold a lock that its copy in the task process never releases.
        if threading.active_count() > 1:
            logger.warning("%s running before forking tasks", threading.enumerate())
        logger.info("ready in %.1f s (pid %d)", seconds, os.getpid())
        serve(listener, node_config, site=args.site, state=args.state, parent=args.parent_pid)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            (args.state / SOCKET_NAME).unlink()
    # Nothing is left to finalise (tasks run in their own processes): unloading torch and
    # Flower can take seconds on a busy machine, during which a stopping site would wait.
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
