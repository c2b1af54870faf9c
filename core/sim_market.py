"""Market data behind the simulated exchange: a seeded synthetic market, CSV candles, live data.

Every source answers the same questions for the venue: which markets exist (as Binance
``exchangeInfo`` entries or ccxt market dicts), the closed candles of a symbol between two
instants, the forming candle at an instant, the candles ``fetch_ohlcv`` returns and the
rolling 24 h ticker. Candles are floats (market data); money is the venue's business.

* ``SyntheticMarket`` — the offline default. Seeded and deterministic: symbol ``i``'s candles
  are generated in blocks of ``BLOCK`` candles from ``numpy.random.default_rng([seed, i, b])``,
  vectorised, so a year of 5 m candles for 100 symbols takes seconds. Trending and choppy
  regimes, fat-tailed (Student-t) returns, volatility clustering, volume bursts that come
  with the big candles, rare gaps at the open, tick sizes that fit each price level.
* ``CsvMarket`` — a folder of ``BASE_QUOTE-TF.csv`` files in ccxt's OHLCV shape. The account
  settles in one currency (``settle``, USDT by default), so every pair is listed as the
  linear perpetual ``BASE/<settle>:<settle>`` and its prices are replayed as they are, as if
  quoted in the settle currency (``ETH_BTC-5m.csv`` becomes ``ETH/USDT:USDT`` at ~0.1).
  The file's own quote stays visible in the market's ``info['sourceQuote']``. Holes in
  the data stay holes; after its last candle a symbol stays at its last close.
* ``LiveMarket`` — public data of a real ccxt exchange (paper trading): its markets,
  candles and tickers, untouched; the venue matches stops on its closed 1 m candles.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.clock import DAY_MS, TIMEFRAME_MS, WallClock, timeframe_ms
from core.indicators import bad_candles

log = logging.getLogger(__name__)

BLOCK = 2048  # candles generated at a time per synthetic symbol
NAMES = ("ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT", "GOLF", "HOTEL", "INDIA",
         "JULIET", "KILO", "LIMA", "MIKE", "NOVEMBER", "OSCAR", "PAPA", "QUEBEC", "ROMEO",
         "SIERRA", "TANGO", "UNIFORM", "VICTOR", "WHISKEY", "XRAY", "YANKEE", "ZULU")
ORDER_TYPES = ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET",
               "TRAILING_STOP_MARKET"]
MIN_NOTIONAL = "5"
CSV_NAME = re.compile(r"^([A-Za-z0-9]+)_([A-Za-z0-9]+)-(\w+)\.csv$")


@dataclass(frozen=True)
class Candles:
    """Candles of one symbol, ascending by open time (UTC ms)."""

    ts: np.ndarray
    o: np.ndarray
    h: np.ndarray
    low: np.ndarray
    c: np.ndarray
    v: np.ndarray

    def __len__(self) -> int:
        return len(self.ts)

    def rows(self) -> list[list]:
        """ccxt's shape: [[ts, open, high, low, close, volume], ...]."""
        out = np.column_stack([self.o, self.h, self.low, self.c, self.v]).tolist()
        for row, ts in zip(out, self.ts.tolist(), strict=True):
            row.insert(0, ts)
        return out

    def slice(self, i0: int, i1: int) -> Candles:
        return Candles(self.ts[i0:i1], self.o[i0:i1], self.h[i0:i1], self.low[i0:i1],
                       self.c[i0:i1], self.v[i0:i1])


def step_decimals(step: float) -> int:
    """Decimals of a power-of-ten step: 0.001 -> 3, 1 -> 0."""
    return max(0, -int(math.floor(math.log10(step) + 1e-9)))


def fmt_step(step: float) -> str:
    return f"{step:.{step_decimals(step)}f}"


def tick_for(price: float) -> float:
    """A realistic tick: about 1/10,000 .. 1/100,000 of the price (BTC 0.1, DOGE 0.00001)."""
    return 10.0 ** (math.floor(math.log10(price)) - 4)


