// ledgerbot dashboard: renders the JSON of /api/dashboard and /api/position/<id>.
// No libraries, nothing from the internet. Every value from the ledger is inserted as
// text (textContent), never as HTML.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";

// -- small helpers ---------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function num(x) {
  if (x === null || x === undefined || x === "") return null;
  const n = Number(x);
  return Number.isFinite(n) ? n : null;
}

function money(x, digits = 2) {
  const n = num(x);
  if (n === null) return "–";
  const sign = n < 0 ? "−" : "";
  const [whole, frac] = Math.abs(n).toFixed(digits).split(".");
  return sign + whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",") + (frac ? "." + frac : "");
}

function signed(x, digits = 2) {
  const n = num(x);
  if (n === null) return "–";
  return (n > 0 ? "+" : "") + money(n, digits);
}

function pct(x, digits = 2) {
  const n = num(x);
  return n === null ? "–" : n.toFixed(digits) + " %";
}

function plain(x) {
  return x === null || x === undefined || x === "" ? "–" : String(x);
}

function when(isoText) {
  if (!isoText) return "–";
  return String(isoText).replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function whenMs(ms) {
  return ms === null || ms === undefined ? "–" : when(new Date(ms).toISOString());
}

function ago(seconds) {
  const s = num(seconds);
  if (s === null) return "–";
  if (s < 120) return `${Math.round(s)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

function signClass(x) {
  const n = num(x);
  return n === null || n === 0 ? "num" : n > 0 ? "num pos" : "num neg";
}

function positionLink(id) {
  return el("a", {href: "/position/" + encodeURIComponent(id), class: "story-link"}, id);
}

// columns: [{label, value: row => text|Node, cls: row => class, num: bool}]
function table(columns, rows, empty, rowClass) {
  if (!rows || rows.length === 0) return el("div", {class: "empty"}, empty);
  const head = el("tr", {}, columns.map(c => el("th", {class: c.num ? "num" : null}, c.label)));
  const body = rows.map(row => el("tr", {class: rowClass ? rowClass(row) : null},
    columns.map(c => el("td", {class: c.cls ? c.cls(row) : (c.num ? "num" : null)},
                        c.value(row)))));
  return el("div", {class: "table-wrap"}, el("table", {}, el("thead", {}, head),
                                              el("tbody", {}, body)));
}

function put(id, node) {
  const target = document.getElementById(id);
  if (target) target.replaceChildren(node);
}

function card(label, value, sub, meter, id) {
  return el("div", {class: "card", id: id},
    el("div", {class: "label"}, label),
    el("div", {class: "value"}, value),
    sub ? el("div", {class: "sub"}, sub) : null,
    meter || null);
}

function meter(fraction) {
  const f = Math.max(0, Math.min(1, fraction || 0));
  const cls = f >= 1 ? "meter bad" : f >= 0.6 ? "meter warn" : "meter";
  const bar = el("span");
  bar.style.width = `${(f * 100).toFixed(1)}%`;  // CSSOM: allowed by the page's CSP
  return el("div", {class: cls, title: `${Math.round(f * 100)} % of the limit`}, bar);
}

function banner(kind, text) {
  return el("div", {class: "banner " + kind, role: "status"}, text);
}

async function getJSON(url) {
  const response = await fetch(url, {cache: "no-store", credentials: "same-origin"});
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

// -- charts (inline SVG) ---------------------------------------------------------------

const H = 230, PAD = {l: 70, r: 14, t: 12, b: 26};
const EQUITY_W = 720, DAILY_W = 470;  // about their panels' widths: text stays readable

function niceTicks(lo, hi, count) {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw) || raw;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(v);
  return ticks;
}

function equityChart(equity) {
  const W = EQUITY_W;
  const points = (equity && equity.points) || [];
  if (points.length < 2) return el("div", {class: "empty"}, "No balance snapshots yet.");
  const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
  const peak = num(equity.peak);
  let lo = Math.min(...ys), hi = Math.max(...ys, peak === null ? -Infinity : peak);
  const pad = (hi - lo) * 0.06 || Math.abs(hi) * 0.01 || 1;
  lo -= pad; hi += pad;
  const x0 = xs[0], x1 = xs[xs.length - 1] === x0 ? x0 + 1 : xs[xs.length - 1];
  const X = t => PAD.l + (t - x0) / (x1 - x0) * (W - PAD.l - PAD.r);
  const Y = v => PAD.t + (hi - v) / (hi - lo) * (H - PAD.t - PAD.b);
  const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", id: "equity-svg",
                           "data-points": String(points.length),
                           "aria-label": `equity curve, ${points.length} points`});
  for (const v of niceTicks(lo, hi, 4)) {
    root.append(svg("line", {class: "grid", x1: PAD.l, x2: W - PAD.r, y1: Y(v), y2: Y(v)}));
    root.append(svg("text", {x: PAD.l - 6, y: Y(v) + 4, "text-anchor": "end"}, money(v, 0)));
  }
  root.append(svg("line", {class: "axis", x1: PAD.l, x2: PAD.l, y1: PAD.t, y2: H - PAD.b}));
  root.append(svg("line", {class: "axis", x1: PAD.l, x2: W - PAD.r, y1: H - PAD.b,
                           y2: H - PAD.b}));
  const line = points.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`)
    .join(" ");
  root.append(svg("path", {class: "equity-area",
                           d: `${line} L${X(x1).toFixed(1)},${H - PAD.b} L${PAD.l},${H - PAD.b} Z`}));
  if (peak !== null) {
    root.append(svg("line", {class: "peak-line", x1: PAD.l, x2: W - PAD.r, y1: Y(peak),
                             y2: Y(peak)}, svg("title", {}, `peak ${money(peak)}`)));
  }
  root.append(svg("path", {class: "equity-line", d: line}));
  const last = points[points.length - 1];
  root.append(svg("circle", {cx: X(last[0]), cy: Y(last[1]), r: 3.5, fill: "#1f5fa8"},
                  svg("title", {}, `${whenMs(last[0])}: ${money(last[1])}`)));
  const labels = [[x0, "start"], [(x0 + x1) / 2, "middle"], [x1, "end"]];
  for (const [t, where] of labels) {
    const anchor = where === "start" ? "start" : where === "end" ? "end" : "middle";
    root.append(svg("text", {x: X(t), y: H - 8, "text-anchor": anchor},
                    whenMs(t).slice(0, 16).replace("Z", "")));
  }
  return root;
}

