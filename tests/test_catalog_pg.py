"""The PostgreSQL catalog (engine/catalog_pg.py) against a real server the suite starts.

The row, transaction and journal behaviours both backends share are in test_catalog_unit.py
(parametrized over both).  Here: what is PostgreSQL's own: the schema's creation, version
refusal and migration under the advisory lock, the fence hook, the per-connection timeouts,
and a server restart or crash in the middle of reads and transactions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest

import engine
from engine.catalog import ChainRow, VolumeRow, now, schema_sql
from engine.catalog_pg import (LEASE_DDL, MIGRATE_LOCK, PG_SCHEMA_VERSION, PgCatalog,
                               PgSettings)
from engine.errors import CatalogUnavailable, RepositoryError
from engine.repository.leases import LeaseManager, LeaseSettings
import test_repo_model

FAST = PgSettings(reconnect_wait=5.0)


def raw(url, sql, args=None):
    with psycopg.connect(url, autocommit=True) as db:
        cur = db.execute(sql, args)
        return [tuple(r) for r in cur.fetchall()] if cur.description else []


def tables(url):
    return {r[0] for r in raw(url, "SELECT tablename FROM pg_tables "
                                   "WHERE schemaname = current_schema()")}


def columns(url, table):
    return [r[0] for r in raw(url, "SELECT column_name FROM information_schema.columns "
                                   "WHERE table_name = %s ORDER BY ordinal_position", (table,))]


def add_chain(c, name="c1", vid="v1"):
    with c.transaction():
        c.insert_chain(ChainRow(name=name, size=1 << 20, cluster_size=65536, created=now(),
                                leaf=vid))
        c.insert_volume(VolumeRow(id=vid, chain=name, path=f"volumes/{vid}.raw", format="raw",
                                  role="base", parent=None, legality="LEGAL", created=now()))


@pytest.fixture
def c(pg_url):
    cat = PgCatalog(pg_url, create=True, repository_id="rid-1", settings=FAST)
    yield cat
    cat.close()


def make_v2(url):
    """A catalog as schema version 2 (the tables both backends share), made behind the
    code's back: what a PostgreSQL catalog was before the lease tables."""
    with psycopg.connect(url, autocommit=True) as db:
        with db.transaction():
            db.execute(schema_sql("postgresql"))
            db.execute("INSERT INTO schema_version VALUES (2, %s)", (now(),))


# --- schema: creation, refusal, migration -----------------------------------------------------

def test_create_makes_the_whole_schema(c, pg_url):
    assert c.version == PG_SCHEMA_VERSION == 4
    assert {"schema_version", "chains", "volumes", "snapshots", "journal", "hosts",
            "chain_leases", "repository"} <= tables(pg_url)
    assert [r[0] for r in raw(pg_url, "SELECT version FROM schema_version ORDER BY 1")] == [2, 3, 4]
    assert columns(pg_url, "journal")[-2:] == ["host", "epoch"]
    assert columns(pg_url, "chain_leases") == ["chain", "holder", "epoch", "expires_at"]
    assert c.repository_id() == "rid-1"
    # sizes beyond 32 bits fit (BIGINT columns)
    with c.transaction():
        c.insert_chain(ChainRow(name="big", size=1 << 50, cluster_size=65536, created=now(),
                                leaf="vb"))
        c.insert_volume(VolumeRow(id="vb", chain="big", path="volumes/vb.raw", format="raw",
                                  role="base", parent=None, legality="LEGAL", created=now(),
                                  size=1 << 50, ino=(1 << 63) - 1))
    assert c.chain("big").size == 1 << 50 and c.volume("vb").ino == (1 << 63) - 1


def test_journal_records_host_and_epoch(c):
    c.host, c.epoch = "host-a", 7
    with c.transaction():
        jid = c.journal_begin("snapshot", "c1", {})
    c.host = c.epoch = None
    with c.transaction():
        c.journal_begin("create_chain", "c2", {})
    rows = c.journal()
    assert [(r.id, r.host, r.epoch) for r in rows][0] == (jid, "host-a", 7)
    assert (rows[1].host, rows[1].epoch) == (None, None)


