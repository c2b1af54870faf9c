"""The execution layer (core.execution) against the simulated exchange, faults on.

Real pieces only: a Ledger on a tmp file, the SimExchange in memory on a VirtualClock
(ccxt's own parsers and error mapping inside), the careful ExchangeClient. The venue is
subclassed only to watch it: every create/cancel call is logged with what the ledger
file said at that instant (read through a separate read-only connection) and which
stops were resting, and a test may hook a call to move time or crash the process.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from decimal import Decimal

import pytest
from sim_fixtures import answer_entries_new_unseen, hide_orders_stops_became

from core.clock import VirtualClock
from core.config import Config
from core.exchange import NOT_FOUND_FINAL_MS, ExchangeClient
from core.exchange_types import OrderRequest
from core.execution import Executor, executed, unsettled
from core.exits import stop_on_tick
from core.orders import IllegalTransition, client_order_id
from core.sim_account import Spec
from core.sim_exchange import SimExchange
from ledger import Fact, Ledger

T0 = 1_767_268_800_000  # 2026-01-01T12:00:00Z
TF = 300_000  # the sim's 5m candles
SYM = "ALPHA/USDT:USDT"
SYM2 = "BRAVO/USDT:USDT"


class Crash(BaseException):
    """The process dies here (nothing catches a BaseException on its way out)."""


@dataclass
class Call:
    method: str
    client_id: str | None
    trigger: bool
    reduce_only: bool
    ledger_states: list  # orders_timeline states of this client id, read at call time
    resting_stops: set  # client ids of stops resting just before the call


class WatchedSim(SimExchange):
    """The simulated exchange, watched: see the module docstring."""

    ledger_path = None
    hooks: dict

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls: list[Call] = []
        self.hooks = {}

    def _watch(self, method: str, params: dict) -> None:
        p = params or {}
        cid = p.get("clientOrderId")
        states = []
        if self.ledger_path is not None and cid:
            ro = sqlite3.connect(f"file:{self.ledger_path}?mode=ro", uri=True)
            try:
                states = [r[0] for r in ro.execute(
                    "SELECT state FROM orders_timeline WHERE client_order_id = ? ORDER BY seq",
                    (cid,))]
            finally:
                ro.close()
        resting = {o.client_id for o in self.store.open_orders() if o.algo}
        trigger = bool(p.get("triggerPrice") or p.get("trigger"))
        self.calls.append(Call(method, cid, trigger, bool(p.get("reduceOnly")), states,
                               resting))
        hook = self.hooks.get((method, trigger))
        if hook is not None:
            hook(cid)

    def create_order(self, symbol, type, side, amount, price=None, params=None):  # noqa: A002
        self._watch("create_order", params)
        return super().create_order(symbol, type, side, amount, price, params)

    def cancel_order(self, id, symbol=None, params=None):  # noqa: A002
        self._watch("cancel_order", params)
        return super().cancel_order(id, symbol, params)

    def creates(self, trigger: bool | None = None) -> list[Call]:
        return [c for c in self.calls if c.method == "create_order"
                and (trigger is None or c.trigger == trigger)]


@dataclass
class World:
    cfg: Config
    clock: VirtualClock
    sim: WatchedSim
    client: ExchangeClient
    ledger: Ledger
    ex: Executor
    hooks: dict = field(default_factory=dict)

    # -- helpers ------------------------------------------------------------------------

    def price(self, symbol: str = SYM) -> Decimal:
        return self.client.tickers()[symbol].last

    def amount(self, symbol: str = SYM, usdt: str = "1000") -> Decimal:
        px = self.price(symbol)
        amount, why = self.client.prepare_amount(symbol, Decimal(usdt) / px, px)
        assert amount is not None, why
        return amount

    def position(self, symbol: str = SYM) -> dict | None:
        return self.ledger.state().positions.get(symbol)

    def open(self, side: str = "long", symbol: str = SYM, stop_pct: float | None = 2.0,
             decision_ms: int | None = None, usdt: str = "1000", before=()) -> dict | None:
        decision = decision_ms if decision_ms is not None else self.candle()
        return self.ex.open_position(symbol, side, self.amount(symbol, usdt), decision,
                                     stop_pct=stop_pct, ref_price=self.price(symbol),
                                     before=before)

    def candle(self) -> int:
        """Open time of the last closed candle: what a decision is made on."""
        now = self.clock.now_ms()
        return now - now % TF - TF

    def states(self, coid: str) -> list[str]:
        return [r["state"] for r in self.ledger.select(
            "SELECT state FROM orders_timeline WHERE client_order_id = ? ORDER BY seq",
            (coid,))]

    def facts(self, type_: str, **where) -> list[dict]:
        sql = "SELECT * FROM facts WHERE type = ?"
        params = [type_]
        for col, value in where.items():
            sql += f" AND {col} = ?"
            params.append(value)
        return self.ledger.select(sql + " ORDER BY seq", params)

    def exchange_positions(self) -> dict[str, dict]:
        return {p["symbol"]: p for p in self.sim.fetch_positions()}

    def resting_stops(self, symbol: str = SYM) -> list[dict]:
        return self.sim.fetch_open_orders(symbol, params={"trigger": True})

    def trades(self, symbol: str = SYM) -> list[dict]:
        return self.sim.fetch_my_trades(symbol, T0 - 60_000)

    def step(self, ms: int = TF) -> None:
        self.clock.advance(ms)
        self.sim.step_to(self.clock.now_ms())

    def until_triggered(self, coid: str, symbol: str = SYM, limit: int = 3000) -> None:
        """Move time on, one candle at a time, until the stop ``coid`` has fired."""
        for _ in range(limit):
            self.step()
            order = self.sim.fetch_order(None, symbol, {"trigger": True, "clientOrderId": coid})
            if order["status"] != "open":
                return
        raise AssertionError(f"stop {coid} never triggered")


def make_world(tmp_path, **sections) -> World:
    cfg = Config().with_values(sim={"symbols": 3, **sections.pop("sim", {})}, **sections)
    clock = VirtualClock(T0)
    sim = WatchedSim.from_config(cfg, clock)
    ledger = Ledger(tmp_path / "bot.db")
    sim.ledger_path = ledger.path
    client = ExchangeClient(sim, cfg, clock)
    ex = Executor(ledger, client, clock, cfg, run_id="test")
    return World(cfg, clock, sim, client, ledger, ex)


@pytest.fixture
def w(tmp_path):
    world = make_world(tmp_path)
    yield world
    world.ledger.close()


def signal_fact(w: World, symbol: str = SYM) -> Fact:
    return Fact("signal", w.clock.now_ms(), symbol=symbol, side="long", reason="test",
                data={"candle_ts": w.candle()})


def fees_of(trades: list[dict]) -> Decimal:
    return sum((Decimal(t["info"]["commission"]) for t in trades), Decimal(0))


# -- entry and its stop -----------------------------------------------------------------

@pytest.mark.parametrize("side", ["long", "short"])
def test_entry_fill_places_a_reduce_only_stop_at_stop_loss_pct_from_the_fill(w, side):
    position = w.open(side, stop_pct=2.0)

    [fill] = w.trades()
    avg = Decimal(fill["info"]["price"])
    assert Decimal(position["amount"]) == Decimal(fill["info"]["qty"])
    assert Decimal(position["entry_price"]) == avg
    assert Decimal(position["fees"]) == Decimal(fill["info"]["commission"])
    [stop] = w.resting_stops()
    factor = Decimal("0.98") if side == "long" else Decimal("1.02")
    # on the tick, rounded the protective way: never more than 2 % from the fill
    expected = stop_on_tick(side, avg * factor, w.client.market(SYM).price_step)
    assert Decimal(str(stop["triggerPrice"])) == expected
    assert abs(expected - avg) <= avg * Decimal("0.02")
    assert stop["reduceOnly"] is True
    assert stop["side"] == ("sell" if side == "long" else "buy")
    assert Decimal(str(stop["amount"])) == Decimal(position["amount"])
    # The returned position is the ledger's, stop included.
    assert position["stop"]["client_order_id"] == stop["clientOrderId"]
    assert Decimal(position["stop"]["price"]) == expected
    assert w.exchange_positions()[SYM]["side"] == side


def test_every_transition_is_a_ledger_row(w):
    position = w.open()
    entry, stop = position["position_id"], position["stop"]["client_order_id"]
    assert w.states(entry) == ["intent", "submitted", "fill", "filled"]
    assert w.states(stop) == ["intent", "submitted", "accepted"]
    w.step()
    assert w.ex.close_position(w.position(), "signal", w.candle())
    exit_ = client_order_id("bot1", SYM, "exit", w.candle())
    assert w.states(stop) == ["intent", "submitted", "accepted", "cancelled"]
    assert w.states(exit_) == ["intent", "submitted", "fill", "filled"]
    assert w.ledger.verify().ok
    assert w.ledger.state().orders == {}  # nothing left unresolved
    assert w.ledger.state().positions == {}


def test_intent_is_committed_before_the_exchange_sees_the_order(w):
    position = w.open()
    w.step()
    w.ex.close_position(w.position(), "signal", w.candle())
    creates = w.sim.creates()
    assert [c.trigger for c in creates] == [False, True, False]  # entry, stop, exit
    for call in creates:
        # Read from the file through another connection while the venue handles the
        # call: intent and submitted committed, no outcome yet.
        assert call.ledger_states == ["intent", "submitted"], call
    rows = w.ledger.select("SELECT seq, type FROM facts WHERE client_order_id = ? ORDER BY seq",
                           (position["position_id"],))
    kinds = [r["type"] for r in rows]
    assert kinds[:2] == ["order_intent", "order_submitted"]
    assert kinds.index("order_update") > 1


def test_a_crash_right_after_the_intent_leaves_the_intent_and_sends_nothing(w, monkeypatch):
    real_append = w.ledger.append

    def append(facts):
        if any(f.type == "order_submitted" for f in facts):
            raise Crash("killed between intent and submission")
        return real_append(facts)

    monkeypatch.setattr(w.ledger, "append", append)
    decision = w.candle()
    with pytest.raises(Crash):
        w.open(decision_ms=decision)
    coid = client_order_id("bot1", SYM, "entry", decision)
    assert w.states(coid) == ["intent"]
    assert w.sim.creates() == []  # nothing reached the exchange

    monkeypatch.setattr(w.ledger, "append", real_append)  # restart
    assert w.open(decision_ms=decision) is None  # the same decision is not sent again
    assert w.sim.creates() == []
    order = w.ledger.state().orders[coid]
    w.clock.advance(NOT_FOUND_FINAL_MS)
    req = OrderRequest(SYM, "buy", Decimal(order["amount"]), coid)
    result = w.client.resolve_unknown(req, order["ts"])
    assert result.status == "rejected"
    w.ex.record([w.ex.update(req, "intent", "rejected", reason=result.reason)])
    assert coid not in w.ledger.state().orders
    assert w.exchange_positions() == {} and w.position() is None


def test_a_crash_inside_the_send_leaves_submitted_and_reconcile_can_settle_it(w):
    decision = w.candle()
    coid = client_order_id("bot1", SYM, "entry", decision)

    def die(cid):
        raise Crash("killed while sending")

    w.sim.hooks[("create_order", False)] = die
    with pytest.raises(Crash):
        w.open(decision_ms=decision)
    assert w.states(coid) == ["intent", "submitted"]
    assert w.exchange_positions() == {}
    w.sim.hooks.clear()
    assert w.open(decision_ms=decision) is None
    assert len(w.sim.creates()) == 1  # only the call that died
    order = w.ledger.state().orders[coid]
    assert order["state"] == "submitted"
    w.clock.advance(NOT_FOUND_FINAL_MS)
    result = w.client.resolve_unknown(OrderRequest(SYM, "buy", Decimal(order["amount"]), coid),
                                      order["ts"])
    assert result.status == "rejected"


def test_the_same_decision_sends_one_order_only(w):
    decision = w.candle()
    coid = client_order_id("bot1", SYM, "entry", decision)
    req = OrderRequest(SYM, "buy", w.amount(), coid)
    first = w.ex.send(req, "entry", position_id=coid, ref_price=w.price())
    assert first is not None and first.status == "accepted"
    assert w.ex.send(req, "entry", position_id=coid, ref_price=w.price()) is None
    assert w.open(decision_ms=decision) is None
    assert [c.client_id for c in w.sim.creates()] == [coid]


def test_an_illegal_transition_raises_before_anything_is_recorded(w):
    position = w.open()
    before = w.ledger.last_seq()
    req = OrderRequest(SYM, "buy", Decimal(position["amount"]), position["position_id"])
    for current, new in [("filled", "accepted"), ("intent", "filled"), ("accepted", "intent"),
                         ("cancelled", "filled"), ("rejected", "unknown")]:
        with pytest.raises(IllegalTransition):
            w.ex.update(req, current, new)
    assert w.ledger.last_seq() == before


# -- faults on submission ---------------------------------------------------------------

def test_a_timeout_after_acceptance_never_leads_to_a_second_order(w):
    w.sim.faults.script([("create_order", "timeout_after_accept")])
    decision = w.candle()
    coid = client_order_id("bot1", SYM, "entry", decision)
    position = w.open(decision_ms=decision)

    assert position is not None  # found by its client id, settled, protected
    assert w.states(coid) == ["intent", "submitted", "fill", "filled"]
    assert [c.client_id for c in w.sim.creates(trigger=False)] == [coid]
    assert w.sim.faults.counts["timeout_after_accept"] == 1
    # The same decision again (a retried scan): nothing is sent.
    assert w.open(decision_ms=decision) is None
    assert [c.client_id for c in w.sim.creates(trigger=False)] == [coid]
    assert Decimal(str(w.exchange_positions()[SYM]["contracts"])) == Decimal(position["amount"])


def test_a_timeout_after_acceptance_with_lookups_failing_is_unknown_never_resent(w):
    lookups = (1 + w.cfg.exchange.read_retries) * 3  # every lookup the client tries
    w.sim.faults.script([("create_order", "timeout_after_accept")]
                        + [("fetch_order", "timeout")] * lookups)
    decision = w.candle()
    coid = client_order_id("bot1", SYM, "entry", decision)
    assert w.open(decision_ms=decision) is None
    assert w.states(coid) == ["intent", "submitted", "unknown"]
    assert w.sim.faults.pending == []
    for _ in range(3):  # retried decisions: still one order
        assert w.open(decision_ms=decision) is None
    assert len(w.sim.creates(trigger=False)) == 1
    # Reconciliation's lookup later finds what really happened: accepted (and filled).
    order = w.ledger.state().orders[coid]
    result = w.client.resolve_unknown(OrderRequest(SYM, "buy", Decimal(order["amount"]), coid),
                                      order["ts"])
    assert result.status == "accepted" and result.order.status == "closed"
    w.ex.record([w.ex.update(result.request, "unknown", "filled", position_id=coid)])
    assert coid not in w.ledger.state().orders


@pytest.mark.parametrize(("fault", "state"), [
    ("network_error", "unknown"),  # may or may not have left: looked up, not found
    ("timeout", "unknown"),
    ("server_error", "unknown"),
    ("rate_limit", "rejected"),  # refused at the gateway: certainly not processed
    ("clock_skew", "rejected"),
])
def test_a_submission_that_never_reaches_the_book(w, fault, state):
    w.sim.faults.script([("create_order", fault)])
    decision = w.candle()
    coid = client_order_id("bot1", SYM, "entry", decision)
    assert w.open(decision_ms=decision) is None
    assert w.states(coid) == ["intent", "submitted", state]
    assert w.exchange_positions() == {} and w.position() is None
    assert w.resting_stops() == [] and w.sim.creates(trigger=True) == []
    assert w.open(decision_ms=decision) is None
    assert len(w.sim.creates()) == 1
    if state == "unknown":  # reconcile, a minute on: never placed
        w.clock.advance(NOT_FOUND_FINAL_MS)
        order = w.ledger.state().orders[coid]
        req = OrderRequest(SYM, "buy", Decimal(order["amount"]), coid)
        result = w.client.resolve_unknown(req, order["ts"])
        assert result.status == "rejected"
        w.ex.record([w.ex.update(req, "unknown", "rejected", reason=result.reason)])
        assert w.ledger.state().orders == {}


@pytest.mark.parametrize("how", ["insufficient_funds", "reject", "too_big"])
def test_a_rejected_order_leaves_no_position_and_no_stop(w, how):
    usdt = "1000"
    if how == "too_big":
        usdt = "10000000"  # real -2019 from the sim's margin check
    else:
        w.sim.faults.script([("create_order", how)])
    decision = w.candle()
    coid = client_order_id("bot1", SYM, "entry", decision)
    assert w.open(decision_ms=decision, usdt=usdt) is None
    assert w.states(coid) == ["intent", "submitted", "rejected"]
    [update] = w.facts("order_update", client_order_id=coid)
    assert "Margin is insufficient" in update["reason"] or "PERCENT_PRICE" in update["reason"]
    assert w.position() is None and w.exchange_positions() == {}
    assert w.resting_stops() == [] and w.sim.creates(trigger=True) == []
    assert w.facts("order_intent", position_id=coid) == w.facts("order_intent",
                                                                client_order_id=coid)


def test_a_stop_refused_outright_is_tried_once_more(w):
    def refuse_first_stop(cid):
        if "-S1-" in cid:
            w.sim.faults.script([("create_order", "rate_limit")])

    w.sim.hooks[("create_order", True)] = refuse_first_stop
    position = w.open()
    s1, s2 = (c.client_id for c in w.sim.creates(trigger=True))
    assert w.states(s1) == ["intent", "submitted", "rejected"]
    assert w.states(s2) == ["intent", "submitted", "accepted"]
    assert position["stop"]["client_order_id"] == s2
    assert [s["clientOrderId"] for s in w.resting_stops()] == [s2]


def test_an_entry_whose_stop_the_price_has_already_passed_is_closed_at_once(tmp_path):
    # 1 % slippage on a 0.5 % stop: the stop's level is above the price right after the
    # fill, so Binance refuses it (-2021); the position must not stay unprotected.
    w = make_world(tmp_path, sim={"slippage_bps": 100.0})
    assert w.open("long", stop_pct=0.5) is None
    [stop] = w.sim.creates(trigger=True)  # refused once, not tried again
    assert w.states(stop.client_id) == ["intent", "submitted", "rejected"]
    [closed] = w.facts("position_closed")
    assert closed["reason"] == "stop_loss" and Decimal(closed["pnl"]) < 0
    assert w.exchange_positions() == {} and w.resting_stops() == []
    assert w.ledger.state().orders == {}
    w.ledger.close()


@pytest.mark.parametrize("exit_outcome", ["partial", "ambiguous"])
def test_a_stop_past_the_price_sends_one_exit_even_if_it_does_not_close(tmp_path,
                                                                        exit_outcome):
    w = make_world(tmp_path, sim={"slippage_bps": 100.0,
                                  "partial_fill_prob": 1.0 if exit_outcome == "partial" else 0})

    def slow_exit(cid):  # a second passes, so a new exit would get a new client id
        w.clock.advance(1_500)
        if exit_outcome == "ambiguous" and "-X-" in cid:
            w.sim.faults.script([("create_order", "server_error")])

    w.sim.hooks[("create_order", False)] = slow_exit
    w.open("long", stop_pct=0.5)
    exits = [c for c in w.sim.creates(trigger=False) if c.reduce_only]
    assert len(exits) == 1  # the exit at market, never a second one on a stale position
    assert len(w.sim.creates(trigger=True)) <= 2  # the refused stop (+ one for the rest)
    ours, theirs = w.position(), w.exchange_positions().get(SYM)
    assert ours is not None and theirs is not None
    if exit_outcome == "partial":  # the ledger holds what is left, behind a stop
        assert Decimal(ours["amount"]) == Decimal(str(theirs["contracts"]))
        [stop] = w.resting_stops()
        assert ours["stop"]["client_order_id"] == stop["clientOrderId"]
        assert Decimal(str(stop["amount"])) == Decimal(ours["amount"])
    else:  # its outcome is reconcile's to settle: nothing more is sent meanwhile
        assert w.states(exits[0].client_id)[-1] == "unknown"
    w.ledger.close()


def test_a_stop_accepted_behind_a_timeout_is_found_and_recorded_once(w):
    w.sim.hooks[("create_order", True)] = \
        lambda cid: w.sim.faults.script([("create_order", "timeout_after_accept")])
    position = w.open()
    [stop] = w.sim.creates(trigger=True)
    assert w.states(stop.client_id) == ["intent", "submitted", "accepted"]
    assert position["stop"]["client_order_id"] == stop.client_id
    assert len(w.resting_stops()) == 1


@pytest.mark.parametrize("lookups", [1, 6])
def test_an_entry_answered_new_and_not_yet_visible_is_protected_at_once(w, lookups):
    # 6: five lookups (a few seconds), then the cancel of the rest finds it filled
    answer_entries_new_unseen(w.sim, lookups)
    position = w.open()
    assert position is not None  # not left to reconcile, minutes without a stop
    entry = position["position_id"]
    assert w.states(entry) == ["intent", "submitted", "fill", "filled"]
    [stop] = w.resting_stops()
    assert position["stop"]["client_order_id"] == stop["clientOrderId"]
    assert Decimal(position["amount"]) == Decimal(str(w.exchange_positions()[SYM]["contracts"]))
    assert len(w.sim.creates(trigger=False)) == 1  # never sent twice


def test_an_entry_unseen_for_longer_is_left_to_reconcile_and_never_sent_twice(w):
    answer_entries_new_unseen(w.sim, 1000)
    started = w.clock.now_ms()
    assert w.open() is None
    assert 1_000 < w.clock.now_ms() - started < 15_000  # seconds of looking, not minutes
    [entry] = w.sim.creates(trigger=False)
    assert w.states(entry.client_id) == ["intent", "submitted", "accepted"]
    assert w.exchange_positions() and w.position() is None  # reconcile's to settle
    assert w.open() is None and len(w.sim.creates(trigger=False)) == 1


# -- partial fills ----------------------------------------------------------------------

def test_a_partial_fill_is_the_position_and_the_rest_is_not_working(tmp_path):
    w = make_world(tmp_path, sim={"partial_fill_prob": 1.0})
    wanted = w.amount()
    decision = w.candle()
    position = w.ex.open_position(SYM, "long", wanted, decision, stop_pct=2.0,
                                  ref_price=w.price())
    [fill] = w.trades()
    filled = Decimal(fill["info"]["qty"])
    assert 0 < filled < wanted
    assert Decimal(position["amount"]) == filled
    assert Decimal(str(w.exchange_positions()[SYM]["contracts"])) == filled
    assert w.sim.fetch_open_orders(SYM) == []  # the remainder is not working
    coid = client_order_id("bot1", SYM, "entry", decision)
    assert w.states(coid)[-1] == "expired"  # the rest expired on the exchange
    [stop] = w.resting_stops()
    assert Decimal(str(stop["amount"])) == filled
    live = w.ledger.state().orders  # only the stop is still working
    assert {k: o["state"] for k, o in live.items()} == {stop["clientOrderId"]: "accepted"}
    w.ledger.close()


# -- exits ------------------------------------------------------------------------------

def test_an_exit_cancels_the_stop_first_then_sends_a_reduce_only_order(w):
    position = w.open()
    stop = position["stop"]["client_order_id"]
    w.step()
    assert w.ex.close_position(w.position(), "signal", w.candle())
    exit_ = client_order_id("bot1", SYM, "exit", w.candle())
    order = [(c.method, c.client_id) for c in w.sim.calls]
    assert order.index(("cancel_order", stop)) < order.index(("create_order", exit_))
    [exit_call] = [c for c in w.sim.calls if c.client_id == exit_]
    assert exit_call.reduce_only and not exit_call.resting_stops
    assert w.exchange_positions() == {} and w.resting_stops() == []
    [closed] = w.facts("position_closed")
    assert closed["reason"] == "signal"


@pytest.mark.parametrize("side", ["long", "short"])
def test_a_stop_that_filled_before_the_exit_is_recorded_and_nothing_is_sent(w, side):
    position = w.open(side, stop_pct=0.3)
    stop = position["stop"]["client_order_id"]
    w.until_triggered(stop)
    assert w.exchange_positions() == {}  # the stop took it; the ledger does not know yet
    assert w.position() is not None

    before = [signal_fact(w)]
    assert w.ex.close_position(w.position(), "signal", w.candle(), before=before)

    assert [c.trigger for c in w.sim.creates()] == [False, True]  # no exit order
    assert not [r for r in w.facts("order_intent") if "-X-" in r["client_order_id"]]
    assert w.exchange_positions() == {}  # no reverse position
    [closed] = w.facts("position_closed")
    assert closed["reason"] == "stop_loss"
    assert w.states(stop) == ["intent", "submitted", "accepted", "fill", "filled"]
    assert w.facts("signal")  # the decision's facts are kept
    entry, exit_ = w.trades()
    assert Decimal(closed["price"]) == Decimal(exit_["info"]["price"])
    sign = 1 if side == "long" else -1
    gross = sign * (Decimal(exit_["info"]["price"]) - Decimal(entry["info"]["price"])) \
        * Decimal(entry["info"]["qty"])
    assert Decimal(closed["pnl"]) == gross - fees_of([entry, exit_])
    assert Decimal(closed["fee"]) == fees_of([entry, exit_])
    assert w.ledger.state().positions == {} and w.ledger.state().orders == {}


def test_a_stop_that_fired_with_its_outcome_not_visible_blocks_the_exit_until_it_is(w):
    position = w.open("long", stop_pct=0.3)
    stop = position["stop"]["client_order_id"]
    w.until_triggered(stop)
    hide_orders_stops_became(w.sim)
    report = w.ex.cancel_stop(w.position(), position["stop"])
    assert report.status == "triggered" and unsettled(report) and not executed(report)
    assert not w.ex.close_position(w.position(), "signal", w.candle())
    assert [c.trigger for c in w.sim.creates()] == [False, True]  # no exit sent
    assert w.states(stop) == ["intent", "submitted", "accepted"]  # nothing recorded on it
    assert w.position() is not None

    del w.sim.fetch_order  # now the venue shows it: the stop's fill is recorded, once
    assert w.ex.close_position(w.position(), "signal", w.candle())
    assert [c.trigger for c in w.sim.creates()] == [False, True]
    assert w.states(stop) == ["intent", "submitted", "accepted", "fill", "filled"]
    [closed] = w.facts("position_closed")
    assert closed["reason"] == "stop_loss"
    assert Decimal(closed["fee"]) == fees_of(w.trades())  # the real trades, fees and all


def test_a_stop_that_fills_during_the_exit_does_not_produce_a_reverse_position(w):
    position = w.open("long", stop_pct=0.3)
    stop = position["stop"]["client_order_id"]
    w.step()

    # The stop fires while the exit is cancelling it (the cancel call is in flight).
    w.sim.hooks[("cancel_order", True)] = lambda cid: w.until_triggered(stop)
    assert w.ex.close_position(w.position(), "signal", w.candle())
    assert w.exchange_positions() == {}
    assert not [c for c in w.sim.creates() if "-X-" in c.client_id]
    [closed] = w.facts("position_closed")
    assert closed["reason"] == "stop_loss"


def test_a_stale_exit_after_the_stop_filled_settles_the_stop_the_ledger_knows(w):
    # The caller's copy misses the stop (read before it was recorded): the exit still
    # settles every stop of the position the ledger holds, finds it filled, sends nothing.
    position = w.open("long", stop_pct=0.3)
    stop = position["stop"]["client_order_id"]
    w.until_triggered(stop)
    stale = dict(w.position(), stop=None)
    assert w.ex.close_position(stale, "signal", w.candle())
    exit_ = client_order_id("bot1", SYM, "exit", w.candle())
    assert w.states(exit_) == [] and w.states(stop)[-1] == "filled"
    [closed] = w.facts("position_closed")
    assert closed["reason"] == "stop_loss" and w.exchange_positions() == {}


def moved_leaving_the_old_stop(w: World, level_of) -> str:
    """A long whose stop moved to ``level_of(position)`` while the old stop's cancel
    failed (every retry): the old one rests on, unknown to the position. Its id."""
    position = w.open("long", stop_pct=2.0)
    w.step()
    w.clock.advance(w.cfg.exits.stop_move_interval_s * 1000)
    w.sim.faults.script([("cancel_order", "server_error")] * 5)
    assert w.ex.move_stop(w.position(), w.client.prepare_price(SYM, level_of(position)))
    assert len(w.resting_stops()) == 2
    return position["stop"]["client_order_id"]


def test_a_stop_that_closed_the_position_takes_an_old_one_a_move_left_with_it(w):
    old = moved_leaving_the_old_stop(w, lambda p: w.price() * Decimal("0.998"))
    new = w.position()["stop"]["client_order_id"]
    w.until_triggered(new)  # the new stop closes the position on the exchange
    w.step()
    assert w.ex.close_position(w.position(), "signal", w.candle())  # finds it filled
    assert w.states(new)[-1] == "filled" and w.states(old)[-1] == "cancelled"
    assert w.resting_stops() == [] and w.ledger.state().orders == {}


def test_an_exit_cancels_an_old_stop_a_move_could_not_cancel(w):
    # Closing the position must cancel the old stop too, or it would fire on the next one.
    old = moved_leaving_the_old_stop(
        w, lambda p: Decimal(p["stop"]["price"]) * Decimal("1.001"))
    w.step()
    assert w.ex.close_position(w.position(), "signal", w.candle())
    assert w.resting_stops() == [] and w.exchange_positions() == {}
    assert w.states(old)[-1] == "cancelled" and w.ledger.state().orders == {}


def test_a_stop_whose_outcome_stayed_unknown_does_not_keep_a_stop_from_being_put_back(w):
    position = w.open()
    w.step()
    w.clock.advance(w.cfg.exits.stop_move_interval_s * 1000)
    w.sim.faults.script([("create_order", "network_error")])  # never reaches the book
    w.sim.faults.script([("fetch_order", "network_error")] * 20)  # nor can it be looked up
    assert not w.ex.move_stop(w.position(),
                              Decimal(position["stop"]["price"]) * Decimal("1.001"))
    assert "unknown" in {o["state"] for o in w.ledger.state().orders.values()}
    w.step()  # minutes later the exit is refused, after its stop was cancelled
    w.sim.faults.script([("create_order", "reject")])
    assert not w.ex.close_position(w.position(), "signal", w.candle())
    [stop] = w.resting_stops()  # put back: the unknown one protects nothing
    assert w.position()["stop"]["client_order_id"] == stop["clientOrderId"]


@pytest.mark.parametrize("fault", ["server_error_after_accept", "server_error"])
def test_an_exit_goes_out_over_an_unresolved_one_only_while_the_exchange_holds_it(w, fault):
    # The first exit's answer is lost and it cannot be looked up. If it filled (the
    # exchange holds nothing), another would be pointless: reconcile settles the first.
    # If it never arrived, the position runs on beyond its exit with no stop (the exit
    # cancelled it): the next exit goes out, reduce-only, whatever became of the first.
    w.open()
    w.step()

    def ambiguous_and_unseen(cid):
        if "-X-" in cid:
            w.sim.faults.script([("create_order", fault),
                                 *[("fetch_order", "network_error")] * 20])

    w.sim.hooks[("create_order", False)] = ambiguous_and_unseen
    assert not w.ex.close_position(w.position(), "signal", w.candle())
    del w.sim.hooks[("create_order", False)]
    w.sim.faults.clear()  # the exchange answers again
    [first] = [c for c in w.sim.creates(trigger=False) if c.reduce_only]
    assert w.states(first.client_id)[-1] == "unknown"
    w.step()  # the next candle decides to exit again
    second = w.ex.close_position(w.position(), "signal", w.candle())
    exits = [c.client_id for c in w.sim.creates(trigger=False) if c.reduce_only]
    if fault == "server_error_after_accept":  # it filled
        assert not second and exits == [first.client_id]
        assert w.position() is not None  # until reconcile settles the first
    else:
        assert second and len(exits) == 2 and w.position() is None
        assert not w.exchange_positions()


def bare_behind_an_unresolved_exit(w) -> None:
    """An open position whose exit's answer is lost and whose stop could not be put back."""
    w.open()
    w.step()

    def ambiguous_and_unseen_then_no_stop(cid):
        if "-X-" in cid:
            w.sim.faults.script([("create_order", "server_error"),
                                 *[("fetch_order", "network_error")] * 20,
                                 ("create_order", "rate_limit")])

    w.sim.hooks[("create_order", False)] = ambiguous_and_unseen_then_no_stop
    assert not w.ex.close_position(w.position(), "signal", w.candle())
    del w.sim.hooks[("create_order", False)]
    w.sim.faults.clear()
    assert w.position()["stop"] is None and not w.resting_stops()