function dailyChart(days) {
  const W = DAILY_W;
  if (!days || days.length === 0) return el("div", {class: "empty"}, "No closed trades yet.");
  const shown = days.slice(-60);
  const values = shown.map(d => num(d.realized_pnl) || 0);
  const hi = Math.max(0, ...values), lo = Math.min(0, ...values);
  const span = hi - lo || 1;
  const Y = v => PAD.t + (hi - v) / span * (H - PAD.t - PAD.b);
  const slot = (W - PAD.l - PAD.r) / shown.length;
  const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", id: "daily-svg",
                           "data-bars": String(shown.length),
                           "aria-label": `daily realized P&L, ${shown.length} days`});
  for (const v of niceTicks(lo, hi, 4)) {
    root.append(svg("line", {class: "grid", x1: PAD.l, x2: W - PAD.r, y1: Y(v), y2: Y(v)}));
    root.append(svg("text", {x: PAD.l - 6, y: Y(v) + 4, "text-anchor": "end"}, money(v, 0)));
  }
  shown.forEach((d, i) => {
    const v = values[i];
    const top = Math.min(Y(v), Y(0)), height = Math.max(1, Math.abs(Y(v) - Y(0)));
    const width = Math.min(48, Math.max(2, slot * 0.7));
    root.append(svg("rect", {class: "bar " + (v >= 0 ? "pos" : "neg"),
                             x: PAD.l + i * slot + (slot - width) / 2, y: top, width, height},
                    svg("title", {}, `${d.day}: ${signed(v)} (${d.trades} trades, ` +
                                     `${d.wins} won)`)));
  });
  root.append(svg("line", {class: "zero", x1: PAD.l, x2: W - PAD.r, y1: Y(0), y2: Y(0)}));
  root.append(svg("text", {x: PAD.l, y: H - 8}, shown[0].day));
  if (shown.length > 1) {
    root.append(svg("text", {x: W - PAD.r, y: H - 8, "text-anchor": "end"},
                    shown[shown.length - 1].day));
  }
  return root;
}

