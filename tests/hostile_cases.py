"""The hostile-image cases of docs/reliability.md ("What hostile input looks like", C5).

Each case is a generator: it makes a valid image with qemu-img/qemu-io in a fresh folder, then
damages it with byte pokes (tests/poke.py), and returns a :class:`Made` saying which file to
open and what outcome is acceptable. test_hostile.py runs every case in a subprocess under
time and memory limits.

Outcome words (what the worker reports, see test_hostile.py):

- ``ok``: open, full read, extents and check all worked, and check found nothing wrong;
- ``check:leaks`` / ``check:corrupt``: everything worked and check reported leaks / corruption;
- an exception class name, optionally with ``@stage`` (open, read, extents, check): a typed
  error. A class name matches its subclasses too (``ChainError`` matches
  ``UnsafeBackingReference``).

``expect`` lists the acceptable outcomes of the read-only pass. Every case must in any event end
without a signal, a hang, an untyped exception or a change to the file.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import poke
import qemu

KiB = 1024
MiB = 1024 * KiB

# Outcome groups.
OK = ("ok",)
# "The bytes are not an acceptable image": the engine may say so with any of these.
INVALID = ("ImageFormatError", "CorruptImage", "SafetyLimitExceeded", "UnsupportedFeature")
# A structure the engine meets lazily: refusing at open, failing the access, or check
# reporting the corruption are all fine.
DAMAGED = INVALID + ("check:corrupt",)
UNSAFE = ("UnsafeBackingReference",)


@dataclass
class Made:
    path: Path                       # the image to open
    expect: tuple                    # acceptable outcomes of the read-only pass
    fmt: str = "qcow2"
    sentinel: Path | None = None     # a file that must never be opened (policy refusal)
    lenient: str | None = None       # why it is fine that QEMU refuses what we accept
    timeout: float = 5.0


@dataclass
class Case:
    name: str
    category: str
    make: object                     # callable(folder: Path) -> Made
    doc: str = ""


CASES: list[Case] = []


def case(category: str, name: str | None = None):
    def deco(fn):
        CASES.append(Case(name or fn.__name__, category, fn, (fn.__doc__ or "").strip()))
        return fn
    return deco


def cases_named(name: str, category: str, fn, variants):
    """Register FN(folder, *args) once per (suffix, args...) in VARIANTS."""
    for suffix, *args in variants:
        def make(d, _args=tuple(args)):
            return fn(d, *_args)
        CASES.append(Case(f"{name}-{suffix}", category, make, (fn.__doc__ or "").strip()))


# --- valid starting points ---------------------------------------------------------------------

def std(d: Path, name: str = "disk.qcow2", size: int = 4 * MiB, **opts) -> Path:
    """A v3 image (64 KiB clusters unless OPTS say otherwise) with data at 0 (one cluster of
    0x11), at 1 MiB (4 KiB of 0x22) and a zero cluster at 2 MiB.

    Layout with the defaults: header 0, reftable 0x10000, refblock 0x20000, L1 0x30000,
    L2 0x40000, data 0x50000 (guest 0) and 0x60000 (guest 1 MiB)."""
    path = d / name
    qemu.create(path, size, **opts)
    cluster = int(opts.get("cluster_size", 65536))
    qemu.qemu_io(path, f"write -q -P 0x11 0 {cluster}", "write -q -P 0x22 1M 4k",
                 "write -q -z 2M 64k")
    return path


def v2(d: Path) -> Path:
    return std(d, compat="0.10")


def with_snapshot(d: Path) -> Path:
    path = std(d)
    qemu.qemu_img("snapshot", "-c", "snap1", path)
    qemu.qemu_io(path, "write -q -P 0x33 0 4k")
    return path


def compressed(d: Path, ctype: str = "zlib", cluster: int = 65536) -> Path:
    """A compressed image whose first cluster holds a 3000-byte pseudo-random pattern
    repeated, so its compressed stream spans several sectors."""
    src = std(d, name="src.qcow2", cluster_size=cluster)
    pat = d / "pattern.bin"
    pat.write_bytes(random.Random(3000).randbytes(3000))
    qemu.qemu_io(src, f"write -q -s {pat} 0 {cluster}")
    os.unlink(pat)
    path = d / "packed.qcow2"
    qemu.qemu_img("convert", "-f", "qcow2", "-O", "qcow2", "-c", "-o",
                  f"cluster_size={cluster},compression_type={ctype}", src, path)
    os.unlink(src)
    return path


def chain(d: Path, base_fmt: str = "qcow2") -> Path:
    base = d / f"base.{base_fmt}"
    qemu.create(base, 4 * MiB, fmt=base_fmt)
    qemu.qemu_io(base, "write -q -P 0x44 0 128k", fmt=base_fmt)
    top = d / "top.qcow2"
    qemu.create(top, 4 * MiB, backing=base.name, backing_fmt=base_fmt)
    qemu.qemu_io(top, "write -q -P 0x55 64k 4k")
    return top


def overlay_named(d: Path, name: str, fmt: str | None = "qcow2", file: str = "top.qcow2",
                  cluster: int = 65536) -> Path:
    """An overlay whose backing reference is NAME (not checked by qemu-img: -u)."""
    path = d / file
    args = ["create", "-q", "-f", "qcow2", "-u", "-o", f"cluster_size={cluster}", "-b", name]
    if fmt:
        args += ["-F", fmt]
    qemu.qemu_img(*args, path, 4 * MiB)
    return path


def outside(d: Path) -> Path:
    """A valid image OUTSIDE the folder of the image under test: a policy refusal must never
    open it. Returns its path; the image under test goes in d/'img'."""
    out = d / "outside"
    out.mkdir(exist_ok=True)
    secret = out / "secret.qcow2"
    qemu.create(secret, 4 * MiB)
    qemu.qemu_io(secret, "write -q -P 0x5e 0 64k")
    (d / "img").mkdir(exist_ok=True)
    return secret


# --- header and feature bits -----------------------------------------------------------------

@case("control")
def control_v3(d):
    """A valid v3 image: must open, read and check clean (proves the harness can pass)."""
    return Made(std(d), OK)


@case("control")
def control_v2(d):
    return Made(v2(d), OK)


@case("control")
def control_512(d):
    return Made(std(d, cluster_size=512), OK)


@case("control")
def control_snapshot(d):
    return Made(with_snapshot(d), OK)


@case("control")
def control_compressed_zlib(d):
    return Made(compressed(d, "zlib"), OK)


@case("control")
def control_compressed_zstd(d):
    return Made(compressed(d, "zstd", 4096), OK)


@case("control")
def control_extended_l2(d):
    return Made(std(d, extended_l2=True), OK)


@case("control")
def control_chain(d):
    return Made(chain(d), OK)


@case("control")
def control_raw_chain(d):
    return Made(chain(d, "raw"), OK)


@case("header")
def empty_file(d):
    p = d / "empty.qcow2"
    p.write_bytes(b"")
    return Made(p, ("ImageFormatError", "CorruptImage"))


def _short(d, n):
    p = std(d)
    poke.truncate(p, n)
    return Made(p, ("ImageFormatError", "CorruptImage"))


cases_named("short-file", "header", _short, [(str(n), n) for n in (3, 71, 100, 111, 4096)])


@case("header")
def bad_magic(d):
    p = std(d)
    poke.write_bytes(p, 0, b"QFI\xfa")
    return Made(p, ("ImageFormatError",))


def _version(d, v):
    p = std(d)
    poke.set(p, "version", v)
    return Made(p, ("ImageFormatError", "UnsupportedFeature"))


cases_named("version", "header", _version, [(str(v), v) for v in (0, 1, 4, 0xFFFFFFFF)])


def _cluster_bits(d, bits):
    p = std(d)
    poke.set(p, "cluster_bits", bits)
    return Made(p, INVALID)


cases_named("cluster-bits", "header", _cluster_bits,
            [(str(b), b) for b in (0, 8, 22, 31, 32, 63, 0xFFFFFFFF)])


def _header_length(d, n):
    p = std(d)
    poke.set(p, "header_length", n)
    return Made(p, INVALID)


cases_named("header-length", "header", _header_length,
            [(str(n), n) for n in (0, 72, 103, 108 + 1, 65536 + 8, 0xFFFFFFF8)])


def _incompat(d, bits, expect):
    p = std(d)
    poke.set(p, "incompatible_features", bits)
    return Made(p, expect)


cases_named("incompat", "features", _incompat, [
    ("bit5", 1 << 5, ("UnsupportedFeature",)),
    ("bit63", 1 << 63, ("UnsupportedFeature",)),
    ("all", (1 << 64) - 1, INVALID),
    ("external-data", 1 << 2, ("UnsupportedFeature",)),
    ("compression-bit-with-zlib", 1 << 3, INVALID),
    # Corrupt bit: read-only opens are allowed (as in QEMU); read-write ones are refused.
    ("corrupt", 1 << 1, OK + ("check:corrupt", "CorruptImage")),
    # Dirty bit on an image whose refcounts are right: read-only opens read it.
    ("dirty", 1 << 0, OK + ("check:corrupt", "check:leaks")),
])


@case("features")
def extended_l2_on_small_clusters(d):
    """Extended L2 needs 16 KiB clusters (512-byte subclusters)."""
    p = std(d, cluster_size=4096)
    poke.set(p, "incompatible_features", 1 << 4)
    return Made(p, INVALID)


@case("features")
def zstd_type_without_bit(d):
    p = std(d)
    poke.set(p, "compression_type", 1)
    return Made(p, INVALID)


@case("features")
def compression_type_unknown(d):
    p = std(d)
    poke.set(p, "compression_type", 7)
    poke.set(p, "incompatible_features", 1 << 3)
    return Made(p, INVALID)


@case("features")
def unknown_autoclear_bits(d):
    """Unknown autoclear bits are allowed (QEMU clears them on a read-write open)."""
    p = std(d)
    poke.set(p, "autoclear_features", 0xFFFF_FFFF_FFFF_FFFC)
    return Made(p, OK)


@case("features")
def unknown_compatible_bits(d):
    p = std(d)
    poke.set(p, "compatible_features", 0xFFFF_FFFF_FFFF_FFFE)
    return Made(p, OK)


def _crypt(d, method):
    p = std(d)
    poke.set(p, "crypt_method", method)
    return Made(p, ("UnsupportedFeature", "ImageFormatError", "CorruptImage"))


cases_named("crypt-method", "features", _crypt, [(str(m), m) for m in (1, 2, 3, 0xFFFFFFFF)])


def _refcount_order(d, order):
    p = std(d)
    poke.set(p, "refcount_order", order)
    return Made(p, INVALID)


cases_named("refcount-order", "header", _refcount_order, [(str(o), o) for o in (7, 64, 0xFFFFFFFF)])


@case("header")
def v2_ignores_refcount_order(d):
    """v2 headers have no refcount_order field; bytes at 96 are extension data there, and a
    v2 image is always 16-bit. Poke garbage where the v3 field would be: the v2 extension
    area then starts with an unknown extension of a huge length."""
    p = v2(d)
    poke.write_be(p, 96, 4, 0xFFFFFFFF)
    # QEMU parses extensions from offset 72 in v2: put an end marker there so the poke lies
    # past the end of the extension list.
    poke.write_bytes(p, 72, bytes(8))
    return Made(p, OK)


# --- table offsets and sizes ----------------------------------------------------------------------

def _field(d, field, value, expect=DAMAGED, maker=std):
    p = maker(d)
    poke.set(p, field, value)
    return Made(p, expect)


cases_named("l1", "tables", _field, [
    ("size-zero", "l1_size", 0, INVALID),
    ("size-huge", "l1_size", 0x7FFFFFFF, INVALID),
    ("size-all-ones", "l1_size", 0xFFFFFFFF, INVALID),
    ("size-over-32MiB", "l1_size", 32 * MiB // 8 + 1, INVALID),
    ("offset-unaligned", "l1_table_offset", 0x30000 + 8, INVALID),
    ("offset-zero", "l1_table_offset", 0, DAMAGED),
    ("offset-past-eof", "l1_table_offset", 1 << 40, INVALID),
    ("offset-overflow", "l1_table_offset", 0xFFFF_FFFF_FFFF_0000, INVALID),
    ("offset-top-bit", "l1_table_offset", (1 << 63) | 0x30000, INVALID),
    ("offset-on-reftable", "l1_table_offset", 0x10000, DAMAGED),
])

cases_named("reftable", "tables", _field, [
    ("clusters-zero", "refcount_table_clusters", 0, INVALID + ("check:corrupt",)),
    ("clusters-huge", "refcount_table_clusters", 0xFFFFFFFF, INVALID),
    ("clusters-over-8MiB", "refcount_table_clusters", 8 * MiB // 65536 + 1, INVALID),
    ("offset-unaligned", "refcount_table_offset", 0x10000 + 8, INVALID),
    ("offset-zero", "refcount_table_offset", 0, DAMAGED),
    ("offset-past-eof", "refcount_table_offset", 1 << 40, INVALID),
    ("offset-overflow", "refcount_table_offset", 0xFFFF_FFFF_FFFF_0000, INVALID),
])

cases_named("size", "tables", _field, [
    ("too-big-for-l1", "size", 1 << 40, INVALID),
    ("2^63-1", "size", (1 << 63) - 1, INVALID),
    ("all-ones", "size", (1 << 64) - 1, INVALID),
    ("zero", "size", 0, OK),
    # Not a multiple of 512: QEMU only refuses that at create time; the data still reads.
    ("unaligned", "size", 4 * MiB - 100, OK + INVALID),
])

cases_named("snapshot-header", "snapshots", _field, [
    ("count-huge", "nb_snapshots", 0xFFFFFFFF, INVALID),
    ("count-65537", "nb_snapshots", 65537, INVALID),
    ("count-without-table", "nb_snapshots", 3, DAMAGED),
    ("offset-unaligned", "snapshots_offset", 12345, INVALID, with_snapshot),
    ("offset-past-eof", "snapshots_offset", 1 << 40, INVALID, with_snapshot),
    ("offset-overflow", "snapshots_offset", 0xFFFF_FFFF_FFFF_0000, INVALID, with_snapshot),
    ("count-past-table", "nb_snapshots", 2000, DAMAGED, with_snapshot),
])


def _snapshot_entry(d, rel, width, value, expect=DAMAGED):
    p = with_snapshot(d)
    poke.write_be(p, poke.snapshot_entry(p, 0) + rel, width, value)
    return Made(p, expect)


cases_named("snapshot-entry", "snapshots", _snapshot_entry, [
    ("l1-offset-unaligned", 0, 8, 0x40008),
    ("l1-offset-past-eof", 0, 8, 1 << 40),
    ("l1-offset-overflow", 0, 8, 0xFFFF_FFFF_FFFF_0000),
    ("l1-size-huge", 8, 4, 0xFFFFFFFF),
    ("l1-size-over-32MiB", 8, 4, 32 * MiB // 8 + 1),
    ("id-len-past-table", 12, 2, 0xFFFF),
    ("name-len-past-table", 14, 2, 0xFFFF),
    ("extra-huge", 36, 4, 0xFFFFFFFF),
    ("extra-over-1KiB", 36, 4, 1028),
    ("extra-too-small-v3", 36, 4, 8),
    ("extra-unaligned", 36, 4, 17, OK + DAMAGED),
])


@case("snapshots")
def snapshot_l1_points_at_header(d):
    p = with_snapshot(d)
    poke.write_be(p, poke.snapshot_entry(p, 0), 8, 0)
    return Made(p, DAMAGED)


# --- header extensions -------------------------------------------------------------------------------

def _ext_len(d, value):
    p = std(d)
    off, _ = poke.find_extension(p, poke.EXT_FEATURE_TABLE)
    poke.write_be(p, off + 4, 4, value)
    return Made(p, INVALID)


cases_named("ext-overrun", "extensions", _ext_len, [
    ("past-cluster", 65536),
    ("all-ones", 0xFFFFFFFF),
    ("wraps-int32", 0x7FFFFFFF + 1),
])


@case("extensions")
def ext_overruns_backing_name(d):
    """An extension running into the backing-file name (the area ends at its offset)."""
    top = chain(d)
    off, length = poke.find_extension(top, poke.EXT_BACKING_FORMAT)
    poke.write_be(top, off + 4, 4, poke.get(top, "backing_file_offset"))
    return Made(top, INVALID)


@case("extensions")
def ext_backing_format_repeated(d):
    """Two backing-format extensions that disagree ("qcow2", then "raw"): each known type may
    appear once."""
    top = chain(d, "qcow2")
    ft_off, _ = poke.find_extension(top, poke.EXT_FEATURE_TABLE)
    # Over the feature table (which comes after the first record): a second record and an
    # end marker; the backing name's offset is unchanged.
    poke.write_bytes(top, ft_off, struct.pack(">II", poke.EXT_BACKING_FORMAT, 3)
                     + b"raw".ljust(8, b"\0") + bytes(8))
    return Made(top, INVALID + ("ok",))


@case("extensions")
def ext_backing_format_too_long(d):
    top = chain(d, "qcow2")
    off, _ = poke.find_extension(top, poke.EXT_BACKING_FORMAT)
    poke.write_be(top, off + 4, 4, 16)
    return Made(top, INVALID + UNSAFE + ("ChainError",))


@case("extensions")
def ext_backing_format_unknown(d):
    top = chain(d, "qcow2")
    off, _ = poke.find_extension(top, poke.EXT_BACKING_FORMAT)
    poke.write_bytes(top, off + 8, b"vmdk\0")
    poke.write_be(top, off + 4, 4, 4)
    return Made(top, ("UnsupportedFeature", "ChainError", "ImageFormatError"))


@case("extensions")
def ext_feature_table_odd_length(d):
    """A feature-name table whose length is not a multiple of 48 (QEMU only uses it for
    messages)."""
    p = std(d)
    off, _ = poke.find_extension(p, poke.EXT_FEATURE_TABLE)
    poke.write_be(p, off + 4, 4, 50)
    return Made(p, OK + INVALID)


@case("extensions")
def ext_no_end_marker(d):
    """Junk after the feature table instead of the end marker: the parser must stop at the
    end of cluster 0."""
    p = std(d)
    off, length = poke.find_extension(p, poke.EXT_FEATURE_TABLE)
    end = off + 8 + length
    # A chain of unknown extensions of length 0 all the way to the end of the cluster.
    junk = struct.pack(">II", 0x1234_5678, 0) * ((65536 - end) // 8)
    poke.write_bytes(p, end, junk)
    return Made(p, OK + INVALID)


@case("extensions")
def ext_bitmaps_bad(d):
    """A bitmaps extension with a bad length and the autoclear bit that makes it count."""
    p = std(d)
    off, length = poke.find_extension(p, poke.EXT_FEATURE_TABLE)
    end = off + 8 + length
    poke.write_bytes(p, end, struct.pack(">II", poke.EXT_BITMAPS, 16) + b"\xff" * 16 + bytes(8))
    poke.set(p, "autoclear_features", 1)
    return Made(p, OK + INVALID,
                lenient="bitmaps are kept, not interpreted: the guest data is unaffected")


@case("extensions")
def ext_bitmaps_directory_past_eof(d):
    p = std(d)
    off, length = poke.find_extension(p, poke.EXT_FEATURE_TABLE)
    end = off + 8 + length
    body = struct.pack(">IIQQ", 1, 0, 4096, 1 << 40)
    poke.write_bytes(p, end, struct.pack(">II", poke.EXT_BITMAPS, 24) + body + bytes(8))
    poke.set(p, "autoclear_features", 1)
    return Made(p, OK + INVALID + ("check:corrupt",),
                lenient="bitmaps are kept, not interpreted: the guest data is unaffected")


@case("extensions")
def ext_crypto_header_without_luks(d):
    p = std(d)
    off, length = poke.find_extension(p, poke.EXT_FEATURE_TABLE)
    end = off + 8 + length
    poke.write_bytes(p, end, struct.pack(">IIQQ", poke.EXT_FDE, 16, 1 << 40, 1 << 40) + bytes(8))
    return Made(p, OK + INVALID)


@case("extensions")
def ext_data_file_name(d):
    """A data-file extension naming a host file, without the incompatible bit."""
    p = std(d)
    off, length = poke.find_extension(p, poke.EXT_FEATURE_TABLE)
    end = off + 8 + length
    name = b"/etc/passwd"
    poke.write_bytes(p, end, struct.pack(">II", poke.EXT_DATA_FILE, len(name))
                     + name.ljust(16, b"\0") + bytes(8))
    return Made(p, OK + INVALID)


@case("extensions")
def ext_data_file_with_bit(d):
    p = std(d)
    off, length = poke.find_extension(p, poke.EXT_FEATURE_TABLE)
    end = off + 8 + length
    name = b"data.raw"
    (d / "data.raw").write_bytes(bytes(4 * MiB))
    poke.write_bytes(p, end, struct.pack(">II", poke.EXT_DATA_FILE, len(name))
                     + name.ljust(8, b"\0") + bytes(8))
    poke.set(p, "incompatible_features", 1 << 2)
    return Made(p, ("UnsupportedFeature",))


# --- backing references -------------------------------------------------------------------------------

def _backing_name(d, name_fn, fmt, expect, sentinel=True):
    secret = outside(d) if sentinel else None
    name = name_fn(d, secret)
    top = overlay_named(d / "img", name, fmt)
    return Made(top, expect, sentinel=secret)


cases_named("backing", "references", _backing_name, [
    ("absolute", lambda d, s: str(s), "qcow2", UNSAFE),
    ("dotdot", lambda d, s: "../outside/secret.qcow2", "qcow2", UNSAFE),
    ("dotdot-inner", lambda d, s: "sub/../../outside/secret.qcow2", "qcow2", UNSAFE),
    ("json", lambda d, s: 'json:{"file.filename":"%s"}' % s, "qcow2", UNSAFE),
    ("json-driver", lambda d, s: 'json:{"driver":"qcow2","file":{"driver":"file","filename":"%s"}}' % s,
     "qcow2", UNSAFE),
    ("file-protocol", lambda d, s: f"file:{s}", "qcow2", UNSAFE),
    ("nbd-protocol", lambda d, s: "nbd://127.0.0.1:1/export", "raw", UNSAFE),
    ("host-device", lambda d, s: "/dev/zero", "raw", UNSAFE),
    ("proc-self", lambda d, s: "/proc/self/environ", "raw", UNSAFE),
])


@case("references")
def backing_missing_format(d):
    """No backing-format extension: cowchain never probes a format."""
    secret = outside(d)
    img = d / "img"
    shutil.copy(secret, img / "base.qcow2")
    top = overlay_named(img, "base.qcow2", "qcow2")
    # qemu-img no longer creates such overlays: turn the backing-format extension into an
    # unknown one (kept, ignored), so no format is recorded.
    off, _ = poke.find_extension(top, poke.EXT_BACKING_FORMAT)
    poke.write_be(top, off, 4, 0x0BAD_F00D)
    return Made(top, UNSAFE + ("ChainError",))


@case("references")
def backing_format_lies(d):
    """The backing file is raw bytes that look like a qcow2 header, recorded as raw: reading
    must treat it as raw, never follow the header's own backing name."""
    secret = outside(d)
    img = d / "img"
    evil = img / "guest.raw"
    # A raw disk whose guest wrote a qcow2 header naming a host file (CVE-2008-2004 shape).
    overlay_named(img, str(secret), "qcow2", file="evil-header.qcow2")
    evil.write_bytes((img / "evil-header.qcow2").read_bytes().ljust(4 * MiB, b"\0"))
    os.unlink(img / "evil-header.qcow2")
    top = overlay_named(img, "guest.raw", "raw")
    return Made(top, OK, sentinel=secret)


