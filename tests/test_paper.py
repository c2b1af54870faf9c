"""Paper trading: live public market data from Binance, the simulated account for orders.

``mode = "paper"`` is wired by ``core.venues.for_mode``: a keyless ccxt ``binanceusdm``
for market data under the simulated exchange (its state in a file). Here that real
ccxt object answers from recorded public Binance USDⓈ-M responses (exchangeInfo,
24 h tickers, 5 m klines: tests/fixtures/binance) through a router in place of its
``fetch``; everything else is the real code: the rotation and scan jobs, risk, the
Executor, the simulated account, the ledger.
"""

from __future__ import annotations

import json
import re
import sqlite3
from contextlib import closing
from decimal import Decimal
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import ccxt
import pytest
from sim_fixtures import raise_ip_ban

from core import runtime
from core.clock import VirtualClock
from core.config import Config
from core.exchange import IpBanned
from core.exchange_types import SubmitResult
from core.execution import Executor
from core.sim_market import LiveMarket
from jobs import reconcile, rotate, scan
from jobs.runner import run_job
from ledger import Fact

FIX = Path(__file__).parent / "fixtures" / "binance"
SERVER_NOW = 1768471350000  # time.json: 10:02:30 UTC, inside the 10:00 candle
BTC = "BTC/USDT:USDT"


def body(name: str):
    return json.loads((FIX / f"{name}.json").read_text(encoding="utf-8"))


def route(monkeypatch, fake):
    """Answer the real ccxt object's HTTP requests from ``fake``."""
    monkeypatch.setattr(ccxt.binanceusdm, "fetch",
                        lambda self, url, method="GET", headers=None, body=None:
                        fake.fetch(url, method, headers, body))
    return fake


def skewed_clock(fake, exchange_ms: int, ours_ahead_ms: int) -> VirtualClock:
    """Our clock at ``exchange_ms`` by the exchange's, ours ``ours_ahead_ms`` ahead."""
    clock = VirtualClock(exchange_ms + ours_ahead_ms)
    fake.now = lambda: clock.now_ms() - ours_ahead_ms
    return clock


def start_paper(monkeypatch, tmp_path, fake, *, at: int = SERVER_NOW, ours_ahead_ms: int = 0,
                cfg: Config | None = None):
    """A paper runtime on ``fake``'s answers, rotated once: (runtime, our clock)."""
    route(monkeypatch, fake)
    clock = skewed_clock(fake, at, ours_ahead_ms)
    rt = runtime.build(cfg or paper_config(tmp_path), tmp_path / "bot.db", clock=clock)
    try:
        rotate.run(rt, clock.now_ms(), "rotate-1")
    except BaseException:
        rt.close()
        raise
    return rt, clock


def entered(monkeypatch, tmp_path, fake):
    """``start_paper``, then a long BTC entry: (runtime, clock, its stop's price, the
    next minute's open time)."""
    rt, clock = start_paper(monkeypatch, tmp_path, fake)
    try:
        assert scan.run(rt, SERVER_NOW, "scan-1")["entries"] == 1
    except BaseException:
        rt.close()
        raise
    stop = Decimal(rt.ledger.state().positions[BTC]["stop"]["price"])
    return rt, clock, stop, SERVER_NOW - SERVER_NOW % 60_000 + 60_000


