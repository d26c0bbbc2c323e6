"""What a metadata operation touches: a snapshot opens the leaf and the new overlay only,
whatever the chain's depth; no operation reads a whole catalog table; the roles kept
incrementally are those the rule gives over the whole repository.  (Counts, never times.)"""

from __future__ import annotations

import os
import re
import sqlite3

import pytest

import engine
from engine.errors import InvalidArgument
from engine.image import chain as image_chain
from engine.image import files as image_files
from engine.image import image as image_image
from engine.repository import graph

MiB = 1 << 20


@pytest.fixture
def repo(tmp_path):
    r = engine.Repository.create(str(tmp_path / "repo"))
    yield r
    r.close()


def _count_opens(monkeypatch) -> list[str]:
    """The files opened from now on (each image file opened, by path)."""
    opened: list[str] = []
    real = image_chain._open_one

    def counting(image_cls, path, *args, **kwargs):
        opened.append(path)
        return real(image_cls, path, *args, **kwargs)

    monkeypatch.setattr(image_chain, "_open_one", counting)
    if hasattr(image_image, "_open_one"):
        monkeypatch.setattr(image_image, "_open_one", counting)
    return opened


def _count_calls(monkeypatch, owner, name: str, *also) -> list[object]:
    """The calls of OWNER.NAME from now on (also where the modules ALSO imported it)."""
    calls: list[object] = []
    real = getattr(owner, name)

    def counting(*args, **kwargs):
        calls.append(args[:1])
        return real(*args, **kwargs)

    for o in (owner, *also):
        if hasattr(o, name):
            monkeypatch.setattr(o, name, counting)
    return calls


@pytest.mark.parametrize("base_format", ["qcow2", "raw"])
def test_snapshot_opens_one_file_whatever_the_depth(repo, monkeypatch, base_format):
    """The open chain is reused: the old leaf turns read-only in place and the new overlay
    is stacked on it; no other file of the chain is opened again, the new one is not read
    back, and no walk of the chain is made."""
    c = repo.create_chain("vm", MiB, base_format=base_format)
    c.write(0, b"a" * 4096)
    for i in range(12):
        c.snapshot()
        c.write(4096 * (i + 1), bytes([i + 1]) * 4096)
    opened = _count_opens(monkeypatch)
    heads = _count_calls(monkeypatch, image_files, "_read_head", image_chain, image_image)
    walks = _count_calls(monkeypatch, image_image.Image, "chain")
    s = c.snapshot("deep")
    assert opened == [c.leaf.path]
    assert walks == [] and heads == []
    # the stacked chain reads and writes as a chain opened from its files does
    c.write(0, b"z" * 10)
    assert c.read(0, 12) == b"z" * 10 + b"aa"
    assert all(c.read(4096 * (i + 1), 4) == bytes([i + 1]) * 4 for i in range(12))
    c.release_leaf()
    assert c.read(0, 12) == b"z" * 10 + b"aa"
    with c.open_snapshot(s.id) as view:
        assert view.read(0, 4) == b"aaaa"
    assert repo.check().problems == []


def test_snapshot_of_a_chain_not_open_opens_it_read_only_once(repo, monkeypatch):
    c = repo.create_chain("vm", MiB, base_format="qcow2")
    for _ in range(5):
        c.snapshot()
    c.release_leaf()
    opened = _count_opens(monkeypatch)
    c.snapshot()
    assert len(opened) == 6 + 1           # the chain once (read-only), then the overlay
    opened.clear()
    c.snapshot()
    assert len(opened) == 1


@pytest.mark.parametrize("op", ["revert", "preview"])
def test_revert_and_preview_open_only_the_new_leaf(repo, monkeypatch, op):
    """The chain's open handle is cut at the snapshot's volume (the volumes above it are
    closed) and the new leaf is stacked there: one file is opened, whatever the depth."""
    c = repo.create_chain("vm", MiB, base_format="qcow2")
    snaps = []
    for i in range(10):
        c.write(0, bytes([i + 1]) * 8)
        snaps.append(c.snapshot())
    c.write(0, b"leaf")
    c.read(0, 4)
    opened = _count_opens(monkeypatch)
    getattr(c, op)(snaps[3].id)
    assert len(opened) == 1 and opened[0] == c.leaf.path
    assert c.read(0, 8) == bytes([4]) * 8
    if op == "preview":
        c.undo_preview()
        assert c.read(0, 8) == b"leaf" + bytes([10]) * 4
    assert repo.check().problems == []


