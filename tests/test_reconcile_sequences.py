"""Reconciliation after sequences an audit reproduced: partial fills of exits and stops,
positions changed by hand, answers lost, reads failing part-way, one position after
another in a symbol. Each ends with the ledger agreeing with the exchange, a dry run
that says what the real run then does, and runs that converge."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from test_jobs_scan import AAA, PICK_FIRST, T0, TF, bots, candle, flat
from test_reconcile import (
    FALL,
    Crash,
    CrashingSim,
    StuckExitSim,
    assert_agrees,
    assert_settled,
    died_in_first_scan,
    kinds,
    open_long,
    reconciled,
)

from core.execution import Executor
from jobs import reconcile


@pytest.fixture
def bot_factory(tmp_path):
    yield from bots(tmp_path)


def shape(report: dict) -> list[tuple]:
    return [(d["kind"], d["symbol"], d["severity"]) for d in report["differences"]]


def executor(bot) -> Executor:
    return Executor(bot.ledger, bot.client, bot.clock, bot.rt.config, "test", bot.rt.lock)


def dry_then_real(bot) -> tuple[dict, dict]:
    dry = reconcile.run(bot.rt, bot.clock.now_ms(), "dry", dry_run=True)
    return dry, reconciled(bot)


@pytest.mark.parametrize("reconciled_between", [True, False])
def test_a_stop_that_fills_what_is_left_after_a_hand_reduction_closes_it(bot_factory,
                                                                          reconciled_between):
    # The stop, sized for the whole position, fills the half left and expires.
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": FALL})
    position = open_long(bot)
    half = Decimal(position["amount"]) / 2
    bot.venue.create_order(AAA, "market", "sell", float(half), None, {"reduceOnly": True})
    if reconciled_between:
        assert "position_size" in kinds(reconciled(bot))
    bot.after_candle(1)
    assert not bot.exchange_positions()
    dry, real = dry_then_real(bot)
    assert real["status"] == "corrected" and shape(dry) == shape(real)
    assert bot.position(AAA) is None
    [closed] = bot.facts("position_closed", position_id=position["position_id"])
    # Unseen, the hand sale is found last: the stop's part reduces, the sale closes.
    assert closed["reason"] == ("stop_loss" if reconciled_between else "closed_on_exchange")
    assert_agrees(bot)
    assert_settled(bot)


DIP = [*flat(100, 6), candle(100, 100.1, 98.3, 98.6), *flat(98.6, 4)]


def test_a_stop_whose_answer_was_lost_is_cancelled_with_its_position(bot_factory):
    # A move's stop rests on the exchange, its answer and lookups lost (ledger: unknown).
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": DIP})
    a = open_long(bot)
    ex = executor(bot)
    bot.clock.advance(bot.rt.config.exits.stop_move_interval_s * 1000)
    bot.venue.faults.script([("create_order", "timeout_after_accept"),
                             *[("fetch_order", "network_error")] * 20])
    assert not ex.move_stop(bot.position(AAA), Decimal("98.5"))
    bot.venue.faults.clear()
    [lost] = [o for o in bot.ledger.state().orders.values() if o["state"] == "unknown"]
    bot.after_candle(0)
    assert ex.close_position(bot.position(AAA), "test exit", T0 + TF)
    assert bot.resting_stops() == []  # it would have fired on the next position
    b = ex.open_position(AAA, "long", Decimal(a["amount"]), T0 + 2 * TF, stop_pct=2.0)
    bot.after_candle(6)  # the dip to 98.3: through the lost stop's 98.5, not B's 98
    assert AAA in bot.exchange_positions() and bot.position(AAA) == b
    dry, real = dry_then_real(bot)
    assert shape(dry) == shape(real)
    assert {f["position_id"] for f in bot.facts("fill", client_order_id=lost[
        "client_order_id"])} <= {None, a["position_id"]}
    assert_agrees(bot)


def test_a_hand_close_whose_trades_could_not_be_read_once_is_closed_next_run(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 5)},
                      exchange={"read_retries": 0})
    position = open_long(bot)
    bot.clock.advance(60_000)
    bot.venue.cancel_order(None, AAA, {"trigger": True,
                                       "clientOrderId": position["stop"]["client_order_id"]})
    bot.venue.create_order(AAA, "market", "sell", float(position["amount"]), None,
                           {"reduceOnly": True})
    bot.venue.faults.script([("fetch_my_trades", "network_error")])  # the position check's
    assert reconciled(bot)["status"] == "needs_human"
    bot.clock.advance(5 * 60_000)
    reconciled(bot)  # the trades read now: the close is recorded from them
    assert bot.position(AAA) is None
    [closed] = bot.facts("position_closed", position_id=position["position_id"])
    assert closed["reason"] == "closed_on_exchange"
    assert not [f for f in bot.facts("fill", symbol=AAA) if f["position_id"] is None]
    assert_settled(bot)


def test_the_dry_run_of_an_exit_that_filled_in_part_says_what_the_real_run_does(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 5)}, venue_cls=CrashingSim)
    open_long(bot)
    bot.after_candle(0)
    bot.venue.crash = ("after", False)
    bot.venue.partial_fill_prob = 1.0
    with pytest.raises(Crash):
        executor(bot).close_position(bot.position(AAA), "test exit", T0)
    bot.venue.partial_fill_prob = 0.0
    dry, real = dry_then_real(bot)
    assert shape(real) == [("order_state", AAA, "fix"), ("missing_stop", AAA, "fix")]
    assert shape(dry) == shape(real)
    assert_agrees(bot)
    assert_settled(bot)


def test_a_partial_exit_recorded_before_its_trade_listed_is_not_counted_again(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 5)})
    position = open_long(bot)
    bot.after_candle(0)
    bot.venue.partial_fill_prob = 1.0
    bot.venue.fetch_my_trades = lambda *a, **kw: []  # the trade list lags
    assert not executor(bot).close_position(bot.position(AAA), "test exit", T0)
    del bot.venue.fetch_my_trades
    bot.venue.partial_fill_prob = 0.0
    reconciled(bot)
    bot.clock.advance(60_000)
    left = bot.position(AAA)
    bot.venue.create_order(AAA, "market", "sell", float(left["amount"]), None,
                           {"reduceOnly": True})  # the rest, closed by hand
    reconciled(bot)
    sold = sum(Decimal(f["amount"]) for f in bot.facts("fill", symbol=AAA) if f["side"] == "sell")
    assert sold == Decimal(position["amount"])  # each sale once
    assert bot.position(AAA) is None
    assert_settled(bot)


def test_a_first_stop_on_its_way_is_not_cancelled_as_an_orphan(bot_factory):
    # The bot died right after the exchange took the first stop; its lookup fails once.
    bot = died_in_first_scan(bot_factory, "after", True, exchange={"read_retries": 0})
    [stop] = bot.resting_stops()
    bot.clock.advance(30_000)
    bot.venue.faults.script([("fetch_order", "network_error")])
    reconciled(bot)
    assert [s["clientOrderId"] for s in bot.resting_stops()] == [stop["clientOrderId"]]
    reconciled(bot)  # then it is settled and adopted
    assert bot.position(AAA)["stop"]["client_order_id"] == stop["clientOrderId"]
    assert_agrees(bot)


def test_an_exit_left_partially_filled_is_not_subtracted_again(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": [candle(100, 104, 100, 104),
                                                       *flat(104, 4)]},
                      venue_cls=StuckExitSim)
    position = open_long(bot)
    bot.after_candle(0)
    assert not executor(bot).close_position(bot.position(AAA), "test exit", T0)
    bot.venue.stuck = False
    held = Decimal(str(bot.exchange_positions()[AAA]["contracts"]))
    assert Decimal(bot.position(AAA)["amount"]) == held
    reconciled(bot)
    assert Decimal(bot.position(AAA)["amount"]) == held
    changed = bot.facts("position_changed", position_id=position["position_id"])
    assert len([c for c in changed if c["pnl"] is not None]) == 1  # its PnL once
    assert_agrees(bot)
    assert_settled(bot)


def test_an_old_positions_exit_settled_after_the_next_opened_leaves_that_one(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 8)}, venue_cls=StuckExitSim)
    a = open_long(bot)
    bot.after_candle(0)
    ex = executor(bot)
    assert not ex.close_position(bot.position(AAA), "test exit", T0)  # A: stuck partial
    bot.venue.stuck = False
    bot.after_candle(1)
    assert ex.close_position(bot.position(AAA), "test exit 2", T0 + TF)  # A: the rest
    b = ex.open_position(AAA, "long", Decimal(a["amount"]), T0 + 2 * TF, stop_pct=2.0)
    assert b is not None
    reconciled(bot)
    assert not bot.facts("position_changed", position_id=b["position_id"])
    assert_agrees(bot)
    assert json.loads(bot.facts("reconcile_run")[-1]["data"])["status"] in ("in_sync",
                                                                           "corrected")
