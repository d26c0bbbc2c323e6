"""Metadata changes the engine's write path does not make (internal snapshots, compressed
clusters), made safe by the rule QEMU itself follows for lazy refcounts.

The rule: while incompatible bit 0 ("dirty") is set, refcounts may be stale, and whoever
opens the image read-write repairs it first (QEMU and :func:`engine.open` both run a full
``check -r all``).  A change here therefore (1) sets the dirty bit (v3 images), (2) writes
new tables into clusters past the end of the file and switches the header to them,
without touching refcounts, and (3) runs the engine's repair (:mod:`engine.check`), which
recomputes every refcount and COPIED flag from the references, as ``qemu-img check -r all``
does, and clears the dirty bit.  A crash at any point leaves either the old image or a
dirty image that the next read-write open repairs into the new one.  (v2 images have no
dirty bit: a crash between (2) and (3) leaves refcounts that ``check -r all`` repairs.)

The one place the verbs write metadata beside the core: the image stays open (its QEMU
lock held) through :class:`MetaWriter`, which writes through its own descriptor.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import TYPE_CHECKING, Callable

from engine.errors import CorruptImage, EngineError, io_error
from engine.ops._hooks import kill_point
from engine.qcow2.header import Header
from engine.qcow2.spec import INCOMPAT_DIRTY

if TYPE_CHECKING:
    from engine.image import Image


class MetaWriter:
    """Raw metadata writes into IMG (open read-write), closed by a repair pass.

    Use as a context manager: on entry the dirty bit is set (v3); :meth:`alloc` hands out
    cluster-aligned space past the end of the file; :meth:`pwrite` writes; :meth:`publish`
    changes header fields; on a clean exit everything is synced and the repair runs.  An
    exception before :meth:`publish` and before any write inside the old file truncates
    the new clusters away and clears the dirty bit again: the file is byte for byte as it
    was.  Later, the image stays dirty and its next read-write open repairs it.
    """

    def __init__(self, img: Image) -> None:
        self.img = img
        h = img.header
        assert h is not None
        self.cluster_size: int = h.cluster_size
        self.fd = -1
        self.end = 0
        self.start_size = 0
        self.published = False
        self.touched = False        # written inside the old file (not undone on failure)

    def __enter__(self) -> MetaWriter:
        self.img.flush()
        try:
            self.fd = os.open(self.img.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise io_error(e.errno or 0, "cannot open the image", path=self.img.path) from None
        self.start_size = self.end = os.fstat(self.fd).st_size
        self.dirty_set = self.img.header is not None and self.img.header.version >= 3 \
            and not self.img.header.dirty
        if self.dirty_set:
            try:
                self.img.rewrite_header(_set_dirty)
            except BaseException:
                os.close(self.fd)
                raise
        kill_point("img.meta.dirty")
        return self

    def alloc(self, nbytes: int) -> int:
        """Cluster-aligned room for NBYTES past everything allocated so far: its offset."""
        c = self.cluster_size
        off = -(-self.end // c) * c
        self.end = off + -(-max(nbytes, 1) // c) * c
        return off

    def reserve_to(self, offset: int) -> None:
        """Bytes up to OFFSET are used (byte-granular writes, e.g. compressed clusters):
        the file is at least that long, and the next :meth:`alloc` starts at the first
        cluster boundary at or after it."""
        self.end = max(self.end, offset)

    def pread(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def pwrite(self, offset: int, data: bytes) -> None:
        if offset < self.start_size:
            self.touched = True
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(self.fd, data[done:], offset + done)
        except OSError as e:
            raise io_error(e.errno or 0, "cannot write metadata", path=self.img.path) from None

    def sync(self) -> None:
        try:
            if os.fstat(self.fd).st_size < self.end:
                os.ftruncate(self.fd, self.end)
            os.fsync(self.fd)
        except OSError as e:
            raise io_error(e.errno or 0, "cannot sync the image", path=self.img.path) from None

    def publish(self, change: Callable[[Header], None]) -> None:
        """Sync what was written, then apply CHANGE to the header (the switch)."""
        self.sync()
        kill_point("img.meta.written")
        self.published = True
        self.img.rewrite_header(change)
        kill_point("img.meta.published")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                self.sync()
            elif not self.published:
                self._undo()
        finally:
            os.close(self.fd)
        if exc_type is None:
            kill_point("img.meta.synced")
            res = self.img.check(repair="all")
            if res.corruptions or res.check_errors:
                raise CorruptImage("the repair after the metadata change left "
                                   f"{res.corruptions} corruptions", path=self.img.path)


    def _undo(self) -> None:
        """Before the switch nothing refers to the new clusters: drop them and the dirty
        bit, so the file is as it was (best effort: if this fails too, the dirty image is
        repaired by its next read-write open).  After a write inside the old file the
        image stays dirty: its next read-write open repairs it."""
        if self.touched:
            return
        try:
            os.ftruncate(self.fd, self.start_size)
            os.fsync(self.fd)
            if self.dirty_set:
                self.img.rewrite_header(_clear_dirty)
        except (OSError, EngineError):
            pass


def _clear_dirty(h: Header) -> None:
    h.incompatible_features &= ~INCOMPAT_DIRTY


def _set_dirty(h: Header) -> None:
    h.incompatible_features |= INCOMPAT_DIRTY
