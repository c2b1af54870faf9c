"""Risk: sizing, entry limits, account halts, and property tests over decision sequences."""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal as D

import numpy as np
import pandas as pd
import pytest
from ccxt.base.decimal_to_precision import TICK_SIZE, TRUNCATE, decimal_to_precision
from hypothesis import event, given, settings
from hypothesis import strategies as st

from core.clock import DAY_MS
from core.config import Config
from core.exchange_types import BalanceReport, MarketInfo
from core.risk import (
    FREE_BALANCE_USE,
    PENDING_ENTRY_RUNS,
    OpenExposure,
    RiskState,
    check_account,
    check_entry,
    orderable,
    return_correlation,
    size_entry,
    truncate_amount,
)

NOW = 1_700_000_000_000
CFG = Config()
MARKET = MarketInfo("ETH/USDT:USDT", "ETH", "USDT", amount_step=D("0.001"),
                    price_step=D("0.01"), min_amount=D("0.001"), min_notional=D("5"))


def balance(equity="10000", free=None) -> BalanceReport:
    e = D(equity)
    f = e if free is None else D(free)
    return BalanceReport("USDT", total=e, free=f, used=e - f, equity=e)


def entry(state=None, symbol="ETH/USDT:USDT", side="long", price="2000", bal=None,
          config=CFG, now=NOW, market=MARKET, **kw):
    return check_entry(symbol=symbol, side=side, price=price, market=market,
                       state=state or RiskState(), balance=bal or balance(), now_ms=now, config=config, **kw)


def open_positions(n: int, notional="1000") -> tuple[OpenExposure, ...]:
    return tuple(OpenExposure(f"C{i}/USDT:USDT", "long", D(notional)) for i in range(n))


# -- sizing ----------------------------------------------------------------------------

def test_fraction_sizing():
    # 10 000 * 0.8 * 3 / 8 = 3 000 notional; at 2 000 that is 1.5
    d = entry()
    assert d.approved and d.reason == "approved"
    assert (d.amount, d.notional) == (D("1.5"), D("3000.0"))


def test_a_blacklisted_symbol_is_never_entered():
    # Added to the blacklist since the coins were chosen (the bot restarted with it):
    # refused at once, not after the next rotation.
    cfg = CFG.with_values(rotation={"blacklist": ["ETH/USDT:USDT"]})
    d = entry(config=cfg)
    assert (d.approved, d.reason) == (False, "blacklisted")
    assert entry(config=cfg, symbol="BTC/USDT:USDT").approved


def test_risk_sizing_divides_by_the_stop_distance():
    cfg = CFG.with_values(risk={"sizing": "risk", "risk_pct": 1.0}, sim={"taker_fee_pct": 0})
    # loses 1 % of 10 000 = 100 if the 2 % stop hits: notional 5 000
    d = entry(config=cfg, price="2500")
    assert (d.amount, d.notional) == (D("2"), D("5000"))
    d = entry(config=cfg, price="2500", stop_pct=4.0)  # a wider stop halves the size
    assert d.amount == D("1")


@pytest.mark.parametrize("fee_pct", [0.02, 0.05, 0.1])
@pytest.mark.parametrize("side", ["long", "short"])
def test_a_stop_hit_costs_risk_pct_fees_included(fee_pct, side):
    # The entry's and the stop fill's taker fees come out of the same 1 %: sized on the
    # stop distance alone, a hit cost ~1.05 % of equity at 0.05 % fees.
    cfg = CFG.with_values(risk={"sizing": "risk", "risk_pct": 1.0},
                          sim={"taker_fee_pct": fee_pct})
    price, equity = D("2500"), D("10000")
    d = entry(config=cfg, price=str(price), side=side)
    stop = price * (1 - D("0.02")) if side == "long" else price * (1 + D("0.02"))
    fee = D(str(fee_pct)) / 100
    loss = d.amount * abs(price - stop) + d.amount * (price + stop) * fee
    assert loss <= equity / 100
    # within one amount step (and a long's smaller exit fee) of the 1 %
    assert loss > equity / 100 - MARKET.amount_step * price * D("0.03") - 2 * fee * 100


