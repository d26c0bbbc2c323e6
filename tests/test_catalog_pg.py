"""The PostgreSQL catalog (engine/catalog_pg.py) against a real server the suite starts.

The row, transaction and journal behaviours both backends share are in test_catalog_unit.py
(parametrized over both).  Here: what is PostgreSQL's own: the schema's creation, version
refusal and migration under the advisory lock, the fence hook, the per-connection timeouts,
and a server restart or crash in the middle of reads and transactions.
"""

from __future__ import annotations

import threading

import psycopg
import pytest

import engine
from engine.catalog import ChainRow, VolumeRow, now, schema_sql
from engine.catalog_pg import (LEASE_DDL, MIGRATE_LOCK, PG_SCHEMA_VERSION, PgCatalog,
                               PgSettings)
from engine.errors import CatalogUnavailable, EngineError, RepositoryError

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
    assert c.version == PG_SCHEMA_VERSION == 3
    assert {"schema_version", "chains", "volumes", "snapshots", "journal", "hosts",
            "chain_leases", "repository"} <= tables(pg_url)
    assert [r[0] for r in raw(pg_url, "SELECT version FROM schema_version ORDER BY 1")] == [2, 3]
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
    assert rw.version == 3 and {"hosts", "chain_leases", "repository"} <= tables(pg_url)
    assert [r.name for r in rw.chains()] == ["c1"] and rw.journal()[0].op == "snapshot"
    assert rw.repository_id() is None                  # recorded by the repository's open
    assert rw.upgrade() == (3, 3)                      # nothing left to do
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
    assert done == [3]
    assert [r[0] for r in raw(pg_url, "SELECT version FROM schema_version ORDER BY 1")] == [2, 3]
    again = PgCatalog(pg_url)
    assert again.upgrade() == (3, 3)
    again.close()


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

class Fenced(EngineError):
    """The test's stand-in for a lost lease."""


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