_WHOLE_TABLE = re.compile(r"\bSCAN (volumes|chains|snapshots|v|c|s)\b(?! USING)")


def _whole_table_reads(repo, fn) -> list[str]:
    """The catalog statements FN runs whose query plan scans a whole table."""
    db = repo._cat._db
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    try:
        fn()
    finally:
        db.set_trace_callback(None)
    probe = sqlite3.connect(os.path.join(repo.path, "catalog.db"))
    bad = []
    try:
        for sql in statements:
            if not sql.lstrip().upper().startswith(("SELECT", "WITH")):
                continue
            plan = " | ".join(r[-1] for r in probe.execute("EXPLAIN QUERY PLAN " + sql))
            if _WHOLE_TABLE.search(plan):
                bad.append(f"{sql}  ->  {plan}")
    finally:
        probe.close()
    return bad


def _repository_with_clones(repo):
    c = repo.create_chain("vm", MiB, base_format="qcow2")
    snaps = [c.snapshot(str(i)) for i in range(4)]
    other = repo.create_chain("other", MiB)
    other.snapshot()
    k = c.clone(snaps[1].id, "k1")
    k.snapshot()
    return c, snaps


@pytest.mark.parametrize("op", ["snapshot", "revert", "preview", "undo_preview",
                                "commit_preview", "clone", "delete_clone", "delete_chain",
                                "open_read", "volumes"])
def test_metadata_operations_read_no_whole_table(repo, op):
    """Every catalog read of the operation is keyed (an index or a primary key): its cost
    does not grow with the repository's size."""
    c, snaps = _repository_with_clones(repo)
    c.read(0, 4)
    if op in ("undo_preview", "commit_preview"):
        c.preview(snaps[1].id)
    run = {
        "snapshot": lambda: c.snapshot(),
        "revert": lambda: c.revert(snaps[2].id),
        "preview": lambda: c.preview(snaps[0].id),
        "undo_preview": lambda: c.undo_preview(),
        "commit_preview": lambda: c.commit_preview(),
        "clone": lambda: c.clone(snaps[3].id, "k2"),
        "delete_clone": lambda: repo.delete_chain("k1"),
        "delete_chain": lambda: repo.delete_chain("other"),
        "open_read": lambda: repo.chain("vm").read(0, 4),
        "volumes": lambda: repo.chain("vm").volumes,
    }[op]
    assert _whole_table_reads(repo, run) == []
    assert repo.check().problems == []


def test_an_open_reads_no_whole_table(tmp_path):
    """Opening a repository reads the journal and the unrecorded volumes by index."""
    with engine.Repository.create(str(tmp_path / "r")) as r:
        r.create_chain("vm", MiB).snapshot()
    db = sqlite3.connect(str(tmp_path / "r" / "catalog.db"))
    try:
        for query in ("SELECT * FROM volumes WHERE size IS NULL",
                      "SELECT * FROM volumes WHERE legality != 'LEGAL' OR damaged IS NOT NULL"):
            plan = " | ".join(r[-1] for r in db.execute("EXPLAIN QUERY PLAN " + query))
            assert not _WHOLE_TABLE.search(plan), plan
    finally:
        db.close()


def _assert_roles_exact(repo) -> None:
    cat = repo._cat
    vols = cat.volumes()
    want = graph.roles(vols, cat.chains())
    assert {v: r.role for v, r in vols.items()} == want


