"""The one copy loop every bulk operation uses: runs in, the core's bulk copy out.

A *run* is ``(start, length, zero)``: a byte range of the guest disk and whether it reads as
zeros.  Data runs are copied by the compiled core (``engine._core.copy_runs``): per cluster it
works without the GIL, writes from the source's mapping, skips all-zero blocks of a new
destination and starts writeback as it goes; Python is crossed once per chunk of
:data:`CHUNK` bytes (progress, kill point) and once per zero run, which becomes one
``write_zeroes`` call (a flag in the L2 table, no data).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from engine import _core
from engine.ops._hooks import kill_point

if TYPE_CHECKING:
    from engine.image import Image

#: Bytes per read/write call in bulk copies: big enough that the per-call overhead is noise,
#: small enough that a progress bar moves and a kill test has several chunks to stop in.
CHUNK = 8 << 20

Progress = Callable[[int, int], None]
Run = tuple[int, int, bool]


class Meter:
    """Counts bytes done against a total and reports them to an optional callback.

    Arguments:
        total (int): bytes the operation will process.
        progress (callable | None): ``progress(done_bytes, total_bytes)``, called after each
            chunk and once at the end.
    """

    __slots__ = ("total", "done", "progress")

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total = total
        self.done = 0
        self.progress = progress

    def add(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.total, self.total)


def runs_total(runs: Sequence[Run]) -> int:
    return sum(r[1] for r in runs)


def copy_runs(src: Image, dst: Image, runs: Iterable[Run], meter: Meter, *, hook: str | None = None,
              skip_zero_blocks: int = 0, chunk: int = CHUNK) -> int:
    """Copy RUNS from image SRC to image DST at the same guest offsets.

    Arguments:
        src, dst (Image): open images (they may be the same object: a stream into itself).
        runs (iterable of (start, length, zero)): byte ranges in guest order; zero runs are
            written with ``dst.write_zeroes`` (or skipped when ``skip_zero_blocks`` is set:
            the destination is new and reads zeros already).
        meter (Meter): progress accounting.
        hook (str | None): kill-point name passed once per chunk and once per zero run
            (crash tests).
        skip_zero_blocks (int): when > 0 (a power of two), data is checked in blocks of this
            many bytes (aligned to the guest offset) and all-zero blocks are not written (a
            sparse destination stays sparse).
        chunk (int): bytes per step of a data run.

    Returns:
        int: bytes written as data.

    Nothing is flushed here: the caller's ``flush`` makes the copy durable.
    """
    def step(start: int, length: int, zero: bool) -> None:
        if zero and not skip_zero_blocks:
            dst.write_zeroes(start, length)
        meter.add(length)
        if hook:
            kill_point(hook)

    rows = list(runs)
    if not rows:
        return 0
    return _core.copy_runs(dst._core, src._core, rows, skip_zero_blocks, chunk, step)


def nonzero_blocks(view: memoryview, block: int) -> list[tuple[int, int]]:
    """The runs of VIEW that hold a non-zero byte, at BLOCK granularity: [(offset, length)].

    For callers holding a buffer (tests use it as an oracle); the copies above skip zero
    blocks inside the core, while copying.  Vectorised with numpy: a Python step per *run*.
    """
    import numpy as np

    n = len(view)
    if n == 0:
        return []
    if block % 8 == 0 and n % 8 == 0:
        words = np.frombuffer(view, dtype=np.uint64, count=n // 8)
        per = block // 8
    else:
        words = np.frombuffer(view, dtype=np.uint8, count=n)
        per = block
    full = len(words) // per
    tail = len(words) - full * per
    flags = np.zeros(full + (1 if tail else 0) + 2, dtype=np.int8)
    if full:
        flags[1:full + 1] = words[:full * per].reshape(full, per).any(axis=1)
    if tail:
        flags[full + 1] = bool(words[full * per:].any())
    edges = np.diff(flags)
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return [(int(s) * block, min(int(e) * block, n) - int(s) * block)
            for s, e in zip(starts, ends)]
