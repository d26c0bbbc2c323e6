"""Repository: a folder of chains, their volumes and one catalog; its lifetime and lock,
and the public verbs, which the operations carry out."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import uuid
from typing import Iterable

from engine import destination as _destination
from engine.catalog import Catalog
from engine.catalog_pg import PgCatalog, PgSettings
from engine.errors import EngineError, ImageClosed, NotFound, RepositoryError
from engine.repository import check as _check
from engine.repository import operations
from engine.repository.chain import Chain
from engine.repository.catalog_api import CatalogStore
from engine.repository.context import Context
from engine.repository.leases import HostInfo, LeaseManager, LeaseSettings
from engine.repository.files import (CATALOG_NAME, FOLDER_ID_NAME, LOCK_NAME, VOLUMES_DIR,
                                     fsync_dir)
from engine.repository.values import PathArg, Progress, RepositoryCheck


class Repository:
    """A folder of chains, their volumes and one catalog.

    Use :meth:`create` or :meth:`open`; both return an open repository (a context manager).
    Opening runs the recovery of operations a crash interrupted.

    >>> import engine, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> with engine.Repository.create(os.path.join(d, "repo")) as repo:
    ...     disk = repo.create_chain("vm1", 1 << 20)
    ...     disk.write(0, b"hello")                  # returns the number of bytes written
    ...     snap = disk.snapshot("before the update")
    ...     _ = disk.write(0, b"HELLO")
    ...     disk.revert(snap.id)
    ...     disk.read(0, 5)
    5
    b'hello'
    """

    def __init__(self, path: PathArg, *, _create: bool = False, readonly: bool = False,
                 catalog: str | None = None, host_id: str | None = None,
                 catalog_settings: PgSettings | None = None) -> None:
        self._path = os.path.abspath(os.fspath(path))
        self._lock_fd: int | None = None
        #: the host this process acts as in a shared repository (None: a local catalog)
        self.host_id = (host_id or socket.gethostname()) if catalog else None
        if not readonly and catalog is None:
            self._lock()
        try:
            self._cat = self._open_catalog(catalog, _create, readonly, catalog_settings)
        except BaseException:
            self._unlock()
            raise
        self._in_use = _destination.register_folder(self._path)   # for the export rule
        self._ctx: Context = Context(self, self._path, self._cat, readonly)
        if isinstance(self._cat, PgCatalog) and self.host_id is not None:
            self._attach_leases(self._cat, self.host_id, readonly)
        if not _create and not readonly:
            try:
                self._recover_on_open()
                operations.record_unrecorded(self._ctx)
            except BaseException:
                self.close()
                raise

    def _open_catalog(self, url: str | None, create: bool, readonly: bool,
                      settings: PgSettings | None) -> CatalogStore:
        """The SQLite catalog in the folder, or the PostgreSQL catalog at URL, which must
        describe this folder (the id in its ``repository.id``; several hosts may mount the
        folder at different paths)."""
        if url is None:
            return Catalog(os.path.join(self._path, CATALOG_NAME), create=create,
                           readonly=readonly)
        return PgCatalog(url, create=create, readonly=readonly,
                         repository_id=_read_folder_id(self._path), host=self.host_id,
                         settings=settings or LeaseSettings.from_env().pg_settings())

    def _attach_leases(self, shared: PgCatalog, host_id: str, readonly: bool) -> None:
        """Writes under per-chain leases (docs/multihost.md); a read-write open joins."""
        try:
            leases = LeaseManager(shared.url, host_id, LeaseSettings.from_env())
            if not readonly:
                leases.join()
        except BaseException:
            self.close()
            raise
        self._ctx.attach_leases(leases, shared)

    def _recover_on_open(self) -> None:
        """Recover interrupted operations: all of them with a local catalog; with a shared
        one only those this host began (another host's are recovered by whoever takes its
        chains over)."""
        if self.host_id is None:
            self.recover()
            return
        mine = {j.chain for j in self._cat.journal() if j.host == self.host_id}
        if mine:
            # each under its lease; one still held (by this host's crashed process, until
            # it expires) is recovered by whoever acquires it next
            self._ctx.recover([c for c in mine if c is not None], skip_leased=True)

    # --- lifetime ---------------------------------------------------------------------------

    @classmethod
    def create(cls, path: PathArg, *, catalog: str | None = None, host_id: str | None = None,
               catalog_settings: PgSettings | None = None) -> Repository:
        """Make a new repository in PATH (a new or empty folder) and open it.

        Arguments:
            catalog (str | None): a PostgreSQL URL (``postgresql://...``, an empty database
                or one without a cowchain catalog) to keep the catalog there, for a folder
                that several hosts share; None: the SQLite catalog in the folder.
            host_id (str | None): this host's stable id with a shared catalog (default:
                the host name).
            catalog_settings (PgSettings | None): the PostgreSQL connection's timeouts.

        Raises:
            RepositoryError: PATH already holds a repository, or exists and is not an empty
                folder; the database already holds a catalog.
        """
        path = os.path.abspath(os.fspath(path))
        if any(os.path.isfile(os.path.join(path, n)) for n in (CATALOG_NAME, FOLDER_ID_NAME)):
            raise RepositoryError("already holds a cowchain repository", path=path,
                                  hint="open it with Repository.open, or choose a new folder")
        made = not os.path.exists(path)
        if not made:
            if not os.path.isdir(path) or os.listdir(path):
                raise RepositoryError("exists and is not an empty folder", path=path)
        else:
            parent = os.path.dirname(path)
            if not os.path.isdir(parent):
                raise NotFound("the parent folder does not exist", path=path)
            os.mkdir(path)
            fsync_dir(parent)
        os.mkdir(os.path.join(path, VOLUMES_DIR))
        if catalog is None:
            repo = cls(path, _create=True)
        else:
            _write_folder_id(path)
            try:
                repo = cls(path, _create=True, catalog=catalog, host_id=host_id,
                           catalog_settings=catalog_settings)
            except BaseException:
                # the folder as it was: a catalog refused leaves no half repository
                for name in (FOLDER_ID_NAME, VOLUMES_DIR):
                    with contextlib.suppress(OSError):
                        (os.rmdir if name == VOLUMES_DIR else os.unlink)(
                            os.path.join(path, name))
                if made:
                    with contextlib.suppress(OSError):
                        os.rmdir(path)
                raise
        fsync_dir(path)
        return repo

    @classmethod
    def open(cls, path: PathArg, *, readonly: bool = False, catalog: str | None = None,
             host_id: str | None = None,
             catalog_settings: PgSettings | None = None) -> Repository:
        """Open the repository in PATH and recover interrupted operations.

        With ``readonly=True`` nothing is locked, recovered or changed: any number of
        read-only opens may run beside each other and beside the one read-write open. They
        read the catalog as last committed (an operation still in flight in another
        process is not seen) and open volumes read-only, so a leaf that a writer holds open
        raises ImageLocked while snapshots stay readable. Every operation that would change
        the repository raises RepositoryError.

        With ``catalog`` (the PostgreSQL URL the repository was created with) the folder is
        not locked: several hosts open it at once, each with its own ``host_id`` (default:
        the host name), and an open recovers only the operations this host left in flight;
        ``catalog_settings`` sets the connection's timeouts.

        Raises:
            NotFound: PATH holds no repository.
            RepositoryError: another process has it open read-write (read-write opens
                only), the catalog is unusable, or it describes another folder.
            CatalogUnavailable: the PostgreSQL server cannot be reached.
        """
        path = os.path.abspath(os.fspath(path))
        marker = CATALOG_NAME if catalog is None else FOLDER_ID_NAME
        if not os.path.isfile(os.path.join(path, marker)):
            raise NotFound("no cowchain repository here" if catalog is None else
                           "no cowchain repository here (no repository.id: a repository "
                           "created with a PostgreSQL catalog has one)", path=path,
                           hint="create one with 'cowchain repo init DIR'")
        return cls(path, readonly=readonly, catalog=catalog, host_id=host_id,
                   catalog_settings=catalog_settings)

    @classmethod
    def upgrade(cls, path: PathArg, *, catalog: str | None = None,
                host_id: str | None = None) -> tuple[int, int]:
        """Bring the catalog's schema up to this cowchain's version (an older one is also
        migrated by any read-write open); returns (version before, version after).

        Raises:
            RepositoryError: the catalog is newer than this cowchain understands, or
                NotFound and the errors of :meth:`open`.
        """
        with cls.open(path, readonly=True, catalog=catalog) as old:
            before = old._cat.version
        with cls.open(path, catalog=catalog, host_id=host_id) as repo:
            return before, repo._cat.version

    @property
    def readonly(self) -> bool:
        return self._ctx.readonly

    def _lock(self) -> None:
        lock_path = os.path.join(self._path, LOCK_NAME)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise RepositoryError(f"cannot open the lock file: {e.strerror}",
                                  path=lock_path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RepositoryError(f"the repository is in use by another process (pid {holder})",
                                  path=self._path, hint="close it there first (a chain "
                                  "exported by the NBD server takes snapshots through it: "
                                  "'cowchain chain snapshot' asks the server)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def note_holder(self, what: str) -> None:
        """Say in the lock file what holds the repository (after the pid), for the error
        another process gets when it finds the repository in use."""
        if self._lock_fd is not None:
            os.pwrite(self._lock_fd, f"{os.getpid()}, {what}\n".encode()[:256], 0)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        """Flush and close every chain, the catalog and the lock. Idempotent."""
        ctx: Context | None = getattr(self, "_ctx", None)   # None: __init__ failed early
        if ctx is None or ctx.closed:
            return
        err = None
        for c in list(ctx.chains.values()):
            try:
                c.close()
            except EngineError as e:
                err = err or e
        ctx.chains.clear()
        if ctx.leases is not None:
            ctx.leases.close()                  # releases the leases still held
        self._cat.close()
        self._unlock()
        _destination.unregister_folder(self._in_use)
        ctx.closed = True
        if err is not None:
            raise err

    def __del__(self) -> None:
        # An unclosed repository must not keep its lock (and its leaf handles) forever.
        if not self.closed:
            try:
                self.close()
            except Exception:
                pass

    @property
    def closed(self) -> bool:
        ctx = getattr(self, "_ctx", None)
        return ctx is None or ctx.closed

    @property
    def path(self) -> str:
        return self._path

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Repository {self._path}{' closed' if self.closed else ''}>"

    # --- chains -----------------------------------------------------------------------------

    def chain(self, name: str) -> Chain:
        """The chain NAME (the same object each call while it is open).

        Raises:
            NotFound: no such chain.
        """
        self._check_open()
        return self._ctx.chain(name)

    def chains(self) -> list[Chain]:
        """Every chain, by name."""
        self._check_open()
        with self._cat.read():
            return [self.chain(r.name) for r in self._cat.chains()]

    def create_chain(self, name: str, size: int, *, base_format: str | None = None,
                     cluster_size: int = 65536, extended_l2: bool = False) -> Chain:
        """Make a chain of one base volume (also its leaf) of SIZE bytes, reading as zeros.

        Arguments:
            name (str): the chain's name (letters, digits, '.', '_', '-').
            size (int): virtual size in bytes, a multiple of 512.
            base_format (str | None): "raw" or "qcow2"; None: raw, or qcow2 with
                ``extended_l2``.
            cluster_size (int): cluster size of the chain's qcow2 volumes, a power of two
                from 512 to 2 MiB (bytes); at least 16 KiB with ``extended_l2``.
            extended_l2 (bool): every qcow2 volume of the chain (the base, and each overlay
                a snapshot, revert, preview or clone makes) has extended L2 entries: 32
                subclusters per cluster, so a small write into a fresh overlay copies
                nothing from below. Needs a qcow2 base.

        Raises:
            InvalidArgument, RepositoryError (the name is taken).
        """
        return operations.create_chain(self._ctx, name, size, base_format=base_format,
                                       cluster_size=cluster_size, extended_l2=extended_l2)

    def import_chain(self, name: str, source: PathArg, *, format: str, base_format: str = "raw",
                     cluster_size: int = 65536, progress: Progress | None = None,
                     allow_unsafe_backing: bool = False) -> Chain:
        """Make a chain whose base volume is a copy of an existing disk image.

        SOURCE is opened read-only (with its backing chain, under the usual backing-file
        policy and a shared lock, so a disk that a running VM writes is refused) and its
        whole virtual disk is copied, as ``qemu-img convert`` would: only data ranges are
        read and all-zero blocks stay sparse. The source is never changed. The chain appears
        complete or not at all: a crash during the copy leaves no chain and no file.

        Arguments:
            name (str): the new chain's name.
            source (str): the image to copy.
            format (str): "raw" or "qcow2": the source's format (never probed).
            base_format (str): format of the new base volume, "raw" or "qcow2".
            cluster_size (int): cluster size of the chain's qcow2 volumes.
            progress (callable | None): ``progress(done_bytes, total_bytes)``.
            allow_unsafe_backing (bool): follow the source's backing references even where
                the policy refuses them (absolute names, names leaving its folder); only for
                sources you trust. The new chain's volumes never have such references.

        Raises:
            InvalidArgument, NotFound, RepositoryError (the name is taken), and the errors of
            ``engine.open`` for a source it cannot read.
        """
        return operations.import_chain(self._ctx, name, source, format=format,
                                       base_format=base_format, cluster_size=cluster_size,
                                       progress=progress,
                                       allow_unsafe_backing=allow_unsafe_backing)

    def delete_chain(self, name: str) -> None:
        """Remove chain NAME with its snapshots and the volumes only it uses.

        Raises:
            NotFound; RepositoryError: a clone uses one of its volumes (the message names it).
        """
        operations.delete_chain(self._ctx, name)

    # --- recovery and check -----------------------------------------------------------------

    def recover(self, chains: Iterable[str] | None = None) -> list[str]:
        """Finish or undo every operation the journal shows in flight (``open`` calls this),
        or only those on CHAINS.

        Returns:
            list[str]: one line per operation recovered, saying what was done.
        """
        return self._ctx.recover(chains)

    def hosts(self) -> list[HostInfo]:
        """The hosts sharing the repository: heartbeat, alive (renewed within the lease
        length), chain leases held.  RepositoryError with a local catalog."""
        return self._ctx.lease_manager().hosts()

    def force_release(self, chain: str) -> int:
        """Free CHAIN's write lease whoever holds it and bump its epoch, so that no
        catalog change of the old holder commits any more.  Only for a host known to be
        dead: a live holder stops writing at its next check.  Returns the new epoch."""
        self._check_open()
        self._ctx.chain_row(chain)
        return self._ctx.lease_manager().force_release(chain)

    def check(self, repair: bool = False, *, chain: str | None = None) -> RepositoryCheck:
        """Compare the catalog with the volume files and run the image check on each volume.

        Kinds of problem reported (``Problem.kind``):

        - ``catalog``: SQLite's integrity or foreign-key check failed (not repairable here).
        - ``pending``: an operation is in flight in the journal (repair: recover it).
        - ``missing-file``: a volume's file is gone (not repairable: restore it from backup).
        - ``unreadable``: a volume's file cannot be opened (not repairable).
        - ``size``: a leaf's virtual size differs from its chain's, or a volume's from the
          size the catalog records for it (not repairable).
        - ``identity``: a raw volume is not the file the catalog recorded: shorter than the
          disk it serves, another size or inode, or (sealed) another content stamp.  Repair:
          a new inode with the recorded content (a copied repository) is recorded; anything
          else is not repairable (restore the file from a backup).
        - ``backing``: the header's backing file differs from the catalog's parent.  The
          header is the truth: repair points the catalog at the volume the header names, when
          the catalog knows it.
        - ``image``: the image check found corruption or leaks (repair: the image repair,
          ``qemu-img check -r all`` semantics).
        - ``illegal``: a volume is ILLEGAL with no operation in flight (repair: mark it LEGAL
          when its image check is clean).
        - ``snapshot``: a snapshot's volume is missing or not under its chain's leaf (repair:
          drop the snapshot record; its content is gone).
        - ``role``: a volume's recorded role is stale (repair: recompute).
        - ``stray-file``: a file in ``volumes/`` the catalog does not know (repair: move it to
          ``lost+found/``).

        A read-write repository records in the catalog which volumes this check found
        damaged (missing, unreadable, wrong size or identity, image corruption) and clears
        the mark of those found clean: a chain with a damaged volume takes no new snapshot.

        Arguments:
            repair (bool): fix what can be fixed.
            chain (str | None): check only that chain's volumes and snapshots.

        Returns:
            RepositoryCheck
        """
        if repair:
            self._ctx.check_writable()
        self._check_open()
        return _check.run(self._ctx, repair, chain)

    def _check_open(self) -> None:
        if self.closed:
            raise ImageClosed("the repository is closed", path=self._path)


def _write_folder_id(path: str) -> None:
    """Give the folder PATH a new id (``repository.id``), durably."""
    tmp = os.path.join(path, FOLDER_ID_NAME + ".tmp")
    with open(tmp, "w") as f:
        f.write(f"{uuid.uuid4()}\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(path, FOLDER_ID_NAME))
    fsync_dir(path)


def _read_folder_id(path: str) -> str:
    try:
        with open(os.path.join(path, FOLDER_ID_NAME)) as f:
            return f.read().strip()
    except FileNotFoundError:
        raise NotFound("no cowchain repository here (no repository.id)", path=path) from None
    except OSError as e:
        raise RepositoryError(f"cannot read {FOLDER_ID_NAME}: {e.strerror}",
                              path=path) from None
