"""The service commands of cli.py: reconcile, halt, resume, job.

In sim mode the simulated exchange keeps its state in a file (``[sim] state_path``), so
the test's setup and the command share one "exchange", as the bot and Binance would.
Commands run in-process through click's runner; the ledger lock is held by a real
second process where a test needs one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_jobs_scan import T0, Pick

import cli
from core import config as config_mod
from core import runtime
from core.clock import VirtualClock
from core.sim_exchange import SimExchange
from core.venues import quiet_open_orders
from ledger import Ledger
from ledger.lock import LedgerLock

SYM = "ALPHA/USDT:USDT"  # the synthetic market's first symbol
TOML = """\
[bot]
mode = "sim"
log_dir = "{folder}/logs"

[sim]
state_path = "{folder}/sim_exchange.db"
symbols = 4
speed = 1.0
slippage_bps = 0.0
"""


class World:
    """A ledger and a persisted simulated exchange in a folder, and the CLI over them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.toml = folder / "bot.toml"
        self.toml.write_text(TOML.format(folder=folder))
        self.db = folder / "bot.db"
        self.config = config_mod.load(self.toml)
        self.now = T0 + 1_000

    def runtime(self) -> runtime.Runtime:
        """The bot, as a process of its own would build it (at the world's time)."""
        clock = VirtualClock(self.now)
        venue = SimExchange.from_config(self.config, clock, state_path=self.config.sim.state_path)
        quiet_open_orders(venue)
        return runtime.build(self.config, self.db, clock=clock, venue=venue)

    def cli(self, *args: str):
        result = CliRunner().invoke(cli.main, ["--db", str(self.db), "--config", str(self.toml),
                                               *args])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result

    def last_seq(self) -> int:
        with Ledger(self.db, readonly=True) as ledger:
            return ledger.state().seq

    def facts(self, type_: str) -> list[dict]:
        with Ledger(self.db, readonly=True) as ledger:
            return ledger.select("SELECT * FROM facts WHERE type = ? ORDER BY seq", (type_,))


@pytest.fixture
def world(tmp_path) -> World:
    return World(tmp_path)


def trading(world: World) -> dict:
    """The bot opened a long in SYM (with its stop) and stopped."""
    from jobs import scan
    from jobs.runner import run_job
    from ledger import Fact

    rt = world.runtime()
    try:
        rt.strategy = Pick(long_at=[T0 - 300_000])
        rt.ledger.append([Fact("rotation", world.now, data={"coins": [SYM]})])
        run_job(rt, "scan", scan.run, T0)
        position = rt.ledger.state().positions[SYM]
        assert position["stop"]
        return position
    finally:
        rt.close()


def behind_the_bots_back(world: World, action) -> None:
    clock = VirtualClock(world.now + 60_000)
    venue = SimExchange.from_config(world.config, clock, state_path=world.config.sim.state_path)
    try:
        action(venue)
    finally:
        venue.close()


# -- reconcile ----------------------------------------------------------------------------

def test_reconcile_on_a_fresh_ledger_is_in_sync(world):
    result = world.cli("reconcile")
    assert result.exit_code == 0, result.output
    assert "status: in_sync" in result.output
    assert "no differences" in result.output


def test_reconcile_corrects_a_manual_close_then_finds_nothing_to_do(world):
    position = trading(world)
    behind_the_bots_back(world, lambda v: v.create_order(
        SYM, "market", "sell", float(position["amount"]), None, {"reduceOnly": True}))

    seq = world.last_seq()
    data = world.db.read_bytes()
    dry = world.cli("reconcile", "--dry-run")
    assert dry.exit_code == 1, dry.output
    assert "(dry run)" in dry.output and "position_gone" in dry.output
    assert world.last_seq() == seq and world.db.read_bytes() == data  # recorded nothing

    fixed = world.cli("reconcile")
    assert fixed.exit_code == 1, fixed.output
    assert "status: corrected" in fixed.output
    for word in ("position_gone", "orphan_stop", "recorded the closing fills", "cancelled"):
        assert word in fixed.output
    [closed] = world.facts("position_closed")
    assert closed["reason"] == "closed_on_exchange"

    again = world.cli("reconcile", "--json")
    assert again.exit_code == 0, again.output
    report = json.loads(again.output)
    assert report["status"] == "in_sync" and report["differences"] == []


