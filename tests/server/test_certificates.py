"""Tests for server/certificates.py: the CA, the server certificate, site keys, fingerprints."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedvault.runtime.kits import ssh_fingerprint
from fedvault.server.certificates import key_fingerprint
from tests.federations import NAME, SITES, cert_at, make_federation

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------- certificates


def test_ca_is_a_self_signed_p384_ca_that_signs_only_certificates(tmp_path: Path) -> None:
    root = make_federation(tmp_path)
    ca = cert_at(root / "authority" / "ca.pem")

    ca.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    assert ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert ca.subject.rfc4514_string() == f"CN={NAME} fedvault CA"
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)
    for kit_copy in [root / "server" / "ca.pem", *(root / "sites").glob("*/ca.pem")]:
        assert kit_copy.read_bytes() == (root / "authority" / "ca.pem").read_bytes()


def test_server_certificate_is_issued_by_the_ca_for_the_host_and_loopback(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    root = make_federation(tmp_path, validity_days=30)
    ca = cert_at(root / "server" / "ca.pem")
    cert = cert_at(root / "server" / "server.pem")

    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA384)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP384R1)
    lifetime = cert.not_valid_after_utc - now
    assert timedelta(days=30) - timedelta(minutes=1) < lifetime <= timedelta(days=30)
    assert cert.not_valid_before_utc <= now
    key = serialization.load_pem_private_key(
        (root / "server" / "server.key").read_bytes(), password=None
    )
    assert key.public_key() == public


@pytest.mark.parametrize(
    ("address", "dns", "ips"),
    [
        ("localhost:9092", ["localhost"], ["127.0.0.1", "::1"]),
        ("127.0.0.1:9092", ["localhost"], ["127.0.0.1", "::1"]),
        ("[::1]:9092", ["localhost"], ["::1", "127.0.0.1"]),
        ("10.1.2.3:443", ["localhost"], ["10.1.2.3", "127.0.0.1", "::1"]),
        ("[2001:db8::7]:9092", ["localhost"], ["2001:db8::7", "127.0.0.1", "::1"]),
        ("LocalHost:9092", ["localhost"], ["127.0.0.1", "::1"]),
    ],
)
def test_server_certificate_sans_are_deduplicated(
    tmp_path: Path, address: str, dns: list[str], ips: list[str]
) -> None:
    root = make_federation(tmp_path, server_address=address)

    cert = cert_at(root / "server" / "server.pem")
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert sans.get_values_for_type(x509.DNSName) == dns
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ips


def _echo_server(root: Path) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "fedvault.test.Echo",
        {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, _context: request)},
    )
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [((root / "server/server.key").read_bytes(), (root / "server/server.pem").read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


def _call(port: int, ca_pem: bytes, *, name: str | None = None) -> bytes:
    options = [("grpc.ssl_target_name_override", name)] if name else []
    target = f"127.0.0.1:{port}" if name else f"localhost:{port}"
    with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca_pem), options) as channel:
        reply: bytes = channel.unary_unary("/fedvault.test.Echo/Echo")(b"ping", timeout=10)
        return reply


def test_grpc_tls_handshake_trusts_only_the_federation_ca(tmp_path: Path) -> None:
    root = make_federation(tmp_path)
    stranger = make_federation(tmp_path, out=tmp_path / "other")
    server, port = _echo_server(root)
    try:
        ca_pem = (root / "sites" / "clinic-a" / "ca.pem").read_bytes()

        assert _call(port, ca_pem) == b"ping"  # "localhost" SAN
        assert _call(port, ca_pem, name="fl.example.org") == b"ping"  # the host SAN
        with pytest.raises(grpc.RpcError):  # a name the certificate does not cover
            _call(port, ca_pem, name="evil.example.org")
        with pytest.raises(grpc.RpcError):  # another federation's CA
            _call(port, (stranger / "authority" / "ca.pem").read_bytes())
    finally:
        server.stop(None)


# --------------------------------------------------------------------------- site keys


def test_site_keys_load_as_flower_loads_them_and_match(tmp_path: Path) -> None:
    from flwr.supercore.primitives.asymmetric import (
        sign_message,
        uses_nist_ec_curve,
        verify_signature,
    )

    root = make_federation(tmp_path)
    meta = tomllib.loads((root / "federation.toml").read_text())
    seen_publics = set()
    for site in SITES:
        kit = root / "sites" / site
        private = serialization.load_ssh_private_key((kit / "site.key").read_bytes(), None)
        public = serialization.load_ssh_public_key((kit / "site.pub").read_bytes())

        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(private.curve, ec.SECP384R1) and uses_nist_ec_curve(public)
        assert private.public_key() == public
        assert verify_signature(public, b"hello", sign_message(private, b"hello"))
        assert (root / "server" / "sites" / f"{site}.pub").read_bytes() == (
            kit / "site.pub"
        ).read_bytes()
        blob = (kit / "site.pub").read_bytes().split()[1]
        assert meta["fingerprints"][site] == ssh_fingerprint(b"x " + blob)
        seen_publics.add(blob)
    assert len(seen_publics) == len(SITES)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
def test_fingerprints_match_ssh_keygen(tmp_path: Path) -> None:
    root = make_federation(tmp_path)
    meta = tomllib.loads((root / "federation.toml").read_text())

    shown = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(root / "sites/clinic-a/site.pub")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    assert shown.split()[1] == meta["fingerprints"]["clinic-a"]


def test_key_fingerprint_is_the_same_for_openssh_and_pem(tmp_path: Path) -> None:
    root = make_federation(tmp_path)
    line = (root / "server" / "sites" / "clinic-a.pub").read_bytes()
    pem = serialization.load_ssh_public_key(line).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    assert key_fingerprint(pem) == key_fingerprint(line) == ssh_fingerprint(line)
