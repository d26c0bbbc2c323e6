"""The repository catalog: chains, volumes, snapshots and the operation journal, in SQLite.

The catalog is the truth about snapshots (which exist, their descriptions, which volume each
owns) and about the chain a caller sees; the QCOW2 headers are the truth about which file
backs which (``Repository.check`` reconciles the two).

Durability: WAL journal mode with ``synchronous=FULL``, so a committed transaction survives a
crash or power loss.  Every multi-row change runs in one :meth:`Catalog.transaction`, taken
with ``BEGIN IMMEDIATE`` so that it cannot fail half way on a lock.

Journal: an operation that touches files first inserts an intent row (op, args as JSON,
step, state ``running``), updates ``step`` after each file step, and sets state
``committed`` in the same transaction that applies its catalog changes.  What remains after
that (removing files the operation made unused) is listed in the committed row's args, and
the row is deleted when it is done.  ``Repository.open`` finds rows left by a crash and
rolls each operation forward or back.

Timestamps are ISO 8601 strings in UTC (``2026-01-02T03:04:05.123456Z``).

Thread model: one owner thread; the connection refuses use from another thread.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno as _errno
import json
import os
import re
import sqlite3
from dataclasses import dataclass, fields
from contextlib import AbstractContextManager
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from engine.errors import EngineError, RepositoryError, io_error

#: The version of the schema below.  A catalog with a newer version is refused (a newer
#: cowchain wrote it); an older one is migrated by a read-write open (:data:`_MIGRATIONS`).
#: The file mirrors it in ``PRAGMA user_version`` (the schema_version table is the truth).
SCHEMA_VERSION = 3

#: The tables every catalog backend has, in SQL that SQLite and PostgreSQL both accept once
#: the column types are filled in (:func:`schema_sql`): ``{int}`` a 64-bit integer,
#: ``{serial}`` an integer key the database numbers in increasing order.
_SCHEMA_TEMPLATE = """
CREATE TABLE schema_version (
    version     {int} NOT NULL,
    applied     TEXT NOT NULL
);
CREATE TABLE chains (
    name            TEXT PRIMARY KEY,
    size            {int} NOT NULL,          -- virtual size, bytes
    cluster_size    {int} NOT NULL,          -- of the chain's qcow2 volumes, bytes
    created         TEXT NOT NULL,
    leaf            TEXT NOT NULL REFERENCES volumes(id) DEFERRABLE INITIALLY DEFERRED,
    preview         TEXT,                      -- id of the snapshot being previewed
    saved_leaf      TEXT REFERENCES volumes(id) DEFERRABLE INITIALLY DEFERRED,
                                               -- the leaf kept aside during a preview
    origin_chain    TEXT,                      -- a clone: the chain and snapshot it
    origin_snapshot TEXT                       --   was cloned from
);
CREATE TABLE volumes (
    id          TEXT PRIMARY KEY,              -- uuid
    chain       TEXT NOT NULL REFERENCES chains(name) DEFERRABLE INITIALLY DEFERRED,
    path        TEXT NOT NULL UNIQUE,          -- relative to the repository folder
    format      TEXT NOT NULL CHECK (format IN ('raw', 'qcow2')),
    role        TEXT NOT NULL CHECK (role IN ('base', 'internal', 'leaf', 'shared')),
    parent      TEXT REFERENCES volumes(id) DEFERRABLE INITIALLY DEFERRED,
    legality    TEXT NOT NULL CHECK (legality IN ('LEGAL', 'ILLEGAL')),
    created     TEXT NOT NULL,
    size        {int},                       -- virtual size, bytes (NULL: not yet recorded)
    ino         {int},                       -- raw volumes: the file's inode number
    stamp       TEXT,                          -- sealed raw volumes: content stamp
    damaged     TEXT                           -- why check found the volume damaged, or NULL
);
CREATE INDEX volumes_parent ON volumes(parent);
CREATE INDEX volumes_chain ON volumes(chain);
CREATE TABLE snapshots (
    seq         {serial},   -- creation order
    id          TEXT NOT NULL UNIQUE,                -- uuid
    chain       TEXT NOT NULL REFERENCES chains(name) DEFERRABLE INITIALLY DEFERRED,
    created     TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    volume      TEXT NOT NULL REFERENCES volumes(id) DEFERRABLE INITIALLY DEFERRED
);
CREATE INDEX snapshots_chain ON snapshots(chain);
CREATE TABLE journal (
    id          {serial},
    op          TEXT NOT NULL,
    chain       TEXT,
    args        TEXT NOT NULL,                 -- JSON object
    step        TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('running', 'committed')),
    started     TEXT NOT NULL
);
"""


#: Indexes for the operations' keyed reads (the chains on a volume, the snapshots owning one,
#: the flagged and the unrecorded volumes), so that none reads a whole table.  They change no
#: row and no meaning: schema version 3 adds them (``IF NOT EXISTS``: a catalog opened by a
#: cowchain that added them at each open has some already), so an open runs no DDL.
INDEXES = [
    "CREATE INDEX IF NOT EXISTS chains_leaf ON chains(leaf)",
    "CREATE INDEX IF NOT EXISTS chains_saved_leaf ON chains(saved_leaf)",
    "CREATE INDEX IF NOT EXISTS snapshots_volume ON snapshots(volume)",
    "CREATE INDEX IF NOT EXISTS volumes_flagged ON volumes(id) "
    "WHERE legality != 'LEGAL' OR damaged IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS volumes_unrecorded ON volumes(id) WHERE size IS NULL",
]

#: SQLite's limit on the parameters of one statement is 32766; lists of ids go in pieces.
_IDS_PER_QUERY = 500


#: Schema changes, by the version they lead to: the statements that bring a catalog of the
#: version before up to it.  They run in one transaction with the new version row, so a
#: catalog is migrated completely or not at all.  Values that need the volume files (sizes,
#: identities) are filled in afterwards by the repository (``NULL`` means "not recorded").
_MIGRATIONS = {
    2: ["ALTER TABLE volumes ADD COLUMN size {int}",
        "ALTER TABLE volumes ADD COLUMN ino {int}",
        "ALTER TABLE volumes ADD COLUMN stamp TEXT",
        "ALTER TABLE volumes ADD COLUMN damaged TEXT"],
    3: INDEXES,
}

#: The column types of each SQL dialect (see :data:`_SCHEMA_TEMPLATE`).
DIALECTS = {
    "sqlite": {"int": "INTEGER", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    "postgresql": {"int": "BIGINT",
                   "serial": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"},
}


def schema_sql(dialect: str) -> str:
    """The tables of schema version 2 (every backend's common part) in DIALECT; the later
    versions' changes are :func:`migration_sql`'s."""
    script = _SCHEMA_TEMPLATE.format(**DIALECTS[dialect])
    return script if dialect == "sqlite" else _references_after_tables(script)


_REFERENCE = re.compile(
    r"^\s*(\w+)\s.*?(REFERENCES (\w+)\(\w+\)(?: DEFERRABLE INITIALLY DEFERRED)?)")


def _references_after_tables(script: str) -> str:
    """SCRIPT with each foreign key to a table created later moved to an ALTER TABLE at
    its end (SQLite accepts such forward references, PostgreSQL does not)."""
    lines, later, made, table = [], [], set(), ""
    for line in script.splitlines():
        m = re.match(r"CREATE TABLE (\w+)", line)
        if m:
            table = m.group(1)
            made.add(table)
        ref = _REFERENCE.match(line)
        if ref and ref.group(3) not in made:
            line = line.replace(" " + ref.group(2), "")
            later.append(f"ALTER TABLE {table} ADD FOREIGN KEY ({ref.group(1)}) "
                         f"{ref.group(2)};")
        lines.append(line)
    return "\n".join(lines + later) + "\n"


def migration_sql(version: int, dialect: str) -> list[str]:
    """The statements that bring a version VERSION-1 catalog up to VERSION, in DIALECT."""
    return [sql.format(**DIALECTS[dialect]) for sql in _MIGRATIONS[version]]


def now() -> str:
    """The current time as the catalog stores it."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


#: What ``now`` writes (the one shape ``parse_time`` reads the quick way).
_TIME_SHAPE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z")


def parse_time(text: str) -> _dt.datetime:
    """A time as the catalog stores it (``now``), as an aware UTC datetime."""
    if _TIME_SHAPE.match(text):
        # fromisoformat: some fifty times quicker than strptime, for the same result
        return _dt.datetime.fromisoformat(text[:-1] + "+00:00")
    return _dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=_dt.timezone.utc)


