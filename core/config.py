"""Every parameter in one place: built-in defaults, optionally overridden by ``bot.toml``.

The dataclasses below are the documentation of the file format: each section is a
TOML table, each field a key, with its default, allowed range and meaning.
API keys never live here: they come only from environment variables (see SECRET_ENV).
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

SECRET_ENV = {
    "api_key": "BOT_API_KEY",
    "api_secret": "BOT_API_SECRET",
    "dashboard_token": "BOT_DASHBOARD_TOKEN",
}
SECRET_WORDS = ("key", "secret", "password", "token", "passphrase")


class ConfigError(ValueError):
    """A config file or value the bot refuses to start with (exit code 2)."""


def param(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False, choices: tuple | None = None, pattern: str | None = None):
    meta = {"doc": doc, "lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices,
            "pattern": pattern}
    if isinstance(default, list | tuple):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class BotSection:
    id: str = param("bot1", "Short bot id, the prefix of every client order id.",
                    pattern=r"[A-Za-z0-9]{1,8}")
    mode: str = param("sim", "sim (offline, default) | paper | live | backtest.",
                      choices=("sim", "paper", "live", "backtest"))
    log_dir: str = param("logs", "Folder for the daily log files (bot_YYYY-MM-DD.log; "
                         "empty: no files).")
    checkpoint_every: int = param(5000, "Rows between ledger checkpoints.", lo=10, hi=10_000_000)


@dataclass(frozen=True)
class ExchangeSection:
    # The only venue the client speaks: its order rules, error codes, algo stops and
    # one-unit contracts are Binance USDⓈ-M's; another ccxt id would trade on wrong rules.
    id: str = param("binanceusdm", "ccxt exchange id (Binance USDⓈ-M futures only).",
                    choices=("binanceusdm",))
    demo: bool = param(False, "Use Binance demo trading (the futures testnet is gone).")
    quote: str = param("USDT", "Quote/settlement currency.", pattern=r"[A-Z0-9]{2,10}")
    timeout_ms: int = param(10_000, "Timeout of every HTTP call.", lo=500, hi=120_000)
    read_retries: int = param(4, "Retries of a read on a network error.", lo=0, hi=10)
    retry_base_ms: int = param(250, "First backoff delay; doubles each retry, with jitter.",
                               lo=1, hi=60_000)
    leverage: int = param(3, "Leverage set once per symbol.", lo=1, hi=125)
    margin_mode: str = param("cross", "cross | isolated.", choices=("cross", "isolated"))


@dataclass(frozen=True)
class StrategySection:
    name: str = param("momentum", "Strategy name: momentum, sma_cross, or one from `module`.")
    module: str = param("", "Importable module that registers user strategies ('' = none).")
    timeframe: str = param("5m", "Candle timeframe.",
                           choices=("1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "1d"))
    # At most 999: ccxt asks Binance for at most 1000 klines a request, one of them forming.
    candles: int = param(250, "Closed candles fetched per symbol per scan.", lo=30, hi=999)
    min_body_pct: float = param(0.7, "Minimum candle body, % of open.", lo=0, hi=100)
    long_volume_ratio: float = param(1.8, "Volume / mean of previous 20 needed for a long.",
                                     lo=0, hi=1000)
    short_volume_ratio: float = param(1.5, "Volume ratio needed for a short.", lo=0, hi=1000)
    choppiness_max: float = param(50.0, "Enter only when choppiness(14) is below this.",
                                  lo=0, hi=100)
    allow_short: bool = param(True, "Take short entries.")
    sma_fast: int = param(50, "sma_cross: fast SMA length.", lo=2, hi=997)
    sma_slow: int = param(200, "sma_cross: slow SMA length.", lo=3, hi=998)


@dataclass(frozen=True)
class ExitsSection:
    stop_loss_pct: float = param(2.0, "Stop loss distance from entry, %.", lo=0, hi=100,
                                 lo_open=True)
    trailing_activation_pct: float = param(2.0, "Favourable move that arms the trailing stop, %.",
                                           lo=0, hi=1000)
    trailing_stop_pct: float = param(0.5, "Retrace from the best price that exits, %.", lo=0,
                                     hi=100, lo_open=True)
    surge_pct: float = param(4.0, "Favourable move within one scan that counts as a surge, %.",
                             lo=0, hi=1000, lo_open=True)
    surge_trailing_stop_pct: float = param(0.25, "Tight trail applied after a surge, %.", lo=0,
                                           hi=100, lo_open=True)
    stop_move_interval_s: int = param(30, "At most one exchange stop move per this many s.",
                                      lo=0, hi=86_400)


@dataclass(frozen=True)
class RiskSection:
    sizing: str = param("fraction", "fraction | risk.", choices=("fraction", "risk"))
    trade_fraction: float = param(0.80, "Share of balance (x leverage) split over top-N slots.",
                                  lo=0, hi=1, lo_open=True)
    risk_pct: float = param(1.0, "risk sizing: % of equity lost if the stop hits.", lo=0, hi=100,
                            lo_open=True)
    max_open_positions: int = param(8, "Most positions open at once.", lo=1, hi=1000)
    cooldown_minutes: int = param(30, "No re-entry in a symbol this long after a losing exit.",
                                  lo=0, hi=100_000)
    daily_loss_limit_pct: float = param(5.0, "Loss vs equity at last UTC midnight that stops "
                                        "new entries until the next daily reset.", lo=0, hi=100,
                                        lo_open=True)
    daily_loss_close_all: bool = param(False, "Also close every position at the daily limit.")
    max_drawdown_pct: float = param(15.0, "Drawdown from the equity peak that closes all and "
                                    "halts until `cli.py resume`.", lo=0, hi=100, lo_open=True)
    max_position_notional: float = param(0.0, "Max notional per position (0 = no limit).", lo=0)
    max_total_notional: float = param(0.0, "Max notional of all positions (0 = no limit).", lo=0)
    correlation_max: float = param(0.8, "Block entries correlated above this with an open "
                                   "position's symbol.", lo=-1, hi=1)
    correlation_window: int = param(100, "Candles of returns used for the correlation.",
                                    lo=10, hi=1500)


@dataclass(frozen=True)
class RotationSection:
    top_n: int = param(8, "Number of active coins.", lo=1, hi=500)
    min_quote_volume: float = param(0.0, "Minimum 24 h quote volume to be eligible.", lo=0)
    # The exchange's unified perpetual symbols (BASE/QUOTE:SETTLE, as `bot status` shows
    # them): 'LUNAUSDT' or 'luna/usdt:usdt' would silently exclude nothing.
    blacklist: tuple = param([], "Symbols never traded, e.g. ['LUNA/USDT:USDT'].",
                             pattern=r"[^/:\sa-z]+/[A-Z0-9]+:[A-Z0-9]+")
    rank_by: str = param("volume", "volume | volatility (volume filter first).",
                         choices=("volume", "volatility"))


@dataclass(frozen=True)
class ScheduleSection:
    scan_interval_s: int = param(10, "Market scan interval.", lo=1, hi=86_400)
    rotate_interval_h: float = param(3.0, "Coin rotation interval.", lo=0, hi=720, lo_open=True)
    reconcile_interval_s: int = param(300, "Reconciliation interval.", lo=5, hi=86_400)


@dataclass(frozen=True)
class ReconcileSection:
    external_positions: str = param("flag", "Positions the ledger does not know: flag | adopt.",
                                    choices=("flag", "adopt"))


@dataclass(frozen=True)
class SimSection:
    source: str = param("synthetic", "synthetic | csv | live (paper).",
                        choices=("synthetic", "csv", "live"))
    data_dir: str = param("", "Folder of BASE_QUOTE-TF.csv candles for source = csv.")
    symbols: int = param(12, "Number of synthetic symbols.", lo=1, hi=1000)
    seed: int = param(42, "Seed of the synthetic market and fault injection.", lo=0,
                      hi=2**32 - 1)
    # Down to 0.001 (a 10 s scan every ~3 h): slower would overflow the schedule's timers.
    speed: float = param(60.0, "Clock acceleration of the simulated service.", lo=0.001,
                         hi=100_000)
    state_path: str = param("sim_exchange.db", "SQLite file of the simulated exchange's state.",
                            pattern=r".*\S.*")
    start_balance: float = param(10_000.0, "Starting USDT balance.", lo=0, lo_open=True,
                                 hi=1e12)
    taker_fee_pct: float = param(0.05, "Taker fee, %.", lo=0, hi=10)
    maker_fee_pct: float = param(0.02, "Maker fee, %.", lo=0, hi=10)
    slippage_bps: float = param(2.0, "Slippage of market orders, basis points.", lo=0, hi=10_000)
    partial_fill_prob: float = param(0.0, "Probability that a market order fills partially.",
                                     lo=0, hi=1)
    latency_ms: float = param(0.0, "Simulated network latency of every venue call, ms.", lo=0, hi=60_000)


@dataclass(frozen=True)
class FaultsSection:
    """Fault injection of the simulated exchange: probabilities per call, seeded."""

    network_error: float = param(0.0, "Network error before the order reaches the book.",
                                 lo=0, hi=1)
    timeout_after_accept: float = param(0.0, "Order accepted, caller sees a timeout.", lo=0, hi=1)
    server_error: float = param(0.0, "HTTP 5xx.", lo=0, hi=1)
    rate_limit: float = param(0.0, "HTTP 429.", lo=0, hi=1)
    insufficient_funds: float = param(0.0, "Spurious insufficient margin.", lo=0, hi=1)
    reject: float = param(0.0, "Order rejected.", lo=0, hi=1)
    forming_candle: float = param(0.0, "Forming candle returned as if closed.", lo=0, hi=1)
    bad_candles: float = param(0.0, "Duplicated / missing / out-of-order / NaN candles.",
                               lo=0, hi=1)
    clock_skew: float = param(0.0, "Timestamp (-1021) error.", lo=0, hi=1)
    crash_before_accept: float = param(0.0, "TEST ONLY: the bot process SIGKILLs itself as an order is sent (intent committed, order never reaches the book).", lo=0, hi=1)
    crash_after_accept: float = param(0.0, "TEST ONLY: the bot process SIGKILLs itself right after the exchange accepted an order (its ack never recorded).", lo=0, hi=1)


SECTIONS: dict[str, type] = {
    "bot": BotSection,
    "exchange": ExchangeSection,
    "strategy": StrategySection,
    "exits": ExitsSection,
    "risk": RiskSection,
    "rotation": RotationSection,
    "schedule": ScheduleSection,
    "reconcile": ReconcileSection,
    "sim": SimSection,
    "faults": FaultsSection,
}


@dataclass(frozen=True)
class Secrets:
    """Credentials from the environment. Never printed: repr masks them."""

    api_key: str = ""
    api_secret: str = ""
    dashboard_token: str = ""

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={mask(getattr(self, f.name))}" for f in fields(self))
        return f"Secrets({shown})"

    __str__ = __repr__

    @property
    def has_keys(self) -> bool:
        return bool(self.api_key and self.api_secret)


def mask(value: str) -> str:
    return "(set, hidden)" if value else "(not set)"


@dataclass(frozen=True)
class Config:
    bot: BotSection = field(default_factory=BotSection)
    exchange: ExchangeSection = field(default_factory=ExchangeSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    exits: ExitsSection = field(default_factory=ExitsSection)
    risk: RiskSection = field(default_factory=RiskSection)
    rotation: RotationSection = field(default_factory=RotationSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    reconcile: ReconcileSection = field(default_factory=ReconcileSection)
    sim: SimSection = field(default_factory=SimSection)
    faults: FaultsSection = field(default_factory=FaultsSection)
    secrets: Secrets = field(default_factory=Secrets, compare=False)
    source: str = field(default="(built-in defaults)", compare=False)

    def with_values(self, **sections: Mapping[str, Any]) -> Config:
        """A copy with some values replaced, validated like the file: with_values(risk={...})."""
        current = to_mapping(self)
        return from_mapping(current | {k: current.get(k, {}) | dict(v)
                                       for k, v in sections.items()},
                            source=self.source, secrets=self.secrets)


def load_secrets(environ: Mapping[str, str] | None = None) -> Secrets:
    env = os.environ if environ is None else environ
    return Secrets(**{name: env.get(var, "") for name, var in SECRET_ENV.items()})


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults, then ``path`` (or ./bot.toml if it exists), then secrets from the environment."""
    secrets = load_secrets(environ)
    if path is None:
        if not Path("bot.toml").is_file():
            return Config(secrets=secrets)
        path = "bot.toml"
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, not a config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config file ({exc})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    return from_mapping(raw, source=str(p), secrets=secrets)


