"""State is a fold: the rules one by one, and fold(all rows) == fold(checkpoint + tail)
over random sequences of realistic facts."""

from __future__ import annotations

import json
import sqlite3
import tempfile
from decimal import Decimal, localcontext
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.clock import DAY_MS
from ledger import FACT_TYPES, Fact, Ledger, State, fold
from ledger.facts import canonical_json, counting_day, happened_ms, recorded_day
from ledger.schema import CLOSE_DAY, closed_ms

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
BTC, ETH, SOL = "BTC/USDT:USDT", "ETH/USDT:USDT", "SOL/USDT:USDT"


def run(*facts: Fact, state: State | None = None) -> State:
    base = 0 if state is None else state.seq
    return fold((f.row(base + i) for i, f in enumerate(facts, 1)), state)


def via_checkpoint(state: State) -> State:
    """What a checkpoint row gives back: the state through its canonical JSON."""
    return State.from_dict(json.loads(canonical_json({"state": state.to_dict()}))["state"])


def intent(coid, symbol=BTC, ts=T0, purpose="entry", pid=None):
    return Fact("order_intent", ts, symbol=symbol, side="buy", amount="0.5",
                client_order_id=coid, position_id=pid, data={"purpose": purpose})


def update(coid, state, ts=T0, eid=None):
    return Fact("order_update", ts, client_order_id=coid, exchange_order_id=eid,
                data={"state": state})


def opened(symbol=BTC, pid="p1", ts=T0, amount="1", price="100", fee=None):
    return Fact("position_opened", ts, symbol=symbol, side="long", amount=amount, price=price,
                fee=fee, position_id=pid)


def closed(symbol=BTC, pid="p1", ts=T0, pnl="5", fee="0.2", day=None):
    return Fact("position_closed", ts, symbol=symbol, price="105", pnl=pnl, fee=fee,
                position_id=pid, reason="take_profit",
                data={} if day is None else {"day": day})


# -- the rules ---------------------------------------------------------------------------


def test_orders_live_until_terminal():
    s = run(intent("a"), intent("b"), intent("c"), intent("d"), intent("e"),
            Fact("order_submitted", T0, client_order_id="a"),
            update("a", "accepted", eid="X1"),
            Fact("fill", T0, symbol=BTC, side="buy", amount="0.2", price="1", client_order_id="a"),
            Fact("fill", T0, symbol=BTC, side="buy", amount="0.05", price="1", client_order_id="a"),
            update("a", "partially_filled"),
            update("b", "filled"), update("c", "cancelled"), update("d", "rejected"),
            Fact("order_submitted", T0, client_order_id="e"), update("e", "unknown"),
            update("zzz", "accepted"))  # an update for an order never intended is ignored
    assert set(s.orders) == {"a", "e"}
    a = s.orders["a"]
    assert (a["state"], a["exchange_order_id"], a["filled"]) == ("partially_filled", "X1", "0.25")
    assert [o["client_order_id"] for o in s.unresolved_orders()] == ["e"]
    s = run(update("a", "expired"), update("e", "filled"), state=s)
    assert s.orders == {}


def test_positions_open_change_and_close():
    s = run(opened(fee="0.1"), opened(ETH, pid="p2"),
            Fact("position_changed", T0, symbol=BTC, amount="1.5", price="101", fee="0.3",
                 position_id="p1"),
            Fact("position_changed", T0, symbol=ETH, amount="9", position_id="stale"))
    assert s.positions[BTC]["amount"] == "1.5" and s.positions[BTC]["entry_price"] == "101"
    assert s.positions[BTC]["fees"] == "0.3"
    assert s.positions[ETH]["amount"] == "1"  # the change named another position
    s = run(closed(pid="p1"), state=s)
    assert set(s.positions) == {ETH}


def test_a_losing_close_starts_the_cooldown():
    s = run(opened(), closed(ts=T0 + 7, pnl="3"))
    assert s.last_loss_exit == {}
    s = run(opened(pid="p2"), closed(pid="p2", ts=T0 + 9, pnl="-1.5"), state=s)
    assert s.last_loss_exit == {BTC: T0 + 9}