def test_a_position_bare_behind_an_unresolved_exit_gets_a_stop(w):
    # The exit's answer is lost (it never arrived) and putting the stop back is refused:
    # the position is bare. The next scan places a stop; it used to wait for reconcile to
    # settle the exit (up to its interval, 5 min), unprotected meanwhile.
    bare_behind_an_unresolved_exit(w)
    coid = w.ex.protect(w.position(), 2.0)
    [resting] = w.resting_stops()
    assert coid == resting["clientOrderId"] == w.position()["stop"]["client_order_id"]


def test_no_stop_is_tried_while_the_ip_is_banned(w):
    """Each scan wrote a stop intent, refused unsent, for as long as a ban lasts (up to
    three days: tens of thousands of facts); the stop is placed once it ends."""
    bare_behind_an_unresolved_exit(w)
    w.client.ban.hold(w.clock.now_ms() + 60_000)
    before = w.ledger.last_seq()
    for _ in range(3):
        assert w.ex.protect(w.position(), 2.0) is None
        w.clock.advance(10_000)
    assert w.ledger.last_seq() == before and not w.resting_stops()
    w.clock.advance(30_000)
    coid = w.ex.protect(w.position(), 2.0)
    [resting] = w.resting_stops()
    assert coid == resting["clientOrderId"]


