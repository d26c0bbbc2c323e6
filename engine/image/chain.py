"""Opening images: one file (descriptor, header, snapshot table, lock, what QEMU does before
the first write, the core's mapping) and, level by level, the backing chain under it.

This module builds :class:`~engine.image.image.Image` objects without importing the class:
the caller passes it (``image_cls``), because the class itself calls back in here to reload
and rebase.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import TYPE_CHECKING

from engine import _core
from engine import check as _check
from engine import format as fmt
from engine.errors import ChainError, CorruptImage, InvalidArgument, UnsafeBackingReference, \
    UnsupportedFeature, io_error
from engine.image.files import _fd_headroom, _os_open, _read_head
from engine.metaio import meta_write as _meta_write
from engine.image.locks import _Lock
from engine.image.naming import _check_backing_name

if TYPE_CHECKING:
    from engine.image.image import Image

#: Deepest backing chain we open by default (each level costs one file descriptor and one
#: mapping; reads recurse once per level on a miss).
MAX_CHAIN_DEPTH = 1024


@dataclasses.dataclass
class _Options:
    """How an image and its chain were opened (kept by the image: a reload and a rebase open
    the chain again the same way)."""

    backing: bool = True                 # open the backing chain at all
    allow_unsafe_backing: bool = False   # follow names the backing-name policy refuses
    max_chain_depth: int = MAX_CHAIN_DEPTH
    force_share: bool = False            # qemu's -U: take only the consistent-read lock
    #: realpath of each overlay folder met during an open (see _check_backing_name)
    real_dirs: dict[str, str] = dataclasses.field(default_factory=dict)


def _virtual_size(h: fmt.Header) -> int:
    """The disk's size as QEMU counts it (:attr:`engine.qcow2.header.Header.disk_size`)."""
    return h.disk_size


def _geometry(h: fmt.Header, snap_size: int = 0) -> _core.Geometry:
    """What the core needs of a QCOW2 header to map the image."""
    return _core.Geometry(
        cluster_bits=h.cluster_bits, size=_virtual_size(h), version=h.version,
        l1_table_offset=h.l1_table_offset, l1_size=h.l1_size,
        refcount_table_offset=h.refcount_table_offset,
        refcount_table_clusters=h.refcount_table_clusters,
        refcount_order=h.refcount_order, extended_l2=bool(h.extended_l2),
        compression_type=h.compression_type,
        snapshots_offset=h.snapshots_offset if h.nb_snapshots else 0,
        snapshots_size=snap_size)


def _open_image(image_cls: type[Image], path: str, format: str | None, readonly: bool,
                opts: _Options, seen: set[tuple[int, int]] | None = None) -> Image:
    """Open ``path`` and (by ``opts``) its backing chain; ``seen`` holds the (device, inode)
    of the files a loop must not come back to."""
    seen = set() if seen is None else seen
    top = _open_one(image_cls, path, format, readonly, opts, seen)
    try:
        _attach_chain(top, opts, seen)
    except BaseException:
        top._release()
        raise
    return top


def _open_over(image_cls: type[Image], path: str, format: str, opts: _Options,
               below: Image, below_path: str, new: _NewFile | None = None) -> Image:
    """Open ``path`` read-write with ``below`` (open, read-only, with its own chain: the file
    the header of ``path`` names, as the caller checked) linked under it as its backing
    chain: one file is opened, whatever the chain's depth.  NEW: as for ``_open_one``, but
    its descriptor stays the caller's (the image takes a duplicate)."""
    if below.chain_depth > opts.max_chain_depth:
        raise ChainError(f"backing chain deeper than {opts.max_chain_depth} images",
                         path=path, hint="pass a larger max_chain_depth if the chain is "
                         "meant to be this deep")
    if new is not None:
        new = (os.dup(new[0]), new[1], new[2])
    top = _open_one(image_cls, path, format, False, opts, set(), new)
    top._backing = below
    top._backing_path = below_path
    top._core.set_backing(below._core)
    top._core.enable_owner_map()
    return top


def _attach_chain(top: Image, opts: _Options, seen: set[tuple[int, int]]) -> None:
    """Open the backing chain of ``top`` read-only, by policy, level by level (a loop, not
    recursion: chains may be deeper than Python's recursion limit), then link the cores."""
    images = [top]
    try:
        cur = top
        while opts.backing:
            h = cur._header
            if h is None or h.backing_file is None:
                break
            name = h.backing_file
            full = _check_backing_name(name, os.path.dirname(cur._path) or ".",
                                       opts.allow_unsafe_backing, opts.real_dirs)
            if h.backing_format is None:
                raise UnsafeBackingReference(
                    name, f"backing file {name!r} has no recorded format; cowchain never "
                    "guesses a format", path=cur._path,
                    hint="record it with 'qemu-img rebase -u -b NAME -F FMT'")
            if h.backing_format not in ("raw", "qcow2"):
                raise UnsupportedFeature(f"backing format {h.backing_format}", path=cur._path)
            if len(images) > opts.max_chain_depth:
                raise ChainError(f"backing chain deeper than {opts.max_chain_depth} images",
                                 path=top._path, hint="pass a larger max_chain_depth if the "
                                 "chain is meant to be this deep")
            if len(images) % 64 == 0:
                _fd_headroom(len(images) + 64)
            b = _open_one(type(top), full, h.backing_format, True, opts, seen)
            cur._backing = b
            cur._backing_path = full
            images.append(b)
            cur = b
    except BaseException:
        for img in images[1:]:
            img._release()
        top._backing = None
        raise
    for a, b in zip(images[-2::-1], images[:0:-1]):
        a._core.set_backing(b._core)
    top._core.enable_owner_map()


