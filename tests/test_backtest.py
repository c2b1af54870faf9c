"""The backtester: same decisions as the live scan, no look-ahead, the live ledger, the CLI.

The central check: on real candles (holes included, halts firing, shorts on) the fast
engine writes exactly the orders, fills, positions, stops, best prices, risk decisions,
halts, rotations and day closes that the live scan job (``jobs.scan.run``) writes when
it is run at every candle close on the same virtual clock and simulated exchange.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import random
import re
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cli
from core import exits
from core.backtest import (
    BACKTEST_KIND,
    BacktestResult,
    Engine,
    is_backtest_ledger,
    run_backtest,
)
from core.backtest_data import MarketData, parse_when, signal_of
from core.backtest_ledger import BufferedLedger
from core.backtest_run import ProgressBar
from core.backtest_venue import BacktestClient, build_venue
from core.backtest_watch import next_due, watch_for
from core.clock import VirtualClock
from core.config import Config
from core.dashboard import Dashboard
from core.exchange import ExchangeClient
from core.report import daily_returns, drawdowns, metrics, sharpe_sortino, summary_text, when_utc
from core.sim_market import ArraySource, Candles, CsvMarket, binance_market
from core.strategies import load_strategy
from jobs.scan import frame as scan_frame
from ledger import Fact, Ledger
from ledger.lock import LedgerLock

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ohlcv"
needs_data = pytest.mark.skipif(not (DATA / "ETH_BTC-5m.csv").is_file(),
                                reason=f"real candles not found at {DATA}")
TF = 300_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00Z
COMPARED = ("ts, type, symbol, side, amount, price, fee, pnl, position_id, client_order_id, "
            "exchange_order_id, reason, CASE WHEN type IN ('rotation', 'day_close', 'halt', "
            "'risk_decision', 'order_intent', 'order_update', 'fill', 'best_price') "
            "THEN data END")


def config(**sections) -> Config:
    """The bench's setting: BTC-quoted pairs read as USDT with 100 to trade (so even the
    cheapest coin fits the markets' maximum quantity), 0.1 % fee."""
    base = {"sim": {"taker_fee_pct": 0.1, "start_balance": 100.0}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return Config().with_values(**base)


def acted(db: Path) -> list[tuple]:
    """Every fact but the per-scan bookkeeping (balance snapshots, signals, notes)."""
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT {COMPARED} FROM facts WHERE type NOT IN "
                            "('balance', 'signal', 'note', 'checkpoint') ORDER BY seq").fetchall()


@pytest.fixture(scope="module")
def real_market():
    if not (DATA / "ETH_BTC-5m.csv").is_file():
        pytest.skip(f"real candles not found at {DATA}")
    return CsvMarket(DATA)


# -- the same decisions as the live scan ----------------------------------------------------


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("start, end, limits", [
    # ADA's holes (1, 1, 4, 1 and 33 candles), tight limits: the daily loss halt fires
    # (the day starts at the first balance: no midnight needs to pass first)
    ("2018-01-15T02:00:00Z", "2018-01-15T22:00:00Z", {"max_drawdown_pct": 4.0,
                                                      "daily_loss_limit_pct": 3.0}),
])
def test_fast_engine_equals_the_live_scan_job(real_market, tmp_path, start, end, limits):
    cfg = config(risk=limits, strategy={"allow_short": True})
    s, e = parse_when(start, "--from"), parse_when(end, "--to")
    fast = run_backtest(cfg, real_market, tmp_path / "fast.db", start_ms=s, end_ms=e)
    live = run_backtest(cfg, real_market, tmp_path / "live.db", start_ms=s, end_ms=e,
                        reference=True)
    a, b = acted(tmp_path / "fast.db"), acted(tmp_path / "live.db")
    kinds = {row[1] for row in a}
    assert {"position_opened", "position_closed", "stop_moved", "rotation"} <= kinds
    assert len(fast.trades) > 5
    assert a == b
    np.testing.assert_allclose(fast.equity[-1], live.equity[-1], rtol=1e-12)


@needs_data
def test_fast_engine_equals_the_live_scan_job_through_a_halt(real_market, tmp_path):
    cfg = config(risk={"max_drawdown_pct": 2.0, "daily_loss_limit_pct": 1.5,
                       "daily_loss_close_all": True}, strategy={"allow_short": True})
    # a midnight (the daily reset sets the day's start equity), then both halts fire
    s, e = parse_when("2018-01-16T20:00:00Z", "--from"), parse_when("2018-01-17T05:00:00Z",
                                                                    "--to")
    run_backtest(cfg, real_market, tmp_path / "fast.db", start_ms=s, end_ms=e)
    run_backtest(cfg, real_market, tmp_path / "live.db", start_ms=s, end_ms=e, reference=True)
    a = acted(tmp_path / "fast.db")
    assert {"daily_loss_limit", "max_drawdown"} <= {row[11] for row in a if row[1] == "halt"}
    assert a == acted(tmp_path / "live.db")


def random_setting(rng: random.Random) -> tuple[dict, str, str]:
    """A config drawn over what the skipping depends on (exits, limits, sizing, rotation
    and its interval, costs), and a 12-30 h window starting at any minute."""
    strategy = ({"name": "sma_cross", "sma_fast": (f := rng.randint(3, 30)),
                 "sma_slow": rng.randint(f + 1, 90)} if rng.random() < 0.35 else
                {"name": "momentum", "min_body_pct": rng.choice([0.2, 0.4, 0.7])})
    mapping = {
        "strategy": {**strategy, "allow_short": rng.random() < 0.6},
        "exits": {"stop_loss_pct": rng.choice([0.3, 1.0, 2.0, 3.5]),
                  "trailing_activation_pct": rng.choice([0.0, 0.3, 0.8, 2.0]),
                  "trailing_stop_pct": rng.choice([0.1, 0.3, 0.5, 1.5]),
                  "surge_pct": rng.choice([0.5, 1.0, 2.0, 4.0]),
                  "surge_trailing_stop_pct": rng.choice([0.05, 0.25, 0.6]),
                  "stop_move_interval_s": rng.choice([0, 30, 300, 3600])},
        "risk": {"max_open_positions": rng.randint(1, 8),
                 "max_drawdown_pct": rng.choice([3.0, 8.0, 15.0, 60.0]),
                 "daily_loss_limit_pct": rng.choice([2.0, 5.0, 50.0]),
                 "daily_loss_close_all": rng.random() < 0.4,
                 "cooldown_minutes": rng.choice([0, 7, 30]),
                 "sizing": rng.choice(["fraction", "risk"])},
        "rotation": {"top_n": rng.randint(1, 10)},
        "schedule": {"rotate_interval_h": rng.choice([0.7, 2.5, 3.0, 5.3])},
        "sim": {"slippage_bps": rng.choice([0.0, 2.0, 10.0]),
                "taker_fee_pct": rng.choice([0.0, 0.04, 0.1]),
                "start_balance": rng.choice([100.0, 10000.0])},
    }
    start = 1515567600000 + rng.randrange(0, 17 * 86_400_000, 60_000)  # from 01-10 07:00
    end = start + rng.randrange(12 * 3_600_000, 30 * 3_600_000, 60_000)
    return mapping, when_utc(start).replace(" ", "T") + "Z", when_utc(end).replace(" ", "T") + "Z"


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_fast_engine_equals_the_live_scan_job_on_random_settings(real_market, tmp_path, seed):
    """An auditor's fuzz (334 settings) found no difference; these keep a few in the suite."""
    mapping, start, end = random_setting(random.Random(seed))
    cfg = Config().with_values(**mapping)
    s, e = parse_when(start, "--from"), parse_when(end, "--to")
    fast = run_backtest(cfg, real_market, tmp_path / "fast.db", start_ms=s, end_ms=e)
    live = run_backtest(cfg, real_market, tmp_path / "live.db", start_ms=s, end_ms=e,
                        reference=True)
    assert acted(tmp_path / "fast.db") == acted(tmp_path / "live.db"), (mapping, start, end)
    np.testing.assert_allclose(fast.equity[-1], live.equity[-1], rtol=1e-12)


# -- the exit-rule skip is exact ---------------------------------------------------------------


RULES = exits.ExitRules()
STEP = Decimal("0.0001")


