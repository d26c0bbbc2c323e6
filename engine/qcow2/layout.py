"""A new image's layout, and the size rules of create and resize.

:func:`new_image_layout` returns the exact bytes ``qemu-img create -f qcow2`` writes for a
new empty image: it replays QEMU's cluster allocator (:class:`CreateAllocator`).
:func:`max_virtual_size` and :func:`check_virtual_size` are the one rule for the size a
caller may ask for.
"""

from __future__ import annotations

import bisect
from typing import Any, Callable

import numpy as np
import numpy.typing as npt

from engine.errors import EngineError, InvalidArgument, SafetyLimitExceeded

from engine.qcow2.spec import (
    COMPAT_LAZY_REFCOUNTS,
    COMPAT_V2,
    COMPAT_V3,
    COMPAT_VERSIONS,
    COMPRESSION_NAMES,
    COMPRESSION_ZLIB,
    CREATE_HEADER_CLUSTERS,
    CRYPT_NONE,
    DEFAULT_CLUSTER_SIZE,
    EXTL2_MIN_CLUSTER_SIZE,
    FORMATS,
    INCOMPAT_COMPRESSION,
    INCOMPAT_EXTL2,
    L1E_SIZE,
    MAX_CLUSTER_BITS,
    MAX_CLUSTER_OFFSET,
    MAX_DISK_LENGTH,
    MAX_L1_ENTRIES,
    MAX_REFTABLE_SIZE,
    REFTABLE_ENTRY_SIZE,
    SECTOR_SIZE,
    U64,
    V2_HEADER_LENGTH,
    V3_HEADER_LENGTH,
)
from engine.qcow2.args import (
    bool_arg,
    choice_arg,
    cluster_size_arg,
    int_arg,
    size_text,
)
from engine.qcow2.refblocks import (
    first_free_run,
    refblock_with_ones,
    reftable_clusters,
    reftable_entries,
)
from engine.qcow2.header import (
    Header,
    encode_header,
    l1_entries_for,
    parse_header,
)

def max_virtual_size(format: str = "qcow2", cluster_size: int = DEFAULT_CLUSTER_SIZE,
                     extended_l2: bool = False) -> int:
    """The largest virtual size QEMU accepts for an image of this format and geometry.

    qcow2: the L1 table may hold at most ``QCOW_MAX_L1_SIZE`` (32 MiB) of entries, each
    mapping one L2 table of ``cluster_size / 8`` clusters (``/ 16`` with extended L2), so
    64 KiB clusters reach 2 PiB and 2 MiB clusters 2 EiB (QEMU's ``qcow2_grow_l1_table``
    refuses more with EFBIG).  Every format: the block layer's ``BDRV_MAX_LENGTH``
    (2^63 - 1 GiB).

    Arguments:
        format (str): "qcow2" or "raw".
        cluster_size (int): bytes (qcow2 only).
        extended_l2 (bool): 16-byte L2 entries (qcow2 only).

    Returns:
        int: bytes.
    """
    if choice_arg(format, "format", FORMATS) == "raw":
        return MAX_DISK_LENGTH
    cluster_bits = cluster_size_arg(cluster_size).bit_length() - 1
    bool_arg(extended_l2, "extended_l2")
    per_l1_entry = 1 << (2 * cluster_bits - (4 if extended_l2 else 3))
    return min(MAX_L1_ENTRIES * per_l1_entry, MAX_DISK_LENGTH)