#: A QCOW2 file ``create`` has just written: a read-write descriptor of it (the image opened
#: on it takes it over), its header and the cluster indexes of its refcount blocks (sorted;
#: its L1 is all zero), known without reading the file back.
_NewFile = tuple[int, fmt.Header, tuple[int, ...]]


def _open_one(image_cls: type[Image], path: str, format: str | None, readonly: bool,
              opts: _Options, seen: set[tuple[int, int]], new: _NewFile | None = None) -> Image:
    """Open one file (no backing chain): descriptor, header, policy, lock, mapping.  NEW:
    the file was just made by ``create`` (read-write, qcow2): its descriptor and header are
    taken as they are, and nothing is read back."""
    fd = _os_open(path, os.O_RDONLY if readonly else os.O_RDWR) if new is None else new[0]
    core = None
    try:
        header: fmt.Header | None = None
        snap_size = 0
        if new is not None:
            format, header = "qcow2", new[1]
        else:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                raise ChainError("backing chain loops back to an image already in the "
                                 "chain", path=path)
            seen.add(key)
            head, size = _read_head(fd, path)
            if format is None:
                format = "qcow2" if head[:4] == fmt.QCOW_MAGIC_BYTES else "raw"
            if format not in ("raw", "qcow2"):
                raise InvalidArgument(f"unknown format {format!r} (use 'raw' or 'qcow2')")
            if format == "qcow2":
                header = fmt.parse_header(head, size, path=path)
                snap_size = _validate_snapshots(fd, path, header, size)
        lock = _Lock(fd, path, not readonly, opts.force_share)
        if header is not None and not readonly and new is None:
            header = _prepare_rw(fd, path, header, size)
        try:
            core = _core.CoreImage(fd, not readonly,
                                   _geometry(header, snap_size) if header is not None else None,
                                   new[2] if new is not None else None)
        except ValueError as e:
            raise CorruptImage(str(e), path=path) from None
        except OSError as e:
            raise io_error(e.errno or errno.EIO, "cannot map the image", path=path) from None
        img = image_cls._new(path, fd, format, header, core, None, readonly, lock, None)
        img._opts = opts
        return img
    except BaseException:
        if core is not None:
            core.close()
        os.close(fd)
        raise


def _validate_snapshots(fd: int, path: str, h: fmt.Header, size: int) -> int:
    """QEMU reads the snapshot table at open and refuses a bad one; so do we. Returns its
    size in bytes."""
    if not h.nb_snapshots:
        return 0
    want = 4096
    while True:
        buf = os.pread(fd, min(want, max(0, size - h.snapshots_offset)), h.snapshots_offset)
        n = fmt.snapshot_table_size(buf, h, path=path)
        if n <= len(buf):
            break
        if len(buf) < want:
            raise CorruptImage("snapshot table runs past the end of the file", path=path)
        # grow geometrically: the size is learnt entry by entry, and a hostile count must
        # not make this quadratic (bounded by QEMU's 64 MiB table limit)
        want = min(max(n, want * 4), fmt.MAX_SNAPSHOTS_SIZE)
    fmt.parse_snapshot_table(buf[:n], h, file_size=size, path=path)
    return n


def _prepare_rw(fd: int, path: str, h: fmt.Header, size: int) -> fmt.Header:
    """What QEMU does before the first write: refuse a corrupt image, repair a dirty one,
    drop autoclear bits we do not maintain (the bitmaps extension then no longer counts)."""
    if h.corrupt:
        raise CorruptImage("the image is marked corrupt; it may only be opened read-only",
                           path=path, hint="run check(repair='all') in a repair tool, or "
                           "'qemu-img check -r all'")
    if h.dirty:
        res = _check.check_file(fd, filename=path, repair="all")
        if res.corruptions or res.check_errors:
            raise CorruptImage("could not repair the dirty image", path=path)
        head, size = _read_head(fd, path)
        h = fmt.parse_header(head, size, path=path)
    if h.version >= 3 and h.autoclear_features:
        h.autoclear_features = 0
        h.bitmaps_ext = None
        _meta_write(fd, fmt.encode_header(h), 0, path)
        head, size = _read_head(fd, path)
        h = fmt.parse_header(head, size, path=path)
    return h


def _probe(path: str, format: str) -> tuple[fmt.Header | None, int]:
    """The header of an image (None for raw) and its file's size, from its header alone."""
    fd = _os_open(path, os.O_RDONLY)
    try:
        head, size = _read_head(fd, path)
    finally:
        os.close(fd)
    return (None if format == "raw" else fmt.parse_header(head, size, path=path)), size


def _probe_size(path: str, format: str) -> int:
    """The virtual size of an image from its header alone (create's size=None)."""
    h, size = _probe(path, format)
    return size if h is None else _virtual_size(h)


def probe_header(path: str, format: str) -> fmt.Header | None:
    """The header of the image at PATH (None for raw), read from the file alone: no lock,
    no backing chain, no mapping."""
    return _probe(path, format)[0]
