"""The repository catalog in PostgreSQL: the same tables, rows, transactions and journal as
the SQLite catalog (``engine.catalog``), for a repository that several hosts share.

- Transactions: an autocommit connection and ``with conn.transaction()`` blocks.  A write
  transaction calls the fence hook (:attr:`PgCatalog.fence`) first, then takes one
  transaction-scoped advisory lock (:data:`WRITE_LOCK`), so catalog writers run one after
  the other as under SQLite's ``BEGIN IMMEDIATE``.  A write statement outside a
  transaction runs in a transaction of its own (fenced likewise).
- ``read()``: one REPEATABLE READ, READ ONLY transaction: one committed state.
- Schema: version 2 is the tables every backend shares (``engine.catalog.schema_sql``);
  version 3 adds the journal's ``host`` and ``epoch`` columns, the ``repository`` row
  (which volume folder the catalog describes) and the lease tables.  Creating and
  migrating run in one transaction under ``pg_advisory_xact_lock(MIGRATE_LOCK)``; a newer
  schema is refused.
- Connection failures (a server restart, a broken connection, a timeout) raise
  ``CatalogUnavailable``; a read or an idempotent change made outside a transaction is
  retried once on a fresh connection.  A transaction that a failure interrupted was rolled
  back by the server: the operation can be retried as a whole.
- Every connection sets ``idle_in_transaction_session_timeout``, ``lock_timeout`` and
  ``statement_timeout`` (:class:`PgSettings`), so a paused or dead client cannot hold a
  lock for longer than that.

Thread model: one owner thread, as the SQLite catalog.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Any, Iterator, Sequence

from engine.catalog import (INDEXES, SqlCatalog, migration_sql, now, refuse_newer,
                            schema_sql)
from engine.errors import CatalogUnavailable, EngineError, RepositoryError

try:
    import psycopg
    from psycopg import sql as _sql
    from psycopg.rows import dict_row
except ImportError:       # the optional 'postgresql' extra: only PgCatalog needs it
    HAVE_PSYCOPG = False
else:
    HAVE_PSYCOPG = True

#: The schema version of a PostgreSQL catalog (versions 1-2 are the shared tables).
PG_SCHEMA_VERSION = 4

#: The lease tables (same as leases.LEASE_DDL).
LEASE_DDL: list[str] = [
    """CREATE TABLE hosts (
    host_id     TEXT PRIMARY KEY,
    hostname    TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    joined_at   TIMESTAMPTZ NOT NULL,
    heartbeat   TIMESTAMPTZ NOT NULL
)""",
    """CREATE TABLE chain_leases (
    chain       TEXT PRIMARY KEY,
    holder      TEXT REFERENCES hosts(host_id),
    epoch       BIGINT NOT NULL DEFAULT 0,
    expires_at  TIMESTAMPTZ
)""",
]

#: PostgreSQL schema changes, by the version they lead to (see ``engine.catalog``).
PG_MIGRATIONS: dict[int, list[str]] = {
    3: ["ALTER TABLE journal ADD COLUMN host TEXT",
        "ALTER TABLE journal ADD COLUMN epoch BIGINT",
        "CREATE TABLE repository (id TEXT NOT NULL, created TEXT NOT NULL)",
        *LEASE_DDL],
    4: INDEXES,                 # the keyed reads' indexes, as SQLite's version 3
}

#: Advisory lock keys ("cowchain" in ASCII, and the next number): schema creation and
#: migration; every catalog write transaction.
MIGRATE_LOCK = 0x636F77636861696E
WRITE_LOCK = MIGRATE_LOCK + 1

#: SQLSTATEs after which the session is gone or the statement was cut off: retryable.
_UNAVAILABLE = {"57P01": "the server shut down or restarted",
                "57P02": "the server crashed", "57P03": "the server is starting up",
                "57P05": "the session was idle too long",
                "25P03": "the session was idle in a transaction too long",
                "55P03": "a lock was not granted in time (lock_timeout)",
                "57014": "a statement ran too long (statement_timeout)",
                "40001": "a concurrent transaction conflicted",
                "40P01": "a deadlock with another transaction"}

#: What a server that refuses a connection for now says (libpq's text; no SQLSTATE then).
_TRANSIENT_REFUSALS = ("starting up", "shutting down", "in recovery", "too many clients")


@dataclasses.dataclass(frozen=True)
class PgSettings:
    """Per-connection settings of the PostgreSQL catalog, in seconds.

    Attributes:
        idle_in_transaction_timeout: the server ends a session idle inside a transaction
            for this long (a paused client releases its locks).
        lock_timeout: a statement waiting this long for a lock fails.
        statement_timeout: a statement running this long fails.
        connect_timeout: one connection attempt.
        reconnect_wait: how long a lost connection is retried (the server restarting).
    """

    idle_in_transaction_timeout: float = 30.0
    lock_timeout: float = 10.0
    statement_timeout: float = 60.0
    connect_timeout: float = 10.0
    reconnect_wait: float = 10.0

    def options(self) -> str:
        """The libpq ``options`` that set the server-side timeouts."""
        ms = {"idle_in_transaction_session_timeout": self.idle_in_transaction_timeout,
              "lock_timeout": self.lock_timeout, "statement_timeout": self.statement_timeout}
        return " ".join(f"-c {k}={int(v * 1000)}" for k, v in ms.items())


def redact(url: str) -> str:
    """URL without a password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "<the catalog URL>"
    info.pop("password", None)
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items()
                                             if v is not None})


