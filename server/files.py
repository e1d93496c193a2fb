"""The federation folder's files: written new or replaced atomically, and its TOML tables."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedvault.common.errors import ProvisioningError
from fedvault.runtime.kits import FEDERATION_FILE, PROVISION_HINT


def write_new(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Create ``path`` with ``mode`` from the start (never chmod-ed later); refuse to overwrite."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def replace_file(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``path`` atomically: a new file beside it, then a rename over it."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write_new(temporary, data, mode=mode)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk where the platform allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_dir(path: Path, *, private: bool) -> Path:
    path.mkdir(mode=0o700 if private else 0o755)
    os.chmod(path, 0o700 if private else 0o755)  # mkdir's mode is narrowed by the umask only
    return path


def toml_text(table: Mapping[str, Any]) -> str:
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


def federation_toml(meta: Mapping[str, Any]) -> bytes:
    header = (
        "# fedvault federation, written by `fedvault provision`. Keep this folder (and above\n"
        "# all authority/ca.key) on the coordinator; hand out only server/ and sites/<site>/.\n"
    )
    return (header + toml_text(meta)).encode("utf-8")


def kit_toml(kit: Mapping[str, str]) -> bytes:
    header = "# fedvault startup kit, written by `fedvault provision`; do not edit.\n"
    return (header + toml_text(kit)).encode("utf-8")


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
