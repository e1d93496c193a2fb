"""Tests for server/provision.py and server/revocation.py: federation layout, add/revoke."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedvault.common.errors import ProvisioningError
from fedvault.runtime.kits import certificate_expiry, load_kit, read_revoked, ssh_fingerprint
from fedvault.server import provision
from fedvault.server.provision import add_site
from fedvault.server.revocation import revoke_site
from tests.federations import (
    ADDRESS,
    NAME,
    SITES,
    SITES_SORTED,
    cert_at,
    make_federation,
    raises_provisioning,
)

pytestmark = pytest.mark.unit


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
    assert meta["fingerprints"]["clinic-c"] == ssh_fingerprint((kit_dir / "site.pub").read_bytes())
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


def test_a_naive_now_counts_as_utc(tmp_path: Path) -> None:
    root = make_federation(tmp_path, now=datetime(2030, 1, 1), validity_days=1)

    assert certificate_expiry(root / "server" / "server.pem") == datetime(2030, 1, 2, tzinfo=UTC)


# --------------------------------------------------------------------------- revocation


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