def test_a_refused_exit_puts_a_stop_back(w):
    position = w.open()
    w.step()
    w.sim.faults.script([("create_order", "reject")])
    assert not w.ex.close_position(w.position(), "signal", w.candle())
    after = w.position()
    assert after is not None and after["stop"] is not None
    assert after["stop"]["client_order_id"] != position["stop"]["client_order_id"]
    [resting] = w.resting_stops()
    assert resting["clientOrderId"] == after["stop"]["client_order_id"]
    assert Decimal(str(resting["amount"])) == Decimal(after["amount"])


def test_retrying_an_exit_decision_leaves_the_replacement_stop_alone(w):
    w.open()
    w.step()
    lookups = (1 + w.cfg.exchange.read_retries) * 3
    decision = w.candle()
    exit_ = client_order_id("bot1", SYM, "exit", decision)
    # The exit's send fails ambiguously and every lookup of it fails too.
    w.sim.hooks[("create_order", False)] = lambda cid: cid == exit_ and w.sim.faults.script(
        [("create_order", "network_error")] + [("fetch_order", "timeout")] * lookups)
    assert not w.ex.close_position(w.position(), "signal", decision)
    assert w.states(exit_) == ["intent", "submitted", "unknown"]
    guard = w.position()["stop"]
    assert guard is not None  # protected while the exit is ambiguous
    assert not w.ex.close_position(w.position(), "signal", decision)
    assert w.position()["stop"] == guard
    assert [s["clientOrderId"] for s in w.resting_stops()] == [guard["client_order_id"]]
    assert len([c for c in w.sim.creates() if c.client_id == exit_]) == 1