// -- the dashboard page ----------------------------------------------------------------

function renderSummary(s, jobs) {
  document.getElementById("mode").textContent =
    `${s.mode} on ${s.exchange} · ${s.ledger} · seq ${s.last_seq}`;
  const statePill = document.getElementById("state-pill");
  statePill.textContent = s.halted ? "HALTED" : "trading";
  statePill.className = "pill " + (s.halted ? "bad" : "good");
  const stale = jobs.filter(j => j.stale).map(j => j.job);
  const failing = jobs.filter(j => j.failing).map(j => j.job);
  const healthPill = document.getElementById("health-pill");
  healthPill.textContent = [stale.length ? `stale: ${stale.join(", ")}` : "",
                            failing.length ? `failing: ${failing.join(", ")}` : ""]
    .filter(Boolean).join(" · ") || "jobs healthy";
  healthPill.className = "pill " + (stale.length || failing.length ? "bad" : "good");
  document.getElementById("updated").textContent = `as of ${when(s.now_iso)}`;

  const banners = [];
  if (s.empty) {
    banners.push(banner("info", "Nothing recorded yet: this ledger is empty. The bot writes " +
                                "here once it runs (cli.py run)."));
  }
  for (const h of s.halts) {
    banners.push(banner("bad", `Halted (${h.kind}) since ${when(h.since)}: ${h.reason}`));
  }
  if (s.unresolved_orders > 0) {
    banners.push(banner("warn", `${s.unresolved_orders} order(s) await their outcome; ` +
                                "reconciliation resolves them."));
  }
  document.getElementById("banners").replaceChildren(...banners);

  const ddFraction = num(s.drawdown_pct) !== null ? num(s.drawdown_pct) / s.max_drawdown_pct : 0;
  const limit = num(s.daily_loss_limit);
  const realized = num(s.realized_today);
  const lossFraction = limit && realized !== null && realized < 0 ? realized / limit : 0;
  document.getElementById("cards").replaceChildren(
    card("Equity", money(s.equity), `peak ${money(s.equity_peak)}`, null, "card-equity"),
    card("Drawdown", pct(s.drawdown_pct), `limit ${pct(s.max_drawdown_pct, 1)} from the peak`,
         meter(ddFraction), "card-drawdown"),
    card("Realized today", signed(s.realized_today),
         limit !== null ? `daily loss limit ${money(limit)} (${pct(s.daily_loss_limit_pct, 1)}` +
                          ` of day-start equity); equity vs day start ` +
                          `${num(s.daily_loss_pct) === null ? "–" : signed(-num(s.daily_loss_pct)) + " %"}`
                        : `daily loss limit ${pct(s.daily_loss_limit_pct, 1)} (no day closed yet)`,
         meter(lossFraction), "card-today"),
    card("Unrealized", signed(s.unrealized_pnl),
         `${s.open_positions} open position(s) · fees today ${money(s.fees_today)}`, null,
         "card-unrealized"),
    card("Active coins", String(s.active_coins.length),
         s.active_coins.map(c => c.split("/")[0]).join(" ") || "none yet", null, "card-coins"));
}