def test_amount_truncates_never_rounds_up():
    r = size_entry(mode="fraction", price="3", equity="1000", market=MARKET, trade_fraction=0.8,
                   risk_pct=1, leverage=1, slots=1, stop_pct=2)
    assert r.amount == D("266.666") and r.notional <= r.target_notional


def test_an_entry_is_capped_at_the_most_one_order_may_carry():
    capped = replace(MARKET, max_amount=D("2.5"))
    r = size_entry(mode="fraction", price="100", equity="10000", market=capped,
                   trade_fraction=0.8, risk_pct=1, leverage=3, slots=1, stop_pct=2)
    assert (r.ok, r.amount, r.capped_by) == (True, D("2.5"), "max_amount")
    assert r.notional == D("250") < r.target_notional == D("24000")
    r = size_entry(mode="fraction", price="100", equity="10", market=capped,
                   trade_fraction=0.8, risk_pct=1, leverage=3, slots=1, stop_pct=2)
    assert (r.amount, r.capped_by) == (D("0.24"), None)  # below the maximum: untouched


def test_minimums():
    tiny = MarketInfo("X/USDT:USDT", "X", "USDT", D("1"), D("0.1"), D("10"), D("5"))
    r = size_entry(mode="fraction", price="100", equity="100", market=tiny, trade_fraction=0.8,
                   risk_pct=1, leverage=1, slots=8, stop_pct=2)
    assert (r.ok, r.reason) == (False, "below_min_amount")
    needs_notional = MarketInfo("X/USDT:USDT", "X", "USDT", D("0.001"), None, None, D("100"))
    r = size_entry(mode="fraction", price="100", equity="100", market=needs_notional,
                   trade_fraction=0.8, risk_pct=1, leverage=1, slots=8, stop_pct=2)
    assert (r.ok, r.reason) == (False, "below_min_notional")


# -- entry limits ------------------------------------------------------------------------

def test_halts_block_with_their_kind():
    state = RiskState(halts={"drawdown": "max_drawdown", "daily_loss": {"until_ms": NOW + 1}})
    assert entry(state).reason == "halted:drawdown"
    state = RiskState(halts={"daily_loss": {"reason": "daily_loss_limit", "until_ms": NOW + 1}})
    assert entry(state).reason == "halted:daily_loss"
    expired = RiskState(halts={"daily_loss": {"until_ms": NOW}})
    assert entry(expired).approved  # the next UTC day has begun


def test_daily_loss_limit_is_checked_even_before_a_halt_is_recorded():
    state = RiskState(day_start_equity=D("10000"))
    assert entry(state, bal=balance("9500")).reason == "daily_loss_limit"  # exactly 5 %
    assert entry(state, bal=balance("9501")).approved


def test_drawdown_from_peak():
    state = RiskState(equity_peak=D("12000"))
    assert entry(state, bal=balance("10200")).reason == "max_drawdown"  # 15 %
    assert entry(state, bal=balance("10201")).approved


def test_position_open_and_max_positions():
    cfg = CFG.with_values(risk={"max_open_positions": 3})
    assert entry(RiskState(positions=open_positions(3)), config=cfg).reason == "max_positions"
    assert entry(RiskState(positions=open_positions(2)), config=cfg).approved
    state = RiskState(positions=(OpenExposure("ETH/USDT:USDT", "short", D("10")),))
    assert entry(state).reason == "position_open"


def test_a_flagged_external_position_blocks_entries_in_its_symbol_only():
    state = RiskState(external=frozenset({"ETH/USDT:USDT"}))
    refused = entry(state, side="short")
    assert refused.reason == "external_position" and "did not open" in refused.detail
    assert entry(state, symbol="SOL/USDT:USDT").approved


