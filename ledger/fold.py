"""The bot's state as a pure fold over ledger rows.

Nothing here reads a clock, a file or the network: ``fold(rows, state)`` is all the
bot knows after a crash. Rows are tuples in chain.COLUMNS order (plus nothing else),
exactly as stored. Amounts stay decimal strings; sums use Decimal.

State shape (JSON-safe, so a checkpoint can hold it):
  seq            last folded sequence number
  positions      {symbol: {position_id, symbol, side, amount, entry_price, opened_ts,
                  opened_seq, best_price, trailing_active, trail_pct, stop, stops_placed,
                  fees}}  (fees paid so far)
                 stop = {client_order_id, exchange_order_id, price, ts} | None
  orders         {client_order_id: {...}} orders not yet terminal (intent, submitted,
                 accepted, partially_filled, unknown)
  day            the latest UTC day a close or a fee counted on (the day it happened,
                 unless closed before it was recorded), realized_today / fees_today for it
  day_start_equity  equity recorded at the last day close
  last_day_closed   YYYY-MM-DD of the last day_close
  equity, equity_peak  from balance snapshots
  halts          {kind: {reason, ts}}
  active_coins   [symbol, ...] from the last rotation
  last_runs      {job: {ts, outcome, scheduled_ms, duration_ms, seq, failing_since}}
                 failing_since: the first of the errors it has run into since it last ran
                 well or the service started (None: its last run that started did not fail)
  last_loss_exit {symbol: ts} of the last losing exit (risk cooldown)
  last_reconcile_ts, last_reconcile_seq  of the last recorded (not dry) reconcile_run
  last_rotation  {scheduled_ms, ts} of the last rotation
  last_signal    {symbol: candle_ts} of the last candle a strategy decided on
  external       {symbol: {side, amount, price, ts}} positions on the exchange that the
                 bot did not open, flagged by reconcile: no entries there until gone
  ip_ban_until_ms  when the exchange's last recorded ban of this IP ends (0: none)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from decimal import Context, Decimal, InvalidOperation

from core.clock import utc_day
from core.exchange_types import LONGEST_IP_BAN_MS

from .chain import COLUMNS
from .facts import counting_day, in_range, recorded_day

# The rules' version, kept in every checkpoint: a checkpoint folded by other rules (or
# by another State shape) is not trusted, and the state is folded again from the start.
# 2: flagged external positions, last_reconcile_seq. 3: ip_ban_until_ms. 4: a ban capped
# at 3 days, and lifted. 5, 6, 7: the day a close or fee counts on, a job's
# failing_since (reset by a run that started, and by a start). Bump it with any rule
# change.
FOLD_VERSION = 7

TERMINAL_STATES = frozenset({"filled", "cancelled", "rejected", "expired"})
UNRESOLVED_STATES = frozenset({"intent", "submitted", "unknown"})

_I = {name: i for i, name in enumerate(COLUMNS)}
SEQ, TS, TYPE, SYMBOL, SIDE = _I["seq"], _I["ts"], _I["type"], _I["symbol"], _I["side"]
AMOUNT, PRICE, FEE, PNL = _I["amount"], _I["price"], _I["fee"], _I["pnl"]
POSITION_ID, CLIENT_ID, EXCHANGE_ID = _I["position_id"], _I["client_order_id"], \
    _I["exchange_order_id"]
REASON, DATA = _I["reason"], _I["data"]


@dataclass
class State:
    seq: int = 0
    positions: dict = field(default_factory=dict)
    orders: dict = field(default_factory=dict)
    day: str = ""
    realized_today: str = "0"
    fees_today: str = "0"
    day_start_equity: str | None = None
    last_day_closed: str | None = None
    equity: str | None = None
    equity_peak: str | None = None
    halts: dict = field(default_factory=dict)
    active_coins: list = field(default_factory=list)
    last_runs: dict = field(default_factory=dict)
    last_loss_exit: dict = field(default_factory=dict)
    last_reconcile_ts: int | None = None
    last_reconcile_seq: int | None = None
    last_rotation: dict | None = None
    last_signal: dict = field(default_factory=dict)
    external: dict = field(default_factory=dict)
    ip_ban_until_ms: int = 0

    def to_dict(self) -> dict:
        return {name: _clone(getattr(self, name)) for name in _FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> State:
        return cls(**{name: _clone(value) for name, value in d.items()})

    def copy(self) -> State:
        """A deep copy (the state is plain JSON data, so this is cheap)."""
        return State(**self.to_dict())

    # Derived views, still pure.
    def unresolved_orders(self) -> list[dict]:
        return [o for o in self.orders.values() if o["state"] in UNRESOLVED_STATES]

    def realized_on(self, day: str) -> Decimal:
        return Decimal(self.realized_today) if self.day == day else Decimal(0)

    def realized_today_at(self, now_ms: int) -> Decimal:
        return self.realized_on(utc_day(now_ms))

    def halted(self) -> bool:
        return bool(self.halts)


_FIELDS = tuple(f.name for f in fields(State))


def _clone(value):
    """Deep copy of JSON-shaped data: much cheaper than copy.deepcopy."""
    if type(value) is dict:
        return {k: _clone(v) for k, v in value.items()}
    if type(value) is list:
        return [_clone(v) for v in value]
    return value


def fold(rows, state: State | None = None) -> State:
    """Apply rows (in seq order) to a copy of ``state`` and return it."""
    return fold_into(State() if state is None else state.copy(), rows)


def fold_into(s: State, rows) -> State:
    """fold() without the copy: ``s`` changes in place (half-changed if it raises).

    Every rule accepts any row a valid Fact can produce: an odd value in ``data`` must
    never stop the fold, or the bot could not start again.
    """
    handlers = _HANDLERS
    for row in rows:
        handler = handlers.get(row[TYPE])
        if handler is not None:
            handler(s, row)
        s.seq = row[SEQ]
    return s


_decode = json.JSONDecoder().raw_decode  # 3x cheaper than json.loads; data is canonical


def _data(row) -> dict:
    return _decode(row[DATA])[0]


# Sums must not depend on the caller's decimal context: the fold is pure.
_SUM = Context(prec=60)


def _add(a: str, b: str | None) -> str:
    """a + b; b is skipped if it is out of range (only a row older than the range check
    could hold one: it would overflow the sum or be far too long as text)."""
    if b is None:
        return a
    d = Decimal(b)
    return format(_SUM.add(Decimal(a), d), "f") if in_range(d) else a


def _amount(value) -> str | None:
    """A quantity found in ``data`` as decimal text, or None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        d = Decimal(value) if isinstance(value, str) else Decimal(repr(value))
    except InvalidOperation:
        return None
    if not in_range(d):
        return None
    return value if isinstance(value, str) else format(d, "f")


