"""Running the real service (`cli.py run`) as a subprocess in a folder, and reading what
it left behind: the ledger (read-only), the simulated exchange's state file, the logs.

Console output goes to files, never to pipes: a chatty service would fill a pipe and
block on it.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLI = str(REPO / "cli.py")
SECRET_KEY = "KEYzq7Xv3Lw9QmT2pR8sN4dJ6hF1bC5gA0eYuIoP"
SECRET_VALUE = "SECk2Jx8Vn4Bq9Wm3Lz7Tr5Hy1Pd6Gf0Cs2Ae8Ui"


def write_toml(folder: Path, sections: dict[str, dict]) -> None:
    """A bot.toml from plain values (str, bool, int, float, list of str)."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    (folder / "bot.toml").write_text("\n".join(lines), encoding="utf-8")


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BOT_")}
    return {**base, "PYTHONDONTWRITEBYTECODE": "1", **extra}


class Bot:
    """One `cli.py run` in ``folder``; console output in console_<n>.log there."""

    def __init__(self, folder: Path, **extra_env: str) -> None:
        self.folder = folder
        self.env = env(**extra_env)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> subprocess.Popen:
        self.starts += 1
        out = open(self.folder / f"console_{self.starts}.log", "wb")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen([sys.executable, CLI, "run"], cwd=self.folder,
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT)
        finally:
            out.close()  # the child holds its own copy
        return self.proc

    def console(self, n: int | None = None) -> str:
        n = self.starts if n is None else n
        return (self.folder / f"console_{n}.log").read_text(encoding="utf-8", errors="replace")

    def send(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.send(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(30)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, CLI, *args], cwd=self.folder, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def query(self, sql: str, params: tuple = ()) -> list[dict]:
        """Read the ledger through a read-only connection ([] before it exists)."""
        return read_db(self.folder / "bot.db", sql, params)

    def wait_for(self, what: str, check: Callable[[], object], timeout: float,
                 poll: float = 0.2):
        """Poll ``check`` until truthy; fail if the service died or time ran out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"service exited with {self.proc.returncode} while "
                                     f"waiting for {what}:\n{self.console()[-3000:]}")
            time.sleep(poll)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n"
                             f"{self.console()[-3000:]}")


def read_db(path: Path, sql: str, params: tuple = ()) -> list[dict]:
    if not path.exists():
        return []
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as conn:
            cur = conn.execute(sql, params)
            names = [d[0] for d in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise


def count(bot: Bot, fact_type: str) -> int:
    return bot.query("SELECT count(*) AS n FROM facts WHERE type = ?", (fact_type,))[0]["n"] \
        if bot.query("SELECT 1 FROM sqlite_master WHERE name = 'facts'") else 0


def job_runs(bot: Bot) -> list[dict]:
    return bot.query(
        "SELECT seq, ts, coalesce(reason, json_extract(data, '$.summary.reason')) AS reason, "
        "json_extract(data, '$.job') AS job, "
        "json_extract(data, '$.outcome') AS outcome, "
        "json_extract(data, '$.scheduled_ms') AS scheduled_ms FROM facts "
        "WHERE type = 'job_run' ORDER BY seq")


def service_events(bot: Bot) -> list[dict]:
    return bot.query("SELECT seq, json_extract(data, '$.event') AS event, "
                     "json_extract(data, '$.pid') AS pid FROM facts WHERE type = 'service' "
                     "ORDER BY seq")


def log_text(folder: Path) -> str:
    return "".join(p.read_text(encoding="utf-8", errors="replace")
                   for p in sorted((folder / "logs").glob("bot_*.log")))
