"""Integration: the coordinator speaks only gRPC over TLS, and sites that must not join are refused.

One real coordinator (`fedvault server start`, sites a and b) runs for the whole module on a
free loopback port. Each test tries one wrong way in (plaintext, a kit of another federation,
a key that was never provisioned, an expired certificate, a private key others can read, a
bad data file) and checks that fedvault refuses it with its own error, hint and exit code.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedvault.common.errors import DataError, FederationError, FedvaultError, ProvisioningError
from fedvault.runtime.processes import ManagedProcess, flower_bin, free_port
from fedvault.server.provision import provision_federation
from tests.deployment import (
    fedvault_env,
    fedvault_process,
    flower_processes_of,
    provision,
    wait_for,
    write_site_csvs,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

LABEL = "diagnosis"
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS_FRAME = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, type 4, no flags


@dataclass(frozen=True)
class Coordinator:
    """The module's running coordinator and the federation it serves."""

    federation: Path
    port: int
    csvs: list[Path]

    @property
    def server_kit(self) -> Path:
        return self.federation / "server"

    @property
    def superlink_log(self) -> Path:
        return self.server_kit / "state" / "superlink.log"

    def site_kit(self, site: str) -> Path:
        return self.federation / "sites" / site


@dataclass(frozen=True)
class Outcome:
    """How a one-shot `fedvault ...` command ended."""

    code: int | None  # None: it was still running at the timeout and had to be stopped
    stdout: str
    stderr: str
    seconds: float


def started_pids(log: Path) -> list[int]:
    """PIDs that fedvault's ManagedProcess logged as started, and their logged descendants."""
    text = log.read_text(errors="replace") if log.exists() else ""
    pids = {int(p) for p in re.findall(r"fedvault: started pid=(\d+)", text)}
    for found in re.findall(r"descendants=\[([\d, ]*)\]", text):
        pids.update(int(p) for p in found.split(",") if p.strip())
    return sorted(pids)


def run_fedvault(args: list[str], folder: Path, *, timeout: float) -> Outcome:
    """Run `fedvault ARGS` to its end; past ``timeout`` it is stopped (SIGTERM, then SIGKILL)."""
    logs = Path(tempfile.mkdtemp(prefix="fedvault-", dir=folder))
    with (logs / "stdout").open("wb") as out, (logs / "stderr").open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedvault", *args],
            stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=fedvault_env(),
        )  # fmt: skip
    start = time.monotonic()
    code: int | None = None
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if proc.poll() is None:  # SIGTERM lets `fedvault client start` stop its SuperNode
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    return Outcome(
        code=code,
        stdout=(logs / "stdout").read_text(errors="replace"),
        stderr=(logs / "stderr").read_text(errors="replace"),
        seconds=time.monotonic() - start,
    )


def assert_refused(outcome: Outcome, error: type[FedvaultError], *needles: str) -> None:
    """fedvault's own refusal: the error's exit code, one error line, a hint, no traceback."""
    shown = f"exit {outcome.code}\nstdout:\n{outcome.stdout}\nstderr:\n{outcome.stderr}"
    assert outcome.code == error.exit_code, shown
    assert re.search(r"^error: ", outcome.stderr, re.MULTILINE), shown
    assert re.search(r"^hint: \S", outcome.stderr, re.MULTILINE), shown
    assert "Traceback" not in outcome.stdout + outcome.stderr, shown
    for needle in needles:
        assert needle in outcome.stderr, f"{needle!r} not in stderr\n{shown}"


