"""Repository safety: operations refused by a lock leave nothing to recover, read-only
lookups are consistent while a writer works, volumes that are not the files the catalog
recorded are found, damaged chains take no new snapshot, and sizes across a resize."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap

import pytest

import engine
import engine.repository as repository
from engine import catalog as cat_module
import poke
from engine import cli
from engine.errors import (CorruptImage, EngineError, ImageLocked, InvalidArgument, NotFound,
                           VolumeDamaged)
from qemu import convert_to_raw, qemu_img

pytestmark = pytest.mark.qemu

MiB = 1 << 20
CS = 65536


def fill(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


def at_point(monkeypatch, name: str, action) -> list:
    """Run ACTION once when the repository passes the step boundary NAME; returns the list
    that receives what it returned or raised."""
    seen: list = []
    real = repository.journal.kill_point

    def hook(point):
        real(point)
        if point == name and not seen:
            try:
                seen.append(action())
            except EngineError as e:
                seen.append(e)

    monkeypatch.setattr(repository.journal, "kill_point", hook)
    return seen


def nothing_to_recover(repo, chain) -> None:
    assert repo._cat.journal() == []
    assert all(v.legality == "LEGAL" for v in chain.volumes)
    chain.write(0, b"still writable")
    assert repo.recover() == []


# --- locks are taken before the journal entry -----------------------------------------------

@pytest.mark.parametrize("big_lower", [True, False], ids=["commit", "pull"])
def test_delete_snapshot_racing_a_reader_leaves_nothing_to_recover(repo, repo_path,
                                                                   monkeypatch, big_lower):
    """A read-only repository opens the disk just as the merge records its intent: the merge
    already holds what it writes, so the reader is the one refused, and the merge completes;
    a reader that came first refuses the merge with nothing left to recover."""
    c = repo.create_chain("vm1", 2 * MiB, base_format="qcow2")
    c.write(0, fill(1, 16 * CS if big_lower else CS))
    s1 = c.snapshot()
    c.write(0, fill(2, CS if big_lower else 16 * CS))
    s2 = c.snapshot()
    c.write(0, fill(3, 512))
    reader = engine.Repository.open(repo_path, readonly=True)
    try:
        rc = reader.chain("vm1")
        got = at_point(monkeypatch, "delete_snapshot.intent", lambda: rc.read(0, 512))
        r = c.delete_snapshot(s1.id)
        assert r.direction == ("commit" if big_lower else "pull")
        assert len(got) == 1 and isinstance(got[0], ImageLocked), got
        nothing_to_recover(repo, c)
        with rc.open_snapshot(s2.id) as view:            # the reader is there first now
            with pytest.raises(ImageLocked):
                c.delete_snapshot(s2.id)
            nothing_to_recover(repo, c)
            assert view.read(0, CS) == fill(2, CS)
    finally:
        reader.close()
    c.delete_snapshot(s2.id)
    assert c.read(0, 512) == b"still writable" + fill(3, 512 - 14)


def test_resize_racing_a_writer_leaves_nothing_to_recover(repo, monkeypatch):
    """Another program opening the leaf read-write just as a resize records its intent is
    refused (the resize holds the leaf from before its journal entry)."""
    c = repo.create_chain("vm1", MiB, base_format="qcow2")
    c.write(0, b"x")
    leaf = c.leaf.path
    got = at_point(monkeypatch, "resize.intent", lambda: engine.open(leaf))
    c.resize(2 * MiB)
    assert len(got) == 1 and isinstance(got[0], ImageLocked), got
    assert c.size == 2 * MiB
    nothing_to_recover(repo, c)
    c.close()
    c = repo.chain("vm1")
    with engine.open(leaf):                               # a writer that came first
        with pytest.raises(ImageLocked):
            c.resize(3 * MiB)
        assert repo._cat.journal() == []
    nothing_to_recover(repo, c)
    assert c.size == 2 * MiB


def test_delete_snapshot_refused_while_its_own_view_is_open(repo):
    """The pull direction removes the snapshot's own volume: its open_snapshot view refuses
    the merge (ImageLocked), as the docstring says, and nothing is left to recover."""
    c = repo.create_chain("vm1", 2 * MiB, base_format="qcow2")
    c.write(0, fill(1, CS))
    s1 = c.snapshot()
    c.write(0, fill(2, 16 * CS))                          # a big child: the pull is cheaper
    s2 = c.snapshot()
    with c.open_snapshot(s1.id) as view:
        with pytest.raises(ImageLocked):
            c.delete_snapshot(s1.id)
        assert view.read(0, CS) == fill(1, CS)
    nothing_to_recover(repo, c)
    assert [s.id for s in c.snapshots] == [s1.id, s2.id]
    assert c.delete_snapshot(s1.id).direction == "pull"


# --- read-only lookups beside a writer ----------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, engine
    from engine.errors import ImageLocked
    repo = engine.Repository.open(sys.argv[1])
    c = repo.chain("vm1")
    for i in range(int(sys.argv[2])):
        name = "snap-%06d" % i
        c.write(0, name.encode().ljust(64, b"."))
        c.write(65536 * (1 + i % 8), bytes([i % 251 + 1]) * (65536 * (1 + i % 3)))
        c.snapshot(name)
        snaps = c.snapshots
        if len(snaps) > 3:
            victim = snaps[0] if i % 2 else snaps[len(snaps) // 2]
            try:
                c.delete_snapshot(victim.id)
            except ImageLocked:
                # a reader holds it: refused, and nothing is left to recover
                assert repo._cat.journal() == [], repo._cat.journal()
    repo.close()
""")