def test_open_refuses_a_database_without_catalog(pg_url):
    with pytest.raises(RepositoryError, match="holds no cowchain catalog"):
        PgCatalog(pg_url)
    with pytest.raises(RepositoryError, match="holds no cowchain catalog"):
        PgCatalog(pg_url, readonly=True)
    assert tables(pg_url) == set()                   # nothing was made


def test_create_refuses_a_database_with_a_catalog(c, pg_url):
    add_chain(c)
    with pytest.raises(RepositoryError, match="already holds a cowchain catalog"):
        PgCatalog(pg_url, create=True)
    assert [r.name for r in c.chains()] == ["c1"]


def test_unreachable_server_is_a_typed_error(pg_server):
    url = f"host={pg_server.sock}-none user=postgres dbname=postgres"   # no server there
    with pytest.raises(CatalogUnavailable, match="cannot connect") as e:
        PgCatalog(url, settings=PgSettings(reconnect_wait=0.3))
    assert e.value.hint and e.value.exit_code == 24


def test_a_refused_connection_is_not_waited_for(pg_server):
    """No such database (or role): the server answered, so no retrying: RepositoryError."""
    with pytest.raises(RepositoryError, match='database "nosuchdb" does not exist') as e:
        PgCatalog(pg_server.url("nosuchdb"), settings=PgSettings(reconnect_wait=600))
    assert not isinstance(e.value, CatalogUnavailable) and "URL" in e.value.hint


@pytest.mark.parametrize("readonly", [False, True])
def test_newer_schema_refused(c, pg_url, readonly):
    raw(pg_url, "INSERT INTO schema_version VALUES (%s, %s)", (PG_SCHEMA_VERSION + 1, now()))
    with pytest.raises(RepositoryError, match=f"schema version {PG_SCHEMA_VERSION + 1}") as e:
        PgCatalog(pg_url, readonly=readonly)
    assert "upgrade cowchain" in e.value.hint


def test_empty_schema_version_refused(c, pg_url):
    raw(pg_url, "DELETE FROM schema_version")
    with pytest.raises(RepositoryError, match="schema version None"):
        PgCatalog(pg_url)


