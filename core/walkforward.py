"""Walk-forward optimisation: pick parameters on a training window, judge them on the next.

The data's time range is cut into rolling folds: train on ``[s, s + train)``, test on
``[s + train, s + train + test)``, then move ``s`` on by ``test``. For each fold every
parameter combination of the grid is backtested on the training window; the best one
(by the objective) is backtested on the test window, out of sample. Each backtest
starts flat with ``[sim] start_balance`` and is warmed up by the candles before its
window. The report gives each fold's choice, in- and out-of-sample results, and how far
the in-sample results flattered (return per day in sample minus out of sample).

A fold whose training or test window holds no candle of any symbol (a hole in the data
longer than the window) is skipped, and the report says so: a backtest refuses an empty
window, and a fold without either has nothing to choose on or to judge. The aggregate is
over the folds that ran.

The grid is a TOML file of parameter lists, one table per config section; every
combination is tried (values are validated like the config file):

    [strategy]
    min_body_pct = [0.5, 0.7, 0.9]
    long_volume_ratio = [1.5, 1.8]

    [exits]
    trailing_stop_pct = [0.3, 0.5]

All cores are used: the backtests run in a process pool, in chunks that each read the
candles once and compute the strategy's signals once per strategy parameter set.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import re
import signal
import tempfile
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.config import (
    SECTIONS,
    Config,
    ConfigError,
    from_mapping,
    to_mapping,
    value_problems,
)
from core.interrupts import ending_on_sigterm
from core.strategies import StrategyError, load_strategy

OBJECTIVES = ("total_return", "sharpe", "sortino", "profit_factor")
MAX_COMBOS = 5000
MAX_FOLDS = 1000
MAX_SPAN_MS = 100 * 365 * 86_400_000
SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*$")
SPAN_MS = {"m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000}


def parse_span(text: str, flag: str, candle_ms: int = 1) -> int:
    """``7d``, ``36h``, ``90m``, ``2w`` -> milliseconds; at least two candles of
    ``candle_ms``: a window decides at its candle closes but its last, so a shorter one
    could never trade."""
    m = SPAN.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{flag} {text!r}: give a length like 7d, 36h, 90m or 2w")
    ms = float(m.group(1)) * SPAN_MS[m.group(2)]
    if ms < 2 * candle_ms:
        raise ValueError(f"{flag} {text!r}: shorter than two {candle_ms // 60_000} m candles, "
                         "so nothing could be decided in it")
    if ms > MAX_SPAN_MS:
        raise ValueError(f"{flag} {text!r}: longer than 100 years")
    return int(ms)


@dataclass(frozen=True)
class Grid:
    """Parameter lists per config section; ``combos()`` is their cartesian product."""

    lists: dict[str, dict[str, list]]

    def combos(self) -> list[dict[str, dict[str, Any]]]:
        keys = [(sec, key) for sec, params in self.lists.items() for key in params]
        out = []
        for values in itertools.product(*(self.lists[s][k] for s, k in keys)):
            combo: dict[str, dict[str, Any]] = {}
            for (sec, key), value in zip(keys, values, strict=True):
                combo.setdefault(sec, {})[key] = value
            out.append(combo)
        return out

    def size(self) -> int:
        return math.prod(len(v) for params in self.lists.values() for v in params.values())


# Parameters that choose which candle files are read: the same for every combination.
DATA_KEYS = frozenset({("strategy", "timeframe"), ("exchange", "quote")})
# [strategy] keys of every strategy; the others are some strategy's own parameters.
STRATEGY_KEYS = frozenset({"name", "module", "timeframe", "candles"})


def load_grid(path: str | Path, config: Config) -> Grid:
    """Read and validate a grid file (see the module docstring). ValueError if bad."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{p}: grid file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: cannot read the grid file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{p}: not valid TOML ({exc})") from None
    lists: dict[str, dict[str, list]] = {}
    for section, params in raw.items():
        if section not in SECTIONS or section in ("bot", "schedule", "sim", "faults"):
            allowed = "strategy, exits, risk, rotation, exchange, reconcile"
            raise ValueError(f"{p}: [{section}] cannot be searched; sections: {allowed}")
        if not isinstance(params, dict) or not params:
            raise ValueError(f"{p}: [{section}] must be a table of parameter lists")
        for key, values in params.items():
            if (section, key) in DATA_KEYS:
                raise ValueError(f"{p}: [{section}] {key} chooses the candles read from "
                                 "--data (once for every combination); set it in the "
                                 "config instead")
            if not isinstance(values, list) or not values:
                raise ValueError(f"{p}: [{section}] {key} must be a non-empty list of values, "
                                 f"e.g. {key} = [1, 2]")
            for v in values:
                problems = value_problems(section, {key: v})
                if problems:
                    raise ValueError(f"{p}: {problems[0]}")
            lists.setdefault(section, {})[key] = list(values)
    if not lists:
        raise ValueError(f"{p}: the grid names no parameters")
    grid = Grid(lists)
    if grid.size() > MAX_COMBOS:
        raise ValueError(f"{p}: {grid.size()} combinations; at most {MAX_COMBOS}")
    built = []
    for combo in grid.combos():  # cross-field rules (e.g. sma_fast < sma_slow)
        try:
            chosen = config.with_values(**combo)
        except ConfigError as exc:
            raise ValueError(f"{p}: combination {combo} is not a valid config: "
                             f"{str(exc).split(chr(10), 1)[-1].strip()}") from None
        try:
            built.append((combo, load_strategy(chosen.strategy)))
        except StrategyError as exc:
            raise ValueError(f"{p}: combination {combo}: {exc}") from None
    for key, values in grid.lists.get("strategy", {}).items():
        if key not in STRATEGY_KEYS and len(values) > 1 and not makes_a_difference(key, built):
            names = sorted({s.name for _, s in built})
            raise ValueError(f"{p}: [strategy] {key} = {values} changes no parameter of "
                             f"strategy {', '.join(map(repr, names))} (not one of its "
                             "parameters, or the values repeat): every value would run the "
                             "same backtests")
    return grid