def from_mapping(raw: Mapping[str, Any], *, source: str = "(mapping)",
                 secrets: Secrets | None = None) -> Config:
    errors: list[str] = []
    built: dict[str, Any] = {}
    for section_name, value in raw.items():
        if section_name not in SECTIONS:
            errors.append(f"unknown section [{section_name}]"
                          + _if_a_secret(section_name, value)
                          + f"; known sections: {', '.join(SECTIONS)}")
            continue
        if not isinstance(value, Mapping):
            errors.append(f"[{section_name}] must be a table, got {type_name(value)}")
            continue
        built[section_name] = _section(section_name, SECTIONS[section_name], value, errors)
    if errors:
        raise ConfigError(f"{source}: invalid config\n  " + "\n  ".join(errors))
    config = Config(**built, secrets=secrets or Secrets(), source=source)
    _check_across(config, source)
    return config


def _section(name: str, cls: type, values: Mapping[str, Any], errors: list[str]):
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"[{name}] {key}"
        if key not in known:
            errors.append(f"{where}: unknown key{_if_a_secret(key, value)}; known keys in "
                          f"[{name}]: {', '.join(known)}")
            continue
        problem = _check_value(known[key], value)
        if problem:
            # A table's content is never echoed, nor an array's holding tables: it may
            # hold credentials.
            shown = ("{...}" if isinstance(value, Mapping) else "[...]"
                     if isinstance(value, list | tuple)
                     and any(isinstance(v, Mapping | list | tuple) for v in value)
                     else repr(value))
            errors.append(f"{where} = {shown}: {problem}")
        elif isinstance(value, list | tuple):
            kwargs[key] = tuple(value)
        elif isinstance(known[key].default, float):
            kwargs[key] = float(value)  # TOML `1` for a float field: keep the field's type
        else:
            kwargs[key] = value
    return cls(**kwargs)


