"""Reconciliation (jobs/reconcile.py): the ledger squared with the exchange.

Each scenario acts on the simulated exchange directly, behind the ledger's back, as a
person, another program or a crash would, then runs the real reconcile job.
"""

from __future__ import annotations

import json
from decimal import Decimal

import ccxt
import pytest
from sim_fixtures import hide_orders_stops_became
from test_jobs_scan import (
    AAA,
    BBB,
    DAY,
    PICK_FIRST,
    T0,
    TF,
    Pick,
    added,
    bots,
    candle,
    flat,
)

from core.clock import AcceleratedClock, utc_day
from core.exchange import NOT_FOUND_FINAL_MS
from core.execution import Executor
from core.risk import RiskState
from core.sim_exchange import SimExchange
from jobs import reconcile
from ledger import Fact

FALL = [candle(100, 100.5, 99.5, 100.2), candle(100.2, 100.3, 96.0, 96.5)]  # through 98


@pytest.fixture
def bot_factory(tmp_path):
    yield from bots(tmp_path)


class Crash(BaseException):
    """The process dies here (nothing catches a BaseException on its way out)."""


class CrashingSim(SimExchange):
    """The simulated exchange; ``crash`` = (when, is_stop): the bot dies right before or
    right after the exchange takes the next such order."""

    crash: tuple[str, bool] | None = None

    def create_order(self, symbol, type, side, amount, price=None, params=None):  # noqa: A002
        stop = bool((params or {}).get("triggerPrice"))
        when = self.crash[0] if self.crash and self.crash[1] == stop else None
        if when == "before":
            self.crash = None
            raise Crash
        order = super().create_order(symbol, type, side, amount, price, params)
        if when == "after":
            self.crash = None
            raise Crash
        return order


class StuckSim(SimExchange):
    """The next entry (``purpose = "exit"``: exit) fills in part and its answer still
    reads open (PARTIALLY_FILLED, caught before the rest expired) while lookups and
    cancels fail: the bot records the order ``partially_filled`` (and the position as
    filled), and leaves the order to reconcile."""

    purpose = "entry"
    stuck: bool | None = None  # None: the next such order gets stuck; True: lookups fail

    def create_order(self, symbol, type, side, amount, price=None, params=None):  # noqa: A002
        p = params or {}
        mine = not p.get("triggerPrice") and bool(p.get("reduceOnly")) == (self.purpose == "exit")
        if not (mine and self.stuck is None):
            return super().create_order(symbol, type, side, amount, price, params)
        self.partial_fill_prob, before = 1.0, self.partial_fill_prob
        try:
            order = super().create_order(symbol, type, side, amount, price, params)
        finally:
            self.partial_fill_prob = before
        self.stuck = True
        return {**order, "status": "open", "info": {**order["info"], "status": "PARTIALLY_FILLED"}}

    def fetch_order(self, *args, **kwargs):
        if self.stuck:
            raise ccxt.NetworkError("binanceusdm GET fapi/v1/order: connection reset")
        return super().fetch_order(*args, **kwargs)

    def cancel_order(self, *args, **kwargs):
        if self.stuck:
            raise ccxt.NetworkError("binanceusdm DELETE fapi/v1/order: connection reset")
        return super().cancel_order(*args, **kwargs)


class StuckEntrySim(StuckSim):
    purpose = "entry"


class StuckExitSim(StuckSim):
    purpose = "exit"

def died_in_first_scan(bot_factory, when: str, stop: bool, **kw):
    """A bot on AAA whose first scan dies right ``when`` ("before"/"after") the exchange
    takes its first entry (``stop``: its first stop)."""
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 5)}, venue_cls=CrashingSim,
                      **kw)
    bot.set_coins([AAA])
    bot.venue.crash = (when, stop)
    with pytest.raises(Crash):
        bot.job("scan", T0)
    return bot


def reconciled(bot, **kw) -> dict:
    record = bot.job("reconcile", **kw)
    assert record["outcome"] == "ok", record
    return record["summary"]


def kinds(report: dict) -> list[str]:
    return sorted(d["kind"] for d in report["differences"])


def assert_settled(bot) -> None:
    """Run again right after: nothing to do, and nothing but the run record added."""
    before = bot.counts()
    again = reconciled(bot)
    assert again["status"] == "in_sync", again["differences"]
    assert added(before, bot.counts()) == {"job_run": 1}


def assert_agrees(bot) -> None:
    """The ledger's positions and stops are the exchange's."""
    state = bot.ledger.state()
    theirs = {s: (p["side"], Decimal(str(p["contracts"])))
              for s, p in bot.exchange_positions().items()}
    assert theirs == {s: (p["side"], Decimal(p["amount"])) for s, p in state.positions.items()}
    stops = {o["clientOrderId"] for o in bot.resting_stops()}
    assert stops == {p["stop"]["client_order_id"] for p in state.positions.values()}
    assert not state.orders or all(o["purpose"] == "stop" and o["state"] == "accepted"
                                   for o in state.orders.values())


def open_long(bot, symbol: str = AAA) -> dict:
    bot.set_coins([symbol])
    bot.job("scan", T0)
    position = bot.position(symbol)
    assert position is not None and position["stop"]
    return position


def qty(bot, symbol: str, usdt: float = 500.0) -> float:
    return float(bot.venue.amount_to_precision(
        symbol, usdt / bot.venue.fetch_ticker(symbol)["last"]))


# -- in sync -----------------------------------------------------------------------------

def test_a_fresh_ledger_is_in_sync_and_a_second_run_adds_only_its_record(bot_factory):
    bot = bot_factory()
    first = reconciled(bot)
    assert first["status"] == "in_sync" and first["differences"] == []
    assert first["balance_changed"] is True and len(bot.facts("balance")) == 1
    assert_settled(bot)


def test_after_normal_trading_the_ledger_agrees(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 5), "BBB": flat(50, 5)})
    bot.set_coins([AAA, BBB])
    bot.job("scan", T0)
    assert set(bot.ledger.state().positions) == {AAA, BBB}
    report = reconciled(bot)
    assert report["status"] == "in_sync", report["differences"]
    assert_agrees(bot)
    assert_settled(bot)


# -- orders whose outcome the ledger never heard ---------------------------------------------

def test_an_entry_the_exchange_took_before_the_bot_died_is_recorded_with_its_stop(bot_factory):
    bot = died_in_first_scan(bot_factory, "after", False)
    [intent] = bot.facts("order_intent")
    coid = intent["client_order_id"]
    assert bot.ledger.state().orders[coid]["state"] == "submitted"
    assert AAA in bot.exchange_positions() and not bot.position(AAA)

    bot.clock.advance(30_000)  # the restart
    report = reconciled(bot)
    assert report["status"] == "corrected"
    assert kinds(report) == ["missing_stop", "order_state"]
    position = bot.position(AAA)
    assert position["position_id"] == coid
    [fill] = bot.facts("fill", client_order_id=coid)
    trade = bot.venue.fetch_my_trades(AAA, T0 - TF)[0]
    assert Decimal(fill["amount"]) == Decimal(position["amount"]) == Decimal(trade["info"]["qty"])
    assert json.loads(fill["data"])["trade_id"] == trade["id"]
    assert_agrees(bot)
    assert len(bot.venue.fetch_my_trades(AAA, T0 - TF)) == 1  # never sent twice
    assert_settled(bot)
    # The scan goes on from here and does not enter again on the same candle.
    bot.job("scan", T0 + 60_000)
    assert len(bot.facts("order_intent", client_order_id=coid)) == 1


