"""The exceptions cowchain raises.

Every failure a caller can see is an :class:`EngineError`.  The subclasses are split by what
the caller can do about it; each carries its facts as attributes and a message that says what
is wrong and what to do.  Where a builtin exception fits, the class also derives from it, so
``except FileNotFoundError`` or ``except OSError`` keep working.
"""

from __future__ import annotations

import errno as _errno
import os as _os
import re


class EngineError(Exception):
    """Base of every error cowchain raises on purpose.

    Attributes:
        path (str | None): the file the error is about, when there is one. For an error met
            while reading or writing through a backing chain, the volume where it happened.
        image (str | None): for such errors, the image the call was made on (the top of the
            chain); None otherwise.
        hint (str): what the caller can do about it.
    """

    image: str | None = None

    exit_code = 19
    default_hint = ""
    #: what the exit code means, for the table (default: the docstring's first clause)
    exit_meaning = "another engine error"

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None):
        self.path = path
        self.hint = self.default_hint if hint is None else hint
        self.message = message
        text = message if path is None else f"{path}: {message}"
        if self.hint:
            text = f"{text} ({self.hint})"
        super().__init__(text)


class ImageNotFound(EngineError, FileNotFoundError):
    """The image file does not exist. Check the path."""

    exit_code = 17
    default_hint = "check the path"


class ImageFormatError(EngineError):
    """The bytes are not an image in a format we read (bad magic, unsupported version,
    a header field outside what the format allows)."""

    exit_code = 18
    default_hint = "the file is not a valid QCOW2 image; open it with format='raw' if it is raw"


class UnsupportedFeature(EngineError):
    """The image uses a feature this engine does not implement (an unknown incompatible bit,
    encryption, an external data file, ...).

    Attributes:
        feature (str): the feature's name.
    """

    exit_code = 4
    default_hint = "convert the image with qemu-img to a plain qcow2 image first"

    def __init__(self, feature: str, message: str | None = None, **kw: str | None):
        self.feature = feature
        super().__init__(message or f"unsupported feature: {feature}", **kw)


class CorruptImage(EngineError):
    """The image's metadata is inconsistent (entries past the end of the file, misaligned
    tables, reserved bits, refcount mismatches).

    Attributes:
        offset (int | None): the host offset of the bad structure, when known.
    """

    exit_code = 5
    default_hint = "repair a copy with Image.check(repair='all') or 'qemu-img check -r all'"

    def __init__(self, message: str, *, offset: int | None = None, **kw: str | None):
        self.offset = offset
        super().__init__(message, **kw)


class SafetyLimitExceeded(EngineError):
    """A size or count in the image or the request is over a limit we enforce (QEMU's limits
    for tables, snapshots, names; our own for chain depth).

    Attributes:
        limit (int | None): the limit that was exceeded.
    """

    exit_code = 6
    default_hint = "the image asks for more than QEMU would allow; it is likely corrupt or hostile"

    def __init__(self, message: str, *, limit: int | None = None, **kw: str | None):
        self.limit = limit
        super().__init__(message, **kw)


class ChainError(EngineError):
    """The backing chain cannot be assembled: a backing file is missing, the chain loops, or
    it is deeper than the configured limit."""

    exit_code = 7
    default_hint = "check the backing files with 'qemu-img info --backing-chain'"


class UnsafeBackingReference(ChainError):
    """A backing reference we refuse to follow by policy: an absolute path, a name leaving the
    overlay's folder, a ``json:`` or protocol name, or a missing backing format.

    Attributes:
        reference (str): the backing name as stored in the image.
    """

    exit_code = 8
    default_hint = ("backing files must be named relative to the overlay's folder, with the "
                    "format recorded; pass allow_unsafe_backing=True only for images you trust")

    def __init__(self, reference: str, message: str, **kw: str | None):
        self.reference = reference
        super().__init__(message, **kw)


class ImageLocked(EngineError):
    """Another process (QEMU or another cowchain) holds the image in a way that conflicts
    with this open."""

    exit_code = 9
    exit_meaning = "another process holds the image in a conflicting way"
    default_hint = "is another process using the image? close it, or open read-only"


