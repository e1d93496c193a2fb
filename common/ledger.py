"""A site's persistent, write-ahead privacy ledger: every DP-SGD contribution its data made."""

from __future__ import annotations

import logging
import math
import os
import re
import sqlite3
import stat
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from numbers import Integral
from pathlib import Path
from types import TracebackType
from typing import TypedDict

from common.errors import ConfigError, PrivacyBudgetExceeded
from common.fingerprint import short_fingerprint
from common.privacy import PrivacyEvent, check_accountant, compute_epsilon

logger = logging.getLogger(__name__)

#: Schema of the ledger file (``PRAGMA user_version``); a newer file is refused, never rewritten.
SCHEMA_VERSION = 1
#: ``PRAGMA application_id`` of a fedvault ledger: "fvlg" in ASCII.
APPLICATION_ID = 0x66766C67
#: Seconds a ledger call waits for another process's transaction before giving up.
BUSY_TIMEOUT_S = 30.0
#: A deployed site's lifetime epsilon cap per dataset when it sets none (`--max-epsilon`).
#: Set by the site, never by the coordinator.
DEFAULT_MAX_EPSILON = 10.0
#: Where a site kit keeps its ledger, relative to the kit folder.
KIT_LEDGER = Path("state") / "privacy-ledger.sqlite"
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
_NOT_A_LEDGER_CODES = (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT)
_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)

