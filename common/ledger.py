"""A site's persistent, write-ahead privacy ledger: every DP-SGD contribution its data made.

Tamper evidence (common/ledger_chain.py): every entry is hash-chained to the one before it,
and after every committed append the ledger's head is written to an anchor file beside it;
a ledger that no longer contains its anchor refuses to be trained on.
"""

from __future__ import annotations

import dataclasses
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
from typing import Any, TypedDict

from fedvault.common.config_values import site_default
from fedvault.common.errors import ConfigError, LedgerError, PrivacyBudgetExceeded, SiteRefusal
from fedvault.common.fingerprint import short_fingerprint
from fedvault.common.ledger_chain import (
    GENESIS,
    Anchor,
    LedgerHead,
    anchor_path,
    declarations_hash,
    entry_hash,
    read_anchor,
    restore_hint,
    utc_now,
    write_anchor,
)
from fedvault.common.privacy import PrivacyEvent, check_accountant, compute_epsilon
from fedvault.common.registry import ACCOUNTANTS

__all__ = [
    "APPLICATION_ID",
    "DEFAULT_MAX_EPSILON",
    "GENESIS",
    "KIT_LEDGER",
    "SCHEMA_VERSION",
    "DatasetSummary",
    "LedgerEntry",
    "LedgerHead",
    "LedgerPolicy",
    "PrivacyLedger",
    "RunSummary",
    "anchor_path",
    "read_anchor",
]

logger = logging.getLogger(__name__)

#: Schema of the ledger file (``PRAGMA user_version``); a newer file is refused, never
#: rewritten, and a version-1 file (no hash chain) is migrated in place when opened.
SCHEMA_VERSION = 2
#: ``PRAGMA application_id`` of a fedvault ledger: "fvlg" in ASCII.
APPLICATION_ID = 0x66766C67
#: Seconds a ledger call waits for another process's transaction before giving up.
BUSY_TIMEOUT_S = 30.0
#: A deployed site's lifetime epsilon cap per dataset when it sets none (`--max-epsilon`).
#: Set by the site, never by the coordinator ([site] max-epsilon in common/defaults.toml).
DEFAULT_MAX_EPSILON: float = site_default("max-epsilon")
#: Where a site kit keeps its ledger, relative to the kit folder.
KIT_LEDGER = Path("state") / "privacy-ledger.sqlite"
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
_NOT_A_LEDGER_CODES = (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT)
_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)

# --- schema -------------------------------------------------------------------------------

_ENTRIES_COLUMNS = """
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        dataset TEXT NOT NULL CHECK (dataset LIKE 'sha256:%'),
        run_id TEXT NOT NULL CHECK (length(run_id) > 0),
        round INTEGER NOT NULL CHECK (round >= 0),
        noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
        sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
        steps INTEGER NOT NULL CHECK (steps >= 0),
        delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
        accountant TEXT NOT NULL,
        recorded_at TEXT NOT NULL"""
_ENTRIES_V2 = f"""CREATE TABLE entries ({_ENTRIES_COLUMNS},
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    ) STRICT"""
#: Version 2 adds these columns to a version-1 ``entries`` table, then fills them in.
_CHAIN_COLUMNS_V1_TO_V2 = (
    "ALTER TABLE entries ADD COLUMN prev_hash TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE entries ADD COLUMN hash TEXT NOT NULL DEFAULT ''",
)
_ENTRIES_INDEX = "CREATE INDEX entries_by_dataset ON entries (dataset, seq)"
# High-water mark of every epsilon reported per (dataset, delta, accountant); see spent().
_MARKS_TABLE = """CREATE TABLE marks (
        dataset TEXT NOT NULL,
        delta REAL NOT NULL,
        accountant TEXT NOT NULL,
        epsilon REAL NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (dataset, delta, accountant)
    ) STRICT"""
