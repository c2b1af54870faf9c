"""The venue a backtest trades on: the simulated exchange, in memory, on a virtual clock.

Orders take the same road as in every other mode: ``core.execution.Executor`` ->
``core.exchange.ExchangeClient`` -> ``core.sim_exchange.SimExchange`` (ccxt's parsers,
the order state machine, fees, slippage, stop triggers on candle highs/lows). Two thin
layers only save work that cannot change an answer:

* ``BacktestClient`` wraps the real client. It remembers what does not change while the
  clock stands still and no order is sent (the balance - while flat, whatever the
  clock - and a market's rules) and serves
  market data from the arrays already in memory (24 h tickers for the rotation, closed
  candles) in exactly the form the client returns them (tests compare both).
* ``BacktestExecutor`` is the Executor, with the one ledger question it asks in SQL (how
  many stops a position has had) answered from the write-behind ledger's memory.
"""

from __future__ import annotations

from decimal import Decimal

from core.backtest_data import MarketData
from core.clock import VirtualClock, timeframe_ms
from core.exchange import ExchangeClient
from core.exchange_types import BalanceReport, Candle, MarketInfo, Ticker
from core.execution import Executor
from core.sim_account import Spec, places
from core.sim_exchange import SimExchange
from core.sim_faults import FaultInjector


def build_venue(config, source, clock: VirtualClock) -> SimExchange:
    """An in-memory simulated exchange over ``source`` with ``[sim]``'s account settings."""
    sim = config.sim
    return SimExchange(source, clock, settle=config.exchange.quote,
                       start_balance=sim.start_balance, taker_fee_pct=sim.taker_fee_pct,
                       maker_fee_pct=sim.maker_fee_pct, slippage_bps=sim.slippage_bps,
                       partial_fill_prob=sim.partial_fill_prob,
                       faults=FaultInjector(config.faults, sim.seed), state_path=None,
                       seed=sim.seed)


class BacktestClient:
    """The real ExchangeClient plus caches that are exact (see the module docstring)."""

    def __init__(self, client: ExchangeClient, data: MarketData, clock) -> None:
        self.client = client
        self.data = data
        self.clock = clock
        self._writes = 0  # orders sent or cancelled: the account may have changed
        self._balance: BalanceReport | None = None
        self._balance_key: tuple[int, int] | None = None
        self._markets: dict[str, MarketInfo] = {}
        self._tradable: list[str] | None = None
        venue = client.raw
        self._price_decimals = {s: places(Spec.of(m).tick) for s, m in venue.markets.items()}

    def __getattr__(self, name: str):
        return getattr(self.client, name)

    # -- account: the balance only changes when time moves or an order goes out ---------

    def balance(self) -> BalanceReport:
        # A flat account's balance only changes when an order goes out; an open position
        # is marked to the market, so its balance is fetched at every new instant.
        key = (None if self.client.raw.is_flat() else self.clock.now_ms(), self._writes)
        if key != self._balance_key:
            self._balance, self._balance_key = self.client.balance(), key
        return self._balance

    def submit(self, req, ref_price=None):
        self._writes += 1
        return self.client.submit(req, ref_price)

    def cancel(self, *args, **kwargs):
        self._writes += 1
        return self.client.cancel(*args, **kwargs)

    def ensure_symbol_settings(self, symbol: str) -> None:
        self._writes += 1  # leverage changes the free margin
        self.client.ensure_symbol_settings(symbol)

    # -- static market rules -------------------------------------------------------------

    def market(self, symbol: str) -> MarketInfo:
        m = self._markets.get(symbol)
        if m is None:
            m = self._markets[symbol] = self.client.market(symbol)
        return m

    def load_markets(self, reload: bool = False) -> list[str]:
        if self._tradable is None or reload:
            self._tradable = self.client.load_markets(reload)
        return list(self._tradable)

    # -- market data from memory -----------------------------------------------------------

    def tickers(self) -> dict[str, Ticker]:
        return self.data.tickers(self.clock.now_ms(), self._price_decimals)

    def closed_candles(self, symbol: str, timeframe: str, limit: int) -> list[Candle]:
        if timeframe_ms(timeframe) != self.data.tf_ms or symbol not in self.data.data:
            return self.client.closed_candles(symbol, timeframe, limit)
        d = self.data.data[symbol]
        last = d.last_at(self.clock.now_ms() - self.data.tf_ms)  # closed by now
        return [d.candle(i) for i in range(max(0, last + 1 - limit), last + 1)]


class BacktestExecutor(Executor):
    """The Executor; the two questions it asks the ledger in SQL (how many stops has a
    position had, what did its partial exits realize) are answered from the write-behind
    ledger's memory instead of flushing it (same answers; tests compare)."""

    def stop_attempts(self, position_id: str) -> int:
        counter = getattr(self.ledger, "stop_intents", None)
        return counter(position_id) if counter else super().stop_attempts(position_id)

    def realized_before(self, position_id: str) -> Decimal:
        pnls = getattr(self.ledger, "partial_exit_pnls", None)
        if pnls is None:
            return super().realized_before(position_id)
        return sum((Decimal(p) for p in pnls(position_id)), Decimal(0))
