"""The read-only web dashboard: one self-refreshing page over the ledger, and its JSON.

Served by the bot itself with the standard library's HTTP server; the page, its script,
its styles and its charts (inline SVG drawn by our own script) live in
``core/dashboard_static/``: nothing is fetched from the internet.

The ledger is opened read-only (``Ledger(path, readonly=True)``): writing through the
dashboard is impossible by construction, and the service keeps appending meanwhile. A
small fixed pool of worker threads answers requests, so each worker reads through its
own connection (the Ledger's thread-local connections) and their number stays bounded.

Access: bound to localhost by default. Any other address needs a token in the
environment variable BOT_DASHBOARD_TOKEN, which every request must then carry
(``Authorization: Bearer <token>``, ``X-Dashboard-Token: <token>``, ``?token=<token>``,
or the cookie a browser gets after one ``?token=`` visit). A set token is required on
localhost too. Without a token, requests must name a loopback host (no DNS rebinding).

Endpoints (GET or HEAD):
  /                          the dashboard page
  /position/<position_id>    one position's full story (404 page if unknown)
  /api/dashboard             everything the page shows, in one consistent-enough read
  /api/summary /api/positions /api/equity /api/daily /api/jobs
  /api/trades?limit=N /api/risk?limit=N /api/reconciliations?limit=N
  /api/position/<position_id>  every ledger row of one position, in seq order
  /health                    200 when every job ran within its expected interval, else 503
"""

from __future__ import annotations

import hmac
import http.server
import ipaddress
import json
import logging
import re
import signal
import socket
import threading
from array import array
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from core.clock import DAY_MS, WallClock, iso, utc_day
from core.config import Config
from core.exits import as_decimal
from core.risk import RiskState, daily_loss_pct, drawdown_pct
from ledger import Ledger, LedgerError
from ledger.audit import LAST_MODE, backtest_now, written_by_backtest
from ledger.facts import recorded_day

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050
REFRESH_S = 10  # the page polls /api/dashboard this often
WORKERS = 6  # request threads, each with its own read-only connection
REQUEST_TIMEOUT_S = 15  # a silent client must not hold a worker forever
# The whole request line and headers must arrive within this: a client sending a byte
# every few seconds would otherwise hold a worker for good (before any token check).
HEAD_DEADLINE_S = 10
QUEUED_PER_WORKER = 4  # connections waiting for a worker; more are closed at once
STATIC_DIR = Path(__file__).with_name("dashboard_static")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
                 ".png": "image/png", ".ico": "image/x-icon"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
TOKEN_COOKIE = "dashboard_token"
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})

# A job is overdue once its last run is older than its interval; it is stale (red, and
# /health answers 503) once overdue by more than the grace: scheduling jitter and a
# slow run must not flap the health check.
STALE_GRACE_MS = 60_000
STALE_GRACE_SHARE = 0.10
LIST_LIMIT, MAX_LIST_LIMIT = 50, 1000
PAGE_TRADES, PAGE_EVENTS = 25, 20  # rows the page shows; the API gives up to ?limit=
EQUITY_POINTS = 600  # the curve is thinned to about this many points
STORY_WINDOW = 500  # rows before an order intent searched for its run's decisions
DECISION_TYPES = ("signal", "risk_decision", "halt", "note")
EIGHT = Decimal("1e-8")


class DashboardError(ValueError):
    """The dashboard cannot start as asked (the CLI exits 2)."""


# -- pure helpers -------------------------------------------------------------------------

def is_local(host: str) -> bool:
    """True for a loopback address or name: nothing beyond this machine can connect."""
    name = host.strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str) -> None:
    """Refuse to expose the ledger beyond this machine without a token (a blank one is
    none)."""
    if not is_local(host) and not token.strip():
        raise DashboardError(
            f"--host {host} would serve the ledger beyond this machine; set a token in the "
            "environment variable BOT_DASHBOARD_TOKEN (every request must then carry it), "
            "or keep the default 127.0.0.1 and reach it through an SSH tunnel")


def expected_intervals(config: Config) -> dict[str, int]:
    """Each job's nominal interval in the bot's milliseconds."""
    s = config.schedule
    return {"scan": s.scan_interval_s * 1000,
            "rotate": int(s.rotate_interval_h * 3_600_000),
            "reconcile": s.reconcile_interval_s * 1000,
            "daily_reset": DAY_MS}


