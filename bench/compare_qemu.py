#!/usr/bin/env python3
"""cowchain vs QEMU, side by side, on the same files and in the same run (README, Performance).

Usage::

    python bench/compare_qemu.py [--quick] [--json OUT] [--workdir DIR [--reuse]]
                                 [--only GROUPS] [--repeat N] [--min-time S] [--batch N]

What it does:

1. Builds, with ``qemu-img``/``qemu-io``, the benchmark chain: a base volume fully written
   with random bytes (1 GiB; ``qemu-img convert`` of a raw file) and 10 QCOW2 overlays, each
   holding 16 MiB of scattered 64 KiB writes (``qemu-io write -P``).  ``qemu-img convert -O
   raw`` of the top gives the flat raw file the mmap reference reads.  Before measuring, the
   script checks that cowchain reads the whole chain byte-identically to that raw file.
2. Measures QEMU (``qemu-img bench``, queue depth 1, ``-t writeback``, ``-i io_uring`` where it
   works, else ``-i threads``; ``lazy_refcounts=on`` for the write figures) and cowchain on the
   same files, with the same offsets: ``qemu-img bench`` is sequential with a step, so a large
   odd step (4 MiB + 4 KiB for 4 KiB reads) scatters its requests, and cowchain replays
   exactly the offsets ``qemu-img bench`` visits (``(i * step) % size``).
   The other figures of the issue are measured in the same run: a 200-deep chain of small
   overlays made with engine.create (depth 200 vs depth 1), overlay creation over 1 TiB and
   1 GiB volumes, 2 reader threads vs 1, and the peak RSS of a fresh process that opens 200
   volumes of 1 TiB.
   The bulk operations, each against the qemu-img command that does the same work, on copies
   of the same files: export (``qemu-img convert``), delete_snapshot in the commit direction
   (``qemu-img commit`` + ``rebase -u``) and the pull direction (safe-mode ``qemu-img rebase``;
   ``convert -B`` in the note), on a repository made through the API and copied afresh for
   every round, and Repository.import_chain of a qcow2 and a raw disk (``qemu-img convert``
   into the same format); beside them the machine's ceilings, a bare durable copy of the
   same bytes and a bare fdatasync/fsync.  Then the figures of bench/xl2_compare.py (writes
   into an ``extended_l2=on`` overlay, its ``measure``) and of bench/metadata_ops.py
   (snapshot creation by size, depth and repository size; every metadata operation against
   repository size, its ``build_measured``/``add_catalog_rows`` and workers), so that one
   command prints every figure.
3. Prints one row per figure: reference, reference value, cowchain value, ratio, target,
   met/MISSED.  A missed target is printed as MISSED with its numbers, never hidden; a figure
   that cannot be measured here is printed as N/A with the reason.  Rows whose target says
   "info" are references measured in the same run to explain the others: the memory ceiling
   (the same reads from the flat raw file), the parallel CPU the machine gives right now, and
   diagnostics that call the compiled core directly (the cost of the Python-side wrapper).

Method: every timing uses time.perf_counter() over at least ``--min-time`` seconds (1 s; 0.03 s
with ``--quick``), after the files were read once into the page cache and after one warm-up
pass of each tool.  The runs of both sides of a ratio are interleaved (QEMU, cowchain, QEMU,
cowchain, ...), ``--repeat`` times (5; 1 with ``--quick``), and each figure is the best run
(the least disturbed one, as timeit reports), so that load from other jobs on a shared machine
hits both sides alike; every run is kept in the JSON output, and the load average and CPU
pressure at start and end are printed.  qemu-img bench reports its own run time (from the
first request to the last completion, without process start-up or the final flush); the
cowchain write figures likewise exclude the final flush(), whose time is printed beside them.

Speed is never asserted in the test suite; tests/test_bench_smoke.py only checks that
``--quick`` runs and prints every row.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import glob
import itertools
import json
import mmap
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

# numpy starts OpenBLAS threads that spin on the other core for a while; nothing here
# uses BLAS, and on a 2-core machine that spin would be billed to the figures.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _import_engine():
    """The engine the caller means: COWCHAIN_ENGINE_PATH (set by the smoke test to the package
    it imported), else whatever ``import engine`` finds, else the source tree of this
    checkout (built in place)."""
    p = os.environ.get("COWCHAIN_ENGINE_PATH")
    if p:
        sys.path.insert(0, p)
    try:
        import engine
    except ImportError:
        sys.path.insert(0, REPO)
        import engine
    return engine


engine = _import_engine()
ENGINE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
CLUSTER = 64 * KiB

# Every figure of the table, in the order printed (the smoke test checks these keys).
FIGURES = [
    "rand4k_loop",
    "rand4k_loop_core",
    "rand4k_batch",
    "rand4k_batch_abs",
    "rand4k_batch_ceiling",
    "seq1m_vs_qemu",
    "seq1m_vs_mmap",
    "write_copyup",
    "write_copyup_ceiling",
    "write_rewrite",
    "write_rewrite_core",
    "depth200_loop",
    "depth200_batch",
    "snapshot_ratio",
    "snapshot_abs",
    "cpu_parallel",
    "threads_2v1",
    "threads_ceiling",
    "threads_hot",
    "rss_open200",
    "cold_rand4k",
    "export_qcow2",
    "export_raw",
    "export_unsafe",
    "delete_commit",
    "delete_pull",
    "import_qcow2",
    "import_raw",
    "ceiling_copy",
    "ceiling_sync",
    "xl2_vs_copyup",
    "xl2_vs_qemu",
    "snapcase_1g_d5_few",
    "snapcase_1g_d5_many",
    "snapcase_1g_d300_few",
    "snapcase_1g_d300_many",
    "snapcase_1t_d5_few",
    "snapcase_1t_d5_many",
    "snapcase_1t_d300_few",
    "snapcase_1t_d300_many",
    "mdops_10",
    "mdops_100",
    "mdops_1000",
    "mdops_10000",
    "mdops_100000",
]

PROFILES = {
    # base size, overlays, bytes per overlay, deep-chain base size and depth, RSS chain depth
    "full": dict(base=1 * GiB, overlays=10, overlay_bytes=16 * MiB, deep_base=256 * MiB,
                 deep_depth=200, rss_depth=200, snap_reps=50, min_time=1.0, repeat=5,
                 merge_bytes=256 * MiB, pull_bytes=512 * MiB, md_depth=300,
                 md_background=400, md_rounds=4, md_snap_rounds=8, md_n=20,
                 md_max_volumes=100000,
                 md_fresh_process=True),
    "quick": dict(base=32 * MiB, overlays=10, overlay_bytes=1 * MiB, deep_base=8 * MiB,
                  deep_depth=10, rss_depth=20, snap_reps=3, min_time=0.03, repeat=1,
                  merge_bytes=8 * MiB, pull_bytes=16 * MiB, md_depth=8,
                  md_background=4, md_rounds=1, md_snap_rounds=1, md_n=2,
                  md_max_volumes=100,
                  md_fresh_process=False),
}


# --- small helpers ----------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class CommandFailed(RuntimeError):
    pass


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a command; a failure raises CommandFailed with the command's own message."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise CommandFailed(f"{' '.join(cmd[:6])}{' ...' if len(cmd) > 6 else ''} exited "
                            f"{proc.returncode}: {(proc.stderr or proc.stdout).strip()[:300]}")
    return proc


def core_build() -> str:
    """Which compiled core is measured, and whether it is older than its source."""
    import engine._core as core
    so = os.path.abspath(core.__file__)
    built = datetime.datetime.fromtimestamp(os.path.getmtime(so)).astimezone()
    text = f"{so} (built {built.isoformat(timespec='seconds')})"
    pyx = os.path.join(os.path.dirname(so), "_core.pyx")
    srcs = [pyx, *glob.glob(os.path.join(os.path.dirname(so), "_core_src", "*.pxi"))]
    if os.path.exists(pyx) and max(map(os.path.getmtime, srcs)) > os.path.getmtime(so):
        text += " WARNING: older than _core.pyx or a room it includes (stale build)"
    return text


def source_revision() -> str:
    """The commit of the checkout the engine comes from, and whether engine/ differs from it."""
    where = os.path.dirname(os.path.abspath(engine.__file__))
    try:
        head = run(["git", "-C", where, "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run(["git", "-C", where, "status", "--porcelain", "--", "."]).stdout.strip()
    except (CommandFailed, OSError):
        return "not a git checkout (installed package)"
    return head + (" with local changes in engine/" if dirty else "")


def qemu_version() -> str:
    return run(["qemu-img", "--version"]).stdout.splitlines()[0].strip()


def warm_files(paths) -> None:
    """Read every file once so that both tools start from a warm page cache."""
    buf = bytearray(8 * MiB)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def qemu_offsets(n: int, step: int, size: int, start: int = 0) -> np.ndarray:
    """The offsets qemu-img 7.2 bench visits: offset += step; offset %= image_size."""
    i = np.arange(n, dtype=np.uint64)
    return ((np.uint64(start) + i * np.uint64(step)) % np.uint64(size)).astype(np.uint64)


class QemuBench:
    """Runs ``qemu-img bench`` (queue depth 1, writeback cache) and returns its own timing."""

    _RE = re.compile(r"Run completed in ([0-9.]+) seconds")

    def __init__(self, probe_image: str):
        self.aio = "threads"
        try:
            run(["qemu-img", "bench", "-f", "qcow2", "-t", "writeback", "-i", "io_uring",
                 "-c", "16", probe_image])
            self.aio = "io_uring"
        except CommandFailed as e:
            log(f"io_uring unavailable ({e}); using -i threads")

    def seconds(self, image: str, count: int, bufsize: int, step: int, write=False) -> float:
        cmd = ["qemu-img", "bench", "-f", "qcow2", "-t", "writeback", "-i", self.aio,
               "-d", "1", "-c", str(count), "-s", str(bufsize), "-S", str(step)]
        if write:
            cmd.append("-w")
        out = run(cmd + [image]).stdout
        m = self._RE.search(out)
        if not m:
            raise CommandFailed(f"cannot parse qemu-img bench output: {out!r}")
        return max(float(m.group(1)), 1e-6)

    def rater(self, image, bufsize, step, min_time, write=False):
        """Calibrate and warm up; returns (a no-argument function giving ops/s, count)."""
        count = calibrate(lambda n: self.seconds(image, n, bufsize, step, write), min_time)
        self.seconds(image, max(count // 4, 1), bufsize, step, write)      # warm-up
        return (lambda: count / self.seconds(image, count, bufsize, step, write)), count


def calibrate(timed, min_time: float, n0: int = 64) -> int:
    """The op count that makes timed(n) (which returns seconds) last about 1.2 * min_time."""
    n = n0
    while True:
        t = timed(n)
        if t >= min_time / 8 or n >= 1 << 28:
            break
        n *= 4
    return max(int(n * 1.2 * min_time / t) + 1, 1)


def loop_rater(timed, min_time: float, warm_n: int, n0: int = 64, multiple: int = 1):
    """For a cowchain (or reference) loop timed(n) -> seconds: warm up with warm_n ops,
    calibrate, and return a no-argument function giving ops/s."""
    timed(warm_n)
    n = max(calibrate(timed, min_time, n0) // multiple, 1) * multiple
    return lambda: n / timed(n)


class Stat(float):
    """A rate: the best of interleaved runs (a float), with every run kept."""

    runs: list

    def __new__(cls, runs):
        self = super().__new__(cls, max(runs))
        self.runs = list(runs)
        return self

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


def interleave(raters: dict, repeat: int) -> dict:
    """Run every rater `repeat` times, alternating between them (so that a burst of load on
    this shared machine hits both sides of a ratio alike); returns {name: Stat}.  The best
    run of each is the figure (the least disturbed one, as timeit does); every run is kept in
    the JSON output."""
    runs = {k: [] for k in raters}
    for _ in range(repeat):
        for k, fn in raters.items():
            runs[k].append(fn())
    return {k: Stat(v) for k, v in runs.items()}


# --- building the images --------------------------------------------------------------------

def build_chain(d: str, p: dict) -> dict:
    """The issue's chain, made by QEMU's tools. Returns the paths."""
    base_size, n_ov, ov_bytes = p["base"], p["overlays"], p["overlay_bytes"]
    rng = np.random.default_rng(5)
    raw_src = os.path.join(d, "base-src.raw")
    with open(raw_src, "wb") as f:
        chunk = min(base_size, 64 * MiB)
        for _ in range(base_size // chunk):
            f.write(rng.integers(0, 256, chunk, dtype=np.uint8).tobytes())
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw_src, os.path.join(d, "base.qcow2")])
    os.unlink(raw_src)
    prev = "base.qcow2"
    nclusters = base_size // CLUSTER
    per = ov_bytes // CLUSTER
    for i in range(1, n_ov + 1):
        name = f"ov{i:02d}.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", prev, "-F", "qcow2", name],
            cwd=d)
        clusters = np.sort(rng.choice(nclusters, size=per, replace=False))
        cmds = []
        for c in clusters.tolist():
            cmds += ["-c", f"write -q -P {0x10 + i} {c * CLUSTER} {CLUSTER}"]
        # qemu-io takes every -c in one process; split to keep argv short
        for k in range(0, len(cmds), 512):
            run(["qemu-io", "-f", "qcow2", *cmds[k:k + 512], name], cwd=d)
        prev = name
    top = os.path.join(d, prev)
    flat = os.path.join(d, "flat.raw")
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", top, flat])
    return {"top": top, "flat": flat,
            "files": [os.path.join(d, "base.qcow2")] +
                     [os.path.join(d, f"ov{i:02d}.qcow2") for i in range(1, n_ov + 1)]}


def verify_chain(top: str, flat: str) -> None:
    """cowchain must read the chain exactly as qemu-img convert flattened it."""
    with engine.open(top, readonly=True) as img, open(flat, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            ref = np.frombuffer(m, dtype=np.uint8)
            if len(ref) != img.size:
                raise SystemExit(f"size mismatch: raw {len(ref)} vs cowchain {img.size}")
            buf = np.empty(64 * MiB, dtype=np.uint8)
            for off in range(0, img.size, len(buf)):
                n = min(len(buf), img.size - off)
                img.readinto(off, buf[:n])
                if not np.array_equal(buf[:n], ref[off:off + n]):
                    bad = off + int(np.argmax(buf[:n] != ref[off:off + n]))
                    raise SystemExit(f"cowchain reads differ from qemu-img convert at {bad:#x}")
            del ref
        finally:
            m.close()


def build_deep_chain(d: str, base_size: int, depth: int) -> tuple[str, str]:
    """A written base and `depth` - 1 small overlays above it, made with engine.create.
    Each overlay owns 4 scattered clusters; the top is at depth `depth`."""
    rng = np.random.default_rng(200)
    base = os.path.join(d, "deep-000.qcow2")
    with engine.create(base, base_size) as img:
        chunk = rng.integers(0, 256, 4 * MiB, dtype=np.uint8)
        for off in range(0, base_size, len(chunk)):
            img.write(off, chunk[: min(len(chunk), base_size - off)])
    prev = os.path.basename(base)
    nclusters = base_size // CLUSTER
    data = np.full(CLUSTER, 0x77, dtype=np.uint8)
    for i in range(1, depth):
        name = f"deep-{i:03d}.qcow2"
        with engine.create(os.path.join(d, name), base_size, backing=prev,
                           backing_format="qcow2") as img:
            for c in rng.choice(nclusters, size=4, replace=False).tolist():
                img.write(c * CLUSTER, data)
        prev = name
    return base, os.path.join(d, prev)


def build_big_chain(d: str, depth: int, size: int) -> str:
    """`depth` empty QCOW2 volumes of `size` bytes each (qemu-img create -u: the backing is
    not opened, so building stays linear in depth)."""
    prev = None
    for i in range(depth):
        name = f"big-{i:03d}.qcow2"
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if prev:
            cmd += ["-u", "-b", prev, "-F", "qcow2"]
        run(cmd + [name, str(size)], cwd=d)
        prev = name
    return os.path.join(d, prev)


def _chain_params(p: dict) -> list:
    return [p["base"], p["overlays"], p["overlay_bytes"]]


# --- results ----------------------------------------------------------------------------------

class Results:
    def __init__(self):
        self.rows: dict[str, dict] = {}

    def add(self, key, figure, ref_name, ref_value, cc_value, unit, ratio, target, met,
            note="", runs=None):
        """One row; `runs` ({name: Stat or list}) keeps every interleaved run for the JSON."""
        self.rows[key] = dict(key=key, figure=figure, reference=ref_name,
                              ref_value=None if ref_value is None else float(ref_value),
                              cowchain=None if cc_value is None else float(cc_value), unit=unit,
                              ratio=ratio, target=target,
                              result=("met" if met else "MISSED") if met is not None else "info",
                              note=note,
                              runs={str(k): list(getattr(v, "runs", v))
                                    for k, v in (runs or {}).items()})

    def na(self, key, figure, target, why):
        self.rows[key] = dict(key=key, figure=figure, reference="-", ref_value=None,
                              cowchain=None, unit="", ratio=None, target=target, result="N/A",
                              note=why)

    def table(self) -> str:
        def fmt(v, unit):
            if v is None:
                return "-"
            if abs(v) < 100:
                return f"{v:.2f} {unit}"
            if unit == "ms":
                return f"{v:.2f} ms"
            if unit == "MB":
                return f"{v:.1f} MB"
            if unit == "MiB/s":
                return f"{v:,.0f} MiB/s"
            return f"{v:,.0f} {unit}"

        head = ["figure", "reference", "ref value", "cowchain", "ratio", "target", "result"]
        body = []
        for k in FIGURES:
            r = self.rows.get(k)
            if r is None:
                body.append([f"{k}: not run", "-", "-", "-", "-", "-", "N/A: not run"])
                continue
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            body.append([f"{k}: {r['figure']}", r["reference"], fmt(r["ref_value"], r["unit"]),
                         fmt(r["cowchain"], r["unit"]), ratio, r["target"], r["result"]])
        widths = [max(len(str(x[i])) for x in body + [head]) for i in range(len(head))]
        lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
                 "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        for row in body:
            lines.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
        notes = [f"- {k}: {self.rows[k]['note']}" for k in FIGURES
                 if k in self.rows and self.rows[k]["note"]]
        return "\n".join(lines + ([""] + ["Notes:"] + notes if notes else []))


# --- the figures ------------------------------------------------------------------------------

def _offset_loop(call, arg, size, step):
    """timed(n): n calls call(offset, arg) at the qemu-img bench offsets, from Python."""
    def timed(n):
        offs = qemu_offsets(n, step, size).tolist()
        t = time.perf_counter()
        for o in offs:
            call(o, arg)
        return time.perf_counter() - t

    return timed


def _read_loop(img, size, step, length=4096):
    """timed(n): n readinto calls of `length` bytes at the qemu-img bench offsets."""
    buf = bytearray(length) if length <= 4096 else np.empty(length, dtype=np.uint8)
    return _offset_loop(img.readinto, buf, size, step)


def _readv_loop(img, size, step, batch):
    """timed(n): n 4 KiB reads at the qemu-img bench offsets, `batch` per readv call."""
    out = np.empty(batch * 4096, dtype=np.uint8)
    rv = img.readv

    def timed(n):
        offs = qemu_offsets(n, step, size)
        parts = [offs[i:i + batch] for i in range(0, n, batch)]
        t = time.perf_counter()
        for part in parts:
            rv(part, 4096, out)
        return time.perf_counter() - t

    return timed


def _core_of(img):
    """The image's compiled core object, for the diagnostic rows only (a private attribute:
    if it is gone or changed, those rows say so and nothing else is affected)."""
    core = getattr(img, "_core", None)
    return core if core is not None and hasattr(core, "readinto") else None


def _diagnostic(res, key, figure, ref_name, ref_value, value, unit):
    if value is None:
        res.na(key, figure, "info", "the image has no _core attribute to call directly")
        return
    res.add(key, figure, ref_name, ref_value, value, unit, value / ref_value,
            "info (diagnostic)", None, "the same Python loop calling the core object "
            "directly (private API): Image.readinto and Image.write are the core's methods "
            "bound at open, so this reads about 1.0x unless a Python layer creeps back in")


def fig_random_reads(res, q, chain, p, batch):
    top, flat = chain["top"], chain["flat"]
    size = os.path.getsize(flat)
    step = 4 * MiB + 4 * KiB
    mt, rep = p["min_time"], p["repeat"]
    warm = min(size // 4096, 1 << 18)
    log("4 KiB random reads: calibrating qemu-img bench, cowchain and the raw reference")
    q_rater, q_count = q.rater(top, 4096, step, mt)
    # the machine's ceiling: the same batch of 4 KiB pieces from the flat raw file, i.e. one
    # memcpy each out of one mapping, with no lookup at all
    with engine.open(top, readonly=True) as img, \
            engine.open(flat, format="raw", readonly=True) as raw:
        raters = {
            "qemu": q_rater,
            "loop": loop_rater(_read_loop(img, size, step), mt, warm),
            "batch": loop_rater(_readv_loop(img, size, step, batch), mt, warm, batch * 4, batch),
            "mmap": loop_rater(_readv_loop(raw, size, step, batch), mt, warm, batch * 4, batch),
        }
        core = _core_of(img)
        if core is not None:
            raters["core"] = loop_rater(_read_loop(core, size, step), mt, warm)
        log("4 KiB random reads: measuring (interleaved)")
        r = interleave(raters, rep)
    qv, loop, bat, mm = r["qemu"], r["loop"], r["batch"], r["mmap"]
    res.add("rand4k_loop", "4 KiB random reads, 11-volume chain, one readinto per read "
            "(Python loop)", f"qemu-img bench -d 1 -i {q.aio}", qv, loop, "IOPS", loop / qv,
            ">= 8x", loop >= 8 * qv,
            f"qemu-img bench -s 4096 -S {step} (step 4 MiB + 4 KiB scatters the requests; "
            f"{q_count} requests per run); cowchain replays the same offsets", runs=r)
    _diagnostic(res, "rand4k_loop_core", "4 KiB random reads, the same loop calling the core "
                "object directly (diagnostic: Image.readinto is bound to it)",
                "Image.readinto loop", loop, r.get("core"), "IOPS")
    res.add("rand4k_batch", f"4 KiB random reads, batch Image.readv({batch} offsets, 4096, out)",
            f"qemu-img bench -d 1 -i {q.aio}", qv, bat, "IOPS", bat / qv, ">= 25x",
            bat >= 25 * qv)
    res.add("rand4k_batch_abs", "4 KiB random reads, batch call, absolute", "-", None, bat,
            "reads/s", None, ">= 3,000,000/s", bat >= 3_000_000)
    res.add("rand4k_batch_ceiling", "4 KiB random reads, batch, vs the same batch from the "
            "flat raw file (a memcpy per read out of one mapping, no lookups)",
            "readv on flat raw", mm, bat, "reads/s", bat / mm, "info (memory ceiling)", None,
            "what copying the same 4 KiB pieces out of one mapping costs on this machine: "
            "the part of the batch figure that no lookup speed-up can remove", runs=r)


def annotate_bandwidth(res):
    """Put the absolute batch target next to this run's own copy bandwidth: 3 M reads/s of
    4 KiB is a rate of copying, and the plain mmap copy of the seq figure measures what the
    machine gives (sequential, so an upper bound for scattered pieces)."""
    row, seq = res.rows.get("rand4k_batch_abs"), res.rows.get("seq1m_vs_mmap")
    if not row or not seq or not seq.get("ref_value") or row.get("cowchain") is None:
        return
    need = 3_000_000 * 4096 / MiB
    got = row["cowchain"] * 4096 / MiB
    row["note"] = (f"3,000,000 reads/s of 4 KiB is {need:,.0f} MiB/s of copying; this run's "
                   f"plain sequential mmap copy (seq1m_vs_mmap reference) moved "
                   f"{seq['ref_value']:,.0f} MiB/s and the batch moved {got:,.0f} MiB/s: the "
                   f"target is {'above' if need > seq['ref_value'] else 'within'} this "
                   f"machine's copy bandwidth")


def fig_seq_reads(res, q, chain, p):
    top, flat = chain["top"], chain["flat"]
    size = os.path.getsize(flat)
    mt, rep = p["min_time"], p["repeat"]
    log("1 MiB sequential reads: calibrating")
    q_rater, _ = q.rater(top, MiB, MiB, mt)           # requests/s == MiB/s
    buf = np.empty(MiB, dtype=np.uint8)
    with engine.open(top, readonly=True) as img, open(flat, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        views = [np.frombuffer(m, dtype=np.uint8)]     # dropped before the mmap closes

        def mloop(n):
            arr = views[0]
            offs = [(i * MiB) % size for i in range(n)]
            t = time.perf_counter()
            for o in offs:
                np.copyto(buf, arr[o:o + MiB])
            return time.perf_counter() - t

        raters = {"qemu": q_rater,
                  "cowchain": loop_rater(_read_loop(img, size, MiB, MiB), mt, size // MiB, 16),
                  "mmap": loop_rater(mloop, mt, size // MiB, 16)}
        log("1 MiB sequential reads: measuring (interleaved)")
        r = interleave(raters, rep)
        views.clear()
        m.close()
    qv, cc, mm = r["qemu"], r["cowchain"], r["mmap"]
    res.add("seq1m_vs_qemu", "1 MiB sequential reads, 11-volume chain (readinto loop)",
            f"qemu-img bench -s 1M -i {q.aio}", qv, cc, "MiB/s", cc / qv, ">= 1.5x",
            cc >= 1.5 * qv, runs=r)
    res.add("seq1m_vs_mmap", "1 MiB sequential reads vs a plain mmap copy of the same bytes",
            "numpy.copyto from mmap of flat raw", mm, cc, "MiB/s", cc / mm, ">= 0.8x",
            cc >= 0.8 * mm, "flat raw = qemu-img convert -O raw of the top of the chain")


def fig_writes(res, q, chain, p, d):
    top = chain["top"]
    size = os.path.getsize(chain["flat"])
    mt, rep = p["min_time"], p["repeat"]
    step = 4 * MiB + CLUSTER            # 65 clusters: odd, so one pass hits every cluster once
    # One round writes every cluster once, so that the sequence (period size // CLUSTER) wraps
    # onto clusters already written: more requests on the same overlay are rewrites, which is
    # how qemu-img bench (no way to cycle a subset) measures them too.
    per_round = size // CLUSTER
    offs_np = qemu_offsets(per_round, step, size)
    assert len(np.unique(offs_np // np.uint64(CLUSTER))) == per_round
    offs = offs_np.tolist()
    data = np.random.default_rng(4).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    counter = itertools.count()
    kept: dict = {"q": None, "c": None}       # the last fresh overlay of each tool
    flush_times: list = []

    def keep(tag, obj):
        old, kept[tag] = kept[tag], obj
        if old is not None:
            path = old if isinstance(old, str) else old.path
            if not isinstance(old, str):
                old.close()
            os.unlink(path)

    def q_round():
        path = os.path.join(d, f"fresh-q-{next(counter)}.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on",
             "-b", os.path.basename(top), "-F", "qcow2", path], cwd=d)
        t = q.seconds(path, per_round, 4096, step, write=True)
        keep("q", path)
        return t

    def c_round():
        path = os.path.join(d, f"fresh-c-{next(counter)}.qcow2")
        img = engine.create(path, None, backing=os.path.basename(top), backing_format="qcow2",
                            lazy_refcounts=True)
        w = img.write
        t = time.perf_counter()
        for o in offs:
            w(o, data)
        dt = time.perf_counter() - t
        t = time.perf_counter()
        img.flush()
        flush_times.append(time.perf_counter() - t)
        keep("c", img)
        return dt

    flat_f = open(chain["flat"], "rb")
    flat_map = mmap.mmap(flat_f.fileno(), 0, access=mmap.ACCESS_READ)
    flat_mv = memoryview(flat_map)
    cluster_offs = [o // CLUSTER * CLUSTER for o in offs]

    def ceiling_round():
        """The copy a copy-up cannot avoid, with nothing else: each 64 KiB cluster pwritten
        from a mapping of the flat raw file into the next cluster of a new file."""
        path = os.path.join(d, f"fresh-m-{next(counter)}.raw")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            pw = os.pwrite
            t = time.perf_counter()
            for k, o in enumerate(cluster_offs):
                pw(fd, flat_mv[o:o + CLUSTER], k * CLUSTER)
            dt = time.perf_counter() - t
            os.fdatasync(fd)
        finally:
            os.close(fd)
            os.unlink(path)
        return dt

    def rounds(one_round):
        """Rounds of per_round copy-up writes until min_time has accumulated: ops/s."""
        def rate():
            total, ops = 0.0, 0
            while total < mt or ops == 0:
                total += one_round()
                ops += per_round
            return ops / total
        return rate

    log("4 KiB copy-up writes into fresh overlays: warm-up, then interleaved")
    q_round()
    c_round()
    ceiling_round()
    cu = interleave({"qemu": rounds(q_round), "cowchain": rounds(c_round),
                     "ceiling": rounds(ceiling_round)}, rep)
    del flat_mv
    flat_map.close()
    flat_f.close()
    copyup_flush = statistics.median(flush_times)

    log("4 KiB rewrites: calibrating, then interleaved")
    q_rater, q_rw_count = q.rater(kept["q"], 4096, step, mt, write=True)
    img = kept["c"]
    raters = {"qemu": q_rater,
              "cowchain": loop_rater(_offset_loop(img.write, data, size, step), mt, per_round)}
    core = _core_of(img)
    if core is not None:
        raters["core"] = loop_rater(_offset_loop(core.write, data, size, step), mt, per_round)
    rw = interleave(raters, rep)
    t = time.perf_counter()
    img.flush()
    rw_flush = time.perf_counter() - t
    checks = []
    for tag in ("q", "c"):
        if tag == "c":
            kept["c"].close()
            kept["c"] = kept["c"].path
        chk = subprocess.run(["qemu-img", "check", "-q", kept[tag]], capture_output=True,
                             text=True)
        checks.append("clean" if chk.returncode == 0 else
                      f"exit {chk.returncode}: {(chk.stdout + chk.stderr).strip()[:200]}")
    check_note = f"qemu-img check of the written overlays: QEMU's {checks[0]}, cowchain's " \
                 f"{checks[1]}"
    qv, cc = cu["qemu"], cu["cowchain"]
    res.add("write_copyup", "4 KiB writes into a fresh overlay (each a copy-up from below)",
            f"qemu-img bench -w -i {q.aio}, lazy_refcounts=on", qv, cc, "IOPS", cc / qv,
            ">= 10x", cc >= 10 * qv,
            f"-S {step} (4 MiB + 64 KiB): {per_round} writes per fresh overlay, one per cluster; "
            f"cowchain's final flush() takes {copyup_flush * 1e3:.0f} ms per overlay, not in the "
            f"rate (qemu-img bench does not time its final flush either); {check_note}", runs=cu)
    res.add("write_copyup_ceiling", "4 KiB copy-up writes vs the bare copy of their clusters "
            "(64 KiB pwrite from a mapping of the flat raw file into a new file, no lookups)",
            "pwrite loop", cu["ceiling"], cc, "IOPS", cc / cu["ceiling"], "info (memory ceiling)",
            None, "a copy-up must put a whole 64 KiB cluster into the page cache of the new "
            "file: the part of the copy-up figure that no engine can remove on this machine",
            runs={"ceiling": cu["ceiling"], "cowchain": cc})
    qv, cc = rw["qemu"], rw["cowchain"]
    res.add("write_rewrite", "4 KiB rewrites of allocated clusters",
            f"qemu-img bench -w -i {q.aio}, lazy_refcounts=on", qv, cc, "IOPS", cc / qv,
            ">= 10x", cc >= 10 * qv,
            f"the same offsets again on the written overlays ({q_rw_count} requests per qemu "
            f"run); cowchain's final flush() {rw_flush * 1e3:.0f} ms, not in the rate", runs=rw)
    _diagnostic(res, "write_rewrite_core", "4 KiB rewrites, the same loop calling the core "
                "object directly (diagnostic: Image.write is bound to it)",
                "Image.write loop", cc, rw.get("core"), "IOPS")


def fig_depth(res, p, d, batch):
    mt, rep = p["min_time"], p["repeat"]
    depth = p["deep_depth"]
    log(f"depth {depth}: building the chain with engine.create")
    t0 = time.perf_counter()
    base, top = build_deep_chain(d, p["deep_base"], depth)
    build_s = time.perf_counter() - t0
    size = p["deep_base"]
    step = 4 * MiB + 4 * KiB
    warm = size // 4096
    with engine.open(base, readonly=True) as one, engine.open(top, readonly=True) as deep:
        if len(deep.chain()) != depth:
            raise SystemExit(f"deep chain has {len(deep.chain())} volumes, not {depth}")
        log(f"depth {depth}: calibrating, then interleaved")
        raters = {
            ("depth1", "loop"): loop_rater(_read_loop(one, size, step), mt, warm),
            ("deep", "loop"): loop_rater(_read_loop(deep, size, step), mt, warm),
            ("depth1", "batch"): loop_rater(_readv_loop(one, size, step, batch), mt, warm,
                                            batch * 4, batch),
            ("deep", "batch"): loop_rater(_readv_loop(deep, size, step, batch), mt, warm,
                                          batch * 4, batch),
        }
        r = interleave(raters, rep)
    for kind, label in (("loop", "readinto loop"), ("batch", f"readv batch of {batch}")):
        r1, rd = r["depth1", kind], r["deep", kind]
        res.add(f"depth200_{kind}", f"4 KiB random reads at depth {depth} vs depth 1 ({label})",
                "depth 1 (the base alone)", r1, rd, "IOPS", rd / r1, ">= 0.8x", rd >= 0.8 * r1,
                (f"base {size // MiB} MiB written, {depth - 1} overlays of 4 clusters each; "
                 f"chain built in {build_s:.1f} s") if kind == "loop" else "",
                runs={"depth1": r1, "deep": rd})


def fig_snapshot(res, p, d):
    reps = p["snap_reps"]
    times: dict = {"1G": [], "1T": []}
    close_ms = []
    bases = {"1G": ("snapbase-1G.qcow2", GiB), "1T": ("snapbase-1T.qcow2", TiB)}
    # The write figures before this one leave gigabytes for writeback; let the disk settle
    # so that their journal traffic is not billed to these fsyncs.
    os.sync()
    for base, size in bases.values():
        run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(size)], cwd=d)
    for i in range(reps + 1):
        for label, (base, size) in bases.items():          # alternate the two sizes
            path = os.path.join(d, f"snap-{label}-{i}.qcow2")
            t = time.perf_counter()
            img = engine.create(path, size, backing=base, backing_format="qcow2")
            dt = time.perf_counter() - t
            t = time.perf_counter()
            img.close()
            close_ms.append((time.perf_counter() - t) * 1e3)
            os.unlink(path)
            if i:                   # the first of each is the warm-up
                times[label].append(dt * 1e3)
    g, t = statistics.median(times["1G"]), statistics.median(times["1T"])
    res.add("snapshot_ratio", "snapshot creation (engine.create overlay), 1 TiB vs 1 GiB",
            "1 GiB virtual size", g, t, "ms", t / g, "<= 1.2x", t <= 1.2 * g,
            f"median of {reps} creates of each size, alternating (fastest: "
            f"{min(times['1G']):.2f} ms at 1 GiB, {min(times['1T']):.2f} ms at 1 TiB); create() "
            f"returns the open overlay; its close() takes {statistics.median(close_ms):.2f} ms "
            f"more, not counted", runs=times)
    res.add("snapshot_abs", "snapshot creation, absolute (1 GiB | 1 TiB)", "1 GiB virtual size",
            g, t, "ms", None, "< 2 ms each", max(g, t) < 2.0)


def _timed_export(cmd_or_fn, out: str):
    """A rater for interleave(): seconds of one export into OUT (removed before and after,
    outside the timing)."""
    def once():
        for path in (out, out + ".tmp"):
            if os.path.exists(path):
                os.unlink(path)
        t = time.perf_counter()
        if callable(cmd_or_fn):
            cmd_or_fn()
        else:
            run(cmd_or_fn)
        dt = time.perf_counter() - t
        os.unlink(out)
        return dt

    return once


def fig_export(res, chain, p, d):
    """Flatten the chain into one new file: ``qemu-img convert -t writeback`` (durable at
    exit, as an export is) and ``-t unsafe`` (qemu-img's default: no flush) against
    engine.open + ops.convert (durable before it returns), both formats, interleaved."""
    from engine import ops

    top, size = chain["top"], os.path.getsize(chain["flat"])
    raters = {}
    for fmt in ("qcow2", "raw"):
        out = os.path.join(d, f"export-out.{fmt}")

        def cowchain(fmt=fmt, out=out):
            with engine.open(top, readonly=True) as img:
                ops.convert(img, out, format=fmt)

        raters[f"qemu-img convert -t writeback -O {fmt}"] = _timed_export(
            ["qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O", fmt, top, out], out)
        raters[f"qemu-img convert -t unsafe -O {fmt}"] = _timed_export(
            ["qemu-img", "convert", "-t", "unsafe", "-f", "qcow2", "-O", fmt, top, out], out)
        raters[f"cowchain export {fmt}"] = _timed_export(cowchain, out)
    for fn in raters.values():          # warm-up pass of each, not counted
        fn()
    runs = {k: [] for k in raters}
    for _ in range(p["repeat"]):
        for k, fn in raters.items():
            runs[k].append(fn())
    best = {k: min(v) for k, v in runs.items()}
    note = (f"{size // MiB} MiB virtual disk, best of {p['repeat']} interleaved runs each, "
            f"seconds from the command's start to a durable file (qemu-img's process start "
            f"included; cowchain's open of the chain included)")
    for fmt in ("qcow2", "raw"):
        ref, cc = best[f"qemu-img convert -t writeback -O {fmt}"], best[f"cowchain export {fmt}"]
        res.add(f"export_{fmt}", f"export the chain to {fmt} (s)",
                "qemu-img convert -t writeback", ref, cc, "s", ref / cc, ">= 1.2x",
                ref >= 1.2 * cc, note, runs={k: v for k, v in runs.items() if fmt in k})
    uq, ur = best["qemu-img convert -t unsafe -O qcow2"], best["qemu-img convert -t unsafe -O raw"]
    cq = best["cowchain export qcow2"]
    res.add("export_unsafe", "export to qcow2 | raw vs qemu-img -t unsafe (no flush; s)",
            "qemu-img convert -t unsafe", uq, cq, "s", uq / cq, "info", None,
            f"qemu-img -t unsafe: {uq:.2f} s to qcow2, {ur:.2f} s to raw; cowchain (durable): "
            f"{cq:.2f} s to qcow2, {best['cowchain export raw']:.2f} s to raw")



# --- delete_snapshot, import and the machine's ceilings ---------------------------------------

def _fill(c, size: int, rng) -> None:
    """Write SIZE bytes of random data through C's write from offset 0 (8 MiB steps)."""
    step = 8 * MiB
    for off in range(0, size, step):
        c.write(off, rng.integers(0, 256, min(step, size - off), dtype=np.uint8).tobytes())


def _scatter(c, size: int, nbytes: int, rng, fill: int) -> None:
    """NBYTES of 64 KiB writes at random clusters of a SIZE-byte disk (each cluster once)."""
    data = bytes([fill]) * CLUSTER
    for k in np.sort(rng.choice(size // CLUSTER, size=nbytes // CLUSTER, replace=False)).tolist():
        c.write(k * CLUSTER, data)


def build_merge_repo(path: str, p: dict) -> dict:
    """The issue's merge case through the Repository API: chain 'm' of a qcow2 base fully
    written (p['base']), overlay 1 holding p['merge_bytes'] of scattered 64 KiB writes,
    overlay 2 holding p['pull_bytes'] and an empty leaf; snapshots s1 (base), s2 (overlay 1),
    s3 (overlay 2).  Deleting s1 commits overlay 1 down (256 MiB against 768 to pull), deleting
    s2 pulls overlay 1 up into overlay 2 (what overlay 2 does not hold, against 512 MiB to
    commit).  Returns the volumes' paths relative to the repository and the snapshot ids."""
    rng = np.random.default_rng(13)
    size = p["base"]
    with engine.Repository.create(path) as repo:
        c = repo.create_chain("m", size, base_format="qcow2")
        _fill(c, size, rng)
        s1 = c.snapshot()
        _scatter(c, size, p["merge_bytes"], rng, 0x31)
        s2 = c.snapshot()
        _scatter(c, size, p["pull_bytes"], rng, 0x32)
        s3 = c.snapshot()
        vols = {v.id: os.path.relpath(v.path, path) for v in c.volumes}
        snaps = [s1, s2, s3]
        out = {"snapshots": [s.id for s in snaps],
               "files": [vols[s.volume] for s in snaps] + [vols[c.leaf.id]]}
    return out


def _copy_tree(src: str, dst: str) -> None:
    """A copy of the folder SRC at DST, written back to disk (each file fsynced: the timed
    syncs that follow then write only what the timed operation wrote, and other jobs' dirty
    data on this shared machine is not waited for, as os.sync would)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    for folder, _, names in os.walk(dst):
        for name in names + ["."]:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def fig_merge(res, p, d):
    """delete_snapshot in both directions against qemu-img on copies of the same volumes:
    each round copies the master repository afresh for each side, outside the timing, and
    syncs the copy so that no copy's writeback is billed to the timed syncs."""
    master = os.path.join(d, "merge-master")
    log(f"delete_snapshot: building the repository ({p['base'] // MiB} MiB base, overlays of "
        f"{p['merge_bytes'] // MiB} and {p['pull_bytes'] // MiB} MiB) through the API")
    shutil.rmtree(master, ignore_errors=True)
    m = build_merge_repo(master, p)
    base, ov1, ov2, leaf = m["files"]
    s1, s2, _ = m["snapshots"]
    fresh = os.path.join(d, "merge-q")
    cc_copy = os.path.join(d, "merge-c")
    directions: dict = {}

    def setup(folder):
        _copy_tree(master, folder)

    def cowchain(sid, direction):
        def once():
            setup(cc_copy)
            with engine.Repository.open(cc_copy) as repo:
                c = repo.chain("m")
                t = time.perf_counter()
                r = c.delete_snapshot(sid)
                dt = time.perf_counter() - t
            directions[direction] = r.direction
            if r.direction != direction:
                raise SystemExit(f"delete_snapshot chose {r.direction}, the case expects "
                                 f"{direction} (commit {r.commit_bytes}, pull {r.pull_bytes})")
            return dt
        return once

    def qemu(cmds, tag):
        def once():
            setup(fresh)
            t = time.perf_counter()
            for cmd in cmds:
                run(cmd, cwd=fresh)
            t1 = time.perf_counter()
            # cowchain's delete_snapshot removes the merged-away volume: so does this side
            os.unlink(os.path.join(fresh, ov1))
            t2 = time.perf_counter()
            unlinks.setdefault(tag, []).append(t2 - t1)
            return t2 - t
        return once

    unlinks: dict = {}
    wb = ["-t", "writeback"]
    raters = {
        "commit qemu": qemu([["qemu-img", "commit", "-q", *wb, "-d", ov1],
                             ["qemu-img", "rebase", "-q", "-u", "-b",
                              os.path.basename(base), "-F", "qcow2", ov2]], "commit"),
        "commit cowchain": cowchain(s1, "commit"),
        "pull qemu rebase": qemu([["qemu-img", "rebase", "-q", *wb, "-b",
                                   os.path.basename(base), "-F", "qcow2", ov2]], "rebase"),
        "pull qemu convert -B": qemu([["qemu-img", "convert", *wb, "-f", "qcow2", "-O",
                                       "qcow2", "-B", os.path.basename(base), "-F", "qcow2",
                                       ov2, ov2 + ".new"]], "convert"),
        "pull cowchain": cowchain(s2, "pull"),
    }
    log("delete_snapshot: warm-up, then interleaved rounds")
    warm_files([os.path.join(master, f) for f in m["files"]])
    runs = {k: [] for k in raters}
    for i in range(p["repeat"] + 1):
        for k, fn in raters.items():
            t = fn()
            if i:                   # the first round is the warm-up
                runs[k].append(t)
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.rmtree(cc_copy, ignore_errors=True)
    shutil.rmtree(master, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    case = (f"{p['base'] // MiB} MiB qcow2 base fully written; overlay 1 holds "
            f"{p['merge_bytes'] // MiB} MiB, overlay 2 {p['pull_bytes'] // MiB} MiB (scattered "
            f"64 KiB clusters), made through the Repository API; median of {p['repeat']} "
            f"interleaved rounds, each on fresh copies of the same files (copy and fsync "
            f"outside the timing); seconds to a durable result, qemu-img's process starts "
            f"included, cowchain's Chain.delete_snapshot (opening the volumes included); the "
            f"qemu side ends with os.unlink of overlay 1, as cowchain removes the merged-away "
            f"volume (median unlink {1e3 * statistics.median(unlinks['commit']):.0f} ms; "
            f"qemu-img alone {med['commit qemu'] - statistics.median(unlinks['commit']):.2f} s"
            f", {(med['commit qemu'] - statistics.median(unlinks['commit'])) / med['commit cowchain']:.2f}x)")
    ref, cc = med["commit qemu"], med["commit cowchain"]
    res.add("delete_commit", "delete_snapshot, commit direction: overlay 1 down into the base "
            "(s)", "qemu-img commit -t writeback -d + rebase -u + unlink", ref, cc, "s", ref / cc,
            ">= 1.2x", ref >= 1.2 * cc, case,
            runs={k: v for k, v in runs.items() if k.startswith("commit")})
    ref, alt, cc = med["pull qemu rebase"], med["pull qemu convert -B"], med["pull cowchain"]
    res.add("delete_pull", "delete_snapshot, pull direction: overlay 1 up into overlay 2 (s)",
            "qemu-img rebase -t writeback (safe mode) + unlink", ref, cc, "s", ref / cc, ">= 1.2x",
            ref >= 1.2 * cc,
            f"qemu-img convert -t writeback -B base (a new overlay 2) + unlink: {alt:.2f} s, "
            f"{alt / cc:.2f}x; the row's figure is safe-mode rebase + unlink of overlay 1, "
            f"which writes into overlay 2 as cowchain does (qemu-img rebase alone "
            f"{ref - statistics.median(unlinks['rebase']):.2f} s, "
            f"{(ref - statistics.median(unlinks['rebase'])) / cc:.2f}x)",
            runs={k: v for k, v in runs.items() if k.startswith("pull")})


def _bare_copy(src: str, dst: str) -> float:
    """Seconds to copy SRC into a new file DST with 8 MiB read + write and one fdatasync."""
    buf = bytearray(8 * MiB)
    t = time.perf_counter()
    with open(src, "rb", buffering=0) as f, open(dst, "wb", buffering=0) as g:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            g.write(memoryview(buf)[:n])
        os.fdatasync(g.fileno())
    return time.perf_counter() - t


def _cfr_copy(src: str, dst: str) -> float:
    """Seconds to copy SRC into a new file DST with copy_file_range and one fdatasync."""
    t = time.perf_counter()
    with open(src, "rb", buffering=0) as f, open(dst, "wb", buffering=0) as g:
        left = os.fstat(f.fileno()).st_size
        while left:
            n = os.copy_file_range(f.fileno(), g.fileno(), min(left, 1 << 30))
            if not n:
                break
            left -= n
        os.fdatasync(g.fileno())
    return time.perf_counter() - t


def _sync_latency(d: str, n: int) -> tuple[float, float]:
    """Median ms of a 4 KiB pwrite + fdatasync, and of the same + fsync (alternating), on
    this filesystem; each write goes to a page of its own of a file written and synced
    before, so every sync has exactly one dirty page to write and no size change."""
    path = os.path.join(d, "sync-probe.bin")
    ts: dict = {os.fdatasync: [], os.fsync: []}
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, b"\1" * 4096 * 2 * n, 0)
        os.fsync(fd)
        for i in range(2 * n):
            sync = os.fdatasync if i % 2 == 0 else os.fsync
            os.pwrite(fd, bytes([i & 255]) * 4096, i * 4096)
            t = time.perf_counter()
            sync(fd)
            ts[sync].append((time.perf_counter() - t) * 1e3)
    finally:
        os.close(fd)
        os.unlink(path)
    return statistics.median(ts[os.fdatasync]), statistics.median(ts[os.fsync])


def fig_import(res, chain, p, d):
    """Repository.import_chain of a qcow2 and a raw disk against qemu-img convert into the
    same format, interleaved with the machine's bare copy of the same bytes."""
    src = {"qcow2": chain["files"][0], "raw": chain["flat"]}
    size = os.path.getsize(chain["flat"])
    out = os.path.join(d, "import-out")
    repo_dir = os.path.join(d, "import-repo")

    def clean():
        for path in (out, out + ".cfr"):
            if os.path.exists(path):
                os.unlink(path)
        shutil.rmtree(repo_dir, ignore_errors=True)

    def cowchain(fmt):
        def once():
            clean()
            repo = engine.Repository.create(repo_dir)
            try:
                t = time.perf_counter()
                repo.import_chain("i", src[fmt], format=fmt, base_format=fmt)
                dt = time.perf_counter() - t
            finally:
                repo.close()
            clean()
            return dt
        return once

    def qemu(fmt, cache):
        def once():
            clean()
            t = time.perf_counter()
            run(["qemu-img", "convert", "-t", cache, "-f", fmt, "-O", fmt, src[fmt], out])
            dt = time.perf_counter() - t
            clean()
            return dt
        return once

    def bare(fn):
        def once():
            clean()
            dt = fn(chain["flat"], out)
            clean()
            return dt
        return once

    raters = {}
    for fmt in ("qcow2", "raw"):
        raters[f"qemu {fmt} writeback"] = qemu(fmt, "writeback")
        raters[f"qemu {fmt} unsafe"] = qemu(fmt, "unsafe")
        raters[f"cowchain {fmt}"] = cowchain(fmt)
    raters["bare read+write"] = bare(_bare_copy)
    raters["bare copy_file_range"] = bare(_cfr_copy)
    log("import: warm-up, then interleaved rounds (with the bare copies)")
    warm_files(list(src.values()))
    os.sync()
    runs = {k: [] for k in raters}
    for i in range(p["repeat"] + 1):
        for k, fn in raters.items():
            t = fn()
            if i:
                runs[k].append(t)
    med = {k: statistics.median(v) for k, v in runs.items()}
    for fmt in ("qcow2", "raw"):
        ref, cc = med[f"qemu {fmt} writeback"], med[f"cowchain {fmt}"]
        uns = med[f"qemu {fmt} unsafe"]
        res.add(f"import_{fmt}", f"import a {size // MiB} MiB {fmt} disk into a {fmt} base (s)",
                "qemu-img convert -t writeback", ref, cc, "s", ref / cc, ">= 1.0x",
                ref >= cc,
                f"Repository.import_chain (fresh repository per round, made outside the "
                f"timing) vs qemu-img convert -f {fmt} -O {fmt}; median of {p['repeat']} "
                f"interleaved rounds; qemu-img -t unsafe (no flush): {uns:.2f} s "
                f"({uns / cc:.2f}x); source: "
                f"{'the chain base, fully written' if fmt == 'qcow2' else 'the flat raw file'}",
                runs={k: v for k, v in runs.items() if fmt in k})
    rw, cfr = med["bare read+write"], med["bare copy_file_range"]
    best = min(rw, cfr)
    cc = min(med["cowchain raw"], med["cowchain qcow2"])
    res.add("ceiling_copy", f"the machine's bare copy of the same {size // MiB} MiB into a new "
            "file, durable (s)", "8 MiB read+write + fdatasync", rw, cfr, "s", rw / cfr,
            "info (machine ceiling)", None,
            f"copy_file_range + fdatasync {cfr:.2f} s ({size / cfr / MiB:,.0f} MiB/s), "
            f"read+write {rw:.2f} s ({size / rw / MiB:,.0f} MiB/s); the fastest cowchain "
            f"import took {cc / best:.2f}x the best bare copy", runs={"read+write": runs[
                "bare read+write"], "copy_file_range": runs["bare copy_file_range"]})
    fd_ms, fs_ms = _sync_latency(d, 20 if p["min_time"] < 0.5 else 100)
    res.add("ceiling_sync", "the machine's bare sync latency: 4 KiB pwrite + fdatasync | fsync "
            "(ms)", "fdatasync", fd_ms, fs_ms, "ms", None, "info (machine ceiling)", None,
            f"median of {20 if p['min_time'] < 0.5 else 100} each, alternating, one new dirty "
            f"page of a synced file each; "
            f"fdatasync {fd_ms:.2f} ms, fsync {fs_ms:.2f} ms")


# --- extended L2 writes and metadata operations (bench/xl2_compare.py, bench/metadata_ops.py) --

def fig_xl2(res, chain, p, d):
    """4 KiB writes into a fresh extended_l2=on overlay of the chain: xl2_compare.measure on
    this run's chain (its rounds: cowchain xl2, cowchain copy-up, qemu-img bench -w on an
    extended_l2=on overlay and on a plain one, interleaved; medians)."""
    import xl2_compare

    size = os.path.getsize(chain["flat"])
    log("extended L2 writes: xl2_compare.measure (interleaved rounds)")
    r = xl2_compare.measure(d, chain, size, p["repeat"])
    m = r["median"]
    note = (f"{r['writes_per_overlay']} writes per fresh overlay (one per 64 KiB cluster, "
            f"lazy_refcounts=on on both sides), median of {p['repeat']} interleaved rounds; "
            f"qemu-img check of the last overlays: {r['check']}")
    res.add("xl2_vs_copyup", "4 KiB writes into a fresh extended_l2=on overlay vs cowchain's "
            "own copy-up into a plain overlay", "cowchain copy-up", m["copyup"], m["xl2"],
            "IOPS", r["ratio_xl2_vs_copyup"], ">= 5x", r["ratio_xl2_vs_copyup"] >= 5, note,
            runs={k: r["runs"][k] for k in ("copyup", "xl2")})
    res.add("xl2_vs_qemu", "4 KiB writes into a fresh extended_l2=on overlay vs qemu-img bench "
            "-w on an extended_l2=on overlay of the same chain",
            f"qemu-img bench -w -i {r['qemu_aio']}", m["qemu_xl2"], m["xl2"], "IOPS",
            r["ratio_xl2_vs_qemu_xl2"], "> 1x", r["ratio_xl2_vs_qemu_xl2"] > 1,
            f"plain overlays: qemu {m['qemu']:,.0f}, cowchain {m['copyup']:,.0f} writes/s; "
            f"cowchain's flush, not in the rate: {r['flush_ms']['xl2']:.0f} ms (xl2)",
            runs={k: r["runs"][k] for k in ("qemu_xl2", "xl2")})


#: The snapshot-creation cases: (key, virtual size, deep?, many volumes?)
SNAP_CASES = [(f"snapcase_{'1t' if big else '1g'}_{'d300' if deep else 'd5'}_"
               f"{'many' if many else 'few'}", TiB if big else GiB, deep, many)
              for big in (False, True) for deep in (False, True) for many in (False, True)]
MD_SIZES = [10, 100, 1000, 10000, 100000]
MD_OPS = ["snapshot", "revert", "preview+undo", "clone", "delete_chain", "open+read"]


def _md_medians(mo, kind: str, paths: dict, p: dict, rounds: int, what: str) -> dict:
    """Medians of metadata_ops' worker KIND ("snapshot" or "ops") on the repositories PATHS
    ({key: path}), per key: in fresh processes on this engine's source tree, ROUNDS rounds of
    md_n samples, the repositories interleaved round after round on their copies
    (metadata_ops.interleaved), or with --quick in this process, on each path itself.  The
    repositories are removed afterwards."""
    if p["md_fresh_process"]:
        log(f"{what}: {rounds} rounds over {len(paths)} repositories")
        meds = mo.interleaved({k: (ENGINE_PARENT, v) for k, v in paths.items()}, kind,
                              rounds, p["md_n"])
    else:
        fn = {"snapshot": mo.worker_snapshot, "ops": mo.worker_ops}[kind]
        meds = {k: {op: statistics.median(ts) for op, ts in fn(engine, v, p["md_n"]).items()}
                for k, v in paths.items()}
    for path in paths.values():
        shutil.rmtree(path, ignore_errors=True)
    return meds


def fig_snapshot_cases(res, p, d):
    """Snapshot creation medians through the Repository API (metadata_ops: build_measured
    for every case first, then worker_snapshot in fresh processes, the cases interleaved
    round after round on copies of their repositories)."""
    import metadata_ops as mo

    depth, bg = p["md_depth"], p["md_background"]
    paths, vols = {}, {}
    for key, size, deep, many in SNAP_CASES:
        paths[key] = os.path.join(d, f"md-{key}")
        shutil.rmtree(paths[key], ignore_errors=True)
        log(f"snapshot creation: {key}: building through the API")
        mo.build_measured(engine, paths[key], size, depth if deep else 5, bg if many else 0)
        vols[key] = mo.volume_count(paths[key])
    meds = _md_medians(mo, "snapshot", paths, p, p["md_snap_rounds"], "snapshot creation")
    ref = None
    for key, size, deep, many in SNAP_CASES:
        med = meds[key]
        wall, cpu = med["snapshot"], med["snapshot/cpu"]
        ref = ref if ref is not None else wall
        ratio = wall / ref
        res.add(key, f"snapshot creation, {'1 TiB' if size == TiB else '1 GiB'}, depth "
                f"{depth if deep else 5}, {vols[key]:,} volumes (Chain.snapshot, median ms)",
                "1 GiB, depth 5, few volumes", ref, wall, "ms", ratio, "< 2 ms, <= 1.3x",
                wall < 2.0 and ratio <= 1.3,
                f"CPU {cpu:.2f} ms; median of {p['md_snap_rounds']} rounds x {p['md_n']} snapshots "
                f"(each undone by an untimed revert), metadata_ops.worker_snapshot "
                + (f"in a fresh process per round, the {len(SNAP_CASES)} cases interleaved"
                   if p["md_fresh_process"] else "in this process")
                + f"; the first snapshot of a process (not in the median) "
                f"{med['first snapshot']:.2f} ms ({med['first snapshot/cpu']:.2f} CPU)")


def fig_md_scale(res, p, d):
    """Every metadata operation against repository size (metadata_ops: a depth-5 chain of
    1 GiB made through the API, the other volumes catalog rows; worker_ops).  Every size is
    built first, then the sizes are interleaved round after round (as the snapshot cases)."""
    import metadata_ops as mo

    paths, whats = {}, {}
    for total in MD_SIZES:
        key = f"mdops_{total}"
        whats[key] = (f"metadata operations in a repository of {total:,} volumes "
                      f"({' | '.join(MD_OPS)}; sum of medians, ms)")
        if total > p["md_max_volumes"]:
            res.na(key, whats[key], "<= 1.3x of 10 volumes", f"not run in this profile (up "
                   f"to {p['md_max_volumes']:,} volumes)")
            continue
        paths[key] = os.path.join(d, f"md-scale{total}")
        shutil.rmtree(paths[key], ignore_errors=True)
        log(f"metadata operations: {total:,} volumes: building")
        mo.build_measured(engine, paths[key], GiB, 5, 0)
        mo.add_catalog_rows(paths[key], total - mo.volume_count(paths[key]))
    # the same samples at every size: with fewer per process, the first operations of a
    # process (its statement compilations, first touches of the catalog's pages) weigh on
    # the median of the largest catalog only
    meds = _md_medians(mo, "ops", paths, p, p["md_rounds"], "metadata operations")
    ref = None
    for total in MD_SIZES:
        key = f"mdops_{total}"
        if key not in meds:
            continue
        med = meds[key]
        tot = sum(med[o] for o in MD_OPS)
        ref = ref if ref is not None else tot
        detail = ", ".join(f"{o} {med[o]:.2f} ({med[o + '/cpu']:.2f} CPU)" for o in MD_OPS)
        detail += (f"; the first open+read of a process (not in the sum) "
                   f"{med['first open+read']:.2f} ({med['first open+read/cpu']:.2f} CPU)")
        first = total == MD_SIZES[0]
        res.add(key, whats[key], f"{MD_SIZES[0]} volumes", ref, tot, "ms", tot / ref,
                "info (reference)" if first else "<= 1.3x of 10 volumes",
                None if first else tot <= 1.3 * ref, f"medians, ms: {detail}"
                + (f"; {p['md_rounds']} rounds, the sizes interleaved"
                   if p["md_fresh_process"] else ""))


_SPIN = ("import time\nt = time.perf_counter()\nx = 0\nfor i in range(%d): x += i\n"
         "print(time.perf_counter() - t)")


def meta_load() -> str:
    """Load average, and the share of time tasks waited for a CPU (PSI) over the last minute."""
    try:
        text = " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"
    try:
        some = open("/proc/pressure/cpu").readline().split()
        text += f", CPU pressure {some[2].split('=')[1]}% (avg60)"
    except (OSError, IndexError):
        pass
    return text


def fig_threads(res, chain, p):
    """2 reader threads vs 1 on one Image, with two references measured in the same
    interleaved runs: the parallel CPU the machine gives right now (2 busy processes vs 1;
    other jobs on a shared machine take cores) and the same reads as a plain memcpy from an
    mmap of the raw file with the GIL dropped (ctypes.memmove)."""
    top, size = chain["top"], os.path.getsize(chain["flat"])
    mt, rep = p["min_time"], p["repeat"]
    step = 4 * MiB + 64 * KiB
    K = 64 * KiB
    spin_n = 1_000_000 if mt < 0.5 else 10_000_000
    code = _SPIN % spin_n

    def spin(k):
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  text=True) for _ in range(k)]
        return max(float(pr.communicate()[0]) for pr in procs)

    def threaded(read_one, nthreads, n, region=size):
        """Seconds for nthreads threads to do n reads each in the first `region` bytes;
        read_one(buf) -> callable(off)."""
        barrier = threading.Barrier(nthreads + 1)

        def worker(start):
            buf = np.empty(K, dtype=np.uint8)
            fn = read_one(buf)
            offs = qemu_offsets(n, step, region - K, start).tolist()
            barrier.wait()
            for o in offs:
                fn(o)

        ths = [threading.Thread(target=worker, args=(k * 7 * MiB,)) for k in range(nthreads)]
        for th in ths:
            th.start()
        barrier.wait()
        t = time.perf_counter()
        for th in ths:
            th.join()
        return time.perf_counter() - t

    with engine.open(top, readonly=True) as img, open(chain["flat"], "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        arr = np.frombuffer(m, dtype=np.uint8)
        addr = arr.ctypes.data
        memmove = ctypes.memmove            # a ctypes call drops the GIL; numpy.copyto does not

        def cc_reader(buf):
            ri = img.readinto
            return lambda o: ri(o, buf)

        def mm_reader(buf):
            dst = buf.ctypes.data
            return lambda o: memmove(dst, addr + o, K)

        raters = {}
        for name, reader in (("cc", cc_reader), ("mm", mm_reader)):
            threaded(reader, 1, size // K)                                  # warm-up
            n = calibrate(lambda k, reader=reader: threaded(reader, 1, k), mt)
            raters[name, 1] = lambda reader=reader, n=n: n / threaded(reader, 1, n) * K / MiB
            raters[name, 2] = lambda reader=reader, n=n: 2 * n / threaded(reader, 2, n) * K / MiB
        # a cache-resident working set (1 MiB, the L2 cache of one core): no memory
        # bandwidth limit, so only the GIL and the core's locks stand between 1x and 2x
        hot = 1 * MiB
        for name, reader in (("cc_hot", cc_reader), ("mm_hot", mm_reader)):
            threaded(reader, 1, 1024, hot)
            n = calibrate(lambda k, reader=reader: threaded(reader, 1, k, hot), mt)
            raters[name, 1] = lambda r_=reader, n=n: n / threaded(r_, 1, n, hot) * K / MiB
            raters[name, 2] = lambda r_=reader, n=n: 2 * n / threaded(r_, 2, n, hot) * K / MiB
        raters["cpu", 1] = lambda: spin_n / spin(1) / 1e6
        raters["cpu", 2] = lambda: 2 * spin_n / spin(2) / 1e6
        log("threads: measuring (interleaved)")
        r = interleave(raters, rep)
        del arr, raters, mm_reader
        m.close()
    res.add("cpu_parallel", "CPU capacity: 2 busy processes vs 1 (the parallel speed-up any "
            "2-thread figure can get right now)", "1 process", r["cpu", 1], r["cpu", 2],
            "M loop steps/s", r["cpu", 2] / r["cpu", 1], "info (machine)", None,
            f"load: {meta_load()}")
    one, two = r["cc", 1], r["cc", 2]
    res.add("threads_2v1", "64 KiB random reads, 2 reader threads vs 1 (one shared Image)",
            "1 thread", one, two, "MiB/s", two / one, ">= 1.7x", two >= 1.7 * one,
            f"{os.cpu_count()} CPUs; each thread its own buffer and offsets",
            runs={"1": one, "2": two})
    res.add("threads_ceiling", "64 KiB random reads, 2 threads vs 1, plain mmap of the raw "
            "file (ctypes.memmove)", "1 thread, mmap", r["mm", 1], r["mm", 2], "MiB/s",
            r["mm", 2] / r["mm", 1], "info (machine ceiling)", None)
    res.add("threads_hot", "64 KiB reads in a cache-resident 1 MiB range, 2 reader threads vs 1 "
            "(GIL and locks only, no memory-bandwidth limit)", "1 thread", r["cc_hot", 1],
            r["cc_hot", 2], "MiB/s", r["cc_hot", 2] / r["cc_hot", 1], "info (scalability)",
            None, f"the same with ctypes.memmove from the raw mapping: "
            f"{r['mm_hot', 2] / r['mm_hot', 1]:.2f}x ({r['mm_hot', 1]:,.0f} -> "
            f"{r['mm_hot', 2]:,.0f} MiB/s)")


_RSS_CHILD = r"""
import json, resource, sys
import numpy, engine, engine.image
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
img = engine.open(sys.argv[1], readonly=True)
n = len(img.chain())
buf = bytearray(4096)
for off in (0, img.size // 2, img.size - 4096):
    img.readinto(off, buf)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
img.close()
print(json.dumps({"baseline_kib": base, "peak_kib": after, "vmhwm_kib": hwm, "volumes": n}))
"""


def drop_page_cache() -> bool:
    """Write back and drop the machine's clean page cache (root only)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def disk_read_kib() -> int:
    """KiB the whole machine has read from block devices (pgpgin of /proc/vmstat)."""
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("pgpgin "):
                return int(line.split()[1])
    return 0


def fig_cold(res, q, chain, p):
    """4 KiB random reads right after the page cache was dropped: what a disk-bound reader
    gets, and how much each read makes the machine read from disk. Runs last: it leaves the
    cache cold."""
    top = chain["top"]
    size = os.path.getsize(chain["flat"])
    step = 4 * MiB + 4 * KiB
    n = 200 if p["min_time"] < 0.5 else 5000
    offs = qemu_offsets(n, step, size).tolist()
    key, what = "cold_rand4k", "4 KiB random reads with a cold page cache (dropped before each run)"
    if not drop_page_cache():
        res.na(key, what, "info", "cannot drop the page cache here (needs root)")
        return
    buf = bytearray(4096)

    def q_run():
        drop_page_cache()
        k0 = disk_read_kib()
        t = q.seconds(top, n, 4096, step)
        return n / t, disk_read_kib() - k0

    def c_run():
        drop_page_cache()
        k0 = disk_read_kib()
        with engine.open(top, readonly=True) as img:
            r = img.readinto
            t = time.perf_counter()
            for o in offs:
                r(o, buf)
            t = time.perf_counter() - t
        return n / t, disk_read_kib() - k0

    runs: dict = {"qemu": [], "cowchain": []}
    kib: dict = {"qemu": [], "cowchain": []}
    for _ in range(3):
        for name, fn in (("qemu", q_run), ("cowchain", c_run)):
            rate, k = fn()
            runs[name].append(rate)
            kib[name].append(k)
    qv, cv = max(runs["qemu"]), max(runs["cowchain"])
    res.add(key, what, f"qemu-img bench -d 1 -t writeback -i {q.aio}", qv, cv, "IOPS", cv / qv,
            "info (no target)", None,
            f"{n} reads per run, the offsets of rand4k_loop; disk read per request (median of "
            f"3 runs, whole machine, includes opening the chain): qemu "
            f"{statistics.median(kib['qemu']) / n:.1f} KiB, cowchain "
            f"{statistics.median(kib['cowchain']) / n:.1f} KiB", runs=runs)


def fig_rss(res, p, d):
    depth = p["rss_depth"]
    log(f"peak RSS: building {depth} volumes of 1 TiB with qemu-img create")
    top = build_big_chain(d, depth, TiB)
    env = dict(os.environ)
    env["PYTHONPATH"] = ENGINE_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    # Linux carries the parent's peak RSS into a child's ru_maxrss across fork+exec; a small
    # shell in between (which forks rather than execs its last command) starts it from zero.
    out = run(["sh", "-c", '"$0" "$@"; exit $?', sys.executable, "-c", _RSS_CHILD, top],
              env=env, cwd=d).stdout
    r = json.loads(out.strip().splitlines()[-1])
    if r["volumes"] != depth:
        raise SystemExit(f"RSS chain has {r['volumes']} volumes, not {depth}")
    peak = r["peak_kib"] / 1024 * 1.048576          # ru_maxrss is KiB; report MB (10^6)
    base = r["baseline_kib"] / 1024 * 1.048576
    res.add("rss_open200", f"peak RSS opening {depth} volumes of 1 TiB each (subprocess)",
            "after import numpy+engine", base, peak, "MB", None, "< 150 MB", peak < 150,
            "ru_maxrss of a fresh interpreter (started through sh so that it does not inherit "
            "this process's peak) that imports engine, opens the chain read-only and reads 3 "
            f"blocks; VmHWM {r['vmhwm_kib'] / 1024 * 1.048576:.1f} MB")


# --- main -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    # xl2_compare imports this module by name: let it find this one, not load a second copy
    sys.modules.setdefault("compare_qemu", sys.modules[__name__])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, short timings (smoke run)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--workdir", metavar="DIR", help="build the images here and keep them "
                    "(default: a temporary folder, removed at the end)")
    ap.add_argument("--reuse", action="store_true", help="with --workdir: reuse the chain an "
                    "earlier run built there with the same sizes")
    ap.add_argument("--min-time", type=float, help="seconds per measurement")
    ap.add_argument("--repeat", type=int, help="interleaved runs per figure (the best is "
                    "reported)")
    ap.add_argument("--batch", type=int, default=1024, help="offsets per readv call")
    ap.add_argument("--only", help="comma-separated groups: reads,seq,writes,depth,snapshot,"
                    "threads,rss,export,merge,import,xl2,mdsnap,mdscale,cold")
    args = ap.parse_args(argv)

    p = dict(PROFILES["quick" if args.quick else "full"])
    if args.min_time:
        p["min_time"] = args.min_time
    if args.repeat:
        p["repeat"] = args.repeat
    groups = set((args.only or "reads,seq,writes,depth,snapshot,threads,rss,export,merge,import,"
                      "xl2,mdsnap,mdscale,cold").split(","))

    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: install qemu-utils", file=sys.stderr)
            return 2

    keep = set()
    if args.workdir:
        d = os.path.abspath(args.workdir)
        os.makedirs(d, exist_ok=True)
        stamp = os.path.join(d, "chain.json")
        if args.reuse and os.path.exists(stamp):
            with open(stamp) as f:
                old = json.load(f)
            if old.get("params") == _chain_params(p) and all(map(os.path.exists, old["files"])):
                keep = set(map(os.path.basename, old["files"] + [old["flat"]]))
        for name in os.listdir(d):          # a clean folder: every other image is rebuilt
            if name.endswith((".qcow2", ".raw")) and name not in keep:
                os.unlink(os.path.join(d, name))
        cleanup = False
    else:
        d = tempfile.mkdtemp(prefix="cowchain-bench-")
        cleanup = True

    started = time.time()
    res = Results()
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "profile": "quick" if args.quick else "full",
        "qemu": qemu_version(), "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "engine": engine.__file__, "params": p, "batch": args.batch,
        "loadavg_start": meta_load(), "core": core_build(), "revision": source_revision(),
    }
    try:
        log(f"building the chain in {d} ({p['base'] // MiB} MiB base, {p['overlays']} "
            f"overlays x {p['overlay_bytes'] // MiB} MiB)")
        stamp = os.path.join(d, "chain.json")
        if keep:
            log("reusing the chain built by an earlier run (--reuse)")
            with open(stamp) as f:
                chain = json.load(f)
        else:
            chain = build_chain(d, p)
            with open(stamp, "w") as f:
                json.dump(dict(chain, params=_chain_params(p)), f)
        log("checking that cowchain reads the chain as qemu-img convert does")
        verify_chain(chain["top"], chain["flat"])
        warm_files(chain["files"] + [chain["flat"]])
        q = QemuBench(chain["top"])
        meta["aio"] = q.aio

        steps = [
            ("reads", ["rand4k_loop", "rand4k_loop_core", "rand4k_batch", "rand4k_batch_abs",
                       "rand4k_batch_ceiling"],
             lambda: fig_random_reads(res, q, chain, p, args.batch)),
            ("seq", ["seq1m_vs_qemu", "seq1m_vs_mmap"], lambda: fig_seq_reads(res, q, chain, p)),
            ("writes", ["write_copyup", "write_copyup_ceiling", "write_rewrite",
                        "write_rewrite_core"],
             lambda: fig_writes(res, q, chain, p, d)),
            ("writes", [], os.sync),    # the kept overlays' dirty pages, outside any timing
            ("depth", ["depth200_loop", "depth200_batch"], lambda: fig_depth(res, p, d, args.batch)),
            ("snapshot", ["snapshot_ratio", "snapshot_abs"], lambda: fig_snapshot(res, p, d)),
            ("threads", ["cpu_parallel", "threads_2v1", "threads_ceiling", "threads_hot"],
             lambda: fig_threads(res, chain, p)),
            ("rss", ["rss_open200"], lambda: fig_rss(res, p, d)),
            ("export", ["export_qcow2", "export_raw", "export_unsafe"],
             lambda: fig_export(res, chain, p, d)),
            ("merge", ["delete_commit", "delete_pull"], lambda: fig_merge(res, p, d)),
            ("import", ["import_qcow2", "import_raw", "ceiling_copy", "ceiling_sync"],
             lambda: fig_import(res, chain, p, d)),
            ("xl2", ["xl2_vs_copyup", "xl2_vs_qemu"], lambda: fig_xl2(res, chain, p, d)),
            ("mdsnap", [c[0] for c in SNAP_CASES], lambda: fig_snapshot_cases(res, p, d)),
            ("mdscale", [f"mdops_{n}" for n in MD_SIZES], lambda: fig_md_scale(res, p, d)),
            ("cold", ["cold_rand4k"], lambda: fig_cold(res, q, chain, p)),   # leaves it cold
        ]
        for group, keys, fn in steps:
            if group not in groups:
                continue
            try:
                fn()
            except (CommandFailed, engine.EngineError, OSError) as e:
                # a figure that cannot be measured here says why; the others still run
                log(f"{group}: cannot measure: {e}")
                for k in keys:
                    if k not in res.rows:
                        res.na(k, k, "-", f"could not be measured: {type(e).__name__}: {e}")
    finally:
        if cleanup:
            shutil.rmtree(d, ignore_errors=True)

    annotate_bandwidth(res)
    meta["elapsed_s"] = round(time.time() - started, 1)
    meta["loadavg_end"] = meta_load()
    print(f"cowchain vs QEMU ({meta['profile']} profile), {meta['date']}")
    print(f"{meta['qemu']}; qemu-img bench -d 1 -t writeback -i {meta['aio']}; "
          f"Python {meta['python']}; {meta['machine']}")
    print(f"core: {meta['core']}; source: {meta['revision']}")
    print(f"chain: {p['base'] // MiB} MiB base fully written + {p['overlays']} overlays x "
          f"{p['overlay_bytes'] // MiB} MiB of scattered 64 KiB writes; qemu-img bench is "
          f"sequential with a step, so a large odd step scatters its requests (4 MiB + 4 KiB "
          f"for reads, 4 MiB + 64 KiB for writes) and cowchain replays the same offsets")
    print(f"timing: each figure is the best of {p['repeat']} runs of >= {p['min_time']} s, "
          f"the runs of the two sides of a ratio interleaved, after a warm page cache and one "
          f"warm-up pass of each tool (every run is in the JSON output)")
    print(f"machine load: {meta['loadavg_start']} at start; {meta['loadavg_end']} at end "
          f"(a shared machine: other jobs move absolute numbers, less so the ratios)")
    print()
    print(res.table())
    missed = [k for k, r in res.rows.items() if r["result"] == "MISSED"]
    print()
    print(f"targets met: {sum(r['result'] == 'met' for r in res.rows.values())}, "
          f"missed: {len(missed)}{' (' + ', '.join(missed) + ')' if missed else ''}; "
          f"elapsed {meta['elapsed_s']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": [res.rows[k] for k in FIGURES if k in res.rows]},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
