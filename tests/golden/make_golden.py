#!/usr/bin/env python3
"""Regenerate the golden images in this folder with the installed qemu-img and qemu-io.

The golden images are small QCOW2 files that QEMU made once; they are checked in together
with one JSON file of expected facts per QCOW2 file, and ``tests/test_golden.py`` checks
cowchain against those facts without running any QEMU tool.  The test suite never runs this
script: run it by hand (``python3 tests/golden/make_golden.py``) only to add an image or to
move the goldens to another QEMU version, then review the diff of the JSON files.

Every image is made in a scratch folder by the exact commands listed in its JSON file
(``commands``: argument lists run with the scratch folder as the working directory, so
backing names are relative).  Data comes from pattern files whose bytes are a pure function
of their name (``patterns``), so a rerun with the same QEMU makes the same files, except for
the timestamps QEMU writes into snapshot tables and the order in which compressed clusters
land in the file (QEMU compresses on worker threads); the facts other than those files'
sha256 and the snapshot dates come out the same.

Per QCOW2 file, ``NAME.json`` holds:

- ``qemu_img_version``: the ``qemu-img --version`` line of the tools that made it;
- ``commands``, ``patterns``: how the image (and the rest of its chain) was made;
- ``files``: the chain top first, as the file names it is stored under here
  (``stored_as``; a file larger than ``GZIP_OVER`` bytes is stored gzip-compressed with a
  ``.gz`` suffix, which the tests undo in a temporary folder), with the sha256 of each
  file's uncompressed bytes;
- ``check``: ``qemu-img check --output=json`` without ``filename``;
- ``info``: ``qemu-img info --output=json`` without the path fields ``filename`` and
  ``full-backing-filename`` and without ``actual-size`` (the host file system's allocation
  of the file, which a checkout does not reproduce);
- ``map``: ``qemu-img map --output=json`` of the whole chain;
- ``virtual_size``, ``sha256``: the virtual disk as ``qemu-img convert -O raw`` reads it
  through the chain, and its sha256;
- ``samples``: ``[offset, length, sha256]`` of reads around the edges of what was written.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

KiB = 1024
MiB = 1024 * KiB

#: Files larger than this are stored gzip-compressed (``NAME.gz``).
GZIP_OVER = 256 * KiB


# --- pattern files ---------------------------------------------------------------------------

def pattern_bytes(name: str, size: int, repeat: int = 0) -> bytes:
    """The content of pattern file NAME: SHAKE-256 of the name, SIZE bytes long; with REPEAT,
    its first REPEAT bytes repeated (compressible data for compressed clusters)."""
    if repeat:
        unit = hashlib.shake_256(name.encode()).digest(repeat)
        return (unit * (size // repeat + 1))[:size]
    return hashlib.shake_256(name.encode()).digest(size)


class Pat:
    """A pattern file: ``Pat("a", 9000)`` or ``Pat("z", 16384, repeat=64)``."""

    def __init__(self, name: str, size: int, repeat: int = 0):
        self.file = f"pat-{name}.bin"
        self.size = size
        self.repeat = repeat

    def recipe(self) -> dict:
        how = "shake_256(file name).digest(size)"
        if self.repeat:
            how = f"shake_256(file name).digest({self.repeat}) repeated to size"
        data = pattern_bytes(self.file, self.size, self.repeat)
        return {"size": self.size, "recipe": how, "sha256": hashlib.sha256(data).hexdigest()}


# --- the images ------------------------------------------------------------------------------
#
# Each group is (description, [qcow2 files to describe, top of each chain], steps).  A step
# is an argv list; a qemu-io write from a pattern file is written ("write", path, Pat, off)
# and expands to ``qemu-io -f FMT -c 'write -q -s pat-X.bin OFF LEN' PATH``.

def create(path, size, *opts, fmt="qcow2", backing=None, backing_fmt=None):
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    if backing:
        argv += ["-b", backing, "-F", backing_fmt]
    if opts:
        argv += ["-o", ",".join(opts)]
    return argv + [path, str(size)]


def io(path, *cmds, fmt="qcow2"):
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    return argv + [path]


def w(pat: Pat, off: int) -> tuple:
    return ("write", pat, off)


GROUPS = [
    ("v2 image (compat=0.10), 64 KiB clusters, refcount_bits 16: partial writes across a "
     "cluster boundary, a zero write (v2 has no zero flag: QEMU writes zeros), a data cluster "
     "discarded again (freed in the middle of the file)",
     ["v2-c64k.qcow2"],
     [create("v2-c64k.qcow2", MiB, "compat=0.10", "cluster_size=65536"),
      ("io", "v2-c64k.qcow2", [w(Pat("v2a", 9000), 1000), w(Pat("v2b", 5000), 130000),
                               "write -q -z 133000 1000", w(Pat("v2c", 65536), 393216),
                               "discard -q 393216 65536"])]),
    ("v3, 512-byte clusters, refcount_bits 1: unaligned writes over many clusters, a zero "
     "write on allocated clusters (zero flag kept with the allocation), a zero write with "
     "unmap on unallocated clusters, a discarded data cluster",
     ["v3-c512-rc1.qcow2"],
     [create("v3-c512-rc1.qcow2", 256 * KiB, "cluster_size=512", "refcount_bits=1"),
      ("io", "v3-c512-rc1.qcow2", [w(Pat("c512a", 3000), 100), w(Pat("c512b", 2048), 65536),
                                   "write -q -z 66048 512", "write -q -z -u 200000 4096",
                                   "discard -q 65536 512", w(Pat("c512c", 777), 262144 - 777)])]),
    ("v3, 4 KiB clusters, refcount_bits 64: writes, a zero write, a zero write with unmap over "
     "data, a discard",
     ["v3-c4k-rc64.qcow2"],
     [create("v3-c4k-rc64.qcow2", MiB, "cluster_size=4096", "refcount_bits=64"),
      ("io", "v3-c4k-rc64.qcow2", [w(Pat("c4a", 20000), 3000), w(Pat("c4b", 4096), 524288),
                                   w(Pat("c4c", 8192), 700000), "write -q -z 8192 4096",
                                   "write -q -z -u 704512 4096", "discard -q 12288 4096",
                                   w(Pat("c4d", 100), MiB - 100)])]),
    ("v3, 2 MiB clusters, a 4 MiB disk: a partial write into each cluster",
     ["v3-c2m.qcow2"],
     [create("v3-c2m.qcow2", 4 * MiB, "cluster_size=2097152"),
      ("io", "v3-c2m.qcow2", [w(Pat("c2ma", 5000), 1000), w(Pat("c2mb", 3000), 3 * MiB + 17)])]),
    ("v3, 4 KiB clusters, deflate compression: compressed clusters written by qemu-io -c, one "
     "of them partly overwritten (it becomes a normal cluster), a normal cluster",
     ["compressed-zlib.qcow2"],
     [create("compressed-zlib.qcow2", 256 * KiB, "cluster_size=4096", "compression_type=zlib"),
      ("io", "compressed-zlib.qcow2",
       ["write -q -c -s pat-zla.bin 0 16384", "write -q -c -s pat-zlb.bin 65536 4096",
        w(Pat("zlc", 100), 2000), w(Pat("zld", 4096), 131072)])],
     [Pat("zla", 16384, repeat=64), Pat("zlb", 4096, repeat=512)]),
    ("v3, 4 KiB clusters, zstd compression: compressed clusters written by qemu-io -c, one "
     "of them partly overwritten, a normal cluster",
     ["compressed-zstd.qcow2"],
     [create("compressed-zstd.qcow2", 256 * KiB, "cluster_size=4096", "compression_type=zstd"),
      ("io", "compressed-zstd.qcow2",
       ["write -q -c -s pat-zsa.bin 0 16384", "write -q -c -s pat-zsb.bin 65536 4096",
        w(Pat("zsc", 100), 2000), w(Pat("zsd", 4096), 131072)])],
     [Pat("zsa", 16384, repeat=64), Pat("zsb", 4096, repeat=512)]),
    ("v3, 64 KiB clusters, extended_l2=on (2 KiB subclusters): partly written clusters "
     "(single subclusters, unaligned runs), zero subclusters with and without unmap",
     ["extl2-c64k.qcow2"],
     [create("extl2-c64k.qcow2", 512 * KiB, "cluster_size=65536", "extended_l2=on"),
      ("io", "extl2-c64k.qcow2", [w(Pat("xa", 2048), 2048), w(Pat("xb", 3000), 10000),
                                  "write -q -z 20480 2048", "write -q -z -u 200704 6144",
                                  w(Pat("xc", 100), 300000)])]),
    ("v3, 4 KiB clusters, an internal snapshot (qemu-img snapshot -c) and writes after it: "
     "a shared cluster overwritten (copied), a shared cluster zeroed, a shared cluster "
     "discarded, a new cluster",
     ["snapshot.qcow2"],
     [create("snapshot.qcow2", 256 * KiB, "cluster_size=4096"),
      ("io", "snapshot.qcow2", [w(Pat("sa", 20000), 0)]),
      ["qemu-img", "snapshot", "-c", "s1", "snapshot.qcow2"],
      ("io", "snapshot.qcow2", [w(Pat("sb", 4096), 4096), "write -q -z 12288 4096",
                                "discard -q 16384 4096", w(Pat("sc", 3000), 100000)])]),
    ("v3, 4 KiB clusters, lazy_refcounts=on, closed cleanly",
     ["lazy.qcow2"],
     [create("lazy.qcow2", 256 * KiB, "cluster_size=4096", "lazy_refcounts=on"),
      ("io", "lazy.qcow2", [w(Pat("la", 10000), 500), w(Pat("lb", 4096), 65536),
                            "write -q -z 8192 4096"])]),
    ("a qcow2 overlay (4 KiB clusters) over a RAW backing file that is shorter than the "
     "overlay: copy-up writes, a zero write, a discard (zero flag over the backing file), a "
     "write across the backing file's end",
     ["raw-overlay.qcow2"],
     [create("raw-base.raw", 192 * KiB + 512, fmt="raw"),
      ("io", "raw-base.raw", [w(Pat("ra", 192 * KiB + 512), 0)], "raw"),
      create("raw-overlay.qcow2", 256 * KiB, "cluster_size=4096", backing="raw-base.raw",
             backing_fmt="raw"),
      ("io", "raw-overlay.qcow2", [w(Pat("rb", 200), 4000), "write -q -z 65536 8192",
                                   "discard -q 131072 4096", w(Pat("rc", 3000), 196000)])]),
    ("a 3-image qcow2 chain with relative backing names and backing formats: base (v3, 4 KiB "
     "clusters) <- mid (v2, 512-byte clusters) <- top (v3, 16 KiB clusters, extended_l2=on, so "
     "unallocated subclusters of allocated clusters read through)",
     ["chain-base.qcow2", "chain-mid.qcow2", "chain-top.qcow2"],
     [create("chain-base.qcow2", 512 * KiB, "cluster_size=4096"),
      ("io", "chain-base.qcow2", [w(Pat("cba", 64 * KiB), 0), w(Pat("cbb", 8192), 300000),
                                  "write -q -z -u 40960 8192"]),
      create("chain-mid.qcow2", 512 * KiB, "compat=0.10", "cluster_size=512",
             backing="chain-base.qcow2", backing_fmt="qcow2"),
      ("io", "chain-mid.qcow2", [w(Pat("cma", 5000), 1234), "write -q -z 100000 2048",
                                 w(Pat("cmb", 1000), 400000)]),
      create("chain-top.qcow2", 512 * KiB, "cluster_size=16384", "extended_l2=on",
             backing="chain-mid.qcow2", backing_fmt="qcow2"),
      ("io", "chain-top.qcow2", [w(Pat("cta", 300), 1500), "write -q -z 16384 1024",
                                 "discard -q 32768 16384", w(Pat("ctb", 2000), 399000)])]),
]


# --- running ---------------------------------------------------------------------------------

def run(argv: list[str], cwd: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, env={**os.environ, "LC_ALL": "C"})
    text = (proc.stdout + proc.stderr).decode(errors="replace")
    if proc.returncode != 0 or (argv[0] == "qemu-io" and any(
            word in text.lower() for word in ("failed", "error"))):
        sys.exit(f"{' '.join(argv)} exited {proc.returncode}:\n{text}")
    return proc


def expand(step, patterns: dict[str, Pat]) -> list[str]:
    """The argv of one step; pattern writes become ``write -q -s FILE OFF LEN``."""
    if isinstance(step, list):
        return step
    _, path, cmds, *fmt = step
    out = []
    for c in cmds:
        if isinstance(c, tuple):
            _, pat, off = c
            patterns[pat.file] = pat
            c = f"write -q -s {pat.file} {off} {pat.size}"
        out.append(c)
    return io(path, *out, fmt=fmt[0] if fmt else "qcow2")


def written_ranges(commands: list[list[str]]) -> list[tuple[int, int]]:
    """(offset, length) of every qemu-io write/zero/discard in COMMANDS."""
    out = []
    for argv in commands:
        if argv[0] != "qemu-io":
            continue
        for i, a in enumerate(argv):
            if i and argv[i - 1] == "-c":
                words = a.split()
                out.append((int(words[-2]), int(words[-1])))
    return out


def sample_ranges(commands, size: int) -> list[tuple[int, int]]:
    """A handful of reads: the first 4 KiB, the last KiB, and short reads across the start
    and the end of every range a command touched."""
    picks = {(0, min(4096, size)), (max(0, size - 1024), min(1024, size))}
    for off, length in written_ranges(commands):
        for edge in (off, off + length):
            start = max(0, edge - 7)
            picks.add((start, min(size, edge + 9) - start))
    return sorted(p for p in picks if p[1] > 0)


def qemu_json(cwd: str, *args: str):
    return json.loads(run(["qemu-img", *args, "--output=json"], cwd).stdout)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored_name(path: str) -> str:
    return os.path.basename(path) + (".gz" if os.path.getsize(path) > GZIP_OVER else "")


def backing_chain(cwd: str, name: str) -> list[tuple[str, str]]:
    """(file, format) of NAME and its backing files, top first, from qemu-img info."""
    chain = [(name, "qcow2")]
    info = qemu_json(cwd, "info", "-f", "qcow2", name)
    while "backing-filename" in info:
        name, fmt = info["backing-filename"], info["backing-filename-format"]
        chain.append((name, fmt))
        if fmt != "qcow2":
            break
        info = qemu_json(cwd, "info", "-f", fmt, name)
    return chain


def describe(cwd: str, name: str, covers: str, version: str, commands, patterns) -> dict:
    check = qemu_json(cwd, "check", "-f", "qcow2", name)
    check.pop("filename")
    info = qemu_json(cwd, "info", "-f", "qcow2", name)
    for key in ("filename", "full-backing-filename", "actual-size"):
        info.pop(key, None)
    raw = os.path.join(cwd, name + ".golden-raw")
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", name, raw], cwd)
    with open(raw, "rb") as f:
        disk = f.read()
    os.unlink(raw)
    files = []
    for fname, fmt in backing_chain(cwd, name):
        with open(os.path.join(cwd, fname), "rb") as f:
            files.append({"file": fname, "format": fmt,
                          "stored_as": stored_name(os.path.join(cwd, fname)),
                          "sha256": sha256(f.read())})
    return {
        "image": name,
        "covers": covers,
        "qemu_img_version": version,
        "commands": commands,
        "patterns": {p.file: p.recipe() for p in sorted(patterns.values(), key=lambda p: p.file)},
        "files": files,
        "check": check,
        "info": info,
        "map": qemu_json(cwd, "map", "-f", "qcow2", name),
        "virtual_size": len(disk),
        "sha256": sha256(disk),
        "samples": [[off, length, sha256(disk[off:off + length])]
                    for off, length in sample_ranges(commands, len(disk))],
    }


def build(out: str) -> None:
    version = subprocess.run(["qemu-img", "--version"], capture_output=True, check=True,
                             text=True).stdout.splitlines()[0]
    for old in os.listdir(out):
        if old.endswith((".qcow2", ".raw", ".gz", ".json")):
            os.unlink(os.path.join(out, old))
    for covers, tops, steps, *extra in GROUPS:
        patterns: dict[str, Pat] = {p.file: p for p in (extra[0] if extra else [])}
        with tempfile.TemporaryDirectory(prefix="cowchain-golden-") as work:
            commands = [expand(s, patterns) for s in steps]
            for pat in patterns.values():
                with open(os.path.join(work, pat.file), "wb") as f:
                    f.write(pattern_bytes(pat.file, pat.size, pat.repeat))
            for argv in commands:
                run(argv, work)
            for name in tops:
                facts = describe(work, name, covers, version, commands, patterns)
                with open(os.path.join(out, name[:-len(".qcow2")] + ".json"), "w") as f:
                    json.dump(facts, f, indent=1, sort_keys=True)
                    f.write("\n")
            for fname in os.listdir(work):
                if fname.startswith("pat-"):
                    continue
                src = os.path.join(work, fname)
                dst = os.path.join(out, stored_name(src))
                if dst.endswith(".gz"):
                    with open(src, "rb") as f, gzip.GzipFile(dst, "wb", mtime=0) as g:
                        shutil.copyfileobj(f, g)
                else:
                    shutil.copyfile(src, dst)
            print(f"{', '.join(tops)}: made")


if __name__ == "__main__":
    build(HERE)