@case("references")
def backing_symlink_escape(d):
    secret = outside(d)
    os.symlink("../outside/secret.qcow2", d / "img" / "base.qcow2")
    top = overlay_named(d / "img", "base.qcow2", "qcow2")
    return Made(top, UNSAFE, sentinel=secret)


@case("references")
def backing_symlink_dir_escape(d):
    secret = outside(d)
    os.symlink("../outside", d / "img" / "sub")
    top = overlay_named(d / "img", "sub/secret.qcow2", "qcow2")
    return Made(top, UNSAFE, sentinel=secret)


@case("references")
def backing_missing_file(d):
    top = overlay_named(d, "nowhere.qcow2", "qcow2")
    return Made(top, ("ChainError", "ImageNotFound"))


@case("references")
def backing_is_directory(d):
    (d / "adir").mkdir()
    top = overlay_named(d, "adir", "qcow2")
    return Made(top, ("ChainError", "InvalidArgument", "ImageFormatError", "EngineIOError"))


@case("references")
def backing_self_loop(d):
    top = overlay_named(d, "top.qcow2", "qcow2")
    return Made(top, ("ChainError",))


@case("references")
def backing_two_loop(d):
    overlay_named(d, "b.qcow2", "qcow2", file="a.qcow2")
    overlay_named(d, "a.qcow2", "qcow2", file="b.qcow2")
    return Made(d / "a.qcow2", ("ChainError",))