def test_older_schema_read_as_is_then_migrated(pg_url):
    make_v2(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as db:
        with db.transaction():
            db.execute("INSERT INTO chains VALUES ('c1', 1048576, 65536, %s, 'v1')", (now(),))
            db.execute("INSERT INTO volumes (id, chain, path, format, role, legality, created) "
                       "VALUES ('v1', 'c1', 'volumes/v1.raw', 'raw', 'base', 'LEGAL', %s)",
                       (now(),))
            db.execute("INSERT INTO journal (op, chain, args, step, state, started) "
                       "VALUES ('snapshot', 'c1', '{}', 'intent', 'running', %s)", (now(),))
    ro = PgCatalog(pg_url, readonly=True)
    assert ro.version == 2 and [r.name for r in ro.chains()] == ["c1"]
    assert ro.journal()[0].host is None
    assert "hosts" not in tables(pg_url)               # a read-only open changes nothing
    ro.close()
    rw = PgCatalog(pg_url)
    assert rw.version == 4 and {"hosts", "chain_leases", "repository"} <= tables(pg_url)
    assert [r.name for r in rw.chains()] == ["c1"] and rw.journal()[0].op == "snapshot"
    assert rw.repository_id() is None                  # recorded by the repository's open
    assert rw.upgrade() == (4, 4)                      # nothing left to do
    rw.close()


def test_failed_migration_changes_nothing(pg_url):
    """The migration runs in one transaction: a step that fails leaves version 2 intact."""
    make_v2(pg_url)
    raw(pg_url, LEASE_DDL[0])                           # 'hosts' exists: step 3 will fail
    with pytest.raises(RepositoryError, match="hosts"):
        PgCatalog(pg_url)
    assert "host" not in columns(pg_url, "journal")
    assert [r[0] for r in raw(pg_url, "SELECT version FROM schema_version")] == [2]


def test_migration_waits_for_the_migration_lock(pg_url):
    """A second migrator blocks on the advisory lock, then finds nothing left to do."""
    make_v2(pg_url)
    done = []
    with psycopg.connect(pg_url, autocommit=True) as holder:
        with holder.transaction():
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            t = threading.Thread(target=lambda: done.append(PgCatalog(pg_url).version))
            t.start()
            t.join(0.5)
            assert t.is_alive() and not done           # cannot pass the held lock
        # released: the waiting open migrates
    t.join(30)
    assert done == [4]
    assert [r[0] for r in raw(pg_url, "SELECT version FROM schema_version ORDER BY 1")] == [2, 3, 4]
    again = PgCatalog(pg_url)
    assert again.upgrade() == (4, 4)
    again.close()


def test_open_of_a_current_catalog_takes_no_migration_lock(c, pg_url):
    """A catalog at the current version opens without the migration lock and without any
    schema statement: another session holding the lock does not hold the open up."""
    with psycopg.connect(pg_url, autocommit=True) as holder:
        with holder.transaction():
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            done = []
            t = threading.Thread(target=lambda: done.append(PgCatalog(pg_url).version))
            t.start()
            t.join(10)
            assert done == [PG_SCHEMA_VERSION]


def test_version_4_adds_the_keyed_reads_indexes(pg_url):
    make_v2(pg_url)
    PgCatalog(pg_url).close()
    names = {r[0] for r in raw(pg_url, "SELECT indexname FROM pg_indexes")}
    assert {"chains_leaf", "chains_saved_leaf", "snapshots_volume", "volumes_flagged",
            "volumes_unrecorded"} <= names


# --- connection settings --------------------------------------------------------------------------

def test_every_connection_sets_the_timeouts(pg_url):
    cat = PgCatalog(pg_url, create=True, settings=PgSettings(
        idle_in_transaction_timeout=2.5, lock_timeout=1.5, statement_timeout=7.0))
    got = {k: cat._exec(f"SELECT current_setting('{k}') AS v").fetchall()[0]["v"]
           for k in ("idle_in_transaction_session_timeout", "lock_timeout",
                     "statement_timeout")}
    assert got == {"idle_in_transaction_session_timeout": "2500ms", "lock_timeout": "1500ms",
                   "statement_timeout": "7s"}
    cat.close()


def test_a_transaction_left_idle_past_the_timeout_is_ended_by_the_server(pg_url):
    """A client paused inside a transaction (here: sleeping) loses its session after
    idle_in_transaction_session_timeout: its locks are freed for others, its transaction is
    rolled back, and its next statement raises CatalogUnavailable; the catalog then goes on
    on a new connection."""
    import time
    cat = PgCatalog(pg_url, create=True, settings=PgSettings(idle_in_transaction_timeout=0.3))
    add_chain(cat)
    with pytest.raises(CatalogUnavailable, match="rolled back"):
        with cat.transaction():
            cat.update_chain("c1", size=2 << 20)
            time.sleep(1.5)
            cat.update_chain("c1", size=3 << 20)
    assert cat.chain("c1").size == 1 << 20
    with psycopg.connect(pg_url, autocommit=True) as other:        # nothing held any more
        other.execute("SET lock_timeout = '5s'")
        other.execute("UPDATE chains SET size = 4194304 WHERE name = 'c1'")
    assert cat.chain("c1").size == 4 << 20
    cat.close()


def test_a_lock_wait_past_lock_timeout_is_a_typed_retryable_error(pg_url):
    """Another client holds the catalog's write lock: the transaction gives up after
    lock_timeout with CatalogUnavailable (retryable), changing nothing."""
    from engine.catalog_pg import WRITE_LOCK
    cat = PgCatalog(pg_url, create=True, settings=PgSettings(lock_timeout=0.2))
    add_chain(cat)
    with psycopg.connect(pg_url, autocommit=True) as holder:
        with holder.transaction():
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            with pytest.raises(CatalogUnavailable, match="lock_timeout"):
                cat.update_chain("c1", size=2 << 20)
    cat.update_chain("c1", size=3 << 20)
    assert cat.chain("c1").size == 3 << 20
    cat.close()


# --- the fence hook -------------------------------------------------------------------------------

class Fenced(Exception):
    """The test's stand-in for a lost lease (not an EngineError subclass: those are the
    exit-code table)."""


def test_fence_runs_first_in_every_write_transaction(c):
    add_chain(c)
    calls = []

    def fence(conn):
        # the catalog's own connection, inside the transaction, before the write lock
        n = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                         "AND pid = pg_backend_pid()").fetchone()
        calls.append((conn is c._db, conn.info.transaction_status.name, n))

    c.fence = fence
    with c.transaction():
        c.update_chain("c1", size=2 << 20)
        c.insert_volume(VolumeRow(id="v2", chain="c1", path="volumes/v2.qcow2",
                                  format="qcow2", role="leaf", parent="v1",
                                  legality="LEGAL", created=now()))
    assert calls == [(True, "INTRANS", {"count": 0})]
    jid = c.journal_begin("delete_snapshot", "c1", {})   # a change on its own: fenced too
    c.journal_step(jid, "merged")
    c.journal_end(jid)
    assert len(calls) == 4
    c.chains(), c.journal()                              # reads need no fence
    with c.read():
        c.volumes()
    assert len(calls) == 4