class PublicBinance:
    """Recorded public answers, by endpoint; every request is kept for the checks."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict, dict]] = []

    def fetch(self, url, method="GET", headers=None, body_=None):
        parts = urlsplit(url)
        params = dict(parse_qsl(parts.query))
        self.requests.append((method, parts.path, params, dict(headers or {})))
        path = parts.path
        if path == "/fapi/v1/exchangeInfo":
            return body("exchange_info")
        if path == "/fapi/v1/time":  # ccxt syncs its clock on load_markets
            return body("time")
        if path == "/fapi/v1/ticker/24hr":
            tickers = body("ticker_24hr")
            if "symbol" in params:
                return next(t for t in tickers if t["symbol"] == params["symbol"])
            return tickers
        if path == "/fapi/v1/klines":
            if params.get("symbol") == "BTCUSDT" and params.get("interval") == "5m":
                return body("klines_btcusdt_5m")
            return []  # 1 m candles the venue watches stops on: none closed yet
        raise AssertionError(f"paper trading called {method} {path}")


@pytest.fixture
def public(monkeypatch):
    recorded = PublicBinance()
    route(monkeypatch, recorded)
    return recorded


def paper_config(tmp_path) -> Config:
    # sma_cross 2/3 crosses up on the recorded klines' last closed candle (09:55)
    return Config().with_values(
        bot={"mode": "paper"}, rotation={"top_n": 1},
        strategy={"name": "sma_cross", "sma_fast": 2, "sma_slow": 3, "candles": 30},
        sim={"state_path": str(tmp_path / "paper_exchange.db")})


def test_paper_scan_enters_on_live_data_with_the_simulated_account(tmp_path, public,
                                                                   monkeypatch):
    monkeypatch.delenv("BOT_API_KEY", raising=False)
    monkeypatch.delenv("BOT_API_SECRET", raising=False)
    cfg = paper_config(tmp_path)
    clock = VirtualClock(SERVER_NOW)
    rt = runtime.build(cfg, tmp_path / "bot.db", clock=clock)
    try:
        assert rotate.run(rt, SERVER_NOW, "rotate-1")["coins"] == 1
        assert rt.ledger.state().active_coins == [BTC]  # top by 24 h quote volume
        summary = scan.run(rt, SERVER_NOW, "scan-1")
        assert summary["entries"] == 1, summary
        state = rt.ledger.state()
        position = state.positions[BTC]
        signal = rt.ledger.select("SELECT data FROM facts WHERE type = 'signal'")[0]
        assert json.loads(signal["data"])["candle_ts"] == 1768470900000  # 09:55, closed
        # filled by the simulated account at the live last price plus 2 bps slippage
        last = Decimal("96512.30")
        assert Decimal(position["entry_price"]) == (last * Decimal("1.0002") / Decimal(
            "0.10")).to_integral_value("ROUND_CEILING") * Decimal("0.10")
        assert Decimal(position["stop"]["price"]) < Decimal(position["entry_price"])
        balance = rt.client.balance()
        assert balance.total < Decimal(10_000)  # the taker fee, from the simulated wallet
        assert rt.ledger.verify().ok
        # a second scan in the same candle: no new closed candle, nothing happens
        clock.advance(120_000)
        assert scan.run(rt, SERVER_NOW + 120_000, "scan-2").get("new_candles") == 0
    finally:
        rt.close()
    # only public market data went to Binance: no orders, no account calls, no key
    paths = {p for _, p, _, _ in public.requests}
    assert paths <= {"/fapi/v1/exchangeInfo", "/fapi/v1/time", "/fapi/v1/ticker/24hr",
                     "/fapi/v1/klines"}
    assert "/fapi/v1/klines" in paths and "/fapi/v1/ticker/24hr" in paths
    assert {m for m, _, _, _ in public.requests} == {"GET"}
    assert not any("X-MBX-APIKEY" in h or "signature" in q for _, _, q, h in public.requests)

    # the simulated account lives in its own file: a restarted bot finds its position
    rt = runtime.build(cfg, tmp_path / "bot.db", clock=VirtualClock(SERVER_NOW + 180_000))
    try:
        held = {p.symbol: p for p in rt.client.positions()}
        assert held[BTC].amount == Decimal(position["amount"])
        assert BTC in rt.ledger.state().positions
    finally:
        rt.close()


class WickingBinance(PublicBinance):
    """The recorded answers, plus 1 m candles at the last price: one minute wicks down to
    ``wick_low``, and the next ``empty`` answers for 1 m candles come back empty."""

    def __init__(self) -> None:
        super().__init__()
        self.wick_at, self.wick_low, self.empty, self.now = None, None, 0, None
        self.wicks: set[int] = set()  # more minutes that wick down to wick_low

    def fetch(self, url, method="GET", headers=None, body_=None):
        params = dict(parse_qsl(urlsplit(url).query))
        if urlsplit(url).path == "/fapi/v1/time":  # its clock moves with the test's
            return {"serverTime": self.now()}
        if urlsplit(url).path != "/fapi/v1/klines" or params.get("interval") != "1m":
            return super().fetch(url, method, headers, body_)
        self.requests.append((method, "/fapi/v1/klines", params, dict(headers or {})))
        if self.empty:
            self.empty -= 1
            return []
        rows, t = [], int(params["startTime"])
        while t + 60_000 <= self.now() and len(rows) < int(params.get("limit", 500)):
            low = self.wick_low if t == self.wick_at or t in self.wicks else 96_500.0
            rows.append([t, "96512.3", "96520.0", str(low), "96512.3", "10", t + 59_999,
                         "965123", 10, "5", "482561", "0"])
            t += 60_000
        return rows


def test_paper_stops_see_the_minutes_an_empty_answer_left_out(tmp_path, monkeypatch):
    # A wick through the stop in a closed minute; the first answer for it comes back
    # empty. The minute is asked for again and the stop fires, instead of being skipped.
    wicking = WickingBinance()
    route(monkeypatch, wicking)
    clock = skewed_clock(wicking, SERVER_NOW, 0)
    rt = runtime.build(paper_config(tmp_path), tmp_path / "bot.db", clock=clock)
    try:
        rotate.run(rt, SERVER_NOW, "rotate-1")
        assert scan.run(rt, SERVER_NOW, "scan-1")["entries"] == 1
        stop = Decimal(rt.ledger.state().positions[BTC]["stop"]["price"])
        minute = SERVER_NOW - SERVER_NOW % 60_000 + 60_000
        wicking.wick_at, wicking.wick_low = minute, str(stop * Decimal("0.99"))
        clock.advance(3 * 60_000)  # the wick's minute has closed
        wicking.empty = 1
        assert {p.symbol for p in rt.client.positions()} == {BTC}  # not seen yet
        clock.advance(60_000)
        assert rt.client.positions() == []  # asked again: the stop fired in that minute
        [stop_fill] = [t for t in rt.venue.store.trades(BTC, 0, 10**14) if t.side == "SELL"]
        assert minute <= stop_fill.ts < minute + 60_000
    finally:
        rt.close()


@pytest.mark.parametrize("bad_low", ["0", "NaN", "96530.0"])  # above its high
def test_paper_a_malformed_minute_fires_no_stop(tmp_path, monkeypatch, caplog, bad_low):
    """A 1 m row with a low of 0 filled the stop (the market never went near it), without
    a word; the bot's own candle check drops such rows."""
    wicking = WickingBinance()
    rt, clock, stop, minute = entered(monkeypatch, tmp_path, wicking)
    try:
        wicking.wick_at, wicking.wick_low = minute, bad_low
        clock.advance(3 * 60_000)
        assert {p.symbol for p in rt.client.positions()} == {BTC}
        assert f"{BTC}: 1 malformed 1 m candles from the exchange left out" in caplog.text
        wicking.wicks.add(minute + 2 * 60_000)  # a real wick through the stop, after it
        wicking.wick_low = str(stop * Decimal("0.99"))
        clock.advance(60_000)
        assert rt.client.positions() == []
        [fill] = [t for t in rt.venue.store.trades(BTC, 0, 10**14) if t.side == "SELL"]
        assert fill.ts >= minute + 2 * 60_000
    finally:
        rt.close()


class BanningBinance(WickingBinance):
    """WickingBinance, whose next answer on ``ban_next`` (1 m candles, or the clock) is a
    418 (IP banned) as ccxt raises it: a DDoSProtection while handling the HTTP error."""

    ban_next: str | None = None  # "1m" or "/fapi/v1/time"

    def fetch(self, url, method="GET", headers=None, body_=None):
        params = dict(parse_qsl(urlsplit(url).query))
        if self.ban_next is not None and self.ban_next in (params.get("interval"),
                                                          urlsplit(url).path):
            self.ban_next = None
            self.requests.append((method, urlsplit(url).path, params, dict(headers or {})))
            raise_ip_ban(120)
        return super().fetch(url, method, headers, body_)


def test_paper_calls_nothing_while_the_ip_is_banned(tmp_path, monkeypatch, caplog):
    """During a ban the simulated account's 1 m candles (and each scan's reads) were asked
    for every scan, which lengthens a ban."""
    banning = BanningBinance()
    rt, clock = start_paper(monkeypatch, tmp_path, banning)
    try:
        assert scan.run(rt, SERVER_NOW, "scan-1")["entries"] == 1
        clock.advance(2 * 60_000)
        banning.ban_next = "1m"
        with pytest.raises(ccxt.DDoSProtection):
            rt.client.positions()  # the account catches up on the minutes: banned
        asked = len(banning.requests)
        for _ in range(11):  # scans every 10 s for the 2 minutes of the ban
            clock.advance(10_000)
            scan.run(rt, clock.now_ms(), f"scan-{clock.now_ms()}")
            with pytest.raises(ccxt.DDoSProtection):
                rt.client.positions()
        record = run_job(rt, "reconcile", reconcile.run, clock.now_ms())
        assert record["outcome"] == "error"
        assert "job reconcile failed: IpBanned: not called" in caplog.text
        assert "Traceback" not in caplog.text  # a job failing for as long as a ban lasts
        assert len(banning.requests) == asked
        clock.advance(10_000)
        assert {p.symbol for p in rt.client.positions()} == {BTC}  # over: asked again
        assert len(banning.requests) > asked
    finally:
        rt.close()


def test_paper_a_ban_answered_to_its_clock_reading_is_passed_on(tmp_path, monkeypatch):
    """The simulated account kept its last clock offset on any failed /time, a 418 too:
    the ban went unseen and the next call went out."""
    banning = BanningBinance()
    rt, clock = start_paper(monkeypatch, tmp_path, banning)
    try:
        clock.advance(2 * 60_000)  # the account's clock offset is due to be measured again
        banning.ban_next = "/fapi/v1/time"
        with pytest.raises(ccxt.DDoSProtection):
            rt.client.positions()
        asked = len(banning.requests)
        with pytest.raises(IpBanned):
            rt.client.positions()
        assert len(banning.requests) == asked
    finally:
        rt.close()