def value_problems(section: str, values: Mapping[str, Any]) -> list[str]:
    """What is wrong with ``values`` of ``[section]`` each on its own (unknown key, type,
    range), leaving out the rules across fields (a grid's other values may satisfy
    them)."""
    errors: list[str] = []
    _section(section, SECTIONS[section], values, errors)
    return errors


SECRETS_REFUSED = ("secrets are never read from the config file; set the environment "
                   f"variables {', '.join(SECRET_ENV.values())}")


def _if_a_secret(key: str, value: Any) -> str:
    # A name with "key" in it may be a credential or a misspelt setting: say both.
    return f" (if it is a credential: {SECRETS_REFUSED})" if _names_secret(key, value) else ""


def _names_secret(key: str, value: Any) -> bool:
    """A key that looks like a credential, or a table holding one."""
    if any(word in key.lower() for word in SECRET_WORDS):
        return True
    return isinstance(value, Mapping) and any(_names_secret(str(k), v) for k, v in value.items())


def _check_value(f, value: Any) -> str | None:
    default = f.default if f.default is not MISSING else f.default_factory()
    meta = f.metadata
    expected = type(default)
    if expected is bool:
        ok = isinstance(value, bool)
        allowed = "true or false"
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        allowed = "an integer"
    elif expected is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        allowed = "a number"
    elif expected is tuple:
        ok = isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        allowed = "a list of strings"
    else:
        ok = isinstance(value, str)
        allowed = "a string"
    if not ok:
        return f"wrong type ({type_name(value)}); allowed: {allowed}"
    if meta["choices"] and value not in meta["choices"]:
        return f"not allowed; allowed: {' | '.join(meta['choices'])}"
    if meta["pattern"] and isinstance(value, list | tuple):
        for item in value:
            if not re.fullmatch(meta["pattern"], item):
                return (f"{item!r} not allowed; allowed: items each a whole string matching "
                        f"{meta['pattern']}")
    elif meta["pattern"] and not re.fullmatch(meta["pattern"], value):
        return f"not allowed; allowed: a whole string matching {meta['pattern']}"
    lo, hi = meta["lo"], meta["hi"]
    if isinstance(value, int | float) and not isinstance(value, bool):
        if expected is float and isinstance(value, int) and abs(value) >= 2 ** 1024:
            value = math.inf  # no float holds it
        if isinstance(value, float) and not math.isfinite(value):  # TOML allows nan, inf
            return "not a finite number; allowed: " + _range_text(lo, hi, meta["lo_open"])
        too_low = lo is not None and (value <= lo if meta["lo_open"] else value < lo)
        too_high = hi is not None and value > hi
        if too_low or too_high:
            return "out of range; allowed: " + _range_text(lo, hi, meta["lo_open"])
    return None


