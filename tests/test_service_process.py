"""The service as the user runs it: `cli.py run` in a folder, as a real process.

* one instance per ledger: a second `run` exits 2 naming the holder;
* SIGTERM / SIGINT / SIGHUP: the running job finishes, the stop is recorded, exit 0;
* with no config but a faster clock, it trades on the synthetic market, and
  `status`, `trades` and `pnl` show it; no secret reaches a log, the console or a file.
"""

from __future__ import annotations

import re
import signal
import time
from datetime import UTC, datetime

import pytest
from service_helpers import (
    SECRET_KEY,
    SECRET_VALUE,
    Bot,
    count,
    job_runs,
    log_text,
    service_events,
    write_toml,
)

pytestmark = pytest.mark.slow


def started(bot: Bot) -> bool:
    return any(r["job"] == "scan" for r in job_runs(bot))


def scan_just_started(bot: Bot) -> bool:
    """A scan has run before, and the one now going was started under 350 ms ago (the
    scheduler has dropped one or two due runs since the last finished). A drop logged
    within 50 ms of that finish was the finished run's own, not a sign of the next."""
    lines = bot.console().splitlines()
    done = [n for n, line in enumerate(lines) if re.search(r"job scan ok in", line)]
    if not done:
        return False
    finished = _log_ms(lines[done[-1]])
    dropped = sum("job scan skipped: previous run" in line and _log_ms(line) > finished + 50
                  for line in lines[done[-1]:])
    return 1 <= dropped <= 2


def _log_ms(line: str) -> float:
    """The console line's UTC time (2026-01-02T03:04:05.678Z ...) in ms."""
    stamp = datetime.strptime(line.split(" ", 1)[0] + "+0000", "%Y-%m-%dT%H:%M:%S.%fZ%z")
    return stamp.astimezone(UTC).timestamp() * 1000


