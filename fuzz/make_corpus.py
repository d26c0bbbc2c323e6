"""Build the seed corpus of the fuzz targets with qemu-img/qemu-io: ``python
fuzz/make_corpus.py OUTDIR``.

OUTDIR/images/  QCOW2 files for the header, read, check and write targets: v2 and v3,
                cluster sizes 512 B..64 KiB, refcount widths 1..64 bits, lazy refcounts,
                dirty and corrupt bits, compressed (zlib, and zstd when qemu-img has it),
                zero and preallocated-zero clusters, extended L2, internal snapshots,
                overlays (with their backing names) and metadata preallocation. Each file is
                at most 256 KiB (small virtual sizes, mostly 512-byte clusters).
OUTDIR/ext/     inputs of the ext target: 0x00 + a header extension area, 0x01 + count +
                a snapshot table, cut from the images above.
OUTDIR/backing/ backing names for the backing target (plain, sub-folder, symlinks in and
                out, '..', absolute, json:, protocol prefixes, NUL, very long).

Every seed is made by QEMU's own tools (plus a few header bit pokes), so the corpus needs no
binary files in the repository.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile

MAX_SEED = 256 << 10


def run(*args):
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


def create(path, size="256K", backing=None, **opts):
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    if opts:
        args += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    run(*args, path, size)


def io(path, *cmds):
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    run(*args, path)


def poke_incompat(path, bit):
    with open(path, "r+b") as f:
        f.seek(72)
        v = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", v | (1 << bit)))


def build(out: str) -> int:
    img = os.path.join(out, "images")
    extd = os.path.join(out, "ext")
    bdir = os.path.join(out, "backing")
    for d in (img, extd, bdir):
        os.makedirs(d, exist_ok=True)
    work = tempfile.mkdtemp(prefix="cowchain-corpus-")
    try:
        made = []

        def seed(name, **opts):
            p = os.path.join(work, name)
            create(p, opts.pop("size", "256K"), opts.pop("backing", None), **opts)
            made.append(p)
            return p

        data_cmds = ["write -P 0x11 0 4k", "write -P 0x22 9k 3k", "write -z 32k 8k",
                     "write -P 0x33 100k 1k", "discard 9k 1k"]
        for compat in ("0.10", "1.1"):
            for cl in (512, 1024, 4096, 65536):
                p = seed(f"c{cl}-{compat}.qcow2", compat=compat, cluster_size=cl)
                io(p, *data_cmds[:3 if compat == "0.10" else 5])
        for rb in (1, 2, 4, 8, 16, 32, 64):
            p = seed(f"refbits{rb}.qcow2", cluster_size=512, refcount_bits=rb)
            io(p, "write -P 0x44 0 20k", "write -P 0x45 60k 2k")
        p = seed("lazy.qcow2", cluster_size=512, lazy_refcounts="on")
        io(p, "write -P 0x55 0 8k")
        p = seed("dirty.qcow2", cluster_size=512, lazy_refcounts="on")
        io(p, "write -P 0x56 0 8k")
        poke_incompat(p, 0)
        p = seed("corrupt.qcow2", cluster_size=512)
        io(p, "write -P 0x57 0 8k")
        poke_incompat(p, 1)
        p = seed("zero-alloc.qcow2", cluster_size=512)
        io(p, "write -P 0x58 0 16k", "write -z 4k 8k")
        seed("prealloc-meta.qcow2", cluster_size=512, preallocation="metadata", size="64K")
        p = seed("extl2.qcow2", cluster_size=16384, extended_l2="on", size="512K")
        io(p, "write -P 0x59 0 3k", "write -P 0x5a 20k 2k", "write -z 40k 4k")
        p = seed("snap.qcow2", cluster_size=512)
        io(p, "write -P 0x61 0 4k")
        run("qemu-img", "snapshot", "-c", "s1", p)
        io(p, "write -P 0x62 1k 4k")
        run("qemu-img", "snapshot", "-c", "second-snapshot", p)
        # compressed: convert a raw file with -c (zlib), and zstd if supported
        raw = os.path.join(work, "data.raw")
        with open(raw, "wb") as f:
            for i in range(64):
                f.write(bytes([i]) * 1024 + os.urandom(8) * 16 + bytes(896))
        for ct in ("zlib", "zstd"):
            p = os.path.join(work, f"compressed-{ct}.qcow2")
            try:
                run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                    f"cluster_size=4096,compression_type={ct}", raw, p)
                made.append(p)
            except subprocess.CalledProcessError:
                pass
        # chains: overlays keep their backing names (the single-file targets do not follow
        # them; the names are seeds of the backing target too)
        b = seed("chain-base.qcow2", cluster_size=512)
        io(b, "write -P 0x71 0 16k")
        o1 = seed("chain-mid.qcow2", cluster_size=512, backing="chain-base.qcow2")
        io(o1, "write -P 0x72 1k 2k")
        o2 = seed("chain-top.qcow2", cluster_size=1024, backing="chain-mid.qcow2")
        io(o2, "write -P 0x73 3k 3k")
        n = 0
        for p in made:
            with open(p, "rb") as f:
                data = f.read()
            if len(data) > MAX_SEED:
                data = data[:MAX_SEED]       # still a useful header/table seed
            with open(os.path.join(img, os.path.basename(p)), "wb") as f:
                f.write(data)
            n += 1
            # ext seeds
            hl = 72 if data[4:8] == b"\0\0\0\2" else struct.unpack_from(">I", data, 100)[0]
            cl = 1 << struct.unpack_from(">I", data, 20)[0]
            with open(os.path.join(extd, os.path.basename(p) + ".ext"), "wb") as f:
                f.write(b"\0" + data[hl:min(cl, 4096)])
            nsnap, soff = struct.unpack_from(">IQ", data, 60)
            if nsnap and soff < len(data):
                with open(os.path.join(extd, os.path.basename(p) + ".snap"), "wb") as f:
                    f.write(b"\1" + bytes([nsnap]) + data[soff:soff + 4096])
                n += 1
            n += 1
        names = [b"base.qcow2", b"sub/inner.qcow2", b"link-in", b"link-out", b"link-rel-out",
                 b"../outside.qcow2", b"sub/../base.qcow2", b"./base.qcow2", b"/etc/passwd",
                 b"json:{\"file.filename\":\"base.qcow2\"}", b"file:base.qcow2",
                 b"nbd://127.0.0.1/x", b"base.qcow2\0.evil", b"overlay.qcow2", b"",
                 b"a" * 1023, b"sub//inner.qcow2", b"\xffbase.qcow2", b"missing.qcow2"]
        for i, nm in enumerate(names):
            with open(os.path.join(bdir, f"name{i:02d}"), "wb") as f:
                f.write(nm)
            n += 1
        return n
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python fuzz/make_corpus.py OUTDIR")
    print(f"{build(sys.argv[1])} seeds in {sys.argv[1]}")
