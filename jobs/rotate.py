"""Coin rotation: the top N coins by 24 h quote volume become the active coins.

Positions in coins that drop out stay managed by the scan until they close (the scan
covers active coins and coins with open positions).
"""

from __future__ import annotations

import logging

from core import rotation
from ledger import Fact

log = logging.getLogger(__name__)

VOLATILITY_CANDLES = 100


ALREADY = {"skipped": True, "reason": "already rotated for this instant"}


def run(rt, scheduled_ms: int, run_id: str) -> dict:
    cfg = rt.config.rotation
    if rotated_for(rt.ledger.state(), scheduled_ms):
        return ALREADY
    # fetch. The markets first, reloaded: one delisted (or its tick and lot sizes changed)
    # since the service started must not be chosen (or priced) from ccxt's cache, and the
    # tickers of one listed since must not be dropped as unknown.
    tradable = rt.client.load_markets(reload=True)
    tickers = rt.client.tickers()
    for data in rt.data_clients[1:]:
        try:
            data.load_markets(reload=True)
        except Exception as exc:  # noqa: BLE001 - that client keeps its list until next time
            log.warning("rotation: a data client's markets not reloaded (%s)", exc)
    # decide
    ranked = rotation.rank_by_volume(tickers, quote=rt.config.exchange.quote,
                                     min_quote_volume=cfg.min_quote_volume,
                                     blacklist=cfg.blacklist, tradable=tradable)
    if cfg.rank_by == "volatility":
        candidates = ranked[: cfg.top_n * 3]
        vols = {r.symbol: closes(rt, r.symbol) for r in candidates}
        ranked = rotation.rank_by_volatility(candidates, {
            s: rotation.volatility(c) if c else None for s, c in vols.items()})
    coins = rotation.choose(ranked, cfg.top_n)
    # record: once per slot, whichever run gets here first (the scheduled one, or a scan's
    # retry while no coin is active, may fetch at the same time)
    with rt.lock:
        state = rt.ledger.state()
        if rotated_for(state, scheduled_ms):
            return ALREADY
        return record(rt, run_id, scheduled_ms, coins, ranked, state.active_coins)


def rotated_for(state, scheduled_ms: int) -> bool:
    return bool(state.last_rotation) and state.last_rotation.get("scheduled_ms") == scheduled_ms


def record(rt, run_id: str, scheduled_ms: int, coins: list[str], ranked: list,
           previous: list[str]) -> dict:
    cfg = rt.config.rotation
    rt.ledger.append([Fact(
        "rotation", rt.clock.now_ms(), run_id=run_id,
        reason=f"top {cfg.top_n} by {cfg.rank_by}",
        data={"coins": coins, "scheduled_ms": scheduled_ms,
              "added": [c for c in coins if c not in previous],
              "removed": [c for c in previous if c not in coins],
              "ranking": [{"symbol": r.symbol, "quote_volume": r.quote_volume,
                           "volatility": r.volatility} for r in ranked[: cfg.top_n * 2]]})])
    log.info("rotation: %s", ", ".join(coins) or "(no eligible coins)")
    return {"coins": len(coins), "added": len([c for c in coins if c not in previous])}


def closes(rt, symbol: str) -> list[float]:
    """Closes for the volatility ranking; none when the candles are unavailable (the
    symbol then ranks last instead of stopping the rotation)."""
    try:
        return [c.close for c in rt.client.closed_candles(symbol, rt.config.strategy.timeframe,
                                                          VOLATILITY_CANDLES)]
    except Exception as exc:  # noqa: BLE001 - one coin's data must not stop the rotation
        log.warning("rotation: %s candles unavailable (%s); ranked last", symbol, exc)
        return []
