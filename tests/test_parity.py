"""Parity: the simulated service and the backtester send the same orders and get the same fills.

One side is the real service: ``scheduler.Service`` (APScheduler's BlockingScheduler, its
interval triggers and the default intervals: scan 10 s, reconcile 5 min, daily-reset poll
5 min, rotation 3 h, all bot time) in ``sim`` mode on an ``AcceleratedClock``, the
simulated exchange replaying a folder of CSV candles (built by ``runtime.build`` ->
``venues.for_mode``, as ``cli.py run`` builds it). The other is ``run_backtest`` over the
same folder, window and config. Their ledgers must hold the same orders (purpose, side,
amount, trigger price, venue order id, every state), the same fills (amount, price, fee,
venue trade id) and the same positions opened and closed - equal, not approximately.
Times are not compared: the service acts some bot-seconds after a candle closes, the
backtest at the close itself.

Exact parity holds on a market shaped for it; on real candles two differences of the
simulated venue show (both by its design, neither a backtest error):

* The backtest fills a market order at the open of the next candle. The service's order
  reaches the venue ``delta`` after the close (the scan's phase in its interval plus its
  run time, times the speed: 10-30 bot-s at speed 400), when the venue's price is the
  forming candle walked from its open towards its close (``sim_market.partial``), rounded
  to the tick. That is the open only while ``|close - open| * delta / timeframe`` stays
  under half a tick; so here bodies are at most ``MAX_BODY`` ticks, which allows ``delta``
  up to ``MAX_DELAY_MS``, and the test checks that every decision kept to it.
* A stop placed inside a candle only sees that candle's move from its placing price to
  its close (``SimExchange._hit``); placed at the open (the backtest) it sees the whole
  candle. The candles here have no wicks, so both see the same range.
* (From the first.) The service values the account at every scan, mid-candle too, so it
  records equity peaks the backtest (valuing at candle opens) never sees, and judges the
  drawdown and daily-loss limits from them. The peaks are therefore not compared; the
  limits here are far from any equity this market reaches, and the halts (none) and
  rotations (their coins, and their times within the decisions' delay) are.

Two settings keep decisions away from instants that jitter could put on either side: the
cooldown (32 min) is not a whole number of candles (it runs from the exit's bot time),
and ``top_n`` covers every symbol, so rotations (at start-up and every 3 h after, in the
service some bot-seconds after the backtest's step) always choose the same coins. The market
is also checked against the one race the periodic reconcile could win
(``stop_fills_meeting_an_entry_signal``).

Deterministic on a slow machine: a run is only compared if every candle of every symbol
was decided exactly once and every scan that decided had finished within ``MAX_DELAY_MS``
(bot time) of the close; otherwise the service runs again, slower.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import defaultdict
from contextlib import closing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import scheduler
from core import runtime
from core.backtest import run_backtest
from core.clock import AcceleratedClock
from core.config import Config
from core.sim_market import CsvMarket
from core.strategies import load_strategy

TF = 300_000  # 5-minute candles
T0 = 1_709_256_300_000  # 2024-03-01T01:25Z: the service's clock starts here, off the 3 h slots
WINDOW = 36  # candles decided after T0 (3 hours); the first decision is on the one before
END = T0 + WINDOW * TF  # the close of the last candle decided
HISTORY = 300  # candles before T0 (the scan fetches 250)
SYMBOLS = ("AAA", "BBB", "CCC")
SEED = 210  # a market with long and short entries, stop moves, stop fills and a market exit
MAX_BODY = 2  # ticks (the tick is 1: prices are whole numbers around 200)
MAX_DELAY_MS = TF // (2 * MAX_BODY)  # how late a decision may act and still fill at the open
ROTATE_MS = 3 * 3_600_000  # the default rotate_interval_h
SPEEDS = (400.0, 200.0)  # bot seconds per wall second; the second if the first was too fast


def write_market(folder: Path, seed: int = SEED) -> Path:
    """Seeded 5 m candles for SYMBOLS: trends and pauses, now and then a candle of
    ``MAX_BODY`` ticks on two to four times the usual volume (momentum entries), rare
    one-tick gaps at the open; no wicks (high and low are the open and the close)."""
    folder.mkdir(parents=True, exist_ok=True)
    for j, base in enumerate(SYMBOLS):
        rng = np.random.default_rng([seed, j])
        price, trend, lines = 200 + 10 * j, 0, ["timestamp,open,high,low,close,volume"]
        for i in range(HISTORY + WINDOW + 20):
            if rng.random() < 0.1:
                trend = int(rng.choice([-1, 0, 1]))
            o = price + (int(rng.choice([-1, 1])) if rng.random() < 0.02 else 0)
            if rng.random() < 0.08:
                body = MAX_BODY * (trend or int(rng.choice([-1, 1])))
                volume = 1000 * rng.uniform(2.0, 4.0)
            else:
                body = int(np.clip(round(rng.normal(0.5 * trend, 0.8)), -MAX_BODY, MAX_BODY))
                volume = 1000 * rng.lognormal(0, 0.25)
            c = o + body
            ts = T0 + (i - HISTORY) * TF
            lines.append(f"{ts},{o},{max(o, c)},{min(o, c)},{c},{volume:.1f}")
            price = c
        (folder / f"{base}_USDT-5m.csv").write_text("\n".join(lines) + "\n")
    return folder


def config(data_dir: Path, state_path: Path, speed: float) -> Config:
    return Config().with_values(
        sim={"source": "csv", "data_dir": str(data_dir), "speed": speed,
             "state_path": str(state_path)},
        rotation={"top_n": len(SYMBOLS)},
        risk={"cooldown_minutes": 32},
        # a whole tick is 0.5 % here: a trail of 0.5 % would round onto the price
        exits={"stop_loss_pct": 3.0, "trailing_stop_pct": 1.0})


def run_service(cfg: Config, db: Path, speed: float) -> None:
    """The service from T0 until half a candle after END (bot time), then a clean stop."""
    clock = AcceleratedClock(T0, speed)
    rt = runtime.build(cfg, db, clock=clock)
    service = scheduler.Service(rt)
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(service.run()), name="service")
    thread.start()
    try:
        while clock.now_ms() < END + TF // 2 and thread.is_alive():
            time.sleep(0.01)
    finally:
        service.request_stop()
        thread.join(60)
        rt.close()
    assert code == [0] and not thread.is_alive()


def rows(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(sql, params).fetchall()


def timing_problems(db: Path) -> list[str]:
    """Why this service run cannot be compared with the backtest (empty: it can)."""
    decided = defaultdict(int)
    problems = []
    runs = defaultdict(list)
    for run_id, symbol, candle_ts in rows(db, "SELECT run_id, symbol, json_extract(data, "
                                              "'$.candle_ts') FROM facts WHERE type = 'signal'"):
        decided[(symbol, candle_ts)] += 1
        runs[run_id].append(candle_ts)
    wanted = {(f"{s}/USDT:USDT", T0 - TF + k * TF) for s in SYMBOLS for k in range(WINDOW + 1)}
    missing, extra = sorted(wanted - set(decided)), sorted(set(decided) - wanted)
    if missing or extra:
        problems.append(f"candles not decided: {missing[:3]}; decided beyond the window: "
                        f"{extra[:3]}")
    problems += [f"{key} decided {n} times" for key, n in decided.items() if n != 1]
    for run_id, candles in runs.items():
        last = rows(db, "SELECT max(ts) FROM facts WHERE run_id = ?", (run_id,))[0][0]
        late = last - (max(candles) + TF)
        if late >= MAX_DELAY_MS:
            problems.append(f"{run_id} acted {late / 1000:.1f} bot-s after the close")
    for j, (ts, _) in enumerate(rotations(db)):  # the interval counts from a slow start
        late = ts - (T0 + j * ROTATE_MS)
        if MAX_DELAY_MS <= late < TF:
            problems.append(f"rotation {j} {late / 1000:.1f} bot-s after its time")
    return problems


def orders(db: Path) -> dict[str, tuple]:
    """Every order: its intent, its states, its fills, keyed by what decided it (entries
    and exits by their client id, which holds the decision's candle; stops by position
    and number, since a stop's id holds the position's opening time on the bot clock)."""
    keys: dict[str, str] = {}
    stops: dict[str, int] = defaultdict(int)
    out: dict[str, list] = {}
    for (kind, symbol, side, amount, price, fee, pid, coid, eid, purpose, state,
         trade) in rows(db, "SELECT type, symbol, side, amount, price, fee, position_id, "
                            "client_order_id, exchange_order_id, json_extract(data, '$.purpose'),"
                            " json_extract(data, '$.state'), json_extract(data, '$.trade_id') "
                            "FROM facts WHERE type IN ('order_intent', 'order_update', 'fill') "
                            "ORDER BY seq"):
        if kind == "order_intent":
            if purpose == "stop":
                stops[pid] += 1
                keys[coid] = f"{pid} stop {stops[pid]}"
            else:
                keys[coid] = coid
            out[keys[coid]] = [(purpose, symbol, side, amount, price, pid), [], []]
        elif kind == "order_update":
            out[keys[coid]][1].append((state, eid))
        else:
            out[keys[coid]][2].append((side, amount, price, fee, eid, trade))
    return {k: (intent, tuple(states), tuple(fills)) for k, (intent, states, fills) in out.items()}


def trades(db: Path) -> list[tuple]:
    return rows(db, "SELECT position_id, symbol, side, amount, entry_price, exit_price, fees, "
                    "realized_pnl, exit_reason FROM closed_trades ORDER BY position_id")


def rotations(db: Path) -> list[tuple]:
    return rows(db, "SELECT ts, json_extract(data, '$.coins') FROM facts "
                    "WHERE type = 'rotation' ORDER BY seq")


def halts(db: Path) -> list[tuple]:
    return rows(db, "SELECT type, reason FROM facts WHERE type IN ('halt', 'resume') "
                    "ORDER BY seq")


def still_open(db: Path) -> list[tuple]:
    return rows(db, "SELECT position_id, symbol, side, amount, entry_price, stop_price "
                    "FROM open_positions ORDER BY position_id")


def stop_fills_meeting_an_entry_signal(db: Path, data: Path, cfg: Config) -> list[str]:
    """The periodic reconcile may record a stop's fill before the scan of the candle it
    filled in. The scan then finds the symbol flat and may enter on that candle, where
    (finding the position still open) it would only have recorded the close. On this
    market no stop fills in a candle with an entry signal, so that race cannot matter."""
    strategy = load_strategy(cfg.strategy)
    clash = []
    for symbol, filled_at in rows(db, "SELECT f.symbol, json_extract(f.data, '$.exchange_ts') "
                                      "FROM facts f JOIN facts i ON i.type = 'order_intent' "
                                      "AND i.client_order_id = f.client_order_id WHERE "
                                      "f.type = 'fill' AND json_extract(i.data, '$.purpose') "
                                      "= 'stop'"):
        candles = pd.read_csv(data / f"{symbol.split('/')[0]}_USDT-5m.csv")
        signals = strategy.signals(candles.rename(columns={"timestamp": "ts"}))
        at = candles.index[candles["timestamp"] == filled_at - filled_at % TF][0]
        if signals["signal"].iloc[at] != 0:
            clash.append(f"{symbol} {filled_at}")
    return clash


@pytest.mark.slow
def test_the_service_and_the_backtest_send_the_same_orders_and_get_the_same_fills(tmp_path):
    data = write_market(tmp_path / "candles")
    cfg = config(data, tmp_path / "sim_exchange.db", SPEEDS[0])  # the backtest's venue is
    backtest = tmp_path / "backtest.db"  # in memory: it writes no state file
    # A window decides up to the close before its last one (an order at its end would fill
    # after it): one candle more, to decide up to END as the service does.
    run_backtest(cfg, CsvMarket(data), backtest, start_ms=T0 - TF, end_ms=END + TF)
    assert stop_fills_meeting_an_entry_signal(backtest, data, cfg) == []
    expected = orders(backtest)
    purposes = {intent[0] for intent, _, _ in expected.values()}
    sides = {intent[2] for intent, _, _ in expected.values() if intent[0] == "entry"}
    states = {s for _, st, _ in expected.values() for s, _ in st}
    assert purposes == {"entry", "stop", "exit"} and sides == {"buy", "sell"}
    assert {"filled", "cancelled", "rejected", "accepted"} <= states
    assert sum(len(fills) for _, _, fills in expected.values()) >= 8
    assert any(intent[0] == "stop" and fills for intent, _, fills in expected.values())
    assert len(trades(backtest)) >= 3

    for n, speed in enumerate(SPEEDS):
        folder = tmp_path / f"service_{n}"
        folder.mkdir()
        service = folder / "bot.db"
        run_service(config(data, folder / "sim_exchange.db", speed), service, speed)
        problems = timing_problems(service)
        if not problems:
            break
    else:
        pytest.fail("the machine could not keep up with the service even at speed "
                    f"{SPEEDS[-1]}: " + "; ".join(problems[:5]))

    got = orders(service)
    assert sorted(got) == sorted(expected)
    for key in sorted(expected):
        assert got[key] == expected[key], key
    assert trades(service) == trades(backtest)
    assert still_open(service) == still_open(backtest)
    # rotations at the start and 3 h after it (T0 is off the 3 h slots): the service's
    # some bot-seconds later, as its scans
    expected_rotations = rotations(backtest)
    assert [ts for ts, _ in expected_rotations] == [T0, T0 + ROTATE_MS]
    got_rotations = rotations(service)
    assert [coins for _, coins in got_rotations] == [coins for _, coins in expected_rotations]
    assert all(0 <= got - ts < MAX_DELAY_MS
               for (got, _), (ts, _) in zip(got_rotations, expected_rotations, strict=True))
    assert halts(service) == halts(backtest)


def test_a_candle_closing_during_a_scan_waits_for_the_next_scan_for_every_symbol(tmp_path):
    """A scan takes the candles closed at its start, for every symbol. Here candle 0
    closes right after the venue answered AAA's fetch, before BBB's: it is decided for
    neither (else AAA's candle 0, still forming in that answer, would pass for closed, and
    BBB's too), then complete for both in the next scan, in symbol order - as the
    backtest decides one candle's symbols in one step."""
    from test_jobs_scan import AAA, BBB, Pick, flat, make_bot
    from test_jobs_scan import T0 as START
    from test_jobs_scan import TF as FIVE_MIN

    bot = make_bot(tmp_path, strat=Pick(long_at=[START]),
                   paths={"AAA": flat(100, 5), "BBB": flat(100, 5)})
    try:
        bot.set_coins([AAA, BBB])
        assert bot.job("scan")["outcome"] == "ok"  # decides candle -1 at T0 + 1 s
        bot.at(START + FIVE_MIN - 1_000)  # one second before candle 0 closes
        fetch, fetched = bot.venue.fetch_ohlcv, []

        def fetch_while_time_passes(symbol, *args, **kwargs):
            rows = fetch(symbol, *args, **kwargs)
            fetched.append(symbol)
            if len(fetched) == 1:  # AAA's candles are in; candle 0 closes now
                bot.clock.set(START + FIVE_MIN + 1_000)
            return rows

        bot.venue.fetch_ohlcv = fetch_while_time_passes
        straddling = bot.job("scan")
        bot.venue.fetch_ohlcv = fetch
        assert fetched == [AAA, BBB] and straddling["outcome"] == "ok"
        assert straddling["summary"]["new_candles"] == 0
        assert not bot.facts("signal", run_id=f"scan-{straddling['started_ms']}")
        assert bot.ledger.state().positions == {}

        bot.at(START + FIVE_MIN + 11_000)  # the next scan
        after = bot.job("scan")
        decided = [(f["symbol"], f["run_id"]) for f in bot.facts("signal")
                   if json.loads(f["data"])["candle_ts"] == START]
        run_id = f"scan-{START + FIVE_MIN + 11_000}"
        assert decided == [(AAA, run_id), (BBB, run_id)], decided
        assert after["summary"]["entries"] == 2
        assert [f["symbol"] for f in bot.facts("order_intent")
                if json.loads(f["data"])["purpose"] == "entry"] == [AAA, BBB]
    finally:
        bot.close()
