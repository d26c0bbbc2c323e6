"""Interoperability with QEMU, both directions, on seeded random workloads (docs/reliability.md C8).

(a) QEMU writes, cowchain reads: images made and filled by qemu-img/qemu-io are read through
    ``engine.open`` and must equal ``qemu-img convert -O raw`` byte for byte; ``extents()`` must
    mean what ``qemu-img map --output=json`` says.
(b) cowchain writes, QEMU reads: random writes/zeroes/discards/flushes through the engine,
    checked against a bytearray model; then ``qemu-img check`` must exit 0 (no leak) and
    ``qemu-img compare`` must find the image identical to the model; ``info()`` must agree with
    ``qemu-img info``.
(c) locks: QEMU and cowchain never hold the same image for writing at once.

Every workload is derived from a seed that is part of the test id. To replay one failure, run
that test id; ``COWCHAIN_SEEDS=a,b,c`` replaces the default seed list.
"""

from __future__ import annotations

import json
import os
import random

import pytest

import poke
import qemu

import engine

KiB = 1024
MiB = 1024 * KiB

SEEDS = [int(s) for s in os.environ.get("COWCHAIN_SEEDS", "1,2").split(",")]
LONG_SEEDS = list(range(3, 13))


# --- helpers -----------------------------------------------------------------------------------

def first_difference(a: bytes, b: bytes) -> str:
    """A short description of where two byte strings differ (never the whole buffers)."""
    if len(a) != len(b):
        head = f"lengths differ: {len(a)} != {len(b)}; "
    else:
        head = ""
    n = min(len(a), len(b))
    # Find the first differing 4 KiB block quickly, then the byte.
    block = 4096
    for start in range(0, n, block):
        if a[start:start + block] != b[start:start + block]:
            for i in range(start, min(start + block, n)):
                if a[i] != b[i]:
                    ndiff = sum(1 for j in range(0, n, 512) if a[j:j + 512] != b[j:j + 512])
                    return (f"{head}first difference at byte {i} (0x{i:x}): "
                            f"{a[i:i + 16].hex()} != {b[i:i + 16].hex()}; "
                            f"{ndiff} differing 512-byte sectors")
    return head + "no difference in the common prefix"


def assert_same(actual: bytes, expected: bytes, what: str) -> None:
    if actual != expected:
        pytest.fail(f"{what}: {first_difference(actual, expected)}")


def engine_read_all(path, fmt=None) -> bytes:
    with engine.open(str(path), format=fmt, readonly=True) as img:
        return img.read(0, img.size)


def assert_reads_like_qemu(path, fmt="qcow2", ops=None) -> None:
    """cowchain's read of the whole chain == qemu-img convert -O raw; extents == qemu-img map."""
    expected = qemu.convert_to_raw(path, fmt)
    with engine.open(str(path), format=fmt, readonly=True) as img:
        assert img.size == len(expected), "virtual size differs from qemu-img's"
        got = img.read(0, img.size)
        extents = img.extents()
    context = "" if ops is None else "\nworkload:\n  " + "\n  ".join(ops)
    if got != expected:
        pytest.fail(f"read of {path.name} differs from qemu-img convert: "
                    f"{first_difference(got, expected)}{context}")
    assert_extents_like_qemu(extents, path, fmt, context)


def assert_extents_like_qemu(extents, path, fmt="qcow2", context="") -> None:
    ours = qemu.normalize_map(extents)
    theirs = qemu.normalize_map(qemu.qemu_map(path, fmt))
    if ours != theirs:
        pytest.fail(f"extents() of {path.name} differ from qemu-img map "
                    f"({len(ours)} vs {len(theirs)} runs):\n{map_diff(ours, theirs)}{context}")


def map_diff(ours: list[dict], theirs: list[dict]) -> str:
    """The first runs where two normalized maps part ways, as compact lines."""
    def fmt(e):
        return (f"[{e['start']}+{e['length']}) depth={e['depth']} present={int(e['present'])} "
                f"zero={int(e['zero'])} data={int(e['data'])} offset={e['offset']}")
    i = next((k for k in range(min(len(ours), len(theirs))) if ours[k] != theirs[k]),
             min(len(ours), len(theirs)))
    lines = []
    for k in range(max(0, i - 1), i + 3):
        if k < len(ours):
            lines.append(f"  ours   {fmt(ours[k])}")
        if k < len(theirs):
            lines.append(f"  qemu's {fmt(theirs[k])}")
    return "\n".join(lines)