class ReadOnlyImage(EngineError):
    """A write was attempted on an image opened read-only (or an image whose corrupt bit is
    set, which may only be opened read-only)."""

    exit_code = 10
    default_hint = "open the image with readonly=False"


class ImageClosed(EngineError, ValueError):
    """The image (or chain, or repository) was used after close()."""

    exit_code = 11
    exit_meaning = "the image, chain or repository was used after close()"
    default_hint = "open it again"


class InvalidArgument(EngineError, ValueError):
    """A call's arguments are out of range (offset past the end of the disk, a negative length,
    an unknown option).

    Attributes:
        value: the argument that was refused, when the error is about one value (else None).
    """

    exit_code = 12

    def __init__(self, message: str, *, value: object = None, **kw: str | None):
        self.value = value
        super().__init__(message, **kw)


class UnsafeDestination(InvalidArgument):
    """An export or read destination that must not be written: it lies inside a repository
    folder or is a file an open image or catalog uses (after symlinks, ``..`` and hard
    links), it is a symlink, folder, FIFO, socket or character device, or it is a block
    device that was not asked for as one (see :func:`engine.destination.check`)."""

    exit_code = 20


class EngineIOError(EngineError, OSError):
    """The operating system reported an I/O error.

    Attributes:
        errno (int): the OS error number.

    A failed flush is sticky: every later flush on the same handle fails too, until the image
    is closed, reopened and checked (a failed fsync may have dropped dirty pages).
    """

    exit_code = 13
    default_hint = "check the disk and the kernel log, then reopen the image and run check"

    def __init__(self, err: int, message: str, **kw: str | None):
        super().__init__(f"{message}: {_os.strerror(err)}" if err else message, **kw)
        # after the base initialisers: OSError.__init__ with one argument resets errno
        self.errno = err
        self.strerror = _os.strerror(err) if err else message


class NoSpace(EngineIOError):
    """The filesystem is full (ENOSPC/EDQUOT). Nothing acknowledged by flush() is lost; the
    operation that failed did not take effect."""

    exit_code = 14
    default_hint = "free space on the filesystem, then retry"


class RepositoryError(EngineError):
    """A repository, chain or snapshot request cannot be carried out (unknown name, a volume
    still used by a clone, an operation not allowed in the chain's state)."""

    exit_code = 15


class NotFound(RepositoryError, LookupError):
    """A chain, snapshot or volume with that name or id does not exist."""

    exit_code = 16


class CatalogUnavailable(RepositoryError):
    """The PostgreSQL catalog could not be reached or did not answer in time (a restart, a
    broken connection, a lock or statement timeout).  Nothing was half applied: a catalog
    transaction that was interrupted was rolled back by the server, so the operation can be
    retried."""

    exit_code = 24
    exit_meaning = "the shared catalog is unreachable or busy (retry the operation)"
    default_hint = ("retry the operation once the database server is reachable; reopen the "
                    "repository if it keeps failing")


class VolumeDamaged(RepositoryError):
    """A volume of a chain is damaged, or is not the file the catalog recorded: a raw volume
    truncated or replaced, a QCOW2 volume with the corrupt bit set, a volume marked ILLEGAL or
    found damaged by check.  Reads through a volume that is not the recorded file, and new
    snapshots on a chain with a damaged volume, are refused.

    Attributes:
        volume (str): the volume's id.   chain (str | None): its chain.
        cli_hint (str): the hint in command-line words (``hint`` names the Python API).
    """

    exit_code = 21
    exit_meaning = "refused: a volume of the chain is damaged or is not the recorded file"

    def __init__(self, message: str, *, volume: str, chain: str | None = None,
                 cli_hint: str | None = None, **kw: str | None):
        self.volume = volume
        self.chain = chain
        super().__init__(message, **kw)
        self.cli_hint = self.hint if cli_hint is None else cli_hint



