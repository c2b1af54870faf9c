"""How the simulated exchange speaks Binance USDⓈ-M: response bodies and errors.

The venue builds each answer as Binance would send it (``fapi`` field names, decimal
strings) and hands it to ccxt's own ``binanceusdm`` parsers, so the unified structures
are exactly ccxt's. Errors go through ccxt's own error mapping (``handle_errors`` and
``handle_http_status_code``), so the exception classes and messages are the ones a real
venue would produce (e.g. -2019 → InsufficientFunds, HTTP 429 → DDoSProtection,
HTTP 503 → ExchangeNotAvailable, -1021 → InvalidNonce).
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import NoReturn

import ccxt

from core.sim_account import ZERO, Account, Spec, fmt, held, places
from core.sim_store import SimOrder, SimPosition, SimTrade

FAPI = "https://fapi.binance.com/fapi/"
PATHS = {
    "load_markets": ("GET", "v1/exchangeInfo"), "fetch_time": ("GET", "v1/time"),
    "fetch_ohlcv": ("GET", "v1/klines"), "fetch_ticker": ("GET", "v1/ticker/24hr"),
    "fetch_tickers": ("GET", "v1/ticker/24hr"), "fetch_balance": ("GET", "v3/account"),
    "fetch_positions": ("GET", "v3/positionRisk"), "fetch_order": ("GET", "v1/order"),
    "fetch_open_orders": ("GET", "v1/openOrders"), "fetch_my_trades": ("GET", "v1/userTrades"),
    "create_order": ("POST", "v1/order"), "cancel_order": ("DELETE", "v1/order"),
    "set_leverage": ("POST", "v1/leverage"), "set_margin_mode": ("POST", "v1/marginType"),
}
ALGO_PATHS = {"create_order": ("POST", "v1/algoOrder"), "cancel_order": ("DELETE", "v1/algoOrder"),
              "fetch_order": ("GET", "v1/algoOrder"),
              "fetch_open_orders": ("GET", "v1/openAlgoOrders")}
MAINT_RATE = Decimal("0.004")  # maintenance margin rate shown (no liquidation is simulated)
Q8 = Decimal("1e-8")
RATE_LIMIT_MSG = ("Too many requests; current limit of IP(127.0.0.1) is 2400 requests per "
                  "minute. Please use the websocket for live updates to avoid polling the API.")
SERVICE_UNAVAILABLE = "<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>"


class Wire:
    """ccxt's binanceusdm, used offline: parses bodies and maps errors, never connects."""

    def __init__(self, venue_id: str) -> None:
        self.parser = ccxt.binanceusdm()
        self.parser.id = venue_id  # messages read "sim {...}", honest about who answered

    def url(self, method: str, algo: bool = False) -> tuple[str, str]:
        verb, path = (ALGO_PATHS if algo and method in ALGO_PATHS else PATHS)[method]
        return verb, FAPI + path

    def reject(self, code: int, msg: str, method: str = "create_order", algo: bool = False,
               status: int = 400) -> NoReturn:
        """Raise what ccxt raises when Binance answers {"code": code, "msg": msg}."""
        body = json.dumps({"code": code, "msg": msg}, separators=(",", ":"))
        reason = "Too Many Requests" if status == 429 else "Bad Request"
        self.http_error(status, reason, method, algo, body, {"code": code, "msg": msg})

    def http_error(self, status: int, reason: str, method: str, algo: bool, body: str,
                   response: object = None) -> NoReturn:
        verb, url = self.url(method, algo)
        self.parser.handle_errors(status, reason, url, verb, {}, body, response, {}, "")
        self.parser.handle_http_status_code(status, reason, url, verb, body)
        raise ccxt.ExchangeError(f"{self.parser.id} {verb} {url}")

    def fault(self, method: str, fault: str, algo: bool = False) -> NoReturn:
        """Raise the error a caller sees for an injected fault (see core.sim_faults)."""
        verb, url = self.url(method, algo)
        details = f"{self.parser.id} {verb} {url}"  # what ccxt's fetch() says
        if fault == "network_error":
            raise ccxt.NetworkError(details)
        if fault in ("timeout", "timeout_after_accept"):
            raise ccxt.RequestTimeout(details)
        if fault in ("server_error", "server_error_after_accept"):
            self.http_error(503, "Service Unavailable", method, algo, SERVICE_UNAVAILABLE)
        if fault == "rate_limit":
            self.reject(-1003, RATE_LIMIT_MSG, method, algo, status=429)
        if fault == "clock_skew":
            self.reject(-1021, "Timestamp for this request is outside of the recvWindow.",
                        method, algo)
        if fault == "insufficient_funds":
            self.reject(-2019, "Margin is insufficient.", method, algo)
        if fault == "reject":
            self.reject(-4131, "The counterparty's best price does not meet the PERCENT_PRICE "
                        "filter limit.", method, algo)
        raise ValueError(f"fault {fault!r} is not an error")


