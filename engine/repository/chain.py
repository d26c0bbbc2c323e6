"""Chain: one virtual disk of a repository, and the owner of its leaf handle."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from engine.catalog import ChainRow
from engine.errors import ImageClosed, NotFound
from engine.repository import operations
from engine.repository.values import (DiffResult, ExportResult, MergeResult, PathArg,
                                      Progress, Snapshot, Volume)

if TYPE_CHECKING:
    from engine.image import Extent, Image
    from engine.repository.context import Context
    from engine.repository.leases import Lease
    from engine.repository.repo import Repository


class Chain:
    """One virtual disk: its volumes (base first, leaf last) and its snapshots.

    Reads and writes go to the leaf, through the whole chain.  Get chains from
    ``Repository.create_chain``, ``Repository.chain`` or ``Chain.clone``; a chain belongs to
    its repository's thread.  ``close()`` flushes and releases the leaf; after it any call
    raises ImageClosed (``repo.chain(name)`` gives a new handle).
    """

    def __init__(self, repo: Repository, ctx: Context, name: str):
        self._repo = repo
        self._ctx = ctx
        self._name = name
        self._img: Image | None = None
        self._closed = False
        self._views: weakref.WeakSet[Image] = weakref.WeakSet()

    # --- metadata ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def repository(self) -> Repository:
        return self._repo

    def _row(self) -> ChainRow:
        self._check_open()
        return self._ctx.chain_row(self._name)

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
        with self._ctx.cat.read():
            return self._ctx.chain_volumes(self._name)

    @property
    def leaf(self) -> Volume:
        """The writable volume."""
        self._check_open()
        with self._ctx.cat.read():
            row = self._row()
            return self._ctx.volume_of(self._ctx.volume_row(row.leaf))

    @property
    def snapshots(self) -> list[Snapshot]:
        """The chain's snapshots, oldest first."""
        self._check_open()
        return [self._ctx.snapshot_of(r) for r in self._ctx.cat.snapshots(self._name)]

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        """The snapshot with that id (or a unique prefix of it, 4 characters or more)."""
        self._check_open()
        return self._ctx.snapshot_of(self._ctx.find_snapshot(self._name, snapshot_id))

    @property
    def previewing(self) -> Snapshot | None:
        """The snapshot being previewed, or None."""
        self._check_open()
        with self._ctx.cat.read():
            row = self._row()
            if not row.preview:
                return None
            snap = self._ctx.cat.snapshot(row.preview)
        if snap is None:
            raise NotFound(f"chain {self._name!r}: the previewed snapshot {row.preview} is "
                           "not in the catalog")
        return self._ctx.snapshot_of(snap)

    @property
    def origin(self) -> tuple[str, str] | None:
        """For a clone, (origin chain name, snapshot id); None otherwise."""
        row = self._row()
        if row.origin_chain is None or row.origin_snapshot is None:
            return None
        return row.origin_chain, row.origin_snapshot

    def to_dict(self) -> dict[str, Any]:
        """The chain as the CLI's JSON shows it."""
        self._check_open()
        with self._ctx.cat.read():
            return self._to_dict()

    def _to_dict(self) -> dict[str, Any]:
        row = self._row()
        d = {
            "name": row.name, "size": row.size, "cluster_size": row.cluster_size,
            "created": row.created, "leaf": row.leaf, "previewing": row.preview,
            "origin": (None if row.origin_chain is None else
                       {"chain": row.origin_chain, "snapshot": row.origin_snapshot}),
            "volumes": [v.to_dict() for v in self.volumes],
            "snapshots": [s.to_dict() for s in self.snapshots],
        }
        holder = self._ctx.holder_of(row.name)    # a shared repository: the write lease
        if holder is not None:
            d["holder"] = holder
        return d

    # --- data path --------------------------------------------------------------------------

    def _image(self, write: bool = False) -> Image:
        """The leaf handle, opened on first use. With write leases (a catalog shared by
        several hosts) a write first checks the chain's lease (acquiring it), and the leaf
        is open read-write only while this host holds it."""
        ctx = self._ctx
        if write:
            self._check_open()
            ctx.check_lease(self._name)
        img = self._img
        if img is not None and write and img.readonly and not ctx.readonly:
            self.release_leaf()                  # opened for reading before the lease
            img = None
        if img is None:
            self._check_open()
            with ctx.cat.read():
                row = self._row()
                leaf = ctx.volume_row(row.leaf)
            ctx.check_not_blocked(self._name)
            readonly = ctx.readonly or (ctx.leases is not None and not write
                                        and self._name not in ctx.leased())
            img = self._img = ctx.open_volume(leaf, readonly=readonly)
        return img

    def read(self, offset: int, length: int) -> bytes:
        """LENGTH bytes of the disk at OFFSET (bytes), through the chain."""
        return self._image().read(offset, length)

    def readinto(self, offset: int, buffer: Any) -> int:
        """Fill BUFFER (any writable buffer) from the disk at OFFSET; returns bytes read."""
        return self._image().readinto(offset, buffer)

    def write(self, offset: int, data: Any) -> int:
        """Write DATA (any buffer) at OFFSET into the leaf."""
        return self._image(write=True).write(offset, data)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make the range read as zeros (zero clusters in the leaf; no data written)."""
        self._image(write=True).write_zeroes(offset, length, unmap=unmap)

    def discard(self, offset: int, length: int) -> None:
        """Drop the leaf's mapping of the whole clusters in the range: the snapshot below
        (or zeros, with no snapshot) shows through there."""
        self._image(write=True).discard(offset, length)

    def flush(self) -> None:
        """Make every write so far durable."""
        if self._img is not None and not self._img.readonly:
            self._ctx.check_lease(self._name)
            self._img.flush()
        else:
            self._check_open()

    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
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
        operations.resize(self._ctx, self, new_size)

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
        return operations.snapshot(self._ctx, self, description, force)

    def open_snapshot(self, snapshot_id: str) -> Image:
        """A read-only Image showing the disk exactly as it was at that snapshot.

        Close it when done (it is also closed with the chain).  While it is open, deleting
        that snapshot or the next one fails with ImageLocked.

        Raises:
            NotFound: no such snapshot (in a read-only repository, also: another process
                deleted it meanwhile).
        """
        self._check_open()
        with self._ctx.cat.read():
            row = self._ctx.snapshot_volume(self._ctx.find_snapshot(self._name,
                                                                    snapshot_id))
        img = self._ctx.open_volume(row, readonly=True)
        self._views.add(img)
        return img

    def revert(self, snapshot_id: str) -> None:
        """Make the disk read what it read at that snapshot.  Unsnapshotted writes and the
        snapshots newer than it are dropped (volumes a clone uses are kept for the clone).
        The disk gets the snapshot's size: reverting to a snapshot taken before a resize
        makes the disk that smaller size again (the new leaf is an overlay of the snapshot's
        volume, at its size)."""
        operations.revert(self._ctx, self, snapshot_id)

    def preview(self, snapshot_id: str) -> None:
        """Run on that snapshot's content for a while (writes go to a new leaf over it),
        keeping the current leaf aside; then ``commit_preview`` or ``undo_preview``.  The
        disk has the snapshot's size during the preview (as after ``revert``); undo gives it
        back the size of the leaf kept aside."""
        operations.preview(self._ctx, self, snapshot_id)

    def commit_preview(self) -> None:
        """Keep the previewed state: like ``revert`` to the previewed snapshot, keeping the
        writes made during the preview."""
        operations.end_preview(self._ctx, self, keep=True)

    def undo_preview(self) -> None:
        """Drop the preview and its writes; the leaf kept aside is the leaf again."""
        operations.end_preview(self._ctx, self, keep=False)

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
        return operations.delete_snapshot(self._ctx, self, snapshot_id, progress)

    def clone(self, snapshot_id: str, name: str) -> "Chain":
        """A new chain NAME whose disk starts as that snapshot's content (a linked clone).

        The clone's leaf is a new overlay on the snapshot's volume; the volumes below are
        shared and read-only, and writes on either side stay on that side.
        """
        return operations.clone(self._ctx, self, snapshot_id, name)

    def export(self, path: PathArg | int, *, format: str = "raw", snapshot_id: str | None = None,
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
        return operations.export(self._ctx, self, path, format, snapshot_id, progress, overwrite,
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
        return operations.diff(self._ctx, self, from_snapshot_id, to_snapshot_id)

    # --- lifetime ---------------------------------------------------------------------------

    # --- the leaf handle (for the repository's operations; the chain alone assigns it) ----

    def adopt_leaf(self, img: Image) -> None:
        """Take IMG, open read-write, as the leaf handle (an operation made the new leaf)."""
        self._img = img

    def take_leaf(self) -> Image | None:
        """Hand over the open leaf handle, if any (the chain holds none until
        ``adopt_leaf``): a snapshot stacks the new leaf on it."""
        img, self._img = self._img, None
        return img if img is not None and not img.closed else None

    def leaf_uses(self, paths: set[str]) -> bool:
        """The open leaf handle reads through one of the files PATHS."""
        img = self._img
        return img is not None and not img.closed and any(i.path in paths for i in img.chain())

    def release_leaf(self) -> None:
        """Flush and close the leaf handle (it reopens on the next I/O); a handle of a
        lost write lease is dropped unflushed (``abandon_leaf``)."""
        if not self._ctx.may_flush(self._name):
            self.abandon_leaf()
            return
        img, self._img = self._img, None
        if img is not None:
            img.close()

    def abandon_leaf(self) -> None:
        """Drop the leaf handle without writing anything more (no flush, no trim): the
        chain's write lease was lost, another host may write the leaf now."""
        img, self._img = self._img, None
        if img is not None:
            for i in img.chain():
                i._release()

    def _check_open(self) -> None:
        if self._closed:
            raise ImageClosed(f"chain {self._name!r} is closed")
        self._ctx.check_open()

    def take_lease(self, *, wait: float = 0) -> Lease | None:
        """Acquire the chain's write lease now (None without a shared catalog), waiting up
        to WAIT seconds for another host's lease to be released or to expire.  Taking it
        over from another host first finishes or undoes that host's interrupted operations
        on the chain.  Every write acquires it anyway; this makes the wait explicit.

        Raises:
            ChainLeased: another live host still holds it after WAIT seconds.
        """
        self._check_open()
        return self._ctx.lease(self._name, wait=wait)

    @property
    def lease(self) -> Lease | None:
        """The chain's write lease while this host holds it (a catalog shared by several
        hosts), else None."""
        return self._ctx.held_lease(self._name)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Flush and close the leaf and every image from open_snapshot. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for view in list(self._views):
            view.close()
        self.release_leaf()
        self._ctx.release_lease(self._name)

    def __enter__(self) -> "Chain":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Chain {self._name!r}{' closed' if self._closed else ''}>"
