"""Reconciliation: square the ledger with the exchange, appending corrections.

fetch   the exchange's positions, open orders (stops included), balance; every order the
        ledger has not seen finish, looked up by client order id; the fills of positions
        the exchange no longer has; the account's fills since the last reconciliation
decide  a list of differences, each with its correction (or "a human must look")
record  the corrections (as ordinary facts, under this run's id) and one reconcile_run
        fact listing differences and corrections

Orders are settled first (unknown submissions, stops that filled while the bot was
down), then positions, stops and finally fills are compared against the corrected
ledger. Status: ``in_sync`` (exit 0), ``corrected`` (exit 1), ``needs_human`` (exit 2).
Running it again right after a correction finds nothing to do (and records nothing but
its job run, even while a difference stands for a human). ``dry_run`` records nothing.
The whole run holds ``rt.lock``: no scan acts in between.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from decimal import Decimal

from core.exchange import NOT_FOUND_FINAL_MS
from core.exchange_types import BadExchangeData, OrderReport, OrderRequest, SubmitResult
from core.execution import (
    READ_ERRORS,
    TRADE_SEARCH_MARGIN_MS,
    Executor,
    executed,
    fill_data,
    opposite,
    request_of,
    stand_in_id,
    stop_reason,
    unsettled,
)
from core.exits import stop_price
from core.orders import TERMINAL, state_of
from ledger import Fact
from ledger.fold import UNRESOLVED_STATES

log = logging.getLogger(__name__)

FILL_LAG_MS = 10 * 60_000  # how late an exchange may list a trade


@dataclass
class Difference:
    kind: str
    symbol: str | None
    detail: str
    severity: str = "fix"  # fix | human | info
    correction: str | None = None  # what was (or would be) done
    data: dict = field(default_factory=dict)

    def to_record(self) -> dict:
        return {"kind": self.kind, "symbol": self.symbol, "detail": self.detail,
                "severity": self.severity, "correction": self.correction}


def run(rt, scheduled_ms: int, run_id: str, dry_run: bool = False) -> dict:
    ex = Executor(rt.ledger, rt.client, rt.clock, rt.config, run_id, rt.lock)
    started = rt.clock.now_ms()
    previous = last_report(rt)
    checked = fills_checked(rt)
    diffs: list[Difference] = []
    with rt.lock:
        if rt.stopping.is_set():  # asked to stop while waiting: the next start reconciles
            return {"skipped": True, "reason": "the service is stopping"}
        # Late fees first: an order settled below then finds its trades recorded, and a
        # position it closes has its fees.
        diffs += late_fees(rt, ex, dry_run, checked - FILL_LAG_MS)
        diffs += settle_orders(rt, ex, dry_run)
        diffs += compare_positions(rt, ex, dry_run, planned(diffs))
        diffs += compare_stops(rt, ex, dry_run, planned(diffs), previous)
        diffs += sweep_fills(rt, ex, dry_run, checked - FILL_LAG_MS, planned(diffs))
        balance_changed = snapshot_balance(rt, run_id, dry_run)
    status = ("needs_human" if any(d.severity == "human" for d in diffs)
              else "corrected" if any(d.severity == "fix" for d in diffs) else "in_sync")
    report = {"status": status, "dry_run": dry_run,
              "differences": [d.to_record() for d in diffs],
              "corrections": [d.correction for d in diffs
                              if d.correction and d.severity == "fix" and not dry_run]}
    # A run that corrected nothing and found what the last one left standing adds nothing
    # but its job record: a flagged position is not re-recorded every few minutes. When
    # what stood is gone, that is recorded (an in_sync run).
    if not dry_run and (report["corrections"]
                        or standing(report["differences"]) != standing(previous)):
        rt.ledger.append([Fact("reconcile_run", rt.clock.now_ms(), run_id=run_id, reason=status,
                               data=report)])
    for d in diffs:
        log.log(logging.WARNING if d.severity != "info" else logging.INFO,
                "reconcile %s %s: %s -> %s", d.kind, d.symbol or "", d.detail,
                d.correction or "no action")
    # Fills are checked up to this run's start unless a symbol's could not be read.
    complete = not any(d.kind == "fills" for d in diffs)
    return {**report, "balance_changed": balance_changed,
            "fills_checked_ms": started if complete else checked}


def planned(diffs: list[Difference]) -> dict[str, set]:
    """What the corrections found so far do to the ledger: the symbols whose position
    they close ("closes"), open ("opens") or resize ("resizes": symbol and amount left),
    the trades they record ("trades"). A real run has recorded them already; a dry run
    must not report them twice. "flagged": the symbols left for a human, where nothing
    more is sent. "unsettled": the client ids of orders whose outcome stays unknown;
    "fired": (client id, id of the order it became) of stops that fired, not settled."""
    out: dict[str, set] = {"closes": set(), "opens": set(), "resizes": set(), "trades": set(),
                           "unsettled": set(), "fired": set(),
                           "flagged": {d.symbol for d in diffs if d.severity == "human"}}
    for d in diffs:
        for key, values in d.data.items():
            out.setdefault(key, set()).update(values)
    return out


def last_report(rt) -> list[dict]:
    """The differences the last recorded (not dry) reconciliation found."""
    # In-sync runs record none, so the last may be long ago: the fold knows where.
    seq = rt.ledger.state().last_reconcile_seq
    rows = rt.ledger.select("SELECT data FROM facts WHERE seq = ?", (seq,)) if seq else []
    return json.loads(rows[0]["data"]).get("differences", []) if rows else []


def standing(differences: list[dict]) -> list[dict]:
    """The differences left as they are (for a human, or for information)."""
    return [d for d in differences if d.get("severity") != "fix"]


def fills_checked(rt) -> int:
    """Up to when the account's fills were checked: by the last successful reconciliation
    (its summary says), else since the ledger began. The sweep looks from there on, less
    a margin for trades an exchange lists late."""
    # Newest first: the scan stops at the last such run, near the end of the ledger.
    rows = rt.ledger.select(
        "SELECT json_extract(data, '$.summary.fills_checked_ms') AS ms FROM facts "
        "WHERE type = 'job_run' AND json_extract(data, '$.job') = 'reconcile' "
        "AND json_extract(data, '$.outcome') = 'ok' ORDER BY seq DESC LIMIT 1")
    if rows and rows[0]["ms"] is not None:
        return int(rows[0]["ms"])
    first = rt.ledger.select("SELECT min(ts) AS ts FROM facts")
    return first[0]["ts"] if first and first[0]["ts"] is not None else rt.clock.now_ms()


# -- orders -----------------------------------------------------------------------------

def settle_orders(rt, ex: Executor, dry_run: bool) -> list[Difference]:
    """Every order the ledger has not seen finish: ask the exchange what became of it."""
    diffs = []
    open_ids = None
    for order in sorted(rt.ledger.state().orders.values(), key=lambda o: o["intent_seq"]):
        req = request_of(order)
        trigger = req.type == "stop_market"
        try:
            if order["state"] in UNRESOLVED_STATES:
                result = rt.client.resolve_unknown(req, order["ts"])
                if result.status == "unknown" and trigger:
                    if open_ids is None:
                        open_ids = {o.client_order_id for o in rt.client.open_orders()}
                    result = settle_unknown_stop(rt, req, order, open_ids, result)
                if result.status == "unknown":
                    diffs.append(Difference("unresolved_order", req.symbol,
                                            f"{req.client_order_id} ({order['purpose']}) is "
                                            f"still ambiguous: {result.reason}", "info",
                                            data={"unsettled": {req.client_order_id}}))
                    continue
                report = result.order
                if result.status == "rejected":
                    diffs.append(Difference("unresolved_order", req.symbol,
                                            f"{req.client_order_id} never reached the exchange "
                                            f"({result.reason})", correction="marked rejected"))
                    if not dry_run:
                        ex.record(ex_path(ex, req, order, "rejected", reason=result.reason))
                    continue
            else:
                if open_ids is None:
                    open_ids = {o.client_order_id for o in rt.client.open_orders()}
                if req.client_order_id in open_ids:
                    continue  # still working, as the ledger says
                report = rt.client.order_by_client_id(req.symbol, req.client_order_id,
                                                      trigger=trigger)
        except READ_ERRORS as exc:
            diffs.append(Difference("unresolved_order", req.symbol,
                                    f"{req.client_order_id}: lookup failed ({exc})", "info",
                                    data={"unsettled": {req.client_order_id}}))
            continue
        if report is None:
            held = rt.ledger.state().positions.get(req.symbol) or {}
            if trigger and order["state"] not in UNRESOLVED_STATES \
                    and held.get("position_id") != order["position_id"] \
                    and rt.clock.now_ms() - order["ts"] >= NOT_FOUND_FINAL_MS:
                # A stop of a closed position that neither rests (open orders were read)
                # nor is known any more (nor just placed: the algo service has answered
                # "does not exist" for a stop not listed yet): it cannot fire. Left open
                # in the ledger it would bar entries in its symbol for good (stray_stop).
                diffs.append(Difference("missing_order", req.symbol,
                                        f"{req.client_order_id} (stop of a closed position) "
                                        "neither rests nor is known to the exchange",
                                        correction="recorded expired"))
                if not dry_run:
                    ex.record(ex_path(ex, req, order, "expired",
                                      reason="not resting and unknown to the exchange"))
                continue
            diffs.append(Difference("missing_order", req.symbol,
                                    f"{req.client_order_id} ({order['state']}) is unknown to "
                                    "the exchange", "human"))
            continue
        if unsettled(report):  # it fired; what came of it is settled once visible
            if report.triggered_order_id:  # its trades carry this id (position check)
                diffs.append(Difference(
                    "unresolved_order", req.symbol, f"{req.client_order_id} "
                    f"({order['purpose']}) fired; the order it became "
                    f"({report.triggered_order_id}) is not visible yet", "info",
                    data={"fired": {(req.client_order_id, report.triggered_order_id)}}))
            continue
        new = state_of(report.status, report.amount, report.filled)
        if new == order["state"]:
            continue
        diff = Difference("order_state", req.symbol, f"{req.client_order_id} "
                          f"({order['purpose']}): ledger {order['state']}, exchange {new}",
                          correction=f"recorded {new}")
        diffs.append(diff)
        if not dry_run:
            apply_outcome(rt, ex, order, req, report, new)
        elif report.filled > 0:
            since = order["ts"] - TRADE_SEARCH_MARGIN_MS
            diff.data = {"trades": {f.trade_id for f in ex.fills_of(report, since)}}
            diff.data.update(planned_effect(rt, order, report))
    return diffs


def planned_effect(rt, order: dict, report: OrderReport) -> dict[str, set]:
    """What apply_outcome would do to the position (for a dry run): opens, grows, closes
    or resizes it."""
    symbol = order["symbol"]
    position = rt.ledger.state().positions.get(symbol)
    if order["purpose"] == "entry":
        if position is None:
            return {} if ever_opened(rt, order["position_id"]) else {"opens": {symbol}}
        held = Decimal(position["amount"])
        more = min(report.filled - Decimal(order.get("filled") or 0), report.filled - held)
        if position["position_id"] != order["position_id"] or more <= 0:
            return {}
        return {"resizes": {(symbol, str(held + more))}}
    if position is None or position["position_id"] != order["position_id"]:
        return {}
    done = report.filled if order["purpose"] == "stop" else \
        report.filled - Decimal(order.get("filled") or 0)
    left = Decimal(position["amount"]) - done
    if left <= 0:
        return {"closes": {symbol}}
    return {"resizes": {(symbol, str(left))}} if done > 0 else {}


def settle_unknown_stop(rt, req: OrderRequest, order: dict, open_ids: set,
                        result: SubmitResult) -> SubmitResult:
    """A stop the lookup by client id did not find (Binance's algo service has answered
    "does not exist" for stops that do): the list of working stops decides. Resting ->
    accepted. Not resting, not found, and sent long enough ago -> never placed. (Had it
    rested and filled, the position is gone, and the position check records the close.)
    """
    if req.client_order_id in open_ids:
        found = next((o for o in rt.client.open_orders(req.symbol)
                      if o.client_order_id == req.client_order_id), None)
        if found is not None:
            return SubmitResult("accepted", req, found)
    age = rt.clock.now_ms() - order["ts"]
    if age >= NOT_FOUND_FINAL_MS and req.client_order_id not in open_ids:
        return SubmitResult("rejected", req, reason=f"stop not found and not resting "
                            f"{age // 1000} s after sending: never placed")
    return result


def ex_path(ex: Executor, req: OrderRequest, order: dict, new: str, **kw) -> list[Fact]:
    """The transition facts from the recorded state to ``new`` (via unknown if needed)."""
    return ex.path(req, order["state"], new, position_id=order["position_id"],
                   data={"source": "reconcile"}, **kw)


def apply_outcome(rt, ex: Executor, order: dict, req: OrderRequest, report: OrderReport,
                  new: str) -> None:
    """Record what the exchange says became of one order, and its consequences."""
    state = rt.ledger.state()
    position = state.positions.get(req.symbol)
    purpose = order["purpose"]
    if purpose == "stop" and new in TERMINAL and report.filled > 0 and position is not None \
            and position["position_id"] == order["position_id"]:
        # filled, or expired after filling what was left of a position reduced by hand
        stop = position.get("stop") or {"client_order_id": req.client_order_id,
                                        "price": order["trigger_price"], "ts": order["ts"]}
        if stop["client_order_id"] != req.client_order_id:
            stop = {"client_order_id": req.client_order_id, "price": order["trigger_price"],
                    "ts": order["ts"]}
        ex.record_stop_fill(position, stop, report)
        return
    facts = []
    since = order["ts"] - TRADE_SEARCH_MARGIN_MS
    fills = ex.fills_of(report, since) if report.filled > 0 else []
    fresh = uncovered(fills, recorded_trade_ids(rt, since),
                      recorded_per_order(rt, since)) if fills else []
    facts += [ex.fill_fact(f, order["position_id"]) for f in fresh]
    if new not in TERMINAL or new != order["state"]:
        facts += ex_path(ex, req, order, new, exchange_order_id=report.exchange_order_id)
    fee = sum((f.fee for f in fills), Decimal(0))
    avg = report.average_price
    more = report.filled - Decimal(order.get("filled") or 0)  # beyond what is recorded
    if purpose == "entry" and report.filled > 0 and avg and position is None \
            and not ever_opened(rt, order["position_id"]):
        facts.append(ex.fact("position_opened", symbol=req.symbol,
                             side="long" if req.side == "buy" else "short",
                             amount=report.filled, price=avg, fee=fee,
                             position_id=order["position_id"],
                             client_order_id=req.client_order_id,
                             data={"source": "reconcile"}))
    elif purpose == "entry" and fresh and position is not None \
            and position["position_id"] == order["position_id"]:
        # Filled beyond what its answer had seen: the position grows by that, at the
        # average entry, unless it holds the order's whole fill already (an earlier
        # reconcile took the exchange's size); the new part's fees count either way.
        held, entry = Decimal(position["amount"]), Decimal(position["entry_price"])
        new_amount = sum((f.amount for f in fresh), Decimal(0))
        grown = max(Decimal(0), min(new_amount, report.filled - held))
        price = sum((f.amount * f.price for f in fresh), Decimal(0)) / new_amount
        facts.append(ex.fact("position_changed", symbol=req.symbol, side=position["side"],
                             amount=held + grown,
                             price=(held * entry + grown * price) / (held + grown),
                             fee=Decimal(position.get("fees") or 0)
                             + sum((f.fee for f in fresh), Decimal(0)),
                             position_id=position["position_id"],
                             reason="entry filled further (settled by reconcile)",
                             data={"source": "reconcile"}))
    elif purpose == "exit" and position is not None and more > 0 and avg \
            and position["position_id"] == order["position_id"]:
        # The part recorded before (a partial exit left open) is in the position already.
        fee = sum((f.fee for f in fresh), Decimal(0))
        if more >= Decimal(position["amount"]):
            facts.append(ex.close_fact(position, avg, fee, "exit (settled by reconcile)",
                                       fills))
        else:
            facts.append(ex.reduced_fact(position, more, avg, fee,
                                         "partial exit settled by reconcile"))
    elif purpose == "stop" and position is not None and new in ("accepted",) \
            and position["position_id"] == order["position_id"]:
        current = position.get("stop")
        if current and current["client_order_id"] != req.client_order_id:
            # A stop whose answer was lost, while a later one protects the position: that
            # one stays (a trailing move made it tighter); this spare one is cancelled.
            ex.record(facts)
            spare = {"client_order_id": req.client_order_id,
                     "price": report.trigger_price or req.trigger_price,
                     "exchange_order_id": report.exchange_order_id}
            try:
                ex.cancel_stop(position, spare)
            except READ_ERRORS as exc:  # the next run finds it resting spare: an orphan
                log.warning("%s: spare stop %s not cancelled (%s)", req.symbol,
                            req.client_order_id, exc)
            return
        facts.append(ex.stop_placed_fact(position, req, report, source="reconcile"))
    elif purpose == "stop" and new in ("cancelled", "expired") and position is not None \
            and (position.get("stop") or {}).get("client_order_id") == req.client_order_id:
        facts.append(ex.fact("stop_cancelled", symbol=req.symbol,
                             client_order_id=req.client_order_id,
                             position_id=position["position_id"], reason=f"stop {new}"))
    ex.record(facts)


# -- fees of fills recorded before their trades were listed ----------------------------

STAND_IN = stand_in_id("%")  # LIKE pattern of the trade ids of fills taken from orders


def late_fees(rt, ex: Executor, dry_run: bool, since: int) -> list[Difference]:
    """The fees of fills recorded from their order, before its trades could be read
    (fee unknown then, recorded as 0): once the trades are listed, each one's fee is
    recorded as a fill of amount 0 under its trade id (so it counts once), and an open
    position's fees grow by it, so its close counts it in the realized PnL."""
    stand_ins = rt.ledger.select(
        "SELECT symbol, position_id, exchange_order_id AS oid, client_order_id, "
        "group_concat(amount, ' ') AS amounts, min(json_extract(data, '$.exchange_ts')) "
        "AS traded FROM facts WHERE seq > ? AND type = 'fill' "
        "AND ts >= ? AND json_extract(data, '$.trade_id') LIKE ? "
        "AND exchange_order_id IS NOT NULL GROUP BY symbol, exchange_order_id",
        (rt.seq_floor(since), since, STAND_IN))
    if not stand_ins:
        return []
    # From when they traded: a stop that filled while the bot was down is recorded later.
    first: dict[str, int] = {}
    for s in stand_ins:
        traded = min(since, s["traded"] or since) - TRADE_SEARCH_MARGIN_MS
        first[s["symbol"]] = min(first.get(s["symbol"], traded), traded)
    known = recorded_trade_ids(rt, min(first.values()))
    trades: dict[str, list] = {}
    diffs, facts, fees = [], [], {}
    for s in stand_ins:
        symbol = s["symbol"]
        try:
            if symbol not in trades:
                trades[symbol] = rt.client.fills(symbol, first[symbol])
        except READ_ERRORS as exc:
            diffs.append(Difference("fills", symbol, f"fills unavailable ({exc})", "info"))
            trades[symbol] = []
            continue
        # The stand-in stood for the order's earliest trades not listed then, exactly its
        # amount of them: later ones are new fills, which the order's settlement records.
        # Until all of them are listed (on a trade's edge), its fee is not whole yet.
        stood_for = sum((Decimal(a) for a in s["amounts"].split()), Decimal(0))
        late, total = [], Decimal(0)
        for t in sorted(trades[symbol], key=lambda t: (t.ts, t.trade_id)):
            if total < stood_for and t.exchange_order_id == s["oid"] \
                    and t.trade_id not in known:
                late.append(t)
                total += t.amount
        if total != stood_for:
            continue
        fee = sum((t.fee for t in late), Decimal(0))
        diffs.append(Difference(
            "late_fee", symbol, f"order {s['client_order_id'] or s['oid']}: fee {fee} of "
            "fills recorded before their trades were listed", correction="fee recorded",
            data={"trades": {t.trade_id for t in late}}))
        facts += [ex.fact("fill", symbol=symbol, side=t.side, amount=0, price=t.price,
                          fee=t.fee, position_id=s["position_id"],
                          client_order_id=s["client_order_id"],
                          exchange_order_id=t.exchange_order_id,
                          reason="fee of a fill recorded before its trade was listed",
                          data=fill_data(t, source="reconcile")) for t in late]
        fees[s["position_id"]] = fees.get(s["position_id"], Decimal(0)) + fee
    for p in rt.ledger.state().positions.values():
        if p["position_id"] in fees:
            facts.append(ex.fact("position_changed", symbol=p["symbol"], side=p["side"],
                                 amount=p["amount"], price=p["entry_price"],
                                 position_id=p["position_id"],
                                 fee=Decimal(p.get("fees") or 0) + fees.pop(p["position_id"]),
                                 reason="reconcile: fee of an earlier fill"))
    for pid, fee in fees.items():  # closed before its fee was known
        if pid:
            diffs.append(Difference("late_fee", None, f"position {pid} closed before the "
                                    f"fee {fee} of one of its fills was known: its realized "
                                    "PnL in closed_trades leaves it out", "info"))
    if facts and not dry_run:
        ex.record(facts)
    return diffs