def test_a_raising_fence_aborts_the_transaction(c):
    add_chain(c)
    jid = c.journal_begin("delete_snapshot", "c1", {})

    def fence(conn):
        raise Fenced("the lease is gone")

    c.fence = fence
    body = []
    with pytest.raises(Fenced):
        with c.transaction():
            body.append(1)                               # never reached
    assert body == []
    for change in (lambda: c.update_chain("c1", size=5),
                   lambda: c.journal_step(jid, "merged"),
                   lambda: c.journal_end(jid),
                   lambda: c.journal_begin("snapshot", "c1", {})):
        with pytest.raises(Fenced):
            change()
    assert c.chain("c1").size == 1 << 20                 # reads still work, nothing changed
    assert [(r.id, r.step) for r in c.journal()] == [(jid, "intent")]

    calls = []

    def late(conn):                                      # a fence that raises at the 2nd call
        calls.append(1)
        if len(calls) > 1:
            raise Fenced("lost meanwhile")

    c.fence = late
    c.update_chain("c1", size=2 << 20)
    with pytest.raises(Fenced):
        c.update_chain("c1", size=3 << 20)
    assert c.chain("c1").size == 2 << 20
    c.fence = None
    c.journal_end(jid)
    assert c.journal() == []


# --- the server restarted or crashed in the middle ------------------------------------------------

@pytest.fixture
def server(pg_server):
    yield pg_server
    if not pg_server.running:                            # leave it running for the next test
        pg_server.start()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_reads_and_idempotent_changes_retry_after_a_restart(c, server, mode):
    add_chain(c)
    server.restart(mode)
    assert [r.name for r in c.chains()] == ["c1"]          # retried on a new connection
    server.restart(mode)
    c.update_chain("c1", size=2 << 20)                     # an UPDATE: retried
    assert c.chain("c1").size == 2 << 20
    server.restart(mode)
    with c.read():                                         # a read begun after: fresh link
        assert c.volume("v1") is not None


def test_a_transaction_cut_by_a_restart_is_rolled_back(c, server):
    add_chain(c)
    with pytest.raises(CatalogUnavailable, match="rolled back") as e:
        with c.transaction():
            c.update_chain("c1", size=2 << 20)
            server.restart("fast")
            c.update_chain("c1", size=3 << 20)
    assert "retry" in e.value.hint
    assert c.chain("c1").size == 1 << 20                 # the server rolled it back
    add_chain(c, "c2", "w1")                             # and the catalog goes on
    assert [r.name for r in c.chains()] == ["c1", "c2"]


def test_a_crash_before_commit_loses_the_uncommitted_transaction(c, server):
    add_chain(c)
    with pytest.raises(CatalogUnavailable) as e:
        with c.transaction():
            c.update_chain("c1", size=2 << 20)
            c.journal_begin("snapshot", "c1", {})
            server.stop("immediate")
    assert "may or may not" in str(e.value) and "reopen" in e.value.hint
    server.start()
    assert c.chain("c1").size == 1 << 20 and c.journal() == []


