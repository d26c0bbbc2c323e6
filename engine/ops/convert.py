"""Convert (export): flatten an image and its chain into one self-contained image."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterator

from engine import destination as _destination
from engine.errors import InvalidArgument, io_error
from engine.image import create as create_image
from engine.ops._copy import CHUNK, Meter, Progress, Run, copy_runs, runs_total

if TYPE_CHECKING:
    from engine.image import Image

#: Granularity of zero detection while exporting: all-zero blocks of this size are not
#: written, so the destination stays sparse (qemu-img convert does the same).
ZERO_BLOCK = 64 << 10


def convert(src: Image, dest: str | int, *, format: str = "raw", cluster_size: int = 65536,
            progress: Progress | None = None, hook: str | None = None,
            overwrite: bool = False, output_device: bool = False) -> int:
    """Write the whole virtual disk SRC reads to DEST, under the destination rule of
    :mod:`engine.destination` (never into a repository, a file in use or through a link).

    DEST is a path: a new file, or an existing regular file with ``overwrite=True`` (both
    written beside DEST and renamed over it, so DEST is complete or untouched), or an existing
    block device with ``output_device=True`` (raw, written in place, zeros included).  DEST
    may also be an open file descriptor (standard output): the raw disk is written to it
    sequentially, zeros included.

    Returns:
        int: bytes written as data.

    Raises:
        UnsafeDestination, InvalidArgument, NotFound: see :func:`engine.destination.check`.
    """
    if isinstance(dest, int) or output_device:
        if format != "raw":
            raise InvalidArgument("a device or a stream gets a raw disk; write qcow2 to a file",
                                  hint="use format='raw'")
        if isinstance(dest, int):
            _destination.check_fd(dest)
            return write_raw(src, dest, progress=progress, positional=False)
        d = _destination.check(dest, device=True)
        try:
            fd = os.open(d.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise io_error(e.errno or 0, "cannot open the device", path=d.path) from None
        try:
            return write_raw(src, fd, progress=progress, positional=True)
        finally:
            os.close(fd)
    d = _destination.check(dest, overwrite=overwrite)
    tmp = d.temp_path()
    try:
        written = convert_new(src, tmp, format=format, cluster_size=cluster_size,
                              progress=progress, hook=hook)
        d.commit(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return written


def write_raw(src: Image, fd: int, *, progress: Progress | None = None,
              positional: bool = True) -> int:
    """Write every byte of SRC's virtual disk, zeros included, to FD (a device or a stream),
    then fsync it where that applies. Returns the bytes written."""
    size = src.size
    if positional:
        end = os.lseek(fd, 0, os.SEEK_END)
        if end < size:
            raise InvalidArgument(f"the device holds {end} bytes, less than the disk's {size}")
    meter = Meter(size, progress)
    buf = bytearray(min(CHUNK, size) or 1)
    view = memoryview(buf)
    pos = 0
    try:
        while pos < size:
            n = min(len(buf), size - pos)
            src.readinto(pos, view[:n])
            done = 0
            while done < n:
                if positional:
                    done += os.pwrite(fd, view[done:n], pos + done)
                else:
                    done += os.write(fd, view[done:n])
            pos += n
            meter.add(n)
        if positional:
            os.fsync(fd)
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            raise
        raise io_error(e.errno or 0, "cannot write the disk") from None
    meter.finish()
    return size


def convert_new(src: Image, dest: str, *, format: str = "raw", cluster_size: int = 65536,
                progress: Progress | None = None, hook: str | None = None) -> int:
    """Write the whole virtual disk SRC reads into a new image at DEST (no destination rule:
    the callers are the repository, writing into its own folder, and :func:`convert`).

    Only ranges the chain maps as data are read; zero and unallocated ranges are left
    unwritten (a new image reads zeros there), and all-zero blocks inside data ranges are
    skipped too.  The destination is flushed to disk before this returns.

    Arguments:
        src (Image): the image to flatten, open (read-only is enough) with its chain.
        dest (str): path of the new file; it must not exist.
        format (str): "raw" or "qcow2".
        cluster_size (int): cluster size of a qcow2 destination, bytes.
        progress (callable | None): ``progress(done_bytes, total_bytes)``.
        hook (str | None): kill-point name per chunk (crash tests).

    Returns:
        int: bytes of data written.
    """
    runs = [r for r in _data_runs(src)]
    meter = Meter(runs_total(runs), progress)
    kw: dict[str, Any] = {"cluster_size": cluster_size} if format == "qcow2" else {}
    with create_image(dest, src.size, format=format, **kw) as out:
        written = copy_runs(src, out, runs, meter, hook=hook,
                            skip_zero_blocks=min(ZERO_BLOCK, cluster_size)
                            if format == "qcow2" else ZERO_BLOCK)
        out.flush()
    # The file is closed: make its size and data durable before any rename publishes it.
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    meter.finish()
    return written


def _data_runs(src: Image) -> Iterator[Run]:
    for e in src.extents():
        if e.data and not e.zero:
            yield (e.start, e.length, False)
