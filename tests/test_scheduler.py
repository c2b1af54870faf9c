"""The service's wiring (scheduler.py): triggers as pure functions, start-up order, the
records of runs that did not run, the ledger lock, and a real scheduler run in-process.

Real pieces: APScheduler's own triggers and events, a Ledger on a tmp file, the
simulated exchange in memory. The process-level behaviour (signals, a second instance,
`cli.py run` with no config) is in test_service_process.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    EVENT_JOB_SUBMITTED,
    JobExecutionEvent,
    JobSubmissionEvent,
)
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

import scheduler
from core import runtime
from core.clock import (
    DAY_MS,
    AcceleratedClock,
    VirtualClock,
    WallClock,
    day_start_ms,
    utc_day,
)
from core.config import Config
from core.sim_exchange import SimExchange
from core.venues import quiet_open_orders
from ledger import Fact, Ledger
from ledger.lock import AlreadyRunning, LedgerLock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = 1_767_268_800_000  # 2026-01-01T12:00:00Z
PAPER = Config().with_values(bot={"mode": "paper"})  # wall clock: no acceleration


def at(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


# -- triggers (pure) ----------------------------------------------------------------------


def test_interval_jobs_fire_at_their_configured_intervals():
    plan = scheduler.schedules(PAPER)
    prev, now = at(2026, 1, 1, 12), at(2026, 1, 1, 12, 0, 1)
    assert plan["scan"].trigger.get_next_fire_time(prev, now) == prev + timedelta(seconds=10)
    assert plan["rotate"].trigger.get_next_fire_time(prev, now) == prev + timedelta(hours=3)
    assert plan["reconcile"].trigger.get_next_fire_time(prev, now) == prev + timedelta(minutes=5)
    custom = scheduler.schedules(PAPER.with_values(schedule={
        "scan_interval_s": 30, "rotate_interval_h": 0.5, "reconcile_interval_s": 60}))
    assert custom["scan"].trigger.get_next_fire_time(prev, now) == prev + timedelta(seconds=30)
    assert custom["rotate"].trigger.get_next_fire_time(prev, now) == prev + timedelta(minutes=30)
    assert custom["reconcile"].trigger.get_next_fire_time(prev, now) == \
        prev + timedelta(minutes=1)
    assert custom["scan"].interval_ms == 30_000
    assert custom["reconcile"].interval_ms == 60_000


@pytest.mark.parametrize("now", [at(2026, 1, 1, 12), at(2026, 3, 8, 6, 30),  # US DST starts
                                 at(2026, 3, 29, 0, 30),  # EU DST starts
                                 at(2026, 11, 1, 5, 59), at(2026, 12, 31, 23, 59, 59)])
def test_daily_reset_runs_at_midnight_utc_and_every_quarter_hour_after(now):
    # Idempotent, so it polls: a failed midnight run, or a start just before midnight,
    # no longer leaves the day unclosed (and the daily loss limit on a stale start) for 24 h.
    plan = scheduler.schedules(PAPER)["daily_reset"]
    assert isinstance(plan.trigger, CronTrigger)
    assert str(plan.trigger.timezone) == "UTC"
    fire = plan.trigger.get_next_fire_time(None, now)
    assert fire.utcoffset() == timedelta(0)
    assert fire.minute % 15 == 0 and fire.second == 0
    assert timedelta(0) <= fire - now <= timedelta(minutes=15)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(),
                                tzinfo=UTC)
    assert plan.trigger.get_next_fire_time(None, midnight - timedelta(seconds=1)) == midnight
    assert plan.misfire_grace_s >= 600  # a late wake-up still closes the day


def test_daily_cron_ignores_the_host_timezone():
    """Under TZ=America/New_York the cron still fires at 00:00 UTC; a bare CronTrigger
    (the Freqtrade bug) would fire at 05:00 UTC: the check can tell them apart."""
    code = """
import time, sys
from datetime import datetime
from zoneinfo import ZoneInfo
time.tzset()
import scheduler
from apscheduler.triggers.cron import CronTrigger
from core.config import Config
ny = ZoneInfo("America/New_York")
trig = scheduler.schedules(Config().with_values(bot={"mode": "paper"}))["daily_reset"].trigger
for now in (datetime(2026, 1, 15, 12, tzinfo=ny), datetime(2026, 7, 15, 21, tzinfo=ny)):
    t, fires = now, []
    for _ in range(96):  # a day of fires: one at 00:00 UTC
        t = trig.get_next_fire_time(None, t)
        fires.append(t.astimezone(ZoneInfo("UTC")).strftime("%H:%M"))
        t = t.replace(second=1)
    print(min(fires))
