"""The image as the check reads it: header, I/O, the open rules, decoded L2 tables.

:class:`_Image` wraps the descriptor and the parsed :class:`~engine.qcow2.header.Header`
(its geometry comes from the header's properties); reads past the end of the file return
zeros, as QEMU's block layer does, and repair writes go through the core's I/O shim.
:class:`_L2Rows` is the one place L2 entries are decoded, :class:`_Metadata` QEMU's metadata
overlap check for repair writes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import numpy as np

from engine import _core
from engine.metaio import meta_sync
from engine.qcow2 import spec
from engine.qcow2.header import (
    ByteReader,
    Header,
    l1_size_limit,
    looks_like_qcow2,
    parse_header,
    read_fixed_fields,
    table_offset_limit,
    table_size_limit,
    walk_extensions,
)
from engine.qcow2.refblocks import reftable_offsets
from engine.qcow2.snapshots import SnapshotEntry
from engine.errors import (
    CorruptImage,
    EngineError,
    EngineIOError,
    ImageFormatError,
    InvalidArgument,
    SafetyLimitExceeded,
    UnsupportedFeature,
    io_error,
)
from engine.check.result import _Pass

# Work and I/O granularity: how many bytes of tables one numpy batch holds, and the longest
# single read.
_BATCH_BYTES = 16 << 20
_MAX_READ = 8 << 20

_U64 = np.uint64


class _Image:
    """The header facts and the file the check works on (re-read for every pass)."""

    def __init__(self, fd: int, path: str, h: Header, head: bytes, file_size: int):
        if not 0 <= h.refcount_order <= spec.MAX_REFCOUNT_ORDER:
            # QEMU cannot open such an image even in check mode (exit 1)
            raise ImageFormatError(f"refcount order {h.refcount_order} / cluster bits "
                                   f"{h.cluster_bits} out of range", path=path)
        self.fd = fd
        self.path = path
        self.h = h
        self.file_size = file_size
        self.snapshots_size = 0        # bytes, known once the table has been read
        self.snapshots: list[SnapshotEntry] = []   # once read
        self.bitmaps, self.crypto = _extensions(head, h)

    # Short names for the numpy code of the check, each one of the header's own fields or
    # geometry properties (the header is the one place that derives them).
    @property
    def cb(self) -> int:
        return self.h.cluster_bits

    @property
    def C(self) -> int:
        return self.h.cluster_size

    @property
    def ext(self) -> bool:
        return self.h.extended_l2

    @property
    def rmax(self) -> int:
        return self.h.refcount_max

    @property
    def rorder(self) -> int:
        return self.h.refcount_order

    @property
    def rb_bits(self) -> int:
        return self.h.refblock_bits

    @property
    def E(self) -> int:
        return self.h.refblock_entries

    @property
    def rt_off(self) -> int:
        return self.h.refcount_table_offset

    @property
    def rt_size(self) -> int:
        return self.h.reftable_entries

    @property
    def rt_bytes(self) -> int:
        return self.h.reftable_entries * spec.REFTABLE_ENTRY_SIZE

    @property
    def l1_bytes(self) -> int:
        return self.h.l1_size * spec.L1E_SIZE

    @property
    def l1_off(self) -> int:
        return self.h.l1_table_offset

    @property
    def l1_size(self) -> int:
        return self.h.l1_size

    @property
    def version(self) -> int:
        return self.h.version

    @property
    def size(self) -> int:
        return self.h.size

    @property
    def data_file(self) -> bool:
        return self.h.has_data_file

    @property
    def snapshots_offset(self) -> int:
        return self.h.snapshots_offset

    # I/O. Reads past the end of the file return zeros, as QEMU's block layer does.
    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self.file_size:
            return b"\0" * max(length, 0)
        want = min(length, self.file_size - offset)
        data = _pread(self.fd, offset, want, self.path)
        if len(data) < length:
            data += b"\0" * (length - len(data))
        return data

    def read_rows(self, offsets: np.ndarray, length: int) -> np.ndarray:
        """The ``length`` bytes at each of ``offsets`` (ascending, distinct), as a 2-D uint8
        array; adjacent rows are fetched with one read."""
        n = len(offsets)
        out = np.zeros((n, length), dtype=np.uint8)
        if n == 0:
            return out
        offs = offsets.astype(np.int64)
        brk = np.flatnonzero(np.diff(offs) != length) + 1
        starts = np.concatenate(([0], brk))
        ends = np.concatenate((brk, [n]))
        flat = out.reshape(-1)
        per_read = max(1, _MAX_READ // length)
        for s, e in zip(starts.tolist(), ends.tolist()):
            while s < e:
                k = min(e - s, per_read)
                off = int(offs[s])
                if off < self.file_size:
                    want = min(k * length, self.file_size - off)
                    data = _pread(self.fd, off, want, self.path)
                    flat[s * length:s * length + len(data)] = np.frombuffer(data, np.uint8)
                s += k
        return out

    def pwrite(self, offset: int, data: bytes) -> None:
        # through the core's I/O shim: the fault tests and the power-loss recorder see repairs
        try:
            _core.meta_pwrite(self.fd, data, offset)
        except OSError as e:
            raise io_error(e.errno or errno.EIO, f"cannot write {len(data)} bytes at offset {offset}",
                           path=self.path) from None

    def sync(self) -> None:
        meta_sync(self.fd, self.path)

    def u64_table(self, offset: int, entries: int, *, trim: bool = False) -> np.ndarray:
        """A table of big-endian u64 entries at ``offset`` as native uint64. Only the part
        inside the file is read; the rest reads as zeros, or is left out with ``trim``."""
        if entries <= 0:
            return np.zeros(0, dtype=_U64)
        inside = 0 if offset >= self.file_size else min(entries, -(-(self.file_size - offset) // 8))
        out = np.zeros(inside if trim else entries, dtype=_U64)
        if inside:
            data = self.pread(offset, inside * 8)
            out[:inside] = np.frombuffer(data, dtype=">u8")
        return out


def _pread(fd: int, offset: int, length: int, path: str) -> bytes:
    parts = []
    try:
        while length > 0:
            b = os.pread(fd, length, offset)
            if not b:
                break
            parts.append(b)
            offset += len(b)
            length -= len(b)
    except OSError as e:
        raise io_error(e.errno or errno.EIO, f"cannot read {length} bytes at offset {offset}",
                       path=path) from None
    return b"".join(parts)


def _extensions(head: bytes, h: Header
                ) -> tuple[tuple[int, int, int] | None, tuple[int, int] | None]:
    """(bitmaps, crypto) from the header extensions: bitmaps is (nb, directory size, directory
    offset) or None, crypto is (offset, length) or None. Only what the check counts; the walk
    stops quietly at a broken record, as QEMU's check does."""
    bitmaps: tuple[int, int, int] | None = None
    crypto: tuple[int, int] | None = None
    end = min(h.backing_file_offset or h.cluster_size, h.cluster_size, len(head))
    for magic, data in walk_extensions(ByteReader(head, None), h.extension_area_start, end,
                                       lenient=True):
        if magic == spec.EXT_MAGIC_BITMAPS and len(data) >= spec.BITMAPS_EXT_SIZE:
            nb, _reserved, dsize, doff = spec.BITMAPS_EXT_STRUCT.unpack_from(data)
            bitmaps = (nb, dsize, doff)
        elif magic == spec.EXT_MAGIC_CRYPTO_HEADER and len(data) >= spec.CRYPTO_EXT_SIZE:
            off, length = spec.CRYPTO_EXT_STRUCT.unpack_from(data)
            crypto = (off, length)
    if not h.autoclear_features & spec.AUTOCLEAR_BITMAPS or h.version < 3:
        bitmaps = None     # QEMU ignores the extension unless the autoclear bit vouches for it
    return bitmaps, crypto


