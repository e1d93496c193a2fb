"""Revoking a site: its key's fingerprint recorded, its public key and kit taken out."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fedvault.common.errors import ProvisioningError
from fedvault.runtime.kits import (
    FEDERATION_FILE,
    REVOKED_FILE,
    read_revoked,
    ssh_fingerprint,
    utc_moment,
    validate_name,
)
from fedvault.server.files import (
    federation_toml,
    fsync_dir,
    read_federation,
    replace_file,
    toml_text,
)


@dataclass(frozen=True)
class Revocation:
    """What `revoke_site` did: the site, its key's fingerprint, where its kit went."""

    site: str
    fingerprint: str
    server_kit: Path
    kit_moved_to: Path | None


def _revoked_toml(revoked: Mapping[str, str]) -> bytes:
    header = (
        "# Site keys revoked by `fedvault provision revoke-site` (fingerprint = site); the\n"
        "# coordinator never registers them again. Do not edit.\n"
    )
    return (header + toml_text({"revoked": dict(revoked)})).encode("utf-8")


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
    replace_file(server / REVOKED_FILE, _revoked_toml(revoked))  # recorded before anything goes
    meta["revoked"] = revoked
    meta["sites"] = [name for name in meta["sites"] if name != site]
    meta["fingerprints"] = {k: v for k, v in meta.get("fingerprints", {}).items() if k != site}
    replace_file(root / FEDERATION_FILE, federation_toml(meta))
    pub_path.unlink(missing_ok=True)
    fsync_dir(pub_path.parent)
    kit_dir, moved = root / "sites" / site, None
    if kit_dir.is_dir():
        archive = root / "revoked"
        archive.mkdir(mode=0o700, exist_ok=True)
        moved = archive / f"{site}-{utc_moment(now).strftime('%Y%m%dT%H%M%SZ')}"
        os.rename(kit_dir, moved)
        fsync_dir(archive)
    return Revocation(site=site, fingerprint=fingerprint, server_kit=server, kit_moved_to=moved)
