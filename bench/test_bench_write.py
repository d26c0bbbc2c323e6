"""Write-path benchmarks (the figures of README's Performance section).

Guards against regressions in:

- copy-up writes: a 4 KiB write into a cluster that lives below the leaf reads the old
  cluster through the chain, merges, allocates and links a new one (refcounts and L2 tables
  allocated in batches, no barrier per cluster);
- rewrites of clusters the leaf owns (in place, no allocation);
- whole-cluster writes into a fresh overlay (no copy-up at all);
- a burst of copy-up writes followed by one flush(): the durable path pays one set of
  barriers per batch, not one per cluster.

Parametrised over cluster size (4 KiB, 64 KiB, 2 MiB), the depth of the chain below the
written overlay (1, 11, 200) and the data pattern (zeros, random).
Run: ``python -m pytest bench --benchmark-only -k write``.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from _benchutil import CLUSTER_IDS, CLUSTER_SIZES, DEPTH_IDS, DEPTHS, DISK, engine, record_rate

ROUNDS = 5
MAX_WRITES = 1024      # 4 KiB writes per round (at most one per cluster of the disk)
_names = itertools.count()


@pytest.fixture(params=CLUSTER_SIZES, ids=CLUSTER_IDS)
def cluster_size(request) -> int:
    return request.param


@pytest.fixture(params=DEPTHS, ids=DEPTH_IDS)
def depth(request) -> int:
    return request.param


@pytest.fixture
def below(chain_factory, cluster_size, depth, pattern):
    """(top of the chain below the written overlay, cluster size, pattern data)."""
    name, data = pattern
    return chain_factory(cluster_size, depth, name, data), cluster_size, data


@pytest.fixture
def fresh_overlays(below):
    """Factory of fresh overlays over `below`; all closed at teardown."""
    top, cs, _ = below
    made = []

    def make():
        path = top.parent / f"fresh-{next(_names)}.qcow2"
        img = engine.create(str(path), None, cluster_size=cs, backing=top.name,
                            backing_format="qcow2")
        made.append(img)
        return img

    yield make
    for img in made:
        img.close()
        os.unlink(img.path)


def _cluster_offsets(cs: int) -> list[int]:
    n = min(MAX_WRITES, DISK // cs)
    rng = np.random.default_rng(cs)
    return (rng.permutation(DISK // cs)[:n] * cs).tolist()


def test_write_4k_copyup(benchmark, below, fresh_overlays):
    """4 KiB writes into a fresh overlay, each into a different cluster (each a copy-up)."""
    _, cs, data = below
    offs = _cluster_offsets(cs)
    piece = data[:4096].tobytes()

    def run(img):
        w = img.write
        for o in offs:
            w(o, piece)

    benchmark.pedantic(run, setup=lambda: ((fresh_overlays(),), {}), rounds=ROUNDS)
    record_rate(benchmark, len(offs), len(offs) * 4096, "writes")


def test_write_4k_copyup_flush(benchmark, below, fresh_overlays):
    """The same burst of copy-up writes followed by one flush() (the durable path)."""
    _, cs, data = below
    offs = _cluster_offsets(cs)
    piece = data[:4096].tobytes()

    def run(img):
        w = img.write
        for o in offs:
            w(o, piece)
        img.flush()

    benchmark.pedantic(run, setup=lambda: ((fresh_overlays(),), {}), rounds=ROUNDS)
    record_rate(benchmark, len(offs), len(offs) * 4096, "writes")


def test_rewrite_4k(benchmark, below, fresh_overlays):
    """4 KiB rewrites of clusters the overlay already owns (in place)."""
    _, cs, data = below
    offs = _cluster_offsets(cs)
    piece = data[4096:8192].tobytes()
    img = fresh_overlays()
    w = img.write
    for o in offs:
        w(o, piece)
    img.flush()

    def run():
        for o in offs:
            w(o, piece)

    benchmark(run)
    record_rate(benchmark, len(offs), len(offs) * 4096, "writes")


def test_write_whole_clusters(benchmark, below, fresh_overlays):
    """Whole-cluster writes into a fresh overlay (no copy-up), up to 16 MiB per round."""
    _, cs, data = below
    n = min(DISK // cs, (16 << 20) // cs)
    offs = (np.random.default_rng(7).permutation(DISK // cs)[:n] * cs).tolist()
    chunk = np.ascontiguousarray(np.resize(data, cs))

    def run(img):
        w = img.write
        for o in offs:
            w(o, chunk)

    benchmark.pedantic(run, setup=lambda: ((fresh_overlays(),), {}), rounds=ROUNDS)
    record_rate(benchmark, n, n * cs, "clusters")