# -- positions --------------------------------------------------------------------------

def compare_positions(rt, ex: Executor, dry_run: bool,
                      plan: dict | None = None) -> list[Difference]:
    diffs = []
    plan = plan or planned([])
    state = rt.ledger.state()
    exchange = {p.symbol: p for p in rt.client.positions()}
    resized = dict(plan["resizes"])
    for symbol, p in sorted(state.positions.items()):
        theirs = exchange.get(symbol)
        if symbol in plan["closes"]:
            continue  # a settled order closes it (dry run)
        if symbol in resized:  # a settled order leaves this much of it (dry run)
            p = {**p, "amount": resized[symbol]}
        if theirs is None:
            pending = {s["client_order_id"] for s in ex.live_stops(p)} & plan["unsettled"]
            if pending:
                # Its stop closed it, most likely: that stop's settlement records the close
                # with its fills and reason (stop_loss, trailing_stop) once it is visible.
                diffs.append(Difference("position_gone", symbol, f"ledger {p['side']} "
                                        f"{p['amount']} is not on the exchange; its stop "
                                        f"{', '.join(sorted(pending))} could not be settled: "
                                        "the close is recorded with its outcome",
                                        "human"))
                continue
            diffs.append(closed_on_exchange(rt, ex, p, dry_run, plan["fired"]))
        elif theirs.side != p["side"]:
            diffs.append(Difference("position_side", symbol, f"ledger {p['side']} "
                                    f"{p['amount']}, exchange {theirs.side} {theirs.amount}",
                                    "human"))
        elif theirs.amount != Decimal(p["amount"]):
            diffs.append(resized_on_exchange(rt, ex, p, theirs, dry_run))
    for symbol, theirs in sorted(exchange.items()):
        if symbol not in state.positions and symbol not in plan["opens"]:
            diffs.append(external_position(rt, ex, theirs, dry_run,
                                           state.external.get(symbol)))
    for symbol in sorted(set(state.external) - set(exchange)):
        diffs.append(external_gone(ex, symbol, state.external[symbol], dry_run))
    return diffs


