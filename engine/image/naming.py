"""Names from outside: the public entry points' path arguments, and the policy for backing
file names recorded in an image (which ones may be followed at all)."""

from __future__ import annotations

import os
import re
from typing import Any

from engine.errors import InvalidArgument, UnsafeBackingReference

_PROTOCOL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def _path_arg(path: Any, name: str = "path") -> str:
    """``path`` (str, bytes or os.PathLike) as a str; InvalidArgument for anything else, an
    empty name or one with a NUL byte."""
    try:
        p = os.fsdecode(os.fspath(path))
    except TypeError:
        raise InvalidArgument(f"{name} must be a str or os.PathLike, not "
                              f"{type(path).__name__}", value=path) from None
    if not p or "\0" in p:
        raise InvalidArgument(f"{name} {p!r} is empty or contains a NUL byte", value=path)
    return p


def _check_backing_name(name: str, overlay_dir: str, allow_unsafe: bool,
                        real_dirs: dict[str, str] | None = None) -> str:
    """Policy for backing references (S2): a plain name relative to the overlay's folder
    that resolves, symlinks included, inside that folder. Returns the resolved path.

    ``real_dirs`` caches the real path of each overlay folder over one open: a 200-deep
    chain in one folder pays for one realpath."""
    if name in ("", ".") or name.endswith("/"):
        raise UnsafeBackingReference(name, f"backing file name {name!r} does not name a file")
    if "\0" in name:
        raise UnsafeBackingReference(name, "backing file name contains a NUL byte")
    if not allow_unsafe:
        if name.startswith("json:") or _PROTOCOL_RE.match(name):
            raise UnsafeBackingReference(name, f"backing file {name!r} is a json: or protocol name")
        if os.path.isabs(name):
            raise UnsafeBackingReference(name, f"backing file {name!r} is an absolute path")
        if ".." in name.split("/"):
            raise UnsafeBackingReference(name, f"backing file {name!r} leaves the overlay's folder")
    full = os.path.join(overlay_dir, name)
    # a plain name that is not a symbolic link stays in the folder: only a name with a
    # folder in it, or a link, is resolved and compared with the folder's real path
    if not allow_unsafe and ("/" in name or os.path.islink(full)):
        root = real_dirs.get(overlay_dir) if real_dirs is not None else None
        if root is None:
            root = os.path.realpath(overlay_dir)
            if real_dirs is not None:
                real_dirs[overlay_dir] = root
        real = os.path.realpath(full)
        if not real.startswith(root + os.sep):
            raise UnsafeBackingReference(name, f"backing file {name!r} resolves outside the "
                                         "overlay's folder")
    return full