def raw_order(o: SimOrder, market_id: str, spec: Spec) -> dict:
    """An order as fapi sends it (algo orders as the algo service sends them)."""
    qp, pp = places(spec.step), places(spec.tick)
    avg = o.cum_quote / o.filled if o.filled else ZERO
    if o.algo:
        return {"algoId": o.id, "clientAlgoId": o.client_id, "algoType": "CONDITIONAL",
                "orderType": o.type, "symbol": market_id, "side": o.side, "positionSide": "BOTH",
                "timeInForce": "GTE_GTC" if o.close_position else "GTC",
                "quantity": held(o.amount, qp), "algoStatus": o.status,
                "triggerPrice": held(o.trigger_price, pp), "price": fmt(ZERO, pp),
                "icebergQuantity": None, "selfTradePreventionMode": "EXPIRE_MAKER",
                "workingType": "CONTRACT_PRICE", "priceMatch": "NONE",
                "closePosition": o.close_position, "priceProtect": False,
                "reduceOnly": o.reduce_only, "createTime": o.created_ms,
                "updateTime": o.updated_ms, "triggerTime": o.trigger_ms, "goodTillDate": 0,
                # As documented: the order it became and that order's average price, but
                # not what filled (ccxt reads a FINISHED stop as closed, nothing filled).
                "actualOrderId": "" if o.actual_order_id is None else str(o.actual_order_id),
                "actualPrice": fmt(avg, pp + 2)}
    return {"orderId": o.id, "symbol": market_id, "status": o.status,
            "clientOrderId": o.client_id, "price": held(o.price, pp), "avgPrice": fmt(avg, pp + 2),
            "origQty": held(o.amount, qp), "executedQty": held(o.filled, qp),
            "cumQty": held(o.filled, qp), "cumQuote": fmt(o.cum_quote, pp + qp),
            "timeInForce": "GTC", "type": o.type, "reduceOnly": o.reduce_only,
            "closePosition": o.close_position, "side": o.side, "positionSide": "BOTH",
            "stopPrice": "0", "workingType": "CONTRACT_PRICE", "priceProtect": False,
            "origType": o.orig_type or o.type, "priceMatch": "NONE",
            "selfTradePreventionMode": "EXPIRE_MAKER", "goodTillDate": 0,
            "time": o.created_ms, "updateTime": o.updated_ms}


def raw_trade(t: SimTrade, market_id: str, spec: Spec, settle: str) -> dict:
    """An account trade as fapi's userTrades sends it (no client order id, as there)."""
    qp, pp = places(spec.step), places(spec.tick)
    return {"buyer": t.side == "BUY", "commission": fmt(t.commission, 8),
            "commissionAsset": settle, "id": t.id, "maker": t.maker, "orderId": t.order_id,
            "price": held(t.price, pp), "qty": held(t.qty, qp), "quoteQty": fmt(t.quote_qty, pp + qp),
            "realizedPnl": fmt(t.realized_pnl, 8), "side": t.side, "positionSide": "BOTH",
            "symbol": market_id, "time": t.ts}