def unknown_fills(rt, p: dict, side: str):
    """Fills in ``side`` since the position opened that the ledger has not recorded."""
    since = p["opened_ts"] - TRADE_SEARCH_MARGIN_MS
    trades = rt.client.fills(p["symbol"], since)  # from ``since`` by the exchange's clock
    # which may have been read a little behind: a trade recorded just before ``since``
    # can come back, and must be known as recorded
    known_since = since - TRADE_SEARCH_MARGIN_MS
    return [f for f in unrecorded(trades, recorded_trade_ids(rt, known_since),
                                  recorded_per_order(rt, known_since)) if f.side == side]


def recorded_per_order(rt, since_ms: int) -> dict[str, Decimal]:
    """Exchange order id -> the amount of its fills recorded since ``since_ms``."""
    return {r["oid"]: sum((Decimal(a) for a in r["amounts"].split()), Decimal(0))
            for r in rt.ledger.select(
        "SELECT exchange_order_id AS oid, group_concat(amount, ' ') AS amounts FROM facts "
        "WHERE seq > ? AND type = 'fill' AND ts >= ? AND exchange_order_id IS NOT NULL "
        "GROUP BY exchange_order_id", (rt.seq_floor(since_ms), since_ms))}


def unrecorded(trades: list, known: set[str], per_order: dict[str, Decimal]) -> list:
    """The trades the ledger has not recorded: not by their id (``known``), and not as a
    fill taken from their order before the trades were listed (that order's recorded
    fills, ``per_order``, then add up to its trades, under another id)."""
    by_order: dict[str | None, Decimal] = {}
    for t in trades:
        by_order[t.exchange_order_id] = by_order.get(t.exchange_order_id, Decimal(0)) + t.amount
    return [t for t in trades if t.trade_id not in known and not (
        t.exchange_order_id is not None
        and per_order.get(t.exchange_order_id, Decimal(0)) >= by_order[t.exchange_order_id])]


