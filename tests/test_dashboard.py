"""The dashboard's JSON endpoints and access rules, served for real over HTTP from a real
ledger written by the bot's own jobs (scan, rotate, reconcile, daily reset) against the
simulated exchange on a virtual clock: a short backtest, plus a manual halt and a position
closed behind the bot's back that reconciliation repairs."""

from __future__ import annotations

import http.client
import json
import sqlite3
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
import scheduler
from core import config as config_mod
from core import dashboard as dash
from core.clock import DAY_MS, VirtualClock, day_ms, iso
from core.runtime import build
from core.sim_exchange import SimExchange
from core.venues import quiet_open_orders
from jobs.runner import run_job
from ledger import Fact, Ledger, LedgerError

START = day_ms("2026-03-01")
STEP = 15 * 60_000  # one scan per 15 bot-minutes (three 5m candles)
STEPS = 2 * 96 + 40  # two days and ten hours
SCHEDULE = {"scan_interval_s": 900, "reconcile_interval_s": 3600, "rotate_interval_h": 3.0}


def bot_config() -> config_mod.Config:
    """A lively bot: a few synthetic coins, an easy-going momentum strategy."""
    return config_mod.load(environ={}).with_values(
        sim={"symbols": 4, "seed": 7}, rotation={"top_n": 3}, schedule=SCHEDULE,
        strategy={"min_body_pct": 0.2, "long_volume_ratio": 1.0, "short_volume_ratio": 1.0,
                  "choppiness_max": 100.0},
        risk={"max_open_positions": 3})


def build_ledger(path: Path) -> dict:
    """Run the real jobs over ~2.4 simulated days; return what a test needs to know."""
    cfg = bot_config()
    clock = VirtualClock(START)
    venue = SimExchange.from_config(cfg, clock)
    quiet_open_orders(venue)
    rt = build(cfg, path, clock=clock, venue=venue)
    jobs = scheduler.JOBS
    info = {"end": None, "external_close": None}
    try:
        rt.ledger.append([Fact("service", clock.now_ms(), data={
            "event": "started", "pid": 1, "mode": "sim", "exchange": cfg.exchange.id})])
        for name in ("reconcile", "daily_reset", "rotate"):
            run_job(rt, name, jobs[name])
        for i in range(1, STEPS + 1):
            clock.advance(STEP)
            venue.step_to(clock.now_ms())
            now = clock.now_ms()
            if now % DAY_MS < STEP:
                run_job(rt, "daily_reset", jobs["daily_reset"], now - now % DAY_MS)
            if i % 12 == 0:
                run_job(rt, "rotate", jobs["rotate"], now)
            run_job(rt, "scan", jobs["scan"], now)
            if i == 100:  # an operator halts, and lifts it an hour later (as cli.py does)
                rt.ledger.append([Fact("halt", now, reason="manual halt: checking a coin",
                                       data={"kind": "manual", "detail": "checking a coin"})])
            if i == 104:
                rt.ledger.append([Fact("resume", now, reason="resume all",
                                       data={"kind": "all"})])
            if i == 150 and info["external_close"] is None:
                # Someone closes a position on the exchange by hand: reconcile must notice.
                state = rt.ledger.state()
                if state.positions:
                    p = next(iter(state.positions.values()))
                    venue.create_order(p["symbol"], "market",
                                       "sell" if p["side"] == "long" else "buy",
                                       p["amount"], params={"reduceOnly": True})
                    info["external_close"] = p["position_id"]
            if i % 4 == 0:
                run_job(rt, "reconcile", jobs["reconcile"], now)
        info["end"] = clock.now_ms()
        state = rt.ledger.state()
        info["open"] = sorted(p["position_id"] for p in state.positions.values())
    finally:
        rt.close()
    return info


def shared_backtest(tmp_path_factory) -> dict:
    """The backtest ledger, built once per test session (the browser tests read it too;
    nobody writes to it after it is built)."""
    folder = tmp_path_factory.getbasetemp() / "dashboard-backtest"
    done = folder / "info.json"
    if not done.exists():
        folder.mkdir(exist_ok=True)
        done.write_text(json.dumps(build_ledger(folder / "backtest.db")))
    return {"path": folder / "backtest.db", **json.loads(done.read_text())}


