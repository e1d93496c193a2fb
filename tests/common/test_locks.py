"""Tests for common/locks.py: a held lock names its holder's PID, a stale one is taken over."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedvault.common import locks
from fedvault.common.errors import InUseError

pytestmark = pytest.mark.unit


@pytest.fixture
def other_holder(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A lock held through a file description of its own, as another process would hold it."""
    path = tmp_path / "run" / locks.RUN_LOCK
    path.parent.mkdir()
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder = 424242
    os.write(fd, f"pid={holder}\nsince=now\ncommand=fedvault simulate\n".encode())
    try:
        yield path, holder
    finally:
        os.close(fd)


def test_a_held_lock_is_refused_naming_the_holders_pid(other_holder: tuple[Path, int]) -> None:
    path, holder = other_holder

    with pytest.raises(InUseError) as caught:
        locks.acquire(path, "run directory runs/x")

    assert caught.value.pid == holder
    assert f"run directory runs/x is in use by a running fedvault command (PID {holder}" in str(
        caught.value
    )
    assert f"kill {holder}" in caught.value.hint
    assert path.read_text().startswith(f"pid={holder}\n")  # the holder's file is untouched


def test_check_refuses_a_held_lock_without_taking_it(other_holder: tuple[Path, int]) -> None:
    path, holder = other_holder

    with pytest.raises(InUseError, match=f"PID {holder}"):
        locks.check(path, "run directory runs/x")


def test_a_stale_lock_naming_a_dead_pid_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / locks.RUN_LOCK
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(f"pid={dead.pid}\nsince=earlier\ncommand=fedvault simulate\n")

    locks.check(path, "run directory runs/x")
    locks.acquire(path, "run directory runs/x")
    try:
        assert locks.holder_pid(path) == os.getpid()
    finally:
        locks.release(path)

    assert not path.exists()


def test_a_lock_is_reentrant_in_its_process_and_removed_at_the_last_release(
    tmp_path: Path,
) -> None:
    path = tmp_path / locks.SITE_LOCK

    with locks.holding(path, "kit"):
        locks.check(path, "kit")  # its own holder is not refused
        with locks.holding(path, "kit"):
            pass
        assert locks.holder_pid(path) == os.getpid()

    assert not path.exists()
