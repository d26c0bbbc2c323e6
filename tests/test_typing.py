"""The package's type information: ``py.typed``, the stub of the compiled core, and mypy.

- The imported ``engine`` package (the installed one under ``.ci/run``) must carry
  ``py.typed`` and ``_core.pyi``: they are package data, and a wheel that lost them would ship
  an untyped package.
- ``mypy --strict`` passes on the typed subset of the package, :data:`STRICT_MODULES` (listed
  in README's "Type checking" section). The other modules are followed with
  ``--follow-imports=silent``: their own errors are not reported yet.
- ``mypy.stubtest`` finds the stub and the compiled module in agreement: every public name and
  signature of ``engine/_core.pyx`` is in ``engine/_core.pyi`` and the reverse, apart from the
  Cython-generated names in ``stubtest_allowlist.txt``.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import engine

PKG = pathlib.Path(engine.__file__).resolve().parent
HERE = pathlib.Path(__file__).resolve().parent

#: Checked with ``mypy --strict``, relative to the package folder. README lists the same set.
STRICT_MODULES = [
    "__init__.py",
    "catalog.py",
    "catalog_pg.py",
    "cli_img.py",
    "errors.py",
    "format.py",
    "check/__init__.py",
    "check/computed.py",
    "check/copied.py",
    "check/passes.py",
    "check/reader.py",
    "check/rebuild.py",
    "check/result.py",
    "check/snapshot_table.py",
    "check/stored.py",
    "img/__init__.py",
    "img/_meta.py",
    "img/_open.py",
    "img/bench.py",
    "img/bitmaps.py",
    "img/check.py",
    "img/compare.py",
    "img/compress.py",
    "img/convert.py",
    "img/create.py",
    "img/info.py",
    "img/map.py",
    "img/measure.py",
    "img/modify.py",
    "img/prealloc.py",
    "img/snapshot.py",
    "image/__init__.py",
    "image/api.py",
    "image/chain.py",
    "image/compress.py",
    "image/extent.py",
    "image/files.py",
    "image/image.py",
    "image/locks.py",
    "image/naming.py",
    "qcow2/__init__.py",
    "qcow2/args.py",
    "qcow2/bitmaps.py",
    "qcow2/header.py",
    "qcow2/layout.py",
    "qcow2/refblocks.py",
    "qcow2/snapshots.py",
    "qcow2/spec.py",
    "_core.pyi",
    "nbd/__init__.py",
    "nbd/conn.py",
    "nbd/control.py",
    "nbd/export.py",
    "nbd/handshake.py",
    "nbd/proto.py",
    "nbd/run.py",
    "nbd/server.py",
    "nbd/wire.py",
    "ops/__init__.py",
    "ops/_copy.py",
    "ops/_hooks.py",
    "ops/commit.py",
    "ops/convert.py",
    "ops/diff.py",
    "ops/measure.py",
    "ops/merge.py",
    "ops/runs.py",
    "ops/stream.py",
    "repository/__init__.py",
    "repository/catalog_api.py",
    "repository/chain.py",
    "repository/check.py",
    "repository/context.py",
    "repository/files.py",
    "repository/graph.py",
    "repository/journal.py",
    "repository/leases.py",
    "repository/merge.py",
    "repository/operations.py",
    "repository/repo.py",
    "repository/values.py",
    "testing/__init__.py",
]


def _run(args: list[str], tmp_path: pathlib.Path) -> subprocess.CompletedProcess[str]:
    # Run from an empty folder, so that mypy and stubtest see exactly the package the tests
    # import: an installed one through the interpreter's site-packages (putting site-packages
    # on PYTHONPATH would make mypy take every module there for a user module), one built in
    # place through PYTHONPATH.
    env = dict(os.environ, MYPY_FORCE_COLOR="0")
    if PKG.parent.name not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = str(PKG.parent)
    return subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_package_ships_type_information():
    assert (PKG / "py.typed").is_file(), f"{PKG}/py.typed is missing"
    assert (PKG / "_core.pyi").is_file(), f"{PKG}/_core.pyi is missing"
    for pkg in ("check", "image", "img", "nbd", "ops", "qcow2", "repository"):
        have = sorted(p.name for p in (PKG / pkg).glob("*.py"))
        assert [m.split("/")[1] for m in STRICT_MODULES if m.startswith(pkg + "/")] == have, \
            f"a module of engine/{pkg} is missing from STRICT_MODULES (and README)"


def test_mypy_strict_on_the_typed_modules(tmp_path):
    modules = []
    for m in STRICT_MODULES:
        name = "engine." + m.rsplit(".", 1)[0].replace("/", ".")
        modules += ["-m", name.removesuffix(".__init__")]
    res = _run(["mypy", "--strict", "--follow-imports=silent", "--no-color-output",
                "--cache-dir", str(tmp_path / "cache"), *modules], tmp_path)
    assert res.returncode == 0, f"mypy --strict found errors:\n{res.stdout}{res.stderr}"
    assert "Success" in res.stdout


def test_core_stub_matches_the_compiled_module(tmp_path):
    res = _run(["mypy.stubtest", "engine._core",
                "--allowlist", str(HERE / "stubtest_allowlist.txt")], tmp_path)
    assert res.returncode == 0, f"engine/_core.pyi disagrees with engine._core:\n{res.stdout}{res.stderr}"
    assert "Success" in res.stdout