def test_readonly_lookups_beside_a_writer_deleting_snapshots(repo_path, tmp_path):
    """A read-only repository reads snapshots while another process takes and deletes them:
    every lookup sees one committed state; a snapshot that vanished is NotFound, a volume
    the writer holds is ImageLocked, and what is read is the snapshot's content."""
    with engine.Repository.create(repo_path) as repo:
        repo.create_chain("vm1", 2 * MiB, base_format="qcow2")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(engine.__file__)) + os.pathsep + \
        env.get("PYTHONPATH", "")
    writer = subprocess.Popen([sys.executable, str(script), repo_path, "50"], env=env,
                              stderr=subprocess.PIPE)
    reads = refused = 0
    reader = engine.Repository.open(repo_path, readonly=True)
    try:
        while writer.poll() is None:
            rc = reader.chain("vm1")
            try:
                rc.to_dict()
                snaps = rc.snapshots
            except (NotFound, ImageLocked):
                refused += 1
                continue
            for s in snaps:
                try:
                    with rc.open_snapshot(s.id) as img:
                        assert img.read(0, 64) == s.description.encode().ljust(64, b".")
                    reads += 1
                except (NotFound, ImageLocked):
                    refused += 1
    finally:
        reader.close()
        _, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err.decode()[-3000:]
    assert reads > 0
    with engine.Repository.open(repo_path) as repo:
        assert repo.check().ok


def test_readonly_lookup_is_one_consistent_read(repo, repo_path):
    """A writer commits between the snapshot lookup and the volume lookup of open_snapshot:
    the reader still sees one state (the snapshot and its volume); once the rows are gone,
    the snapshot is NotFound."""
    c = repo.create_chain("vm1", MiB, base_format="qcow2")
    c.write(0, b"one")
    s1 = c.snapshot()
    c.write(0, b"two")
    c.snapshot()
    repo.close()
    reader = engine.Repository.open(repo_path, readonly=True)
    try:
        rc = reader.chain("vm1")
        real = reader._cat.snapshot          # the lookup of a whole id is by key

        def snapshots_then_a_writer_commits(*a):
            rows = real(*a)
            if not done:
                done.append(True)
                w = sqlite3.connect(os.path.join(repo_path, "catalog.db"))
                with w:                      # the catalog commit of a merge of s1 away
                    w.execute("UPDATE volumes SET parent = NULL WHERE parent = ?",
                              (s1.volume,))
                    w.execute("DELETE FROM snapshots WHERE id = ?", (s1.id,))
                    w.execute("DELETE FROM volumes WHERE id = ?", (s1.volume,))
                w.close()
            return rows

        done: list = []
        reader._cat.snapshot = snapshots_then_a_writer_commits
        with rc.open_snapshot(s1.id) as img:
            assert img.read(0, 3) == b"one"
        assert done
        with pytest.raises(NotFound):
            rc.open_snapshot(s1.id)
    finally:
        reader.close()


def test_empty_snapshot_id_is_refused_everywhere(repo, repo_path, capsys):
    c = repo.create_chain("vm1", MiB)
    c.write(0, b"now")
    c.snapshot()
    for op in (lambda: c.open_snapshot(""), lambda: c.revert(""), lambda: c.get_snapshot(""),
               lambda: c.export(os.path.join(repo_path, "..", "x.raw"), snapshot_id=""),
               lambda: c.diff("")):
        with pytest.raises(InvalidArgument, match="snapshot id"):
            op()
    repo.close()
    code = cli.main(["--repo", repo_path, "chain", "read", "vm1", "--length", "3",
                     "--snapshot", ""])
    out = capsys.readouterr()
    assert code == InvalidArgument.exit_code, out
    assert b"now" not in out.out.encode() and "snapshot id" in out.err


