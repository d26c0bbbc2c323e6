"""The public entry points: :func:`open` and :func:`create`. They check every argument
(InvalidArgument for a bad one), then open through :mod:`engine.image.chain`."""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
from typing import Any

from engine import format as fmt
from engine.errors import InvalidArgument, io_error
from engine.image.chain import MAX_CHAIN_DEPTH, _open_image, _open_over, _Options, _probe_size
from engine.image.files import _check_file_length, _create_file, _CreateSync, _unlink_quietly
from engine.image.image import Image
from engine.image.naming import _check_backing_name, _path_arg


def open(path: Any, *, format: str | None = None, readonly: bool = False, backing: bool = True,
         allow_unsafe_backing: bool = False, max_chain_depth: int = MAX_CHAIN_DEPTH,
         force_share: bool = False) -> Image:
    """Open an image and (by default) its backing chain, read-only below the top.

    Arguments:
        path (str | os.PathLike): the image file.
        format (str | None): "qcow2" or "raw"; None means qcow2 if the file starts with the
            QCOW2 magic, raw otherwise (top level only: backing files use the format recorded
            in their overlay, never a guess).
        readonly (bool): open read-only.
        backing (bool): open the backing chain (reads of unallocated clusters then fall
            through); False reads them as zeros.
        allow_unsafe_backing (bool): follow absolute, ``..`` and protocol backing names.
        max_chain_depth (int): refuse deeper chains (ChainError).
        force_share (bool): read-only open that shares every permission (qemu's -U).

    Raises:
        ImageNotFound, ImageFormatError, UnsupportedFeature, CorruptImage,
        SafetyLimitExceeded, ChainError, UnsafeBackingReference, ImageLocked, EngineIOError.
    """
    path = _path_arg(path)
    format = fmt.choice_arg(format, "format", fmt.FORMATS, optional=True)
    for name, value in (("readonly", readonly), ("backing", backing),
                        ("allow_unsafe_backing", allow_unsafe_backing),
                        ("force_share", force_share)):
        fmt.bool_arg(value, name)
    max_chain_depth = fmt.int_arg(max_chain_depth, "max_chain_depth")
    if force_share and not readonly:
        raise InvalidArgument("force_share needs readonly=True")
    opts = _Options(backing=backing, allow_unsafe_backing=allow_unsafe_backing,
                    max_chain_depth=max_chain_depth, force_share=force_share)
    return _open_image(Image, path, format, readonly, opts)