def uncovered(fills: list, known: set[str], per_order: dict[str, Decimal]) -> list:
    """One order's fills the ledger has not recorded: not by their trade id (``known``),
    nor as part of a fill taken from the order before its trades were listed: the
    earliest trades, up to that amount (``per_order``: the amounts recorded per order).
    A fill taken from the order again (its trades still unlisted) is new only beyond
    what is recorded of the order: the same stand-in id, a larger amount."""
    left = dict(per_order)  # what the recorded fills cover beyond the trades known by id
    for f in fills:
        if f.trade_id in known and f.exchange_order_id in left \
                and f.trade_id != stand_in_id(f.exchange_order_id):
            left[f.exchange_order_id] -= f.amount
    out, stand_ins = [], []
    for f in sorted(fills, key=lambda f: f.ts):
        if f.trade_id == stand_in_id(f.exchange_order_id):
            stand_ins.append(f)
            continue
        if f.trade_id in known:
            continue
        cover = left.get(f.exchange_order_id, Decimal(0))
        if cover > 0:
            left[f.exchange_order_id] = max(cover - f.amount, Decimal(0))
            if cover >= f.amount:
                continue
            # Partly covered (the order's report and its trades disagree on where the
            # recorded part ends): only the rest is new. It carries the trade's whole fee:
            # the covered part was recorded from the order, fee unknown (0).
            f = replace(f, amount=f.amount - cover)
        out.append(f)
    for f in stand_ins:
        oid = f.exchange_order_id
        mine = [g for g in fills if g.exchange_order_id == oid]
        new = sum((g.amount for g in mine), Decimal(0)) - per_order.get(oid, Decimal(0)) \
            - sum((g.amount for g in out if g.exchange_order_id == oid), Decimal(0))
        if new > 0:
            out.append(replace(f, amount=new))
    return out


