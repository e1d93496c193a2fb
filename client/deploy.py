"""`fedvault client start`: a partner site's SuperNode, after checking its data and the coordinator.

Before connecting, the site's data file is validated with the same loader (and messages) as
`fedvault simulate`, and a TLS handshake checks that the coordinator presents a certificate
issued by this kit's federation CA. The data path, label column and device go into the
SuperNode's node config, which stays on this machine: only model updates and metrics leave.
"""

from __future__ import annotations

import math
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.data import load_dataset
from common.errors import ConfigError, FederationError, ProvisioningError
from common.ledger import DEFAULT_MAX_EPSILON, KIT_LEDGER, PrivacyLedger
from common.training import resolve_device
from server.launch import ManagedProcess, flower_bin, free_port, run_until
from server.provision import Kit, parse_server_address

#: What Flower 1.39's SuperNode logs when the SuperLink does not accept its key.
_REFUSED_KEY = re.compile(r"Failed to activate SuperNode|code: 2004")


@dataclass(frozen=True)
class Site:
    """A running SuperNode of a partner site."""

    process: ManagedProcess
    name: str
    rows: int
    ledger: Path


@dataclass(frozen=True, kw_only=True)
class SitePrivacySettings:
    """The site's own privacy settings; they go into its node config, never to the coordinator."""

    ledger: Path | None = None  # default: KIT_LEDGER inside the kit
    max_epsilon: float = DEFAULT_MAX_EPSILON
    allow_non_private: bool = False


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


def check_data(data: Path, label_column: str) -> int:
    """Validate the site's CSV exactly as `fedvault simulate` would; returns its row count."""
    dataset = load_dataset(f"csv:{data}", label_column=label_column)
    return len(dataset)


def open_site_ledger(path: Path, max_epsilon: float) -> Path:
    """Create or open the site's ledger now, so a bad path fails before anything starts."""
    if not (math.isfinite(max_epsilon) and max_epsilon > 0):
        raise ConfigError(f"max_epsilon must be > 0, got {max_epsilon:g}")
    path = path.expanduser().resolve()
    PrivacyLedger(path).close()
    return path


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
    data = data.expanduser().resolve()
    rows = check_data(data, label_column)
    resolve_device(device)
    ledger = open_site_ledger(privacy.ledger or kit.path / KIT_LEDGER, privacy.max_epsilon)
    check_coordinator(kit)
    state = kit.path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    node_config = " ".join(
        f'{key}="{value}"'
        for key, value in (
            ("site-name", kit.site),
            ("data-path", data),
            ("label-column", label_column),
            ("device", device),
            ("threads", str(threads)),
            ("ledger-path", ledger),
            ("max-epsilon", repr(float(privacy.max_epsilon))),
            ("allow-non-private", "true" if privacy.allow_non_private else "false"),
        )
    )
    process = ManagedProcess(
        [
            flower_bin("flower-supernode"),
            "--superlink", kit.server_address,
            "--root-certificates", str(kit.ca_cert),
            "--auth-supernode-private-key", str(kit.private_key),
            "--node-config", node_config,
            "--isolation", "subprocess",
            "--host", "127.0.0.1",
            "--port", str(free_port()),
        ],
        log_path=state / "supernode.log",
        env={
            "FLWR_HOME": str(state / "flwr-home"),
            # The SuperNode's SuperExec looks for a message to start a ClientApp for every
            # second by default; a local poll this often costs nothing and saves ~0.5 s a
            # message on average.
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(TASK_POLL_INTERVAL_S),
        },
    )  # fmt: skip
    return Site(process=process, name=kit.site, rows=rows, ledger=ledger)


#: Seconds between the SuperExec's local polls for a ClientApp task (Flower's default: 1).
TASK_POLL_INTERVAL_S = 0.1

#: Flower 1.39's SuperLink keeps a node "online" up to 2 × 30 s after its last heartbeat and
#: refuses to activate it again meanwhile, with the same error as for an unknown key: a site
#: restarted within that window is retried for this long before it is called unprovisioned.
REACTIVATION_WINDOW_S = 100.0
REACTIVATION_RETRY_S = 15.0


def refusal_reason(process: ManagedProcess) -> str | None:
    """Why the SuperLink turned this SuperNode away, read from its own part of the log."""
    if _REFUSED_KEY.search(process.own_log()):
        return (
            "the coordinator did not accept this site's key: it was never provisioned, or the "
            "coordinator still sees this site's previous connection (a site restarted less "
            "than a minute after a crash)"
        )
    return None


def serve_until_stopped(
    site: Site,
    should_stop: Callable[[], bool],
    *,
    echo: Callable[[str], None] = lambda line: None,
    retry_window: float = REACTIVATION_WINDOW_S,
    retry_every: float = REACTIVATION_RETRY_S,
) -> None:
    """Block while the SuperNode runs; stop it when asked; explain if it is turned away.

    A refused activation is retried for ``retry_window`` seconds: after a crash, the
    coordinator keeps the site's old connection alive for up to a minute.
    """
    started = time.monotonic()
    process = site.process
    try:
        while True:
            code = run_until(process, should_stop)
            if code is None:
                return
            reason = refusal_reason(process)
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
                    "use the new kit; otherwise start the site again in a minute.",
                )
            raise FederationError(
                f"site {site.name}: the SuperNode exited with code {code}",
                hint=f"See {process.log_path}",
            )
    finally:
        process.stop()
