"""Choosing the active coins: top N by 24 h quote volume, filtered. Pure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from core.exchange_types import Ticker


@dataclass(frozen=True)
class Ranked:
    symbol: str
    quote_volume: Decimal
    volatility: float | None = None


def rank_by_volume(tickers: Mapping[str, Ticker], *, quote: str, min_quote_volume: float,
                   blacklist: Sequence[str], tradable: Sequence[str] | None = None
                   ) -> list[Ranked]:
    """Eligible symbols, highest 24 h quote volume first (ties by symbol, so stable)."""
    banned = set(blacklist)
    allowed = set(tradable) if tradable is not None else None
    out = []
    for symbol, t in tickers.items():
        if symbol in banned or (allowed is not None and symbol not in allowed):
            continue
        if not symbol.endswith(f":{quote}") and f"/{quote}" not in symbol:
            continue
        if t.quote_volume <= 0 or t.quote_volume < Decimal(str(min_quote_volume)):
            continue  # none traded in 24 h: not trading (halted, settling), whatever the floor
        out.append(Ranked(symbol, t.quote_volume))
    return sorted(out, key=lambda r: (-r.quote_volume, r.symbol))


def volatility(closes: Sequence[float]) -> float | None:
    """Standard deviation of simple returns; None without enough clean data."""
    rets = [b / a - 1 for a, b in zip(closes, closes[1:], strict=False) if a > 0 and b > 0]
    if len(rets) < 10:
        return None
    mean = sum(rets) / len(rets)
    return math.sqrt(sum((r - mean) ** 2 for r in rets) / (len(rets) - 1))


def rank_by_volatility(ranked: Sequence[Ranked], vols: Mapping[str, float | None]) -> list[Ranked]:
    """Re-rank volume-eligible symbols by volatility, highest first; unknown last."""
    with_vol = [Ranked(r.symbol, r.quote_volume, vols.get(r.symbol)) for r in ranked]
    return sorted(with_vol, key=lambda r: (r.volatility is None, -(r.volatility or 0), r.symbol))


def choose(ranked: Sequence[Ranked], top_n: int) -> list[str]:
    return [r.symbol for r in ranked[:top_n]]
