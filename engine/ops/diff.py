"""Diff: which guest ranges differ between two points of a chain, from the tables alone."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, NamedTuple

from engine.ops.runs import coalesce

if TYPE_CHECKING:
    from engine.image import Image


class Change(NamedTuple):
    """A guest range that may differ between two points, and how it reads at the later one.

    Attributes:
        start (int): guest offset, bytes.
        length (int): bytes.
        zero (bool): the range reads as zeros at the later point.
        data (bool): reading it at the later point touches stored data.
    """

    start: int
    length: int
    zero: bool
    data: bool

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


def allocated_ranges(images: Iterable[Image]) -> list[tuple[int, int]]:
    """Union of the ranges each image holds itself (depth 0), merged: [(start, end)].

    Arguments:
        images (iterable of Image): volumes opened alone (``backing=False``) or with their
            chain; only depth-0 extents count.
    """
    spans = sorted((e.start, e.length, None) for img in images for e in img.extents()
                   if e.present and e.depth == 0)
    return [(s, s + n) for s, n, _ in coalesce(spans)]


def annotate(ranges: list[tuple[int, int]], view: Image) -> list[Change]:
    """Split RANGES along VIEW's extents and label each piece with how VIEW reads it
    (adjacent pieces read alike are one).

    A two-pointer walk over two sorted lists: one Python step per range or extent.

    Arguments:
        ranges (list of (start, end)): sorted, disjoint.
        view (Image): the later point, opened with its chain.
    """
    if not ranges:
        return []
    extents = view.extents()
    pieces: list[tuple[int, int, tuple[bool, bool]]] = []
    j = 0
    for s, e in ranges:
        while j < len(extents) and extents[j].start + extents[j].length <= s:
            j += 1
        k, pos = j, s
        while pos < e and k < len(extents):
            x = extents[k]
            end = min(e, x.start + x.length)
            pieces.append((pos, end - pos, (bool(x.zero) and not x.data, bool(x.data))))
            pos = end
            k += 1
    return [Change(s, n, *kind) for s, n, kind in coalesce(pieces)]
