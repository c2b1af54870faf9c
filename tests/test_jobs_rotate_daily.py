"""The rotate and daily_reset jobs on real parts (ledger file, simulated exchange, clock)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from test_jobs_scan import (
    AAA,
    BBB,
    CCC,
    DAY,
    PICK_FIRST,
    T0,
    TF,
    added,
    bots,
    candle,
    flat,
)

from core.clock import utc_day
from core.sim_exchange import SimExchange
from ledger import Fact

DDD = "DDD/USDT:USDT"
VOLUMES = {"AAA": 5000.0, "BBB": 3000.0, "CCC": 1000.0, "DDD": 100.0}


@pytest.fixture
def bot_factory(tmp_path):
    yield from bots(tmp_path)


def four(**kw):
    paths = {base: flat(100.0, 3) for base in VOLUMES}
    return {"paths": paths, "volume": VOLUMES, **kw}


def last_rotation(bot) -> dict:
    return json.loads(bot.facts("rotation")[-1]["data"])


# -- rotate ---------------------------------------------------------------------------------

def test_rotate_picks_the_top_n_by_quote_volume_and_records_the_ranking(bot_factory):
    bot = bot_factory(**four(rotation={"top_n": 2}))
    record = bot.job("rotate", T0)
    assert record["outcome"] == "ok"
    assert bot.ledger.state().active_coins == [AAA, BBB]
    data = last_rotation(bot)
    ranking = [r["symbol"] for r in data["ranking"]]
    assert ranking == [AAA, BBB, CCC, DDD]
    volumes = [Decimal(r["quote_volume"]) for r in data["ranking"]]
    assert volumes == sorted(volumes, reverse=True) and volumes[-1] > 0
    assert data["added"] == [AAA, BBB] and data["removed"] == []


def test_rotate_filters_minimum_volume_and_blacklist(bot_factory):
    # 24 h quote volume = candles x volume x price: 60 x 100 x 100 = 600k for DDD.
    bot = bot_factory(**four(rotation={"top_n": 3, "min_quote_volume": 1_000_000.0,
                                       "blacklist": [AAA]}))
    bot.job("rotate", T0)
    assert bot.ledger.state().active_coins == [BBB, CCC]
    ranked = {r["symbol"] for r in last_rotation(bot)["ranking"]}
    assert AAA not in ranked and DDD not in ranked


def test_a_market_that_traded_nothing_in_24_h_is_never_chosen(bot_factory):
    # With the default floor of 0, it filled a slot when fewer markets traded than top_n.
    setup = four(volume={**VOLUMES, "DDD": 0.0}, rotation={"top_n": 4})
    setup["paths"]["DDD"] = flat(100.0, 3, 0.0)
    bot = bot_factory(**setup)
    bot.job("rotate", T0)
    assert bot.ledger.state().active_coins == [AAA, BBB, CCC]


def test_rotate_by_volatility_ranks_the_volume_eligible_by_their_swings(bot_factory):
    swing = [candle(100, 104, 96, 103 if i % 2 else 97) for i in range(40)]
    paths = {"AAA": flat(100.0, 40), "BBB": flat(100.0, 40), "CCC": swing, "DDD": swing}
    bot = bot_factory(paths=paths, volume=VOLUMES,
                      rotation={"top_n": 1, "rank_by": "volatility"})
    bot.at(T0 + 40 * TF + 1_000)
    bot.job("rotate")
    # DDD swings as much as CCC but is 4th by volume: only the top 3 are candidates.
    assert bot.ledger.state().active_coins == [CCC]
    ranking = last_rotation(bot)["ranking"]
    assert ranking[0]["symbol"] == CCC and ranking[0]["volatility"] > 0.01
    assert {r["symbol"] for r in ranking} == {CCC, AAA}  # 2 x top_n recorded


def test_rotate_by_volatility_survives_one_symbol_without_candles(bot_factory):
    bot = bot_factory(**four(rotation={"top_n": 2, "rank_by": "volatility"},
                             exchange={"read_retries": 1}))
    bot.venue.faults.script([("fetch_ohlcv", "network_error")] * 2)  # AAA's, both tries
    record = bot.job("rotate", T0)
    assert record["outcome"] == "ok", record
    ranking = last_rotation(bot)["ranking"]
    assert ranking[-1]["symbol"] == AAA and ranking[-1]["volatility"] is None
    assert AAA not in bot.ledger.state().active_coins


def test_rotate_twice_for_the_same_instant_adds_only_its_run_record(bot_factory):
    bot = bot_factory(**four(rotation={"top_n": 2}))
    bot.job("rotate", T0)
    before = bot.counts()
    bot.clock.advance(60_000)
    record = bot.job("rotate", T0)
    assert record["outcome"] == "skipped"
    assert added(before, bot.counts()) == {"job_run": 1}
    # The next slot rotates again.
    assert bot.job("rotate", T0 + 3 * 3_600_000)["outcome"] == "ok"
    assert len(bot.facts("rotation")) == 2


class CountingReloads(SimExchange):
    reloads = 0

    def load_markets(self, reload=False, params=None):
        self.reloads += bool(reload)
        return super().load_markets(reload, params)


def test_each_rotation_reloads_the_markets(bot_factory):
    # ccxt answers from its cache for the life of the process: a market delisted since
    # the start (or whose tick and lot sizes changed) would be chosen and priced stale.
    bot = bot_factory(venue_cls=CountingReloads, **four(rotation={"top_n": 2}))
    bot.job("rotate", T0)
    bot.job("rotate", T0 + 3 * 3_600_000)
    assert bot.venue.reloads == 2


class Lists(SimExchange):
    """NEW is listed after the bot loaded the markets: only a reload shows it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.all_markets = list(self.markets.values())
        self.markets = {}
        self._set_markets([m for m in self.all_markets if not m["symbol"].startswith("DDD")])

    def load_markets(self, reload=False, params=None):
        if reload:
            self._set_markets(self.all_markets)
        return super().load_markets(reload, params)


