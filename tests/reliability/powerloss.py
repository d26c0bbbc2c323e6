"""Power-loss simulator (docs/reliability.md C3): ``python -m reliability.powerloss --seed S
--variants N`` runs cases in-process and prints one JSON object.

The barrier callback of the core (``engine._core.set_barrier_callback``) tells us when the
top image's content is durable: at each barrier we keep a copy of the file (files are a few
MiB). A crash between barrier k and k+1 can leave, for every 4 KiB page that differs between
the durable states k and k+1: the old page, the new page, or a torn page (each 512-byte sector
old or new); and a file size of the old size, the new size or an aligned size in between.
For each crash point we build R (8) such variants, write each beside the chain's lower images
and run the C2 checks on it (qemu-img check, RO and RW open, check(), the oracle for the
flushes acknowledged by then).

"Live" crash points also take the current (unsynced) file as the new state: a power loss
before the next barrier may keep any part of what is in the page cache.

Header rewrites and repairs done from Python (rebase, the autoclear bits cleared by a
read-write open, check repairs) go through the core's shim too, so their syncs are barriers
here as well.  Overlay creation fsyncs the new file and its folder on a helper thread, and we
take that as one durable step.
"""

from __future__ import annotations

import argparse
import zlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

PAGE = 4096
SECTOR = 512


@dataclass
class FlushRec:
    count: int            # barriers seen when the flush returned
    seq: int
    acked: np.ndarray
    size: int


class Recorder:
    """Keeps the durable states of one watched file (the top image)."""

    def __init__(self):
        self.ino = None
        self.states: list[tuple[int, bytes]] = []     # (barrier index, content), pending
        self.count = 0
        self.last: bytes | None = None                 # D_count

    def watch(self, path: str) -> None:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
            self.last = f.read()
        self.ino = os.stat(path).st_ino
        self.count = 0
        self.states = []

    def __call__(self, fd: int) -> None:
        try:
            if os.fstat(fd).st_ino != self.ino:
                return
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0)
        except OSError:
            return
        self.count += 1
        self.states.append((self.count, data))


