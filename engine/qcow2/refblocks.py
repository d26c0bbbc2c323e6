"""Refcount blocks and the refcount table: the codec for every refcount width (§5.1), the
sizing of the refcount table, and the search for free clusters.

A refcount block is one cluster of ``cluster_size * 8 >> refcount_order`` big-endian
entries of ``1 << refcount_order`` bits; entries narrower than a byte are packed from the
least significant bit of each byte.  The numpy codec (:func:`decode_refblocks`,
:func:`encode_refblocks`) serves the check and repair; :func:`refblock_with_ones` serves
the create-time layout.

The two Python replays of QEMU's allocators, the create-time one
(:class:`engine.qcow2.layout.CreateAllocator`) and the rebuild's in-memory refcount table
(``engine.check.rebuild``), share :func:`first_free_run` (where free clusters are found),
:func:`reftable_entries` and :func:`reftable_clusters` (how a refcount table is sized), and
this codec; each keeps its own state and order of allocation, which is QEMU's for that
algorithm.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from engine.errors import InvalidArgument

from engine.qcow2.spec import (
    MAX_DISK_LENGTH,
    MAX_REFCOUNT_ORDER,
    REFTABLE_ENTRY_SIZE,
    REFT_OFFSET_MASK,
)

__all__ = ["decode_refblocks", "encode_refblocks", "first_free_run", "refblock_with_ones",
           "reftable_clusters", "reftable_entries", "reftable_offsets"]

_U64 = np.uint64
# Where QEMU's block layer refuses a read (BDRV_MAX_LENGTH): a refblock there cannot be read.
_PINNED = 1 << 62


def _bits(order: int) -> int:
    if not 0 <= order <= MAX_REFCOUNT_ORDER:
        raise InvalidArgument(f"refcount order {order} outside 0..{MAX_REFCOUNT_ORDER}",
                              value=order)
    return 1 << order


def decode_refblocks(raw: npt.NDArray[np.uint8], order: int) -> npt.NDArray[np.uint64]:
    """Refcount blocks (rows of ``cluster_size`` bytes, a 2-D uint8 array) to a
    (rows, entries) uint64 array."""
    bits = _bits(order)
    if bits >= 8:
        return raw.view(f">u{bits // 8}").astype(_U64)
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint8) * np.uint8(bits)
    vals = (raw[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return vals.reshape(raw.shape[0], -1).astype(_U64)


def encode_refblocks(vals: npt.NDArray[np.uint64], order: int) -> bytes:
    """The inverse of :func:`decode_refblocks`: (rows, entries) values to the bytes of the
    rows, one refcount block after the other.  Values must fit the width."""
    bits = _bits(order)
    if bits >= 8:
        return np.ascontiguousarray(vals.astype(f">u{bits // 8}")).tobytes()
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint8) * np.uint8(bits)
    v = vals.astype(np.uint8).reshape(vals.shape[0], -1, per)
    return bytes(np.bitwise_or.reduce(v << shifts, axis=-1).astype(np.uint8).tobytes())


def refblock_with_ones(runs: list[tuple[int, int]], refcount_order: int, cluster_size: int
                       ) -> bytes:
    """One refcount block with refcount 1 for the entries in ``runs`` (block-relative
    [start, end) entry indexes) and 0 elsewhere."""
    vals = np.zeros((1, (cluster_size * 8) >> refcount_order), dtype=_U64)
    for a, b in runs:
        vals[0, a:b] = 1
    return encode_refblocks(vals, refcount_order)


def reftable_offsets(rt: npt.NDArray[np.uint64], cluster_size: int
                     ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """(offsets, unreadable) of reftable entries (native uint64 values).

    The refblock offsets as int64, and where QEMU cannot read the block: an offset not
    cluster-aligned, or past the block layer's maximum length (EIO).  Offsets past 2**62,
    which no file reaches, are pinned there keeping their misalignment, so they read as
    zeros and count as outside the file."""
    off = rt & _U64(REFT_OFFSET_MASK)
    unreadable = ((off & _U64(cluster_size - 1)) != 0) | (
        off > _U64(MAX_DISK_LENGTH - cluster_size))
    huge = off >= _U64(_PINNED)
    if huge.any():
        off = np.where(huge, _U64(_PINNED) | (off & _U64(cluster_size - 1)), off)
    return off.astype(np.int64), unreadable


def reftable_entries(n: int, cluster_size: int) -> int:
    """Entries of a refcount table holding at least ``n`` entries: whole clusters of them."""
    per_cluster = cluster_size // REFTABLE_ENTRY_SIZE
    return -(-n // per_cluster) * per_cluster


def reftable_clusters(entries: int, cluster_size: int) -> int:
    """Clusters a refcount table of ``entries`` entries takes."""
    return -(-entries * REFTABLE_ENTRY_SIZE // cluster_size)


#: ``is_free(a, b)``: whether each of the clusters ``a .. b-1`` is free (a bool array).
FreeMask = Callable[[int, int], npt.NDArray[np.bool_]]

_FIRST_WINDOW = 4096


def first_free_run(is_free: FreeMask, end: int, count: int, start: int = 0) -> int:
    """The first cluster ``c >= start`` such that clusters ``c .. c+count-1`` are all free,
    where every cluster at or past ``end`` is free (nothing is allocated past the end of
    the refcounts): the search of QEMU's ``alloc_clusters_noref`` and
    ``alloc_clusters_imrt``.  When no run fits before ``end``, the answer is the start of
    the free run that reaches ``end`` (the table then grows), or ``max(start, end)``.

    ``is_free`` is asked about windows that grow from ``start``, so a hit near it costs
    little whatever the size of the table.
    """
    run = start                 # where the free run in progress began
    pos = start
    window = max(_FIRST_WINDOW, count)
    while pos < end:
        stop = min(end, pos + window)
        used = np.flatnonzero(~is_free(pos, stop)) + pos
        starts = np.concatenate(([run], used + 1))
        ends = np.concatenate((used, [stop]))
        fits = np.flatnonzero(ends - starts >= count)
        if len(fits):
            return int(starts[fits[0]])
        run = int(starts[-1])
        pos = stop
        window *= 4
    return run
