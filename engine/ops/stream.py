"""Stream (pull): copy what a volume's backing file holds up into the volume itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.ops._copy import Meter, Progress, copy_runs, runs_total
from engine.ops.measure import layer_runs

if TYPE_CHECKING:
    from engine.image import Image


def stream(image: Image, *, depth: int = 1, keep_zeros: bool = True,
           progress: Progress | None = None, hook: str | None = None) -> int:
    """Copy into IMAGE every range it does not hold and layers 1..DEPTH of its chain do.

    Afterwards IMAGE reads the same as before without those layers, so it can be rebased onto
    the layer under them (header only).  Ranges IMAGE already holds are skipped, so re-running
    a partly done stream only copies what is left.

    Arguments:
        image (Image): the volume, opened read-write with its backing chain.
        depth (int): how many backing layers to pull up (1: only the direct backing file).
        keep_zeros (bool): also write zero clusters where those layers hold zeros; pass False
            when nothing will remain underneath (the zeros then read as zeros anyway).
        progress (callable | None): ``progress(done_bytes, total_bytes)``.
        hook (str | None): kill-point name per chunk (crash tests).

    Returns:
        int: bytes processed.
    """
    runs = layer_runs(image, depth, min_depth=1, keep_zeros=keep_zeros)
    meter = Meter(runs_total(runs), progress)
    copy_runs(image, image, runs, meter, hook=hook)
    image.flush()
    meter.finish()
    return meter.total