def amount_step_for(price: float) -> float:
    """A lot step worth roughly 0.1..100 quote units, between 0.001 and 1."""
    return min(1.0, max(0.001, 10.0 ** math.floor(math.log10(100.0 / price))))


def binance_market(base: str, quote: str, tick: float, step: float, created_ms: int,
                   extra: dict | None = None) -> dict:
    """A USDⓈ-M ``exchangeInfo`` symbol entry, as Binance sends it (ccxt parses it)."""
    max_qty = fmt_step(step * 10**7)
    return {
        "symbol": f"{base}{quote}", "pair": f"{base}{quote}", "contractType": "PERPETUAL",
        "deliveryDate": 4133404800000, "onboardDate": created_ms, "status": "TRADING",
        "baseAsset": base, "quoteAsset": quote, "marginAsset": quote,
        "pricePrecision": step_decimals(tick), "quantityPrecision": step_decimals(step),
        "underlyingType": "COIN", "triggerProtect": "0.0500", "orderTypes": ORDER_TYPES,
        "timeInForce": ["GTC", "IOC", "FOK", "GTX", "GTD"],
        "filters": [
            {"filterType": "PRICE_FILTER", "tickSize": fmt_step(tick), "minPrice": fmt_step(tick),
             "maxPrice": fmt_step(tick * 10**9)},
            {"filterType": "LOT_SIZE", "stepSize": fmt_step(step), "minQty": fmt_step(step),
             "maxQty": max_qty},
            {"filterType": "MARKET_LOT_SIZE", "stepSize": fmt_step(step), "minQty": fmt_step(step),
             "maxQty": max_qty},
            {"filterType": "MAX_NUM_ORDERS", "limit": 200},
            {"filterType": "MAX_NUM_ALGO_ORDERS", "limit": 10},
            {"filterType": "MIN_NOTIONAL", "notional": MIN_NOTIONAL},
        ],
        **(extra or {}),
    }


def partial(c: Candles, i: int, frac: float, tick: float) -> tuple[float, ...]:
    """Candle ``i`` as seen ``frac`` (0..1) of the way through: its forming values.

    The price walks linearly from the open to the close; the wicks grow with time; at
    frac = 1 it is the full candle.
    """
    o, h, lo, cl = float(c.o[i]), float(c.h[i]), float(c.low[i]), float(c.c[i])
    p = o + (cl - o) * frac
    hi = max(o, p) + (h - max(o, cl)) * frac
    low = min(o, p) - (min(o, cl) - lo) * frac
    d = step_decimals(tick)
    rnd = [round(round(x / tick) * tick, d) for x in (p, hi, low)]
    return o, rnd[1], rnd[2], rnd[0], round(float(c.v[i]) * frac, 8)


def aggregate(c: Candles, tf_ms: int) -> Candles:
    """Candles grouped into ``tf_ms`` buckets aligned to the epoch."""
    if len(c) == 0:
        return c
    bucket = c.ts - c.ts % tf_ms
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    ends = np.r_[starts[1:], len(c)] - 1
    return Candles(bucket[starts], c.o[starts], np.maximum.reduceat(c.h, starts),
                   np.minimum.reduceat(c.low, starts), c.c[ends], np.add.reduceat(c.v, starts))