def test_an_unsettled_entry_blocks_its_symbol_and_holds_a_slot_for_a_few_reconciles():
    sent = NOW - 60_000
    state = RiskState.from_summary({"orders": {
        "bot1-E-ETH": {"symbol": "ETH/USDT:USDT", "purpose": "entry", "state": "unknown",
                       "ts": sent},
        "bot1-S-BTC": {"symbol": "BTC/USDT:USDT", "purpose": "stop", "state": "accepted",
                       "ts": sent}}})
    assert dict(state.pending_entries) == {"ETH/USDT:USDT": sent}
    refused = entry(state)
    assert refused.reason == "entry_pending" and "not settled" in refused.detail
    assert entry(state, symbol="SOL/USDT:USDT").approved
    cfg = CFG.with_values(risk={"max_open_positions": 2})
    one_open = RiskState(positions=open_positions(1), pending_entries=state.pending_entries)
    assert entry(one_open, symbol="SOL/USDT:USDT", config=cfg).reason == "max_positions"
    # Reconcile had its runs and could not settle it (the exchange forgot the order): by
    # then it has found any position the order opened; the block ends.
    window = PENDING_ENTRY_RUNS * CFG.schedule.reconcile_interval_s * 1000
    assert entry(state, now=sent + window - 1).reason == "entry_pending"
    assert entry(state, now=sent + window).approved
    assert entry(one_open, symbol="SOL/USDT:USDT", config=cfg, now=sent + window).approved


def test_a_stop_left_resting_by_a_closed_position_blocks_entries_in_its_symbol():
    # Its cancel failed when the position closed: reduce-only, it would close a new one.
    stop = {"purpose": "stop", "state": "accepted", "ts": NOW - 60_000}
    state = RiskState.from_summary({
        "positions": {"BTC/USDT:USDT": {"symbol": "BTC/USDT:USDT", "side": "long",
                                        "amount": "1", "entry_price": "100",
                                        "position_id": "p2"}},
        "orders": {"bot1-S1-ETH": {**stop, "symbol": "ETH/USDT:USDT", "position_id": "p1"},
                   "bot1-S2-BTC": {**stop, "symbol": "BTC/USDT:USDT", "position_id": "p2"}}})
    assert state.stray_stops == {"ETH/USDT:USDT"}  # BTC's stop is its open position's
    refused = entry(state)
    assert refused.reason == "stray_stop" and "reconcile cancels it" in refused.detail
    assert entry(state, symbol="SOL/USDT:USDT").approved


def test_a_decision_on_a_candle_a_newer_one_has_closed_after_is_refused():
    tf = 300_000
    newest = NOW - NOW % tf - tf  # the candle that closed last
    assert entry(candle_ts=newest).approved
    assert entry(candle_ts=newest, now=NOW - NOW % tf + tf - 1).approved  # a slow scan
    stale = entry(candle_ts=newest - tf)
    assert stale.reason == "stale_candles" and "over a 5m ago" in stale.detail


def test_cooldown_after_a_losing_exit():
    state = RiskState().with_exit("ETH/USDT:USDT", NOW, loss=True)
    assert entry(state, now=NOW + 29 * 60_000).reason == "cooldown"
    assert entry(state, now=NOW + 30 * 60_000).approved
    assert entry(RiskState().with_exit("ETH/USDT:USDT", NOW, loss=False)).approved


def series(returns, start=100.0) -> pd.Series:
    closes = start * np.cumprod(1 + np.asarray(returns))
    return pd.Series(closes, index=np.arange(len(closes)) * 300_000)


