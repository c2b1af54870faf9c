"""The ledger file: schema and migrations, connection rules, append-only triggers,
atomic batches, threads and processes appending at once."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import defaultdict
from decimal import Decimal

import pytest

from ledger import Fact, FactError, Ledger, LedgerError, schema, store
from ledger.chain import COLUMNS
from ledger.fold import State, fold_into

TS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
DATA = COLUMNS.index("data")


def note(i: int, **data) -> Fact:
    return Fact("note", TS + i, reason=f"note {i}", data={"i": i, **data})


def raw(path) -> sqlite3.Connection:
    """A plain connection, as an outsider (the sqlite3 shell, a script) would open it."""
    return sqlite3.connect(path, isolation_level=None)


# -- schema, migrations, connections ----------------------------------------------------


def test_new_ledger_has_the_current_schema_in_wal_mode(ledger, ledger_path):
    assert schema.SCHEMA_VERSION == len(schema.MIGRATIONS) >= 1
    conn = raw(ledger_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    assert conn.execute("PRAGMA application_id").fetchone()[0] == schema.APPLICATION_ID
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for view in schema.VIEW_NAMES:  # every view compiles against the table
        conn.execute(f"SELECT * FROM {view}").fetchall()


def test_new_ledgers_take_small_pages_and_older_ones_keep_theirs(ledger_path, monkeypatch):
    """Smaller pages make a durable append cheaper (fewer bytes to fsync); a ledger made
    with SQLite's default pages (as before) keeps them and works the same. Writers copy
    the WAL back less often than SQLite's default."""
    with Ledger(ledger_path) as ledger:
        ledger.append([note(0)])
        wal_pages = ledger._conn().execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        assert wal_pages == store.WAL_AUTOCHECKPOINT
    assert raw(ledger_path).execute("PRAGMA page_size").fetchone()[0] == store.PAGE_SIZE
    old = ledger_path.with_name("old.db")
    monkeypatch.setattr(store, "PAGE_SIZE", 4096)
    with Ledger(old) as ledger:
        ledger.append([note(0)])
    monkeypatch.undo()
    with Ledger(old) as ledger:
        ledger.append([note(1), note(2)])
        assert ledger.verify().ok and ledger.verify().rows == 3
        assert [r["reason"] for r in ledger.select("SELECT reason FROM ledger")] == [
            "note 0", "note 1", "note 2"]
    assert raw(old).execute("PRAGMA page_size").fetchone()[0] == 4096


def _settings(conn: sqlite3.Connection) -> tuple[int, int]:
    return (conn.execute("PRAGMA synchronous").fetchone()[0],
            conn.execute("PRAGMA busy_timeout").fetchone()[0])


def test_every_connection_is_durable_with_a_busy_timeout_one_per_thread(ledger, ledger_path):
    ledger.append([note(1)])
    reader = Ledger(ledger_path, readonly=True)
    conns = {"writer": ledger._conn(), "reader": reader._conn()}
    other = {}
    thread = threading.Thread(target=lambda: other.update(conn=ledger._conn(),
                                                          settings=_settings(ledger._conn())))
    thread.start()
    thread.join()
    FULL = 2
    for name, conn in conns.items():
        assert _settings(conn) == (FULL, 10_000), name
    assert other["settings"] == (FULL, 10_000)
    assert other["conn"] is not conns["writer"]  # a thread gets its own connection
    with pytest.raises(sqlite3.ProgrammingError):  # ... and cannot use another's
        other["conn"].execute("SELECT 1")
    assert reader._conn().execute("PRAGMA query_only").fetchone()[0] == 1
    reader.close()


