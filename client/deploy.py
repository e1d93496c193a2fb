"""`fedvault client start`: a partner site's SuperNode, after checking its data and the coordinator.

Before connecting, the site's data file is validated with the same loader (and messages) as
`fedvault simulate`, the site's ledger is bound to the site's δ, accountant and dataset, and a
TLS handshake checks that the coordinator presents a certificate issued by this kit's
federation CA. The site's settings go into the SuperNode's node config, a TOML file in the
kit's state folder that stays on this machine: only model updates and metrics leave. The
SuperNode finds fedvault's own `flwr-clientapp` (client/launcher.py) first on its PATH, so
the site runs only the ClientApp it installed, whatever bundle a run submits.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedvault.client.launcher import write_launcher_script
from fedvault.client.site_progress import PROGRESS_PATH_KEY
from fedvault.client.supernode import supernode_command
from fedvault.client.worker import SOCKET_NAME
from fedvault.common.data import load_dataset
from fedvault.common.errors import ConfigError, FederationError, ProvisioningError
from fedvault.common.fingerprint import dataset_fingerprint
from fedvault.common.ledger import DEFAULT_MAX_EPSILON, KIT_LEDGER, PrivacyLedger
from fedvault.common.locks import SITE_LOCK, hold_until_exit
from fedvault.common.models import MODELS
from fedvault.common.progress import PROGRESS_FILE, Follower, format_site_event
from fedvault.common.registry import ACCOUNTANTS
from fedvault.common.site_privacy import (
    DEFAULT_MAX_EVALUATIONS_PER_RUN,
    DEFAULT_MAX_ROUNDS_PER_RUN,
    DEFAULT_SITE_ACCOUNTANT,
    DEFAULT_SITE_DELTA,
)
from fedvault.common.training import resolve_device
from fedvault.runtime.kits import Kit, parse_server_address
from fedvault.runtime.processes import ManagedProcess, free_port, run_until

#: What Flower 1.39's SuperNode logs when the SuperLink does not accept its key.
_REFUSED_KEY = re.compile(r"Failed to activate SuperNode|code: 2004")


@dataclass(frozen=True)
class Site:
    """A running SuperNode of a partner site."""

    process: ManagedProcess
    name: str
    rows: int
    ledger: Path
    node_config: Path
    worker: ManagedProcess | None = None


#: Written by `start_site` in the kit's state folder, passed to the SuperNode by path.
NODE_CONFIG_FILE = "node-config.toml"


@dataclass(frozen=True, kw_only=True)
class SitePrivacySettings:
    """The site's own privacy settings; they go into its node config, never to the coordinator.

    ``delta`` and ``accountant`` are fixed in the site's ledger the first time it starts;
    ``models`` empty means every built-in model.
    """

    ledger: Path | None = None  # default: KIT_LEDGER inside the kit
    max_epsilon: float = DEFAULT_MAX_EPSILON
    allow_non_private: bool = False
    delta: float = DEFAULT_SITE_DELTA
    accountant: str = DEFAULT_SITE_ACCOUNTANT
    models: tuple[str, ...] = ()
    max_rounds_per_run: int = DEFAULT_MAX_ROUNDS_PER_RUN
    max_evaluations_per_run: int = DEFAULT_MAX_EVALUATIONS_PER_RUN
    new_dataset: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise ConfigError(f"--max-epsilon must be > 0, got {self.max_epsilon:g}")
        if not (math.isfinite(self.delta) and 0 < self.delta < 1):
            raise ConfigError(f"--delta must be in (0, 1), got {self.delta:g}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"unknown --accountant {self.accountant!r}; choose one of: "
                f"{', '.join(ACCOUNTANTS.names)}"
            )
        unknown = [name for name in self.models if name not in MODELS]
        if unknown:
            raise ConfigError(
                f"--models must name built-in models ({', '.join(MODELS)}), got "
                f"{', '.join(unknown)}"
            )
        for name in ("max_rounds_per_run", "max_evaluations_per_run"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be >= 1, got {getattr(self, name)}")


def parse_models(text: str) -> tuple[str, ...]:
    """``--models`` (comma-separated built-in model names; empty: every one) as a tuple."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


