"""The core's bulk copy (``engine._core.copy_runs``), used by export/convert, import, clone,
commit and pull: content against QEMU on randomized chains (raw and qcow2 sources and
destinations), zero detection, progress and kill-point steps, reflinks and their
fallback, and faults injected through the core's I/O shim during a copy.
"""

from __future__ import annotations

import os
import random
import tempfile

import pytest

import qemu

import engine
import engine._core as core
from engine import ops
from engine.errors import EngineError, EngineIOError

KiB = 1024
MiB = 1024 * KiB
SIZE = 8 * MiB


def random_chain(folder, seed: int, *, base_fmt: str, depth: int = 3, compressed: bool = False):
    """A chain made by QEMU's tools: a BASE_FMT base and DEPTH - 1 qcow2 overlays of mixed
    cluster sizes, each with random writes (some of them all-zero data), zero writes and, in
    the overlays, discards; with COMPRESSED the base holds compressed clusters. Returns the
    top's path."""
    rng = random.Random(seed)
    base = folder / f"base.{base_fmt}"
    qemu.create(base, SIZE, fmt=base_fmt)
    cmds = []
    if compressed:      # (QEMU compresses only into clusters not yet allocated: first)
        for c in rng.sample(range(SIZE // 65536), 6):
            cmds.append(f"write -q -c -P {rng.randrange(1, 256)} {c * 65536} 65536")
    for _ in range(12):
        off = rng.randrange(0, SIZE // 512 - 256) * 512
        n = rng.randrange(1, 256) * 512
        cmds.append(f"write -q -P {rng.randrange(0, 256) if rng.random() < 0.8 else 0} {off} {n}")
    qemu.qemu_io(base, *cmds, fmt=base_fmt)
    prev, prev_fmt = base, base_fmt
    for i in range(1, depth):
        ov = folder / f"ov{i}.qcow2"
        qemu.create(ov, SIZE, backing=prev.name, backing_fmt=prev_fmt,
                    cluster_size=rng.choice([4096, 65536, 512]))
        cmds = []
        for _ in range(20):
            off = rng.randrange(0, SIZE // 512 - 512) * 512
            n = rng.randrange(1, 512) * 512
            kind = rng.random()
            if kind < 0.6:
                cmds.append(f"write -q -P {rng.randrange(0, 256)} {off} {n}")
            elif kind < 0.8:
                cmds.append(f"write -q -z {off} {n}")
            else:
                cmds.append(f"discard -q {off} {n}")
        qemu.qemu_io(ov, *cmds)
        prev, prev_fmt = ov, "qcow2"
    return prev


def assert_same(a, b, fmt_a="qcow2", fmt_b="raw"):
    code, text = qemu.qemu_compare(a, b, fmt_a, fmt_b)
    assert code == 0, f"qemu-img compare {a} {b}: {text.strip()}"


# --- export (convert) against QEMU ------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("base_fmt,dest_fmt", [("qcow2", "qcow2"), ("qcow2", "raw"),
                                               ("raw", "qcow2"), ("raw", "raw")])
def test_export_random_chain_equals_qemu(tmp_path, seed, base_fmt, dest_fmt):
    top = random_chain(tmp_path, seed, base_fmt=base_fmt, compressed=base_fmt == "qcow2")
    dest = tmp_path / f"flat.{dest_fmt}"
    with engine.open(str(top), readonly=True) as src:
        ops.convert(src, str(dest), format=dest_fmt)
    assert_same(top, dest, "qcow2", dest_fmt)
    if dest_fmt == "qcow2":
        qemu.assert_qemu_clean(dest)


@pytest.mark.parametrize("dest_fmt", ["raw", "qcow2"])
def test_export_of_long_runs_equals_qemu(tmp_path, dest_fmt):
    """Runs longer than a chunk, with compressed clusters and all-zero blocks inside them
    (into a raw destination the two halves of each chunk are copied by two threads)."""
    rng = random.Random(12)
    base = tmp_path / "base.qcow2"
    qemu.create(base, 4 * SIZE)
    cmds = [f"write -q -c -P {rng.randrange(1, 256)} {c * 65536} 65536"
            for c in rng.sample(range(4 * SIZE // 65536), 40)]
    cmds += [f"write -q -P {rng.randrange(1, 256)} {off} {MiB}"
             for off in range(0, 4 * SIZE, MiB) if rng.random() < 0.9]
    cmds += [f"write -q -P 0 {rng.randrange(0, 4 * SIZE // 65536) * 65536} {65536 * 3}"
             for _ in range(5)]
    qemu.qemu_io(base, *cmds)
    top = tmp_path / "top.qcow2"
    qemu.create(top, 4 * SIZE, backing=base.name, backing_fmt="qcow2", cluster_size=4096)
    qemu.qemu_io(top, *[f"write -q -P {rng.randrange(0, 256)} {rng.randrange(0, 4 * SIZE - MiB)} "
                        f"{rng.randrange(1, 64) * 512}" for _ in range(30)])
    dest = tmp_path / f"flat.{dest_fmt}"
    with engine.open(str(top), readonly=True) as src:
        ops.convert(src, str(dest), format=dest_fmt)
    assert_same(top, dest, "qcow2", dest_fmt)


@pytest.mark.parametrize("dest_fmt", ["qcow2", "raw"])
def test_export_of_a_raw_file_both_ways(tmp_path, dest_fmt):
    """A raw source alone (raw to raw tries a reflink first) and back from qcow2 to raw."""
    rng = random.Random(7)
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        for _ in range(20):
            f.seek(rng.randrange(0, SIZE - 300 * KiB))
            f.write(rng.randbytes(rng.randrange(1, 300 * KiB)) if rng.random() < 0.7
                    else bytes(rng.randrange(1, 300 * KiB)))
    out = tmp_path / f"out.{dest_fmt}"
    with engine.open(str(raw), format="raw", readonly=True) as src:
        ops.convert(src, str(out), format=dest_fmt)
    assert_same(raw, out, "raw", dest_fmt)
    back = tmp_path / "back.raw"
    with engine.open(str(out), format=dest_fmt, readonly=True) as src:
        ops.convert(src, str(back), format="raw")
    assert back.read_bytes() == raw.read_bytes()


def test_raw_to_raw_on_another_filesystem_falls_back(tmp_path):
    """A reflink between two filesystems is refused (EXDEV): the copy goes on with
    plain writes and the result is the same."""
    other = "/dev/shm" if os.path.isdir("/dev/shm") else None
    if other is None or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        other = None
    raw = tmp_path / "disk.raw"
    data = random.Random(3).randbytes(3 * MiB)
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        f.seek(MiB + 4096)
        f.write(data)
    with tempfile.TemporaryDirectory(dir=other) as d:
        out = os.path.join(d, "out.raw")
        with engine.open(str(raw), format="raw", readonly=True) as src:
            written = ops.convert(src, out, format="raw")
        with open(out, "rb") as f:
            got = f.read()
    assert written == len(data)
    assert got == raw.read_bytes()


# --- zero detection -----------------------------------------------------------------------------

def test_zero_blocks_are_aligned_to_the_guest_offset(tmp_path):
    """All-zero blocks are found at the destination's cluster boundaries, whatever offset a
    run starts at: a run [60 KiB, 200 KiB) with data only in its first 4 KiB and its last
    8 KiB allocates exactly the destination clusters those bytes are in."""
    src_path = tmp_path / "src.qcow2"
    with engine.create(str(src_path), SIZE, cluster_size=4096) as img:
        img.write(60 * KiB, bytes(140 * KiB))              # one data run, all zero bytes...
        img.write(60 * KiB, b"\x01" * 4096)                # ...but its first 4 KiB
        img.write(192 * KiB, b"\x02" * 8192)               # and its last 8 KiB
    dest = tmp_path / "flat.qcow2"
    with engine.open(str(src_path), readonly=True) as src:
        assert [(e.start, e.length) for e in src.extents() if e.data] == [(60 * KiB, 140 * KiB)]
        written = ops.convert(src, str(dest), format="qcow2")
    assert written == 12 * KiB
    mapped = [(m["start"], m["length"]) for m in qemu.qemu_map(dest) if m["data"]]
    assert mapped == [(0, 64 * KiB), (192 * KiB, 64 * KiB)], mapped
    assert_same(src_path, dest, "qcow2", "qcow2")


def test_core_copy_skips_zero_blocks_only_with_zero_block(tmp_path, engine_image):
    """zero_block > 0 (a new destination) leaves all-zero blocks unwritten; 0 writes them
    (a commit or pull must overwrite what the destination holds there)."""
    src = engine_image("src.qcow2", SIZE)
    src.write(0, b"\x05" * 65536 + bytes(131072) + b"\x06" * 65536)
    for zb, expect in ((65536, 2 * 65536), (0, 4 * 65536)):
        dst = engine_image(f"dst{zb}.qcow2", SIZE)
        dst.write(65536, b"\xff" * 65536)                   # stale bytes a commit must replace
        n = core.copy_runs(dst._core, src._core, [(0, 4 * 65536, 0)], zb)
        assert n == expect
        got = dst.read(0, 4 * 65536)
        if zb:
            assert got[65536:131072] == b"\xff" * 65536     # not written: a new file reads 0
        else:
            assert got == src.read(0, 4 * 65536)


# --- commit and pull through the core -----------------------------------------------------------

@pytest.mark.parametrize("seed", [4, 5])
def test_core_copy_commit_and_pull_equal_qemu(tmp_path, seed):
    """ops.commit (top into its base) and ops.stream (the backing chain into the top) give
    the disk the chain read before, as QEMU reads it."""
    top = random_chain(tmp_path, seed, base_fmt="qcow2", depth=3)
    before = qemu.convert_to_raw(top)
    ref = tmp_path / "before.raw"
    ref.write_bytes(before)
    mid = tmp_path / "ov1.qcow2"
    with engine.open(str(top), backing=False, readonly=True) as t, engine.open(str(mid)) as m:
        ops.commit(t, m)
    assert_same(mid, ref)
    qemu.assert_qemu_clean(mid)
    with engine.open(str(top)) as t:
        ops.stream(t, depth=1)
    qemu.qemu_img("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "-f", "qcow2", top)
    assert_same(top, ref)
    qemu.assert_qemu_clean(top)


def test_steps_once_per_chunk_and_zero_run(tmp_path, engine_image):
    """Python is called back once per chunk of a data run and once per zero run: progress
    moves chunk by chunk, in order, and ends at the total."""
    top = engine_image("top.qcow2", SIZE)
    top.write(0, random.Random(1).randbytes(300 * KiB))
    top.write_zeroes(1 * MiB, 256 * KiB)
    top.write(2 * MiB, random.Random(2).randbytes(100 * KiB))
    base = engine_image("base.qcow2", SIZE)
    calls = []
    runs = ops.layer_runs(top, 0)
    meter = ops.Meter(sum(r[1] for r in runs), lambda d, t: calls.append((d, t)))
    ops.copy_runs(top, base, runs, meter, chunk=64 * KiB)
    meter.finish()
    chunks = sum(-(-r[1] // (64 * KiB)) for r in runs if not r[2])
    zero_runs = sum(1 for r in runs if r[2])
    assert zero_runs == 1 and len(calls) == chunks + zero_runs + 1
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert calls[-1] == (meter.total, meter.total)
    assert base.read(0, SIZE) == top.read(0, SIZE)


def test_step_exception_stops_the_copy(engine_image):
    src = engine_image("src.qcow2", SIZE)
    src.write(0, b"\x07" * (2 * MiB))
    dst = engine_image("dst.qcow2", SIZE)
    seen = []

    def step(start, length, zero):
        seen.append(start)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        core.copy_runs(dst._core, src._core, [(0, 2 * MiB, 0)], 0, 256 * KiB, step)
    assert seen == [0, 256 * KiB]
    assert dst.read(512 * KiB, 4096) == bytes(4096)          # nothing past the stop


def test_core_copy_refuses_bad_arguments(tmp_path, engine_image):
    src = engine_image("src.qcow2", SIZE)
    dst = engine_image("dst.qcow2", SIZE // 2)
    engine.create(str(tmp_path / "ro.qcow2"), SIZE).close()
    with pytest.raises(EngineError, match="past the end"):
        core.copy_runs(dst._core, src._core, [(SIZE // 2, 4096, 0)])
    with pytest.raises(EngineError, match="power of two"):
        core.copy_runs(dst._core, src._core, [(0, 4096, 0)], 3000)
    ro = engine.open(str(tmp_path / "ro.qcow2"), readonly=True)
    try:
        with pytest.raises(EngineError, match="read-only"):
            core.copy_runs(ro._core, dst._core, [(0, 4096, 0)])
    finally:
        ro.close()


# --- faults during a copy -----------------------------------------------------------------------

@pytest.mark.parametrize("dest_fmt,base_fmt,op,nth", [
    (d, b, op, nth) for d, b in (("qcow2", "qcow2"), ("raw", "qcow2"), ("raw", "raw"))
    for op, nth in (("pwrite", 1), ("pwrite", 3), ("fallocate", 2), ("sync", 1))
    if not (op == "fallocate" and d == "raw")])       # a raw destination never grows by it
def test_fault_during_export_is_typed_and_leaves_nothing(tmp_path, dest_fmt, base_fmt, op, nth):
    """A fault injected through the shim while an export copies (a data write, raw to raw
    by a reflink attempt included; a file growth; the final sync) is an EngineIOError with its
    errno, and the destination folder is left as it was: no file, no temporary."""
    if base_fmt == "raw":
        top = tmp_path / "src" / "disk.raw"
        top.parent.mkdir()
        with open(top, "wb") as f:
            f.truncate(SIZE)
            for k in range(6):
                f.seek(k * MiB + 4096)
                f.write(random.Random(k).randbytes(300 * KiB))
    else:
        (tmp_path / "src").mkdir()
        top = random_chain(tmp_path / "src", 9, base_fmt="qcow2")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dest = out_dir / f"flat.{dest_fmt}"
    with engine.open(str(top), format=base_fmt if base_fmt == "raw" else None,
                     readonly=True) as src:
        core.set_fault(op, nth=nth, err=28)         # ENOSPC
        try:
            with pytest.raises(EngineIOError) as ei:
                ops.convert(src, str(dest), format=dest_fmt)
            delivered = core.fault_stats()[1]
        finally:
            core.set_fault(None)
        assert delivered == 1
        assert ei.value.errno == 28
        assert os.listdir(out_dir) == []
        # the source is untouched and a retry succeeds
        ops.convert(src, str(dest), format=dest_fmt)
    assert_same(top, dest, base_fmt, dest_fmt)


@pytest.mark.parametrize("nth", [1, 2, 5])
def test_fault_during_commit_is_typed_and_consistent(tmp_path, nth):
    """A write fault while a commit copies into the base: a typed error, and the base stays
    a consistent image (at most leaked clusters) that a rerun of the commit completes."""
    top = random_chain(tmp_path, 11, base_fmt="qcow2", depth=2)
    ref = tmp_path / "before.raw"
    ref.write_bytes(qemu.convert_to_raw(top))
    base = tmp_path / "base.qcow2"
    with engine.open(str(top), backing=False, readonly=True) as t:
        b = engine.open(str(base), backing=False)
        core.set_fault("pwrite", nth=nth, err=5)
        try:
            with pytest.raises(EngineIOError):
                ops.commit(t, b)
        finally:
            core.set_fault(None)
        try:
            b.close()
        except EngineError:
            pass
        code, data = qemu.qemu_check(base)
        assert code in (0, 3) and not data.get("corruptions"), data
        with engine.open(str(base), backing=False) as b:
            b.check(repair="leaks")
            ops.commit(t, b)
    qemu.qemu_img("rebase", "-u", "-b", "", "-f", "qcow2", top)
    assert_same(base, ref)
    qemu.assert_qemu_clean(base)


def test_removing_a_large_volume_file_leaves_freeing_its_blocks_to_a_helper_thread(tmp_path):
    """A removed volume's name is gone when ``files.unlink`` returns; its blocks and cached
    pages (about 0.1 s of kernel work per 256 MiB) are freed by a helper thread closing the
    descriptor held across the unlink, which it does shortly after."""
    import threading
    import time

    from engine.repository import files

    big = tmp_path / "big.qcow2"
    with open(big, "wb") as f:
        f.truncate(files._RELEASE_LATER_BYTES)      # sparse: only the size counts
    small = tmp_path / "small.qcow2"
    small.write_bytes(b"x" * 4096)
    ino = big.stat().st_ino

    def held() -> bool:
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.stat(f"/proc/self/fd/{fd}").st_ino == ino:
                    return True
            except OSError:
                pass
        return False

    assert files.unlink(str(small)) and not small.exists()
    assert files.unlink(str(big)) and not big.exists()
    assert not files.unlink(str(big))                 # gone: False, as before
    assert any(t.name == "cowchain-release" for t in threading.enumerate())
    deadline = time.monotonic() + 10
    while held() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not held(), "the helper thread never closed the removed file"