def test_a_market_listed_since_the_start_is_ranked_by_the_rotation_that_reloads(bot_factory):
    # The tickers were read before the markets were reloaded: the new market's were
    # dropped as an unknown symbol, and it joined a rotation (3 h) late.
    volumes = {**VOLUMES, "DDD": 90_000.0}
    bot = bot_factory(venue_cls=Lists, **four(volume=volumes, rotation={"top_n": 2}))
    bot.client.load_markets()  # the start's load: no DDD yet
    assert DDD not in bot.client.load_markets()
    bot.job("rotate", T0)
    assert last_rotation(bot)["coins"] == [DDD, AAA]


def test_a_position_in_a_coin_that_drops_out_stays_managed_until_closed(bot_factory):
    paths = four()["paths"]
    paths["AAA"] = [candle(100, 100.5, 99.5, 100.2), candle(100.2, 100.3, 96.0, 96.5)]
    bot = bot_factory(strat=PICK_FIRST, paths=paths, volume=VOLUMES, rotation={"top_n": 1})
    bot.job("rotate", T0)
    bot.job("scan", T0)
    assert bot.position(AAA) is not None
    bot.ledger.append([Fact("note", bot.clock.now_ms(), reason="test: AAA banned")])
    bot.rt.config = bot.rt.config.with_values(rotation={"blacklist": [AAA]})
    bot.job("rotate", T0 + 1)
    data = last_rotation(bot)
    assert data["coins"] == [BBB] and data["removed"] == [AAA]
    bot.after_candle(0)
    assert bot.job("scan")["summary"]["symbols"] == 2  # BBB and the open AAA
    bot.after_candle(1)  # AAA falls through its stop
    bot.job("scan")
    assert bot.position(AAA) is None and bot.facts("position_closed", symbol=AAA)
    bot.after_candle(2)
    assert bot.job("scan")["summary"]["symbols"] == 1


# -- daily reset ----------------------------------------------------------------------------

