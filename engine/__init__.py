"""cowchain: a QCOW2 snapshot-chain storage engine, byte-compatible with QEMU.

Public API: :func:`open`, :func:`create`, :class:`Image`, :class:`Extent`,
:class:`Repository`, :class:`Chain`, :class:`Snapshot` and the :mod:`engine.errors` classes.
Everything else in the package is private.

The compiled core is loaded on first use of the API, so the pure-Python modules
(``engine.format``, ``engine.errors``) import even where the extension is not built.
"""

import typing as _typing

from engine.errors import *  # noqa: F401,F403
from engine.errors import __all__ as _error_names

if _typing.TYPE_CHECKING:  # the lazily loaded names, for type checkers
    from engine.check import CheckResult as CheckResult
    from engine.image import Extent as Extent, Image as Image, create as create, open as open
    from engine.repository import Chain as Chain, Repository as Repository
    from engine.repository import Snapshot as Snapshot, Volume as Volume

__version__ = "0.1.0"

_LAZY = {
    "open": "engine.image",
    "create": "engine.image",
    "Image": "engine.image",
    "Extent": "engine.image",
    "CheckResult": "engine.check",
    "Repository": "engine.repository",
    "Chain": "engine.repository",
    "Snapshot": "engine.repository",
    "Volume": "engine.repository",
}

__all__ = ["__version__", *_LAZY, *_error_names]


#: What to do when the compiled core is missing (a source checkout that was not built).
_CORE_MISSING = ("cowchain's compiled core (engine._core) is not built in this source tree "
                "({path}): install the package with 'pip install .' and run Python outside "
                "the source folder, or build the core in place with 'python setup.py "
                "build_ext --inplace' (needs Cython, numpy and a C compiler)")


def _load(module: str) -> _typing.Any:
    """The submodule behind a lazily loaded public name (plain imports, so readers and tools
    see the edges)."""
    if module == "engine.image":
        from engine import image
        return image
    if module == "engine.check":
        from engine import check
        return check
    from engine import repository
    return repository


def __getattr__(name: str) -> _typing.Any:
    if name == "_core":
        # 'from engine import _core' asks here first: import it, or say how to build it
        import os
        import sys

        try:
            import engine._core
        except ModuleNotFoundError as e:
            if e.name != "engine._core":
                raise
            raise ImportError(_CORE_MISSING.format(path=os.path.dirname(__file__)),
                              name="engine._core") from None
        return sys.modules["engine._core"]
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(_load(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
