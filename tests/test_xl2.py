"""Writes to images with extended L2 entries (qcow2.txt, "Extended L2 Entries"): 32 subclusters
per cluster, each allocated, zero, or reading from the backing file.

- QEMU writes, zeroes and discards on an extended_l2=on overlay (seeded random workloads):
  cowchain reads what qemu-img reads.
- cowchain writes, zeroes and discards (byte-granular, over a backing file, over compressed
  clusters and clusters shared with an internal snapshot): qemu-img check is clean and
  qemu-img compare finds the disk equal to a reference model of the same operations.
- A fresh overlay's whole-subcluster write allocates one cluster and copies nothing from
  below (the copy-up hook never fires, the L2 bitmap names only the written subclusters); a
  partial-subcluster write copies the rest of that one subcluster only.
- A repository chain made with extended_l2=True: every volume (base, snapshot, revert,
  preview and clone overlays) has it, on the API and the CLI.
"""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

import engine
from engine import _core, cli
from engine import format as fmt
from engine.errors import InvalidArgument
from engine.image.chain import probe_header
from qemu import (assert_qemu_clean, convert_to_raw, create, qemu_compare, qemu_img, qemu_img_json,
                  qemu_io)

KiB, MiB = 1 << 10, 1 << 20
CLUSTERS = [16 * KiB, 64 * KiB, 2 * MiB]


def _size(c: int) -> int:
    """A disk of at least 8 clusters whose last subcluster is partial (3 sectors past)."""
    return max(8 * c, 1 * MiB) + 1536