def test_daily_reset_records_the_day_close_and_clears_the_daily_loss_halt(bot_factory):
    path = [candle(100, 100.5, 99.5, 100.2), candle(100.2, 100.3, 96.0, 96.5)]
    bot = bot_factory(strat=PICK_FIRST, paths={"AAA": path})
    bot.set_coins([AAA])
    bot.job("scan", T0)
    bot.after_candle(1)
    bot.job("scan")  # the stop took the position: a loss today
    [closed] = bot.facts("position_closed")
    bot.ledger.append([Fact("halt", bot.clock.now_ms(), reason="daily_loss_limit",
                            data={"kind": "daily_loss"})])
    assert bot.job("daily_reset", T0)["outcome"] == "skipped"  # the day is not over

    midnight = T0 - T0 % DAY + DAY
    bot.at(midnight + 5_000)
    record = bot.job("daily_reset", midnight)
    assert record["outcome"] == "ok" and record["summary"]["closed_days"] == [utc_day(T0)]
    [close] = bot.facts("day_close")
    data = json.loads(close["data"])
    assert data["day"] == utc_day(T0) and data["trades"] == 1
    assert Decimal(data["realized_pnl"]) == Decimal(closed["pnl"]) == Decimal(close["pnl"])
    assert Decimal(data["fees"]) == Decimal(closed["fee"]) > 0
    equity = bot.client.balance().equity
    assert Decimal(data["equity"]) == equity
    state = bot.ledger.state()
    assert state.halts == {} and state.last_day_closed == utc_day(T0)
    assert Decimal(state.day_start_equity) == equity
    assert [json.loads(r["data"])["kind"] for r in bot.facts("resume")] == ["daily_loss"]

    before = bot.counts()
    assert bot.job("daily_reset", midnight)["outcome"] == "skipped"
    bot.clock.advance(3_600_000)
    assert bot.job("daily_reset")["outcome"] == "skipped"
    assert added(before, bot.counts()) == {"job_run": 2}


def test_daily_reset_catches_up_every_day_that_closed_while_the_bot_was_down(bot_factory):
    bot = bot_factory(paths={"AAA": flat(100, 3)})
    day0 = T0 - T0 % DAY
    # Trades on two different days, and balance snapshots along the way.
    facts = []
    for k, (pnl, equity) in enumerate([("-12.5", "9987.5"), ("30", "10017.5")]):
        ts = T0 + k * DAY
        facts += [Fact("position_closed", ts, symbol=AAA, side="long", amount="1",
                       price="100", fee="0.1", pnl=pnl, position_id=f"p{k}", reason="test"),
                  Fact("balance", ts + 1, data={"equity": equity, "total": equity})]
    # ...among hourly job runs, so each day's totals are read from its seq floor on.
    facts += [Fact("job_run", ts, data={"job": "scan", "outcome": "ok"})
              for ts in range(day0 + 1_000, day0 + 2 * DAY, 3_600_000)]
    bot.ledger.append(sorted(facts, key=lambda f: f.ts))
    assert bot.ledger.seq_floor(day0 + DAY) > 0
    bot.at(day0 + 3 * DAY + 60_000)  # down for three midnights
    record = bot.job("daily_reset", day0 + 3 * DAY)
    days = [utc_day(day0 + i * DAY) for i in range(3)]
    assert record["summary"]["closed_days"] == days
    closes = [json.loads(r["data"]) for r in bot.facts("day_close")]
    assert [c["day"] for c in closes] == days  # each once, oldest first
    assert [Decimal(c["realized_pnl"]) for c in closes] == [Decimal("-12.5"), Decimal(30), 0]
    assert [c["trades"] for c in closes] == [1, 1, 0]
    assert [c["equity"] for c in closes[:2]] == ["9987.5", "10017.5"]
    assert Decimal(closes[2]["equity"]) == bot.client.balance().equity  # the last: now
    assert bot.ledger.state().last_day_closed == days[-1]

    before = bot.counts()
    assert bot.job("daily_reset", day0 + 3 * DAY)["outcome"] == "skipped"
    assert added(before, bot.counts()) == {"job_run": 1}
    # Another day later, exactly one more.
    bot.at(day0 + 4 * DAY + 60_000)
    assert bot.job("daily_reset")["summary"]["closed_days"] == [utc_day(day0 + 3 * DAY)]
    assert len(bot.facts("day_close")) == 4
