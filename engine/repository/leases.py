"""Per-chain write leases for a repository shared by several hosts (PostgreSQL catalog).

A chain's lease is one row of ``chain_leases``: the holder (a host id), a fencing **epoch**
that grows by one on every acquisition (never on renewal) and an expiry on the database
server's clock.  Three guards stop a host that lost its lease from changing a chain; the
design and its timing argument are in ``docs/multihost.md``:

- **acquire/takeover** is one transaction that locks the row and takes it only when it is
  free, or expired for longer than the grace G; it bumps the epoch.
- **the SQL fence** (:meth:`LeaseManager.fence_for`): every catalog transaction of a lease
  holder first locks its lease row ``FOR SHARE`` with the holder, the epoch and
  ``expires_at > clock_timestamp()``; no row → :class:`~engine.errors.LeaseLost` and the
  transaction rolls back.  A takeover's ``UPDATE`` waits for that lock, so a late commit
  from the old epoch cannot land after the new epoch begins.
- **the local self-fence** (:meth:`Lease.check`): the holder stops writing at
  ``deadline = t0 + R`` on ``time.monotonic()``, t0 read *before* the renewal that succeeded
  was sent; a renewal thread on its own connection renews every P.

Every connection sets ``idle_in_transaction_session_timeout`` (≤ L), ``lock_timeout`` and
``statement_timeout`` (:func:`connect`), so a paused holder cannot hold a lease row lock
past them.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

try:
    import psycopg
except ImportError:       # the optional 'postgresql' extra: leases exist only with it
    pass

from engine.catalog_pg import LEASE_DDL as _PG_LEASE_DDL
from engine.catalog_pg import PgSettings
from engine.errors import (CatalogUnavailable, ChainLeased, InvalidArgument, LeaseLost,
                           RepositoryError)

#: The two lease tables: one home, the PostgreSQL catalog's schema, which creates them.
LEASE_DDL: list[str] = _PG_LEASE_DDL


@dataclasses.dataclass(frozen=True)
class LeaseSettings:
    """The lease timing, in seconds (symbols of ``docs/multihost.md``).

    Attributes:
        lease: L, the lease length the server grants (``expires_at = clock_timestamp() + L``).
        renew_interval: P, time between renewals.
        renew_deadline: R, a holder writes nothing after t0 + R (t0: before its last
            successful renewal was sent).
        grace: G, how long a taker waits after ``expires_at``.
        write_window: W, longest time from issuing a write until it is on shared storage or
            certainly dropped (kernel writeback on NFS; one memcpy on one machine).
        clock_rate: ρ, how much slower a holder's clock may run than the server's.
        clock_step: δ, largest forward step of the server's clock within one lease.
        idle_in_transaction_timeout, lock_timeout, statement_timeout: set on every
            connection; the first must not exceed L.
        connect_timeout: libpq's connect_timeout (whole seconds, at least 2).
        reconnect_timeout: how long a call keeps retrying a lost database connection
            before it gives up with a typed error.
    """

    lease: float = 30.0
    renew_interval: float = 5.0
    renew_deadline: float = 18.0
    grace: float = 30.0
    write_window: float = 35.0
    clock_rate: float = 0.1
    clock_step: float = 0.0
    idle_in_transaction_timeout: float = 10.0
    lock_timeout: float = 5.0
    statement_timeout: float = 10.0
    connect_timeout: int = 5
    reconnect_timeout: float = 30.0

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def for_tests(cls, **changes: Any) -> LeaseSettings:
        """Processes on one machine (W is one memcpy): L=3, P=0.5, R=1.8, G=0.5."""
        base: dict[str, Any] = dict(
            lease=3.0, renew_interval=0.5, renew_deadline=1.8, grace=0.5, write_window=0.1,
            idle_in_transaction_timeout=2.0, lock_timeout=1.0, statement_timeout=2.0,
            connect_timeout=2, reconnect_timeout=10.0)
        base.update(changes)
        return cls(**base)

    @classmethod
    def from_env(cls) -> LeaseSettings:
        """The profile named by ``COWCHAIN_LEASE_PROFILE``: ``test`` (:meth:`for_tests`) or
        unset/``production`` (the defaults)."""
        name = os.environ.get("COWCHAIN_LEASE_PROFILE", "production")
        if name == "test":
            return cls.for_tests()
        if name == "production":
            return cls()
        raise InvalidArgument(f"COWCHAIN_LEASE_PROFILE must be 'test' or 'production', "
                              f"not {name!r}", value=name)

    def validate(self) -> None:
        """Refuse timings that break the safety or liveness rule (``InvalidArgument``)."""
        L, P, R, G = self.lease, self.renew_interval, self.renew_deadline, self.grace
        for name in ("lease", "renew_interval", "renew_deadline", "idle_in_transaction_timeout",
                     "lock_timeout", "statement_timeout", "reconnect_timeout"):
            if not getattr(self, name) > 0:
                raise InvalidArgument(f"lease setting {name} must be positive",
                                      value=getattr(self, name))
        for name in ("grace", "write_window", "clock_rate", "clock_step"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"lease setting {name} must not be negative",
                                      value=getattr(self, name))
        unsafe = R * (1 + self.clock_rate) + self.write_window
        if unsafe > L + G - self.clock_step:
            raise InvalidArgument(
                f"unsafe lease timing: R*(1+rho) + W = {unsafe:g} s exceeds "
                f"L + G - delta = {L + G - self.clock_step:g} s",
                hint="shorten the renew deadline or lengthen the lease or grace "
                     "(see docs/multihost.md)")
        if R >= L:
            raise InvalidArgument(f"renew deadline {R:g} s must be shorter than the lease "
                                  f"{L:g} s", value=R)
        if R < 2 * P:
            raise InvalidArgument(f"renew deadline {R:g} s leaves room for fewer than two "
                                  f"renewals every {P:g} s", value=R,
                                  hint="renew more often or lengthen the renew deadline")
        if self.idle_in_transaction_timeout > L:
            raise InvalidArgument("idle_in_transaction_timeout must not exceed the lease",
                                  value=self.idle_in_transaction_timeout)
        if self.connect_timeout < 2:
            raise InvalidArgument("connect_timeout must be at least 2 s (libpq's minimum)",
                                  value=self.connect_timeout)

    def pg_settings(self) -> PgSettings:
        """The same session timeouts for the catalog's own connection."""
        return PgSettings(idle_in_transaction_timeout=self.idle_in_transaction_timeout,
                          lock_timeout=self.lock_timeout,
                          statement_timeout=self.statement_timeout,
                          connect_timeout=self.connect_timeout,
                          reconnect_wait=self.reconnect_timeout)

    def options(self) -> str:
        """The per-session settings, as libpq's ``options`` string."""
        return self.pg_settings().options()


