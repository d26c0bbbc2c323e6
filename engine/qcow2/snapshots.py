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
    L1E_SIZE,
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


def _snapshot_walk(buf: bytes, h: Header, entries: list[SnapshotEntry] | None, strict: bool, path: str | None,
                   file_size: int | None) -> tuple[bool, int]:
    """Walk ``h.nb_snapshots`` entries of ``buf`` (bytes from snapshots_offset).

    Returns (complete, n): when complete, n is the table size in bytes (up to the end of
    the last name, without trailing padding, as QEMU counts it); otherwise n > len(buf) is
    the number of bytes needed to make progress.
    """
    mv = memoryview(bytes(buf)) if not isinstance(buf, (bytes, bytearray)) else buf
    cluster_size = h.cluster_size
    off = 0

    def short(needed: int) -> tuple[bool, int]:
        # Whatever the rest of the entry holds, it would end past the limit.
        if needed > MAX_SNAPSHOTS_SIZE:
            raise SafetyLimitExceeded(f"snapshot table is too big (over {MAX_SNAPSHOTS_SIZE} "
                                      "bytes)", limit=MAX_SNAPSHOTS_SIZE, path=path)
        return False, needed

    for i in range(h.nb_snapshots):
        off = (off + SNAPSHOT_ENTRY_ALIGN - 1) & ~(SNAPSHOT_ENTRY_ALIGN - 1)
        if off + SNAPSHOT_HEADER_SIZE > len(mv):
            return short(off + SNAPSHOT_HEADER_SIZE)
        (l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state32,
         extra_size) = SNAPSHOT_HEADER_STRUCT.unpack_from(mv, off)
        if extra_size > MAX_SNAPSHOT_EXTRA:
            raise SafetyLimitExceeded(f"too much extra metadata in snapshot table entry {i} "
                                      f"({extra_size} > {MAX_SNAPSHOT_EXTRA} bytes)",
                                      limit=MAX_SNAPSHOT_EXTRA, path=path)
        if strict and h.version >= 3 and extra_size < SNAPSHOT_EXTRA_DISK_SIZE_END:
            raise CorruptImage(f"snapshot table entry {i} is incomplete: {extra_size} bytes "
                               f"of extra data, v3 needs {SNAPSHOT_EXTRA_DISK_SIZE_END}",
                               offset=h.snapshots_offset + off, path=path)
        end = off + SNAPSHOT_HEADER_SIZE + extra_size + id_len + name_len
        if end > MAX_SNAPSHOTS_SIZE:
            raise SafetyLimitExceeded(f"snapshot table is too big (over {MAX_SNAPSHOTS_SIZE} "
                                      "bytes)", limit=MAX_SNAPSHOTS_SIZE, path=path)
        if end > len(mv):
            return short(end)
        # The snapshot's L1 is checked as QEMU checks it before any use (§8.1).
        name_of = f"L1 table of snapshot entry {i}"
        validate_table(name_of, l1_offset, l1_size, L1E_SIZE, MAX_L1_SIZE, cluster_size,
                        file_size or 0, path, check_eof=file_size is not None)
        if entries is not None:
            p = off + SNAPSHOT_HEADER_SIZE
            extra = bytes(mv[p:p + extra_size])
            vm_state = vm_state32
            disk_size = icount = None
            if extra_size >= SNAPSHOT_EXTRA_VM_STATE_END:
                vm_state = U64.unpack_from(extra, 0)[0]
            if extra_size >= SNAPSHOT_EXTRA_DISK_SIZE_END:
                disk_size = U64.unpack_from(extra, SNAPSHOT_EXTRA_VM_STATE_END)[0]
            if extra_size >= SNAPSHOT_EXTRA_ICOUNT_END:
                icount = U64.unpack_from(extra, SNAPSHOT_EXTRA_DISK_SIZE_END)[0]
                if icount == SNAPSHOT_ICOUNT_NONE:
                    icount = None
            p += extra_size
            sid = decode_name(bytes(mv[p:p + id_len]))
            p += id_len
            sname = decode_name(bytes(mv[p:p + name_len]))
            entries.append(SnapshotEntry(
                id=sid, name=sname, l1_table_offset=l1_offset, l1_size=l1_size,
                date_sec=date_sec, date_nsec=date_nsec, vm_clock_nsec=vm_clock,
                vm_state_size=vm_state, extra_data=extra, disk_size=disk_size, icount=icount))
        off = end
    return True, off


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
    try:
        return _snapshot_walk(buf, h, None, False, path, None)[1]
    except EngineError:
        raise
    except Exception as e:  # pragma: no cover - defence in depth
        raise CorruptImage(f"malformed snapshot table ({type(e).__name__}: {e})",
                           path=path) from e


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
    try:
        complete, n = _snapshot_walk(buf, h, entries, strict, path, file_size)
    except EngineError:
        raise
    except Exception as e:  # pragma: no cover - defence in depth
        raise CorruptImage(f"malformed snapshot table ({type(e).__name__}: {e})",
                           path=path) from e
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