def test_paper_a_stop_fires_on_a_wick_while_down_though_the_first_answer_is_empty(
        tmp_path, monkeypatch, caplog):
    # Down for an hour, the wick 30 minutes in: the minutes missed while down are older
    # than the 15 minutes an empty answer is retried for, yet they are asked for again.
    wicking = WickingBinance()
    route(monkeypatch, wicking)
    clock = skewed_clock(wicking, SERVER_NOW, 0)
    cfg = paper_config(tmp_path)
    rt = runtime.build(cfg, tmp_path / "bot.db", clock=clock)
    try:
        rotate.run(rt, SERVER_NOW, "rotate-1")
        assert scan.run(rt, SERVER_NOW, "scan-1")["entries"] == 1
        stop = Decimal(rt.ledger.state().positions[BTC]["stop"]["price"])
    finally:
        rt.close()
    minute = SERVER_NOW - SERVER_NOW % 60_000 + 30 * 60_000
    wicking.wick_at, wicking.wick_low = minute, str(stop * Decimal("0.99"))
    clock.advance(60 * 60_000)
    rt = runtime.build(cfg, tmp_path / "bot.db", clock=clock)
    try:
        wicking.empty = 1
        assert {p.symbol for p in rt.client.positions()} == {BTC}  # not seen yet
        clock.advance(60_000)
        assert rt.client.positions() == []
        [stop_fill] = [t for t in rt.venue.store.trades(BTC, 0, 10**14) if t.side == "SELL"]
        assert minute <= stop_fill.ts < minute + 60_000
        assert "no candles from" not in caplog.text
        # answers that stay empty are given up on after 15 minutes of asking
        rt.venue.create_order(BTC, "STOP_MARKET", "buy", 0.01, None, {"stopPrice": 200_000})
        wicking.empty = 10**6
        for _ in range(16):  # asked every minute: the first ask, then 15 minutes more
            clock.advance(60_000)
            rt.client.positions()
        assert "no candles from" not in caplog.text
        clock.advance(60_000)
        rt.client.positions()
        assert "no candles from" in caplog.text
    finally:
        rt.close()


@pytest.mark.parametrize("ours_ahead_ms", [5_000, 150_000, -150_000])
def test_paper_places_and_matches_orders_on_the_exchanges_clock(tmp_path, monkeypatch,
                                                                 ours_ahead_ms):
    # The stop rests from 10:02:57 by the exchange's clock. A wick in its 10:02 minute
    # (before it was placed) must not fire it; one in the 10:03 minute must. Stamped by
    # our clock instead, a skew either way missed the one or fired on the other.
    wicking = WickingBinance()
    route(monkeypatch, wicking)
    placed = SERVER_NOW + 27_000
    clock = skewed_clock(wicking, placed, ours_ahead_ms)
    rt = runtime.build(paper_config(tmp_path), tmp_path / "bot.db", clock=clock)
    try:
        rotate.run(rt, clock.now_ms(), "rotate-1")
        assert scan.run(rt, clock.now_ms(), "scan-1")["entries"] == 1
        [fill] = rt.ledger.select("SELECT fee, data FROM facts WHERE type = 'fill'")
        assert Decimal(fill["fee"]) > 0  # the entry's trade found, not stood in for
        assert not json.loads(fill["data"])["trade_id"].startswith("order:")
        stop = Decimal(rt.ledger.state().positions[BTC]["stop"]["price"])
        minute = placed - placed % 60_000
        wicking.wicks, wicking.wick_low = {minute, minute + 60_000}, str(stop * Decimal("0.99"))
        clock.advance(10_000)  # the exchange's 10:02 minute has closed, not its 10:03
        assert {p.symbol for p in rt.client.positions()} == {BTC}
        clock.advance(60_000)
        assert rt.client.positions() == []
        [stop_fill] = [t for t in rt.venue.store.trades(BTC, 0, 10**14) if t.side == "SELL"]
        assert minute + 60_000 <= stop_fill.ts < minute + 120_000
    finally:
        rt.close()


def test_paper_reconcile_in_a_new_process_finds_the_trade_of_an_entry_left_unknown(
        tmp_path, monkeypatch):
    # Our clock is 150 s ahead: the exchange stamps the trade 150 s before our time.
    # Reconcile, first thing in a new process, looked from 60 s before the order by ours.
    wicking = WickingBinance()
    route(monkeypatch, wicking)
    clock = skewed_clock(wicking, SERVER_NOW + 27_000, 150_000)
    cfg = paper_config(tmp_path).with_values(exchange={"read_retries": 0})
    rt = runtime.build(cfg, tmp_path / "bot.db", clock=clock)
    try:
        rotate.run(rt, clock.now_ms(), "rotate-1")
        rt.venue.faults.script([("create_order", "timeout_after_accept")]
                               + [("fetch_order", "network_error")] * 20)
        scan.run(rt, clock.now_ms(), "scan-1")
        assert [o["state"] for o in rt.ledger.state().orders.values()] == ["unknown"]
    finally:
        rt.close()
    clock.advance(30_000)
    rt = runtime.build(cfg, tmp_path / "bot.db", clock=clock)
    try:
        reconcile.run(rt, clock.now_ms(), "reconcile-1")
        [fill] = rt.ledger.select("SELECT fee, data FROM facts WHERE type = 'fill'")
        assert Decimal(fill["fee"]) > 0
        assert not json.loads(fill["data"])["trade_id"].startswith("order:")
    finally:
        rt.close()


class MistimedBinance(WickingBinance):
    """The next /time answer only (then right again): ``jump`` ms off, or ``lag`` ms late
    coming back on ``clock`` (the offset read from it that much too small)."""

    jump = lag = 0
    clock: VirtualClock | None = None

    def fetch(self, url, method="GET", headers=None, body_=None):
        if urlsplit(url).path != "/fapi/v1/time":
            return super().fetch(url, method, headers, body_)
        answer = {"serverTime": self.now() + self.jump}
        if self.lag:
            self.clock.advance(self.lag)
        self.jump = self.lag = 0
        return answer


def test_paper_the_simulated_accounts_clock_keeps_no_bad_reading(tmp_path, monkeypatch):
    binance = MistimedBinance()
    route(monkeypatch, binance)
    clock = skewed_clock(binance, SERVER_NOW, 150_000)
    ahead = clock.now_ms()  # ours
    cfg = paper_config(tmp_path)
    runtime.build(cfg, tmp_path / "bot.db", clock=clock).close()
    # a state file from before the account kept the exchange's clock holds our time
    with closing(sqlite3.connect(tmp_path / "paper_paper_exchange.db")) as db, db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'now_ms'", (str(ahead),))
    rt = runtime.build(cfg, tmp_path / "bot.db", clock=clock)
    try:
        assert rt.venue.fetch_time() == binance.now()
        rotate.run(rt, ahead, "rotate-1")
        scan.run(rt, ahead, "scan-1")
        [signal] = rt.ledger.select("SELECT data FROM facts WHERE type = 'signal'")
        assert json.loads(signal["data"])["candle_ts"] == 1768470900000  # 09:55, closed
        clock.advance(61_000)
        binance.jump = 600_000  # one answer 10 minutes ahead: kept for its minute only
        assert rt.venue.fetch_time() == binance.now() + 600_000
        clock.advance(61_000)
        assert rt.venue.fetch_time() == binance.now()
    finally:
        rt.close()


