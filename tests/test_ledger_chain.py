"""The hash chain: a byte-stable canonical encoding, and verify naming the first bad row
when the file was changed behind the triggers' back."""

from __future__ import annotations

import json
import math
import sqlite3
from decimal import Decimal
from hashlib import sha256

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import FACT_TYPES, Fact, FactError, Ledger, schema
from ledger import verify as verify_module
from ledger.chain import (
    CANONICAL_SQL,
    COLUMNS,
    GENESIS,
    canonical,
    check_chain,
    compact_encoder,
    encode_tail,
    link,
    link_tail,
)
from ledger.facts import MAX_TS, canonical_json, in_range, money

TS = 1_767_225_600_000

# -- the canonical encoding ----------------------------------------------------------------

any_text = st.text(st.characters(exclude_categories=()), max_size=30)  # incl. controls, surrogates
decimal_text = st.decimals(allow_nan=False, allow_infinity=False, places=8).map(str)
quantity = st.none() | decimal_text | st.integers(-10**30, 10**30) | st.floats(
    -1e50, 1e50).filter(lambda f: in_range(Decimal(repr(f)))) | st.decimals(
    -10**50, 10**50, allow_nan=False).filter(in_range)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | any_text
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12)

facts = st.builds(
    Fact, type=st.sampled_from(sorted(FACT_TYPES)), ts=st.integers(0, MAX_TS),
    symbol=any_text.filter(bool), side=any_text.filter(bool), amount=quantity.filter(
        lambda q: q is not None), price=quantity.filter(lambda q: q is not None), fee=quantity,
    pnl=quantity, position_id=any_text.filter(bool), client_order_id=any_text.filter(bool),
    exchange_order_id=st.none() | any_text, reason=st.none() | any_text,
    run_id=st.none() | any_text, data=st.dictionaries(any_text, json_value, max_size=5))


@settings(max_examples=200, deadline=None)
@given(fact=facts, seq=st.integers(1, 2**63 - 1))
def test_python_and_sqlite_encode_every_row_alike(fact, seq):
    """verify trusts SQLite's json_array(); appends use Python: they must agree byte for byte."""
    row = fact.row(seq)
    conn = sqlite3.connect(":memory:")
    conn.execute(schema.FACTS_TABLE)
    conn.execute(f"INSERT INTO facts VALUES ({', '.join('?' * (len(COLUMNS) + 1))})",
                 (*row, b"h"))
    assert conn.execute(f"SELECT {CANONICAL_SQL} FROM facts").fetchone()[0] == canonical(row)
    assert conn.execute(f"SELECT {', '.join(COLUMNS)} FROM facts").fetchone() == row
    assert link_tail(GENESIS, seq, encode_tail(row[1:])) == link(GENESIS, row)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(batch=st.lists(facts, min_size=1, max_size=4))
def test_append_stores_every_value_exactly_as_the_chain_hashed_it(batch, tmp_path_factory):
    """append binds NULL as 0 and the hash as a bytearray for speed: every value, its
    SQLite type and the chain must come out exactly as Fact.row gives them."""
    path = tmp_path_factory.mktemp("exact") / "bot.db"
    zeros = Fact("note", 0, symbol="0", side="", amount="0", price="0", fee="0", pnl="-0",
                 position_id="0", client_order_id="0", exchange_order_id="", reason="0",
                 run_id="", data={"0": 0})
    batch = [zeros, *batch]
    with Ledger(path) as ledger:
        assert ledger.append(batch) == list(range(1, len(batch) + 1))
        stored = ledger._conn().execute(
            f"SELECT {', '.join(COLUMNS)}, hash, {', '.join(f'typeof({c})' for c in COLUMNS)}, "
            "typeof(hash) FROM facts ORDER BY seq").fetchall()
        assert ledger.verify().ok
    prev = GENESIS
    for seq, (fact, row) in enumerate(zip(batch, stored, strict=True), start=1):
        expected = fact.row(seq)
        prev = link(prev, expected)
        n = len(COLUMNS)
        assert row[:n] == expected and row[n] == prev
        assert row[n + 1:] == (*(_sqlite_type(v) for v in expected), "blob")