def ever_opened(rt, position_id: str) -> bool:
    """Whether the ledger ever opened this position. An entry left partially filled can
    be settled after its position has closed; opening it again would invent one."""
    return bool(rt.ledger.select("SELECT 1 AS x FROM facts WHERE position_id = ? "
                                 "AND type = 'position_opened' LIMIT 1", (position_id,)))


def recorded_trade_ids(rt, since_ms: int) -> set[str]:
    """Trade ids of the fills recorded since ``since_ms`` (a trade is recorded after it
    happened, so nothing that traded since then is recorded earlier)."""
    return {r["trade_id"] for r in rt.ledger.select(
        "SELECT json_extract(data, '$.trade_id') AS trade_id FROM facts "
        "WHERE seq > ? AND type = 'fill' AND ts >= ?", (rt.seq_floor(since_ms), since_ms))}


def resized_on_exchange(rt, ex: Executor, p: dict, theirs, dry_run: bool) -> Difference:
    """The exchange holds more or less than the ledger: take its size (and its average
    entry price when it grew); when fills that the ledger never saw explain a reduction,
    record them and the PnL of that part."""
    symbol, held, amount = p["symbol"], Decimal(p["amount"]), theirs.amount
    diff = Difference("position_size", symbol, f"ledger {p['amount']}, exchange {amount}",
                      correction=f"size set to {amount}")
    # The fills that explain the change: closing ones (its PnL) or adding ones (their fee)
    adding = "buy" if p["side"] == "long" else "sell"
    side = opposite(p["side"]) if amount < held else adding
    try:
        changed = unknown_fills(rt, p, side)
    except READ_ERRORS as exc:
        log.warning("%s: fills unavailable (%s); size taken without them", symbol, exc)
        changed = []
    if sum((f.amount for f in changed), Decimal(0)) != abs(held - amount):
        changed = []
    closing = changed if amount < held else []
    diff.data = {"trades": {f.trade_id for f in changed}}
    if dry_run:
        return diff
    if closing:
        avg = sum((f.price * f.amount for f in closing), Decimal(0)) / (held - amount)
        fee = sum((f.fee for f in closing), Decimal(0))
        diff.correction += f" with {len(closing)} fill(s) at {avg}"
        ex.record([*(ex.fill_fact(f, p["position_id"]) for f in closing),
                   ex.reduced_fact(p, held - amount, avg, fee,
                                   "reduced on the exchange (reconcile)")])
    else:
        fee = sum((f.fee for f in changed), Decimal(0))  # an add's trades, fees and all
        if changed:
            diff.correction += f" with {len(changed)} fill(s)"
        ex.record([*(ex.fill_fact(f, p["position_id"]) for f in changed),
                   ex.fact("position_changed", symbol=symbol, side=p["side"], amount=amount,
                           price=theirs.entry_price if amount > held else None,
                           fee=Decimal(p.get("fees") or 0) + fee if changed else None,
                           position_id=p["position_id"],
                           reason="reconcile: size on the exchange",
                           data={"source": "reconcile", "ledger_amount": p["amount"]})])
    return diff


