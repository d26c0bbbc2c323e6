"""Commit: copy what a top volume holds down into its backing volume."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.ops._copy import Meter, Progress, Run, copy_runs, runs_total
from engine.ops.measure import layer_runs

if TYPE_CHECKING:
    from engine.image import Image


def commit(top: Image, base: Image, *, progress: Progress | None = None, hook: str | None = None,
           runs: list[Run] | None = None) -> int:
    """Write every range TOP holds (data and zero clusters) into BASE at the same offsets.

    A BASE smaller than TOP is grown to TOP's size first.  Afterwards BASE reads what the
    chain TOP→BASE read before, so overlays of TOP can be
    rebased onto BASE (header only) and TOP removed.  Ranges TOP does not hold are not
    touched.  Re-running a partly done commit gives the same result (it is idempotent), which
    is what crash recovery relies on.

    Arguments:
        top (Image): the upper volume, opened *without* its backing chain
            (``backing=False``: BASE must not be open read-only while we write it).
        base (Image): the volume under TOP, opened read-write.
        progress (callable | None): ``progress(done_bytes, total_bytes)``.
        hook (str | None): kill-point name per chunk (crash tests).
        runs (list of Run | None): what TOP holds, when the caller has it already
            (``MergePlan.commit_runs``); None reads it from TOP's extents.

    Returns:
        int: bytes processed (data copied plus zero ranges written).
    """
    if base.size < top.size:
        base.resize(top.size)           # the disk grew after BASE was frozen (Chain.resize)
    if runs is None:
        runs = layer_runs(top, 0)
    meter = Meter(runs_total(runs), progress)
    copy_runs(top, base, runs, meter, hook=hook)
    base.flush()
    meter.finish()
    return meter.total
