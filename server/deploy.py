"""`fedvault server start`: the federation's SuperLink over TLS with SuperNode authentication.

The SuperLink's Fleet API (gRPC + TLS) listens where the kit says (or ``--listen``); its
Control API (HTTPS, same certificate) listens on 127.0.0.1 only, for `fedvault run` on this
machine. Every site whose public key is in the kit is registered, so only provisioned
sites can join; a revoked key is unregistered (`fedvault provision revoke-site`) and never
registered again. Each site's node id, the identity the SuperLink authenticates its replies
under, is recorded in ``state/server.json`` for `fedvault run`. State persists in the kit's
``state/`` folder.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedvault.common.errors import FederationError, ProvisioningError
from fedvault.common.progress import PROGRESS_FILE, Follower, format_coordinator_event
from fedvault.runtime.kits import Kit, format_server_address, parse_listen_address
from fedvault.runtime.processes import (
    QUIET_ENV,
    ManagedProcess,
    flower_bin,
    free_port,
    run_until,
    wait_http_ready,
    write_connection,
)
from fedvault.server.certificates import key_fingerprint

logger = logging.getLogger(__name__)

CONNECTION = "fedvault-coordinator"
SERVER_STATE = "server.json"  # in the kit's state folder: where the running SuperLink listens
LEDGER_RECORD = "site-ledgers.json"  # in the kit's state folder: each site's ledger head
UNREGISTERED = "unregistered"  # Flower's NodeStatus of a node whose key was unregistered
ONLINE = "online"  # Flower's NodeStatus of a connected node


@dataclass(frozen=True)
class Coordinator:
    """A running federation SuperLink and where to reach it."""

    process: ManagedProcess
    fleet_address: str
    control_port: int
    flwr_home: Path
    registered: tuple[str, ...]
    nodes: Mapping[str, int]  # site -> the node id its key is registered under
    unregistered: tuple[str, ...] = ()  # revoked sites whose still-registered key was removed


def flwr_home_for(kit: Kit) -> Path:
    return kit.path / "state" / "flwr-home"


def _state_dir(kit: Kit) -> Path:
    state = kit.path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    return state


# --------------------------------------------------------------------------- Control API


@contextmanager
def control_client(kit: Kit, control: str) -> Iterator[Any]:
    """Flower's Control API client (HTTPS, the kit's CA) for the SuperLink at ``control``."""
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    client = ControlHttpClient.from_server_address(
        server_address=control,
        insecure=False,
        root_certificates=kit.ca_cert.read_bytes(),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
    )
    try:
        yield client
    finally:
        client.close()


@dataclass(frozen=True)
class NodeRecord:
    """One SuperNode the SuperLink knows: its id, status and key fingerprint."""

    node_id: int
    status: str
    fingerprint: str
    name: str


def list_nodes(kit: Kit, control: str) -> list[NodeRecord]:
    """Every node the SuperLink at ``control`` knows (ListNodes), unregistered ones included."""
    from flwr.proto.control_pb2 import ListNodesRequest

    try:
        with control_client(kit, control) as client:
            answer = client.ListNodes(ListNodesRequest())
    except Exception as err:  # httpx, protobuf or Flower errors alike
        raise FederationError(
            f"could not list the SuperLink's nodes at {control}: {err}",
            hint=f"See {kit.path / 'state' / 'superlink.log'}",
        ) from None
    return [
        NodeRecord(
            node_id=int(info.node_id),
            status=str(info.status),
            fingerprint=key_fingerprint(bytes(info.public_key)),
            name=str(info.name),
        )
        for info in answer.nodes_info
    ]


def active_node_ids(nodes: list[NodeRecord]) -> dict[str, int]:
    """Key fingerprint -> node id of every node whose key is still registered."""
    return {n.fingerprint: n.node_id for n in nodes if n.status != UNREGISTERED}


def _flwr_json(args: list[str], home: Path) -> dict[str, Any]:
    """Run a `flwr` command with ``--format json`` against this kit's SuperLink; its answer."""
    env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(home)}
    result = subprocess.run(
        [flower_bin("flwr"), *args, "--format", "json"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    try:
        return dict(json.loads(result.stdout[result.stdout.index("{") :]))
    except ValueError:
        return {"success": False, "error-message": (result.stdout + result.stderr)[-300:]}


def register_sites(kit: Kit, home: Path, control: str) -> dict[str, int]:
    """Register every provisioned site's public key with the SuperLink; site -> node id.

    Idempotent: a key already registered (a coordinator restarted on the same state) keeps
    its node id, found by its key in the SuperLink's node list.
    """
    nodes: dict[str, int] = {}
    known: dict[str, int] | None = None
    for site, public_key in sorted(kit.site_public_keys.items()):
        answer = _flwr_json(
            ["supernode", "register", str(public_key), CONNECTION, "--name", site], home
        )
        message = str(answer.get("error-message", ""))
        if answer.get("success") and answer.get("node-id"):
            nodes[site] = int(answer["node-id"])
            continue
        if "already in use" not in message:
            raise FederationError(
                f"could not register site {site}'s key with the SuperLink: {message.strip()}"
            )
        if known is None:
            known = active_node_ids(list_nodes(kit, control))
        node_id = known.get(key_fingerprint(public_key.read_bytes()))
        if node_id is None:  # in use by an unregistered node: Flower never re-registers a key
            raise FederationError(
                f"site {site}'s key was unregistered at this SuperLink and cannot be "
                "registered again",
                hint="Revoke the site (`fedvault provision revoke-site`) and add it again with "
                "a new key (`fedvault provision add-site`).",
            )
        nodes[site] = node_id
    return nodes


def unregister_node(home: Path, node_id: int) -> None:
    """`flwr supernode unregister NODE_ID` at this kit's SuperLink (FLWR_HOME ``home``)."""
    answer = _flwr_json(["supernode", "unregister", str(node_id), CONNECTION], home)
    if not answer.get("success"):
        raise FederationError(
            f"could not unregister node {node_id} at the SuperLink: "
            f"{str(answer.get('error-message', '')).strip()}"
        )


def unregister_revoked(kit: Kit, home: Path, control: str) -> list[str]:
    """Unregister every revoked key the SuperLink still has registered; their sites."""
    if not kit.revoked:
        return []
    done = []
    for fingerprint, node_id in sorted(active_node_ids(list_nodes(kit, control)).items()):
        if fingerprint in kit.revoked:
            unregister_node(home, node_id)
            logger.info("unregistered revoked site %s (node %d)", kit.revoked[fingerprint], node_id)
            done.append(kit.revoked[fingerprint])
    return sorted(done)


def revoke_at_running_coordinator(kit: Kit, fingerprint: str) -> int | None:
    """Unregister the key ``fingerprint`` at this kit's running SuperLink, if it runs.

    Returns the node id unregistered, or None when no coordinator runs for the kit or the
    key is not registered there. Flower refuses the node's next request (its SuperNode then
    shuts down) and every later activation with that key.
    """
    try:
        home, control = running_coordinator(kit)
    except FederationError:
        return None
    node_id = active_node_ids(list_nodes(kit, control)).get(fingerprint)
    if node_id is not None:
        unregister_node(home, node_id)
    return node_id


# --------------------------------------------------------------------------- the SuperLink


def start_coordinator(kit: Kit, *, listen: str | None = None) -> Coordinator:
    """Start the SuperLink for ``kit`` (a server kit), register its sites, wait until ready."""
    if kit.role != "server" or kit.cert is None or kit.key is None:
        raise ProvisioningError(f"{kit.path} is a {kit.role} kit, not the server kit")
    fleet = format_server_address(*parse_listen_address(listen or f"0.0.0.0:{kit.port}"))
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
        control = f"127.0.0.1:{control_port}"
        unregistered = unregister_revoked(kit, home, control)  # revoked while it was down
        nodes = register_sites(kit, home, control)
    except BaseException:
        process.stop()
        raise
    info = {
        "pid": process.pid,
        "fleet": fleet,
        "control": control,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "sites": sorted(nodes),
        "nodes": nodes,
    }
    (state / SERVER_STATE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return Coordinator(
        process, fleet, control_port, home, tuple(sorted(nodes)), nodes, tuple(unregistered)
    )


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


def coordinator_status(kit: Kit) -> dict[str, Any]:
    """What `fedvault server status` shows: the running coordinator, each provisioned site's
    connection (the SuperLink's node list) and the latest run events (state/progress.jsonl)."""
    _, control = running_coordinator(kit)
    info = json.loads((kit.path / "state" / SERVER_STATE).read_text(encoding="utf-8"))
    by_node = {int(node): site for site, node in info.get("nodes", {}).items()}
    statuses = {by_node[n.node_id]: n.status for n in list_nodes(kit, control)
                if n.node_id in by_node}  # fmt: skip
    events = Follower(kit.path / "state" / PROGRESS_FILE, from_start=True).new_events()
    starts = [i for i, e in enumerate(events) if e.get("event") == "start"]
    latest = events[starts[-1] :] if starts else []
    return {
        "pid": int(info["pid"]),
        "fleet": info["fleet"],
        "started": info.get("started"),
        "sites": {site: statuses.get(site, "unknown") for site in sorted(info.get("nodes", {}))},
        "run": [format_coordinator_event(e) for e in latest[:1] + latest[1:][-3:]],
    }


def site_nodes(kit: Kit) -> dict[str, int]:
    """Site -> node id of the running coordinator's registered sites (its server.json)."""
    info = json.loads((kit.path / "state" / SERVER_STATE).read_text(encoding="utf-8"))
    nodes = info.get("nodes", {})
    return {str(site): int(node_id) for site, node_id in nodes.items()}


def ledger_record_path(kit: Kit) -> Path:
    """Where the coordinator keeps each site's ledger head across runs (the ServerApp writes)."""
    return _state_dir(kit) / LEDGER_RECORD


#: Seconds between the coordinator's looks at which sites are connected (Control API).
SITE_POLL_S = 2.0


class SiteWatch:
    """Which provisioned sites are connected, from the SuperLink's own node list; the changes."""

    def __init__(self, kit: Kit, coordinator: Coordinator) -> None:
        self.kit = kit
        self.control = f"127.0.0.1:{coordinator.control_port}"
        self.sites = {node: site for site, node in coordinator.nodes.items()}
        self.online: set[str] = set()
        self.next_look = 0.0

    def changes(self) -> list[str]:
        """One line per site that connected or left since the last look (at most every 2 s)."""
        if time.monotonic() < self.next_look:
            return []
        self.next_look = time.monotonic() + SITE_POLL_S
        try:
            nodes = list_nodes(self.kit, self.control)
        except FederationError:
            return []  # the SuperLink is starting or stopping; its exit is reported elsewhere
        online = {self.sites[n.node_id] for n in nodes
                  if n.status == ONLINE and n.node_id in self.sites}  # fmt: skip
        lines = [f"site {site} connected ({len(online)}/{len(self.sites)} online)"
                 for site in sorted(online - self.online)]  # fmt: skip
        lines += [f"site {site} left ({len(online)}/{len(self.sites)} online)"
                  for site in sorted(self.online - online)]  # fmt: skip
        self.online = online
        return lines


def serve_until_stopped(
    coordinator: Coordinator,
    should_stop: Callable[[], bool],
    *,
    kit: Kit | None = None,
    report: Callable[[str], None] = lambda line: None,
) -> None:
    """Block while the SuperLink runs; stop it (and everything it started) when asked.

    With ``kit``, ``report`` gets a line when a site connects or leaves and one per run
    start, round and run end (the ServerApp's events in ``state/progress.jsonl``).
    """
    watch = SiteWatch(kit, coordinator) if kit is not None else None
    progress = Follower(kit.path / "state" / PROGRESS_FILE) if kit is not None else None

    def stop_or_report() -> bool:
        for line in watch.changes() if watch is not None else []:
            report(line)
        for event in progress.new_events() if progress is not None else []:
            report(format_coordinator_event(event))
        return should_stop()

    try:
        code = run_until(coordinator.process, stop_or_report)
        if code is not None:
            raise FederationError(
                f"the SuperLink exited with code {code}",
                hint=f"See {coordinator.process.log_path}",
            )
    finally:
        coordinator.process.stop()
        state_file = coordinator.flwr_home.parent / SERVER_STATE
        state_file.unlink(missing_ok=True)