class ArraySource:
    """A source whose candles are numpy arrays (synthetic, CSV): shared answers."""

    timeframe_ms: int
    symbols: list[str]
    ticks: dict[str, float]

    def series(self, symbol: str, upto_ms: int) -> Candles:  # pragma: no cover - abstract
        raise NotImplementedError

    def candles(self, symbol: str, start_ms: int, end_ms: int) -> Candles:
        """Candles with start_ms <= open time < end_ms."""
        s = self.series(symbol, end_ms)
        i0, i1 = np.searchsorted(s.ts, [start_ms, end_ms])
        return s.slice(int(i0), int(i1))

    def forming(self, symbol: str, now_ms: int) -> tuple[int, tuple[float, ...]] | None:
        """(open time, forming o/h/l/c/v) of the candle containing now, or None (a hole)."""
        tf = self.timeframe_ms
        start = now_ms - now_ms % tf
        s = self.series(symbol, now_ms)
        i = int(np.searchsorted(s.ts, start))
        if i >= len(s) or int(s.ts[i]) != start:
            return None
        return start, partial(s, i, (now_ms - start) / tf, self.ticks[symbol])

    def candle_at(self, symbol: str, start_ms: int) -> tuple[float, float, float, float] | None:
        """Open, high, low, close of the candle opening at start_ms (None: no candle)."""
        s = self.series(symbol, start_ms)
        i = int(s.ts.searchsorted(start_ms))
        if i >= len(s.ts) or s.ts[i] != start_ms:
            return None
        return float(s.o[i]), float(s.h[i]), float(s.low[i]), float(s.c[i])

    def full_candle(self, symbol: str, start_ms: int) -> tuple[float, ...] | None:
        """The complete candle opening at start_ms (what it will be once closed)."""
        s = self.series(symbol, start_ms)
        i = int(np.searchsorted(s.ts, start_ms))
        if i >= len(s) or int(s.ts[i]) != start_ms:
            return None
        return float(s.o[i]), float(s.h[i]), float(s.low[i]), float(s.c[i]), float(s.v[i])

    def price(self, symbol: str, now_ms: int) -> float | None:
        """Last traded price at now: the forming close, else the last close before now."""
        f = self.forming(symbol, now_ms)
        if f is not None:
            return f[1][3]
        s = self.series(symbol, now_ms)
        i = int(np.searchsorted(s.ts, now_ms, side="right"))
        return float(s.c[i - 1]) if i > 0 else None

    def ohlcv(self, symbol: str, tf_ms: int, since: int | None, limit: int,
              now_ms: int) -> list[list]:
        """What Binance's klines answer: closed candles, then the forming one."""
        base = self.timeframe_ms
        if tf_ms % base:
            raise ValueError(f"timeframe of {tf_ms} ms is not a multiple of the market's "
                             f"{base} ms candles")
        boundary = now_ms - now_ms % tf_ms  # open time of the forming candle
        start = boundary - tf_ms * (limit - 1) if since is None else since - since % tf_ms
        start = max(start, 0)
        end = now_ms - now_ms % base
        if since is not None:
            end = min(end, start + tf_ms * limit)  # no need to build what is not returned
        closed = self.candles(symbol, start, end)
        rows = aggregate(closed, tf_ms) if tf_ms != base else closed
        out = rows.rows()
        f = self.forming(symbol, now_ms)
        if f is not None and start <= f[0] and (since is None or f[0] < start + tf_ms * limit):
            fts, (o, h, lo, c, v) = f
            bucket = fts - fts % tf_ms
            if out and out[-1][0] == bucket:
                last = out[-1]
                out[-1] = [bucket, last[1], max(last[2], h), min(last[3], lo), c, last[5] + v]
            else:
                out.append([bucket, o, h, lo, c, v])
        if since is None:
            return out[-limit:]
        return [r for r in out if r[0] >= since][:limit]

    def ticker(self, symbol: str, now_ms: int) -> dict | None:
        """Rolling 24 h statistics at now (None before the symbol's first candle)."""
        base = self.timeframe_ms
        w = self.candles(symbol, now_ms - DAY_MS, now_ms - now_ms % base)
        o, h, lo = list(w.o[:1]), list(w.h), list(w.low)
        vol, qv = float(w.v.sum()), float((w.v * (w.h + w.low + w.c) / 3).sum())
        last = float(w.c[-1]) if len(w) else None
        f = self.forming(symbol, now_ms)
        if f is not None:
            fo, fh, fl, fc, fv = f[1]
            o = o or [fo]
            h.append(fh)
            lo.append(fl)
            vol += fv
            qv += fv * (fh + fl + fc) / 3
            last = fc
        if last is None:
            last = self.price(symbol, now_ms)
            if last is None:
                return None
            o, h, lo = [last], [last], [last]
        return {"open": o[0], "high": max(h), "low": min(lo), "last": last, "volume": vol,
                "quoteVolume": qv, "openTime": now_ms - DAY_MS, "closeTime": now_ms}


