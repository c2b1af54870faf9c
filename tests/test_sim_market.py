"""The three market data sources of the simulated exchange: synthetic, CSV, live (paper)."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlparse

import ccxt
import numpy as np
import pandas as pd
import pytest
from sim_fixtures import DAY, SHARED_OHLCV, T0, TF, make_sim, synthetic

from core import config as cfg
from core.clock import VirtualClock
from core.sim_exchange import SimExchange
from core.sim_market import CsvMarket, LiveMarket, SyntheticMarket, price_decimals

# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_lazy():
    a, b, c = synthetic(5, seed=1), synthetic(5, seed=1), synthetic(5, seed=2)
    s = a.symbols[3]
    short = b.candles(s, T0 - DAY, T0).c.copy()  # b generates only a little, a a lot
    long = a.candles(s, T0 - DAY, T0 + 30 * DAY)
    assert np.array_equal(long.c[: len(short)], short)
    grown = b.candles(s, T0 - DAY, T0 + 30 * DAY)  # b grows its arrays afterwards
    assert np.array_equal(grown.c, long.c) and np.array_equal(grown.v, long.v)
    assert not np.array_equal(c.candles(s, T0 - DAY, T0).c, short)
    assert a.candles(s, T0 - 3 * DAY - TF, T0 - 3 * DAY).ts.size == 0  # nothing before origin


def test_synthetic_candles_look_like_a_real_market():
    m = synthetic(8)
    for s in m.symbols:
        c = m.candles(s, T0 - 3 * DAY, T0 + 20 * DAY)
        tick = m.ticks[s]
        assert np.all(np.abs(c.c / tick - np.round(c.c / tick)) < 1e-6)  # on the tick grid
        assert np.all(c.h >= np.maximum(c.o, c.c)) and np.all(c.low <= np.minimum(c.o, c.c))
        assert np.all(c.low > 0) and np.all(c.v > 0)
        assert np.all(np.diff(c.ts) == TF)
        r = np.diff(np.log(c.c))
        kurtosis = ((r - r.mean()) ** 4).mean() / r.var() ** 2
        assert kurtosis > 4  # fat tails
        assert (c.v / pd.Series(c.v).rolling(20).mean().shift(1)).max() > 4  # volume bursts
        assert 1e-6 <= tick / c.c[-1] <= 1e-3  # a realistic tick for the price level
    prices = [m.params[i].price for i in range(8)]
    assert max(prices) / min(prices) > 100  # a spread of price levels


def momentum_entries(c) -> int:
    """The default momentum rule, computed independently with pandas."""
    df = pd.DataFrame({"o": c.o, "h": c.h, "l": c.low, "c": c.c, "v": c.v})
    body = (df.c - df.o).abs() / df.o * 100
    ratio = df.v / df.v.shift(1).rolling(20).mean()
    prev = df.c.shift(1)
    tr = pd.concat([df.h - df.l, (df.h - prev).abs(), (df.l - prev).abs()], axis=1).max(axis=1)
    rng = df.h.rolling(14).max() - df.l.rolling(14).min()
    chop = 100 * np.log10(tr.rolling(14).sum() / rng) / np.log10(14)
    long = (df.c > df.o) & (body >= 0.7) & (ratio >= 1.8) & (chop < 50)
    short = (df.c < df.o) & (body >= 0.7) & (ratio >= 1.5) & (chop < 50)
    trending = ((chop < 50).mean() > 0.1) and ((chop >= 50).mean() > 0.3)
    assert trending  # both regimes show up
    return int(long.sum() + short.sum())


def test_default_synthetic_market_gives_momentum_entries_several_times_a_day():
    config = cfg.load()
    m = SyntheticMarket(config.sim.seed, config.sim.symbols, config.strategy.timeframe, T0)
    days = 10
    per_day = sum(momentum_entries(m.candles(s, T0, T0 + days * DAY)) for s in m.symbols) / days
    assert 5 <= per_day <= 150


def test_synthetic_exchange_from_config_starts_history_before_the_clock():
    ex = SimExchange.from_config(cfg.load(), VirtualClock(T0 + 1234))
    assert len(ex.symbols) == cfg.load().sim.symbols
    rows = ex.fetch_ohlcv(ex.symbols[0], "5m", limit=1000)
    assert len(rows) == 3 * 288 + 1  # three days of history and the forming candle


# ----------------------------------------------------------------------------- CSV
needs_shared = pytest.mark.skipif(not SHARED_OHLCV.is_dir(),
                                  reason="../shared/data/ohlcv (real Binance candles) is absent")


@needs_shared
def test_csv_folder_replays_the_real_candles_as_linear_perpetuals():
    m = CsvMarket(SHARED_OHLCV, "5m", "USDT")
    assert len(m.symbols) == 10 and "ETH/USDT:USDT" in m.symbols
    raw = pd.read_csv(SHARED_OHLCV / "ADA_BTC-5m.csv")
    start = int(raw.timestamp.iloc[0])
    clock = VirtualClock(start + 2 * DAY + TF // 2)
    ex = SimExchange(m, clock)
    market = ex.market("ADA/USDT:USDT")
    assert (market["info"]["sourceQuote"], market["settle"], market["precision"]["price"]) == \
        ("BTC", "USDT", 1e-8)
    rows = ex.fetch_ohlcv("ADA/USDT:USDT", "5m", since=start, limit=1500)
    closed = rows[:-1]
    expected = raw[raw.timestamp < start + 2 * DAY].to_numpy().tolist()
    assert [r[0] for r in closed] == [int(e[0]) for e in expected]  # holes included
    assert [r[1:] for r in closed] == [e[1:] for e in expected]
    every = m.candles("ADA/USDT:USDT", 0, m.end_ms)
    assert len(every) == len(raw) and np.diff(every.ts).max() > TF  # holes stay holes
    assert rows[-1][0] == start + 2 * DAY  # the forming candle
    q = ex.amount_to_precision("ETH/USDT:USDT", 100 / ex.fetch_ticker("ETH/USDT:USDT")["last"])
    o = ex.create_order("ETH/USDT:USDT", "market", "buy", q)
    assert o["status"] == "closed"


def test_csv_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        CsvMarket(tmp_path / "nope")
    (tmp_path / "README.md").write_text("no candles here")
    with pytest.raises(ValueError, match="no BASE_QUOTE-5m.csv"):
        CsvMarket(tmp_path)


def test_csv_market_leaves_out_malformed_rows(tmp_path):
    # a high under the low, then volumes the exchange client drops too (negative, none)
    lines = ["timestamp,open,high,low,close,volume", f"{T0},1.0,1.1,0.9,1.0,5",
             f"{T0 + TF},1.0,0.8,0.9,1.0,5", f"{T0 + 2 * TF},1.0,1.2,0.9,1.1,5",
             f"{T0 + 3 * TF},1.1,1.2,1.0,1.1,-150", f"{T0 + 4 * TF},1.1,1.2,1.0,1.1,",
             f"{T0 + 5 * TF},1.1,1.2,1.0,1.1,inf", f"{T0 + 6 * TF},1.1,1.2,1.0,1.1,0"]
    (tmp_path / "X_USDT-5m.csv").write_text("\n".join(lines))
    c = CsvMarket(tmp_path).candles("X/USDT:USDT", 0, T0 + DAY)
    assert c.ts.tolist() == [T0, T0 + 2 * TF, T0 + 6 * TF]


HEADER = "timestamp,open,high,low,close,volume"


def candle_rows(times, price=1.0) -> list[str]:
    return [f"{t},{price},{price * 1.01},{price * 0.99},{price},5" for t in times]


@pytest.mark.parametrize(("times", "message"), [
    # one stray row decades ahead: every day up to it was walked (a year 9999 row ran
    # out of memory), and the header said "decisions ... 2100-01-01"
    ([T0, T0 + TF, 4_102_444_800_000], "the candle at 4102444800000 is in the future"),
    ([0, T0, T0 + TF], "the candle at 0 is before 2009"),
    # seconds or microseconds: silently squeezed into minutes, or spread over millennia
    ([(T0 + i * TF) // 1000 for i in range(3)],
     f"the candle at {T0 // 1000} is before 2009 (seconds? they must be milliseconds)"),
    ([(T0 + i * TF) * 1000 for i in range(3)],
     f"the candle at {T0 * 1000} is in the future (microseconds?"),
    # shifted by a minute, or 1 m candles in a 5 m file: replayed as extra steps
    ([T0 + 60_000 + i * TF for i in range(3)], "3 candles do not open on the 5m grid"),
    ([T0 + i * 60_000 for i in range(10)], "8 candles do not open on the 5m grid"),
])
def test_candle_times_a_recorded_market_cannot_have_are_refused(tmp_path, times, message):
    (tmp_path / "X_USDT-5m.csv").write_text("\n".join([HEADER, *candle_rows(times)]))
    with pytest.raises(ValueError, match=re.escape(f"X_USDT-5m.csv: {message}")):
        CsvMarket(tmp_path)


def test_csv_headers_and_prices_are_read_leniently_and_refused_clearly(tmp_path, caplog):
    times = [T0 + i * TF for i in range(4)]
    rows = candle_rows(times)
    rows[1] = f"{times[1]},abc,1.1,0.9,1.0,5"  # no number: left out like any malformed row
    (tmp_path / "X_USDT-5m.csv").write_text("\n".join([" Timestamp,Open,HIGH,low,close,Volume ",
                                                       *rows]))
    (tmp_path / "z-usdt_5m.csv").write_text("\n".join([HEADER, *rows]))  # misnamed: said
    (tmp_path / "W_USDT-5m.CSV").write_text("\n".join([HEADER, *rows]))  # was skipped unsaid
    m = CsvMarket(tmp_path)
    assert m.symbols == ["X/USDT:USDT"]
    assert m.candles("X/USDT:USDT", 0, T0 + DAY).ts.tolist() == [times[0], *times[2:]]
    said = caplog.text
    assert "1 malformed candles left out" in said
    assert "z-usdt_5m.csv: not named BASE_QUOTE-TF.csv" in said
    assert "W_USDT-5m.CSV: not named BASE_QUOTE-TF.csv" in said
    # a symbol without candles is refused, not left out: a simulated account may hold it
    (tmp_path / "Y_USDT-5m.csv").write_text(HEADER + "\n")
    with pytest.raises(ValueError, match=r"Y_USDT-5m.csv: no candles \(a header and no rows"):
        CsvMarket(tmp_path)
    (tmp_path / "Y_USDT-5m.csv").unlink()
    (tmp_path / "X_USDT-5m.csv").write_text("timestamp,open,high,low,close\n1,1,1,1,1\n")
    with pytest.raises(ValueError, match="X_USDT-5m.csv: no column volume"):
        CsvMarket(tmp_path)
    (tmp_path / "X_USDT-5m.csv").write_text("\n".join([HEADER, *rows, "soon,1,1,1,1,1"]))
    with pytest.raises(ValueError, match="line 6: timestamp 'soon' is not a whole number"):
        CsvMarket(tmp_path)


def test_the_tick_is_the_finest_any_price_of_the_file_was_written_with(tmp_path):
    """It was read from the file's first 5,000 rows: a coin whose price fell to fewer
    whole units later got a tick of 1 % of its price."""
    times = [T0 + i * TF for i in range(6000)]
    rows = [*candle_rows(times[:5500], 12.5), *candle_rows(times[5500:], 0.012345)]
    (tmp_path / "X_USDT-5m.csv").write_text("\n".join([HEADER, *rows]))
    assert CsvMarket(tmp_path).ticks["X/USDT:USDT"] == pytest.approx(1e-8)


def test_a_candle_given_twice_is_kept_once_if_the_rows_agree_and_refused_if_not(tmp_path):
    row = f"{T0 + TF},1.0,1.2,0.9,1.1,5"
    head = ["timestamp,open,high,low,close,volume", f"{T0},1.0,1.1,0.9,1.0,5"]
    (tmp_path / "X_USDT-5m.csv").write_text("\n".join([*head, row, row, f"{T0 - TF},1,1,1,1,1"]))
    c = CsvMarket(tmp_path).candles("X/USDT:USDT", 0, T0 + DAY)
    assert c.ts.tolist() == [T0 - TF, T0, T0 + TF] and c.c.tolist() == [1.0, 1.0, 1.1]
    # Which of two different candles is the real one cannot be told: refused, named.
    for n in range(3):  # whatever the order (an unstable sort once picked either)
        rows = [row, f"{T0 + TF},2.0,2.4,1.8,2.2,10"]
        (tmp_path / "X_USDT-5m.csv").write_text("\n".join([*head, *rows[n % 2:], *rows[:n % 2]]))
        with pytest.raises(ValueError, match=f"X_USDT-5m.csv: the candle at {T0 + TF} is given "
                                             "twice with different values"):
            CsvMarket(tmp_path)


def test_a_file_without_one_valid_candle_is_refused_by_name(tmp_path):
    lines = ["timestamp,open,high,low,close,volume", f"{T0},1.0,0.8,0.9,1.0,5",
             f"{T0 + TF},-1,1,1,1,5"]
    (tmp_path / "X_USDT-5m.csv").write_text("\n".join(lines))
    with pytest.raises(ValueError, match="X_USDT-5m.csv: no valid candles"):
        CsvMarket(tmp_path)


# ----------------------------------------------------------------------------- live (paper)
LIVE_T0 = 1_767_225_600_000  # 2026-01-01 00:00 UTC
MINUTE = 60_000


def _filters(tick: str, step: str, max_qty: str, min_notional: str) -> list[dict]:
    return [{"filterType": "PRICE_FILTER", "minPrice": tick, "maxPrice": "4529764",
             "tickSize": tick},
            {"filterType": "LOT_SIZE", "minQty": step, "maxQty": max_qty, "stepSize": step},
            {"filterType": "MARKET_LOT_SIZE", "minQty": step, "maxQty": "120", "stepSize": step},
            {"filterType": "MAX_NUM_ORDERS", "limit": 200},
            {"filterType": "MAX_NUM_ALGO_ORDERS", "limit": 10},
            {"filterType": "MIN_NOTIONAL", "notional": min_notional},
            {"filterType": "PERCENT_PRICE", "multiplierUp": "1.0500",
             "multiplierDown": "0.9500", "multiplierDecimal": "4"}]


def _symbol(sym, base, quote, contract="PERPETUAL", tick="0.10", step="0.001"):
    return {"symbol": sym, "pair": base + quote, "contractType": contract,
            "deliveryDate": 4133404800000 if contract == "PERPETUAL" else 1774598400000,
            "onboardDate": 1569398400000, "status": "TRADING", "maintMarginPercent": "2.5000",
            "requiredMarginPercent": "5.0000", "baseAsset": base, "quoteAsset": quote,
            "marginAsset": quote, "pricePrecision": 2, "quantityPrecision": 3,
            "baseAssetPrecision": 8, "quotePrecision": 8, "underlyingType": "COIN",
            "underlyingSubType": ["PoW"], "triggerProtect": "0.0500",
            "liquidationFee": "0.012500", "marketTakeBound": "0.05",
            "maxMoveOrderLimit": 10000, "filters": _filters(tick, step, "1000", "100"),
            "orderTypes": ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT",
                           "TAKE_PROFIT_MARKET", "TRAILING_STOP_MARKET"],
            "timeInForce": ["GTC", "IOC", "FOK", "GTX", "GTD"], "permissionSets": ["GRID"]}


EXCHANGE_INFO = {
    "timezone": "UTC", "serverTime": LIVE_T0, "futuresType": "U_MARGINED",
    "rateLimits": [], "exchangeFilters": [], "assets": [],
    "symbols": [_symbol("BTCUSDT", "BTC", "USDT"), _symbol("ETHUSDT", "ETH", "USDT", tick="0.01"),
                _symbol("BTCUSDC", "BTC", "USDC"),
                _symbol("BTCUSDT_260327", "BTC", "USDT", contract="CURRENT_QUARTER")],
}


def _klines(symbol: str) -> list[list]:
    """Three hours of 1 m klines in Binance's raw shape, with a dip at minute 30."""
    base = 60_000.0 if symbol == "BTCUSDT" else 3_000.0
    rows = []
    for i in range(180):
        o = base + (i % 7) * base * 1e-4
        c = o + base * 5e-5
        low = o - base * (0.02 if i == 30 else 1e-4)
        h = c + base * 1e-4
        t = LIVE_T0 + i * MINUTE
        rows.append([t, f"{o:.2f}", f"{h:.2f}", f"{low:.2f}", f"{c:.2f}", "12.345", t + MINUTE - 1,
                     f"{12.345 * c:.4f}", 1000, "6.000", f"{6 * c:.4f}", "0"])
    return rows


