"""Tests for common/ledger.py: a site's durable, never-decreasing, write-ahead privacy ledger.

Epsilons are checked against compute_epsilon and against Opacus' PRVAccountant stepped one
DP-SGD step at a time; atomicity and durability against real processes (spawned, killed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import signal
import sqlite3
import stat
import tempfile
import warnings
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant

from fedvault.common.errors import ConfigError, LedgerError, PrivacyBudgetExceeded, SiteRefusal
from fedvault.common.fingerprint import dataset_fingerprint, short_fingerprint
from fedvault.common.ledger import (
    GENESIS,
    SCHEMA_VERSION,
    LedgerEntry,
    LedgerHead,
    LedgerPolicy,
    PrivacyLedger,
    anchor_path,
)
from fedvault.common.privacy import PrivacyEvent, compute_epsilon

pytestmark = pytest.mark.unit

DELTA = 1e-5
#: Hypothesis with rdp (~0.1 s an epsilon): few fixed examples keep the file fast.
FAST = settings(max_examples=8, deadline=None, derandomize=True, database=None)
SPAWN = multiprocessing.get_context("spawn")


def table(seed: int = 0, rows: int = 30) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, 4)).astype(np.float32), rng.integers(0, 3, rows)


DS_A = dataset_fingerprint(*table(0))
DS_B = dataset_fingerprint(*table(1))


def entry(
    *,
    dataset: str = DS_A,
    run_id: str = "run-1",
    round: int = 1,
    sigma: float = 1.0,
    q: float = 0.1,
    steps: int = 10,
    delta: float = DELTA,
    accountant: str = "prv",
) -> LedgerEntry:
    return LedgerEntry(dataset, run_id, round, sigma, q, steps, delta, accountant)


def prv_reference(triples: Sequence[tuple[float, float, int]], delta: float = DELTA) -> float:
    """Opacus' PRV accountant, driven the way a training loop drives it: one step at a time."""
    accountant = PRVAccountant()
    for sigma, q, steps in triples:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- entries --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dataset": "site-a"}, "dataset must be a fingerprint 'sha256:<64 hex>', got 'site-a'"),
        ({"run_id": ""}, "run_id must be a non-empty string"),
        ({"round": -1}, "round must be an integer >= 0, got -1"),
        ({"noise_multiplier": 0.0}, "noise_multiplier must be > 0, got 0.0"),
        ({"sample_rate": 0.0}, r"sample_rate must be in \(0, 1\], got 0.0"),
        ({"sample_rate": 1.5}, r"sample_rate must be in \(0, 1\], got 1.5"),
        ({"steps": -1}, "steps must be an integer >= 0, got -1"),
        ({"delta": 1.0}, r"delta must be in \(0, 1\), got 1.0"),
        ({"accountant": "gdp"}, "unknown accountant 'gdp'; choose one of: prv, rdp"),
        ({"recorded_at": "2025-01-01T10:00:00"}, "recorded_at must be a UTC ISO time"),
        ({"recorded_at": "2025-01-01T10:00:00+02:00"}, "recorded_at must be a UTC ISO time"),
    ],
)
def test_an_entry_out_of_range_is_a_config_error(changes: dict[str, Any], message: str) -> None:
    fields = {
        "dataset": DS_A,
        "run_id": "run-1",
        "round": 1,
        "noise_multiplier": 1.0,
        "sample_rate": 0.1,
        "steps": 10,
        "delta": DELTA,
        "accountant": "prv",
        "recorded_at": "2025-01-01T10:00:00+00:00",
    }

    with pytest.raises(ConfigError, match=message):
        LedgerEntry(**{**fields, **changes})


def test_entry_times_are_stored_in_one_utc_spelling() -> None:
    zulu = LedgerEntry(DS_A, "r", 1, 1.0, 0.1, 1, DELTA, "prv", "2025-01-01T10:00:00Z")

    assert zulu.recorded_at == "2025-01-01T10:00:00.000000+00:00"
    assert entry().recorded_at.endswith("+00:00")


# --- storage --------------------------------------------------------------------------------