def position(side, entry, best, trailing, trail, stop):
    return {"position_id": "p", "symbol": "X/USDT:USDT", "side": side, "amount": "1",
            "entry_price": str(entry), "best_price": str(best), "opened_ts": 0,
            "trailing_active": trailing, "trail_pct": trail,
            "stop": None if stop is None else {"price": str(stop), "ts": 0}}


@st.composite
def cases(draw):
    side = draw(st.sampled_from(["long", "short"]))
    sign = 1 if side == "long" else -1
    entry = Decimal(draw(st.sampled_from(["1.2345", "0.0987", "50.5", "0.00031"])))
    best = entry * (1 + sign * Decimal(draw(st.integers(0, 60))) / 1000)
    armed = exits.favourable_pct(side, entry, best) >= Decimal(str(RULES.trailing_activation_pct))
    trailing = draw(st.booleans()) if not armed else draw(st.sampled_from([True] * 9 + [False]))
    trail = draw(st.sampled_from([None, "0.5", "0.5", "0.25", "0.1"])) if trailing else None
    level = exits.stop_price(side, entry, RULES.stop_loss_pct)
    if trailing:
        width = Decimal(trail or str(RULES.trailing_stop_pct))
        level = exits.more_protective(side, level, exits.trailing_stop_price(side, best, width))
    stop = draw(st.sampled_from([exits.stop_on_tick(side, level, STEP)] * 4 + [
        None, exits.stop_on_tick(side, level * (1 - sign * Decimal("0.004")), STEP)]))
    p = position(side, entry, best, trailing, trail, stop)
    w = watch_for(p, RULES, STEP)
    # prices inside the position's band, exactly on its edges and bounds, or anywhere near
    lo_edge, hi_edge = sorted([float(level), float(best)])
    anchors = [float(best), float(level), float(entry), w.best_bound, w.level_bound]
    price = st.one_of(st.floats(lo_edge, hi_edge), st.floats(lo_edge, hi_edge),
                      st.sampled_from(anchors),
                      st.floats(float(entry) * 0.9, float(entry) * 1.1))
    hi, lo, close, prev = draw(price), draw(price), draw(price), draw(price)
    hi, lo = max(hi, lo, close), min(hi, lo, close)
    return p, w, hi, lo, close, prev


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_a_skipped_candle_is_one_where_evaluate_exit_changes_nothing(case):
    p, w, hi, lo, close, prev = case
    if w.due(hi, lo, close, prev):
        return
    d = exits.evaluate_exit(p, hi, lo, close, prev, RULES)
    assert d.action == "hold", d
    resting = exits.as_decimal((p["stop"] or {}).get("price"))
    assert not exits.stop_needs_move(p["side"], resting, d.stop_price, None, 0, 0, STEP)


def test_next_due_finds_the_first_due_candle():
    p = position("long", Decimal("100"), Decimal("101"), False, None, Decimal("98"))
    w = watch_for(p, RULES, Decimal("0.01"))
    c = np.array([100.2, 100.5, 99.0, 100.0, 100.8, 100.1])
    h = c + 0.1
    low = c - 0.1
    low[3] = 97.5  # crosses the stop
    h[5] = 101.5  # a new best, later
    assert next_due(w, h, low, c, 1) == 3
    assert next_due(w, h, low, c, 4) == 5
    assert all(not w.due(h[i], low[i], c[i], c[i - 1]) for i in (1, 2, 4))
    unsettled = watch_for({**p, "stop": None}, RULES, Decimal("0.01"))  # stop missing
    assert next_due(unsettled, h, low, c, 1) == 1


# -- crafted markets: timing, worse case, holes -------------------------------------------------


class ArrayMarket(ArraySource):
    """A market from arrays: BASE/USDT:USDT perpetuals, tick 0.01, lot 0.001."""

    def __init__(self, candles: dict[str, Candles]) -> None:
        self.timeframe_ms = TF
        self._c = candles
        self.symbols = sorted(candles)
        self.ticks = dict.fromkeys(self.symbols, 0.01)
        self.end_ms = max(int(c.ts[-1]) for c in candles.values()) + TF

    def series(self, symbol, upto_ms):
        return self._c[symbol]

    def exchange_info(self):
        return [binance_market(s.split("/")[0], "USDT", 0.01, 0.001, int(self._c[s].ts[0]))
                for s in self.symbols]

    def describe(self):
        return {"source": "arrays", "symbols": self.symbols}


def candles(closes, *, opens=None, highs=None, lows=None, drop=()) -> Candles:
    c = np.asarray(closes, float)
    o = np.r_[c[0], c[:-1]] if opens is None else np.asarray(opens, float)
    h = np.maximum(o, c) + 0.05 if highs is None else np.asarray(highs, float)
    low = np.minimum(o, c) - 0.05 if lows is None else np.asarray(lows, float)
    keep = np.setdiff1d(np.arange(len(c)), drop)
    ts = T0 + np.arange(len(c), dtype=np.int64) * TF
    return Candles(ts[keep], o[keep], h[keep], low[keep], c[keep], np.full(len(keep), 1000.0))


SMA = {"name": "sma_cross", "sma_fast": 2, "sma_slow": 3, "allow_short": False}
DOWN_UP = [100, 99.5, 99, 98.5, 98, 97.5, 99.0]  # the fast SMA crosses up on the last


def crafted(tmp_path, market, **sections):
    cfg = Config().with_values(strategy=SMA, sim={"slippage_bps": 0.0, "taker_fee_pct": 0.1},
                               **sections)
    result = run_backtest(cfg, market, tmp_path / "bt.db")
    conn = sqlite3.connect(tmp_path / "bt.db")
    conn.row_factory = sqlite3.Row
    return result, conn


def test_decide_on_close_fill_at_next_open_with_fee(tmp_path):
    closes = DOWN_UP + [99.2, 99.3, 99.6, 99.8]
    opens = [100, 100, 99.5, 99, 98.5, 98, 97.5, 98.9, 99.0, 99.3, 99.6]  # a gap up at 7
    market = ArrayMarket({"AAA/USDT:USDT": candles(closes, opens=opens)})
    result, conn = crafted(tmp_path, market)
    signal = conn.execute("SELECT * FROM facts WHERE type = 'signal' AND side = 'long'").fetchone()
    assert json.loads(signal["data"])["candle_ts"] == T0 + 6 * TF  # decided on candle 6
    opened = conn.execute("SELECT * FROM facts WHERE type = 'position_opened'").fetchone()
    assert opened["ts"] == T0 + 7 * TF  # at its close, which is candle 7's open
    assert Decimal(opened["price"]) == Decimal("98.9")  # candle 7's open, not 6's close
    fill = conn.execute("SELECT * FROM facts WHERE type = 'fill'").fetchone()
    assert Decimal(fill["fee"]) == (Decimal(fill["amount"]) * Decimal("98.9")
                                    * Decimal("0.001")).quantize(Decimal("1e-8"))


def test_stop_and_new_high_in_one_candle_assume_the_worse(tmp_path):
    closes = DOWN_UP + [99.2, 99.5]
    highs = list(np.maximum(closes, [100, *closes[:-1]]) + 0.05)
    lows = list(np.minimum(closes, [100, *closes[:-1]]) - 0.05)
    highs[7], lows[7] = 104.0, 95.0  # +5 % (would arm the trail) and -3.5 % (the 2 % stop)
    market = ArrayMarket({"AAA/USDT:USDT": candles(closes, highs=highs, lows=lows)})
    result, conn = crafted(tmp_path, market)
    trades = result.trades
    assert len(trades) == 1
    t = trades[0]
    assert t["exit_reason"] == "stop_loss"
    entry = Decimal(t["entry_price"])
    assert Decimal(t["exit_price"]) == exits.stop_on_tick("long", entry * Decimal("0.98"),
                                                          Decimal("0.01"))
    assert Decimal(t["realized_pnl"]) < 0
    assert conn.execute("SELECT count(*) FROM facts WHERE type = 'best_price'").fetchone()[0] == 1


