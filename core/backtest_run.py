"""``cli.py backtest`` and ``cli.py walkforward``: the imperative shell around the engines.

Reads the candles, checks the user's input (a bad folder, date, strategy or grid is a
``ValueError``: the CLI prints one line and exits 2), runs, prints the report, writes
the chart. Venue refusals during a backtest (an order too small, too large) are facts
in the ledger, not console noise: only errors reach stderr.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from core.config import Config, crash_faults_problem
from core.interrupts import ending_on_sigterm, held_signals

PROGRESS_AFTER_S = 2.0


class ProgressBar:
    """A progress bar on stderr, shown only once a run has taken PROGRESS_AFTER_S."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.shown = False
        self.last_tenth = -1

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.monotonic() - self.t0
        if elapsed < PROGRESS_AFTER_S or total <= 0:
            return
        frac = min(1.0, done / total)
        tty = getattr(self.stream, "isatty", lambda: False)()
        if not tty:  # a log file: one line per tenth
            tenth = int(frac * 10)
            if tenth == self.last_tenth:
                return
            self.last_tenth = tenth
        bar = "#" * int(frac * 30)
        line = f"{self.label} [{bar:<30}] {frac * 100:5.1f}% {done:,}/{total:,} {elapsed:.1f} s"
        self.stream.write(("\r" + line) if tty else line + "\n")
        if tty and done >= total:
            self.stream.write("\n")
        self.stream.flush()
        self.shown = True


def quiet_logging() -> None:
    """Only errors on the console while a backtest runs (refusals are in the ledger), and
    the data's own warnings (candles left out of a CSV file)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.WARNING)
        handler.addFilter(lambda r: r.levelno >= logging.ERROR or r.name == "core.sim_market")
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


def check_name(option: str, path: str | Path, *suffixes: str) -> None:
    """Refuse a path the system cannot even look up (a name too long, ...), and one whose
    files written beside it (``path`` + each suffix) could not be: a traceback, else."""
    for p in (Path(path), *(Path(f"{path}{s}") for s in suffixes)):
        try:
            p.exists()
        except OSError as exc:
            beside = "" if str(p) == str(path) else f" ({p.name} is written beside it)"
            raise ValueError(f"{option} {path}: {exc.strerror or exc}{beside}") from None


def open_source(config: Config, data_dir: str | Path):
    """The CSV candles of ``data_dir`` as the simulated exchange's market."""
    from core.sim_market import CsvMarket

    path = Path(data_dir)
    check_name("--data", path)
    if not path.exists():
        raise ValueError(f"--data {data_dir}: no such folder")
    if not path.is_dir():
        raise ValueError(f"--data {data_dir}: not a folder")
    try:
        return CsvMarket(path, config.strategy.timeframe, config.exchange.quote)
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"--data {data_dir}: cannot use these candles ({exc})") from None


def backtest_config(config: Config, name: str | None) -> Config:
    """``config`` with ``--strategy`` applied, checked before any work: an unknown name,
    and the crash faults (a backtest would SIGKILL itself), are refused."""
    from core.strategies import load_strategy

    if name is not None:  # "" too: an unknown name, not the config's strategy
        config = config.with_values(strategy={"name": name})
    load_strategy(config.strategy)  # StrategyError (a ValueError) names the choices
    problem = crash_faults_problem(config, "a backtest")
    if problem:
        raise ValueError(problem)
    return config


def prepare_db(path: str | Path) -> Path:
    """Where a backtest's new ledger goes. An earlier backtest's file there is replaced
    once the run succeeds (``replace_db``); anything else is refused (a live ledger must
    never be touched)."""
    p = Path(path)
    check_name("--db", p, ".partial-journal")  # the longest name a run writes beside it
    _refuse_unless_backtest(p, f"--db {p}: a ledger that is not a backtest's; refusing to "
                            "replace it (choose another path)")
    return p


