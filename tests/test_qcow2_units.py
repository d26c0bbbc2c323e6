"""Unit tests of the format rules in ``engine/qcow2``: spec, header, snapshots, refblocks, layout.

- spec: the constants the compiled core mirrors (entry masks, the host offset limit) have the
  values of ``engine.qcow2.spec``; the core's sources are read as text, wherever its included
  files live.
- header: encode/parse round trips; the lenient fixed-field reader agrees with the full parser;
  the extension walk, strict and lenient, on a broken record.
- snapshots: the one parser in its strict and lenient modes on the same damaged tables (too
  much extra data, incomplete v3 entries, a table over 64 MiB, a table QEMU cannot read), and
  encode/parse round trips.
- refblocks: decode/encode round trips for every refcount width, the bit order of narrow
  entries, the create-time block of ones, the reftable entry decoding.
- layout: a new image is byte for byte what ``qemu-img create`` writes, for a few sizes,
  cluster sizes and refcount widths.
"""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

import qemu
from engine.errors import CorruptImage, ImageFormatError, InvalidArgument, SafetyLimitExceeded
from engine.qcow2 import spec
from engine.qcow2.header import (
    ByteReader,
    Header,
    encode_header,
    looks_like_qcow2,
    parse_header,
    read_fixed_fields,
    walk_extensions,
)
from engine.qcow2.layout import check_virtual_size, max_virtual_size, new_image_layout
from engine.qcow2.refblocks import (
    decode_refblocks,
    encode_refblocks,
    refblock_with_ones,
    reftable_offsets,
)
from engine.qcow2.snapshots import (
    SnapshotEntry,
    encode_snapshot_table,
    parse_snapshot_table,
    read_snapshot_table,
    snapshot_table_size,
)

KiB = 1024
MiB = 1024 * KiB
ENGINE = pathlib.Path(__file__).resolve().parent.parent / "engine"


# --- spec: the core mirrors the same values ---------------------------------------------------

# The core's name -> the spec's name, where they differ.
_CORE_ALIASES = {
    "L1E_RESERVED": "L1E_RESERVED_MASK",
    "L2E_RESERVED": "L2E_RESERVED_MASK",
    "RT_OFFSET_MASK": "REFT_OFFSET_MASK",
    "RT_RESERVED": "REFT_RESERVED_MASK",
}
# What the core mirrors today; the test fails if any of them can no longer be found.
_MIRRORED = {"L1E_OFFSET_MASK", "L1E_RESERVED_MASK", "L2E_OFFSET_MASK", "L2E_RESERVED_MASK",
             "QCOW_OFLAG_COPIED", "QCOW_OFLAG_COMPRESSED", "QCOW_OFLAG_ZERO",
             "REFT_OFFSET_MASK", "REFT_RESERVED_MASK", "MAX_CLUSTER_OFFSET"}


def _core_constants() -> dict[str, int]:
    """Every ``#define CC_NAME value``, ``DEF NAME = value`` and ``NAME = value`` (enum
    members, typed constants) of the core's sources whose name (less the CC_ prefix, through
    the aliases) is a name of the spec."""
    sources = [p for p in ENGINE.rglob("*") if p.suffix in (".pyx", ".pxd", ".pxi", ".h")
               and "_core" in str(p.relative_to(ENGINE))]
    assert sources, "the core's sources were not found"
    found: dict[str, int] = {}
    # C macros, Cython DEFs, and enum members or typed constants (NAME = value)
    pat = re.compile(r"#define\s+CC_(\w+)\s+\(\(\w+\)\s*(0x[0-9a-fA-F]+|\d+)U*L*\)"
                     r"|^\s*(?:DEF\s+|cdef\s+(?:const\s+)?\w+\s+)?([A-Z][A-Z0-9_]+)\s*=\s*"
                     r"(0x[0-9a-fA-F]+|\d+)\b", re.M)
    for path in sources:
        for m in pat.finditer(path.read_text()):
            name, value = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            name = _CORE_ALIASES.get(name, name)
            if hasattr(spec, name):
                assert name not in found or found[name] == int(value, 0), \
                    f"the core defines {name} twice with different values"
                found[name] = int(value, 0)
    return found


def test_core_constants_agree_with_spec():
    found = _core_constants()
    missing = _MIRRORED - found.keys()
    assert not missing, f"the core no longer shows these constants as text: {sorted(missing)}"
    wrong = {n: (hex(v), hex(getattr(spec, n))) for n, v in found.items()
             if v != getattr(spec, n)}
    assert not wrong, f"core value != spec value: {wrong}"