@dataclass(frozen=True)
class SymbolParams:
    base: str
    price: float
    sigma: float  # per-candle volatility of log returns
    quote_volume: float  # per candle, in quote units
    tick: float
    step: float


class SyntheticMarket(ArraySource):
    """Seeded synthetic perpetuals starting at ``origin_ms`` (nothing trades before it)."""

    def __init__(self, seed: int, n_symbols: int, timeframe: str = "5m", origin_ms: int = 0,
                 settle: str = "USDT") -> None:
        self.seed = int(seed)
        self.timeframe = timeframe
        self.timeframe_ms = timeframe_ms(timeframe)
        self.origin_ms = int(origin_ms) - int(origin_ms) % self.timeframe_ms
        self.settle = settle
        self.params = [self._params(i) for i in range(n_symbols)]
        self.symbols = [f"{p.base}/{settle}:{settle}" for p in self.params]
        self.ticks = {s: p.tick for s, p in zip(self.symbols, self.params, strict=True)}
        self._index = {s: i for i, s in enumerate(self.symbols)}
        self._carry: list[float] = [math.log(p.price) for p in self.params]
        self._cache: dict[int, Candles] = {}

    def describe(self) -> dict:
        return {"source": "synthetic", "seed": self.seed, "symbols": len(self.symbols),
                "timeframe": self.timeframe, "origin_ms": self.origin_ms, "settle": self.settle}

    def _params(self, i: int) -> SymbolParams:
        rng = np.random.default_rng([self.seed, i, 7])
        price = float(10 ** rng.uniform(-2, 4.7))
        scale = math.sqrt(self.timeframe_ms / 300_000)
        per_day = DAY_MS / self.timeframe_ms
        return SymbolParams(
            base=NAMES[i] if i < len(NAMES) else f"SYN{i:03d}", price=price,
            sigma=float(rng.uniform(0.0018, 0.0040)) * scale,
            quote_volume=float(10 ** rng.uniform(7, 9.3)) / per_day,
            tick=tick_for(price), step=amount_step_for(price))

    def exchange_info(self) -> list[dict]:
        return [binance_market(p.base, self.settle, p.tick, p.step, self.origin_ms)
                for p in self.params]

    def series(self, symbol: str, upto_ms: int) -> Candles:
        """All candles of ``symbol`` generated so far, at least through ``upto_ms``."""
        i = self._index[symbol]
        need = (upto_ms - self.origin_ms) // self.timeframe_ms + 1
        cached = self._cache.get(i)
        have = 0 if cached is None else len(cached)
        if have >= need:
            return cached
        blocks = []
        while (have // BLOCK + len(blocks)) * BLOCK < need:
            blocks.append(self._block(i, have // BLOCK + len(blocks)))
        old = [] if cached is None else [[cached.o], [cached.h], [cached.low], [cached.c],
                                         [cached.v]]
        arrays = [np.concatenate((old[k] if old else []) + [b[k] for b in blocks])
                  for k in range(5)]
        ts = self.origin_ms + np.arange(len(arrays[0]), dtype=np.int64) * self.timeframe_ms
        self._cache[i] = Candles(ts, *arrays)
        return self._cache[i]

    def _block(self, i: int, b: int) -> tuple:
        """Candles b*BLOCK .. (b+1)*BLOCK-1 of symbol i; continues from the previous block."""
        p = self.params[i]
        rng = np.random.default_rng([self.seed, i, b + 1000])
        n, sigma, x0 = BLOCK, p.sigma, self._carry[i]
        # Regimes: trending segments (drift, +/-) alternate with choppy ones (mean-reverting).
        mu = np.zeros(n)
        chop = np.zeros(n, dtype=bool)
        trend_dir = np.zeros(n)
        pos = 0
        up_prob = 1 / (1 + math.exp(2.5 * (x0 - math.log(p.price))))  # pulls towards the base
        while pos < n:
            trending = rng.random() < 0.5
            length = int(rng.geometric(1 / (100 if trending else 160)))
            seg = slice(pos, min(n, pos + length))
            if trending:
                d = 1.0 if rng.random() < up_prob else -1.0
                mu[seg] = d * rng.uniform(0.10, 0.30) * sigma
                trend_dir[seg] = d
            else:
                chop[seg] = True
            pos += length
        # Volatility clusters: smoothed noise, exponentiated.
        kernel = np.exp(-np.arange(48) / 16.0)
        noise = np.convolve(rng.standard_normal(n + 47), kernel, "valid")
        vc = np.exp(0.35 * noise / math.sqrt((kernel**2).sum()))
        e = rng.standard_t(3, n) / math.sqrt(3)
        e[1:] = np.where(chop[1:], e[1:] - 0.6 * e[:-1], e[1:])  # choppy: moves undo themselves
        r = mu + sigma * vc * e
        # News: a burst of volume with a big candle, mostly along the trend.
        events = rng.random(n) < 0.005
        k = int(events.sum())
        signs = np.where((trend_dir[events] != 0) & (rng.random(k) < 0.75), trend_dir[events],
                         np.where(rng.random(k) < 0.5, 1.0, -1.0))
        r[events] += signs * rng.uniform(2.0, 5.0, k) * sigma * vc[events]
        burst = np.zeros(n)
        burst[events] = rng.uniform(2.5, 6.0, k)
        burst = np.convolve(burst, [1.0, 0.45, 0.2])[:n]
        gap = np.where(rng.random(n) < 0.002, rng.uniform(0.3, 1.0, n), 0.0)
        close = x0 + np.cumsum(r)
        prev = np.r_[x0, close[:-1]]
        opn = prev + gap * r
        up = np.abs(rng.standard_normal(n)) * 0.6 * sigma * vc
        down = np.abs(rng.standard_normal(n)) * 0.6 * sigma * vc
        high, low = np.maximum(opn, close) + up, np.minimum(opn, close) - down
        self._carry[i] = float(close[-1])
        tick, d = p.tick, step_decimals(p.tick)
        o, h, lo, c = (np.maximum(np.round(np.round(np.exp(x) / tick) * tick, d), tick)
                       for x in (opn, high, low, close))
        vm = np.exp(0.25 * rng.standard_normal(n)) * (1 + 0.4 * np.abs(r) / sigma) * (1 + burst)
        v = np.round(p.quote_volume * vm / c, step_decimals(p.step))
        return o, h, lo, c, v


class CsvMarket(ArraySource):
    """Candles replayed from ``BASE_QUOTE-TF.csv`` files (see the module docstring)."""

    def __init__(self, data_dir: str | Path, timeframe: str = "5m", settle: str = "USDT") -> None:
        self.data_dir = Path(data_dir)
        self.timeframe = timeframe
        self.timeframe_ms = timeframe_ms(timeframe)
        self.settle = settle
        self._series: dict[str, Candles] = {}
        self._info: dict[str, dict] = {}
        self.ticks: dict[str, float] = {}
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"{self.data_dir}: no such folder of CSV candles")
        found = sorted(p for p in self.data_dir.iterdir() if p.suffix.lower() == ".csv")
        latest = WallClock().now_ms() + DAY_MS  # no candle is recorded from the future
        for path in found:
            m = CSV_NAME.match(path.name)
            if not m:
                log.warning("%s: not named BASE_QUOTE-TF.csv; left out", path.name)
                continue
            if m.group(3) != timeframe:
                continue  # another timeframe's candles, beside these on purpose
            base, quote = m.group(1).upper(), m.group(2).upper()
            symbol = f"{base}/{settle}:{settle}"
            if symbol in self._series:
                raise ValueError(f"{path.name}: {symbol} already comes from "
                                 f"{self._info[symbol]['file']}")
            self._load(symbol, base, quote, path, latest)
        if not self._series:
            raise ValueError(f"{self.data_dir}: no BASE_QUOTE-{timeframe}.csv files "
                             f"(found {', '.join(p.name for p in found[:5]) or 'none'})")
        self.symbols = sorted(self._series)

    def describe(self) -> dict:
        return {"source": "csv", "data_dir": str(self.data_dir), "timeframe": self.timeframe,
                "settle": self.settle}

    def _load(self, symbol: str, base: str, quote: str, path: Path, latest_ms: int) -> None:
        cols = ["open", "high", "low", "close", "volume"]
        df = read_candles(path, cols)
        if df.empty:
            # Refused, not left out: a simulated account may hold a position in it.
            raise ValueError(f"{path.name}: no candles (a header and no rows)")
        check_times(path.name, df["timestamp"].to_numpy(), self.timeframe, latest_ms)
        # A stable sort keeps a file's order among equal stamps; a stamp given twice is
        # dropped only when both rows agree: which of two different candles is right
        # cannot be told, and silently picking one would change the backtest.
        df = df.sort_values("timestamp", kind="stable")
        repeated = df[df.duplicated("timestamp", keep=False)]
        differ = repeated[~repeated.duplicated(["timestamp", *cols], keep=False)]
        if len(differ):
            raise ValueError(f"{path.name}: the candle at {int(differ['timestamp'].iloc[0])} "
                             "is given twice with different values")
        df = df.drop_duplicates("timestamp")
        ok = ~bad_candles(df)  # what the exchange client drops from a live answer
        if not ok.all():
            log.warning("%s: %d malformed candles left out", path.name, int((~ok).sum()))
        df = df[ok]
        if df.empty:
            raise ValueError(f"{path.name}: no valid candles (every row is malformed: a price "
                             "missing, not positive, or outside its candle's high and low, "
                             "or a volume missing or negative)")
        # the finest tick any price was written with (a coin falling from 12.345 to
        # 0.012345 over the file needs the tick of its end)
        tick = 10.0 ** -min(price_decimals(np.unique(df[cols[:4]].to_numpy(float))), 12)
        step = amount_step_for(float(df["close"].median()))
        self.ticks[symbol] = tick
        self._series[symbol] = Candles(df["timestamp"].to_numpy(np.int64),
                                       *(df[c].to_numpy(float) for c in cols))
        first = int(df["timestamp"].iloc[0])
        self._info[symbol] = binance_market(base, self.settle, tick, step, first,
                                            {"sourceQuote": quote, "file": path.name})

    @property
    def start_ms(self) -> int:
        return min(int(s.ts[0]) for s in self._series.values())

    @property
    def end_ms(self) -> int:
        """Close time of the last candle of any symbol."""
        return max(int(s.ts[-1]) for s in self._series.values()) + self.timeframe_ms

    def exchange_info(self) -> list[dict]:
        return [self._info[s] for s in self.symbols]

    def series(self, symbol: str, upto_ms: int) -> Candles:
        return self._series[symbol]


EARLIEST_MS = 1_230_940_800_000  # 2009-01-03, Bitcoin's first block: no market before


def read_candles(path: Path, cols: list[str]) -> pd.DataFrame:
    """The file's rows: headers matched in any case, a price that is no number a NaN
    (left out as malformed), the timestamp whole milliseconds."""
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path.name}: empty (no header row, no candles)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path.name}: not a CSV file of candles ({exc})") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in ["timestamp", *cols] if c not in df.columns]
    if missing:
        raise ValueError(f"{path.name}: no column {', '.join(missing)} (a header row of "
                         f"timestamp,{','.join(cols)} is needed; found "
                         f"{','.join(map(str, df.columns)) or 'nothing'})")
    for c in cols:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    ts = pd.to_numeric(df["timestamp"], errors="coerce")
    whole = ts.notna() & (ts == ts.round())
    if not whole.all():
        row = int(np.flatnonzero(~whole.to_numpy())[0])
        raise ValueError(f"{path.name}: line {row + 2}: timestamp {df['timestamp'].iloc[row]!r} "
                         "is not a whole number of milliseconds")
    df["timestamp"] = ts.astype("int64")
    return df


