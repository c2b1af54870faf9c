"""Exit rules for one open position, as pure functions of its state and the prices seen.

The scan job calls :func:`evaluate_exit` once per open position per scan and records
what it returns (a new best price, an armed or tightened trail, an exit and its
reason). Nothing is kept in memory: the best price and the trail live in the ledger,
so after a restart the same position dict gives the same decision.

Rules (thresholds from ``[exits]`` in the config, or a strategy's own ExitRules):

* **Stop loss** - ``stop_loss_pct`` (2 %) from entry. The same level rests on the
  exchange as a stop order (:func:`stop_price` computes it for both), so a crash or a
  slow scan cannot skip it; the check here is the backstop.
* **Trailing stop** - armed once the best price is ``trailing_activation_pct`` (2 %)
  in profit; then exits when the price retraces ``trailing_stop_pct`` (0.5 %) from
  the best price. Once armed it stays armed.
* **Surge** - a favourable move of ``surge_pct`` (4 %) or more between two scans
  (previous scan's price to this scan's last price) while the position is in profit.
  Our choice: **lock the profit with a tight trail** - the trail is armed at once
  with ``surge_trailing_stop_pct`` (0.25 %) from the best price instead of taking
  profit immediately. A surge often keeps running; the tight trail rides it and
  gives back at most 0.25 % from the top. An exit through that tight trail has
  reason ``surge_lock``.

Which price is compared with which level: within one scan only the extremes are
known, not their order. Levels that existed for the whole scan (the stop, the trail
from the previous best) are compared with the scan's adverse extreme; the trail from
a best price reached during this scan is compared only with the last price (which
came after it). That never exits on a retrace that may have happened before the high.

The protective level (:attr:`ExitDecision.stop_price`, the more protective of the
stop loss and the armed trail) is what should rest on the exchange; it only ever
tightens. Prices are exact ``Decimal``; a stop goes on the market's tick the protective
way (``stop_on_tick``) before it is sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any, Literal

PositionSide = Literal["long", "short"]
ExitAction = Literal["hold", "record_best", "tighten_trail", "exit"]

HUNDRED = Decimal(100)


def as_decimal(value: Any) -> Decimal | None:
    """A finite Decimal from a Decimal, int, decimal string or float; None for None/bad.

    Floats go through ``repr`` so 0.1 becomes Decimal('0.1'), not its binary expansion.
    """
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, Decimal):
            d = value
        elif isinstance(value, float):
            d = Decimal(repr(value))
        else:
            d = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        return None
    return d if d.is_finite() else None


def pct(value: float | Decimal | str) -> Decimal:
    """A percentage as Decimal (2.0 -> Decimal('2.0'))."""
    d = as_decimal(value)
    if d is None:
        raise ValueError(f"not a percentage: {value!r}")
    return d


def _sign(side: str) -> int:
    if side == "long":
        return 1
    if side == "short":
        return -1
    raise ValueError(f"side must be 'long' or 'short', not {side!r}")


def stop_price(side: PositionSide, entry: Decimal, pct_away: float | Decimal) -> Decimal:
    """The stop-loss level ``pct_away`` % against the position from ``entry``."""
    return entry * (1 - _sign(side) * pct(pct_away) / HUNDRED)


def trailing_stop_price(side: PositionSide, best: Decimal,
                        pct_away: float | Decimal) -> Decimal:
    """The trailing-stop level ``pct_away`` % back from the best price."""
    return stop_price(side, best, pct_away)


def favourable_pct(side: PositionSide, reference: Decimal, price: Decimal) -> Decimal:
    """How far ``price`` has moved in the position's favour from ``reference``, in %."""
    return _sign(side) * (price - reference) / reference * HUNDRED


def more_protective(side: PositionSide, a: Decimal, b: Decimal | None) -> Decimal:
    """Of two stop levels, the one closer to the money (higher for a long)."""
    if b is None:
        return a
    return max(a, b) if side == "long" else min(a, b)


def resting_level(position: PositionView | Mapping[str, Any],
                  stop_loss_pct: float | Decimal) -> Decimal:
    """Where a position's stop belongs now: its stop loss from the entry, or its trailing
    stop once armed, whichever protects more."""
    pv = position_view(position)
    level = stop_price(pv.side, pv.entry_price, stop_loss_pct)
    if pv.trailing_active and pv.trail_pct is not None:
        level = more_protective(pv.side, trailing_stop_price(pv.side, pv.best, pv.trail_pct),
                                level)
    return level


def crossed(side: PositionSide, price: Decimal, level: Decimal) -> bool:
    """True when ``price`` is at or beyond the stop ``level`` (at/below for a long)."""
    return price <= level if side == "long" else price >= level


@dataclass(frozen=True)
class ExitRules:
    """Exit thresholds (same names as ``[exits]`` in the config)."""

    stop_loss_pct: float = 2.0
    trailing_activation_pct: float = 2.0
    trailing_stop_pct: float = 0.5
    surge_pct: float = 4.0
    surge_trailing_stop_pct: float = 0.25
    stop_move_interval_s: int = 30

    @classmethod
    def from_config(cls, exits: Any) -> ExitRules:
        """From ``config.exits`` (or anything with these attribute names)."""
        if isinstance(exits, ExitRules):
            return exits
        return cls(**{name: getattr(exits, name) for name in cls.__dataclass_fields__
                      if hasattr(exits, name)})


