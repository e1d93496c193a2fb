"""One command at a time per kit and per run directory: `fedvault server start` holds its kit's
lock and `fedvault run` its run directory's while they work, and a second one is refused with
one line naming the holder's PID, a hint and exit code 11 (common/locks.py).

Each command runs in this process through fedvault.cli.app.main; no SuperLink is started: the
coordinator and the run are replaced by stand-ins that look at the lock and stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedvault.common import locks
from fedvault.common.errors import FederationError, InUseError
from fedvault.server.provision import provision_federation

from .conftest import CliResult

pytestmark = pytest.mark.unit

OTHER_PID = 424242  # the PID another fedvault command wrote into the lock it holds


@pytest.fixture
def kit(tmp_path: Path) -> Path:
    """A provisioned server kit of its own (its state/ is this test's)."""
    fed = provision_federation(
        name="locks",
        server_address="127.0.0.1:9092",
        sites=("clinic-a", "clinic-b"),
        out=tmp_path / "fed",
    )
    return fed / "server"


@contextlib.contextmanager
def held_by_another_process(path: Path) -> Iterator[None]:
    """Hold the lock at ``path`` through a file description of its own, as another command
    would (flock locks of two descriptions conflict, even in one process), naming OTHER_PID."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"pid={OTHER_PID}\nsince=now\ncommand=fedvault\n".encode())
    try:
        yield
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def locked_elsewhere(path: Path) -> bool:
    """Whether some holder (not a new description of ours) has the lock at ``path`` now."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def assert_refused_as_in_use(result: CliResult, *facts: str) -> None:
    assert result.code == InUseError.exit_code == 11, result.err
    assert len(result.err_lines) == 2, result.err
    error_line, hint_line = result.err_lines
    assert error_line.startswith("error: ")
    assert f"is in use by a running fedvault command (PID {OTHER_PID}" in error_line
    for fact in facts:
        assert fact in error_line
    assert hint_line == (
        f"hint: Wait for it to finish, or stop it (Ctrl-C in its terminal, or `kill {OTHER_PID}`)."
    )
    assert "Traceback" not in result.out + result.err
    assert result.out == ""


@pytest.fixture
def no_coordinator_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    def started(*_: Any, **__: Any) -> None:
        raise AssertionError("a refused `server start` got as far as starting the SuperLink")

    monkeypatch.setattr("fedvault.server.deploy.start_coordinator", started)


@pytest.fixture
def coordinator_running(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`fedvault run` finds a coordinator for the kit (none is started)."""
    monkeypatch.setattr(
        "fedvault.server.deploy.running_coordinator", lambda kit: (tmp_path / "home", "127.0.0.1:1")
    )
    monkeypatch.setattr(
        "fedvault.server.deploy.site_nodes", lambda kit: {"clinic-a": 1, "clinic-b": 2}
    )
    monkeypatch.setattr(
        "fedvault.server.deploy.ledger_record_path", lambda kit: tmp_path / "record.json"
    )


# --- fedvault server start --------------------------------------------------------------------


@pytest.mark.usefixtures("no_coordinator_starts")
def test_a_second_server_start_with_the_same_kit_is_refused_naming_the_pid(
    kit: Path, fedvault_cli: Callable[..., CliResult]
) -> None:
    # Prepare
    lock = kit / "state" / locks.SERVER_LOCK

    # Execute
    with held_by_another_process(lock):
        result = fedvault_cli("server", "start", "--kit", str(kit))

    # Assert
    assert_refused_as_in_use(result, f"the coordinator's kit {kit}", f"lock {lock}")


def test_server_start_holds_its_kit_lock_while_it_serves_and_gives_it_back(
    kit: Path, fedvault_cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a stand-in coordinator that looks at the lock, then stops the command
    lock = kit / "state" / locks.SERVER_LOCK
    seen: dict[str, Any] = {}

    def start_coordinator(server_kit: Any, **_: Any) -> None:
        seen["holder"] = locks.holder_pid(lock)
        seen["locked"] = locked_elsewhere(lock)
        seen["state_mode"] = (kit / "state").stat().st_mode & 0o777
        raise FederationError("stand-in coordinator stopped")

    monkeypatch.setattr("fedvault.server.deploy.start_coordinator", start_coordinator)

    # Execute
    result = fedvault_cli("server", "start", "--kit", str(kit))

    # Assert
    assert result.code == FederationError.exit_code, result.err
    assert seen == {"holder": os.getpid(), "locked": True, "state_mode": 0o700}
    assert not lock.exists()  # given back when the command ended


# --- fedvault run -------------------------------------------------------------------------------


@pytest.mark.usefixtures("coordinator_running")
def test_run_holds_the_run_directory_lock_while_it_runs_and_gives_it_back(
    kit: Path,
    tmp_path: Path,
    fedvault_cli: Callable[..., CliResult],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a stand-in run that looks at the lock, then ends the command
    run_dir = tmp_path / "runs" / "study"
    lock = run_dir / locks.RUN_LOCK
    seen: dict[str, Any] = {}

    def run_app(cfg: Any, directory: Any, **_: Any) -> None:
        seen["holder"] = locks.holder_pid(lock)
        seen["locked"] = locked_elsewhere(lock)
        raise FederationError("stand-in run stopped")

    monkeypatch.setattr("fedvault.server.runs.run_app", run_app)

    # Execute
    result = fedvault_cli("run", "--kit", str(kit), "--out", str(run_dir))

    # Assert
    assert result.code == FederationError.exit_code, result.err
    assert seen == {"holder": os.getpid(), "locked": True}
    assert not lock.exists()


@pytest.mark.usefixtures("coordinator_running")
@pytest.mark.parametrize("how", ["--resume", "--out"])
def test_run_on_a_run_directory_another_command_writes_is_refused_naming_the_pid(
    kit: Path,
    tmp_path: Path,
    fedvault_cli: Callable[..., CliResult],
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    # Prepare: a live run's directory; a run that got past the lock would fail the test
    run_dir = tmp_path / "runs" / "study"
    lock = run_dir / locks.RUN_LOCK

    def run_app(*_: Any, **__: Any) -> None:
        raise AssertionError("a refused `fedvault run` got as far as submitting the run")

    monkeypatch.setattr("fedvault.server.runs.run_app", run_app)

    # Execute
    with held_by_another_process(lock):
        result = fedvault_cli("run", "--kit", str(kit), how, str(run_dir))
        holder_after = locks.holder_pid(lock)

    # Assert
    assert_refused_as_in_use(result, f"run directory {run_dir}")
    assert holder_after == OTHER_PID  # the holder's lock file is untouched
