"""Strategies: the entry decision, written once, vectorised.

A strategy is a small class (see :class:`Strategy`):

* ``name`` - how ``[strategy] name`` in the config selects it;
* ``defaults`` - its parameters and their defaults. ``from_config`` takes each value
  from ``[strategy]`` when the section has a key of that name;
* ``warmup`` - closed candles needed before the first decision;
* ``indicators(df)`` - a DataFrame of indicator columns, aligned with the candles;
* ``rule(df, ind)`` - the decision for every row, vectorised: ``(side, reason)``
  arrays, side +1 long / -1 short / 0 none, reason a short code;
* ``exit_rules(exits)`` - the exit thresholds for its positions (default: ``[exits]``).

Written once, used twice: :meth:`Strategy.signals` runs the rule over a whole frame
(the backtester decides on the close of ``t`` and acts at the open of ``t+1``), and
:meth:`Strategy.decide` is simply the last row of ``signals`` for the live scan,
which passes closed candles only. Rows whose candle is invalid get reason
``bad_candle``; rows with any NaN indicator (not enough history) get ``warmup``;
both decide "none".

Built in: ``momentum`` and ``sma_cross``. A user module named in ``[strategy] module``
(an importable name, or a path to a ``.py`` file) is imported and registers the
strategies it defines: those listed in its ``STRATEGIES``, or else every Strategy
subclass defined in it with a ``name``. See ``examples/my_strategy.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd

from core import indicators as ta
from core.exits import ExitRules

EntrySide = Literal["long", "short", "none"]
SIDE_OF: Mapping[int, EntrySide] = MappingProxyType({1: "long", -1: "short", 0: "none"})


class StrategyError(ValueError):
    """A strategy that cannot be loaded or built (unknown name, bad module, bad params)."""


@dataclass(frozen=True)
class Signal:
    """The entry decision on one closed candle, ready to record as a ``signal`` fact."""

    strategy: str
    side: EntrySide
    reason: str  # machine-readable code, e.g. "long_momentum", "body_too_small", "warmup"
    detail: str  # for people
    ts: int | None  # open time of the candle decided on
    values: Mapping[str, float | None] = field(default_factory=dict)  # indicators used
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def direction(self) -> int:
        return {"long": 1, "short": -1}.get(self.side, 0)

    def to_record(self) -> dict[str, Any]:
        """Plain JSON-ready data for the ledger."""
        return {"strategy": self.strategy, "side": self.side, "reason": self.reason,
                "detail": self.detail, "ts": self.ts, "values": dict(self.values),
                "params": dict(self.params)}


class Strategy:
    """Base class of every strategy. Subclasses set ``name``, ``defaults`` and implement
    ``warmup``, ``indicators`` and ``rule``; everything else is shared."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({})

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise StrategyError(f"strategy {self.name!r}: unknown parameter(s) "
                                f"{', '.join(sorted(unknown))}; known: {', '.join(self.defaults)}")
        self.params: Mapping[str, Any] = MappingProxyType({**self.defaults, **params})
        self.validate()

    @classmethod
    def from_config(cls, section: Any) -> Strategy:
        """Built from ``config.strategy``: every parameter the section has a key for."""
        return cls(**{k: getattr(section, k) for k in cls.defaults if hasattr(section, k)})

    def validate(self) -> None:
        """Raise StrategyError for parameters that make no sense (override as needed)."""

    @property
    def warmup(self) -> int:
        """Closed candles needed before the first decision can be other than 'warmup'."""
        raise NotImplementedError

    def indicators(self, df: pd.DataFrame) -> pd.DataFrame:
        """Indicator columns aligned with ``df`` (NaN where not computable yet)."""
        raise NotImplementedError

    def rule(self, df: pd.DataFrame, ind: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised entry rule: (side int array of +1/-1/0, reason str array)."""
        raise NotImplementedError

    def exit_rules(self, exits: Any) -> ExitRules:
        """Exit thresholds for this strategy's positions; default: ``[exits]``."""
        return ExitRules.from_config(exits)

    # -- shared, not overridden ------------------------------------------------------

    def signals(self, df: pd.DataFrame) -> pd.DataFrame:
        """Decision for every row: columns ``signal`` (int8 +1/-1/0), ``reason`` and the
        indicators, index as ``df``. Row ``t`` uses candles ``<= t`` only."""
        ind = self.indicators(df)
        side, reason = self.rule(df, ind)
        self._check_shapes(df, ind, side, reason)
        # A bad candle anywhere among the rows a decision rests on (its warm-up) taints it:
        # a negative volume in the 20 before would otherwise fake a volume surge.
        bad = ta.window_any(ta.bad_candles(df), max(int(self.warmup), 1))
        warm = ind.isna().to_numpy().any(axis=1) if ind.shape[1] else np.zeros(len(df), bool)
        reason = np.where(bad, "bad_candle", np.where(warm, "warmup", reason))
        side = self._decided_sides(side, bad | warm)
        out = ind.copy()
        out.insert(0, "signal", side)
        out.insert(1, "reason", reason)
        return out

    def _check_shapes(self, df: pd.DataFrame, ind: pd.DataFrame, side: Any,
                      reason: Any) -> None:
        """One side and one reason per candle, one indicator row per candle (a wrong
        length failed deep in numpy, naming nothing), or StrategyError."""
        n, where = len(df), f"strategy {self.name!r}"
        if len(ind) != n:
            raise StrategyError(f"{where}: {len(ind)} indicator rows for {n} candles")
        for what, got in (("sides", np.asarray(side)),
                          ("reasons", np.asarray(reason, dtype=object))):
            if got.shape != (n,):
                got_text = f"{len(got)} {what}" if got.ndim == 1 else \
                    f"{what} of shape {got.shape}"
                raise StrategyError(f"{where}: {got_text} for {n} candles")

    def _decided_sides(self, side: Any, unused: np.ndarray) -> np.ndarray:
        """The sides as int8, 0 on the ``unused`` rows (warm-up, bad candles: a rule may
        answer NaN there). Elsewhere +1, -1 or 0, or StrategyError: a NaN or 1.7 was cast
        to 0 or 1 unsaid (a NaN ran a backtest without a trade)."""
        raw = np.asarray(side)
        try:
            values = np.where(unused, 0.0, raw.astype(float))
        except (TypeError, ValueError):
            raise StrategyError(f"strategy {self.name!r}: sides must be numbers (+1, -1 or "
                                f"0), got {raw.dtype}") from None
        odd = ~np.isin(values, (-1.0, 0.0, 1.0))
        if odd.any():
            at = int(np.flatnonzero(odd)[0])
            given = raw[at].item() if isinstance(raw[at], np.generic) else raw[at]
            raise StrategyError(f"strategy {self.name!r}: side {given!r} at candle {at}; "
                                "sides are +1 (long), -1 (short) or 0")
        return values.astype(np.int8)

    def decide(self, df: pd.DataFrame) -> Signal:
        """The decision on the last row of ``df`` (the last closed candle)."""
        missing = sorted(set(ta.COLUMNS) - set(df.columns)) if df is not None else []
        if df is None or len(df) == 0 or missing:
            why = f"candle frame lacks {missing}" if missing else "no closed candles"
            return Signal(self.name, "none", "no_data", why, None, {}, dict(self.params))
        row = self.signals(df).iloc[-1]
        values = {k: _num(row[k]) for k in row.index if k not in ("signal", "reason")}
        side = SIDE_OF[int(row["signal"])]
        reason = str(row["reason"])
        ts = df["ts"].iloc[-1]
        return Signal(self.name, side, reason, self.explain(reason, values),
                      int(ts) if _num(ts) is not None else None, values, dict(self.params))

    def explain(self, reason: str, values: Mapping[str, float | None]) -> str:
        """Human detail for a decision (override for nicer wording)."""
        shown = ", ".join(f"{k}={'n/a' if v is None else f'{v:.4g}'}" for k, v in values.items())
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{reason} ({shown}; {params})"


def at_least(values: np.ndarray, threshold: float) -> np.ndarray:
    """``values >= threshold``, counting a value float arithmetic put a hair under it as
    met: a body of exactly 0.7 % (open 1e-05, close 1.007e-05) computes as 0.69999...93."""
    return values >= threshold - 1e-9 * abs(threshold)


def _num(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class Momentum(Strategy):
    """The original design: a big-bodied candle on high volume in a trending market.

    Long: body >= min_body_pct, close > open, volume ratio >= long_volume_ratio,
    choppiness < choppiness_max. Short: the same with close < open and
    short_volume_ratio (and allow_short).
    """

    name = "momentum"
    summary = "big candle body + volume surge + low choppiness"
    defaults = MappingProxyType({"min_body_pct": 0.7, "long_volume_ratio": 1.8,
                                 "short_volume_ratio": 1.5, "choppiness_max": 50.0,
                                 "allow_short": True})

    @property
    def warmup(self) -> int:
        return max(ta.VOLUME_LOOKBACK, ta.CHOP_PERIOD) + 1

    def indicators(self, df: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"body_pct": ta.body_pct(df), "volume_ratio": ta.volume_ratio(df),
                             "chop": ta.choppiness(df)}, index=df.index)

    def rule(self, df: pd.DataFrame, ind: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        o, c = df["open"].to_numpy(float), df["close"].to_numpy(float)
        body, vr, chop = (ind[k].to_numpy() for k in ("body_pct", "volume_ratio", "chop"))
        up, down = c > o, c < o
        long_ok = up & at_least(vr, p["long_volume_ratio"])
        short_ok = down & at_least(vr, p["short_volume_ratio"])
        conditions = [
            ~at_least(body, p["min_body_pct"]),
            chop >= p["choppiness_max"],
            ~(up | down),
            long_ok,
            short_ok & bool(p["allow_short"]),
            short_ok,
        ]
        reasons = ["body_too_small", "choppy", "no_direction", "long_momentum",
                   "short_momentum", "short_disabled"]
        side = np.select(conditions, [0, 0, 0, 1, -1, 0], default=0)
        reason = np.select(conditions, reasons, default="volume_too_low")
        return side, reason


class SmaCross(Strategy):
    """Long when the fast SMA of closes crosses above the slow one, short when below."""

    name = "sma_cross"
    summary = "fast/slow simple moving average crossover on closes"
    defaults = MappingProxyType({"sma_fast": 50, "sma_slow": 200, "allow_short": True})

    def validate(self) -> None:
        f, s = self.params["sma_fast"], self.params["sma_slow"]
        if not (isinstance(f, int) and isinstance(s, int) and 1 <= f < s):
            raise StrategyError(f"sma_cross needs integers 1 <= sma_fast < sma_slow, got {f}, {s}")

    @property
    def warmup(self) -> int:
        return self.params["sma_slow"] + 1  # the crossing compares with the previous candle

    def indicators(self, df: pd.DataFrame) -> pd.DataFrame:
        fast = ta.sma(df["close"], self.params["sma_fast"])
        slow = ta.sma(df["close"], self.params["sma_slow"])
        spread = fast - slow
        return pd.DataFrame({"sma_fast": fast, "sma_slow": slow,
                             "prev_spread": spread.shift(1)}, index=df.index)

    def rule(self, df: pd.DataFrame, ind: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        spread = (ind["sma_fast"] - ind["sma_slow"]).to_numpy()
        prev = ind["prev_spread"].to_numpy()
        up = (spread > 0) & (prev <= 0)
        down = (spread < 0) & (prev >= 0)
        allow_short = bool(self.params["allow_short"])
        side = np.select([up, down & allow_short], [1, -1], default=0)
        reason = np.select([up, down & allow_short, down],
                           ["sma_cross_up", "sma_cross_down", "short_disabled"], default="no_cross")
        return side, reason


BUILTIN: Mapping[str, type[Strategy]] = MappingProxyType({"momentum": Momentum,
                                                          "sma_cross": SmaCross})


def import_module(module: str) -> ModuleType:
    """Import a user module by dotted name, or by path when it ends in ``.py``."""
    if module.endswith(".py"):
        path = Path(module).resolve()
        if not path.is_file():
            raise StrategyError(f"strategy module file {module!r} not found")
        mod_name = f"ledgerbot_user_strategies.{path.stem}"
        cached = sys.modules.get(mod_name)
        if cached is not None and getattr(cached, "__file__", None) == str(path):
            return cached
        spec = importlib.util.spec_from_file_location(mod_name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod  # dataclasses and pickling look modules up here
        try:
            spec.loader.exec_module(mod)
        except Exception as exc:
            del sys.modules[mod_name]
            raise StrategyError(f"strategy module {module!r} failed to import: {exc!r}") from exc
        return mod
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise StrategyError(f"strategy module {module!r} cannot be imported ({exc}); give an "
                            f"importable name (on PYTHONPATH) or a path to a .py file") from exc
    except Exception as exc:  # its own code failed (a syntax error, a raise): as a path's
        raise StrategyError(f"strategy module {module!r} failed to import: {exc!r}") from exc


def user_strategies(module: str) -> dict[str, type[Strategy]]:
    """The strategies a user module registers: its ``STRATEGIES`` or its Strategy subclasses."""
    mod = import_module(module)
    listed = getattr(mod, "STRATEGIES", None)
    if listed is None:
        listed = [v for v in vars(mod).values() if isinstance(v, type)
                  and issubclass(v, Strategy) and v.__module__ == mod.__name__ and v.name]
    found: dict[str, type[Strategy]] = {}
    for cls in listed:
        if not (isinstance(cls, type) and issubclass(cls, Strategy) and cls.name):
            raise StrategyError(f"{module}: {cls!r} is not a Strategy subclass with a name")
        if cls.name in BUILTIN or cls.name in found:
            raise StrategyError(f"{module}: strategy name {cls.name!r} is already taken")
        found[cls.name] = cls
    if not found:
        raise StrategyError(f"{module}: defines no strategy (subclass core.strategies.Strategy "
                            f"and set `name`, or list classes in STRATEGIES)")
    return found


def available(module: str = "") -> dict[str, type[Strategy]]:
    """Every strategy selectable by name: built-ins plus the user module's."""
    return {**BUILTIN, **(user_strategies(module) if module else {})}


def load_strategy(section: Any) -> Strategy:
    """The strategy ``config.strategy`` selects, built with its parameters."""
    choices = available(getattr(section, "module", "") or "")
    cls = choices.get(section.name)
    if cls is None:
        raise StrategyError(f"unknown strategy {section.name!r}; available: "
                            f"{', '.join(sorted(choices))}")
    return cls.from_config(section)


__all__ = ["Signal", "Strategy", "StrategyError", "Momentum", "SmaCross", "BUILTIN",
           "available", "load_strategy", "user_strategies", "import_module"]
