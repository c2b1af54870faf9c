"""The bot's command line: run it, ask the ledger questions, square it with the exchange.

Read commands open the ledger read-only, so they work while the service writes.
Exit codes: 0 fine, 1 a check found a problem (verify, reconcile corrected), 2 refused
(bad input, bad config, a file that is not our ledger, a write through `query`).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import logging
import math
import os
import signal
import sqlite3
import sys
import threading
from pathlib import Path

import click
from tabulate import tabulate

from core import config as config_mod
from core.clock import WallClock, iso
from ledger import Ledger, LedgerError, audit
from ledger.lock import AlreadyRunning, LedgerLock
from ledger.store import connect

DEFAULT_DB = "bot.db"


class Refused(click.ClickException):
    """A clear refusal: printed as 'error: ...' and exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


def refusing(fn):
    """Turn the errors a user can cause into one clear line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (LedgerError, config_mod.ConfigError, ValueError) as exc:
            raise Refused(str(exc)) from None

    return wrapper


# The most rows a --tail asks for (beyond it SQLite's integers overflow).
MAX_TAIL = 2**62


def _finite(value):
    """JSON has no Infinity or NaN: such a float is printed as a string."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def render(rows: list[dict], as_json: bool, empty: str = "(nothing yet)") -> None:
    if as_json:
        rows = [{k: _finite(v) for k, v in row.items()} for row in rows]
        click.echo(json.dumps(rows, indent=2, default=str, allow_nan=False))
    elif not rows:
        click.echo(empty)
    else:
        click.echo(tabulate(rows, headers="keys", tablefmt="simple", disable_numparse=True,
                            missingval=""))


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", default=DEFAULT_DB, show_default=True, type=click.Path(),
              help="Ledger file.")
@click.option("--config", "config_path", default=None, type=click.Path(),
              help="Config file (default: ./bot.toml if present, else built-in defaults).")
@click.pass_context
def main(ctx: click.Context, db: str, config_path: str | None) -> None:
    """A crypto trading bot whose append-only ledger is the source of truth."""
    ctx.obj = {**(ctx.obj or {}), "db": db, "config_path": config_path}


def bot_now(ledger: Ledger) -> int:
    """The bot's "now" for a command: the wall clock, never before the last fact (facts
    stay in time order; an accelerated sim runs ahead of the wall clock)."""
    last = ledger.select("SELECT ts FROM facts ORDER BY seq DESC LIMIT 1")
    return max(WallClock().now_ms(), last[0]["ts"] if last else 0)


def fact_now(db: str, ledger: Ledger) -> int:
    """When a fact a command writes (halt, resume) is dated. A sim ledger's at its last
    fact: the bot's clock is the simulated exchange's (a CSV replay runs years behind the
    wall clock), and a fact dated by the wall clock moved the service's clock, never
    before the last fact, past its data at the next start."""
    if audit.recorded_mode(Path(db)) == "sim":
        last = ledger.select("SELECT ts FROM facts ORDER BY seq DESC LIMIT 1")
        if last:
            return last[0]["ts"]
    return bot_now(ledger)


def reader(ctx: click.Context) -> Ledger:
    return Ledger(ctx.obj["db"], readonly=True)


def load_config(ctx: click.Context) -> config_mod.Config:
    return config_mod.load(ctx.obj["config_path"])


# -- audits -----------------------------------------------------------------------------


