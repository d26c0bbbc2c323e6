"""The bitmap directory of persistent dirty bitmaps (qcow2.txt "Bitmaps extension" and
"Bitmap directory"): one reader, with QEMU's load-time checks (``bitmap_list_load`` in
``block/qcow2-bitmap.c``), for the check (which counts the bitmaps' clusters) and for
``info`` (which lists them).

A directory entry: u64 bitmap table offset, u32 table size (entries), u32 flags (bit 0
in-use, bit 1 auto), u8 type (1: dirty tracking), u8 granularity bits, u16 name size, u32
extra data size, the extra data, the name, padding to a multiple of 8 bytes.  The engine
reads bitmaps and never writes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.qcow2.spec import (BITMAP_TYPE_DIRTY_TRACKING, BME_DIR_ENTRY_SIZE,
                               BME_DIR_ENTRY_STRUCT, BME_FLAG_IN_USE, BME_MAX_GRANULARITY_BITS,
                               BME_MAX_NAME_SIZE, BME_MAX_PHYS_SIZE, BME_MAX_TABLE_SIZE,
                               BME_MIN_GRANULARITY_BITS, BME_RESERVED_FLAGS, MAX_DISK_LENGTH,
                               MAX_BITMAP_DIRECTORY_SIZE)

__all__ = ["BME_FLAG_AUTO", "BitmapEntry", "directory_location_problem",
           "parse_bitmap_directory"]

#: BME_FLAG_AUTO: the bitmap tracks writes while the image is in use.
BME_FLAG_AUTO = 1 << 1


@dataclass(frozen=True)
class BitmapEntry:
    """One bitmap of the directory.

    Attributes:
        table_offset (int), table_size (int): its bitmap table (entries of 8 bytes).
        flags (int): BME_FLAG_IN_USE, BME_FLAG_AUTO.
        granularity_bits (int): log2 of the bytes one bit covers.
        name (str): its name (UTF-8; undecodable bytes replaced).
    """

    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    name: str


def directory_location_problem(size: int, offset: int) -> str | None:
    """Why a directory of SIZE bytes at OFFSET cannot be loaded, or None."""
    if size == 0:
        return "size is zero"
    if size > MAX_BITMAP_DIRECTORY_SIZE:
        return "size is too big"
    if offset > MAX_DISK_LENGTH - size:
        return "cannot be read"
    return None


def parse_bitmap_directory(d: bytes, nb: int, cluster_size: int, disk_size: int
                           ) -> list[BitmapEntry] | str:
    """The NB entries of the directory D, with QEMU's checks, or the reason (a string, in
    QEMU's words) the directory is unusable: a broken entry, more or fewer entries than the
    header extension says, extra data, or a bitmap that breaks the constraints (table
    alignment and size, granularity, flags, name length, type, data size, coverage of the
    disk unless in use)."""
    pos = 0
    out: list[BitmapEntry] = []
    while pos < len(d):
        if pos + BME_DIR_ENTRY_SIZE > len(d):
            return "broken bitmap directory"
        toff, tsize, flags, btype, gran, name_len, extra = BME_DIR_ENTRY_STRUCT.unpack_from(
            d, pos)
        if len(out) >= nb:
            return "more bitmaps found than specified in header extension"
        step = (BME_DIR_ENTRY_SIZE + extra + name_len + 7) & ~7
        if pos + step > len(d):
            return "broken bitmap directory"
        if extra:
            return "bitmap extra data is not supported"
        phys = tsize * cluster_size
        if (tsize == 0 or toff == 0 or toff % cluster_size or tsize > BME_MAX_TABLE_SIZE
                or not BME_MIN_GRANULARITY_BITS <= gran <= BME_MAX_GRANULARITY_BITS
                or flags & BME_RESERVED_FLAGS or name_len > BME_MAX_NAME_SIZE
                or btype != BITMAP_TYPE_DIRTY_TRACKING or phys > BME_MAX_PHYS_SIZE
                or (not flags & BME_FLAG_IN_USE and disk_size > (phys * 8) << gran)):
            return f"bitmap {len(out)} does not satisfy the constraints"
        start = pos + BME_DIR_ENTRY_SIZE + extra
        out.append(BitmapEntry(toff, tsize, flags, gran,
                               d[start:start + name_len].decode("utf-8", "replace")))
        pos += step
    if len(out) != nb:
        return "less bitmaps found than specified in header extension"
    return out