def _ticker(symbol: str) -> dict:
    last = "60000.50" if symbol == "BTCUSDT" else "3000.15"
    return {"symbol": symbol, "priceChange": "-12.30", "priceChangePercent": "-0.020",
            "weightedAvgPrice": last, "lastPrice": last, "lastQty": "0.010", "openPrice": last,
            "highPrice": last, "lowPrice": last, "volume": "150000.123",
            "quoteVolume": "9000000000.00" if symbol == "BTCUSDT" else "3000000000.00",
            "openTime": LIVE_T0 - DAY, "closeTime": LIVE_T0, "firstId": 1, "lastId": 2,
            "count": 2}


def recorded_binanceusdm(clock=None) -> tuple[ccxt.binanceusdm, list[str]]:
    """A real ccxt object whose HTTP layer answers from recorded public responses (and
    /time from ``clock``, if given)."""
    ex = ccxt.binanceusdm({"enableRateLimit": False})  # no throttle sleeps offline
    calls: list[str] = []

    def fetch(url, method="GET", headers=None, body=None):
        u = urlparse(url)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        calls.append(u.path)
        if u.path == "/fapi/v1/exchangeInfo":
            return EXCHANGE_INFO
        if u.path == "/fapi/v1/time" and clock is not None:
            return {"serverTime": clock.now_ms()}
        if u.path == "/fapi/v1/klines":
            start, limit = int(q.get("startTime", 0)), int(q.get("limit", 500))
            return [r for r in _klines(q["symbol"]) if r[0] >= start][:limit]
        if u.path == "/fapi/v1/ticker/24hr":
            if "symbol" in q:
                return _ticker(q["symbol"])
            return [_ticker(s) for s in ("BTCUSDT", "ETHUSDT", "BTCUSDC")]
        raise ccxt.ExchangeError(f"no recording for {url}")

    ex.fetch = fetch
    return ex, calls