def test_roles_kept_incrementally_are_the_rule_over_the_whole_repository(repo):
    c, snaps = _repository_with_clones(repo)
    _assert_roles_exact(repo)
    steps = [
        lambda: c.clone(snaps[0].id, "k2"),
        lambda: c.preview(snaps[2].id),
        lambda: c.write(0, b"p"),
        lambda: c.clone(snaps[2].id, "k3"),
        lambda: c.undo_preview(),
        lambda: c.preview(snaps[3].id),
        lambda: c.commit_preview(),
        lambda: c.revert(snaps[1].id),
        lambda: repo.delete_chain("k1"),
        lambda: c.snapshot(),
        lambda: repo.delete_chain("k3"),
        lambda: c.delete_snapshot(c.snapshots[-1].id),
        lambda: repo.delete_chain("k2"),
        lambda: c.revert(snaps[0].id),
    ]
    for step in steps:
        step()
        _assert_roles_exact(repo)
        assert repo.check().problems == []


def test_stacking_on_an_open_image(tmp_path):
    """``create(backing_image=)`` and ``Image.reopen_readonly``: the chain is handed over,
    not opened again, and reads as the same chain opened from its files."""
    base = str(tmp_path / "base.qcow2")
    mid = str(tmp_path / "mid.qcow2")
    top = str(tmp_path / "top.qcow2")
    img = engine.create(base, MiB)
    img.write(0, b"b" * 8)
    below = img.reopen_readonly()
    assert below is img and below.readonly and below.read(0, 8) == b"b" * 8
    img = engine.create(mid, None, backing="base.qcow2", backing_format="qcow2",
                        backing_image=below)
    img.write(2, b"m")
    img = engine.create(top, None, backing="mid.qcow2", backing_format="qcow2",
                        backing_image=img.reopen_readonly())
    assert [i.path for i in img.chain()] == [top, mid, base]
    img.write(4, b"t")
    assert img.read(0, 8) == b"bbmbtbbb"
    img.close()
    with engine.open(top, readonly=True) as again:
        assert again.read(0, 8) == b"bbmbtbbb"
        assert again.check().corruptions == 0


def test_backing_image_must_be_the_named_file_open_read_only(tmp_path):
    base = str(tmp_path / "base.qcow2")
    other = str(tmp_path / "other.qcow2")
    engine.create(other, MiB).close()
    with engine.create(base, MiB) as rw:
        with pytest.raises(InvalidArgument, match="read-only"):
            engine.create(str(tmp_path / "a.qcow2"), None, backing="base.qcow2",
                          backing_format="qcow2", backing_image=rw)
    with engine.open(other, readonly=True) as ro:
        with pytest.raises(InvalidArgument, match="not the file"):
            engine.create(str(tmp_path / "b.qcow2"), None, backing="base.qcow2",
                          backing_format="qcow2", backing_image=ro)
        with pytest.raises(InvalidArgument, match="backing file name"):
            engine.create(str(tmp_path / "c.qcow2"), MiB, backing_image=ro)
    assert sorted(os.listdir(tmp_path)) == ["base.qcow2", "other.qcow2"]


def test_close_above_keeps_the_chain_under_a_file(tmp_path):
    names = [str(tmp_path / f"v{i}.qcow2") for i in range(4)]
    img = engine.create(names[0], MiB)
    img.write(0, b"0")
    for i in range(1, 4):
        img = engine.create(names[i], None, backing=os.path.basename(names[i - 1]),
                            backing_format="qcow2", backing_image=img.reopen_readonly())
        img.write(i, str(i).encode())
    chain = img.chain()
    kept = img.close_above(names[1])
    assert kept is chain[2] and all(i.closed for i in chain[:2])
    assert not kept.closed and kept.read(0, 4) == b"01\0\0"
    assert kept.close_above(names[3]) is None and kept.closed and chain[3].closed


def test_delete_snapshot_keeps_roles_exact_in_both_directions(repo):
    """A merge recomputes roles over the merged volume (commit) or the child's new parent
    (pull) only; the result is the rule over the whole repository, clones included."""
    c = repo.create_chain("m", 8 << 20, base_format="qcow2")
    for i in range(4):
        c.write(0, bytes([i + 1]) * ((4 << 20) if i % 2 == 0 else 4096))
        s = c.snapshot()
        if i == 0:
            c.clone(s.id, "mk")               # a clone reads through the lowest volume
    seen = []
    for under, over in ((4 << 20, 4096), (4096, 6 << 20), (4 << 20, 4096)):
        # the newest snapshot: its child is the leaf (a commit makes the snapshot's volume
        # the leaf); the one above the clone's: two inner volumes
        c.write(0, b"U" * under)
        newest = c.snapshot()
        c.write(0, b"O" * over)
        for sid in (newest.id, c.snapshots[1].id):
            seen.append(c.delete_snapshot(sid).direction)
            _assert_roles_exact(repo)
            assert repo.check().problems == []
    assert seen[0] == "commit" and seen[2] == "pull", seen


