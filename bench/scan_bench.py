"""Benchmark of the scan job (jobs/scan.py) on the simulated exchange in memory.

Prints, as the median of several runs:

* the scan's overhead without exchange latency, for 8 and for 200 active coins: a scan
  at a candle close (new candles for every coin: indicators, decisions, records) and a
  quiet scan between closes (fetch, nothing new). It includes the simulated venue's own
  work (answers built and parsed by ccxt, as from the real exchange), so it is an upper
  bound of the bot's part. Targets: 8 coins <= 50 ms, 200 coins <= 1 s.
* a scan of 8 coins with 200 ms simulated latency on every exchange call (``[sim]
  latency_ms``): candles are fetched concurrently over one client per coin, so the
  scan costs a few round trips, not one per coin. Target: well under 1 s.

The ledger is a real SQLite file in a temporary folder (WAL, synchronous=FULL). The
first scan (it generates the synthetic market) is not measured. Entries are halted
(a manual halt): every scan decides for every coin, records the decisions and sends no
orders, so the figures are the scan's and not the order round trips'.

    .venv/bin/python bench/scan_bench.py [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from core import runtime
from core.clock import DAY_MS, VirtualClock
from core.config import Config
from core.sim_exchange import SimExchange
from core.venues import quiet_open_orders, sim_data_venues
from jobs import scan
from jobs.runner import run_job
from ledger import Fact

T0 = 1_767_268_800_000  # 2026-01-01T12:00:00Z, a candle boundary
TF = 300_000
SCAN_S = 10


def make(folder: Path, coins: int, latency_ms: float = 0.0):
    cfg = Config().with_values(sim={"symbols": coins, "latency_ms": latency_ms},
                               rotation={"top_n": coins})
    clock = VirtualClock(T0 + 1_000)
    venue = SimExchange.from_config(cfg, clock, origin_ms=T0 - 3 * DAY_MS)
    quiet_open_orders(venue)
    rt = runtime.build(cfg, folder / f"bench_{coins}_{int(latency_ms)}.db", clock=clock,
                       venue=venue, data_venues=sim_data_venues(cfg, venue))
    rt.ledger.append([
        Fact("rotation", clock.now_ms(), reason="bench", data={"coins": venue.symbols,
                                                               "scheduled_ms": None}),
        Fact("halt", clock.now_ms(), reason="bench: decide, send nothing",
             data={"kind": "manual", "detail": "bench"})])
    return rt, clock


def timed_scan(rt) -> tuple[float, dict]:
    t0 = time.perf_counter()
    record = run_job(rt, "scan", scan.run)
    ms = (time.perf_counter() - t0) * 1000
    if record["outcome"] != "ok":
        raise RuntimeError(f"scan {record['outcome']}: {record}")
    return ms, record["summary"]


def bench(coins: int, runs: int, latency_ms: float = 0.0) -> dict[str, float]:
    """Median ms of a scan at a candle close and of a quiet scan, over ``runs`` candles."""
    with tempfile.TemporaryDirectory() as tmp:
        rt, clock = make(Path(tmp), coins, latency_ms)
        try:
            timed_scan(rt)  # warm-up: market generation, markets, leverage, clock offset
            close, quiet = [], []
            for k in range(1, runs + 1):
                clock.set(T0 + k * TF + 1_000)  # just after a candle close
                ms, summary = timed_scan(rt)
                if summary.get("new_candles") != coins:
                    raise RuntimeError(f"expected new candles for {coins} coins: {summary}")
                close.append(ms)
                clock.advance(SCAN_S * 1000)  # the next scan, 10 s later: nothing new
                ms, summary = timed_scan(rt)
                quiet.append(ms)
        finally:
            rt.close()
    return {"close": statistics.median(close), "close_max": max(close),
            "quiet": statistics.median(quiet)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="candles measured per case")
    args = parser.parse_args()
    rows = [
        ("8 coins, no latency", bench(8, args.runs), 50),
        ("200 coins, no latency", bench(200, max(3, args.runs // 3)), 1000),
        ("8 coins, 200 ms latency", bench(8, max(3, args.runs // 3), 200.0), 1000),
    ]
    print(f"{'case':<26} {'scan at close (median)':>23} {'max':>9} {'quiet scan':>11} "
          f"{'target':>8}")
    for name, r, target in rows:
        ok = "ok" if r["close"] <= target else "OVER"
        print(f"{name:<26} {r['close']:>20.1f} ms {r['close_max']:>6.1f} ms "
              f"{r['quiet']:>8.1f} ms {target:>5} ms {ok}")


if __name__ == "__main__":
    main()
