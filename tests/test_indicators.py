"""Indicators: formulas, warm-up, and no look-ahead / no dependence on the window start."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core import indicators as ta
from core.exchange_types import Candle

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ohlcv"
FILES = sorted(DATA.glob("*.csv")) if DATA.is_dir() else []
needs_data = pytest.mark.skipif(not FILES, reason=f"real candles not found at {DATA}")


def real(name: str) -> pd.DataFrame:
    return pd.read_csv(DATA / name).rename(columns={"timestamp": "ts"})


def synthetic(n: int = 1500, seed: int = 7) -> pd.DataFrame:
    """A random walk with the awkward cases real feeds have: zero volume, flat candles,
    huge spikes, and a gap in the timestamps."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    open_ = np.r_[100.0, close[:-1]] * (1 + rng.normal(0, 0.002, n))
    high = np.maximum(open_, close) * (1 + rng.exponential(0.003, n))
    low = np.minimum(open_, close) * (1 - rng.exponential(0.003, n))
    volume = rng.lognormal(3, 1, n)
    volume[rng.random(n) < 0.05] = 0.0
    volume[rng.random(n) < 0.01] *= 50
    flat = rng.random(n) < 0.02
    open_[flat] = high[flat] = low[flat] = close[flat]
    ts = np.arange(n, dtype=np.int64) * 300_000
    ts[n // 2:] += 25 * 60_000  # a hole in the feed
    return pd.DataFrame({"ts": ts, "open": open_, "high": high, "low": low, "close": close,
                         "volume": volume})


def all_indicators(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"body": ta.body_pct(df), "vr": ta.volume_ratio(df),
                         "tr": ta.true_range(df), "chop": ta.choppiness(df),
                         "sma50": ta.sma(df["close"], 50)}, index=df.index)


def candles(rows) -> pd.DataFrame:
    """Frame from (open, high, low, close, volume) tuples, 5 minutes apart."""
    return ta.to_frame([(i * 300_000, *r) for i, r in enumerate(rows)])


# -- formulas --------------------------------------------------------------------------

def test_body_pct_formula():
    df = candles([(100, 102, 98, 101, 1), (100, 101, 98, 99, 1), (0.0, 1, 0, 1, 1)])
    got = ta.body_pct(df).to_numpy()
    assert got[0] == pytest.approx(1.0) and got[1] == pytest.approx(1.0)
    assert math.isnan(got[2])  # open 0: undefined, not inf


def test_volume_ratio_uses_the_previous_20_only():
    volumes = [float(v) for v in range(1, 23)] + [1000.0, 10.0]
    df = candles([(1, 1, 1, 1, v) for v in volumes])
    vr = ta.volume_ratio(df).to_numpy()
    assert np.isnan(vr[:20]).all()
    assert vr[20] == pytest.approx(volumes[20] / np.mean(volumes[0:20]))
    # the spike at 22 is judged against 2..21 (itself excluded) ...
    assert vr[22] == pytest.approx(1000.0 / np.mean(volumes[2:22]))
    # ... and is part of the baseline for the next candle
    assert vr[23] == pytest.approx(10.0 / np.mean(volumes[3:23]))


def test_volume_ratio_is_nan_when_the_baseline_is_zero():
    df = candles([(1, 1, 1, 1, 0.0)] * 20 + [(1, 1, 1, 1, 5.0)])
    assert math.isnan(ta.volume_ratio(df).iloc[-1])


def test_true_range_uses_previous_close():
    df = candles([(10, 11, 9, 10, 1), (15, 16, 14, 15, 1), (9, 10, 8, 9, 1)])
    tr = ta.true_range(df).to_numpy()
    assert math.isnan(tr[0])
    assert tr[1] == 6  # gap up: high 16 - previous close 10
    assert tr[2] == 7  # gap down: previous close 15 - low 8


def test_choppiness_extremes():
    trend = candles([(t, t + 1, t, t + 1, 1) for t in range(20)])  # one-way staircase
    side = candles([(0.5, 1, 0.01, 0.5, 1)] * 20)  # every candle spans the whole range
    assert ta.choppiness(trend).iloc[-1] == pytest.approx(0.0, abs=1e-9)
    assert ta.choppiness(side).iloc[-1] == pytest.approx(100.0)