@dataclass(frozen=True)
class CheckedData:
    """The site's data file as checked at start: its row count and its ledger key."""

    rows: int
    fingerprint: str


def check_coordinator(kit: Kit, timeout: float = 5.0) -> bool:
    """TLS handshake with the coordinator; True if verified, False if it is not reachable yet.

    A certificate from another CA (a kit of another federation) or a coordinator that does
    not speak TLS is refused here, with a message saying which.
    """
    host, port = parse_server_address(kit.server_address)
    context = ssl.create_default_context(cafile=str(kit.ca_cert))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except ssl.SSLCertVerificationError as err:
        raise ProvisioningError(
            f"the coordinator at {kit.server_address} presented a certificate this kit's "
            f"federation CA ({kit.federation}) did not issue: {err.verify_message}",
            hint="This kit belongs to another federation; ask the coordinator for your kit.",
        ) from err
    except ssl.SSLError as err:
        raise FederationError(
            f"the coordinator at {kit.server_address} did not complete a TLS handshake "
            f"({err.reason}); fedvault sites only connect over TLS",
            hint="Check the server address in the kit; the coordinator must run "
            "`fedvault server start`.",
        ) from err
    except OSError:
        return False


def check_data(data: Path, label_column: str) -> CheckedData:
    """Validate the site's CSV exactly as `fedvault simulate` would; its rows and fingerprint.

    The fingerprint is the one the ClientApp keys the ledger by (client/site.py).
    """
    dataset = load_dataset(f"csv:{data}", label_column=label_column)
    return CheckedData(
        rows=len(dataset), fingerprint=dataset_fingerprint(dataset.features, dataset.labels)
    )


def check_delta(delta: float, rows: int) -> None:
    """δ must be below 1 / rows: a larger δ allows a mechanism that publishes a row outright."""
    if not delta < 1 / rows:
        raise ConfigError(
            f"--delta must be below 1/rows of this site's data (1/{rows} = {1 / rows:.3g}), "
            f"got {delta:g}",
            hint="Pass a smaller --delta, e.g. --delta 1e-5 (well below 1/rows).",
        )


def open_site_ledger(path: Path, privacy: SitePrivacySettings, fingerprint: str) -> Path:
    """Open the site's ledger now: bind it to the site's δ and accountant and to its dataset.

    A ledger's δ and accountant never change, and a changed data file counts as a new
    dataset only with ``new_dataset``: otherwise this raises LedgerError before anything
    starts.
    """
    path = path.expanduser().resolve()
    with PrivacyLedger(path) as ledger:
        ledger.fix_policy(delta=privacy.delta, accountant=privacy.accountant)
        ledger.declare_dataset(fingerprint, new=privacy.new_dataset)
    return path


def write_node_config(path: Path, values: dict[str, Any]) -> Path:
    """Write the SuperNode's node config as a TOML file (0600): no value escapes its key."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(tomli_w.dumps(values))
    os.replace(tmp, path)
    return path


def node_config_values(
    *, site: str, data: Path, label_column: str, device: str, threads: int, ledger: Path,
    privacy: SitePrivacySettings, progress: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The node config keys (and types) the ClientApp reads."""
    values: dict[str, Any] = {
        "site-name": site,
        "data-path": str(data),
        "label-column": label_column,
        "device": device,
        "threads": int(threads),
        "ledger-path": str(ledger),
        "max-epsilon": float(privacy.max_epsilon),
        "allow-non-private": bool(privacy.allow_non_private),
        "delta": float(privacy.delta),
        "accountant": privacy.accountant,
        "models": ",".join(privacy.models),
        "max-rounds-per-run": int(privacy.max_rounds_per_run),
        "max-evaluations-per-run": int(privacy.max_evaluations_per_run),
    }
    if progress is not None:  # where the ClientApp reports each message (common/progress.py)
        values[PROGRESS_PATH_KEY] = str(progress)
    return values


