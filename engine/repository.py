"""Repository, Chain, Snapshot: snapshot chains as Red Hat Virtualization (oVirt) runs them.

A repository is a folder::

    <repo>/catalog.db          the SQLite catalog (engine.catalog): chains, volumes,
                               snapshots, the journal of operations in flight
    <repo>/volumes/<uuid>.qcow2|.raw
                               one file per volume; every overlay names its backing file by
                               its bare file name (same folder) and records its format
    <repo>/repository.lock     held (flock) by the process that has the repository open

The model:

- A chain starts as one base volume, RAW or QCOW2.  It is also the chain's leaf: the one
  writable volume, which ``Chain.read``/``write`` go to.
- ``snapshot()`` makes the leaf read-only and puts a new QCOW2 overlay that holds only
  metadata on top of it as the new leaf: O(1) in the disk size.  The snapshot owns the volume
  that was the leaf; its content is the chain read from that volume down.
- ``delete_snapshot()`` merges the snapshot's volume with its child, in whichever direction
  copies less: *commit* the child down into the snapshot's volume (the child file goes), or
  *pull* the snapshot volume's clusters up into the child (the snapshot's file goes).  What
  the leaf and every other snapshot read does not change.
- ``revert()``, ``preview()``/``commit_preview()``/``undo_preview()`` and ``clone()`` put a new
  empty overlay on top of a snapshot's volume.  A clone is a chain of its own whose leaf is
  backed by the snapshot's volume; volumes used by more than one chain are "shared" and are
  never merged or removed while a clone uses them.

Crash safety: every operation that touches files records its intent in the catalog journal
before it touches any file, does idempotent steps, and applies its catalog changes in one
transaction.  ``Repository.open`` rolls an interrupted operation back (snapshot, revert,
preview, clone, create, export: remove what it created) or forward (delete_snapshot: the
merge is redone from the last recorded step; removals after a commit are finished).  A volume
being written by a merge is marked ILLEGAL until the merge completes.  Every image lock an
operation needs is taken before its journal entry and held to its end (``_holding``), so an
operation refused by a lock leaves nothing to recover.

Volume identity: the catalog records each volume's virtual size and, for a raw volume, its
inode and (once sealed by a snapshot) a content stamp; every open compares a raw volume's size
and inode (``VolumeDamaged`` when they differ), ``check`` also the stamp.  A chain with a
volume known to be damaged takes no new snapshot unless forced.

The QCOW2 headers are the truth about which file backs which; the catalog is the truth about
snapshots.  ``Repository.check`` compares the two, runs the image check on every volume, and
explains (and with ``repair=True`` fixes) what does not match.

Thread model: a Repository and its Chains belong to one thread.  A repository is open in one
process at a time (an exclusive lock on ``repository.lock``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import os
import re
import shutil
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable

from engine import destination as _destination
from engine import image as _image
from engine import ops
from engine.catalog import Catalog, ChainRow, SnapshotRow, VolumeRow, now, parse_time
from engine.errors import (ChainError, EngineError, ImageClosed, ImageLocked, ImageNotFound,
                           InvalidArgument, NotFound, RepositoryError, UnsupportedFeature, VolumeDamaged,
                           io_error)
from engine.ops import kill_point

CATALOG_NAME = "catalog.db"
VOLUMES_DIR = "volumes"
LOCK_NAME = "repository.lock"
LOST_FOUND = "lost+found"

#: Chain names: what fits in a file name and a shell word without quoting.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VOLUME_FILE_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
                             r"\.(qcow2|raw)$")

#: Snapshot ids may be given by a unique prefix of at least this many characters.
MIN_ID_PREFIX = 4

#: Operations that are undone when interrupted before their catalog commit: nothing they
#: wrote is visible until then, so removing the files they created restores the old state.
_ROLLBACK_OPS = frozenset({"create_chain", "import_chain", "snapshot", "revert", "preview",
                           "clone", "export"})
#: Operations that are redone when interrupted: a merge writes into an existing volume, and
#: redoing it from its last recorded step is what restores a consistent chain.
_FORWARD_OPS = frozenset({"delete_snapshot"})

Progress = Callable[[int, int], None]


# --- public value types ---------------------------------------------------------------------

@dataclass(frozen=True)
class Volume:
    """One volume of a chain, as the catalog records it.

    Attributes:
        id (str): uuid.   chain (str): the chain that created it.
        path (str): absolute path of the file.   format (str): "raw" or "qcow2".
        role (str): "leaf" (no volume on top of it), "shared" (used by another chain than
            its own, e.g. under a clone), "base" (no backing file) or "internal".
        parent (str | None): id of the volume it is backed by.
        legality (str): "LEGAL", or "ILLEGAL" while an operation is changing it.
        created (datetime): UTC.
    """

    id: str
    chain: str
    path: str
    format: str
    role: str
    parent: str | None
    legality: str
    created: _dt.datetime

    def to_dict(self) -> dict:
        return {"id": self.id, "chain": self.chain, "path": self.path, "format": self.format,
                "role": self.role, "parent": self.parent, "legality": self.legality,
                "created": _iso(self.created)}


@dataclass(frozen=True)
class Snapshot:
    """A point in a chain's history.

    Attributes:
        id (str): uuid.   chain (str): its chain.   created (datetime): UTC.
        description (str): free text.
        volume (str): id of the volume that was the leaf when it was taken; the snapshot's
            content is the chain read from that volume down.
    """

    id: str
    chain: str
    created: _dt.datetime
    description: str
    volume: str

    def to_dict(self) -> dict:
        return {"id": self.id, "chain": self.chain, "created": _iso(self.created),
                "description": self.description, "volume": self.volume}


@dataclass(frozen=True)
class MergeResult:
    """What ``Chain.delete_snapshot`` did.

    Attributes:
        snapshot (str): the deleted snapshot's id.
        direction (str): "commit" (the child volume was committed down into the snapshot's
            volume, and the child file removed) or "pull" (the snapshot volume's clusters
            were pulled up into its child, and the snapshot's file removed).
        removed_volume (str): id of the volume whose file is gone.
        kept_volume (str): id of the volume that now holds the merged content.
        copied_bytes (int): guest bytes the merge wrote (data and zero ranges).
        commit_bytes, pull_bytes (int): the two costs compared to choose the direction.
    """

    snapshot: str
    direction: str
    removed_volume: str
    kept_volume: str
    copied_bytes: int
    commit_bytes: int
    pull_bytes: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ExportResult:
    """What ``Chain.export`` wrote.

    Attributes:
        path (str): the new image.   format (str): "raw" or "qcow2".
        size (int): virtual size, bytes.   snapshot (str | None): the exported snapshot.
        data_bytes (int): bytes of data written (zero ranges are not written).
    """

    path: str
    format: str
    size: int
    snapshot: str | None
    data_bytes: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class DiffResult(list):
    """What ``Chain.diff`` found: a list of ``Change(start, length, zero, data)``, sorted and
    disjoint, with the disk's size at each point (a resize in between changes it).

    Attributes:
        from_size, to_size (int): virtual size at the FROM and the TO point, bytes.
        size_changed (bool): the two differ.
    """

    def __init__(self, changes, from_size: int, to_size: int):
        super().__init__(changes)
        self.from_size = from_size
        self.to_size = to_size

    @property
    def size_changed(self) -> bool:
        return self.from_size != self.to_size

    def to_dict(self) -> dict:
        return {"from-size": self.from_size, "to-size": self.to_size,
                "changes": [c.to_dict() for c in self]}


@dataclass
class Problem:
    """One mismatch found by ``Repository.check``.

    Attributes:
        kind (str): a stable keyword (see ``Repository.check``).
        message (str): what is wrong, in one sentence.
        chain, volume, snapshot (str | None): what it is about.
        repaired (bool): ``check(repair=True)`` fixed it.
        repair (str | None): what the repair did, or why it could not.
        leaks_only (bool): only leaked clusters (harmless; repair reclaims them).
    """

    kind: str
    message: str
    chain: str | None = None
    volume: str | None = None
    snapshot: str | None = None
    repaired: bool = False
    repair: str | None = None
    leaks_only: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RepositoryCheck:
    """The result of ``Repository.check``.

    Attributes:
        problems (list[Problem]): everything found, repaired or not.
        volumes (list[dict]): per volume: id, chain, path, format and the image check
            result (``qemu-img check`` JSON fields) or None for raw volumes.
        ok (bool): nothing is left unrepaired.
        exit_code (int): 0 clean (or all repaired), 2 problems remain, 3 only leaked
            clusters remain (the meanings of ``qemu-img check``'s codes).
    """

    problems: list[Problem] = field(default_factory=list)
    volumes: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(not p.repaired for p in self.problems)

    @property
    def exit_code(self) -> int:
        left = [p for p in self.problems if not p.repaired]
        if not left:
            return 0
        return 3 if all(p.leaks_only for p in left) else 2

    def to_dict(self) -> dict:
        return {"ok": self.ok, "exit_code": self.exit_code,
                "problems": [p.to_dict() for p in self.problems],
                "volumes": self.volumes}


# --- helpers ----------------------------------------------------------------------------------

def _iso(t: _dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _ancestry(vols: dict[str, VolumeRow], vid: str | None) -> list[VolumeRow]:
    """VID and the volumes under it, top first."""
    out: list[VolumeRow] = []
    seen: set[str] = set()
    while vid is not None:
        if vid in seen:
            raise ChainError(f"the catalog's parent links loop at volume {vid}")
        row = vols.get(vid)
        if row is None:
            raise RepositoryError(f"volume {vid} is missing from the catalog",
                                  hint="run 'cowchain chain check --repair'")
        out.append(row)
        seen.add(vid)
        vid = row.parent
    return out


def _volume_users(vols: dict[str, VolumeRow], chains: Iterable[ChainRow]) -> dict[str, set[str]]:
    """For each volume id, the names of the chains that read through it."""
    users: dict[str, set[str]] = {}
    for c in chains:
        for top in (c.leaf, c.saved_leaf):
            if top is None:
                continue
            for v in _ancestry(vols, top):
                users.setdefault(v.id, set()).add(c.name)
    return users


def _roles(vols: dict[str, VolumeRow], chains: Iterable[ChainRow]) -> dict[str, str]:
    """Each volume's role, from the parent links and the chains' tops: "leaf" (no volume on
    top of it), "shared" (another chain than its own reads through it), "base" (no parent)
    or "internal"."""
    users = _volume_users(vols, chains)
    has_child = {v.parent for v in vols.values() if v.parent}
    return {v.id: ("leaf" if v.id not in has_child else
                   "shared" if users.get(v.id, set()) - {v.chain} else
                   "base" if v.parent is None else "internal")
            for v in vols.values()}


def _close_quietly(img) -> None:
    """Close IMG on an error path without hiding the error being handled."""
    if img is not None:
        try:
            img.close()
        except EngineError:
            pass


class Journaled:
    """One journaled operation in progress (what :func:`journaled` yields)."""

    def __init__(self, repo: "Repository", op: str, jid: int, images: list):
        self.repo = repo
        self.op = op
        self.jid = jid
        #: the images held for the operation (``hold=`` of :func:`journaled`), in order
        self.images = images
        #: files to remove once the operation is committed
        self.remove: list[str] = []
        self._held: list = []
        self._leaf: tuple | None = None

    def step(self, name: str) -> None:
        """Step boundary NAME (recorded for roll-forward operations; a kill point)."""
        self.repo._step(self.jid, self.op, name)

    def hold(self, img):
        """IMG, an image the operation made: closed if the operation fails."""
        self._held.append(img)
        return img

    def leaf_of(self, chain: "Chain | str", img) -> None:
        """Once committed, IMG (held) becomes the leaf handle of CHAIN (or the chain of
        that name)."""
        self._leaf = (chain, img)


@contextlib.contextmanager
def journaled(repo: "Repository", op: str, chain: str, args: dict, *,
              illegal: Iterable[str] = (), hold: list | None = None, verify: bool = True,
              committed: str | None = "committed"):
    """The skeleton of every journaled operation.

    HOLD ([(row, readonly, backing)], see ``Repository._holding``) opens the images the
    operation needs before anything is recorded; then the intent is journaled (ILLEGAL:
    volumes marked ILLEGAL with it) and the block runs.  If it raises, the images it made
    (``Journaled.hold``) are closed and the operation is undone now or left to recovery
    (``Repository._abort``), and the error goes on.  After it returned, the held images are
    closed, the new leaf handle (``Journaled.leaf_of``) is handed to its chain, the kill
    point ``OP.COMMITTED`` is passed (None: none) and the files in ``Journaled.remove`` are
    removed."""
    with contextlib.ExitStack() as stack:
        images = stack.enter_context(repo._holding(hold, verify=verify)) if hold else []
        j = Journaled(repo, op, repo._begin(op, chain, args, illegal=illegal), images)
        try:
            yield j
        except BaseException:
            for img in j._held:
                _close_quietly(img)
            repo._abort(j.jid, chain)
            raise
    if j._leaf is not None:
        target, img = j._leaf
        (repo.chain(target) if isinstance(target, str) else target).adopt_leaf(img)
    if committed is not None:
        kill_point(f"{op}.{committed}")
    if j.remove:
        repo._finish(j.jid, op, j.remove)


#: The content stamp of a sealed raw volume: a hash of its size, of the first and the last
#: block holding data when it was sealed (found with SEEK_DATA) and of blocks at fixed
#: offsets spread over the file.  The stamp records where those data blocks were, and a
#: later check reads the same offsets: a copy of the repository that changed which ranges
#: are sparse still has the same stamp.  Cost: O(log size) seeks and ten block reads.
_STAMP_BLOCK = 65536
_STAMP_SAMPLES = 8


def _raw_record(path: str, *, sealed: bool, stamp: str | None = None) -> dict:
    """The catalog's record of a raw volume file: size, inode and (SEALED) content stamp
    (STAMP: recompute that recorded stamp's blocks, to compare)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageNotFound("no such file", path=path) from None
    except OSError as e:
        raise io_error(e.errno, "cannot open", path=path) from None
    try:
        st = os.fstat(fd)
        return {"size": st.st_size, "ino": st.st_ino,
                "stamp": _stamp(fd, st.st_size, path, stamp) if sealed else None}
    finally:
        os.close(fd)


def _data_at_or_after(fd: int, offset: int) -> int | None:
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError:
        return None                     # ENXIO: only holes from OFFSET on


def _stamp(fd: int, size: int, path: str, recorded: str | None = None) -> str:
    """The stamp of raw file FD (SIZE bytes); with RECORDED, over the blocks it names."""
    B = _STAMP_BLOCK
    if recorded is not None:
        try:
            first, last = (int(x) for x in recorded.split(":")[:2])
        except ValueError:
            first = last = -1
    else:
        pos = _data_at_or_after(fd, 0)
        first = last = -1
        if pos is not None and pos < size:
            first = pos // B * B
            lo, hi = first // B, (size - 1) // B      # the last block with data, by bisection
            while lo < hi:
                mid = (lo + hi + 1) // 2
                found = _data_at_or_after(fd, mid * B)
                if found is not None and found < size:
                    lo = found // B if found // B > mid else mid
                else:
                    hi = mid - 1
            last = lo * B
    top = max(0, size - B)
    offsets = [top * i // (_STAMP_SAMPLES - 1) // 512 * 512 for i in range(_STAMP_SAMPLES)]
    h = hashlib.blake2b(digest_size=16)
    h.update(size.to_bytes(8, "little"))
    try:
        for off in offsets + [o for o in (first, last) if 0 <= o < size]:
            h.update(os.pread(fd, B, off))
    except OSError as e:
        raise io_error(e.errno, "cannot read the volume", path=path) from None
    return f"{first}:{last}:{h.hexdigest()}"


def _identity_problem(v: VolumeRow, size: int, ino: int) -> str | None:
    """What is wrong with raw volume V's file, now SIZE bytes at inode INO, against the
    catalog's record (size and inode: the cheap comparison made at every open), or None."""
    if v.format != "raw" or v.size is None:
        return None
    if size < v.size:
        return (f"is {size} bytes, shorter than the {v.size} bytes of disk it serves "
                "(the file was truncated or replaced)")
    if size != v.size:
        return f"is {size} bytes, the catalog records {v.size} (the file was replaced?)"
    if v.ino is not None and ino != v.ino:
        return (f"is not the file the catalog recorded (inode {ino}, recorded {v.ino}): it "
                "was replaced, or the repository was copied")
    return None


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidArgument(f"invalid chain name {name!r}: use 1-128 letters, digits, "
                              "'.', '_' or '-', starting with a letter or digit")


# --- Repository -------------------------------------------------------------------------------

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

    def __init__(self, path: str, *, _create: bool = False, readonly: bool = False):
        self._path = os.path.abspath(os.fspath(path))
        self._closed = True
        self._readonly = readonly
        self._chains: dict[str, Chain] = {}
        self._blocked: dict[str, str] = {}
        self._lock_fd: int | None = None
        if not readonly:
            self._lock()
        try:
            self._cat = Catalog(os.path.join(self._path, CATALOG_NAME), create=_create,
                                readonly=readonly)
        except BaseException:
            self._unlock()
            raise
        self._in_use = _destination.register_folder(self._path)   # for the export rule
        self._closed = False
        if not _create and not readonly:
            try:
                self.recover()
                self._record_unrecorded()
            except BaseException:
                self.close()
                raise

    # --- lifetime ---------------------------------------------------------------------------

    @classmethod
    def create(cls, path) -> "Repository":
        """Make a new repository in PATH (a new or empty folder) and open it.

        Raises:
            RepositoryError: PATH already holds a repository, or exists and is not an empty
                folder.
        """
        path = os.path.abspath(os.fspath(path))
        if os.path.isfile(os.path.join(path, CATALOG_NAME)):
            raise RepositoryError("already holds a cowchain repository", path=path,
                                  hint="open it with Repository.open, or choose a new folder")
        if os.path.exists(path):
            if not os.path.isdir(path) or os.listdir(path):
                raise RepositoryError("exists and is not an empty folder", path=path)
        else:
            parent = os.path.dirname(path)
            if not os.path.isdir(parent):
                raise NotFound("the parent folder does not exist", path=path)
            os.mkdir(path)
            _fsync_dir(parent)
        os.mkdir(os.path.join(path, VOLUMES_DIR))
        repo = cls(path, _create=True)
        _fsync_dir(path)
        return repo

    @classmethod
    def open(cls, path, *, readonly: bool = False) -> "Repository":
        """Open the repository in PATH and recover interrupted operations.

        With ``readonly=True`` nothing is locked, recovered or changed: any number of
        read-only opens may run beside each other and beside the one read-write open. They
        read the catalog as last committed (an operation still in flight in another
        process is not seen) and open volumes read-only, so a leaf that a writer holds open
        raises ImageLocked while snapshots stay readable. Every operation that would change
        the repository raises RepositoryError.

        Raises:
            NotFound: PATH holds no repository.
            RepositoryError: another process has it open read-write (read-write opens
                only), or the catalog is unusable.
        """
        path = os.path.abspath(os.fspath(path))
        if not os.path.isfile(os.path.join(path, CATALOG_NAME)):
            raise NotFound("no cowchain repository here", path=path,
                           hint="create one with 'cowchain repo init DIR'")
        return cls(path, readonly=readonly)

    @property
    def readonly(self) -> bool:
        return self._readonly

    def _check_writable(self) -> None:
        self._check_open()
        if self._readonly:
            raise RepositoryError("the repository is open read-only", path=self._path,
                                  hint="open it without readonly to change it")

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
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RepositoryError(f"the repository is in use by another process (pid {holder})",
                                  path=self._path, hint="close it there first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        """Flush and close every chain, the catalog and the lock. Idempotent."""
        if self._closed:
            return
        err = None
        for c in list(self._chains.values()):
            try:
                c.close()
            except EngineError as e:
                err = err or e
        self._chains.clear()
        self._cat.close()
        self._unlock()
        _destination.unregister_folder(self._in_use)
        self._closed = True
        if err is not None:
            raise err

    def __del__(self):
        # An unclosed repository must not keep its lock (and its leaf handles) forever.
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def path(self) -> str:
        return self._path

    def __enter__(self) -> "Repository":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Repository {self._path}{' closed' if self._closed else ''}>"

    def _check_open(self) -> None:
        if self._closed:
            raise ImageClosed("the repository is closed", path=self._path)

    # --- chains -----------------------------------------------------------------------------

    def chain(self, name: str) -> "Chain":
        """The chain NAME (the same object each call while it is open).

        Raises:
            NotFound: no such chain.
        """
        self._check_open()
        c = self._chains.get(name)
        if c is not None and not c.closed:
            return c
        self._chain_row(name)
        c = self._chains[name] = Chain(self, name)
        return c

    def chains(self) -> list["Chain"]:
        """Every chain, by name."""
        self._check_open()
        with self._cat.read():
            return [self.chain(r.name) for r in self._cat.chains()]

    def create_chain(self, name: str, size: int, *, base_format: str = "raw",
                     cluster_size: int = 65536) -> "Chain":
        """Make a chain of one base volume (also its leaf) of SIZE bytes, reading as zeros.

        Arguments:
            name (str): the chain's name (letters, digits, '.', '_', '-').
            size (int): virtual size in bytes, a multiple of 512.
            base_format (str): "raw" or "qcow2".
            cluster_size (int): cluster size of the chain's qcow2 volumes, a power of two
                from 512 to 2 MiB (bytes).

        Raises:
            InvalidArgument, RepositoryError (the name is taken).
        """
        self._check_new_chain(name, size, base_format, cluster_size)
        vid, rel = self._new_volume(base_format)
        with journaled(self, "create_chain", name, {"created": [rel]}) as j:
            img = j.hold(_image.create(self._abs(rel), size, format=base_format,
                                       cluster_size=cluster_size))
            j.step("created")
            with self._cat.transaction():
                self._cat.insert_chain(ChainRow(name, size, cluster_size, now(), vid))
                self._cat.insert_volume(self._volume_row_for(vid, name, rel, base_format, None,
                                                             size))
                self._cat.journal_end(j.jid)
            j.leaf_of(name, img)
        return self.chain(name)

    def _check_new_chain(self, name: str, size: int, base_format: str, cluster_size: int):
        self._check_writable()
        _check_name(name)
        if base_format not in ("raw", "qcow2"):
            raise InvalidArgument(f"base_format must be 'raw' or 'qcow2', not {base_format!r}")
        if not isinstance(size, int) or size <= 0 or size % 512:
            raise InvalidArgument(f"size must be a positive multiple of 512 bytes, not {size!r}")
        if (not isinstance(cluster_size, int) or cluster_size < 512 or cluster_size > 2 << 20
                or cluster_size & (cluster_size - 1)):
            raise InvalidArgument(f"cluster_size must be a power of two from 512 to 2 MiB, "
                                  f"not {cluster_size!r}")
        if self._cat.chain(name) is not None:
            raise RepositoryError(f"a chain named {name!r} exists already")

    def import_chain(self, name: str, source, *, format: str, base_format: str = "raw",
                     cluster_size: int = 65536, progress: Progress | None = None,
                     allow_unsafe_backing: bool = False) -> "Chain":
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
        self._check_writable()
        if format not in ("raw", "qcow2"):
            raise InvalidArgument(f"format must be 'raw' or 'qcow2', not {format!r}",
                                  hint="name the source's format; cowchain never guesses it")
        src_path = os.path.abspath(os.fspath(source))
        if os.path.isdir(src_path):
            raise InvalidArgument("is a folder, not a disk image", path=src_path)
        with _image.open(src_path, format=format, readonly=True,
                         allow_unsafe_backing=allow_unsafe_backing) as src:
            size = src.size
            if size % 512:
                raise InvalidArgument(f"the source's size ({size} bytes) is not a multiple "
                                      "of 512", path=src_path,
                                      hint="pad it first, e.g. truncate -s %512 FILE")
            if size == 0:
                raise InvalidArgument("the source is an empty disk", path=src_path)
            self._check_new_chain(name, size, base_format, cluster_size)
            vid, rel = self._new_volume(base_format)
            with journaled(self, "import_chain", name,
                           {"created": [rel], "source": src_path}) as j:
                ops.convert_new(src, self._abs(rel), format=base_format,
                                cluster_size=cluster_size, progress=progress,
                                hook="import.copy")
                j.step("written")
                with self._cat.transaction():
                    self._cat.insert_chain(ChainRow(name, size, cluster_size, now(), vid))
                    self._cat.insert_volume(self._volume_row_for(vid, name, rel, base_format,
                                                                 None, size))
                    self._cat.journal_end(j.jid)
        return self.chain(name)

    def delete_chain(self, name: str) -> None:
        """Remove chain NAME with its snapshots and the volumes only it uses.

        Raises:
            NotFound; RepositoryError: a clone uses one of its volumes (the message names it).
        """
        self._check_writable()
        row = self._chain_row(name)
        self._check_not_blocked(name)
        vols = self._cat.volumes()
        chains = self._cat.chains()
        users = _volume_users(vols, chains)
        for v in vols.values():
            if v.chain == name:
                others = sorted(users.get(v.id, set()) - {name})
                if others:
                    raise RepositoryError(
                        f"chain {name!r} cannot be deleted: clone {others[0]!r} uses its "
                        f"volume {v.id}", hint=f"delete chain {others[0]!r} first")
        c = self._chains.pop(name, None)
        if c is not None:
            c.close()
        with self._cat.transaction():
            candidates = [v.id for v in vols.values() if v.chain == name]
            for top in (row.leaf, row.saved_leaf):
                if top:
                    candidates += [v.id for v in _ancestry(vols, top)]
            for s in self._cat.snapshots(name):
                self._cat.delete_snapshot(s.id)
            self._cat.delete_chain(name)
            remove = self._collect_garbage(candidates)
            self._refresh_roles()
            jid = self._cat.journal_begin("delete_chain", name, {"remove": remove},
                                          state="committed")
        kill_point("delete_chain.committed")
        self._finish(jid, "delete_chain", remove)

    # --- recovery and check -----------------------------------------------------------------

    def recover(self) -> list[str]:
        """Finish or undo every operation the journal shows in flight (``open`` calls this).

        Returns:
            list[str]: one line per operation recovered, saying what was done.
        """
        self._check_writable()
        done = []
        for j in self._cat.journal():
            done.append(self._recover_row(j))
            self._blocked.pop(j.chain, None)
        return done

    def _record_unrecorded(self) -> None:
        """Fill in the size and identity of volumes the catalog has no record of (a catalog
        made by an older cowchain): what the files hold now is taken as the truth."""
        recs = {}
        for v in self._cat.unrecorded_volumes():
            try:
                recs[v.id] = self._volume_record(v, sealed=v.role != "leaf")
            except EngineError:
                continue             # a missing or busy file: check reports it; retried later
        if recs:
            with self._cat.transaction():
                for vid, rec in recs.items():
                    self._cat.update_volume(vid, **rec)

    def _recover_row(self, j) -> str:
        if j.state == "committed":
            self._finish(j.id, j.op, j.args.get("remove", []))
            return f"{j.op} on {j.chain}: finished (removed {len(j.args.get('remove', []))} files)"
        if j.op == "resize":
            return self._recover_resize(j)
        if j.op in _FORWARD_OPS:
            self._merge_run(j.id, j.args, j.step)
            return f"{j.op} on {j.chain}: rolled forward from step {j.step}"
        if j.op in _ROLLBACK_OPS:
            for rel in j.args.get("created", []):
                _unlink(self._abs(rel))
            for path in j.args.get("tmp_files", []):
                _unlink(path)
            _fsync_dir(os.path.join(self._path, VOLUMES_DIR))
            self._cat.journal_end(j.id)
            return f"{j.op} on {j.chain}: rolled back"
        raise RepositoryError(f"the journal holds an unknown operation {j.op!r} (id {j.id}); "
                              "a newer cowchain wrote it", hint="upgrade cowchain")

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
            self._check_writable()
        self._check_open()
        return _run_check(self, repair, chain)

    # --- internals: catalog views -----------------------------------------------------------

    def _abs(self, rel: str) -> str:
        return os.path.join(self._path, rel)

    def _chain_row(self, name: str) -> ChainRow:
        row = self._cat.chain(name)
        if row is None:
            raise NotFound(f"no chain named {name!r}")
        return row

    def _volume_row(self, vid: str) -> VolumeRow:
        row = self._cat.volume(vid)
        if row is None:
            raise NotFound(f"volume {vid} is not in the catalog (removed meanwhile?)")
        return row

    def _volume(self, row: VolumeRow) -> Volume:
        return Volume(row.id, row.chain, self._abs(row.path), row.format, row.role, row.parent,
                      row.legality, parse_time(row.created))

    def _snapshot(self, row: SnapshotRow) -> Snapshot:
        return Snapshot(row.id, row.chain, parse_time(row.created), row.description,
                        row.volume)

    def _find_snapshot(self, chain: str, sid: str) -> SnapshotRow:
        """The snapshot of CHAIN with id SID, or with a unique prefix SID."""
        if not isinstance(sid, str) or not sid:
            raise InvalidArgument(f"a snapshot id is required, not {sid!r}")
        rows = self._cat.snapshots(chain)
        exact = [r for r in rows if r.id == sid]
        if exact:
            return exact[0]
        if len(sid) >= MIN_ID_PREFIX:
            hits = [r for r in rows if r.id.startswith(sid)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise InvalidArgument(f"snapshot id prefix {sid!r} is ambiguous in chain "
                                      f"{chain!r}; give more characters")
        raise NotFound(f"chain {chain!r} has no snapshot {sid!r}")

    def _snapshot_volume(self, snap: SnapshotRow) -> VolumeRow:
        """SNAP's volume, which must be LEGAL to be read (call inside one catalog read)."""
        row = self._volume_row(snap.volume)
        if row.legality == "LEGAL":
            return row
        if self._readonly and any(row.id in (j.args.get("volume"), j.args.get("child"))
                                  for j in self._cat.journal() if j.state == "running"):
            raise ImageLocked(f"snapshot {snap.id}'s volume {row.id} is being changed by an "
                              "operation in another process", path=self._abs(row.path),
                              hint="retry when it is done")
        raise RepositoryError(f"snapshot {snap.id}'s volume {row.id} is ILLEGAL",
                              hint="run 'cowchain chain check --repair'")

    def _chain_volumes(self, name: str) -> list[Volume]:
        row = self._chain_row(name)
        vols = self._cat.volumes()
        main = list(reversed(_ancestry(vols, row.leaf)))
        seen = {v.id for v in main}
        extra = []
        if row.saved_leaf:
            extra = [v for v in reversed(_ancestry(vols, row.saved_leaf)) if v.id not in seen]
        return [self._volume(v) for v in main + extra]

    def _volume_row_for(self, vid: str, chain: str, rel: str, fmt: str, parent: str | None,
                        size: int) -> VolumeRow:
        """The catalog row of a new (unsealed) volume file, with its size and identity."""
        row = VolumeRow(vid, chain, rel, fmt, "leaf", parent, "LEGAL", now())
        for k, val in self._volume_record(row, sealed=False, size=size).items():
            setattr(row, k, val)
        return row

    def _new_volume(self, fmt: str) -> tuple[str, str]:
        vid = str(uuid.uuid4())
        ext = "qcow2" if fmt == "qcow2" else "raw"
        return vid, f"{VOLUMES_DIR}/{vid}.{ext}"

    def _refresh_roles(self) -> None:
        """Recompute every volume's role from the parent links (inside a transaction)."""
        vols = self._cat.volumes()
        for vid, role in _roles(vols, self._cat.chains()).items():
            if role != vols[vid].role:
                self._cat.update_volume(vid, role=role)

    def _collect_garbage(self, candidates: Iterable[str]) -> list[str]:
        """Drop the catalog rows of CANDIDATES no chain reads through any more (inside a
        transaction); return their files' relative paths, for removal after the commit."""
        vols = self._cat.volumes()
        users = _volume_users(vols, self._cat.chains())
        owned = {s.volume for s in self._cat.snapshots()}
        remove = []
        for vid in dict.fromkeys(candidates):
            row = vols.get(vid)
            if row is None or users.get(vid) or vid in owned:
                continue
            self._cat.delete_volume(vid)
            remove.append(row.path)
        return remove

    # --- internals: journal -----------------------------------------------------------------

    def _begin(self, op: str, chain: str, args: dict, *, illegal: Iterable[str] = ()) -> int:
        self._check_writable()
        with self._cat.transaction():
            jid = self._cat.journal_begin(op, chain, args)
            for vid in illegal:
                self._cat.update_volume(vid, legality="ILLEGAL")
        kill_point(f"{op}.intent")
        return jid

    def _step(self, jid: int, op: str, step: str) -> None:
        """Step boundary.  Only roll-forward operations record it (recovery resumes there);
        a rolled-back operation undoes the same whatever its step, and skipping the write
        saves a durable commit on every snapshot."""
        if op in _FORWARD_OPS:
            self._cat.journal_step(jid, step)
        kill_point(f"{op}.{step}")

    def _finish(self, jid: int, op: str, remove: list[str]) -> None:
        """The roll-forward tail of a committed operation: remove the files it made unused."""
        for rel in remove:
            _unlink(self._abs(rel))
            kill_point(f"{op}.removed")
        if remove:
            _fsync_dir(os.path.join(self._path, VOLUMES_DIR))
        self._cat.journal_end(jid)

    def _abort(self, jid: int, chain: str) -> None:
        """An operation failed in this process: undo it now, or leave it to recovery."""
        try:
            rows = [j for j in self._cat.journal() if j.id == jid]
            if not rows:
                return
            j = rows[0]
            if j.state != "committed" and j.op in _FORWARD_OPS:
                self._blocked[chain] = j.op
                return
            self._recover_row(j)
        except Exception:
            # Keep the original error for the caller; the journal row stays for recovery.
            self._blocked[chain] = "an interrupted operation"

    def _check_not_blocked(self, name: str) -> None:
        op = self._blocked.get(name)
        if op is not None:
            raise RepositoryError(f"chain {name!r} has an interrupted {op} in flight",
                                  hint="call Repository.recover() or reopen the repository")

    # --- internals: volume files ------------------------------------------------------------

    def _open_volume(self, row: VolumeRow, *, readonly: bool = False, backing: bool = True,
                     verify: bool = True):
        """Open volume ROW (with its backing chain unless BACKING is False).  With VERIFY,
        a raw volume in what was opened must still be the file the catalog recorded
        (VolumeDamaged otherwise)."""
        for attempt in (1, 2):
            try:
                img = _image.open(self._abs(row.path), format=row.format, readonly=readonly,
                                  backing=backing)
                break
            except (ImageNotFound, ChainError):
                if not self._readonly:
                    raise
                # A writer beside this read-only open may have merged the volume (or one
                # under it) away since the catalog was read: a vanished volume is NotFound,
                # a changed chain is opened again as it is now.
                now_row = self._cat.volume(row.id)
                if now_row is None:
                    raise NotFound(f"volume {row.id} was removed while it was being opened "
                                   "(its snapshot was deleted meanwhile)") from None
                if attempt == 2:
                    raise
                row = now_row
        if verify:
            try:
                self._verify_identity(img)
            except BaseException:
                img.close()
                raise
        return img

    def _verify_identity(self, img) -> None:
        """The cheap identity check made at every open: a raw volume (only a chain's base can
        be raw) must have the size and inode the catalog recorded for it."""
        bottom = img.chain()[-1]
        if bottom.format != "raw":
            return
        v = self._cat.volume_by_path(os.path.relpath(bottom.path, self._path))
        if v is None:
            return
        try:
            ino = os.stat(bottom.path).st_ino
        except OSError as e:
            raise io_error(e.errno, "cannot stat the volume", path=bottom.path) from None
        why = _identity_problem(v, bottom.size, ino)
        if why is not None:
            # another inode with the recorded size: a copied repository, which a check with
            # repair accepts once the content stamp matches
            raise self._damaged(v, why, repairable=bottom.size == v.size)

    def _damaged(self, v: VolumeRow, why: str, *, chain: str | None = None,
                 repairable: bool = True, snapshot: bool = False) -> VolumeDamaged:
        """The VolumeDamaged error for volume V (SNAPSHOT: a refused snapshot of CHAIN)."""
        chain = chain or v.chain
        if repairable:
            hint = f"repair it with Repository.check(repair=True, chain={chain!r})"
            cli = f"repair it with 'cowchain chain check {chain} --repair'"
        else:
            hint = (f"Repository.check(chain={chain!r}) shows what is wrong; restore the "
                    "file from a backup")
            cli = f"'cowchain chain check {chain}' shows what is wrong; restore the file " \
                  "from a backup"
        if snapshot:
            hint += ", or pass force=True to take the snapshot anyway"
            cli += ", or pass --force to take the snapshot anyway"
        what = "no snapshot taken: " if snapshot else ""
        return VolumeDamaged(f"{what}volume {v.id} of chain {chain!r} {why}",
                             volume=v.id, chain=chain, path=self._abs(v.path), hint=hint,
                             cli_hint=cli)

    def _volume_record(self, v: VolumeRow, *, sealed: bool, size: int | None = None) -> dict:
        """The catalog's record of volume V's file: its virtual size and, for a raw volume,
        its identity (inode, and once SEALED a content stamp).  SIZE: the qcow2 virtual size
        when the caller knows it (else it is read from the header)."""
        if v.format == "raw":
            return _raw_record(self._abs(v.path), sealed=sealed)
        if size is None:
            with self._open_volume(v, readonly=True, backing=False, verify=False) as img:
                size = img.size
        return {"size": size, "ino": None, "stamp": None}

    def _volume_size(self, v: VolumeRow) -> int:
        """Virtual size of volume V: the catalog's record, or its header (no record yet)."""
        if v.size is not None:
            return v.size
        with self._open_volume(v, readonly=True, backing=False, verify=False) as img:
            return img.size

    @contextlib.contextmanager
    def _holding(self, specs: list[tuple[VolumeRow, bool, bool]], *, verify: bool = True):
        """Open the volumes an operation writes (or needs unchanged) and hold them to its
        end: SPECS is [(row, readonly, backing)], the images are yielded in that order.

        The rule for journaled operations: every image lock an operation needs is taken
        here, *before* its journal entry is written, and held until its catalog commit.  An
        image someone else holds (an open_snapshot view, qemu-img, a read-only repository)
        then refuses the operation with ImageLocked while nothing is recorded, so a refusal
        leaves nothing to recover.  Our own chains' leaf handles on those volumes are
        released first (they reopen on their next I/O)."""
        self._release_handles(r for r, _, _ in specs)
        with contextlib.ExitStack() as stack:
            yield [stack.enter_context(self._open_volume(r, readonly=ro, backing=b,
                                                         verify=verify))
                   for r, ro, b in specs]

    def _release_handles(self, rows: Iterable[VolumeRow]) -> None:
        paths = {self._abs(r.path) for r in rows}
        for c in self._chains.values():
            if c.leaf_uses(paths):
                c.release_leaf()

    def _create_overlay(self, rel: str, parent: VolumeRow, size: int, cluster_size: int, *,
                        verify: bool = True):
        """A new empty qcow2 overlay backed by PARENT (bare name, format recorded), returned
        open read-write with its chain: the caller makes it the chain's leaf handle, so that
        the chain is not opened a second time (opening costs one step per level).  VERIFY:
        as for _open_volume."""
        img = _image.create(self._abs(rel), size, format="qcow2", cluster_size=cluster_size,
                            backing=os.path.basename(parent.path),
                            backing_format=parent.format)
        if verify:
            try:
                self._verify_identity(img)
            except BaseException:
                img.close()
                raise
        return img

    # --- chain operations (Chain methods call these) ----------------------------------------

    def _prepare(self, chain: "Chain", *, allow_preview: bool = False) -> ChainRow:
        """Common checks before a chain operation; closes the chain's leaf handle."""
        self._check_writable()
        row = self._chain_row(chain.name)
        self._check_not_blocked(chain.name)
        if row.preview and not allow_preview:
            raise RepositoryError(
                f"chain {chain.name!r} is previewing snapshot {row.preview}",
                hint="commit_preview() or undo_preview() first")
        chain.release_leaf()
        return row

    def _refuse_damaged(self, row: ChainRow, img=None) -> None:
        """A snapshot is not taken on a chain known to be damaged: a volume marked ILLEGAL
        (an operation on it did not finish) or damaged (by check) in the catalog, or (IMG:
        the chain opened) a QCOW2 volume with the corrupt bit set."""
        flagged = self._cat.flagged_volumes()          # normally none: one cheap query
        if flagged:
            line = {v.id for v in _ancestry(self._cat.volumes(), row.leaf)}
            for v in flagged:
                if v.id not in line:
                    continue
                if v.legality != "LEGAL":
                    raise self._damaged(v, "is ILLEGAL (an operation on it did not finish)",
                                        chain=row.name, snapshot=True)
                raise self._damaged(v, f"was found damaged by check: {v.damaged}",
                                    chain=row.name, snapshot=True)
        if img is not None:
            for im in img.chain():
                if im.header is not None and im.header.corrupt:
                    rel = os.path.relpath(im.path, self._path)
                    v = self._cat.volume_by_path(rel) or VolumeRow(
                        "?", row.name, rel, im.format, "leaf", None, "LEGAL", "")
                    raise self._damaged(v, "is marked corrupt (the QCOW2 corrupt bit is set)",
                                        chain=row.name, snapshot=True)

    def _op_snapshot(self, chain: "Chain", description: str, force: bool) -> Snapshot:
        if not isinstance(description, str):
            raise InvalidArgument("description must be a string")
        row = self._prepare(chain)
        leaf = self._volume_row(row.leaf)
        if not force:
            self._refuse_damaged(row)
        vid, rel = self._new_volume("qcow2")
        sid = str(uuid.uuid4())
        with journaled(self, "snapshot", row.name, {"created": [rel], "snapshot": sid}) as j:
            img = j.hold(self._create_overlay(rel, leaf, row.size, row.cluster_size,
                                              verify=not force))
            if not force:
                self._refuse_damaged(row, img)
            # the leaf is sealed now: record what it is, to notice later if it is changed
            sealed = self._volume_record(leaf, sealed=True, size=row.size)
            j.step("created")
            with self._cat.transaction():
                self._cat.insert_volume(self._volume_row_for(vid, row.name, rel, "qcow2",
                                                             leaf.id, row.size))
                self._cat.insert_snapshot(SnapshotRow(sid, row.name, now(), description,
                                                      leaf.id))
                self._cat.update_volume(leaf.id, **sealed)
                self._cat.update_chain(row.name, leaf=vid)
                self._refresh_roles()
                self._cat.journal_end(j.jid)
            j.leaf_of(chain, img)
        return self._snapshot(self._cat.snapshot(sid))

    def _op_resize(self, chain: "Chain", new_size: int) -> None:
        if not isinstance(new_size, int) or isinstance(new_size, bool) or new_size % 512:
            raise InvalidArgument(f"size must be a multiple of 512 bytes, not {new_size!r}")
        row = self._prepare(chain)
        if new_size < row.size:
            raise UnsupportedFeature("shrink", f"chain {row.name!r} is {row.size} bytes; "
                                     "shrinking a disk is not supported (data past the new "
                                     "end would be lost)")
        if new_size == row.size:
            return
        leaf = self._volume_row(row.leaf)
        with journaled(self, "resize", row.name, {"size": new_size, "leaf": leaf.id},
                       hold=[(leaf, False, False)]) as j:
            img = j.images[0]
            img.resize(new_size)                   # durable when it returns
            j.step("resized")
            kill_point("resize.resized")
            rec = self._volume_record(leaf, sealed=False, size=img.size)
            with self._cat.transaction():
                self._cat.update_chain(row.name, size=new_size)
                self._cat.update_volume(leaf.id, **rec)
                self._cat.journal_end(j.jid)

    def _recover_resize(self, j) -> str:
        """A resize is finished if the leaf grew (a leaf never shrinks), else it never
        happened; the catalog is made to say which."""
        leaf = self._cat.volume(j.args["leaf"])
        grown = False
        if leaf is not None and os.path.exists(self._abs(leaf.path)):
            with self._open_volume(leaf, readonly=True, backing=False, verify=False) as img:
                grown = img.size >= j.args["size"]
                rec = self._volume_record(leaf, sealed=False, size=img.size)
        with self._cat.transaction():
            if grown:
                self._cat.update_chain(j.chain, size=j.args["size"])
                self._cat.update_volume(leaf.id, **rec)
            self._cat.journal_end(j.id)
        return f"resize on {j.chain}: {'finished' if grown else 'rolled back'}"

    def _new_leaf_on(self, op: str, chain: "Chain", row: ChainRow, snap: SnapshotRow,
                     apply) -> None:
        """Revert and preview: a new empty leaf on top of SNAP's volume, at the size the disk
        had at SNAP (the chain takes that size), then APPLY(vid) inside the commit
        transaction (it returns the files to remove afterwards)."""
        base = self._snapshot_volume(snap)
        size = self._volume_size(base)
        vid, rel = self._new_volume("qcow2")
        with journaled(self, op, row.name, {"created": [rel], "snapshot": snap.id}) as j:
            img = j.hold(self._create_overlay(rel, base, size, row.cluster_size))
            j.step("created")
            with self._cat.transaction():
                self._cat.insert_volume(self._volume_row_for(vid, row.name, rel, "qcow2",
                                                             base.id, size))
                self._cat.update_chain(row.name, size=size)
                j.remove = apply(vid)
                self._refresh_roles()
                if j.remove:
                    self._cat.journal_commit(j.jid, {"remove": j.remove})
                else:
                    self._cat.journal_end(j.jid)
            j.leaf_of(chain, img)

    def _drop_newer(self, row: ChainRow, snap: SnapshotRow) -> None:
        for s in self._cat.snapshots(row.name):
            if s.seq > snap.seq:
                self._cat.delete_snapshot(s.id)

    def _op_revert(self, chain: "Chain", sid: str) -> None:
        row = self._prepare(chain)
        snap = self._find_snapshot(row.name, sid)
        vols = self._cat.volumes()
        old = [v.id for v in _ancestry(vols, row.leaf)]

        def apply(vid):
            self._drop_newer(row, snap)
            self._cat.update_chain(row.name, leaf=vid)
            return self._collect_garbage(old)

        self._new_leaf_on("revert", chain, row, snap, apply)

    def _op_preview(self, chain: "Chain", sid: str) -> None:
        row = self._prepare(chain)
        snap = self._find_snapshot(row.name, sid)

        def apply(vid):
            self._cat.update_chain(row.name, leaf=vid, saved_leaf=row.leaf, preview=snap.id)
            return []

        self._new_leaf_on("preview", chain, row, snap, apply)

    def _op_end_preview(self, chain: "Chain", keep: bool) -> None:
        op = "commit_preview" if keep else "undo_preview"
        row = self._prepare(chain, allow_preview=True)
        if not row.preview:
            raise RepositoryError(f"chain {row.name!r} is not previewing a snapshot")
        vols = self._cat.volumes()
        saved_size = None if keep else self._volume_size(vols[row.saved_leaf])
        with self._cat.transaction():
            if keep:
                snap = self._cat.snapshot(row.preview)
                self._drop_newer(row, snap)
                self._cat.update_chain(row.name, saved_leaf=None, preview=None)
                candidates = [v.id for v in _ancestry(vols, row.saved_leaf)]
            else:
                self._cat.update_chain(row.name, leaf=row.saved_leaf, saved_leaf=None,
                                       preview=None, size=saved_size)
                candidates = [v.id for v in _ancestry(vols, row.leaf)]
            remove = self._collect_garbage(candidates)
            self._refresh_roles()
            jid = self._cat.journal_begin(op, row.name, {"remove": remove}, state="committed")
        kill_point(f"{op}.committed")
        self._finish(jid, op, remove)

    def _op_clone(self, chain: "Chain", sid: str, name: str) -> "Chain":
        row = self._prepare(chain, allow_preview=True)
        _check_name(name)
        snap = self._find_snapshot(row.name, sid)
        if self._cat.chain(name) is not None:
            raise RepositoryError(f"a chain named {name!r} exists already")
        base = self._volume_row(snap.volume)
        # the clone is the disk as it was at the snapshot, at the size it had then (the
        # chain may have grown since)
        size = self._volume_size(base)
        vid, rel = self._new_volume("qcow2")
        with journaled(self, "clone", name, {"created": [rel], "snapshot": snap.id,
                                             "origin": row.name}) as j:
            img = j.hold(self._create_overlay(rel, base, size, row.cluster_size))
            j.step("created")
            with self._cat.transaction():
                self._cat.insert_chain(ChainRow(name, size, row.cluster_size, now(), vid,
                                                origin_chain=row.name, origin_snapshot=snap.id))
                self._cat.insert_volume(self._volume_row_for(vid, name, rel, "qcow2", base.id,
                                                             size))
                self._refresh_roles()
                self._cat.journal_end(j.jid)
            j.leaf_of(name, img)
        return self.chain(name)

    def _op_delete_snapshot(self, chain: "Chain", sid: str,
                            progress: Progress | None) -> MergeResult:
        row = self._prepare(chain)
        snap = self._find_snapshot(row.name, sid)
        vols = self._cat.volumes()
        users = _volume_users(vols, self._cat.chains())
        others = sorted(users.get(snap.volume, set()) - {row.name})
        if others:
            raise RepositoryError(
                f"snapshot {snap.id} of chain {row.name!r} cannot be deleted: clone "
                f"{others[0]!r} uses its volume {snap.volume}",
                hint=f"delete chain {others[0]!r} first")
        line = _ancestry(vols, row.leaf)
        ids = [v.id for v in line]
        if snap.volume not in ids or ids.index(snap.volume) == 0:
            raise RepositoryError(f"snapshot {snap.id}'s volume is not under the leaf of chain "
                                  f"{row.name!r}", hint="run 'cowchain chain check'")
        vol = vols[snap.volume]
        child = line[ids.index(snap.volume) - 1]
        kids = self._cat.children(vol.id)
        if [k.id for k in kids] != [child.id]:
            raise RepositoryError(f"volume {vol.id} has other children than {child.id}",
                                  hint="run 'cowchain chain check'")
        grandchildren = [k.id for k in self._cat.children(child.id)]
        commit_bytes, pull_bytes = self._merge_costs(vol, child)
        direction = "commit" if commit_bytes <= pull_bytes else "pull"
        target = vol if direction == "commit" else child
        if direction == "pull":
            # The snapshot's own volume is removed: nobody may have it open (an open_snapshot
            # view of this snapshot).  A writable open proves that; it is closed again because
            # the pull reads the volume through its child (in this process a writable and a
            # read-only open of one file exclude each other, as between processes).
            self._release_handles([vol])
            self._open_volume(vol, backing=False).close()
        args = {"snapshot": snap.id, "direction": direction, "volume": vol.id,
                "child": child.id, "grandchildren": grandchildren}
        with journaled(self, "delete_snapshot", row.name, args, illegal=[target.id],
                       hold=self._merge_specs(args)) as j:
            copied, j.remove = self._merge_steps(j.jid, args, "intent", j.images, progress)
        return MergeResult(snap.id, direction, child.id if direction == "commit" else vol.id,
                           target.id, copied, commit_bytes, pull_bytes)

    def _merge_costs(self, vol: VolumeRow, child: VolumeRow) -> tuple[int, int]:
        """(bytes a commit of CHILD into VOL writes, bytes a pull of VOL into CHILD writes)."""
        with self._open_volume(child, readonly=True) as img:
            return ops.merge_costs(img, keep_zeros=vol.parent is not None)

    def _merge_specs(self, args: dict) -> list[tuple[VolumeRow, bool, bool]]:
        """What a merge holds (see _holding): for a commit the snapshot's volume (written,
        with its chain), the child (read alone) and the child's children (their headers are
        rewritten); for a pull the child (written, with its chain)."""
        vol, child = self._volume_row(args["volume"]), self._volume_row(args["child"])
        if args["direction"] == "commit":
            specs = [(vol, False, True), (child, True, False)]
            specs += [(self._volume_row(g), False, False) for g in args["grandchildren"]]
        else:
            specs = [(child, False, True)]
        return specs

    def _merge_run(self, jid: int, args: dict, step: str) -> int:
        """Recovery of an interrupted merge: redo its steps from STEP, holding its images."""
        with self._holding(self._merge_specs(args), verify=False) as images:
            copied, remove = self._merge_steps(jid, args, step, images, None)
        kill_point("delete_snapshot.committed")
        self._finish(jid, "delete_snapshot", remove)
        return copied

    def _merge_steps(self, jid: int, args: dict, step: str, images: list,
                     progress: Progress | None) -> tuple[int, list[str]]:
        """The steps of a merge from STEP on, through its catalog commit, on IMAGES (from
        _merge_images); each step is idempotent (recovery re-runs them).  Returns the bytes
        copied and the files to remove."""
        cat = self._cat
        vol = self._volume_row(args["volume"])
        child = self._volume_row(args["child"])
        commit = args["direction"] == "commit"
        parent = self._volume_row(vol.parent) if vol.parent else None
        copied = 0
        if step == "intent":
            if commit:
                base, top = images[0], images[1]
                copied = ops.commit(top, base, progress=progress, hook="delete_snapshot.copy")
            else:
                copied = ops.stream(images[0], depth=1, keep_zeros=parent is not None,
                                    progress=progress, hook="delete_snapshot.copy")
            self._step(jid, "delete_snapshot", "copied")
            step = "copied"
        if step == "copied":
            if commit:
                for img in images[2:]:
                    img.rebase(os.path.basename(vol.path), vol.format)
            elif parent is None:
                images[0].rebase(None, None)
            else:
                images[0].rebase(os.path.basename(parent.path), parent.format)
            self._step(jid, "delete_snapshot", "rebased")
        if commit:
            # the snapshot's volume holds the merged content now (and may have grown): its
            # record is renewed; it stays sealed unless the child was the leaf
            rec = self._volume_record(vol, sealed=bool(args["grandchildren"]),
                                      size=images[0].size)
        with cat.transaction():
            if commit:
                for gid in args["grandchildren"]:
                    cat.update_volume(gid, parent=vol.id)
                for c in cat.chains():
                    if c.leaf == child.id:
                        cat.update_chain(c.name, leaf=vol.id)
                    if c.saved_leaf == child.id:
                        cat.update_chain(c.name, saved_leaf=vol.id)
                for s in cat.snapshots(vol.chain):
                    if s.volume == child.id:
                        cat.update_snapshot(s.id, volume=vol.id)
                cat.delete_snapshot(args["snapshot"])
                cat.delete_volume(child.id)
                cat.update_volume(vol.id, legality="LEGAL", **rec)
                remove = [child.path]
            else:
                cat.update_volume(child.id, parent=vol.parent, legality="LEGAL")
                cat.delete_snapshot(args["snapshot"])
                cat.delete_volume(vol.id)
                remove = [vol.path]
            self._refresh_roles()
            cat.journal_commit(jid, {"remove": remove})
        return copied, remove

    def _op_export(self, chain: "Chain", path, fmt: str, sid: str | None,
                   progress: Progress | None, overwrite: bool,
                   output_device: bool = False) -> ExportResult:
        self._check_open()
        if fmt not in ("raw", "qcow2"):
            raise InvalidArgument(f"format must be 'raw' or 'qcow2', not {fmt!r}")
        row = self._chain_row(chain.name)
        stream = isinstance(path, int) and not isinstance(path, bool)
        # a stream or device is checked and written in place by ops.convert; a file is
        # checked here, written beside its name and published under the journal
        dest = None if stream or output_device else _destination.check(path,
                                                                      overwrite=overwrite)
        if sid is not None:
            with self._cat.read():
                snap = self._find_snapshot(row.name, sid)
                src_row = self._volume_row(snap.volume)
            sid = snap.id
        else:
            chain.release_leaf()
            src_row = self._volume_row(row.leaf)
        if dest is None:
            with self._open_volume(src_row, readonly=True) as src:
                size = src.size                 # a snapshot's own size (the disk may have grown)
                written = ops.convert(src, path, format=fmt, progress=progress,
                                      output_device=output_device)
            where = "-" if stream else os.path.abspath(os.fspath(path))
            return ExportResult(where, fmt, size, sid, written)
        tmp = dest.temp_path()
        with journaled(self, "export", row.name, {"tmp_files": [tmp], "dest": dest.path},
                       committed=None) as j:
            with self._open_volume(src_row, readonly=True) as src:
                size = src.size                 # a snapshot's own size (the disk may have grown)
                written = ops.convert_new(src, tmp, format=fmt, cluster_size=row.cluster_size,
                                          progress=progress, hook="export.copy")
            j.step("written")
            dest.commit(tmp)
            kill_point("export.renamed")
            self._cat.journal_end(j.jid)
        return ExportResult(dest.path, fmt, size, sid, written)

    def _op_diff(self, chain: "Chain", from_id: str, to_id: str | None) -> "DiffResult":
        self._check_open()
        with self._cat.read():
            row = self._chain_row(chain.name)
            a = self._find_snapshot(row.name, from_id).volume
            b = self._find_snapshot(row.name, to_id).volume if to_id is not None else row.leaf
            vols = self._cat.volumes()
        path_a = [v.id for v in _ancestry(vols, a)]
        path_b = [v.id for v in _ancestry(vols, b)]
        in_b = set(path_b)
        lca = next((v for v in path_a if v in in_b), None)
        between = path_a[:path_a.index(lca)] if lca else path_a
        between += path_b[:path_b.index(lca)] if lca else path_b
        if row.leaf in between or b == row.leaf:
            chain.release_leaf()
        size_a = self._volume_size(vols[a]) if a != row.leaf else row.size
        if not between:
            return DiffResult([], size_a, size_a)
        images = []
        try:
            for vid in between:
                images.append(self._open_volume(vols[vid], readonly=True, backing=False))
            ranges = ops.allocated_ranges(images)
        finally:
            for img in images:
                img.close()
        with self._open_volume(vols[b], readonly=True) as view:
            size_b = view.size
            inside = [(s, min(e, size_b)) for s, e in ranges if s < size_b]
            changes = ops.annotate(inside, view)
        # Past the TO point's end (the FROM point is larger: the disk grew in between) the
        # ranges the FROM side holds are changed too; at TO the disk ends there (zero).
        changes += [ops.Change(max(s, size_b), e - max(s, size_b), True, False)
                    for s, e in ranges if e > size_b]
        return DiffResult(changes, size_a, size_b)


# --- check ------------------------------------------------------------------------------------

def _run_check(repo: Repository, repair: bool, only: str | None) -> RepositoryCheck:
    """Repository.check (see its docstring for the kinds of problem)."""
    res = RepositoryCheck()
    cat = repo._cat
    add = res.problems.append
    for msg in cat.integrity_problems():
        add(Problem("catalog", f"the catalog database is damaged: {msg}",
                    repair="not repairable here: restore catalog.db from a backup"))
    if only is not None:
        repo._chain_row(only)
    for j in cat.journal():
        if only is not None and j.chain != only:
            continue
        p = Problem("pending", f"operation {j.op} is in flight (step {j.step})", chain=j.chain)
        if repair:
            try:
                p.repair = repo._recover_row(j)
                p.repaired = True
                repo._blocked.pop(j.chain, None)
            except EngineError as e:
                p.repair = f"recovery failed: {e}"
        add(p)
    # Our own handles hold locks that a repair (and an accurate check) must not meet.
    for c in repo._chains.values():
        c.release_leaf()
    vols = cat.volumes()
    chains = cat.chains()
    scope_chains = [c for c in chains if only is None or c.name == only]
    in_scope: dict[str, VolumeRow] = {}
    reachable: dict[str, set[str]] = {}
    for c in scope_chains:
        seen: set[str] = set()
        for top in (c.leaf, c.saved_leaf):
            if top is None:
                continue
            try:
                line = _ancestry(vols, top)
            except EngineError as e:
                add(Problem("backing", f"the chain cannot be followed from volume {top}: "
                            f"{e.message}", chain=c.name, volume=top,
                            repair="not repairable automatically"))
                continue
            for v in line:
                in_scope[v.id] = v
                seen.add(v.id)
        reachable[c.name] = seen
        for v in vols.values():
            if v.chain == c.name:
                in_scope.setdefault(v.id, v)
        for s in cat.snapshots(c.name):
            if s.volume in seen:
                continue
            why = ("its volume is missing from the catalog" if s.volume not in vols
                   else "its volume is not under the chain's leaf")
            p = Problem("snapshot", f"snapshot {s.id} is broken: {why}", chain=c.name,
                        snapshot=s.id, volume=s.volume)
            if repair:
                cat.delete_snapshot(s.id)
                p.repaired, p.repair = True, "dropped the snapshot record"
            add(p)
    by_file = {os.path.basename(v.path): v for v in vols.values()}
    pending_vols = {vid for j in cat.journal() for key in ("volume", "child")
                    for vid in [j.args.get(key)] if vid}
    # A chain's leaf has the chain's size; every volume has the size the catalog records
    # for it (older volumes may be smaller: a disk grows, and a revert gives it a snapshot's
    # size again).
    sizes = {c.leaf: c.size for c in chains}
    for v in in_scope.values():
        entry = {"id": v.id, "chain": v.chain, "path": repo._abs(v.path), "format": v.format,
                 "check": None}
        res.volumes.append(entry)
        image_clean = _check_volume(repo, v, vols, by_file, sizes, entry, add, repair)
        if v.legality != "LEGAL" and v.id not in pending_vols:
            p = Problem("illegal", f"volume {v.id} is ILLEGAL but no operation is changing it",
                        chain=v.chain, volume=v.id)
            if repair and image_clean:
                cat.update_volume(v.id, legality="LEGAL")
                p.repaired, p.repair = True, "marked LEGAL (its image check is clean)"
            elif repair:
                p.repair = "left ILLEGAL: its image check is not clean"
            add(p)
    vols = cat.volumes()
    roles = _roles(vols, cat.chains())
    stale = []
    for v in vols.values():
        role = roles[v.id]
        if role != v.role and v.id in in_scope:
            stale.append(Problem("role", f"volume {v.id} is recorded as {v.role} but is {role}",
                                 chain=v.chain, volume=v.id))
    if stale and repair:
        with cat.transaction():
            repo._refresh_roles()
        for p in stale:
            p.repaired, p.repair = True, "recomputed"
    res.problems.extend(stale)
    if only is None:
        vdir = os.path.join(repo._path, VOLUMES_DIR)
        known = set(by_file)
        for name in sorted(os.listdir(vdir)):
            if name in known:
                continue
            p = Problem("stray-file", f"volumes/{name} is not in the catalog")
            if repair:
                lost = os.path.join(repo._path, LOST_FOUND)
                os.makedirs(lost, exist_ok=True)
                shutil.move(os.path.join(vdir, name), os.path.join(lost, name))
                _fsync_dir(vdir)
                p.repaired, p.repair = True, f"moved to {LOST_FOUND}/{name}"
            add(p)
    _record_damage(repo, res, in_scope.values())
    return res


def _check_raw_identity(repo, v: VolumeRow, add, repair) -> bool:
    """A raw volume's file against the catalog's record: size, inode and (sealed) content
    stamp.  Returns True when it matches (or was repaired)."""
    if v.size is None:
        return True                   # nothing recorded yet (an older catalog, read-only)
    rec = _raw_record(repo._abs(v.path), sealed=v.stamp is not None, stamp=v.stamp)
    why = _identity_problem(v, rec["size"], rec["ino"])
    content_same = rec["size"] == v.size and rec["stamp"] == v.stamp
    if why is None and not content_same:
        why = ("does not hold what it held when it was sealed (its content stamp differs): "
               "it was written by another tool or replaced in place")
    if why is None:
        return True
    p = Problem("identity", f"raw volume {v.id} {why}", chain=v.chain, volume=v.id)
    if content_same:
        # the same bytes in another file (a copied or restored repository)
        p.repair = "the catalog records the file's new inode (its content is unchanged)"
        if repair:
            repo._cat.update_volume(v.id, ino=rec["ino"])
            p.repaired = True
    else:
        p.repair = "not repairable: restore the file from a backup"
    add(p)
    return p.repaired


#: Kinds of problem that make a volume damaged: check records them in the catalog, and a
#: chain with a damaged volume takes no new snapshot until a check finds it clean.
_DAMAGE_KINDS = frozenset({"missing-file", "unreadable", "size", "identity", "image"})


def _record_damage(repo, res: RepositoryCheck, checked: Iterable[VolumeRow]) -> None:
    """Mark in the catalog the volumes this check found damaged, and unmark the clean ones
    (a read-only repository records nothing)."""
    if repo._readonly or repo._cat.version < 2:
        return
    why: dict[str, str] = {}
    for p in res.problems:
        if (p.volume and not p.repaired and p.kind in _DAMAGE_KINDS and not p.leaks_only
                and p.volume not in why):
            why[p.volume] = p.message
    changes = {v.id: why.get(v.id) for v in checked if v.damaged != why.get(v.id)}
    if changes:
        with repo._cat.transaction():
            for vid, reason in changes.items():
                if repo._cat.volume(vid) is not None:
                    repo._cat.update_volume(vid, damaged=reason)


def _check_volume(repo, v: VolumeRow, vols, by_file, sizes, entry, add, repair) -> bool:
    """Check one volume's file against the catalog; returns True when its image is clean."""
    cat = repo._cat
    path = repo._abs(v.path)
    if not os.path.exists(path):
        add(Problem("missing-file", f"volume {v.id}: {v.path} does not exist", chain=v.chain,
                    volume=v.id, repair="not repairable: restore the file from a backup"))
        return False
    try:
        img = repo._open_volume(v, readonly=True, backing=False, verify=False)
    except EngineError as e:
        add(Problem("unreadable", f"volume {v.id} cannot be opened as {v.format}: {e}",
                    chain=v.chain, volume=v.id, repair="not repairable automatically"))
        return False
    with img:
        want = sizes.get(v.id)
        if want is not None and img.size != want:
            add(Problem("size", f"volume {v.id} is {img.size} bytes, its chain {want}",
                        chain=v.chain, volume=v.id, repair="not repairable automatically"))
        if v.format == "raw":
            if v.parent is not None:
                add(Problem("backing", f"raw volume {v.id} cannot have a parent ({v.parent})",
                            chain=v.chain, volume=v.id, repair="not repairable automatically"))
            return _check_raw_identity(repo, v, add, repair)
        if v.size is not None and img.size != v.size:
            add(Problem("size", f"volume {v.id} is {img.size} bytes, the catalog records "
                        f"{v.size}", chain=v.chain, volume=v.id,
                        repair="not repairable automatically"))
        name, fmt = img.backing_name, img.backing_format
        result = img.check()
    expected = vols.get(v.parent) if v.parent else None
    named = by_file.get(name) if name else None
    if name is None and expected is not None or name is not None and (
            named is None or expected is None or named.id != expected.id
            or fmt != named.format):
        want = (f"{os.path.basename(expected.path)} ({expected.format})" if expected
                else "no backing file")
        has = f"{name} ({fmt})" if name else "no backing file"
        p = Problem("backing", f"volume {v.id}: the header says {has}, the catalog says {want}",
                    chain=v.chain, volume=v.id)
        if name is None or (named is not None and fmt == named.format):
            if repair:
                cat.update_volume(v.id, parent=named.id if named else None)
                p.repaired = True
            p.repair = "the catalog follows the header (the header is the truth about backing)"
        else:
            p.repair = ("not repairable: the header names a file the catalog does not know, "
                        "or the wrong format")
        add(p)
    entry["check"] = result.to_dict()
    if result.exit_code == 0:
        return True
    d = result.to_dict()
    p = Problem("image", f"volume {v.id}: image check found {d.get('corruptions', 0)} "
                f"corruptions, {d.get('leaks', 0)} leaked clusters, "
                f"{d.get('check-errors', 0)} check errors", chain=v.chain, volume=v.id,
                leaks_only=result.exit_code == 3)
    if repair:
        with repo._open_volume(v, backing=False) as img:
            img.check(repair="all")
            again = img.check()
        entry["check"] = again.to_dict()
        p.repaired = again.exit_code == 0
        p.repair = "repaired (qemu-img check -r all semantics)" if p.repaired else \
            f"repair left problems: {again.to_dict()}"
    add(p)
    return p.repaired


# --- Chain ------------------------------------------------------------------------------------

class Chain:
    """One virtual disk: its volumes (base first, leaf last) and its snapshots.

    Reads and writes go to the leaf, through the whole chain.  Get chains from
    ``Repository.create_chain``, ``Repository.chain`` or ``Chain.clone``; a chain belongs to
    its repository's thread.  ``close()`` flushes and releases the leaf; after it any call
    raises ImageClosed (``repo.chain(name)`` gives a new handle).
    """

    def __init__(self, repo: Repository, name: str):
        self._repo = repo
        self._name = name
        self._img = None
        self._closed = False
        self._views: weakref.WeakSet = weakref.WeakSet()

    # --- metadata ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def repository(self) -> Repository:
        return self._repo

    def _row(self) -> ChainRow:
        self._check_open()
        return self._repo._chain_row(self._name)

    @property
    def size(self) -> int:
        """Virtual size, bytes."""
        return self._row().size

    @property
    def cluster_size(self) -> int:
        """Cluster size of the chain's qcow2 volumes, bytes."""
        return self._row().cluster_size

    @property
    def volumes(self) -> list[Volume]:
        """The volumes the leaf reads through, base first, leaf last; during a preview, then
        the volumes kept aside for ``undo_preview`` (those not already listed)."""
        self._check_open()
        with self._repo._cat.read():
            return self._repo._chain_volumes(self._name)

    @property
    def leaf(self) -> Volume:
        """The writable volume."""
        self._check_open()
        with self._repo._cat.read():
            row = self._row()
            return self._repo._volume(self._repo._volume_row(row.leaf))

    @property
    def snapshots(self) -> list[Snapshot]:
        """The chain's snapshots, oldest first."""
        self._check_open()
        return [self._repo._snapshot(r) for r in self._repo._cat.snapshots(self._name)]

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        """The snapshot with that id (or a unique prefix of it, 4 characters or more)."""
        self._check_open()
        return self._repo._snapshot(self._repo._find_snapshot(self._name, snapshot_id))

    @property
    def previewing(self) -> Snapshot | None:
        """The snapshot being previewed, or None."""
        self._check_open()
        with self._repo._cat.read():
            row = self._row()
            if not row.preview:
                return None
            snap = self._repo._cat.snapshot(row.preview)
        if snap is None:
            raise NotFound(f"chain {self._name!r}: the previewed snapshot {row.preview} is "
                           "not in the catalog")
        return self._repo._snapshot(snap)

    @property
    def origin(self) -> tuple[str, str] | None:
        """For a clone, (origin chain name, snapshot id); None otherwise."""
        row = self._row()
        if row.origin_chain is None:
            return None
        return row.origin_chain, row.origin_snapshot

    def to_dict(self) -> dict:
        """The chain as the CLI's JSON shows it."""
        self._check_open()
        with self._repo._cat.read():
            return self._to_dict()

    def _to_dict(self) -> dict:
        row = self._row()
        return {
            "name": row.name, "size": row.size, "cluster_size": row.cluster_size,
            "created": row.created, "leaf": row.leaf, "previewing": row.preview,
            "origin": (None if row.origin_chain is None else
                       {"chain": row.origin_chain, "snapshot": row.origin_snapshot}),
            "volumes": [v.to_dict() for v in self.volumes],
            "snapshots": [s.to_dict() for s in self.snapshots],
        }

    # --- data path --------------------------------------------------------------------------

    def _image(self):
        img = self._img
        if img is None:
            self._check_open()
            with self._repo._cat.read():
                row = self._row()
                leaf = self._repo._volume_row(row.leaf)
            self._repo._check_not_blocked(self._name)
            img = self._img = self._repo._open_volume(leaf, readonly=self._repo._readonly)
        return img

    def read(self, offset: int, length: int) -> bytes:
        """LENGTH bytes of the disk at OFFSET (bytes), through the chain."""
        return self._image().read(offset, length)

    def readinto(self, offset: int, buffer) -> int:
        """Fill BUFFER (any writable buffer) from the disk at OFFSET; returns bytes read."""
        return self._image().readinto(offset, buffer)

    def write(self, offset: int, data) -> int:
        """Write DATA (any buffer) at OFFSET into the leaf."""
        return self._image().write(offset, data)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make the range read as zeros (zero clusters in the leaf; no data written)."""
        self._image().write_zeroes(offset, length, unmap=unmap)

    def discard(self, offset: int, length: int) -> None:
        """Drop the leaf's mapping of the whole clusters in the range: the snapshot below
        (or zeros, with no snapshot) shows through there."""
        self._image().discard(offset, length)

    def flush(self) -> None:
        """Make every write so far durable."""
        if self._img is not None:
            self._img.flush()
        else:
            self._check_open()

    def extents(self, offset: int = 0, length: int | None = None):
        """Allocation runs of the disk (``qemu-img map`` meanings; depth 0 is the leaf)."""
        return self._image().extents(offset, length)

    # --- snapshots --------------------------------------------------------------------------

    def resize(self, new_size: int) -> None:
        """Grow the disk to NEW_SIZE bytes (a multiple of 512); the new part reads as zeros.

        Only the leaf grows: snapshots keep the size they were taken at, and reverting to
        (or previewing) one gives the disk that snapshot's size again. Shrinking is refused
        (``UnsupportedFeature``), as is a chain in preview. A crash leaves the old size or
        the new one.
        """
        self._repo._op_resize(self, new_size)

    def snapshot(self, description: str = "", *, force: bool = False) -> Snapshot:
        """Take a snapshot: the leaf becomes read-only and a new empty overlay becomes the leaf.

        O(1) in the disk size: no data is copied.  Writes made so far are flushed first.

        Raises:
            VolumeDamaged: a volume of the chain is known to be damaged (ILLEGAL or found
                damaged by ``Repository.check``, the QCOW2 corrupt bit set, or a raw volume
                that is not the file the catalog recorded); the error names it.  Repair it
                with ``Repository.check(repair=True)``, or pass ``force=True`` to take the
                snapshot anyway.
        """
        return self._repo._op_snapshot(self, description, force)

    def open_snapshot(self, snapshot_id: str):
        """A read-only Image showing the disk exactly as it was at that snapshot.

        Close it when done (it is also closed with the chain).  While it is open, deleting
        that snapshot or the next one fails with ImageLocked.

        Raises:
            NotFound: no such snapshot (in a read-only repository, also: another process
                deleted it meanwhile).
        """
        self._check_open()
        with self._repo._cat.read():
            row = self._repo._snapshot_volume(self._repo._find_snapshot(self._name,
                                                                        snapshot_id))
        img = self._repo._open_volume(row, readonly=True)
        self._views.add(img)
        return img

    def revert(self, snapshot_id: str) -> None:
        """Make the disk read what it read at that snapshot.  Unsnapshotted writes and the
        snapshots newer than it are dropped (volumes a clone uses are kept for the clone).
        The disk gets the snapshot's size: reverting to a snapshot taken before a resize
        makes the disk that smaller size again (the new leaf is an overlay of the snapshot's
        volume, at its size)."""
        self._repo._op_revert(self, snapshot_id)

    def preview(self, snapshot_id: str) -> None:
        """Run on that snapshot's content for a while (writes go to a new leaf over it),
        keeping the current leaf aside; then ``commit_preview`` or ``undo_preview``.  The
        disk has the snapshot's size during the preview (as after ``revert``); undo gives it
        back the size of the leaf kept aside."""
        self._repo._op_preview(self, snapshot_id)

    def commit_preview(self) -> None:
        """Keep the previewed state: like ``revert`` to the previewed snapshot, keeping the
        writes made during the preview."""
        self._repo._op_end_preview(self, keep=True)

    def undo_preview(self) -> None:
        """Drop the preview and its writes; the leaf kept aside is the leaf again."""
        self._repo._op_end_preview(self, keep=False)

    def delete_snapshot(self, snapshot_id: str, *, progress: Progress | None = None) -> MergeResult:
        """Remove a snapshot by merging its volume with the next one, in the cheaper direction.

        What the leaf and every other snapshot read does not change.

        Arguments:
            snapshot_id (str): the snapshot (id or unique prefix).
            progress (callable | None): ``progress(done_bytes, total_bytes)`` during the copy.

        Returns:
            MergeResult: the direction taken ("commit" or "pull") and the bytes copied.

        Raises:
            RepositoryError: a clone uses the snapshot's volume (the message names it), or the
                chain is previewing.
            ImageLocked: a volume the merge writes or removes is held open: an
                ``open_snapshot`` image of this snapshot or of the next one, qemu-img, a
                read-only repository reading it.  Nothing was changed; retry when it is
                closed.
        """
        return self._repo._op_delete_snapshot(self, snapshot_id, progress)

    def clone(self, snapshot_id: str, name: str) -> "Chain":
        """A new chain NAME whose disk starts as that snapshot's content (a linked clone).

        The clone's leaf is a new overlay on the snapshot's volume; the volumes below are
        shared and read-only, and writes on either side stay on that side.
        """
        return self._repo._op_clone(self, snapshot_id, name)

    def export(self, path, *, format: str = "raw", snapshot_id: str | None = None,
               progress: Progress | None = None, overwrite: bool = False,
               output_device: bool = False) -> ExportResult:
        """Write the disk (or a snapshot of it) as one self-contained image at PATH.

        The file appears complete or not at all (written beside PATH and renamed).  Only
        allocated data is copied; zero ranges stay sparse.  PATH follows the destination
        rule of :mod:`engine.destination`: never inside a repository, never a file an open
        image or repository uses, never through or over a symlink.

        Arguments:
            path (str | int): the new file; or an open file descriptor (standard output) to
                which the raw disk is written sequentially.
            format (str): "raw" or "qcow2" (with the chain's cluster size).
            snapshot_id (str | None): export that snapshot instead of the current disk.
            progress (callable | None): ``progress(done_bytes, total_bytes)``.
            overwrite (bool): replace an existing regular file (atomically).
            output_device (bool): PATH is a block device: write the raw disk into it.

        Raises:
            UnsafeDestination: the destination breaks the rule.
            InvalidArgument: PATH exists and ``overwrite`` is false.
        """
        return self._repo._op_export(self, path, format, snapshot_id, progress, overwrite,
                                     output_device)

    def diff(self, from_snapshot_id: str, to_snapshot_id: str | None = None) -> "DiffResult":
        """The guest ranges that may differ between two snapshots (or a snapshot and the
        current disk, when TO is None), from the volumes' tables alone: the union of what the
        volumes between the two points hold.  Each range says how it reads at the TO point
        (``zero``/``data``), so a backup tool can skip zero ranges.

        Across a resize the sizes differ (``from_size``, ``to_size``): the grown range counts
        as changed where the larger point holds data or zeros written there; past the TO
        point's end (TO is the smaller) such ranges are reported as zero.

        Returns:
            DiffResult: a list of Change(start, length, zero, data), sorted and disjoint, with
            ``from_size`` and ``to_size``.
        """
        return self._repo._op_diff(self, from_snapshot_id, to_snapshot_id)

    # --- lifetime ---------------------------------------------------------------------------

    # --- the leaf handle (for the repository's operations; the chain alone assigns it) ----

    def adopt_leaf(self, img) -> None:
        """Take IMG, open read-write, as the leaf handle (an operation made the new leaf)."""
        self._img = img

    def leaf_uses(self, paths: set[str]) -> bool:
        """The open leaf handle reads through one of the files PATHS."""
        img = self._img
        return img is not None and not img.closed and any(i.path in paths for i in img.chain())

    def release_leaf(self) -> None:
        """Flush and close the leaf handle (it reopens on the next I/O)."""
        img, self._img = self._img, None
        if img is not None:
            img.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ImageClosed(f"chain {self._name!r} is closed")
        self._repo._check_open()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Flush and close the leaf and every image from open_snapshot. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for img in list(self._views):
            img.close()
        img, self._img = self._img, None
        if img is not None:
            img.close()

    def __enter__(self) -> "Chain":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Chain {self._name!r}{' closed' if self._closed else ''}>"


__all__ = ["Repository", "Chain", "Snapshot", "Volume", "MergeResult", "ExportResult",
           "DiffResult", "Problem", "RepositoryCheck"]
