"""Unit tests of the repository package's rooms: ``journaled`` (the skeleton of every
journaled operation) and ``graph`` (ancestry, users and roles on hand-built catalogs)."""

import os

import pytest

from engine import RepositoryError
from engine.catalog import ChainRow, VolumeRow
from engine.errors import ChainError
from engine.repository import Repository, graph, journal


# --- journaled ---------------------------------------------------------------------------------

class FakeImage:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


@pytest.fixture
def repo(tmp_path):
    r = Repository.create(tmp_path / "repo")
    yield r
    r.close()


@pytest.fixture
def points(monkeypatch):
    """The kill points passed, in order."""
    seen: list[str] = []
    real = journal.kill_point

    def record(name):
        seen.append(name)
        real(name)

    monkeypatch.setattr(journal, "kill_point", record)
    return seen


def make_file(repo, rel: str) -> str:
    path = os.path.join(repo.path, rel)
    with open(path, "wb") as f:
        f.write(b"x")
    return path


def test_journaled_error_closes_held_images_rolls_back_and_reraises(repo, points):
    ctx = repo._ctx
    rel = "volumes/unit-a.qcow2"
    img = FakeImage()
    with pytest.raises(ValueError, match="boom"):
        with journal.journaled(ctx, "snapshot", "vm", {"created": [rel]}) as j:
            path = make_file(repo, rel)
            j.hold(img)
            assert [r.op for r in repo._cat.journal()] == ["snapshot"]
            j.step("created")
            raise ValueError("boom")
    assert img.closed                          # the image it made is closed
    assert not os.path.exists(path)            # what it created is removed (rolled back)
    assert repo._cat.journal() == []           # and nothing is left to recover
    assert points == ["snapshot.intent", "snapshot.created"]   # no committed point
    assert ctx.blocked == {}


def test_journaled_success_passes_its_points_and_removes_after_commit(repo, points):
    ctx = repo._ctx
    gone = make_file(repo, "volumes/unit-old.raw")
    with journal.journaled(ctx, "revert", "vm", {"created": []}) as j:
        j.step("created")
        j.remove = ["volumes/unit-old.raw"]
        with repo._cat.transaction():
            repo._cat.journal_commit(j.jid, {"remove": j.remove})
    assert not os.path.exists(gone)
    assert repo._cat.journal() == []
    assert points == ["revert.intent", "revert.created", "revert.committed", "revert.removed"]


def test_journaled_hands_the_new_leaf_to_its_chain_before_the_committed_point(repo, points,
                                                                              monkeypatch):
    chain = repo.create_chain("vm", 1 << 20)
    chain.release_leaf()
    img = FakeImage()
    adopted = []
    monkeypatch.setattr(type(chain), "adopt_leaf",
                        lambda self, i: adopted.append((self, i, list(points))))
    points.clear()
    with journal.journaled(repo._ctx, "preview", "vm", {"created": []}) as j:
        j.hold(img)
        with repo._cat.transaction():
            repo._cat.journal_end(j.jid)
        j.leaf_of("vm", img)
    assert adopted == [(chain, img, ["preview.intent"])]
    assert points == ["preview.intent", "preview.committed"]
    assert not img.closed


def test_journaled_committed_none_passes_no_committed_point(repo, points):
    with journal.journaled(repo._ctx, "export", "vm", {"tmp_files": []}, committed=None) as j:
        j.step("written")
        repo._cat.journal_end(j.jid)
    assert points == ["export.intent", "export.written"]


def test_journaled_error_in_a_roll_forward_op_blocks_the_chain(repo, points):
    ctx = repo._ctx
    with pytest.raises(ValueError):
        with journal.journaled(ctx, "delete_snapshot", "vm", {}) as j:
            j.step("copied")
            raise ValueError("interrupted merge")
    # a merge is not undone: it stays in the journal, recorded at its step, for recovery
    [row] = repo._cat.journal()
    assert (row.op, row.step) == ("delete_snapshot", "copied")
    assert ctx.blocked == {"vm": "delete_snapshot"}
    with pytest.raises(RepositoryError, match="interrupted delete_snapshot"):
        ctx.check_not_blocked("vm")
    repo._cat.journal_end(row.id)
    assert points == ["delete_snapshot.intent", "delete_snapshot.copied"]


def test_journaled_refused_by_a_read_only_repository_records_nothing(tmp_path, points):
    Repository.create(tmp_path / "r").close()
    with Repository.open(tmp_path / "r", readonly=True) as ro:
        with pytest.raises(RepositoryError, match="read-only"):
            with journal.journaled(ro._ctx, "snapshot", "vm", {"created": []}):
                raise AssertionError("not reached")
        assert ro._cat.journal() == []
    assert points == []


# --- graph -------------------------------------------------------------------------------------

def vol(vid, chain, parent=None, role="?"):
    return VolumeRow(vid, chain, f"volumes/{vid}", "qcow2", role, parent, "LEGAL", "")


def chain_row(name, leaf, saved_leaf=None):
    return ChainRow(name, 1 << 20, 65536, "", leaf, saved_leaf=saved_leaf)


def catalog(*rows):
    return {v.id: v for v in rows}


def test_graph_one_chain():
    vols = catalog(vol("b", "a"), vol("s", "a", "b"), vol("l", "a", "s"))
    chains = [chain_row("a", "l")]
    assert [v.id for v in graph.ancestry(vols, "l")] == ["l", "s", "b"]
    assert [v.id for v in graph.ancestry(vols, "b")] == ["b"]
    assert graph.ancestry(vols, None) == []
    assert graph.volume_users(vols, chains) == {"l": {"a"}, "s": {"a"}, "b": {"a"}}
    assert graph.roles(vols, chains) == {"b": "base", "s": "internal", "l": "leaf"}


