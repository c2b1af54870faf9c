"""Backtest results for people: metrics, a text summary, JSON, and an equity chart.

Everything here is computed from a ``BacktestResult``: the equity at every step (the
account's equity as the simulated exchange reports it, marked at the venue's price)
and the ledger's ``closed_trades`` view. Floats are fine in a report.

Definitions:

* total return - final equity / starting equity - 1 (open positions marked to market);
* max drawdown - the largest fall from a running equity peak, as a fraction of it;
* daily Sharpe / Sortino - from the returns of the equity at the end of each UTC day
  (the ledger's ``day_close``: before the midnight step's orders; the window's last day
  at the final equity; the first day measured from the starting equity), annualised
  with sqrt(365) (crypto
  trades every day); Sortino divides by the downside deviation (root mean square of the
  negative daily returns). None with fewer than two days;
* profit factor - gross profit / gross loss of the closed trades (None without losses);
* exposure - share of steps with at least one open position;
* fees - every fill's fee, entries and exits.

The chart (``write_chart``) is one self-contained HTML file with inline SVG: equity on
top, drawdown below; no script, no dependency.
"""

from __future__ import annotations

import html
import math
import os
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from core.clock import DAY_MS, utc_day

CHART_POINTS = 1500  # per series: buckets keep each bucket's minimum and maximum


def _f(value: Any) -> float:
    return float(value) if value is not None else 0.0


def when_utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")


def drawdowns(equity: np.ndarray, start: float) -> np.ndarray:
    """Fall from the running peak (including the start) at each step, as a fraction."""
    peak = np.maximum.accumulate(np.r_[start, equity])[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(peak > 0, (peak - equity) / peak, 0.0)


def daily_returns(times: np.ndarray, equity: np.ndarray, start: float,
                  day_closes: dict[str, float] | None = None) -> np.ndarray:
    """Returns of each UTC day's closing equity, the first from ``start``.

    ``times`` are candle closes: the one at midnight closes the day before. A day's close
    is the ledger's ``day_close`` equity where it has one (``day_closes``, by day): that
    is the balance before the midnight step's orders, whose fees belong to the new day.
    The window's last day closes at the final equity, as the total return does (open
    positions at the window's last closes: the venue's balance at that instant values
    them at the next candle's open, after the window)."""
    if not len(times):
        return np.array([])
    day = (times - 1) // DAY_MS
    last = np.flatnonzero(np.r_[day[1:] != day[:-1], True])
    recorded = day_closes or {}
    closes = [recorded.get(utc_day(int(day[i]) * DAY_MS), float(equity[i])) for i in last[:-1]]
    closes = np.r_[start, closes, float(equity[-1])]
    return closes[1:] / closes[:-1] - 1


def sharpe_sortino(returns: np.ndarray) -> tuple[float | None, float | None]:
    if len(returns) < 2:
        return None, None
    mean, sd = float(returns.mean()), float(returns.std(ddof=1))
    down = float(np.sqrt(np.mean(np.minimum(returns, 0.0) ** 2)))
    scale = math.sqrt(365)
    sharpe = mean / sd * scale if sd > 0 else None
    sortino = mean / down * scale if down > 0 else None
    return sharpe, sortino


def metrics(result) -> dict[str, Any]:
    """The summary as one JSON-ready dict (fractions, not percent)."""
    eq, start = result.equity, result.start_equity
    end = float(eq[-1]) if len(eq) else start
    dd = drawdowns(eq, start)
    sharpe, sortino = sharpe_sortino(daily_returns(result.times, eq, start, result.day_closes))
    pnls = [_f(t["realized_pnl"]) for t in result.trades]
    wins = [p for p in pnls if p > 0]
    losses = [p for p in pnls if p < 0]
    durations = [_f(t["duration_s"]) for t in result.trades]
    first = int(result.times[0]) if len(result.times) else None
    last = int(result.times[-1]) if len(result.times) else None
    return {
        "strategy": result.strategy,
        "params": result.params,
        "symbols": len(result.symbols),
        "first_decision": when_utc(first) if first is not None else None,
        "last_decision": when_utc(last) if last is not None else None,
        "steps": len(eq),
        "start_equity": start,
        "end_equity": end,
        "total_return": end / start - 1 if start else 0.0,
        "max_drawdown": float(dd.max()) if len(dd) else 0.0,
        "sharpe": sharpe,
        "sortino": sortino,
        "total_trades": len(pnls),
        "wins": len(wins),
        "win_rate": len(wins) / len(pnls) if pnls else None,
        "profit_factor": sum(wins) / -sum(losses) if losses else None,
        "realized_pnl": sum(pnls),
        "avg_trade_pnl": sum(pnls) / len(pnls) if pnls else None,
        "best_trade": max(pnls, default=None),
        "worst_trade": min(pnls, default=None),
        "avg_duration_s": sum(durations) / len(durations) if durations else None,
        "exposure": float((result.open_positions > 0).mean()) if len(eq) else 0.0,
        "avg_open_positions": float(result.open_positions.mean()) if len(eq) else 0.0,
        "fees": result.fees,
        # of which in the closed trades (the per-symbol table); the rest paid to open the
        # positions still open at the end
        "fees_closed_trades": sum(_f(t["fees"]) for t in result.trades),
        "exit_reasons": dict(Counter(t["exit_reason"] for t in result.trades).most_common()),
        "open_at_end": len(result.still_open),
        "stale_marks": result.stale_marks,
        "per_symbol": per_symbol(result.trades),
        "ledger": result.db_path,
        "facts": result.facts,
        "elapsed_s": round(result.elapsed_s, 4),
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
    }


def per_symbol(trades: list[dict]) -> list[dict]:
    rows: dict[str, dict] = defaultdict(lambda: {"trades": 0, "wins": 0, "pnl": 0.0,
                                                 "fees": 0.0, "duration_s": 0.0})
    for t in trades:
        r = rows[t["symbol"]]
        r["trades"] += 1
        r["wins"] += _f(t["realized_pnl"]) > 0
        r["pnl"] += _f(t["realized_pnl"])
        r["fees"] += _f(t["fees"])
        r["duration_s"] += _f(t["duration_s"])
    out = []
    for symbol, r in sorted(rows.items(), key=lambda kv: -kv[1]["pnl"]):
        out.append({"symbol": symbol, "trades": r["trades"], "wins": r["wins"],
                    "win_rate": r["wins"] / r["trades"], "pnl": r["pnl"], "fees": r["fees"],
                    "avg_duration_min": r["duration_s"] / r["trades"] / 60})
    return out


def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x * 100:.{digits}f} %"


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _profit_factor(m: dict[str, Any]) -> str:
    # None means two things: no trade (nothing to say) or no losing trade (unbounded)
    return "- (no losing trade)" if m["profit_factor"] is None and m["wins"] else \
        _num(m["profit_factor"])


