"""One writer per ledger: an exclusive flock on ``<ledger>.lock``, released even by SIGKILL.

The service holds it for its life, one-off commands (reconcile, job) while they run, and
a backtest while it writes the file it will replace.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .store import LedgerError, check_path


class AlreadyRunning(RuntimeError):
    """Another process holds the ledger."""


class LedgerLock:
    """An exclusive flock next to the ledger; the holder's pid is written inside."""

    def __init__(self, db_path: str | Path) -> None:
        self.db_path = Path(db_path)
        # The resolved path: a symlink to the ledger must meet the same lock.
        self.path = Path(f"{self.db_path.resolve()}.lock")
        self._fh = None

    def acquire(self) -> None:
        """Take the lock, or refuse (AlreadyRunning); a ledger path that cannot be ours
        (a folder, not SQLite, read-only, no such folder) is refused before any file is
        made beside it (LedgerError)."""
        check_path(self.db_path, for_writing=True)
        while True:
            fh = self._open()
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "unknown"
                fh.close()
                raise AlreadyRunning(f"{self.path.with_suffix('')} is in use by process "
                                     f"{holder}; one bot per ledger") from None
            if self._still_named(fh):
                break
            fh.close()  # its holder removed it as we opened it: lock the file there now
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def _open(self):
        try:
            return open(self.path, "a+")  # noqa: SIM115 - held until release
        except OSError as exc:
            raise LedgerError(f"{self.path}: cannot make the lock file beside the ledger "
                              f"({exc.strerror or exc})") from None

    def _still_named(self, fh) -> bool:
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fh.fileno())
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def release(self, *, remove: bool = False) -> None:
        """Let go; ``remove`` deletes the lock file first (a one-off run leaves nothing
        beside its ledger; whoever opened it meanwhile sees it gone and retries)."""
        if self._fh is not None:
            if remove:
                self.path.unlink(missing_ok=True)
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