print(CronTrigger(hour=0, minute=0).get_next_fire_time(None, datetime(2026, 1, 15, 12, tzinfo=ny))
      .astimezone(ZoneInfo("UTC")).strftime("%H:%M"))
"""
    env = {**os.environ, "TZ": "America/New_York", "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["00:00", "00:00", "05:00"]


def test_sim_mode_runs_every_interval_faster_by_the_speed():
    cfg = Config().with_values(sim={"speed": 60.0})
    plan = scheduler.schedules(cfg)
    prev, now = at(2026, 1, 1, 12), at(2026, 1, 1, 12)
    assert plan["scan"].trigger.get_next_fire_time(prev, now) == \
        prev + timedelta(seconds=10 / 60)
    assert plan["rotate"].trigger.get_next_fire_time(prev, now) == prev + timedelta(minutes=3)
    assert plan["reconcile"].trigger.get_next_fire_time(prev, now) == prev + timedelta(seconds=5)
    # The sim's clock is not the wall clock: the daily reset polls every 5 bot-minutes.
    daily = plan["daily_reset"]
    assert isinstance(daily.trigger, IntervalTrigger)
    assert daily.trigger.get_next_fire_time(prev, now) == prev + timedelta(seconds=5)
    assert daily.interval_ms == 300_000
    # Intervals in the ledger stay in bot time.
    assert plan["scan"].interval_ms == 10_000
    assert plan["rotate"].interval_ms == 3 * 3_600_000


def test_misfire_grace_suits_each_job():
    plan = scheduler.schedules(PAPER)
    assert plan["scan"].misfire_grace_s == 10  # a scan later than one interval is pointless
    assert plan["reconcile"].misfire_grace_s == 300
    assert plan["rotate"].misfire_grace_s == 3 * 3600
    assert plan["daily_reset"].misfire_grace_s == 900
    fast = scheduler.schedules(Config().with_values(sim={"speed": 1000.0}))
    assert all(p.misfire_grace_s >= 1.0 for p in fast.values())


def test_a_late_wake_up_always_runs_one_reconcile_and_one_rotation():
    """After a pause APScheduler coalesces the runs due into the last one and drops it if
    that is later than the grace: with a grace of an interval it never is, wherever in
    an interval the pause ends."""
    plan = scheduler.schedules(PAPER)
    for name in ("reconcile", "rotate"):
        trigger, grace = plan[name].trigger, plan[name].misfire_grace_s
        first = trigger.get_next_fire_time(None, at(2026, 1, 1, 12))
        interval = trigger.interval.total_seconds()
        for k in range(200):  # pauses ending all over the next ten intervals
            wake = first + timedelta(seconds=interval * 10 * k / 200 + 0.5)
            due, t = [], first
            while t <= wake:
                due.append(t)
                t = trigger.get_next_fire_time(t, t + timedelta(microseconds=1))
            assert (wake - due[-1]).total_seconds() <= grace, (name, k)


def test_the_systemd_unit_lets_a_stop_finish_and_does_not_restart_a_refusal():
    import configparser

    import cli

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(os.path.join(REPO, "deploy", "ledgerbot.service"))
    service = unit["Service"]
    worst_stop = scheduler.SHUTDOWN_GRACE_S + scheduler.FORCE_EXIT_LOCK_WAIT_S
    assert int(service["TimeoutStopSec"]) > worst_stop  # not SIGKILLed inside an order
    assert service["Restart"] == "on-failure"  # a forced exit (1) or a crash: restarted
    assert str(cli.Refused.exit_code) in service["RestartPreventExitStatus"].split()


def test_fire_times_between_two_runs_are_the_runs_coalescing_merged():
    plan = scheduler.schedules(PAPER)
    t = at(2026, 1, 1, 12)
    scan = plan["scan"].trigger
    assert scheduler.fire_times_between(scan, t, t + timedelta(seconds=10)) == []
    assert scheduler.fire_times_between(scan, t, t + timedelta(seconds=40)) == [
        t + timedelta(seconds=s) for s in (10, 20, 30)]
    assert len(scheduler.fire_times_between(scan, t, t + timedelta(days=1))) == 101  # capped
    daily = plan["daily_reset"].trigger
    assert scheduler.fire_times_between(daily, at(2026, 1, 1), at(2026, 1, 1, 1)) == [
        at(2026, 1, 1, 0, 15), at(2026, 1, 1, 0, 30), at(2026, 1, 1, 0, 45)]


def test_slot_is_the_nominal_instant_of_a_run():
    assert scheduler.slot(T0 + 7_345, 10_000) == T0
    assert scheduler.slot(T0 + 10_000, 10_000) == T0 + 10_000
    assert scheduler.slot(T0 + 7_345, None) == T0 + 7_345
    assert scheduler.slot(T0 + 7_345, 10_000, anchor_ms=T0 + 5_000) == T0 + 5_000
    assert scheduler.slot(T0 + 4_999, 10_000, anchor_ms=T0 + 5_000) == T0 - 5_000
    # an estimated fire time (a run not run, dated back from the wall clock): the nearest
    assert scheduler.slot(T0 + 4_999, 10_000, nearest=True) == T0
    assert scheduler.slot(T0 + 5_000, 10_000, nearest=True) == T0 + 10_000
    # a trigger firing every 9,999.5 ms: its first fire, read off a clock in whole ms
    assert scheduler.slot(T0 + 9_999, 10_000, T0, 9_999.5) == T0 + 10_000


def test_in_sim_mode_runs_keep_their_fire_times_over_many_fires(tmp_path):
    """At speed 700 the 3 h rotation is a wall period of 15.4285714 s, which the trigger
    rounds to the microsecond, down: each fire comes 0.3 bot-ms before its nominal
    instant. Counted by the nominal interval, from the 500th fire or so (the margin being
    the anchor's read and the run's latency) a rotation took the previous one's label and
    was skipped as done; a scan's, from its 1,750th."""
    rt = make_rt(tmp_path, VirtualClock(T0 + 17_000), bot={"mode": "sim"},
                 sim={"speed": 700.0})
    try:
        svc = scheduler.Service(rt)
        for name in ("rotate", "scan"):
            plan = svc.plan[name]
            period_ms = plan.trigger.interval.total_seconds() * 1000 * 700
            assert period_ms != plan.interval_ms  # rounded: not the nominal interval
            for k in (1, 2, 499, 500, 1_750, 100_000):
                fired = svc.anchor_ms + int(k * period_ms)  # the bot clock as it fires
                label = svc.anchor_ms + k * plan.interval_ms
                assert svc.slot(name, fired) == label, (name, k)
                assert svc.slot(name, fired + int(period_ms) - 2) == label, (name, k)  # late
                # a run not run, dated back from the wall clock, off by a few bot-ms
                for off in (-700, 700):
                    assert svc.slot(name, fired + off, nearest=True) == label, (name, k, off)
    finally:
        rt.close()