@dataclass(frozen=True)
class PositionView:
    """What the exit rules need of an open position (read from the ledger's dict)."""

    position_id: str
    symbol: str
    side: PositionSide
    amount: Decimal
    entry_price: Decimal
    opened_ts: int | None = None
    best_price: Decimal | None = None
    trailing_active: bool = False
    trail_pct: Decimal | None = None
    stop_price: Decimal | None = None  # the stop order resting on the exchange, if any

    @classmethod
    def from_state(cls, p: Mapping[str, Any]) -> PositionView:
        """From the ledger fold's position dict (amounts and prices as decimal strings)."""
        side = p.get("side")
        _sign(side)
        entry = as_decimal(p.get("entry_price"))
        amount = as_decimal(p.get("amount"))
        if entry is None or entry <= 0 or amount is None:
            raise ValueError(f"position {p.get('position_id')!r}: bad entry price or amount")
        stop = p.get("stop") or {}
        return cls(
            position_id=str(p.get("position_id", "")),
            symbol=str(p.get("symbol", "")),
            side=side,
            amount=amount,
            entry_price=entry,
            opened_ts=p.get("opened_ts"),
            best_price=as_decimal(p.get("best_price")),
            trailing_active=bool(p.get("trailing_active", False)),
            trail_pct=as_decimal(p.get("trail_pct")),
            stop_price=as_decimal(stop.get("price")) if isinstance(stop, Mapping) else None,
        )

    @property
    def best(self) -> Decimal:
        """Best price so far; the entry price until one is recorded."""
        if self.best_price is None:
            return self.entry_price
        return more_protective(self.side, self.entry_price, self.best_price)


def position_view(position: PositionView | Mapping[str, Any]) -> PositionView:
    return position if isinstance(position, PositionView) else PositionView.from_state(position)


@dataclass(frozen=True)
class ExitDecision:
    """What to do with one position after a scan.

    ``action``: ``exit`` (close now, ``reason`` says why), ``tighten_trail`` (trail armed
    or tightened: record it), ``record_best`` (new best price: record it), ``hold``.
    The state fields are the position's state *after* this scan; the caller records
    them whenever ``changed`` is true, and moves the exchange stop to ``stop_price``
    when :func:`stop_needs_move` says so.
    """

    action: ExitAction
    reason: str
    detail: str
    best_price: Decimal
    best_improved: bool
    trailing_active: bool
    trail_pct: Decimal | None
    stop_price: Decimal | None
    exit_level: Decimal | None = None  # the stop/trail level that was crossed (exits only)
    numbers: Mapping[str, str] = field(default_factory=dict)

    @property
    def exit(self) -> bool:
        return self.action == "exit"

    @property
    def changed(self) -> bool:
        return self.action in ("record_best", "tighten_trail") or (
            self.action == "exit" and self.best_improved)


def _hold_bad(pv: PositionView, why: str) -> ExitDecision:
    return ExitDecision("hold", "bad_price", why, pv.best, False, pv.trailing_active,
                        pv.trail_pct, None)


def _exit_reason(side: PositionSide, stop_loss: Decimal, level: Decimal, trailing: bool,
                 trail_pct: Decimal | None, rules: ExitRules) -> str:
    """Name the crossed ``level``: the stop loss, unless a trail is armed and the level is
    tighter than the stop loss (the trail itself, or the exchange stop moved up to it)."""
    if not trailing or level == stop_loss or more_protective(side, stop_loss, level) == stop_loss:
        return "stop_loss"
    if trail_pct is not None and trail_pct < pct(rules.trailing_stop_pct):
        return "surge_lock"
    return "trailing_stop"