@main.command()
@json_option
@click.pass_context
@refusing
def status(ctx: click.Context, as_json: bool) -> None:
    """Mode, equity, open positions, halts, and each job's last run."""
    cfg = load_config(ctx)
    mode = audit.recorded_mode(Path(ctx.obj["db"]))
    with reader(ctx) as ledger:
        state = ledger.state()
        now = audit.backtest_now(ledger.select(
            "SELECT ts FROM facts ORDER BY seq DESC LIMIT 1")[0]["ts"]) \
            if mode == audit.BACKTEST_KIND else bot_now(ledger)
    report = {
        "ledger": ctx.obj["db"],
        "now": iso(now),  # the bot's: a simulated clock runs ahead of the wall clock
        "mode": mode or cfg.bot.mode,
        "exchange": cfg.exchange.id,
        "equity": state.equity,
        "equity_peak": state.equity_peak,
        "realized_today": str(state.realized_today_at(now)),
        "open_positions": [
            {"symbol": p["symbol"], "side": p["side"], "amount": p["amount"],
             "entry_price": p["entry_price"], "best_price": p["best_price"],
             "stop": (p["stop"] or {}).get("price")} for p in state.positions.values()],
        "halts": state.halts,
        "ip_banned_until": iso(state.ip_ban_until_ms) if state.ip_ban_until_ms > now else None,
        "external_positions": state.external,
        "unresolved_orders": len(state.unresolved_orders()),
        "active_coins": state.active_coins,
        "last_runs": {job: {**run, "at": iso(run["ts"]), "ago_s": round((now - run["ts"]) / 1000)}
                      for job, run in sorted(state.last_runs.items())},
        "last_seq": state.seq,
    }
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    click.echo(f"ledger      {report['ledger']} (seq {report['last_seq']})")
    click.echo(f"mode        {report['mode']} on {report['exchange']}")
    if mode == "sim":  # its times (runs, "ago") are by the simulated exchange's clock
        click.echo(f"clock       simulated: {report['now']} by the bot's clock ([sim] speed "
                   "runs it ahead of the wall clock)")
    click.echo(f"equity      {report['equity'] or '-'} (peak {report['equity_peak'] or '-'})")
    click.echo(f"today       realized {report['realized_today']}")
    halts = ", ".join(f"{k}: {v['reason']}" for k, v in state.halts.items()) or "none"
    click.echo(f"halts       {halts}")
    if report["ip_banned_until"]:
        click.echo(f"ip ban      the exchange banned this IP until {report['ip_banned_until']}: "
                   "nothing is called before then")
    if state.external:  # reconcile flagged them; the bot does not trade these symbols
        flagged = ", ".join(f"{s} {e['side']} {e['amount']}" for s, e in state.external.items())
        click.echo(f"external    {flagged} (not ours: no entries until closed or adopted)")
    click.echo(f"coins       {', '.join(state.active_coins) or '-'}")
    click.echo(f"unresolved  {report['unresolved_orders']} order(s) awaiting reconciliation")
    click.echo("")
    render(report["open_positions"], False, empty="no open positions")
    click.echo("")
    runs = [{"job": job, "last run": r["at"], "ago": f"{r['ago_s']} s",
             "outcome": r["outcome"] if r.get("failing_since") is None
             else f"{r['outcome']} (failing since {iso(r['failing_since'])})",
             "duration_ms": r["duration_ms"]} for job, r in report["last_runs"].items()]
    render(runs, False, empty="a backtest records no job runs" if report["mode"] ==
           audit.BACKTEST_KIND else "no job has run yet")


@main.command()
@json_option
@click.pass_context
@refusing
def positions(ctx: click.Context, as_json: bool) -> None:
    """Open positions."""
    with reader(ctx) as ledger:
        render(audit.positions(ledger), as_json, empty="no open positions")


@main.command()
@click.option("--since", help="YYYY-MM-DD or ISO time (UTC).")
@click.option("--symbol", help="Only this symbol, e.g. BTC/USDT:USDT.")
@click.option("--tail", type=click.IntRange(min=1, max=MAX_TAIL), help="Only the last N trades.")
@json_option
@click.pass_context
@refusing
def trades(ctx, since, symbol, tail, as_json) -> None:
    """Closed trades: entry, exit, size, fees, realized PnL, exit reason, duration."""
    with reader(ctx) as ledger:
        render(audit.trades(ledger, since, symbol, tail), as_json, empty="no closed trades")


@main.command()
@click.option("--by", type=click.Choice(["day", "symbol"]), default="day", show_default=True)
@json_option
@click.pass_context
@refusing
def pnl(ctx, by, as_json) -> None:
    """Realized PnL per UTC day or per symbol."""
    with reader(ctx) as ledger:
        render(audit.pnl(ledger, by), as_json, empty="no realized PnL yet")


@main.command()
@click.option("--tail", type=click.IntRange(min=1, max=MAX_TAIL), default=50, show_default=True)
@json_option
@click.pass_context
@refusing
def orders(ctx, tail, as_json) -> None:
    """The orders timeline: intents, submissions, state changes, fills."""
    with reader(ctx) as ledger:
        render(audit.orders(ledger, tail), as_json, empty="no orders")


@main.command()
@click.option("--tail", type=click.IntRange(min=1, max=MAX_TAIL), default=20, show_default=True)
@json_option
@click.pass_context
@refusing
def events(ctx, tail, as_json) -> None:
    """The last N facts of any kind."""
    with reader(ctx) as ledger:
        render(audit.events(ledger, tail), as_json, empty="the ledger is empty")


