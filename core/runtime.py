"""Everything a job needs, built once from the config: the imperative shell's handles.

A job is a plain function of a Runtime (clock, ledger, exchange client, config,
strategy, and the lock that serialises exchange writes across jobs).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import ccxt

from core.clock import WallClock, iso
from core.config import Config
from core.exchange import ExchangeClient, IpBan, IpBanned, is_ip_ban
from core.strategies import Strategy, load_strategy
from ledger import Fact, Ledger, LedgerError
from ledger.audit import BACKTEST_KIND, recorded_mode
from ledger.store import RECORDING_SLACK_MS

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    config: Config
    clock: object
    ledger: Ledger
    client: ExchangeClient
    strategy: Strategy
    # Clients used to fetch market data concurrently (public reads); the first is `client`.
    data_clients: list[ExchangeClient] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)
    venue: object = None  # the raw venue (a SimExchange in sim/paper/backtest)
    # Set when the service is asked to stop: a job waiting for the lock, or a scan with
    # entries still to make, sends nothing new.
    stopping: threading.Event = field(default_factory=threading.Event)
    # symbol -> the candles last fetched (holes and all): the correlation limit measures
    # a held symbol on them when this scan could not fetch it (or not intact).
    last_candles: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.data_clients:
            self.data_clients = [self.client]

    def seq_floor(self, ts_ms: int) -> int:
        """``Ledger.seq_floor`` with its slack in real time: an accelerated clock's hour
        passes in seconds, shorter than a writer may wait for the ledger."""
        speed = max(1.0, float(getattr(self.clock, "speed", 1.0)))
        return self.ledger.seq_floor(ts_ms, slack_ms=int(RECORDING_SLACK_MS * speed))

    def close(self) -> None:
        self.ledger.close()
        closer = getattr(self.venue, "close", None)
        if callable(closer):
            closer()


def check_ledger_mode(db_path: str | Path, mode: str) -> None:
    """Refuse to trade on a backtest's ledger, or on one another mode wrote: its positions
    and orders are another account's (a sim ledger's long, managed on a live account,
    would sell a real position). A ledger that cannot be read is left to the ledger."""
    path = Path(db_path)
    if not path.is_file():
        return
    recorded = recorded_mode(path)
    if recorded == BACKTEST_KIND:
        raise LedgerError(f"{path}: a backtest's ledger; the bot does not trade on it "
                          "(give --db another file)")
    if recorded and recorded != mode:
        raise LedgerError(f"{path}: written by the bot in [bot] mode = {recorded!r}, and the "
                          f"config says {mode!r}: a ledger holds one account's positions and "
                          f"orders (give --db another file, or set mode = {recorded!r})")


def held_ban(ledger: Ledger, clock) -> None:
    """Raise IpBanned while the ban the ledger recorded is in force: each call into it
    lengthens it (a restart's first calls too)."""
    until = ledger.state().ip_ban_until_ms
    if until > clock.now_ms():
        raise IpBanned(f"{IpBanned.until(until)} (recorded in the ledger; `bot lift-ban` if "
                       "the bot now runs from another IP)")


def remember_ban(ban: IpBan, ledger: Ledger, clock) -> None:
    """Hold the exchange's ban of this IP that the ledger recorded (a restart calling into
    it would lengthen it), and record each new one."""
    until = ledger.state().ip_ban_until_ms
    if until > clock.now_ms():
        log.warning("the exchange banned this IP until %s (recorded in the ledger): nothing "
                    "is called before then", iso(until))
    ban.hold(until)  # before on_hold is set: not recorded again
    ban.on_hold = lambda until_ms: record_ban(ledger, clock, until_ms)


def record_ban(ledger: Ledger, clock, until_ms: int) -> None:
    try:
        ledger.append([Fact("ip_ban", clock.now_ms(), reason=f"banned until {iso(until_ms)}",
                            data={"until_ms": until_ms})])
    except Exception as exc:  # noqa: BLE001 - e.g. disk full: the ban holds all the same
        log.error("the IP ban until %s not recorded in the ledger: %s", iso(until_ms), exc)


def start_venues(config: Config, ledger: Ledger, clock, last_ms: int | None):
    """venues.for_mode, under the ban the ledger recorded; a ban its own calls meet (paper
    reads the exchange's markets) is recorded, or each restart would lengthen it."""
    from core import venues

    if config.bot.mode == "sim":
        return venues.for_mode(config, clock, not_before_ms=last_ms)
    wall = clock or WallClock()
    held_ban(ledger, wall)
    try:
        return venues.for_mode(config, clock, not_before_ms=last_ms)
    except ccxt.BaseError as exc:
        if not is_ip_ban(exc):
            raise
        until = IpBan().end_ms(exc, wall.now_ms())
        record_ban(ledger, wall, until)
        raise IpBanned(f"{IpBanned.until(until)} (answered as the bot started; recorded in "
                       "the ledger)") from None


def build(config: Config, db_path: str | Path, *, clock=None, venue=None,
          data_venues: list | None = None) -> Runtime:
    """A runtime for ``config.bot.mode``; ``venue``/``clock`` override (tests, backtests)."""
    from core import venues

    ledger = Ledger(db_path, checkpoint_every=config.bot.checkpoint_every)
    if venue is None:
        rows = ledger.select("SELECT ts FROM facts ORDER BY seq DESC LIMIT 1")
        last = rows[0]["ts"] if rows else None
        try:
            venues.check_account_kept(config, ledger.state())
            clock, venue, data_venues = start_venues(config, ledger, clock, last)
        except BaseException:
            ledger.close()
            raise
    client = ExchangeClient(venue, config, clock)
    extra = [ExchangeClient(v, config, clock) for v in (data_venues or [])]
    # Lanes, so no call waits behind another on one client: the main client fetches the
    # balance, the first extra client keeps the exchange's clock, the rest fetch candles.
    keeper = extra[0] if extra else client
    for c in [client, *extra[1:]]:
        if c is not keeper:
            c.share_clock(keeper)
    for c in extra:
        c.ban = client.ban  # one IP: a ban answered to one client holds them all
    remember_ban(client.ban, ledger, clock)
    data_clients = [client] + extra
    return Runtime(config=config, clock=clock, ledger=ledger, client=client,
                   strategy=load_strategy(config.strategy), data_clients=data_clients,
                   venue=venue)
