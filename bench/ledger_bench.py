"""Ledger benchmark: durable appends, verify, open-to-ready and full replay.

    .venv/bin/python bench/ledger_bench.py [--rows 1000000] [--runs 5] [--dir DIR]

Every figure is the median of ``--runs`` runs (the machine is shared, so single runs
are noisy). Appends are durable (WAL, synchronous=FULL, one fsync per commit) in
job-sized batches of 20 realistic facts: a scan job's signals and risk decisions,
order intents, acknowledgements and fills, positions opening and closing, stops,
trailing-stop updates, balance snapshots and the job_run row.

Two "limit" figures show what bounds the durable append on this machine: the same
batches' SQLite work alone (rows hashed and bound beforehand: BEGIN IMMEDIATE, the last
hash, the INSERT with its trigger and index entries, the COMMIT and its fsync), and the
fsync floor (durable commits of one tiny row, counted as 20 rows each).

Bench-only path: the large ledger (``--rows``) is built through the normal
``Ledger.append`` (so every row is valid and chained and checkpoints are written as
usual) but with ``PRAGMA synchronous = OFF`` set on the building connection. That only
skips the fsyncs, which a build need not pay; nothing else in the project does this.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.orders import client_order_id  # noqa: E402
from ledger import Fact, Ledger  # noqa: E402
from ledger.chain import GENESIS, link  # noqa: E402
from ledger.store import _insert_many, bind_values  # noqa: E402
from ledger.verify import usable_cpus, workers_for  # noqa: E402

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
SYMBOLS = ("BTC/USDT:USDT", "ETH/USDT:USDT", "SOL/USDT:USDT", "BNB/USDT:USDT",
           "XRP/USDT:USDT", "DOGE/USDT:USDT", "ADA/USDT:USDT", "AVAX/USDT:USDT")
BATCH = 20


def realistic_facts(seed: int = 1) -> Iterator[Fact]:
    """An endless, self-consistent stream of the facts a running bot records."""
    rng = random.Random(seed)
    ts = START_MS
    n = 0
    open_pos: dict[str, dict] = {}
    equity = 10_000.0
    while True:
        n += 1
        ts += 300_000  # a 5-minute scan
        run = f"scan-{n}"
        for symbol in SYMBOLS:
            price = round(rng.uniform(0.1, 90_000), 4)
            pos = open_pos.get(symbol)
            if pos is None:
                side = rng.choice(("none", "none", "none", "long", "short"))
                yield Fact("signal", ts, symbol=symbol, side=side, run_id=run,
                           reason="body_too_small" if side == "none" else "momentum",
                           data={"strategy": "momentum", "candle_ts": ts - 300_000,
                                 "indicators": {"body_pct": round(rng.random(), 4),
                                                "volume_ratio": round(rng.uniform(0, 3), 4),
                                                "chop": round(rng.uniform(20, 80), 2)}})
                if side == "none":
                    continue
                amount = f"{rng.uniform(0.001, 5):.3f}"
                approved = rng.random() < 0.7
                yield Fact("risk_decision", ts, symbol=symbol, side=side, amount=amount,
                           run_id=run, reason="ok" if approved else "max_positions",
                           data={"approved": approved, "checks": ["exposure", "cooldown"]})
                if not approved:
                    continue
                cid = client_order_id("bot1", symbol, "entry", ts)
                order_side = "buy" if side == "long" else "sell"
                yield Fact("order_intent", ts, symbol=symbol, side=order_side, amount=amount,
                           client_order_id=cid, run_id=run,
                           data={"purpose": "entry", "type": "market", "reduce_only": False})
                yield Fact("order_submitted", ts, client_order_id=cid, run_id=run)
                yield Fact("order_update", ts + 40, client_order_id=cid, run_id=run,
                           exchange_order_id=str(rng.getrandbits(40)),
                           data={"state": "filled"})
                fee = f"{float(amount) * price * 0.0004:.6f}"
                yield Fact("fill", ts + 40, symbol=symbol, side=order_side, amount=amount,
                           price=str(price), fee=fee, client_order_id=cid, run_id=run,
                           data={"trade_id": str(rng.getrandbits(40)), "fee_currency": "USDT",
                                 "source": "exchange"})
                pid = cid  # the project names a position after its entry order
                yield Fact("position_opened", ts + 41, symbol=symbol, side=side, amount=amount,
                           price=str(price), fee=fee, position_id=pid, run_id=run)
                stop = f"{price * (0.98 if side == 'long' else 1.02):.4f}"
                stop_cid = client_order_id("bot1", symbol, "stop", ts)
                yield Fact("stop_placed", ts + 60, symbol=symbol, price=stop, position_id=pid,
                           client_order_id=stop_cid, run_id=run, data={"purpose": "stop"})
                open_pos[symbol] = {"pid": pid, "side": side, "amount": amount,
                                    "entry": price, "stop_cid": stop_cid}
            elif rng.random() < 0.15:
                cid = client_order_id("bot1", symbol, "exit", ts)
                order_side = "sell" if pos["side"] == "long" else "buy"
                yield Fact("order_intent", ts, symbol=symbol, side=order_side,
                           amount=pos["amount"], client_order_id=cid, run_id=run,
                           position_id=pos["pid"], data={"purpose": "exit", "reduce_only": True})
                yield Fact("order_update", ts + 35, client_order_id=cid, run_id=run,
                           data={"state": "filled"})
                yield Fact("fill", ts + 35, symbol=symbol, side=order_side, amount=pos["amount"],
                           price=str(price), fee="0.12", client_order_id=cid, run_id=run)
                pnl = round((price - pos["entry"]) * float(pos["amount"])
                            * (1 if pos["side"] == "long" else -1), 6)
                equity += pnl
                yield Fact("position_closed", ts + 36, symbol=symbol, price=str(price),
                           pnl=f"{pnl:.6f}", fee="0.24", position_id=pos["pid"],
                           reason=rng.choice(("trailing_stop", "take_profit", "stop_loss")),
                           run_id=run)
                yield Fact("stop_cancelled", ts + 50, symbol=symbol,
                           client_order_id=pos["stop_cid"], position_id=pos["pid"], run_id=run)
                del open_pos[symbol]
            else:
                yield Fact("best_price", ts, symbol=symbol, price=str(price),
                           position_id=pos["pid"], run_id=run,
                           data={"trailing_active": rng.random() < 0.5, "trail_pct": 0.01})
        yield Fact("balance", ts + 100, run_id=run,
                   data={"currency": "USDT", "total": f"{equity:.4f}", "free": f"{equity:.4f}",
                         "equity": f"{equity:.4f}"})
        yield Fact("job_run", ts + 120, run_id=run,
                   data={"job": "scan", "scheduled_ms": ts, "started_ms": ts + 2,
                         "finished_ms": ts + 120, "duration_ms": 118, "outcome": "ok"})


def batches(n_batches: int, size: int = BATCH, seed: int = 1) -> list[list[Fact]]:
    stream = realistic_facts(seed)
    return [[next(stream) for _ in range(size)] for _ in range(n_batches)]


def fresh(path: Path) -> Path:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return path


def bench_append(path: Path, work: list[list[Fact]], durable: bool = True,
                 **ledger_kw) -> tuple[float, list[float], float]:
    """Appends ``work`` into a new ledger (durable unless told otherwise).

    Returns (rows/s over the run, each append's seconds, CPU seconds per row).
    """
    with Ledger(fresh(path), **ledger_kw) as ledger:
        if not durable:
            ledger._conn().execute("PRAGMA synchronous = OFF")
        each = []
        clock = time.perf_counter
        cpu = time.process_time()
        t = clock()
        for batch in work:
            t0 = clock()
            ledger.append(batch)
            each.append(clock() - t0)
        elapsed = clock() - t
        cpu = time.process_time() - cpu
    rows = sum(map(len, work))
    return rows / elapsed, each, cpu / rows


def bench_sqlite_only(path: Path, work: list[list[Fact]]) -> tuple[float, list[float], float]:
    """The SQLite part of the same durable appends alone: rows normalised, hashed and
    bound beforehand, then per batch BEGIN IMMEDIATE, the SELECT of the last hash, the
    INSERT and the COMMIT, as append() runs them. What no Python change can beat."""
    bound, prev, seq = [], GENESIS, 0
    for batch in work:
        params: list = []
        for fact in batch:
            seq += 1
            row = fact.row(seq)
            prev = link(prev, row)
            params += (seq, *bind_values(row[1:]), bytearray(prev))
        bound.append((_insert_many(len(batch)), params))
    with Ledger(fresh(path)) as ledger:
        conn = ledger._conn()
        each = []
        clock = time.perf_counter
        cpu = time.process_time()
        t = clock()
        for sql, params in bound:
            t0 = clock()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("SELECT seq, hash FROM facts ORDER BY seq DESC LIMIT 1").fetchone()
            conn.execute(sql, params)
            conn.execute("COMMIT")
            each.append(clock() - t0)
        elapsed = clock() - t
        cpu = time.process_time() - cpu
    rows = sum(map(len, work))
    return rows / elapsed, each, cpu / rows


def bench_fsync_floor(path: Path, commits: int = 2000) -> tuple[float, list[float], float]:
    """Durable commits of one tiny row in a one-column table (WAL, synchronous=FULL):
    the fsync this disk costs any commit. Reported as rows/s at BATCH rows a commit."""
    fresh(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE t (x INTEGER)")
        each = []
        clock = time.perf_counter
        cpu = time.process_time()
        t = clock()
        for i in range(commits):
            t0 = clock()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t VALUES (?)", (i,))
            conn.execute("COMMIT")
            each.append(clock() - t0)
        elapsed = clock() - t
        cpu = time.process_time() - cpu
    finally:
        conn.close()
    return BATCH * commits / elapsed, each, cpu / (BATCH * commits)


def build(path: Path, rows: int) -> None:
    """The bench-only fast build (see the module docstring)."""
    stream = realistic_facts(seed=7)
    with Ledger(fresh(path)) as ledger:
        ledger._conn().execute("PRAGMA synchronous = OFF")
        while ledger.last_seq() < rows:
            n = min(1000, rows - ledger.last_seq())
            ledger.append([next(stream) for _ in range(n)])
        ledger._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def open_to_ready(path: Path):
    with Ledger(path) as ledger:
        return ledger.state()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="size of the large ledger")
    ap.add_argument("--runs", type=int, default=5, help="runs per figure (median reported)")
    ap.add_argument("--batches", type=int, default=2500, help="20-row batches per append run")
    ap.add_argument("--dir", help="work folder (default: a temporary one, removed after)")
    args = ap.parse_args()
    work_dir = Path(args.dir or tempfile.mkdtemp(prefix="ledger-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        run(args, work_dir)
    finally:
        if not args.dir:
            shutil.rmtree(work_dir, ignore_errors=True)


def run(args, work_dir: Path) -> None:
    med = statistics.median
    work = batches(args.batches)
    small = work_dir / "append.db"
    print(f"ledger bench: {args.runs} runs each, medians; {os.cpu_count()} CPUs; "
          f"folder {work_dir}")
    figures = {
        "append, durable, 20 rows/commit, checkpoint every 5000 (default)":
            lambda: bench_append(small, work),
        "append, durable, 20 rows/commit, no checkpoints":
            lambda: bench_append(small, work, checkpoint_every=10**12),
        "for reference: the same without fsync (synchronous=OFF, NOT durable)":
            lambda: bench_append(small, work, durable=False),
        "limit: SQLite alone, durable (the same batches hashed beforehand)":
            lambda: bench_sqlite_only(small, work),
        "limit: fsync floor (durable 1-row commits, counted as 20 rows each)":
            lambda: bench_fsync_floor(small),
    }
    print("  (rows/s over each run, median of runs | rows/s at the median batch latency, which"
          "\n   other work on a shared machine disturbs less | CPU per row)")
    for label, fn in figures.items():
        results = [fn() for _ in range(args.runs)]
        rates = [r[0] for r in results]
        typical = BATCH / med([s for r in results for s in r[1]])
        print(f"  {label:66s} {med(rates):>10,.0f} rows/s | {typical:>8,.0f} rows/s | "
              f"{med(r[2] for r in results) * 1e6:5.1f} us CPU/row   "
              f"(runs: {', '.join(f'{r:,.0f}' for r in rates)})")

    big = work_dir / f"big-{args.rows}.db"
    if big.exists() and ledger_rows(big) >= args.rows:  # kept from an earlier --dir run
        print(f"  reusing the {ledger_rows(big):,}-row ledger {big}")
    else:
        build_s, _ = timed(lambda: build(big, args.rows))
        print(f"  built a {args.rows:,}-row ledger in {build_s:.1f} s "
              f"({big.stat().st_size / 1e6:.0f} MB, bench-only synchronous=OFF build)")

    shares = workers_for(ledger_rows(big), usable_cpus())
    plural = "es" if shares > 1 else ""
    for label, workers in ((f"verify (the default here: {shares} process{plural})", None),
                           ("verify, one walk (one process)", 1)):
        verify = []
        for _ in range(args.runs):
            with Ledger(big, readonly=True) as ledger:
                seconds, report = timed(lambda: ledger.verify(workers))  # noqa: B023
            assert report.ok and report.rows == ledger_rows(big), report
            verify.append(report.rows / seconds)
        print(f"  {label:66s} {med(verify):>10,.0f} rows/s")

    ready = []
    for _ in range(args.runs):
        seconds, state = timed(lambda: open_to_ready(big))
        ready.append(seconds)
    print(f"  {'open a ' + format(args.rows, ',') + '-row ledger to a ready state':66s} "
          f"{med(ready) * 1000:>10,.1f} ms   (checkpoint + tail; warm page cache)")

    replay = []
    with Ledger(big, readonly=True) as ledger:
        for _ in range(max(1, args.runs // 2)):
            seconds, full = timed(ledger.replay)
            replay.append(seconds)
        assert full == ledger.state(), "replay and checkpoint + tail disagree"
    print(f"  {'full replay of ' + format(args.rows, ',') + ' rows':66s} "
          f"{med(replay):>10,.2f} s   ({args.rows / med(replay):,.0f} rows/s)")


def ledger_rows(path: Path) -> int:
    with Ledger(path, readonly=True) as ledger:
        return ledger.last_seq()


if __name__ == "__main__":
    main()
