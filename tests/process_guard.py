"""Nothing a test started outlives the test run (a pytest plugin, loaded by conftest).

A process a test left behind (an orphan: a browser's crash handler, a worker whose parent
was killed) keeps the run's output pipe open, and a thread that never ends keeps the
interpreter from exiting: CI then waits for its time limit with every test passed. So
every process started under the run carries a mark in its environment; when the session
finishes, the marked processes still running are ended and named, and if the interpreter
has not exited ``exit_grace_s`` later, every thread's stack is printed and it exits with
the session's status.

Not seen: a process that starts with an environment of its own (``env -i``), or rewrites
it (Chromium's helpers do, as they set their titles; they end with their browser).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

MARK = "LEDGERBOT_TEST_RUN"
PROC = Path("/proc")
KEPT = ("multiprocessing.resource_tracker",)  # ends with this process, by design


def pytest_addoption(parser) -> None:
    parser.addini("exit_grace_s", "seconds the interpreter may take to exit after the "
                  "session before its threads' stacks are printed and it is ended", default="60")


def pytest_configure(config) -> None:
    os.environ[MARK] = str(os.getpid())  # inherited by whatever the tests start


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session, exitstatus):
    # The watch first: what follows could itself hang (a process stuck in the kernel).
    _watch_exit(float(session.config.getini("exit_grace_s")), int(exitstatus))
    result = yield  # after an interrupt, the fixtures left are torn down in there
    left = end_leftovers(os.environ.get(MARK, ""))
    if left:
        sys.stderr.write("\nprocess guard: ended what the tests left running:\n"
                         + "".join(f"  {pid} {cmd}\n" for pid, cmd in left))
    return result


def marked(mark: str) -> dict[int, str]:
    """Running processes (not this one) whose environment carries ``mark``: pid -> command."""
    wanted = f"{MARK}={mark}".encode()
    found: dict[int, str] = {}
    if not mark or not PROC.is_dir():
        return found  # not Linux: nothing is looked for
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone, or not ours to read
        if state != "Z" and not any(k in cmd for k in KEPT):
            found[int(entry.name)] = cmd.strip()[:160]
    return found


def end_leftovers(mark: str) -> list[tuple[int, str]]:
    """SIGKILL the marked processes still running; what was ended."""
    ended = []
    for pid, cmd in marked(mark).items():
        try:
            os.kill(pid, signal.SIGKILL)
            ended.append((pid, cmd))
        except (ProcessLookupError, PermissionError):
            pass
    return ended


def _watch_exit(grace_s: float, status: int) -> None:
    def watch() -> None:
        time.sleep(grace_s)
        sys.stderr.write(f"\nprocess guard: the interpreter has not exited {grace_s:g} s "
                         "after the session (a thread or exit handler waits); its threads:\n")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(status)

    threading.Thread(target=watch, name="exit-watch", daemon=True).start()