def makes_a_difference(key: str, built: list[tuple[dict, Any]]) -> bool:
    """Does some combination's strategy take other parameters for another value of the
    [strategy] ``key`` (the rest of the combination the same)? Judged by effect, not by
    name: a user strategy's ``from_config`` may map a key to a parameter of its own."""
    seen: dict[str, str] = {}
    for combo, strategy in built:
        rest = repr(sorted((sec, k, repr(v)) for sec, params in combo.items()
                           for k, v in params.items() if (sec, k) != ("strategy", key)))
        params = repr(sorted((k, repr(v)) for k, v in strategy.params.items()))
        if seen.setdefault(rest, params) != params:
            return True
    return False


@dataclass(frozen=True)
class Fold:
    index: int
    train_start: int
    train_end: int  # = test start
    test_end: int


def make_folds(first_ms: int, end_ms: int, train_ms: int, test_ms: int) -> list[Fold]:
    """Rolling folds over [first_ms, end_ms); the test windows follow each other."""
    folds, s = [], first_ms
    while s + train_ms + test_ms <= end_ms:
        folds.append(Fold(len(folds), s, s + train_ms, s + train_ms + test_ms))
        s += test_ms
    return folds


def candle_times(source) -> np.ndarray:
    """Every candle open time of any symbol of ``source`` (the CSV folder's), ascending:
    the steps the backtests of ``run_chunk`` walk (``MarketData.grid``, built from the
    same files)."""
    from core.backtest_data import union_of

    end = source.end_ms  # MarketData reads the candles opening before the source's end
    times = union_of(source.series(s, end - 1).ts for s in source.symbols)
    return times[times < end]