#: Tables version 2 adds; verify() checks that each is still exactly this.
_V2_TABLES: dict[str, str] = {
    # The site's own delta and accountant, written once (fix_policy).
    "settings": """CREATE TABLE settings (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        fixed_at TEXT NOT NULL
    ) STRICT""",
    # Which dataset the site trains on; a switch is declared, never silent.
    "datasets": """CREATE TABLE datasets (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        dataset TEXT NOT NULL CHECK (dataset LIKE 'sha256:%'),
        declared_at TEXT NOT NULL,
        new INTEGER NOT NULL CHECK (new IN (0, 1))
    ) STRICT""",
    # Evaluation replies: not budgeted, so counted and capped per run.
    "evaluations": """CREATE TABLE evaluations (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL CHECK (length(run_id) > 0),
        round INTEGER NOT NULL CHECK (round >= 0),
        at TEXT NOT NULL
    ) STRICT""",
}
_V2_INDEXES = ("CREATE INDEX evaluations_by_run ON evaluations (run_id, seq)",)


def _append_only(table: str) -> dict[str, str]:
    # The history is append-only: nothing, not even a stray SQL shell, rewrites the past.
    return {
        f"{table}_no_update": f"""CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table}
        BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END""",
        f"{table}_no_delete": f"""CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table}
        BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END""",
    }


#: Every trigger of a version-2 ledger; verify() reports any missing, altered or extra one.
_TRIGGERS: dict[str, str] = {
    **_append_only("entries"),
    **_append_only("settings"),
    **_append_only("datasets"),
    **_append_only("evaluations"),
    "marks_no_delete": """CREATE TRIGGER marks_no_delete BEFORE DELETE ON marks
        BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END""",
    "marks_never_decrease": """CREATE TRIGGER marks_never_decrease BEFORE UPDATE ON marks
        WHEN NEW.epsilon < OLD.epsilon OR NEW.dataset IS NOT OLD.dataset
            OR NEW.delta IS NOT OLD.delta OR NEW.accountant IS NOT OLD.accountant
        BEGIN SELECT RAISE(ABORT, 'a reported epsilon never decreases'); END""",
    "marks_are_epsilons": """CREATE TRIGGER marks_are_epsilons BEFORE INSERT ON marks
        WHEN NOT (NEW.epsilon >= 0 AND NEW.epsilon <= 1e300)
        BEGIN SELECT RAISE(ABORT, 'an epsilon is finite and >= 0'); END""",
}
_SCHEMA: tuple[str, ...] = (
    _ENTRIES_V2,
    _ENTRIES_INDEX,
    _MARKS_TABLE,
    *_V2_TABLES.values(),
    *_V2_INDEXES,
    *_TRIGGERS.values(),
)
_ENTRY_FIELDS = (
    "dataset",
    "run_id",
    "round",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "delta",
    "accountant",
    "recorded_at",
)
_COLUMNS = ", ".join(_ENTRY_FIELDS)
_ENTRIES_TABLE_COLUMNS = ("seq", *_ENTRY_FIELDS, "prev_hash", "hash")


def _normalised(sql: str | None) -> str:
    return " ".join((sql or "").split())


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
                hint="Use fedvault.common.fingerprint.dataset_fingerprint(features, labels).",
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


@dataclass(frozen=True)
class LedgerPolicy:
    """The site's own delta and accountant, stored once with its ledger (never the run's)."""

    delta: float
    accountant: str


def _events_merged_by_plan(events: Sequence[PrivacyEvent]) -> list[PrivacyEvent]:
    """Events with equal (sigma, q) merged by summing steps; composition is commutative.

    Zero-step events stay (as events of 0 steps); privacy.py's ``_accountant_phases`` turns
    events into the accountant's (sigma, q, steps) entries and drops them.

    Exact, and it keeps the accountant's cost at the number of distinct plans, not rounds
    (60 PRV rounds: ~40 s unmerged, ~1 s merged).
    """
    steps: dict[tuple[float, float], int] = {}
    for e in events:
        key = (e.noise_multiplier, e.sample_rate)
        steps[key] = steps.get(key, 0) + e.steps
    return [PrivacyEvent(sigma, q, n) for (sigma, q), n in steps.items()]


