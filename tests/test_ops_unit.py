"""Unit tests of engine/ops (convert, commit, stream, diff, measure and the copy loop), called
directly on small images made with ``engine.create``; QEMU is the oracle where it has one:
``qemu-img compare`` for content, ``qemu-img check`` for the images written, ``qemu-img map``
for allocation and ``qemu-img measure`` for the data a flattened copy needs.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

import qemu
from test_interop import first_difference

import engine
from engine import ops
from engine.ops import _copy
from engine.ops.convert import ZERO_BLOCK

KiB = 1024
MiB = 1024 * KiB
SIZE = 2 * MiB


def rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def make_chain(folder, *, base_fmt="qcow2"):
    """base (BASE_FMT, 64 KiB clusters) <- mid (4 KiB clusters) <- top (512-byte clusters),
    each with data, zeroes and (in the overlays) discards; returns the three paths."""
    base = folder / f"base.{base_fmt}"
    with engine.create(str(base), SIZE, format=base_fmt) as img:
        img.write(0, rand(1, 300 * KiB))
        img.write(512 * KiB, bytes(64 * KiB))              # data that is all zeros
        img.write(700 * KiB + 3, rand(2, 100 * KiB))
        img.write(1500 * KiB, rand(3, 64 * KiB))
    mid = folder / "mid.qcow2"
    with engine.create(str(mid), SIZE, cluster_size=4096, backing=base.name,
                       backing_format=base_fmt) as img:
        img.write(100 * KiB + 17, rand(4, 50 * KiB))
        img.write_zeroes(720 * KiB, 16 * KiB)
        img.write(1024 * KiB, rand(5, 12 * KiB))
    top = folder / "top.qcow2"
    with engine.create(str(top), SIZE, cluster_size=512, backing=mid.name,
                       backing_format="qcow2") as img:
        img.write(5000, rand(6, 3000))
        img.write_zeroes(200 * KiB, 8 * KiB, unmap=True)
        img.write(1020 * KiB, rand(7, 9 * KiB))
        img.discard(1024 * KiB, 4 * KiB)
    return base, mid, top


def assert_same_content(a, b, fmt_a="qcow2", fmt_b="raw"):
    code, text = qemu.qemu_compare(a, b, fmt_a, fmt_b)
    if code != 0:
        pytest.fail(f"qemu-img compare {a.name} {b.name}: {text.strip()}; "
                    f"{first_difference(qemu.convert_to_raw(a, fmt_a), qemu.convert_to_raw(b, fmt_b))}")


def snapshot_raw(path, fmt="qcow2"):
    """The content of PATH's chain now, as QEMU reads it, saved beside it."""
    out = path.parent / (path.name + ".before.raw")
    out.write_bytes(qemu.convert_to_raw(path, fmt))
    return out


def qemu_depth0(path, depth: int = 0) -> list[tuple[int, int, bool]]:
    """(start, length, zero) of the runs layer DEPTH of PATH's chain holds, per qemu-img map."""
    return [(e["start"], e["length"], bool(e["zero"]) and not e["data"])
            for e in qemu.normalize_map(qemu.qemu_map(path)) if e["present"] and e["depth"] == depth]


def merged(runs):
    out = []
    for s, n, z in runs:
        if out and out[-1][2] == z and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n, z)
        else:
            out.append((s, n, z))
    return out


# --- measure -----------------------------------------------------------------------------------

@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_layer_runs_match_qemu_map(tmp_path, monkeypatch, base_fmt):
    monkeypatch.chdir(tmp_path)
    base, mid, top = make_chain(tmp_path, base_fmt=base_fmt)
    with engine.open(str(top), readonly=True) as img:
        for depth in (0, 1):
            assert ops.layer_runs(img, depth) == merged(qemu_depth0(top, depth)), depth
            assert ops.allocated_bytes(img, depth) == sum(r[1] for r in qemu_depth0(top, depth))
            assert ops.allocated_bytes(img, depth, keep_zeros=False) == sum(
                r[1] for r in qemu_depth0(top, depth) if not r[2])
            assert all(not z for _, _, z in ops.layer_runs(img, depth, keep_zeros=False))
        # A span of layers: 0..1 is everything top and mid hold.
        both = ops.layer_runs(img, 1, min_depth=0)
        assert sum(r[1] for r in both) == sum(r[1] for d in (0, 1) for r in qemu_depth0(top, d))
        commit, pull = ops.merge_costs(img)
        assert commit == ops.allocated_bytes(img, 0)
        assert pull == sum(r[1] for r in qemu_depth0(top, 1))
        _, pull_data = ops.merge_costs(img, keep_zeros=False)
        assert pull_data == ops.allocated_bytes(img, 1, keep_zeros=False)
        assert pull_data < pull                              # mid holds a zero range