def test_spec_struct_sizes():
    assert spec.V2_STRUCT.size == spec.V2_HEADER_LENGTH
    assert spec.V2_STRUCT.size + spec.V3_STRUCT.size == spec.V3_MIN_HEADER_LENGTH
    assert spec.SNAPSHOT_HEADER_STRUCT.size == spec.SNAPSHOT_HEADER_SIZE
    assert spec.SNAPSHOT_EXTRA_STRUCT.size == spec.SNAPSHOT_EXTRA_SIZE
    assert spec.BITMAPS_EXT_STRUCT.size == spec.BITMAPS_EXT_SIZE
    assert spec.CRYPTO_EXT_STRUCT.size == spec.CRYPTO_EXT_SIZE
    assert spec.BME_DIR_ENTRY_STRUCT.size == spec.BME_DIR_ENTRY_SIZE
    assert spec.MAX_DISK_LENGTH % (1 << 30) == 0 and spec.MAX_DISK_LENGTH <= spec.INT64_MAX


# --- header ----------------------------------------------------------------------------------

def _header(**kw) -> Header:
    h, _ = new_image_layout(kw.pop("size", 1 * MiB), **kw)
    return h


@pytest.mark.parametrize("kw", [
    {}, {"compat": "0.10"}, {"cluster_size": 512, "refcount_bits": 1},
    {"cluster_size": 2 * MiB, "refcount_bits": 64, "lazy_refcounts": True},
    {"extended_l2": True, "compression_type": "zstd"},
    {"backing_file": "base.qcow2", "backing_format": "qcow2"},
])
def test_header_round_trip(kw):
    h, data = new_image_layout(1 * MiB, **kw)
    c0 = encode_header(h)
    assert len(c0) == h.cluster_size and data[:len(c0)] == c0
    again = parse_header(data, len(data))
    assert encode_header(again) == c0
    fixed = read_fixed_fields(c0)
    for name in ("version", "cluster_bits", "size", "l1_size", "l1_table_offset",
                 "refcount_table_offset", "refcount_table_clusters", "nb_snapshots",
                 "snapshots_offset", "incompatible_features", "compatible_features",
                 "autoclear_features", "refcount_order", "header_length",
                 "backing_file_offset", "backing_file_size"):
        assert getattr(fixed, name) == getattr(again, name), name
    assert looks_like_qcow2(c0)


def test_header_geometry_properties():
    h = _header(cluster_size=64 * KiB, refcount_bits=16)
    assert (h.cluster_size, h.l2_entries, h.refblock_entries, h.refblock_bits) == (
        64 * KiB, 8192, 32768, 15)
    assert h.compressed_size_shift == 54 and h.compressed_offset_mask == (1 << 54) - 1
    assert h.compressed_size_mask == 0xFF
    x = _header(cluster_size=64 * KiB, extended_l2=True)
    assert (x.l2_entry_size, x.l2_entries, x.subcluster_size) == (16, 4096, 2 * KiB)


def test_looks_like_qcow2_refuses_other_files():
    c0 = encode_header(_header())
    assert not looks_like_qcow2(b"\0" * 512)
    assert not looks_like_qcow2(c0[:71])
    bad_version = bytearray(c0)
    bad_version[spec.HDR_VERSION:spec.HDR_VERSION + 4] = spec.U32.pack(4)
    assert not looks_like_qcow2(bytes(bad_version))


def test_extension_walk_strict_and_lenient():
    # one good record, then one whose length runs past the area
    area = (spec.U32.pack(0x1234) + spec.U32.pack(3) + b"abc\0\0\0\0\0"
            + spec.U32.pack(0x5678) + spec.U32.pack(100) + bytes(8))
    r = ByteReader(area, "x.qcow2")
    assert list(walk_extensions(r, 0, len(area), lenient=True)) == [(0x1234, b"abc")]
    with pytest.raises(ImageFormatError, match="too large"):
        list(walk_extensions(r, 0, len(area)))


def test_header_feature_bits_are_read_by_one_descriptor():
    """Every feature flag of the header is a FeatureBit over its feature word: set the bit,
    the flag reads True; the flags are not dataclass fields (nothing to keep in step)."""
    import dataclasses

    from engine.qcow2.header import FeatureBit

    flags = {name: bit for name, bit in vars(Header).items() if isinstance(bit, FeatureBit)}
    assert set(flags) == {"extended_l2", "dirty", "corrupt", "lazy_refcounts", "has_data_file",
                          "data_file_raw"}
    assert not set(flags) & {f.name for f in dataclasses.fields(Header)}
    for name, bit in flags.items():
        h = _header()
        setattr(h, bit.word, 0)
        assert getattr(h, name) is False
        setattr(h, bit.word, bit.mask)
        assert getattr(h, name) is True and bit.__doc__
    assert _header(lazy_refcounts=True).lazy_refcounts and _header(extended_l2=True).extended_l2


# --- snapshots -------------------------------------------------------------------------------

