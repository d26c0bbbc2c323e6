"""Runs of the guest disk, as the bulk operations combine them: one home for the rule.

The core's block status (``Image.extents``) is where extent runs are coalesced, by the rule
``qemu-img map`` uses (depth, zero/data flags, contiguous host offsets).  The operations only
re-merge those runs by a *coarser* kind (whether a range reads zeros, whether a merge must copy
it, whether it differs at all), and they all do it through :func:`coalesce`; :func:`subtract`
takes the ranges one layer holds out of another's.

A run here is ``(start, length, kind)``, with any comparable KIND.
"""

from __future__ import annotations

from typing import Iterable, Sequence, TypeVar

K = TypeVar("K")


def coalesce(runs: Iterable[tuple[int, int, K]]) -> list[tuple[int, int, K]]:
    """RUNS (sorted by start) with touching or overlapping runs of one kind merged into one.

    >>> coalesce([(0, 4, "z"), (4, 4, "z"), (8, 2, "d"), (9, 3, "d"), (20, 1, "d")])
    [(0, 8, 'z'), (8, 4, 'd'), (20, 1, 'd')]
    """
    out: list[tuple[int, int, K]] = []
    for start, length, kind in runs:
        if out:
            s0, n0, k0 = out[-1]
            if k0 == kind and start <= s0 + n0:
                if start + length > s0 + n0:
                    out[-1] = (s0, start + length - s0, kind)
                continue
        out.append((start, length, kind))
    return out


def subtract(runs: Iterable[tuple[int, int, K]],
             held: Sequence[tuple[int, int, object]]) -> list[tuple[int, int, K]]:
    """The parts of RUNS outside the ranges of HELD (both sorted by start, each disjoint),
    with their kinds.

    >>> subtract([(0, 10, "d"), (20, 10, "z")], [(2, 3, "x"), (8, 14, "x")])
    [(0, 2, 'd'), (5, 3, 'd'), (22, 8, 'z')]
    """
    out: list[tuple[int, int, K]] = []
    j = 0
    for start, length, kind in runs:
        pos, end = start, start + length
        while j < len(held) and held[j][0] + held[j][1] <= pos:
            j += 1
        k = j
        while pos < end:
            if k == len(held) or held[k][0] >= end:
                out.append((pos, end - pos, kind))
                break
            hs, he = held[k][0], held[k][0] + held[k][1]
            if hs > pos:
                out.append((pos, hs - pos, kind))
            pos = max(pos, he)
            k += 1
    return out
