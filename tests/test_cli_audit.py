"""The audit CLI (cli.py) over real ledger files: status, positions, trades, pnl, orders,
events, verify, query, export, config show. Read commands never write, refuse what is
not our ledger, and work while another process appends."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
from core.clock import WallClock, day_ms, iso
from ledger import Fact, Ledger, LedgerError, schema

ROOT = Path(__file__).resolve().parent.parent

BTC, ETH, SOL = "BTC/USDT:USDT", "ETH/USDT:USDT", "SOL/USDT:USDT"
D1 = day_ms("2025-03-01")  # a UTC midnight
D2 = day_ms("2025-03-02")
S, M, H = 1000, 60_000, 3_600_000

KEY = "AKIAexampleKEY-7f3a9"
SECRET = "s3cr3t-VALUE-q8z1x"
ENV = {"BOT_API_KEY": KEY, "BOT_API_SECRET": SECRET}


# -- building ledgers -------------------------------------------------------------------


def job_run(ts: int, job: str, outcome: str = "ok", duration_ms: int = 20,
            error: str | None = None) -> Fact:
    return Fact("job_run", ts + duration_ms, reason=error, run_id=f"{job}-{ts}",
                data={"job": job, "outcome": outcome, "duration_ms": duration_ms,
                      "scheduled_ms": ts, "started_ms": ts + 2,
                      "finished_ms": ts + duration_ms})


def market_order(ts: int, symbol: str, side: str, amount: str, price: str, fee: str,
                 cid: str, oid: str, purpose: str, position_id: str) -> list[Fact]:
    """Intent, submission, acknowledgement and fill of one market order, as the bot
    records them."""
    return [
        Fact("order_intent", ts, symbol=symbol, side=side, amount=amount, client_order_id=cid,
             position_id=position_id,
             data={"purpose": purpose, "type": "market", "reduce_only": purpose == "exit"}),
        Fact("order_submitted", ts + 5, client_order_id=cid),
        Fact("order_update", ts + 40, client_order_id=cid, exchange_order_id=oid,
             data={"state": "filled"}),
        Fact("fill", ts + 41, symbol=symbol, side=side, amount=amount, price=price, fee=fee,
             client_order_id=cid, exchange_order_id=oid,
             data={"trade_id": f"t{oid}", "fee_currency": "USDT", "source": "exchange"}),
    ]


def build_ledger(path: Path) -> Path:
    """Two days of a paper bot: three closed trades (one across midnight), one open
    position that grew, a halt, a refused entry, job runs, balances, a day close and one
    order still awaiting its outcome."""
    with Ledger(path) as ledger:
        ledger.append([
            Fact("service", D1, data={"event": "started", "pid": 4242, "mode": "paper"}),
            Fact("balance", D1 + 1, data={"currency": "USDT", "total": "10000",
                                          "free": "10000", "used": "0", "equity": "10000"}),
            Fact("rotation", D1 + 2, data={"coins": [BTC, ETH, SOL], "ranking": []}),
            job_run(D1 + 10 * S, "scan", duration_ms=35),
        ])
        # Trade A: BTC long, 10:00 -> 12:30 on day 1, a win.
        opened = D1 + 10 * H
        ledger.append([
            Fact("risk_decision", opened - 1, symbol=BTC, side="long", amount="0.010",
                 reason="ok", data={"approved": True, "detail": "all checks passed"}),
            *market_order(opened, BTC, "buy", "0.010", "60000.0", "0.30", "bot1-BTC-1",
                          "111", "entry", "pA"),
            Fact("position_opened", opened + 42, symbol=BTC, side="long", amount="0.010",
                 price="60000.0", position_id="pA"),
        ])
        closed = D1 + 12 * H + 30 * M
        ledger.append([
            *market_order(closed, BTC, "sell", "0.010", "61000.0", "0.305", "bot1-BTC-2",
                          "112", "exit", "pA"),
            Fact("position_closed", closed + 42, symbol=BTC, position_id="pA",
                 amount="0.010", price="61000.0", pnl="9.395", fee="0.605",
                 reason="trailing_stop"),
        ])
        # Trade B: ETH short from 23:30 on day 1 to 00:15 on day 2, a loss.
        ledger.append([
            Fact("position_opened", D2 - 30 * M, symbol=ETH, side="short", amount="0.5",
                 price="2000.0", position_id="pB"),
        ])
        ledger.append([
            job_run(D2, "rotate", duration_ms=250),
            Fact("day_close", D2 + S, data={"day": "2025-03-01", "realized_pnl": "9.395",
                                            "fees": "0.605", "equity": "10009.395"}),
            job_run(D2 + S, "daily_reset", duration_ms=12),
            Fact("position_closed", D2 + 15 * M, symbol=ETH, position_id="pB",
                 amount="0.5", price="2008.0", pnl="-4.2", fee="0.2", reason="stop_loss"),
        ])
        # Trade C: BTC long, 02:00 -> 03:00 on day 2, a win.
        ledger.append([
            Fact("position_opened", D2 + 2 * H, symbol=BTC, side="long", amount="0.020",
                 price="60500.0", position_id="pC"),
            Fact("balance", D2 + 2 * H + 1, data={"currency": "USDT", "total": "10150",
                                                  "free": "9000", "used": "1150",
                                                  "equity": "10150"}),
        ])
        ledger.append([
            Fact("position_closed", D2 + 3 * H, symbol=BTC, position_id="pC",
                 amount="0.020", price="60800.0", pnl="5.5", fee="0.5", reason="surge_trail"),
        ])
        # Position D: SOL long, still open; it grew, its best price and stop moved.
        ledger.append([
            Fact("position_opened", D2 + 3 * H + 30 * M, symbol=SOL, side="long",
                 amount="10", price="150.0", position_id="pD"),
            Fact("position_changed", D2 + 3 * H + 31 * M, symbol=SOL, amount="15",
                 price="151.0", position_id="pD"),
            Fact("stop_placed", D2 + 3 * H + 32 * M, symbol=SOL, price="148.0",
                 client_order_id="bot1-SOL-stop-1", exchange_order_id="913",
                 position_id="pD"),
            Fact("best_price", D2 + 3 * H + 40 * M, symbol=SOL, price="155.5",
                 position_id="pD", data={"trailing_active": True, "trail_pct": 0.5}),
        ])
        ledger.append([
            Fact("balance", D2 + 4 * H - 1, data={"currency": "USDT", "total": "10010.7",
                                                  "free": "8000", "used": "2010.7",
                                                  "equity": "10010.7"}),
            Fact("halt", D2 + 4 * H, reason="drawdown 15.3% >= 15%",
                 data={"kind": "drawdown"}),
            Fact("risk_decision", D2 + 4 * H + 5 * M, symbol=ETH, side="long", amount="0",
                 reason="halted", data={"approved": False, "detail": "drawdown halt active"}),
            job_run(D2 + 4 * H + 5 * M, "scan", duration_ms=41),
            job_run(D2 + 4 * H + 6 * M, "reconcile", outcome="error", duration_ms=10_000,
                    error="RequestTimeout: binanceusdm GET /fapi/v3/positionRisk"),
            # An entry sent before the halt whose outcome is not known yet.
            Fact("order_intent", D2 + 4 * H + 7 * M, symbol=ETH, side="buy", amount="0.4",
                 client_order_id="bot1-ETH-9", position_id="pE",
                 data={"purpose": "entry", "type": "market"}),
            Fact("order_submitted", D2 + 4 * H + 7 * M + 5, client_order_id="bot1-ETH-9"),
        ])
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_ledger(tmp_path_factory.mktemp("ledger") / "bot.db")


@pytest.fixture
def db(built, tmp_path, monkeypatch) -> Path:
    """A private copy of the built ledger, in a folder without a bot.toml."""
    monkeypatch.chdir(tmp_path)
    for key in ("BOT_API_KEY", "BOT_API_SECRET", "BOT_DASHBOARD_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    target = tmp_path / "bot.db"
    shutil.copyfile(built, target)
    return target


# -- running the CLI --------------------------------------------------------------------


def run(*args: str, code: int = 0, env: dict | None = None):
    result = CliRunner().invoke(cli.main, list(args), env=env)
    assert result.exit_code == code, (
        f"exit {result.exit_code}, wanted {code}\nstdout: {result.stdout}\n"
        f"stderr: {result.stderr}\nexception: {result.exception!r}")
    if code == 2:
        assert result.stderr.startswith("error: "), result.stderr
        assert "Traceback" not in result.output
    return result


def run_json(*args: str):
    return json.loads(run(*args, "--json").stdout)


def parse_table(text: str) -> list[dict]:
    """Rows of an aligned table; fails unless every cell sits under its column."""
    lines = text.rstrip("\n").splitlines()
    assert set(lines[1]) <= {"-", " "}, text
    spans = [m.span() for m in re.finditer(r"-+", lines[1])]
    rows = []
    for line in [lines[0], *lines[2:]]:
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert line[end:start].strip() == "", f"misaligned: {line!r}"
        rows.append([line[a:b].strip() for a, b in spans[:-1]] + [line[spans[-1][0]:].strip()])
    header = rows[0]
    return [dict(zip(header, row, strict=True)) for row in rows[1:]]


def as_text(rows: list[dict]) -> list[dict]:
    return [{k: "" if v is None else str(v) for k, v in row.items()} for row in rows]


# -- the views' numbers -----------------------------------------------------------------


def test_trades_durations_pnl_and_reasons(db):
    trades = run_json("--db", str(db), "trades")
    assert [t["position_id"] for t in trades] == ["pA", "pB", "pC"]
    a, b, c = trades
    assert a == {
        "position_id": "pA", "symbol": BTC, "side": "long", "amount": "0.010",
        "entry_price": "60000.0", "exit_price": "61000.0", "fees": "0.605",
        "realized_pnl": "9.395", "exit_reason": "trailing_stop",
        "opened_at": "2025-03-01T10:00:00.042Z", "closed_at": "2025-03-01T12:30:00.042Z",
        "duration_s": 9000.0, "opened_seq": a["opened_seq"], "closed_seq": a["closed_seq"],
    }
    assert a["opened_seq"] < a["closed_seq"]
    assert (b["side"], b["realized_pnl"], b["exit_reason"], b["duration_s"]) == \
        ("short", "-4.2", "stop_loss", 2700.0)
    assert (b["opened_at"], b["closed_at"]) == ("2025-03-01T23:30:00.000Z",
                                                "2025-03-02T00:15:00.000Z")
    assert (c["realized_pnl"], c["duration_s"], c["exit_reason"]) == ("5.5", 3600.0,
                                                                      "surge_trail")


def test_trades_since_a_day_are_those_closed_since_on_the_exchange(tmp_path):
    # A stop fired at 23:50 while the bot was down; the 00:10 restart recorded it.
    path, midnight = tmp_path / "late.db", day_ms("2025-03-02")
    with Ledger(path) as ledger:
        ledger.append([
            Fact("position_opened", midnight - 3_600_000, symbol=BTC, side="long",
                 amount="1", price="100", position_id="pA"),
            Fact("position_closed", midnight + 600_000, symbol=BTC, side="long", price="95",
                 fee="0.1", pnl="-5.1", position_id="pA",
                 data={"closed_ts": midnight - 600_000})])
    assert run_json("--db", str(path), "trades", "--since", "2025-03-02") == []
    [trade] = run_json("--db", str(path), "trades", "--since", "2025-03-01T23:50:00Z")
    assert trade["closed_at"] == "2025-03-01T23:50:00.000Z"


def test_trades_as_an_aligned_table_matches_json(db):
    text = run("--db", str(db), "trades").stdout
    assert parse_table(text) == as_text(run_json("--db", str(db), "trades"))


@pytest.mark.parametrize(("args", "expected"), [
    (["--since", "2025-03-02"], ["pB", "pC"]),  # closed on day 2 (B opened on day 1)
    (["--since", "2025-03-01"], ["pA", "pB", "pC"]),
    (["--since", "2025-03-03"], []),
    (["--since", "2025-03-01T12:30:00.042Z"], ["pA", "pB", "pC"]),  # inclusive
    (["--since", "2025-03-01T12:30:00.043Z"], ["pB", "pC"]),
    (["--since", "2025-03-02T01:00:00+01:00"], ["pB", "pC"]),  # 00:00 UTC
    (["--symbol", BTC], ["pA", "pC"]),
    (["--symbol", ETH], ["pB"]),
    (["--symbol", SOL], []),  # open, not a trade yet
    (["--symbol", BTC, "--since", "2025-03-02"], ["pC"]),
    (["--tail", "1"], ["pC"]),
])
def test_trades_filters(db, args, expected):
    trades = run_json("--db", str(db), "trades", *args)
    assert [t["position_id"] for t in trades] == expected


@pytest.mark.parametrize(("since", "hint"), [
    ("yesterday", "use YYYY-MM-DD or an ISO time"), ("2025-13-01", "use YYYY-MM-DD"),
    ("2025-03-01T10:00:00", "give the time zone"), ("20250301", "use YYYY-MM-DD")])
def test_trades_bad_since_is_refused(db, since, hint):
    result = run("--db", str(db), "trades", "--since", since, code=2)
    assert since in result.stderr and hint in result.stderr


def test_empty_result_says_so(db):
    assert run("--db", str(db), "trades", "--symbol", SOL).stdout == "no closed trades\n"


def test_daily_pnl_splits_at_utc_midnight(db):
    days = run_json("--db", str(db), "pnl")
    assert days == [
        {"day": "2025-03-01", "trades": 1, "wins": 1, "realized_pnl": 9.395, "fees": 0.605,
         "closing_equity": "10009.395"},
        {"day": "2025-03-02", "trades": 2, "wins": 1, "realized_pnl": 1.3, "fees": 0.7,
         "closing_equity": None},
    ]
    assert parse_table(run("--db", str(db), "pnl", "--by", "day").stdout) == as_text(days)


def test_pnl_by_symbol(db):
    rows = run_json("--db", str(db), "pnl", "--by", "symbol")
    assert rows == [
        {"symbol": BTC, "trades": 2, "wins": 2, "realized_pnl": 14.895, "fees": 1.105},
        {"symbol": ETH, "trades": 1, "wins": 0, "realized_pnl": -4.2, "fees": 0.2},
    ]
    text = run("--db", str(db), "pnl", "--by", "symbol").stdout
    assert parse_table(text) == as_text(rows)


def test_pnl_refuses_an_unknown_grouping(db):
    result = CliRunner().invoke(cli.main, ["--db", str(db), "pnl", "--by", "week"])
    assert result.exit_code == 2
    assert "week" in result.stderr


def test_open_positions_follow_position_changed(db):
    positions = run_json("--db", str(db), "positions")
    assert len(positions) == 1
    (sol,) = positions
    assert {k: sol[k] for k in ("position_id", "symbol", "side", "amount", "entry_price",
                                "best_price", "stop_price", "opened_at")} == {
        "position_id": "pD", "symbol": SOL, "side": "long", "amount": "15",
        "entry_price": "151.0", "best_price": "155.5", "stop_price": "148.0",
        "opened_at": "2025-03-02T03:30:00.000Z"}
    text = run("--db", str(db), "positions").stdout
    assert parse_table(text) == as_text(positions)


def test_orders_timeline(db):
    rows = run_json("--db", str(db), "orders")
    assert [(r["client_order_id"], r["state"]) for r in rows] == [
        ("bot1-BTC-1", "intent"), ("bot1-BTC-1", "submitted"), ("bot1-BTC-1", "filled"),
        ("bot1-BTC-1", "fill"),
        ("bot1-BTC-2", "intent"), ("bot1-BTC-2", "submitted"), ("bot1-BTC-2", "filled"),
        ("bot1-BTC-2", "fill"),
        ("bot1-ETH-9", "intent"), ("bot1-ETH-9", "submitted"),
    ]
    fill = rows[3]
    assert (fill["price"], fill["amount"], fill["fee"], fill["exchange_order_id"]) == \
        ("60000.0", "0.010", "0.30", "111")
    assert rows[4]["purpose"] == "exit"
    assert [r["client_order_id"] for r in run_json("--db", str(db), "orders", "--tail", "2")] \
        == ["bot1-ETH-9", "bot1-ETH-9"]
    assert parse_table(run("--db", str(db), "orders").stdout) == as_text(rows)


def test_events_tail(db):
    last_seq = _rows(db)
    rows = run_json("--db", str(db), "events", "--tail", "3")
    assert [r["seq"] for r in rows] == [last_seq - 2, last_seq - 1, last_seq]
    assert [r["type"] for r in rows] == ["job_run", "order_intent", "order_submitted"]
    assert len(run_json("--db", str(db), "events")) == 20  # the default
    text = run("--db", str(db), "events", "--tail", "3").stdout
    assert parse_table(text) == as_text(rows)
    refused = CliRunner().invoke(cli.main, ["--db", str(db), "events", "--tail", "0"])
    assert refused.exit_code == 2 and "'--tail': 0 is not in the range" in refused.stderr


def test_status(db):
    report = run_json("--db", str(db), "status")
    assert report["mode"] == "paper"  # as the service recorded it, not the config default
    assert report["exchange"] == "binanceusdm"
    assert (report["equity"], report["equity_peak"]) == ("10010.7", "10150")
    assert list(report["halts"]) == ["drawdown"]
    assert report["halts"]["drawdown"]["reason"] == "drawdown 15.3% >= 15%"
    assert report["unresolved_orders"] == 1 and report["external_positions"] == {}
    assert report["active_coins"] == [BTC, ETH, SOL]
    assert report["open_positions"] == [
        {"symbol": SOL, "side": "long", "amount": "15", "entry_price": "151.0",
         "best_price": "155.5", "stop": "148.0"}]
    runs = report["last_runs"]
    assert sorted(runs) == ["daily_reset", "reconcile", "rotate", "scan"]
    assert runs["scan"]["at"] == "2025-03-02T04:05:00.041Z"  # the latest scan
    assert runs["scan"]["duration_ms"] == 41
    assert runs["reconcile"]["outcome"] == "error"
    assert all(isinstance(r["ago_s"], int) for r in runs.values())
    assert report["last_seq"] == _rows(db)

    text = run("--db", str(db), "status").stdout
    assert "mode        paper on binanceusdm" in text
    assert "equity      10010.7 (peak 10150)" in text
    assert "halts       drawdown: drawdown 15.3% >= 15%" in text
    assert "unresolved  1 order(s)" in text
    tables = text.split("\n\n")
    positions, jobs = parse_table(tables[-2]), parse_table(tables[-1])
    assert positions == as_text(report["open_positions"])
    assert [j["job"] for j in jobs] == ["daily_reset", "reconcile", "rotate", "scan"]
    assert jobs[3]["last run"] == "2025-03-02T04:05:00.041Z"
    assert jobs[3]["ago"].endswith(" s")


def test_status_says_a_sim_ledgers_times_are_the_simulated_clocks(tmp_path):
    """The offline sim (the README's first command) runs its clock ahead of the wall
    clock: status listed runs 'at' times in the future, unexplained."""
    path = tmp_path / "sim.db"
    ahead = WallClock().now_ms() + 3_600_000
    with Ledger(path) as ledger:
        ledger.append([Fact("job_run", ahead, run_id="scan-1", data={
            "job": "scan", "scheduled_ms": ahead, "started_ms": ahead, "finished_ms": ahead,
            "duration_ms": 1.0, "outcome": "ok", "summary": {}, "mode": "sim"})])
    assert run_json("--db", str(path), "status")["now"] == iso(ahead)
    text = run("--db", str(path), "status").stdout
    assert f"clock       simulated: {iso(ahead)} by the bot's clock" in text


def test_status_of_a_fresh_ledger(tmp_path):
    path = tmp_path / "new.db"
    Ledger(path).close()
    report = run_json("--db", str(path), "status")
    assert report["mode"] == "sim"  # nothing recorded: the config's mode
    assert report["open_positions"] == [] and report["last_runs"] == {}
    text = run("--db", str(path), "status").stdout
    assert "no open positions" in text and "no job has run yet" in text


def test_status_names_flagged_external_positions(tmp_path):
    path = tmp_path / "ext.db"
    with Ledger(path) as ledger:
        ledger.append([Fact("external_position", 1_700_000_000_000, symbol=ETH, side="short",
                            amount="3", price="2000", reason="flagged",
                            data={"adopted": False})])
    report = run_json("--db", str(path), "status")
    assert report["external_positions"] == {ETH: {"side": "short", "amount": "3",
                                                  "price": "2000", "ts": 1_700_000_000_000}}
    text = run("--db", str(path), "status").stdout
    assert f"external    {ETH} short 3 (not ours: no entries until closed or adopted)" in text


def test_status_says_since_when_a_job_fails(tmp_path):
    path, t = tmp_path / "failing.db", 1_700_000_000_000
    with Ledger(path) as ledger:
        ledger.append([Fact("job_run", t + k, reason="NetworkError: down",
                            data={"job": "reconcile", "outcome": outcome})
                       for k, outcome in enumerate(["ok", "error", "error"])])
    report = run_json("--db", str(path), "status")
    assert report["last_runs"]["reconcile"]["failing_since"] == t + 1
    assert f"error (failing since {iso(t + 1)})" in run("--db", str(path), "status").stdout


def banned_ledger(path: Path, ends_in_ms: int) -> str:
    """A ledger whose last fact is a ban recorded now (the wall clock), ending so much
    later; the end, as status shows it."""
    now = WallClock().now_ms()
    with Ledger(path) as ledger:
        ledger.append([Fact("ip_ban", now, reason="banned", data={"until_ms": now + ends_in_ms})])
    return iso(now + ends_in_ms)


@pytest.mark.parametrize("ends_in_ms,shown", [(86_400_000, True), (-1, False)])
def test_status_names_an_ip_ban_in_force(tmp_path, ends_in_ms, shown):
    path = tmp_path / "ban.db"
    until = banned_ledger(path, ends_in_ms)
    assert run_json("--db", str(path), "status")["ip_banned_until"] == (until if shown else None)
    text = run("--db", str(path), "status").stdout
    assert (f"ip ban      the exchange banned this IP until {until}" in text) == shown
    assert ("ip ban" in text) == shown


def test_lift_ban_forgets_the_recorded_ban(tmp_path):
    """The bot moved to another IP: without a way to lift it, a recorded ban held every
    start (and every stop placement) until it ended."""
    path = tmp_path / "ban.db"
    until = banned_ledger(path, 86_400_000)
    out = run("--db", str(path), "lift-ban").stdout
    assert f"IP ban until {until} lifted" in out
    with Ledger(path) as ledger:
        assert ledger.state().ip_ban_until_ms == 0
        assert ledger.last_seq() == 2  # the ban's fact kept, the lifting added
    assert run_json("--db", str(path), "status")["ip_banned_until"] is None
    assert run("--db", str(path), "lift-ban").stdout.strip() == "no IP ban in force"
    with Ledger(path) as ledger:
        assert ledger.last_seq() == 2


def test_default_db_is_bot_db_in_the_working_folder(db):
    assert db == Path.cwd() / "bot.db"
    assert run_json("trades") == run_json("--db", str(db), "trades")


# -- export -----------------------------------------------------------------------------


def test_export_every_view_as_csv_and_json(db):
    for view in cli.audit.VIEW_NAMES:
        rows = json.loads(run("--db", str(db), "export", view, "--format", "json").stdout)
        text = run("--db", str(db), "export", view).stdout
        parsed = list(csv.DictReader(io.StringIO(text)))
        assert parsed == as_text(rows), view
        assert text.splitlines()[0], f"{view}: header missing"


def test_export_views_people_ask_about(db):
    def export(view):
        return json.loads(run("--db", str(db), "export", view, "--format", "json").stdout)

    risk = export("risk_events")
    assert [(r["type"], r["reason"]) for r in risk] == [
        ("halt", "drawdown 15.3% >= 15%"), ("risk_decision", "halted")]
    assert risk[1]["detail"] == "drawdown halt active"

    jobs = export("job_runs")
    assert [j["job"] for j in jobs] == ["scan", "rotate", "daily_reset", "scan", "reconcile"]
    reconcile = jobs[-1]
    assert reconcile["outcome"] == "error"
    assert reconcile["error"].startswith("RequestTimeout")
    assert reconcile["duration_ms"] == 10_000
    assert reconcile["scheduled_for"] == "2025-03-02T04:06:00.000Z"
    assert reconcile["started_at"] == "2025-03-02T04:06:00.002Z"

    assert [b["equity"] for b in export("balances")] == ["10000", "10150", "10010.7"]
    assert export("closed_trades") == run_json("--db", str(db), "trades")


def test_export_an_empty_view_keeps_its_header(tmp_path):
    path = tmp_path / "empty.db"
    Ledger(path).close()
    text = run("--db", str(path), "export", "closed_trades").stdout
    assert text.splitlines() == [
        "position_id,symbol,side,amount,entry_price,exit_price,fees,realized_pnl,"
        "exit_reason,opened_at,closed_at,duration_s,opened_seq,closed_seq"]
    assert run("--db", str(path), "export", "closed_trades", "--format", "json").stdout \
        == "[]\n"


def test_export_to_a_file(db, tmp_path):
    out = tmp_path / "pnl.csv"
    assert run("--db", str(db), "export", "daily_pnl", "-o", str(out)).stdout == ""
    assert out.read_text().splitlines()[1].startswith("2025-03-01,1,1,9.395,0.605,")


def test_export_refuses_an_unknown_view(db):
    result = run("--db", str(db), "export", "facts; DROP TABLE facts", code=2)
    assert "unknown view" in result.stderr and "closed_trades" in result.stderr


# -- query ------------------------------------------------------------------------------


def test_query_reads_tables_views_and_pragmas(db):
    rows = run_json("--db", str(db), "query",
                    "SELECT symbol, count(*) AS n FROM closed_trades GROUP BY symbol "
                    "ORDER BY symbol")
    assert rows == [{"symbol": BTC, "n": 2}, {"symbol": ETH, "n": 1}]
    assert run_json("--db", str(db), "query", "PRAGMA user_version") == [
        {"user_version": schema.SCHEMA_VERSION}]
    names = [r["name"] for r in run_json("--db", str(db), "query", "PRAGMA table_info(facts)")]
    assert names[:3] == ["seq", "ts", "type"]
    assert run_json("--db", str(db), "query",
                    "SELECT count(*) AS n FROM json_each('[1,2,3]')") == [{"n": 3}]
    assert run_json("--db", str(db), "query",
                    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r "
                    "WHERE n < 3) SELECT n FROM r") == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert run("--db", str(db), "query", "SELECT 1 WHERE 0").stdout == "(no rows)\n"


def test_query_shows_hashes_as_hex(db):
    (row,) = run_json("--db", str(db), "query", "SELECT hash FROM facts WHERE seq = 1")
    assert re.fullmatch(r"[0-9a-f]{64}", row["hash"])
    text = run("--db", str(db), "query", "SELECT hash FROM facts WHERE seq = 1").stdout
    assert row["hash"] in text and "b'" not in text


WRITES = [
    "INSERT INTO facts (seq, ts, type, data, hash) VALUES (999, 1, 'note', '{}', x'00')",
    "INSERT OR REPLACE INTO facts (seq, ts, type, data, hash) VALUES (1, 1, 'note', '{}', x'00')",
    "UPDATE facts SET pnl = '1000' WHERE type = 'position_closed'",
    "DELETE FROM facts WHERE seq = 1",
    "DROP TABLE facts",
    "DROP VIEW closed_trades",
    "DROP TRIGGER facts_no_update",
    "CREATE TABLE mine (x)",
    "CREATE TEMP TABLE mine (x)",
    "CREATE VIEW mine AS SELECT 1",
    "CREATE INDEX facts_ts ON facts (ts)",
    "CREATE TRIGGER t AFTER INSERT ON facts BEGIN SELECT 1; END",
    "ALTER TABLE facts ADD COLUMN x",
    "ATTACH DATABASE 'attached.db' AS other",
    "VACUUM",
    "VACUUM INTO 'copy.db'",
    "REINDEX",
    "ANALYZE",
    "PRAGMA user_version = 7",
    "PRAGMA application_id = 1",
    "PRAGMA journal_mode = DELETE",
    "PRAGMA query_only = 0",
    "PRAGMA writable_schema = 1",
    "PRAGMA wal_checkpoint(TRUNCATE)",
    "BEGIN IMMEDIATE",
    "SAVEPOINT s",
    "UPDATE sqlite_master SET sql = '' WHERE name = 'facts_no_update'",
    "WITH x AS (SELECT 1) DELETE FROM facts",
    "SELECT 1; DELETE FROM facts",
    "SELECT count(*) FROM facts; DROP TABLE facts",
]


@pytest.mark.parametrize("sql", WRITES)
def test_query_refuses_every_write(db, sql):
    run("--db", str(db), "query", "SELECT 1")  # a reader of a WAL file makes its -shm
    before = db.read_bytes()
    listing = sorted(p.name for p in db.parent.iterdir())
    result = run("--db", str(db), "query", sql, code=2)
    message = result.stderr
    assert "read-only" in message or "one statement" in message, message
    assert not (db.parent / "attached.db").exists()
    assert not (db.parent / "copy.db").exists()
    assert sorted(p.name for p in db.parent.iterdir()) == listing
    assert db.read_bytes() == before
    assert run("--db", str(db), "verify").exit_code == 0


def test_query_names_what_it_refused(db):
    assert "refused INSERT facts" in run("--db", str(db), "query", WRITES[0], code=2).stderr
    assert "refused ATTACH" in run("--db", str(db), "query", WRITES[13], code=2).stderr
    assert "refused PRAGMA user_version 7" in run("--db", str(db), "query", WRITES[18],
                                                  code=2).stderr


def test_query_errors_are_clear(db):
    assert "no such table: nope" in run("--db", str(db), "query", "SELECT * FROM nope",
                                        code=2).stderr
    assert "syntax error" in run("--db", str(db), "query", "SELEC 1", code=2).stderr


# -- verify -----------------------------------------------------------------------------


def tamper(path: Path, *statements: str) -> None:
    """Edit the file behind the ledger's back: drop the guard, change, put it back."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        triggers = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger'").fetchall()
        conn.execute("BEGIN IMMEDIATE")
        for name in ("facts_no_update", "facts_no_delete", "facts_append_only"):
            conn.execute(f"DROP TRIGGER {name}")
        for statement in statements:
            conn.execute(statement)
        for (sql,) in triggers:
            conn.execute(sql)
        conn.execute("COMMIT")
    finally:
        conn.close()


def closed_seq(path: Path, position_id: str) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT seq FROM facts WHERE type = 'position_closed' AND "
                            "position_id = ?", (position_id,)).fetchone()[0]
    finally:
        conn.close()