def closed_on_exchange(rt, ex: Executor, p: dict, dry_run: bool,
                       fired: set[tuple[str, str]] = frozenset()) -> Difference:
    """The ledger holds a position the exchange no longer has: find and record its close.

    Closing trades all made by the order one of its stops became (``fired``: that stop
    fired, its outcome not visible yet) are that stop's: the close takes its reason."""
    symbol = p["symbol"]
    try:
        closing = unknown_fills(rt, p, opposite(p["side"]))
    except READ_ERRORS as exc:
        return Difference("position_gone", symbol, f"not on the exchange; fills unavailable "
                          f"({exc})", "human")
    amount = sum((f.amount for f in closing), Decimal(0))
    if amount < Decimal(p["amount"]) or amount == 0:
        return Difference("position_gone", symbol, f"ledger {p['side']} {p['amount']} is not on "
                          f"the exchange and only {amount} of closing fills were found", "human")
    avg = sum((f.price * f.amount for f in closing), Decimal(0)) / amount
    fee = sum((f.fee for f in closing), Decimal(0))
    reason = "closed_on_exchange"
    stops = {s["client_order_id"]: s for s in ex.live_stops(p)}
    became = {oid: stops[coid] for coid, oid in fired if coid in stops}
    made_by = {became.get(f.exchange_order_id, {}).get("client_order_id") for f in closing}
    if len(made_by) == 1 and None not in made_by:
        stop = stops[made_by.pop()]
        reason = stop_reason(p, stop)
        closing = [replace(f, client_order_id=stop["client_order_id"]) for f in closing]
    diff = Difference("position_gone", symbol, f"ledger {p['side']} {p['amount']} closed on the "
                      f"exchange at {avg} ({reason})",
                      correction="recorded the closing fills and the close",
                      data={"closes": {symbol}, "trades": {f.trade_id for f in closing}})
    if not dry_run:
        facts = [ex.fill_fact(f, p["position_id"]) for f in closing]
        facts.append(ex.close_fact(p, avg, fee, reason, closing))
        ex.record(facts)
    return diff


def external_position(rt, ex: Executor, theirs, dry_run: bool,
                      flagged: dict | None = None) -> Difference:
    adopt = rt.config.reconcile.external_positions == "adopt"
    detail = f"{theirs.side} {theirs.amount} at {theirs.entry_price} is not in the ledger"
    if not adopt:
        # Flagged once, reported every run: the folded flag (not the last report, which a
        # crash or an older checkpoint can leave out of step) says whether it stands.
        if not dry_run and not same_position(flagged, theirs):
            ex.record([ex.fact("external_position", symbol=theirs.symbol, side=theirs.side,
                               amount=theirs.amount, price=theirs.entry_price,
                               reason="flagged", data={"adopted": False})])
        return Difference("external_position", theirs.symbol, detail, "human",
                          "flagged (reconcile.external_positions = flag)")
    if not dry_run:
        pid = f"ext-{theirs.symbol.split('/')[0]}-{rt.clock.now_ms()}"
        ex.record([ex.fact("external_position", symbol=theirs.symbol, side=theirs.side,
                           amount=theirs.amount, price=theirs.entry_price, reason="adopted",
                           data={"adopted": True}),
                   ex.fact("position_opened", symbol=theirs.symbol, side=theirs.side,
                           amount=theirs.amount, price=theirs.entry_price, position_id=pid,
                           reason="adopted external position", data={"source": "reconcile"})])
    return Difference("external_position", theirs.symbol, detail,
                      correction="adopted; a stop follows", data={"opens": {theirs.symbol}})


def same_position(flagged: dict | None, theirs) -> bool:
    """Is the flagged external position the one the exchange holds now (side and size)?"""
    if flagged is None or flagged.get("side") != theirs.side:
        return False
    try:
        return Decimal(flagged.get("amount")) == theirs.amount
    except (TypeError, ArithmeticError):
        return False