def _range_text(lo, hi, lo_open) -> str:
    if lo is not None and hi is not None:
        return f"{lo} {'<' if lo_open else '<='} value <= {hi}"
    if lo is not None:
        return f"value {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"value <= {hi}"
    return "any finite number"


def _check_across(config: Config, source: str) -> None:
    if config.strategy.sma_fast >= config.strategy.sma_slow:
        raise ConfigError(f"{source}: invalid config\n  [strategy] sma_fast = "
                          f"{config.strategy.sma_fast}: must be below sma_slow "
                          f"({config.strategy.sma_slow})")


def check_can_trade(config: Config, *, serving: bool = False) -> None:
    """Before a command that trades (run, job, reconcile): live mode needs the API keys,
    and the files it will write need folders that exist and are writable (the log files
    only when ``serving``: only the service writes them). Read commands need neither: an
    operator's shell on a live server has no keys."""
    source = config.source
    if config.bot.mode == "live" and not config.secrets.has_keys:
        raise ConfigError(f"{source}: invalid config\n  [bot] mode = 'live' needs API keys in "
                          f"the environment variables {SECRET_ENV['api_key']} and "
                          f"{SECRET_ENV['api_secret']}")
    if config.bot.mode == "backtest":
        raise ConfigError(f"{source}: invalid config\n  [bot] mode = 'backtest' is not served "
                          "by `run`, `job` or `reconcile`; use `cli.py backtest`")
    writes = [("[bot] log_dir", config.bot.log_dir, False)] if serving and config.bot.log_dir \
        else []
    state = sim_state_path(config)
    if state is not None:
        writes.append(("[sim] state_path" if config.bot.mode == "sim" else
                       "paper mode's state file (beside [sim] state_path)", str(state), True))
    for where, value, is_file in writes:
        problem = _unwritable(Path(value), is_file)
        if problem:
            raise ConfigError(f"{source}: invalid config\n  {where} = {value!r}: {problem}")
    problem = _market_problem(config) or (
        crash_faults_problem(config, "paper mode") if config.bot.mode == "paper" else None)
    if problem:
        raise ConfigError(f"{source}: invalid config\n  {problem}")
    from core.strategies import load_strategy  # here: it pulls in pandas, read commands not

    try:
        load_strategy(config.strategy)
    except ValueError as exc:
        raise ConfigError(f"{source}: invalid config\n  [strategy] name = "
                          f"{config.strategy.name!r}: {exc}") from None


