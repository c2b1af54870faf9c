"""The audit views agree with the fold (ledger/fold.py) on the facts the bot's own
writers record: a position grown by reconcile, partial exits, stops cancelled."""

from __future__ import annotations

import json
from contextlib import contextmanager
from decimal import Decimal

import pytest
from click.testing import CliRunner

import cli
from core.clock import VirtualClock, day_ms, utc_day
from core.execution import Executor
from ledger import Fact, Ledger, schema

SOL = "SOL/USDT:USDT"
T0 = day_ms("2025-03-01") + 3_600_000
PID = "bot1-E-SOL-1"


@pytest.fixture
def book(tmp_path):
    """(ledger, executor, clock): a long SOL 10 @ 100; the executor only writes facts."""
    clock = VirtualClock(T0)
    with Ledger(tmp_path / "bot.db") as ledger:
        ledger.append([Fact("position_opened", clock.now_ms(), symbol=SOL, side="long",
                            amount="10", price="100", fee="0.5", position_id=PID,
                            client_order_id=PID)])
        yield ledger, Executor(ledger, None, clock, None), clock


def later(ex: Executor, clock: VirtualClock, *facts) -> None:
    clock.advance(60_000)
    ex.record(list(facts))


def grow_by_reconcile(ledger, ex, clock) -> None:
    """As jobs/reconcile.resized_on_exchange records a position grown by hand."""
    p = ledger.state().positions[SOL]
    later(ex, clock, ex.fact("position_changed", symbol=SOL, side="long", amount="15",
                             price="110", position_id=PID, reason="reconcile: size",
                             data={"source": "reconcile", "ledger_amount": p["amount"]}))


def partial_exit(ledger, ex, clock, amount="5", price="120") -> None:
    p = ledger.state().positions[SOL]
    later(ex, clock, ex.reduced_fact(p, Decimal(amount), Decimal(price), Decimal("0.3"),
                                     "partial exit: take_profit"))


def view(ledger, name: str) -> list[dict]:
    return ledger.select(f"SELECT * FROM {name}")


@contextmanager
def written_at_schema(version: int, path, monkeypatch, facts: list[Fact]):
    """A ledger of an older schema, holding ``facts``, open as that version's writer."""
    with monkeypatch.context() as m:
        m.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:version])
        m.setattr(schema, "SCHEMA_VERSION", version)
        with Ledger(path) as old:
            old.append(facts)
            yield old


def test_open_positions_keep_the_average_entry_after_a_partial_exit(book):
    ledger, ex, clock = book
    grow_by_reconcile(ledger, ex, clock)
    partial_exit(ledger, ex, clock)
    [row] = view(ledger, "open_positions")
    fold = ledger.state().positions[SOL]
    assert (row["amount"], row["entry_price"]) == (fold["amount"], fold["entry_price"]) \
        == ("10", "110")


def test_closed_trades_show_the_entry_their_pnl_was_computed_from(book):
    ledger, ex, clock = book
    grow_by_reconcile(ledger, ex, clock)
    partial_exit(ledger, ex, clock)
    p = ledger.state().positions[SOL]
    later(ex, clock, ex.close_fact(p, Decimal("130"), Decimal("0.2"), "trailing_stop"))
    [trade] = view(ledger, "closed_trades")
    # (130 - 110) x 10 + (120 - 110) x 5 - fees 0.5 + 0.3 + 0.2
    assert Decimal(trade["realized_pnl"]) == Decimal("249.0")
    assert trade["entry_price"] == "110" and trade["exit_price"] == "130"


def test_open_positions_show_no_stop_once_it_was_cancelled(book, tmp_path):
    ledger, ex, clock = book
    later(ex, clock, ex.fact("stop_placed", symbol=SOL, side="sell", amount="10", price="95",
                             client_order_id="bot1-S1-SOL-1", position_id=PID))
    assert view(ledger, "open_positions")[0]["stop_price"] == "95"
    p = ledger.state().positions[SOL]
    later(ex, clock, ex.reduced_fact(p, Decimal("4"), Decimal("95"), Decimal("0.1"),
                                     "stop filled in part"),
          ex.fact("stop_cancelled", symbol=SOL, client_order_id="bot1-S1-SOL-1",
                  position_id=PID, price="95", reason="stop filled in part"))
    assert ledger.state().positions[SOL]["stop"] is None
    result = CliRunner().invoke(cli.main, ["--db", str(tmp_path / "bot.db"), "positions",
                                           "--json"])
    [row] = json.loads(result.stdout)
    assert (row["amount"], row["stop_price"]) == ("6", None)  # not shown as protected