def test_choppiness_matches_a_plain_loop():
    df = synthetic(300)
    got = ta.choppiness(df).to_numpy()
    h, lo, c = df["high"].to_numpy(), df["low"].to_numpy(), df["close"].to_numpy()
    for t in range(len(df)):
        if t < 14:
            assert math.isnan(got[t])
            continue
        trs = [max(h[i] - lo[i], abs(h[i] - c[i - 1]), abs(lo[i] - c[i - 1]))
               for i in range(t - 13, t + 1)]
        span = max(h[t - 13:t + 1]) - min(lo[t - 13:t + 1])
        want = 100 * math.log10(sum(trs) / span) / math.log10(14) if span > 0 else math.nan
        assert got[t] == pytest.approx(want, rel=1e-12, nan_ok=True)


def test_sma_and_window_sum():
    s = pd.Series([1.0, 2, 3, 4, 5])
    assert ta.sma(s, 2).tolist()[1:] == [1.5, 2.5, 3.5, 4.5]
    assert np.isnan(ta.window_sum(s, 6)).all()  # shorter than the window: all NaN
    with pytest.raises(ValueError):
        ta.window_sum(s, 0)


def test_warmup_lengths():
    ind = all_indicators(synthetic(300))
    first = {k: int(np.argmax(ind[k].notna().to_numpy())) for k in ind}
    assert first == {"body": 0, "vr": 20, "tr": 1, "chop": 14, "sma50": 49}


def test_a_nan_candle_poisons_only_its_windows():
    df = synthetic(200)
    df.loc[100, "volume"] = np.nan
    vr = ta.volume_ratio(df)
    assert vr.iloc[100:121].isna().all()  # itself and the 20 candles that average it
    assert vr.iloc[121:].notna().all() and not math.isnan(vr.iloc[99])


def test_to_frame_from_candles_and_ccxt_rows():
    a = ta.to_frame([Candle(1, 1.0, 2.0, 0.5, 1.5, 10.0)])
    b = ta.to_frame([[1, 1.0, 2.0, 0.5, 1.5, 10.0]])
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == list(ta.COLUMNS) and a["ts"].dtype == np.int64


def test_bad_candles_flagged():
    df = candles([(1, 2, 0.5, 1.5, 1), (1, 2, 0.5, np.nan, 1), (1, 1.2, 0.5, 1.5, 1),
                  (1, 2, 0.5, 1.5, -1), (-1, 2, -2, 1.5, 1)])
    assert ta.bad_candles(df).tolist() == [False, True, True, True, True]


# -- no look-ahead, no dependence on where the window starts ---------------------------

def assert_window_independent(df: pd.DataFrame, window: int = 100, stride: int = 1) -> None:
    """At every point t: indicators over the `window` candles ending at t equal, exactly,
    the indicators over the full history at t."""
    full = all_indicators(df).to_numpy()
    for t in range(0, len(df), stride):
        tail = all_indicators(df.iloc[max(0, t - window + 1):t + 1]).to_numpy()[-1]
        np.testing.assert_array_equal(tail, full[t], err_msg=f"row {t}")


def test_window_independent_on_synthetic_data():
    assert_window_independent(synthetic(1200))


@needs_data
def test_window_independent_on_real_data_every_point():
    assert_window_independent(real("ADA_BTC-5m.csv"))  # the pair with holes in its feed


@needs_data
def test_window_independent_on_all_real_pairs_sampled():
    for path in FILES:
        assert_window_independent(real(path.name), stride=23)


def test_future_candles_do_not_change_the_past():
    df = synthetic(400)
    before = all_indicators(df).iloc[:300]
    changed = df.copy()
    changed.loc[300:, ["open", "high", "low", "close"]] *= 3.0
    changed.loc[300:, "volume"] = 1e9
    pd.testing.assert_frame_equal(all_indicators(changed).iloc[:300], before)