# --- volume identity ------------------------------------------------------------------------------

def _raw_chain(repo, size=10 * MiB):
    c = repo.create_chain("vm1", size, base_format="raw")
    c.write(5 * MiB, fill(7, 4096))
    s = c.snapshot("sealed")
    c.write(0, b"leaf")
    base = c.volumes[0]
    assert base.format == "raw"
    return c, s, base


def test_truncated_raw_base_is_found(repo, repo_path, capsys):
    """A raw base cut short by hand: check reports it, reads fail naming the volume (never
    zeros), snapshots are refused, in Python and on the command line."""
    c, s, base = _raw_chain(repo)
    repo.close()
    os.truncate(base.path, 512 * 1024)
    with engine.Repository.open(repo_path) as repo:
        res = repo.check(chain="vm1")
        bad = [p for p in res.problems if p.volume == base.id]
        assert [p.kind for p in bad] == ["identity"] and "shorter" in bad[0].message, bad
        assert not res.ok and res.exit_code == 2
        c = repo.chain("vm1")
        for op in (lambda: c.read(5 * MiB, 4096), lambda: c.open_snapshot(s.id),
                   lambda: c.export(os.path.join(repo_path, "..", "e.raw")),
                   lambda: c.snapshot("on a damaged chain")):
            with pytest.raises(VolumeDamaged) as e:
                op()
            assert e.value.volume == base.id and base.id in str(e.value)
        assert len(c.snapshots) == 1
    assert cli.main(["--repo", repo_path, "chain", "check", "vm1"]) == 2
    out = capsys.readouterr().out
    assert base.id in out and "shorter" in out
    assert cli.main(["--repo", repo_path, "chain", "read", "vm1", "--length", "4"]) == \
        VolumeDamaged.exit_code
    assert base.id in capsys.readouterr().err


def test_replaced_raw_volume_is_found(repo, repo_path):
    """Another file put in place of a sealed raw volume (same size): a new inode is refused at
    open; the same inode with other content is found by check's content stamp."""
    c, s, base = _raw_chain(repo)
    repo.close()
    other = base.path + ".new"
    with open(other, "wb") as f:
        f.truncate(10 * MiB)
    os.replace(other, base.path)
    with engine.Repository.open(repo_path) as repo:
        with pytest.raises(VolumeDamaged, match="not the file the catalog recorded"):
            repo.chain("vm1").read(0, 4)
        res = repo.check(repair=True)
        p = [p for p in res.problems if p.kind == "identity"]
        assert len(p) == 1 and p[0].volume == base.id and not p[0].repaired
    # the recorded inode again, other content (written in place by another program)
    with engine.Repository.create(repo_path + "2") as repo:
        c, s, base = _raw_chain(repo)
    poke.write_bytes(base.path, 0, b"not what was sealed")
    with engine.Repository.open(repo_path + "2") as repo:
        assert repo.chain("vm1").read(0, 4) == b"leaf"        # open compares size and inode
        p = [p for p in repo.check().problems if p.kind == "identity"]
        assert len(p) == 1 and p[0].volume == base.id and "content stamp" in p[0].message
        with pytest.raises(VolumeDamaged, match="found damaged by check"):
            repo.chain("vm1").snapshot()


def test_copied_repository_is_accepted_after_check(repo, repo_path, tmp_path):
    """A copy of the repository has new inodes: reads are refused until a check with repair
    has compared the content stamps and recorded the new files."""
    c, s, base = _raw_chain(repo)
    repo.close()
    copy = str(tmp_path / "copy")
    shutil.copytree(repo_path, copy)
    with engine.Repository.open(copy) as repo:
        c = repo.chain("vm1")
        with pytest.raises(VolumeDamaged, match="--repair|repair=True"):
            c.read(0, 4)
        res = repo.check(repair=True)
        assert res.ok and [p.kind for p in res.problems] == ["identity"], res.problems
        assert c.read(0, 4) == b"leaf" and c.read(5 * MiB, 4) == fill(7, 4)
        assert repo.check().problems == []