def test_every_write_runs_in_begin_immediate(ledger_path, monkeypatch):
    """Traced from the first statement: creation and migration, batches, checkpoints."""
    statements: list[str] = []
    real_connect = store.connect

    def traced(path, *, readonly):
        conn = real_connect(path, readonly=readonly)
        if not readonly:
            conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(store, "connect", traced)
    with Ledger(ledger_path, checkpoint_every=4) as ledger:
        for i in range(3):
            ledger.append([note(3 * i), note(3 * i + 1), note(3 * i + 2)])
        ledger.checkpoint(TS)
        assert ledger.verify().ok
    in_write = in_read = False  # a plain BEGIN only reads (the schema's marks, at once)
    writes = 0
    for sql in (s.strip().upper() for s in statements):
        assert not sql.startswith(("BEGIN DEFERRED", "BEGIN EXCLUSIVE"))
        if sql.startswith("BEGIN"):
            assert sql in ("BEGIN", "BEGIN IMMEDIATE") and not in_write and not in_read
            in_write, in_read = sql == "BEGIN IMMEDIATE", sql == "BEGIN"
        elif sql in ("COMMIT", "ROLLBACK"):
            in_write = in_read = False
        elif sql.startswith(("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP",
                             "PRAGMA USER_VERSION =", "PRAGMA APPLICATION_ID =")):
            assert in_write, sql
            writes += 1
    assert writes >= 6  # the schema, 3 batches, >= 1 automatic checkpoint, 1 explicit one