@pytest.mark.parametrize(("hole", "hours", "rotated"), [
    # candles opening 07:10 .. 07:30 missing in every symbol: no step 07:15 .. 07:35
    (range(70, 75), 3.0, ["01:25", "04:25", "07:40", "10:25"]),
    # 07:20 .. 09:00 missing: the late rotation (09:10) and the next (10:25) share the
    # epoch-aligned 09:00 slot, which labelled them: the second was taken as done
    (range(72, 93), 3.0, ["01:25", "04:25", "09:10", "10:25"]),
    # an interval that is no whole number of candles: at the first step on or after each
    # 6-minute mark (00:31 -> 00:35, 00:37 -> 00:40, 00:43 -> 00:45, 00:49 -> 00:50 ...)
    ((), 0.1, ["01:25", "01:35", "01:40", "01:45", "01:50", "01:55", "02:05"]),
])
def test_rotations_count_from_the_start_as_the_services_interval_trigger_does(
        tmp_path, hole, hours, rotated):
    """The service rotates at its start and every ``rotate_interval_h`` after it; the
    backtest rotated on epoch-aligned slots (01:25, then 03:00, 06:00 ...), ranking other
    24 h windows than the service would. A hole in every symbol over a due instant: one
    late rotation, and the next back on the start's grid (the trigger's times stay)."""
    shift = 16 * TF  # the first candle opens at 01:20: the first step is its close, 01:25

    def series(base):
        c = candles([base + 0.01 * i for i in range(12 * 12)], drop=hole)
        return Candles(c.ts + shift, c.o, c.h, c.low, c.c, c.v)

    market = ArrayMarket({"AAA/USDT:USDT": series(50), "BBB/USDT:USDT": series(60)})
    result, conn = crafted(tmp_path, market, rotation={"top_n": 1},
                           schedule={"rotate_interval_h": hours})
    got = [when_utc(ts)[11:] for (ts,) in conn.execute(
        "SELECT ts FROM facts WHERE type = 'rotation' ORDER BY seq")]
    assert got[:len(rotated)] == rotated
    if hours == 3.0:
        assert got == rotated
    else:  # one per 6-minute mark from 01:25 to 13:19, each at a step of its own
        assert len(got) == 120 and len(set(got)) == 120
    assert {tuple(json.loads(d)["coins"]) for (d,) in conn.execute(
        "SELECT data FROM facts WHERE type = 'rotation'")} == {("BBB/USDT:USDT",)}


def test_a_hole_in_the_candles(tmp_path):
    # BBB's signal candle 6 is followed by a hole: the order fills at its last close, and
    # no decision is taken on BBB until its last 4 candles are whole again.
    # (One candle more than decided: nothing is decided at the window's last close.)
    bbb = candles(DOWN_UP + [99.2, 99.3, 99.4, 99.5, 99.6, 99.7, 99.8, 99.9], drop=[7, 8])
    aaa = candles([50 + 0.01 * i for i in range(15)])
    market = ArrayMarket({"AAA/USDT:USDT": aaa, "BBB/USDT:USDT": bbb})
    result, conn = crafted(tmp_path, market)
    opened = conn.execute("SELECT * FROM facts WHERE type = 'position_opened' AND "
                          "symbol = 'BBB/USDT:USDT'").fetchone()
    assert opened["ts"] == T0 + 7 * TF and Decimal(opened["price"]) == Decimal("99.0")
    decided = [json.loads(r[0])["candle_ts"] for r in conn.execute(
        "SELECT data FROM facts WHERE type = 'signal' AND symbol = 'BBB/USDT:USDT'")]
    lookback = load_strategy(Config().with_values(strategy=SMA).strategy).warmup + 1
    first_after = T0 + (9 + lookback - 1) * TF  # the first candle whose lookback is whole
    assert all(ts <= T0 + 6 * TF or ts >= first_after for ts in decided)
    assert max(decided) >= first_after


def test_a_position_in_a_symbol_whose_candles_end_early_is_said(tmp_path):
    """Its position stays open, valued at the symbol's last close, unwatched: the
    backtest cannot know the candles will not resume, but the report can say so."""
    bbb = candles(DOWN_UP + [99.2, 99.3, 99.4])  # opened at candle 7, the last opens at 9
    aaa = candles([50 + 0.01 * i for i in range(15)])
    market = ArrayMarket({"AAA/USDT:USDT": aaa, "BBB/USDT:USDT": bbb})
    result, conn = crafted(tmp_path, market)
    assert [p["symbol"] for p in result.still_open] == ["BBB/USDT:USDT"]
    m = metrics(result)
    assert m["stale_marks"] == [{"symbol": "BBB/USDT:USDT", "valued_at": when_utc(T0 + 10 * TF)}]
    m.update(ledger="x.db")
    assert (f"stale mark    BBB/USDT:USDT still open, valued at its last close, "
            f"{when_utc(T0 + 10 * TF)} (it has no candle at the window's end)") in summary_text(m)
    (tmp_path / "whole").mkdir()  # the same position with candles to the end: not stale
    result, _ = crafted(tmp_path / "whole", ArrayMarket({
        "AAA/USDT:USDT": aaa, "BBB/USDT:USDT": candles(DOWN_UP + [99.2] * 8)}))
    assert [p["symbol"] for p in result.still_open] == ["BBB/USDT:USDT"]
    assert result.stale_marks == [] and "stale mark" not in summary_text(
        {**metrics(result), "ledger": "x.db"})


def test_a_stop_fired_after_a_hole_is_recorded_at_that_candles_close(tmp_path):
    """A stop that fired in a candle the scan does not decide on (a hole among the last
    candles it would rest on) was recorded only at the symbol's next decision: the
    position kept its slot (CCC's entry refused), and its close was dated late."""
    hole_then_drop = [99.2, 99.3, 99.4, 96.5, 96.4, 96.3, 96.2, 96.1, 96.0, 96.0]
    bbb = candles(DOWN_UP + hole_then_drop, drop=[9])  # candle 10 opens 99.4, low 96.45
    ccc = candles([100.0] * 5 + DOWN_UP + [99.2, 99.3, 99.4, 99.5, 99.6])  # signal at 11
    aaa = candles([50 + 0.01 * i for i in range(17)])
    market = ArrayMarket({"AAA/USDT:USDT": aaa, "BBB/USDT:USDT": bbb, "CCC/USDT:USDT": ccc})
    result, conn = crafted(tmp_path, market, risk={"max_open_positions": 1})
    closed = conn.execute("SELECT * FROM facts WHERE type = 'position_closed' AND "
                          "symbol = 'BBB/USDT:USDT'").fetchone()
    assert closed["reason"] == "stop_loss"
    assert closed["ts"] == T0 + 11 * TF  # candle 10's close (was 15: at its next decision)
    decision = conn.execute("SELECT reason FROM facts WHERE type = 'risk_decision' AND "
                            "symbol = 'CCC/USDT:USDT'").fetchone()
    assert decision["reason"] == "approved"
    assert [t["symbol"] for t in result.trades][:1] == ["BBB/USDT:USDT"]
    cfg = Config().with_values(strategy=SMA, sim={"slippage_bps": 0.0, "taker_fee_pct": 0.1},
                               risk={"max_open_positions": 1})
    run_backtest(cfg, market, tmp_path / "live.db", reference=True)
    assert acted(tmp_path / "bt.db") == acted(tmp_path / "live.db")


# -- no look-ahead: the future cannot change the past -------------------------------------------


class Cut(CsvMarket):
    """The real market as it was known at ``cut_ms``."""

    def __init__(self, base: CsvMarket, cut_ms: int) -> None:
        self.__dict__.update(base.__dict__)
        self._series = {s: c.slice(0, int(np.searchsorted(c.ts, cut_ms)))
                        for s, c in base._series.items()}


@needs_data
def test_no_look_ahead(real_market, tmp_path):
    cfg = config(strategy={"allow_short": True})
    s = parse_when("2018-01-20", "--from")
    cut = s + 18 * 3600_000
    full = run_backtest(cfg, real_market, tmp_path / "full.db", start_ms=s, end_ms=cut + 6 * 3600_000)
    known = run_backtest(cfg, Cut(real_market, cut), tmp_path / "known.db", start_ms=s)
    before = [r for r in acted(tmp_path / "full.db") if r[0] < cut]
    assert len(before) > 50
    assert before == [r for r in acted(tmp_path / "known.db") if r[0] < cut]
    assert len(full.trades) >= len(known.trades)


# -- pieces: data, client, ledger, signals -----------------------------------------------------


