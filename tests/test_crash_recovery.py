"""Crash recovery, proven on the real service.

`cli.py run` runs as a subprocess on the simulated exchange, whose state persists in its
own file (the exchange outlives the bot), with network faults injected and a test
strategy that trades on nearly every candle. It is killed with SIGKILL over and over:

* by the test, at a random moment of its life;
* by itself, through the sim's test-only faults: ``crash_before_accept`` (the intent and
  the submission are committed, the order never reaches the book) and
  ``crash_after_accept`` (the exchange has the order, the bot never records the ack);

and started again each time. At the end, after `cli.py reconcile` (with faults off):

* no client order id reached the exchange twice, and each has exactly one intent;
* every intent is resolved, and every open position has its stop resting;
* no duplicate position: opens and closes alternate per symbol;
* every position and every fill on the exchange is in the ledger;
* the ledger verifies;
* the folded state's positions (symbol, side, amount) equal the exchange's.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections import Counter, defaultdict
from decimal import Decimal

import pytest
from service_helpers import REPO, Bot, read_db, write_toml

from ledger import Ledger

SEED = int(os.environ.get("CRASH_TEST_SEED", "5"))  # another seed, another run of kills
MIN_KILLS = 40  # the issue asks for at least 30
MAX_LIVES = 80
CRASH_LINE = re.compile(r"sim: injected (crash_before_accept|crash_after_accept)")

SECTIONS = {
    "strategy": {"module": str(REPO / "tests" / "crashy_strategy.py"), "name": "churn",
                 "timeframe": "1m", "candles": 30},
    "exits": {"stop_loss_pct": 0.4, "trailing_activation_pct": 0.2, "trailing_stop_pct": 0.1,
              "stop_move_interval_s": 0},
    "risk": {"max_open_positions": 4, "cooldown_minutes": 0, "correlation_max": 1.0,
             "daily_loss_limit_pct": 100.0, "max_drawdown_pct": 100.0, "trade_fraction": 0.5},
    "rotation": {"top_n": 4},
    "schedule": {"scan_interval_s": 20, "reconcile_interval_s": 120},
    "sim": {"symbols": 6, "speed": 300.0, "seed": 7},
    "faults": {"network_error": 0.02, "timeout_after_accept": 0.03, "server_error": 0.02,
               "rate_limit": 0.01, "crash_before_accept": 0.04, "crash_after_accept": 0.04},
}


def life(bot: Bot, rng: random.Random, n: int) -> str:
    """Start the service once; SIGKILL it at a random moment unless it kills itself
    first. Returns how it died."""
    sections = json.loads(json.dumps(SECTIONS))
    # Each life draws another fault stream (the exchange keeps the market it started with).
    sections["sim"]["seed"] = 1000 + n
    write_toml(bot.folder, sections)
    bot.start()
    try:
        bot.proc.wait(rng.uniform(0.5, 4.0))
        died = "injected"
    except Exception:  # noqa: BLE001 - still alive: kill it now
        bot.proc.kill()
        bot.proc.wait(30)
        died = "test"
    console = bot.console()
    assert bot.proc.returncode == -9, f"life {n} ended with {bot.proc.returncode}:\n" \
        f"{console[-4000:]}"
    assert "Traceback" not in console, console
    injected = CRASH_LINE.findall(console)
    if died == "injected":
        assert injected, f"life {n} died by itself without an injected crash:\n{console[-3000:]}"
        return injected[-1]
    return "random"


CRASH_CODE = """
import sys
from core.clock import VirtualClock
from core.config import Config
from core.sim_exchange import SimExchange
state, fault = sys.argv[1], sys.argv[2]
cfg = Config().with_values(sim={"symbols": 2})
venue = SimExchange.from_config(cfg, VirtualClock(1_767_268_800_000), state_path=state,
                                origin_ms=1_767_268_800_000 - 3 * 86_400_000)