@case("references")
def backing_symlink_loop(d):
    """A loop through a symlink inside the folder (same inode under two names)."""
    overlay_named(d, "alias.qcow2", "qcow2", file="top.qcow2")
    os.symlink("top.qcow2", d / "alias.qcow2")
    return Made(d / "top.qcow2", ("ChainError",))


@case("references")
def backing_qcow2_is_raw(d):
    """The recorded format says qcow2 but the backing file is not one."""
    (d / "base.img").write_bytes(b"\x01" * (4 * MiB))
    top = overlay_named(d, "base.img", "qcow2")
    return Made(top, ("ImageFormatError", "ChainError"))


def _deep_chain(d, depth):
    """DEPTH qcow2 files, each backed by the previous one (names of equal length, so the
    template's backing name can be patched in place)."""
    bottom = d / "v0000.qcow2"
    qemu.create(bottom, 4 * MiB, cluster_size=512)
    qemu.qemu_io(bottom, "write -q -P 0x77 0 4k")
    # 512-byte clusters keep each file at a few KiB.
    tmpl = overlay_named(d, "v0000.qcow2", "qcow2", file="tmpl.qcow2", cluster=512)
    data = bytearray(tmpl.read_bytes())
    os.unlink(tmpl)
    boff = struct.unpack(">Q", data[8:16])[0]
    for i in range(1, depth):
        data[boff:boff + 11] = f"v{i - 1:04d}.qcow2".encode()
        (d / f"v{i:04d}.qcow2").write_bytes(data)
    return d / f"v{depth - 1:04d}.qcow2"