def test_realized_pnl_and_fees_roll_over_at_utc_midnight():
    day1, day2 = "2026-01-01", "2026-01-02"
    s = run(opened(), closed(ts=T0 + 10, pnl="-2.5"),
            Fact("fill", T0 + 20, symbol=BTC, side="sell", amount="1", price="1", fee="0.1"),
            opened(pid="p2"), closed(pid="p2", ts=T0 + DAY_MS - 1, pnl="1"))
    assert (s.day, s.realized_today, s.fees_today) == (day1, "-1.5", "0.1")
    assert s.realized_on(day1) == Decimal("-1.5") and s.realized_on(day2) == 0
    s = run(opened(pid="p3"), closed(pid="p3", ts=T0 + DAY_MS, pnl="4"), state=s)
    assert (s.day, s.realized_today, s.fees_today) == (day2, "4", "0")
    assert s.realized_today_at(T0 + DAY_MS + 5) == 4 and s.realized_today_at(T0) == 0


def test_a_close_counts_on_the_day_its_fact_names():
    # The stop fired at 23:50 while the bot was down; the restart recorded it at 00:10,
    # before it closed the day: on the day it fired (facts.counting_day decided so).
    day1, day2 = "2026-01-01", "2026-01-02"
    fired, restart = T0 + DAY_MS - 600_000, T0 + DAY_MS + 600_000
    s = run(opened(ts=T0 + 10), Fact("fill", restart, symbol=BTC, side="sell", amount="1",
                                     price="95", fee="0.1", data={"exchange_ts": fired}),
            closed(ts=restart, pnl="-5", day=day1))
    assert (s.day, s.realized_today, s.fees_today) == (day1, "-5", "0.1")
    assert s.realized_today_at(restart) == 0 and s.realized_on(day1) == Decimal(-5)
    # Found after a close of the new day was recorded: that day's totals stay its own.
    s = run(opened(pid="p2"), closed(pid="p2", ts=restart + 1, pnl="2"),
            opened(ETH, "p3"), closed(ETH, "p3", ts=restart + 2, pnl="-9", day=day1),
            state=s)
    assert (s.day, s.realized_today, s.fees_today) == (day2, "2", "0")
    assert s.last_loss_exit[ETH] == restart + 2  # the cooldown runs from when it was known


def test_a_fee_seen_after_its_day_was_closed_counts_on_the_day_it_was_recorded():
    fired, seen = T0 + DAY_MS - 1, T0 + DAY_MS + 5_000
    fill = Fact("fill", seen, symbol=BTC, side="sell", amount="1", price="95", fee="0.1",
                data={"exchange_ts": fired})
    s = run(Fact("day_close", T0 + DAY_MS + 1, data={"day": "2026-01-01"}), fill)
    assert (s.day, s.fees_today) == ("2026-01-02", "0.1")
    assert (run(fill).day, run(fill).fees_today) == ("2026-01-01", "0.1")  # not closed yet


def test_the_day_a_close_counts_on_is_decided_when_it_is_recorded():
    fired, seen = T0 + DAY_MS - 1, T0 + DAY_MS + 5_000  # 23:59:59.999, 00:00:05
    assert counting_day(seen, fired, None) == "2026-01-01"
    assert counting_day(seen, fired, "2025-12-31") == "2026-01-01"
    assert counting_day(seen, fired, "2026-01-01") == "2026-01-02"  # its day closed first
    assert counting_day(seen, None, None) == counting_day(seen, seen + 9, None) == "2026-01-02"


@pytest.mark.parametrize("day", [None, True, 20260101, "2026-1-1", "yesterday",
                                 "2026-01-01\n", "\uff12026-01-01"])
def test_a_close_without_a_usable_day_counts_on_the_day_it_was_recorded(day):
    s = run(opened(), closed(ts=T0 + DAY_MS, pnl="-1", day=day))
    assert (s.day, s.realized_today) == ("2026-01-02", "-1")