def test_graph_clone_shares_the_volumes_under_it():
    # chain a: b <- s <- l ; clone c: leaf k on a's volume s
    vols = catalog(vol("b", "a"), vol("s", "a", "b"), vol("l", "a", "s"), vol("k", "c", "s"))
    chains = [chain_row("a", "l"), chain_row("c", "k")]
    assert graph.volume_users(vols, chains) == {"l": {"a"}, "k": {"c"}, "s": {"a", "c"},
                                                "b": {"a", "c"}}
    assert graph.roles(vols, chains) == {"b": "shared", "s": "shared", "l": "leaf",
                                         "k": "leaf"}


def test_graph_preview_keeps_the_saved_leaf_in_use():
    # previewing snapshot volume b: new leaf p on b, the old leaf l kept aside
    vols = catalog(vol("b", "a"), vol("l", "a", "b"), vol("p", "a", "b"))
    chains = [chain_row("a", "p", saved_leaf="l")]
    assert graph.volume_users(vols, chains) == {"p": {"a"}, "l": {"a"}, "b": {"a"}}
    assert graph.roles(vols, chains) == {"b": "base", "l": "leaf", "p": "leaf"}


def test_graph_volume_no_chain_reads_is_not_used():
    vols = catalog(vol("b", "a"), vol("l", "a", "b"), vol("orphan", "a", "b"))
    assert "orphan" not in graph.volume_users(vols, [chain_row("a", "l")])


def test_graph_ancestry_refuses_loops_and_missing_volumes():
    loop = catalog(vol("x", "a", "y"), vol("y", "a", "x"))
    with pytest.raises(ChainError, match="loop at volume x"):
        graph.ancestry(loop, "x")
    missing = catalog(vol("l", "a", "gone"))
    with pytest.raises(RepositoryError, match="volume gone is missing from the catalog"):
        graph.ancestry(missing, "l")


# --- the catalog interface -------------------------------------------------------------------

def protocol_members() -> set[str]:
    from engine.repository.catalog_api import CatalogStore

    return {n for n in vars(CatalogStore) if not n.startswith("_")} | \
        set(CatalogStore.__annotations__)


@pytest.mark.parametrize("impl", ["engine.catalog:Catalog", "engine.catalog_pg:PgCatalog"])
def test_each_catalog_implements_the_catalog_interface(impl):
    import importlib
    import inspect

    from engine.repository.catalog_api import CatalogStore

    module, name = impl.split(":")
    cls = getattr(importlib.import_module(module), name)
    for name in protocol_members() - set(CatalogStore.__annotations__):     # the methods
        want = inspect.signature(getattr(CatalogStore, name))
        have = inspect.signature(getattr(cls, name))
        assert list(want.parameters) == list(have.parameters), name


def test_the_repository_reaches_the_catalog_only_through_the_interface():
    """Every catalog call in the repository package is a member of CatalogStore, so a
    second implementation needs nothing more."""
    import re

    import engine.repository

    folder = os.path.dirname(engine.repository.__file__)
    used = set()
    for name in os.listdir(folder):
        if name.endswith(".py") and name != "catalog_api.py":
            with open(os.path.join(folder, name)) as f:
                used |= set(re.findall(r"(?:\b|_)cat\.([a-z_]+)\b", f.read()))
    assert used, "the pattern finds the catalog calls"
    assert used <= protocol_members(), used - protocol_members()


# --- delete_snapshot: one open of each volume, one extents pass ----------------------------

@pytest.mark.parametrize("base_format", ["raw", "qcow2"])
@pytest.mark.parametrize("big_lower,expected", [(True, "commit"), (False, "pull")])
def test_delete_snapshot_opens_each_volume_once_and_reads_extents_once(
        repo, monkeypatch, base_format, big_lower, expected):
    """A 3-volume chain (base, the snapshot's volume, the leaf): the merge that deletes the
    middle snapshot opens each volume file once (to plan, hold and copy) and asks each of
    the two merged volumes for its extents once (the plan that picks the direction is the
    one the copy runs), in both directions."""
    from engine import image

    size, cl = 1 << 20, 4096
    c = repo.create_chain("vm", size, base_format=base_format, cluster_size=cl)
    c.write(0, b"\x01" * (size // 2))
    c.snapshot()
    c.write(cl, b"\x02" * ((size // 2) if big_lower else 2 * cl))
    s2 = c.snapshot()
    c.write(2 * cl, b"\x03" * (2 * cl if big_lower else size // 2))
    expect = c.read(0, size)
    assert len(c.volumes) == 3
    opened: list[str] = []
    extents: list[str] = []
    real_open, real_extents = image.open, image.Image.extents

    def counting_open(path, **kw):
        img = real_open(path, **kw)
        opened.extend(i.path for i in img.chain())
        return img

    def counting_extents(self, *a, **kw):
        extents.append(self.path)
        return real_extents(self, *a, **kw)

    from engine.ops import merge as ops_merge
    real_runs = ops_merge.layer_runs

    def counting_runs(img, *a, **kw):         # reads the block status table, not extents()
        extents.append(img.path)
        return real_runs(img, *a, **kw)

    monkeypatch.setattr(image, "open", counting_open)
    monkeypatch.setattr(image.Image, "extents", counting_extents)
    monkeypatch.setattr(ops_merge, "layer_runs", counting_runs)
    r = c.delete_snapshot(s2.id)
    monkeypatch.undo()
    assert r.direction == expected
    assert sorted(opened) == sorted(set(opened)), opened          # no file opened twice
    assert len(opened) == 3
    assert sorted(extents) == sorted(set(extents)) and len(extents) == 2, extents
    assert r.copied_bytes == min(r.commit_bytes, r.pull_bytes)
    assert c.read(0, size) == expect
    assert repo.check().ok