def grace_ms(interval_ms: int) -> int:
    return max(STALE_GRACE_MS, int(interval_ms * STALE_GRACE_SHARE))


def job_health(runs: dict[str, dict], intervals: dict[str, int], now_ms: int) -> list[dict]:
    """One row per job: its last run (``runs[job]``: ts, outcome, duration_ms,
    scheduled_ms, started_ms, error, failing_since) judged against its interval at
    ``now_ms``: stale when it has not run for longer than the interval and grace, failing
    when every run for that long has failed (it runs, but does nothing)."""
    out = []
    for job in sorted(set(intervals) | set(runs)):
        interval, run = intervals.get(job), runs.get(job)
        row = {"job": job, "interval_s": None if interval is None else interval / 1000,
               "last_run": None, "at": None, "age_s": None, "outcome": None,
               "duration_ms": None, "start_delay_s": None, "overdue_s": None, "error": None,
               "latest_outcome": None, "failing_since": None, "failing": False,
               "stale": interval is not None, "status": "never ran"}
        if run is not None:
            age = now_ms - run["ts"]
            overdue = max(0, age - interval) if interval is not None else None
            started, scheduled = run.get("started_ms"), run.get("scheduled_ms")
            stale = interval is not None and overdue > grace_ms(interval)
            since = run.get("failing_since")
            failing = interval is not None and _ints(since) \
                and now_ms - since > interval + grace_ms(interval)
            row.update(
                last_run=run["ts"], at=iso(run["ts"]), age_s=round(age / 1000, 3),
                outcome=run.get("outcome"), duration_ms=run.get("duration_ms"),
                start_delay_s=(round((started - scheduled) / 1000, 3)
                               if _ints(started, scheduled) else None),
                overdue_s=None if overdue is None else round(overdue / 1000, 3),
                error=run.get("error"), latest_outcome=run.get("latest_outcome"),
                stale=stale, failing=failing,
                failing_since=iso(since) if _ints(since) else None,
                status="stale" if stale else "failing" if failing else "late" if overdue
                else "ok")
        out.append(row)
    return out


def _ints(*values) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def unrealized_pnl(side: str, amount, entry, mark) -> Decimal | None:
    """Linear contracts: (mark - entry) x amount, negated for a short."""
    a, e, m = as_decimal(amount), as_decimal(entry), as_decimal(mark)
    if a is None or e is None or m is None:
        return None
    gross = (m - e) * a
    return gross if side == "long" else -gross


def money(value) -> str | None:
    """A computed amount as text with at most 8 decimals (stored amounts stay exact)."""
    d = as_decimal(value)
    if d is None:
        return None
    return format(d.quantize(EIGHT) if d.as_tuple().exponent < -8 else d, "f")


def pct_float(value: Decimal | None) -> float | None:
    return None if value is None else round(float(value), 4)