# -- moving the stop --------------------------------------------------------------------

def test_move_stop_places_the_new_stop_before_cancelling_the_old(w):
    position = w.open(stop_pct=2.0)
    old = position["stop"]["client_order_id"]
    w.clock.advance(w.cfg.exits.stop_move_interval_s * 1000)
    level = w.client.prepare_price(SYM, w.price() * Decimal("0.99"))
    assert w.ex.move_stop(w.position(), level)

    new = w.position()["stop"]["client_order_id"]
    assert new != old
    calls = [(c.method, c.client_id) for c in w.sim.calls]
    assert calls.index(("create_order", new)) < calls.index(("cancel_order", old))
    [cancel] = [c for c in w.sim.calls if c.method == "cancel_order"]
    assert {old, new} <= cancel.resting_stops  # never bare
    [resting] = w.resting_stops()
    assert resting["clientOrderId"] == new
    assert Decimal(str(resting["triggerPrice"])) == level
    moved = w.facts("stop_moved", client_order_id=new)[0]["seq"]
    cancelled = w.facts("stop_cancelled", client_order_id=old)[0]["seq"]
    assert moved < cancelled
    assert w.states(old)[-1] == "cancelled"
    assert Decimal(w.position()["stop"]["price"]) == level


@pytest.mark.parametrize("interval_s", [30, 300])
def test_move_stop_happens_at_most_once_per_interval(tmp_path, interval_s):
    w = make_world(tmp_path, exits={"stop_move_interval_s": interval_s})
    w.open(stop_pct=2.0)
    level = w.client.prepare_price(SYM, w.price() * Decimal("0.99"))
    stops = len(w.sim.creates(trigger=True))
    assert not w.ex.move_stop(w.position(), level)
    w.clock.advance(interval_s * 1000 - 1)
    assert not w.ex.move_stop(w.position(), level)
    assert len(w.sim.creates(trigger=True)) == stops  # nothing sent
    w.clock.advance(1)
    assert w.ex.move_stop(w.position(), level)
    assert len(w.sim.creates(trigger=True)) == stops + 1
    w.clock.advance(interval_s * 1000 - 1)
    assert not w.ex.move_stop(w.position(), level * Decimal("1.001"))
    w.ledger.close()


