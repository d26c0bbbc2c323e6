"""Metadata written beside the core: header rewrites (engine.image) and repairs (engine.check)
go through the core's I/O shim, so that fault injection and the power-loss recorder see them.
One room below both users, so that neither imports the other for it."""

from __future__ import annotations

import errno

from engine import _core
from engine.errors import io_error


def meta_write(fd: int, data: bytes, offset: int, path: str) -> None:
    """Write metadata beside the core (a header rewrite) and make it durable, through the
    core's I/O shim, so that fault injection and the power-loss recorder see it."""
    try:
        _core.meta_pwrite(fd, data, offset)
    except OSError as e:
        raise io_error(e.errno or errno.EIO, "cannot write the header", path=path) from None
    meta_sync(fd, path)


def meta_sync(fd: int, path: str) -> None:
    """fdatasync through the core's I/O shim, for metadata written beside the core (header
    rewrites by engine.image, repairs by engine.check).  A failure carries ``sync_failed = True``: the
    kernel may have dropped pages, so the open handle must fail every later flush, as after a
    failed sync of the core (see :meth:`Image._failed_sync`)."""
    try:
        _core.meta_sync(fd)
    except OSError as e:
        err = io_error(e.errno or errno.EIO, "cannot sync the metadata written", path=path)
        err.sync_failed = True  # type: ignore[attr-defined]  # read by Image._failed_sync
        raise err from None