def test_new_files_are_laid_out_from_a_template(tmp_path, monkeypatch):
    """Files made with the same options and backing names of the same length are laid out
    once: the others are the template with the name's bytes changed, byte for byte what the
    layout gives (and a size equal to a valid one but of another type is still refused)."""
    from engine import format as fmt
    from engine.image import api
    real = fmt.new_image_layout
    monkeypatch.setattr(api, "_LAYOUTS", {})
    laid = _count_calls(monkeypatch, fmt, "new_image_layout")
    for name in ("b1.qcow2", "b2.qcow2", "b3.qcow2", "base10.qcow2"):
        engine.create(str(tmp_path / name), MiB).close()
    laid.clear()
    for i, name in enumerate(("b1.qcow2", "b2.qcow2", "b3.qcow2", "base10.qcow2")):
        path = str(tmp_path / f"o{i}.qcow2")
        with engine.create(path, None, backing=name, backing_format="qcow2") as img:
            want_h, want = real(MiB, backing_file=name, backing_format="qcow2")
            assert img.header == want_h
        with open(path, "rb") as f:
            assert f.read() == want
    assert len(laid) == 2                   # one per length of backing name
    with pytest.raises(InvalidArgument):
        engine.create(str(tmp_path / "x.qcow2"), MiB, refcount_bits=16.0)


def test_reopen_readonly_turns_lock_and_header_to_a_readers(tmp_path):
    """In place: the image takes a reader's lock bytes (another reader may open the file, a
    writer may not) and its header shows the refcount table the writes grew."""
    path = str(tmp_path / "a.qcow2")
    img = engine.create(path, 64 * MiB, cluster_size=512)
    before = img.header
    img.write(0, b"x" * (16 * MiB))          # 512-byte clusters: the reftable grows
    ro = img.reopen_readonly()
    assert ro is img and ro.readonly and ro.read(0, 3) == b"xxx"
    with open(path, "rb") as f:
        head = f.read(4096)
    on_disk = engine.format.parse_header(head, os.path.getsize(path))
    assert on_disk.refcount_table_clusters > before.refcount_table_clusters
    assert ro.header == on_disk
    with engine.open(path, readonly=True) as other:
        assert other.read(0, 3) == b"xxx"
    with pytest.raises(engine.errors.ImageLocked):
        engine.open(path)
    ro.close()


def _mapped(path: str) -> int:
    """Bytes of this process's address space mapping PATH."""
    total = 0
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip("\n").endswith(" " + path):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                total += hi - lo
    return total


def test_reopen_readonly_gives_back_the_address_space_kept_for_growth(tmp_path):
    """A leaf maps room to grow (more than its disk's size); turned read-only it maps its
    file alone, as a read-only open does: a deep chain of large disks fits in memory."""
    path = str(tmp_path / "big.qcow2")
    img = engine.create(path, 1 << 40)
    img.write(0, b"x" * 4096)
    assert _mapped(path) > 1 << 40
    img.reopen_readonly()
    assert 0 < _mapped(path) <= -(-os.path.getsize(path) // 4096) * 4096
    assert img.read(0, 2) == b"xx"
    img.close()


def test_a_deep_chain_of_a_large_disk_fits_in_the_address_space(repo):
    """Each leaf maps more than its disk's size to grow into; the former leaves give it back
    whole, so hundreds of snapshots of a 1 TiB disk do not use up the address space (a
    mapping cut short, not made anew, split it: the 200th snapshot failed)."""
    c = repo.create_chain("big", 1 << 40, base_format="qcow2")
    c.write(0, b"x" * 512)
    for _ in range(260):
        c.snapshot()
    c.write(512, b"y")
    assert c.read(0, 513) == b"x" * 512 + b"y"
