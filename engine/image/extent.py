"""Extent: one run of guest bytes with one allocation status (``Image.extents``)."""

from __future__ import annotations

from typing import Any, NamedTuple

#: The flag bits of the core's block status rows (start, length, depth, flags, offset):
#: some layer allocates the range; it reads as zeros; reading touches stored data; the
#: offset column is the raw host offset at that depth; the data is compressed.
BS_PRESENT, BS_ZERO, BS_DATA, BS_OFFSET, BS_COMPRESSED = 1, 2, 4, 8, 16


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
