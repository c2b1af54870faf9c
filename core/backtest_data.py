"""The candles a backtest replays, laid out for speed: arrays per symbol on one time grid.

Built once per run from an ``ArraySource`` (``CsvMarket`` for ``--data DIR``, or the
seeded ``SyntheticMarket``), the same object the simulated exchange fills orders from,
so the backtest decides on exactly the candles the venue trades on.

* ``grid`` - every candle open time of any symbol, ascending. Step ``k`` is the instant
  ``grid[k] + timeframe``: the close of the candles opening at ``grid[k]``, when a scan
  decides on them (and the open of the next ones, where orders fill).
* per symbol: its candles, the strategy's vectorised ``signals`` (row ``t`` uses candles
  ``<= t`` only, so it equals ``Strategy.decide`` on the closed candles up to ``t``), the
  grid step of each candle, and the venue's price at every step (``marks``: the open of
  the candle starting then, else the last close - a hole in the data).

A symbol with a hole simply has no candle at that step: it is not decided on, exactly as
the live scan finds no new closed candle for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd

from core.clock import DAY_MS, iso
from core.exchange_types import Candle, Ticker
from core.strategies import BUILTIN, SIDE_OF, Signal, Strategy, StrategyError

INDICATOR_SKIP = ("signal", "reason")
# A user's strategy is checked against live's way of deciding on the first few symbols,
# at a few candles of each side (each check runs the strategy once on a scan's window).
CAUSAL_SYMBOLS, CAUSAL_SAMPLES = 3, 4


def parse_when(text: str, flag: str) -> int:
    """UTC ms from ``YYYY-MM-DD`` (midnight UTC) or an ISO time with a zone (``...Z``)."""
    value = text.strip()
    try:
        if len(value) == 10:
            dt = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
        else:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: not a date; use YYYY-MM-DD or an ISO time like "
                         "2018-01-15T12:00:00Z") from None
    if dt.tzinfo is None:
        raise ValueError(f"{flag} {text!r}: give the time zone (Z for UTC)")
    return int(dt.timestamp() * 1000)


@dataclass
class SymbolData:
    """One symbol's candles (as the venue has them) and the strategy's decision on each."""

    symbol: str
    ts: np.ndarray
    o: np.ndarray
    h: np.ndarray
    low: np.ndarray
    c: np.ndarray
    v: np.ndarray
    signal: np.ndarray  # int8 +1/-1/0 per candle
    reason_code: np.ndarray  # int per candle: index into reasons (a string each would cost
    reasons: list[str]  #      ~100 bytes a candle: 1 GB for 100 symbols x a year)
    indicators: dict[str, np.ndarray]  # column -> values per candle, in the strategy's order
    step: np.ndarray  # grid step of each candle
    marks: np.ndarray  # float per grid step: the venue's price at the step's instant
    tick: float
    tf_ms: int
    limit: int  # closed candles the scan fetches ([strategy] candles)
    lookback: int  # the last candles a decision rests on (warmup + 1)
    decidable: np.ndarray  # bool per candle: the scan decides on it (no hole in its lookback)
    prev_decided: np.ndarray  # per candle: the last decidable candle before it (-1: none)

    def __post_init__(self) -> None:
        # each candle's quote volume as the venue's 24 h ticker sums it (element by element
        # the same arithmetic, so the same sums): rotations read it every few hours
        self.quote_volume = self.v * (self.h + self.low + self.c) / 3
        i = np.arange(len(self.ts), dtype=np.int32)
        self.decidable_idx = np.flatnonzero(self.decidable).astype(np.int32)
        # decidable candles that follow undecided ones: their decision spans several candles
        self.after_gap_idx = np.flatnonzero(self.decidable & (self.prev_decided != i - 1)
                                            ).astype(np.int32)

    def next_decidable(self, i: int, after_gap: bool = False) -> int:
        """The first decidable candle at or after ``i`` (``len`` if none); with
        ``after_gap``, the first whose decision spans several candles."""
        idx = self.after_gap_idx if after_gap else self.decidable_idx
        j = int(idx.searchsorted(i))
        return int(idx[j]) if j < len(idx) else len(self.ts)

    def candle(self, i: int) -> Candle:
        return Candle(int(self.ts[i]), float(self.o[i]), float(self.h[i]), float(self.low[i]),
                      float(self.c[i]), float(self.v[i]))

    def window(self, now_ms: int) -> tuple[int, int]:
        """[a, b): the candles the scan fetches at ``now_ms`` (a step instant): the closed
        candles of the last ``limit`` timeframes (the venue answers klines by time)."""
        a, b = self.ts.searchsorted([now_ms - self.tf_ms * self.limit, now_ms])
        return int(a), int(b)

    def intact(self, now_ms: int) -> bool:
        """Does the scan at ``now_ms`` get this symbol's candles? Not if one is missing
        among the last ``lookback`` it fetched (jobs/scan.fetch_candles skips it)."""
        a, b = self.window(now_ms)
        if b <= a:
            return False
        j0 = max(a, b - self.lookback)
        return int(self.ts[b - 1]) - int(self.ts[j0]) == (b - 1 - j0) * self.tf_ms

    def closes(self, now_ms: int) -> CloseFrame:
        """The fetched candles as far as the scan's entry reads them (closes by time)."""
        a, b = self.window(now_ms)
        return CloseFrame(self.ts[a:b], self.c[a:b])

    def last_at(self, ms: int) -> int:
        """Index of the last candle opening at or before ``ms`` (-1: none yet)."""
        return int(self.ts.searchsorted(ms, side="right")) - 1

    def quote_volume_24h(self, now_ms: int, tf_ms: int) -> float | None:
        """The rolling 24 h quote volume the venue's ticker reports at ``now_ms`` (a candle
        boundary, where the forming candle adds nothing yet); None before the first candle."""
        if not len(self.ts) or self.ts[0] > now_ms:
            return None
        i0 = self.ts.searchsorted(now_ms - DAY_MS)
        i1 = self.ts.searchsorted(now_ms - now_ms % tf_ms)
        return float(self.quote_volume[i0:i1].sum())


