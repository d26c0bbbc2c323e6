"""Read-path benchmarks (the figures of README's Performance section).

Guards against regressions in:

- the per-call cost of ``Image.readinto`` from a Python loop (one crossing per 4 KiB read);
- the batch path ``Image.readv`` (one crossing for thousands of 4 KiB reads);
- the cost of a miss that falls through a deep chain: at depth 200 a read must cost what it
  costs at depth 1 (the owner map);
- large sequential copies (1 MiB ``readinto``), which must run at memcpy speed.

Parametrised over cluster size (4 KiB, 64 KiB, 2 MiB), chain depth (1, 11, 200) and data
pattern (zeros, random).  Run: ``python -m pytest bench --benchmark-only -k read``.
"""

from __future__ import annotations

import numpy as np
import pytest

from _benchutil import (CLUSTER_IDS, CLUSTER_SIZES, DEPTH_IDS, DEPTHS, DISK, MiB, engine,
                        record_rate, scattered_offsets)

N_LOOP = 4096          # 4 KiB reads per round, Python loop
N_BATCH = 16384        # 4 KiB reads per round, BATCH per readv call
BATCH = 1024


@pytest.fixture(params=CLUSTER_SIZES, ids=CLUSTER_IDS)
def cluster_size(request) -> int:
    return request.param


@pytest.fixture(params=DEPTHS, ids=DEPTH_IDS)
def depth(request) -> int:
    return request.param


@pytest.fixture
def chain_top(chain_factory, cluster_size, depth, pattern):
    name, data = pattern
    img = engine.open(str(chain_factory(cluster_size, depth, name, data)), readonly=True)
    assert len(img.chain()) == depth
    yield img
    img.close()


def test_readinto_4k_random(benchmark, chain_top):
    """4 KiB reads at random offsets, one readinto per read."""
    offs = scattered_offsets(N_LOOP, DISK, 4096).tolist()
    buf = bytearray(4096)
    ri = chain_top.readinto

    def run():
        for o in offs:
            ri(o, buf)

    run()                                      # map the pages once
    benchmark(run)
    record_rate(benchmark, N_LOOP, N_LOOP * 4096, "reads")


def test_readv_4k_random(benchmark, chain_top):
    """4 KiB reads at random offsets, BATCH per Image.readv call."""
    offs = scattered_offsets(N_BATCH, DISK, 4096)
    parts = [offs[i:i + BATCH] for i in range(0, N_BATCH, BATCH)]
    out = np.empty(BATCH * 4096, dtype=np.uint8)
    rv = chain_top.readv

    def run():
        for p in parts:
            rv(p, 4096, out)

    run()
    benchmark(run)
    record_rate(benchmark, N_BATCH, N_BATCH * 4096, "reads")


@pytest.mark.parametrize("depth", [11], ids=["d11"])
def test_read_1m_sequential(benchmark, chain_factory, cluster_size, depth, pattern):
    """The whole disk in 1 MiB readinto calls into one numpy buffer."""
    name, data = pattern
    with engine.open(str(chain_factory(cluster_size, depth, name, data)), readonly=True) as img:
        buf = np.empty(MiB, dtype=np.uint8)
        ri = img.readinto
        offs = list(range(0, DISK, MiB))

        def run():
            for o in offs:
                ri(o, buf)

        run()
        benchmark(run)
    record_rate(benchmark, len(offs), DISK, "reads")