def summary_text(m: dict[str, Any], quote: str = "USDT") -> str:
    """The human summary and per-symbol table."""
    from tabulate import tabulate

    reasons = ", ".join(f"{k} {v}" for k, v in m["exit_reasons"].items()) or "-"
    plural = "" if m["symbols"] == 1 else "s"
    lines = [
        f"backtest      {m['strategy']} on {m['symbols']} symbol{plural}, decisions "
        f"{m['first_decision']} .. {m['last_decision']} UTC ({m['steps']:,} steps)",
        f"ledger        {m['ledger']} ({m['facts']:,} facts)",
        "",
        f"trades        {m['total_trades']:,}  (win rate {_pct(m['win_rate'], 1)}, profit "
        f"factor {_profit_factor(m)}, {m['open_at_end']} still open)",
        f"total return  {_pct(m['total_return'])}  ({_num(m['start_equity'])} -> "
        f"{_num(m['end_equity'])} {quote})",
        f"max drawdown  {_pct(m['max_drawdown'])}",
        f"sharpe        {_num(m['sharpe'])} daily, annualised (sortino {_num(m['sortino'])})",
        f"exposure      {_pct(m['exposure'], 1)} of the time (avg "
        f"{m['avg_open_positions']:.2f} positions open)",
        f"fees          {_num(m['fees'], 4)} {quote}" + (
            f"  ({_num(m['fees_closed_trades'], 4)} in the closed trades below, "
            f"{_num(m['fees'] - m['fees_closed_trades'], 4)} opening the "
            f"{m['open_at_end']} still open)" if m["open_at_end"] else ""),
        f"exits         {reasons}",
        *(f"stale mark    {s['symbol']} still open, valued at its last close, {s['valued_at']}"
          " (it has no candle at the window's end)" for s in m.get("stale_marks", ())),
        f"elapsed       {m['elapsed_s']:.3f} s",
    ]
    if m["per_symbol"]:
        rows = [{"symbol": r["symbol"], "trades": r["trades"], "win %": f"{r['win_rate'] * 100:.1f}",
                 f"pnl {quote}": f"{r['pnl']:.4f}", f"fees {quote}": f"{r['fees']:.4f}",
                 "avg min": f"{r['avg_duration_min']:.0f}"} for r in m["per_symbol"]]
        lines += ["", "closed trades by symbol:",
                  tabulate(rows, headers="keys", tablefmt="simple", disable_numparse=True)]
    return "\n".join(lines)


