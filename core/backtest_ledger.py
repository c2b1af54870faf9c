"""A write-behind ledger for backtests: the real Ledger's rows, chain and fold, in big batches.

A backtest writes thousands of facts in a second, and the execution code reads the
ledger between its writes (is this order known? what is the state now?). Committing
each small batch costs a transaction each; this wrapper keeps the facts in memory,
answers those reads from memory, and appends them to the real ``ledger.Ledger`` in
batches of at most ``batch`` facts, so the file holds exactly the rows, hash chain,
checkpoints and views a live ledger holds.

* ``append`` validates each fact at once (``Fact.row``, the same normalisation the
  ledger stores), folds it into the in-memory state with the ledger's own fold, and
  indexes it by client order id;
* ``state``, ``facts_for_order`` and ``stop_intents`` answer from memory; ``select`` (any
  other SQL) flushes first and asks SQLite;
* durability is off on the backtest's connection (``PRAGMA synchronous = OFF``, set
  through ``Ledger.select``): a backtest ledger is rebuilt by running the backtest again,
  and a crash can only lose it whole, never leave a live ledger half-written.

Only for a ledger the backtest created: the memory index starts empty.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence

from ledger import Fact, Ledger
from ledger.fold import CLIENT_ID, DATA, PNL, POSITION_ID, TS, State, fold_into

BATCH = 2000


class BufferedLedger:
    """Ledger-compatible (append, state, facts_for_order, select, last_seq, close)."""

    def __init__(self, ledger: Ledger, batch: int = BATCH, durable: bool = False) -> None:
        if batch < 1 or batch > BATCH:
            raise ValueError(f"batch must be 1..{BATCH}, got {batch}")
        self.ledger = ledger
        self.path = ledger.path
        self.batch = batch
        if not durable:
            ledger.select("PRAGMA synchronous = OFF")  # this connection only
        self._state: State = ledger.state()  # also primes the ledger's own cache
        if self._state.seq != 0:
            raise ValueError(f"{ledger.path}: a backtest writes to a new, empty ledger")
        self._seq = 0
        self._first_ts: int | None = None
        self._pending: list[tuple] = []  # Fact.values() of each fact not yet written
        self._by_order: dict[str, list[tuple]] = defaultdict(list)
        self._stop_intents: dict[str, int] = defaultdict(int)
        self._partial_pnl: dict[str, list[str]] = defaultdict(list)
        self.written = 0

    # -- writing -----------------------------------------------------------------------

    def append(self, facts: Sequence[Fact]) -> list[int]:
        if not facts:
            return []
        rows = [f.row(self._seq + n) for n, f in enumerate(facts, start=1)]  # validates all
        fold_into(self._state, rows)
        if self._first_ts is None:
            self._first_ts = rows[0][TS]
        for f, row in zip(facts, rows, strict=True):
            if row[CLIENT_ID]:
                self._by_order[row[CLIENT_ID]].append(row)
            if f.type == "order_intent" and row[POSITION_ID] and json.loads(row[DATA]).get(
                    "purpose") == "stop":
                self._stop_intents[row[POSITION_ID]] += 1
            elif f.type == "position_changed" and row[POSITION_ID] and row[PNL] is not None:
                self._partial_pnl[row[POSITION_ID]].append(row[PNL])
        first = self._seq + 1
        self._seq += len(rows)
        self._pending.extend(row[1:] for row in rows)  # the ledger numbers them itself
        if len(self._pending) >= self.batch:
            self.flush()
        return list(range(first, first + len(rows)))

    def flush(self) -> None:
        """Append what is pending to the real ledger (at most ``batch`` facts a commit)."""
        while self._pending:
            chunk, self._pending = self._pending[:self.batch], self._pending[self.batch:]
            self.ledger.append_normalised(chunk)
            self.written += len(chunk)
        # A checkpoint row the ledger added moves the next sequence numbers on.
        self._seq = self._state.seq = self.ledger.last_seq()

    # -- reading -----------------------------------------------------------------------

    def state(self) -> State:
        """A copy of the folded state (the caller may keep it while facts are appended)."""
        return copy_state(self._state)

    def first_ts(self) -> int | None:
        """The first fact's time, without flushing (the daily reset asks at every scan
        until a day is closed)."""
        return self._first_ts

    def facts_for_order(self, client_order_id: str) -> list[tuple]:
        return list(self._by_order.get(client_order_id, ()))

    def stop_intents(self, position_id: str) -> int:
        """Stop orders intended for a position so far (what Executor.stop_attempts counts)."""
        return self._stop_intents.get(position_id, 0)

    def partial_exit_pnls(self, position_id: str) -> list[str]:
        """The pnl of each position_changed fact of a position (partial exits), in order."""
        return list(self._partial_pnl.get(position_id, ()))

    def select(self, sql: str, params: Iterable = ()) -> list[dict]:
        self.flush()
        return self.ledger.select(sql, params)

    def last_seq(self) -> int:
        return self._seq

    def seq_floor(self, ts_ms: int, **kw) -> int:
        """0: a backtest records no job runs, so Ledger.seq_floor would read every row
        back to the first to find none."""
        return 0

    def close(self) -> None:
        self.flush()
        self.ledger.close()


def copy_state(state: State) -> State:
    """``State.copy()`` for the fold's data shapes, two levels deep: the fold replaces
    values below that level (a position's stop, a halt) and never changes them in
    place, so nothing a caller holds changes under it. Much cheaper than a deep clone."""
    out = State()
    for name, value in vars(state).items():
        if type(value) is dict:
            value = {k: (dict(v) if type(v) is dict else list(v) if type(v) is list else v)
                     for k, v in value.items()}
        elif type(value) is list:
            value = list(value)
        setattr(out, name, value)
    return out
