"""Account limits (daily loss, max drawdown) on the scan's every run, on a real simulated
exchange and a real ledger: the limits must stop the bot whenever the loss is there,
and only then."""

from __future__ import annotations

from decimal import Decimal

import pytest
from click.testing import CliRunner
from test_jobs_scan import AAA, BBB, DAY, T0, TF, Pick, bots, candle, flat

from core.clock import utc_day
from jobs import scan
from ledger import Fact

START = Decimal("10000")  # the simulated account's start balance


@pytest.fixture
def bot_factory(tmp_path):
    yield from bots(tmp_path)


def below(equity: Decimal, base: Decimal = START) -> Decimal:
    return (base - equity) / base * 100


def long_bot(bot_factory, path, **sections):
    """A bot long AAA (~3x equity) from T0, its stop far away."""
    sections = {"exits": {"stop_loss_pct": 30.0}, "risk": {"daily_loss_limit_pct": 50.0},
                **sections}
    bot = bot_factory(strat=Pick(long_at=[T0 - TF]), paths={"AAA": path},
                      rotation={"top_n": 1}, **sections)
    bot.set_coins([AAA])
    bot.job("scan", T0)
    assert bot.position(AAA) is not None
    return bot


def test_the_daily_loss_limit_holds_before_the_first_utc_midnight(bot_factory):
    # A fresh ledger has no day_close yet: the day starts at its first balance.
    path = [candle(100, 100.2, 99.8, 100), candle(100, 100.1, 96.9, 97.0), *flat(97.0, 3)]
    bot = bot_factory(strat=Pick(long_at=[T0 - TF, T0 + TF]),
                      paths={"AAA": path, "BBB": flat(50.0, 5)},
                      rotation={"top_n": 1}, exits={"stop_loss_pct": 10.0})
    bot.set_coins([AAA])
    bot.job("scan", T0)
    assert Decimal(bot.ledger.state().day_start_equity) == START
    bot.set_coins([AAA, BBB])
    bot.after_candle(0)
    bot.job("scan")
    bot.after_candle(1)  # AAA -3 %: about -7 % of equity today
    record = bot.job("scan")
    assert below(Decimal(bot.ledger.state().equity)) > 5
    assert record["summary"]["halts"] == ["daily_loss"]
    [decision] = bot.facts("risk_decision", symbol=BBB)  # and no entry on top of the loss
    assert decision["reason"] == "halted:daily_loss" and bot.position(BBB) is None


def test_a_scan_before_the_daily_reset_measures_todays_loss_from_today(bot_factory):
    # Yesterday lost ~3.5 %; today's first minutes ~2 % more. A scan running before the
    # daily reset (the reset job and the scan both fire after midnight, in either order;
    # a backtest scans first) measured today's equity against yesterday's start (5.4 %),
    # halted and closed the position. It closes the day first now.
    midnight = T0 + 144 * TF
    assert utc_day(midnight) != utc_day(midnight - 1)
    path = [*flat(100.0, 143), candle(100, 100, 98.55, 98.6), candle(97.8, 97.9, 97.7, 97.8),
            *flat(97.8, 10)]
    bot = long_bot(bot_factory, path, risk={"daily_loss_limit_pct": 5.0,
                                            "daily_loss_close_all": True})
    bot.after_candle(142)
    bot.job("scan")
    bot.at(midnight - 2_000)
    bot.job("scan")
    yesterdays_close = Decimal(bot.client.balance().equity)
    assert 3 < below(yesterdays_close) < 5
    bot.at(midnight + 10_000)
    record = bot.job("scan")
    assert 5 < below(Decimal(bot.ledger.state().equity))  # from yesterday's start
    assert "halts" not in record["summary"] and not bot.facts("halt")
    assert bot.position(AAA) is not None
    [close] = bot.facts("day_close")
    assert close["run_id"] == f"scan-{midnight + 10_000}"  # the scan closed the ended day
    assert bot.job("daily_reset")["outcome"] == "skipped"  # nothing left to close
    assert len(bot.facts("day_close")) == 1