@main.command()
@json_option
@click.pass_context
@refusing
def verify(ctx, as_json) -> None:
    """Recompute the hash chain; exit 1 naming the first bad row if it is broken."""
    with reader(ctx) as ledger:
        report = ledger.verify(workers=None)  # a large ledger on all cores
    if as_json:
        click.echo(json.dumps(report.__dict__))
    elif report.ok:
        click.echo(f"ok: {report.rows} rows verified, chain intact up to seq {report.last_seq}")
    elif report.first_bad_seq is None:  # the rows are intact; the schema is not
        click.echo(f"BROKEN: {report.problem}", err=True)
    else:
        click.echo(f"BROKEN at seq {report.first_bad_seq}: {report.problem}", err=True)
    sys.exit(0 if report.ok else 1)


@main.command()
@click.argument("sql")
@json_option
@click.pass_context
@refusing
def query(ctx, sql, as_json) -> None:
    """Run one read-only SQL statement against the ledger and its views."""
    if not sql.strip():
        raise Refused("query: the SQL is empty")
    with reader(ctx) as ledger:  # refuses anything that is not our ledger
        path = ledger.path
    refused: list[str] = []
    with contextlib.closing(connect(path, readonly=True)) as conn, _interruptible(conn):
        conn.set_authorizer(functools.partial(_reads_only, refused))
        try:
            cur = conn.execute(sql)
            names = [d[0] for d in cur.description or ()]
            rows = [{n: (v.hex() if isinstance(v, bytes) else v)
                     for n, v in zip(names, row, strict=True)} for row in cur]
        except sqlite3.DatabaseError as exc:  # includes ProgrammingError (two statements)
            if refused or "readonly" in str(exc) or "may not be modified" in str(exc):
                what = refused[0] if refused else str(exc)
                raise Refused(f"query is read-only; refused {what}") from None
            if "interrupted" in str(exc):
                raise Refused("query interrupted (Ctrl-C)") from None
            raise Refused(f"query failed: {exc}") from None
    render(rows, as_json, empty="(no rows)")