def test_verify_intact(db):
    result = run("--db", str(db), "verify")
    rows = _rows(db)
    assert result.stdout == f"ok: {rows} rows verified, chain intact up to seq {rows}\n"
    assert run_json("--db", str(db), "verify") == {
        "ok": True, "rows": rows, "last_seq": rows, "first_bad_seq": None, "problem": ""}


def test_the_triggers_refuse_edits(db):
    conn = sqlite3.connect(db)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE facts SET pnl = '1000' WHERE seq = 3")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM facts WHERE seq = 3")
    finally:
        conn.close()


def test_verify_names_the_first_edited_row(db):
    seq = closed_seq(db, "pA")
    tamper(db, f"UPDATE facts SET pnl = '1009.395' WHERE seq = {seq}",
           f"UPDATE facts SET pnl = '55' WHERE seq = {seq + 5}")
    result = run("--db", str(db), "verify", code=1)
    assert result.stdout == ""
    assert f"BROKEN at seq {seq}:" in result.stderr
    assert "hash does not match" in result.stderr
    report = json.loads(run("--db", str(db), "verify", "--json", code=1).stdout)
    assert (report["ok"], report["first_bad_seq"]) == (False, seq)
    # The edit is visible to every read command; verify is what tells it apart.
    assert run_json("--db", str(db), "trades")[0]["realized_pnl"] == "1009.395"


