"""Every injected fault of the simulated exchange, scripted exactly or drawn by probability."""

from __future__ import annotations

import math

import ccxt
import pytest
from sim_fixtures import T0, TF, make_sim, qty_for

from core import config as cfg
from core.clock import VirtualClock
from core.sim_exchange import SimExchange
from core.sim_faults import FaultInjector


@pytest.fixture
def sim():
    ex, clock = make_sim(start_balance=100_000.0)
    ex.faults.clear()
    return ex, clock, ex.symbols[0]


def order_exists(ex, symbol, client_id, trigger=False) -> bool:
    try:
        ex.fetch_order(None, symbol, params={"clientOrderId": client_id, "trigger": trigger})
        return True
    except ccxt.OrderNotFound:
        return False


def test_network_error_before_the_book_leaves_no_order(sim):
    ex, _, s = sim
    ex.faults.script([("create_order", "network_error")])
    with pytest.raises(ccxt.NetworkError) as e:
        ex.create_order(s, "market", "buy", qty_for(ex, s, 100), params={"clientOrderId": "n1"})
    assert type(e.value) is ccxt.NetworkError and "POST https://fapi" in str(e.value)
    assert not order_exists(ex, s, "n1") and ex.fetch_positions() == []


def test_timeout_after_accept_the_order_exists(sim):
    ex, _, s = sim
    ex.faults.script([("create_order", "timeout_after_accept")])
    with pytest.raises(ccxt.RequestTimeout):
        ex.create_order(s, "market", "buy", qty_for(ex, s, 100), params={"clientOrderId": "t1"})
    o = ex.fetch_order(None, s, params={"clientOrderId": "t1"})
    assert o["status"] == "closed" and ex.fetch_positions()[0]["contracts"] == o["filled"]


def test_timeout_after_accept_of_a_stop_and_of_a_cancel(sim):
    ex, _, s = sim
    q = qty_for(ex, s, 100)
    ex.create_order(s, "market", "buy", q)
    px = ex.fetch_ticker(s)["last"]
    ex.faults.script([("create_order", "timeout_after_accept"),
                      ("cancel_order", "timeout_after_accept")])
    with pytest.raises(ccxt.RequestTimeout):
        ex.create_order(s, "market", "sell", q, params={"triggerPrice": px * 0.95,
                                                        "reduceOnly": True, "clientOrderId": "st"})
    assert order_exists(ex, s, "st", trigger=True)
    with pytest.raises(ccxt.RequestTimeout):
        ex.cancel_order(None, s, params={"trigger": True, "clientOrderId": "st"})
    assert ex.fetch_open_orders(s, params={"trigger": True}) == []


def test_server_error_before_and_after_accept(sim):
    ex, _, s = sim
    q = qty_for(ex, s, 100)
    ex.faults.script([("create_order", "server_error"),
                      ("create_order", "server_error_after_accept")])
    with pytest.raises(ccxt.ExchangeNotAvailable, match="503"):
        ex.create_order(s, "market", "buy", q, params={"clientOrderId": "a"})
    with pytest.raises(ccxt.ExchangeNotAvailable):
        ex.create_order(s, "market", "buy", q, params={"clientOrderId": "b"})
    assert not order_exists(ex, s, "a") and order_exists(ex, s, "b")


def test_rate_limit_is_what_ccxt_raises_for_binance_429(sim):
    ex, _, s = sim
    ex.faults.script([("fetch_ohlcv", "rate_limit")])
    with pytest.raises(ccxt.DDoSProtection, match="429"):  # ccxt's binance maps 429 so
        ex.fetch_ohlcv(s, "5m")
    assert isinstance(ccxt.DDoSProtection("x"), ccxt.NetworkError)
    assert len(ex.fetch_ohlcv(s, "5m", limit=5)) == 5  # the next call is fine


def test_insufficient_funds_and_reject_leave_nothing(sim):
    ex, _, s = sim
    q = qty_for(ex, s, 100)
    ex.faults.script([("create_order", "insufficient_funds"), ("create_order", "reject")])
    with pytest.raises(ccxt.InsufficientFunds, match="-2019"):
        ex.create_order(s, "market", "buy", q, params={"clientOrderId": "f"})
    with pytest.raises(ccxt.OperationRejected, match="-4131"):
        ex.create_order(s, "market", "buy", q, params={"clientOrderId": "r"})
    assert not order_exists(ex, s, "f") and not order_exists(ex, s, "r")
    assert ex.fetch_my_trades(s) == []


def test_clock_skew_on_private_calls(sim):
    ex, _, s = sim
    ex.faults.script([("fetch_balance", "clock_skew")])
    with pytest.raises(ccxt.InvalidNonce, match="-1021"):
        ex.fetch_balance()
    with pytest.raises(ValueError, match="does not apply"):
        ex.faults.script([("fetch_ohlcv", "clock_skew")])  # a public endpoint
    ex.faults.script(["clock_skew"])  # any method it applies to: skips fetch_time
    assert ex.fetch_time() == T0
    with pytest.raises(ccxt.InvalidNonce):
        ex.fetch_positions()


def test_a_scripted_pass_lets_one_call_through_before_the_fault(sim):
    ex, _, s = sim
    ex.faults.script([("fetch_balance", None), ("fetch_balance", "network_error")])
    assert ex.fetch_balance()["USDT"]["total"] > 0
    with pytest.raises(ccxt.NetworkError):
        ex.fetch_balance()
    assert ex.fetch_balance()["USDT"]["total"] > 0 and ex.faults.pending == []
    with pytest.raises(ValueError, match="unknown method"):
        ex.faults.script([("fetch_everything", None)])