@dataclass
class ChainRow:
    name: str
    size: int
    cluster_size: int
    created: str
    leaf: str
    preview: str | None = None
    saved_leaf: str | None = None
    origin_chain: str | None = None
    origin_snapshot: str | None = None


@dataclass(frozen=True)
class VolumeFields:
    """What the catalog's row of a volume and the repository's public ``Volume`` both say
    of it (the row's path is relative to the repository folder, the Volume's absolute)."""

    id: str
    chain: str
    path: str
    format: str
    role: str
    parent: str | None
    legality: str


@dataclass(frozen=True)
class VolumeRow(VolumeFields):
    """A volume as the catalog records it (``dataclasses.replace`` makes a changed copy)."""

    created: str
    size: int | None = None
    ino: int | None = None
    stamp: str | None = None
    damaged: str | None = None


@dataclass
class SnapshotRow:
    id: str
    chain: str
    created: str
    description: str
    volume: str
    seq: int | None = None


@dataclass
class JournalRow:
    id: int
    op: str
    chain: str | None
    args: dict[str, Any]
    step: str
    state: str
    started: str
    #: the host and lease epoch that began it (a shared catalog; None otherwise)
    host: str | None = None
    epoch: int | None = None


def _translate(e: sqlite3.Error, path: str) -> EngineError:
    """The one place that turns an SQLite error into an EngineError."""
    text = str(e)
    code = getattr(e, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "disk is full" in text:
        return io_error(_errno.ENOSPC, f"catalog: {text}", path=path)
    if code == sqlite3.SQLITE_IOERR or "disk I/O error" in text:
        return io_error(_errno.EIO, f"catalog: {text}", path=path)
    return RepositoryError(f"catalog: {text}", path=path)


#: The tables of the row classes: (table, key column).
_TABLES: dict[type, tuple[str, str]] = {
    ChainRow: ("chains", "name"), VolumeRow: ("volumes", "id"), SnapshotRow: ("snapshots", "id")}

Row = ChainRow | VolumeRow | SnapshotRow
R = TypeVar("R", ChainRow, VolumeRow, SnapshotRow)


_COLUMNS: dict[str, tuple[str, ...]] = {}


def _columns(cls: type) -> tuple[str, ...]:
    cols = _COLUMNS.get(cls.__name__)
    if cols is None:
        cols = _COLUMNS[cls.__name__] = tuple(f.name for f in fields(cls))
    return cols


class SqlCatalog:
    """What every catalog backend shares: the transaction and read discipline, and the SQL
    of the rows and the journal (qmark placeholders; a backend whose driver uses another
    style rewrites them in its ``_exec``).

    A backend provides ``_exec`` (one statement; IntegrityError passes through untranslated,
    every other database error becomes an EngineError), ``_write_tx``/``_read_tx`` (the
    outermost transaction or read), ``close``, ``closed`` and ``integrity_problems``.
    """

    path: str
    #: the schema version of the store (older ones are read, not written)
    version: int
    #: called with the database connection first in every write transaction; it raises to
    #: abort the transaction (a shared catalog checks a chain's lease; SQLite never calls it)
    fence: Callable[[Any], None] | None = None

    def __init__(self) -> None:
        self._depth = 0
        self._reading = False

    # --- what a backend provides --------------------------------------------------------------

    def _exec(self, sql: str, args: Sequence[Any] = ()) -> Any:
        raise NotImplementedError

    def _write_tx(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def _read_tx(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def _journal_tag(self) -> dict[str, Any]:
        """Extra journal columns of a new entry (the PostgreSQL catalog: host and epoch)."""
        return {}

    # --- transactions ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _joined(self) -> Iterator[None]:
        """A nested transaction or read: it joins the one already open."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    @contextlib.contextmanager
    def _outermost(self, tx: AbstractContextManager[None], reading: bool) -> Iterator[None]:
        self._depth = 1
        self._reading = reading
        try:
            with tx:
                yield
        finally:
            self._depth = 0
            self._reading = False

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One durable transaction; a nested use joins the outer one."""
        if self._reading:
            raise RepositoryError("catalog: a change inside a read (internal error)",
                                  path=self.path)
        if self._depth:
            with self._joined():
                yield
            return
        with self._outermost(self._write_tx(), reading=False):
            yield

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        """One consistent read: every query inside sees the same committed state, even while
        another process commits.  Inside a transaction (or another read) it joins that one."""
        if self._depth:
            with self._joined():
                yield
            return
        with self._outermost(self._read_tx(), reading=True):
            yield

    # --- rows --------------------------------------------------------------------------------

    def _insert(self, row: Row) -> None:
        table = _TABLES[type(row)][0]
        cols = [c for c in _columns(type(row)) if not (c == "seq" and getattr(row, c) is None)]
        vals = [getattr(row, c) for c in cols]
        self._exec(f"INSERT INTO {table} ({', '.join(cols)}) VALUES "
                   f"({', '.join('?' * len(cols))})", vals)

    def _update(self, cls: type[Row], key_value: Any, changes: dict[str, Any]) -> None:
        table, key = _TABLES[cls]
        allowed = _columns(cls)
        bad = [k for k in changes if k not in allowed or k == key]
        if bad:
            raise ValueError(f"cannot update {table} columns {bad}")
        if not changes:
            return
        sets = ", ".join(f"{k} = ?" for k in changes)
        self._exec(f"UPDATE {table} SET {sets} WHERE {key} = ?", [*changes.values(), key_value])

    def _delete(self, cls: type[Row], key_value: Any) -> None:
        table, key = _TABLES[cls]
        self._exec(f"DELETE FROM {table} WHERE {key} = ?", (key_value,))

    def _rows(self, cls: type[R], where: str = "", args: tuple[Any, ...] = ()) -> list[R]:
        """The rows of CLS's table that match WHERE (SQL after the table name), as CLS."""
        cur = self._exec(f"SELECT * FROM {_TABLES[cls][0]} {where}", args)
        return [cls(**dict(r)) for r in cur]

    def _row(self, cls: type[R], column: str, value: Any) -> R | None:
        rows = self._rows(cls, f"WHERE {column} = ?", (value,))
        return rows[0] if rows else None

    # --- chains ------------------------------------------------------------------------------

    def chain(self, name: str) -> ChainRow | None:
        return self._row(ChainRow, "name", name)

    def chains(self) -> list[ChainRow]:
        return self._rows(ChainRow, "ORDER BY name")

    def insert_chain(self, row: ChainRow) -> None:
        self._insert(row)

    def update_chain(self, name: str, **changes: Any) -> None:
        self._update(ChainRow, name, changes)

    def delete_chain(self, name: str) -> None:
        self._delete(ChainRow, name)

    # --- volumes -----------------------------------------------------------------------------

    def volume(self, vid: str) -> VolumeRow | None:
        return self._row(VolumeRow, "id", vid)

    def volumes(self) -> dict[str, VolumeRow]:
        """Every volume of the repository, by id."""
        return {v.id: v for v in self._rows(VolumeRow)}

    def volume_by_path(self, path: str) -> VolumeRow | None:
        return self._row(VolumeRow, "path", path)

    def unrecorded_volumes(self) -> list[VolumeRow]:
        """Volumes whose size (and identity) is not recorded yet (a migrated catalog)."""
        return self._rows(VolumeRow, "WHERE size IS NULL")

    def volumes_under(self, vid: str) -> dict[str, VolumeRow]:
        """VID and the volumes its parent links lead to (its chain down to the base), by
        id: one keyed read per level, whatever the repository's size."""
        return self._linked(vid, "SELECT v.parent FROM volumes v JOIN linked ON v.id = linked.id "
                                 "WHERE v.parent IS NOT NULL")

    def volumes_over(self, vid: str) -> dict[str, VolumeRow]:
        """VID and the volumes whose parent links lead to it (everything stacked on it), by
        id."""
        return self._linked(vid, "SELECT v.id FROM volumes v JOIN linked ON v.parent = linked.id")

    def _linked(self, vid: str, step: str) -> dict[str, VolumeRow]:
        # UNION (not UNION ALL) ends a walk that comes back to a volume: a loop in the
        # parent links is returned as it is, for the caller to report
        cur = self._exec(f"WITH RECURSIVE linked(id) AS (SELECT ? UNION {step}) "
                         "SELECT * FROM volumes WHERE id IN (SELECT id FROM linked)", (vid,))
        return {r["id"]: VolumeRow(**dict(r)) for r in cur}

    def chains_on(self, vids: Iterable[str]) -> list[ChainRow]:
        """The chains whose leaf or saved leaf is one of VIDS, by name."""
        ids = list(dict.fromkeys(vids))
        out: dict[str, ChainRow] = {}
        for i in range(0, len(ids), _IDS_PER_QUERY):
            part = ids[i:i + _IDS_PER_QUERY]
            marks = ", ".join("?" * len(part))
            for r in self._rows(ChainRow, f"WHERE leaf IN ({marks}) OR saved_leaf IN ({marks})",
                                (*part, *part)):
                out[r.name] = r
        return [out[k] for k in sorted(out)]

    def snapshots_on(self, vids: Iterable[str]) -> list[SnapshotRow]:
        """The snapshots whose volume is one of VIDS, oldest first."""
        ids = list(dict.fromkeys(vids))
        out: list[SnapshotRow] = []
        for i in range(0, len(ids), _IDS_PER_QUERY):
            part = ids[i:i + _IDS_PER_QUERY]
            out += self._rows(SnapshotRow, f"WHERE volume IN ({', '.join('?' * len(part))})",
                              tuple(part))
        return sorted(out, key=lambda r: r.seq or 0)

    def flagged_volumes(self) -> list[VolumeRow]:
        """Volumes marked ILLEGAL or damaged."""
        return self._rows(VolumeRow, "WHERE legality != 'LEGAL' OR damaged IS NOT NULL")

    def children(self, vid: str) -> list[VolumeRow]:
        return self._rows(VolumeRow, "WHERE parent = ? ORDER BY created", (vid,))

    def insert_volume(self, row: VolumeRow) -> None:
        self._insert(row)

    def update_volume(self, vid: str, **changes: Any) -> None:
        self._update(VolumeRow, vid, changes)

    def delete_volume(self, vid: str) -> None:
        self._delete(VolumeRow, vid)

    # --- snapshots ---------------------------------------------------------------------------

    def snapshot(self, sid: str) -> SnapshotRow | None:
        return self._row(SnapshotRow, "id", sid)

    def snapshots(self, chain: str | None = None, *,
                  after: int | None = None) -> list[SnapshotRow]:
        """The snapshots of CHAIN (of every chain when None), oldest first; AFTER (a seq):
        only those taken after that snapshot of the chain."""
        if chain is None:
            return self._rows(SnapshotRow, "ORDER BY seq")
        if after is not None:
            return self._rows(SnapshotRow, "WHERE chain = ? AND seq > ? ORDER BY seq",
                              (chain, after))
        return self._rows(SnapshotRow, "WHERE chain = ? ORDER BY seq", (chain,))

    def insert_snapshot(self, row: SnapshotRow) -> None:
        self._insert(row)

    def update_snapshot(self, sid: str, **changes: Any) -> None:
        self._update(SnapshotRow, sid, changes)

    def delete_snapshot(self, sid: str) -> None:
        self._delete(SnapshotRow, sid)

    # --- journal -----------------------------------------------------------------------------

    def journal_begin(self, op: str, chain: str | None, args: dict[str, Any], *,
                      state: str = "running") -> int:
        """Record the intent of OP (call inside a transaction with its other changes)."""
        cols = {"op": op, "chain": chain, "args": json.dumps(args, sort_keys=True),
                "step": "intent", "state": state, "started": now(), **self._journal_tag()}
        rows = list(self._exec(
            f"INSERT INTO journal ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
            "RETURNING id", list(cols.values())))
        return int(rows[0]["id"])

    def journal_step(self, jid: int, step: str) -> None:
        self._exec("UPDATE journal SET step = ? WHERE id = ?", (step, jid))

    def journal_commit(self, jid: int, args: dict[str, Any]) -> None:
        """Mark OP committed, with the args its remaining (roll-forward) steps need."""
        self._exec("UPDATE journal SET state = 'committed', step = 'committed', args = ? "
                   "WHERE id = ?", (json.dumps(args, sort_keys=True), jid))

    def journal_end(self, jid: int) -> None:
        self._exec("DELETE FROM journal WHERE id = ?", (jid,))

    def journal(self) -> list[JournalRow]:
        """The operations in flight, oldest first."""
        out = []
        for r in self._exec("SELECT * FROM journal ORDER BY id"):
            d = dict(r)
            d["args"] = json.loads(d["args"])
            out.append(JournalRow(**d))
        return out


class Catalog(SqlCatalog):
    """The SQLite catalog of one repository.

    Arguments:
        path (str): the database file.
        create (bool): make a new catalog (the file must not exist).

    Raises:
        RepositoryError: the file is not a cowchain catalog, or its schema is newer than
            this version understands.
    """

    def __init__(self, path: str, *, create: bool = False, readonly: bool = False) -> None:
        super().__init__()
        if create and os.path.exists(path):
            raise RepositoryError(f"catalog already exists: {path}")
        if not create and not os.path.exists(path):
            raise RepositoryError(f"catalog is missing: {path}")
        self.path = path
        self._readonly = readonly
        #: the schema version of the file (older than SCHEMA_VERSION only when read-only)
        self.version = SCHEMA_VERSION
        self._db: sqlite3.Connection | None = None
        try:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
            self._db.row_factory = sqlite3.Row
            if readonly:
                # WAL lets this connection read a consistent state while a writer in another
                # process commits; query_only makes any write here an error.
                mode = self._db.execute("PRAGMA journal_mode").fetchone()[0]
                self._db.execute("PRAGMA query_only=ON")
            else:
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise RepositoryError(f"catalog {path}: cannot use WAL mode (got {mode})")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            if create:
                # executescript commits any open transaction first, so the script carries
                # its own: the schema and its version appear together or not at all.
                self._db.executescript(
                    "BEGIN IMMEDIATE;" + schema_sql("sqlite") + ";".join(INDEXES) + ";" +
                    f"INSERT INTO schema_version VALUES ({SCHEMA_VERSION}, '{now()}');"
                    f"PRAGMA user_version = {SCHEMA_VERSION};"
                    "COMMIT;")
            self._check_schema()
        except sqlite3.DatabaseError as e:
            raise RepositoryError(f"catalog {path} cannot be used: {e}") from e

    def _check_schema(self) -> None:
        assert self._db is not None            # called by __init__, once connected
        try:
            row = self._db.execute("SELECT max(version) FROM schema_version").fetchone()
        except sqlite3.DatabaseError as e:
            raise RepositoryError(f"{self.path} is not a cowchain catalog ({e})") from e
        version = row[0]
        refuse_newer(version, SCHEMA_VERSION, f"catalog {self.path}")
        self.version = version
        if self._readonly:
            return
        if version < SCHEMA_VERSION:
            self._migrate(version)
        elif self._db.execute("PRAGMA user_version").fetchone()[0] != version:
            self._db.execute(f"PRAGMA user_version = {version}")     # a catalog made before

    def _migrate(self, version: int) -> None:
        """Bring an older catalog up to SCHEMA_VERSION (a read-only open reads it as it is:
        the columns it lacks read as NULL)."""
        with self.transaction():
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for sql in migration_sql(v, "sqlite"):
                    self._exec(sql)
                self._exec("INSERT INTO schema_version VALUES (?, ?)", (v, now()))
            self._exec(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.version = SCHEMA_VERSION

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def closed(self) -> bool:
        return self._db is None

    # --- transactions ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write_tx(self) -> Iterator[None]:
        self._exec("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._db is not None and self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        try:
            self._exec("COMMIT")
        except BaseException:
            # A failed COMMIT (a deferred foreign key, a full disk) leaves the transaction
            # open in SQLite: end it, so the catalog stays as it was before.
            if self._db is not None and self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _read_tx(self) -> Iterator[None]:
        # a read transaction under WAL: one snapshot of the file, beside a writer
        self._exec("BEGIN DEFERRED")
        try:
            yield
        finally:
            if self._db is not None and self._db.in_transaction:
                self._db.execute("COMMIT")

    def _exec(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        if self._db is None:
            raise RepositoryError("the catalog is closed", path=self.path)
        try:
            return self._db.execute(sql, args)
        except sqlite3.IntegrityError:
            raise   # a broken invariant in our own code: keep it loud and distinct
        except sqlite3.Error as e:
            raise _translate(e, self.path) from None

    # --- maintenance -------------------------------------------------------------------------

    def integrity_problems(self) -> list[str]:
        """SQLite's own integrity and foreign-key checks: an empty list when all is well."""
        out = [r[0] for r in self._exec("PRAGMA integrity_check") if r[0] != "ok"]
        out += [f"foreign key: {tuple(r)}" for r in self._exec("PRAGMA foreign_key_check")]
        return out


def refuse_newer(version: int | None, known: int, what: str) -> None:
    """The one rule for a catalog's schema version: none, or newer than this cowchain
    understands (KNOWN), is refused."""
    if version is None or version > known:
        raise RepositoryError(
            f"{what} has schema version {version}; this cowchain understands version "
            f"{known}", hint="upgrade cowchain")