def test_open_positions_best_price_starts_at_the_entry(book):
    ledger, ex, clock = book
    assert view(ledger, "open_positions")[0]["best_price"] \
        == ledger.state().positions[SOL]["best_price"] == "100"


def test_a_ledger_of_the_first_schema_gets_the_new_views_and_keeps_its_facts(tmp_path,
                                                                             monkeypatch):
    path = tmp_path / "old.db"
    with written_at_schema(1, path, monkeypatch, [
            Fact("position_opened", T0, symbol=SOL, side="long", amount="10", price="100",
                 position_id=PID),
            Fact("position_changed", T0 + 1, symbol=SOL, amount="15", price="110",
                 position_id=PID),
            Fact("position_changed", T0 + 2, symbol=SOL, amount="10",
                 position_id=PID)]) as old:
        assert view(old, "open_positions")[0]["entry_price"] == "100"  # the old view
    with Ledger(path) as ledger:  # a writer migrates it
        assert ledger.select("PRAGMA user_version")[0]["user_version"] == schema.SCHEMA_VERSION
        assert view(ledger, "open_positions")[0]["entry_price"] == "110"
        assert ledger.last_seq() == 3 and ledger.verify().ok


def test_daily_pnl_lists_every_closed_day_also_one_without_a_closed_trade(tmp_path):
    # Day 2 closed no trade (its loss was in the open position): it is listed, with its
    # closing equity, instead of missing from the view.
    day = 86_400_000
    with Ledger(tmp_path / "bot.db") as ledger:
        ledger.append([
            Fact("position_opened", T0, symbol=SOL, side="long", amount="10", price="100",
                 position_id=PID),
            Fact("position_closed", T0 + 1, symbol=SOL, side="long", amount="10", price="101",
                 fee="0.5", pnl="9.5", position_id=PID),
            Fact("day_close", T0 + day, data={"day": utc_day(T0), "equity": "10009.5"}),
            Fact("day_close", T0 + 2 * day, data={"day": utc_day(T0 + day), "equity": "9900"}),
            # not a day the ledger knows (the fold keeps it as text; no day is listed)
            Fact("day_close", T0 + 2 * day, data={"day": 20250303, "equity": "1"})])
        rows = view(ledger, "daily_pnl")
    assert [(r["day"], r["trades"], r["realized_pnl"], r["closing_equity"]) for r in rows] == [
        (utc_day(T0), 1, 9.5, "10009.5"), (utc_day(T0 + day), 0, 0, "9900")]


def test_a_ledger_of_the_third_schema_counts_its_late_closes_on_their_day(tmp_path,
                                                                           monkeypatch):
    # Recorded at the restart (00:10), fired at 23:50: the old views dated it when
    # recorded, the new ones when the exchange closed it. No fact is touched.
    fired, recorded = T0 + 20 * 3_600_000, T0 + 24 * 3_600_000
    path = tmp_path / "old.db"
    with written_at_schema(3, path, monkeypatch, [
            Fact("position_opened", T0, symbol=SOL, side="long", amount="10", price="100",
                 position_id=PID),
            Fact("position_closed", recorded, symbol=SOL, side="long", price="95",
                 fee="0.5", pnl="-50.5", position_id=PID,
                 data={"closed_ts": fired, "day": utc_day(fired)})]) as old:
        assert [r["day"] for r in view(old, "daily_pnl")] == [utc_day(recorded)]
    with Ledger(path) as ledger:
        assert ledger.select("PRAGMA user_version")[0]["user_version"] == schema.SCHEMA_VERSION
        assert [(r["day"], r["realized_pnl"]) for r in view(ledger, "daily_pnl")] == \
            [(utc_day(fired), -50.5)]
        [trade] = view(ledger, "closed_trades")
        assert trade["closed_at"] == "2025-03-01T21:00:00.000Z"
        assert trade["duration_s"] == 20 * 3_600
        assert ledger.last_seq() == 2 and ledger.verify().ok
