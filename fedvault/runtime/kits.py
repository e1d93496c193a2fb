"""Startup kits, the role-neutral part: loading and checking a server or site kit, addresses.

`fedvault provision` (fedvault.server.provision) writes the kits; every role loads its own
here: the coordinator its server kit, each site its site kit. A kit folder holds ``kit.toml``
(role, federation, server address), the federation's ``ca.pem`` and the role's keys:
``server.pem`` + ``server.key`` and ``sites/<site>.pub`` for the server, ``site.key`` +
``site.pub`` for a site. A server kit's ``revoked.toml`` names every revoked site key by its
fingerprint; `load_kit` never offers those keys.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedvault.common.errors import ProvisioningError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HOSTNAME_PATTERN = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
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


# --------------------------------------------------------------------------- names and addresses


def validate_name(value: str, *, what: str) -> str:
    """Return ``value`` if it is a valid federation or site name, else raise ProvisioningError."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ProvisioningError(
            f"{what} must be 1-64 letters, digits, '.', '_' or '-' starting with a letter or "
            f"digit, got {value!r}",
            hint="Pick a short name such as 'clinic-a'.",
        )
    return value


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


def utc_moment(now: datetime | None) -> datetime:
    """``now`` (naive means UTC), or the current time, in UTC to the second."""
    moment = datetime.now(UTC) if now is None else now
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(microsecond=0)


# --------------------------------------------------------------------------- key fingerprints


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


def ssh_fingerprint(public_line: bytes) -> str:
    """The ``SHA256:...`` fingerprint of an OpenSSH public key, as ``ssh-keygen -l`` shows it."""
    parts = public_line.split()
    if len(parts) < 2:
        raise ProvisioningError("not an OpenSSH public key line", hint=PROVISION_HINT)
    digest = hashlib.sha256(base64.b64decode(parts[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


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


# --------------------------------------------------------------------------- loading kits


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (ValueError, OSError) as err:
        raise ProvisioningError(
            f"{path} is not a PEM certificate ({err})", hint=PROVISION_HINT
        ) from None


def certificate_expiry(path: Path) -> datetime:
    """When the PEM certificate at ``path`` expires (UTC)."""
    return load_certificate(Path(path)).not_valid_after_utc


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def check_dates(cert: x509.Certificate, what: str, now: datetime) -> None:
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
    moment = utc_moment(now)
    (ca_path,) = _require(folder, CA_CERT)
    ca_cert = load_certificate(ca_path)
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
    cert = load_certificate(cert_path)
    check_dates(cert, "the server certificate", now)
    check_dates(ca_cert, "the federation's CA certificate", now)
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
    check_dates(ca_cert, "the federation's CA certificate", now)
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
