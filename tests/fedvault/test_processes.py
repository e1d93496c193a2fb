"""Tests for fedvault.runtime.processes: free ports, the Flower App folder, the CLI connection
file, and ManagedProcess stopping a whole process tree (including a child in a session of its own).

The processes are small Python scripts, never Flower. Every process a test starts carries
the test's own tmp_path in its command line; the ``spawned`` fixture stops every
ManagedProcess and SIGKILLs any such process still alive at teardown, even on failure.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flwr.cli.config_utils import load_and_validate
from flwr.cli.flower_config import read_superlink_connection
from flwr.supercore.logger import ConsoleHandler

from fedvault.common.errors import FederationError
from fedvault.runtime.processes import (
    QUIET_ENV,
    ManagedProcess,
    _alive,
    descendants,
    free_port,
    strip_ansi,
    wait_http_ready,
    write_app_dir,
    write_connection,
)

pytestmark = pytest.mark.unit

# A leader that starts a child in its own session; the child starts a grandchild that
# detaches (os.setsid, as Flower's SuperExec does). Each records its pid once running.
GRANDCHILD = (
    "import os, sys, time; os.setsid(); d = sys.argv[1]; "
    "open(d + '/grandchild.tmp', 'w').write(str(os.getpid())); "
    "os.replace(d + '/grandchild.tmp', d + '/grandchild.pid'); time.sleep(3600)"
)
CHILD = (
    "import os, subprocess, sys, time; d = sys.argv[1]; "
    f"subprocess.Popen([sys.executable, '-c', {GRANDCHILD!r}, d]); "
    "time.sleep(3600)"
)
LEADER = (
    "import os, subprocess, sys, time; d = sys.argv[1]; "
    f"c = subprocess.Popen([sys.executable, '-c', {CHILD!r}, d]); "
    "open(d + '/child.tmp', 'w').write(str(c.pid)); "
    "os.replace(d + '/child.tmp', d + '/child.pid'); "
    "print('leader running', flush=True); time.sleep(3600)"
)
SLEEPS = "import time; time.sleep(3600)"
# Prints its second argument (a coloured log line), then waits to be stopped.
PRINTS = "import sys, time; print(sys.argv[2], flush=True); time.sleep(3600)"
IGNORES_SIGTERM = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "open(sys.argv[1] + '/ready', 'w').close(); time.sleep(3600)"
)
WRITES_ENV = (
    "import json, os, sys; "
    "open(sys.argv[1] + '/env.tmp', 'w').write(json.dumps(dict(os.environ))); "
    "os.replace(sys.argv[1] + '/env.tmp', sys.argv[1] + '/env.json')"
)
HEALTH_SERVER = """
import http.server, sys
status = int(sys.argv[3])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(status if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[2])), Health).serve_forever()
"""

Spawn = Callable[..., ManagedProcess]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _ours(marker: str) -> list[int]:
    """Live processes whose command line carries ``marker`` (this test's tmp_path)."""
    pids = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
    return [p for p in pids if p != os.getpid() and marker in _cmdline(p) and _alive(p)]


@pytest.fixture
def spawned(tmp_path: Path) -> Iterator[Spawn]:
    """Start ``python -c CODE tmp_path [args]`` as a ManagedProcess; clean everything up after."""
    started: list[ManagedProcess] = []
    marker = str(tmp_path)

    def spawn(code: str, *args: str, env: dict[str, str] | None = None) -> ManagedProcess:
        proc = ManagedProcess(
            [sys.executable, "-c", code, marker, *args],
            log_path=tmp_path / f"proc-{len(started)}.log",
            env=env or {},
        )
        started.append(proc)
        return proc

    try:
        yield spawn
    finally:
        for proc in started:
            proc.stop(timeout=1.0)
        for pid in _ours(marker):  # only processes carrying this test's own tmp_path
            os.kill(pid, signal.SIGKILL)


def wait_for_file(path: Path, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} did not appear within {timeout}s")
        time.sleep(0.05)
    return path.read_text()


def wait_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- ports and files -----------------------------------------------------------------------------


def test_free_port_returns_a_port_that_can_be_bound_on_loopback() -> None:
    # Execute
    port = free_port()

    # Assert: a real port, and nobody holds it
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()


def test_write_app_dir_writes_a_flower_app_description_with_fedvaults_components(
    tmp_path: Path,
) -> None:
    # Prepare
    folder = tmp_path / "nested" / "app"

    # Execute
    result = write_app_dir(folder, "1.2.3")

    # Assert: the components and run-config keys the ServerApp reads, and Flower accepts it
    assert result == folder
    data = tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8"))
    assert data["project"]["version"] == "1.2.3"
    app = data["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "fedvault.server.app:app",
        "clientapp": "fedvault.client.app:app",
    }
    assert set(app["config"]) == {
        "scenario-toml",
        "out-dir",
        "run-id",
        "resume",
        "simulated-ledger-dir",
        "simulated-site-max-epsilon",
        "site-nodes",
        "ledger-record",
        "progress-record",
        "report-writer",
    }
    _, warnings = load_and_validate(folder / "pyproject.toml", check_module=False)
    assert warnings == []


def test_write_connection_without_a_certificate_is_insecure_and_flower_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    home = tmp_path / "flwr-home"

    # Execute
    write_connection(home, "fedvault-local", "127.0.0.1:9093", root_cert=None)

    # Assert: the file itself ...
    data = tomllib.loads((home / "config.toml").read_text(encoding="utf-8"))
    assert data["superlink"]["default"] == "fedvault-local"
    assert data["superlink"]["fedvault-local"] == {"address": "127.0.0.1:9093", "insecure": True}
    # ... and the `flwr` CLI's own reader, pointed at this FLWR_HOME
    monkeypatch.setenv("FLWR_HOME", str(home))
    connection = read_superlink_connection()
    assert connection.name == "fedvault-local"
    assert connection.address == "127.0.0.1:9093"
    assert connection.insecure is True
    assert connection.root_certificates is None


def test_write_connection_with_a_certificate_names_it_and_is_not_insecure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    home, cert = tmp_path / "flwr-home", tmp_path / "kit" / "ca.crt"

    # Execute
    write_connection(home, "coordinator", "10.0.0.5:9093", root_cert=cert)

    # Assert
    data = tomllib.loads((home / "config.toml").read_text(encoding="utf-8"))
    assert data["superlink"]["coordinator"] == {
        "address": "10.0.0.5:9093",
        "root-certificates": str(cert),
    }
    monkeypatch.setenv("FLWR_HOME", str(home))
    connection = read_superlink_connection("coordinator")
    assert connection.root_certificates == str(cert)
    assert connection.insecure is False


def test_write_connection_with_a_relative_certificate_path_is_still_readable_by_flower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "flwr-home"

    # Execute
    write_connection(home, "coordinator", "10.0.0.5:9093", root_cert=Path("kit/ca.crt"))

    # Assert
    monkeypatch.setenv("FLWR_HOME", str(home))
    connection = read_superlink_connection("coordinator")
    assert connection.root_certificates == str(tmp_path / "kit" / "ca.crt")


# --- ManagedProcess ------------------------------------------------------------------------------


def test_stop_kills_the_leader_its_child_and_a_detached_grandchild(
    spawned: Spawn, tmp_path: Path
) -> None:
    # Prepare: the whole tree is running, the grandchild in a session of its own
    proc = spawned(LEADER)
    child = int(wait_for_file(tmp_path / "child.pid"))
    grandchild = int(wait_for_file(tmp_path / "grandchild.pid"))
    assert os.getsid(proc.pid) == proc.pid  # the leader heads its own session
    assert os.getsid(child) == proc.pid
    assert os.getsid(grandchild) == grandchild  # detached: the leader's killpg cannot reach it
    assert {child, grandchild} <= set(descendants(proc.pid))

    # Execute
    proc.stop(timeout=5.0)

    # Assert: nothing of the tree survives
    assert proc.poll() == -signal.SIGTERM  # asked politely first, and it complied
    assert wait_dead(child)
    assert wait_dead(grandchild)
    assert not _alive(proc.pid)
    log = proc.log_path.read_text()
    assert f"fedvault: started pid={proc.pid} " in log
    assert "leader running" in log  # the process's own output goes to the same log
    stopped = [line for line in log.splitlines() if line.startswith("fedvault: stopped")]
    assert len(stopped) == 1
    assert stopped[0].startswith(f"fedvault: stopped pid={proc.pid} descendants=[")
    listed = stopped[0].split("descendants=[", 1)[1].split("]", 1)[0]
    assert {child, grandchild} <= {int(p) for p in listed.split(",")}
    killed = stopped[0].split("killed=[", 1)[1].split("]", 1)[0]
    assert grandchild in {int(p) for p in killed.split(",")}  # the detached one, killed directly


def test_stop_twice_is_harmless(spawned: Spawn) -> None:
    # Prepare
    proc = spawned(SLEEPS)
    proc.stop(timeout=5.0)

    # Execute
    proc.stop(timeout=5.0)
    with proc:  # the context manager stops again on exit
        pass

    # Assert: one stop line, no error
    assert not _alive(proc.pid)
    log = proc.log_path.read_text()
    assert log.count("fedvault: stopped") == 1


def test_a_process_that_ignores_sigterm_is_killed_after_the_timeout(
    spawned: Spawn, tmp_path: Path
) -> None:
    # Prepare: the SIGTERM handler is installed before we stop it
    proc = spawned(IGNORES_SIGTERM)
    wait_for_file(tmp_path / "ready")

    # Execute
    started = time.monotonic()
    proc.stop(timeout=1.0)
    took = time.monotonic() - started

    # Assert: it waited the grace period, then SIGKILL
    assert proc.poll() == -signal.SIGKILL
    assert not _alive(proc.pid)
    assert 0.9 <= took < 8.0


def test_the_child_gets_quiet_env_and_this_pythons_bin_folder_first_on_path(
    spawned: Spawn, tmp_path: Path
) -> None:
    # Prepare
    flwr_home = str(tmp_path / "flwr-home")

    # Execute
    proc = spawned(WRITES_ENV, env={"FLWR_HOME": flwr_home})
    env = json.loads(wait_for_file(tmp_path / "env.json"))
    proc.proc.wait(timeout=10)

    # Assert
    for key, value in QUIET_ENV.items():
        assert env[key] == value
    assert env["FLWR_HOME"] == flwr_home
    first = env["PATH"].split(os.pathsep)[0]
    assert first == str(Path(sys.executable).parent)
    assert (Path(first) / "flower-superlink").exists()  # Flower's helpers are found there


def test_a_program_that_cannot_start_raises_federation_error(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(FederationError, match="could not start"):
        ManagedProcess([str(tmp_path / "no-such-program")], log_path=tmp_path / "x.log", env={})


# --- wait_http_ready -----------------------------------------------------------------------------


def test_wait_http_ready_fails_fast_when_the_process_exits(spawned: Spawn) -> None:
    # Prepare
    proc = spawned("import sys; sys.exit(3)")

    # Execute
    started = time.monotonic()
    with pytest.raises(FederationError, match="exited with code 3") as info:
        wait_http_ready(free_port(), proc, timeout=30.0)

    # Assert: long before the timeout, pointing at the log
    assert time.monotonic() - started < 10.0
    assert str(proc.log_path) in info.value.hint


def test_wait_http_ready_returns_once_health_answers_200(spawned: Spawn) -> None:
    # Prepare
    port = free_port()
    proc = spawned(HEALTH_SERVER, str(port), "200")

    # Execute
    started = time.monotonic()
    wait_http_ready(port, proc, timeout=20.0)

    # Assert: it returned because the server answered, which it still does
    assert time.monotonic() - started < 20.0
    assert proc.poll() is None


def test_wait_http_ready_times_out_while_health_is_not_200(spawned: Spawn) -> None:
    # Prepare: a server that answers, but not "healthy"
    port = free_port()
    proc = spawned(HEALTH_SERVER, str(port), "503")

    # Execute / Assert
    with pytest.raises(FederationError, match="did not become ready within 1s"):
        wait_http_ready(port, proc, timeout=1.0)
    assert proc.poll() is None  # it was not the process dying


# --- logs without terminal colours -----------------------------------------------------------


def _flower_line(*, colored: bool) -> str:
    """A log line as Flower's console handler writes it, with or without colours."""
    record = logging.LogRecord("flwr", logging.WARNING, __file__, 1, "round 2 of 5", None, None)
    return ConsoleHandler(colored=colored).format(record)


def test_strip_ansi_turns_a_coloured_flower_line_into_the_plain_one() -> None:
    # Prepare
    coloured = _flower_line(colored=True)
    assert "\x1b[" in coloured

    # Execute
    plain = strip_ansi(coloured.encode()).decode()

    # Assert
    assert plain == _flower_line(colored=False)


def test_a_shared_log_loses_its_colours_once_its_last_writer_stopped(
    spawned: Spawn, tmp_path: Path
) -> None:
    # Prepare: two processes writing one log file (as SuperLink and `flwr run` share flower.log)
    log_path = tmp_path / "flower.log"
    first = ManagedProcess(
        [sys.executable, "-c", PRINTS, str(tmp_path), _flower_line(colored=True)],
        log_path=log_path,
        env={},
    )
    second = ManagedProcess(
        [sys.executable, "-c", PRINTS, str(tmp_path), _flower_line(colored=True)],
        log_path=log_path,
        env={},
    )
    try:
        deadline = time.monotonic() + 15
        while log_path.read_text().count("round 2 of 5") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)

        # Execute
        second.stop(timeout=1.0)
        while_first_runs = log_path.read_text()
        first.stop(timeout=1.0)
    finally:
        first.stop(timeout=1.0)
        second.stop(timeout=1.0)

    # Assert: untouched while one writer was left, plain (and complete) after the last
    assert "\x1b[" in while_first_runs
    text = log_path.read_text()
    assert "\x1b" not in text
    assert text.count(_flower_line(colored=False)) == 2
    assert text.count("fedvault: stopped") == 2
    assert "round 2 of 5" in first.own_log()
