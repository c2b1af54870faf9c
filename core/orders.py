"""The order state machine and deterministic client order ids. Pure.

    intent -> submitted -> accepted -> partially_filled -> filled | cancelled | expired
    submitted -> rejected | unknown;  unknown -> (resolved by lookup) any outcome
    intent -> rejected (refused before sending, or never reached the exchange)

Every transition is recorded as a ledger row; an illegal one raises before anything
is recorded.
"""

from __future__ import annotations

import hashlib
import re

STATES = ("intent", "submitted", "accepted", "partially_filled", "filled", "cancelled",
          "rejected", "expired", "unknown")
TERMINAL = frozenset({"filled", "cancelled", "rejected", "expired"})
OUTCOMES = frozenset({"accepted", "partially_filled", "filled", "cancelled", "rejected",
                      "expired"})
TRANSITIONS: dict[str, frozenset[str]] = {
    "intent": frozenset({"submitted", "rejected", "unknown"}),
    "submitted": OUTCOMES | {"unknown"},
    "accepted": frozenset({"partially_filled", "filled", "cancelled", "expired"}),
    "partially_filled": frozenset({"partially_filled", "filled", "cancelled", "expired"}),
    "unknown": OUTCOMES | {"unknown"},
    "filled": frozenset(),
    "cancelled": frozenset(),
    "rejected": frozenset(),
    "expired": frozenset(),
}


class IllegalTransition(ValueError):
    """An order cannot move from one state to another."""


def transition(current: str, new: str) -> str:
    if current not in TRANSITIONS or new not in TRANSITIONS:
        raise IllegalTransition(f"unknown order state: {current!r} -> {new!r}")
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"illegal order transition {current} -> {new}")
    return new


def state_of(report_status: str, amount, filled) -> str:
    """Our state for an exchange order report (ccxt's status plus how much filled)."""
    if report_status == "closed":
        return "filled"
    if report_status == "open":
        return "partially_filled" if filled and filled > 0 else "accepted"
    if report_status == "canceled":
        return "cancelled"
    if report_status in ("expired", "rejected"):
        return report_status
    raise IllegalTransition(f"unknown exchange order status {report_status!r}")


# -- client order ids -------------------------------------------------------------------

CLIENT_ID_RE = re.compile(r"^[.A-Z:/a-z0-9_-]{1,36}$")  # Binance's rule
PURPOSE_CODES = {"entry": "E", "exit": "X", "stop": "S"}
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base36(n: int) -> str:
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _B36[r] + out
        if n == 0:
            return out


def client_order_id(bot_id: str, symbol: str, purpose: str, decision_ms: int, n: int = 0) -> str:
    """The id of the order a decision makes: same decision, same id, always.

    bot id, purpose code (+ n for the n-th stop of a position), market, and the
    decision's candle time in base-36 seconds: ``bot1-E-BTCUSDT-t5kq9c``.
    """
    code = PURPOSE_CODES[purpose] + (str(n) if n else "")
    market = re.sub(r"[^A-Za-z0-9]", "", symbol.split(":")[0])
    stamp = _base36(decision_ms // 1000)
    coid = f"{bot_id}-{code}-{market}-{stamp}"
    if len(coid) > 36:
        # Long market names: keep a prefix and a digest of the full symbol, so ids stay unique.
        digest = hashlib.sha256(symbol.encode()).hexdigest()[:6]
        room = 36 - len(f"{bot_id}-{code}--{stamp}") - len(digest)
        coid = f"{bot_id}-{code}-{market[:max(room, 1)]}{digest}-{stamp}"
    if not CLIENT_ID_RE.match(coid):
        raise ValueError(f"cannot make a valid client order id from {bot_id!r}, {symbol!r}")
    return coid