# -- the service in-process -----------------------------------------------------------------


def make_rt(tmp_path, clock=None, **sections):
    sections["sim"] = {"symbols": 4, **sections.get("sim", {})}
    cfg = Config().with_values(**sections)
    clock = clock or VirtualClock(T0)
    venue = SimExchange.from_config(cfg, clock, origin_ms=day_start_ms(T0) - 6 * DAY_MS)
    quiet_open_orders(venue)
    data = [venue] * 3 if cfg.sim.latency_ms else []
    return runtime.build(cfg, tmp_path / "bot.db", clock=clock, venue=venue, data_venues=data)


def runs(ledger) -> list[dict]:
    return ledger.select(
        "SELECT seq, ts, reason, json_extract(data, '$.job') AS job, "
        "json_extract(data, '$.outcome') AS outcome, "
        "json_extract(data, '$.scheduled_ms') AS scheduled_ms "
        "FROM facts WHERE type = 'job_run' ORDER BY seq")


def test_jobs_are_installed_with_coalescing_one_instance_and_a_grace(tmp_path):
    rt = make_rt(tmp_path, bot={"mode": "sim"})
    try:
        svc = scheduler.Service(rt)
        svc.install()
        jobs = {j.id: j for j in svc.scheduler.get_jobs()}
        assert set(jobs) == {"scan", "rotate", "daily_reset", "reconcile"}
        for name, job in jobs.items():
            assert job.coalesce is True
            assert job.max_instances == 1
            assert job.misfire_grace_time >= svc.plan[name].misfire_grace_s
        assert str(svc.scheduler.timezone) == "UTC"
    finally:
        rt.close()


