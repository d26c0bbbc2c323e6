"""Image: one QCOW2 or RAW file, its backing chain, locks and policy.

The hot path lives in engine._core; this module opens files, validates headers (through
engine.format), decides what may be followed and written, and shapes results the way qemu-img
shows them.

Thread model: one Image may be read from many threads at once; writes, flushes and metadata
changes exclude each other and readers (a read-write lock inside the core).  ``close()`` and
the methods that re-read the header (``resize``, ``rebase``, ``check(repair=...)``) take that
lock exclusively: a call racing them on another thread either completes before them or, after
a close, raises ImageClosed; after a reload it sees the new state.  The GIL is released
during every copy but taken back after each call, so threads reading small pieces scale best
with ``readv`` batches (one crossing, one GIL handoff, for thousands of reads).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
import threading
import zlib
from typing import NamedTuple

import numpy as np

from engine import _core
from engine import destination as _destination
from engine import format as fmt
from engine.errors import (
    ChainError,
    CorruptImage,
    EngineError,
    ImageClosed,
    ImageFormatError,
    ImageLocked,
    ImageNotFound,
    InvalidArgument,
    ReadOnlyImage,
    SafetyLimitExceeded,
    UnsafeBackingReference,
    UnsupportedFeature,
    io_error,
)

#: Deepest backing chain we open by default (each level costs one file descriptor and one
#: mapping; reads recurse once per level on a miss).
MAX_CHAIN_DEPTH = 1024

#: Largest header area we read: cluster 0 can be at most 2 MiB.
_HEADER_READ = 2 << 20

_PROTOCOL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")

#: Below this many bytes every filesystem we can meet holds a file (FAT32's limit is 4 GiB
#: less one byte), so create and resize skip the probe of the filesystem's limit.
_FS_PROBE_FLOOR = 1 << 30


class Extent(NamedTuple):
    """A run of guest bytes with one allocation status; the fields mean what the fields of
    ``qemu-img map --output=json`` mean.

    Attributes:
        start (int): guest offset, bytes.   length (int): bytes.
        data (bool): reading touches stored data.   zero (bool): reads as zeros.
        depth (int): 0 = this image, 1 = its backing file, ...
        offset (int | None): host offset in the file at ``depth``, when the data sits there raw.
        present (bool): some layer allocates the range.   compressed (bool)
    """

    start: int
    length: int
    data: bool
    zero: bool
    depth: int
    offset: int | None
    present: bool = True
    compressed: bool = False

    def to_dict(self) -> dict:
        d = {"start": self.start, "length": self.length, "depth": self.depth,
             "present": self.present, "zero": self.zero, "data": self.data,
             "compressed": self.compressed}
        if self.offset is not None:
            d["offset"] = self.offset
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Extent":
        return cls(d["start"], d["length"], d["data"], d["zero"], d["depth"], d.get("offset"),
                   d.get("present", True), d.get("compressed", False))


# --- decompression (the one core path that crosses into Python, once per cluster) -----------

def _decompress(ctype: int, data: bytes, cluster_size: int) -> bytes:
    """Inflate one compressed cluster. Whatever this raises reaches the caller of the read
    as it is (the core adds the volume's path to an EngineError that has none), so every
    failure here is a typed error."""
    if ctype == 0:
        try:
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        except zlib.error as e:
            raise CorruptImage(f"compressed cluster does not decompress ({e})") from None
    elif ctype == 1:
        try:
            import zstandard
        except ImportError:
            raise UnsupportedFeature("zstd", "the image has zstd-compressed clusters and the "
                                     "'zstandard' module is not installed",
                                     hint="pip install zstandard") from None
        try:
            out = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        except zstandard.ZstdError as e:
            raise CorruptImage(f"compressed cluster does not decompress ({e})") from None
    else:
        raise UnsupportedFeature(f"compression type {ctype}")
    if len(out) < cluster_size:
        raise CorruptImage("compressed cluster inflates to less than one cluster")
    return out[:cluster_size]


_core.set_decompressor(_decompress)


# --- QEMU-compatible image locks (docs/on-disk.md section 9) ---------------------------------

_PERM_CONSISTENT_READ, _PERM_WRITE, _PERM_RESIZE = 0, 1, 3
_LOCK_BASE_USE, _LOCK_BASE_SHARE = 100, 200
_FLOCK = "=hh4xqqi4x"     # struct flock on 64-bit Linux


def _ofd(fd: int, cmd: int, ltype: int, byte: int) -> int:
    arg = struct.pack(_FLOCK, ltype, os.SEEK_SET, byte, 1, 0)
    res = fcntl.fcntl(fd, cmd, arg)
    return struct.unpack(_FLOCK, res)[0]


class _Lock:
    """QEMU's lock bytes on a dedicated descriptor: a read-write user takes 100, 101, 103 and
    201, 203; a reader takes 100 and 201, 203 (it does not share write or resize); a
    force-share reader takes 100 only."""

    def __init__(self, fd: int, path: str, writable: bool, force_share: bool):
        # The locks live on the image's own open file description (the core's dup shares
        # it); they go away when the last descriptor of it is closed.
        self.fd = fd
        use = [_PERM_CONSISTENT_READ] + ([_PERM_WRITE, _PERM_RESIZE] if writable else [])
        unshared = [] if force_share else [_PERM_WRITE, _PERM_RESIZE]
        try:
            for p in use:
                _ofd(self.fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _LOCK_BASE_USE + p)
            for p in unshared:
                _ofd(self.fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _LOCK_BASE_SHARE + p)
            for p in use:
                if _ofd(self.fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, _LOCK_BASE_SHARE + p) != fcntl.F_UNLCK:
                    raise ImageLocked(f'Failed to get "{_PERM_NAMES[p]}" lock', path=path)
            for p in unshared:
                if _ofd(self.fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, _LOCK_BASE_USE + p) != fcntl.F_UNLCK:
                    raise ImageLocked(f'Failed to get shared "{_PERM_NAMES[p]}" lock', path=path)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise ImageLocked("the image is locked by another process", path=path) from None
            raise io_error(e.errno or errno.EIO, "cannot lock the image", path=path) from None

    def release(self):
        # Dropped with the descriptor (Image.close); nothing to do separately.
        self.fd = -1


_PERM_NAMES = {0: "consistent read", 1: "write", 3: "resize"}


# --- argument checks (the public entry points refuse bad arguments with InvalidArgument) ------

def _path_arg(path, name: str = "path") -> str:
    try:
        p = os.fsdecode(os.fspath(path))
    except TypeError:
        raise InvalidArgument(f"{name} must be a str or os.PathLike, not "
                              f"{type(path).__name__}", value=path) from None
    if not p or "\0" in p:
        raise InvalidArgument(f"{name} {p!r} is empty or contains a NUL byte", value=path)
    return p


def _check_file_length(nbytes: int, folder: str, what: str) -> None:
    """The host's limits on a file of ``nbytes`` bytes in ``folder``, checked before any file
    is made or grown: the process's RLIMIT_FSIZE and the filesystem's largest file.

    Raises:
        InvalidArgument: over a limit (the message states it).
    """
    import resource
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY and nbytes > soft:
        raise InvalidArgument(f"{what} {fmt.size_text(nbytes)} is over this process's file "
                              f"size limit (RLIMIT_FSIZE) of {fmt.size_text(soft)}",
                              value=nbytes, hint="raise the limit ('ulimit -f') or use a "
                              "smaller size")
    if nbytes <= _FS_PROBE_FLOOR:
        return
    limit = _fs_max_file_size(folder, nbytes)
    if limit is not None and nbytes > limit:
        raise InvalidArgument(f"{what} {fmt.size_text(nbytes)} is over the largest file the "
                              f"filesystem at {os.path.abspath(folder)!r} holds: "
                              f"{fmt.size_text(limit)}", value=nbytes,
                              hint="use a smaller size, another filesystem, or a qcow2 image, "
                              "which grows only as data is written")


def _fs_max_file_size(folder: str, want: int) -> "int | None":
    """None if the filesystem of ``folder`` holds a (sparse) file of ``want`` bytes, else the
    largest size it holds.  Learnt on an unnamed temporary file (O_TMPFILE: nothing appears
    in the folder, nothing is left behind); None too where O_TMPFILE is not supported (the
    later ftruncate then reports EFBIG)."""
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except (OSError, AttributeError):
        return None
    try:
        try:
            os.ftruncate(fd, want)
            return None
        except OSError as e:
            if e.errno != errno.EFBIG:
                return None
        lo, hi = 0, want              # lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            try:
                os.ftruncate(fd, mid)
                lo = mid
            except OSError:
                hi = mid
        return lo
    finally:
        os.close(fd)


# --- helpers ----------------------------------------------------------------------------------

def _os_open(path: str, flags: int) -> int:
    import stat
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise InvalidArgument("not a regular file", path=path)
        # O_NONBLOCK: a FIFO swapped in after the stat must not block the open
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidArgument("not a regular file", path=path)
        return fd
    except FileNotFoundError:
        raise ImageNotFound("no such file", path=path) from None
    except IsADirectoryError:
        raise InvalidArgument("is a directory, not an image file", path=path) from None
    except OSError as e:
        raise io_error(e.errno, "cannot open", path=path) from None


def _meta_write(fd: int, data: bytes, offset: int, path: str) -> None:
    """Write metadata beside the core (a header rewrite) and make it durable, through the
    core's I/O shim, so that fault injection and the power-loss recorder see it."""
    try:
        _core.meta_pwrite(fd, data, offset)
    except OSError as e:
        raise io_error(e.errno or errno.EIO, "cannot write the header", path=path) from None
    meta_sync(fd, path)


def meta_sync(fd: int, path: str) -> None:
    """fdatasync through the core's I/O shim, for metadata written beside the core (header
    rewrites here, repairs in engine.check).  A failure carries ``sync_failed = True``: the
    kernel may have dropped pages, so the open handle must fail every later flush, as after a
    failed sync of the core (see :meth:`Image._failed_sync`)."""
    try:
        _core.meta_sync(fd)
    except OSError as e:
        err = io_error(e.errno or errno.EIO, "cannot sync the metadata written", path=path)
        err.sync_failed = True
        raise err from None


def _read_head(fd: int, path: str) -> tuple[bytes, int]:
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, min(size, _HEADER_READ), 0), size
    except OSError as e:
        raise io_error(e.errno, "cannot read the header", path=path) from None


