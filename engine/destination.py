"""The one rule for files cowchain writes outside a repository (export, ``chain read --out``).

A destination is refused (:class:`~engine.errors.UnsafeDestination`), with or without
``overwrite``, when it resolves — after symlinks in its folder, ``..``, and hard links compared
by ``(st_dev, st_ino)`` — to anything inside a repository folder (a folder holding a catalog
and a ``volumes/`` folder), or to a file that an open image or an open repository of this
process uses.  The destination itself must be:

* a name that does not exist yet: the file is written under a temporary name in the same
  folder, fsynced, renamed into place and the folder fsynced;
* an existing regular file, only with ``overwrite=True``: replaced the same way, atomically
  (the old file stays whole until the rename);
* a block device, only with ``device=True`` (``--output-device``): written in place.

A symbolic link, folder, FIFO, socket or character device is never written, followed or
replaced.  Standard output is a separate, explicit choice (``-`` on the command line, a file
descriptor in Python: :func:`check_fd`).

The process-wide registry of files in use is filled by the image open path
(:func:`register_fd`) and by :class:`~engine.repository.Repository` (:func:`register_folder`).
"""

from __future__ import annotations

import os
import stat
import threading
import uuid
from collections import Counter

from engine.errors import InvalidArgument, NotFound, UnsafeDestination, io_error

#: The repository folder: <repo>/catalog.db, <repo>/volumes/<uuid>.qcow2|.raw,
#: <repo>/repository.lock, and lost+found/ for stray files a repair moved aside; a folder
#: whose catalog is in PostgreSQL has <repo>/repository.id instead of catalog.db.  Named here,
#: the lowest room that needs them (this rule must know a repository's files without
#: importing the repository); engine.repository takes them from here.
CATALOG_NAME = "catalog.db"
VOLUMES_DIR = "volumes"
LOCK_NAME = "repository.lock"
LOST_FOUND = "lost+found"
FOLDER_ID_NAME = "repository.id"

_lock = threading.Lock()
_files: Counter = Counter()        # (st_dev, st_ino) of files open images use
_folders: Counter = Counter()      # real paths of open repositories


def register_fd(fd: int) -> tuple[int, int]:
    """Record that FD's file is in use (an open image); returns the key for unregister."""
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    with _lock:
        _files[key] += 1
    return key


def unregister(key: tuple[int, int]) -> None:
    with _lock:
        _files[key] -= 1
        if _files[key] <= 0:
            del _files[key]


def register_folder(path: str) -> str:
    """Record an open repository's folder (its catalog and volumes are in use)."""
    real = os.path.realpath(path)
    with _lock:
        _folders[real] += 1
    return real


def unregister_folder(real: str) -> None:
    with _lock:
        _folders[real] -= 1
        if _folders[real] <= 0:
            del _folders[real]


def _is_repository(folder: str) -> bool:
    with _lock:
        if folder in _folders:
            return True
    return ((os.path.isfile(os.path.join(folder, CATALOG_NAME))
             or os.path.isfile(os.path.join(folder, FOLDER_ID_NAME)))
            and os.path.isdir(os.path.join(folder, VOLUMES_DIR)))


def _repository_above(real: str) -> str | None:
    """The repository folder REAL (a resolved path) is in, or None."""
    cur = real
    while True:
        if _is_repository(cur):
            return cur
        parent = os.path.dirname(cur)
        if parent == cur:
            return None
        cur = parent


def _in_use(st: os.stat_result) -> bool:
    """Is the file with this stat an open image, or a file of an open repository?"""
    key = (st.st_dev, st.st_ino)
    with _lock:
        if key in _files:
            return True
        folders = list(_folders)
    if st.st_nlink < 2:
        return False      # one name only, and that name is not in a repository (checked)
    for folder in folders:
        for sub in (folder, os.path.join(folder, VOLUMES_DIR)):
            try:
                names = os.listdir(sub)
            except OSError:
                continue
            for n in names:
                try:
                    s = os.lstat(os.path.join(sub, n))
                except OSError:
                    continue
                if (s.st_dev, s.st_ino) == key:
                    return True
    return False


def _refuse_if_used(st: os.stat_result, path: str) -> None:
    if _in_use(st):
        raise UnsafeDestination("is a file an open image or repository uses (possibly "
                                "through a hard link); it is never written",
                                path=path, hint="choose a file outside every repository")
    # A hard link whose other names are not in use stays safe: a replace renames a new file
    # over this name, and the other names keep the old data.


