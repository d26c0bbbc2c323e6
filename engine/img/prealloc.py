"""``create -o preallocation=metadata|falloc|full``: the file ``qemu-img create`` writes.

QEMU 7.2 creates the empty image and then grows it to its size with the preallocation mode;
the cluster allocator of :class:`engine.qcow2.layout.CreateAllocator` is continued here the
way that grow continues it, so the layout (and ``qemu-img map``'s offsets) are QEMU's:

- ``metadata`` (``preallocate_co``): for each stretch of the disk, the L2 table when it is
  missing, then the data clusters, first fit, as the write path allocates them (a refcount
  block that a run needs lands right after it).  Every L2 entry points at its cluster with
  the COPIED flag; the data clusters are counted but never written (the file has holes;
  they read as zeros), and the file ends at the last data cluster.
- ``falloc`` and ``full`` (``qcow2_co_truncate``): a refcount area, exactly sized for the
  data clusters and their L2 tables, at the end of the file (the old refcount table is
  freed), the data clusters in one run after it, the file grown over them (``falloc``:
  ``posix_fallocate``; ``full``: zeros written), then the L2 tables, first fit (the first
  one in the freed cluster of the old refcount table).

With extended L2 entries the subcluster bitmaps stay 0 (QEMU marks nothing allocated on a
preallocation), so the clusters read as unallocated: zeros, or the backing file.
"""

from __future__ import annotations

import os

from engine.errors import io_error
from engine.qcow2.header import Header
from engine.qcow2.layout import CreateAllocator, lay_out_new_image
from engine.qcow2.spec import (INT_MAX, L1E_SIZE, L2E_SIZE_EXTENDED, L2E_SIZE_NORMAL,
                               QCOW_OFLAG_COPIED, U64)

#: The modes that allocate clusters (``off`` is :func:`engine.image.create`'s layout).
MODES = ("metadata", "falloc", "full")


class _Layout(CreateAllocator):
    """The allocator with its writes kept as pieces: the data clusters of a preallocated
    image are never written, so the file is not built in memory."""

    def __init__(self, cluster_bits: int, refcount_order: int):
        self.pieces: list[tuple[int, bytes]] = []
        self.length = 0
        self.data_runs: list[tuple[int, int]] = []     # (host offset, bytes) to allocate
        super().__init__(cluster_bits, refcount_order)

    def _write(self, offset: int, data: bytes) -> None:
        self.pieces.append((offset, bytes(data)))
        self.length = max(self.length, offset + len(data))


class _Tables:
    """The L1 and L2 entries a preallocation sets (written once, at the end, as QEMU's
    table caches write them at close)."""

    def __init__(self, sim: _Layout, h: Header):
        self.sim, self.h = sim, h
        self.entry = L2E_SIZE_EXTENDED if h.extended_l2 else L2E_SIZE_NORMAL
        self.per_l2 = sim.C // self.entry
        self.l2: dict[int, bytearray] = {}          # L1 index -> table
        self.l2_offset: dict[int, int] = {}

    def table(self, l1_index: int) -> bytearray:
        """get_cluster_table: the L2 table, allocated (first fit) when missing."""
        if l1_index not in self.l2:
            off = self.sim.alloc(self.sim.C)
            self.l2_offset[l1_index] = off
            self.l2[l1_index] = bytearray(self.sim.C)
        return self.l2[l1_index]

    def link(self, guest_cluster: int, host: int, n: int) -> None:
        """qcow2_alloc_cluster_link_l2 for N clusters from GUEST_CLUSTER to HOST."""
        C = self.sim.C
        while n:
            l1i, l2i = divmod(guest_cluster, self.per_l2)
            t = self.table(l1i)
            k = min(n, self.per_l2 - l2i)
            for i in range(k):
                U64.pack_into(t, (l2i + i) * self.entry, (host + i * C) | QCOW_OFLAG_COPIED)
            guest_cluster, host, n = guest_cluster + k, host + k * C, n - k

    def write(self) -> None:
        for l1i, t in sorted(self.l2.items()):
            off = self.l2_offset[l1i]
            self.sim._write(off, bytes(t))
            self.sim._write(self.h.l1_table_offset + l1i * L1E_SIZE,
                            U64.pack(off | QCOW_OFLAG_COPIED))