symbol = venue.symbols[0]
qty = venue.amount_to_precision(symbol, 500 / venue.fetch_ticker(symbol)["last"])
venue.faults.script([("create_order", fault)])
print("sending", flush=True)
venue.create_order(symbol, "market", "buy", qty, params={"clientOrderId": "t-1"})
print("survived", flush=True)
"""


@pytest.mark.parametrize(("fault", "on_book"), [("crash_before_accept", False),
                                                 ("crash_after_accept", True)])
def test_the_sim_crash_faults_kill_the_process_before_or_after_the_book(tmp_path, run_python,
                                                                         fault, on_book):
    state = tmp_path / "sim.db"
    out = run_python(CRASH_CODE, state, fault)
    assert out.returncode == -9, out.stderr
    assert "sending" in out.stdout and "survived" not in out.stdout
    assert f"injected {fault}" in out.stderr
    orders = read_db(state, "SELECT client_id, status FROM orders")
    trades = read_db(state, "SELECT id FROM trades")
    assert (orders, bool(trades)) == (([{"client_id": "t-1", "status": "FILLED"}], True)
                                      if on_book else ([], False))


@pytest.mark.slow
def test_sigkill_at_random_moments_and_inside_order_sends_loses_nothing(tmp_path):
    rng = random.Random(SEED)
    bot = Bot(tmp_path)
    kills: Counter[str] = Counter()
    t0 = time.monotonic()
    for n in range(MAX_LIVES):
        kills[life(bot, rng, n)] += 1
        if sum(kills.values()) >= MIN_KILLS and kills["crash_before_accept"] \
                and kills["crash_after_accept"]:
            break
    lives_s = time.monotonic() - t0
    assert sum(kills.values()) >= MIN_KILLS
    assert kills["crash_before_accept"] >= 1 and kills["crash_after_accept"] >= 1, kills
    assert kills["random"] >= 5, kills

    # The last word, with faults off. First reconciles on a fast clock, until a send that
    # died a moment ago is old enough (a minute) to be declared never placed. The clock
    # resumes where the state file left it, so each run adds only the simulated time it
    # takes itself: once 25 s (8 ms of wall time), and the send was still "ambiguous".
    # Then with the simulated clock all but frozen, so the exchange does not move between
    # the reconciliation and the checks: it corrects what the first left (a stop that
    # filled meanwhile), and a third finds nothing to do.
    final = json.loads(json.dumps(SECTIONS))
    final["faults"] = {}
    final["sim"]["speed"] = 3000.0
    write_toml(tmp_path, final)
    for _ in range(10):
        down = bot.cli("reconcile", "--json")
        assert down.returncode in (0, 1), down.stdout + down.stderr
        if "still ambiguous" not in down.stdout:
            break
    final["sim"]["speed"] = 0.001
    write_toml(tmp_path, final)
    first = bot.cli("reconcile", "--json")
    assert first.returncode in (0, 1), first.stdout + first.stderr
    again = bot.cli("reconcile", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert bot.cli("verify").returncode == 0

    sim_db = tmp_path / "sim_exchange.db"
    orders = read_db(sim_db, "SELECT id, algo, client_id, symbol, status, orig_type "
                             "FROM orders ORDER BY id")
    trades = read_db(sim_db, "SELECT id, symbol, side, qty FROM trades ORDER BY id")
    positions = read_db(sim_db, "SELECT symbol, amount FROM positions")
    intents = bot.query("SELECT client_order_id AS coid, count(*) AS n FROM facts "
                        "WHERE type = 'order_intent' GROUP BY client_order_id")
    assert len(orders) > 50 and len(trades) > 50, (len(orders), len(trades))

    # No client order id sent twice, none sent without its one intent. (A triggered
    # stop's market order carries the stop's id: the exchange made it, not the bot.)
    sent = Counter((o["client_id"], o["algo"]) for o in orders if o["orig_type"] is None)
    assert not [k for k, v in sent.items() if v > 1]
    intent_count = {r["coid"]: r["n"] for r in intents}
    assert all(n == 1 for n in intent_count.values())
    assert {cid for cid, _ in sent} <= set(intent_count)

    with Ledger(tmp_path / "bot.db", readonly=True) as ledger:
        state = ledger.state()
        # Every intent is resolved: sent or declared never placed.
        assert state.unresolved_orders() == []
        # Every open position has its stop resting on the exchange.
        resting = defaultdict(list)
        for o in orders:
            if o["algo"] and o["status"] == "NEW":
                resting[o["symbol"]].append(o["client_id"])
        assert {s: [(p.get("stop") or {}).get("client_order_id")]
                for s, p in state.positions.items()} == resting
        # Orders the bot never heard back about were settled from the exchange's answer.
        settled = ledger.select("SELECT count(*) AS n FROM facts WHERE type = 'order_update' "
                                "AND json_extract(data, '$.source') = 'reconcile'")
        assert settled[0]["n"] > 0
        # Every fill on the exchange is in the ledger, once.
        fills = ledger.select("SELECT json_extract(data, '$.trade_id') AS trade_id "
                              "FROM facts WHERE type = 'fill'")
        recorded = Counter(f["trade_id"] for f in fills)
        assert {str(t["id"]) for t in trades} <= set(recorded)
        assert all(n == 1 for tid, n in recorded.items() if not tid.startswith("order:"))
        # No duplicate position: per symbol, opens and closes alternate.
        flow = defaultdict(list)
        for r in ledger.select("SELECT symbol, type, position_id FROM facts WHERE type IN "
                               "('position_opened', 'position_closed') ORDER BY seq"):
            flow[r["symbol"]].append(r["type"])
        for symbol, events in flow.items():
            assert all(a != b for a, b in zip(events, events[1:], strict=False)), symbol
        ours = {s: (p["side"], Decimal(p["amount"])) for s, p in state.positions.items()}
    theirs = {p["symbol"]: ("long" if Decimal(p["amount"]) > 0 else "short",
                            abs(Decimal(p["amount"]))) for p in positions}
    assert ours == theirs
    print(f"\n{sum(kills.values())} kills {dict(kills)} in {lives_s:.0f} s; "
          f"{len(orders)} orders, {len(trades)} fills, {len(intent_count)} intents; "
          f"final reconciles exit {down.returncode}, {first.returncode}, 0; "
          f"open positions {len(ours)}")
