"""Tests for server/ledger_watch.py: the coordinator's memory of each site's ledger head."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fedvault.server.ledger_watch import LedgerWatch

pytestmark = pytest.mark.unit


def chain(n: int) -> list[str]:
    """Hashes h0 (genesis) .. hn of a stand-in chain."""
    hashes = ["0" * 64]
    for i in range(n):
        hashes.append(hashlib.sha256(f"{hashes[-1]}{i}".encode()).hexdigest())
    return hashes


def status(hashes: list[str], count: int, seen: int, datasets: int = 1) -> dict[str, object]:
    return {
        "count": count,
        "head": hashes[count],
        "seen-count": seen,
        "hash-at-seen": hashes[seen],
        "datasets": datasets,
    }


def test_an_honest_ledger_that_grows_raises_no_alert_across_runs(tmp_path: Path) -> None:
    # Prepare
    record, hashes = tmp_path / "site-ledgers.json", chain(6)
    first = LedgerWatch(record)

    # Execute: two rounds in run 1, then a new coordinator process (run 2) reads the record
    alerts = [first.observe("a", status(hashes, 2, 0), run_id="r1", server_round=1)]
    alerts.append(first.observe("a", status(hashes, 4, 2), run_id="r1", server_round=2))
    second = LedgerWatch(record)
    seen = second.seen_count("a")
    alerts.append(second.observe("a", status(hashes, 6, seen), run_id="r2", server_round=1))

    # Assert
    assert alerts == [None, None, None]
    assert seen == 4
    assert LedgerWatch(record).seen_count("a") == 6


def test_a_ledger_that_went_backwards_is_flagged_and_remembered(tmp_path: Path) -> None:
    # Prepare: 4 entries seen; then the site's ledger was deleted and started again
    record, hashes, fresh = tmp_path / "site-ledgers.json", chain(4), chain(1)
    watch = LedgerWatch(record)
    watch.observe("a", status(hashes, 4, 0), run_id="r1", server_round=2)

    # Execute
    alert = LedgerWatch(record).observe("a", status(fresh, 1, 1), run_id="r2", server_round=1)

    # Assert
    assert alert is not None and "went backwards" in alert and "4 seen" in alert
    assert LedgerWatch(record).sites["a"].alerts == [alert]


def test_a_rewritten_history_is_flagged_even_when_the_ledger_grew() -> None:
    # Prepare: 3 entries seen; the site rewrote its history (other hashes) and added 2
    honest, rewritten = chain(3), [h[::-1] for h in chain(5)]
    watch = LedgerWatch()
    watch.observe("a", status(honest, 3, 0), run_id="r1", server_round=1)

    # Execute
    alert = watch.observe("a", status(rewritten, 5, 3), run_id="r1", server_round=2)

    # Assert
    assert alert is not None and "rewrote its history" in alert


def test_a_new_dataset_declaration_is_flagged() -> None:
    hashes = chain(3)
    watch = LedgerWatch()
    watch.observe("a", status(hashes, 2, 0, datasets=1), run_id="r1", server_round=1)

    alert = watch.observe("a", status(hashes, 3, 2, datasets=2), run_id="r1", server_round=2)

    assert alert is not None and "new dataset" in alert


@pytest.mark.parametrize(
    "bad",
    [{}, {"count": -1, "head": "0" * 64}, {"count": 1, "head": "xyz"}, {"count": True}],
)
def test_a_reply_without_a_valid_ledger_status_is_flagged(bad: dict[str, object]) -> None:
    assert LedgerWatch().observe("a", bad, run_id="r", server_round=1) is not None


def test_other_sites_are_kept_apart() -> None:
    hashes = chain(4)
    watch = LedgerWatch()
    watch.observe("a", status(hashes, 4, 0), run_id="r1", server_round=1)

    assert watch.observe("b", status(hashes, 1, 0), run_id="r1", server_round=1) is None
    assert watch.seen_count("b") == 1
    assert watch.seen_count("c") == 0