def test_paper_a_bad_clock_reading_while_flat_skips_no_minute_of_a_later_stop(
        tmp_path, monkeypatch):
    binance = MistimedBinance()
    rt, clock = start_paper(monkeypatch, tmp_path, binance)
    try:
        clock.advance(61_000)
        binance.jump = 600_000  # one answer 10 minutes ahead, nothing resting
        rt.client.positions()
        clock.advance(61_000)
        assert scan.run(rt, clock.now_ms(), "scan-1")["entries"] == 1
        stop = Decimal(rt.ledger.state().positions[BTC]["stop"]["price"])
        minute = clock.now_ms() - clock.now_ms() % 60_000 + 60_000
        binance.wick_at, binance.wick_low = minute, str(stop * Decimal("0.99"))
        clock.advance(3 * 60_000)
        assert rt.client.positions() == []  # its minutes were not taken as seen
    finally:
        rt.close()


@pytest.mark.parametrize("jitter_ms", [0, 1_000])
def test_paper_a_stop_fill_is_found_whatever_two_clock_readings_say(tmp_path, monkeypatch,
                                                                     jitter_ms):
    # Our clock is 150 s ahead. The stop, placed at the exchange's 10:03:59.5, fills on
    # the next minute's gap open, 0.5 s later. The reading it was stamped by came back
    # 1 s late; the fill was searched for from its time by ours plus the offset read
    # now, past the trade: stood in for, fee lost.
    class Gapping(WickingBinance):
        delta = 0

        def fetch(self, url, method="GET", headers=None, body_=None):
            if urlsplit(url).path == "/fapi/v1/time":
                return {"serverTime": self.now() + self.delta}
            rows = super().fetch(url, method, headers, body_)
            if urlsplit(url).path == "/fapi/v1/klines" and "interval=1m" in url:
                rows = [[r[0], r[3], r[2], r[3], r[3], *r[5:]] if r[0] == self.wick_at else r
                        for r in rows]  # opens at its low: a gap through the stop
            return rows

    binance = Gapping()
    rt, clock = start_paper(monkeypatch, tmp_path, binance, ours_ahead_ms=150_000)
    try:
        clock.advance(28_500 + jitter_ms)
        rt.client.server_now_ms()
        rt.venue.fetch_time()
        clock.advance(61_000)  # the exchange's 10:03:59.5
        binance.delta = -jitter_ms
        assert scan.run(rt, clock.now_ms(), "scan-1")["entries"] == 1
        p = rt.ledger.state().positions[BTC]
        [stop] = [o for o in rt.venue.store.open_orders() if o.algo]
        binance.wick_at = stop.created_ms - stop.created_ms % 60_000 + 60_000
        binance.wick_low = str(Decimal(p["stop"]["price"]) * Decimal("0.99"))
        binance.delta = 0
        clock.advance(61_000)
        reconcile.run(rt, clock.now_ms(), "reconcile-1")
        assert rt.ledger.state().positions == {}
        fills = rt.ledger.select("SELECT fee, data FROM facts WHERE type = 'fill'")
        assert len(fills) == 2 and all(Decimal(f["fee"]) > 0 for f in fills)
    finally:
        rt.close()


def test_paper_reconcile_finds_a_close_by_hand_soon_after_the_entry(tmp_path, monkeypatch):
    # Our clock 150 s ahead: the closing trade, 30 s after the entry by the exchange's
    # clock, lies before the entry's time by ours; it was left out as older than it.
    wicking = WickingBinance()
    rt, clock = start_paper(monkeypatch, tmp_path, wicking, at=SERVER_NOW + 27_000, ours_ahead_ms=150_000)
    try:
        assert scan.run(rt, clock.now_ms(), "scan-1")["entries"] == 1
        amount = float(rt.ledger.state().positions[BTC]["amount"])
        clock.advance(30_000)
        rt.venue.create_order(BTC, "market", "sell", amount, None, {"reduceOnly": True})
        clock.advance(30_000)
        reconcile.run(rt, clock.now_ms(), "reconcile-1")
        assert rt.ledger.state().positions == {}
        [closed] = rt.ledger.select("SELECT reason FROM facts WHERE type = 'position_closed'")
        assert closed["reason"] == "closed_on_exchange"
    finally:
        rt.close()


@pytest.mark.parametrize(("ours_ahead_ms", "lag_ms", "gap_ms"), [
    (0, 5_000, 61_000), (-150_000, 0, 130_000), (150_000, 0, 61_000)])
def test_paper_reconcile_takes_no_trade_of_the_position_before(tmp_path, monkeypatch,
                                                               ours_ahead_ms, lag_ms, gap_ms):
    # A closes; B opens ``gap_ms`` later and is closed by hand. A's recorded exit came
    # back from a search started by the wrong clock (a /time answer 5 s late, or the
    # exchange's clock ahead of ours), was not known as recorded (looked up by our
    # clock), and was taken into B's close a second time.
    binance = MistimedBinance()
    rt, clock = start_paper(monkeypatch, tmp_path, binance, ours_ahead_ms=ours_ahead_ms)
    binance.clock = clock
    try:
        assert scan.run(rt, clock.now_ms(), "scan-1")["entries"] == 1
        ex = Executor(rt.ledger, rt.client, rt.clock, rt.config, "manual", rt.lock)
        a = rt.ledger.state().positions[BTC]
        clock.advance(10_000)
        assert ex.close_position(a, "exit A", clock.now_ms())
        clock.advance(gap_ms)
        b = ex.open_position(BTC, "long", Decimal(a["amount"]), clock.now_ms(), stop_pct=2.0)
        clock.advance(20_000)
        rt.venue.create_order(BTC, "market", "sell", float(b["amount"]), None,
                              {"reduceOnly": True})
        clock.advance(61_000)
        binance.lag = lag_ms
        reconcile.run(rt, clock.now_ms(), "reconcile-1")
        ids = [json.loads(r["data"])["trade_id"] for r in rt.ledger.select(
            "SELECT data FROM facts WHERE type = 'fill'")]
        assert len(ids) == len(set(ids)) == 4  # A in and out, B in and out
        assert rt.ledger.state().positions == {}
    finally:
        rt.close()


class DelistingBinance(PublicBinance):
    """The recorded answers; once ``settling`` is set, BTCUSDT stops trading; once
    ``removed`` is set, it is gone from the exchange's lists altogether (delisted)."""

    settling = removed = False

    def fetch(self, url, method="GET", headers=None, body_=None):
        path = urlsplit(url).path
        if self.removed and path == "/fapi/v1/klines" and "BTCUSDT" in url:
            raise AssertionError("asked for the candles of a symbol the exchange dropped")
        answer = super().fetch(url, method, headers, body_)
        if path == "/fapi/v1/exchangeInfo" and (self.settling or self.removed):
            answer = {**answer, "symbols": [m for m in answer["symbols"]
                                            if not (self.removed and m["symbol"] == "BTCUSDT")]}
            for market in answer["symbols"]:
                if market["symbol"] == "BTCUSDT":
                    market["status"] = "SETTLING"
        if path == "/fapi/v1/ticker/24hr" and self.removed and isinstance(answer, list):
            answer = [t for t in answer if t["symbol"] != "BTCUSDT"]
        return answer


