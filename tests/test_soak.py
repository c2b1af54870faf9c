"""Soak: the real service runs 24 simulated hours (accelerated) with ~5 % of exchange
calls failing, across every non-crash fault kind. It must not crash, log no unhandled
exception, stop cleanly, and its ledger must account for every scheduled run of every job.

Tracebacks: the job runner catches a failing job, records it (a ``job_run`` fact with
outcome ``error``) and logs "job NAME failed: ..." with the traceback, so a person can
fix the cause while the service keeps going. Those are handled, recorded errors; every
other traceback (a thread that died, a listener that raised, APScheduler's "Job raised
an exception") is an unhandled one and fails the test. The recorded errors are counted
and printed; they must match the log one for one.
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter, defaultdict

import pytest
from service_helpers import Bot, job_runs, log_text, service_events, write_toml

pytestmark = pytest.mark.slow

HOURS = 24
SPEED = 900.0  # 24 bot-hours in 96 s
SCHEDULE = {"scan_interval_s": 60, "reconcile_interval_s": 300, "rotate_interval_h": 3.0}
FAULTS = {  # per call, ~5 % in all for each kind of call
    "network_error": 0.01, "server_error": 0.01, "rate_limit": 0.01,
    "timeout_after_accept": 0.01, "clock_skew": 0.01, "insufficient_funds": 0.005,
    "reject": 0.005, "forming_candle": 0.005, "bad_candles": 0.005,
}
INTERVAL_MS = {"scan": SCHEDULE["scan_interval_s"] * 1000,
               "reconcile": SCHEDULE["reconcile_interval_s"] * 1000,
               "daily_reset": 300_000,  # sim mode: the daily reset polls every 5 bot-minutes
               "rotate": int(SCHEDULE["rotate_interval_h"] * 3_600_000)}
ERROR_LOG = re.compile(r"ERROR +jobs\.runner: job (\w+) failed: ")


def test_a_simulated_day_with_faults_runs_every_job_and_never_crashes(tmp_path):
    write_toml(tmp_path, {"schedule": SCHEDULE, "sim": {"speed": SPEED, "seed": 3},
                          "faults": FAULTS})
    bot = Bot(tmp_path)
    t0 = time.monotonic()
    bot.start()
    try:
        first = bot.wait_for("the start", lambda: bot.query(
            "SELECT ts FROM facts WHERE type = 'service' ORDER BY seq LIMIT 1"), timeout=60)
        start_ms = first[0]["ts"]
        end_ms = start_ms + HOURS * 3_600_000
        bot.wait_for(f"{HOURS} simulated hours", lambda: bot.query(
            "SELECT 1 FROM facts WHERE ts >= ? LIMIT 1", (end_ms,)), timeout=300, poll=1.0)
        code = bot.stop(signal.SIGTERM, timeout=60)
    finally:
        bot.kill()
    real_s = time.monotonic() - t0
    console = bot.console()
    assert code == 0, console[-3000:]
    assert [e["event"] for e in service_events(bot)] == ["started", "stopped"]  # no crash

    # Unhandled exceptions: every traceback belongs to a recorded job error.
    logged = log_text(tmp_path)
    recorded_errors = [r for r in job_runs(bot) if r["outcome"] == "error"]
    failed_lines = ERROR_LOG.findall(logged)
    assert len(failed_lines) == len(recorded_errors)
    assert logged.count("Traceback") == len(failed_lines), \
        [b[:300] for b in logged.split("Traceback")[1:]]
    assert "Job \"" not in logged  # APScheduler's own "Job ... raised an exception"

    # Coverage: each job's records (ran, or skipped / missed / failed with the reason)
    # leave no scheduled instant unaccounted for. Each record names the fire time it
    # stands for (a run not run: estimated from how late it was, to the nearest fire), so
    # no gap between consecutive records may be longer than 2 intervals, and the number
    # of records must match the number of fire times from the first one to the stop.
    stop_ms = bot.query("SELECT ts FROM facts WHERE type = 'service' ORDER BY seq DESC "
                        "LIMIT 1")[0]["ts"]
    by_job = defaultdict(list)
    outcomes = Counter()
    for r in job_runs(bot):
        by_job[r["job"]].append(r["scheduled_ms"])
        outcomes[(r["job"], r["outcome"])] += 1
        if r["outcome"] in ("skipped", "missed", "error"):
            assert r["reason"], r  # every run that did not run says why
    worst = {}
    for job, interval in INTERVAL_MS.items():
        times = [*sorted(by_job[job]), stop_ms]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        worst[job] = round(max(gaps) / interval, 2)
        assert worst[job] <= 2.0, (job, worst[job])
        due = (stop_ms - times[0]) / interval + (job == "rotate")  # + the start-up rotation
        assert abs(len(times) - 1 - due) <= 2 + 0.01 * due, (job, len(times) - 1, due)
    assert outcomes[("scan", "ok")] > 0.8 * HOURS * 60
    assert outcomes[("rotate", "ok")] >= HOURS / 3
    day_closes = bot.query("SELECT count(*) AS n FROM facts WHERE type = 'day_close'")[0]["n"]
    assert day_closes >= 1  # 24 h always cross a UTC midnight

    facts = {r["type"]: r["n"] for r in bot.query(
        "SELECT type, count(*) AS n FROM facts GROUP BY type")}
    assert bot.cli("verify").returncode == 0
    print(f"\nsoak: {HOURS} h in {real_s:.0f} s real; worst gap / interval {worst}; "
          f"runs {dict(outcomes)}; recorded job errors {len(recorded_errors)}; "
          f"entries {facts.get('position_opened', 0)}, exits {facts.get('position_closed', 0)}"
          f", intents {facts.get('order_intent', 0)}")