@case("references")
def chain_depth_100(d):
    return Made(_deep_chain(d, 100), OK)


@case("references")
def chain_depth_1030(d):
    """Deeper than the default limit (1024) and than the default descriptor limit allows."""
    return Made(_deep_chain(d, 1030), ("ChainError", "SafetyLimitExceeded", "EngineIOError"),
                timeout=15.0)


def _backing_field(d, field, value, expect):
    top = chain(d)
    poke.set(top, field, value)
    return Made(top, expect)


cases_named("backing-name", "references", _backing_field, [
    ("offset-past-cluster", "backing_file_offset", 65536 + 8, INVALID + ("ChainError",)),
    ("offset-huge", "backing_file_offset", 1 << 62, INVALID + ("ChainError",)),
    ("offset-all-ones", "backing_file_offset", (1 << 64) - 1, INVALID + ("ChainError",)),
    ("size-1024", "backing_file_size", 1024, INVALID + ("ChainError",)),
    ("size-huge", "backing_file_size", 0xFFFFFFFF, INVALID + ("ChainError",)),
    ("size-past-cluster", "backing_file_size", 65536 - 500, INVALID + ("ChainError",)),
    # A name length of 0 with an offset: QEMU reads an empty name, i.e. no backing file.
    ("size-zero", "backing_file_size", 0, OK + INVALID + ("ChainError", "check:corrupt")),
])


