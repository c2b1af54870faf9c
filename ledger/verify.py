"""Checking the hash chain, in shares on several cores for a large ledger.

Each link is checked against the previous row's *stored* hash (chain.check_chain), so
the chain can be checked in shares of the sequence, each starting from the stored hash
of the row before it. The work is CPU-bound (SQLite encoding each row, sha256), so the
shares run in worker processes; the first bad row of the first bad share is the answer,
exactly what one walk from the first row reports.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sqlite3
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from . import schema
from .chain import CANONICAL_SQL, COLUMNS, GENESIS, canonical, check_chain
from .store import SELECT_ROWS, LedgerError, VerifyReport, connect, migration_statements

log = logging.getLogger(__name__)

# A worker process takes ~0.2 s to start (a fresh interpreter: fork is unsafe beside
# threads); one walk checks ~400k rows a second on this machine kind. Below this many
# rows per worker, splitting costs more than it saves.
SHARE_MIN_ROWS = 250_000
MAX_WORKERS = 8
# Shares per worker: once a share is found bad, the later ones are cancelled and only
# the shares already running are waited for.
SHARES_PER_WORKER = 4

Outcome = tuple[int, int, tuple[int, str] | None]  # rows examined, last seq, (bad seq, why)


def verify_ledger(path: Path, workers: int | None = 1) -> VerifyReport:
    """Recompute the hash chain from the first row; name the first bad one.

    ``workers``: processes to share the work (None: by size and cores; 1: one walk, in
    this process). Worker processes import the caller's main module, which must keep its
    work under ``if __name__ == "__main__"``. Checks the rows up to the last one present
    when it starts; rows appended meanwhile are left to the next run.
    """
    conn = connect(path, readonly=True)
    try:
        conn.execute("BEGIN")  # one consistent snapshot while the service appends
        last = conn.execute("SELECT max(seq) FROM facts").fetchone()[0] or 0
        k = workers_for(last, usable_cpus()) if workers is None else workers
        outcome = in_shares(path, last, k) if k > 1 and last >= k else None
        if outcome is None:
            outcome = check_rows(conn, 1, last)
        altered = schema_problem(conn)
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise LedgerError(f"{path}: cannot read the ledger to verify it ({exc})") from None
    finally:
        conn.close()
    n, seen, bad = outcome
    if bad is not None:
        return VerifyReport(False, n, seen, bad[0], bad[1])
    if altered:
        return VerifyReport(False, n, seen, None, altered)
    return VerifyReport(True, n, seen)


def schema_problem(conn: sqlite3.Connection) -> str | None:
    """The first of our tables, guards (triggers), indexes and views that is not what the
    migrations made, or a trigger that is not ours: with a guard dropped or a view
    rewritten (one that hides losing trades, say) intact rows would still mislead."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    actual = dict(((kind, name), sql) for kind, name, sql in conn.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))
    expected = expected_schema(version)
    for key in sorted(expected):
        if key not in actual:
            return f"schema: {key[0]} {key[1]} is missing"
        if actual[key] != expected[key]:
            return f"schema: {key[0]} {key[1]} is not as the migrations made it"
    extra = sorted(name for kind, name in actual.keys() - expected.keys() if kind == "trigger")
    return f"schema: trigger {extra[0]} is not ours" if extra else None


def expected_schema(version: int) -> dict[tuple[str, str], str]:
    """(type, name) -> SQL of every schema object migrations 1..``version`` create."""
    mem = sqlite3.connect(":memory:")
    try:
        for script in schema.MIGRATIONS[:version]:
            for statement in migration_statements(script):
                mem.execute(statement)
        return {(kind, name): sql for kind, name, sql in mem.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")}
    finally:
        mem.close()


def usable_cpus() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def workers_for(rows: int, cpus: int) -> int:
    return max(1, min(cpus, MAX_WORKERS, rows // SHARE_MIN_ROWS))


def in_shares(path: Path, last: int, k: int) -> Outcome | None:
    """The shares' outcomes joined in sequence order; None if no worker could start."""
    n = min(k * SHARES_PER_WORKER, last)
    pool = None
    try:
        pool = ProcessPoolExecutor(k, mp_context=multiprocessing.get_context("spawn"))
        futures = [pool.submit(check_share, str(path), i * last // n + 1, (i + 1) * last // n)
                   for i in range(n)]
        rows = 0
        for future in futures:
            m, seen, bad = future.result()
            rows += m
            if bad is not None:
                return rows, seen, bad
        return rows, last, None
    except (OSError, BrokenProcessPool) as exc:  # starting them, not what they found
        log.warning("%s: cannot verify in %d processes (%s); checking in one", path, k, exc)
        return None
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def check_share(path: str, first: int, last: int) -> Outcome:
    """A worker's share: rows ``first``..``last`` of the ledger at ``path``."""
    conn = connect(Path(path), readonly=True)
    try:
        conn.execute("BEGIN")
        return check_rows(conn, first, last)
    finally:
        conn.close()


def check_rows(conn: sqlite3.Connection, first: int, last: int) -> Outcome:
    """check_chain over the rows up to ``last`` from ``first`` (from the very first row,
    whatever its seq, when ``first`` is 1: a forged row before seq 1 is a gap too)."""
    prev = GENESIS
    if first > 1:
        row = conn.execute("SELECT hash FROM facts WHERE seq = ?", (first - 1,)).fetchone()
        if row is None or type(row[0]) is not bytes:
            # Never the answer: the share before names that row first.
            return 0, first - 1, (first - 1, "the row before this share is missing or bad")
        prev = row[0]
    lowest = -2**63 if first == 1 else first
    rows = conn.execute(f"SELECT seq, hash, {CANONICAL_SQL} FROM facts "
                        "WHERE seq BETWEEN ? AND ? ORDER BY seq", (lowest, last))
    try:
        n, seen, bad = check_chain(rows, prev, first,
                                   recheck=lambda seq: _python_canonical(conn, seq))
    except sqlite3.OperationalError:
        # SQLite cannot encode a value the ledger never writes (a BLOB planted in a text
        # column): walk again in Python, where such a row fails its hash and is named.
        n, seen, bad = check_chain(_python_rows(conn, lowest, last), prev, first)
    if bad is None and seen < last:  # rows missing at the share's end: a gap
        found = conn.execute("SELECT min(seq) FROM facts WHERE seq > ?", (seen,)).fetchone()[0]
        return n + 1, found, (found, f"sequence gap: expected {seen + 1}, found {found}")
    return n, seen, bad


def _python_canonical(conn: sqlite3.Connection, seq: int) -> bytes:
    return canonical(conn.execute(f"{SELECT_ROWS} WHERE seq = ?", (seq,)).fetchone())


def _python_rows(conn: sqlite3.Connection, lowest: int, last: int):
    """(seq, hash, canonical bytes) in Python; empty bytes for a row that cannot be
    encoded, which then fails its hash."""
    for row in conn.execute(f"SELECT hash, {', '.join(COLUMNS)} FROM facts "
                            "WHERE seq BETWEEN ? AND ? ORDER BY seq", (lowest, last)):
        try:
            body = canonical(row[1:])
        except (TypeError, ValueError):
            body = b""
        yield row[1], row[0], body
