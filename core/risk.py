"""Position sizing and risk limits, as pure functions.

Every decision is a dataclass with a machine-readable ``reason``, a human ``detail``
and the numbers it used, for the caller to record (``risk_decision`` facts). Nothing
here reads a clock: ``now_ms`` is passed in.

Sizing (``[risk] sizing``):

* ``fraction`` - target notional = ``equity * trade_fraction * leverage / slots``
  (slots = ``[rotation] top_n``): the leveraged balance split evenly over the slots.
  Equity, not free balance, so the eighth slot is as large as the first.
* ``risk`` - target notional = ``equity * risk_pct / stop_loss_pct``: the position
  loses ``risk_pct`` % of equity if the stop hits.

The target is then capped by ``max_position_notional``, by what is left of
``max_total_notional``, and by the free margin: margin plus taker fee within
``FREE_BALANCE_USE`` of it - the balance is re-checked before every entry. Exposure
without a ledger position counts against the position, notional and correlation limits
too: flagged external positions and entry orders not settled yet. The amount is truncated
to the market's amount step (as ccxt's ``amount_to_precision`` does) and must meet
the market's minimum amount and minimum notional; it is never rounded up.

Entry limits, in order (the first that fails is the reason): a decision on a candle
that is not the newest closed one (``stale_candles``: the symbol's feed stopped), active halts
(``halted:<kind>``), daily loss limit, max drawdown, the last reconciliation failed
(``reconcile_failed``), a position already open in the symbol, an entry order in it not
settled yet (``entry_pending``, for a few reconcile intervals), a stop of a closed
position that may still rest in it (``stray_stop``), a flagged external position in it
(``external_position``), max open positions (unsettled entries count),
cooldown after a losing exit, return correlation with an open position (or
``correlation_unknown`` without any candles to measure it), notional caps, balance,
minimums.

Account limits (:func:`check_account`):

* **Daily loss** = ``(day_start_equity - equity) / day_start_equity`` with equity
  including unrealised PnL (stricter than realised-only: a deep open loss counts).
  At ``daily_loss_limit_pct`` -> halt ``daily_loss`` until the next UTC midnight
  (optionally closing everything).
* **Drawdown** = ``(peak - equity) / peak`` from the recorded equity peak. At
  ``max_drawdown_pct`` -> halt ``drawdown``: close all, cancel orders, until
  ``cli.py resume``. (The fold must reset the equity peak on resume, or the next check
  halts again.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import pandas as pd

from core.clock import DAY_MS, day_start_ms, iso, timeframe_ms, utc_day
from core.exchange_types import MarketInfo
from core.exits import as_decimal, pct

ZERO = Decimal(0)
HUNDRED = Decimal(100)
FREE_BALANCE_USE = Decimal("0.98")  # share of free margin an entry may use (fees, slippage)
HALT_ORDER = ("drawdown", "daily_loss")  # reported first when several halts are active
SizingMode = Literal["fraction", "risk"]


# How many reconcile runs an unsettled entry order blocks its symbol for.
PENDING_ENTRY_RUNS = 3

# -- state ---------------------------------------------------------------------------

@dataclass(frozen=True)
class OpenExposure:
    symbol: str
    side: str  # "long" | "short"
    notional: Decimal  # at entry price


def _exposures(raw: Any) -> tuple[OpenExposure, ...]:
    """OpenExposure per position dict (symbol, side and either ``notional`` or ``amount``
    and ``entry_price``, times ``contract_size``, default 1); a list or a dict of them."""
    items = raw.values() if isinstance(raw, Mapping) else raw
    out = []
    for p in items:
        if isinstance(p, OpenExposure):
            out.append(p)
            continue
        notional = as_decimal(p.get("notional"))
        if notional is None:
            amount, entry = as_decimal(p.get("amount")), as_decimal(p.get("entry_price"))
            size = as_decimal(p.get("contract_size")) or Decimal(1)
            notional = abs(amount * entry * size) if amount is not None and entry else ZERO
        out.append(OpenExposure(str(p["symbol"]), str(p["side"]), notional))
    return tuple(out)


@dataclass(frozen=True)
class RiskState:
    """The slice of the folded ledger state the risk checks read."""

    positions: tuple[OpenExposure, ...] = ()
    halts: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    day_start_equity: Decimal | None = None
    realized_today: Decimal = ZERO
    equity_peak: Decimal | None = None
    last_loss_exit_ms: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    external: frozenset[str] = frozenset()  # symbols holding a position the bot did not open
    # symbol -> when its entry order not settled yet was decided (sent, its outcome not
    # known or not final): it may have opened a position the ledger does not hold yet
    pending_entries: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    # symbol -> (side, amount) of that order: the exposure it may hold (priced by the
    # entry check at the symbol's last close)
    pending_amounts: Mapping[str, tuple[str, Decimal]] = field(
        default_factory=lambda: MappingProxyType({}))
    # The flagged external positions' exposure (at the exchange's entry price): real
    # exposure on the account, counted by every limit on positions
    external_exposure: tuple[OpenExposure, ...] = ()
    # The last reconciliation failed: what the exchange holds is not known to match the
    # ledger (a position it could not place, an order it could not settle).
    reconcile_failed: bool = False
    # Symbols where a stop of ours may still rest for a position no longer open (its
    # cancel failed; reconcile cancels it): reduce-only, it would close a new one.
    stray_stops: frozenset[str] = frozenset()

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any]) -> RiskState:
        """From a plain summary dict with the same keys as the fields. ``positions`` may be
        a list or a dict of ledger position dicts: each needs symbol, side and either
        ``notional`` or ``amount`` and ``entry_price`` (times ``contract_size``, default 1)."""
        external = summary.get("external") or ()
        orders = (summary.get("orders") or {}).values()
        entries = [o for o in orders if o.get("purpose") == "entry" and o.get("symbol")]
        positions = summary.get("positions") or ()
        open_ids = {p.get("position_id") for p in (
            positions.values() if isinstance(positions, Mapping) else positions)}
        return cls(
            positions=_exposures(summary.get("positions") or ()),
            halts=MappingProxyType(dict(summary.get("halts") or {})),
            day_start_equity=as_decimal(summary.get("day_start_equity")),
            realized_today=as_decimal(summary.get("realized_today")) or ZERO,
            equity_peak=as_decimal(summary.get("equity_peak")),
            last_loss_exit_ms=MappingProxyType({str(k): int(v) for k, v in
                                                (summary.get("last_loss_exit_ms") or {}).items()}),
            external=frozenset(str(s) for s in external),
            external_exposure=_exposures(
                [{**p, "symbol": s, "entry_price": p.get("price")}
                 for s, p in external.items() if isinstance(p, Mapping)]
                if isinstance(external, Mapping) else ()),
            pending_entries=MappingProxyType({
                str(o["symbol"]): int(o.get("ts") or 0) for o in entries}),
            pending_amounts=MappingProxyType({
                str(o["symbol"]): ("long" if o.get("side") == "buy" else "short",
                                   abs(as_decimal(o.get("amount")) or ZERO)) for o in entries}),
            reconcile_failed=((summary.get("last_runs") or {}).get("reconcile") or {}).get(
                "outcome") == "error",
            stray_stops=frozenset(str(o["symbol"]) for o in orders if o.get("purpose") == "stop"
                                  and o.get("symbol") and o.get("position_id") not in open_ids),
        )

    @classmethod
    def from_ledger(cls, state: Any, now_ms: int) -> RiskState:
        """From the ledger fold's ``State`` (or its ``to_dict()``): positions keyed by
        symbol, halts ``{kind: {reason, ts}}``, ``last_loss_exit``, and realised PnL that
        counts only if its ``day`` is today's UTC day."""
        d = state.to_dict() if hasattr(state, "to_dict") else dict(state)
        today = d.get("day") == utc_day(now_ms)
        return cls.from_summary({**d, "realized_today": d.get("realized_today") if today else 0,
                                 "last_loss_exit_ms": d.get("last_loss_exit_ms")
                                 or d.get("last_loss_exit") or {}})

    @property
    def total_notional(self) -> Decimal:
        return sum((p.notional for p in self.positions), ZERO)

    def symbols(self) -> set[str]:
        return {p.symbol for p in self.positions}

    def active_halts(self, now_ms: int) -> dict[str, str]:
        """kind -> reason of every halt in force. A halt value is a reason string, True, or
        a dict with optional ``reason``, ``ts`` and ``until_ms`` (expired once now >=
        until_ms). A ``daily_loss`` halt with a ``ts`` but no ``until_ms`` ends at the next
        UTC midnight after ``ts`` even if the daily reset has not run yet."""
        active = {}
        for kind, value in self.halts.items():
            if not value:
                continue
            if isinstance(value, Mapping):
                until = value.get("until_ms")
                if until is None and kind == "daily_loss" and value.get("ts") is not None:
                    until = next_utc_midnight(int(value["ts"]))
                if until is not None and now_ms >= int(until):
                    continue
                active[kind] = str(value.get("reason") or kind)
            else:
                active[kind] = value if isinstance(value, str) else kind
        return active

    def with_entry(self, symbol: str, side: str, notional: Decimal) -> RiskState:
        """The state after an approved entry fills (a scan checks several entries in turn)."""
        return replace(self, positions=(*self.positions, OpenExposure(symbol, side, notional)))

    def with_exit(self, symbol: str, now_ms: int, loss: bool) -> RiskState:
        """The state after the position in ``symbol`` closed (a loss starts the cooldown)."""
        last = dict(self.last_loss_exit_ms)
        if loss:
            last[symbol] = now_ms
        return replace(self, positions=tuple(p for p in self.positions if p.symbol != symbol),
                       last_loss_exit_ms=MappingProxyType(last))


