"""Backtest: the live scan's decisions, replayed over recorded candles on a virtual clock.

Same code, different clock. At every candle close (a *step*) the backtest does what the
scan job (``jobs/scan.py``) does when it finds that candle closed, with the same
functions: ``scan.balance_fact``, ``risk.check_account`` / ``scan.apply_halt``,
``scan.manage_position`` (``exits.evaluate_exit``, stop moves), ``scan.enter``
(``risk.check_entry``, sizing) and the ``Executor`` - against the simulated exchange, in
memory, whose clock stands at the step. The rotation and daily-reset jobs run as they
are (``jobs/rotate.py``, ``jobs/daily_reset.py``). The ledger gets the live schema and
fact types; ``cli.py --db backtest.db trades|pnl|verify`` read it like any other.

Timing, and why there is no look-ahead:

* the strategy decides on the close of candle ``t`` (``Strategy.signals`` is causal; the
  row of ``t`` equals ``Strategy.decide`` on the candles up to ``t``);
* the order goes out at that instant, which is the open of ``t+1``: a market order fills
  at the open of ``t+1`` plus slippage, minus the taker fee (the venue's price at an
  instant is the candle opening then; in a hole in the data, the last close);
* the protective stop rests on the venue and triggers inside a candle on its high/low
  (a gap through it fills at the open). The exit rules see a candle's extremes, not their
  order: the stop (and the trail from the previous best) are checked against the
  adverse extreme first, and a new best reached in the same candle cannot save the
  position - when stop and profit both lie inside one candle, the worse is assumed.
  The venue makes the same choice (stops first within a candle);
* candle holes: a symbol without a candle at a step is not decided on (the live scan
  sees no new candle either), nor while a candle is missing among the last ``warmup + 1``
  it would fetch (the scan skips a damaged series); the next decision then covers every
  candle since the last one. Orders fill at the last close until candles resume.

The window ``[start, end)`` ends at the close of its last candle: nothing is decided at
that last instant (an order would fill at the next open, after the window; a walk-forward's
training run would trade on its test window's first price), and positions still open are
valued at the window's last closes.

Rotation as in live: the top ``[rotation] top_n`` by 24 h quote volume (computed from
the candles, as the venue's tickers are), at the start and then every
``rotate_interval_h`` after it (the service's interval trigger counts from its start),
before the scan of that step; after a hole in every symbol's candles, once at the first
step, as the service runs a late rotation once. The daily reset runs after the scan of
the first step of each UTC day.

What is skipped is only what cannot change anything (see ``core.backtest_watch``): steps
where no active coin has an entry signal, no open position's exit rules can fire or
change state, no rotation or day boundary falls, and the equity makes neither a new
peak nor a loss near a limit. The live scan records a ``signal`` fact (and a balance
snapshot) on every candle, "none" almost always; the backtest records those of the steps
it acts on (entries, refused entries, exit evaluations) and a snapshot at every new
equity peak, so the ledger's equity peak is the live one on the candles' prices (the
service also values the account mid-candle: README, parity). Everything else - orders,
fills, positions, stops, best prices, risk decisions, halts, rotations, day closes - is
fact for fact what the live scan job writes on the same candles (tests/test_backtest.py
runs ``jobs.scan.run`` itself at every step, ``reference=True``, and compares).

Speed comes from doing that work only where it is needed, from arrays prepared once
(``core.backtest_data``), and from a write-behind ledger (``core.backtest_ledger``):
the execution path itself is the live one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

from core import risk
from core.backtest_data import MarketData, signal_of
from core.backtest_ledger import BufferedLedger
from core.backtest_venue import BacktestClient, BacktestExecutor, build_venue
from core.backtest_watch import MARGIN, next_due, watch_for
from core.clock import DAY_MS, VirtualClock, day_start_ms
from core.config import Config, to_mapping
from core.exchange import ExchangeClient
from core.execution import Executor
from core.report import when_utc
from core.runtime import Runtime
from core.sim_account import D, account
from core.sim_binance import Q8
from core.sim_store import SimPosition
from core.strategies import Strategy, load_strategy
from jobs import daily_reset, rotate, scan
from ledger import Fact, Ledger
from ledger.audit import BACKTEST_KIND, written_by_backtest
from ledger.store import NoLedgerYet

log = logging.getLogger(__name__)

PCT_MARGIN = 1e-6  # percentage points: a limit this close is checked by the exact rules
Progress = Callable[[int, int], None]


@dataclass
class BacktestResult:
    """What a run produced: the ledger file, and float series for the report."""

    db_path: str
    config: Config
    strategy: str
    params: dict
    symbols: list[str]
    times: np.ndarray  # step instants (UTC ms)
    equity: np.ndarray  # account equity at each step (after its orders)
    open_positions: np.ndarray  # positions open after each step
    start_equity: float
    trades: list[dict]  # closed trades (the ledger's closed_trades view)
    still_open: list[dict]  # positions open at the end
    stale_marks: list[dict]  # those valued at an older close (their candles stop early)
    fees: float
    facts: int
    elapsed_s: float
    timings: dict[str, float] = field(default_factory=dict)
    day_closes: dict[str, float] = field(default_factory=dict)  # the ledger's, by UTC day


def is_backtest_ledger(path: str | Path) -> bool:
    """True if ``path`` is empty (an SQLite file with no schema yet, as a run killed while
    creating it leaves) or a ledger a backtest wrote (its first fact says so)."""
    try:
        with Ledger(path, readonly=True) as ledger:
            return ledger.last_seq() == 0 or written_by_backtest(ledger)
    except NoLedgerYet:
        return True  # nothing in it to lose


def run_backtest(config: Config, source, db_path: str | Path, *, start_ms: int | None = None,
                 end_ms: int | None = None, data: MarketData | None = None,
                 progress: Progress | None = None, reference: bool = False) -> BacktestResult:
    """Backtest ``config``'s strategy on ``source``'s candles opening in [start, end)
    (candles before ``start`` warm the indicators up); write the ledger to ``db_path``
    (a new file).

    ``reference=True`` runs the plain, slow path the fast one must equal: the live scan
    job itself (``jobs.scan.run``: candles fetched from the venue, every symbol decided
    on every candle) at every step, with the plain Ledger, Executor and ExchangeClient.
    Tests compare the two."""
    t0 = time.perf_counter()
    strategy = load_strategy(config.strategy)
    if data is None:
        data = MarketData(source, strategy, upto_ms=end_ms, limit=config.strategy.candles)
    t1 = time.perf_counter()
    engine = Engine(config, strategy, data, db_path, start_ms, end_ms, progress, reference)
    try:
        engine.run()
        t2 = time.perf_counter()
        result = engine.result()
    finally:
        engine.close()
    t3 = time.perf_counter()
    result.timings.update(prepare_s=t1 - t0, loop_s=t2 - t1, ledger_s=t3 - t2)
    result.elapsed_s = t3 - t0
    return result


def active_halts(state, now: int) -> dict[str, str]:
    """The halts in force (what RiskState.from_ledger(state).active_halts says, cheaper)."""
    return risk.RiskState.from_summary({"halts": state.halts}).active_halts(now)


class Engine:
    """One backtest run (see the module docstring)."""

    def __init__(self, config: Config, strategy: Strategy, data: MarketData,
                 db_path: str | Path, start_ms: int | None, end_ms: int | None,
                 progress: Progress | None = None, reference: bool = False) -> None:
        self.cfg = config
        self.strategy = strategy
        self.rules = strategy.exit_rules(config.exits)
        self.data = data
        self.k0, self.k1 = data.steps(start_ms, end_ms)
        if self.k0 >= self.k1:
            raise ValueError("no candles to backtest in the chosen period")
        self.progress = progress
        self.reference = reference
        self.clock = VirtualClock(data.at(self.k0))
        self.venue = build_venue(config, data.source, self.clock)
        real = ExchangeClient(self.venue, config, self.clock, sleep=lambda s: None)
        ledger = Ledger(db_path, checkpoint_every=config.bot.checkpoint_every)
        if reference:
            ledger.select("PRAGMA synchronous = OFF")
            self.client, self.ledger, self.executor = real, ledger, Executor
        else:
            self.client = BacktestClient(real, data, self.clock)
            self.ledger, self.executor = BufferedLedger(ledger), BacktestExecutor
        self.rt = Runtime(config=config, clock=self.clock, ledger=self.ledger, client=self.client,
                          strategy=strategy, venue=self.venue)
        n = self.k1 - self.k0
        self.equity = np.full(n, np.nan)
        self.npos = np.zeros(n, dtype=np.int32)
        self.entries = data.entries_by_step(self.k0, self.k1)
        self.entry_steps = sorted(self.entries)
        self.wake: dict[str, int] = {}  # symbol -> step its position must be evaluated at
        self.watched: dict[str, dict] = {}  # symbol -> position dict the wake was computed for
        self.rotate_ms = int(config.schedule.rotate_interval_h * 3_600_000)
        self.next_rotation_ms: int | None = None  # None: the start's rotation is due
        self.last_day: int | None = None
        self.start_equity = float(self.client.balance().equity)
        self.account: dict[str, Any] = {}
        self.active: set[str] = set()  # the active coins after the last step

    # -- the run -----------------------------------------------------------------------

    def run(self) -> None:
        self.record_start()
        k, ei = self.k0, 0
        shown = time.monotonic()
        while k < self.k1:
            self.step(k)
            # entry signals count where the scan looks: in the active coins, which stay
            # as they are until the next rotation
            rotation = self.next_rotation_step()
            while ei < len(self.entry_steps) and (
                    self.entry_steps[ei] <= k or (
                        self.entry_steps[ei] < rotation
                        and self.active.isdisjoint(self.entries[self.entry_steps[ei]]))):
                ei += 1
            nxt = min(self.entry_steps[ei] if ei < len(self.entry_steps) else self.k1,
                      min(self.wake.values(), default=self.k1),
                      rotation, self.next_day_step(), self.k1)
            k = self.quiet_until(k + 1, max(nxt, k + 1))
            if self.progress is not None and time.monotonic() - shown > 0.2:
                shown = time.monotonic()
                self.progress(k - self.k0, self.k1 - self.k0)
        if self.progress is not None:
            self.progress(self.k1 - self.k0, self.k1 - self.k0)
        end: list[Fact] = []
        if self.k1 > self.k0:
            # the end is valued at the window's last closes: dated there, not at the last
            # step acted on (the quiet steps before the end are skipped)
            self.clock.set(self.data.at(self.k1 - 1))
            equity = self.end_equity()
            self.equity[-1] = float(equity)
            if self.account["legs"]:  # the last snapshot has them at an earlier step's prices
                end.append(Fact("balance", self.clock.now_ms(), reason="backtest end", data={
                    "currency": self.cfg.exchange.quote, "total": self.account["wallet_exact"],
                    "equity": equity, "valued_at": "the window's last closes"}))
        self.ledger.append(end + [Fact("note", self.clock.now_ms(), reason="backtest end",
                                       data={"kind": "backtest_end",
                                             "steps": self.k1 - self.k0})])

    def stale_marks(self) -> list[dict]:
        """The positions open at the end valued at an older close than the window's last:
        their symbol has no candle there (its candles ended, or pause)."""
        if self.k1 <= self.k0:
            return []
        last, out = int(self.data.grid[self.k1 - 1]), []
        for symbol, _, _ in self.account.get("legs", ()):
            d = self.data.data[symbol]
            i = d.last_at(last)
            if i >= 0 and int(d.ts[i]) < last:
                out.append({"symbol": symbol,
                            "valued_at": when_utc(int(d.ts[i]) + self.data.tf_ms)})
        return out

    def step(self, k: int) -> None:
        """Everything the jobs would do at step k's instant, in the service's order."""
        now = self.data.at(k)
        self.clock.set(now)
        if self.next_rotation_ms is None or now >= self.next_rotation_ms:
            # labelled by its instant on the start's grid (the service's fire time, which
            # falls in a slot of its own): two of these instants can share an epoch slot
            origin = now if self.next_rotation_ms is None else self.next_rotation_ms
            due = origin + (now - origin) // self.rotate_ms * self.rotate_ms
            rotate.run(self.rt, due, f"rotate-{now}")
            self.next_rotation_ms = due + self.rotate_ms
        if k == self.k1 - 1:
            self.record_fired_stops(now)  # the window's end: nothing is decided now
        elif self.reference:
            self.record_fired_stops(now, [s for s in sorted(self.ledger.state().positions)
                                          if self.decided_at(s, k) < 0])
            scan.run(self.rt, now, f"scan-{now}")  # the live job itself
        else:
            self.scan(k, now)
        if self.last_day is None or day_start_ms(now) > self.last_day:
            if self.last_day is not None:
                daily_reset.run(self.rt, now, f"daily_reset-{now}")
            self.last_day = day_start_ms(now)
        self.after_step(k)

    def decided_at(self, symbol: str, k: int) -> int:
        """The index of the candle the scan decides ``symbol`` on at step k, or -1: none
        without a new candle (a hole), nor with a hole among the last candles it rests on."""
        d, candle_ts = self.data.data[symbol], int(self.data.grid[k])
        i = d.last_at(candle_ts)
        return i if i >= 0 and int(d.ts[i]) == candle_ts and d.decidable[i] else -1

    def scan(self, k: int, now: int) -> None:
        """jobs/scan.py's run for the candles closing at ``now``, on the symbols due."""
        rt, run_id = self.rt, f"scan-{now}"
        self.record_fired_stops(now, [s for s, step in sorted(self.wake.items())
                                      if step == k and self.decided_at(s, k) < 0])
        balance = rt.client.balance()
        ex = self.executor(rt.ledger, rt.client, rt.clock, self.cfg, run_id, rt.lock)
        scan.check_limits(rt, ex, balance, now, run_id, snapshot=True)
        state = rt.ledger.state()
        entries = []
        for symbol in sorted(set(state.positions) | set(self.entries.get(k, ()))):
            i = self.decided_at(symbol, k)
            if i < 0:
                continue
            d = self.data.data[symbol]
            position = state.positions.get(symbol)
            if position is not None:
                if self.wake.get(symbol) == k:
                    series, new = self.since_last_decision(d, i, position, now)
                    scan.manage_position(rt, ex, position, series, new,
                                         self.signal_fact(d, i, now, run_id), now, run_id)
            elif int(d.signal[i]) != 0 and symbol in state.active_coins:
                entries.append((symbol, d, i))
        current = balance  # as the scan: any order sent makes it stale
        for symbol, d, i in entries:
            signal = signal_of(self.strategy, d, i)
            _, sent = scan.enter(rt, ex, symbol, signal,
                                 self.signal_fact(d, i, now, run_id, signal), d.candle(i),
                                 self.frames(symbol, now), run_id, current)
            current = None if sent else current

    def record_fired_stops(self, now: int, symbols: list[str] | None = None) -> None:
        """Record the fill and close of a stop that fired, as the service's reconcile
        would, for the positions the scan does not decide on now: at the window's end
        (an order now would fill after the window; all of them), and after a hole in a
        symbol's candles, until its next decision (``symbols``). Else the account's wallet
        (which paid the loss) and the ledger's positions (still holding one, its slot
        taken) would disagree for as long."""
        if symbols == []:
            return
        rt, run_id = self.rt, f"scan-{now}"
        self.executor(rt.ledger, rt.client, rt.clock, self.cfg, run_id,
                      rt.lock).record_fired_stops(symbols)

    def since_last_decision(self, d, i: int, position: dict, now: int) -> tuple[list, list]:
        """(series, new) as the scan passes them to manage_position: the candles closed
        since the symbol's last decision (and since the position opened), and the one
        before them if the scan's fetch window holds it."""
        a, _ = d.window(now)
        first = max(int(d.prev_decided[i]) + 1, a)
        new = [d.candle(j) for j in range(first, i + 1)
               if int(d.ts[j]) + self.data.tf_ms > position["opened_ts"]]
        prev = [d.candle(first - 1)] if first - 1 >= a else []
        return prev + new, new

    def signal_fact(self, d, i: int, now: int, run_id: str, signal=None) -> Fact:
        """The scan's signal fact for candle i of d (as jobs/scan.py builds it)."""
        signal = signal or signal_of(self.strategy, d, i)
        return Fact("signal", now, run_id=run_id, symbol=d.symbol, side=signal.side,
                    reason=signal.reason, price=Decimal(repr(float(d.c[i]))),
                    data={**signal.to_record(), "candle_ts": int(d.ts[i])})

    def frames(self, symbol: str, now: int) -> dict:
        """The candles scan.enter reads: the candidate's, and the open positions' as the
        scan's correlation reads them (the last fetched, holes and all)."""
        out = {}
        for s in sorted({symbol, *self.ledger.state().positions}):
            d = self.data.data[s]
            if s != symbol or d.intact(now):
                out[s] = d.closes(now)
        return out

    def halting(self, state, now: int) -> bool:
        """A halt that closes every position is in force while positions remain: every
        scan retries the close (risk.check_account says so), so every step is looked at."""
        halts = active_halts(state, now)
        return bool(state.positions) and ("drawdown" in halts or (
            "daily_loss" in halts and self.cfg.risk.daily_loss_close_all))

    # -- between steps -----------------------------------------------------------------

    def after_step(self, k: int) -> None:
        """Refresh what the quiet steps are measured against, and record this step."""
        state = self.ledger.state()
        balance = self.client.balance()  # cached unless orders went out
        positions = state.positions
        self.active = set(state.active_coins)
        for symbol in list(self.wake):
            if symbol not in positions:
                del self.wake[symbol]
                self.watched.pop(symbol, None)
        for symbol, p in positions.items():
            if self.watched.get(symbol) != p or self.wake.get(symbol, k) <= k:
                self.watched[symbol] = p
                self.wake[symbol] = self.due_step(symbol, p, k)
        now = self.clock.now_ms()
        self.account = {
            "wallet": float(balance.total),
            "wallet_exact": balance.total,
            "legs": [(s, Decimal(p["amount"]) * (1 if p["side"] == "long" else -1),
                      Decimal(p["entry_price"])) for s, p in sorted(positions.items())],
            "peak": float(state.equity_peak) if state.equity_peak else None,
            "peak_exact": Decimal(state.equity_peak) if state.equity_peak else None,
            "day_start": float(state.day_start_equity) if state.day_start_equity else None,
            "halts": active_halts(state, now),
            "halting": self.halting(state, now),
        }
        self.equity[k - self.k0] = float(balance.equity)
        self.npos[k - self.k0] = len(positions)

    def due_step(self, symbol: str, position: dict, k: int) -> int:
        """The step at which this position's exit rules must next be evaluated."""
        d = self.data.data[symbol]
        w = watch_for(position, self.rules, self.client.market(symbol).price_step)
        i0 = d.last_at(int(self.data.grid[k])) + 1
        # The first candle that could change something: its stop may fire in it, which is
        # recorded at its close even if no decision is made then (a hole among the candles
        # it would rest on); the rules are evaluated with the next decision (after a
        # hole, one decision spans several candles: always evaluated).
        j = min(next_due(w, d.h, d.low, d.c, i0), d.next_decidable(i0, after_gap=True))
        return int(d.step[j]) if j < len(d.ts) else self.k1

    def quiet_until(self, k: int, end: int) -> int:
        """Fill the equity of steps [k, end) where nothing is scheduled; return the first
        of them the scan must look at after all (a new equity peak to record, a loss near
        a limit, a halt closing positions), else ``end``."""
        if k >= end:
            return k
        a = self.account
        if a["halting"] or self.reference:
            return k
        i0 = k - self.k0
        eq = np.full(end - k, a["wallet"])
        for symbol, signed, entry in a["legs"]:
            eq += float(signed) * (self.data.data[symbol].marks[k:end] - float(entry))
        trigger = np.zeros(end - k, dtype=bool)
        peak = a["peak"]
        if peak:
            trigger |= eq > peak * (1 + MARGIN)
            near = np.flatnonzero((eq > peak * (1 - MARGIN)) & ~trigger)
            for j in near[:1] if not a["legs"] else near:
                trigger[j] = self.new_peak_exactly(k + j)
            if "drawdown" not in a["halts"]:
                trigger |= (peak - eq) / peak * 100 >= self.cfg.risk.max_drawdown_pct - PCT_MARGIN
        dse = a["day_start"]
        if dse and "daily_loss" not in a["halts"]:
            trigger |= (dse - eq) / dse * 100 >= self.cfg.risk.daily_loss_limit_pct - PCT_MARGIN
        hit = np.flatnonzero(trigger)
        stop = int(hit[0]) if len(hit) else end - k
        self.equity[i0:i0 + stop] = eq[:stop]
        self.npos[i0:i0 + stop] = len(a["legs"])
        return k + stop if len(hit) else end

    def end_equity(self) -> Decimal:
        """The equity at the window's end, positions valued at its last closes: not at the
        next candle's open, which lies after the window (and in a walk-forward, in the test
        window of the training run that ends there)."""
        a, end = self.account, self.data.grid[self.k1 - 1]
        equity = a["wallet_exact"]
        for symbol, signed, entry in a["legs"]:
            d = self.data.data[symbol]
            equity += signed * (Decimal(repr(float(d.c[d.last_at(end)]))) - entry)
        return equity

    def new_peak_exactly(self, k: int) -> bool:
        """Would the venue's equity at step k exceed the recorded peak? (Only asked when the
        float estimate is within MARGIN of the peak.) The venue values positions at its
        last price: the same pure account arithmetic, with the same prices."""
        a, now = self.account, self.data.at(k)
        legs = {s: SimPosition(signed, entry, now) for s, signed, entry in a["legs"]}
        marks = {s: D(float(self.data.source.price(s, now))) for s in legs}
        equity = account(a["wallet_exact"], legs, marks, dict.fromkeys(legs, 1), []).equity
        return equity.quantize(Q8) > a["peak_exact"]

    def next_rotation_step(self) -> int:
        if self.next_rotation_ms is None:
            return self.k0
        return self.step_at_or_after(self.next_rotation_ms)

    def next_day_step(self) -> int:
        if self.last_day is None:
            return self.k0
        return self.step_at_or_after(self.last_day + DAY_MS)

    def step_at_or_after(self, ms: int) -> int:
        """The first step whose instant is at or after ``ms``."""
        return min(self.k1, int(self.data.grid.searchsorted(ms - self.data.tf_ms)))

    # -- records and results -----------------------------------------------------------

    def record_start(self) -> None:
        cfg = to_mapping(self.cfg)
        self.ledger.append([Fact(
            "note", self.clock.now_ms(), reason="backtest start",
            data={"kind": BACKTEST_KIND, "strategy": self.strategy.name,
                  "params": dict(self.strategy.params), "symbols": self.data.symbols,
                  "source": self.data.source.describe(),
                  "first_candle_ms": int(self.data.grid[self.k0]),
                  "last_candle_ms": int(self.data.grid[self.k1 - 1]), "config": cfg})])

    def result(self) -> BacktestResult:
        if not self.reference:
            self.ledger.flush()
        trades = self.ledger.select("SELECT * FROM closed_trades ORDER BY closed_seq")
        still_open = self.ledger.select("SELECT * FROM open_positions ORDER BY opened_seq")
        fees = self.ledger.select(
            "SELECT total(CAST(fee AS REAL)) AS fees FROM facts WHERE type = 'fill'")[0]["fees"]
        day_closes = self.ledger.select(
            "SELECT json_extract(data, '$.day') AS day, json_extract(data, '$.equity') AS equity "
            "FROM facts WHERE type = 'day_close' ORDER BY seq")
        return BacktestResult(
            db_path=str(self.ledger.path), config=self.cfg, strategy=self.strategy.name,
            params=dict(self.strategy.params), symbols=list(self.data.symbols),
            times=self.data.grid[self.k0:self.k1] + self.data.tf_ms, equity=self.equity,
            open_positions=self.npos, start_equity=self.start_equity, trades=trades,
            still_open=still_open, stale_marks=self.stale_marks(),
            fees=float(fees or 0.0), facts=self.ledger.last_seq(),
            elapsed_s=0.0, day_closes={r["day"]: float(r["equity"]) for r in day_closes
                                       if r["equity"] is not None})

    def close(self) -> None:
        self.ledger.close()
        self.venue.close()


__all__ = ["BacktestResult", "Engine", "run_backtest", "is_backtest_ledger", "BACKTEST_KIND"]
