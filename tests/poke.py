"""Byte-level editing of image files for the hostile-input tests.

QCOW2 integers are big-endian. These helpers read and write fields at absolute file offsets
and know just enough of the format (header field offsets, where L1/L2/refcount entries live)
to aim a poke; they deliberately do no validation, since their job is to make bad images.
"""

from __future__ import annotations

import os
import sqlite3
import struct

_FMT = {1: ">B", 2: ">H", 4: ">I", 8: ">Q"}

# Fixed header fields: name -> (offset, width in bytes). docs/on-disk.md section 1.1.
HEADER = {
    "magic": (0, 4),
    "version": (4, 4),
    "backing_file_offset": (8, 8),
    "backing_file_size": (16, 4),
    "cluster_bits": (20, 4),
    "size": (24, 8),
    "crypt_method": (32, 4),
    "l1_size": (36, 4),
    "l1_table_offset": (40, 8),
    "refcount_table_offset": (48, 8),
    "refcount_table_clusters": (56, 4),
    "nb_snapshots": (60, 4),
    "snapshots_offset": (64, 8),
    "incompatible_features": (72, 8),
    "compatible_features": (80, 8),
    "autoclear_features": (88, 8),
    "refcount_order": (96, 4),
    "header_length": (100, 4),
    "compression_type": (104, 1),
}

# Header extension magics (docs/on-disk.md section 2.2).
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_FDE = 0x0537BE77
EXT_DATA_FILE = 0x44415441

L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1


def read_be(path, offset: int, width: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(width)
    if len(data) != width:
        raise ValueError(f"{path}: short read of {width} bytes at {offset}")
    return struct.unpack(_FMT[width], data)[0]


def write_be(path, offset: int, width: int, value: int) -> None:
    """Store VALUE big-endian in WIDTH bytes at OFFSET (the value is masked to the width,
    so -1 gives all-ones)."""
    value &= (1 << (8 * width)) - 1
    write_bytes(path, offset, struct.pack(_FMT[width], value))


def write_bytes(path, offset: int, data: bytes) -> None:
    """Overwrite bytes at OFFSET (the file grows if OFFSET is past its end)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read_bytes(path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def truncate(path, size: int) -> None:
    os.truncate(path, size)


def file_size(path) -> int:
    return os.stat(path).st_size


def get(path, field: str) -> int:
    off, width = HEADER[field]
    return read_be(path, off, width)


def set(path, field: str, value: int) -> None:  # noqa: A001 - mirrors get()
    off, width = HEADER[field]
    write_be(path, off, width, value)


def header(path) -> dict:
    """The fixed header fields as a dict (v3 fields read even on v2: they are just bytes)."""
    return {name: read_be(path, off, w) for name, (off, w) in HEADER.items()}


def cluster_size(path) -> int:
    return 1 << get(path, "cluster_bits")


def l2_entry_size(path) -> int:
    return 16 if get(path, "version") >= 3 and get(path, "incompatible_features") & 0x10 else 8


def l1_entry_offset(path, index: int) -> int:
    return get(path, "l1_table_offset") + 8 * index


def l1_entry(path, index: int) -> int:
    return read_be(path, l1_entry_offset(path, index), 8)


def l2_entry_offset(path, vaddr: int) -> int:
    """File offset of the (first u64 of the) L2 entry that maps guest offset VADDR; the L2
    table must exist."""
    cbits = get(path, "cluster_bits")
    esize = l2_entry_size(path)
    l2_bits = cbits - (4 if esize == 16 else 3)
    l1i = vaddr >> (cbits + l2_bits)
    l2i = (vaddr >> cbits) & ((1 << l2_bits) - 1)
    l2 = l1_entry(path, l1i) & L1_OFFSET_MASK
    if not l2:
        raise ValueError(f"{path}: no L2 table for guest offset {vaddr}")
    return l2 + esize * l2i


def l2_entry(path, vaddr: int) -> int:
    return read_be(path, l2_entry_offset(path, vaddr), 8)


def reftable_entry_offset(path, index: int) -> int:
    return get(path, "refcount_table_offset") + 8 * index


def extensions(path) -> list[tuple[int, int, int]]:
    """The header extensions as (file offset of the record, type, data length)."""
    version = get(path, "version")
    start = get(path, "header_length") if version >= 3 else 72
    end = get(path, "backing_file_offset") or cluster_size(path)
    out = []
    off = start
    while off + 8 <= end:
        typ = read_be(path, off, 4)
        length = read_be(path, off + 4, 4)
        out.append((off, typ, length))
        if typ == EXT_END:
            break
        off += 8 + ((length + 7) & ~7)
    return out


def find_extension(path, typ: int) -> tuple[int, int]:
    """(record offset, data length) of the first extension of type TYP."""
    for off, t, length in extensions(path):
        if t == typ:
            return off, length
    raise ValueError(f"{path}: no header extension {typ:#x}")


def snapshot_entry(path, index: int = 0) -> int:
    """File offset of snapshot table entry INDEX (walking variable-length entries)."""
    off = get(path, "snapshots_offset")
    for _ in range(index):
        extra = read_be(path, off + 36, 4)
        id_len = read_be(path, off + 12, 2)
        name_len = read_be(path, off + 14, 2)
        off += (40 + extra + id_len + name_len + 7) & ~7
    return off


def downgrade_catalog_to_v1(db_file: str) -> None:
    """Make a SQLite catalog file what cowchain with schema version 1 wrote."""
    db = sqlite3.connect(db_file)
    with db:
        for index in ("volumes_flagged", "volumes_unrecorded"):   # on columns v1 lacks
            db.execute(f"DROP INDEX IF EXISTS {index}")
        for col in ("size", "ino", "stamp", "damaged"):
            db.execute(f"ALTER TABLE volumes DROP COLUMN {col}")
        db.execute("UPDATE schema_version SET version = 1")
    db.close()
