"""Unit tests of engine/catalog.py, the repository's SQLite catalog, used directly; the
behaviours every backend shares run against the PostgreSQL catalog too (``backend``).

Schema creation and version refusal, open/create refusals, durable transactions (rollback on
an exception, nested transactions joining the outer one, a failed COMMIT leaving the catalog
as it was), the journal's row lifecycle, the timestamp format, the one-owner-thread rule,
the read-only mode, and every public row method's happy path and not-found behaviour.
"""

from __future__ import annotations

import datetime as dt
import errno
import re
import sqlite3
import threading

import poke
import pytest

import engine
from engine import catalog as cat
from engine.catalog import Catalog, ChainRow, JournalRow, SnapshotRow, VolumeRow

TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "catalog.db")


class SqliteBackend:
    """The SQLite catalog in a file, and a plain connection behind its back."""

    IntegrityError = sqlite3.IntegrityError

    def __init__(self, path):
        self.path = path

    def make(self, *, create=False, readonly=False):
        return Catalog(self.path, create=create, readonly=readonly)

    def raw(self, sql):
        """SQL's rows, run behind the catalog's back (foreign keys not enforced)."""
        db = raw(self.path)
        try:
            return [tuple(r) for r in db.execute(sql).fetchall()]
        finally:
            db.close()

    @staticmethod
    def in_transaction(c):
        return c._db.in_transaction


class PgBackend:
    """The PostgreSQL catalog in a new database of the session's server."""

    def __init__(self, url):
        import psycopg
        self.url = url
        self.IntegrityError = psycopg.IntegrityError

    def make(self, *, create=False, readonly=False):
        from engine.catalog_pg import PgCatalog
        return PgCatalog(self.url, create=create, readonly=readonly)

    def raw(self, sql):
        import psycopg
        with psycopg.connect(self.url, autocommit=True) as db:
            db.execute("SET session_replication_role = replica")   # foreign keys not enforced
            cur = db.execute(sql)
            return [tuple(r) for r in cur.fetchall()] if cur.description else []

    @staticmethod
    def in_transaction(c):
        import psycopg
        return c._db.info.transaction_status != psycopg.pq.TransactionStatus.IDLE


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, db_path):
    """Each catalog backend in turn: the behaviours below hold for both."""
    if request.param == "sqlite":
        return SqliteBackend(db_path)
    return PgBackend(request.getfixturevalue("pg_url"))


@pytest.fixture
def c(backend):
    catalog = backend.make(create=True)
    yield catalog
    catalog.close()


def raw(path) -> sqlite3.Connection:
    """A plain SQLite connection to the catalog file, behind the Catalog's back."""
    return sqlite3.connect(path, isolation_level=None)


def vol(vid="v1", chain="c1", *, path=None, fmt="qcow2", role="leaf", parent=None,
        created=None) -> VolumeRow:
    return VolumeRow(id=vid, chain=chain, path=path or f"volumes/{vid}.{fmt}", format=fmt,
                     role=role, parent=parent, legality="LEGAL", created=created or cat.now())


def chain_row(name="c1", leaf="v1") -> ChainRow:
    return ChainRow(name=name, size=1 << 20, cluster_size=65536, created=cat.now(), leaf=leaf)


def add_chain(c: Catalog, name="c1", vid="v1") -> None:
    """A chain and its one volume, in one transaction (the foreign keys are deferred)."""
    with c.transaction():
        c.insert_chain(chain_row(name, vid))
        c.insert_volume(vol(vid, name, role="base", fmt="raw"))


# --- schema, create/open refusals, versions ------------------------------------------------------