@pytest.mark.parametrize("cluster", [4096, 65536])
def test_measure_matches_qemu_img_measure(tmp_path, monkeypatch, cluster):
    """The data a flattened qcow2 copy needs: every target cluster touched by a run that reads
    data (layer_runs over the whole chain, zeros left out) — what ``qemu-img measure`` adds to
    an empty image's size."""
    monkeypatch.chdir(tmp_path)
    _, _, top = make_chain(tmp_path)
    with engine.open(str(top), readonly=True) as img:
        runs = ops.layer_runs(img, len(img.chain()) - 1, min_depth=0, keep_zeros=False)
    clusters = set()
    for s, n, _ in runs:
        clusters.update(range(s // cluster, -(-(s + n) // cluster)))
    ours = len(clusters) * cluster
    opt = f"cluster_size={cluster}"
    full = qemu.qemu_img_json("measure", "-f", "qcow2", "-O", "qcow2", "-o", opt, top)
    empty = qemu.qemu_img_json("measure", "--size", str(SIZE), "-O", "qcow2", "-o", opt)
    assert ours == full["required"] - empty["required"], (ours, full, empty)


def test_layer_runs_of_unallocated_image(engine_image):
    img = engine_image("empty.qcow2", SIZE)
    assert ops.layer_runs(img) == [] and ops.allocated_bytes(img) == 0
    assert ops.merge_costs(img) == (0, 0)
    assert ops.layer_runs(img, 3) == []                      # no such layer: nothing held


# --- convert -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,cluster", [("raw", 65536), ("qcow2", 512), ("qcow2", 65536),
                                         ("qcow2", 2 * MiB)])
def test_convert_matches_qemu(tmp_path, monkeypatch, fmt, cluster):
    monkeypatch.chdir(tmp_path)
    _, _, top = make_chain(tmp_path)
    dest = tmp_path / f"flat.{fmt}"
    seen = []
    with engine.open(str(top), readonly=True) as src:
        written = ops.convert(src, str(dest), format=fmt, cluster_size=cluster,
                              progress=lambda d, t: seen.append((d, t)))
        expected = src.read(0, src.size)
    assert_same_content(dest, top, fmt, "qcow2")
    if fmt == "qcow2":
        qemu.assert_qemu_clean(dest)
        info = qemu.qemu_info(dest)
        assert "backing-filename" not in info and info["cluster-size"] == cluster
        assert info["virtual-size"] == SIZE
    else:
        assert dest.stat().st_size == SIZE
    # Zero blocks are not written: the data written is at most the non-zero blocks of the
    # data the chain holds, and the all-zero data cluster of the base stays unallocated.
    block = min(ZERO_BLOCK, cluster) if fmt == "qcow2" else ZERO_BLOCK
    nonzero = sum(n for _, n in ops.nonzero_blocks(memoryview(expected), block))
    assert 0 < written <= nonzero
    if cluster <= ZERO_BLOCK:      # (a 2 MiB cluster there also holds data around it)
        with engine.open(str(dest), format=fmt, readonly=True) as out:
            at = out.extents(512 * KiB, 64 * KiB)
        assert all(not e.data for e in at), at
    assert seen and seen[-1][0] == seen[-1][1]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_convert_refuses_existing_destination(tmp_path, engine_image):
    src = engine_image("src.qcow2", SIZE)
    src.write(0, b"x" * 4096)
    dest = tmp_path / "there.raw"
    dest.write_bytes(b"keep me")
    with pytest.raises(engine.InvalidArgument, match="exists"):
        ops.convert(src, str(dest), format="raw")
    assert dest.read_bytes() == b"keep me"


