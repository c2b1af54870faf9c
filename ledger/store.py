"""Opening, appending to and reading the ledger file (verifying it: ledger/verify.py).

Rules this module keeps: WAL, synchronous=FULL, a busy timeout on every connection,
one connection per thread, every write in BEGIN IMMEDIATE, readers open the file
read-only. A batch of facts commits whole or not at all. A file that is not ours is
never written to.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import schema
from .chain import (
    COLUMNS,
    GENESIS,
    encode_tail,
    link,
    link_tail,
)
from .facts import Fact, FactError
from .fold import FOLD_VERSION, State, fold, fold_into

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 10.0
# A commit writes every page it dirtied to the WAL and fsyncs it. A 20-row batch dirties
# the table's last pages and a leaf of each index for every order and position it names
# (ids sort far apart), so smaller pages mean fewer bytes to sync: 2048 measured ~15%
# faster durable appends than SQLite's 4096, with scans as fast. 1024 was as fast to
# append but made verify and replay ~15-30% slower. Only a new file takes it.
PAGE_SIZE = 2048
# Copy the WAL back into the file every 2000 pages (4 MB) instead of SQLite's 1000: each
# copy costs two more fsyncs, and a page many commits changed is copied once per copy.
# But the WAL file must first grow to that size after each start, and fsyncing a growing
# file costs ~1.5x more than rewriting one in place: 2000 measured ~4% faster appends
# than 1000 and than 4000. Durability is unchanged: every commit is fsynced either way.
WAL_AUTOCHECKPOINT = 2000
# How long a job run's record may wait between its stamp and its append (a writer
# waiting out the busy timeout: seconds) and how far an exchange's clock may run ahead
# of ours: an hour leaves room to spare. Facts are stamped by the bot's clock when they
# are recorded (an exchange's own times go in their data).
RECORDING_SLACK_MS = 3_600_000
SQLITE_HEADER = b"SQLite format 3\x00"
SELECT_ROWS = f"SELECT {', '.join(COLUMNS)} FROM facts"
INSERT_ROW = (f"INSERT INTO facts ({', '.join(COLUMNS)}, hash) "
              f"VALUES ({', '.join('?' * (len(COLUMNS) + 1))})")


# Rows per INSERT statement. Each distinct size is compiled once and kept in the
# statement caches, and a statement's program grows with its rows (a NULLIF per column):
# sizes up to 1000 kept ~130 MB more memory in a long backtest for no measurable gain.
ROWS_PER_INSERT = 64
# Committed rows are folded into the cached state in bulk, when state() or a checkpoint
# needs them or when this many wait: one fold of many rows costs about half of folding
# each small batch right after its fsync, which leaves the CPU's caches cold.
FOLD_AFTER_ROWS = 1000
# Python's sqlite3 binds int, float, str and bytearray directly but sends None and bytes
# through its adapter protocol (attribute look-ups, ~0.3 us each): that was a third of a
# batch's INSERT. So a row is bound with 0 for NULL and the hash as a bytearray, and the
# INSERT turns the 0 back into NULL. No fact column ever holds the integer 0 (they are
# text or NULL; seq, ts, type and data are never NULL), so NULLIF restores every NULL.
NOT_NULL = frozenset({"seq", "ts", "type", "data"})
BIND_ROW = "({}, ?)".format(", ".join("?" if c in NOT_NULL else "NULLIF(?, 0)"
                                      for c in COLUMNS))


@functools.lru_cache(maxsize=64)
def _insert_many(n: int) -> str:
    """One INSERT of n rows bound by bind_values(): far fewer round trips than executemany."""
    return f"INSERT INTO facts ({', '.join(COLUMNS)}, hash) VALUES {', '.join([BIND_ROW] * n)}"


def bind_values(values: tuple) -> list:
    """A row's values (after its seq) as _insert_many binds them: None as 0."""
    return [v if v is not None else 0 for v in values]


def checkpoint_fact(ts: int, state: State) -> Fact:
    return Fact("checkpoint", ts, data={"fold_version": FOLD_VERSION, "state": state.to_dict()})


def folded_by(checkpoint_data: dict) -> int:
    """The fold version a checkpoint was written by (1: before versions were recorded)."""
    return checkpoint_data.get("fold_version", 1)


class LedgerError(Exception):
    """The ledger cannot be opened or used as asked (the CLI exits 2)."""


class NoLedgerYet(LedgerError):
    """An empty file (or an SQLite file with nothing in it), read as a ledger."""


