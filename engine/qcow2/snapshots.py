"""The internal snapshot table (§6.1): one parser, with a strict and a lenient mode, and
one encoder.

- strict (:func:`parse_snapshot_table`, :func:`snapshot_table_size`): the rules of QEMU's
  open; the first problem raises a typed error.
- lenient (:func:`read_snapshot_table`): the rules of QEMU's check
  (``qcow2_check_read_snapshot_table``); what QEMU's repair would discard is discarded and
  reported as :class:`SnapshotProblem` records, in table order, so the caller decides which
  of them end a check and which a repair fixes.
- :func:`encode_snapshot_table` builds the table as QEMU's ``qcow2_write_snapshots``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from engine.errors import CorruptImage, EngineError, InvalidArgument, SafetyLimitExceeded

from engine.qcow2.spec import (
    INT_MAX,
    L1E_SIZE,
    MAX_DISK_LENGTH,
    SECTOR_SIZE,
    MAX_L1_SIZE,
    MAX_SNAPSHOTS,
    MAX_SNAPSHOTS_SIZE,
    MAX_SNAPSHOT_EXTRA,
    MAX_U16,
    MAX_U32,
    SNAPSHOT_ENTRY_ALIGN,
    SNAPSHOT_EXTRA_DISK_SIZE_END,
    SNAPSHOT_EXTRA_ICOUNT_END,
    SNAPSHOT_EXTRA_SIZE,
    SNAPSHOT_EXTRA_STRUCT,
    SNAPSHOT_EXTRA_VM_STATE_END,
    SNAPSHOT_HEADER_SIZE,
    SNAPSHOT_HEADER_STRUCT,
    SNAPSHOT_ICOUNT_NONE,
    U64,
)
from engine.qcow2.args import (
    bool_arg,
    buffer_arg,
    check_uint,
    decode_name,
    encode_name,
    int_arg,
)
from engine.qcow2.header import (
    Header,
    header_arg,
    validate_table,
)

# =========================================================================================
# Snapshot table (§6.1)
# =========================================================================================

@dataclass
class SnapshotEntry:
    """One internal snapshot.

    ``extra_data`` is the raw extra data as stored.  Its first 24 bytes are also decoded into
    ``vm_state_size`` (64-bit copy), ``disk_size`` (None when absent: QEMU then uses the
    current virtual size) and ``icount`` (None when absent or all-ones).  On encode the
    decoded fields win for those 24 bytes and the bytes after them are kept verbatim.
    """

    id: str
    name: str
    l1_table_offset: int
    l1_size: int                        # entries
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int                  # bytes
    extra_data: bytes = b""
    disk_size: int | None = None        # bytes
    icount: int | None = None

    @property
    def shown_id(self) -> str:
        """The id for messages: bytes that are not UTF-8 show as U+FFFD (as QEMU prints)."""
        return self.id.encode("utf-8", "surrogateescape").decode("utf-8", "replace")

    @property
    def shown_name(self) -> str:
        """The name for messages (see :attr:`shown_id`)."""
        return self.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclass
class SnapshotProblem:
    """What the lenient reader met and how it went on (QEMU's check wording in comments).

    kind:
        "io": a read QEMU's block layer refuses (past its maximum length); the walk stopped
            ("failed to read the snapshot table: Input/output error").
        "extra": entry ``entry`` has ``value`` bytes of extra data, over the 1024-byte limit;
            only the first 1024 were kept ("Too much extra metadata").
        "too_big": the table passes 64 MiB at entry ``entry``; that entry and the ``value``
            - 1 after it were dropped and the walk stopped ("Snapshot table is too big").
        "incomplete": a v3 entry with less than 16 bytes of extra data (``value``).
    """

    kind: str
    entry: int
    value: int = 0


@dataclass
class SnapshotTable:
    """The result of :func:`read_snapshot_table`.

    ``entries`` are the entries kept; ``size`` is the table's byte size as QEMU counts it
    (from the table offset to the end of the last entry kept; 0 without entries);
    ``problems`` are in table order."""

    entries: list[SnapshotEntry] = field(default_factory=list)
    size: int = 0
    problems: list[SnapshotProblem] = field(default_factory=list)


# The walk below is the one parser.  Its modes:
_STRICT = 0        # QEMU's open: any problem raises; v3 entries need 16 bytes of extra data
_OPEN = 1          # QEMU's open, incomplete v3 entries allowed
_CHECK = 2         # QEMU's check: go on where its repair would, record each problem


def _walk(read: Callable[[int, int], bytes | None], h: Header, nb: int, mode: int,
          path: str | None, file_size: int | None, entries: list[SnapshotEntry] | None,
          problems: list[SnapshotProblem]) -> tuple[bool, int]:
    """Walk ``nb`` entries of the table at ``h.snapshots_offset``.

    ``read(pos, n)`` returns the ``n`` bytes at table offset ``pos``, or None when they are
    not available yet (then the walk returns (False, bytes needed)).  Returns (True, table
    size) at the end: up to the end of the last name kept, without trailing padding, as QEMU
    counts it.
    """
    cluster_size = h.cluster_size
    base = h.snapshots_offset
    off = 0              # where the next entry starts (position in the file, less base)
    length = 0           # the table's length as QEMU counts it (extra data as kept)

    def too_big() -> SafetyLimitExceeded:
        return SafetyLimitExceeded(f"snapshot table is too big (over {MAX_SNAPSHOTS_SIZE} "
                                   "bytes)", limit=MAX_SNAPSHOTS_SIZE, path=path)

    for i in range(nb):
        pre = off
        off = (off + SNAPSHOT_ENTRY_ALIGN - 1) & ~(SNAPSHOT_ENTRY_ALIGN - 1)
        length = (length + SNAPSHOT_ENTRY_ALIGN - 1) & ~(SNAPSHOT_ENTRY_ALIGN - 1)
        if mode == _CHECK and (base + off + SNAPSHOT_HEADER_SIZE + 2 * (MAX_U16 + 1)
                               + MAX_SNAPSHOT_EXTRA > MAX_DISK_LENGTH):
            problems.append(SnapshotProblem("io", i))
            return True, pre
        fixed = read(off, SNAPSHOT_HEADER_SIZE)
        if fixed is None:
            if off + SNAPSHOT_HEADER_SIZE > MAX_SNAPSHOTS_SIZE:
                raise too_big()
            return False, off + SNAPSHOT_HEADER_SIZE
        (l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state32,
         extra_size) = SNAPSHOT_HEADER_STRUCT.unpack(fixed)
        extra_kept = extra_size
        if extra_size > MAX_SNAPSHOT_EXTRA:
            if mode != _CHECK:
                raise SafetyLimitExceeded(
                    f"too much extra metadata in snapshot table entry {i} ({extra_size} > "
                    f"{MAX_SNAPSHOT_EXTRA} bytes)", limit=MAX_SNAPSHOT_EXTRA, path=path)
            problems.append(SnapshotProblem("extra", i, extra_size))
            extra_kept = MAX_SNAPSHOT_EXTRA
        if h.version >= 3 and extra_size < SNAPSHOT_EXTRA_DISK_SIZE_END:
            if mode == _STRICT:
                raise CorruptImage(f"snapshot table entry {i} is incomplete: {extra_size} "
                                   f"bytes of extra data, v3 needs "
                                   f"{SNAPSHOT_EXTRA_DISK_SIZE_END}",
                                   offset=base + off, path=path)
        p = off + SNAPSHOT_HEADER_SIZE
        end = p + extra_size + id_len + name_len
        length += SNAPSHOT_HEADER_SIZE + extra_kept + id_len + name_len
        if mode == _CHECK:
            if extra_size > SNAPSHOT_EXTRA_SIZE and (base + p + extra_size + 2 * (MAX_U16 + 1)
                                                     > MAX_DISK_LENGTH):
                problems.append(SnapshotProblem("io", i))
                return True, pre
            if length > MAX_SNAPSHOTS_SIZE or end > INT_MAX:
                problems.append(SnapshotProblem("too_big", i, nb - i))
                return True, pre
        elif end > MAX_SNAPSHOTS_SIZE:
            raise too_big()
        extra = read(p, extra_kept)
        ids = read(p + extra_size, id_len + name_len)
        if extra is None or ids is None:
            return False, end
        if mode != _CHECK:
            # The snapshot's L1 is checked as QEMU checks it before any use (§8.1).
            validate_table(f"L1 table of snapshot entry {i}", l1_offset, l1_size, L1E_SIZE,
                           MAX_L1_SIZE, cluster_size, file_size or 0, path,
                           check_eof=file_size is not None)
        if mode == _CHECK and h.version >= 3 and extra_size < SNAPSHOT_EXTRA_DISK_SIZE_END:
            problems.append(SnapshotProblem("incomplete", i, extra_size))
        if entries is not None:
            entries.append(_entry(h, mode, l1_offset, l1_size, date_sec, date_nsec, vm_clock,
                                  vm_state32, extra, ids[:id_len], ids[id_len:]))
        off = end
    return True, off


def _entry(h: Header, mode: int, l1_offset: int, l1_size: int, date_sec: int, date_nsec: int,
           vm_clock: int, vm_state32: int, extra: bytes, sid: bytes, sname: bytes
           ) -> SnapshotEntry:
    """One entry from its fields: the 64-bit vm_state_size, disk_size and icount come from
    the extra data where it is long enough to hold them."""
    vm_state = vm_state32
    disk_size = icount = None
    if len(extra) >= SNAPSHOT_EXTRA_VM_STATE_END:
        vm_state = U64.unpack_from(extra, 0)[0]
    if len(extra) >= SNAPSHOT_EXTRA_DISK_SIZE_END:
        disk_size = U64.unpack_from(extra, SNAPSHOT_EXTRA_VM_STATE_END)[0]
    elif mode == _CHECK:
        # QEMU's reader takes the disk size in whole sectors when the entry has none.
        disk_size = h.size // SECTOR_SIZE * SECTOR_SIZE
    if len(extra) >= SNAPSHOT_EXTRA_ICOUNT_END:
        icount = U64.unpack_from(extra, SNAPSHOT_EXTRA_DISK_SIZE_END)[0]
        if icount == SNAPSHOT_ICOUNT_NONE:
            icount = None
    return SnapshotEntry(
        id=decode_name(sid), name=decode_name(sname), l1_table_offset=l1_offset,
        l1_size=l1_size, date_sec=date_sec, date_nsec=date_nsec, vm_clock_nsec=vm_clock,
        vm_state_size=vm_state, extra_data=extra, disk_size=disk_size, icount=icount)


def _buffer_reader(buf: bytes) -> Callable[[int, int], bytes | None]:
    mv = memoryview(bytes(buf)) if not isinstance(buf, (bytes, bytearray)) else memoryview(buf)

    def read(pos: int, n: int) -> bytes | None:
        return bytes(mv[pos:pos + n]) if pos + n <= len(mv) else None
    return read


def _guarded(path: str | None, fn: Callable[[], tuple[bool, int]]) -> tuple[bool, int]:
    try:
        return fn()
    except EngineError:
        raise
    except Exception as e:  # pragma: no cover - defence in depth against hostile bytes
        raise CorruptImage(f"malformed snapshot table ({type(e).__name__}: {e})",
                           path=path) from e


def read_snapshot_table(read: Callable[[int, int], bytes], h: Header, nb: int
                        ) -> SnapshotTable:
    """The lenient mode: the snapshot table as QEMU's check reads it.

    Arguments:
        read: ``read(pos, n)`` returns the ``n`` bytes at offset ``pos`` of the table
            (``h.snapshots_offset + pos`` in the file), zeros past the end of the file.
        h (Header): the header (version, size, snapshots_offset).
        nb (int): how many entries to read (the caller has already applied QEMU's limit
            on the count).

    Returns:
        SnapshotTable: every entry kept, the table size, and the problems met (see
        :class:`SnapshotProblem`); what QEMU's repair discards is discarded.  Entries
        without a disk size get the virtual size in whole sectors, as QEMU's reader sets it.
        Nothing raises for a damaged table.
    """
    t = SnapshotTable()
    _complete, t.size = _guarded(None, lambda: _walk(read, h, nb, _CHECK, None, None,
                                                     t.entries, t.problems))
    if not t.entries:
        t.size = 0
    return t


def snapshot_table_size(buf: bytes, h: Header, *, path: str | None = None) -> int:
    """How many bytes of the snapshot table to read.

    Arguments:
        buf (bytes-like): bytes from ``h.snapshots_offset`` (possibly only a prefix).
        h (Header): the image header.

    Returns:
        int: if ``buf`` holds the whole table, its exact size in bytes (up to the end of the
        last entry's name; 0 without snapshots).  Otherwise a number larger than
        ``len(buf)``: read at least that many bytes and call again.  The answer never
        exceeds QEMU's 64 MiB limit, so a caller can read incrementally with bounded memory.

    Raises:
        SafetyLimitExceeded: the table or one entry's extra data is over QEMU's limits.
        CorruptImage: an entry is malformed (see :func:`parse_snapshot_table`).
    """
    buf = buffer_arg(buf, "buf")
    header_arg(h)
    return _guarded(path, lambda: _walk(_buffer_reader(buf), h, h.nb_snapshots, _OPEN, path,
                                         None, None, []))[1]


def parse_snapshot_table(buf: bytes, h: Header, *, file_size: int | None = None,
                         strict: bool = True, path: str | None = None
                         ) -> list[SnapshotEntry]:
    """Parse and validate the internal snapshot table.

    Arguments:
        buf (bytes-like): bytes from ``h.snapshots_offset`` to at most the end of the file
            (the table is at most 64 MiB; see :func:`snapshot_table_size`).
        h (Header): the image header (nb_snapshots, version, cluster size).
        file_size (int | None): when given, snapshot L1 tables must lie inside the file.
        strict (bool): refuse v3 entries with less than 16 bytes of extra data (qemu-img
            check reports them as corrupt).  Pass False for check/repair.
        path (str | None): file name for error messages.

    Returns:
        list[SnapshotEntry]: the entries in table order.

    Raises:
        SafetyLimitExceeded: extra data over 1024 bytes, a table over 64 MiB, a snapshot L1
            over 32 MiB.
        CorruptImage: entries running past ``buf`` (the end of the file), a misaligned or
            overflowing snapshot L1 offset, an incomplete v3 entry (``strict``).
    """
    buf = buffer_arg(buf, "buf")
    header_arg(h)
    if file_size is not None:
        file_size = int_arg(file_size, "file_size")
    bool_arg(strict, "strict")
    entries: list[SnapshotEntry] = []
    complete, n = _guarded(path, lambda: _walk(_buffer_reader(buf), h, h.nb_snapshots,
                                                _STRICT if strict else _OPEN, path, file_size,
                                                entries, []))
    if not complete:
        raise CorruptImage(f"snapshot table runs past the end of the file: entry "
                           f"{len(entries)} needs {n} bytes, only {len(buf)} available",
                           offset=h.snapshots_offset, path=path)
    return entries


def encode_snapshot_table(entries: list[SnapshotEntry], h: Header) -> bytes:
    """Build the snapshot table as QEMU's ``qcow2_write_snapshots`` does.

    Each entry starts at a multiple of 8 (zero padding); extra_data_size is
    ``max(24, len(entry.extra_data))``; the 32-bit vm_state_size is 0 when the size does not
    fit; a missing disk_size is written as ``h.size`` and a missing icount as all-ones.  The
    result has no trailing padding (QEMU allocates and writes exactly this many bytes).

    Raises:
        SafetyLimitExceeded: too many entries, extra data over 1024 bytes, or a table over
            64 MiB.
        InvalidArgument: a field does not fit its on-disk width.
    """
    header_arg(h)
    if not isinstance(entries, (list, tuple)) or not all(
            isinstance(e, SnapshotEntry) for e in entries):
        raise InvalidArgument("entries must be a list of SnapshotEntry", value=entries)
    if len(entries) > MAX_SNAPSHOTS:
        raise SafetyLimitExceeded(f"{len(entries)} snapshots, QEMU's limit is {MAX_SNAPSHOTS}",
                                  limit=MAX_SNAPSHOTS)
    out = bytearray()
    for i, sn in enumerate(entries):
        sid = encode_name(sn.id, "snapshot id")
        sname = encode_name(sn.name, "snapshot name")
        if len(sid) > MAX_U16 or len(sname) > MAX_U16:
            raise InvalidArgument(f"snapshot entry {i}: id or name longer than {MAX_U16} bytes")
        extra_in = bytes(sn.extra_data or b"")
        if len(extra_in) > MAX_SNAPSHOT_EXTRA:
            raise SafetyLimitExceeded(f"snapshot entry {i}: {len(extra_in)} bytes of extra "
                                      f"data, limit {MAX_SNAPSHOT_EXTRA}",
                                      limit=MAX_SNAPSHOT_EXTRA)
        for name, bits in (("l1_table_offset", 64), ("l1_size", 32), ("date_sec", 32),
                           ("date_nsec", 32), ("vm_clock_nsec", 64), ("vm_state_size", 64)):
            check_uint(getattr(sn, name), bits, f"snapshot entry {i} {name}")
        disk_size = h.size if sn.disk_size is None else sn.disk_size
        icount = SNAPSHOT_ICOUNT_NONE if sn.icount is None else sn.icount
        check_uint(disk_size, 64, f"snapshot entry {i} disk_size")
        check_uint(icount, 64, f"snapshot entry {i} icount")
        extra = (SNAPSHOT_EXTRA_STRUCT.pack(sn.vm_state_size, disk_size, icount)
                 + extra_in[SNAPSHOT_EXTRA_SIZE:])
        vm_state32 = sn.vm_state_size if sn.vm_state_size <= MAX_U32 else 0
        out += bytes(-len(out) % SNAPSHOT_ENTRY_ALIGN)
        out += SNAPSHOT_HEADER_STRUCT.pack(sn.l1_table_offset, sn.l1_size, len(sid), len(sname),
                                     sn.date_sec, sn.date_nsec, sn.vm_clock_nsec, vm_state32,
                                     len(extra))
        out += extra + sid + sname
        if len(out) > MAX_SNAPSHOTS_SIZE:
            raise SafetyLimitExceeded(f"snapshot table is too big (over {MAX_SNAPSHOTS_SIZE} "
                                      "bytes)", limit=MAX_SNAPSHOTS_SIZE)
    return bytes(out)