def test_paper_trading_on_live_public_data():
    clock = VirtualClock(LIVE_T0 + 10 * MINUTE + 5_000)
    live, calls = recorded_binanceusdm(clock)
    config = cfg.load().with_values(sim={"source": "live", "slippage_bps": 0.0})
    ex = SimExchange.from_config(config, clock, live_exchange=live)
    assert ex.symbols == ["BTC/USDT:USDT", "ETH/USDT:USDT"]  # linear USDT perpetuals only
    assert ex.market("BTC/USDT:USDT")["limits"]["cost"]["min"] == 100.0
    assert ex.fetch_ohlcv("BTC/USDT:USDT", "1m", since=LIVE_T0, limit=3)[0][0] == LIVE_T0
    tickers = ex.fetch_tickers()
    assert tickers["BTC/USDT:USDT"]["quoteVolume"] == 9e9 and "BTC/USDC:USDC" not in tickers
    o = ex.create_order("BTC/USDT:USDT", "market", "buy", 0.01)
    assert o["average"] == 60000.5
    ex.create_order("BTC/USDT:USDT", "market", "sell", 0.01,
                    params={"triggerPrice": 59500, "reduceOnly": True, "clientOrderId": "p-sl"})
    clock.set(LIVE_T0 + 29 * MINUTE)
    assert ex.fetch_positions()[0]["contracts"] == 0.01
    clock.set(LIVE_T0 + 45 * MINUTE)
    assert ex.fetch_positions() == []
    trade = ex.fetch_my_trades("BTC/USDT:USDT")[-1]
    assert (trade["price"], trade["timestamp"]) == (59500.0, LIVE_T0 + 31 * MINUTE - 1)
    assert "/fapi/v1/klines" in calls and not any("order" in c or "account" in c for c in calls)


