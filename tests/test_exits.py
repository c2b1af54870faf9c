"""Exit rules: stop loss, trailing stop, surge lock, and state that survives a restart."""

from __future__ import annotations

import json
from decimal import Decimal as D

import pytest
from ccxt.base.decimal_to_precision import ROUND, TICK_SIZE, decimal_to_precision
from hypothesis import given, settings
from hypothesis import strategies as st

from core.config import Config
from core.exits import (
    ExitRules,
    PositionView,
    evaluate_exit,
    more_protective,
    resting_level,
    stop_needs_move,
    stop_on_tick,
    stop_price,
    trailing_stop_price,
)

RULES = ExitRules.from_config(Config().exits)


def position(side="long", entry="100", best=None, trailing=False, trail_pct=None, stop=None):
    """A position in the ledger fold's dict shape."""
    return {"position_id": "p1", "symbol": "ETH/USDT:USDT", "side": side, "amount": "0.5",
            "entry_price": entry, "opened_ts": 0, "best_price": best,
            "trailing_active": trailing, "trail_pct": trail_pct,
            "stop": None if stop is None else {"client_order_id": "c", "exchange_order_id": "e",
                                               "price": stop}}


def apply(p: dict, d) -> dict:
    """What the caller records after a decision, as the ledger fold would hold it."""
    return {**p, "best_price": str(d.best_price), "trailing_active": d.trailing_active,
            "trail_pct": None if d.trail_pct is None else str(d.trail_pct)}


def test_rules_from_config_are_the_documented_defaults():
    assert RULES == ExitRules()
    assert (RULES.stop_loss_pct, RULES.trailing_activation_pct, RULES.trailing_stop_pct,
            RULES.surge_pct) == (2.0, 2.0, 0.5, 4.0)


def test_stop_and_trailing_prices():
    assert stop_price("long", D("100"), 2.0) == D("98")
    assert stop_price("short", D("100"), 2.0) == D("102")
    assert trailing_stop_price("long", D("110"), 0.5) == D("109.45")
    assert trailing_stop_price("short", D("90"), 0.5) == D("90.45")
    with pytest.raises(ValueError):
        stop_price("flat", D("100"), 2.0)


@pytest.mark.parametrize(("side", "low", "high", "action"), [
    ("long", "98", "100", "exit"),
    ("long", "98.01", "100", "hold"),
    ("short", "99", "102", "exit"),
    ("short", "99", "101.99", "record_best"),
])
def test_stop_loss_two_percent_from_entry(side, low, high, action):
    d = evaluate_exit(position(side), high, low, "99.5" if side == "long" else "100.5", None, RULES)
    assert d.action == action
    if action == "exit":
        assert d.reason == "stop_loss" and d.exit_level == D("98" if side == "long" else "102")
    assert d.stop_price == D("98" if side == "long" else "102")


def test_a_tighter_resting_exchange_stop_counts():
    d = evaluate_exit(position(stop="99"), "100", "98.9", "99.2", None, RULES)
    assert (d.action, d.reason, d.exit_level) == ("exit", "stop_loss", D("99"))


def test_exchange_stop_moved_up_to_the_trail_exits_as_trailing_stop():
    p = position(best="104", trailing=True, trail_pct="0.5", stop="103.48")
    d = evaluate_exit(p, "104", "103.4", "103.6", None, RULES)
    assert (d.action, d.reason, d.exit_level) == ("exit", "trailing_stop", D("103.48"))
    untrailed = position(stop="99")  # a tighter stop without a trail is still a stop loss
    assert evaluate_exit(untrailed, "100", "98.9", "99.5", None, RULES).reason == "stop_loss"


def test_best_price_is_recorded_when_it_improves():
    d = evaluate_exit(position(), "101", "99.5", "100.5", None, RULES)
    assert (d.action, d.best_price, d.best_improved) == ("record_best", D("101"), True)
    assert not d.trailing_active and d.changed
    again = evaluate_exit(apply(position(), d), "100.9", "99.5", "100", None, RULES)
    assert (again.action, again.best_price, again.changed) == ("hold", D("101"), False)


def test_trailing_arms_at_two_percent_and_exits_on_half_percent_retrace():
    p = position()
    d = evaluate_exit(p, "102", "100", "101.9", None, RULES)
    assert (d.action, d.reason) == ("tighten_trail", "trailing_armed")
    assert d.trail_pct == D("0.5") and d.stop_price == D("101.49")
    p = apply(p, d)
    assert evaluate_exit(p, "101.8", "101.5", "101.6", None, RULES).action == "hold"
    d = evaluate_exit(p, "101.8", "101.49", "101.6", None, RULES)
    assert (d.action, d.reason, d.exit_level) == ("exit", "trailing_stop", D("101.49"))