def test_sealed_qcow2_volume_truncated_below_its_data(repo, repo_path):
    """A truncated qcow2 volume is the image layer's to find: reads raise, never zeros."""
    c = repo.create_chain("vm1", 4 * MiB, base_format="qcow2")
    c.write(0, fill(9, 2 * MiB))
    c.snapshot()
    base = c.volumes[0]
    repo.close()
    os.truncate(base.path, os.path.getsize(base.path) // 2)
    with engine.Repository.open(repo_path) as repo:
        c = repo.chain("vm1")
        with pytest.raises(EngineError) as e:
            data = c.read(0, 2 * MiB)
            assert data == fill(9, 2 * MiB)                  # unreachable: never zeros
        assert isinstance(e.value, CorruptImage), e.value
        res = repo.check(chain="vm1")
        assert any(p.volume == base.id and p.kind in ("image", "unreadable")
                   for p in res.problems), res.problems
        with pytest.raises(VolumeDamaged):
            c.snapshot()


def _downgrade_to_v1(path: str) -> None:
    """Make the catalog what cowchain with schema version 1 wrote."""
    poke.downgrade_catalog_to_v1(os.path.join(path, "catalog.db"))


def test_older_catalog_is_migrated(repo, repo_path):
    """A version 1 catalog: read-only opens read it as it is; a read-write open adds the new
    columns and records every volume's size and identity from the files."""
    c, s, base = _raw_chain(repo)
    q = repo.create_chain("vm2", 3 * MiB, base_format="qcow2")
    q.snapshot()
    repo.close()
    _downgrade_to_v1(repo_path)
    with engine.Repository.open(repo_path, readonly=True) as ro:
        assert ro.chain("vm1").read(0, 4) == b"leaf" and ro.check().ok
    with engine.Repository.open(repo_path) as repo:
        assert repo._cat.version == cat_module.SCHEMA_VERSION
        rows = repo._cat.volumes()
        assert all(r.size is not None for r in rows.values())
        b = rows[base.id]
        assert (b.size, b.ino) == (10 * MiB, os.stat(base.path).st_ino) and b.stamp
        assert rows[repo.chain("vm2").leaf.id].size == 3 * MiB
        assert repo.check().problems == []
    os.truncate(base.path, MiB)
    with engine.Repository.open(repo_path) as repo:
        with pytest.raises(VolumeDamaged):
            repo.chain("vm1").read(0, 4)


# --- no snapshot on a damaged chain ---------------------------------------------------------------

def test_snapshot_refused_on_a_corrupt_leaf(repo, repo_path, capsys):
    """The QCOW2 corrupt bit on the leaf: the snapshot is refused naming the leaf, with the
    repair to run; force takes it anyway; on the command line likewise (--force)."""
    c = repo.create_chain("vm1", MiB, base_format="qcow2")
    c.write(0, b"data")
    leaf = c.leaf
    c.close()
    poke.set(leaf.path, "incompatible_features",
             poke.get(leaf.path, "incompatible_features") | 2)
    c = repo.chain("vm1")
    with pytest.raises(VolumeDamaged, match="corrupt") as e:
        c.snapshot()
    assert e.value.volume == leaf.id and "check(repair=True" in e.value.hint
    assert "cowchain chain check vm1 --repair" in e.value.cli_hint
    assert c.snapshots == [] and repo._cat.journal() == []
    assert sorted(os.listdir(os.path.join(repo_path, "volumes"))) == \
        [os.path.basename(leaf.path)]
    repo.close()
    assert cli.main(["--repo", repo_path, "chain", "snapshot", "vm1"]) == \
        VolumeDamaged.exit_code
    assert leaf.id in capsys.readouterr().err
    assert cli.main(["--repo", repo_path, "chain", "snapshot", "vm1", "--force"]) == 0
    with engine.Repository.open(repo_path) as repo:
        c = repo.chain("vm1")
        assert len(c.snapshots) == 1 and c.read(0, 4) == b"data"


def test_snapshot_refused_after_check_found_damage(repo, repo_path):
    """A leaf whose image check finds corruption (no corrupt bit): check records it, and the
    chain takes no snapshot until a check with repair finds it clean again."""
    c = repo.create_chain("vm1", MiB, base_format="qcow2")
    c.write(0, fill(5, CS))
    leaf = c.leaf
    c.close()
    refblock = poke.read_be(leaf.path, poke.reftable_entry_offset(leaf.path, 0), 8)
    poke.write_be(leaf.path, refblock, 2, 0)             # the header cluster's refcount
    res = repo.check()
    assert any(p.kind == "image" and p.volume == leaf.id for p in res.problems)
    c = repo.chain("vm1")
    with pytest.raises(VolumeDamaged, match="found damaged by check") as e:
        c.snapshot()
    assert e.value.volume == leaf.id
    assert repo.check(repair=True).ok
    s = c.snapshot()
    assert c.snapshots == [s] and c.read(0, CS) == fill(5, CS)


def test_snapshot_refused_on_an_illegal_volume(repo):
    c = repo.create_chain("vm1", MiB, base_format="qcow2")
    s1 = c.snapshot()
    base = c.volumes[0]
    with repo._cat.transaction():
        repo._cat.update_volume(base.id, legality="ILLEGAL")
    with pytest.raises(VolumeDamaged, match="ILLEGAL") as e:
        c.snapshot()
    assert e.value.volume == base.id
    s2 = c.snapshot(force=True)
    assert [s.id for s in c.snapshots] == [s1.id, s2.id]


# --- sizes across a resize ------------------------------------------------------------------------

@pytest.fixture
def resized(repo):
    """vm1: 1 MiB at s1, grown to 3 MiB with data past 1 MiB at s2, the leaf on top."""
    c = repo.create_chain("vm1", MiB, base_format="raw")
    c.write(0, fill(1, CS))
    s1 = c.snapshot("1 MiB")
    c.resize(3 * MiB)
    c.write(2 * MiB, fill(2, CS))
    s2 = c.snapshot("3 MiB")
    c.write(0, fill(3, 512))
    return c, s1, s2


def test_export_of_a_snapshot_reports_its_own_size(resized, tmp_path, capsys):
    c, s1, s2 = resized
    r = c.export(str(tmp_path / "s1.qcow2"), format="qcow2", snapshot_id=s1.id)
    assert r.size == MiB == qemu_img_size(r.path)
    assert c.export(str(tmp_path / "s2.raw"), snapshot_id=s2.id).size == 3 * MiB
    assert c.export(str(tmp_path / "now.raw")).size == 3 * MiB
    path = c.repository.path
    c.repository.close()
    assert cli.main(["--repo", path, "--output", "json", "chain", "export", "vm1",
                     str(tmp_path / "cli.raw"), "--snapshot", s1.id]) == 0
    import json
    assert json.loads(capsys.readouterr().out)["virtual-size"] == MiB


def qemu_img_size(path) -> int:
    import json
    return json.loads(qemu_img("info", "-U", "--output=json", path).stdout)["virtual-size"]


def test_diff_across_a_resize(resized):
    c, s1, s2 = resized
    fwd = c.diff(s1.id, s2.id)
    assert (fwd.from_size, fwd.to_size, fwd.size_changed) == (MiB, 3 * MiB, True)
    assert [(ch.start, ch.length, ch.zero, ch.data) for ch in fwd] == \
        [(2 * MiB, CS, False, True)]
    back = c.diff(s2.id, s1.id)
    assert (back.from_size, back.to_size) == (3 * MiB, MiB)
    assert [(ch.start, ch.length, ch.zero) for ch in back] == [(2 * MiB, CS, True)]
    now = c.diff(s2.id)
    assert (now.from_size, now.to_size, now.size_changed) == (3 * MiB, 3 * MiB, False)
    assert [(ch.start, ch.length) for ch in now] == [(0, CS)]
    same = c.diff(s1.id, s1.id)
    assert same == [] and same.to_dict() == {"from-size": MiB, "to-size": MiB, "changes": []}


def test_revert_and_preview_restore_the_snapshot_size(resized):
    """Revert (and preview) to a snapshot taken before a resize give the disk that size
    again; undo_preview gives back the size of the leaf kept aside."""
    c, s1, s2 = resized
    repo = c.repository
    c.preview(s1.id)
    assert c.size == MiB and c.read(0, MiB) == fill(1, CS) + bytes(MiB - CS)
    with pytest.raises(InvalidArgument):
        c.read(MiB, 1)
    c.undo_preview()
    assert c.size == 3 * MiB and c.read(2 * MiB, CS) == fill(2, CS)
    c.revert(s1.id)
    assert c.size == MiB and c.leaf.path.endswith(".qcow2")
    assert c.read(0, MiB) == fill(1, CS) + bytes(MiB - CS)
    c.close()
    c = repo.chain("vm1")
    assert qemu_img_size(c.leaf.path) == MiB
    assert convert_to_raw(c.leaf.path, "qcow2") == fill(1, CS) + bytes(MiB - CS)
    assert [s.id for s in c.snapshots] == [s1.id]
    assert repo.check().problems == []
    c.resize(2 * MiB)                                    # and it grows again from there
    assert c.size == 2 * MiB and repo.check().problems == []
