"""The context the repository's operations run in: its folder, catalog and open chains,
the views of catalog rows they share, and the opening of volume files under the catalog's
identity rules.  ``Repository`` owns one; the operations (``engine.repository.operations``)
and ``Chain`` work through it."""

from __future__ import annotations

import contextlib
import errno
import dataclasses
import os
import uuid
import weakref
from typing import TYPE_CHECKING, Any, Iterable, Iterator, TypeVar

from engine import image
from engine.image.chain import probe_header
from engine.catalog import VolumeRow, ChainRow, SnapshotRow, now, parse_time
from engine.errors import (ChainError, ChainLeased, ImageClosed, ImageLocked, ImageNotFound,
                           InvalidArgument, LeaseLost, NotFound, RepositoryError,
                           VolumeDamaged, io_error)
from engine.repository import files, graph, journal
from engine.repository.files import VOLUMES_DIR
from engine.repository.catalog_api import CatalogStore
from engine.repository.chain import Chain
from engine.repository.values import Snapshot, Volume

if TYPE_CHECKING:
    from engine.catalog_pg import PgCatalog
    from engine.image import Image
    from engine.repository.leases import Lease, LeaseManager
    from engine.repository.repo import Repository

#: Snapshot ids may be given by a unique prefix of at least this many characters.
MIN_ID_PREFIX = 4


T = TypeVar("T")


def _found(row: T | None, message: str) -> T:
    """ROW, read from the catalog; NotFound (MESSAGE) when there is none."""
    if row is None:
        raise NotFound(message)
    return row


class Held:
    """Images an operation holds (``Context.holding``): ``with`` yields the list and closes
    them at its end; ``close`` closes them too."""

    def __init__(self) -> None:
        self.images: list[Image] = []
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> list[Image]:
        return self.images

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stack.close()