def why_skipped(times: np.ndarray, fold: Fold) -> str | None:
    """Why ``fold`` cannot run (None if it can): a window in which no candle opens.
    ``run_backtest`` refuses exactly those (``MarketData.steps`` finds no step in it);
    a window with candles runs, even if a hole leaves the strategy nothing to decide."""
    empty = [name for name, a, b in (("training", fold.train_start, fold.train_end),
                                     ("test", fold.train_end, fold.test_end))
             if times.searchsorted(a) >= times.searchsorted(b)]
    if not empty:
        return None
    if len(empty) == 2:
        return "no candles in its training and test windows"
    return f"no candles in its {empty[0]} window"


def fold_label(fold_number: int, test_start_ms: int, test_end_ms: int) -> str:
    """``fold 3 (2018-01-18 00:00 .. 2018-01-20 00:00)``: a fold by its test window."""
    from core.report import when_utc

    return f"fold {fold_number} ({when_utc(test_start_ms)} .. {when_utc(test_end_ms)})"


# -- running the backtests -----------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One backtest: a combination on a window."""

    key: tuple  # (fold index, "train"|"test", combo index)
    combo: dict
    start_ms: int
    end_ms: int


def _strategy_key(combo: dict) -> str:
    return repr(sorted(combo.get("strategy", {}).items()))


def run_chunk(base: dict, data_dir: str, jobs: list[Job],
              scratch: str | None = None) -> list[tuple[tuple, dict]]:
    """Backtest ``jobs`` in one process: the candles are read once, the signals computed
    once per strategy parameter set. Returns (key, metrics) pairs. The temporary ledgers
    go in a folder of their own (in ``scratch`` if given)."""
    from core.backtest import run_backtest
    from core.backtest_data import MarketData
    from core.backtest_run import open_source
    from core.report import metrics
    from core.strategies import load_strategy

    config = from_mapping(base)
    source = open_source(config, data_dir)
    prepared: dict[str, MarketData] = {}
    out = []
    with ending_on_sigterm(), tempfile.TemporaryDirectory(prefix="walkforward-",
                                                           dir=scratch) as tmp:
        for n, job in enumerate(jobs):
            cfg = config.with_values(**job.combo)
            skey = _strategy_key(job.combo)
            if skey not in prepared:
                prepared[skey] = MarketData(source, load_strategy(cfg.strategy),
                                             limit=cfg.strategy.candles)
            db = Path(tmp) / f"run{n}.db"
            result = run_backtest(cfg, source, db, start_ms=job.start_ms, end_ms=job.end_ms,
                                  data=prepared[skey])
            m = metrics(result)
            m.pop("per_symbol", None)
            out.append((job.key, m))
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
    return out


def _chunks(jobs: list[Job], n: int) -> list[list[Job]]:
    """About n chunks, jobs of one strategy parameter set kept together where possible."""
    jobs = sorted(jobs, key=lambda j: (_strategy_key(j.combo), j.key))
    size = max(1, math.ceil(len(jobs) / max(n, 1)))
    return [jobs[i:i + size] for i in range(0, len(jobs), size)]