def raw_position(market_id: str, p: SimPosition, mark: Decimal, leverage: int, spec: Spec,
                 settle: str) -> dict:
    """A v3 positionRisk entry (v3 has no leverage field: ccxt reports leverage None)."""
    notional = (p.amount * mark).quantize(Q8)
    im = (abs(notional) / leverage).quantize(Q8)
    return {"symbol": market_id, "positionSide": "BOTH",
            "positionAmt": held(p.amount, places(spec.step)), "entryPrice": str(p.entry_price),
            "breakEvenPrice": str(p.entry_price), "markPrice": str(mark),
            "unRealizedProfit": str((p.amount * (mark - p.entry_price)).quantize(Q8)),
            "liquidationPrice": "0", "isolatedMargin": "0", "notional": str(notional),
            "marginAsset": settle, "isolatedWallet": "0", "initialMargin": str(im),
            "maintMargin": str((abs(notional) * MAINT_RATE).quantize(Q8)),
            "positionInitialMargin": str(im), "openOrderInitialMargin": "0", "adl": 0,
            "bidNotional": "0", "askNotional": "0", "updateTime": p.updated_ms}


def raw_account(a: Account, positions: dict[str, SimPosition], settle: str,
                updated_ms: int) -> dict:
    """The v3 account body (ccxt reads assets: free = availableBalance, used =
    initialMargin, total = marginBalance)."""
    w, u = a.wallet.quantize(Q8), a.upnl.quantize(Q8)
    pim, oim = a.position_margin.quantize(Q8), a.order_margin.quantize(Q8)
    avail = a.available.quantize(Q8)
    maint = sum((abs(p.amount) * a.marks[s] * MAINT_RATE for s, p in positions.items()),
                ZERO).quantize(Q8)
    withdraw = str(max(ZERO, min(avail, w)))
    asset = {"asset": settle, "walletBalance": str(w), "unrealizedProfit": str(u),
             "marginBalance": str(w + u), "maintMargin": str(maint), "initialMargin": str(pim + oim),
             "positionInitialMargin": str(pim), "openOrderInitialMargin": str(oim),
             "crossWalletBalance": str(w), "crossUnPnl": str(u), "availableBalance": str(avail),
             "maxWithdrawAmount": withdraw, "updateTime": updated_ms}
    return {"totalInitialMargin": str(pim + oim), "totalMaintMargin": str(maint),
            "totalWalletBalance": str(w), "totalUnrealizedProfit": str(u),
            "totalMarginBalance": str(w + u), "totalPositionInitialMargin": str(pim),
            "totalOpenOrderInitialMargin": str(oim), "totalCrossWalletBalance": str(w),
            "totalCrossUnPnl": str(u), "availableBalance": str(avail),
            "maxWithdrawAmount": withdraw, "assets": [asset], "positions": []}


def raw_ticker(market_id: str, t: dict, spec: Spec) -> dict:
    """A 24 h ticker from rolling statistics (see ArraySource.ticker)."""
    px, o, last = places(spec.tick), t["open"], t["last"]
    avg = t["quoteVolume"] / t["volume"] if t["volume"] else last
    return {"symbol": market_id, "priceChange": f"{last - o:.{px}f}",
            "priceChangePercent": f"{(last - o) / o * 100:.3f}",
            "weightedAvgPrice": f"{avg:.{px}f}", "lastPrice": f"{last:.{px}f}", "lastQty": "0",
            "openPrice": f"{o:.{px}f}", "highPrice": f"{t['high']:.{px}f}",
            "lowPrice": f"{t['low']:.{px}f}", "volume": f"{t['volume']:.{places(spec.step)}f}",
            "quoteVolume": f"{t['quoteVolume']:.2f}", "openTime": t["openTime"],
            "closeTime": t["closeTime"], "firstId": 0, "lastId": 0, "count": 0}
