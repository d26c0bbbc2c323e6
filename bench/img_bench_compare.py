#!/usr/bin/env python3
"""``cowchain img bench`` side by side with ``qemu-img bench`` on the same image.

Usage::

    python bench/img_bench_compare.py [--size 256M] [--count 50000] [--rounds 5]
                                      [--depth 8] [--workdir DIR] [--json OUT]

What it does:

1. Builds one QCOW2 image (64 KiB clusters, ``lazy_refcounts=on``) of ``--size`` bytes, every
   cluster written with random bytes (``qemu-img convert`` of a random raw file), so reads hit
   data and writes overwrite allocated clusters in place (no allocation on either side).
2. Runs each request pattern with both tools, on that same file, from the command line:
   ``qemu-img bench -f qcow2 -t writeback -i io_uring|threads -c N -s 4k [-d D] [-S STEP] [-w]``
   and ``cowchain img bench -f qcow2 -c N -s 4k [--threads D] [-S STEP] [-w]``.  Patterns:
   reads and writes; 4 KiB at queue depth 1 and at ``--depth`` (qemu-img: D requests in
   flight in one thread; cowchain: D threads with one request each, its way of keeping D
   requests in flight); sequential (step 4 KiB) and scattered (step 4 MiB + 4 KiB, the
   offsets ``(i * step) % size`` both tools visit).  ``qemu-img bench`` has no random
   offsets, so cowchain's ``--random`` rows have no peer and no ratio.
3. Rounds are interleaved (qemu-img, cowchain, qemu-img, cowchain, ... for each pattern,
   ``--rounds`` times); each figure is the median of its rounds.  Two times are kept per
   run: the run time the tool prints ("Run completed in X seconds": the requests, without
   process start-up; cowchain's includes its final flush after writes) and the wall time of
   the whole process.  The ratio is qemu-img's median over cowchain's (above 1: cowchain is
   faster).  The load average is printed at the start and at the end, since the machine may
   be shared.

Speed is never asserted in the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

KiB, MiB = 1 << 10, 1 << 20
RUN_TIME = re.compile(r"Run completed in ([0-9.]+) seconds")
SCATTER = 4 * MiB + 4 * KiB


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cowchain_cmd() -> list[str]:
    """The ``cowchain`` command beside this Python (a venv), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "cowchain")
    found = here if os.path.exists(here) else shutil.which("cowchain")
    if not found:
        sys.exit("cowchain is not installed (pip install -e .)")
    return [found]


def build(workdir: str, size: int) -> str:
    raw = os.path.join(workdir, "fill.raw")
    img = os.path.join(workdir, "bench.qcow2")
    with open(raw, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o",
                    "cluster_size=64k,lazy_refcounts=on", raw, img], check=True)
    os.unlink(raw)
    subprocess.run(["qemu-img", "check", "-q", img], check=True)
    return img


def pick_aio(img: str) -> str:
    r = subprocess.run(["qemu-img", "bench", "-f", "qcow2", "-t", "writeback", "-i",
                        "io_uring", "-c", "1", img], capture_output=True, text=True)
    return "io_uring" if r.returncode == 0 else "threads"


def patterns(count: int, depth: int) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for write in (False, True):
        for qd in (1, depth):
            for step, order in ((4 * KiB, "sequential"), (SCATTER, "scattered")):
                out.append({"write": write, "depth": qd, "step": step, "order": order,
                            "count": count})
            out.append({"write": write, "depth": qd, "step": None, "order": "random",
                        "count": count})
    return out


def name(p: dict[str, object]) -> str:
    return (f"{'write' if p['write'] else 'read'} 4k QD{p['depth']} {p['order']}")


def qemu_args(p: dict[str, object], img: str, aio: str) -> list[str] | None:
    if p["order"] == "random":
        return None
    a = ["qemu-img", "bench", "-f", "qcow2", "-t", "writeback", "-i", aio, "-c",
         str(p["count"]), "-s", "4096", "-d", str(p["depth"]), "-S", str(p["step"])]
    return a + (["-w"] if p["write"] else []) + [img]