class Context:
    """What an operation on the repository needs (see the module docstring).

    Attributes:
        path (str): the repository folder.   cat (CatalogStore): its catalog.
        readonly (bool): opened read-only.   closed (bool): the repository is closed.
        chains (dict[str, Chain]): the open chains, by name.
        blocked (dict[str, str]): chains with an interrupted roll-forward operation in
            flight in this process (name -> operation), refused until recovery.
    """

    def __init__(self, repo: "Repository", path: str, cat: CatalogStore, readonly: bool):
        self._repo = weakref.ref(repo)
        self.path = path
        self.cat = cat
        self.readonly = readonly
        self.closed = False
        self.chains: dict[str, Chain] = {}
        self.blocked: dict[str, str] = {}
        #: this host's write leases when several hosts share the catalog (else None)
        self.leases: LeaseManager | None = None
        self._shared: PgCatalog | None = None
        self._leases: dict[str, Lease] = {}       # the lease each chain is written under
        self._writing: list[str] = []             # chains whose lease fences catalog writes
        self._recovered: list[str] = []           # what takeovers recovered
        self._lost: dict[str, Lease] = {}         # leases dropped lost, until reacquired

    def chain(self, name: str) -> Chain:
        """The chain NAME (the same object each call while it is open)."""
        self.check_open()
        c = self.chains.get(name)
        if c is not None and not c.closed:
            return c
        self.chain_row(name)
        repo = self._repo()
        assert repo is not None            # an operation runs on a live repository
        c = self.chains[name] = Chain(repo, self, name)
        return c

    def check_open(self) -> None:
        if self.closed:
            raise ImageClosed("the repository is closed", path=self.path)

    def check_writable(self) -> None:
        self.check_open()
        if self.readonly:
            raise RepositoryError("the repository is open read-only", path=self.path,
                                  hint="open it without readonly to change it")

    def check_not_blocked(self, name: str) -> None:
        op = self.blocked.get(name)
        if op is not None:
            raise RepositoryError(f"chain {name!r} has an interrupted {op} in flight",
                                  hint="call Repository.recover() or reopen the repository")

    # --- write leases (a catalog shared by several hosts; see docs/multihost.md) ----------

    def attach_leases(self, leases: LeaseManager, shared: PgCatalog) -> None:
        """Write under leases (a catalog shared by several hosts): SHARED's transactions
        are fenced by the leases of the operation in progress and its journal entries
        record their epoch."""
        self.leases = leases
        self._shared = shared
        shared.fence = self.fence

    def lease_manager(self) -> LeaseManager:
        """The leases of a shared repository (RepositoryError with a local catalog)."""
        if self.leases is None:
            raise RepositoryError("the repository has a local catalog: one host, no leases",
                                  path=self.path,
                                  hint="open it with the PostgreSQL catalog URL it was "
                                       "created with (--catalog URL)")
        return self.leases

    def holder_of(self, name: str) -> dict[str, Any] | None:
        """Chain NAME's lease row as the operator sees it (None with a local catalog)."""
        if self.leases is None:
            return None
        info = self.leases.lease_of(name)
        if info is None:
            return {"host": None, "epoch": 0, "live": False, "expires_in": None}
        return {"host": info.holder, "epoch": info.epoch, "live": info.live,
                "expires_in": info.expires_in}

    def recover(self, chains: Iterable[str] | None = None, *,
                skip_leased: bool = False) -> list[str]:
        """Recover the interrupted operations (of CHAINS only, if given).  With leases each
        chain's recovery runs under its lease, acquired here (a chain another live host
        holds raises ChainLeased, or is skipped with SKIP_LEASED)."""
        if self.leases is None:
            return journal.recover(self, chains=chains)
        self.check_writable()
        pending = {j.chain for j in self.cat.journal() if j.chain is not None}
        done: list[str] = []
        for name in sorted(pending if chains is None else pending & set(chains)):
            if name in self.leased():
                with self.writing(name):
                    done += journal.recover(self, chains=[name])
                continue
            try:
                self.lease(name)
            except ChainLeased:
                if not skip_leased:
                    raise
            done += self._recovered
            self._recovered.clear()
        return done

    def lease(self, name: str, *, wait: float = 0) -> Lease | None:
        """The write lease of chain NAME, acquired on first use (None without leases).

        A lease newly acquired (a new epoch) first recovers the chain's unfinished journal
        entries (a dead host's, or this host's from before it lost the lease), fenced by
        the new lease.  A lease found lost is dropped with the chain's leaf handle (never
        flushed again) and raises LeaseLost; the next call acquires a new one.

        Raises:
            ChainLeased: another live host holds the chain's lease.
        """
        lm = self.leases
        if lm is None:
            return None
        have = self._leases.get(name)
        if have is not None:
            if have.lost:
                self._drop_lease(name)
                have.check()
            return have
        lease = self._leases[name] = lm.acquire(name, wait=wait)
        self._lost.pop(name, None)
        with self.writing(name):
            self._recovered += journal.recover(self, chains=[name])
        return lease

    def _drop_lease(self, name: str) -> None:
        """Chain NAME's lease was found lost: forget it and drop the chain's leaf handle
        unflushed (the next write acquires a new lease and reopens the leaf)."""
        lost = self._leases.pop(name, None)
        if lost is not None:
            self._lost[name] = lost
        c = self.chains.get(name)
        if c is not None:
            c.abandon_leaf()

    def held_lease(self, name: str) -> Lease | None:
        return self._leases.get(name)

    def leased(self) -> set[str]:
        """The chains whose write lease this host holds (not known lost)."""
        return {n for n, lease in self._leases.items() if not lease.lost}

    def release_lease(self, name: str) -> None:
        """Give chain NAME's lease up, unless an operation on it is running here.  A lost
        lease is left to expire (its holder's unflushed writes may still reach storage:
        the grace after expiry covers them)."""
        lease = self._leases.get(name)
        if lease is None or self.leases is None or name in self._writing:
            return
        del self._leases[name]
        if not lease.lost:
            self.leases.release(name)

    def may_flush(self, name: str) -> bool:
        """Chain NAME's open leaf may be flushed: no leases, or its lease is not lost."""
        lease = self._leases.get(name)
        return self.leases is None or lease is None or not lease.lost

    @contextlib.contextmanager
    def writing(self, name: str) -> Iterator[None]:
        """Catalog changes made inside are fenced by chain NAME's lease (acquired here)."""
        if self.leases is None:
            yield
            return
        if name not in self._leases:
            self.lease(name)
        self._writing.append(name)
        shared = self._shared
        epoch = None if shared is None else shared.epoch
        try:
            self.check_lease(name)
            if shared is not None:
                shared.epoch = self._leases[name].epoch
            yield
        finally:
            self._writing.remove(name)
            if shared is not None:
                shared.epoch = epoch

    def check_lease(self, name: str) -> None:
        """Before a write batch, a flush or a commit on chain NAME: its lease is held and
        not lost (LeaseLost otherwise). No-op without leases."""
        lease = self.lease(name)
        if lease is not None:
            lease.check()

    def fence(self, conn: Any) -> None:
        """The catalog's fence: the SQL check of every lease the current operation holds."""
        lm = self.leases
        for name in self._writing:
            lease = self._leases.get(name)
            if lease is None and name in self._lost:
                self._lost[name].check()          # an operation outliving its lease
            if lm is not None and lease is not None:
                try:
                    lm.fence_for(lease)(conn)
                except LeaseLost:
                    self._drop_lease(name)
                    raise

    def abs(self, rel: str) -> str:
        return os.path.join(self.path, rel)

    def chain_row(self, name: str) -> ChainRow:
        return _found(self.cat.chain(name), f"no chain named {name!r}")

    def snapshot_row(self, sid: str) -> SnapshotRow:
        return _found(self.cat.snapshot(sid), f"snapshot {sid} is not in the catalog "
                      "(removed meanwhile?)")

    def volume_row(self, vid: str) -> VolumeRow:
        return _found(self.cat.volume(vid), f"volume {vid} is not in the catalog "
                      "(removed meanwhile?)")

    def volume_of(self, row: VolumeRow) -> Volume:
        return Volume(row.id, row.chain, self.abs(row.path), row.format, row.role, row.parent,
                      row.legality, parse_time(row.created))

    def snapshot_of(self, row: SnapshotRow) -> Snapshot:
        return Snapshot(row.id, row.chain, parse_time(row.created), row.description,
                        row.volume)

    def find_snapshot(self, chain: str, sid: str) -> SnapshotRow:
        """The snapshot of CHAIN with id SID, or with a unique prefix SID."""
        if not isinstance(sid, str) or not sid:
            raise InvalidArgument(f"a snapshot id is required, not {sid!r}")
        row = self.cat.snapshot(sid)            # by key: the whole id, the usual case
        if row is not None and row.chain == chain:
            return row
        rows = self.cat.snapshots(chain)
        if len(sid) >= MIN_ID_PREFIX:
            hits = [r for r in rows if r.id.startswith(sid)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise InvalidArgument(f"snapshot id prefix {sid!r} is ambiguous in chain "
                                      f"{chain!r}; give more characters")
        raise NotFound(f"chain {chain!r} has no snapshot {sid!r}")

    def snapshot_volume(self, snap: SnapshotRow) -> VolumeRow:
        """SNAP's volume, which must be LEGAL to be read (call inside one catalog read)."""
        row = self.volume_row(snap.volume)
        if row.legality == "LEGAL":
            return row
        if self.readonly and any(row.id in (j.args.get("volume"), j.args.get("child"))
                                 for j in self.cat.journal() if j.state == "running"):
            raise ImageLocked(f"snapshot {snap.id}'s volume {row.id} is being changed by an "
                              "operation in another process", path=self.abs(row.path),
                              hint="retry when it is done")
        raise RepositoryError(f"snapshot {snap.id}'s volume {row.id} is ILLEGAL",
                              hint="run 'cowchain chain check --repair'")

    def chain_volumes(self, name: str) -> list[Volume]:
        row = self.chain_row(name)
        main = list(reversed(self.line(row.leaf)))
        seen = {v.id for v in main}
        extra = []
        if row.saved_leaf:
            extra = [v for v in reversed(self.line(row.saved_leaf)) if v.id not in seen]
        return [self.volume_of(v) for v in main + extra]

    def line(self, top: str) -> list[VolumeRow]:
        """TOP and the volumes under it, top first (read by key: one row per level)."""
        return graph.ancestry(self.cat.volumes_under(top), top)

    def volume_row_for(self, vid: str, chain: str, rel: str, fmt: str, parent: str | None,
                       size: int) -> VolumeRow:
        """The catalog row of a new (unsealed) volume file, with its size and identity."""
        row = VolumeRow(vid, chain, rel, fmt, "leaf", parent, "LEGAL", now())
        return dataclasses.replace(row, **self.volume_record(row, sealed=False, size=size))

    def new_volume(self, fmt: str) -> tuple[str, str]:
        vid = str(uuid.uuid4())
        ext = "qcow2" if fmt == "qcow2" else "raw"
        return vid, f"{VOLUMES_DIR}/{vid}.{ext}"

    def refresh_roles(self, root: str | None = None) -> None:
        """Recompute the roles (inside a transaction): of every volume, or of ROOT and the
        volumes over it, the only ones whose role an operation that changed nothing under
        ROOT can have changed (a role depends only on what lies over the volume)."""
        if root is None:
            vols = self.cat.volumes()
            new = graph.roles(vols, self.cat.chains())
        else:
            vols = self.cat.volumes_over(root)
            new = graph.roles(vols, self.cat.chains_on(vols), local=True)
        for vid, role in new.items():
            if role != vols[vid].role:
                self.cat.update_volume(vid, role=role)

    def collect_garbage(self, candidates: Iterable[str]) -> list[str]:
        """Drop the catalog rows of CANDIDATES no chain reads through any more (inside a
        transaction); return their files' relative paths, for removal after the commit.
        Whether a chain reads through a volume is read from the volumes over it alone."""
        cands = list(dict.fromkeys(candidates))
        over: dict[str, VolumeRow] = {}
        for vid in reversed(cands):          # the lowest first: its rows hold those above
            if vid not in over:
                over.update(self.cat.volumes_over(vid))
        users = graph.users_over(over, self.cat.chains_on(over))
        owned = {s.volume for s in self.cat.snapshots_on(cands)}
        remove = []
        for vid in cands:
            row = over.get(vid)
            if row is None or users.get(vid) or vid in owned:
                continue
            self.cat.delete_volume(vid)
            remove.append(row.path)
        return remove

    def open_volume(self, row: VolumeRow, *, readonly: bool = False, backing: bool = True,
                    verify: bool = True) -> Image:
        """Open volume ROW (with its backing chain unless BACKING is False).  With VERIFY,
        a raw volume in what was opened must still be the file the catalog recorded
        (VolumeDamaged otherwise)."""
        for attempt in (1, 2):
            try:
                img = image.open(self.abs(row.path), format=row.format, readonly=readonly,
                                 backing=backing)
                break
            except (ImageNotFound, ChainError):
                if not self.readonly:
                    raise
                # A writer beside this read-only open may have merged the volume (or one
                # under it) away since the catalog was read: a vanished volume is NotFound,
                # a changed chain is opened again as it is now.
                now_row = self.cat.volume(row.id)
                if now_row is None:
                    raise NotFound(f"volume {row.id} was removed while it was being opened "
                                   "(its snapshot was deleted meanwhile)") from None
                if attempt == 2:
                    raise
                row = now_row
        return self._verified(img) if verify else img

    def _verified(self, img: Image) -> Image:
        """IMG, once ``verify_identity`` passed (closed if it did not)."""
        try:
            self.verify_identity(img)
        except BaseException:
            img.close()
            raise
        return img

    def verify_identity(self, img: Image) -> None:
        """The cheap identity check made at every open: a raw volume (only a chain's base can
        be raw) must have the size and inode the catalog recorded for it."""
        bottom = img.bottom()
        if bottom.format != "raw":
            return
        v = self.cat.volume_by_path(os.path.relpath(bottom.path, self.path))
        if v is None:
            return
        try:
            ino = os.stat(bottom.path).st_ino
        except OSError as e:
            raise io_error(e.errno or errno.EIO, "cannot stat the volume",
                           path=bottom.path) from None
        why = files.identity_problem(v, bottom.size, ino)
        if why is not None:
            # another inode with the recorded size: a copied repository, which a check with
            # repair accepts once the content stamp matches
            raise self.damaged(v, why, repairable=bottom.size == v.size)

    def damaged(self, v: VolumeRow, why: str, *, chain: str | None = None,
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
                             volume=v.id, chain=chain, path=self.abs(v.path), hint=hint,
                             cli_hint=cli)

    def volume_record(self, v: VolumeRow, *, sealed: bool,
                      size: int | None = None) -> dict[str, Any]:
        """The catalog's record of volume V's file: its virtual size and, for a raw volume,
        its identity (inode, and once SEALED a content stamp).  SIZE: the qcow2 virtual size
        when the caller knows it (else it is read from the header)."""
        if v.format == "raw":
            return files.raw_record(self.abs(v.path), sealed=sealed)
        if size is None:
            with self.open_volume(v, readonly=True, backing=False, verify=False) as img:
                size = img.size
        return {"size": size, "ino": None, "stamp": None}

    def volume_size(self, v: VolumeRow) -> int:
        """Virtual size of volume V: the catalog's record, or its header (no record yet)."""
        if v.size is not None:
            return v.size
        with self.open_volume(v, readonly=True, backing=False, verify=False) as img:
            size: int = img.size
        return size

    def holding(self, specs: list[tuple[VolumeRow, bool, bool]], *,
                verify: bool = True) -> Held:
        """Open the volumes an operation writes (or needs unchanged) and hold them to its
        end: SPECS is [(row, readonly, backing)]; ``Held.images`` are in that order, and
        ``with`` yields them and closes them at its end.

        The rule for journaled operations: every image lock an operation needs is taken
        here, *before* its journal entry is written, and held until its catalog commit.  An
        image someone else holds (an open_snapshot view, qemu-img, a read-only repository)
        then refuses the operation with ImageLocked while nothing is recorded, so a refusal
        leaves nothing to recover.  Our own chains' leaf handles on those volumes are
        released first (they reopen on their next I/O)."""
        self.release_handles(r for r, _, _ in specs)
        held = Held()
        with held.stack:
            for r, ro, b in specs:
                held.images.append(held.stack.enter_context(
                    self.open_volume(r, readonly=ro, backing=b, verify=verify)))
            held.stack = held.stack.pop_all()
        return held

    def release_handles(self, rows: Iterable[VolumeRow]) -> None:
        paths = {self.abs(r.path) for r in rows}
        for c in self.chains.values():
            if c.leaf_uses(paths):
                c.release_leaf()

    def create_overlay(self, rel: str, parent: VolumeRow, size: int, cluster_size: int, *,
                       verify: bool = True, below: Image | None = None,
                       durable: bool = True) -> Image:
        """A new empty qcow2 overlay backed by PARENT (bare name, format recorded), returned
        open read-write with its chain: the caller makes it the chain's leaf handle, so that
        the chain is not opened a second time (opening costs one step per level).  BELOW:
        PARENT already open read-only with its chain (a snapshot's old leaf): the overlay is
        stacked on it, and the chain is not opened at all.  VERIFY: as for ``open_volume``.
        A chain's extended-L2 option lives in its volumes: the overlay has extended L2
        entries when PARENT has (read from BELOW, else from PARENT's header).  DURABLE
        False: the new file's sync still runs when this returns (``image.create``); the
        caller calls ``sync_created()`` on the image before its catalog commit names it."""
        if below is not None:
            ext = below.extended_l2
        else:
            h = probe_header(self.abs(parent.path), parent.format) \
                if parent.format == "qcow2" else None
            ext = h is not None and bool(h.extended_l2)
        img = image.create(self.abs(rel), size, format="qcow2", cluster_size=cluster_size,
                           backing=os.path.basename(parent.path),
                           backing_format=parent.format, backing_image=below,
                           extended_l2=ext, durable=durable)
        return self._verified(img) if verify else img