def test_an_entry_that_never_left_is_declared_rejected_once_it_cannot_exist(bot_factory):
    bot = died_in_first_scan(bot_factory, "before", False)
    [intent] = bot.facts("order_intent")
    coid = intent["client_order_id"]

    bot.clock.advance(5_000)  # too soon to tell: still ambiguous, nothing sent again
    early = reconciled(bot)
    assert early["status"] == "in_sync"  # nothing corrected; ...
    assert [d["severity"] for d in early["differences"]] == ["info"]  # ...but reported
    assert bot.ledger.state().orders[coid]["state"] == "submitted"

    bot.clock.advance(NOT_FOUND_FINAL_MS)
    report = reconciled(bot)
    assert report["status"] == "corrected"
    assert report["differences"][0]["correction"] == "marked rejected"
    assert coid not in bot.ledger.state().orders
    assert not bot.exchange_positions() and not bot.position(AAA)
    assert_settled(bot)


def test_an_entry_left_partially_filled_is_settled_without_reopening_its_closed_position(
        bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 5)}, venue_cls=StuckEntrySim)
    position = open_long(bot)
    coid = position["position_id"]
    assert bot.ledger.state().orders[coid]["state"] == "partially_filled"
    assert Decimal(position["amount"]) == Decimal(str(bot.exchange_positions()[AAA]["contracts"]))
    bot.venue.stuck = False  # the exchange answers again; the position closes first
    bot.after_candle(0)
    ex = Executor(bot.ledger, bot.client, bot.clock, bot.rt.config, "exit-test", bot.rt.lock)
    assert ex.close_position(bot.position(AAA), "test exit", T0)
    assert bot.position(AAA) is None and not bot.exchange_positions()

    report = reconciled(bot)
    assert report["status"] == "corrected" and kinds(report) == ["order_state"]
    assert coid not in bot.ledger.state().orders  # settled: the rest expired
    assert len(bot.facts("position_opened", position_id=coid)) == 1  # never opened again
    assert len(bot.facts("position_closed", position_id=coid)) == 1
    assert bot.position(AAA) is None
    assert_agrees(bot)
    assert_settled(bot)


def test_a_lost_stop_answer_settled_after_a_later_move_is_cancelled_not_adopted(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 8)})
    position = open_long(bot)
    ex = Executor(bot.ledger, bot.client, bot.clock, bot.rt.config, "move-test", bot.rt.lock)
    first = position["stop"]
    # Move 1: its stop is taken, but the answer is lost and every lookup fails.
    bot.clock.advance(bot.rt.config.exits.stop_move_interval_s * 1000)
    bot.venue.faults.script([("create_order", "timeout_after_accept"),
                             *[("fetch_order", "network_error")] * 20])
    assert not ex.move_stop(bot.position(AAA), Decimal(first["price"]) + Decimal("0.5"))
    [lost] = [o for o in bot.ledger.state().orders.values() if o["state"] == "unknown"]
    bot.venue.faults.clear()
    # Move 2, tighter, rests; the first stop is cancelled.
    bot.clock.advance(bot.rt.config.exits.stop_move_interval_s * 1000)
    assert ex.move_stop(bot.position(AAA), Decimal(first["price"]) + Decimal("1.0"))
    tight = bot.position(AAA)["stop"]
    report = reconciled(bot)
    assert "order_state" in kinds(report)
    assert bot.position(AAA)["stop"] == tight  # the tighter stop still protects
    assert [s["clientOrderId"] for s in bot.resting_stops()] == [tight["client_order_id"]]
    assert coid_state(bot, lost["client_order_id"]) == "cancelled"
    assert_agrees(bot)
    assert_settled(bot)


def test_an_order_too_old_to_tell_is_reported_once_not_every_run(bot_factory):
    # After 3 days Binance forgets unfilled orders: absence proves nothing, the order stays
    # unknown. Its report must read the same every run, or each run records itself again.
    bot = died_in_first_scan(bot_factory, "before", False)
    bot.clock.advance(4 * 86_400_000)
    first = reconciled(bot)
    assert [d["kind"] for d in first["differences"]] == ["unresolved_order"]
    before = bot.counts()
    bot.clock.advance(5 * 60_000)
    assert reconciled(bot)["differences"] == first["differences"]
    assert added(before, bot.counts()) == {"job_run": 1}


def test_a_stop_the_exchange_took_before_the_ack_is_adopted_not_doubled(bot_factory):
    bot = died_in_first_scan(bot_factory, "after", True)
    assert bot.position(AAA)["stop"] is None and len(bot.resting_stops()) == 1
    bot.clock.advance(30_000)
    report = reconciled(bot)
    assert report["status"] == "corrected" and kinds(report) == ["order_state"]
    [stop] = bot.resting_stops()
    assert bot.position(AAA)["stop"]["client_order_id"] == stop["clientOrderId"]
    assert_agrees(bot)
    assert_settled(bot)


def test_an_exit_the_exchange_filled_before_the_bot_died_closes_the_position(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 5)}, venue_cls=CrashingSim)
    position = open_long(bot)
    bot.after_candle(0)
    ex = Executor(bot.ledger, bot.client, bot.clock, bot.rt.config, "exit-test", bot.rt.lock)
    bot.venue.crash = ("after", False)
    with pytest.raises(Crash):
        ex.close_position(bot.position(AAA), "test exit", T0)
    assert not bot.exchange_positions() and bot.position(AAA) is not None
    report = reconciled(bot)
    assert report["status"] == "corrected" and kinds(report) == ["order_state"]
    [closed] = bot.facts("position_closed", position_id=position["position_id"])
    assert closed["reason"] == "exit (settled by reconcile)"
    sells = [t for t in bot.venue.fetch_my_trades(AAA, T0 - TF) if t["side"] == "sell"]
    assert len(sells) == 1 and Decimal(closed["price"]) == Decimal(sells[0]["info"]["price"])
    assert json.loads(closed["data"])["closed_ts"] == sells[0]["timestamp"] <= closed["ts"]
    assert_agrees(bot)
    assert_settled(bot)


def test_a_stop_that_never_left_is_declared_rejected_and_replaced(bot_factory):
    # The bot died as it sent the position's stop. The lookup cannot tell yet whether
    # the stop exists, but it does not rest: the position is bare, so reconcile places a
    # stop at once (it said "in sync" and left it bare for a minute), and says so.
    bot = died_in_first_scan(bot_factory, "before", True)
    [lost] = [o for o in bot.ledger.state().orders.values() if o["purpose"] == "stop"]
    assert not bot.resting_stops()
    bot.clock.advance(5_000)
    early = reconciled(bot)
    assert early["status"] == "corrected"
    assert kinds(early) == ["missing_stop", "unresolved_order"]
    [stop] = bot.resting_stops()
    assert stop["clientOrderId"] != lost["client_order_id"]
    assert bot.position(AAA)["stop"]["client_order_id"] == stop["clientOrderId"]
    bot.clock.advance(NOT_FOUND_FINAL_MS)  # the lost one is declared never placed
    report = reconciled(bot)
    assert report["status"] == "corrected" and kinds(report) == ["unresolved_order"]
    assert bot.ledger.state().unresolved_orders() == []
    assert [s["clientOrderId"] for s in bot.resting_stops()] == [stop["clientOrderId"]]
    assert_agrees(bot)
    assert_settled(bot)


