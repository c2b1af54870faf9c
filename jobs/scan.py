"""Market scan: for every active coin and every coin with an open position.

fetch  closed candles (closed at the scan's start, concurrently, outside the lock),
       the balance
decide account limits (halts), exits of open positions, entry signals, risk
record  signals, risk decisions, best prices, halts; execute orders write-ahead

Everything after the candle fetch holds ``rt.lock``, so it never interleaves with
another job's exchange writes (reconcile).

Each symbol is decided once per closed candle: the ``signal`` fact records the candle
it decided on, so a second scan of the same candle only checks the account limits
(recording nothing unless one is crossed), and a restart resumes exactly where the
ledger says.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pandas as pd

from core import exits, risk
from core.clock import DAY_MS, iso, timeframe_ms, utc_day
from core.exchange_types import BadExchangeData, Candle
from core.execution import READ_ERRORS, Executor
from core.strategies import Signal, StrategyError
from jobs import daily_reset
from ledger import Fact

log = logging.getLogger(__name__)


def run(rt, scheduled_ms: int, run_id: str) -> dict:
    state = rt.ledger.state()
    symbols = sorted(set(state.active_coins) | set(state.positions))
    if not symbols:
        return {"skipped": True, "reason": "no active coins and no open positions"}
    # fetch (the slow part, concurrent, outside the lock). The balance (the account
    # limits need it every scan) alongside the candles rather than after: one round trip.
    cutoff = scan_instant(rt)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="balance") as pool:
        pending = pool.submit(rt.client.balance)
        candles = fetch_candles(rt, symbols, cutoff)
        balance = _result_or_none(pending)
    # The rest reads the ledger, decides and sends orders: serialised with the other jobs'
    # exchange writes (a reconcile must not close a position this scan is managing).
    with rt.lock:
        return decide_and_act(rt, symbols, candles, run_id, balance, as_of=cutoff)


def scan_instant(rt) -> int | None:
    """The exchange's time as the scan starts (None if it cannot be read: the candles'
    own fetches then judge, and report the problem)."""
    try:
        return rt.client.server_now_ms()
    except Exception as exc:  # noqa: BLE001 - closed_candles meets it again, per symbol
        log.debug("exchange clock not read before the scan: %s", exc)
        return None


def closed_by(series: list[Candle], cutoff: int | None, tf_ms: int) -> list[Candle]:
    """Only the candles closed when the scan started, for every symbol alike. A fetch
    judges "closed" by the exchange's time read after its answer came back, so a candle
    closing in between would count as closed with the values it had while forming; and
    one closing while the scan fetches would be decided now for the symbols fetched after
    its close and by the next scan for the others (the order of one candle's entries, so
    their sizes, slots and correlation checks, would depend on timing). Left to the next
    scan, it is decided complete, for every symbol at once, in symbol order."""
    return series if cutoff is None else [c for c in series if c.ts + tf_ms <= cutoff]


def _result_or_none(pending):
    if pending is None:
        return None
    try:
        return pending.result()
    except Exception as exc:  # noqa: BLE001 - fetched again (and reported) when needed
        log.debug("balance prefetch failed: %s", exc)
        return None


def decide_and_act(rt, symbols: list[str], candles: dict[str, list[Candle]],
                   run_id: str, balance=None, as_of: int | None = None) -> dict:
    cfg = rt.config
    state = rt.ledger.state()
    fresh = {s: c for s, c in candles.items() if c and c[-1].ts > state.last_signal.get(s, -1)}
    summary: dict = {"symbols": len(symbols), "new_candles": len(fresh)}
    try:
        balance = balance or rt.client.balance()
    except READ_ERRORS as exc:
        # Without the balance there are no limits and no entries; the positions are
        # still managed (their exits and trailing stops need no balance).
        log.warning("account limits not checked, no entry: balance unavailable (%s)", exc)
        summary["limits"] = "not checked: balance unavailable"
        summary["degraded"] = f"balance unavailable ({type(exc).__name__}): no limits, no entries"
        balance = None
    now = rt.clock.now_ms()
    ex = Executor(rt.ledger, rt.client, rt.clock, cfg, run_id, rt.lock)
    # Account limits first, on every scan: a loss inside a candle, or while candles
    # cannot be read, halts at once. A halt may close everything.
    halts = check_limits(rt, ex, balance, now, run_id, snapshot=bool(fresh)) \
        if balance is not None else []
    if halts:
        summary["halts"] = halts
    # A position left with no stop (placements refused) is protected now, not a candle
    # later when its symbol is decided again.
    rules = rt.strategy.exit_rules(cfg.exits)
    protected = sum(ex.protect(p, rules.stop_loss_pct) is not None
                    for _, p in sorted(rt.ledger.state().positions.items()))
    if protected:
        summary["stops_placed"] = protected
    if not fresh:
        return summary
    summary.update(entries=0, exits=0)
    state = rt.ledger.state()

    frames = {s: frame(c) for s, c in candles.items() if c}
    tf = timeframe_ms(cfg.strategy.timeframe)
    entries, quiet, failed = [], [], []
    for symbol, series in sorted(fresh.items()):
        try:
            signal = rt.strategy.decide(frames[symbol])
        except Exception as exc:  # noqa: BLE001 - strategy code: the other symbols go on
            log.error("%s: strategy %r failed on the candle closed at %s, decided none: %s: %s",
                      symbol, rt.strategy.name, iso(series[-1].ts + tf), type(exc).__name__,
                      exc)
            failed.append(f"{symbol} ({type(exc).__name__}: {exc})")
            # Recorded as decided: the same candles fail the same way, and left fresh the
            # symbol was tried again at every scan, each writing a balance snapshot and an
            # error run. A position's exit rules are not the entry rule: they still run.
            signal = Signal(rt.strategy.name, "none", "strategy_error",
                            f"{type(exc).__name__}: {exc}", series[-1].ts, {},
                            dict(rt.strategy.params))
        signal_fact = Fact("signal", now, run_id=run_id, symbol=symbol, side=signal.side,
                           reason=signal.reason, price=Decimal(repr(series[-1].close)),
                           data={**signal.to_record(), "candle_ts": series[-1].ts})
        position = state.positions.get(symbol)
        # The candles closed since the last decision, and not before the position opened
        # (an adopted position has no decision yet: its past is not its own).
        new = [c for c in series if c.ts > state.last_signal.get(symbol, -1)
               and (position is None or c.ts + tf > position["opened_ts"])]
        if position is not None and new:
            summary["exits"] += manage_position(rt, ex, position, series, new, signal_fact,
                                                now, run_id)
        elif position is None and balance is None:
            continue  # left undecided: decided once the balance is known, if still fresh
        elif position is None and signal.side in ("long", "short") \
                and symbol in state.active_coins:
            entries.append((symbol, signal, signal_fact, series[-1]))
        else:
            quiet.append(signal_fact)
    if quiet:  # decisions that act on nothing: one transaction for all of them
        rt.ledger.append(quiet)

    current = balance  # fetched this scan; any order sent makes it stale
    for i, (symbol, signal, signal_fact, last) in enumerate(entries):
        if rt.stopping.is_set():  # the service is stopping: no new position now
            log.info("stop requested: %d entries not made", len(entries) - i)
            rt.ledger.append([e[2] for e in entries[i:]])  # the decisions, as made
            break
        opened, sent = enter(rt, ex, symbol, signal, signal_fact, last, frames, run_id,
                             current, as_of=as_of if as_of is not None else now)
        summary["entries"] += opened
        current = None if sent else current
    if failed:  # the run is an error (the dashboard's job status shows it), once all is done
        error = StrategyError(f"strategy {rt.strategy.name!r} failed on {len(failed)} "
                              f"symbol(s), decided none (strategy_error): {'; '.join(failed)}")
        error.partial_summary = summary  # what the run did besides: recorded with the error
        raise error
    return summary


def fetch_candles(rt, symbols: list[str],
                  cutoff: int | None = None) -> dict[str, list[Candle]]:
    """Candles closed by ``cutoff`` (the scan's start) per symbol, fetched concurrently
    over the data clients; a series with a hole among the candles a decision rests on is
    left out. Cut before that check: a candle closing during the fetch moved the checked
    candles one on, so a hole still under the decided candle's look-back went unseen."""
    tf, limit = rt.config.strategy.timeframe, rt.config.strategy.candles
    clients = rt.data_clients
    tf_ms = timeframe_ms(tf)
    lookback = max(int(rt.strategy.warmup), 1) + 1  # the candles a decision rests on

    def one(client, symbol: str) -> tuple[str, list[Candle]]:
        try:
            candles = closed_by(client.closed_candles(symbol, tf, limit), cutoff, tf_ms)
            rt.last_candles[symbol] = candles
            hole = first_gap(candles[-lookback:], tf_ms)
            if hole is None:
                return symbol, candles
            # Rows were dropped (bad data) or are missing: the decision would rest on a
            # damaged series. Skip it; the next scan fetches again.
            log.warning("%s: candle %s missing among the last %d; skipped this scan", symbol,
                        iso(hole), lookback)
        except BadExchangeData as exc:
            log.warning("%s: candles unusable, skipped this scan (%s)", symbol, exc)
        except Exception as exc:  # noqa: BLE001 - one coin's failure must not stop the scan
            log.warning("%s: candles unavailable, skipped this scan (%s)", symbol, exc)
        return symbol, []

    # With three or more clients the first two have other lanes (balance, the exchange's
    # clock: see runtime.build) and the rest fetch candles.
    lanes = clients[2:] if len(clients) > 2 else clients

    def share(j: int) -> list[tuple[str, list[Candle]]]:
        # Each client fetches its own share in turn: a client serves one call at a time.
        return [one(lanes[j], symbol) for symbol in symbols[j::len(lanes)]]

    workers = min(len(lanes), len(symbols))
    if workers <= 1:
        return dict(share(0)) if symbols else {}
    with ThreadPoolExecutor(max_workers=workers + 1, thread_name_prefix="candles") as pool:
        # The exchange's clock (judging which candle is closed) is measured meanwhile,
        # not after the candles: one round trip for the lot.
        pool.submit(_warm_clock, clients[0])
        return {s: c for part in pool.map(share, range(workers)) for s, c in part}


def _warm_clock(client) -> None:
    try:
        client.server_now_ms()
    except Exception as exc:  # noqa: BLE001 - closed_candles retries and reports it
        log.debug("exchange clock not measured ahead: %s", exc)


def first_gap(candles: list[Candle], tf_ms: int) -> int | None:
    """Open time of the first candle missing between the first and the last given."""
    for a, b in zip(candles, candles[1:], strict=False):
        if b.ts - a.ts != tf_ms:
            return a.ts + tf_ms
    return None


def frame(candles: list[Candle]) -> pd.DataFrame:
    return pd.DataFrame([(c.ts, c.open, c.high, c.low, c.close, c.volume) for c in candles],
                        columns=["ts", "open", "high", "low", "close", "volume"])


def balance_fact(balance, now: int, run_id: str) -> Fact:
    return Fact("balance", now, run_id=run_id,
                data={"currency": balance.currency, "total": balance.total,
                      "free": balance.free, "used": balance.used, "equity": balance.equity})


def manage_position(rt, ex: Executor, position: dict, series: list[Candle],
                    new: list[Candle], signal_fact: Fact, now: int, run_id: str) -> int:
    """Exit rules on the candles closed since the last decision. 1 if it exited."""
    rules = rt.strategy.exit_rules(rt.config.exits)
    prev = [c for c in series if c.ts < new[0].ts]
    decision = exits.evaluate_exit(position, max(c.high for c in new), min(c.low for c in new),
                                   new[-1].close, prev[-1].close if prev else None, rules)
    facts = [signal_fact]
    if decision.changed:
        facts.append(Fact("best_price", now, run_id=run_id, symbol=position["symbol"],
                          price=decision.best_price, position_id=position["position_id"],
                          reason=decision.reason,
                          data={"trailing_active": decision.trailing_active,
                                "trail_pct": decision.trail_pct, "detail": decision.detail}))
    if decision.exit:
        log.info("%s: exit (%s) %s", position["symbol"], decision.reason, decision.detail)
        ex.close_position(position, decision.reason, new[-1].ts, before=facts)
        return 1
    rt.ledger.append(facts)
    stop = position.get("stop") or {}
    resting = exits.as_decimal(stop.get("price"))
    market = rt.client.market(position["symbol"])
    if decision.stop_price is not None and exits.stop_needs_move(
            position["side"], resting, decision.stop_price, stop.get("ts"), now,
            rules.stop_move_interval_s, market.price_step):
        fresh = rt.ledger.state().positions.get(position["symbol"])
        if fresh is not None:
            ex.move_stop(fresh, decision.stop_price)
    return 0


def enter(rt, ex: Executor, symbol: str, signal, signal_fact: Fact, last: Candle,
          frames: dict, run_id: str, balance=None, as_of: int | None = None
          ) -> tuple[int, bool]:
    """Risk-check one entry against fresh state and balance; send it if approved.

    ``balance``: one fetched since the last order was sent (else it is fetched here), so
    every entry is checked against the balance as it stands. ``as_of``: when the candles
    were fetched (the exchange's time), what their freshness is judged against. Returns
    (positions opened, whether an order was sent): one sent whose outcome is unknown may
    have used margin.
    """
    state = rt.ledger.state()
    now = rt.clock.now_ms()
    try:
        balance = balance or rt.client.balance()
    except READ_ERRORS as exc:  # left undecided, as when the scan's own read failed
        log.warning("%s: entry not decided, balance unavailable (%s)", symbol, exc)
        return 0, False
    try:
        market = rt.client.market(symbol)
    except Exception as exc:  # noqa: BLE001 - skip this entry, keep the scan going
        log.warning("%s: entry skipped, market unavailable (%s)", symbol, exc)
        rt.ledger.append([signal_fact])
        return 0, False
    rules = rt.strategy.exit_rules(rt.config.exits)
    exposure = risk.RiskState.from_ledger(state, now)
    decision = risk.check_entry(symbol=symbol, side=signal.side, price=last.close, market=market,
                                state=exposure, balance=balance, now_ms=now, config=rt.config,
                                closes=correlation_closes(rt, exposure, frames),
                                stop_pct=rules.stop_loss_pct, candle_ts=last.ts, as_of_ms=as_of)
    risk_fact = Fact("risk_decision", now, run_id=run_id, symbol=symbol, side=signal.side,
                     amount=decision.amount if decision.approved else None,
                     reason=decision.reason, data=decision.to_record())
    if not decision.approved:
        log.info("%s: %s entry refused: %s (%s)", symbol, signal.side, decision.reason,
                 decision.detail)
        rt.ledger.append([signal_fact, risk_fact])
        return 0, False
    log.info("%s: %s entry approved: %s", symbol, signal.side, decision.detail)
    position = ex.open_position(symbol, signal.side, decision.amount, last.ts,
                                stop_pct=rules.stop_loss_pct,
                                ref_price=Decimal(repr(last.close)),
                                before=[signal_fact, risk_fact])
    return (1 if position is not None else 0), True


def correlation_closes(rt, exposure: risk.RiskState, frames: dict) -> dict:
    """This scan's frames, and for the symbols held (or flagged, or being entered) that
    it could not fetch intact, the candles last fetched: a hole or a failed read must not
    hide a correlation, nor block every entry while it lasts."""
    exposed = exposure.symbols() | exposure.external | set(exposure.pending_entries)
    cached = {s: frame(rt.last_candles[s]) for s in sorted(exposed - set(frames))
              if rt.last_candles.get(s)}
    return {**cached, **frames}


def check_limits(rt, ex: Executor, balance, now: int, run_id: str, snapshot: bool
                 ) -> list[str]:
    """The account limits on this balance; the halts they call for, applied. A scan with
    new candles records the balance it decides on; one without, only a balance behind a
    new halt (why it halted stays answerable in SQL) or at a new equity peak (drawdown
    is measured from the peaks a scan saw, not only those at candle closes). A UTC day
    that ended is closed first: today's loss is measured from today's start, whichever
    job runs first."""
    if snapshot:
        rt.ledger.append([balance_fact(balance, now, run_id)])
    state = rt.ledger.state()
    if state.last_day_closed != utc_day(now - DAY_MS) \
            and daily_reset.close_days(rt, run_id, balance, ex).get("closed_days"):
        state = rt.ledger.state()
    # vars(): the state's fields as a dict, read without another deep copy
    actions = risk.check_account(risk.RiskState.from_ledger(vars(state), now), balance.equity,
                                 now, rt.config.risk)
    if not snapshot and (any(a.new for a in actions) or new_peak(state, balance.equity)):
        rt.ledger.append([balance_fact(balance, now, run_id)])
    for action in actions:
        apply_halt(rt, ex, state, action, now, run_id)
    return [a.kind for a in actions]


# A peak between candle closes is recorded once it tops the recorded one by this much:
# drawdown is then measured from at most 0.1 % below the true peak, and a climbing equity
# adds a balance fact per 0.1 % it gains, not one every 10 s scan.
PEAK_STEP = Decimal("0.001")


def new_peak(state, equity) -> bool:
    """Whether ``equity`` tops the peak the ledger holds by PEAK_STEP or more."""
    eq = exits.as_decimal(equity)
    return eq is not None and (state.equity_peak is None
                               or eq >= Decimal(state.equity_peak) * (1 + PEAK_STEP))


def apply_halt(rt, ex: Executor, state, action, now: int, run_id: str) -> None:
    """Record a new halt; close positions and cancel stops when the limit says so.

    Closing is tried once per candle (the exit's id is the candle's): the limits are
    checked every scan, and a refused exit must not be sent again every 10 s (nor one
    on top of an exit whose outcome is unknown: close_position refuses that)."""
    if action.new:
        log.warning("HALT %s: %s", action.kind, action.detail)
        rt.ledger.append([Fact("halt", now, run_id=run_id, reason=action.reason,
                               data={"kind": action.kind, "detail": action.detail,
                                     "until_ms": action.until_ms, "close_all": action.close_all,
                                     "numbers": dict(action.numbers)})])
    if action.close_all:
        tf = timeframe_ms(rt.config.strategy.timeframe)
        for position in list(state.positions.values()):
            ex.close_position(position, f"halt:{action.kind}", now - now % tf)
