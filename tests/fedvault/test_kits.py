"""Tests for fedvault/runtime/kits.py: loading server and site kits, server and listen addresses."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fedvault.common.errors import ProvisioningError
from fedvault.runtime.kits import (
    certificate_expiry,
    load_kit,
    parse_listen_address,
    parse_server_address,
)
from tests.federations import ADDRESS, NAME, SITES, make_federation, raises_provisioning

pytestmark = pytest.mark.unit


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


# --------------------------------------------------------------------------- addresses


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