def _valid_epsilon(epsilon: float, delta: float, accountant: str) -> float:
    """``epsilon`` if it is one (finite and >= 0); the ledger never records or reports another."""
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ConfigError(
            f"the {accountant} accountant gives epsilon = {epsilon} at delta={delta:g}: not an "
            "epsilon; the ledger records and reports none",
            hint="Use a delta well below 1 / (the site's training rows), e.g. 1e-5.",
        )
    return epsilon


def _compose(events: Sequence[PrivacyEvent], delta: float, accountant: str) -> float:
    epsilon = compute_epsilon(_events_merged_by_plan(events), delta=delta, accountant=accountant)
    return _valid_epsilon(epsilon, delta, accountant)


def _entry_fields(entry: LedgerEntry) -> dict[str, Any]:
    return dataclasses.asdict(entry)


def _short(digest: str) -> str:
    return f"{digest[:12]}…"


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

    It cannot forget silently: entries are hash-chained (``head()``, ``hash_at()``), every
    committed append rewrites the anchor file ``<path>.anchor``, and ``reserve``, ``record``,
    ``declare_dataset`` and ``record_evaluation`` refuse (LedgerError) a ledger that does not
    contain its anchor; ``verify()`` lists every problem.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.anchor_path = anchor_path(self.path)
        if not self.path.exists() and self.anchor_path.exists():
            raise LedgerError(
                f"the privacy ledger {self.path} is missing, but its anchor "
                f"{self.anchor_path} says it held entries: it was deleted or moved",
                path=self.path,
                hint=restore_hint(),
            )
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
            raise LedgerError(
                f"ledger file {self.path} has schema version {version}, newer than this "
                f"fedvault reads ({SCHEMA_VERSION})",
                path=self.path,
                hint="Upgrade fedvault on this site; never downgrade a ledger.",
            )
        if fresh and self.anchor_path.exists():
            raise LedgerError(
                f"the privacy ledger {self.path} is empty, but its anchor {self.anchor_path} "
                "says it held entries: it was replaced by an empty file",
                path=self.path,
                hint=restore_hint(),
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
        elif version == 1:
            self._migrate_from_v1()

    def _migrate_from_v1(self) -> None:
        """Version 1 → 2 in one transaction: chain columns, chain computed in seq order,
        the new tables, every trigger recreated, user_version = 2."""
        conn = self._conn
        with self._transaction():
            if self._identity()[1] != 1:  # another process migrated it first
                return
            for name in ("entries_no_update", "entries_no_delete"):
                conn.execute(f"DROP TRIGGER IF EXISTS {name}")
            for statement in _CHAIN_COLUMNS_V1_TO_V2:
                conn.execute(statement)
            prev = GENESIS
            rows = conn.execute(f"SELECT seq, {_COLUMNS} FROM entries ORDER BY seq").fetchall()
            for row in rows:
                digest = entry_hash(prev, dict(zip(_ENTRY_FIELDS, row[1:], strict=True)))
                conn.execute(
                    "UPDATE entries SET prev_hash = ?, hash = ? WHERE seq = ?",
                    (prev, digest, row[0]),
                )
                prev = digest
            for statement in (*_V2_TABLES.values(), *_V2_INDEXES, *_TRIGGERS.values()):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        logger.info(
            "migrated privacy ledger %s to schema 2 (%d entries chained)", self.path, len(rows)
        )

    def _identity(self) -> tuple[int, int]:
        app_id = int(self._conn.execute("PRAGMA application_id").fetchone()[0])
        version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
        return app_id, version

    def _has_tables(self) -> bool:
        return self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0

    def _not_a_ledger(self, why: str) -> LedgerError:
        return LedgerError(
            f"ledger file {self.path} is not a fedvault ledger: {why}",
            path=self.path,
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
                raise LedgerError(
                    f"ledger file {self.path} stayed locked by another process for "
                    f"{BUSY_TIMEOUT_S:g} s",
                    path=self.path,
                    hint="Another fedvault process holds the ledger; check for a stuck one.",
                ) from err
            raise LedgerError(f"cannot use ledger file {self.path}: {err}", path=self.path) from err

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

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        """One consistent read of the file (a deferred transaction), for multi-query reads."""
        if self._conn.in_transaction:
            yield
            return
        self._conn.execute("BEGIN")
        try:
            yield
        finally:
            self._conn.execute("COMMIT")

    # --- the chain and its anchor -------------------------------------------------------

    def _head(self) -> LedgerHead:
        count, last = self._conn.execute(
            "SELECT count(*), (SELECT hash FROM entries ORDER BY seq DESC LIMIT 1) FROM entries"
        ).fetchone()
        return LedgerHead(int(count), str(last) if count else GENESIS)

    def head(self) -> LedgerHead:
        """Entries held and the chain hash after the last one (0 and GENESIS when empty)."""
        with self._sql():
            return self._head()

    def _hash_at(self, count: int) -> str | None:
        if count == 0:
            return GENESIS
        row = self._conn.execute(
            "SELECT hash FROM entries ORDER BY seq LIMIT 1 OFFSET ?", (count - 1,)
        ).fetchone()
        return str(row[0]) if row else None

    def hash_at(self, count: int) -> str | None:
        """The chain hash after the first ``count`` entries: GENESIS for 0, None past the end."""
        if isinstance(count, bool) or not isinstance(count, Integral) or count < 0:
            raise ConfigError(f"count must be an integer >= 0, got {count!r}")
        with self._sql():
            return self._hash_at(int(count))

    def _declarations(self) -> list[tuple[int, str, str, int]]:
        rows = self._conn.execute(
            "SELECT seq, dataset, declared_at, new FROM datasets ORDER BY seq"
        ).fetchall()
        return [(int(s), str(d), str(at), int(n)) for s, d, at, n in rows]

    def _policy_record(self) -> dict[str, Any] | None:
        policy = self._policy()
        return None if policy is None else dataclasses.asdict(policy)

    def _anchor_now(self) -> Anchor:
        head = self._head()
        declarations = self._declarations()
        return Anchor(
            count=head.count,
            hash=head.hash,
            datasets=len(declarations),
            datasets_hash=declarations_hash(declarations),
            policy=self._policy_record(),
            updated_at=utc_now(),
        )

    def _anchor_problems(self, anchor: Anchor | None) -> list[str]:
        """How this ledger fails to contain ``anchor`` (its state after an earlier append)."""
        if anchor is None:
            return []
        problems: list[str] = []
        head = self._head()
        seen = f"its anchor (written {anchor.updated_at})"
        if head.count < anchor.count:
            problems.append(
                f"the ledger holds {head.count} entries but {seen} recorded {anchor.count}: "
                "entries were removed or the ledger was replaced"
            )
        else:
            mine = self._hash_at(anchor.count)
            if mine != anchor.hash:
                problems.append(
                    f"the ledger's chain after entry {anchor.count} is {_short(mine or '')}, "
                    f"not {_short(anchor.hash)} as {seen} recorded: its history was rewritten"
                )
        declarations = self._declarations()
        if len(declarations) < anchor.datasets:
            problems.append(
                f"the ledger holds {len(declarations)} dataset declaration(s) but {seen} "
                f"recorded {anchor.datasets}: declarations were removed"
            )
        elif anchor.datasets_hash and anchor.datasets_hash != declarations_hash(
            declarations[: anchor.datasets]
        ):
            problems.append(f"the ledger's dataset declarations differ from {seen}: rewritten")
        if anchor.policy is not None:
            try:
                policy = self._policy_record()
            except LedgerError as err:
                policy = {"error": str(err)}
            if policy != anchor.policy:
                problems.append(
                    f"the site policy stored in the ledger ({policy}) is not the one {seen} "
                    f"recorded ({anchor.policy}): it was removed or changed"
                )
        return problems

    def _fail_closed(self, *, full: bool = False) -> None:
        """Raise LedgerError unless the ledger contains its anchor (and, if ``full``, verifies)."""
        problems = self._problems() if full else self._anchor_problems(read_anchor(self.path))
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise LedgerError(
                f"the privacy ledger {self.path} refuses to be used: {problems[0]}{more}",
                path=self.path,
                hint=restore_hint(),
            )

    def _write_anchor(self) -> None:
        """After a committed append: record the head in the anchor, under the write lock so
        anchors from several processes go forward in the order their appends committed."""
        try:
            with self._transaction():
                previous = read_anchor(self.path)
                problems = self._anchor_problems(previous)
                if problems:  # never overwrite the evidence of a ledger that forgot
                    logger.error("ledger %s: anchor kept as it was: %s", self.path, problems[0])
                    return
                write_anchor(self.path, self._anchor_now())
        except OSError as err:
            raise LedgerError(
                f"cannot write the ledger anchor {self.anchor_path}: {err}",
                path=self.anchor_path,
                hint="The site's state folder must be writable by the site.",
            ) from err

    # --- verification -------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Every problem found, one line each; [] when the ledger is intact.

        Checks the hash chain link by link, the append-only triggers and the tables against
        the schema, gaps in the sequence numbers, the stored site policy, and that the ledger
        contains its anchor. Reads only; writes nothing.
        """
        with self._sql(), self._snapshot():
            return self._problems()

    def _problems(self) -> list[str]:
        problems = self._schema_problems()
        if "entries" not in self._tables():
            return problems
        problems += self._chain_problems()
        if "datasets" in self._tables():
            seqs = [row[0] for row in self._declarations()]
            problems += self._sequence_problems("datasets", seqs, "dataset declaration")
        try:
            self._policy()
        except LedgerError as err:
            problems.append(str(err))
        if "marks" in self._tables():
            for dataset, epsilon in self._conn.execute(
                "SELECT dataset, epsilon FROM marks WHERE NOT (epsilon >= 0 AND epsilon <= 1e300)"
            ):
                problems.append(f"dataset {short_fingerprint(dataset)} has epsilon mark {epsilon}")
        try:
            anchor = read_anchor(self.path)
        except LedgerError as err:
            return [*problems, str(err)]
        if "datasets" in self._tables() and "settings" in self._tables():
            problems += self._anchor_problems(anchor)
        return problems

    def _tables(self) -> dict[str, str]:
        rows = self._conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'")
        return {str(name): str(sql) for name, sql in rows}

    def _schema_problems(self) -> list[str]:
        problems: list[str] = []
        tables = self._tables()
        for name in ("entries", "marks", *_V2_TABLES):
            if name not in tables:
                problems.append(f"table {name} is missing")
        for name, sql in _V2_TABLES.items():
            if name in tables and _normalised(tables[name]) != _normalised(sql):
                problems.append(f"table {name} was altered: its definition is not the schema's")
        if "entries" in tables:
            columns = tuple(str(row[1]) for row in self._conn.execute("PRAGMA table_info(entries)"))
            if columns != _ENTRIES_TABLE_COLUMNS:
                problems.append(f"table entries was altered: its columns are {columns}")
        triggers = {
            str(name): str(sql)
            for name, sql in self._conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"
            )
        }
        for name, sql in _TRIGGERS.items():
            table = name.split("_", 1)[0]
            if name not in triggers:
                problems.append(
                    f"trigger {name} is missing: the {table} table is no longer protected"
                )
            elif _normalised(triggers[name]) != _normalised(sql):
                problems.append(f"trigger {name} was altered: it is not the schema's")
        for name in sorted(set(triggers) - set(_TRIGGERS)):
            problems.append(f"trigger {name} is not part of the ledger's schema")
        return problems

    def _chain_problems(self) -> list[str]:
        problems: list[str] = []
        rows = self._conn.execute(
            f"SELECT seq, {_COLUMNS}, prev_hash, hash FROM entries ORDER BY seq"
        ).fetchall()
        prev_seq, prev_hash = 0, GENESIS
        for row in rows:
            seq, stored_prev, stored = int(row[0]), str(row[-2]), str(row[-1])
            fields = dict(zip(_ENTRY_FIELDS, row[1:-2], strict=True))
            if stored_prev != prev_hash:
                before = f"entry {prev_seq}" if prev_seq else "the chain's start"
                problems.append(
                    f"entry {seq}: its prev_hash does not link to {before}: an entry before "
                    "it was removed or rewritten"
                )
            if entry_hash(stored_prev, fields) != stored:
                problems.append(f"entry {seq}: its hash does not match its contents: rewritten")
            prev_seq, prev_hash = seq, stored
        problems += self._sequence_problems("entries", [int(row[0]) for row in rows], "entry")
        return problems

    def _sequence_problems(self, table: str, seqs: Sequence[int], what: str) -> list[str]:
        problems: list[str] = []
        expected = 1
        for seq in seqs:
            if seq != expected:
                problems.append(
                    f"{table}: {what} {expected}..{seq - 1} missing (seq jumps from "
                    f"{expected - 1} to {seq})"
                )
            expected = seq + 1
        row = self._conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)
        ).fetchone()
        counter = int(row[0]) if row else 0
        if counter > expected - 1:
            problems.append(
                f"{table}: {what} {expected}..{counter} missing after the last one "
                f"(the table's sequence counter is at {counter}): deleted from the end"
            )
        return problems

    # --- site policy --------------------------------------------------------------------

    def _policy(self) -> LedgerPolicy | None:
        values = dict(self._conn.execute("SELECT name, value FROM settings").fetchall())
        if not values:
            return None
        try:
            policy = LedgerPolicy(delta=float(values["delta"]), accountant=values["accountant"])
            _check_delta(policy.delta)
            check_accountant(policy.accountant)
        except (KeyError, ValueError, ConfigError) as err:
            raise LedgerError(
                f"the site policy stored in {self.path} is damaged: {values}",
                path=self.path,
                hint=restore_hint(),
            ) from err
        return policy

    def policy(self) -> LedgerPolicy | None:
        """The site's delta and accountant stored with this ledger, or None if none yet."""
        with self._sql():
            return self._policy()

    def fix_policy(self, *, delta: float, accountant: str) -> LedgerPolicy:
        """Store the site's delta and accountant if none is stored; return the stored policy.

        A ledger composes at one delta and accountant for its whole life: a different one
        than stored is a LedgerError, never a silent change of what its epsilon means.
        """
        _check_delta(delta)
        check_accountant(accountant)
        asked = LedgerPolicy(delta=float(delta), accountant=accountant)
        with self._sql():
            stored = self._policy()
            if stored is None:
                with self._transaction():
                    stored = self._policy()
                    if stored is None:
                        self._fail_closed()
                        at = utc_now()
                        self._conn.executemany(
                            "INSERT INTO settings (name, value, fixed_at) VALUES (?, ?, ?)",
                            [("delta", repr(asked.delta), at), ("accountant", accountant, at)],
                        )
                if stored is None:
                    self._write_anchor()
                    logger.info(
                        "ledger %s: policy fixed at delta=%g, %s", self.path, delta, accountant
                    )
                    return asked
        self._check_policy(stored, asked)
        return stored

    def _check_policy(self, stored: LedgerPolicy | None, asked: LedgerPolicy) -> None:
        if stored is not None and stored != asked:
            raise LedgerError(
                f"this ledger composes at δ={stored.delta:g}, accountant {stored.accountant}; "
                f"asked for δ={asked.delta:g}, accountant {asked.accountant}: a ledger's δ and "
                "accountant never change, or its ε would mean something else",
                path=self.path,
                hint=f"Keep this site's δ and accountant as the ledger {self.path} stores them.",
            )

    # --- datasets -----------------------------------------------------------------------

    def _current_dataset(self) -> str | None:
        row = self._conn.execute(
            "SELECT dataset FROM datasets ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if row is None:  # a version-1 ledger: the dataset it last trained on counts as declared
            row = self._conn.execute(
                "SELECT dataset FROM entries ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        return None if row is None else str(row[0])

    def current_dataset(self) -> str | None:
        """The dataset the site declared last (for a migrated ledger: the last one trained)."""
        with self._sql():
            return self._current_dataset()

    def declared_datasets(self) -> list[str]:
        """Every dataset declared, or trained on before declarations existed, first seen first."""
        with self._sql(), self._snapshot():
            trained = [
                str(row[0])
                for row in self._conn.execute(
                    "SELECT dataset FROM entries GROUP BY dataset ORDER BY min(seq)"
                )
            ]
            declared = [
                str(row[0])
                for row in self._conn.execute(
                    "SELECT dataset FROM datasets GROUP BY dataset ORDER BY min(seq)"
                )
            ]
        return [*(d for d in trained if d not in declared), *declared]

    def declare_dataset(self, dataset: str, *, new: bool) -> bool:
        """Declare the dataset the site trains on; True if a declaration was appended.

        The first declaration is free and the current dataset again changes nothing; another
        dataset is a LedgerError unless ``new`` (the site said so: `--new-dataset`), since
        its privacy budget would start again from zero.
        """
        if not isinstance(dataset, str) or not _FINGERPRINT.fullmatch(dataset):
            raise ConfigError(f"dataset must be a fingerprint 'sha256:<64 hex>', got {dataset!r}")
        with self._sql():
            with self._transaction():
                current = self._current_dataset()
                undeclared = not self._declarations()
                if current == dataset and not undeclared:
                    return False
                if current is not None and current != dataset and not new:
                    raise LedgerError(
                        "the site's data changed since it last trained "
                        f"({short_fingerprint(current)} → {short_fingerprint(dataset)}); its "
                        "privacy budget would start again from zero",
                        path=self.path,
                        hint="If this really is a new dataset, start the site with "
                        "`--new-dataset`; otherwise restore the original data file.",
                    )
                self._fail_closed()
                self._conn.execute(
                    "INSERT INTO datasets (dataset, declared_at, new) VALUES (?, ?, ?)",
                    (dataset, utc_now(), int(bool(new) and current is not None)),
                )
            self._write_anchor()
        logger.info("ledger %s: dataset %s declared", self.path, short_fingerprint(dataset))
        return True

    # --- evaluation replies -------------------------------------------------------------

    def record_evaluation(self, run_id: str, server_round: int, *, max_per_run: int) -> int:
        """Count an evaluation reply of ``run_id``; returns the run's count with it.

        Evaluation replies spend no budget, so a site answers at most ``max_per_run`` per
        run: past that it raises SiteRefusal and records nothing.
        """
        if not isinstance(run_id, str) or not run_id.strip():
            raise ConfigError(f"run_id must be a non-empty string, got {run_id!r}")
        for name, value in (("server_round", server_round), ("max_per_run", max_per_run)):
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        with self._sql():
            with self._transaction():
                self._fail_closed()
                (count,) = self._conn.execute(
                    "SELECT count(*) FROM evaluations WHERE run_id = ?", (run_id,)
                ).fetchone()
                if count >= max_per_run:
                    raise SiteRefusal(
                        f"this site answers at most {max_per_run} evaluation replies per run; "
                        f"run {run_id} has had them (round {server_round} refused)",
                        hint="Evaluation replies are not covered by the privacy budget, so each "
                        "site caps them per run (its own setting).",
                    )
                self._conn.execute(
                    "INSERT INTO evaluations (run_id, round, at) VALUES (?, ?, ?)",
                    (run_id, int(server_round), utc_now()),
                )
            self._write_anchor()
        return int(count) + 1

    # --- writing ------------------------------------------------------------------------

    def record(self, entry: LedgerEntry) -> None:
        """Append ``entry``; it is durable (committed and synced) when this returns."""
        with self._sql():
            with self._transaction():
                self._fail_closed()
                self._insert(entry)
            self._write_anchor()

    def _insert(self, entry: LedgerEntry) -> int:
        prev = self._head().hash
        fields = _entry_fields(entry)
        cursor = self._conn.execute(
            f"INSERT INTO entries ({_COLUMNS}, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*(fields[name] for name in _ENTRY_FIELDS), prev, entry_hash(prev, fields)),
        )
        return int(cursor.lastrowid or 0)

    def reserve(
        self,
        entry: LedgerEntry,
        *,
        max_epsilon: float | None,
        delta: float,
        accountant: str = ACCOUNTANTS.default,
    ) -> float:
        """Write-ahead gate a site calls BEFORE training a round; returns the new spent epsilon.

        Projects the epsilon the dataset would have spent with ``entry`` added; above
        ``max_epsilon`` it raises PrivacyBudgetExceeded and records nothing, otherwise it
        records ``entry`` durably. Check and record are one transaction across processes.
        The caller must reserve the exact (sigma, q, steps) it will train with. A ledger
        that fails verify() (or whose stored policy is another delta or accountant) is a
        LedgerError, and nothing is recorded.
        """
        _check_max_epsilon(max_epsilon)
        _check_delta(delta)
        check_accountant(accountant)
        event = entry.event
        with self._sql():
            self._check_reserve_policy(entry, delta, accountant)  # before composing at them
            # Compose outside the lock; recompute under it only if another process wrote.
            seq, history = self._history(entry.dataset)
            estimate = _compose([*history, event], delta, accountant)
            with self._transaction():
                self._fail_closed(full=True)
                self._check_reserve_policy(entry, delta, accountant)
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
            else:
                self._write_anchor()
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

    def _check_reserve_policy(self, entry: LedgerEntry, delta: float, accountant: str) -> None:
        stored = self._policy()
        self._check_policy(stored, LedgerPolicy(delta=float(delta), accountant=accountant))
        self._check_policy(stored, LedgerPolicy(delta=entry.delta, accountant=entry.accountant))

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
        _valid_epsilon(epsilon, delta, accountant)
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

    def spent(self, dataset: str, *, delta: float, accountant: str = ACCOUNTANTS.default) -> float:
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
        self,
        dataset: str,
        event: PrivacyEvent,
        *,
        delta: float,
        accountant: str = ACCOUNTANTS.default,
    ) -> float:
        """Epsilon ``dataset`` would have spent if ``event`` were added (records nothing)."""
        _check_delta(delta)
        check_accountant(accountant)
        with self._sql():
            _, history = self._history(dataset)
            mark = self._mark(dataset, delta, accountant)
        return max(_compose([*history, event], delta, accountant), mark)

    def summary(
        self, *, delta: float, accountant: str = ACCOUNTANTS.default
    ) -> list[DatasetSummary]:
        """Per dataset: spent epsilon, runs, rounds, steps, times, and each run's epsilon.

        Runs are listed in order of their last entry; a run's ``cumulative_epsilon`` is the
        whole history up to that entry (other runs' interleaved entries included).
        """
        _check_delta(delta)
        check_accountant(accountant)
        cache: dict[tuple[PrivacyEvent, ...], float] = {}

        def compose(events: Sequence[PrivacyEvent]) -> float:
            key = tuple(_events_merged_by_plan(events))
            if key not in cache:
                cache[key] = _valid_epsilon(
                    compute_epsilon(key, delta=delta, accountant=accountant), delta, accountant
                )
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
            raise LedgerError(
                f"cannot create the ledger folder {folder}: {err}", path=path
            ) from err
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
        raise LedgerError(f"cannot create the ledger file {path}: {err}", path=path) from err
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
