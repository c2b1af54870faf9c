"""The order state machine and client order ids (core.orders): pure, so tested exhaustively."""

from __future__ import annotations

import itertools
import re
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.orders import (
    STATES,
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    client_order_id,
    state_of,
    transition,
)

# Written out from the requirement, not copied from the code, so the table is checked:
# intent -> submitted -> accepted -> partially filled -> filled | cancelled | rejected |
# expired, with submitted -> unknown -> (resolved by lookup) any of those.
OUTCOMES = {"accepted", "partially_filled", "filled", "cancelled", "rejected", "expired"}
LEGAL = {
    *{("intent", s) for s in ("submitted", "rejected", "unknown")},
    *{("submitted", s) for s in OUTCOMES | {"unknown"}},
    *{("accepted", s) for s in ("partially_filled", "filled", "cancelled", "expired",
                                "rejected")},
    *{("partially_filled", s) for s in ("partially_filled", "filled", "cancelled",
                                        "expired")},
    *{("unknown", s) for s in OUTCOMES | {"unknown"}},
}
# Binance's rule for newClientOrderId / clientAlgoId, from its API docs.
BINANCE_CLIENT_ID = re.compile(r"^[\.A-Z\:/a-z0-9_-]{1,36}$")
T = 1_767_268_800_000  # 2026-01-01T12:00:00Z


# -- the state machine ------------------------------------------------------------------

@pytest.mark.parametrize(("current", "new"), list(itertools.product(STATES, STATES)))
def test_every_pair_of_states_is_legal_or_raises(current, new):
    if (current, new) in LEGAL:
        assert transition(current, new) == new
    else:
        with pytest.raises(IllegalTransition, match=f"{current} -> {new}"):
            transition(current, new)


def test_the_table_is_exactly_the_required_machine():
    table = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert table == LEGAL
    assert set(TRANSITIONS) == set(STATES)


def test_terminal_states_have_no_exits():
    assert TERMINAL == {"filled", "cancelled", "rejected", "expired"}
    for state in TERMINAL:
        assert TRANSITIONS[state] == frozenset()
        for new in STATES:
            with pytest.raises(IllegalTransition):
                transition(state, new)


def test_every_state_is_reachable_and_every_live_state_can_finish():
    def reach(start):
        seen, todo = {start}, [start]
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert reach("intent") == set(STATES)
    for state in set(STATES) - TERMINAL:
        assert reach(state) & TERMINAL, state


@pytest.mark.parametrize(("current", "new"), [("intent", "bogus"), ("bogus", "filled"),
                                              ("", "intent"), ("FILLED", "filled")])
def test_unknown_states_raise(current, new):
    with pytest.raises(IllegalTransition, match="unknown order state"):
        transition(current, new)


@pytest.mark.parametrize(("status", "amount", "filled", "state"), [
    ("open", "10", "0", "accepted"),
    ("open", "10", "4", "partially_filled"),
    ("closed", "10", "10", "filled"),
    ("closed", "10", "4", "filled"),  # a market order whose rest expired reads closed too
    ("closed", "10", "0", "expired"),  # e.g. the order a stop became, nothing executed
    ("triggered", "10", "0", "accepted"),  # a stop fired, its outcome not known yet
    ("triggered", "10", "4", "partially_filled"),
    ("canceled", "10", "0", "cancelled"),
    ("canceled", "10", "3", "cancelled"),
    ("expired", "10", "6", "expired"),
    ("rejected", "10", "0", "rejected"),
])
def test_state_of_maps_exchange_reports(status, amount, filled, state):
    assert state_of(status, Decimal(amount), Decimal(filled)) == state
    assert state in STATES


@pytest.mark.parametrize("status", ["canceling", "new", "", "FILLED"])
def test_state_of_refuses_unknown_statuses(status):
    with pytest.raises(IllegalTransition, match="unknown exchange order status"):
        state_of(status, Decimal(1), Decimal(0))


# -- client order ids -------------------------------------------------------------------

def test_client_order_id_reads_as_bot_candle_purpose_and_market():
    assert client_order_id("bot1", "BTC/USDT:USDT", "entry", T) == "bot1-t86pc0-E-BTCUSDT"
    assert client_order_id("bot1", "BTC/USDT:USDT", "exit", T) == "bot1-t86pc0-X-BTCUSDT"
    assert client_order_id("bot1", "BTC/USDT:USDT", "stop", T, 3) == "bot1-t86pc0-S3-BTCUSDT"
    # Milliseconds within the same second are one decision (candles open on whole seconds).
    assert client_order_id("bot1", "BTC/USDT:USDT", "entry", T + 999) == \
        client_order_id("bot1", "BTC/USDT:USDT", "entry", T)


def test_ids_sort_by_decision_time_whatever_the_market_and_purpose():
    """Every id of a later candle sorts after every id of an earlier one, so the ledger's
    indexes on order and position ids grow at their end (ledger/schema.py)."""
    symbols = ["BTC/USDT:USDT", "1000PEPE/USDT:USDT", "ZRX/USDT:USDT", "BTC/USDT:USDT-260327",
               "SUPERCALIFRAGILISTICEXPIALIDOCIOUS/USDT:USDT"]
    by_candle = [[client_order_id("bot1", s, purpose, T + k * 300_000, n)
                  for s in symbols for purpose, n in (("entry", 0), ("exit", 0), ("stop", 1),
                                                      ("stop", 12))]
                 for k in range(300)]  # a day of 5-minute candles: the stamp's digits roll
    for earlier, later in zip(by_candle, by_candle[1:], strict=False):
        assert max(earlier) < min(later)


