"""The one clock. Nothing else in the project reads the system time.

Every clock answers ``now_ms()`` (UTC milliseconds since the epoch). Jobs take a
clock as an argument, so a backtest drives them on a virtual clock and tests
freeze time.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

DAY_MS = 86_400_000


class WallClock:
    """Real UTC time."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class AcceleratedClock:
    """Wall time running ``speed`` times faster from ``start_ms``.

    The simulated service uses it so trades happen within minutes, not days.
    """

    def __init__(self, start_ms: int, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.start_ms = start_ms
        self.speed = speed
        self._origin = time.monotonic()

    def now_ms(self) -> int:
        return self.start_ms + int((time.monotonic() - self._origin) * 1000 * self.speed)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds / self.speed)


class VirtualClock:
    """A clock that moves only when told to (backtests, tests)."""

    def __init__(self, now_ms: int = 0) -> None:
        self._now = int(now_ms)
        self._lock = threading.Lock()

    def now_ms(self) -> int:
        return self._now

    def set(self, now_ms: int) -> None:
        with self._lock:
            if now_ms < self._now:
                raise ValueError("a virtual clock never runs backwards")
            self._now = int(now_ms)

    def advance(self, ms: int) -> None:
        self.set(self._now + int(ms))

    def sleep(self, seconds: float) -> None:
        self.advance(int(seconds * 1000))


def to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def iso(ms: int) -> str:
    """UTC ISO-8601 with milliseconds and a Z: 2026-01-02T03:04:05.678Z."""
    return to_datetime(ms).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def utc_day(ms: int) -> str:
    """The UTC calendar day of a timestamp, as YYYY-MM-DD."""
    return to_datetime(ms).strftime("%Y-%m-%d")


def day_start_ms(ms: int) -> int:
    """Midnight UTC at or before ``ms``."""
    return ms - ms % DAY_MS


def day_ms(day: str) -> int:
    """Midnight UTC of a YYYY-MM-DD day."""
    return int(datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC).timestamp() * 1000)


TIMEFRAME_MS = {
    "1m": 60_000,
    "3m": 180_000,
    "5m": 300_000,
    "15m": 900_000,
    "30m": 1_800_000,
    "1h": 3_600_000,
    "2h": 7_200_000,
    "4h": 14_400_000,
    "1d": DAY_MS,
}


def timeframe_ms(timeframe: str) -> int:
    try:
        return TIMEFRAME_MS[timeframe]
    except KeyError:
        raise ValueError(f"unknown timeframe {timeframe!r}; known: {', '.join(TIMEFRAME_MS)}") from None