def sql(expression: str, ts: int, data: str):
    with sqlite3.connect(":memory:") as conn:
        return conn.execute(f"SELECT {expression} FROM (SELECT ? AS ts, ? AS data) facts",
                            (ts, data)).fetchone()[0]


@settings(max_examples=300, deadline=None)
@given(ts=st.integers(0, 2**42), value=st.none() | st.booleans() | st.text(max_size=11)
       | st.integers(-2**70, 2**70) | st.integers(0, 2**42)
       | st.floats(allow_nan=False, allow_infinity=False)
       | st.dates().map(lambda d: d.isoformat()))
def test_the_fold_and_the_views_agree_on_when_and_which_day_a_position_closed(ts, value):
    data = Fact("position_closed", ts, symbol=BTC, position_id="p1",
                data={"closed_ts": value, "day": value}).row(1)[-1]
    assert sql(closed_ms(), ts, data) == happened_ms(ts, value)
    assert sql(CLOSE_DAY, ts, data) == recorded_day(ts, value)


def test_trailing_state_and_stops_follow_their_position():
    s = run(opened(),
            Fact("best_price", T0, symbol=BTC, price="110", position_id="p1",
                 data={"trailing_active": True, "trail_pct": 0.01}),
            Fact("best_price", T0, symbol=BTC, price="999", position_id="old"),
            Fact("stop_placed", T0 + 1, symbol=BTC, price="95", client_order_id="s1",
                 position_id="p1"),
            Fact("stop_moved", T0 + 2, symbol=BTC, price="99", client_order_id="s2",
                 exchange_order_id="E2", position_id="p1"),
            Fact("stop_cancelled", T0, symbol=BTC, client_order_id="s1"))  # old one: no effect
    p = s.positions[BTC]
    assert (p["best_price"], p["trailing_active"], p["trail_pct"]) == ("110", True, 0.01)
    assert p["stop"] == {"client_order_id": "s2", "exchange_order_id": "E2", "price": "99",
                         "ts": T0 + 2}
    assert p["stops_placed"] == 2
    s = run(Fact("stop_cancelled", T0, symbol=BTC, client_order_id="s2"), state=s)
    assert s.positions[BTC]["stop"] is None


def test_balances_track_equity_and_its_peak():
    s = run(*(Fact("balance", T0, data={"equity": e}) for e in ("100", "120.5", "90")),
            Fact("balance", T0, data={"currency": "USDT"}),
            Fact("balance", T0, data={"equity": "not a number"}),
            Fact("balance", T0, data={"equity": 95.25}))
    assert (s.equity, s.equity_peak) == ("95.25", "120.5")


def test_halts_resumes_and_day_close():
    s = run(Fact("balance", T0, data={"equity": "100"}),
            Fact("balance", T0, data={"equity": "80"}),
            *(Fact("halt", T0, reason=k, data={"kind": k})
              for k in ("daily_loss", "drawdown", "manual")))
    assert set(s.halts) == {"daily_loss", "drawdown", "manual"} and s.halted()
    s2 = run(Fact("day_close", T0, data={"day": "2026-01-01", "equity": "80"}), state=s)
    assert set(s2.halts) == {"drawdown", "manual"}
    assert (s2.last_day_closed, s2.day_start_equity) == ("2026-01-01", "80")
    s3 = run(Fact("resume", T0, data={"kind": "manual"}), state=s2)
    assert set(s3.halts) == {"drawdown"} and s3.equity_peak == "100"
    s4 = run(Fact("resume", T0, data={"kind": "drawdown"}), state=s3)
    assert s4.halts == {} and s4.equity_peak == "80"  # the loss was accepted
    s5 = run(Fact("resume", T0), state=s)  # no kind: all
    assert s5.halts == {} and not s5.halted()


