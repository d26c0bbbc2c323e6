"""The image layer's file operations: opening a regular file, metadata written beside the
core (through the core's I/O shim, so fault injection and the power-loss recorder see it),
reading the header area, the host's limits on a file's length and on open descriptors, and
the background sync of a new file."""

from __future__ import annotations

import errno
import os
import resource
import stat
import threading
from typing import NoReturn

from engine import _core
from engine import format as fmt
from engine.errors import ImageNotFound, InvalidArgument, io_error

#: Largest header area we read: cluster 0 can be at most 2 MiB.
_HEADER_READ = 2 << 20
#: What is read first: cluster 0 of the usual 64 KiB clusters.
_HEAD_FIRST = 64 << 10

#: Below this many bytes every filesystem we can meet holds a file (FAT32's limit is 4 GiB
#: less one byte), so create and resize skip the probe of the filesystem's limit.
_FS_PROBE_FLOOR = 1 << 30


def _os_open(path: str, flags: int) -> int:
    """Open an existing regular file (never a FIFO, device or folder) with ``flags``."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise InvalidArgument("not a regular file", path=path)
        # O_NONBLOCK: a FIFO swapped in after the stat must not block the open
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidArgument("not a regular file", path=path)
        return fd
    except OSError as e:
        _open_error(e, path, "cannot open", missing="no such file",
                    directory="is a directory, not an image file")


def _create_file(path: str, overwrite: bool) -> int:
    """Make a new, empty file (or empty an existing one, with ``overwrite``) for create."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        return os.open(path, flags, 0o644)
    except FileExistsError:
        raise InvalidArgument("file exists", path=path,
                              hint="pass overwrite=True to replace it") from None
    except OSError as e:
        _open_error(e, path, "cannot create", missing="folder does not exist",
                    directory="is a directory")


def _open_error(e: OSError, path: str, doing: str, *, missing: str, directory: str) -> NoReturn:
    """The typed error for an OSError of os.open: ImageNotFound (``missing``),
    InvalidArgument (``directory``), else what the errno means."""
    if isinstance(e, FileNotFoundError):
        raise ImageNotFound(missing, path=path) from None
    if isinstance(e, IsADirectoryError):
        raise InvalidArgument(directory, path=path) from None
    raise io_error(e.errno or errno.EIO, doing, path=path) from None


def _read_head(fd: int, path: str) -> tuple[bytes, int]:
    """The header area (cluster 0 of a QCOW2 file, up to 2 MiB; else the first 64 KiB) and
    the file's size.  The first 64 KiB are read, then the rest of a larger cluster 0."""
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, min(size, _HEAD_FIRST), 0)
        if len(head) == _HEAD_FIRST and head[:4] == fmt.QCOW_MAGIC_BYTES:
            bits = int.from_bytes(head[20:24], "big")
            want = min(size, 1 << bits if bits < 22 else _HEADER_READ)
            if want > len(head):
                head += os.pread(fd, want - len(head), len(head))
        return head, size
    except OSError as e:
        raise io_error(e.errno or errno.EIO, "cannot read the header", path=path) from None


def _check_file_length(nbytes: int, folder: str, what: str) -> None:
    """The host's limits on a file of ``nbytes`` bytes in ``folder``, checked before any file
    is made or grown: the process's RLIMIT_FSIZE and the filesystem's largest file.

    Raises:
        InvalidArgument: over a limit (the message states it).
    """
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY and nbytes > soft:
        raise InvalidArgument(f"{what} {fmt.size_text(nbytes)} is over this process's file "
                              f"size limit (RLIMIT_FSIZE) of {fmt.size_text(soft)}",
                              value=nbytes, hint="raise the limit ('ulimit -f') or use a "
                              "smaller size")
    if nbytes <= _FS_PROBE_FLOOR:
        return
    limit = _fs_max_file_size(folder, nbytes)
    if limit is not None and nbytes > limit:
        raise InvalidArgument(f"{what} {fmt.size_text(nbytes)} is over the largest file the "
                              f"filesystem at {os.path.abspath(folder)!r} holds: "
                              f"{fmt.size_text(limit)}", value=nbytes,
                              hint="use a smaller size, another filesystem, or a qcow2 image, "
                              "which grows only as data is written")


def _fs_max_file_size(folder: str, want: int) -> int | None:
    """None if the filesystem of ``folder`` holds a (sparse) file of ``want`` bytes, else the
    largest size it holds.  Learnt on an unnamed temporary file (O_TMPFILE: nothing appears
    in the folder, nothing is left behind); None too where O_TMPFILE is not supported (the
    later ftruncate then reports EFBIG)."""
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except (OSError, AttributeError):
        return None
    try:
        try:
            os.ftruncate(fd, want)
            return None
        except OSError as e:
            if e.errno != errno.EFBIG:
                return None
        lo, hi = 0, want              # lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            try:
                os.ftruncate(fd, mid)
                lo = mid
            except OSError:
                hi = mid
        return lo
    finally:
        os.close(fd)


def _fd_headroom(n_images: int) -> None:
    """Each open image holds two descriptors; raise the soft limit for very deep chains."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * n_images + 64
    if soft != resource.RLIM_INFINITY and need > soft:
        new = need * 2 if hard == resource.RLIM_INFINITY else min(hard, need * 2)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            pass


class _CreateSync:
    """fdatasync a new file, then fsync its folder, on a native thread (no GIL needed, so it
    overlaps the open); wait() closes the descriptors and returns the fdatasync error (once
    done, every later or concurrent wait returns the same)."""

    def __init__(self, fd: int, folder: str):
        self._fd = fd
        self._lock = threading.Lock()
        self._done: tuple[OSError | None] | None = None
        try:
            self._dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            self._dfd = -1
        try:
            self._job = _core.BackgroundSync(fd, self._dfd)
        except BaseException:
            if self._dfd >= 0:
                os.close(self._dfd)
            raise

    def wait(self) -> OSError | None:
        with self._lock:
            if self._done is None:
                err = self._job.wait()
                os.close(self._fd)
                if self._dfd >= 0:
                    os.close(self._dfd)
                self._done = (OSError(err, os.strerror(err)) if err else None,)
            return self._done[0]


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
