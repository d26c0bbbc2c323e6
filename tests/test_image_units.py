"""Unit tests of the image layer's small rooms, each on its own, without a whole open:

- ``engine.image.locks``: QEMU's lock bytes (100 + permission for a use, 200 + permission
  for a permission not shared), the conflicts they make between two open file descriptions,
  and that they go with the descriptor;
- ``engine.image.naming``: path arguments, and the backing-name policy (plain names inside
  the overlay's folder, symlinks resolved; ``allow_unsafe`` lifts the policy, not the checks
  that a name names a file);
- ``engine.image.files``: only regular files open (a FIFO neither blocks nor opens), the
  header read, RLIMIT_FSIZE before a file is made, a failed metadata sync marks its error;
- ``engine.image.chain``: the open options and the sector rounding of the virtual size;
- the package exports what other modules import from ``engine.image``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import resource
import struct

import pytest

import engine
from engine import errors, metaio
from engine import format as fmt
from engine.image import chain, files, locks, naming

# --- locks ----------------------------------------------------------------------------------

_FLOCK = "=hh4xqqi4x"


def locked_bytes(path, lo: int = 98, hi: int = 206) -> set[int]:
    """The bytes in [lo, hi) on which another open file description holds a lock."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out = set()
        for b in range(lo, hi):
            arg = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, b, 1, 0)
            if struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_OFD_GETLK, arg))[0] != fcntl.F_UNLCK:
                out.add(b)
        return out
    finally:
        os.close(fd)


@pytest.fixture
def blank(tmp_path):
    p = tmp_path / "f.img"
    p.write_bytes(bytes(4096))
    return str(p)


@pytest.mark.parametrize("writable,force_share,want", [
    (True, False, {100, 101, 103, 201, 203}),
    (False, False, {100, 201, 203}),
    (False, True, {100}),
])
def test_lock_takes_qemus_bytes(blank, writable, force_share, want):
    fd = os.open(blank, os.O_RDWR if writable else os.O_RDONLY)
    try:
        lock = locks._Lock(fd, blank, writable, force_share)
        assert locked_bytes(blank) == want
        lock.release()
        assert lock.fd == -1
    finally:
        os.close(fd)
    assert locked_bytes(blank) == set()       # the locks go with the descriptor


@pytest.mark.parametrize("first,second,message", [
    ((True, False), (True, False), 'Failed to get "write" lock'),
    ((True, False), (False, False), 'Failed to get shared "write" lock'),
    ((False, False), (True, False), 'Failed to get "write" lock'),
])
def test_lock_conflicts_name_the_permission(blank, first, second, message):
    fd1, fd2 = os.open(blank, os.O_RDWR), os.open(blank, os.O_RDWR)
    try:
        locks._Lock(fd1, blank, *first)
        with pytest.raises(errors.ImageLocked, match=message) as ei:
            locks._Lock(fd2, blank, *second)
        assert ei.value.path == blank
    finally:
        os.close(fd1)
        os.close(fd2)


@pytest.mark.parametrize("first", [(True, False), (False, False), (False, True)])
def test_lock_force_share_reader_coexists_with_anyone(blank, first):
    fd1, fd2 = os.open(blank, os.O_RDWR), os.open(blank, os.O_RDONLY)
    try:
        locks._Lock(fd1, blank, *first)
        locks._Lock(fd2, blank, False, True)
    finally:
        os.close(fd1)
        os.close(fd2)


def test_readers_share(blank):
    fds = [os.open(blank, os.O_RDONLY) for _ in range(3)]
    try:
        for fd in fds:
            locks._Lock(fd, blank, False, False)
    finally:
        for fd in fds:
            os.close(fd)


# --- naming ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value,want", [("a.img", "a.img"), (b"b.img", "b.img")])
def test_path_arg_takes_str_bytes_and_pathlike(tmp_path, value, want):
    assert naming._path_arg(value) == want
    assert naming._path_arg(tmp_path / want) == str(tmp_path / want)


@pytest.mark.parametrize("value", [None, 3, 1.5, ["a"], "", "a\0b", b""])
def test_path_arg_refuses(value):
    with pytest.raises(errors.InvalidArgument) as ei:
        naming._path_arg(value, "dest")
    assert "dest" in str(ei.value)
    assert ei.value.value == value


@pytest.mark.parametrize("name,why", [
    ("", "does not name a file"), (".", "does not name a file"), ("sub/", "does not name a file"),
    ("a\0b", "NUL byte"), ("json:{}", "json: or protocol"), ("nbd://host/x", "json: or protocol"),
    ("/etc/passwd", "absolute path"), ("../x.img", "leaves the overlay's folder"),
    ("sub/../../x.img", "leaves the overlay's folder"),
])
def test_backing_name_policy_refuses(tmp_path, name, why):
    with pytest.raises(errors.UnsafeBackingReference, match=why):
        naming._check_backing_name(name, str(tmp_path), False)