def test_runs_rotations_signals_and_reconciliations():
    s = run(Fact("job_run", T0, data={"job": "scan", "outcome": "ok", "duration_ms": 12}),
            Fact("job_run", T0 + 1, data={"job": "scan", "outcome": "error"}),
            Fact("rotation", T0 + 2, data={"coins": [BTC, ETH], "scheduled_ms": T0}),
            Fact("signal", T0, symbol=SOL, side="none", data={"candle_ts": T0 - 300_000}),
            Fact("reconcile_run", T0 + 3, data={"status": "ok"}),
            Fact("reconcile_run", T0 + 4, data={"dry_run": True}))
    assert s.last_runs["scan"]["outcome"] == "error" and s.last_runs["scan"]["seq"] == 2
    assert s.active_coins == [BTC, ETH]
    assert s.last_rotation == {"scheduled_ms": T0, "ts": T0 + 2}
    assert s.last_signal == {SOL: T0 - 300_000}
    assert s.last_reconcile_ts == T0 + 3 and s.last_reconcile_seq == 5  # not the dry run
    assert run(Fact("checkpoint", T0, data={"state": {}}), state=s).seq == s.seq + 1


def test_a_job_is_failing_since_the_first_error_after_it_last_ran_well():
    def scan(ts, outcome, started=True):
        return Fact("job_run", ts, data={"job": "scan", "outcome": outcome,
                                         "started_ms": ts if started else None})

    # Runs that never started (missed; skipped as the one before still ran, or coalesced
    # by the scheduler) tell nothing: a scan slower than its interval is skipped between
    # every two of its failures.
    s = run(scan(T0, "ok"), scan(T0 + 10, "error"), scan(T0 + 20, "missed", started=False),
            scan(T0 + 25, "skipped", started=False), scan(T0 + 30, "degraded"))
    assert s.last_runs["scan"]["failing_since"] == T0 + 10  # degraded: failing too
    assert run(scan(T0 + 40, "skipped"), state=s).last_runs["scan"]["failing_since"] is None
    s = run(scan(T0 + 50, "ok"), scan(T0 + 60, "error"), state=s)
    assert s.last_runs["scan"]["failing_since"] == T0 + 60
    # The time the bot was down is not failing time: a start begins anew.
    s = run(Fact("service", T0 + 90, data={"event": "started"}), state=s)
    assert s.last_runs["scan"]["failing_since"] is None
    assert run(scan(T0 + 99, "error"), state=s).last_runs["scan"]["failing_since"] == T0 + 99


def test_flagged_external_positions_stand_until_adopted_or_gone():
    def ext(symbol, reason, **data):
        return Fact("external_position", T0, symbol=symbol, side="long", amount="2",
                    price="10", reason=reason, data=data)

    s = run(ext(BTC, "flagged", adopted=False), ext(ETH, "flagged", adopted=False))
    assert s.external == {sym: {"side": "long", "amount": "2", "price": "10", "ts": T0}
                          for sym in (BTC, ETH)}
    assert via_checkpoint(s) == s
    s2 = run(ext(BTC, "adopted", adopted=True), ext(ETH, "gone", gone=True), state=s)
    assert s2.external == {}
    # Flagged while our own entry order was unresolved, then found ours: no longer external.
    s3 = run(ext(SOL, "flagged", adopted=False), opened(symbol=SOL, pid="p9"), state=s2)
    assert s3.external == {} and SOL in s3.positions
    # A checkpoint written before the field existed still loads, with nothing flagged
    # (reconcile flags again what still stands: see test_reconcile).
    old = {k: v for k, v in s.to_dict().items() if k != "external"}
    assert State.from_dict(old).external == {}


def test_the_latest_end_of_an_ip_ban_stands():
    def ban(until):
        return Fact("ip_ban", T0, reason="banned", data={"until_ms": until})

    s = run(ban(T0 + 120_000), ban(T0 + 60_000), ban("soon"), ban(True), ban(1.5e12))
    assert s.ip_ban_until_ms == T0 + 120_000  # a shorter or odd one shortens nothing
    assert via_checkpoint(s) == s
    lifted = run(Fact("ip_ban", T0, reason="lifted by hand", data={"lifted": True}), state=s)
    assert lifted.ip_ban_until_ms == 0
    assert run(ban(T0 + 5_000), state=lifted).ip_ban_until_ms == T0 + 5_000
    # no ban lasts longer than Binance's longest (3 days): a 10-year one held no stop for
    # 10 years
    assert run(ban(T0 + 10 * 365 * DAY_MS)).ip_ban_until_ms == T0 + 3 * DAY_MS
    old = {k: v for k, v in s.to_dict().items() if k != "ip_ban_until_ms"}
    assert State.from_dict(old).ip_ban_until_ms == 0  # a checkpoint from before the field