def _key(value, default: str) -> str:
    """A dict key that survives a checkpoint's JSON unchanged (JSON keys are strings)."""
    if value is None:
        return default
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _order_intent(s: State, row) -> None:
    d = _data(row)
    s.orders[row[CLIENT_ID]] = {
        "client_order_id": row[CLIENT_ID], "symbol": row[SYMBOL], "side": row[SIDE],
        "amount": row[AMOUNT], "purpose": d.get("purpose"), "type": d.get("type", "market"),
        "reduce_only": bool(d.get("reduce_only", False)), "trigger_price": d.get("trigger_price"),
        "position_id": row[POSITION_ID], "state": "intent", "filled": "0",
        "exchange_order_id": None, "intent_seq": row[SEQ], "ts": row[TS],
    }


def _order_submitted(s: State, row) -> None:
    order = s.orders.get(row[CLIENT_ID])
    if order is not None:
        order["state"] = "submitted"


def _order_update(s: State, row) -> None:
    order = s.orders.get(row[CLIENT_ID])
    if order is None:
        return
    state = _data(row).get("state")
    if isinstance(state, str) and state in TERMINAL_STATES:
        del s.orders[row[CLIENT_ID]]
        return
    order["state"] = state
    if row[EXCHANGE_ID]:
        order["exchange_order_id"] = row[EXCHANGE_ID]