def delisting(monkeypatch) -> DelistingBinance:
    binance = DelistingBinance()
    route(monkeypatch, binance)
    return binance


def test_paper_judges_a_closed_candle_by_the_exchanges_clock(tmp_path, public, monkeypatch):
    # Our clock runs 2.5 minutes ahead of Binance's (its /time says 10:02:30 while ours
    # says 10:05:00): the 10:00 candle is still forming there, so the scan decides 09:55.
    monkeypatch.delenv("BOT_API_KEY", raising=False)
    ahead = SERVER_NOW + 150_000
    rt = runtime.build(paper_config(tmp_path), tmp_path / "bot.db", clock=VirtualClock(ahead))
    try:
        rotate.run(rt, ahead, "rotate-1")
        scan.run(rt, ahead, "scan-1")
        [signal] = rt.ledger.select("SELECT data FROM facts WHERE type = 'signal'")
        assert json.loads(signal["data"])["candle_ts"] == 1768470900000  # 09:55, closed
        assert rt.client.server_now_ms() - SERVER_NOW < 5_000
    finally:
        rt.close()


class SlowTimeBinance(PublicBinance):
    """/time takes 2 s each way on the test's clock: the server reads its time halfway."""

    def __init__(self, clock: VirtualClock, server_ahead_ms: int) -> None:
        super().__init__()
        self.clock, self.server_ahead_ms, self.time_calls = clock, server_ahead_ms, 0

    def fetch(self, url, method="GET", headers=None, body_=None):
        if urlsplit(url).path != "/fapi/v1/time":
            return super().fetch(url, method, headers, body_)
        self.time_calls += 1
        self.clock.advance(2_000)
        server = self.clock.now_ms() + self.server_ahead_ms
        self.clock.advance(2_000)
        return {"serverTime": server}


def test_paper_measures_the_exchange_clock_once_its_answer_is_back(monkeypatch):
    # Both clocks agree; the /time answer takes 4 s. Measured against our clock before
    # the request, the exchange would seem 2 s ahead, and a candle still forming there
    # would count as closed. Measured once the answer is back, it seems 2 s behind: late,
    # the safe direction.
    clock = VirtualClock(SERVER_NOW)
    slow = SlowTimeBinance(clock, server_ahead_ms=0)
    route(monkeypatch, slow)
    market = LiveMarket(ccxt.binanceusdm(), clock=clock)
    asked_at = clock.now_ms()
    server_now = market.server_now_ms(asked_at)
    assert server_now == asked_at - 2_000
    clock.advance(30_000)  # within the minute: the offset stands, no new request
    assert market.server_now_ms(clock.now_ms()) == clock.now_ms() - 2_000
    assert slow.time_calls == 1


class FailingTimeBinance(PublicBinance):
    """The recorded answers; once ``answers`` more /time requests were answered (None:
    all are), /time times out."""

    answers: int | None = None

    def fetch(self, url, method="GET", headers=None, body_=None):
        if urlsplit(url).path == "/fapi/v1/time" and self.answers is not None:
            if self.answers == 0:
                raise ccxt.RequestTimeout("binanceusdm GET https://fapi.binance.com/fapi/v1/time")
            self.answers -= 1
        return super().fetch(url, method, headers, body_)


def test_paper_decides_nothing_before_the_exchange_clock_is_known(tmp_path, monkeypatch):
    # Our clock is 2.5 minutes ahead. On a restart, /time answers ccxt's load_markets,
    # then not ours: with an offset of 0 assumed, the 10:00 candle (still forming at the
    # exchange) was decided on.
    binance = FailingTimeBinance()
    route(monkeypatch, binance)
    ahead = SERVER_NOW + 150_000
    clock = VirtualClock(ahead)
    cfg = paper_config(tmp_path).with_values(exchange={"read_retries": 0})
    runtime.build(cfg, tmp_path / "bot.db", clock=clock).close()  # the state file exists
    binance.answers = 1
    rt = runtime.build(cfg, tmp_path / "bot.db", clock=clock)
    try:
        assert binance.answers == 0
        with pytest.raises(ccxt.RequestTimeout):  # every venue call waits for the clock
            rotate.run(rt, ahead, "rotate-1")
        rt.ledger.append([Fact("rotation", ahead, data={"coins": [BTC]})])
        assert scan.run(rt, ahead, "scan-1").get("entries", 0) == 0
        assert rt.ledger.select("SELECT data FROM facts WHERE type = 'signal'") == []
        binance.answers = None  # answers again: measured, and only closed candles count
        rotate.run(rt, ahead, "rotate-2")
        scan.run(rt, ahead, "scan-2")
        [signal] = rt.ledger.select("SELECT data FROM facts WHERE type = 'signal'")
        assert json.loads(signal["data"])["candle_ts"] == 1768470900000  # 09:55, closed
        binance.answers = 0  # measured once: a failed read keeps the last offset
        clock.advance(120_000)
        assert rt.venue.source.server_now_ms(clock.now_ms()) == clock.now_ms() - 150_000
    finally:
        rt.close()


@pytest.mark.parametrize("gone", ["settling", "removed"])
def test_paper_rotates_out_a_symbol_that_stops_trading_and_keeps_its_position(
        tmp_path, monkeypatch, gone):
    # Stopped trading (SETTLING), or delisted for good (gone from exchangeInfo and the
    # tickers). Once ccxt no longer knew the symbol, every venue call asked it for that
    # symbol's data: the rotation, the balance (so the account limits) and, after a
    # restart, positions and reconcile failed; a settling one failed at the restart.
    binance = delisting(monkeypatch)
    cfg = paper_config(tmp_path).with_values(rotation={"top_n": 2})
    rt = runtime.build(cfg, tmp_path / "bot.db", clock=VirtualClock(SERVER_NOW))
    try:
        rotate.run(rt, SERVER_NOW, "rotate-1")
        assert rt.ledger.state().active_coins == [BTC, "ETH/USDT:USDT"]
        assert scan.run(rt, SERVER_NOW, "scan-1")["entries"] == 1
        setattr(binance, gone, True)  # the next rotation reloads the markets
        rotate.run(rt, SERVER_NOW + 60_000, "rotate-2")
        assert rt.ledger.state().active_coins == ["ETH/USDT:USDT"]
        if gone == "removed":
            assert set(rt.client.tickers()) == {"ETH/USDT:USDT"}
        assert {p.symbol for p in rt.client.positions()} == {BTC}
        assert rt.client.balance().total > 0
    finally:
        rt.close()
    rt = runtime.build(cfg, tmp_path / "bot.db", clock=VirtualClock(SERVER_NOW + 120_000))
    try:  # restarted: the position and its stop are still read, and squared
        assert {p.symbol for p in rt.client.positions()} == {BTC}
        assert rt.client.balance().total > 0
        assert reconcile.run(rt, SERVER_NOW + 120_000, "reconcile-1")["status"] == "in_sync"
    finally:
        rt.close()