def _refuse_unless_backtest(p: Path, refusal: str) -> None:
    from core.backtest import is_backtest_ledger

    try:
        ours = not p.exists() or is_backtest_ledger(p)  # LedgerError: not a ledger at all
    except sqlite3.DatabaseError as exc:  # a damaged SQLite file
        raise ValueError(f"{refusal} ({exc})") from None
    if not ours:
        raise ValueError(refusal)


def hold_db(db: Path):
    """The ledger's lock, held while a run writes the file that replaces ``db``: a second
    backtest on the same ``--db`` (or the bot on it) is refused instead of sharing the
    partial file."""
    from ledger.lock import AlreadyRunning, LedgerLock

    lock = LedgerLock(db)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        raise ValueError(f"--db {db}: {exc}") from None
    return lock


def _remove(db: Path, suffixes: tuple[str, ...] = ("", "-wal", "-shm")) -> None:
    for suffix in suffixes:
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def partial_db(final: Path) -> Path:
    """The file a run writes before it replaces ``final``: a failed run (bad data, no
    candles in the period, a crash) leaves the earlier backtest's ledger as it was. One
    left by a run that was killed is removed (under ``final``'s lock no run writes it);
    any other file of that name is refused."""
    partial = final.with_name(final.name + ".partial")
    _refuse_unless_backtest(partial, f"--db {final}: {partial} is in the way and is not a "
                            "backtest's ledger; refusing to remove it")
    _remove(partial)
    return partial


def replace_db(partial: Path, final: Path) -> None:
    # The old file's WAL and index go first: a WAL left beside the new file could be
    # read as the new file's.
    _remove(final, ("-wal", "-shm"))
    partial.replace(final)


def _window(start: str | None, end: str | None) -> tuple[int | None, int | None]:
    from core.backtest_data import parse_when

    s = parse_when(start, "--from") if start else None
    e = parse_when(end, "--to") if end else None
    if s is not None and e is not None and e <= s:
        raise ValueError(f"--to {end} is not after --from {start}")
    return s, e


def backtest_command(config: Config, data_dir: str, *, strategy: str | None,
                     start: str | None, end: str | None, db_path: str | Path,
                     plot: str | None, as_json: bool) -> str:
    """Run one backtest; the text (or JSON) to print."""
    from core.backtest import run_backtest
    from core.report import check_chart_path, metrics, summary_text

    t0 = time.perf_counter()
    config = backtest_config(config, strategy)
    start_ms, end_ms = _window(start, end)
    db = prepare_db(db_path)
    if plot:
        check_name("--plot", plot)
        check_chart_path(plot)
        if Path(plot).resolve() == db.resolve():
            raise ValueError(f"--plot {plot}: is the --db file; the chart would overwrite "
                             "the ledger")
    with ending_on_sigterm():
        lock = hold_db(db)
        try:
            prepare_db(db)  # again, under the lock: nothing else writes it now
            quiet_logging()
            source = open_source(config, data_dir)
            load_s = time.perf_counter() - t0
            partial = partial_db(db)
            chart = partial_chart(plot) if plot else None
            try:
                result = run_backtest(config, source, partial, start_ms=start_ms,
                                      end_ms=end_ms, progress=ProgressBar("backtest"))
                result.timings["load_s"] = load_s
                result.elapsed_s += load_s
                m = metrics(result)  # reads the partial ledger's day closes
                if chart:  # before the earlier ledger is replaced: a failed run keeps it
                    _chart(plot, chart, result, m, config.exchange.quote, db)
            except BaseException:
                _remove(partial)
                if chart:
                    chart.unlink(missing_ok=True)
                raise
            with held_signals():  # the new ledger and its chart, or neither
                replace_db(partial, db)
                if chart:
                    chart.replace(Path(plot).resolve())
            if chart:
                m["chart"] = str(Path(plot))
        finally:
            lock.release(remove=True)
    result.db_path = m["ledger"] = str(db)
    if as_json:
        return json.dumps(m, indent=2, default=str)
    text = summary_text(m, config.exchange.quote)
    if plot:
        text += f"\n\nchart: {m['chart']}"
    return text + f"\n\nread the ledger: cli.py --db {db} trades | pnl | verify"