class Destination:
    """A checked destination (from :func:`check`).

    Attributes:
        path (str): the resolved path that will be written.
        kind (str): "new", "replace" (an existing regular file, overwrite=True) or "device".
    """

    __slots__ = ("path", "kind")

    def __init__(self, path: str, kind: str):
        self.path = path
        self.kind = kind

    @property
    def folder(self) -> str:
        return os.path.dirname(self.path)

    def temp_path(self) -> str:
        """A fresh name in the destination's folder to write before :meth:`commit`."""
        return os.path.join(self.folder,
                            f".{os.path.basename(self.path)}.{uuid.uuid4().hex[:12]}.part")

    def commit(self, tmp: str) -> None:
        """Publish TMP (written and fsynced) under the destination's name: the name is checked
        again (a link or device put there meanwhile is refused), renamed over, and the folder
        fsynced."""
        check(self.path, overwrite=self.kind == "replace")
        try:
            os.replace(tmp, self.path)
            fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise io_error(e.errno, "cannot publish the file", path=self.path) from None


def check(path, *, overwrite: bool = False, device: bool = False) -> Destination:
    """Apply the destination rule to PATH (see the module docstring) and return where and how
    to write it.

    Raises:
        UnsafeDestination: PATH is inside a repository, is a file in use, a link, a folder, a
            FIFO, socket or character device, a block device without ``device=True``, or not
            a block device with ``device=True``.
        InvalidArgument: PATH exists and ``overwrite`` is false.
        NotFound: PATH's folder does not exist.
    """
    if isinstance(path, int) or path is None:
        raise InvalidArgument(f"a destination path is required, not {path!r}")
    raw = os.fspath(path)
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    name = os.path.basename(raw)
    if name in ("", ".", ".."):
        raise UnsafeDestination("is a folder, not a file name", path=raw)
    # the folder with every symlink and '..' resolved; the last name is never followed
    folder = os.path.realpath(os.path.dirname(raw) or ".")
    if not os.path.isdir(folder):
        raise NotFound("the destination folder does not exist", path=raw)
    dest = os.path.join(folder, name)
    repo = _repository_above(folder)
    if repo is not None:
        raise UnsafeDestination(f"is inside the cowchain repository {repo}; its files are "
                                "never written from outside", path=raw,
                                hint="choose a file outside every repository")
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        if device:
            raise UnsafeDestination("does not exist; the device option writes only to an "
                                    "existing block device", path=raw) from None
        return Destination(dest, "new")
    except OSError as e:
        raise io_error(e.errno, "cannot look at the destination", path=raw) from None
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        raise UnsafeDestination("is a symbolic link; cowchain never writes through or "
                                "replaces a link", path=raw,
                                hint="name the link's target itself, or another file")
    if stat.S_ISDIR(mode):
        raise UnsafeDestination("is a folder", path=raw)
    _refuse_if_used(st, raw)
    if stat.S_ISBLK(mode):
        if not device:
            raise UnsafeDestination("is a block device; writing into a device is its own "
                                    "choice, never a side effect of replacing a file", path=raw,
                                    hint="pass output_device=True to write to the device")
        return Destination(dest, "device")
    if not stat.S_ISREG(mode):
        what = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a character device" if stat.S_ISCHR(mode) else "not a regular file")
        raise UnsafeDestination(f"is {what}; only regular files and block devices are written",
                                path=raw, hint="write to standard output instead")
    if device:
        raise UnsafeDestination("is a regular file, not a block device", path=raw,
                                hint="drop output_device to write a file")
    if not overwrite:
        raise InvalidArgument("file exists", path=raw, hint="pass overwrite=True to replace it")
    return Destination(dest, "replace")


def check_fd(fd: int) -> None:
    """The rule for an already open descriptor (standard output): it must not be a file an
    open image or repository uses, nor a file inside a repository folder.

    Raises:
        UnsafeDestination: it is.
    """
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise io_error(e.errno, f"cannot use file descriptor {fd}") from None
    _refuse_if_used(st, f"<fd {fd}>")
    if stat.S_ISREG(st.st_mode):
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return
        repo = _repository_above(os.path.dirname(where))
        if repo is not None:
            raise UnsafeDestination(f"is inside the cowchain repository {repo}; its files "
                                    "are never written from outside", path=where)


def write_bytes(path, data, *, overwrite: bool = False) -> str:
    """Write DATA to PATH under the destination rule (atomically for a file); returns the
    path written."""
    dest = check(path, overwrite=overwrite)
    tmp = dest.temp_path()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise io_error(e.errno, "cannot create the file", path=tmp) from None
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        dest.commit(tmp)
    except OSError as e:
        _unlink(tmp)
        raise io_error(e.errno, "cannot write the file", path=dest.path) from None
    except BaseException:
        _unlink(tmp)
        raise
    return dest.path


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