def test_move_stop_when_the_old_stop_filled_in_between(w):
    position = w.open("long", stop_pct=0.3)
    old = position["stop"]["client_order_id"]
    w.clock.advance(w.cfg.exits.stop_move_interval_s * 1000)
    # A lower level the fall that takes the old stop does not reach.
    level = w.client.prepare_price(SYM, Decimal(position["entry_price"]) * Decimal("0.9"))
    # The old stop fires between placing the new one and cancelling the old.
    w.sim.hooks[("cancel_order", True)] = lambda cid: cid == old and w.until_triggered(old)
    assert w.ex.move_stop(w.position(), level)

    new = [c.client_id for c in w.sim.creates(trigger=True)][-1]
    assert w.exchange_positions() == {}
    assert w.resting_stops() == []  # the new stop is cancelled too
    assert w.states(new)[-1] == "cancelled"
    assert w.states(old)[-2:] == ["fill", "filled"]
    [closed] = w.facts("position_closed")
    assert closed["reason"] == "stop_loss"
    assert w.position() is None and w.ledger.state().orders == {}


def test_move_stop_refused_because_the_old_stop_already_took_the_position(w):
    position = w.open("long", stop_pct=0.3)
    old = position["stop"]["client_order_id"]
    w.until_triggered(old)
    w.clock.advance(w.cfg.exits.stop_move_interval_s * 1000)
    # A higher stop: above the price now, so the exchange refuses it (-2021).
    level = w.client.prepare_price(SYM, Decimal(position["entry_price"]) * Decimal("0.999"))
    assert w.ex.move_stop(w.position(), level)
    [closed] = w.facts("position_closed")
    assert closed["reason"] == "stop_loss"
    assert w.exchange_positions() == {} and w.resting_stops() == []
    assert w.position() is None