class PgCatalog(SqlCatalog):
    """The PostgreSQL catalog of one repository.

    Arguments:
        url (str): a libpq connection string or URL (``postgresql://...``).
        create (bool): make a new catalog (the database must hold none).
        readonly (bool): read only (an older schema is read as it is).
        repository_id (str | None): the id of the volume folder the catalog describes:
            recorded by ``create`` (and by a read-write open of a catalog that has none yet),
            and an open with another id is refused.
        host (str | None): this host's id (see ``host`` below).
        settings (PgSettings | None): connection settings.

    Attributes:
        fence: called with the connection as the first statement of every write
            transaction; it raises to abort the transaction (a lost lease).
        host, epoch: recorded in the journal entries begun while they are set.

    Raises:
        RepositoryError: the database holds no cowchain catalog (or already one, with
            ``create``), its schema is newer than this version understands, or it
            describes another volume folder.
        CatalogUnavailable: the server cannot be reached.
    """

    def __init__(self, url: str, *, create: bool = False, readonly: bool = False,
                 repository_id: str | None = None, host: str | None = None,
                 settings: PgSettings | None = None) -> None:
        if not HAVE_PSYCOPG:
            raise RepositoryError("a PostgreSQL catalog needs the 'psycopg' module, which is "
                                  "not installed", hint="pip install 'cowchain[postgresql]'")
        super().__init__()
        self.url = url
        self.path = redact(url)
        self.settings = settings or PgSettings()
        self._readonly = readonly
        self._owner = threading.get_ident()
        self.fence = None
        self.host = host
        self.epoch: int | None = None
        self.version = PG_SCHEMA_VERSION
        self._db: psycopg.Connection[dict[str, Any]] | None = None
        self._closed = False
        self._connection()
        try:
            if create:
                self._create(repository_id)
            else:
                self._check_schema()
                if repository_id is not None:
                    self._check_repository_id(repository_id)
        except BaseException:
            self.close()
            raise

    # --- connection ---------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[dict[str, Any]]:
        opts = self.settings.options()
        if self._readonly:
            opts += " -c default_transaction_read_only=on"
        deadline = time.monotonic() + self.settings.reconnect_wait
        while True:
            try:
                return psycopg.connect(self.url, autocommit=True, row_factory=dict_row,
                                       options=opts, application_name="cowchain",
                                       connect_timeout=max(1, int(self.settings.connect_timeout)))
            except psycopg.OperationalError as e:
                text = str(e)
                if "FATAL" in text and not any(t in text for t in _TRANSIENT_REFUSALS):
                    # the server answered and refused: no database, no role, no access
                    raise RepositoryError(f"catalog {self.path}: {_last_line(e)}",
                                          hint="check the catalog URL") from None
                if time.monotonic() >= deadline:
                    raise CatalogUnavailable(
                        f"cannot connect to the catalog {self.path}: {_first_line(e)}") from None
                time.sleep(0.2)
            except psycopg.Error as e:
                raise RepositoryError(f"catalog {self.path}: {_first_line(e)}") from None

    def _connection(self, *, begin: bool = False) -> psycopg.Connection[dict[str, Any]]:
        """The open connection; a new one when the last was lost, unless a transaction is
        open on it (BEGIN: the one about to open)."""
        if self._closed:
            raise RepositoryError("the catalog is closed", path=self.path)
        if threading.get_ident() != self._owner:
            raise RepositoryError("catalog: used from another thread than the one that "
                                  "opened it", path=self.path,
                                  hint="open a repository in each thread")
        if self._db is None or self._db.closed:
            if self._depth and not begin:
                raise CatalogUnavailable("the connection to the catalog was lost inside a "
                                         "transaction; the server rolled it back",
                                         path=self.path)
            self._db = self._connect()
        return self._db

    def close(self) -> None:
        self._closed = True
        if self._db is not None:
            with contextlib.suppress(psycopg.Error):
                self._db.close()
            self._db = None

    @property
    def closed(self) -> bool:
        return self._closed

    def _translate(self, e: psycopg.Error, *, committing: bool = False) -> EngineError:
        """The one place that turns a psycopg error into an EngineError."""
        state = e.sqlstate
        broken = self._db is None or self._db.closed
        if broken or state in _UNAVAILABLE or (state or "").startswith("08"):
            why = _UNAVAILABLE.get(state or "", "the connection broke")
            if committing and broken:
                return CatalogUnavailable(
                    f"the connection to the catalog broke while committing ({why}): the "
                    f"transaction may or may not have been applied", path=self.path,
                    hint="reopen the repository: its recovery settles the journal")
            return CatalogUnavailable(f"catalog: {why} ({_first_line(e)}); the transaction "
                                      "was rolled back", path=self.path)
        if state == "25006":
            return RepositoryError("catalog: the catalog is open readonly", path=self.path)
        return RepositoryError(f"catalog: {_first_line(e)}", path=self.path)

    def _run(self, sql: str, args: Sequence[Any] | None) -> psycopg.Cursor[dict[str, Any]]:
        conn = self._connection()
        try:
            return conn.execute(sql.replace("?", "%s") if args is not None else sql, args)
        except psycopg.IntegrityError:
            raise   # a broken invariant in our own code: keep it loud and distinct
        except psycopg.Error as e:
            raise self._translate(e) from None

    def _exec(self, sql: str, args: Sequence[Any] | None = ()) -> psycopg.Cursor[dict[str, Any]]:
        """One statement (qmark placeholders).  Outside a transaction a read is retried once
        on a fresh connection; a change runs in a (fenced) transaction of its own, retried
        once when it is idempotent (an UPDATE or DELETE)."""
        self._connection()
        if self._depth:
            return self._run(sql, args)
        verb = sql.lstrip().split(None, 1)[0].upper()
        for attempt in (0, 1):
            try:
                if verb == "SELECT":
                    return self._run(sql, args)
                with self.transaction():
                    return self._run(sql, args)
            except CatalogUnavailable:
                if attempt or verb not in ("SELECT", "UPDATE", "DELETE"):
                    raise
        raise AssertionError("unreachable")

    # --- transactions ------------------------------------------------------------------------

    def _begin(self, stack: contextlib.ExitStack) -> psycopg.Connection[dict[str, Any]]:
        """BEGIN a transaction that STACK ends; a connection found lost at BEGIN (nothing
        done yet) is replaced once."""
        for attempt in (0, 1):
            conn = self._connection(begin=True)
            tx = conn.transaction()
            try:
                tx.__enter__()
            except psycopg.Error as e:
                if attempt or not conn.closed:
                    raise self._translate(e) from None
                continue
            stack.push(tx)
            return conn
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _write_tx(self) -> Iterator[None]:
        if self._readonly:
            raise RepositoryError("catalog: the catalog is open readonly", path=self.path)
        body_done = False
        try:
            with contextlib.ExitStack() as stack:
                conn = self._begin(stack)
                if self.fence is not None:
                    self.fence(conn)
                self._run("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))
                yield
                body_done = True
        except psycopg.IntegrityError:
            raise   # a deferred foreign key at COMMIT: our own bug, loud
        except psycopg.Error as e:
            raise self._translate(e, committing=body_done) from None

    @contextlib.contextmanager
    def _read_tx(self) -> Iterator[None]:
        try:
            with contextlib.ExitStack() as stack:
                self._begin(stack)
                self._run("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", None)
                yield
        except psycopg.Error as e:
            raise self._translate(e) from None

    def _journal_tag(self) -> dict[str, Any]:
        return {"host": self.host, "epoch": self.epoch}

    # --- schema ------------------------------------------------------------------------------

    def _create(self, repository_id: str | None) -> None:
        with self._schema_lock():
            if self._has_catalog():
                raise RepositoryError(f"the database {self.path} already holds a cowchain "
                                      "catalog", hint="open it, or use another database")
            self._run(schema_sql("postgresql"), None)
            self._run("INSERT INTO schema_version VALUES (?, ?)", (2, now()))
            self._migrate_from(2)
            if repository_id is not None:
                self._run("INSERT INTO repository VALUES (?, ?)", (repository_id, now()))

    def _check_schema(self) -> None:
        """Refuse a newer schema; migrate an older one (a read-write open)."""
        if self._readonly:
            with self.read():
                version = self._stored_version()
            refuse_newer(version, PG_SCHEMA_VERSION, f"catalog {self.path}")
            assert version is not None
            self.version = version
            return
        self.upgrade()

    def upgrade(self) -> tuple[int, int]:
        """Bring the schema up to PG_SCHEMA_VERSION (under the migration lock, in one
        transaction); returns (version before, version after).  A current catalog is only
        read: no lock is taken, no statement run."""
        with self.read():
            version = self._stored_version()
        if version == PG_SCHEMA_VERSION:
            self.version = version
            return version, version
        with self._schema_lock():
            version = self._stored_version()
            refuse_newer(version, PG_SCHEMA_VERSION, f"catalog {self.path}")
            assert version is not None
            self._migrate_from(version)
        self.version = PG_SCHEMA_VERSION
        return version, PG_SCHEMA_VERSION

    @contextlib.contextmanager
    def _schema_lock(self) -> Iterator[None]:
        with self.transaction():
            self._run("SELECT pg_advisory_xact_lock(?)", (MIGRATE_LOCK,))
            yield

    def _has_catalog(self) -> bool:
        rows = self._run("SELECT to_regclass('schema_version') IS NOT NULL AS present", None)
        return bool(rows.fetchall()[0]["present"])

    def _stored_version(self) -> int | None:
        """The catalog's schema version (None: the table has no row).

        Raises:
            RepositoryError: the database holds no cowchain catalog.
        """
        if not self._has_catalog():
            raise RepositoryError(f"the database {self.path} holds no cowchain catalog",
                                  hint="create the repository with this catalog first")
        found: int | None = self._run("SELECT max(version) AS v FROM schema_version",
                                      None).fetchall()[0]["v"]
        return found

    def _migrate_from(self, version: int) -> None:
        for v in range(version + 1, PG_SCHEMA_VERSION + 1):
            for sql in (PG_MIGRATIONS[v] if v in PG_MIGRATIONS
                        else migration_sql(v, "postgresql")):
                self._run(sql, None)
            self._run("INSERT INTO schema_version VALUES (?, ?)", (v, now()))

    def repository_id(self) -> str | None:
        """The id of the volume folder the catalog describes (None: not recorded yet)."""
        if self.version < 3:
            return None                 # an older catalog read as it is
        rows = self._exec("SELECT id FROM repository").fetchall()
        return str(rows[0]["id"]) if rows else None

    def _check_repository_id(self, rid: str) -> None:
        recorded = self.repository_id()
        if recorded is None and not self._readonly and self.version >= 3:
            with self.transaction():                 # a catalog migrated just now
                self._exec("INSERT INTO repository VALUES (?, ?)", (rid, now()))
        elif recorded is not None and recorded != rid:
            raise RepositoryError(
                f"the catalog {self.path} describes another volume folder (id {recorded}), "
                f"not this one (id {rid})",
                hint="give the folder that catalog was created with (mounted at any path), "
                     "or the catalog URL of this folder")

    # --- maintenance -------------------------------------------------------------------------

    def integrity_problems(self) -> list[str]:
        """Rows whose foreign keys name no row (PostgreSQL enforces them; a row can still
        break them when triggers were disabled behind its back): an empty list when all is
        well."""
        out = []
        with self.read():
            fks = self._exec(
                "SELECT c.conrelid::regclass::text AS tbl, a.attname AS col, "
                "c.confrelid::regclass::text AS ref, f.attname AS refcol "
                "FROM pg_constraint c "
                "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1] "
                "JOIN pg_attribute f ON f.attrelid = c.confrelid AND f.attnum = c.confkey[1] "
                "WHERE c.contype = 'f' AND c.connamespace = current_schema()::regnamespace "
                "ORDER BY 1, 2").fetchall()
            for fk in fks:
                q = _sql.SQL("SELECT t.{col} AS v FROM {tbl} t WHERE t.{col} IS NOT NULL AND "
                             "NOT EXISTS (SELECT 1 FROM {ref} r WHERE r.{refcol} = t.{col})"
                             ).format(**{k: _sql.Identifier(fk[k]) for k in fk})
                for r in self._run(q.as_string(self._connection()), None):
                    out.append(f"foreign key: {fk['tbl']}.{fk['col']} = {r['v']!r} names "
                               f"no {fk['ref']} row")
        return out


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _last_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[-1].split("FATAL:")[-1].strip()