def _load(fd: int, path: str
          ) -> tuple[Header | None, bytes, int, EngineError | None]:
    """(header or None, head bytes, file size, the parse problem or None).

    Raises only when the file is not a QCOW2 image at all (bad magic, version, cluster size,
    too short). A header that engine.format refuses for what its tables contain is re-read
    leniently: QEMU's check opens such images (a reftable past the end of a truncated file,
    no reftable at all, encryption) and we must report on them, not refuse them.
    """
    try:
        file_size = os.fstat(fd).st_size
    except OSError as e:
        raise io_error(e.errno or errno.EIO, "cannot stat the image", path=path) from None
    head = _pread(fd, 0, min(file_size, 2 << 20), path)
    if not looks_like_qcow2(head):
        parse_header(head, file_size, path=path)    # raises the precise ImageFormatError
        raise ImageFormatError("not a QCOW2 image", path=path)
    try:
        return parse_header(head, file_size, path=path), head, file_size, None
    except (EngineIOError, InvalidArgument):
        raise
    except (CorruptImage, SafetyLimitExceeded, UnsupportedFeature) as e:
        return read_fixed_fields(head), head, file_size, e
    except EngineError as e:
        return None, head, file_size, e


def _validate_open(p: _Pass, img: _Image) -> bool:
    """What qcow2_do_open refuses even in check mode (beyond the basic header checks); a
    failure means qemu-img cannot check the image (a check error, nothing else examined).

    The table and L1 limits are engine.qcow2.header's (the ones every open applies); this
    says, in qemu-img's words and QEMU's order, which one the image breaks."""
    h = img.h
    C = h.cluster_size
    if h.incompatible_features & ~spec.INCOMPAT_MASK:
        p.fail(f"ERROR Unsupported qcow2 feature(s): incompatible bits "
               f"{h.incompatible_features & ~spec.INCOMPAT_MASK:#x}")
        return False
    if h.extended_l2 and C < spec.EXTL2_MIN_CLUSTER_SIZE:
        p.fail(f"ERROR Unsupported subcluster size: {h.subcluster_size}")
        return False
    # A refcount order over 6 or a backing file offset past cluster 0 never get here: _Image
    # refuses the first, parse_header the second (the header cannot be used at all).
    rt, l1 = "Reference count table", "Active L1 table"
    rules: list[tuple[Callable[[], None], dict[type[EngineError], str]]] = [
        (lambda: table_size_limit(rt, h.refcount_table_clusters, C, spec.MAX_REFTABLE_SIZE),
         {SafetyLimitExceeded: f"{rt} too large"}),
        (lambda: table_offset_limit(rt, h.refcount_table_offset, h.refcount_table_clusters, C,
                                    C),
         {CorruptImage: f"{rt} offset invalid"}),
        (lambda: table_size_limit(l1, h.l1_size, spec.L1E_SIZE, spec.MAX_L1_SIZE),
         {SafetyLimitExceeded: f"{l1} too large"}),
        (lambda: l1_size_limit(h.size, h.cluster_bits, h.extended_l2, h.l1_size,
                               h.l1_table_offset),
         {SafetyLimitExceeded: "Image is too big", CorruptImage: "L1 table is too small"}),
        (lambda: table_offset_limit(l1, h.l1_table_offset, h.l1_size, spec.L1E_SIZE, C),
         {CorruptImage: f"{l1} offset invalid"}),
    ]
    for rule, words in rules:
        try:
            rule()
        except EngineError as e:
            p.fail(f"ERROR {words.get(type(e), e)}")
            return False
    if -(-img.file_size // C) > spec.INT_MAX:
        p.fail("ERROR the image file has too many clusters to check")
        return False
    return True


class _L2Rows:
    """A batch of L2 tables (rows of one cluster) decoded once: the entries and, with
    extended L2, the subcluster bitmaps, and the masks both the reference count and the
    COPIED check use (qcow2.txt "Cluster mapping")."""

    def __init__(self, img: _Image, raw: np.ndarray) -> None:
        self.ext = img.ext
        self.words = raw.view(">u8").astype(_U64)      # native copy: the COPIED repair edits it
        self.bm: np.ndarray | None = None
        if img.ext:
            self.e, self.bm = self.words[:, 0::2], self.words[:, 1::2]
        else:
            self.e = self.words
        e = self.e
        self.comp = (e & _U64(spec.QCOW_OFLAG_COMPRESSED)) != 0
        self.copied = (e & _U64(spec.QCOW_OFLAG_COPIED)) != 0
        self.off = (e & _U64(spec.L2E_OFFSET_MASK)).astype(np.int64)
        if img.ext:
            self.zero = np.zeros_like(self.comp)
        else:
            self.zero = ((e & _U64(spec.QCOW_OFLAG_ZERO)) != 0) & ~self.comp
        self.has_off = self.off != 0
        if img.data_file:
            self.has_off = self.has_off | self.copied
        self.normal = ~self.comp & self.has_off          # NORMAL or ZERO_ALLOC

    def entry_cols(self, cols: np.ndarray) -> np.ndarray:
        """The columns of :attr:`words` that hold entries ``cols`` (with extended L2, each
        entry's subcluster bitmap is the next column)."""
        return 2 * cols if self.ext else cols

    @staticmethod
    def encode(words: np.ndarray) -> bytes:
        """Words (one row, or part of one) as the bytes of their L2 table."""
        return words.astype(">u8").tobytes()


class _Metadata:
    """QEMU's metadata overlap check (qcow2_check_metadata_overlap, default "cached" template)
    for repair writes into L2 tables: the clusters of the header, the active L1 table, the
    reftable, the refblocks, the snapshot table, the snapshot L1 tables and the bitmap
    directory, as merged cluster intervals."""

    def __init__(self, img: _Image, snaps: list[SnapshotEntry]) -> None:
        C = img.C
        ranges = [(0, C), (img.l1_off, img.l1_bytes), (img.rt_off, img.rt_bytes),
                  (img.snapshots_offset, img.snapshots_size)]
        ranges += [(s.l1_table_offset, s.l1_size * spec.L1E_SIZE) for s in snaps]
        if img.bitmaps is not None:
            ranges.append((img.bitmaps[2], img.bitmaps[1]))
        starts = [o >> img.cb for o, n in ranges if n > 0]
        ends = [((o + n - 1) >> img.cb) + 1 for o, n in ranges if n > 0]
        rb = reftable_offsets(img.u64_table(img.rt_off, img.rt_size), C)[0]
        rb = rb[rb != 0] >> img.cb
        st = np.concatenate((np.array(starts, np.int64), rb))
        en = np.concatenate((np.array(ends, np.int64), rb + 1))
        order = np.argsort(st, kind="stable")
        st, en = st[order], np.maximum.accumulate(en[order])
        self.starts, self.ends = st, en      # ends are running maxima: one query suffices
        self.cb = img.cb

    def overlaps(self, offset: int, size: int) -> bool:
        a = offset >> self.cb
        b = ((offset + size - 1) >> self.cb) + 1
        i = int(np.searchsorted(self.starts, b, "left")) - 1
        return i >= 0 and int(self.ends[i]) > a


def _reload(p: _Pass, img: _Image) -> _Image | None:
    """The image as it is on disk after a repair wrote its header."""
    h, head, file_size, problem = _load(img.fd, img.path)
    if h is None:
        p.fail(f"ERROR the repaired header cannot be read: {problem}")
        return None
    return _Image(img.fd, img.path, h, head, file_size)