def check_times(name: str, ts: np.ndarray, timeframe: str, latest_ms: int) -> None:
    """Refuse candle times a recorded market cannot have: before 2009 or in the future
    (seconds or microseconds read as milliseconds), or off the timeframe's grid (another
    timeframe's candles, or shifted ones): each would be replayed as if it were real."""
    if not len(ts):
        return
    for bad, what in ((ts < EARLIEST_MS, "before 2009"), (ts > latest_ms, "in the future")):
        if bad.any():
            t = int(ts[np.flatnonzero(bad)[0]])
            unit = (" (seconds? they must be milliseconds)" if 0 < t < 100_000_000_000 else
                    " (microseconds? they must be milliseconds)" if t > 10**14 else "")
            raise ValueError(f"{name}: the candle at {t} is {what}{unit}: timestamps are the "
                             "UTC milliseconds of each candle's open")
    tf = TIMEFRAME_MS[timeframe]
    if DAY_MS % tf == 0 and (off := ts % tf != 0).any():
        t = int(ts[np.flatnonzero(off)[0]])
        raise ValueError(f"{name}: {int(off.sum()):,} candles do not open on the {timeframe} "
                         f"grid, the first at {t} ({t % tf // 1000} s past it): another "
                         "timeframe's candles, or shifted ones")