def test_correlation_limit_is_direction_aware():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 0.01, 150)
    twin = base + rng.normal(0, 0.001, 150)
    other = rng.normal(0, 0.01, 150)
    closes = {"ETH/USDT:USDT": series(base), "BTC/USDT:USDT": series(twin),
              "XRP/USDT:USDT": series(other)}
    long_btc = RiskState(positions=(OpenExposure("BTC/USDT:USDT", "long", D("100")),))
    d = entry(long_btc, closes=closes)
    assert d.reason == "correlation" and d.checks["correlation"]["BTC/USDT:USDT"] > 0.8
    assert entry(long_btc, side="short", closes=closes).approved  # a hedge, not a doubling
    long_xrp = RiskState(positions=(OpenExposure("XRP/USDT:USDT", "long", D("100")),))
    assert entry(long_xrp, closes=closes).approved
    # No candles of one side this scan: not known to be safe, so refused (not let through).
    for partial in ({"BTC/USDT:USDT": series(twin)}, {"ETH/USDT:USDT": series(base)}):
        d = entry(long_btc, closes=partial)
        assert d.reason == "correlation_unknown" and d.checks["correlation_missing"] == [
            ({"ETH/USDT:USDT", "BTC/USDT:USDT"} - set(partial)).pop()]
    off = CFG.with_values(risk={"correlation_max": 1.0})  # the limit switched off
    assert entry(long_btc, closes={"ETH/USDT:USDT": series(base)}, config=off).approved


def test_flagged_external_positions_count_as_exposure():
    """A position the bot did not open is still on the account: it takes a slot, counts
    against the notional cap and correlates like the bot's own."""
    rng = np.random.default_rng(1)
    base = rng.normal(0, 0.01, 150)
    closes = {"ETH/USDT:USDT": series(base), "BTC/USDT:USDT": series(base * 1.01)}
    summary = {"external": {"BTC/USDT:USDT": {"side": "long", "amount": "2", "price": "500",
                                              "ts": NOW}}}
    state = RiskState.from_summary(summary)
    assert state.external_exposure == (OpenExposure("BTC/USDT:USDT", "long", D("1000")),)
    one = CFG.with_values(risk={"max_open_positions": 1})
    assert entry(state, config=one).reason == "max_positions"
    capped = CFG.with_values(risk={"max_total_notional": 1500.0})
    d = entry(state, config=capped)
    assert d.approved and d.notional == D("500") and d.checks["capped_by"] == "max_total_notional"
    assert entry(state, closes=closes).reason == "correlation"
    # The scan fetches the active coins and the bot's positions, maybe not this symbol:
    # without its candles it is left out of the correlation, not a reason to refuse all.
    d = entry(state, closes={"ETH/USDT:USDT": closes["ETH/USDT:USDT"]})
    assert d.approved and d.checks["correlation_missing"] == ["BTC/USDT:USDT"]


def test_an_unsettled_entry_counts_against_the_notional_cap_at_its_last_close():
    sent = NOW - 60_000
    state = RiskState.from_summary({"orders": {"bot1-t1-E-BTC": {
        "symbol": "BTC/USDT:USDT", "purpose": "entry", "side": "buy", "amount": "3",
        "state": "unknown", "ts": sent}}})
    assert dict(state.pending_amounts) == {"BTC/USDT:USDT": ("long", D("3"))}
    capped = CFG.with_values(risk={"max_total_notional": 2000.0})
    rng = np.random.default_rng(3)
    closes = {"ETH/USDT:USDT": series(rng.normal(0, 0.01, 150)),
              "BTC/USDT:USDT": series(rng.normal(0, 0.01, 150), start=400.0)}
    last = D(repr(float(closes["BTC/USDT:USDT"].iloc[-1])))
    d = entry(state, closes=closes, config=capped)  # 3 x ~400 of the 2000 is taken
    assert d.approved and d.checks["total_notional_room"] == D(2000) - 3 * last
    assert d.notional <= D(2000) - 3 * last
    # Not priced (no candles of it this scan): the room is not known, so no entry.
    d = entry(state, closes={"ETH/USDT:USDT": closes["ETH/USDT:USDT"]}, config=capped)
    assert d.reason == "max_total_notional" and "no price" in d.detail
    assert entry(state, closes={"ETH/USDT:USDT": closes["ETH/USDT:USDT"]}).approved  # no cap