def test_verify_names_a_deleted_row(db):
    seq = closed_seq(db, "pB")
    tamper(db, f"DELETE FROM facts WHERE seq = {seq}")
    result = run("--db", str(db), "verify", code=1)
    assert f"BROKEN at seq {seq + 1}: sequence gap: expected {seq}, found {seq + 1}" \
        in result.stderr


def test_verify_names_an_edited_last_row(db):
    last = _rows(db)
    tamper(db, f"UPDATE facts SET client_order_id = 'bot1-ETH-10' WHERE seq = {last}")
    assert f"BROKEN at seq {last}" in run("--db", str(db), "verify", code=1).stderr


def test_verify_catches_a_rewritten_row_with_its_own_hash_recomputed(db):
    """Re-hashing the edited row alone is not enough: the next link breaks."""
    from ledger.chain import link

    seq = closed_seq(db, "pA")
    conn = sqlite3.connect(db)
    try:
        prev = conn.execute("SELECT hash FROM facts WHERE seq = ?", (seq - 1,)).fetchone()[0]
        cols = ", ".join(cli_columns())
        row = list(conn.execute(f"SELECT {cols} FROM facts WHERE seq = ?", (seq,)).fetchone())
    finally:
        conn.close()
    row[cli_columns().index("pnl")] = "1009.395"
    forged = link(prev, tuple(row)).hex()
    tamper(db, f"UPDATE facts SET pnl = '1009.395', hash = x'{forged}' WHERE seq = {seq}")
    assert f"BROKEN at seq {seq + 1}" in run("--db", str(db), "verify", code=1).stderr


