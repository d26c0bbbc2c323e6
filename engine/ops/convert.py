"""Convert (export): flatten an image and its chain into one self-contained image."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterator

from engine.ops._copy import Meter, Progress, Run, copy_runs, runs_total

if TYPE_CHECKING:
    from engine.image import Image

#: Granularity of zero detection while exporting: all-zero blocks of this size are not
#: written, so the destination stays sparse (qemu-img convert does the same).
ZERO_BLOCK = 64 << 10


def convert(src: Image, dest: str, *, format: str = "raw", cluster_size: int = 65536,
            progress: Progress | None = None, hook: str | None = None) -> int:
    """Write the whole virtual disk SRC reads into a new image at DEST.

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
    import engine

    runs = [r for r in _data_runs(src)]
    meter = Meter(runs_total(runs), progress)
    kw: dict[str, Any] = {"cluster_size": cluster_size} if format == "qcow2" else {}
    with engine.create(dest, src.size, format=format, **kw) as out:
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
