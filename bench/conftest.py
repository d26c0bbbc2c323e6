"""pytest-benchmark suites for cowchain (opt-in; never part of the normal test run).

Run them from the repository root::

    python -m pytest bench --benchmark-only
    python -m pytest bench --benchmark-only -k "readv and 64k"          # a subset
    python -m pytest bench --benchmark-only --benchmark-json=out.json    # keep the numbers

The default ``pytest`` run never collects them (``testpaths = ["tests"]`` in pyproject.toml),
and if ``bench/`` is named on a run without ``--benchmark-only`` (or ``-m benchmark``, or
``COWCHAIN_BENCH=1``) its items are deselected, so a stray ``pytest .`` stays fast.

Every item gets the ``benchmark`` marker.  Suites are parametrised over cluster size and chain
depth, with the data pattern (zeros or random bytes) as separate fixtures; each reports its
rate (reads/s, writes/s, MiB/s) in ``extra_info``, shown in ``--benchmark-json`` output and
printed in the summary at the end.  The side-by-side comparison with QEMU is
``bench/compare_qemu.py``; its last full output is ``bench/RESULTS.md``.
"""

from __future__ import annotations

import os
import pathlib
import sys

# numpy starts OpenBLAS threads that spin on the other core for a while; nothing here
# uses BLAS, and on a 2-core machine that spin would be billed to the figures.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import pytest

# bench/ on sys.path for the helper module, whatever the import mode
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _benchutil import HERE, RATES, MiB, build_chain  # noqa: E402


def _wanted(config) -> bool:
    return bool(config.getoption("benchmark_only", False)
                or "benchmark" in (config.getoption("markexpr", "") or "")
                or os.environ.get("COWCHAIN_BENCH") == "1")


def pytest_collection_modifyitems(config, items):
    mine = [it for it in items if HERE in pathlib.Path(str(it.path)).resolve().parents]
    for it in mine:
        it.add_marker(pytest.mark.benchmark)
    if mine and not _wanted(config):
        ids = {id(it) for it in mine}
        config.hook.pytest_deselected(items=mine)
        items[:] = [it for it in items if id(it) not in ids]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if RATES:
        terminalreporter.section("cowchain rates (median round)")
        for line in RATES:
            terminalreporter.write_line(line)


# --- data patterns: separate fixtures, as borg does --------------------------------------------

@pytest.fixture(scope="session")
def zeros() -> np.ndarray:
    """4 MiB of zero bytes (written as data, not as the zero flag)."""
    return np.zeros(4 * MiB, dtype=np.uint8)


@pytest.fixture(scope="session")
def random_bytes() -> np.ndarray:
    """4 MiB of random bytes (fixed seed)."""
    return np.random.default_rng(19).integers(0, 256, 4 * MiB, dtype=np.uint8)


@pytest.fixture(params=["zeros", "random"])
def pattern(request, zeros, random_bytes) -> tuple[str, np.ndarray]:
    """(name, 4 MiB of data) for each data pattern."""
    return request.param, zeros if request.param == "zeros" else random_bytes


# --- chains -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def chain_factory(tmp_path_factory):
    """``chain_factory(cluster_size, depth, pattern_name, data)`` -> path of the top volume;
    each chain is built once per session."""
    made: dict = {}

    def get(cluster_size: int, depth: int, pattern_name: str, data: np.ndarray) -> pathlib.Path:
        key = (cluster_size, depth, pattern_name)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"chain-{cluster_size}-{depth}-{pattern_name}")
            made[key] = build_chain(folder, cluster_size, depth, data)
        return made[key]

    return get
