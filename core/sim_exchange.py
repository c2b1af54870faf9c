"""The simulated exchange: a raw venue that answers like ccxt's ``binanceusdm``.

It speaks the ccxt-unified subset listed in ``core.exchange_types`` with the same method
names, parameters and return shapes, and raises the same ccxt exception classes: answers
are built as Binance USDⓈ-M bodies and turned into unified structures and exceptions by
ccxt's own parsers and error mapping (``core.sim_binance``). The careful client
(``core.exchange.ExchangeClient``) cannot tell it from the real venue, faults included.

The account (``core.sim_account``): USDT-margined linear perpetuals, one-way mode, cross
margin, leverage per symbol (Binance's default 20 until ``set_leverage``), taker/maker
fees, slippage in basis points on every market execution, market and GTC limit orders,
STOP_MARKET / TAKE_PROFIT_MARKET trigger orders on Binance's algo service (pass
``{'trigger': True}`` to fetch, list or cancel them), optional partial fills of market
orders (the rest EXPIRED), positions with entry price and unrealized PnL, account trades.

Time comes from the clock. Every call first catches up: candles closed since the last
step are matched against working trigger and limit orders (a sell stop fires when a
candle's low reaches it; a gap through the trigger fills at the open; an order placed
mid-candle only sees the move from its price to that candle's close). ``step_to(ms)``
does the same for a backtest. Not simulated: funding, liquidation, isolated margin,
hedge mode, order book depth.

State lives in ``core.sim_store`` (a SQLite file when ``state_path`` is given, else in
memory). Faults come from ``core.sim_faults``: ``exchange.faults.script([...])``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import ccxt
import numpy as np

from core.clock import DAY_MS, TIMEFRAME_MS, day_start_ms, iso
from core.sim_account import ZERO, Account, D, Spec, account, apply_fill, fee, margin_ok, plain
from core.sim_binance import Wire, raw_account, raw_order, raw_position, raw_ticker, raw_trade
from core.sim_faults import CRASH_FAULTS, PRICE_FAULTS, FaultInjector
from core.sim_market import Candles, CsvMarket, LiveMarket, SyntheticMarket, aggregate
from core.sim_store import SimOrder, SimStore, SimTrade

log = logging.getLogger(__name__)

HISTORY_DAYS = 3  # synthetic candles before the clock's start, for indicators
DEFAULT_LEVERAGE = 20  # Binance's default until set_leverage
ORDER_ID0, TRADE_ID0 = 4_000_000_000, 700_000_000  # ids that look like Binance's
# A live source (paper) whose candles stop short of now (an empty answer) is asked again
# from where they stopped, for up to this long (by the clock, from the first answer that
# stopped there); then its stops are given up on for the gap.
MAX_UNSEEN_MS = 15 * 60_000
MAX_ALGO_PER_SYMBOL = 10  # Binance's MAX_NUM_ALGO_ORDERS filter
KEPT_MARKETS = "kept_markets"  # meta key: the markets a live source's orders were in
KLINES_DEFAULT, KLINES_MAX = 500, 1000  # ccxt's binance caps a klines request at 1000
CLIENT_ID = re.compile(r"^[.A-Z:/a-z0-9_-]{1,36}$")
PRE_FAULTS = {"network_error", "timeout", "server_error", "rate_limit", "clock_skew",
              "insufficient_funds", "reject"}
POST_FAULTS = {"timeout_after_accept", "server_error_after_accept"}
NO_PRICE = "The counterparty's best price does not meet the PERCENT_PRICE filter limit."


class SimExchange:
    """A simulated Binance USDⓈ-M account behind ccxt's unified API (see module doc)."""

    id = "sim"
    name = "Simulated USDⓈ-M futures"
    precisionMode = ccxt.TICK_SIZE
    timeframes = {tf: tf for tf in TIMEFRAME_MS}
    has = {"fetchOHLCV": True, "fetchTicker": True, "fetchTickers": True, "fetchBalance": True,
           "fetchPositions": True, "createOrder": True, "fetchOrder": True,
           "fetchOpenOrders": True, "cancelOrder": True, "fetchMyTrades": True,
           "setLeverage": True, "setMarginMode": True, "fetchTime": True}

    enableLastJsonResponse = True  # noqa: N815 (ccxt's name): last_json_response is the body
    last_json_response: Any = None

    def __init__(self, source, clock, *, settle: str = "USDT", start_balance: float = 10_000.0,
                 taker_fee_pct: float = 0.05, maker_fee_pct: float = 0.02,
                 slippage_bps: float = 2.0, partial_fill_prob: float = 0.0,
                 faults: FaultInjector | None = None, state_path: str | Path | None = None,
                 seed: int = 42, default_leverage: int = DEFAULT_LEVERAGE,
                 latency_ms: float = 0.0) -> None:
        self.source = source
        self.clock = clock
        self.settle = settle
        self.taker, self.maker = D(taker_fee_pct) / 100, D(maker_fee_pct) / 100
        self.slippage = D(slippage_bps) / 10_000
        self.partial_fill_prob = partial_fill_prob
        self.latency_s = latency_ms / 1000  # per venue call, slept outside the lock
        self.default_leverage = default_leverage
        self.faults = faults or FaultInjector()
        self.rng = random.Random(seed)
        self.options: dict[str, Any] = {"fetchOpenOrders": {"warnWithoutSymbol": True}}
        self._lock = threading.RLock()
        self._wire = Wire(self.id)
        self._parser = self._wire.parser
        # A live source (paper): its answers can stop short, its clock is the exchange's
        # and its markets change (see _sync, fetch_time, load_markets).
        self._live = bool(getattr(source, "live", False))
        info = getattr(source, "exchange_info", None)
        self._set_markets([self._parser.parse_market(m) for m in info()] if info
                          else source.unified_markets())
        self._tf = source.timeframe_ms
        self._marks: dict[str, Decimal] = {}
        self._unseen: tuple[int, int] | None = None  # (candles seen until, first asked at)
        self._markets_loaded = False
        self._now = 0
        self.store = SimStore(state_path)
        self._init_state(start_balance)
        # A live source's markets traded in (paper), kept with the state: one delisted
        # since (gone from the exchange's list) must stay known after a restart, or the
        # position or stop held in it could not be read, nor the account.
        self._kept = {m["symbol"]: m for m in
                      json.loads(self.store.meta().get(KEPT_MARKETS, "[]"))} if self._live else {}
        gone = [{**m, "active": False} for s, m in self._kept.items() if s not in self.markets]
        if gone:
            self._set_markets([*self.markets.values(), *gone])
        holding = {*self.store.positions(), *(o.symbol for o in self.store.open_orders())}
        held = sorted(holding - set(self.markets))
        if held and not self._live:  # recorded candles: a symbol gone from them cannot trade
            raise ValueError(f"{self.store.path}: the simulated account holds positions or "
                             f"orders in {', '.join(held)}, which its market "
                             f"({self.source.describe()}) no longer has (a CSV file renamed or "
                             "removed?); put it back, or delete the state file")
        if self._live:  # a state file from before markets were kept: keep what it holds
            with self._lock, self.store.transaction():
                for symbol in sorted(holding):
                    if symbol in self.markets:
                        self._keep_market(symbol)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config, clock, state_path: str | Path | None = None, *,
                    live_exchange: Any = None, origin_ms: int | None = None,
                    source=None) -> SimExchange:
        """The venue that ``config.sim`` / ``config.faults`` describe. ``state_path=None``
        keeps it in memory. An existing state file keeps its own market (seed, symbols,
        origin) whatever the config says. ``live_exchange``: the ccxt object for source =
        live (default: a public one of ``config.exchange.id``). ``origin_ms``: first
        synthetic candle (default: 3 days before the clock's day). ``source``: the market,
        already built (a fresh CSV market, read once to place the clock)."""
        sim = config.sim
        stored = SimStore.peek_meta(state_path).get("market") if state_path else None
        if source is None:
            source = make_source(config, clock, json.loads(stored) if stored else None,
                                 live_exchange, origin_ms)
        return cls(source, clock, settle=config.exchange.quote, start_balance=sim.start_balance,
                   taker_fee_pct=sim.taker_fee_pct, maker_fee_pct=sim.maker_fee_pct,
                   slippage_bps=sim.slippage_bps, partial_fill_prob=sim.partial_fill_prob,
                   faults=FaultInjector(config.faults, sim.seed), state_path=state_path,
                   seed=sim.seed, latency_ms=sim.latency_ms)

    @staticmethod
    def stored_now_ms(state_path: str | Path) -> int | None:
        """The venue time a state file last recorded (to resume a service's clock)."""
        v = SimStore.peek_meta(state_path).get("now_ms")
        return None if v is None else int(v)

    def _init_state(self, start_balance: float) -> None:
        described = json.dumps(self.source.describe(), sort_keys=True)
        with self._lock, self.store.transaction():
            meta = self.store.meta()
            if not meta:
                now = self.now_ms()
                self.store.set_meta(schema=1, market=described, wallet=D(start_balance),
                                    wallet_ms=now, processed_until=now - now % self._tf,
                                    now_ms=now, created_ms=now)
            elif meta.get("market") != described:
                raise ValueError(f"{self.store.path}: this state file belongs to the market "
                                 f"{meta.get('market')}, not {described}; delete it to start "
                                 "a fresh simulated exchange")

    def _load_state(self) -> None:
        meta = self.store.meta()
        self._wallet, self._wallet_ms = Decimal(meta["wallet"]), int(meta["wallet_ms"])
        self._processed = int(meta["processed_until"])
        self._now = max(self._now, int(meta["now_ms"]))
        self._positions = self.store.positions()
        self._leverage = self.store.leverage()
        self._open = {o.id: o for o in self.store.open_orders()}
        oid, tid = self.store.max_ids()
        self._next_order, self._next_trade = max(oid, ORDER_ID0) + 1, max(tid, TRADE_ID0) + 1
        self._marks.clear()

    def close(self) -> None:
        self.store.close()

    # ----------------------------------------------------------------- the call frame
    @contextmanager
    def _venue(self, method: str, algo: bool = False) -> Iterator[str | None]:
        """One venue call: draw a fault, catch up with the clock, run atomically.

        The simulated network latency is slept before taking the lock, so calls made
        concurrently (through several clients) overlap as they would on the wire."""
        if self.latency_s > 0:
            time.sleep(self.latency_s)  # wall-clock latency, whatever the bot's clock
        with self._lock:
            fault = self.faults.draw(method)
            if fault == "crash_before_accept":
                _crash(method, fault)
            if fault in PRE_FAULTS or (fault == "timeout_after_accept"
                                       and method not in ("create_order", "cancel_order")):
                self._wire.fault(method, fault, algo)
            with self._frame():
                yield fault

    @contextmanager
    def _frame(self, until: int = 0) -> Iterator[None]:
        # A venue refusal (ccxt error) still commits the catch-up work done before it.
        with self.store.transaction(keep=(ccxt.BaseError,)):
            if self.store.stale():
                self._load_state()
            self._sync(until)
            yield

    def _after(self, method: str, fault: str | None, algo: bool = False) -> None:
        """Faults that strike after the venue did the work: the caller cannot know."""
        if fault in POST_FAULTS:
            self._wire.fault(method, fault, algo)

    # ----------------------------------------------------------------- time and matching
    def is_flat(self) -> bool:
        """No position and no resting order: time passing cannot change the account.
        (Exact without catching up with the clock: with nothing open, matching the
        candles since the last call cannot open anything.) False until the first call
        has read the venue's state."""
        with self._lock:
            return getattr(self, "_positions", None) == {} and not self._open

    def now_ms(self) -> int:
        """The venue's time: the clock's, never running backwards; for a live source
        (paper) the exchange's at the clock's now. Its candles close by its clock, so its
        orders are placed (and matched against them) on that clock too."""
        now = self.clock.now_ms()
        if self._live:  # as measured now: a bad reading (or a state file's) is not kept
            return self.source.server_now_ms(now)
        return max(now, self._now)

    def step_to(self, ms: int) -> None:
        """Advance the venue to ``ms`` (backtests): match every candle closed by then."""
        with self._lock, self._frame(int(ms)):
            pass

    def _sync(self, until: int = 0) -> None:
        now = max(self.now_ms(), until)
        if now != self._now:
            self._now = now
            self._marks.clear()
        boundary = now - now % self._tf
        # With nothing resting, a live source's (paper) candles are not even read: then
        # the boundary is only a reading of the exchange's clock, and one that read ahead
        # must not carry past the minutes of the next order (they start at its own).
        if boundary > self._processed and (self._open or not self._live):
            seen = self._match(self._processed, boundary) if self._open else boundary
            if seen < boundary and self._unseen_too_long(seen, now):
                log.warning("no candles from %s on (or a minute missing) for a resting "
                            "order's symbol: its stops were checked on the minutes there are "
                            "until %s", iso(seen), iso(boundary))
                self._match(seen, boundary, holes_quiet=True)
                seen = boundary
            if seen == boundary:
                self._unseen = None
            self._processed = max(self._processed, seen)
            self.store.set_meta(processed_until=self._processed, now_ms=now)

    def _unseen_too_long(self, seen: int, now: int) -> bool:
        """Have the candles from ``seen`` on been asked for and left out for longer than
        MAX_UNSEEN_MS? Timed from the first answer that stopped there, not from ``seen``:
        after a restart the minutes missed while down are all older than that."""
        if self._unseen is None or self._unseen[0] != seen:
            self._unseen = (seen, now)
        return now - self._unseen[1] > MAX_UNSEEN_MS

    def _match(self, start: int, end: int, holes_quiet: bool = False) -> int:
        """Trigger stops and fill limits on the candles closed in [start, end), in time order.
        Returns how far the candles were seen: ``end``, or for a live source whose answer
        stopped short (an empty page) or left a minute out (a late one), where that is
        (matched again next time; ``holes_quiet``: the missing minutes taken as quiet)."""
        tf = self._tf
        by_symbol: dict[str, list[SimOrder]] = defaultdict(list)
        for o in self._open.values():
            by_symbol[o.symbol].append(o)
        one = end - start == tf and hasattr(self.source, "candle_at")  # a backtest step
        events = []
        seen = end
        for symbol, orders in by_symbol.items():
            if one:
                row = self.source.candle_at(symbol, start)
                hits = [(o, self._hit(o, start, *row)) for o in orders] if row else []
            else:
                first = max(start, min(o.created_ms - o.created_ms % tf for o in orders))
                if not self._live:
                    c = self.source.candles(symbol, first, end)
                else:
                    c, answered = self.source.minutes(symbol, first, end)
                # A symbol the exchange dropped has no minutes to wait for: its orders
                # cannot fire, and must not hold back everyone else's.
                if self._live and first < end and self.source.listed(symbol):
                    upto = int(answered[-1]) + tf if len(answered) else first
                    hole = None if holes_quiet else first_missing(answered, first, tf)
                    if hole is not None:  # the minutes after it wait for it
                        c, upto = c.slice(0, int(np.searchsorted(c.ts, hole))), hole
                    seen = min(seen, upto)
                hits = [(o, self._first_hit(o, c)) for o in orders] if len(c) else []
            events += [(h[0], _priority(o), o.id, h[1]) for o, h in hits if h]
        for ts, _, oid, price in sorted(events):
            o = self._open.get(oid)
            if o is not None:
                self._trigger(o, self._spec[o.symbol].round_price(D(price)), ts)
        return seen

    def _first_hit(self, o: SimOrder, c: Candles) -> tuple[int, float] | None:
        """(fill time, price) at the first of the candles ``c`` that reaches the order."""
        k0 = int(np.searchsorted(c.ts, o.created_ms - o.created_ms % self._tf))
        if k0 >= len(c):
            return None
        level = float(o.trigger_price if o.algo else o.price)
        if _low_side(o):
            hit = c.low[k0:] <= level if o.algo else c.low[k0:] < level
        else:
            hit = c.h[k0:] >= level if o.algo else c.h[k0:] > level
        if o.created_ms > int(c.ts[k0]):  # placed inside its first candle
            hit[0] = self._hit(o, int(c.ts[k0]), c.o[k0], c.h[k0], c.low[k0], c.c[k0]) is not None
        idx = np.flatnonzero(hit)
        if not len(idx):
            return None
        k = k0 + int(idx[0])
        return self._hit(o, int(c.ts[k]), c.o[k], c.h[k], c.low[k], c.c[k])

    def _hit(self, o: SimOrder, ts: int, opn, high, low, close) -> tuple[int, float] | None:
        """(fill time, price) if the candle opening at ``ts`` reaches the order, else None.

        Stops fire when the price touches the trigger; a resting limit fills only when the
        price trades through it. A candle that opens beyond the level (a gap) fills at the
        open. An order placed inside the candle only sees the move from its price to the
        close (the wicks may have come before it)."""
        if o.created_ms >= ts + self._tf:
            return None  # placed after this candle
        level = float(o.trigger_price if o.algo else o.price)
        low_side, mid = _low_side(o), o.created_ms > ts
        if mid:
            pp = float(o.place_price)
            low, high = min(pp, close), max(pp, close)
        if low_side:
            reached = low <= level if o.algo else low < level
        else:
            reached = high >= level if o.algo else high > level
        if not reached:
            return None
        if not mid and (opn <= level if low_side else opn >= level):
            return ts, float(opn)
        return ts + self._tf - 1, level

    def _trigger(self, o: SimOrder, price: Decimal, ts: int) -> None:
        del self._open[o.id]
        o.updated_ms = ts
        if not o.algo:  # a resting limit order: fills at its price (or a better open)
            try:
                self._execute(o, price, ts, maker=True)
            except ccxt.ExchangeError:  # reduce-only with nothing left to reduce
                o.status = "EXPIRED"
            self.store.save_order(o)
            return
        o.trigger_ms = ts
        # The order a stop becomes gets an id of the venue's own (Binance documents only
        # actualOrderId as the link), so the bot cannot come to rely on it sharing ours.
        child = self._new_order(o.symbol, "MARKET", o.side, o.amount, None, None,
                                o.reduce_only, f"algo-{o.id}", algo=False, ts=ts)
        child.close_position, child.orig_type = o.close_position, o.type
        try:
            self._execute(child, self._spec[o.symbol].slip(price, o.side, self.slippage), ts,
                          maker=False)
        except ccxt.InsufficientFunds:
            o.status = "REJECTED"
        except ccxt.ExchangeError:  # reduce-only with nothing left to reduce
            o.status = "EXPIRED"
        else:
            o.status, o.filled, o.cum_quote = "FINISHED", child.filled, child.cum_quote
            o.actual_order_id = child.id
            self.store.save_order(child)
        self.store.save_order(o)

    # ----------------------------------------------------------------- account
    def _mark(self, symbol: str) -> Decimal | None:
        """Last price at the venue's now (also the mark price); None if there is none."""
        m = self._marks.get(symbol)
        if m is None:
            p = self.source.price(symbol, self._now)
            if p is None or not np.isfinite(p) or p <= 0:
                return None
            m = self._marks[symbol] = D(float(p))
        return m

    def _lev(self, symbol: str) -> int:
        return self._leverage.get(symbol, self.default_leverage)

    def _account(self) -> Account:
        marks = {s: self._mark(s) or p.entry_price for s, p in self._positions.items()}
        limits = [(o.symbol, o.amount - o.filled, o.price) for o in self._open.values()
                  if o.type == "LIMIT" and not o.reduce_only]
        lev = {s: self._lev(s) for s in {*marks, *(x[0] for x in limits)}}
        return account(self._wallet, self._positions, marks, lev, limits)

    def _new_order(self, symbol, type_, side, amount, price, trigger, reduce_only, client_id,
                   *, algo: bool, ts: int) -> SimOrder:
        oid = self._next_order
        self._next_order += 1
        return SimOrder(id=oid, algo=algo, client_id=client_id or f"x-sim-{oid}", symbol=symbol,
                        type=type_, side=side, amount=amount, price=price, trigger_price=trigger,
                        reduce_only=reduce_only, close_position=False, status="NEW", filled=ZERO,
                        cum_quote=ZERO, created_ms=ts, updated_ms=ts)

    def _execute(self, o: SimOrder, price: Decimal, ts: int, *, maker: bool,
                 partial: bool = False) -> None:
        """Fill a regular order at ``price``. Venue errors are raised before any change."""
        spec = self._spec[o.symbol]
        pos = self._positions.get(o.symbol)
        amt = pos.amount if pos else ZERO
        qty = o.amount - o.filled
        if o.reduce_only or o.close_position:
            if amt == 0 or (amt > 0) == (o.side == "BUY"):
                self._wire.reject(-2022, "ReduceOnly Order is rejected.")
            qty = abs(amt) if o.close_position else min(qty, abs(amt))
        if partial and self.partial_fill_prob > 0 and self.rng.random() < self.partial_fill_prob:
            qty = spec.truncate(qty * D(round(self.rng.uniform(0.2, 0.8), 4))) or qty
        fill = apply_fill(pos, o.side, qty, price, ts, spec.tick / 10_000)
        cost = fee(qty, price, self.maker if maker else self.taker)
        if fill.opening > 0:
            acct = self._account()
            if not margin_ok(acct, fill, price, self._lev(o.symbol), cost,
                             acct.marks.get(o.symbol, price)):
                self._wire.reject(-2019, "Margin is insufficient.")
        if o.close_position:
            o.amount = qty
        if fill.position is None:
            self._positions.pop(o.symbol, None)
        else:
            self._positions[o.symbol] = fill.position
        self.store.save_position(o.symbol, fill.position)
        self._wallet += fill.realized - cost
        self._wallet_ms = ts
        self.store.set_meta(wallet=self._wallet, wallet_ms=ts)
        trade = SimTrade(self._next_trade, o.id, o.symbol, o.side, qty, price, qty * price, cost,
                         fill.realized, maker, ts)
        self._next_trade += 1
        self.store.add_trade(trade)
        o.filled += qty
        o.cum_quote += qty * price
        o.updated_ms = ts
        if o.filled == o.amount:
            o.status = "FILLED"
        elif o.type == "MARKET" or o.reduce_only:  # the rest of a market order expires
            o.status = "EXPIRED"
        if fill.position is None:
            self._expire_close_position_orders(o.symbol, ts)

    def _expire_close_position_orders(self, symbol: str, ts: int) -> None:
        """Binance cancels closePosition conditional orders once the position is gone."""
        for o in [o for o in self._open.values() if o.symbol == symbol and o.close_position]:
            o.status, o.updated_ms = "EXPIRED", ts
            del self._open[o.id]
            self.store.save_order(o)

    # ----------------------------------------------------------------- markets, precision
    def _set_markets(self, markets: list[dict]) -> None:
        """Take the markets a source lists. One it no longer lists stays known, inactive:
        a position or order stored in it must stay readable."""
        listed = {m["symbol"] for m in markets}
        gone = [{**m, "active": False} for s, m in getattr(self, "markets", {}).items()
                if s not in listed]
        self._parser.set_markets([*markets, *gone])
        self.markets: dict[str, dict] = self._parser.markets
        self.markets_by_id = self._parser.markets_by_id
        self.symbols = sorted(self.markets)
        self._spec = {s: Spec.of(m) for s, m in self.markets.items()}

    def _keep_market(self, symbol: str) -> None:
        if symbol not in self._kept:
            self._kept[symbol] = self.markets[symbol]
            self.store.set_meta(**{KEPT_MARKETS: json.dumps(list(self._kept.values()),
                                                            default=str)})

    def load_markets(self, reload: bool = False, params: dict | None = None) -> dict:
        """Like ccxt: only the first call (or a reload) goes to the venue. A live source
        (paper) is read again on a reload: a symbol that stopped trading shows inactive."""
        if reload or not self._markets_loaded:
            with self._venue("load_markets"):
                if reload and self._live:
                    self._set_markets(self.source.unified_markets())
                self._markets_loaded = True
        return self.markets

    def market(self, symbol: str) -> dict:
        m = self.markets.get(symbol)
        if m is None:
            raise ccxt.BadSymbol(f"{self.id} does not have market symbol {symbol}")
        return m

    def amount_to_precision(self, symbol: str, amount: Any) -> str:
        """Truncate to the lot step, as ccxt does (InvalidOrder if nothing is left)."""
        spec = self._spec[self.market(symbol)["symbol"]]
        q = spec.truncate(D(amount))
        if q <= 0:
            raise ccxt.InvalidOrder(f"{self.id} amount of {symbol} must be greater than minimum "
                                    f"amount precision of {plain(spec.step)}")
        return plain(q)

    def price_to_precision(self, symbol: str, price: Any) -> str:
        """Round half up to the tick, as ccxt does (InvalidOrder if it rounds to zero)."""
        spec = self._spec[self.market(symbol)["symbol"]]
        q = spec.round_price(D(price))
        if q <= 0:
            raise ccxt.InvalidOrder(f"{self.id} price of {symbol} must be greater than minimum "
                                    f"price precision of {plain(spec.tick)}")
        return plain(q)

    # ----------------------------------------------------------------- market data
    def fetch_time(self, params: dict | None = None) -> int:
        with self._venue("fetch_time"):
            return self._now  # paper: the exchange's time

    def load_time_difference(self, params: dict | None = None) -> int:
        """ccxt's clock re-sync (after -1021): the venue and its clock agree, by design."""
        with self._venue("fetch_time"):
            self.options["timeDifference"] = 0
            return 0

    def fetch_ohlcv(self, symbol: str, timeframe: str = "1m", since: int | None = None,
                    limit: int | None = None, params: dict | None = None) -> list[list]:
        """Closed candles then the forming one, like Binance's klines (500 by default)."""
        symbol = self.market(symbol)["symbol"]
        tf_ms = TIMEFRAME_MS.get(timeframe)
        if tf_ms is None:
            self._wire.reject(-1120, "Invalid interval.", "fetch_ohlcv")
        if tf_ms % self._tf:
            raise ccxt.NotSupported(f"{self.id} fetchOHLCV() {timeframe} is finer than the "
                                    f"simulated market's {self._tf // 60_000}m candles")
        limit = min(int(limit or KLINES_DEFAULT), KLINES_MAX)
        with self._venue("fetch_ohlcv") as fault:
            rows = self.source.ohlcv(symbol, tf_ms, since, limit, self._now)
            return self._corrupt_candles(rows, fault, symbol, tf_ms) if fault else rows

    def _corrupt_candles(self, rows: list[list], fault: str, symbol: str, tf_ms: int) -> list:
        rows = [list(r) for r in rows]
        rng = self.faults.rng
        if fault == "forming_candle":  # the forming candle shows its final values
            if rows and rows[-1][0] + tf_ms > self._now:
                full = self._full_candle(symbol, rows[-1][0], tf_ms)
                if full is not None:
                    rows[-1] = [rows[-1][0], *full]
            return rows
        closed = [i for i, r in enumerate(rows) if r[0] + tf_ms <= self._now]
        if len(closed) < 3:
            return rows
        i = rng.choice(closed[1:-1])
        if fault == "duplicate_candle":
            rows.insert(i, list(rows[i]))
        elif fault == "missing_candle":
            del rows[i]
        elif fault == "out_of_order_candles":
            rows[i], rows[i + 1] = rows[i + 1], rows[i]
        elif fault == "high_below_low":
            r = rows[i]
            r[2], r[3] = min(r[3], r[2]) * 0.999, max(r[2], r[3])
        else:
            rows[i][rng.randint(1, 4)] = {"nan_price": float("nan"), "none_price": None,
                                          "zero_price": 0.0}[fault]
        return rows

    def _full_candle(self, symbol: str, bucket: int, tf_ms: int) -> tuple | None:
        if tf_ms == self._tf or isinstance(self.source, LiveMarket):
            return self.source.full_candle(symbol, bucket)
        a = aggregate(self.source.candles(symbol, bucket, bucket + tf_ms), tf_ms)
        return tuple(a.rows()[0][1:]) if len(a) else None

    def fetch_ticker(self, symbol: str, params: dict | None = None) -> dict:
        symbol = self.market(symbol)["symbol"]
        with self._venue("fetch_ticker") as fault:
            return self._tickers([symbol], fault)[symbol]

    def fetch_tickers(self, symbols: list[str] | None = None,
                      params: dict | None = None) -> dict[str, dict]:
        """Rolling 24 h tickers (quoteVolume for rotation), computed from the candles."""
        wanted = self.symbols if symbols is None else [self.market(s)["symbol"] for s in symbols]
        with self._venue("fetch_tickers") as fault:
            return self._tickers(wanted, fault)

    def _tickers(self, symbols: list[str], fault: str | None) -> dict[str, dict]:
        if isinstance(self.source, LiveMarket):
            out = {s: t for s, t in self.source.tickers(symbols).items() if s in self.markets}
        else:
            raws = []
            for s in symbols:
                t = self.source.ticker(s, self._now)
                if t is not None:
                    raws.append(raw_ticker(self.markets[s]["id"], t, self._spec[s]))
            out = self._parser.parse_tickers(self._body(raws), symbols)
        if fault in PRICE_FAULTS and out:
            t = out[self.faults.rng.choice(sorted(out))]
            t["last"] = t["close"] = {"nan_price": float("nan"), "none_price": None,
                                      "zero_price": 0.0}[fault]
        return out

    # ----------------------------------------------------------------- account reads
    def fetch_balance(self, params: dict | None = None) -> dict:
        with self._venue("fetch_balance"):
            raw = raw_account(self._account(), self._positions, self.settle, self._wallet_ms)
            return self._parser.parse_balance_custom(self._body(raw), "linear")

    def fetch_positions(self, symbols: list[str] | None = None,
                        params: dict | None = None) -> list[dict]:
        if symbols is not None and not isinstance(symbols, list):
            raise ccxt.ArgumentsRequired(f"{self.id} fetchPositionsRisk() requires an array "
                                         "argument for symbols")
        with self._venue("fetch_positions"):
            marks = self._account().marks
            raws = self._body([raw_position(self.markets[s]["id"], p, marks[s], self._lev(s),
                                            self._spec[s], self.settle)
                               for s, p in sorted(self._positions.items())])
            out = [self._parser.parse_position_risk(r) for r in raws]
            return self._parser.filter_by_array_positions(out, "symbol",
                                                          self._parser.market_symbols(symbols))

    def set_leverage(self, leverage: int, symbol: str | None = None,
                     params: dict | None = None) -> dict:
        if symbol is None:
            raise ccxt.ArgumentsRequired(f"{self.id} setLeverage() requires a symbol argument")
        if leverage < 1 or leverage > 125:
            raise ccxt.BadRequest(f"{self.id} leverage should be between 1 and 125")
        market = self.market(symbol)
        with self._venue("set_leverage") as fault:
            self._leverage[market["symbol"]] = int(leverage)
            self.store.set_leverage(market["symbol"], int(leverage))
        self._after("set_leverage", fault)
        return {"leverage": int(leverage), "maxNotionalValue": "1000000000",
                "symbol": market["id"]}

    def set_margin_mode(self, marginMode: str, symbol: str | None = None,  # noqa: N803
                        params: dict | None = None) -> dict:
        """Cross is the only mode: answers like ccxt when it is already set."""
        if symbol is None:
            raise ccxt.ArgumentsRequired(f"{self.id} setMarginMode() requires a symbol argument")
        mode = marginMode.upper()
        if mode not in ("CROSS", "CROSSED", "ISOLATED"):
            raise ccxt.BadRequest(f"{self.id} marginMode must be either isolated or cross")
        self.market(symbol)
        if mode == "ISOLATED":
            raise ccxt.NotSupported(f"{self.id} simulates cross margin only")
        with self._venue("set_margin_mode") as fault:
            pass
        self._after("set_margin_mode", fault)
        return {"code": -4046, "msg": "No need to change margin type."}

    # ----------------------------------------------------------------- orders
    def create_order(self, symbol: str, type: str, side: str, amount: Any,  # noqa: A002
                     price: Any = None, params: dict | None = None) -> dict:
        """market | limit (GTC) | market with triggerPrice/stopPrice/stopLossPrice (a
        STOP_MARKET algo order) or takeProfitPrice (TAKE_PROFIT_MARKET); also the types
        STOP_MARKET / TAKE_PROFIT_MARKET with stopPrice. Params: clientOrderId, reduceOnly,
        closePosition. The amount is truncated to the lot step first, as ccxt does."""
        p = dict(params or {})
        symbol = self.market(symbol)["symbol"]
        kind, trigger = self._order_kind(symbol, type, p)
        side_u = str(side).upper()
        if side_u not in ("BUY", "SELL"):
            self._wire.reject(-1117, "Invalid side.")
        close_position = bool(p.get("closePosition")) and trigger is not None
        qty = ZERO if close_position else D(self.amount_to_precision(symbol, amount))
        limit_px = None
        if kind == "LIMIT":
            if price is None:
                raise ccxt.InvalidOrder(f"{self.id} createOrder() requires a price argument for "
                                        "a limit order")
            if p.get("postOnly") or p.get("timeInForce", "GTC") != "GTC":
                raise ccxt.NotSupported(f"{self.id} simulates GTC limit orders only")
            limit_px = D(self.price_to_precision(symbol, price))
        client_id = p.get("clientOrderId") or p.get("newClientOrderId") or p.get("clientAlgoId")
        algo = trigger is not None
        with self._venue("create_order", algo) as fault:
            if self._live:
                self._keep_market(symbol)
            o = self._place(symbol, kind, side_u, qty, limit_px, trigger,
                            bool(p.get("reduceOnly")) or close_position, close_position,
                            client_id)
        if fault == "crash_after_accept":  # committed above: the exchange has the order
            _crash("create_order", fault)
        self._after("create_order", fault, algo)
        raw = raw_order(o, self.markets[symbol]["id"], self._spec[symbol])
        raw.pop("time", None)  # the POST answer carries updateTime only
        return self._parser.parse_order(self._body(raw), self.markets[symbol])

    def _order_kind(self, symbol: str, type_: str, p: dict) -> tuple[str, Decimal | None]:
        t = str(type_).upper()
        tp = p.get("takeProfitPrice")
        stop = p.get("triggerPrice", p.get("stopPrice", p.get("stopLossPrice")))
        if t in ("STOP_MARKET", "TAKE_PROFIT_MARKET") or (t == "MARKET" and (tp or stop)):
            take_profit = t == "TAKE_PROFIT_MARKET" or (t == "MARKET" and tp is not None)
            level = (tp or stop) if take_profit else stop
            if level is None:
                raise ccxt.InvalidOrder(f"{self.id} createOrder() requires a triggerPrice "
                                        f"parameter for a {type_} order")
            kind = "TAKE_PROFIT_MARKET" if take_profit else "STOP_MARKET"
            return kind, D(self.price_to_precision(symbol, level))
        if t in ("MARKET", "LIMIT") and not (tp or stop):
            return t, None
        raise ccxt.InvalidOrder(f"{self.id} {type_} is not a valid order type for the {symbol} "
                                "market")

    def _place(self, symbol, kind, side, qty, limit_px, trigger, reduce_only, close_position,
               client_id) -> SimOrder:
        algo = trigger is not None
        spec, now = self._spec[symbol], self._now

        def reject(code: int, msg: str):
            self._wire.reject(code, msg, "create_order", algo)

        if client_id is not None and not CLIENT_ID.match(str(client_id)):
            reject(-4015, "Client order id is not valid.")
        if client_id and any(o.client_id == client_id and o.algo == algo
                             for o in self._open.values()):
            reject(-4116, "ClientOrderId is duplicated.")
        last = self._mark(symbol)
        if last is None:
            reject(-4131, NO_PRICE)
        max_qty = spec.max_market_qty if kind == "MARKET" else spec.max_qty
        if max_qty is not None and qty > max_qty:
            reject(-4005, "Quantity greater than max quantity.")
        if not reduce_only and qty * (limit_px or trigger or last) < spec.min_notional:
            reject(-4164, f"Order's notional must be no smaller than {plain(spec.min_notional)} "
                          "(unless you choose reduce only).")
        o = self._new_order(symbol, kind, side, qty, limit_px, trigger, reduce_only, client_id,
                            algo=algo, ts=now)
        o.close_position, o.place_price = close_position, last
        if algo:
            if sum(1 for x in self._open.values() if x.algo and x.symbol == symbol) \
                    >= MAX_ALGO_PER_SYMBOL:
                reject(-4045, "Reach max stop order limit.")
            if last <= trigger if _low_side(o) else last >= trigger:
                reject(-2021, "Order would immediately trigger.")
            self._open[o.id] = o
        elif kind == "MARKET":
            self._execute(o, spec.slip(last, side, self.slippage), now, maker=False, partial=True)
        elif (side == "BUY" and limit_px >= last) or (side == "SELL" and limit_px <= last):
            taken = spec.slip(last, side, self.slippage)  # marketable: takes liquidity
            self._execute(o, min(taken, limit_px) if side == "BUY" else max(taken, limit_px),
                          now, maker=False)
        else:
            self._rest_limit(o)
        self.store.save_order(o)
        return o

    def _rest_limit(self, o: SimOrder) -> None:
        pos = self._positions.get(o.symbol)
        if o.reduce_only and (pos is None or (pos.amount > 0) == (o.side == "BUY")):
            self._wire.reject(-2022, "ReduceOnly Order is rejected.")
        if not o.reduce_only and o.amount * o.price / self._lev(o.symbol) > \
                self._account().available:
            self._wire.reject(-2019, "Margin is insufficient.")
        self._open[o.id] = o

    def fetch_order(self, id: str | None, symbol: str | None = None,  # noqa: A002
                    params: dict | None = None) -> dict:
        """By id, or by ``{'clientOrderId': X}``; stop orders need ``{'trigger': True}``."""
        p = dict(params or {})
        if symbol is None:
            raise ccxt.ArgumentsRequired(f"{self.id} fetchOrder() requires a symbol argument")
        symbol = self.market(symbol)["symbol"]
        algo = _is_trigger(p)
        with self._venue("fetch_order", algo):
            o = self._lookup(id, _client_id(p), symbol, algo, "fetch_order")
            return self._order_dict(o)

    def _lookup(self, order_id, client_id, symbol: str, algo: bool, method: str) -> SimOrder:
        if order_id is None and not client_id:
            self._wire.reject(-1102, "Param 'origClientOrderId' or 'orderId' must be sent, but "
                              "both were empty/null!", method, algo)
        if order_id is not None:
            oid = int(order_id) if str(order_id).isdigit() else -1
            o = self._open.get(oid) or self.store.order(oid, algo)
        else:
            o = self.store.order_by_client(str(client_id), algo)
            o = self._open.get(o.id, o) if o else None  # the live object, not a copy
        if o is None or o.algo != algo or o.symbol != symbol or self._forgotten(o):
            if method == "cancel_order":
                self._wire.reject(-2011, "Unknown order sent.", method, algo)
            self._wire.reject(-2013, "Order does not exist.", method, algo)
        return o

    def _forgotten(self, o: SimOrder) -> bool:
        """Binance forgets unfilled cancelled/expired orders after 3 days, all after 90."""
        age = self._now - o.created_ms
        return age > 90 * DAY_MS or (age > 3 * DAY_MS and o.filled == 0
                                     and o.status in ("CANCELED", "EXPIRED", "REJECTED"))

    def fetch_open_orders(self, symbol: str | None = None, since: int | None = None,
                          limit: int | None = None, params: dict | None = None) -> list[dict]:
        """Resting limit orders, or with ``{'trigger': True}`` the working stop orders."""
        algo = _is_trigger(params or {})
        market = self.market(symbol) if symbol is not None else None
        warn = (self.options.get("fetchOpenOrders") or {}).get("warnWithoutSymbol")
        legacy = self.options.get("warnOnFetchOpenOrdersWithoutSymbol")  # as ccxt reads them
        if market is None and (legacy is True or (legacy is None and warn is True)):
            raise ccxt.ExchangeError(
                f"{self.id} fetchOpenOrders() WARNING: fetching open orders without specifying a "
                "symbol has stricter rate limits (10 times more for spot, 40 times more for other "
                f"markets) compared to requesting with symbol argument. To acknowledge this "
                f"warning, set {self.id}.options[\"fetchOpenOrders\"][\"warnWithoutSymbol\"] = "
                "False to suppress this warning message.")
        with self._venue("fetch_open_orders", algo):
            raws = [raw_order(o, self.markets[o.symbol]["id"], self._spec[o.symbol])
                    for o in sorted(self._open.values(), key=lambda o: o.id)
                    if o.algo == algo and (market is None or o.symbol == market["symbol"])]
            return self._parser.parse_orders(self._body(raws), market, since, limit)

    def cancel_order(self, id: str | None, symbol: str | None = None,  # noqa: A002
                     params: dict | None = None) -> dict:
        p = dict(params or {})
        if symbol is None:
            raise ccxt.ArgumentsRequired(f"{self.id} cancelOrder() requires a symbol argument")
        symbol = self.market(symbol)["symbol"]
        algo = _is_trigger(p)
        with self._venue("cancel_order", algo) as fault:
            o = self._lookup(id, _client_id(p), symbol, algo, "cancel_order")
            if o.id not in self._open:
                self._wire.reject(-2011, "Unknown order sent.", "cancel_order", algo)
            del self._open[o.id]
            o.status, o.updated_ms = "CANCELED", self._now
            self.store.save_order(o)
        self._after("cancel_order", fault, algo)
        if algo:  # Binance answers an algo cancel with a bare acknowledgement
            return self._parser.parse_order({"algoId": o.id, "clientAlgoId": o.client_id,
                                             "code": "200", "msg": "success"}, self.markets[symbol])
        raw = raw_order(o, self.markets[symbol]["id"], self._spec[symbol])
        raw.pop("time")
        return self._parser.parse_order(raw, self.markets[symbol])

    def fetch_my_trades(self, symbol: str | None = None, since: int | None = None,
                        limit: int | None = None, params: dict | None = None) -> list[dict]:
        """Binance's userTrades: a 7-day window from ``since`` (else the last 7 days), at
        most ``limit`` (500 by default): the oldest from ``since``, else the newest."""
        p = dict(params or {})
        if symbol is None:
            raise ccxt.ArgumentsRequired(f"{self.id} fetchMyTrades() requires a symbol argument")
        market = self.market(symbol)
        limit = min(int(limit or 500), 1000)
        with self._venue("fetch_my_trades"):
            week, end = 7 * DAY_MS, p.get("until", p.get("endTime"))
            start = since if since is not None else (end or self._now) - week
            end = end if end is not None else (start + week if since is not None else self._now)
            if end - start > week:
                self._wire.reject(-4166, "Search window is restricted to recent 7 days only.",
                                  "fetch_my_trades")
            trades = self.store.trades(market["symbol"], start, end)
            trades = trades[:limit] if since is not None else trades[-limit:]
            raws = [raw_trade(t, market["id"], self._spec[t.symbol], self.settle) for t in trades]
            return self._parser.parse_trades(self._body(raws), market, since, limit)

    def _order_dict(self, o: SimOrder) -> dict:
        raw = raw_order(o, self.markets[o.symbol]["id"], self._spec[o.symbol])
        return self._parser.parse_order(self._body(raw), self.markets[o.symbol])

    def _body(self, raw: Any) -> Any:
        """Keep the raw Binance body, as ccxt does with enableLastJsonResponse."""
        if self.enableLastJsonResponse:
            self.last_json_response = raw
        return raw


