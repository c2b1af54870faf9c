"""The simulated exchange's account rules, against hand-made candles and a virtual clock."""

from __future__ import annotations

import math
from decimal import Decimal

import ccxt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sim_fixtures import DAY, T0, TF, csv_market, flat, make_sim, qty_for, synthetic

SYM = "AAA/USDT:USDT"


def quiet_then(*candles) -> list[tuple]:
    """Ten quiet candles at 100, then the given ones (the first opens at T0)."""
    return flat(100.0, 10) + list(candles)


@pytest.fixture
def venue(tmp_path):
    """A venue on hand-made candles: at T0 the price is 100.0; tick 0.1, lot step 1."""
    def build(*candles, **kw):
        rows = quiet_then(*candles) + flat(100.0, 30)
        return make_sim(csv_market(tmp_path, {"AAA": rows}), **kw)
    return build


def d(x) -> Decimal:
    return Decimal(str(x))


# ----------------------------------------------------------------------------- markets
def test_markets_have_ccxt_binanceusdm_shape():
    ex, _ = make_sim()
    m = ex.market(ex.symbols[0])
    assert m["symbol"].endswith("/USDT:USDT") and m["id"] == m["base"] + "USDT"
    assert (m["type"], m["linear"], m["settle"], m["contractSize"]) == ("swap", True, "USDT", 1.0)
    assert m["precision"]["price"] < 1 and m["precision"]["amount"] <= 1
    assert m["limits"]["cost"]["min"] == 5.0 and m["limits"]["amount"]["min"] > 0
    with pytest.raises(ccxt.BadSymbol):
        ex.market("NOPE/USDT:USDT")
    assert ex.load_markets() is ex.markets


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1e-9, max_value=1e7, allow_nan=False))
def test_precision_matches_ccxt_own_functions(x):
    ex, _ = _shared_sim()
    real = ccxt.binanceusdm()
    real.set_markets(list(ex.markets.values()))
    for s in ex.symbols:
        for ours, theirs in ((ex.amount_to_precision, real.amount_to_precision),
                             (ex.price_to_precision, real.price_to_precision)):
            try:
                expected = theirs(s, x)
            except ccxt.InvalidOrder:
                with pytest.raises(ccxt.InvalidOrder):
                    ours(s, x)
            else:
                assert ours(s, x) == expected


_SHARED: list = []


def _shared_sim():
    if not _SHARED:
        _SHARED.append(make_sim())
    return _SHARED[0]


# ----------------------------------------------------------------------------- market orders
def test_market_buy_fills_with_slippage_fee_and_opens_position(venue):
    ex, _ = venue(slippage_bps=10)
    o = ex.create_order(SYM, "market", "buy", 2, params={"clientOrderId": "b1"})
    assert (o["status"], o["filled"], o["clientOrderId"]) == ("closed", 2.0, "b1")
    assert o["average"] == 100.1  # 100 + 10 bps, on the 0.1 tick
    (pos,) = ex.fetch_positions()
    assert (pos["side"], pos["contracts"], pos["entryPrice"]) == ("long", 2.0, 100.1)
    (trade,) = ex.fetch_my_trades(SYM)
    assert trade["fee"] == {"currency": "USDT", "cost": 0.1001}  # 200.2 * 0.05 %
    assert (trade["order"], trade["takerOrMaker"]) == (o["id"], "taker")
    bal = ex.fetch_balance()["USDT"]
    assert bal["total"] == pytest.approx(10_000 - 0.1001 + 2 * (100.0 - 100.1))


def test_market_sell_slips_down(venue):
    ex, _ = venue(slippage_bps=10)
    o = ex.create_order(SYM, "market", "sell", 2)
    assert o["average"] == 99.9  # 100 - 10 bps, on the 0.1 tick: a seller gets less
    (pos,) = ex.fetch_positions()
    assert (pos["side"], pos["entryPrice"]) == ("short", 99.9)


