"""Differential suite for ``cowchain img``: the same inputs given to ``qemu-img`` and to
``cowchain img`` give the same JSON (field by field), the same exit codes, and data that
``qemu-img compare`` calls identical.

Images are generated per case (seeded): v2/v3, cluster sizes 512 B to 2 MiB, refcount widths,
raw and qcow2 backing files, zero clusters, discarded ranges, compressed clusters written by
``qemu-img convert -c`` (deflate and zstd), internal snapshots made by ``qemu-img snapshot
-c``, extended L2 entries.  ``cowchain img`` runs in-process (``engine.cli.main``) in the
same folder, so both tools see the same relative file names.

Fields that must differ: none in the JSON compared here.  ``map`` prints QEMU 7.2's keys
(no ``compressed``, a QEMU 8.2 addition); ``bench`` is compared on the request pattern,
not on time.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from engine import cli
from qemu import qemu_img, qemu_io

MiB = 1 << 20


@dataclass(frozen=True)
class Case:
    name: str
    compat: str = "1.1"
    cluster_size: int = 65536
    refcount_bits: int = 16
    extended_l2: bool = False
    backing: str | None = None          # None, "raw" or "qcow2"
    compressed: str | None = None       # None, "zlib" or "zstd": top written by convert -c
    snapshot: bool = False
    lazy: bool = False
    bitmaps: bool = False               # persistent bitmaps added by qemu-img bitmap --add
    size: int = 4 * MiB

    def options(self) -> str:
        o = [f"compat={self.compat}", f"cluster_size={self.cluster_size}"]
        if self.compat == "1.1":
            o += [f"refcount_bits={self.refcount_bits}",
                  f"extended_l2={'on' if self.extended_l2 else 'off'}"]
            if self.lazy:
                o.append("lazy_refcounts=on")
            if self.compressed:
                o.append(f"compression_type={self.compressed}")
        return ",".join(o)


CASES = [
    Case("v2-512", compat="0.10", cluster_size=512, size=1 * MiB),
    Case("v2-64k-qcow2-backing", compat="0.10", backing="qcow2"),
    Case("v3-4k-rc1", cluster_size=4096, refcount_bits=1),
    Case("v3-64k-rc8-raw-backing", refcount_bits=8, backing="raw"),
    Case("v3-64k-rc64-snapshot", refcount_bits=64, snapshot=True),
    Case("v3-2M", cluster_size=2 * MiB, size=8 * MiB),
    Case("v3-64k-extl2", extended_l2=True, backing="qcow2"),
    Case("v3-32k-deflate", cluster_size=32768, compressed="zlib"),
    Case("v3-64k-zstd", compressed="zstd"),
    Case("v3-16k-lazy-raw-backing", cluster_size=16384, lazy=True, backing="raw"),
    Case("v3-64k-bitmaps-qcow2-backing", bitmaps=True, backing="qcow2"),
]


def _writes(path: str, fmt: str, size: int, cluster: int, seed: int, zeros: bool) -> None:
    rng = random.Random(seed)
    cmds = []
    for _ in range(8):
        n = rng.choice([512, 4096, cluster, 3 * cluster])
        n = min(n, size // 4)
        off = rng.randrange(0, (size - n) // 512) * 512
        kind = rng.random()
        if zeros and kind < 0.25:
            cmds.append(f"write -z {off} {n}")
        elif zeros and kind < 0.35:
            cmds.append(f"discard {off} {n}")
        else:
            cmds.append(f"write -P {rng.randrange(1, 255)} {off} {n}")
    qemu_io(path, *cmds, fmt=fmt)


def build(case: Case, folder: str) -> str:
    """Make the case's image (and backing file) in FOLDER; return the top's name."""
    os.chdir(folder)
    seed = sum(map(ord, case.name))
    if case.backing == "raw":
        qemu_img("create", "-f", "raw", "base.raw", case.size)
        _writes("base.raw", "raw", case.size, case.cluster_size, seed + 1, zeros=False)
    elif case.backing == "qcow2":
        qemu_img("create", "-f", "qcow2", "-o", case.options().replace(
            "extended_l2=on", "extended_l2=off"), "base.qcow2", case.size)
        _writes("base.qcow2", "qcow2", case.size, case.cluster_size, seed + 1, zeros=True)
    if case.compressed:
        qemu_img("create", "-f", "raw", "src.raw", case.size)
        _writes("src.raw", "raw", case.size, case.cluster_size, seed + 2, zeros=False)
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", case.options(),
                 "src.raw", "top.qcow2")
        os.unlink("src.raw")
    else:
        args = ["create", "-f", "qcow2", "-o", case.options()]
        if case.backing:
            args += ["-b", f"base.{case.backing}", "-F", case.backing]
        qemu_img(*args, "top.qcow2", case.size)
    _writes("top.qcow2", "qcow2", case.size, case.cluster_size, seed + 3,
            zeros=case.compat == "1.1")
    if case.bitmaps:
        qemu_img("bitmap", "--add", "-g", "65536", "top.qcow2", "tracked")
        qemu_img("bitmap", "--add", "--disable", "top.qcow2", "frozen")
    if case.snapshot:
        qemu_img("snapshot", "-c", "first", "top.qcow2")
        _writes("top.qcow2", "qcow2", case.size, case.cluster_size, seed + 4, zeros=True)
    return "top.qcow2"


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request, tmp_path, monkeypatch):
    """The case's files, built in the test's own folder, which is the cwd.  (Built per
    test, not copied: a copy changes which ranges of the files are holes, and qemu-img's
    answers depend on that; see test_where_qemu_img_guesses_preallocation.)"""
    monkeypatch.chdir(tmp_path)
    build(request.param, str(tmp_path))
    return request.param


def ours(capsys, *args: object) -> tuple[int, str, str]:
    """Run ``cowchain img ARGS`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main(["img", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def theirs(*args: object) -> tuple[int, str, str]:
    p = qemu_img(*args, check=False)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def both_json(capsys, *args: object) -> tuple[object, object]:
    """The same verb through both tools with --output=json; both must exit alike."""
    c1, o1, e1 = theirs(*args[:1], "--output=json", *args[1:])
    c2, o2, e2 = ours(capsys, *args[:1], "--output=json", *args[1:])
    assert c1 == c2, (args, c1, e1, c2, e2)
    return json.loads(o1), json.loads(o2)


# --- read-only verbs: field-by-field JSON ---------------------------------------------------

def test_info(case, capsys):
    q, c = both_json(capsys, "info", "-f", "qcow2", "top.qcow2")
    assert c == q


def test_info_backing_chain(case, capsys):
    q, c = both_json(capsys, "info", "--backing-chain", "-f", "qcow2", "top.qcow2")
    assert c == q


def without_recursed_zeros(entries):
    """QEMU's map with the one field that must differ folded away: when qemu-img guesses
    that an image was preallocated (more refcounted clusters than the file has blocks), it
    asks the host file for holes inside data clusters and reports them ``zero: true, data:
    true``; cowchain reports the cluster as data (``zero: false``).  Those entries are
    turned into plain data and merged as qemu-img merges."""
    out = []
    for e in entries:
        e = dict(e, zero=False) if e["data"] and e["zero"] else dict(e)
        p = out[-1] if out else None
        if p and all(p[k] == e[k] for k in ("depth", "present", "zero", "data")) and \
                ("offset" in p) == ("offset" in e) and \
                ("offset" not in e or p["offset"] + p["length"] == e["offset"]):
            p["length"] += e["length"]
        else:
            out.append(e)
    return out


def test_map(case, capsys):
    q, c = both_json(capsys, "map", "-f", "qcow2", "top.qcow2")
    assert c == without_recursed_zeros(q)


@pytest.mark.parametrize("size,args", [("0", []), ("1M", ["--start-offset", "2M"]),
                                       ("1M", ["--start-offset", "4k", "--max-length", "0"])])
def test_map_of_an_empty_range(tmp_path, monkeypatch, capsys, size, args):
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "e.qcow2", size)
    q, c = both_json(capsys, "map", *args, "e.qcow2")
    assert c == q


def test_map_text_is_qemu_img_text(case, capsys):
    c1, o1, _ = theirs("map", "--output=json", "-f", "qcow2", "top.qcow2")
    c2, o2, _ = ours(capsys, "map", "--output=json", "-f", "qcow2", "top.qcow2")
    assert c2 == c1
    if json.loads(o1) == without_recursed_zeros(json.loads(o1)):
        assert o2 == o1


def test_check(case, capsys):
    q, c = both_json(capsys, "check", "-f", "qcow2", "top.qcow2")
    assert c == q


@pytest.mark.parametrize("target", ["qcow2", "raw"])
def test_measure_image(case, capsys, target):
    q, c = both_json(capsys, "measure", "-f", "qcow2", "-O", target, "top.qcow2")
    assert c == q


@pytest.mark.parametrize("opts", ["cluster_size=512", "cluster_size=2M,refcount_bits=64",
                                  "compat=0.10", "extended_l2=on", "cluster_size=4k"])
@pytest.mark.parametrize("size", [0, 1000, 10 << 30, 3 * MiB + 512])
def test_measure_size(capsys, opts, size):
    q, c = both_json(capsys, "measure", "-O", "qcow2", "-o", opts, "--size", size)
    assert c == q


def test_snapshot_list(case, capsys):
    c1, o1, _ = theirs("snapshot", "-l", "top.qcow2")
    c2, o2, _ = ours(capsys, "snapshot", "-l", "top.qcow2")
    assert (c2, o2) == (c1, o1)


# --- compare: exit codes and first differing offset -----------------------------------------

def test_compare(case, capsys):
    qemu_img("convert", "-f", "qcow2", "-O", "raw", "top.qcow2", "flat.raw")
    for args in (["-f", "qcow2", "-F", "raw", "top.qcow2", "flat.raw"],
                 ["-s", "-f", "qcow2", "-F", "raw", "top.qcow2", "flat.raw"]):
        c1, o1, _ = theirs("compare", *args)
        c2, o2, _ = ours(capsys, "compare", *args)
        assert (c2, o2) == (c1, o1), args
    rng = random.Random(case.name)
    for _ in range(3):
        off = rng.randrange(case.size)
        with open("flat.raw", "r+b") as f:
            f.seek(off)
            old = f.read(1)
            f.seek(off)
            f.write(bytes([old[0] ^ 0x5A]) if old else b"\x5a")
        args = ["-f", "qcow2", "-F", "raw", "top.qcow2", "flat.raw"]
        c1, o1, _ = theirs("compare", *args)
        c2, o2, _ = ours(capsys, "compare", *args)
        assert c1 == 1 and (c2, o2) == (c1, o1), off


@pytest.mark.parametrize("tail", [0, 7, 65536])
def test_compare_sizes(tmp_path, monkeypatch, capsys, tail):
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-f", "raw", "a.raw", MiB)
    qemu_img("create", "-f", "raw", "b.raw", 2 * MiB)
    qemu_io("a.raw", "write -P 3 4096 100", fmt="raw")
    qemu_io("b.raw", "write -P 3 4096 100", fmt="raw")
    if tail:
        qemu_io("b.raw", f"write -P 9 {MiB + tail} 1", fmt="raw")
    for strict in ([], ["-s"]):
        args = [*strict, "-f", "raw", "-F", "raw", "a.raw", "b.raw"]
        c1, o1, _ = theirs("compare", *args)
        c2, o2, _ = ours(capsys, "compare", *args)
        assert (c2, o2) == (c1, o1), args


# --- exit codes of failures -----------------------------------------------------------------

def test_error_exit_codes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-f", "raw", "r.raw", MiB)
    for args in (["info", "missing.qcow2"], ["map", "missing.qcow2"],
                 ["check", "missing.qcow2"], ["check", "-f", "raw", "r.raw"],
                 ["compare", "r.raw", "missing.raw"],
                 ["create", "-f", "qcow2", "-b", "r.raw", "x.qcow2"],
                 ["create", "-f", "qcow2", "-o", "preallocation=bogus", "y.qcow2", "1M"],
                 ["create", "-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "z.qcow2",
                  "1M"],
                 ["measure", "-O", "qcow2"],
                 ["rebase", "-u", "-b", "r.raw", "missing.qcow2"]):
        c1, _, e1 = theirs(*args)
        c2, _, e2 = ours(capsys, *args)
        assert c1 == c2 and c1 != 0, (args, c1, e1, c2, e2)
        assert e2.count("\n") == 1 and "Traceback" not in e2


def _leak_one_cluster(path: str) -> None:
    """Give a new cluster at the end of a default (64 KiB, 16-bit) image refcount 1 with no
    reference: one leak."""
    size = os.path.getsize(path)
    index = -(-size // 65536)
    with open(path, "r+b") as f:
        f.truncate((index + 1) * 65536)
        f.seek(0x20000 + 2 * index)
        f.write(b"\x00\x01")


@pytest.mark.parametrize("repair", [None, "leaks", "all"])
def test_check_leak_and_repair(tmp_path, monkeypatch, capsys, repair):
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-f", "qcow2", "a.qcow2", "4M")
    qemu_io("a.qcow2", "write -P 1 0 128k")
    _leak_one_cluster("a.qcow2")
    shutil.copy("a.qcow2", "b.qcow2")
    extra = ["-r", repair] if repair else []
    c1, o1, _ = theirs("check", "--output=json", *extra, "a.qcow2")
    c2, o2, _ = ours(capsys, "check", "--output=json", *extra, "b.qcow2")
    q, c = json.loads(o1), json.loads(o2)
    q["filename"] = c["filename"]
    assert (c2, c) == (c1, q)
    assert c1 == (3 if repair is None else 0)


# --- verbs that write: the same result, judged by qemu-img ----------------------------------

@pytest.mark.parametrize("opts", ["cluster_size=512,compat=0.10", "refcount_bits=1",
                                  "cluster_size=2M,lazy_refcounts=on",
                                  "extended_l2=on,cluster_size=16k",
                                  "compression_type=zstd", "refcount_bits=64,cluster_size=4k"])
@pytest.mark.parametrize("backing", [None, "raw", "qcow2"])
def test_create_is_byte_identical(tmp_path, monkeypatch, capsys, opts, backing):
    monkeypatch.chdir(tmp_path)
    extra = []
    if backing:
        qemu_img("create", "-f", backing, f"base.{backing}", "3M")
        extra = ["-b", f"base.{backing}", "-F", backing]
    size = [] if backing else ["5M"]
    c1, o1, _ = theirs("create", "-f", "qcow2", "-o", opts, *extra, "q.qcow2", *size)
    c2, o2, _ = ours(capsys, "create", "-f", "qcow2", "-o", opts, *extra, "c.qcow2", *size)
    assert c1 == c2 == 0
    assert o2.replace("c.qcow2", "q.qcow2") == o1
    with open("q.qcow2", "rb") as a, open("c.qcow2", "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("opts,size", [
    ("cluster_size=64k", "5M"), ("cluster_size=64k", "1000000"), ("cluster_size=64k", "0"),
    ("cluster_size=512", "3M"),                 # refcount blocks and tables grow on the way
    ("cluster_size=512,refcount_bits=1", "2M"), ("cluster_size=1k,compat=0.10", "3M"),
    ("cluster_size=4k,refcount_bits=64", "9M"), ("extended_l2=on", "8M"),
    ("cluster_size=2M,compression_type=zstd,lazy_refcounts=on", "9M")])
def test_create_preallocated_is_byte_identical(tmp_path, monkeypatch, capsys, mode, opts,
                                               size):
    """preallocation=metadata|falloc|full: the file qemu-img writes, byte for byte (L2
    tables, refcounts and data clusters where QEMU puts them), and the same info, check
    and map JSON (map: qemu-img guesses zeros from the file's holes, see
    without_recursed_zeros)."""
    monkeypatch.chdir(tmp_path)
    o = f"preallocation={mode},{opts}"
    c1, o1, _ = theirs("create", "-f", "qcow2", "-o", o, "q.qcow2", size)
    c2, o2, e2 = ours(capsys, "create", "-f", "qcow2", "-o", o, "c.qcow2", size)
    assert c1 == c2 == 0, e2
    assert o2.replace("c.qcow2", "q.qcow2") == o1
    with open("q.qcow2", "rb") as a, open("c.qcow2", "rb") as b:
        assert a.read() == b.read()
    for verb in ("info", "check"):
        q, c = (json.loads(theirs(verb, "--output=json", n)[1]) for n in ("q.qcow2", "c.qcow2"))
        for d in (q, c):
            d.pop("filename"), d.pop("actual-size", None)
        assert c == q, verb
    q, c = both_json(capsys, "map", "-f", "qcow2", "c.qcow2")
    assert c == without_recursed_zeros(q)


@pytest.mark.parametrize("mode", ["falloc", "full"])
def test_create_raw_preallocated(tmp_path, monkeypatch, capsys, mode):
    monkeypatch.chdir(tmp_path)
    c1, o1, _ = theirs("create", "-f", "raw", "-o", f"preallocation={mode}", "q.raw", "3M")
    c2, o2, _ = ours(capsys, "create", "-f", "raw", "-o", f"preallocation={mode}", "c.raw",
                     "3M")
    assert c1 == c2 == 0 and o2.replace("c.raw", "q.raw") == o1
    assert os.path.getsize("c.raw") == 3 << 20
    assert os.stat("c.raw").st_blocks * 512 >= 3 << 20      # every block allocated
    assert theirs("compare", "q.raw", "c.raw")[0] == 0


@pytest.mark.parametrize("fmt,opts,extra", [
    ("raw", "preallocation=metadata", []),
    ("qcow2", "preallocation=metadata", ["-b", "base.raw", "-F", "raw"]),
    ("qcow2", "preallocation=falloc", ["-b", "base.raw", "-F", "raw"])])
def test_create_preallocation_refusals_match(tmp_path, monkeypatch, capsys, fmt, opts, extra):
    """What qemu-img refuses (raw metadata preallocation; a backing file with
    preallocation but without extended L2) cowchain refuses, with the same exit code and
    message."""
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "raw", "base.raw", "1M")
    c1, _, e1 = theirs("create", "-f", fmt, "-o", opts, *extra, "q.img", "1M")
    c2, _, e2 = ours(capsys, "create", "-f", fmt, "-o", opts, *extra, "c.img", "1M")
    assert c1 == c2 == 1
    assert e1.strip().split(": ", 2)[-1] in e2
    assert not os.path.exists("c.img")


def test_create_preallocated_over_a_backing_file_with_extended_l2(tmp_path, monkeypatch,
                                                                  capsys):
    """With extended L2 entries a preallocated overlay still reads its backing file (the
    subcluster bitmaps stay 0), as qemu-img makes it."""
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "raw", "base.raw", "2M")
    qemu_io("base.raw", "write -P 7 0 1M", fmt="raw")
    args = ["-f", "qcow2", "-o", "preallocation=metadata,extended_l2=on", "-b", "base.raw",
            "-F", "raw"]
    assert theirs("create", *args, "q.qcow2")[0] == 0
    code, _, err = ours(capsys, "create", *args, "c.qcow2")
    assert code == 0, err
    with open("q.qcow2", "rb") as a, open("c.qcow2", "rb") as b:
        assert a.read() == b.read()
    assert theirs("compare", "-F", "raw", "c.qcow2", "base.raw")[0] == 0


def test_create_unsafe_records_a_missing_backing_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["-f", "qcow2", "-u", "-b", "nothere.raw", "-F", "raw"]
    theirs("create", *args, "q.qcow2", "1M")
    c, _, err = ours(capsys, "create", *args, "c.qcow2", "1M")
    assert c == 0, err
    q1, c1 = (json.loads(theirs("info", "--output=json", n)[1]) for n in ("q.qcow2", "c.qcow2"))
    for d in (q1, c1):
        d.pop("filename")
        d.pop("actual-size")
    assert c1 == q1


@pytest.mark.parametrize("target", ["raw", "qcow2"])
def test_convert_reads_back_identical(case, capsys, target):
    code, _, err = ours(capsys, "convert", "-f", "qcow2", "-O", target, "top.qcow2",
                        f"out.{target}")
    assert code == 0, err
    assert theirs("compare", "-f", "qcow2", "-F", target, "top.qcow2", f"out.{target}")[0] == 0
    if target == "qcow2":
        assert theirs("check", "-f", "qcow2", "out.qcow2")[0] == 0


def test_convert_with_backing_writes_only_differences(case, capsys):
    if not case.backing:
        return
    code, _, err = ours(capsys, "convert", "-f", "qcow2", "-O", "qcow2", "-B",
                        f"base.{case.backing}", "-F", case.backing, "top.qcow2", "out.qcow2")
    assert code == 0, err
    assert theirs("compare", "-f", "qcow2", "-F", "qcow2", "top.qcow2", "out.qcow2")[0] == 0
    assert json.loads(theirs("info", "--output=json", "out.qcow2")[1])["backing-filename"] \
        == f"base.{case.backing}"


def _allocated_clusters(name: str) -> set[int]:
    """The guest clusters (64 KiB) an image's own layer holds (qemu-img map, depth 0)."""
    out = set()
    for e in json.loads(theirs("map", "--output=json", name)[1]):
        if e["depth"] == 0 and e["present"]:
            out.update(range(e["start"] >> 16, (e["start"] + e["length"] + 65535) >> 16))
    return out


def test_convert_with_backing_writes_no_more_than_qemu_img(tmp_path, monkeypatch, capsys):
    """-B: qemu-img writes what the source's top layer holds; cowchain writes only the
    blocks that read differently through the new backing file.  With the source's own base
    as the backing file, cowchain's output reads the same and holds a subset of the
    clusters qemu-img's holds (not those the overlay rewrote with the base's bytes)."""
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "4M")
    qemu_io("base.qcow2", "write -P 1 0 2M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    qemu_io("top.qcow2", "write -P 1 0 256k", "write -P 2 1M 128k", "write -z 3M 64k")
    args = ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2"]
    assert theirs("convert", *args, "q.qcow2")[0] == 0
    code, _, err = ours(capsys, "convert", *args, "c.qcow2")
    assert code == 0, err
    for name in ("q.qcow2", "c.qcow2"):
        assert theirs("compare", "top.qcow2", name)[0] == 0
        assert theirs("check", name)[0] == 0
    q, c = _allocated_clusters("q.qcow2"), _allocated_clusters("c.qcow2")
    assert c < q and {16, 17} <= c and 0 not in c


def test_convert_into_an_existing_target(tmp_path, monkeypatch, capsys):
    """-n: both tools overwrite an existing image of another layout (junk where the source
    holds zeros or nothing) so that it reads as the source."""
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "src.qcow2", "4M")
    qemu_io("src.qcow2", "write -P 5 64k 1M", "write -z 2M 64k")
    for name, fmt in (("q.qcow2", "qcow2"), ("c.qcow2", "qcow2"), ("q.raw", "raw"),
                      ("c.raw", "raw")):
        qemu_img("create", "-q", "-f", fmt, "-o" if fmt == "qcow2" else "-q",
                 *(["cluster_size=4k"] if fmt == "qcow2" else []), name, "4M")
        qemu_io(name, "write -P 9 0 4M", fmt=fmt)
    for fmt in ("qcow2", "raw"):
        assert theirs("convert", "-n", "-O", fmt, "src.qcow2", f"q.{fmt}")[0] == 0
        code, _, err = ours(capsys, "convert", "-n", "-O", fmt, "src.qcow2", f"c.{fmt}")
        assert code == 0, err
        for name in (f"q.{fmt}", f"c.{fmt}"):
            assert theirs("compare", "-F", fmt, "src.qcow2", name)[0] == 0
        assert theirs("compare", f"q.{fmt}", f"c.{fmt}")[0] == 0
    assert theirs("check", "c.qcow2")[0] == 0


@pytest.mark.parametrize("args,message", [
    (["-c", "-O", "raw", "src.qcow2", "t.raw"], "Compression not supported for this file "
                                                "format"),
    (["-n", "-O", "qcow2", "src.qcow2", "missing.qcow2"], "Could not open 'missing.qcow2'"),
    (["-n", "-O", "qcow2", "src.qcow2", "small.qcow2"], "output file is smaller than input "
                                                        "file")])
def test_convert_refusals_match(tmp_path, monkeypatch, capsys, args, message):
    """What qemu-img convert refuses, cowchain refuses: exit 1, the same message, and no
    target left behind or changed."""
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "src.qcow2", "4M")
    qemu_io("src.qcow2", "write -P 3 0 1M")
    qemu_img("create", "-q", "-f", "qcow2", "small.qcow2", "1M")
    before = open("small.qcow2", "rb").read()
    c1, _, e1 = theirs("convert", *args)
    c2, _, e2 = ours(capsys, "convert", *args)
    assert c1 == c2 == 1 and message in e1 and message in e2, (e1, e2)
    assert not os.path.exists("t.raw") and not os.path.exists("missing.qcow2")
    assert open("small.qcow2", "rb").read() == before


def refuses_writes(case: Case, code: int, err: str) -> bool:
    """The engine does not write extended-L2 images yet, nor images with persistent bitmaps
    (it would drop them): a verb that must write into one exits 1 with that one-line reason
    (README lists both), and the file is left usable."""
    if case.bitmaps:
        assert code == 1 and "bitmaps" in err and err.count("\n") == 1, err
        return True
    if not case.extended_l2 or code == 0:      # the verb needed no data write
        return False
    assert code == 1 and "extended L2" in err and err.count("\n") == 1, err
    assert theirs("check", "top.qcow2" if os.path.exists("top.qcow2") else "c/top.qcow2")[0] == 0
    return True


def _pair(name: str) -> tuple[str, str]:
    """Two copies of the case's files: q/ for qemu-img, c/ for cowchain."""
    for d in ("q", "c"):
        os.mkdir(d)
        for f in os.listdir("."):
            if os.path.isfile(f):
                shutil.copy(f, d)
    return f"q/{name}", f"c/{name}"


def test_resize(case, capsys):
    if case.compat == "0.10" and case.snapshot:
        return
    q, c = _pair("top.qcow2")
    theirs("resize", "-f", "qcow2", q, "+1M")
    code, _, err = ours(capsys, "resize", "-f", "qcow2", c, "+1M")
    if refuses_writes(case, code, err):
        return
    assert code == 0, err
    qi, ci = (json.loads(theirs("info", "--output=json", p)[1]) for p in (q, c))
    for d in (qi, ci):
        d.pop("filename"), d.pop("actual-size"), d.pop("full-backing-filename", None)
    assert ci == qi
    assert theirs("compare", "-f", "qcow2", "-F", "qcow2", q, c)[0] == 0
    assert theirs("check", c)[0] == 0


def test_rebase_safe_keeps_the_disk(case, capsys):
    if not case.backing:
        return
    shutil.copy("top.qcow2", "orig.qcow2")
    theirs("create", "-f", "raw", "empty.raw", case.size)
    code, _, err = ours(capsys, "rebase", "-f", "qcow2", "-b", "empty.raw", "-F", "raw",
                        "top.qcow2")
    if refuses_writes(case, code, err):
        return
    assert code == 0, err
    assert theirs("compare", "-f", "qcow2", "-F", "qcow2", "orig.qcow2", "top.qcow2")[0] == 0
    assert json.loads(theirs("info", "--output=json", "top.qcow2")[1])["backing-filename"] \
        == "empty.raw"
    assert theirs("check", "top.qcow2")[0] == 0
    code, _, err = ours(capsys, "rebase", "-f", "qcow2", "-b", "", "top.qcow2")
    assert code == 0, err
    assert theirs("compare", "-f", "qcow2", "-F", "qcow2", "orig.qcow2", "top.qcow2")[0] == 0
    assert "backing-filename" not in json.loads(theirs("info", "--output=json",
                                                       "top.qcow2")[1])
    assert theirs("check", "top.qcow2")[0] == 0


def test_rebase_unsafe_is_header_only(case, capsys):
    if not case.backing:
        return
    q, c = _pair("top.qcow2")
    theirs("create", "-f", "raw", "q/other.raw", "1M")
    theirs("create", "-f", "raw", "c/other.raw", "1M")
    theirs("rebase", "-u", "-b", "other.raw", "-F", "raw", q)
    code, _, err = ours(capsys, "rebase", "-u", "-b", "other.raw", "-F", "raw", c)
    if refuses_writes(case, code, err):
        return
    assert code == 0, err
    with open(q, "rb") as a, open(c, "rb") as b:
        assert a.read() == b.read()


def test_commit(case, capsys):
    if not case.backing:
        return
    q, c = _pair("top.qcow2")
    theirs("commit", "-f", "qcow2", q)
    code, _, err = ours(capsys, "commit", "-f", "qcow2", c)
    if refuses_writes(case, code, err):
        return
    assert code == 0, err
    base = f"base.{case.backing}"
    assert theirs("compare", "-f", case.backing, "-F", case.backing, f"q/{base}",
                  f"c/{base}")[0] == 0
    assert theirs("compare", "-f", "qcow2", "-F", "qcow2", q, c)[0] == 0
    assert theirs("check", c)[0] == 0


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("shared", ["snapshots", "compressed"])
def test_amend_narrower_refcounts_with_shared_clusters(tmp_path, monkeypatch, capsys, bits,
                                                       shared):
    """refcount_bits narrower than the refcounts that internal snapshots or compressed
    clusters need: refused with qemu-img's message (the first cluster that does not fit),
    the file unchanged; where every refcount fits, done as qemu-img does it (same info,
    check clean, same data, the snapshots kept)."""
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "src.qcow2", "4M")
    qemu_io("src.qcow2", "write -P 1 0 1M", "write -P 2 2M 64k")
    if shared == "snapshots":
        qemu_img("snapshot", "-c", "a", "src.qcow2")
        qemu_img("snapshot", "-c", "b", "src.qcow2")      # refcounts of 3
    else:
        qemu_img("convert", "-c", "-O", "qcow2", "src.qcow2", "z.qcow2")
        os.replace("z.qcow2", "src.qcow2")                  # many streams per cluster
    for n in ("q.qcow2", "c.qcow2"):
        shutil.copy("src.qcow2", n)
    before = open("c.qcow2", "rb").read()
    c1, _, e1 = theirs("amend", "-o", f"refcount_bits={bits}", "q.qcow2")
    c2, _, e2 = ours(capsys, "amend", "-o", f"refcount_bits={bits}", "c.qcow2")
    assert c1 == c2, (e1, e2)
    if c1:
        assert "Cannot decrease refcount entry width" in e1
        assert e1.strip().split("': ", 1)[-1].removeprefix("qemu-img: ") in e2, (e1, e2)
        assert open("c.qcow2", "rb").read() == before
        return
    qi, ci = (json.loads(theirs("info", "--output=json", n)[1]) for n in ("q.qcow2", "c.qcow2"))
    for d in (qi, ci):
        d.pop("filename"), d.pop("actual-size")
    assert ci == qi and ci["format-specific"]["data"]["refcount-bits"] == bits
    assert theirs("check", "c.qcow2")[0] == 0
    assert theirs("compare", "q.qcow2", "c.qcow2")[0] == 0
    assert theirs("snapshot", "-l", "c.qcow2")[1].count("\n") == \
        theirs("snapshot", "-l", "q.qcow2")[1].count("\n")


@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "lazy_refcounts=on",
                                  "lazy_refcounts=off", "refcount_bits=64", "refcount_bits=1",
                                  "refcount_bits=4,lazy_refcounts=on"])
def test_amend(tmp_path, monkeypatch, capsys, opts):
    monkeypatch.chdir(tmp_path)
    compat = "0.10" if opts == "compat=1.1" else "1.1"
    for n in ("q.qcow2", "c.qcow2"):
        theirs("create", "-f", "qcow2", "-o", f"compat={compat}", n, "4M")
        qemu_io(n, "write -P 7 64k 64k")
    theirs("amend", "-o", opts, "q.qcow2")
    code, _, err = ours(capsys, "amend", "-o", opts, "c.qcow2")
    assert code == 0, err
    qi, ci = (json.loads(theirs("info", "--output=json", n)[1]) for n in ("q.qcow2", "c.qcow2"))
    for d in (qi, ci):
        d.pop("filename"), d.pop("actual-size")
    assert ci == qi
    assert theirs("check", "c.qcow2")[0] == 0


def test_bench_runs_the_qemu_img_pattern(case, capsys):
    c, out, err = ours(capsys, "bench", "--output=json", "-c", "200", "-s", "4k", "-f",
                       "qcow2", "top.qcow2")
    assert c == 0, err
    res = json.loads(out)
    assert (res["requests"], res["reads"], res["bytes"]) == (200, 200, 200 * 4096)
    assert theirs("bench", "-c", "200", "-s", "4k", "-f", "qcow2", "top.qcow2")[0] == 0


@pytest.mark.parametrize("step,offset", [("4M", "0"), ("4100k", "0"), ("12k", "8k")])
def test_bench_writes_where_qemu_img_bench_writes(tmp_path, monkeypatch, capsys, step, offset):
    """The same -c/-S/-o give the same offsets as qemu-img bench (each STEP further,
    modulo the disk size): written with a pattern, the two images compare identical."""
    monkeypatch.chdir(tmp_path)
    for name in ("q.qcow2", "c.qcow2"):
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", name, "16M")
    args = ["-w", "--pattern", "17", "-c", "40", "-s", "4k", "-S", step, "-o", offset,
            "-f", "qcow2"]
    assert theirs("bench", "-d", "1", *args, "q.qcow2")[0] == 0
    code, _, err = ours(capsys, "bench", *args, "c.qcow2")
    assert code == 0, err
    assert theirs("compare", "q.qcow2", "c.qcow2")[0] == 0


def test_bench_refuses_a_request_past_the_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "c.qcow2", "1M")
    code, _, err = ours(capsys, "bench", "-c", "3", "-s", "4k", "-o", "1022k", "c.qcow2")
    assert code == 1 and "passes the end of the disk" in err


def test_a_bitmap_breaking_the_constraints_fails_info_like_qemu_img(tmp_path, monkeypatch,
                                                                     capsys):
    """info reads the bitmap directory with the check's reader (QEMU's load-time checks):
    a bitmap whose granularity is out of range makes both tools fail (exit 1)."""
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "b.qcow2", "4M")
    qemu_img("bitmap", "--add", "b.qcow2", "b1")
    with open("b.qcow2", "r+b") as f:
        head = f.read(65536)
        pos = int.from_bytes(head[100:104], "big")
        while int.from_bytes(head[pos:pos + 4], "big") != 0x23852875:
            pos += 8 + ((int.from_bytes(head[pos + 4:pos + 8], "big") + 7) & ~7)
        doff = int.from_bytes(head[pos + 24:pos + 32], "big")
        f.seek(doff + 17)
        f.write(bytes([40]))                    # granularity bits, QEMU allows 9..31
    c1, _, e1 = theirs("info", "--output=json", "b.qcow2")
    c2, _, e2 = ours(capsys, "info", "--output=json", "b.qcow2")
    assert c1 == c2 == 1 and "constraints" in e1 and "constraints" in e2, (e1, e2)


# --- internal snapshots both ways -----------------------------------------------------------

def _flat(name: str, out: str) -> None:
    qemu_img("convert", "-f", "qcow2", "-O", "raw", name, out)


def test_snapshot_made_by_cowchain_is_applied_by_qemu(case, capsys):
    _flat("top.qcow2", "before.raw")
    code, _, err = ours(capsys, "snapshot", "-c", "mine", "top.qcow2")
    if refuses_writes(case, code, err):
        return
    if case.refcount_bits == 1:
        assert code == 1 and theirs("snapshot", "-c", "x", "top.qcow2")[0] == 1, err
        return
    assert code == 0, err
    assert theirs("check", "top.qcow2")[0] == 0
    assert "mine" in theirs("snapshot", "-l", "top.qcow2")[1]
    q, c = (json.loads(o)["snapshots"] for o in (theirs("info", "--output=json", "top.qcow2")[1],
                                                ours(capsys, "info", "--output=json",
                                                     "top.qcow2")[1]))
    assert c == q
    mine = q[-1]
    assert (mine["name"], mine["vm-state-size"], mine["icount"], mine["vm-clock-sec"]) == \
        ("mine", 0, 0, 0)
    assert mine["id"] == str(max(int(s["id"]) for s in q))
    qemu_io("top.qcow2", f"write -P 77 0 {case.cluster_size}", "write -z "
            f"{case.size // 2} {case.cluster_size}" if case.compat == "1.1" else
            f"write -P 78 {case.size // 2} 512")
    assert theirs("check", "top.qcow2")[0] == 0
    assert theirs("snapshot", "-a", "mine", "top.qcow2")[0] == 0
    assert theirs("compare", "-f", "qcow2", "-F", "raw", "top.qcow2", "before.raw")[0] == 0
    assert theirs("check", "top.qcow2")[0] == 0


def test_snapshot_made_by_qemu_is_applied_and_deleted_by_cowchain(case, capsys):
    if case.refcount_bits == 1:
        return
    _flat("top.qcow2", "before.raw")
    qemu_img("snapshot", "-c", "theirs", "top.qcow2")
    qemu_io("top.qcow2", f"write -P 91 0 {case.cluster_size}", f"write -P 92 {case.size - 512} 512")
    code, _, err = ours(capsys, "snapshot", "-a", "theirs", "top.qcow2")
    if refuses_writes(case, code, err):
        return
    assert code == 0, err
    assert theirs("check", "top.qcow2")[0] == 0
    assert theirs("compare", "-f", "qcow2", "-F", "raw", "top.qcow2", "before.raw")[0] == 0
    code, _, err = ours(capsys, "snapshot", "-d", "theirs", "top.qcow2")
    assert code == 0, err
    assert theirs("check", "top.qcow2")[0] == 0
    assert "theirs" not in theirs("snapshot", "-l", "top.qcow2")[1]
    assert theirs("compare", "-f", "qcow2", "-F", "raw", "top.qcow2", "before.raw")[0] == 0


def test_snapshot_refusals_match(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-f", "qcow2", "a.qcow2", "1M")
    qemu_img("create", "-f", "raw", "b.raw", "1M")
    for args in (["-d", "nothere", "a.qcow2"], ["-a", "nothere", "a.qcow2"],
                 ["-c", "x", "-f", "raw", "b.raw"]):
        c1, _, e1 = theirs("snapshot", *args)
        c2, _, e2 = ours(capsys, "snapshot", *args)
        assert c1 == c2 == 1, (args, e1, e2)
        assert e2.count("\n") == 1


# --- compressed output ----------------------------------------------------------------------

def test_convert_compressed_reads_back_identical(case, capsys):
    code, _, err = ours(capsys, "convert", "-c", "-f", "qcow2", "-O", "qcow2", "-o",
                        case.options(), "top.qcow2", "packed.qcow2")
    assert code == 0, err
    assert theirs("compare", "-f", "qcow2", "-F", "qcow2", "top.qcow2", "packed.qcow2")[0] == 0
    code, out, _ = theirs("check", "--output=json", "packed.qcow2")
    assert code == 0, out
    info = json.loads(theirs("info", "--output=json", "packed.qcow2")[1])
    assert info["dirty-flag"] is False
    assert info["format-specific"]["data"]["compression-type"] == (case.compressed or "zlib")
    entries = json.loads(theirs("map", "--output=json", "packed.qcow2")[1])
    assert any(e["data"] and "offset" not in e for e in entries), "no compressed cluster"
    q, c = both_json(capsys, "map", "-f", "qcow2", "packed.qcow2")
    assert c == without_recursed_zeros(q)


def _text_disk(path: str, size: int, seed: int) -> None:
    """SIZE bytes of word-like text followed by as many zeros (compresses like real data)."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(2000)]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choice(words) for _ in range(200)) + b"\n"
    with open(path, "wb") as f:
        f.write(bytes(out[:size]) + bytes(size))


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster", ["4k", "64k", "1M"])
def test_convert_compressed_size_is_within_5_percent_of_qemu(tmp_path, monkeypatch, capsys,
                                                             ctype, cluster):
    monkeypatch.chdir(tmp_path)
    _text_disk("src.raw", 6 * MiB, seed=len(ctype) + len(cluster))
    opts = f"compression_type={ctype},cluster_size={cluster}"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, "src.raw", "q.qcow2")
    code, _, err = ours(capsys, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts,
                        "src.raw", "c.qcow2")
    assert code == 0, err
    assert theirs("compare", "-f", "raw", "-F", "qcow2", "src.raw", "c.qcow2")[0] == 0
    assert theirs("check", "c.qcow2")[0] == 0
    ours_size, qemu_size = os.path.getsize("c.qcow2"), os.path.getsize("q.qcow2")
    assert abs(ours_size - qemu_size) <= 0.05 * qemu_size, (ours_size, qemu_size)


def test_info_human_text(case, capsys):
    c1, o1, _ = theirs("info", "-f", "qcow2", "--backing-chain", "top.qcow2")
    c2, o2, _ = ours(capsys, "info", "-f", "qcow2", "--backing-chain", "top.qcow2")
    assert (c2, o2) == (c1, o1)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("cluster", [512, 65536, 2 * MiB])
def test_resize_shrink_an_empty_tail(tmp_path, monkeypatch, capsys, fmt, cluster):
    monkeypatch.chdir(tmp_path)
    for n in ("q", "c"):
        opts = ["-o", f"cluster_size={cluster}"] if fmt == "qcow2" else []
        qemu_img("create", "-f", fmt, *opts, n, "8M")
        cmds = ["write -P 1 0 1M"]
        if fmt == "qcow2":
            cmds += [f"write -z 4M {cluster}", f"write -P 2 6M {cluster}",
                     f"discard 6M {cluster}"]
        qemu_io(n, *cmds, fmt=fmt)
    assert theirs("resize", "-f", fmt, "--shrink", "q", "3M")[0] == 0
    code, _, err = ours(capsys, "resize", "-f", fmt, "--shrink", "c", "3M")
    assert code == 0, err
    assert theirs("compare", "-f", fmt, "-F", fmt, "-s", "q", "c")[0] == 0
    if fmt == "qcow2":
        assert theirs("check", "c")[0] == 0
    # data past the new end, or no --shrink: both refuse (cowchain keeps the data)
    qemu_io("c", "write -P 3 2M 512", fmt=fmt)
    code, _, err = ours(capsys, "resize", "-f", fmt, "--shrink", "c", "1M")
    assert code == 1 and "holds data" in err
    assert ours(capsys, "resize", "-f", fmt, "c", "1M")[0] == theirs("resize", "-f", fmt,
                                                                        "c", "1M")[0] == 1


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_commit_into_a_deeper_base(tmp_path, monkeypatch, capsys, base_fmt):
    monkeypatch.chdir(tmp_path)
    base = f"l0.{base_fmt}"
    qemu_img("create", "-f", base_fmt, base, "4M")
    qemu_io(base, "write -P 1 0 1M", fmt=base_fmt)
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", base_fmt, "l1.qcow2", "6M")
    qemu_io("l1.qcow2", "write -P 2 512k 1M", "write -z 3M 64k", "write -P 4 5M 64k")
    qemu_img("create", "-f", "qcow2", "-b", "l1.qcow2", "-F", "qcow2", "l2.qcow2")
    qemu_io("l2.qcow2", "write -P 3 1M 64k", "write -z 0 4k")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", "l2.qcow2", "flat.raw")
    code, out, err = ours(capsys, "commit", "-f", "qcow2", "-b", base, "l2.qcow2")
    assert code == 0 and out == "Image committed.\n", err
    assert theirs("compare", "-f", base_fmt, "-F", "raw", base, "flat.raw")[0] == 0
    assert theirs("compare", "-f", "qcow2", "-F", "raw", "l2.qcow2", "flat.raw")[0] == 0
    if base_fmt == "qcow2":
        assert theirs("check", base)[0] == 0
    args = ["commit", "-f", "qcow2", "-b", "flat.raw", "l2.qcow2"]
    assert ours(capsys, *args)[0] == theirs(*args)[0] == 1


def test_raw_image_verbs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-f", "raw", "r.raw", "5M")
    qemu_io("r.raw", "write -P 1 0 100k", "write -P 2 3M 4k", fmt="raw")
    for args in (["info", "-f", "raw", "r.raw"], ["map", "-f", "raw", "r.raw"],
                 ["measure", "-f", "raw", "-O", "qcow2", "r.raw"],
                 ["measure", "-f", "raw", "-O", "raw", "r.raw"]):
        q, c = both_json(capsys, *args)
        assert c == q, args
    c1, o1, _ = theirs("map", "-f", "raw", "r.raw")
    c2, o2, _ = ours(capsys, "map", "-f", "raw", "r.raw")
    assert (c2, o2) == (c1, o1)


def test_locks_and_force_share_like_qemu_img(tmp_path, monkeypatch, capsys):
    import time

    from qemu import QEMU_IO
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-f", "qcow2", "a.qcow2", "1M")
    holder = subprocess.Popen([QEMU_IO, "-f", "qcow2", "a.qcow2"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):        # until qemu-io holds its write lock
            if theirs("info", "a.qcow2")[0] != 0:
                break
            time.sleep(0.05)
        for args in (["info", "a.qcow2"], ["info", "-U", "a.qcow2"], ["map", "a.qcow2"],
                     ["map", "-U", "a.qcow2"], ["check", "a.qcow2"], ["check", "-U", "a.qcow2"],
                     ["snapshot", "-c", "s", "a.qcow2"], ["resize", "a.qcow2", "2M"]):
            c1, _, e1 = theirs(*args)
            c2, _, e2 = ours(capsys, *args)
            assert c1 == c2, (args, e1, e2)
            if c2:
                assert "lock" in e2 and e2.count("\n") == 1, e2
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_absolute_backing_names_need_allow_unsafe_backing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-f", "raw", "base.raw", "2M")
    qemu_io("base.raw", "write -P 6 4k 4k", fmt="raw")
    qemu_img("create", "-f", "qcow2", "-b", str(tmp_path / "base.raw"), "-F", "raw", "t.qcow2")
    code, _, err = ours(capsys, "info", "--backing-chain", "t.qcow2")
    assert code == 1 and "--allow-unsafe-backing" in err and err.count("\n") == 1, err
    for verb in (["info", "--backing-chain"], ["map"]):
        q = json.loads(theirs(*verb, "--output=json", "t.qcow2")[1])
        c = json.loads(ours(capsys, *verb, "--output=json", "--allow-unsafe-backing",
                            "t.qcow2")[1])
        assert c == q, verb


def test_where_qemu_img_guesses_preallocation(tmp_path, monkeypatch, capsys):
    """The fields that must differ.  Copied with every zero block made a hole, a qcow2 file
    has more refcounted clusters than allocated blocks, and qemu-img then guesses that it
    was preallocated: it asks the host file for holes inside data clusters.  map reports
    them ``zero: true, data: true`` (cowchain: data, ``zero: false``) and measure's
    ``required`` leaves them out (cowchain counts the whole cluster, never less).  README
    ("Fields that differ from qemu-img") says why cowchain does not guess."""
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=2M", "a.qcow2", "16M")
    qemu_io("a.qcow2", "write -P 1 0 4k", "write -P 2 4M 4k", "write -P 3 9M 1M")
    subprocess.run(["cp", "--sparse=always", "a.qcow2", "holey.qcow2"], check=True)
    q, c = both_json(capsys, "map", "-f", "qcow2", "holey.qcow2")
    assert q != without_recursed_zeros(q), "qemu-img did not guess preallocation"
    assert c == without_recursed_zeros(q)
    q, c = both_json(capsys, "measure", "-f", "qcow2", "-O", "qcow2", "holey.qcow2")
    assert c["fully-allocated"] == q["fully-allocated"]
    assert c["required"] > q["required"]
    assert c == both_json(capsys, "measure", "-f", "qcow2", "-O", "qcow2", "a.qcow2")[0]