def test_create_makes_schema_and_version(db_path):
    c = Catalog(db_path, create=True)
    try:
        assert not c.closed and c.path == db_path
        assert c.chains() == [] and c.volumes() == {} and c.snapshots() == [] and c.journal() == []
        assert c.integrity_problems() == []
    finally:
        c.close()
    db = raw(db_path)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"schema_version", "chains", "volumes", "snapshots", "journal"} <= tables
    rows = db.execute("SELECT version, applied FROM schema_version").fetchall()
    assert len(rows) == 1 and rows[0][0] == cat.SCHEMA_VERSION and TS.match(rows[0][1])
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == cat.SCHEMA_VERSION   # mirrored
    db.close()


def test_user_version_mirrors_the_schema_version(db_path):
    """A file made before the mirror (user_version 0), or migrated, carries the schema
    version in ``PRAGMA user_version`` after a read-write open; a read-only open leaves it."""
    Catalog(db_path, create=True).close()
    db = raw(db_path)
    db.execute("PRAGMA user_version = 0")
    Catalog(db_path, readonly=True).close()
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    Catalog(db_path).close()
    assert db.execute("PRAGMA user_version").fetchone()[0] == cat.SCHEMA_VERSION
    db.execute("PRAGMA user_version = 0")
    poke.downgrade_catalog_to_v1(db_path)
    c = Catalog(db_path)
    assert c.version == cat.SCHEMA_VERSION
    c.close()
    assert db.execute("PRAGMA user_version").fetchone()[0] == cat.SCHEMA_VERSION
    db.close()


def test_reopen_existing(db_path):
    c = Catalog(db_path, create=True)
    add_chain(c)
    c.close()
    c = Catalog(db_path)
    try:
        assert [r.name for r in c.chains()] == ["c1"]
    finally:
        c.close()


def test_create_refuses_existing_file(db_path):
    Catalog(db_path, create=True).close()
    with pytest.raises(engine.RepositoryError, match="already exists"):
        Catalog(db_path, create=True)


def test_open_refuses_missing_file(db_path):
    with pytest.raises(engine.RepositoryError, match="missing"):
        Catalog(db_path)


def test_newer_schema_version_refused(db_path):
    Catalog(db_path, create=True).close()
    db = raw(db_path)
    db.execute("INSERT INTO schema_version VALUES (?, ?)", (cat.SCHEMA_VERSION + 1, cat.now()))
    db.close()
    with pytest.raises(engine.RepositoryError, match=f"schema version {cat.SCHEMA_VERSION + 1}") as e:
        Catalog(db_path)
    assert e.value.hint == "upgrade cowchain"
    assert not isinstance(e.value, sqlite3.Error)


def test_empty_schema_version_refused(db_path):
    Catalog(db_path, create=True).close()
    db = raw(db_path)
    db.execute("DELETE FROM schema_version")
    db.close()
    with pytest.raises(engine.RepositoryError, match="schema version None"):
        Catalog(db_path)


def test_older_or_equal_version_accepted(db_path):
    """max(version) decides: an extra row of an older version does not matter."""
    Catalog(db_path, create=True).close()
    db = raw(db_path)
    db.execute("INSERT INTO schema_version VALUES (0, ?)", (cat.now(),))
    db.close()
    Catalog(db_path).close()


def test_sqlite_file_without_schema_refused(db_path):
    db = raw(db_path)
    db.execute("CREATE TABLE other (x)")
    db.close()
    with pytest.raises(engine.RepositoryError, match="not a cowchain catalog"):
        Catalog(db_path)


def test_garbage_file_refused(db_path):
    with open(db_path, "wb") as f:
        f.write(b"this is not an sqlite database at all" * 200)
    with pytest.raises(engine.RepositoryError, match="cannot be used"):
        Catalog(db_path)


# --- transactions ------------------------------------------------------------------------------

def test_transaction_commits(c, backend):
    add_chain(c)
    # another connection sees the committed rows
    assert backend.raw("SELECT name, leaf FROM chains") == [("c1", "v1")]