def test_backing_name_policy_follows_symlinks(tmp_path):
    inside, outside = tmp_path / "repo", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    (inside / "base.img").write_bytes(b"")
    (outside / "other.img").write_bytes(b"")
    os.symlink(inside / "base.img", inside / "in-link")
    os.symlink(outside / "other.img", inside / "out-link")
    os.symlink(outside, inside / "dir-link")
    d = str(inside)
    assert naming._check_backing_name("base.img", d, False) == os.path.join(d, "base.img")
    assert naming._check_backing_name("in-link", d, False) == os.path.join(d, "in-link")
    for name in ("out-link", "dir-link/other.img"):
        with pytest.raises(errors.UnsafeBackingReference, match="resolves outside"):
            naming._check_backing_name(name, d, False)
    # allow_unsafe lifts the policy, not the checks that the name names a file
    assert naming._check_backing_name("out-link", d, True) == os.path.join(d, "out-link")
    assert naming._check_backing_name("/abs/x.img", d, True) == "/abs/x.img"
    with pytest.raises(errors.UnsafeBackingReference):
        naming._check_backing_name("", d, True)


def test_backing_name_policy_caches_the_folders_realpath(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "via")
    cache: dict[str, str] = {}
    d = str(tmp_path / "via")
    os.symlink(real / "a.img", real / "lnk")
    # a plain name that is no link stays in the folder: nothing to resolve
    assert naming._check_backing_name("a.img", d, False, cache) == os.path.join(d, "a.img")
    assert cache == {}
    naming._check_backing_name("lnk", d, False, cache)
    assert cache == {d: str(real)}
    cache[d] = "/nowhere"                     # the cached root is the one used
    with pytest.raises(errors.UnsafeBackingReference, match="resolves outside"):
        naming._check_backing_name("lnk", d, False, cache)


# --- files ----------------------------------------------------------------------------------

def test_os_open_takes_only_regular_files(tmp_path, blank):
    fd = files._os_open(blank, os.O_RDONLY)
    try:
        assert os.get_inheritable(fd) is False
    finally:
        os.close(fd)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(errors.InvalidArgument, match="not a regular file"):
        files._os_open(str(fifo), os.O_RDONLY)     # refused, without blocking on the FIFO
    with pytest.raises(errors.InvalidArgument, match="not a regular file"):
        files._os_open(str(tmp_path), os.O_RDONLY)
    with pytest.raises(errors.ImageNotFound):
        files._os_open(str(tmp_path / "missing"), os.O_RDONLY)


def test_read_head_reads_at_most_the_header_area(tmp_path):
    """The header area is cluster 0 of a QCOW2 file (its size from the header, at most
    2 MiB), else the first 64 KiB; never more, whatever the file's size."""
    def head_of(name: str, first: bytes) -> tuple[int, int]:
        p = tmp_path / name
        with open(p, "wb") as f:
            f.write(first)
            f.truncate(files._HEADER_READ + 4096)
        fd = os.open(p, os.O_RDONLY)
        try:
            head, size = files._read_head(fd, str(p))
        finally:
            os.close(fd)
        assert size == files._HEADER_READ + 4096
        return len(head), int.from_bytes(head[20:24], "big")

    def qcow2(bits: int) -> bytes:
        return fmt.QCOW_MAGIC_BYTES + (3).to_bytes(4, "big") + bytes(12) + \
            bits.to_bytes(4, "big")

    assert head_of("raw", b"")[0] == files._HEAD_FIRST
    assert head_of("c16", qcow2(16)) == (1 << 16, 16)
    assert head_of("c21", qcow2(21)) == (1 << 21, 21)
    assert head_of("c30", qcow2(30))[0] == files._HEADER_READ     # bogus bits: capped


