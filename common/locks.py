"""Lock files that say which running fedvault command holds a run folder or a kit.

A lock is an ``flock`` on a small file that names its holder (PID, start time, command).
The kernel drops an ``flock`` when its holder exits, however it exits (even SIGKILL), so a
lock left by a dead command is stale by construction and the next command takes it over;
the file itself is removed when its holder releases it. Within one process a lock is
reentrant (``fedvault simulate`` checks early and holds it for the run).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedvault.common.errors import InUseError

#: In a run directory: held by the `fedvault simulate` or `fedvault run` writing it.
RUN_LOCK = "fedvault.lock"
#: In a kit's state folder: held by the `fedvault client start` using the kit.
SITE_LOCK = "site.lock"
#: In a server kit's state folder: held by the `fedvault server start` serving the kit.
SERVER_LOCK = "server.lock"


@dataclass
class _Held:
    fd: int
    count: int


_held: dict[Path, _Held] = {}


def holder_pid(path: Path) -> int | None:
    """The PID a lock file names, or None if there is none (or it is unreadable)."""
    try:
        first = path.read_text(encoding="utf-8").split("\n", 1)[0]
    except OSError:
        return None
    key, _, value = first.partition("=")
    return int(value) if key == "pid" and value.strip().isdigit() else None


def _refuse(path: Path, what: str) -> InUseError:
    pid = holder_pid(path)
    holder = f"PID {pid}" if pid else "another process"
    return InUseError(
        f"{what} is in use by a running fedvault command ({holder}; lock {path})",
        path=str(path),
        pid=pid or 0,
        hint=f"Wait for it to finish, or stop it (Ctrl-C in its terminal, or `kill {pid}`)."
        if pid
        else None,
    )


def acquire(path: Path, what: str) -> None:
    """Take the lock at ``path`` (created if missing) or raise InUseError naming its holder.

    ``what`` names the locked thing in the message ("run directory runs/x"). A lock file
    whose holder died is taken over.
    """
    path = path.resolve()
    if path in _held:
        _held[path].count += 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refuse(path, what) from None
        # the holder before us may have removed the file between our open and our lock
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "?"
    os.write(fd, f"pid={os.getpid()}\nsince={started}\ncommand={command}\n".encode())
    _held[path] = _Held(fd=fd, count=1)


def release(path: Path) -> None:
    """Give back a lock this process holds (the file is removed at the last release)."""
    path = path.resolve()
    held = _held.get(path)
    if held is None:
        return
    held.count -= 1
    if held.count > 0:
        return
    del _held[path]
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.close(held.fd)  # closing drops the flock


def check(path: Path, what: str) -> None:
    """Raise InUseError if another process holds the lock at ``path``; takes nothing."""
    path = path.resolve()
    if path in _held or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _refuse(path, what) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def holding(path: Path, what: str) -> Iterator[None]:
    """``acquire`` for the duration of a ``with`` block."""
    acquire(path, what)
    try:
        yield
    finally:
        release(path)


def hold_until_exit(path: Path, what: str) -> None:
    """``acquire`` for the rest of this process (released by the kernel at exit, any exit)."""
    acquire(path, what)
    atexit.register(release, path)