def test_convert_empty_image(tmp_path, engine_image):
    src = engine_image("src.qcow2", SIZE)
    dest = tmp_path / "out.qcow2"
    assert ops.convert(src, str(dest), format="qcow2") == 0
    src.close()
    qemu.assert_qemu_clean(dest)
    assert_same_content(dest, tmp_path / "src.qcow2", "qcow2", "qcow2")


# --- commit ------------------------------------------------------------------------------------

@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_commit_matches_qemu(tmp_path, monkeypatch, base_fmt):
    """Commit mid into base: base then reads what the chain mid->base read; the bytes
    processed are what mid holds; a second commit changes nothing."""
    monkeypatch.chdir(tmp_path)
    base, mid, top = make_chain(tmp_path, base_fmt=base_fmt)
    before = snapshot_raw(mid)
    top_before = snapshot_raw(top)
    with engine.open(str(mid), readonly=True, backing=False) as m:
        held = ops.allocated_bytes(m)
        with engine.open(str(base), format=base_fmt) as b:
            assert ops.commit(m, b) == held
    assert_same_content(base, before, base_fmt)
    if base_fmt == "qcow2":
        qemu.assert_qemu_clean(base)
    assert_same_content(top, top_before)                     # the chain above reads the same
    image_before = base.read_bytes()
    with engine.open(str(mid), readonly=True, backing=False) as m, \
            engine.open(str(base), format=base_fmt) as b:
        ops.commit(m, b)
    assert_same_content(base, before, base_fmt)
    if base_fmt == "raw":
        assert base.read_bytes() == image_before             # idempotent


def test_commit_grows_smaller_base(tmp_path, monkeypatch):
    """A top larger than its base (the disk grew after the base was frozen): commit grows the
    base first, then base reads what top read."""
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "base.qcow2"
    with engine.create(str(base), SIZE, cluster_size=4096) as b:
        b.write(0, rand(12, 10000))
    top = tmp_path / "top.qcow2"
    with engine.create(str(top), 2 * SIZE, backing=base.name, backing_format="qcow2") as t:
        t.write(5000, rand(13, 100))
        t.write(2 * SIZE - 5000, rand(14, 4000))
    before = snapshot_raw(top)
    with engine.open(str(top), readonly=True, backing=False) as t, \
            engine.open(str(base)) as b:
        assert b.size == SIZE
        ops.commit(t, b)
        assert b.size == 2 * SIZE
    qemu.assert_qemu_clean(base)
    assert qemu.qemu_info(base)["virtual-size"] == 2 * SIZE
    assert_same_content(base, before)