def _crash(method: str, fault: str) -> None:
    """Test-only fault: the venue runs inside the bot's process, so this kills the bot."""
    assert fault in CRASH_FAULTS
    log.warning("sim: injected %s in %s: SIGKILL to process %d", fault, method, os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


def _is_trigger(params: dict) -> bool:
    return bool(params.get("trigger") or params.get("stop") or params.get("conditional"))


def _client_id(params: dict) -> str | None:
    return params.get("clientOrderId") or params.get("origClientOrderId") or \
        params.get("clientAlgoId")


def _low_side(o: SimOrder) -> bool:
    """Does the order fire when the price falls to its level (else when it rises)?"""
    if o.type == "STOP_MARKET":
        return o.side == "SELL"
    return o.side == "BUY"  # take-profit and limit orders


def first_missing(ts: np.ndarray, first: int, tf: int) -> int | None:
    """The open time of the first candle missing from ``ts`` (from ``first`` on, a candle
    every ``tf``; in any order, repeats counted once) before its last; None if none."""
    ts = np.unique(ts)
    expected = first + tf * np.arange(len(ts), dtype=np.int64)
    off = np.flatnonzero(ts != expected)
    return int(expected[off[0]]) if len(off) else None


def _priority(o: SimOrder) -> int:
    """Within one candle, stops go first (the pessimistic assumption), then the rest."""
    return {"STOP_MARKET": 0, "TAKE_PROFIT_MARKET": 1}.get(o.type, 2)


def make_source(config, clock, stored: dict | None, live_exchange: Any = None,
                origin_ms: int | None = None):
    """The market data source of ``config.sim`` (or the one an existing state file keeps)."""
    sim, settle, tf = config.sim, config.exchange.quote, config.strategy.timeframe
    if stored:
        kind = stored["source"]
        if kind != sim.source:  # e.g. a sim-mode file reused for paper trading
            raise ValueError(f"the simulated exchange's state file holds a {kind} market, but "
                             f"[sim] source = {sim.source!r}; use another state file or "
                             "delete it")
        wanted = {"synthetic": {"seed": sim.seed, "symbols": sim.symbols},
                  "csv": {"data_dir": sim.data_dir}}.get(kind, {})
        if any(stored.get(k) != v for k, v in wanted.items()):
            log.warning("the simulated exchange's state file keeps its own market %s, which "
                        "differs from [sim]; delete the file to start a fresh market", stored)
        if kind == "synthetic":
            return SyntheticMarket(stored["seed"], stored["symbols"], stored["timeframe"],
                                   stored["origin_ms"], stored["settle"])
        if kind == "csv":
            return CsvMarket(stored["data_dir"], stored["timeframe"], stored["settle"])
    elif sim.source == "synthetic":
        if origin_ms is None:
            origin_ms = day_start_ms(clock.now_ms()) - HISTORY_DAYS * DAY_MS
        return SyntheticMarket(sim.seed, sim.symbols, tf, origin_ms, settle)
    elif sim.source == "csv":
        if not sim.data_dir:
            raise ValueError("[sim] source = 'csv' needs [sim] data_dir")
        return CsvMarket(sim.data_dir, tf, settle)
    if live_exchange is None:
        live_exchange = getattr(ccxt, config.exchange.id)({
            "timeout": config.exchange.timeout_ms, "options": {"fetchCurrencies": False}})
    return LiveMarket(live_exchange, settle, clock)
