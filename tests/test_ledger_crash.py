"""Kill -9 at random instants while a real process appends: the ledger always verifies,
no batch is ever half present, and every batch the writer was told is committed is there."""

from __future__ import annotations

import json
import random
import select
import signal
import time
from collections import defaultdict

import pytest

from ledger import Ledger
from ledger.chain import COLUMNS
from ledger.fold import State, fold_into

KILLS = 25
TYPE, DATA = COLUMNS.index("type"), COLUMNS.index("data")

# Appends forever: batches of random size (each fact says which batch it belongs to and
# how big the batch is), checkpoints every few rows, explicit checkpoints and state()
# calls now and then, and a line on stdout after each commit.
WRITER = """
import random, sys
from ledger import Fact, Ledger

path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
ts = 1_767_225_600_000 + seed * 10_000_000

def fact(kind, tag, i, n, b):
    data = {"batch": tag, "size": n, "i": i}
    coid = f"c{seed}-{b % 7}"
    if kind == "order_intent":
        return Fact(kind, ts, symbol="BTC/USDT:USDT", side="buy", amount="0.1",
                    client_order_id=coid, data=data)
    if kind == "order_update":
        return Fact(kind, ts, client_order_id=coid, data={**data, "state": "filled"})
    if kind == "balance":
        return Fact(kind, ts, data={**data, "equity": str(rng.randint(900, 1100))})
    if kind in ("halt", "resume"):
        return Fact(kind, ts, reason="test", data={**data, "kind": "manual"})
    if kind == "job_run":
        return Fact(kind, ts, data={**data, "job": "scan", "outcome": "ok"})
    return Fact("note", ts, reason="x" * rng.randint(0, 400), data=data)

kinds = ("order_intent", "order_update", "balance", "halt", "resume", "job_run", "note")
ledger = Ledger(path, checkpoint_every=rng.randint(3, 40))
print("ready", flush=True)
b = 0
while True:
    b += 1
    ts += 1000
    n = 300 if rng.random() < 0.03 else rng.randint(1, 25)
    tag = f"{seed}-{b}"
    ledger.append([fact(rng.choice(kinds), tag, i, n, b) for i in range(n)])
    print("committed", tag, flush=True)
    if rng.random() < 0.05:
        ledger.checkpoint(ts)
    if rng.random() < 0.1:
        ledger.state()
"""


class Checker:
    """Checks the whole ledger after each kill; checkpoints are checked incrementally."""

    def __init__(self) -> None:
        self.running = State()

    def check(self, path, committed: set[str]) -> int:
        with Ledger(path) as ledger:  # opening as a writer also runs SQLite's recovery
            report = ledger.verify()
            assert report.ok, report  # the chain is whole and has no seq gaps
            batches = defaultdict(list)
            for row in ledger.rows():
                data = json.loads(row[DATA])
                if "batch" in data:
                    batches[data["batch"]].append((row[0], data["i"], data["size"]))
            for tag, members in batches.items():  # never half a batch
                seqs = [m[0] for m in members]
                assert [m[1] for m in members] == list(range(members[0][2])), tag
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), tag
            assert committed <= set(batches), committed - set(batches)  # durable once told
            for row in ledger.rows(after=self.running.seq):
                if row[TYPE] == "checkpoint":
                    stored = json.loads(row[DATA])["state"]
                    assert stored == self.running.to_dict(), f"checkpoint {row[0]}"
                fold_into(self.running, [row])
            assert ledger.state() == self.running
            return report.rows


def committed_tags(output: str) -> set[str]:
    lines = output.split("\n")[:-1]  # the last line may have been cut by the kill
    return {line.split()[1] for line in lines if line.startswith("committed ")}


@pytest.mark.slow
def test_sigkill_while_appending_never_leaves_half_a_batch(ledger_path, spawn_python):
    rng = random.Random(20260101)
    checker = Checker()
    committed: set[str] = set()
    rows = []
    for k in range(KILLS):
        proc = spawn_python(WRITER, ledger_path, k)
        if k % 6 == 0:  # sometimes while it starts: opening, creating, migrating
            time.sleep(rng.uniform(0.0, 0.15))
        else:
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready and proc.stdout.readline() == "ready\n", proc.stderr.read()
            time.sleep(rng.uniform(0.0, 0.12))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err
        committed |= committed_tags(out)
        if ledger_path.exists():
            rows.append(checker.check(ledger_path, committed))
    assert len(rows) >= KILLS - 5 and rows[-1] > 100  # it did write
