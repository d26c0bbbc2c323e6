"""engine.check against ``qemu-img check`` 7.2, the oracle.

Every case builds an image with qemu-img/qemu-io, optionally damages it with byte pokes, and
runs our check and qemu-img's on identical copies: the JSON objects must be equal field by
field (except ``filename``) and so must the exit codes. Repairs are checked the same way, and
the repaired image must then pass ``qemu-img check`` and read back like a reference copy.

The tests need qemu-img and qemu-io: importing ``qemu`` fails (never skips) without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

import engine._core as core
import poke
import qemu
from engine.check import CheckResult, check_file
from engine.errors import EngineError, ImageFormatError, InvalidArgument

pytestmark = pytest.mark.qemu

# A write pattern that leaves normal, zero (preallocated and plain), discarded and partial
# clusters behind.
OPS = ["write -P 0x11 0 300k", "write -P 0x22 1M 64k", "write -z 2M 128k", "write -P 3 5M 1k",
       "discard 1M 32k", "write -P 4 9M 100k"]


# --- helpers ----------------------------------------------------------------------------------

def copy(src, dst) -> None:
    """Copy an image keeping it sparse (some tests make files of many GiB of holes)."""
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


def ours(path, repair=None) -> CheckResult:
    fd = os.open(path, os.O_RDWR if repair else os.O_RDONLY)
    try:
        return check_file(fd, filename=str(path), repair=repair)
    finally:
        os.close(fd)


def qemu_json(path, repair=None):
    """(exit code, JSON without filename/stderr) of qemu-img check."""
    code, data = qemu.qemu_check(path, repair=repair)
    data.pop("filename", None)
    data.pop("stderr", None)
    return code, data


def ours_json(res: CheckResult) -> dict:
    d = res.to_dict()
    assert d.pop("filename")
    return d


def assert_like_qemu(path, repair=None) -> CheckResult:
    """Run our check on PATH and qemu-img's on a copy; both must agree (and, after a repair,
    both images must read the same)."""
    twin = f"{path}.qemu"
    copy(path, twin)
    res = ours(path, repair)
    code, data = qemu_json(twin, repair)
    if not data:
        # qemu-img could not complete the check: it prints nothing and exits 1.
        assert code == 1 and res.exit_code == 1 and res.check_errors, (res, code)
    else:
        assert ours_json(res) == data, (f"\nours: {json.dumps(ours_json(res), sort_keys=True)}"
                                        f"\nqemu: {json.dumps(data, sort_keys=True)}"
                                        f"\nfindings: {res.findings[:20]}")
        assert res.exit_code == code
    if repair and data:
        # Our repaired image is as QEMU sees it, and reads like QEMU's repaired copy.
        after_code, after = qemu_json(path)
        assert after_code == res.exit_code, (after, res)
        if res.exit_code == 0:
            assert qemu.qemu_compare(path, twin, "qcow2", "qcow2")[0] == 0
    return res


def make(tmp_path, name="disk.qcow2", size="16M", ops=OPS, **opts):
    path = tmp_path / name
    qemu.create(path, size, **opts)
    if ops:
        qemu.qemu_io(path, *ops)
    return path


def refcount_geometry(path, cluster):
    h = poke.header(path)
    C = 1 << h["cluster_bits"]
    order = h["refcount_order"] if h["version"] >= 3 else 4
    bits = 1 << order
    per_block = C * 8 // bits
    block = poke.read_be(path, h["refcount_table_offset"] + 8 * (cluster // per_block), 8)
    return block & ~0x1FF, cluster % per_block, bits


def get_refcount(path, cluster) -> int:
    block, i, bits = refcount_geometry(path, cluster)
    if bits >= 8:
        return poke.read_be(path, block + i * bits // 8, bits // 8)
    per = 8 // bits
    b = poke.read_be(path, block + i // per, 1)
    return (b >> (bits * (i % per))) & ((1 << bits) - 1)


def set_refcount(path, cluster, value) -> None:
    block, i, bits = refcount_geometry(path, cluster)
    if bits >= 8:
        poke.write_be(path, block + i * bits // 8, bits // 8, value)
        return
    per = 8 // bits
    shift = bits * (i % per)
    mask = ((1 << bits) - 1) << shift
    b = poke.read_be(path, block + i // per, 1)
    poke.write_be(path, block + i // per, 1, (b & ~mask) | ((value << shift) & mask))


def data_cluster(path, vaddr) -> int:
    return (poke.l2_entry(path, vaddr) & poke.L2_OFFSET_MASK) // poke.cluster_size(path)


def xor_be(path, offset, value, width=8):
    poke.write_be(path, offset, width, poke.read_be(path, offset, width) ^ value)


# --- 1. clean images ----------------------------------------------------------------------------

GEOMETRIES = [(65536, bits) for bits in (1, 2, 4, 8, 16, 32, 64)] + [
    (512, 16), (4096, 16), (2 << 20, 16), (512, 1), (512, 64), (4096, 2), (16384, 4),
    (131072, 8), (1 << 20, 32), (2 << 20, 64)]


@pytest.mark.parametrize("cluster_size,refcount_bits", GEOMETRIES,
                         ids=[f"c{c}-r{r}" for c, r in GEOMETRIES])
def test_clean_geometries(tmp_path, cluster_size, refcount_bits):
    path = make(tmp_path, cluster_size=cluster_size, refcount_bits=refcount_bits)
    res = assert_like_qemu(path)
    assert res.exit_code == 0 and not res.findings


def _compressed(tmp_path, cluster_size, extra=""):
    src = make(tmp_path, "src.qcow2", cluster_size=cluster_size)
    dst = tmp_path / "comp.qcow2"
    qemu.qemu_img("convert", "-c", "-f", "qcow2", "-O", "qcow2", "-o",
                  f"cluster_size={cluster_size}{extra}", src, dst)
    return dst


def _snapshots(tmp_path, **opts):
    path = make(tmp_path, **opts)
    qemu.qemu_img("snapshot", "-c", "one", path)
    qemu.qemu_io(path, "write -P 0x55 0 64k", "write -P 0x56 10M 1M", "discard 9M 64k")
    qemu.qemu_img("snapshot", "-c", "two", path)
    qemu.qemu_io(path, "write -P 0x57 100k 64k")
    return path


def _overlay(tmp_path):
    base = make(tmp_path, "base.qcow2")
    top = tmp_path / "top.qcow2"
    qemu.create(top, "16M", backing=base.name, backing_fmt="qcow2")
    qemu.qemu_io(top, "write -P 1 100k 10k", "write -z 1M 64k", "discard 5M 64k")
    return top


def _bitmaps(tmp_path):
    path = make(tmp_path)
    qemu.qemu_img("bitmap", "--add", path, "b1")
    qemu.qemu_img("bitmap", "--add", "-g", "4096", path, "b2")
    qemu.qemu_io(path, "write -P 7 0 1M")
    return path


FEATURES = {
    "extl2-16k": lambda t: make(t, cluster_size=16384, extended_l2=True,
                                ops=OPS + ["write -P 5 12M 4k", "write -z 13M 8k"]),
    "extl2-64k": lambda t: make(t, extended_l2=True, ops=OPS + ["write -P 5 12M 4k"]),
    "extl2-2m": lambda t: make(t, cluster_size=2 << 20, extended_l2=True,
                               ops=OPS + ["write -P 5 12M 4k", "write -z 13M 8k"]),
    "v2": lambda t: make(t, compat="0.10"),
    "compressed-512": lambda t: _compressed(t, 512),
    "compressed-4k": lambda t: _compressed(t, 4096),
    "compressed-64k": lambda t: _compressed(t, 65536),
    "compressed-2m": lambda t: _compressed(t, 2 << 20),
    "compressed-r1": lambda t: _compressed(t, 4096, ",refcount_bits=1"),
    "compressed-v2": lambda t: _compressed(t, 65536, ",compat=0.10"),
    "compressed-zstd": lambda t: _compressed(t, 65536, ",compression_type=zstd"),
    "snapshots": _snapshots,
    "snapshots-r2": lambda t: _snapshots(t, refcount_bits=2),
    "snapshots-extl2": lambda t: _snapshots(t, extended_l2=True, cluster_size=32768),
    "snapshots-v2": lambda t: _snapshots(t, compat="0.10"),
    "overlay": _overlay,
    "bitmaps": _bitmaps,
    "prealloc-metadata": lambda t: make(t, size="4M", ops=(), preallocation="metadata"),
    "prealloc-full": lambda t: make(t, size="4M", ops=(), preallocation="full"),
    "empty": lambda t: make(t, ops=()),
    "lazy-clean": lambda t: make(t, lazy_refcounts=True),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_clean_features(tmp_path, feature):
    path = FEATURES[feature](tmp_path)
    res = assert_like_qemu(path)
    assert res.exit_code == 0


@pytest.mark.parametrize("raw", [False, True], ids=["data-file", "data-file-raw"])
def test_external_data_file(tmp_path, raw):
    """Data clusters in an external file carry no refcount (engine.format refuses the image;
    the check still reads it, as QEMU's does)."""
    path = make(tmp_path, ops=(), data_file=tmp_path / "data.raw", data_file_raw=raw)
    qemu.qemu_io(path, "write -P 3 0 1M", "write -z 4M 64k")
    res = assert_like_qemu(path)
    assert res.exit_code == 0 and res.allocated_clusters


def test_luks_header_area_is_counted(tmp_path):
    """The LUKS header area carries references (qemu-img needs the key to open the image)."""
    path = tmp_path / "luks.qcow2"
    secret = ["--object", "secret,id=sec0,data=abc"]
    qemu.qemu_img("create", "-q", "-f", "qcow2", *secret, "-o",
                  "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", path, "16M")
    opts = f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"
    proc = qemu.qemu_img("check", *secret, "--image-opts", "--output=json", opts)
    data = json.loads(proc.stdout)
    data.pop("filename")
    set_refcount(path, 1, 2)    # a leak, to show the header area itself is counted right
    qemu_leak = json.loads(qemu.qemu_img("check", *secret, "--image-opts", "--output=json",
                                         opts, check=False).stdout)
    qemu_leak.pop("filename")
    set_refcount(path, 1, 1)
    assert ours_json(ours(path)) == data
    set_refcount(path, 1, 2)
    assert ours_json(ours(path)) == qemu_leak and qemu_leak["leaks"] == 1


def test_snapshot_delete_and_compressed_writes(tmp_path):
    path = _snapshots(tmp_path)
    qemu.qemu_img("snapshot", "-d", "one", path)
    assert_like_qemu(path)
    comp = _compressed(tmp_path, 4096)
    qemu.qemu_io(comp, "write -P 9 0 4k", "write -P 8 1M 1M")
    qemu.qemu_img("snapshot", "-c", "s", comp)
    assert_like_qemu(comp)


# --- 2./3. damaged images and their repair ------------------------------------------------------

def _poke_l2(vaddr, fn):
    def damage(p):
        off = poke.l2_entry_offset(p, vaddr)
        poke.write_be(p, off, 8, fn(poke.read_be(p, off, 8)))
    return damage


def _clear_rt(index):
    def damage(p):
        poke.write_be(p, poke.reftable_entry_offset(p, index), 8, 0)
    return damage


def _rt(index, fn):
    def damage(p):
        off = poke.reftable_entry_offset(p, index)
        poke.write_be(p, off, 8, fn(poke.read_be(p, off, 8)))
    return damage


def _l1(index, fn):
    def damage(p):
        off = poke.l1_entry_offset(p, index)
        poke.write_be(p, off, 8, fn(poke.read_be(p, off, 8)))
    return damage


def _dup_l2_entry(p):
    poke.write_be(p, poke.l2_entry_offset(p, 64 << 10), 8, poke.l2_entry(p, 0))


def _under_shared(p):
    qemu.qemu_img("snapshot", "-c", "s", p)
    set_refcount(p, data_cluster(p, 0), 1)


def _compressed_cluster(p, vaddr):
    v = poke.l2_entry(p, vaddr)
    cb = poke.get(p, "cluster_bits")
    return (v & ((1 << (70 - cb)) - 1)) >> cb


# name: (create options, damage, data untouched: compare with the undamaged copy afterwards)
DAMAGE = {
    "leak-data": ({}, lambda p: set_refcount(p, data_cluster(p, 1 << 20), 3), True),
    "leak-refcount-max": ({}, lambda p: set_refcount(p, data_cluster(p, 0), 65535), True),
    "leak-r1-free-cluster": ({"refcount_bits": 1},
                             lambda p: set_refcount(p, poke.file_size(p) // 65536 - 1, 1), True),
    "leak-r4-l2-table": ({"refcount_bits": 4, "cluster_size": 4096},
                         lambda p: set_refcount(p, poke.l1_entry(p, 0) % (1 << 56) // 4096, 7),
                         True),
    "under-shared": ({}, _under_shared, True),
    "refcount-zero": ({}, lambda p: set_refcount(p, data_cluster(p, 1 << 20), 0), True),
    "refcount-zero-r1": ({"refcount_bits": 1},
                         lambda p: set_refcount(p, data_cluster(p, 1 << 20), 0), True),
    "refcount-zero-r64-2m": ({"refcount_bits": 64, "cluster_size": 2 << 20},
                             lambda p: set_refcount(p, 0, 0), True),
    "refblock-pointer-cleared": ({}, _clear_rt(0), True),
    "refblock-pointer-cleared-512": ({"cluster_size": 512}, _clear_rt(1), True),
    "refblock-duplicated": ({}, lambda p: poke.write_be(
        p, poke.reftable_entry_offset(p, 1), 8,
        poke.read_be(p, poke.reftable_entry_offset(p, 0), 8)), True),
    "refblock-outside-image": ({}, _rt(1, lambda v: 200 << 20), True),
    "refblocks-outside-far-and-near": ({"cluster_size": 4096}, lambda p: (
        poke.write_be(p, poke.reftable_entry_offset(p, 1), 8, 0x800000000000C000),
        poke.write_be(p, poke.reftable_entry_offset(p, 4), 8, 100 << 20)), True),
    "reftable-past-eof": ({}, lambda p: poke.set(p, "refcount_table_offset", 512 << 20), True),
    "no-reftable": ({}, lambda p: poke.set(p, "refcount_table_clusters", 0), True),
    "copied-l2-flipped": ({}, _poke_l2(0, lambda v: v ^ poke.COPIED), True),
    "copied-l1-flipped": ({}, _l1(0, lambda v: v ^ poke.COPIED), True),
    "copied-on-compressed": ({"_compressed": True},
                             _poke_l2(0, lambda v: v | poke.COPIED), True),
    "compressed-leak": ({"_compressed": True},
                        lambda p: set_refcount(p, _compressed_cluster(p, 0),
                                               get_refcount(p, _compressed_cluster(p, 0)) + 1),
                        True),
    "compressed-under": ({"_compressed": True},
                         lambda p: set_refcount(p, _compressed_cluster(p, 1 << 20), 1), True),
    "reserved-l2": ({}, _poke_l2(0, lambda v: v | 0x2), True),
    "reserved-l1": ({}, _l1(0, lambda v: v | (1 << 60)), True),
    "l2-past-eof": ({}, _poke_l2(1 << 20, lambda v: poke.COPIED | (100 << 20)), False),
    "l2-unaligned-data": ({}, _poke_l2(1 << 20, lambda v: v + 512), False),
    "l2-unaligned-prealloc": ({}, _poke_l2(2 << 20, lambda v: v + 512), True),
    "extl2-unaligned-prealloc": ({"extended_l2": True, "_ops": ["write -P 1 2M 64k",
                                                                 "write -z 2M 64k"]},
                                 _poke_l2(2 << 20, lambda v: v + 512), True),
    "l1-unaligned-l2": ({}, _l1(0, lambda v: v + 512), False),
    "same-data-twice": ({}, _dup_l2_entry, False),
    "same-data-twice-r1": ({"refcount_bits": 1}, _dup_l2_entry, False),
    "extl2-alloc-and-zero": ({"extended_l2": True},
                             lambda p: xor_be(p, poke.l2_entry_offset(p, 0) + 8, 1 << 32), False),
    "extl2-unallocated-bitmap": ({"extended_l2": True},
                                 lambda p: poke.write_be(p, poke.l2_entry_offset(p, 3 << 20) + 8,
                                                         8, 1), False),
    "dirty-bit": ({"lazy_refcounts": True}, lambda p: poke.set(p, "incompatible_features", 1),
                  True),
    "corrupt-bit": ({}, lambda p: poke.set(p, "incompatible_features", 2), True),
    "truncated": ({}, lambda p: poke.truncate(p, poke.file_size(p) - 3 * 65536), False),
    "snapshot-l1-unaligned": ({"_snapshots": True},
                              lambda p: xor_be(p, poke.snapshot_entry(p, 0), 512), True),
    "snapshot-l1-too-large": ({"_snapshots": True},
                              lambda p: poke.write_be(p, poke.snapshot_entry(p, 0) + 8, 4, 5 << 20),
                              True),
    "snapshot-l1-past-eof": ({"_snapshots": True},
                             lambda p: poke.write_be(p, poke.snapshot_entry(p, 1), 8, 512 << 20),
                             True),
    "snapshot-table-unaligned": ({"_snapshots": True},
                                 lambda p: poke.set(p, "snapshots_offset",
                                                    poke.get(p, "snapshots_offset") + 8), True),
    "snapshot-entry-incomplete": ({"_snapshots": True},
                                  lambda p: poke.write_be(p, poke.snapshot_entry(p, 1) + 36, 4, 8),
                                  True),
    "snapshot-extra-too-large": ({"_snapshots": True},
                                 lambda p: poke.write_be(p, poke.snapshot_entry(p, 1) + 36, 4,
                                                         2000), True),
    "snapshot-count-too-high": ({"_snapshots": True},
                                lambda p: poke.set(p, "nb_snapshots", 3), True),
    "bitmap-directory-leak": ({"_bitmaps": True},
                              lambda p: set_refcount(p, _bitmap_dir(p) // 65536, 2), True),
    "bitmap-directory-refcount-zero": ({"_bitmaps": True},
                                       lambda p: set_refcount(p, _bitmap_dir(p) // 65536, 0),
                                       True),
    "bitmap-table-reserved-bit": ({"_bitmaps": True},
                                  lambda p: xor_be(p, _bitmap_table(p), 2), True),
    "bitmap-count-wrong": ({"_bitmaps": True},
                           lambda p: poke.write_be(
                               p, poke.find_extension(p, poke.EXT_BITMAPS)[0] + 8, 4, 3), True),
    "l1-too-small": ({}, lambda p: poke.set(p, "l1_size", 0), True),
}


def _bitmap_dir(p):
    off, _ = poke.find_extension(p, poke.EXT_BITMAPS)
    return poke.read_be(p, off + 8 + 16, 8)


def _bitmap_table(p):
    return poke.read_be(p, _bitmap_dir(p), 8)


def _damaged(tmp_path, name):
    opts, damage, _ = DAMAGE[name]
    opts = dict(opts)
    if opts.pop("_compressed", False):
        path = _compressed(tmp_path, 65536)
    elif opts.pop("_snapshots", False):
        path = _snapshots(tmp_path, **opts)
    elif opts.pop("_bitmaps", False):
        path = _bitmaps(tmp_path)
    else:
        path = make(tmp_path, ops=opts.pop("_ops", OPS), **opts)
    pristine = tmp_path / "pristine.qcow2"
    copy(path, pristine)
    damage(str(path))
    return path, pristine


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damage_like_qemu(tmp_path, name):
    path, pristine = _damaged(tmp_path, name)
    base = tmp_path / "damaged.qcow2"
    copy(path, base)
    res = assert_like_qemu(path)
    assert res.findings or res.exit_code == 0
    for mode in ("leaks", "all"):
        work = tmp_path / f"repair-{mode}.qcow2"
        copy(base, work)
        fixed = assert_like_qemu(work, mode)
        if fixed.exit_code == 0 and DAMAGE[name][2]:
            # The damage did not touch data: the repaired image reads like the original.
            assert qemu.qemu_compare(work, pristine, "qcow2", "qcow2")[0] == 0


def test_refcount_findings_text(tmp_path):
    path = make(tmp_path)
    cl = data_cluster(path, 1 << 20)
    set_refcount(path, cl, 2)
    res = ours(path)
    assert f"Leaked cluster {cl} refcount=2 reference=1" in res.findings
    assert any(f.startswith("ERROR OFLAG_COPIED data cluster") for f in res.findings)
    set_refcount(path, cl, 0)
    res = ours(path)
    assert f"ERROR cluster {cl} refcount=0 reference=1" in res.findings


def test_leaks_mode_cannot_rebuild(tmp_path):
    path, _ = _damaged(tmp_path, "refblock-pointer-cleared")
    before = poke.read_bytes(path, 0, poke.file_size(path))
    res = ours(path, "leaks")
    assert res.check_errors == 1 and res.exit_code == 1
    assert "ERROR need to rebuild refcount structures" in res.findings
    assert poke.read_bytes(path, 0, poke.file_size(path)) == before
    code, data = qemu_json(path, "leaks")
    assert code == 1 and not data


def test_lazy_refcounts_crash(tmp_path):
    """A process killed with lazy refcounts leaves the dirty bit and stale refcounts."""
    path = make(tmp_path, ops=(), lazy_refcounts=True)
    qemu.qemu_io(path, "write -P 1 0 256k", "write -P 2 4M 64k", "sigraise 9", check=False)
    assert poke.get(path, "incompatible_features") & 1
    res = assert_like_qemu(path)
    assert res.exit_code == 2
    crashed = tmp_path / "crashed.qcow2"
    copy(path, crashed)
    fixed = assert_like_qemu(path, "all")
    assert fixed.exit_code == 0 and fixed.rebuilt and fixed.corruptions_fixed
    assert poke.get(path, "incompatible_features") & 3 == 0
    qemu.assert_qemu_clean(path)
    assert qemu.convert_to_raw(path)[:256 << 10] == b"\x01" * (256 << 10)


def test_repair_clears_dirty_and_corrupt_bits(tmp_path):
    path = make(tmp_path, lazy_refcounts=True)
    poke.set(path, "incompatible_features", 3)
    res = ours(path, "leaks")
    assert res.exit_code == 0
    assert poke.get(path, "incompatible_features") == 0


def test_corruption_remaining_keeps_bits(tmp_path):
    path = make(tmp_path)
    _poke_l2(0, lambda v: v | 0x2)(path)
    poke.set(path, "incompatible_features", 2)
    res = ours(path, "all")
    assert res.exit_code == 2
    assert poke.get(path, "incompatible_features") == 2


# --- deviations from qemu-img, on purpose -----------------------------------------------------

def test_v2_zero_flag_is_a_corruption(tmp_path):
    """qemu-img check 7.2 does not look at the zero flag in v2 images, but QEMU's read path
    marks such an image corrupt; we report it (and cannot repair it)."""
    path = make(tmp_path, compat="0.10")
    _poke_l2(5 << 20, lambda v: v | 1)(path)
    res = ours(path)
    code, data = qemu_json(path)
    assert code == 0 and "corruptions" not in data
    assert res.corruptions == 1 and res.exit_code == 2
    assert any("zero flag in a version 2 image" in f for f in res.findings)
    d = ours_json(res)
    d.pop("corruptions")
    assert d == data


@pytest.mark.parametrize("name", ["reserved-bits", "unaligned"])
def test_rebuild_over_unusable_refblock(tmp_path, name):
    """QEMU's rebuild refuses to write over a refcount block whose reftable entry is broken
    (its overlap check still sees the old block) and fails the check; ours rebuilds."""
    path = make(tmp_path)
    pristine = tmp_path / "pristine.qcow2"
    copy(path, pristine)
    _rt(0, (lambda v: v | 1) if name == "reserved-bits" else (lambda v: v + 512))(path)
    assert_like_qemu(path)
    res = ours(path, "all")
    assert res.exit_code == 0 and res.rebuilt
    qemu.assert_qemu_clean(path)
    assert qemu.qemu_compare(path, pristine, "qcow2", "qcow2")[0] == 0


# --- crash safety of the repair -----------------------------------------------------------------

def _count_writes(path, repair):
    """The repair's writes, counted by the core's I/O shim (every write of a repair goes
    through it)."""
    core.set_fault(None)
    ours(path, repair)
    return core.fault_stats()[0]["pwrite"]


@pytest.mark.parametrize("scenario", ["raise-and-lower", "rebuild", "rebuild-512", "copied",
                                      "snapshot-table"])
def test_crash_during_repair_is_repairable(tmp_path, scenario):
    """Stop the repair after each of its writes (as a crash would); a second repair must then
    leave a clean image with the original data."""
    path = make(tmp_path, cluster_size=512 if scenario == "rebuild-512" else 65536)
    if scenario == "snapshot-table":
        qemu.qemu_img("snapshot", "-c", "s", path)
    pristine = tmp_path / "pristine.qcow2"
    copy(path, pristine)
    if scenario == "raise-and-lower":
        qemu.qemu_img("snapshot", "-c", "s", path)
        set_refcount(path, data_cluster(path, 0), 1)                 # under-counted
        set_refcount(path, data_cluster(path, 5 << 20), 4)           # leaked
    elif scenario == "rebuild":
        _clear_rt(0)(path)
    elif scenario == "rebuild-512":
        _clear_rt(1)(path)
        _clear_rt(3)(path)
    elif scenario == "snapshot-table":
        poke.write_be(path, poke.snapshot_entry(path, 0) + 36, 4, 8)
    else:
        _poke_l2(0, lambda v: v ^ poke.COPIED)(path)
        _l1(0, lambda v: v ^ poke.COPIED)(path)
    damaged = tmp_path / "damaged.qcow2"
    copy(path, damaged)
    counted = tmp_path / "count.qcow2"
    copy(damaged, counted)
    n = _count_writes(counted, "all")
    assert n >= 2, n
    for k in range(n):
        work = tmp_path / f"crash{k}.qcow2"
        copy(damaged, work)
        # write k+1 and every later one never reach the file: a crash after k writes
        core.set_fault("pwrite", k + 1, 5, persistent=True)
        try:
            with pytest.raises(EngineError):
                ours(work, "all")
        finally:
            core.set_fault(None)
        res = ours(work, "all")
        assert res.exit_code == 0, (k, res)
        qemu.assert_qemu_clean(work)
        if scenario != "raise-and-lower":
            assert qemu.qemu_compare(work, pristine, "qcow2", "qcow2")[0] == 0


# --- interface ----------------------------------------------------------------------------------

def test_json_presence_rules():
    r = CheckResult(filename="x")
    assert r.to_dict() == {"filename": "x", "format": "qcow2", "check-errors": 0}
    assert r.exit_code == 0
    r = CheckResult(filename="x", leaks=2, leaks_fixed=1, image_end_offset=4096)
    assert r.to_dict() == {"filename": "x", "format": "qcow2", "check-errors": 0, "leaks": 2,
                           "leaks-fixed": 1, "image-end-offset": 4096}
    assert r.exit_code == 3
    assert CheckResult(filename="x", leaks=1, corruptions=1).exit_code == 2
    assert CheckResult(filename="x", corruptions=1, check_errors=1).exit_code == 1


@pytest.mark.parametrize("case", ["clean", "leak", "corrupt", "repaired", "compressed"])
def test_text_like_qemu(tmp_path, case):
    path = _compressed(tmp_path, 65536) if case == "compressed" else make(tmp_path)
    if case in ("leak", "repaired"):
        set_refcount(path, data_cluster(path, 1 << 20), 2)
        _poke_l2(1 << 20, lambda v: v & ~poke.COPIED)(path)
    elif case == "corrupt":
        set_refcount(path, data_cluster(path, 1 << 20), 0)
    twin = tmp_path / "twin.qcow2"
    copy(path, twin)
    repair = "all" if case == "repaired" else None
    text = ours(path, repair).to_text()
    args = ["check", "-f", "qcow2"] + (["-r", repair] if repair else [])
    proc = qemu.qemu_img(*args, twin, check=False)
    assert text == proc.stdout.decode()


def test_bad_arguments(tmp_path):
    path = make(tmp_path, ops=())
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(InvalidArgument):
            check_file(fd, filename=str(path), repair="everything")
    finally:
        os.close(fd)
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\0" * 65536)
    with pytest.raises(ImageFormatError):
        ours(raw)


def test_unopenable_header_is_a_check_error(tmp_path):
    path = make(tmp_path, ops=())
    poke.set(path, "l1_table_offset", poke.get(path, "l1_table_offset") + 8)
    res = ours(path)
    assert res.exit_code == 1 and res.check_errors == 1 and res.findings
    assert qemu_json(path) == (1, {})


def test_findings_are_capped(tmp_path, monkeypatch):
    import engine.check

    monkeypatch.setattr(engine.check, "MAX_FINDINGS_PER_KIND", 100)
    path = make(tmp_path, cluster_size=512, ops=["write -P 1 0 2M"])
    _clear_rt(1)(path)
    _clear_rt(2)(path)
    _clear_rt(3)(path)
    _clear_rt(4)(path)
    _clear_rt(5)(path)
    res = assert_like_qemu(path)
    assert res.corruptions > 100
    assert len(res.findings) <= 2 * 100 + 10      # two kinds of message, plus summaries
    assert f"... {res.corruptions // 2 - 100} more refcount findings not listed" in res.findings


# --- size and hostile inputs --------------------------------------------------------------------

def test_fast_on_1g_fully_allocated(tmp_path):
    """1 GiB, every cluster allocated (8192 entries per L2 table): well under a second."""
    path = make(tmp_path, size="1G", ops=(), preallocation="metadata")
    t = time.perf_counter()
    res = ours(path)
    elapsed = time.perf_counter() - t
    assert res.allocated_clusters == 16384
    assert_like_qemu(path)
    assert elapsed < 2.0, elapsed


def test_fast_on_many_small_clusters(tmp_path):
    """512-byte clusters, 32 MiB of data: 65536 clusters in 1024 L2 tables."""
    raw = tmp_path / "data.raw"
    raw.write_bytes(bytes(range(1, 256)) * (32 * 1024 * 1024 // 255 + 1))
    path = tmp_path / "small.qcow2"
    qemu.qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", raw, path)
    t = time.perf_counter()
    res = ours(path)
    elapsed = time.perf_counter() - t
    assert res.allocated_clusters == 65537
    assert elapsed < 3.0, elapsed
    assert_like_qemu(path)


def test_hostile_sparse_file_stays_bounded(tmp_path):
    """A 64 GiB sparse file with pointers all over it: the check neither reads nor allocates
    in proportion to the pointers' reach, and never raises for what the image contains."""
    path = make(tmp_path)
    poke.truncate(path, 64 << 30)
    for i in range(1, 8):
        poke.write_be(path, poke.reftable_entry_offset(path, i), 8, (i << 33) + 65536 * i)
    _l1(1, lambda v: (40 << 30) | poke.COPIED)(path)
    _poke_l2(0, lambda v: (1 << 55) | poke.COPIED)(path)
    t = time.perf_counter()
    res = ours(path)
    assert time.perf_counter() - t < 10
    assert res.exit_code == 2
    assert_like_qemu(path)


def test_never_raises_on_garbage_tables(tmp_path):
    """Random bytes over every table: the result is a report, not an exception."""
    import random

    rng = random.Random(1234)
    path = make(tmp_path, cluster_size=4096)
    size = poke.file_size(path)
    for trial in range(12):
        work = tmp_path / f"g{trial}.qcow2"
        copy(path, work)
        for _ in range(20):
            off = rng.randrange(4096, size - 8)
            poke.write_bytes(work, off, rng.randbytes(8))
        try:
            res = ours(work)
        except EngineError as e:        # only an unreadable header may raise
            pytest.fail(f"trial {trial}: {e!r}")
        assert isinstance(res.exit_code, int)
        fixed = ours(work, "all")
        assert fixed.exit_code in (0, 1, 2, 3)
