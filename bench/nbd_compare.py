#!/usr/bin/env python3
"""``cowchain serve`` vs ``qemu-nbd`` vs ``nbdkit file``, side by side, in one run.

Usage::

    python bench/nbd_compare.py [--size 1G] [--runtime 5] [--repeat 2] [--workdir DIR]
                                [--json OUT] [--only copy|randread|seqread|randwrite ...]
                                [--servers nbdkit,cowchain]

What it does:

1. Builds, with qemu-img and qemu-io, the chain: a fully written base of random bytes (SIZE)
   and 10 QCOW2 overlays of scattered 64 KiB writes (16 MiB each); ``qemu-img convert -O raw``
   of the top gives the flat raw file. Everything is read once so it sits in the page cache.
2. Serves the chain with ``cowchain serve --read-only`` and ``qemu-nbd -r -t -e 4``, and the
   raw file with ``nbdkit file`` (its fastest case: no chain), each on a Unix socket.
3. Measures, for each server, interleaved (server A, B, C, then again) ``--repeat`` times,
   reporting each server's median run (the machine is shared: medians of interleaved
   rounds are what compares fairly):
   - ``nbdcopy URI null:`` of the whole disk (GiB/s),
   - fio (nbd engine, one job) 4 KiB random read at queue depth 32 (IOPS),
   - fio 1 MiB sequential read at queue depth 8 (GiB/s),
   - fio 4 KiB random write at queue depth 32 into a fresh overlay of the chain (for nbdkit:
     into a copy of the raw file), each server on its own fresh target (IOPS).
4. Prints one row per workload: the three figures, then cowchain/qemu-nbd and
   cowchain/nbdkit; then a second table of each server's CPU time per unit of work (from
   /proc, per op or per GiB), as ratios too: on a shared machine other jobs disturb it far
   less than the wall-clock figures. The goals (README "cowchain serve") are 1.5x qemu-nbd on every row and at
   least nbdkit on reads; a missed goal is printed as MISSED, never hidden.

Client and servers share the machine's cores; compare only figures from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

MiB, GiB = 1 << 20, 1 << 30


class ToolFailed(Exception):
    pass


def sh(*argv: str, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise ToolFailed(f"{' '.join(argv[:3])} ... exited {p.returncode}: "
                         f"{(p.stderr or p.stdout)[-500:]}")
    return p


def build(work: str, size: int) -> tuple[str, str]:
    base_raw = os.path.join(work, "base.raw")
    with open(base_raw, "wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
    prev = os.path.join(work, "l0.qcow2")
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", base_raw, prev)
    os.unlink(base_raw)
    import random
    rng = random.Random(7)
    for i in range(1, 11):
        top = os.path.join(work, f"l{i}.qcow2")
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.basename(prev), "-F",
           "qcow2", top)
        cmds = []
        for _ in range(256):
            cmds += ["-c", f"write -P {rng.randrange(1, 255)} "
                           f"{rng.randrange(0, size // 65536) * 65536} 64k"]
        sh("qemu-io", "-f", "qcow2", *cmds, top)
        prev = top
    flat = os.path.join(work, "flat.raw")
    sh("qemu-img", "convert", "-f", "qcow2", "-O", "raw", prev, flat)
    return prev, flat


def warm(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(16 * MiB):
                pass


class Srv:
    def __init__(self, name: str, argv: list[str], sock: str, uri: str, ready_line: bool):
        self.name, self.sock, self.uri = name, sock, uri
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        if ready_line:
            line = self.proc.stdout.readline()
            if not line.startswith("nbd"):
                raise SystemExit(f"{name} did not start: {self.proc.stderr.read()}")
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} did not start: {self.proc.stderr.read()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start(kind: str, image: str, sock: str, readonly: bool) -> Srv:
    if os.path.exists(sock):
        os.unlink(sock)
    if kind == "cowchain":
        argv = [sys.executable, "-m", "engine.cli", "serve", "--socket", sock, image]
        if readonly:
            argv.insert(4, "--read-only")
        return Srv(kind, argv, sock, f"nbd+unix:///?socket={sock}", True)
    if kind == "qemu-nbd":
        argv = ["qemu-nbd", "-t", "-e", "4", "-k", sock, "-f", "qcow2", "--cache=writeback",
                image]
        if readonly:
            argv.insert(1, "-r")
        return Srv(kind, argv, sock, f"nbd+unix:///?socket={sock}", False)
    argv = ["nbdkit", "-f", "-U", sock, "file", image]
    if readonly:
        argv.insert(1, "-r")
    return Srv(kind, argv, sock, f"nbd+unix:///?socket={sock}", False)


def fio(uri: str, rw: str, bs: str, depth: int, runtime: float) -> dict:
    p = sh("fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={depth}", f"--runtime={runtime}", "--time_based", "--output-format=json",
           timeout=runtime * 4 + 60)
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    return {"iops": side["iops"], "bw": side["bw_bytes"], "ios": side["total_ios"],
            "bytes": side["io_bytes"]}


def nbdcopy(uri: str) -> float:
    t = time.perf_counter()
    sh("nbdcopy", uri, "null:", timeout=600)
    return time.perf_counter() - t


KINDS = ["qemu-nbd", "nbdkit", "cowchain"]
#: --only names of the workloads
ROWS = {"copy": "nbdcopy GiB/s", "randread": "4k randread QD32 IOPS",
        "seqread": "1M seq read QD8 GiB/s", "randwrite": "4k randwrite QD32 IOPS (fresh overlay)"}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(runs: dict, cpu: dict, srv: "Srv", row: str, fn) -> None:
    """Run FN, which returns (figure, work done: ops for IOPS rows, GiB otherwise), and record
    the figure under ROW, and the server's CPU time per unit of work (a figure that load from
    other jobs on a shared machine disturbs far less than wall time). A failure is printed
    and recorded as N/A."""
    kind = srv.name
    before = cpu_seconds(srv.proc.pid)
    try:
        value, work = fn()
        used = (cpu_seconds(srv.proc.pid) - before) / work if work else float("nan")
    except (ToolFailed, subprocess.TimeoutExpired) as e:
        print(f"  {kind} {row}: failed: {e}", flush=True)
        value = used = float("nan")
    runs[kind].setdefault(row, []).append(value)
    cpu[kind].setdefault(row, []).append(used)
    print(f"  {kind:9} {row:40} {value:12.2f}", flush=True)


def fio_row(uri: str, rw: str, bs: str, depth: int, runtime: float, iops: bool):
    def run() -> tuple[float, float]:
        r = fio(uri, rw, bs, depth, runtime)
        return (r["iops"], r["ios"]) if iops else (r["bw"] / GiB, r["bytes"] / GiB)
    return run


def copy_row(uri: str, size: int):
    def run() -> tuple[float, float]:
        return size / nbdcopy(uri) / GiB, size / GiB
    return run


def _median(values: list[float]) -> float:
    """The median of the runs that did not fail (NaN when all failed)."""
    ok = sorted(v for v in values if v == v)
    if not ok:
        return float("nan")
    mid = len(ok) // 2
    return ok[mid] if len(ok) % 2 else (ok[mid - 1] + ok[mid]) / 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="disk size (default 1G)")
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per fio run")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds (median kept)")
    ap.add_argument("--workdir", help="where to build the files (default: a temporary folder)")
    ap.add_argument("--json", help="write every run here")
    ap.add_argument("--only", action="append", choices=list(ROWS),
                    help="run only this workload (repeatable; default: all)")
    ap.add_argument("--servers", default=",".join(KINDS),
                    help=f"comma-separated servers to compare (default {','.join(KINDS)})")
    args = ap.parse_args()
    only = set(args.only or ROWS)
    kinds = [k for k in KINDS if k in args.servers.split(",")]
    if "cowchain" not in kinds:
        raise SystemExit("--servers must include cowchain")
    size = int(args.size[:-1]) * {"M": MiB, "G": GiB}[args.size[-1].upper()]
    for tool in ("qemu-img", "qemu-io", "qemu-nbd", "nbdkit", "nbdcopy", "fio"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing (apt-get install qemu-utils nbdkit "
                             "libnbd-bin fio)")
    work = args.workdir or tempfile.mkdtemp(prefix="cowchain-nbdbench-")
    os.makedirs(work, exist_ok=True)
    print(f"building the chain ({args.size} base + 10 overlays) in {work} ...", flush=True)
    top, flat = build(work, size)
    warm([os.path.join(work, f"l{i}.qcow2") for i in range(11)] + [flat])
    runs: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
    cpu: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
    print(f"load average at start: {os.getloadavg()}", flush=True)

    servers = {k: start(k, flat if k == "nbdkit" else top, os.path.join(work, f"{k}.sock"),
                        True) for k in kinds} if only - {"randwrite"} else {}
    try:
        for _ in range(args.repeat):
            for key, fn in (("copy", lambda s: copy_row(s.uri, size)),
                            ("randread", lambda s: fio_row(s.uri, "randread", "4k", 32,
                                                           args.runtime, True)),
                            ("seqread", lambda s: fio_row(s.uri, "read", "1M", 8,
                                                          args.runtime, False))):
                if key in only:
                    for s in servers.values():
                        measure(runs, cpu, s, ROWS[key], fn(s))
    finally:
        for s in servers.values():
            s.stop()
    for rnd in range(args.repeat if "randwrite" in only else 0):
        for k in kinds:
            target = os.path.join(work, f"w-{k}-{rnd}")
            if k == "nbdkit":
                shutil.copyfile(flat, target)
            else:
                sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.basename(top),
                   "-F", "qcow2", target)
            s = start(k, target, os.path.join(work, f"w{k}.sock"), False)
            try:
                measure(runs, cpu, s, ROWS["randwrite"],
                        fio_row(s.uri, "randwrite", "4k", 32, args.runtime, True))
            finally:
                s.stop()
                os.unlink(target)
    print(f"load average at end: {os.getloadavg()}")
    rows = list(runs["cowchain"])
    print(f"\n{'workload':40} {'qemu-nbd':>10} {'nbdkit':>10} {'cowchain':>10} "
          f"{'vs qemu-nbd':>12} {'vs nbdkit':>10}  goals")
    for row in rows:
        best = {k: _median(runs.get(k, {}).get(row, [])) for k in KINDS}
        rq, rk = best["cowchain"] / best["qemu-nbd"], best["cowchain"] / best["nbdkit"]
        goal_q = rq >= 1.5
        goal_k = rk >= 1.0 or "write" in row
        fmt = "{:>10.0f}" if "IOPS" in row else "{:>10.2f}"
        print(f"{row:40} " + " ".join(fmt.format(best[k]) for k in KINDS)
              + f" {rq:>11.2f}x {rk:>9.2f}x  "
              + ("met" if goal_q and goal_k else "MISSED" if rq == rq and rk == rk else "N/A"))
    print(f"\nserver CPU per unit of work (median run; lower is better): us per op for IOPS "
          f"rows, s per GiB otherwise\n{'workload':40} {'qemu-nbd':>10} {'nbdkit':>10} "
          f"{'cowchain':>10} {'vs qemu-nbd':>12} {'vs nbdkit':>10}")
    for row in rows:
        best = {k: _median(cpu.get(k, {}).get(row, [])) * (1e6 if "IOPS" in row else 1)
                for k in KINDS}
        print(f"{row:40} " + " ".join(f"{best[k]:>10.2f}" for k in KINDS)
              + f" {best['qemu-nbd'] / best['cowchain']:>11.2f}x "
                f"{best['nbdkit'] / best['cowchain']:>9.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"figures": runs, "server_cpu_per_work": cpu}, f, indent=1)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