def test_transaction_rolls_back_on_exception(c, backend):
    add_chain(c)
    with pytest.raises(KeyError):
        with c.transaction():
            c.update_chain("c1", size=2 << 20)
            c.insert_volume(vol("v2", "c1", role="leaf", parent="v1"))
            c.delete_snapshot("none")
            raise KeyError("boom")
    assert c.chain("c1").size == 1 << 20
    assert c.volume("v2") is None
    assert not backend.in_transaction(c)
    add_chain(c, "c2", "w1")     # the catalog is usable afterwards
    assert [r.name for r in c.chains()] == ["c1", "c2"]


def test_nested_transaction_joins_outer(c):
    """An inner transaction does not commit on its own; an exception anywhere rolls back both."""
    with pytest.raises(RuntimeError):
        with c.transaction():
            with c.transaction():
                c.insert_chain(chain_row())
                c.insert_volume(vol(role="base", fmt="raw"))
            assert c.chain("c1") is not None       # visible inside the outer transaction
            raise RuntimeError("after the inner block")
    assert c.chain("c1") is None and c.volume("v1") is None
    with c.transaction():
        with pytest.raises(ValueError):
            with c.transaction():
                raise ValueError("inner")
        add_chain(c)                               # the outer one goes on and commits
    assert c.chain("c1") is not None


def test_failed_commit_rolls_back(c, backend):
    """A deferred foreign key broken at COMMIT: the error is loud (an IntegrityError: a bug in
    our own code, not bad input) and the catalog is as it was, with no transaction left open."""
    add_chain(c)
    with pytest.raises(backend.IntegrityError):
        with c.transaction():
            c.update_chain("c1", size=5)
            c.insert_chain(chain_row("c2", leaf="no-such-volume"))
    assert c.chain("c1").size == 1 << 20 and c.chain("c2") is None
    assert not backend.in_transaction(c)
    assert c.integrity_problems() == []


def test_integrity_error_is_not_translated(c, backend):
    add_chain(c)
    with pytest.raises(backend.IntegrityError):
        c.insert_chain(chain_row())               # duplicate primary key


# --- timestamps --------------------------------------------------------------------------------

def test_now_format_and_parse_roundtrip():
    before = dt.datetime.now(dt.timezone.utc)
    text = cat.now()
    after = dt.datetime.now(dt.timezone.utc)
    assert TS.match(text), text
    t = cat.parse_time(text)
    assert t.tzinfo == dt.timezone.utc
    assert before - dt.timedelta(microseconds=1) <= t <= after
    assert cat.parse_time("2026-01-02T03:04:05.123456Z") == dt.datetime(
        2026, 1, 2, 3, 4, 5, 123456, tzinfo=dt.timezone.utc)
    # The text sorts like the time it stands for (the catalog orders rows by it).
    assert sorted(["2026-01-02T03:04:05.000001Z", "2025-12-31T23:59:59.999999Z"])[0] \
        .startswith("2025")


def test_parse_time_rejects_other_formats():
    for bad in ("2026-01-02 03:04:05", "2026-01-02T03:04:05Z", "2026-01-02T03:04:05.123456+00:00"):
        with pytest.raises(ValueError):
            cat.parse_time(bad)


# --- thread owner, closed, read-only -------------------------------------------------------------

def test_other_thread_refused(c):
    add_chain(c)
    caught = []

    def use():
        try:
            c.chains()
        except BaseException as e:  # noqa: BLE001 - the test inspects what was raised
            caught.append(e)

    t = threading.Thread(target=use)
    t.start()
    t.join()
    assert len(caught) == 1 and isinstance(caught[0], engine.RepositoryError), caught
    assert "thread" in str(caught[0])
    assert [r.name for r in c.chains()] == ["c1"]   # the owner goes on


def test_closed_catalog_refuses_use(backend):
    c = backend.make(create=True)
    c.close()
    assert c.closed
    c.close()                                       # closing twice is harmless
    with pytest.raises(engine.RepositoryError, match="closed"):
        c.chains()
    with pytest.raises(engine.RepositoryError, match="closed"):
        c.journal_begin("op", None, {})