def test_return_correlation_aligns_on_timestamps_and_needs_overlap():
    rng = np.random.default_rng(2)
    a = series(rng.normal(0, 0.01, 200))
    assert return_correlation(a, a, 100) == pytest.approx(1.0)
    assert return_correlation(a, a.iloc[::2], 100) == pytest.approx(1.0)  # holes in one feed
    assert return_correlation(a.iloc[:30], a.iloc[25:], 100) is None  # 5 shared candles
    flat = pd.Series(1.0, index=a.index)
    assert return_correlation(a, flat, 100) is None


def pandas_correlation(a: pd.Series, b: pd.Series, window: int) -> float | None:
    """The definition, spelled in pandas: inner join on ts, returns, last ``window``."""
    joined = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").sort_index()
    rets = joined.pct_change(fill_method=None).iloc[1:].replace([np.inf, -np.inf], np.nan)
    rets = rets.dropna().tail(window)
    if len(rets) < min(window, max(10, window // 2)) or (rets.std(ddof=0) == 0).any():
        return None
    return float(np.corrcoef(rets["a"], rets["b"])[0, 1])


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 60), st.floats(0, 0.5), st.floats(0, 0.1))
def test_return_correlation_equals_its_pandas_definition(seed, window, holes, zeros):
    rng = np.random.default_rng(seed)
    ts = np.arange(120) * 300_000
    a = pd.Series(rng.lognormal(0, 0.02, 120).cumprod(), index=ts)
    b = pd.Series(0.5 * a.to_numpy() * rng.lognormal(0, 0.02, 120), index=ts)
    a = a[rng.random(120) >= holes]  # candles missing from one feed
    b[rng.random(120) < zeros] = 0.0  # broken closes: infinite returns
    b.iloc[rng.integers(0, 120, 3)] = np.nan
    got, want = return_correlation(a, b, window), pandas_correlation(a, b, window)
    assert (got is None) == (want is None)
    if got is not None:
        assert got == pytest.approx(want, abs=1e-9)


def test_notional_caps():
    cfg = CFG.with_values(risk={"max_position_notional": 1000.0, "max_total_notional": 2500.0})
    d = entry(config=cfg)
    assert d.approved and d.notional == D("1000") and d.checks["capped_by"] == (
        "max_position_notional")
    d = entry(RiskState(positions=open_positions(2)), config=cfg)
    assert d.approved and d.notional == D("500") and d.checks["capped_by"] == "max_total_notional"
    d = entry(RiskState(positions=open_positions(2, "1250")), config=cfg)
    assert d.reason == "max_total_notional"


def test_balance_rechecked_before_entry():
    d = entry(bal=balance("10000", free="500"))  # 500 * 0.98 * 3 = 1470 notional at most
    assert d.approved and d.checks["capped_by"] == "free_balance"
    assert d.notional <= D("1470") and d.notional / 3 <= D("500")
    assert entry(bal=balance("10000", free="0.001")).reason == "insufficient_balance"


@pytest.mark.parametrize("leverage", [3, 20, 50, 125])
@pytest.mark.parametrize("taker", [None, "0.0004", "0.002"])
def test_margin_and_taker_fee_together_fit_the_free_balance(leverage, taker):
    """At 125x the fee on the notional is 6 % of the margin: both must fit, whatever the
    leverage, or the exchange refuses the entry (-2019 margin is insufficient)."""
    cfg = CFG.with_values(exchange={"leverage": leverage}, risk={"trade_fraction": 1.0},
                          rotation={"top_n": 1})
    market = replace(MARKET, taker_fee=None if taker is None else D(taker))
    d = entry(config=cfg, bal=balance("10000", free="1000"), market=market)
    fee = max(D(taker or 0), D(str(cfg.sim.taker_fee_pct)) / 100)
    assert d.approved and d.checks["capped_by"] == "free_balance" and d.checks["fee_rate"] == fee
    assert d.notional / leverage + d.notional * fee <= D("1000") * FREE_BALANCE_USE
    assert d.notional / leverage + d.notional * fee > D("1000") * FREE_BALANCE_USE * D("0.999")


