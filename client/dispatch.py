"""A site's `flwr-clientapp`, first step: hand the task to the site's warm worker, or run cold.

Flower's SuperExec starts `flwr-clientapp --runtime-api-address A --token T ...` for every
message. At a site started by `fedvault client start`, that name is a script in the site's
state folder (client/launcher.py writes it) that runs this file with ``python -I -S``: the
standard library only, so it starts in milliseconds. It connects to the warm worker's Unix
socket (client/worker.py; the socket lies in the site's 0700 state folder) and sends it the
task: Flower's arguments, this process's environment and folder, and its stdin, stdout and
stderr (as file descriptors, so the task's output lands in the SuperNode's log as before).
The worker forks a task process that runs Flower's own ClientApp loop; this process waits
for its exit code, forwards SIGTERM / SIGINT / SIGHUP to it, and exits with it.

When no worker answers (none running, not yet started, or it died before taking the task),
this process becomes the cold launcher (``python -I -m fedvault.client.launcher``): the same bundle
check and ClientApp, in a fresh interpreter. Once the worker has taken the task, the task is
never started a second time: if the task process dies, this one exits with code 1.

Protocol (one connection per task): the client sends a 4-byte big-endian length with the
three descriptors attached (SCM_RIGHTS), then that many bytes of JSON
``{"argv": [...], "env": {...}, "cwd": "..."}``; the worker answers JSON lines:
``{"pid": N}`` once the task process runs, then ``{"exit": CODE}`` when it ends.

This file is copied into the site's state folder and run from there: it may import nothing
outside the standard library.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Iterator

#: Seconds to wait for a worker to accept the connection before running cold.
CONNECT_TIMEOUT_S = 5.0
#: Exit code when the task process died without reporting one (killed, for example).
LOST_TASK_EXIT = 1
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def send_task(sock: socket.socket, argv: list[str]) -> None:
    """Send the task: its arguments, environment, folder and standard streams."""
    body = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    socket.send_fds(sock, [struct.pack(">I", len(body))], [0, 1, 2])
    sock.sendall(body)


def read_lines(sock: socket.socket) -> Iterator[object]:
    """The worker's JSON lines, one object at a time, until it closes the connection."""
    buffer = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except InterruptedError:
            continue
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield json.loads(line)


def run_warm(socket_path: str, argv: list[str]) -> int | None:
    """The task's exit code from the warm worker; None when no worker took the task."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT_S)
        sock.connect(socket_path)
        send_task(sock, argv)
        sock.settimeout(None)
    except OSError:
        sock.close()
        return None
    task_pid = None

    def forward(signum: int, frame: object) -> None:
        if task_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(task_pid, signum)

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    try:
        for reply in read_lines(sock):
            if isinstance(reply, dict) and "pid" in reply:
                task_pid = int(reply["pid"])
            elif isinstance(reply, dict) and "exit" in reply:
                return int(reply["exit"])
    except (OSError, ValueError):
        pass
    finally:
        sock.close()
    if task_pid is None:
        return None  # the worker went away before it started the task: run it cold
    print(
        f"fedvault: the warm worker's task process {task_pid} ended without an exit code",
        file=sys.stderr,
        flush=True,
    )
    return LOST_TASK_EXIT


def main(args: list[str]) -> None:
    """``SOCKET N COLD_1 .. COLD_N FLOWER_ARGS...``: warm if the worker answers, else cold."""
    socket_path, count = args[0], int(args[1])
    cold, flower_args = args[2 : 2 + count], args[2 + count :]
    code = run_warm(socket_path, flower_args)
    if code is None:
        os.execv(cold[0], [*cold, *flower_args])
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