def test_the_fold_is_pure():
    s0 = run(opened(), intent("a"))
    snapshot = s0.to_dict()
    with localcontext() as ctx:
        ctx.prec = 3  # the caller's decimal context must not round the sums
        s1 = run(Fact("fill", T0, symbol=BTC, side="buy", amount="0.123456789",
                      price="1", client_order_id="a", fee="1234.5678"), state=s0)
    assert s0.to_dict() == snapshot  # the input state is untouched
    assert s1.orders["a"]["filled"] == "0.123456789" and s1.fees_today == "1234.5678"


# -- folds over random sequences of realistic facts --------------------------------------

SYMBOLS = (BTC, ETH, SOL)
ORDER_STATES = ("accepted", "partially_filled", "filled", "cancelled", "rejected", "expired",
                "unknown")
sym = st.sampled_from(SYMBOLS)
qty = st.decimals(min_value=Decimal("0.001"), max_value=Decimal("1000"), places=3).map(str)
signed = st.decimals(min_value=Decimal("-500"), max_value=Decimal("500"), places=4).map(str)

OPS = st.one_of(
    st.tuples(st.just("advance"), st.integers(0, 2 * DAY_MS)),
    st.tuples(st.just("intent"), sym, st.sampled_from(("entry", "exit", "stop"))),
    st.tuples(st.just("submitted"), st.integers(0, 99)),
    st.tuples(st.just("update"), st.integers(0, 99), st.sampled_from(ORDER_STATES)),
    st.tuples(st.just("fill"), st.integers(0, 99), qty, st.none() | qty),
    st.tuples(st.just("open"), sym, st.sampled_from(("long", "short")), qty, qty,
              st.none() | qty),
    st.tuples(st.just("change"), sym, qty, st.none() | qty, st.booleans()),
    st.tuples(st.just("close"), sym, signed, st.none() | qty, st.booleans()),
    st.tuples(st.just("best"), sym, qty, st.none() | st.booleans(),
              st.none() | st.floats(0.001, 0.2)),
    st.tuples(st.just("stop"), sym, qty, st.sampled_from(("stop_placed", "stop_moved"))),
    st.tuples(st.just("unstop"), sym, st.booleans()),
    st.tuples(st.just("balance"), st.none() | qty),
    st.tuples(st.just("rotation"), st.lists(sym, unique=True)),
    st.tuples(st.just("day_close"), st.none() | qty),
    st.tuples(st.just("halt"), st.sampled_from(("daily_loss", "drawdown", "manual"))),
    st.tuples(st.just("resume"), st.sampled_from(("daily_loss", "drawdown", "manual", "all"))),
    st.tuples(st.just("job"), st.sampled_from(("scan", "rotate", "daily_reset", "reconcile")),
              st.sampled_from(("ok", "error", "skipped"))),
    st.tuples(st.just("signal"), sym, st.integers(0, 10**6)),
    st.tuples(st.just("reconcile"), st.booleans()),
    st.tuples(st.just("other"), st.sampled_from(("note", "service", "risk_decision",
                                                 "external_position"))),
)