def start_site(
    kit: Kit,
    *,
    data: Path,
    label_column: str,
    device: str,
    threads: int = 0,
    privacy: SitePrivacySettings | None = None,
) -> Site:
    """Validate, check the coordinator, then start the SuperNode for ``kit`` (a site kit)."""
    if kit.role != "site" or kit.site is None or kit.private_key is None:
        raise ProvisioningError(f"{kit.path} is a {kit.role} kit, not a site kit")
    privacy = privacy or SitePrivacySettings()
    # one running site per kit: a second `client start` is told which PID runs it
    (kit.path / "state").mkdir(mode=0o700, exist_ok=True)
    hold_until_exit(kit.path / "state" / SITE_LOCK, f"site {kit.site}'s kit {kit.path}")
    data = data.expanduser().resolve()
    checked = check_data(data, label_column)
    check_delta(privacy.delta, checked.rows)
    resolve_device(device)
    ledger = open_site_ledger(privacy.ledger or kit.path / KIT_LEDGER, privacy, checked.fingerprint)
    check_coordinator(kit)
    state = kit.path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    node_config = write_node_config(
        state / NODE_CONFIG_FILE,
        node_config_values(
            site=kit.site, data=data, label_column=label_column, device=device,
            threads=threads, ledger=ledger, privacy=privacy, progress=state / PROGRESS_FILE,
        ),
    )  # fmt: skip
    worker = start_worker(state, site=kit.site, node_config=node_config)
    launcher = write_launcher_script(state, site=kit.site, worker_socket=state / SOCKET_NAME)
    # fedvault's flwr-clientapp first, then this interpreter's (flower-superexec, ...)
    path = os.pathsep.join(
        [str(launcher.parent), str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    )
    process = ManagedProcess(
        supernode_command([
            "--superlink", kit.server_address,
            "--root-certificates", str(kit.ca_cert),
            "--auth-supernode-private-key", str(kit.private_key),
            "--node-config", str(node_config),
            "--isolation", "subprocess",
            "--host", "127.0.0.1",
            "--port", str(free_port()),
        ]),
        log_path=state / "supernode.log",
        env={
            "PATH": path,
            "FLWR_HOME": str(state / "flwr-home"),
            # The SuperNode's SuperExec looks for a message to start a ClientApp for every
            # second by default; a local poll this often costs nothing and saves ~0.5 s a
            # message on average.
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(TASK_POLL_INTERVAL_S),
        },
    )  # fmt: skip
    return Site(
        process=process, name=kit.site, rows=checked.rows, ledger=ledger,
        node_config=node_config, worker=worker,
    )  # fmt: skip


def start_worker(state: Path, *, site: str, node_config: Path) -> ManagedProcess:
    """The site's warm worker (client/worker.py), logged to ``state/worker.log``."""
    return ManagedProcess(
        [sys.executable, "-I", "-m", "fedvault.client.worker", "--site", site,
         "--state", str(state), "--node-config", str(node_config),
         "--parent-pid", str(os.getpid())],
        log_path=state / "worker.log",
        env={},
    )  # fmt: skip


#: A worker that keeps dying (its log says why) is restarted at most this often.
WORKER_RESTART_EVERY_S = 5.0


def tend_worker(site: Site, echo: Callable[[str], None]) -> Site:
    """Restart the warm worker if it died (tasks run cold meanwhile); the site as it is now."""
    worker = site.worker
    if worker is None or (code := worker.poll()) is None:
        return site
    echo(f"site {site.name}: the warm worker exited with code {code}; restarting it")
    return dataclasses.replace(site, worker=worker.restarted())


#: Seconds between the SuperExec's local polls for a ClientApp task (Flower's default: 1).
TASK_POLL_INTERVAL_S = 0.1

#: Flower 1.39's SuperLink keeps a node "online" up to 2 heartbeat intervals after its last
#: heartbeat (2 × 10 s with fedvault's SuperNode, client/supernode.py; 2 × 30 s with Flower's
#: own) and refuses to activate it again meanwhile, with the same error as for an unknown key:
#: a site restarted within that window is retried for this long before it is called
#: unprovisioned.
REACTIVATION_WINDOW_S = 45.0
REACTIVATION_RETRY_S = 5.0


REVOKED_WHILE_CONNECTED = (
    "the coordinator refused this site's key while it was connected: the key was "
    "revoked (`fedvault provision revoke-site`)"
)


def refusal_reason(process: ManagedProcess) -> str | None:
    """Why the SuperLink turned this SuperNode away, read from its own part of the log."""
    log = process.own_log()
    # Flower 1.39: a connected SuperNode whose key is unregistered (`fedvault provision
    # revoke-site`) gets UNAUTHENTICATED at its next request and shuts itself down, exit 0.
    if "SuperNode ID:" in log and "SuperNode terminated gracefully" in log:
        return REVOKED_WHILE_CONNECTED
    if _REFUSED_KEY.search(log):
        return (
            "the coordinator did not accept this site's key: it was revoked or never "
            "provisioned, or the coordinator still sees this site's previous connection (a "
            "site restarted less than 20 seconds after a crash)"
        )
    return None


_NODE_ID = re.compile(r"SuperNode ID: (\d+)")


def _node_id(process: ManagedProcess) -> int | None:
    """The node id this SuperNode was activated as (from its own log), once connected."""
    found = _NODE_ID.search(process.own_log())
    return int(found.group(1)) if found else None


def serve_until_stopped(
    site: Site,
    should_stop: Callable[[], bool],
    *,
    echo: Callable[[str], None] = lambda line: None,
    report: Callable[[str], None] = lambda line: None,
    retry_window: float = REACTIVATION_WINDOW_S,
    retry_every: float = REACTIVATION_RETRY_S,
) -> None:
    """Block while the SuperNode runs; stop it when asked; explain if it is turned away.

    ``report`` gets a line when the site connects and one per message it handled (from
    ``state/progress.jsonl``); ``echo`` gets warnings. A refused activation is retried for
    ``retry_window`` seconds: after a crash, the coordinator keeps the site's old connection
    alive for up to 20 s.
    """
    started = time.monotonic()
    process = site.process
    current = site
    tended_at = -math.inf
    progress = Follower(site.node_config.parent / PROGRESS_FILE)
    connected: ManagedProcess | None = None

    def stop_or_tend() -> bool:
        nonlocal current, tended_at, connected
        if time.monotonic() - tended_at >= WORKER_RESTART_EVERY_S:
            tended = tend_worker(current, echo)
            if tended is not current:
                current, tended_at = tended, time.monotonic()
        if connected is not process and (node := _node_id(process)) is not None:
            connected = process
            report(f"connected to the coordinator as node {node}")
        for event in progress.new_events():
            report(format_site_event(event))
        return should_stop()

    try:
        while True:
            code = run_until(process, stop_or_tend)
            if code is None:
                return
            reason = refusal_reason(process)
            if reason == REVOKED_WHILE_CONNECTED:
                raise ProvisioningError(
                    f"site {site.name}: {reason}",
                    hint="Restarting will not help: ask the coordinator for a new kit "
                    "(`fedvault provision add-site`), then start the site with it.",
                )
            if reason and time.monotonic() - started + retry_every < retry_window:
                echo(
                    f"the coordinator refused to activate site {site.name} (if it restarted "
                    f"after a crash, its old connection is still open there); retrying in "
                    f"{retry_every:g} s"
                )
                deadline = time.monotonic() + retry_every
                while time.monotonic() < deadline:
                    if should_stop():
                        return
                    time.sleep(0.2)
                process = process.restarted()
                continue
            if reason:
                raise ProvisioningError(
                    f"site {site.name}: {reason}",
                    hint="If the site was never provisioned, ask the coordinator to run "
                    "`fedvault provision add-site` and restart `fedvault server start`, then "
                    "use the new kit; otherwise start the site again in half a minute.",
                )
            raise FederationError(
                f"site {site.name}: the SuperNode exited with code {code}",
                hint=f"See {process.log_path}",
            )
    finally:
        process.stop()
