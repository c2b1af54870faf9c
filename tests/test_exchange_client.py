"""ExchangeClient over a real ccxt.binanceusdm, offline.

The venue is a recorded Binance USDⓈ-M (tests/fixtures/binance/*.json, shapes checked against
ccxt's captured responses in ts/src/test/static/response/binance.json and Binance's docs). It
answers ccxt either in place of ``exchange.fetch`` (parsed bodies) or in place of
``exchange.session.request`` (real HTTP status codes and bodies, so ccxt's own error mapping
runs). Every request ccxt sends is recorded so the tests can check its parameters.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import ccxt
import pytest
import requests
from requests.structures import CaseInsensitiveDict

from core import runtime
from core.clock import VirtualClock
from core.config import Config, ConfigError, Secrets
from core.exchange import (
    NOT_FOUND_FINAL_MS,
    ExchangeClient,
    IpBanned,
    build_ccxt,
    clean_candles,
)
from core.exchange_types import BadExchangeData, Candle, OrderRequest
from core.execution import fill_data
from core.orders import state_of

FIX = Path(__file__).parent / "fixtures" / "binance"
SERVER_NOW = 1768471350000  # time.json: 2026-01-15T10:02:30Z, mid-way through the 10:00 candle
T_1000 = 1768471200000  # open time of the forming 5m candle in klines_btcusdt_5m.json
BTC, ETH = "BTC/USDT:USDT", "ETH/USDT:USDT"
ENTRY_CID = "bot1-e-BTCUSDT-1768471200000"  # the client ids in the recorded answers
STOP_CID = "bot1-s-BTCUSDT-1768471200000"
KEY = "kEy" + "A1b2C3d4" * 8
SECRET = "sEcReT" + "Z9y8X7w6" * 8

ROUTES = {
    ("GET", "/fapi/v1/exchangeInfo"): "exchange_info",
    ("GET", "/fapi/v1/time"): "time",
    ("GET", "/fapi/v1/klines"): "klines_btcusdt_5m",
    ("GET", "/fapi/v1/ticker/24hr"): "ticker_24hr",
    ("GET", "/fapi/v3/account"): "account_v3",
    ("GET", "/fapi/v3/positionRisk"): "position_risk_v3",
    ("GET", "/fapi/v1/leverageBracket"): "leverage_bracket",
    ("POST", "/fapi/v1/order"): "order_market_filled",
    ("GET", "/fapi/v1/order"): "order_query_filled",
    ("POST", "/fapi/v1/algoOrder"): "algo_order_new",
    ("GET", "/fapi/v1/algoOrder"): "algo_order_query",
    ("DELETE", "/fapi/v1/algoOrder"): "cancel_algo",
    ("GET", "/fapi/v1/openOrders"): "open_orders",
    ("GET", "/fapi/v1/openAlgoOrders"): "open_algo_orders",
    ("GET", "/fapi/v1/userTrades"): "user_trades",
    ("POST", "/fapi/v1/leverage"): "leverage",
    ("POST", "/fapi/v1/marginType"): "margin_type",
}
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 418: "I'm a teapot",
           429: "Too Many Requests", 503: "Service Unavailable"}


def body(name: str):
    return json.loads((FIX / f"{name}.json").read_text(encoding="utf-8"))


ERRORS = body("errors")


@dataclass
class Sent:
    method: str
    path: str
    params: dict


class RecordedBinance:
    """Answers ccxt from the recorded bodies; queued replies override a route once each.

    A reply is a fixture name, a body (dict/list), an error name from errors.json (as
    ``err("...")``), or an exception to raise (e.g. requests' ReadTimeout).
    """

    def __init__(self) -> None:
        self.queued: dict[tuple[str, str], list] = defaultdict(list)
        self.sent: list[Sent] = []
        self.headers: list[dict] = []

    def then(self, method: str, path: str, *replies) -> RecordedBinance:
        self.queued[(method, path)].extend(replies)
        return self

    def requests_to(self, method: str, path: str) -> list[dict]:
        return [s.params for s in self.sent if (s.method, s.path) == (method, path)]

    def _reply(self, method: str, url: str, body_text) -> tuple[int, str, dict]:
        parts = urlsplit(url)
        params = dict(parse_qsl(parts.query))
        if body_text:
            text = body_text.decode() if isinstance(body_text, bytes) else body_text
            params.update(parse_qsl(text))
        self.sent.append(Sent(method, parts.path, params))
        queue = self.queued.get((method, parts.path))
        reply = queue.pop(0) if queue else ROUTES[(method, parts.path)]
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, Err):
            spec = ERRORS[reply.name]
            return (spec["status"], spec.get("text") or json.dumps(spec["body"]),
                    spec.get("headers", {}))
        if isinstance(reply, str):
            reply = body(reply)
        return 200, json.dumps(reply), {}

    def fetch(self, url, method="GET", headers=None, body=None):
        """In place of exchange.fetch: parsed bodies, success only."""
        status, text, _ = self._reply(method, url, body)
        assert status == 200, "error replies go through the HTTP session adapter"
        return json.loads(text)

    def request(self, method, url, data=None, headers=None, **kwargs):
        """In place of exchange.session.request: a real requests.Response."""
        self.headers.append(dict(headers or {}))
        status, text, extra = self._reply(method, url, data)
        response = requests.Response()
        response.status_code = status
        response.reason = REASONS[status]
        response.url = url
        response._content = text.encode()
        ctype = "application/json" if text.startswith(("{", "[")) else "text/html"
        response.headers = CaseInsensitiveDict({"Content-Type": ctype, **extra})
        return response


@dataclass(frozen=True)
class Err:
    name: str


def err(name: str) -> Err:
    assert name in ERRORS
    return Err(name)


def make(http: bool = False, clock_ms: int = SERVER_NOW, **exchange):
    """(client, venue, sleeps): a real binanceusdm from build_ccxt answering from fixtures."""
    config = Config(secrets=Secrets(api_key=KEY, api_secret=SECRET))
    if exchange:
        config = config.with_values(exchange=exchange)
    raw = build_ccxt(config)
    raw.enableRateLimit = False  # ccxt's throttle sleeps in real time; tests never wait
    venue = RecordedBinance()
    if http:
        raw.session.request = venue.request
    else:
        raw.fetch = venue.fetch
    sleeps: list[float] = []
    client = ExchangeClient(raw, config, VirtualClock(clock_ms), sleep=sleeps.append,
                            rng=random.Random(7))
    return client, venue, sleeps


def entry(amount="0.012", cid=ENTRY_CID, symbol=BTC, **kw) -> OrderRequest:
    return OrderRequest(symbol=symbol, side="buy", amount=Decimal(amount), client_order_id=cid,
                        **kw)


def stop(trigger="94406.63", amount="0.012") -> OrderRequest:
    return OrderRequest(symbol=BTC, side="sell", amount=Decimal(amount), client_order_id=STOP_CID,
                        type="stop_market", reduce_only=True, trigger_price=Decimal(trigger))


# ---- construction ---------------------------------------------------------------------

def test_build_ccxt_is_careful():
    config = Config(secrets=Secrets(api_key=KEY, api_secret=SECRET)).with_values(
        exchange={"timeout_ms": 7000})
    raw = build_ccxt(config)
    assert isinstance(raw, ccxt.binanceusdm)
    assert raw.timeout == 7000
    assert raw.enableRateLimit is True
    assert raw.options["fetchCurrencies"] is False
    assert raw.options["adjustForTimeDifference"] is True
    assert raw.options["maxRetriesOnFailure"] == 0
    assert (raw.apiKey, raw.secret) == (KEY, SECRET)
    assert "fapi.binance.com" in raw.urls["api"]["fapiPrivate"]


def test_build_ccxt_demo_trading_and_no_keys():
    raw = build_ccxt(Config().with_values(exchange={"demo": True}))
    assert "demo-fapi" in raw.urls["api"]["fapiPrivate"]
    assert not raw.apiKey and not raw.secret


def test_keys_never_reach_the_logs(caplog):
    client, venue, _ = make(http=True)
    with caplog.at_level(logging.DEBUG):
        client.balance()
        venue.then("POST", "/fapi/v1/order", err("insufficient_margin"))
        client.submit(entry(), ref_price=Decimal("96500"))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "/fapi/v3/account" in text  # ccxt's debug line is there, without its headers
    assert KEY not in text and SECRET not in text
    assert venue.headers[-1]["X-MBX-APIKEY"] == KEY  # the key did travel, in the header only


# ---- markets and precision ------------------------------------------------------------

def test_markets_from_exchange_info():
    client, venue, _ = make()
    assert client.load_markets() == [BTC, ETH]
    # adjustForTimeDifference: load_markets also read the server clock
    assert venue.requests_to("GET", "/fapi/v1/time")
    btc = client.market(BTC)
    assert (btc.amount_step, btc.price_step) == (Decimal("0.001"), Decimal("0.1"))
    assert (btc.min_amount, btc.min_notional) == (Decimal("0.001"), Decimal("100"))
    assert client.market(ETH).min_notional == Decimal("20")
    # the smaller of LOT_SIZE's and MARKET_LOT_SIZE's maxQty: all our orders are market
    assert (btc.max_amount, client.market(ETH).max_amount) == (Decimal("120"), Decimal("2000"))


def test_unknown_symbol_is_bad_data(caplog):
    client, _, _ = make()
    with pytest.raises(BadExchangeData, match="unknown symbol"):
        client.market("SOL/USDT:USDT")
    with pytest.raises(BadExchangeData):
        client.closed_candles("SOL/USDT:USDT", "5m", 10)
    assert "unknown symbol" in caplog.text
    amount, reason = client.prepare_amount("SOL/USDT:USDT", "1", "150")
    assert amount is None and "unknown symbol" in reason


def test_prepare_amount_truncates_and_checks_minimums():
    client, _, _ = make()
    assert client.prepare_amount(BTC, Decimal("0.0129"), Decimal("96500")) == (Decimal("0.012"), "")
    assert client.prepare_amount(BTC, "0.0004", "96500")[0] is None  # rounds to zero
    amount, reason = client.prepare_amount(BTC, "0.001", "96500")  # 96.5 < 100 USDT
    assert amount is None and "notional" in reason
    # reduce-only orders are exempt from the minimum notional (Binance -4164's own words)
    assert client.prepare_amount(BTC, "0.001", "96500", reduce_only=True)[0] == Decimal("0.001")
    assert client.prepare_amount(ETH, "0.007", "3307.45")[0] == Decimal("0.007")  # 23.15 >= 20
    assert client.prepare_amount(BTC, "0.01", None)[0] is None


# ---- candles -----------------------------------------------------------------------------

def test_forming_candle_dropped_by_exchange_time():
    # Our clock says 10:05:01 (the 10:00 candle would be closed); the exchange says 10:02:30.
    client, venue, _ = make(clock_ms=T_1000 + 301_000)
    candles = client.closed_candles(BTC, "5m", 5)
    assert [c.ts for c in candles] == [T_1000 - 300_000 * k for k in range(5, 0, -1)]
    assert candles[-1].close == 96498.7 and candles[-1].volume == 61.44
    sent = venue.requests_to("GET", "/fapi/v1/klines")[0]
    assert sent == {"symbol": "BTCUSDT", "interval": "5m", "limit": "6"}


@pytest.mark.parametrize("hedge, multi, named", [
    (False, False, None),
    (True, False, "hedge mode"),
    (False, True, "Multi-Assets margin mode"),
])
def test_an_account_in_hedge_or_multi_assets_mode_is_named_before_anything_starts(
        hedge, multi, named):
    # In hedge mode every order without positionSide is refused; in Multi-Assets mode the
    # USDT row alone is not the equity (it can read negative while margin is healthy).
    client, venue, _ = make(http=True)
    venue.then("GET", "/fapi/v1/positionSide/dual", {"dualSidePosition": hedge})
    venue.then("GET", "/fapi/v1/multiAssetsMargin", {"multiAssetsMargin": multi})
    problem = client.account_mode_problem()
    assert (problem is None) if named is None else (named in problem)
    venue.then("GET", "/fapi/v1/positionSide/dual", {"unexpected": 1})
    with pytest.raises(BadExchangeData):
        client.account_mode_problem()


def test_the_most_candles_the_config_allows_fit_the_klines_ccxt_asks_for():
    # ccxt asks Binance for at most 1000 klines; one of them is forming. More would be
    # cut silently: a long indicator would never warm up live while backtests trade.
    with pytest.raises(ConfigError, match=r"candles = 1000: out of range"):
        Config().with_values(strategy={"candles": 1000})
    client, venue, _ = make(http=True)
    client.closed_candles(BTC, "5m", 999)
    assert venue.requests_to("GET", "/fapi/v1/klines")[-1]["limit"] == "1000"
    client.raw.fetch_ohlcv(BTC, "5m", limit=1500)
    assert venue.requests_to("GET", "/fapi/v1/klines")[-1]["limit"] == "1000"  # ccxt's cap


def test_last_candle_kept_once_closed():
    client, venue, _ = make()
    client.load_markets()  # reads the server time once (adjustForTimeDifference)
    venue.then("GET", "/fapi/v1/time", {"serverTime": T_1000 + 300_000})
    candles = client.closed_candles(BTC, "5m", 10)
    assert len(candles) == 6 and candles[-1].ts == T_1000


def test_bad_candles_dropped_sorted_and_logged(caplog):
    client, venue, _ = make()
    rows = body("klines_btcusdt_5m")
    k = [list(r) for r in rows]
    bad_nan = list(k[1])
    bad_nan[4] = "NaN"
    bad_none = list(k[2])
    bad_none[2] = None
    zero = list(k[3])
    zero[3] = "0"
    inverted = list(k[4])
    inverted[2], inverted[3] = inverted[3], inverted[2]  # high < low
    served = [k[4], k[0], k[0], bad_nan, bad_none, zero, inverted, k[1], k[5]]
    venue.then("GET", "/fapi/v1/klines", served)
    candles = client.closed_candles(BTC, "5m", 10)
    assert [c.ts for c in candles] == [k[0][0], k[1][0], k[4][0]]
    # (ccxt itself sorts what it parses; clean_candles' own repair is tested below)
    for word in ("duplicate", "NaN", "zero or negative", "high/low", "missing"):
        assert word in caplog.text


def test_no_valid_candle_raises(caplog):
    client, venue, _ = make()
    venue.then("GET", "/fapi/v1/klines", [])
    with pytest.raises(BadExchangeData, match="no valid closed candle"):
        client.closed_candles(BTC, "5m", 10)
    assert "empty" in caplog.text


def test_clean_candles_rejects_every_kind_of_bad_row():
    tf = 60_000
    t0 = 29_474_520 * tf  # 2026-01-15T10:00Z
    now = t0 + 10 * tf + 30_000
    good = [[t0 + t * tf, 10.0, 11.0, 9.0, 10.5, 1.0] for t in range(3)]
    rows = [good[1], good[0], good[2]] + [
        [t0 + 3 * tf, -1, 11, 9, 10, 1],  # negative price
        [t0 + 4 * tf, 10, 11, 9, 10, -5],  # negative volume
        [t0 + 5 * tf, 10, 11, 9, 10, float("nan")],  # NaN volume
        [t0 + 6 * tf + 7, 10, 11, 9, 10, 1],  # misaligned
        [t0 + 7 * tf, 10, 9.5, 9, 10, 1],  # high below close
        "garbage", [t0 + 8 * tf, 10, 11],  # malformed
        [True, 10, 11, 9, 10, 1],  # bad timestamp
        [t0 + 10 * tf, 10, 11, 9, 10, 1],  # forming: normal, silent
        [t0 + 12 * tf, 10, 11, 9, 10, 1],  # from the future
    ]
    candles, problems = clean_candles(rows, tf, now)
    assert [c.ts for c in candles] == [t0, t0 + tf, t0 + 2 * tf]
    assert problems == {"out of order": 1, "zero or negative price": 1, "negative volume": 1,
                        "NaN or missing value": 1, "misaligned": 1, "high/low inconsistent": 1,
                        "malformed": 2, "bad timestamp": 1, "in the future": 1}
    assert clean_candles(None, tf, now) == ([], {"not a list": 1})
    numpy = pytest.importorskip("numpy")  # a venue built on pandas hands out numpy scalars
    row = [numpy.int64(t0), numpy.float64(10), 11.0, 9.0, 10.5, numpy.float64(1)]
    assert clean_candles([row], tf, now) == ([Candle(t0, 10.0, 11.0, 9.0, 10.5, 1.0)], {})


# ---- tickers, balance, positions, orders, fills ---------------------------------------

def test_tickers_only_for_known_markets():
    client, _, _ = make()
    tickers = client.tickers()
    assert set(tickers) == {BTC, ETH}  # SOLUSDT is not among our markets
    btc = tickers[BTC]
    assert btc.last == Decimal("96512.3") and btc.quote_volume == Decimal("11380579263.48")
    assert btc.ts == 1768471349871 and btc.high == Decimal("96900")


def test_bad_ticker_rows_dropped(caplog):
    client, venue, _ = make()
    rows = body("ticker_24hr")
    rows[1]["lastPrice"] = "-1"
    del rows[1]["priceChange"]  # else ccxt repairs last from open + change
    venue.then("GET", "/fapi/v1/ticker/24hr", rows)
    assert set(client.tickers()) == {BTC}
    assert "ETH/USDT:USDT: last must be positive" in caplog.text
    venue.then("GET", "/fapi/v1/ticker/24hr", [])
    with pytest.raises(BadExchangeData):
        client.tickers()


def test_unparseable_ticker_is_bad_data_not_a_crash(caplog):
    client, venue, _ = make()
    rows = body("ticker_24hr")
    rows[0]["lastPrice"] = "NaN"
    del rows[0]["priceChange"]
    venue.then("GET", "/fapi/v1/ticker/24hr", rows)
    with pytest.raises(BadExchangeData, match="could not parse"):  # ccxt raised ValueError
        client.tickers()
    assert "bad exchange data" in caplog.text


def test_balance_wallet_and_equity():
    client, venue, _ = make()
    b = client.balance()
    assert b.currency == "USDT"
    assert b.total == Decimal("5012.44318200")  # wallet balance
    assert b.equity == Decimal("5014.59118200")  # margin balance = wallet + unrealized
    assert b.free == Decimal("4628.564782") and b.used == Decimal("386.0264")
    assert venue.requests_to("GET", "/fapi/v3/account")[0]["recvWindow"] == "10000"


def test_balance_without_quote_entry_is_bad_data(caplog):
    client, venue, _ = make()
    account = body("account_v3")
    account["assets"] = [a for a in account["assets"] if a["asset"] != "USDT"]
    venue.then("GET", "/fapi/v3/account", account)
    with pytest.raises(BadExchangeData, match="no USDT entry"):
        client.balance()
    assert "bad exchange data" in caplog.text
    account = body("account_v3")
    del account["assets"][0]["availableBalance"]
    del account["assets"][0]["initialMargin"]  # one alone ccxt derives from the others
    venue.then("GET", "/fapi/v3/account", account)
    with pytest.raises(BadExchangeData, match="USDT free missing"):
        client.balance()
    account = body("account_v3")
    del account["assets"][0]["walletBalance"]  # never guessed from the margin balance
    venue.then("GET", "/fapi/v3/account", account)
    with pytest.raises(BadExchangeData, match="walletBalance missing"):
        client.balance()


def test_positions():
    client, venue, _ = make()
    longs, shorts = client.positions()
    assert (longs.symbol, longs.side, longs.amount) == (BTC, "long", Decimal("0.012"))
    assert longs.entry_price == Decimal("96333.3") and longs.mark_price == Decimal("96512.3")
    assert longs.unrealized_pnl == Decimal("2.148")
    assert (shorts.symbol, shorts.side, shorts.amount) == (ETH, "short", Decimal("0.25"))
    assert venue.requests_to("GET", "/fapi/v3/positionRisk")


def test_one_bad_position_invalidates_the_answer():
    client, venue, _ = make()
    rows = body("position_risk_v3")
    rows[1]["markPrice"] = "-3.00000000"
    venue.then("GET", "/fapi/v3/positionRisk", rows)
    with pytest.raises(BadExchangeData, match="markPrice must be positive"):
        client.positions()
    rows[1]["markPrice"] = "3307.45"
    rows[1]["positionAmt"] = "NaN"  # ccxt itself raises ValueError on this one
    venue.then("GET", "/fapi/v3/positionRisk", rows)
    with pytest.raises(BadExchangeData, match="could not parse"):
        client.positions()


def test_position_skipped_by_ccxt_is_noticed():
    # ccxt drops rows whose entryPrice is not > 0; the short must not read as flat.
    client, venue, _ = make(http=True)
    rows = body("position_risk_v3")
    rows[1]["entryPrice"] = "0.0"
    venue.then("GET", "/fapi/v3/positionRisk", rows)
    with pytest.raises(BadExchangeData, match="2 open in the raw answer, 1 parsed"):
        client.positions()
    assert len(client.positions()) == 2  # the next, sound answer is fine


def test_open_orders_regular_and_trigger():
    client, venue, _ = make()
    limit_order, stop_order = client.open_orders()
    assert (limit_order.symbol, limit_order.type, limit_order.is_trigger) == (ETH, "limit", False)
    assert (stop_order.client_order_id, stop_order.type) == (STOP_CID, "stop_market")
    assert stop_order.is_trigger and stop_order.reduce_only
    assert stop_order.trigger_price == Decimal("94406.6")
    assert stop_order.exchange_order_id == "3000000412873"
    assert venue.requests_to("GET", "/fapi/v1/openOrders")
    assert venue.requests_to("GET", "/fapi/v1/openAlgoOrders")


def test_fills():
    client, venue, _ = make()
    fills = client.fills(BTC, SERVER_NOW - 3_600_000)
    assert [f.trade_id for f in fills] == ["6984409120", "6984409121"]
    first = fills[0]
    assert (first.side, first.amount, first.price) == ("buy", Decimal("0.007"), Decimal("96333.3"))
    assert (first.fee, first.fee_currency) == (Decimal("0.33716655"), "USDT")
    assert first.exchange_order_id == "812345678901" and first.realized_pnl == Decimal("0")
    sent = venue.requests_to("GET", "/fapi/v1/userTrades")[0]
    assert sent["startTime"] == str(SERVER_NOW - 3_600_000) and sent["symbol"] == "BTCUSDT"


def test_fill_without_fee_is_bad_data():
    client, venue, _ = make()
    trades = body("user_trades")
    del trades[0]["commission"]
    del trades[0]["commissionAsset"]
    venue.then("GET", "/fapi/v1/userTrades", trades)
    with pytest.raises(BadExchangeData):
        client.fills(BTC, SERVER_NOW - 3_600_000)


def paid_in_bnb(venue: RecordedBinance, *, bnb_market: bool = True) -> None:
    """The account pays fees in BNB (Binance's fee discount): the second trade's fee."""
    trades = body("user_trades")
    trades[1] = {**trades[1], "commission": "0.00035000", "commissionAsset": "BNB"}
    venue.then("GET", "/fapi/v1/userTrades", trades)
    if bnb_market:
        info = body("exchange_info")
        eth = info["symbols"][1]
        info["symbols"].append({**eth, "symbol": "BNBUSDT", "pair": "BNBUSDT",
                                "baseAsset": "BNB"})
        venue.then("GET", "/fapi/v1/exchangeInfo", info)
        venue.then("GET", "/fapi/v1/ticker/24hr", {**body("ticker_24hr")[1],
                                                   "symbol": "BNBUSDT", "lastPrice": "612.50"})


def test_a_fee_paid_in_bnb_is_valued_in_the_settlement_currency():
    client, venue, _ = make()
    paid_in_bnb(venue)
    usdt, bnb = client.fills(BTC, SERVER_NOW - 3_600_000)
    assert (usdt.fee, usdt.fee_currency, usdt.fee_paid) == (Decimal("0.33716655"), "USDT", None)
    assert (bnb.fee, bnb.fee_currency) == (Decimal("0.00035") * Decimal("612.5"), "USDT")
    assert bnb.fee_paid == (Decimal("0.00035"), "BNB", Decimal("612.5"))
    assert venue.requests_to("GET", "/fapi/v1/ticker/24hr")[0]["symbol"] == "BNBUSDT"
    assert fill_data(bnb)["fee_paid"] == {"amount": Decimal("0.00035"), "currency": "BNB",
                                          "price": Decimal("612.5")}


def test_a_fee_in_a_currency_that_cannot_be_valued_makes_the_fills_unusable():
    client, venue, _ = make()
    paid_in_bnb(venue, bnb_market=False)
    with pytest.raises(BadExchangeData, match="fee paid in BNB"):
        client.fills(BTC, SERVER_NOW - 3_600_000)


# ---- submission --------------------------------------------------------------------------

def test_market_order_carries_client_id_and_precision():
    client, venue, _ = make()
    result = client.submit(entry("0.0129"), ref_price=Decimal("96500"))
    assert result.status == "accepted"
    sent = venue.requests_to("POST", "/fapi/v1/order")[0]
    assert sent["newClientOrderId"] == ENTRY_CID
    assert (sent["type"], sent["side"], sent["quantity"]) == ("MARKET", "BUY", "0.012")
    assert "reduceOnly" not in sent
    assert result.request.amount == Decimal("0.012")  # what was actually sent
    order = result.order
    assert (order.client_order_id, order.exchange_order_id) == (ENTRY_CID, "812345678901")
    assert (order.status, order.filled, order.average_price) == (
        "closed", Decimal("0.012"), Decimal("96333.3"))


def test_stop_loss_goes_to_the_algo_route():
    client, venue, _ = make()
    result = client.submit(stop("94406.63"))
    assert result.status == "accepted"
    assert not venue.requests_to("POST", "/fapi/v1/order")
    sent = venue.requests_to("POST", "/fapi/v1/algoOrder")[0]
    assert sent["clientAlgoId"] == STOP_CID
    assert sent["triggerPrice"] == "94406.6"  # price precision: tick 0.1
    assert sent["reduceOnly"] == "true"
    assert (sent["type"], sent["algoType"], sent["side"]) == ("STOP_MARKET", "CONDITIONAL", "SELL")
    assert sent["quantity"] == "0.012"
    assert result.order.is_trigger and result.order.status == "open"
    assert result.request.trigger_price == Decimal("94406.6")


def test_stop_fetch_and_cancel_use_the_trigger_flag():
    client, venue, _ = make()
    found = client.order_by_client_id(BTC, STOP_CID, trigger=True)
    assert found.is_trigger and found.status == "open"
    assert venue.requests_to("GET", "/fapi/v1/algoOrder")[0]["clientAlgoId"] == STOP_CID
    venue.then("GET", "/fapi/v1/algoOrder", "algo_order_canceled")
    cancelled = client.cancel(BTC, client_order_id=STOP_CID, trigger=True)
    assert venue.requests_to("DELETE", "/fapi/v1/algoOrder")[0]["clientAlgoId"] == STOP_CID
    assert cancelled.status == "canceled" and cancelled.is_trigger


def triggered_stop(status: str, actual: str = "812345678950", price: str = "94390.00") -> dict:
    """The algo order as Binance's Query Algo Order documents it once the stop triggered:
    the order it became (actualOrderId) and its average price, never the executed quantity."""
    return {**body("algo_order_query"), "algoStatus": status, "actualOrderId": actual,
            "actualPrice": price, "triggerTime": 1768471500123, "updateTime": 1768471500130}


def stop_execution(status: str = "FILLED", executed: str = "0.012",
                   stop_price: str = "0.00") -> dict:
    """The market order a stop became, as GET /fapi/v1/order answers it (its own client id;
    whether it carries the stop's trigger price is not documented)."""
    return {**body("order_query_filled"), "orderId": 812345678950, "side": "SELL",
            "stopPrice": stop_price,
            "clientOrderId": "autoStop-x7Qe2", "status": status, "executedQty": executed,
            "cumQuote": "1132.68000" if executed != "0" else "0", "avgPrice":
            "94390.00" if executed != "0" else "0.00", "origType": "STOP_MARKET",
            "reduceOnly": True, "time": 1768471500125, "updateTime": 1768471500125}


@pytest.mark.parametrize("stop_price", ["0.00", "94406.6"])
def test_a_finished_stop_is_read_as_the_order_it_became(stop_price):
    client, venue, _ = make()
    venue.then("GET", "/fapi/v1/algoOrder", triggered_stop("FINISHED"))
    venue.then("GET", "/fapi/v1/order", stop_execution(stop_price=stop_price))
    found = client.order_by_client_id(BTC, STOP_CID, trigger=True)
    assert venue.requests_to("GET", "/fapi/v1/order")[0]["orderId"] == "812345678950"
    assert (found.client_order_id, found.triggered_order_id) == (STOP_CID, "812345678950")
    assert (found.status, found.filled, found.average_price) == (
        "closed", Decimal("0.012"), Decimal("94390"))
    assert state_of(found.status, found.amount, found.filled) == "filled"


def test_a_stop_that_expired_after_becoming_an_order_is_read_as_that_order():
    # EXPIRED, yet it names the order it became: what filled is that order's (ccxt reads
    # the algo answer as expired with nothing filled).
    client, venue, _ = make()
    venue.then("GET", "/fapi/v1/algoOrder", triggered_stop("EXPIRED"))
    venue.then("GET", "/fapi/v1/order", stop_execution("EXPIRED", "0.005"))
    found = client.order_by_client_id(BTC, STOP_CID, trigger=True)
    assert venue.requests_to("GET", "/fapi/v1/order")[0]["orderId"] == "812345678950"
    assert (found.filled, found.average_price) == (Decimal("0.005"), Decimal("94390"))


def test_a_finished_stop_whose_order_filled_nothing_expired():
    client, venue, _ = make()
    venue.then("GET", "/fapi/v1/algoOrder", triggered_stop("FINISHED", price="0.00000"))
    venue.then("GET", "/fapi/v1/order", stop_execution("EXPIRED", "0"))
    found = client.order_by_client_id(BTC, STOP_CID, trigger=True)
    assert state_of(found.status, found.amount, found.filled) == "expired"


@pytest.mark.parametrize("status,actual,order", [
    ("TRIGGERING", "", None),  # being passed to the matching engine (ccxt: open)
    ("TRIGGERED", "", None),  # passed to the matching engine, its order not named yet
    ("FINISHED", "", None),  # done, but the answer does not say as what
    ("TRIGGERED", "812345678950", "unknown_order"),  # its order not visible yet
    ("TRIGGERED", "812345678950", stop_execution("NEW", "0")),
])
def test_a_stop_that_fired_with_its_outcome_unknown_reads_triggered(status, actual, order):
    client, venue, _ = make(http=True)
    venue.then("GET", "/fapi/v1/algoOrder", triggered_stop(status, actual))
    if order is not None:
        venue.then("GET", "/fapi/v1/order", err(order) if order == "unknown_order" else order)
    found = client.order_by_client_id(BTC, STOP_CID, trigger=True)
    assert found.status == "triggered" and found.filled == 0  # neither resting nor done
    assert state_of(found.status, found.amount, found.filled) == "accepted"


def test_a_stop_that_triggered_while_being_cancelled_reports_its_execution():
    client, venue, _ = make(http=True)
    venue.then("DELETE", "/fapi/v1/algoOrder", err("unknown_order"))
    venue.then("GET", "/fapi/v1/algoOrder", triggered_stop("FINISHED"))
    venue.then("GET", "/fapi/v1/order", stop_execution())
    report = client.cancel(BTC, client_order_id=STOP_CID, trigger=True)
    assert (report.status, report.filled, report.triggered_order_id) == (
        "closed", Decimal("0.012"), "812345678950")


def test_below_minimums_rejected_locally_never_sent():
    client, venue, _ = make()
    small = client.submit(entry("0.005", symbol=ETH), ref_price=Decimal("3307.45"))
    assert small.status == "rejected" and "notional" in small.reason
    dust = client.submit(entry("0.0004"), ref_price=Decimal("96500"))
    assert dust.status == "rejected" and "rounds to zero" in dust.reason
    bad_id = client.submit(entry(cid="bot1 has spaces"), ref_price=Decimal("96500"))
    assert bad_id.status == "rejected" and "client order id" in bad_id.reason
    long_id = client.submit(entry(cid="x" * 37), ref_price=Decimal("96500"))
    assert long_id.status == "rejected"
    assert not venue.requests_to("POST", "/fapi/v1/order")


def test_above_the_maximum_an_entry_is_refused_and_a_close_sends_the_most_it_may():
    client, venue, _ = make()
    big = client.submit(entry("150"), ref_price=Decimal("96500"))  # -4005 on Binance
    assert big.status == "rejected" and "above the maximum 120" in big.reason
    assert not venue.requests_to("POST", "/fapi/v1/order")
    close = OrderRequest(symbol=BTC, side="sell", amount=Decimal("150"),
                         client_order_id="bot1-x-1", reduce_only=True)
    sent = client.submit(close)
    assert sent.status == "accepted" and sent.request.amount == Decimal("120")
    [posted] = venue.requests_to("POST", "/fapi/v1/order")
    assert Decimal(posted["quantity"]) == Decimal("120")  # the rest: a partial exit
    # A stop is never sent for less than its position (the ledger would call it covered).
    cover = client.submit(stop(amount="150"))
    assert cover.status == "rejected" and "above the maximum 120" in cover.reason
    assert not venue.requests_to("POST", "/fapi/v1/algoOrder")


def test_small_reduce_only_close_is_sent():
    client, venue, _ = make()
    close = OrderRequest(symbol=BTC, side="sell", amount=Decimal("0.001"),
                         client_order_id="bot1-x-1", reduce_only=True)
    assert client.submit(close).status == "accepted"
    assert venue.requests_to("POST", "/fapi/v1/order")[0]["reduceOnly"] == "true"


def test_market_order_without_ref_price_uses_the_ticker():
    client, venue, _ = make()
    assert client.submit(entry("0.001")).status == "rejected"  # 96.5 USDT at the last price
    assert venue.requests_to("GET", "/fapi/v1/ticker/24hr")
    assert not venue.requests_to("POST", "/fapi/v1/order")


@pytest.mark.parametrize("error, words", [
    ("insufficient_margin", "Margin is insufficient"),
    ("notional_too_small", "-4164"),
    ("invalid_api_key", "-2015"),
])
def test_refusals_are_rejected_without_lookup(error, words):
    client, venue, _ = make(http=True)
    venue.then("POST", "/fapi/v1/order", err(error))
    result = client.submit(entry(), ref_price=Decimal("96500"))
    assert result.status == "rejected" and words in result.reason
    assert len(venue.requests_to("POST", "/fapi/v1/order")) == 1
    assert not venue.requests_to("GET", "/fapi/v1/order")


@pytest.mark.parametrize("error", ["rate_limited", "ip_banned"])
def test_rate_limited_submission_was_not_processed(error):
    client, venue, _ = make(http=True)
    venue.then("POST", "/fapi/v1/order", err(error))
    result = client.submit(entry(), ref_price=Decimal("96500"))
    assert result.status == "rejected" and "not processed" in result.reason
    assert "DDoSProtection" in result.reason
    assert len(venue.requests_to("POST", "/fapi/v1/order")) == 1  # never re-sent
    assert not venue.requests_to("GET", "/fapi/v1/order")


def test_timestamp_error_rejected_and_clock_resynced():
    client, venue, _ = make(http=True)
    client.load_markets()
    syncs = len(venue.requests_to("GET", "/fapi/v1/time"))
    venue.then("POST", "/fapi/v1/order", err("timestamp_outside_window"))
    result = client.submit(entry(), ref_price=Decimal("96500"))
    assert result.status == "rejected" and "InvalidNonce" in result.reason
    assert len(venue.requests_to("GET", "/fapi/v1/time")) == syncs + 1
    assert len(venue.requests_to("POST", "/fapi/v1/order")) == 1


def test_execution_unknown_then_found_by_client_id():
    client, venue, _ = make(http=True)
    venue.then("POST", "/fapi/v1/order", err("execution_unknown"))
    result = client.submit(entry(), ref_price=Decimal("96500"))
    assert result.status == "accepted"
    assert result.order.filled == Decimal("0.012")
    assert "RequestTimeout" in result.errors[0]  # ccxt maps -1007 to RequestTimeout
    assert venue.requests_to("GET", "/fapi/v1/order")[0]["origClientOrderId"] == ENTRY_CID
    assert len(venue.requests_to("POST", "/fapi/v1/order")) == 1


def test_read_timeout_and_not_found_is_unknown():
    client, venue, sleeps = make(http=True)
    venue.then("POST", "/fapi/v1/order", requests.exceptions.ReadTimeout("Read timed out."))
    venue.then("GET", "/fapi/v1/order", *[err("unknown_order")] * 3)
    result = client.submit(entry(), ref_price=Decimal("96500"))
    assert result.status == "unknown"
    assert result.errors[0].startswith("RequestTimeout")
    assert result.errors[1:] == ["lookup: not found"] * 3
    assert len(venue.requests_to("GET", "/fapi/v1/order")) == 3
    assert len(sleeps) == 2  # between lookups, through the injected sleep
    assert len(venue.requests_to("POST", "/fapi/v1/order")) == 1


def test_stop_after_503_is_looked_up_on_the_algo_route():
    client, venue, _ = make(http=True)
    venue.then("POST", "/fapi/v1/algoOrder", err("service_unavailable"))
    result = client.submit(stop())
    assert result.status == "accepted" and result.order.is_trigger
    assert "ExchangeNotAvailable" in result.errors[0]
    assert venue.requests_to("GET", "/fapi/v1/algoOrder")[0]["clientAlgoId"] == STOP_CID
    assert not venue.requests_to("GET", "/fapi/v1/order")


@pytest.mark.parametrize("path, req", [("/fapi/v1/order", entry), ("/fapi/v1/algoOrder", stop)])
def test_a_503_unknown_error_is_ambiguous_whatever_code_its_body_carries(path, req):
    # Binance: 503 "Unknown error, please check your request or try again later." = sent,
    # execution status unknown. With a body code ccxt reads as a rate limit (-1003), it
    # used to be "not processed": an entry that filled would have gone untracked.
    client, venue, _ = make(http=True)
    venue.then("POST", path, err("unknown_error_503"))
    result = client.submit(req(), ref_price=Decimal("96500"))
    assert venue.requests_to("GET", path)  # looked up by client id, not given up
    assert result.status == "accepted"


def test_a_slow_clock_reading_never_makes_a_forming_candle_closed():
    # The first /time request times out after 10 s, the retry answers at once: measured
    # from before the request, Binance's clock would read 10 s ahead for a minute.
    close = T_1000 + 300_000  # the 10:00 candle closes at 10:05:00
    client, venue, _ = make(http=True, clock_ms=close - 15_000)  # our clock = Binance's
    client.load_markets()
    real, attempts = venue.request, []

    def request(method, url, data=None, headers=None, **kw):
        if "/fapi/v1/time" in url:
            attempts.append(url)
            if len(attempts) == 1:
                client.clock.advance(10_000)
                raise requests.exceptions.ReadTimeout("Read timed out.")
            venue.then("GET", "/fapi/v1/time", {"serverTime": client.clock.now_ms()})
        return real(method, url, data, headers, **kw)

    client.raw.session.request = request
    assert client.server_now_ms() <= client.clock.now_ms()  # late if anything, never early
    assert len(attempts) == 2
    assert client.closed_candles(BTC, "5m", 5)[-1].ts < T_1000  # 10:00 is still forming


def test_server_overloaded_is_ambiguous():
    client, venue, _ = make(http=True)
    venue.then("POST", "/fapi/v1/order", err("server_overloaded"))
    venue.then("GET", "/fapi/v1/order", *[err("unknown_order")] * 3)
    result = client.submit(entry(), ref_price=Decimal("96500"))
    assert result.status == "unknown" and "OperationFailed" in result.errors[0]


def test_duplicate_client_id_finds_the_first_order():
    client, venue, _ = make(http=True)
    venue.then("POST", "/fapi/v1/order", err("duplicate_client_id"))
    result = client.submit(entry(), ref_price=Decimal("96500"))
    assert result.status == "accepted" and result.order.client_order_id == ENTRY_CID


def test_answer_missing_fields_is_looked_up(caplog):
    client, venue, _ = make()
    venue.then("POST", "/fapi/v1/order", {"orderId": 812345678901, "symbol": "BTCUSDT"})
    result = client.submit(entry(), ref_price=Decimal("96500"))
    assert result.status == "accepted" and result.order.status == "closed"
    assert "unusable answer" in caplog.text
    assert venue.requests_to("GET", "/fapi/v1/order")


def test_answer_missing_fields_and_lookup_fails_is_unknown():
    client, venue, _ = make(http=True)
    venue.then("POST", "/fapi/v1/order", {"orderId": 812345678901, "symbol": "BTCUSDT"})
    venue.then("GET", "/fapi/v1/order", *[err("unknown_order")] * 3)
    assert client.submit(entry(), ref_price=Decimal("96500")).status == "unknown"


def test_resolve_unknown_later():
    client, venue, _ = make(http=True)
    sent_at = client.clock.now_ms()
    assert client.resolve_unknown(entry(), sent_at).status == "accepted"
    venue.then("GET", "/fapi/v1/order", err("unknown_order"), err("unknown_order"))
    assert client.resolve_unknown(entry(), sent_at).status == "unknown"  # too early to say
    client.clock.advance(NOT_FOUND_FINAL_MS)
    late = client.resolve_unknown(entry(), sent_at)
    assert late.status == "rejected" and "never placed" in late.reason
    venue.then("GET", "/fapi/v1/algoOrder", err("unknown_order"))
    assert client.resolve_unknown(stop(), sent_at).status == "unknown"  # stops: never concluded


def test_lookup_and_cancel_of_unknown_orders():
    client, venue, _ = make(http=True)
    venue.then("GET", "/fapi/v1/order", err("unknown_order"))
    assert client.order_by_client_id(BTC, "bot1-nothing") is None
    venue.then("DELETE", "/fapi/v1/order", err("unknown_order_cancel"))
    venue.then("GET", "/fapi/v1/order", err("unknown_order"))
    assert client.cancel(BTC, client_order_id="bot1-nothing") is None
    assert venue.requests_to("DELETE", "/fapi/v1/order")[0]["origClientOrderId"] == "bot1-nothing"


# ---- retries -----------------------------------------------------------------------------

def test_reads_retry_with_backoff_and_jitter(caplog):
    client, venue, sleeps = make(http=True)
    venue.then("GET", "/fapi/v1/klines", err("service_unavailable"), err("execution_unknown"),
               requests.exceptions.ConnectionError("Connection aborted."))
    assert len(client.closed_candles(BTC, "5m", 5)) == 5
    assert len(sleeps) == 3
    base = 0.25
    for attempt, delay in enumerate(sleeps):
        assert 0.5 * base * 2 ** attempt <= delay <= 1.5 * base * 2 ** attempt
    assert caplog.text.count("retry") == 3


def test_reads_give_up_after_the_configured_retries():
    client, venue, sleeps = make(http=True, read_retries=2)
    client.load_markets()
    venue.then("GET", "/fapi/v3/account", *[err("service_unavailable")] * 3)
    with pytest.raises(ccxt.ExchangeNotAvailable):
        client.balance()
    assert len(venue.requests_to("GET", "/fapi/v3/account")) == 3 and len(sleeps) == 2


def test_rate_limited_reads_back_off_longer():
    client, venue, sleeps = make(http=True)
    client.load_markets()
    venue.then("GET", "/fapi/v3/positionRisk", err("rate_limited"))
    assert len(client.positions()) == 2
    assert sleeps[0] >= 0.5 * 0.25 * 4


def test_rate_limited_reads_wait_as_long_as_binance_asks():
    client, venue, sleeps = make(http=True)
    client.load_markets()
    venue.then("GET", "/fapi/v3/positionRisk", err("rate_limited_retry_after"))
    assert len(client.positions()) == 2
    assert sleeps == [7.0]  # Retry-After: 7


def test_an_ip_ban_is_not_retried():
    # Binance escalates a ban (2 min up to 3 days) for clients that keep calling.
    client, venue, sleeps = make(http=True)
    client.load_markets()
    venue.then("GET", "/fapi/v3/positionRisk", err("ip_banned"), "position_risk_v3")
    with pytest.raises(ccxt.DDoSProtection):
        client.positions()
    assert len(venue.requests_to("GET", "/fapi/v3/positionRisk")) == 1 and sleeps == []


@pytest.mark.parametrize(("reply", "ban_s"), [
    ("ip_banned_retry_after", 30),  # Retry-After: 30
    ("ip_banned", 600),  # "banned until 1768471950000": 600 s after SERVER_NOW
])
def test_no_call_goes_out_while_the_ip_is_banned(reply, ban_s):
    """Each scan called again during a ban (every 10 s), which lengthens it."""
    client, venue, sleeps = make(http=True)
    client.load_markets()
    venue.then("GET", "/fapi/v3/positionRisk", err(reply))
    with pytest.raises(ccxt.DDoSProtection):
        client.positions()
    sent = len(venue.sent)
    clock = client.clock
    clock.advance(ban_s * 1000 - 1)
    with pytest.raises(IpBanned, match="banned by the exchange until"):
        client.positions()
    with pytest.raises(IpBanned):
        client.closed_candles(BTC, "5m", 10)
    result = client.submit(entry(), ref_price=Decimal("96500"))
    assert result.status == "rejected" and "not processed" in result.reason
    assert len(venue.sent) == sent and sleeps == []  # nothing sent, nothing waited
    clock.advance(1)
    assert len(client.positions()) == 2  # the ban is over


def test_a_call_queued_behind_the_418_does_not_go_out():
    """The ban was checked before the client's lock: a call waiting for it went out."""
    client, venue, _ = make(http=True)
    client.load_markets()
    inside, answered = threading.Event(), venue.request

    def slow_418(method, url, data=None, headers=None, **kw):
        if "/fapi/v3/positionRisk" in url:
            inside.set()
            time.sleep(0.3)  # the 418 is on its way back; the other call queues meanwhile
        return answered(method, url, data, headers, **kw)

    client.raw.session.request = slow_418
    venue.then("GET", "/fapi/v3/positionRisk", err("ip_banned"))
    failures: list[BaseException] = []

    def banned_call():
        try:
            client.positions()
        except ccxt.DDoSProtection as exc:
            failures.append(exc)

    first = threading.Thread(target=banned_call)
    first.start()
    assert inside.wait(10)
    with pytest.raises(IpBanned):
        client.balance()  # queued behind the 418
    first.join(10)
    assert len(failures) == 1 and not venue.requests_to("GET", "/fapi/v3/account")


def test_a_ban_named_by_the_exchanges_clock_ends_by_it():
    """Its message's end is the exchange's time: our clock 5 s ahead resumed 5 s early."""
    client, venue, _ = make(http=True, clock_ms=SERVER_NOW + 5_000)
    client.load_markets()
    client.server_now_ms()  # measures the offset: ours is 5 s ahead
    venue.then("GET", "/fapi/v3/positionRisk", err("ip_banned"))  # until 1768471950000
    with pytest.raises(ccxt.DDoSProtection):
        client.positions()
    client.clock.set(1768471950000 + 5_000 - 1)
    with pytest.raises(IpBanned):
        client.positions()
    client.clock.advance(1)
    assert len(client.positions()) == 2


@pytest.mark.parametrize("retry_after", [None, "315360000", "inf", "1e400", "1e306"])
def test_no_ban_is_held_longer_than_binances_longest(monkeypatch, retry_after):
    """A ban's end was believed as given: a wrong clock (ours 10 days behind here) or a
    proxy's odd Retry-After (10 years) held every call, stops included, for as long as it
    said; an infinite one failed to parse, so no ban was held and calls went on into it."""
    start = SERVER_NOW - 10 * 86_400_000
    client, venue, _ = make(http=True, clock_ms=start)
    client.load_markets()
    reply = "ip_banned"  # "banned until 1768471950000", by a clock 10 days ahead of ours
    if retry_after is not None:
        reply = "ip_banned_odd_retry_after"
        monkeypatch.setitem(ERRORS, reply, {**ERRORS["ip_banned"],
                                            "headers": {"Retry-After": retry_after}})
    venue.then("GET", "/fapi/v3/positionRisk", err(reply))
    with pytest.raises(ccxt.DDoSProtection):
        client.positions()
    assert client.ban.until_ms == start + 3 * 86_400_000  # not 10 days on
    client.clock.set(start + 3 * 86_400_000)
    assert len(client.positions()) == 2


def test_a_ban_answered_to_one_client_holds_every_client_of_the_runtime(tmp_path):
    config = Config(secrets=Secrets(api_key=KEY, api_secret=SECRET))
    raws, venues = [], []
    for _ in range(3):
        raw = build_ccxt(config)
        raw.enableRateLimit = False
        venue = RecordedBinance()
        raw.session.request = venue.request
        raws.append(raw)
        venues.append(venue)
    rt = runtime.build(config, tmp_path / "bot.db", clock=VirtualClock(SERVER_NOW),
                       venue=raws[0], data_venues=raws[1:])
    try:
        data = rt.data_clients[-1]
        data.load_markets()
        venues[-1].then("GET", "/fapi/v1/klines", err("ip_banned"))
        with pytest.raises(ccxt.DDoSProtection):
            data.closed_candles(BTC, "5m", 10)
        before = [len(v.sent) for v in venues]
        with pytest.raises(IpBanned):
            rt.client.balance()
        with pytest.raises(IpBanned):
            rt.data_clients[1].server_now_ms()
        assert [len(v.sent) for v in venues] == before
    finally:
        rt.close()


def test_a_ban_is_remembered_across_a_restart(tmp_path):
    """The ban was kept in memory only: a bot restarted during it (systemd, a human) called
    at once, and each call into a ban lengthens it (Binance: from 2 minutes up to 3 days)."""
    config = Config(secrets=Secrets(api_key=KEY, api_secret=SECRET))
    clock = VirtualClock(SERVER_NOW)

    def start() -> tuple:
        raw = build_ccxt(config)
        raw.enableRateLimit = False
        venue = RecordedBinance()
        raw.session.request = venue.request
        return runtime.build(config, tmp_path / "bot.db", clock=clock, venue=raw), venue

    rt, venue = start()
    try:
        rt.client.load_markets()
        rt.client.server_now_ms()
        venue.then("GET", "/fapi/v3/positionRisk", err("ip_banned_retry_after"))  # 30 s
        with pytest.raises(ccxt.DDoSProtection):
            rt.client.positions()
        with pytest.raises(IpBanned):
            rt.client.balance()  # held, not answered again: recorded once
        [ban] = rt.ledger.select("SELECT ts, reason, data FROM facts WHERE type = 'ip_ban'")
        assert json.loads(ban["data"]) == {"until_ms": SERVER_NOW + 30_000}
    finally:
        rt.close()
    clock.advance(10_000)
    rt, venue = start()  # restarted 10 s into the ban
    try:
        assert rt.ledger.state().ip_ban_until_ms == SERVER_NOW + 30_000
        for call in (rt.client.load_markets, rt.client.balance, rt.client.positions):
            with pytest.raises(IpBanned, match="banned by the exchange until"):
                call()
        assert venue.sent == []
        clock.advance(20_000)  # over
        rt.client.load_markets()
        assert len(rt.client.positions()) == 2
        assert len(rt.ledger.select("SELECT seq FROM facts WHERE type = 'ip_ban'")) == 1
    finally:
        rt.close()


def test_read_timestamp_error_resyncs_then_retries():
    client, venue, _ = make(http=True)
    client.load_markets()
    syncs = len(venue.requests_to("GET", "/fapi/v1/time"))
    venue.then("GET", "/fapi/v3/account", err("timestamp_outside_window"))
    assert client.balance().currency == "USDT"
    assert len(venue.requests_to("GET", "/fapi/v1/time")) == syncs + 1


# ---- symbol settings and the lock --------------------------------------------------------

def test_symbol_settings_once_and_idempotent():
    client, venue, _ = make(http=True)
    client.ensure_symbol_settings(BTC)
    client.ensure_symbol_settings(BTC)
    margin = venue.requests_to("POST", "/fapi/v1/marginType")
    assert [(m["symbol"], m["marginType"]) for m in margin] == [("BTCUSDT", "CROSSED")]
    assert [p["leverage"] for p in venue.requests_to("POST", "/fapi/v1/leverage")] == ["3"]
    venue.then("POST", "/fapi/v1/marginType", err("margin_type_unchanged"))
    client.ensure_symbol_settings(ETH)  # -4046 "No need to change margin type" is success
    assert len(venue.requests_to("POST", "/fapi/v1/leverage")) == 2


def test_symbol_settings_failure_is_retried_next_time():
    client, venue, _ = make(http=True)
    venue.then("POST", "/fapi/v1/marginType", err("margin_type_with_position"))
    with pytest.raises(ccxt.ExchangeError):
        client.ensure_symbol_settings(BTC)
    client.ensure_symbol_settings(BTC)
    assert len(venue.requests_to("POST", "/fapi/v1/marginType")) == 2


def test_one_call_at_a_time_on_the_ccxt_instance():
    client, venue, _ = make()
    client.load_markets()
    inside = {"now": 0, "most": 0}
    guard = threading.Lock()
    served = venue.fetch

    def slow_fetch(*args, **kwargs):
        with guard:
            inside["now"] += 1
            inside["most"] = max(inside["most"], inside["now"])
        time.sleep(0.002)  # widen the window a race would need
        try:
            return served(*args, **kwargs)
        finally:
            with guard:
                inside["now"] -= 1

    client.raw.fetch = slow_fetch
    workers = [threading.Thread(target=lambda: [client.positions() for _ in range(5)])
               for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert inside["most"] == 1


def test_a_failed_signed_read_never_carries_its_signature(tmp_path, caplog):
    # ccxt's message for a signed GET that timed out is its whole URL, signature and all;
    # the job's record (kept for good in the ledger) and its log lines must not keep it.
    from types import SimpleNamespace

    from jobs.runner import run_job
    from ledger import Ledger

    client, venue, _ = make(http=True, read_retries=0)
    answer = venue.request

    def refused(method, url, data=None, headers=None, **kwargs):
        if "/fapi/v3/account" not in url:
            return answer(method, url, data, headers, **kwargs)
        venue._reply(method, url, data)  # noted as sent; then a real refused connection,
        parts = urlsplit(url)  # whose requests/urllib3 messages (chained) hold the URL
        return requests.Session().request(
            method, url.replace(f"{parts.scheme}://{parts.netloc}", "http://127.0.0.1:9"),
            data=data, headers=headers, timeout=5)

    client.raw.session.request = refused
    with Ledger(tmp_path / "bot.db") as ledger, caplog.at_level(logging.DEBUG):
        rt = SimpleNamespace(clock=client.clock, ledger=ledger, config=client.config)
        record = run_job(rt, "reconcile", lambda rt, scheduled, run_id: client.balance())
        [reason] = [r["reason"] for r in ledger.select("SELECT reason FROM facts")]
    signature = venue.requests_to("GET", "/fapi/v3/account")[-1]["signature"]
    assert record["outcome"] == "error" and reason.startswith("NetworkError: ")
    assert "/fapi/v3/account" in reason and "signature=..." in reason
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "signature=..." in logged
    assert signature not in reason and signature not in logged


@pytest.mark.parametrize("signed", ["signature=5f2e9a0c41d7b3e8", "signature=kX9%2Bq%2F7w%3D%3D",
                                    "signature=kX9+q/7w=="])
def test_signatures_of_every_key_kind_are_masked(signed):
    # HMAC keys sign in hex, RSA and Ed25519 keys in (URL-encoded) base64.
    from core.exchange import mask_signature

    exc = ccxt.RequestTimeout(f"binanceusdm GET https://x/fapi/v3/account?ts=1&{signed}&z=2")
    mask_signature(exc)
    assert str(exc) == "binanceusdm GET https://x/fapi/v3/account?ts=1&signature=...&z=2"
    assert isinstance(exc, ccxt.RequestTimeout)
