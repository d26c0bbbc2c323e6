"""Merging a volume with the one under it, in either direction, planned from one extents
call per volume: a *commit* writes what the top holds down into the base, a *pull* writes
what the base holds (and the top does not) up into the top.  The plan prices both directions
and holds the runs the chosen copy then uses, so nothing is computed twice."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from engine.ops._copy import Meter, Progress, Run, copy_runs, runs_total
from engine.ops.measure import layer_runs
from engine.ops.runs import coalesce, subtract

if TYPE_CHECKING:
    from engine.image import Image


class MergePlan(NamedTuple):
    """What each direction of a merge writes.

    Attributes:
        commit_runs (list of Run): what the top holds (data and zeros), for ``commit``.
        pull_runs (list of Run): what the base holds and the top does not, for ``pull``.
    """

    commit_runs: list[Run]
    pull_runs: list[Run]

    @property
    def commit_bytes(self) -> int:
        return runs_total(self.commit_runs)

    @property
    def pull_bytes(self) -> int:
        return runs_total(self.pull_runs)


def plan_merge(top: Image, base: Image | None, *, keep_zeros: bool = True) -> MergePlan:
    """Plan both directions of merging TOP with BASE, the volume under it.

    Arguments:
        top (Image): the upper volume, opened alone (``backing=False``) or with its chain
            (only what it holds itself counts).
        base (Image | None): the volume under TOP, opened with its chain (None: TOP has no
            backing file; nothing to pull).
        keep_zeros (bool): a pull must also copy the base's zero ranges (False when nothing
            remains under the base, so zeros read as zeros anyway).

    Returns:
        MergePlan: one ``extents`` call on each image answers both directions.
    """
    held = layer_runs(top, 0)
    if base is None:
        return MergePlan(held, [])
    pull = subtract(layer_runs(base, 0, keep_zeros=keep_zeros), held)
    if base.backing is not None and top.header is not None:
        # A pull writes into TOP opened alone: the part of a cluster it does not write then
        # reads zeros, not what the chain under BASE holds there.  Runs that end inside one
        # of TOP's allocation units are widened to whole units (copied as data, read
        # through BASE's chain); in a chain of one cluster size none does.
        grain = top.header.subcluster_size
        if any(s % grain or (s + n) % grain and s + n != base.size for s, n, _ in pull):
            pull = subtract(coalesce(_widened(pull, grain, base.size)), held)
    return MergePlan(held, pull)


def _widened(runs: list[Run], grain: int, size: int) -> list[Run]:
    out: list[Run] = []
    for start, length, zero in runs:
        lo = start // grain * grain
        hi = min(-(-(start + length) // grain) * grain, size)
        out.append((lo, hi - lo, zero and (lo, hi) == (start, start + length)))
    return out


def merge_costs(image: Image, *, keep_zeros: bool = True) -> tuple[int, int]:
    """The two ways to merge IMAGE with its backing volume, priced in guest bytes to write.

    Arguments:
        image (Image): the upper volume, opened with its chain (depth 1 is the volume under).
        keep_zeros (bool): as for :func:`plan_merge`.

    Returns:
        (commit, pull): bytes a commit of IMAGE down into its backing volume writes (all IMAGE
        holds), and bytes a pull of the backing volume up into IMAGE writes (what the backing
        volume holds and IMAGE does not).
    """
    plan = plan_merge(image, image.backing, keep_zeros=keep_zeros)
    return plan.commit_bytes, plan.pull_bytes


def pull(top: Image, base: Image, runs: list[Run], *, progress: Progress | None = None,
         hook: str | None = None) -> int:
    """Write RUNS (``MergePlan.pull_runs``) of BASE into TOP at the same offsets.

    Afterwards TOP reads what the chain TOP→BASE read before, so it can be rebased onto the
    volume under BASE (header only) and BASE removed.  Re-running a partly done pull with a
    new plan copies only what is left (it is idempotent), which crash recovery relies on.

    Arguments:
        top (Image): the upper volume, opened read-write (alone: BASE is open read-write).
        base (Image): the volume under TOP, opened with its chain.
        runs (list of Run): what to copy.
        progress (callable | None): ``progress(done_bytes, total_bytes)``.
        hook (str | None): kill-point name per chunk (crash tests).

    Returns:
        int: bytes processed.
    """
    meter = Meter(runs_total(runs), progress)
    copy_runs(base, top, runs, meter, hook=hook)
    top.flush()
    meter.finish()
    return meter.total
