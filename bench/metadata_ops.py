"""Metadata operations against chain depth and repository size (snapshot, revert,
preview + undo, clone, delete_chain, open + read), run side by side on two engines.

Two figures (bench/RESULTS.md holds a run):

- ``snapshot``: snapshot creation median at 1 GiB and 1 TiB, depth 5 and 300, in a
  repository of a few volumes and of 2,000+ volumes, made through the API.  Each sample
  takes a snapshot (timed) and reverts to the snapshot before it (untimed, unless asked), so
  the depth stays what it says.
- ``open``: open the repository and a depth-400 chain, read once.
- ``scale``: every metadata operation on a depth-5 chain of 1 GiB in repositories of
  10 / 100 / 1,000 / 10,000 / 100,000 volumes.  The other volumes are catalog rows written
  directly into the catalog (chains of 10 volumes each, no files behind them: none of the
  measured operations may touch them, which is the point; creating 100,000 through the API
  would take hours on the engine before this change).

Each engine runs in its own subprocess (``--engine DIR``: a source tree with its core built
in place); the two engines' workers alternate, round after round, on copies of the same
repository, and each figure is the median of every sample of every round.  Nothing is
asserted: the numbers are printed as a Markdown table.

    python bench/metadata_ops.py --engines /work/main,. --workdir /tmp/mdops
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

GiB, TiB = 1 << 30, 1 << 40


# --- worker side (runs inside one engine) ------------------------------------------------------

def _engine(path: str) -> Any:
    sys.path.insert(0, os.path.abspath(path))
    import engine
    engine.Repository           # the package loads its parts on first use: not in a timing
    return engine


def _timed(out: dict[str, list[float]], key: str, fn: Any) -> None:
    """Run FN; append its wall time to OUT[KEY] and its CPU time to OUT[KEY + '/cpu'] (ms).
    On a loaded machine the wall time waits for the CPU; the CPU time is the work done."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    out.setdefault(key, []).append((time.perf_counter() - t) * 1e3)
    out.setdefault(key + "/cpu", []).append((time.process_time() - c) * 1e3)


def _snapshot_and_back(c: Any, out: dict[str, list[float]], prev: str | None = None) -> str:
    """Time a snapshot of chain C and a revert to the snapshot before it (the depth stays);
    returns that snapshot's id.  PREV: its id when the caller knows it (a revert back to it
    leaves it the newest again), else it is read from the chain's list of snapshots."""
    prev = c.snapshots[-1].id if prev is None else prev
    _timed(out, "snapshot", lambda: c.snapshot())
    _timed(out, "revert", lambda: c.revert(prev))
    return prev


def worker_snapshot(engine: Any, repo_path: str, n: int) -> dict[str, list[float]]:
    """N snapshots of chain 'm' (each undone by a revert to the one before): their times,
    after the process's first (timed apart as "first snapshot": it also pays for what a
    process does once, such as preparing the catalog's statements and the interpreter's
    first runs of the code, about 2-3 ms here)."""
    out: dict[str, list[float]] = {}
    with engine.Repository.open(repo_path) as repo:
        c = repo.chain("m")
        c.read(0, 4096)
        first: dict[str, list[float]] = {}
        prev = _snapshot_and_back(c, first)
        out["first snapshot"] = first["snapshot"]
        out["first snapshot/cpu"] = first["snapshot/cpu"]
        for _ in range(n):
            _snapshot_and_back(c, out, prev)
    return out


def worker_open(engine: Any, repo_path: str, n: int) -> dict[str, list[float]]:
    """N opens of the repository, of chain 'm' and one 4 KiB read, after the process's first
    (timed apart as "first open+read": it also pays for what a process does once, such as
    SQLite's first connection and the engine's first use of its modules, 12-20 ms here; with
    few samples per process it would otherwise be half the median)."""
    out: dict[str, list[float]] = {}
    buf = bytearray(4096)

    def open_read() -> None:
        with engine.Repository.open(repo_path) as r:
            r.chain("m").readinto(0, buf)

    _timed(out, "first open+read", open_read)
    for _ in range(n):
        _timed(out, "open+read", open_read)
    return out


def worker_ops(engine: Any, repo_path: str, n: int) -> dict[str, list[float]]:
    """N rounds of every metadata operation on chain 'm' (depth and catalog unchanged
    after each round)."""
    out = worker_open(engine, repo_path, n)
    with engine.Repository.open(repo_path) as repo:
        c = repo.chain("m")
        c.read(0, 4096)
        prev = c.snapshots[-1].id               # the newest again after each round
        for i in range(n):
            _snapshot_and_back(c, out, prev)

            def preview_undo() -> None:
                c.preview(prev)
                c.undo_preview()
            _timed(out, "preview+undo", preview_undo)
            name = f"k{i}-{uuid.uuid4().hex[:6]}"
            _timed(out, "clone", lambda: c.clone(prev, name))
            _timed(out, "delete_chain", lambda: repo.delete_chain(name))
    return out