def crash_faults_problem(config: Config, where: str) -> str | None:
    """The test-only crash faults are for sim-mode services run as subprocesses by the
    crash tests; anywhere else they SIGKILL the process and leave its work half-done."""
    from core.sim_faults import CRASH_FAULTS

    on = [f for f in CRASH_FAULTS if getattr(config.faults, f)]
    if not on:
        return None
    return (f"[faults] {', '.join(on)}: TEST ONLY faults that SIGKILL the process; "
            f"{where} refuses them (remove them)")


def sim_state_path(config: Config) -> Path | None:
    """The simulated account's state file in ``config.bot.mode`` (None: no simulated
    account). Paper mode keeps its own beside ``[sim] state_path``: a sim-mode file holds
    a synthetic market, not the live one."""
    state = Path(config.sim.state_path)
    if config.bot.mode == "paper":  # no name ("."): left as it is, refused as a folder
        return state.with_name(f"paper_{state.name}") if state.name else state
    return state if config.bot.mode == "sim" else None


def _market_problem(config: Config) -> str | None:
    """What keeps sim mode's market from being built (or paper mode's from being the one
    the config names), or None."""
    sim = config.sim
    if config.bot.mode == "paper" and sim.source == "csv":
        # It would be ignored: a paper account trading the live market while its owner
        # believes it replays their candles.
        return ("[sim] source = 'csv' replays recorded candles in [bot] mode = 'sim'; paper "
                "mode trades on the exchange's live market (remove it, or use mode = 'sim')")
    if config.bot.mode != "sim":
        return None
    if sim.source == "live":
        return ("[sim] source = 'live': live data run on the wall clock, which [bot] mode = "
                "'paper' does (sim mode's clock is accelerated)")
    if sim.source == "csv" and not sim.data_dir:
        return "[sim] source = 'csv' needs [sim] data_dir"
    if sim.source == "csv" and not Path(sim.data_dir).is_dir():
        return f"[sim] data_dir = {sim.data_dir!r}: no such folder of CSV candles"
    if sim.source == "csv":
        from core.sim_market import CSV_NAME

        tf = config.strategy.timeframe
        try:
            names = [m for p in Path(sim.data_dir).iterdir() if (m := CSV_NAME.match(p.name))]
        except OSError as exc:
            return f"[sim] data_dir = {sim.data_dir!r}: cannot be read ({exc.strerror or exc})"
        if not any(m.group(3) == tf for m in names):
            return (f"[sim] data_dir = {sim.data_dir!r}: no BASE_QUOTE-{tf}.csv files for "
                    f"[strategy] timeframe = {tf!r}")
    return None


