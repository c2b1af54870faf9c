"""A test-only strategy that wants a position on nearly every candle, so a short run of
the real service sends many orders (crash-recovery and soak tests name this file in
``[strategy] module``). Never trade with it."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import pandas as pd

from core.strategies import Strategy


class Churn(Strategy):
    """Long after an up candle, short after a down candle."""

    name = "churn"
    summary = "test only: follows the last candle's direction"
    defaults = MappingProxyType({"allow_short": True})

    @property
    def warmup(self) -> int:
        return 2

    def indicators(self, df: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"move": df["close"] - df["open"]}, index=df.index)

    def rule(self, df: pd.DataFrame, ind: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        move = ind["move"].to_numpy(float)
        short = bool(self.params["allow_short"])
        side = np.select([move > 0, (move < 0) & short], [1, -1], default=0)
        reason = np.select([move > 0, move < 0], ["up", "down"], default="flat")
        return side, reason


STRATEGIES = [Churn]