@needs_data
def test_signals_equal_decide_on_the_scan_frame(real_market):
    strategy = load_strategy(Config().strategy)
    data = MarketData(real_market, strategy)
    d = data.data["ADA/USDT:USDT"]
    # every candle with an entry signal and the one before it (a one-candle look-ahead
    # moves a signal there), and some without
    signals = [int(i) for i in np.flatnonzero(d.signal)]
    assert len(signals) > 10
    for i in sorted({30, 500, 1511, 1520, 3000, len(d.ts) - 1, *signals,
                     *(i - 1 for i in signals)}):
        now = int(d.ts[i]) + TF
        if not d.intact(now):
            continue
        a, b = d.window(now)
        df = scan_frame([d.candle(j) for j in range(a, b)])
        assert signal_of(strategy, d, i) == strategy.decide(df)
        closes = d.closes(now)
        assert np.array_equal(closes["ts"], df["ts"].to_numpy())
        assert np.array_equal(closes["close"], df["close"].to_numpy())


@needs_data
def test_tickers_from_memory_equal_the_clients(real_market):
    cfg = config()
    data = MarketData(real_market, load_strategy(cfg.strategy))
    clock = VirtualClock(int(data.grid[100]) + TF)
    venue = build_venue(cfg, real_market, clock)
    real = ExchangeClient(venue, cfg, clock, sleep=lambda s: None)
    fast = BacktestClient(real, data, clock)
    for k in sorted({100, 288, 1600, 5000, *range(101, len(data.grid), 97)}):
        clock.set(data.at(k))
        assert {s: t.quote_volume for s, t in fast.tickers().items()} == \
               {s: t.quote_volume for s, t in real.tickers().items()}
        assert fast.closed_candles("ETH/USDT:USDT", "5m", 30) == \
               real.closed_candles("ETH/USDT:USDT", "5m", 30)


def ledger_facts():
    facts = [Fact("note", 1000 + i, reason=f"n{i}", data={"i": i}) for i in range(25)]
    return facts + [Fact("order_intent", 2000, symbol="X/USDT:USDT", side="buy", amount="1",
                         client_order_id="c1", position_id="p1", data={"purpose": "stop"}),
                    Fact("position_changed", 2001, symbol="X/USDT:USDT", amount="1",
                         position_id="p1", pnl="0.5")]


def test_buffered_ledger_writes_what_the_ledger_writes(tmp_path):
    plain = Ledger(tmp_path / "plain.db")
    buffered = BufferedLedger(Ledger(tmp_path / "buf.db"), batch=7)
    assert buffered.first_ts() is None and plain.first_ts() is None
    for f in ledger_facts():
        plain.append([f])
        buffered.append([f])
    assert buffered.facts_for_order("c1") == plain.facts_for_order("c1")
    assert buffered.stop_intents("p1") == 1 and buffered.partial_exit_pnls("p1") == ["0.5"]
    assert buffered.state().to_dict() == plain.state().to_dict()
    assert buffered.first_ts() == plain.first_ts() == 1000
    buffered.close()
    rows = "SELECT * FROM facts ORDER BY seq"
    with sqlite3.connect(tmp_path / "plain.db") as a, sqlite3.connect(tmp_path / "buf.db") as b:
        assert a.execute(rows).fetchall() == b.execute(rows).fetchall()  # hashes too


def test_buffered_ledger_writes_a_batch_larger_than_its_own_whole(tmp_path):
    """One append of more facts than a batch holds: flushed in several commits, none lost."""
    plain = Ledger(tmp_path / "plain.db")
    buffered = BufferedLedger(Ledger(tmp_path / "buf.db"), batch=3)
    plain.append(ledger_facts())
    buffered.append(ledger_facts())
    buffered.close()
    plain.close()
    rows = "SELECT * FROM facts ORDER BY seq"
    with sqlite3.connect(tmp_path / "plain.db") as a, sqlite3.connect(tmp_path / "buf.db") as b:
        assert len(b.execute(rows).fetchall()) == len(ledger_facts())
        assert a.execute(rows).fetchall() == b.execute(rows).fetchall()


def test_a_state_the_buffered_ledger_gave_does_not_change_under_its_holder(tmp_path):
    buffered = BufferedLedger(Ledger(tmp_path / "buf.db"))
    sym = "X/USDT:USDT"
    buffered.append([Fact("position_opened", 1000, symbol=sym, side="long", amount="1",
                          price="100", position_id="p1")])
    held = buffered.state()
    before = held.to_dict()
    buffered.append([Fact("best_price", 2000, symbol=sym, price="105", position_id="p1"),
                     Fact("position_closed", 3000, symbol=sym, side="long", amount="1",
                          price="104", pnl="4", position_id="p1")])
    assert held.to_dict() == before  # the caller's copy, as it was
    assert buffered.state().positions == {}
    buffered.close()


@needs_data
def test_the_first_days_scans_leave_the_write_behind_ledger_unflushed(real_market, tmp_path):
    # Until a day is closed every scan asks the daily reset whether one ended, which
    # needs the first fact's time: answered from memory, not by flushing to SQL.
    s, e = parse_when("2018-01-15T02:00:00Z", "--from"), parse_when("2018-01-15T14:00:00Z",
                                                                     "--to")
    cfg = config()
    strategy = load_strategy(cfg.strategy)
    engine = Engine(cfg, strategy, MarketData(real_market, strategy), tmp_path / "bt.db", s, e)
    try:
        engine.run()
        assert engine.ledger.last_seq() > 200
        assert engine.ledger.written == 0
        assert engine.ledger.first_ts() == engine.data.at(engine.k0)
    finally:
        engine.close()


def test_buffered_ledger_keeps_in_step_with_checkpoints(tmp_path):
    buffered = BufferedLedger(Ledger(tmp_path / "buf.db", checkpoint_every=10), batch=7)
    for f in ledger_facts():
        buffered.append([f])
    buffered.flush()
    with Ledger(tmp_path / "buf.db", readonly=True) as reread:
        assert reread.verify().ok
        assert reread.select("SELECT count(*) AS n FROM facts WHERE type = 'checkpoint'")[0][
            "n"] >= 2
        assert buffered.facts_for_order("c1") == reread.facts_for_order("c1")
        assert buffered.state().to_dict() == reread.state().to_dict()
        assert buffered.state().to_dict() == reread.replay().to_dict()
    buffered.close()


# -- reports ----------------------------------------------------------------------------------


def test_drawdown_sharpe_sortino():
    eq = np.array([110.0, 99.0, 120.0, 90.0])
    assert drawdowns(eq, 100.0).tolist() == pytest.approx([0, 0.1, 0, 0.25])
    times = np.array([0, 1, 2, 3]) * 86_400_000 + 1
    r = daily_returns(times, eq, 100.0)
    assert r.tolist() == pytest.approx([0.1, -0.1, 120 / 99 - 1, -0.25])
    sharpe, sortino = sharpe_sortino(r)
    assert sharpe == pytest.approx(r.mean() / r.std(ddof=1) * 365 ** 0.5)
    assert sortino == pytest.approx(r.mean() / np.sqrt(np.mean(np.minimum(r, 0) ** 2))
                                    * 365 ** 0.5)
    assert sharpe_sortino(np.array([0.1])) == (None, None)


def test_metrics_of_a_hand_made_result():
    """Each figure, on numbers small enough to check by eye."""
    trades = [{"symbol": s, "realized_pnl": p, "fees": "0.1", "duration_s": 600,
               "exit_reason": "stop_loss"} for s, p in [("A", "2"), ("A", "-1"), ("B", "0")]]
    result = BacktestResult(
        db_path="x.db", config=Config(), strategy="momentum", params={}, symbols=["A", "B"],
        times=np.arange(1, 5) * TF, equity=np.array([90.0, 105.0, 102.9, 101.0]),
        open_positions=np.array([0, 1, 2, 0]), start_equity=100.0, trades=trades,
        still_open=[], stale_marks=[], fees=0.4, facts=10, elapsed_s=0.5)
    m = metrics(result)
    assert m["total_return"] == pytest.approx(0.01)
    assert m["max_drawdown"] == pytest.approx(0.1)  # from the start: 100 -> 90
    assert (m["wins"], m["win_rate"]) == (1, pytest.approx(1 / 3))  # a breakeven is no win
    assert m["profit_factor"] == pytest.approx(2.0)  # 2 won / 1 lost
    assert m["exposure"] == pytest.approx(0.5)  # 2 of 4 steps with a position open
    assert m["avg_open_positions"] == pytest.approx(0.75)
    assert (m["fees"], m["fees_closed_trades"]) == (0.4, pytest.approx(0.3))
    assert [(r["symbol"], r["trades"], r["pnl"]) for r in m["per_symbol"]] == [
        ("A", 2, 1.0), ("B", 1, 0.0)]
    m.update(ledger="x.db", first_decision="d0", last_decision="d1")
    assert "on 2 symbols," in summary_text(m) and "profit factor 2.00," in summary_text(m)
    # None twice over: no losing trade, or no trade at all
    one = metrics(dataclasses.replace(result, symbols=["A"], trades=trades[:1]))
    one.update(ledger="x.db", first_decision="d0", last_decision="d1")
    assert "on 1 symbol," in summary_text(one)
    assert "profit factor - (no losing trade)," in summary_text(one)
    none = metrics(dataclasses.replace(result, trades=[]))
    none.update(ledger="x.db", first_decision="d0", last_decision="d1")
    assert "(win rate -, profit factor -, 0 still open)" in summary_text(none)


