"""Start, watch and stop Flower processes (SuperLink, `flwr run`) for the coordinator side.

Every process runs in its own session so it and all its children (the simulation process,
Ray's workers, ServerApp subprocesses) can be stopped together by process group; every
port is a free port on 127.0.0.1 unless the caller names one; each launch gets its own
FLWR_HOME so nothing collides with other Flower processes on the machine. Every process is
also guarded by the command's watchdog (fedvault/runtime/watchdog.py): if the command dies, even by
SIGKILL, the watchdog stops everything it started.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from fedvault.common.errors import FederationError
from fedvault.runtime.watchdog import ensure_watchdog, guard

#: Environment for every Flower process fedvault starts: no telemetry, no update check,
#: no runtime dependency installation (nothing may be downloaded at run time).
QUIET_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
    "PYTHONUNBUFFERED": "1",
}

#: How often ``ManagedProcess.poll`` refreshes the descendants it remembers: a refresh scans
#: all of /proc (about 10 ms on a busy machine), and a run's follow loop polls its processes
#: four times a second; ``stop`` takes a fresh snapshot anyway.
RESCAN_SECONDS = 1.0

#: The Flower App description fedvault submits: components only, the code is the installed
#: fedvault package (so every site runs the code it installed and audited, not shipped code).
APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedvault"
version = "{version}"
description = "fedvault federated run"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedvault"

[tool.flwr.app.components]
serverapp = "fedvault.server.app:app"
clientapp = "{clientapp}"

[tool.flwr.app.config]
scenario-toml = ""
out-dir = ""
run-id = ""
resume = false            # continue the run in out-dir from its checkpoint
# Simulated sites' own settings (`fedvault simulate --ledger-dir/--site-max-epsilon`);
# a real site never reads these: its ledger and max-epsilon come from its node config.
simulated-ledger-dir = ""
simulated-site-max-epsilon = ""
# The coordinator's own records (`fedvault run`): the node id the SuperLink authenticated for
# each provisioned site (JSON {{"<node id>": "<site>"}}), and the file where it keeps each site's
# ledger head across runs, and its progress file (`fedvault server start` prints its events).
site-nodes = ""
ledger-record = ""
progress-record = ""
# Who draws the plots and report.html: "" the ServerApp, "command" `fedvault simulate` itself.
report-writer = ""
"""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def flower_bin(name: str) -> str:
    """Path of a Flower console script installed beside this Python."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def write_app_dir(path: Path, version: str, *, clientapp: str = "fedvault.client.app:app") -> Path:
    """Write the Flower App folder (`pyproject.toml` only) that `flwr run` builds a FAB from.

    ``clientapp`` is fedvault's own ClientApp; only tests name another (a misbehaving site).
    """
    path.mkdir(parents=True, exist_ok=True)
    text = APP_PYPROJECT.format(version=version, clientapp=clientapp)
    (path / "pyproject.toml").write_text(text, encoding="utf-8")
    return path


#: A terminal escape sequence (CSI: colours, cursor moves), as Flower's console handler
#: writes them even when its output is a file.
ANSI_ESCAPE = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]")

#: Log files that a running ManagedProcess of this command writes to, and how many.
_LIVE_LOGS: dict[Path, int] = {}


def strip_ansi(data: bytes) -> bytes:
    """``data`` without terminal escape sequences (Flower colours its log lines)."""
    return ANSI_ESCAPE.sub(b"", data)


def strip_ansi_file(path: Path, start: int = 0) -> None:
    """Remove terminal escape sequences from ``path`` after byte ``start``, in place.

    Only for a log file that no process writes to any more.
    """
    try:
        with path.open("r+b") as handle:
            handle.seek(start)
            data = handle.read()
            plain = strip_ansi(data)
            if plain != data:
                handle.seek(start)
                handle.write(plain)
                handle.truncate()
    except OSError:
        pass  # a log that cannot be rewritten keeps its colours


class ManagedProcess:
    """A child process in its own session, logged to a file, stopped with all its children.

    Flower colours its log lines even when they go to a file; once the last process writing
    a log file has stopped, the file is rewritten without the escape sequences.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str],
        cwd: Path | None = None,
    ) -> None:
        self.args = list(args)
        self.log_path = log_path
        self.env = dict(env)
        self.cwd = cwd
        self._log: IO[bytes] = log_path.open("ab")
        #: Where this process's output starts in its (appended) log file.
        self.log_start = self._log.tell()
        # Flower starts its helpers (flower-superexec, flwr-serverapp, ...) by name from PATH:
        # put this interpreter's bin folder first so an un-activated venv works too.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        full_env = {**os.environ, **QUIET_ENV, "PATH": path, **env}
        ensure_watchdog()  # running before the child exists, so no death goes unnoticed
        try:
            self.proc = subprocess.Popen(
                self.args,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as err:
            self._log.close()
            raise FederationError(f"could not start {self.args[0]}: {err}") from err
        self._log_key = log_path.resolve()
        _LIVE_LOGS[self._log_key] = _LIVE_LOGS.get(self._log_key, 0) + 1
        guard(self.proc.pid)
        # every descendant ever seen (pid -> kernel start time), even once orphaned
        self._seen: dict[int, int] = {}
        self._scanned_at = -math.inf
        self._log.write(
            f"fedvault: started pid={self.proc.pid} {Path(self.args[0]).name}\n".encode()
        )
        self._log.flush()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def restarted(self) -> ManagedProcess:
        """The same command started again (same log file, environment and folder)."""
        self.stop()
        return ManagedProcess(self.args, log_path=self.log_path, env=self.env, cwd=self.cwd)

    def own_log(self) -> str:
        """What this process (not an earlier one) wrote to its log file."""
        if not self.log_path.is_file():
            return ""
        with self.log_path.open("rb") as handle:
            handle.seek(self.log_start)
            return strip_ansi(handle.read()).decode("utf-8", errors="replace")

    def poll(self) -> int | None:
        """Exit code, or None while running; remembers the descendants seen meanwhile.

        The descendants are looked up at most every RESCAN_SECONDS.
        """
        if not self._log.closed and time.monotonic() - self._scanned_at >= RESCAN_SECONDS:
            self._scanned_at = time.monotonic()
            self._remember(descendants(self.proc.pid))
        return self.proc.poll()

    def _remember(self, pids: Sequence[int]) -> None:
        for pid in pids:
            started = _start_time(pid)
            if started is not None:
                self._seen.setdefault(pid, started)

    def _still_ours(self, pid: int) -> bool:
        """Alive and the very process seen before (not a recycled PID)."""
        return _alive(pid) and _start_time(pid) == self._seen.get(pid, _start_time(pid))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process and every descendant, gracefully first, by force after ``timeout``.

        Flower starts some children in sessions of their own (SuperExec), so the whole
        descendant tree is snapshotted before the leader is asked to stop, and whatever of
        it is still alive afterwards is killed. The PIDs are logged for later checks.
        """
        if self._log.closed:
            return
        self._remember(descendants(self.proc.pid))
        tree = sorted(self._seen)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._remember(descendants_of_all([p for p in tree if self._still_ours(p)]))
        survivors = [pid for pid in sorted(self._seen) if self._still_ours(pid)]
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._log.write(
            f"fedvault: stopped pid={self.proc.pid} descendants={tree} "
            f"killed={survivors}\n".encode()
        )
        self._log.close()
        left = _LIVE_LOGS.pop(self._log_key, 1) - 1
        if left:
            _LIVE_LOGS[self._log_key] = left
        else:
            strip_ansi_file(self.log_path, self.log_start)

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _proc_stats() -> list[tuple[int, str, int, int]]:
    """(pid, state, ppid, session) of every process, read from /proc."""
    stats = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            stats.append((int(stat.parent.name), fields[0], int(fields[1]), int(fields[3])))
        except (OSError, IndexError, ValueError):
            continue
    return stats


def _start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell recycled PIDs apart."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for child, state, ppid, _ in _proc_stats():
        if state != "Z":
            children.setdefault(ppid, []).append(child)
    found, todo = [], list(children.get(pid, []))
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return sorted(found)


def descendants_of_all(pids: Sequence[int]) -> list[int]:
    """Live descendants of any of ``pids`` (orphans re-parented to init are not followed)."""
    return sorted({d for pid in pids for d in descendants(pid)})


def session_members(session_id: int) -> list[int]:
    """PIDs of live processes in session ``session_id`` (Linux /proc), to prove a clean stop."""
    return sorted(pid for pid, state, _, sid in _proc_stats() if sid == session_id and state != "Z")


def run_until(
    process: ManagedProcess, should_stop: Callable[[], bool], poll_seconds: float = 0.5
) -> int | None:
    """Block until ``should_stop()`` or ``process`` exits; its exit code if it exited, else None."""
    while not should_stop():
        code = process.poll()
        if code is not None:
            return code
        time.sleep(poll_seconds)
    return None


def wait_http_ready(
    port: int, proc: ManagedProcess, timeout: float = 60.0, *, cafile: Path | None = None
) -> None:
    """Wait until a SuperLink answers on its HTTP(S) port, failing early if it exits.

    With ``cafile`` the endpoint is HTTPS and must present a certificate that CA issued.
    """
    deadline = time.monotonic() + timeout
    scheme = "https" if cafile else "http"
    url = f"{scheme}://127.0.0.1:{port}/health"
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FederationError(
                f"{Path(proc.args[0]).name} exited with code {proc.poll()} while starting",
                hint=f"See its log: {proc.log_path}",
            )
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=context) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise FederationError(
        f"{Path(proc.args[0]).name} did not become ready within {timeout:.0f}s",
        hint=f"See its log: {proc.log_path}",
    )


def write_connection(flwr_home: Path, name: str, address: str, *, root_cert: Path | None) -> None:
    """Write the `flwr` CLI's SuperLink connection (FLWR_HOME/config.toml)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', f"[superlink.{name}]", f'address = "{address}"']
    if root_cert is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{root_cert.resolve()}"')  # flwr needs absolute
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
