"""Image: one open QCOW2 or RAW file with its backing chain.

The hot path lives in engine._core; this class decides what a call means (zeroing whole
clusters, the chain to reopen, the header to rewrite) and shapes results the way qemu-img
shows them.  The core makes every check of an I/O call (open, read-only, range, buffer,
extended L2): nothing here repeats one.

Thread model: one Image may be read from many threads at once; writes, flushes and metadata
changes exclude each other and readers (a read-write lock inside the core).  ``close()`` and
the methods that re-read the header (``resize``, ``rebase``, ``check(repair=...)``) take that
lock exclusively: a call racing them on another thread either completes before them or, after
a close, raises ImageClosed; after a reload it sees the new state.  The GIL is released
during every copy but taken back after each call, so threads reading small pieces scale best
with ``readv`` batches (one crossing, one GIL handoff, for thousands of reads).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
import threading
from typing import TYPE_CHECKING, Any, Callable, Literal, overload

from engine import _core
from engine._core import CoreImage
from engine import check as _check
from engine import destination as _destination
from engine import format as fmt
from engine.check import CheckResult
from engine.errors import (
    ChainError,
    CorruptImage,
    EngineError,
    ImageClosed,
    InvalidArgument,
    ReadOnlyImage,
    UnsupportedFeature,
    io_error,
)
from engine.image.chain import _attach_chain, _geometry, _open_image, _Options, \
    _validate_snapshots, _virtual_size
from engine.image.extent import BS_COMPRESSED, BS_DATA, BS_OFFSET, BS_PRESENT, BS_ZERO, \
    Extent
from engine.image.files import _check_file_length, _read_head
from engine.metaio import meta_sync, meta_write as _meta_write
from engine.image.locks import _Lock
from engine.image.naming import _check_backing_name

if TYPE_CHECKING:
    from typing_extensions import Buffer


#: The refcount table's offset and size in clusters: header bytes 48..59 (qcow2.txt,
#: "Header").
_RT_FIELDS, _RT_FIELDS_AT = struct.Struct(">QI"), 48

#: depth, bottom and first corrupt image of a backing chain (see ``Image._below``)
_BelowFacts = tuple[int, "Image | None", "Image | None"]


class Image:
    """An open QCOW2 or RAW image with its backing chain (use :func:`open` / :func:`create`).

    Reads go through the whole chain; writes go to this image only.  Sizes and offsets are
    bytes.  Use as a context manager, or call :meth:`close`.
    """

    # state (set by _new; a reload swaps _core, _header and the chain together)
    _path: str
    _fd: int
    _format: str
    _header: fmt.Header | None
    _core: CoreImage
    _backing: Image | None
    _backing_path: str | None
    _readonly: bool
    _lock: _Lock
    _closed: bool
    _released: bool
    _close_lock: threading.Lock
    _in_use: tuple[int, int]
    _opts: _Options
    #: (the backing image they were worked out for, _Below facts of the chain under it)
    _below_memo: tuple[Image, _BelowFacts] | None
    #: create(durable=False): the sync of the new file and its name, not waited for yet
    _created: Any

    def __init__(self) -> None:  # built by _open_image only
        raise TypeError("use engine.open() or engine.create()")

    # construction ---------------------------------------------------------------------
    @classmethod
    def _new(cls, path: str, fd: int, fmt_name: str, header: fmt.Header | None,
             core: CoreImage, backing: Image | None, readonly: bool, lock: _Lock,
             backing_path: str | None) -> Image:
        self = object.__new__(cls)
        self._path = path
        self._fd = fd
        self._format = fmt_name
        self._header = header
        self._bind(core)
        self._backing = backing
        self._readonly = readonly
        self._lock = lock
        self._backing_path = backing_path
        self._below_memo = None
        self._created = None
        self._closed = False
        self._released = False
        self._close_lock = threading.Lock()
        self._in_use = _destination.register_fd(fd)   # files in use are never export targets
        return self

    def _bind(self, core: CoreImage) -> None:
        # readinto and write are the core's own methods, bound per image: the core makes
        # every check (closed, read-only, range, buffer, extended L2) and raises typed
        # errors, and a small read or write skips one Python frame (about a tenth of its
        # cost). The methods of the same name below document them and serve subclasses.
        core.path = self._path
        self._core = core
        self.readinto = core.readinto   # type: ignore[method-assign]
        self.write = core.write         # type: ignore[method-assign]

    # properties -------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._path

    @property
    def format(self) -> str:
        return self._format

    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        self._check_usable()
        return _virtual_size(self._header) if self._header is not None else self._core.file_size

    @property
    def cluster_size(self) -> int | None:
        """Bytes per cluster (None for raw)."""
        return self._header.cluster_size if self._header is not None else None

    @property
    def extended_l2(self) -> bool:
        """Whether the image has extended L2 entries (32 subclusters per cluster)."""
        return self._header is not None and bool(self._header.extended_l2)

    @property
    def backing(self) -> Image | None:
        return self._backing

    @property
    def backing_name(self) -> str | None:
        return self._header.backing_file if self._header is not None else None

    @property
    def backing_format(self) -> str | None:
        return self._header.backing_format if self._header is not None else None

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def header(self) -> fmt.Header | None:
        """The parsed QCOW2 header (None for raw)."""
        return self._header

    def chain(self) -> list[Image]:
        """This image and its backing files, top first."""
        out: list[Image] = []
        img: Image | None = self
        while img is not None:
            out.append(img)
            img = img._backing
        return out

    @property
    def chain_depth(self) -> int:
        """How many images the chain holds, this one included (1: no backing file)."""
        return self._below()[0] + 1

    def bottom(self) -> Image:
        """The last image of the chain (this one, without a backing file)."""
        return self._below()[1] or self

    def first_corrupt(self) -> Image | None:
        """The first image of the chain, top first, whose header has the corrupt bit set
        (None: none has)."""
        if self._header is not None and self._header.corrupt:
            return self
        return self._below()[2]

    def _below(self) -> _BelowFacts:
        """(depth, bottom, first corrupt image) of the backing chain under this image, in
        constant time: each image keeps them for its backing image, worked out once from the
        backing image's own (a chain opened, or a new image stacked on one, walks only what
        has none yet).  Images under the top are read-only: their headers and links do not
        change while they are open; a reload or rebase of the top links a new backing image,
        for which the facts are worked out again."""
        stack: list[Image] = []
        img: Image = self
        while True:
            b = img._backing
            if b is None:
                facts: _BelowFacts = (0, None, None)
                break
            memo = img._below_memo
            if memo is not None and memo[0] is b:
                facts = memo[1]
                break
            stack.append(img)
            img = b
        for above in reversed(stack):        # img is the backing image of above
            depth, bottom, bad = facts
            corrupt = img._header is not None and img._header.corrupt
            facts = (depth + 1, bottom or img, img if corrupt else bad)
            above._below_memo = (img, facts)
            img = above
        return facts

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("ro" if self._readonly else "rw")
        return f"<engine.Image {self._path!r} {self._format} {state}>"

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not getattr(self, "_closed", True):
                self.close()
        except Exception:
            pass

    # checks -----------------------------------------------------------------------------
    def _check_usable(self, write: bool = False) -> None:
        """ImageClosed after close(); with ``write``, ReadOnlyImage on a read-only image. For
        the calls that do not go through the core's I/O checks (metadata, rebase, resize)."""
        if self._closed:
            raise ImageClosed("image is closed", path=self._path)
        if write and self._readonly:
            raise ReadOnlyImage("image is open read-only", path=self._path)

    # I/O ----------------------------------------------------------------------------------
    def readinto(self, offset: int, buf: Buffer) -> int:
        """Fill ``buf`` (any writable C-contiguous buffer: bytearray, memoryview, numpy
        array of any dtype) with the guest bytes at ``offset``. Returns the number of bytes
        read (the buffer's size in bytes). Safe to call from several threads at once."""
        return self._core.readinto(offset, buf)

    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` guest bytes at ``offset``, read through the chain."""
        offset, length = self._core.check_range(offset, length)
        buf = bytearray(length)
        if length:
            self._core.readinto(offset, buf)
        return bytes(buf)

    def readv(self, offsets: object, length: int, out: Buffer | None = None) -> Any:
        """Batch read: ``length`` bytes at each offset of ``offsets`` (a 1-D numpy array of an
        integer dtype, or a sequence of ints), into consecutive slices of ``out`` (any
        writable C-contiguous buffer; a uint8 array is allocated when None). One crossing
        into the core for the whole batch. Returns ``out``."""
        return self._core.readv(offsets, length, out)

    def write(self, offset: int, data: Buffer) -> int:
        """Write ``data`` (any C-contiguous buffer, taken as raw bytes) at ``offset``.
        Returns its size in bytes. Durable after :meth:`flush`."""
        return self._core.write(offset, data)

    def writev(self, offsets: object, length: int, data: Buffer) -> None:
        """Batch write: consecutive ``length``-byte slices of ``data`` (any C-contiguous
        buffer) to each offset (as for :meth:`readv`)."""
        self._core.writev(offsets, length, data)

    def _aligned_span(self, offset: int, length: int, c: int) -> tuple[int, int]:
        """The whole clusters (of ``c`` bytes) inside [offset, offset+length); a partial last
        cluster at the end of the disk counts as whole."""
        start = -(-offset // c) * c
        end = offset + length
        if end != self.size:
            end = end // c * c
        return start, max(start, end)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make [offset, offset+length) read as zeros. With QCOW2 v3 whole clusters get the
        zero flag (their allocation kept, or freed with ``unmap=True``), and with extended L2
        entries whole subclusters their zero bits; partial ones are written with zero
        bytes."""
        offset, length = self._core.check_range(offset, length, write=True)
        if length == 0:
            return
        if self._header is None:
            self._core.raw_punch(offset, length)
            return
        start, end = self._aligned_span(offset, length, self._header.subcluster_size)
        if self._header.version < 3 or start >= end:
            if self._header.version < 3 and unmap and self._backing is None and start < end:
                self._core.zero_clusters(start, end - start, _core.ZERO_DISCARD)
                self._core.write_zero_bytes(offset, start - offset)
                self._core.write_zero_bytes(end, offset + length - end)
            else:
                self._core.write_zero_bytes(offset, length)
            return
        if start > offset:
            self._core.write_zero_bytes(offset, start - offset)
        self._core.zero_clusters(start, end - start,
                                 _core.ZERO_UNMAP if unmap else _core.ZERO_KEEP)
        if offset + length > end:
            self._core.write_zero_bytes(end, offset + length - end)

    def discard(self, offset: int, length: int) -> None:
        """Drop the mapping of the whole clusters (subclusters, with extended L2 entries)
        inside the range, so the backing file (or zeros, without one) shows through there.
        Partial ones are left as they are."""
        offset, length = self._core.check_range(offset, length, write=True)
        if self._header is None:
            self._core.raw_punch(offset, length)
            return
        start, end = self._aligned_span(offset, length, self._header.subcluster_size)
        if start < end:
            self._core.zero_clusters(start, end - start, _core.ZERO_DISCARD)

    def flush(self) -> None:
        """Make every write issued before this call durable (D1). A failed flush is sticky."""
        self._core.flush()      # checks open; a read-only image has nothing to write back
        if self._created is not None:
            self.sync_created()

    def sync_created(self) -> None:
        """Wait until the file ``create(..., durable=False)`` made, and its name, are
        durable (the sync ran meanwhile on a helper thread); nothing to do for any other
        image, or the second time.

        Raises:
            EngineIOError: the sync failed: the file may not survive a crash.
        """
        err = self._wait_created()
        if err is not None:
            raise io_error(err.errno or errno.EIO, "cannot write the new image",
                           path=self._path) from None

    def _wait_created(self) -> OSError | None:
        sync = self._created            # its wait is idempotent and thread-safe
        return sync.wait() if sync is not None else None

    def close(self) -> None:
        """Flush, trim the file, unmap, release locks; close the backing chain. Idempotent.
        Calls in progress on other threads finish first; later ones raise ImageClosed."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        err: EngineError | None = None
        try:
            self.sync_created()
        except EngineError as e:
            err = e
        try:
            # flush, trim and unmap under one exclusive hold of the core's lock
            self._core.close(flush=not self._readonly)
        except EngineError as e:
            err = err or e
        finally:
            img: Image | None = self
            while img is not None:          # a loop: chains may be 1000 deep
                img._release()
                img = img._backing
        if err is not None:
            raise err

    def reopen_readonly(self) -> Image:
        """Turn this image read-only in place, over the backing chain it holds, and return
        it: it is flushed and trimmed, its lock turns a reader's (QEMU's lock bytes), and its
        header is read again (a write may have moved tables).  What a new overlay is stacked
        on (``create(..., backing_image=)``) when the image written until now becomes a
        backing file: no file is opened, whatever the chain's depth.  A read-only image is
        returned as it is.

        Raises:
            what :meth:`flush` raises (the image is then closed, with its chain).
        """
        self._check_usable()
        if self._readonly:
            return self
        try:
            self._core.make_readonly()      # flush and trim first, as close() does
            self._lock.downgrade()
            self._readonly = True
            if self._header is not None:
                # the one change the core makes to the header while writing: a grown
                # refcount table's offset and size (a resize reloads the header itself)
                try:
                    rt = os.pread(self._fd, _RT_FIELDS.size, _RT_FIELDS_AT)
                except OSError as e:
                    raise io_error(e.errno or errno.EIO, "cannot read the header",
                                   path=self._path) from None
                offset, clusters = _RT_FIELDS.unpack(rt)
                self._header = dataclasses.replace(
                    self._header, refcount_table_offset=offset,
                    refcount_table_clusters=clusters)
        except BaseException:
            try:
                self.close()
            except EngineError:
                pass                # the first error is the one to report
            raise
        return self

    def close_above(self, path: str) -> Image | None:
        """Close this image and the images of its chain above the file PATH, which stays
        open (read-only, with the chain under it) and is returned, owned by the caller from
        then on: what a new overlay is stacked on when the top of a chain is dropped for an
        older point (a revert).  None, with the whole chain closed, when no backing image of
        this one is PATH.

        Raises:
            what :meth:`close` raises; the image of PATH is then closed too.
        """
        above: Image = self                 # walk down to PATH only: what lies above it
        keep = self._backing
        while keep is not None and keep._path != path:
            above, keep = keep, keep._backing
        if keep is None:
            self.close()
            return None
        above._backing = None               # close() stops above KEEP
        try:
            self.close()
        except BaseException:
            keep.close()
            raise
        return keep

    def _release(self) -> None:
        with self._close_lock:
            if self._released:
                return
            self._released = self._closed = True
        self._wait_created()
        _destination.unregister(self._in_use)
        self._core.close()
        os.close(self._fd)
        self._lock.release()

    # metadata ---------------------------------------------------------------------------
    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """Allocation runs over the range, merged as ``qemu-img map --output=json`` merges
        them (one run per change of depth/zero/data/offset-contiguity; the core's block
        status does the merging)."""
        offset, n = self._core.check_range(offset, 0 if length is None else length)
        if length is None:
            n = self.size - offset      # check_range found offset inside the disk
        if n == 0:
            return []
        runs = self._core.block_status(offset, n).tolist()
        out = []
        for start, ln, depth, flags, off in runs:
            present = bool(flags & BS_PRESENT)
            out.append(Extent(start, ln, bool(flags & BS_DATA), bool(flags & BS_ZERO), depth,
                              off if flags & BS_OFFSET else None, present,
                              bool(flags & BS_COMPRESSED)))
        return out

    @overload
    def info(self, *, backing_chain: Literal[False] = False) -> dict[str, Any]: ...
    @overload
    def info(self, *, backing_chain: Literal[True]) -> list[dict[str, Any]]: ...
    @overload
    def info(self, *, backing_chain: bool) -> dict[str, Any] | list[dict[str, Any]]: ...

    def info(self, *, backing_chain: bool = False) -> dict[str, Any] | list[dict[str, Any]]:
        """``qemu-img info --output=json`` for this image (a list, top first, with
        ``backing_chain=True``)."""
        self._check_usable()
        if fmt.bool_arg(backing_chain, "backing_chain"):
            return [img.info() for img in self.chain()]
        st = os.fstat(self._fd)
        d: dict[str, Any] = {"filename": self._path, "format": self._format,
                             "virtual-size": self.size, "actual-size": st.st_blocks * 512,
                             "dirty-flag": False}
        h = self._header
        if h is None:
            return d
        d["dirty-flag"] = bool(h.dirty)
        d["cluster-size"] = h.cluster_size
        if h.backing_file is not None:
            d["backing-filename"] = h.backing_file
            d["full-backing-filename"] = (self._backing_path if self._backing_path is not None
                                          else os.path.join(os.path.dirname(self._path), h.backing_file))
            if h.backing_format is not None:
                d["backing-filename-format"] = h.backing_format
        snaps = self.snapshots()
        if snaps:
            d["snapshots"] = snaps
        d["format-specific"] = {"type": "qcow2", "data": fmt.info_fields(h)}
        return d

    def snapshots(self) -> list[dict[str, Any]]:
        """Internal snapshots (qemu-img info's SnapshotInfo objects)."""
        h = self._header
        if h is None or not h.nb_snapshots:
            return []
        size = self._core.file_size
        if h.snapshots_offset >= size:
            raise CorruptImage("snapshot table past the end of the file", path=self._path)
        buf = os.pread(self._fd, min(size - h.snapshots_offset, fmt.MAX_SNAPSHOTS_SIZE),
                       h.snapshots_offset)
        out = []
        for s in fmt.parse_snapshot_table(buf, h):
            e = {"id": s.id, "name": s.name, "vm-state-size": s.vm_state_size,
                 "date-sec": s.date_sec, "date-nsec": s.date_nsec,
                 "vm-clock-sec": s.vm_clock_nsec // 10**9,
                 "vm-clock-nsec": s.vm_clock_nsec % 10**9}
            if s.icount is not None:
                e["icount"] = s.icount
            out.append(e)
        return out

    def check(self, repair: str | None = None) -> CheckResult:
        """Consistency check with ``qemu-img check`` semantics; see engine.check.CheckResult.
        ``repair`` is None, "leaks" or "all" (needs a read-write image)."""
        self._check_usable()
        if repair is not None and (not isinstance(repair, str) or repair not in ("leaks", "all")):
            raise InvalidArgument(f"repair must be None, 'leaks' or 'all', not {repair!r}",
                                  value=repair)
        if self._header is None:
            raise UnsupportedFeature("check of raw images", "raw images have no metadata to "
                                     "check (qemu-img check exits 63)", path=self._path)
        if repair is not None:
            self._check_usable(write=True)
            # the repair rewrites metadata under the core: nothing may use it meanwhile
            core, err, stale = self._core, None, False
            core.lock_exclusive(flush=True, trim=True)
            try:
                try:
                    res = _check.check_file(self._fd, filename=self._path, repair=repair)
                except EngineError as e:
                    err = e         # stopped part-way: the core's view may not match the file
                try:
                    self._reload_locked()
                except EngineError:
                    stale = True    # the old view stays wrong: the handle is closed below
                    if err is None:
                        raise
            finally:
                core.unlock_exclusive()
                if stale:
                    core.close()
            if err is not None:
                self._failed_sync(err)
                raise err
            return res
        if not self._readonly:
            # the check reads the file: write back what is cached first
            self._core.flush()
            self._core.trim()
        return _check.check_file(self._fd, filename=self._path, repair=repair)

    def rebase(self, backing_name: str | None, backing_format: str | None = None, *,
               allow_unsafe_backing: bool = False) -> None:
        """Change the backing file recorded in the header only, like ``qemu-img rebase -u``:
        the caller guarantees that the content stays right.

        The whole new chain is opened first, read-only, and checked as an open would check
        it: every file exists and has the format its overlay records, the backing policy
        allows every name, the chain does not loop (back to this image either) and is not
        deeper than ``max_chain_depth``.  Only then is the header rewritten.  A rebase that
        raises leaves the file byte for byte as it was.

        Arguments:
            backing_name (str | None): the new backing file, relative to this image's
                folder; None removes the backing file.
            backing_format (str | None): "raw" or "qcow2", required with a name (never
                probed); None without one.
            allow_unsafe_backing (bool): follow absolute, ``..`` and protocol names.

        Raises:
            InvalidArgument, UnsafeBackingReference, ImageNotFound, ImageFormatError,
            ChainError, ImageLocked (a file of the new chain), ReadOnlyImage,
            UnsupportedFeature (raw images have no header to record a backing file in),
            EngineIOError.
        """
        self._check_usable(write=True)
        fmt.bool_arg(allow_unsafe_backing, "allow_unsafe_backing")
        if self._header is None:
            raise UnsupportedFeature("backing files for raw images", path=self._path)
        if backing_name is None:
            if backing_format is not None:
                # QEMU refuses it too (EINVAL): a format names the backing file's format
                raise InvalidArgument("a backing format without a backing file",
                                      value=backing_format, path=self._path)
        else:
            if not isinstance(backing_name, str):
                raise InvalidArgument(f"backing_name must be a str or None, not "
                                      f"{type(backing_name).__name__}", value=backing_name)
            backing_format = fmt.choice_arg(backing_format, "backing format", fmt.FORMATS)
            self._open_new_chain(backing_name, backing_format, allow_unsafe_backing).close()
        def set_backing(h: fmt.Header) -> None:
            h.backing_file = backing_name
            h.backing_format = backing_format

        old_opts = self._opts
        if allow_unsafe_backing and not old_opts.allow_unsafe_backing:
            # the reload after the header write opens the new chain under this policy
            self._opts = dataclasses.replace(old_opts, allow_unsafe_backing=True)
        try:
            self.rewrite_header(set_backing)   # a name too long for the header raises unwritten
        except BaseException:
            self._opts = old_opts
            raise

    def rewrite_header(self, change: Callable[[fmt.Header], None]) -> None:
        """Change header fields directly: CHANGE gets the header as parsed from the file and
        edits it in place; the result is encoded as a new cluster 0, written, and the image
        reloaded on it.

        The one rule for header changes made beside the write path (``rebase``, and the
        ``engine.img`` verbs: ``amend``, ``create -u``, the dirty bit and table switches of
        internal snapshots): the header codec (:func:`engine.qcow2.header.encode_header`)
        encodes the new cluster 0, so a combination the format cannot hold (a name too long,
        a v2 header with v3 features) raises before anything is written; the core's pending
        writes are flushed first; a write or reload that fails puts the old bytes back, so
        the call that raises leaves the file as it was.

        Raises:
            UnsupportedFeature: a raw image (it has no header).
            ImageClosed, ReadOnlyImage, and what the header codec and the reload raise.
        """
        self._check_usable(write=True)
        if self._header is None:
            raise UnsupportedFeature("header changes on raw images", path=self._path)
        h = self._read_header()
        change(h)
        data = fmt.encode_header(h)
        self._core.flush()
        self._rewrite_header(data)

    def _open_new_chain(self, name: str, format: str, allow_unsafe: bool) -> "Image":
        """Open ``name`` and its chain read-only, as the backing file of this image would be
        opened (the caller closes it)."""
        folder = os.path.dirname(self._path) or "."
        full = _check_backing_name(name, folder, allow_unsafe)
        depth = self._opts.max_chain_depth
        if depth < 1:
            raise ChainError(f"backing chain deeper than {depth} images", path=self._path)
        # the locks of a normal open too: a new backing file that another process writes is
        # refused here, before the header changes, not by the reopen after it.  An image
        # opened without its chain (backing=False: its caller holds the chain's files, as the
        # repository does during a merge) never opens the new chain, so it is validated
        # without taking locks.
        opts = dataclasses.replace(self._opts, backing=True, allow_unsafe_backing=allow_unsafe,
                                   max_chain_depth=depth - 1,
                                   force_share=self._opts.force_share or not self._opts.backing)
        st = os.fstat(self._fd)
        return _open_image(Image, full, format, True, opts, {(st.st_dev, st.st_ino)})

    def resize(self, new_size: int) -> None:
        """Grow the virtual disk to ``new_size`` bytes (shrinking is refused).

        Refused as QEMU refuses it: a qcow2 size that is not a multiple of 512, a v2
        (compat 0.10) image with internal snapshots (a v2 snapshot does not record its disk
        size, so it could not be applied any more), a size over the format's maximum.

        Raises:
            InvalidArgument, UnsupportedFeature ("shrink", "resize of a v2 image with
            snapshots"), ReadOnlyImage, EngineIOError.
        """
        self._check_usable(write=True)
        h = self._header
        new_size = fmt.check_virtual_size(
            new_size, self._format, cluster_size=h.cluster_size if h else fmt.DEFAULT_CLUSTER_SIZE,
            extended_l2=bool(h.extended_l2) if h else False, what="new size")
        if h is not None and new_size % fmt.SECTOR_SIZE:
            raise InvalidArgument(f"the new size must be a multiple of {fmt.SECTOR_SIZE} bytes, "
                                  f"not {new_size}", value=new_size, path=self._path)
        if h is not None and h.version < 3 and h.nb_snapshots:
            raise UnsupportedFeature(
                "resize of a v2 image with snapshots", "can't resize a v2 (compat 0.10) image "
                "which has internal snapshots: they do not record their disk size, so they "
                "could not be applied after the resize", path=self._path,
                hint="upgrade it with 'qemu-img amend -o compat=1.1', or delete its snapshots")
        if new_size < self.size:
            raise UnsupportedFeature("shrink", "shrinking an image is not supported",
                                     path=self._path)
        if h is None:
            _check_file_length(new_size, os.path.dirname(self._path) or ".", "new size")
            self._core.flush()
            try:
                _core.meta_ftruncate(self._fd, new_size)
            except OSError as e:
                raise io_error(e.errno or errno.EIO, "cannot grow the image file",
                               path=self._path) from None
            try:
                meta_sync(self._fd, self._path)     # the new size is durable when this returns
            except EngineError as e:
                self._failed_sync(e)
                raise
            self._reload()
            return
        per_l1 = h.cluster_size * h.l2_entries
        self._core.grow_l1(-(-new_size // per_l1), new_size)
        self._reload()

    # header I/O -----------------------------------------------------------------------------
    def _read_header(self) -> fmt.Header:
        head, size = _read_head(self._fd, self._path)
        return fmt.parse_header(head, size, path=self._path)

    def _write_header_bytes(self, data: bytes) -> None:
        try:
            _meta_write(self._fd, data, 0, self._path)
        except EngineError as e:
            self._failed_sync(e)
            raise

    def _failed_sync(self, e: EngineError) -> None:
        """After metadata written beside the core failed to sync, every later flush of this
        handle fails, as after a failed sync of the core: reopen and check."""
        if getattr(e, "sync_failed", False):
            self._core.poison(getattr(e, "errno", 0) or errno.EIO)

    def _rewrite_header(self, data: bytes) -> None:
        """Write a new cluster 0 and reopen on it; if either fails, put the old bytes back,
        so that the operation that raises leaves the file as it was."""
        old = os.pread(self._fd, len(data), 0)
        try:
            self._write_header_bytes(data)
            self._reload()
        except BaseException:
            # after a failed sync the handle is poisoned: the old bytes are written back
            # and the reload's flush then refuses, leaving the handle failed, as it must be
            try:
                self._write_header_bytes(old)
                self._reload()
            except EngineError:
                pass            # the first error is the one to report
            raise

    def _reload(self) -> None:
        """Re-read the header and re-map after a metadata change made outside the core."""
        self._core.lock_exclusive()
        try:
            self._reload_locked()
        finally:
            self._core.unlock_exclusive()

    def _reload_locked(self) -> None:
        """The reload proper, with the core held by lock_exclusive(): build a new core and
        backing chain from the file, then swap them in whole (readers on other threads see
        the old state or the new one, never a core without its chain). On failure the old
        state stays."""
        head, size = _read_head(self._fd, self._path)
        header = None
        if self._format == "raw":
            core = _core.CoreImage(self._fd, not self._readonly, None)
        else:
            header = fmt.parse_header(head, size, path=self._path)
            snap_size = _validate_snapshots(self._fd, self._path, header, size)
            core = _core.CoreImage(self._fd, not self._readonly, _geometry(header, snap_size))
        core.path = self._path
        # a stand-in carries the new core while its chain is attached (it owns nothing)
        new = object.__new__(Image)
        new._path, new._header, new._core, new._closed = self._path, header, core, True
        new._backing = new._backing_path = None
        st = os.fstat(self._fd)
        try:
            _attach_chain(new, self._opts, {(st.st_dev, st.st_ino)})
        except BaseException:
            core.close()
            raise
        self._core.adopt(core)
        old = self._backing
        self._header = header
        self._backing, self._backing_path = new._backing, new._backing_path
        if old is not None:
            old.close()
