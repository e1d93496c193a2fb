"""A small provisioned federation for tests of provisioning, certificates and kit loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from fedvault.common.errors import ProvisioningError
from fedvault.server.provision import provision_federation

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


def cert_at(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def raises_provisioning(match: str) -> Any:
    return pytest.raises(ProvisioningError, match=match)
