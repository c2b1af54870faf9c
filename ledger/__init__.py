"""The append-only, hash-chained SQLite ledger: the bot's source of truth."""

from .facts import FACT_TYPES, Fact, FactError
from .fold import State, fold
from .store import Ledger, LedgerError, LedgerWriteError, VerifyReport

__all__ = ["FACT_TYPES", "Fact", "FactError", "Ledger", "LedgerError", "LedgerWriteError",
           "State", "VerifyReport", "fold"]
