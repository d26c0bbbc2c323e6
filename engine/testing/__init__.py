"""The one facade over cowchain's test seams (internal: for the test and reliability suites).

Two kinds of seam, one name space and one environment variable:

- hooks of the compiled core, between the steps of each metadata transition
  (:data:`HOOK_NAMES`, from the enum :class:`Hook`): :func:`arm_hook` makes one fail with EIO
  or SIGKILL the process; :func:`set_fault` fails the n-th OS call of a kind;
  :func:`set_barrier_callback` sees every successful sync;
- kill points of the repository operations and bulk copies, between their steps
  (:func:`kill_point`).

``COWCHAIN_KILL_AT=NAME:N`` (read at import) SIGKILLs the process on the N-th hit of NAME,
whichever kind NAME is; ``COWCHAIN_HOOK_LOG=PATH`` logs every kill point reached.
"""

from __future__ import annotations

from engine import _core
from engine.ops._hooks import _configure as _configure_kill_points
from engine.ops._hooks import kill_point

#: The environment variable that names the one seam a process kills itself at.
KILL_ENV = "COWCHAIN_KILL_AT"

Hook = _core.Hook
HOOK_NAMES = _core.HOOK_NAMES
IO_NAMES = _core.IO_NAMES
arm_hook = _core.arm_hook
hook_counts = _core.hook_counts
set_fault = _core.set_fault
fault_stats = _core.fault_stats
set_barrier_callback = _core.set_barrier_callback

__all__ = ["KILL_ENV", "Hook", "HOOK_NAMES", "IO_NAMES", "arm_hook", "hook_counts", "set_fault",
           "fault_stats", "set_barrier_callback", "kill_point", "configure"]


def configure() -> None:
    """Re-read :data:`KILL_ENV` (and the kill-point log) after a test changed it in-process."""
    _core.arm_hook(None)
    _core._arm_from_env()
    _configure_kill_points()