def test_a_scripted_pass_is_not_faulted_by_chance_either():
    config = cfg.load().with_values(faults={"network_error": 1.0})
    ex = SimExchange.from_config(config, VirtualClock(T0))
    ex.faults.script([("fetch_time", None)])
    assert ex.fetch_time() == T0
    with pytest.raises(ccxt.NetworkError):
        ex.fetch_time()


def test_forming_candle_returned_as_if_closed(sim):
    ex, clock, s = sim
    clock.set(T0 + TF // 5)
    normal = ex.fetch_ohlcv(s, "5m", limit=3)
    ex.faults.script([("fetch_ohlcv", "forming_candle")])
    faulty = ex.fetch_ohlcv(s, "5m", limit=3)
    clock.set(T0 + TF)
    closed = ex.fetch_ohlcv(s, "5m", since=T0, limit=1)[0]
    assert faulty[:2] == normal[:2] and faulty[-1][0] == T0
    assert faulty[-1] == closed != normal[-1]  # final values, before the candle closed


@pytest.mark.parametrize("fault", ["duplicate_candle", "missing_candle", "out_of_order_candles",
                                   "nan_price", "none_price", "zero_price", "high_below_low"])
def test_bad_candles(sim, fault):
    ex, _, s = sim
    good = ex.fetch_ohlcv(s, "5m", limit=50)
    ex.faults.script([("fetch_ohlcv", fault)])
    bad = ex.fetch_ohlcv(s, "5m", limit=50)
    ts = [r[0] for r in bad]
    prices = [x for r in bad for x in r[1:5]]
    if fault == "duplicate_candle":
        assert len(bad) == 51 and len(set(ts)) == 50
    elif fault == "missing_candle":
        assert len(bad) == 49 and set(ts) < {r[0] for r in good}
    elif fault == "out_of_order_candles":
        assert sorted(ts) == [r[0] for r in good] and ts != sorted(ts)
    elif fault == "nan_price":
        assert sum(1 for x in prices if x is not None and math.isnan(x)) == 1
    elif fault == "none_price":
        assert prices.count(None) == 1
    elif fault == "zero_price":
        assert prices.count(0.0) == 1
    else:
        assert sum(1 for r in bad if r[2] < r[3]) == 1
    assert bad[-1] == good[-1]  # the forming candle is untouched


@pytest.mark.parametrize("fault", ["nan_price", "none_price", "zero_price"])
def test_bad_ticker_prices(sim, fault):
    ex, _, _ = sim
    ex.faults.script([("fetch_tickers", fault)])
    lasts = [t["last"] for t in ex.fetch_tickers().values()]
    bad = [x for x in lasts if x is None or x == 0 or math.isnan(x)]
    assert len(bad) == 1


def test_script_validation():
    inj = FaultInjector()
    with pytest.raises(ValueError, match="unknown fault"):
        inj.script([("create_order", "meteor")])
    with pytest.raises(ValueError, match="does not apply"):
        inj.script([("fetch_balance", "reject")])
    inj.script([("create_order", "reject"), "rate_limit"])
    assert inj.pending == [("create_order", "reject"), ("*", "rate_limit")]
    assert inj.draw("fetch_time") == "rate_limit"
    assert inj.draw("fetch_time") is None and inj.draw("create_order") == "reject"
    assert list(inj.log) == [("fetch_time", "rate_limit"), ("create_order", "reject")]


def test_probabilistic_faults_are_seeded_and_repeatable():
    config = cfg.load().with_values(faults={"network_error": 0.3, "server_error": 0.2},
                                    sim={"seed": 7})

    def run():
        ex = SimExchange.from_config(config, VirtualClock(T0))
        out = []
        for _ in range(200):
            try:
                ex.fetch_time()
                out.append("ok")
            except ccxt.BaseError as e:
                out.append(type(e).__name__)
        return out

    first, second = run(), run()
    assert first == second
    assert 0.35 < first.count("NetworkError") / 200 + first.count(
        "ExchangeNotAvailable") / 200 < 0.6
    assert {"ok", "NetworkError", "ExchangeNotAvailable"} == set(first)


def test_config_probability_of_bad_candles_picks_variants():
    config = cfg.load().with_values(faults={"bad_candles": 1.0, "forming_candle": 0.0})
    ex = SimExchange.from_config(config, VirtualClock(T0))
    for _ in range(30):
        ex.fetch_ohlcv(ex.symbols[0], "5m", limit=20)
    assert len({f for _, f in ex.faults.log}) >= 4


def test_the_careful_client_resolves_a_timeout_after_accept_by_client_id():
    """Through core.exchange.ExchangeClient, as the bot talks to any venue."""
    from decimal import Decimal

    from core.exchange import ExchangeClient
    from core.exchange_types import OrderRequest

    clock = VirtualClock(T0)
    config = cfg.load()
    raw = SimExchange.from_config(config, clock)
    client = ExchangeClient(raw, config, clock)
    s = raw.symbols[0]
    last = client.tickers()[s].last
    amount = Decimal(raw.amount_to_precision(s, 500 / float(last)))
    raw.faults.script([("create_order", "timeout_after_accept")])
    result = client.submit(OrderRequest(s, "buy", amount, "bot1-x-1"), ref_price=last)
    assert result.status == "accepted" and result.order.filled == amount
    raw.faults.script([("create_order", "network_error")])
    lost = client.submit(OrderRequest(s, "buy", amount, "bot1-x-2"), ref_price=last)
    assert lost.status == "unknown"  # never reached the book: reconciliation will say so
    assert [p.amount for p in client.positions()] == [amount]
