"""Benchmark of the simulated exchange (in memory, virtual clock).

Prints simulated orders per second, candle steps per second (the venue matching every
working stop on each new closed candle) and the cost of generating the synthetic market
a large backtest needs.

    .venv/bin/python bench/sim_exchange_bench.py [--orders 5000] [--steps 20000]
"""

from __future__ import annotations

import argparse
import time

from core.clock import DAY_MS, VirtualClock
from core.sim_exchange import SimExchange
from core.sim_market import SyntheticMarket

T0 = 1_700_006_400_000
TF = 300_000


def venue(symbols: int) -> tuple[SimExchange, VirtualClock]:
    clock = VirtualClock(T0)
    market = SyntheticMarket(42, symbols, "5m", origin_ms=T0 - 3 * DAY_MS)
    return SimExchange(market, clock, start_balance=1e12), clock


def amounts(ex: SimExchange) -> dict[str, str]:
    return {s: ex.amount_to_precision(s, 200 / ex.fetch_ticker(s)["last"]) for s in ex.symbols}


def bench_orders(n: int) -> float:
    """Market orders, alternating buy and sell over 10 symbols."""
    ex, _ = venue(10)
    qty, symbols = amounts(ex), ex.symbols
    start = time.monotonic()
    for i in range(n):
        s = symbols[i % 10]
        ex.create_order(s, "market", "buy" if (i // 10) % 2 == 0 else "sell", qty[s])
    return n / (time.monotonic() - start)


def bench_stop_round_trips(n: int) -> float:
    """A stop placed and cancelled: two venue calls per round trip."""
    ex, _ = venue(10)
    qty = amounts(ex)
    for s in ex.symbols:
        ex.create_order(s, "market", "buy", qty[s])
    last = {s: ex.fetch_ticker(s)["last"] for s in ex.symbols}
    start = time.monotonic()
    for i in range(n):
        s = ex.symbols[i % 10]
        o = ex.create_order(s, "market", "sell", qty[s],
                            params={"triggerPrice": last[s] * 0.5, "reduceOnly": True})
        ex.cancel_order(o["id"], s, params={"trigger": True})
    return 2 * n / (time.monotonic() - start)


def bench_steps(symbols: int, steps: int) -> float:
    """One closed candle per step, one working stop per symbol (far away: never fires)."""
    ex, clock = venue(symbols)
    qty = amounts(ex)
    for s in ex.symbols:
        ex.create_order(s, "market", "buy", qty[s])
        ex.create_order(s, "market", "sell", qty[s], params={
            "triggerPrice": ex.fetch_ticker(s)["last"] * 0.01, "reduceOnly": True})
    ex.source.candles(ex.symbols[0], T0, T0 + (steps + 1) * TF)  # generate outside the timing
    for s in ex.symbols:
        ex.source.series(s, T0 + (steps + 1) * TF)
    start = time.monotonic()
    for _ in range(steps):
        clock.advance(TF)
        ex.step_to(clock.now_ms())
    return steps / (time.monotonic() - start)


def bench_generation(symbols: int, days: int) -> tuple[float, float]:
    market = SyntheticMarket(1, symbols, "5m", origin_ms=T0)
    start = time.monotonic()
    size = 0
    for s in market.symbols:
        c = market.series(s, T0 + days * DAY_MS)
        size += sum(a.nbytes for a in (c.ts, c.o, c.h, c.low, c.c, c.v))
    return time.monotonic() - start, size / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--gen-symbols", type=int, default=100)
    ap.add_argument("--gen-days", type=int, default=365)
    a = ap.parse_args()
    print(f"in-memory market orders:        {bench_orders(a.orders):>10,.0f} orders/s")
    print(f"in-memory stop place+cancel:    {bench_stop_round_trips(a.orders // 2):>10,.0f} "
          "calls/s")
    for n in (10, 100):
        print(f"candle steps, {n:>3} symbols+stops: {bench_steps(n, a.steps // (n // 10)):>10,.0f}"
              " steps/s")
    secs, mb = bench_generation(a.gen_symbols, a.gen_days)
    print(f"synthetic market {a.gen_symbols} symbols x {a.gen_days} days of 5m candles: "
          f"{secs:.1f} s, {mb:,.0f} MB")


if __name__ == "__main__":
    main()
