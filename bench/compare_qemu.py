#!/usr/bin/env python3
"""cowchain vs QEMU, side by side, on the same files and in the same run (issue 5).

Usage::

    python bench/compare_qemu.py [--quick] [--json out.json] [--workdir DIR] [--keep]

What it does:

1. Builds, with ``qemu-img``/``qemu-io``, the chain of issue 5: a base volume fully written
   with random bytes (1 GiB; ``qemu-img convert`` of a raw file) and 10 QCOW2 overlays, each
   holding 16 MiB of scattered 64 KiB writes (``qemu-io write -P``).  ``qemu-img convert -O
   raw`` of the top gives the flat raw file the mmap reference reads.  Before measuring, the
   script checks that cowchain reads the whole chain byte-identically to that raw file.
2. Measures QEMU (``qemu-img bench``, queue depth 1, ``-t writeback``, ``-i io_uring`` where it
   works, else ``-i threads``; ``lazy_refcounts=on`` for the write figures) and cowchain on the
   same files, with the same offsets: ``qemu-img bench`` is sequential with a step, so a large
   odd step (4 MiB + 4 KiB for 4 KiB reads) scatters its requests, and cowchain replays
   exactly the offsets ``qemu-img bench`` visits (``(i * step) % size``).
3. Prints one row per figure: reference, reference value, cowchain value, ratio, target,
   met/MISSED.  A missed target is printed as MISSED with its numbers, never hidden; a figure
   that cannot be measured here is printed as N/A with the reason.

Method: every timing uses time.perf_counter() over at least ``--min-time`` seconds (1 s; 0.05 s
with ``--quick``), after the files were read once into the page cache and after one warm-up
pass of each tool; QEMU and cowchain runs alternate, and each figure is the median of
``--repeat`` runs (3; 1 with ``--quick``).  qemu-img bench reports its own run time (from the
first request to the last completion, without process start-up or the final flush); the
cowchain write figures likewise exclude the final flush(), whose time is printed beside them.

Speed is never asserted in the test suite; tests/test_bench_smoke.py only checks that
``--quick`` runs and prints every row.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import mmap
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

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
    "rand4k_batch",
    "rand4k_batch_abs",
    "rand4k_batch_ceiling",
    "seq1m_vs_qemu",
    "seq1m_vs_mmap",
    "write_copyup",
    "write_rewrite",
    "depth200_loop",
    "depth200_batch",
    "snapshot_ratio",
    "snapshot_abs",
    "cpu_parallel",
    "threads_2v1",
    "threads_ceiling",
    "rss_open200",
]

PROFILES = {
    # base size, overlays, bytes per overlay, deep-chain base size and depth, RSS chain depth
    "full": dict(base=1 * GiB, overlays=10, overlay_bytes=16 * MiB, deep_base=256 * MiB,
                 deep_depth=200, rss_depth=200, snap_reps=50, min_time=1.0, repeat=3),
    "quick": dict(base=32 * MiB, overlays=10, overlay_bytes=1 * MiB, deep_base=8 * MiB,
                  deep_depth=10, rss_depth=20, snap_reps=3, min_time=0.03, repeat=1),
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
    if os.path.exists(pyx) and os.path.getmtime(pyx) > os.path.getmtime(so):
        text += " WARNING: older than _core.pyx beside it (stale build)"
    return text


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
        except subprocess.CalledProcessError as e:
            log(f"io_uring unavailable ({e.stderr.strip()[:100]}); using -i threads")

    def seconds(self, image: str, count: int, bufsize: int, step: int, write=False) -> float:
        cmd = ["qemu-img", "bench", "-f", "qcow2", "-t", "writeback", "-i", self.aio,
               "-d", "1", "-c", str(count), "-s", str(bufsize), "-S", str(step)]
        if write:
            cmd.append("-w")
        out = run(cmd + [image]).stdout
        m = self._RE.search(out)
        if not m:
            raise RuntimeError(f"cannot parse qemu-img bench output: {out!r}")
        return max(float(m.group(1)), 1e-6)

    def rate(self, image, bufsize, step, min_time, repeat, write=False) -> tuple[float, int]:
        """Median ops/s over `repeat` runs of at least min_time; returns (rate, count)."""
        count = calibrate(lambda n: self.seconds(image, n, bufsize, step, write), min_time)
        self.seconds(image, max(count // 4, 1), bufsize, step, write)      # warm-up
        rates = [count / self.seconds(image, count, bufsize, step, write) for _ in range(repeat)]
        return statistics.median(rates), count


def calibrate(timed, min_time: float, n0: int = 64) -> int:
    """The op count that makes timed(n) (which returns seconds) last about 1.2 * min_time."""
    n = n0
    while True:
        t = timed(n)
        if t >= min_time / 8 or n >= 1 << 28:
            break
        n *= 4
    return max(int(n * 1.2 * min_time / t) + 1, 1)


def median_rate(timed, n: int, repeat: int) -> float:
    return statistics.median(n / timed(n) for _ in range(repeat))


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
            note=""):
        self.rows[key] = dict(key=key, figure=figure, reference=ref_name, ref_value=ref_value,
                              cowchain=cc_value, unit=unit, ratio=ratio, target=target,
                              result=("met" if met else "MISSED") if met is not None else "info",
                              note=note)

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

def fig_random_reads(res, q, chain, p, batch):
    top, flat = chain["top"], chain["flat"]
    size = os.path.getsize(flat)
    step = 4 * MiB + 4 * KiB
    mt, rep = p["min_time"], p["repeat"]
    log("4 KiB random reads: qemu-img bench")
    q_rate, q_count = q.rate(top, 4096, step, mt, rep)
    with engine.open(top, readonly=True) as img:
        buf = bytearray(4096)
        ri = img.readinto

        def loop(n):
            offs = qemu_offsets(n, step, size).tolist()
            t = time.perf_counter()
            for o in offs:
                ri(o, buf)
            return time.perf_counter() - t

        log("4 KiB random reads: cowchain readinto loop")
        loop(min(size // 4096, 1 << 18))                                    # warm-up pass
        n = calibrate(loop, mt)
        c_loop = median_rate(loop, n, rep)
        res.add("rand4k_loop", "4 KiB random reads, 11-volume chain, one readinto per read "
                "(Python loop)", f"qemu-img bench -d 1 -i {q.aio}", q_rate, c_loop, "IOPS",
                c_loop / q_rate, ">= 8x", c_loop >= 8 * q_rate,
                f"qemu-img bench -s 4096 -S {step} (step 4 MiB + 4 KiB scatters the requests; "
                f"{q_count} requests per run); cowchain replays the same offsets")

        out = np.empty(batch * 4096, dtype=np.uint8)

        def batched(n):
            offs = qemu_offsets(n, step, size)
            parts = [offs[i:i + batch] for i in range(0, n, batch)]
            rv = img.readv
            t = time.perf_counter()
            for part in parts:
                rv(part, 4096, out)
            return time.perf_counter() - t

        log("4 KiB random reads: cowchain readv")
        batched(min(size // 4096, 1 << 18))
        n = max(calibrate(batched, mt, n0=batch * 4) // batch, 1) * batch
        c_batch = median_rate(batched, n, rep)

    res.add("rand4k_batch", f"4 KiB random reads, batch Image.readv({batch} offsets, 4096, out)",
            f"qemu-img bench -d 1 -i {q.aio}", q_rate, c_batch, "IOPS", c_batch / q_rate,
            ">= 25x", c_batch >= 25 * q_rate)
    res.add("rand4k_batch_abs", "4 KiB random reads, batch call, absolute", "-", None, c_batch,
            "reads/s", None, ">= 3,000,000/s", c_batch >= 3_000_000)

    # the machine's ceiling: the same gather from a plain mmap of the raw file, in C (numpy)
    with open(flat, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        arr = np.frombuffer(m, dtype=np.uint8).reshape(-1, 4096)
        out2 = np.empty((batch, 4096), dtype=np.uint8)

        def gather(n):
            idx = (qemu_offsets(n, step, size) // np.uint64(4096)).astype(np.intp)
            parts = [idx[i:i + batch] for i in range(0, n, batch)]
            t = time.perf_counter()
            for part in parts:
                np.take(arr, part, axis=0, out=out2[:len(part)])
            return time.perf_counter() - t

        gather(min(size // 4096, 1 << 18))
        n = max(calibrate(gather, mt, n0=batch * 4) // batch, 1) * batch
        ceiling = median_rate(gather, n, rep)
        del arr
        m.close()
    res.add("rand4k_batch_ceiling", "4 KiB random reads, batch, vs the same gather from a "
            "plain mmap of the raw file (numpy.take)", "mmap raw + numpy.take", ceiling, c_batch,
            "reads/s", c_batch / ceiling, "info (hardware ceiling)", None,
            "the ceiling is what a memcpy of the same 4 KiB pieces costs on this machine")


def fig_seq_reads(res, q, chain, p):
    top, flat = chain["top"], chain["flat"]
    size = os.path.getsize(flat)
    mt, rep = p["min_time"], p["repeat"]
    log("1 MiB sequential reads: qemu-img bench")
    q_rate, _ = q.rate(top, MiB, MiB, mt, rep)           # requests/s == MiB/s
    buf = np.empty(MiB, dtype=np.uint8)
    with engine.open(top, readonly=True) as img:
        ri = img.readinto

        def loop(n):
            offs = [(i * MiB) % size for i in range(n)]
            t = time.perf_counter()
            for o in offs:
                ri(o, buf)
            return time.perf_counter() - t

        log("1 MiB sequential reads: cowchain")
        loop(size // MiB)
        n = calibrate(loop, mt, n0=16)
        c_rate = median_rate(loop, n, rep)
    with open(flat, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        arr = np.frombuffer(m, dtype=np.uint8)

        def mloop(n):
            offs = [(i * MiB) % size for i in range(n)]
            t = time.perf_counter()
            for o in offs:
                np.copyto(buf, arr[o:o + MiB])
            return time.perf_counter() - t

        log("1 MiB sequential reads: plain mmap copy of the raw file")
        mloop(size // MiB)
        n = calibrate(mloop, mt, n0=16)
        m_rate = median_rate(mloop, n, rep)
        del arr
        m.close()
    res.add("seq1m_vs_qemu", "1 MiB sequential reads, 11-volume chain (readinto loop)",
            f"qemu-img bench -s 1M -i {q.aio}", q_rate, c_rate, "MiB/s", c_rate / q_rate,
            ">= 1.5x", c_rate >= 1.5 * q_rate)
    res.add("seq1m_vs_mmap", "1 MiB sequential reads vs a plain mmap copy of the same bytes",
            "numpy.copyto from mmap of flat raw", m_rate, c_rate, "MiB/s", c_rate / m_rate,
            ">= 0.8x", c_rate >= 0.8 * m_rate,
            "flat raw = qemu-img convert -O raw of the top of the chain")


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
    n_fresh = [0]

    def fresh_name(tag):
        n_fresh[0] += 1
        return os.path.join(d, f"fresh-{tag}-{n_fresh[0]}.qcow2")

    # QEMU: rounds of fresh overlays (each write a copy-up), then rewrites on the last one
    log("4 KiB writes: qemu-img bench -w (fresh overlays, lazy_refcounts=on)")

    def q_fresh():
        path = fresh_name("q")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on",
             "-b", os.path.basename(top), "-F", "qcow2", path], cwd=d)
        return path

    def rounds(one_round):
        """Run rounds of per_round writes until min_time has accumulated; returns ops/s."""
        total, ops = 0.0, 0
        while total < mt or ops == 0:
            total += one_round()
            ops += per_round
        return ops / total

    last_q = []

    def q_round():
        path = q_fresh()
        t = q.seconds(path, per_round, 4096, step, write=True)
        if last_q:
            os.unlink(last_q.pop())
        last_q.append(path)
        return t

    q_round()                                                           # warm-up
    q_copyup = statistics.median(rounds(q_round) for _ in range(rep))
    qpath = last_q[0]
    q_rw, q_rw_count = q.rate(qpath, 4096, step, mt, rep, write=True)
    run(["qemu-img", "check", "-q", qpath])

    # cowchain: the same offsets, one write() per request from a Python loop
    log("4 KiB writes: cowchain (fresh overlays)")
    flush_times = []
    last_c = []

    def c_round():
        path = fresh_name("c")
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
        if last_c:
            last_c.pop().close()
        last_c.append(img)
        return dt

    c_round()
    c_copyup = statistics.median(rounds(c_round) for _ in range(rep))
    img = last_c[0]
    w = img.write

    def rewrite(n):
        ofs = qemu_offsets(n, step, size).tolist()
        t = time.perf_counter()
        for o in ofs:
            w(o, data)
        return time.perf_counter() - t

    rewrite(per_round)
    n = calibrate(rewrite, mt)
    c_rw = median_rate(rewrite, n, rep)
    t = time.perf_counter()
    img.flush()
    rw_flush = time.perf_counter() - t
    cpath = img.path
    img.close()
    chk = subprocess.run(["qemu-img", "check", "-q", cpath], capture_output=True, text=True)
    check_note = "qemu-img check clean" if chk.returncode == 0 else \
        f"qemu-img check exit {chk.returncode}: {chk.stdout.strip()[:200]}"
    res.add("write_copyup", "4 KiB writes into a fresh overlay (each a copy-up from below)",
            f"qemu-img bench -w -i {q.aio}, lazy_refcounts=on", q_copyup, c_copyup, "IOPS",
            c_copyup / q_copyup, ">= 10x", c_copyup >= 10 * q_copyup,
            f"-S {step} (4 MiB + 64 KiB): {per_round} writes per fresh overlay, one per cluster; "
            f"cowchain final flush() {statistics.median(flush_times) * 1e3:.0f} ms per overlay, "
            f"not in the rate (qemu-img bench does not time its final flush either); {check_note}")
    res.add("write_rewrite", "4 KiB rewrites of allocated clusters",
            f"qemu-img bench -w -i {q.aio}, lazy_refcounts=on", q_rw, c_rw, "IOPS",
            c_rw / q_rw, ">= 10x", c_rw >= 10 * q_rw,
            f"same offsets again on the written overlay ({q_rw_count} requests per qemu run); "
            f"cowchain final flush() {rw_flush * 1e3:.0f} ms, not in the rate")


def fig_depth(res, p, d, batch):
    mt, rep = p["min_time"], p["repeat"]
    depth = p["deep_depth"]
    log(f"depth {depth}: building the chain with engine.create")
    t0 = time.perf_counter()
    base, top = build_deep_chain(d, p["deep_base"], depth)
    build_s = time.perf_counter() - t0
    size = p["deep_base"]
    step = 4 * MiB + 4 * KiB
    rates = {}
    for name, path in (("depth1", base), ("deep", top)):
        with engine.open(path, readonly=True) as img:
            if name == "deep" and len(img.chain()) != depth:
                raise SystemExit(f"deep chain has {len(img.chain())} volumes, not {depth}")
            buf = bytearray(4096)
            ri = img.readinto

            def loop(n):
                offs = qemu_offsets(n, step, size).tolist()
                t = time.perf_counter()
                for o in offs:
                    ri(o, buf)
                return time.perf_counter() - t

            out = np.empty(batch * 4096, dtype=np.uint8)

            def batched(n):
                offs = qemu_offsets(n, step, size)
                parts = [offs[i:i + batch] for i in range(0, n, batch)]
                rv = img.readv
                t = time.perf_counter()
                for part in parts:
                    rv(part, 4096, out)
                return time.perf_counter() - t

            loop(size // 4096)
            n = calibrate(loop, mt)
            rates[name, "loop"] = median_rate(loop, n, rep)
            batched(size // 4096)
            n = max(calibrate(batched, mt, n0=batch * 4) // batch, 1) * batch
            rates[name, "batch"] = median_rate(batched, n, rep)
    for kind, label in (("loop", "readinto loop"), ("batch", f"readv batch of {batch}")):
        r1, rd = rates["depth1", kind], rates["deep", kind]
        res.add(f"depth200_{kind}", f"4 KiB random reads at depth {depth} vs depth 1 ({label})",
                "depth 1 (the base alone)", r1, rd, "IOPS", rd / r1, ">= 0.8x", rd >= 0.8 * r1,
                (f"base {size // MiB} MiB written, {depth - 1} overlays of 4 clusters each; "
                 f"chain built in {build_s:.1f} s") if kind == "loop" else "")


def fig_snapshot(res, p, d):
    reps = p["snap_reps"]
    times = {}
    close_ms = []
    for label, size in (("1G", GiB), ("1T", TiB)):
        base = f"snapbase-{label}.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(size)], cwd=d)
        ts = []
        for i in range(reps + 1):
            path = os.path.join(d, f"snap-{label}-{i}.qcow2")
            t = time.perf_counter()
            img = engine.create(path, size, backing=base, backing_format="qcow2")
            dt = time.perf_counter() - t
            t = time.perf_counter()
            img.close()
            close_ms.append((time.perf_counter() - t) * 1e3)
            os.unlink(path)
            if i:                   # the first one is the warm-up
                ts.append(dt * 1e3)
        times[label] = statistics.median(ts)
    g, t = times["1G"], times["1T"]
    res.add("snapshot_ratio", "snapshot creation (engine.create overlay), 1 TiB vs 1 GiB",
            "1 GiB virtual size", g, t, "ms", t / g, "<= 1.2x", t <= 1.2 * g,
            f"median of {reps} creates each (create() returns the open overlay; close() "
            f"{statistics.median(close_ms):.2f} ms more, not counted)")
    res.add("snapshot_abs", "snapshot creation, absolute (1 GiB | 1 TiB)", "1 GiB virtual size",
            g, t, "ms", None, "< 2 ms each", max(g, t) < 2.0)


_SPIN = "import time\nt = time.perf_counter()\nx = 0\nfor i in range(%d): x += i\nprint(time.perf_counter() - t)"


def fig_cpu(res, p):
    """How much parallel CPU this machine gives right now: other jobs on a shared machine take
    cores, and then no thread figure can scale."""
    quick = p["min_time"] < 0.5
    n = 1_000_000 if quick else 15_000_000
    reps = 1 if quick else 3
    code = _SPIN % n

    def spin(k):
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  text=True) for _ in range(k)]
        return [float(pr.communicate()[0]) for pr in procs]

    one = statistics.median(spin(1)[0] for _ in range(reps))
    two = statistics.median(max(spin(2)) for _ in range(reps))
    cap = 2 * one / two
    res.add("cpu_parallel", "CPU capacity: 2 busy processes vs 1 (parallel speed-up available "
            "to any 2-thread figure)", "1 process", n / one / 1e6, 2 * n / two / 1e6,
            "M loop steps/s", cap,
            "info (machine)", None, f"load average before the run: {meta_load()}")


def meta_load() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"


def fig_threads(res, chain, p):
    top, size = chain["top"], os.path.getsize(chain["flat"])
    mt, rep = p["min_time"], p["repeat"]
    step = 4 * MiB + 64 * KiB
    with engine.open(top, readonly=True) as img:
        def worker(n, start, barrier, out):
            buf = np.empty(64 * KiB, dtype=np.uint8)
            offs = qemu_offsets(n, step, size - 64 * KiB, start).tolist()
            ri = img.readinto
            barrier.wait()
            for o in offs:
                ri(o, buf)

        def timed(nthreads, n):
            barrier = threading.Barrier(nthreads + 1)
            ths = [threading.Thread(target=worker, args=(n, k * 7 * MiB, barrier, None))
                   for k in range(nthreads)]
            for th in ths:
                th.start()
            barrier.wait()
            t = time.perf_counter()
            for th in ths:
                th.join()
            return time.perf_counter() - t

        timed(1, size // (64 * KiB))
        n = calibrate(lambda k: timed(1, k), mt)
        r1, r2 = [], []
        for _ in range(rep):
            r1.append(n / timed(1, n))
            r2.append(2 * n / timed(2, n))
        one, two = statistics.median(r1), statistics.median(r2)
    # the machine's ceiling: the same reads as memcpy from a plain mmap of the raw file
    with open(chain["flat"], "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        arr = np.frombuffer(m, dtype=np.uint8)

        addr = arr.ctypes.data
        memmove = ctypes.memmove            # a ctypes call drops the GIL; numpy.copyto does not

        def mworker(n, start, barrier, out):
            buf = np.empty(64 * KiB, dtype=np.uint8)
            dst = buf.ctypes.data
            offs = (qemu_offsets(n, step, size - 64 * KiB, start) + np.uint64(addr)).tolist()
            barrier.wait()
            for o in offs:
                memmove(dst, o, 64 * KiB)

        def mtimed(nthreads, n):
            barrier = threading.Barrier(nthreads + 1)
            ths = [threading.Thread(target=mworker, args=(n, k * 7 * MiB, barrier, None))
                   for k in range(nthreads)]
            for th in ths:
                th.start()
            barrier.wait()
            t = time.perf_counter()
            for th in ths:
                th.join()
            return time.perf_counter() - t

        mtimed(1, size // (64 * KiB))
        mn = calibrate(lambda k: mtimed(1, k), mt)
        m1, m2 = [], []
        for _ in range(rep):
            m1.append(mn / mtimed(1, mn))
            m2.append(2 * mn / mtimed(2, mn))
        del arr
        m.close()
    mib = 64 * KiB / MiB
    res.add("threads_ceiling", "64 KiB random reads, 2 threads vs 1, plain mmap of the raw "
            "file (ctypes.memmove)", "1 thread, mmap", statistics.median(m1) * mib,
            statistics.median(m2) * mib, "MiB/s", statistics.median(m2) / statistics.median(m1),
            "info (machine ceiling)", None)
    res.add("threads_2v1", "64 KiB random reads, 2 reader threads vs 1 (one shared Image)",
            "1 thread", one * mib, two * mib, "MiB/s", two / one, ">= 1.7x", two >= 1.7 * one,
            f"{os.cpu_count()} CPUs; each thread its own buffer and offsets")


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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, short timings (smoke run)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--workdir", metavar="DIR", help="build the images here and keep them "
                    "(default: a temporary folder, removed at the end)")
    ap.add_argument("--reuse", action="store_true", help="with --workdir: reuse the chain an "
                    "earlier run built there with the same sizes")
    ap.add_argument("--min-time", type=float, help="seconds per measurement")
    ap.add_argument("--repeat", type=int, help="runs per figure (the median is reported)")
    ap.add_argument("--batch", type=int, default=1024, help="offsets per readv call")
    ap.add_argument("--only", help="comma-separated groups: reads,seq,writes,depth,snapshot,"
                    "threads,rss")
    args = ap.parse_args(argv)

    p = dict(PROFILES["quick" if args.quick else "full"])
    if args.min_time:
        p["min_time"] = args.min_time
    if args.repeat:
        p["repeat"] = args.repeat
    groups = set((args.only or "reads,seq,writes,depth,snapshot,threads,rss").split(","))

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
        "loadavg_start": meta_load(), "core": core_build(),
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
            ("reads", ["rand4k_loop", "rand4k_batch", "rand4k_batch_abs", "rand4k_batch_ceiling"],
             lambda: fig_random_reads(res, q, chain, p, args.batch)),
            ("seq", ["seq1m_vs_qemu", "seq1m_vs_mmap"], lambda: fig_seq_reads(res, q, chain, p)),
            ("writes", ["write_copyup", "write_rewrite"], lambda: fig_writes(res, q, chain, p, d)),
            ("writes", [], os.sync),    # the kept overlays' dirty pages, outside any timing
            ("depth", ["depth200_loop", "depth200_batch"], lambda: fig_depth(res, p, d, args.batch)),
            ("snapshot", ["snapshot_ratio", "snapshot_abs"], lambda: fig_snapshot(res, p, d)),
            ("threads", ["cpu_parallel"], lambda: fig_cpu(res, p)),
            ("threads", ["threads_2v1", "threads_ceiling"], lambda: fig_threads(res, chain, p)),
            ("rss", ["rss_open200"], lambda: fig_rss(res, p, d)),
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

    meta["elapsed_s"] = round(time.time() - started, 1)
    meta["loadavg_end"] = meta_load()
    print(f"cowchain vs QEMU ({meta['profile']} profile), {meta['date']}")
    print(f"{meta['qemu']}; qemu-img bench -d 1 -t writeback -i {meta['aio']}; "
          f"Python {meta['python']}; {meta['machine']}")
    print(f"core: {meta['core']}")
    print(f"chain: {p['base'] // MiB} MiB base fully written + {p['overlays']} overlays x "
          f"{p['overlay_bytes'] // MiB} MiB of scattered 64 KiB writes; qemu-img bench is "
          f"sequential with a step, so a large odd step scatters its requests (4 MiB + 4 KiB "
          f"for reads, 4 MiB + 64 KiB for writes) and cowchain replays the same offsets")
    print(f"timing: >= {p['min_time']} s per measurement, median of {p['repeat']}, after a "
          f"warm page cache and one warm-up pass of each tool; load average "
          f"{meta['loadavg_start']} at start, {meta['loadavg_end']} at end (a shared machine: "
          f"other jobs move absolute numbers, less so the ratios)")
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
