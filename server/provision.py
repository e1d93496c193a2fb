"""Provisioning: a federation's CA, the server's TLS kit and each site's key kit, and loading kits.

A federation folder (``fedvault provision --out DIR``) holds::

    DIR/federation.toml          name, server address, dates, sites and their key fingerprints
    DIR/authority/ca.key         the CA private key: stays here, never copied into a kit
    DIR/authority/ca.pem         the CA certificate
    DIR/server/                  the coordinator's kit: kit.toml, ca.pem, server.pem, server.key,
                                 sites/<site>.pub (the public keys SuperNode authentication accepts)
    DIR/sites/<site>/            one kit per site: kit.toml, ca.pem, site.key, site.pub
    DIR/revoked/<site>-<time>/   a revoked site's kit, kept out of sites/ (`revoke-site`)

A revoked site key is recorded by its fingerprint in ``federation.toml`` (``[revoked]``) and
in the server kit's ``revoked.toml``; the server kit never offers a revoked key for
registration again, even when its public key file is copied back into ``server/sites/``.

Every key is ECDSA P-384. The server certificate is signed by the CA with SHA-384; site keys
are OpenSSH-format key pairs, the form Flower's SuperNode authentication loads. Folders that
hold private keys are 0700 and private keys are created 0600 (never written, then chmod-ed).
A whole federation, and each added site kit, is built in a staging folder beside its final
place and renamed into it, so a failure never leaves a half-written kit behind.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedvault.common.errors import ProvisioningError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HOSTNAME_PATTERN = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
MAX_VALIDITY_DAYS = 3650
CURVE = ec.SECP384R1
LOOPBACK_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

FEDERATION_FILE = "federation.toml"
KIT_FILE = "kit.toml"
CA_KEY = "ca.key"
CA_CERT = "ca.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
SITE_KEY = "site.key"
SITE_PUB = "site.pub"
REVOKED_FILE = "revoked.toml"  # in the server kit: fingerprint -> site of every revoked key
ROLES = ("server", "site")

PROVISION_HINT = "Run `fedvault provision --help` to see how a federation is provisioned."


@dataclass(frozen=True)
class Kit:
    """A validated startup kit: the server's (coordinator) or one site's.

    Server kits set ``cert``, ``key``, ``site_public_keys`` (revoked keys left out),
    ``revoked`` (fingerprint -> site of every revoked key) and ``state_dir``; site kits set
    ``site``, ``private_key`` and ``public_key``. Fields of the other role are None / empty.
    """

    path: Path
    role: str
    federation: str
    server_address: str
    ca_cert: Path
    created: str
    not_after: datetime  # the earliest expiry among the kit's certificates
    site: str | None = None
    cert: Path | None = None
    key: Path | None = None
    site_public_keys: Mapping[str, Path] = field(default_factory=dict)
    revoked: Mapping[str, str] = field(default_factory=dict)
    state_dir: Path | None = None
    private_key: Path | None = None
    public_key: Path | None = None

    @property
    def host(self) -> str:
        """The server's host name or IP address (IPv6 without brackets)."""
        return parse_server_address(self.server_address)[0]

    @property
    def port(self) -> int:
        """The server's Fleet API port."""
        return parse_server_address(self.server_address)[1]


# --------------------------------------------------------------------------- validation