# -- sizing --------------------------------------------------------------------------

def truncate_amount(amount: Decimal, step: Decimal | None) -> Decimal:
    """Down to a multiple of ``step`` (toward zero), like ccxt's amount_to_precision."""
    if step is None or step <= 0:
        return amount
    out = (amount // step) * step  # // is exact integer division, toward zero
    return out.quantize(Decimal(1)) if out.as_tuple().exponent > 0 else out  # no "1.2E+2"


def orderable(amount: Decimal, market: MarketInfo) -> Decimal:
    """What one order can carry of ``amount``: down to the lot step, nothing below the
    market's minimum. Of a position finer than the step (the step grew under it), the
    rest is held by no stop and sold by no market order."""
    out = truncate_amount(amount, market.amount_step)
    if out <= 0 or (market.min_amount is not None and out < market.min_amount):
        return Decimal(0)
    return out


@dataclass(frozen=True)
class SizeResult:
    ok: bool
    reason: str  # "ok" | "bad_input" | "below_min_amount" | "below_min_notional"
    detail: str
    amount: Decimal
    notional: Decimal
    target_notional: Decimal
    capped_by: str | None = None


def target_notional(mode: SizingMode, equity: Decimal, *, trade_fraction: float,
                    risk_pct: float, leverage: int, slots: int, stop_pct: float,
                    fee_rate: Decimal = ZERO) -> Decimal:
    """Notional the sizing mode aims for, before caps and precision. ``risk``: a stop hit
    costs at most ``risk_pct`` of equity, the taker fees (``fee_rate``) of the entry and
    of the stop's fill included (slippage is not). The fill's notional is the entry's
    moved by the stop distance: larger for a short, so that side bounds both."""
    if mode == "fraction":
        return equity * pct(trade_fraction) * leverage / max(int(slots), 1)
    if mode == "risk":
        stop = pct(stop_pct)
        return equity * pct(risk_pct) / (stop + HUNDRED * fee_rate * (2 + stop / HUNDRED))
    raise ValueError(f"sizing must be 'fraction' or 'risk', not {mode!r}")


def size_entry(*, mode: SizingMode, price: Any, equity: Any, market: MarketInfo,
               trade_fraction: float, risk_pct: float, leverage: int, slots: int,
               stop_pct: float, caps: Mapping[str, Decimal] | None = None,
               fee_rate: Decimal = ZERO) -> SizeResult:
    """Amount to enter at ``price``: target notional, capped by the smallest of ``caps``
    (name -> max notional), truncated to the amount step, capped by the most one order may
    carry, checked against minimums."""
    p, eq = as_decimal(price), as_decimal(equity)
    if p is None or p <= 0 or eq is None or eq <= 0 or leverage < 1 or stop_pct <= 0:
        return SizeResult(False, "bad_input", f"price {price!r}, equity {equity!r}, leverage "
                          f"{leverage}, stop {stop_pct}%: cannot size", ZERO, ZERO, ZERO)
    target = target_notional(mode, eq, trade_fraction=trade_fraction, risk_pct=risk_pct,
                             leverage=leverage, slots=slots, stop_pct=stop_pct,
                             fee_rate=fee_rate)
    wanted, capped_by = target, None
    for name, cap in (caps or {}).items():
        if cap < wanted:
            wanted, capped_by = max(cap, ZERO), name
    unit = p * market.contract_size
    amount = truncate_amount(wanted / unit, market.amount_step)
    if market.max_amount is not None and amount > market.max_amount:
        amount, capped_by = truncate_amount(market.max_amount, market.amount_step), "max_amount"
    notional = amount * unit
    result = dict(amount=amount, notional=notional, target_notional=target, capped_by=capped_by)
    if amount <= 0 or (market.min_amount is not None and amount < market.min_amount):
        return SizeResult(False, "below_min_amount", f"amount {amount} below the minimum "
                          f"{market.min_amount or 'step'} (notional wanted {wanted:.4f})",
                          **result)
    if market.min_notional is not None and notional < market.min_notional:
        return SizeResult(False, "below_min_notional", f"notional {notional} below the minimum "
                          f"{market.min_notional}", **result)
    return SizeResult(True, "ok", f"{amount} at {p} = {notional:.4f} notional "
                      f"({mode} sizing, target {target:.4f}"
                      + (f", capped by {capped_by}" if capped_by else "") + ")", **result)


# -- correlation ---------------------------------------------------------------------

def _ts_closes(data: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ts, close) arrays in ts order, one close per ts (the last given), from a closes
    Series or anything with ``ts`` and ``close`` columns (a candle frame)."""
    if isinstance(data, pd.Series):
        ts, close = data.index.to_numpy(), data.to_numpy(float)
    else:
        ts, close = np.asarray(data["ts"]), np.asarray(data["close"], dtype=float)
    if len(ts) > 1 and not (ts[1:] > ts[:-1]).all():
        order = np.argsort(ts, kind="stable")
        ts, close = ts[order], close[order]
        last = np.append(ts[1:] != ts[:-1], True)
        ts, close = ts[last], close[last]
    return ts, close


def return_correlation(a: Any, b: Any, window: int) -> float | None:
    """Pearson correlation of the last ``window`` candle returns of two close series,
    aligned on timestamps (returns between consecutive shared candles); None with too
    little overlap (under ``min(window, max(10, window // 2))`` returns) or a flat series."""
    (ta, ca), (tb, cb) = _ts_closes(a), _ts_closes(b)
    _, ia, ib = np.intersect1d(ta, tb, assume_unique=True, return_indices=True)
    x, y = ca[ia], cb[ib]
    with np.errstate(divide="ignore", invalid="ignore"):
        rx, ry = x[1:] / x[:-1] - 1.0, y[1:] / y[:-1] - 1.0
    ok = np.isfinite(rx) & np.isfinite(ry)
    rx, ry = rx[ok][-window:], ry[ok][-window:]
    if len(rx) < min(window, max(10, window // 2)):
        return None
    if np.std(rx) == 0 or np.std(ry) == 0:
        return None
    c = float(np.corrcoef(rx, ry)[0, 1])
    return c if math.isfinite(c) else None


# -- entry check ---------------------------------------------------------------------

@dataclass(frozen=True)
class RiskDecision:
    """Whether an entry may go ahead, and with which amount."""

    approved: bool
    reason: str  # "approved" or the first failed check, e.g. "max_positions", "halted:drawdown"
    detail: str
    symbol: str
    side: str
    amount: Decimal | None = None
    notional: Decimal | None = None
    checks: Mapping[str, Any] = field(default_factory=dict)  # the numbers looked at

    def to_record(self) -> dict[str, Any]:
        """JSON-ready (Decimals as strings) for the ledger."""
        return {"approved": self.approved, "reason": self.reason, "detail": self.detail,
                "symbol": self.symbol, "side": self.side,
                "amount": None if self.amount is None else str(self.amount),
                "notional": None if self.notional is None else str(self.notional),
                "checks": _plain(self.checks)}


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_plain(v) for v in value]
    return value


def daily_loss_pct(state: RiskState, equity: Decimal) -> Decimal | None:
    dse = state.day_start_equity
    if dse is None or dse <= 0:
        return None
    return (dse - equity) / dse * HUNDRED


def drawdown_pct(state: RiskState, equity: Decimal) -> Decimal | None:
    peak = max(state.equity_peak or equity, equity)
    if peak <= 0:
        return None
    return (peak - equity) / peak * HUNDRED


def check_entry(*, symbol: str, side: str, price: Any, market: MarketInfo, state: RiskState,
                balance: Any, now_ms: int, config: Any,
                closes: Mapping[str, Any] | None = None,
                stop_pct: float | None = None, candle_ts: int | None = None,
                as_of_ms: int | None = None) -> RiskDecision:
    """Approve or refuse one entry and size it.

    ``balance``: a fresh ``BalanceReport`` (or anything with ``free`` and ``equity``);
    ``config``: the whole Config (risk, exchange.leverage, rotation.top_n,
    exits.stop_loss_pct); ``closes``: symbol -> closes (Series by ts, or a candle frame)
    for the candidate and the open positions' symbols, for the correlation limit;
    ``stop_pct``: the strategy's stop distance if it differs from ``[exits]``;
    ``candle_ts``: the open time of the candle decided on, refused if a newer one had
    closed when the candles were fetched (``as_of_ms``, default ``now_ms``).
    """
    rc = config.risk
    leverage = int(config.exchange.leverage)
    stop = float(stop_pct if stop_pct is not None else config.exits.stop_loss_pct)
    checks: dict[str, Any] = {}

    def refuse(reason: str, detail: str) -> RiskDecision:
        return RiskDecision(False, reason, detail, symbol, side, None, None, checks)

    p = as_decimal(price)
    equity = as_decimal(getattr(balance, "equity", None))
    free = as_decimal(getattr(balance, "free", None))
    checks.update(price=p, equity=equity, free=free)
    if side not in ("long", "short"):
        return refuse("bad_input", f"side {side!r} is not long/short")
    if p is None or p <= 0 or equity is None or free is None:
        return refuse("bad_input", f"price {price!r} / balance {balance!r} not usable")
    tf = timeframe_ms(config.strategy.timeframe)
    fetched = now_ms if as_of_ms is None else as_of_ms
    if candle_ts is not None and candle_ts + 2 * tf <= fetched:
        # The newest candle the exchange gave closed over a timeframe ago: the symbol's
        # feed has stopped (a trading halt, a delisting): its price is not today's.
        return refuse("stale_candles", f"the newest candle of {symbol} closed at "
                      f"{iso(candle_ts + tf)}, over a {config.strategy.timeframe} ago")

    if symbol in config.rotation.blacklist:  # added since the coins were chosen
        return refuse("blacklisted", f"{symbol} is in [rotation] blacklist")

    halts = state.active_halts(now_ms)
    checks["halts"] = sorted(halts)
    if halts:
        kind = next((k for k in HALT_ORDER if k in halts), sorted(halts)[0])
        return refuse(f"halted:{kind}", f"trading halted ({kind}: {halts[kind]})")

    loss = daily_loss_pct(state, equity)
    checks["daily_loss_pct"] = loss
    if loss is not None and loss >= pct(rc.daily_loss_limit_pct):
        return refuse("daily_loss_limit", f"down {loss:.2f}% since the UTC day start "
                      f"(limit {rc.daily_loss_limit_pct}%)")
    dd = drawdown_pct(state, equity)
    checks["drawdown_pct"] = dd
    if dd is not None and dd >= pct(rc.max_drawdown_pct):
        return refuse("max_drawdown", f"drawdown {dd:.2f}% from the equity peak "
                      f"(limit {rc.max_drawdown_pct}%)")

    if state.reconcile_failed:
        return refuse("reconcile_failed", "the last reconciliation failed: no new exposure "
                      "until the ledger is squared with the exchange again")
    if symbol in state.symbols():
        return refuse("position_open", f"a position in {symbol} is already open")
    # An unsettled entry may have opened a position: another would double it. Reconcile
    # settles the order or finds the position (flagged if the ledger cannot place it);
    # one it cannot settle (forgotten by the exchange) blocks only a few of its runs.
    window = PENDING_ENTRY_RUNS * config.schedule.reconcile_interval_s * 1000
    pending = {s for s, ts in state.pending_entries.items() if now_ms - ts < window}
    if symbol in pending:
        return refuse("entry_pending", f"an entry order in {symbol} has not settled yet "
                      "(reconcile settles it)")
    if symbol in state.stray_stops:
        return refuse("stray_stop", f"a stop of a closed position may still rest in {symbol}: "
                      "it would close a new one (reconcile cancels it)")
    if symbol in state.external:
        # One-way mode: an order here would add to (or close) someone else's position.
        return refuse("external_position", f"{symbol} holds a position the bot did not "
                      "open (flagged by reconcile); close or adopt it first")
    # An unsettled entry may hold a position; a flagged external one does.
    held = len(state.symbols() | pending | state.external)
    checks["open_positions"] = held
    if held >= rc.max_open_positions:
        return refuse("max_positions", f"{held} positions open or being entered "
                      f"(max {rc.max_open_positions})")

    last_loss = state.last_loss_exit_ms.get(symbol)
    if last_loss is not None:
        until = last_loss + rc.cooldown_minutes * 60_000
        checks["cooldown_until_ms"] = until
        if now_ms < until:
            return refuse("cooldown", f"{symbol} exited at a loss; cooldown "
                          f"{rc.cooldown_minutes} min ends at {until}")

    last_closes = {s: _last_close(closes, s) for s in sorted(pending)}
    unpriced = [s for s, close in last_closes.items() if close is None]
    others = (*state.external_exposure,
              *(OpenExposure(s, state.pending_amounts[s][0], state.pending_amounts[s][1] * close)
                for s, close in last_closes.items()
                if close is not None and s in state.pending_amounts))
    exposure = (*state.positions, *others)
    blocked = _correlation_check(symbol, side, state.positions, others, closes, rc, checks)
    if blocked:
        return refuse(*blocked)

    caps: dict[str, Decimal] = {}
    if rc.max_position_notional > 0:
        caps["max_position_notional"] = pct(rc.max_position_notional)
    if rc.max_total_notional > 0:
        if unpriced:
            return refuse("max_total_notional", f"entry orders not settled in {unpriced} have "
                          "no price to count against the limit (reconcile settles them)")
        total = sum((e.notional for e in exposure), ZERO)
        room = pct(rc.max_total_notional) - total
        checks["total_notional_room"] = room
        if room <= 0:
            return refuse("max_total_notional", f"open notional {total} is at the "
                          f"limit {rc.max_total_notional}")
        caps["max_total_notional"] = room
    # The margin and the taker fee both come out of the free balance: at high leverage the
    # fee is a large share of the margin (0.05 % of 125x is 6 %), beyond FREE_BALANCE_USE.
    fee = max(market.taker_fee or ZERO, as_decimal(config.sim.taker_fee_pct) / HUNDRED)
    checks["fee_rate"] = fee
    caps["free_balance"] = max(free, ZERO) * FREE_BALANCE_USE / (1 / Decimal(leverage) + fee)

    size = size_entry(mode=rc.sizing, price=p, equity=equity, market=market,
                      trade_fraction=rc.trade_fraction, risk_pct=rc.risk_pct, leverage=leverage,
                      slots=config.rotation.top_n, stop_pct=stop, caps=caps, fee_rate=fee)
    checks.update(sizing=rc.sizing, target_notional=size.target_notional,
                  capped_by=size.capped_by, amount=size.amount, notional=size.notional,
                  margin=size.notional / leverage)
    if not size.ok:
        reason = size.reason
        if size.capped_by == "free_balance":
            reason = "insufficient_balance"
        elif size.capped_by == "max_total_notional":
            reason = "max_total_notional"
        return refuse(reason, size.detail)
    return RiskDecision(True, "approved", f"{side} {symbol}: {size.detail}", symbol, side,
                        size.amount, size.notional, checks)


def _last_close(closes: Mapping[str, Any] | None, symbol: str) -> Decimal | None:
    data = (closes or {}).get(symbol)
    if data is None:
        return None
    close = _ts_closes(data)[1]
    return Decimal(repr(float(close[-1]))) if len(close) and math.isfinite(close[-1]) else None


def _correlation_check(symbol: str, side: str, positions: Iterable[OpenExposure],
                       others: Iterable[OpenExposure], closes: Mapping[str, Any] | None,
                       rc: Any, checks: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, detail) when an exposure is too correlated with the candidate, or the
    correlation with one of the bot's positions cannot be measured (no candles this scan:
    it is not known to be safe). ``others`` (external positions, unsettled entries: the
    scan may not fetch their symbols) count when their candles are at hand.

    Direction-aware: correlation times the two directions (a long and a short on
    correlated coins hedge each other, so that pair is not blocked)."""
    positions, others = list(positions), list(others)
    if not closes or not (positions or others) or rc.correlation_max >= 1:
        return None
    seen: dict[str, float | None] = {}
    checks["correlation"] = seen
    missing = sorted({symbol, *(e.symbol for e in positions)} - set(closes))
    unseen = sorted({e.symbol for e in others} - set(closes))
    if missing or unseen:
        checks["correlation_missing"] = missing + unseen
    if missing:
        return ("correlation_unknown", f"no candles of {missing} this scan: the correlation "
                f"with the open exposure cannot be measured")
    mine = closes[symbol]
    direction = 1 if side == "long" else -1
    for pos in (*positions, *(e for e in others if e.symbol in closes)):
        c = return_correlation(mine, closes[pos.symbol], rc.correlation_window)
        seen[pos.symbol] = None if c is None else round(c, 4)
        if c is None:
            continue
        signed = c * direction * (1 if pos.side == "long" else -1)
        if signed > rc.correlation_max:
            return ("correlation", f"returns correlate {c:.3f} with open {pos.side} "
                    f"{pos.symbol} (max {rc.correlation_max})")
    return None


# -- account limits ------------------------------------------------------------------

@dataclass(frozen=True)
class HaltAction:
    """A halt to record and carry out. ``new`` is False when the halt is already recorded
    and only positions remain to be closed (a previous close failed)."""

    kind: Literal["daily_loss", "drawdown"]
    reason: str  # "daily_loss_limit" | "max_drawdown"
    detail: str
    close_all: bool
    cancel_orders: bool
    until_ms: int | None  # daily_loss: next UTC midnight; drawdown: None (until resume)
    new: bool = True
    numbers: Mapping[str, str] = field(default_factory=dict)


def next_utc_midnight(now_ms: int) -> int:
    return day_start_ms(now_ms) + DAY_MS


def check_account(state: RiskState, equity: Any, now_ms: int, risk: Any) -> list[HaltAction]:
    """Halts the account's equity calls for (``risk`` is ``config.risk``)."""
    eq = as_decimal(equity)
    if eq is None:
        return []
    halts = state.active_halts(now_ms)
    actions: list[HaltAction] = []
    numbers = {"equity": str(eq), "day_start_equity": str(state.day_start_equity),
               "equity_peak": str(max(state.equity_peak or eq, eq)),
               "realized_today": str(state.realized_today)}

    dd = drawdown_pct(state, eq)
    if "drawdown" in halts:
        if state.positions:
            actions.append(HaltAction("drawdown", "max_drawdown", "halted for drawdown; "
                                      f"{len(state.positions)} position(s) still to close",
                                      True, True, None, new=False, numbers=numbers))
    elif dd is not None and dd >= pct(risk.max_drawdown_pct):
        actions.append(HaltAction("drawdown", "max_drawdown", f"equity {eq} is {dd:.2f}% below "
                                  f"the peak (limit {risk.max_drawdown_pct}%): close all, halt "
                                  "until resume", True, True, None,
                                  numbers={**numbers, "drawdown_pct": f"{dd:.4f}"}))

    loss = daily_loss_pct(state, eq)
    close_all = bool(risk.daily_loss_close_all)
    if "daily_loss" in halts:
        if close_all and state.positions and "drawdown" not in halts and not actions:
            actions.append(HaltAction("daily_loss", "daily_loss_limit", "halted for daily loss; "
                                      f"{len(state.positions)} position(s) still to close",
                                      True, True, next_utc_midnight(now_ms), new=False,
                                      numbers=numbers))
    elif loss is not None and loss >= pct(risk.daily_loss_limit_pct):
        actions.append(HaltAction("daily_loss", "daily_loss_limit", f"equity {eq} is {loss:.2f}% "
                                  f"below the day start {state.day_start_equity} (limit "
                                  f"{risk.daily_loss_limit_pct}%): no entries until "
                                  "the next UTC day" + (", close all" if close_all else ""),
                                  close_all, close_all, next_utc_midnight(now_ms),
                                  numbers={**numbers, "daily_loss_pct": f"{loss:.4f}"}))
    return actions


def exposures(positions: Iterable[Mapping[str, Any]]) -> tuple[OpenExposure, ...]:
    """OpenExposure tuple from ledger position dicts (see RiskState.from_summary)."""
    return _exposures(list(positions))


__all__ = ["OpenExposure", "RiskState", "SizeResult", "RiskDecision", "HaltAction",
           "truncate_amount", "orderable", "target_notional", "size_entry", "return_correlation",
           "check_entry", "check_account", "daily_loss_pct", "drawdown_pct",
           "next_utc_midnight", "exposures", "FREE_BALANCE_USE"]
