"""SIGTERM for the one-shot commands (backtest, walk-forward): end as Ctrl-C does."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def ending_on_sigterm() -> Iterator[None]:
    """SIGTERM (a service manager's stop, ``timeout``) raises SystemExit where the process
    stands, so with-blocks unwind and files half-written are removed (Python's default
    ends the process without cleaning up). Only the main thread may set a handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_signal(signum, frame) -> None:
    # A second one (a service manager repeating itself, a pool's worker stopped by both
    # its parent and its group) must not cut the cleanup short.
    signal.signal(signum, signal.SIG_IGN)
    raise SystemExit(128 + signum)


@contextmanager
def held_signals() -> Iterator[None]:
    """SIGTERM and SIGINT wait until the block is done, then act as they would have:
    steps that must happen together (a new ledger and its chart put in place) are not
    cut between them. (Masking them would not do: another thread would take them.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)
