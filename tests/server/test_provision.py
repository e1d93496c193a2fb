"""Tests for server/provision.py: federation layout, keys, certificates, add/revoke, load_kit."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tomllib
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedvault.common.errors import ProvisioningError
from fedvault.server import provision
from fedvault.server.provision import (
    add_site,
    certificate_expiry,
    key_fingerprint,
    load_kit,
    parse_listen_address,
    parse_server_address,
    provision_federation,
    read_revoked,
    revoke_site,
    ssh_fingerprint,
)

pytestmark = pytest.mark.unit

SITES = ("clinic-a", "clinic-b")
SITES_SORTED = sorted(SITES)
NAME = "demo"
ADDRESS = "fl.example.org:9092"


def make_federation(tmp_path: Path, **overrides: Any) -> Path:
    """Provision a small federation in tmp_path/fed (or ``out``) with any argument overridden."""
    arguments: dict[str, Any] = {
        "name": NAME,
        "server_address": ADDRESS,
        "sites": list(SITES),
        "out": tmp_path / "fed",
    }
    arguments.update(overrides)
    return provision_federation(**arguments)


def expected_files(sites: tuple[str, ...] | list[str]) -> set[str]:
    files = {
        "federation.toml",
        "authority/ca.key",
        "authority/ca.pem",
        "server/kit.toml",
        "server/ca.pem",
        "server/server.pem",
        "server/server.key",
    }
    for site in sites:
        files |= {
            f"server/sites/{site}.pub",
            f"sites/{site}/kit.toml",
            f"sites/{site}/ca.pem",
            f"sites/{site}/site.key",
            f"sites/{site}/site.pub",
        }
    return files


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def hashes_under(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cert_at(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def raises_provisioning(match: str) -> Any:
    return pytest.raises(ProvisioningError, match=match)


# --------------------------------------------------------------------------- layout


def test_layout_is_exactly_the_documented_one(tmp_path: Path) -> None:
    root = make_federation(tmp_path)

    assert root == (tmp_path / "fed").resolve()
    assert files_under(root) == expected_files(SITES)
    assert {p.name for p in root.iterdir()} == {"federation.toml", "authority", "server", "sites"}


def test_no_kit_holds_the_ca_private_key_in_any_encoding(tmp_path: Path) -> None:
    root = make_federation(tmp_path)
    ca_key_pem = (root / "authority" / "ca.key").read_bytes()
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    secret = ca_key.private_numbers().private_value.to_bytes(48, "big")
    ca_key_der = ca_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )

    kit_files = [p for kit in ("server", "sites") for p in (root / kit).rglob("*") if p.is_file()]

    assert kit_files
    for path in kit_files:
        content = path.read_bytes()
        assert ca_key_pem not in content, path
        assert ca_key_der not in content, path
        assert secret not in content, path
    assert not list((root / "server").rglob("authority")) and not list(
        (root / "sites").rglob("authority")
    )


def test_private_keys_are_0600_and_their_folders_0700(tmp_path: Path) -> None:
    root = make_federation(tmp_path)
    keys = [root / "authority/ca.key", root / "server/server.key"] + [
        root / "sites" / site / "site.key" for site in SITES
    ]
    folders = [root / "authority", root / "server"] + [root / "sites" / site for site in SITES]

    assert all(mode(key) == 0o600 for key in keys), {str(k): oct(mode(k)) for k in keys}
    assert all(mode(folder) == 0o700 for folder in folders)
    assert set(root.rglob("*.key")) == set(keys)


def test_keys_are_created_0600_from_the_start_even_under_umask_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, *args: Any, **kwargs: Any) -> int:
        opened.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    old_umask = os.umask(0)
    try:
        root = make_federation(tmp_path)
    finally:
        os.umask(old_umask)

    key_opens = [entry for entry in opened if entry[0].endswith(".key")]
    assert len(key_opens) == 2 + len(SITES)
    for _path, flags, created_mode in key_opens:
        assert flags & os.O_CREAT and flags & os.O_EXCL
        assert created_mode == 0o600
    assert all(mode(key) == 0o600 for key in root.rglob("*.key"))
    assert mode(root / "server" / "server.pem") == 0o644


def test_federation_toml_records_the_federation(tmp_path: Path) -> None:
    now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    root = make_federation(tmp_path, now=now, validity_days=10)

    meta = tomllib.loads((root / "federation.toml").read_text())

    assert meta["name"] == NAME
    assert meta["server-address"] == ADDRESS
    assert meta["sites"] == list(SITES)
    assert datetime.fromisoformat(meta["created"]) == now
    assert datetime.fromisoformat(meta["not-after"]) == now + timedelta(days=10)
    assert set(meta["fingerprints"]) == set(SITES)
    server_kit = tomllib.loads((root / "server" / "kit.toml").read_text())
    assert server_kit == {
        "role": "server",
        "federation": NAME,
        "server-address": ADDRESS,
        "created": now.isoformat(),
    }
    site_kit = tomllib.loads((root / "sites" / "clinic-b" / "kit.toml").read_text())
    assert (site_kit["role"], site_kit["site"], site_kit["federation"]) == (
        "site",
        "clinic-b",
        NAME,
    )
    assert site_kit["server-address"] == ADDRESS


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
        assert meta["fingerprints"][site] == provision.ssh_fingerprint(b"x " + blob)
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


# --------------------------------------------------------------------------- overwrite


def test_an_existing_federation_is_not_replaced_without_force(tmp_path: Path) -> None:
    root = make_federation(tmp_path)
    before = hashes_under(root)

    with raises_provisioning("already holds a federation") as caught:
        make_federation(tmp_path, sites=["other"])

    assert "--force" in caught.value.hint
    assert hashes_under(root) == before


def test_force_replaces_the_federation_with_a_new_ca(tmp_path: Path) -> None:
    root = make_federation(tmp_path)
    old_ca = cert_at(root / "authority" / "ca.pem").public_key()
    (root / "server" / "state").mkdir()

    make_federation(tmp_path, sites=["clinic-c"], force=True)

    assert files_under(root) == expected_files(["clinic-c"])
    assert cert_at(root / "authority" / "ca.pem").public_key() != old_ca
    assert [p.name for p in tmp_path.iterdir()] == ["fed"]  # no staging or retired folder left


def test_force_never_deletes_a_folder_that_is_not_a_federation(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    out.mkdir()
    (out / "thesis.txt").write_text("precious")

    with raises_provisioning("does not hold a fedvault federation"):
        make_federation(tmp_path, force=True)

    assert (out / "thesis.txt").read_text() == "precious"
    assert files_under(out) == {"thesis.txt"}


def test_an_empty_existing_folder_is_used(tmp_path: Path) -> None:
    (tmp_path / "fed").mkdir()

    root = make_federation(tmp_path)

    assert files_under(root) == expected_files(SITES)


def test_a_failure_midway_leaves_the_old_federation_and_no_partial_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_federation(tmp_path)
    before = hashes_under(root)

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr(provision, "make_site_keys", broken)
    with pytest.raises(OSError, match="disk full"):
        make_federation(tmp_path, force=True)
    with pytest.raises(OSError, match="disk full"):
        make_federation(tmp_path, out=tmp_path / "new")

    assert hashes_under(root) == before
    assert [p.name for p in tmp_path.iterdir()] == ["fed"]


# --------------------------------------------------------------------------- add-site


def test_add_site_adds_a_working_kit_and_changes_nothing_else(tmp_path: Path) -> None:
    root = make_federation(tmp_path)
    before = hashes_under(root)

    kit_dir = add_site(root, "clinic-c")

    after = hashes_under(root)
    assert kit_dir == root / "sites" / "clinic-c"
    assert set(after) == expected_files([*SITES, "clinic-c"])
    changed = {path for path in before if before[path] != after[path]}
    assert changed == {"federation.toml"}
    assert mode(kit_dir) == 0o700 and mode(kit_dir / "site.key") == 0o600
    site = load_kit(kit_dir, role="site")
    assert (site.site, site.federation, site.server_address) == ("clinic-c", NAME, ADDRESS)
    server = load_kit(root / "server", role="server")
    assert sorted(server.site_public_keys) == sorted([*SITES, "clinic-c"])
    meta = tomllib.loads((root / "federation.toml").read_text())
    assert meta["sites"] == [*SITES, "clinic-c"]
    assert meta["fingerprints"]["clinic-c"] == provision.ssh_fingerprint(
        (kit_dir / "site.pub").read_bytes()
    )
    assert [p.name for p in (root / "sites").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("duplicate", ["clinic-a", "CLINIC-A"])
def test_add_site_refuses_an_existing_site(tmp_path: Path, duplicate: str) -> None:
    root = make_federation(tmp_path)
    before = hashes_under(root)

    with raises_provisioning("already in the federation"):
        add_site(root, duplicate)

    assert hashes_under(root) == before


def test_add_site_needs_the_authority(tmp_path: Path) -> None:
    root = make_federation(tmp_path)
    shutil.rmtree(root / "authority")

    with raises_provisioning("no certificate authority"):
        add_site(root, "clinic-c")
    with raises_provisioning("no certificate authority"):
        add_site(tmp_path / "nowhere", "clinic-c")
    assert not (root / "sites" / "clinic-c").exists()


def test_add_site_needs_federation_toml_and_the_server_kit(tmp_path: Path) -> None:
    root = make_federation(tmp_path)
    shutil.move(root / "server", tmp_path / "server-elsewhere")

    with raises_provisioning("no server kit"):
        add_site(root, "clinic-c")
    (root / "federation.toml").unlink()
    with raises_provisioning("does not hold a federation"):
        add_site(root, "clinic-c")
    assert not (root / "sites" / "clinic-c").exists()


def test_add_site_refuses_a_bad_name(tmp_path: Path) -> None:
    root = make_federation(tmp_path)

    with raises_provisioning("'../evil'"):
        add_site(root, "../evil")


def test_add_site_refuses_an_expired_federation(tmp_path: Path) -> None:
    root = make_federation(tmp_path, now=datetime.now(UTC) - timedelta(days=3), validity_days=1)

    with raises_provisioning("expired on"):
        add_site(root, "clinic-c")


# --------------------------------------------------------------------------- load_kit


def test_load_kit_server(tmp_path: Path) -> None:
    root = make_federation(tmp_path, validity_days=20)

    kit = load_kit(root / "server", role="server")

    assert (kit.role, kit.federation, kit.server_address, kit.site) == (
        "server",
        NAME,
        ADDRESS,
        None,
    )
    assert (kit.host, kit.port) == ("fl.example.org", 9092)
    assert kit.path == root / "server"
    assert kit.ca_cert == root / "server" / "ca.pem"
    assert kit.cert == root / "server" / "server.pem"
    assert kit.key == root / "server" / "server.key"
    assert dict(kit.site_public_keys) == {s: root / "server" / "sites" / f"{s}.pub" for s in SITES}
    assert kit.state_dir == root / "server" / "state"
    assert kit.not_after == certificate_expiry(root / "server" / "server.pem")
    assert kit.private_key is None and kit.public_key is None


def test_load_kit_site(tmp_path: Path) -> None:
    root = make_federation(tmp_path)

    kit = load_kit(root / "sites" / "clinic-b")

    assert (kit.role, kit.site, kit.federation, kit.server_address) == (
        "site",
        "clinic-b",
        NAME,
        ADDRESS,
    )
    assert kit.private_key == root / "sites" / "clinic-b" / "site.key"
    assert kit.public_key == root / "sites" / "clinic-b" / "site.pub"
    assert kit.ca_cert == root / "sites" / "clinic-b" / "ca.pem"
    assert kit.cert is None and kit.key is None and not kit.site_public_keys


def test_load_kit_refuses_the_wrong_role(tmp_path: Path) -> None:
    root = make_federation(tmp_path)

    with raises_provisioning("this is a site kit, not a server kit"):
        load_kit(root / "sites" / "clinic-a", role="server")
    with raises_provisioning("this is a server kit, not a site kit"):
        load_kit(root / "server", role="site")


@pytest.mark.parametrize(
    ("kit", "missing"),
    [
        ("server", "server.pem"),
        ("server", "server.key"),
        ("server", "ca.pem"),
        ("sites/clinic-a", "site.key"),
        ("sites/clinic-a", "site.pub"),
    ],
)
def test_load_kit_refuses_a_missing_file(tmp_path: Path, kit: str, missing: str) -> None:
    root = make_federation(tmp_path)
    (root / kit / missing).unlink()

    with raises_provisioning(f"missing {missing}"):
        load_kit(root / kit)


@pytest.mark.parametrize(
    ("kit", "key", "loose"),
    [
        ("server", "server.key", 0o644),
        ("sites/clinic-a", "site.key", 0o644),
        ("server", "server.key", 0o640),
    ],
)
def test_load_kit_refuses_a_private_key_others_can_read(
    tmp_path: Path, kit: str, key: str, loose: int
) -> None:
    root = make_federation(tmp_path)
    key_path = root / kit / key
    key_path.chmod(loose)

    with raises_provisioning(rf"readable by others \(mode {loose:04o}\)") as caught:
        load_kit(root / kit)

    assert caught.value.hint == f"Run: chmod 600 {key_path}"
    key_path.chmod(0o600)
    assert load_kit(root / kit).path == root / kit


def test_load_kit_refuses_an_expired_server_certificate(tmp_path: Path) -> None:
    issued = datetime.now(UTC) - timedelta(days=3)
    root = make_federation(tmp_path, now=issued, validity_days=1)
    expiry = (issued.replace(microsecond=0) + timedelta(days=1)).strftime("%Y-%m-%d %H:%M")

    with raises_provisioning(f"the server certificate expired on {expiry} UTC") as caught:
        load_kit(root / "server")
    with raises_provisioning(f"CA certificate expired on {expiry} UTC"):
        load_kit(root / "sites" / "clinic-a")

    assert "fedvault provision" in caught.value.hint
    assert load_kit(root / "server", now=issued + timedelta(hours=1)).role == "server"


def test_load_kit_refuses_a_certificate_not_yet_valid(tmp_path: Path) -> None:
    root = make_federation(tmp_path)

    with raises_provisioning("not valid until"):
        load_kit(root / "server", now=datetime.now(UTC) - timedelta(days=1))


def test_load_kit_refuses_a_folder_without_kit_toml(tmp_path: Path) -> None:
    root = make_federation(tmp_path)
    (tmp_path / "empty").mkdir()
    (root / "sites" / "clinic-a" / "kit.toml").write_text("role = [broken")

    with raises_provisioning("not a fedvault startup kit") as caught:
        load_kit(tmp_path / "empty")
    with raises_provisioning("no such folder"):
        load_kit(tmp_path / "missing")
    with raises_provisioning("not a fedvault startup kit"):
        load_kit(root / "sites" / "clinic-a")
    with raises_provisioning("is a federation folder") as from_root:
        load_kit(root)

    assert "fedvault provision" in caught.value.hint
    assert str(root / "server") in from_root.value.hint


def test_load_kit_refuses_files_from_two_federations(tmp_path: Path) -> None:
    root = make_federation(tmp_path)
    other = make_federation(tmp_path, out=tmp_path / "other")
    shutil.copy(other / "server" / "ca.pem", root / "server" / "ca.pem")
    shutil.copy(other / "sites" / "clinic-a" / "site.pub", root / "sites" / "clinic-b" / "site.pub")

    with raises_provisioning("was not issued by"):
        load_kit(root / "server")
    with raises_provisioning("does not belong to"):
        load_kit(root / "sites" / "clinic-b")


def test_certificate_expiry_is_validity_days_after_now(tmp_path: Path) -> None:
    now = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    root = make_federation(tmp_path, now=now, validity_days=7)

    assert certificate_expiry(root / "server" / "server.pem") == now + timedelta(days=7)
    assert certificate_expiry(root / "authority" / "ca.pem") == now + timedelta(days=7)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "bad name"}, "'bad name'"),
        ({"name": ""}, "federation name"),
        ({"name": "-dash"}, "'-dash'"),
        ({"name": "x" * 65}, "federation name"),
        ({"sites": ["ok", "no/slash"]}, "'no/slash'"),
        ({"sites": ["ok", ""]}, "site name"),
        ({"sites": []}, "at least one site"),
        ({"sites": ["a", "b", "a"]}, "unique"),
        ({"sites": ["Clinic", "clinic"]}, "unique"),
        ({"server_address": "fl.example.org"}, "'fl.example.org'"),
        ({"server_address": "fl.example.org:0"}, "'0'"),
        ({"server_address": "fl.example.org:65536"}, "'65536'"),
        ({"server_address": "fl.example.org:http"}, "'http'"),
        ({"server_address": ":9092"}, "HOST:PORT"),
        ({"server_address": "::1:9092"}, "brackets"),
        ({"server_address": "[not-ip]:9092"}, "'not-ip'"),
        ({"server_address": "[::1]9092"}, "HOST:PORT"),
        ({"server_address": "bad_host!:9092"}, "'bad_host!'"),
        ({"server_address": "0.0.0.0:9092"}, "0.0.0.0"),
        ({"validity_days": 0}, "got 0"),
        ({"validity_days": 3651}, "got 3651"),
    ],
)
def test_bad_input_is_refused_naming_the_bad_value(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ProvisioningError) as caught:
        make_federation(tmp_path, **overrides)

    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "fed").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fl.example.org:9092", ("fl.example.org", 9092)),
        ("FL.Example.org:1", ("fl.example.org", 1)),
        ("10.0.0.1:65535", ("10.0.0.1", 65535)),
        ("[::1]:9092", ("::1", 9092)),
        ("[2001:DB8:0::1]:443", ("2001:db8::1", 443)),
        (" coordinator:9092 ", ("coordinator", 9092)),
    ],
)
def test_parse_server_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_server_address(text) == expected


def test_a_naive_now_counts_as_utc(tmp_path: Path) -> None:
    root = make_federation(tmp_path, now=datetime(2030, 1, 1), validity_days=1)

    assert certificate_expiry(root / "server" / "server.pem") == datetime(2030, 1, 2, tzinfo=UTC)


# --------------------------------------------------------------------------- listen address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:9092", ("0.0.0.0", 9092)),
        ("[::]:9092", ("::", 9092)),
        ("127.0.0.1:9092", ("127.0.0.1", 9092)),
        ("fl.example.org:443", ("fl.example.org", 443)),
    ],
)
def test_a_listen_address_may_be_every_interface(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize("text", ["0.0.0.0:0", "0.0.0.0:99999", "0.0.0.0", "[::]:x", "a b:1"])
def test_a_bad_listen_address_names_listen(text: str) -> None:
    with pytest.raises(ProvisioningError) as err:
        parse_listen_address(text)

    assert text in str(err.value) and "--listen" in str(err.value.hint)
    assert "127.0.0.1" not in str(err.value)


def test_a_server_address_still_refuses_every_interface() -> None:
    with pytest.raises(ProvisioningError, match="sites can connect to"):
        parse_server_address("0.0.0.0:9092")


# --------------------------------------------------------------------------- revocation


def test_key_fingerprint_is_the_same_for_openssh_and_pem(tmp_path: Path) -> None:
    root = make_federation(tmp_path)
    line = (root / "server" / "sites" / "clinic-a.pub").read_bytes()
    pem = serialization.load_ssh_public_key(line).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    assert key_fingerprint(pem) == key_fingerprint(line) == ssh_fingerprint(line)


def test_revoke_site_records_the_key_and_takes_it_out_of_the_server_kit(tmp_path: Path) -> None:
    root = make_federation(tmp_path)
    fingerprint = ssh_fingerprint((root / "sites" / "clinic-a" / "site.pub").read_bytes())

    revocation = revoke_site(root, "clinic-a")

    meta = tomllib.loads((root / "federation.toml").read_text())
    assert revocation.fingerprint == fingerprint
    assert meta["sites"] == ["clinic-b"] and "clinic-a" not in meta["fingerprints"]
    assert meta["revoked"] == {fingerprint: "clinic-a"}
    assert read_revoked(root / "server") == {fingerprint: "clinic-a"}
    assert not (root / "server" / "sites" / "clinic-a.pub").exists()
    assert not (root / "sites" / "clinic-a").exists()
    assert (
        revocation.kit_moved_to is not None and revocation.kit_moved_to.parent == root / "revoked"
    )
    assert (revocation.kit_moved_to / "site.key").is_file()
    kit = load_kit(root / "server", role="server")
    assert sorted(kit.site_public_keys) == ["clinic-b"]
    assert dict(kit.revoked) == {fingerprint: "clinic-a"}


def test_a_revoked_key_copied_back_is_still_not_offered(tmp_path: Path) -> None:
    root = make_federation(tmp_path)
    pub = (root / "server" / "sites" / "clinic-a.pub").read_bytes()
    revoke_site(root, "clinic-a")

    (root / "server" / "sites" / "clinic-a.pub").write_bytes(pub)  # by hand, or an old backup
    (root / "server" / "sites" / "other-name.pub").write_bytes(pub)
    kit = load_kit(root / "server", role="server")

    assert sorted(kit.site_public_keys) == ["clinic-b"]


def test_a_revoked_site_can_be_added_again_only_under_a_new_key(tmp_path: Path) -> None:
    root = make_federation(tmp_path)
    revocation = revoke_site(root, "clinic-a")

    kit_dir = add_site(root, "clinic-a")

    new = ssh_fingerprint((kit_dir / "site.pub").read_bytes())
    assert new != revocation.fingerprint
    assert sorted(load_kit(root / "server", role="server").site_public_keys) == SITES_SORTED
    meta = tomllib.loads((root / "federation.toml").read_text())
    assert meta["revoked"] == {revocation.fingerprint: "clinic-a"}
    assert meta["fingerprints"]["clinic-a"] == new


def test_add_site_refuses_a_revoked_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_federation(tmp_path)
    old_private = (root / "sites" / "clinic-a" / "site.key").read_bytes()
    old_public = (root / "sites" / "clinic-a" / "site.pub").read_bytes()
    revoke_site(root, "clinic-a")
    monkeypatch.setattr(provision, "make_site_keys", lambda: (old_private, old_public))

    with pytest.raises(ProvisioningError, match="was revoked"):
        add_site(root, "clinic-a")

    assert not (root / "sites" / "clinic-a").exists()
    assert not (root / "server" / "sites" / "clinic-a.pub").exists()


@pytest.mark.parametrize(("site", "message"), [("clinic-x", "is not in"), ("clinic-a", "already")])
def test_revoke_site_refuses_an_unknown_or_revoked_site(
    tmp_path: Path, site: str, message: str
) -> None:
    root = make_federation(tmp_path)
    revoke_site(root, "clinic-a")

    with pytest.raises(ProvisioningError, match=message):
        revoke_site(root, site)


def test_revoking_every_site_leaves_a_loadable_server_kit(tmp_path: Path) -> None:
    root = make_federation(tmp_path)

    for site in SITES:
        revoke_site(root, site)

    kit = load_kit(root / "server", role="server")
    assert not kit.site_public_keys and sorted(kit.revoked.values()) == SITES_SORTED
