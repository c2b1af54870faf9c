"""Helpers shared by the simulated exchange's tests (real venue, real SQLite, virtual clock)."""

from __future__ import annotations

from pathlib import Path

import ccxt
import requests

from core.clock import VirtualClock
from core.sim_exchange import SimExchange
from core.sim_market import CsvMarket, SyntheticMarket

T0 = 1_700_006_400_000  # 2023-11-15 00:00 UTC, a 5-minute boundary
TF = 300_000
DAY = 86_400_000
REPO = Path(__file__).resolve().parents[1]
SHARED_OHLCV = REPO.parent / "shared" / "data" / "ohlcv"


def raise_ip_ban(retry_after_s: int) -> None:
    """Binance's 418 (IP banned) as ccxt raises it: a DDoSProtection while handling the
    HTTP error, whose response carries the status and Retry-After."""
    response = requests.Response()
    response.status_code, response.headers = 418, {"Retry-After": str(retry_after_s)}
    try:
        raise requests.HTTPError(response=response)
    except requests.HTTPError:
        raise ccxt.DDoSProtection('binanceusdm 418 {"code":-1003}') from None


def synthetic(n: int = 4, seed: int = 42) -> SyntheticMarket:
    return SyntheticMarket(seed, n, "5m", origin_ms=T0 - 3 * DAY)


def make_sim(source=None, clock=None, **kw) -> tuple[SimExchange, VirtualClock]:
    clock = clock or VirtualClock(T0)
    kw.setdefault("slippage_bps", 0.0)
    return SimExchange(source or synthetic(), clock, **kw), clock


def qty_for(ex: SimExchange, symbol: str, notional: float) -> str:
    """An amount worth about ``notional`` USDT at the current price."""
    return ex.amount_to_precision(symbol, notional / ex.fetch_ticker(symbol)["last"])


def write_csv(folder: Path, name: str, rows: list[tuple]) -> None:
    """rows: (ts, open, high, low, close, volume)."""
    lines = ["timestamp,open,high,low,close,volume"]
    lines += [",".join(str(x) for x in r) for r in rows]
    (folder / name).write_text("\n".join(lines) + "\n")


def csv_market(folder: Path, closes_by_base: dict[str, list[tuple]]) -> CsvMarket:
    """A CSV folder of hand-made 5 m candles (o, h, l, c[, v]) starting at T0 - 10 candles."""
    for base, candles in closes_by_base.items():
        rows = [(T0 - 10 * TF + i * TF, *c[:4], c[4] if len(c) > 4 else 1000.0)
                for i, c in enumerate(candles)]
        write_csv(folder, f"{base}_USDT-5m.csv", rows)
    return CsvMarket(folder, "5m", "USDT")


def flat(price: float, n: int) -> list[tuple]:
    """n quiet candles around ``price``."""
    return [(price, price * 1.001, price * 0.999, price)] * n


def hide_orders_stops_became(venue: SimExchange) -> None:
    """The venue does not show the order a fired stop became yet: Binance answers -2013
    for an order id it has not made visible. ``del venue.fetch_order`` shows it again."""
    real = venue.fetch_order

    def fetch_order(id, symbol=None, params=None):  # noqa: A002
        if id is not None and not (params or {}).get("trigger"):
            raise ccxt.OrderNotFound('binanceusdm {"code":-2013,"msg":"Order does not exist."}')
        return real(id, symbol, params)

    venue.fetch_order = fetch_order


def answer_entries_new_unseen(venue: SimExchange, lookups: int) -> None:
    """Binance may answer a MARKET order NEW with nothing filled (its answer was made
    before the match) and not show the order for a moment: -2013 to lookups, -2011 to
    cancels. The next entry (not reduce-only, not a stop) fills at once, is answered so,
    and stays out of sight for its first ``lookups`` lookups and cancels."""
    create, fetch, cancel = venue.create_order, venue.fetch_order, venue.cancel_order
    hidden: dict[str, int] = {}

    def create_order(symbol, type, side, amount, price=None, params=None):  # noqa: A002
        order = create(symbol, type, side, amount, price, params)
        p = params or {}
        if hidden or p.get("triggerPrice") or p.get("reduceOnly"):
            return order
        hidden[order["clientOrderId"]] = lookups
        info = {**order["info"], "status": "NEW", "executedQty": "0", "avgPrice": "0.00",
                "cumQuote": "0"}
        return {**order, "status": "open", "filled": 0.0, "remaining": order["amount"],
                "average": None, "cost": 0.0, "trades": [], "info": info}

    def unseen(params) -> bool:
        cid = (params or {}).get("clientOrderId")
        if hidden.get(cid, 0) > 0:
            hidden[cid] -= 1
            return True
        return False

    def fetch_order(id, symbol=None, params=None):  # noqa: A002
        if unseen(params):
            raise ccxt.OrderNotFound('binanceusdm {"code":-2013,"msg":"Order does not exist."}')
        return fetch(id, symbol, params)

    def cancel_order(id, symbol=None, params=None):  # noqa: A002
        if unseen(params):
            raise ccxt.OrderNotFound('binanceusdm {"code":-2011,"msg":"Unknown order sent."}')
        return cancel(id, symbol, params)

    venue.create_order, venue.fetch_order, venue.cancel_order = \
        create_order, fetch_order, cancel_order
