"""Export: one named disk offered over NBD, and the mapping of NBD requests to engine calls.

The disk is an :class:`engine.Image` (with its backing chain) or a repository
:class:`engine.Chain`; both offer the same public calls (``readinto``, ``write``,
``write_zeroes``, ``discard``, ``flush``, ``extents``), and this module maps NBD's commands to
them and nothing more: every rule about where data lands (leaf-only writes, copy-up, zero
clusters, locks) is the engine's, exactly as for a Python caller. One Export is shared by every
connection to it, which is what makes the multi-connection promise hold: a FLUSH on any
connection flushes the one engine handle all of them wrote through.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from engine.errors import EngineIOError, InvalidArgument, NoSpace, ReadOnlyImage, \
    RepositoryError
from engine.nbd import proto
from engine.repository.chain import Chain

#: The metadata contexts every export offers, with the id each is given on a connection.
CONTEXTS = {proto.CONTEXT_BASE_ALLOCATION: 1, proto.CONTEXT_ALLOCATION_DEPTH: 2}


class RequestError(Exception):
    """A request the server refuses with an NBD error value (``proto.E*``)."""

    def __init__(self, error: int, message: str):
        super().__init__(message)
        self.error = error


def nbd_error(e: BaseException) -> int:
    """The NBD error value for an engine error raised while serving a request."""
    if isinstance(e, RequestError):
        return e.error
    if isinstance(e, ReadOnlyImage):
        return proto.EPERM
    if isinstance(e, NoSpace):
        return proto.ENOSPC
    if isinstance(e, InvalidArgument):
        return proto.EINVAL
    if isinstance(e, EngineIOError) and e.errno in (28, 122, 27):   # ENOSPC, EDQUOT, EFBIG
        return proto.ENOSPC
    return proto.EIO


class Gate:
    """Requests pass through while it is open; :meth:`pause` closes it and waits until the
    requests inside have finished, :meth:`resume` opens it again. What lets the server switch
    a chain's leaf between two requests."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self._paused = False

    def enter(self) -> None:
        with self._cond:
            while self._paused:
                self._cond.wait()
            self._active += 1

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            if self._paused and not self._active:
                self._cond.notify_all()

    def pause(self, timeout: float) -> None:
        """Close the gate and wait for the requests inside (RepositoryError after TIMEOUT
        seconds: the gate is open again then)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._paused = True
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._paused = False
                    self._cond.notify_all()
                    raise RepositoryError(f"the requests in flight did not finish within "
                                          f"{timeout:g} s (a client that does not take its "
                                          "replies?)", hint="try again")
                self._cond.wait(left)

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()


class Export:
    """One export: a name, a disk, and what the server advertises for it.

    Arguments:
        name (str): the export name clients ask for ("" is the default export).
        disk: an open :class:`engine.Image` or :class:`engine.Chain`.
        readonly (bool | None): refuse writes (EPERM); None: read-only if the disk is.
        description (str): sent with ``NBD_INFO_DESCRIPTION`` and ``NBD_OPT_LIST``.
        close (bool): close the disk with :meth:`close` (the default; False leaves it to the
            caller).
    """

    def __init__(self, name: str, disk: Any, *, readonly: bool | None = None,
                 description: str = "", close: bool = True):
        if not isinstance(name, str) or len(name.encode()) > proto.MAX_NAME:
            raise InvalidArgument(f"export name {name!r} must be a string of at most "
                                  f"{proto.MAX_NAME} bytes")
        self.name = name
        self.disk = disk
        self.description = description
        self.readonly = bool(getattr(disk, "readonly", False)) if readonly is None \
            else bool(readonly)
        self.size = int(disk.size)
        self.cluster_size: int | None = disk.cluster_size
        header = getattr(disk, "header", None)
        # zeroing whole clusters only touches metadata (qcow2 v3 zero flag, or a raw hole)
        self._zero_clusters = header is None or getattr(header, "version", 3) >= 3
        self._close = close
        flags = (proto.TF_HAS_FLAGS | proto.TF_SEND_FLUSH | proto.TF_SEND_FUA
                 | proto.TF_CAN_MULTI_CONN | proto.TF_SEND_CACHE)
        if self.readonly:
            flags |= proto.TF_READ_ONLY
        else:
            flags |= (proto.TF_SEND_TRIM | proto.TF_SEND_WRITE_ZEROES
                      | proto.TF_SEND_FAST_ZERO)
        self.transmission_flags = flags
        self.readinto = disk.readinto         # type: ignore[method-assign]  # one frame less
        #: every request that reaches the disk passes it (see :meth:`snapshot`)
        self.gate = Gate()

    def __repr__(self) -> str:
        return f"<engine.nbd.Export {self.name!r} {'ro' if self.readonly else 'rw'}>"

    @property
    def preferred_block_size(self) -> int:
        """4 KiB, or the cluster size when larger (aligned writers then avoid copy-up)."""
        return max(4096, self.cluster_size or 0)

    # --- requests (ranges are checked by the connection before these are called) -----------

    def _check_writable(self) -> None:
        if self.readonly:
            raise RequestError(proto.EPERM, "the export is read-only")

    def read_runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(start, length, reads_as_zero) runs covering the range, neighbours merged."""
        out: list[tuple[int, int, bool]] = []
        for e in self.disk.extents(offset, length):
            start, ln = max(e.start, offset), min(e.start + e.length, offset + length)
            if ln <= start:
                continue
            if out and out[-1][2] == e.zero:
                out[-1] = (out[-1][0], ln - out[-1][0], e.zero)
            else:
                out.append((start, ln - start, e.zero))
        return out

    def core(self) -> Any:
        """The engine's handle of the disk's top layer now (the Chain's leaf is opened on
        first use, and an image swaps its handle when it reloads): what the connection sends
        read replies from."""
        img = self.disk._image() if hasattr(self.disk, "_image") else self.disk
        return img._core

    def write_core(self) -> Any:
        """The engine's handle of the top layer for a write now, after the checks the
        disk's own ``write`` makes first (a chain's write lease): what a WRITE payload is
        received into in place."""
        self._check_writable()
        img = self.disk._image(write=True) if hasattr(self.disk, "_image") else self.disk
        return img._core

    def readinto(self, offset: int, buf: Any) -> None:
        """Fill BUF from the disk at OFFSET (the disk's own method, bound in __init__)."""
        self.disk.readinto(offset, buf)

    def write(self, offset: int, data: Any, fua: bool) -> None:
        self._check_writable()
        self.disk.write(offset, data)
        if fua:
            self.disk.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._check_writable()
        self.disk.discard(offset, length)
        if fua:
            self.disk.flush()

    def zero_is_fast(self, offset: int, length: int) -> bool:
        """True when zeroing the range touches metadata only (whole clusters)."""
        c = self.cluster_size
        if c is None:
            return True
        end = offset + length
        return (self._zero_clusters and offset % c == 0
                and (end % c == 0 or end == self.size))

    def write_zeroes(self, offset: int, length: int, *, no_hole: bool, fast: bool,
                     fua: bool) -> None:
        self._check_writable()
        if fast and not self.zero_is_fast(offset, length):
            raise RequestError(proto.ENOTSUP, "zeroing this range would write data")
        self.disk.write_zeroes(offset, length, unmap=not no_hole)
        if fua:
            self.disk.flush()

    def flush(self) -> None:
        if not self.readonly:
            self.disk.flush()

    def block_status(self, offset: int, length: int, context_ids: list[int],
                     req_one: bool) -> dict[int, list[tuple[int, int]]]:
        """Per selected context id, (length, flags) extents from OFFSET, neighbours with the
        same flags merged; at most ``proto.MAX_EXTENTS`` of them (fewer may cover less than
        LENGTH, as the protocol allows), exactly one with REQ_ONE."""
        runs = self.disk.extents(offset, length)
        out: dict[int, list[tuple[int, int]]] = {}
        for cid in context_ids:
            ext: list[tuple[int, int]] = []
            for e in runs:
                if cid == CONTEXTS[proto.CONTEXT_BASE_ALLOCATION]:
                    flags = ((0 if e.data else proto.STATE_HOLE)
                             | (proto.STATE_ZERO if e.zero else 0))
                else:
                    flags = e.depth + 1 if e.present else 0
                if ext and ext[-1][1] == flags:
                    ext[-1] = (ext[-1][0] + e.length, flags)
                elif len(ext) == proto.MAX_EXTENTS:
                    break
                else:
                    ext.append((e.length, flags))
            if req_one:
                ext = [(min(ext[0][0], length), ext[0][1])]
            out[cid] = ext
        return out

    @property
    def chain_name(self) -> str | None:
        """The name of the repository chain whose leaf this export serves read-write."""
        return self.disk.name if isinstance(self.disk, Chain) and not self.readonly else None

    def snapshot(self, description: str = "", *, force: bool = False,
                 drain_timeout: float = 30.0) -> Any:
        """Take a snapshot of the served chain while clients use it (what a live snapshot
        is): requests stop entering, the ones in flight finish, the chain takes the snapshot
        (its leaf becomes the snapshot, a new empty leaf takes the writes), and requests go on
        against the new leaf. Returns the :class:`engine.repository.Snapshot`. Call it on
        the thread that opened the repository.

        Raises:
            InvalidArgument: the export is not a repository chain served read-write.
            RepositoryError: the requests in flight did not finish within DRAIN_TIMEOUT
                seconds; or what ``Chain.snapshot`` raises (nothing changed then).
        """
        if self.chain_name is None:
            raise InvalidArgument(f"export {self.name!r} is not a chain's leaf served "
                                  "read-write: there is nothing to snapshot through it")
        self.gate.pause(drain_timeout)
        try:
            return self.disk.snapshot(description, force=force)
        finally:
            try:
                self.disk.read(0, 0)        # reopen the leaf here, not on a request thread
            finally:
                self.gate.resume()

    def close(self) -> None:
        """Flush and close the disk (when the export owns it). Idempotent."""
        if self._close and not getattr(self.disk, "closed", False):
            self.disk.close()