def test_file_length_over_rlimit_fsize_is_refused(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        with pytest.raises(errors.InvalidArgument, match="RLIMIT_FSIZE") as ei:
            files._check_file_length(2 << 20, str(tmp_path), "the size")
        files._check_file_length(1 << 20, str(tmp_path), "the size")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert ei.value.value == 2 << 20
    assert files._fs_max_file_size(str(tmp_path), 1 << 20) is None
    assert os.listdir(tmp_path) == []         # the probe leaves nothing behind


def test_failed_meta_sync_marks_its_error(tmp_path, blank):
    fd = os.open(blank, os.O_RDONLY)
    os.close(fd)                              # a closed descriptor: the sync fails (EBADF)
    with pytest.raises(errors.EngineIOError) as ei:
        metaio.meta_sync(fd, blank)
    assert "cannot sync" in ei.value.message
    assert ei.value.sync_failed is True
    assert ei.value.path == blank


def test_unlink_quietly_ignores_a_missing_file(tmp_path):
    files._unlink_quietly(str(tmp_path / "missing"))


# --- chain ----------------------------------------------------------------------------------

def test_open_options_and_virtual_size(tmp_path):
    o = chain._Options()
    assert (o.backing, o.allow_unsafe_backing, o.max_chain_depth, o.force_share) == \
        (True, False, chain.MAX_CHAIN_DEPTH, False)
    assert dataclasses.replace(o, backing=False).real_dirs is o.real_dirs   # one cache per open
    # QEMU counts the disk in whole sectors: a header size of 1000 is a 512-byte disk
    path = str(tmp_path / "d.qcow2")
    engine.create(path, 1 << 20).close()
    with open(path, "rb") as f:
        h = engine.format.parse_header(f.read(65536), os.path.getsize(path), path=path)
    h = dataclasses.replace(h, size=1000)
    assert (h.disk_size, chain._virtual_size(h)) == (512, 512)


# --- the package's exports ------------------------------------------------------------------

def test_package_exports():
    import engine.image as image_mod
    assert (engine.open, engine.create, engine.Image, engine.Extent) == \
        (image_mod.open, image_mod.create, image_mod.Image, image_mod.Extent)
    assert set(image_mod.__all__) == {"Image", "Extent", "open", "create", "MAX_CHAIN_DEPTH"}
    for name in ("_decompress", "_geometry", "_fs_max_file_size", "_os_open"):
        assert callable(getattr(image_mod, name)), name
    assert not hasattr(engine.Extent, "from_dict")


# --- create: the new file's layout, its sync, and the core's fresh start ----------------------

@pytest.mark.parametrize("size", [1 << 30, 1 << 40])
def test_create_writes_the_layout_allocated(tmp_path, size):
    """A new QCOW2 file holds exactly new_image_layout's bytes, every block of it allocated
    (written pages and fallocated zeros: no hole a write through the mapping could meet on
    a full disk), over a backing image as alone."""
    engine.create(tmp_path / "base.qcow2", size).close()
    for name, backing in (("alone.qcow2", None), ("top.qcow2", "base.qcow2")):
        path = tmp_path / name
        kw = {}
        if backing is not None:
            # the new image is stacked on the open backing image, and owns it
            kw = dict(backing=backing, backing_format="qcow2",
                      backing_image=engine.open(tmp_path / backing, readonly=True))
        with engine.create(path, size, **kw):
            want = fmt.new_image_layout(size, backing_file=backing,
                                        backing_format="qcow2" if backing else None)[1]
            assert path.read_bytes() == want
            assert os.stat(path).st_blocks * 512 >= len(want)


def test_create_not_durable_yet_then_synced(tmp_path):
    """durable=False returns with the sync running; sync_created waits for it, as many
    times as asked (from any thread), and flush and close do too."""
    img = engine.create(tmp_path / "a.qcow2", 1 << 20, durable=False)
    assert img._created is not None
    img.write(0, b"x" * 4096)
    img.sync_created()
    img.sync_created()
    img.flush()
    img.close()
    with engine.open(tmp_path / "a.qcow2", readonly=True) as back:
        assert back.read(0, 4096) == b"x" * 4096
    img = engine.create(tmp_path / "b.qcow2", 1 << 20, durable=False)
    img.close()                                 # waits for the sync, closes its descriptors
    assert img._created.wait() is None
    with pytest.raises(errors.InvalidArgument, match="durable"):
        engine.create(tmp_path / "c.qcow2", 1 << 20, durable="no")
    assert not (tmp_path / "c.qcow2").exists()


def test_core_fresh_start_is_checked(tmp_path):
    """CoreImage(fresh=): for a writable image only, with sorted distinct indexes."""
    img = engine.create(tmp_path / "a.qcow2", 1 << 20)
    img.close()
    h = engine.open(tmp_path / "a.qcow2", readonly=True)
    geo = chain._geometry(h.header, 0)
    h.close()
    fd = os.open(tmp_path / "a.qcow2", os.O_RDWR)
    try:
        with pytest.raises(ValueError, match="writable"):
            engine._core.CoreImage(fd, False, geo, (2,))
        with pytest.raises(ValueError, match="sorted"):
            engine._core.CoreImage(fd, True, geo, (3, 2))
        engine._core.CoreImage(fd, True, geo, (2,)).close()
    finally:
        os.close(fd)