# -- fills while the bot was down --------------------------------------------------------

def test_a_stop_that_hit_while_the_bot_was_down_closes_the_position(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": FALL})
    position = open_long(bot)
    bot.after_candle(1)  # down; the stop fires on the exchange
    assert not bot.exchange_positions()
    report = reconciled(bot)
    assert report["status"] == "corrected"
    assert kinds(report) == ["order_state"]
    assert bot.position(AAA) is None
    [closed] = bot.facts("position_closed", position_id=position["position_id"])
    assert closed["reason"] == "stop_loss" and Decimal(closed["pnl"]) < 0
    stop_id = position["stop"]["client_order_id"]
    [fill] = bot.facts("fill", client_order_id=stop_id)
    assert Decimal(fill["amount"]) == Decimal(position["amount"])
    assert Decimal(fill["price"]) <= Decimal(position["stop"]["price"])
    assert report["balance_changed"] is True
    assert_agrees(bot)
    assert_settled(bot)


def test_a_stop_that_fired_before_midnight_while_down_counts_on_its_own_day(bot_factory):
    """Down from noon; the stop fires at 23:50, the bot starts again at 00:10. The close
    is recorded then, and counted on the new day: the day it fired closed with no trade,
    and its loss (in the equity the new day starts from) counted again in today's."""
    crash = candle(100, 100.3, 96.0, 96.5)  # candle 142: 23:50 to 23:55
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 142) + [crash]
                                               + flat(96.5, 10)})
    position = open_long(bot)
    midnight = T0 + 144 * TF
    bot.after_candle(145)  # 00:10: a start reconciles, then closes the days that ended
    reconciled(bot)
    assert bot.job("daily_reset", midnight)["outcome"] == "ok"
    [closed] = bot.facts("position_closed", position_id=position["position_id"])
    assert closed["ts"] > midnight and Decimal(closed["pnl"]) < 0
    [day_close] = [json.loads(r["data"]) for r in bot.facts("day_close")]
    assert day_close["day"] == utc_day(T0)
    assert (day_close["trades"], Decimal(day_close["realized_pnl"])) \
        == (1, Decimal(closed["pnl"]))
    state = bot.ledger.state()
    assert state.realized_today_at(bot.clock.now_ms()) == 0
    assert state.realized_on(utc_day(T0)) == Decimal(closed["pnl"])
    assert state.day == utc_day(T0)  # nothing counted on the new day: the stop's fee neither
    [day] = bot.ledger.select("SELECT * FROM daily_pnl WHERE trades > 0")
    assert (day["day"], day["realized_pnl"]) == (utc_day(T0), float(closed["pnl"]))
    [trade] = bot.ledger.select("SELECT closed_at FROM closed_trades")
    assert trade["closed_at"][:15] == utc_day(T0) + "T23:5"


@pytest.mark.parametrize("lookup_fails", [False, True])
def test_a_stop_that_fired_in_the_last_candle_before_midnight(bot_factory, lookup_fails):
    """The bot runs throughout; the stop fires in the day's last candle, which the first
    scan after midnight decides on, after it closed the day. The day's close looks the
    stops up first: the close counts on the day it fired. If that lookup fails, it
    counts on the new day (a closed day's totals do not change), in that day's
    day_close; closed_trades says when it closed either way."""
    crash = candle(100, 100.3, 96.0, 96.5)  # candle 143: 23:55 to 00:00
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 143) + [crash]
                                               + flat(96.5, 300)},
                      exchange={"read_retries": 0})
    open_long(bot)
    bot.after_candle(143)
    if lookup_fails:
        bot.venue.faults.script([("fetch_order", "network_error")])
    bot.job("scan")
    bot.after_candle(144 + 288)  # past the next midnight
    bot.job("scan")
    [closed] = bot.facts("position_closed")
    day = utc_day(T0 + DAY) if lookup_fails else utc_day(T0)
    assert json.loads(closed["data"])["day"] == day
    closes = {d["day"]: (d["trades"], Decimal(d["realized_pnl"]))
              for d in (json.loads(r["data"]) for r in bot.facts("day_close"))}
    assert closes == {utc_day(T0): (0, 0), utc_day(T0 + DAY): (0, 0),
                      day: (1, Decimal(closed["pnl"]))}
    view = {r["day"]: r["trades"] for r in bot.ledger.select("SELECT * FROM daily_pnl")}
    assert view == {d: trades for d, (trades, _) in closes.items()}
    [trade] = bot.ledger.select("SELECT closed_at FROM closed_trades")
    assert trade["closed_at"] == utc_day(T0) + "T23:59:59.999Z"


def test_a_close_taken_from_its_order_alone_is_dated_when_recorded(bot_factory):
    """The stop's trades could not be read: its fill is taken from the order, whose time
    is when the stop was placed, not when it fired. The close is dated when recorded."""
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": FALL}, exchange={"read_retries": 0})
    position = open_long(bot)
    bot.after_candle(1)
    bot.venue.faults.script([("fetch_my_trades", "network_error")])
    reconciled(bot)
    [closed] = bot.facts("position_closed", position_id=position["position_id"])
    [fill] = bot.facts("fill", client_order_id=position["stop"]["client_order_id"])
    assert json.loads(fill["data"])["trade_id"].startswith("order:")  # a stand-in
    data = json.loads(closed["data"])
    assert data["closed_ts"] is None and data["day"] == utc_day(closed["ts"])


def test_an_exit_is_dated_by_its_trade(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 5)})
    open_long(bot)
    bot.after_candle(1, offset_ms=30_000)
    ex = Executor(bot.ledger, bot.client, bot.clock, bot.rt.config, "exit", bot.rt.lock)
    assert ex.close_position(bot.position(AAA), "test exit", T0 + TF)
    [closed] = bot.facts("position_closed")
    [sell] = [t for t in bot.venue.fetch_my_trades(AAA, T0) if t["side"] == "sell"]
    assert json.loads(closed["data"])["closed_ts"] == sell["timestamp"]


def test_a_stop_whose_lookup_fails_once_still_closes_its_position_as_a_stop(bot_factory):
    """The stop fired while the bot was down, and the restart's lookup of it failed once.
    The position, gone from the exchange, used to be closed at once from the trade list
    as `closed_on_exchange`, the fill tied to no order, for good. It waits for the stop."""
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": FALL}, exchange={"read_retries": 0})
    position = open_long(bot)
    bot.after_candle(1)  # down; the stop fires on the exchange
    bot.venue.faults.script([("fetch_order", "network_error")])
    first = reconciled(bot)
    assert first["status"] == "needs_human"
    assert {"unresolved_order", "position_gone"} <= set(kinds(first))
    assert bot.facts("position_closed") == []
    assert len(bot.facts("order_intent")) == 2  # no stop placed for a position not held
    bot.clock.advance(300_000)
    second = reconciled(bot)
    assert kinds(second) == ["order_state"]
    [closed] = bot.facts("position_closed", position_id=position["position_id"])
    assert closed["reason"] == "stop_loss"
    [fill] = bot.facts("fill", client_order_id=position["stop"]["client_order_id"])
    assert Decimal(fill["amount"]) == Decimal(position["amount"])
    assert_agrees(bot)
    assert_settled(bot)