def variants(old: bytes, new: bytes, rng: random.Random, r: int):
    """Up to r distinct crash images between durable state ``old`` and state ``new``."""
    sa, sb = len(old), len(new)
    n = max(sa, sb)
    npages = -(-n // PAGE)
    A = np.zeros(npages * PAGE, dtype=np.uint8)
    B = np.zeros(npages * PAGE, dtype=np.uint8)
    A[:sa] = np.frombuffer(old, dtype=np.uint8)
    B[:sb] = np.frombuffer(new, dtype=np.uint8)
    diff = np.nonzero((A.reshape(npages, PAGE) != B.reshape(npages, PAGE)).any(axis=1))[0]
    seen = set()
    out = []
    sizes = sorted({sa, sb})
    for i in range(r * 3):
        if len(out) >= r:
            break
        if i == 0:
            choice = np.full(len(diff), 1)                 # everything new
        elif i == 1:
            choice = np.zeros(len(diff), dtype=int)        # everything old
        else:
            choice = np.array([rng.choice((0, 1, 2)) for _ in range(len(diff))], dtype=int)
        x = rng.random()
        if x < 0.4 or len(sizes) == 1:
            size = sb if i != 1 else sa
        elif x < 0.8:
            size = sa
        else:
            lo, hi = sizes
            size = rng.randrange(lo, hi + 1, SECTOR) if hi > lo else lo
            size -= size % SECTOR
        C = A.copy()
        tears = 0
        for p, c in zip(diff.tolist(), choice.tolist()):
            s = slice(p * PAGE, (p + 1) * PAGE)
            if c == 1:
                C[s] = B[s]
            elif c == 2:
                tears += 1
                for k in range(PAGE // SECTOR):
                    if rng.random() < 0.5:
                        o = p * PAGE + k * SECTOR
                        C[o:o + SECTOR] = B[o:o + SECTOR]
        data = C[:size].tobytes()
        h = (len(data), zlib.crc32(data))
        if h in seen:
            continue
        seen.add(h)
        out.append((data, f"pages={len(diff)} new={int((choice == 1).sum())} "
                          f"torn={tears} size={size} ({sa}->{sb})"))
    return out


class Case:
    """One in-process workload over a chain with the recorder on its top image."""

    def __init__(self, folder: str, seed: int, *, ops: int, r: int, budget: int,
                 point_prob: float, stats: dict, convert_every: int = 25,
                 force: dict | None = None):
        from reliability import chain as C
        self.C = C
        self.folder = folder
        self.seed = seed
        self.rng = random.Random(seed)
        self.cfg = C.ChainConfig.random(seed, force=force)
        self.ch = C.build_chain(folder, self.cfg)
        self.ops = ops
        self.r = r
        self.budget = budget
        self.point_prob = point_prob
        self.stats = stats
        self.convert_every = convert_every
        self.rec = Recorder()
        self.flushes: list[FlushRec] = []
        self.oplog: list[tuple] = []       # (seq, issue_count, kind, lba, descs | size)
        self.nvar = 0

    # -- oracle as of a crash point ---------------------------------------------------------------
    def oracle_at(self, k: int):
        from reliability.oracle import Oracle
        f = [fr for fr in self.flushes if fr.count <= k][-1]
        o = Oracle(self.ch.oracle.max_blocks, f.size, state=f.acked,
                   backing=self.ch.oracle.backing)
        o.acked_size = f.size
        o.last_ack = f.seq
        for seq, cnt, kind, lba, d in self.oplog:
            if seq > f.seq and cnt <= k:
                if kind == "R":
                    o.post_sizes.append(d)
                else:
                    o.post.append((seq, lba, d))
        return o

    def _ack(self, seq: int) -> None:
        o = self.ch.oracle
        self.flushes.append(FlushRec(self.rec.count, seq, o.acked.copy(), o.acked_size))
        # ops before the oldest flush any later crash point can use are not needed
        keep_from = self.flushes[-2].seq if len(self.flushes) > 1 else 0
        self.oplog = [e for e in self.oplog if e[0] > keep_from]
        self.flushes = self.flushes[-2:]

    # -- crash points ----------------------------------------------------------------------------
    def process(self, live: bool = False) -> None:
        pts = []
        for cnt, data in self.rec.states:
            pts.append((cnt - 1, self.rec.last, data))
            self.rec.last = data
        self.rec.states = []
        if live:
            with open(self.ch.top_path, "rb") as f:
                pts.append((self.rec.count, self.rec.last, f.read()))
        for k, old, new in pts:
            if self.nvar >= self.budget:
                return
            if old == new or self.rng.random() > self.point_prob:
                continue
            self.check_point(k, old, new, live=(k == self.rec.count and live))

    def check_point(self, k: int, old: bytes, new: bytes, live: bool) -> None:
        st = self.stats
        st["crash_points"] += 1
        oracle = self.oracle_at(k)
        for i, (data, what) in enumerate(variants(old, new, self.rng, self.r)):
            if self.nvar >= self.budget:
                break
            self.nvar += 1
            st["variants"] += 1
            path = os.path.join(self.folder, "crash.qcow2")
            with open(path, "wb") as f:
                f.write(data)
            label = (f"powerloss seed {self.seed} [{self.cfg.short()}] top=L{self.ch.top} "
                     f"barrier {k}->{'live' if live else k + 1} variant {i}: {what}")
            heavy = st["variants"] % self.convert_every == 0
            rep = self.C.verify(path, oracle, label=label, convert=heavy, repair=heavy,
                                qemu_after=heavy, tmpdir=self.folder)
            st["converts"] += int(rep.converted)
            st["leaks"].append(rep.leaks)
            for f in self.C.Report.FAIL_FIELDS:
                v = int(getattr(rep, f))
                st["totals"][f] = st["totals"].get(f, 0) + (v if f in ("lost", "wrong")
                                                            else int(bool(v)))
            if rep.failed:
                st["failures"].append(rep.summary())
                keep = os.environ.get("COWCHAIN_KEEP_FAILED")
                if keep:
                    dst = os.path.join(keep, f"pl-seed{self.seed}-b{k}-v{i}")
                    shutil.copytree(self.folder, dst, dirs_exist_ok=True)
                    with open(os.path.join(dst, "durable-old.bin"), "wb") as f:
                        f.write(old)
                    with open(os.path.join(dst, "durable-new.bin"), "wb") as f:
                        f.write(new)
            os.unlink(path)

    # -- the workload ------------------------------------------------------------------------------
    def run(self) -> None:
        import engine
        import engine._core as core
        from reliability import stamps
        from reliability.workload import OpGen
        C = self.C
        ch = self.ch
        o = ch.oracle
        self.rec.watch(ch.top_path)
        self.flushes = [FlushRec(0, o.last_ack, o.acked.copy(), o.acked_size)]
        core.set_barrier_callback(self.rec)
        img = engine.open(ch.top_path)
        try:
            gen = OpGen(self.rng, size=img.size, max_size=self.cfg.max_size,
                        cluster=img.cluster_size, layers=ch.top + 1, max_layers=6,
                        p_flush=0.1, p_resize=0.02, p_overlay=0.01)
            seq = ch.seq
            for _ in range(self.ops):
                if self.nvar >= self.budget:
                    break
                op = gen.next()
                seq += 1
                k = op[0]
                cnt = self.rec.count
                if k == "W":
                    _, lba, n = op
                    o.write(seq, lba, n)
                    self.oplog.append((seq, cnt, "W", lba, o.post[-1][2]))
                    img.write(lba * 512, stamps.make(seq, lba, n, 1))
                elif k == "Z":
                    _, lba, n, unmap = op
                    o.zero(seq, lba, n)
                    self.oplog.append((seq, cnt, "Z", lba, o.post[-1][2]))
                    img.write_zeroes(lba * 512, n * 512, unmap=unmap)
                elif k == "D":
                    _, lba, n = op
                    o.discard(seq, lba, n)
                    self.oplog.append((seq, cnt, "D", lba, o.post[-1][2]))
                    img.discard(lba * 512, n * 512)
                elif k == "R":
                    o.resize(seq, op[1])
                    self.oplog.append((seq, cnt, "R", 0, op[1]))
                    img.resize(op[1])
                elif k == "F":
                    if self.rng.random() < 0.3:
                        self.process(live=True)
                    img.flush()
                    o.ack(seq)
                    self._ack(seq)
                elif k == "O":
                    img.close()
                    o.ack(seq)
                    self._ack(seq)
                    self.process()
                    name = C.layer_name(ch.top)
                    ch.hashes[name] = C.sha(ch.top_path)
                    o.new_top()
                    ch.top += 1
                    cl = self.rng.choice([512, 1024, 2048, 4096])
                    img = engine.create(ch.top_path, None, cluster_size=cl,
                                        backing=name, backing_format="qcow2")
                    gen.set_top(cl)
                    self.rec.watch(ch.top_path)
                    self.flushes = [FlushRec(0, seq, o.acked.copy(), o.acked_size)]
                    self.oplog = []
                self.process()
            self.process(live=True)
            img.flush()
            o.ack(seq + 1)
            self._ack(seq + 1)
            self.process()
        finally:
            core.set_barrier_callback(None)
            img.close()
        for name, h in ch.hashes.items():
            if C.sha(os.path.join(self.folder, name)) != h:
                self.stats["failures"].append(f"powerloss seed {self.seed}: backing file "
                                              f"{name} changed")
                self.stats["totals"]["backing_changed"] = \
                    self.stats["totals"].get("backing_changed", 0) + 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--variants", type=int, required=True)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--ops", type=int, default=400)
    ap.add_argument("--per-case", type=int, default=400)
    ap.add_argument("--point-prob", type=float, default=0.5)
    ap.add_argument("--deadline", type=float, default=1e9)
    a = ap.parse_args(argv)
    from reliability import chain as C
    t0 = time.monotonic()
    stats = {"seed": a.seed, "variants": 0, "crash_points": 0, "cases": 0, "leaks": [],
             "converts": 0, "failures": [], "totals": {}}
    tmp = tempfile.mkdtemp(prefix="cowchain-pl-", dir=C.scratch_root())
    rng = random.Random(a.seed)
    try:
        i = 0
        while stats["variants"] < a.variants and time.monotonic() - t0 < a.deadline:
            i += 1
            cseed = a.seed * 100003 + i
            folder = os.path.join(tmp, f"case{i}")
            os.makedirs(folder)
            force = None
            if i % 3 == 0:
                force = {"clusters": [512] * 6, "refbits": [64] * 6, "compat": ["1.1"] * 6,
                         "size": 4 << 20, "max_size": 8 << 20}
            case = Case(folder, cseed, ops=a.ops, r=a.r,
                        budget=min(a.per_case, a.variants - stats["variants"]),
                        point_prob=a.point_prob, stats=stats, force=force)
            try:
                case.run()
            except Exception as e:  # noqa: BLE001 - the workload itself must not fail
                import traceback
                stats["failures"].append(f"powerloss seed {cseed}: workload failed: "
                                         f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            stats["cases"] += 1
            shutil.rmtree(folder, ignore_errors=True)
            rng.random()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stats["elapsed"] = time.monotonic() - t0
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
