"""Provisioning: a federation's CA, the server's TLS kit and each site's key kit; adding a site.

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

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from fedvault.common.errors import ProvisioningError
from fedvault.runtime.kits import (
    CA_CERT,
    CA_KEY,
    FEDERATION_FILE,
    KIT_FILE,
    SERVER_CERT,
    SERVER_KEY,
    SITE_KEY,
    SITE_PUB,
    check_dates,
    format_server_address,
    load_certificate,
    parse_server_address,
    read_revoked,
    ssh_fingerprint,
    utc_moment,
    validate_name,
)
from fedvault.server.certificates import (
    certificate_pem,
    make_ca,
    make_server_cert,
    make_site_keys,
    private_key_pkcs8,
)
from fedvault.server.files import (
    federation_toml,
    fsync_dir,
    kit_toml,
    make_dir,
    read_federation,
    replace_file,
    write_new,
)

MAX_VALIDITY_DAYS = 3650


# --------------------------------------------------------------------------- validation


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


def _write_site_kit(
    folder: Path, *, site: str, federation: str, server_address: str, ca_pem: bytes, created: str
) -> bytes:
    """Fill the new private folder ``folder`` with a site kit; return the site's public key line."""
    private, public = make_site_keys()
    write_new(
        folder / KIT_FILE,
        kit_toml(
            {
                "role": "site",
                "federation": federation,
                "server-address": server_address,
                "site": site,
                "created": created,
            }
        ),
    )
    write_new(folder / CA_CERT, ca_pem)
    write_new(folder / SITE_KEY, private, mode=0o600)
    write_new(folder / SITE_PUB, public)
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
    moment = utc_moment(now)
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
        fsync_dir(target.parent)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-", dir=target.parent))
    retired.rmdir()
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(retired, target)
        raise
    fsync_dir(target.parent)
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
    ca_pem = certificate_pem(ca_cert)
    created = now.isoformat()

    authority = make_dir(root / "authority", private=True)
    write_new(authority / CA_KEY, private_key_pkcs8(ca_key), mode=0o600)
    write_new(authority / CA_CERT, ca_pem)

    server = make_dir(root / "server", private=True)
    write_new(
        server / KIT_FILE,
        kit_toml(
            {"role": "server", "federation": name, "server-address": address, "created": created}
        ),
    )
    write_new(server / CA_CERT, ca_pem)
    write_new(server / SERVER_CERT, certificate_pem(server_cert))
    write_new(server / SERVER_KEY, private_key_pkcs8(server_key), mode=0o600)
    server_sites = make_dir(server / "sites", private=False)

    sites_dir = make_dir(root / "sites", private=False)
    fingerprints: dict[str, str] = {}
    for site in sites:
        public = _write_site_kit(
            make_dir(sites_dir / site, private=True),
            site=site,
            federation=name,
            server_address=address,
            ca_pem=ca_pem,
            created=created,
        )
        write_new(server_sites / f"{site}.pub", public)
        fingerprints[site] = ssh_fingerprint(public)

    meta = {
        "name": name,
        "server-address": address,
        "created": created,
        "not-after": ca_cert.not_valid_after_utc.isoformat(),
        "sites": list(sites),
        "fingerprints": fingerprints,
    }
    write_new(root / FEDERATION_FILE, federation_toml(meta))


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
    moment = utc_moment(now)
    check_dates(load_certificate(ca_cert_path), "the federation's CA certificate", moment)

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
    fsync_dir(kit_dir.parent)
    fingerprint = ssh_fingerprint(public)
    revoked = {**meta.get("revoked", {}), **read_revoked(root / "server")}
    if fingerprint in revoked:  # a fresh key never collides; a key put back by hand would
        shutil.rmtree(kit_dir, ignore_errors=True)
        raise ProvisioningError(
            f"the key {fingerprint} was revoked (site {revoked[fingerprint]!r}); refusing to "
            "add it again",
            hint="Run add-site again: it makes a new key.",
        )
    replace_file(pub_path, public)
    meta["sites"] = [*meta["sites"], site]
    meta["fingerprints"] = {**meta.get("fingerprints", {}), site: ssh_fingerprint(public)}
    replace_file(root / FEDERATION_FILE, federation_toml(meta))
    return kit_dir