def _snap_header(nb: int, version: int = 3, offset: int = 4 * 64 * KiB) -> Header:
    h = _header(compat="1.1" if version == 3 else "0.10")
    h.nb_snapshots = nb
    h.snapshots_offset = offset
    return h


def _entry(i: int, **kw) -> SnapshotEntry:
    base = dict(id=str(i + 1), name=f"snap{i}", l1_table_offset=3 * 64 * KiB, l1_size=1,
                date_sec=1000 + i, date_nsec=i, vm_clock_nsec=7 * i, vm_state_size=0,
                disk_size=1 * MiB)
    base.update(kw)
    return SnapshotEntry(**base)


def _raw_entry(extra_size: int, id_: bytes = b"1", name: bytes = b"s", extra: bytes | None = None
               ) -> bytes:
    """One entry as raw bytes, with ``extra_size`` bytes of extra data (zeros by default)."""
    extra = bytes(extra_size) if extra is None else extra
    e = spec.SNAPSHOT_HEADER_STRUCT.pack(3 * 64 * KiB, 1, len(id_), len(name), 0, 0, 0, 0,
                                         extra_size) + extra + id_ + name
    return e + bytes(-len(e) % 8)


def _reader(buf: bytes):
    return lambda pos, n: buf[pos:pos + n].ljust(n, b"\0")


def test_snapshot_round_trip():
    h = _snap_header(3)
    entries = [_entry(0), _entry(1, vm_state_size=5 << 32, icount=9),
               _entry(2, extra_data=bytes(24) + b"kept", name="n\udcff")]
    blob = encode_snapshot_table(entries, h)
    assert snapshot_table_size(blob, h) == len(blob)
    back = parse_snapshot_table(blob, h)
    assert encode_snapshot_table(back, h) == blob
    assert [e.name for e in back] == ["snap0", "snap1", "n\udcff"]
    assert back[2].shown_name == "n\ufffd" and back[1].vm_state_size == 5 << 32
    lenient = read_snapshot_table(_reader(blob), h, 3)
    assert lenient.problems == [] and lenient.size == len(blob)
    assert encode_snapshot_table(lenient.entries, h) == blob


def test_snapshot_too_much_extra_strict_raises_lenient_keeps_1024():
    blob = _raw_entry(spec.SNAPSHOT_EXTRA_SIZE) + _raw_entry(2000) + _raw_entry(24)
    h = _snap_header(3)
    with pytest.raises(SafetyLimitExceeded, match="extra metadata in snapshot table entry 1"):
        parse_snapshot_table(blob, h)
    t = read_snapshot_table(_reader(blob), h, 3)
    assert [(p.kind, p.entry, p.value) for p in t.problems] == [("extra", 1, 2000)]
    assert [len(e.extra_data) for e in t.entries] == [24, spec.MAX_SNAPSHOT_EXTRA, 24]
    assert t.size == len(blob) - len(bytes(-(40 + 24 + 2) % 8))   # no trailing padding


def test_snapshot_incomplete_v3_entry_strict_vs_lenient():
    blob = _raw_entry(24) + _raw_entry(8, extra=spec.U64.pack(77))
    h = _snap_header(2)
    with pytest.raises(CorruptImage, match="entry 1 is incomplete"):
        parse_snapshot_table(blob, h)
    relaxed = parse_snapshot_table(blob, h, strict=False)
    assert relaxed[1].disk_size is None and relaxed[1].vm_state_size == 77
    t = read_snapshot_table(_reader(blob), h, 2)
    assert [(p.kind, p.entry, p.value) for p in t.problems] == [("incomplete", 1, 8)]
    # the check's reader fills the disk size as QEMU's does: the size in whole sectors
    assert t.entries[1].disk_size == h.size // 512 * 512
    # a v2 image has no such rule
    v2 = _snap_header(2, version=2)
    assert read_snapshot_table(_reader(blob), v2, 2).problems == []
    assert len(parse_snapshot_table(blob, v2)) == 2


def test_snapshot_table_over_64_mib_strict_vs_lenient():
    big = _raw_entry(spec.MAX_SNAPSHOT_EXTRA, b"i" * 0xFFFF, b"n" * 0xFFFF)
    n = spec.MAX_SNAPSHOTS_SIZE // len(big) + 2
    blob = big * n
    h = _snap_header(n)
    with pytest.raises(SafetyLimitExceeded, match="too big"):
        parse_snapshot_table(blob, h)
    t = read_snapshot_table(_reader(blob), h, n)
    kept = spec.MAX_SNAPSHOTS_SIZE // len(big)
    assert [(p.kind, p.entry, p.value) for p in t.problems] == [("too_big", kept, n - kept)]
    assert len(t.entries) == kept and t.size == kept * len(big) - (len(big) - (
        40 + spec.MAX_SNAPSHOT_EXTRA + 2 * 0xFFFF))


