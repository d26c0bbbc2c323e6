"""A Hypothesis state machine drives a repository through random writes, zeroes, discards,
snapshots, reverts, previews, snapshot deletes, clones, chain deletes, exports and reopens,
against a pure-Python model of every chain's disk and every snapshot's content.

After every step each chain's disk must read as the model says; snapshots are read back by a
rule of their own and at teardown.  At teardown (repository closed) ``qemu-img check`` must be
clean on every volume and ``qemu-img compare`` of every leaf and every snapshot volume against
the model must say identical.

The model also predicts refusals: a snapshot a clone reads through cannot be deleted, a chain
a clone reads through cannot be deleted, and a previewing chain refuses snapshot, revert,
preview and delete_snapshot.

Runs about a minute in the default (ci) profile; ``COWCHAIN_PROFILE=long`` runs the profile's
full budget.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
import pytest

import engine
from engine.errors import RepositoryError
from qemu import qemu_check, qemu_compare

pytestmark = pytest.mark.qemu

SIZE = 256 << 10
MAX_CHAINS = 4


@dataclass
class ChainModel:
    disk: bytearray
    line: list = field(default_factory=list)   # the chain's snapshot ids, oldest first
    floor: bytes = bytes(SIZE)                 # what shows under its oldest volume
    preview: tuple | None = None               # (snapshot id, the disk kept aside)
    origin: str | None = None                  # the chain it was cloned from


class RepoMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="cowchain-model-")
        self.path = os.path.join(self.tmp, "repo")
        self.repo = None
        self.chains: dict[str, ChainModel] = {}
        self.snaps: dict[str, bytes] = {}
        self.held: dict[str, set] = {}     # snapshot id -> clones that read through it
        self.counter = 0
        self.cs = 4096

    # --- helpers ------------------------------------------------------------------------------

    def repo_kw(self) -> dict:
        """Keyword arguments of Repository.create and open (a subclass puts the catalog
        elsewhere)."""
        return {}

    def pick(self, i: int) -> str:
        names = sorted(self.chains)
        return names[i % len(names)]

    def chain(self, name):
        return self.repo.chain(name)

    def below(self, m: ChainModel) -> bytes:
        """What the leaf's backing shows: where a discard lets it through."""
        if m.preview:
            return self.snaps[m.preview[0]]
        return self.snaps[m.line[-1]] if m.line else m.floor

    # --- rules ----------------------------------------------------------------------------------

    @initialize(base_format=st.sampled_from(["raw", "qcow2"]),
                cluster_size=st.sampled_from([4096, 65536]))
    def init(self, base_format, cluster_size):
        self.cs = cluster_size
        self.kw = self.repo_kw()
        self.repo = engine.Repository.create(self.path, **self.kw)
        self.repo.create_chain("c0", SIZE, base_format=base_format, cluster_size=cluster_size)
        self.chains["c0"] = ChainModel(bytearray(SIZE))

    @rule(i=st.integers(0, 7), offset=st.integers(0, SIZE - 1), length=st.integers(1, 3 * 65536),
          fill=st.integers(1, 255))
    def write(self, i, offset, length, fill):
        name = self.pick(i)
        length = min(length, SIZE - offset)
        data = bytes([fill]) * length
        self.chain(name).write(offset, data)
        self.chains[name].disk[offset:offset + length] = data

    @rule(i=st.integers(0, 7), offset=st.integers(0, SIZE - 1), length=st.integers(1, 3 * 65536))
    def write_zeroes(self, i, offset, length):
        name = self.pick(i)
        length = min(length, SIZE - offset)
        self.chain(name).write_zeroes(offset, length)
        self.chains[name].disk[offset:offset + length] = bytes(length)

    @rule(i=st.integers(0, 7), first=st.integers(0, 63), count=st.integers(1, 4))
    def discard(self, i, first, count):
        name = self.pick(i)
        m = self.chains[name]
        start = (first * self.cs) % SIZE
        length = min(count * self.cs, SIZE - start)
        self.chain(name).discard(start, length)
        m.disk[start:start + length] = self.below(m)[start:start + length]

    @rule(i=st.integers(0, 7))
    def snapshot(self, i):
        name = self.pick(i)
        m = self.chains[name]
        if m.preview:
            with pytest.raises(RepositoryError, match="previewing"):
                self.chain(name).snapshot()
            return
        s = self.chain(name).snapshot(f"step {self.counter}")
        self.counter += 1
        self.snaps[s.id] = bytes(m.disk)
        m.line.append(s.id)

    @precondition(lambda self: self.snaps)
    @rule(i=st.integers(0, 7), j=st.integers(0, 99))
    def revert(self, i, j):
        name = self.pick(i)
        m = self.chains[name]
        if not m.line:
            return
        sid = m.line[j % len(m.line)]
        if m.preview:
            with pytest.raises(RepositoryError, match="previewing"):
                self.chain(name).revert(sid)
            return
        self.chain(name).revert(sid)
        self._drop_after(m, sid)
        m.disk = bytearray(self.snaps[sid])

    def _drop_after(self, m: ChainModel, sid: str) -> None:
        k = m.line.index(sid)
        for x in m.line[k + 1:]:
            del self.snaps[x]
        del m.line[k + 1:]

    @precondition(lambda self: self.snaps)
    @rule(i=st.integers(0, 7), j=st.integers(0, 99))
    def preview(self, i, j):
        name = self.pick(i)
        m = self.chains[name]
        if not m.line:
            return
        sid = m.line[j % len(m.line)]
        if m.preview:
            with pytest.raises(RepositoryError, match="previewing"):
                self.chain(name).preview(sid)
            return
        self.chain(name).preview(sid)
        m.preview = (sid, bytes(m.disk))
        m.disk = bytearray(self.snaps[sid])
        assert self.chain(name).previewing.id == sid

    @rule(i=st.integers(0, 7), keep=st.booleans())
    def end_preview(self, i, keep):
        name = self.pick(i)
        m = self.chains[name]
        c = self.chain(name)
        if not m.preview:
            with pytest.raises(RepositoryError, match="not previewing"):
                c.commit_preview() if keep else c.undo_preview()
            return
        sid, saved = m.preview
        m.preview = None
        if keep:
            c.commit_preview()
            self._drop_after(m, sid)
        else:
            c.undo_preview()
            m.disk = bytearray(saved)

    @precondition(lambda self: self.snaps)
    @rule(i=st.integers(0, 7), j=st.integers(0, 99))
    def delete_snapshot(self, i, j):
        name = self.pick(i)
        m = self.chains[name]
        if not m.line:
            return
        sid = m.line[j % len(m.line)]
        c = self.chain(name)
        if m.preview:
            with pytest.raises(RepositoryError, match="previewing"):
                c.delete_snapshot(sid)
            return
        if self.held.get(sid):
            with pytest.raises(RepositoryError, match="clone"):
                c.delete_snapshot(sid)
            return
        r = c.delete_snapshot(sid)
        assert r.direction in ("commit", "pull")
        assert r.copied_bytes == min(r.commit_bytes, r.pull_bytes)
        m.line.remove(sid)
        del self.snaps[sid]

    @precondition(lambda self: self.snaps and len(self.chains) < MAX_CHAINS)
    @rule(i=st.integers(0, 7), j=st.integers(0, 99))
    def clone(self, i, j):
        name = self.pick(i)
        m = self.chains[name]
        if not m.line:
            return
        k = j % len(m.line)
        sid = m.line[k]
        new = f"c{self.counter}"
        self.counter += 1
        self.chain(name).clone(sid, new)
        holds = set(m.line[:k + 1]) | {x for x, users in self.held.items() if name in users}
        for x in holds:
            self.held.setdefault(x, set()).add(new)
        self.chains[new] = ChainModel(bytearray(self.snaps[sid]), floor=self.snaps[sid],
                                      origin=name)

    @precondition(lambda self: len(self.chains) > 1)
    @rule(i=st.integers(0, 7))
    def delete_chain(self, i):
        name = self.pick(i)
        users = [n for n, m in self.chains.items() if m.origin == name]
        if users:
            with pytest.raises(RepositoryError, match="clone"):
                self.repo.delete_chain(name)
            return
        self.repo.delete_chain(name)
        m = self.chains.pop(name)
        for x in m.line:
            del self.snaps[x]
        for users in self.held.values():
            users.discard(name)

    @rule(i=st.integers(0, 7), j=st.integers(-1, 99), fmt=st.sampled_from(["raw", "qcow2"]))
    def export(self, i, j, fmt):
        name = self.pick(i)
        m = self.chains[name]
        sid = m.line[j % len(m.line)] if (j >= 0 and m.line) else None
        out = os.path.join(self.tmp, f"export.{fmt}")
        self.chain(name).export(out, format=fmt, snapshot_id=sid, overwrite=True)
        with engine.open(out, format=fmt, readonly=True) as img:
            got = img.read(0, img.size)
        assert got == (self.snaps[sid] if sid else bytes(m.disk))
        os.unlink(out)

    @rule()
    def reopen(self):
        self.repo.close()
        self.repo = engine.Repository.open(self.path, **self.kw)

    @precondition(lambda self: self.snaps)
    @rule(i=st.integers(0, 7))
    def read_snapshots(self, i):
        name = self.pick(i)
        c = self.chain(name)
        assert [s.id for s in c.snapshots] == self.chains[name].line
        for sid in self.chains[name].line:
            with c.open_snapshot(sid) as img:
                assert img.read(0, SIZE) == self.snaps[sid]

    @rule(i=st.integers(0, 7))
    def diff_is_a_superset_of_the_changes(self, i):
        name = self.pick(i)
        m = self.chains[name]
        if not m.line:
            return
        sid = m.line[-1]
        changed = bytearray(SIZE)
        for ch in self.chain(name).diff(sid):
            changed[ch.start:ch.start + ch.length] = b"\1" * ch.length
        old, new = self.snaps[sid], m.disk
        for off in range(0, SIZE, 4096):
            if old[off:off + 4096] != new[off:off + 4096]:
                assert any(changed[off:off + 4096]), (name, off)

    # --- invariants and teardown ----------------------------------------------------------------

    @invariant()
    def disks_match(self):
        if self.repo is None:
            return
        for name, m in self.chains.items():
            assert self.chain(name).read(0, SIZE) == bytes(m.disk), name

    def teardown(self):
        try:
            if self.repo is None:
                return
            self.repo.close()
            with engine.Repository.open(self.path, **self.kw) as repo:
                res = repo.check()
                assert res.ok and not res.problems, res.to_dict()
                vols = repo._cat.volumes()
                leaves = {c.name: c.leaf for c in repo.chains()}
                snap_vols = {s.id: vols[s.volume] for s in repo._cat.snapshots()}
            for v in vols.values():
                if v.format == "qcow2":
                    code, data = qemu_check(os.path.join(self.path, v.path))
                    assert code == 0, (v.path, data)
            for name, leaf in leaves.items():
                self._compare(leaf.path, leaf.format, bytes(self.chains[name].disk))
            for sid, v in snap_vols.items():
                self._compare(os.path.join(self.path, v.path), v.format, self.snaps[sid])
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _compare(self, path, fmt, content: bytes):
        model = os.path.join(self.tmp, "model.raw")
        with open(model, "wb") as f:
            f.write(content)
        code, out = qemu_compare(path, model, fmt_a=fmt, fmt_b="raw")
        assert code == 0, (path, out)


if os.environ.get("COWCHAIN_PROFILE") == "long":
    RepoMachine.TestCase.settings = settings(settings())
else:
    RepoMachine.TestCase.settings = settings(settings(), max_examples=min(
        settings().max_examples, 15), stateful_step_count=min(settings().stateful_step_count, 30))

TestRepoModel = RepoMachine.TestCase
