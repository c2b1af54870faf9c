"""Fault injection for the simulated exchange: seeded probabilities or an exact script.

Each venue call asks ``draw(method)`` for the fault to inject (or None). A scripted fault
for that method (or for ``"*"``, any method it applies to) wins; otherwise each fault
kind of ``[faults]`` that applies to the method fires with its probability, from one
seeded random stream, so a run is repeatable.

Fault names (what they do is implemented by the venue, see ``core.sim_exchange``):

=========================  ==================================================================
network_error              connection fails before the request reaches the exchange
timeout                    the request times out before reaching the book (nothing happens)
timeout_after_accept       write accepted and done, the caller sees a timeout (ccxt
                           RequestTimeout); reads just time out
server_error               HTTP 503 before anything happens (ExchangeNotAvailable)
server_error_after_accept  write done, then HTTP 503
rate_limit                 HTTP 429 (ccxt raises DDoSProtection for Binance's 429)
clock_skew                 -1021 timestamp outside recvWindow (InvalidNonce), private calls
insufficient_funds         -2019 margin is insufficient, spuriously (create_order)
reject                     -4131 order rejected by the PERCENT_PRICE filter (create_order)
forming_candle             the forming candle carries its final values, as if closed
duplicate_candle           a closed candle is repeated
missing_candle             a closed candle is left out
out_of_order_candles       two closed candles swap places
nan_price / none_price /   one price of one candle (or one ticker's last price) is NaN,
zero_price                 None or 0
high_below_low             one candle's high and low are swapped
crash_before_accept        TEST ONLY: the venue, running inside the bot process, SIGKILLs that
                           process as create_order starts (the bot's intent is committed, the
                           order never reaches the book)
crash_after_accept         TEST ONLY: SIGKILL right after the order was accepted and persisted
                           (the exchange has it, the bot never records the acknowledgement)
=========================  ==================================================================

The two crash faults exist for crash-recovery tests that run the bot as a subprocess
(``[faults] crash_before_accept`` / ``crash_after_accept``); never script them in-process.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Iterable

READS = {"load_markets", "fetch_time", "fetch_ohlcv", "fetch_ticker", "fetch_tickers",
         "fetch_balance", "fetch_positions", "fetch_order", "fetch_open_orders",
         "fetch_my_trades"}
WRITES = {"create_order", "cancel_order", "set_leverage", "set_margin_mode"}
METHODS = READS | WRITES
PUBLIC = {"load_markets", "fetch_time", "fetch_ohlcv", "fetch_ticker", "fetch_tickers"}
PRIVATE = METHODS - PUBLIC
CANDLE_FAULTS = ("duplicate_candle", "missing_candle", "out_of_order_candles", "nan_price",
                 "none_price", "zero_price", "high_below_low")
PRICE_FAULTS = ("nan_price", "none_price", "zero_price")
CRASH_FAULTS = ("crash_before_accept", "crash_after_accept")

GENERIC = {"network_error", "timeout", "server_error", "rate_limit"}
APPLIES: dict[str, set[str]] = {
    **{f: METHODS for f in GENERIC},
    "timeout_after_accept": METHODS,
    "server_error_after_accept": WRITES,
    "clock_skew": PRIVATE,
    "insufficient_funds": {"create_order"},
    "reject": {"create_order"},
    **{f: {"create_order"} for f in CRASH_FAULTS},
    "forming_candle": {"fetch_ohlcv"},
    **{f: {"fetch_ohlcv", "fetch_ticker", "fetch_tickers"} if f in PRICE_FAULTS
       else {"fetch_ohlcv"} for f in CANDLE_FAULTS},
}
FAULTS = frozenset(APPLIES)


class FaultInjector:
    """Decides, per call, which fault the venue injects. Keeps a log of what it injected."""

    def __init__(self, config=None, seed: int = 0) -> None:
        self.config = config  # a core.config.FaultsSection, or None for no random faults
        self.rng = random.Random(seed)
        self._script: list[tuple[str, str]] = []
        self.log: deque[tuple[str, str]] = deque(maxlen=1000)
        self.counts: Counter[str] = Counter()

    def script(self, items: Iterable[tuple[str, str | None] | str]) -> None:
        """Queue exact faults: ("create_order", "timeout_after_accept"), or a bare fault name
        (same as ("*", name)): the next call of that method it applies to gets it.
        ("cancel_order", None) lets the next call through, so the fault after it hits
        the call after that."""
        for item in items:
            method, fault = ("*", item) if isinstance(item, str) else item
            if fault is None:
                if method not in METHODS:
                    raise ValueError(f"unknown method {method!r} to let through")
                self._script.append((method, None))
                continue
            if fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}; known: {', '.join(sorted(FAULTS))}")
            if method != "*" and method not in APPLIES[fault]:
                raise ValueError(f"fault {fault!r} does not apply to {method!r}; it applies to "
                                 f"{', '.join(sorted(APPLIES[fault]))}")
            self._script.append((method, fault))

    @property
    def pending(self) -> list[tuple[str, str]]:
        return list(self._script)

    def clear(self) -> None:
        self._script.clear()

    def draw(self, method: str) -> str | None:
        found, fault = self._scripted(method)
        if not found:
            fault = self._random(method)
        if fault:
            self.log.append((method, fault))
            self.counts[fault] += 1
        return fault

    def _scripted(self, method: str) -> tuple[bool, str | None]:
        """(found, fault): a scripted pass is found, with no fault (no random one either)."""
        for k, (m, fault) in enumerate(self._script):
            if m == method or (m == "*" and method in APPLIES[fault]):
                del self._script[k]
                return True, fault
        return False, None

    def _random(self, method: str) -> str | None:
        c = self.config
        if c is None:
            return None
        write = method in WRITES
        draws = [
            (c.network_error, "network_error"),
            (c.rate_limit, "rate_limit"),
            (c.server_error, "server_error"),
            (c.timeout_after_accept, "timeout_after_accept" if write else "timeout"),
        ]
        if method in PRIVATE:
            draws.append((c.clock_skew, "clock_skew"))
        if method == "create_order":
            draws += [(getattr(c, f, 0.0), f) for f in CRASH_FAULTS]
            draws += [(c.insufficient_funds, "insufficient_funds"), (c.reject, "reject")]
        if method == "fetch_ohlcv":
            draws += [(c.forming_candle, "forming_candle"), (c.bad_candles, "bad_candles")]
        if method in ("fetch_ticker", "fetch_tickers"):
            draws.append((c.bad_candles, "bad_prices"))
        for p, fault in draws:
            if p > 0 and self.rng.random() < p:
                if fault == "server_error" and write and self.rng.random() < 0.5:
                    return "server_error_after_accept"  # a 5xx leaves the outcome unknown
                if fault == "bad_candles":
                    return self.rng.choice(CANDLE_FAULTS)
                if fault == "bad_prices":
                    return self.rng.choice(PRICE_FAULTS)
                return fault
        return None