def test_the_fee_of_a_fill_recorded_before_its_trade_was_listed_is_recorded_once(bot_factory):
    """The entry's trades could not be read once: its fill was taken from the order, fee
    unknown (0). Once the trades are listed, reconcile records the fee (once), and the
    position's close counts it: the ledger's fees and PnL equal the wallet's change."""
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 40)},
                      exchange={"read_retries": 0})
    bot.venue.faults.script([("fetch_my_trades", "network_error")])
    position = open_long(bot)
    assert position["fees"] == "0"
    entry_fee = 10_000 - Decimal(str(bot.venue.fetch_balance()["USDT"]["total"]))
    assert entry_fee > 0
    report = reconciled(bot)
    assert kinds(report) == ["late_fee"]
    assert Decimal(bot.position(AAA)["fees"]) == entry_fee
    assert reconciled(bot)["status"] == "in_sync"  # recorded once
    ex = Executor(bot.ledger, bot.client, bot.clock, bot.rt.config, "exit", bot.rt.lock)
    assert ex.close_position(bot.position(AAA), "test exit", T0 + 3 * TF)
    [closed] = bot.facts("position_closed")
    wallet = Decimal(str(bot.venue.fetch_balance()["USDT"]["total"])) - 10_000
    assert Decimal(closed["pnl"]) == wallet
    fees = sum(Decimal(f["fee"]) for f in bot.facts("fill", symbol=AAA))
    assert fees == Decimal(closed["fee"]) and sum(
        Decimal(f["amount"]) for f in bot.facts("fill", client_order_id=position["position_id"])
    ) == Decimal(position["amount"])
    assert reconciled(bot)["status"] == "in_sync"
    assert_agrees(bot)


def test_an_entry_left_open_whose_fill_was_taken_from_the_order_is_not_counted_twice(
        bot_factory):
    """The entry's answer said open (6 of 10 filled), its lookups and its trades failed:
    the fill was taken from the order (fee unknown). Settling the order later recorded its
    trade again, 12 in the ledger for 6 held, and the fee never reached the position."""
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 40)}, venue_cls=StuckEntrySim,
                      exchange={"read_retries": 0})
    bot.venue.faults.script([("fetch_my_trades", "network_error")])
    position = open_long(bot)
    assert bot.ledger.state().orders[position["position_id"]]["state"] == "partially_filled"
    bot.venue.stuck = False
    assert kinds(reconciled(bot)) == ["late_fee", "order_state"]
    assert reconciled(bot)["status"] == "in_sync"
    fills = bot.facts("fill", symbol=AAA)
    held = Decimal(str(bot.exchange_positions()[AAA]["contracts"]))
    assert sum(Decimal(f["amount"]) for f in fills) == held == Decimal(bot.position(AAA)["amount"])
    paid = 10_000 - Decimal(str(bot.venue.fetch_balance()["USDT"]["total"]))
    assert Decimal(bot.position(AAA)["fees"]) == paid > 0
    assert_agrees(bot)


class GrowingEntrySim(StuckSim):
    """The next entry's answer says 60 % filled and open, while the exchange filled it
    all; its lookups and cancels fail. ``split``: its trades are listed in two parts, the
    first the 60 % the answer saw (as Binance lists an order matched in parts)."""

    split = False

    def create_order(self, symbol, type, side, amount, price=None, params=None):  # noqa: A002
        order = SimExchange.create_order(self, symbol, type, side, amount, price, params)
        if (params or {}).get("triggerPrice") or (params or {}).get("reduceOnly") \
                or self.stuck is not None:
            return order
        self.stuck = True
        part = float(self.amount_to_precision(symbol, order["filled"] * 0.6))
        info = {**order["info"], "status": "PARTIALLY_FILLED", "executedQty": str(part),
                "cumQuote": str(part * order["average"])}
        return {**order, "status": "open", "filled": part, "remaining": order["amount"] - part,
                "cost": part * order["average"], "trades": [], "info": info}

    def fetch_my_trades(self, symbol=None, since=None, limit=None, params=None):
        out = []
        for t in super().fetch_my_trades(symbol, since, limit, params):
            if not (self.split and t["side"] == "buy"):
                out.append(t)
                continue
            first = float(self.amount_to_precision(t["symbol"], t["amount"] * 0.6))
            for n, (amount, ts) in enumerate(((first, 0), (t["amount"] - first, 1))):
                share = amount / t["amount"]
                out.append({**t, "id": f"{t['id']}{n}", "amount": amount,
                            "timestamp": t["timestamp"] + ts,
                            "fee": {**t["fee"], "cost": t["fee"]["cost"] * share},
                            "info": {**t["info"], "id": f"{t['id']}{n}", "qty": str(amount),
                                     "commission": str(float(t["info"]["commission"]) * share)}})
        return out


@pytest.mark.parametrize(("split", "unreadable"), [(True, 1), (False, 1), (False, 3)])
def test_fills_beyond_what_was_taken_from_the_order_are_recorded_once(bot_factory, split,
                                                                       unreadable):
    """The answer saw 18 of 30 filled, recorded from the order (its trades unreadable).
    The rest is a new fill: it used to be recorded as a fee of the first part (split:
    the ledger 12 short for good) or on top of it (one trade of 30: 48 for 30 held), or
    (its trades unreadable again when reconcile settles the order: taken from the order
    again, under the same stand-in id) not at all."""
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 40)},
                      venue_cls=GrowingEntrySim, exchange={"read_retries": 0})
    bot.venue.split = split
    bot.venue.faults.script([("fetch_my_trades", "network_error")] * unreadable)
    position = open_long(bot)
    bot.venue.stuck = False
    if unreadable == 1:  # (a dry run reads the trades too)
        dry = reconcile.run(bot.rt, bot.clock.now_ms(), "dry", dry_run=True)
        assert "position_size" not in kinds(dry)  # the order's settlement grows it
    first = reconciled(bot)
    if unreadable == 1:
        assert set(kinds(dry)) <= set(kinds(first))  # (its stop replaced after: real run)
    reconciled(bot)  # the trades are listed now: the fee of what was taken from the order
    assert reconciled(bot)["status"] == "in_sync"
    held = Decimal(str(bot.exchange_positions()[AAA]["contracts"]))
    assert held > Decimal(position["amount"])
    fills = bot.facts("fill", client_order_id=position["position_id"])
    assert sum(Decimal(f["amount"]) for f in fills) == held == Decimal(bot.position(AAA)["amount"])
    paid = 10_000 - Decimal(str(bot.venue.fetch_balance()["USDT"]["total"]))
    assert sum(Decimal(f["fee"]) for f in fills) == paid > 0
    assert Decimal(bot.position(AAA)["fees"]) == paid  # so its close's PnL counts them
    assert_agrees(bot)


def test_an_entry_settled_after_its_position_took_the_exchanges_size_is_not_added_again(
        bot_factory):
    """18 of 30 recorded from the answer; the next reconcile could not look the order up
    and took the exchange's size (30). Settling the order later grew it by 12 again (42:
    corrected back only if the positions could be read in that run)."""
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 40)},
                      venue_cls=GrowingEntrySim, exchange={"read_retries": 0})
    bot.venue.faults.script([("fetch_my_trades", "network_error")])
    open_long(bot)
    first = reconciled(bot)  # the order's lookups still fail
    assert "position_size" in kinds(first)
    held = Decimal(str(bot.exchange_positions()[AAA]["contracts"]))
    assert Decimal(bot.position(AAA)["amount"]) == held
    bot.venue.stuck = False
    second = reconciled(bot)
    assert "position_size" not in kinds(second)
    assert all(Decimal(p["amount"]) == held for p in bot.facts("position_changed"))
    paid = 10_000 - Decimal(str(bot.venue.fetch_balance()["USDT"]["total"]))
    assert Decimal(bot.position(AAA)["fees"]) == paid > 0
    assert reconciled(bot)["status"] == "in_sync"
    assert_agrees(bot)