def create(path: Any, size: int | None, *, format: str = "qcow2", cluster_size: int = 65536,
           backing: str | None = None, backing_format: str | None = None, compat: str = "1.1",
           refcount_bits: int = 16, lazy_refcounts: bool = False, extended_l2: bool = False,
           overwrite: bool = False, allow_unsafe_backing: bool = False,
           backing_image: Image | None = None, durable: bool = True) -> Image:
    """Create an image (laid out exactly as ``qemu-img create`` lays it out) and open it
    read-write.

    Every argument and every limit is checked before the file is made (the size against
    the format's maximum, ``RLIMIT_FSIZE`` and the filesystem's largest file); a create that
    raises leaves no file and no open descriptor behind.

    Arguments:
        path: the new file. It must not exist unless ``overwrite=True``.
        size (int | None): virtual size in bytes (rounded up to 512 for qcow2); None takes
            the backing file's size.
        format (str): "qcow2" or "raw".
        cluster_size (int): bytes, a power of two from 512 to 2 MiB (qcow2).
        backing (str | None): backing file name, relative to the new file's folder.
        backing_format (str): "raw" or "qcow2"; required with ``backing`` (never probed).
        compat, refcount_bits, lazy_refcounts, extended_l2: as ``qemu-img create -o``.
        overwrite (bool): replace an existing file.
        allow_unsafe_backing (bool): follow absolute, ``..`` and protocol backing names.
        backing_image (Image | None): the file ``backing`` names, already open read-only
            with its chain: the new image is stacked on it instead of opening the chain
            again (one file is opened, whatever the depth), and owns it once created
            (closing the new image closes it).  If create raises, the caller closes
            it (it may be closed already; closing again does nothing).
        durable (bool): return only once the new file and its name are durable (the
            default).  False: return as soon as the image is open, the sync still running
            on a helper thread; ``Image.sync_created()`` waits for it (so do ``flush`` and
            ``close``).  What lets a caller overlap that sync with its own work, such as
            recording the new file in a catalog, before it commits.

    Raises:
        InvalidArgument (a bad argument; a size over a limit, with the limit in the message),
        ImageNotFound (no such folder, or no backing file), UnsafeBackingReference,
        SafetyLimitExceeded (a backing name too long for the header), EngineIOError, and what
        :func:`open` raises for the backing chain.
    """
    path = _path_arg(path)
    format = fmt.choice_arg(format, "format", fmt.FORMATS)
    cluster_size = fmt.cluster_size_arg(cluster_size)
    for name, value in (("lazy_refcounts", lazy_refcounts), ("extended_l2", extended_l2),
                        ("overwrite", overwrite), ("allow_unsafe_backing", allow_unsafe_backing),
                        ("durable", durable)):
        fmt.bool_arg(value, name)
    bdir = os.path.dirname(path) or "."
    if backing is not None:
        if format != "qcow2":
            raise InvalidArgument("only qcow2 images can have a backing file")
        if not isinstance(backing, str):
            raise InvalidArgument(f"backing must be a str or None, not {type(backing).__name__}",
                                  value=backing)
        if backing_format is None:
            raise InvalidArgument("backing file specified without backing format; cowchain "
                                  "never probes a format", hint="pass backing_format='raw' or 'qcow2'")
        fmt.choice_arg(backing_format, "backing format", fmt.FORMATS)
        full = _check_backing_name(backing, bdir, allow_unsafe_backing)
        if backing_image is not None:
            _check_backing_image(backing_image, full, backing_format)
        if size is None:
            size = _probe_size(full, backing_format)
    elif backing_format is not None:
        raise InvalidArgument("a backing format without a backing file", value=backing_format)
    elif backing_image is not None:
        raise InvalidArgument("a backing image without a backing file name")
    if size is None:
        raise InvalidArgument("a size is required (None takes the backing file's size, and "
                              "there is no backing file)")
    # every check before the file exists: a refused create leaves nothing behind
    size = fmt.check_virtual_size(size, format, cluster_size=cluster_size,
                                  extended_l2=extended_l2)
    if format == "qcow2":
        header, length, pages, refblocks = _layout(size, cluster_size, compat,
                                                   refcount_bits, lazy_refcounts, backing,
                                                   backing_format, extended_l2)
        _check_file_length(length, bdir, "the new file's size")
    else:
        _check_file_length(size, bdir, "virtual size")
    fd = _create_file(path, overwrite)
    try:
        if format == "qcow2":
            _write_layout(fd, length, pages)
        else:
            os.ftruncate(fd, size)
    except BaseException as e:
        os.close(fd)
        _unlink_quietly(path)
        if isinstance(e, OSError):
            raise io_error(e.errno or errno.EIO, "cannot write the new image",
                           path=path) from None
        raise
    # Make the file and its name durable on a helper thread while this one opens the image
    # (the two overlap: an open costs about as much CPU as the fdatasync waits); create()
    # returns only after both syncs are done, unless the caller waits for them later.
    try:
        sync = _CreateSync(fd, bdir)
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    try:
        if backing_image is not None:
            assert backing is not None              # checked with the other arguments
            # the file just written is not read back: the image takes a descriptor of it
            # and the header it was written from
            img = _open_over(Image, path, format,
                             _Options(allow_unsafe_backing=allow_unsafe_backing),
                             backing_image, os.path.join(bdir, backing),
                             new=(fd, header, refblocks))
        else:
            img = open(path, format=format, allow_unsafe_backing=allow_unsafe_backing)
    except BaseException:
        # the backing chain (checked whole only now) is unusable: leave nothing behind
        sync.wait()
        _unlink_quietly(path)
        raise
    if not durable:
        img._created = sync
        return img
    err = sync.wait()
    if err is not None:
        img.close()
        _unlink_quietly(path)
        raise io_error(err.errno or errno.EIO, "cannot write the new image",
                       path=path) from None
    return img


#: Layouts of new QCOW2 files (``fmt.new_image_layout``) by their options and the length of
#: their backing name; a few, as a process makes overlays of a few geometries.
_LAYOUTS: dict[tuple[Any, ...], tuple[fmt.Header, int, list[tuple[int, bytes]],
                                      tuple[int, ...]]] = {}