def run_jobs(config: Config, data_dir: str, jobs: list[Job], workers: int,
             progress: Callable[[int, int], None] | None = None) -> dict[tuple, dict]:
    base = to_mapping(config)
    chunks = _chunks(jobs, workers * 2)
    results: dict[tuple, dict] = {}
    if workers <= 1 or len(chunks) == 1:
        for chunk in chunks:
            results.update(run_chunk(base, data_dir, chunk))
            if progress:
                progress(len(results), len(jobs))
        return results
    others = set(multiprocessing.active_children())  # the caller's own: never stopped
    # The workers' temporary ledgers go in the parent's folder: a worker killed outright
    # (SIGKILL, out of memory) cannot remove its own.
    with ending_on_sigterm(), tempfile.TemporaryDirectory(prefix="walkforward-",
                                                       ignore_cleanup_errors=True) as scratch, \
            ProcessPoolExecutor(max_workers=workers, initializer=_worker_start) as pool:
        try:
            futures = [pool.submit(_run_chunk_in_worker, base, data_dir, chunk, scratch)
                       for chunk in chunks]
            for f in as_completed(futures):
                results.update(f.result())
                if progress:
                    progress(len(results), len(jobs))
        except BaseException as exc:
            # Stopped (SIGTERM, Ctrl-C) or failed: the chunks not started are not run, and
            # the workers are stopped in theirs (a chunk is many backtests), not waited for.
            pool.shutdown(wait=False, cancel_futures=True)
            workers_left = set(multiprocessing.active_children()) - others
            for worker in workers_left:
                worker.terminate()
            for worker in workers_left:  # their temporary ledgers go with the folder
                worker.join(5)
            if isinstance(exc, BrokenProcessPool):
                raise ValueError("a walk-forward worker process ended before its backtests "
                                 "were done (killed, or out of memory?)") from None
            raise
    return results


def _worker_start() -> None:
    # Ctrl-C reaches the whole process group: the parent stops the workers (SIGTERM), so
    # that a worker removing its temporary ledgers is not interrupted by a second signal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_chunk_in_worker(base: dict, data_dir: str, jobs: list[Job], scratch: str) -> list:
    """``run_chunk`` in a pool's worker. Stopped (SIGTERM), it ends once its temporary
    ledgers are removed: the pool would catch the exception and hand the worker the next
    chunk."""
    try:
        return run_chunk(base, data_dir, jobs, scratch)
    except SystemExit:
        os._exit(128 + signal.SIGTERM)


def score(m: dict, objective: str) -> tuple[float, float]:
    """How a training result ranks (higher is better): the objective, then the return.

    No value ranks last (no trades, or a Sharpe of a flat curve), except a profit factor
    without a losing trade: winners only rank first (their profit factor is infinite).
    """
    v = m.get(objective)
    ret = float(m.get("total_return") or 0.0)
    if v is None and objective == "profit_factor" and m.get("wins"):
        return math.inf, ret  # no profit factor with winners: there was no loss
    return (float(v) if v is not None and math.isfinite(float(v)) else -math.inf), ret


def per_day(m: dict, span_ms: int) -> float:
    return m["total_return"] / (span_ms / 86_400_000)