def test_a_stop_fill_recorded_before_its_trade_was_listed_is_not_counted_again(bot_factory):
    # The trade list lags: the stop's fill is recorded from the order it became (fee
    # unknown), under that order's id, which its trade carries once listed.
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": FALL})
    position = open_long(bot)
    bot.after_candle(1)  # the stop fires on the exchange
    bot.venue.fetch_my_trades = lambda *a, **kw: []
    reconciled(bot)
    del bot.venue.fetch_my_trades  # the trades are listed now
    stop_id = position["stop"]["client_order_id"]
    [fill] = bot.facts("fill", client_order_id=stop_id)
    [trade] = [t for t in bot.venue.fetch_my_trades(AAA, T0) if t["side"] == "sell"]
    assert fill["exchange_order_id"] == trade["order"]  # the order it became, not the stop
    assert Decimal(fill["amount"]) == Decimal(position["amount"])
    bot.clock.advance(60_000)
    report = reconciled(bot)
    assert "unrecorded_fill" not in kinds(report), report
    fills = bot.facts("fill", symbol=AAA)
    # the entry and the stop, once each, and then the stop's fee (of amount 0)
    assert [Decimal(f["amount"]) for f in fills] == [Decimal(position["amount"])] * 2 + [0]
    assert Decimal(fills[1]["fee"]) == 0
    assert Decimal(fills[2]["fee"]) == Decimal(trade["info"]["commission"])
    assert json.loads(fills[2]["data"])["trade_id"] == trade["id"]
    assert "late_fee" in kinds(report)
    assert reconciled(bot)["status"] == "in_sync"
    assert_agrees(bot)


def test_a_stop_that_fired_is_settled_once_the_order_it_became_shows(bot_factory):
    # The position is gone and its closing trade listed, but the order the stop became
    # is not visible yet: the close is recorded from the trade, which that order made, so
    # as the stop's (it was recorded closed_on_exchange, its fill tied to no order, for
    # good); the stop stays working until its outcome shows, and its fill is then not
    # recorded again.
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": FALL})
    position = open_long(bot)
    bot.after_candle(1)  # down; the stop fires on the exchange
    hide_orders_stops_became(bot.venue)
    first = reconciled(bot)
    assert "order_state" not in kinds(first)
    stop_id = position["stop"]["client_order_id"]
    assert bot.ledger.state().orders[stop_id]["state"] == "accepted"
    assert bot.position(AAA) is None
    [closed] = bot.facts("position_closed", position_id=position["position_id"])
    [trade] = [t for t in bot.venue.fetch_my_trades(AAA, T0) if t["side"] == "sell"]
    assert Decimal(closed["price"]) == Decimal(str(trade["price"]))
    assert closed["reason"] == "stop_loss"
    assert [f["client_order_id"] for f in bot.facts("fill", side="sell")] == [stop_id]

    del bot.venue.fetch_order
    bot.clock.advance(60_000)
    second = reconciled(bot)
    assert kinds(second) == ["order_state"]
    assert stop_id not in bot.ledger.state().orders
    entry_fill, closing_fill = bot.facts("fill", symbol=AAA)  # not recorded again
    assert closing_fill["exchange_order_id"] == trade["order"]
    assert_agrees(bot)
    assert_settled(bot)


def test_fills_the_ledger_never_saw_are_recorded_once(bot_factory):
    bot = bot_factory(paths={"AAA": flat(100, 5), "BBB": flat(50, 5)})
    bot.set_coins([AAA, BBB])
    reconciled(bot)
    bot.clock.advance(60_000)
    # Someone trades BBB in and out while the bot is down.
    q = qty(bot, BBB)
    bot.venue.create_order(BBB, "market", "buy", q)
    bot.venue.create_order(BBB, "market", "sell", q, None, {"reduceOnly": True})
    bot.clock.advance(60_000)
    report = reconciled(bot)
    assert kinds(report) == ["unrecorded_fill", "unrecorded_fill"]
    trades = {t["id"] for t in bot.venue.fetch_my_trades(BBB, T0)}
    recorded = {json.loads(r["data"])["trade_id"] for r in bot.facts("fill", symbol=BBB)}
    assert recorded == trades
    assert_settled(bot)


def test_fills_missed_while_the_trade_list_was_unavailable_are_found_later(bot_factory):
    bot = bot_factory(paths={"AAA": flat(100, 5), "BBB": flat(50, 5)},
                      exchange={"read_retries": 0})
    bot.set_coins([AAA, BBB])
    reconciled(bot)
    bot.clock.advance(60_000)
    q = qty(bot, BBB)
    bot.venue.create_order(BBB, "market", "buy", q)
    bot.venue.create_order(BBB, "market", "sell", q, None, {"reduceOnly": True})
    bot.clock.advance(30 * 60_000)
    bot.venue.faults.script([("fetch_my_trades", "network_error")] * 2)  # AAA's and BBB's
    blind = reconciled(bot)
    assert kinds(blind) == ["fills", "fills"] and blind["status"] == "in_sync"
    assert not bot.facts("fill")
    bot.clock.advance(30 * 60_000)  # the trades are now long before the last run
    report = reconciled(bot)
    assert kinds(report) == ["unrecorded_fill", "unrecorded_fill"]
    assert_settled(bot)


def test_a_stop_that_fires_during_the_sweep_is_recorded_once(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": FALL})
    position = open_long(bot)
    bot.after_candle(1)  # the stop fired; the ledger still has it working
    ex = Executor(bot.ledger, bot.client, bot.clock, bot.rt.config, "sweep", bot.rt.lock)
    assert reconcile.sweep_fills(bot.rt, ex, False, T0) == []  # not the sweep's to record
    reconciled(bot)
    assert bot.position(AAA) is None
    trade_ids = [json.loads(r["data"])["trade_id"] for r in bot.facts("fill")]
    assert len(trade_ids) == len(set(trade_ids)) == 2  # the entry and the stop, once each
    assert bot.facts("position_closed", position_id=position["position_id"])
    assert_settled(bot)


# -- positions ----------------------------------------------------------------------------

def test_a_position_closed_by_hand_on_the_exchange_is_closed_in_the_ledger(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 5)})
    position = open_long(bot)
    bot.clock.advance(60_000)
    bot.venue.create_order(AAA, "market", "sell", float(position["amount"]), None,
                           {"reduceOnly": True})
    report = reconciled(bot)
    assert report["status"] == "corrected"
    assert kinds(report) == ["orphan_stop", "position_gone"]
    [closed] = bot.facts("position_closed", position_id=position["position_id"])
    assert closed["reason"] == "closed_on_exchange"
    manual = [t for t in bot.venue.fetch_my_trades(AAA, T0) if t["side"] == "sell"]
    assert Decimal(closed["price"]) == Decimal(manual[0]["info"]["price"])
    assert json.loads(closed["data"])["closed_ts"] == manual[0]["timestamp"] <= closed["ts"]
    assert not bot.resting_stops()  # the orphaned stop was cancelled
    assert coid_state(bot, position["stop"]["client_order_id"]) == "cancelled"
    assert_agrees(bot)
    assert_settled(bot)