@contextmanager
def started_while_the_exchange_was_down(tmp_path):
    """A new bot whose start-up rotation failed: (runtime, service, clock), no coin."""
    clock = VirtualClock(T0)
    rt = make_rt(tmp_path, clock, exchange={"read_retries": 0})
    try:
        svc = scheduler.Service(rt)
        rt.venue.faults.script([("fetch_tickers", "server_error")])
        svc.startup()
        assert runs(rt.ledger)[-1]["job"] == "rotate" and not rt.ledger.state().active_coins
        yield rt, svc, clock
    finally:
        rt.close()


def test_a_new_bot_whose_first_rotation_failed_retries_it_within_a_minute(tmp_path):
    # The exchange was down at the first start: no coin, and the next rotation hours off.
    with started_while_the_exchange_was_down(tmp_path) as (rt, svc, clock):
        clock.advance(10_000)
        svc.job("scan")  # too soon: the exchange is not asked again every 10 s
        assert [r["job"] for r in runs(rt.ledger)[-1:]] == ["scan"]
        clock.advance(60_000)
        svc.job("scan")
        assert [r["job"] for r in runs(rt.ledger)[-2:]] == ["scan", "rotate"]
        assert rt.ledger.state().active_coins
        clock.advance(60_000)
        before = len(runs(rt.ledger))
        svc.job("scan")  # coins known: no more rotations than the schedule's
        assert [r["job"] for r in runs(rt.ledger)[before:]] == ["scan"]


def test_a_scheduled_rotation_and_a_scans_retry_at_once_rotate_once(tmp_path):
    # The scheduled rotation's tickers answer slowly; meanwhile a scan retries the failed
    # rotation (no coin active) for the same slot. One rotation is recorded, not two.
    with started_while_the_exchange_was_down(tmp_path) as (rt, svc, clock):
        clock.advance(3 * 3_600_000)  # the next rotation's slot, and the retry's
        answer, inside, go = rt.venue.fetch_tickers, threading.Event(), threading.Event()

        def slow_once(*a, **kw):
            if not inside.is_set():
                inside.set()
                go.wait(10)
            return answer(*a, **kw)

        rt.venue.fetch_tickers = slow_once
        scheduled = threading.Thread(target=svc.job, args=("rotate",))
        scheduled.start()
        assert inside.wait(10)
        threading.Timer(0.5, go.set).start()  # the answer comes while the scan has begun:
        svc.job("scan")  # its retry read "not rotated yet" too, then waits for the client
        scheduled.join(10)
        rotations = rt.ledger.select("SELECT data FROM facts WHERE type = 'rotation'")
        assert len(rotations) == 1
        # whichever records first: one rotates, the other finds it done
        assert sorted(r["outcome"] for r in runs(rt.ledger) if r["job"] == "rotate")[-2:] \
            == ["ok", "skipped"]


def test_a_rotation_run_late_does_not_take_the_next_ones_slot(tmp_path):
    """The interval trigger fires every 3 h from the service's start (12:17 here). Labelled
    by epoch-aligned slots, the 15:17 rotation run at 18:05 (a paused scheduler, within its
    grace of an interval) took the 18:00 slot, and the 18:17 rotation found it done:
    skipped, the coins left 6 h old."""
    clock = VirtualClock(T0 + 17 * 60_000)
    rt = make_rt(tmp_path, clock)
    try:
        svc = scheduler.Service(rt)
        svc.startup()
        svc.install()
        clock.advance(5 * 3_600_000 + 48 * 60_000)  # 18:05
        svc.job("rotate")
        clock.set(T0 + 6 * 3_600_000 + 17 * 60_000)  # 18:17, the next fire time
        svc.job("rotate")
        rotations = [r for r in runs(rt.ledger) if r["job"] == "rotate"]
        assert [r["outcome"] for r in rotations] == ["ok", "ok", "ok"]
        assert [r["scheduled_ms"] - T0 for r in rotations[1:]] == [
            (3 * 60 + 17) * 60_000, (6 * 60 + 17) * 60_000]
    finally:
        rt.close()


