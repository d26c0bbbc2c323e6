"""Refusals that leave nothing behind.

- rebase opens and checks the whole new chain before it writes; a rebase that raises leaves
  the file byte for byte as it was;
- resize refuses what QEMU refuses (a v2 image with internal snapshots, an unaligned qcow2
  size, a size over the format's maximum);
- every size is checked before a file exists: the format's maximum for the cluster size,
  RLIMIT_FSIZE, the filesystem's largest file; the message states the limit;
- every public entry point of engine / engine.image / engine.format answers a bad argument
  (wrong type, bool for int, negative, huge, unknown format) with InvalidArgument carrying
  the value, and a refused create leaves no file and no open descriptor.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

import engine
from engine import errors
from engine import format as fmt
from engine import image as image_mod
from qemu import assert_qemu_clean, qemu_img, qemu_img_json, qemu_io

MiB = 1 << 20


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- rebase ----------------------------------------------------------------------------------

@pytest.fixture
def chain(tmp_path):
    """base.raw <- mid.qcow2 <- top.qcow2 and <- deep.qcow2; other.qcow2 alone; loop.qcow2
    backed by top;
    orphan.qcow2 backed by a file that is gone; data.raw a plain raw file."""
    d = tmp_path
    with open(d / "base.raw", "wb") as f:
        f.write(b"\x11" * MiB)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(d / "mid.qcow2"))
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(d / "top.qcow2"))
    qemu_img("create", "-q", "-f", "qcow2", str(d / "other.qcow2"), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", str(d / "loop.qcow2"))
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(d / "deep.qcow2"))
    qemu_img("create", "-q", "-f", "qcow2", "-b", "gone.raw", "-F", "raw", "-u",
             str(d / "orphan.qcow2"), "1M")
    with open(d / "data.raw", "wb") as f:
        f.write(b"\x22" * MiB)
    return d


# (new name, new format, open options, the error expected)
REBASE_FAILURES = {
    "self": ("top.qcow2", "qcow2", {}, errors.ChainError),
    "loop-through-another": ("loop.qcow2", "qcow2", {}, errors.ChainError),
    "missing-file": ("missing.qcow2", "qcow2", {}, errors.ImageNotFound),
    "wrong-format": ("data.raw", "qcow2", {}, errors.ImageFormatError),
    "missing-below": ("orphan.qcow2", "qcow2", {}, errors.ImageNotFound),
    "too-deep": ("deep.qcow2", "qcow2", {"max_chain_depth": 2}, errors.ChainError),
    "unsafe-absolute": ("/etc/passwd", "raw", {}, errors.UnsafeBackingReference),
    "unsafe-dotdot": ("../other.qcow2", "qcow2", {}, errors.UnsafeBackingReference),
    "unsafe-protocol": ("nbd://localhost/x", "raw", {}, errors.UnsafeBackingReference),
    "unknown-format": ("other.qcow2", "vmdk", {}, errors.InvalidArgument),
    "no-format": ("other.qcow2", None, {}, errors.InvalidArgument),
    "format-without-name": (None, "qcow2", {}, errors.InvalidArgument),
    "name-not-a-string": (b"other.qcow2", "qcow2", {}, errors.InvalidArgument),
    "name-too-long": ("x" * 300, "qcow2", {}, errors.EngineError),
}


@pytest.mark.parametrize("case", list(REBASE_FAILURES))
def test_a_failing_rebase_leaves_the_file_as_it_was(chain, case):
    name, bfmt, opts, err = REBASE_FAILURES[case]
    top = str(chain / "top.qcow2")
    with engine.open(top, **opts) as img:
        img.write(4096, b"\x33" * 4096)
        img.flush()
        before = sha(top)
        with pytest.raises(err):
            img.rebase(name, bfmt)
        assert sha(top) == before
        # the handle still serves the old chain
        assert img.backing_name == "mid.qcow2"
        assert img.read(0, 8192) == b"\x11" * 4096 + b"\x33" * 4096
    assert_qemu_clean(top)
    with engine.open(top, readonly=True) as img:
        assert img.backing_name == "mid.qcow2"
        assert img.read(0, 4096) == b"\x11" * 4096


def test_rebase_puts_the_old_header_back_when_the_reopen_fails(chain, monkeypatch):
    top = str(chain / "top.qcow2")
    real = image_mod.Image._reload
    calls = []

    def failing_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise errors.EngineIOError(5, "injected reopen failure", path=self._path)
        return real(self)

    with engine.open(top) as img:
        img.flush()
        before = sha(top)
        monkeypatch.setattr(image_mod.Image, "_reload", failing_once)
        with pytest.raises(errors.EngineIOError):
            img.rebase("other.qcow2", "qcow2")
        monkeypatch.setattr(image_mod.Image, "_reload", real)
        assert sha(top) == before
        assert img.read(0, 4096) == b"\x11" * 4096
    assert_qemu_clean(top)


def test_rebase_onto_an_image_someone_writes_is_refused_before_the_write(chain):
    top = str(chain / "top.qcow2")
    with engine.open(str(chain / "other.qcow2")), engine.open(top) as img:
        before = sha(top)
        with pytest.raises(errors.ImageLocked):
            img.rebase("other.qcow2", "qcow2")
        assert sha(top) == before and img.backing_name == "mid.qcow2"


def test_rebase_onto_a_valid_chain_still_works(chain):
    top = str(chain / "top.qcow2")
    with engine.open(str(chain / "other.qcow2")) as other:
        other.write(0, b"\x44" * 4096)
    with engine.open(top) as img:
        img.rebase("other.qcow2", "qcow2")
        assert img.read(0, 4096) == b"\x44" * 4096
    info = qemu_img_json("info", "-f", "qcow2", top)
    assert info["backing-filename"] == "other.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    with engine.open(top) as img:
        img.rebase(None)
        assert img.backing is None and img.read(0, 4096) == bytes(4096)
    assert "backing-filename" not in qemu_img_json("info", "-f", "qcow2", top)


# --- resize: what QEMU refuses ------------------------------------------------------------------

def test_resize_of_a_v2_image_with_snapshots_is_refused_as_qemu_refuses(tmp_path):
    p = str(tmp_path / "v2.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", p, "1M")
    qemu_io(p, "write -P 0x55 0 64k")
    qemu_img("snapshot", "-c", "s1", p)
    r = qemu_img("resize", "-f", "qcow2", p, "2M", check=False)
    assert r.returncode != 0 and b"v2 image which has snapshots" in r.stderr
    before = sha(p)
    with engine.open(p) as img:
        with pytest.raises(errors.UnsupportedFeature) as ei:
            img.resize(2 * MiB)
        assert "v2" in ei.value.feature and "compat=1.1" in str(ei.value)
        assert img.size == MiB
    assert sha(p) == before
    qemu_img("snapshot", "-a", "s1", p)         # the snapshot still applies
    assert_qemu_clean(p)


def test_resize_of_a_v3_image_with_snapshots_is_allowed_as_qemu_allows(tmp_path):
    p = str(tmp_path / "v3.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    qemu_io(p, "write -P 0x55 0 64k")
    qemu_img("snapshot", "-c", "s1", p)
    with engine.open(p) as img:
        img.resize(2 * MiB)
        img.write(MiB, b"\x66" * 4096)
    assert_qemu_clean(p)
    assert qemu_img_json("info", "-f", "qcow2", p)["virtual-size"] == 2 * MiB
    qemu_img("snapshot", "-a", "s1", p)         # v3 snapshots record their size
    assert qemu_img_json("info", "-f", "qcow2", p)["virtual-size"] == MiB


def test_resize_to_an_unaligned_qcow2_size_is_refused_as_qemu_refuses(tmp_path):
    p = str(tmp_path / "a.qcow2")
    engine.create(p, MiB).close()
    assert qemu_img("resize", "-f", "qcow2", p, str(MiB + 1), check=False).returncode != 0
    before = sha(p)
    with engine.open(p) as img:
        with pytest.raises(errors.InvalidArgument) as ei:
            img.resize(MiB + 1)
        assert "multiple of 512" in str(ei.value) and ei.value.value == MiB + 1
    assert sha(p) == before


# --- sizes against the limits ------------------------------------------------------------------

OVER_LIMIT = [
    # size, format, cluster size, text the message must hold
    (16 << 60, "qcow2", 64 << 10, "over the qcow2 maximum of 2 PiB for 64 KiB clusters"),
    (99999999999 << 40, "qcow2", 64 << 10, "over the qcow2 maximum of 2 PiB"),
    (10 << 50, "qcow2", 64 << 10, "virtual size 10 PiB is over the qcow2 maximum of 2 PiB"),
    (3 << 60, "qcow2", 2 << 20, "over the qcow2 maximum of 2 EiB for 2 MiB clusters"),
    ((128 << 30) + 512, "qcow2", 512, "maximum of 128 GiB for 512 bytes clusters"),
    (16 << 60, "raw", 64 << 10, "over the raw maximum of 9223372035781033984 bytes"),
    (2 ** 63, "raw", 64 << 10, "over the raw maximum"),
    (2 ** 64, "raw", 64 << 10, "over the raw maximum"),
]


@pytest.mark.parametrize("size,format,cluster,text", OVER_LIMIT,
                         ids=[f"{f}-{s}-c{c}" for s, f, c, _ in OVER_LIMIT])
def test_create_refuses_a_size_over_the_format_limit_before_the_file_exists(
        tmp_path, size, format, cluster, text):
    p = tmp_path / "x.img"
    n = fd_count()
    with pytest.raises(errors.InvalidArgument) as ei:
        engine.create(p, size, format=format, cluster_size=cluster)
    assert text in str(ei.value) and ei.value.value == size
    assert not p.exists() and fd_count() == n


@pytest.mark.parametrize("cluster", [512, 4096])
def test_the_qcow2_size_limit_is_qemus(tmp_path, cluster):
    limit = fmt.max_virtual_size("qcow2", cluster)
    assert limit == {512: 128 << 30, 4096: 8 << 40}[cluster]
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    engine.create(ours, limit, cluster_size=cluster).close()
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", theirs, str(limit))
    assert_qemu_clean(ours)
    os.unlink(ours)
    os.unlink(theirs)
    r = qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", theirs,
                 str(limit + 512), check=False)
    assert r.returncode != 0 and b"too large" in r.stderr
    with pytest.raises(errors.InvalidArgument):
        engine.create(ours, limit + 512, cluster_size=cluster)
    assert not os.path.exists(ours)


def test_raw_size_over_the_filesystem_limit(tmp_path):
    big = 20 << 40
    limit = image_mod._fs_max_file_size(str(tmp_path), big)
    p = tmp_path / "big.raw"
    if limit is None:                           # this filesystem holds a 20 TiB sparse file
        with engine.create(p, big, format="raw") as img:
            assert img.size == big
        return
    n = fd_count()
    with pytest.raises(errors.InvalidArgument) as ei:
        engine.create(p, big, format="raw")
    assert "largest file the filesystem" in str(ei.value) and fmt.size_text(limit) in str(ei.value)
    assert not p.exists() and fd_count() == n
    with engine.create(p, MiB, format="raw") as img:
        with pytest.raises(errors.InvalidArgument) as ei:
            img.resize(big)
        assert fmt.size_text(limit) in str(ei.value)
    assert os.path.getsize(p) == MiB


_RLIMIT_SCRIPT = r"""
import os, resource, sys
import engine
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
p = sys.argv[1]
try:
    engine.create(p, 2 << 20, format="raw")
    print("CREATED")