def test_commit_progress_and_empty_top(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "b.qcow2"
    with engine.create(str(base), SIZE) as b:
        b.write(0, rand(9, 8192))
    with engine.create(str(tmp_path / "t.qcow2"), SIZE, backing="b.qcow2",
                       backing_format="qcow2"):
        pass
    before = base.read_bytes()
    seen = []
    with engine.open(str(tmp_path / "t.qcow2"), readonly=True, backing=False) as t, \
            engine.open(str(base)) as b:
        assert ops.commit(t, b, progress=lambda d, n: seen.append((d, n))) == 0
    assert seen == [(0, 0)]
    assert base.read_bytes() == before


# --- stream ------------------------------------------------------------------------------------

def test_stream_one_layer_then_rebase(tmp_path, monkeypatch):
    """Stream mid into top (depth 1), rebase top onto base: top reads as before, and a second
    stream finds nothing left to copy."""
    monkeypatch.chdir(tmp_path)
    base, mid, top = make_chain(tmp_path)
    before = snapshot_raw(top)
    with engine.open(str(top)) as img:
        expect = sum(r[1] for r in ops.layer_runs(img, 1, min_depth=1))
        assert ops.stream(img, depth=1) == expect
        assert ops.layer_runs(img, 1, min_depth=1) == []
        assert ops.stream(img, depth=1) == 0
        img.rebase(base.name, "qcow2")
    qemu.assert_qemu_clean(top)
    assert qemu.qemu_info(top)["backing-filename"] == base.name
    assert_same_content(top, before)


def test_stream_whole_chain_without_zeros(tmp_path, monkeypatch):
    """Stream every layer (zeros left out: nothing will remain underneath), drop the backing
    file: top alone reads as the chain did."""
    monkeypatch.chdir(tmp_path)
    _, _, top = make_chain(tmp_path)
    before = snapshot_raw(top)
    seen = []
    with engine.open(str(top)) as img:
        ops.stream(img, depth=2, keep_zeros=False, progress=lambda d, t: seen.append((d, t)))
        img.rebase(None)
    qemu.assert_qemu_clean(top)
    assert "backing-filename" not in qemu.qemu_info(top)
    assert_same_content(top, before)
    assert seen and seen[-1][0] == seen[-1][1] > 0


def test_stream_refuses_readonly_image(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, _, top = make_chain(tmp_path)
    data = top.read_bytes()
    with engine.open(str(top), readonly=True) as img:
        with pytest.raises(engine.EngineError):
            ops.stream(img)
    assert top.read_bytes() == data


# --- merge (plan_merge, pull) ------------------------------------------------------------------

def test_plan_merge_prices_like_merge_costs(tmp_path, monkeypatch):
    """A plan made on the top volume opened alone and its base opened with its chain (as a
    repository merge holds them) prices both directions as the chain opened from the top
    does, and its runs are what each direction copies."""
    monkeypatch.chdir(tmp_path)
    _, mid, top = make_chain(tmp_path)
    with engine.open(str(top), readonly=True) as img:
        costs = ops.merge_costs(img)
        costs_data = ops.merge_costs(img, keep_zeros=False)
        assert costs[1] == sum(r[1] for r in qemu_depth0(top, 1))
    with engine.open(str(mid), readonly=True) as m, \
            engine.open(str(top), readonly=True, backing=False) as t:
        plan = ops.plan_merge(t, m)
        assert (plan.commit_bytes, plan.pull_bytes) == costs
        assert plan.commit_runs == ops.layer_runs(t, 0)
        assert ops.plan_merge(t, m, keep_zeros=False).pull_bytes == costs_data[1]
        assert ops.plan_merge(t, None) == ops.MergePlan(plan.commit_runs, [])
    # the pull runs are the base's own runs less what the top holds: disjoint from the top's
    held = [(s, s + n) for s, n, _ in plan.commit_runs]
    assert not [(s, n) for s, n, _ in plan.pull_runs for a, b in held if s < b and a < s + n]


@pytest.mark.parametrize("top_cluster", [512, 65536])
def test_pull_into_a_top_opened_alone(tmp_path, monkeypatch, top_cluster):
    """``pull`` writes into the top opened without its chain (the base is open read-write
    beside it).  With the top's clusters larger than the base's, a run of the base that ends
    inside one of the top's clusters is widened to the whole cluster, read through the base's
    chain: the rest of the cluster keeps what lies under the base, not zeros."""
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "base.qcow2"
    with engine.create(str(base), SIZE) as img:
        img.write(0, rand(10, SIZE))
    mid = tmp_path / "mid.qcow2"
    with engine.create(str(mid), SIZE, cluster_size=4096, backing=base.name,
                       backing_format="qcow2") as img:
        img.write(68 * KiB, rand(11, 4 * KiB))
        img.write_zeroes(300 * KiB, 4 * KiB)
        img.write(512 * KiB, rand(12, 64 * KiB))
    top = tmp_path / "top.qcow2"
    with engine.create(str(top), SIZE, cluster_size=top_cluster, backing=mid.name,
                       backing_format="qcow2") as img:
        img.write(520 * KiB, rand(13, 2 * KiB))
    before = snapshot_raw(top)
    with engine.open(str(mid)) as m, engine.open(str(top), backing=False) as t:
        plan = ops.plan_merge(t, m)
        assert ops.pull(t, m, plan.pull_runs) == plan.pull_bytes
        t.rebase(base.name, "qcow2")
    assert_same_content(top, before)
    qemu.assert_qemu_clean(top)


# --- diff --------------------------------------------------------------------------------------

def test_allocated_ranges_match_qemu_map(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, mid, top = make_chain(tmp_path)
    with engine.open(str(mid), readonly=True, backing=False) as m, \
            engine.open(str(top), readonly=True, backing=False) as t:
        ranges = ops.allocated_ranges([m, t])
        assert ops.allocated_ranges([]) == []
        assert ops.allocated_ranges([t]) == [(s, s + n) for s, n, _ in
                                             _spans(qemu_depth0(top))]
    spans = sorted((s, s + n) for p in (mid, top) for s, n, _ in qemu_depth0(p))
    union = []
    for s, e in spans:
        if union and s <= union[-1][1]:
            union[-1] = (union[-1][0], max(e, union[-1][1]))
        else:
            union.append((s, e))
    assert ranges == union
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))   # sorted, disjoint, merged


def _spans(runs):
    """Merge touching runs regardless of kind (allocated_ranges does not tell zero from data)."""
    out = []
    for s, n, z in runs:
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n, False)
        else:
            out.append((s, n, z))
    return out


