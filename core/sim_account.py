"""Account arithmetic of the simulated exchange (pure): fills, positions, margin, fees.

USDT-margined linear perpetuals in one-way mode: a position is one signed amount with an
average entry price; a fill against it first closes (realizing PnL), then opens the rest
at the fill price. Money is Decimal throughout.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_DOWN, ROUND_FLOOR, ROUND_HALF_UP, Decimal
from typing import Any

from core.sim_store import SimPosition

ZERO = Decimal(0)
FEE_Q = Decimal("1e-8")


def D(x: Any) -> Decimal:
    """A Decimal from an exchange-style number: floats via their shortest repr."""
    if isinstance(x, Decimal):
        return x
    if isinstance(x, float):
        return Decimal(repr(x))
    return Decimal(str(x))


def plain(d: Decimal) -> str:
    """ccxt's number style: no exponent, no trailing zeros."""
    return f"{d.normalize():f}"


def places(step: Decimal) -> int:
    """Decimals of a step: 0.001 -> 3."""
    return max(0, -step.normalize().as_tuple().exponent)


def fmt(d: Decimal | None, decimals: int) -> str:
    """Binance's style: fixed decimals ("0.010")."""
    return f"{(d or ZERO):.{decimals}f}"


def held(d: Decimal | None, decimals: int) -> str:
    """An amount or price the account holds, in Binance's style, never rounded: the
    market's step or tick can change under an open position or a resting order, and
    what it holds stays what it is (0.248 under a new step of 0.1 is still 0.248)."""
    return fmt(d, max(decimals, places(d or ZERO)))


@dataclass(frozen=True)
class Spec:
    """The trading rules of one market, as Decimals."""

    tick: Decimal
    step: Decimal
    max_qty: Decimal | None
    max_market_qty: Decimal | None
    min_notional: Decimal

    @classmethod
    def of(cls, m: dict) -> Spec:
        """From a ccxt market dict (TICK_SIZE precision: steps)."""
        lim = m.get("limits") or {}
        mx = (lim.get("amount") or {}).get("max")
        mkt = (lim.get("market") or {}).get("max")
        return cls(D(m["precision"]["price"]), D(m["precision"]["amount"]),
                   None if mx is None else D(mx), None if mkt is None else D(mkt),
                   D((lim.get("cost") or {}).get("min") or 0))

    def truncate(self, amount: Decimal) -> Decimal:
        return (amount / self.step).to_integral_value(ROUND_DOWN) * self.step

    def round_price(self, price: Decimal) -> Decimal:
        return (price / self.tick).to_integral_value(ROUND_HALF_UP) * self.tick

    def slip(self, price: Decimal, side: str, rate: Decimal) -> Decimal:
        """A market execution price: ``rate`` worse than ``price``, on the tick grid."""
        if side == "BUY":
            return (price * (1 + rate) / self.tick).to_integral_value(ROUND_CEILING) * self.tick
        p = (price * (1 - rate) / self.tick).to_integral_value(ROUND_FLOOR) * self.tick
        return max(self.tick, p)


def fee(qty: Decimal, price: Decimal, rate: Decimal) -> Decimal:
    return (qty * price * rate).quantize(FEE_Q, ROUND_HALF_UP)


@dataclass(frozen=True)
class Fill:
    """What a fill does to a one-way position."""

    position: SimPosition | None  # None: flat afterwards
    realized: Decimal
    opening: Decimal  # quantity that opens or adds exposure
    closing: Decimal  # quantity that reduces exposure


def apply_fill(pos: SimPosition | None, side: str, qty: Decimal, price: Decimal, ts: int,
               entry_q: Decimal) -> Fill:
    """The position after buying/selling ``qty`` at ``price`` (entry rounded to entry_q)."""
    amt = pos.amount if pos else ZERO
    signed = qty if side == "BUY" else -qty
    if amt == 0 or (amt > 0) == (signed > 0):
        new = amt + signed
        entry = price if amt == 0 else (abs(amt) * pos.entry_price + qty * price) / abs(new)
        return Fill(SimPosition(new, entry.quantize(entry_q), ts), ZERO, qty, ZERO)
    closing = min(qty, abs(amt))
    realized = closing * (price - pos.entry_price) * (1 if amt > 0 else -1)
    new = amt + signed
    if new == 0:
        return Fill(None, realized, ZERO, closing)
    entry = price if qty > closing else pos.entry_price
    return Fill(SimPosition(new, entry, ts), realized, qty - closing, closing)


@dataclass(frozen=True)
class Account:
    """Cross-margin account at one instant (marks: the prices positions are valued at)."""

    wallet: Decimal
    upnl: Decimal
    position_margin: Decimal
    order_margin: Decimal
    marks: dict[str, Decimal]

    @property
    def equity(self) -> Decimal:
        """Binance's margin balance: wallet + unrealized PnL."""
        return self.wallet + self.upnl

    @property
    def available(self) -> Decimal:
        return self.equity - self.position_margin - self.order_margin


def account(wallet: Decimal, positions: dict[str, SimPosition], marks: dict[str, Decimal],
            leverage: dict[str, int], open_limits: list[tuple[str, Decimal, Decimal]]) -> Account:
    """Value the account: ``open_limits`` are (symbol, remaining qty, price) of resting
    limit orders that can add exposure (they reserve initial margin, like Binance)."""
    upnl = pos_im = ord_im = ZERO
    for s, p in positions.items():
        m = marks[s]
        upnl += p.amount * (m - p.entry_price)
        pos_im += abs(p.amount) * m / leverage[s]
    for s, qty, price in open_limits:
        ord_im += qty * price / leverage[s]
    return Account(wallet, upnl, pos_im, ord_im, marks)


def margin_ok(acct: Account, fill: Fill, price: Decimal, leverage: int, fee_: Decimal,
              mark: Decimal) -> bool:
    """Initial margin of what the fill opens, plus its fee, must fit the free balance
    (after what it closes has released margin and realized PnL)."""
    freed = fill.closing * mark / leverage + fill.realized
    return fill.opening * price / leverage + fee_ <= acct.available + freed