def validate_name(value: str, *, what: str) -> str:
    """Return ``value`` if it is a valid federation or site name, else raise ProvisioningError."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ProvisioningError(
            f"{what} must be 1-64 letters, digits, '.', '_' or '-' starting with a letter or "
            f"digit, got {value!r}",
            hint="Pick a short name such as 'clinic-a'.",
        )
    return value


def validate_sites(sites: Iterable[str]) -> list[str]:
    """The site names, each valid, at least one, and no two equal ignoring case."""
    names = [validate_name(site, what="site name") for site in sites]
    if not names:
        raise ProvisioningError(
            "a federation needs at least one site, got none",
            hint="Name the sites with --sites, e.g. --sites clinic-a,clinic-b.",
        )
    seen: dict[str, str] = {}
    for site in names:
        if site.lower() in seen:
            raise ProvisioningError(
                f"site names must be unique (ignoring case), got {seen[site.lower()]!r} "
                f"and {site!r}",
                hint="Give every site its own name.",
            )
        seen[site.lower()] = site
    return names


def validate_validity_days(days: int) -> int:
    """Return ``days`` if it is a whole number of days in 1..MAX_VALIDITY_DAYS."""
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_VALIDITY_DAYS:
        raise ProvisioningError(
            f"validity days must be between 1 and {MAX_VALIDITY_DAYS}, got {days!r}",
            hint="The default, 365 days, suits most federations.",
        )
    return days


def parse_server_address(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 as ``[::1]:9092``) into a lower-case host and a port."""
    bad = f"server address must be HOST:PORT (IPv6 as [::1]:9092), got {text!r}"
    hint = "Give the address sites connect to, e.g. --server-address fl.example.org:9092."
    value = text.strip()
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise ProvisioningError(bad, hint=hint)
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.IPv6Address(
                host
            )
        except ValueError:
            raise ProvisioningError(
                f"{host!r} in server address {text!r} is not an IPv6 address", hint=hint
            ) from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ProvisioningError(bad, hint=hint)
        if ":" in host:
            raise ProvisioningError(
                f"an IPv6 server address goes in brackets, e.g. [{host}]:{port_text}; got {text!r}",
                hint=hint,
            )
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            address = None
            if not HOSTNAME_PATTERN.fullmatch(host):
                raise ProvisioningError(
                    f"{host!r} in server address {text!r} is neither a host name nor an IP address",
                    hint=hint,
                ) from None
    if address is not None and address.is_unspecified:
        raise ProvisioningError(
            f"server address must be one that sites can connect to, not {address}; got {text!r}",
            hint=hint,
        )
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ProvisioningError(
            f"server port must be a number in 1..65535, got {port_text!r} in {text!r}", hint=hint
        )
    return (str(address) if address is not None else host.lower()), int(port_text)


def parse_listen_address(text: str) -> tuple[str, int]:
    """Split a listen address ``HOST:PORT``; unlike a server address, 0.0.0.0 and [::] are fine."""
    hint = "Give --listen as HOST:PORT, e.g. 0.0.0.0:9092 (every interface) or 127.0.0.1:9092."
    wildcard = {"0.0.0.0": "0.0.0.0", "[::]": "::"}  # every interface, IPv4 / IPv6
    host, sep, port_text = text.strip().rpartition(":")
    if sep and host in wildcard:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ProvisioningError(
                f"listen port must be a number in 1..65535, got {port_text!r} in {text!r}",
                hint=hint,
            )
        return wildcard[host], int(port_text)
    try:
        return parse_server_address(text)
    except ProvisioningError as err:
        raise ProvisioningError(
            str(err).replace("server address", "listen address").replace("server port", "port"),
            hint=hint,
        ) from None


def format_server_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _utc(now: datetime | None) -> datetime:
    """``now`` (naive means UTC), or the current time, in UTC to the second."""
    moment = datetime.now(UTC) if now is None else now
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(microsecond=0)


# --------------------------------------------------------------------------- crypto


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


def _validity(now: datetime, days: int) -> tuple[datetime, datetime]:
    return now - timedelta(minutes=1), now + timedelta(days=days)


