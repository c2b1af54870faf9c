"""The simulated exchange's state file outlives the process that uses it (SIGKILL included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from decimal import Decimal

import numpy as np
import pytest
from sim_fixtures import DAY, REPO, T0, TF, make_sim, qty_for, synthetic

from core import config as cfg
from core.clock import VirtualClock
from core.sim_exchange import SimExchange

CHILD = """
import sys
from core import config as cfg
from core.clock import VirtualClock
from core.sim_exchange import SimExchange

path, t0 = sys.argv[1], int(sys.argv[2])
ex = SimExchange.from_config(cfg.load(), VirtualClock(t0), path)
s = ex.symbols[0]
last = ex.fetch_ticker(s)["last"]
q = ex.amount_to_precision(s, 500 / last)
ex.create_order(s, "market", "buy", q, params={"clientOrderId": "entry-1"})
ex.create_order(s, "market", "sell", q, params={"triggerPrice": last * 0.995,
                                                "reduceOnly": True, "clientOrderId": "stop-1"})
print("READY", flush=True)
i = 0
while True:  # keep the venue writing, so the kill lands in the middle of its work
    o = ex.create_order(s, "limit", "buy", q, last * 0.5, params={"clientOrderId": f"l{i}"})
    ex.cancel_order(o["id"], s)
    i += 1
"""


def wallet_matches_trades(ex: SimExchange) -> bool:
    total = Decimal("10000")
    for s in ex.symbols:
        for t in ex.fetch_my_trades(s, since=T0):
            total += Decimal(t["info"]["realizedPnl"]) - Decimal(t["info"]["commission"])
    return Decimal(ex.fetch_balance()["info"]["totalWalletBalance"]) == total


@pytest.mark.slow
def test_state_survives_sigkill_and_stops_keep_triggering(tmp_path):
    path = tmp_path / "sim_exchange.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(T0)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
        time.sleep(0.3)  # hundreds of create/cancel transactions in flight
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    clock = VirtualClock(T0)
    ex = SimExchange.from_config(cfg.load(), clock, path)  # a new process would do the same
    s = ex.symbols[0]
    (pos,) = ex.fetch_positions()
    (stop,) = ex.fetch_open_orders(s, params={"trigger": True})
    assert pos["side"] == "long" and stop["clientOrderId"] == "stop-1"
    assert stop["amount"] == pos["contracts"]
    ex.options["fetchOpenOrders"]["warnWithoutSymbol"] = False
    assert len(ex.fetch_open_orders()) <= 1  # killed between a create and its cancel, or not
    assert wallet_matches_trades(ex)

    # The exchange lives on: when time moves, the stop triggers where the candles say.
    trigger = stop["triggerPrice"]
    c = ex.source.candles(s, T0, T0 + 30 * DAY)
    k = int(np.flatnonzero(c.low <= trigger)[0])
    gap = c.o[k] <= trigger
    clock.set(int(c.ts[k]) + TF)
    assert ex.fetch_positions() == []
    last = ex.fetch_my_trades(s, since=T0)[-1]
    assert last["timestamp"] == (int(c.ts[k]) if gap else int(c.ts[k]) + TF - 1)
    assert last["price"] <= trigger and last["side"] == "sell"
    done = ex.fetch_order(None, s, params={"trigger": True, "clientOrderId": "stop-1"})
    assert done["status"] == "closed"
    assert wallet_matches_trades(ex)


def test_two_instances_on_one_file_see_each_other(tmp_path):
    path = tmp_path / "venue.db"
    a, clock = make_sim(state_path=path)
    b, _ = make_sim(state_path=path, clock=clock)
    s = a.symbols[0]
    a.create_order(s, "market", "buy", qty_for(a, s, 200), params={"clientOrderId": "A"})
    assert b.fetch_positions()[0]["contracts"] == a.fetch_positions()[0]["contracts"]
    b.set_leverage(2, s)
    assert a.fetch_balance()["USDT"]["used"] == pytest.approx(b.fetch_balance()["USDT"]["used"])
    assert b.fetch_order(None, s, params={"clientOrderId": "A"})["status"] == "closed"


def test_reopening_keeps_its_market_and_clock_position(tmp_path):
    path = tmp_path / "venue.db"
    config = cfg.load()
    clock = VirtualClock(T0)
    first = SimExchange.from_config(config, clock, path)
    clock.set(T0 + 5 * TF + 7)
    first.fetch_time()
    first.close()
    assert SimExchange.stored_now_ms(path) == T0 + 5 * TF + 7
    other_seed = config.with_values(sim={"seed": 99})
    again = SimExchange.from_config(other_seed, VirtualClock(T0), path)  # a clock behind
    assert again.source.seed == config.sim.seed  # the file's market wins
    assert again.fetch_time() == T0 + 5 * TF + 7  # venue time never runs backwards
    with pytest.raises(ValueError, match="belongs to the market"):
        SimExchange(synthetic(seed=5), VirtualClock(T0), state_path=path)
    paper = config.with_values(sim={"source": "live"})
    with pytest.raises(ValueError, match="holds a synthetic market"):
        SimExchange.from_config(paper, VirtualClock(T0), path)


def test_in_memory_venues_are_independent():
    a, _ = make_sim()
    b, _ = make_sim()
    s = a.symbols[0]
    a.create_order(s, "market", "buy", qty_for(a, s, 200))
    assert b.fetch_positions() == [] and a.store.path is None


def csv_config(data_dir, state_path) -> cfg.Config:
    return cfg.Config().with_values(sim={"source": "csv", "data_dir": str(data_dir),
                                         "state_path": str(state_path)})


def test_a_fresh_csv_market_starts_its_clock_at_the_data(tmp_path):
    """It started at the wall clock: every recorded candle in the past, every symbol flat
    at its last close, nothing ever traded."""
    from sim_fixtures import csv_market, flat

    from core import venues

    market = csv_market(tmp_path, {"AAA": flat(100.0, 600), "BBB": flat(50.0, 600)})
    config = csv_config(tmp_path, tmp_path / "sim.db")
    clock, venue, _ = venues.for_mode(config)
    try:
        start = market.start_ms + config.strategy.candles * TF  # the strategy's window closed
        assert start <= clock.now_ms() < start + 60_000
        assert venue.fetch_ticker("AAA/USDT:USDT")["last"] == 100.0
    finally:
        venue.close()


def test_a_held_symbol_gone_from_the_csv_folder_is_refused(tmp_path):
    """A renamed file left its position unmanaged: every reconcile a KeyError, its stop
    never checked."""
    from sim_fixtures import csv_market, flat

    csv_market(tmp_path, {"AAA": flat(100.0, 600), "BBB": flat(50.0, 600)})
    state = tmp_path / "sim.db"
    config = csv_config(tmp_path, state)
    venue = SimExchange.from_config(config, VirtualClock(T0), state)
    venue.create_order("BBB/USDT:USDT", "market", "buy", 2)
    venue.close()
    (tmp_path / "BBB_USDT-5m.csv").rename(tmp_path / "BBB-USDT-5m.csv")
    with pytest.raises(ValueError, match=r"holds positions or orders in BBB/USDT:USDT, which "
                                         r"its market .* no longer has"):
        SimExchange.from_config(config, VirtualClock(T0 + TF), state)
    (tmp_path / "BBB-USDT-5m.csv").rename(tmp_path / "BBB_USDT-5m.csv")  # put back: as it was
    venue = SimExchange.from_config(config, VirtualClock(T0 + TF), state)
    try:
        assert [p["contracts"] for p in venue.fetch_positions()] == [2.0]
    finally:
        venue.close()
