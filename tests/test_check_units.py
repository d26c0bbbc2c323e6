"""Unit tests of the rooms of ``engine.check`` and of the refcount primitives they share with
the create-time layout (``engine.qcow2.refblocks``).

- refcount computation (``computed``) and comparison (``stored``) on tiny images whose every
  cluster is known, one of them built by hand;
- the snapshot table repair (``snapshot_table``): the rewritten table is the one QEMU writes,
  at the same place;
- the rebuild (``rebuild``): on the same damaged file, the new refcount table and blocks are
  where ``qemu-img check -r all`` puts them, with the same bytes;
- the open rules (``reader``): the limits are ``engine.qcow2.header``'s, and the check names
  them as qemu-img does;
- the free-run search and the refcount table sizing both allocators use.

The cases that compare with QEMU use qemu-img and qemu-io (always installed).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import engine.check
import engine.check.copied
import poke
import qemu
from engine.check import check_file
from engine.check.computed import _calculate
from engine.check.reader import _Image, _load
from engine.check.result import _Findings, _Pass
from engine.check.stored import _compare, _StoredRefcounts
from engine.errors import CorruptImage, SafetyLimitExceeded
from engine.qcow2 import spec
from engine.qcow2.header import l1_size_limit, parse_header, table_offset_limit, table_size_limit
from engine.qcow2.layout import new_image_layout
from engine.qcow2.refblocks import first_free_run, reftable_clusters, reftable_entries
from engine.qcow2.snapshots import parse_snapshot_table


def _check(path, repair=None):
    fd = os.open(path, os.O_RDWR if repair else os.O_RDONLY)
    try:
        return check_file(fd, filename=str(path), repair=repair)
    finally:
        os.close(fd)


def _computed(path):
    """(computed refcounts as {cluster: count}, the image, the counting pass) of PATH."""
    fd = os.open(path, os.O_RDONLY)
    try:
        h, head, size, problem = _load(fd, str(path))
        assert problem is None
        img = _Image(fd, str(path), h, head, size)
        p = _Pass(fd, str(path), 0)
        calc, idx, cnt, nb = _calculate(p, img, [], 0, True)
        mis = _compare(img, idx, cnt, nb)
        stored, ok = _StoredRefcounts(img).get(np.arange(nb, dtype=np.int64))
        return dict(zip(idx.tolist(), cnt.tolist())), mis, stored[ok].tolist(), p
    finally:
        os.close(fd)


# --- the free-run search and the refcount table sizing --------------------------------------

def _mask(free):
    arr = np.array(free, dtype=bool)

    def is_free(a, b):
        return arr[a:b]
    return is_free, len(arr)


@pytest.mark.parametrize("free,count,start,want", [
    ([0, 1, 1, 0, 1, 1, 1, 0], 3, 0, 4),        # the first run long enough
    ([0, 1, 1, 0, 1, 1, 1, 0], 1, 0, 1),
    ([0, 1, 1, 0, 1, 1, 1, 0], 2, 2, 4),        # a run cut by ``start`` is too short
    ([0, 1, 0, 1, 1], 3, 0, 3),                 # the run reaching the end grows past it
    ([0, 0, 0], 2, 0, 3),                       # nothing free: right after the end
    ([0, 0, 0], 2, 7, 7),                       # start past the end
    ([], 4, 0, 0),
])
def test_first_free_run(free, count, start, want):
    is_free, end = _mask(free)
    assert first_free_run(is_free, end, count, start) == want


def test_first_free_run_across_windows():
    """Runs that straddle the growing search windows are found whole."""
    free = np.zeros(100_000, dtype=bool)
    free[4090:4100] = True          # across the first window's end
    free[30_000:30_500] = True
    asked: list[tuple[int, int]] = []

    def is_free(a, b):
        asked.append((a, b))
        return free[a:b]
    assert first_free_run(is_free, len(free), 10) == 4090
    assert first_free_run(is_free, len(free), 11) == 30_000
    assert first_free_run(is_free, len(free), 501) == len(free)
    assert first_free_run(is_free, len(free), 1, 4095) == 4095
    # a hit near the start reads one small window, not the whole table
    asked.clear()
    assert first_free_run(is_free, len(free), 1, 30_000) == 30_000
    assert asked == [(30_000, 34_096)]


def test_reftable_sizing():
    assert reftable_entries(1, 512) == 64
    assert reftable_entries(64, 512) == 64
    assert reftable_entries(65, 512) == 128
    assert reftable_entries(0, 65536) == 0
    assert reftable_clusters(64, 512) == 1
    assert reftable_clusters(65, 512) == 2
    assert reftable_clusters(8192, 65536) == 1


# --- computed and stored refcounts ------------------------------------------------------------

def test_computed_refcounts_of_a_known_image(tmp_path):
    """qemu-img create + one write: header, reftable, refblock, L1, one L2, one data cluster,
    each counted once; a snapshot counts the shared L2 and data twice."""
    path = tmp_path / "a.qcow2"
    qemu.create(path, "16M")
    qemu.qemu_io(path, "write -P 7 0 64k")
    counts, mis, stored, p = _computed(path)
    assert counts == {0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
    assert len(mis.idx) == 0 and stored == [1] * 6
    assert (p.corruptions, p.leaks, p.check_errors) == (0, 0, 0)
    assert p.allocated == 1

    qemu.qemu_img("snapshot", "-c", "s1", str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        h, head, size, _ = _load(fd, str(path))
        img = _Image(fd, str(path), h, head, size)
        from engine.check.snapshot_table import _read_snapshot_table
        snaps = _read_snapshot_table(_Pass(fd, str(path), 0), img)
        assert snaps is not None and len(snaps) == 1
        calc, idx, cnt, nb = _calculate(_Pass(fd, str(path), 0), img, snaps, 0, False)
        counts = dict(zip(idx.tolist(), cnt.tolist()))
        l2 = (poke.l1_entry(path, 0) & spec.L1E_OFFSET_MASK) >> 16
        data = (poke.l2_entry(path, 0) & spec.L2E_OFFSET_MASK) >> 16
        assert counts[l2] == 2 and counts[data] == 2
        assert len(_compare(img, idx, cnt, nb).idx) == 0
    finally:
        os.close(fd)


def test_hand_built_image_without_refcounts(tmp_path):
    """An image built from engine.qcow2's layout, with an L2 table and a data cluster added
    by hand and no refcount for them: the count finds both, the stored refcounts say 0, and
    that needs a rebuild, which then agrees with qemu-img."""
    h, data = new_image_layout(1 << 20, cluster_size=4096)
    C = 4096
    n = len(data) // C + (len(data) % C > 0)
    l2_off, data_off = n * C, (n + 1) * C
    blob = bytearray(data.ljust(n * C, b"\0")) + bytes(2 * C)
    blob[h.l1_table_offset:h.l1_table_offset + 8] = (
        l2_off | spec.QCOW_OFLAG_COPIED).to_bytes(8, "big")
    blob[l2_off:l2_off + 8] = (data_off | spec.QCOW_OFLAG_COPIED).to_bytes(8, "big")
    blob[data_off:data_off + C] = b"\x5a" * C
    path = tmp_path / "hand.qcow2"
    path.write_bytes(bytes(blob))

    counts, mis, stored, p = _computed(path)
    assert counts[l2_off // C] == 1 and counts[data_off // C] == 1
    assert mis.idx.tolist() == [l2_off // C, data_off // C]
    assert mis.stored.tolist() == [0, 0] and mis.computed.tolist() == [1, 1]
    res = _check(path)
    assert res.exit_code == 2
    assert sum("refcount=0 reference=1" in f for f in res.findings) == 2
    code, data = qemu.qemu_check(path)
    assert (code, data["corruptions"]) == (2, res.corruptions)      # with the COPIED ones

    twin = tmp_path / "hand.qemu.qcow2"
    shutil.copy(path, twin)
    fixed = _check(path, "all")
    assert fixed.rebuilt and fixed.exit_code == 0
    code, _ = qemu.qemu_check(twin, repair="all")
    assert code == 0
    _assert_same_refcount_structures(path, twin)
    assert qemu.convert_to_raw(path)[:C] == b"\x5a" * C


# --- rebuild placement: the same layout as qemu-img check -r all ---------------------------------

def _refcount_structures(path):
    """(reftable offset, reftable clusters, reftable entries, {refblock offset: bytes})."""
    h = poke.header(path)
    C = 1 << h["cluster_bits"]
    rt = poke.read_bytes(path, h["refcount_table_offset"], h["refcount_table_clusters"] * C)
    entries = [int.from_bytes(rt[i:i + 8], "big") for i in range(0, len(rt), 8)]
    blocks = {e: poke.read_bytes(path, e, C) for e in entries if e}
    return h["refcount_table_offset"], h["refcount_table_clusters"], entries, blocks


def _assert_same_refcount_structures(ours, theirs):
    a, b = _refcount_structures(ours), _refcount_structures(theirs)
    assert a[:3] == b[:3], f"\nours:  {a[:3]}\nqemu:  {b[:3]}"
    assert a[3] == b[3]


@pytest.mark.parametrize("opts,size,ops,clear", [
    ({}, "16M", ["write -P 1 0 300k", "write -P 2 5M 64k"], 0),
    ({"cluster_size": 512}, "4M", ["write -P 1 0 2M"], 1),
    ({"cluster_size": 512, "refcount_bits": 64}, "4M", ["write -P 1 0 1M"], 2),
    ({"cluster_size": 4096, "refcount_bits": 1}, "64M", ["write -P 1 0 40M"], 0),
    ({"cluster_size": 1024, "refcount_bits": 8}, "32M", ["write -P 3 0 9M"], 1),
    # ~100 refblocks: the new reftable needs two clusters
    ({"cluster_size": 512, "refcount_bits": 64}, "8M", ["write -P 1 0 3M"], 5),
], ids=["c64k", "c512", "c512-r64", "c4k-r1", "c1k-r8", "c512-r64-reftable-grows"])
def test_rebuild_places_like_qemu(tmp_path, request, opts, size, ops, clear):
    """A cleared reftable entry leaves referenced clusters without a refcount block: both
    repairs rebuild the refcount structures, and lay them out identically."""
    path = tmp_path / "d.qcow2"
    qemu.create(path, size, **opts)
    qemu.qemu_io(path, *ops)
    poke.write_be(path, poke.reftable_entry_offset(path, clear), 8, 0)
    twin = tmp_path / "d.qemu.qcow2"
    shutil.copy(path, twin)
    res = _check(path, "all")
    assert res.rebuilt
    code, data = qemu.qemu_check(twin, repair="all")
    assert code == res.exit_code == 0, data
    _assert_same_refcount_structures(path, twin)
    assert poke.file_size(path) == poke.file_size(twin)
    if request.node.callspec.id.endswith("reftable-grows"):
        assert poke.get(path, "refcount_table_clusters") == 2
    assert qemu.qemu_compare(path, twin, "qcow2", "qcow2")[0] == 0


# --- snapshot table repair ----------------------------------------------------------------------

def test_snapshot_table_repair_writes_what_qemu_writes(tmp_path):
    """An incomplete v3 snapshot entry (extra data shorter than 16 bytes): the repair rewrites
    the table through engine.qcow2.snapshots' encoder, where and as QEMU rewrites it."""
    path = tmp_path / "s.qcow2"
    qemu.create(path, "8M")
    qemu.qemu_io(path, "write -P 1 0 128k")
    qemu.qemu_img("snapshot", "-c", "first", str(path))
    qemu.qemu_io(path, "write -P 2 0 64k")
    qemu.qemu_img("snapshot", "-c", "second", str(path))
    entry = poke.snapshot_entry(path, 1)
    # The last entry as an older writer leaves it: 8 bytes of extra data, then id and name.
    poke.write_be(path, entry + 36, 4, 8)
    poke.write_bytes(path, entry + 48, b"2second")
    twin = tmp_path / "s.qemu.qcow2"
    shutil.copy(path, twin)

    before = _check(path)
    assert before.corruptions == 1
    assert any("snapshot table entry 1 is incomplete" in f for f in before.findings)
    res = _check(path, "all")
    assert res.exit_code == 0 and res.corruptions_fixed >= 1
    code, _ = qemu.qemu_check(twin, repair="all")
    assert code == 0
    for p in (path, twin):
        qemu.assert_qemu_clean(p)
    ours_h, theirs_h = poke.header(path), poke.header(twin)
    assert ours_h["snapshots_offset"] == theirs_h["snapshots_offset"]
    assert ours_h["nb_snapshots"] == theirs_h["nb_snapshots"] == 2
    head = open(path, "rb").read(1 << 16)
    h = parse_header(head, poke.file_size(path))
    table = poke.read_bytes(path, h.snapshots_offset, 4096)
    entries = parse_snapshot_table(table, h, file_size=poke.file_size(path))   # strict: whole
    assert [(e.id, e.name) for e in entries] == [("1", "first"), ("2", "second")]
    assert [len(e.extra_data) for e in entries] == [24, 24]
    assert table == poke.read_bytes(twin, h.snapshots_offset, 4096)