def test_bad_inputs_refused():
    assert entry(price="nan").reason == "bad_input"
    assert entry(side="sideways").reason == "bad_input"
    assert entry(bal=object()).reason == "bad_input"


def test_decision_record_is_json():
    rec = entry().to_record()
    back = json.loads(json.dumps(rec))
    assert back["amount"] == "1.500" or D(back["amount"]) == D("1.5")
    assert back["checks"]["sizing"] == "fraction" and back["reason"] == "approved"


def test_state_from_ledger_summary():
    s = RiskState.from_summary({
        "positions": {"p1": {"symbol": "A/USDT:USDT", "side": "long", "amount": "2",
                             "entry_price": "10.5"},
                      "p2": {"symbol": "B/USDT:USDT", "side": "short", "notional": "7"}},
        "halts": {"manual": "operator"}, "day_start_equity": "1000", "equity_peak": "1200",
        "realized_today": "-3.5", "last_loss_exit_ms": {"A/USDT:USDT": 5}})
    assert s.total_notional == D("28.0") and s.symbols() == {"A/USDT:USDT", "B/USDT:USDT"}
    assert s.active_halts(NOW) == {"manual": "operator"}
    assert (s.day_start_equity, s.equity_peak, s.realized_today) == (D(1000), D(1200),
                                                                     D("-3.5"))


def test_state_from_the_ledger_fold():
    from ledger.fold import State

    pos = {"position_id": "p1", "symbol": "A/USDT:USDT", "side": "short", "amount": "3",
           "entry_price": "2", "opened_ts": 0, "best_price": "2", "trailing_active": False,
           "trail_pct": None, "stop": None}
    state = State(positions={"A/USDT:USDT": pos}, day="2023-11-14", realized_today="-12",
                  day_start_equity="900", equity_peak="1000",
                  halts={"daily_loss": {"reason": "daily_loss_limit", "ts": NOW}},
                  last_loss_exit={"B/USDT:USDT": NOW - 60_000},
                  external={"C/USDT:USDT": {"side": "long", "amount": "1", "price": "3",
                                            "ts": NOW}})
    s = RiskState.from_ledger(state, NOW)  # NOW is on 2023-11-14 UTC
    assert s.positions == (OpenExposure("A/USDT:USDT", "short", D("6")),)
    assert s.realized_today == D("-12") and s.last_loss_exit_ms == {"B/USDT:USDT": NOW - 60_000}
    assert s.external == {"C/USDT:USDT"}
    assert s.active_halts(NOW) == {"daily_loss": "daily_loss_limit"}
    tomorrow = NOW - NOW % DAY_MS + DAY_MS
    assert s.active_halts(tomorrow) == {}  # a daily halt ends at UTC midnight by itself
    assert RiskState.from_ledger(state.to_dict(), tomorrow).realized_today == 0


# -- account limits ----------------------------------------------------------------------

def test_daily_loss_halt_until_next_midnight():
    state = RiskState(day_start_equity=D("10000"), positions=open_positions(1))
    assert check_account(state, "9501", NOW, CFG.risk) == []
    [a] = check_account(state, "9499", NOW, CFG.risk)
    assert (a.kind, a.reason, a.close_all, a.new) == ("daily_loss", "daily_loss_limit", False, True)
    assert a.until_ms % DAY_MS == 0 and 0 < a.until_ms - NOW <= DAY_MS
    cfg = CFG.with_values(risk={"daily_loss_close_all": True})
    [a] = check_account(state, "9499", NOW, cfg.risk)
    assert a.close_all and a.cancel_orders
    halted = RiskState(day_start_equity=D("10000"), positions=open_positions(1),
                       halts={"daily_loss": {"until_ms": a.until_ms}})
    assert check_account(halted, "9400", NOW, CFG.risk) == []  # recorded already
    [again] = check_account(halted, "9400", NOW, cfg.risk)  # close_all: finish closing
    assert not again.new and again.close_all