def test_a_low_before_the_new_high_does_not_exit():
    """Within one scan the order of high and low is unknown: the trail from a new best is
    compared only with the last price, never with a low that may have come earlier."""
    p = apply(position(), evaluate_exit(position(), "102", "100", "102", None, RULES))
    d = evaluate_exit(p, "104", "101.6", "103.9", None, RULES)
    assert d.action == "record_best" and d.best_price == D("104")
    assert d.stop_price == D("103.48")  # 104 * 0.995, now resting
    d = evaluate_exit(p, "104", "101.6", "103.4", None, RULES)  # last below the new trail
    assert (d.action, d.reason) == ("exit", "trailing_stop")


def test_short_trailing_mirror():
    p = position("short")
    d = evaluate_exit(p, "100", "98", "98.2", None, RULES)
    assert (d.action, d.best_price, d.stop_price) == ("tighten_trail", D("98"), D("98.49"))
    d = evaluate_exit(apply(p, d), "98.49", "98.1", "98.3", None, RULES)
    assert (d.action, d.reason) == ("exit", "trailing_stop")


def test_surge_locks_profit_with_a_tight_trail():
    p = position()
    d = evaluate_exit(p, "104.5", "100.2", "104.4", "100.3", RULES)
    assert (d.action, d.reason) == ("tighten_trail", "surge_lock")
    assert d.trail_pct == D("0.25") and d.trailing_active
    assert d.stop_price == trailing_stop_price("long", D("104.5"), D("0.25"))
    p = apply(p, d)
    assert evaluate_exit(p, "104.6", "104.4", "104.5", "104.4", RULES).action == "record_best"
    d = evaluate_exit(p, "104.6", "104.2", "104.3", "104.4", RULES)
    assert (d.action, d.reason) == ("exit", "surge_lock")


def test_no_surge_when_the_move_leaves_the_position_at_a_loss():
    p = position(entry="110", best="110")
    d = evaluate_exit(p, "104.5", "108.5", "104.3", "100.2", RULES)
    assert d.reason != "surge_lock" and not d.trailing_active


def test_surge_never_loosens_an_already_tighter_trail():
    rules = ExitRules(surge_trailing_stop_pct=0.3)
    p = position(best="110", trailing=True, trail_pct="0.2")
    d = evaluate_exit(p, "115", "110", "115", "110", rules)
    assert d.trail_pct == D("0.2") and d.action == "record_best"


def test_bad_prices_hold():
    for args in [(None, None, "nan"), ("1", "0", "1"), ("x", "1", "1"), (None, None, "-5")]:
        d = evaluate_exit(position(), *args, None, RULES)
        assert (d.action, d.reason) == ("hold", "bad_price")


def test_position_view_from_ledger_dict():
    pv = PositionView.from_state(position(best="101.5", trailing=True, trail_pct="0.5",
                                          stop="98"))
    assert (pv.best, pv.trail_pct, pv.stop_price, pv.amount) == (D("101.5"), D("0.5"), D("98"),
                                                                 D("0.5"))
    with pytest.raises(ValueError):
        PositionView.from_state(position(side="up"))
    with pytest.raises(ValueError):
        PositionView.from_state({**position(), "entry_price": "0"})


def test_stop_moves_only_tighter_and_rate_limited():
    assert stop_needs_move("long", None, D("98"), None, 0, 30)
    assert not stop_needs_move("long", D("99"), D("98"), None, 0, 30)  # looser: never
    assert stop_needs_move("long", D("98"), D("99"), 0, 30_000, 30)
    assert not stop_needs_move("long", D("98"), D("99"), 0, 29_999, 30)
    assert stop_needs_move("short", D("102"), D("101"), None, 0, 30)
    assert not stop_needs_move("short", D("101"), D("102"), None, 0, 30)


def test_stop_move_compares_at_exchange_precision():
    # the trail moved by less than a tick: same price on the exchange, no replace
    assert not stop_needs_move("long", D("101.49"), D("101.4825"), None, 0, 30, D("0.01"))
    assert stop_needs_move("long", D("101.49"), D("101.4901"), None, 0, 30, D("0.01"))
    assert not stop_needs_move("short", D("101.49"), D("101.4999"), None, 0, 30, D("0.01"))
    assert stop_needs_move("short", D("101.49"), D("101.4899"), None, 0, 30, D("0.01"))


