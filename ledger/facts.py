"""Facts: what the ledger records. One dataclass, a registry of types.

A Fact names its type, the time it was learned or decided, the columns an auditor
filters on, and anything else in ``data``. Money values are stored as the exact
decimal strings the exchange sent or received; floats are accepted only as their
shortest round-trip text and NaN/inf are refused.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from core.clock import utc_day

from .chain import compact_encoder

# type -> (columns that must be present, what it records)
FACT_TYPES: dict[str, tuple[tuple[str, ...], str]] = {
    "job_run": ((), "a job run: data.job, scheduled_ms, started_ms, finished_ms, duration_ms, "
                    "outcome ok|error|skipped|missed; reason = error"),
    "service": ((), "service start/stop: data.event started|stopping|stopped, pid, mode"),
    "signal": (("symbol",), "a strategy's decision on a closed candle: side long|short|none, "
                            "reason, data.strategy, candle_ts, indicators"),
    "risk_decision": (("symbol",), "an entry approved or refused: data.approved, reason, "
                                   "detail, checks; amount = approved size"),
    "order_intent": (("symbol", "side", "amount", "client_order_id"),
                     "written before an order is sent: data.purpose entry|exit|stop, type, "
                     "reduce_only, trigger_price"),
    "order_submitted": (("client_order_id",), "the order is being sent now"),
    "order_update": (("client_order_id",), "the order's state changed: data.state accepted|"
                                           "partially_filled|filled|cancelled|rejected|"
                                           "expired|unknown; reason"),
    "fill": (("symbol", "side", "amount", "price"), "an execution: data.trade_id, "
                                                    "exchange_ts, fee currency, source"),
    "position_opened": (("symbol", "side", "amount", "price", "position_id"),
                        "a position opened at entry price `price`"),
    "position_changed": (("symbol", "amount", "position_id"),
                         "the size (and average entry `price`) of a position changed"),
    "position_closed": (("symbol", "position_id"), "a position closed: price = exit price, "
                                                   "pnl = realized, fee = all fees, reason = "
                                                   "exit reason; data.closed_ts = the exchange's "
                                                   "time of its last fill, data.day = the UTC "
                                                   "day it counts on"),
    "best_price": (("symbol", "price", "position_id"),
                   "the best price since entry improved (trailing stop state)"),
    "stop_placed": (("symbol", "price", "client_order_id"), "a reduce-only stop rests on the "
                                                            "exchange at trigger `price`"),
    "stop_moved": (("symbol", "price", "client_order_id"), "the stop was replaced by a new one"),
    "stop_cancelled": (("symbol", "client_order_id"), "a stop order was cancelled"),
    "balance": ((), "a balance snapshot: data.currency, total, free, used, equity"),
    "rotation": ((), "the active coins: data.coins, ranking"),
    "day_close": ((), "a UTC day closed: data.day, realized_pnl, fees, equity"),
    "halt": ((), "new entries stopped: data.kind daily_loss|drawdown|manual, reason"),
    "resume": ((), "a halt lifted: data.kind (or all)"),
    "reconcile_run": ((), "a reconciliation: data.status, differences, corrections, dry_run"),
    "external_position": (("symbol",), "a position on the exchange the ledger did not know"),
    "ip_ban": ((), "the exchange banned this IP (HTTP 418): no call until data.until_ms (the "
                   "bot's clock), a restart included"),
    "checkpoint": ((), "the folded state up to seq-1, so replay can start here"),
    "note": ((), "free-form operator or system note"),
}

TEXT_COLUMNS = ("run_id", "symbol", "side", "amount", "price", "fee", "pnl", "position_id",
                "client_order_id", "exchange_order_id", "reason")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# 9999-12-31T23:59:59.999Z: the last instant a UTC date can name (the fold rolls days by
# date; a later stamp, from a broken clock, would stop every fold of the ledger for good).
MAX_TS = 253_402_300_799_999


class FactError(ValueError):
    """A fact that cannot be recorded as given."""


@dataclass(frozen=True, slots=True)
class Fact:
    type: str
    ts: int
    symbol: str | None = None
    side: str | None = None
    amount: Any = None
    price: Any = None
    fee: Any = None
    pnl: Any = None
    position_id: str | None = None
    client_order_id: str | None = None
    exchange_order_id: str | None = None
    reason: str | None = None
    run_id: str | None = None
    data: dict = field(default_factory=dict)

    def row(self, seq: int) -> tuple:
        """Values in chain.COLUMNS order, normalised exactly as stored."""
        return (seq, *self.values())

    def values(self) -> tuple:
        """row() without the seq, which only the write transaction can assign."""
        spec = FACT_TYPES.get(self.type) if type(self.type) is str else None
        if spec is None:
            raise FactError(f"unknown fact type {self.type!r}")
        ts = self.ts
        if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts <= MAX_TS:
            raise FactError(f"{self.type}: ts must be integer ms from 1970 to the end of "
                            f"year 9999, got {ts!r}")
        for name in spec[0]:
            value = getattr(self, name)
            if value is None or value == "":
                raise FactError(f"{self.type}: {name} is required")
        if not isinstance(self.data, dict):
            raise FactError(f"{self.type}: data must be a dict, got {type(self.data).__name__}")
        return (int(ts), self.type, _text(self.run_id), _text(self.symbol), _text(self.side),
                money(self.amount), money(self.price), money(self.fee), money(self.pnl),
                _text(self.position_id), _text(self.client_order_id),
                _text(self.exchange_order_id), _text(self.reason),
                canonical_json(self.data))


# A quantity's first digit lies within this many places of the point. The fold keeps its
# sums (in 60 digits) as plain text: 1e1000000 would overflow a sum and stop every fold
# of the ledger for good, and 1e-1000000 would be a million characters long. Real amounts,
# prices and fees are far inside.
QUANTITY_DIGITS = 60


def in_range(d: Decimal) -> bool:
    """A finite quantity whose first digit lies within QUANTITY_DIGITS places of the point."""
    return d.is_finite() and -QUANTITY_DIGITS < d.adjusted() < QUANTITY_DIGITS


def happened_ms(recorded_ms: int, exchange_ms: Any) -> int:
    """When an event happened: the exchange's time of it, if that is known and before it
    was recorded (a stop that fired while the bot was down is recorded at the restart),
    else when it was recorded. The SQL twin is schema.CLOSED_MS."""
    if type(exchange_ms) is int and 0 < exchange_ms < recorded_ms:
        return exchange_ms
    return recorded_ms


def counting_day(recorded_ms: int, exchange_ms: Any, last_day_closed: Any) -> str:
    """The UTC day a close (or a fee) counts on: the day it happened, unless that day's
    totals were closed before it was recorded (a stop that fired at 23:59 and was seen
    after the midnight close): then the day it was recorded. Every close counts in one
    day_close, and a day's totals never change once closed."""
    day = utc_day(happened_ms(recorded_ms, exchange_ms))
    if isinstance(last_day_closed, str) and day <= last_day_closed:
        return utc_day(recorded_ms)
    return day