class CloseFrame:
    """What ``jobs/scan.enter`` reads of a symbol's candle frame - its ``ts`` and ``close``
    columns, for the correlation limit - without building a DataFrame per entry. Asking
    it for anything else fails loudly."""

    __slots__ = ("ts", "close")

    def __init__(self, ts: np.ndarray, close: np.ndarray) -> None:
        self.ts, self.close = ts, close

    def __getitem__(self, column: str) -> np.ndarray:
        if column not in ("ts", "close"):
            raise KeyError(f"a backtest close frame has ts and close only, not {column!r}")
        return self.ts if column == "ts" else self.close


def signal_of(strategy: Strategy, data: SymbolData, i: int) -> Signal:
    """``strategy.decide`` on the closed candles up to ``i``, from the precomputed row."""
    values = {k: _num(col[i]) for k, col in data.indicators.items()}
    reason = data.reasons[int(data.reason_code[i])]
    return Signal(strategy.name, SIDE_OF[int(data.signal[i])], reason,
                  strategy.explain(reason, values), int(data.ts[i]), values,
                  dict(strategy.params))


def _num(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def ticker_from_volume(symbol: str, last: float, quote_volume: float, now_ms: int,
                       price_decimals: int) -> Ticker:
    """The Ticker the exchange client returns for the venue's 24 h statistics: the venue
    prints quoteVolume with 2 decimals and the last price on its tick; ccxt reads them as
    floats; the client keeps their shortest text as Decimal."""
    qv = float(f"{quote_volume:.2f}")
    px = float(f"{last:.{price_decimals}f}")
    return Ticker(symbol=symbol, last=Decimal(repr(px)), quote_volume=Decimal(repr(qv)),
                  ts=now_ms)


class MarketData:
    """Every symbol of a source on one time grid (see the module docstring)."""

    def __init__(self, source, strategy: Strategy, symbols: list[str] | None = None,
                 upto_ms: int | None = None, limit: int = 250) -> None:
        """``upto_ms``: candles opening before it (default: all a CSV source has; a
        synthetic source is endless and needs it); ``limit``: ``[strategy] candles``."""
        self.source = source
        self.limit = int(limit)
        self.lookback = max(int(strategy.warmup), 1) + 1  # as jobs/scan.fetch_candles
        self.tf_ms = int(source.timeframe_ms)
        self.symbols = sorted(symbols if symbols is not None else source.symbols)
        if upto_ms is None:
            upto_ms = getattr(source, "end_ms", None)
            if upto_ms is None:
                raise ValueError("an endless (synthetic) market needs an end time")
        series = {s: _before(source.series(s, int(upto_ms) - 1), int(upto_ms))
                  for s in self.symbols}
        series = {s: c for s, c in series.items() if len(c)}
        self.symbols = sorted(series)
        if not self.symbols:
            raise ValueError("no candles to backtest")
        self.grid = union_of(c.ts for c in series.values())
        self.data: dict[str, SymbolData] = {}
        for s in self.symbols:
            self.data[s] = self._prepare(s, series[s], strategy)

    def _prepare(self, symbol: str, c, strategy: Strategy) -> SymbolData:
        frame = pd.DataFrame({"ts": c.ts, "open": c.o, "high": c.h, "low": c.low, "close": c.c,
                              "volume": c.v})
        try:
            sig = strategy.signals(frame)
            if type(strategy) not in BUILTIN.values() and len(self.data) < CAUSAL_SYMBOLS:
                self._check_as_live(symbol, frame, sig["signal"].to_numpy(), strategy)
        except StrategyError as exc:
            raise ValueError(f"{exc} ({symbol}'s candles)") from None
        except Exception as exc:  # noqa: BLE001 - the user's strategy code: named, exit 2
            raise ValueError(f"strategy {strategy.name!r} failed on {symbol}'s candles: "
                             f"{type(exc).__name__}: {exc}") from None
        indicators = {k: sig[k].to_numpy() for k in sig.columns if k not in INDICATOR_SKIP}
        step = self.grid.searchsorted(c.ts).astype(np.int32)
        tick = float(self.source.ticks[symbol])
        decidable = self._decidable(c.ts)
        idx = np.where(decidable, np.arange(len(c.ts), dtype=np.int32), np.int32(-1))
        prev_decided = np.r_[np.int32(-1), np.maximum.accumulate(idx)[:-1]].astype(np.int32) \
            if len(idx) else idx
        codes, reasons = pd.factorize(sig["reason"])
        return SymbolData(symbol, c.ts, c.o, c.h, c.low, c.c, c.v,
                          sig["signal"].to_numpy(np.int8), codes.astype(np.int16),
                          [str(r) for r in reasons], indicators, step, self._marks(c, tick),
                          tick, self.tf_ms, self.limit, self.lookback, decidable, prev_decided)

    def _check_as_live(self, symbol: str, frame: pd.DataFrame, sides: np.ndarray,
                       strategy: Strategy) -> None:
        """A user's rule decides here on every candle at once; live, on the last
        ``[strategy] candles`` up to each. Sampled, they must agree: a rule that looks at
        later candles (``shift(-1)``, a centred window) or at more history than a scan
        fetches would backtest what it could never trade. (The built-in ones are tested.)"""
        first = min(int(strategy.warmup), len(sides))
        picks = [np.flatnonzero(sides[first:] != 0), np.flatnonzero(sides[first:] == 0)]
        for rows in picks:  # a few of each, spread over the series
            for i in rows[np.linspace(0, len(rows) - 1, min(len(rows), CAUSAL_SAMPLES),
                                      dtype=int)] + first if len(rows) else ():
                window = frame.iloc[max(0, i - self.limit + 1):i + 1].reset_index(drop=True)
                live = int(strategy.signals(window)["signal"].iloc[-1])
                if live != int(sides[i]):
                    raise StrategyError(
                        f"strategy {strategy.name!r} decides {SIDE_OF[int(sides[i])]} on "
                        f"{symbol}'s candle at {iso(int(frame['ts'].iloc[i]))} given all the "
                        f"candles, but {SIDE_OF[live]} given those a live scan fetches (the "
                        f"last {self.limit} up to it): it looks at later candles (shift(-1), "
                        "a centred window) or at more history than [strategy] candles, so "
                        "a backtest of it would not be what it trades live")

    def _decidable(self, ts: np.ndarray) -> np.ndarray:
        """Per candle: is it intact (``SymbolData.intact``) at its own close?"""
        i = np.arange(len(ts))
        a = np.searchsorted(ts, ts + self.tf_ms - self.tf_ms * self.limit)
        j0 = np.maximum(a, i - self.lookback + 1)
        return ts - ts[j0] == (i - j0) * self.tf_ms

    def _marks(self, c, tick: float) -> np.ndarray:
        """The venue's last price at each step's instant: the forming candle at that instant
        is the next one (its open, on the tick grid), else the last close (a hole)."""
        at = self.grid + self.tf_ms
        i = np.searchsorted(c.ts, at, side="right") - 1  # last candle opening at or before
        out = np.full(len(self.grid), np.nan)
        has = i >= 0
        idx = i[has]
        opens_now = c.ts[idx] == at[has]
        rounded_open = np.round(np.round(c.o[idx] / tick) * tick, _decimals(tick))
        out[has] = np.where(opens_now, rounded_open, c.c[idx])
        return out

    def steps(self, start_ms: int | None, end_ms: int | None) -> tuple[int, int]:
        """[k0, k1): the steps whose candles open in [start_ms, end_ms)."""
        k0 = 0 if start_ms is None else int(self.grid.searchsorted(start_ms))
        k1 = len(self.grid) if end_ms is None else int(self.grid.searchsorted(end_ms))
        return k0, k1

    def at(self, k: int) -> int:
        """The instant of step ``k``: the close of the candles opening at grid[k]."""
        return int(self.grid[k]) + self.tf_ms

    def entries_by_step(self, k0: int, k1: int) -> dict[int, list[str]]:
        """step -> symbols (sorted) whose candle closing then carries an entry signal."""
        out: dict[int, list[str]] = {}
        for s in self.symbols:
            d = self.data[s]
            rows = np.flatnonzero((d.signal != 0) & d.decidable)
            steps = d.step[rows]
            for k in steps[(steps >= k0) & (steps < k1)].tolist():
                out.setdefault(k, []).append(s)
        return out

    def tickers(self, now_ms: int, price_decimals: Mapping[str, int]) -> dict[str, Ticker]:
        """The 24 h tickers at ``now_ms`` (rotation), as the exchange client reports them."""
        out = {}
        # the venue's last price at the instant (a rotation ranks by volume only)
        k = min(int(self.grid.searchsorted(now_ms - self.tf_ms)), len(self.grid) - 1)
        for s in self.symbols:
            d = self.data[s]
            qv = d.quote_volume_24h(now_ms, self.tf_ms)
            if qv is not None:
                out[s] = ticker_from_volume(s, float(d.marks[k]), qv, now_ms, price_decimals[s])
        return out


def _decimals(step: float) -> int:
    return max(0, -int(math.floor(math.log10(step) + 1e-9)))


def union_of(arrays) -> np.ndarray:
    """The sorted union of sorted timestamp arrays (most are equal: checked first)."""
    grid = None
    for ts in arrays:
        if grid is None:
            grid = ts
        elif not (len(ts) == len(grid) and np.array_equal(ts, grid)):
            grid = np.union1d(grid, ts)
    return np.asarray(grid, dtype=np.int64)


def _before(c, end_ms: int):
    """The candles opening before end_ms (a synthetic series runs on in whole blocks)."""
    return c.slice(0, int(np.searchsorted(c.ts, end_ms)))


__all__ = ["CloseFrame", "MarketData", "SymbolData", "parse_when", "signal_of", "ticker_from_volume"]
