"""QEMU-compatible image locks: OFD byte-range locks on the bytes QEMU uses
(docs/on-disk.md section 9), so that cowchain and QEMU see each other's opens."""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from engine.errors import ImageLocked, io_error

_PERM_CONSISTENT_READ, _PERM_WRITE, _PERM_RESIZE = 0, 1, 3
_PERM_NAMES = {0: "consistent read", 1: "write", 3: "resize"}
_LOCK_BASE_USE, _LOCK_BASE_SHARE = 100, 200
_FLOCK = "=hh4xqqi4x"     # struct flock on 64-bit Linux


def _ofd(fd: int, cmd: int, ltype: int, byte: int) -> int:
    """One open-file-description lock call on one byte; returns the l_type fcntl gives back
    (F_UNLCK from F_OFD_GETLK: nobody holds a conflicting lock)."""
    arg = struct.pack(_FLOCK, ltype, os.SEEK_SET, byte, 1, 0)
    res = fcntl.fcntl(fd, cmd, arg)
    ltype_back: int = struct.unpack(_FLOCK, res)[0]
    return ltype_back


class _Lock:
    """QEMU's lock bytes on a dedicated descriptor: a read-write user takes 100, 101, 103 and
    201, 203; a reader takes 100 and 201, 203 (it does not share write or resize); a
    force-share reader takes 100 only."""

    def __init__(self, fd: int, path: str, writable: bool, force_share: bool):
        # The locks live on the image's own open file description (the core's dup shares
        # it); they go away when the last descriptor of it is closed.
        self.fd = fd
        self.path = path
        use = [_PERM_CONSISTENT_READ] + ([_PERM_WRITE, _PERM_RESIZE] if writable else [])
        unshared = [] if force_share else [_PERM_WRITE, _PERM_RESIZE]
        try:
            for p in use:
                _ofd(self.fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _LOCK_BASE_USE + p)
            for p in unshared:
                _ofd(self.fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _LOCK_BASE_SHARE + p)
            for p in use:
                if _ofd(self.fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, _LOCK_BASE_SHARE + p) != fcntl.F_UNLCK:
                    raise ImageLocked(f'Failed to get "{_PERM_NAMES[p]}" lock', path=path)
            for p in unshared:
                if _ofd(self.fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, _LOCK_BASE_USE + p) != fcntl.F_UNLCK:
                    raise ImageLocked(f'Failed to get shared "{_PERM_NAMES[p]}" lock', path=path)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise ImageLocked("the image is locked by another process", path=path) from None
            raise io_error(e.errno or errno.EIO, "cannot lock the image", path=path) from None

    def downgrade(self) -> None:
        """From a read-write user's bytes to a reader's: drop the write and resize use bytes
        (101, 103), keeping the rest."""
        try:
            for p in (_PERM_WRITE, _PERM_RESIZE):
                _ofd(self.fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, _LOCK_BASE_USE + p)
        except OSError as e:
            raise io_error(e.errno or errno.EIO, "cannot unlock the image",
                           path=self.path) from None

    def release(self) -> None:
        # Dropped with the descriptor (Image.close); nothing to do separately.
        self.fd = -1
