#!/usr/bin/env python3
"""4 KiB random writes into a fresh overlay with extended L2 entries, side by side.

Usage::

    python bench/xl2_compare.py [--size 1G] [--repeat 7] [--workdir DIR] [--json OUT]

What it measures, on one chain made by QEMU's tools (a base of random bytes and three
overlays, ``compare_qemu.build_chain``) and with the offsets ``qemu-img bench -w -S 4M+64K``
visits (one 4 KiB write per 64 KiB cluster of the disk, each at a cluster start, so each
covers two whole 2 KiB subclusters):

- ``xl2``: cowchain writing into a fresh overlay made with ``extended_l2=True`` (64 KiB
  clusters): each write allocates a cluster and copies nothing from below;
- ``copyup``: cowchain writing into a fresh plain overlay: each write is a copy-up of a whole
  64 KiB cluster (the ``write_copyup`` figure of compare_qemu.py);
- ``qemu_xl2``: ``qemu-img bench -w -d 1 -t writeback`` on a fresh ``extended_l2=on``
  overlay of the same chain; ``qemu`` the same on a plain overlay (for reference).

Every overlay has ``lazy_refcounts=on`` on both sides, as in compare_qemu.py.  A round is
one fresh overlay written once at every offset; rounds of the four run interleaved (xl2,
copyup, qemu_xl2, qemu, xl2, ...) after one warm-up round each, ``--repeat`` times; each
figure is the median of its rounds, in writes per second, and the ratios are of medians.  The final flush() of cowchain's overlays is timed apart and printed
(qemu-img bench does not time its final flush either).  The load average is printed at the
start and the end: the machine may be shared.  After the runs, ``qemu-img check`` of the last
overlays of each kind must be clean and the last cowchain overlays must read the same as
QEMU reads them.  Targets (README, Performance): xl2 at least 5x copyup, and ahead of qemu_xl2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_qemu as cq  # noqa: E402  (also imports the engine the caller means)

import numpy as np  # noqa: E402

engine = cq.engine
MiB = cq.MiB
CLUSTER = cq.CLUSTER


def measure(d: str, chain: dict, size: int, repeat: int) -> dict:
    top = chain["top"]
    q = cq.QemuBench(top)
    step = 4 * MiB + CLUSTER
    per_round = size // CLUSTER
    offs = cq.qemu_offsets(per_round, step, size).tolist()
    data = np.random.default_rng(4).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    counter = itertools.count()
    last: dict = {}
    flushes: dict = {"xl2": [], "copyup": []}

    def keep(tag, path):
        old, last[tag] = last.get(tag), path
        if old is not None:
            os.unlink(old)

    def qemu_round(tag, ext):
        def one():
            path = os.path.join(d, f"{tag}-{next(counter)}.qcow2")
            opts = "lazy_refcounts=on" + (",extended_l2=on" if ext else "")
            cq.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b",
                    os.path.basename(top), "-F", "qcow2", path], cwd=d)
            t = q.seconds(path, per_round, 4096, step, write=True)
            keep(tag, path)
            return t
        return one

    def cowchain_round(tag, ext):
        def one():
            path = os.path.join(d, f"{tag}-{next(counter)}.qcow2")
            img = engine.create(path, None, backing=os.path.basename(top),
                                backing_format="qcow2", lazy_refcounts=True, extended_l2=ext)
            w = img.write
            t0 = time.perf_counter()
            for o in offs:
                w(o, data)
            t1 = time.perf_counter()
            img.flush()                 # timed apart: not in the rate
            flushes[tag].append(time.perf_counter() - t1)
            img.close()
            keep(tag, path)
            return t1 - t0
        return one

    rounds = {"xl2": cowchain_round("xl2", True), "copyup": cowchain_round("copyup", False),
              "qemu_xl2": qemu_round("qemu_xl2", True), "qemu": qemu_round("qemu", False)}
    cq.log(f"warm-up ({per_round} writes per overlay)")
    for fn in rounds.values():
        fn()
    cq.log(f"measuring: {repeat} interleaved rounds, one fresh overlay each")
    runs: dict = {k: [] for k in rounds}
    for _ in range(repeat):
        for k, fn in rounds.items():
            runs[k].append(per_round / fn())
    checks = {}
    for tag, path in last.items():
        chk = subprocess.run(["qemu-img", "check", "-q", path], capture_output=True, text=True)
        checks[tag] = "clean" if chk.returncode == 0 else f"exit {chk.returncode}"
    same = {}
    for tag in ("xl2", "copyup"):
        qemu_view = os.path.join(d, "view.raw")
        cq.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", last[tag], qemu_view])
        cq.verify_chain(last[tag], qemu_view)      # exits with a message on a difference
        os.unlink(qemu_view)
        same[tag] = "reads as qemu-img convert reads it"
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"writes_per_overlay": per_round, "runs": runs, "median": med,
            "ratio_xl2_vs_copyup": med["xl2"] / med["copyup"],
            "ratio_xl2_vs_qemu_xl2": med["xl2"] / med["qemu_xl2"],
            "ratio_copyup_vs_qemu": med["copyup"] / med["qemu"],
            "flush_ms": {k: 1e3 * statistics.median(v) for k, v in flushes.items()},
            "qemu_aio": q.aio, "check": checks, "content": same}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="virtual size of the chain (default 1G)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--workdir")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    units = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
    size = int(a.size[:-1]) * units[a.size[-1].upper()] if a.size[-1].isalpha() else int(a.size)
    d = a.workdir or tempfile.mkdtemp(prefix="cowchain-xl2-")
    os.makedirs(d, exist_ok=True)
    load0 = os.getloadavg()
    try:
        cq.log(f"building the chain ({size >> 20} MiB base, 3 overlays) in {d}")
        chain = cq.build_chain(d, {"base": size, "overlays": 3, "overlay_bytes": 16 * MiB})
        cq.warm_files(chain["files"])
        res = measure(d, chain, size, a.repeat)
    finally:
        if not a.workdir:
            shutil.rmtree(d, ignore_errors=True)
    load1 = os.getloadavg()
    res.update(load_start=load0, load_end=load1, qemu=cq.qemu_version(), core=cq.core_build(),
               revision=cq.source_revision(), cpus=os.cpu_count())
    m = res["median"]
    print(f"4 KiB writes into a fresh overlay of a {size >> 20} MiB chain "
          f"({res['writes_per_overlay']} per overlay, one per 64 KiB cluster), "
          f"medians of {a.repeat} interleaved rounds, writes/s:")
    print(f"  cowchain extended_l2=on      {m['xl2']:>10,.0f}   (flush {res['flush_ms']['xl2']:.0f} ms)")
    print(f"  cowchain copy-up (plain)     {m['copyup']:>10,.0f}   (flush {res['flush_ms']['copyup']:.0f} ms)")
    print(f"  qemu-img bench -w, ext. L2   {m['qemu_xl2']:>10,.0f}   (-i {res['qemu_aio']})")
    print(f"  qemu-img bench -w, plain     {m['qemu']:>10,.0f}")
    print(f"  xl2 / copy-up      {res['ratio_xl2_vs_copyup']:6.2f}x  (target >= 5x: "
          f"{'met' if res['ratio_xl2_vs_copyup'] >= 5 else 'MISSED'})")
    print(f"  xl2 / qemu xl2     {res['ratio_xl2_vs_qemu_xl2']:6.2f}x  (target > 1x: "
          f"{'met' if res['ratio_xl2_vs_qemu_xl2'] > 1 else 'MISSED'})")
    print(f"  copy-up / qemu     {res['ratio_copyup_vs_qemu']:6.2f}x  (reference)")
    print(f"  qemu-img check of the last overlays: {res['check']}")
    print(f"  load average at start {load0[0]:.2f}, at end {load1[0]:.2f} ({os.cpu_count()} CPUs)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if all(v == "clean" for v in res["check"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