class MinuteBinance(DelistingBinance):
    """DelistingBinance with 1 m candles at the clock: ETH wicks to 900 in the minute
    ``wick_at``; the next ``empty`` answers for ETH's 1 m candles come back empty."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self.clock, self.wick_at, self.empty = clock, None, 0

    def fetch(self, url, method="GET", headers=None, body_=None):
        path, params = urlsplit(url).path, dict(parse_qsl(urlsplit(url).query))
        if path == "/fapi/v1/time":
            return {"serverTime": self.clock.now_ms()}
        if path != "/fapi/v1/klines" or params.get("interval") != "1m":
            return super().fetch(url, method, headers, body_)
        assert not (self.removed and params["symbol"] == "BTCUSDT")
        if params["symbol"] == "ETHUSDT" and self.empty:
            self.empty -= 1
            return []
        price = "96512.3" if params["symbol"] == "BTCUSDT" else "3300"
        rows, t = [], int(params["startTime"])
        while t + 60_000 <= self.clock.now_ms() and len(rows) < int(params.get("limit", 500)):
            low = "900" if params["symbol"] == "ETHUSDT" and t == self.wick_at else price
            rows.append([t, price, price, low, price, "10", t + 59_999, "1", 1, "1", "1", "0"])
            t += 60_000
        return rows


def test_paper_a_delisted_symbols_stop_holds_back_no_other_order(tmp_path, monkeypatch):
    # BTC, held behind a resting stop, is delisted: no minute of it will ever come. The
    # venue waited for them, asking every call for everyone's minutes, and gave up after
    # 15 minutes, when one empty answer for ETH made its wick go unseen: ETH's limit at
    # 1000 never filled on a wick to 900.
    clock = VirtualClock(SERVER_NOW)
    binance = MinuteBinance(clock)
    route(monkeypatch, binance)
    rt = runtime.build(paper_config(tmp_path).with_values(rotation={"top_n": 2}),
                       tmp_path / "bot.db", clock=clock)
    try:
        rotate.run(rt, SERVER_NOW, "rotate-1")
        assert scan.run(rt, SERVER_NOW, "scan-1")["entries"] == 1  # BTC, its stop resting
        rt.venue.create_order("ETH/USDT:USDT", "limit", "buy", 0.1, 1000.0)
        binance.removed = True
        rotate.run(rt, SERVER_NOW + 60_000, "rotate-2")
        binance.wick_at = SERVER_NOW - SERVER_NOW % 60_000 + 15 * 60_000
        for minute in range(1, 20):
            clock.set(SERVER_NOW + 60_000 * minute + 5_000)
            binance.empty = int(minute == 16)  # one short answer as the wick's minute closes
            rt.client.balance()
        assert "ETH/USDT:USDT" in {p.symbol for p in rt.client.positions()}
    finally:
        rt.close()


def test_paper_keeps_the_markets_a_state_file_from_before_held(tmp_path, monkeypatch):
    # A state file written before markets were kept holds a BTC position: the first start
    # of this code keeps BTC's market while it is listed, so a later delisting is survived.
    binance = delisting(monkeypatch)
    cfg = paper_config(tmp_path)
    rt = runtime.build(cfg, tmp_path / "bot.db", clock=VirtualClock(SERVER_NOW))
    try:
        rotate.run(rt, SERVER_NOW, "rotate-1")
        assert scan.run(rt, SERVER_NOW, "scan-1")["entries"] == 1
    finally:
        rt.close()
    with closing(sqlite3.connect(tmp_path / "paper_paper_exchange.db")) as db, db:
        gone = db.execute("DELETE FROM meta WHERE key = 'kept_markets'")  # as before
        assert gone.rowcount == 1
    for when in (SERVER_NOW + 60_000, SERVER_NOW + 120_000):
        rt = runtime.build(cfg, tmp_path / "bot.db", clock=VirtualClock(when))
        try:
            assert {p.symbol for p in rt.client.positions()} == {BTC}
        finally:
            rt.close()
        binance.removed = True  # delisted between the two starts


class RetickedBinance(WickingBinance):
    """The recorded answers; once ``step`` is set, BTC's lot step (and tick) changed."""

    step = tick = None

    def fetch(self, url, method="GET", headers=None, body_=None):
        answer = super().fetch(url, method, headers, body_)
        if urlsplit(url).path == "/fapi/v1/exchangeInfo" and self.step:
            answer = json.loads(json.dumps(answer))
            for m in answer["symbols"]:
                if m["symbol"] == "BTCUSDT":
                    for f in m["filters"]:
                        if f["filterType"] == "PRICE_FILTER":
                            f["tickSize"] = self.tick
                        if f["filterType"] in ("LOT_SIZE", "MARKET_LOT_SIZE"):
                            f["stepSize"] = self.step
        return answer


def order_facts_after(rt, seq: int) -> list[dict]:
    return rt.ledger.select("SELECT type, client_order_id, reason FROM facts WHERE seq > ? AND "
                            "type LIKE 'order_%'", (seq,))


def restarted_with_step(monkeypatch, tmp_path, step: str):
    """A BTC long entered at the recorded step (0.001), then the bot restarted after BTC's
    lot step grew to ``step``: (runtime, clock, fake, the amount held)."""
    fake = RetickedBinance()
    rt, clock = start_paper(monkeypatch, tmp_path, fake)
    try:
        assert scan.run(rt, clock.now_ms(), "scan-1")["entries"] == 1
        held = Decimal(rt.ledger.state().positions[BTC]["amount"])
    finally:
        rt.close()
    fake.step, fake.tick = step, "1"
    clock.advance(120_000)
    return runtime.build(paper_config(tmp_path), tmp_path / "bot.db", clock=clock), clock, \
        fake, held


