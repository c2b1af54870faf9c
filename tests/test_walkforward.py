"""Walk-forward: folds, grid files, the choice in sample, the judgement out of sample."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
from core.backtest import run_backtest
from core.backtest_data import parse_when
from core.backtest_run import walkforward_text
from core.config import Config
from core.report import metrics
from core.sim_market import CsvMarket
from core.walkforward import (
    Fold,
    Grid,
    Job,
    candle_times,
    load_grid,
    make_folds,
    parse_span,
    run_jobs,
    score,
    skipped_text,
    walk_forward,
    why_skipped,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ohlcv"
needs_data = pytest.mark.skipif(not (DATA / "ETH_BTC-5m.csv").is_file(),
                                reason=f"real candles not found at {DATA}")
DAY = 86_400_000
CFG = Config().with_values(sim={"taker_fee_pct": 0.1, "start_balance": 100.0},
                           risk={"max_drawdown_pct": 100.0, "daily_loss_limit_pct": 100.0})


def test_spans():
    assert parse_span("7d", "--train") == 7 * DAY
    assert parse_span("36h", "--test") == 36 * 3_600_000
    assert parse_span("90m", "--test") == 90 * 60_000
    assert parse_span("2w", "--train") == 14 * DAY
    for bad in ("7", "0d", "-1d", "7 days", ""):
        with pytest.raises(ValueError, match="give a length"):
            parse_span(bad, "--train")


def test_folds_roll_by_the_test_window():
    folds = make_folds(0, 20 * DAY, 7 * DAY, 2 * DAY)
    assert len(folds) == 6
    assert [(f.train_start, f.train_end, f.test_end) for f in folds[:2]] == [
        (0, 7 * DAY, 9 * DAY), (2 * DAY, 9 * DAY, 11 * DAY)]
    assert all(a.test_end == b.train_end for a, b in zip(folds, folds[1:], strict=False))
    assert folds[-1].test_end <= 20 * DAY
    assert make_folds(0, 8 * DAY, 7 * DAY, 2 * DAY) == []


def write(tmp_path, text: str, name: str = "grid.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_grid_file(tmp_path):
    grid = load_grid(write(tmp_path, "[strategy]\nmin_body_pct = [0.5, 0.7]\n"
                                     "[exits]\ntrailing_stop_pct = [0.3, 0.5, 0.8]\n"), CFG)
    assert grid.size() == 6
    combos = grid.combos()
    assert combos[0] == {"strategy": {"min_body_pct": 0.5}, "exits": {"trailing_stop_pct": 0.3}}
    assert len({json.dumps(c, sort_keys=True) for c in combos}) == 6


def test_a_grid_is_judged_by_its_combinations_not_each_value_on_the_config(tmp_path):
    """sma_fast = 250 was refused for not being below the config's sma_slow (200), though
    every combination has sma_slow = 300."""
    grid = load_grid(write(tmp_path, "[strategy]\nsma_fast = [250, 260]\n"
                                     "sma_slow = [300]\n"),
                     CFG.with_values(strategy={"name": "sma_cross"}))
    assert grid.combos() == [{"strategy": {"sma_fast": 250, "sma_slow": 300}},
                             {"strategy": {"sma_fast": 260, "sma_slow": 300}}]


def test_a_grid_key_counts_when_it_changes_some_combinations_strategy(tmp_path):
    """Judged by effect: sma_fast changes sma_cross's combinations (not momentum's), one
    value changes nothing to run twice, and a user strategy may map a key to its own
    parameter in from_config."""
    grid = load_grid(write(tmp_path, '[strategy]\nname = ["momentum", "sma_cross"]\n'
                                     "sma_fast = [20, 30]\nmin_body_pct = [0.5, 0.9]\n"), CFG)
    assert grid.size() == 8
    assert load_grid(write(tmp_path, "[strategy]\nsma_fast = [20]\n"), CFG).size() == 1
    module = tmp_path / "ema.py"
    module.write_text(
        "from types import MappingProxyType\n"
        "from core.strategies import SmaCross\n\n\n"
        "class EmaCross(SmaCross):\n"
        "    name = 'ema_cross'\n"
        "    defaults = MappingProxyType({'fast': 12, 'slow': 26, 'allow_short': True})\n\n"
        "    @classmethod\n"
        "    def from_config(cls, section):\n"
        "        return cls(fast=section.sma_fast)\n\n"
        "    def validate(self):\n"
        "        pass\n")
    ema = CFG.with_values(strategy={"module": str(module), "name": "ema_cross"})
    assert load_grid(write(tmp_path, "[strategy]\nsma_fast = [10, 20]\n"), ema).size() == 2


@pytest.mark.parametrize("text, message", [
    ("[strategy\n", "not valid TOML"),
    ("[strategy]\nsma_fast = [\"x\"]\n", "sma_fast = 'x': wrong type"),
    ("[wallet]\nx = [1]\n", "cannot be searched"),
    ("[sim]\nseed = [1, 2]\n", "cannot be searched"),
    ("[strategy]\nmin_body_pct = 0.5\n", "non-empty list"),
    ("[strategy]\nmin_body_pct = []\n", "non-empty list"),
    ("[strategy]\nno_such_param = [1]\n", "unknown key"),
    ("[exits]\nstop_loss_pct = [2.0, -1.0]\n", "out of range"),
    ("[strategy]\nsma_fast = [150]\nsma_slow = [100]\n", "not a valid config"),
    ("", "names no parameters"),
    # read once from --data for every combination: "1h" ran on the 5 m candles
    ('[strategy]\ntimeframe = ["5m", "1h"]\n', "chooses the candles"),
    ('[exchange]\nquote = ["USDT", "BTC"]\n', "chooses the candles"),
    # a parameter the strategy does not have: every value ran the same backtests
    ("[strategy]\nsma_fast = [20, 30]\n", r"sma_fast = \[20, 30\] changes no parameter of "
                                         "strategy 'momentum'"),
    ("[strategy]\nmin_body_pct = [1, 1.0]\n", "or the values repeat"),
    ('[strategy]\nname = ["momentum", "nope"]\n', "unknown strategy 'nope'"),
])
def test_bad_grid_files(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_grid(write(tmp_path, text), CFG)


def test_missing_grid_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_grid(tmp_path / "nope.toml", CFG)


@needs_data
def test_walk_forward_picks_in_sample_and_judges_out_of_sample(tmp_path):
    grid = Grid({"strategy": {"min_body_pct": [0.5, 1.0]}})
    first = parse_when("2018-01-20", "--from")
    report = walk_forward(CFG, str(DATA), grid, DAY, DAY // 2, first_ms=first,
                          end_ms=first + 2 * DAY, workers=2)
    assert report["workers"] == 2 and report["combinations"] == 2
    assert len(report["folds"]) == 2 and report["backtests"] == 2 * 2 + 2
    market = CsvMarket(DATA)
    fold = report["folds"][0]
    insample = [metrics(run_backtest(CFG.with_values(**c), market, tmp_path / f"is{n}.db",
                                     start_ms=first, end_ms=first + DAY))["total_return"]
                for n, c in enumerate(grid.combos())]
    chosen = grid.combos().index(fold["params"])
    assert insample[chosen] == max(insample)
    assert fold["in_sample"]["total_return"] == insample[chosen]
    oos = metrics(run_backtest(CFG.with_values(**fold["params"]), market, tmp_path / "oos.db",
                               start_ms=fold["test_start_ms"], end_ms=fold["test_end_ms"]))
    assert fold["out_of_sample"]["total_return"] == oos["total_return"]
    assert fold["out_of_sample"]["total_trades"] == oos["total_trades"]
    agg = report["aggregate"]
    chained = ((1 + report["folds"][0]["out_of_sample"]["total_return"])
               * (1 + report["folds"][1]["out_of_sample"]["total_return"]) - 1)
    assert agg["out_of_sample_return"] == pytest.approx(chained)
    assert agg["in_sample_flattery_per_day"] == pytest.approx(
        agg["mean_in_sample_return_per_day"] - agg["mean_out_of_sample_return_per_day"])


@needs_data
def test_cli_walkforward(tmp_path):
    grid = write(tmp_path, "[exits]\ntrailing_stop_pct = [0.3, 0.6]\n")
    args = ["walkforward", "--data", str(DATA), "--grid", str(grid), "--train", "1d",
            "--test", "12h", "--from", "2018-01-22", "--to", "2018-01-24"]
    r = CliRunner().invoke(cli.main, [*args, "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert len(report["folds"]) == 2
    assert {"out_of_sample_return", "in_sample_flattery_per_day"} <= set(report["aggregate"])
    assert report["skipped_folds"] == []
    before = signal.getsignal(signal.SIGTERM)
    text = CliRunner().invoke(cli.main, [*args, "--workers", "1"]).output
    assert "out of sample" in text and "flattered" in text
    assert signal.getsignal(signal.SIGTERM) is before  # its handler lasts the run only


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize(("workers", "how"), [(1, "group"), (2, "group"), (2, "parent"),
                                             (2, "ctrl-c")])
def test_a_walkforward_stopped_by_sigterm_stops_now_and_leaves_nothing(tmp_path, workers, how):
    """SIGTERM to the process group (a service manager, ``timeout``'s group) or to the
    main process only (``kill``), or Ctrl-C (SIGINT to the group). A pool's worker caught
    it and went on with its next chunk, hundreds of backtests here (minutes); signalled
    alone, the parent waited for the chunks its workers had started."""
    values = ", ".join(f"{0.3 + 0.05 * i:.2f}" for i in range(10))
    grid = write(tmp_path, f"[exits]\ntrailing_stop_pct = [{values}]\n"
                           "stop_loss_pct = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "cli.py", "walkforward", "--data", str(DATA), "--grid", str(grid),
         "--train", "3d", "--test", "1d", "--workers", str(workers)],
        cwd=Path(cli.__file__).parent, env={**os.environ, "TMPDIR": str(tmp)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not any(tmp.glob("walkforward-*/**/run*.db")) and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.05)
        assert any(tmp.glob("walkforward-*/**/run*.db")), "no backtest started: " + (
            "still running" if proc.poll() is None else proc.stderr.read().decode())
        if how == "parent":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT if how == "ctrl-c" else signal.SIGTERM)
        proc.wait(timeout=60)  # a hang guard: the whole grid takes many minutes
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stopped = 1 if how == "ctrl-c" else 128 + signal.SIGTERM  # click's "Aborted!": 1
    assert proc.returncode == stopped, proc.stderr.read().decode()
    deadline = time.monotonic() + 10
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # the workers end as their temporary ledgers are removed
    assert not group_alive(proc.pid), "workers left running"
    assert list(tmp.iterdir()) == []


def worker_running_a_backtest(parent: int) -> int | None:
    """A child of ``parent`` with a temporary ledger open."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            fds = [os.readlink(fd) for fd in Path(f"/proc/{child}/fd").iterdir()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if any(Path(fd).name.startswith("run") and ".db" in fd for fd in fds):
            return int(child)
    return None


@needs_data
@pytest.mark.slow
def test_a_worker_killed_outright_ends_the_run_clearly_and_leaves_nothing(tmp_path):
    """A worker SIGKILLed (or by the out-of-memory killer) cannot remove its temporary
    ledgers: they were left in the temporary folder, one run's worth per kill."""
    grid = write(tmp_path, "[exits]\nstop_loss_pct = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5]\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "cli.py", "walkforward", "--data", str(DATA), "--grid", str(grid),
         "--train", "3d", "--test", "1d", "--workers", "2"],
        cwd=Path(cli.__file__).parent, env={**os.environ, "TMPDIR": str(tmp)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        victim = None
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            victim = worker_running_a_backtest(proc.pid)
            time.sleep(0.02)
        assert victim, "no worker seen running a backtest"
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 2, err.decode()
    assert "walk-forward worker process ended" in err.decode().splitlines()[0]
    assert list(tmp.iterdir()) == []


def test_a_failed_walkforward_stops_its_workers_only(tmp_path):
    """Stopping the workers stopped every child process of the caller's."""
    import multiprocessing

    bystander = multiprocessing.Process(target=time.sleep, args=(60,))
    bystander.start()
    try:
        jobs = [Job((0, "train", i), {}, 0, 10**13) for i in range(4)]
        with pytest.raises(ValueError, match="no such folder"):
            run_jobs(CFG, str(tmp_path / "missing"), jobs, workers=2)
        bystander.join(0.5)
        assert bystander.is_alive()
    finally:
        bystander.terminate()
        bystander.join()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_cli_walkforward_refuses_bad_input(tmp_path):
    grid = write(tmp_path, "[exits]\ntrailing_stop_pct = [0.3]\n")
    data = str(DATA if DATA.is_dir() else tmp_path)
    cases = [
        (["--grid", str(tmp_path / "none.toml")], "grid file not found"),
        (["--grid", str(write(tmp_path, "[bogus]\nx = [1]\n", "bad.toml"))], "cannot be searched"),
        (["--grid", str(grid), "--train", "seven"], "give a length"),
        (["--grid", str(grid), "--test", "0.00001m"], "shorter than two 5 m candles"),
        (["--grid", str(grid), "--test", "5m"], "shorter than two 5 m candles"),
        (["--grid", str(grid), "--train", "99999999999999999999d"], "longer than 100 years"),
        # these need the data: refused before any backtest runs
        (["--grid", str(grid), "--train", "30d"], "shorter than one training"),
        (["--grid", str(grid), "--test", "10m"], "more than 1000 folds"),
        (["--grid", str(grid), "--from", "2018-02-01"], "no candles in the chosen period"),
    ]
    for n, (extra, message) in enumerate(cases):
        if n >= 6 and not DATA.is_dir():
            continue
        r = CliRunner().invoke(cli.main, ["walkforward", "--data", data, *extra])
        assert r.exit_code == 2, (extra, r.output)
        assert message in r.output, (extra, r.output)


def test_profit_factor_ranks_winners_only_first_and_no_trades_last():
    """A training result with winners and no loser has no profit factor (no losses to
    divide by): it is the best there is, not the worst; one without trades is the worst."""
    winners_only = {"total_trades": 4, "wins": 4, "profit_factor": None, "total_return": 0.0085}
    mixed = {"total_trades": 4, "wins": 3, "profit_factor": 10.36, "total_return": 0.0064}
    poor = {"total_trades": 9, "wins": 1, "profit_factor": 0.1, "total_return": -0.02}
    idle = {"total_trades": 0, "wins": 0, "profit_factor": None, "total_return": 0.0}
    ranked = sorted([idle, poor, winners_only, mixed], reverse=True,
                    key=lambda m: score(m, "profit_factor"))
    assert ranked == [winners_only, mixed, poor, idle]
    fewer = {**winners_only, "total_return": 0.004}  # two winners-only: the larger return
    assert score(winners_only, "profit_factor") > score(fewer, "profit_factor")
    assert score(idle, "sharpe") < score(poor, "total_return")


HOLE = (parse_when("2018-01-18", "--from"), parse_when("2018-01-23", "--from"))


def holed_data(tmp_path) -> Path:
    """ETH and LTC with no candle from 2018-01-18 to 2018-01-23: a 5-day hole."""
    out = tmp_path / "holed"
    out.mkdir()
    for name in ("ETH_BTC-5m.csv", "LTC_BTC-5m.csv"):
        header, *rows = (DATA / name).read_text().splitlines()
        kept = [r for r in rows if not HOLE[0] <= int(r.split(",", 1)[0]) < HOLE[1]]
        (out / name).write_text("\n".join([header, *kept]) + "\n")
    return out


@needs_data
def test_a_fold_with_an_empty_window_is_skipped_and_the_rest_aggregated(tmp_path):
    # the data (2018-01-10 .. 01-30, in 3 d + 2 d folds) has a hole longer than a window:
    # fold 4's test window and fold 5's training window fall in it
    data = str(holed_data(tmp_path))
    grid = Grid({"exits": {"trailing_stop_pct": [0.3, 0.5]}})
    market = CsvMarket(data)
    report = walk_forward(CFG, data, grid, 3 * DAY, 2 * DAY, first_ms=market.start_ms,
                          end_ms=market.end_ms, workers=1)
    assert [f["fold"] for f in report["folds"]] == [1, 2, 3, 6, 7, 8]
    assert [(s["fold"], s["reason"]) for s in report["skipped_folds"]] == [
        (4, "no candles in its test window"), (5, "no candles in its training window")]
    assert report["backtests"] == 6 * 2 + 6  # none for the skipped folds
    agg = report["aggregate"]
    assert agg["folds"] == 6
    chained = 1.0
    for f in report["folds"]:
        chained *= 1 + f["out_of_sample"]["total_return"]
    assert agg["out_of_sample_return"] == pytest.approx(chained - 1)
    text = skipped_text(report)
    assert "skipped fold 4 (2018-01-19 04:55 .. 2018-01-21 04:55): no candles in its test " \
           "window" in text
    assert "skipped fold 5 " in text and "no candles in its training window" in text


@needs_data
def test_a_window_is_skipped_exactly_when_a_backtest_refuses_it(tmp_path):
    """The up-front check agrees with run_backtest: a window without any candle opening in
    it is refused; one candle (nothing decided on it, its warmup in the hole) runs."""
    data = holed_data(tmp_path)
    market = CsvMarket(data)
    times = candle_times(market)
    m5 = 5 * 60_000
    windows = [(HOLE[0], HOLE[1]), (HOLE[0] - m5 + 1, HOLE[1]), (HOLE[0], HOLE[1] + 1),
               (HOLE[0] - m5, HOLE[1]), (HOLE[0] + DAY, HOLE[1] + m5),
               (market.end_ms, market.end_ms + DAY), (market.start_ms - DAY, market.start_ms)]
    for n, (a, b) in enumerate(windows):
        as_test = "test" in (why_skipped(times, Fold(0, a - DAY, a, b)) or "")
        as_training = "training" in (why_skipped(times, Fold(0, a, b, b + DAY)) or "")
        try:
            run_backtest(CFG, market, tmp_path / f"w{n}.db", start_ms=a, end_ms=b)
            refused = False
        except ValueError as exc:
            assert "no candles to backtest" in str(exc)
            refused = True
        assert as_test == as_training == refused, (n, a, b)
        assert refused == (n in (0, 1, 5, 6)), (n, a, b)


@needs_data
def test_cli_walkforward_over_holes_only_fails_clearly(tmp_path):
    data = holed_data(tmp_path)
    grid = write(tmp_path, "[exits]\ntrailing_stop_pct = [0.3, 0.5]\n")
    base = ["walkforward", "--data", str(data), "--grid", str(grid), "--workers", "1"]
    r = CliRunner().invoke(cli.main, [*base, "--train", "3d", "--test", "2d", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert [s["fold"] for s in report["skipped_folds"]] == [4, 5]
    text = walkforward_text(report)  # the report without --json says so too
    assert "skipped fold 4 (" in text and ": no candles in its test window" in text
    r = CliRunner().invoke(cli.main, [*base, "--train", "1d", "--test", "1d",
                                      "--from", "2018-01-18", "--to", "2018-01-23"])
    assert r.exit_code == 2, r.output
    assert "no fold can run: all 4 have a training or test window without candles" in r.output
    assert "fold 1 (2018-01-19 00:00 .. 2018-01-20 00:00)" in r.output