def test_a_position_flagged_for_a_human_gets_no_stop_and_no_exit(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 5)})
    position = open_long(bot)
    stop = position["stop"]["client_order_id"]
    bot.venue.cancel_order(None, AAA, {"trigger": True, "clientOrderId": stop})
    bot.venue.create_order(AAA, "market", "sell", float(position["amount"]), None,
                           {"reduceOnly": True})  # closed by hand; its fills unreadable
    bot.venue.faults.script([("fetch_my_trades", "network_error")] * 50)
    intents = len(bot.facts("order_intent"))
    report = reconciled(bot)
    assert report["status"] == "needs_human"
    severity = {d["kind"]: d["severity"] for d in report["differences"]}
    assert severity["position_gone"] == "human" and severity["missing_stop"] == "info"
    assert len(bot.facts("order_intent")) == intents  # no stop, no exit sent on it
    assert bot.resting_stops() == [] and bot.position(AAA) is not None


def coid_state(bot, coid: str) -> str:
    return bot.ledger.select("SELECT state FROM orders_timeline WHERE client_order_id = ? "
                             "ORDER BY seq DESC LIMIT 1", (coid,))[0]["state"]


def test_a_position_reduced_by_hand_gets_its_size_and_its_fill(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 5)})
    position = open_long(bot)
    half = Decimal(position["amount"]) / 2
    bot.venue.create_order(AAA, "market", "sell", float(half), None, {"reduceOnly": True})
    report = reconciled(bot)
    assert "position_size" in kinds(report)
    assert Decimal(bot.position(AAA)["amount"]) == Decimal(position["amount"]) - half
    sells = [r for r in bot.facts("fill", symbol=AAA) if r["side"] == "sell"]
    assert len(sells) == 1 and sells[0]["position_id"] == position["position_id"]
    assert_agrees(bot)  # the stop stays: reduce-only, it cannot close more than is left
    assert_settled(bot)


def test_a_position_grown_by_hand_takes_the_exchanges_size_and_entry(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 5)})
    position = open_long(bot)
    bot.venue.create_order(AAA, "market", "buy", float(position["amount"]))
    report = reconciled(bot)
    assert report["status"] == "corrected" and kinds(report) == ["position_size", "stop_size"]
    theirs = bot.exchange_positions()[AAA]
    ours = bot.position(AAA)
    assert Decimal(ours["amount"]) == 2 * Decimal(position["amount"])
    assert Decimal(ours["entry_price"]) == Decimal(theirs["info"]["entryPrice"])
    [stop] = bot.resting_stops()  # the added half is protected too, at the same level
    assert Decimal(str(stop["amount"])) == Decimal(ours["amount"])
    assert ours["stop"]["client_order_id"] == stop["clientOrderId"]
    assert Decimal(ours["stop"]["price"]) == Decimal(position["stop"]["price"])
    # The add's trade is recorded, its fee in the position's: the trade's fees are the
    # venue's (the add's fee was dropped, so realized PnL missed it)
    venue_fees = sum(Decimal(str(t["fee"]["cost"])) for t in bot.venue.fetch_my_trades(AAA))
    recorded = sum(Decimal(f["fee"]) for f in bot.facts("fill", symbol=AAA))
    assert recorded == venue_fees == Decimal(ours["fees"])
    assert len(bot.facts("fill", symbol=AAA)) == len(bot.venue.fetch_my_trades(AAA))
    assert_settled(bot)


def test_an_external_position_is_flagged_for_a_human(bot_factory):
    bot = bot_factory(paths={"AAA": flat(100, 5), "BBB": flat(50, 5)},
                      strat=Pick(long_at=[T0 - TF, T0]))
    bot.venue.create_order(BBB, "market", "buy", qty(bot, BBB))
    report = reconciled(bot)
    assert report["status"] == "needs_human"
    [diff] = [d for d in report["differences"] if d["kind"] == "external_position"]
    assert diff["symbol"] == BBB and diff["severity"] == "human"
    [ext] = bot.facts("external_position")
    assert ext["symbol"] == BBB and ext["reason"] == "flagged"
    assert bot.position(BBB) is None and not bot.resting_stops()
    assert set(bot.ledger.state().external) == {BBB}
    # Still there next time: still for a human, but recorded once.
    before = bot.counts()
    again = reconciled(bot)
    assert again["status"] == "needs_human"
    assert added(before, bot.counts()) == {"job_run": 1}
    # No entry of ours may add to (or close) it: one-way mode has one position a symbol.
    bot.set_coins([BBB])
    assert bot.job("scan", T0)["outcome"] == "ok"
    [decision] = bot.facts("risk_decision", symbol=BBB)
    assert decision["reason"] == "external_position"
    assert bot.position(BBB) is None and not bot.facts("order_intent")
    # A human closes it: that is recorded once (the flag no longer stands), then quiet.
    bot.venue.create_order(BBB, "market", "sell", float(ext["amount"]), None,
                           {"reduceOnly": True})
    cleared = reconciled(bot)
    assert cleared["status"] == "corrected"
    assert kinds(cleared) == ["external_position_gone", "unrecorded_fill"]
    assert bot.facts("external_position")[-1]["reason"] == "gone"
    assert json.loads(bot.facts("reconcile_run")[-1]["data"])["status"] == "corrected"
    assert_settled(bot)
    # ...and the bot trades the symbol again.
    bot.after_candle(0)
    assert bot.job("scan")["outcome"] == "ok"
    assert bot.position(BBB) is not None
    assert bot.facts("risk_decision", symbol=BBB)[-1]["reason"] == "approved"


def test_a_flag_the_last_report_names_but_the_ledger_lost_is_recorded_again(bot_factory):
    """A reconcile that recorded a flag's end and crashed before its own record leaves the
    last report naming the flag: when the same position appears again, the folded state
    (no flag) decides, so it is flagged again and the symbol stays blocked."""
    bot = bot_factory(paths={"AAA": flat(100, 5), "BBB": flat(50, 5)},
                      strat=Pick(long_at=[T0 - TF]))
    amount = qty(bot, BBB)
    bot.venue.create_order(BBB, "market", "buy", amount)
    assert reconciled(bot)["status"] == "needs_human"
    bot.venue.create_order(BBB, "market", "sell", amount, None, {"reduceOnly": True})
    bot.ledger.append([Fact("external_position", bot.clock.now_ms(), symbol=BBB, side="long",
                            reason="gone", data={"gone": True})])  # ...then the crash
    assert bot.ledger.state().external == {}
    bot.venue.create_order(BBB, "market", "buy", amount)  # the same position again
    again = reconciled(bot)
    assert again["status"] == "needs_human" and "external_position" in kinds(again)
    assert [f["reason"] for f in bot.facts("external_position")] == ["flagged", "gone",
                                                                     "flagged"]
    assert set(bot.ledger.state().external) == {BBB}
    bot.set_coins([BBB])
    bot.job("scan", T0)
    assert [d["reason"] for d in bot.facts("risk_decision", symbol=BBB)] == ["external_position"]
    assert not bot.facts("order_intent")