@contextlib.contextmanager
def _interruptible(conn: sqlite3.Connection):
    """Ctrl-C stops a running statement. Python runs a signal handler only between its
    own bytecodes, never inside SQLite: a progress handler, called by SQLite every few
    thousand steps, runs it and then aborts the statement."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may handle signals (an embedded caller's thread)
        return
    asked = []
    previous = signal.signal(signal.SIGINT, lambda *_: asked.append(True))
    conn.set_progress_handler(lambda: 1 if asked else 0, 10_000)
    try:
        yield
    finally:
        conn.set_progress_handler(None, 0)
        signal.signal(signal.SIGINT, previous)


# Pragmas `query` may run: they only report. Those in PRAGMA_ARGS take a table name or a
# count; any other pragma with an argument is an assignment and refused.
READ_PRAGMAS = frozenset(
    "table_info table_xinfo table_list index_list index_info index_xinfo foreign_key_list "
    "integrity_check quick_check user_version application_id schema_version data_version "
    "page_count page_size freelist_count journal_mode encoding compile_options "
    "database_list collation_list function_list module_list pragma_list".split())
PRAGMA_ARGS = frozenset(
    "table_info table_xinfo table_list index_list index_info index_xinfo foreign_key_list "
    "integrity_check quick_check".split())
AUTH_ACTIONS = {getattr(sqlite3, f"SQLITE_{name}"): name.replace("_", " ") for name in (
    "INSERT UPDATE DELETE CREATE_TABLE CREATE_TEMP_TABLE CREATE_INDEX CREATE_TEMP_INDEX "
    "CREATE_VIEW CREATE_TEMP_VIEW CREATE_TRIGGER CREATE_TEMP_TRIGGER CREATE_VTABLE DROP_TABLE "
    "DROP_TEMP_TABLE DROP_INDEX DROP_TEMP_INDEX DROP_VIEW DROP_TEMP_VIEW DROP_TRIGGER "
    "DROP_TEMP_TRIGGER DROP_VTABLE ALTER_TABLE REINDEX ANALYZE ATTACH DETACH TRANSACTION "
    "SAVEPOINT PRAGMA".split())}

SCHEMA_WRITES = (sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE)


def _reads_only(refused: list[str], action: int, arg1, arg2, _db, _source) -> int:
    """SQLite authorizer for `query`: reads pass; anything else is denied before it runs.

    The connection is read-only already; this also stops what that does not: ATTACH and
    VACUUM INTO (they create files), transactions and pragma assignments.
    """
    if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                  sqlite3.SQLITE_RECURSIVE):
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and arg1.lower() in READ_PRAGMAS and (
            arg2 is None or arg1.lower() in PRAGMA_ARGS):
        return sqlite3.SQLITE_OK
    if action in SCHEMA_WRITES and arg1 in ("sqlite_master", "sqlite_temp_master"):
        # Table-valued functions (json_each, pragma_table_info) declare their schema this
        # way; CREATE/DROP ask here first and are refused, by name, on the next call.
        return sqlite3.SQLITE_OK
    refused.append(" ".join(str(a) for a in (AUTH_ACTIONS.get(action, action), arg1, arg2)
                            if a))
    return sqlite3.SQLITE_DENY


@main.command()
@click.argument("view")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv",
              show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="File (default stdout).")
@click.pass_context
@refusing
def export(ctx, view, fmt, output) -> None:
    """Export a view (open_positions, closed_trades, daily_pnl, ...) as CSV or JSON."""
    if output == "-":
        output = None  # stdout, as usual for "-"
    with reader(ctx) as ledger:
        if output and _same_file(Path(output), ledger.path):
            raise Refused(f"{output}: that is the ledger itself (or its -wal, -shm or "
                          "-journal file); nothing was written")
        rows = audit.export(ledger, view)
        # An empty view still exports its header, so a consumer sees the columns.
        names = list(rows[0]) if rows else [
            c["name"] for c in ledger.select("SELECT name FROM pragma_table_info(?)", (view,))]
    if fmt == "json":
        text = json.dumps(rows, indent=2, default=str) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    if output:
        try:
            Path(output).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise Refused(f"{output}: cannot write ({exc.strerror or exc}); the export was "
                          "not written") from None
    else:
        click.echo(text, nl=False)


def _same_file(output: Path, ledger: Path) -> bool:
    """Would writing ``output`` overwrite the ledger or one of its side files (by any name:
    a symlink, a hard link)? A -journal there would be taken for a hot rollback journal."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        side = Path(f"{ledger.resolve()}{suffix}")
        if output.resolve() == side:
            return True
        with contextlib.suppress(OSError):  # either missing: not the same file
            if os.path.samefile(output, side):
                return True
    return False


# -- the service and its jobs -----------------------------------------------------------


@main.command()
@click.pass_context
@refusing
def run(ctx) -> None:
    """Start the service (offline simulated exchange unless configured otherwise)."""
    import scheduler

    cfg = load_config(ctx)
    try:
        code = scheduler.serve(cfg, ctx.obj["db"])
    except (AlreadyRunning, scheduler.StartRefused) as exc:
        raise Refused(str(exc)) from None
    except scheduler.StartFailed as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    sys.exit(code)


def _locked_runtime(ctx: click.Context):
    """The runtime for a one-off command, holding the ledger's lock (no service running)."""
    from core import runtime
    from core.exchange import IpBanned

    cfg = load_config(ctx)
    config_mod.check_can_trade(cfg)
    runtime.check_ledger_mode(ctx.obj["db"], cfg.bot.mode)
    lock = LedgerLock(ctx.obj["db"])
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        raise Refused(f"{exc}; the service runs this itself - stop it first") from None
    try:
        return lock, runtime.build(cfg, ctx.obj["db"])
    except IpBanned as exc:
        lock.release()
        raise Refused(str(exc)) from None
    except BaseException:
        lock.release()
        raise


RECONCILE_EXIT = {"in_sync": 0, "corrected": 1, "needs_human": 2}


@main.command()
@click.option("--dry-run", is_flag=True, help="Show the differences; change nothing.")
@json_option
@click.pass_context
@refusing
def reconcile(ctx, dry_run, as_json) -> None:
    """Square the ledger with the exchange. Exit 0 in sync, 1 corrected, 2 a human must look."""
    from jobs import reconcile as job
    from jobs.runner import run_job

    lock, rt = _locked_runtime(ctx)
    try:
        if dry_run:
            report = job.run(rt, rt.clock.now_ms(), "reconcile-dry-run", dry_run=True)
        else:
            record = run_job(rt, "reconcile", job.run)
            if record["outcome"] == "error":
                raise Refused("reconcile failed; see the log and `cli.py events`")
            report = record["summary"]
    finally:
        rt.close()
        lock.release()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        click.echo(f"status: {report['status']}" + (" (dry run)" if dry_run else ""))
        render(report["differences"], False, empty="no differences: ledger and exchange agree")
    sys.exit(RECONCILE_EXIT[report["status"]])