def ours_args(p: dict[str, object], img: str) -> list[str]:
    a = cowchain_cmd() + ["img", "bench", "-f", "qcow2", "-c", str(p["count"]), "-s", "4096",
                          "-d", str(p["depth"]), "--threads", str(p["depth"])]
    a += ["--random", "--seed", "1"] if p["order"] == "random" else ["-S", str(p["step"])]
    return a + (["-w"] if p["write"] else []) + [img]


def run(args: list[str]) -> tuple[float, float]:
    """(reported run time, wall time) of one benchmark process."""
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    m = RUN_TIME.search(r.stdout)
    if r.returncode != 0 or not m:
        raise SystemExit(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return float(m.group(1)), wall


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="256M", help="image size (default 256M)")
    ap.add_argument("--count", type=int, default=50000, help="requests per run")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per pattern")
    ap.add_argument("--depth", type=int, default=8, help="the deeper queue (default 8)")
    ap.add_argument("--workdir", help="folder for the image (default: a temporary one)")
    ap.add_argument("--json", help="write every run here")
    a = ap.parse_args(argv)
    size = int(a.size[:-1]) * {"K": KiB, "M": MiB, "G": 1 << 30}[a.size[-1].upper()] \
        if a.size[-1].isalpha() else int(a.size)
    work = a.workdir or tempfile.mkdtemp(prefix="img-bench-")
    os.makedirs(work, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = loadavg()
    img = build(work, size)
    aio = pick_aio(img)
    # One warm-up run of each tool (page cache, imports).
    run(ours_args({"write": False, "depth": 1, "step": 4096, "order": "sequential",
                   "count": 1000}, img))
    run(["qemu-img", "bench", "-f", "qcow2", "-t", "writeback", "-i", aio, "-c", "1000",
         "-s", "4096", "-d", "1", img])
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {}
    pats = patterns(a.count, a.depth)
    for rnd in range(a.rounds):
        for p in pats:
            r = runs.setdefault(name(p), {"qemu-img": [], "cowchain": []})
            q = qemu_args(p, img, aio)
            if q is not None:
                r["qemu-img"].append(run(q))
            r["cowchain"].append(run(ours_args(p, img)))
        log(f"round {rnd + 1}/{a.rounds} done (load {loadavg()})")
    load_end = loadavg()
    subprocess.run(["qemu-img", "check", "-q", img], check=True)
    print(f"# cowchain img bench vs qemu-img bench, {started}: {size // MiB} MiB qcow2 "
          f"(64 KiB clusters, fully written), {a.count} requests of 4 KiB per run, "
          f"{a.rounds} interleaved rounds, medians; qemu-img -t writeback -i {aio}")
    print(f"# load average (1/5/15 min) at start {load_start}, at end {load_end}; "
          f"{os.cpu_count()} CPUs")
    print("| pattern | qemu-img bench (s) | cowchain img bench (s) | ratio | "
          "wall qemu-img (s) | wall cowchain (s) |")
    print("|---|---|---|---|---|---|")
    table = []
    for p in pats:
        r = runs[name(p)]
        ours_t = statistics.median(t for t, _ in r["cowchain"])
        ours_w = statistics.median(w for _, w in r["cowchain"])
        if r["qemu-img"]:
            q_t = statistics.median(t for t, _ in r["qemu-img"])
            q_w = statistics.median(w for _, w in r["qemu-img"])
            cells = [f"{q_t:.3f}", f"{ours_t:.3f}", f"{q_t / ours_t:.2f}x", f"{q_w:.3f}",
                     f"{ours_w:.3f}"]
        else:
            cells = ["n/a (no random offsets)", f"{ours_t:.3f}", "-", "-", f"{ours_w:.3f}"]
        print(f"| {name(p)} | " + " | ".join(cells) + " |")
        table.append({"pattern": name(p), **{k: v for k, v in p.items()}, "runs": r})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"started": started, "load_start": load_start, "load_end": load_end,
                       "size": size, "aio": aio, "rows": table}, f, indent=1)
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
