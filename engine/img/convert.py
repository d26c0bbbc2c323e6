"""``convert``: ``qemu-img convert [-f FMT] [-O FMT] [-o OPTS] [-S SIZE] [-B BACKING -F FMT]
[-n] [-W] SRC DEST`` over :mod:`engine.ops.convert`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from engine import destination as _destination
from engine import ops
from engine.errors import InvalidArgument, UnsupportedFeature
from engine.img._open import format_arg, open_image, unlink_quietly
from engine.img.compress import write_compressed
from engine.img.create import create
from engine.ops._copy import Meter, Progress, runs_total

if TYPE_CHECKING:
    from engine.image import Image

#: qemu-img convert's default ``-S``: all-zero blocks of this size are not written.
DEFAULT_SPARSE = 4096


def convert(src_path: str, dest: str, *, format: str | None = None, out_format: str = "raw",
            options: dict[str, Any] | None = None, compress: bool = False,
            sparse_size: int = DEFAULT_SPARSE, backing: str | None = None,
            backing_format: str | None = None, no_create: bool = False,
            force_share: bool = False, allow_unsafe_backing: bool = False,
            progress: Progress | None = None) -> int:
    """Write the disk SRC_PATH reads (with its chain) into DEST.

    Without ``backing``, ``no_create`` and target options other than ``cluster_size``, this
    is :func:`engine.ops.convert` (a new file written beside DEST and renamed over it).
    Otherwise DEST is made with :func:`engine.img.create` (``-o`` options, ``-B``/``-F``
    backing file), or opened as it is (``no_create``, qemu-img ``-n``), and the data is
    copied into it; with a backing file only the blocks that differ from it are written.

    Arguments:
        sparse_size (int): ``-S``: all-zero blocks of this many bytes are not written
            (0: write every byte of the data ranges).
        compress (bool): ``-c``: compressed clusters (:mod:`engine.img.compress`); a new
            qcow2 target only.

    Returns:
        int: bytes of data written.
    """
    out = format_arg(out_format, "output format") or "raw"
    if compress and out != "qcow2":
        raise InvalidArgument("Compression not supported for this file format", path=dest,
                              hint="use -O qcow2 with -c")
    if compress and (backing is not None or no_create):
        raise UnsupportedFeature("compressed output (-c) here", "-c writes a new qcow2 image "
                                 "(not with -B or -n)", path=dest, hint="")
    if sparse_size < 0 or sparse_size % 512:
        raise InvalidArgument("Invalid buffer size for sparse output specified: a multiple of "
                              "512 bytes is needed", value=sparse_size)
    opts = dict(options or {})
    with open_image(src_path, format=format, force_share=force_share,
                    allow_unsafe_backing=allow_unsafe_backing) as src:
        if compress:
            return _compressed(src, dest, opts, progress)
        if backing is None and not no_create and set(opts) <= {"cluster_size"} \
                and sparse_size == DEFAULT_SPARSE:
            return ops.convert(src, dest, format=out,
                               cluster_size=int(opts.get("cluster_size", 65536)),
                               progress=progress, overwrite=True)
        if not no_create:
            create(dest, src.size, format=out, options=opts, backing=backing,
                   backing_format=backing_format)
        elif not os.path.exists(dest):
            raise InvalidArgument(f"Could not open '{dest}': No such file or directory",
                                  path=dest, hint="-n writes into an existing image; "
                                  "leave -n out to create it")
        with open_image(dest, format=out if not no_create else None, readonly=False) as dst:
            if dst.size < src.size:
                raise InvalidArgument(f"output file is smaller than input file ({dst.size} "
                                      f"< {src.size} bytes)", path=dest)
            written = _copy(src, dst, sparse_size, differ_only=backing is not None,
                            full=no_create, progress=progress)
            dst.flush()
    return written


def _compressed(src: Image, dest: str, opts: dict[str, Any], progress: Progress | None) -> int:
    """``-c``: a new qcow2 file beside DEST, filled with compressed clusters, then renamed
    over DEST under the destination rule of :mod:`engine.destination`."""
    d = _destination.check(dest, overwrite=True)
    tmp = d.temp_path()
    try:
        create(tmp, src.size, format="qcow2", options=opts)
        with open_image(tmp, format="qcow2", readonly=False, backing=False) as out:
            written = write_compressed(src, out, progress)
        d.commit(tmp)
    except BaseException:
        unlink_quietly(tmp)
        raise
    return written


def _copy(src: Image, dst: Image, sparse: int, *, differ_only: bool, full: bool,
          progress: Progress | None) -> int:
    """Copy SRC's data ranges into DST.  ``differ_only``: DST has a backing file; skip the
    blocks that already read the same through it.  ``full``: DST is not new, so zero
    ranges are written as zeros too."""
    runs = [(e.start, e.length, bool(e.zero) and not e.data) for e in src.extents()
            if full or differ_only or (e.data and not e.zero)]
    meter = Meter(runs_total(runs), progress)
    block = max(sparse, dst.cluster_size or 65536) if differ_only else sparse
    written = 0
    for start, length, zero in runs:
        if not differ_only:
            written += ops.copy_runs(src, dst, [(start, length, zero)], meter,
                                     skip_zero_blocks=sparse if not full else 0)
            continue
        pos, end = start, start + length
        while pos < end:
            n = min(ops.CHUNK, end - pos)
            want, have = src.read(pos, n), dst.read(pos, n)
            for off in range(0, n, block):
                piece = want[off:off + block]
                if piece != have[off:off + block]:
                    dst.write(pos + off, piece)
                    written += len(piece)
            pos += n
            meter.add(n)
    meter.finish()
    return written