@case("references")
def backing_name_with_nul(d):
    top = chain(d)
    off = poke.get(top, "backing_file_offset")
    poke.write_bytes(top, off + 2, b"\0")
    return Made(top, INVALID + ("ChainError",))


@case("references")
def backing_name_1023_bytes(d):
    """The longest name QEMU accepts; the file does not exist."""
    top = overlay_named(d, "a" * 1023, "qcow2")
    return Made(top, ("ChainError", "ImageNotFound", "EngineIOError"))


# --- L1 / L2 / refcount entries ------------------------------------------------------------------------

def _l1(d, value, expect=DAMAGED):
    p = std(d)
    poke.write_be(p, poke.l1_entry_offset(p, 0), 8, value)
    return Made(p, expect)


cases_named("l1-entry", "entries", _l1, [
    ("unaligned", 0x40000 + 0x200),
    ("reserved-low", 0x40000 | 1),
    ("reserved-high", 0x40000 | (1 << 56)),
    ("past-eof", 1 << 40),
    ("past-eof-max", 0x00FF_FFFF_FFFF_0000),
    ("points-at-header", 1 << 63),
    ("points-at-reftable", 0x10000),
    ("points-at-refblock", 0x20000),
    ("points-at-l1", 0x30000),
    ("points-at-data", 0x50000),
    ("last-cluster-partial", 0x60000 + 0x8000),
])