def price_decimals(prices: np.ndarray, most: int = 12) -> int:
    """The decimal places the prices are written with (5.288e-05 -> 8): the fewest
    that leave every finite price a whole number of units, relative to float error."""
    x = np.abs(prices[np.isfinite(prices)])
    for d in range(most + 1):
        scaled = x * 10.0 ** d
        if (np.abs(scaled - np.round(scaled)) <= 1e-12 * np.maximum(scaled, 1.0)).all():
            return d
    return most


def _trusted(symbol: str, rows: list[list]) -> Candles:
    """The exchange's 1 m rows as Candles, leaving out (and saying so) those the exchange
    client would drop from the bot's own candles: a low of 0 would fire any stop."""
    a = np.full((len(rows), 6), np.nan)
    for n, row in enumerate(rows):
        try:
            a[n] = [float(x) for x in row[:6]]
        except (TypeError, ValueError):  # None, text, a short row: left NaN, dropped
            pass
    bad = bad_candles(dict(zip(("open", "high", "low", "close", "volume"), a[:, 1:].T,
                               strict=True))) | ~np.isfinite(a[:, 0])
    if bad.any():
        log.warning("%s: %d malformed 1 m candles from the exchange left out (no order is "
                    "matched against them)", symbol, int(bad.sum()))
        a = a[~bad]
    return Candles(a[:, 0].astype(np.int64), a[:, 1], a[:, 2], a[:, 3], a[:, 4], a[:, 5])