def test_a_server_that_stays_down_is_a_typed_error(pg_url, server):
    cat = PgCatalog(pg_url, create=True, settings=PgSettings(reconnect_wait=0.5))
    add_chain(cat)
    server.stop("fast")
    with pytest.raises(CatalogUnavailable):
        cat.chains()
    with pytest.raises(CatalogUnavailable):
        add_chain(cat, "c2", "w1")                      # an INSERT is not retried blindly
    server.start()
    assert [r.name for r in cat.chains()] == ["c1"]
    cat.close()


def test_integrity_problems_on_a_clean_and_a_broken_catalog(c, pg_url):
    add_chain(c)
    assert c.integrity_problems() == []
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("SET session_replication_role = replica")
        db.execute("INSERT INTO chain_leases (chain, holder) VALUES ('c1', 'nohost')")
    assert c.integrity_problems() == ["foreign key: chain_leases.holder = 'nohost' names no "
                                      "hosts row"]


def test_engine_exports_the_error():
    assert engine.CatalogUnavailable is CatalogUnavailable


# --- a repository on the PostgreSQL catalog, end to end -------------------------------------------

CS = 4096
SIZE = 512 << 10


def pat(byte, n=CS):
    return bytes([byte]) * n


def build(repo):
    """vm1 (qcow2 base) with snapshots s1, s2, s3 and a leaf: deleting s2 is cheaper as a
    commit, deleting s3 as a pull (as in the kill tests).  Returns (ids, disk, snaps)."""
    c = repo.create_chain("vm1", SIZE, base_format="qcow2", cluster_size=CS)
    disk = bytearray(SIZE)

    def w(off, data):
        c.write(off, data)
        disk[off:off + len(data)] = data

    w(0, pat(1, SIZE // 2))
    ids, snaps = {}, {}
    ids["s1"] = c.snapshot("s1").id
    snaps["s1"] = bytes(disk)
    for i in range(16):
        w((2 * i + 1) * CS, pat(2))
    ids["s2"] = c.snapshot("s2").id
    snaps["s2"] = bytes(disk)
    w(40 * CS, pat(3))
    ids["s3"] = c.snapshot("s3").id
    snaps["s3"] = bytes(disk)
    for i in range(24):
        w((3 * i) * CS, pat(4, 100))
    return ids, disk, snaps


def qemu_clean(repo):
    from qemu import qemu_check
    for v in repo._cat.volumes().values():
        if v.format == "qcow2":
            code, data = qemu_check(os.path.join(repo.path, v.path))
            assert code == 0, (v.path, data)


def test_repository_on_the_postgresql_catalog(tmp_path, pg_url):
    path = tmp_path / "repo"
    with engine.Repository.create(path, catalog=pg_url, host_id="h1") as repo:
        assert isinstance(repo._cat, PgCatalog) and repo.host_id == "h1"
        assert not os.path.exists(path / "catalog.db") and (path / "repository.id").is_file()
        ids, disk, snaps = build(repo)
        repo.create_chain("raw1", SIZE).write(0, b"raw")
    # several opens at once (no folder lock), each a host of its own
    a = engine.Repository.open(path, catalog=pg_url, host_id="h1",
                               catalog_settings=PgSettings(lock_timeout=4.5))
    got = a._cat._exec("SELECT current_setting('lock_timeout') AS t").fetchall()
    assert got == [{"t": "4500ms"}]
    b = engine.Repository.open(path, catalog=pg_url, host_id="h2")
    try:
        vm1 = a.chain("vm1")
        assert vm1.read(0, SIZE) == bytes(disk)
        assert [s.id for s in b.chain("vm1").snapshots] == [ids["s1"], ids["s2"], ids["s3"]]
        assert vm1.delete_snapshot(ids["s2"]).direction == "commit"
        assert vm1.delete_snapshot(ids["s3"]).direction == "pull"
        assert [s.id for s in vm1.snapshots] == [ids["s1"]]
        assert vm1.read(0, SIZE) == bytes(disk)
        with vm1.open_snapshot(ids["s1"]) as img:
            assert img.read(0, SIZE) == snaps["s1"]
        k = vm1.clone(ids["s1"], "vmc")
        k.write(5, b"clone")
        vm1.revert(ids["s1"])
        assert vm1.read(0, SIZE) == snaps["s1"]
        vm1.export(str(tmp_path / "out.raw"), format="raw")
        assert (tmp_path / "out.raw").read_bytes() == snaps["s1"]
        assert [c.name for c in b.chains()] == ["raw1", "vm1", "vmc"]   # h2 sees h1's work
        with pytest.raises(engine.ImageLocked):
            b.chain("vmc").read(0, 10)           # h1 holds its leaf open for writing
        k.close()
        assert b.chain("vmc").read(0, 10) == snaps["s1"][:5] + b"clone"
        b.close()                                # (its handle of vmc's leaf)
        check_clean(a)
    finally:
        a.close()
        b.close()
    with engine.Repository.open(path, catalog=pg_url, readonly=True) as ro:
        assert ro.chain("vm1").read(0, SIZE) == snaps["s1"]
        qemu_clean(ro)


def test_wrong_folder_or_missing_marker_refused(tmp_path, pg_url):
    with engine.Repository.create(tmp_path / "a", catalog=pg_url) as repo:
        repo.create_chain("vm1", SIZE)
    engine.Repository.create(tmp_path / "b").close()               # a SQLite repository
    with pytest.raises(engine.NotFound, match="repository.id"):
        engine.Repository.open(tmp_path / "b", catalog=pg_url)
    os.makedirs(tmp_path / "c" / "volumes")
    (tmp_path / "c" / "repository.id").write_text("another-folder\n")
    with pytest.raises(RepositoryError, match="describes another volume folder") as e:
        engine.Repository.open(tmp_path / "c", catalog=pg_url)
    assert "mounted at any path" in e.value.hint
    # the same folder under another path (another host's mount point) is accepted
    os.symlink(tmp_path / "a", tmp_path / "mnt")
    with engine.Repository.open(tmp_path / "mnt", catalog=pg_url) as repo:
        assert repo.chain("vm1").read(0, 3) == b"\0\0\0"


def test_create_refused_by_the_catalog_leaves_the_folder_as_it_was(tmp_path, pg_url):
    engine.Repository.create(tmp_path / "a", catalog=pg_url).close()
    with pytest.raises(RepositoryError, match="already holds a cowchain catalog"):
        engine.Repository.create(tmp_path / "b", catalog=pg_url)
    assert not os.path.exists(tmp_path / "b")
    os.mkdir(tmp_path / "empty")
    with pytest.raises(RepositoryError):
        engine.Repository.create(tmp_path / "empty", catalog=pg_url)
    assert os.listdir(tmp_path / "empty") == []


WORKER = r"""
import os, sys
import engine
path, url, host, action, sid = sys.argv[1:6]
with engine.Repository.open(path, catalog=url, host_id=host) as repo:
    vm1 = repo.chain("vm1")
    if action == "delete":
        vm1.delete_snapshot(sid)
    else:
        vm1.snapshot("new")
"""


@pytest.mark.parametrize("action,kill_at", [("delete", "delete_snapshot.copied:1"),
                                            ("snapshot", "snapshot.intent:1")])
def test_crash_recovery_on_the_postgresql_catalog(tmp_path, pg_url, action, kill_at,
                                                  monkeypatch):
    """A host killed in the middle of an operation leaves its journal entry in the
    PostgreSQL catalog.  Another host's open leaves it alone (its chains are not its own);
    the crashed host's next open recovers it, or any host recovers it by naming the chain."""
    path = tmp_path / "repo"
    monkeypatch.setenv("COWCHAIN_LEASE_PROFILE", "test")
    with engine.Repository.create(path, catalog=pg_url, host_id="h1") as repo:
        ids, disk, snaps = build(repo)
    env = dict(os.environ, COWCHAIN_KILL_AT=kill_at)
    out = subprocess.run([sys.executable, "-c", WORKER, str(path), pg_url, "h1", action,
                          ids["s2"]], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr
    with engine.Repository.open(path, catalog=pg_url, host_id="h2") as other:
        [j] = other._cat.journal()
        assert (j.host, j.chain) == ("h1", "vm1")                  # not h2's to recover
    # the killed process's lease on vm1 must expire first (it is recovered under a lease)
    with LeaseManager(pg_url, "observer", LeaseSettings.for_tests()) as lm:
        info = lm.lease_of("vm1")
        while info is not None and info.holder is not None and \
                (info.expires_in or 0) > -lm.settings.grace:
            time.sleep(0.1)
            info = lm.lease_of("vm1")
    reopen = ({"host_id": "h1"}, {"host_id": "h3", "chains": ["vm1"]})[action == "snapshot"]
    with engine.Repository.open(path, catalog=pg_url, host_id=reopen["host_id"]) as repo:
        if "chains" in reopen:
            assert len(repo.recover(chains=["other"])) == 0
            assert len(repo.recover(chains=reopen["chains"])) == 1
        assert repo._cat.journal() == []
        vm1 = repo.chain("vm1")
        assert vm1.read(0, SIZE) == bytes(disk)
        want = [ids["s1"], ids["s3"]] if action == "delete" else [ids["s1"], ids["s2"],
                                                                     ids["s3"]]
        assert [s.id for s in vm1.snapshots] == want
        for s in vm1.snapshots:
            name = {v: k for k, v in ids.items()}[s.id]
            with vm1.open_snapshot(s.id) as img:
                assert img.read(0, SIZE) == snaps[name]
        res = repo.check()
        assert not [p for p in res.problems if p.kind != "image"], res.to_dict()
        qemu_clean(repo)


# --- the repository model's random operations, on the PostgreSQL catalog ------------------------

_SERVER: list = []


@pytest.fixture(autouse=True)
def _session_server(pg_server):
    """The session's server, for the state machine below (a unittest class: no fixtures)."""
    _SERVER[:] = [pg_server]
    if not pg_server.running:
        pg_server.start()


class PgRepoMachine(test_repo_model.RepoMachine):
    """test_repo_model's state machine, every repository on a new PostgreSQL database."""

    made = 0

    def repo_kw(self) -> dict:
        PgRepoMachine.made += 1
        return {"catalog": _SERVER[0].create_database(f"model{os.getpid()}_{self.made}"),
                "host_id": "model"}


PgRepoMachine.TestCase.settings = test_repo_model.RepoMachine.TestCase.settings
TestPgRepoModel = PgRepoMachine.TestCase


# --- the command line ----------------------------------------------------------------------

def cli(*argv, env=None):
    out = subprocess.run([sys.executable, "-m", "engine.cli", *argv], capture_output=True,
                         text=True, timeout=120, env={**os.environ, **(env or {})})
    return out.returncode, out.stdout, out.stderr


def test_cli_catalog_flags_environment_and_upgrade(tmp_path, pg_url):
    repo = str(tmp_path / "repo")
    code, out, err = cli("--repo", repo, "--catalog", pg_url, "repo", "init")
    assert code == 0, err
    assert os.path.isfile(os.path.join(repo, "repository.id"))
    code, out, err = cli("chain", "create", "vm1", "1M", "--repo", repo, "--catalog", pg_url,
                         "--host-id", "h7")
    assert code == 0, err
    env = {"COWCHAIN_REPO": repo, "COWCHAIN_CATALOG": pg_url, "COWCHAIN_HOST_ID": "h8"}
    code, out, err = cli("--output", "json", "chain", "list", env=env)
    assert code == 0 and '"vm1"' in out, (out, err)
    code, out, err = cli("--output", "json", "repo", "upgrade", env=env)
    assert code == 0 and '"schema": 4' in out and "\"schema-before\": 4" in out, (out, err)
    # without the catalog the folder holds no repository (no catalog.db there)
    code, out, err = cli("chain", "list", "--repo", repo)
    assert code == engine.NotFound.exit_code and "no cowchain repository" in err
    raw(pg_url, "INSERT INTO schema_version VALUES (99, 'x')")
    code, out, err = cli("repo", "upgrade", env=env)
    assert code == RepositoryError.exit_code and "schema version 99" in err, err
    assert "Traceback" not in err


def test_cli_upgrade_of_a_sqlite_repository(tmp_path):
    repo = str(tmp_path / "repo")
    from test_repo_safety import _downgrade_to_v1
    assert cli("--repo", repo, "repo", "init")[0] == 0
    _downgrade_to_v1(repo)
    code, out, err = cli("--repo", repo, "repo", "upgrade")
    assert code == 0 and "Catalog schema version 3 (was 1)" in out, (out, err)
    code, out, err = cli("--repo", repo, "repo", "upgrade")
    assert code == 0 and "already current" in out, (out, err)


def test_without_psycopg_only_the_postgresql_catalog_is_refused(tmp_path, pg_url):
    """psycopg is an optional extra: without it cowchain works on the SQLite catalog and a
    PostgreSQL URL is refused with a typed error that says what to install."""
    code = ("import sys; sys.modules['psycopg'] = None\n"
            "import engine\n"
            "with engine.Repository.create(sys.argv[1] + '/a') as r:\n"
            "    r.create_chain('vm', 1 << 20)\n"
            "try:\n"
            "    engine.Repository.create(sys.argv[1] + '/b', catalog=sys.argv[2])\n"
            "except engine.RepositoryError as e:\n"
            "    print('refused:', e.hint)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), pg_url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "refused: pip install 'cowchain[postgresql]'"
    assert not os.path.exists(tmp_path / "b")


@pytest.fixture
def pg_repo(tmp_path, pg_url, server):
    """A repository on the PostgreSQL catalog with one qcow2 chain vm1 reading b"before"."""
    repo = engine.Repository.create(tmp_path / "repo", catalog=pg_url, host_id="h1")
    repo.create_chain("vm1", SIZE, base_format="qcow2", cluster_size=CS).write(0, b"before")
    yield repo
    repo.close()


def check_clean(repo):
    res = repo.check()
    assert res.ok and not res.problems, res.to_dict()


@pytest.mark.parametrize("how", ["restart", "down for a while", "crash"])
def test_a_server_restart_in_the_middle_of_an_operation(pg_repo, server, monkeypatch, how):
    """The server restarts (or is down for a moment, or crashes and recovers) between an
    operation's intent and its commit: the operation reconnects at its next transaction and
    completes; nothing is lost and the repository checks clean."""
    from engine.repository import journal
    c = pg_repo.chain("vm1")
    real = journal.kill_point

    def hit(name):
        if name == "snapshot.intent":
            if how == "restart":
                server.restart("fast")
            elif how == "crash":
                server.restart("immediate")
            else:
                server.stop("fast")
                threading.Timer(1.0, server.start).start()
        real(name)

    monkeypatch.setattr(journal, "kill_point", hit)
    s = c.snapshot("across a restart")
    monkeypatch.setattr(journal, "kill_point", real)
    c.write(0, b"after!")
    assert [x.id for x in c.snapshots] == [s.id] and pg_repo._cat.journal() == []
    with c.open_snapshot(s.id) as img:
        assert img.read(0, 6) == b"before"
    assert c.read(0, 6) == b"after!"
    check_clean(pg_repo)


def test_a_restart_inside_an_operations_transaction_rolls_it_back(pg_repo, server,
                                                                   monkeypatch):
    """The server restarts while an operation's commit transaction is open: the operation
    fails with CatalogUnavailable (retryable), the chain is as before, and the retry works."""
    c = pg_repo.chain("vm1")
    cat = pg_repo._cat
    real = cat.insert_snapshot

    def cut(row):
        server.restart("fast")
        real(row)

    monkeypatch.setattr(cat, "insert_snapshot", cut)
    with pytest.raises(CatalogUnavailable):
        c.snapshot("lost")
    monkeypatch.setattr(cat, "insert_snapshot", real)
    assert c.snapshots == [] and c.read(0, 6) == b"before"
    assert cat.journal() == []            # undone at once, on a new connection
    s = c.snapshot("again")               # the retry the error asks for
    assert [x.id for x in c.snapshots] == [s.id]
    check_clean(pg_repo)