def test_the_step_at_midnight_closes_the_day_before():
    day = 86_400_000
    closes = np.arange(1, 289) * TF  # one UTC day's 5 m candles, the last closing at 24:00
    eq = np.linspace(101.0, 99.0, 288)
    assert daily_returns(closes, eq, 100.0).tolist() == pytest.approx([-0.01])
    assert sharpe_sortino(daily_returns(closes, eq, 100.0)) == (None, None)
    two = np.r_[closes, closes + day]
    r = daily_returns(two, np.r_[eq, eq * 1.1], 100.0)
    assert r.tolist() == pytest.approx([-0.01, 0.1])
    # the ledger's day close where it has one; the window's last day at the final equity
    # (the venue's balance at its last instant values open positions after the window)
    recorded = {"1970-01-01": 98.0, "1970-01-02": 50.0}
    r = daily_returns(two, np.r_[eq, eq * 1.1], 100.0, recorded)
    assert r.tolist() == pytest.approx([-0.02, 99.0 * 1.1 / 98.0 - 1])


@needs_data
def test_sharpe_takes_each_days_close_from_the_ledger(real_market, tmp_path):
    """The ledger closes a day with the balance before the midnight step's orders; the
    report took the equity after them, moving those fees into the day before."""
    s, e = parse_when("2018-01-24", "--from"), parse_when("2018-01-27", "--to")
    result = run_backtest(config(), real_market, tmp_path / "bt.db", start_ms=s, end_ms=e)
    with sqlite3.connect(tmp_path / "bt.db") as conn:
        closes = conn.execute("SELECT ts, CAST(json_extract(data, '$.equity') AS REAL) FROM "
                              "facts WHERE type = 'day_close' ORDER BY seq").fetchall()
        at_midnight = conn.execute("SELECT count(*) FROM facts WHERE type = 'fill' "
                                   "AND ts % 86400000 = 0").fetchone()[0]
    assert len(closes) == 3 and at_midnight > 0
    after_orders = [float(result.equity[np.flatnonzero(result.times == ts)[0]])
                    for ts, _ in closes]
    assert after_orders != pytest.approx([eq for _, eq in closes], rel=1e-12, abs=0)
    # the last day closes at the report's final equity (open positions at the last closes)
    days = np.r_[result.start_equity, [eq for _, eq in closes[:-1]], result.equity[-1]]
    returns = np.diff(days) / days[:-1]
    sharpe, sortino = sharpe_sortino(returns)
    assert metrics(result)["sharpe"] == pytest.approx(sharpe, rel=1e-12)
    assert metrics(result)["sortino"] == pytest.approx(sortino, rel=1e-12)


def test_progress_bar_only_after_two_seconds():
    out = io.StringIO()
    bar = ProgressBar("backtest", out)
    bar(1, 10)
    assert out.getvalue() == ""  # a short run shows nothing
    bar.t0 -= 5
    bar(5, 10)
    bar(5, 10)  # not a terminal: one line per tenth
    bar(10, 10)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "50.0%" in lines[0] and "100.0%" in lines[1]


# -- the command line -------------------------------------------------------------------------


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


AT_EXIT = ("import atexit, runpy, sys, threading; "
           "atexit.register(lambda: print('teardown', file=sys.stderr)); "
           "threading.Timer(float(sys.argv.pop(1)), lambda: None).start(); "
           "sys.argv[0] = 'cli.py'; runpy.run_path('cli.py', run_name='__main__')")


