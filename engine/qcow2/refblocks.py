"""Refcount blocks and the refcount table: the codec for every refcount width (§5.1).

A refcount block is one cluster of ``cluster_size * 8 >> refcount_order`` big-endian
entries of ``1 << refcount_order`` bits; entries narrower than a byte are packed from the
least significant bit of each byte.  The numpy codec (:func:`decode_refblocks`,
:func:`encode_refblocks`) serves the check and repair; :func:`refblock_with_ones` serves
the create-time layout.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from engine.errors import InvalidArgument

from engine.qcow2.spec import (
    MAX_DISK_LENGTH,
    MAX_REFCOUNT_ORDER,
    REFT_OFFSET_MASK,
)

__all__ = ["decode_refblocks", "encode_refblocks", "refblock_with_ones", "reftable_offsets"]

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
