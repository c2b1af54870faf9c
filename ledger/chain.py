"""The hash chain: a byte-stable canonical encoding of a row and its sha256 link.

canonical(row) is the row's values in COLUMNS order as a compact JSON array, UTF-8:
integers in decimal, NULL as null, text as a JSON string in which only ``"`` and
``\\`` are escaped (text columns carry no control characters; ``data`` is ASCII JSON).
That is exactly what SQLite's ``json_array()`` prints for the same values, so
``verify`` streams the encoding out of SQLite at C speed; a row whose hash does not
match is re-encoded in Python before it is called bad, so a different SQLite build
can never produce a false alarm. Tests prove the two encoders agree.

    hash[n] = sha256(hash[n-1] || canonical(row[n])),  hash[0] = 32 zero bytes
"""

from __future__ import annotations

import json
from hashlib import sha256

COLUMNS = (
    "seq", "ts", "type", "run_id", "symbol", "side", "amount", "price", "fee", "pnl",
    "position_id", "client_order_id", "exchange_order_id", "reason", "data",
)
GENESIS = bytes(32)
CANONICAL_SQL = f"CAST(json_array({', '.join(COLUMNS)}) AS BLOB)"


def _unencodable(value):
    raise TypeError(f"cannot encode {type(value).__name__} in the ledger")


def compact_encoder(*, ensure_ascii: bool, sort_keys: bool, default=_unencodable):
    """A compact JSON encoder (no NaN): obj -> str.

    Builds CPython's C encoder once instead of per call (json's own encode() rebuilds
    it every time, which costs more than the encoding of a small row). Falls back to
    the documented JSONEncoder if the C encoder is missing or disagrees on a sample.
    Without markers a self-referencing value recurses until RecursionError.
    """
    std = json.JSONEncoder(ensure_ascii=ensure_ascii, sort_keys=sort_keys, allow_nan=False,
                           separators=(",", ":"), default=default).encode
    try:
        from json.encoder import (  # CPython's accelerators
            c_make_encoder,
            encode_basestring,
            encode_basestring_ascii,
        )

        escape = encode_basestring_ascii if ensure_ascii else encode_basestring
        c_encode = c_make_encoder(None, default, escape, None, ":", ",", sort_keys, False,
                                  False)

        def fast(obj) -> str:
            return "".join(c_encode(obj, 0))

        sample = {"b": [1, -2, 0.5, 1e100, None, True, "q\"\\\n\u00e9\U0001d11e"], "a": {}}
        if fast(sample) == std(sample) and fast((7, "x", None)) == std((7, "x", None)):
            return fast
    except (ImportError, TypeError, ValueError):
        pass
    return std


_encode = compact_encoder(ensure_ascii=False, sort_keys=False)


def canonical(values: tuple) -> bytes:
    return _encode(values).encode("utf-8")


def link(prev: bytes, values: tuple) -> bytes:
    return sha256(prev + canonical(values)).digest()


def encode_tail(values_after_seq: tuple) -> bytes:
    """canonical() of a row minus its leading ``[seq,``: computed before the write lock."""
    return _encode(values_after_seq).encode("utf-8")[1:]


def link_tail(prev: bytes, seq: int, tail: bytes) -> bytes:
    """Same as link(prev, (seq, *values)) given tail = encode_tail(values)."""
    return sha256(b"%s[%d,%s" % (prev, seq, tail)).digest()


def verify_rows(rows, prev: bytes = GENESIS, expected_seq: int = 1, recheck=None):
    """Walk (seq, hash, canonical bytes) rows; return (first bad seq, why) or None."""
    return check_chain(rows, prev, expected_seq, recheck)[2]


def check_chain(rows, prev: bytes = GENESIS, expected_seq: int = 1, recheck=None):
    """Walk (seq, hash, canonical bytes) rows in seq order.

    Returns (rows examined, last seq examined, bad) where bad is (first bad seq, why)
    or None. A gap in the sequence is reported even if every remaining link was
    recomputed. ``recheck(seq)`` returns the Python encoding of a row, used before
    declaring it bad. Each link is checked against the stored previous hash, so an
    edited row is named itself and not every row after it. (A plain loop: measured
    faster than batching the rows through map() and zip().)
    """
    start = expected_seq
    for seq, stored, body in rows:
        if seq != expected_seq:
            return expected_seq - start + 1, seq, (
                seq, f"sequence gap: expected {expected_seq}, found {seq}")
        if sha256(prev + body).digest() != stored:
            if type(stored) is not bytes or len(stored) != 32:
                return expected_seq - start + 1, seq, (seq, "stored hash is not a 32-byte blob")
            if recheck is None or sha256(prev + recheck(seq)).digest() != stored:
                return expected_seq - start + 1, seq, (
                    seq, "hash does not match the row's contents and the previous hash")
        prev = stored
        expected_seq += 1
    return expected_seq - start, expected_seq - 1, None