def test_a_stop_goes_on_the_tick_the_protective_way():
    # Entry 100.30, 2 % stop: 98.294 (long) and 102.306 (short). To the nearest tick they
    # were 98.29 and 102.31: a 2.004 % loss at the stop instead of at most 2 %.
    assert stop_on_tick("long", D("98.294"), D("0.01")) == D("98.30")
    assert stop_on_tick("short", D("102.306"), D("0.01")) == D("102.30")
    assert stop_on_tick("long", D("0.0120981"), D("0.000001")) == D("0.012099")
    assert stop_on_tick("long", D("98.29"), D("0.01")) == D("98.29")  # on the tick already
    assert stop_on_tick("short", D("1234"), D("5")) == D("1230")


@settings(max_examples=300, deadline=None)
@given(level=st.decimals(min_value=D("0.0001"), max_value=D("100000"), places=6),
       step=st.sampled_from([D("0.01"), D("0.1"), D("0.00001"), D("0.5"), D("5"), D("1")]),
       side=st.sampled_from(["long", "short"]))
def test_a_stop_on_the_tick_is_never_looser_and_survives_ccxt_rounding(level, step, side):
    out = stop_on_tick(side, level, step)
    assert out % step == 0 and abs(out - level) < step
    assert more_protective(side, out, level) == out  # never past the level asked for
    # submit() sends it through ccxt's price_to_precision, which must keep it as it is
    assert D(decimal_to_precision(str(out), ROUND, str(step), TICK_SIZE)) == out


# -- properties over random price paths ------------------------------------------------

scan = st.tuples(st.integers(-600, 600), st.integers(0, 300), st.integers(0, 300))


def walk(side: str, steps, restart_every: int | None):
    """Run a price path through evaluate_exit, recording state as the ledger would.
    With restart_every, the state is rebuilt from JSON (ledger strings) that often."""
    p = position(side)
    price, prev, out = D(100), None, []
    for i, (move, up, down) in enumerate(steps):
        last = max(price * (1 + D(move) / 10_000), D("0.01"))
        hi = max(last, price) * (1 + D(up) / 10_000)
        lo = min(last, price) * (1 - D(down) / 10_000)
        d = evaluate_exit(p, hi, lo, last, prev, RULES)
        out.append(d)
        if d.exit:
            break
        p = apply(p, d)
        if restart_every and i % restart_every == 0:
            p = json.loads(json.dumps(p))
        prev = price = last
    return out


@settings(max_examples=150, deadline=None)
@given(side=st.sampled_from(["long", "short"]), steps=st.lists(scan, min_size=1, max_size=40))
def test_path_invariants(side, steps):
    sign = 1 if side == "long" else -1
    decisions = walk(side, steps, None)
    for before, after in zip(decisions, decisions[1:], strict=False):
        assert sign * (after.best_price - before.best_price) >= 0  # best only improves
        assert sign * (after.stop_price - before.stop_price) >= 0  # stop only tightens
        assert after.trailing_active >= before.trailing_active  # once armed, stays armed
    assert all(not d.exit for d in decisions[:-1])
    for d in decisions:
        hard = stop_price(side, D(100), RULES.stop_loss_pct)
        assert sign * (d.stop_price - hard) >= 0  # never looser than the stop loss
        if d.exit:
            assert d.reason in ("stop_loss", "trailing_stop", "surge_lock")


@settings(max_examples=100, deadline=None)
@given(side=st.sampled_from(["long", "short"]), steps=st.lists(scan, min_size=1, max_size=40),
       every=st.integers(1, 5))
def test_restart_gives_the_same_decisions(side, steps, every):
    """All state lives in the recorded position dict: reloading it from the ledger's
    strings at any point changes nothing."""
    assert walk(side, steps, every) == walk(side, steps, None)


@pytest.mark.parametrize("side, best, trailing, expected", [
    ("long", None, False, "98"),       # the stop loss from the entry
    ("long", "110", True, "109.45"),   # the armed trail, above it
    ("long", "100.5", True, "99.9975"),  # a trail just armed: still the higher of the two
    ("long", "99", True, "99.5"),      # the best price counts from the entry at least
    ("short", None, False, "102"),
    ("short", "90", True, "90.45"),
])
def test_the_level_a_stop_belongs_at_now(side, best, trailing, expected):
    p = position(side, best=best, trailing=trailing, trail_pct="0.5" if trailing else None)
    assert resting_level(p, 2.0) == D(expected)
