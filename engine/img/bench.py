"""``bench``: what ``qemu-img bench`` measures, plus random offsets, read/write mixes,
threads, a fixed duration, latency percentiles and JSON output."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from engine.errors import InvalidArgument
from engine.img._open import open_image


@dataclass
class BenchResult:
    """What a run measured.

    Attributes:
        requests (int): requests completed.   bytes (int): bytes moved.
        seconds (float): wall time of the run.
        reads, writes (int): requests of each kind.
        latencies_us (dict): percentile name ("p50", "p90", "p99", "max") -> microseconds.
    """

    requests: int
    bytes: int
    seconds: float
    reads: int
    writes: int
    latencies_us: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        s = self.seconds or 1e-9
        return {"requests": self.requests, "bytes": self.bytes, "seconds": self.seconds,
                "reads": self.reads, "writes": self.writes, "iops": self.requests / s,
                "bytes-per-second": self.bytes / s, "latency-us": self.latencies_us}

    def to_text(self) -> str:
        return f"Run completed in {self.seconds:.3f} seconds.\n"


def request_plan(disk: int, count: int, size: int, step: int, offset: int,
                 random_offsets: bool, seed: int, write_ratio: float) -> list[tuple[int, bool]]:
    """The requests of a run: (offset, is_write) pairs.

    Offsets are those QEMU 7.2's ``qemu-img bench`` visits: OFFSET first, then each one STEP
    further, taken modulo the disk size (``b->offset %= b->image_size``), so a step that is
    not a divisor of the disk walks a different set of offsets on each pass.  With
    ``random_offsets`` they are drawn at random, aligned to SIZE, from a seeded generator
    (which also draws, per request, whether it writes, with probability WRITE_RATIO).

    Raises:
        InvalidArgument: a request would pass the end of the disk (qemu-img bench fails
            that request with an I/O error).
    """
    rng = random.Random(seed)
    plan = []
    pos = offset
    for _ in range(count):
        if random_offsets:
            off = rng.randrange(0, (disk - size) // size + 1) * size
        else:
            off = pos
            pos = (pos + step) % disk if disk else 0
        if off + size > disk:
            raise InvalidArgument(f"request at offset {off} of {size} bytes passes the end of "
                                  f"the disk ({disk} bytes)", value=off,
                                  hint="choose -o/-S/-s so that every request fits")
        plan.append((off, rng.random() < write_ratio))
    return plan


def bench(path: str, *, format: str | None = None, count: int = 75000, depth: int = 64,
          size: int = 4096, step: int | None = None, offset: int = 0, write: bool = False,
          pattern: int = 0xA5, random_offsets: bool = False, seed: int = 0,
          write_ratio: float | None = None, threads: int = 1,
          duration: float | None = None, force_share: bool = False,
          allow_unsafe_backing: bool = False) -> BenchResult:
    """Run ``count`` requests of ``size`` bytes against PATH (with its chain), as
    ``qemu-img bench -c COUNT -d DEPTH -s SIZE -S STEP -o OFFSET [-w] [--pattern P]``.

    Offsets are :func:`request_plan`'s: qemu-img bench's sequence, or random ones.
    ``write_ratio`` mixes reads and writes (0.0-1.0; default: all writes with ``write``,
    else all reads).  ``threads`` workers share the requests (DEPTH is accepted for the
    command line and bounds nothing: each worker has one request in flight).  ``duration``
    stops after that many seconds instead of after COUNT requests.  Writes change the image.
    """
    if size <= 0 or count < 0 or threads < 1:
        raise InvalidArgument("size must be positive, count not negative, threads at least 1")
    ratio = write_ratio if write_ratio is not None else (1.0 if write else 0.0)
    if not 0.0 <= ratio <= 1.0:
        raise InvalidArgument(f"write ratio {ratio} is outside 0..1", value=ratio)
    step = size if step is None else step
    writing = ratio > 0
    with open_image(path, format=format, readonly=not writing,
                    force_share=force_share and not writing,
                    allow_unsafe_backing=allow_unsafe_backing) as img:
        if size > img.size:
            raise InvalidArgument(f"request size {size} is larger than the disk", path=path)
        plan = request_plan(img.size, count if duration is None else max(count, 1), size,
                            step, offset, random_offsets, seed, ratio)
        data = bytes([pattern & 0xFF]) * size
        lat: list[float] = []
        counts = [0, 0]
        lock = threading.Lock()
        deadline = None if duration is None else time.monotonic() + duration
        next_i = [0]

        def worker() -> None:
            buf = bytearray(size)
            mine: list[float] = []
            reads = writes = 0
            while True:
                with lock:
                    i = next_i[0]
                    next_i[0] += 1
                if deadline is None and i >= len(plan):
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                off, is_write = plan[i % len(plan)]
                t0 = time.perf_counter()
                if is_write:
                    img.write(off, data)
                    writes += 1
                else:
                    img.readinto(off, buf)
                    reads += 1
                mine.append(time.perf_counter() - t0)
            with lock:
                lat.extend(mine)
                counts[0] += reads
                counts[1] += writes

        start = time.perf_counter()
        workers = [threading.Thread(target=worker) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        if writing:
            img.flush()
        seconds = time.perf_counter() - start
    lat.sort()
    pct = {}
    if lat:
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            pct[name] = lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6
        pct["max"] = lat[-1] * 1e6
    n = counts[0] + counts[1]
    return BenchResult(n, n * size, seconds, counts[0], counts[1], pct)
