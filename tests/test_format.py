"""engine.format against qemu-img 7.2: create layouts byte for byte, parsing of images QEMU
made, header round trips, and hostile bytes.

qemu-img is required: a missing qemu-img fails these tests (see ``_qemu_img``), never skips.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine.format as fmt
from engine.errors import (
    CorruptImage,
    EngineError,
    ImageFormatError,
    InvalidArgument,
    SafetyLimitExceeded,
    UnsupportedFeature,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
HEAD_MAX = 2 * MiB                      # parse_header gets at most this much of the file

QEMU_IMG = shutil.which("qemu-img")


def _qemu_img(*args, check=True, timeout=120) -> subprocess.CompletedProcess:
    # Fails (does not skip) when qemu-img is missing: these tests are the compatibility proof.
    assert QEMU_IMG is not None, "qemu-img not found: install Debian's qemu-utils"
    proc = subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, timeout=timeout,
                          env={**os.environ, "LC_ALL": "C"})
    if check and proc.returncode:
        raise AssertionError(f"qemu-img {' '.join(map(str, args))} exited {proc.returncode}: "
                             f"{proc.stderr.decode(errors='replace')}")
    return proc


def _qemu_create(path, size, opts: dict, backing=None, backing_fmt=None) -> bytes:
    o = ",".join(f"{k}={v}" for k, v in opts.items())
    args = ["create", "-q", "-f", "qcow2"]
    if o:
        args += ["-o", o]
    if backing is not None:
        # -u: the backing file need not exist; the size is given explicitly.
        args += ["-u", "-b", backing, "-F", backing_fmt]
    # qemu-img syncs after every refblock it adds: the 100 GiB / 512-byte cases (long
    # profile) take a minute or more on a loaded machine.
    _qemu_img(*args, path, size, timeout=900)
    with open(path, "rb") as f:
        return f.read()


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _parse(data: bytes) -> fmt.Header:
    return fmt.parse_header(data[:HEAD_MAX], len(data))


def _info(path) -> dict:
    return json.loads(_qemu_img("info", "-f", "qcow2", "--output=json", path).stdout)


def _first_diff(a: bytes, b: bytes) -> str:
    n = min(len(a), len(b))
    i = next((i for i in range(n) if a[i] != b[i]), n)
    return f"lengths {len(a)} vs {len(b)}, first difference at byte {i:#x}"


# =========================================================================================
# new_image_layout == qemu-img create, byte for byte
# =========================================================================================

CLUSTER_SIZES = [512, 4 * KiB, 64 * KiB, 2 * MiB]
REFCOUNT_BITS = [1, 2, 4, 8, 16, 32, 64]
SIZES = [0, 1, 1 * MiB, 1 * GiB, 100 * GiB, 1 * TiB]


def _grid():
    for cs in CLUSTER_SIZES:
        for rb in REFCOUNT_BITS:
            for size in SIZES:
                # 512-byte clusters: 1 TiB needs a 256 MiB L1, over QEMU's 32 MiB limit, and
                # at 100 GiB (a 25 MiB L1) qemu-img itself takes up to a minute (it syncs
                # after each of ~800 refblocks): long profile only; _GROWTH covers the same
                # code paths at smaller sizes.
                if cs == 512 and size > 100 * GiB:
                    continue
                marks = [pytest.mark.slow] if cs == 512 and size >= 100 * GiB else []
                yield pytest.param(cs, rb, size, id=f"c{cs}-r{rb}-s{size}", marks=marks)
    yield from _GROWTH


# Sizes where the L1 needs more refblocks than one 512-byte reftable cluster can point to,
# so QEMU grows the reftable (self-describing area at the end of the file, old table freed
# and its stale bytes left behind, later allocations reusing the freed cluster).
_GROWTH = [
    pytest.param(512, 64, 10 * GiB, id="growth-c512-r64-10G"),     # one regrowth
    pytest.param(512, 64, 16 * GiB, id="growth-c512-r64-16G"),     # two regrowths (1->2->4)
    pytest.param(512, 32, 20 * GiB, id="growth-c512-r32-20G"),
    pytest.param(512, 16, 40 * GiB, id="growth-c512-r16-40G"),
]


@pytest.mark.qemu
@pytest.mark.parametrize("cluster_size,refcount_bits,size", list(_grid()))
def test_create_matches_qemu_v3(tmp_path, cluster_size, refcount_bits, size):
    expected = _qemu_create(tmp_path / "q.qcow2", size,
                            {"cluster_size": cluster_size, "refcount_bits": refcount_bits})
    h, data = fmt.new_image_layout(size, cluster_size=cluster_size,
                                   refcount_bits=refcount_bits)
    assert data == expected, _first_diff(data, expected)
    assert h.size == -(-size // 512) * 512
    assert h.refcount_bits == refcount_bits and h.cluster_size == cluster_size


def _grid_v2():
    for cs in CLUSTER_SIZES:
        for size in [0, 1, 1 * MiB, 1 * GiB, 16 * GiB, 100 * GiB]:
            marks = [pytest.mark.slow] if cs == 512 and size >= 100 * GiB else []
            yield pytest.param(cs, size, id=f"c{cs}-s{size}", marks=marks)


@pytest.mark.qemu
@pytest.mark.parametrize("cluster_size,size", list(_grid_v2()))
def test_create_matches_qemu_v2(tmp_path, cluster_size, size):
    expected = _qemu_create(tmp_path / "q.qcow2", size,
                            {"cluster_size": cluster_size, "compat": "0.10"})
    h, data = fmt.new_image_layout(size, cluster_size=cluster_size, compat="0.10")
    assert data == expected, _first_diff(data, expected)
    assert h.version == 2 and h.header_length == 72 and h.compat == "0.10"


_OPTION_CASES = [
    # (our keywords, qemu -o options, backing name, backing format, size)
    (dict(lazy_refcounts=True), {"lazy_refcounts": "on"}, None, None, 1 * GiB),
    (dict(lazy_refcounts=True, cluster_size=512, refcount_bits=1),
     {"lazy_refcounts": "on", "cluster_size": 512, "refcount_bits": 1}, None, None, 1 * GiB),
    (dict(extended_l2=True), {"extended_l2": "on"}, None, None, 1 * TiB),
    (dict(extended_l2=True, cluster_size=16 * KiB, refcount_bits=64),
     {"extended_l2": "on", "cluster_size": 16 * KiB, "refcount_bits": 64}, None, None,
     100 * GiB),
    (dict(compression_type="zstd"), {"compression_type": "zstd"}, None, None, 1 * GiB),
    (dict(), {}, "base.raw", "raw", 1 * GiB),
    (dict(), {}, "base.qcow2", "qcow2", 4 * MiB),
    (dict(compat="0.10"), {"compat": "0.10"}, "base.raw", "raw", 1 * GiB),
    (dict(compat="0.10"), {"compat": "0.10"}, "base.qcow2", "qcow2", 1),
    (dict(cluster_size=4096), {"cluster_size": 4096}, "b" * 1000, "qcow2", 1 * MiB),
    (dict(cluster_size=512, refcount_bits=2), {"cluster_size": 512, "refcount_bits": 2},
     "sub/dir/base.img", "raw", 12345),
    (dict(cluster_size=2 * MiB, lazy_refcounts=True),
     {"cluster_size": 2 * MiB, "lazy_refcounts": "on"}, "../x.qcow2", "qcow2", 1 * TiB),
    (dict(), {}, "b" * 1023, "qcow2", 1 * MiB),
    (dict(cluster_size=512, compat="0.10"), {"cluster_size": 512, "compat": "0.10"},
     "b" * 400, "raw", 1 * MiB),
]


@pytest.mark.qemu
@pytest.mark.parametrize("kw,opts,backing,bfmt,size", _OPTION_CASES,
                         ids=[f"case{i}" for i in range(len(_OPTION_CASES))])
def test_create_options_match_qemu(tmp_path, kw, opts, backing, bfmt, size):
    expected = _qemu_create(tmp_path / "q.qcow2", size, opts, backing, bfmt)
    h, data = fmt.new_image_layout(size, backing_file=backing, backing_format=bfmt, **kw)
    assert data == expected, _first_diff(data, expected)
    assert h.backing_file == backing and h.backing_format == bfmt


@pytest.mark.qemu
@pytest.mark.parametrize("kw", [dict(), dict(cluster_size=512, refcount_bits=64),
                                dict(compat="0.10", cluster_size=4096)])
def test_created_image_passes_qemu_check(tmp_path, kw):
    _, data = fmt.new_image_layout(10 * GiB, **kw)
    p = tmp_path / "ours.qcow2"
    p.write_bytes(data)
    res = json.loads(_qemu_img("check", "-f", "qcow2", "--output=json", p).stdout)
    assert res["check-errors"] == 0 and "corruptions" not in res and "leaks" not in res


def test_create_reftable_growth_layout():
    # The case that needs QEMU's self-describing reftable growth: 512-byte clusters with
    # 64-bit refcounts (64 clusters per refblock) and a 256 KiB L1 (512 clusters).
    h, data = fmt.new_image_layout(1 * GiB, cluster_size=512, refcount_bits=64)
    assert h.l1_table_offset == 3 * 512 and h.l1_size == 32768
    assert h.refcount_table_offset == 512 and h.refcount_table_clusters == 1
    table = struct.unpack_from(">9Q", data, 512)
    # refblocks land behind the L1; the first new one is placed for index 1, then QEMU's
    # restart of the L1 allocation puts the rest after it (observed with qemu-img 7.2).
    assert [t // 512 for t in table] == [2, 515, 517, 518, 519, 520, 521, 522, 516]


def test_create_large_regrows_reftable():
    h, data = fmt.new_image_layout(100 * GiB, cluster_size=512, refcount_bits=64)
    assert h.refcount_table_clusters > 1
    assert h.refcount_table_offset > h.l1_table_offset
    # the result is a valid image to our own parser, L1 inside the file
    assert h.l1_table_offset + h.l1_size * 8 <= len(data)


@pytest.mark.parametrize("kwargs,err", [
    (dict(size=-1), InvalidArgument),
    (dict(size=1.5), InvalidArgument),
    (dict(size=1, cluster_size=256), InvalidArgument),
    (dict(size=1, cluster_size=4 * MiB), InvalidArgument),
    (dict(size=1, cluster_size=3000), InvalidArgument),
    (dict(size=1, refcount_bits=3), InvalidArgument),
    (dict(size=1, refcount_bits=128), InvalidArgument),
    (dict(size=1, refcount_bits=0), InvalidArgument),
    (dict(size=1, compat="2.0"), InvalidArgument),
    (dict(size=1, compat="0.10", refcount_bits=8), InvalidArgument),
    (dict(size=1, compat="0.10", lazy_refcounts=True), InvalidArgument),
    (dict(size=1, compat="0.10", extended_l2=True), InvalidArgument),
    (dict(size=1, compat="0.10", compression_type="zstd"), InvalidArgument),
    (dict(size=1, compression_type="lz4"), InvalidArgument),
    (dict(size=1, extended_l2=True, cluster_size=8 * KiB), InvalidArgument),
    (dict(size=1, backing_file="b.raw"), InvalidArgument),
    (dict(size=1, backing_format="raw"), InvalidArgument),
    (dict(size=1, backing_file="", backing_format="raw"), InvalidArgument),
    (dict(size=1, backing_file="b" * 1024, backing_format="raw"), SafetyLimitExceeded),
    (dict(size=1, backing_file="b", backing_format="f" * 16), SafetyLimitExceeded),
    (dict(size=1, cluster_size=4096, backing_file="b" * 1000,
          backing_format="qcow2", lazy_refcounts=False), None),
    (dict(size=129 * GiB, cluster_size=512), InvalidArgument),
    (dict(size=8 * TiB + 1, cluster_size=4096), InvalidArgument),
    (dict(size=2 ** 62, cluster_size=2 * MiB), InvalidArgument),
])
def test_create_argument_validation(kwargs, err):
    kwargs = dict(kwargs)
    size = kwargs.pop("size")
    if err is None:
        fmt.new_image_layout(size, **kwargs)
    else:
        with pytest.raises(err):
            fmt.new_image_layout(size, **kwargs)


def test_create_largest_l1_is_allowed():
    # exactly 32 MiB of L1 at 512-byte clusters: 128 GiB
    h, data = fmt.new_image_layout(128 * GiB, cluster_size=512, refcount_bits=16)
    assert h.l1_size == fmt.MAX_L1_ENTRIES


# =========================================================================================
# Parsing images qemu-img made, and round trips
# =========================================================================================

def _roundtrip(data: bytes) -> fmt.Header:
    h = _parse(data)
    assert fmt.encode_header(h) == data[:h.cluster_size], "encode(parse(cluster 0)) differs"
    return h


@pytest.mark.qemu
def test_parse_raw_backing(tmp_path):
    data = _qemu_create(tmp_path / "t.qcow2", 4 * MiB, {}, "base.raw", "raw")
    h = _roundtrip(data)
    assert h.version == 3 and h.backing_file == "base.raw" and h.backing_format == "raw"
    # §2.5 byte map: backing-fmt extension at 112, feature table at 128, name at 528
    assert h.backing_file_offset == 528 and h.backing_file_size == 8
    assert h.feature_table == list(fmt.QEMU_FEATURE_TABLE)
    assert h.l1_size == 1 and h.size == 4 * MiB
    assert not (h.dirty or h.corrupt or h.lazy_refcounts or h.extended_l2)
    info = _info(tmp_path / "t.qcow2")
    assert fmt.info_fields(h) == info["format-specific"]["data"]


@pytest.mark.qemu
def test_parse_qcow2_backing_v2(tmp_path):
    data = _qemu_create(tmp_path / "t.qcow2", 1 * GiB, {"compat": "0.10"}, "base.qcow2",
                        "qcow2")
    h = _roundtrip(data)
    assert h.version == 2 and h.header_length == 72 and h.refcount_order == 4
    assert h.backing_file == "base.qcow2" and h.backing_format == "qcow2"
    assert h.backing_file_offset == 96 and h.feature_table == []
    assert h.compat == "0.10"
    assert fmt.info_fields(h) == _info(tmp_path / "t.qcow2")["format-specific"]["data"]


@pytest.mark.qemu
@pytest.mark.parametrize("opts", [
    {"extended_l2": "on"},
    {"compression_type": "zstd"},
    {"lazy_refcounts": "on", "refcount_bits": 1},
    {"cluster_size": 4096, "refcount_bits": 64},
    {"cluster_size": 2 * MiB},
    {"compat": "0.10", "cluster_size": 512},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_parse_feature_images(tmp_path, opts):
    p = tmp_path / "t.qcow2"
    data = _qemu_create(p, 3 * GiB, opts)
    h = _roundtrip(data)
    assert fmt.info_fields(h) == _info(p)["format-specific"]["data"]
    if opts.get("extended_l2") == "on":
        assert h.extended_l2 and h.l2_entry_size == 16 and h.l2_bits == 12
        assert h.subcluster_size == 2 * KiB
        assert h.incompatible_features == fmt.INCOMPAT_EXTL2
    else:
        assert h.l2_entry_size == 8 and h.l2_bits == h.cluster_bits - 3
    if "compression_type" in opts:
        assert h.compression_type == fmt.COMPRESSION_ZSTD and h.compression_name == "zstd"
        assert h.incompatible_features & fmt.INCOMPAT_COMPRESSION
    if "lazy_refcounts" in opts:
        assert h.lazy_refcounts and h.refcount_bits == 1 and h.refcount_max == 1
    assert h.l1_size == h.l1_entries_needed()
    assert h.refblock_entries == h.cluster_size * 8 // h.refcount_bits
    assert h.reftable_entries == h.refcount_table_clusters * h.cluster_size // 8


@pytest.mark.qemu
def test_parse_bitmaps(tmp_path):
    p = tmp_path / "t.qcow2"
    _qemu_create(p, 1 * MiB, {})
    _qemu_img("bitmap", "--add", "-f", "qcow2", p, "bm0")
    data = _read(p)
    h = _roundtrip(data)
    assert h.autoclear_features == fmt.AUTOCLEAR_BITMAPS and h.has_bitmaps
    nb, reserved, dir_size, dir_offset = struct.unpack(">IIQQ", h.bitmaps_ext)
    assert nb == 1 and reserved == 0 and dir_offset % h.cluster_size == 0 and dir_size > 0
    # §2.5: feature table at 112, bitmaps extension at 504
    assert struct.unpack_from(">I", data, 504)[0] == fmt.EXT_MAGIC_BITMAPS
    expected = dict(_info(p)["format-specific"]["data"])
    expected.pop("bitmaps")                 # the directory is not the header's business
    assert fmt.info_fields(h) == expected


def test_bitmaps_extension_dropped_without_autoclear_bit():
    h, data = fmt.new_image_layout(1 * MiB)
    ext = struct.pack(">IIQQ", 1, 0, 64, 0x30000)
    h2 = dataclasses.replace(h, bitmaps_ext=ext, autoclear_features=fmt.AUTOCLEAR_BITMAPS)
    c0 = fmt.encode_header(h2)
    assert fmt.parse_header(c0 + data[len(c0):], len(data)).bitmaps_ext == ext
    h3 = dataclasses.replace(h2, autoclear_features=0)
    c0 = fmt.encode_header(h3)
    # a program without bitmap support cleared the bit: QEMU ignores (and drops) the extension
    assert fmt.parse_header(c0 + data[len(c0):], len(data)).bitmaps_ext is None


@pytest.mark.qemu
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_parse_snapshots(tmp_path, compat):
    p = tmp_path / "t.qcow2"
    _qemu_create(p, 3 * MiB, {"compat": compat})
    _qemu_img("snapshot", "-c", "snap1", p)
    _qemu_img("snapshot", "-c", "second snapshot with a longer name", p)
    data = _read(p)
    h = _roundtrip(data)
    assert h.nb_snapshots == 2
    buf = data[h.snapshots_offset:h.snapshots_offset + fmt.MAX_SNAPSHOTS_SIZE]
    size = fmt.snapshot_table_size(buf, h)
    entries = fmt.parse_snapshot_table(buf, h, file_size=len(data))
    assert [(e.id, e.name) for e in entries] == [
        ("1", "snap1"), ("2", "second snapshot with a longer name")]
    info = _info(p)["snapshots"]
    for e, i in zip(entries, info):
        assert e.date_sec == i["date-sec"] and e.date_nsec == i["date-nsec"]
        assert e.vm_state_size == i["vm-state-size"] == 0
        assert e.icount == i["icount"] == 0
        assert e.disk_size == 3 * MiB and len(e.extra_data) == 24
        assert e.l1_size == h.l1_size and e.l1_table_offset % h.cluster_size == 0
    # round trip: QEMU writes exactly the bytes we would
    assert fmt.encode_snapshot_table(entries, h) == buf[:size]


def test_snapshot_table_size_incremental():
    h, _ = fmt.new_image_layout(1 * MiB)
    entries = [fmt.SnapshotEntry(id=str(i), name=f"snapshot number {i}",
                                 l1_table_offset=0x30000, l1_size=1, date_sec=i,
                                 date_nsec=0, vm_clock_nsec=0, vm_state_size=0,
                                 disk_size=1 * MiB, icount=None)
               for i in range(1, 40)]
    h.nb_snapshots = len(entries)
    table = fmt.encode_snapshot_table(entries, h)
    # a reader that starts with a small buffer and reads what it is told converges
    n, reads = 16, 0
    while True:
        want = fmt.snapshot_table_size(table[:n], h)
        reads += 1
        if want <= n:
            break
        assert want > n
        n = want
    assert want == len(table) and reads > 1
    parsed = fmt.parse_snapshot_table(table + b"\0" * 100, h)
    assert [e.name for e in parsed] == [e.name for e in entries]
    assert all(e.icount is None for e in parsed)
    assert fmt.encode_snapshot_table(parsed, h) == table


def test_snapshot_encode_qemu_rules():
    h, _ = fmt.new_image_layout(1 * MiB)
    big = fmt.SnapshotEntry(id="7", name="vm", l1_table_offset=0x40000, l1_size=1,
                            date_sec=1, date_nsec=2, vm_clock_nsec=3, vm_state_size=1 << 33,
                            extra_data=b"\x11" * 24 + b"unknown!", disk_size=None, icount=5)
    out = fmt.encode_snapshot_table([big], h)
    (_, _, id_len, name_len, _, _, _, vm32, extra_size) = struct.unpack_from(">QIHHIIQII", out)
    assert vm32 == 0                      # does not fit: 0 in the 32-bit field
    assert extra_size == 32               # max(24, original), unknown bytes kept
    vm64, disk, icount = struct.unpack_from(">QQQ", out, 40)
    assert (vm64, disk, icount) == (1 << 33, h.size, 5)
    assert out[64:72] == b"unknown!" and out[72:] == b"7vm"
    # short extra data: QEMU writes 24 bytes, icount all-ones when unknown
    short = dataclasses.replace(big, extra_data=b"", icount=None, vm_state_size=10)
    out = fmt.encode_snapshot_table([short, short], h)
    assert struct.unpack_from(">I", out, 36)[0] == 24
    assert struct.unpack_from(">Q", out, 56)[0] == fmt.SNAPSHOT_ICOUNT_NONE
    first_len = 40 + 24 + 3
    assert out[first_len:first_len + 5] == b"\0" * 5          # padding to 8
    assert len(out) == 72 + first_len                          # no trailing padding
    with pytest.raises(SafetyLimitExceeded):
        fmt.encode_snapshot_table([dataclasses.replace(big, extra_data=b"x" * 1025)], h)
    with pytest.raises(InvalidArgument):
        fmt.encode_snapshot_table([dataclasses.replace(big, l1_size=-1)], h)


def _snap_header(l1_offset=0x30000, l1_size=1, id_len=1, name_len=1, extra=24):
    return struct.pack(">QIHHIIQII", l1_offset, l1_size, id_len, name_len, 0, 0, 0, 0, extra)


@pytest.mark.parametrize("entry,version,err", [
    (_snap_header(extra=1025) + b"\0" * 1027, 3, SafetyLimitExceeded),
    (_snap_header(extra=8) + b"\0" * 10, 3, CorruptImage),           # v3 needs >= 16
    (_snap_header(l1_offset=0x30001) + b"\0" * 26, 3, CorruptImage),
    (_snap_header(l1_size=fmt.MAX_L1_ENTRIES + 1) + b"\0" * 26, 3, SafetyLimitExceeded),
    (_snap_header(l1_offset=(1 << 63) - 0x10000, l1_size=1 << 20) + b"\0" * 26, 3,
     CorruptImage),
    (_snap_header(name_len=200) + b"\0" * 30, 3, CorruptImage),        # name past the end
    (_snap_header()[:30], 3, CorruptImage),
    (_snap_header(l1_offset=0x10000000) + b"\0" * 26, 3, CorruptImage),  # L1 past EOF
    (_snap_header(extra=0) + b"\0" * 2, 2, None),                       # fine in v2
])
def test_snapshot_table_hostile(entry, version, err):
    h, data = fmt.new_image_layout(1 * MiB, compat="1.1" if version == 3 else "0.10")
    h.nb_snapshots = 1
    if err is None:
        (e,) = fmt.parse_snapshot_table(entry, h, file_size=len(data))
        assert e.disk_size is None and e.icount is None
    else:
        with pytest.raises(err):
            fmt.parse_snapshot_table(entry, h, file_size=len(data))


def test_snapshot_table_too_big():
    h, _ = fmt.new_image_layout(1 * MiB)
    h.nb_snapshots = fmt.MAX_SNAPSHOTS
    one = _snap_header(id_len=1000, name_len=0, extra=1024) + b"\0" * 2024
    # Entries that add up to more than 64 MiB: a caller reading incrementally as told is
    # stopped by SafetyLimitExceeded and never asked for more than 64 MiB.
    table = one * (fmt.MAX_SNAPSHOTS_SIZE // len(one) + 2)
    n = 0
    with pytest.raises(SafetyLimitExceeded):
        while True:
            want = fmt.snapshot_table_size(table[:n], h)
            assert n < want <= fmt.MAX_SNAPSHOTS_SIZE
            n = max(want, 2 * n)
    with pytest.raises(SafetyLimitExceeded):
        fmt.parse_snapshot_table(table, h)


def test_snapshot_lenient_mode():
    h, _ = fmt.new_image_layout(1 * MiB)
    h.nb_snapshots = 1
    entry = _snap_header(extra=8) + b"\0" * 10
    (e,) = fmt.parse_snapshot_table(entry, h, strict=False)
    assert e.disk_size is None


# =========================================================================================
# encode_header
# =========================================================================================

@pytest.mark.qemu
def test_unknown_extension_and_extra_header_kept_like_qemu(tmp_path):
    h, data = fmt.new_image_layout(1 * MiB)
    h1 = dataclasses.replace(h, extra_header=b"ABCDEFGH",
                             unknown_extensions=[(0x12345678, b"hello")])
    p = tmp_path / "u.qcow2"
    p.write_bytes(fmt.encode_header(h1) + data[h.cluster_size:])
    parsed = _parse(_read(p))
    assert parsed.header_length == 120 and parsed.extra_header == b"ABCDEFGH"
    assert parsed.unknown_extensions == [(0x12345678, b"hello")]
    # QEMU rewrites the whole cluster 0 on amend; with one unknown extension it must equal ours
    _qemu_img("amend", "-f", "qcow2", "-o", "lazy_refcounts=on", p)
    after = _read(p)
    h2 = dataclasses.replace(parsed, compatible_features=fmt.COMPAT_LAZY_REFCOUNTS)
    assert fmt.encode_header(h2) == after[:h.cluster_size]


@pytest.mark.qemu
def test_qemu_reverses_unknown_extensions(tmp_path):
    # Documents QEMU's behaviour (head-inserted list): each rewrite reverses the order of
    # unknown extensions.  We keep file order (see encode_header).
    h, data = fmt.new_image_layout(1 * MiB)
    exts = [(0x12345678, b"hello"), (0x9ABCDEF0, b"world!!!!")]
    p = tmp_path / "u.qcow2"
    p.write_bytes(fmt.encode_header(dataclasses.replace(h, unknown_extensions=exts))
                  + data[h.cluster_size:])
    _qemu_img("amend", "-f", "qcow2", "-o", "lazy_refcounts=on", p)
    assert _parse(_read(p)).unknown_extensions == exts[::-1]


def test_encode_v3_104_header_grows_to_112():
    h, data = fmt.new_image_layout(1 * MiB, cluster_size=4096)
    c0 = bytearray(fmt.encode_header(h))
    struct.pack_into(">I", c0, fmt.HDR_HEADER_LENGTH, 104)
    # shift the extension area (end marker only) to 104
    c0[104:120] = b"\0" * 16
    h104 = fmt.parse_header(bytes(c0) + data[4096:], len(data))
    assert h104.header_length == 104
    assert fmt.encode_header(h104)[:128] == fmt.encode_header(h)[:128]


def test_encode_limits():
    h, _ = fmt.new_image_layout(1 * MiB, cluster_size=512)
    # 512-byte cluster 0: 112 header + 16 fmt ext + 8 end marker leaves 376 for the name
    ok = dataclasses.replace(h, backing_file="n" * 376, backing_format="qcow2")
    assert len(fmt.encode_header(ok)) == 512
    with pytest.raises(SafetyLimitExceeded):
        fmt.encode_header(dataclasses.replace(ok, backing_file="n" * 377))
    big, _ = fmt.new_image_layout(1 * MiB)
    with pytest.raises(SafetyLimitExceeded):
        fmt.encode_header(dataclasses.replace(big, backing_file="n" * 1024))
    assert fmt.encode_header(dataclasses.replace(big, backing_file="n" * 1023))
    with pytest.raises(SafetyLimitExceeded):
        fmt.encode_header(dataclasses.replace(big, backing_format="q" * 16))
    with pytest.raises(SafetyLimitExceeded):
        fmt.encode_header(dataclasses.replace(big, unknown_extensions=[(7, b"x" * 70000)]))
    for bad in (dict(version=4), dict(size=-1), dict(l1_size=1 << 32), dict(cluster_bits=22),
                dict(compression_type=256), dict(bitmaps_ext=b"short"),
                dict(extra_header=b"odd"), dict(unknown_extensions=[(0, b"")])):
        with pytest.raises(InvalidArgument):
            fmt.encode_header(dataclasses.replace(big, **bad))
    v2, _ = fmt.new_image_layout(1 * MiB, compat="0.10")
    with pytest.raises(InvalidArgument):
        fmt.encode_header(dataclasses.replace(v2, compatible_features=1))


def test_non_utf8_backing_name_round_trips():
    h, data = fmt.new_image_layout(1 * MiB)
    raw = b"base-\xff\xfe.img"
    h2 = dataclasses.replace(h, backing_file=raw.decode("utf-8", "surrogateescape"),
                             backing_format="raw")
    c0 = fmt.encode_header(h2)
    assert raw in c0
    p = fmt.parse_header(c0 + data[len(c0):], len(data))
    assert p.backing_file.encode("utf-8", "surrogateescape") == raw
    assert fmt.encode_header(p) == c0


# =========================================================================================
# Hostile headers
# =========================================================================================

def _base() -> tuple[bytearray, int]:
    """A valid 1 GiB v3 image with a raw backing file: (file bytes, cluster size)."""
    _, data = fmt.new_image_layout(1 * GiB, backing_file="base.raw", backing_format="raw")
    return bytearray(data), 65536


def _put(buf, off, fmt_char, value):
    struct.pack_into(">" + fmt_char, buf, off, value)


# (description, mutation function, expected error class)
def _mutations():
    E = fmt
    m = []

    def field(name, off, ch, value, err):
        m.append(pytest.param(off, ch, value, err, id=name))

    field("magic", 0, "I", 0x514649FA, ImageFormatError)
    field("version-1", E.HDR_VERSION, "I", 1, ImageFormatError)
    field("version-4", E.HDR_VERSION, "I", 4, ImageFormatError)
    field("cluster_bits-8", E.HDR_CLUSTER_BITS, "I", 8, ImageFormatError)
    field("cluster_bits-22", E.HDR_CLUSTER_BITS, "I", 22, ImageFormatError)
    field("cluster_bits-huge", E.HDR_CLUSTER_BITS, "I", 0xFFFFFFFF, ImageFormatError)
    field("header_length-96", E.HDR_HEADER_LENGTH, "I", 96, ImageFormatError)
    field("header_length-odd", E.HDR_HEADER_LENGTH, "I", 113, ImageFormatError)
    field("header_length-over-cluster", E.HDR_HEADER_LENGTH, "I", 65536 + 8,
          ImageFormatError)
    field("padding", E.HDR_PADDING + 3, "B", 1, ImageFormatError)
    field("backing-offset-past-cluster", E.HDR_BACKING_FILE_OFFSET, "Q", 65537,
          ImageFormatError)
    field("backing-size-1024", E.HDR_BACKING_FILE_SIZE, "I", 1024, ImageFormatError)
    field("backing-size-past-cluster", E.HDR_BACKING_FILE_OFFSET, "Q", 65530,
          ImageFormatError)
    field("crypt-aes", E.HDR_CRYPT_METHOD, "I", 1, UnsupportedFeature)
    field("crypt-luks", E.HDR_CRYPT_METHOD, "I", 2, UnsupportedFeature)
    field("crypt-unknown", E.HDR_CRYPT_METHOD, "I", 7, UnsupportedFeature)
    field("incompat-unknown", E.HDR_INCOMPATIBLE_FEATURES, "Q", 1 << 40, UnsupportedFeature)
    field("incompat-data-file", E.HDR_INCOMPATIBLE_FEATURES, "Q", E.INCOMPAT_DATA_FILE,
          UnsupportedFeature)
    field("incompat-compression-zlib", E.HDR_INCOMPATIBLE_FEATURES, "Q",
          E.INCOMPAT_COMPRESSION, ImageFormatError)
    field("compression-zstd-no-bit", E.HDR_COMPRESSION_TYPE, "B", 1, ImageFormatError)
    field("compression-unknown", E.HDR_COMPRESSION_TYPE, "B", 9, UnsupportedFeature)
    field("autoclear-data-file-raw", E.HDR_AUTOCLEAR_FEATURES, "Q",
          E.AUTOCLEAR_DATA_FILE_RAW, ImageFormatError)
    field("refcount_order-7", E.HDR_REFCOUNT_ORDER, "I", 7, CorruptImage)
    field("reftable-clusters-0", E.HDR_REFCOUNT_TABLE_CLUSTERS, "I", 0, CorruptImage)
    field("reftable-unaligned", E.HDR_REFCOUNT_TABLE_OFFSET, "Q", 0x10200, CorruptImage)
    field("reftable-at-0", E.HDR_REFCOUNT_TABLE_OFFSET, "Q", 0, CorruptImage)
    field("reftable-past-eof", E.HDR_REFCOUNT_TABLE_OFFSET, "Q", 0x100000, CorruptImage)
    field("reftable-overflow", E.HDR_REFCOUNT_TABLE_OFFSET, "Q", (1 << 63) - 0x10000,
          CorruptImage)
    field("reftable-too-big", E.HDR_REFCOUNT_TABLE_CLUSTERS, "I", 129, SafetyLimitExceeded)
    field("l1-unaligned", E.HDR_L1_TABLE_OFFSET, "Q", 0x30008, CorruptImage)
    field("l1-past-eof", E.HDR_L1_TABLE_OFFSET, "Q", 0x40000, CorruptImage)
    field("l1-overflow", E.HDR_L1_TABLE_OFFSET, "Q", 0xFFFFFFFFFFFF0000, CorruptImage)
    field("l1-too-big", E.HDR_L1_SIZE, "I", E.MAX_L1_ENTRIES + 1, SafetyLimitExceeded)
    field("l1-too-small", E.HDR_L1_SIZE, "I", 1, CorruptImage)
    field("size-needs-bigger-l1", E.HDR_SIZE, "Q", 2 * GiB, CorruptImage)
    field("size-absurd", E.HDR_SIZE, "Q", (1 << 64) - 1, SafetyLimitExceeded)
    field("snapshots-too-many", E.HDR_NB_SNAPSHOTS, "I", E.MAX_SNAPSHOTS + 1,
          SafetyLimitExceeded)
    field("snapshots-unaligned", E.HDR_SNAPSHOTS_OFFSET, "Q", 0x123, CorruptImage)
    field("snapshots-past-eof", E.HDR_NB_SNAPSHOTS, "I", 3, CorruptImage)
    # extension area: the backing-format extension record at 112
    field("ext-too-long", 116, "I", 70000, ImageFormatError)
    field("ext-overruns-area", 116, "I", 420, ImageFormatError)
    field("backing-format-16", 116, "I", 16, ImageFormatError)
    field("dup-extension", 128, "I", E.EXT_MAGIC_BACKING_FORMAT, ImageFormatError)
    field("crypto-ext-without-luks", 112, "I", E.EXT_MAGIC_CRYPTO_HEADER, ImageFormatError)
    field("bitmaps-ext-bad-length", 112, "I", E.EXT_MAGIC_BITMAPS, ImageFormatError)
    return m


@pytest.mark.parametrize("off,ch,value,err", _mutations())
def test_hostile_field(off, ch, value, err):
    data, _ = _base()
    _put(data, off, ch, value)
    if err is SafetyLimitExceeded and off == fmt.HDR_REFCOUNT_TABLE_CLUSTERS:
        data += bytes(129 * 65536)  # so the limit, not the end of file, is what trips
    with pytest.raises(err):
        fmt.parse_header(bytes(data[:HEAD_MAX]), len(data))


def test_hostile_bitmaps_extension():
    h, data = fmt.new_image_layout(1 * MiB)
    def with_ext(ext, autoclear=fmt.AUTOCLEAR_BITMAPS):
        h2 = dataclasses.replace(h, bitmaps_ext=ext, autoclear_features=autoclear)
        c0 = fmt.encode_header(h2)
        return fmt.parse_header(c0 + data[len(c0):], len(data))
    assert with_ext(struct.pack(">IIQQ", 1, 0, 64, 0x30000)).has_bitmaps
    for ext, err in [(struct.pack(">IIQQ", 0, 0, 64, 0x30000), ImageFormatError),
                     (struct.pack(">IIQQ", 1, 1, 64, 0x30000), ImageFormatError),
                     (struct.pack(">IIQQ", 65536, 0, 64, 0x30000), SafetyLimitExceeded),
                     (struct.pack(">IIQQ", 1, 0, 64, 0x30001), CorruptImage),
                     (struct.pack(">IIQQ", 1, 0, 1024 * 65535 + 1, 0x30000),
                      SafetyLimitExceeded)]:
        with pytest.raises(err):
            with_ext(ext)


def test_unknown_incompat_bit_named_from_feature_table():
    h, data = fmt.new_image_layout(1 * MiB)
    # an image from a future QEMU: bit 9 set, described in its own feature-name table
    table = struct.pack(">BB46s", 0, 9, b"shiny new thing")
    h2 = dataclasses.replace(h, incompatible_features=1 << 9 | 1 << 12,
                             unknown_extensions=[(fmt.EXT_MAGIC_FEATURE_TABLE, table)])
    c0 = fmt.encode_header(h2)
    with pytest.raises(UnsupportedFeature) as ei:
        fmt.parse_header(c0 + data[len(c0):], len(data))
    assert "shiny new thing" in ei.value.feature
    assert "bit 12" in ei.value.feature


@pytest.mark.parametrize("bits", [fmt.INCOMPAT_DIRTY, fmt.INCOMPAT_CORRUPT,
                                  fmt.INCOMPAT_DIRTY | fmt.INCOMPAT_CORRUPT])
def test_dirty_and_corrupt_are_reported_not_refused(bits):
    data, _ = _base()
    _put(data, fmt.HDR_INCOMPATIBLE_FEATURES, "Q", bits)
    h = _parse(bytes(data))
    assert h.dirty == bool(bits & fmt.INCOMPAT_DIRTY)
    assert h.corrupt == bool(bits & fmt.INCOMPAT_CORRUPT)
    assert fmt.info_fields(h)["corrupt"] == h.corrupt


def test_short_inputs():
    data, _ = _base()
    with pytest.raises(ImageFormatError):
        fmt.parse_header(b"", 0)
    with pytest.raises(ImageFormatError):
        fmt.parse_header(bytes(data[:50]), 50)             # short file
    with pytest.raises(ImageFormatError):
        fmt.parse_header(bytes(data[:100]), 100)           # v3 header cut short
    with pytest.raises(InvalidArgument):
        fmt.parse_header(bytes(data[:1000]), len(data))    # caller passed too little
    with pytest.raises(InvalidArgument):
        fmt.parse_header(bytes(data), -1)
    # a v2 header may be exactly 72 bytes long as far as the header is concerned
    h2, d2 = fmt.new_image_layout(1 * MiB, compat="0.10")
    with pytest.raises(CorruptImage):                     # ... but its tables are past EOF
        fmt.parse_header(d2[:72], 72)


def test_empty_backing_name_like_qemu():
    # offset set, size 0: QEMU reads an empty name (no backing file) and writes it back
    data, _ = _base()
    _put(data, fmt.HDR_BACKING_FILE_SIZE, "I", 0)
    h = _parse(bytes(data))
    assert h.backing_file == ""
    assert fmt.encode_header(h)[fmt.HDR_BACKING_FILE_OFFSET:fmt.HDR_BACKING_FILE_SIZE + 4] \
        == struct.pack(">QI", 528, 0)


def _valid_images():
    out = []
    for kw in (dict(), dict(compat="0.10", backing_file="b.qcow2", backing_format="qcow2"),
               dict(cluster_size=512, backing_file="base", backing_format="raw"),
               dict(cluster_size=4096, extended_l2=False, lazy_refcounts=True)):
        _, data = fmt.new_image_layout(1 * MiB, **kw)
        out.append(data)
    return out


_VALID = _valid_images()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(min_size=0, max_size=600), st.integers(min_value=0, max_value=1 << 40))
def test_random_bytes_only_engine_errors(buf, extra):
    for data, size in ((buf, len(buf)), (fmt.QCOW_MAGIC_BYTES + buf, len(buf) + 4 + extra),
                       (fmt.QCOW_MAGIC_BYTES + b"\0\0\0\3" + buf, len(buf) + 8)):
        try:
            fmt.parse_header(data, size)
        except EngineError:
            pass


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(range(len(_VALID))),
       st.lists(st.tuples(st.integers(min_value=0, max_value=1100),
                          st.integers(min_value=0, max_value=255)), min_size=1, max_size=8),
       st.integers(min_value=-2, max_value=2))
def test_mutated_headers_only_engine_errors(which, pokes, trunc):
    data = bytearray(_VALID[which])
    for off, val in pokes:
        if off < len(data):
            data[off] = val
    size = max(0, len(data) + trunc * 512)
    data = bytes(data[:size])
    try:
        h = fmt.parse_header(data[:HEAD_MAX], size)
    except EngineError:
        return
    # whatever parses must encode (or refuse with an EngineError) and parse back the same
    try:
        c0 = fmt.encode_header(h)
    except EngineError:
        return
    again = fmt.parse_header(c0 + data[len(c0):], max(size, len(c0)))
    assert dataclasses.replace(again, feature_table=[], header_length=0,
                               backing_file_offset=0, backing_file_size=0) == \
        dataclasses.replace(h, feature_table=[], header_length=0,
                            backing_file_offset=0, backing_file_size=0)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=400), st.integers(min_value=0, max_value=70000),
       st.sampled_from([2, 3]))
def test_random_snapshot_tables_only_engine_errors(buf, nb, version):
    h, data = fmt.new_image_layout(1 * MiB, compat="1.1" if version == 3 else "0.10")
    h.nb_snapshots = nb
    for strict in (True, False):
        try:
            entries = fmt.parse_snapshot_table(buf, h, file_size=len(data), strict=strict)
        except EngineError:
            continue
        fmt.encode_snapshot_table(entries, h)
    try:
        fmt.snapshot_table_size(buf, h)
    except EngineError:
        pass


def test_info_fields_shapes():
    h, _ = fmt.new_image_layout(1 * MiB)
    assert fmt.info_fields(h) == {"compat": "1.1", "compression-type": "zlib",
                                  "lazy-refcounts": False, "refcount-bits": 16,
                                  "corrupt": False, "extended-l2": False}
    h2, _ = fmt.new_image_layout(1 * MiB, compat="0.10")
    assert fmt.info_fields(h2) == {"compat": "0.10", "compression-type": "zlib",
                                   "refcount-bits": 16}
    h3 = dataclasses.replace(h, incompatible_features=fmt.INCOMPAT_DATA_FILE,
                             autoclear_features=fmt.AUTOCLEAR_DATA_FILE_RAW,
                             data_file="data.raw")
    info = fmt.info_fields(h3)
    assert info["data-file"] == "data.raw" and info["data-file-raw"] is True