def test_annotate_labels_ranges_like_qemu_map(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, _, top = make_chain(tmp_path)
    theirs = qemu.normalize_map(qemu.qemu_map(top))
    ranges = [(0, 10 * KiB), (100 * KiB, 300 * KiB), (716 * KiB, 1030 * KiB),
              (SIZE - 512, SIZE)]
    with engine.open(str(top), readonly=True) as view:
        changes = ops.annotate(ranges, view)
        assert ops.annotate([], view) == []
    # Pieces cover exactly the ranges, in order, and adjacent pieces differ in kind.
    covered = []
    for c in changes:
        if covered and covered[-1][1] == c.start:
            covered[-1] = (covered[-1][0], c.start + c.length)
        else:
            covered.append((c.start, c.start + c.length))
    assert covered == ranges
    for a, b in zip(changes, changes[1:]):
        assert a.start + a.length < b.start or (a.zero, a.data) != (b.zero, b.data)
    # Each byte's label is what qemu-img map says about it.
    for c in changes:
        for e in theirs:
            lo, hi = max(c.start, e["start"]), min(c.start + c.length, e["start"] + e["length"])
            if lo < hi:
                assert (c.zero, c.data) == (bool(e["zero"]) and not e["data"], bool(e["data"])), \
                    (c, e)
    assert any(c.zero for c in changes) and any(c.data for c in changes)
    assert changes[0].to_dict() == {"start": changes[0].start, "length": changes[0].length,
                                    "zero": changes[0].zero, "data": changes[0].data}


# --- the copy loop -----------------------------------------------------------------------------

def test_nonzero_blocks():
    buf = bytearray(10 * 4096)
    buf[5] = 1                      # block 0
    buf[3 * 4096] = 1               # block 3
    buf[4 * 4096 + 4095] = 1        # block 4: touches block 3's run
    buf[9 * 4096 + 100] = 1         # block 9, the last
    assert ops.nonzero_blocks(memoryview(buf), 4096) == [(0, 4096), (3 * 4096, 2 * 4096),
                                                        (9 * 4096, 4096)]
    assert ops.nonzero_blocks(memoryview(bytes(8192)), 4096) == []
    assert ops.nonzero_blocks(memoryview(b""), 4096) == []
    # A length that is not a multiple of 8 or of the block: the partial tail block counts.
    odd = bytearray(1000)
    odd[999] = 7
    assert ops.nonzero_blocks(memoryview(odd), 512) == [(512, 488)]
    odd[0] = 1
    assert ops.nonzero_blocks(memoryview(odd), 512) == [(0, 1000)]
    assert ops.nonzero_blocks(memoryview(b"\0\0\1"), 2) == [(2, 1)]


def test_copy_runs_and_meter(engine_image):
    src = engine_image("s.qcow2", SIZE)
    dst = engine_image("d.qcow2", SIZE)
    src.write(0, rand(10, 20000))
    dst.write(100000, rand(11, 5000))
    seen = []
    runs = [(0, 20000, False), (100000, 5000, True)]
    meter = ops.Meter(_copy.runs_total(runs), lambda d, t: seen.append((d, t)))
    assert ops.copy_runs(src, dst, runs, meter, chunk=4096) == 20000
    meter.finish()
    assert dst.read(0, 20000) == src.read(0, 20000)
    assert dst.read(100000, 5000) == bytes(5000)
    assert seen[-1] == (25000, 25000) and len(seen) == 5 + 1 + 1   # 5 chunks, 1 zero run, end
    # skip_zero_blocks leaves zero runs and all-zero blocks unwritten.
    dst2 = engine_image("d2.qcow2", SIZE, cluster_size=4096)
    src.write(8192, bytes(8192))
    n = ops.copy_runs(src, dst2, [(0, 20000, False), (100000, 5000, True)],
                      ops.Meter(25000, None), skip_zero_blocks=4096)
    assert n == 20000 - 8192
    assert dst2.read(0, 20000) == src.read(0, 20000)
    assert [e.data for e in dst2.extents(8192, 8192)] == [False]


# --- runs (the one home of the re-merging rule) ------------------------------------------------

def test_coalesce_merges_touching_and_overlapping_runs_of_one_kind():
    from engine.ops.runs import coalesce
    assert coalesce([]) == []
    assert coalesce([(0, 4, 1), (4, 4, 1), (8, 4, 2), (10, 1, 2), (11, 5, 2), (30, 1, 2)]) == \
        [(0, 8, 1), (8, 8, 2), (30, 1, 2)]
    assert coalesce([(0, 10, None), (2, 3, None), (9, 4, None)]) == [(0, 13, None)]
    assert coalesce([(0, 4, True), (4, 4, False), (8, 4, True)]) == \
        [(0, 4, True), (4, 4, False), (8, 4, True)]


def test_subtract_keeps_the_parts_outside_and_their_kinds():
    from engine.ops.runs import subtract
    assert subtract([(0, 100, "d")], []) == [(0, 100, "d")]
    assert subtract([], [(0, 10, "x")]) == []
    assert subtract([(0, 100, "d")], [(0, 100, "x")]) == []
    assert subtract([(0, 100, "d"), (200, 50, "z")],
                    [(10, 10, "x"), (20, 5, "y"), (90, 120, "x"), (240, 100, "x")]) == \
        [(0, 10, "d"), (25, 65, "d"), (210, 30, "z")]


class _Ext:
    """An extent as ``Image.extents`` gives it (only the fields ops read)."""

    def __init__(self, start, length, *, data, depth=0, present=True):
        self.start, self.length, self.data, self.depth = start, length, data, depth
        self.zero, self.present = not data, present


class _Img:
    def __init__(self, extents):
        self._extents = extents
        self.size = sum(e.length for e in extents)
        self._core = self                   # layer_runs reads the core's block status table

    def extents(self):
        return list(self._extents)

    def block_status(self, offset, length):
        assert (offset, length) == (0, self.size)
        return np.array([(e.start, e.length, e.depth, e.present | e.zero << 1 | e.data << 2, 0)
                         for e in self._extents], dtype=np.uint64).reshape(-1, 5)


def test_diff_and_measure_remerge_core_runs_by_their_coarser_kind():
    """The core coalesces runs by qemu-img map's rule (depth, flags, host offsets); diff and
    measure re-merge them by what they tell apart, all through ``ops.runs.coalesce``: runs
    from different layers that read alike are one change, one allocated range, one run."""
    view = _Img([_Ext(0, 10, data=True, depth=0), _Ext(10, 10, data=True, depth=1),
                 _Ext(20, 5, data=False, depth=0), _Ext(25, 5, data=False, depth=2,
                                                        present=False),
                 _Ext(30, 10, data=True, depth=0)])
    assert ops.annotate([(5, 28), (35, 40)], view) == [
        ops.Change(5, 15, False, True), ops.Change(20, 8, True, False),
        ops.Change(35, 5, False, True)]
    assert ops.allocated_ranges([view, _Img([_Ext(18, 4, data=True), _Ext(40, 2, data=True)])]) \
        == [(0, 10), (18, 25), (30, 42)]
    assert ops.layer_runs(view, 1, min_depth=0) == [(0, 20, False), (20, 5, True),
                                                      (30, 10, False)]
