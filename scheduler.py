"""The service: wires the four jobs to APScheduler triggers and owns the process.

One instance per ledger (an flock on ``<db>.lock``, released even by SIGKILL). At
start, before the first scan: reconcile, close the UTC days that ended while the bot
was down, rotate if no coins are active. SIGTERM/SIGINT let the running job finish,
record the shutdown and exit 0 within SHUTDOWN_GRACE_S.

In sim mode the bot's clock runs ``sim.speed`` times faster than the wall clock, so
every interval is divided by the speed and the daily reset polls (it closes whatever
UTC days the bot's clock has finished) instead of waiting for a wall-clock midnight.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from core import logs, runtime
from core.config import Config
from jobs import daily_reset, reconcile, rotate, scan
from jobs.runner import record_not_run, run_job
from ledger import Fact

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 30
JOBS = {"scan": scan.run, "rotate": rotate.run, "daily_reset": daily_reset.run,
        "reconcile": reconcile.run}


class AlreadyRunning(RuntimeError):
    """Another process holds the ledger."""


@dataclass(frozen=True)
class Schedule:
    """One job's trigger, how late a run may start, and its nominal interval (bot ms)."""

    trigger: object
    misfire_grace_s: float
    interval_ms: int | None


def speed_of(config: Config) -> float:
    return config.sim.speed if config.bot.mode == "sim" else 1.0


def schedules(config: Config) -> dict[str, Schedule]:
    """The triggers of the four jobs. Pure, so tests can ask them for fire times."""
    s, speed = config.schedule, speed_of(config)
    scan_s = s.scan_interval_s / speed
    rotate_s = s.rotate_interval_h * 3600 / speed
    reconcile_s = s.reconcile_interval_s / speed
    out = {
        "scan": Schedule(IntervalTrigger(seconds=scan_s, timezone="UTC"),
                         max(scan_s, 1.0), s.scan_interval_s * 1000),
        "rotate": Schedule(IntervalTrigger(seconds=rotate_s, timezone="UTC"),
                           max(rotate_s / 4, 1.0), int(s.rotate_interval_h * 3_600_000)),
        "reconcile": Schedule(IntervalTrigger(seconds=reconcile_s, timezone="UTC"),
                              max(reconcile_s / 2, 1.0), s.reconcile_interval_s * 1000),
    }
    if speed == 1.0:
        out["daily_reset"] = Schedule(CronTrigger(hour=0, minute=0, second=5, timezone="UTC"),
                                      3600, None)
    else:
        poll_s = 300 / speed  # every 5 bot-minutes
        out["daily_reset"] = Schedule(IntervalTrigger(seconds=poll_s, timezone="UTC"),
                                      max(poll_s, 1.0), 300_000)
    return out


def slot(now_ms: int, interval_ms: int | None) -> int:
    """The nominal instant a run belongs to: two runs in one slot are the same run."""
    return now_ms if not interval_ms else now_ms - now_ms % interval_ms


class LedgerLock:
    """An exclusive flock next to the ledger; the holder's pid is written inside."""

    def __init__(self, db_path: str | Path) -> None:
        self.path = Path(f"{db_path}.lock")
        self._fh = None

    def acquire(self) -> None:
        fh = open(self.path, "a+")  # noqa: SIM115 - held for the life of the process
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise AlreadyRunning(f"{self.path.with_suffix('')} is in use by process {holder}; "
                                 "one bot per ledger") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


class Service:
    """The running bot: a runtime, a scheduler, and a clean way to stop."""

    def __init__(self, rt: runtime.Runtime) -> None:
        self.rt = rt
        self.plan = schedules(rt.config)
        self.scheduler = BlockingScheduler(timezone="UTC", job_defaults={
            "coalesce": True, "max_instances": 1})
        self.stopping = threading.Event()

    def job(self, name: str) -> None:
        if self.stopping.is_set():
            return
        run_job(self.rt, name, JOBS[name],
                slot(self.rt.clock.now_ms(), self.plan[name].interval_ms))

    def startup(self) -> None:
        """Reconcile before the first scan; catch up missed days; rotate if needed."""
        self.record_service("started")
        run_job(self.rt, "reconcile", JOBS["reconcile"])
        run_job(self.rt, "daily_reset", JOBS["daily_reset"])
        if not self.rt.ledger.state().active_coins:
            run_job(self.rt, "rotate", JOBS["rotate"])

    def record_service(self, event: str) -> None:
        try:
            self.rt.ledger.append([Fact("service", self.rt.clock.now_ms(), data={
                "event": event, "pid": os.getpid(), "mode": self.rt.config.bot.mode,
                "exchange": self.rt.config.exchange.id})])
        except Exception as exc:  # noqa: BLE001
            log.error("service %s not recorded: %s", event, exc)

    def on_not_run(self, event) -> None:
        outcome = "missed" if event.code == EVENT_JOB_MISSED else "skipped"
        reason = ("started too late (misfire grace exceeded)" if outcome == "missed"
                  else "previous run still going (max_instances=1)")
        record_not_run(self.rt, event.job_id, self.rt.clock.now_ms(), outcome, reason)

    def request_stop(self, signum=None, frame=None) -> None:
        """Signal-safe: sets a flag and lets a thread shut the scheduler down."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        log.info("stop requested (signal %s): finishing the running job", signum)
        threading.Thread(target=self._shutdown, name="shutdown", daemon=True).start()

    def _shutdown(self) -> None:
        watchdog = threading.Timer(SHUTDOWN_GRACE_S, self._force_exit)
        watchdog.daemon = True
        watchdog.start()
        try:
            self.scheduler.shutdown(wait=True)
        except Exception as exc:  # noqa: BLE001 - not started yet, or already down
            log.debug("scheduler shutdown: %s", exc)

    def _force_exit(self) -> None:
        log.error("a job did not finish within %s s; exiting anyway (the ledger is crash-safe)",
                  SHUTDOWN_GRACE_S)
        self.record_service("stopped (forced)")
        os._exit(0)

    def run(self) -> int:
        self.startup()
        for name, plan in self.plan.items():
            self.scheduler.add_job(self.job, plan.trigger, args=[name], id=name, name=name,
                                   misfire_grace_time=math.ceil(plan.misfire_grace_s))
        self.scheduler.add_listener(self.on_not_run, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        if not self.stopping.is_set():
            log.info("service running: mode %s, exchange %s, ledger %s",
                     self.rt.config.bot.mode, self.rt.config.exchange.id, self.rt.ledger.path)
            self.scheduler.start()
        self.record_service("stopped")
        return 0


def serve(config: Config, db_path: str | Path) -> int:
    """``cli.py run``: lock the ledger, build the runtime, run until a signal."""
    logs.setup(config.bot.log_dir)
    lock = LedgerLock(db_path)
    lock.acquire()
    try:
        rt = runtime.build(config, db_path)
        service = Service(rt)
        signal.signal(signal.SIGTERM, service.request_stop)
        signal.signal(signal.SIGINT, service.request_stop)
        try:
            return service.run()
        finally:
            rt.close()
    finally:
        lock.release()