def thin(points: list[tuple[int, float]], most: int = EQUITY_POINTS) -> list[tuple[int, float]]:
    """About ``most`` points of a time series: the last of each equal time bucket, and
    always the first and the last point (the chart's ends are exact)."""
    if len(points) <= most:
        return list(points)
    start, end = points[0][0], points[-1][0]
    width = max(1, -(-(end - start) // most))
    out, bucket = [points[0]], None
    for point in points[1:]:
        b = (point[0] - start) // width
        if b == bucket:
            out[-1] = point
        else:
            out.append(point)
            bucket = b
    if out[-1] != points[-1]:
        out.append(points[-1])
    return out


def row_json(row: dict) -> dict:
    """A ledger row for JSON, with its data column parsed."""
    out = dict(row)
    if isinstance(out.get("data"), str):
        try:
            out["data"] = json.loads(out["data"])
        except ValueError:
            pass  # shown as stored
    return out


# -- reading the ledger ---------------------------------------------------------------------

class Tail:
    """What the page lists or charts over the whole history, read incrementally.

    The ledger only grows, so each refresh reads just the rows after the last one seen
    (primary-key range scans through the views), never the whole file again: the
    equity curve, daily totals, and the latest trades, risk events and reconciliations.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seq = 0
        self.equity_ts = array("q")  # compact: years of snapshots stay a few MB
        self.equity = array("d")
        self.days: dict[str, dict] = {}
        self.day_equity: dict[str, str] = {}
        self.service: dict = {}
        self.mode: str | None = None  # as the last service start or job run recorded it
        self.trades: deque = deque(maxlen=MAX_LIST_LIMIT)
        self.risk: deque = deque(maxlen=MAX_LIST_LIMIT)
        self.reconciliations: deque = deque(maxlen=MAX_LIST_LIMIT)

    def catch_up(self, ledger: Ledger, upto: int) -> None:
        """Read rows (self.seq, upto]; the caller holds ``lock``."""
        if upto <= self.seq:
            return
        span = (self.seq, upto)
        for r in ledger.select(
                "SELECT seq, ts, type, pnl, fee, data FROM facts WHERE seq > ? AND seq <= ? "
                "AND type IN ('balance', 'position_closed', 'day_close', 'service') "
                "ORDER BY seq", span):
            self._fact(r)
        moded = ledger.select(LAST_MODE, span)  # as audit.recorded_mode reads it
        if moded:
            self.mode = str(moded[0]["mode"])
        self.trades.extend(ledger.select(
            "SELECT * FROM closed_trades WHERE closed_seq > ? AND closed_seq <= ? "
            "ORDER BY closed_seq", span))
        self.risk.extend(ledger.select(
            "SELECT * FROM risk_events WHERE seq > ? AND seq <= ? ORDER BY seq", span))
        self.reconciliations.extend(_reconciliation(r) for r in ledger.select(
            "SELECT seq, time, status, data FROM reconciliations WHERE seq > ? AND seq <= ? "
            "ORDER BY seq", span))
        self.seq = upto

    def _fact(self, r: dict) -> None:
        kind = r["type"]
        data = row_json(r)["data"]
        data = data if isinstance(data, dict) else {}
        if kind == "position_closed":
            # The same totals as the daily_pnl view, kept as rows arrive: that view
            # regroups the whole ledger on every read.
            day = self.days.setdefault(recorded_day(r["ts"], data.get("day")), {
                "trades": 0, "wins": 0, "realized_pnl": Decimal(0), "fees": Decimal(0)})
            pnl, fee = as_decimal(r["pnl"]), as_decimal(r["fee"])
            day["trades"] += 1
            day["wins"] += int(pnl is not None and pnl > 0)
            day["realized_pnl"] += pnl or 0
            day["fees"] += fee or 0
            return
        if kind == "balance":
            value = as_decimal(data.get("equity"))
            if value is not None:
                self.equity_ts.append(r["ts"])
                self.equity.append(float(value))
        elif kind == "day_close" and isinstance(data.get("day"), str):
            self.day_equity[data["day"]] = data.get("equity")
        elif kind == "service":
            self.service = data

    def daily(self) -> list[dict]:
        none = {"trades": 0, "wins": 0, "realized_pnl": Decimal(0), "fees": Decimal(0)}
        return [{"day": day, "trades": t["trades"], "wins": t["wins"],
                 "realized_pnl": money(t["realized_pnl"]), "fees": money(t["fees"]),
                 "closing_equity": self.day_equity.get(day)}
                for day, t in sorted({**dict.fromkeys(self.day_equity, none),
                                      **self.days}.items())]


def _reconciliation(r: dict) -> dict:
    d = row_json(r)["data"]
    d = d if isinstance(d, dict) else {}
    diffs = d.get("differences") if isinstance(d.get("differences"), list) else []
    return {"seq": r["seq"], "time": r["time"], "status": r["status"],
            "dry_run": bool(d.get("dry_run")), "differences": diffs,
            "corrections": d.get("corrections") or []}


def _latest(rows: deque, limit: int) -> list[dict]:
    """The last ``limit`` rows, newest first."""
    return [rows[-i] for i in range(1, min(limit, len(rows)) + 1)]


class Dashboard:
    """What the page shows, read from the ledger through a read-only connection."""

    def __init__(self, ledger: Ledger, config: Config, clock=None) -> None:
        if not ledger.readonly:
            raise DashboardError("the dashboard reads a ledger opened read-only")
        self.ledger = ledger
        self.config = config
        self.clock = clock or WallClock()
        self.intervals = expected_intervals(config)
        self._tail = Tail()
        self._written_by_backtest: bool | None = None

    @classmethod
    def open(cls, db_path: str | Path, config: Config, clock=None) -> Dashboard:
        """Refuses (LedgerError) a missing file, or one that is not our ledger."""
        return cls(Ledger(db_path, readonly=True), config, clock)

    def close(self) -> None:
        self.ledger.close()

    # -- basics --------------------------------------------------------------------------

    def _backtest(self) -> bool:
        """A backtest's ledger says so in its first fact (it records no service fact),
        which never changes once written: read once there is one."""
        if self._written_by_backtest is None and self.ledger.last_seq():
            self._written_by_backtest = written_by_backtest(self.ledger)
        return bool(self._written_by_backtest)

    def _last(self) -> tuple[int, int]:
        """(last seq, its ts), (0, 0) for an empty ledger: a primary-key lookup."""
        row = self.ledger.select("SELECT seq, ts FROM facts ORDER BY seq DESC LIMIT 1")
        return (row[0]["seq"], row[0]["ts"]) if row else (0, 0)

    def context(self) -> dict:
        """The state, the ledger's mode, and "now": the wall clock, but never before the
        last fact (a sim service's clock runs ahead); a backtest's, just before its end."""
        last_seq, last_ts = self._last()
        with self._tail.lock:
            self._tail.catch_up(self.ledger, last_seq)
            service = dict(self._tail.service)
            recorded = self._tail.mode
        mode = "backtest" if self._backtest() else (recorded or self.config.bot.mode)
        state = self.ledger.state()
        now = backtest_now(last_ts) if mode == "backtest" and last_ts else \
            max(self.clock.now_ms(), last_ts)
        return {"state": state, "mode": str(mode), "now": now, "last_ts": last_ts,
                "exchange": str(service.get("exchange") or self.config.exchange.id)}

    # -- sections ------------------------------------------------------------------------

    def summary(self, ctx: dict | None = None, positions: list[dict] | None = None) -> dict:
        ctx = ctx or self.context()
        state, now = ctx["state"], ctx["now"]
        risk_cfg = self.config.risk
        rs = RiskState.from_ledger(state, now)
        equity = as_decimal(state.equity)
        active = rs.active_halts(now)
        halts = []
        for kind, reason in sorted(active.items()):
            since = (state.halts.get(kind) or {}).get("ts")
            halts.append({"kind": kind, "reason": reason,
                          "since": iso(since) if _ints(since) else None})
        dse = rs.day_start_equity
        positions = self.positions(ctx) if positions is None else positions
        unrealized = [u for p in positions if (u := as_decimal(p["unrealized_pnl"])) is not None]
        return {
            "empty": state.seq == 0,
            "ledger": self.ledger.path.name,
            "last_seq": state.seq,
            "now": now, "now_iso": iso(now),
            "last_fact_at": iso(ctx["last_ts"]) if ctx["last_ts"] else None,
            "mode": ctx["mode"], "exchange": ctx["exchange"],
            "halted": bool(active), "halts": halts,
            "equity": state.equity, "equity_peak": state.equity_peak,
            "drawdown_pct": pct_float(drawdown_pct(rs, equity)) if equity is not None else None,
            "max_drawdown_pct": risk_cfg.max_drawdown_pct,
            "realized_today": money(state.realized_today_at(now)),
            "fees_today": state.fees_today if state.day == utc_day(now) else "0",
            "day_start_equity": state.day_start_equity,
            "daily_loss_pct": (pct_float(daily_loss_pct(rs, equity))
                               if equity is not None else None),
            "daily_loss_limit_pct": risk_cfg.daily_loss_limit_pct,
            "daily_loss_limit": (money(-dse * Decimal(repr(risk_cfg.daily_loss_limit_pct))
                                       / 100) if dse else None),
            "unrealized_pnl": money(sum(unrealized, Decimal(0))) if unrealized else None,
            "open_positions": len(state.positions),
            "unresolved_orders": len(state.unresolved_orders()),
            "active_coins": state.active_coins,
            "refresh_s": REFRESH_S,
        }

    def _mark(self, symbol: str) -> dict | None:
        """The latest close the bot decided on: its last signal's price (no exchange call)."""
        rows = self.ledger.select("SELECT price, ts FROM facts WHERE type = 'signal' AND "
                                  "symbol = ? ORDER BY seq DESC LIMIT 1", (symbol,))
        return rows[0] if rows and rows[0]["price"] is not None else None

    def positions(self, ctx: dict | None = None) -> list[dict]:
        state = (ctx or self.context())["state"]
        out = []
        for p in sorted(state.positions.values(), key=lambda p: p["opened_seq"]):
            mark = self._mark(p["symbol"])
            stop = p.get("stop") or {}
            out.append({
                "position_id": p["position_id"], "symbol": p["symbol"], "side": p["side"],
                "amount": p["amount"], "entry_price": p["entry_price"],
                "mark_price": mark["price"] if mark else None,
                "mark_at": iso(mark["ts"]) if mark else None,
                "unrealized_pnl": money(unrealized_pnl(p["side"], p["amount"],
                                                       p["entry_price"],
                                                       mark["price"] if mark else None)),
                "stop_price": stop.get("price"), "best_price": p.get("best_price"),
                "trailing_active": bool(p.get("trailing_active")),
                "trail_pct": p.get("trail_pct"), "fees": p.get("fees"),
                "opened_at": iso(p["opened_ts"]),
            })
        return out

    def equity(self, ctx: dict | None = None) -> dict:
        """The equity curve from balance snapshots, thinned for drawing."""
        ctx = ctx or self.context()
        with self._tail.lock:
            points = thin(list(zip(self._tail.equity_ts, self._tail.equity, strict=True)))
            total = len(self._tail.equity)
        state_peak = as_decimal((ctx or self.context())["state"].equity_peak)
        return {"points": [[ts, eq] for ts, eq in points], "total_points": total,
                "peak": None if state_peak is None else float(state_peak)}

    def _read(self, what: Callable[[Tail], object], ctx: dict | None):
        if ctx is None:
            self.context()  # catches the tail up
        with self._tail.lock:
            return what(self._tail)

    def daily(self, ctx: dict | None = None) -> list[dict]:
        """Realized P&L per UTC day: the daily_pnl view's columns."""
        return self._read(Tail.daily, ctx)

    def trades(self, limit: int = LIST_LIMIT, ctx: dict | None = None) -> list[dict]:
        return self._read(lambda t: _latest(t.trades, limit), ctx)

    def _job_runs(self, state) -> dict[str, dict]:
        """Each job's last run that really started (a run the scheduler missed or dropped
        is recorded, but it is not a sign of life)."""
        out = {}
        for job, last in state.last_runs.items():
            rows = self.ledger.select("SELECT seq, ts, reason, data FROM facts WHERE seq = ?",
                                      (last["seq"],))
            if rows and _started(rows[0]) is None:
                rows = self.ledger.select(
                    "SELECT seq, ts, reason, data FROM facts WHERE type = 'job_run' AND "
                    "seq < ? AND json_extract(data, '$.job') = ? AND "
                    "json_extract(data, '$.started_ms') IS NOT NULL ORDER BY seq DESC LIMIT 1",
                    (last["seq"], job))
            if not rows:
                continue
            d = row_json(rows[0])["data"]
            out[job] = {"ts": rows[0]["ts"], "outcome": d.get("outcome"),
                        "duration_ms": d.get("duration_ms"),
                        "scheduled_ms": d.get("scheduled_ms"), "started_ms": d.get("started_ms"),
                        "error": rows[0]["reason"], "failing_since": last.get("failing_since")}
            if rows[0]["seq"] != last["seq"]:
                out[job]["latest_outcome"] = last.get("outcome")
        return out

    def jobs(self, ctx: dict | None = None) -> list[dict]:
        ctx = ctx or self.context()
        return job_health(self._job_runs(ctx["state"]), self.intervals, ctx["now"])

    def health(self) -> tuple[bool, dict]:
        ctx = self.context()
        jobs = self.jobs(ctx)
        stale = [j["job"] for j in jobs if j["stale"]]
        failing = [j["job"] for j in jobs if j["failing"]]
        ok = not stale and not failing
        body = {"ok": ok, "now": iso(ctx["now"]), "mode": ctx["mode"], "stale": stale,
                "failing": failing,
                "jobs": {j["job"]: {k: j[k] for k in ("status", "at", "age_s", "interval_s",
                                                      "overdue_s", "outcome", "failing_since")}
                         for j in jobs}}
        if ctx["state"].seq == 0:
            body["detail"] = "the ledger is empty: no job has run yet"
        return ok, body

    def risk_events(self, limit: int = LIST_LIMIT, ctx: dict | None = None) -> list[dict]:
        return self._read(lambda t: _latest(t.risk, limit), ctx)

    def reconciliations(self, limit: int = LIST_LIMIT, ctx: dict | None = None) -> list[dict]:
        return self._read(lambda t: _latest(t.reconciliations, limit), ctx)

    def everything(self) -> dict:
        ctx = self.context()
        positions = self.positions(ctx)
        return {"summary": self.summary(ctx, positions), "positions": positions,
                "equity": self.equity(ctx), "daily": self.daily(ctx),
                "trades": self.trades(PAGE_TRADES, ctx), "jobs": self.jobs(ctx),
                "risk_events": self.risk_events(PAGE_EVENTS, ctx),
                "reconciliations": self.reconciliations(PAGE_EVENTS, ctx)}

    # -- one position's story -------------------------------------------------------------

    def story(self, position_id: str) -> dict | None:
        """Every ledger row of one position in seq order: its orders, fills, stops, exit,
        and the decisions (signal, risk decision, halt) its orders' runs recorded just
        before each intent. None if no such position."""
        own = self.ledger.select("SELECT * FROM ledger WHERE position_id = ? ORDER BY seq",
                                 (position_id,))
        opened = [r for r in own if r["type"] == "position_opened"]
        if not opened:
            return None
        symbol = opened[0]["symbol"]
        seqs = {r["seq"] for r in own}
        rows = list(own)
        coids = sorted({r["client_order_id"] for r in own if r["client_order_id"]})
        for coid in coids:  # rows about its orders that do not name the position
            for r in self.ledger.select("SELECT * FROM ledger WHERE client_order_id = ?",
                                        (coid,)):
                if r["seq"] not in seqs:
                    seqs.add(r["seq"])
                    rows.append(r)
        for intent in [r for r in own if r["type"] == "order_intent" and r["run_id"]]:
            marks = ", ".join("?" * len(DECISION_TYPES))
            for r in self.ledger.select(
                    f"SELECT * FROM ledger WHERE seq >= ? AND seq < ? AND run_id = ? "
                    f"AND type IN ({marks}) AND position_id IS NULL "
                    f"AND (symbol = ? OR symbol IS NULL)",
                    (intent["seq"] - STORY_WINDOW, intent["seq"], intent["run_id"],
                     *DECISION_TYPES, symbol)):
                if r["seq"] not in seqs:
                    seqs.add(r["seq"])
                    rows.append(r)
        rows.sort(key=lambda r: r["seq"])
        closed = self.ledger.select("SELECT * FROM closed_trades WHERE position_id = ?",
                                    (position_id,))
        if closed:
            position = {**closed[0], "status": "closed"}
        else:
            open_rows = self.ledger.select("SELECT * FROM open_positions WHERE position_id = ?",
                                           (position_id,))
            position = {**(open_rows[0] if open_rows else {"position_id": position_id,
                                                           "symbol": symbol}),
                        "status": "open" if open_rows else "unknown"}
        return {"position": position, "rows": [row_json(r) for r in rows]}


def _started(row: dict):
    data = row_json(row)["data"]
    return data.get("started_ms") if isinstance(data, dict) else None


# -- HTTP ---------------------------------------------------------------------------------

class DashboardServer(http.server.HTTPServer):
    """An HTTP server answering from a fixed pool of threads (bounded connections)."""

    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], dashboard: Dashboard, token: str = "",
                 workers: int = WORKERS) -> None:
        self.dashboard = dashboard
        self.token = token.strip()
        self.static = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()}
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dashboard")
        self._slots = threading.BoundedSemaphore(workers * (1 + QUEUED_PER_WORKER))
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):  # a flood: refuse, do not queue
            self.shutdown_request(request)
            return
        self.pool.submit(self._answer, request, client_address)

    def _answer(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - one broken connection must not stop the server
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        log.warning("dashboard: connection from %s failed", client_address[0], exc_info=True)

    def server_close(self) -> None:
        super().server_close()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.dashboard.close()


def _limit(query: dict) -> int:
    raw = query.get("limit", [str(LIST_LIMIT)])[-1]
    if not re.fullmatch(r"[0-9]{1,6}", raw) or not 1 <= int(raw) <= MAX_LIST_LIMIT:
        raise _BadRequest(f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}")
    return int(raw)


class _BadRequest(Exception):
    pass


class Handler(http.server.BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "ledgerbot-dashboard"
    sys_version = ""
    timeout = REQUEST_TIMEOUT_S
    # HTTP/1.0: one request per connection, so an idle keep-alive never pins a worker.

    # -- plumbing ---------------------------------------------------------------------------

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib's name
        pass  # the request line may carry the token; requests are logged in _route

    def setup(self) -> None:
        super().setup()
        # Past the deadline, a request still arriving is cut off (see HEAD_DEADLINE_S).
        self._deadline = threading.Timer(HEAD_DEADLINE_S, self._cut_off)
        self._deadline.daemon = True
        self._deadline.start()

    def _cut_off(self) -> None:
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # reads the headers
        self._deadline.cancel()  # the request line and headers are in
        return parsed

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def _send(self, status: int, body: bytes, content_type: str,
              headers: dict | None = None) -> None:
        self.send_response(status)
        for name, value in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload) -> None:
        body = json.dumps(payload, default=str, separators=(",", ":")).encode()
        self._send(status, body, "application/json")

    def _page(self, status: int, title: str, text: str) -> None:
        body = ERROR_PAGE.format(title=_html(title), text=_html(text)).encode()
        self._send(status, body, CONTENT_TYPES[".html"])

    def _file(self, name: str) -> None:
        path = self.server.static.get(name)
        if path is None:
            self._page(404, "Not found", f"No file {name} here.")
            return
        self._send(200, path.read_bytes(), CONTENT_TYPES.get(path.suffix,
                                                            "application/octet-stream"))

    def _refuse(self, status: int, text: str, api: bool) -> None:
        if api:
            self._json(status, {"error": text})
        else:
            self._page(status, HTTPStatus(status).phrase, text)

    # -- access --------------------------------------------------------------------------

    def _given_token(self, query: dict) -> tuple[str, str]:
        """(token, where it came from)."""
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), "header"
        if self.headers.get("X-Dashboard-Token"):
            return self.headers["X-Dashboard-Token"].strip(), "header"
        if query.get("token"):
            return query["token"][-1], "query"
        # By hand, not http.cookies: its strict parser drops every cookie of a header
        # holding one it dislikes (another app's, on the same host).
        for piece in self.headers.get("Cookie", "").split(";"):
            name, _, value = piece.strip().partition("=")
            if name == TOKEN_COOKIE:
                return unquote(value.strip().strip('"')), "cookie"
        return "", ""

    def _allowed(self, path: str, query: dict, api: bool) -> bool:
        token = self.server.token
        if not token:
            try:
                host = urlsplit(f"//{self.headers.get('Host', '')}").hostname or ""
            except ValueError:  # a malformed Host header names no local host
                host = ""
            if not is_local(host):
                self._refuse(403, "this dashboard answers only to localhost names", api)
                return False
            return True
        given, where = self._given_token(query)
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            self._refuse(401, "a valid token is required (BOT_DASHBOARD_TOKEN): send "
                         "'Authorization: Bearer <token>' or add ?token=<token>", api)
            return False
        if where == "query" and not api:
            # Move the token from the address bar into a cookie, then show the page.
            rest = {k: v for k, v in query.items() if k != "token"}
            target = quote(unquote(path)) + ("?" + "&".join(f"{quote(k)}={quote(x)}"
                                                    for k, vs in rest.items() for x in vs)
                                    if rest else "")
            self._send(303, b"", "text/plain", {
                "Location": target,
                "Set-Cookie": f"{TOKEN_COOKIE}={quote(given)}; HttpOnly; SameSite=Strict; "
                              "Path=/"})
            return False
        return True

    # -- routes ---------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - stdlib's name
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        api = path.startswith("/api/") or path == "/health"
        if not self._allowed(path, query, api):
            return
        log.debug("dashboard GET %s", path)
        try:
            self._route(path, query)
        except _BadRequest as exc:
            self._refuse(400, str(exc), api)
        except LedgerError as exc:
            self._refuse(503, f"the ledger cannot be read: {exc}", api)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except Exception:  # noqa: BLE001 - never a traceback to the client
            log.exception("dashboard: %s failed", path)
            self._refuse(500, "internal error; see the bot's log", api)

    do_HEAD = do_GET

    def _route(self, path: str, query: dict) -> None:
        d = self.server.dashboard
        if path in ("/", "/index.html"):
            self._file("index.html")
        elif path.startswith("/static/"):
            self._file(path[len("/static/"):])
        elif path == "/favicon.ico":
            self._file("favicon.svg")
        elif path.startswith("/position/"):
            pid = unquote(path[len("/position/"):])
            if d.story(pid) is None:
                self._page(404, "No such position", f"The ledger has no position {pid!r}.")
            else:
                self._file("position.html")
        elif path.startswith("/api/position/"):
            pid = unquote(path[len("/api/position/"):])
            story = d.story(pid)
            if story is None:
                self._json(404, {"error": f"no position {pid!r} in the ledger"})
            else:
                self._json(200, story)
        elif path == "/health":
            ok, body = d.health()
            self._json(200 if ok else 503, body)
        elif path in API:
            self._json(200, API[path](d, query))
        else:
            self._refuse(404, f"nothing at {path}", path.startswith("/api/"))

    def _not_allowed(self) -> None:
        self.send_response(405)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed


