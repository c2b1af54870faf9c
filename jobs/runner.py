"""Running one job once, and recording that it ran (start, end, outcome, duration, error).

A job is a plain function ``job(rt, scheduled_ms, run_id) -> dict`` (its summary).
The runner never lets an exception escape: the service stays up, the error is recorded.
"""

from __future__ import annotations

import logging
import time
import traceback

from core.exchange import IpBanned
from ledger import Fact

log = logging.getLogger(__name__)


def run_job(rt, name: str, job, scheduled_ms: int | None = None) -> dict:
    started = rt.clock.now_ms()
    scheduled = started if scheduled_ms is None else scheduled_ms
    run_id = f"{name}-{started}"
    t0 = time.monotonic()
    outcome, error, summary = "ok", None, {}
    try:
        summary = job(rt, scheduled, run_id) or {}
        if summary.get("skipped"):
            outcome = "skipped"
        elif summary.get("degraded"):  # ran, without what it needs to do all of its work
            outcome = "degraded"
    except Exception as exc:  # noqa: BLE001 - recorded, logged, and the service goes on
        outcome = "error"
        error = f"{type(exc).__name__}: {exc}"
        partial = getattr(exc, "partial_summary", None)  # a job that failed only in part
        summary = partial if isinstance(partial, dict) else {}
        if isinstance(exc, IpBanned):  # every job fails so until the ban ends: no traceback
            log.warning("job %s failed: %s", name, error)
        else:
            log.error("job %s failed: %s\n%s", name, error, traceback.format_exc(limit=6))
    duration_ms = round((time.monotonic() - t0) * 1000, 3)
    record = {"job": name, "scheduled_ms": scheduled, "started_ms": started,
              "finished_ms": rt.clock.now_ms(), "duration_ms": duration_ms,
              "outcome": outcome, "summary": summary,
              "mode": rt.config.bot.mode}  # the account it ran on (runtime.check_ledger_mode)
    try:
        rt.ledger.append([Fact("job_run", rt.clock.now_ms(), run_id=run_id,
                               reason=error or summary.get("reason"), data=record)])
    except Exception as exc:  # noqa: BLE001 - e.g. disk full: log, keep the process alive
        log.error("job %s: run record not written: %s", name, exc)
    log.info("job %s %s in %.1f ms %s", name, outcome, duration_ms,
             {k: v for k, v in summary.items() if k != "details"} if summary else "")
    return record


def record_not_run(rt, name: str, scheduled_ms: int, outcome: str, reason: str) -> None:
    """A run the scheduler missed or dropped, recorded with its reason."""
    now = rt.clock.now_ms()
    try:
        rt.ledger.append([Fact("job_run", now, run_id=f"{name}-{now}", reason=reason,
                               data={"job": name, "scheduled_ms": scheduled_ms,
                                     "started_ms": None, "finished_ms": None,
                                     "duration_ms": 0, "outcome": outcome, "summary": {}})])
    except Exception as exc:  # noqa: BLE001
        log.error("job %s: %s record not written: %s", name, outcome, exc)
    log.warning("job %s %s: %s", name, outcome, reason)
