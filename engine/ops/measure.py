"""Allocation counts from the mapping tables (``extents``), never from the data."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.image.extent import BS_DATA, BS_PRESENT, BS_ZERO
from engine.ops._copy import Run
from engine.ops.runs import coalesce

if TYPE_CHECKING:
    from engine.image import Image


def layer_runs(image: Image, depth: int = 0, *, keep_zeros: bool = True,
               min_depth: int | None = None) -> list[Run]:
    """The runs that layers MIN_DEPTH..DEPTH of IMAGE's chain hold, as (start, length, zero).

    Arguments:
        image (Image): an open image; depth 0 is the image itself, 1 its backing file, ...
        depth (int): the deepest layer to include.
        keep_zeros (bool): include ranges those layers hold as zeros (zero clusters, holes of
            a raw file); False keeps only ranges that read data.
        min_depth (int | None): the shallowest layer to include (default: DEPTH).

    Returns:
        list of (start, length, zero) in guest order, adjacent runs of one kind merged.
    """
    lo = depth if min_depth is None else min_depth
    if image.size == 0:
        return []
    # The core's block status table (start, length, depth, flags, offset), filtered with
    # numpy: a volume written in scattered clusters has one row per cluster, and building an
    # Extent for each would cost more than the merge that follows.
    st = image._core.block_status(0, image.size)
    flags, d = st[:, 3], st[:, 2]
    zero = (flags & BS_ZERO != 0) & (flags & BS_DATA == 0)
    keep = (flags & BS_PRESENT != 0) & (d >= lo) & (d <= depth)
    if not keep_zeros:
        keep &= ~zero
    return coalesce(zip(st[keep, 0].tolist(), st[keep, 1].tolist(), zero[keep].tolist()))


def allocated_bytes(image: Image, depth: int = 0, *, keep_zeros: bool = True) -> int:
    """Bytes of the guest disk that layer DEPTH of IMAGE's chain holds (see layer_runs)."""
    return sum(r[1] for r in layer_runs(image, depth, keep_zeros=keep_zeros))