def connect(url: str, settings: LeaseSettings) -> psycopg.Connection[Any]:
    """An autocommit connection with the session timeouts of ``settings``."""
    return psycopg.connect(url, autocommit=True, options=settings.options(),
                           connect_timeout=settings.connect_timeout)


#: SQLSTATEs worth retrying on a live connection: serialization failure, deadlock, lock
#: timeout (a holder's fenced transaction holds the row; a paused one is cut off by
#: idle_in_transaction_session_timeout)
_RETRY = ("40001", "40P01", "55P03")


def _broken(conn: psycopg.Connection[Any] | None) -> bool:
    return conn is None or conn.closed or conn.broken


class Lease:
    """A chain's write lease held by this process.

    Attributes:
        chain (str), holder (str), epoch (int).
        deadline (float): ``time.monotonic()`` value after which this host writes nothing.
        taken_over (bool): another holder had it before (its journal entries need recovery).
    """

    def __init__(self, chain: str, holder: str, epoch: int, deadline: float,
                 taken_over: bool) -> None:
        self.chain = chain
        self.holder = holder
        self.epoch = epoch
        self.deadline = deadline
        self.taken_over = taken_over
        self._why: str | None = None
        self._mu = threading.Lock()

    @property
    def lost(self) -> bool:
        """True once the lease is known lost (sticky: a lost lease never comes back)."""
        if self._why is None and time.monotonic() >= self.deadline:
            self._lose("not renewed before its deadline")
        return self._why is not None

    def check(self) -> None:
        """Raise :class:`LeaseLost` past the deadline or once the lease is known lost.

        Call it before each write batch, each flush and each commit."""
        if self.lost:
            raise LeaseLost(self.chain, self.epoch, self._why or "lost")

    def _lose(self, why: str) -> None:
        with self._mu:
            if self._why is None:
                self._why = why

    def _renewed(self, t0: float, renew_deadline: float) -> None:
        with self._mu:
            if self._why is None:
                self.deadline = max(self.deadline, t0 + renew_deadline)

    def __repr__(self) -> str:
        return (f"Lease({self.chain!r}, holder={self.holder!r}, epoch={self.epoch}, "
                f"lost={self._why is not None})")


