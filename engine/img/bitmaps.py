"""The ``bitmaps`` list of ``qemu-img info`` (persistent dirty bitmaps, read-only).

The directory is read by :mod:`engine.qcow2.bitmaps` (the reader the check uses, with
QEMU's load-time checks); only names, granularities and flags are listed here.  The engine
does not maintain bitmaps (a read-write open drops them, as QEMU does for an extension it
does not maintain).
"""

from __future__ import annotations

from typing import Any

from engine.errors import CorruptImage, io_error
from engine.qcow2.bitmaps import (BME_FLAG_AUTO, directory_location_problem,
                                  parse_bitmap_directory)
from engine.qcow2.header import Header
from engine.qcow2.spec import BITMAPS_EXT_STRUCT, BME_FLAG_IN_USE


def bitmap_list(path: str, h: Header) -> list[dict[str, Any]]:
    """``format-specific.data.bitmaps`` for the image at PATH (empty without bitmaps).

    Raises:
        CorruptImage: the directory cannot be loaded (QEMU refuses to open such an image).
    """
    if h.bitmaps_ext is None:
        return []
    nb, _reserved, dsize, doff = BITMAPS_EXT_STRUCT.unpack(h.bitmaps_ext)
    if not nb:
        return []
    problem = directory_location_problem(dsize, doff)
    if problem is None:
        try:
            with open(path, "rb") as f:
                f.seek(doff)
                d = f.read(dsize)
        except OSError as e:
            raise io_error(e.errno or 0, "cannot read the bitmap directory",
                           path=path) from None
        entries = parse_bitmap_directory(d, nb, h.cluster_size, h.size)
        if not isinstance(entries, str):
            return [{"flags": [n for bit, n in ((BME_FLAG_IN_USE, "in-use"),
                                                (BME_FLAG_AUTO, "auto")) if e.flags & bit],
                     "name": e.name, "granularity": 1 << e.granularity_bits}
                    for e in entries]
        problem = entries
    raise CorruptImage(f"bitmap directory: {problem}", path=path,
                       hint="the persistent bitmaps' directory is damaged; qemu-img "
                            "refuses to open the image too")