def test_startup_reconciles_first_catches_up_closed_days_and_rotates(tmp_path):
    clock = VirtualClock(T0)
    rt = make_rt(tmp_path, clock)
    try:
        # The bot last ran three days ago, then was down.
        rt.ledger.append([Fact("note", T0 - 3 * DAY_MS, reason="last run before the outage")])
        scheduler.Service(rt).startup()
        done = runs(rt.ledger)
        assert [r["job"] for r in done] == ["reconcile", "daily_reset", "rotate"]
        assert all(r["outcome"] == "ok" for r in done)
        closed = [r["day"] for r in rt.ledger.select(
            "SELECT json_extract(data, '$.day') AS day FROM facts WHERE type = 'day_close' "
            "ORDER BY seq")]
        assert closed == [utc_day(T0 - k * DAY_MS) for k in (3, 2, 1)]
        assert rt.ledger.state().active_coins
        service = rt.ledger.select("SELECT data FROM facts WHERE type = 'service'")
        assert '"event":"started"' in service[0]["data"]

        # A restart the same day: nothing to catch up, coins are known, no rotation.
        clock.advance(60_000)
        scheduler.Service(rt).startup()
        again = runs(rt.ledger)[len(done):]
        assert [(r["job"], r["outcome"]) for r in again] == [("reconcile", "ok"),
                                                             ("daily_reset", "skipped")]
        # Midnight passed while down: exactly that day is closed at the next start, and
        # the coins, rotated more than an interval ago, are rotated again (a bot restarted
        # more often than the interval trigger's period would otherwise never rotate).
        clock.set(day_start_ms(T0) + DAY_MS + 5_000)
        before = len(runs(rt.ledger))
        scheduler.Service(rt).startup()
        assert rt.ledger.state().last_day_closed == utc_day(T0)
        assert [r["job"] for r in runs(rt.ledger)[before:]] == ["reconcile", "daily_reset",
                                                                "rotate"]
        assert rt.ledger.state().last_rotation["ts"] == clock.now_ms()
    finally:
        rt.close()


def test_runs_not_run_are_recorded_with_their_reason_and_bot_time(tmp_path):
    clock = VirtualClock(T0)
    rt = make_rt(tmp_path, clock, sim={"speed": 60.0})
    try:
        svc = scheduler.Service(rt)
        wall_now = datetime.fromtimestamp(WallClock().now_ms() / 1000, tz=UTC)
        two_s_late = wall_now - timedelta(seconds=2)
        svc.on_not_run(JobExecutionEvent(EVENT_JOB_MISSED, "scan", "default", two_s_late))
        svc.on_not_run(JobSubmissionEvent(EVENT_JOB_MAX_INSTANCES, "reconcile", "default",
                                          [wall_now]))
        svc.on_not_run(JobExecutionEvent(EVENT_JOB_ERROR, "rotate", "default", wall_now,
                                         exception=RuntimeError("boom")))
        # Runs merged away (the scheduler itself was late) are counted from the trigger.
        interval = timedelta(seconds=10 / 60)
        svc.on_event(JobSubmissionEvent(EVENT_JOB_SUBMITTED, "scan", "default",
                                        [wall_now - 3 * interval]))
        svc.on_event(JobSubmissionEvent(EVENT_JOB_SUBMITTED, "scan", "default", [wall_now]))
        missed, skipped, failed, merged, merged2 = runs(rt.ledger)
        assert (missed["job"], missed["outcome"]) == ("scan", "missed")
        assert "misfire grace" in missed["reason"]
        # 2 wall seconds late at speed 60 is ~2 bot-minutes before now, on a 10 s slot.
        assert T0 - 130_000 <= missed["scheduled_ms"] <= T0 - 110_000
        assert missed["scheduled_ms"] % 10_000 == 0
        assert (skipped["job"], skipped["outcome"]) == ("reconcile", "skipped")
        assert "max_instances" in skipped["reason"]
        assert (failed["job"], failed["outcome"]) == ("rotate", "error")
        assert "RuntimeError: boom" in failed["reason"]
        assert [(r["job"], r["outcome"]) for r in (merged, merged2)] == [("scan", "skipped")] * 2
        assert "coalesced" in merged["reason"]
        assert T0 - 40_000 <= merged["scheduled_ms"] <= merged2["scheduled_ms"] <= T0
    finally:
        rt.close()


