"""`fedvault server start`: the federation's SuperLink over TLS with SuperNode authentication.

The SuperLink's Fleet API (gRPC + TLS) listens where the kit says (or ``--listen``); its
Control API (HTTPS, same certificate) listens on 127.0.0.1 only, for `fedvault run` on this
machine. Every site whose public key is in the kit is registered, so only provisioned
sites can join. State persists in the kit's ``state/`` folder.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from common.errors import FederationError, ProvisioningError
from server.launch import (
    QUIET_ENV,
    ManagedProcess,
    flower_bin,
    free_port,
    run_until,
    wait_http_ready,
    write_connection,
)
from server.provision import Kit, parse_server_address

CONNECTION = "fedvault-coordinator"
SERVER_STATE = "server.json"  # in the kit's state folder: where the running SuperLink listens


@dataclass(frozen=True)
class Coordinator:
    """A running federation SuperLink and where to reach it."""

    process: ManagedProcess
    fleet_address: str
    control_port: int
    flwr_home: Path
    registered: tuple[str, ...]


def flwr_home_for(kit: Kit) -> Path:
    return kit.path / "state" / "flwr-home"


def _state_dir(kit: Kit) -> Path:
    state = kit.path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    return state


def register_sites(kit: Kit, home: Path) -> list[str]:
    """Register every provisioned site's public key with the SuperLink (idempotent)."""
    registered = []
    env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(home)}
    for site, public_key in sorted(kit.site_public_keys.items()):
        result = subprocess.run(
            [flower_bin("flwr"), "supernode", "register", str(public_key), CONNECTION,
             "--name", site, "--format", "json"],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        try:
            answer = json.loads(result.stdout[result.stdout.index("{") :])
        except ValueError:
            answer = {"success": False, "error-message": (result.stdout + result.stderr)[-300:]}
        message = str(answer.get("error-message", ""))
        if not answer.get("success") and "already in use" not in message:
            raise FederationError(
                f"could not register site {site}'s key with the SuperLink: {message.strip()}"
            )
        registered.append(site)
    return registered


def start_coordinator(kit: Kit, *, listen: str | None = None) -> Coordinator:
    """Start the SuperLink for ``kit`` (a server kit), register its sites, wait until ready."""
    if kit.role != "server" or kit.cert is None or kit.key is None:
        raise ProvisioningError(f"{kit.path} is a {kit.role} kit, not the server kit")
    host, port = parse_server_address(
        listen or f"0.0.0.0:{parse_server_address(kit.server_address)[1]}"
    )
    fleet = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    state = _state_dir(kit)
    home = flwr_home_for(kit)
    control_port = free_port()
    write_connection(home, CONNECTION, f"127.0.0.1:{control_port}", root_cert=kit.ca_cert)
    process = ManagedProcess(
        [
            flower_bin("flower-superlink"),
            "--ssl-ca-certfile", str(kit.ca_cert),
            "--ssl-certfile", str(kit.cert),
            "--ssl-keyfile", str(kit.key),
            "--enable-supernode-auth",
            "--database", str(state / "superlink.db"),
            "--fleet-api-address", fleet,
            "--host", "127.0.0.1",
            "--port", str(control_port),
            "--isolation", "subprocess",
            "--disable-runtime-dependency-installation",
        ],
        log_path=state / "superlink.log",
        env={"FLWR_HOME": str(home)},
    )  # fmt: skip
    try:
        wait_http_ready(control_port, process, cafile=kit.ca_cert)
        registered = register_sites(kit, home)
    except BaseException:
        process.stop()
        raise
    info = {
        "pid": process.pid,
        "fleet": fleet,
        "control": f"127.0.0.1:{control_port}",
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "sites": registered,
    }
    (state / SERVER_STATE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return Coordinator(process, fleet, control_port, home, tuple(registered))


def running_coordinator(kit: Kit) -> tuple[Path, str]:
    """FLWR_HOME and Control API address of the SuperLink `fedvault server start` runs."""
    info_path = kit.path / "state" / SERVER_STATE
    if not info_path.is_file():
        raise FederationError(
            f"no running coordinator for the kit at {kit.path}",
            hint=f"Start it first: fedvault server start --kit {kit.path}",
        )
    info = json.loads(info_path.read_text(encoding="utf-8"))
    pid = int(info.get("pid", 0))
    if pid <= 0 or not Path(f"/proc/{pid}").exists():
        raise FederationError(
            f"the coordinator recorded in {info_path} (pid {pid}) is not running",
            hint=f"Start it: fedvault server start --kit {kit.path}",
        )
    return flwr_home_for(kit), str(info["control"])


def serve_until_stopped(coordinator: Coordinator, should_stop: Callable[[], bool]) -> None:
    """Block while the SuperLink runs; stop it (and everything it started) when asked."""
    try:
        code = run_until(coordinator.process, should_stop)
        if code is not None:
            raise FederationError(
                f"the SuperLink exited with code {code}",
                hint=f"See {coordinator.process.log_path}",
            )
    finally:
        coordinator.process.stop()
        state_file = coordinator.flwr_home.parent / SERVER_STATE
        state_file.unlink(missing_ok=True)