@pytest.mark.parametrize("symbol", [
    "1000000BABYDOGE/USDT:USDT",
    "SUPERCALIFRAGILISTICEXPIALIDOCIOUS/USDT:USDT",
    "BTC/USDT:USDT-260327",  # a dated future: not the perpetual's id
    "btc/usdt:usdt",
    "币安人生/USDT:USDT",
    "A-B/USDT:USDT",
])
def test_unusual_and_long_symbols_still_give_valid_distinct_ids(symbol):
    coid = client_order_id("abcdefgh", symbol, "stop", T, 999)
    assert BINANCE_CLIENT_ID.match(coid), coid
    assert coid != client_order_id("abcdefgh", "BTC/USDT:USDT", "stop", T, 999)
    assert coid.startswith("abcdefgh-t86pc0-S999-")


def test_dated_future_and_perpetual_never_share_an_id():
    perp = client_order_id("bot1", "BTC/USDT:USDT", "entry", T)
    dated = client_order_id("bot1", "BTC/USDT:USDT-260327", "entry", T)
    assert perp != dated


@pytest.mark.parametrize(("args", "message"), [
    (("bot1", "BTC/USDT:USDT", "hedge", T), "unknown order purpose"),
    (("bot1", "BTC/USDT:USDT", "stop", T, -1), "must not be negative"),
    (("bot1", "BTC/USDT:USDT", "entry", -1000), "must not be negative"),
    (("bot 1", "BTC/USDT:USDT", "entry", T), "cannot make a valid client order id"),
])
def test_client_order_id_refuses_what_cannot_be_an_id(args, message):
    with pytest.raises(ValueError, match=message):
        client_order_id(*args)


BOT_IDS = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
                  min_size=1, max_size=8)  # config: ^[A-Za-z0-9]{1,8}$
BASES = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=60)
PERPETUALS = BASES.map(lambda b: f"{b}/USDT:USDT")
ANY_SYMBOLS = st.one_of(PERPETUALS, st.text(min_size=1, max_size=80))
PURPOSES = st.sampled_from(["entry", "exit", "stop"])
TIMES = st.integers(min_value=0, max_value=2**42)  # past the year 2100
NS = st.integers(min_value=0, max_value=999)


@settings(max_examples=300, deadline=None)
@given(bot=BOT_IDS, symbol=ANY_SYMBOLS, purpose=PURPOSES, ms=TIMES, n=NS)
def test_client_ids_are_deterministic_and_valid_for_binance(bot, symbol, purpose, ms, n):
    coid = client_order_id(bot, symbol, purpose, ms, n)
    assert coid == client_order_id(bot, symbol, purpose, ms, n)
    assert len(coid) <= 36
    assert BINANCE_CLIENT_ID.match(coid), coid
    assert coid.startswith(f"{bot}-")  # reconcile tells our orders by this prefix


@settings(max_examples=300, deadline=None)
@given(bot=BOT_IDS, symbols=st.lists(PERPETUALS, min_size=2, max_size=2, unique=True),
       purpose=PURPOSES, ms=TIMES, n=NS)
def test_different_markets_give_different_ids(bot, symbols, purpose, ms, n):
    a, b = (client_order_id(bot, s, purpose, ms, n) for s in symbols)
    assert a != b


@settings(max_examples=300, deadline=None)
@given(bot=BOT_IDS, symbols=st.lists(ANY_SYMBOLS, min_size=2, max_size=2, unique=True),
       ms=TIMES)
def test_any_two_symbols_give_different_ids(bot, symbols, ms):
    # Distinct text, one of them not a plain perpetual: the digest tells them apart.
    a, b = symbols
    canonical = re.compile(r"^[A-Z0-9]+/USDT:USDT$")
    if canonical.match(a) and canonical.match(b):
        return  # covered above
    assert client_order_id(bot, a, "entry", ms) != client_order_id(bot, b, "entry", ms)


@settings(max_examples=300, deadline=None)
@given(bot=BOT_IDS, symbol=ANY_SYMBOLS, purposes=st.lists(PURPOSES, min_size=2, max_size=2,
                                                          unique=True),
       times=st.lists(TIMES.map(lambda t: t - t % 1000), min_size=2, max_size=2, unique=True),
       ns=st.lists(NS, min_size=2, max_size=2, unique=True))
def test_purpose_candle_and_n_each_change_the_id(bot, symbol, purposes, times, ns):
    base = client_order_id(bot, symbol, purposes[0], times[0], ns[0])
    assert base != client_order_id(bot, symbol, purposes[1], times[0], ns[0])
    assert base != client_order_id(bot, symbol, purposes[0], times[1], ns[0])
    assert base != client_order_id(bot, symbol, purposes[0], times[0], ns[1])
