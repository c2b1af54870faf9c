"""When can the exit rules be skipped? Float bounds that prove ``evaluate_exit`` holds.

A backtest evaluates an open position on the candles closing while it is open, as the
live scan does. Most of those candles change nothing: the price stays between the
position's protective level and its best price. ``watch_for`` turns the position's
ledger state into float bounds once (after every change), and ``next_due`` finds, with
numpy, the next candle on which :func:`core.exits.evaluate_exit` could return anything
but a plain ``hold`` - or the scan would move the exchange stop. Only that candle is
evaluated, by the real function.

Exact, not approximate: ``evaluate_exit`` compares exact Decimals made from the floats'
shortest text; every bound here carries a relative margin of ``MARGIN`` (1e-9), far
above float rounding (~1e-16), so a skipped candle is one on which the Decimal rules
provably hold. Near a bound the candle is simply evaluated. A candle is due when:

* its favourable extreme could reach the best price (a new best, perhaps arming the
  trail);
* its adverse extreme could reach the protective level that stood before it (the stop
  loss, the resting exchange stop, the armed trail): an exit;
* its move from the previous close could be a surge in profit that tightens the trail;
* or the state is not settled: a trail due to arm at the current best, a trail without
  its width, a stop order missing or looser than the rules' level.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np

from core.exits import (
    ExitRules,
    favourable_pct,
    more_protective,
    pct,
    position_view,
    stop_needs_move,
    stop_price,
    trailing_stop_price,
)

MARGIN = 1e-9
FIRST_CHUNK = 64


@dataclass(frozen=True)
class Watch:
    """Bounds inside which a candle changes nothing for one position (see module doc)."""

    long: bool
    best_bound: float  # long: due if high > it; short: due if low < it
    level_bound: float  # long: due if low < it; short: due if high > it
    surge_move: float | None  # due if the favourable close-to-close move (%) reaches it
    entry_bound: float  # ... and the close is beyond it (in profit)
    settled: bool  # False: due at the next candle whatever it does

    def due(self, high: float, low: float, close: float, prev_close: float | None) -> bool:
        """Scalar form of the test ``next_due`` applies to arrays."""
        hi, lo = max(high, close), min(low, close)
        if not self.settled:
            return True
        if self.long and (hi > self.best_bound or lo < self.level_bound):
            return True
        if not self.long and (lo < self.best_bound or hi > self.level_bound):
            return True
        if self.surge_move is None or prev_close is None or prev_close <= 0:
            return False
        move = (close - prev_close) / prev_close * 100 * (1 if self.long else -1)
        profit = close > self.entry_bound if self.long else close < self.entry_bound
        return move >= self.surge_move and profit


def watch_for(position: Mapping[str, Any], rules: ExitRules,
              price_step: Decimal | None) -> Watch:
    """The bounds of ``position`` (the ledger fold's dict) under ``rules``."""
    pv = position_view(position)
    side, entry = pv.side, pv.entry_price
    hard = more_protective(side, stop_price(side, entry, rules.stop_loss_pct), pv.stop_price)
    best = pv.best
    width = pv.trail_pct if pv.trail_pct is not None else pct(rules.trailing_stop_pct)
    trail = trailing_stop_price(side, best, width) if pv.trailing_active else None
    level = more_protective(side, hard, trail)
    settled = not (
        (not pv.trailing_active
         and favourable_pct(side, entry, best) >= pct(rules.trailing_activation_pct))
        or (pv.trailing_active and pv.trail_pct is None)
        or stop_needs_move(side, pv.stop_price, level, None, 0, 0, price_step))
    tight = pct(rules.surge_trailing_stop_pct)
    surge_changes = not (pv.trailing_active and pv.trail_pct is not None
                         and pv.trail_pct <= tight)
    surge = float(pct(rules.surge_pct))
    long = side == "long"
    up, down = 1 + MARGIN, 1 - MARGIN
    return Watch(
        long=long,
        best_bound=float(best) * (down if long else up),
        level_bound=float(level) * (up if long else down),
        surge_move=surge - surge * MARGIN - MARGIN if surge_changes else None,
        entry_bound=float(entry) * (down if long else up),
        settled=settled)


def next_due(w: Watch, h: np.ndarray, low: np.ndarray, c: np.ndarray, i0: int) -> int:
    """Index of the first candle at or after ``i0`` that is due (``len(c)`` if none)."""
    n = len(c)
    if not w.settled or i0 >= n:
        return min(i0, n)
    i, size = i0, FIRST_CHUNK
    while i < n:
        j = min(n, i + size)
        hi, lo, cl = np.maximum(h[i:j], c[i:j]), np.minimum(low[i:j], c[i:j]), c[i:j]
        if w.long:
            due = (hi > w.best_bound) | (lo < w.level_bound)
        else:
            due = (lo < w.best_bound) | (hi > w.level_bound)
        if w.surge_move is not None:
            prev = c[i - 1:j - 1] if i > 0 else np.r_[np.nan, c[:j - 1]]
            with np.errstate(divide="ignore", invalid="ignore"):
                move = (cl - prev) / prev * 100
            if w.long:
                due |= (move >= w.surge_move) & (cl > w.entry_bound) & (prev > 0)
            else:
                due |= (-move >= w.surge_move) & (cl < w.entry_bound) & (prev > 0)
        hit = np.flatnonzero(due)
        if len(hit):
            return i + int(hit[0])
        i, size = j, size * 4
    return n


__all__ = ["MARGIN", "Watch", "watch_for", "next_due"]
