"""Logging: console plus one file per UTC day (logs/bot_YYYY-MM-DD.log)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%dT%H:%M:%S"


class UTCFormatter(logging.Formatter):
    converter = time.gmtime


class DailyFileHandler(logging.Handler):
    """Writes each record to the file of its UTC day; rolls over at midnight UTC."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        self._day = ""
        self._stream = None
        self._io_lock = threading.Lock()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path_for(self, day: str) -> Path:
        return self.folder / f"bot_{day}.log"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            day = time.strftime("%Y-%m-%d", time.gmtime(record.created))
            line = self.format(record) + "\n"
            with self._io_lock:
                if day != self._day:
                    if self._stream:
                        self._stream.close()
                    self._stream = open(self.path_for(day), "a", encoding="utf-8")  # noqa: SIM115
                    self._day = day
                self._stream.write(line)
                self._stream.flush()
        except Exception:  # noqa: BLE001 - logging must never take the bot down
            self.handleError(record)

    def close(self) -> None:
        with self._io_lock:
            if self._stream:
                self._stream.close()
                self._stream = None
        super().close()


def setup(log_dir: str | Path | None, level: int = logging.INFO) -> None:
    """Console + daily files. Safe to call more than once (replaces our handlers)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_bot_handler", False):
            root.removeHandler(handler)
            handler.close()
    formatter = UTCFormatter(FORMAT, DATEFMT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_dir:
        handlers.append(DailyFileHandler(log_dir))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._bot_handler = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # ccxt logs request bodies at DEBUG; never let that (or its headers) reach a file.
    logging.getLogger("ccxt").setLevel(logging.INFO)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