@main.command("lift-ban")
@click.pass_context
@refusing
def lift_ban(ctx) -> None:
    """Forget the exchange's IP ban the ledger recorded (the bot runs from another IP now,
    or the ban is known to be over): the next start calls the exchange again."""
    from ledger import Fact

    refuse_backtest_ledger(ctx.obj["db"])
    with Ledger(ctx.obj["db"]) as ledger:
        until, now = ledger.state().ip_ban_until_ms, bot_now(ledger)
        if until <= now:
            click.echo("no IP ban in force")
            return
        ledger.append([Fact("ip_ban", fact_now(ctx.obj["db"], ledger), reason="lifted by hand",
                            data={"lifted": True})])
    click.echo(f"IP ban until {iso(until)} lifted: the bot calls the exchange from its next "
               "start (a bot running now keeps it until it restarts)")


def refuse_backtest_ledger(db) -> None:
    """A backtest's ledger is a record of a run, not a bot: nothing to halt or resume."""
    if audit.recorded_mode(Path(db)) == audit.BACKTEST_KIND:
        raise Refused(f"{db}: a backtest's ledger; no bot runs on it to halt or resume")


@main.command()
@click.option("--reason", default="manual halt", show_default=True)
@click.pass_context
@refusing
def halt(ctx, reason) -> None:
    """Stop new entries until `resume` (open positions stay managed)."""
    from ledger import Fact

    refuse_backtest_ledger(ctx.obj["db"])
    with Ledger(ctx.obj["db"]) as ledger:
        ledger.append([Fact("halt", fact_now(ctx.obj["db"], ledger), reason=reason,
                            data={"kind": "manual", "detail": reason})])
    click.echo(f"halted: {reason}")


@main.command()
@click.option("--kind", default="all", show_default=True,
              type=click.Choice(["all", "manual", "drawdown", "daily_loss"]))
@click.pass_context
@refusing
def resume(ctx, kind) -> None:
    """Lift halts (all, or one kind). After a drawdown halt, the peak restarts from here."""
    from ledger import Fact

    refuse_backtest_ledger(ctx.obj["db"])
    with Ledger(ctx.obj["db"]) as ledger:
        halts = ledger.state().halts
        if not halts or (kind != "all" and kind not in halts):
            # (A resume of drawdown also restarts the equity peak: never by mistake.)
            click.echo(f"not halted{'' if kind == 'all' else f' for {kind}'}")
            return
        ledger.append([Fact("resume", fact_now(ctx.obj["db"], ledger), reason=f"resume {kind}",
                            data={"kind": kind})])
    click.echo(f"resumed ({kind}); was: {', '.join(halts)}")


@main.command("job")
@click.argument("name", type=click.Choice(["scan", "rotate", "daily_reset", "reconcile"]))
@json_option
@click.pass_context
@refusing
def job_cmd(ctx, name, as_json) -> None:
    """Run one job once, now (the service must not be running)."""
    import scheduler
    from jobs.runner import run_job

    lock, rt = _locked_runtime(ctx)
    try:
        record = run_job(rt, name, scheduler.JOBS[name])
    finally:
        rt.close()
        lock.release()
    if as_json:
        click.echo(json.dumps(record, indent=2, default=str))
    else:
        click.echo(f"{name}: {record['outcome']} in {record['duration_ms']} ms "
                   f"{json.dumps(record['summary'], default=str)}")
    sys.exit(0 if record["outcome"] != "error" else 1)


# -- dashboard --------------------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; beyond localhost needs BOT_DASHBOARD_TOKEN.")
@click.option("--port", default=8050, show_default=True, type=click.IntRange(0, 65535))
@click.pass_context
@refusing
def dashboard(ctx, host, port) -> None:
    """Serve the read-only web dashboard: positions, P&L, job health (GET /health)."""
    from core import dashboard as web

    web.serve(load_config(ctx), ctx.obj["db"], host, port, echo=click.echo)


# -- backtests (core/backtest_run.py does the work) -------------------------------------