def _is_qcow2(head: bytes) -> bool:
    return head[:4] == fmt.QCOW_MAGIC_BYTES


def _check_backing_name(name: str, overlay_dir: str, allow_unsafe: bool,
                        real_dirs: dict | None = None) -> str:
    """Policy for backing references (S2): a plain name relative to the overlay's folder
    that resolves, symlinks included, inside that folder. Returns the resolved path."""
    if name in ("", ".") or name.endswith("/"):
        raise UnsafeBackingReference(name, f"backing file name {name!r} does not name a file")
    if "\0" in name:
        raise UnsafeBackingReference(name, "backing file name contains a NUL byte")
    if not allow_unsafe:
        if name.startswith("json:") or _PROTOCOL_RE.match(name):
            raise UnsafeBackingReference(name, f"backing file {name!r} is a json: or protocol name")
        if os.path.isabs(name):
            raise UnsafeBackingReference(name, f"backing file {name!r} is an absolute path")
        if ".." in name.split("/"):
            raise UnsafeBackingReference(name, f"backing file {name!r} leaves the overlay's folder")
    full = os.path.join(overlay_dir, name)
    if not allow_unsafe:
        # one realpath per folder per open: a 200-deep chain in one folder pays for it once
        root = real_dirs.get(overlay_dir) if real_dirs is not None else None
        if root is None:
            root = os.path.realpath(overlay_dir)
            if real_dirs is not None:
                real_dirs[overlay_dir] = root
        real = os.path.realpath(full) if os.path.islink(full) or "/" in name else os.path.join(root, name)
        if not real.startswith(root + os.sep):
            raise UnsafeBackingReference(name, f"backing file {name!r} resolves outside the "
                                         "overlay's folder")
    return full