def test_readonly_reads_and_refuses_writes(backend):
    w = backend.make(create=True)
    add_chain(w)
    r = backend.make(readonly=True)
    try:
        assert [x.name for x in r.chains()] == ["c1"]
        with pytest.raises(engine.RepositoryError, match="readonly"):
            r.update_chain("c1", size=5)
        with pytest.raises(engine.RepositoryError):
            r.journal_begin("op", "c1", {})
        add_chain(w, "c2", "w1")                    # a writer commits beside the reader
        assert [x.name for x in r.chains()] == ["c1", "c2"]
    finally:
        r.close()
        w.close()
    w = backend.make()
    assert w.chain("c1").size == 1 << 20
    w.close()


# --- error translation -------------------------------------------------------------------------

def test_translate_maps_errors_to_typed_ones():
    full = cat._translate(sqlite3.OperationalError("database or disk is full"), "p")
    assert isinstance(full, engine.NoSpace) and full.errno == errno.ENOSPC and full.path == "p"
    eio = cat._translate(sqlite3.OperationalError("disk I/O error"), "p")
    assert isinstance(eio, engine.EngineIOError) and eio.errno == errno.EIO
    other = cat._translate(sqlite3.OperationalError("no such table: x"), "p")
    assert type(other) is engine.RepositoryError and "no such table" in str(other)


# --- chains ------------------------------------------------------------------------------------

def test_chain_methods(c, backend):
    assert c.chain("c1") is None
    add_chain(c, "b")
    add_chain(c, "a", "w1")
    assert [r.name for r in c.chains()] == ["a", "b"]          # ordered by name
    row = c.chain("b")
    assert row == ChainRow(name="b", size=1 << 20, cluster_size=65536, created=row.created,
                           leaf="v1")
    assert TS.match(row.created)
    with c.transaction():
        c.insert_volume(vol("v9", "b", parent="v1"))
        c.update_chain("b", leaf="v9", preview=None, origin_chain="a", origin_snapshot="s")
    row = c.chain("b")
    assert (row.leaf, row.origin_chain, row.origin_snapshot) == ("v9", "a", "s")
    c.update_chain("b")                                         # no changes: nothing happens
    assert c.chain("b") == row
    c.update_chain("missing", size=1)                           # not found: no row, no error
    assert c.chain("missing") is None
    with pytest.raises(ValueError, match="cannot update chains"):
        c.update_chain("b", colour="red")
    with pytest.raises(backend.IntegrityError):
        c.delete_chain("a")                                     # its volume still names it
    assert c.chain("a") is not None
    with c.transaction():                                       # chain and volumes together
        c.delete_volume("w1")
        c.delete_chain("a")
    c.delete_chain("missing")                                   # not found: nothing happens
    assert [r.name for r in c.chains()] == ["b"]


# --- volumes -----------------------------------------------------------------------------------

def test_volume_methods(c, backend):
    assert c.volume("v1") is None and c.children("v1") == []
    add_chain(c)
    c.insert_volume(vol("v3", parent="v1", created="2026-01-01T00:00:02.000000Z"))
    c.insert_volume(vol("v2", parent="v1", role="internal",
                        created="2026-01-01T00:00:01.000000Z"))
    assert set(c.volumes()) == {"v1", "v2", "v3"}
    assert c.volumes()["v2"] == c.volume("v2")
    assert c.volume("v1").format == "raw" and c.volume("v1").parent is None
    assert [v.id for v in c.children("v1")] == ["v2", "v3"]      # ordered by created
    c.update_volume("v3", legality="ILLEGAL", role="shared")
    assert (c.volume("v3").legality, c.volume("v3").role) == ("ILLEGAL", "shared")
    c.update_volume("missing", legality="LEGAL")
    assert c.volume("missing") is None
    with pytest.raises(ValueError):
        c.update_volume("v3", id="v4")
    with pytest.raises(backend.IntegrityError):               # the schema's CHECK constraints
        c.update_volume("v3", role="bogus")
    with pytest.raises(backend.IntegrityError):
        c.insert_volume(vol("v5", path="volumes/v1.raw"))         # paths are unique
    c.delete_volume("v3")
    c.delete_volume("missing")
    assert set(c.volumes()) == {"v1", "v2"}


