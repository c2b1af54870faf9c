"""Strategies: the momentum and sma_cross rules, decide == last row of signals, registry."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core import indicators as ta
from core.config import Config
from core.strategies import (
    BUILTIN,
    Momentum,
    SmaCross,
    Strategy,
    StrategyError,
    available,
    load_strategy,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my_strategy.py"
DATA = ROOT.parent / "shared" / "data" / "ohlcv"
needs_data = pytest.mark.skipif(not (DATA / "ETH_BTC-5m.csv").is_file(),
                                reason=f"real candles not found at {DATA}")


def real(name: str = "ETH_BTC-5m.csv") -> pd.DataFrame:
    return pd.read_csv(DATA / name).rename(columns={"timestamp": "ts"})


def trend_then(last: tuple[float, float], volume: float, n: int = 40,
               step: float = 0.002) -> pd.DataFrame:
    """n candles of a clean uptrend (choppiness near 0, volume 100), then one candle
    with (open, close) = ``last`` and the given volume."""
    rows, price = [], 100.0
    for i in range(n):
        nxt = price * (1 + step)
        rows.append((i * 300_000, price, nxt, price, nxt, 100.0))
        price = nxt
    o, c = last
    rows.append((n * 300_000, o, max(o, c), min(o, c), c, volume))
    return ta.to_frame(rows)


def sideways_then(last: tuple[float, float], volume: float, n: int = 40) -> pd.DataFrame:
    rows = [(i * 300_000, 100.0, 101.0, 99.0, 100.0 + (0.5 if i % 2 else -0.5), 100.0)
            for i in range(n)]
    o, c = last
    rows.append((n * 300_000, o, max(o, c), min(o, c), c, volume))
    return ta.to_frame(rows)


# -- momentum --------------------------------------------------------------------------

@pytest.mark.parametrize(("last", "volume", "side", "reason"), [
    ((110.0, 110.0 * 1.0075), 180.0, "long", "long_momentum"),
    ((110.0, 110.0 * 1.0075), 179.0, "none", "volume_too_low"),  # long needs 1.8
    ((110.0, 110.0 * 1.0065), 500.0, "none", "body_too_small"),  # body < 0.7 %
    ((110.0, 110.0 * 0.9925), 150.0, "short", "short_momentum"),  # short needs only 1.5
    ((110.0, 110.0 * 0.9925), 149.0, "none", "volume_too_low"),
])
def test_momentum_thresholds(last, volume, side, reason):
    df = trend_then(last, volume)
    sig = Momentum().decide(df)
    assert sig.values["chop"] < 50  # the set-up is a trend, so choppiness does not block
    assert (sig.side, sig.reason) == (side, reason)
    assert sig.ts == int(df["ts"].iloc[-1])


def test_momentum_body_threshold_is_inclusive():
    sig = Momentum().decide(trend_then((100.0, 100.7), 500.0))
    assert sig.values["body_pct"] >= 0.7 and sig.side == "long"


def test_momentum_blocked_when_choppy():
    sig = Momentum().decide(sideways_then((100.0, 101.0), 500.0))
    assert sig.values["chop"] >= 50
    assert (sig.side, sig.reason) == ("none", "choppy")


def test_momentum_short_disabled():
    sig = Momentum(allow_short=False).decide(trend_then((110.0, 109.0), 500.0))
    assert (sig.side, sig.reason) == ("none", "short_disabled")


def test_momentum_doji_has_no_direction():
    sig = Momentum(min_body_pct=0.0).decide(trend_then((110.0, 110.0), 500.0))
    assert (sig.side, sig.reason) == ("none", "no_direction")


def test_warmup_bad_candle_and_no_data():
    short = trend_then((110.0, 111.0), 500.0, n=10)
    assert Momentum().decide(short).reason == "warmup"
    assert len(trend_then((1, 1), 1, n=Momentum().warmup - 1)) == Momentum().warmup
    assert Momentum().decide(trend_then((110.0, 111.0), 500.0,
                                        n=Momentum().warmup - 1)).reason != "warmup"
    bad = trend_then((110.0, 111.0), 500.0)
    bad.loc[bad.index[-1], "close"] = np.nan
    assert Momentum().decide(bad).reason == "bad_candle"
    empty = ta.to_frame([])
    assert Momentum().decide(empty).reason == "no_data"


def test_a_bad_candle_among_those_a_decision_rests_on_taints_it():
    # A negative volume 5 candles back made the 20-candle mean small, and a candle of
    # ordinary volume read as a surge: a long on data the exchange client would drop.
    df = trend_then((110.0, 111.0), 100.0)
    assert Momentum().decide(df).reason == "volume_too_low"
    df.loc[df.index[-6], "volume"] = -150.0
    assert Momentum().decide(df).reason == "bad_candle"
    far = trend_then((110.0, 111.0), 100.0)
    far.loc[far.index[-1 - Momentum().warmup], "volume"] = -150.0  # out of the window
    assert Momentum().decide(far).reason == "volume_too_low"


@pytest.mark.parametrize(("o", "c"), [(1e-05, 1.007e-05), (5.0e-05, 5.035e-05)])
def test_a_body_of_exactly_the_minimum_is_enough(o, c):
    # 0.7 % exactly, which float arithmetic computes a hair under 0.7
    assert ta.body_pct(pd.DataFrame({"open": [o], "close": [c]}))[0] < 0.7
    df = trend_then((o, c), 500.0)
    scale = o / 100.0  # the trend at the same price level as the last candle
    for col in ("open", "high", "low", "close"):
        df.loc[df.index[:-1], col] *= scale
    assert Momentum().decide(df).reason == "long_momentum"


def test_signal_record_is_json_and_explained():
    sig = Momentum().decide(trend_then((110.0, 110.0 * 1.0075), 180.0))
    rec = json.loads(json.dumps(sig.to_record()))
    assert rec["reason"] == "long_momentum" and rec["params"]["min_body_pct"] == 0.7
    assert set(rec["values"]) == {"body_pct", "volume_ratio", "chop"}
    assert "long_momentum" in sig.detail and "volume_ratio=1.8" in sig.detail


# -- sma_cross -------------------------------------------------------------------------

def closes_frame(closes) -> pd.DataFrame:
    return ta.to_frame([(i * 60_000, c, c, c, c, 1.0) for i, c in enumerate(closes)])


def test_sma_cross_marks_the_crossing_candle():
    closes = [10, 9, 8, 7, 6, 5, 6, 8, 10, 12, 11, 9, 7, 5, 4]
    sig = SmaCross(sma_fast=2, sma_slow=4).signals(closes_frame(closes))
    fast = pd.Series(closes, dtype=float).rolling(2).mean()
    slow = pd.Series(closes, dtype=float).rolling(4).mean()
    spread = fast - slow
    want_up = [t for t in range(5, len(closes)) if spread[t] > 0 >= spread[t - 1]]
    want_down = [t for t in range(5, len(closes)) if spread[t] < 0 <= spread[t - 1]]
    assert want_up and want_down
    assert sig.index[sig["signal"] == 1].tolist() == want_up
    assert sig.index[sig["signal"] == -1].tolist() == want_down
    assert set(sig["reason"].iloc[:4]) == {"warmup"}  # needs sma_slow + 1 candles
    assert sig["reason"].iloc[want_up[0]] == "sma_cross_up"


def test_sma_cross_params_come_from_config():
    cfg = Config().with_values(strategy={"name": "sma_cross", "sma_fast": 5, "sma_slow": 20,
                                         "allow_short": False})
    strat = load_strategy(cfg.strategy)
    assert isinstance(strat, SmaCross)
    assert dict(strat.params) == {"sma_fast": 5, "sma_slow": 20, "allow_short": False}
    assert strat.warmup == 21
    with pytest.raises(StrategyError):
        SmaCross(sma_fast=20, sma_slow=5)


# -- one implementation: decide is the last row of signals ----------------------------

@needs_data
@pytest.mark.parametrize("strategy", [Momentum(), SmaCross()], ids=lambda s: s.name)
def test_decide_equals_signals_on_a_trailing_window(strategy):
    """The live scan (decide on the last `candles` closed candles) agrees with the
    backtester (signals over the whole history) at every sampled point."""
    df = real()
    full = strategy.signals(df)
    window = max(strategy.warmup, 100) + 50
    hits = 0
    for t in list(range(strategy.warmup, len(df), 7)) + full.index[full["signal"] != 0].tolist():
        sig = strategy.decide(df.iloc[max(0, t - window + 1):t + 1])
        assert (sig.direction, sig.reason) == (full["signal"].iloc[t], full["reason"].iloc[t])
        hits += sig.direction != 0
    assert hits > 10  # the real data does produce entries to compare


@needs_data
def test_signals_have_no_look_ahead():
    df = real()
    strat = Momentum()
    before = strat.signals(df).iloc[:3000]
    changed = df.copy()
    changed.loc[3000:, ["open", "high", "low", "close", "volume"]] *= 2.0
    pd.testing.assert_frame_equal(strat.signals(changed).iloc[:3000], before)


# -- registry and user modules ----------------------------------------------------------

def test_builtins_and_unknown_name():
    assert set(BUILTIN) == {"momentum", "sma_cross"}
    assert isinstance(load_strategy(Config().strategy), Momentum)
    with pytest.raises(StrategyError, match="available: momentum, sma_cross"):
        load_strategy(Config().with_values(strategy={"name": "nope"}).strategy)
    with pytest.raises(StrategyError, match="unknown parameter"):
        Momentum(min_body=1)


def test_momentum_params_from_config():
    cfg = Config().with_values(strategy={"min_body_pct": 1.2, "choppiness_max": 40.0})
    p = load_strategy(cfg.strategy).params
    assert p["min_body_pct"] == 1.2 and p["choppiness_max"] == 40.0
    assert p["long_volume_ratio"] == 1.8 and p["short_volume_ratio"] == 1.5


def test_example_user_strategy_by_path():
    cfg = Config().with_values(strategy={"module": str(EXAMPLE), "name": "breakout"})
    strat = load_strategy(cfg.strategy)
    assert strat.name == "breakout" and isinstance(strat, Strategy)
    rows = [(i * 60_000, 100.0, 101.0, 99.0, 100.0, 10.0) for i in range(30)]
    rows.append((30 * 60_000, 100.0, 103.0, 100.0, 102.5, 30.0))
    sig = strat.decide(ta.to_frame(rows))
    assert (sig.side, sig.reason) == ("long", "breakout_up")
    rules = strat.exit_rules(cfg.exits)
    assert rules.trailing_stop_pct == 2 * cfg.exits.trailing_stop_pct
    assert rules.stop_loss_pct == cfg.exits.stop_loss_pct


def test_example_user_strategy_by_module_name(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    names = available("my_strategy")
    assert set(names) == {"momentum", "sma_cross", "breakout"}
    cfg = Config().with_values(strategy={"module": "my_strategy", "name": "breakout",
                                         "allow_short": False})
    assert load_strategy(cfg.strategy).params["allow_short"] is False


def test_user_module_discovery_and_errors(tmp_path):
    found = tmp_path / "found.py"
    found.write_text("from core.strategies import Momentum\n"
                     "class Calm(Momentum):\n    name = 'calm'\n")
    assert "calm" in available(str(found))
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(StrategyError, match="defines no strategy"):
        available(str(empty))
    clash = tmp_path / "clash.py"
    clash.write_text("from core.strategies import Momentum\n"
                     "class Again(Momentum):\n    name = 'momentum'\n")
    with pytest.raises(StrategyError, match="already taken"):
        available(str(clash))
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(StrategyError, match="failed to import"):
        available(str(broken))
    with pytest.raises(StrategyError, match="cannot be imported"):
        available("no_such_module_here")
    # by name (on PYTHONPATH): only ImportError was caught, the rest a traceback, exit 1
    (tmp_path / "raising_by_name.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "unparsable_by_name.py").write_text("def (:\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(StrategyError, match=r"'raising_by_name' failed to import: "
                                                r"RuntimeError\('boom'\)"):
            available("raising_by_name")
        with pytest.raises(StrategyError, match="'unparsable_by_name' failed to import: "
                                                "SyntaxError"):
            available("unparsable_by_name")
    finally:
        sys.path.remove(str(tmp_path))
    with pytest.raises(StrategyError, match="not found"):
        available(str(tmp_path / "missing.py"))


class Answers(Strategy):
    """A strategy whose rule answers whatever the test gives it."""

    name = "answers"
    defaults = {}
    warmup = 1

    def __init__(self, side, reason=None, rows=None) -> None:
        super().__init__()
        self.side, self.reason, self.rows = side, reason, rows

    def indicators(self, df):
        return pd.DataFrame({"x": np.ones(self.rows if self.rows is not None else len(df))})

    def rule(self, df, ind):
        return self.side, (np.full(len(df), "r") if self.reason is None else self.reason)


@pytest.mark.parametrize(("side", "reason", "rows", "message"), [
    # cast to int8 unsaid: NaN ran a backtest with no trade, 1.7 went long, 300 wrapped
    ([0, 0, np.nan, 0], None, None, "side nan at candle 2; sides are +1 (long), -1"),
    ([0, 1.7, 0, 0], None, None, "side 1.7 at candle 1"),
    ([0, 0, 0, 300], None, None, "side 300 at candle 3"),
    (np.array([0, 0, 0, 2], dtype=object), None, None, "side 2 at candle 3"),
    (["long"] * 4, None, None, "sides must be numbers"),
    ([0, 0, 0], None, None, "3 sides for 4 candles"),
    ([0] * 4, "why", None, "reasons of shape () for 4 candles"),
    ([0] * 4, None, 3, "3 indicator rows for 4 candles"),
])
def test_a_rule_answering_nonsense_is_refused_by_name(side, reason, rows, message):
    df = pd.DataFrame({"ts": np.arange(4) * 300_000, "open": 1.0, "high": 1.1, "low": 0.9,
                       "close": 1.0, "volume": 5.0})
    with pytest.raises(StrategyError, match=re.escape(f"strategy 'answers': {message}")):
        Answers(side, reason, rows).signals(df)
    assert Answers([0, 1, -1, 0]).signals(df)["signal"].tolist() == [0, 1, -1, 0]


def test_a_rule_may_answer_nan_where_no_decision_is_taken():
    """Warm-up rows (a NaN indicator) decide nothing whatever the rule says: np.sign of an
    SMA's distance is NaN there, and was refused though those rows are never used."""
    df = pd.DataFrame({"ts": np.arange(5) * 300_000, "open": 1.0, "high": 2.0, "low": 0.5,
                       "close": [1.0, 1.1, 1.2, 1.1, 1.3], "volume": 5.0})

    class SignOfSma(Answers):
        warmup = 2

        def indicators(self, df):
            return pd.DataFrame({"sma": df["close"].rolling(3).mean()})

        def rule(self, df, ind):
            return np.sign(df["close"] - ind["sma"]), np.full(len(df), "r")

    sig = SignOfSma(None).signals(df)
    assert sig["signal"].tolist() == [0, 0, 1, -1, 1]
    assert sig["reason"].tolist()[:2] == ["warmup", "warmup"]