# --- open rules ----------------------------------------------------------------------------------

def test_open_limits_have_one_home(tmp_path):
    """The limits parse_header applies are the functions the check names in qemu-img's
    words: the same header breaks the same rule on both sides."""
    with pytest.raises(SafetyLimitExceeded):
        table_size_limit("t", spec.MAX_REFTABLE_SIZE // 512 + 1, 512, spec.MAX_REFTABLE_SIZE)
    table_size_limit("t", spec.MAX_REFTABLE_SIZE // 512, 512, spec.MAX_REFTABLE_SIZE)
    with pytest.raises(CorruptImage):
        table_offset_limit("t", 65536 + 8, 1, 8, 65536)
    with pytest.raises(CorruptImage):
        table_offset_limit("t", spec.INT64_MAX - 7, 1, 16, 512)
    with pytest.raises(SafetyLimitExceeded):
        l1_size_limit(1 << 63, 9, False, 1 << 20, 0)
    with pytest.raises(CorruptImage):
        l1_size_limit(1 << 30, 16, False, 1, 0)

    for field, value, error, words in [
        ("refcount_table_clusters", 1 << 20, SafetyLimitExceeded,
         "ERROR Reference count table too large"),
        ("refcount_table_offset", 65536 + 512, CorruptImage,
         "ERROR Reference count table offset invalid"),
        ("l1_size", (32 << 20) // 8 + 1, SafetyLimitExceeded, "ERROR Active L1 table too large"),
        ("l1_size", 0, CorruptImage, "ERROR L1 table is too small"),
        ("l1_table_offset", 3 * 65536 + 8, CorruptImage,
         "ERROR Active L1 table offset invalid"),
    ]:
        path = tmp_path / f"{field}-{value}.qcow2"
        qemu.create(path, "1G")
        poke.set(path, field, value)
        with pytest.raises(error):
            parse_header(open(path, "rb").read(1 << 16), poke.file_size(path))
        res = _check(path)
        assert (res.check_errors, res.findings) == (1, [words]), field
        code, data = qemu.qemu_check(path)          # qemu-img cannot open it either
        assert code == 1 and words.removeprefix("ERROR ") in data["stderr"], data


# --- the result and the passes -------------------------------------------------------------------

def test_findings_cap_is_read_at_each_call(tmp_path, monkeypatch):
    f = _Findings(cap=2)
    f.add_many("x", 5, (f"line {i}" for i in range(5)))
    f.add("y", "one")
    assert f.lines() == ["line 0", "line 1", "one", "... 3 more x findings not listed"]

    path = tmp_path / "c.qcow2"
    qemu.create(path, "4M", cluster_size=512)
    qemu.qemu_io(path, "write -P 1 0 1M")
    poke.write_be(path, poke.reftable_entry_offset(path, 1), 8, 0)
    full = _check(path)
    monkeypatch.setattr(engine.check, "MAX_FINDINGS_PER_KIND", 3)
    capped = _check(path)
    assert capped.to_dict() == full.to_dict()
    assert len(capped.findings) < len(full.findings)
    assert any(line.startswith("... ") and "more refcount findings" in line
               for line in capped.findings)


def test_copied_check_over_several_batches(tmp_path, monkeypatch):
    """The COPIED check reads the active tree's L2 tables in batches: with many batches it
    finds and repairs what it finds with one."""
    path = tmp_path / "b.qcow2"
    qemu.create(path, "4M", cluster_size=512)
    qemu.qemu_io(path, "write -P 1 0 600k")
    for vaddr in (0, 200 << 10, 500 << 10):         # clear COPIED on data clusters
        off = poke.l2_entry_offset(path, vaddr)
        poke.write_be(path, off, 8, poke.read_be(path, off, 8) & ~spec.QCOW_OFLAG_COPIED)
    twin = tmp_path / "b2.qcow2"
    shutil.copy(path, twin)
    one = _check(path)
    monkeypatch.setattr(engine.check.copied, "_BATCH_BYTES", 4 * 512)
    many = _check(twin)
    assert many.to_dict() | {"filename": 0} == one.to_dict() | {"filename": 0}
    assert many.corruptions == 3
    fixed = _check(twin, "all")
    assert fixed.exit_code == 0 and fixed.corruptions_fixed == 3
    qemu.assert_qemu_clean(twin)


def test_copied_check_on_a_large_active_tree(tmp_path):
    """More L2 tables in the active tree than one batch holds (16 MiB of tables: 257 tables
    of 64 KiB, one per 512 MiB of a 129 GiB disk): checked and repaired like qemu-img."""
    path = tmp_path / "big.qcow2"
    qemu.create(path, 129 << 30)
    qemu.qemu_io(path, *[f"write -P 9 {i << 29} 4k" for i in range(257)])
    off = poke.l2_entry_offset(path, 256 << 29)
    poke.write_be(path, off, 8, poke.read_be(path, off, 8) & ~spec.QCOW_OFLAG_COPIED)
    twin = tmp_path / "big.qemu.qcow2"
    shutil.copy(path, twin)
    res = _check(path)
    code, data = qemu.qemu_check(twin)
    assert (code, data["corruptions"]) == (res.exit_code, res.corruptions) == (2, 1)
    fixed = _check(path, "all")
    assert fixed.exit_code == 0 and fixed.corruptions_fixed == 1
    qemu.assert_qemu_clean(path)