def _l2(d, vaddr, value, expect=DAMAGED, maker=std):
    p = maker(d)
    poke.write_be(p, poke.l2_entry_offset(p, vaddr), 8, value)
    return Made(p, expect)


cases_named("l2-entry", "entries", _l2, [
    ("unaligned", 0, (1 << 63) | 0x50000 + 0x200),
    ("reserved-low", 0, (1 << 63) | 0x50000 | 2),
    ("reserved-high", 0, (1 << 63) | 0x50000 | (1 << 56)),
    ("past-eof", 0, (1 << 63) | (1 << 40)),
    ("past-eof-max", 0, (1 << 63) | 0x00FF_FFFF_FFFF_0000),
    ("straddles-eof", 1 << 20, (1 << 63) | 0x70000),
    # Offset 0 is "unallocated" (no data file): a stray COPIED bit, the old cluster leaks.
    ("copied-without-offset", 0, 1 << 63, ("check:leaks",) + DAMAGED),
    ("points-at-reftable", 0, (1 << 63) | 0x10000),
    ("points-at-refblock", 0, (1 << 63) | 0x20000),
    ("points-at-l1", 0, (1 << 63) | 0x30000),
    ("points-at-own-l2", 0, (1 << 63) | 0x40000),
    ("shared-data-copied", 1 << 20, (1 << 63) | 0x50000),
    ("copied-without-refcount-match", 3 << 20, (1 << 63) | 0x50000),
    ("zero-flag-in-v2", 0, (1 << 63) | 0x50000 | 1, DAMAGED, v2),
])


@case("entries")
def l2_entry_zero_alloc_unaligned(d):
    p = std(d)
    poke.write_be(p, poke.l2_entry_offset(p, 0), 8, (1 << 63) | 0x50000 + 0x200 | 1)
    return Made(p, DAMAGED, lenient="a zero cluster reads as zeros without touching its "
                "offset; check() reports the misalignment and writes refuse it")


def _compressed_entry(d, desc_fn, expect=DAMAGED, ctype="zlib"):
    p = compressed(d, ctype)
    e = poke.l2_entry(p, 0)
    assert e & poke.COMPRESSED, hex(e)
    poke.write_be(p, poke.l2_entry_offset(p, 0), 8, desc_fn(p, e))
    return Made(p, expect)


# 64 KiB clusters: the offset field is x = 70 - 16 = 54 bits, the sector count 8 bits.
_X = 54
_OFF = (1 << _X) - 1


def _desc(off, nsect):
    return poke.COMPRESSED | (nsect << _X) | off


cases_named("compressed", "entries", _compressed_entry, [
    ("offset-past-eof", lambda p, e: _desc(1 << 40, 0)),
    ("offset-max", lambda p, e: _desc(_OFF, 0)),
    ("runs-past-eof", lambda p, e: _desc(poke.file_size(p) - 100, 255)),
    ("at-header", lambda p, e: _desc(0, 3)),
    ("at-header-zstd", lambda p, e: _desc(0, 3), DAMAGED, "zstd"),
    ("too-short", lambda p, e: _desc(e & _OFF, 0) if (e >> _X) & 0xFF else _desc((e & _OFF) + 100, 0)),
    ("copied-bit", lambda p, e: e | (1 << 63)),
    ("reserved-low-in-desc-is-offset", lambda p, e: e + 1, DAMAGED),
    ("zstd-truncated", lambda p, e: _desc(e & _OFF, 0), DAMAGED, "zstd"),
])