def test_drawdown_halt_closes_everything_until_resume():
    state = RiskState(equity_peak=D("20000"), positions=open_positions(2))
    assert check_account(state, "17001", NOW, CFG.risk) == []
    [a] = check_account(state, "17000", NOW, CFG.risk)
    assert (a.kind, a.close_all, a.cancel_orders, a.until_ms) == ("drawdown", True, True, None)
    halted = RiskState(equity_peak=D("20000"), halts={"drawdown": "max_drawdown"})
    assert check_account(halted, "15000", NOW, CFG.risk) == []  # nothing left to close
    still_open = RiskState(equity_peak=D("20000"), halts={"drawdown": "max_drawdown"},
                           positions=open_positions(1))
    [a] = check_account(still_open, "15000", NOW, CFG.risk)
    assert a.close_all and not a.new


# -- properties ----------------------------------------------------------------------------

steps = st.sampled_from([D("1"), D("0.1"), D("0.001"), D("0.00001"), D("5"), D("0.25")])
positive = st.decimals(min_value=D("0.0001"), max_value=D("100000"), places=6,
                       allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(amount=positive, step=steps)
def test_truncation_matches_ccxt(amount, step):
    ours = truncate_amount(amount, step)
    theirs = decimal_to_precision(str(amount), TRUNCATE, str(step), TICK_SIZE)
    assert ours == D(theirs)
    assert ours <= amount and ours % step == 0 and amount - ours < step


@pytest.mark.parametrize("amount,step,minimum,expected", [
    ("0.248", "0.001", "0.001", "0.248"),  # a whole number of steps: all of it
    ("0.248", "0.1", "0.1", "0.2"),  # the step grew: the 0.048 beyond it is held by none
    ("0.048", "0.1", "0.1", "0"),  # all of it finer than the step
    ("0.25", "0.05", "0.3", "0"),  # on the step but below the minimum
    ("3", "1", None, "3"),
])
def test_orderable_is_what_one_order_can_carry(amount, step, minimum, expected):
    market = replace(MARKET, amount_step=D(step), min_amount=D(minimum) if minimum else None)
    assert orderable(D(amount), market) == D(expected)


markets = st.builds(
    lambda step, min_mult, min_notional, cs: MarketInfo(
        "X/USDT:USDT", "X", "USDT", step, None, step * min_mult, min_notional, cs),
    steps, st.integers(1, 20), st.sampled_from([None, D("5"), D("100")]),
    st.sampled_from([D(1), D("0.01"), D(10)]))


@settings(max_examples=300, deadline=None)
@given(market=markets, price=positive, equity=positive, mode=st.sampled_from(["fraction", "risk"]),
       leverage=st.integers(1, 20), slots=st.integers(1, 20),
       cap=st.one_of(st.none(), positive))
def test_sizes_respect_precision_minimums_and_caps(market, price, equity, mode, leverage, slots,
                                                   cap):
    r = size_entry(mode=mode, price=price, equity=equity, market=market, trade_fraction=0.8,
                   risk_pct=1.0, leverage=leverage, slots=slots, stop_pct=2.0,
                   caps=None if cap is None else {"cap": cap})
    event(f"size {r.reason}")
    if r.ok:
        assert r.amount % market.amount_step == 0
        assert r.amount >= market.min_amount > 0
        assert market.min_notional is None or r.notional >= market.min_notional
        assert r.notional == r.amount * price * market.contract_size
        assert r.notional <= r.target_notional and (cap is None or r.notional <= cap)
    else:
        assert r.reason in ("below_min_amount", "below_min_notional")


SYMBOLS = [f"S{i}/USDT:USDT" for i in range(6)]
ops = st.lists(st.one_of(
    st.tuples(st.just("enter"), st.sampled_from(SYMBOLS), st.sampled_from(["long", "short"]),
              st.decimals(min_value=D("0.01"), max_value=D("50000"), places=2)),
    st.tuples(st.just("exit"), st.sampled_from(SYMBOLS), st.booleans()),
    st.tuples(st.just("wait"), st.integers(0, 90)),
), max_size=40)


@settings(max_examples=200, deadline=None)
@given(ops=ops, max_pos=st.integers(1, 5), pos_cap=st.sampled_from([0.0, 500.0, 3000.0]),
       total_cap=st.sampled_from([0.0, 1000.0, 6000.0]), market=markets,
       equity=st.decimals(min_value=D("10"), max_value=D("100000"), places=2),
       slots=st.integers(1, 8), sizing=st.sampled_from(["fraction", "risk"]))
def test_no_sequence_of_decisions_exceeds_the_limits(ops, max_pos, pos_cap, total_cap, market,
                                                     equity, slots, sizing):
    cfg = CFG.with_values(risk={"max_open_positions": max_pos, "max_position_notional": pos_cap,
                                "max_total_notional": total_cap, "sizing": sizing},
                          rotation={"top_n": slots})
    state, free, now = RiskState(equity_peak=equity, day_start_equity=equity), equity, NOW
    for op in ops:
        if op[0] == "enter":
            _, symbol, side, price = op
            d = check_entry(symbol=symbol, side=side, price=price, market=market, state=state,
                            balance=BalanceReport("USDT", equity, free, equity - free, equity),
                            now_ms=now, config=cfg)
            # coverage of every reason: pytest --hypothesis-show-statistics
            event(f"entry {d.reason}", d.checks.get("capped_by") or "")
            if d.approved:
                assert d.amount % market.amount_step == 0 and d.amount >= market.min_amount
                assert market.min_notional is None or d.notional >= market.min_notional
                assert d.notional / cfg.exchange.leverage <= free  # margin was available
                free -= d.notional / cfg.exchange.leverage
                state = state.with_entry(symbol, side, d.notional)
            else:
                assert d.amount is None and d.reason
        elif op[0] == "exit":
            if op[1] in state.symbols():
                notional = sum(p.notional for p in state.positions if p.symbol == op[1])
                free += notional / cfg.exchange.leverage
                state = state.with_exit(op[1], now, loss=op[2])
        else:
            now += op[1] * 60_000
        assert len(state.positions) <= max_pos
        assert len(state.symbols()) == len(state.positions)  # one position per symbol
        assert pos_cap == 0 or all(p.notional <= D(str(pos_cap)) for p in state.positions)
        assert total_cap == 0 or state.total_notional <= D(str(total_cap))
        assert free >= 0


halt_values = st.one_of(st.just(True), st.text(min_size=1, max_size=10),
                        st.fixed_dictionaries({"reason": st.text(max_size=10)}),
                        st.fixed_dictionaries({"until_ms": st.integers(NOW + 1, NOW + DAY_MS)}))


@settings(max_examples=200, deadline=None)
@given(halts=st.dictionaries(st.sampled_from(["drawdown", "daily_loss", "manual", "other"]),
                             halt_values, min_size=1),
       n_open=st.integers(0, 3), side=st.sampled_from(["long", "short"]),
       price=positive, equity=positive)
def test_a_halt_always_blocks_entries(halts, n_open, side, price, equity):
    state = RiskState(positions=open_positions(n_open), halts=halts)
    d = entry(state, side=side, price=price, bal=balance(str(equity)))
    assert not d.approved and d.reason.startswith("halted:") and d.amount is None


def test_a_failed_reconciliation_refuses_new_exposure():
    state = RiskState.from_summary({"last_runs": {"reconcile": {"outcome": "error"}}})
    assert state.reconcile_failed
    d = entry(state=state)
    assert (d.approved, d.reason) == (False, "reconcile_failed")
    ok = RiskState.from_summary({"last_runs": {"reconcile": {"outcome": "ok"}}})
    assert not ok.reconcile_failed and entry(state=ok).approved