_LAYOUTS_KEPT = 32

#: A new file's content is written as the pages of this size that are not all zero (the
#: header, the first refcount table and block entries); the rest is allocated, not written.
_LAYOUT_PAGE = 4096


def _layout(size: int, cluster_size: int, compat: str, refcount_bits: int,
            lazy_refcounts: bool, backing: str | None, backing_format: str | None,
            extended_l2: bool) -> tuple[fmt.Header, int, list[tuple[int, bytes]],
                                        tuple[int, ...]]:
    """``fmt.new_image_layout`` of these options, from a template, as (header, file length,
    [(offset, bytes)] of the pages that are not all zero, the cluster indexes of the
    refcount blocks, sorted).  Two new files with the same options and backing names of the
    same length differ only in the bytes of the name, at the header's
    ``backing_file_offset`` (in the first page).  Every overlay of a chain has the same
    options and a name of the same length, so a snapshot lays out no file; the template was
    laid out (and every option checked) by the first."""
    name = None if backing is None else fmt.encode_name(backing, "backing file name")
    # typed: a value equal to a valid one but of another type (16.0) is refused by the
    # layout, never served from a template
    key = tuple((type(v), v) for v in (size, cluster_size, compat, refcount_bits,
                                       lazy_refcounts, backing_format, extended_l2,
                                       None if name is None else len(name)))
    kept = _LAYOUTS.get(key)
    if kept is None:
        h, data = fmt.new_image_layout(
            size, cluster_size=cluster_size, compat=compat, refcount_bits=refcount_bits,
            lazy_refcounts=lazy_refcounts, backing_file=backing,
            backing_format=backing_format, extended_l2=extended_l2)
        pages = [(at, data[at:at + _LAYOUT_PAGE]) for at in range(0, len(data), _LAYOUT_PAGE)
                 if data.count(0, at, at + _LAYOUT_PAGE) != len(data[at:at + _LAYOUT_PAGE])]
        assert pages and pages[0][0] == 0       # the header page: magic, never all zero
        rt = h.refcount_table_offset
        entries = memoryview(data)[rt:rt + (h.refcount_table_clusters << h.cluster_bits)]
        refblocks = tuple(sorted({(e & fmt.REFT_OFFSET_MASK) >> h.cluster_bits
                                  for (e,) in struct.iter_unpack(">Q", entries) if e}))
        kept = (h, len(data), pages, refblocks)
        if len(_LAYOUTS) >= _LAYOUTS_KEPT:
            _LAYOUTS.clear()
        _LAYOUTS[key] = kept
    h, length, pages, refblocks = kept
    if name is not None and h.backing_file != backing:
        at = h.backing_file_offset
        first = pages[0][1]
        assert at + len(name) <= len(first)   # the header ends in the first page
        pages = [(0, first[:at] + name + first[at + len(name):]), *pages[1:]]
    return dataclasses.replace(h, backing_file=backing, feature_table=list(h.feature_table),
                               unknown_extensions=list(h.unknown_extensions)), length, pages, \
        refblocks


def _write_layout(fd: int, length: int, pages: list[tuple[int, bytes]]) -> None:
    """Give the new file FD its LENGTH bytes, allocated (so that no later write through a
    mapping meets a hole on a full disk), and write its PAGES; the rest reads as zeros.
    Where the filesystem cannot allocate without writing, the zeros are written."""
    try:
        os.posix_fallocate(fd, 0, length)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.pwrite(fd, bytes(length), 0)
    for at, page in pages:
        if os.pwrite(fd, page, at) != len(page):
            raise OSError(errno.EIO, "short write")


def _check_backing_image(img: Any, full: str, backing_format: str) -> None:
    """``create``'s backing_image: an open read-only Image of the file FULL, in that format."""
    if not isinstance(img, Image):
        raise InvalidArgument(f"backing_image must be an open Image, not {type(img).__name__}")
    if img.closed or not img.readonly:
        raise InvalidArgument("backing_image must be open read-only", path=img.path)
    if img.format != backing_format:
        raise InvalidArgument(f"backing_image is {img.format}, not {backing_format}",
                              path=img.path)
    try:
        same = os.path.samestat(os.fstat(img._fd), os.stat(full))
    except OSError:
        same = False
    if not same:
        raise InvalidArgument("backing_image is not the file the backing name names",
                              path=img.path, value=full)