function renderPositions(rows) {
  put("positions", table([
    {label: "Symbol", value: r => r.symbol},
    {label: "Side", value: r => el("span", {class: "tag " + r.side}, r.side)},
    {label: "Size", value: r => plain(r.amount), num: true},
    {label: "Entry", value: r => plain(r.entry_price), num: true},
    {label: "Mark", value: r => el("span", {title: `last close decided on, ${when(r.mark_at)}`},
                                   plain(r.mark_price)), num: true},
    {label: "Unrealized", value: r => signed(r.unrealized_pnl), cls: r => signClass(r.unrealized_pnl)},
    {label: "Stop", value: r => plain(r.stop_price), num: true},
    {label: "Trailing", value: r => r.trailing_active
      ? el("span", {class: "tag on"}, `on · best ${r.best_price}` +
                                      (r.trail_pct ? ` · ${r.trail_pct} %` : ""))
      : el("span", {class: "muted"}, `off · best ${plain(r.best_price)}`)},
    {label: "Opened", value: r => when(r.opened_at)},
    {label: "Story", value: r => positionLink(r.position_id)},
  ], rows, "No open positions."));
}

function renderTrades(rows) {
  put("trades", table([
    {label: "Closed", value: r => when(r.closed_at)},
    {label: "Symbol", value: r => r.symbol},
    {label: "Side", value: r => el("span", {class: "tag " + r.side}, r.side)},
    {label: "Size", value: r => plain(r.amount), num: true},
    {label: "Entry", value: r => plain(r.entry_price), num: true},
    {label: "Exit", value: r => plain(r.exit_price), num: true},
    {label: "Fees", value: r => money(r.fees, 4), num: true},
    {label: "Realized", value: r => signed(r.realized_pnl), cls: r => signClass(r.realized_pnl)},
    {label: "Exit reason", value: r => plain(r.exit_reason)},
    {label: "Held", value: r => ago(r.duration_s)},
    {label: "Story", value: r => positionLink(r.position_id)},
  ], rows, "No closed trades yet.", () => "trade-row"));
}

function renderJobs(rows) {
  put("jobs", table([
    {label: "Job", value: r => r.job},
    {label: "Status", value: r => r.status},
    {label: "Last run", value: r => when(r.at)},
    {label: "Ago", value: r => ago(r.age_s), num: true},
    {label: "Every", value: r => ago(r.interval_s), num: true},
    {label: "Overdue", value: r => num(r.overdue_s) ? ago(r.overdue_s) : "–", num: true},
    {label: "Started late", value: r => num(r.start_delay_s) === null ? "–" : ago(r.start_delay_s),
     num: true},
    {label: "Duration", value: r => num(r.duration_ms) === null ? "–"
                                    : `${num(r.duration_ms).toFixed(1)} ms`, num: true},
    {label: "Outcome", value: r => plain(r.outcome) + (r.latest_outcome ? ` (then ${r.latest_outcome})` : ""),
     cls: r => r.outcome === "error" || r.outcome === "degraded" ? "neg" : null},
    {label: "Error", value: r => plain(r.error) + (r.failing_since ? ` (failing since ${when(r.failing_since)})` : ""),
     cls: () => "wrap"},
  ], rows, "No job has run yet.", r => "job-row " + (r.stale || r.failing ? "stale" : r.status === "late" ? "late" : "ok")));
}

function renderRisk(rows) {
  put("risk", table([
    {label: "Time", value: r => when(r.time)},
    {label: "Event", value: r => r.type === "risk_decision" ? "entry refused" : r.type},
    {label: "Coin", value: r => r.symbol ? el("span", {title: r.symbol}, r.symbol.split("/")[0])
                                         : "–"},
    {label: "Reason", cls: () => "wrap", value: r => [
      el("strong", {}, plain(r.reason)),
      r.detail && r.detail !== r.reason ? el("div", {class: "muted"}, r.detail) : null]},
  ], rows, "No risk events."));
}