# -- PnL --------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["long", "short"])
def test_realized_pnl_is_gross_minus_every_fee(w, side):
    w.open(side, stop_pct=5.0)
    for _ in range(12):
        w.step()  # an hour later, another price
    assert w.ex.close_position(w.position(), "signal", w.candle())
    entry, exit_ = w.trades()
    qty = Decimal(entry["info"]["qty"])
    p_in, p_out = Decimal(entry["info"]["price"]), Decimal(exit_["info"]["price"])
    assert p_in != p_out
    gross = (p_out - p_in) * qty if side == "long" else (p_in - p_out) * qty
    fees = fees_of([entry, exit_])
    [closed] = w.facts("position_closed")
    assert Decimal(closed["pnl"]) == gross - fees
    assert Decimal(closed["fee"]) == fees
    # The exchange's own books agree: realized PnL minus commissions.
    assert Decimal(closed["pnl"]) == Decimal(exit_["info"]["realizedPnl"]) - fees
    [row] = w.ledger.select("SELECT * FROM closed_trades")
    assert Decimal(row["realized_pnl"]) == gross - fees


def test_a_position_larger_than_one_order_may_carry_is_closed_in_parts(w):
    position = w.open()
    amount = Decimal(position["amount"])
    most = (amount * Decimal("0.6")).quantize(Decimal("0.001"))
    market = w.sim.markets[SYM]  # MARKET_LOT_SIZE maxQty shrinks; the venue enforces it
    market["limits"] = {**market["limits"], "market": {"min": None, "max": float(most)}}
    w.sim._spec[SYM] = Spec.of(market)
    w.step()
    assert not w.ex.close_position(w.position(), "signal", w.candle())  # the most it may
    left = w.position()
    assert Decimal(left["amount"]) == amount - most
    [stop] = w.resting_stops()  # the rest is protected
    assert Decimal(str(stop["amount"])) == amount - most
    w.step()
    assert w.ex.close_position(left, "signal", w.candle())
    sells = [Decimal(t["info"]["qty"]) for t in w.trades() if t["side"] == "sell"]
    assert sells == [most, amount - most]  # never refused (-4005), never more than the max
    assert w.exchange_positions() == {} and w.resting_stops() == []
    [closed] = w.facts("position_closed")
    assert closed["reason"] == "signal"