def _sqlite_type(value) -> str:
    return {type(None): "null", int: "integer", str: "text"}[type(value)]


@settings(max_examples=200, deadline=None)
@given(value=json_value, sort_keys=st.booleans(), ascii_only=st.booleans())
def test_the_fast_encoder_is_the_documented_one(value, sort_keys, ascii_only):
    fast = compact_encoder(ensure_ascii=ascii_only, sort_keys=sort_keys)
    std = json.JSONEncoder(ensure_ascii=ascii_only, sort_keys=sort_keys, allow_nan=False,
                           separators=(",", ":"))
    try:
        expected = std.encode(value)
    except TypeError:  # keys of mixed types cannot be sorted
        with pytest.raises(TypeError):
            fast(value)
        return
    assert fast(value) == expected


def test_the_chain_is_byte_stable():
    """Pinned hashes: a change to the encoding (or to Fact normalisation) breaks old ledgers."""
    rows = [
        Fact("order_intent", TS, symbol="BTC/USDT:USDT", side="buy", amount="0.010",
             client_order_id="bot1-E-BTCUSDT-t5kq9c", run_id="scan-1",
             data={"purpose": "entry", "type": "market", "reduce_only": False}).row(1),
        Fact("note", TS + 1, reason='quote " backslash \\ é ✓ 𝄞',
             data={"é": "ü", "b": [1, 2.5, None], "a": {"z": True}}).row(2),
    ]
    assert canonical(rows[0]) == (
        b'[1,1767225600000,"order_intent","scan-1","BTC/USDT:USDT","buy","0.010",null,null,'
        b'null,null,"bot1-E-BTCUSDT-t5kq9c",null,null,"{\\"purpose\\":\\"entry\\",'
        b'\\"reduce_only\\":false,\\"type\\":\\"market\\"}"]')
    h1 = link(GENESIS, rows[0])
    h2 = link(h1, rows[1])
    assert h1.hex() == "a2bd5fcf4b5951c1b8346ba6e497272428afdff029a53efbc6a5adc223ba7e6d"
    assert h2.hex() == "e5f88e9a46fe139865fa3e587679aa24826dcbb301b6e2d32888bd1d7d44b09f"


# -- what a Fact may hold ------------------------------------------------------------------


@pytest.mark.parametrize("value, stored", [
    ("0.010", "0.010"), ("1e-8", "1e-8"), (Decimal("0.0100"), "0.0100"),
    (Decimal("1E+2"), "100"), (3, "3"), (0.1, "0.1"), (1e-7, "0.0000001"), (None, None),
])
def test_money_is_stored_exactly(value, stored):
    assert money(value) == stored


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity", "1,5", " 1", "1_000", "", "abc",
                                   float("nan"), math.inf, Decimal("NaN"), True, [1], b"1",
                                   # out of range: would overflow the fold's sums or be
                                   # millions of characters as its plain text
                                   "1e1000000", "-1E+60", "1e-1000000", "0E-1000000",
                                   Decimal("1e999999"), 10 ** 60, 1e300, 5e-324])
def test_money_refuses_what_is_not_a_finite_quantity(value):
    with pytest.raises(FactError):
        money(value)


@pytest.mark.parametrize("value", ["9" * 60, "1e59", "-1e59", "1e-59", "0.5e-58", "0E-59",
                                   Decimal(1) / Decimal(3) / 10 ** 30, 10 ** 60 - 1, 1e-59])
def test_money_keeps_quantities_up_to_sixty_places_either_side(value):
    assert Decimal(money(value)) == Decimal(value if not isinstance(value, float) else repr(value))


def test_fact_normalisation():
    values = Fact("note", TS, reason="tab\there\x7f", run_id=7, symbol="a\ud800b").values()
    assert values[COLUMNS.index("reason") - 1] == "tab here "
    assert values[COLUMNS.index("run_id") - 1] == "7"
    assert values[COLUMNS.index("symbol") - 1] == "a\ufffdb"  # no lone surrogates in UTF-8
    assert canonical_json({"b": Decimal("1.50"), "a": ("x", 1), "é": 1}) == \
        '{"a":["x",1],"b":"1.50","\\u00e9":1}'
    cyclic: dict = {}
    cyclic["me"] = cyclic
    for bad in (Fact("note", True), Fact("note", MAX_TS + 1), Fact("note", 1.5), Fact(7, TS),
                Fact("note", TS, data={"x": float("nan")}), Fact("note", TS, data={1: "a", "b": 2}),
                Fact("note", TS, data=cyclic)):
        with pytest.raises(FactError):
            bad.values()