def test_append_only_triggers_guard_every_table(ledger, ledger_path):
    conn = raw(ledger_path)
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    assert tables
    for table in tables:
        triggers = " ".join(r[0].upper() for r in conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?", (table,)))
        assert "BEFORE UPDATE" in triggers and "BEFORE DELETE" in triggers, table
        assert "BEFORE INSERT" in triggers, table  # INSERT OR REPLACE deletes silently


_COLS = ", ".join((*COLUMNS, "hash"))
_ROW2 = "2, 1, 'note', NULL, 'X', NULL, '999', NULL, NULL, NULL, NULL, NULL, NULL, NULL, '{}', x'00'"


@pytest.mark.parametrize("sql", [
    "UPDATE facts SET amount = '999' WHERE seq = 2",
    "UPDATE OR REPLACE facts SET seq = 1 WHERE seq = 2",
    "UPDATE facts SET hash = hash",  # even a no-op rewrite
    "DELETE FROM facts WHERE seq = 2",
    "DELETE FROM facts",
    f"INSERT OR REPLACE INTO facts ({_COLS}) VALUES ({_ROW2})",
    f"REPLACE INTO facts ({_COLS}) VALUES ({_ROW2})",
    f"INSERT INTO facts ({_COLS}) VALUES ({_ROW2}) ON CONFLICT(seq) DO UPDATE SET amount = '9'",
    f"INSERT OR IGNORE INTO facts ({_COLS}) VALUES ({_ROW2})",
    f"INSERT INTO facts ({_COLS}) VALUES ({_ROW2})",  # a seq in the middle
    f"INSERT INTO facts ({_COLS}) VALUES ({_ROW2.replace('2, ', '0, ', 1)})",  # before the first
    f"INSERT INTO facts ({_COLS}) VALUES ({_ROW2.replace('2, ', 'NULL, ', 1)})",  # auto seq
], ids=["update", "update-or-replace", "update-noop", "delete-one", "delete-all",
        "insert-or-replace", "replace-into", "upsert", "insert-or-ignore", "seq-in-middle",
        "seq-zero", "seq-null"])
def test_history_cannot_be_rewritten(ledger, ledger_path, sql):
    ledger.append([note(i) for i in range(1, 4)])
    before = list(ledger.rows())
    conn = raw(ledger_path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute(sql)
    conn.close()
    assert list(ledger.rows()) == before
    assert ledger.verify().ok


def test_numbered_migrations_upgrade_in_place(ledger_path, monkeypatch):
    with Ledger(ledger_path) as ledger:
        ledger.append([note(i) for i in range(5)])
        rows = list(ledger.rows())
    v2 = schema.MIGRATIONS + ("CREATE VIEW notes AS SELECT seq, reason FROM facts "
                              "WHERE type = 'note';",)
    monkeypatch.setattr(schema, "MIGRATIONS", v2)
    monkeypatch.setattr(schema, "SCHEMA_VERSION", len(v2))
    with pytest.raises(LedgerError, match="run the bot once to migrate"):
        Ledger(ledger_path, readonly=True)  # a reader never migrates
    with Ledger(ledger_path) as ledger:
        assert list(ledger.rows()) == rows and ledger.verify().ok
        assert len(ledger.select("SELECT * FROM notes")) == 5
    conn = raw(ledger_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(v2)


def test_a_failing_migration_changes_nothing(ledger_path, monkeypatch):
    with Ledger(ledger_path) as ledger:
        ledger.append([note(i) for i in range(5)])
        rows = list(ledger.rows())
    bad = schema.MIGRATIONS + ("CREATE VIEW fine AS SELECT 1;\nCREATE TABLE broken (;",)
    monkeypatch.setattr(schema, "MIGRATIONS", bad)
    monkeypatch.setattr(schema, "SCHEMA_VERSION", len(bad))
    with pytest.raises(LedgerError, match="cannot create or migrate"):
        Ledger(ledger_path)
    monkeypatch.undo()
    conn = raw(ledger_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'fine'").fetchone()[0] == 0
    with Ledger(ledger_path) as ledger:
        assert list(ledger.rows()) == rows and ledger.verify().ok


# -- appending ---------------------------------------------------------------------------


def test_append_records_facts_exactly_and_returns_their_seqs(ledger):
    assert ledger.append([]) == []
    assert ledger.last_seq() == 0
    seqs = ledger.append([
        Fact("order_intent", TS, symbol="BTC/USDT:USDT", side="buy", amount=Decimal("0.0100"),
             client_order_id="bot1-E-BTCUSDT-a", data={"purpose": "entry"}),
        Fact("fill", TS + 5, symbol="BTC/USDT:USDT", side="buy", amount="0.0100",
             price=65000.1, fee=Decimal("1E-2"), client_order_id="bot1-E-BTCUSDT-a"),
    ])
    assert seqs == [1, 2]
    assert ledger.append([note(3)]) == [3]
    fill = ledger.facts_for_order("bot1-E-BTCUSDT-a")[1]
    assert fill[COLUMNS.index("amount")] == "0.0100"  # as given, never re-rounded
    assert fill[COLUMNS.index("price")] == "65000.1"
    assert fill[COLUMNS.index("fee")] == "0.01"
    assert [r["seq"] for r in ledger.select("SELECT seq FROM facts WHERE type = ?",
                                            ["fill"])] == [2]
    assert ledger.last_seq() == 3 and ledger.verify().ok


@pytest.mark.parametrize("bad", [
    Fact("no_such_type", TS),
    Fact("fill", TS, symbol="BTC/USDT:USDT", side="buy", amount="1"),  # no price
    Fact("fill", TS, symbol="BTC/USDT:USDT", side="buy", amount="1", price=float("nan")),
    Fact("note", -1),
    Fact("note", TS, data={"x": object()}),
    Fact("note", TS, data=["not", "a", "dict"]),
    {"type": "note", "ts": TS},  # not a Fact at all
], ids=["type", "required", "nan", "ts", "data", "data-list", "not-a-fact"])
def test_a_batch_with_one_bad_fact_records_nothing(ledger, bad):
    ledger.append([note(0), note(1)])
    before = list(ledger.rows())
    with pytest.raises(FactError):
        ledger.append([note(2), note(3), bad, note(4)])
    assert list(ledger.rows()) == before
    assert ledger.append([note(5)]) == [3]  # no gap where the refused batch was
    assert ledger.verify().ok


def test_a_large_batch_is_one_transaction(ledger):
    seqs = ledger.append([note(i) for i in range(2600)])  # several INSERT statements
    assert seqs == list(range(1, 2601))
    report = ledger.verify()
    assert report.ok and report.rows == 2600


def test_automatic_and_explicit_checkpoints_hold_the_folded_state(ledger_path):
    with Ledger(ledger_path, checkpoint_every=10) as ledger:
        for i in range(12):
            ledger.append([Fact("balance", TS + i, data={"equity": str(100 + i)}),
                           note(i), note(i)])
        seq = ledger.checkpoint(TS + 99)
        assert seq == ledger.last_seq()
        rows = list(ledger.rows())
        checkpoints = [r for r in rows if r[COLUMNS.index("type")] == "checkpoint"]
        assert len(checkpoints) >= 36 // 10
        assert_checkpoints_hold_their_fold(ledger)  # each holds the fold of the rows before
        assert ledger.state() == ledger.replay()
        assert ledger.state().equity == "111"


def test_the_cached_state_folds_the_batches_it_holds_when_needed(ledger_path, monkeypatch):
    """Committed batches wait unfolded (up to FOLD_AFTER_ROWS) until state() or a
    checkpoint needs them; another writer's rows in between are read from the file."""
    monkeypatch.setattr(store, "FOLD_AFTER_ROWS", 7)
    with Ledger(ledger_path, checkpoint_every=25) as ledger, Ledger(ledger_path) as other:
        ledger.state()  # the cache exists from here on
        for i in range(60):
            ledger.append([Fact("balance", TS + i, data={"equity": str(100 + i)}),
                           Fact("fill", TS + i, symbol="BTC/USDT:USDT", side="buy",
                                amount="1", price="2", fee="0.5")])  # fees add up
            if i % 9 == 4:
                other.append([Fact("halt", TS + i, reason="x", data={"kind": f"k{i}"})])
            if i % 11 == 0:
                assert ledger.state() == ledger.replay()
        assert_checkpoints_hold_their_fold(ledger)
        state = ledger.state()
        assert (state.equity, state.fees_today, len(state.halts)) == ("159", "30.0", 7)


def test_a_new_ledger_folds_its_first_rows_from_memory(ledger_path):
    """A new ledger's state is known (empty), so its first checkpoint folds the rows it
    committed from memory instead of reading them back from the file."""
    with Ledger(ledger_path, checkpoint_every=30) as ledger:
        statements: list[str] = []
        ledger._conn().set_trace_callback(statements.append)
        for i in range(12):
            ledger.append([Fact("balance", TS + i, data={"equity": str(100 + i)}),
                           note(i), note(i)])
        assert ledger.last_seq() == 37  # 36 facts and the checkpoint after seq 30
        read_back = [s for s in statements if s.lstrip().startswith("SELECT seq, ts")]
        assert read_back == []
        assert_checkpoints_hold_their_fold(ledger)
        assert ledger.state() == ledger.replay()


def test_the_seq_floor_comes_before_every_fact_stamped_at_or_after_its_time(ledger):
    """Job runs every 10 s of ten hours; fills recorded up to 20 min after their trade's
    time, and some stamped 2 s ahead (an exchange clock ahead of ours) just before a job
    run. Every fact stamped at or after t lies above seq_floor(t), which still skips most
    of the ledger for a recent t."""
    assert ledger.seq_floor(TS) == 0  # nothing recorded yet
    for i in range(3600):
        now = TS + i * 10_000
        batch = [Fact("job_run", now, data={"job": "scan", "outcome": "ok"})]
        if i % 5 == 0:
            batch.insert(0, Fact("fill", now + 2_000, symbol="A/USDT:USDT", side="sell",
                                 amount="1", price="2", fee="0.1", data={"trade_id": f"s{i}"}))
        if i % 7 == 3:
            batch.append(Fact("fill", now - (i * 37 % 1_200) * 1000, symbol="A/USDT:USDT",
                              side="buy", amount="1", price="2", fee="0.1",
                              data={"trade_id": str(i)}))
        ledger.append(batch)
    rows = ledger.select("SELECT seq, ts FROM facts")
    for minutes in (0, 30, 59, 60, 61, 200, 590, 600, 700):
        t = TS + minutes * 60_000 + 1_000
        floor = ledger.seq_floor(t)
        assert all(r["seq"] > floor for r in rows if r["ts"] >= t), minutes
    recent = ledger.seq_floor(TS + 590 * 60_000)
    assert recent > 0.8 * ledger.last_seq()


def test_a_checkpoint_folded_by_other_rules_is_folded_again(ledger_path, monkeypatch):
    """A checkpoint from before a fold change (no fold_version, no `external` field) is
    not trusted: the state is folded from the first row, and the first writer to open the
    ledger writes a checkpoint by the current rules, once."""
    flag = Fact("external_position", TS, symbol="A/USDT:USDT", side="long", amount="2",
                price="3", reason="flagged", data={"adopted": False})
    monkeypatch.setattr(store, "checkpoint_fact", lambda ts, state: Fact(
        "checkpoint", ts, data={"state": {k: v for k, v in state.to_dict().items()
                                          if k not in ("external", "last_reconcile_seq")}}))
    with Ledger(ledger_path, checkpoint_every=3) as ledger:
        ledger.append([flag, note(1), note(2), note(3)])  # the checkpoint follows
        ledger.append([note(4)])
    monkeypatch.undo()
    with Ledger(ledger_path, readonly=True) as reader:
        assert reader.last_seq() == 6  # nothing written by a reader
        state = reader.state()
        assert state == reader.replay() and set(state.external) == {"A/USDT:USDT"}
    with Ledger(ledger_path) as ledger:
        checkpoints = ledger.select("SELECT seq, data FROM facts WHERE type = 'checkpoint'")
        assert [c["seq"] for c in checkpoints] == [5, 7]
        assert json.loads(checkpoints[-1]["data"])["fold_version"] == store.FOLD_VERSION
        assert ledger.state() == ledger.replay()
    with Ledger(ledger_path) as ledger:
        assert ledger.last_seq() == 7  # written once


def test_state_is_a_copy(ledger):
    ledger.append([Fact("halt", TS, reason="test", data={"kind": "manual"})])
    state = ledger.state()
    state.halts.clear()
    assert ledger.state().halts


def test_bad_arguments_are_refused(ledger_path):
    with pytest.raises(ValueError, match="checkpoint_every"):
        Ledger(ledger_path, checkpoint_every=0)


# -- readers -----------------------------------------------------------------------------


def test_a_reader_never_writes_and_sees_new_facts(ledger, ledger_path, tmp_path):
    with pytest.raises(LedgerError, match="no ledger here"):
        Ledger(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()
    ledger.append([note(1)])
    with Ledger(ledger_path, readonly=True) as reader:
        assert reader.state().seq == 1
        ledger.append([Fact("halt", TS, reason="x", data={"kind": "manual"})])
        assert reader.state().halts and reader.state() == ledger.state()
        with pytest.raises(LedgerError):
            reader.append([note(2)])
        with pytest.raises(LedgerError):
            reader.checkpoint(TS)
    assert ledger.last_seq() == 2


# -- concurrency -------------------------------------------------------------------------


def closing(i: int, **marks) -> Fact:
    """A fact whose fold is not idempotent: folding it twice (or never) shows."""
    return Fact("position_closed", TS + i, symbol="BTC/USDT:USDT", position_id=f"p{i}",
                pnl="1", data=marks)


def assert_checkpoints_hold_their_fold(ledger: Ledger) -> None:
    running = State()
    for row in ledger.rows():
        if row[COLUMNS.index("type")] == "checkpoint":
            assert json.loads(row[DATA])["state"] == running.to_dict(), f"checkpoint {row[0]}"
        fold_into(running, [row])
    assert ledger.state() == running == ledger.replay()


def test_threads_share_one_ledger(ledger_path):
    errors = []
    ledger = Ledger(ledger_path, checkpoint_every=10)

    def work(t: int) -> None:
        try:
            for b in range(40):
                ledger.append([closing(i, t=t, b=b, n=3) for i in range(3)])
                if b % 4 == 0:
                    ledger.state()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert_batches_whole(ledger)
    assert ledger.verify().ok
    assert_checkpoints_hold_their_fold(ledger)
    assert ledger.state().realized_today == str(4 * 40 * 3)
    ledger.close()


def assert_batches_whole(ledger: Ledger) -> None:
    """Every batch's rows are present, all of them, next to each other."""
    by_batch = defaultdict(list)
    for row in ledger.rows():
        data = json.loads(row[DATA])
        if "b" in data:
            by_batch[(data.get("p"), data.get("t"), data["b"])].append((row[0], data))
    for key, members in by_batch.items():
        seqs = [seq for seq, _ in members]
        assert len(members) == members[0][1]["n"], key
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), key


APPENDER = """
import os, random, sys, time
from ledger import Fact, Ledger
path, name, batches, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rng = random.Random(name)
with Ledger(path, checkpoint_every=rng.randint(5, 25)) as ledger:
    while not os.path.exists(go):  # start together
        time.sleep(0.001)
    for b in range(batches):
        n = rng.randint(1, 8)
        ledger.append([Fact("position_closed", 1_767_225_600_000 + b, symbol="ETH/USDT:USDT",
                            position_id="x", pnl="1", data={"p": name, "b": b, "n": n})
                       for _ in range(n)])
        if b % 5 == 0:
            ledger.state()
        time.sleep(rng.random() * 0.002)  # a job's pause: lets the others take the lock
print("done")
"""


def test_creating_a_ledger_waits_for_another_writer_to_let_go(ledger_path):
    """Switching a new file to WAL needs it to itself: while another connection holds a
    write lock, SQLite answers "database is locked" at once, without the busy timeout.
    The ledger waits for it (the bot's first start racing a first `bot halt`)."""
    other = sqlite3.connect(ledger_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    timer = threading.Timer(0.3, lambda: other.execute("ROLLBACK"))
    timer.start()
    try:
        with Ledger(ledger_path) as ledger:
            ledger.append([note(1)])
            assert ledger.verify().ok and ledger.last_seq() == 1
    finally:
        timer.join()
        other.close()


CREATOR = """
import os, sys, time
from ledger import Fact, Ledger
path, name, go = sys.argv[1], sys.argv[2], sys.argv[3]
while not os.path.exists(go):  # open together
    time.sleep(0.0002)
with Ledger(path) as ledger:
    ledger.append([Fact("note", 1_767_225_600_000, reason=name)])
"""


@pytest.mark.slow
def test_processes_creating_one_new_ledger_at_once_all_succeed(spawn_python, tmp_path):
    """The bot's first start racing a first `bot halt`: each creates the file, switches it
    to WAL and migrates it. Switching to WAL used to fail at once with "database is
    locked" (1 race in 5), and reading the schema's marks in three reads could call the
    new ledger "not a ledger of this bot"."""
    for trial in range(15):
        path, go = tmp_path / f"bot{trial}.db", tmp_path / f"go{trial}"
        procs = [spawn_python(CREATOR, path, f"p{k}", go) for k in range(3)]
        time.sleep(0.4)
        go.touch()
        outs = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], (trial, outs)
        with Ledger(path, readonly=True) as ledger:
            assert ledger.verify().ok and ledger.last_seq() == 3


@pytest.mark.slow
def test_processes_append_at_once(ledger_path, spawn_python, tmp_path):
    """Three processes create the same new ledger, then append 150 batches each at once."""
    go = tmp_path / "go"
    procs = [spawn_python(APPENDER, ledger_path, f"p{k}", 150, go) for k in range(3)]
    time.sleep(0.3)
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    with Ledger(ledger_path) as ledger:
        report = ledger.verify()
        assert report.ok, report  # one chain, no seq gaps
        assert_batches_whole(ledger)
        order, owners = defaultdict(list), []
        for row in ledger.rows():
            data = json.loads(row[DATA])
            if "p" in data and (not order[data["p"]] or order[data["p"]][-1] != data["b"]):
                order[data["p"]].append(data["b"])
                owners.append(data["p"])
        assert {p: o for p, o in order.items()} == {f"p{k}": list(range(150)) for k in range(3)}
        runs = sum(1 for a, b in zip(owners, owners[1:], strict=False) if a != b)
        assert runs >= 10, "the processes never took turns: the test proved nothing"
        assert_checkpoints_hold_their_fold(ledger)


def test_odd_characters_in_the_path(tmp_path):
    path = tmp_path / "my ledgers #1 ?50%" / "bot.db"
    path.parent.mkdir()
    with Ledger(path) as ledger:
        ledger.append([note(1)])
    with Ledger(path, readonly=True) as reader:
        assert reader.last_seq() == 1 and reader.verify().ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my ledgers #1 ?50%"]