def test_the_first_day_close_becomes_the_day_start(bot_factory):
    bot = bot_factory(paths={"AAA": flat(100.0, 5)})
    bot.ledger.append([Fact("balance", T0, data={"currency": "USDT", "total": "9000",
                                                 "free": "9000", "equity": "9000"}),
                       Fact("day_close", T0 + 1, data={"day": utc_day(T0 - DAY),
                                                       "equity": "8000"}),
                       Fact("balance", T0 + 2, data={"currency": "USDT", "total": "7000",
                                                     "free": "7000", "equity": "7000"})])
    assert bot.ledger.state().day_start_equity == "8000"


def test_resuming_a_manual_halt_keeps_the_drawdown_peak(bot_factory):
    import cli

    path = [candle(100, 100.2, 99.8, 100), candle(100, 100.1, 95.4, 95.5),
            candle(95.5, 95.6, 92.9, 93.0), *flat(93.0, 3)]
    bot = long_bot(bot_factory, path)
    for k in (0, 1):
        bot.after_candle(k)
        bot.job("scan")
    assert not bot.facts("halt")  # about -11 % from the peak: under the 15 % line
    db = str(bot.ledger.path)
    for args in (["halt", "--reason", "news"], ["resume"]):
        result = CliRunner().invoke(cli.main, ["--db", db, *args])
        assert result.exit_code == 0, result.output
    assert Decimal(bot.ledger.state().equity_peak) == START  # the loss is not forgotten
    bot.after_candle(2)
    record = bot.job("scan")
    assert below(Decimal(bot.ledger.state().equity)) > 15
    assert "drawdown" in record["summary"]["halts"] and bot.position(AAA) is None


def test_resuming_a_drawdown_halt_restarts_the_peak(bot_factory):
    import cli

    path = [candle(100, 100.2, 99.8, 100), candle(100, 100.1, 92.9, 93.0), *flat(93.0, 4)]
    bot = long_bot(bot_factory, path)
    bot.after_candle(0)
    bot.job("scan")
    bot.after_candle(1)
    assert "drawdown" in bot.job("scan")["summary"]["halts"]
    result = CliRunner().invoke(cli.main, ["--db", str(bot.ledger.path), "resume"])
    assert result.exit_code == 0, result.output
    state = bot.ledger.state()
    assert state.equity_peak == state.equity and not state.halts


def test_the_limits_are_checked_every_scan_not_only_at_candle_closes(bot_factory):
    path = [candle(100, 100.2, 99.8, 100), candle(100, 100, 90, 90), *flat(90.0, 3)]
    bot = long_bot(bot_factory, path)
    bot.after_candle(0)
    bot.job("scan")
    halted_at = None
    for t in range(T0 + TF + 10_000, T0 + 2 * TF, 10_000):  # the 10 s scans inside candle 1
        bot.at(t)
        record = bot.job("scan")
        assert record["summary"]["new_candles"] == 0
        if record["summary"].get("halts"):
            halted_at = t
            break
    assert halted_at is not None and halted_at < T0 + 2 * TF  # within the candle
    [halt] = bot.facts("halt")
    assert halt["reason"] == "max_drawdown" and bot.position(AAA) is None
    assert not bot.exchange_positions()
    [snapshot] = [b for b in bot.facts("balance") if b["ts"] == halt["ts"]]  # why, in SQL
    assert below(Decimal(snapshot["data"].split('"equity":"')[1].split('"')[0])) >= 15