API: dict[str, Callable[[Dashboard, dict], object]] = {
    "/api/dashboard": lambda d, q: d.everything(),
    "/api/summary": lambda d, q: d.summary(),
    "/api/positions": lambda d, q: d.positions(),
    "/api/equity": lambda d, q: d.equity(),
    "/api/daily": lambda d, q: d.daily(),
    "/api/trades": lambda d, q: d.trades(_limit(q)),
    "/api/jobs": lambda d, q: d.jobs(),
    "/api/risk": lambda d, q: d.risk_events(_limit(q)),
    "/api/reconciliations": lambda d, q: d.reconciliations(_limit(q)),
}

ERROR_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<link rel="stylesheet" href="/static/dashboard.css"></head>
<body><main class="error-page"><h1>{title}</h1><p>{text}</p>
<p><a href="/">Back to the dashboard</a></p></main></body></html>
"""


def _html(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


# -- the command ----------------------------------------------------------------------------

def make_server(dashboard: Dashboard, host: str, port: int, token: str = "") -> DashboardServer:
    check_bind(host, token)
    try:
        return DashboardServer((host, port), dashboard, token)
    except OSError as exc:
        raise DashboardError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def serve(config: Config, db_path: str | Path, host: str = DEFAULT_HOST,
          port: int = DEFAULT_PORT, *, echo: Callable[[str], None] = print) -> None:
    """``cli.py dashboard``: serve until Ctrl-C or SIGTERM."""
    token = config.secrets.dashboard_token
    check_bind(host, token)  # before touching the ledger
    dashboard = Dashboard.open(db_path, config)
    try:
        server = make_server(dashboard, host, port, token)
    except DashboardError:
        dashboard.close()
        raise
    echo(f"dashboard of {db_path} (read-only) at {server.url}")
    if token:
        echo("every request must carry the token from BOT_DASHBOARD_TOKEN: header "
             "'Authorization: Bearer <token>' or '?token=<token>' (a browser keeps it in a "
             "cookie after the first visit)")
    else:
        echo("localhost only; from another machine use an SSH tunnel: "
             f"ssh -L {server.server_address[1]}:localhost:{server.server_address[1]} <server>")
    echo("Ctrl-C to stop")

    def stop(signum=None, frame=None) -> None:
        # shutdown() waits for serve_forever to return: never call it on its own thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    main = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, stop) if main else None
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        server.server_close()
    echo("dashboard stopped")