def schema_edit(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in statements:
            conn.execute(statement)
    finally:
        conn.close()


HIDE_LOSSES = ("DROP VIEW closed_trades",
               "CREATE VIEW closed_trades AS SELECT position_id, symbol, pnl AS realized_pnl "
               "FROM facts WHERE type = 'position_closed' AND CAST(pnl AS REAL) >= 0")


@pytest.mark.parametrize("edit, named", [
    (HIDE_LOSSES, "view closed_trades is not as the migrations made it"),
    (("DROP TRIGGER facts_no_update",), "trigger facts_no_update is missing"),
    (("CREATE TRIGGER facts_quiet BEFORE INSERT ON facts WHEN NEW.type = 'halt' "
      "BEGIN SELECT RAISE(IGNORE); END",), "trigger facts_quiet is not ours"),
])
def test_verify_names_a_guard_or_view_changed_behind_the_ledgers_back(db, edit, named):
    # The rows are intact, but a dropped guard or a rewritten view would mislead anyway.
    schema_edit(db, *edit)
    assert run("--db", str(db), "verify", code=1).stderr == f"BROKEN: schema: {named}\n"
    report = json.loads(run("--db", str(db), "verify", "--json", code=1).stdout)
    assert report["first_bad_seq"] is None and named in report["problem"]


def test_verify_names_a_row_holding_a_value_the_ledger_never_writes(db):
    # SQLite's json_array() refuses a BLOB: verify used to stop with "cannot read".
    seq = closed_seq(db, "pA")
    tamper(db, f"UPDATE facts SET amount = CAST('1' AS BLOB) WHERE seq = {seq}")
    assert f"BROKEN at seq {seq}" in run("--db", str(db), "verify", code=1).stderr


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_export_refuses_to_write_over_the_ledger(db, suffix, tmp_path):
    before = db.read_bytes()
    link = tmp_path / "alias.db"
    link.symlink_to(db)
    for target in [f"{db}{suffix}"] + ([str(link)] if not suffix else []):
        result = run("--db", str(db), "export", "closed_trades", "-o", target, code=2)
        assert "that is the ledger itself" in result.stderr
    assert db.read_bytes() == before
    assert run("--db", str(db), "verify").stdout.startswith("ok: ")


def test_verify_leaves_a_users_own_index_and_view_alone(db):
    schema_edit(db, "CREATE INDEX my_symbols ON facts(symbol)",
                "CREATE VIEW my_losses AS SELECT * FROM closed_trades WHERE realized_pnl < 0")
    assert run("--db", str(db), "verify").stdout.startswith("ok: ")


def cli_columns() -> tuple[str, ...]:
    from ledger.chain import COLUMNS

    return COLUMNS


# -- files that are not our ledger ------------------------------------------------------

READ_COMMANDS = [
    ["status"], ["positions"], ["trades"], ["pnl"], ["orders"], ["events"], ["verify"],
    ["query", "SELECT 1"], ["export", "daily_pnl"],
]


def _foreign(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE accounts (name TEXT, balance REAL)")
    conn.execute("INSERT INTO accounts VALUES ('alice', 12.5)")
    conn.commit()
    conn.close()


BAD_FILES = {
    "missing": (lambda p: p / "bot.db", "no ledger here"),
    "missing-folder": (lambda p: p / "nowhere" / "bot.db", "no ledger here"),
    "directory": (lambda p: (p / "adir").mkdir() or p / "adir", "is a directory"),
    "random-bytes": (lambda p: (p / "noise.db").write_bytes(os.urandom(8192)) and
                     p / "noise.db", "not an SQLite database"),
    "foreign-sqlite": (lambda p: _foreign(p / "other.db") or p / "other.db",
                       "not a ledger of this bot"),
    "empty-file": (lambda p: (p / "empty.db").touch() or p / "empty.db",
                   "an empty file, no ledger yet"),
}


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns,
                                                p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def bad_file(tmp_path: Path, monkeypatch, kind: str) -> tuple[Path, str, Path, dict]:
    """(path, what its refusal says, its folder, the folder's snapshot) of a BAD_FILES kind,
    made in a folder of its own, with the working folder moved beside it."""
    monkeypatch.chdir(tmp_path)
    make, fragment = BAD_FILES[kind]
    folder = tmp_path / "files"
    folder.mkdir()
    path = make(folder)
    return path, fragment, folder, _snapshot(folder)


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_not_a_ledger_is_refused_and_untouched(tmp_path, monkeypatch, kind):
    path, fragment, folder, before = bad_file(tmp_path, monkeypatch, kind)
    for command in READ_COMMANDS:
        result = run("--db", str(path), *command, code=2)
        assert str(path) in result.stderr, (command, result.stderr)
        assert fragment in result.stderr, (command, result.stderr)
        assert _snapshot(folder) == before, command


# -- config through the CLI -------------------------------------------------------------

BAD_CONFIGS = [
    ("[risk]\nmax_open_positions = 0\n", "[risk] max_open_positions = 0",
     "1 <= value <= 1000"),
    ("[risk]\nmax_open_positons = 3\n", "[risk] max_open_positons", "unknown key"),
    ("[exits]\nstop_loss_pct = \"2%\"\n", "[exits] stop_loss_pct = '2%'", "a number"),
    ("[exchange]\nleverage = 3.5\n", "[exchange] leverage = 3.5", "an integer"),
    ("[schedule]\nscan_interval_s = 0\n", "[schedule] scan_interval_s = 0",
     "1 <= value <= 86400"),
    ("[bot]\nmode = \"yolo\"\n", "[bot] mode = 'yolo'", "sim | paper | live | backtest"),
    (f"[exchange]\napi_key = \"{KEY}\"\n", "[exchange] api_key", "BOT_API_KEY"),
    (f"api_secret = \"{SECRET}\"\n", "api_secret", "BOT_API_SECRET"),
    ("[risk\n", "bot.toml", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "key", "allowed"), BAD_CONFIGS,
                         ids=[c[1] for c in BAD_CONFIGS])
@pytest.mark.parametrize("command", [["config", "show"], ["status"], ["config", "show", "--json"],
                                     ["status", "--json"]], ids=" ".join)
def test_bad_config_is_one_clear_refusal_and_starts_nothing(tmp_path, monkeypatch, text, key,
                                                            allowed, command):
    monkeypatch.chdir(tmp_path)
    toml = tmp_path / "bot.toml"
    toml.write_text(text, encoding="utf-8")
    ledger = tmp_path / "data" / "bot.db"
    ledger.parent.mkdir()
    result = run("--db", str(ledger), "--config", str(toml), *command, code=2, env=ENV)
    assert result.stdout == ""
    assert str(toml) in result.stderr
    assert key in result.stderr and allowed in result.stderr
    assert KEY not in result.output and SECRET not in result.output
    assert list(ledger.parent.iterdir()) == []  # no ledger, no sidecar files


def test_bot_toml_in_the_working_folder_is_used(db):
    Path("bot.toml").write_text("[exchange]\nleverage = 0\n", encoding="utf-8")
    assert "[exchange] leverage = 0" in run("config", "show", code=2).stderr
    Path("bot.toml").write_text("[exchange]\nleverage = 7\n", encoding="utf-8")
    shown = run_json("config", "show")
    assert shown["config"]["exchange"]["leverage"] == 7
    assert shown["source"] == "bot.toml"


def test_missing_config_file_is_refused(db):
    result = run("--config", "nope.toml", "status", code=2)
    assert "nope.toml: config file not found" in result.stderr


def test_config_show_prints_a_usable_bot_toml(tmp_path, monkeypatch):
    import tomllib

    from core import config

    monkeypatch.chdir(tmp_path)
    toml = tmp_path / "mine.toml"
    toml.write_text("[risk]\nmax_open_positions = 4\n[rotation]\nblacklist = [\"LUNA/USDT:USDT\"]\n",
                    encoding="utf-8")
    text = run("--config", str(toml), "config", "show", env=ENV).stdout
    assert text.startswith(f"# effective config from {toml}\n")
    assert "# BOT_API_KEY: (set, hidden)" in text
    assert "# BOT_DASHBOARD_TOKEN: (not set)" in text
    # What it prints is itself a valid config equal to the effective one.
    reparsed = config.from_mapping(tomllib.loads(text))
    assert reparsed == config.load(toml, environ={})
    assert reparsed.risk.max_open_positions == 4
    shown = run_json("--config", str(toml), "config", "show")
    assert shown["config"] == config.to_mapping(reparsed)
    assert shown["secrets_from_environment"]["BOT_API_SECRET"] == "(not set)"


def test_no_command_ever_prints_a_secret(db, tmp_path):
    toml = tmp_path / "ok.toml"
    toml.write_text("[bot]\nmode = \"live\"\n", encoding="utf-8")  # live needs the keys
    leaky = tmp_path / "leaky.toml"
    leaky.write_text(f"[exchange]\napiKey = \"{KEY}\"\nsecret = \"{SECRET}\"\n"
                     f"id = {{ key = \"{KEY}\" }}\n", encoding="utf-8")
    commands = [*READ_COMMANDS, ["config", "show"], ["pnl", "--by", "symbol"],
                ["query", "SELECT * FROM ledger"], ["export", "ledger", "--format", "json"]]
    outputs = []
    for config_args in (["--config", str(toml)], []):
        for command in commands:
            for extra in ([], ["--json"]):
                if command[0] == "export" and extra:
                    continue
                result = CliRunner().invoke(cli.main, ["--db", str(db), *config_args,
                                                       *command, *extra], env=ENV)
                assert result.exit_code in (0, 1), (command, result.output)
                outputs.append(result.output)
    for command in (["config", "show"], ["status"], ["status", "--json"]):
        result = run("--db", str(db), "--config", str(leaky), *command, code=2, env=ENV)
        assert "BOT_API_KEY" in result.stderr
        outputs.append(result.output)
    for command in (["query", "INSERT INTO facts VALUES (1)"], ["trades", "--since", "x"]):
        outputs.append(run("--db", str(db), *command, code=2, env=ENV).output)
    outputs.append(run("--db", str(tmp_path / "none.db"), "status", code=2, env=ENV).output)
    assert len(outputs) > 40
    shown = "\n".join(outputs)
    assert "(set, hidden)" in shown  # config show did run with the keys set
    assert KEY not in shown and SECRET not in shown


# -- python cli.py, and reading while the service writes ---------------------------------


def python_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOT_")} | ENV
    return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_python_cli_py_from_the_repo_root(db, tmp_path):
    result = python_cli("--db", str(db), "trades", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == run_json("--db", str(db), "trades")
    result = python_cli("--db", str(db), "status")
    assert result.returncode == 0 and "mode        paper" in result.stdout
    result = python_cli("--db", str(db), "query", "DELETE FROM facts")
    assert result.returncode == 2 and result.stderr.startswith("error: query is read-only")
    result = python_cli("--db", str(tmp_path / "none.db"), "verify")
    assert result.returncode == 2 and str(tmp_path / "none.db") in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[risk]\ntrade_fraction = 1.5\n", encoding="utf-8")
    result = python_cli("--db", str(db), "--config", str(bad), "config", "show")
    assert result.returncode == 2
    assert result.stderr == (f"error: {bad}: invalid config\n  [risk] trade_fraction = 1.5: "
                             "out of range; allowed: 0 < value <= 1\n")
    result = python_cli("--db", str(db), "config", "show", "--json")
    assert result.returncode == 0
    assert KEY not in result.stdout + result.stderr and SECRET not in result.stdout


WRITER = """
import sys, time
from ledger import Fact, Ledger, LedgerError

ledger = Ledger(sys.argv[1], checkpoint_every=100)
ts, i = 1_740_787_200_000, 0
deadline = time.monotonic() + 60  # a safety net; the test stops it long before
while time.monotonic() < deadline:
    i += 1
    ts += 1000
    pid = f"p{i}"
    ledger.append([
        Fact("position_opened", ts, symbol="BTC/USDT:USDT", side="long", amount="0.001",
             price="60000", position_id=pid),
        Fact("position_closed", ts + 500, symbol="BTC/USDT:USDT", position_id=pid,
             amount="0.001", price="60100", pnl="0.1", fee="0.01", reason="take_profit"),
        Fact("job_run", ts + 600, data={"job": "scan", "outcome": "ok", "duration_ms": 3,
                                         "scheduled_ms": ts, "started_ms": ts}),
    ])
    time.sleep(0.001)  # a busy service, not a benchmark: keeps the file small
"""


@pytest.mark.slow
def test_reads_while_another_process_appends(tmp_path):
    path = tmp_path / "live.db"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not path.exists() or _rows(path) < 30:
            assert writer.poll() is None, writer.stderr.read()
            assert time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.05)
        counts_sql = ("SELECT (SELECT count(*) FROM facts WHERE type = 'position_opened') AS "
                      "opened, (SELECT count(*) FROM facts WHERE type = 'position_closed') AS "
                      "closed, (SELECT count(*) FROM closed_trades) AS trades, "
                      "(SELECT max(seq) FROM facts) AS last")
        seen = []
        outputs = []
        # A CLI process of its own, reading while the writer runs.
        proc = subprocess.Popen([sys.executable, "cli.py", "--db", str(path), "verify"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        for _ in range(40):
            verified = json.loads(run("--db", str(path), "verify", "--json").stdout)
            assert verified["ok"] and verified["first_bad_seq"] is None, verified
            (counts,) = run_json("--db", str(path), "query", counts_sql)
            # One statement, one snapshot: each batch is all there or not at all.
            assert counts["opened"] == counts["closed"] == counts["trades"] > 0, counts
            assert run_json("--db", str(path), "positions") == []
            status = run_json("--db", str(path), "status")
            assert status["open_positions"] == [] and "scan" in status["last_runs"]
            assert status["last_seq"] >= counts["last"]
            trades = run_json("--db", str(path), "trades", "--tail", "5")
            assert [t["realized_pnl"] for t in trades] == ["0.1"] * 5
            outputs += [run("--db", str(path), "events", "--tail", "5").output,
                        run("--db", str(path), "pnl").output]
            seen.append((verified["rows"], counts["last"], status["last_seq"]))
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out.startswith("ok: ")
        assert writer.poll() is None, "the writer must still be running at the end"
    finally:
        writer.terminate()
        writer.wait(timeout=10)
    assert all("locked" not in o for o in outputs)
    # The reads saw the ledger grow, never shrink.
    lasts = [s for triple in seen for s in triple]
    assert lasts == sorted(lasts), seen
    assert seen[-1][0] > seen[0][0], "the ledger grew during the reads"
    (checkpoints,) = run_json("--db", str(path), "query",
                              "SELECT count(*) AS n FROM facts WHERE type = 'checkpoint'")
    assert checkpoints["n"] > 0  # status folded from checkpoints written meanwhile
    final = json.loads(run("--db", str(path), "verify", "--json").stdout)
    assert final["ok"] and final["rows"] == final["last_seq"] == _rows(path)


def _rows(path: Path) -> int:
    try:
        ledger = Ledger(path, readonly=True)
    except LedgerError:  # not created or not migrated yet
        return 0
    try:
        return ledger.last_seq()
    finally:
        ledger.close()


# -- second audit of the command line ---------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_stops_a_query_that_would_run_forever(db):
    proc = subprocess.Popen(
        [sys.executable, "cli.py", "--db", str(db), "query",
         "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # inside SQLite by now
    proc.send_signal(2)  # SIGINT, as Ctrl-C sends it
    try:
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 2 and "query interrupted" in err, err


@pytest.mark.parametrize("suffix", ["-journal", "hard link"])
def test_export_never_writes_where_sqlite_or_the_ledger_would_read_it(db, suffix, tmp_path):
    # A CSV named bot.db-journal is a "hot journal" to SQLite: every command, run too,
    # would then refuse the (intact) ledger. A hard link is the ledger by another name.
    before = db.read_bytes()
    target = tmp_path / "backup.csv"
    if suffix == "hard link":
        os.link(db, target)
    else:
        target = Path(f"{db}{suffix}")
    assert "that is the ledger itself" in run("--db", str(db), "export", "daily_pnl", "-o",
                                              str(target), code=2).stderr
    assert db.read_bytes() == before and not Path(f"{db}-journal").exists()
    assert run("--db", str(db), "verify").stdout.startswith("ok: ")


def test_export_to_a_place_it_cannot_write_is_a_clear_refusal(db, tmp_path):
    for target in (tmp_path / "missing" / "x.csv", Path("/dev/full")):
        result = run("--db", str(db), "export", "daily_pnl", "-o", str(target), code=2)
        assert f"{target}: cannot write" in result.stderr
    assert run("--db", str(db), "export", "daily_pnl", "-o", "-").stdout.startswith("day,")
    assert not Path("-").exists()


def test_odd_inputs_are_refused_or_answered_as_valid_json(db):
    huge = CliRunner().invoke(cli.main, ["--db", str(db), "events", "--tail", "9" * 23])
    assert huge.exit_code == 2 and "Invalid value for '--tail'" in huge.stderr
    assert "empty" in run("--db", str(db), "query", "  ", code=2).stderr
    for flag in ("--since", "--symbol"):
        assert f"{flag} is empty" in run("--db", str(db), "trades", flag, "", code=2).stderr
    [row] = run_json("--db", str(db), "query", "SELECT 1e999 AS up, -1e999 AS down")
    assert row == {"up": "inf", "down": "-inf"}


WRITING_COMMANDS = [["run"], ["job", "scan"], ["reconcile"]]


@pytest.mark.parametrize("kind", ["missing-folder", "directory", "random-bytes"])
@pytest.mark.parametrize("command", WRITING_COMMANDS, ids=" ".join)
def test_a_bad_ledger_path_is_refused_by_the_commands_that_write(tmp_path, monkeypatch, kind,
                                                                 command):
    path, _, folder, before = bad_file(tmp_path, monkeypatch, kind)
    result = run("--db", str(path), *command, code=2)
    assert str(path) in result.stderr
    assert _snapshot(folder) == before  # not even a lock file beside it
    assert not (tmp_path / "sim_exchange.db").exists()


def test_read_commands_work_on_a_live_config_without_keys_in_the_shell(db, tmp_path):
    Path("bot.toml").write_text('[bot]\nmode = "live"\n', encoding="utf-8")
    assert run_json("--db", str(db), "config", "show")["config"]["bot"]["mode"] == "live"
    assert run("--db", str(db), "status").stdout.startswith("ledger")
    for command in WRITING_COMMANDS:
        assert "BOT_API_KEY" in run("--db", str(db), *command, code=2).stderr


def test_files_the_service_writes_are_checked_before_it_starts(db, tmp_path):
    Path("bot.toml").write_text(f'[sim]\nstate_path = "{tmp_path}/no/such/x.db"\n',
                                encoding="utf-8")
    before = _snapshot(tmp_path)
    result = run("--db", str(tmp_path / "new.db"), "run", code=2)
    assert "[sim] state_path" in result.stderr and "does not exist" in result.stderr
    assert _snapshot(tmp_path) == before  # no ledger, lock, log or state file made


def test_only_the_service_needs_its_log_folder(db, tmp_path):
    (tmp_path / "file").write_text("in the way")
    Path("bot.toml").write_text(f'[bot]\nlog_dir = "{tmp_path}/file/logs"\n', encoding="utf-8")
    ledger = tmp_path / "fresh.db"
    result = CliRunner().invoke(cli.main, ["--db", str(ledger), "reconcile", "--dry-run"])
    assert result.exit_code == 0 and "log_dir" not in result.output, result.output
    assert "[bot] log_dir" in run("--db", str(ledger), "run", code=2).stderr


def test_a_halt_on_a_csv_replay_is_dated_in_the_replays_time(tmp_path, monkeypatch):
    """A sim replaying 2023's candles: a manual halt was dated by the wall clock (2026),
    after which the service's clock, never before the last fact, left its data behind."""
    from sim_fixtures import T0, csv_market, flat

    from core import runtime
    from core.config import load
    from jobs import rotate, scan
    from jobs.runner import run_job

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    csv_market(tmp_path / "data", {"AAA": flat(100.0, 900), "BBB": flat(50.0, 900)})
    (tmp_path / "bot.toml").write_text(
        f'[sim]\nsource = "csv"\ndata_dir = "{tmp_path / "data"}"\n'
        f'state_path = "{tmp_path / "sim.db"}"\n')
    cfg, db = load(tmp_path / "bot.toml"), tmp_path / "bot.db"
    rt = runtime.build(cfg, db)
    try:
        started = rt.clock.now_ms()
        assert T0 < started < T0 + 86_400_000  # at the data: 2023
        for name, job in (("rotate", rotate.run), ("scan", scan.run)):
            run_job(rt, name, job)
        last = rt.ledger.select("SELECT max(ts) AS ts FROM facts")[0]["ts"]
    finally:
        rt.close()
    (tmp_path / "bot.toml").write_text("[strategy]\nsma_fast = 50\nsma_slow = 10\n")
    run("--db", str(db), "halt", "--reason", "lunch")  # a broken config: halts anyway
    run("--db", str(db), "resume")
    with Ledger(db, readonly=True) as ledger:
        dated = [r["ts"] for r in ledger.select(
            "SELECT ts FROM facts WHERE type IN ('halt', 'resume') ORDER BY seq")]
    assert dated == [last, last]  # where the replay paused, not 2026
    rt = runtime.build(cfg, db)  # restarted: the replay goes on from there
    try:
        assert rt.clock.now_ms() < started + 3_600_000
    finally:
        rt.close()