def realistic(ops: list[tuple]) -> list[Fact]:
    """Turn random operations into a coherent story (ids refer to earlier facts; a flag
    sometimes makes them refer to a stale position, as late or corrected facts do)."""
    ts, facts, coids, pids, n = T0, [], [], {}, 0
    for op, *a in ops:
        n += 1
        if op == "advance":
            ts += a[0]
            continue
        if op == "intent":
            coids.append(f"bot1-{a[1][0].upper()}-{a[0][:3]}-{n}")
            facts.append(Fact("order_intent", ts, symbol=a[0], side="buy", amount="1",
                              client_order_id=coids[-1], position_id=pids.get(a[0]),
                              data={"purpose": a[1], "reduce_only": a[1] != "entry"}))
        elif op in ("submitted", "update", "fill") and coids:
            coid = coids[a[0] % len(coids)]
            if op == "submitted":
                facts.append(Fact("order_submitted", ts, client_order_id=coid))
            elif op == "update":
                facts.append(Fact("order_update", ts, client_order_id=coid,
                                  exchange_order_id=f"x{n}", data={"state": a[1]}))
            else:
                facts.append(Fact("fill", ts, symbol=BTC, side="buy", amount=a[1], price="10",
                                  fee=a[2], client_order_id=coid, data={"trade_id": n}))
        elif op == "open":
            pids[a[0]] = f"pos-{n}"
            facts.append(Fact("position_opened", ts, symbol=a[0], side=a[1], amount=a[2],
                              price=a[3], fee=a[4], position_id=pids[a[0]]))
        elif op == "change":
            facts.append(Fact("position_changed", ts, symbol=a[0], amount=a[1], price=a[2],
                              position_id=pids.get(a[0], "none") if a[3] else "stale"))
        elif op == "close":
            pid = pids.pop(a[0], None) if a[3] else "stale"
            facts.append(Fact("position_closed", ts, symbol=a[0], price="10", pnl=a[1],
                              fee=a[2], position_id=pid or "gone", reason="exit"))
        elif op == "best":
            data = {k: v for k, v in (("trailing_active", a[2]), ("trail_pct", a[3]))
                    if v is not None}
            facts.append(Fact("best_price", ts, symbol=a[0], price=a[1],
                              position_id=pids.get(a[0], "none"), data=data))
        elif op == "stop":
            facts.append(Fact(a[2], ts, symbol=a[0], price=a[1], client_order_id=f"stop-{n}",
                              position_id=pids.get(a[0])))
        elif op == "unstop":
            match = [f.client_order_id for f in facts
                     if f.type in ("stop_placed", "stop_moved") and f.symbol == a[0]]
            coid = match[-1] if match and a[1] else "stop-none"
            facts.append(Fact("stop_cancelled", ts, symbol=a[0], client_order_id=coid))
        elif op == "balance":
            facts.append(Fact("balance", ts, data={"currency": "USDT", "equity": a[0]}))
        elif op == "rotation":
            facts.append(Fact("rotation", ts, data={"coins": a[0], "scheduled_ms": ts}))
        elif op == "day_close":
            facts.append(Fact("day_close", ts, data={"day": f"d{ts // DAY_MS}", "equity": a[0]}))
        elif op == "halt":
            facts.append(Fact("halt", ts, reason="limit", data={"kind": a[0]}))
        elif op == "resume":
            facts.append(Fact("resume", ts, data={"kind": a[0]}))
        elif op == "job":
            facts.append(Fact("job_run", ts, data={"job": a[0], "outcome": a[1],
                                                   "scheduled_ms": ts, "duration_ms": n}))
        elif op == "signal":
            facts.append(Fact("signal", ts, symbol=a[0], side="none",
                              data={"candle_ts": a[1]}))
        elif op == "reconcile":
            facts.append(Fact("reconcile_run", ts, data={"dry_run": a[0], "status": "ok"}))
        elif op == "other":
            facts.append(Fact(a[0], ts, symbol=BTC, data={"n": n}))
    return facts


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(OPS, min_size=30, max_size=150),
       cuts=st.lists(st.integers(0, 200), max_size=4))
def test_a_checkpoint_plus_its_tail_folds_to_the_same_state(ops, cuts):
    rows = [f.row(i) for i, f in enumerate(realistic(ops), 1)]
    whole = fold(rows)
    for cut in cuts:
        cut = min(cut, len(rows))
        assert fold(rows[cut:], via_checkpoint(fold(rows[:cut]))) == whole


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=30, max_size=150), every=st.integers(1, 6),
       sizes=st.lists(st.integers(1, 12), min_size=1, max_size=8))