def test_an_external_position_is_adopted_with_a_stop_and_managed(bot_factory):
    # A deep dip at candle 0, long before the adoption: its low is not the position's.
    path = [candle(100, 100.2, 90, 100), *flat(100, 5)]
    bot = bot_factory(paths={"AAA": path}, reconcile={"external_positions": "adopt"},
                      strat=PICK_FIRST)
    bot.after_candle(3)
    bot.venue.create_order(AAA, "market", "buy", qty(bot, AAA))
    report = reconciled(bot)
    assert report["status"] == "corrected"
    assert kinds(report) == ["external_position", "missing_stop"]
    position = bot.position(AAA)
    assert position is not None and position["side"] == "long" and position["stop"]
    [ext] = bot.facts("external_position")
    assert ext["reason"] == "adopted"
    assert_agrees(bot)
    assert_settled(bot)
    # The scan manages it from here, on its own candles only.
    bot.after_candle(4)
    record = bot.job("scan")
    assert record["outcome"] == "ok" and record["summary"]["exits"] == 0
    assert bot.position(AAA) is not None


def test_a_stop_cancelled_behind_the_bots_back_is_replaced(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 5)})
    position = open_long(bot)
    old = position["stop"]["client_order_id"]
    bot.venue.cancel_order(None, AAA, {"trigger": True, "clientOrderId": old})
    report = reconciled(bot)
    assert report["status"] == "corrected"
    assert "missing_stop" in kinds(report)
    new = bot.position(AAA)["stop"]
    assert new and new["client_order_id"] != old
    assert Decimal(new["price"]) == Decimal(position["stop"]["price"])
    assert_agrees(bot)
    assert_settled(bot)


