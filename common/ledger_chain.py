"""The privacy ledger's tamper evidence: its entries' hash chain and the anchor file beside it."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from fedvault.common.errors import LedgerError

#: The ``prev_hash`` of a ledger's first entry, and the head of an empty ledger.
GENESIS = "0" * 64
#: The fields of an entry the chain covers, in the canonical JSON's (sorted) key order.
CHAINED_FIELDS = (
    "accountant",
    "dataset",
    "delta",
    "noise_multiplier",
    "recorded_at",
    "round",
    "run_id",
    "sample_rate",
    "steps",
)
_FLOAT_FIELDS = frozenset({"noise_multiplier", "sample_rate", "delta"})
_RESTORE_HINT = (
    "Restore the ledger from its backup; `fedvault client budget --verify` lists what is wrong. "
    "Never delete or edit a privacy ledger: its history is the privacy the site's data has spent."
)


class LedgerHead(NamedTuple):
    """How many entries a ledger holds and the chain hash after the last one."""

    count: int  # type: ignore[assignment]  # shadows tuple.count, as the API names it
    hash: str


def canonical_json(fields: dict[str, Any]) -> str:
    """One spelling of an entry's fields: sorted keys, no spaces, floats as ``repr``."""
    values = {
        name: repr(float(fields[name])) if name in _FLOAT_FIELDS else fields[name]
        for name in CHAINED_FIELDS
    }
    return json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_hash(prev_hash: str, fields: dict[str, Any]) -> str:
    """``sha256(prev_hash || canonical JSON of the entry's fields)``, hex."""
    return hashlib.sha256((prev_hash + canonical_json(fields)).encode()).hexdigest()


def declarations_hash(rows: Iterable[tuple[int, str, str, int]]) -> str:
    """A digest of dataset declarations ``(seq, dataset, declared_at, new)``, in seq order."""
    digest = hashlib.sha256(b"fedvault-declarations-v1\n")
    for seq, dataset, declared_at, new in rows:
        digest.update(f"{seq}\t{dataset}\t{declared_at}\t{new}\n".encode())
    return digest.hexdigest()


def anchor_path(ledger_path: Path) -> Path:
    """Where a ledger's anchor lives: ``<ledger path>.anchor``."""
    return ledger_path.with_name(ledger_path.name + ".anchor")


@dataclass(frozen=True, kw_only=True)
class Anchor:
    """What a ledger held after its last committed append, kept outside the SQLite file.

    A ledger must always contain its anchor: at least ``count`` entries whose chain hash after
    entry ``count`` is ``hash``, and at least ``datasets`` dataset declarations.
    """

    count: int
    hash: str
    datasets: int
    datasets_hash: str
    policy: dict[str, Any] | None
    updated_at: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "count": self.count,
                "hash": self.hash,
                "datasets": self.datasets,
                "datasets_hash": self.datasets_hash,
                "policy": self.policy,
                "updated_at": self.updated_at,
            },
            indent=2,
            sort_keys=True,
        )


def read_anchor(ledger_path: Path) -> Anchor | None:
    """The ledger's anchor, or None when it has none; an unreadable anchor is a LedgerError."""
    path = anchor_path(ledger_path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise LedgerError(
            f"the ledger anchor {path} is unreadable: {err}", hint=_RESTORE_HINT
        ) from err
    try:
        count, head, datasets = raw["count"], raw["hash"], raw.get("datasets", 0)
        if not (
            isinstance(count, int)
            and count >= 0
            and isinstance(datasets, int)
            and datasets >= 0
            and isinstance(head, str)
            and len(head) == 64
        ):
            raise ValueError("count, hash or datasets out of range")
        policy = raw.get("policy")
        return Anchor(
            count=count,
            hash=head,
            datasets=datasets,
            datasets_hash=str(raw.get("datasets_hash", "")),
            policy=dict(policy) if isinstance(policy, dict) else None,
            updated_at=str(raw.get("updated_at", "")),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise LedgerError(
            f"the ledger anchor {path} is not a fedvault anchor: {err}", hint=_RESTORE_HINT
        ) from err


def write_anchor(ledger_path: Path, anchor: Anchor) -> None:
    """Replace the anchor atomically (temporary file, fsync, rename, fsync of the folder); 0600."""
    path = anchor_path(ledger_path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, anchor.to_json().encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def restore_hint() -> str:
    """The hint every 'this ledger forgot' error carries."""
    return _RESTORE_HINT
