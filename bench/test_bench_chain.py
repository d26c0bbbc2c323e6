"""Chain-metadata benchmarks (the figures of README's Performance section).

Guards against regressions in:

- snapshot creation (a new overlay over an existing volume): O(1) in the virtual size, so
  1 TiB must cost what 1 GiB costs;
- opening a chain: no full-table scans, tables mapped not copied, so opening 200 volumes
  grows with the depth only.

Parametrised over cluster size and virtual size (creation) and chain depth (open).
Run: ``python -m pytest bench --benchmark-only -k chain``.
"""

from __future__ import annotations

import itertools
import os
import subprocess

import pytest

from _benchutil import GiB, KiB, MiB, TiB, engine

_names = itertools.count()


@pytest.mark.parametrize("cluster_size", [64 * KiB, 2 * MiB], ids=["c64k", "c2m"])
@pytest.mark.parametrize("vsize", [GiB, TiB], ids=["1GiB", "1TiB"])
def test_snapshot_create(benchmark, tmp_path, cluster_size, vsize):
    """engine.create of an overlay (returns it open) over a base of the same virtual size."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"cluster_size={cluster_size}", str(tmp_path / "base.qcow2"), str(vsize)],
                   check=True)
    made = []

    def setup():
        return (str(tmp_path / f"snap-{next(_names)}.qcow2"),), {}

    def run(path):
        made.append(engine.create(path, vsize, cluster_size=cluster_size,
                                  backing="base.qcow2", backing_format="qcow2"))

    benchmark.pedantic(run, setup=setup, rounds=20, warmup_rounds=1)
    for img in made:
        img.close()
        os.unlink(img.path)
    if benchmark.stats is not None:
        benchmark.extra_info["ms"] = round(benchmark.stats.stats.median * 1e3, 3)


@pytest.mark.parametrize("depth", [1, 11, 200], ids=["d1", "d11", "d200"])
def test_open_chain_1tib(benchmark, tmp_path, depth):
    """engine.open (read-only) of a chain of `depth` empty 1 TiB volumes, then close."""
    prev = None
    for i in range(depth):
        name = f"v{i:03d}.qcow2"
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if prev:
            cmd += ["-u", "-b", prev, "-F", "qcow2"]
        subprocess.run(cmd + [name, str(TiB)], cwd=tmp_path, check=True)
        prev = name
    top = str(tmp_path / prev)

    def run():
        engine.open(top, readonly=True).close()

    benchmark(run)
    if benchmark.stats is not None:
        benchmark.extra_info["ms per volume"] = round(benchmark.stats.stats.median * 1e3 / depth,
                                                      4)
