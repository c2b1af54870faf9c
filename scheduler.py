"""The service: wires the four jobs to APScheduler triggers and owns the process.

One instance per ledger (an flock on ``<db>.lock``, released even by SIGKILL). At
start, before the first scan: reconcile, close the UTC days that ended while the bot
was down, rotate if no coins are active or the last rotation is an interval old.
SIGTERM/SIGINT let the running job finish (it sends nothing new), record the shutdown and
exit 0; a job still running after SHUTDOWN_GRACE_S is abandoned, outside any exchange
operation, and the process exits EXIT_FORCED.

In paper and live mode the bot's clock is the wall clock and the daily reset is a cron
at 00:00 UTC and every 15 minutes after. In sim mode the bot's clock runs ``sim.speed`` times faster than the wall
clock (and resumes where the simulated exchange stopped), so every interval is divided
by the speed and the daily reset polls every 5 bot-minutes: it closes whatever UTC days
the bot's clock has finished, instead of waiting for a wall-clock midnight.

Runs that do not happen are recorded too (a ``job_run`` fact with outcome ``missed``,
``skipped`` or ``error`` and the reason), so the ledger accounts for every scheduled run:
APScheduler reports runs it missed (later than the misfire grace) and runs it dropped
(the previous one still going); runs it merged into a later one (coalescing, after the
scheduler itself was late) it does not report, so the service counts them from the
trigger and records each as skipped.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ccxt
from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    EVENT_JOB_SUBMITTED,
)
from apscheduler.schedulers.base import SchedulerNotRunningError
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from core import logs, runtime
from core.clock import WallClock
from core.config import Config, check_can_trade
from core.exchange import BadExchangeData, IpBanned, error_text
from jobs import daily_reset, reconcile, rotate, scan
from jobs.runner import record_not_run, run_job
from ledger import Fact
from ledger.lock import LedgerLock

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 30
# Past the grace, the forced exit still waits this long for the exchange lock: never
# between an order and what must follow it (an entry's fill and its stop).
FORCE_EXIT_LOCK_WAIT_S = 60
EXIT_FORCED = 1
DAILY_POLL_S = 300  # sim mode: the daily reset looks for ended days every 5 bot-minutes
# Other modes: at 00:00 UTC and every 15 minutes after. It is idempotent, and one run at
# midnight alone would leave a day unclosed for 24 h if it failed, or if the service
# started just before midnight (its start-up reset ran, its first midnight is tomorrow).
DAILY_CRON_MINUTES = "*/15"
NOT_RUN = {
    EVENT_JOB_MISSED: ("missed", "started too late (misfire grace exceeded)"),
    EVENT_JOB_MAX_INSTANCES: ("skipped", "previous run still going (max_instances=1)"),
    EVENT_JOB_ERROR: ("error", "the job wrapper raised"),
}
COALESCED = "coalesced: due while the scheduler was late; the next run covers it"
MAX_COALESCED_RECORDS = 100  # per late wake-up (a suspended host can miss thousands)
ROTATE_RETRY_MS = 60_000  # a failed rotation with no coin active: retried by a scan this often
JOBS = {"scan": scan.run, "rotate": rotate.run, "daily_reset": daily_reset.run,
        "reconcile": reconcile.run}


@dataclass(frozen=True)
class Schedule:
    """One job's trigger, how late a run may start, and its nominal interval (bot ms)."""

    trigger: object
    misfire_grace_s: float
    interval_ms: int | None


def speed_of(config: Config) -> float:
    return config.sim.speed if config.bot.mode == "sim" else 1.0


