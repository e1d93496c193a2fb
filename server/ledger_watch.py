"""The coordinator's memory of each site's ledger head, across rounds and runs.

Every train reply of a DP round carries the site's ledger status (common/site_privacy.py
``LedgerStatus``): its entry count, the hash its chain ends in, the chain's hash at the count
the coordinator saw last, and how many datasets it declared. The coordinator keeps the last
status per (authenticated) site in a JSON file of its own and flags a site whose ledger went
backwards (fewer entries than before), rewrote its history (the entry the coordinator saw
last no longer hashes to what it saw), or declared a new dataset. It cannot see a site's
entries, and a site operator who keeps a doctored copy can still lie about their own data:
what this guarantees is that a ledger never forgets *silently*.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_HEX64 = frozenset("0123456789abcdef")


@dataclass
class SeenLedger:
    """The last ledger status the coordinator accepted from one site."""

    count: int
    head: str
    datasets: int
    run_id: str
    round: int
    at: str
    alerts: list[str] = field(default_factory=list)


def _is_hash(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX64


class LedgerWatch:
    """Each site's last ledger status, kept in ``path`` (None: this run only, in memory)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.sites: dict[str, SeenLedger] = {}
        if path is not None and path.is_file():
            raw = json.loads(path.read_text(encoding="utf-8"))
            for site, entry in dict(raw.get("sites", {})).items():
                self.sites[str(site)] = SeenLedger(**entry)

    def seen_count(self, site: str) -> int:
        """The ledger length the coordinator saw last from ``site`` (0: never)."""
        seen = self.sites.get(site)
        return seen.count if seen is not None else 0

    def observe(
        self, site: str, status: Mapping[str, Any], *, run_id: str, server_round: int
    ) -> str | None:
        """Record a train reply's ledger status; the alert text when it forgot or rewrote."""
        count, head = status.get("count"), status.get("head")
        at_seen, datasets = status.get("hash-at-seen"), status.get("datasets", 0)
        if (
            isinstance(count, bool)
            or not isinstance(count, int)
            or count < 0
            or not _is_hash(head)
            or not isinstance(datasets, int)
        ):
            return self._alert(site, "its train reply carried no valid ledger status")
        prev = self.sites.get(site)
        alert = None
        if prev is not None:
            where = f"run {prev.run_id} round {prev.round}"
            if count < prev.count:
                alert = (
                    f"its privacy ledger went backwards: {count} entries now, {prev.count} "
                    f"seen at {where}"
                )
            elif at_seen != prev.head:
                alert = (
                    f"its privacy ledger rewrote its history: entry {prev.count} no longer "
                    f"has the hash seen at {where}"
                )
            elif datasets > prev.datasets:
                alert = (
                    f"it declared a new dataset since {where}: that data's privacy budget "
                    "starts from zero"
                )
        alerts = [*(prev.alerts if prev else []), *([alert] if alert else [])]
        self.sites[site] = SeenLedger(
            count=count,
            head=str(head),
            datasets=datasets,
            run_id=run_id,
            round=server_round,
            at=datetime.now(UTC).isoformat(timespec="seconds"),
            alerts=alerts,
        )
        if alert:
            logger.warning("site %s: %s", site, alert)
        self.save()
        return alert

    def _alert(self, site: str, text: str) -> str:
        logger.warning("site %s: %s", site, text)
        return text

    def save(self) -> None:
        """Write the record atomically (a crash leaves the old or the new file, never half)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"sites": {site: asdict(seen) for site, seen in sorted(self.sites.items())}}
        fd, tmp = tempfile.mkstemp(prefix=".site-ledgers-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(payload, handle, indent=2)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