def test_the_ledger_state_is_the_replay(ops, every, sizes):
    """Checkpoints every few rows, batches of random sizes, state() on the way, reopening."""
    facts = realistic(ops)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bot.db"
        with Ledger(path, checkpoint_every=every) as ledger:
            i = 0
            for k, size in enumerate(sizes * (len(facts) // sum(sizes) + 1)):
                if i >= len(facts):
                    break
                ledger.append(facts[i:i + size])
                i += size
                if k % 3 == 1:
                    assert ledger.state() == ledger.replay()
            live = ledger.state()
            assert live == ledger.replay()
        for readonly in (False, True):
            with Ledger(path, readonly=readonly) as again:
                assert again.state() == live
                rows = list(again.rows())
        # the bot's facts, folded without the checkpoint rows, say the same
        plain = fold(r for r in rows if r[2] != "checkpoint")
        assert {**plain.to_dict(), "seq": live.seq} == live.to_dict()


# Any data a Fact accepts, under the keys the rules read.
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.text(max_size=5)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=3),
    max_leaves=4)
KEYS = ("state", "purpose", "type", "reduce_only", "trigger_price", "trailing_active",
        "trail_pct", "equity", "coins", "scheduled_ms", "candle_ts", "day", "kind", "until_ms",
        "job", "outcome", "duration_ms", "dry_run", "closed_ts", "exchange_ts")
any_fact = st.builds(
    Fact, type=st.sampled_from(sorted(FACT_TYPES)), ts=st.integers(0, 2**42),
    symbol=st.sampled_from(SYMBOLS), side=st.sampled_from(("buy", "long", "x")),
    amount=qty, price=qty, fee=st.none() | qty, pnl=st.none() | signed,
    position_id=st.sampled_from(("p1", "p2")), client_order_id=st.sampled_from(("c1", "c2")),
    exchange_order_id=st.none() | st.just("e1"), reason=st.none() | st.just("r"),
    data=st.dictionaries(st.sampled_from(KEYS), json_value, max_size=5))


@settings(max_examples=80, deadline=None)
@given(facts=st.lists(any_fact, min_size=5, max_size=30), cut=st.integers(0, 30))
def test_no_recordable_fact_can_stop_the_fold(facts, cut):
    """An odd value in data is data: the fold never raises, and checkpoints still agree."""
    rows = [f.row(i) for i, f in enumerate(facts, 1)]
    whole = fold(rows)
    assert fold(rows[cut:], via_checkpoint(fold(rows[:cut]))) == whole
    assert via_checkpoint(whole) == whole


def test_out_of_range_quantities_in_older_rows_cannot_stop_the_fold():
    """Rows recorded before quantities were range-checked: a fee of 1e1000000 overflowed
    the day's sum and stopped every fold for good. Such a value is left out of the sums."""
    ok = [Fact("fill", T0, symbol=BTC, side="buy", amount="1", price="2", fee="0.5",
               client_order_id="c1").row(1),
          Fact("position_closed", T0 + 1, symbol=BTC, position_id="p1", pnl="-1").row(2)]
    odd = [(3, T0 + 2, "fill", None, BTC, "buy", "1", "2", "1e1000000", None, None, None,
            None, None, "{}"),
           (4, T0 + 3, "position_closed", None, BTC, None, None, None, None, "1e-1000000",
            "p2", None, None, None, "{}"),
           (5, T0 + 4, "balance", None, None, None, None, None, None, None, None, None, None,
            None, '{"equity":"1E+1000000"}')]
    s = fold(ok + odd)
    assert (s.fees_today, s.realized_today, s.equity, s.seq) == ("0.5", "-1", None, 5)
    assert via_checkpoint(s) == s


@pytest.mark.parametrize("data", [{"kind": 1}, {"kind": ["a"]}, {"kind": None}])
def test_halt_kinds_are_json_keys(data):
    s = run(Fact("halt", T0, reason="x", data=data))
    assert via_checkpoint(s) == s and len(s.halts) == 1
