"""The ``bitmaps`` list of ``qemu-img info`` (persistent dirty bitmaps, read-only).

The bitmaps extension (qcow2.txt "Bitmaps extension") points at a directory of entries:
u64 bitmap table offset, u32 table size, u32 flags (bit 0 in-use, bit 1 auto), u8 type,
u8 granularity bits, u16 name size, u32 extra data size, the extra data, the name, padding
to 8 bytes.  Only names, granularities and flags are read here; the engine does not
maintain bitmaps (a read-write open drops them, as QEMU does for an extension it does not
maintain).
"""

from __future__ import annotations

from typing import Any

from engine.errors import CorruptImage, io_error
from engine.qcow2.header import Header
from engine.qcow2.spec import (BITMAPS_EXT_STRUCT, BME_DIR_ENTRY_SIZE, BME_DIR_ENTRY_STRUCT,
                               BME_FLAG_IN_USE, MAX_BITMAP_DIRECTORY_SIZE)

#: BME_FLAG_AUTO: the bitmap tracks writes while the image is in use.
BME_FLAG_AUTO = 1 << 1


def bitmap_list(path: str, h: Header) -> list[dict[str, Any]]:
    """``format-specific.data.bitmaps`` for the image at PATH (empty without bitmaps).

    Raises:
        CorruptImage: the directory runs past its size or the file.
    """
    if h.bitmaps_ext is None:
        return []
    nb, _reserved, dsize, doff = BITMAPS_EXT_STRUCT.unpack(h.bitmaps_ext)
    if not nb or dsize > MAX_BITMAP_DIRECTORY_SIZE:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(doff)
            d = f.read(dsize)
    except OSError as e:
        raise io_error(e.errno or 0, "cannot read the bitmap directory", path=path) from None
    out: list[dict[str, Any]] = []
    pos = 0
    while pos < len(d) and len(out) < nb:
        if pos + BME_DIR_ENTRY_SIZE > len(d):
            raise CorruptImage("broken bitmap directory", path=path)
        _toff, _tsize, flags, _btype, gran, name_len, extra = BME_DIR_ENTRY_STRUCT.unpack_from(
            d, pos)
        start = pos + BME_DIR_ENTRY_SIZE + extra
        if start + name_len > len(d):
            raise CorruptImage("broken bitmap directory", path=path)
        names = [n for bit, n in ((BME_FLAG_IN_USE, "in-use"), (BME_FLAG_AUTO, "auto"))
                 if flags & bit]
        out.append({"flags": names,
                    "name": d[start:start + name_len].decode("utf-8", "replace"),
                    "granularity": 1 << gran})
        pos = (start + name_len + 7) & ~7
    return out