@pytest.fixture(scope="module")
def backtest(tmp_path_factory):
    info = shared_backtest(tmp_path_factory)
    path = info["path"]
    with Ledger(path, readonly=True) as ledger:
        counts = {r["type"]: r["n"] for r in ledger.select(
            "SELECT type, count(*) AS n FROM facts GROUP BY type")}
    # The scenario the tests rely on really happened.
    assert counts.get("position_closed", 0) >= 3, counts
    assert info["open"], "no position left open at the end"
    assert counts.get("reconcile_run", 0) >= 1, counts
    assert info["external_close"], "no position to close behind the bot's back"
    return {"counts": counts, **info}


@contextmanager
def serving(path: Path, now_ms: int, token: str = "", host: str = "127.0.0.1",
            config: config_mod.Config | None = None):
    """A real server on an ephemeral port, its clock frozen at ``now_ms``."""
    clock = VirtualClock(now_ms)
    board = dash.Dashboard.open(path, config or bot_config(), clock)
    server = dash.make_server(board, host, 0, token)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server, clock
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def get(server, path: str, headers: dict | None = None, method: str = "GET"):
    """(status, headers, body bytes) of one request."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def get_json(server, path: str, **kw):
    status, headers, body = get(server, path, **kw)
    assert headers["Content-Type"] == "application/json", (status, body[:200])
    return status, json.loads(body)


# -- the endpoints -----------------------------------------------------------------------


def test_summary_positions_and_trades_match_the_ledger(backtest):
    with serving(backtest["path"], backtest["end"] + 60_000) as (server, _):
        status, data = get_json(server, "/api/dashboard")
    assert status == 200
    s = data["summary"]
    with Ledger(backtest["path"], readonly=True) as ledger:
        state = ledger.state()
        closed = ledger.select("SELECT * FROM closed_trades ORDER BY closed_seq DESC")
        marks = {p: ledger.select("SELECT price FROM facts WHERE type = 'signal' AND "
                                  "symbol = ? ORDER BY seq DESC LIMIT 1", (p,))[0]["price"]
                 for p in state.positions}
    assert not s["empty"] and s["mode"] == "sim" and s["exchange"] == "binanceusdm"
    assert s["last_seq"] == state.seq and s["ledger"] == "backtest.db"
    assert s["equity"] == state.equity and s["equity_peak"] == state.equity_peak
    assert s["halted"] is False and s["halts"] == []  # the manual halt was lifted
    assert s["open_positions"] == len(state.positions) == len(data["positions"])
    assert s["max_drawdown_pct"] == 15.0 and s["daily_loss_limit_pct"] == 5.0
    peak, eq = Decimal(state.equity_peak), Decimal(state.equity)
    assert s["drawdown_pct"] == pytest.approx(float((peak - eq) / peak * 100), abs=1e-4)
    assert Decimal(s["daily_loss_limit"]) == pytest.approx(
        -Decimal(state.day_start_equity) * 5 / 100, abs=Decimal("1e-8"))

    by_id = {p["position_id"]: p for p in data["positions"]}
    assert sorted(by_id) == backtest["open"]
    for symbol, p in state.positions.items():
        shown = by_id[p["position_id"]]
        assert shown["symbol"] == symbol and shown["side"] == p["side"]
        assert shown["amount"] == p["amount"] and shown["entry_price"] == p["entry_price"]
        assert shown["mark_price"] == marks[symbol]
        sign = 1 if p["side"] == "long" else -1
        expect = sign * (Decimal(marks[symbol]) - Decimal(p["entry_price"])) * Decimal(p["amount"])
        assert Decimal(shown["unrealized_pnl"]) == pytest.approx(expect, abs=Decimal("1e-8"))
        assert shown["stop_price"] == (p["stop"] or {}).get("price")
        assert shown["trailing_active"] == p["trailing_active"]

    assert [t["position_id"] for t in data["trades"]] == \
        [t["position_id"] for t in closed[:dash.PAGE_TRADES]]
    assert all(t["exit_reason"] for t in data["trades"])
    assert {t["exit_reason"] for t in closed} & {"stop_loss", "trailing_stop"}


def test_a_day_without_a_closed_trade_is_a_daily_bar_too(tmp_path):
    # As the daily_pnl view lists it: its closing equity shows what the day did.
    day, t0 = 86_400_000, 1_772_326_800_000  # 2026-03-01T01:00Z
    path = tmp_path / "bot.db"
    with Ledger(path) as ledger:
        ledger.append([Fact("day_close", t0 + day, data={"day": "2026-03-01", "equity": "990"}),
                       Fact("day_close", t0 + 2 * day, data={"day": "2026-03-02",
                                                            "equity": "980"})])
        view = ledger.select("SELECT * FROM daily_pnl ORDER BY day")
    with serving(path, t0 + 2 * day) as (server, _):
        _, daily = get_json(server, "/api/daily")
    assert [(d["day"], d["trades"], d["closing_equity"]) for d in daily] == \
        [(v["day"], v["trades"], v["closing_equity"]) for v in view] == \
        [("2026-03-01", 0, "990"), ("2026-03-02", 0, "980")]


def test_a_close_recorded_after_midnight_is_a_bar_of_the_day_it_closed(tmp_path):
    # A stop fired at 23:50 while the bot was down, recorded at the 00:10 restart.
    day, t0 = 86_400_000, 1_772_326_800_000  # 2026-03-01T01:00Z
    fired, restart = t0 + day - 4_200_000, t0 + day - 3_600_000 + 600_000
    path = tmp_path / "bot.db"
    with Ledger(path) as ledger:
        ledger.append([
            Fact("position_opened", t0, symbol="AAA/USDT:USDT", side="long", amount="1",
                 price="100", position_id="p1"),
            Fact("position_closed", restart, symbol="AAA/USDT:USDT", side="long",
                 amount="1", price="95", fee="0.2", pnl="-5.2", position_id="p1",
                 data={"closed_ts": fired, "day": "2026-03-01"})])
        view = ledger.select("SELECT * FROM daily_pnl ORDER BY day")
    with serving(path, restart) as (server, _):
        _, daily = get_json(server, "/api/daily")
    assert [(d["day"], d["trades"], float(d["realized_pnl"])) for d in daily] == \
        [(v["day"], v["trades"], v["realized_pnl"]) for v in view] == \
        [("2026-03-01", 1, -5.2)]


def test_equity_curve_and_daily_bars(backtest):
    with serving(backtest["path"], backtest["end"]) as (server, _):
        _, equity = get_json(server, "/api/equity")
        _, again = get_json(server, "/api/equity")  # read incrementally: same answer
        _, daily = get_json(server, "/api/daily")
    assert equity == again
    assert equity["total_points"] == backtest["counts"]["balance"]
    ts = [p[0] for p in equity["points"]]
    assert ts == sorted(ts) and len(ts) == equity["total_points"]  # few enough: not thinned
    with Ledger(backtest["path"], readonly=True) as ledger:
        # The drawdown reference: restarted by the resume after the manual halt.
        assert equity["peak"] == float(ledger.state().equity_peak)
    days = [d["day"] for d in daily]
    assert days == sorted(days) and days[0] == "2026-03-01" and len(days) >= 2
    assert sum(d["trades"] for d in daily) == backtest["counts"]["position_closed"]
    # Kept incrementally, equal to what the daily_pnl view computes from scratch.
    with Ledger(backtest["path"], readonly=True) as ledger:
        view = ledger.select("SELECT * FROM daily_pnl ORDER BY day")
    assert [d["day"] for d in view] == days
    for mine, theirs in zip(daily, view, strict=True):
        assert (mine["trades"], mine["wins"]) == (theirs["trades"], theirs["wins"])
        assert float(mine["realized_pnl"]) == pytest.approx(theirs["realized_pnl"], abs=1e-8)
        assert float(mine["fees"]) == pytest.approx(theirs["fees"], abs=1e-8)
        assert mine["closing_equity"] == theirs["closing_equity"]


def test_thin_keeps_the_ends_and_bounds_the_points():
    points = [(i * 1000, float(i % 97)) for i in range(20_000)]
    out = dash.thin(points, 500)
    assert out[0] == points[0] and out[-1] == points[-1]
    assert 400 <= len(out) <= 502
    assert [p[0] for p in out] == sorted(p[0] for p in out)
    assert dash.thin(points[:10], 500) == points[:10]


def test_jobs_and_health_flip_to_503_when_a_job_is_stale(backtest):
    end = backtest["end"]
    with serving(backtest["path"], end + 60_000) as (server, clock):
        status, health = get_json(server, "/health")
        assert status == 200, health
        assert health["ok"] is True and health["stale"] == []
        assert set(health["jobs"]) == {"scan", "rotate", "reconcile", "daily_reset"}
        _, jobs = get_json(server, "/api/jobs")
        scan = next(j for j in jobs if j["job"] == "scan")
        assert scan["outcome"] == "ok" and scan["interval_s"] == 900
        assert scan["status"] == "ok" and not scan["stale"]

        # Past its 15 min interval the scan is late, within the grace (90 s) not stale...
        last_scan, grace = scan["last_run"], dash.grace_ms(900_000)
        assert grace == 90_000
        clock.set(last_scan + 900_000 + grace)
        status, health = get_json(server, "/health")
        assert status == 200 and health["jobs"]["scan"]["status"] == "late"
        # ...and stale once the grace is used up.
        clock.set(last_scan + 900_000 + grace + 1)
        status, health = get_json(server, "/health")
        assert status == 503
        assert health["ok"] is False and "scan" in health["stale"]
        _, jobs = get_json(server, "/api/jobs")
        assert next(j for j in jobs if j["job"] == "scan")["stale"] is True
        # HEAD answers the same status without a body (uptime checkers use it).
        status, _, body = get(server, "/health", method="HEAD")
        assert status == 503 and body == b""


def test_job_health_is_pure_and_ignores_runs_that_never_started():
    intervals = {"scan": 10_000, "daily_reset": DAY_MS}
    runs = {"scan": {"ts": 1_000_000, "outcome": "error", "duration_ms": 5.0,
                     "scheduled_ms": 990_000, "started_ms": 991_000, "error": "boom"}}
    rows = {r["job"]: r for r in dash.job_health(runs, intervals, 1_000_000 + 10_000 + 60_000)}
    assert rows["scan"]["status"] == "late" and not rows["scan"]["stale"]
    assert rows["scan"]["start_delay_s"] == 1.0 and rows["scan"]["error"] == "boom"
    assert rows["daily_reset"]["status"] == "never ran" and rows["daily_reset"]["stale"]
    rows = {r["job"]: r for r in dash.job_health(runs, intervals, 1_000_000 + 10_000 + 60_001)}
    assert rows["scan"]["stale"]


def test_job_health_calls_a_job_failing_once_it_failed_for_its_interval_and_grace():
    intervals = {"scan": 10_000}
    runs = {"scan": {"ts": 1_070_000, "outcome": "error", "failing_since": 1_000_000}}
    due = 1_000_000 + 10_000 + dash.grace_ms(10_000)
    [row] = dash.job_health(runs, intervals, due)
    assert (row["status"], row["failing"], row["stale"]) == ("ok", False, False)
    [row] = dash.job_health(runs, intervals, due + 1)
    assert (row["status"], row["failing"], row["stale"]) == ("failing", True, False)
    assert row["failing_since"] == "1970-01-01T00:16:40.000Z"


def job_run(ts: int, outcome: str, error: str | None = None, job: str = "scan",
            started: bool = True) -> Fact:
    return Fact("job_run", ts, reason=error, data={
        "job": job, "scheduled_ms": ts, "started_ms": ts if started else None,
        "duration_ms": 3, "outcome": outcome})


def failing_scans(path: Path, t: int) -> config_mod.Config:
    """A ledger whose scan (every 10 s) ran well at ``t``, then failed at every run to
    t + 90 s: for 80 s, over its interval and 60 s grace, each run so slow that the one
    after it was skipped (never started). The other jobs ran at ``t``."""
    with Ledger(path) as ledger:
        ledger.append([job_run(t, "ok", job=job) for job in scheduler.JOBS]
                      + [f for k in range(1, 10) for f in (
                          job_run(t + k * 10_000, "error", "NetworkError: balance unavailable"),
                          job_run(t + k * 10_000 + 5_000, "skipped", "still running",
                                  started=False))][:-1])
    return config_mod.from_mapping({"schedule": {"scan_interval_s": 10}})


def test_health_answers_503_while_every_run_of_a_job_fails(tmp_path):
    # Not stale (it runs), but failing: it cannot read the balance, so it trades nothing.
    # One good run makes it healthy again.
    path, t = tmp_path / "bot.db", START
    config = failing_scans(path, t)
    with serving(path, t + 90_000, config=config) as (server, clock):
        status, health = get_json(server, "/health")
        assert status == 503, health
        assert health["failing"] == ["scan"] and health["stale"] == []
        assert health["jobs"]["scan"]["status"] == "failing"
        assert health["jobs"]["scan"]["failing_since"] == iso(t + 10_000)
        _, jobs = get_json(server, "/api/jobs")
        scan = next(j for j in jobs if j["job"] == "scan")
        assert scan["failing"] and "balance unavailable" in scan["error"]
        with Ledger(path) as ledger:
            ledger.append([job_run(t + 100_000, "ok")])
        clock.set(t + 100_000)
        status, health = get_json(server, "/health")
    assert status == 200 and health["failing"] == [], health


def test_a_missed_run_is_not_a_sign_of_life(tmp_path):
    path = tmp_path / "bot.db"
    t = START
    with Ledger(path) as ledger:
        ledger.append([Fact("job_run", t, run_id=f"scan-{t}", data={
            "job": "scan", "scheduled_ms": t, "started_ms": t, "finished_ms": t + 5,
            "duration_ms": 5, "outcome": "ok"})])
        ledger.append([Fact("job_run", t + 3_600_000, run_id="scan-x",
                            reason="started too late (misfire grace exceeded)", data={
                                "job": "scan", "scheduled_ms": t + 3_600_000,
                                "started_ms": None, "finished_ms": None, "duration_ms": 0,
                                "outcome": "missed"})])
    with serving(path, t + 3_600_000) as (server, _):
        _, jobs = get_json(server, "/api/jobs")
    scan = next(j for j in jobs if j["job"] == "scan")
    assert scan["last_run"] == t and scan["stale"]
    assert scan["outcome"] == "ok" and scan["latest_outcome"] == "missed"


def test_risk_events_and_reconciliation_differences(backtest):
    with serving(backtest["path"], backtest["end"]) as (server, _):
        _, risk = get_json(server, "/api/risk?limit=500")
        _, recs = get_json(server, "/api/reconciliations?limit=500")
        status, bad = get_json(server, "/api/risk?limit=lots")
    assert status == 400 and "limit" in bad["error"]
    seqs = [r["seq"] for r in risk]
    assert seqs == sorted(seqs, reverse=True)
    kinds = {r["type"] for r in risk}
    assert {"halt", "resume"} <= kinds
    assert any(r["reason"] == "manual halt: checking a coin" for r in risk)
    diffs = [d for r in recs for d in r["differences"]]
    assert any(r["status"] == "corrected" for r in recs), recs
    assert any(d["kind"] == "position_gone" and d["correction"] for d in diffs), diffs


def test_position_story_holds_every_row_in_order(backtest):
    with Ledger(backtest["path"], readonly=True) as ledger:
        trade = ledger.select("SELECT * FROM closed_trades ORDER BY closed_seq LIMIT 1")[0]
        pid = trade["position_id"]
        own = [r["seq"] for r in ledger.select(
            "SELECT seq FROM facts WHERE position_id = ? ORDER BY seq", (pid,))]
        entry = ledger.select("SELECT * FROM facts WHERE type = 'order_intent' AND "
                              "client_order_id = ?", (pid,))[0]
    with serving(backtest["path"], backtest["end"]) as (server, _):
        status, story = get_json(server, f"/api/position/{pid}")
        page_status, headers, page = get(server, f"/position/{pid}")
    assert status == 200 and page_status == 200
    assert headers["Content-Type"].startswith("text/html") and b"Story" in page
    rows = story["rows"]
    seqs = [r["seq"] for r in rows]
    assert seqs == sorted(seqs) and set(own) <= set(seqs)
    types = [r["type"] for r in rows]
    # The decision that led to it, recorded in the entry's run just before its intent.
    first_intent = types.index("order_intent")
    before = rows[:first_intent]
    assert [r["type"] for r in before][-2:] == ["signal", "risk_decision"]
    assert all(r["run_id"] == entry["run_id"] and r["symbol"] == trade["symbol"]
               for r in before[-2:])
    assert before[-1]["data"]["approved"] is True
    for kind in ("order_submitted", "order_update", "fill", "position_opened",
                 "stop_placed", "position_closed"):
        assert kind in types, (kind, types)
    assert types.index("position_opened") < types.index("position_closed")
    assert story["position"]["status"] == "closed"
    assert story["position"]["exit_reason"] == trade["exit_reason"]


def test_open_position_story(backtest):
    pid = backtest["open"][0]
    with serving(backtest["path"], backtest["end"]) as (server, _):
        status, story = get_json(server, f"/api/position/{pid}")
    assert status == 200 and story["position"]["status"] == "open"
    assert "position_closed" not in [r["type"] for r in story["rows"]]


def test_unknown_position_is_a_404_page_not_a_traceback(backtest):
    with serving(backtest["path"], backtest["end"]) as (server, _):
        status, headers, body = get(server, "/position/no-such-thing%3Cscript%3E")
        api_status, api = get_json(server, "/api/position/no-such-thing")
        other, _, _ = get(server, "/nothing/here")
        escape, _, _ = get(server, "/static/../../cli.py")
    assert status == 404 and headers["Content-Type"].startswith("text/html")
    assert b"No such position" in body and b"<script>" not in body
    assert b"Traceback" not in body
    assert api_status == 404 and "no position" in api["error"]
    assert other == 404 and escape == 404


def test_empty_ledger_says_nothing_yet(tmp_path):
    path = tmp_path / "new.db"
    Ledger(path).close()  # created by the bot, nothing recorded yet
    with serving(path, START) as (server, _):
        status, data = get_json(server, "/api/dashboard")
        health_status, health = get_json(server, "/health")
        page_status, _, page = get(server, "/")
    assert status == 200 and data["summary"]["empty"] is True
    assert data["positions"] == [] and data["trades"] == [] and data["daily"] == []
    assert data["equity"]["points"] == []
    assert health_status == 503 and "empty" in health["detail"]
    assert page_status == 200 and b"dashboard.js" in page


def test_backtest_ledger_is_judged_at_its_own_end(tmp_path):
    path = tmp_path / "bt.db"
    t = START
    with Ledger(path) as ledger:
        ledger.append([Fact("service", t, data={"event": "started", "mode": "backtest"}),
                       Fact("job_run", t + 5, run_id=f"scan-{t}", data={
                           "job": "scan", "scheduled_ms": t, "started_ms": t,
                           "finished_ms": t + 5, "duration_ms": 5, "outcome": "ok"})])
    # The wall clock is years later; the backtest's "now" is just before its last fact
    # (its last candle's day, as `status` judges it).
    with serving(path, t + 400 * DAY_MS) as (server, _):
        _, summary = get_json(server, "/api/summary")
        _, jobs = get_json(server, "/api/jobs")
    assert summary["mode"] == "backtest" and summary["now"] == t + 4
    assert next(j for j in jobs if j["job"] == "scan")["status"] == "ok"


# -- read-only by construction, and access -------------------------------------------------


def test_writes_are_impossible_through_the_dashboard(backtest):
    with serving(backtest["path"], backtest["end"]) as (server, _):
        board = server.dashboard
        assert board.ledger.readonly
        before = board.ledger.last_seq()
        with pytest.raises(LedgerError, match="read-only"):
            board.ledger.append([Fact("note", START, reason="should not be written")])
        # The very connection the dashboard reads through refuses to write, even raw SQL.
        conn = board.ledger._conn()
        with pytest.raises(sqlite3.OperationalError, match="readonly|read-only|query_only"):
            conn.execute("INSERT INTO facts (seq, ts, type, data, hash) "
                         "VALUES (?, 0, 'note', '{}', x'00')", (before + 1,))
        with pytest.raises(sqlite3.OperationalError):
            conn.execute("CREATE TABLE sneaky (x)")
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            status, headers, _ = get(server, "/api/dashboard", method=method)
            assert status == 405 and headers["Allow"] == "GET, HEAD"
        assert board.ledger.last_seq() == before
        with pytest.raises(dash.DashboardError):
            dash.Dashboard(Ledger(backtest["path"]), bot_config())


def test_the_service_keeps_writing_while_the_dashboard_reads(tmp_path):
    path = tmp_path / "live.db"
    closed = dict(symbol="BTC/USDT:USDT", side="long", amount="1", price="101", fee="0.1",
                  position_id="p1", reason="take_profit")
    with Ledger(path) as writer:
        writer.append([Fact("balance", START, data={"currency": "USDT", "equity": "100"})])
        with serving(path, START) as (server, _):
            _, first = get_json(server, "/api/dashboard")
            writer.append([
                Fact("position_opened", START + 500, symbol="BTC/USDT:USDT", side="long",
                     amount="1", price="100", position_id="p1"),
                Fact("position_closed", START + 900, pnl="0.9", **closed),
                Fact("balance", START + 1000, data={"currency": "USDT", "equity": "101.5"}),
                Fact("halt", START + 1100, reason="manual", data={"kind": "manual"})])
            _, second = get_json(server, "/api/dashboard")
    assert first["equity"]["points"] == [[START, 100.0]]
    assert first["trades"] == [] and first["daily"] == [] and first["risk_events"] == []
    assert second["equity"]["points"] == [[START, 100.0], [START + 1000, 101.5]]
    assert [t["position_id"] for t in second["trades"]] == ["p1"]
    assert second["daily"][0]["realized_pnl"] == "0.9" and second["daily"][0]["trades"] == 1
    assert [e["type"] for e in second["risk_events"]] == ["halt"]
    assert second["summary"]["halted"] is True


def test_token_is_required_on_every_request_when_set(backtest):
    token = "t0k3n-for-tests"
    with serving(backtest["path"], backtest["end"], token=token, host="127.0.0.1") \
            as (server, _):
        assert get(server, "/api/summary")[0] == 401
        assert get(server, "/health")[0] == 401
        assert get(server, "/")[0] == 401
        assert get(server, "/api/summary", {"Authorization": "Bearer wrong"})[0] == 401
        assert get(server, "/api/summary", {"Authorization": f"Bearer {token}"})[0] == 200
        assert get(server, "/api/summary", {"X-Dashboard-Token": token})[0] == 200
        assert get(server, f"/health?token={token}")[0] in (200, 503)
        # A page visit with ?token= moves the token into a cookie and out of the address bar.
        status, headers, _ = get(server, f"/?token={token}")
        assert status == 303 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"].split(";")[0]
        assert "HttpOnly" in headers["Set-Cookie"]
        assert get(server, "/", {"Cookie": cookie})[0] == 200
        assert get(server, "/api/dashboard", {"Cookie": cookie})[0] == 200


def test_without_a_token_only_localhost_names_are_served(backtest):
    with serving(backtest["path"], backtest["end"]) as (server, _):
        assert get(server, "/api/summary", {"Host": "evil.example:8050"})[0] == 403
        assert get(server, "/api/summary", {"Host": "localhost:9999"})[0] == 200


def test_binding_beyond_localhost_needs_a_token():
    for host in ("0.0.0.0", "192.168.1.20", "::", "example.org"):
        with pytest.raises(dash.DashboardError, match="BOT_DASHBOARD_TOKEN"):
            dash.check_bind(host, "")
        dash.check_bind(host, "secret")
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.53"):
        dash.check_bind(host, "")


# -- the command ---------------------------------------------------------------------------


def test_cli_refuses_missing_foreign_and_exposed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BOT_DASHBOARD_TOKEN", raising=False)
    runner = CliRunner()
    missing = runner.invoke(cli.main, ["--db", "nope.db", "dashboard"])
    assert missing.exit_code == 2 and "no ledger here" in missing.output
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    result = runner.invoke(cli.main, ["--db", str(foreign), "dashboard"])
    assert result.exit_code == 2 and "not a ledger of this bot" in result.output
    Ledger(tmp_path / "bot.db").close()
    exposed = runner.invoke(cli.main, ["dashboard", "--host", "0.0.0.0"])
    assert exposed.exit_code == 2 and "BOT_DASHBOARD_TOKEN" in exposed.output


def test_cli_serves_until_stopped(tmp_path, monkeypatch):
    """`cli.py dashboard` prints where it listens and what access needs, then serves."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BOT_DASHBOARD_TOKEN", "cli-token-123")
    Ledger(tmp_path / "bot.db").close()
    lines, servers = [], []
    real_make = dash.make_server

    def capture(*args, **kw):
        server = real_make(*args, **kw)
        servers.append(server)
        return server

    monkeypatch.setattr(dash, "make_server", capture)
    thread = threading.Thread(target=dash.serve, args=(
        config_mod.load(), "bot.db", "0.0.0.0", 0), kwargs={"echo": lines.append}, daemon=True)
    thread.start()
    for _ in range(200):
        if servers and len(lines) >= 2:
            break
        threading.Event().wait(0.02)
    server = servers[0]
    port = server.server_address[1]
    try:
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/summary", timeout=5)
        assert denied.value.code == 401
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/summary",
                                     headers={"Authorization": "Bearer cli-token-123"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert json.loads(resp.read())["empty"] is True
    finally:
        server.shutdown()
        thread.join(5)
    text = "\n".join(lines)
    assert "read-only" in text and "token" in text and "cli-token-123" not in text
    assert lines[-1] == "dashboard stopped"


# -- second audit: hostile and odd clients ---------------------------------------------------


def slow_clients(server, n: int, stop: threading.Event) -> list:
    """n connections sending their headers one line every 0.3 s, never finishing."""
    import socket
    import time

    def drip(sock):
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
            while not stop.is_set():
                sock.sendall(b"X-a: b\r\n")
                time.sleep(0.3)
        except OSError:
            pass  # cut off by the server: what it should do

    socks = [socket.create_connection(server.server_address[:2]) for _ in range(n)]
    for sock in socks:
        threading.Thread(target=drip, args=(sock,), daemon=True).start()
    return socks


def test_clients_sending_headers_slowly_cannot_hold_the_workers(backtest, monkeypatch):
    # Before any token is checked: each must send its request within HEAD_DEADLINE_S.
    import time

    monkeypatch.setattr(dash, "HEAD_DEADLINE_S", 1.0)
    stop = threading.Event()
    with serving(backtest["path"], backtest["end"]) as (server, _):
        socks = slow_clients(server, dash.WORKERS + 2, stop)
        try:
            time.sleep(0.5)
            assert get(server, "/api/summary")[0] == 200  # answered (get waits 10 s at most)
        finally:
            stop.set()
            for sock in socks:
                sock.close()


def test_the_server_stops_promptly_with_a_slow_client_connected(backtest, monkeypatch):
    import time

    monkeypatch.setattr(dash, "HEAD_DEADLINE_S", 1.0)
    stop = threading.Event()
    board = dash.Dashboard.open(backtest["path"], bot_config(), VirtualClock(backtest["end"]))
    server = dash.make_server(board, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    socks = slow_clients(server, 1, stop)
    time.sleep(0.3)
    server.shutdown()
    closer = threading.Thread(target=server.server_close, daemon=True)
    closer.start()
    closer.join(20)  # the client keeps dripping all along: it must be cut off, not waited for
    stopped = not closer.is_alive()
    stop.set()
    socks[0].close()
    assert stopped


def test_token_cookie_is_found_beside_cookies_other_apps_set(backtest):
    token = "t0k3n-for-tests"
    with serving(backtest["path"], backtest["end"], token=token) as (server, _):
        for header in (f'ui_prefs={{"theme":"dark"}}; dashboard_token={token}',
                       f"other=a b; dashboard_token={token}", f"flag; dashboard_token={token}",
                       f"dashboard_token={token}; other=a b"):
            assert get(server, "/api/summary", {"Cookie": header})[0] == 200, header
        assert get(server, "/api/summary", {"Cookie": "dashboard_token=nope"})[0] == 401
        # The token's redirect keeps the path's encoding as it was, not encoded twice.
        status, headers, _ = get(server, f"/position/P1%22%3E?token={token}")
        assert status == 303 and headers["Location"] == "/position/P1%22%3E"


def test_a_blank_token_is_no_token():
    with pytest.raises(dash.DashboardError, match="BOT_DASHBOARD_TOKEN"):
        dash.check_bind("0.0.0.0", "   ")


def test_odd_limits_and_host_headers_are_refused_without_a_traceback(backtest, caplog):
    with serving(backtest["path"], backtest["end"]) as (server, _):
        for limit in ("%C2%B2", "9" * 5000, "-1", "0"):
            status, body = get_json(server, f"/api/trades?limit={limit}")
            assert status == 400 and "limit" in body["error"]
        assert get(server, "/api/summary", {"Host": "[::1"})[0] == 403
        assert get(server, "/api/summary")[0] == 200  # still up
    assert "Traceback" not in caplog.text


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "data" / "ohlcv"
                         ).is_dir(), reason="needs ../shared/data/ohlcv")
