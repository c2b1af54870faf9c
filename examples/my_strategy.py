"""An example user strategy: a Donchian breakout confirmed by volume.

Use it by naming this module and the strategy in ``bot.toml``::

    [strategy]
    module = "examples/my_strategy.py"   # a path to a .py file, or an importable name
    name = "breakout"                    # the class's `name`

(``module = "my_strategy"`` works too when this file's folder is on ``PYTHONPATH``.)

How a strategy works (see ``core/strategies.py``):

* Subclass ``Strategy``; set ``name`` (what the config selects) and ``defaults`` (the
  parameters). A parameter whose name is also a key of ``[strategy]`` (for example
  ``allow_short``) takes its value from the config; the others keep these defaults
  (or pass them to the constructor: ``Breakout(lookback=55)``).
* ``indicators(df)`` returns indicator columns for every candle. Use only candles up to
  each row (``core.indicators`` has causal helpers). NaN means "not enough history":
  such rows decide "none" with reason ``warmup`` automatically.
* ``rule(df, ind)`` decides every row at once: an int array (+1 long, -1 short, 0 none)
  and a str array of reason codes. The bot calls it through ``signals(df)`` (the
  backtester: whole history) and ``decide(df)`` (the live scan: last closed candle),
  so the rule is written once.
* ``warmup`` is how many closed candles the first decision needs; keep
  ``[strategy] candles`` at least this large.
* ``exit_rules(exits)`` may change the exit thresholds for this strategy's positions.

Every module that defines Strategy subclasses with a ``name`` registers them; listing
them in ``STRATEGIES`` makes the choice explicit (and lets helper classes stay out).
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import numpy as np
import pandas as pd

from core import indicators as ta
from core.exits import ExitRules
from core.strategies import Strategy


class Breakout(Strategy):
    """Long when the close breaks above the highest high of the previous ``lookback``
    candles on a volume ratio of at least ``min_volume_ratio``; short on a break below
    the lowest low (if ``allow_short``)."""

    name = "breakout"
    summary = "Donchian channel breakout with volume confirmation"
    defaults = MappingProxyType({"lookback": 20, "min_volume_ratio": 1.5, "allow_short": True})

    @property
    def warmup(self) -> int:
        return max(self.params["lookback"], ta.VOLUME_LOOKBACK) + 1

    def indicators(self, df: pd.DataFrame) -> pd.DataFrame:
        n = self.params["lookback"]
        # The channel of the *previous* n candles: shift by one so the current candle
        # is compared with the past only.
        upper = pd.Series(ta.window_max(df["high"], n), index=df.index).shift(1)
        lower = pd.Series(ta.window_min(df["low"], n), index=df.index).shift(1)
        return pd.DataFrame({"upper": upper, "lower": lower,
                             "volume_ratio": ta.volume_ratio(df)}, index=df.index)

    def rule(self, df: pd.DataFrame, ind: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        close = df["close"].to_numpy(float)
        loud = ind["volume_ratio"].to_numpy() >= self.params["min_volume_ratio"]
        up = close > ind["upper"].to_numpy()
        down = close < ind["lower"].to_numpy()
        short_ok = down & loud & bool(self.params["allow_short"])
        side = np.select([up & loud, short_ok], [1, -1], default=0)
        reason = np.select([up & loud, short_ok, down & loud, up | down],
                           ["breakout_up", "breakout_down", "short_disabled", "volume_too_low"],
                           default="inside_channel")
        return side, reason

    def exit_rules(self, exits) -> ExitRules:
        # Breakouts need room: let the trail sit twice as far back as configured.
        rules = ExitRules.from_config(exits)
        return replace(rules, trailing_stop_pct=rules.trailing_stop_pct * 2)


STRATEGIES = [Breakout]