# --- snapshots ---------------------------------------------------------------------------------

def test_snapshot_methods(c):
    assert c.snapshot("s1") is None and c.snapshots() == [] and c.snapshots("c1") == []
    add_chain(c)
    add_chain(c, "c2", "w1")
    c.insert_snapshot(SnapshotRow(id="s1", chain="c1", created=cat.now(), description="first",
                                  volume="v1"))
    c.insert_snapshot(SnapshotRow(id="s2", chain="c2", created=cat.now(), description="",
                                  volume="w1"))
    c.insert_snapshot(SnapshotRow(id="s3", chain="c1", created=cat.now(), description="third",
                                  volume="v1"))
    s1 = c.snapshot("s1")
    assert s1.seq is not None and s1.description == "first" and TS.match(s1.created)
    assert [s.id for s in c.snapshots()] == ["s1", "s2", "s3"]    # creation order
    assert [s.id for s in c.snapshots("c1")] == ["s1", "s3"]
    assert c.snapshots("missing") == []
    assert c.snapshot("s3").seq > c.snapshot("s2").seq > s1.seq
    c.update_snapshot("s1", description="renamed")
    assert c.snapshot("s1").description == "renamed"
    c.update_snapshot("missing", description="x")
    with pytest.raises(ValueError):
        c.update_snapshot("s1", id="s9")
    c.delete_snapshot("s2")
    c.delete_snapshot("missing")
    assert [s.id for s in c.snapshots()] == ["s1", "s3"]


# --- journal -----------------------------------------------------------------------------------

def test_journal_lifecycle(c):
    add_chain(c)
    with c.transaction():
        jid = c.journal_begin("delete_snapshot", "c1", {"snapshot": "s1", "n": [1, 2]})
    rows = c.journal()
    assert rows == [JournalRow(id=jid, op="delete_snapshot", chain="c1",
                               args={"n": [1, 2], "snapshot": "s1"}, step="intent",
                               state="running", started=rows[0].started)]
    assert TS.match(rows[0].started)
    c.journal_step(jid, "merged")
    assert c.journal()[0].step == "merged" and c.journal()[0].state == "running"
    with c.transaction():
        c.journal_commit(jid, {"remove": ["volumes/x.qcow2"]})
    row = c.journal()[0]
    assert (row.state, row.step, row.args) == ("committed", "committed",
                                               {"remove": ["volumes/x.qcow2"]})
    c.journal_end(jid)
    assert c.journal() == []


def test_journal_order_and_initial_state(c, backend):
    a = c.journal_begin("op_a", None, {})
    b = c.journal_begin("op_b", "c1", {"x": 1}, state="committed")
    assert b > a
    rows = c.journal()
    assert [r.id for r in rows] == [a, b]                       # oldest first
    assert (rows[0].chain, rows[0].args, rows[0].state) == (None, {}, "running")
    assert (rows[1].state, rows[1].step) == ("committed", "intent")
    with pytest.raises(backend.IntegrityError):                 # the state CHECK constraint
        c.journal_begin("op_c", None, {}, state="half-done")


def test_journal_not_found_is_a_no_op(c):
    jid = c.journal_begin("op", None, {})
    c.journal_step(jid + 100, "x")
    c.journal_commit(jid + 100, {})
    c.journal_end(jid + 100)
    assert [(r.id, r.step, r.state) for r in c.journal()] == [(jid, "intent", "running")]


def test_journal_rows_roll_back_with_their_transaction(c):
    with pytest.raises(OSError):
        with c.transaction():
            c.journal_begin("op", None, {"a": 1})
            raise OSError("the file step failed")
    assert c.journal() == []


