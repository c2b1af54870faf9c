"""Which venue and clock each mode runs on (see the README's table of modes).

| mode  | market data                 | orders and account           | clock               |
| sim   | synthetic (or CSV) candles  | simulated, state in a file   | wall time x speed   |
| paper | live public data (ccxt)     | simulated, state in a file   | wall clock          |
| live  | live (ccxt)                 | the real exchange (ccxt)     | wall clock          |

Backtests build their own in-memory venue on a virtual clock (`cli.py backtest`).
"""

from __future__ import annotations

from pathlib import Path

from core.clock import AcceleratedClock, WallClock
from core.config import Config, ConfigError, Secrets

PUBLIC_DATA_CLIENTS = 4  # extra keyless ccxt instances: candles fetched concurrently


def for_mode(config: Config, clock=None):
    """(clock, venue, extra data venues) for ``config.bot.mode``."""
    from core.exchange import build_ccxt
    from core.sim_exchange import SimExchange

    mode = config.bot.mode
    if mode == "sim":
        state = Path(config.sim.state_path)
        if clock is None:
            start = SimExchange.stored_now_ms(state) if state.exists() else None
            clock = AcceleratedClock(start or WallClock().now_ms(), config.sim.speed)
        venue = SimExchange.from_config(config, clock, state_path=state)
        quiet_open_orders(venue)
        return clock, venue, []
    if mode == "paper":
        clock = clock or WallClock()
        public = build_ccxt(config, Secrets())
        venue = SimExchange.from_config(config.with_values(sim={"source": "live"}), clock,
                                        state_path=Path(config.sim.state_path),
                                        live_exchange=public)
        quiet_open_orders(venue)
        return clock, venue, []
    if mode == "live":
        if not config.secrets.has_keys:
            raise ConfigError("[bot] mode = 'live' needs BOT_API_KEY and BOT_API_SECRET")
        clock = clock or WallClock()
        venue = build_ccxt(config, config.secrets)
        data = [build_ccxt(config, Secrets()) for _ in range(PUBLIC_DATA_CLIENTS - 1)]
        return clock, venue, data
    raise ConfigError(f"[bot] mode = {mode!r} is not served by `run`; use `cli.py backtest`")


def quiet_open_orders(venue) -> None:
    """Reconciliation lists open orders of all symbols at once, knowingly (as build_ccxt)."""
    venue.options.setdefault("fetchOpenOrders", {})["warnWithoutSymbol"] = False
