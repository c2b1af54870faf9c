"""Read-side questions people ask of the ledger, answered from the SQL views."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from core.clock import day_ms

from . import schema
from .schema import VIEW_NAMES
from .store import Ledger, LedgerError, open_untouched

# data.kind of the note a backtest opens its ledger with (core/backtest.py)
BACKTEST_KIND = "backtest"
FIRST_FACT = ("SELECT type, json_extract(data, '$.kind') AS kind FROM facts "
              "ORDER BY seq LIMIT 1")
# The mode the newest service start or job run in (seq, seq] recorded: read from the end
# (job runs are many).
LAST_MODE = ("SELECT json_extract(data, '$.mode') AS mode FROM facts WHERE seq > ? AND "
             "seq <= ? AND type IN ('service', 'job_run') AND json_extract(data, '$.mode') "
             "IS NOT NULL ORDER BY seq DESC LIMIT 1")


def backtest_now(last_fact_ts: int) -> int:
    """A backtest's "now" for the read commands: just before its last fact, the window's
    end, so "today" is its last candle's day (a window ending at midnight ends the day
    before, not on the day after it)."""
    return last_fact_ts - 1


def written_by_backtest(ledger: Ledger) -> bool:
    """Does the ledger's first fact say a backtest wrote it? (False while it is empty.)"""
    rows = ledger.select(FIRST_FACT)
    return bool(rows) and rows[0]["type"] == "note" and rows[0]["kind"] == BACKTEST_KIND


def recorded_mode(path: Path) -> str | None:
    """The mode the ledger at ``path`` was written in: ``backtest``, or the mode its last
    service start or job run recorded (sim, paper, live); None if none did, or if it is
    not a ledger of ours. Read whatever its schema version (a run about to migrate it
    asks too), and without making -wal/-shm files beside it."""
    try:
        conn = open_untouched(path)
    except LedgerError:
        return None
    try:
        if conn.execute("PRAGMA application_id").fetchone()[0] != schema.APPLICATION_ID:
            return None
        if conn.execute(FIRST_FACT).fetchone() == ("note", BACKTEST_KIND):
            return BACKTEST_KIND
        last = conn.execute(LAST_MODE, (0, 2**63 - 1)).fetchone()
        return last[0] if last else None
    except sqlite3.DatabaseError:
        return None
    finally:
        conn.close()


def _since_ms(since: str) -> int:
    """YYYY-MM-DD (UTC midnight) or a full ISO timestamp ending in Z."""
    if len(since) == 10:
        try:
            return day_ms(since)
        except ValueError:
            raise ValueError(f"--since {since!r}: not a valid day; use YYYY-MM-DD") from None
    from datetime import datetime

    try:
        dt = datetime.fromisoformat(since.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {since!r}: use YYYY-MM-DD or an ISO time like "
                         "2026-01-02T03:04:05Z") from None
    if dt.tzinfo is None and not any(sep in since for sep in "T "):  # a day, as 20180105
        raise ValueError(f"--since {since!r}: not a valid day; use YYYY-MM-DD")
    if dt.tzinfo is None:
        raise ValueError(f"--since {since!r}: give the time zone (Z for UTC)")
    return int(dt.timestamp() * 1000)


def positions(ledger: Ledger) -> list[dict]:
    return ledger.select("SELECT * FROM open_positions ORDER BY opened_seq")


def trades(ledger: Ledger, since: str | None = None, symbol: str | None = None,
           limit: int | None = None) -> list[dict]:
    where, params = ["1"], []
    for flag, value in (("--since", since), ("--symbol", symbol)):
        if value is not None and not value.strip():
            raise ValueError(f"{flag} is empty; leave it out to take every trade")
    if since:
        # by when it closed on the exchange, as closed_at shows it (never after its ts)
        where.append("closed_seq IN (SELECT seq FROM facts WHERE type = 'position_closed' "
                     f"AND ts >= ? AND {schema.closed_ms()} >= ?)")
        params += [_since_ms(since)] * 2
    if symbol:
        where.append("symbol = ?")
        params.append(symbol)
    sql = f"SELECT * FROM closed_trades WHERE {' AND '.join(where)} ORDER BY closed_seq"
    rows = ledger.select(sql, params)
    return rows[-limit:] if limit else rows


def pnl(ledger: Ledger, by: str = "day") -> list[dict]:
    if by == "day":
        return ledger.select("SELECT * FROM daily_pnl")
    if by == "symbol":
        return ledger.select(
            "SELECT symbol, count(*) AS trades, sum(CAST(realized_pnl AS REAL) > 0) AS wins, "
            "round(sum(CAST(realized_pnl AS REAL)), 8) AS realized_pnl, "
            "round(sum(CAST(fees AS REAL)), 8) AS fees "
            "FROM closed_trades GROUP BY symbol ORDER BY realized_pnl DESC")
    raise ValueError(f"--by {by!r}: allowed: day | symbol")


def orders(ledger: Ledger, tail: int | None = None) -> list[dict]:
    rows = ledger.select("SELECT * FROM orders_timeline")
    return rows[-tail:] if tail else rows


def events(ledger: Ledger, tail: int = 20) -> list[dict]:
    rows = ledger.select(
        "SELECT seq, time, type, symbol, side, amount, price, pnl, client_order_id, reason "
        "FROM ledger WHERE seq > (SELECT ifnull(max(seq), 0) FROM facts) - ? ORDER BY seq",
        (tail,))
    return rows


def export(ledger: Ledger, view: str) -> list[dict]:
    if view not in VIEW_NAMES:
        raise ValueError(f"unknown view {view!r}; views: {', '.join(VIEW_NAMES)}")
    return ledger.select(f"SELECT * FROM {view}")


def job_runs(ledger: Ledger, tail: int = 50) -> list[dict]:
    return ledger.select("SELECT * FROM job_runs WHERE seq IN (SELECT seq FROM facts "
                         "WHERE type = 'job_run' ORDER BY seq DESC LIMIT ?) ORDER BY seq",
                         (tail,))