function renderReconciliations(rows) {
  put("reconciliations", table([
    {label: "Time", value: r => when(r.time)},
    {label: "Status", value: r => r.status + (r.dry_run ? " (dry run)" : ""),
     cls: r => r.status === "in_sync" ? null : "neg"},
    {label: "Differences", cls: () => "wrap", value: r => r.differences.length === 0 ? "none"
      : el("ul", {}, r.differences.map(d => el("li", {},
          `${d.kind}${d.symbol ? " " + d.symbol : ""}: ${d.detail}` +
          (d.correction ? ` → ${d.correction}` : ""))))},
  ], rows, "No reconciliation has found a difference."));
}

let refreshTimer = null;

async function refreshDashboard() {
  clearTimeout(refreshTimer);
  let delay = 10;
  try {
    const data = await getJSON("/api/dashboard");
    delay = data.summary.refresh_s || delay;
    renderSummary(data.summary, data.jobs);
    put("equity-chart", equityChart(data.equity));
    document.getElementById("equity-note").textContent = data.equity.total_points
      ? `(${data.equity.total_points} snapshots; dashed: the peak drawdown is measured from)` : "";
    put("daily-chart", dailyChart(data.daily));
    renderPositions(data.positions);
    renderTrades(data.trades);
    renderJobs(data.jobs);
    renderRisk(data.risk_events);
    renderReconciliations(data.reconciliations);
    document.body.dataset.loaded = "yes";
  } catch (error) {
    document.getElementById("banners").replaceChildren(
      banner("bad", `Cannot read the dashboard (${error.message}); retrying…`));
  }
  refreshTimer = setTimeout(refreshDashboard, delay * 1000);
}

// -- the position page -----------------------------------------------------------------

async function showPosition() {
  const id = decodeURIComponent(location.pathname.replace(/^\/position\//, ""));
  document.getElementById("position-title").textContent = id;
  let story;
  try {
    story = await getJSON("/api/position/" + encodeURIComponent(id));
  } catch (error) {
    document.getElementById("banners").replaceChildren(banner("bad", error.message));
    return;
  }
  const p = story.position;
  document.title = `${p.symbol} ${p.side || ""} · ledgerbot`;
  document.getElementById("position-cards").replaceChildren(
    card("Position", `${p.symbol}`, `${p.side || ""} · ${p.status}`, null, "card-position"),
    card("Size", plain(p.amount), `entry ${plain(p.entry_price)}`),
    p.status === "closed"
      ? card("Realized", signed(p.realized_pnl), `exit ${plain(p.exit_price)} · ` +
                                                 `${plain(p.exit_reason)} · fees ${money(p.fees, 4)}`)
      : card("Stop", plain(p.stop_price), `best ${plain(p.best_price)}`),
    card("Opened", when(p.opened_at), p.closed_at ? `closed ${when(p.closed_at)}` : "still open"));
  put("story", table([
    {label: "Seq", value: r => String(r.seq), num: true},
    {label: "Time", value: r => when(r.time)},
    {label: "Fact", value: r => r.type},
    {label: "Side", value: r => plain(r.side)},
    {label: "Amount", value: r => plain(r.amount), num: true},
    {label: "Price", value: r => plain(r.price), num: true},
    {label: "Fee", value: r => plain(r.fee), num: true},
    {label: "PnL", value: r => plain(r.pnl), cls: r => signClass(r.pnl)},
    {label: "Client order id", value: r => plain(r.client_order_id)},
    {label: "Reason", value: r => plain(r.reason), cls: () => "wrap"},
    {label: "Run", value: r => plain(r.run_id)},
    {label: "Data", value: r => el("details", {}, el("summary", {}, "data"),
                                   el("pre", {}, JSON.stringify(r.data, null, 1)))},
  ], story.rows, "No rows.", r => "story-row t-" + r.type));
  document.body.dataset.loaded = "yes";
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page === "position") showPosition();
  else refreshDashboard();
});