def test_reconcile_exits_2_when_a_human_must_look(world):
    def someone_buys(venue):
        venue.create_order(SYM, "market", "buy", float(venue.amount_to_precision(
            SYM, 500 / venue.fetch_ticker(SYM)["last"])))

    behind_the_bots_back(world, someone_buys)
    result = world.cli("reconcile", "--json")
    assert result.exit_code == 2, result.output
    report = json.loads(result.output)
    assert report["status"] == "needs_human"
    assert [d["kind"] for d in report["differences"] if d["severity"] == "human"] == [
        "external_position"]
    assert len(world.facts("external_position")) == 1
    assert world.cli("reconcile").exit_code == 2  # still there, still for a human
    assert len(world.facts("external_position")) == 1


# -- halt, resume, job ---------------------------------------------------------------------

def test_halt_and_resume(world):
    assert world.cli("resume").output.strip() == "not halted"
    result = world.cli("halt", "--reason", "going on holiday")
    assert result.exit_code == 0 and "halted: going on holiday" in result.output
    with Ledger(world.db, readonly=True) as ledger:
        assert ledger.state().halts["manual"]["reason"] == "going on holiday"
    # Resuming a kind that is not halted changes nothing (a drawdown resume would
    # restart the equity peak).
    seq = world.last_seq()
    assert world.cli("resume", "--kind", "drawdown").output.strip() == \
        "not halted for drawdown"
    assert world.last_seq() == seq
    result = world.cli("resume", "--kind", "manual")
    assert result.exit_code == 0 and "was: manual" in result.output
    with Ledger(world.db, readonly=True) as ledger:
        assert ledger.state().halts == {}


def test_a_halt_from_the_cli_refuses_the_next_entry(world):
    world.cli("halt")
    rt = world.runtime()
    try:
        from jobs import scan
        from jobs.runner import run_job
        from ledger import Fact

        rt.strategy = Pick(long_at=[T0 - 300_000])
        rt.ledger.append([Fact("rotation", world.now, data={"coins": [SYM]})])
        run_job(rt, "scan", scan.run, T0)
        [decision] = rt.ledger.select("SELECT reason FROM facts WHERE type = 'risk_decision'")
        assert decision["reason"] == "halted:manual"
        assert rt.ledger.state().positions == {}
    finally:
        rt.close()