def external_gone(ex: Executor, symbol: str, flagged: dict, dry_run: bool) -> Difference:
    """A flagged external position the exchange no longer holds: entries may resume."""
    if not dry_run:
        ex.record([ex.fact("external_position", symbol=symbol, side=flagged.get("side"),
                           reason="gone", data={"gone": True})])
    return Difference("external_position_gone", symbol,
                      f"the flagged {flagged.get('side')} {flagged.get('amount')} is no "
                      "longer on the exchange", correction="flag cleared; entries allowed")


# -- stops ------------------------------------------------------------------------------

def on_the_way_resting(on_the_way: dict[str, str], position_id: str, resting: dict) -> bool:
    """Does a stop of this position whose outcome is not known rest? One that does not
    protects nothing now (lost, or not shown yet): the position gets another."""
    return any(pid == position_id and cid in resting for cid, pid in on_the_way.items())


# What compare_stops leaves standing (for a human, or for information).
STOP_KINDS = frozenset({"below_lot_step", "missing_stop", "foreign_order"})


def unjudged(previous: list[dict], state) -> list[Difference]:
    """What the last run left standing about stops, when this one cannot read them: not
    judged, so not gone (dropped, a part no stop holds was reported in sync, exit 0)."""
    return [Difference(d["kind"], d["symbol"], d["detail"], d["severity"], d.get("correction"))
            for d in standing(previous) if d["kind"] in STOP_KINDS
            and (d["kind"] == "foreign_order" or d["symbol"] in state.positions)]


def below_lot_step(rt, p: dict, left: Decimal, covered: bool = False) -> Difference:
    """Part of a position no order can carry: finer than its market's lot step (the step
    grew under it). The bot cannot sell it, nor protect it unless a stop placed before
    still does: a human closes it, in either case."""
    m = rt.client.market(p["symbol"])
    limit = f"the lot step {m.amount_step}" + (
        f" and minimum {m.min_amount}" if m.min_amount and m.min_amount > (m.amount_step or 0)
        else "")
    # Protected or not, it blocks its symbol and outlives any exit or halt.
    held = ("its stop holds it, but no order of the bot can sell it (an exit leaves it "
            "behind the stop)" if covered else
            "no stop protects it and no order of the bot can sell it")
    return Difference("below_lot_step", p["symbol"], (
        f"{left} of {p['side']} {p['amount']} is finer than {limit}: {held}; close the "
        "position on the exchange by hand"), "human")


def compare_stops(rt, ex: Executor, dry_run: bool, plan: dict | None = None,
                  previous: list[dict] = ()) -> list[Difference]:
    """Every position has its stop resting; no stop of ours rests without a position."""
    diffs = []
    plan = plan or planned([])
    state = rt.ledger.state()
    try:
        resting = {o.client_order_id: o for o in rt.client.open_orders() if o.is_trigger}
    except (READ_ERRORS + (BadExchangeData,)) as exc:
        return [Difference("stops", None, f"open orders unavailable ({exc})", "info"),
                *unjudged(previous, state)]
    # A stop on its way (its outcome not known yet) is the position's, not an orphan.
    on_the_way = {o["client_order_id"]: o["position_id"] for o in state.unresolved_orders()
                  if o["purpose"] == "stop"}
    open_ids = {p["position_id"] for p in state.positions.values()}
    wanted = {cid for cid, pid in on_the_way.items() if pid in open_ids}
    for symbol, p in sorted(state.positions.items()):
        if symbol in plan["closes"]:
            continue  # closed by a correction (dry run): its stop is an orphan
        stop = p.get("stop")
        amount, held = Decimal(p["amount"]), ex.orderable(p)
        covers = resting[stop["client_order_id"]].amount \
            if stop and stop["client_order_id"] in resting else Decimal(0)
        if max(held, covers) < amount:
            diffs.append(below_lot_step(rt, p, amount - max(held, covers)))
        elif held < amount:  # held by its stop, but no exit of the bot can sell it
            diffs.append(below_lot_step(rt, p, amount - held, covered=True))
        if stop and stop["client_order_id"] in resting:
            # A stop "for the whole position" of one finer than the lot step was the same
            # stop again, replaced at every run: it covers what an order can.
            if covers >= held or symbol in plan["flagged"]:
                wanted.add(stop["client_order_id"])
                continue
            # The position grew (by hand): the part above the stop's amount is unprotected.
            diffs.append(Difference("stop_size", symbol, f"stop {stop['client_order_id']} "
                                    f"covers {covers} of {p['amount']}",
                                    correction="replaced by a stop for the whole position"))
            if not dry_run:
                ex.move_stop(p, Decimal(stop["price"]), at_once=True)
            after = rt.ledger.state().positions.get(symbol) or {}
            wanted |= {stop["client_order_id"],  # settled by the move (an exit cancels
                       (after.get("stop") or stop)["client_order_id"]}  # it if it stayed)
            continue
        if on_the_way_resting(on_the_way, p["position_id"], resting):
            continue  # a stop on its way rests: it protects; settled once its answer shows
        if symbol in plan["flagged"]:
            # The exchange does not hold this position as the ledger does (gone, or the
            # other side): a stop, or an exit when the price is past it, would act on
            # what a human must look at first.
            diffs.append(Difference("missing_stop", symbol, f"{p['side']} {p['amount']} has no "
                                    "stop resting; none placed while the position is flagged",
                                    "info"))
            continue
        if held == 0 and not stop:
            continue  # no stop can hold it: left to a human (below_lot_step above)
        level = stop_price(p["side"], Decimal(p["entry_price"]), rt.config.exits.stop_loss_pct)
        if stop:
            level = Decimal(stop["price"])
        diff = Difference("missing_stop", symbol, f"{p['side']} {p['amount']} has no stop "
                          "resting on the exchange", correction=f"stop placed at {level}"
                          if held else "recorded as gone; no stop can hold it")
        diffs.append(diff)
        if not dry_run:
            if stop:  # it vanished (cancelled or expired outside the bot)
                ex.record([ex.fact("stop_cancelled", symbol=symbol,
                                   client_order_id=stop["client_order_id"],
                                   position_id=p["position_id"],
                                   reason="not resting on the exchange")])
                p = rt.ledger.state().positions[symbol]
            if held == 0:
                continue
            coid = ex.place_stop(p, level)
            after = rt.ledger.state().positions.get(symbol)
            if coid:
                wanted.add(coid)
            elif not ex.is_open(p):
                diff.correction = f"price already past the stop {level}: closed at market"
            elif after.get("stop"):  # a partial exit at market left the rest behind a stop
                wanted.add(after["stop"]["client_order_id"])
                diff.correction = (f"price already past the stop {level}: {after['amount']} "
                                   f"left, behind a stop at {after['stop']['price']}")
            else:
                diff.correction = f"stop at {level} not placed; tried again next run"
    for symbol in sorted(plan["opens"] - set(state.positions)):  # dry run: opened above
        diffs.append(Difference("missing_stop", symbol, "the position recorded above has no "
                                "stop resting on the exchange", correction="stop placed"))
    prefix = f"{rt.config.bot.id}-"
    for coid, order in sorted(resting.items(), key=lambda kv: kv[0] or ""):
        if coid in wanted:
            continue
        if not coid or not coid.startswith(prefix):
            diffs.append(Difference("foreign_order", order.symbol, f"stop {coid or order.exchange_order_id} "
                                    "was not placed by this bot", "info"))
            continue
        diff = Difference("orphan_stop", order.symbol, f"stop {coid} rests without a "
                          "position in the ledger", correction="cancelled")
        diffs.append(diff)
        if not dry_run:
            report = rt.client.cancel(order.symbol, client_order_id=coid, trigger=True)
            if executed(report) or unsettled(report):  # it fired meanwhile: settled next run
                diff.correction = f"not cancelled: it fired ({report.status})"
                continue
            facts = []
            tracked = state.orders.get(coid)
            if tracked is not None and report is not None:
                facts += ex_path(ex, request_of(tracked), tracked,
                                 state_of(report.status, report.amount, report.filled))
            facts.append(ex.fact("stop_cancelled", symbol=order.symbol, client_order_id=coid,
                                 reason="orphaned stop cancelled by reconcile"))
            ex.record(facts)
    return diffs