def test_entries_round_trip_and_persist_across_reopening(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    recorded = [
        entry(round=1),
        entry(dataset=DS_B, round=1, sigma=2.0),
        entry(round=2, q=0.05, steps=7),
    ]

    with PrivacyLedger(path) as ledger:
        for e in recorded:
            ledger.record(e)
    with PrivacyLedger(path) as reopened:
        assert reopened.entries() == recorded
        assert reopened.entries(DS_A) == [recorded[0], recorded[2]]
        assert reopened.history(DS_A) == [PrivacyEvent(1.0, 0.1, 10), PrivacyEvent(1.0, 0.05, 7)]
        assert reopened.datasets() == [DS_A, DS_B]
        assert reopened.history(dataset_fingerprint(*table(9))) == []


def test_ledger_folder_is_0700_and_its_files_0600(tmp_path: Path) -> None:
    path = tmp_path / "site" / "privacy" / "ledger.sqlite"
    old_umask = os.umask(0o022)
    try:
        with PrivacyLedger(path) as ledger:
            ledger.record(entry())
            modes = {f.name: mode(f) for f in path.parent.iterdir()}  # -wal, -shm while open
    finally:
        os.umask(old_umask)

    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700 and mode(path.parent.parent) == 0o700
    assert modes.keys() >= {"ledger.sqlite", "ledger.sqlite-wal"}
    assert set(modes.values()) == {0o600}


def test_the_history_is_append_only_even_from_raw_sql(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with PrivacyLedger(path) as ledger:
        ledger.record(entry())
    raw = sqlite3.connect(path)

    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        raw.execute("DELETE FROM entries")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        raw.execute("UPDATE entries SET steps = 0")
    raw.close()
    with PrivacyLedger(path) as ledger:
        assert len(ledger.entries()) == 1
        assert ledger.history(DS_A) == [PrivacyEvent(1.0, 0.1, 10)]


def test_a_ledger_file_others_can_write_opens_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    PrivacyLedger(path).close()
    path.chmod(0o666)

    with pytest.warns(UserWarning, match="writable by other users \\(mode 666\\)"):
        PrivacyLedger(path).close()


@pytest.mark.parametrize(
    "content", [b"this is a CSV file, not a ledger\n" * 10, bytes(range(256)) * 8]
)
def test_a_file_that_is_not_a_ledger_is_a_clear_ledger_error(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(content)

    with pytest.raises(LedgerError, match=f"ledger file {path} is not a fedvault ledger") as err:
        PrivacyLedger(path)
    assert path.read_bytes() == content  # left as it was
    assert err.value.path == path and err.value.exit_code == 9


def test_a_ledger_that_cannot_be_created_is_a_ledger_error_not_a_config_error(
    tmp_path: Path,
) -> None:
    in_the_way = tmp_path / "state"
    in_the_way.write_text("a file where the ledger's folder should be")

    with pytest.raises(LedgerError, match="cannot create the ledger") as err:
        PrivacyLedger(in_the_way / "ledger.sqlite")

    assert not isinstance(err.value, ConfigError)
    assert err.value.path == in_the_way / "ledger.sqlite"


def test_another_applications_database_or_a_newer_schema_is_refused(tmp_path: Path) -> None:
    other, newer = tmp_path / "other.sqlite", tmp_path / "newer.sqlite"
    with sqlite3.connect(other) as raw:
        raw.execute("CREATE TABLE entries (x)")
    PrivacyLedger(newer).close()
    with sqlite3.connect(newer) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")

    with pytest.raises(
        LedgerError, match="is not a fedvault ledger: it holds another application's data"
    ):
        PrivacyLedger(other)
    with pytest.raises(LedgerError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        PrivacyLedger(newer)


# --- spent epsilon --------------------------------------------------------------------------


def test_spent_composes_every_run_and_equals_opacus_prv_stepped_per_step(tmp_path: Path) -> None:
    run_1 = [(1.1, 0.08, 20)] * 3  # three rounds of one plan
    run_2 = [(0.9, 0.04, 30)] * 2  # a later run with another sigma and q
    with PrivacyLedger(tmp_path / "ledger.sqlite") as ledger:
        for run_id, rounds in (("run-1", run_1), ("run-2", run_2)):
            for i, (sigma, q, steps) in enumerate(rounds, start=1):
                ledger.record(entry(run_id=run_id, round=i, sigma=sigma, q=q, steps=steps))
        ledger.record(entry(dataset=DS_B, sigma=0.7, q=0.3, steps=50))  # another dataset

        spent = ledger.spent(DS_A, delta=DELTA)
        history = ledger.history(DS_A)

    assert len(history) == 5
    assert spent == pytest.approx(compute_epsilon(history, delta=DELTA), rel=1e-6)
    assert spent == pytest.approx(prv_reference(run_1 + run_2), rel=0.02)
    only_run_1 = prv_reference(run_1)
    assert spent > 1.1 * only_run_1  # the second run did not reset the count


def test_spent_is_composed_at_the_delta_asked_for(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "ledger.sqlite") as ledger:
        ledger.record(entry(delta=1e-5, accountant="rdp"))
        ledger.record(entry(delta=1e-3, accountant="rdp", round=2))
        strict = ledger.spent(DS_A, delta=1e-6, accountant="rdp")
        loose = ledger.spent(DS_A, delta=1e-3, accountant="rdp")

    both = [PrivacyEvent(1.0, 0.1, 10)] * 2
    assert strict == pytest.approx(compute_epsilon(both, delta=1e-6, accountant="rdp"))
    assert loose == pytest.approx(compute_epsilon(both, delta=1e-3, accountant="rdp"))
    assert strict > loose


EVENTS = st.tuples(
    st.one_of(st.floats(0.7, 3.0), st.floats(10.0, 40.0)),
    st.sampled_from([1e-4, 0.01, 0.05, 0.2]),
    st.integers(0, 15),
)


@FAST
@given(events=st.lists(EVENTS, min_size=1, max_size=5))
def test_spent_never_decreases_as_entries_are_recorded(
    events: list[tuple[float, float, int]],
) -> None:
    with tempfile.TemporaryDirectory() as folder, PrivacyLedger(Path(folder) / "l") as ledger:
        spent = [0.0]
        for i, (sigma, q, steps) in enumerate(events):
            ledger.record(entry(round=i, sigma=sigma, q=q, steps=steps, accountant="rdp"))
            spent.append(ledger.spent(DS_A, delta=DELTA, accountant="rdp"))

        history = ledger.history(DS_A)

    assert spent == sorted(spent)
    assert spent[-1] == pytest.approx(compute_epsilon(history, delta=DELTA, accountant="rdp"))


def test_spent_never_decreases_even_where_the_prv_estimate_dips(tmp_path: Path) -> None:
    before, almost_free = PrivacyEvent(1.0, 0.1, 20), PrivacyEvent(30.0, 1e-4, 2)
    raw_before = compute_epsilon([before], delta=DELTA)
    raw_after = compute_epsilon([before, almost_free], delta=DELTA)  # PRV: ~1e-8 lower
    with PrivacyLedger(tmp_path / "ledger.sqlite") as ledger:
        ledger.record(entry(sigma=1.0, q=0.1, steps=20))
        spent_before = ledger.spent(DS_A, delta=DELTA)
        ledger.record(entry(round=2, sigma=30.0, q=1e-4, steps=2))
        spent_after = ledger.spent(DS_A, delta=DELTA)
    with PrivacyLedger(tmp_path / "ledger.sqlite") as reopened:
        spent_reopened = reopened.spent(DS_A, delta=DELTA)

    assert spent_before == pytest.approx(raw_before, rel=1e-9)
    assert spent_after >= max(spent_before, raw_after)
    assert spent_reopened >= spent_after


# --- reserve: the write-ahead gate ------------------------------------------------------------


@FAST
@given(
    history=st.lists(
        st.tuples(st.floats(0.8, 3.0), st.floats(0.01, 0.3), st.integers(1, 30)), max_size=2
    ),
    event=st.tuples(st.floats(0.8, 3.0), st.floats(0.01, 0.3), st.integers(1, 30)),
    factor=st.sampled_from([0.5, 0.99, 1.0, 1.01, 2.0]),
)
@example(history=[(1.0, 0.1, 10)], event=(1.2, 0.05, 20), factor=0.99)  # just refused
@example(history=[(1.0, 0.1, 10)], event=(1.2, 0.05, 20), factor=1.0)  # exactly at the max
def test_reserve_refuses_exactly_when_the_projection_exceeds_the_maximum(
    history: list[tuple[float, float, int]], event: tuple[float, float, int], factor: float
) -> None:
    events = [PrivacyEvent(*t) for t in history]
    new = PrivacyEvent(*event)
    independent = compute_epsilon([*events, new], delta=DELTA, accountant="rdp")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ledger.sqlite"
        with PrivacyLedger(path) as ledger:
            for i, (sigma, q, steps) in enumerate(history):
                ledger.record(entry(round=i, sigma=sigma, q=q, steps=steps, accountant="rdp"))
            projected = ledger.projected(DS_A, new, delta=DELTA, accountant="rdp")
            max_epsilon = projected if factor == 1.0 else factor * independent
            candidate = entry(round=99, sigma=event[0], q=event[1], steps=event[2])

            try:
                returned: float | None = ledger.reserve(
                    candidate, max_epsilon=max_epsilon, delta=DELTA, accountant="rdp"
                )
            except PrivacyBudgetExceeded:
                returned = None

            with PrivacyLedger(path) as other:  # a second process's view of the file
                seen = other.entries(DS_A)

    assert projected == pytest.approx(independent, rel=1e-9)
    if factor >= 1.0:
        assert returned == projected
        assert seen[-1] == candidate and len(seen) == len(history) + 1
    else:
        assert returned is None
        assert len(seen) == len(history) and candidate not in seen


def test_a_refused_reserve_names_dataset_spent_projected_and_maximum(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with PrivacyLedger(path) as ledger:
        first = ledger.reserve(entry(round=1), max_epsilon=4.0, delta=DELTA)
        projected = ledger.projected(DS_A, PrivacyEvent(1.0, 0.1, 10), delta=DELTA)

        with pytest.raises(PrivacyBudgetExceeded) as refused:
            ledger.reserve(entry(round=2), max_epsilon=first + 0.1, delta=DELTA)
        unlimited = ledger.reserve(entry(round=2), max_epsilon=None, delta=DELTA)

        entries = ledger.entries()

    assert first == pytest.approx(prv_reference([(1.0, 0.1, 10)]), rel=0.02)
    assert str(refused.value) == (
        f"dataset {short_fingerprint(DS_A)} refuses round 2 of run run-1: its epsilon would go "
        f"from {first:.4g} to {projected:.4g}, above the site's max_epsilon {first + 0.1:g} "
        f"(delta=1e-05, prv)"
    )
    assert unlimited == pytest.approx(projected, rel=1e-9) and unlimited > first
    assert [e.round for e in entries] == [1, 2]


@pytest.mark.parametrize("max_epsilon", [0.0, -1.0, float("nan"), float("inf")])
def test_reserve_rejects_a_maximum_that_is_not_a_positive_number(
    tmp_path: Path, max_epsilon: float
) -> None:
    with (
        PrivacyLedger(tmp_path / "ledger.sqlite") as ledger,
        pytest.raises(ConfigError, match="max_epsilon must be > 0"),
    ):
        ledger.reserve(entry(), max_epsilon=max_epsilon, delta=DELTA)


def _reserve_rounds(
    path: Path, worker: int, rounds: int, max_epsilon: float, start: Any, results: Any
) -> None:
    """Child process: reserve ``rounds`` rounds as fast as it can once both workers are ready."""
    with PrivacyLedger(path) as ledger:
        start.wait()
        accepted = 0
        for i in range(rounds):
            try:
                ledger.reserve(
                    entry(run_id=f"worker-{worker}", round=i, accountant="rdp"),
                    max_epsilon=max_epsilon,
                    delta=DELTA,
                    accountant="rdp",
                )
                accepted += 1
            except PrivacyBudgetExceeded:
                pass
    results.put(accepted)


@pytest.mark.timeout(120)
def test_concurrent_reserves_admit_exactly_what_the_maximum_allows(tmp_path: Path) -> None:
    path, allowed, per_worker = tmp_path / "ledger.sqlite", 5, 4
    one = PrivacyEvent(1.0, 0.1, 10)
    at = [compute_epsilon([one] * n, delta=DELTA, accountant="rdp") for n in (5, 6)]
    max_epsilon = (at[0] + at[1]) / 2  # 5 rounds fit, the 6th does not
    PrivacyLedger(path).close()
    start, results = SPAWN.Barrier(2), SPAWN.Queue()
    workers = [
        SPAWN.Process(
            target=_reserve_rounds, args=(path, w, per_worker, max_epsilon, start, results)
        )
        for w in (1, 2)
    ]

    for w in workers:
        w.start()
    accepted = [results.get(timeout=100) for _ in workers]
    for w in workers:
        w.join(timeout=30)

    with PrivacyLedger(path) as ledger:
        recorded = ledger.entries(DS_A)
        spent = ledger.spent(DS_A, delta=DELTA, accountant="rdp")
    assert [w.exitcode for w in workers] == [0, 0]
    assert sum(accepted) == allowed == len(recorded)
    assert spent == pytest.approx(at[0]) and spent <= max_epsilon


# --- crash safety ---------------------------------------------------------------------------


def _record_then_die(path: Path, recorded: LedgerEntry) -> None:
    ledger = PrivacyLedger(path)
    ledger.record(recorded)
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no atexit, no flush


def _record_until_killed(path: Path, acks: Connection) -> None:
    ledger = PrivacyLedger(path)
    for i in range(100_000):
        ledger.record(entry(run_id="crashing", round=i, accountant="rdp"))
        acks.send(i)  # only after record() returned: the site would now send its update


@pytest.mark.timeout(120)
def test_an_entry_recorded_just_before_a_sigkill_is_in_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    recorded = entry(run_id="killed")
    child = SPAWN.Process(target=_record_then_die, args=(path, recorded))

    child.start()
    child.join(timeout=60)

    assert child.exitcode == -signal.SIGKILL
    with PrivacyLedger(path) as ledger:
        assert ledger.entries() == [recorded]


@pytest.mark.timeout(120)
def test_a_sigkill_mid_write_never_loses_an_acknowledged_entry(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    receive, send = SPAWN.Pipe(duplex=False)
    child = SPAWN.Process(target=_record_until_killed, args=(path, send))
    child.start()
    send.close()
    acknowledged = -1

    while acknowledged < 20 and receive.poll(60):
        acknowledged = receive.recv()
    os.kill(child.pid or 0, signal.SIGKILL)  # the child is writing its next entry
    child.join(timeout=30)
    with contextlib.suppress(EOFError):  # acks sent before the kill, then the closed pipe
        while receive.poll(0):
            acknowledged = receive.recv()

    with PrivacyLedger(path) as ledger:
        rounds = [e.round for e in ledger.entries()]
    assert acknowledged >= 20
    assert rounds == list(range(len(rounds)))  # whole entries, in order, none torn
    assert len(rounds) >= acknowledged + 1  # over-count allowed, under-count never


# --- summary --------------------------------------------------------------------------------


def test_summary_gives_each_runs_epsilon_and_the_cumulative_epsilon(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "ledger.sqlite") as ledger:
        for i in (1, 2):
            ledger.record(entry(run_id="run-1", round=i, sigma=1.2, q=0.05, steps=20))
        for i in (1, 2, 3):
            ledger.record(entry(run_id="run-2", round=i, sigma=0.9, q=0.1, steps=10))
        ledger.record(entry(dataset=DS_B, run_id="run-2", round=1))

        (a, b) = ledger.summary(delta=DELTA)
        spent = ledger.spent(DS_A, delta=DELTA)

    run_1, run_2 = a["per_run"]
    assert (a["dataset"], a["short"], b["dataset"]) == (DS_A, short_fingerprint(DS_A), DS_B)
    assert (a["runs"], a["rounds"], a["entries"], a["steps"]) == (2, 5, 5, 70)
    assert (run_1["run_id"], run_1["rounds"], run_1["steps"]) == ("run-1", 2, 40)
    assert run_1["epsilon"] == pytest.approx(prv_reference([(1.2, 0.05, 40)]), rel=0.02)
    assert run_2["epsilon"] == pytest.approx(prv_reference([(0.9, 0.1, 30)]), rel=0.02)
    assert run_1["cumulative_epsilon"] == run_1["epsilon"]
    assert run_2["cumulative_epsilon"] > run_1["cumulative_epsilon"]
    assert run_2["cumulative_epsilon"] > run_2["epsilon"]
    assert run_2["cumulative_epsilon"] == a["epsilon"] == spent
    assert a["first_recorded_at"] == run_1["first_recorded_at"] <= run_2["last_recorded_at"]
    assert b["epsilon"] < a["epsilon"] and b["per_run"][0]["run_id"] == "run-2"


# --- tamper evidence: the hash chain and the anchor -----------------------------------------

#: The version-1 schema exactly as fedvault 0.x created it (frozen here: migration input).
V1_SCHEMA = (
    """CREATE TABLE entries (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        dataset TEXT NOT NULL CHECK (dataset LIKE 'sha256:%'),
        run_id TEXT NOT NULL CHECK (length(run_id) > 0),
        round INTEGER NOT NULL CHECK (round >= 0),
        noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
        sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
        steps INTEGER NOT NULL CHECK (steps >= 0),
        delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
        accountant TEXT NOT NULL,
        recorded_at TEXT NOT NULL
    ) STRICT""",
    "CREATE INDEX entries_by_dataset ON entries (dataset, seq)",
    """CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries
        BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END""",
    """CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries
        BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END""",
    """CREATE TABLE marks (
        dataset TEXT NOT NULL,
        delta REAL NOT NULL,
        accountant TEXT NOT NULL,
        epsilon REAL NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (dataset, delta, accountant)
    ) STRICT""",
)


def expected_chain(entries: Sequence[LedgerEntry]) -> list[str]:
    """The chain computed independently of the ledger: sha256(prev || canonical JSON)."""
    hashes, prev = [], "0" * 64
    for e in entries:
        fields = {
            "dataset": e.dataset,
            "run_id": e.run_id,
            "round": e.round,
            "noise_multiplier": repr(e.noise_multiplier),
            "sample_rate": repr(e.sample_rate),
            "steps": e.steps,
            "delta": repr(e.delta),
            "accountant": e.accountant,
            "recorded_at": e.recorded_at,
        }
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        prev = hashlib.sha256((prev + text).encode()).hexdigest()
        hashes.append(prev)
    return hashes


def recorded(path: Path, entries: Sequence[LedgerEntry]) -> Path:
    with PrivacyLedger(path) as ledger:
        for e in entries:
            ledger.record(e)
    return path


def three(path: Path) -> list[LedgerEntry]:
    entries = [entry(round=r, sigma=1.0 + r / 10) for r in (1, 2, 3)]
    recorded(path, entries)
    return entries


def raw_sql(path: Path, *statements: str) -> None:
    """What an operator with a shell could do: the sqlite3 module, no fedvault."""
    raw = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in statements:
            raw.execute(statement)
    finally:
        raw.close()


def test_entries_are_hash_chained_from_genesis(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    entries = three(path)
    chain = expected_chain(entries)

    with PrivacyLedger(path) as ledger:
        assert ledger.head() == LedgerHead(3, chain[-1])
        assert [ledger.hash_at(n) for n in range(5)] == [GENESIS, *chain, None]
        assert ledger.verify() == []
    with PrivacyLedger(tmp_path / "empty.sqlite") as empty:
        assert empty.head() == LedgerHead(0, GENESIS) and empty.verify() == []


def test_every_append_rewrites_the_anchor_0600(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with PrivacyLedger(path) as ledger:
        assert not anchor_path(path).exists()  # opening alone writes nothing
        ledger.declare_dataset(DS_A, new=False)
        ledger.record(entry())
        first = json.loads(anchor_path(path).read_text())
        ledger.reserve(entry(round=2), max_epsilon=None, delta=DELTA)
        second = json.loads(anchor_path(path).read_text())
        head = ledger.head()

    assert (first["count"], first["datasets"]) == (1, 1)
    assert (second["count"], second["hash"], second["datasets"]) == (2, head.hash, 1)
    assert second["updated_at"] >= first["updated_at"]
    assert mode(anchor_path(path)) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_deleted_ledger_with_its_anchor_is_never_recreated_empty(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    three(path)
    for name in ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm"):
        (tmp_path / name).unlink(missing_ok=True)

    with pytest.raises(LedgerError, match="is missing, but its anchor"):
        PrivacyLedger(path)
    assert not path.exists()
    path.touch()  # an empty file in its place is refused too, and left empty
    with pytest.raises(LedgerError, match="is empty, but its anchor"):
        PrivacyLedger(path)
    assert path.stat().st_size == 0


def test_an_empty_ledger_swapped_in_refuses_every_append(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    three(path)
    for name in ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    PrivacyLedger(tmp_path / "fresh.sqlite").close()
    (tmp_path / "fresh.sqlite").rename(path)

    with PrivacyLedger(path) as ledger:
        problems = ledger.verify()
        for append in (
            lambda: ledger.reserve(entry(), max_epsilon=None, delta=DELTA),
            lambda: ledger.record(entry()),
            lambda: ledger.declare_dataset(DS_A, new=False),
            lambda: ledger.record_evaluation("run-1", 1, max_per_run=5),
        ):
            with pytest.raises(LedgerError, match="refuses to be used: the ledger holds 0 entries"):
                append()
        assert ledger.head().count == 0

    assert any("holds 0 entries but its anchor" in p and "recorded 3" in p for p in problems)
    assert json.loads(anchor_path(path).read_text())["count"] == 3  # the evidence is kept


def test_a_deleted_last_entry_is_found_and_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    three(path)
    raw_sql(
        path,
        "DROP TRIGGER entries_no_delete",
        "DELETE FROM entries WHERE seq = (SELECT max(seq) FROM entries)",
    )

    with PrivacyLedger(path) as ledger:
        problems = ledger.verify()
        with pytest.raises(LedgerError, match="refuses to be used"):
            ledger.reserve(entry(round=9), max_epsilon=None, delta=DELTA)
        assert ledger.head().count == 2

    text = "\n".join(problems)
    assert "trigger entries_no_delete is missing" in text
    assert "holds 2 entries but its anchor" in text
    assert "entry 3..3 missing after the last one" in text


def test_a_deleted_middle_entry_breaks_the_chain_at_the_next_seq(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    three(path)
    raw_sql(path, "DROP TRIGGER entries_no_delete", "DELETE FROM entries WHERE seq = 2")
    # ... and the trigger put back, as if nothing happened
    raw_sql(
        path,
        """CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries
        BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END""",
    )

    with PrivacyLedger(path) as ledger:
        problems = ledger.verify()

    assert any(p.startswith("entry 3: its prev_hash does not link to entry 1") for p in problems)
    assert any("entry 2..2 missing (seq jumps from 1 to 3)" in p for p in problems)
    assert any("holds 2 entries but its anchor" in p for p in problems)
    assert not any("trigger" in p for p in problems)


def test_a_rewritten_entry_is_named_by_its_seq(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    three(path)
    raw_sql(path, "DROP TRIGGER entries_no_update", "UPDATE entries SET steps = 1 WHERE seq = 2")

    with PrivacyLedger(path) as ledger:
        problems = ledger.verify()

    assert "entry 2: its hash does not match its contents: rewritten" in problems
    assert any("trigger entries_no_update is missing" in p for p in problems)


def test_an_altered_policy_table_or_trigger_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with PrivacyLedger(path) as ledger:
        ledger.fix_policy(delta=DELTA, accountant="prv")
    raw_sql(
        path,
        "DROP TRIGGER settings_no_update",
        "UPDATE settings SET value = '0.5' WHERE name = 'delta'",
        "CREATE TRIGGER settings_no_update BEFORE UPDATE ON settings BEGIN SELECT 1; END",
    )

    with PrivacyLedger(path) as ledger:
        problems = ledger.verify()
        assert ledger.policy() == LedgerPolicy(delta=0.5, accountant="prv")

    assert "trigger settings_no_update was altered: it is not the schema's" in problems
    assert any("site policy stored in the ledger" in p and "changed" in p for p in problems)


def test_a_version_1_ledger_is_migrated_in_place_with_its_chain(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite"
    entries = [entry(round=1), entry(dataset=DS_B, round=1, sigma=2.0), entry(round=2)]
    raw = sqlite3.connect(path, isolation_level=None)
    for statement in V1_SCHEMA:
        raw.execute(statement)
    raw.execute("PRAGMA application_id = 1719037031")
    raw.execute("PRAGMA user_version = 1")
    for e in entries:
        raw.execute(
            "INSERT INTO entries (dataset, run_id, round, noise_multiplier, sample_rate, steps, "
            "delta, accountant, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (e.dataset, e.run_id, e.round, e.noise_multiplier, e.sample_rate, e.steps,
             e.delta, e.accountant, e.recorded_at),
        )  # fmt: skip
    raw.close()

    with PrivacyLedger(path) as ledger:
        assert ledger.entries() == entries
        assert ledger.head() == LedgerHead(3, expected_chain(entries)[-1])
        assert ledger.verify() == []
        assert ledger.current_dataset() == DS_A  # trained last: counts as declared
        assert ledger.declared_datasets() == [DS_A, DS_B]
        assert ledger.declare_dataset(DS_A, new=False) is True  # made explicit, no switch
        with pytest.raises(LedgerError, match="the site's data changed"):
            ledger.declare_dataset(dataset_fingerprint(*table(5)), new=False)
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            raw.execute("DELETE FROM entries")


def test_the_site_policy_is_written_once(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.policy() is None
        fixed = ledger.fix_policy(delta=DELTA, accountant="rdp")
        again = ledger.fix_policy(delta=DELTA, accountant="rdp")
        with pytest.raises(LedgerError, match="composes at δ=1e-05, accountant rdp;"):
            ledger.fix_policy(delta=0.99, accountant="rdp")
        with pytest.raises(LedgerError, match="never change"):
            ledger.fix_policy(delta=DELTA, accountant="prv")
        with pytest.raises(LedgerError, match="composes at δ=1e-05"):
            ledger.reserve(entry(delta=0.99), max_epsilon=None, delta=0.99)
        with pytest.raises(ConfigError, match="delta must be in"):
            ledger.fix_policy(delta=1.5, accountant="rdp")
        assert ledger.entries() == []

    assert fixed == again == LedgerPolicy(delta=DELTA, accountant="rdp")


def test_a_dataset_switch_must_be_declared_new(tmp_path: Path) -> None:
    other = dataset_fingerprint(*table(0, rows=31))  # one row more
    with PrivacyLedger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.current_dataset() is None
        assert ledger.declare_dataset(DS_A, new=False) is True  # the first is free
        assert ledger.declare_dataset(DS_A, new=False) is False
        with pytest.raises(LedgerError, match="data changed since it last trained") as refused:
            ledger.declare_dataset(other, new=False)
        assert ledger.current_dataset() == DS_A
        assert ledger.declare_dataset(other, new=True) is True
        assert ledger.current_dataset() == other
        assert ledger.declared_datasets() == [DS_A, other]

    assert short_fingerprint(DS_A) in str(refused.value) and "--new-dataset" in refused.value.hint


def test_evaluation_replies_are_capped_per_run(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "ledger.sqlite") as ledger:
        counts = [ledger.record_evaluation("run-1", r, max_per_run=2) for r in (1, 2)]
        with pytest.raises(SiteRefusal, match="at most 2 evaluation replies per run"):
            ledger.record_evaluation("run-1", 3, max_per_run=2)
        other = ledger.record_evaluation("run-2", 1, max_per_run=2)
        with pytest.raises(SiteRefusal):
            ledger.record_evaluation("run-1", 4, max_per_run=2)

    assert counts == [1, 2] and other == 1


@pytest.mark.parametrize("bad", [-2.2, float("nan"), float("inf")])
def test_an_epsilon_that_is_not_one_is_never_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: float
) -> None:
    path = recorded(tmp_path / "ledger.sqlite", [entry()])
    monkeypatch.setattr("fedvault.common.ledger.compute_epsilon", lambda *a, **k: bad)

    with PrivacyLedger(path) as ledger:
        with pytest.raises(ConfigError, match="not an epsilon"):
            ledger.reserve(entry(round=2), max_epsilon=5.0, delta=DELTA)
        with pytest.raises(ConfigError, match="not an epsilon"):
            ledger.spent(DS_A, delta=DELTA)
        assert len(ledger.entries()) == 1
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT count(*) FROM marks").fetchone()[0] == 0