def test_pnl_after_partial_exits_counts_every_part(tmp_path):
    w = make_world(tmp_path, sim={"partial_fill_prob": 1.0})
    w.open("long", stop_pct=5.0)
    closed = False
    for _ in range(40):  # every market order fills only in part
        w.step()
        position = w.position()
        assert position["stop"] is not None  # protected between the attempts
        assert Decimal(str(w.resting_stops()[0]["amount"])) == Decimal(position["amount"])
        closed = w.ex.close_position(position, "signal", w.candle())
        if closed:
            break
    assert closed
    trades = w.trades()
    assert len(trades) > 2
    cash = sum((Decimal(t["info"]["qty"]) * Decimal(t["info"]["price"])
                * (1 if t["side"] == "sell" else -1) for t in trades), Decimal(0))
    [row] = w.facts("position_closed")
    assert Decimal(row["pnl"]) == cash - fees_of(trades)
    assert Decimal(row["fee"]) == fees_of(trades)
    assert w.exchange_positions() == {} and w.resting_stops() == []
    w.ledger.close()


def test_an_exit_whose_stop_cannot_be_settled_sends_nothing_then_retries(w):
    # The cancel goes through but every look at the stop afterwards fails: whether it
    # filled is unknown, so no exit is sent; the same decision later completes.
    w.open()
    w.step()
    lookups = 1 + w.cfg.exchange.read_retries
    w.sim.hooks[("cancel_order", True)] = lambda cid: w.sim.faults.script(
        [("fetch_order", "timeout")] * lookups)
    decision = w.candle()
    signal = signal_fact(w)
    assert not w.ex.close_position(w.position(), "signal", decision, before=[signal])
    exit_ = client_order_id("bot1", SYM, "exit", decision)
    assert w.states(exit_) == [] and not w.facts("signal")  # the decision is not consumed
    w.sim.hooks.clear()
    assert w.ex.close_position(w.position(), "signal", decision, before=[signal])
    assert w.states(exit_) == ["intent", "submitted", "fill", "filled"]
    assert len(w.facts("signal")) == 1
    assert w.exchange_positions() == {} and w.position() is None


