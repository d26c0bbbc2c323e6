"""Extent: one run of guest bytes with one allocation status (``Image.extents``)."""

from __future__ import annotations

from typing import Any, NamedTuple


class Extent(NamedTuple):
    """A run of guest bytes with one allocation status; the fields mean what the fields of
    ``qemu-img map --output=json`` mean.

    Attributes:
        start (int): guest offset, bytes.   length (int): bytes.
        data (bool): reading touches stored data.   zero (bool): reads as zeros.
        depth (int): 0 = this image, 1 = its backing file, ...
        offset (int | None): host offset in the file at ``depth``, when the data sits there raw.
        present (bool): some layer allocates the range.   compressed (bool)
    """

    start: int
    length: int
    data: bool
    zero: bool
    depth: int
    offset: int | None
    present: bool = True
    compressed: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"start": self.start, "length": self.length, "depth": self.depth,
                             "present": self.present, "zero": self.zero, "data": self.data,
                             "compressed": self.compressed}
        if self.offset is not None:
            d["offset"] = self.offset
        return d