def test_a_real_scheduler_runs_the_jobs_records_overruns_and_stops_cleanly(tmp_path):
    """Scans every 50 ms against a venue that answers in 150 ms: runs overlap, and each
    one APScheduler drops is recorded as skipped. A stop lets the running job finish."""
    clock = AcceleratedClock(T0, 200.0)
    rt = make_rt(tmp_path, clock, sim={"speed": 200.0, "latency_ms": 150.0})
    svc = scheduler.Service(rt)
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(svc.run()))
    try:
        thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            outcomes = {(r["job"], r["outcome"]) for r in runs(rt.ledger)}
            if {("scan", "ok"), ("scan", "skipped")} <= outcomes:
                break
            time.sleep(0.1)
        svc.request_stop()
        thread.join(30)
        assert not thread.is_alive() and code == [0]
        done = runs(rt.ledger)
        kinds = {(r["job"], r["outcome"]) for r in done}
        assert {("reconcile", "ok"), ("rotate", "ok"), ("scan", "ok"), ("scan", "skipped")} \
            <= kinds
        last = rt.ledger.select("SELECT seq, data FROM facts ORDER BY seq DESC LIMIT 1")[0]
        assert '"event":"stopped"' in last["data"]
        assert max(r["seq"] for r in done) < last["seq"]  # nothing ran after the stop
        skipped = [r for r in done if r["outcome"] == "skipped" and r["job"] == "scan"]
        # labelled by their fire times, counted from the triggers' start
        assert all((r["scheduled_ms"] - svc.anchor_ms) % 10_000 == 0 for r in skipped)
    finally:
        svc.request_stop()
        thread.join(30)
        rt.close()


def test_reconcile_waits_for_the_exchange_write_lock(tmp_path):
    """One lock serialises exchange writes across jobs: reconcile cannot run while
    another job holds it."""
    rt = make_rt(tmp_path)
    try:
        finished = threading.Event()
        with rt.lock:
            worker = threading.Thread(target=lambda: (
                scheduler.Service(rt).job("reconcile"), finished.set()))
            worker.start()
            assert not finished.wait(0.5)
        assert finished.wait(30)
        worker.join()
    finally:
        rt.close()


def test_simulated_latency_overlaps_and_the_scan_fetches_concurrently(tmp_path, monkeypatch):
    """[sim] latency_ms is slept outside the venue's lock, and with it the sim gives the
    scan one data client per coin: the candle fetches of a scan wait out their latency
    together (if the sleep held the lock, or the fetch were serial, one at a time)."""
    from types import SimpleNamespace

    from core import sim_exchange, venues

    gate = threading.Lock()
    sleeping = {"now": 0, "peak": 0}

    def sleep(seconds):
        with gate:
            sleeping["now"] += 1
            sleeping["peak"] = max(sleeping["peak"], sleeping["now"])
        time.sleep(seconds)
        with gate:
            sleeping["now"] -= 1

    monkeypatch.setattr(sim_exchange, "time", SimpleNamespace(sleep=sleep))
    # 250 ms: long enough that a busy machine starts every fetch thread within it
    cfg = Config().with_values(sim={"symbols": 8, "latency_ms": 250.0}, rotation={"top_n": 8})
    clock = VirtualClock(T0 + 1_000)
    venue = SimExchange.from_config(cfg, clock, origin_ms=T0 - 3 * DAY_MS)
    quiet_open_orders(venue)
    extra = venues.sim_data_venues(cfg, venue)
    # One client keeps the exchange's clock, one per coin fetches candles.
    assert len(extra) == 1 + 8 and all(v is venue for v in extra)
    assert venues.sim_data_venues(cfg.with_values(sim={"latency_ms": 0.0}), venue) == []
    rt = runtime.build(cfg, tmp_path / "bot.db", clock=clock, venue=venue, data_venues=extra)
    try:
        assert len({id(c) for c in rt.data_clients}) == 10  # each client has its own lock
        rt.ledger.append([Fact("rotation", T0, data={"coins": venue.symbols,
                                                     "scheduled_ms": None})])
        record = scheduler.Service(rt).job("scan") or runs(rt.ledger)[-1]
        assert record["outcome"] == "ok"
        assert sleeping["peak"] >= 8  # all eight coins' candles in flight at once
    finally:
        rt.close()


