"""Volume files on disk: directory sync, removal, and the identity record of a raw
volume (size, inode, content stamp)."""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import threading
from typing import TYPE_CHECKING, Any

from engine.catalog import VolumeRow
from engine.destination import CATALOG_NAME as CATALOG_NAME, LOCK_NAME as LOCK_NAME, \
    LOST_FOUND as LOST_FOUND, VOLUMES_DIR as VOLUMES_DIR, FOLDER_ID_NAME as FOLDER_ID_NAME
from engine.errors import EngineError, ImageNotFound, io_error

if TYPE_CHECKING:
    from engine.image import Image



def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink(path: str) -> bool:
    """Remove the file PATH; False if it was not there.  The name is gone when this returns
    (durable once the folder is synced).  The blocks and cached pages of a large file are
    freed when its last descriptor closes: this holds one across the unlink and lets a helper
    thread close it, as freeing 256 MiB of them takes the kernel about 0.1 s that the caller
    need not wait for (a crash in between frees them too: the file has no name left)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        fd = -1
    try:
        os.unlink(path)
    except BaseException as e:
        if fd >= 0:
            os.close(fd)
        if isinstance(e, FileNotFoundError):
            return False
        raise
    if fd >= 0:
        if os.fstat(fd).st_size >= _RELEASE_LATER_BYTES:
            _release_later(fd)
        else:
            os.close(fd)
    return True


#: Removed files at least this large are closed (and so freed) by the helper thread.
_RELEASE_LATER_BYTES = 64 << 20
_releaser: tuple[int, queue.SimpleQueue[int]] | None = None      # (pid, its queue)
_releaser_lock = threading.Lock()


def _release_later(fd: int) -> None:
    global _releaser
    with _releaser_lock:
        if _releaser is None or _releaser[0] != os.getpid():     # none yet, or a forked child
            q: queue.SimpleQueue[int] = queue.SimpleQueue()
            threading.Thread(target=_close_each, args=(q,), name="cowchain-release",
                             daemon=True).start()
            _releaser = (os.getpid(), q)
        _releaser[1].put(fd)


def _close_each(q: queue.SimpleQueue[int]) -> None:
    while True:
        os.close(q.get())


def close_quietly(img: Image | None) -> None:
    """Close IMG on an error path without hiding the error being handled."""
    if img is not None:
        try:
            img.close()
        except EngineError:
            pass


#: The content stamp of a sealed raw volume: a hash of its size, of the first and the last
#: block holding data when it was sealed (found with SEEK_DATA) and of blocks at fixed
#: offsets spread over the file.  The stamp records where those data blocks were, and a
#: later check reads the same offsets: a copy of the repository that changed which ranges
#: are sparse still has the same stamp.  Cost: O(log size) seeks and ten block reads.
_STAMP_BLOCK = 65536

_STAMP_SAMPLES = 8


def raw_record(path: str, *, sealed: bool, stamp: str | None = None) -> dict[str, Any]:
    """The catalog's record of a raw volume file: size, inode and (SEALED) content stamp
    (STAMP: recompute that recorded stamp's blocks, to compare)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageNotFound("no such file", path=path) from None
    except OSError as e:
        raise io_error(e.errno or errno.EIO, "cannot open", path=path) from None
    try:
        st = os.fstat(fd)
        return {"size": st.st_size, "ino": st.st_ino,
                "stamp": _stamp(fd, st.st_size, path, stamp) if sealed else None}
    finally:
        os.close(fd)


def _data_at_or_after(fd: int, offset: int) -> int | None:
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError:
        return None                     # ENXIO: only holes from OFFSET on


def _stamp(fd: int, size: int, path: str, recorded: str | None = None) -> str:
    """The stamp of raw file FD (SIZE bytes); with RECORDED, over the blocks it names."""
    B = _STAMP_BLOCK
    if recorded is not None:
        try:
            first, last = (int(x) for x in recorded.split(":")[:2])
        except ValueError:
            first = last = -1
    else:
        pos = _data_at_or_after(fd, 0)
        first = last = -1
        if pos is not None and pos < size:
            first = pos // B * B
            lo, hi = first // B, (size - 1) // B      # the last block with data, by bisection
            while lo < hi:
                mid = (lo + hi + 1) // 2
                found = _data_at_or_after(fd, mid * B)
                if found is not None and found < size:
                    lo = found // B if found // B > mid else mid
                else:
                    hi = mid - 1
            last = lo * B
    top = max(0, size - B)
    offsets = [top * i // (_STAMP_SAMPLES - 1) // 512 * 512 for i in range(_STAMP_SAMPLES)]
    h = hashlib.blake2b(digest_size=16)
    h.update(size.to_bytes(8, "little"))
    try:
        for off in offsets + [o for o in (first, last) if 0 <= o < size]:
            h.update(os.pread(fd, B, off))
    except OSError as e:
        raise io_error(e.errno or errno.EIO, "cannot read the volume", path=path) from None
    return f"{first}:{last}:{h.hexdigest()}"


def identity_problem(v: VolumeRow, size: int, ino: int) -> str | None:
    """What is wrong with raw volume V's file, now SIZE bytes at inode INO, against the
    catalog's record (size and inode: the cheap comparison made at every open), or None."""
    if v.format != "raw" or v.size is None:
        return None
    if size < v.size:
        return (f"is {size} bytes, shorter than the {v.size} bytes of disk it serves "
                "(the file was truncated or replaced)")
    if size != v.size:
        return f"is {size} bytes, the catalog records {v.size} (the file was replaced?)"
    if v.ino is not None and ino != v.ino:
        return (f"is not the file the catalog recorded (inode {ino}, recorded {v.ino}): it "
                "was replaced, or the repository was copied")
    return None