# -- fills ------------------------------------------------------------------------------

def sweep_fills(rt, ex: Executor, dry_run: bool, since: int,
                plan: dict | None = None) -> list[Difference]:
    """Account trades since ``since`` that nothing above recorded: someone else traded
    (or the ledger lost track). Each is recorded once, as a fill of no order of ours.

    Looked at: the symbols the bot trades, the exchange holds, or the ledger has
    recorded fills in since then, except those where an order of ours still works or is
    unresolved (a resting stop may trigger at any moment: its trades are recorded when
    that order is settled) and those where the ledger holds a position (a trade there
    shows as a change of its size, above).
    A trade of an order whose recorded fills already add up (a fill recorded from the
    order before its trade was listed) is not counted twice.
    """
    state = rt.ledger.state()
    floor = rt.seq_floor(since)
    symbols = set(state.active_coins) | {r["symbol"] for r in
        rt.ledger.select("SELECT DISTINCT symbol FROM facts WHERE seq > ? AND type IN "
                         "('fill', 'order_intent', 'external_position') AND ts >= ?",
                         (floor, since))}
    try:
        symbols |= {p.symbol for p in rt.client.positions()}
    except READ_ERRORS as exc:
        log.warning("reconcile: positions unavailable for the fill sweep (%s)", exc)
    plan = plan or planned([])
    # Even when the position check could not read them this run: recorded here, they
    # would never count as its closing fills.
    symbols -= {o["symbol"] for o in state.orders.values()} | plan["opens"] \
        | set(state.positions)
    known = recorded_trade_ids(rt, since) | plan["trades"]
    per_order = recorded_per_order(rt, since)
    diffs, facts = [], []
    for symbol in sorted(symbols):
        try:
            trades = rt.client.fills(symbol, since)
        except READ_ERRORS as exc:
            diffs.append(Difference("fills", symbol, f"fills unavailable ({exc})", "info"))
            continue
        for t in unrecorded(trades, known, per_order):
            diffs.append(Difference("unrecorded_fill", symbol, f"{t.side} {t.amount} at "
                                    f"{t.price} (trade {t.trade_id}, order "
                                    f"{t.client_order_id or t.exchange_order_id}) is not in "
                                    "the ledger", correction="fill recorded"))
            facts.append(ex.fact("fill", symbol=symbol, side=t.side, amount=t.amount,
                                 price=t.price, fee=t.fee, client_order_id=t.client_order_id,
                                 exchange_order_id=t.exchange_order_id,
                                 reason="unattributed: found by reconcile",
                                 data=fill_data(t, source="reconcile")))
    if facts and not dry_run:
        ex.record(facts)
    return diffs


def snapshot_balance(rt, run_id: str, dry_run: bool) -> bool:
    """A balance fact when the wallet balance moved since the last one."""
    balance = rt.client.balance()
    last = rt.ledger.select("SELECT json_extract(data, '$.total') AS total FROM facts "
                            "WHERE type = 'balance' ORDER BY seq DESC LIMIT 1")
    if last and last[0]["total"] is not None and Decimal(last[0]["total"]) == balance.total:
        return False
    if not dry_run:
        from jobs.scan import balance_fact

        rt.ledger.append([balance_fact(balance, rt.clock.now_ms(), run_id)])
    return True