# -- the chart ---------------------------------------------------------------------------


def _buckets(x: np.ndarray, y: np.ndarray, points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ~2*points points keeping each bucket's min and max (spikes survive)."""
    n = len(x)
    if n <= 2 * points:
        return x, y
    edges = np.linspace(0, n, points + 1).astype(int)
    xs, ys = [], []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        seg = y[a:b]
        i, j = a + int(seg.argmin()), a + int(seg.argmax())
        for k in sorted({i, j}):
            xs.append(x[k])
            ys.append(y[k])
    return np.array(xs), np.array(ys)


def _path(x: np.ndarray, y: np.ndarray, box: tuple[float, float, float, float],
          xr: tuple[float, float], yr: tuple[float, float]) -> str:
    left, top, width, height = box
    sx = width / (xr[1] - xr[0] or 1)
    sy = height / (yr[1] - yr[0] or 1)
    px = left + (x - xr[0]) * sx
    py = top + height - (y - yr[0]) * sy
    return "M" + " L".join(f"{a:.1f},{b:.1f}" for a, b in zip(px, py, strict=True))


def chart_html(result, m: dict[str, Any], quote: str = "USDT") -> str:
    """The equity and drawdown chart as a self-contained HTML page."""
    t = result.times.astype(float)
    eq = result.equity.astype(float)
    dd = -drawdowns(result.equity, result.start_equity) * 100
    W, H, L, R = 960, 560, 70, 20
    top_box = (L, 40, W - L - R, 300)
    low_box = (L, 380, W - L - R, 130)
    xr = (float(t[0]), float(t[-1])) if len(t) else (0.0, 1.0)
    ex, ey = _buckets(t, eq, CHART_POINTS)
    dx, dy = _buckets(t, dd, CHART_POINTS)
    lo, hi = float(np.nanmin(eq)), float(np.nanmax(eq))
    pad = (hi - lo) * 0.05 or abs(hi) * 0.01 or 1.0
    er = (lo - pad, hi + pad)
    dr = (min(float(np.nanmin(dd)) * 1.05, -0.01), 0.0)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>']

    def axes(box, yr, ticks_fmt, label):
        left, top, width, height = box
        out = [f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" '
               f'stroke="#999"/>',
               f'<text x="{left}" y="{top - 8}" font-weight="bold">{html.escape(label)}</text>']
        for i in range(5):
            v = yr[0] + (yr[1] - yr[0]) * i / 4
            y = top + height - height * i / 4
            out.append(f'<line x1="{left}" x2="{left + width}" y1="{y:.1f}" y2="{y:.1f}" '
                       f'stroke="#eee"/>')
            out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                       f'{html.escape(ticks_fmt(v))}</text>')
        return out

    parts += axes(top_box, er, lambda v: f"{v:,.2f}", f"Equity ({quote})")
    parts += axes(low_box, dr, lambda v: f"{v:.1f} %", "Drawdown")
    days = (xr[1] - xr[0]) / DAY_MS
    for i in range(6):
        ms = xr[0] + (xr[1] - xr[0]) * i / 5
        x = L + (W - L - R) * i / 5
        label = when_utc(int(ms))[:10] if days >= DATES_ONLY_DAYS else when_utc(int(ms))
        anchor = "start" if i == 0 else "end" if i == 5 else "middle"
        parts.append(f'<text x="{x:.1f}" y="{low_box[1] + low_box[3] + 18}" '
                     f'text-anchor="{anchor}">{label}</text>')
    start_y = top_box[1] + top_box[3] - (result.start_equity - er[0]) * top_box[3] / (
        er[1] - er[0])
    parts.append(f'<line x1="{L}" x2="{W - R}" y1="{start_y:.1f}" y2="{start_y:.1f}" '
                 f'stroke="#bbb" stroke-dasharray="4 3"/>')
    if len(ex):
        parts.append(f'<path d="{_path(ex, ey, top_box, xr, er)}" fill="none" '
                     f'stroke="#1f6feb" stroke-width="1.3"/>')
    if len(dx):
        base = low_box[1]
        area = _path(dx, dy, low_box, xr, dr)
        parts.append(f'<path d="{area} L{L + low_box[2]:.1f},{base} L{L},{base} Z" '
                     f'fill="#f85149" fill-opacity="0.35" stroke="#d1242f" stroke-width="1"/>')
    parts.append("</svg>")
    title = (f"{m['strategy']}: {_pct(m['total_return'])} return, {_pct(m['max_drawdown'])} "
             f"max drawdown, {m['total_trades']} trades")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title></head>\n<body style=\"margin:16px\">"
            f"<h3 style=\"font-family:sans-serif\">{html.escape(title)}</h3>\n"
            + "".join(parts) + "\n</body></html>\n")