def evaluate_exit(position: PositionView | Mapping[str, Any], price_high: Any, price_low: Any,
                  last_price: Any, prev_scan_price: Any, rules: Any) -> ExitDecision:
    """Decide hold / record best / tighten trail / exit for one position.

    ``price_high``/``price_low``: extremes since the previous scan (None = use the last
    price); ``prev_scan_price``: the last price of the previous scan (None = no surge
    check); ``rules``: an :class:`ExitRules` or ``config.exits``.
    """
    rules = ExitRules.from_config(rules)
    pv = position_view(position)
    side = pv.side
    last = as_decimal(last_price)
    if last is None or last <= 0:
        return _hold_bad(pv, f"last price {last_price!r} is not a positive number")
    hi = as_decimal(price_high) if price_high is not None else last
    lo = as_decimal(price_low) if price_low is not None else last
    if hi is None or lo is None or lo <= 0:
        return _hold_bad(pv, f"high/low {price_high!r}/{price_low!r} not positive numbers")
    hi, lo = max(hi, lo, last), min(hi, lo, last)
    prev = as_decimal(prev_scan_price)
    if prev is not None and prev <= 0:
        prev = None

    favourable, adverse = (hi, lo) if side == "long" else (lo, hi)
    entry = pv.entry_price
    stop_loss = stop_price(side, entry, rules.stop_loss_pct)
    hard = more_protective(side, stop_loss, pv.stop_price)  # the exchange stop may be tighter

    # 1. Levels that stood for the whole scan, against the scan's adverse extreme.
    old_best = pv.best
    old_trail_pct = pv.trail_pct if pv.trail_pct is not None else pct(rules.trailing_stop_pct)
    old_trail = trailing_stop_price(side, old_best, old_trail_pct) if pv.trailing_active else None
    level_before = more_protective(side, hard, old_trail)

    # 2. The state after this scan: best price, trail, surge.
    new_best = more_protective(side, old_best, favourable)
    improved = new_best != old_best
    best_move = favourable_pct(side, entry, new_best)
    trailing = pv.trailing_active or best_move >= pct(rules.trailing_activation_pct)
    trail_pct = (pv.trail_pct if pv.trail_pct is not None
                 else pct(rules.trailing_stop_pct) if trailing else None)
    scan_move = favourable_pct(side, prev, last) if prev is not None else None
    surge = (scan_move is not None and scan_move >= pct(rules.surge_pct)
             and favourable_pct(side, entry, last) > 0)
    if surge:
        tight = pct(rules.surge_trailing_stop_pct)
        trailing = True
        trail_pct = tight if trail_pct is None else min(trail_pct, tight)
    new_trail = trailing_stop_price(side, new_best, trail_pct) if trailing else None
    level_now = more_protective(side, hard, new_trail)

    numbers = {
        "entry": str(entry), "last": str(last), "high": str(hi), "low": str(lo),
        "best": str(new_best), "best_move_pct": f"{best_move:.4f}",
        "stop_loss": str(stop_loss), "resting_stop": str(pv.stop_price or ""),
        "trail": str(new_trail) if new_trail is not None else "",
        "trail_pct": str(trail_pct) if trail_pct is not None else "",
        "scan_move_pct": f"{scan_move:.4f}" if scan_move is not None else "",
    }
    common = dict(best_price=new_best, best_improved=improved, trailing_active=trailing,
                  trail_pct=trail_pct, stop_price=level_now, numbers=numbers)

    if crossed(side, adverse, level_before):
        reason = _exit_reason(side, stop_loss, level_before, pv.trailing_active, old_trail_pct,
                              rules)
        return ExitDecision("exit", reason, f"{reason}: price {adverse} reached level "
                            f"{level_before} (entry {entry})", exit_level=level_before, **common)
    if crossed(side, last, level_now):
        reason = _exit_reason(side, stop_loss, level_now, trailing, trail_pct, rules)
        return ExitDecision("exit", reason, f"{reason}: last {last} reached level {level_now} "
                            f"(best {new_best}, entry {entry})", exit_level=level_now, **common)
    if trailing != pv.trailing_active or trail_pct != pv.trail_pct:
        if surge:
            return ExitDecision("tighten_trail", "surge_lock", f"surge of {scan_move:.2f}% in "
                                f"one scan: trail tightened to {trail_pct}% from best {new_best}",
                                **common)
        return ExitDecision("tighten_trail", "trailing_armed", f"best {new_best} is "
                            f"{best_move:.2f}% in profit: trailing stop {trail_pct}% armed",
                            **common)
    if improved:
        return ExitDecision("record_best", "best_price", f"new best price {new_best}", **common)
    return ExitDecision("hold", "hold", f"last {last}, protective level {level_now}", **common)


def stop_on_tick(side: PositionSide, level: Decimal, step: Decimal | None) -> Decimal:
    """A stop ``level`` on the market's tick ``step``, rounded the protective way: a long's
    up, a short's down. To the nearest tick (ccxt's ``price_to_precision``), a stop could
    land up to half a tick past its level and lose more than the stop loss asks."""
    if step is None or step <= 0:
        return level
    rounding = ROUND_CEILING if _sign(side) > 0 else ROUND_FLOOR
    out = (level / step).to_integral_value(rounding=rounding) * step
    return out.quantize(Decimal(1)) if out.as_tuple().exponent > 0 else out


def stop_needs_move(side: PositionSide, resting: Decimal | None, desired: Decimal | None,
                    last_move_ms: int | None, now_ms: int, interval_s: float,
                    price_step: Decimal | None = None) -> bool:
    """Whether to move the exchange stop to ``desired``: only tighter, at most once per
    ``interval_s`` (a missing stop is placed at once). With ``price_step``, ``desired`` is
    compared as the exchange would store it, so a trail that moved by less than a tick
    does not cause a pointless replace."""
    if desired is None:
        return False
    if resting is None:
        return True
    desired = stop_on_tick(side, desired, price_step)
    if desired == resting or more_protective(side, resting, desired) == resting:
        return False
    return last_move_ms is None or now_ms - last_move_ms >= interval_s * 1000


__all__ = ["ExitRules", "PositionView", "ExitDecision", "position_view", "evaluate_exit",
           "stop_price", "trailing_stop_price", "favourable_pct", "more_protective", "crossed",
           "stop_needs_move", "stop_on_tick", "as_decimal", "pct"]