def test_job_runs_one_job_once_and_records_it(world):
    result = world.cli("job", "rotate")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("rotate: ok")
    [rotation] = world.facts("rotation")
    assert len(json.loads(rotation["data"])["coins"]) == 4
    result = world.cli("job", "scan", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["job"] == "scan" and record["outcome"] == "ok"
    assert record["summary"]["symbols"] == 4
    runs = [json.loads(r["data"])["job"] for r in world.facts("job_run")]
    assert runs == ["rotate", "scan"]


HOLD_LOCK = """
import sys, time
from ledger.lock import LedgerLock
lock = LedgerLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("args", [("job", "scan"), ("reconcile",)])
def test_job_and_reconcile_refuse_while_another_process_holds_the_ledger(world, spawn_python,
                                                                         args):
    holder = spawn_python(HOLD_LOCK, world.db)
    assert holder.stdout.readline().strip() == "locked"
    result = world.cli(*args)
    assert result.exit_code == 2
    assert f"in use by process {holder.pid}" in result.output
    assert not world.db.exists() or world.last_seq() == 0  # nothing ran
    holder.kill()
    holder.wait()
    assert world.cli(*args).exit_code == 0  # free again


def invoke_run(tmp_path: Path, env: dict | None = None):
    """`run` on the ledger in ``tmp_path``, in this process (for a start refused or
    failed). It sets the process's logging up (levels, handlers): restored after."""
    loggers = [logging.getLogger(n) for n in ("", "ccxt", "apscheduler")]
    saved = [(lg, lg.level, list(lg.handlers)) for lg in loggers]
    try:
        return CliRunner().invoke(cli.main, ["--db", str(tmp_path / "bot.db"), "run"], env=env)
    finally:
        for lg, level, handlers in saved:
            lg.setLevel(level)
            lg.handlers[:] = handlers


@pytest.mark.parametrize(("written", "mode", "said"), [
    # a sim ledger's long, managed on another account: a live bot would sell a real one
    ({"type": "service", "data": {"event": "started", "mode": "sim"}}, "paper",
     "written by the bot in [bot] mode = 'sim', and the config says 'paper'"),
    ({"type": "service", "data": {"event": "started", "mode": "paper"}}, "sim",
     "written by the bot in [bot] mode = 'paper', and the config says 'sim'"),
    # one-off jobs only (no service ever ran on it)
    ({"type": "job_run", "data": {"job": "scan", "outcome": "ok", "mode": "sim"}}, "live",
     "written by the bot in [bot] mode = 'sim', and the config says 'live'"),
    # a backtest's positions traded by the service, its history mixed with a run's
    ({"type": "note", "data": {"kind": "backtest"}, "reason": "backtest start"}, "sim",
     "a backtest's ledger; the bot does not trade on it"),
])
@pytest.mark.parametrize("older_schema", [False, True])
def test_a_ledger_of_another_mode_is_refused_before_anything_runs(tmp_path, monkeypatch,
                                                                 written, mode, said,
                                                                 older_schema):
    import sqlite3
    import subprocess
    import sys

    from ledger import Fact

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bot.toml").write_text(f'[bot]\nmode = "{mode}"\n')
    db = tmp_path / "bot.db"
    with Ledger(db) as ledger:
        ledger.append([Fact(written["type"], T0, reason=written.get("reason"),
                            data=written["data"])])
    if older_schema:  # one that `run` would migrate: asked all the same
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA user_version = 2")
    before = sorted(p.name for p in tmp_path.iterdir())
    env = {"BOT_API_KEY": "k", "BOT_API_SECRET": "s"}  # live's start needs them
    for command in (["job", "scan"], ["reconcile"]):
        result = CliRunner().invoke(cli.main, ["--db", str(db), *command], env=env)
        assert result.exit_code == 2, (command, result.output)
        assert said in result.output and "Traceback" not in result.output, result.output
    # `run` in a process of its own: if it were not refused it would serve (here: time out)
    run = subprocess.run([sys.executable, str(Path(cli.__file__)), "--db", str(db), "run"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env})
    assert run.returncode == 2 and said in run.stderr, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no file made: no lock,
    with sqlite3.connect(db) as conn:  # logs, state file, -wal; nothing recorded
        assert conn.execute("SELECT count(*) FROM facts").fetchone()[0] == 1


KILLED_AFTER_A_SERVICE_START = """
import os, sys
from ledger import Fact, Ledger
ledger = Ledger(sys.argv[1])
ledger.append([Fact("service", 1, data={"event": "started", "mode": "paper"})])
os.kill(os.getpid(), 9)  # the fact stays in the -wal file, beside the real file
"""


def test_the_mode_is_read_through_a_symlink_after_a_crash(tmp_path, run_python):
    """Through a symlink the -wal file was looked for beside the link: the ledger was
    read without it, its mode unknown, and `run` served a paper ledger in sim mode."""
    from ledger.audit import recorded_mode

    real, link = tmp_path / "real.db", tmp_path / "link.db"
    assert run_python(KILLED_AFTER_A_SERVICE_START, real).returncode == -9
    link.symlink_to(real)
    assert (tmp_path / "real.db-wal").exists()
    assert recorded_mode(link) == recorded_mode(real) == "paper"
    assert recorded_mode(tmp_path / "none.db") is None
    assert not (tmp_path / "none.db").exists()  # asking made no file


def test_halt_and_resume_refuse_a_backtests_ledger(tmp_path):
    from ledger import Fact

    db = tmp_path / "bt.db"
    with Ledger(db) as ledger:
        ledger.append([Fact("note", T0, reason="backtest start", data={"kind": "backtest"})])
    for command in (["halt"], ["resume"]):
        result = CliRunner().invoke(cli.main, ["--db", str(db), *command])
        assert result.exit_code == 2 and "a backtest's ledger" in result.output, result.output
    with Ledger(db, readonly=True) as ledger:
        assert ledger.last_seq() == 1


@pytest.mark.parametrize(("log_dir", "said"), [
    ("x" * 300, "cannot be used (File name too long)"),  # the config's check crashed
    # the check passes (root may write /proc, says access()), then making it fails
    pytest.param("/proc/no/logs", "cannot write logs there", marks=pytest.mark.skipif(
        os.geteuid() != 0, reason="only root passes the check for /proc")),
])
def test_a_log_folder_that_cannot_be_made_refuses_the_start_in_one_line(tmp_path,
                                                                       monkeypatch,
                                                                       log_dir, said):
    """A traceback and exit 1 (a restart policy retrying for ever), and an error at exit."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bot.toml").write_text(f'[bot]\nlog_dir = "{log_dir}"\n')
    result = invoke_run(tmp_path)
    assert result.exit_code == 2, result.output
    assert "[bot] log_dir" in result.output and said in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("mode", "error", "code", "said"), [
    ("live", "NetworkError", 1, "could not be read from the exchange"),
    ("live", "AuthenticationError", 2, "refused the API keys"),
    # paper's market data come from the exchange: a traceback when it was unreachable
    ("paper", "NetworkError", 1, "the exchange could not be reached")])
def test_a_start_the_exchange_cannot_answer_is_one_clear_line(tmp_path, monkeypatch, mode,
                                                             error, code, said):
    # Only the transport is faked: the exchange unreachable (exit 1: a restart policy
    # tries again) or refusing the keys (exit 2: a person must look).
    import ccxt

    def fetch(self, url, method="GET", headers=None, body=None):
        raise getattr(ccxt, error)(f"binanceusdm GET {url}")

    monkeypatch.setattr(ccxt.binanceusdm, "fetch", fetch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bot.toml").write_text(f'[bot]\nmode = "{mode}"\nlog_dir = ""\n'
                                       '[exchange]\nread_retries = 0\n'
                                       f'[sim]\nstate_path = "{tmp_path}/paper.db"\n')
    result = invoke_run(tmp_path, env={"BOT_API_KEY": "k3y", "BOT_API_SECRET": "s3cr3t"})
    assert result.exit_code == code, result.output
    last = result.stderr.strip().splitlines()[-1]  # after the client's own log line
    assert last.startswith("error: not started:") and said in last
    assert "Traceback" not in result.output and "s3cr3t" not in result.output
    assert "signature=..." in result.stderr or "signature" not in result.stderr


@pytest.mark.parametrize("mode", ["live", "paper"])
def test_a_start_during_a_recorded_ip_ban_calls_nothing(tmp_path, monkeypatch, mode):
    """The exchange banned this IP (HTTP 418) until an hour from now, and the bot was
    restarted (systemd, a person). Each call into a ban lengthens it: the start calls
    nothing and fails in one line naming the ban (exit 1: a restart policy tries again)."""
    import ccxt

    from core.clock import WallClock
    from ledger import Fact

    calls: list[str] = []

    def fetch(self, url, method="GET", headers=None, body=None):
        calls.append(url)
        raise ccxt.NetworkError(f"binanceusdm GET {url}")

    monkeypatch.setattr(ccxt.binanceusdm, "fetch", fetch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bot.toml").write_text(f'[bot]\nmode = "{mode}"\nlog_dir = ""\n'
                                       f'[sim]\nstate_path = "{tmp_path}/paper.db"\n')
    now = WallClock().now_ms()
    with Ledger(tmp_path / "bot.db") as ledger:
        ledger.append([Fact("service", now - 60_000, data={"event": "started", "mode": mode}),
                       Fact("ip_ban", now - 30_000, reason="banned",
                            data={"until_ms": now + 3_600_000})])
    result = invoke_run(tmp_path, env={"BOT_API_KEY": "k3y", "BOT_API_SECRET": "s3cr3t"})
    assert result.exit_code == 1, result.output
    assert calls == []
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: not started:") and "banned" in last, result.stderr
    assert "bot lift-ban" in last and "could not be reached" not in last  # it was not tried
    assert "Traceback" not in result.output
    # A one-off command on it, the same (it held the ledger's lock: released)
    for command in (["reconcile"], ["job", "scan"]):
        one_off = CliRunner().invoke(cli.main, ["--db", str(tmp_path / "bot.db"), *command],
                                     env={"BOT_API_KEY": "k3y", "BOT_API_SECRET": "s3cr3t"})
        assert one_off.exit_code == 2 and "banned by the exchange" in one_off.output, \
            (command, one_off.output)
    assert calls == []
    lock = LedgerLock(tmp_path / "bot.db")
    lock.acquire()  # AlreadyRunning if a refused command had kept it
    lock.release()


@pytest.mark.parametrize("mode", ["live", "paper"])
def test_a_ban_the_start_meets_is_recorded_so_the_restart_calls_nothing(tmp_path,
                                                                      monkeypatch, mode):
    """Paper's start reads the exchange's markets before any client exists to hold a
    ban: a 418 there was not recorded, and each restart (every 10 s under systemd)
    called into the ban again, lengthening it."""
    import ccxt
    from sim_fixtures import raise_ip_ban

    calls: list[str] = []

    def fetch(self, url, method="GET", headers=None, body=None):
        calls.append(url)
        raise_ip_ban(7200)

    monkeypatch.setattr(ccxt.binanceusdm, "fetch", fetch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bot.toml").write_text(f'[bot]\nmode = "{mode}"\nlog_dir = ""\n'
                                       f'[sim]\nstate_path = "{tmp_path}/paper.db"\n')
    env = {"BOT_API_KEY": "k3y", "BOT_API_SECRET": "s3cr3t"}
    first = invoke_run(tmp_path, env=env)
    assert first.exit_code == 1 and len(calls) == 1, first.output
    assert "banned by the exchange until" in first.stderr.strip().splitlines()[-1]
    with Ledger(tmp_path / "bot.db") as ledger:
        assert ledger.state().ip_ban_until_ms > 0
    again = invoke_run(tmp_path, env=env)
    assert again.exit_code == 1 and len(calls) == 1, again.output  # nothing called
    assert "banned by the exchange until" in again.stderr.strip().splitlines()[-1]


HANGING_START = """
import sys
import ccxt
port, folder = sys.argv[1], sys.argv[2]
real_init = ccxt.binanceusdm.__init__
def through_proxy(self, config={}):  # every request goes to a proxy that never answers
    real_init(self, {**config, "httpsProxy": f"http://127.0.0.1:{port}"})
ccxt.binanceusdm.__init__ = through_proxy
import cli
sys.argv = ["cli.py", "--config", f"{folder}/bot.toml", "--db", f"{folder}/bot.db", "run"]
cli.main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("signals", [1, 2])
def test_a_stop_while_the_exchange_hangs_the_start(tmp_path, spawn_python, signals):
    """Paper's start waits on the exchange (here for ever: each request times out after
    its 3 s). One stop signal: it ends when that wait does, as a stop (exit 0), not as a
    start that failed (exit 1). A second signal ends it there and then."""
    import signal
    import socket
    import threading
    import time

    hole = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def hold_connections() -> None:  # until the test closes the socket
        with contextlib.suppress(OSError):
            while True:
                held.append(hole.accept()[0])

    threading.Thread(target=hold_connections, daemon=True).start()
    (tmp_path / "bot.toml").write_text(
        f'[bot]\nmode = "paper"\nlog_dir = ""\n[exchange]\ntimeout_ms = 3000\n'
        f'read_retries = 0\n[sim]\nstate_path = "{tmp_path}/paper.db"\n')
    proc = spawn_python(HANGING_START, hole.getsockname()[1], tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "bot.db.lock").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # asking the exchange now
        for _ in range(signals):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
        out, err = proc.communicate(timeout=60)
    finally:
        hole.close()
        for conn in held:
            conn.close()
    assert proc.returncode == 0, err
    assert "stopped while starting" in err and "Traceback" not in err
    # the second signal ends the start where it is, not when the exchange times out
    assert ("again while starting" in err) == (signals == 2)
    assert ("could not be reached" in err) == (signals == 1)