@pytest.mark.parametrize("step", ["0.01", "0.1"])
def test_paper_reports_a_position_as_held_after_the_lot_step_changes(tmp_path, monkeypatch,
                                                                       step):
    """The account rounded what it held to the new step: reconcile then 'corrected' the
    ledger to 0.25 (held: 0.248), or to 0.2, and after a close sold 0.2 the 0.048 left was
    reported as 0.0: a position nothing would ever show."""
    rt, clock, _, held = restarted_with_step(monkeypatch, tmp_path, step)
    try:
        assert held.as_tuple().exponent < Decimal(step).as_tuple().exponent  # finer
        assert rt.venue.market(BTC)["precision"]["amount"] == float(step)  # the new rules
        assert [(p.symbol, p.amount) for p in rt.client.positions()] == [(BTC, held)]
        report = reconcile.run(rt, clock.now_ms(), "reconcile-1")
        assert not [d for d in report["differences"] if d["kind"] == "position_size"], report
        assert Decimal(rt.ledger.state().positions[BTC]["amount"]) == held
        # A stop placed now covers what the step allows (0.24 or 0.2 of 0.248): reconcile
        # replaced it "for the whole position" by the same again, every run, for ever.
        position = rt.ledger.state().positions[BTC]
        ex = Executor(rt.ledger, rt.client, rt.clock, rt.config, "manual", rt.lock)
        ex.move_stop(position, Decimal(position["stop"]["price"]) + 1, at_once=True)
        stop = rt.ledger.state().positions[BTC]["stop"]
        for n in (2, 3):
            clock.advance(60_000)
            report = reconcile.run(rt, clock.now_ms(), f"reconcile-{n}")
            assert not [d for d in report["differences"] if d["kind"] == "stop_size"], report
        assert rt.ledger.state().positions[BTC]["stop"] == stop  # left resting
        # A stop that holds what an order can still trails (only one that holds more, placed
        # before the step grew, is kept where it is)
        clock.advance(60_000)
        assert ex.move_stop(rt.ledger.state().positions[BTC], Decimal(stop["price"]) + 2)
        assert rt.ledger.state().positions[BTC]["stop"]["price"] != stop["price"]
        stop = rt.ledger.state().positions[BTC]["stop"]
        # What the stop cannot hold is left to a human, named
        left = held - Decimal(step) * (held // Decimal(step))
        assert report["status"] == "needs_human"
        assert [d["detail"].split(" is ")[0] for d in report["differences"]
                if d["kind"] == "below_lot_step"] == [f"{left} of long {held}"]
    finally:
        rt.close()


def test_a_part_finer_than_the_lot_step_stays_behind_its_stop_else_goes_to_a_human(
        tmp_path, monkeypatch):
    """At step 0.1, an exit of 0.248 sells 0.2. It cancelled the stop first, so the 0.048
    left lay unprotected; a stop for it was then tried, refused unsent, at every scan and
    every reconcile (6 facts every 20 s, each run 'corrected'), and nobody was told."""
    rt, clock, fake, held = restarted_with_step(monkeypatch, tmp_path, "0.1")
    try:
        report = reconcile.run(rt, clock.now_ms(), "reconcile-1")
        # the stop placed before holds all of it, but an exit would leave 0.048 behind it,
        # for ever: the position would block BTC and outlive any halt
        assert report["status"] == "needs_human"
        assert [(d["kind"], d["severity"]) for d in report["differences"]] == \
            [("below_lot_step", "human")]
        assert "its stop holds it, but no order of the bot can sell it" in \
            report["differences"][0]["detail"]
        position = rt.ledger.state().positions[BTC]
        stop = position["stop"]
        ex = Executor(rt.ledger, rt.client, rt.clock, rt.config, "manual", rt.lock)
        assert not ex.close_position(position, "signal", clock.now_ms())
        left = rt.ledger.state().positions[BTC]
        assert (Decimal(left["amount"]), left["stop"]) == (held - Decimal("0.2"), stop)
        assert [o.client_order_id for o in rt.client.open_orders()] == [stop["client_order_id"]]
        # A trailing move would put a stop that holds nothing of it in place of that one
        clock.advance(60_000)
        assert not ex.move_stop(left, Decimal(stop["price"]) + 10)
        assert rt.ledger.state().positions[BTC]["stop"] == stop
        # Then the stop is cancelled on the exchange, outside the bot: nothing protects it
        rt.venue.cancel_order(stop["exchange_order_id"], BTC, params={"trigger": True})
        seq = rt.ledger.last_seq()
        decision = Fact("note", clock.now_ms(), reason="test: the exit decision")
        for n in range(3):
            clock.advance(10_000)
            scan.run(rt, clock.now_ms(), f"scan-{n + 2}")
            clock.advance(10_000)
            report = reconcile.run(rt, clock.now_ms(), f"reconcile-{n + 2}")
            assert report["status"] == "needs_human", report
            assert not ex.close_position(rt.ledger.state().positions[BTC], "signal",
                                         clock.now_ms(), before=[decision] if n == 0 else ())
        # the vanished stop recorded once; nothing sent, nothing refused
        assert [(f["type"], f["client_order_id"]) for f in order_facts_after(rt, seq)] == \
            [("order_update", stop["client_order_id"])]
        assert rt.ledger.state().positions[BTC]["stop"] is None
        assert [r["type"] for r in rt.ledger.select(
            "SELECT type FROM facts WHERE seq > ? AND type IN ('stop_cancelled', 'note')",
            (seq,))] == ["stop_cancelled", "note"]  # the decision recorded, once
        runs = rt.ledger.select("SELECT reason, data FROM facts WHERE seq > ? AND type = "
                                "'reconcile_run'", (seq,))
        assert [r["reason"] for r in runs] == ["needs_human"]  # recorded once: it stands
        # A run that cannot read the open orders cannot judge the stops: what stood stands
        # (it was dropped: that run said in_sync, exit 0, and the next needs_human again)
        read = rt.client.open_orders

        def unreadable(*args, **kwargs):
            raise ccxt.NetworkError("binanceusdm GET /fapi/v1/openAlgoOrders: timed out")

        monkeypatch.setattr(rt.client, "open_orders", unreadable)
        clock.advance(10_000)
        report = reconcile.run(rt, clock.now_ms(), "reconcile-unread")
        assert report["status"] == "needs_human", report
        assert [d["kind"] for d in report["differences"]] == ["stops", "below_lot_step"]
        monkeypatch.setattr(rt.client, "open_orders", read)
        assert [(d["kind"], d["severity"]) for d in json.loads(runs[-1]["data"])["differences"]] \
            == [("order_state", "fix"), ("below_lot_step", "human")]  # the stop's end; the rest
        detail = json.loads(runs[-1]["data"])["differences"][-1]["detail"]
        assert detail.startswith(f"{left['amount']} of long {left['amount']} is finer than "
                                 "the lot step 0.1: no stop protects it"), detail
        # The exchange's step comes back down: the position is protected again
        fake.step = "0.001"
        rt.close()
        rt = runtime.build(paper_config(tmp_path), tmp_path / "bot.db", clock=clock)
        report = reconcile.run(rt, clock.now_ms(), "reconcile-5")
        assert [(d["kind"], d["severity"]) for d in report["differences"]] == \
            [("missing_stop", "fix")], report
        assert rt.ledger.state().positions[BTC]["stop"] is not None
    finally:
        rt.close()


def test_a_stop_found_after_its_answer_was_lost_records_what_rests(tmp_path, monkeypatch):
    """Found resting after a lost answer, a stop was recorded at its intent's amount (the
    position's 0.248, not the 0.2 sent): taken for one placed before the step grew, it was
    never trailed."""
    rt, clock, _, _ = restarted_with_step(monkeypatch, tmp_path, "0.1")
    try:
        ex = Executor(rt.ledger, rt.client, rt.clock, rt.config, "manual", rt.lock)
        ex.cancel_stop(rt.ledger.state().positions[BTC], rt.ledger.state().positions[BTC]["stop"])
        position = rt.ledger.state().positions[BTC]
        sent = rt.client.submit

        def answer_lost(req, ref_price=None):
            result = sent(req, ref_price)  # it rests on the exchange
            return SubmitResult("unknown", result.request, None, reason="timeout")

        monkeypatch.setattr(rt.client, "submit", answer_lost)
        assert ex.place_stop(position, Decimal("90000")) is None
        monkeypatch.setattr(rt.client, "submit", sent)
        clock.advance(60_000)
        assert ex.protect(rt.ledger.state().positions[BTC], 2.0) is not None  # found
        stop = rt.ledger.state().positions[BTC]["stop"]
        assert ex.stop_amount(stop) == Decimal("0.2") == \
            {o.client_order_id: o.amount for o in rt.client.open_orders()}[stop["client_order_id"]]
        clock.advance(60_000)
        assert ex.move_stop(rt.ledger.state().positions[BTC], Decimal(stop["price"]) + 2)
    finally:
        rt.close()


def test_an_exit_that_keeps_the_stops_records_one_that_fired(tmp_path, monkeypatch):
    """Its stops kept (the position finer than the step), the exit no longer learnt from
    cancelling them that one had fired: it sold after the stop had closed the position."""
    rt, clock, fake, _ = restarted_with_step(monkeypatch, tmp_path, "0.1")
    try:
        position = rt.ledger.state().positions[BTC]
        minute = clock.now_ms() - clock.now_ms() % 60_000 + 60_000
        fake.wick_at = minute
        fake.wick_low = str(Decimal(position["stop"]["price"]) * Decimal("0.99"))
        clock.advance(3 * 60_000)
        ex = Executor(rt.ledger, rt.client, rt.clock, rt.config, "manual", rt.lock)
        assert ex.close_position(position, "signal", clock.now_ms())
        assert BTC not in rt.ledger.state().positions
        assert [r["reason"] for r in rt.ledger.select(
            "SELECT reason FROM facts WHERE type = 'position_closed'")] == ["stop_loss"]
        assert rt.ledger.select("SELECT seq FROM facts WHERE type = 'order_intent' AND "
                                "json_extract(data, '$.purpose') = 'exit'") == []
    finally:
        rt.close()


def test_an_exit_the_lot_step_refuses_keeps_the_stop(tmp_path, monkeypatch):
    """The whole position finer than the grown step (0.248 at step 1): the exit cancelled
    its stop, was refused unsent, and the stop put back was refused too: a position that
    rested behind a stop was left with none."""
    rt, clock, _, held = restarted_with_step(monkeypatch, tmp_path, "1")
    try:
        position = rt.ledger.state().positions[BTC]
        report = reconcile.run(rt, clock.now_ms(), "reconcile-1")
        assert report["status"] == "needs_human", report  # no exit can sell any of it
        assert "its stop holds it" in report["differences"][0]["detail"]
        seq = rt.ledger.last_seq()
        ex = Executor(rt.ledger, rt.client, rt.clock, rt.config, "manual", rt.lock)
        assert not ex.close_position(position, "signal", clock.now_ms())
        assert rt.ledger.last_seq() == seq  # nothing sent, nothing cancelled
        assert rt.ledger.state().positions[BTC] == position
        resting = [(o.client_order_id, o.amount) for o in rt.client.open_orders()]
        assert resting == [(position["stop"]["client_order_id"], held)]
    finally:
        rt.close()


@pytest.mark.parametrize("damage", ["deleted", "emptied", "not sqlite"])
def test_a_lost_account_file_under_open_positions_is_refused(tmp_path, public, monkeypatch,
                                                            damage):
    """Deleted or emptied, the state file gave a fresh account: the bot traded on it
    while the ledger (and reconcile, every few minutes) held the old position open. Not
    SQLite at all, it was a traceback and exit 1 (a restart every 10 s under systemd)."""
    from click.testing import CliRunner

    import cli
    from core.config import sim_state_path

    cfg = paper_config(tmp_path)
    db = tmp_path / "bot.db"
    rt = runtime.build(cfg, db, clock=VirtualClock(SERVER_NOW))
    try:
        rotate.run(rt, SERVER_NOW, "rotate-1")
        assert scan.run(rt, SERVER_NOW, "scan-1")["entries"] == 1
        facts = rt.ledger.last_seq()
    finally:
        rt.close()
    state = sim_state_path(cfg)
    kept = state.read_bytes()
    for leftover in state.parent.glob(state.name + "-*"):
        leftover.unlink()  # -wal, -shm: checkpointed into the file on close
    {"deleted": state.unlink, "emptied": lambda: state.write_bytes(b""),
     "not sqlite": lambda: state.write_bytes(b"\x13garbage" * 64)}[damage]()
    said = ("missing or empty, but the ledger holds 1 open position(s) (BTC/USDT:USDT) and "
            "1 open order(s)" if damage != "not sqlite" else "not a simulated exchange's state")
    with pytest.raises(ValueError, match=re.escape(said)):
        runtime.build(cfg, db, clock=VirtualClock(SERVER_NOW + 60_000)).close()
    (tmp_path / "bot.toml").write_text(
        '[bot]\nmode = "paper"\n[rotation]\ntop_n = 1\n[strategy]\nname = "sma_cross"\n'
        f'sma_fast = 2\nsma_slow = 3\ncandles = 30\n[sim]\nstate_path = "{tmp_path}/paper_exchange.db"\n')
    r = CliRunner().invoke(cli.main, ["--config", str(tmp_path / "bot.toml"), "--db", str(db),
                                      "reconcile", "--dry-run"])
    assert r.exit_code == 2 and said in r.output, r.output
    assert state.exists() == (damage != "deleted")  # no fresh file made
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT max(seq) FROM facts").fetchone()[0] == facts
    state.write_bytes(kept)  # restored: the account and its position are back
    rt = runtime.build(cfg, db, clock=VirtualClock(SERVER_NOW + 60_000))
    try:
        assert [p["symbol"] for p in rt.venue.fetch_positions()] == [BTC]
    finally:
        rt.close()


class LateMinuteBinance(WickingBinance):
    """1 m klines leaving out the minutes in ``late`` (they come later)."""

    def __init__(self) -> None:
        super().__init__()
        self.late: set[int] = set()

    def fetch(self, url, method="GET", headers=None, body_=None):
        rows = super().fetch(url, method, headers, body_)
        query = dict(parse_qsl(urlsplit(url).query))
        if urlsplit(url).path == "/fapi/v1/klines" and query.get("interval") == "1m":
            rows = [r for r in rows if r[0] not in self.late]
        return rows


@pytest.mark.parametrize("arrives", [True, False])
def test_paper_stops_wait_for_a_minute_left_out_of_the_middle(tmp_path, monkeypatch,
                                                               caplog, arrives):
    """A minute missing between two given ones was taken as quiet: the stop it wicked
    through never fired, and nothing was said. It is asked for again (and after
    MAX_UNSEEN_MS the minutes there are are matched, the missing one said and skipped)."""
    from core.sim_exchange import MAX_UNSEEN_MS

    late = LateMinuteBinance()
    rt, clock, stop, minute = entered(monkeypatch, tmp_path, late)
    try:
        wick = minute if arrives else minute + 120_000  # after the missing one
        late.wick_at, late.wick_low = wick, str(stop * Decimal("0.99"))
        late.late = {minute}
        clock.advance(4 * 60_000)
        assert {p.symbol for p in rt.client.positions()} == {BTC}  # waiting for it
        if arrives:
            late.late = set()  # it arrives: its wick fires the stop
            clock.advance(60_000)
        else:  # never: the minutes after it are matched, and the wick there fires it
            clock.advance(MAX_UNSEEN_MS + 60_000)
            rt.client.positions()
            clock.advance(60_000)
        assert rt.client.positions() == []
        [fill] = [f for f in rt.venue.fetch_my_trades(BTC) if f["side"] == "sell"]
        assert fill["timestamp"] // 60_000 * 60_000 == wick
        said = [r.getMessage() for r in caplog.records if "were checked on the minutes" in
                r.getMessage()]
        assert bool(said) != arrives
    finally:
        rt.close()
