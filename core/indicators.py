"""Causal, window-independent indicators over a candle frame.

A candle frame is a ``pandas.DataFrame`` with float columns ``ts, open, high, low,
close, volume`` (one row per closed candle, oldest first). Every indicator returns a
``Series`` aligned with the frame's index, ``NaN`` until enough history exists (and
wherever its window holds a NaN or an impossible value).

Two guarantees, both tested on real and synthetic candles:

* **Causal** - the value at row ``t`` uses rows ``<= t`` only.
* **Window independent** - the value at row ``t`` uses a fixed number of rows ending
  at ``t``, combined by the same float operations in the same order wherever the
  frame starts. So the last 100 candles give bit-identical values to the full
  history. That is why rolling sums are written here as a fixed chain of shifted
  additions (:func:`window_sum`) instead of pandas' running rolling sum, whose
  rounding drifts with the frame's start.

Formulas (``t`` is the current candle, ``n`` the period):

* body % = ``|close[t] - open[t]| / open[t] * 100``
* volume ratio = ``volume[t] / mean(volume[t-20 .. t-1])`` - the 20 previous
  candles, the current one excluded (NaN if that mean is 0).
* true range = ``max(high - low, |high - close[t-1]|, |low - close[t-1]|)`` (NaN on
  the first row: it has no previous close).
* choppiness(14) = ``100 * log10(sum(TR[t-13 .. t]) / (max(high, 14) - min(low, 14)))
  / log10(14)`` - about 100 when the price moves sideways, low when it trends; NaN
  when the 14-candle range is 0. First value on the 15th candle.
* SMA(n) = ``mean(close[t-n+1 .. t])``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

COLUMNS = ("ts", "open", "high", "low", "close", "volume")
VOLUME_LOOKBACK = 20
CHOP_PERIOD = 14


def to_frame(candles: Iterable) -> pd.DataFrame:
    """A candle frame from ``Candle`` objects or ccxt rows ``[ts, o, h, l, c, v]``."""
    rows = [
        (c.ts, c.open, c.high, c.low, c.close, c.volume) if hasattr(c, "ts") else tuple(c[:6])
        for c in candles
    ]
    frame = pd.DataFrame(rows, columns=list(COLUMNS), dtype=float)
    frame["ts"] = frame["ts"].astype("int64") if len(frame) else frame["ts"]
    return frame


def _values(series: pd.Series | np.ndarray) -> np.ndarray:
    return np.asarray(series, dtype=float)


def window_sum(x: pd.Series | np.ndarray, n: int) -> np.ndarray:
    """Sum of the last ``n`` values at each row, NaN for the first ``n - 1`` rows.

    Adds ``x[t-n+1] + ... + x[t]`` left to right for every ``t`` (vectorised across
    rows), so each result depends only on its own ``n`` inputs.
    """
    if n < 1:
        raise ValueError("window must be at least 1")
    x = _values(x)
    out = np.full(x.shape, np.nan)
    m = len(x) - n + 1
    if m <= 0:
        return out
    acc = x[0:m].copy()
    for k in range(1, n):
        acc += x[k:k + m]
    out[n - 1:] = acc
    return out


def _window_extreme(x: pd.Series | np.ndarray, n: int, op) -> np.ndarray:
    x = _values(x)
    out = np.full(x.shape, np.nan)
    if len(x) >= n:
        out[n - 1:] = op(sliding_window_view(x, n), axis=1)  # NaN propagates, as wanted
    return out


def window_max(x: pd.Series | np.ndarray, n: int) -> np.ndarray:
    return _window_extreme(x, n, np.max)


def window_min(x: pd.Series | np.ndarray, n: int) -> np.ndarray:
    return _window_extreme(x, n, np.min)


def _shift1(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    out[:1] = np.nan
    out[1:] = x[:-1]
    return out


def sma(series: pd.Series, n: int) -> pd.Series:
    """Simple moving average of the last ``n`` values (NaN for the first ``n - 1``)."""
    return pd.Series(window_sum(series, n) / n, index=series.index, name=f"sma{n}")


def body_pct(df: pd.DataFrame) -> pd.Series:
    """``|close - open| / open * 100``; NaN where open is not positive."""
    o, c = _values(df["open"]), _values(df["close"])
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(o > 0, np.abs(c - o) / o * 100.0, np.nan)
    return pd.Series(out, index=df.index, name="body_pct")


def volume_ratio(df: pd.DataFrame, lookback: int = VOLUME_LOOKBACK) -> pd.Series:
    """``volume[t] / mean(volume[t-lookback .. t-1])``; NaN where that mean is 0."""
    v = _values(df["volume"])
    prev_mean = _shift1(window_sum(v, lookback) / lookback)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(prev_mean > 0, v / prev_mean, np.nan)
    return pd.Series(out, index=df.index, name="volume_ratio")


def true_range(df: pd.DataFrame) -> pd.Series:
    """``max(high - low, |high - prev close|, |low - prev close|)``; NaN on the first row."""
    h, lo, c = _values(df["high"]), _values(df["low"]), _values(df["close"])
    prev = _shift1(c)
    tr = np.maximum(h - lo, np.maximum(np.abs(h - prev), np.abs(lo - prev)))
    return pd.Series(tr, index=df.index, name="true_range")


def choppiness(df: pd.DataFrame, period: int = CHOP_PERIOD) -> pd.Series:
    """Choppiness index: ``100 * log10(sum TR / (max high - min low)) / log10(period)``."""
    if period < 2:
        raise ValueError("choppiness period must be at least 2")
    tr_sum = window_sum(true_range(df), period)
    span = window_max(df["high"], period) - window_min(df["low"], period)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where((span > 0) & (tr_sum > 0),
                       100.0 * np.log10(tr_sum / span) / np.log10(period), np.nan)
    return pd.Series(out, index=df.index, name="chop")


def bad_candles(df: pd.DataFrame) -> np.ndarray:
    """True where a candle cannot be trusted: a NaN/inf field, a non-positive price,
    negative volume, or high/low that do not bound open and close."""
    o, h, lo, c, v = (_values(df[k]) for k in ("open", "high", "low", "close", "volume"))
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(o) & np.isfinite(h) & np.isfinite(lo) & np.isfinite(c) & np.isfinite(v)
        sane = (o > 0) & (c > 0) & (lo > 0) & (v >= 0) & (h >= np.maximum(o, c)) & (
            lo <= np.minimum(o, c))
    return ~(finite & sane)


def window_any(flags: np.ndarray, n: int) -> np.ndarray:
    """True where any of the last ``n`` flags (this row's included) is set."""
    counts = np.concatenate(([0], np.cumsum(np.asarray(flags, dtype=np.int64))))
    rows = np.arange(1, len(counts))
    return counts[rows] - counts[np.maximum(rows - n, 0)] > 0


__all__ = ["COLUMNS", "VOLUME_LOOKBACK", "CHOP_PERIOD", "to_frame", "window_sum", "window_max",
           "window_min", "sma", "body_pct", "volume_ratio", "true_range", "choppiness",
           "bad_candles", "window_any"]