def test_a_missing_stop_the_price_has_passed_closes_the_position_at_market(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": FALL})
    position = open_long(bot)
    old = position["stop"]
    bot.venue.cancel_order(None, AAA, {"trigger": True, "clientOrderId": old["client_order_id"]})
    bot.after_candle(1)  # the price falls through the stop's level: nothing rests to catch it
    assert bot.exchange_positions() and bot.venue.fetch_ticker(AAA)["last"] < float(old["price"])
    report = reconciled(bot)
    assert report["status"] == "corrected"
    [missing] = [d for d in report["differences"] if d["kind"] == "missing_stop"]
    past, _, then = missing["correction"].partition(": ")
    assert past.startswith("price already past the stop") and then == "closed at market"
    assert Decimal(past.rsplit(" ", 1)[1]) == Decimal(old["price"])
    assert bot.position(AAA) is None and not bot.exchange_positions()  # not left unprotected
    [closed] = bot.facts("position_closed", position_id=position["position_id"])
    assert closed["reason"] == "stop_loss" and Decimal(closed["pnl"]) < 0
    [refused] = [o for o in bot.facts("order_intent") if o["client_order_id"] != old[
        "client_order_id"] and json.loads(o["data"])["purpose"] == "stop"]
    assert bot.resting_stops() == []
    assert json.loads(bot.facts("order_update", client_order_id=refused["client_order_id"])[-1][
        "data"])["state"] == "rejected"
    assert_agrees(bot)
    assert_settled(bot)


def test_a_stop_left_by_a_closed_position_blocks_entries_until_reconcile_cancels_it(
        bot_factory):
    """A move could not cancel the old stop (98), then the new one (99) fired and the
    old one's cancel failed again: it rests, reduce-only, and would close the next
    position in the symbol. No entry there until reconcile has cancelled it."""
    path = flat(100, 3) + [candle(100, 100.3, 98.5, 98.8)] + flat(99, 10)
    bot = bot_factory(strat=Pick(long_at=[T0 - TF, T0 + 4 * TF, T0 + 5 * TF]),
                      paths={"AAA": path}, exchange={"read_retries": 0},
                      risk={"cooldown_minutes": 0})
    position = open_long(bot)
    ex = Executor(bot.ledger, bot.client, bot.clock, bot.rt.config, "move", bot.rt.lock)
    bot.venue.faults.script([("cancel_order", "network_error")])
    ex.move_stop(position, Decimal("99"), at_once=True)
    assert len(bot.resting_stops()) == 2
    bot.after_candle(3)  # the new stop fired: the exit finds it filled, cancels the old
    bot.venue.faults.script([("cancel_order", None), ("cancel_order", "network_error")])
    bot.job("scan")
    assert bot.position(AAA) is None
    [stray] = bot.resting_stops()
    assert stray["clientOrderId"] == position["stop"]["client_order_id"]
    bot.after_candle(4)
    assert bot.job("scan")["outcome"] == "ok" and bot.position(AAA) is None
    [refused] = [json.loads(r["data"]) for r in bot.facts("risk_decision")
                 if json.loads(r["data"]).get("approved") is False]
    assert refused["reason"] == "stray_stop", refused
    assert kinds(reconciled(bot)) == ["orphan_stop"]
    assert not bot.resting_stops()
    bot.after_candle(5)
    bot.job("scan")
    assert bot.position(AAA) is not None  # entered, under its own stop only
    assert len(bot.resting_stops()) == 1


def test_a_stray_stop_the_exchange_no_longer_knows_is_recorded_gone(bot_factory):
    """Cancelled by hand while the bot was down, and forgotten by the exchange (Binance
    keeps a cancelled order 3 days): it neither rests nor is known. It was reported to a
    human at every run and barred entries in its symbol for good."""
    path = flat(100, 3) + [candle(100, 100.3, 98.5, 98.8)] + flat(99, 10)
    bot = bot_factory(strat=Pick(long_at=[T0 - TF]), paths={"AAA": path},
                      exchange={"read_retries": 0})
    position = open_long(bot)
    ex = Executor(bot.ledger, bot.client, bot.clock, bot.rt.config, "move", bot.rt.lock)
    bot.venue.faults.script([("cancel_order", "network_error")])
    ex.move_stop(position, Decimal("99"), at_once=True)
    bot.after_candle(3)
    bot.venue.faults.script([("cancel_order", None), ("cancel_order", "network_error")])
    bot.job("scan")
    [stray] = bot.resting_stops()
    bot.venue.cancel_order(None, AAA, {"clientOrderId": stray["clientOrderId"], "trigger": True})
    bot.clock.advance(4 * DAY)
    report = reconciled(bot)
    assert report["status"] == "corrected" and kinds(report) == ["missing_order"]
    assert coid_state(bot, stray["clientOrderId"]) == "expired"
    assert AAA not in RiskState.from_ledger(bot.ledger.state(), bot.clock.now_ms()).stray_stops
    assert_settled(bot)


def test_an_orphaned_stop_of_ours_is_cancelled_but_a_foreign_one_is_left(bot_factory,
                                                                         monkeypatch):
    bot = bot_factory(paths={"AAA": flat(100, 5), "BBB": flat(50, 5)})
    q = qty(bot, AAA)
    bot.venue.create_order(AAA, "market", "sell", q, None,
                           {"triggerPrice": 90, "reduceOnly": True, "clientOrderId": "bot1-S-x"})
    bot.venue.create_order(BBB, "market", "sell", q, None,
                           {"triggerPrice": 40, "reduceOnly": True, "clientOrderId": "other-1"})
    report = reconciled(bot)
    assert report["status"] == "corrected"
    assert kinds(report) == ["foreign_order", "orphan_stop"]
    assert [o["clientOrderId"] for o in bot.resting_stops()] == ["other-1"]
    before = bot.counts()
    again = reconciled(bot)
    assert again["status"] == "in_sync" and kinds(again) == ["foreign_order"]
    assert added(before, bot.counts()) == {"job_run": 1}
    # A run that cannot read the open orders does not take it for gone
    read = bot.rt.client.open_orders

    def unreadable(*args, **kwargs):
        raise ccxt.NetworkError("timed out")

    monkeypatch.setattr(bot.rt.client, "open_orders", unreadable)
    assert kinds(reconciled(bot)) == ["foreign_order", "stops"]
    monkeypatch.setattr(bot.rt.client, "open_orders", read)
    assert kinds(reconciled(bot)) == ["foreign_order"]
    # Its owner cancels it: the change is recorded once, as an in_sync run.
    bot.venue.cancel_order(None, BBB, {"trigger": True, "clientOrderId": "other-1"})
    before = bot.counts()
    assert reconciled(bot)["differences"] == []
    assert added(before, bot.counts()) == {"job_run": 1, "reconcile_run": 1}
    assert bot.facts("reconcile_run")[-1]["reason"] == "in_sync"
    assert_settled(bot)


# -- dry run ------------------------------------------------------------------------------

def test_a_dry_run_records_nothing_and_changes_nothing(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": FALL, "BBB": flat(50, 5)})
    open_long(bot)
    bot.after_candle(1)
    bot.venue.create_order(BBB, "market", "buy", qty(bot, BBB))
    seq = bot.ledger.state().seq
    data = bot.ledger.path.read_bytes()
    orders = bot.venue.fetch_open_orders(None, params={"trigger": True})
    report = reconcile.run(bot.rt, bot.clock.now_ms(), "dry", dry_run=True)
    assert report["dry_run"] is True and report["status"] == "needs_human"
    assert report["corrections"] == []
    assert {"order_state", "external_position"} <= set(kinds(report))
    assert bot.ledger.state().seq == seq and bot.ledger.path.read_bytes() == data
    assert bot.venue.fetch_open_orders(None, params={"trigger": True}) == orders


def stop_hit(bot):
    open_long(bot)
    bot.after_candle(1)


def closed_by_hand(bot):
    position = open_long(bot)
    bot.venue.create_order(AAA, "market", "sell", float(position["amount"]), None,
                           {"reduceOnly": True})


def reduced_by_hand(bot):
    position = open_long(bot)
    bot.venue.create_order(AAA, "market", "sell", float(Decimal(position["amount"]) / 2), None,
                           {"reduceOnly": True})


def external(bot):
    bot.venue.create_order(BBB, "market", "buy", qty(bot, BBB))


def entry_crash(bot):
    bot.venue.crash = ("after", False)
    with pytest.raises(Crash):
        open_long(bot)
    bot.clock.advance(30_000)


def stop_cancelled(bot):
    position = open_long(bot)
    bot.venue.cancel_order(None, AAA, {"trigger": True,
                                       "clientOrderId": position["stop"]["client_order_id"]})


@pytest.mark.parametrize(("scenario", "adopt"), [
    *((f, False) for f in (stop_hit, closed_by_hand, reduced_by_hand, external, entry_crash,
                           stop_cancelled)),
    (external, True)], ids=lambda x: getattr(x, "__name__", "adopt" if x else "flag"))
def test_a_dry_run_reports_what_the_real_run_then_does(bot_factory, scenario, adopt):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": FALL, "BBB": flat(50, 5)},
                      venue_cls=CrashingSim,
                      reconcile={"external_positions": "adopt" if adopt else "flag"})
    scenario(bot)
    seq = bot.ledger.state().seq
    dry = reconcile.run(bot.rt, bot.clock.now_ms(), "dry", dry_run=True)
    assert bot.ledger.state().seq == seq
    real = reconciled(bot)
    assert real["status"] != "in_sync"
    shape = [(d["kind"], d["symbol"], d["severity"]) for d in real["differences"]]
    assert [(d["kind"], d["symbol"], d["severity"]) for d in dry["differences"]] == shape
    assert dry["status"] == real["status"]
    if real["status"] == "corrected":
        assert_settled(bot)


def test_a_dry_run_agrees_on_an_entry_settled_after_its_position_closed(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": flat(100, 5)}, venue_cls=StuckEntrySim)
    open_long(bot)
    bot.venue.stuck = False
    bot.after_candle(0)
    ex = Executor(bot.ledger, bot.client, bot.clock, bot.rt.config, "exit-test", bot.rt.lock)
    assert ex.close_position(bot.position(AAA), "test exit", T0)
    dry = reconcile.run(bot.rt, bot.clock.now_ms(), "dry", dry_run=True)
    real = reconciled(bot)
    shape = [(d["kind"], d["symbol"], d["severity"]) for d in real["differences"]]
    assert shape == [("order_state", AAA, "fix")]  # no phantom position, no stop for it
    assert [(d["kind"], d["symbol"], d["severity"]) for d in dry["differences"]] == shape


def test_every_correction_is_recorded_under_the_reconcile_run(bot_factory):
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": FALL})
    open_long(bot)
    bot.after_candle(1)
    reconciled(bot)
    [run] = bot.facts("reconcile_run")
    assert run["reason"] == "corrected"
    assert json.loads(run["data"])["corrections"]
    [job] = [r for r in bot.facts("job_run") if json.loads(r["data"])["job"] == "reconcile"]
    assert run["run_id"] == job["run_id"]
    for type_ in ("fill", "order_update", "position_closed"):
        assert bot.facts(type_, run_id=run["run_id"]), type_


def test_hours_of_trading_record_every_trade_once_with_sweeps_from_the_seq_floor(bot_factory):
    """Eight hours of entries stopped out by dips, with a reconcile every half hour: every
    account trade is in the ledger exactly once, though the sweeps' time-window queries
    read only the ledger's recent end (Ledger.seq_floor) rather than all of it."""
    dip = candle(100, 100.3, 97.0, 99.8)  # through the 2 % stop
    cycle = [*flat(100, 3), dip, *flat(100, 8)]  # 12 candles: clear of the 30 min cooldown
    path = cycle * 8
    longs = [T0 + (k - 1) * TF for k in range(0, len(path), len(cycle))]
    bot = bot_factory(strat=Pick(long_at=longs), paths={"AAA": path})
    bot.set_coins([AAA])
    bot.job("scan", T0)
    floors = []
    for k in range(len(path)):
        bot.after_candle(k)
        assert bot.job("scan")["outcome"] == "ok"
        if k % 6 == 5:
            floors.append(bot.ledger.seq_floor(bot.clock.now_ms() - 20 * 60_000))
            report = reconciled(bot)
            assert "unrecorded_fill" not in kinds(report), report
    assert len(bot.facts("position_closed")) == 8
    assert floors[0] == 0 and floors[-1] > bot.ledger.last_seq() // 2  # reads the recent end
    recorded = [json.loads(f["data"])["trade_id"] for f in bot.facts("fill")]
    trades = bot.venue.fetch_my_trades(AAA, T0 - TF)
    assert sorted(recorded) == sorted(str(t["id"]) for t in trades)  # each exactly once
    assert_settled(bot)


def test_the_seq_floor_slack_is_an_hour_of_real_time_on_an_accelerated_clock(bot_factory):
    bot = bot_factory(paths={"AAA": flat(100, 3)})
    hour = 3_600_000
    bot.ledger.append([Fact("job_run", T0 - k * hour, data={"job": "scan", "outcome": "ok"})
                       for k in (500, 100, 2)])
    assert bot.rt.seq_floor(T0) == bot.ledger.last_seq()  # the run 2 h before
    bot.rt.clock = AcceleratedClock(T0, speed=200.0)  # an hour of real time: 200 h of bot time
    assert bot.rt.seq_floor(T0) == bot.ledger.last_seq() - 2  # the run 500 h before