def _garbage_compressed(d, ctype, payload, expect=DAMAGED):
    """The descriptor is fine; the bytes it points at are not a valid stream."""
    p = compressed(d, ctype)
    e = poke.l2_entry(p, 0)
    off = e & _OFF
    nsect = (e >> _X) & 0xFF
    length = (nsect + 1) * 512 - (off % 512)
    poke.write_bytes(p, off, payload(length))
    return Made(p, expect)


cases_named("compressed-stream", "entries", _garbage_compressed, [
    ("zlib-garbage", "zlib", lambda n: bytes((i * 37 + 11) & 0xFF for i in range(n))),
    ("zlib-short", "zlib", lambda n: _raw_deflate(b"\x11" * 1000).ljust(n, b"\0")),
    # A stream that inflates to more than a cluster: QEMU takes the first cluster's worth.
    ("zlib-long", "zlib", lambda n: _raw_deflate(b"\x11" * 200000)[:n], OK + DAMAGED),
    ("zstd-garbage", "zstd", lambda n: bytes((i * 37 + 11) & 0xFF for i in range(n))),
    ("zstd-bomb-header", "zstd", lambda n: _zstd_bomb()[:n].ljust(n, b"\0")),
])


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -12)
    return c.compress(data) + c.flush()


def _zstd_bomb() -> bytes:
    """A zstd frame header that declares a 2^40-byte content size (a bounded decoder must
    stop at one cluster)."""
    try:
        import zstandard
        return zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * (1 << 20))
    except ImportError:
        # Frame magic, frame header descriptor with an 8-byte content size, then garbage.
        return b"\x28\xb5\x2f\xfd" + b"\xc0" + struct.pack("<Q", 1 << 40) + b"\0" * 32


def _extl2(d, vaddr, word, value, expect=DAMAGED):
    """Poke word 0 (the entry) or word 1 (the subcluster bitmap) of an extended L2 entry."""
    p = std(d, extended_l2=True)
    poke.write_be(p, poke.l2_entry_offset(p, vaddr) + 8 * word, 8, value)
    return Made(p, expect)


cases_named("extl2", "entries", _extl2, [
    ("alloc-and-zero", 0, 1, 0x0000_0001_0000_0001),
    ("all-alloc-and-zero", 0, 1, (1 << 64) - 1),
    ("alloc-without-offset", 2 << 20, 1, 0x0000_0000_0000_0001),
    ("zero-bit-in-entry", 0, 0, (1 << 63) | 0x50000 | 1),
    ("compressed-with-bitmap", 0, 0, poke.COMPRESSED | 0x50000),
])


def _reftable_entry(d, value, expect=OK + DAMAGED + ("check:leaks",)):
    """Read-only access does not need refcounts: reading may succeed, check must flag it."""
    p = std(d)
    poke.write_be(p, poke.reftable_entry_offset(p, 0), 8, value)
    return Made(p, expect)


cases_named("reftable-entry", "entries", _reftable_entry, [
    ("unaligned", 0x20000 + 0x200),
    ("reserved", 0x20000 | 1),
    ("past-eof", 1 << 40),
    ("zero", 0),
    ("points-at-l1", 0x30000),
    ("points-at-data", 0x50000),
])


def _refblock_fill(d, byte):
    p = std(d)
    rb = poke.read_be(p, poke.reftable_entry_offset(p, 0), 8)
    poke.write_bytes(p, rb, bytes([byte]) * 65536)
    return Made(p, OK + ("check:corrupt", "check:leaks") + INVALID)


cases_named("refblock", "entries", _refblock_fill, [("all-zero", 0), ("all-max", 0xFF)])


# --- files and resources ---------------------------------------------------------------------------------

def _truncate(d, where):
    p = std(d)
    size = poke.file_size(p)
    poke.truncate(p, where(size))
    return Made(p, DAMAGED + ("check:leaks",))


cases_named("truncated", "files", _truncate, [
    ("half-header-cluster", lambda s: 32768),
    ("before-l1", lambda s: 0x30000),
    ("inside-l1", lambda s: 0x30004),
    ("before-l2", lambda s: 0x40000),
    ("inside-l2", lambda s: 0x40000 + 100),
    ("before-last-data", lambda s: 0x60000),
])


@case("files")
def truncated_inside_last_data(d):
    """The file ends inside the last data cluster: QEMU reads the missing tail as zeros."""
    p = std(d)
    poke.truncate(p, 0x60000 + 1000)
    return Made(p, OK + DAMAGED + ("check:leaks",))


