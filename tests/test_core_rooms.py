"""Unit tests of the rooms of the compiled core (engine/_core_src/*.pxi): the hook enum and the
names generated from it, the zero modes, the typed geometry, the checks made once at the
seam (check_range), and block status as the one place where runs are coalesced."""

from __future__ import annotations

import os
import random

import pytest

import engine
from engine import _core
from engine import image as image_mod
from engine.errors import ImageClosed, InvalidArgument, ReadOnlyImage

MiB = 1 << 20


def test_hook_names_are_generated_from_the_enum():
    assert _core.HOOK_NAMES == tuple(h.name.lower() for h in _core.Hook)
    assert [int(h) for h in _core.Hook] == list(range(len(_core.HOOK_NAMES)))
    assert len(set(_core.HOOK_NAMES)) == len(_core.HOOK_NAMES) == 14
    _core.arm_hook(None)
    assert set(_core.hook_counts()) == set(_core.HOOK_NAMES)


def test_each_named_hook_is_reached_by_its_transition(tmp_path):
    # partial-cluster writes into a fresh image: the allocation and writeback hooks fire
    _core.arm_hook(None)
    img = engine.create(str(tmp_path / "a.qcow2"), 64 * MiB, cluster_size=4096)
    try:
        for off in range(0, 64 * MiB, 256 * 1024):
            img.write(off, b"x" * 512)
        img.flush()
    finally:
        img.close()
    hits = _core.hook_counts()
    for name in ("cluster_alloc", "l2_alloc", "cow_read", "cow_write",
                 "wb_data_synced", "wb_l1_written", "wb_synced"):
        assert hits[name] > 0, name


def test_zero_modes_are_named_and_distinct():
    modes = (_core.ZERO_DISCARD, _core.ZERO_UNMAP, _core.ZERO_KEEP)
    assert len(set(modes)) == 3 and all(isinstance(m, int) for m in modes)


def test_geometry_is_typed_and_built_from_the_header(tmp_path):
    path = str(tmp_path / "g.qcow2")
    engine.create(path, 3 * MiB + 512, cluster_size=65536).close()
    with engine.open(path, readonly=True) as img:
        h = img.header
        g = image_mod._geometry(h)
    assert isinstance(g, _core.Geometry)
    assert (g.cluster_bits, g.size, g.l1_table_offset, g.refcount_order) == \
        (h.cluster_bits, 3 * MiB + 512, h.l1_table_offset, h.refcount_order)
    assert g.extended_l2 is False and g.snapshots_offset == 0
    with pytest.raises(TypeError):
        _core.Geometry(cluster_bits=16)               # every header field is required
    with pytest.raises(TypeError):
        _core.CoreImage(0, False, {"cluster_bits": 16})   # no untyped dict crosses


def test_check_range_is_the_one_home_of_the_io_checks(tmp_path):
    path = str(tmp_path / "c.qcow2")
    engine.create(path, MiB).close()
    img = engine.open(path, readonly=True)
    core = img._core
    assert core.check_range(0, MiB) == (0, MiB)
    with pytest.raises(InvalidArgument, match="past the end of the disk"):
        core.check_range(MiB - 1, 2)
    with pytest.raises(InvalidArgument, match="past the end of the disk"):
        img.read(MiB - 1, 2)
    with pytest.raises(InvalidArgument):
        core.check_range(-1, 1)
    with pytest.raises(ReadOnlyImage):
        core.check_range(0, 1, write=True)
    with pytest.raises(ReadOnlyImage):
        img.write_zeroes(0, 512)
    with pytest.raises(ReadOnlyImage):
        img.discard(0, 65536)
    with pytest.raises(ReadOnlyImage):
        img.writev([0], 512, bytes(512))
    img.close()
    with pytest.raises(ImageClosed):
        core.check_range(0, 1)
    with pytest.raises(ImageClosed):
        img.read(0, 1)


def _mergeable(p, e):
    return (p.depth == e.depth and (p.present, p.zero, p.data, p.compressed) ==
            (e.present, e.zero, e.data, e.compressed) and p.start + p.length == e.start and
            ((p.offset is None and e.offset is None) or
             (p.offset is not None and e.offset is not None and p.offset + p.length == e.offset)))


@pytest.mark.parametrize("seed", range(4))
def test_block_status_runs_are_maximal_and_tile_the_range(tmp_path, seed):
    rnd = random.Random(seed)
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    with engine.create(base, 8 * MiB, cluster_size=4096) as b:
        for _ in range(60):
            b.write(rnd.randrange(0, 8 * MiB - 8192, 512), os.urandom(rnd.choice((512, 4096, 8192))))
    with engine.create(top, 8 * MiB, cluster_size=4096, backing="base.qcow2",
                       backing_format="qcow2") as t:
        for _ in range(60):
            off = rnd.randrange(0, 8 * MiB - 16384, 4096)
            op = rnd.randrange(3)
            if op == 0:
                t.write(off, os.urandom(rnd.choice((512, 4096, 16384))))
            elif op == 1:
                t.write_zeroes(off, rnd.choice((4096, 16384)), unmap=rnd.random() < 0.5)
            else:
                t.discard(off, 8192)
    with engine.open(top, readonly=True) as t:
        start = rnd.randrange(0, MiB, 512)
        exts = t.extents(start)
    assert exts[0].start == start and exts[-1].start + exts[-1].length == 8 * MiB
    for p, e in zip(exts, exts[1:]):
        assert p.start + p.length == e.start
        assert not _mergeable(p, e), (p, e)


def _run_with_kill_at(tmp_path, spec):
    import subprocess
    import sys
    code = ("import engine, sys; img = engine.create(sys.argv[1], 1 << 20); "
            "img.write(0, b'x' * 512); img.flush(); img.close(); print('survived')")
    env = dict(os.environ, COWCHAIN_KILL_AT=spec)
    env.pop("COWCHAIN_HOOK_LOG", None)
    return subprocess.run([sys.executable, "-c", code, str(tmp_path / "k.qcow2")], env=env,
                          capture_output=True, text=True, timeout=120)


def test_one_kill_variable_names_a_core_hook(tmp_path):
    proc = _run_with_kill_at(tmp_path, "cluster_alloc:1")
    assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr)


def test_one_kill_variable_naming_a_kill_point_leaves_the_hooks_unarmed(tmp_path):
    proc = _run_with_kill_at(tmp_path, "delete_snapshot.copy:1")
    assert proc.returncode == 0 and "survived" in proc.stdout, proc.stderr


def test_testing_facade_covers_both_seams(monkeypatch):
    from engine import testing
    assert testing.HOOK_NAMES == _core.HOOK_NAMES and testing.KILL_ENV == "COWCHAIN_KILL_AT"
    assert callable(testing.kill_point) and callable(testing.arm_hook)
    monkeypatch.setenv("COWCHAIN_KILL_AT", "wb_synced:3")
    try:
        testing.configure()
        from engine.ops import _hooks
        assert _hooks._KILL_AT == ("wb_synced", 3)     # harmless: no kill point has that name
    finally:
        monkeypatch.delenv("COWCHAIN_KILL_AT")
        testing.configure()
    assert sum(_core.hook_counts().values()) == 0