_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")


def recorded_day(recorded_ms: int, day: Any) -> str:
    """The day a close's fact says it counts on (data.day), else the day it was recorded
    (a close recorded before facts said so). The SQL twin is schema.CLOSE_DAY."""
    return day if type(day) is str and _DAY.match(day) else utc_day(recorded_ms)


def money(value: Any) -> str | None:
    """The exact text of a quantity: Decimal/int/str as given, float by shortest repr."""
    if value is None:
        return None
    if type(value) is str:
        try:
            if in_range(Decimal(value)) and "_" not in value and value.strip() == value:
                return value
        except ArithmeticError:
            pass
        raise FactError(f"not a finite decimal quantity within 1e-{QUANTITY_DIGITS} to "
                        f"1e{QUANTITY_DIGITS}: {value[:80]!r}")
    if isinstance(value, bool):
        raise FactError(f"not a quantity: {value!r}")
    if isinstance(value, float) and math.isfinite(value):
        value = Decimal(repr(value))
    elif isinstance(value, int):
        value = Decimal(value if abs(value) < 10 ** QUANTITY_DIGITS else "Infinity")
    if isinstance(value, Decimal) and in_range(value):
        return format(value, "f")
    if isinstance(value, Decimal | float | int):
        raise FactError(f"not a finite quantity within 1e-{QUANTITY_DIGITS} to "
                        f"1e{QUANTITY_DIGITS}: {str(value)[:80]}")
    raise FactError(f"not a quantity: {value!r}")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if type(value) is str else str(value)
    if text.isprintable():
        return text
    # Control characters would make rows unreadable in a terminal; they carry nothing.
    # Lone surrogates cannot be stored as UTF-8 at all.
    return _SURROGATE.sub("\ufffd", _CONTROL.sub(" ", text))


def _json_default(value: Any):
    if isinstance(value, Decimal):
        return money(value)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"cannot record {type(value).__name__} in a fact's data")


_encode_data = compact_encoder(ensure_ascii=True, sort_keys=True, default=_json_default)


def canonical_json(data: dict) -> str:
    """Byte-stable JSON: sorted keys, no spaces, ASCII only, no NaN."""
    if not data:
        return "{}"
    try:
        return _encode_data(data)
    except (TypeError, ValueError, RecursionError) as exc:
        raise FactError(f"data cannot be recorded: {exc}") from None
