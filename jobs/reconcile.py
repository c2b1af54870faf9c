"""Reconciliation: square the ledger with the exchange, appending corrections.

fetch   the exchange's positions, open orders (stops included), balance; every order the
        ledger has not seen finish, looked up by client order id; the fills of positions
        the exchange no longer has
decide  a list of differences, each with its correction (or "a human must look")
record  the corrections (as ordinary facts, marked source=reconcile) and one
        reconcile_run fact listing differences and corrections

Orders are settled first (unknown submissions, stops that filled while the bot was
down), then positions and stops are compared against the corrected ledger. Status:
``in_sync`` (exit 0), ``corrected`` (exit 1), ``needs_human`` (exit 2). Running it again
right after a correction finds nothing to do. ``dry_run`` records nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from decimal import Decimal

from core.exchange_types import BadExchangeData, OrderReport, OrderRequest
from core.execution import READ_ERRORS, Executor, opposite
from core.exits import stop_price
from core.orders import TERMINAL, TRANSITIONS, state_of
from ledger import Fact

log = logging.getLogger(__name__)


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
    diffs: list[Difference] = []
    with rt.lock:
        diffs += settle_orders(rt, ex, dry_run)
        diffs += compare_positions(rt, ex, dry_run)
        diffs += compare_stops(rt, ex, dry_run)
        balance_changed = snapshot_balance(rt, run_id, dry_run)
    status = ("needs_human" if any(d.severity == "human" for d in diffs)
              else "corrected" if any(d.severity == "fix" for d in diffs) else "in_sync")
    report = {"status": status, "dry_run": dry_run,
              "differences": [d.to_record() for d in diffs],
              "corrections": [d.correction for d in diffs
                              if d.correction and d.severity == "fix" and not dry_run]}
    if diffs and not dry_run:
        rt.ledger.append([Fact("reconcile_run", rt.clock.now_ms(), run_id=run_id, reason=status,
                               data=report)])
    for d in diffs:
        log.log(logging.WARNING if d.severity != "info" else logging.INFO,
                "reconcile %s %s: %s -> %s", d.kind, d.symbol or "", d.detail,
                d.correction or "no action")
    return {**report, "balance_changed": balance_changed}


# -- orders -----------------------------------------------------------------------------

def request_of(order: dict) -> OrderRequest:
    return OrderRequest(order["symbol"], order["side"], Decimal(order["amount"]),
                        order["client_order_id"], type=order.get("type") or "market",
                        reduce_only=bool(order.get("reduce_only")),
                        trigger_price=Decimal(order["trigger_price"])
                        if order.get("trigger_price") else None)


def settle_orders(rt, ex: Executor, dry_run: bool) -> list[Difference]:
    """Every order the ledger has not seen finish: ask the exchange what became of it."""
    diffs = []
    open_ids = None
    for order in sorted(rt.ledger.state().orders.values(), key=lambda o: o["intent_seq"]):
        req = request_of(order)
        trigger = req.type == "stop_market"
        try:
            if order["state"] in ("intent", "submitted", "unknown"):
                result = rt.client.resolve_unknown(req, order["ts"])
                if result.status == "unknown":
                    diffs.append(Difference("unresolved_order", req.symbol,
                                            f"{req.client_order_id} ({order['purpose']}) is "
                                            f"still ambiguous: {result.reason}", "info"))
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
                                    f"{req.client_order_id}: lookup failed ({exc})", "info"))
            continue
        if report is None:
            diffs.append(Difference("missing_order", req.symbol,
                                    f"{req.client_order_id} ({order['state']}) is unknown to "
                                    "the exchange", "human"))
            continue
        new = state_of(report.status, report.amount, report.filled)
        if new == order["state"]:
            continue
        diffs.append(Difference("order_state", req.symbol,
                                f"{req.client_order_id} ({order['purpose']}): ledger "
                                f"{order['state']}, exchange {new}",
                                correction=f"recorded {new}"))
        if not dry_run:
            apply_outcome(rt, ex, order, req, report, new)
    return diffs


def ex_path(ex: Executor, req: OrderRequest, order: dict, new: str, **kw) -> list[Fact]:
    """The transition facts from the recorded state to ``new`` (via unknown if needed)."""
    current = order["state"]
    facts = []
    if new not in TRANSITIONS[current] and "unknown" in TRANSITIONS[current]:
        facts.append(ex.update(req, current, "unknown", position_id=order["position_id"],
                               reason="reconcile: looked up by client id"))
        current = "unknown"
    facts.append(ex.update(req, current, new, position_id=order["position_id"],
                           data={"source": "reconcile"}, **kw))
    return facts


def apply_outcome(rt, ex: Executor, order: dict, req: OrderRequest, report: OrderReport,
                  new: str) -> None:
    """Record what the exchange says became of one order, and its consequences."""
    state = rt.ledger.state()
    position = state.positions.get(req.symbol)
    purpose = order["purpose"]
    if purpose == "stop" and new == "filled" and position is not None \
            and position["position_id"] == order["position_id"]:
        stop = position.get("stop") or {"client_order_id": req.client_order_id,
                                        "price": order["trigger_price"], "ts": order["ts"]}
        if stop["client_order_id"] != req.client_order_id:
            stop = {"client_order_id": req.client_order_id, "price": order["trigger_price"],
                    "ts": order["ts"]}
        ex.record_stop_fill(position, stop, report)
        return
    facts = []
    fills = ex.fills_of(report, order["ts"] - 60_000) if report.filled > 0 else []
    facts += [ex.fill_fact(f, order["position_id"]) for f in fills]
    if new not in TERMINAL or new != order["state"]:
        facts += ex_path(ex, req, order, new, exchange_order_id=report.exchange_order_id)
    fee = sum((f.fee for f in fills), Decimal(0))
    avg = report.average_price
    if purpose == "entry" and report.filled > 0 and avg and position is None:
        facts.append(ex.fact("position_opened", symbol=req.symbol,
                             side="long" if req.side == "buy" else "short",
                             amount=report.filled, price=avg, fee=fee,
                             position_id=order["position_id"],
                             client_order_id=req.client_order_id,
                             data={"source": "reconcile"}))
    elif purpose == "exit" and position is not None and report.filled > 0 and avg:
        if report.filled >= Decimal(position["amount"]):
            facts.append(ex.close_fact(position, avg, fee, "exit (settled by reconcile)"))
        else:
            facts.append(ex.fact("position_changed", symbol=req.symbol, side=position["side"],
                                 amount=Decimal(position["amount"]) - report.filled,
                                 position_id=position["position_id"],
                                 reason="partial exit settled by reconcile"))
    elif purpose == "stop" and position is not None and new in ("accepted",) \
            and position["position_id"] == order["position_id"]:
        facts.append(ex.fact("stop_placed", symbol=req.symbol, side=req.side, amount=req.amount,
                             price=report.trigger_price or req.trigger_price,
                             client_order_id=req.client_order_id,
                             exchange_order_id=report.exchange_order_id,
                             position_id=position["position_id"],
                             data={"source": "reconcile"}))
    elif purpose == "stop" and new in ("cancelled", "expired") and position is not None \
            and (position.get("stop") or {}).get("client_order_id") == req.client_order_id:
        facts.append(ex.fact("stop_cancelled", symbol=req.symbol,
                             client_order_id=req.client_order_id,
                             position_id=position["position_id"], reason=f"stop {new}"))
    ex.record(facts)


# -- positions --------------------------------------------------------------------------

def compare_positions(rt, ex: Executor, dry_run: bool) -> list[Difference]:
    diffs = []
    state = rt.ledger.state()
    exchange = {p.symbol: p for p in rt.client.positions()}
    for symbol, p in sorted(state.positions.items()):
        theirs = exchange.get(symbol)
        if theirs is None:
            diffs.append(closed_on_exchange(rt, ex, p, dry_run))
        elif theirs.side != p["side"]:
            diffs.append(Difference("position_side", symbol, f"ledger {p['side']} "
                                    f"{p['amount']}, exchange {theirs.side} {theirs.amount}",
                                    "human"))
        elif theirs.amount != Decimal(p["amount"]):
            diffs.append(Difference("position_size", symbol, f"ledger {p['amount']}, exchange "
                                    f"{theirs.amount}", correction=f"size set to {theirs.amount}"))
            if not dry_run:
                ex.record([ex.fact("position_changed", symbol=symbol, side=p["side"],
                                   amount=theirs.amount, position_id=p["position_id"],
                                   reason="reconcile: size on the exchange",
                                   data={"source": "reconcile", "ledger_amount": p["amount"]})])
    for symbol, theirs in sorted(exchange.items()):
        if symbol not in state.positions:
            diffs.append(external_position(rt, ex, theirs, dry_run))
    return diffs


def closed_on_exchange(rt, ex: Executor, p: dict, dry_run: bool) -> Difference:
    """The ledger holds a position the exchange no longer has: find and record its close."""
    symbol = p["symbol"]
    try:
        fills = [f for f in rt.client.fills(symbol, p["opened_ts"] - 60_000)
                 if f.side == opposite(p["side"]) and f.ts >= p["opened_ts"] - 60_000]
    except READ_ERRORS as exc:
        return Difference("position_gone", symbol, f"not on the exchange; fills unavailable "
                          f"({exc})", "human")
    known = {r["trade_id"] for r in rt.ledger.select(
        "SELECT json_extract(data, '$.trade_id') AS trade_id FROM facts "
        "WHERE position_id = ? AND type = 'fill'", (p["position_id"],))}
    closing = [f for f in fills if f.trade_id not in known]
    amount = sum((f.amount for f in closing), Decimal(0))
    if amount < Decimal(p["amount"]) or amount == 0:
        return Difference("position_gone", symbol, f"ledger {p['side']} {p['amount']} is not on "
                          f"the exchange and only {amount} of closing fills were found", "human")
    avg = sum((f.price * f.amount for f in closing), Decimal(0)) / amount
    fee = sum((f.fee for f in closing), Decimal(0))
    diff = Difference("position_gone", symbol, f"ledger {p['side']} {p['amount']} closed on the "
                      f"exchange at {avg}", correction="recorded the closing fills and the close")
    if not dry_run:
        facts = [ex.fill_fact(f, p["position_id"]) for f in closing]
        facts.append(ex.close_fact(p, avg, fee, "closed_on_exchange"))
        ex.record(facts)
    return diff


def external_position(rt, ex: Executor, theirs, dry_run: bool) -> Difference:
    adopt = rt.config.reconcile.external_positions == "adopt"
    detail = f"{theirs.side} {theirs.amount} at {theirs.entry_price} is not in the ledger"
    if not adopt:
        if not dry_run:
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
                      correction="adopted; a stop follows")


# -- stops ------------------------------------------------------------------------------

def compare_stops(rt, ex: Executor, dry_run: bool) -> list[Difference]:
    """Every position has its stop resting; no stop of ours rests without a position."""
    diffs = []
    state = rt.ledger.state()
    try:
        resting = {o.client_order_id: o for o in rt.client.open_orders() if o.is_trigger}
    except (READ_ERRORS + (BadExchangeData,)) as exc:
        return [Difference("stops", None, f"open orders unavailable ({exc})", "info")]
    wanted = set()
    pending = {o["position_id"] for o in state.orders.values()
               if o["purpose"] == "stop" and o["state"] in ("intent", "submitted", "unknown")}
    for symbol, p in sorted(state.positions.items()):
        stop = p.get("stop")
        if stop and stop["client_order_id"] in resting:
            wanted.add(stop["client_order_id"])
            continue
        if p["position_id"] in pending:
            continue  # a stop is on its way; the next run settles it
        level = stop_price(p["side"], Decimal(p["entry_price"]), rt.config.exits.stop_loss_pct)
        if stop:
            level = Decimal(stop["price"])
        diffs.append(Difference("missing_stop", symbol, f"{p['side']} {p['amount']} has no stop "
                                "resting on the exchange", correction=f"stop placed at {level}"))
        if not dry_run:
            if stop:  # it vanished (cancelled or expired outside the bot)
                ex.record([ex.fact("stop_cancelled", symbol=symbol,
                                   client_order_id=stop["client_order_id"],
                                   position_id=p["position_id"],
                                   reason="not resting on the exchange")])
                p = rt.ledger.state().positions[symbol]
            coid = ex.place_stop(p, level)
            if coid:
                wanted.add(coid)
    prefix = f"{rt.config.bot.id}-"
    for coid, order in sorted(resting.items(), key=lambda kv: kv[0] or ""):
        if coid in wanted:
            continue
        if not coid or not coid.startswith(prefix):
            diffs.append(Difference("foreign_order", order.symbol, f"stop {coid or order.exchange_order_id} "
                                    "was not placed by this bot", "info"))
            continue
        diffs.append(Difference("orphan_stop", order.symbol, f"stop {coid} rests without a "
                                "position in the ledger", correction="cancelled"))
        if not dry_run:
            rt.client.cancel(order.symbol, client_order_id=coid, trigger=True)
            ex.record([ex.fact("stop_cancelled", symbol=order.symbol, client_order_id=coid,
                               reason="orphaned stop cancelled by reconcile")])
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