def test_entry_facts_of_the_decision_are_written_with_the_intent(w):
    signal = signal_fact(w)
    position = w.open(before=[signal])
    rows = w.ledger.select("SELECT seq, type FROM facts ORDER BY seq")
    assert [r["type"] for r in rows[:2]] == ["signal", "order_intent"]
    assert position is not None


def test_an_entry_is_skipped_when_leverage_cannot_be_set(w):
    w.sim.faults.script([("set_margin_mode", "rate_limit")] * (1 + w.cfg.exchange.read_retries))
    signal = signal_fact(w)
    assert w.open(before=[signal]) is None
    assert w.sim.creates() == []
    [note] = w.facts("note")
    assert "symbol settings" in note["reason"]
    assert w.facts("signal")  # the decision is recorded with why nothing was sent


def test_a_stop_moved_into_profit_closes_as_a_trailing_stop():
    from core.execution import stop_reason

    long = {"side": "long", "entry_price": "100"}
    short = {"side": "short", "entry_price": "100"}
    assert stop_reason(long, {"price": "98"}) == "stop_loss"
    assert stop_reason(long, {"price": "101.5"}) == "trailing_stop"
    assert stop_reason(short, {"price": "102"}) == "stop_loss"
    assert stop_reason(short, {"price": "99"}) == "trailing_stop"