def _backtest_db(ctx: click.Context, db_path: str | None) -> str:
    """`backtest --db`, else the group's --db if given explicitly, else backtest.db."""
    if db_path:
        return db_path
    explicit = ctx.find_root().get_parameter_source("db") != click.core.ParameterSource.DEFAULT
    return ctx.obj["db"] if explicit else "backtest.db"


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(),
              help="Folder of BASE_QUOTE-TF.csv candles.")
@click.option("--strategy", help="Strategy name (default: [strategy] name of the config).")
@click.option("--from", "start", help="First candle: YYYY-MM-DD or ISO time (UTC).")
@click.option("--to", "end", help="End, exclusive: YYYY-MM-DD or ISO time (UTC).")
@click.option("--db", "db_path", type=click.Path(dir_okay=False),
              help="Ledger to write [default: backtest.db]; an earlier backtest's is replaced.")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Write the equity and drawdown chart: .png, .html or .svg.")
@json_option
@click.pass_context
@refusing
def backtest(ctx, data_dir, strategy, start, end, db_path, plot, as_json) -> None:
    """Replay candles through the live strategy, risk and execution code into a ledger."""
    from core.backtest_run import backtest_command

    click.echo(backtest_command(load_config(ctx), data_dir, strategy=strategy, start=start,
                                end=end, db_path=_backtest_db(ctx, db_path), plot=plot,
                                as_json=as_json))
    if ctx.obj.get("exit_when_done"):
        exit_now()


def exit_now() -> None:
    """End the process at once, its output flushed: a backtest has closed everything it
    opened, and Python's teardown of ccxt's and pandas' modules takes ~0.2 s, a tenth of
    the run. Only when no other thread runs, else the normal exit follows."""
    if threading.active_count() > 1:
        return
    logging.shutdown()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None: started with it closed
                stream.flush()
    except (OSError, ValueError):
        return  # a closed pipe or file: the normal exit reports it
    os._exit(0)


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(),
              help="Folder of BASE_QUOTE-TF.csv candles.")
@click.option("--grid", "grid_path", required=True, type=click.Path(dir_okay=False),
              help="TOML file of parameter lists per config section (see core/walkforward.py).")
@click.option("--train", default="7d", show_default=True, help="Training window: 7d, 36h, ...")
@click.option("--test", default="2d", show_default=True, help="Test window that follows it.")
@click.option("--strategy", help="Strategy name (default: [strategy] name of the config).")
@click.option("--from", "start", help="Start of the data used (YYYY-MM-DD, UTC).")
@click.option("--to", "end", help="End of the data used, exclusive.")
@click.option("--objective", default="total_return", show_default=True,
              type=click.Choice(["total_return", "sharpe", "sortino", "profit_factor"]))
@click.option("--workers", type=click.IntRange(min=1), help="Processes [default: all cores].")
@json_option
@click.pass_context
@refusing
def walkforward(ctx, data_dir, grid_path, train, test, strategy, start, end, objective,
                workers, as_json) -> None:
    """Optimise on rolling training windows, judge on the windows that follow."""
    from core.backtest_run import walkforward_command

    click.echo(walkforward_command(load_config(ctx), data_dir, grid_path=grid_path,
                                   train=train, test=test, strategy=strategy, start=start,
                                   end=end, objective=objective, workers=workers,
                                   as_json=as_json))


# -- config -----------------------------------------------------------------------------


@main.group("config")
def config_group() -> None:
    """Inspect the effective configuration."""


@config_group.command("show")
@json_option
@click.pass_context
@refusing
def config_show(ctx, as_json) -> None:
    """The effective config (defaults + bot.toml); secrets shown only as set/not set."""
    cfg = load_config(ctx.find_root())
    values = config_mod.to_mapping(cfg)
    secrets = {var: config_mod.mask(getattr(cfg.secrets, name))
               for name, var in config_mod.SECRET_ENV.items()}
    if as_json:
        click.echo(json.dumps({"source": cfg.source, "config": values,
                               "secrets_from_environment": secrets}, indent=2))
        return
    click.echo(f"# effective config from {cfg.source}")
    for section, items in values.items():
        click.echo(f"\n[{section}]")
        for key, value in items.items():
            click.echo(f"{key} = {json.dumps(value)}")
    click.echo("\n# secrets (environment variables only)")
    for var, shown in secrets.items():
        click.echo(f"# {var}: {shown}")


if __name__ == "__main__":
    main(obj={"exit_when_done": True})  # in process (tests), a command returns instead
