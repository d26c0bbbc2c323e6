"""Allocation counts from the mapping tables (``extents``), never from the data."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.ops._copy import Run

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
    runs: list[Run] = []
    for e in image.extents():
        if not e.present or not lo <= e.depth <= depth:
            continue
        zero = bool(e.zero) and not e.data
        if zero and not keep_zeros:
            continue
        if runs and runs[-1][2] == zero and runs[-1][0] + runs[-1][1] == e.start:
            last = runs[-1]
            runs[-1] = (last[0], last[1] + e.length, zero)
        else:
            runs.append((e.start, e.length, zero))
    return runs


def allocated_bytes(image: Image, depth: int = 0, *, keep_zeros: bool = True) -> int:
    """Bytes of the guest disk that layer DEPTH of IMAGE's chain holds (see layer_runs)."""
    return sum(r[1] for r in layer_runs(image, depth, keep_zeros=keep_zeros))


def merge_costs(image: Image, *, keep_zeros: bool = True) -> tuple[int, int]:
    """The two ways to merge IMAGE with its backing volume, priced in guest bytes to write.

    Arguments:
        image (Image): the upper volume, opened with its chain (depth 1 is the volume under).
        keep_zeros (bool): a pull must also copy the lower volume's zero ranges (False when
            nothing remains under the lower volume, so zeros read as zeros anyway).

    Returns:
        (commit, pull): bytes a commit of IMAGE down into its backing volume writes (all IMAGE
        holds), and bytes a pull of the backing volume up into IMAGE writes (what the backing
        volume holds and IMAGE does not).  One ``extents`` call answers both.
    """
    commit = pull = 0
    for e in image.extents():
        if not e.present:
            continue
        if e.depth == 0:
            commit += e.length
        elif e.depth == 1 and (keep_zeros or e.data or not e.zero):
            pull += e.length
    return commit, pull