@dataclasses.dataclass(frozen=True)
class HostInfo:
    """A row of ``cowchain host list``: ``alive`` = heartbeat within the lease length."""
    host_id: str
    hostname: str
    pid: int
    joined_at: datetime.datetime
    heartbeat: datetime.datetime
    alive: bool
    leases: int


@dataclasses.dataclass(frozen=True)
class LeaseInfo:
    """A chain's lease row; ``live`` = held and not expired; ``expires_in`` in seconds."""
    chain: str
    holder: str | None
    epoch: int
    expires_at: datetime.datetime | None
    live: bool
    expires_in: float | None


class LeaseManager:
    """This host's leases: join, acquire, renew (a daemon thread), release.

    One manager per process; its methods may be called from several threads.
    """

    def __init__(self, url: str, host_id: str, settings: LeaseSettings | None = None, *,
                 hostname: str | None = None) -> None:
        if not host_id or len(host_id) > 200 or not host_id.isprintable():
            raise InvalidArgument("a host id must be 1-200 printable characters",
                                  value=host_id)
        self.url = url
        self.host_id = host_id
        self.hostname = hostname or socket.gethostname()
        self.settings = settings or LeaseSettings()
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.RLock()           # the caller-side connection
        self._state = threading.Lock()           # _mine
        self._mine: dict[str, Lease] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: number of renewal rounds that reached the server (for tests and the operator)
        self.renewals = 0

    # --- connections ------------------------------------------------------------------------

    def _run(self, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """Run ``fn(conn)`` in one transaction on the caller-side connection, reconnecting
        and retrying while the server is unreachable (up to ``reconnect_timeout``)."""
        give_up = time.monotonic() + self.settings.reconnect_timeout
        with self._lock:
            while True:
                try:
                    if _broken(self._conn):
                        self._conn = connect(self.url, self.settings)
                    conn = self._conn
                    assert conn is not None
                    with conn.transaction():
                        return fn(conn)
                except psycopg.Error as e:
                    if not _broken(self._conn) and e.sqlstate not in _RETRY:
                        raise RepositoryError(f"the catalog database refused a lease "
                                              f"request: {e}".strip()) from None
                    if time.monotonic() >= give_up:
                        raise CatalogUnavailable(
                            f"the catalog database is unreachable: {e}".strip()) from None
                    time.sleep(min(self.settings.renew_interval, 0.5))

    # --- host -------------------------------------------------------------------------------

    def join(self) -> None:
        """Record this host (upsert its ``hosts`` row) and start the renewal thread."""
        def upsert(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "INSERT INTO hosts (host_id, hostname, pid, joined_at, heartbeat) "
                "VALUES (%s, %s, %s, clock_timestamp(), clock_timestamp()) "
                "ON CONFLICT (host_id) DO UPDATE SET hostname = EXCLUDED.hostname, "
                "pid = EXCLUDED.pid, joined_at = EXCLUDED.joined_at, "
                "heartbeat = EXCLUDED.heartbeat",
                (self.host_id, self.hostname, os.getpid()))
        self._run(upsert)
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                            name=f"lease-renewal-{self.host_id}")
            self._thread.start()

    # --- leases -----------------------------------------------------------------------------

    def acquire(self, chain: str, *, wait: float = 0) -> Lease:
        """The chain's write lease: ours already → the same Lease; free, or expired for
        longer than G → taken with epoch + 1; held live by another → :class:`ChainLeased`
        (after polling up to ``wait`` seconds)."""
        if self._thread is None:
            self.join()
        give_up = time.monotonic() + wait
        while True:
            with self._state:
                have = self._mine.get(chain)
            if have is not None and not have.lost:
                return have
            t0 = time.monotonic()          # before the request is sent
            got = self._run(lambda conn: self._try_take(conn, chain, have, t0))
            if isinstance(got, Lease):
                with self._state:
                    self._mine[chain] = got
                return got
            holder, expires_in = got
            left = give_up - time.monotonic()
            if left <= 0:
                raise ChainLeased(chain, holder, expires_in)
            time.sleep(min(self.settings.renew_interval, left))

    def _try_take(self, conn: psycopg.Connection[Any], chain: str, lost: Lease | None,
                  t0: float) -> Lease | tuple[str, float]:
        conn.execute("INSERT INTO chain_leases (chain) VALUES (%s) ON CONFLICT DO NOTHING",
                     (chain,))
        row = conn.execute(
            "SELECT holder, epoch, expires_at IS NULL OR expires_at + %s * interval '1 second'"
            " <= clock_timestamp(), "
            "COALESCE(EXTRACT(EPOCH FROM expires_at - clock_timestamp()), 0)::float8 "
            "FROM chain_leases WHERE chain = %s FOR UPDATE",
            (self.settings.grace, chain)).fetchone()
        assert row is not None
        holder, epoch, takeable, expires_in = row
        # A lease this manager held and lost: nobody else used it, take it back at once.
        ours_lost = (lost is not None and holder == self.host_id and epoch == lost.epoch)
        if holder is not None and not takeable and not ours_lost:
            return holder, float(expires_in)
        new = conn.execute(
            "UPDATE chain_leases SET holder = %s, epoch = epoch + 1, "
            "expires_at = clock_timestamp() + %s * interval '1 second' "
            "WHERE chain = %s RETURNING epoch",
            (self.host_id, self.settings.lease, chain)).fetchone()
        assert new is not None
        return Lease(chain, self.host_id, int(new[0]), t0 + self.settings.renew_deadline,
                     taken_over=holder is not None)

    def release(self, chain: str) -> None:
        """Give the chain's lease up (holder NULL; the epoch stays). No-op if not ours."""
        with self._state:
            lease = self._mine.pop(chain, None)
        if lease is None:
            return
        lease._lose("released")
        self._run(lambda conn: conn.execute(
            "UPDATE chain_leases SET holder = NULL, expires_at = NULL "
            "WHERE chain = %s AND holder = %s AND epoch = %s",
            (chain, self.host_id, lease.epoch)))

    def force_release(self, chain: str) -> int:
        """Operator: free the chain's lease whoever holds it, bumping the epoch (so every
        transaction of the old holder is fenced out). Returns the new epoch."""
        def free(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(
                "UPDATE chain_leases SET holder = NULL, expires_at = NULL, epoch = epoch + 1"
                " WHERE chain = %s RETURNING epoch", (chain,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO chain_leases (chain, epoch) VALUES (%s, 1)",
                             (chain,))
                return 1
            return int(row[0])
        epoch: int = self._run(free)
        with self._state:
            mine = self._mine.pop(chain, None)
        if mine is not None:
            mine._lose("released by force")
        return epoch

    def fence_for(self, lease: Lease) -> Callable[[psycopg.Connection[Any]], None]:
        """The SQL fence for a catalog transaction made under ``lease``: call it first in
        the transaction, on the catalog's connection. It checks the local deadline, then
        locks the lease row ``FOR SHARE`` if (and only if) it is still ours, at this epoch,
        unexpired on the server's clock; otherwise raises :class:`LeaseLost`."""
        def fence(conn: psycopg.Connection[Any]) -> None:
            lease.check()
            row = conn.execute(
                "SELECT 1 FROM chain_leases WHERE chain = %s AND holder = %s AND epoch = %s"
                " AND expires_at > clock_timestamp() FOR SHARE",
                (lease.chain, lease.holder, lease.epoch)).fetchone()
            if row is None:
                lease._lose("the lease row has a newer epoch or expired (fenced in SQL)")
                lease.check()
        return fence

    def held(self) -> list[Lease]:
        """The leases this manager holds (including ones found lost, until released)."""
        with self._state:
            return list(self._mine.values())

    # --- operator view ----------------------------------------------------------------------

    def hosts(self) -> list[HostInfo]:
        rows = self._run(lambda conn: conn.execute(
            "SELECT h.host_id, h.hostname, h.pid, h.joined_at, h.heartbeat, "
            "h.heartbeat + %s * interval '1 second' > clock_timestamp(), "
            "(SELECT count(*) FROM chain_leases c WHERE c.holder = h.host_id "
            " AND c.expires_at > clock_timestamp()) "
            "FROM hosts h ORDER BY h.host_id", (self.settings.lease,)).fetchall())
        return [HostInfo(r[0], r[1], int(r[2]), r[3], r[4], bool(r[5]), int(r[6]))
                for r in rows]

    def leases(self) -> list[LeaseInfo]:
        rows = self._run(lambda conn: conn.execute(
            "SELECT chain, holder, epoch, expires_at, "
            "holder IS NOT NULL AND expires_at > clock_timestamp(), "
            "EXTRACT(EPOCH FROM expires_at - clock_timestamp())::float8 "
            "FROM chain_leases ORDER BY chain").fetchall())
        return [LeaseInfo(r[0], r[1], int(r[2]), r[3], bool(r[4]),
                          None if r[5] is None else float(r[5])) for r in rows]

    def lease_of(self, chain: str) -> LeaseInfo | None:
        return next((i for i in self.leases() if i.chain == chain), None)

    # --- renewal ----------------------------------------------------------------------------

    def _renew_loop(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        P = self.settings.renew_interval
        while not self._stop.is_set():
            t0 = time.monotonic()                    # before the renewal is sent
            with self._state:
                mine = [lease for lease in self._mine.values() if not lease.lost]
            ok = False
            try:
                if _broken(conn):
                    conn = connect(self.url, self.settings)
                assert conn is not None
                gone = self._renew_once(conn, mine)
                ok = True
            except psycopg.Error:
                # unreachable or restarting server: retry until each lease's deadline
                if conn is not None and not conn.closed:
                    try:
                        conn.close()
                    except psycopg.Error:
                        pass
                conn = None
            if ok:
                self.renewals += 1
                for lease in mine:
                    if lease in gone:
                        lease._lose("the renewal found the lease taken over or expired")
                    else:
                        lease._renewed(t0, self.settings.renew_deadline)
            for lease in mine:
                _ = lease.lost                        # marks those past their deadline
            # after a failure retry sooner, still within the deadline
            self._stop.wait(max(0.0, t0 + (P if ok else P / 2) - time.monotonic()))
        if conn is not None:
            conn.close()

    def _renew_once(self, conn: psycopg.Connection[Any], mine: list[Lease]) -> list[Lease]:
        gone: list[Lease] = []
        with conn.transaction():
            conn.execute("UPDATE hosts SET heartbeat = clock_timestamp() WHERE host_id = %s",
                         (self.host_id,))
            for lease in mine:
                row = conn.execute(
                    "UPDATE chain_leases SET expires_at = clock_timestamp() + "
                    "%s * interval '1 second' WHERE chain = %s AND holder = %s "
                    "AND epoch = %s AND expires_at > clock_timestamp() RETURNING 1",
                    (self.settings.lease, lease.chain, self.host_id, lease.epoch)).fetchone()
                if row is None:
                    gone.append(lease)
        return gone

    def close(self, *, release: bool = True) -> None:
        """Stop renewing; with ``release``, give up every lease held (best effort)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.statement_timeout + 5)
            self._thread = None
        if release:
            for chain in [lease.chain for lease in self.held()]:
                try:
                    self.release(chain)
                except RepositoryError:
                    pass
        with self._state:
            for lease in self._mine.values():
                lease._lose("the lease manager was closed")
            self._mine.clear()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> LeaseManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
