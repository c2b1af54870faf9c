"""Which venue and clock each mode runs on (see the README's table of modes).

| mode  | market data                 | orders and account           | clock               |
| sim   | synthetic (or CSV) candles  | simulated, state in a file   | wall time x speed   |
| paper | live public data (ccxt)     | simulated, state in a file   | wall clock          |
| live  | live (ccxt)                 | the real exchange (ccxt)     | wall clock          |

Backtests build their own in-memory venue on a virtual clock (`cli.py backtest`).
"""

from __future__ import annotations

from core.clock import AcceleratedClock, WallClock
from core.config import Config, ConfigError, Secrets, sim_state_path

SIM_DATA_CLIENTS_MAX = 16  # candle lanes at most (live: keyless ccxt instances)


def for_mode(config: Config, clock=None, not_before_ms: int | None = None):
    """(clock, venue, extra data venues) for ``config.bot.mode``.

    In sim mode the clock resumes where the simulated exchange's state file stopped (the
    simulated market pauses while no bot runs), and never before ``not_before_ms`` (the
    ledger's last fact), so the ledger's time never runs backwards across a restart."""
    from core.exchange import build_ccxt
    from core.sim_exchange import SimExchange, make_source

    mode = config.bot.mode
    if mode == "sim":
        state = sim_state_path(config)
        source = None
        if clock is None:
            start = SimExchange.stored_now_ms(state) if state.exists() else None
            if start is None and config.sim.source == "csv":
                source = make_source(config, None, None)  # read once: the venue replays it
                start = csv_replay_start(source, config)
            if start is not None and not_before_ms is not None:
                start = max(start, not_before_ms)
            clock = AcceleratedClock(start or WallClock().now_ms(), config.sim.speed)
        venue = SimExchange.from_config(config, clock, state_path=state, source=source)
        quiet_open_orders(venue)
        return clock, venue, sim_data_venues(config, venue)
    if mode == "paper":
        clock = clock or WallClock()
        public = build_ccxt(config, Secrets())
        venue = SimExchange.from_config(config.with_values(sim={"source": "live"}), clock,
                                        state_path=sim_state_path(config),
                                        live_exchange=public)
        quiet_open_orders(venue)
        return clock, venue, []
    if mode == "live":
        if not config.secrets.has_keys:
            raise ConfigError("[bot] mode = 'live' needs BOT_API_KEY and BOT_API_SECRET")
        clock = clock or WallClock()
        venue = build_ccxt(config, config.secrets)
        data = [build_ccxt(config, Secrets()) for _ in range(data_lanes(config))]
        return clock, venue, data
    raise ConfigError(f"[bot] mode = {mode!r} is not served by `run`; use `cli.py backtest`")


def check_account_kept(config: Config, ledger_state) -> None:
    """Refuse to start a simulated account afresh (its state file missing or emptied)
    under a ledger holding positions or open orders on it: the bot would trade on a new
    account while the ledger, and reconcile every few minutes, say they are open."""
    from core.sim_store import SimStore

    state = sim_state_path(config)
    if state is None or SimStore.peek_meta(state):
        return
    held, pending = sorted(ledger_state.positions), ledger_state.orders  # not ended
    if held or pending:
        raise ValueError(
            f"{state}: the simulated account's state file is missing or empty, but the "
            f"ledger holds {len(held)} open position(s) ({', '.join(held) or 'none'}) and "
            f"{len(pending)} open order(s) on that account; a fresh account would have "
            "none of them. Restore the file, or start afresh with a new ledger (--db)")


def csv_replay_start(market, config: Config) -> int:
    """Where a fresh simulated market replaying CSV candles starts its clock: at the
    data, once the strategy's window of candles has closed (at the wall clock, recorded
    candles would all lie in the past: every symbol flat at its last close)."""
    from core.clock import timeframe_ms

    return market.start_ms + config.strategy.candles * timeframe_ms(config.strategy.timeframe)


def sim_data_venues(config: Config, venue) -> list:
    """With simulated latency, the scan fetches candles concurrently as in live mode: one
    client per active coin (capped). The same thread-safe venue serves them all (it sleeps
    its latency outside its lock); each client gets its own lock."""
    if config.sim.latency_ms <= 0:
        return []
    return [venue] * data_lanes(config)


def data_lanes(config: Config) -> int:
    """Extra market-data clients: one keeps the exchange's clock, one per coin fetches
    candles (capped), so a scan costs about one round trip."""
    return 1 + min(config.rotation.top_n, SIM_DATA_CLIENTS_MAX)


def quiet_open_orders(venue) -> None:
    """Reconciliation lists open orders of all symbols at once, knowingly (as build_ccxt)."""
    venue.options.setdefault("fetchOpenOrders", {})["warnWithoutSymbol"] = False
