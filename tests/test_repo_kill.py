"""Kill tests: a child process runs one repository operation and SIGKILLs itself at each of the
operation's named steps (``COWCHAIN_KILL_AT=step:n``, see engine/ops/_hooks.py).  The next
``Repository.open`` must recover: the journal is empty, every chain and every snapshot reads
exactly as before the operation or exactly as after it (never a mix; a snapshot that was not
being deleted never changes), ``Repository.check`` finds nothing but leaked clusters (which
its repair reclaims), no file is left over, and ``qemu-img check`` is clean on every volume.

First the operation runs once with ``COWCHAIN_HOOK_LOG`` to learn the steps it passes; then it
is killed at each of them (for repeated steps such as copy chunks: the first, a middle one
and the last)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter

import pytest

import engine
from qemu import qemu_check

pytestmark = pytest.mark.qemu

CS = 4096
SIZE = 512 << 10

WORKER = r"""
import json, os, sys
import engine
path, action, ids, dest = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
with engine.Repository.open(path) as repo:
    vm1 = repo.chain("vm1")
    exec(action)
"""

# name -> (code run by the worker, with repo, vm1, ids and dest in scope)
ACTIONS = {
    "snapshot": "vm1.snapshot('new')",
    "delete_commit": "r = vm1.delete_snapshot(ids['s2']); assert r.direction == 'commit', r",
    "delete_pull": "r = vm1.delete_snapshot(ids['s3']); assert r.direction == 'pull', r",
    "revert": "vm1.revert(ids['s1'])",
    "preview": "vm1.preview(ids['s2'])",
    "commit_preview": "vm1.commit_preview()",
    "undo_preview": "vm1.undo_preview()",
    "clone": "vm1.clone(ids['s2'], 'vm2')",
    "export_raw": "vm1.export(dest, format='raw')",
    "export_qcow2_snapshot": "vm1.export(dest, format='qcow2', snapshot_id=ids['s2'])",
    "create_chain": "repo.create_chain('new', %d, base_format='qcow2', cluster_size=%d)"
                    % (SIZE, CS),
    "delete_chain": "repo.delete_chain('vmc')",
    "resize": "vm1.resize(%d)" % (3 * SIZE),
    "import_qcow2": "repo.import_chain('imp', os.path.join(os.path.dirname(path), "
                    "'import-src.qcow2'), format='qcow2', base_format='qcow2', cluster_size=%d)"
                    % CS,
    "import_raw": "repo.import_chain('imp', os.path.join(os.path.dirname(path), "
                  "'import-src.raw'), format='raw')",
}


def _pat(byte: int, n: int = CS) -> bytes:
    return bytes([byte]) * n


# --- the prepared repository and its model ----------------------------------------------------

class State:
    """What a repository reads: per chain (leaf bytes, previewing?), per snapshot id its bytes,
    and the contents of snapshots whose ids the parent cannot know (taken by the child)."""

    def __init__(self, chains, snaps, new_snaps=()):
        self.chains = dict(chains)
        self.snaps = dict(snaps)
        self.new_snaps = sorted(new_snaps)

    def copy(self) -> "State":
        return State(self.chains, self.snaps, self.new_snaps)

    def same(self, other: "State") -> bool:
        return (self.chains == other.chains and self.snaps == other.snaps
                and self.new_snaps == other.new_snaps)

    def describe(self) -> str:
        return (f"chains={ {k: (len(v[0]), v[1]) for k, v in self.chains.items()} } "
                f"snaps={sorted(self.snaps)} new={len(self.new_snaps)}")


def build(path) -> tuple[dict, State]:
    """vm1: qcow2 base, snapshots s1, s2, s3, a leaf; vmc: a clone of s1 (so s1 stays).

    Volumes: V1 (s1) full of 1s; V2 (s2) 16 scattered clusters; V3 (s3) 2 clusters; leaf 24
    scattered clusters.  Deleting s2 is cheaper as a commit (V3 is small), deleting s3 is
    cheaper as a pull (the leaf is big)."""
    disk = bytearray(SIZE)
    snaps = {}
    with engine.Repository.create(path) as repo:
        c = repo.create_chain("vm1", SIZE, base_format="qcow2", cluster_size=CS)

        def w(off, data):
            c.write(off, data)
            disk[off:off + len(data)] = data

        w(0, _pat(1, SIZE // 2))
        ids = {"s1": c.snapshot("s1").id}
        snaps[ids["s1"]] = bytes(disk)
        for i in range(16):
            w((2 * i + 1) * CS, _pat(2))
        ids["s2"] = c.snapshot("s2").id
        snaps[ids["s2"]] = bytes(disk)
        w(40 * CS, _pat(3))
        w(90 * CS + 7, b"three")
        ids["s3"] = c.snapshot("s3").id
        snaps[ids["s3"]] = bytes(disk)
        for i in range(24):
            w((3 * i) * CS, _pat(4, 100))
        k = c.clone(ids["s1"], "vmc")
        k.write(5, b"clone")
        kdisk = bytearray(snaps[ids["s1"]])
        kdisk[5:10] = b"clone"
    state = State({"vm1": (bytes(disk), False), "vmc": (bytes(kdisk), False)}, snaps)
    return ids, state


def import_source(folder) -> bytes:
    """The images the import actions copy, beside the repositories: a raw disk with scattered
    data, and a qcow2 overlay on it (so the import reads through a chain). Returns what
    both read as (the raw one is the overlay flattened)."""
    from qemu import convert_to_raw, qemu_img, qemu_io

    raw = os.path.join(folder, "import-base.raw")
    if not os.path.exists(raw):
        data = bytearray(SIZE)
        for i in range(0, SIZE // CS, 5):
            data[i * CS:(i + 1) * CS] = _pat(0x40 + i % 60)
        with open(raw, "wb") as f:
            f.write(data)
        top = os.path.join(folder, "import-src.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", "-b",
                 "import-base.raw", "-F", "raw", top)
        qemu_io(top, f"write -P 0x7e {3 * CS} {2 * CS}", f"write -z {10 * CS} {CS}")
        with open(os.path.join(folder, "import-src.raw"), "wb") as f:
            f.write(convert_to_raw(top, "qcow2"))
    return convert_to_raw(os.path.join(folder, "import-src.qcow2"), "qcow2")


def prepare(path, name: str, ids: dict, state: State) -> State:
    """Bring the repository to the state the operation starts from (parent side)."""
    if name in ("commit_preview", "undo_preview"):
        with engine.Repository.open(path) as repo:
            c = repo.chain("vm1")
            c.preview(ids["s1"])
            c.write(0, b"preview")
        d = bytearray(state.snaps[ids["s1"]])
        d[0:7] = b"preview"
        state = state.copy()
        state.chains["vm1"] = (bytes(d), True)
    return state


def after(name: str, ids: dict, before: State, original_leaf: bytes,
          imported: bytes = b"") -> State:
    s = before.copy()
    vm1_leaf = before.chains["vm1"][0]
    if name == "snapshot":
        s.new_snaps = [vm1_leaf]
    elif name == "delete_commit":
        del s.snaps[ids["s2"]]
    elif name == "delete_pull":
        del s.snaps[ids["s3"]]
    elif name == "revert":
        del s.snaps[ids["s2"]], s.snaps[ids["s3"]]
        s.chains["vm1"] = (before.snaps[ids["s1"]], False)
    elif name == "preview":
        s.chains["vm1"] = (before.snaps[ids["s2"]], True)
    elif name == "commit_preview":
        del s.snaps[ids["s2"]], s.snaps[ids["s3"]]
        s.chains["vm1"] = (vm1_leaf, False)
    elif name == "undo_preview":
        s.chains["vm1"] = (original_leaf, False)
    elif name == "clone":
        s.chains["vm2"] = (before.snaps[ids["s2"]], False)
    elif name == "create_chain":
        s.chains["new"] = (bytes(SIZE), False)
    elif name == "delete_chain":
        del s.chains["vmc"]
    elif name == "resize":
        s.chains["vm1"] = (vm1_leaf + bytes(2 * SIZE), False)
    elif name.startswith("import"):
        s.chains["imp"] = (imported, False)
    return s


def observe(path) -> tuple[State, list]:
    """Open (and so recover) the repository; read everything; return (state, leftovers)."""
    problems = []
    with engine.Repository.open(path) as repo:
        if repo._cat.journal():
            problems.append(f"journal not empty after open: {repo._cat.journal()}")
        chains, snaps, new = {}, {}, []
        known = set()
        for c in repo.chains():
            chains[c.name] = (c.read(0, c.size), c.previewing is not None)
            for s in c.snapshots:
                with c.open_snapshot(s.id) as img:
                    snaps[s.id] = img.read(0, img.size)
                known.add(s.id)
        res = repo.check()
        bad = [p.to_dict() for p in res.problems if not p.leaks_only]
        if bad:
            problems.append(f"check: {bad}")
        if res.problems:
            if not repo.check(repair=True).ok or repo.check().problems:
                problems.append("check --repair did not leave a clean repository")
        volumes = [(os.path.join(path, r.path), r.format) for r in repo._cat.volumes().values()]
    for p, fmt in volumes:
        if fmt == "qcow2":
            code, data = qemu_check(p)
            if code != 0:
                problems.append(f"qemu-img check {p}: exit {code} {data}")
    return State(chains, snaps), problems


def split_new(state: State, model_ids: set) -> State:
    snaps = {k: v for k, v in state.snaps.items() if k in model_ids}
    new = [v for k, v in state.snaps.items() if k not in model_ids]
    return State(state.chains, snaps, new)


def run_worker(path, action, ids, dest, env_extra) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("COWCHAIN_KILL_AT", None)
    env.pop("COWCHAIN_HOOK_LOG", None)
    env.update(env_extra)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))
    env["PYTHONPATH"] = pkg_parent + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", WORKER, str(path), ACTIONS[action],
                           json.dumps(ids), str(dest)], env=env, capture_output=True,
                          timeout=120)


def kill_points(log_path) -> list[tuple[str, int]]:
    with open(log_path) as f:
        hits = Counter(line.strip() for line in f if line.strip())
    points = []
    for name, n in hits.items():
        for k in sorted({1, (n + 1) // 2, n}):
            points.append((name, k))
    return points


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = tmp_path_factory.mktemp("kill") / "template"
    ids, state = build(str(path))
    return str(path), ids, state


@pytest.mark.parametrize("name", sorted(ACTIONS))
def test_kill_at_every_step(name, template, tmp_path, summary):
    tpl, ids, base_state = template
    start = tmp_path / "start"
    shutil.copytree(tpl, start)
    imported = import_source(str(tmp_path)) if name.startswith("import") else b""
    before = prepare(str(start), name, ids, base_state)
    want_after = after(name, ids, before, base_state.chains["vm1"][0], imported)
    model_ids = set(base_state.snaps)

    # 1. A clean run: learn the steps; the result is the "after" state.
    clean = tmp_path / "clean"
    shutil.copytree(start, clean)
    log = tmp_path / "hooks.log"
    dest = tmp_path / "export.img"
    proc = run_worker(clean, name, ids, dest, {"COWCHAIN_HOOK_LOG": str(log)})
    assert proc.returncode == 0, proc.stderr.decode()
    got, problems = observe(str(clean))
    assert problems == []
    assert split_new(got, model_ids).same(want_after), split_new(got, model_ids).describe()
    points = kill_points(log)
    assert points, "the operation passed no kill point"
    if name.startswith("export"):
        expect_export = _read_export(dest, name)
        os.unlink(dest)

    # 2. Killed at each step: recovery gives the before or the after state, nothing else.
    outcomes = Counter()
    for point, n in points:
        run = tmp_path / f"run-{point}-{n}"
        shutil.copytree(start, run)
        proc = run_worker(run, name, ids, dest, {"COWCHAIN_KILL_AT": f"{point}:{n}"})
        assert proc.returncode == -signal.SIGKILL, (point, n, proc.returncode,
                                                    proc.stderr.decode()[-2000:])
        got, problems = observe(str(run))
        assert problems == [], (point, n, problems)
        got = split_new(got, model_ids)
        if got.same(before):
            outcomes["before"] += 1
        elif got.same(want_after):
            outcomes["after"] += 1
        else:
            pytest.fail(f"killed at {point}:{n}: state is neither before nor after: "
                        f"{got.describe()} / before {before.describe()} / after "
                        f"{want_after.describe()}")
        if name.startswith("export"):
            if os.path.exists(dest):       # published only when complete
                assert _read_export(dest, name) == expect_export, (point, n)
                os.unlink(dest)
                outcomes["published"] += 1
            assert not [f for f in os.listdir(tmp_path) if f.endswith(".part")], (point, n)
        shutil.rmtree(run)
    if name.startswith("export"):
        what = (f"the export file complete {outcomes['published']} times and absent "
                f"{len(points) - outcomes['published']} times, never partial")
    else:
        what = (f"recovered {outcomes['before']} to the state before and {outcomes['after']} "
                "to the state after, 0 mixed states")
    summary.append(f"crash: repository {name}: killed at {len(points)} steps, {what}, "
                   "0 check problems")


def _read_export(dest, name) -> bytes:
    from qemu import convert_to_raw

    return convert_to_raw(str(dest), "raw" if name == "export_raw" else "qcow2")


def test_kill_during_recovery(template, tmp_path):
    """A merge killed mid-copy, its recovery killed too: the third open still finishes it."""
    tpl, ids, base_state = template
    run = tmp_path / "run"
    shutil.copytree(tpl, run)
    proc = run_worker(run, "delete_pull", ids, "-", {"COWCHAIN_KILL_AT": "delete_snapshot.copy:1"})
    assert proc.returncode == -signal.SIGKILL
    # The worker's open recovers the merge (rolls it forward) and is killed in it.
    proc = run_worker(run, "snapshot", ids, "-", {"COWCHAIN_KILL_AT": "delete_snapshot.rebased:1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    got, problems = observe(str(run))
    assert problems == []
    want = after("delete_pull", ids, base_state, base_state.chains["vm1"][0])
    assert split_new(got, set(base_state.snaps)).same(want)