def test_snapshot_table_qemu_cannot_read_is_an_io_problem():
    h = _snap_header(1, offset=spec.MAX_DISK_LENGTH - 64 * KiB)
    t = read_snapshot_table(_reader(b""), h, 1)
    assert [p.kind for p in t.problems] == ["io"] and t.entries == [] and t.size == 0


def test_snapshot_table_short_buffer_asks_for_more():
    h = _snap_header(2)
    blob = encode_snapshot_table([_entry(0), _entry(1)], h)
    need = snapshot_table_size(blob[:10], h)
    assert need > 10
    assert snapshot_table_size(blob, h) == len(blob)
    with pytest.raises(CorruptImage, match="runs past the end"):
        parse_snapshot_table(blob[:-1], h)


# --- refblocks -------------------------------------------------------------------------------

@pytest.mark.parametrize("order", range(7))
def test_refblock_round_trip_every_width(order):
    cluster = 4 * KiB
    entries = cluster * 8 >> order
    rng = np.random.default_rng(order)
    bits = 1 << order
    top = (1 << bits) - 1
    vals = rng.integers(0, min(top, (1 << 63) - 1), size=(3, entries), dtype=np.uint64,
                        endpoint=True)
    vals[0, 0] = top if bits < 64 else np.uint64(2**64 - 1)
    raw = encode_refblocks(vals, order)
    assert len(raw) == 3 * cluster
    back = decode_refblocks(np.frombuffer(raw, np.uint8).reshape(3, cluster), order)
    assert np.array_equal(back, vals)


def test_refblock_bit_order():
    # narrow entries fill each byte from its least significant bit; wide ones are big-endian
    vals = np.zeros((1, 512 * 8), np.uint64)
    vals[0, 0] = 1
    vals[0, 3] = 1
    assert encode_refblocks(vals, 0)[:1] == bytes([0b1001])
    v16 = np.zeros((1, 256), np.uint64)
    v16[0, 1] = 0x0102
    assert encode_refblocks(v16, 4)[:4] == b"\0\0\x01\x02"


@pytest.mark.parametrize("order", range(7))
def test_refblock_with_ones(order):
    cluster = 512
    n = cluster * 8 >> order
    runs = [(0, 1), (3, min(n, 70)), (n - 2, n)]
    blk = refblock_with_ones(runs, order, cluster)
    vals = decode_refblocks(np.frombuffer(blk, np.uint8).reshape(1, -1), order)[0]
    want = np.zeros(n, np.uint64)
    for a, b in runs:
        want[a:b] = 1
    assert np.array_equal(vals, want)


def test_refblock_codec_refuses_bad_width():
    with pytest.raises(InvalidArgument):
        encode_refblocks(np.zeros((1, 8), np.uint64), 7)


def test_reftable_offsets():
    C = 64 * KiB
    rt = np.array([0, 3 * C, 3 * C + 512 | 1, spec.MAX_DISK_LENGTH, (1 << 63) | C],
                  dtype=np.uint64)
    off, unreadable = reftable_offsets(rt, C)
    assert off.tolist()[:3] == [0, 3 * C, 3 * C + 512]
    assert unreadable.tolist() == [False, False, True, True, True]
    assert off[4] == 1 << 62          # pinned: reads as zeros, outside any file


# --- layout ----------------------------------------------------------------------------------

@pytest.mark.qemu
@pytest.mark.parametrize("size,opts", [
    (0, {}),
    (1 * MiB, {"cluster_size": 512, "refcount_bits": 1}),
    (10 * MiB + 512, {"cluster_size": 4096, "refcount_bits": 8}),
    (1 << 40, {"cluster_size": 64 * KiB, "refcount_bits": 64}),
    (3 << 30, {"cluster_size": 2 * MiB, "compat": "0.10"}),
    (40 << 30, {"cluster_size": 512, "refcount_bits": 16}),    # the reftable grows
])
def test_new_image_layout_matches_qemu_img_create(tmp_path, size, opts):
    path = tmp_path / "new.qcow2"
    qemu.create(path, size, **opts)
    h, data = new_image_layout(size, **opts)
    assert data == path.read_bytes()
    assert h.size == size


def test_virtual_size_rules():
    assert max_virtual_size("qcow2", 64 * KiB) == (32 * MiB // 8) * (1 << 29)
    assert max_virtual_size("raw") == spec.MAX_DISK_LENGTH
    assert check_virtual_size(5) == 5
    with pytest.raises(InvalidArgument, match="maximum"):
        check_virtual_size(max_virtual_size("qcow2", 512) + 1, cluster_size=512)
    with pytest.raises(InvalidArgument):
        check_virtual_size(True)