def walk_forward(config: Config, data_dir: str, grid: Grid, train_ms: int, test_ms: int, *,
                 first_ms: int, end_ms: int, objective: str = "total_return",
                 workers: int | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 source=None) -> dict[str, Any]:
    """Run the walk-forward (see the module docstring); the report as a dict."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if end_ms <= first_ms:
        raise ValueError("no candles in the chosen period")
    if (end_ms - first_ms - train_ms) // test_ms > MAX_FOLDS:
        raise ValueError(f"the test window makes more than {MAX_FOLDS} folds of this data; "
                         "choose a longer --test (or a shorter period)")
    folds = make_folds(first_ms, end_ms, train_ms, test_ms)
    if not folds:
        raise ValueError(f"the data ({(end_ms - first_ms) / 86_400_000:.1f} days) is shorter "
                         "than one training plus one test window")
    # found from the candle times before any backtest runs: an empty window would fail
    # its backtest (and the whole walk-forward) only once the workers reach it
    if source is None:  # the caller's, already read, or the folder's
        from core.backtest_run import open_source

        source = open_source(config, data_dir)
    times = candle_times(source)
    reasons = {f.index: why for f in folds if (why := why_skipped(times, f)) is not None}
    skipped = [{"fold": f.index + 1, "train_start_ms": f.train_start,
                "test_start_ms": f.train_end, "test_end_ms": f.test_end,
                "reason": reasons[f.index]} for f in folds if f.index in reasons]
    folds = [f for f in folds if f.index not in reasons]
    if not folds:
        first = skipped[0]
        raise ValueError(
            f"no fold can run: all {len(skipped)} have a training or test window without "
            "candles (holes in the data longer than the windows), e.g. "
            f"{fold_label(first['fold'], first['test_start_ms'], first['test_end_ms'])}: "
            f"{first['reason']}; choose longer windows or another period (--from/--to)")
    workers = workers or os.cpu_count() or 1
    combos = grid.combos()
    t0 = time.monotonic()
    train_jobs = [Job((f.index, "train", c), combo, f.train_start, f.train_end)
                  for f in folds for c, combo in enumerate(combos)]
    insample = run_jobs(config, data_dir, train_jobs, workers, progress)
    best = {}
    for f in folds:
        scores = [(score(insample[(f.index, "train", c)], objective), -c) for c in
                  range(len(combos))]
        best[f.index] = -max(scores)[1]  # highest score; ties: the first combination
    test_jobs = [Job((f.index, "test", best[f.index]), combos[best[f.index]], f.train_end,
                     f.test_end) for f in folds]
    outsample = run_jobs(config, data_dir, test_jobs, workers)
    rows = []
    for f in folds:
        c = best[f.index]
        ism, oos = insample[(f.index, "train", c)], outsample[(f.index, "test", c)]
        rows.append({
            "fold": f.index + 1, "train_start_ms": f.train_start, "test_start_ms": f.train_end,
            "test_end_ms": f.test_end, "params": combos[c],
            "in_sample": _brief(ism), "out_of_sample": _brief(oos),
            "in_sample_return_per_day": per_day(ism, f.train_end - f.train_start),
            "out_of_sample_return_per_day": per_day(oos, f.test_end - f.train_end),
        })
    return {"objective": objective, "combinations": len(combos), "folds": rows,
            "skipped_folds": skipped, "aggregate": aggregate(rows), "workers": workers,
            "backtests": len(train_jobs) + len(test_jobs),
            "elapsed_s": round(time.monotonic() - t0, 3)}


def skipped_text(report: dict[str, Any]) -> str:
    """The report's lines on its skipped folds, one each ("" if none)."""
    lines = [f"skipped {fold_label(s['fold'], s['test_start_ms'], s['test_end_ms'])}: "
             f"{s['reason']}" for s in report.get("skipped_folds", ())]
    return "\n".join(lines)


def _brief(m: dict) -> dict:
    keys = ("total_return", "max_drawdown", "sharpe", "sortino", "profit_factor",
            "total_trades", "win_rate", "fees")
    return {k: m.get(k) for k in keys}


def aggregate(rows: list[dict]) -> dict[str, Any]:
    """Out-of-sample results chained over the folds, and the in-sample flattery."""
    oos = [r["out_of_sample"]["total_return"] for r in rows]
    compounded = math.prod(1 + r for r in oos) - 1
    is_day = sum(r["in_sample_return_per_day"] for r in rows) / len(rows)
    oos_day = sum(r["out_of_sample_return_per_day"] for r in rows) / len(rows)
    return {
        "folds": len(rows),
        "out_of_sample_return": compounded,
        "out_of_sample_trades": sum(r["out_of_sample"]["total_trades"] for r in rows),
        "out_of_sample_positive_folds": sum(1 for r in oos if r > 0),
        "mean_in_sample_return_per_day": is_day,
        "mean_out_of_sample_return_per_day": oos_day,
        "in_sample_flattery_per_day": is_day - oos_day,
        "params_changed": sum(1 for a, b in zip(rows, rows[1:], strict=False)
                              if a["params"] != b["params"]),
    }


__all__ = ["Grid", "Fold", "Job", "load_grid", "make_folds", "parse_span", "walk_forward",
           "aggregate", "run_chunk", "OBJECTIVES", "candle_times", "why_skipped",
           "skipped_text"]
