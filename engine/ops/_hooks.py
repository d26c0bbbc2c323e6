"""Named kill points for the crash tests (test seam; a no-op unless an env variable is set).

Every multi-step repository operation calls :func:`kill_point` between its steps, and the
bulk copies call it once per chunk.  Two environment variables, read once at import, switch
the points on:

``COWCHAIN_KILL_AT=NAME:N``
    the process SIGKILLs itself the N-th time (1-based) it reaches the point NAME.  The same
    variable names a hook of the compiled core (``engine._core.HOOK_NAMES``), which the core
    arms itself at import; :mod:`engine.testing` is the one facade over both.
``COWCHAIN_HOOK_LOG=PATH``
    every point reached is appended to PATH, one name a line, so a test can first learn the
    sequence of points an operation passes and then kill it at each of them.

A release run pays one dictionary-free branch per call: both variables unset.
"""

from __future__ import annotations

import os
import signal

_KILL_AT: tuple[str, int] | None = None
_LOG_PATH: str | None = None
_counts: dict[str, int] = {}


def _configure() -> None:
    """(Re)read the environment; tests that change it in-process call this."""
    global _KILL_AT, _LOG_PATH
    _counts.clear()
    spec = os.environ.get("COWCHAIN_KILL_AT")
    _KILL_AT = None
    if spec:
        name, _, n = spec.rpartition(":")
        if name and n.isdigit():
            _KILL_AT = (name, int(n))
        else:
            _KILL_AT = (spec, 1)
    _LOG_PATH = os.environ.get("COWCHAIN_HOOK_LOG") or None


def kill_point(name: str) -> None:
    """Mark the step boundary NAME (see the module docstring)."""
    if _KILL_AT is None and _LOG_PATH is None:
        return
    n = _counts[name] = _counts.get(name, 0) + 1
    if _LOG_PATH is not None:
        # O_APPEND and one write per line: the log survives the kill that may follow.
        fd = os.open(_LOG_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{name}\n".encode())
        finally:
            os.close(fd)
    if _KILL_AT is not None and _KILL_AT == (name, n):
        os.kill(os.getpid(), signal.SIGKILL)


_configure()