def check_virtual_size(size: Any, format: str = "qcow2", *, cluster_size: int = DEFAULT_CLUSTER_SIZE,
                       extended_l2: bool = False, what: str = "virtual size") -> int:
    """The one rule for a disk size a caller asks for (create, resize, a new chain): a
    non-negative integer (``bool`` is not one) no larger than :func:`max_virtual_size`.
    A qcow2 size is taken as rounded up to 512 bytes, as ``qemu-img create`` rounds it.

    Arguments:
        size (int): bytes; any integer type (numpy integers too), never a float or a string.
        format, cluster_size, extended_l2: as for :func:`max_virtual_size`.
        what (str): how the message names the size.

    Returns:
        int: ``size`` as a Python int.

    Raises:
        InvalidArgument: not an integer, negative, or over the limit; the message states the
            limit and ``value`` holds the size passed.
    """
    if isinstance(size, bool) or not hasattr(size, "__index__"):
        raise InvalidArgument(f"{what} must be an integer number of bytes, not {size!r}",
                              value=size)
    n = int(size.__index__())
    if n < 0:
        raise InvalidArgument(f"{what} must not be negative, got {n}", value=size)
    limit = max_virtual_size(format, cluster_size, extended_l2)
    rounded = -(-n // SECTOR_SIZE) * SECTOR_SIZE if format == "qcow2" else n
    if rounded > limit:
        if format == "qcow2":
            geometry = f" for {size_text(cluster_size)} clusters" + (
                " with extended L2 entries" if extended_l2 else "")
            hint = ("use a smaller size" if cluster_size >= 1 << MAX_CLUSTER_BITS else
                    f"use a smaller size, or larger clusters: 2 MiB clusters allow up to "
                    f"{size_text(max_virtual_size('qcow2', 1 << MAX_CLUSTER_BITS, extended_l2))}")
        else:
            geometry, hint = "", "use a smaller size"
        raise InvalidArgument(f"{what} {size_text(n)} is over the {format} maximum of "
                              f"{size_text(limit)}{geometry}", value=size, hint=hint)
    return n


# =========================================================================================
# New image layout: a replay of QEMU's cluster allocator during qemu-img create
# =========================================================================================

def _internal(what: str) -> EngineError:
    # A broken invariant of the replay below: a bug here, never a property of user input.
    return EngineError(f"internal error in the qemu-img create replay: {what}")


class _Again(Exception):
    """QEMU's -EAGAIN: a new refcount block was allocated, restart the free-space search."""


class _IntervalSet:
    """Disjoint half-open integer intervals (cluster indexes with refcount 1).

    During create every refcount is 0 or 1, so the refcount state is just the set of used
    clusters; intervals keep the work per table, not per cluster.
    """

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def first_overlap(self, a: int, b: int) -> tuple[int, int] | None:
        """The first interval meeting [a, b), or None."""
        i = bisect.bisect_right(self.ends, a)
        if i < len(self.starts) and self.starts[i] < b:
            return self.starts[i], self.ends[i]
        return None

    def covers(self, a: int, b: int) -> bool:
        i = bisect.bisect_right(self.starts, a) - 1
        return i >= 0 and self.ends[i] >= b

    def add(self, a: int, b: int) -> None:
        if a >= b:
            return
        if self.first_overlap(a, b) is not None:
            raise _internal("refcount overflow")
        i = bisect.bisect_left(self.starts, a)
        # merge with neighbours that touch
        if i > 0 and self.ends[i - 1] == a:
            i -= 1
            a = self.starts[i]
            del self.starts[i], self.ends[i]
        if i < len(self.starts) and self.starts[i] == b:
            b = self.ends[i]
            del self.starts[i], self.ends[i]
        self.starts.insert(i, a)
        self.ends.insert(i, b)

    def remove(self, a: int, b: int) -> None:
        if a >= b:
            return
        if not self.covers(a, b):
            raise _internal("refcount underflow")
        i = bisect.bisect_right(self.starts, a) - 1
        s, e = self.starts[i], self.ends[i]
        del self.starts[i], self.ends[i]
        for x, y in ((b, e), (s, a)):
            if x < y:
                self.starts.insert(i, x)
                self.ends.insert(i, y)

    def clip(self, a: int, b: int) -> list[tuple[int, int]]:
        """The parts of the set inside [a, b)."""
        out = []
        i = bisect.bisect_right(self.ends, a)
        while i < len(self.starts) and self.starts[i] < b:
            out.append((max(a, self.starts[i]), min(b, self.ends[i])))
            i += 1
        return out


def _refcount_metadata_blocks(clusters: int, cluster_size: int, refcount_order: int,
                              generous_increase: bool) -> int:
    """QEMU's ``qcow2_refcount_metadata_size``: refblocks needed to count ``clusters``
    clusters plus the refcount structures themselves (a fixed point); returns the number of
    refblocks."""
    blocks_per_table_cluster = cluster_size // REFTABLE_ENTRY_SIZE
    refcounts_per_block = cluster_size * 8 >> refcount_order
    table = blocks = 0
    n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // refcounts_per_block)
        table = -(-blocks // blocks_per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous_increase:
            clusters += -(-table // 2)
            n = 0
            generous_increase = False
        if n == last:
            return blocks


class CreateAllocator:
    """A replay of QEMU 7.2's qcow2 cluster allocator, limited to what ``qemu-img create``
    does: allocate the header area, grow the L1 to its exact size (and, for the
    preallocation modes, what ``engine.img.prealloc`` drives: ``alloc``, ``alloc_at`` and an
    exact ``refcount_area``).

    Mirrors ``alloc_clusters_noref``, ``update_refcount`` (with its undo on -EAGAIN),
    ``alloc_refcount_block`` and ``qcow2_refcount_area`` in ``block/qcow2-refcount.c``,
    including the order of writes to the file: a freed refcount table keeps its old bytes,
    and a later, shorter write (the L1) over that cluster leaves the rest of them in place.
    Work is per refcount block or table, never per cluster.
    """

    def __init__(self, cluster_bits: int, refcount_order: int):
        self.cb = cluster_bits
        self.C = 1 << cluster_bits
        self.order = refcount_order
        self.rb_bits = cluster_bits + 3 - refcount_order     # log2(refblock entries)
        self.E = 1 << self.rb_bits
        self.used = _IntervalSet()
        self.free_cluster_index = 0
        self.file = bytearray()
        # qcow2_co_create: cluster 0 (header), cluster 1 (reftable with one entry pointing at
        # cluster 2), cluster 2 (an empty refblock).  No refcounts are set yet.
        self.reftable = [0] * (self.C // REFTABLE_ENTRY_SIZE)
        self.reftable[0] = 2 * self.C
        self.reftable_offset = self.C
        self.max_index = 0
        self._write(0, bytes(self.C))
        self._write(self.C, U64.pack(2 * self.C) + bytes(2 * self.C - REFTABLE_ENTRY_SIZE))

    def _write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > len(self.file):
            self.file.extend(bytes(end - len(self.file)))
        self.file[offset:end] = data

    # -- QEMU functions ----------------------------------------------------------------
    def _free(self, a: int, b: int) -> npt.NDArray[np.bool_]:
        free = np.ones(b - a, dtype=bool)
        for s, e in self.used.clip(a, b):
            free[s - a:e - a] = False
        return free

    def alloc_noref(self, nbytes: int) -> int:
        n = -(-nbytes // self.C)
        end = self.used.ends[-1] if self.used.ends else 0
        p = first_free_run(self._free, end, n, self.free_cluster_index)
        self.free_cluster_index = p + n
        if p + n - 1 > (MAX_CLUSTER_OFFSET - 1) >> self.cb:
            raise SafetyLimitExceeded("image would need host offsets beyond 2^56",
                                      limit=MAX_CLUSTER_OFFSET)
        return p << self.cb

    def update_refcount(self, offset: int, length: int, decrease: bool) -> None:
        if length <= 0:
            return
        first = offset >> self.cb
        last = (offset + length - 1) >> self.cb
        cur = first
        try:
            while cur <= last:
                # QEMU walks cluster by cluster and calls alloc_refcount_block at each new
                # refblock; we jump over every refblock that already exists in one step
                # (QEMU restarts the whole range after each new refblock, so a per-refblock
                # walk here would be quadratic in Python).
                ti = cur >> self.rb_bits
                lim = min((last >> self.rb_bits) + 1, len(self.reftable))
                try:
                    missing = self.reftable.index(0, ti, lim) if ti < lim else ti
                except ValueError:
                    missing = lim
                if missing > ti:
                    chunk_end = min(last + 1, missing << self.rb_bits)
                else:
                    self.alloc_refcount_block(cur)
                    chunk_end = min(last + 1, (ti + 1) << self.rb_bits)
                if decrease:
                    self.used.remove(cur, chunk_end)
                    self.free_cluster_index = min(self.free_cluster_index, cur)
                else:
                    self.used.add(cur, chunk_end)
                cur = chunk_end
        except _Again:
            self.free_cluster_index = min(self.free_cluster_index, first)
            # undo the part already done, as QEMU's fail path does
            self.update_refcount(offset, (cur << self.cb) - offset, not decrease)
            raise

    def alloc(self, nbytes: int) -> int:
        """qcow2_alloc_clusters: find free clusters and take a reference, retrying on
        -EAGAIN."""
        while True:
            offset = self.alloc_noref(nbytes)
            try:
                self.update_refcount(offset, nbytes, False)
                return offset
            except _Again:
                continue

    def alloc_at(self, offset: int, n: int) -> int:
        """qcow2_alloc_clusters_at: take the free clusters among the N from OFFSET on, up
        to the first one in use (retrying on -EAGAIN); returns how many were taken."""
        first = offset >> self.cb
        while True:
            used = self.used.clip(first, first + n)
            k = used[0][0] - first if used else n
            try:
                self.update_refcount(offset, k << self.cb, False)
                return k
            except _Again:
                continue

    def free(self, offset: int, nbytes: int) -> None:
        self.update_refcount(offset, nbytes, True)

    def alloc_refcount_block(self, cluster_index: int) -> None:
        ti = cluster_index >> self.rb_bits
        if ti < len(self.reftable) and self.reftable[ti]:
            return
        new_block = self.alloc_noref(self.C)
        nb_index = new_block >> self.cb
        if new_block == 0:
            raise _internal("refblock allocated at offset 0")
        if nb_index >> self.rb_bits == ti:
            self.used.add(nb_index, nb_index + 1)      # the block describes itself
        else:
            self.update_refcount(new_block, self.C, False)   # may recurse; may raise _Again
        if ti < len(self.reftable):
            self.reftable[ti] = new_block
            self._write(self.reftable_offset + ti * REFTABLE_ENTRY_SIZE, U64.pack(new_block))
            self.max_index = max(self.max_index, ti)
            raise _Again
        blocks_used = -(-max(cluster_index + 1, nb_index + 1) // self.E)
        self.refcount_area(blocks_used * self.E * self.C, ti, new_block)
        raise _Again

    def refcount_area(self, start_offset: int, new_index: int, new_block: int,
                      additional: int = 0, exact: bool = False) -> int:
        """qcow2_refcount_area: new refblocks and a new, larger reftable at
        ``start_offset``, all describing themselves, able to count ``additional`` more
        clusters; ``exact``: no growth margin (a preallocating truncate), else half again
        as many reftable entries (a refblock allocation)."""
        C, E = self.C, self.E
        total = _refcount_metadata_blocks(start_offset // C + additional, C, self.order,
                                          not exact)
        if total > MAX_REFTABLE_SIZE:
            raise SafetyLimitExceeded("refcount table would exceed QEMU's limit",
                                      limit=MAX_REFTABLE_SIZE)
        area_index = (start_offset // C) // E
        table_size = reftable_entries(total if exact else total + -(-total // 2), C)
        table_clusters = reftable_clusters(table_size, C)
        if table_size > MAX_REFTABLE_SIZE:
            raise SafetyLimitExceeded("refcount table would exceed QEMU's limit",
                                      limit=MAX_REFTABLE_SIZE)
        new_table = [0] * table_size
        keep = self.max_index + 1 if table_size > self.max_index else table_size
        new_table[:keep] = self.reftable[:keep]
        if new_block:
            new_table[new_index] = new_block
        additional = sum(1 for i in range(area_index, total) if not new_table[i])
        table_offset = start_offset + additional * C
        end_offset = table_offset + table_clusters * C
        block_offset = start_offset
        for i in range(area_index, total):
            if not new_table[i]:
                new_table[i] = block_offset
                block_offset += C
            first_covered = i * E * C
            if first_covered < end_offset:
                j = (start_offset - first_covered) // C if first_covered < start_offset else 0
                end_index = min((end_offset - first_covered) // C, E)
                base = first_covered // C
                self.used.add(base + j, base + end_index)
        table_bytes = b"".join(U64.pack(e) for e in new_table)
        self._write(table_offset, table_bytes)
        old_offset, old_entries = self.reftable_offset, len(self.reftable)
        self.reftable = new_table
        self.reftable_offset = table_offset
        self.max_index = max((i for i, e in enumerate(new_table) if e), default=0)
        self.free(old_offset, old_entries * REFTABLE_ENTRY_SIZE)
        return end_offset

    # -- output ---------------------------------------------------------------------------
    @property
    def reftable_clusters(self) -> int:
        return reftable_clusters(len(self.reftable), self.C)

    def write_refblocks(self) -> None:
        """Write every refblock with its final content (QEMU's cache flush at close).

        Refblocks are full clusters that nothing else writes to once they are live, so
        writing them last gives the same bytes as QEMU's several flushes."""
        table = self.reftable
        for i in range(min(self.max_index + 1, len(table))):    # entries past it are 0
            if not table[i]:
                continue
            first = i * self.E
            runs = [(a - first, b - first) for a, b in self.used.clip(first, first + self.E)]
            self._write(table[i], refblock_with_ones(runs, self.order, self.C))



def new_image_header(size: int, *, cluster_size: int = DEFAULT_CLUSTER_SIZE,
                     compat: str = COMPAT_V3, refcount_bits: int = 16,
                     lazy_refcounts: bool = False, backing_file: str | None = None,
                     backing_format: str | None = None, extended_l2: bool = False,
                     compression_type: str = "zlib") -> Header:
    """The checked header of a new QCOW2 image (``qemu-img create -f qcow2 -o
    cluster_size=..,compat=..,refcount_bits=..,lazy_refcounts=..,extended_l2=..,
    compression_type=.. [-b NAME -F FMT] FILE SIZE``), its table offsets not placed yet
    (:func:`lay_out_new_image` places them).

    Arguments:
        size (int): virtual size in bytes; rounded up to a multiple of 512 as qemu-img does.
        cluster_size (int): bytes, a power of two from 512 to 2 MiB.
        compat (str): "1.1" (v3) or "0.10" (v2).
        refcount_bits (int): 1, 2, 4, 8, 16, 32 or 64 (v2: 16 only).
        lazy_refcounts (bool): set compatible bit 0 (v3 only).
        backing_file (str | None): backing file name stored as given (not resolved).
        backing_format (str | None): the backing file's format; required with a backing file
            (qemu-img 7.2 refuses to create an overlay without it).
        extended_l2 (bool): 128-bit L2 entries (v3, clusters of at least 16 KiB).
        compression_type (str): "zlib" or "zstd" (v3 only for zstd).

    Raises:
        InvalidArgument: an option is out of range or the options conflict, or the size is
            over :func:`max_virtual_size` (an L1 over 32 MiB).
        SafetyLimitExceeded: the backing name or format is too long for the header.
    """
    cluster_bits = cluster_size_arg(cluster_size).bit_length() - 1
    version = COMPAT_VERSIONS[choice_arg(compat, "compat", (COMPAT_V2, COMPAT_V3, "v2", "v3"))]
    refcount_bits = int_arg(refcount_bits, "refcount_bits", minimum=1, maximum=64)
    if refcount_bits & (refcount_bits - 1):
        raise InvalidArgument(f"refcount_bits must be a power of two from 1 to 64, got "
                              f"{refcount_bits!r}", value=refcount_bits)
    refcount_order = refcount_bits.bit_length() - 1
    compression = {v: k for k, v in COMPRESSION_NAMES.items()}[
        choice_arg(compression_type, "compression_type", tuple(COMPRESSION_NAMES.values()))]
    bool_arg(lazy_refcounts, "lazy_refcounts")
    bool_arg(extended_l2, "extended_l2")
    if version == 2:
        if refcount_bits != 16:
            raise InvalidArgument("compat 0.10 requires refcount_bits=16")
        if lazy_refcounts:
            raise InvalidArgument("lazy refcounts require compat 1.1 or later")
        if extended_l2:
            raise InvalidArgument("extended L2 entries require compat 1.1 or later")
        if compression != COMPRESSION_ZLIB:
            raise InvalidArgument("compression_type zstd requires compat 1.1 or later")
    if extended_l2 and cluster_size < EXTL2_MIN_CLUSTER_SIZE:
        raise InvalidArgument(f"extended L2 entries are only supported with cluster sizes of "
                              f"at least {EXTL2_MIN_CLUSTER_SIZE} bytes")
    if backing_file is not None:
        if not isinstance(backing_file, str) or not backing_file:
            raise InvalidArgument("backing_file must be a non-empty string", value=backing_file)
        if backing_format is None:
            raise InvalidArgument("backing file specified without backing format",
                                  hint="pass backing_format ('raw' or 'qcow2'); formats are "
                                       "never probed")
    if backing_format is not None:
        if backing_file is None:
            raise InvalidArgument("backing format cannot be used without a backing file")
        if not isinstance(backing_format, str) or not backing_format:
            raise InvalidArgument("backing_format must be a non-empty string",
                                  value=backing_format)

    size = check_virtual_size(size, "qcow2", cluster_size=cluster_size,
                              extended_l2=extended_l2)
    size = -(-size // SECTOR_SIZE) * SECTOR_SIZE
    l1_size = l1_entries_for(size, cluster_bits, extended_l2)

    incompat = 0
    if extended_l2:
        incompat |= INCOMPAT_EXTL2
    if compression != COMPRESSION_ZLIB:
        incompat |= INCOMPAT_COMPRESSION
    h = Header(
        version=version, backing_file_offset=0, backing_file_size=0,
        cluster_bits=cluster_bits, size=size, crypt_method=CRYPT_NONE, l1_size=l1_size,
        l1_table_offset=0, refcount_table_offset=0, refcount_table_clusters=0,
        nb_snapshots=0, snapshots_offset=0, incompatible_features=incompat,
        compatible_features=COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
        refcount_order=refcount_order,
        header_length=V3_HEADER_LENGTH if version == 3 else V2_HEADER_LENGTH,
        compression_type=compression, backing_file=backing_file,
        backing_format=backing_format)
    # Fail on a too-long backing name before doing any work.
    encode_header(h)

    return h


def lay_out_new_image(h: Header, sim: CreateAllocator,
                      preallocate: Callable[[CreateAllocator, Header], None] | None = None
                      ) -> None:
    """Replay ``qemu-img create`` for the header H (from :func:`new_image_header`) on SIM:
    the header clusters, the L1 grown to its exact size, then PREALLOCATE (the
    ``preallocation`` modes other than off, which continue the same allocator), the
    refblocks and the header, with its table offsets filled in."""
    # qcow2_co_create: open the new image and take references on the first three clusters.
    if sim.alloc(CREATE_HEADER_CLUSTERS * sim.C) != 0:
        raise _internal("header clusters not at offset 0")
    # blk_truncate -> qcow2_grow_l1_table(exact): a zeroed L1 of exactly l1_size entries,
    # written with its byte length (the file is not padded to a cluster).
    if h.l1_size:
        h.l1_table_offset = sim.alloc(h.l1_size * L1E_SIZE)
        sim._write(h.l1_table_offset, bytes(h.l1_size * L1E_SIZE))
    if preallocate is not None:
        preallocate(sim, h)
    sim.write_refblocks()
    h.refcount_table_offset = sim.reftable_offset
    h.refcount_table_clusters = sim.reftable_clusters
    sim._write(0, encode_header(h))


def new_image_layout(size: int, *, cluster_size: int = DEFAULT_CLUSTER_SIZE,
                     compat: str = COMPAT_V3, refcount_bits: int = 16,
                     lazy_refcounts: bool = False, backing_file: str | None = None,
                     backing_format: str | None = None, extended_l2: bool = False,
                     compression_type: str = "zlib") -> tuple[Header, bytes]:
    """The complete initial content of a new, empty QCOW2 file (preallocation off).

    Byte-identical to ``qemu-img create -f qcow2 -o OPTIONS FILE SIZE`` from QEMU 7.2, file
    length included: header cluster, refcount table and blocks, and a zeroed L1 whose last
    cluster is not padded.  For most images that is 3 clusters plus the L1; when the L1
    needs more refcount blocks than the first reftable cluster holds, QEMU's
    self-describing reftable growth is replayed.  Arguments and errors: those of
    :func:`new_image_header`.

    Returns:
        (Header, bytes): the parsed header of the new image and the whole file content.
    """
    h = new_image_header(size, cluster_size=cluster_size, compat=compat,
                         refcount_bits=refcount_bits, lazy_refcounts=lazy_refcounts,
                         backing_file=backing_file, backing_format=backing_format,
                         extended_l2=extended_l2, compression_type=compression_type)
    sim = CreateAllocator(h.cluster_bits, h.refcount_order)
    lay_out_new_image(h, sim)
    data = bytes(sim.file)
    return parse_header(data[:min(len(data), 1 << MAX_CLUSTER_BITS)], len(data)), data