def schedules(config: Config) -> dict[str, Schedule]:
    """The triggers of the four jobs (wall-clock triggers in UTC). Pure, so tests can ask
    them for fire times."""
    s, speed = config.schedule, speed_of(config)
    scan_s = s.scan_interval_s / speed
    rotate_s = s.rotate_interval_h * 3600 / speed
    reconcile_s = s.reconcile_interval_s / speed
    out = {
        "scan": Schedule(IntervalTrigger(seconds=scan_s, timezone="UTC"),
                         max(scan_s, 1.0), s.scan_interval_s * 1000),
        # A grace of a whole interval: after a pause APScheduler coalesces the missed runs
        # into the last one due, up to an interval ago, and drops it if that is past the
        # grace. A shorter grace dropped the one catch-up run about half the time.
        "rotate": Schedule(IntervalTrigger(seconds=rotate_s, timezone="UTC"),
                           max(rotate_s, 1.0), int(s.rotate_interval_h * 3_600_000)),
        "reconcile": Schedule(IntervalTrigger(seconds=reconcile_s, timezone="UTC"),
                              max(reconcile_s, 1.0), s.reconcile_interval_s * 1000),
    }
    if config.bot.mode != "sim":  # the bot's clock is the wall clock
        out["daily_reset"] = Schedule(CronTrigger(minute=DAILY_CRON_MINUTES, second=0,
                                                  timezone="UTC"), 900, None)
    else:
        poll_s = DAILY_POLL_S / speed
        out["daily_reset"] = Schedule(IntervalTrigger(seconds=poll_s, timezone="UTC"),
                                      max(poll_s, 1.0), DAILY_POLL_S * 1000)
    return out


def fire_times_between(trigger, after, before, limit: int = MAX_COALESCED_RECORDS + 1) -> list:
    """The trigger's fire times strictly between two of its fire times (at most
    ``limit``). Pure."""
    if isinstance(trigger, IntervalTrigger):
        n = min(round((before - after) / trigger.interval) - 1, limit)
        return [after + trigger.interval * k for k in range(1, n + 1)]
    out, t = [], trigger.get_next_fire_time(after, after)
    while t is not None and t < before and len(out) < limit:
        out.append(t)
        t = trigger.get_next_fire_time(t, t)
    return out


