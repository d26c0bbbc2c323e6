"""Repository, Chain and Snapshot: every operation, with content checked against expected
bytes and QEMU as the oracle (``qemu-img check`` clean on every volume, ``qemu-img info
--backing-chain`` on every leaf, ``qemu-img convert`` of every leaf and snapshot volume equal to
what cowchain reads)."""

from __future__ import annotations

import json
import os
import time

import pytest

import engine
from engine.errors import (ImageClosed, ImageLocked, InvalidArgument, NotFound,
                           RepositoryError)
from qemu import QemuError, assert_qemu_clean, convert_to_raw, qemu_img, qemu_img_json

MiB = 1 << 20
SIZE = 1 * MiB

pytestmark = pytest.mark.qemu


# --- helpers -----------------------------------------------------------------------------------

def pattern(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


class Expect:
    """The expected content of each chain's disk and of each snapshot."""

    def __init__(self):
        self.disks: dict[str, bytearray] = {}
        self.snaps: dict[str, bytes] = {}

    def new(self, name, size=SIZE, content=None):
        self.disks[name] = bytearray(content if content is not None else bytes(size))

    def write(self, chain, offset, data):
        chain.write(offset, data)
        self.disks[chain.name][offset:offset + len(data)] = data

    def zero(self, chain, offset, length):
        chain.write_zeroes(offset, length)
        self.disks[chain.name][offset:offset + length] = bytes(length)

    def snapshot(self, chain, description=""):
        s = chain.snapshot(description)
        self.snaps[s.id] = bytes(self.disks[chain.name])
        return s


def qemu_check_volume(path) -> None:
    """``qemu-img check`` of one volume's own metadata (its backing chain is not opened, so
    a deep chain costs one open per volume): exit 0, no corruption, no leak."""
    proc = qemu_img("check", "--output=json", "--image-opts",
                    f"driver=qcow2,file.driver=file,file.filename={path},backing=", check=False)
    data = json.loads(proc.stdout or b"{}")
    if proc.returncode != 0 or data.get("corruptions") or data.get("leaks"):
        raise QemuError(f"qemu-img check {path} exited {proc.returncode}: {data} "
                        f"{proc.stderr.decode(errors='replace')}")


def verify(repo_path, expect: Expect, *, sample: int | None = None) -> None:
    """Reopen the repository and compare every chain and snapshot with EXPECT, then (closed)
    run QEMU's tools: ``qemu-img check`` on every volume, ``info --backing-chain`` and
    ``convert`` on every leaf, ``convert`` of every snapshot volume (or of SAMPLE of them,
    spread over the chain, for deep chains)."""
    with engine.Repository.open(repo_path) as repo:
        chains = {c.name: c for c in repo.chains()}
        assert set(chains) == set(expect.disks)
        layout = {}
        for name, c in chains.items():
            assert c.read(0, c.size) == bytes(expect.disks[name]), f"chain {name}"
            snaps = c.snapshots
            if sample is not None and len(snaps) > sample:
                snaps = [snaps[i * (len(snaps) - 1) // (sample - 1)] for i in range(sample)]
            for s in snaps:
                with c.open_snapshot(s.id) as img:
                    assert img.read(0, img.size) == expect.snaps[s.id], f"snapshot {s.id}"
            vols = {v.id: v for v in c.volumes}
            line, vid = [], c.leaf.id
            while vid is not None:
                line.append(vols[vid])
                vid = vols[vid].parent
            layout[name] = ([(v.path, v.format) for v in vols.values()], c.leaf, len(line),
                            [(s.id, vols[s.volume]) for s in snaps])
        res = repo.check()
        assert res.ok and res.exit_code == 0, res.to_dict()
    for name, (vols, leaf, depth, snaps) in layout.items():
        for path, fmt in vols:
            if fmt == "qcow2":
                qemu_check_volume(path)
        info = qemu_img_json("info", "--backing-chain", "-f", leaf.format, leaf.path)
        assert len(info) == depth
        for entry in info[:-1]:
            assert entry["backing-filename-format"] in ("raw", "qcow2")
            assert "/" not in entry["backing-filename"]
        assert convert_to_raw(leaf.path, leaf.format) == bytes(expect.disks[name])
        for sid, vol in snaps:
            assert convert_to_raw(vol.path, vol.format) == expect.snaps[sid]


def files(repo_path) -> set[str]:
    return set(os.listdir(os.path.join(repo_path, "volumes")))


# --- repository and chains ---------------------------------------------------------------------

def test_create_open_and_persist(repo_path):
    with engine.Repository.create(repo_path) as repo:
        c = repo.create_chain("vm1", SIZE, base_format="qcow2", cluster_size=4096)
        c.write(1000, b"hello")
        assert c.size == SIZE and c.cluster_size == 4096
        assert [v.role for v in c.volumes] == ["leaf"]
        assert c.volumes[0].format == "qcow2"
    with engine.Repository.open(repo_path) as repo:
        assert [c.name for c in repo.chains()] == ["vm1"]
        assert repo.chain("vm1").read(1000, 5) == b"hello"


def test_create_refuses(repo_path, tmp_path):
    with engine.Repository.create(repo_path) as repo:
        with pytest.raises(RepositoryError):
            engine.Repository.open(repo_path)  # locked by this open
        repo.create_chain("a", SIZE)
        with pytest.raises(RepositoryError, match="exists already"):
            repo.create_chain("a", SIZE)
        for bad in ("", "-x", "a/b", "../x", "x" * 200):
            with pytest.raises(InvalidArgument):
                repo.create_chain(bad, SIZE)
        with pytest.raises(InvalidArgument):
            repo.create_chain("b", 1000)
        with pytest.raises(InvalidArgument):
            repo.create_chain("b", SIZE, cluster_size=3000)
        with pytest.raises(InvalidArgument):
            repo.create_chain("b", SIZE, base_format="vmdk")
        with pytest.raises(NotFound):
            repo.chain("nope")
    with pytest.raises(RepositoryError):
        engine.Repository.create(repo_path)  # not empty
    with pytest.raises(NotFound):
        engine.Repository.open(str(tmp_path / "nothing"))
    assert issubclass(NotFound, RepositoryError)


@pytest.mark.parametrize("base_format", ["raw", "qcow2"])
@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_snapshots_keep_their_content(repo, repo_path, base_format, cluster_size):
    x = Expect()
    c = repo.create_chain("vm1", SIZE, base_format=base_format, cluster_size=cluster_size)
    x.new("vm1")
    x.write(c, 0, pattern(1, 100_000))
    s1 = x.snapshot(c, "one")
    assert s1.description == "one" and s1.chain == "vm1"
    assert s1.volume == c.volumes[0].id
    assert [v.format for v in c.volumes] == [base_format, "qcow2"]
    assert [v.role for v in c.volumes] == ["base", "leaf"]
    x.write(c, 5000, pattern(2, 3000))          # partial cluster: copy-up from the base
    x.zero(c, 3 * cluster_size, cluster_size)
    s2 = x.snapshot(c, "two")
    x.write(c, SIZE - 10, pattern(3, 10))
    assert [s.id for s in c.snapshots] == [s1.id, s2.id]
    assert [v.role for v in c.volumes] == ["base", "internal", "leaf"]
    assert c.volumes[0].parent is None
    assert [v.parent for v in c.volumes[1:]] == [v.id for v in c.volumes[:-1]]
    assert c.get_snapshot(s2.id[:8]) == s2
    repo.close()
    verify(repo_path, x)


def test_snapshot_is_metadata_only(repo):
    """Taking a snapshot costs the same on a 1 GiB and a 1 TiB disk: no data is copied."""
    times = {}
    for name, size in (("small", 1 << 30), ("big", 1 << 40)):
        c = repo.create_chain(name, size, base_format="qcow2")
        c.write(size - 4096, b"end")
        t = time.perf_counter()
        c.snapshot()
        times[name] = time.perf_counter() - t
        leaf = c.volumes[-1]
        assert os.path.getsize(leaf.path) < 1 * MiB
        assert c.read(size - 4096, 3) == b"end"
    # Generous: the snapshot of the 1 TiB disk must not scale with its size (1024x larger).
    assert times["big"] < max(10 * times["small"], 0.5), times


def test_write_zeroes_and_discard_through_the_chain(repo, repo_path):
    x = Expect()
    c = repo.create_chain("vm1", SIZE, base_format="qcow2", cluster_size=65536)
    x.new("vm1")
    x.write(c, 0, pattern(7, SIZE))
    x.snapshot(c)
    x.write(c, 65536, pattern(8, 2 * 65536))
    c.discard(65536, 65536)                      # the snapshot shows through again
    x.disks["vm1"][65536:131072] = pattern(7, 65536)
    x.zero(c, 4 * 65536, 65536)
    assert c.read(0, SIZE) == bytes(x.disks["vm1"])
    depths = {e.start: e.depth for e in c.extents()}
    assert depths[4 * 65536] == 0
    repo.close()
    verify(repo_path, x)


# --- revert and preview ------------------------------------------------------------------------

def test_revert_drops_newer_snapshots_and_their_volumes(repo, repo_path):
    x = Expect()
    c = repo.create_chain("vm1", SIZE)
    x.new("vm1")
    x.write(c, 0, pattern(1, 4096))
    s1 = x.snapshot(c)
    x.write(c, 0, pattern(2, 4096))
    s2 = x.snapshot(c)
    x.write(c, 0, pattern(3, 4096))
    s3 = x.snapshot(c)
    x.write(c, 0, pattern(4, 4096))
    before = files(repo_path)
    c.revert(s2.id)
    x.disks["vm1"] = bytearray(x.snaps[s2.id])
    del x.snaps[s3.id]
    assert [s.id for s in c.snapshots] == [s1.id, s2.id]
    assert c.read(0, 4096) == pattern(2, 4096)
    after = files(repo_path)
    assert len(before - after) == 2 and len(after - before) == 1  # s3's volume + old leaf
    x.write(c, 100, b"after revert")
    c.revert(s1.id)
    x.disks["vm1"] = bytearray(x.snaps[s1.id])
    del x.snaps[s2.id]
    assert len(c.volumes) == 2
    repo.close()
    verify(repo_path, x)


def test_preview_commit_and_undo(repo, repo_path):
    x = Expect()
    c = repo.create_chain("vm1", SIZE, base_format="qcow2")
    x.new("vm1")
    x.write(c, 0, pattern(1, 8192))
    s1 = x.snapshot(c)
    x.write(c, 0, pattern(2, 8192))
    s2 = x.snapshot(c)
    x.write(c, 0, pattern(3, 8192))
    active = bytes(x.disks["vm1"])

    c.preview(s1.id)
    assert c.previewing == s1
    assert c.read(0, 8192) == pattern(1, 8192)
    c.write(0, b"trying")
    for op in (lambda: c.snapshot(), lambda: c.revert(s1.id), lambda: c.preview(s2.id),
               lambda: c.delete_snapshot(s2.id)):
        with pytest.raises(RepositoryError, match="previewing"):
            op()
    assert len(c.volumes) == 4  # base, s2's volume, the leaf kept aside, the preview leaf
    c.undo_preview()
    assert c.previewing is None
    assert c.read(0, SIZE) == active
    assert len(c.volumes) == 3

    c.preview(s1.id)
    c.write(0, b"keep this")
    c.commit_preview()
    x.disks["vm1"] = bytearray(x.snaps[s1.id])
    x.disks["vm1"][0:9] = b"keep this"
    del x.snaps[s2.id]
    assert [s.id for s in c.snapshots] == [s1.id]
    assert c.read(0, 8192) == bytes(x.disks["vm1"][:8192])
    assert len(c.volumes) == 2 and len(files(repo_path)) == 2
    with pytest.raises(RepositoryError, match="not previewing"):
        c.commit_preview()
    repo.close()
    verify(repo_path, x)


# --- delete_snapshot ---------------------------------------------------------------------------

def _three_snapshots(repo, x, base_format, *, big_lower: bool):
    """vm1 with snapshots s1 (base), s2, s3 and a leaf. With BIG_LOWER, s2's volume holds much
    more than s3's (a pull of s2 up is dear, a commit of s3 down is cheap); else the reverse."""
    c = repo.create_chain("vm1", SIZE, base_format=base_format, cluster_size=4096)
    x.new("vm1")
    x.write(c, 0, pattern(1, SIZE // 2))
    s1 = x.snapshot(c)
    x.write(c, 4096, pattern(2, (SIZE // 2) if big_lower else 8192))
    s2 = x.snapshot(c)
    x.write(c, 8192, pattern(3, 8192 if big_lower else SIZE // 2))
    s3 = x.snapshot(c)
    x.write(c, 12288, pattern(4, 100))
    return c, s1, s2, s3


@pytest.mark.parametrize("base_format", ["raw", "qcow2"])
@pytest.mark.parametrize("big_lower,expected", [(True, "commit"), (False, "pull")])
def test_delete_snapshot_picks_the_cheaper_direction(repo, repo_path, base_format, big_lower,
                                                     expected):
    x = Expect()
    c, s1, s2, s3 = _three_snapshots(repo, x, base_format, big_lower=big_lower)
    vols = [v.id for v in c.volumes]
    seen = []
    r = c.delete_snapshot(s2.id, progress=lambda d, t: seen.append((d, t)))
    assert r.direction == expected
    assert r.snapshot == s2.id
    if expected == "commit":
        assert r.commit_bytes < r.pull_bytes
        assert (r.kept_volume, r.removed_volume) == (vols[1], vols[2])
    else:
        assert r.pull_bytes < r.commit_bytes
        assert (r.kept_volume, r.removed_volume) == (vols[2], vols[1])
    assert r.copied_bytes == min(r.commit_bytes, r.pull_bytes)
    assert seen and seen[-1][0] == seen[-1][1] == r.copied_bytes
    del x.snaps[s2.id]
    assert [s.id for s in c.snapshots] == [s1.id, s3.id]
    assert len(c.volumes) == 3
    assert r.removed_volume not in {v.id for v in c.volumes}
    assert not [f for f in files(repo_path) if f.startswith(r.removed_volume)]
    repo.close()
    verify(repo_path, x)


@pytest.mark.parametrize("base_format", ["raw", "qcow2"])
@pytest.mark.parametrize("big_lower", [True, False])
def test_delete_oldest_and_newest_snapshots(repo, repo_path, base_format, big_lower):
    x = Expect()
    c, s1, s2, s3 = _three_snapshots(repo, x, base_format, big_lower=big_lower)
    r = c.delete_snapshot(s1.id)          # the base volume merges with s2's volume
    del x.snaps[s1.id]
    assert c.volumes[0].parent is None
    if r.direction == "pull":
        assert c.volumes[0].format == "qcow2"
    r = c.delete_snapshot(s3.id)          # the leaf merges with s3's volume
    del x.snaps[s3.id]
    x.write(c, 0, b"still writable")
    assert [s.id for s in c.snapshots] == [s2.id]
    assert c.volumes[-1].role == "leaf"
    r = c.delete_snapshot(s2.id)
    del x.snaps[s2.id]
    assert len(c.volumes) == 1 and c.snapshots == []
    assert len(files(repo_path)) == 1
    repo.close()
    verify(repo_path, x)


def test_delete_snapshot_refuses_while_an_image_holds_the_volume(repo):
    c = repo.create_chain("vm1", SIZE, base_format="qcow2")
    c.write(0, pattern(1, 4096))
    s1 = c.snapshot()
    c.write(0, pattern(2, 65536 * 4))
    s2 = c.snapshot()
    img = c.open_snapshot(s2.id)      # holds s1's and s2's volumes: either direction is blocked
    try:
        with pytest.raises(ImageLocked):
            c.delete_snapshot(s1.id)
    finally:
        img.close()
    assert repo._cat.journal() == []
    assert all(v.legality == "LEGAL" for v in c.volumes)
    c.delete_snapshot(s1.id)


# --- clones ------------------------------------------------------------------------------------

def test_clone_shares_volumes_and_keeps_writes_apart(repo, repo_path):
    x = Expect()
    c = repo.create_chain("gold", SIZE, base_format="qcow2")
    x.new("gold")
    x.write(c, 0, pattern(1, 65536))
    s1 = x.snapshot(c, "template")
    x.write(c, 0, pattern(2, 100))
    s2 = x.snapshot(c)
    x.write(c, 200, pattern(3, 100))

    k = c.clone(s1.id, "vm1")
    x.new("vm1", content=x.snaps[s1.id])
    assert k.origin == ("gold", s1.id)
    assert k.size == c.size
    assert [v.role for v in k.volumes] == ["shared", "leaf"]
    assert k.volumes[0].id == s1.volume
    x.write(k, 50, b"clone's own")
    x.write(c, 60, b"origin's own")
    ks = x.snapshot(k, "clone snapshot")
    x.write(k, 70, b"more")
    assert k.snapshots == [ks]
    assert c.read(0, 4096) == bytes(x.disks["gold"][:4096])
    assert k.read(0, 4096) == bytes(x.disks["vm1"][:4096])

    with pytest.raises(RepositoryError, match="clone 'vm1'"):
        c.delete_snapshot(s1.id)
    with pytest.raises(RepositoryError, match="clone 'vm1'"):
        repo.delete_chain("gold")
    with pytest.raises(RepositoryError, match="exists already"):
        c.clone(s1.id, "vm1")

    # Reverting the origin past the clone's volume keeps that volume for the clone.
    k2 = c.clone(s2.id, "vm2")
    x.new("vm2", content=x.snaps[s2.id])
    c.revert(s1.id)
    x.disks["gold"] = bytearray(x.snaps[s1.id])
    x.snaps.pop(s2.id)
    assert k2.read(0, SIZE) == bytes(x.disks["vm2"])
    assert [v.role for v in k2.volumes] == ["shared", "shared", "leaf"]
    repo.close()
    verify(repo_path, x)

    with engine.Repository.open(repo_path) as repo:
        repo.delete_chain("vm2")
        repo.delete_chain("vm1")
        # s2's old volume was only kept for vm2: it is gone with it.
        assert len(files(repo_path)) == 2
        repo.chain("gold").delete_snapshot(s1.id)
        repo.delete_chain("gold")
        assert files(repo_path) == set() and repo.chains() == []


def test_clone_of_clone_and_its_snapshots(repo, repo_path):
    x = Expect()
    c = repo.create_chain("a", SIZE, base_format="raw")
    x.new("a")
    x.write(c, 0, pattern(1, 10000))
    s = x.snapshot(c)
    b = c.clone(s.id, "b")
    x.new("b", content=x.snaps[s.id])
    x.write(b, 5000, pattern(2, 10000))
    bs = x.snapshot(b)
    x.write(b, 9000, pattern(3, 10))
    d = b.clone(bs.id, "d")
    x.new("d", content=x.snaps[bs.id])
    x.write(d, 0, b"d")
    with pytest.raises(RepositoryError, match="clone 'd'"):
        b.delete_snapshot(bs.id)
    repo.close()
    verify(repo_path, x)


# --- export and diff ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_export(repo, tmp_path, fmt):
    x = Expect()
    c = repo.create_chain("vm1", 64 * MiB, base_format="qcow2")
    x.new("vm1", size=64 * MiB)
    x.write(c, 0, pattern(1, 3 * MiB))
    s1 = x.snapshot(c)
    x.write(c, 10 * MiB + 17, pattern(2, 100_000))
    x.zero(c, MiB, MiB)
    seen = []
    out = str(tmp_path / f"out.{fmt}")
    r = c.export(out, format=fmt, progress=lambda d, t: seen.append((d, t)))
    assert r.path == out and r.format == fmt and r.size == 64 * MiB and r.snapshot is None
    assert seen and seen[-1][0] == seen[-1][1]
    assert convert_to_raw(out, fmt) == bytes(x.disks["vm1"])
    if fmt == "qcow2":
        assert_qemu_clean(out)
        assert "backing-filename" not in qemu_img_json("info", "-f", "qcow2", out)
    # Sparse: only the data is allocated.
    assert os.stat(out).st_blocks * 512 < 8 * MiB
    assert r.data_bytes <= 3 * MiB
    with pytest.raises(InvalidArgument, match="exists"):
        c.export(out, format=fmt)
    r = c.export(out, format=fmt, snapshot_id=s1.id, overwrite=True)
    assert r.snapshot == s1.id
    assert convert_to_raw(out, fmt) == x.snaps[s1.id]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".part")]


@pytest.mark.parametrize("src_fmt,base_fmt", [("qcow2", "qcow2"), ("qcow2", "raw"),
                                              ("raw", "qcow2")])
def test_import_chain(repo, repo_path, tmp_path, src_fmt, base_fmt):
    """An existing disk (a qcow2 overlay on a raw base, or a raw file) becomes a chain's base
    volume; the source and its backing file stay byte for byte as they were."""
    base = tmp_path / "src-base.raw"
    content = bytearray(8 * MiB)
    for i in range(0, 8 * MiB, 3 * 65536):
        content[i:i + 65536] = pattern(1 + i // 65536 % 250, 65536)
    base.write_bytes(content)
    if src_fmt == "qcow2":
        src = tmp_path / "src.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw", str(src))
        with engine.open(str(src)) as img:
            img.write(5 * MiB + 100, pattern(0xEE, 70_000))
            img.write_zeroes(0, 65536)
        content[5 * MiB + 100:5 * MiB + 100 + 70_000] = pattern(0xEE, 70_000)
        content[0:65536] = bytes(65536)
    else:
        src = base
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    seen = []
    c = repo.import_chain("vm1", str(src), format=src_fmt, base_format=base_fmt,
                          cluster_size=65536, progress=lambda d, t: seen.append((d, t)))
    assert c.size == 8 * MiB and seen and seen[-1][0] == seen[-1][1]
    assert c.read(0, c.size) == bytes(content)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    x = Expect()
    x.new("vm1", content=bytes(content))
    x.snapshot(c, "after import")
    x.write(c, 4096, b"changed")
    with pytest.raises(RepositoryError, match="exists"):
        repo.import_chain("vm1", str(src), format=src_fmt)
    repo.close()
    verify(repo_path, x)


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_resize(repo, repo_path, base_fmt):
    """Growing a disk: only the leaf grows; snapshots keep their size; revert keeps the new
    size; a commit merge grows the smaller parent first."""
    x = Expect()
    c = repo.create_chain("vm1", SIZE, base_format=base_fmt, cluster_size=65536)
    x.new("vm1")
    c.resize(SIZE)                                   # same size: nothing to do
    x.write(c, 0, pattern(1, SIZE))
    c.resize(3 * SIZE)                               # the base itself is the leaf
    x.disks["vm1"] += bytes(2 * SIZE)
    assert c.size == 3 * SIZE and c.read(SIZE, SIZE) == bytes(SIZE)
    s1 = x.snapshot(c, "3 MiB")
    x.write(c, 100, b"leaf")
    c.resize(5 * SIZE)
    x.disks["vm1"] += bytes(2 * SIZE)
    x.write(c, 4 * SIZE + 7, pattern(2, 65536))      # past the end of every older volume
    s2 = x.snapshot(c, "5 MiB")
    with c.open_snapshot(s1.id) as img:
        assert img.size == 3 * SIZE
    with c.open_snapshot(s2.id) as img:
        assert img.size == 5 * SIZE
    k = c.clone(s1.id, "old")                        # a clone has the snapshot's size
    assert k.size == 3 * SIZE and k.read(0, k.size) == x.snaps[s1.id]
    x.new("old", content=x.snaps[s1.id])
    k.resize(4 * SIZE)
    x.disks["old"] += bytes(SIZE)
    repo.delete_chain("old")
    del x.disks["old"]
    # s1's volume is the 3 MiB base, its child (s2's volume) 5 MiB with little data: the
    # cheaper merge is a commit into the smaller base, which must grow first.
    r = c.delete_snapshot(s1.id)
    del x.snaps[s1.id]
    assert r.direction == "commit", r
    x.write(c, 2 * SIZE, b"after merge")
    c.revert(s2.id)
    x.disks["vm1"] = bytearray(x.snaps[s2.id])
    assert c.size == 5 * SIZE
    with pytest.raises(engine.errors.UnsupportedFeature, match="shrink"):
        c.resize(SIZE)
    with pytest.raises(InvalidArgument, match="512"):
        c.resize(5 * SIZE + 1)
    c.preview(s2.id)
    with pytest.raises(RepositoryError, match="preview"):
        c.resize(6 * SIZE)
    c.undo_preview()
    repo.close()
    verify(repo_path, x)


def test_readonly_open_beside_a_writer(repo_path, tmp_path):
    """Read-only opens lock nothing and change nothing: several run beside the one writer,
    see what it commits, read snapshots, and are refused every change."""
    with engine.Repository.create(repo_path) as repo:
        c = repo.create_chain("vm1", SIZE, base_format="qcow2")
        c.write(0, pattern(1, 4096))
        s1 = c.snapshot("one")
        c.write(0, pattern(2, 4096))
    w = engine.Repository.open(repo_path)
    with pytest.raises(RepositoryError, match="in use"):
        engine.Repository.open(repo_path)
    r1 = engine.Repository.open(repo_path, readonly=True)
    r2 = engine.Repository.open(repo_path, readonly=True)
    try:
        assert r1.readonly and not w.readonly
        rc = r1.chain("vm1")
        assert rc.read(0, 4096) == pattern(2, 4096)      # nobody holds the leaf yet
        rc.close()
        rc = r1.chain("vm1")
        with rc.open_snapshot(s1.id) as img:
            assert img.read(0, 4096) == pattern(1, 4096)
        wc = w.chain("vm1")
        wc.write(4096, b"w")                               # the writer now holds the leaf
        with pytest.raises(ImageLocked):
            rc.read(0, 10)
        s2 = wc.snapshot("two")                            # committed: readers see it
        assert [s.id for s in r2.chain("vm1").snapshots] == [s1.id, s2.id]
        refused = [lambda: r1.create_chain("x", SIZE), lambda: rc.snapshot("no"),
                   lambda: rc.revert(s1.id), lambda: rc.resize(2 * SIZE),
                   lambda: rc.delete_snapshot(s1.id), lambda: rc.clone(s1.id, "k"),
                   lambda: rc.export(str(tmp_path / "e.raw")), lambda: r1.delete_chain("vm1"),
                   lambda: r1.check(repair=True), lambda: r1.recover(),
                   lambda: r1.import_chain("y", str(tmp_path / "e.raw"), format="raw")]
        for op in refused:
            with pytest.raises(RepositoryError, match="read-only"):
                op()
        w.close()
        with pytest.raises(engine.errors.ReadOnlyImage):
            rc.write(0, b"x")
        assert rc.read(4096, 1) == b"w"
        assert r1.check().ok
    finally:
        w.close()
        r1.close()
        r2.close()
    with engine.Repository.open(repo_path) as repo:       # nothing was left behind
        assert repo.check().ok and repo.chain("vm1").read(4096, 1) == b"w"
        assert repo.recover() == []


def test_import_chain_refusals(repo, tmp_path):
    src = tmp_path / "disk.raw"
    src.write_bytes(bytes(MiB))
    with pytest.raises(InvalidArgument, match="format"):
        repo.import_chain("a", str(src), format="vmdk")
    with pytest.raises(engine.EngineError):
        repo.import_chain("a", str(tmp_path / "missing.raw"), format="raw")
    with pytest.raises(InvalidArgument, match="folder"):
        repo.import_chain("a", str(tmp_path), format="raw")
    odd = tmp_path / "odd.raw"
    odd.write_bytes(bytes(1000))
    with pytest.raises(InvalidArgument, match="512"):
        repo.import_chain("a", str(odd), format="raw")
    with pytest.raises(engine.EngineError, match="magic"):      # raw named as qcow2
        repo.import_chain("a", str(src), format="qcow2")
    q = tmp_path / "busy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(q), "1M")
    with engine.open(str(q)):                                     # a writer holds it
        with pytest.raises(ImageLocked):
            repo.import_chain("a", str(q), format="qcow2")
    assert repo.chains() == []
    assert os.listdir(os.path.join(repo.path, "volumes")) == []


def test_diff(repo):
    cs = 65536
    c = repo.create_chain("vm1", 4 * MiB, base_format="raw", cluster_size=cs)
    c.write(0, pattern(1, MiB))
    s1 = c.snapshot()
    c.write(2 * cs + 10, b"x")             # cluster 2
    c.write_zeroes(5 * cs, 2 * cs)         # clusters 5-6, zero
    s2 = c.snapshot()
    c.write(20 * cs, pattern(3, cs))       # cluster 20 (in the leaf only)
    d = [ch.to_dict() for ch in c.diff(s1.id, s2.id)]
    assert d == [{"start": 2 * cs, "length": cs, "zero": False, "data": True},
                 {"start": 5 * cs, "length": 2 * cs, "zero": True, "data": False}]
    d = c.diff(s1.id)
    assert [(ch.start, ch.length) for ch in d] == [(2 * cs, cs), (5 * cs, 2 * cs), (20 * cs, cs)]
    assert [(ch.start, ch.length) for ch in c.diff(s2.id)] == [(20 * cs, cs)]
    assert c.diff(s2.id, s2.id) == []
    # Symmetric, and across a preview branch (through the common ancestor).
    assert [(ch.start, ch.length) for ch in c.diff(s2.id, s1.id)] == [(2 * cs, cs), (5 * cs, 2 * cs)]
    c.preview(s1.id)
    c.write(30 * cs, b"p")
    assert [(ch.start, ch.length) for ch in c.diff(s2.id)] == [(2 * cs, cs), (5 * cs, 2 * cs),
                                                                (30 * cs, cs)]


# --- deep chains -------------------------------------------------------------------------------

def test_deep_chain_of_200_snapshots(repo, repo_path):
    depth = 200
    cs = 4096
    size = 256 * 4096
    x = Expect()
    c = repo.create_chain("deep", size, base_format="raw", cluster_size=cs)
    x.new("deep", size=size)
    t = time.perf_counter()
    for i in range(depth):
        x.write(c, (i % 256) * cs + (i // 256), bytes([i % 251 + 1]) * 300)
        x.snapshot(c, f"s{i}")
    elapsed = time.perf_counter() - t
    assert len(c.volumes) == depth + 1
    assert c.read(0, size) == bytes(x.disks["deep"])
    snaps = c.snapshots
    for s in (snaps[0], snaps[57], snaps[-1]):
        with c.open_snapshot(s.id) as img:
            assert img.read(0, size) == x.snaps[s.id]
    # Merge a few away from the middle and the ends of the deep chain.
    for s in (snaps[100], snaps[0], snaps[-1]):
        c.delete_snapshot(s.id)
        del x.snaps[s.id]
    assert len(c.volumes) == depth - 2
    repo.close()
    verify(repo_path, x, sample=6)
    assert elapsed < 120, f"200 snapshots took {elapsed:.1f}s"


# --- check -------------------------------------------------------------------------------------

def test_check_finds_and_repairs(repo, repo_path, tmp_path):
    c = repo.create_chain("vm1", SIZE, base_format="qcow2")
    c.write(0, b"a")
    s1 = c.snapshot()
    c.write(0, b"b")
    c.snapshot()
    assert repo.check().problems == []
    vols = c.volumes
    cat = repo._cat
    # The catalog says the leaf's parent is the base; its header says s2's volume.
    cat.update_volume(vols[2].id, parent=vols[0].id)
    cat.update_volume(vols[1].id, legality="ILLEGAL", role="leaf")
    with open(os.path.join(repo_path, "volumes", "stray.qcow2"), "wb") as f:
        f.write(b"junk")
    res = repo.check()
    kinds = sorted(p.kind for p in res.problems)
    assert "backing" in kinds and "illegal" in kinds and "stray-file" in kinds
    assert not res.ok and res.exit_code == 2
    assert any("header says" in p.message for p in res.problems if p.kind == "backing")
    res = repo.check(repair=True)
    assert res.ok and res.exit_code == 0, res.to_dict()
    assert repo.check().problems == []
    assert os.path.exists(os.path.join(repo_path, "lost+found", "stray.qcow2"))
    assert c.volumes[2].parent == vols[1].id
    assert c.read(0, 1) == b"b"
    with c.open_snapshot(s1.id) as img:
        assert img.read(0, 1) == b"a"
    # A missing file cannot be repaired.
    repo.chain("vm1").release_leaf()
    os.rename(vols[1].path, str(tmp_path / "away"))
    res = repo.check(repair=True)
    assert [p.kind for p in res.problems if not p.repaired] == ["missing-file"]
    assert res.exit_code == 2
    os.rename(str(tmp_path / "away"), vols[1].path)
    assert repo.check(chain="vm1").ok


def test_closed_objects_raise(repo_path):
    repo = engine.Repository.create(repo_path)
    c = repo.create_chain("vm1", SIZE)
    c.close()
    with pytest.raises(ImageClosed):
        c.read(0, 1)
    c2 = repo.chain("vm1")
    assert c2 is not c and c2.read(0, 1) == b"\0"
    repo.close()
    repo.close()
    with pytest.raises(ImageClosed):
        c2.read(0, 1)
    with pytest.raises(ImageClosed):
        repo.chains()
    with engine.Repository.open(repo_path) as r:   # the lock was released
        assert r.chain("vm1").size == SIZE


def test_snapshot_id_prefixes(repo):
    c = repo.create_chain("vm1", SIZE)
    s = c.snapshot()
    assert c.get_snapshot(s.id[:4]) == s
    with pytest.raises(NotFound):
        c.get_snapshot("abc")          # too short to be a prefix
    with pytest.raises(NotFound):
        c.revert("ffffffff-0000")
