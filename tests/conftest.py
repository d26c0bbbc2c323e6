"""Shared fixtures, Hypothesis profiles and the opt-in rule for long suites.

- QEMU is required: ``tests/qemu.py`` raises at import when qemu-img/qemu-io are missing,
  and that import happens here, so the whole run fails (never skips) without them.
- Hypothesis profiles: ``ci`` (default, modest), ``dev`` (quick), ``long`` (nightly size).
  Choose one with ``COWCHAIN_PROFILE=long``. ``COWCHAIN_EXAMPLES=N`` sets the number of
  examples of every Hypothesis test in the ``long`` profile (a shorter long run that still
  has more and longer examples than ``ci``).
- Tests marked ``long`` or ``slow`` are deselected unless ``COWCHAIN_LONG=1``.
- ``COWCHAIN_REQUIRE_INSTALLED=1`` (set by .ci/run) makes the run fail at once if ``engine``
  would be imported from the source tree instead of the installed distribution.
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qemu  # noqa: E402  (raises RuntimeError when QEMU is missing: a failure, never a skip)

REPO = pathlib.Path(__file__).resolve().parent.parent

# --- Hypothesis profiles --------------------------------------------------------------------

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large,
                                                     HealthCheck.filter_too_much])
settings.register_profile("dev", max_examples=10, stateful_step_count=20, **_common)
settings.register_profile("ci", max_examples=40, stateful_step_count=40, **_common)
LONG_EXAMPLES = int(os.environ.get("COWCHAIN_EXAMPLES", "0")) or None
settings.register_profile("long", max_examples=LONG_EXAMPLES or 1000, stateful_step_count=80,
                          **_common)
settings.load_profile(os.environ.get("COWCHAIN_PROFILE", "ci"))

LONG = os.environ.get("COWCHAIN_LONG") == "1"

# Lines that tests want printed at the end of the run (summaries, differential tables).
SUMMARY: list[str] = []


def pytest_report_header(config):
    lines = [qemu.version(), f"hypothesis profile: {settings._current_profile}",
             f"long suites: {'on' if LONG else 'off (COWCHAIN_LONG=1 to enable)'}"]
    try:
        import engine

        lines.append(f"engine: {engine.__file__}")
        try:
            import engine._core as core

            lines.append(f"engine._core: {core.__file__}")
        except ImportError as e:  # reported, and every engine test then fails on its own
            lines.append(f"engine._core: NOT IMPORTABLE ({e})")
    except ImportError as e:
        lines.append(f"engine: NOT IMPORTABLE ({e})")
    return lines


def pytest_configure(config):
    if os.environ.get("COWCHAIN_REQUIRE_INSTALLED") == "1":
        import engine

        where = pathlib.Path(engine.__file__).resolve()
        if REPO / "engine" in where.parents:
            raise pytest.UsageError(
                f"engine imported from the source tree ({where}), not the installed package; "
                "run pytest from tests/ so the checkout does not shadow it")
        import engine._core  # noqa: F401  (the compiled core must be there)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("COWCHAIN_PROFILE") == "long":
        # a long Hypothesis run outgrows the per-test timeout (pyproject.toml) that guards the
        # per-commit run against hangs; the state machines get hours instead
        for item in items:
            if item.name == "runTest" and not item.get_closest_marker("timeout"):
                item.add_marker(pytest.mark.timeout(12 * 3600))
    if LONG:
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("long") or item.get_closest_marker("slow")
         else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if SUMMARY:
        terminalreporter.section("cowchain summaries")
        for line in SUMMARY:
            terminalreporter.write_line(line)


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture
def summary():
    """A list to append lines to; they are printed in the final report."""
    return SUMMARY


@pytest.fixture
def workdir(tmp_path) -> pathlib.Path:
    """A fresh empty folder for one test's images."""
    return tmp_path


@pytest.fixture
def qemu_image(tmp_path):
    """Factory: ``qemu_image(name, size, fmt='qcow2', backing=None, backing_fmt=None, **opts)``
    creates an image with ``qemu-img create`` in the test's folder and returns its path."""

    def make(name: str = "disk.qcow2", size="4M", fmt: str = "qcow2", backing=None,
             backing_fmt=None, **opts) -> pathlib.Path:
        path = tmp_path / name
        qemu.create(path, size, fmt=fmt, backing=backing, backing_fmt=backing_fmt, **opts)
        return path

    return make


@pytest.fixture
def engine_image(tmp_path):
    """Factory: ``engine_image(name, size, **create_kwargs)`` creates an image with
    ``engine.create`` in the test's folder and returns the open Image; every image it made
    is closed at teardown."""
    import engine

    made = []

    def make(name: str = "disk.qcow2", size: int = 4 << 20, **kw):
        img = engine.create(str(tmp_path / name), size, **kw)
        made.append(img)
        return img

    yield make
    for img in reversed(made):
        if not img.closed:
            img.close()


# --- a repository in a temporary folder (test modules may define their own 'repo') -----------

@pytest.fixture
def repo_path(tmp_path):
    return str(tmp_path / "repo")


@pytest.fixture
def repo(repo_path):
    import engine

    r = engine.Repository.create(repo_path)
    yield r
    r.close()


# --- PostgreSQL (the multi-host catalog) ------------------------------------------------------

@pytest.fixture(scope="session")
def pg_server():
    """One throwaway PostgreSQL server for the session (initdb + pg_ctl, unix socket only).

    Missing PostgreSQL is a failure, never a skip: .ci/run installs it."""
    from engine.testing.pgserver import PgServer
    srv = PgServer(settings={"max_connections": "300"})
    srv.start()
    try:
        yield srv
    finally:
        srv.cleanup()


_pg_db_counter = [0]


@pytest.fixture
def pg_url(pg_server):
    """A new empty database on the session's server, for one test."""
    if not pg_server.running:
        pg_server.start()
    _pg_db_counter[0] += 1
    return pg_server.create_database(f"t{os.getpid()}_{_pg_db_counter[0]}")
