"""Sending orders the write-ahead way, and the position flows built on it.

Every order goes: intent committed -> submitted committed -> sent once -> outcome
committed. The intent carries a client order id derived from the decision
(core.orders.client_order_id), so deciding the same thing twice finds the intent
already in the ledger and sends nothing. An ambiguous submission is recorded as
``unknown``; reconciliation resolves it by client id, never by sending again.

Flows:
* open_position: entry order; the position is what filled (a resting remainder is
  cancelled); fills, the order's final state and position_opened land in one batch;
  then a reduce-only stop is placed at once.
* close_position: cancel the stop first; if it filled meanwhile, record that close
  and send nothing (no reverse position); otherwise a reduce-only exit order. A
  position left open (exit refused, ambiguous or partial) gets a stop again.
* move_stop: new stop first, then cancel the old one, so the position is never bare;
  at most once per ``exits.stop_move_interval_s``. If the old stop filled in between,
  the close is recorded and the new stop cancelled.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import ccxt

from core.exchange_types import BadExchangeData, FillReport, OrderReport, OrderRequest, SubmitResult
from core.exits import resting_level, stop_on_tick, stop_price
from core.orders import TERMINAL, TRANSITIONS, client_order_id, state_of, transition
from core.risk import orderable
from ledger import Fact, Ledger
from ledger.facts import counting_day
from ledger.fold import AMOUNT, TYPE

log = logging.getLogger(__name__)

READ_ERRORS = (ccxt.BaseError, BadExchangeData)
# Stops of one position sent in the last minute whose outcome is unknown and that are not
# seen resting: past this many, no other is sent until one is older (by then one that
# does not rest was never placed, as reconcile declares it). Each may hold a slot of
# Binance's per-symbol limit on conditional orders (10).
MAX_STOPS_IN_FLIGHT = 3
IN_FLIGHT_MS = 60_000
# An order's trades are searched for from this long before it by our clock: the exchange
# stamps them by its own, and two measurements of its offset can differ.
TRADE_SEARCH_MARGIN_MS = 60_000
ZERO = Decimal(0)


def opposite(side: str) -> str:
    return "sell" if side in ("long", "buy") else "buy"


def realized_pnl(side: str, amount: Decimal, entry: Decimal, exit_: Decimal,
                 fees: Decimal) -> Decimal:
    """PnL of closing ``amount`` net of all fees paid on the position (linear contracts)."""
    gross = (exit_ - entry) * amount
    return (gross if side == "long" else -gross) - fees


def executed(report: OrderReport | None) -> bool:
    """Did a stop that is no longer working execute (all or part)?"""
    return report is not None and report.status not in ("open", "triggered") \
        and report.filled > 0


def unsettled(report: OrderReport | None) -> bool:
    """A stop that fired whose outcome is not known yet (the order it became still works
    or is not visible): nothing may be sent on it."""
    return report is not None and report.status == "triggered"


@dataclass(frozen=True)
class Settlement:
    """What an accepted order turned into, ready to record."""

    report: OrderReport
    state: str
    filled: Decimal
    average: Decimal | None
    fee: Decimal
    facts: list[Fact]
    fills: list[FillReport]


@dataclass
class Executor:
    """Sends and records orders for one job run. ``lock`` serialises exchange writes."""

    ledger: Ledger
    client: object  # core.exchange.ExchangeClient
    clock: object
    config: object
    run_id: str | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)

    # -- recording ------------------------------------------------------------------------

    def fact(self, type_: str, **kw) -> Fact:
        return Fact(type_, self.clock.now_ms(), run_id=self.run_id, **kw)

    def record(self, facts: Sequence[Fact]) -> None:
        self.ledger.append(list(facts))

    def order_state(self, coid: str) -> str | None:
        """The order's last recorded state (None if the ledger never heard of it)."""
        state = None
        for row in self.ledger.facts_for_order(coid):
            kind = row[2]
            if kind == "order_intent":
                state = "intent"
            elif kind == "order_submitted":
                state = "submitted"
            elif kind == "order_update":
                state = _json_state(row[-1])
        return state

    def update(self, req: OrderRequest, current: str, new: str, *, reason: str | None = None,
               exchange_order_id: str | None = None, position_id: str | None = None,
               data: dict | None = None) -> Fact:
        """The fact of one FSM transition (raises before recording an illegal one)."""
        transition(current, new)
        return self.fact("order_update", symbol=req.symbol, side=req.side,
                         client_order_id=req.client_order_id, position_id=position_id,
                         exchange_order_id=exchange_order_id, reason=reason,
                         data={"state": new, "from": current, **(data or {})})

    def path(self, req: OrderRequest, current: str, new: str, *, position_id: str | None,
             reason: str | None = None, **kw) -> list[Fact]:
        """The transition facts from ``current`` to ``new``, via ``unknown`` when there is
        no direct one (an order left at intent or submitted, then found or cancelled)."""
        facts = []
        if new not in TRANSITIONS[current] and "unknown" in TRANSITIONS[current]:
            facts.append(self.update(req, current, "unknown", position_id=position_id,
                                     reason="looked up by client id"))
            current = "unknown"
        return [*facts, self.update(req, current, new, position_id=position_id, reason=reason,
                                    **kw)]

    # -- one order ------------------------------------------------------------------------

    def send(self, req: OrderRequest, purpose: str, *, position_id: str | None = None,
             before: Sequence[Fact] = (), ref_price: Decimal | None = None
             ) -> SubmitResult | None:
        """Write ahead, send once, record rejected/unknown. None: already decided before."""
        with self.lock:
            if self.ledger.facts_for_order(req.client_order_id):
                log.info("order %s already in the ledger: not sent again", req.client_order_id)
                return None
            self.record([*before, self.fact(
                "order_intent", symbol=req.symbol, side=req.side, amount=req.amount,
                price=req.trigger_price, client_order_id=req.client_order_id,
                position_id=position_id,
                data={"purpose": purpose, "type": req.type, "reduce_only": req.reduce_only,
                      "trigger_price": req.trigger_price})])
            self.record([self.fact("order_submitted", symbol=req.symbol, side=req.side,
                                   client_order_id=req.client_order_id,
                                   position_id=position_id)])
            result = self.client.submit(req, ref_price)
            if result.status != "accepted":
                log.warning("order %s %s: %s", req.client_order_id, result.status, result.reason)
                self.record([self.update(req, "submitted", result.status, reason=result.reason,
                                         position_id=position_id,
                                         exchange_order_id=result.order.exchange_order_id
                                         if result.order else None,
                                         data={"errors": result.errors} if result.errors
                                         else None)])
            return result

    def settle(self, req: OrderRequest, order: OrderReport | None, current: str,
               position_id: str | None, since_ms: int) -> Settlement:
        """Verify an accepted order by fetching it back; its fills and final state.

        A market order's unfilled remainder is cancelled: the position is what filled.
        """
        trigger = req.type == "stop_market"
        try:
            if trigger or (order is not None and order.status != "open"):
                fetched = self.client.order_by_client_id(req.symbol, req.client_order_id,
                                                         trigger=trigger)
            else:  # the answer does not tell what filled: the order must be seen
                fetched = self.client.order_after_submit(req.symbol, req.client_order_id)
        except READ_ERRORS as exc:
            log.warning("order %s: fetch back failed (%s)", req.client_order_id, exc)
            fetched = None
        report = fetched or order
        if report is None:
            raise BadExchangeData(f"order {req.client_order_id}: no report to settle")
        if not trigger and report.status == "open":
            try:
                report = self.client.cancel(req.symbol, client_order_id=req.client_order_id) \
                    or report
            except READ_ERRORS as exc:  # recorded as partially filled; reconcile finishes it
                log.warning("order %s: remainder not cancelled (%s)", req.client_order_id, exc)
        new = state_of(report.status, report.amount, report.filled)
        fills = self.fills_of(report, since_ms) if report.filled > 0 else []
        facts = [self.fill_fact(f, position_id) for f in fills]
        fee = sum((f.fee for f in fills), ZERO)
        facts.append(self.update(req, current, new, exchange_order_id=report.exchange_order_id,
                                 position_id=position_id,
                                 data={"filled": report.filled, "average": report.average_price}))
        return Settlement(report, new, report.filled, _average(report, fills), fee, facts, fills)

    def fills_of(self, report: OrderReport, since_ms: int) -> list[FillReport]:
        """The account trades of one order; a synthetic one for any part not yet listed.

        Binance's trade list carries no client order id, and a triggered stop trades
        under the id of the order it became (``triggered_order_id``). Every fill returned
        carries the order's client id, so the ledger ties it to its order.
        """
        try:
            trades = self.client.fills(report.symbol, since_ms)
        except READ_ERRORS as exc:
            log.warning("fills of %s unavailable (%s)", report.client_order_id, exc)
            trades = []
        ids = {report.exchange_order_id, report.triggered_order_id} - {None}
        mine = [t for t in trades if t.exchange_order_id in ids
                or (report.client_order_id and t.client_order_id == report.client_order_id)]
        if report.client_order_id:
            mine = [t if t.client_order_id else replace(t, client_order_id=report.client_order_id)
                    for t in mine]
        missing = report.filled - sum((t.amount for t in mine), ZERO)
        if missing > 0 and report.average_price is not None:
            # Trades can lag the order; the order itself is proof of the fill. Reconcile
            # skips orders whose fills add up (by the id the trades carry), so this is
            # never counted twice.
            log.warning("order %s: %s filled without a listed trade; fee unknown",
                        report.client_order_id, missing)
            traded_as = report.triggered_order_id or report.exchange_order_id
            mine.append(FillReport(report.symbol, stand_in_id(traded_as), traded_as,
                                   report.client_order_id, report.side, missing,
                                   report.average_price, ZERO, "", report.ts or 0))
        return mine

    def fill_fact(self, f: FillReport, position_id: str | None) -> Fact:
        return self.fact("fill", symbol=f.symbol, side=f.side, amount=f.amount, price=f.price,
                         fee=f.fee, position_id=position_id, client_order_id=f.client_order_id,
                         exchange_order_id=f.exchange_order_id,
                         data=fill_data(f))

    # -- positions ------------------------------------------------------------------------

    def open_position(self, symbol: str, side: str, amount: Decimal, decision_ms: int, *,
                      stop_pct: float | None, ref_price: Decimal | None = None,
                      before: Sequence[Fact] = ()) -> dict | None:
        """Enter; return the recorded position (None if nothing filled or already decided).

        The stop is placed ``stop_pct`` from the actual average fill price.
        """
        coid = client_order_id(self.config.bot.id, symbol, "entry", decision_ms)
        req = OrderRequest(symbol, "buy" if side == "long" else "sell", amount, coid)
        since = self.clock.now_ms() - TRADE_SEARCH_MARGIN_MS
        with self.lock:
            try:
                self.client.ensure_symbol_settings(symbol)  # leverage, margin mode: once
            except READ_ERRORS as exc:
                log.warning("%s: leverage/margin mode not set (%s); entry skipped", symbol, exc)
                self.record([*before, self.fact("note", symbol=symbol,
                                                reason=f"entry skipped: symbol settings: {exc}")])
                return None
            result = self.send(req, "entry", position_id=coid, before=before,
                               ref_price=ref_price)
            if result is None or result.status != "accepted":
                return None
            done = self.settle(result.request, result.order, "submitted", coid, since)
            facts = list(done.facts)
            opened = done.filled > 0 and done.average is not None
            if opened:
                facts.append(self.fact("position_opened", symbol=symbol, side=side,
                                       amount=done.filled, price=done.average, fee=done.fee,
                                       position_id=coid, client_order_id=coid,
                                       data={"decision_ms": decision_ms}))
            elif done.filled > 0:
                log.error("%s: entry %s filled %s at no known price; left for reconcile",
                          symbol, coid, done.filled)
            self.record(facts)
            if not opened:
                return None
            position = self.ledger.state().positions.get(symbol)
            if position is not None and stop_pct is not None:
                level = stop_price(side, done.average, stop_pct)
                # One more try when the first was refused outright (e.g. rate limited);
                # never after an ambiguous one, which may be resting already, nor once
                # something else acted on the position (an exit at market when the price
                # was already past the stop: the position changed, or that exit is pending).
                for _ in range(2):
                    if self.place_stop(position, level) is not None \
                            or self.ledger.state().positions.get(symbol) != position \
                            or self.unresolved(position["position_id"], "stop", "exit"):
                        break
                else:
                    log.error("%s: no stop could be placed; reconcile places one", symbol)
            return self.ledger.state().positions.get(symbol)

    def stop_attempts(self, position_id: str) -> int:
        rows = self.ledger.select(
            "SELECT count(*) AS n FROM facts WHERE position_id = ? AND type = 'order_intent' "
            "AND json_extract(data, '$.purpose') = 'stop'", (position_id,))
        return rows[0]["n"]

    def stops_in_flight(self, position: dict) -> tuple[str | None, int]:
        """The stops of ``position`` whose outcome is not known, settled by the list of
        working orders: the latest one found resting is recorded as placed, and its client
        id returned; else (None, how many were sent in the last minute). One not seen
        resting may have been lost or may show later; either way it does not protect the
        position now, so another is sent (two reduce-only stops cannot open a position,
        and reconcile cancels the spare one)."""
        pid = position["position_id"]
        flying = sorted((o for o in self.ledger.state().unresolved_orders()
                         if o["position_id"] == pid and o["purpose"] == "stop"),
                        key=lambda o: -o["intent_seq"])
        if not flying:
            return None, 0
        try:
            resting = {o.client_order_id: o for o in self.client.open_orders(position["symbol"])
                       if o.is_trigger}
        except READ_ERRORS as exc:
            log.warning("%s: working orders unavailable (%s)", position["symbol"], exc)
            return None, len(flying)  # cannot tell: each counts
        for order in flying:
            report = resting.get(order["client_order_id"])
            if report is not None:
                req = request_of(order)
                self.record([*self.path(req, order["state"], "accepted", position_id=pid,
                                        exchange_order_id=report.exchange_order_id),
                             self.stop_placed_fact(position, req, report)])
                return order["client_order_id"], 0
        now = self.clock.now_ms()
        return None, sum(now - o["ts"] < IN_FLIGHT_MS for o in flying)

    def stop_placed_fact(self, position: dict, req: OrderRequest, report: OrderReport,
                         **data: Any) -> Fact:
        """A stop whose answer was lost, found resting: it protects ``position`` now. Its
        amount is what rests (the intent's was not cut to the lot step yet)."""
        return self.fact("stop_placed", symbol=req.symbol, side=req.side,
                         amount=report.amount or req.amount,
                         price=report.trigger_price or req.trigger_price,
                         client_order_id=req.client_order_id,
                         exchange_order_id=report.exchange_order_id,
                         position_id=position["position_id"], data=data)

    def protect(self, position: dict, stop_loss_pct: float) -> str | None:
        """A stop for a position that has none resting (placements refused or lost, or an
        exit refused or lost and the stop put back too); its client id."""
        if position.get("stop"):
            return None
        found, flying = self.stops_in_flight(position)
        if found or flying >= MAX_STOPS_IN_FLIGHT:
            return found
        if self.client.banned():  # it would be refused unsent, an intent every scan
            log.warning("%s: no stop rests; placed once the IP ban ends", position["symbol"])
            return None
        if self.orderable(position) == 0:  # refused unsent, an intent every scan
            log.debug("%s: no stop can hold it (reconcile asks a human)", position["symbol"])
            return None
        log.warning("%s: no stop rests; placing one", position["symbol"])
        return self.place_stop(position, resting_level(position, stop_loss_pct))

    def orderable(self, position: dict) -> Decimal:
        """What one order can carry of ``position``: all of it when its market cannot be
        read (the send then decides)."""
        amount = Decimal(position["amount"])
        try:
            return orderable(amount, self.client.market(position["symbol"]))
        except READ_ERRORS:
            return amount

    def unresolved(self, position_id: str, *purposes: str) -> bool:
        """Is an order of this position, for one of ``purposes``, still unresolved?"""
        return any(o["position_id"] == position_id and o["purpose"] in purposes
                   for o in self.ledger.state().unresolved_orders())

    def live_stops(self, position: dict) -> list[dict]:
        """Every stop of the position that may still rest or fire: its stop, then any
        other the ledger has not seen finish (an old one a move could not cancel, one whose
        answer was lost). An exit must settle them all, or one could fire later on the next
        position."""
        main = position.get("stop")
        return ([main] if main else []) + self.other_stops(position, main)

    def other_stops(self, position: dict, main: dict | None) -> list[dict]:
        return [{"client_order_id": o["client_order_id"], "price": o["trigger_price"],
                 "exchange_order_id": o["exchange_order_id"]}
                for o in sorted(self.ledger.state().orders.values(),
                                key=lambda o: o["intent_seq"])
                if o["position_id"] == position["position_id"] and o["purpose"] == "stop"
                and o["client_order_id"] != (main or {}).get("client_order_id")]

    def is_open(self, position: dict) -> bool:
        now = self.ledger.state().positions.get(position["symbol"])
        return now is not None and now["position_id"] == position["position_id"]

    def place_stop(self, position: dict, trigger: Decimal, *, moved: bool = False,
                   exit_if_crossed: bool = True) -> str | None:
        """A reduce-only stop for the whole position; its client id, or None if not placed.

        A first stop refused because the price is already past it (-2021) would leave the
        position unprotected beyond its stop, so the position is closed at market instead
        (unless ``exit_if_crossed`` is off: after a failed exit, trying again at once).
        """
        symbol, pid = position["symbol"], position["position_id"]
        if self.orderable(position) == 0:
            log.warning("%s: %s %s is finer than the lot step: no stop can hold it; "
                        "reconcile asks a human", symbol, position["side"], position["amount"])
            return None
        try:
            step = self.client.market(symbol).price_step
            trigger = self.client.prepare_price(
                symbol, stop_on_tick(position["side"], Decimal(trigger), step))
        except READ_ERRORS as exc:  # submit rounds it again, or refuses it
            log.warning("%s: stop price %s not rounded (%s)", symbol, trigger, exc)
        with self.lock:
            n = self.stop_attempts(pid) + 1
            coid = client_order_id(self.config.bot.id, symbol, "stop", position["opened_ts"], n)
            req = OrderRequest(symbol, opposite(position["side"]), Decimal(position["amount"]),
                               coid, type="stop_market", reduce_only=True, trigger_price=trigger)
            result = self.send(req, "stop", position_id=pid)
            if result is not None and result.would_trigger and not moved and exit_if_crossed:
                log.warning("%s: price already past the stop %s; closing at market", symbol,
                            trigger)
                current = self.ledger.state().positions.get(symbol)
                if current is not None and current["position_id"] == pid:
                    self.close_position(current, stop_reason(position, {"price": trigger}),
                                        self.clock.now_ms())
                return None
            if result is None or result.status != "accepted":
                return None
            sent, order = result.request, result.order
            eid = order.exchange_order_id if order else None
            state = state_of(order.status, order.amount, order.filled) if order else "accepted"
            if state in TERMINAL and not executed(order):
                # Found gone after an ambiguous submission: it does not rest.
                self.record([self.update(sent, "submitted", state, exchange_order_id=eid,
                                         position_id=pid)])
                return None
            # A stop that already triggered is recorded as placed, then its fill below.
            self.record([self.update(sent, "submitted", "accepted", exchange_order_id=eid,
                                     position_id=pid),
                         self.fact("stop_moved" if moved else "stop_placed", symbol=symbol,
                                   side=sent.side, amount=sent.amount, price=sent.trigger_price,
                                   client_order_id=coid, position_id=pid,
                                   exchange_order_id=eid)])
            if executed(order):
                stop = {"client_order_id": coid, "price": sent.trigger_price,
                        "ts": self.clock.now_ms()}
                self.record_stop_fill(position, stop, order)
            return coid

    def cancel_stop(self, position: dict, stop: dict) -> OrderReport | None:
        """Cancel one stop; record it. Returns the exchange's report afterwards.

        Nothing is recorded when the stop executed (``executed(report)``: the caller
        records the fill), still rests, or its execution is not visible yet.
        """
        symbol, pid = position["symbol"], position["position_id"]
        req = OrderRequest(symbol, opposite(position["side"]), Decimal(position["amount"]),
                           stop["client_order_id"], type="stop_market", reduce_only=True,
                           trigger_price=Decimal(stop["price"]))
        with self.lock:
            report = self.client.cancel(symbol, client_order_id=stop["client_order_id"],
                                        trigger=True)
            if executed(report) or unsettled(report):
                return report
            if report is not None and report.status == "open":
                log.warning("%s: stop %s still rests after cancelling", symbol,
                            stop["client_order_id"])
                return report
            current = self.order_state(stop["client_order_id"]) or "accepted"
            if current in TERMINAL:
                return report
            # Unknown to the exchange: it does not rest, whatever became of it.
            new = "cancelled" if report is None else state_of(report.status, report.amount,
                                                              report.filled)
            self.record([*self.path(req, current, new, position_id=pid,
                                    exchange_order_id=stop.get("exchange_order_id"),
                                    reason="stop cancelled"),
                         self.fact("stop_cancelled", symbol=symbol,
                                   client_order_id=stop["client_order_id"], position_id=pid,
                                   price=stop["price"], reason=f"stop {new}")])
            return report

    def close_position(self, position: dict, reason: str, decision_ms: int, *,
                       before: Sequence[Fact] = ()) -> bool:
        """Exit a position; True when the ledger now shows it closed."""
        symbol, pid, side = position["symbol"], position["position_id"], position["side"]
        coid = client_order_id(self.config.bot.id, symbol, "exit", decision_ms)
        with self.lock:
            if self.ledger.facts_for_order(coid):
                # Decided before: its outcome is recorded or reconcile settles it. The stop
                # (re-placed after that attempt) stays.
                log.info("exit %s already in the ledger: not sent again", coid)
                return False
            if self.unresolved(pid, "exit") and not self.still_held(position):
                # An earlier exit's outcome is not known and the exchange does not show the
                # position as held (it may have filled, or cannot be read): reconcile
                # settles it. One the exchange still holds gets this exit too: reduce-only,
                # it cannot open a position whatever the first one did.
                log.warning("%s: an earlier exit is unresolved; no exit sent", symbol)
                return False
            held = self.orderable(position)
            if held == 0:
                # Refused unsent at every try, and its stop (placed before the lot step
                # grew) cancelled for nothing: the stop keeps what it holds. The decision
                # stands, once (unrecorded, the scan decided the candle again every scan).
                if before:
                    self.record(list(before))
                log.warning("%s: no exit sent: %s %s is finer than the lot step; close it "
                            "by hand", symbol, side, position["amount"])
                return False
            # Of a position finer than the lot step the exit sells what an order can; its
            # stops stay (reduce-only, they cannot open one): they hold the rest. Each is
            # looked up all the same: one that fired is recorded, not sold after.
            keep = held < Decimal(position["amount"])
            for stop in self.live_stops(position):
                try:
                    report = self.client.order_by_client_id(
                        symbol, stop["client_order_id"], trigger=True) if keep \
                        else self.cancel_stop(position, stop)
                except READ_ERRORS as exc:
                    log.warning("%s: stop %s not %s (%s); no exit sent this time", symbol,
                                stop["client_order_id"], "read" if keep else "cancelled", exc)
                    return False
                if unsettled(report):
                    log.warning("%s: stop %s triggered, its fill not visible yet; no exit sent",
                                symbol, stop["client_order_id"])
                    return False
                if executed(report):
                    log.info("%s: stop %s filled before the exit; recording that", symbol,
                             stop["client_order_id"])
                    outcome = self.record_stop_fill(position, stop, report, before=before)
                    if outcome:
                        return True
                    if outcome is not None:
                        before = ()  # recorded with the partial fill
                position = self.ledger.state().positions.get(symbol)
                if position is None or position["position_id"] != pid:
                    return True
            amount = Decimal(position["amount"])
            req = OrderRequest(symbol, opposite(side), amount, coid, reduce_only=True)
            since = self.clock.now_ms() - TRADE_SEARCH_MARGIN_MS
            result = self.send(req, "exit", position_id=pid, before=before)
            if result is None:
                return False
            closed = False
            if result.status == "accepted":
                done = self.settle(result.request, result.order, "submitted", pid, since)
                facts = list(done.facts)
                closed = done.filled >= amount and done.average is not None
                if closed:
                    facts.append(self.close_fact(position, done.average, done.fee, reason,
                                                 done.fills))
                elif done.filled > 0 and done.average is not None:
                    facts.append(self.reduced_fact(position, done.filled, done.average, done.fee,
                                                   f"partial exit: {reason}"))
                self.record(facts)
            if not closed:
                # Refused, ambiguous or partial: whatever is left must rest behind a stop.
                # (After an ambiguous exit the position may be gone; a reduce-only stop
                # can then never open one, and reconcile cancels it.)
                self._reprotect(self.ledger.state().positions.get(symbol))
            return closed

    def record_fired_stops(self, symbols: Iterable[str] | None = None) -> None:
        """Look up the stops of the positions (of ``symbols``, else all) and record any
        that fired: its fills and the close. A read error is the caller's."""
        for symbol, position in sorted(self.ledger.state().positions.items()):
            if symbols is not None and symbol not in symbols:
                continue
            for stop in self.live_stops(position):
                report = self.client.order_by_client_id(symbol, stop["client_order_id"],
                                                        trigger=True)
                if executed(report):
                    self.record_stop_fill(position, stop, report)
                    break

    def still_held(self, position: dict) -> bool:
        """Does the exchange hold ``position`` (its symbol, on its side) right now?"""
        try:
            held = self.client.positions()
        except READ_ERRORS as exc:
            log.warning("%s: positions unavailable (%s)", position["symbol"], exc)
            return False
        return any(p.symbol == position["symbol"] and p.side == position["side"]
                   and p.amount > 0 for p in held)

    def close_fact(self, position: dict, exit_price: Decimal, exit_fee: Decimal,
                   reason: str, fills: Sequence[FillReport] = ()) -> Fact:
        """The close of what is left of a position: PnL of the whole position, all fees,
        and when the exchange made it (``fills``, its closing trades): a stop that fired
        while the bot was down counts on its own day, not the restart's."""
        amount = Decimal(position["amount"])
        fees = Decimal(position.get("fees") or 0) + exit_fee
        pnl = realized_pnl(position["side"], amount, Decimal(position["entry_price"]),
                           exit_price, fees) + self.realized_before(position["position_id"])
        closed, now = last_trade_ms(fills), self.clock.now_ms()
        day = counting_day(now, closed, self.ledger.state().last_day_closed)
        return Fact("position_closed", now, run_id=self.run_id, symbol=position["symbol"],
                    side=position["side"], amount=amount, price=exit_price, fee=fees, pnl=pnl,
                    position_id=position["position_id"], reason=reason,
                    data={"entry_price": position["entry_price"],
                          "opened_ts": position["opened_ts"], "closed_ts": closed, "day": day})

    def reduced_fact(self, position: dict, filled: Decimal, price: Decimal, fee: Decimal,
                     reason: str) -> Fact:
        """Part of a position closed: the new size, fees so far, and (pnl) the gross PnL
        of the part closed, which the final close adds to its own."""
        gross = realized_pnl(position["side"], filled, Decimal(position["entry_price"]), price,
                             ZERO)
        return self.fact("position_changed", symbol=position["symbol"], side=position["side"],
                         amount=Decimal(position["amount"]) - filled,
                         position_id=position["position_id"],
                         fee=Decimal(position.get("fees") or 0) + fee, pnl=gross, reason=reason,
                         data={"closed": filled, "exit_price": price})

    def realized_before(self, position_id: str) -> Decimal:
        """Gross PnL of the parts of a position closed before (partial exits)."""
        rows = self.ledger.select("SELECT pnl FROM facts WHERE type = 'position_changed' "
                                  "AND position_id = ? AND pnl IS NOT NULL", (position_id,))
        return sum((Decimal(r["pnl"]) for r in rows), ZERO)

    def record_stop_fill(self, position: dict, stop: dict, report: OrderReport, *,
                         before: Sequence[Fact] = ()) -> bool | None:
        """The exchange's stop executed: its fills, its final state, the close (or the
        smaller position if it filled only part, which then has no stop).

        True: the position is closed; False: it is smaller; None: nothing recorded (the
        stop was settled before, or no price is known).
        """
        req = OrderRequest(position["symbol"], opposite(position["side"]), report.amount,
                           stop["client_order_id"], type="stop_market", reduce_only=True,
                           trigger_price=Decimal(stop["price"]))
        current = self.order_state(stop["client_order_id"]) or "accepted"
        if current in TERMINAL:
            return None
        fills = self.fills_of(report, (stop.get("ts") or position["opened_ts"])
                              - TRADE_SEARCH_MARGIN_MS)
        fee = sum((f.fee for f in fills), ZERO)
        average = _average(report, fills)
        if average is None:
            log.error("%s: stop %s filled but no price is known; left for reconcile",
                      position["symbol"], stop["client_order_id"])
            return None
        facts = [*before, *(self.fill_fact(f, position["position_id"]) for f in fills)]
        facts.append(self.update(req, current, state_of(report.status, report.amount,
                                                        report.filled),
                                 position_id=position["position_id"],
                                 exchange_order_id=report.exchange_order_id,
                                 data={"filled": report.filled, "average": average}))
        closed = report.filled >= Decimal(position["amount"])
        if closed:
            facts.append(self.close_fact(position, average, fee, stop_reason(position, stop),
                                         fills))
        else:
            facts += [self.reduced_fact(position, report.filled, average, fee,
                                        "stop filled in part"),
                      self.fact("stop_cancelled", symbol=position["symbol"],
                                client_order_id=stop["client_order_id"],
                                position_id=position["position_id"], price=stop["price"],
                                reason="stop filled in part")]
        self.record(facts)
        if closed:  # any other stop of it would fire on the next position in the symbol
            for other in self.other_stops(position, stop):
                try:
                    self.cancel_stop(position, other)
                except READ_ERRORS as exc:
                    log.warning("%s: stop %s of a closed position not cancelled (%s); "
                                "reconcile cancels it", position["symbol"],
                                other["client_order_id"], exc)
        return closed

    def move_stop(self, position: dict, trigger: Decimal, *, at_once: bool = False) -> bool:
        """Replace the resting stop with one at ``trigger``: new first, then cancel old.
        At most once per ``stop_move_interval_s`` unless ``at_once`` (a stop that no
        longer covers its position).

        True when the new stop rests (or the old one closed the position meanwhile).
        """
        old = position.get("stop")
        interval = self.config.exits.stop_move_interval_s * 1000
        if old and old.get("ts") is not None and self.clock.now_ms() - old["ts"] < interval \
                and not at_once:
            return False
        held = self.orderable(position) if old and not at_once else None
        if held is not None and held < Decimal(position["amount"]) \
                and held < self.stop_amount(old):  # the ledger read only for such a position
            # The new stop would hold only what one order can carry of a position finer
            # than the lot step; the resting one, placed before the step grew, holds more
            # (the exit rules still trail the position at each candle close).
            log.info("%s: stop not moved: %s is finer than the lot step", position["symbol"],
                     position["amount"])
            return False
        with self.lock:
            new_coid = self.place_stop(position, trigger, moved=bool(old))
            if old is None:
                return new_coid is not None
            try:
                if new_coid is None:
                    # Refused: the old one protects on, unless it is what took the position.
                    report = self.client.order_by_client_id(position["symbol"],
                                                            old["client_order_id"], trigger=True)
                else:
                    report = self.cancel_stop(position, old)
            except READ_ERRORS as exc:
                log.warning("%s: old stop %s not settled (%s); reconcile does it",
                            position["symbol"], old["client_order_id"], exc)
                return new_coid is not None
            if executed(report):
                # The old stop filled first: the position is gone; so must the new stop be.
                log.info("%s: stop %s filled during the move", position["symbol"],
                         old["client_order_id"])
                closed = self.record_stop_fill(position, old, report)
                if new_coid is not None and closed:
                    try:
                        self.cancel_stop(position, {"client_order_id": new_coid,
                                                    "price": str(trigger)})
                    except READ_ERRORS as exc:  # a spare stop: reconcile cancels it
                        log.warning("%s: new stop %s not cancelled (%s)", position["symbol"],
                                    new_coid, exc)
                elif new_coid is None and closed is False:
                    self._reprotect(self.ledger.state().positions.get(position["symbol"]))
                return True
            return new_coid is not None

    def stop_amount(self, stop: dict) -> Decimal:
        """What a resting stop of ours was placed for (as sent: on the lot step then)."""
        placed = [row[AMOUNT] for row in self.ledger.facts_for_order(stop["client_order_id"])
                  if row[TYPE] in ("stop_placed", "stop_moved") and row[AMOUNT] is not None]
        return Decimal(placed[-1]) if placed else Decimal(0)

    def _reprotect(self, position: dict | None) -> None:
        """After a failed or partial exit, make sure a stop rests for what remains."""
        if position is None or position.get("stop"):
            return
        found, flying = self.stops_in_flight(position)
        if found or flying >= MAX_STOPS_IN_FLIGHT:
            return
        level = resting_level(position, self.config.exits.stop_loss_pct)
        self.place_stop(position, level, exit_if_crossed=False)