def test_live_market_keeps_the_exchange_answers():
    live, _ = recorded_binanceusdm()
    m = LiveMarket(live)
    assert [mk["symbol"] for mk in m.unified_markets()] == ["BTC/USDT:USDT", "ETH/USDT:USDT"]
    c = m.candles("ETH/USDT:USDT", LIVE_T0, LIVE_T0 + 5 * MINUTE)
    assert c.ts.tolist() == [LIVE_T0 + i * MINUTE for i in range(5)]
    assert m.full_candle("ETH/USDT:USDT", LIVE_T0) is None  # the future is unknown live


def test_make_sim_default_is_offline():
    ex, _ = make_sim()
    assert isinstance(ex.source, SyntheticMarket)


@pytest.mark.parametrize("prices, decimals", [
    ([5.288e-05, 0.00012], 8),          # scientific notation, as in the BTC-quoted files
    ([94406.6, 94406.0], 1),
    ([0.1 + 0.2, 2.0], 1),              # float noise is not a decimal place
    ([1e7 + 0.5], 1),                   # large prices keep their fraction
    ([100.0, float("nan")], 0),         # a broken value is not counted
    ([1 / 3], 12),                      # no finite writing: the most
])
def test_price_decimals(prices, decimals):
    assert price_decimals(np.array(prices)) == decimals
