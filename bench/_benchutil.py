"""Helpers shared by the benchmark suites (sizes, chain builder, rate reporting)."""

from __future__ import annotations

import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent

try:
    import engine
except ImportError:                      # a source checkout built in place
    sys.path.insert(0, str(REPO))
    import engine

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

#: Cluster sizes the suites run over (QEMU's default is 64 KiB; 4 KiB makes the most tables,
#: 2 MiB the largest copy-ups).
CLUSTER_SIZES = [4 * KiB, 64 * KiB, 2 * MiB]
CLUSTER_IDS = ["c4k", "c64k", "c2m"]

#: Chain depths: a lone volume, the issue's 11-volume chain, and the 200-deep chain whose cost
#: must not grow with depth (the owner map).
DEPTHS = [1, 11, 200]
DEPTH_IDS = ["d1", "d11", "d200"]

#: Virtual size of the benchmark disks (small enough to build 200-deep chains quickly, larger
#: than the last-level cache so reads are not served from it).
DISK = 64 * MiB

#: Lines printed at the end of a benchmark run (bench/conftest.py).
RATES: list[str] = []


def record_rate(benchmark, ops: int, nbytes: int, unit: str = "ops") -> None:
    """Put ops/s and MiB/s of the median round into extra_info and the final summary."""
    st = benchmark.stats.stats if benchmark.stats is not None else None
    if st is None or not st.median:
        return
    rate = ops / st.median
    mibs = nbytes / st.median / MiB
    benchmark.extra_info[f"{unit}/s"] = round(rate)
    benchmark.extra_info["MiB/s"] = round(mibs, 1)
    RATES.append(f"{benchmark.name}: {rate:,.0f} {unit}/s, {mibs:,.1f} MiB/s")


def build_chain(folder: pathlib.Path, cluster_size: int, depth: int, data: np.ndarray,
                size: int = DISK) -> pathlib.Path:
    """A base written in full with `data` (repeated) and depth - 1 overlays above it, each
    owning 4 scattered clusters; returns the top.  Made with engine.create."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(depth)
    base = folder / "v000.qcow2"
    with engine.create(str(base), size, cluster_size=cluster_size) as img:
        for off in range(0, size, len(data)):
            img.write(off, data[: min(len(data), size - off)])
    prev = base.name
    n = size // cluster_size
    for i in range(1, depth):
        name = f"v{i:03d}.qcow2"
        with engine.create(str(folder / name), size, cluster_size=cluster_size,
                           backing=prev, backing_format="qcow2") as img:
            for c in rng.choice(n, size=4, replace=False).tolist():
                img.write(c * cluster_size, data[:cluster_size])
        prev = name
    return folder / prev


def scattered_offsets(n: int, size: int, length: int, seed: int = 0) -> np.ndarray:
    """n random `length`-aligned offsets inside a disk of `size` bytes (uint64)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, size // length, n, dtype=np.uint64) * np.uint64(length))
