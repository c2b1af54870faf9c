"""The vocabulary between the bot and any exchange: requests, reports, results.

Two layers, so that the careful logic (precision, minimums, retries, lookup by
client order id after an ambiguous submission, closed-candle filtering, validation)
is written once:

* A **raw venue** speaks a subset of ccxt's unified API and raises ccxt's exception
  classes. A real ``ccxt.binanceusdm`` object is one; ``core.sim_exchange.SimExchange``
  is the other. The subset the bot uses (signatures as in ccxt 4.5):

      load_markets() -> dict;  markets: dict;  market(symbol) -> dict
      amount_to_precision(symbol, amount) -> str      (truncates)
      price_to_precision(symbol, price) -> str        (rounds)
      fetch_time() -> int
      fetch_ohlcv(symbol, timeframe, since=None, limit=None) -> [[ts, o, h, l, c, v], ...]
      fetch_tickers(symbols=None) -> {symbol: {"symbol", "last", "quoteVolume", "timestamp", ...}}
      fetch_balance() -> {"USDT": {"free", "used", "total"}, "info": {...}, ...}
      fetch_positions(symbols=None) -> [{"symbol", "side", "contracts", "entryPrice",
                                         "unrealizedPnl", "markPrice", "leverage", ...}]
      create_order(symbol, type, side, amount, price=None, params={}) -> order dict
          params: clientOrderId, reduceOnly, triggerPrice (stop orders, Binance's algo route)
      fetch_order(id, symbol, params={})   id may be None with params
          {"clientOrderId": X} (regular) or {"trigger": True, "clientOrderId": X} (algo)
      fetch_open_orders(symbol=None, since=None, limit=None, params={})  ({"trigger": True}
          lists stop orders)
      cancel_order(id, symbol, params={})  ({"trigger": True} for stop orders)
      fetch_my_trades(symbol, since=None, limit=None, params={}) -> [trade dict]
      set_leverage(leverage, symbol), set_margin_mode(mode, symbol)

  Order dicts use ccxt's unified order structure: id, clientOrderId, symbol, type,
  side, amount, filled, remaining, average, price, status (open|closed|canceled|
  expired|rejected), triggerPrice, reduceOnly, timestamp, fee, trades, info.

* The **careful client** ``core.exchange.ExchangeClient(raw, config, clock)`` wraps
  either venue and returns the typed reports below. The rest of the bot only ever
  talks to an ExchangeClient, so it cannot tell the real venue from the simulated one.

Amounts and prices are ``Decimal`` built from the exchange's own strings (or the
precision functions' output), so the ledger stores exactly what was sent/received.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

# Binance's longest IP ban (HTTP 418): 3 days. A longer end (a proxy's odd Retry-After, a
# wrong clock) is not believed: the bot would otherwise call nothing, stops included.
LONGEST_IP_BAN_MS = 3 * 86_400_000

Side = Literal["buy", "sell"]
OrderType = Literal["market", "stop_market"]
# "triggered": a stop that fired whose outcome is not known yet (the order it became is
# still working or not visible): neither resting nor settled.
OrderStatus = Literal["open", "triggered", "closed", "canceled", "expired", "rejected"]
SubmitStatus = Literal["accepted", "rejected", "unknown"]


@dataclass(frozen=True)
class Candle:
    """A closed OHLCV candle; ts is its open time in UTC ms."""

    ts: int
    open: float
    high: float
    low: float
    close: float
    volume: float


@dataclass(frozen=True)
class MarketInfo:
    symbol: str
    base: str
    quote: str
    amount_step: Decimal | None
    price_step: Decimal | None
    min_amount: Decimal | None
    min_notional: Decimal | None
    contract_size: Decimal = Decimal(1)
    # The most one order may carry: the smaller of Binance's LOT_SIZE and MARKET_LOT_SIZE
    # maxQty (all our orders are market or stop-market); above it Binance answers -4005.
    max_amount: Decimal | None = None
    # The taker fee rate as the exchange's market data gives it (0.0005 = 0.05 %).
    taker_fee: Decimal | None = None


@dataclass(frozen=True)
class Ticker:
    symbol: str
    last: Decimal
    quote_volume: Decimal
    ts: int
    high: Decimal | None = None
    low: Decimal | None = None


@dataclass(frozen=True)
class OrderRequest:
    """What the bot wants sent. client_order_id is chosen by the caller (see execution)."""

    symbol: str
    side: Side
    amount: Decimal
    client_order_id: str
    type: OrderType = "market"
    reduce_only: bool = False
    trigger_price: Decimal | None = None


@dataclass(frozen=True)
class OrderReport:
    """The exchange's view of one order."""

    symbol: str
    client_order_id: str | None
    exchange_order_id: str | None
    side: Side
    type: str
    status: OrderStatus
    amount: Decimal
    filled: Decimal
    average_price: Decimal | None
    trigger_price: Decimal | None
    reduce_only: bool
    ts: int | None
    is_trigger: bool = False
    # A stop that fired: the id of the order it became (Binance's algo actualOrderId),
    # under which it trades; its status, fill and average are that order's.
    triggered_order_id: str | None = None


@dataclass(frozen=True)
class FillReport:
    """One account trade (a fill)."""

    symbol: str
    trade_id: str
    exchange_order_id: str | None
    client_order_id: str | None
    side: Side
    amount: Decimal
    price: Decimal
    fee: Decimal  # in fee_currency: the settlement currency (see fee_paid)
    fee_currency: str
    ts: int
    realized_pnl: Decimal | None = None
    # A fee paid in another currency (Binance's BNB fee discount): (amount, currency,
    # price used); ``fee`` holds its value in the settlement currency.
    fee_paid: tuple[Decimal, str, Decimal] | None = None


@dataclass(frozen=True)
class PositionReport:
    symbol: str
    side: Literal["long", "short"]
    amount: Decimal  # always positive; side says the direction
    entry_price: Decimal
    mark_price: Decimal | None
    unrealized_pnl: Decimal
    leverage: int | None = None


@dataclass(frozen=True)
class BalanceReport:
    currency: str
    total: Decimal  # wallet balance
    free: Decimal
    used: Decimal
    equity: Decimal  # wallet balance + unrealized PnL (margin balance)


@dataclass(frozen=True)
class SubmitResult:
    """Outcome of one submission. ``unknown`` means ambiguous: record it, reconcile later."""

    status: SubmitStatus
    request: OrderRequest
    order: OrderReport | None = None
    reason: str = ""
    errors: list[str] = field(default_factory=list)
    # A stop refused because the price is already past its trigger (Binance -2021).
    would_trigger: bool = False


class BadExchangeData(ValueError):
    """The exchange answered with something we cannot trust (validated at the edge).

    ``summary`` is a short, secret-free description of the raw payload for the log.
    """

    def __init__(self, message: str, summary: Any = None) -> None:
        super().__init__(message)
        self.summary = summary
