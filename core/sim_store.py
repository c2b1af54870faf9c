"""The simulated exchange's own state: orders, trades, positions, wallet, its clock position.

One SQLite file, apart from the bot's ledger, so that killing the bot leaves "the exchange"
alive. WAL, ``synchronous=FULL`` and one ``BEGIN IMMEDIATE`` transaction per venue call:
a SIGKILL at any instant leaves the last committed call intact, and another process
(or a second instance) opening the file continues from there. Without a path the same
tables live in memory (backtests), without durability costs.

The venue keeps open orders, positions and the wallet cached in memory; ``stale()`` says
when another connection committed since, so the cache is reloaded.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from decimal import Decimal
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS orders(
    id INTEGER PRIMARY KEY, algo INTEGER NOT NULL, client_id TEXT NOT NULL,
    symbol TEXT NOT NULL, type TEXT NOT NULL, side TEXT NOT NULL, amount TEXT NOT NULL,
    price TEXT, trigger_price TEXT, reduce_only INTEGER NOT NULL,
    close_position INTEGER NOT NULL, status TEXT NOT NULL, filled TEXT NOT NULL,
    cum_quote TEXT NOT NULL, created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
    place_price TEXT, trigger_ms INTEGER NOT NULL, actual_order_id INTEGER,
    orig_type TEXT);
CREATE INDEX IF NOT EXISTS orders_client ON orders(client_id, algo);
CREATE INDEX IF NOT EXISTS orders_open ON orders(status) WHERE status = 'NEW';
CREATE TABLE IF NOT EXISTS trades(
    id INTEGER PRIMARY KEY, order_id INTEGER NOT NULL, symbol TEXT NOT NULL,
    side TEXT NOT NULL, qty TEXT NOT NULL, price TEXT NOT NULL, quote_qty TEXT NOT NULL,
    commission TEXT NOT NULL, realized_pnl TEXT NOT NULL, maker INTEGER NOT NULL,
    ts INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS trades_symbol_ts ON trades(symbol, ts);
CREATE TABLE IF NOT EXISTS positions(
    symbol TEXT PRIMARY KEY, amount TEXT NOT NULL, entry_price TEXT NOT NULL,
    updated_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS leverage(symbol TEXT PRIMARY KEY, leverage INTEGER NOT NULL);
"""


@dataclass
class SimOrder:
    """One order as the venue keeps it. Statuses and types are Binance's words."""

    id: int
    algo: bool  # a conditional (stop / take-profit) order on Binance's algo service
    client_id: str
    symbol: str
    type: str  # MARKET | LIMIT | STOP_MARKET | TAKE_PROFIT_MARKET
    side: str  # BUY | SELL
    amount: Decimal
    price: Decimal | None  # limit price
    trigger_price: Decimal | None
    reduce_only: bool
    close_position: bool
    status: str  # NEW | FILLED | CANCELED | EXPIRED | REJECTED | FINISHED (algo)
    filled: Decimal
    cum_quote: Decimal
    created_ms: int
    updated_ms: int
    place_price: Decimal | None = None  # last price when placed (its first candle)
    trigger_ms: int = 0
    actual_order_id: int | None = None  # algo: the market order it turned into
    orig_type: str | None = None


@dataclass
class SimTrade:
    id: int
    order_id: int
    symbol: str
    side: str
    qty: Decimal
    price: Decimal
    quote_qty: Decimal
    commission: Decimal
    realized_pnl: Decimal
    maker: bool
    ts: int


@dataclass
class SimPosition:
    amount: Decimal  # signed: > 0 long, < 0 short (one-way mode)
    entry_price: Decimal
    updated_ms: int


ORDER_COLS = [f.name for f in fields(SimOrder)]
TRADE_COLS = [f.name for f in fields(SimTrade)]
_DEC_ORDER = {"amount", "price", "trigger_price", "filled", "cum_quote", "place_price"}
_DEC_TRADE = {"qty", "price", "quote_qty", "commission", "realized_pnl"}


def _dec(v):
    return None if v is None else Decimal(v)


def _txt(v):
    return str(v) if isinstance(v, Decimal) else (int(v) if isinstance(v, bool) else v)


def _order(row) -> SimOrder:
    d = dict(zip(ORDER_COLS, row, strict=True))
    for k in _DEC_ORDER:
        d[k] = _dec(d[k])
    for k in ("algo", "reduce_only", "close_position"):
        d[k] = bool(d[k])
    return SimOrder(**d)


def _trade(row) -> SimTrade:
    d = dict(zip(TRADE_COLS, row, strict=True))
    for k in _DEC_TRADE:
        d[k] = Decimal(d[k])
    d["maker"] = bool(d["maker"])
    return SimTrade(**d)