# -- verify --------------------------------------------------------------------------------


def tamper(path, sql: str, params=()) -> None:
    """Change the file the way an attacker would: drop the trigger, edit, put it back."""
    conn = sqlite3.connect(path, isolation_level=None)
    triggers = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall()
    conn.execute("BEGIN IMMEDIATE")
    for name, _ in triggers:
        conn.execute(f"DROP TRIGGER {name}")
    conn.execute(sql, params)
    for _, create in triggers:
        conn.execute(create)
    conn.execute("COMMIT")
    conn.close()


@pytest.fixture(scope="module")
def big_ledger(tmp_path_factory):
    """9,000 notes and their checkpoints, built once for the module."""
    path = tmp_path_factory.mktemp("chain") / "bot.db"
    with Ledger(path, checkpoint_every=1000) as ledger:
        for b in range(9):
            ledger.append([Fact("note", TS + 1000 * b + i, amount=str(i), data={"i": i})
                           for i in range(1000)])
    return path


@pytest.fixture
def copy_of_big(big_ledger, tmp_path):
    path = tmp_path / "bot.db"
    path.write_bytes(big_ledger.read_bytes())
    return path


# One walk, and the same check on 3 processes (12 shares of ~750 rows: the bounds
# 3003/3004 and 6006/6007 are among the rows tampered with below).
@pytest.fixture(params=[1, 3], ids=["one walk", "3 processes"])
def workers(request):
    return request.param


def test_an_intact_ledger_verifies(big_ledger, ledger, workers):
    with Ledger(big_ledger, readonly=True) as reader:
        report = reader.verify(workers)
        assert report.ok and report.rows == report.last_seq == reader.last_seq() > 9000
        assert report.first_bad_seq is None
    assert ledger.verify().ok and ledger.verify().rows == 0


@pytest.mark.parametrize("seq", [1, 2, 3003, 3004, 4095, 4096, 4097, 6007, 8192, 9000])
def test_verify_names_an_edited_row(copy_of_big, seq, workers):
    tamper(copy_of_big, "UPDATE facts SET amount = '1000000' WHERE seq = ?", (seq,))
    report = Ledger(copy_of_big, readonly=True).verify(workers)
    assert not report.ok
    assert report.first_bad_seq == seq and report.last_seq == seq
    assert "hash does not match" in report.problem


def test_verify_names_the_first_of_several_bad_rows(copy_of_big, workers):
    tamper(copy_of_big, "UPDATE facts SET data = '{}' WHERE seq IN (7000, 5000)")
    tamper(copy_of_big, "UPDATE facts SET ts = 0 WHERE seq = 8000")
    report = Ledger(copy_of_big, readonly=True).verify(workers)
    assert report.first_bad_seq == 5000 and report.rows == 5000


@pytest.mark.parametrize("seq", [1, 5, 3003, 3004, 4097, 6006, 6007, 9009])
def test_verify_reports_a_deleted_row_as_a_gap(copy_of_big, seq, workers):
    last = Ledger(copy_of_big, readonly=True).last_seq()
    tamper(copy_of_big, "DELETE FROM facts WHERE seq = ?", (seq,))
    report = Ledger(copy_of_big, readonly=True).verify(workers)
    if seq == last:  # removing the newest rows leaves a valid shorter chain: see the report
        assert report.ok and report.last_seq == last - 1
        return
    assert not report.ok and report.first_bad_seq == report.last_seq == seq + 1
    assert report.problem == f"sequence gap: expected {seq}, found {seq + 1}"
    assert report.rows == seq  # the rows before the gap and the one after it


