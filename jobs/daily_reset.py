"""Daily reset: close every UTC day that has ended and is not yet closed.

For each such day it records realized PnL, fees, trades and the closing equity, and
lifts the daily-loss halt. Run at 00:00 UTC, and at start to catch up the days that
ended while the bot was down (APScheduler forgets missed runs; the ledger does not).
A scan that comes first after midnight closes the day itself (with its balance), so
today's loss is never measured from the day before's start.
"""

from __future__ import annotations

import logging
from decimal import Decimal

from core.clock import DAY_MS, day_ms, day_start_ms, utc_day
from core.execution import READ_ERRORS, Executor
from ledger import Fact
from ledger.schema import CLOSE_DAY

log = logging.getLogger(__name__)


def days_to_close(last_closed: str | None, first_fact_ms: int | None, now_ms: int) -> list[str]:
    """The ended UTC days after ``last_closed`` (or since the first fact), oldest first."""
    today = day_start_ms(now_ms)
    if last_closed is not None:
        start = day_ms(last_closed) + DAY_MS
    elif first_fact_ms is not None:
        start = day_start_ms(first_fact_ms)
    else:
        return []
    return [utc_day(ms) for ms in range(start, today, DAY_MS)]


def run(rt, scheduled_ms: int, run_id: str) -> dict:
    # Under the lock the scan decides in: a scan that measured today's loss against the
    # day that just ended must not record its halt after that day's close (nothing would
    # lift it).
    with rt.lock:
        if rt.stopping.is_set():  # asked to stop while waiting: the next start catches up
            return {"skipped": True, "reason": "the service is stopping"}
        return close_days(rt, run_id)


def close_days(rt, run_id: str, balance=None, ex: Executor | None = None) -> dict:
    now = rt.clock.now_ms()
    days = days_to_close(rt.ledger.state().last_day_closed, rt.ledger.first_ts(), now)
    if not days:
        return {"skipped": True, "reason": "no ended day left to close"}
    # A stop that fired before midnight counts on the day it fired if recorded before that
    # day closes: a scan sees it only at its symbol's next candle close, after midnight.
    try:
        (ex or Executor(rt.ledger, rt.client, rt.clock, rt.config, run_id, rt.lock)
         ).record_fired_stops()
    except READ_ERRORS as exc:  # it counts on the day it is recorded, then
        log.warning("daily reset: stops not looked up (%s)", exc)
    state = rt.ledger.state()
    # fetch: the balance now is the equity at the close of the day that just ended
    try:
        equity_now = (balance or rt.client.balance()).equity
    except Exception as exc:  # noqa: BLE001 - fall back to the last snapshot, say so
        log.warning("daily reset: balance unavailable (%s); using the last snapshot", exc)
        equity_now = None
    facts = []
    for day in days:
        start, end = day_ms(day), day_ms(day) + DAY_MS
        # By the day each close counts on: a stop that fired before midnight while the
        # bot was down is recorded after it (a start reconciles first).
        totals = rt.ledger.select(
            "SELECT count(*) AS trades, group_concat(pnl, ' ') AS pnls, "
            "group_concat(fee, ' ') AS fees FROM facts "
            f"WHERE seq > ? AND type = 'position_closed' AND {CLOSE_DAY} = ?",
            (rt.seq_floor(start), day))[0]
        realized = sum((Decimal(x) for x in (totals["pnls"] or "").split()), Decimal(0))
        fees = sum((Decimal(x) for x in (totals["fees"] or "").split()), Decimal(0))
        if day != days[-1]:  # ended while the bot was down: its last snapshot
            equity = _last_equity_before(rt.ledger, end)
        else:  # the equity now starts the new day; the last one known if unreadable
            equity = equity_now if equity_now is not None else state.equity
        facts.append(Fact("day_close", now, run_id=run_id, pnl=realized, fee=fees,
                          data={"day": day, "realized_pnl": realized, "fees": fees,
                                "trades": totals["trades"], "equity": equity}))
    lifted = "daily_loss" in state.halts
    if lifted:
        facts.append(Fact("resume", now, run_id=run_id, reason="daily reset: new UTC day",
                          data={"kind": "daily_loss"}))
    # record
    rt.ledger.append(facts)
    log.info("daily reset: closed %s%s", ", ".join(days),
             "; daily-loss halt lifted" if lifted else "")
    return {"closed_days": days, "halt_lifted": lifted}


def _last_equity_before(ledger, ms: int) -> str | None:
    rows = ledger.select("SELECT json_extract(data, '$.equity') AS equity FROM facts "
                         "WHERE type = 'balance' AND ts < ? ORDER BY seq DESC LIMIT 1", (ms,))
    return rows[0]["equity"] if rows else None