def test_a_second_instance_on_the_same_ledger_exits_2_and_names_the_holder(tmp_path):
    bot = Bot(tmp_path)
    bot.start()
    try:
        bot.wait_for("the first scan", lambda: started(bot), timeout=60)
        second = bot.cli("run", timeout=60)
        assert second.returncode == 2, second.stderr
        assert f"in use by process {bot.proc.pid}" in second.stderr
        assert "bot.db" in second.stderr
        # One-off commands that write are refused while the service runs, too.
        job = bot.cli("reconcile", timeout=60)
        assert job.returncode == 2 and str(bot.proc.pid) in job.stderr
        assert bot.proc.poll() is None  # the first one is untouched
        assert bot.stop() == 0
    finally:
        bot.kill()
    assert [e["event"] for e in service_events(bot)] == ["started", "stopped"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_lets_the_running_job_finish_and_exits_0(tmp_path, sig):
    # Every venue call takes 600 ms and scans are due every 167 ms: a scan takes over
    # 1.2 s (the exchange's time, then the candles), and the scheduler drops a due run
    # every 167 ms of it. The signal goes
    # right after the first or second drop of a run: that scan has 250 ms or more to go.
    write_toml(tmp_path, {"sim": {"latency_ms": 600.0}})
    bot = Bot(tmp_path)
    bot.start()
    try:
        bot.wait_for("a scan in progress", lambda: scan_just_started(bot), timeout=90,
                     poll=0.02)
        t0 = time.monotonic()
        bot.send(sig)
        code = bot.proc.wait(30)  # generous: a clean stop takes about one scan
        took = time.monotonic() - t0
    finally:
        bot.kill()
    assert code == 0, bot.console()
    events = service_events(bot)
    assert [e["event"] for e in events] == ["started", "stopped"]
    assert events[-1]["pid"] == bot.proc.pid
    assert max(r["seq"] for r in job_runs(bot)) < events[-1]["seq"]
    console = bot.console()
    after_stop = console[console.index("stop requested"):]
    # (a reconcile, due every 5 bot-minutes, may be running beside it)
    assert re.search(r"running job\(s\): [a-z_, ]*\bscan\b", after_stop), after_stop
    assert re.search(r"job scan (ok|error) in", after_stop.split("service stopped")[0]), \
        "the scan running at the signal was not finished and recorded"
    assert "service stopped" in after_stop
    assert "Traceback" not in console
    assert bot.cli("verify").returncode == 0
    print(f"stopped {signal.Signals(sig).name} in {took:.2f} s")


def test_a_stop_during_start_up_finishes_that_job_and_never_starts_the_scheduler(tmp_path):
    write_toml(tmp_path, {"sim": {"latency_ms": 300.0}})  # start-up takes a few seconds
    bot = Bot(tmp_path)
    bot.start()
    try:
        bot.wait_for("the start", lambda: service_events(bot), timeout=60, poll=0.05)
        bot.send(signal.SIGTERM)
        code = bot.proc.wait(30)
    finally:
        bot.kill()
    assert code == 0, bot.console()
    assert [e["event"] for e in service_events(bot)] == ["started", "stopped"]
    done = job_runs(bot)
    assert done and done[0]["job"] == "reconcile"  # the job running at the signal finished
    assert "scan" not in {r["job"] for r in done}
    assert "service running" not in bot.console()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_the_service_is_being_built_is_a_clean_stop(tmp_path, sig):
    """Sent as soon as the ledger's lock is taken, while the ledger and the exchange are
    being opened: it used to end the process there (-15, or "Aborted!" and exit 1)."""
    bot = Bot(tmp_path)
    bot.start()
    try:
        bot.wait_for("the lock", lambda: (tmp_path / "bot.db.lock").exists(), timeout=60,
                     poll=0.002)
        bot.send(sig)
        code = bot.proc.wait(30)
    finally:
        bot.kill()
    assert code == 0, bot.console()
    assert "Traceback" not in bot.console() and "Aborted" not in bot.console()
    assert [e["event"] for e in service_events(bot)][-1:] == ["stopped"]
    assert "service running" not in bot.console()
    assert bot.cli("verify").returncode == 0


def test_run_with_no_config_trades_on_the_synthetic_market(tmp_path):
    """The defaults, except a faster clock so a trade closes within the test's patience
    (the default speed of 60 makes its first entry within minutes; see the README)."""
    write_toml(tmp_path, {"sim": {"speed": 600.0}})
    bot = Bot(tmp_path, BOT_API_KEY=SECRET_KEY, BOT_API_SECRET=SECRET_VALUE)
    bot.start()
    try:
        bot.wait_for("a closed trade", lambda: count(bot, "position_closed") > 0,
                     timeout=240, poll=0.5)
        assert bot.stop() == 0
    finally:
        bot.kill()
    assert (tmp_path / "bot.db").exists() and (tmp_path / "sim_exchange.db").exists()
    logs = list((tmp_path / "logs").glob("bot_*.log"))
    assert logs and all(re.fullmatch(r"bot_\d{4}-\d{2}-\d{2}\.log", p.name) for p in logs)
    text = log_text(tmp_path)
    assert "entry approved" in text and "service running: mode sim" in text
    assert "entry approved" in bot.console()  # and on the console

    status = bot.cli("status")
    assert status.returncode == 0, status.stderr
    assert "mode        sim" in status.stdout
    # the last scan may be one the scheduler dropped (skipped) as the stop came in
    assert re.search(r"scan\s+\S+\s+\d+ s\s+(ok|skipped)", status.stdout), status.stdout
    scans = bot.query("SELECT json_extract(data, '$.outcome') AS outcome, reason FROM facts "
                      "WHERE type = 'job_run' AND json_extract(data, '$.job') = 'scan'")
    assert any(s["outcome"] == "ok" for s in scans)
    assert not [s for s in scans if s["outcome"] == "error"], bot.console()[-4000:]
    trades = bot.cli("trades", "--json")
    assert trades.returncode == 0, trades.stderr
    closed = bot.query("SELECT symbol FROM facts WHERE type = 'position_closed'")
    assert closed[0]["symbol"] in trades.stdout
    pnl = bot.cli("pnl")
    assert pnl.returncode == 0 and re.search(r"\d{4}-\d{2}-\d{2}", pnl.stdout), pnl.stdout
    assert bot.cli("verify").returncode == 0

    # No secret anywhere: logs, console, ledger, the exchange's state, CLI output.
    for secret in (SECRET_KEY, SECRET_VALUE):
        for path in tmp_path.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), f"{secret} in {path}"
        for out in (status, trades, pnl):
            assert secret not in out.stdout + out.stderr