def test_journal_args_must_be_json(c):
    with pytest.raises(TypeError):
        c.journal_begin("op", None, {"bad": object()})
    assert c.journal() == []


# --- maintenance -------------------------------------------------------------------------------

def test_integrity_problems_reports_broken_foreign_keys(c, backend):
    add_chain(c)
    assert c.integrity_problems() == []
    backend.raw("INSERT INTO snapshots (id, chain, created, volume) VALUES ('s', 'nochain', "
                "'2026-01-01T00:00:00.000000Z', 'novolume')")   # foreign keys off there
    problems = c.integrity_problems()
    assert problems and all(p.startswith("foreign key:") for p in problems), problems


# --- the volume row and the public Volume: one field list ----------------------------------------

def test_volume_row_and_public_volume_build_on_one_field_list(c, tmp_path):
    """The catalog's VolumeRow and the repository's public Volume share their fields through
    VolumeFields (declared once); a row is a value: a change is a new row, not a mutation."""
    import dataclasses

    from engine.catalog import VolumeFields
    from engine.repository import Repository, Volume

    shared = [f.name for f in dataclasses.fields(VolumeFields)]
    assert shared == ["id", "chain", "path", "format", "role", "parent", "legality"]
    assert [f.name for f in dataclasses.fields(Volume)] == shared + ["created"]
    assert [f.name for f in dataclasses.fields(VolumeRow)][:len(shared) + 1] == \
        shared + ["created"]
    row = vol()
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.role = "base"                                     # type: ignore[misc]
    assert dataclasses.replace(row, role="base").role == "base" and row.role == "leaf"
    with Repository.create(tmp_path / "repo") as repo:
        vm = repo.create_chain("vm", 1 << 20)
        [v] = vm.volumes
        r = repo._cat.volume(v.id)
        assert isinstance(v, VolumeFields) and isinstance(r, VolumeFields)
        assert {k: getattr(v, k) for k in shared if k != "path"} == \
            {k: getattr(r, k) for k in shared if k != "path"}
        assert v.path == str(tmp_path / "repo" / r.path)


def _traced(monkeypatch) -> list[str]:
    """The SQL statements the catalog's connections run from now on."""
    seen: list[str] = []
    real = cat.sqlite3.connect

    def connect(*args, **kwargs):
        db = real(*args, **kwargs)
        db.set_trace_callback(seen.append)
        return db

    monkeypatch.setattr(cat.sqlite3, "connect", connect)
    return seen


def test_open_of_a_current_catalog_runs_no_schema_statement(db_path, monkeypatch):
    Catalog(db_path, create=True).close()
    seen = _traced(monkeypatch)
    Catalog(db_path).close()
    assert seen and not [s for s in seen if s.lstrip().upper().startswith(("CREATE", "ALTER",
                                                                            "DROP"))]


def test_version_3_adds_the_keyed_reads_indexes(db_path):
    """A version 2 catalog (no indexes for the keyed reads) is brought to version 3 by a
    read-write open, indexes included; a read-only open reads it as it is."""
    Catalog(db_path, create=True).close()
    db = raw(db_path)
    names = ["chains_leaf", "chains_saved_leaf", "snapshots_volume", "volumes_flagged",
             "volumes_unrecorded"]
    for n in names:
        db.execute(f"DROP INDEX {n}")
    db.execute("DELETE FROM schema_version WHERE version = 3")
    db.execute("INSERT INTO schema_version VALUES (2, '2026-01-01T00:00:00.000000Z')")
    db.execute("PRAGMA user_version = 2")
    ro = Catalog(db_path, readonly=True)
    assert ro.version == 2
    ro.close()
    Catalog(db_path).close()
    have = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert set(names) <= have
    assert [r[0] for r in db.execute("SELECT version FROM schema_version ORDER BY 1")] == [2, 3]
    db.close()