def script(*args, other_thread_s=0.0, close_stdout=False):
    """cli.py run as the script, an atexit hook telling whether Python's teardown ran
    (and a timer thread running for ``other_thread_s``)."""
    return subprocess.run([sys.executable, "-c", AT_EXIT, str(other_thread_s),
                           *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, preexec_fn=(lambda: os.close(1)) if close_stdout
                          else None)


@needs_data
def test_the_backtest_script_ends_without_pythons_teardown(tmp_path):
    db = tmp_path / "bt.db"
    args = ("--db", db, "backtest", "--data", DATA, "--from", "2018-01-20", "--to",
            "2018-01-21", "--json")
    r = script(*args)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total_trades"] > 0  # all of it, flushed
    assert "teardown" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bt.db"]  # closed, nothing left
    assert invoke("--db", db, "verify").exit_code == 0
    # another thread still running: the normal exit, which waits for it
    r = script(*args, other_thread_s=4.0)  # outlasts the run
    assert r.returncode == 0 and json.loads(r.stdout)["total_trades"] > 0
    assert "teardown" in r.stderr
    # started with no stdout (sys.stdout is None): nothing to flush there
    r = script(*args, close_stdout=True)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    # other commands, and a refused backtest, exit as always
    r = script("--db", db, "verify")
    assert r.returncode == 0 and "teardown" in r.stderr
    r = script("--db", db, "backtest", "--data", tmp_path / "none")
    assert r.returncode == 2 and "teardown" in r.stderr and "no such folder" in r.stderr


@needs_data
def test_cli_backtest_end_to_end(tmp_path):
    db, chart = tmp_path / "bt.db", tmp_path / "chart.html"
    r = invoke("backtest", "--data", DATA, "--from", "2018-01-20", "--to", "2018-01-22",
               "--db", db, "--json", "--plot", chart)
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    for key in ("total_trades", "total_return", "max_drawdown", "elapsed_s", "sharpe",
                "sortino", "profit_factor", "exposure", "fees", "win_rate", "per_symbol"):
        assert key in m
    assert m["total_trades"] > 0 and m["elapsed_s"] > 0
    assert "<svg" in chart.read_text() and "Drawdown" in chart.read_text()
    assert invoke("--db", db, "verify").exit_code == 0
    trades = json.loads(invoke("--db", db, "trades", "--json").output)
    assert len(trades) == m["total_trades"]
    assert sum(float(t["realized_pnl"]) for t in trades) == pytest.approx(
        sum(r["pnl"] for r in m["per_symbol"]))
    assert invoke("--db", db, "pnl", "--by", "symbol").exit_code == 0
    # a window ending at midnight: "today" is its last day, not the day after it
    status = json.loads(invoke("--db", db, "status", "--json").output)
    with sqlite3.connect(db) as conn:
        last_day = conn.execute("SELECT pnl FROM facts WHERE type = 'position_closed' AND "
                                "ts >= ? AND ts < ?", (parse_when("2018-01-21", "--from"),
                                                       parse_when("2018-01-22", "--to"))
                                ).fetchall()
    assert last_day and Decimal(status["realized_today"]) == sum(Decimal(r[0])
                                                                 for r in last_day)
    # the dashboard judged it at its last fact, on the day after: 0 realized today
    board = Dashboard.open(db, Config(), VirtualClock(0))
    try:
        assert Decimal(board.summary()["realized_today"]) == Decimal(status["realized_today"])
    finally:
        board.close()
    svg = tmp_path / "chart.svg"
    text = invoke("backtest", "--data", DATA, "--from", "2018-01-20", "--to",
                  "2018-01-21T12:00Z", "--db", db, "--plot", svg).output  # replaces the earlier
    # status: a backtest's, judged at its end (it said "sim", and "today" by the wall clock)
    status = json.loads(invoke("--db", db, "status", "--json").output)
    with sqlite3.connect(db) as conn:
        realized = conn.execute("SELECT pnl FROM facts WHERE type = 'position_closed' AND "
                                "ts >= ?", (parse_when("2018-01-21", "--from"),)).fetchall()
    assert status["mode"] == "backtest" and realized
    assert Decimal(status["realized_today"]) == sum(Decimal(r[0]) for r in realized)
    assert "total return" in text and "max drawdown" in text and "symbol" in text
    assert svg.read_text().startswith("<svg")
    assert is_backtest_ledger(db)
    png = tmp_path / "chart.png"
    r = invoke("backtest", "--data", DATA, "--from", "2018-01-20", "--to", "2018-01-21",
               "--db", db, "--plot", png)
    assert r.exit_code == 0 and f"chart: {png}" in r.output, r.output
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (960, 560)  # width, height


@needs_data
@pytest.mark.parametrize(("to", "with_time"), [("2018-01-21", True), ("2018-01-24", False)])
def test_the_png_time_axis_shows_the_time_on_a_short_run(tmp_path, monkeypatch, to, with_time):
    """Every label of a one-day run's PNG read 2018-01-20 (the SVG and HTML switch)."""
    from matplotlib.figure import Figure

    labels, savefig = [], Figure.savefig

    def saving(fig, *args, **kwargs):
        savefig(fig, *args, **kwargs)  # draws: the labels are known after
        labels.extend(t.get_text() for t in fig.axes[1].get_xticklabels())

    monkeypatch.setattr(Figure, "savefig", saving)
    png = tmp_path / "chart.png"
    r = invoke("backtest", "--data", DATA, "--from", "2018-01-20", "--to", to, "--db",
               tmp_path / "bt.db", "--plot", png)
    assert r.exit_code == 0 and png.stat().st_size > 0
    assert len(set(labels)) >= 3 and all(x.startswith("2018-01-2") for x in labels), labels
    assert all((":" in x) == with_time for x in labels), labels


def test_cli_refuses_bad_input(tmp_path):
    """One line and exit 2, and nothing recorded is lost: neither a live ledger nor an
    earlier backtest's at --db (replaced only by a run that succeeds)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    live = tmp_path / "bot.db"
    with Ledger(live) as ledger:
        ledger.append([Fact("note", 1, reason="a live ledger")])
    data = DATA if DATA.is_dir() else empty
    earlier = tmp_path / "earlier.db"
    if data is DATA:
        ok = CliRunner().invoke(cli.main, ["backtest", "--data", str(data), "--db",
                                           str(earlier), "--from", "2018-01-20", "--to",
                                           "2018-01-20T06:00Z"])
        assert ok.exit_code == 0, ok.output
    else:
        with Ledger(earlier) as ledger:  # stands in for an earlier backtest's ledger
            ledger.append([Fact("note", 1, reason="backtest start",
                                data={"kind": BACKTEST_KIND})])
    with Ledger(earlier, readonly=True) as ledger:
        earlier_rows = ledger.last_seq()
    cases = [
        (["--data", tmp_path / "missing"], "no such folder"),
        (["--data", empty], "cannot use these candles"),
        (["--data", data, "--from", "2018-13-45"], "not a date"),
        (["--data", data, "--from", "2018-01-20", "--to", "2018-01-19"], "not after"),
        (["--data", data, "--strategy", "nope"], "unknown strategy"),
        (["--data", data, "--strategy", ""], "unknown strategy"),
        (["--data", data, "--db", live], "not a backtest"),
        (["--data", data, "--db", tmp_path / "new.db", "--plot", tmp_path / "c.jpg"],
         "write the chart as .png, .html or .svg"),
        (["--data", data, "--db", tmp_path / "new.db", "--plot", tmp_path / "no" / "c.png"],
         "does not exist"),
        (["--data", tmp_path / "missing", "--db", earlier], "no such folder"),
        # names the system cannot look up: tracebacks (OSError: File name too long)
        (["--data", tmp_path / ("d" * 300)], "File name too long"),
        (["--data", data, "--db", tmp_path / ("b" * 300)], "File name too long"),
        (["--data", data, "--db", tmp_path / ("b" * 250)],
         f"File name too long ({'b' * 250}.partial-journal is written beside it)"),
        (["--data", data, "--plot", tmp_path / ("c" * 300 + ".png")], "File name too long"),
        # written where the link points: checked there, before the run
        (["--data", data, "--db", tmp_path / "new.db", "--plot", tmp_path / "link.png"],
         f"folder {tmp_path / 'gone'} does not exist"),
        (["--data", data, "--db", tmp_path / "new.db", "--plot", tmp_path / "loop.png"],
         "Symlink loop"),
    ]
    (tmp_path / "link.png").symlink_to(tmp_path / "gone" / "chart.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    if data is DATA:
        cases.append((["--data", data, "--from", "2019-01-01", "--db", earlier], "no candles"))
    twice = tmp_path / "twice"
    twice.mkdir()
    (twice / "X_USDT-5m.csv").write_text("timestamp,open,high,low,close,volume\n"
                                         "1515542400000,1,1,1,1,1\n1515542400000,2,2,2,2,1\n")
    cases.append((["--data", twice], "given twice with different values"))
    seconds = tmp_path / "seconds"
    seconds.mkdir()
    (seconds / "X_USDT-5m.csv").write_text("timestamp,open,high,low,close,volume\n"
                                           "1515542400,1,1,1,1,1\n1515542700,1,1,1,1,1\n")
    cases.append((["--data", seconds, "--db", earlier], "seconds? they must be milliseconds"))
    blank = tmp_path / "blank"  # pandas' own words, naming no file
    blank.mkdir()
    (blank / "X_USDT-5m.csv").write_text("")
    cases.append((["--data", blank, "--db", earlier], "X_USDT-5m.csv: empty (no header row"))
    ragged = tmp_path / "ragged"
    ragged.mkdir()
    (ragged / "X_USDT-5m.csv").write_text("timestamp,open,high,low,close,volume\n"
                                          "1515542400000,1,1,1,1,1\n1515542700000,1,1,1,1,1,7,8\n")
    cases.append((["--data", ragged, "--db", earlier], "X_USDT-5m.csv: not a CSV file of candles"))
    for args, message in cases:
        r = CliRunner().invoke(cli.main, ["backtest", *map(str, args)])
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output, (args, r.output)
    with Ledger(live, readonly=True) as ledger:
        assert ledger.last_seq() == 1  # untouched
    with Ledger(earlier, readonly=True) as ledger:
        assert ledger.last_seq() == earlier_rows and ledger.verify().ok
    assert not (tmp_path / "new.db").exists() and not (tmp_path / "c.jpg").exists()
    assert not list(tmp_path.glob("*.partial*"))  # failed runs leave nothing behind


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def earlier_backtest(db: Path) -> str:
    r = invoke("backtest", "--data", DATA, "--db", db, "--from", "2018-01-20", "--to",
               "2018-01-20T06:00Z")
    assert r.exit_code == 0, r.output
    return sha(db)


@needs_data
def test_a_chart_that_cannot_be_written_keeps_the_earlier_ledger(tmp_path, monkeypatch):
    """The chart was written after the new ledger had replaced the earlier one: exit 2
    ("cannot write the chart") with the earlier ledger gone."""
    from core import report

    db, chart = tmp_path / "bt.db", tmp_path / "chart.html"
    before = earlier_backtest(db)
    write_chart = report.write_chart

    def disk_full(path, *args, **kwargs):
        write_chart(path, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(report, "write_chart", disk_full)
    r = invoke("backtest", "--data", DATA, "--to", "2018-01-12", "--db", db, "--plot", chart)
    assert r.exit_code == 2
    assert f"cannot write the chart (No space left on device); the ledger at {db} is as " \
           "it was" in r.output
    assert sha(db) == before and not leftovers(tmp_path) and not chart.exists()


def backtest_with_chart(folder: Path) -> tuple[Path, Path, tuple[str, str]]:
    """An earlier backtest's ledger and chart: (db, chart, their sha256s)."""
    db, chart = folder / "bt.db", folder / "chart.svg"
    r = invoke("backtest", "--data", DATA, "--from", "2018-01-20", "--to",
               "2018-01-20T06:00Z", "--db", db, "--plot", chart)
    assert r.exit_code == 0, r.output
    return db, chart, (sha(db), sha(chart))


@needs_data
def test_a_run_stopped_after_its_chart_keeps_the_earlier_chart_and_ledger(tmp_path,
                                                                          monkeypatch):
    """The chart was written in place before the ledger was: stopped in between (Ctrl-C,
    SIGTERM), the new chart stood beside the earlier ledger."""
    from core import report

    db, chart, before = backtest_with_chart(tmp_path)
    write_chart = report.write_chart

    def interrupted(*args, **kwargs):
        write_chart(*args, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C as the chart is written

    monkeypatch.setattr(report, "write_chart", interrupted)
    r = invoke("backtest", "--data", DATA, "--to", "2018-01-12", "--db", db, "--plot", chart)
    assert r.exit_code == 1 and "Aborted!" in r.output
    assert (sha(db), sha(chart)) == before and not leftovers(tmp_path)


@needs_data
def test_a_sigterm_as_the_ledger_is_replaced_waits_for_its_chart(tmp_path, monkeypatch):
    """Between the new ledger and its chart being put in place, a SIGTERM left the new
    ledger beside the earlier chart (and the new one, hidden, as a leftover)."""
    from core import backtest_run

    db, chart, before = backtest_with_chart(tmp_path)
    replace_db = backtest_run.replace_db

    def stopped_after(*args):
        replace_db(*args)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(backtest_run, "replace_db", stopped_after)
    r = invoke("backtest", "--data", DATA, "--to", "2018-01-12", "--db", db, "--plot", chart)
    assert r.exit_code == 128 + signal.SIGTERM
    assert sha(db) != before[0] and sha(chart) != before[1]  # both the new run's
    assert not leftovers(tmp_path)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM facts WHERE type = 'note' AND "
                            "json_extract(data, '$.kind') = 'backtest_end'").fetchone()[0] == 1


@needs_data
def test_the_chart_never_overwrites_a_ledger(tmp_path):
    """--plot naming the --db file, or an existing ledger (a symlink to the live one),
    wrote the chart over it, exit 0."""
    db, live, link = tmp_path / "run.svg", tmp_path / "bot.db", tmp_path / "chart.html"
    before = earlier_backtest(db)
    with Ledger(live) as ledger:
        ledger.append([Fact("note", 1, reason="a live ledger")])
    live_before = sha(live)
    link.symlink_to(live)
    new = tmp_path / "new.svg"
    for args, message in [(["--db", new, "--plot", new], "is the --db file"),
                          (["--db", new, "--plot", db], "is an SQLite database"),
                          (["--db", new, "--plot", link], "is an SQLite database")]:
        r = invoke("backtest", "--data", DATA, "--to", "2018-01-12", *args)
        assert r.exit_code == 2 and message in r.output, r.output
    assert sha(db) == before and sha(live) == live_before
    assert not new.exists()


@needs_data
def test_a_second_backtest_on_the_same_db_is_refused(tmp_path):
    """Two runs on one --db shared its partial file: one printed success for a ledger the
    other then replaced with a half-written one (and died with a traceback)."""
    db = tmp_path / "bt.db"
    before = earlier_backtest(db)
    running = LedgerLock(db)
    running.acquire()  # as a backtest (or the bot) writing it does
    try:
        r = invoke("backtest", "--data", DATA, "--db", db, "--to", "2018-01-12")
        assert r.exit_code == 2 and f"in use by process {os.getpid()}" in r.output, r.output
        assert sha(db) == before
    finally:
        running.release()
    assert invoke("backtest", "--data", DATA, "--db", db, "--to", "2018-01-12").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bt.db"]  # no lock file left


@needs_data
def test_only_a_backtests_file_in_the_partial_files_place_is_removed(tmp_path):
    db = tmp_path / "x.db"
    partial = tmp_path / "x.db.partial"
    with Ledger(partial) as ledger:
        ledger.append([Fact("note", 1, reason="someone's ledger")])
    kept = sha(partial)
    r = invoke("backtest", "--data", DATA, "--db", db, "--to", "2018-01-12")
    assert r.exit_code == 2 and "is not a backtest's ledger" in r.output, r.output
    assert sha(partial) == kept and not db.exists()
    partial.write_bytes(partial.read_bytes()[:1000])  # a damaged SQLite file: said, kept
    r = invoke("backtest", "--data", DATA, "--db", db, "--to", "2018-01-12")
    assert r.exit_code == 2 and "is not a backtest's ledger" in r.output, r.output
    assert partial.exists() and not db.exists()
    partial.unlink()
    # what a run killed while it made its ledger leaves there: WAL mode, no schema yet
    with sqlite3.connect(partial) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
    assert invoke("backtest", "--data", DATA, "--db", db, "--to", "2018-01-12").exit_code == 0
    assert not partial.exists() and is_backtest_ledger(db)
    earlier_backtest(partial)  # what a run killed later leaves there
    assert invoke("backtest", "--data", DATA, "--db", db, "--to", "2018-01-12").exit_code == 0
    assert not partial.exists() and is_backtest_ledger(db)


def test_an_empty_file_is_no_ledger_yet(tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()
    assert is_backtest_ledger(empty)  # nothing to lose: a backtest may write there
    r = CliRunner().invoke(cli.main, ["--db", str(empty), "status"])
    assert r.exit_code != 0 and "an empty file, no ledger yet" in r.output, r.output


@needs_data
@pytest.mark.slow
def test_a_stopped_or_killed_backtest_leaves_the_earlier_ledger(tmp_path):
    db = tmp_path / "bt.db"
    before = earlier_backtest(db)
    partial = tmp_path / "bt.db.partial"
    lock = tmp_path / "bt.db.lock"
    for sig, when, code in [(signal.SIGTERM, lock, 128 + signal.SIGTERM),  # loading candles
                            (signal.SIGTERM, partial, 128 + signal.SIGTERM),  # running
                            (signal.SIGKILL, partial, -signal.SIGKILL)]:
        run = subprocess.Popen([sys.executable, "cli.py", "--db", str(db), "backtest", "--data",
                                str(DATA)], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not when.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        if when == partial:
            time.sleep(0.3)  # under way
        run.send_signal(sig)
        assert run.wait(timeout=60) == code
        assert sha(db) == before
        if sig == signal.SIGTERM:  # ends as Ctrl-C does: nothing half-written is left
            assert not leftovers(tmp_path)
    assert partial.exists()  # SIGKILL leaves it; the next run removes it
    assert invoke("backtest", "--data", DATA, "--db", db, "--to", "2018-01-12").exit_code == 0
    assert not leftovers(tmp_path)


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial" in p.name or ".lock" in p.name]


def test_candles_left_out_of_a_csv_file_are_said_on_stderr(tmp_path):
    data = tmp_path / "candles"
    data.mkdir()
    rows = [f"{1515542400000 + i * 300_000},1.0,1.1,0.9,1.0,5" for i in range(40)]
    rows[7] = "1515544500000,1.0,0.5,0.9,1.0,5"  # high under its low
    (data / "X_USDT-5m.csv").write_text("timestamp,open,high,low,close,volume\n"
                                        + "\n".join(rows) + "\n")
    r = subprocess.run([sys.executable, "cli.py", "backtest", "--data", str(data), "--db",
                        str(tmp_path / "b.db"), "--json"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "X_USDT-5m.csv: 1 malformed candles left out" in r.stderr
    json.loads(r.stdout)  # stdout stays one JSON object


@needs_data
@pytest.mark.parametrize("command", [["backtest", "--db", "bt.db"],
                                     ["walkforward", "--train", "2d", "--test", "1d",
                                      "--grid", "grid.toml"]])
def test_the_test_only_crash_faults_are_refused(tmp_path, command):
    """A config with them (a sim crash test's) SIGKILLed the backtest at its first order:
    no output, the partial ledger and the lock left behind."""
    (tmp_path / "bot.toml").write_text("[faults]\ncrash_before_accept = 1.0\n")
    (tmp_path / "grid.toml").write_text("[strategy]\nsma_fast = [5, 10]\n")
    earlier = tmp_path / "bt.db"
    before = earlier_backtest(earlier)
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--config", "bot.toml",
                        *command, "--data", str(DATA), "--to", "2018-01-16"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert ("[faults] crash_before_accept: TEST ONLY faults that SIGKILL the process; a "
            "backtest refuses them") in r.stderr
    assert sha(earlier) == before and not leftovers(tmp_path)


@needs_data
def test_the_ledger_ends_at_the_reports_end_equity(tmp_path):
    """With positions open at the end, status and the dashboard showed the last balance
    snapshot (an earlier step's, its positions at older prices), not the report's end.
    The end's facts were dated at the last step acted on (12:00 here), not at the end."""
    db = tmp_path / "bt.db"
    m = json.loads(invoke("backtest", "--data", DATA, "--from", "2018-01-15", "--to",
                          "2018-01-19T13:00Z", "--db", db, "--json").output)
    assert m["open_at_end"] > 0
    status = json.loads(invoke("--db", db, "status", "--json").output)
    assert float(status["equity"]) == pytest.approx(m["end_equity"], abs=1e-8)
    assert "a backtest records no job runs" in invoke("--db", db, "status").output
    board = Dashboard.open(db, Config(), VirtualClock(0))
    try:
        assert float(board.summary()["equity"]) == pytest.approx(m["end_equity"], abs=1e-8)
    finally:
        board.close()
    with sqlite3.connect(db) as conn:
        [(valued,)] = conn.execute("SELECT json_extract(data, '$.valued_at') FROM facts "
                                   "WHERE type = 'balance' ORDER BY seq DESC LIMIT 1")
        end = conn.execute("SELECT DISTINCT ts FROM facts WHERE reason = 'backtest end'")
        assert [when_utc(ts) for (ts,) in end] == ["2018-01-19 13:00"]
    assert valued == "the window's last closes"


@needs_data
@pytest.mark.parametrize(("rule", "message"), [
    ("raise ZeroDivisionError('boom')", "strategy 'boom' failed on ADA/USDT:USDT's candles: "
                                        "ZeroDivisionError: boom"),
    ("return np.full(len(df), np.nan), np.full(len(df), 'r')",  # ran, with no trade
     "strategy 'boom': side nan at candle 0"),
])
def test_a_strategy_that_fails_is_named_and_the_earlier_ledger_kept(tmp_path, rule, message):
    """Its exception was a traceback, exit 1; a NaN side ran, no trade, exit 0."""
    r, db, before = backtest_with_module(
        tmp_path, "boom",
        "import numpy as np\nimport pandas as pd\nfrom core.strategies import Strategy\n\n\n"
        "class Boom(Strategy):\n    name = 'boom'\n    defaults = {}\n    warmup = 0\n\n"
        "    def indicators(self, df):\n        return pd.DataFrame(index=df.index)\n\n"
        f"    def rule(self, df, ind):\n        {rule}\n")
    assert r.exit_code == 2 and message in r.output, r.output
    assert sha(db) == before and not leftovers(tmp_path)


def backtest_with_module(tmp_path: Path, name: str, source: str):
    """``cli.py backtest`` of strategy ``name`` from a module of ``source``, over an
    earlier backtest's ledger: (result, the ledger, its digest before)."""
    (tmp_path / "mine.py").write_text(source)
    (tmp_path / "bot.toml").write_text(f'[strategy]\nname = "{name}"\n'
                                       f'module = "{tmp_path / "mine.py"}"\n')
    db = tmp_path / "bt.db"
    before = earlier_backtest(db)
    return invoke("--config", tmp_path / "bot.toml", "backtest", "--data", DATA, "--to",
                  "2018-01-12", "--db", db), db, before


PEEKING = """
import numpy as np
import pandas as pd
from core.strategies import Momentum, Strategy


class Peek(Strategy):
    name = "peek"
    defaults = {}
    warmup = 1

    def indicators(self, df):
        return pd.DataFrame({"next_close": df["close"].shift(-1)}, index=df.index)

    def rule(self, df, ind):
        up = (ind["next_close"] > df["close"] * 1.005).to_numpy()
        return np.where(up, 1, 0), np.where(up, "future_up", "none")


class Calm(Momentum):  # a user's strategy that decides as live does
    name = "calm"
"""


@needs_data
@pytest.mark.parametrize("name", ["peek", "calm"])
def test_a_users_strategy_that_looks_ahead_is_refused(tmp_path, name):
    """Signals are computed over all the candles at once: a rule reading the next close
    backtested +146 % with exit 0, though live (on the candles up to each) it never
    entered once."""
    r, db, before = backtest_with_module(tmp_path, name, PEEKING)
    if name == "calm":
        assert r.exit_code == 0, r.output
        return
    assert r.exit_code == 2, r.output
    assert re.search(r"strategy 'peek' decides long on [A-Z]+/USDT:USDT's candle at \S+ given "
                     r"all the candles, but none given those a live scan fetches \(the last "
                     r"250 up to it\): it looks at later candles", r.output), r.output
    assert sha(db) == before and not leftovers(tmp_path)


@needs_data
def test_fees_of_positions_still_open_are_told_apart_from_the_closed_trades(tmp_path):
    """The summary's fees count every fill; the per-symbol table only closed trades: the
    difference, paid to open the positions still open at the end, is said, not hidden."""
    db = tmp_path / "bt.db"
    r = invoke("backtest", "--data", DATA, "--from", "2018-01-12", "--to", "2018-01-14",
               "--db", db, "--json")
    m = json.loads(r.output)
    assert m["open_at_end"] > 0
    with sqlite3.connect(db) as conn:
        [(opening,)] = conn.execute(
            "SELECT sum(CAST(fee AS REAL)) FROM facts WHERE type = 'fill' AND client_order_id IN "
            "(SELECT position_id FROM open_positions)").fetchall()
    assert sum(row["fees"] for row in m["per_symbol"]) == pytest.approx(m["fees_closed_trades"])
    assert m["fees"] == pytest.approx(m["fees_closed_trades"] + opening)
    text = invoke("backtest", "--data", DATA, "--from", "2018-01-12", "--to", "2018-01-14",
                  "--db", db).output
    assert (f"in the closed trades below, {opening:,.4f} opening the {m['open_at_end']} "
            "still open") in text and "closed trades by symbol:" in text


@needs_data
@pytest.mark.parametrize("reference", [False, True])
def test_a_stop_fired_in_the_windows_last_candle_is_recorded(tmp_path, reference):
    """Nothing is decided at the window's end, but the venue's stop fired inside its last
    candle: the close is recorded, and the end equity counts the loss once (the wallet
    paid it; the position was also valued at the last close on top of it)."""
    closes = DOWN_UP + [99.2, 99.3, 99.0]
    lows = list(np.minimum(closes, [100, *closes[:-1]]) - 0.05)
    lows[-1] = 95.0  # through the 2 % stop, in the last candle
    market = ArrayMarket({"AAA/USDT:USDT": candles(closes, lows=lows)})
    cfg = Config().with_values(strategy=SMA, sim={"slippage_bps": 0.0, "taker_fee_pct": 0.1})
    result = run_backtest(cfg, market, tmp_path / "bt.db", reference=reference)
    assert [t["exit_reason"] for t in result.trades] == ["stop_loss"]
    assert result.still_open == []
    pnl = Decimal(result.trades[0]["realized_pnl"])
    assert pnl < 0
    assert result.equity[-1] == pytest.approx(result.start_equity + float(pnl), abs=1e-9)
    assert metrics(result)["open_at_end"] == 0


def test_nothing_is_decided_at_the_windows_last_close(tmp_path):
    """An order decided at the close of a window's last candle would fill at the next
    open, after the window: it is not sent. (Decided one candle earlier, it is.)"""
    cfg = Config()
    start, end = parse_when("2018-01-10T04:05Z", "--from"), parse_when("2018-01-11T04:05Z", "--to")
    intents = {}
    for n, upto in enumerate((end, end + 300_000)):
        run_backtest(cfg, CsvMarket(DATA), tmp_path / f"w{n}.db", start_ms=start, end_ms=upto)
        with sqlite3.connect(tmp_path / f"w{n}.db") as conn:
            intents[upto] = [ts for (ts,) in conn.execute(
                "SELECT ts FROM facts WHERE type = 'order_intent'")]
    assert max(intents[end]) < end
    assert end in intents[end + 300_000]  # the longer window does decide at that instant


@needs_data
def test_a_window_gives_one_answer_whatever_candles_lie_after_it(tmp_path):
    """Walk-forward backtests a window on candles prepared for the whole file; `backtest
    --to` on candles cut at the window's end. Positions open at the end are valued at the
    window's last closes, never at the open after it: the same result both ways."""
    cfg = Config().with_values(strategy={"min_body_pct": 0.9}, exits={"trailing_stop_pct": 0.8})
    source = CsvMarket(DATA)
    start, end = 1_516_251_300_000, 1_516_510_500_000
    whole = MarketData(source, load_strategy(cfg.strategy), limit=cfg.strategy.candles)
    a = run_backtest(cfg, source, tmp_path / "a.db", start_ms=start, end_ms=end, data=whole)
    b = run_backtest(cfg, source, tmp_path / "b.db", start_ms=start, end_ms=end)
    assert a.still_open  # the case that differed: a position open at the end
    assert metrics(a)["end_equity"] == metrics(b)["end_equity"]
    assert list(a.equity) == list(b.equity)