def test_unrealized_pnl_follows_the_price(venue):
    ex, clock = venue((100.0, 101.0, 99.9, 101.0), (101.0, 103.0, 100.9, 102.0))
    ex.create_order(SYM, "market", "buy", 3)
    clock.set(T0 + TF + TF // 2)  # halfway through the candle 101 -> 102
    (pos,) = ex.fetch_positions()
    assert pos["markPrice"] == 101.5
    assert pos["unrealizedPnl"] == pytest.approx(3 * 1.5)
    bal = ex.fetch_balance()
    assert bal["USDT"]["total"] == pytest.approx(10_000 - 0.15 + 4.5)  # margin balance
    assert bal["info"]["totalWalletBalance"] == "9999.85000000"


def test_margin_check_rejects_with_insufficient_funds_and_changes_nothing(venue):
    ex, _ = venue(start_balance=1000.0)
    ex.set_leverage(2, SYM)
    ex.create_order(SYM, "market", "buy", 19)  # 1900 notional: 950 margin
    with pytest.raises(ccxt.InsufficientFunds, match="-2019"):
        ex.create_order(SYM, "market", "buy", 1)  # 50 more margin + fee > 49.05 free
    assert ex.fetch_positions()[0]["contracts"] == 19.0
    assert len(ex.fetch_my_trades(SYM)) == 1
    ex.set_leverage(3, SYM)  # more leverage frees margin
    ex.create_order(SYM, "market", "buy", 1)
    used = ex.fetch_balance()["USDT"]["used"]
    assert used == pytest.approx(20 * 100 / 3, abs=1e-6)


def test_reduce_only_rules_and_one_way_flip(venue):
    ex, _ = venue()
    with pytest.raises(ccxt.InvalidOrder, match="-2022"):
        ex.create_order(SYM, "market", "sell", 1, params={"reduceOnly": True})
    ex.create_order(SYM, "market", "buy", 2)
    with pytest.raises(ccxt.InvalidOrder, match="-2022"):  # would increase the long
        ex.create_order(SYM, "market", "buy", 1, params={"reduceOnly": True})
    o = ex.create_order(SYM, "market", "sell", 5, params={"reduceOnly": True})
    assert o["filled"] == 2.0 and ex.fetch_positions() == []  # capped at the position
    ex.create_order(SYM, "market", "buy", 2)
    ex.create_order(SYM, "market", "sell", 5)  # not reduce-only: flips to a short of 3
    (pos,) = ex.fetch_positions()
    assert (pos["side"], pos["contracts"]) == ("short", 3.0)


def test_flip_realizes_pnl_on_the_closed_part_only(venue):
    ex, clock = venue((100.0, 110.0, 100.0, 110.0), (110.0, 110.5, 109.5, 110.0))
    ex.create_order(SYM, "market", "buy", 2)
    clock.set(T0 + TF)
    ex.create_order(SYM, "market", "sell", 3)
    trades = ex.fetch_my_trades(SYM)
    assert trades[-1]["info"]["realizedPnl"] == "20.00000000"
    (pos,) = ex.fetch_positions()
    assert (pos["side"], pos["contracts"], pos["entryPrice"]) == ("short", 1.0, 110.0)


def test_partial_fill_expires_the_rest(venue):
    ex, _ = venue(partial_fill_prob=1.0)
    o = ex.create_order(SYM, "market", "buy", 10)
    assert o["status"] == "expired" and 0 < o["filled"] < 10 and o["remaining"] == 10 - o["filled"]
    assert ex.fetch_positions()[0]["contracts"] == o["filled"]


def test_order_validation_errors(venue):
    ex, _ = venue()
    with pytest.raises(ccxt.InvalidOrder, match="-4164"):  # 1 x 100 >= 5 ok; 0.04 truncates
        ex.create_order(SYM, "limit", "buy", 1, 4.0)
    with pytest.raises(ccxt.InvalidOrder, match="minimum amount precision"):
        ex.create_order(SYM, "market", "buy", 0.5)
    with pytest.raises(ccxt.BadRequest, match="-4015"):
        ex.create_order(SYM, "market", "buy", 1, params={"clientOrderId": "bad id!"})
    ex.create_order(SYM, "limit", "buy", 1, 90.0, params={"clientOrderId": "L1"})
    with pytest.raises(ccxt.InvalidOrder, match="-4116"):
        ex.create_order(SYM, "limit", "buy", 1, 91.0, params={"clientOrderId": "L1"})
    ex.create_order(SYM, "market", "buy", 1, params={"clientOrderId": "M1"})
    ex.create_order(SYM, "market", "buy", 1, params={"clientOrderId": "M1"})  # not open: fine
    with pytest.raises(ccxt.InvalidOrder, match="not a valid order type"):
        ex.create_order(SYM, "trailing", "buy", 1)
    with pytest.raises(ccxt.ArgumentsRequired):
        ex.fetch_order("1")
    with pytest.raises(ccxt.ArgumentsRequired):
        ex.fetch_my_trades()


# ----------------------------------------------------------------------------- stops
def test_stop_triggers_on_candle_low_and_fills_at_the_trigger(venue):
    ex, clock = venue((100.0, 100.5, 99.5, 100.0), (100.0, 100.2, 98.9, 99.5))
    ex.create_order(SYM, "market", "buy", 2)
    stop = ex.create_order(SYM, "market", "sell", 2,
                           params={"triggerPrice": 99.0, "reduceOnly": True,
                                   "clientOrderId": "stop1"})
    assert (stop["status"], stop["triggerPrice"], stop["reduceOnly"]) == ("open", 99.0, True)
    assert [o["id"] for o in ex.fetch_open_orders(SYM, params={"trigger": True})] == [stop["id"]]
    assert ex.fetch_open_orders(SYM) == []  # stops live on the algo service
    clock.set(T0 + TF)
    assert ex.fetch_positions()[0]["contracts"] == 2.0  # first candle's low 99.5: no trigger
    clock.set(T0 + 2 * TF)
    assert ex.fetch_positions() == []
    algo = ex.fetch_order(None, SYM, params={"trigger": True, "clientOrderId": "stop1"})
    # As Binance documents the algo order: FINISHED, the order it became and its average
    # price, but no executed quantity (ccxt: closed, nothing filled)
    assert (algo["status"], algo["filled"], algo["average"]) == ("closed", 0.0, None)
    assert (algo["info"]["algoStatus"], algo["info"]["actualPrice"]) == ("FINISHED", "99.000")
    assert "executedQty" not in algo["info"]
    child = ex.fetch_order(algo["info"]["actualOrderId"], SYM)
    assert (child["type"], child["status"], child["filled"], child["average"]) == \
        ("market", "closed", 2.0, 99.0)
    assert child["info"]["origType"] == "STOP_MARKET"
    assert child["clientOrderId"] != "stop1"  # the venue's own: only actualOrderId links them
    with pytest.raises(ccxt.OrderNotFound):
        ex.fetch_order(None, SYM, params={"clientOrderId": "stop1"})
    last = ex.fetch_my_trades(SYM)[-1]
    assert (last["price"], last["timestamp"]) == (99.0, T0 + 2 * TF - 1)
    assert last["info"]["realizedPnl"] == "-2.00000000"
    # a fired stop takes liquidity: the taker fee (0.05 %), not the maker's (0.02 %)
    assert (last["takerOrMaker"], last["fee"]["cost"]) == ("taker", 0.099)  # 198 * 0.05 %


def test_is_flat_until_a_position_or_order_rests_and_again_after_the_stop_hits(venue):
    ex, clock = venue((100.0, 100.5, 99.5, 100.0), (100.0, 100.2, 98.9, 99.5))
    assert not ex.is_flat()  # not known before its state is read: no claim
    ex.fetch_balance()
    assert ex.is_flat()
    ex.create_order(SYM, "market", "buy", 2)
    assert not ex.is_flat()
    ex.create_order(SYM, "market", "sell", 2, params={"triggerPrice": 99.0, "reduceOnly": True})
    assert not ex.is_flat()
    clock.set(T0 + 2 * TF)
    assert ex.fetch_positions() == []  # the stop hit, nothing rests
    assert ex.is_flat()


def test_gap_through_the_stop_fills_at_the_open(venue):
    ex, clock = venue((100.0, 100.5, 99.5, 100.0), (97.0, 97.5, 96.0, 96.5))
    ex.create_order(SYM, "market", "buy", 1)
    ex.create_order(SYM, "market", "sell", 1, params={"stopLossPrice": 99.0, "reduceOnly": True})
    clock.set(T0 + 3 * TF)
    trade = ex.fetch_my_trades(SYM)[-1]
    assert (trade["price"], trade["timestamp"]) == (97.0, T0 + TF)


def test_stop_placed_mid_candle_ignores_the_earlier_part_of_it(venue):
    candles = ((100.0, 100.5, 97.0, 100.0), (100.0, 100.3, 99.0, 99.8), (99.8, 99.9, 97.5, 98.0))
    ex, clock = venue(*candles)
    ex2, clock2 = venue(*candles)
    for e, c, at in ((ex, clock, T0 + TF // 2), (ex2, clock2, T0)):
        c.set(at)
        e.create_order(SYM, "market", "buy", 1)
        e.create_order(SYM, "market", "sell", 1, params={"triggerPrice": 98.0,
                                                          "reduceOnly": True})
        c.set(T0 + 4 * TF)
    # Placed at the open, the 97.0 wick of the first candle hits it; placed halfway, the
    # part of the candle it saw went 100 -> 100, so only the third candle reaches 98.
    assert ex2.fetch_my_trades(SYM)[-1]["timestamp"] == T0 + TF - 1
    assert ex.fetch_my_trades(SYM)[-1]["timestamp"] == T0 + 3 * TF - 1


def test_take_profit_triggers_on_the_high(venue):
    ex, clock = venue((100.0, 100.5, 99.5, 100.0), (100.0, 102.5, 99.8, 101.0))
    ex.create_order(SYM, "market", "buy", 1)
    tp = ex.create_order(SYM, "market", "sell", 1,
                         params={"takeProfitPrice": 102.0, "reduceOnly": True})
    assert tp["takeProfitPrice"] == 102.0
    clock.set(T0 + 2 * TF)
    assert ex.fetch_my_trades(SYM)[-1]["price"] == 102.0 and ex.fetch_positions() == []


def test_stop_on_the_wrong_side_would_trigger_immediately(venue):
    ex, _ = venue()
    ex.create_order(SYM, "market", "buy", 1)
    with pytest.raises(ccxt.OrderImmediatelyFillable, match="-2021"):
        ex.create_order(SYM, "market", "sell", 1, params={"triggerPrice": 101.0,
                                                           "reduceOnly": True})


def test_reduce_only_stop_without_position_expires_when_triggered(venue):
    ex, clock = venue((100.0, 100.5, 99.5, 100.0), (100.0, 100.2, 98.9, 99.5))
    ex.create_order(SYM, "market", "buy", 1)
    stop = ex.create_order(SYM, "STOP_MARKET", "sell", 1,
                           params={"stopPrice": 99.0, "reduceOnly": True})
    ex.create_order(SYM, "market", "sell", 1, params={"reduceOnly": True})  # closed by hand
    clock.set(T0 + 3 * TF)
    assert ex.fetch_order(stop["id"], SYM, params={"trigger": True})["status"] == "expired"
    assert ex.fetch_positions() == []


def test_close_position_stop_is_expired_when_the_position_closes(venue):
    ex, _ = venue()
    ex.create_order(SYM, "market", "buy", 1)
    stop = ex.create_order(SYM, "market", "sell", None,
                           params={"triggerPrice": 95.0, "closePosition": True})
    ex.create_order(SYM, "market", "sell", 1)
    assert ex.fetch_open_orders(SYM, params={"trigger": True}) == []
    assert ex.fetch_order(stop["id"], SYM, params={"trigger": True})["status"] == "expired"


def test_cancel_stop_and_lookups(venue):
    ex, clock = venue()
    ex.create_order(SYM, "market", "buy", 1)
    stop = ex.create_order(SYM, "market", "sell", 1, params={"triggerPrice": 95.0,
                                                              "reduceOnly": True,
                                                              "clientOrderId": "s-1"})
    with pytest.raises(ccxt.OrderNotFound, match="-2013"):  # not a regular order
        ex.fetch_order(stop["id"], SYM)
    ack = ex.cancel_order(None, SYM, params={"trigger": True, "clientOrderId": "s-1"})
    assert ack["id"] == stop["id"]
    assert ex.fetch_open_orders(SYM, params={"trigger": True}) == []
    assert ex.fetch_order(stop["id"], SYM, params={"trigger": True})["status"] == "canceled"
    with pytest.raises(ccxt.OrderNotFound, match="-2011"):
        ex.cancel_order(stop["id"], SYM, params={"trigger": True})
    clock.set(T0 + 3 * DAY + TF)  # Binance forgets unfilled cancelled orders after 3 days
    with pytest.raises(ccxt.OrderNotFound):
        ex.fetch_order(stop["id"], SYM, params={"trigger": True})


# ----------------------------------------------------------------------------- limit orders
def test_resting_limit_fills_as_maker_when_traded_through(venue):
    ex, clock = venue((100.0, 100.5, 99.5, 100.0), (100.0, 100.2, 99.0, 99.5),
                      (99.5, 99.6, 98.9, 99.2))
    o = ex.create_order(SYM, "limit", "buy", 2, 99.0, params={"clientOrderId": "L"})
    assert o["status"] == "open"
    assert ex.fetch_balance()["USDT"]["used"] == pytest.approx(2 * 99.0 / 20)  # reserved
    clock.set(T0 + 2 * TF)  # the second candle only touches 99.0
    assert ex.fetch_open_orders(SYM)[0]["id"] == o["id"]
    clock.set(T0 + 3 * TF)
    filled = ex.fetch_order(o["id"], SYM)
    assert (filled["status"], filled["average"]) == ("closed", 99.0)
    trade = ex.fetch_my_trades(SYM)[-1]
    assert trade["takerOrMaker"] == "maker" and trade["fee"]["cost"] == pytest.approx(
        2 * 99.0 * 0.0002)


def test_marketable_limit_takes_at_the_market(venue):
    ex, _ = venue(slippage_bps=10)
    o = ex.create_order(SYM, "limit", "buy", 1, 105.0)
    assert (o["status"], o["average"]) == ("closed", 100.1)
    assert ex.fetch_my_trades(SYM)[0]["takerOrMaker"] == "taker"
    cancelled = ex.create_order(SYM, "limit", "sell", 1, 120.0, params={"reduceOnly": True})
    assert ex.cancel_order(cancelled["id"], SYM)["status"] == "canceled"


# ----------------------------------------------------------------------------- account api
def test_leverage_and_margin_mode_answers(venue):
    ex, _ = venue()
    assert ex.set_leverage(5, SYM) == {"leverage": 5, "maxNotionalValue": "1000000000",
                                       "symbol": "AAAUSDT"}
    with pytest.raises(ccxt.BadRequest):
        ex.set_leverage(200, SYM)
    assert ex.set_margin_mode("cross", SYM)["code"] == -4046
    with pytest.raises(ccxt.NotSupported):
        ex.set_margin_mode("isolated", SYM)


def test_open_orders_without_symbol_needs_the_ccxt_option(venue):
    ex, _ = venue()
    with pytest.raises(ccxt.ExchangeError, match="warnWithoutSymbol"):
        ex.fetch_open_orders()
    ex.options["fetchOpenOrders"]["warnWithoutSymbol"] = False
    assert ex.fetch_open_orders() == []


def test_my_trades_window_and_limit(venue):
    ex, clock = venue()
    for i in range(4):
        clock.set(T0 + i * 1000)
        ex.create_order(SYM, "market", "buy" if i % 2 == 0 else "sell", 1)
    assert [t["timestamp"] for t in ex.fetch_my_trades(SYM, limit=2)] == [T0 + 2000, T0 + 3000]
    assert [t["timestamp"] for t in ex.fetch_my_trades(SYM, since=T0 + 1000, limit=2)] == \
        [T0 + 1000, T0 + 2000]
    clock.set(T0 + 8 * DAY)
    assert ex.fetch_my_trades(SYM) == []  # older than the default 7-day window
    assert len(ex.fetch_my_trades(SYM, since=T0)) == 4


# ----------------------------------------------------------------------------- candles, tickers
def test_ohlcv_has_closed_candles_then_the_forming_one(venue):
    ex, clock = venue((100.0, 101.0, 99.0, 100.6), (100.6, 100.8, 100.0, 100.4))
    clock.set(T0 + TF // 2)
    rows = ex.fetch_ohlcv(SYM, "5m", limit=3)
    assert [r[0] for r in rows] == [T0 - 2 * TF, T0 - TF, T0]
    assert rows[-1][1:5] == [100.0, 100.5, 99.5, 100.3]  # half-way: wicks grow with time
    clock.set(T0 + TF)
    assert ex.fetch_ohlcv(SYM, "5m", since=T0, limit=1)[0][1:5] == [100.0, 101.0, 99.0, 100.6]
    assert ex.fetch_ohlcv(SYM, "5m", since=T0 + 5 * DAY) == []
    with pytest.raises(ccxt.NotSupported):
        ex.fetch_ohlcv(SYM, "1m")
    with pytest.raises(ccxt.BadRequest):
        ex.fetch_ohlcv(SYM, "7m")


def test_larger_timeframes_aggregate_the_base_candles():
    ex, clock = make_sim()
    s = ex.symbols[1]
    clock.set(T0 + 7 * TF)
    hours = ex.fetch_ohlcv(s, "1h", limit=3)
    fives = ex.fetch_ohlcv(s, "5m", since=hours[0][0], limit=100)
    for h in hours:
        part = [r for r in fives if h[0] <= r[0] < h[0] + 3_600_000]
        assert h[1] == part[0][1] and h[4] == part[-1][4]
        assert h[2] == max(r[2] for r in part) and h[3] == min(r[3] for r in part)
        assert h[5] == pytest.approx(sum(r[5] for r in part))


def test_24h_ticker_quote_volume_comes_from_the_last_day_of_candles():
    ex, clock = make_sim()
    s = ex.symbols[0]
    rows = ex.fetch_ohlcv(s, "5m", since=T0 - DAY, limit=288)  # clock on a boundary
    t = ex.fetch_tickers()[s]
    assert t["quoteVolume"] == pytest.approx(
        sum(r[5] * (r[2] + r[3] + r[4]) / 3 for r in rows), rel=1e-6)
    assert t["last"] == ex.fetch_ohlcv(s, "5m", limit=1)[0][4]
    assert t["timestamp"] == T0 and set(ex.fetch_tickers()) == set(ex.symbols)
    assert list(ex.fetch_tickers([s])) == [s]


def test_fetch_time_is_the_venue_clock_and_never_runs_backwards():
    ex, clock = make_sim()
    clock.set(T0 + 1234)
    assert ex.fetch_time() == T0 + 1234
    ex.step_to(T0 + 10 * TF)
    assert ex.fetch_time() == T0 + 10 * TF  # the venue ran ahead of the clock


def test_many_symbols_with_stops_step_quickly_and_consistently():
    ex, clock = make_sim(synthetic(6), start_balance=100_000.0)
    for s in ex.symbols:
        ex.create_order(s, "market", "buy", qty_for(ex, s, 500))
        px = ex.fetch_ticker(s)["last"]
        ex.create_order(s, "market", "sell", qty_for(ex, s, 500),
                        params={"triggerPrice": px * 0.99, "reduceOnly": True})
    for _ in range(2000):
        clock.advance(TF)
        ex.step_to(clock.now_ms())
    trades = [t for s in ex.symbols for t in ex.fetch_my_trades(s, since=T0)]
    wallet = 100_000 + sum(float(t["info"]["realizedPnl"]) - t["fee"]["cost"] for t in trades)
    assert ex.fetch_balance()["info"]["totalWalletBalance"] == f"{wallet:.8f}"
    stopped = [s for s in ex.symbols if not ex.fetch_positions([s])]
    assert stopped  # a 1 % stop over a week of 5 m candles
    for s in stopped:
        t = ex.fetch_my_trades(s, since=T0)[-1]
        assert t["side"] == "sell" and not math.isnan(t["price"])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.sampled_from(["stop", "tp", "limit"]),
                          st.floats(0.002, 0.02)), min_size=1, max_size=6))
def test_catching_up_in_one_jump_equals_stepping_candle_by_candle(plan):
    """Same orders at the same instants: a venue polled rarely ends where one stepped on
    every candle does (same fills, prices, times)."""
    venues = [make_sim(synthetic(2), start_balance=100_000.0) for _ in range(2)]
    s = venues[0][0].symbols[0]
    for ex, _ in venues:
        ex.create_order(s, "market", "buy", qty_for(ex, s, 5000))
    for k, kind, pct in sorted(plan):
        at = T0 + k * 97_000  # placements fall inside candles
        for i, (ex, clock) in enumerate(venues):
            if i == 0:
                while clock.now_ms() + TF <= at:  # the polled-every-candle venue
                    clock.advance(TF)
                    ex.step_to(clock.now_ms())
            clock.set(at)
            px = ex.fetch_ticker(s)["last"]
            q = qty_for(ex, s, 500)
            if kind == "stop":
                ex.create_order(s, "market", "sell", q, params={"triggerPrice": px * (1 - pct),
                                                               "reduceOnly": True})
            elif kind == "tp":
                ex.create_order(s, "market", "sell", q, params={"takeProfitPrice": px * (1 + pct),
                                                               "reduceOnly": True})
            else:
                ex.create_order(s, "limit", "buy", q, px * (1 - pct))
    end = T0 + 2 * DAY
    (a, ca), (b, cb) = venues
    while ca.now_ms() + TF <= end:
        ca.advance(TF)
        a.step_to(ca.now_ms())
    cb.set(ca.now_ms())
    strip = [{k: t[k] for k in ("timestamp", "side", "price", "amount", "fee")}
             for t in a.fetch_my_trades(s, since=T0)]
    assert strip == [{k: t[k] for k in ("timestamp", "side", "price", "amount", "fee")}
                     for t in b.fetch_my_trades(s, since=T0)]
    assert a.fetch_balance()["info"] == b.fetch_balance()["info"]


def test_first_missing_minute_of_an_answer():
    """Repeated or unordered rows were read as a hole one row on (the matching then
    crept a minute per call, and its 15-minute give-up never came)."""
    import numpy as np

    from core.sim_exchange import first_missing

    m = 60_000
    assert first_missing(np.array([0, m, 2 * m]), 0, m) is None
    assert first_missing(np.array([0, 2 * m, 3 * m]), 0, m) == m
    assert first_missing(np.array([m, 2 * m]), 0, m) == 0  # the first one missing
    assert first_missing(np.array([0, m, m, 2 * m]), 0, m) is None  # repeated
    assert first_missing(np.array([m, 0, 2 * m]), 0, m) is None  # out of order
    assert first_missing(np.array([], dtype=np.int64), 0, m) is None