def _unwritable(path: Path, is_file: bool) -> str | None:
    """Why the bot could not write ``path`` (a file, or a folder it creates), or None."""
    try:
        return _unwritable_because(path, is_file)
    except OSError as exc:  # a name too long, a folder it may not look into
        return f"cannot be used ({exc.strerror or exc})"


def _unwritable_because(path: Path, is_file: bool) -> str | None:
    if is_file:
        if path.is_dir():
            return "is a folder, not a file"
        folder = path.parent
    else:
        folder = path
        while not folder.exists() and folder != folder.parent:
            if folder.is_symlink():
                return f"{folder} is a symbolic link to nothing"
            folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        return f"folder {folder.absolute()} does not exist or is not writable"
    return None


def type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


def to_mapping(config: Config) -> dict[str, dict[str, Any]]:
    """The effective config as plain data (no secrets), in file order."""
    out = {}
    for name in SECTIONS:
        section = getattr(config, name)
        out[name] = {f.name: (list(v) if isinstance(v := getattr(section, f.name), tuple) else v)
                     for f in fields(section)}
    return out


def describe() -> list[tuple[str, str, Any, str]]:
    """(section, key, default, doc) for every parameter: the reference table."""
    rows = []
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            default = f.default if f.default is not MISSING else list(f.default_factory())
            rows.append((name, f.name, default, f.metadata["doc"]))
    return rows


__all__ = ["Config", "ConfigError", "Secrets", "load", "from_mapping", "to_mapping", "describe",
           "load_secrets", "check_can_trade", "sim_state_path", "SECRET_ENV", "replace"]