def _fill(s: State, row) -> None:
    order = s.orders.get(row[CLIENT_ID]) if row[CLIENT_ID] else None
    if order is not None:
        order["filled"] = _add(order["filled"], row[AMOUNT])
    if row[FEE] is not None and _today(s, counting_day(
            row[TS], _data(row).get("exchange_ts"), s.last_day_closed)):
        s.fees_today = _add(s.fees_today, row[FEE])


def _position_opened(s: State, row) -> None:
    s.external.pop(row[SYMBOL], None)  # flagged while our order was unresolved: it is ours
    s.positions[row[SYMBOL]] = {
        "position_id": row[POSITION_ID], "symbol": row[SYMBOL], "side": row[SIDE],
        "amount": row[AMOUNT], "entry_price": row[PRICE], "opened_ts": row[TS],
        "opened_seq": row[SEQ], "best_price": row[PRICE], "trailing_active": False,
        "trail_pct": None, "stop": None, "stops_placed": 0, "fees": row[FEE] or "0",
    }


def _position_of(s: State, row) -> dict | None:
    p = s.positions.get(row[SYMBOL])
    if p is None or (row[POSITION_ID] and p["position_id"] != row[POSITION_ID]):
        return None
    return p


def _position_changed(s: State, row) -> None:
    p = _position_of(s, row)
    if p is not None:
        p["amount"] = row[AMOUNT]
        if row[PRICE] is not None:
            p["entry_price"] = row[PRICE]
        if row[FEE] is not None:
            p["fees"] = row[FEE]


def _position_closed(s: State, row) -> None:
    p = _position_of(s, row)
    if p is not None:
        del s.positions[row[SYMBOL]]
    if _today(s, recorded_day(row[TS], _data(row).get("day"))):
        s.realized_today = _add(s.realized_today, row[PNL])
    if row[PNL] is not None and Decimal(row[PNL]) < 0:
        s.last_loss_exit[row[SYMBOL]] = row[TS]


def _today(s: State, day: str) -> bool:
    """Is ``day`` the day the totals are kept for, a later one starting them anew? An
    earlier day's (a stop that fired before midnight, recorded after) is not."""
    if day > s.day:
        s.day, s.realized_today, s.fees_today = day, "0", "0"
    return day == s.day


def _best_price(s: State, row) -> None:
    p = _position_of(s, row)
    if p is not None:
        d = _data(row)
        p["best_price"] = row[PRICE]
        p["trailing_active"] = bool(d.get("trailing_active", p["trailing_active"]))
        if d.get("trail_pct") is not None:
            p["trail_pct"] = d["trail_pct"]


def _stop_placed(s: State, row) -> None:
    p = _position_of(s, row)
    if p is not None:
        p["stop"] = {"client_order_id": row[CLIENT_ID], "exchange_order_id": row[EXCHANGE_ID],
                     "price": row[PRICE], "ts": row[TS]}
        p["stops_placed"] += 1


def _stop_cancelled(s: State, row) -> None:
    p = s.positions.get(row[SYMBOL])
    if p is not None and p["stop"] and p["stop"]["client_order_id"] == row[CLIENT_ID]:
        p["stop"] = None


def _balance(s: State, row) -> None:
    equity = _amount(_data(row).get("equity"))
    if equity is None:
        return
    s.equity = equity
    if s.equity_peak is None or Decimal(equity) > Decimal(s.equity_peak):
        s.equity_peak = equity
    if s.day_start_equity is None:
        # No UTC day closed yet (a new ledger): today starts at the first equity known,
        # or the daily loss limit would not exist until the first midnight.
        s.day_start_equity = equity


def _rotation(s: State, row) -> None:
    d = _data(row)
    coins = d.get("coins", [])
    s.active_coins = coins if isinstance(coins, list) else []
    s.last_rotation = {"scheduled_ms": d.get("scheduled_ms"), "ts": row[TS]}