class ChainLeased(EngineError):
    """Another host holds the chain's write lease (a repository shared by several hosts).

    Attributes:
        chain (str): the chain.   holder (str): the host holding its lease.
        expires_in (float): seconds until that lease expires unless renewed.
    """

    exit_code = 22
    exit_meaning = "refused: another host holds the chain's write lease"
    default_hint = ("wait for that host to release it, or for the lease to expire; if the "
                    "host is dead, an operator may run 'cowchain chain release --force CHAIN'")

    def __init__(self, chain: str, holder: str, expires_in: float, **kw: str | None):
        self.chain = chain
        self.holder = holder
        self.expires_in = expires_in
        super().__init__(f"chain {chain!r} is leased for writing by host {holder!r} "
                         f"(the lease expires in {max(expires_in, 0.0):.1f} s unless renewed)",
                         **kw)


class LeaseLost(EngineError):
    """This host no longer holds the chain's write lease (its renewal failed or came too
    late, or another host took the chain over): writes and catalog changes are refused.

    Attributes:
        chain (str): the chain.   epoch (int): the lease's fencing epoch this host held.
    """

    exit_code = 23
    exit_meaning = "refused: this host lost the chain's write lease"
    default_hint = ("this host stopped writing the chain; acquire the lease again (a new "
                    "epoch) and reopen the chain before writing")

    def __init__(self, chain: str, epoch: int, why: str, **kw: str | None):
        self.chain, self.epoch = chain, epoch
        super().__init__(f"lost the write lease of chain {chain!r} (epoch {epoch}): {why}",
                         **kw)


#: The process exit codes, in one table: the command line exits with these, ``cowchain
#: --help`` and README print them (:func:`exit_code_table`). ``check`` uses qemu-img check's
#: codes 0-3 and nothing else uses 1-3; every EngineError subclass has its own code.
EX_OK = 0
EX_CHECK_INCOMPLETE = 1
EX_CHECK_CORRUPT = 2
EX_CHECK_LEAKS = 3
EX_USAGE = 64
EX_SOFTWARE = 70
EX_IOERR = 74
EX_INTERRUPTED = 130

_OTHER_CODES = [
    (EX_OK, "success; check: no problems (or all repaired)"),
    (EX_CHECK_INCOMPLETE, "check: the check could not be completed"),
    (EX_CHECK_CORRUPT, "check: corruptions or other problems remain"),
    (EX_CHECK_LEAKS, "check: only leaked clusters remain (harmless; --repair frees them)"),
    (EX_USAGE, "usage error (a command line that does not make sense)"),
    (EX_SOFTWARE, "internal error (a bug: please report it)"),
    (EX_IOERR, "the operating system refused a file named on the command line"),
    (EX_INTERRUPTED, "interrupted (Ctrl-C)"),
]


def _error_classes() -> list[type[EngineError]]:
    out: list[type[EngineError]] = []
    todo: list[type[EngineError]] = [EngineError]
    while todo:
        cls = todo.pop(0)
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def exit_codes() -> list[tuple[int, str]]:
    """Every exit code with its meaning, sorted by code: the process codes above and one
    line per EngineError subclass (its name and the first line of its docstring)."""
    rows = list(_OTHER_CODES)
    for cls in _error_classes():
        what = cls.__dict__.get("exit_meaning")
        if what is None:
            what = re.split(r"[.:(]| \(", " ".join((cls.__doc__ or "").split()), maxsplit=1)[0]
            what = what.strip()[:1].lower() + what.strip()[1:]
        rows.append((cls.exit_code, f"{cls.__name__}: {what}"))
    return sorted(rows)


def exit_code_table() -> str:
    """The exit codes as text, one per line (``cowchain --help`` and README show this)."""
    return "\n".join(f"{code:>4}  {meaning}" for code, meaning in exit_codes())


def io_error(err: int, message: str, *, path: str | None = None) -> EngineIOError:
    """The one place that turns an OS error number into an EngineError subclass."""
    if err in (_errno.ENOSPC, _errno.EDQUOT):
        return NoSpace(err, message, path=path)
    return EngineIOError(err, message, path=path)


__all__ = [name for name, obj in list(globals().items())
           if isinstance(obj, type) and issubclass(obj, EngineError)] + ["io_error"]
# (exit_codes, exit_code_table and the EX_ constants are used as engine.errors.NAME)