class LedgerWriteError(LedgerError):
    """A batch could not be committed; nothing of it was written."""


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    rows: int
    last_seq: int
    first_bad_seq: int | None = None
    problem: str = ""


def check_path(path: Path, *, for_writing: bool) -> None:
    """Refuse, with the path named, anything that is not (or cannot become) our ledger."""
    if path.is_dir():
        raise LedgerError(f"{path}: is a directory, not a ledger file")
    if not path.exists():
        if not for_writing:
            raise LedgerError(f"{path}: no ledger here (the bot creates it on its first run)")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise LedgerError(f"{path}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            why = "read-only filesystem" if _read_only_fs(parent) else "no write permission"
            raise LedgerError(f"{path}: cannot create the ledger: folder {parent} is not "
                              f"writable ({why})")
        return
    try:
        with open(path, "rb") as fh:
            header = fh.read(16)
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if header and header != SQLITE_HEADER:
        raise LedgerError(f"{path}: not an SQLite database; refusing to touch it")
    if for_writing and not os.access(path, os.W_OK):
        why = "read-only filesystem" if _read_only_fs(path) else "no write permission"
        raise LedgerError(f"{path}: not writable ({why}); nothing was changed")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT}")


def connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    try:
        if readonly:
            conn = _connect_ro(path, "mode=ro")
            try:
                _configure(conn)
            except sqlite3.OperationalError:
                # WAL readers need a -shm file. On a read-only filesystem nobody can
                # create one, but nobody can write either: with no -wal file the main
                # file alone is the whole ledger, so reading it as immutable is exact.
                conn.close()
                if not _read_only_fs(path) or os.path.exists(f"{path}-wal"):
                    raise
                conn = _connect_ro(path, "immutable=1")
                _configure(conn)
        else:
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            _configure(conn)
    except sqlite3.OperationalError as exc:
        raise LedgerError(f"{path}: cannot open ({exc})") from None
    except sqlite3.DatabaseError as exc:
        raise _unreadable(path, exc) from None
    return conn


def _unreadable(path: Path, exc: Exception) -> LedgerError:
    return LedgerError(f"{path}: not a readable SQLite database ({exc}); refusing to touch it")


def open_untouched(path: Path) -> sqlite3.Connection:
    """A read-only connection that changes no file.

    Any connection to a WAL-mode file creates -wal/-shm files beside it, and a writer's
    close checkpoints the WAL into the file. With no -wal file the main file is complete
    and can be read as immutable (no side files at all); with one, read-only.
    """
    real = Path(path).resolve()  # a symlink's -wal lies beside the file it points to
    # mode=ro with immutable too: a path with no file gets none (it would be created)
    mode = "mode=ro" if os.path.exists(f"{real}-wal") else "mode=ro&immutable=1"
    try:
        return _connect_ro(real, mode)
    except sqlite3.OperationalError as exc:
        raise LedgerError(f"{path}: cannot open ({exc})") from None
    except sqlite3.DatabaseError as exc:
        raise _unreadable(path, exc) from None


def _probe(path: Path) -> None:
    """Refuse a file that is not our ledger (or is newer) without changing any file."""
    conn = open_untouched(path)
    try:
        _identify(conn, path)
    finally:
        conn.close()


def _connect_ro(path: Path, mode: str) -> sqlite3.Connection:
    uri = f"{Path(path).absolute().as_uri()}?{mode}"
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    conn.execute("PRAGMA query_only = 1")
    return conn


def _identify(conn: sqlite3.Connection, path: Path) -> int:
    """The schema version of our ledger; 0 for an empty new file. Refuses foreign files."""
    # One read transaction: another process creating the ledger commits its schema and
    # its application_id together, and three separate reads could fall either side.
    own = not conn.in_transaction
    try:
        if own:
            conn.execute("BEGIN")
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise _unreadable(path, exc) from None
    finally:
        if own and conn.in_transaction:
            conn.execute("COMMIT")
    if app_id == schema.APPLICATION_ID:
        if version > schema.SCHEMA_VERSION:
            raise LedgerError(f"{path}: ledger schema version {version} is newer than this "
                              f"code's version {schema.SCHEMA_VERSION}; upgrade the bot")
        return version
    if app_id == 0 and version == 0 and tables == 0:
        return 0
    raise LedgerError(f"{path}: an SQLite database, but not a ledger of this bot "
                      f"(application_id {app_id}, {tables} schema objects); refusing to "
                      "modify it")