def random_range(rng: random.Random, size: int, cluster: int, align: int = 1,
                 max_clusters: int = 3) -> tuple[int, int]:
    """A random (offset, length) inside [0, size), often unaligned and crossing clusters."""
    length = rng.randint(1, max_clusters * cluster)
    if rng.random() < 0.3:  # cluster-aligned whole clusters, the fast paths
        off = rng.randrange(0, max(1, size // cluster)) * cluster
        length = rng.randint(1, max_clusters) * cluster
    else:
        off = rng.randrange(0, size)
    off -= off % align
    length = max(align, length - length % align)
    length = min(length, size - off)
    return off, length


class QemuWorkload:
    """A seeded list of qemu-io commands, with random pattern files for high-entropy data."""

    def __init__(self, folder, size: int, cluster: int, seed: int, nops: int = 24,
                 kinds=("write", "write", "write", "zero", "zero_unmap", "discard"),
                 compressed: bool = False):
        self.rng = random.Random(seed)
        self.folder = folder
        self.cmds: list[str] = []
        for i in range(nops):
            kind = self.rng.choice(kinds)
            off, length = random_range(self.rng, size, cluster)
            if kind == "write":
                pat = folder / f"pat-{seed}-{i}.bin"
                pat.write_bytes(self.rng.randbytes(min(length, 4099 + self.rng.randrange(512))))
                self.cmds.append(f"write -q -s {pat} {off} {length}")
            elif kind == "pattern":
                self.cmds.append(f"write -q -P 0x{self.rng.randrange(1, 256):02x} {off} {length}")
            elif kind == "zero":
                self.cmds.append(f"write -q -z {off} {length}")
            elif kind == "zero_unmap":
                self.cmds.append(f"write -q -z -u {off} {length}")
            elif kind == "discard":
                self.cmds.append(f"discard -q {off} {length}")
        if compressed:
            # QEMU writes compressed clusters only where nothing is allocated yet: these go
            # first, on distinct whole clusters (not the partial tail cluster); the random
            # workload then overwrites parts of them.
            nfull = size // cluster
            taken: set[int] = set()
            first = []
            for i in range(max(1, nops // 4)):
                c = self.rng.randrange(0, nfull)
                n = self.rng.randint(1, min(4, nfull - c))
                if taken & set(range(c, c + n)):
                    continue
                taken |= set(range(c, c + n))
                pat = folder / f"cpat-{seed}-{i}.bin"
                # Compressible data: a short random pattern repeated.
                pat.write_bytes(self.rng.randbytes(self.rng.choice([64, 512, 3000])))
                first.append(f"write -q -c -s {pat} {c * cluster} {n * cluster}")
            self.cmds = first + self.cmds

    def run(self, path, fmt="qcow2"):
        # One qemu-io process for the whole list: fast, and ordering is exactly the list's.
        qemu.qemu_io(path, *self.cmds, fmt=fmt)


def ids(**kw):
    return "-".join(f"{k}{v}" for k, v in kw.items())


# --- (a) QEMU writes, cowchain reads ------------------------------------------------------------

GEOMETRIES = [
    # (cluster_size, compat, refcount_bits, virtual size)
    pytest.param(512, "0.10", 16, 3 * MiB + 1536, id="c512-v2"),
    pytest.param(512, "1.1", 16, 3 * MiB + 1536, id="c512-v3"),
    pytest.param(4096, "0.10", 16, 8 * MiB + 512, id="c4k-v2"),
    pytest.param(4096, "1.1", 16, 8 * MiB + 512, id="c4k-v3"),
    pytest.param(65536, "0.10", 16, 24 * MiB + 4096, id="c64k-v2"),
    pytest.param(65536, "1.1", 16, 24 * MiB + 4096, id="c64k-v3"),
    pytest.param(2 * MiB, "0.10", 16, 40 * MiB + 512, id="c2m-v2"),
    pytest.param(2 * MiB, "1.1", 16, 40 * MiB + 512, id="c2m-v3"),
] + [
    pytest.param(4096, "1.1", bits, 4 * MiB, id=f"c4k-v3-refcount{bits}")
    for bits in (1, 2, 4, 8, 32, 64)
] + [
    pytest.param(512, "1.1", 1, 2 * MiB, id="c512-v3-refcount1"),
    pytest.param(65536, "1.1", 64, 16 * MiB, id="c64k-v3-refcount64"),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cluster,compat,refbits,size", GEOMETRIES)
def test_qemu_writes_engine_reads(tmp_path, cluster, compat, refbits, size, seed):
    path = tmp_path / "disk.qcow2"
    qemu.create(path, size, cluster_size=cluster, compat=compat, refcount_bits=refbits)
    work = QemuWorkload(tmp_path, size, cluster, seed)
    work.run(path)
    assert_reads_like_qemu(path, ops=work.cmds)


@pytest.mark.parametrize("seed", SEEDS)
def test_qemu_lazy_refcounts_image(tmp_path, seed):
    path = tmp_path / "lazy.qcow2"
    qemu.create(path, 8 * MiB, cluster_size=4096, lazy_refcounts=True)
    work = QemuWorkload(tmp_path, 8 * MiB, 4096, seed)
    work.run(path)
    assert_reads_like_qemu(path, ops=work.cmds)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster", [4096, 65536])
def test_qemu_compressed_image(tmp_path, cluster, ctype, seed):
    """``qemu-img convert -c`` (whole image compressed), then normal writes over part of it,
    and ``write -c`` clusters in between."""
    size = 8 * MiB if cluster == 4096 else 32 * MiB
    src = tmp_path / "src.qcow2"
    qemu.create(src, size, cluster_size=cluster)
    QemuWorkload(tmp_path, size, cluster, seed, kinds=("write", "pattern")).run(src)
    path = tmp_path / "packed.qcow2"
    qemu.qemu_img("convert", "-f", "qcow2", "-O", "qcow2", "-c",
                  "-o", f"cluster_size={cluster},compression_type={ctype}", src, path)
    info = qemu.qemu_info(path)
    assert info["format-specific"]["data"]["compression-type"] == ctype
    assert qemu.qemu_check(path)[1].get("compressed-clusters", 0) > 0
    assert_reads_like_qemu(path)
    work = QemuWorkload(tmp_path, size, cluster, seed + 1000, nops=12)
    work.run(path)
    assert_reads_like_qemu(path, ops=work.cmds)
    # ``write -c`` into a fresh image of that compression type, then partial overwrites.
    fresh = tmp_path / "fresh.qcow2"
    qemu.create(fresh, size, cluster_size=cluster, compression_type=ctype)
    work = QemuWorkload(tmp_path, size, cluster, seed + 2000, nops=16, compressed=True)
    work.run(fresh)
    assert qemu.qemu_check(fresh)[1].get("compressed-clusters", 0) > 0
    assert_reads_like_qemu(fresh, ops=work.cmds)


@pytest.mark.parametrize("seed", SEEDS)
def test_qemu_compressed_v2(tmp_path, seed):
    size = 4 * MiB
    src = tmp_path / "src.qcow2"
    qemu.create(src, size, cluster_size=4096)
    QemuWorkload(tmp_path, size, 4096, seed, kinds=("write", "pattern")).run(src)
    path = tmp_path / "packed.qcow2"
    qemu.qemu_img("convert", "-f", "qcow2", "-O", "qcow2", "-c", "-o", "compat=0.10,cluster_size=4096",
                  src, path)
    assert_reads_like_qemu(path)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cluster", [16 * KiB, 65536, 2 * MiB])
def test_qemu_extended_l2(tmp_path, cluster, seed):
    """Subclusters: partial writes, zeroes, discards on an extended-L2 image, alone and over a
    backing file (so UNALLOCATED_ALLOC subclusters read through)."""
    size = 16 * MiB if cluster < 2 * MiB else 24 * MiB
    base = tmp_path / "base.qcow2"
    qemu.create(base, size, cluster_size=cluster)
    QemuWorkload(tmp_path, size, cluster, seed + 500, kinds=("pattern",), nops=10).run(base)
    single = tmp_path / "single.qcow2"
    qemu.create(single, size, cluster_size=cluster, extended_l2=True)
    work = QemuWorkload(tmp_path, size, cluster, seed)
    work.run(single)
    assert_reads_like_qemu(single, ops=work.cmds)
    top = tmp_path / "top.qcow2"
    qemu.create(top, size, backing="base.qcow2", backing_fmt="qcow2", cluster_size=cluster,
                extended_l2=True)
    work = QemuWorkload(tmp_path, size, cluster, seed + 1)
    work.run(top)
    assert_reads_like_qemu(top, ops=work.cmds)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_qemu_chain(tmp_path, monkeypatch, base_fmt, seed):
    """base (raw or qcow2) <- mid <- top, each written by qemu-io, read through the chain."""
    monkeypatch.chdir(tmp_path)
    size = 8 * MiB
    base = tmp_path / f"base.{base_fmt}"
    qemu.create(base, size, fmt=base_fmt)
    QemuWorkload(tmp_path, size, 65536, seed, kinds=("write", "pattern")).run(base, fmt=base_fmt)
    mid = tmp_path / "mid.qcow2"
    qemu.create(mid, size, backing=base.name, backing_fmt=base_fmt, cluster_size=4096)
    w1 = QemuWorkload(tmp_path, size, 4096, seed + 1)
    w1.run(mid)
    top = tmp_path / "top.qcow2"
    qemu.create(top, size, backing=mid.name, backing_fmt="qcow2", cluster_size=65536)
    w2 = QemuWorkload(tmp_path, size, 65536, seed + 2)
    w2.run(top)
    assert_reads_like_qemu(base, fmt=base_fmt)
    assert_reads_like_qemu(mid, ops=w1.cmds)
    assert_reads_like_qemu(top, ops=w1.cmds + ["-- top --"] + w2.cmds)
    with engine.open(str(top), readonly=True) as img:
        assert img.backing is not None and img.backing.backing is not None
        assert img.backing.backing.format == base_fmt
        assert img.backing.backing.backing is None


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_qemu_backing_shorter_than_overlay(tmp_path, monkeypatch, base_fmt, seed):
    """The backing file ends inside a cluster of the overlay; past its end reads are zeros."""
    monkeypatch.chdir(tmp_path)
    base_size = 1 * MiB + 1536
    size = 4 * MiB
    base = tmp_path / f"base.{base_fmt}"
    qemu.create(base, base_size, fmt=base_fmt)
    qemu.qemu_io(base, f"write -P 0x5a 0 {base_size}", fmt=base_fmt)
    top = tmp_path / "top.qcow2"
    qemu.create(top, size, backing=base.name, backing_fmt=base_fmt, cluster_size=65536)
    assert_reads_like_qemu(top)
    work = QemuWorkload(tmp_path, size, 65536, seed,
                        kinds=("write", "zero", "discard"), nops=10)
    # And a write that straddles the backing file's end, so QEMU copies up a partial cluster.
    work.cmds.append(f"write -q -P 0x11 {base_size - 700} 1000")
    work.run(top)
    assert_reads_like_qemu(top, ops=work.cmds)


@pytest.mark.parametrize("seed", SEEDS)
def test_qemu_internal_snapshot(tmp_path, seed):
    """After ``qemu-img snapshot -c`` clusters are shared (refcount 2, COPIED clear); QEMU's
    writes after the snapshot copy them; cowchain reads the active state."""
    path = tmp_path / "snap.qcow2"
    size = 4 * MiB
    qemu.create(path, size, cluster_size=4096)
    QemuWorkload(tmp_path, size, 4096, seed, kinds=("write",)).run(path)
    qemu.qemu_img("snapshot", "-c", "s1", path)
    work = QemuWorkload(tmp_path, size, 4096, seed + 1)
    work.run(path)
    assert_reads_like_qemu(path, ops=work.cmds)


def test_qemu_raw_image(tmp_path):
    path = tmp_path / "disk.raw"
    qemu.create(path, 4 * MiB, fmt="raw")
    work = QemuWorkload(tmp_path, 4 * MiB, 65536, 7, kinds=("write", "pattern"), nops=8)
    work.run(path, fmt="raw")
    assert_reads_like_qemu(path, fmt="raw", ops=work.cmds)


@pytest.mark.parametrize("seed", SEEDS)
def test_qemu_dirty_image_after_kill(tmp_path, seed):
    """QEMU killed with lazy refcounts leaves the dirty bit set: a read-only open reads the
    data; a read-write open repairs, and QEMU then finds the image clean."""
    path = tmp_path / "dirty.qcow2"
    qemu.create(path, 4 * MiB, cluster_size=4096, lazy_refcounts=True)
    work = QemuWorkload(tmp_path, 4 * MiB, 4096, seed, kinds=("write",), nops=8)
    proc = qemu.qemu_io(path, *work.cmds, "sigraise 9", check=False)
    assert proc.returncode != 0
    info = qemu.qemu_info(path)
    assert info["dirty-flag"] is True
    expected = qemu.convert_to_raw(path)
    assert_same(engine_read_all(path), expected, "read-only read of a dirty image")
    with engine.open(str(path)) as img:
        assert_same(img.read(0, img.size), expected, "read-write read of a dirty image")
    qemu.assert_qemu_clean(path)
    assert qemu.qemu_info(path)["dirty-flag"] is False


# --- (b) cowchain writes, QEMU reads ------------------------------------------------------------

class Model:
    """The expected content of one chain: a bytearray per layer; reads fall through."""

    def __init__(self, size: int, lower: bytes | None = None):
        self.size = size
        self.lower = bytes(size) if lower is None else lower[:size].ljust(size, b"\0")
        self.data = bytearray(self.lower)

    def write(self, off, data):
        self.data[off:off + len(data)] = data

    def zero(self, off, length):
        self.data[off:off + length] = bytes(length)

    def discard(self, off, length):
        self.data[off:off + length] = self.lower[off:off + length]


def aligned_inside(off: int, length: int, cluster: int, size: int) -> tuple[int, int]:
    """The whole clusters inside [off, off+length); the partial last cluster of the disk
    counts as whole when the range reaches the end of the disk."""
    start = -(-off // cluster) * cluster
    end = off + length if off + length == size else (off + length) // cluster * cluster
    return start, max(start, end)


def engine_workload(img, model: Model, rng: random.Random, nops: int, cluster: int,
                    kinds=("write", "write", "write", "zero", "zero_unmap", "discard", "flush",
                           "read")) -> list[str]:
    """Random operations on an open engine image, mirrored into MODEL; reads are compared as
    they happen. Discards are cluster-aligned (the lower layer shows through exactly there)."""
    log = []
    size = model.size
    for _ in range(nops):
        kind = rng.choice(kinds)
        off, length = random_range(rng, size, cluster)
        if kind == "write":
            data = rng.randbytes(length)
            img.write(off, data)
            model.write(off, data)
            log.append(f"write({off}, {length} bytes)")
        elif kind in ("zero", "zero_unmap"):
            unmap = kind == "zero_unmap"
            img.write_zeroes(off, length, unmap=unmap)
            model.zero(off, length)
            log.append(f"write_zeroes({off}, {length}, unmap={unmap})")
        elif kind == "discard":
            start, end = aligned_inside(off, length, cluster, size)
            if end > start:
                img.discard(start, end - start)
                model.discard(start, end - start)
                log.append(f"discard({start}, {end - start})")
        elif kind == "flush":
            img.flush()
            log.append("flush()")
        elif kind == "read":
            got = img.read(off, length)
            if got != bytes(model.data[off:off + length]):
                pytest.fail(f"read({off}, {length}) after {log}: "
                            f"{first_difference(got, bytes(model.data[off:off + length]))}")
            log.append(f"read({off}, {length})")
    return log


def assert_qemu_sees_model(path, model: Model, log, fmt="qcow2"):
    """qemu-img check clean; qemu-img compare identical to the model; convert equal too."""
    qemu.assert_qemu_clean(path, fmt)
    raw = path.parent / (path.name + ".model.raw")
    raw.write_bytes(bytes(model.data))
    assert qemu.qemu_info(path, fmt)["virtual-size"] == model.size
    code, text = qemu.qemu_compare(path, raw, fmt, "raw")
    if code != 0:
        got = qemu.convert_to_raw(path, fmt)
        pytest.fail(f"qemu-img compare {path.name} vs model exited {code}: {text.strip()}; "
                    f"{first_difference(got, bytes(model.data))}\nops: {log}")


ENGINE_GEOMETRIES = [
    pytest.param(512, "1.1", 16, 2 * MiB + 1536, id="c512-v3"),
    pytest.param(512, "0.10", 16, 2 * MiB + 1536, id="c512-v2"),
    pytest.param(4096, "1.1", 16, 8 * MiB + 512, id="c4k-v3"),
    pytest.param(4096, "0.10", 16, 8 * MiB + 512, id="c4k-v2"),
    pytest.param(65536, "1.1", 16, 24 * MiB + 4096, id="c64k-v3"),
    pytest.param(65536, "0.10", 16, 24 * MiB + 4096, id="c64k-v2"),
    pytest.param(2 * MiB, "1.1", 16, 40 * MiB + 512, id="c2m-v3"),
] + [
    pytest.param(4096, "1.1", bits, 4 * MiB, id=f"c4k-v3-refcount{bits}")
    for bits in (1, 2, 4, 8, 32, 64)
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cluster,compat,refbits,size", ENGINE_GEOMETRIES)
def test_engine_writes_qemu_reads(tmp_path, cluster, compat, refbits, size, seed):
    rng = random.Random(seed)
    path = tmp_path / "disk.qcow2"
    model = Model(size)
    with engine.create(str(path), size, cluster_size=cluster, compat=compat,
                       refcount_bits=refbits) as img:
        assert (img.size, img.cluster_size, img.format) == (size, cluster, "qcow2")
        log = engine_workload(img, model, rng, 40, cluster)
    assert_qemu_sees_model(path, model, log)
    assert_reads_like_qemu(path)
    # Reopen and go on writing (the allocator must pick up where it was).
    with engine.open(str(path)) as img:
        log += ["-- reopen --"] + engine_workload(img, model, rng, 20, cluster)
    assert_qemu_sees_model(path, model, log)


@pytest.mark.parametrize("seed", SEEDS)
def test_engine_writes_lazy_refcounts(tmp_path, seed):
    rng = random.Random(seed)
    path = tmp_path / "lazy.qcow2"
    size = 4 * MiB
    model = Model(size)
    with engine.create(str(path), size, cluster_size=4096, lazy_refcounts=True) as img:
        log = engine_workload(img, model, rng, 30, 4096)
    assert qemu.qemu_info(path)["dirty-flag"] is False, "a clean close must clear the dirty bit"
    assert_qemu_sees_model(path, model, log)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("base_maker", ["qemu-raw", "qemu-qcow2", "engine-qcow2", "engine-raw"])
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_engine_chain_writes(tmp_path, monkeypatch, base_maker, compat, seed):
    """A base written by QEMU or by cowchain, overlays made by engine.create(backing=...),
    random writes in each new leaf; QEMU must read the whole chain as the model says."""
    monkeypatch.chdir(tmp_path)
    rng = random.Random(seed)
    size = 6 * MiB + 512
    maker, base_fmt = base_maker.split("-")
    base = tmp_path / f"base.{base_fmt}"
    if maker == "qemu":
        qemu.create(base, size, fmt=base_fmt)
        QemuWorkload(tmp_path, size, 65536, seed, kinds=("write", "pattern"), nops=8).run(
            base, fmt=base_fmt)
    else:
        with engine.create(str(base), size, format=base_fmt) as img:
            engine_workload(img, Model(size), rng, 10, 65536, kinds=("write",))
    lower = qemu.convert_to_raw(base, base_fmt)
    log = []
    below, below_fmt = base.name, base_fmt
    for depth, cluster in enumerate([4096, 512, 65536]):
        name = f"layer{depth}.qcow2"
        with engine.create(str(tmp_path / name), size, cluster_size=cluster, compat=compat,
                           backing=below, backing_format=below_fmt) as img:
            assert img.backing is not None and img.backing.format == below_fmt
            assert img.read(0, size) == lower, "a new overlay must read as its backing file"
            model = Model(size, lower)
            log += [f"-- {name} --"] + engine_workload(img, model, rng, 30, cluster)
        assert_qemu_sees_model(tmp_path / name, model, log)
        assert_reads_like_qemu(tmp_path / name)
        info = qemu.qemu_info(tmp_path / name)
        assert info["backing-filename"] == below, "overlays name their backing file bare"
        assert info["backing-filename-format"] == below_fmt
        lower = bytes(model.data)
        below, below_fmt = name, "qcow2"
    # The lower layers must not have changed: QEMU still reads them as before.
    if base_fmt == "qcow2":
        qemu.assert_qemu_clean(base)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_engine_overlay_over_short_backing(tmp_path, monkeypatch, base_fmt, seed):
    """Copy-up from a backing file that ends inside an overlay cluster: past its end the
    copied-up bytes must be zeros."""
    monkeypatch.chdir(tmp_path)
    rng = random.Random(seed)
    base_size = 1 * MiB + 1536
    size = 3 * MiB
    base = tmp_path / f"base.{base_fmt}"
    qemu.create(base, base_size, fmt=base_fmt)
    qemu.qemu_io(base, f"write -P 0x5a 0 {base_size}", fmt=base_fmt)
    top = tmp_path / "top.qcow2"
    with engine.create(str(top), size, backing=base.name, backing_format=base_fmt,
                       cluster_size=65536) as img:
        model = Model(size, b"\x5a" * base_size)
        assert_same(img.read(0, size), bytes(model.data), "new overlay over a short backing file")
        for off, length in [(base_size - 700, 1000), (base_size + 100, 10), (base_size - 1, 2)]:
            data = rng.randbytes(length)
            img.write(off, data)
            model.write(off, data)
        log = engine_workload(img, model, rng, 20, 65536)
    assert_qemu_sees_model(top, model, log)
    assert_reads_like_qemu(top)


@pytest.mark.parametrize("seed", SEEDS)
def test_engine_writes_after_internal_snapshot(tmp_path, seed):
    """Writing to an image whose clusters an internal snapshot shares (refcount 2) must copy
    them, leaving the snapshot intact for QEMU."""
    rng = random.Random(seed)
    path = tmp_path / "snap.qcow2"
    size = 2 * MiB
    qemu.create(path, size, cluster_size=4096)
    QemuWorkload(tmp_path, size, 4096, seed, kinds=("write",), nops=10).run(path)
    before = qemu.convert_to_raw(path)
    qemu.qemu_img("snapshot", "-c", "s1", path)
    model = Model(size)
    model.data[:] = before
    with engine.open(str(path)) as img:
        log = engine_workload(img, model, rng, 30, 4096,
                              kinds=("write", "write", "zero", "zero_unmap", "read", "flush"))
    assert_qemu_sees_model(path, model, log)
    # The snapshot still holds the old content.
    snap = tmp_path / "snap-s1.raw"
    qemu.qemu_img("convert", "-f", "qcow2", "-O", "raw", "-l", "snapshot.name=s1", path, snap)
    assert_same(snap.read_bytes(), before, "internal snapshot content after cowchain writes")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cluster", [4096, 65536])
def test_engine_writes_over_compressed(tmp_path, cluster, seed):
    """Partial writes into compressed clusters (QEMU-made, deflate and zstd) must decompress,
    merge and store a normal cluster, and free the compressed bytes' references."""
    rng = random.Random(seed)
    size = 4 * MiB
    src = tmp_path / "src.qcow2"
    qemu.create(src, size, cluster_size=cluster)
    QemuWorkload(tmp_path, size, cluster, seed, kinds=("write", "pattern"), nops=16).run(src)
    for ctype in ("zlib", "zstd"):
        path = tmp_path / f"packed-{ctype}.qcow2"
        qemu.qemu_img("convert", "-f", "qcow2", "-O", "qcow2", "-c",
                      "-o", f"cluster_size={cluster},compression_type={ctype}", src, path)
        model = Model(size)
        model.data[:] = qemu.convert_to_raw(path)
        with engine.open(str(path)) as img:
            log = engine_workload(img, model, rng, 30, cluster)
        assert_qemu_sees_model(path, model, log)


@pytest.mark.parametrize("seed", SEEDS)
def test_engine_writes_on_qemu_image(tmp_path, seed):
    """cowchain writing into an image QEMU filled (QEMU's allocation layout, its refcount
    table placement), then QEMU writing again over cowchain's layout."""
    rng = random.Random(seed)
    path = tmp_path / "mixed.qcow2"
    size = 8 * MiB
    qemu.create(path, size, cluster_size=512, refcount_bits=4)
    QemuWorkload(tmp_path, size, 512, seed).run(path)
    model = Model(size)
    model.data[:] = qemu.convert_to_raw(path)
    with engine.open(str(path)) as img:
        log = engine_workload(img, model, rng, 40, 512)
    assert_qemu_sees_model(path, model, log)
    work = QemuWorkload(tmp_path, size, 512, seed + 1)
    work.run(path)
    qemu.assert_qemu_clean(path)
    assert_reads_like_qemu(path, ops=work.cmds)


@pytest.mark.parametrize("seed", SEEDS)
def test_engine_grows_refcount_table(tmp_path, seed):
    """512-byte clusters with 64-bit refcounts: one refblock covers 64 clusters, so a few
    MiB of writes need many refblocks and several reftable growths."""
    rng = random.Random(seed)
    path = tmp_path / "grow.qcow2"
    size = 12 * MiB
    model = Model(size)
    with engine.create(str(path), size, cluster_size=512, refcount_bits=64) as img:
        for off in range(0, size, 256 * KiB):
            data = rng.randbytes(128 * KiB)
            img.write(off, data)
            model.write(off, data)
        log = engine_workload(img, model, rng, 20, 512)
    assert_qemu_sees_model(path, model, log)


INFO_KEYS_NEVER_SHARED = {"children", "backing-image"}


def compare_info(ours: dict, theirs: dict, where: str) -> None:
    shared = (set(ours) & set(theirs)) - INFO_KEYS_NEVER_SHARED
    assert {"virtual-size", "format", "filename"} <= shared, f"{where}: info() lacks basics: {ours}"
    diffs = {k: (ours[k], theirs[k]) for k in sorted(shared) if ours[k] != theirs[k]}
    # A key only QEMU prints is missing from ours (optional keys follow the same presence rules).
    missing = sorted(set(theirs) - set(ours) - INFO_KEYS_NEVER_SHARED)
    if diffs or missing:
        pytest.fail(f"{where}: info() differs from qemu-img info: {diffs}; "
                    f"keys only in qemu's: {missing}")


@pytest.mark.parametrize("kind", ["v3", "v2", "lazy", "chain-raw", "chain-qcow2", "snapshot",
                                  "zstd", "extended-l2", "raw"])
def test_info_matches_qemu(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    size = 4 * MiB
    fmt = "qcow2"
    path = tmp_path / "img.qcow2"
    if kind == "v3":
        with engine.create(str(path), size, cluster_size=4096) as img:
            img.write(0, b"x" * 5000)
    elif kind == "v2":
        with engine.create(str(path), size, compat="0.10") as img:
            img.write(0, b"x" * 5000)
    elif kind == "lazy":
        with engine.create(str(path), size, lazy_refcounts=True, refcount_bits=8) as img:
            img.write(0, b"x" * 5000)
    elif kind.startswith("chain"):
        bfmt = kind.split("-")[1]
        qemu.create(tmp_path / f"base.{bfmt}", size, fmt=bfmt)
        with engine.create(str(path), size, backing=f"base.{bfmt}", backing_format=bfmt) as img:
            img.write(0, b"x" * 5000)
    elif kind == "snapshot":
        qemu.create(path, size)
        qemu.qemu_io(path, "write -P 1 0 64k")
        qemu.qemu_img("snapshot", "-c", "first", path)
    elif kind == "zstd":
        qemu.create(path, size, compression_type="zstd")
    elif kind == "extended-l2":
        qemu.create(path, size, extended_l2=True)
    elif kind == "raw":
        fmt = "raw"
        path = tmp_path / "img.raw"
        with engine.create(str(path), size, format="raw") as img:
            img.write(4096, b"y" * 4096)
    with engine.open(str(path), format=fmt, readonly=True) as img:
        ours = img.info()
    theirs = qemu.qemu_info(path, fmt)
    compare_info(ours, theirs, kind)
    json.dumps(ours)  # info() must be plain JSON data


def test_check_matches_qemu(tmp_path):
    """Image.check() on a clean image and on one with leaked clusters reports what qemu-img
    check reports, with the same exit code."""
    path = tmp_path / "leaky.qcow2"
    qemu.create(path, 4 * MiB, cluster_size=4096)
    qemu.qemu_io(path, "write -P 1 0 1M")
    code, theirs = qemu.qemu_check(path)
    with engine.open(str(path), readonly=True) as img:
        res = img.check()
    ours = res.to_dict()
    assert res.exit_code == code == 0
    for k in ("corruptions", "leaks", "check-errors", "allocated-clusters", "total-clusters",
              "image-end-offset", "fragmented-clusters", "compressed-clusters"):
        assert ours.get(k, 0) == theirs.get(k, 0), f"check field {k}: {ours} vs {theirs}"
    # Leak one cluster: grow the file by a few clusters and give one of them a refcount of 1
    # (qemu-img check only looks at clusters inside the file).
    end_cluster = -(-poke.file_size(path) // 4096) + 1
    poke.truncate(path, (end_cluster + 3) * 4096)
    refblock = poke.read_be(path, poke.reftable_entry_offset(path, 0), 8)
    poke.write_be(path, refblock + 2 * end_cluster, 2, 1)
    code, theirs = qemu.qemu_check(path)
    with engine.open(str(path), readonly=True) as img:
        res = img.check()
    ours = res.to_dict()
    assert code == 3 and theirs.get("leaks") == 1, theirs
    assert res.exit_code == code, f"exit code {res.exit_code} vs qemu's {code}: {ours} / {theirs}"
    for k in ("corruptions", "leaks", "check-errors"):
        assert ours.get(k, 0) == theirs.get(k, 0), f"check field {k}: {ours} vs {theirs}"


# --- (c) locks -------------------------------------------------------------------------------

def _lock_target(tmp_path):
    path = tmp_path / "locked.qcow2"
    qemu.create(path, 4 * MiB)
    return path


def test_qemu_writer_blocks_engine_writer(tmp_path):
    path = _lock_target(tmp_path)
    with qemu.HeldOpen(path):
        with pytest.raises(engine.ImageLocked):
            engine.open(str(path))
        # A read-only open either shares (like qemu -U) or is refused as locked: nothing else.
        try:
            engine.open(str(path), readonly=True).close()
        except engine.ImageLocked:
            pass
    # Released: now it opens.
    engine.open(str(path)).close()


def test_qemu_reader_blocks_engine_writer(tmp_path):
    """QEMU's readers do not share write permission (byte 201), so a writer must be refused."""
    path = _lock_target(tmp_path)
    with qemu.HeldOpen(path, readonly=True):
        with pytest.raises(engine.ImageLocked):
            engine.open(str(path))


def test_engine_writer_blocks_qemu(tmp_path):
    path = _lock_target(tmp_path)
    img = engine.open(str(path))
    try:
        proc = qemu.qemu_img("info", "-f", "qcow2", path, check=False)
        assert proc.returncode != 0 and b"lock" in proc.stderr, proc.stderr
        proc = qemu.qemu_io(path, "read 0 512", check=False)
        assert qemu.io_failed((proc.stdout + proc.stderr).decode()), proc
        proc = qemu.qemu_io(path, "read 0 512", readonly=True, check=False)
        assert qemu.io_failed((proc.stdout + proc.stderr).decode()), proc
        # -U (force share) reads what is there without taking locks.
        qemu.qemu_info(path, force_share=True)
    finally:
        img.close()
    qemu.qemu_io(path, "write -P 1 0 512")


def test_engine_writer_blocks_engine_writer(tmp_path):
    """Locks are per open file description: a second read-write open in the same process
    is refused too."""
    path = _lock_target(tmp_path)
    with engine.open(str(path)):
        with pytest.raises(engine.ImageLocked):
            engine.open(str(path))


def test_engine_overlay_locks_backing(tmp_path, monkeypatch):
    """While an overlay is open read-write, its backing file is held like QEMU holds one
    (shared read, write not shared): QEMU cannot write the base under it."""
    monkeypatch.chdir(tmp_path)
    qemu.create(tmp_path / "base.qcow2", 4 * MiB)
    with engine.create(str(tmp_path / "top.qcow2"), 4 * MiB, backing="base.qcow2",
                       backing_format="qcow2"):
        proc = qemu.qemu_io(tmp_path / "base.qcow2", "write -P 1 0 512", check=False)
        assert qemu.io_failed((proc.stdout + proc.stderr).decode()), proc
    qemu.qemu_io(tmp_path / "base.qcow2", "write -P 1 0 512")


# --- long profile: more seeds on the main matrices -------------------------------------------

@pytest.mark.long
@pytest.mark.parametrize("seed", LONG_SEEDS)
@pytest.mark.parametrize("cluster,compat,refbits,size", GEOMETRIES)
def test_long_qemu_writes_engine_reads(tmp_path, cluster, compat, refbits, size, seed):
    test_qemu_writes_engine_reads(tmp_path, cluster, compat, refbits, size, seed)


@pytest.mark.long
@pytest.mark.parametrize("seed", LONG_SEEDS)
@pytest.mark.parametrize("cluster,compat,refbits,size", ENGINE_GEOMETRIES)
def test_long_engine_writes_qemu_reads(tmp_path, cluster, compat, refbits, size, seed):
    test_engine_writes_qemu_reads(tmp_path, cluster, compat, refbits, size, seed)