CHART_SUFFIXES = (".png", ".html", ".htm", ".svg")
DATES_ONLY_DAYS = 3  # a chart spanning fewer days labels its time axis with the time too


def check_chart_path(path: str | Path) -> Path:
    """The chart's path, or ValueError naming the formats (checked before a run)."""
    p = Path(path)
    if p.suffix.lower() not in CHART_SUFFIXES:
        raise ValueError(f"--plot {p}: write the chart as .png, .html or .svg "
                         f"(not {p.suffix or 'no suffix'!r})")
    try:
        folder = p.resolve().parent  # through a symlink: the chart is written where it points
    except RuntimeError as exc:  # a symlink loop
        raise ValueError(f"--plot {p}: {exc}") from None
    if p.is_dir():
        raise ValueError(f"--plot {p}: is a folder")
    if p.is_file() and _is_sqlite(p):
        raise ValueError(f"--plot {p}: is an SQLite database (a ledger?); refusing to "
                         "overwrite it with a chart")
    if not folder.is_dir():
        raise ValueError(f"--plot {p}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--plot {p}: folder {folder} is not writable")
    return p


def _is_sqlite(p: Path) -> bool:
    from ledger.store import SQLITE_HEADER

    try:
        with p.open("rb") as f:
            return f.read(16) == SQLITE_HEADER
    except OSError:
        return False


def write_chart(path: str | Path, result, m: dict[str, Any], quote: str = "USDT") -> None:
    """Write the chart: ``.png`` an image, ``.svg`` the bare SVG, ``.html`` the page (to a
    path ``check_chart_path`` accepted before the run)."""
    p = Path(path)
    if p.suffix.lower() == ".png":
        png_chart(p, result, m, quote)
        return
    page = chart_html(result, m, quote)
    if p.suffix.lower() == ".svg":
        page = page[page.index("<svg"):page.index("</svg>") + 6] + "\n"
    p.write_text(page, encoding="utf-8")


def png_chart(path: Path, result, m: dict[str, Any], quote: str = "USDT") -> None:
    """The equity and drawdown chart as a PNG (matplotlib, imported only for this)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    when = (result.times.astype("int64")).astype("datetime64[ms]")
    dd = -drawdowns(result.equity, result.start_equity) * 100
    fig, (top, low) = plt.subplots(2, 1, figsize=(9.6, 5.6), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1.3]})
    try:
        top.plot(when, result.equity, color="#1f6feb", lw=1.2)
        top.axhline(result.start_equity, color="#bbb", ls="--", lw=1)
        top.set_ylabel(f"Equity ({quote})")
        top.set_title(f"{m['strategy']}: {_pct(m['total_return'])} return, "
                      f"{_pct(m['max_drawdown'])} max drawdown, {m['total_trades']} trades",
                      fontsize=11)
        low.fill_between(when, dd, 0, color="#f85149", alpha=0.35, lw=0)
        low.plot(when, dd, color="#d1242f", lw=0.8)
        low.set_ylabel("Drawdown %")
        days = (int(result.times[-1]) - int(result.times[0])) / DAY_MS if len(when) else 0
        low.xaxis.set_major_formatter(mdates.DateFormatter(
            "%Y-%m-%d" if days >= DATES_ONLY_DAYS else "%Y-%m-%d %H:%M"))
        for ax in (top, low):
            ax.grid(color="#eee")
        fig.autofmt_xdate()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


__all__ = ["metrics", "summary_text", "chart_html", "write_chart", "check_chart_path", "drawdowns",
           "daily_returns", "sharpe_sortino", "per_symbol"]