def slot(bot_ms: int, interval_ms: int | None, anchor_ms: int = 0,
         period_ms: float | None = None, *, nearest: bool = False) -> int:
    """The nominal instant a run belongs to (two runs in one slot are the same run): of a
    trigger firing every ``period_ms`` after ``anchor_ms``, the last fire at or before
    ``bot_ms`` (a run), or the nearest (``bot_ms`` estimates a fire time). Labelled
    ``anchor_ms`` + whole ``interval_ms``. Pure.

    ``period_ms``: the trigger's period in bot time, if not exactly ``interval_ms`` (in sim
    mode a wall period rounded to the microsecond, times the speed: the error adds up over
    thousands of fires)."""
    if not interval_ms:
        return bot_ms
    if period_ms is None or period_ms == interval_ms:
        fires = (bot_ms - anchor_ms + (interval_ms // 2 if nearest else 0)) // interval_ms
    else:  # + 1: bot instants are whole ms, floored
        fires = (bot_ms - anchor_ms + 1) / period_ms
        fires = round(fires) if nearest else math.floor(fires)
    return anchor_ms + fires * interval_ms


class StartRefused(Exception):
    """The account cannot be traded as configured; nothing was started."""


class StartFailed(Exception):
    """The exchange could not be asked before starting (a network outage): nothing was
    started, and starting again later may work (exit 1: a restart policy retries)."""


class StartInterrupted(Exception):
    """A second stop signal while starting: the start ends where it is (nothing runs)."""


def rotation_due(rt) -> bool:
    """At start: no coins are active, or the last rotation is an interval old or more.
    The interval trigger counts from each start, so a bot restarted more often than that
    would otherwise never rotate again."""
    state = rt.ledger.state()
    last = (state.last_rotation or {}).get("ts")
    interval_ms = rt.config.schedule.rotate_interval_h * 3_600_000
    return not state.active_coins or last is None or rt.clock.now_ms() - last >= interval_ms


def rotation_failed_without_coins(rt) -> bool:
    """No coin is active and the last rotation failed a minute or more ago (the exchange
    was down when a new bot started): the scan retries it, or nothing would trade until
    the next rotation, hours later."""
    state = rt.ledger.state()
    last = state.last_runs.get("rotate") or {}
    return (not state.active_coins and last.get("outcome") == "error"
            and rt.clock.now_ms() - int(last.get("ts") or 0) >= ROTATE_RETRY_MS)


class Service:
    """The running bot: a runtime, a scheduler, and a clean way to stop."""

    def __init__(self, rt: runtime.Runtime) -> None:
        self.rt = rt
        self.make_plan()  # install() makes it anew
        self.scheduler = BlockingScheduler(timezone="UTC", job_defaults={
            "coalesce": True, "max_instances": 1})
        self.stopping = rt.stopping
        self._serving = False  # the scheduler is (about to be) started; guarded by _gate
        self._gate = threading.Lock()
        self._watchdog = threading.Timer(SHUTDOWN_GRACE_S, self._force_exit)
        self._watchdog.daemon = True
        self._drained = threading.Event()  # set once no job can still be running
        self._last_due: dict = {}  # job -> the last run time APScheduler handled (wall)
        self._running: set[str] = set()  # jobs in progress, named in the stop message

    def job(self, name: str) -> None:
        if self.stopping.is_set():
            return
        self._running.add(name)
        try:
            run_job(self.rt, name, JOBS[name], self.slot(name, self.rt.clock.now_ms()))
            # After the scan, so that a slow exchange cannot hold up managing a position
            if name == "scan" and rotation_failed_without_coins(self.rt) \
                    and not self.stopping.is_set():
                run_job(self.rt, "rotate", JOBS["rotate"],
                        self.slot("rotate", self.rt.clock.now_ms()))
        finally:
            self._running.discard(name)

    def startup(self) -> None:
        """Reconcile before the first scan; catch up missed days; rotate if needed."""
        self.record_service("started")
        steps = [("reconcile", lambda: True), ("daily_reset", lambda: True),
                 ("rotate", lambda: rotation_due(self.rt))]
        for name, wanted in steps:
            if self.stopping.is_set():
                return
            if wanted():
                run_job(self.rt, name, JOBS[name])

    def record_service(self, event: str) -> None:
        try:
            self.rt.ledger.append([Fact("service", self.rt.clock.now_ms(), data={
                "event": event, "pid": os.getpid(), "mode": self.rt.config.bot.mode,
                "exchange": self.rt.config.exchange.id})])
        except Exception as exc:  # noqa: BLE001
            log.error("service %s not recorded: %s", event, exc)

    def on_event(self, event) -> None:
        """Listener (scheduler thread): account for runs merged away, then runs not run."""
        if event.code in (EVENT_JOB_SUBMITTED, EVENT_JOB_MAX_INSTANCES):
            self.on_due(event)
        if event.code in NOT_RUN:
            self.on_not_run(event)

    def on_due(self, event) -> None:
        """Record the fire times between the last run handled and this one: coalesced."""
        plan, times = self.plan.get(event.job_id), event.scheduled_run_times
        last = self._last_due.get(event.job_id)
        self._last_due[event.job_id] = times[-1]
        if plan is None or last is None:
            return
        dropped = fire_times_between(plan.trigger, last, times[0])
        for run_time in dropped[:MAX_COALESCED_RECORDS]:
            record_not_run(self.rt, event.job_id,
                           self.slot(event.job_id, self.bot_ms(run_time), nearest=True),
                           "skipped", COALESCED)
        if len(dropped) > MAX_COALESCED_RECORDS:
            log.warning("job %s: more than %d runs coalesced; only the first %d recorded",
                        event.job_id, MAX_COALESCED_RECORDS, MAX_COALESCED_RECORDS)

    def on_not_run(self, event) -> None:
        """A run APScheduler missed, dropped, or whose wrapper raised."""
        outcome, reason = NOT_RUN[event.code]
        if event.code == EVENT_JOB_ERROR:
            reason = f"{reason}: {type(event.exception).__name__}: {event.exception}"
        times = getattr(event, "scheduled_run_times", None) or [event.scheduled_run_time]
        for run_time in times:
            record_not_run(self.rt, event.job_id,
                           self.slot(event.job_id, self.bot_ms(run_time), nearest=True),
                           outcome, reason)

    def slot(self, name: str, bot_ms: int, *, nearest: bool = False) -> int:
        """The fire a run of ``name`` at ``bot_ms`` belongs to (``nearest``: the fire
        ``bot_ms`` estimates). Counted from the triggers' start, as they count: by
        epoch-aligned slots, a rotation run late took the next fire's slot, and that
        rotation was skipped as done."""
        plan = self.plan.get(name)
        if plan is None or not plan.interval_ms:
            return bot_ms
        period_ms = plan.trigger.interval.total_seconds() * 1000 * speed_of(self.rt.config)
        return slot(bot_ms, plan.interval_ms, self.anchor_ms, period_ms, nearest=nearest)

    def bot_ms(self, run_time) -> int:
        """The bot-clock instant of a wall-clock run time (the clocks differ in sim mode)."""
        late_ms = WallClock().now_ms() - int(run_time.timestamp() * 1000)
        return self.rt.clock.now_ms() - int(max(late_ms, 0) * speed_of(self.rt.config))

    def request_stop(self, signum=None, frame=None) -> None:
        """Signal-safe: sets a flag and lets a thread shut the scheduler down."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        log.info("stop requested (signal %s): finishing the running job(s): %s", signum,
                 ", ".join(sorted(self._running)) or "none")
        threading.Thread(target=self._shutdown, name="shutdown", daemon=True).start()

    def _shutdown(self) -> None:
        self._watchdog.start()  # cancelled by run() once it returns
        while True:
            with self._gate:
                if not self._serving:
                    return  # run() sees the flag and never starts the scheduler
            try:
                self.scheduler.shutdown(wait=True)  # waits for the running job
                break
            except SchedulerNotRunningError:
                # run() is between deciding to start and start() setting the state.
                time.sleep(0.05)
            except Exception as exc:  # noqa: BLE001 - already down
                log.debug("scheduler shutdown: %s", exc)
                break
        self._drained.set()

    def _force_exit(self) -> None:
        # Never between an order and what must follow it (an entry's fill and its stop):
        # that runs under the exchange lock, so wait for the lock, a while longer.
        settled = self.rt.lock.acquire(timeout=FORCE_EXIT_LOCK_WAIT_S)
        log.error("a job did not finish within %s s; exiting anyway%s (the ledger is "
                  "crash-safe; reconcile settles what was in flight at the next start)",
                  SHUTDOWN_GRACE_S, "" if settled else ", inside an exchange operation")
        self.record_service("stopped (forced)")
        os._exit(EXIT_FORCED)  # not 0: a restart-on-failure policy brings the bot back

    def make_plan(self) -> None:
        """The jobs' triggers, and the bot-clock instant they count from (read first: a
        run on time is then never counted in the slot before its own)."""
        self.anchor_ms = self.rt.clock.now_ms()
        self.plan = schedules(self.rt.config)

    def install(self) -> None:
        """The four jobs on their triggers, and the listener that records runs not run."""
        self.make_plan()  # interval triggers count from now
        for name, plan in self.plan.items():
            self.scheduler.add_job(self.job, plan.trigger, args=[name], id=name, name=name,
                                   coalesce=True, max_instances=1,
                                   misfire_grace_time=math.ceil(plan.misfire_grace_s))
        self.scheduler.add_listener(self.on_event, EVENT_JOB_SUBMITTED | EVENT_JOB_MISSED
                                    | EVENT_JOB_MAX_INSTANCES | EVENT_JOB_ERROR)

    def run(self) -> int:
        """Start-up jobs, then the scheduler until a stop is requested. Returns 0."""
        self.startup()
        self.install()
        with self._gate:
            self._serving = not self.stopping.is_set()
        if self._serving:
            log.info("service running: mode %s, exchange %s, ledger %s",
                     self.rt.config.bot.mode, self.rt.config.exchange.id, self.rt.ledger.path)
            self.scheduler.start()
            # start() can return as soon as the state says stopped, while the executor
            # still runs the last job: wait for it before recording the stop and closing.
            self._drained.wait()
        self._watchdog.cancel()
        self.record_service("stopped")
        log.info("service stopped")
        return 0


# A hang-up (an SSH session running it in the foreground dropped) stops it cleanly too:
# its default would end the process wherever it is.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def serve(config: Config, db_path: str | Path) -> int:
    """``cli.py run``: lock the ledger, build the runtime, run until a signal."""
    check_can_trade(config, serving=True)  # nothing made or started if it cannot trade
    runtime.check_ledger_mode(db_path, config.bot.mode)
    # A stop asked for while starting is kept and honoured once the service exists (the
    # default handlers would end the process half-way, or print a traceback). Starting
    # can wait on the exchange for minutes: a second signal stops it there and then.
    asked: list[int] = []

    def while_starting(signum, frame) -> None:
        asked.append(signum)
        if len(asked) > 1:
            raise StartInterrupted(f"signal {signum} again while starting")

    previous = {sig: signal.signal(sig, while_starting) for sig in STOP_SIGNALS}
    try:
        lock = LedgerLock(db_path)
        lock.acquire()
        try:
            try:
                rt = start_runtime(config, db_path)
            except StartFailed as exc:
                if not asked:
                    raise
                log.warning("stopped while starting: %s", exc)  # as asked: not a failure
                return 0
            try:
                service = Service(rt)
                for sig in STOP_SIGNALS:
                    signal.signal(sig, service.request_stop)
            except BaseException:
                rt.close()
                raise
            if asked:
                service.request_stop(asked[0])
            try:
                return service.run()
            finally:
                rt.close()
        except StartInterrupted as exc:
            log.warning("stopped while starting (%s): not started", exc)
            return 0
        finally:
            lock.release()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def start_runtime(config: Config, db_path: str | Path) -> runtime.Runtime:
    """The logs and the runtime, or StartRefused / StartFailed saying why not."""
    try:
        logs.setup(config.bot.log_dir)
    except OSError as exc:
        raise StartRefused(f"not started: [bot] log_dir = {config.bot.log_dir!r}: cannot "
                           f"write logs there ({exc.strerror or exc})") from None
    try:
        rt = runtime.build(config, db_path)
    except IpBanned as exc:
        raise StartFailed(f"not started: {exc}") from None
    except ccxt.NetworkError as exc:
        raise StartFailed(f"not started: the exchange could not be reached "
                          f"({error_text(exc)})") from None
    if config.bot.mode != "live":
        return rt
    try:
        problem = rt.client.account_mode_problem()
    except (ccxt.AuthenticationError, ccxt.PermissionDenied) as exc:
        rt.close()  # keys refused: a person must look, a restart would not help
        raise StartRefused(f"not started: the exchange refused the API keys "
                           f"({error_text(exc)})") from None
    except (ccxt.BaseError, BadExchangeData) as exc:
        banned = rt.client.banned()  # this call met a 418: recorded, held at the restart
        until = rt.client.ban.until_ms
        rt.close()
        if banned:
            raise StartFailed(f"not started: {IpBanned.until(until)} (recorded in the "
                              "ledger)") from None
        raise StartFailed(f"not started: the account's mode could not be read from "
                          f"the exchange ({error_text(exc)})") from None
    if problem:
        rt.close()
        raise StartRefused(f"not started: {problem}")
    return rt