def _base(path, size: int, seed: int) -> np.ndarray:
    """A raw backing file: random bytes, with holes (zeros) every few hundred KiB."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size, dtype=np.uint8)
    for start in range(0, size, 384 * KiB):
        data[start:start + 96 * KiB] = 0
    path.write_bytes(data.tobytes())
    return data


def _l2_entry(path, vaddr: int) -> tuple[int, int]:
    """(entry, bitmap) of the extended L2 entry of the cluster holding vaddr, from the file."""
    raw = open(path, "rb").read()
    h = fmt.parse_header(raw[:2 * MiB], len(raw))
    c = h.cluster_size
    l2_per = c // 16
    ci = vaddr // c
    l1e = struct.unpack_from(">Q", raw, h.l1_table_offset + 8 * (ci // l2_per))[0]
    l2 = l1e & 0x00FFFFFFFFFFFE00
    if l2 == 0:
        return 0, 0
    return struct.unpack_from(">QQ", raw, l2 + 16 * (ci % l2_per))


# --- QEMU writes, cowchain reads ----------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("cluster", CLUSTERS, ids=["16k", "64k", "2m"])
def test_qemu_writes_cowchain_reads(tmp_path, cluster, seed):
    size = _size(cluster)
    sub = cluster // 32
    _base(tmp_path / "base.raw", size, seed)
    top = create(tmp_path / "top.qcow2", size, backing="base.raw", backing_fmt="raw",
                 cluster_size=cluster, extended_l2=True)
    rnd = random.Random(seed * 1000 + cluster)
    # weighted: writes 11, zeroes 4, zeroes with unmap 2, discards 3 (of 20)
    ops = (["write -q -P {p} {o} {n}"] * 11 + ["write -q -z {o} {n}"] * 4 +
           ["write -q -z -u {o} {n}"] * 2 + ["discard -q {o} {n}"] * 3)
    cmds = []
    for i in range(80):
        length = rnd.choice([512, sub, 3 * sub + 512, cluster, 2 * cluster + sub])
        off = rnd.randrange(0, (size - length) // 512 + 1) * 512
        cmds.append(rnd.choice(ops).format(p=i % 250 + 1, o=off, n=length))
    qemu_io(top, *cmds)
    want = convert_to_raw(top)
    with engine.open(top, readonly=True) as img:
        got = img.read(0, size)
        assert img.check().corruptions == 0
    assert got == want


# --- cowchain writes, QEMU checks -----------------------------------------------------------------

def _aligned(off: int, length: int, grain: int, size: int) -> tuple[int, int]:
    """The whole grains inside [off, off+length) (a partial last one at the disk end counts)."""
    start = -(-off // grain) * grain
    end = off + length if off + length == size else (off + length) // grain * grain
    return start, max(start, end)


@pytest.mark.parametrize("variant", ["plain", "compressed", "snapshot"])
@pytest.mark.parametrize("cluster", CLUSTERS, ids=["16k", "64k", "2m"])
def test_cowchain_writes_qemu_checks(tmp_path, cluster, variant):
    """Random writes, write_zeroes and discards through cowchain, mirrored into a model."""
    size = _size(cluster)
    sub = cluster // 32
    seed = cluster + len(variant)
    below = _base(tmp_path / "base.raw", size, seed)
    top = create(tmp_path / "top.qcow2", size, backing="base.raw", backing_fmt="raw",
                 cluster_size=cluster, extended_l2=True)
    # what QEMU put in the overlay first: subclusters, zeros, whole clusters (compressed or not)
    prep = [f"write -q -P 0x61 {sub} {2 * sub}", f"write -q -z {5 * sub} {sub}",
            f"write -q -P 0x62 {2 * cluster} {cluster}",
            f"write -q -P 0x63 {3 * cluster + 7 * sub} {5 * sub}"]
    compressed: set[int] = set()
    if variant == "compressed":
        compressed = {4, 5, 6}
        prep += [f"write -q -c -P 0x64 {k * cluster} {cluster}" for k in sorted(compressed)]
    qemu_io(top, *prep)
    if variant == "snapshot":
        qemu_img("snapshot", "-c", "s1", top)        # every cluster shared: none is COPIED
    model = np.frombuffer(convert_to_raw(top), dtype=np.uint8).copy()
    rnd = random.Random(seed)
    with engine.open(top) as img:
        for i in range(120):
            length = rnd.choice([1, 100, sub - 7, sub, 2 * sub + 300, cluster, cluster + sub,
                                 3 * cluster])
            length = min(length, size)
            off = rnd.randrange(0, size - length + 1)
            if rnd.random() < 0.4:
                off = off // sub * sub          # subcluster-aligned half of the time
            kind = rnd.random()
            if kind < 0.5:
                data = np.full(length, i % 250 + 1, dtype=np.uint8)
                img.write(off, data)
                model[off:off + length] = data
                compressed -= set(range(off // cluster, (off + length - 1) // cluster + 1))
            elif kind < 0.75:
                img.write_zeroes(off, length, unmap=rnd.random() < 0.5)
                model[off:off + length] = 0
                compressed -= set(range(off // cluster, (off + length - 1) // cluster + 1))
            else:
                img.discard(off, length)
                start, end = _aligned(off, length, sub, size)
                for c0 in range(start // cluster * cluster, end, cluster):
                    a, b = max(start, c0), min(end, c0 + cluster)
                    whole = a == c0 and (b == c0 + cluster or b == size)
                    if c0 // cluster in compressed and not whole:
                        continue                # part of a compressed cluster: left as is
                    compressed.discard(c0 // cluster)
                    model[a:b] = below[a:b]
            if i % 40 == 39:
                img.flush()
        assert img.read(0, size) == model.tobytes()
    assert_qemu_clean(top)
    (tmp_path / "model.raw").write_bytes(model.tobytes())
    code, msg = qemu_compare(top, tmp_path / "model.raw")
    assert code == 0, msg
    with engine.open(top, readonly=True) as img:
        res = img.check()
        assert res.corruptions == 0 and res.leaks == 0


# --- what a write copies ----------------------------------------------------------------------

@pytest.mark.parametrize("cluster", CLUSTERS, ids=["16k", "64k", "2m"])
def test_fresh_overlay_small_write_copies_nothing(tmp_path, cluster):
    size = 8 * cluster
    sub = cluster // 32
    below = _base(tmp_path / "base.raw", size, 7)
    below[:] = 0xAB
    (tmp_path / "base.raw").write_bytes(below.tobytes())
    top = str(tmp_path / "top.qcow2")
    img = engine.create(top, None, backing="base.raw", backing_format="raw",
                        cluster_size=cluster, extended_l2=True)
    img.flush()
    empty = len(open(top, "rb").read())
    off = 3 * cluster + 4 * sub
    _core.arm_hook(None)                        # zero the hook counters
    img.write(off, b"\x11" * (2 * sub))         # two whole subclusters
    assert _core.hook_counts()["cow_read"] == 0
    img.write(off + 9 * sub + 10, b"\x22" * 100)  # part of subcluster 13
    assert _core.hook_counts()["cow_read"] == 1
    img.close()
    entry, bitmap = _l2_entry(top, off)
    assert entry & (1 << 63) and entry & 0x00FFFFFFFFFFFE00
    assert bitmap == (1 << 4) | (1 << 5) | (1 << 13)      # only those subclusters, no zero bits
    # one data cluster and one L2 table more than the empty overlay (the file is trimmed)
    assert len(open(top, "rb").read()) <= (-(-empty // cluster) + 2) * cluster
    want = bytearray(below.tobytes())
    want[off:off + 2 * sub] = b"\x11" * (2 * sub)
    want[off + 9 * sub + 10:off + 9 * sub + 110] = b"\x22" * 100
    assert convert_to_raw(top) == bytes(want)
    assert_qemu_clean(top)


def test_zero_and_discard_by_subcluster_bits(tmp_path):
    c = 64 * KiB
    sub = c // 32
    top = create(tmp_path / "top.qcow2", 4 * c, extended_l2=True)
    qemu_io(top, f"write -q -P 1 0 {c}", f"write -q -P 2 {c} {4 * sub}")
    with engine.open(top) as img:
        img.write_zeroes(2 * sub, 3 * sub + 100)      # subclusters 2..4 (5 is partial: bytes)
        img.discard(c, 2 * sub)                        # subclusters 0, 1 of cluster 1
    e0, b0 = _l2_entry(top, 0)
    assert b0 == (0xFFFFFFFF & ~0b11100) | (0b11100 << 32)
    e1, b1 = _l2_entry(top, c)
    assert b1 == 0b1100 and e1 & 0x00FFFFFFFFFFFE00
    with engine.open(top) as img:
        img.discard(c + 2 * sub, 2 * sub)              # the last allocated ones: cluster freed
    e1, b1 = _l2_entry(top, c)
    assert (e1, b1) == (0, 0)
    assert_qemu_clean(top)
    want = b"\x01" * (2 * sub) + bytes(3 * sub + 100) + b"\x01" * (27 * sub - 100) + bytes(3 * c)
    assert convert_to_raw(top) == want


def test_plain_images_keep_cluster_granularity(tmp_path):
    """Without extended L2 a partial-cluster write still copies the whole cluster up."""
    top = create(tmp_path / "top.qcow2", 1 * MiB)
    with engine.open(top) as img:
        _core.arm_hook(None)
        img.write(4096, b"x" * 4096)
        assert _core.hook_counts()["cow_read"] == 1
        img.discard(0, 8192)                           # not a whole cluster: nothing dropped
        assert img.read(4096, 4) == b"xxxx"


# --- chains -------------------------------------------------------------------------------------

def _ext_flags(repo, chain) -> list[bool]:
    out = []
    for v in chain.volumes:
        assert v.format == "qcow2"
        out.append(probe_header(v.path, "qcow2").extended_l2)
    return out


def test_chain_with_extended_l2(tmp_path):
    repo = engine.Repository.create(str(tmp_path / "repo"))
    try:
        c = repo.create_chain("vm", 4 * MiB, extended_l2=True)
        c.write(0, b"\x01" * 65536)
        s1 = c.snapshot("one")
        c.write(4096, b"\x02" * 4096)
        s2 = c.snapshot("two")
        c.write(8192, b"\x03" * 512)
        assert _ext_flags(repo, c) == [True, True, True]
        c.preview(s1.id)
        assert all(_ext_flags(repo, c))
        c.undo_preview()
        clone = c.clone(s2.id, "copy")
        clone.write(0, b"\x04" * 512)
        assert all(_ext_flags(repo, clone))
        c.revert(s1.id)
        assert all(_ext_flags(repo, c))
        assert clone.read(0, 513) == b"\x04" * 512 + b"\x01"
        assert clone.read(4096, 4) == b"\x02" * 4
        assert c.read(4096, 4) == b"\x01" * 4
        plain = repo.create_chain("plain", 1 * MiB, base_format="qcow2")
        plain.snapshot()
        assert _ext_flags(repo, plain) == [False, False]
        for bad in (dict(base_format="raw"), dict(cluster_size=4096), dict(extended_l2=1)):
            with pytest.raises(InvalidArgument):
                repo.create_chain("bad", 1 * MiB, **{"extended_l2": True, **bad})
        paths = [v.path for ch in (c, clone) for v in ch.volumes]
    finally:
        repo.close()
    for p in paths:
        assert_qemu_clean(p)


def test_cli_chain_create_extended_l2(tmp_path, capsys):
    repo = str(tmp_path / "repo")
    assert cli.main(["repo", "init", repo]) == 0
    assert cli.main(["--repo", repo, "chain", "create", "vm", "8M", "--extended-l2"]) == 0
    assert "qcow2 base volume" in capsys.readouterr().out
    assert cli.main(["--repo", repo, "chain", "snapshot", "vm"]) == 0
    r = engine.Repository.open(repo)
    try:
        assert _ext_flags(r, r.chain("vm")) == [True, True]
    finally:
        r.close()
    assert cli.main(["--repo", repo, "chain", "create", "bad", "8M", "--extended-l2",
                     "--format", "raw"]) != 0


def test_img_commit_empties_an_extended_l2_overlay(tmp_path):
    """``cowchain img commit`` (no -d) empties the overlay afterwards by discarding it."""
    from engine import img as cimg
    c = 64 * KiB
    base = create(tmp_path / "base.qcow2", 8 * c, extended_l2=True)
    qemu_io(base, f"write -q -P 7 0 {8 * c}")
    top = create(tmp_path / "top.qcow2", 8 * c, backing="base.qcow2", backing_fmt="qcow2",
                 extended_l2=True)
    qemu_io(top, f"write -q -P 9 {c + 2048} 4096", f"write -q -z {3 * c} {c}")
    want = convert_to_raw(top)
    cimg.commit(str(top))
    assert convert_to_raw(top) == want == convert_to_raw(base)
    assert all(e["depth"] == 1 for e in qemu_img_json("map", "-f", "qcow2", top))
    assert_qemu_clean(top)
    assert_qemu_clean(base)


def test_write_in_place_where_qemus_file_ends_inside_the_cluster(tmp_path):
    """QEMU writes only the subclusters it allocates, so its file may end inside the last
    cluster; a write into that cluster's other subclusters goes in place all the same."""
    c = 64 * KiB
    sub = c // 32
    top = create(tmp_path / "top.qcow2", 4 * c, extended_l2=True)
    qemu_io(top, f"write -q -P 3 {c} {sub}")
    end = len(open(top, "rb").read())
    entry, _ = _l2_entry(top, c)
    assert end < (entry & 0x00FFFFFFFFFFFE00) + c      # the file ends inside the cluster
    with engine.open(top) as img:
        img.write(2 * c - 100, b"\x07" * 100)           # subcluster 31, in place
    entry2, bitmap = _l2_entry(top, c)
    assert entry2 == entry and bitmap == 1 | (1 << 31)
    assert_qemu_clean(top)
    want = bytes(c) + b"\x03" * sub + bytes(c - sub - 100) + b"\x07" * 100 + bytes(2 * c)
    assert convert_to_raw(top) == want
