"""Rebuilding the refcount structures: QEMU's ``rebuild_refcount_structure``.

:class:`_Imrt` is QEMU's in-memory refcount table (one refcount per cluster of the file),
:func:`_rebuild` lays out and writes new refcount blocks and a new reftable where
``qemu-img check -r all`` puts them, then switches the header pointer.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from engine.qcow2 import spec
from engine.qcow2.refblocks import (
    encode_refblocks,
    first_free_run,
    reftable_clusters,
    reftable_entries,
)
from engine.check.result import _Pass
from engine.check.reader import _Image

_U64 = np.uint64


class _Imrt:
    """QEMU's in-memory refcount table for a rebuild: one refcount per cluster of the file
    (dense, so its size is bounded by the file size, as QEMU's), which can grow at the end.

    Clusters that something names but the count does not include (a refcount block with a bad
    reftable entry, a skipped snapshot L1 table, a pointer past the end of the file) are
    *blocked*: a rebuild never places anything there, so that no new structure can be
    overwritten through such a pointer (QEMU relies on its metadata overlap check, which does
    not cover all of them)."""

    def __init__(self, img: _Image, idx: npt.NDArray[np.int64], cnt: npt.NDArray[np.int64],
                 n: int, protect: npt.NDArray[np.int64]) -> None:
        self.dtype = {1: np.uint8, 2: np.uint8, 4: np.uint8, 8: np.uint8, 16: np.uint16,
                      32: np.uint32, 64: np.uint64}[img.h.refcount_bits]
        self.n = n
        far = np.unique(protect[protect >= 0]) if len(protect) else np.zeros(0, np.int64)
        # Room for every blocked cluster: past the end of the arrays nothing is in use or
        # blocked.
        cap = max(n, 1, int(far[-1]) + 1 if len(far) else 0) + 1024
        self.vals = np.zeros(cap, dtype=self.dtype)
        self.vals[idx] = cnt.astype(self.dtype)
        self.blocked = np.zeros(cap, dtype=bool)
        self.blocked[far] = True

    def grow(self, n: int) -> None:
        """The table now covers ``n`` clusters (at least)."""
        if n > len(self.vals):
            cap = max(n, 2 * len(self.vals))
            vals = np.zeros(cap, dtype=self.dtype)
            vals[:len(self.vals)] = self.vals
            blocked = np.zeros(cap, dtype=bool)
            blocked[:len(self.blocked)] = self.blocked
            self.vals, self.blocked = vals, blocked
        self.n = max(self.n, n)

    def _free(self, a: int, b: int) -> npt.NDArray[np.bool_]:
        free: npt.NDArray[np.bool_] = (self.vals[a:b] == 0) & ~self.blocked[a:b]
        return free

    def _used(self, a: int, b: int) -> npt.NDArray[np.bool_]:
        used: npt.NDArray[np.bool_] = self.vals[a:b] != 0
        return used

    def first_used(self, start: int, end: int) -> int:
        """The first cluster in [start, end) with a refcount; -1 if none."""
        c = first_free_run(self._used, end, 1, start)
        return c if c < end else -1

    def alloc(self, count: int, first_free: int) -> tuple[int, int]:
        """alloc_clusters_imrt: the first run of ``count`` free clusters at or after
        first_free (growing the table at its end if needed); they get refcount 1.
        Returns (cluster index, updated first_free: the first free cluster it met)."""
        c = first_free_run(self._free, len(self.vals), count, first_free)
        seen = first_free_run(self._free, self.n, 1, first_free)
        if seen < self.n:
            first_free = seen
        self.grow(c + count)
        self.vals[c:c + count] = 1
        return c, first_free


def _rebuild(p: _Pass, img: _Image, idx: np.ndarray, cnt: np.ndarray, nb: int,
             protect: np.ndarray) -> bool:
    """rebuild_refcount_structure, step for step as QEMU 7.2 does it, so that the new layout
    is the one ``qemu-img check -r all`` would write: refblocks go into the first free
    clusters (clusters nothing references), each refblock range being written in order, then
    the reftable into the first free run, repeating while the reftable grows; then the header
    pointer is switched. The old structures are then unreferenced: the caller frees them.

    Ordering: every new refblock and the reftable are written to clusters no structure
    references and synced before the 12-byte header pointer is written and synced, so a crash
    at any point leaves either the old structures (and the same repair to do again) or the
    new ones."""
    C, E = img.C, img.E
    imrt = _Imrt(img, idx, cnt, nb, protect)
    reftable = np.zeros(0, dtype=np.int64)

    def write_refblocks(first: int, end: int) -> bool:
        nonlocal reftable
        first_free = 0
        grown = False
        cluster = first
        while cluster < end:
            cluster = imrt.first_used(cluster, min(end, imrt.n))
            if cluster < 0:
                break
            ri = cluster >> img.rb_bits
            rstart = ri << img.rb_bits
            if ri < len(reftable) and reftable[ri]:
                roff = int(reftable[ri])
            else:
                first_free = max(first_free, rstart)
                rc, first_free = imrt.alloc(1, first_free)
                roff = rc * C
                if rc >= end:
                    end = rc + 1           # that refblock's own refcount must be written too
                if ri >= len(reftable):
                    entries = reftable_entries(ri + 1, C)
                    reftable = np.concatenate((reftable, np.zeros(entries - len(reftable),
                                                                  np.int64)))
                    grown = True
                reftable[ri] = roff
            block = np.zeros((1, E), _U64)
            hi = min(rstart + E, imrt.n)
            if hi > rstart:
                block[0, :hi - rstart] = imrt.vals[rstart:hi]
            img.pwrite(roff, encode_refblocks(block, img.rorder))
            cluster = rstart + E
        return grown

    write_refblocks(0, nb)
    for _ in range(64):
        n_rt = reftable_clusters(len(reftable), C)
        rt_cluster, _ff = imrt.alloc(n_rt, 0)
        if not write_refblocks(rt_cluster, rt_cluster + n_rt):
            break
    else:
        p.fail("ERROR cannot lay out the new refcount structures")
        return False
    rt_off = rt_cluster * C
    if n_rt * C > spec.MAX_REFTABLE_SIZE or (rt_off + n_rt * C) >= spec.MAX_CLUSTER_OFFSET:
        p.fail("ERROR rebuilding the refcount structures would need a refcount table larger "
               "than QEMU allows")
        return False
    img.pwrite(rt_off, reftable.astype(">u8").tobytes())
    img.sync()
    img.pwrite(spec.HDR_REFCOUNT_TABLE_OFFSET, spec.U64.pack(rt_off) + spec.U32.pack(n_rt))
    img.sync()
    return True