_SCHEMA: tuple[str, ...] = (
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
    # The history is append-only: nothing, not even a stray SQL shell, rewrites the past.
    """CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries
        BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END""",
    """CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries
        BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END""",
    # High-water mark of every epsilon reported per (dataset, delta, accountant); see spent().
    """CREATE TABLE marks (
        dataset TEXT NOT NULL,
        delta REAL NOT NULL,
        accountant TEXT NOT NULL,
        epsilon REAL NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (dataset, delta, accountant)
    ) STRICT""",
)
_COLUMNS = (
    "dataset, run_id, round, noise_multiplier, sample_rate, steps, delta, accountant, recorded_at"
)


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class LedgerEntry:
    """One DP training contribution of a dataset: a round of a run, with its (sigma, q, steps)."""

    dataset: str
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    recorded_at: str = field(default_factory=_utc_now)

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not _FINGERPRINT.fullmatch(self.dataset):
            raise ConfigError(
                f"dataset must be a fingerprint 'sha256:<64 hex>', got {self.dataset!r}",
                hint="Use common.fingerprint.dataset_fingerprint(features, labels).",
            )
        if not isinstance(self.run_id, str) or not self.run_id.strip():
            raise ConfigError(f"run_id must be a non-empty string, got {self.run_id!r}")
        for name in ("round", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
            object.__setattr__(self, name, int(value))
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ConfigError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        _check_delta(self.delta)
        check_accountant(self.accountant)
        bad_time = ConfigError(f"recorded_at must be a UTC ISO time, got {self.recorded_at!r}")
        try:
            when = datetime.fromisoformat(self.recorded_at)
        except (TypeError, ValueError) as err:
            raise bad_time from err
        offset = when.utcoffset()
        if offset is None or offset.total_seconds() != 0:
            raise bad_time
        # One canonical spelling, so stored times sort chronologically as text.
        object.__setattr__(self, "recorded_at", when.isoformat(timespec="microseconds"))
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", float(self.sample_rate))
        object.__setattr__(self, "delta", float(self.delta))

    @property
    def event(self) -> PrivacyEvent:
        """The DP-SGD phase this entry accounts for."""
        return PrivacyEvent(self.noise_multiplier, self.sample_rate, self.steps)


class RunSummary(TypedDict):
    """One run's share of a dataset's history (``fedvault client budget``)."""

    run_id: str
    rounds: int
    steps: int
    first_recorded_at: str
    last_recorded_at: str
    epsilon: float  # that run's entries alone
    cumulative_epsilon: float  # the whole history up to that run's last entry


class DatasetSummary(TypedDict):
    """Everything the ledger knows about one dataset, at one delta and accountant."""

    dataset: str
    short: str
    epsilon: float
    delta: float
    accountant: str
    runs: int
    rounds: int
    entries: int
    steps: int
    first_recorded_at: str
    last_recorded_at: str
    per_run: list[RunSummary]


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")


def _merged(events: Sequence[PrivacyEvent]) -> list[PrivacyEvent]:
    """Events with equal (sigma, q) merged by summing steps; composition is commutative.

    Exact, and it keeps the accountant's cost at the number of distinct plans, not rounds
    (60 PRV rounds: ~40 s unmerged, ~1 s merged).
    """
    steps: dict[tuple[float, float], int] = {}
    for e in events:
        key = (e.noise_multiplier, e.sample_rate)
        steps[key] = steps.get(key, 0) + e.steps
    return [PrivacyEvent(sigma, q, n) for (sigma, q), n in steps.items()]


def _compose(events: Sequence[PrivacyEvent], delta: float, accountant: str) -> float:
    return compute_epsilon(_merged(events), delta=delta, accountant=accountant)


class PrivacyLedger:
    """The privacy history of a site's datasets, in an SQLite file in the site's own storage.

    Spent epsilon is the composition of a dataset's whole history (every run, every round,
    heterogeneous sigma and q) at the delta asked for, by Opacus' accountants: PRV (Gopi,
    Lee & Wutschitz, NeurIPS 2021) by default, or RDP (Mironov, CSF 2017). Each entry keeps
    the delta its run used; composing at one delta gives one (epsilon, delta) guarantee
    for the whole history. Spent epsilon never decreases: the ledger keeps the highest value
    it ever reported per (dataset, delta, accountant) and reports at least that (PRV's
    numerical estimate can dip by ~1e-6 when an almost free event is added).

    Write-ahead: ``reserve()`` makes an entry durable (committed, SQLite ``synchronous=FULL``
    in WAL mode) before training, so a crash at any moment may over-count, never
    under-count. Several processes may share one file; ``reserve()`` checks and records in
    one ``BEGIN IMMEDIATE`` transaction. One instance per thread.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        _create_private(self.path)
        with self._sql():
            self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            with self._sql():
                self._open()
        except BaseException:
            self._conn.close()
            raise

    # --- opening ------------------------------------------------------------------------

    def _open(self) -> None:
        conn = self._conn
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        app_id, version = self._identity()
        fresh = app_id == 0 and version == 0 and not self._has_tables()  # initialised below
        if app_id != APPLICATION_ID and not fresh:
            raise self._not_a_ledger("it holds another application's data")
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"ledger file {self.path} has schema version {version}, newer than this "
                f"fedvault reads ({SCHEMA_VERSION})",
                hint="Upgrade fedvault on this site; never downgrade a ledger.",
            )
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        if version == 0:
            with self._transaction():
                app_id, version = self._identity()  # another process may have won the race
                if version == 0:
                    if self._has_tables():
                        raise self._not_a_ledger("it holds another application's data")
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    logger.info("created privacy ledger %s", self.path)

    def _identity(self) -> tuple[int, int]:
        app_id = int(self._conn.execute("PRAGMA application_id").fetchone()[0])
        version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
        return app_id, version

    def _has_tables(self) -> bool:
        return self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0

    def _not_a_ledger(self, why: str) -> ConfigError:
        return ConfigError(
            f"ledger file {self.path} is not a fedvault ledger: {why}",
            hint="Point the site at its own ledger file; never delete or edit a ledger, "
            "its history is the privacy the site's data has spent.",
        )

    @contextmanager
    def _sql(self) -> Iterator[None]:
        """Turn SQLite failures into one-line fedvault errors naming the ledger file."""
        try:
            yield
        except sqlite3.ProgrammingError:
            raise
        except sqlite3.DatabaseError as err:
            code = (getattr(err, "sqlite_errorcode", None) or 0) & 0xFF
            if code in _NOT_A_LEDGER_CODES:
                raise self._not_a_ledger(str(err)) from err
            if code in _BUSY_CODES:
                raise ConfigError(
                    f"ledger file {self.path} stayed locked by another process for "
                    f"{BUSY_TIMEOUT_S:g} s",
                    hint="Another fedvault process holds the ledger; check for a stuck one.",
                ) from err
            raise ConfigError(f"cannot use ledger file {self.path}: {err}") from err

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT: takes the write lock first, so check-then-write is atomic."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # --- writing ------------------------------------------------------------------------

    def record(self, entry: LedgerEntry) -> None:
        """Append ``entry``; it is durable (committed and synced) when this returns."""
        with self._sql(), self._transaction():
            self._insert(entry)

    def _insert(self, entry: LedgerEntry) -> int:
        cursor = self._conn.execute(
            f"INSERT INTO entries ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.dataset,
                entry.run_id,
                entry.round,
                entry.noise_multiplier,
                entry.sample_rate,
                entry.steps,
                entry.delta,
                entry.accountant,
                entry.recorded_at,
            ),
        )
        return int(cursor.lastrowid or 0)

    def reserve(
        self,
        entry: LedgerEntry,
        *,
        max_epsilon: float | None,
        delta: float,
        accountant: str = "prv",
    ) -> float:
        """Write-ahead gate a site calls BEFORE training a round; returns the new spent epsilon.

        Projects the epsilon the dataset would have spent with ``entry`` added; above
        ``max_epsilon`` it raises PrivacyBudgetExceeded and records nothing, otherwise it
        records ``entry`` durably. Check and record are one transaction across processes.
        The caller must reserve the exact (sigma, q, steps) it will train with.
        """
        _check_max_epsilon(max_epsilon)
        _check_delta(delta)
        check_accountant(accountant)
        event = entry.event
        with self._sql():
            # Compose outside the lock; recompute under it only if another process wrote.
            seq, history = self._history(entry.dataset)
            estimate = _compose([*history, event], delta, accountant)
            with self._transaction():
                seq_now, history_now = self._history(entry.dataset)
                if seq_now != seq:
                    history, estimate = (
                        history_now,
                        _compose([*history_now, event], delta, accountant),
                    )
                projected = max(estimate, self._mark(entry.dataset, delta, accountant))
                refused = max_epsilon is not None and projected > max_epsilon
                if not refused:
                    new_seq = self._insert(entry)
                    self._raise_mark(entry.dataset, delta, accountant, projected, new_seq)
            if refused:
                spent = max(
                    _compose(history, delta, accountant),
                    self._mark(entry.dataset, delta, accountant),
                )
        if refused:
            raise PrivacyBudgetExceeded(
                f"dataset {short_fingerprint(entry.dataset)} refuses round {entry.round} of run "
                f"{entry.run_id}: its epsilon would go from {spent:.4g} to {projected:.4g}, "
                f"above the site's max_epsilon {max_epsilon:g} (delta={delta:g}, {accountant})",
                hint=f"This data's budget is spent across every run; the record is {self.path}.",
            )
        logger.info(
            "ledger: dataset %s run %s round %d reserved %d steps, epsilon now %.4f",
            short_fingerprint(entry.dataset),
            entry.run_id,
            entry.round,
            entry.steps,
            projected,
        )
        return projected

    def _mark(self, dataset: str, delta: float, accountant: str) -> float:
        row = self._conn.execute(
            "SELECT epsilon FROM marks WHERE dataset = ? AND delta = ? AND accountant = ?",
            (dataset, delta, accountant),
        ).fetchone()
        return float(row[0]) if row else 0.0

    def _raise_mark(
        self, dataset: str, delta: float, accountant: str, epsilon: float, seq: int
    ) -> float:
        """Store ``epsilon`` as reported if it is the highest yet; return the highest."""
        row = self._conn.execute(
            "INSERT INTO marks (dataset, delta, accountant, epsilon, seq) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (dataset, delta, accountant) DO UPDATE SET "
            "epsilon = max(epsilon, excluded.epsilon), seq = max(seq, excluded.seq) "
            "RETURNING epsilon",
            (dataset, delta, accountant, epsilon, seq),
        ).fetchone()
        return float(row[0])

    # --- reading ------------------------------------------------------------------------

    def _rows(self, dataset: str | None) -> list[tuple[int, LedgerEntry]]:
        where, args = ("WHERE dataset = ?", (dataset,)) if dataset is not None else ("", ())
        rows = self._conn.execute(
            f"SELECT seq, {_COLUMNS} FROM entries {where} ORDER BY seq", args
        ).fetchall()
        return [(int(row[0]), LedgerEntry(*row[1:])) for row in rows]

    def _history(self, dataset: str) -> tuple[int, list[PrivacyEvent]]:
        rows = self._rows(dataset)
        return (rows[-1][0] if rows else 0), [entry.event for _, entry in rows]

    def entries(self, dataset: str | None = None) -> list[LedgerEntry]:
        """Every entry (of one dataset, or all), in the order they were recorded."""
        with self._sql():
            return [entry for _, entry in self._rows(dataset)]

    def history(self, dataset: str) -> list[PrivacyEvent]:
        """The privacy events of every entry for ``dataset``, in the order they were recorded."""
        with self._sql():
            return self._history(dataset)[1]

    def datasets(self) -> list[str]:
        """Fingerprints of every dataset with an entry, in order of their first entry."""
        with self._sql():
            rows = self._conn.execute(
                "SELECT dataset FROM entries GROUP BY dataset ORDER BY min(seq)"
            ).fetchall()
        return [str(row[0]) for row in rows]

    def spent(self, dataset: str, *, delta: float, accountant: str = "prv") -> float:
        """Epsilon ``dataset`` has spent at ``delta``: its whole history composed (never less
        than any value reported before for the same dataset, delta and accountant)."""
        _check_delta(delta)
        check_accountant(accountant)
        with self._sql():
            seq, history = self._history(dataset)
            if not history:
                return 0.0
            return self._raise_mark(
                dataset, delta, accountant, _compose(history, delta, accountant), seq
            )

    def projected(
        self, dataset: str, event: PrivacyEvent, *, delta: float, accountant: str = "prv"
    ) -> float:
        """Epsilon ``dataset`` would have spent if ``event`` were added (records nothing)."""
        _check_delta(delta)
        check_accountant(accountant)
        with self._sql():
            _, history = self._history(dataset)
            mark = self._mark(dataset, delta, accountant)
        return max(_compose([*history, event], delta, accountant), mark)

    def summary(self, *, delta: float, accountant: str = "prv") -> list[DatasetSummary]:
        """Per dataset: spent epsilon, runs, rounds, steps, times, and each run's epsilon.

        Runs are listed in order of their last entry; a run's ``cumulative_epsilon`` is the
        whole history up to that entry (other runs' interleaved entries included).
        """
        _check_delta(delta)
        check_accountant(accountant)
        cache: dict[tuple[PrivacyEvent, ...], float] = {}

        def compose(events: Sequence[PrivacyEvent]) -> float:
            key = tuple(_merged(events))
            if key not in cache:
                cache[key] = compute_epsilon(key, delta=delta, accountant=accountant)
            return cache[key]

        out: list[DatasetSummary] = []
        with self._sql():
            for dataset in self.datasets():
                rows = self._rows(dataset)
                entries = [entry for _, entry in rows]
                last_index: dict[str, int] = {}
                for i, entry in enumerate(entries):
                    last_index[entry.run_id] = i
                per_run: list[RunSummary] = []
                cumulative = 0.0
                for run_id, last in sorted(last_index.items(), key=lambda item: item[1]):
                    mine = [e for e in entries if e.run_id == run_id]
                    cumulative = max(cumulative, compose([e.event for e in entries[: last + 1]]))
                    per_run.append(
                        RunSummary(
                            run_id=run_id,
                            rounds=len({e.round for e in mine}),
                            steps=sum(e.steps for e in mine),
                            first_recorded_at=min(e.recorded_at for e in mine),
                            last_recorded_at=max(e.recorded_at for e in mine),
                            epsilon=compose([e.event for e in mine]),
                            cumulative_epsilon=cumulative,
                        )
                    )
                total = self._raise_mark(dataset, delta, accountant, cumulative, rows[-1][0])
                per_run[-1]["cumulative_epsilon"] = total
                out.append(
                    DatasetSummary(
                        dataset=dataset,
                        short=short_fingerprint(dataset),
                        epsilon=total,
                        delta=delta,
                        accountant=accountant,
                        runs=len(per_run),
                        rounds=len({(e.run_id, e.round) for e in entries}),
                        entries=len(entries),
                        steps=sum(e.steps for e in entries),
                        first_recorded_at=min(e.recorded_at for e in entries),
                        last_recorded_at=max(e.recorded_at for e in entries),
                        per_run=per_run,
                    )
                )
        return out

    # --- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the file; every recorded entry is already durable."""
        self._conn.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _check_max_epsilon(max_epsilon: float | None) -> None:
    if max_epsilon is not None and not (math.isfinite(max_epsilon) and max_epsilon > 0):
        raise ConfigError(f"max_epsilon must be > 0, got {max_epsilon}")


def _create_private(path: Path) -> None:
    """Create the ledger's missing folders (0700) and file (0600); warn if others can write it."""
    missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
            folder.chmod(0o700)  # mkdir's mode is filtered by the umask
        except FileExistsError:
            pass
        except OSError as err:
            raise ConfigError(f"cannot create the ledger folder {folder}: {err}") from err
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o022:
            warnings.warn(
                f"ledger file {path} is writable by other users (mode {mode:o}); "
                "run `chmod 600` on it",
                stacklevel=3,
            )
        return
    except OSError as err:
        raise ConfigError(f"cannot create the ledger file {path}: {err}") from err
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