def test_verify_names_a_forged_row_and_a_replaced_hash(copy_of_big, workers):
    with Ledger(copy_of_big) as ledger:
        last = ledger.last_seq()
        ledger.append([Fact("note", TS, data={"real": True})])
    forged = Fact("note", TS, data={"forged": True}).row(last + 2)
    tamper(copy_of_big, f"INSERT INTO facts VALUES ({', '.join('?' * 16)})",
           (*forged, sha256(b"made up").digest()))
    assert Ledger(copy_of_big, readonly=True).verify(workers).first_bad_seq == last + 2
    tamper(copy_of_big, "UPDATE facts SET hash = lower(hex(hash)) WHERE seq = 300")
    report = Ledger(copy_of_big, readonly=True).verify(workers)
    assert report.first_bad_seq == 300 and "32-byte" in report.problem


@pytest.mark.parametrize("seq", [3003, 6006])
def test_a_bad_hash_just_before_a_share_is_named_as_in_one_walk(copy_of_big, seq, workers):
    tamper(copy_of_big, "UPDATE facts SET hash = lower(hex(hash)) WHERE seq = ?", (seq,))
    report = Ledger(copy_of_big, readonly=True).verify(workers)
    assert (report.first_bad_seq, report.rows) == (seq, seq)
    assert "32-byte" in report.problem


def test_verify_checks_in_one_process_when_none_can_start(copy_of_big, monkeypatch, caplog):
    def no_processes(*args, **kwargs):
        raise OSError("no processes here")

    monkeypatch.setattr(verify_module, "ProcessPoolExecutor", no_processes)
    tamper(copy_of_big, "UPDATE facts SET amount = '7' WHERE seq = 5000")
    report = Ledger(copy_of_big, readonly=True).verify(3)
    assert (report.ok, report.first_bad_seq) == (False, 5000)
    assert "checking in one" in caplog.text


def test_verify_shares_only_large_ledgers_among_the_cores():
    assert verify_module.workers_for(9_000, 8) == 1
    assert verify_module.workers_for(1_000_000, 2) == 2
    assert verify_module.workers_for(1_000_000, 8) == 4
    assert verify_module.workers_for(50_000_000, 64) == verify_module.MAX_WORKERS


@pytest.mark.parametrize("seqs", [(0,), (-5,), (-5, 0)])
def test_a_row_forged_before_the_first_is_a_gap(copy_of_big, seqs, workers):
    for seq in seqs:
        forged = Fact("note", TS, data={"forged": True}).row(seq)
        tamper(copy_of_big, f"INSERT INTO facts VALUES ({', '.join('?' * 16)})",
               (*forged, sha256(b"made up").digest()))
    report = Ledger(copy_of_big, readonly=True).verify(workers)
    assert (report.ok, report.first_bad_seq) == (False, seqs[0])
    assert report.problem == f"sequence gap: expected 1, found {seqs[0]}"


def test_a_row_sqlite_encodes_differently_is_rechecked_in_python():
    rows = [Fact("note", TS + i, data={"i": i}).row(i) for i in range(1, 6)]
    hashes, prev = [], GENESIS
    for row in rows:
        prev = link(prev, row)
        hashes.append(prev)
    bodies = [canonical(r) for r in rows]
    odd = bodies.copy()
    odd[2] = odd[2].replace(b'"i', b'"\\u0069')  # same JSON text, other bytes
    walk = list(zip([r[0] for r in rows], hashes, odd, strict=True))
    assert check_chain(walk)[2] == (3, "hash does not match the row's contents and the "
                                       "previous hash")
    assert check_chain(walk, recheck=lambda seq: bodies[seq - 1]) == (5, 5, None)
    assert check_chain(walk, recheck=lambda seq: odd[seq - 1])[2][0] == 3


def test_the_latest_stamp_a_fact_may_carry_still_folds(tmp_path):
    # A later one (a broken clock) was accepted once and then stopped every fold for good.
    with Ledger(tmp_path / "bot.db") as ledger:
        ledger.append([Fact("position_opened", TS, symbol="X/USDT:USDT", side="long",
                            amount="1", price="1", position_id="p"),
                       Fact("position_closed", MAX_TS, symbol="X/USDT:USDT", position_id="p",
                            price="2", pnl="1", fee="0.1", reason="test")])
        assert ledger.state().realized_today is not None
        with pytest.raises(FactError, match="end of year 9999"):
            ledger.append([Fact("note", MAX_TS + 1)])
        assert ledger.last_seq() == 2