def _metadata(sim: _Layout, h: Header) -> None:
    """preallocate_co: calls of qcow2_alloc_host_offset over at most INT_MAX bytes each;
    a call extends its first run only where the next clusters are still free."""
    t = _Tables(sim, h)
    C = sim.C
    clusters = -(-h.size // C)
    per_call = (INT_MAX // C * C) // C
    g = 0
    end = 0
    while g < clusters:
        cur = min(clusters - g, per_call)
        done = 0
        host = -1
        while done < cur:
            gg = g + done
            t.table(gg // t.per_l2)
            n = min(cur - done, t.per_l2 - gg % t.per_l2)
            if host < 0:
                off = sim.alloc(n * C)
            else:
                n = sim.alloc_at(host, n)
                if n == 0:
                    break
                off = host
            t.link(gg, off, n)
            host = off + n * C
            end = max(end, host)
            done += n
        g += done
    t.write()
    sim.length = max(sim.length, end)


def _allocate_data(sim: _Layout, h: Header) -> None:
    """qcow2_co_truncate with falloc/full: an exact refcount area for the data clusters and
    their L2 tables (one more for an unaligned head or tail), the data run after it, then
    the L2 entries."""
    t = _Tables(sim, h)
    C = sim.C
    clusters = -(-h.size // C)
    old_end = sim.used.ends[-1] * C if sim.used.ends else 0     # qcow2_get_last_cluster
    l2_tables = -(-clusters // t.per_l2) + 1
    start = sim.refcount_area(old_end, 0, 0, additional=clusters + l2_tables, exact=True)
    if sim.alloc_at(start, clusters) != clusters:
        raise AssertionError("the preallocated data area is not free")
    if clusters:
        sim.data_runs.append((start, clusters * C))
    sim.length = max(sim.length, start + clusters * C)
    t.link(0, start, clusters)
    t.write()


def preallocated_image(h: Header, mode: str) -> _Layout:
    """The layout of a new image with header H (:func:`engine.qcow2.layout.new_image_header`)
    preallocated with MODE ("metadata", "falloc" or "full")."""
    sim = _Layout(h.cluster_bits, h.refcount_order)
    step = _metadata if mode == "metadata" else _allocate_data
    lay_out_new_image(h, sim, lambda _sim, hdr: step(sim, hdr))
    return sim


def write_layout(fd: int, sim: _Layout, mode: str, path: str) -> None:
    """Write SIM's pieces into the empty file FD, set its length, and allocate the data
    clusters as MODE asks (``falloc``: posix_fallocate; ``full``: zeros written)."""
    try:
        for offset, data in sim.pieces:
            os.pwrite(fd, data, offset)
        os.ftruncate(fd, max(sim.length, os.fstat(fd).st_size))
        for start, length in sim.data_runs:
            if mode == "falloc":
                os.posix_fallocate(fd, start, length)
            elif mode == "full":
                preallocate_zeros(fd, start, length)
        os.fsync(fd)
    except OSError as e:
        raise io_error(e.errno or 0, "cannot write the preallocated image", path=path) from None


def write_raw(fd: int, size: int, mode: str, path: str) -> None:
    """A raw image of SIZE bytes in the empty file FD, its blocks allocated as MODE asks
    ("falloc" or "full")."""
    try:
        os.ftruncate(fd, size)
        if size and mode == "falloc":
            os.posix_fallocate(fd, 0, size)
        elif size and mode == "full":
            preallocate_zeros(fd, 0, size)
        os.fsync(fd)
    except OSError as e:
        raise io_error(e.errno or 0, "cannot write the preallocated image", path=path) from None


def preallocate_zeros(fd: int, start: int, length: int) -> None:
    """``preallocation=full``: write zeros over LENGTH bytes from START (blocks allocated
    and written, not holes)."""
    chunk = bytes(min(length, 4 << 20))
    pos, end = start, start + length
    while pos < end:
        pos += os.pwrite(fd, chunk[:end - pos], pos)