def test_a_real_backtests_ledger_is_judged_at_its_own_end(tmp_path):
    from core.backtest import run_backtest
    from core.sim_market import CsvMarket

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "ohlcv"
    path = tmp_path / "bt.db"
    run_backtest(config_mod.Config(), CsvMarket(data), path, start_ms=day_ms("2018-01-20"),
                 end_ms=day_ms("2018-01-21"))
    with Ledger(path, readonly=True) as ledger:
        last = ledger.select("SELECT max(ts) AS ts FROM facts")[0]["ts"]
    with serving(path, last + 400 * DAY_MS) as (server, _):
        _, summary = get_json(server, "/api/summary")
    assert summary["mode"] == "backtest" and summary["now"] == last - 1  # the 20th's end


def test_the_mode_shown_is_the_ledgers_as_status_shows_it(tmp_path):
    """Only service facts were read: a ledger one-off sim jobs wrote showed the config's
    mode (paper) on the dashboard, and sim in `status`."""
    path = tmp_path / "bot.db"
    with Ledger(path) as ledger:
        ledger.append([Fact("job_run", 1_000, data={"job": "rotate", "outcome": "ok",
                                                     "mode": "sim"})])
    paper = bot_config().with_values(bot={"mode": "paper"})
    board = dash.Dashboard.open(path, paper, VirtualClock(2_000))
    try:
        assert board.context()["mode"] == "sim"
    finally:
        board.ledger.close()
    status = CliRunner().invoke(cli.main, ["--db", str(path), "status", "--json"])
    assert json.loads(status.output)["mode"] == "sim"