def test_one_process_per_ledger(tmp_path):
    db = tmp_path / "bot.db"
    first = LedgerLock(db)
    first.acquire()
    try:
        with pytest.raises(AlreadyRunning, match=f"process {os.getpid()}"):
            LedgerLock(db).acquire()
    finally:
        first.release()
    again = LedgerLock(db)
    again.acquire()  # released: free again
    again.release()


def test_a_lock_file_removed_by_its_holder_is_not_held_by_two(tmp_path, monkeypatch):
    """A one-off run removes its lock file as it lets go. One that had opened the old file
    just before would lock that unlinked file while a third locks the new one."""
    db = tmp_path / "bt.db"
    first = LedgerLock(db)
    first.acquire()
    opened_before = open(first.path, "a+")  # noqa: SIM115
    first.release(remove=True)
    assert not first.path.exists()
    second = LedgerLock(db)
    real_open = second._open
    handed = iter([opened_before])
    monkeypatch.setattr(second, "_open", lambda: next(handed, None) or real_open())
    second.acquire()
    try:
        with pytest.raises(AlreadyRunning):
            LedgerLock(db).acquire()
    finally:
        second.release()


FORCED = """
import sys, threading, time
import scheduler
from core import runtime
from core.config import Config
from ledger import Fact

rt = runtime.build(Config().with_values(sim={"state_path": sys.argv[2]}), sys.argv[1])
svc = scheduler.Service(rt)
scheduler.FORCE_EXIT_LOCK_WAIT_S = 30
held = threading.Event()

def entry_in_flight():  # an order sent, what must follow it not yet done
    with rt.lock:
        held.set()
        time.sleep(1.0)
        rt.ledger.append([Fact("note", rt.clock.now_ms(), reason="entry and its stop done")])

threading.Thread(target=entry_in_flight).start()
held.wait()
svc._force_exit()
"""


def test_a_forced_stop_waits_for_the_exchange_lock_and_exits_non_zero(tmp_path):
    db = tmp_path / "bot.db"
    out = subprocess.run([sys.executable, "-c", FORCED, str(db), str(tmp_path / "sim.db")],
                         cwd=REPO, timeout=120,
                         capture_output=True, text=True)
    assert out.returncode == scheduler.EXIT_FORCED != 0, out.stderr
    with Ledger(db, readonly=True) as ledger:
        rows = ledger.select("SELECT type, reason, data FROM facts WHERE type IN "
                             "('note', 'service') ORDER BY seq")
    # Never between an order and what must follow it: the exit came after.
    assert [(r["type"], r["reason"]) for r in rows][-2:] == [
        ("note", "entry and its stop done"), ("service", None)]
    assert '"event":"stopped (forced)"' in rows[-1]["data"]


def test_a_scan_asked_to_stop_makes_no_new_entry(tmp_path):
    from test_jobs_scan import AAA, BBB, T0, Pick, flat, make_bot

    bot = make_bot(tmp_path, strat=Pick(long_at=[T0 - 300_000]),
                   paths={"AAA": flat(100.0, 5), "BBB": flat(50.0, 5)})
    try:
        bot.set_coins([AAA, BBB])
        bot.rt.stopping.set()  # SIGTERM arrived as this scan began deciding
        summary = bot.job("scan", T0)["summary"]
        assert summary["entries"] == 0 and bot.exchange_positions() == {}
        assert {r["symbol"] for r in bot.facts("signal")} == {AAA, BBB}  # decided, recorded
        for job in ("reconcile", "daily_reset"):  # waiting for the lock: nothing now
            assert bot.job(job)["outcome"] == "skipped"
    finally:
        bot.close()


def test_a_symlink_to_the_ledger_meets_the_same_one_bot_lock(tmp_path):
    real = tmp_path / "bot.db"
    real.touch()
    link = tmp_path / "alias.db"
    link.symlink_to(real)
    assert LedgerLock(link).path == LedgerLock(real).path