def _migrate(conn: sqlite3.Connection, path: Path, current: int) -> None:
    if current == schema.SCHEMA_VERSION:
        return
    try:
        if current == 0:  # an empty file: the page size can still be chosen
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        _enter_wal(conn)
        conn.execute("BEGIN IMMEDIATE")
        # Re-read inside the lock: another process may have migrated meanwhile.
        current = _identify(conn, path)
        for version in range(current + 1, schema.SCHEMA_VERSION + 1):
            for statement in migration_statements(schema.MIGRATIONS[version - 1]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
        conn.execute(f"PRAGMA application_id = {schema.APPLICATION_ID}")
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise LedgerError(f"{path}: cannot create or migrate the ledger ({exc})") from None


def _enter_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL, waiting (up to the busy timeout) for another process that
    holds the lock: SQLite answers "database is locked" at once here, without waiting."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) \
                    or time.monotonic() > deadline:
                raise
            time.sleep(0.005)
    if mode.lower() != "wal":
        raise sqlite3.OperationalError(f"the file cannot be put in WAL mode (it stays {mode})")


def migration_statements(script: str) -> Iterator[str]:
    """Split a migration script into complete statements (triggers contain ';')."""
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip().strip(";").strip():
                yield buf
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete statement in migration: {buf[:80]!r}")


class Ledger:
    """The append-only ledger at ``path``. Safe to share between threads."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False,
                 checkpoint_every: int = 5000) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.checkpoint_every = checkpoint_every
        self._local = threading.local()
        self._all_conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._state: State | None = None  # folded up to _state.seq, guarded by _state_lock
        # Batches committed after _state.seq and not folded yet (never without a _state).
        self._unfolded: list[list[tuple]] = []
        self._unfolded_rows = 0
        self._known_checkpoint = 0
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
        check_path(self.path, for_writing=not readonly)
        if self.path.exists() and self.path.stat().st_size > 0:
            _probe(self.path)
        try:
            conn = self._conn()
            version = _identify(conn, self.path)
            if readonly:
                if version == 0:
                    raise NoLedgerYet(f"{self.path}: an empty file, no ledger yet (the bot "
                                      "creates it on its first run)")
                if version != schema.SCHEMA_VERSION:
                    raise LedgerError(f"{self.path}: ledger schema version {version}, this "
                                      f"code reads {schema.SCHEMA_VERSION}; run the bot once "
                                      "to migrate it")
            else:
                _migrate(conn, self.path, version)
                self._refresh_stale_checkpoint(conn)
                if conn.execute("SELECT 1 FROM facts LIMIT 1").fetchone() is None:
                    # A new ledger's state is known: folding its first rows from memory
                    # saves the first checkpoint reading them back from the file.
                    self._state = State()
        except BaseException:
            self.close()
            raise

    def _refresh_stale_checkpoint(self, conn: sqlite3.Connection) -> None:
        """After an upgrade that changed the fold, every start would fold the whole ledger
        until the next checkpoint is due: write one by these rules now, once."""
        row = conn.execute("SELECT data FROM facts WHERE type = 'checkpoint' "
                           "ORDER BY seq DESC LIMIT 1").fetchone()
        if row is not None and folded_by(json.loads(row[0])) != FOLD_VERSION:
            last_ts = conn.execute("SELECT ts FROM facts ORDER BY seq DESC LIMIT 1").fetchone()
            try:
                self.checkpoint(last_ts[0])
            except LedgerWriteError as exc:  # only a shortcut: the ledger reads fine without
                log.warning("%s", exc)

    # -- connections -------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, readonly=self.readonly)
            self._local.conn = conn
            with self._conns_lock:
                self._all_conns.append(conn)
        return conn

    def close(self) -> None:
        with self._conns_lock:
            for conn in self._all_conns:
                try:
                    conn.close()
                except sqlite3.ProgrammingError:
                    pass  # made in another thread that already ended
            self._all_conns.clear()
        self._local = threading.local()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing -----------------------------------------------------------------------

    def append(self, facts: Sequence[Fact]) -> list[int]:
        """Commit ``facts`` as one atomic batch; return their sequence numbers."""
        # Validate and normalise everything before taking the write lock: a bad fact
        # anywhere in the batch refuses the whole batch before anything is written.
        for fact in facts:
            if not isinstance(fact, Fact):
                raise FactError(f"not a Fact: {type(fact).__name__}")
        return self.append_normalised([fact.values() for fact in facts])

    def append_normalised(self, batch: Sequence[tuple]) -> list[int]:
        """append() for facts already turned into ``Fact.values()`` (a write-behind buffer
        holds them so): the same atomic batch, without normalising each fact twice."""
        if self.readonly:
            raise LedgerError(f"{self.path}: opened read-only")
        if not batch:
            return []
        prepared = [(values, encode_tail(values), bind_values(values)) for values in batch]
        conn = self._conn()
        new_state = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            last = conn.execute("SELECT seq, hash FROM facts ORDER BY seq DESC LIMIT 1")
            seq, prev = last.fetchone() or (0, GENESIS)
            first = seq + 1
            rows, params = [], []
            for values, tail, bound in prepared:
                seq += 1
                prev = link_tail(prev, seq, tail)
                rows.append((seq, *values))
                params += (seq, *bound, bytearray(prev))
            width = len(COLUMNS) + 1
            for i in range(0, len(rows), ROWS_PER_INSERT):
                chunk = params[i * width:(i + ROWS_PER_INSERT) * width]
                conn.execute(_insert_many(len(chunk) // width), chunk)
            if self._checkpoint_due(conn, seq):
                new_state = self._fold_to(conn, seq, rows)
                seq += 1
                values = checkpoint_fact(batch[-1][0], new_state).row(seq)
                conn.execute(INSERT_ROW, (*values, link(prev, values)))
                new_state.seq = seq
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            raise LedgerWriteError(f"{self.path}: batch of {len(batch)} facts not recorded "
                                   f"({exc}); earlier facts are intact") from None
        except BaseException:
            self._rollback(conn)
            raise
        self._committed(rows, new_state)
        return list(range(first, first + len(rows)))

    def _committed(self, rows: list[tuple], checkpoint: State | None) -> None:
        """Keep the cached state current with what this thread just committed.

        Keeping the rows we still hold, to fold later (FOLD_AFTER_ROWS), costs less than
        reading them back, and folds what a checkpoint needs before it is due. Rows
        another connection committed in between are picked up by state() from the file.
        """
        with self._state_lock:
            if checkpoint is not None:
                self._known_checkpoint = max(self._known_checkpoint, checkpoint.seq)
                cached = self._cached_seq()
                if cached is None or cached < checkpoint.seq:
                    self._state = checkpoint
                    self._unfolded, self._unfolded_rows = [], 0
            elif rows and self._cached_seq() == rows[0][0] - 1:
                self._unfolded.append(rows)
                self._unfolded_rows += len(rows)
                if self._unfolded_rows >= FOLD_AFTER_ROWS:
                    self._fold_unfolded()

    def _cached_seq(self) -> int | None:
        """The last seq the cached state knows of, folded or not (state lock held)."""
        if self._state is None:
            return None
        return self._unfolded[-1][-1][0] if self._unfolded else self._state.seq

    def _fold_unfolded(self) -> None:
        """Fold the committed batches still held into the cached state (state lock held)."""
        batches, self._unfolded, self._unfolded_rows = self._unfolded, [], 0
        try:
            for rows in batches:
                fold_into(self._state, rows)
        except Exception:  # the rows ARE committed: raising would invite a retry
            log.exception("%s: cannot fold seq %d..%d; state() will retry",
                          self.path, batches[0][0][0], batches[-1][-1][0])
            self._state = None

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite already rolled back (e.g. after SQLITE_FULL)

    def _checkpoint_due(self, conn: sqlite3.Connection, last_seq: int) -> bool:
        if last_seq - self._known_checkpoint < self.checkpoint_every:
            return False
        # Another process may have written one since we last looked.
        row = conn.execute("SELECT seq FROM facts WHERE type = 'checkpoint' AND seq > ? "
                           "ORDER BY seq DESC LIMIT 1",
                           (last_seq - self.checkpoint_every,)).fetchone()
        if row is not None:
            self._known_checkpoint = row[0]
            return False
        return True

    def checkpoint(self, ts: int) -> int:
        """Append a checkpoint of the current state now; return its seq."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            last = conn.execute("SELECT seq, hash FROM facts ORDER BY seq DESC LIMIT 1")
            seq, prev = last.fetchone() or (0, GENESIS)
            state = self._fold_to(conn, seq)
            values = checkpoint_fact(ts, state).row(seq + 1)
            conn.execute(INSERT_ROW, (*values, link(prev, values)))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            raise LedgerWriteError(f"{self.path}: checkpoint not recorded ({exc})") from None
        state.seq = seq + 1
        self._committed([], state)
        return seq + 1

    # -- reading -----------------------------------------------------------------------

    def rows(self, after: int = 0, upto: int | None = None,
             conn: sqlite3.Connection | None = None) -> Iterator[tuple]:
        conn = conn or self._conn()
        if upto is None:
            return conn.execute(f"{SELECT_ROWS} WHERE seq > ? ORDER BY seq", (after,))
        return conn.execute(f"{SELECT_ROWS} WHERE seq > ? AND seq <= ? ORDER BY seq",
                            (after, upto))

    def select(self, sql: str, params: Iterable = ()) -> list[sqlite3.Row]:
        conn = self._conn()
        cur = conn.execute(sql, tuple(params))
        names = [d[0] for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur]

    def last_seq(self) -> int:
        return self._conn().execute("SELECT ifnull(max(seq), 0) FROM facts").fetchone()[0]

    def first_ts(self) -> int | None:
        """The time of the first fact (None while the ledger is empty)."""
        row = self._conn().execute("SELECT ts FROM facts ORDER BY seq LIMIT 1").fetchone()
        return row[0] if row else None

    def seq_floor(self, ts_ms: int, slack_ms: int = RECORDING_SLACK_MS) -> int:
        """A seq that every fact stamped at ``ts_ms`` or later comes after (0 if none).

        The last job run stamped ``slack_ms`` before ``ts_ms``: it was appended before
        any such fact was stamped. ``ts`` has no index (every index slows appends), so a
        time-window query adds ``seq > floor`` to read only the ledger's recent end;
        found by reading backwards from that end, which job runs (every few seconds)
        keep short.
        """
        row = self._conn().execute(
            "SELECT seq FROM facts WHERE type = 'job_run' AND ts < ? ORDER BY seq DESC LIMIT 1",
            (ts_ms - slack_ms,)).fetchone()
        return row[0] if row else 0

    def facts_for_order(self, client_order_id: str) -> list[tuple]:
        return list(self._conn().execute(
            f"{SELECT_ROWS} WHERE client_order_id = ? ORDER BY seq", (client_order_id,)))

    def state(self) -> State:
        """The folded state of everything committed so far (checkpoint + tail)."""
        conn = self._conn()
        with self._state_lock:
            if self._unfolded:
                self._fold_unfolded()
            if self._state is None:
                self._state = self._from_checkpoint(conn)
            try:
                fold_into(self._state, self.rows(after=self._state.seq, conn=conn))
            except BaseException:
                self._state = None  # half folded: start again from a checkpoint next time
                raise
            return self._state.copy()

    def _fold_to(self, conn: sqlite3.Connection, upto: int, new_rows: Sequence = ()) -> State:
        """The state at ``upto`` inside the write transaction; ``new_rows`` (already
        inserted, ending at ``upto``) are folded from memory when the cache reaches them."""
        with self._state_lock:
            if self._unfolded:
                self._fold_unfolded()
            base = self._state.copy() if self._state is not None else None
        if base is not None and new_rows and base.seq == new_rows[0][0] - 1:
            return fold_into(base, new_rows)
        if base is None or base.seq > upto:
            base = self._from_checkpoint(conn, upto)
        return fold_into(base, self.rows(after=base.seq, upto=upto, conn=conn))

    def _from_checkpoint(self, conn: sqlite3.Connection, upto: int | None = None) -> State:
        sql = "SELECT seq, data FROM facts WHERE type = 'checkpoint'"
        params: tuple = ()
        if upto is not None:
            sql += " AND seq <= ?"
            params = (upto,)
        # No index on type (it would tax every append); checkpoints are at most
        # checkpoint_every rows apart, so this backward scan is short.
        row = conn.execute(sql + " ORDER BY seq DESC LIMIT 1", params).fetchone()
        if row is None:
            return State()
        data = json.loads(row[1])
        if folded_by(data) != FOLD_VERSION:
            log.warning("%s: the checkpoint at seq %d was folded by other rules (version "
                        "%s, now %d); folding every row again", self.path, row[0],
                        folded_by(data), FOLD_VERSION)
            return State()
        state = State.from_dict(data["state"])
        state.seq = row[0]
        return state

    def replay(self) -> State:
        """Fold every row from the first: the slow, checkpoint-free path (for checks)."""
        return fold(self.rows(after=0))

    def verify(self, workers: int | None = 1) -> VerifyReport:
        """Recompute the hash chain from the first row; name the first bad one.

        ``workers`` > 1 (or None: by size and cores) checks it in shares on several
        processes (see ledger/verify.py)."""
        from .verify import verify_ledger  # verify builds on this module

        return verify_ledger(self.path, workers)
