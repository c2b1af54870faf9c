"""The test run's own guard (process_guard.py): a test run whose tests all passed must end,
whatever a test left behind. Each case runs pytest on a small test file in a subprocess,
its output a pipe, as CI reads it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def pytest_run(folder: Path, source: str, *options: str) -> tuple[int, str]:
    (folder / "test_left_behind.py").write_text(textwrap.dedent(source), encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "process_guard",
         *options, "test_left_behind.py"],
        cwd=folder, env={**os.environ, "PYTHONPATH": str(TESTS)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=30)  # the output pipe closes: nothing holds it
    finally:
        proc.kill()
    return proc.returncode, out


@pytest.mark.slow
def test_an_orphan_holding_the_output_is_ended_and_named(tmp_path):
    code, out = pytest_run(tmp_path, """
        import subprocess

        def test_leaves_an_orphan():
            # the shell exits at once; its sleep, holding the output, is orphaned
            subprocess.run(["sh", "-c", "sleep 600 &"], check=True)
        """, "-s")  # uncaptured: the orphan holds the run's own output, not a capture file
    assert code == 0, out
    assert "ended what the tests left running" in out
    assert "sleep 600" in out


@pytest.mark.slow
@pytest.mark.parametrize("failing", [False, True])
def test_a_thread_that_never_ends_is_shown_and_the_run_still_ends(tmp_path, failing):
    code, out = pytest_run(tmp_path, f"""
        import threading

        def test_leaves_a_thread():
            threading.Thread(target=threading.Event().wait, name="never-ends").start()

        def test_another():
            assert {not failing}
        """, "-o", "exit_grace_s=1")
    assert code == (1 if failing else 0), out
    assert "has not exited 1 s after the session" in out
    assert "in wait" in out  # the waiting thread's stack


@pytest.mark.slow
def test_after_an_interrupt_fixtures_end_their_own_processes_first(tmp_path):
    """Ctrl-C (or CI cancelling the job): the fixtures left are torn down as the session
    finishes; what they own is not a leftover."""
    code, out = pytest_run(tmp_path, """
        import subprocess

        import pytest

        @pytest.fixture(scope="module")
        def sleeper():
            proc = subprocess.Popen(["sleep", "600"])
            yield proc
            print("teardown: sleeper", "running" if proc.poll() is None else "gone")
            proc.kill()
            proc.wait()

        def test_interrupted(sleeper):
            raise KeyboardInterrupt
        """, "-s")
    assert code == 2, out  # interrupted
    assert "teardown: sleeper running" in out
    assert "ended what the tests left running" not in out


def test_processes_started_through_the_shared_fixtures_carry_the_runs_mark(run_python,
                                                                           spawn_python):
    show = "import os; print(os.environ.get('LEDGERBOT_TEST_RUN'))"
    assert run_python(show).stdout.strip() == str(os.getpid())
    assert spawn_python(show).communicate(timeout=60)[0].strip() == str(os.getpid())
