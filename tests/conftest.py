"""Shared fixtures: a ledger in a temporary folder, and Python code in real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from process_guard import (  # noqa: F401 - hooks: nothing started outlives the run
    pytest_addoption,
    pytest_configure,
    pytest_sessionfinish,
)

from ledger import Ledger

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ledger_path(tmp_path) -> Path:
    """Where a test's ledger lives (not created yet)."""
    return tmp_path / "bot.db"


@pytest.fixture
def ledger(ledger_path):
    """A new writable ledger, closed after the test."""
    with Ledger(ledger_path) as opened:
        yield opened


def _argv(code: str, args, prefix) -> list[str]:
    return [*prefix, sys.executable, "-c", textwrap.dedent(code), *map(str, args)]


def _env() -> dict[str, str]:
    # Read at each start, not at import: the test run's guard marks the environment later.
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.fixture
def run_python():
    """run(code, *args, prefix=(), timeout=60) -> CompletedProcess: code in a fresh
    interpreter of this venv (cwd = repo root); ``prefix`` wraps it (e.g. setpriv)."""

    def run(code: str, *args, prefix: tuple[str, ...] = (), timeout: float = 60):
        return subprocess.run(_argv(code, args, prefix), cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=timeout, env=_env())

    return run


@pytest.fixture
def spawn_python():
    """spawn(code, *args) -> Popen (text pipes); any still running at teardown is killed."""
    started: list[subprocess.Popen] = []

    def spawn(code: str, *args, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
        proc = subprocess.Popen(_argv(code, args, prefix), cwd=REPO_ROOT, env=_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