def request_of(order: dict) -> OrderRequest:
    """The request an order the ledger folded (``State.orders``) was sent as."""
    return OrderRequest(order["symbol"], order["side"], Decimal(order["amount"]),
                        order["client_order_id"], type=order.get("type") or "market",
                        reduce_only=bool(order.get("reduce_only")),
                        trigger_price=Decimal(order["trigger_price"])
                        if order.get("trigger_price") else None)


def stand_in_id(order_id: str) -> str:
    """The trade id of a fill taken from its order, its trades not listed yet (fee
    unknown): reconcile records the fee once they are (jobs/reconcile.late_fees)."""
    return f"order:{order_id}:rest"


def last_trade_ms(fills: Sequence[FillReport]) -> int | None:
    """The exchange's time of the last trade listed (a stand-in's is not a trade's)."""
    times = [f.ts for f in fills if f.ts and f.trade_id != stand_in_id(f.exchange_order_id)]
    return max(times, default=None)


def fill_data(f: FillReport, **more: Any) -> dict:
    """A fill fact's data: the trade's id and exchange time, and a fee paid in another
    currency as paid (``fee`` holds its value in the settlement currency)."""
    data = {"trade_id": f.trade_id, "fee_currency": f.fee_currency, "exchange_ts": f.ts,
            "realized_pnl": f.realized_pnl, **more}
    if f.fee_paid is not None:
        amount, currency, price = f.fee_paid
        data["fee_paid"] = {"amount": amount, "currency": currency, "price": price}
    return data


def _average(report: OrderReport, fills: Sequence[FillReport]) -> Decimal | None:
    if report.average_price is not None:
        return report.average_price
    filled = sum((f.amount for f in fills), ZERO)
    return sum((f.price * f.amount for f in fills), ZERO) / filled if filled else None


def stop_reason(position: dict, stop: dict) -> str:
    """Why a resting stop closed the position: a stop moved into profit was trailing it."""
    entry, level = Decimal(position["entry_price"]), Decimal(stop["price"])
    in_profit = level > entry if position["side"] == "long" else level < entry
    return "trailing_stop" if in_profit else "stop_loss"


def _json_state(data: str) -> str | None:
    return json.loads(data).get("state")