class LiveMarket:
    """Public data of a real ccxt exchange, for paper trading (no keys needed)."""

    timeframe_ms = TIMEFRAME_MS["1m"]
    # Its answers can stop short (an empty page): the simulated exchange asks again from
    # where they stopped instead of taking the missing minutes as quiet.
    live = True

    def __init__(self, exchange: Any, settle: str = "USDT", clock: Any = None) -> None:
        self.exchange = exchange
        self.settle = settle
        self.clock = clock  # read again once /time answers (None: the caller's now_ms)
        self.symbols: list[str] = []
        self.ticks: dict[str, float] = {}
        self._offset_ms = 0  # the exchange's clock minus ours
        self._offset_at: int | None = None

    def server_now_ms(self, now_ms: int) -> int:
        """The exchange's time at our ``now_ms``: a candle is closed by its clock, not
        ours. The offset is measured at most once a minute (on a failed read, the last;
        the read's error if there is none yet: an offset of 0 could make a forming candle
        count as closed), against our clock once the answer is back: late by the answer's
        way back, never early by the request's way out."""
        if self._offset_at is None or abs(now_ms - self._offset_at) >= 60_000:
            try:
                server_ms = int(self.exchange.fetch_time())
            except Exception as exc:
                from core.exchange import is_ip_ban

                if self._offset_at is None or is_ip_ban(exc):
                    # never measured: no offset to keep, and ours may be ahead; banned:
                    # the client holds every call until the ban ends
                    raise
                log.warning("exchange time not read (%s); offset %d ms kept", exc,
                            self._offset_ms)
            else:
                answered_ms = self.clock.now_ms() if self.clock is not None else now_ms
                self._offset_ms = server_ms - max(answered_ms, now_ms)
            self._offset_at = now_ms
        return now_ms + self._offset_ms

    def describe(self) -> dict:
        return {"source": "live", "exchange": self.exchange.id, "settle": self.settle}

    def unified_markets(self) -> list[dict]:
        """The exchange's linear perpetuals settled in ``settle`` (ccxt market dicts),
        read again from the exchange on every call after the first."""
        # Inactive ones too (``active`` False): the bot's rotation leaves them out, but a
        # position or stop the simulated account holds in one must stay readable.
        markets = [m for m in self.exchange.load_markets(reload=bool(self.symbols)).values()
                   if m.get("swap") and m.get("linear") and m.get("settle") == self.settle]
        decimal_places = self.exchange.precisionMode != 4  # ccxt.TICK_SIZE
        for m in markets:
            p = m["precision"]["price"]
            self.ticks[m["symbol"]] = 10.0 ** -p if decimal_places else float(p)
        self.symbols = sorted(m["symbol"] for m in markets)
        return markets

    def listed(self, symbol: str) -> bool:
        """Does the exchange list ``symbol`` now? One it dropped (delisted) has no data
        any more; asked for, ccxt raises BadSymbol, and every venue call would fail."""
        return symbol in (self.exchange.markets or {})

    def candles(self, symbol: str, start_ms: int, end_ms: int) -> Candles:
        """Closed 1 m candles in [start, end), paged through the exchange."""
        return self.minutes(symbol, start_ms, end_ms)[0]

    def minutes(self, symbol: str, start_ms: int, end_ms: int) -> tuple[Candles, np.ndarray]:
        """``candles``, and the open times the exchange answered for, malformed rows (left
        out of the candles) included: a minute missing from the answer is one to wait for,
        a malformed one is not coming back better."""
        rows: list[list] = []
        since = start_ms if self.listed(symbol) else end_ms
        while since < end_ms:
            page = self.exchange.fetch_ohlcv(symbol, "1m", since=since, limit=1000)
            page = [r for r in page if since <= r[0] and r[0] + self.timeframe_ms <= end_ms]
            if not page:
                break
            rows.extend(page)
            since = page[-1][0] + self.timeframe_ms
        return _trusted(symbol, rows), np.array([r[0] for r in rows], dtype=np.int64)

    def price(self, symbol: str, now_ms: int) -> float | None:
        return self.exchange.fetch_ticker(symbol).get("last") if self.listed(symbol) else None

    def full_candle(self, symbol: str, start_ms: int) -> None:
        return None  # the future is not known live

    def ohlcv(self, symbol: str, tf_ms: int, since: int | None, limit: int,
              now_ms: int) -> list[list]:
        tf = next((k for k, v in TIMEFRAME_MS.items() if v == tf_ms), None)
        if not self.listed(symbol):
            return []
        return self.exchange.fetch_ohlcv(symbol, tf, since=since, limit=limit)

    def tickers(self, symbols: list[str]) -> dict[str, dict]:
        listed = [s for s in symbols if self.listed(s)]
        return self.exchange.fetch_tickers(listed) if listed else {}