# --- Image ------------------------------------------------------------------------------------

class Image:
    """An open QCOW2 or RAW image with its backing chain (use :func:`open` / :func:`create`).

    Reads go through the whole chain; writes go to this image only.  Sizes and offsets are
    bytes.  Use as a context manager, or call :meth:`close`.
    """

    def __init__(self):  # built by _open_image only
        raise TypeError("use engine.open() or engine.create()")

    # construction ---------------------------------------------------------------------
    @classmethod
    def _new(cls, path, fd, fmt_name, header, core, backing, readonly, lock, backing_path):
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
        self._closed = False
        self._released = False
        self._close_lock = threading.Lock()
        self._in_use = _destination.register_fd(fd)   # files in use are never export targets
        return self

    def _bind(self, core) -> None:
        # readinto and write are the core's own methods, bound per image: the core makes
        # every check (closed, read-only, range, buffer, extended L2) and raises typed
        # errors, and a small read or write skips one Python frame (about a tenth of its
        # cost). The methods of the same name below document them and serve subclasses.
        core.path = self._path
        self._core = core
        self.readinto = core.readinto
        self.write = core.write

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
        self._check_open()
        return _virtual_size(self._header) if self._header is not None else self._core.file_size

    @property
    def cluster_size(self) -> int | None:
        return self._header.cluster_size if self._header is not None else None

    @property
    def backing(self) -> "Image | None":
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
    def header(self) -> "fmt.Header | None":
        """The parsed QCOW2 header (None for raw)."""
        return self._header

    def chain(self) -> list["Image"]:
        """This image and its backing files, top first."""
        out, img = [], self
        while img is not None:
            out.append(img)
            img = img._backing
        return out

    def __repr__(self):
        state = "closed" if self._closed else ("ro" if self._readonly else "rw")
        return f"<engine.Image {self._path!r} {self._format} {state}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            if not getattr(self, "_closed", True):
                self.close()
        except Exception:
            pass

    # checks -----------------------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise ImageClosed("image is closed", path=self._path)

    def _check_writable(self):
        self._check_open()
        if self._readonly:
            raise ReadOnlyImage("image is open read-only", path=self._path)

    # I/O ----------------------------------------------------------------------------------
    def readinto(self, offset: int, buffer) -> int:
        """Fill ``buffer`` (any writable C-contiguous buffer: bytearray, memoryview, numpy
        array of any dtype) with the guest bytes at ``offset``. Returns the number of bytes
        read (the buffer's size in bytes). Safe to call from several threads at once."""
        return self._core.readinto(offset, buffer)

    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` guest bytes at ``offset``, read through the chain."""
        offset, length = self._core.check_range(offset, length)
        buf = bytearray(length)
        if length:
            self._core.readinto(offset, buf)
        return bytes(buf)

    def readv(self, offsets, length: int, out=None):
        """Batch read: ``length`` bytes at each offset of ``offsets`` (a 1-D numpy array of an
        integer dtype, or a sequence of ints), into consecutive slices of ``out`` (any
        writable C-contiguous buffer; a uint8 array is allocated when None). One crossing
        into the core for the whole batch. Returns ``out``."""
        return self._core.readv(offsets, length, out)

    def write(self, offset: int, data) -> int:
        """Write ``data`` (any C-contiguous buffer, taken as raw bytes) at ``offset``.
        Returns its size in bytes. Durable after :meth:`flush`."""
        return self._core.write(offset, data)

    def writev(self, offsets, length: int, data) -> None:
        """Batch write: consecutive ``length``-byte slices of ``data`` (any C-contiguous
        buffer) to each offset (as for :meth:`readv`)."""
        self._core.writev(offsets, length, data)

    def _aligned_span(self, offset: int, length: int) -> tuple[int, int]:
        """The whole clusters inside [offset, offset+length); a partial last cluster at the
        end of the disk counts as whole."""
        c = self.cluster_size
        start = -(-offset // c) * c
        end = offset + length
        if end != self.size:
            end = end // c * c
        return start, max(start, end)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make [offset, offset+length) read as zeros. With QCOW2 v3 whole clusters get the
        zero flag (their allocation kept, or freed with ``unmap=True``); partial clusters are
        written with zero bytes."""
        offset, length = self._core.check_range(offset, length, write=True)
        if length == 0:
            return
        if self._header is None:
            self._core.raw_punch(offset, length)
            return
        start, end = self._aligned_span(offset, length)
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
        """Drop the mapping of the whole clusters inside the range, so the backing file (or
        zeros, without one) shows through there. Partial clusters are left as they are."""
        offset, length = self._core.check_range(offset, length, write=True)
        if self._header is None:
            self._core.raw_punch(offset, length)
            return
        start, end = self._aligned_span(offset, length)
        if start < end:
            self._core.zero_clusters(start, end - start, _core.ZERO_DISCARD)

    def flush(self) -> None:
        """Make every write issued before this call durable (D1). A failed flush is sticky."""
        self._check_open()
        if not self._readonly:
            self._core.flush()

    def close(self) -> None:
        """Flush, trim the file, unmap, release locks; close the backing chain. Idempotent.
        Calls in progress on other threads finish first; later ones raise ImageClosed."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        err = None
        try:
            # flush, trim and unmap under one exclusive hold of the core's lock
            self._core.close(flush=not self._readonly)
        except EngineError as e:
            err = e
        finally:
            img = self
            while img is not None:          # a loop: chains may be 1000 deep
                img._release()
                img = img._backing
        if err is not None:
            raise err

    def _release(self):
        with self._close_lock:
            if self._released:
                return
            self._released = self._closed = True
        _destination.unregister(self._in_use)
        self._core.close()
        os.close(self._fd)
        self._lock.release()

    # metadata ---------------------------------------------------------------------------
    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """Allocation runs over the range, merged as ``qemu-img map --output=json`` merges
        them (one run per change of depth/zero/data/offset-contiguity; the core's block
        status does the merging)."""
        self._check_open()
        offset = fmt.int_arg(offset, "offset")
        if length is None:
            length = max(0, self.size - offset)
        offset, length = self._core.check_range(offset, length)
        if length == 0:
            return []
        runs = self._core.block_status(offset, length).tolist()
        out = []
        for start, ln, depth, flags, off in runs:
            present = bool(flags & 1)
            out.append(Extent(start, ln, bool(flags & 4), bool(flags & 2), depth,
                              off if flags & 8 else None, present, bool(flags & 16)))
        return out

    def info(self, *, backing_chain: bool = False):
        """``qemu-img info --output=json`` for this image (a list, top first, with
        ``backing_chain=True``)."""
        self._check_open()
        if fmt.bool_arg(backing_chain, "backing_chain"):
            return [img.info() for img in self.chain()]
        st = os.fstat(self._fd)
        d = {"filename": self._path, "format": self._format, "virtual-size": self.size,
             "actual-size": st.st_blocks * 512, "dirty-flag": False}
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

    def snapshots(self) -> list[dict]:
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

    def check(self, repair: str | None = None):
        """Consistency check with ``qemu-img check`` semantics; see engine.check.CheckResult.
        ``repair`` is None, "leaks" or "all" (needs a read-write image)."""
        from engine import check as _check
        self._check_open()
        if repair is not None and (not isinstance(repair, str) or repair not in ("leaks", "all")):
            raise InvalidArgument(f"repair must be None, 'leaks' or 'all', not {repair!r}",
                                  value=repair)
        if self._header is None:
            raise UnsupportedFeature("check of raw images", "raw images have no metadata to "
                                     "check (qemu-img check exits 63)", path=self._path)
        if repair is not None:
            self._check_writable()
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
        self._check_writable()
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
            fmt.choice_arg(backing_format, "backing format", fmt.FORMATS)
            self._open_new_chain(backing_name, backing_format, allow_unsafe_backing).close()
        h = self._read_header()
        h.backing_file = backing_name
        h.backing_format = backing_format
        data = fmt.encode_header(h)     # a name too long for the header raises here, unwritten
        if allow_unsafe_backing and not self._opts["allow_unsafe_backing"]:
            self._opts = dict(self._opts, allow_unsafe_backing=True)
        self._core.flush()
        self._rewrite_header(data)

    def _open_new_chain(self, name: str, format: str, allow_unsafe: bool) -> "Image":
        """Open ``name`` and its chain read-only, as the backing file of this image would be
        opened (the caller closes it)."""
        folder = os.path.dirname(self._path) or "."
        full = _check_backing_name(name, folder, allow_unsafe)
        depth = self._opts["max_chain_depth"]
        if depth < 1:
            raise ChainError(f"backing chain deeper than {depth} images", path=self._path)
        # the locks of a normal open too: a new backing file that another process writes is
        # refused here, before the header changes, not by the reopen after it.  An image
        # opened without its chain (backing=False: its caller holds the chain's files, as the
        # repository does during a merge) never opens the new chain, so it is validated
        # without taking locks.
        opts = dict(self._opts, backing=True, allow_unsafe_backing=allow_unsafe,
                    max_chain_depth=depth - 1,
                    force_share=self._opts["force_share"] or not self._opts["backing"])
        st = os.fstat(self._fd)
        return _open_image(full, format, True, opts, {(st.st_dev, st.st_ino)})

    def resize(self, new_size: int) -> None:
        """Grow the virtual disk to ``new_size`` bytes (shrinking is refused).

        Refused as QEMU refuses it: a qcow2 size that is not a multiple of 512, a v2
        (compat 0.10) image with internal snapshots (a v2 snapshot does not record its disk
        size, so it could not be applied any more), a size over the format's maximum.

        Raises:
            InvalidArgument, UnsupportedFeature ("shrink", "resize of a v2 image with
            snapshots"), ReadOnlyImage, EngineIOError.
        """
        self._check_writable()
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
                raise io_error(e.errno, "cannot grow the image file", path=self._path) from None
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
    def _read_header(self) -> "fmt.Header":
        head, size = _read_head(self._fd, self._path)
        return fmt.parse_header(head, size, path=self._path)

    def _write_header(self, h: "fmt.Header") -> None:
        self._write_header_bytes(fmt.encode_header(h))

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


def _virtual_size(h: "fmt.Header") -> int:
    """QEMU counts the disk in 512-byte sectors: a size that is not a multiple of 512 is
    rounded down (bs->total_sectors)."""
    return h.size // 512 * 512


def _geometry(h: "fmt.Header", snap_size: int = 0) -> "_core.Geometry":
    return _core.Geometry(
        cluster_bits=h.cluster_bits, size=_virtual_size(h), version=h.version,
        l1_table_offset=h.l1_table_offset, l1_size=h.l1_size,
        refcount_table_offset=h.refcount_table_offset,
        refcount_table_clusters=h.refcount_table_clusters,
        refcount_order=h.refcount_order, extended_l2=bool(h.extended_l2),
        compression_type=h.compression_type,
        snapshots_offset=h.snapshots_offset if h.nb_snapshots else 0,
        snapshots_size=snap_size)


def _fd_headroom(n_images: int) -> None:
    """Each open image holds two descriptors; raise the soft limit for very deep chains."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * n_images + 64
    if soft != resource.RLIM_INFINITY and need > soft:
        new = need * 2 if hard == resource.RLIM_INFINITY else min(hard, need * 2)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            pass


def _attach_chain(top: "Image", opts: dict, seen: set) -> None:
    """Open the backing chain of ``top`` read-only, by policy, level by level (a loop, not
    recursion: chains may be deeper than Python's recursion limit), then link the cores."""
    images = [top]
    try:
        cur = top
        while opts["backing"] and cur._header is not None and cur._header.backing_file is not None:
            h = cur._header
            name = h.backing_file
            full = _check_backing_name(name, os.path.dirname(cur._path) or ".",
                                       opts["allow_unsafe_backing"],
                                       opts.setdefault("_real_dirs", {}))
            if h.backing_format is None:
                raise UnsafeBackingReference(
                    name, f"backing file {name!r} has no recorded format; cowchain never "
                    "guesses a format", path=cur._path,
                    hint="record it with 'qemu-img rebase -u -b NAME -F FMT'")
            if h.backing_format not in ("raw", "qcow2"):
                raise UnsupportedFeature(f"backing format {h.backing_format}", path=cur._path)
            if len(images) > opts["max_chain_depth"]:
                raise ChainError(f"backing chain deeper than {opts['max_chain_depth']} images",
                                 path=top._path, hint="pass a larger max_chain_depth if the "
                                 "chain is meant to be this deep")
            if len(images) % 64 == 0:
                _fd_headroom(len(images) + 64)
            b = _open_one(full, h.backing_format, True, opts, seen)
            cur._backing = b
            cur._backing_path = full
            images.append(b)
            cur = b
    except BaseException:
        for img in images[1:]:
            img._release()
        top._backing = None
        raise
    for a, b in zip(images[-2::-1], images[:0:-1]):
        a._core.set_backing(b._core)
    top._core.enable_owner_map()


def _open_one(path, format, readonly, opts, seen) -> "Image":
    """Open one file (no backing chain): descriptor, header, policy, lock, mapping."""
    fd = _os_open(path, os.O_RDONLY if readonly else os.O_RDWR)
    core = None
    try:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise ChainError("backing chain loops back to an image already in the chain",
                             path=path)
        seen.add(key)
        head, size = _read_head(fd, path)
        if format is None:
            format = "qcow2" if _is_qcow2(head) else "raw"
        if format not in ("raw", "qcow2"):
            raise InvalidArgument(f"unknown format {format!r} (use 'raw' or 'qcow2')")
        header = None
        snap_size = 0
        if format == "qcow2":
            header = fmt.parse_header(head, size, path=path)
            snap_size = _validate_snapshots(fd, path, header, size)
        lock = _Lock(fd, path, not readonly, opts["force_share"])
        if header is not None and not readonly:
            header = _prepare_rw(fd, path, header, size)
        try:
            core = _core.CoreImage(fd, not readonly,
                                   _geometry(header, snap_size) if header is not None else None)
        except ValueError as e:
            raise CorruptImage(str(e), path=path) from None
        except OSError as e:
            raise io_error(e.errno or errno.EIO, "cannot map the image", path=path) from None
        img = Image._new(path, fd, format, header, core, None, readonly, lock, None)
        img._opts = opts
        return img
    except BaseException:
        if core is not None:
            core.close()
        os.close(fd)
        raise


def _validate_snapshots(fd: int, path: str, h: "fmt.Header", size: int) -> int:
    """QEMU reads the snapshot table at open and refuses a bad one; so do we. Returns its
    size in bytes."""
    if not h.nb_snapshots:
        return 0
    want = 4096
    while True:
        buf = os.pread(fd, min(want, max(0, size - h.snapshots_offset)), h.snapshots_offset)
        n = fmt.snapshot_table_size(buf, h, path=path)
        if n <= len(buf):
            break
        if len(buf) < want:
            raise CorruptImage("snapshot table runs past the end of the file", path=path)
        # grow geometrically: the size is learnt entry by entry, and a hostile count must
        # not make this quadratic (bounded by QEMU's 64 MiB table limit)
        want = min(max(n, want * 4), fmt.MAX_SNAPSHOTS_SIZE)
    fmt.parse_snapshot_table(buf[:n], h, file_size=size, path=path)
    return n


def _open_image(path, format, readonly, opts, seen: "set | None" = None):
    seen = set() if seen is None else seen
    top = _open_one(path, format, readonly, opts, seen)
    try:
        _attach_chain(top, opts, seen)
    except BaseException:
        top._release()
        raise
    return top


def _prepare_rw(fd: int, path: str, h: "fmt.Header", size: int) -> "fmt.Header":
    """What QEMU does before the first write: refuse a corrupt image, repair a dirty one,
    drop autoclear bits we do not maintain (the bitmaps extension then no longer counts)."""
    if h.corrupt:
        raise CorruptImage("the image is marked corrupt; it may only be opened read-only",
                           path=path, hint="run check(repair='all') in a repair tool, or "
                           "'qemu-img check -r all'")
    if h.dirty:
        from engine import check as _check
        res = _check.check_file(fd, filename=path, repair="all")
        if res.corruptions or res.check_errors:
            raise CorruptImage("could not repair the dirty image", path=path)
        head, size = _read_head(fd, path)
        h = fmt.parse_header(head, size, path=path)
    if h.version >= 3 and h.autoclear_features:
        h.autoclear_features = 0
        h.bitmaps_ext = None
        _meta_write(fd, fmt.encode_header(h), 0, path)
        head, size = _read_head(fd, path)
        h = fmt.parse_header(head, size, path=path)
    return h


def open(path, *, format: str | None = None, readonly: bool = False, backing: bool = True,
         allow_unsafe_backing: bool = False, max_chain_depth: int = MAX_CHAIN_DEPTH,
         force_share: bool = False) -> Image:
    """Open an image and (by default) its backing chain, read-only below the top.

    Arguments:
        path (str | os.PathLike): the image file.
        format (str | None): "qcow2" or "raw"; None means qcow2 if the file starts with the
            QCOW2 magic, raw otherwise (top level only: backing files use the format recorded
            in their overlay, never a guess).
        readonly (bool): open read-only.
        backing (bool): open the backing chain (reads of unallocated clusters then fall
            through); False reads them as zeros.
        allow_unsafe_backing (bool): follow absolute, ``..`` and protocol backing names.
        max_chain_depth (int): refuse deeper chains (ChainError).
        force_share (bool): read-only open that shares every permission (qemu's -U).

    Raises:
        ImageNotFound, ImageFormatError, UnsupportedFeature, CorruptImage,
        SafetyLimitExceeded, ChainError, UnsafeBackingReference, ImageLocked, EngineIOError.
    """
    path = _path_arg(path)
    format = fmt.choice_arg(format, "format", fmt.FORMATS, optional=True)
    for name, value in (("readonly", readonly), ("backing", backing),
                        ("allow_unsafe_backing", allow_unsafe_backing),
                        ("force_share", force_share)):
        fmt.bool_arg(value, name)
    max_chain_depth = fmt.int_arg(max_chain_depth, "max_chain_depth")
    if force_share and not readonly:
        raise InvalidArgument("force_share needs readonly=True")
    opts = {"backing": backing, "allow_unsafe_backing": allow_unsafe_backing,
            "max_chain_depth": max_chain_depth, "force_share": force_share}
    return _open_image(path, format, readonly, opts)


def create(path, size: int | None, *, format: str = "qcow2", cluster_size: int = 65536,
           backing: str | None = None, backing_format: str | None = None, compat: str = "1.1",
           refcount_bits: int = 16, lazy_refcounts: bool = False, extended_l2: bool = False,
           overwrite: bool = False, allow_unsafe_backing: bool = False) -> Image:
    """Create an image (laid out exactly as ``qemu-img create`` lays it out) and open it
    read-write.

    Every argument and every limit is checked before the file is made (the size against
    the format's maximum, ``RLIMIT_FSIZE`` and the filesystem's largest file); a create that
    raises leaves no file and no open descriptor behind.

    Arguments:
        path: the new file. It must not exist unless ``overwrite=True``.
        size (int | None): virtual size in bytes (rounded up to 512 for qcow2); None takes
            the backing file's size.
        format (str): "qcow2" or "raw".
        cluster_size (int): bytes, a power of two from 512 to 2 MiB (qcow2).
        backing (str | None): backing file name, relative to the new file's folder.
        backing_format (str): "raw" or "qcow2"; required with ``backing`` (never probed).
        compat, refcount_bits, lazy_refcounts, extended_l2: as ``qemu-img create -o``.
        overwrite (bool): replace an existing file.
        allow_unsafe_backing (bool): follow absolute, ``..`` and protocol backing names.

    Raises:
        InvalidArgument (a bad argument; a size over a limit, with the limit in the message),
        ImageNotFound (no such folder, or no backing file), UnsafeBackingReference,
        SafetyLimitExceeded (a backing name too long for the header), EngineIOError, and what
        :func:`open` raises for the backing chain.
    """
    path = _path_arg(path)
    format = fmt.choice_arg(format, "format", fmt.FORMATS)
    cluster_size = fmt.cluster_size_arg(cluster_size)
    for name, value in (("lazy_refcounts", lazy_refcounts), ("extended_l2", extended_l2),
                        ("overwrite", overwrite), ("allow_unsafe_backing", allow_unsafe_backing)):
        fmt.bool_arg(value, name)
    bdir = os.path.dirname(path) or "."
    if backing is not None:
        if format != "qcow2":
            raise InvalidArgument("only qcow2 images can have a backing file")
        if not isinstance(backing, str):
            raise InvalidArgument(f"backing must be a str or None, not {type(backing).__name__}",
                                  value=backing)
        if backing_format is None:
            raise InvalidArgument("backing file specified without backing format; cowchain "
                                  "never probes a format", hint="pass backing_format='raw' or 'qcow2'")
        fmt.choice_arg(backing_format, "backing format", fmt.FORMATS)
        full = _check_backing_name(backing, bdir, allow_unsafe_backing)
        if size is None:
            size = _probe_size(full, backing_format)
    elif backing_format is not None:
        raise InvalidArgument("a backing format without a backing file", value=backing_format)
    if size is None:
        raise InvalidArgument("a size is required (None takes the backing file's size, and "
                              "there is no backing file)")
    # every check before the file exists: a refused create leaves nothing behind
    size = fmt.check_virtual_size(size, format, cluster_size=cluster_size,
                                  extended_l2=extended_l2)
    if format == "qcow2":
        header, data = fmt.new_image_layout(
            size, cluster_size=cluster_size, compat=compat, refcount_bits=refcount_bits,
            lazy_refcounts=lazy_refcounts, backing_file=backing, backing_format=backing_format,
            extended_l2=extended_l2)
        _check_file_length(len(data), bdir, "the new file's size")
    else:
        _check_file_length(size, bdir, "virtual size")
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        raise InvalidArgument("file exists", path=path, hint="pass overwrite=True to replace it") from None
    except FileNotFoundError:
        raise ImageNotFound("folder does not exist", path=path) from None
    except IsADirectoryError:
        raise InvalidArgument("is a directory", path=path) from None
    except OSError as e:
        raise io_error(e.errno, "cannot create", path=path) from None
    try:
        if format == "qcow2":
            os.pwrite(fd, data, 0)
        else:
            os.ftruncate(fd, size)
    except BaseException as e:
        os.close(fd)
        _unlink_quietly(path)
        if isinstance(e, OSError):
            raise io_error(e.errno, "cannot write the new image", path=path) from None
        raise
    # Make the file and its name durable on a helper thread while this one opens the image
    # (the two overlap: an open costs about as much CPU as the fdatasync waits); create()
    # returns only after both syncs are done.
    try:
        sync = _CreateSync(fd, bdir)
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    try:
        img = open(path, format=format, allow_unsafe_backing=allow_unsafe_backing)
    except BaseException:
        # the backing chain (checked whole only now) is unusable: leave nothing behind
        sync.wait()
        _unlink_quietly(path)
        raise
    err = sync.wait()
    if err is not None:
        img.close()
        _unlink_quietly(path)
        raise io_error(err.errno, "cannot write the new image", path=path) from None
    return img


class _CreateSync:
    """fdatasync a new file, then fsync its folder, on a native thread (no GIL needed, so it
    overlaps the open); wait() closes the descriptors and returns the fdatasync error."""

    def __init__(self, fd: int, folder: str):
        self._fd = fd
        try:
            self._dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            self._dfd = -1
        try:
            self._job = _core.BackgroundSync(fd, self._dfd)
        except BaseException:
            if self._dfd >= 0:
                os.close(self._dfd)
            raise

    def wait(self) -> "OSError | None":
        err = self._job.wait()
        os.close(self._fd)
        if self._dfd >= 0:
            os.close(self._dfd)
        return OSError(err, os.strerror(err)) if err else None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _probe_size(path: str, format: str) -> int:
    """The virtual size of an image from its header alone (create's size=None)."""
    fd = _os_open(path, os.O_RDONLY)
    try:
        head, size = _read_head(fd, path)
    finally:
        os.close(fd)
    if format == "raw":
        return size
    return _virtual_size(fmt.parse_header(head, size, path=path))


__all__ = ["Image", "Extent", "open", "create", "MAX_CHAIN_DEPTH"]