class SimStore:
    """SQLite tables of the venue; ``path=None`` keeps them in memory."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        self.conn = sqlite3.connect(self.path or ":memory:", isolation_level=None,
                                    check_same_thread=False, timeout=30)
        if self.path:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA busy_timeout=30000")
        else:
            self.conn.execute("PRAGMA synchronous=OFF")
        self._version: int | None = None
        self.conn.executescript(f"BEGIN IMMEDIATE;{SCHEMA}COMMIT;")  # idempotent

    @staticmethod
    def peek_meta(path: str | Path) -> dict[str, str]:
        """The meta table of an existing state file, read-only ({} if there is none)."""
        p = Path(path)
        if not p.exists():
            return {}
        if not p.is_file():
            raise ValueError(f"{path}: the simulated exchange's state file is not a file")
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
            try:
                return dict(conn.execute("SELECT key, value FROM meta"))
            finally:
                conn.close()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return {}  # an SQLite file without the venue's tables yet (or 0 bytes)
            raise ValueError(f"{path}: the simulated exchange's state file cannot be read "
                             f"({exc})") from None
        except sqlite3.DatabaseError as exc:  # not SQLite at all (a traceback, exit 1)
            raise ValueError(f"{path}: not a simulated exchange's state file ({exc}); "
                             "move it away, or restore it") from None

    @contextmanager
    def transaction(self, keep: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
        """BEGIN IMMEDIATE .. COMMIT. An exception of a ``keep`` type still commits (the
        venue refused something after doing legitimate work); any other rolls back and
        marks the cache stale."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except keep:
            self.conn.execute("COMMIT")
            raise
        except BaseException:
            self.conn.execute("ROLLBACK")
            self._version = None
            raise
        self.conn.execute("COMMIT")

    def stale(self) -> bool:
        """True on first use and whenever another connection committed since last asked."""
        if self.path is None and self._version is not None:
            return False  # in memory: no other connection can exist
        v = self.conn.execute("PRAGMA data_version").fetchone()[0]
        stale, self._version = v != self._version, v
        return stale

    def close(self) -> None:
        self.conn.close()

    # meta
    def meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta"))

    def set_meta(self, **values) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                              [(k, str(v)) for k, v in values.items()])

    # orders
    def save_order(self, o: SimOrder) -> None:
        self.conn.execute(f"INSERT OR REPLACE INTO orders VALUES ({','.join('?' * len(ORDER_COLS))})",
                          [_txt(getattr(o, c)) for c in ORDER_COLS])

    def open_orders(self) -> list[SimOrder]:
        return [_order(r) for r in self.conn.execute(
            "SELECT * FROM orders WHERE status = 'NEW' ORDER BY id")]

    def order(self, order_id: int, algo: bool) -> SimOrder | None:
        row = self.conn.execute("SELECT * FROM orders WHERE id = ? AND algo = ?",
                                (order_id, int(algo))).fetchone()
        return _order(row) if row else None

    def order_by_client(self, client_id: str, algo: bool) -> SimOrder | None:
        """The newest order with that client id (Binance keeps them unique among open ones)."""
        row = self.conn.execute("SELECT * FROM orders WHERE client_id = ? AND algo = ? "
                                "ORDER BY id DESC LIMIT 1", (client_id, int(algo))).fetchone()
        return _order(row) if row else None

    def max_ids(self) -> tuple[int, int]:
        o = self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM orders").fetchone()[0]
        t = self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM trades").fetchone()[0]
        return o, t

    # trades
    def add_trade(self, t: SimTrade) -> None:
        self.conn.execute(f"INSERT INTO trades VALUES ({','.join('?' * len(TRADE_COLS))})",
                          [_txt(getattr(t, c)) for c in TRADE_COLS])

    def trades(self, symbol: str, start_ms: int, end_ms: int) -> list[SimTrade]:
        return [_trade(r) for r in self.conn.execute(
            "SELECT * FROM trades WHERE symbol = ? AND ts >= ? AND ts <= ? ORDER BY id",
            (symbol, start_ms, end_ms))]

    # positions and leverage
    def positions(self) -> dict[str, SimPosition]:
        return {s: SimPosition(Decimal(a), Decimal(e), int(u)) for s, a, e, u in
                self.conn.execute("SELECT symbol, amount, entry_price, updated_ms FROM positions")}

    def save_position(self, symbol: str, p: SimPosition | None) -> None:
        if p is None or p.amount == 0:
            self.conn.execute("DELETE FROM positions WHERE symbol = ?", (symbol,))
        else:
            self.conn.execute("INSERT OR REPLACE INTO positions VALUES (?, ?, ?, ?)",
                              (symbol, str(p.amount), str(p.entry_price), p.updated_ms))

    def leverage(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT symbol, leverage FROM leverage"))

    def set_leverage(self, symbol: str, leverage: int) -> None:
        self.conn.execute("INSERT OR REPLACE INTO leverage VALUES (?, ?)", (symbol, leverage))