def test_drawdown_is_measured_from_a_peak_seen_between_candle_closes(bot_factory):
    # Candle 1 climbs 100 -> 110 (equity ~+30 %) and candle 2 opens back at 101. Only
    # candle-close scans recorded the balance, so the peak the 10 s scans saw inside
    # candle 1 was forgotten and the fall from it (~20 %) never reached the 15 % limit.
    path = [candle(100, 100.1, 99.9, 100), candle(100, 110, 100, 110),
            candle(101, 101.1, 100.9, 101), *flat(101.0, 6)]
    bot = long_bot(bot_factory, path, exits={"stop_loss_pct": 30.0, "surge_pct": 100.0,
                                             "trailing_activation_pct": 50.0},
                   risk={"daily_loss_limit_pct": 90.0, "max_drawdown_pct": 15.0})
    bot.after_candle(0)
    bot.job("scan")
    seen = []
    for t in range(T0 + TF + 10_000, T0 + 2 * TF, 10_000):  # the 10 s scans inside candle 1
        bot.at(t)
        assert bot.job("scan")["summary"]["new_candles"] == 0
        seen.append(Decimal(bot.client.balance().equity))
    peak = Decimal(bot.ledger.state().equity_peak)
    assert max(seen) * (1 - scan.PEAK_STEP) <= peak <= max(seen)
    bot.after_candle(2)
    record = bot.job("scan")
    assert below(Decimal(bot.ledger.state().equity), max(seen)) >= 15
    assert record["summary"]["halts"] == ["drawdown"]
    assert bot.position(AAA) is None and not bot.exchange_positions()


def test_a_peak_between_candle_closes_is_recorded_per_tenth_of_a_percent_gained():
    # A climbing equity must not add a balance fact on every 10 s scan.
    from types import SimpleNamespace

    assert scan.new_peak(SimpleNamespace(equity_peak=None), "10000")
    assert not scan.new_peak(SimpleNamespace(equity_peak="10000"), "10009.99")
    assert scan.new_peak(SimpleNamespace(equity_peak="10000"), "10010")
    assert not scan.new_peak(SimpleNamespace(equity_peak="10000"), None)


def test_the_limits_are_checked_while_candles_cannot_be_read(bot_factory):
    path = [candle(100, 100.2, 99.8, 100), candle(100, 100, 90, 90), *flat(88.0, 6)]
    bot = long_bot(bot_factory, path)
    bot.after_candle(0)
    bot.job("scan")
    bot.venue.faults.script([("fetch_ohlcv", "server_error")] * 500)
    bot.after_candle(1)
    record = bot.job("scan")
    assert record["summary"]["new_candles"] == 0 and record["summary"]["halts"] == ["drawdown"]
    assert bot.position(AAA) is None and not bot.exchange_positions()


def test_a_scan_without_news_adds_only_its_run_record(bot_factory):
    bot = long_bot(bot_factory, flat(100.0, 6))
    bot.after_candle(0)
    bot.job("scan")
    before = bot.counts()
    bot.at(T0 + TF + 11_000)
    assert bot.job("scan")["summary"]["new_candles"] == 0
    after = bot.counts()
    assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} \
        == {"job_run": 1}


def test_after_downtime_a_failed_balance_read_closes_the_day_at_the_latest_equity(
        bot_factory):
    # Down from T0 (12:00) to 10:00 the next day; the stop took a loss on day D meanwhile.
    day0 = T0 - T0 % DAY
    path = [candle(100, 100.2, 99.8, 100), candle(100, 100.1, 99.9, 100),
            candle(100, 100, 94.0, 94.5), *flat(94.5, 3)]
    bot = long_bot(bot_factory, path, exits={"stop_loss_pct": 3.0})
    restart = day0 + DAY + 10 * 3_600_000
    bot.at(restart)
    assert AAA not in bot.exchange_positions()
    bot.job("reconcile")  # at start: records the close and a fresh balance
    real = bot.client.balance().equity
    bot.venue.faults.script([("fetch_balance", "server_error")] * 5)
    assert bot.job("daily_reset")["summary"]["closed_days"] == [utc_day(T0)]
    assert Decimal(bot.ledger.state().day_start_equity) == real  # not the pre-loss equity
    bot.venue.faults.clear()
    bot.at(restart + TF)
    assert not bot.job("scan")["summary"].get("halts")  # D's loss does not halt D+1
    assert not bot.facts("halt")