@case("files")
def max_size_tables(d):
    """Tables at their maximum legal size: a 32 MiB L1 (2 PiB virtual disk at 64 KiB
    clusters) and an 8 MiB reftable, in a sparse file."""
    p = d / "big.qcow2"
    qemu.create(p, 1 << 40)
    qemu.qemu_io(p, "write -q -P 0x66 0 64k")
    l1_entries = 32 * MiB // 8
    size = l1_entries * 8192 * 65536  # what that L1 covers
    poke.set(p, "size", size)
    poke.set(p, "l1_size", l1_entries)
    # Move the L1 to a fresh area at 16 MiB, copying the one entry that is in use.
    old = poke.get(p, "l1_table_offset")
    entry = poke.read_be(p, old, 8)
    new = 16 * MiB
    poke.truncate(p, new + 32 * MiB + 8 * MiB + 65536)
    poke.write_be(p, new, 8, entry)
    poke.set(p, "l1_table_offset", new)
    # An 8 MiB reftable right after it, with the first entry copied.
    rt_old = poke.get(p, "refcount_table_offset")
    rte = poke.read_be(p, rt_old, 8)
    rt_new = new + 32 * MiB
    poke.write_be(p, rt_new, 8, rte)
    poke.set(p, "refcount_table_offset", rt_new)
    poke.set(p, "refcount_table_clusters", 8 * MiB // 65536)
    # The moved tables carry no refcount: check reports that; reads must work.
    return Made(p, OK + ("check:corrupt", "check:leaks") + ("SafetyLimitExceeded",), timeout=10.0)


@case("files")
def not_a_regular_file(d):
    """A FIFO where the image should be: must not block forever."""
    p = d / "fifo.qcow2"
    os.mkfifo(p)
    return Made(p, ("InvalidArgument", "ImageFormatError", "EngineIOError"))


@case("files")
def directory_as_image(d):
    p = d / "dir.qcow2"
    p.mkdir()
    return Made(p, ("InvalidArgument", "ImageFormatError", "EngineIOError"))


def by_name() -> dict[str, Case]:
    names = [c.name for c in CASES]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise RuntimeError(f"duplicate hostile case names: {sorted(dupes)}")
    return {c.name: c for c in CASES}


# --- the worker: runs in a child process forked from a forkserver that preloaded the engine ---

def worker(path: str, fmt: str, limit: int, cap: int, conn, fault_file: str) -> None:
    """Read-only pass, then read-write pass, on PATH; reports through CONN:
    ("STAGE", "ro:open") before each step, ("RESULT", dict) after each pass.

    Runs under RLIMIT_AS = LIMIT with faulthandler writing to FAULT_FILE. Never returns
    normally: it ends with os._exit, so no atexit handler or engine finaliser of the parent
    runs in the child."""
    import faulthandler
    import hashlib
    import resource
    import sys
    import traceback

    fault = open(fault_file, "w")
    faulthandler.enable(file=fault)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    folder = os.path.dirname(os.path.abspath(path))

    def files():
        # Only the image's own folder: a file outside it that policy forbids must not even
        # be opened (the parent watches it with inotify), let alone hashed here.
        out = {}
        for root, dirs, names in os.walk(folder):
            for n in names:
                p = os.path.join(root, n)
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                out[p] = (os.path.getsize(p), h.hexdigest())
        return out

    def run(mode):
        out = {"mode": mode}
        stage = "import"

        def at(s):
            conn.send(("STAGE", f"{mode}:{s}"))
            return s

        try:
            import engine
            stage = at("open")
            img = engine.open(path, format=fmt, readonly=(mode == "ro"))
            closed = False
            try:
                size = img.size
                out["size"] = size
                if mode == "ro":
                    stage = at("read")
                    chunk = 4 << 20
                    digest = hashlib.sha256()
                    head = min(size, cap)
                    for off in range(0, head, chunk):
                        n = min(chunk, head - off)
                        data = img.read(off, n)
                        if len(data) != n:
                            out.update(kind="invalid", stage=stage,
                                       detail=f"read({off}, {n}) returned {len(data)} bytes")
                            return out
                        digest.update(data)
                    out["sha256"] = digest.hexdigest()
                    if size > cap:
                        n = min(chunk, size - cap)
                        img.read(size - n, n)
                    stage = at("extents")
                    pos = 0
                    for e in img.extents():
                        if e.start != pos or e.length <= 0:
                            out.update(kind="invalid", stage=stage,
                                       detail=f"extents do not tile the disk at {pos}: {tuple(e)}")
                            return out
                        pos += e.length
                    if pos != size:
                        out.update(kind="invalid", stage=stage,
                                   detail=f"extents end at {pos}, size {size}")
                        return out
                    stage = at("check")
                    res = img.check().to_dict()
                    out["check"] = {k: res.get(k, 0) for k in ("corruptions", "leaks", "check-errors")}
                else:
                    stage = at("write")
                    spots = sorted({0, (size // 2) // 512 * 512, max(0, size - 512)}) if size else []
                    for off in spots:
                        n = min(4096, size - off)
                        if n > 0:
                            img.write(off, b"\xab" * n)
                    stage = at("flush")
                    img.flush()
                stage = at("close")
                closed = True
                img.close()
            finally:
                if not closed:
                    try:
                        img.close()
                    except Exception:
                        pass
            c = out.get("check", {})
            out["kind"] = ("check:corrupt" if c.get("corruptions") or c.get("check-errors")
                           else "check:leaks" if c.get("leaks") else "ok")
            out["stage"] = "done"
        except BaseException as e:  # noqa: B036 - classifying every exception is the point
            typed = "engine" in sys.modules and isinstance(e, sys.modules["engine"].EngineError)
            out.update(kind="typed" if typed else "untyped", stage=stage, cls=type(e).__name__,
                       mro=[c.__name__ for c in type(e).__mro__], msg=str(e)[:300],
                       tb="" if typed else traceback.format_exc()[-2500:])
        return out

    try:
        before = files()
        ro = run("ro")
        after = files()
        ro["changed"] = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        conn.send(("RESULT", ro))
        size0 = os.path.getsize(path) if os.path.isfile(path) else 0
        rw = run("rw")
        rw["grew"] = (os.path.getsize(path) if os.path.isfile(path) else 0) - size0
        conn.send(("RESULT", rw))
    finally:
        fault.flush()
        os._exit(0)


def preload() -> None:
    """What the forkserver imports once, so that each case forks a ready interpreter."""
    import engine
    import engine.image  # noqa: F401
    try:
        import engine.check  # noqa: F401
    except ImportError:
        pass