def _signal(s: State, row) -> None:
    candle_ts = _data(row).get("candle_ts")
    if candle_ts is not None and row[SYMBOL]:
        s.last_signal[row[SYMBOL]] = candle_ts


def _day_close(s: State, row) -> None:
    d = _data(row)
    day = d.get("day")
    s.last_day_closed = day if day is None or isinstance(day, str) else json.dumps(day)
    equity = _amount(d.get("equity"))
    if equity is not None:
        s.day_start_equity = equity
    s.halts.pop("daily_loss", None)


def _halt(s: State, row) -> None:
    d = _data(row)
    s.halts[_key(d.get("kind"), "manual")] = {"reason": row[REASON], "ts": row[TS],
                                               "until_ms": d.get("until_ms")}


def _resume(s: State, row) -> None:
    kind = _key(_data(row).get("kind"), "all")
    drawdown = "drawdown" in s.halts and kind in ("all", "drawdown")
    if kind == "all":
        s.halts.clear()
    else:
        s.halts.pop(kind, None)
    if drawdown:
        # A human accepted the loss: drawdown is measured from here on, or the halt
        # would fire again at once. Lifting any other halt forgets no loss.
        s.equity_peak = s.equity


def _external_position(s: State, row) -> None:
    # Flagged until reconcile finds it gone or adopts it (then it is a position).
    d = _data(row)
    if d.get("adopted") is True or d.get("gone") is True:
        s.external.pop(row[SYMBOL], None)
    else:
        s.external[row[SYMBOL]] = {"side": row[SIDE], "amount": row[AMOUNT],
                                   "price": row[PRICE], "ts": row[TS]}


def _job_run(s: State, row) -> None:
    d = _data(row)
    job, outcome = _key(d.get("job"), "?"), d.get("outcome")
    since = (s.last_runs.get(job) or {}).get("failing_since")
    if outcome in ("error", "degraded"):
        since = row[TS] if since is None else since
    elif outcome in ("ok", "skipped") and d.get("started_ms") is not None:
        since = None  # a run that never started (missed, or coalesced) tells nothing
    s.last_runs[job] = {
        "ts": row[TS], "outcome": outcome, "scheduled_ms": d.get("scheduled_ms"),
        "duration_ms": d.get("duration_ms"), "seq": row[SEQ], "failing_since": since,
    }


def _service(s: State, row) -> None:
    if _data(row).get("event") == "started":  # the time it was down is not failing time
        for run in s.last_runs.values():
            run["failing_since"] = None


def _ip_ban(s: State, row) -> None:
    d = _data(row)
    if d.get("lifted") is True:  # by hand (`bot lift-ban`): the bot runs from another IP
        s.ip_ban_until_ms = 0
        return
    until = d.get("until_ms")
    if type(until) is int:  # not a bool, a float or text: odd data never stops the fold
        s.ip_ban_until_ms = max(s.ip_ban_until_ms, min(until, row[TS] + LONGEST_IP_BAN_MS))


def _reconcile_run(s: State, row) -> None:
    if not _data(row).get("dry_run"):
        s.last_reconcile_ts, s.last_reconcile_seq = row[TS], row[SEQ]


_HANDLERS = {
    "order_intent": _order_intent,
    "order_submitted": _order_submitted,
    "order_update": _order_update,
    "fill": _fill,
    "position_opened": _position_opened,
    "position_changed": _position_changed,
    "position_closed": _position_closed,
    "best_price": _best_price,
    "stop_placed": _stop_placed,
    "stop_moved": _stop_placed,
    "stop_cancelled": _stop_cancelled,
    "balance": _balance,
    "rotation": _rotation,
    "signal": _signal,
    "day_close": _day_close,
    "halt": _halt,
    "resume": _resume,
    "job_run": _job_run,
    "reconcile_run": _reconcile_run,
    "external_position": _external_position,
    "ip_ban": _ip_ban,
    "service": _service,
}