except engine.InvalidArgument as e:
    print("REFUSED", e)
print("EXISTS", os.path.exists(p))
with engine.create(p, 512 << 10, format="raw") as img:
    try:
        img.resize(4 << 20)
        print("GREW")
    except engine.InvalidArgument as e:
        print("REFUSED", e)
print("SIZE", os.path.getsize(p))
"""


def test_rlimit_fsize_is_checked_before_the_file_exists(tmp_path):
    out = subprocess.run([sys.executable, "-c", _RLIMIT_SCRIPT, str(tmp_path / "r.raw")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("REFUSED") and "RLIMIT_FSIZE" in lines[0] and "1 MiB" in lines[0]
    assert lines[1] == "EXISTS False"
    assert lines[2].startswith("REFUSED") and "RLIMIT_FSIZE" in lines[2]
    assert lines[3] == f"SIZE {512 << 10}"


@pytest.mark.parametrize("format", ["qcow2", "raw"])
def test_resize_refuses_a_size_over_the_limit_and_leaves_the_file(tmp_path, format):
    p = str(tmp_path / f"r.{format}")
    engine.create(p, MiB, format=format).close()
    before = sha(p)
    with engine.open(p, format=format) as img:
        for bad in (10 << 50 if format == "qcow2" else 2 ** 63, 2 ** 64):
            with pytest.raises(errors.InvalidArgument) as ei:
                img.resize(bad)
            assert "maximum" in str(ei.value) and ei.value.value == bad
        with pytest.raises(errors.InvalidArgument):
            img.resize(-5)
        assert img.size == MiB
    assert sha(p) == before


def test_a_refused_raw_create_leaves_nothing_and_a_retry_works(tmp_path):
    p = tmp_path / "r.raw"
    n = fd_count()
    for _ in range(3):
        with pytest.raises(errors.InvalidArgument):
            engine.create(p, 2 ** 63, format="raw")
        assert not p.exists() and fd_count() == n
    with engine.create(p, MiB, format="raw") as img:
        assert img.size == MiB


# --- the argument sweep ------------------------------------------------------------------------

class _Nothing:
    """Marks a case whose InvalidArgument carries no single value."""


NOVALUE = _Nothing()
HUGE = 2 ** 64
BAD_INTS = [-1, -5, 1.5, 1.0, True, "1M", None, HUGE * HUGE, [1], np.float64(2.0)]
BAD_BOOLS = [1, 0, "yes", None, np.bool_(True)]
BAD_FORMATS = ["vmdk", "QCOW2", "", 5, True, ["raw"]]
BAD_PATHS = [None, 5, 1.5, "", "a\0b", ["x"]]


def _create_cases():
    cases = []
    for v in BAD_PATHS:
        cases.append((f"create-path-{v!r}", lambda d, v=v: engine.create(v, MiB), v))
    for v in BAD_INTS + [2 ** 63, HUGE]:
        if v is None:
            continue                            # size None means "the backing file's size"
        cases.append((f"create-size-{v!r}", lambda d, v=v: engine.create(d / "n", v), v))
        cases.append((f"create-raw-size-{v!r}",
                      lambda d, v=v: engine.create(d / "n", v, format="raw"), v))
    cases.append(("create-size-None", lambda d: engine.create(d / "n", None), NOVALUE))
    for v in BAD_FORMATS + [None]:
        cases.append((f"create-format-{v!r}",
                      lambda d, v=v: engine.create(d / "n", MiB, format=v), v))
    for v in [1000, 0, -1, True, 1.5, "64k", 4 << 20, 256, None]:
        cases.append((f"create-cluster_size-{v!r}",
                      lambda d, v=v: engine.create(d / "n", MiB, cluster_size=v), v))
        cases.append((f"create-raw-cluster_size-{v!r}",
                      lambda d, v=v: engine.create(d / "n", MiB, format="raw", cluster_size=v), v))
    for v in ["2.0", 1, None, 1.1]:
        cases.append((f"create-compat-{v!r}",
                      lambda d, v=v: engine.create(d / "n", MiB, compat=v), v))
    for v in [3, 0, 128, True, "16", 16.0]:
        cases.append((f"create-refcount_bits-{v!r}",
                      lambda d, v=v: engine.create(d / "n", MiB, refcount_bits=v), v))
    for flag in ("lazy_refcounts", "extended_l2", "overwrite", "allow_unsafe_backing"):
        for v in BAD_BOOLS:
            cases.append((f"create-{flag}-{v!r}",
                          lambda d, v=v, flag=flag: engine.create(d / "n", MiB, **{flag: v}), v))
    for v in [5, b"base.qcow2", ["x"]]:
        cases.append((f"create-backing-{v!r}", lambda d, v=v: engine.create(
            d / "n", MiB, backing=v, backing_format="qcow2"), v))
    for v in BAD_FORMATS:
        cases.append((f"create-backing_format-{v!r}", lambda d, v=v: engine.create(
            d / "n", None, backing="img.qcow2", backing_format=v), v))
    cases.append(("create-backing_format-without-backing",
                  lambda d: engine.create(d / "n", MiB, backing_format="qcow2"), "qcow2"))
    return cases


def _open_cases():
    cases = []
    for v in BAD_PATHS:
        cases.append((f"open-path-{v!r}", lambda d, v=v: engine.open(v), v))
    for v in BAD_FORMATS:
        cases.append((f"open-format-{v!r}", lambda d, v=v: engine.open(d / "img.qcow2", format=v), v))
    for flag in ("readonly", "backing", "allow_unsafe_backing", "force_share"):
        for v in BAD_BOOLS:
            cases.append((f"open-{flag}-{v!r}", lambda d, v=v, flag=flag: engine.open(
                d / "img.qcow2", **{flag: v}), v))
    for v in [-1, 1.5, True, "3", None]:
        cases.append((f"open-max_chain_depth-{v!r}", lambda d, v=v: engine.open(
            d / "img.qcow2", max_chain_depth=v), v))
    return cases


def _method_cases():
    """(name, fn(img), bad value): methods of an open read-write qcow2 image."""
    cases = []
    for v in BAD_INTS + [2 ** 63, HUGE]:
        cases.append((f"resize-{v!r}", lambda img, v=v: img.resize(v), v))
    cases.append(("resize-unaligned", lambda img: img.resize(MiB + 1), MiB + 1))
    for v in [5, b"base.qcow2", ["x"]]:
        cases.append((f"rebase-name-{v!r}", lambda img, v=v: img.rebase(v, "qcow2"), v))
    for v in BAD_FORMATS + [None]:
        cases.append((f"rebase-format-{v!r}", lambda img, v=v: img.rebase("b.qcow2", v), v))
    for v in BAD_BOOLS:
        cases.append((f"rebase-allow_unsafe-{v!r}",
                      lambda img, v=v: img.rebase(None, allow_unsafe_backing=v), v))
    for v in ["x", "ALL", 1, True, ["all"]]:
        cases.append((f"check-repair-{v!r}", lambda img, v=v: img.check(repair=v), v))
    for v in BAD_BOOLS:
        cases.append((f"info-backing_chain-{v!r}", lambda img, v=v: img.info(backing_chain=v), v))
    for v in BAD_INTS + [HUGE]:
        if v is None:
            continue
        cases.append((f"extents-offset-{v!r}", lambda img, v=v: img.extents(v), v))
        cases.append((f"extents-length-{v!r}", lambda img, v=v: img.extents(0, v), v))
        cases.append((f"read-offset-{v!r}", lambda img, v=v: img.read(v, 512), v))
        cases.append((f"read-length-{v!r}", lambda img, v=v: img.read(0, v), v))
    cases.append(("extents-past-the-end", lambda img: img.extents(2 * MiB), NOVALUE))
    cases.append(("read-past-the-end", lambda img: img.read(MiB - 512, 1024), NOVALUE))
    return cases


def _format_cases():
    h, data = fmt.new_image_layout(MiB)
    cases = []
    for v in [None, "abc", 123, 1.5]:
        cases.append((f"parse_header-buf-{v!r}", lambda v=v: fmt.parse_header(v, 4096), v))
    for v in [-1, "x", 1.5, True, None]:
        cases.append((f"parse_header-file_size-{v!r}",
                      lambda v=v: fmt.parse_header(data[:65536], v), v))
    for v in [None, "x", 5, {}]:
        cases.append((f"encode_header-{v!r}", lambda v=v: fmt.encode_header(v), v))
        cases.append((f"info_fields-{v!r}", lambda v=v: fmt.info_fields(v), v))
        cases.append((f"snapshot_table_size-h-{v!r}", lambda v=v: fmt.snapshot_table_size(b"", v), v))
        cases.append((f"parse_snapshot_table-h-{v!r}", lambda v=v: fmt.parse_snapshot_table(b"", v), v))
        cases.append((f"encode_snapshot_table-h-{v!r}", lambda v=v: fmt.encode_snapshot_table([], v), v))
    for v in [None, 5, "x"]:
        cases.append((f"snapshot_table_size-buf-{v!r}", lambda v=v: fmt.snapshot_table_size(v, h), v))
        cases.append((f"parse_snapshot_table-buf-{v!r}", lambda v=v: fmt.parse_snapshot_table(v, h), v))
    for v in [None, 5, [1], "x"]:
        cases.append((f"encode_snapshot_table-entries-{v!r}",
                      lambda v=v: fmt.encode_snapshot_table(v, h), v))
    for v in [-1, 1.5, "x", True]:
        cases.append((f"parse_snapshot_table-file_size-{v!r}",
                      lambda v=v: fmt.parse_snapshot_table(b"", h, file_size=v), v))
    for v in [-1, "x", 1.5, True]:
        cases.append((f"l1_entries_for-size-{v!r}", lambda v=v: fmt.l1_entries_for(v, 16), v))
    for v in [-1, 8, 22, 99, "16", True]:
        cases.append((f"l1_entries_for-bits-{v!r}", lambda v=v: fmt.l1_entries_for(10, v), v))
    for v in BAD_FORMATS:
        cases.append((f"max_virtual_size-format-{v!r}", lambda v=v: fmt.max_virtual_size(v), v))
    for v in [1000, "x", True, None]:
        cases.append((f"max_virtual_size-cluster-{v!r}",
                      lambda v=v: fmt.max_virtual_size("qcow2", v), v))
    for v in BAD_INTS + [HUGE]:
        cases.append((f"new_image_layout-size-{v!r}", lambda v=v: fmt.new_image_layout(v), v))
    for kw, vals in (("cluster_size", [1000, True, "x"]), ("compat", ["2", 1]),
                     ("refcount_bits", [3, True, "16"]), ("lazy_refcounts", [1, "yes"]),
                     ("extended_l2", [1, "yes"]), ("compression_type", ["lz4", 1, ["zlib"]])):
        for v in vals:
            cases.append((f"new_image_layout-{kw}-{v!r}",
                          lambda v=v, kw=kw: fmt.new_image_layout(MiB, **{kw: v}), v))
    return cases


def _assert_value(e: errors.InvalidArgument, bad) -> None:
    if bad is NOVALUE:
        return
    v = e.value
    assert v is bad or (type(v) is type(bad) and v == bad), (e, v, bad)


@pytest.fixture
def folder(tmp_path):
    engine.create(tmp_path / "img.qcow2", MiB).close()
    return tmp_path


def _no_leftovers(folder, before_files, before_fds):
    assert sorted(os.listdir(folder)) == before_files
    assert fd_count() == before_fds


@pytest.mark.parametrize("name,call,bad", _create_cases() + _open_cases(),
                         ids=lambda x: x if isinstance(x, str) else "")
def test_sweep_create_and_open(folder, name, call, bad):
    files, fds = sorted(os.listdir(folder)), fd_count()
    with pytest.raises(errors.InvalidArgument) as ei:
        img = call(folder)
        img.close()
    _assert_value(ei.value, bad)
    _no_leftovers(folder, files, fds)


@pytest.mark.parametrize("name,call,bad", _method_cases(),
                         ids=lambda x: x if isinstance(x, str) else "")
def test_sweep_image_methods(folder, name, call, bad):
    p = folder / "img.qcow2"
    with engine.open(p) as img:
        img.write(0, b"\x01" * 4096)
        img.flush()
        before = sha(p)
        with pytest.raises(errors.InvalidArgument) as ei:
            call(img)
        _assert_value(ei.value, bad)
        assert sha(p) == before
        assert img.read(0, 4096) == b"\x01" * 4096 and img.size == MiB


@pytest.mark.parametrize("name,call,bad", _format_cases(),
                         ids=lambda x: x if isinstance(x, str) else "")
def test_sweep_format_functions(name, call, bad):
    with pytest.raises(errors.InvalidArgument) as ei:
        call()
    _assert_value(ei.value, bad)
