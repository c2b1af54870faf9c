"""Nothing a test started outlives the test run (a pytest plugin, loaded by conftest).

A process a test left behind (an orphan: a browser's crash handler, a worker whose parent
was killed) keeps the run's output pipe open, and a thread that never ends keeps the
interpreter from exiting: CI then waits for its time limit with every test passed. So
pytest adopts orphans (it becomes a child subreaper), ends whatever is left when the
session finishes, naming it, and if the interpreter still has not exited after
``exit_grace_s`` it prints every thread's stack and exits with the session's status.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import threading
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
KEPT = ("multiprocessing.resource_tracker",)  # ends with its parent, by design


def pytest_addoption(parser) -> None:
    parser.addini("exit_grace_s", "seconds the interpreter may take to exit after the "
                  "session before its threads' stacks are printed and it is ended", default="60")


def pytest_configure(config) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.stderr.write(f"process guard: not a subreaper ({os.strerror(ctypes.get_errno())}); "
                         "orphans of the tests are not adopted\n")


def pytest_sessionfinish(session, exitstatus) -> None:
    left = end_leftovers()
    if left:
        sys.stderr.write("\nprocess guard: ended what the tests left running:\n"
                         + "".join(f"  {pid} {cmd}\n" for pid, cmd in left))
    _watch_exit(float(session.config.getini("exit_grace_s")), int(exitstatus))


def children() -> dict[int, tuple[str, str]]:
    """This process's children: pid -> (state letter, command line)."""
    found: dict[int, tuple[str, str]] = {}
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in map(int, pids):
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace").strip()
            except OSError:
                continue  # already gone
            found[pid] = (state, cmd)
    return found


def end_leftovers(rounds: int = 5) -> list[tuple[int, str]]:
    """SIGKILL and reap every child still running but the kept ones; reap the zombies.
    Rounds, since a killed orphan's own children are adopted in turn."""
    ended: list[tuple[int, str]] = []
    for _ in range(rounds):
        running = {pid: cmd for pid, (state, cmd) in children().items()
                   if state != "Z" and not any(k in cmd for k in KEPT)}
        for pid, cmd in running.items():
            try:
                os.kill(pid, signal.SIGKILL)
                ended.append((pid, cmd[:160]))
            except ProcessLookupError:
                pass
        time.sleep(0.05 if running else 0)
        for pid, (state, _) in children().items():
            if state == "Z" or pid in running:
                try:
                    os.waitpid(pid, 0 if pid in running else os.WNOHANG)
                except ChildProcessError:
                    pass  # reaped by its Popen meanwhile
        if not running:
            break
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