def partial_chart(plot: str) -> Path:
    """Where the chart is written before it replaces ``plot`` (beside the file a symlink
    names: replacing the link would leave that file as it was)."""
    target = Path(plot).resolve()  # its format is the one --plot names
    return target.with_name(f".{target.name}.partial{Path(plot).suffix}")


def _chart(plot: str, chart: Path, result, m: dict, quote: str, db: Path) -> None:
    from core.report import write_chart

    try:
        write_chart(chart, result, m, quote)
    except OSError as exc:
        kept = f"the ledger at {db} is as it was" if db.exists() else "no ledger written"
        raise ValueError(f"--plot {plot}: cannot write the chart ({exc.strerror or exc}); "
                         f"{kept}") from None


def walkforward_command(config: Config, data_dir: str, *, grid_path: str, train: str,
                        test: str, strategy: str | None, start: str | None, end: str | None,
                        objective: str, workers: int | None, as_json: bool) -> str:
    """Run a walk-forward; the text (or JSON) to print."""
    from core.clock import timeframe_ms
    from core.walkforward import load_grid, parse_span, walk_forward

    config = backtest_config(config, strategy)
    candle_ms = timeframe_ms(config.strategy.timeframe)
    train_ms = parse_span(train, "--train", candle_ms)
    test_ms = parse_span(test, "--test", candle_ms)
    start_ms, end_ms = _window(start, end)
    grid = load_grid(grid_path, config)
    quiet_logging()
    source = open_source(config, data_dir)
    first = min(int(source.series(s, 2**62).ts[0]) for s in source.symbols)
    last = max(int(source.series(s, 2**62).ts[-1]) for s in source.symbols) + \
        source.timeframe_ms
    report = walk_forward(config, str(data_dir), grid, train_ms, test_ms,
                          first_ms=max(first, start_ms or first),
                          end_ms=min(last, end_ms or last), objective=objective,
                          workers=workers, progress=ProgressBar("walkforward"),
                          source=source)
    if as_json:
        return json.dumps(report, indent=2, default=str)
    return walkforward_text(report)


def walkforward_text(r: dict[str, Any]) -> str:
    from tabulate import tabulate

    from core.report import when_utc
    from core.walkforward import skipped_text

    def pct(x):
        return "-" if x is None else f"{x * 100:.2f} %"

    rows = []
    for f in r["folds"]:
        params = ", ".join(f"{k}={v}" for sec in f["params"].values() for k, v in sec.items())
        rows.append({"fold": f["fold"], "test window": f"{when_utc(f['test_start_ms'])} .. "
                     f"{when_utc(f['test_end_ms'])}", "chosen": params,
                     "in-sample": pct(f["in_sample"]["total_return"]),
                     "out-of-sample": pct(f["out_of_sample"]["total_return"]),
                     "oos trades": f["out_of_sample"]["total_trades"],
                     "oos max dd": pct(f["out_of_sample"]["max_drawdown"])})
    a = r["aggregate"]
    lines = [
        f"walk-forward: {a['folds']} folds x {r['combinations']} combinations, objective "
        f"{r['objective']}, {r['backtests']} backtests on {r['workers']} workers in "
        f"{r['elapsed_s']:.1f} s",
        "",
        tabulate(rows, headers="keys", tablefmt="simple", disable_numparse=True),
        "",
        f"out of sample  {pct(a['out_of_sample_return'])} chained over the test windows "
        f"({a['out_of_sample_trades']} trades, {a['out_of_sample_positive_folds']} of "
        f"{a['folds']} folds positive)",
        f"per day        in sample {pct(a['mean_in_sample_return_per_day'])}, out of sample "
        f"{pct(a['mean_out_of_sample_return_per_day'])}: in-sample flattered by "
        f"{pct(a['in_sample_flattery_per_day'])} a day",
        f"params changed between folds {a['params_changed']} time(s)",
    ]
    if r.get("skipped_folds"):
        lines += ["", skipped_text(r)]
    return "\n".join(lines)


__all__ = ["backtest_command", "walkforward_command", "open_source", "prepare_db",
           "ProgressBar", "walkforward_text"]