# --- building repositories (with the engine running this script) ------------------------------

def build_measured(engine: Any, path: str, size: int, depth: int, background: int) -> None:
    """A repository with chain 'm' (SIZE, DEPTH volumes: base + DEPTH-1 snapshots, some data)
    and BACKGROUND chains of 5 volumes each, all through the API."""
    with engine.Repository.create(path) as repo:
        c = repo.create_chain("m", size, base_format="qcow2")
        c.write(0, b"x" * 65536)
        for _ in range(depth - 1):
            c.snapshot()
        for i in range(background):
            b = repo.create_chain(f"b{i:05d}", GiB, base_format="qcow2")
            for _ in range(4):
                b.snapshot()


def add_catalog_rows(path: str, volumes: int, per_chain: int = 10) -> None:
    """VOLUMES more volume rows in chains of PER_CHAIN (rows only, no files), each chain with
    one snapshot per sealed volume, written straight into the catalog."""
    db = sqlite3.connect(os.path.join(path, "catalog.db"))
    stamp = "2026-01-01T00:00:00.000000Z"
    chains, vols, snaps = [], [], []
    for ci in range(-(-volumes // per_chain)):
        name = f"g{ci:06d}"
        n = min(per_chain, volumes - ci * per_chain)
        ids = [str(uuid.uuid4()) for _ in range(n)]
        for k, vid in enumerate(ids):
            role = "leaf" if k == n - 1 else ("base" if k == 0 else "internal")
            vols.append((vid, name, f"volumes/{vid}.qcow2", "qcow2", role,
                         ids[k - 1] if k else None, "LEGAL", stamp, GiB))
            if k < n - 1:
                snaps.append((str(uuid.uuid4()), name, stamp, "", vid))
        chains.append((name, GiB, 65536, stamp, ids[-1]))
    with db:
        db.executemany("INSERT INTO chains (name, size, cluster_size, created, leaf) "
                       "VALUES (?,?,?,?,?)", chains)
        db.executemany("INSERT INTO volumes (id, chain, path, format, role, parent, legality, "
                       "created, size) VALUES (?,?,?,?,?,?,?,?,?)", vols)
        db.executemany("INSERT INTO snapshots (id, chain, created, description, volume) "
                       "VALUES (?,?,?,?,?)", snaps)
    db.close()


def volume_count(path: str) -> int:
    db = sqlite3.connect(os.path.join(path, "catalog.db"))
    try:
        return int(db.execute("SELECT count(*) FROM volumes").fetchone()[0])
    finally:
        db.close()


# --- driver -------------------------------------------------------------------------------------

def run_worker(engine_dir: str, kind: str, repo: str, n: int) -> dict[str, list[float]]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--engine", engine_dir,
           "--repo", repo, "-n", str(n)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result: dict[str, list[float]] = json.loads(res.stdout.splitlines()[-1])
    return result


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def interleaved(jobs: dict[str, tuple[str, str]], kind: str, rounds: int,
                n: int) -> dict[str, dict[str, float]]:
    """JOBS: {key: (engine source tree, master repository)}.  A copy of each master, then
    ROUNDS rounds in which each job's worker runs once (N samples, a fresh process), in an
    order rotated round after round, so that a slow spell of a shared machine falls on every
    job alike; the median of each operation's samples, per job."""
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in jobs}
    copies = {}
    for i, (k, (_, master)) in enumerate(jobs.items()):
        copies[k] = f"{master}.j{i}"
        shutil.rmtree(copies[k], ignore_errors=True)
        shutil.copytree(master, copies[k])
    # the copies' writeback is not the operations' to wait for: their syncs would join it
    os.sync()
    keys = list(jobs)
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            for op, ts in run_worker(jobs[k][0], kind, copies[k], n).items():
                samples[k].setdefault(op, []).extend(ts)
    for k in keys:
        shutil.rmtree(copies[k], ignore_errors=True)
    return {k: {op: statistics.median(ts) for op, ts in samples[k].items()} for k in keys}


def side_by_side(engines: list[str], kind: str, master: str, rounds: int,
                 n: int) -> dict[str, dict[str, float]]:
    """Copies of MASTER, one per engine; ROUNDS rounds of N samples each, the engines
    alternating; the median of each operation's samples, per engine."""
    return interleaved({e: (e, master) for e in engines}, kind, rounds, n)


def _cell(med: dict[str, float], op: str) -> str:
    return f"{med[op]:.2f} ({med[op + '/cpu']:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default=".", help="comma-separated source trees (first: "
                    "the reference, e.g. the engine before the change)")
    ap.add_argument("--workdir", default="/tmp/cowchain-mdops")
    ap.add_argument("--only", default="snapshot,open,scale")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--sizes", default="10,100,1000,10000,100000")
    ap.add_argument("--worker"), ap.add_argument("--engine"), ap.add_argument("--repo")
    ap.add_argument("-n", type=int, default=10)
    a = ap.parse_args()
    if a.worker:
        eng = _engine(a.engine)
        fn = {"snapshot": worker_snapshot, "open": worker_open, "ops": worker_ops}[a.worker]
        print(json.dumps(fn(eng, a.repo, a.n)))
        return
    engines = [os.path.abspath(e) for e in a.engines.split(",")]
    names = [os.path.basename(e.rstrip("/")) or e for e in engines]
    # the repositories are made by the reference (first) engine: a newer engine reads an
    # older catalog (and migrates its own copy at its first open), not the reverse
    eng = _engine(engines[0])
    os.makedirs(a.workdir, exist_ok=True)
    print(f"metadata operations, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"engines: {', '.join(names)}; load at start: {load()}")
    if "snapshot" in a.only:
        print("\nsnapshot creation, median wall ms (CPU ms); ratios of the last engine's "
              "wall and CPU medians to its 1 GiB, depth 5, few-volume case")
        print("\n| snapshot case | volumes | " + " | ".join(names)
              + " | wall ratio | CPU ratio |")
        print("|---|---|" + "---|" * len(names) + "---|---|")
        ref = None
        for size in (GiB, TiB):
            for depth in (5, 300):
                for bg in (0, 400):
                    p = os.path.join(a.workdir, f"s{size >> 30}g-d{depth}-b{bg}")
                    shutil.rmtree(p, ignore_errors=True)
                    build_measured(eng, p, size, depth, bg)
                    med = side_by_side(engines, "snapshot", p, a.rounds, a.n)
                    last = (med[engines[-1]]["snapshot"], med[engines[-1]]["snapshot/cpu"])
                    ref = ref or last
                    label = f"{'1 GiB' if size == GiB else '1 TiB'}, depth {depth}, " \
                            f"{'few volumes' if not bg else '2,000+ volumes'}"
                    print(f"| {label} | {volume_count(p)} | "
                          + " | ".join(_cell(med[e], "snapshot") for e in engines)
                          + f" | {last[0] / ref[0]:.2f}x | {last[1] / ref[1]:.2f}x |",
                          flush=True)
                    shutil.rmtree(p, ignore_errors=True)
        print(f"\nload: {load()}")
    if "open" in a.only:
        p = os.path.join(a.workdir, "open400")
        shutil.rmtree(p, ignore_errors=True)
        build_measured(eng, p, GiB, 400, 0)
        med = side_by_side(engines, "open", p, a.rounds, a.n)
        print("\nopen the repository, a depth-400 chain of 1 GiB, read 4 KiB once: median "
              "wall ms (CPU ms): " + ", ".join(f"{name} {_cell(med[e], 'open+read')}"
                                               for e, name in zip(engines, names)))
        shutil.rmtree(p, ignore_errors=True)
    if "scale" in a.only:
        ops = ["snapshot", "revert", "preview+undo", "clone", "delete_chain", "open+read"]
        print("\nmedian wall ms (CPU ms) per operation")
        print("\n| volumes | engine | " + " | ".join(ops) + " |")
        print("|---|---|" + "---|" * len(ops))
        for total in (int(x) for x in a.sizes.split(",")):
            p = os.path.join(a.workdir, f"scale{total}")
            shutil.rmtree(p, ignore_errors=True)
            build_measured(eng, p, GiB, 5, 0)
            add_catalog_rows(p, total - volume_count(p))
            n = a.n if total <= 10000 else max(2, a.n // 4)
            med = side_by_side(engines, "ops", p, a.rounds if total <= 10000 else 2, n)
            for e, name in zip(engines, names):
                print(f"| {volume_count(p):,} | {name} | "
                      + " | ".join(_cell(med[e], o) for o in ops) + " |", flush=True)
            shutil.rmtree(p, ignore_errors=True)
        print(f"\nload: {load()}")


if __name__ == "__main__":
    main()
