"""Bad files and bad disks: each is refused with a clear error, and nothing already
recorded is lost (the bytes of a refused file never change)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from ledger import Fact, Ledger, LedgerError, LedgerWriteError, schema

TS = 1_767_225_600_000


def facts(n: int, batch: str = "b", pad: int = 0) -> list[Fact]:
    return [Fact("note", TS + i, reason="x" * pad, data={"b": batch, "i": i, "n": n})
            for i in range(n)]


def fingerprint(*paths: Path) -> dict[str, str | None]:
    """sha256 of each database file and its side files (None where absent)."""
    files = [Path(f"{p}{s}") for p in paths for s in ("", "-wal", "-journal", "-shm")]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else None
            for f in files}


def refused(path: Path, match: str) -> None:
    """Both a writer and a reader refuse ``path`` with a message matching ``match``."""
    for readonly in (False, True):
        with pytest.raises(LedgerError, match=match):
            Ledger(path, readonly=readonly)


def intact(path: Path, rows: list[tuple]) -> None:
    with Ledger(path, readonly=True) as reader:
        assert list(reader.rows()) == rows
        assert reader.verify().ok
        assert reader.state() == reader.replay()


@pytest.fixture
def recorded(ledger_path) -> list[tuple]:
    """A ledger with a few batches in it; returns its rows."""
    with Ledger(ledger_path, checkpoint_every=7) as ledger:
        for b in range(4):
            ledger.append(facts(5, f"b{b}"))
        return list(ledger.rows())


# -- files that are not (or not yet, or no longer) our ledger -----------------------------


def test_a_directory_is_refused(tmp_path):
    path = tmp_path / "bot.db"
    path.mkdir()
    refused(path, "is a directory")
    assert path.is_dir() and list(path.iterdir()) == []


def test_random_bytes_are_refused_and_left_alone(tmp_path):
    for name, content in (("noise.db", b"\x00garbage" + os.urandom(8000)), ("tiny.db", b"ab\n")):
        path = tmp_path / name
        path.write_bytes(content)
        before = fingerprint(path)
        refused(path, "not an SQLite database; refusing to touch it")
        assert path.read_bytes() == content and fingerprint(path) == before


def test_a_damaged_sqlite_file_is_refused_and_left_alone(ledger_path, recorded):
    content = ledger_path.read_bytes()
    damaged = content[:16] + os.urandom(len(content) - 16)  # header kept, pages destroyed
    ledger_path.write_bytes(damaged)
    before = fingerprint(ledger_path)
    refused(ledger_path, "not a readable SQLite database")
    assert ledger_path.read_bytes() == damaged and fingerprint(ledger_path) == before


def test_another_programs_database_is_never_migrated(tmp_path, run_python):
    """A rollback-journal file and a WAL file whose -wal still holds committed rows."""
    plain = tmp_path / "plain.db"
    conn = sqlite3.connect(plain)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.execute("INSERT INTO users VALUES ('ada')")
    conn.commit()
    conn.close()
    wal = tmp_path / "wal.db"
    out = run_python("""
        import os, sqlite3, sys
        conn = sqlite3.connect(sys.argv[1], isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.execute("INSERT INTO users VALUES ('grace')")
        os._exit(0)  # no close: the committed rows stay in the -wal file
    """, wal)
    assert out.returncode == 0, out.stderr
    assert Path(f"{wal}-wal").stat().st_size > 0
    for path in (plain, wal):
        before = fingerprint(path)
        refused(path, "not a ledger of this bot")
        after = fingerprint(path)
        after.pop(f"{wal.name}-shm", None)  # SQLite's scratch index, rebuilt by any reader
        before.pop(f"{wal.name}-shm", None)
        assert after == before
    assert sqlite3.connect(wal).execute("SELECT name FROM users").fetchall() == [("grace",)]


def test_a_newer_schema_is_refused_naming_both_versions(ledger_path, recorded):
    conn = sqlite3.connect(ledger_path, isolation_level=None)
    conn.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 41}")
    conn.close()
    before = fingerprint(ledger_path)
    refused(ledger_path, f"schema version {schema.SCHEMA_VERSION + 41} is newer than this "
                         f"code's version {schema.SCHEMA_VERSION}")
    assert fingerprint(ledger_path) == before


def test_an_unreadable_file_is_refused(ledger_path, recorded, run_python):
    before = fingerprint(ledger_path)
    ledger_path.chmod(0)
    try:
        if os.geteuid() != 0:
            refused(ledger_path, "cannot read")
        else:
            # chmod does not stop root: run the check as root without the capabilities
            # that bypass file permissions (what an ordinary user would be).
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root and setpriv (util-linux) is missing: no honest "
                            "way to make a file unreadable")
            out = run_python("""
                import sys
                from pathlib import Path
                from ledger import Ledger, LedgerError
                Path(sys.argv[2]).read_bytes()  # control: readable files still read
                for readonly in (False, True):
                    try:
                        Ledger(sys.argv[1], readonly=readonly)
                        print("OPENED")
                    except LedgerError as exc:
                        print(exc)
            """, ledger_path, Path(__file__), prefix=(
                setpriv, "--bounding-set", "-dac_override,-dac_read_search"))
            assert out.returncode == 0, out.stderr
            lines = out.stdout.splitlines()
            assert len(lines) == 2 and all("cannot read (Permission denied)" in line
                                           for line in lines), out.stdout
    finally:
        ledger_path.chmod(0o644)
    assert fingerprint(ledger_path) == before
    intact(ledger_path, recorded)


# -- disks that refuse writes --------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs folder; remount(folder, options). Skips where the
    sandbox forbids mounting; unmounts at teardown."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if shutil.which("mount") is None:
            pytest.skip("no mount(8) here")
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                              str(point)], capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs in this sandbox: {out.stderr.strip()}")
        mounted.append(point)
        return point

    def remount(point: Path, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True)

    mount.remount = remount
    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_read_only_filesystem(tmpfs, run_python):
    folder = tmpfs("8m")
    clean, crashed = folder / "clean.db", folder / "crashed.db"
    with Ledger(clean) as ledger:
        ledger.append(facts(10))
        rows = list(ledger.rows())
    # A writer that died without closing: its last rows live only in the -wal file.
    out = run_python("""
        import os, sys
        from ledger import Fact, Ledger
        ledger = Ledger(sys.argv[1])
        ledger.append([Fact("note", 1, data={"i": i}) for i in range(10)])
        os._exit(0)
    """, crashed)
    assert out.returncode == 0, out.stderr
    assert Path(f"{crashed}-wal").exists()
    before = fingerprint(clean, crashed)
    tmpfs.remount(folder, "ro")
    for path in (clean, crashed):
        with pytest.raises(LedgerError, match=r"not writable \(read-only filesystem\)"):
            Ledger(path)
        with Ledger(path, readonly=True) as reader:  # reading still works
            assert reader.last_seq() == 10 and reader.verify().ok
            assert reader.state() == reader.replay()
    with Ledger(clean, readonly=True) as reader:
        assert list(reader.rows()) == rows
    with pytest.raises(LedgerError, match=r"cannot create .* \(read-only filesystem\)"):
        Ledger(folder / "new.db")
    tmpfs.remount(folder, "rw")
    assert fingerprint(clean, crashed) == before
    with Ledger(crashed) as ledger:  # and the crashed one carries on once writable
        assert ledger.append(facts(1)) == [11] and ledger.verify().ok


def test_disk_full_rolls_the_batch_back_whole(ledger_path, recorded):
    """SQLITE_FULL for real: the writer's connection may not grow the file."""
    with Ledger(ledger_path, checkpoint_every=7) as ledger:
        ledger.state()  # the cached state must not see the lost batch either
        conn = ledger._conn()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")
        with pytest.raises(LedgerWriteError, match="full.*earlier facts are intact"):
            ledger.append(facts(200, "big", pad=200))
        assert list(ledger.rows()) == recorded
        assert ledger.state() == ledger.replay()
        conn.execute("PRAGMA max_page_count = 1073741823")  # space returns
        seqs = ledger.append(facts(200, "big", pad=200))
        assert seqs[0] == recorded[-1][0] + 1
        assert ledger.state() == ledger.replay()
    rows = Ledger(ledger_path, readonly=True).select(
        "SELECT count(*) AS n FROM facts WHERE json_extract(data, '$.b') = 'big'")
    assert rows == [{"n": 200}]
    intact(ledger_path, recorded + list(Ledger(ledger_path).rows(after=recorded[-1][0])))


def test_a_full_filesystem(tmpfs):
    """A small real tmpfs runs out of space in the middle of the WAL."""
    folder = tmpfs("512k")
    path = folder / "bot.db"
    with Ledger(path, checkpoint_every=50) as ledger:
        committed = 0
        for b in range(400):
            try:
                ledger.append(facts(20, f"b{b}", pad=300))
                committed += 1
            except LedgerWriteError as exc:
                assert "full" in str(exc) and "earlier facts are intact" in str(exc)
                break
        else:
            pytest.fail("the filesystem never filled up")
        assert committed >= 3  # it filled up with rows in it, not at creation
        rows = list(ledger.rows())
        assert ledger.verify().ok and ledger.state() == ledger.replay()
        with pytest.raises(LedgerWriteError):  # still full: refused again, nothing lost
            ledger.append(facts(20, "again", pad=300))
        assert list(ledger.rows()) == rows
        tmpfs.remount(folder, "size=16m")
        ledger.append(facts(20, "after", pad=300))
        assert ledger.verify().ok
    with Ledger(path, readonly=True) as reader:
        counts = reader.select("SELECT json_extract(data, '$.b') AS b, count(*) AS n FROM facts "
                               "WHERE type = 'note' GROUP BY b")
        assert sorted(r["n"] for r in counts) == [20] * (committed + 1)  # no half batch
        assert {r["b"] for r in counts} == {f"b{b}" for b in range(committed)} | {"after"}
        assert list(reader.rows())[:len(rows)] == rows
        assert reader.state() == reader.replay()