def copy_kit(source: Path, target: Path) -> Path:
    """A copy of a startup kit (file modes kept), without the state of any earlier start."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("state"))
    return target


def set_server_address(kit: Path, address: str) -> None:
    toml = kit / "kit.toml"
    text, count = re.subn(
        r'^server-address = ".*"$', f'server-address = "{address}"', toml.read_text(), flags=re.M
    )
    assert count == 1
    toml.write_text(text)


def client_start(kit: Path, data: Path) -> list[str]:
    return ["client", "start", "--kit", str(kit), "--data", str(data), "--label-column", LABEL]


def no_flower_process_started(state_log: Path) -> bool:
    """True if fedvault never started a Flower process logging to ``state_log``."""
    return not state_log.exists() or "fedvault: started pid=" not in state_log.read_text()


def count_in(path: Path, pattern: str) -> int:
    return len(re.findall(pattern, path.read_text(errors="replace"))) if path.exists() else 0


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    """`fedvault server start` for sites a and b; stopped with SIGTERM at the end of the module."""
    tmp = tmp_path_factory.mktemp("tls")
    federation, port = provision(tmp, ["a", "b"])
    csvs = write_site_csvs(tmp, 2, label=LABEL)
    log = tmp / "server.log"
    server_kit = federation / "server"
    code: int | None = None
    with fedvault_process(
        ["server", "start", "--kit", str(server_kit), "--listen", f"127.0.0.1:{port}"], log
    ) as server:
        wait_for(log, r"^ready:", server, timeout=90)
        yield Coordinator(federation=federation, port=port, csvs=csvs)
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None  # fedvault_process kills it on the way out
    superlink_log = server_kit / "state" / "superlink.log"
    assert code == 0, log.read_text(errors="replace")
    pids = started_pids(superlink_log)
    assert pids, superlink_log.read_text(errors="replace")
    assert flower_processes_of(pids) == [], superlink_log.read_text(errors="replace")


# --------------------------------------------------------------------------- the channel


def plaintext_reply(port: int, payload: bytes) -> bytes:
    """What the port answers a plaintext client sending ``payload``, until it closes (or 5 s)."""
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        try:
            while chunk := sock.recv(4096):
                reply += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return reply


def is_http2_settings_frame(data: bytes) -> bool:
    """An HTTP/2 frame header of type SETTINGS (0x4): what a plaintext gRPC server sends first."""
    return len(data) >= 9 and data[3] == 0x04


def test_fleet_channel_is_grpc_over_tls13_with_the_federation_certificate(
    coordinator: Coordinator,
) -> None:
    kit = coordinator.server_kit
    ca = x509.load_pem_x509_certificate((kit / "ca.pem").read_bytes())
    server_cert = x509.load_pem_x509_certificate((kit / "server.pem").read_bytes())
    context = ssl.create_default_context(cafile=str(kit / "ca.pem"))
    context.set_alpn_protocols(["h2"])

    with (
        socket.create_connection(("127.0.0.1", coordinator.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        version, alpn = tls.version(), tls.selected_alpn_protocol()
        der = tls.getpeercert(binary_form=True)
    reply = plaintext_reply(coordinator.port, HTTP2_PREFACE + EMPTY_SETTINGS_FRAME)

    assert version == "TLSv1.3"
    assert alpn == "h2"
    assert der is not None
    presented = x509.load_der_x509_certificate(der)
    assert presented == server_cert
    presented.verify_directly_issued_by(ca)  # raises if the federation CA did not sign it
    assert not is_http2_settings_frame(reply), reply[:64]
    assert reply == b"" or reply.startswith(b"\x15\x03"), reply[:64]  # closed, or a TLS alert


def test_plaintext_supernode_is_refused(coordinator: Coordinator, tmp_path: Path) -> None:
    # Flower's own SuperNode, without TLS. (Flower refuses --insecure together with
    # --auth-supernode-private-key itself, exit 303, before it connects; without the key it
    # really tries the plaintext channel, which is what the coordinator must turn away.)
    log = tmp_path / "supernode.log"
    home = tmp_path / "flwr-home"
    home.mkdir()
    supernode = ManagedProcess(
        [flower_bin("flower-supernode"), "--insecure",
         "--superlink", f"127.0.0.1:{coordinator.port}", "--max-retries", "2",
         "--host", "127.0.0.1", "--port", str(free_port())],
        log_path=log, env={"FLWR_HOME": str(home)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 150  # generous: the whole suite loads this machine
        while supernode.poll() is None and time.monotonic() < deadline:
            time.sleep(0.3)
        code = supernode.poll()
    finally:
        supernode.stop()
    text = log.read_text(errors="replace")

    assert code is not None and code != 0, text
    assert "SuperNode ID" not in text, text  # what Flower logs once a node has joined
    assert "Failed to initialize the connection to the SuperLink" in text, text


def test_fedvault_site_refuses_a_coordinator_without_tls(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    connections = []

    class Hello(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            connections.append(self.client_address)
            self.request.sendall(b"hello")

    kit = copy_kit(coordinator.site_kit("a"), tmp_path / "kit-a")
    with socketserver.TCPServer(("127.0.0.1", 0), Hello) as plain:
        set_server_address(kit, f"127.0.0.1:{plain.server_address[1]}")
        thread = threading.Thread(target=plain.serve_forever, daemon=True)
        thread.start()
        try:
            outcome = run_fedvault(client_start(kit, coordinator.csvs[0]), tmp_path, timeout=60)
        finally:
            plain.shutdown()
            thread.join(timeout=10)

    assert_refused(outcome, FederationError, "did not complete a TLS handshake")
    assert connections, "the site never contacted the plaintext endpoint"
    assert no_flower_process_started(kit / "state" / "supernode.log")


# --------------------------------------------------------------------------- site identity


def test_kit_from_another_federation_is_refused(coordinator: Coordinator, tmp_path: Path) -> None:
    other = provision_federation(
        name="other",
        server_address=f"127.0.0.1:{coordinator.port}",
        sites=["a"],
        out=tmp_path / "other",
    )
    kit = other / "sites" / "a"

    outcome = run_fedvault(client_start(kit, coordinator.csvs[0]), tmp_path, timeout=60)

    assert_refused(outcome, ProvisioningError, "certificate", "another federation")
    assert outcome.seconds < 45, outcome
    assert no_flower_process_started(kit / "state" / "supernode.log")


def write_unregistered_site_key(kit: Path) -> None:
    """Replace the kit's key pair with a fresh ECDSA P-384 pair no coordinator has seen."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    (kit / "site.key").unlink()
    fd = os.open(kit / "site.key", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    os.chmod(kit / "site.key", 0o600)
    (kit / "site.pub").write_bytes(public + b"\n")


def test_site_key_never_provisioned_is_refused(coordinator: Coordinator, tmp_path: Path) -> None:
    kit = copy_kit(coordinator.site_kit("a"), tmp_path / "kit-a")
    write_unregistered_site_key(kit)
    supernode_log = kit / "state" / "supernode.log"

    # A refused activation is retried (a restarted site's old connection may still be open
    # at the coordinator); a short --rejoin-wait allows a retry or a few here: a retry comes
    # 5 s after a refusal that leaves time for it, and on a loaded machine the first refusal
    # can take 10 s or more to come.
    args = [*client_start(kit, coordinator.csvs[0]), "--rejoin-wait", "20"]
    outcome = run_fedvault(args, tmp_path, timeout=120)

    assert_refused(outcome, ProvisioningError, "did not accept this site's key")
    assert "retrying in 5 s" in outcome.stderr
    log = supernode_log.read_text(errors="replace")
    assert "SuperNode ID" not in log, log
    pids = started_pids(supernode_log)
    assert pids, log  # the SuperNode did start: the SuperLink, not a preflight, turned it away
    assert flower_processes_of(pids) == [], log


# --------------------------------------------------------------------------- kit checks


def test_expired_server_certificate_is_refused_at_start(tmp_path: Path) -> None:
    port = free_port()
    federation = provision_federation(
        name="old",
        server_address=f"127.0.0.1:{port}",
        sites=["a"],
        out=tmp_path / "old",
        validity_days=1,
        now=datetime.now(UTC) - timedelta(days=3),
    )
    kit = federation / "server"

    outcome = run_fedvault(
        ["server", "start", "--kit", str(kit), "--listen", f"127.0.0.1:{port}"],
        tmp_path,
        timeout=60,
    )

    assert_refused(outcome, ProvisioningError, "expired")
    assert outcome.seconds < 45, outcome
    assert no_flower_process_started(kit / "state" / "superlink.log")


def test_private_key_readable_by_others_is_refused(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    site_kit = copy_kit(coordinator.site_kit("b"), tmp_path / "kit-b")
    server_kit = copy_kit(coordinator.server_kit, tmp_path / "server")
    os.chmod(site_kit / "site.key", 0o644)
    os.chmod(server_kit / "server.key", 0o644)
    site_key, server_key = (site_kit / "site.key").resolve(), (server_kit / "server.key").resolve()

    site = run_fedvault(client_start(site_kit, coordinator.csvs[1]), tmp_path, timeout=60)
    server = run_fedvault(
        ["server", "start", "--kit", str(server_kit), "--listen", f"127.0.0.1:{free_port()}"],
        tmp_path,
        timeout=60,
    )

    assert_refused(site, ProvisioningError, str(site_key), f"chmod 600 {site_key}")
    assert_refused(server, ProvisioningError, str(server_key), f"chmod 600 {server_key}")
    assert no_flower_process_started(site_kit / "state" / "supernode.log")
    assert no_flower_process_started(server_kit / "state" / "superlink.log")


def test_a_site_with_a_bad_data_file_does_not_connect(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    good = coordinator.csvs[1].read_text().splitlines()
    fields = good[5].split(",")
    fields[3] = "n/a"
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([*good[:5], ",".join(fields), *good[6:]]) + "\n")
    kit = coordinator.site_kit("b")

    outcome = run_fedvault(client_start(kit, bad), tmp_path, timeout=60)

    assert_refused(outcome, DataError, "'f3'", "'n/a'")
    assert no_flower_process_started(kit / "state" / "supernode.log")