def make_ca(
    name: str, *, now: datetime, validity_days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (subject CN "<name> fedvault CA") that may sign end-entity certificates."""
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} fedvault CA")])
    not_before, not_after = _validity(now, validity_days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def subject_alt_names(host: str) -> list[x509.GeneralName]:
    """The server certificate's SANs: ``host`` plus the loopback names, without duplicates."""
    names: list[x509.GeneralName] = []
    for value in (host, *LOOPBACK_NAMES):
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            entry = x509.DNSName(value.lower())
        if entry not in names:
            names.append(entry)
    return names


def make_server_cert(
    host: str,
    *,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    now: datetime,
    validity_days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for ``host`` (and loopback), signed by the CA with SHA-384."""
    key = _new_key()
    not_before, not_after = _validity(now, validity_days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(subject_alt_names(host)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_site_keys() -> tuple[bytes, bytes]:
    """A site's ECDSA P-384 key pair as (OpenSSH private key, OpenSSH public key line)."""
    key = _new_key()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


def ssh_fingerprint(public_line: bytes) -> str:
    """The ``SHA256:...`` fingerprint of an OpenSSH public key, as ``ssh-keygen -l`` shows it."""
    parts = public_line.split()
    if len(parts) < 2:
        raise ProvisioningError("not an OpenSSH public key line", hint=PROVISION_HINT)
    digest = hashlib.sha256(base64.b64decode(parts[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def key_fingerprint(public_key: bytes) -> str:
    """The ``SHA256:...`` fingerprint of a public key given as an OpenSSH line or as PEM.

    Flower stores a SuperNode's key as PEM (SubjectPublicKeyInfo); the kits hold OpenSSH
    lines. Both name the same key by the same fingerprint.
    """
    if public_key.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(public_key)
        except (ValueError, UnsupportedAlgorithm) as err:
            raise ProvisioningError(f"not a PEM public key ({err})", hint=PROVISION_HINT) from None
        public_key = key.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    return ssh_fingerprint(public_key)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# --------------------------------------------------------------------------- files


def _write_new(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Create ``path`` with ``mode`` from the start (never chmod-ed later); refuse to overwrite."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _replace_file(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``path`` atomically: a new file beside it, then a rename over it."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write_new(temporary, data, mode=mode)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk where the platform allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _mkdir(path: Path, *, private: bool) -> Path:
    path.mkdir(mode=0o700 if private else 0o755)
    os.chmod(path, 0o700 if private else 0o755)  # mkdir's mode is narrowed by the umask only
    return path


def _toml(table: Mapping[str, Any]) -> str:
    """TOML text for a flat table of strings and string lists, plus string-valued sub-tables."""
    lines: list[str] = []
    subtables: list[tuple[str, Mapping[str, str]]] = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            subtables.append((key, value))
        elif isinstance(value, list):
            lines.append(f"{key} = [{', '.join(json.dumps(v) for v in value)}]")
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    for key, sub in subtables:
        lines.append(f"\n[{key}]")
        lines.extend(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in sub.items())
    return "\n".join(lines) + "\n"


def _federation_toml(meta: Mapping[str, Any]) -> bytes:
    header = (
        "# fedvault federation, written by `fedvault provision`. Keep this folder (and above\n"
        "# all authority/ca.key) on the coordinator; hand out only server/ and sites/<site>/.\n"
    )
    return (header + _toml(meta)).encode("utf-8")


def _kit_toml(kit: Mapping[str, str]) -> bytes:
    header = "# fedvault startup kit, written by `fedvault provision`; do not edit.\n"
    return (header + _toml(kit)).encode("utf-8")


def _write_site_kit(
    folder: Path, *, site: str, federation: str, server_address: str, ca_pem: bytes, created: str
) -> bytes:
    """Fill the new private folder ``folder`` with a site kit; return the site's public key line."""
    private, public = make_site_keys()
    _write_new(
        folder / KIT_FILE,
        _kit_toml(
            {
                "role": "site",
                "federation": federation,
                "server-address": server_address,
                "site": site,
                "created": created,
            }
        ),
    )
    _write_new(folder / CA_CERT, ca_pem)
    _write_new(folder / SITE_KEY, private, mode=0o600)
    _write_new(folder / SITE_PUB, public)
    return public


# --------------------------------------------------------------------------- provisioning


def provision_federation(
    *,
    name: str,
    server_address: str,
    sites: Sequence[str],
    out: Path,
    validity_days: int = 365,
    force: bool = False,
    now: datetime | None = None,
) -> Path:
    """Create the CA, the server kit and one kit per site in ``out``; return ``out`` (absolute).

    ``now`` fixes the certificates' start time (tests use it to make expired certificates).
    An existing non-empty ``out`` is replaced only with ``force``, and only if it holds a
    federation, so a mistyped ``--out`` can never delete an unrelated folder.
    """
    validate_name(name, what="federation name")
    site_names = validate_sites(sites)
    host, port = parse_server_address(server_address)
    address = format_server_address(host, port)
    validate_validity_days(validity_days)
    moment = _utc(now)
    target = Path(out).expanduser().resolve()
    _check_target(target, force=force)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.provisioning-", dir=target.parent))
    try:
        os.chmod(staging, 0o755)
        _build_federation(
            staging,
            name=name,
            address=address,
            host=host,
            sites=site_names,
            now=moment,
            validity_days=validity_days,
        )
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _check_target(target: Path, *, force: bool) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise ProvisioningError(
            f"{target} exists and is not a folder", hint="Choose another --out folder."
        )
    if not any(target.iterdir()):
        return
    if not (target / FEDERATION_FILE).is_file():
        raise ProvisioningError(
            f"{target} is not empty and does not hold a fedvault federation; refusing to "
            "replace it",
            hint="Choose a new or empty --out folder (--force replaces only a federation).",
        )
    if not force:
        raise ProvisioningError(
            f"{target} already holds a federation",
            hint="Use --force to replace it (every kit is re-issued), or add-site to add a site.",
        )


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` folder to ``target``, replacing an old federation there."""
    if target.exists() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.rename(staging, target)
        _fsync_dir(target.parent)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-", dir=target.parent))
    retired.rmdir()
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(retired, target)
        raise
    _fsync_dir(target.parent)
    shutil.rmtree(retired, ignore_errors=True)


def _build_federation(
    root: Path,
    *,
    name: str,
    address: str,
    host: str,
    sites: Sequence[str],
    now: datetime,
    validity_days: int,
) -> None:
    ca_key, ca_cert = make_ca(name, now=now, validity_days=validity_days)
    server_key, server_cert = make_server_cert(
        host, ca_key=ca_key, ca_cert=ca_cert, now=now, validity_days=validity_days
    )
    ca_pem = _pem(ca_cert)
    created = now.isoformat()

    authority = _mkdir(root / "authority", private=True)
    _write_new(authority / CA_KEY, _pkcs8(ca_key), mode=0o600)
    _write_new(authority / CA_CERT, ca_pem)

    server = _mkdir(root / "server", private=True)
    _write_new(
        server / KIT_FILE,
        _kit_toml(
            {"role": "server", "federation": name, "server-address": address, "created": created}
        ),
    )
    _write_new(server / CA_CERT, ca_pem)
    _write_new(server / SERVER_CERT, _pem(server_cert))
    _write_new(server / SERVER_KEY, _pkcs8(server_key), mode=0o600)
    server_sites = _mkdir(server / "sites", private=False)

    sites_dir = _mkdir(root / "sites", private=False)
    fingerprints: dict[str, str] = {}
    for site in sites:
        public = _write_site_kit(
            _mkdir(sites_dir / site, private=True),
            site=site,
            federation=name,
            server_address=address,
            ca_pem=ca_pem,
            created=created,
        )
        _write_new(server_sites / f"{site}.pub", public)
        fingerprints[site] = ssh_fingerprint(public)

    meta = {
        "name": name,
        "server-address": address,
        "created": created,
        "not-after": ca_cert.not_valid_after_utc.isoformat(),
        "sites": list(sites),
        "fingerprints": fingerprints,
    }
    _write_new(root / FEDERATION_FILE, _federation_toml(meta))


def read_federation(out: Path) -> dict[str, Any]:
    """The parsed ``federation.toml`` of a federation folder, checked for the needed keys."""
    path = Path(out) / FEDERATION_FILE
    if not path.is_file():
        raise ProvisioningError(
            f"{Path(out)} does not hold a federation (no {FEDERATION_FILE})",
            hint="Give the --out folder that `fedvault provision` wrote.",
        )
    try:
        meta = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as err:
        raise ProvisioningError(f"cannot read {path}: {err}", hint=PROVISION_HINT) from None
    for key, kind in (("name", str), ("server-address", str), ("sites", list)):
        if not isinstance(meta.get(key), kind):
            raise ProvisioningError(f"{path} has no valid '{key}'", hint=PROVISION_HINT)
    for table in ("fingerprints", "revoked"):
        if not isinstance(meta.get(table, {}), dict):
            raise ProvisioningError(f"{path} has no valid '{table}' table", hint=PROVISION_HINT)
    return meta


def add_site(out: Path, site: str, *, now: datetime | None = None) -> Path:
    """Add one site's kit to an existing federation, re-issuing nothing; return the new kit.

    Writes ``sites/<site>/``, ``server/sites/<site>.pub`` and an updated ``federation.toml``;
    every other file stays byte-identical. A running server picks the new key up only once it
    is registered with it (see the server's own commands).
    """
    root = Path(out).expanduser().resolve()
    validate_name(site, what="site name")
    ca_key_path, ca_cert_path = root / "authority" / CA_KEY, root / "authority" / CA_CERT
    if not ca_key_path.is_file() or not ca_cert_path.is_file():
        raise ProvisioningError(
            f"{root} has no certificate authority ({ca_key_path.relative_to(root)} and "
            f"{ca_cert_path.relative_to(root)})",
            hint="Run add-site on the coordinator's federation folder, the one that holds "
            "authority/.",
        )
    meta = read_federation(root)
    if not (root / "server" / "sites").is_dir():
        raise ProvisioningError(
            f"{root} has no server kit (server/sites/) to add the site's public key to",
            hint="Run add-site on the federation folder `fedvault provision` wrote, with its "
            "server/ folder in place.",
        )
    if site.lower() in {str(known).lower() for known in meta["sites"]}:
        raise ProvisioningError(
            f"site {site!r} is already in the federation {meta['name']!r}",
            hint="Choose another site name; to replace a site's keys, revoke them first "
            f"(`fedvault provision revoke-site --out {root} --site {site}`).",
        )
    validate_sites([*meta["sites"], site])
    kit_dir = root / "sites" / site
    pub_path = root / "server" / "sites" / f"{site}.pub"
    for leftover in (kit_dir, pub_path):
        if leftover.exists():
            raise ProvisioningError(
                f"{leftover} already exists although site {site!r} is not in {FEDERATION_FILE}",
                hint="Remove the leftover file or folder, or choose another site name.",
            )
    ca_pem = ca_cert_path.read_bytes()
    moment = _utc(now)
    _check_dates(_load_cert(ca_cert_path), "the federation's CA certificate", moment)

    staging = Path(tempfile.mkdtemp(prefix=f".{site}.provisioning-", dir=root / "sites"))
    try:
        public = _write_site_kit(
            staging,
            site=site,
            federation=str(meta["name"]),
            server_address=str(meta["server-address"]),
            ca_pem=ca_pem,
            created=moment.isoformat(),
        )
        os.chmod(staging, 0o700)
        os.rename(staging, kit_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(kit_dir.parent)
    fingerprint = ssh_fingerprint(public)
    revoked = {**meta.get("revoked", {}), **read_revoked(root / "server")}
    if fingerprint in revoked:  # a fresh key never collides; a key put back by hand would
        shutil.rmtree(kit_dir, ignore_errors=True)
        raise ProvisioningError(
            f"the key {fingerprint} was revoked (site {revoked[fingerprint]!r}); refusing to "
            "add it again",
            hint="Run add-site again: it makes a new key.",
        )
    _replace_file(pub_path, public)
    meta["sites"] = [*meta["sites"], site]
    meta["fingerprints"] = {**meta.get("fingerprints", {}), site: ssh_fingerprint(public)}
    _replace_file(root / FEDERATION_FILE, _federation_toml(meta))
    return kit_dir


# --------------------------------------------------------------------------- revocation


@dataclass(frozen=True)
class Revocation:
    """What `revoke_site` did: the site, its key's fingerprint, where its kit went."""

    site: str
    fingerprint: str
    server_kit: Path
    kit_moved_to: Path | None


def read_revoked(server_kit: Path) -> dict[str, str]:
    """Fingerprint -> site of every key revoked in the server kit (its ``revoked.toml``)."""
    path = Path(server_kit) / REVOKED_FILE
    if not path.is_file():
        return {}
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("revoked", {})
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as err:
        raise ProvisioningError(f"cannot read {path}: {err}", hint=PROVISION_HINT) from None
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise ProvisioningError(f"{path} has no valid 'revoked' table", hint=PROVISION_HINT)
    return dict(table)


def _revoked_toml(revoked: Mapping[str, str]) -> bytes:
    header = (
        "# Site keys revoked by `fedvault provision revoke-site` (fingerprint = site); the\n"
        "# coordinator never registers them again. Do not edit.\n"
    )
    return (header + _toml({"revoked": dict(revoked)})).encode("utf-8")


def revoke_site(out: Path, site: str, *, now: datetime | None = None) -> Revocation:
    """Revoke ``site``'s key in the federation folder ``out``; return what was done.

    The key's fingerprint is recorded first (``server/revoked.toml``, ``[revoked]`` in
    ``federation.toml``), then its public key leaves ``server/sites/`` and the site leaves the
    federation's site list, and the federation's copy of its kit moves to ``revoked/``. A
    site of the same name can then be added again with `add_site`, under a new key. A running
    coordinator still knows the key until it is unregistered there (server/deploy.py).
    """
    root = Path(out).expanduser().resolve()
    validate_name(site, what="site name")
    meta = read_federation(root)
    server = root / "server"
    revoked = {**meta.get("revoked", {}), **read_revoked(server)}
    if site not in meta["sites"]:
        why = (
            "was already revoked"
            if site in revoked.values()
            else f"is not in the federation {meta['name']!r}"
        )
        raise ProvisioningError(
            f"site {site!r} {why} (sites: {', '.join(meta['sites']) or 'none'})",
            hint="Give the name of a current site, exactly as `fedvault provision` listed it.",
        )
    pub_path = server / "sites" / f"{site}.pub"
    if pub_path.is_file():
        fingerprint = ssh_fingerprint(pub_path.read_bytes())
    elif isinstance(meta.get("fingerprints", {}).get(site), str):
        fingerprint = str(meta["fingerprints"][site])
    else:
        raise ProvisioningError(
            f"neither {pub_path} nor {FEDERATION_FILE} says which key site {site!r} holds",
            hint="Run revoke-site on the federation folder `fedvault provision` wrote.",
        )
    revoked[fingerprint] = site
    _replace_file(server / REVOKED_FILE, _revoked_toml(revoked))  # recorded before anything goes
    meta["revoked"] = revoked
    meta["sites"] = [name for name in meta["sites"] if name != site]
    meta["fingerprints"] = {k: v for k, v in meta.get("fingerprints", {}).items() if k != site}
    _replace_file(root / FEDERATION_FILE, _federation_toml(meta))
    pub_path.unlink(missing_ok=True)
    _fsync_dir(pub_path.parent)
    kit_dir, moved = root / "sites" / site, None
    if kit_dir.is_dir():
        archive = root / "revoked"
        archive.mkdir(mode=0o700, exist_ok=True)
        moved = archive / f"{site}-{_utc(now).strftime('%Y%m%dT%H%M%SZ')}"
        os.rename(kit_dir, moved)
        _fsync_dir(archive)
    return Revocation(site=site, fingerprint=fingerprint, server_kit=server, kit_moved_to=moved)


# --------------------------------------------------------------------------- loading kits


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (ValueError, OSError) as err:
        raise ProvisioningError(
            f"{path} is not a PEM certificate ({err})", hint=PROVISION_HINT
        ) from None


def certificate_expiry(path: Path) -> datetime:
    """When the PEM certificate at ``path`` expires (UTC)."""
    return _load_cert(Path(path)).not_valid_after_utc


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _check_dates(cert: x509.Certificate, what: str, now: datetime) -> None:
    if now > cert.not_valid_after_utc:
        raise ProvisioningError(
            f"{what} expired on {_when(cert.not_valid_after_utc)}; re-provision the federation "
            "or use a kit that is still valid",
            hint="Run `fedvault provision ... --force` on the coordinator and hand out the new "
            "kits.",
        )
    if now < cert.not_valid_before_utc:
        raise ProvisioningError(
            f"{what} is not valid until {_when(cert.not_valid_before_utc)}",
            hint="Check this machine's clock, or wait until then.",
        )


def _check_private(path: Path) -> None:
    """Refuse a private key file that group or others may read or write."""
    if os.name == "nt":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        how = "readable" if mode & 0o044 else "writable"
        raise ProvisioningError(
            f"private key {path} is {how} by others (mode {mode:04o})",
            hint=f"Run: chmod 600 {path}",
        )


def _load_ssh_public(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, UnsupportedAlgorithm, OSError) as err:
        raise ProvisioningError(
            f"{path} is not an OpenSSH public key ({err})", hint=PROVISION_HINT
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ProvisioningError(f"{path} is not an ECDSA public key", hint=PROVISION_HINT)
    return key


def _read_kit_toml(path: Path) -> dict[str, Any]:
    not_kit = ProvisioningError(
        f"not a fedvault startup kit: {path}",
        hint="Give the folder `fedvault provision` wrote for this role (server/ or "
        "sites/<site>/ of its --out folder).",
    )
    if not path.is_dir():
        raise ProvisioningError(
            f"not a fedvault startup kit: {path} (no such folder)", hint=not_kit.hint
        )
    file = path / KIT_FILE
    if not file.is_file():
        if (path / FEDERATION_FILE).is_file():
            raise ProvisioningError(
                f"not a fedvault startup kit: {path} is a federation folder",
                hint=f"Give its server kit ({path / 'server'}) or one site kit "
                f"({path / 'sites'}/<site>).",
            )
        raise not_kit
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError):
        raise not_kit from None
    for key in ("role", "federation", "server-address"):
        if not isinstance(data.get(key), str):
            raise not_kit
    if data["role"] not in ROLES:
        raise not_kit
    return data


def _require(path: Path, *names: str) -> list[Path]:
    missing = [name for name in names if not (path / name).is_file()]
    if missing:
        raise ProvisioningError(
            f"the kit {path} is missing {', '.join(missing)}",
            hint="Copy the whole kit folder again from the coordinator, or re-provision.",
        )
    return [path / name for name in names]


def load_kit(path: Path, *, role: str | None = None, now: datetime | None = None) -> Kit:
    """Load and check a startup kit: its files, key permissions, certificates and their dates.

    ``role`` ("server" or "site"), when given, must match the kit's. ``now`` is the moment the
    certificates must be valid at (default: the current time).
    """
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    folder = Path(path).expanduser().resolve()
    data = _read_kit_toml(folder)
    if role is not None and data["role"] != role:
        raise ProvisioningError(
            f"this is a {data['role']} kit, not a {role} kit: {folder}",
            hint=f"Give the {role} kit ({'server/' if role == 'server' else 'sites/<site>/'} "
            "of the federation folder).",
        )
    host, port = parse_server_address(data["server-address"])
    moment = _utc(now)
    (ca_path,) = _require(folder, CA_CERT)
    ca_cert = _load_cert(ca_path)
    common: dict[str, Any] = {
        "path": folder,
        "federation": data["federation"],
        "server_address": format_server_address(host, port),
        "ca_cert": ca_path,
        "created": str(data.get("created", "")),
    }
    if data["role"] == "server":
        return _load_server_kit(folder, ca_cert, host=host, now=moment, common=common)
    return _load_site_kit(folder, ca_cert, data=data, now=moment, common=common)


def _load_server_kit(
    folder: Path, ca_cert: x509.Certificate, *, host: str, now: datetime, common: dict[str, Any]
) -> Kit:
    cert_path, key_path = _require(folder, SERVER_CERT, SERVER_KEY)
    _check_private(key_path)
    cert = _load_cert(cert_path)
    _check_dates(cert, "the server certificate", now)
    _check_dates(ca_cert, "the federation's CA certificate", now)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise ProvisioningError(
            f"{cert_path} was not issued by the kit's {CA_CERT} (files from two federations?)",
            hint="Copy the whole server kit again, or re-provision.",
        ) from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ProvisioningError(
            f"{key_path} is not an unencrypted PEM private key ({err})", hint=PROVISION_HINT
        ) from None
    if key.public_key() != cert.public_key():
        raise ProvisioningError(
            f"{key_path} does not belong to {cert_path}", hint="Copy the whole kit again."
        )
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    if subject_alt_names(host)[0] not in list(sans):
        raise ProvisioningError(
            f"{cert_path} does not cover the server address host {host!r}",
            hint="Re-provision with the address sites connect to (--server-address).",
        )
    site_dir = folder / "sites"
    keys = {p.stem: p for p in sorted(site_dir.glob("*.pub"))} if site_dir.is_dir() else {}
    revoked = read_revoked(folder)
    keys = {s: p for s, p in keys.items() if ssh_fingerprint(p.read_bytes()) not in revoked}
    if not keys and not revoked:  # with every site revoked, the kit still serves revocation
        raise ProvisioningError(
            f"the server kit {folder} holds no site public keys (sites/*.pub)",
            hint="Copy the whole server kit again, or add a site with `fedvault provision "
            "add-site`.",
        )
    for site, pub in keys.items():
        validate_name(site, what="site name")
        _load_ssh_public(pub)
    return Kit(
        role="server",
        not_after=min(cert.not_valid_after_utc, ca_cert.not_valid_after_utc),
        cert=cert_path,
        key=key_path,
        site_public_keys=keys,
        revoked=revoked,
        state_dir=folder / "state",
        **common,
    )


def _load_site_kit(
    folder: Path,
    ca_cert: x509.Certificate,
    *,
    data: dict[str, Any],
    now: datetime,
    common: dict[str, Any],
) -> Kit:
    site = data.get("site")
    if not isinstance(site, str):
        raise ProvisioningError(f"not a fedvault startup kit: {folder}", hint=PROVISION_HINT)
    validate_name(site, what="site name")
    private_path, public_path = _require(folder, SITE_KEY, SITE_PUB)
    _check_private(private_path)
    _check_dates(ca_cert, "the federation's CA certificate", now)
    try:
        private = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ProvisioningError(
            f"{private_path} is not an unencrypted OpenSSH private key ({err})",
            hint=PROVISION_HINT,
        ) from None
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise ProvisioningError(f"{private_path} is not an ECDSA key", hint=PROVISION_HINT)
    if private.public_key() != _load_ssh_public(public_path):
        raise ProvisioningError(
            f"{public_path} does not belong to {private_path}", hint="Copy the whole kit again."
        )
    return Kit(
        role="site",
        not_after=ca_cert.not_valid_after_utc,
        site=site,
        private_key=private_path,
        public_key=public_path,
        **common,
    )
