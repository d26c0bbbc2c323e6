"""Consistency check and repair of a QCOW2 image, with ``qemu-img check`` semantics.

:func:`check_file` recomputes every reference count of the image from its metadata and
compares it with the refcounts stored on disk, step for step as QEMU 7.2's
``qcow2_co_check_locked`` does (docs/on-disk.md section 7.3). The result, :class:`CheckResult`,
carries the counts ``qemu-img check --output=json`` prints, with the same names, presence
rules and exit codes; the tests compare them with qemu-img's field by field.

What carries a reference (+1 per reference met in each traversal):

- the header cluster; the active L1 table and each snapshot's L1 table (every cluster their
  bytes span); each L2 table, once per L1 entry pointing to it; each NORMAL or ZERO_ALLOC data
  cluster, once per traversal of an L2 table holding it; each compressed entry, +1 on every
  host cluster its byte range overlaps (section 4.5);
- the snapshot table, the refcount table, the LUKS header area, the bitmap directory, the
  bitmap tables and bitmap data clusters; each refcount block (which must end up at exactly 1).

Verdicts, as QEMU gives them:

- stored < computed: a corruption ("ERROR cluster N refcount=S reference=R"); a stored 0 for a
  referenced cluster also means the refcount structures must be rebuilt;
- stored > computed: a leak ("Leaked cluster N refcount=S reference=R");
- structural corruptions: reserved bits in L1/L2/reftable entries, unaligned tables or data
  clusters, references running one cluster or more past the end of the file, COPIED not
  agreeing with refcount == 1 in the active tree, COPIED on compressed entries, invalid
  extended-L2 bitmaps, refcount blocks whose refcount is not 1 or that lie outside the file,
  refcount overflows, invalid snapshot table entries, snapshot L1 tables unaligned or too
  large, and (beyond ``qemu-img check`` 7.2, see below) the zero flag in a version 2 image;
- check errors (exit code 1): what the check cannot examine: refcounts behind an unreadable
  refcount block (each is one check error, as in QEMU), and images qemu-img cannot check at
  all (a header QEMU refuses to open, an unreadable snapshot table or bitmap directory): those
  get one check error and a finding, and nothing else is examined.

Overlapping metadata shows up as it does in QEMU: a cluster used twice has a reference count
above its refcount (and, in the active tree, a COPIED flag that disagrees).

Repair (``repair="leaks"`` or ``"all"``) does what ``qemu-img check -r`` does, with the writes
ordered so that a crash at any point leaves an image a second repair fixes (the tests stop a
repair after each of its writes and repair again):

1. ("all") misaligned preallocated-zero L2 entries become plain zero entries (a reference
   dropped before any refcount moves); a refcount block past the end of the file is covered
   by extending the file.
2. ("all") refcounts that are too low are raised; fsync. Then refcounts that are too high are
   lowered; fsync. Nothing is lowered before every raise is durable.
3. ("all") when a referenced cluster has no refcount block, or a block is bad, the refcount
   structures are rebuilt, laid out as QEMU lays them out (first free clusters, refblocks
   first, then the reftable, which counts itself and its refblocks). Everything new goes to
   clusters nothing references and is synced before the 12-byte header pointer at offset 48
   is written and synced; the old structures are then leaks, which are freed.
   ("leaks" mode reports "need to rebuild refcount structures" and a check error instead.)
4. COPIED flags are made to agree with the refcounts ("leaks" mode only when nothing else is
   wrong, as QEMU).
5. ("all") a snapshot table with bad entries is rewritten like qcow2_write_snapshots: the new
   table is written to the first free clusters and they get refcount 1 (fsync), then the
   header pointer at offset 60 is switched (write + fsync), then the old table is freed.
6. When no corruption and no check error remain, the dirty and corrupt bits are cleared
   (8 bytes at offset 72, write + fsync) -- in both modes, as QEMU does.

After any repair the check runs again; the result holds the post-repair counts plus
``corruptions_fixed`` / ``leaks_fixed``, like ``qemu-img check -r``.

Known differences from ``qemu-img check`` 7.2 (all on damaged images):

- the zero flag in a v2 image is a corruption here (QEMU's read path marks such an image
  corrupt, its check does not look); it is not repaired;
- a rebuild never places new structures on clusters that something names without being
  counted (a pointer past the end of the file, a broken reftable entry, a skipped snapshot
  L1 table), and never over the old snapshot table; QEMU may, or fails its own overlap check
  and gives up (then we succeed where ``qemu-img check -r all`` fails);
- a refcount block more than 1 GiB past the end of the file is not "repaired" by growing the
  file to reach it (QEMU grows it to any size); the structures are rebuilt instead;
- a snapshot table rewrite needs a refcount block covering the free space it takes (QEMU
  would grow the refcount structures; we leave the corruption and say so);
- QEMU stops using an image once its repair signals a fatal corruption ("No medium found"
  errors follow); we report what the check finds instead;
- each L2 table shared by several L1 tables is read and scanned once: its problems are listed
  once and counted once per traversal, so the counts match QEMU's;
- findings are capped at :data:`MAX_FINDINGS_PER_KIND` lines per kind of message, plus one
  summary line per kind (QEMU prints every line to stderr).

The work is done with numpy over whole tables, and over batches of tables: no Python loop
runs per cluster or per table entry (the loops are per batch, per refblock written, per
snapshot and per bitmap). Memory is bounded by the file size and QEMU's table limits: tables
are read only where they lie inside the file, computed reference counts are kept per
referenced cluster (sparse), and only a rebuild holds one refcount per cluster of the file,
as QEMU does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from engine import _core
from engine.image import meta_sync
from engine.qcow2 import spec
from engine.qcow2.header import (
    ByteReader,
    Header,
    l1_entries_for,
    looks_like_qcow2,
    parse_header,
    read_fixed_fields,
    walk_extensions,
)
from engine.qcow2.refblocks import decode_refblocks, encode_refblocks, reftable_offsets
from engine.qcow2.snapshots import (
    SnapshotEntry,
    SnapshotProblem,
    encode_snapshot_table,
    read_snapshot_table,
)
from engine.errors import (
    CorruptImage,
    EngineError,
    EngineIOError,
    ImageFormatError,
    InvalidArgument,
    SafetyLimitExceeded,
    UnsupportedFeature,
    io_error,
)

__all__ = ["CheckResult", "check_file", "MAX_FINDINGS_PER_KIND"]

# --- Format rules ---------------------------------------------------------------------------
# Every mask, offset and limit comes from engine.qcow2.spec; the header, the snapshot table and
# the refcount block codec from engine.qcow2 (one home for each rule).

# A repair may extend the file to cover a refcount block past its end (as QEMU does), but not
# by more than this: a block pointer far past the end is rebuilt instead of making a huge file.
_MAX_EXTEND = 1 << 30

# Work and I/O granularity: how many bytes of tables one numpy batch holds, and the longest
# single read.
_BATCH_BYTES = 16 << 20
_MAX_READ = 8 << 20

MAX_FINDINGS_PER_KIND = 10000
"""Detailed finding lines kept per kind of message; the rest are summarised in one line."""

# Repair modes, as QEMU's BdrvCheckMode bits.
_FIX_LEAKS = 1
_FIX_ERRORS = 2
_MODES = {None: 0, "leaks": _FIX_LEAKS, "all": _FIX_LEAKS | _FIX_ERRORS}

_U64 = np.uint64


# --- The result -------------------------------------------------------------------------------

@dataclass
class CheckResult:
    """What a check found (and, after a repair, what remains), shaped like qemu-img's ImageCheck.

    Attributes:
        filename (str): the name given to :func:`check_file`.
        format (str): always "qcow2".
        check_errors (int): things the check could not examine (exit code 1).
        corruptions (int): inconsistencies that can lose data (exit code 2).
        leaks (int): clusters whose refcount is higher than their use (exit code 3).
        corruptions_fixed, leaks_fixed (int): what a repair fixed.
        image_end_offset (int): bytes: end of the highest cluster in use or refcounted.
        total_clusters (int): clusters of the virtual disk.
        allocated_clusters, fragmented_clusters, compressed_clusters (int): active-tree
            statistics, as qemu-img computes them.
        findings (list[str]): one human-readable line per problem found (and per repair).
        rebuilt (bool): the refcount structures were rebuilt.
    """

    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    findings: list[str] = field(default_factory=list)
    rebuilt: bool = False

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit code: 0 clean, 1 check errors (or the check could not
        complete), 2 corruptions, 3 only leaks. After a repair it describes the repaired image."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_dict(self) -> dict:
        """The object ``qemu-img check --output=json`` prints: filename, format and check-errors
        always; every other count only when it is non-zero."""
        d = {"filename": self.filename, "format": self.format, "check-errors": self.check_errors}
        for key, value in (("corruptions", self.corruptions), ("leaks", self.leaks),
                           ("corruptions-fixed", self.corruptions_fixed),
                           ("leaks-fixed", self.leaks_fixed),
                           ("image-end-offset", self.image_end_offset),
                           ("total-clusters", self.total_clusters),
                           ("allocated-clusters", self.allocated_clusters),
                           ("fragmented-clusters", self.fragmented_clusters),
                           ("compressed-clusters", self.compressed_clusters)):
            if value:
                d[key] = value
        return d

    def to_text(self) -> str:
        """The lines ``qemu-img check`` prints on stdout in human mode."""
        out = []
        if self.corruptions_fixed or self.leaks_fixed:
            out.append("The following inconsistencies were found and repaired:\n\n"
                       f"    {self.leaks_fixed} leaked clusters\n"
                       f"    {self.corruptions_fixed} corruptions\n\n"
                       "Double checking the fixed image now...")
        if not (self.corruptions or self.leaks or self.check_errors):
            out.append("No errors were found on the image.")
        else:
            if self.corruptions:
                out.append(f"\n{self.corruptions} errors were found on the image.\n"
                           "Data may be corrupted, or further writes to the image may "
                           "corrupt it.")
            if self.leaks:
                out.append(f"\n{self.leaks} leaked clusters were found on the image.\n"
                           "This means waste of disk space, but no harm to data.")
            if self.check_errors:
                out.append(f"\n{self.check_errors} internal errors have occurred during the "
                           "check.")
        if self.total_clusters and self.allocated_clusters:
            out.append(f"{self.allocated_clusters}/{self.total_clusters} = "
                       f"{self.allocated_clusters * 100.0 / self.total_clusters:0.2f}% "
                       "allocated, "
                       f"{self.fragmented_clusters * 100.0 / self.allocated_clusters:0.2f}% "
                       "fragmented, "
                       f"{self.compressed_clusters * 100.0 / self.allocated_clusters:0.2f}% "
                       "compressed clusters")
        if self.image_end_offset:
            out.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(out) + "\n"


# --- Entry point ------------------------------------------------------------------------------

def check_file(fd: int, *, filename: str, repair: str | None = None) -> CheckResult:
    """Check (and optionally repair) the QCOW2 image open on ``fd``, as ``qemu-img check``.

    Arguments:
        fd (int): an open descriptor of the image; read-write when ``repair`` is given. Nobody
            else may write the file during the call.
        filename (str): the name reported in the result and in error messages.
        repair (str | None): None to only check, "leaks" to lower leaked refcounts, "all" to
            also fix corruptions (raise refcounts, rebuild refcount structures, fix COPIED
            flags, clear the dirty and corrupt bits).

    Returns:
        CheckResult: after a repair, the counts of the re-check plus what was fixed.

    Raises:
        InvalidArgument: ``repair`` is not None, "leaks" or "all".
        ImageFormatError: the file does not start with a QCOW2 header we can read.
        EngineIOError: the operating system failed a read, write or sync.

    A corrupt image never raises: every inconsistency is reported in the result.
    """
    if repair not in _MODES:
        raise InvalidArgument(f"repair must be None, 'leaks' or 'all', not {repair!r}",
                              path=filename)
    fix = _MODES[repair]
    first = _check_once(fd, filename, fix)
    if not (first.corruptions_fixed or first.leaks_fixed):
        return first.result(filename)
    # As qemu-img: report the state of the repaired image, plus what the repair fixed.
    second = _check_once(fd, filename, 0)
    res = second.result(filename)
    res.corruptions_fixed = first.corruptions_fixed
    res.leaks_fixed = first.leaks_fixed
    res.rebuilt = first.rebuilt
    res.findings = (first.findings.lines() + ["Double checking the fixed image now..."]
                    + res.findings)
    return res


# --- Reading helpers --------------------------------------------------------------------------

class _Findings:
    """Finding lines, capped per kind."""

    def __init__(self):
        self._lines: list[str] = []
        self._count: dict[str, int] = {}

    def add(self, kind: str, line: str) -> None:
        n = self._count.get(kind, 0) + 1
        self._count[kind] = n
        if n <= MAX_FINDINGS_PER_KIND:
            self._lines.append(line)

    def add_many(self, kind: str, total: int, lines) -> None:
        """Record ``total`` findings of one kind; ``lines`` yields the text of the first ones
        (it is only consumed up to the cap)."""
        if total <= 0:
            return
        n = self._count.get(kind, 0)
        room = max(0, MAX_FINDINGS_PER_KIND - n)
        if room:
            for i, line in enumerate(lines):
                if i >= room:
                    break
                self._lines.append(line)
        self._count[kind] = n + total

    def lines(self) -> list[str]:
        out = list(self._lines)
        for kind, n in self._count.items():
            if n > MAX_FINDINGS_PER_KIND:
                out.append(f"... {n - MAX_FINDINGS_PER_KIND} more {kind} findings not listed")
        return out


class _Image:
    """The header facts and the file the check works on (re-read for every pass)."""

    def __init__(self, fd: int, path: str, h: Header, head: bytes, file_size: int):
        if not 0 <= h.refcount_order <= spec.MAX_REFCOUNT_ORDER:
            # QEMU cannot open such an image even in check mode (exit 1)
            raise ImageFormatError(f"refcount order {h.refcount_order} / cluster bits "
                                   f"{h.cluster_bits} out of range", path=path)
        self.fd = fd
        self.path = path
        self.h = h
        self.file_size = file_size
        # Short names of the header's geometry, for the numpy code below (all from Header).
        self.cb = h.cluster_bits
        self.C = h.cluster_size
        self.ext = h.extended_l2
        self.rmax = h.refcount_max
        self.rb_bits = h.refblock_bits
        self.E = h.refblock_entries
        self.rt_size = h.reftable_entries
        self.nb_snapshots = h.nb_snapshots
        self.snapshots_size = 0        # bytes, known once the table has been read
        self.snapshots: list[SnapshotEntry] = []   # once read
        self.bitmaps, self.crypto = _extensions(head, h)

    # The header fields the check reads (the header is the one place that holds them).
    version = property(lambda self: self.h.version)
    size = property(lambda self: self.h.size)
    data_file = property(lambda self: self.h.has_data_file)
    rorder = property(lambda self: self.h.refcount_order)
    l1_off = property(lambda self: self.h.l1_table_offset)
    l1_size = property(lambda self: self.h.l1_size)
    rt_off = property(lambda self: self.h.refcount_table_offset)
    snapshots_offset = property(lambda self: self.h.snapshots_offset)

    # I/O. Reads past the end of the file return zeros, as QEMU's block layer does.
    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self.file_size:
            return b"\0" * max(length, 0)
        want = min(length, self.file_size - offset)
        data = _pread(self.fd, offset, want, self.path)
        if len(data) < length:
            data += b"\0" * (length - len(data))
        return data

    def read_rows(self, offsets: np.ndarray, length: int) -> np.ndarray:
        """The ``length`` bytes at each of ``offsets`` (ascending, distinct), as a 2-D uint8
        array; adjacent rows are fetched with one read."""
        n = len(offsets)
        out = np.zeros((n, length), dtype=np.uint8)
        if n == 0:
            return out
        offs = offsets.astype(np.int64)
        brk = np.flatnonzero(np.diff(offs) != length) + 1
        starts = np.concatenate(([0], brk))
        ends = np.concatenate((brk, [n]))
        flat = out.reshape(-1)
        per_read = max(1, _MAX_READ // length)
        for s, e in zip(starts.tolist(), ends.tolist()):
            while s < e:
                k = min(e - s, per_read)
                off = int(offs[s])
                if off < self.file_size:
                    want = min(k * length, self.file_size - off)
                    data = _pread(self.fd, off, want, self.path)
                    flat[s * length:s * length + len(data)] = np.frombuffer(data, np.uint8)
                s += k
        return out

    def pwrite(self, offset: int, data: bytes) -> None:
        # through the core's I/O shim: the fault tests and the power-loss recorder see repairs
        try:
            _core.meta_pwrite(self.fd, data, offset)
        except OSError as e:
            raise io_error(e.errno, f"cannot write {len(data)} bytes at offset {offset}",
                           path=self.path) from None

    def sync(self) -> None:
        meta_sync(self.fd, self.path)

    def u64_table(self, offset: int, entries: int, *, trim: bool = False) -> np.ndarray:
        """A table of big-endian u64 entries at ``offset`` as native uint64. Only the part
        inside the file is read; the rest reads as zeros, or is left out with ``trim``."""
        if entries <= 0:
            return np.zeros(0, dtype=_U64)
        inside = 0 if offset >= self.file_size else min(entries, -(-(self.file_size - offset) // 8))
        out = np.zeros(inside if trim else entries, dtype=_U64)
        if inside:
            data = self.pread(offset, inside * 8)
            out[:inside] = np.frombuffer(data, dtype=">u8")
        return out


def _pread(fd: int, offset: int, length: int, path: str) -> bytes:
    parts = []
    try:
        while length > 0:
            b = os.pread(fd, length, offset)
            if not b:
                break
            parts.append(b)
            offset += len(b)
            length -= len(b)
    except OSError as e:
        raise io_error(e.errno, f"cannot read {length} bytes at offset {offset}",
                       path=path) from None
    return b"".join(parts)


def _extensions(head: bytes, h: Header):
    """(bitmaps, crypto) from the header extensions: bitmaps is (nb, directory size, directory
    offset) or None, crypto is (offset, length) or None. Only what the check counts; the walk
    stops quietly at a broken record, as QEMU's check does."""
    bitmaps = crypto = None
    end = min(h.backing_file_offset or h.cluster_size, h.cluster_size, len(head))
    for magic, data in walk_extensions(ByteReader(head, None), h.extension_area_start, end,
                                       lenient=True):
        if magic == spec.EXT_MAGIC_BITMAPS and len(data) >= spec.BITMAPS_EXT_SIZE:
            nb, _reserved, dsize, doff = spec.BITMAPS_EXT_STRUCT.unpack_from(data)
            bitmaps = (nb, dsize, doff)
        elif magic == spec.EXT_MAGIC_CRYPTO_HEADER and len(data) >= spec.CRYPTO_EXT_SIZE:
            crypto = spec.CRYPTO_EXT_STRUCT.unpack_from(data)
    if not h.autoclear_features & spec.AUTOCLEAR_BITMAPS or h.version < 3:
        bitmaps = None     # QEMU ignores the extension unless the autoclear bit vouches for it
    return bitmaps, crypto


# --- Stored refcounts ------------------------------------------------------------------------

class _StoredRefcounts:
    """The refcounts stored on disk, looked up through the reftable (qcow2_get_refcount)."""

    def __init__(self, img: _Image):
        self.img = img
        self.rt = img.u64_table(img.rt_off, img.rt_size)

    def get(self, clusters: np.ndarray):
        """(values, readable) for an array of cluster indexes: a cluster without a refblock
        reads 0; one whose refblock offset is not cluster-aligned cannot be read (QEMU: EIO).
        The refblocks are read in batches, once each."""
        img = self.img
        clusters = clusters.astype(np.int64)
        vals = np.zeros(len(clusters), dtype=_U64)
        ok = np.ones(len(clusters), dtype=bool)
        if len(clusters) == 0:
            return vals, ok
        rbi = clusters >> img.rb_bits
        order = np.argsort(rbi, kind="stable")
        srbi = rbi[order]
        uniq = np.unique(srbi)
        offs = np.zeros(len(uniq), dtype=np.int64)
        inrt = uniq < len(self.rt)
        unal = np.zeros(len(uniq), dtype=bool)
        offs[inrt], unal[inrt] = reftable_offsets(self.rt[uniq[inrt]], img.C)
        if unal.any():
            bad = np.isin(rbi, uniq[unal])
            ok[bad] = False
        present = np.flatnonzero((offs != 0) & ~unal)
        rows = max(1, _BATCH_BYTES // (img.E * 8))
        for s in range(0, len(present), rows):        # per batch of refblocks
            sel = present[s:s + rows]
            boffs = offs[sel]
            ub, uinv = np.unique(boffs, return_inverse=True)
            table = decode_refblocks(img.read_rows(ub, img.C), img.rorder)[uinv]
            lo = np.searchsorted(srbi, uniq[sel[0]], "left")
            hi = np.searchsorted(srbi, uniq[sel[-1]], "right")
            idx = order[lo:hi]
            row = np.searchsorted(uniq[sel], rbi[idx])
            hit = uniq[sel][np.minimum(row, len(sel) - 1)] == rbi[idx]
            idx, row = idx[hit], row[hit]
            vals[idx] = table[row, clusters[idx] & (img.E - 1)]
        return vals, ok


# --- One check pass ---------------------------------------------------------------------------

class _Refs:
    """Computed references, kept sparse: pieces of (cluster index, weight) arrays."""

    def __init__(self):
        self.idx: list[np.ndarray] = []
        self.w: list[np.ndarray] = []

    def add(self, idx: np.ndarray, w: np.ndarray) -> None:
        if len(idx):
            self.idx.append(idx.astype(np.int64))
            self.w.append(np.broadcast_to(np.asarray(w, dtype=np.int64), idx.shape).copy())

    def totals(self):
        """(sorted distinct cluster indexes, summed weights)."""
        if not self.idx:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        idx = np.concatenate(self.idx)
        w = np.concatenate(self.w)
        order = np.argsort(idx, kind="stable")
        idx = idx[order]
        w = w[order]
        starts = np.concatenate(([0], np.flatnonzero(np.diff(idx)) + 1))
        return idx[starts], np.add.reduceat(w, starts)


def _lookup(uidx: np.ndarray, ucnt: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Counts of ``clusters`` in the sparse (uidx, ucnt) table (0 where absent)."""
    if len(uidx) == 0:
        return np.zeros(len(clusters), np.int64)
    pos = np.searchsorted(uidx, clusters)
    pos_c = np.minimum(pos, len(uidx) - 1)
    hit = uidx[pos_c] == clusters
    return np.where(hit, ucnt[pos_c], 0)


class _Abort(Exception):
    """The check cannot complete (after _Pass.fail recorded why); qemu-img prints nothing."""


class _Pass:
    """One run of QEMU's qcow2_co_check_locked: counters, findings and the computed refs."""

    def __init__(self, fd: int, path: str, fix: int):
        self.fd = fd
        self.path = path
        self.fix = fix
        self.check_errors = 0
        self.corruptions = 0
        self.leaks = 0
        self.corruptions_fixed = 0
        self.leaks_fixed = 0
        self.allocated = 0
        self.fragmented = 0
        self.compressed = 0
        self.total_clusters = 0
        self.image_end_offset = 0
        self.rebuilt = False
        self.findings = _Findings()

    def result(self, filename: str) -> CheckResult:
        return CheckResult(filename=filename, check_errors=self.check_errors,
                           corruptions=self.corruptions, leaks=self.leaks,
                           corruptions_fixed=self.corruptions_fixed,
                           leaks_fixed=self.leaks_fixed,
                           image_end_offset=self.image_end_offset,
                           total_clusters=self.total_clusters,
                           allocated_clusters=self.allocated,
                           fragmented_clusters=self.fragmented,
                           compressed_clusters=self.compressed,
                           findings=self.findings.lines(), rebuilt=self.rebuilt)

    def fail(self, message: str) -> "_Pass":
        """The check cannot complete (qemu-img prints no result and exits 1)."""
        self.check_errors += 1
        self.findings.add("fatal", message)
        return self


def _load(fd: int, path: str):
    """(header or None, head bytes, file size, the parse problem or None).

    Raises only when the file is not a QCOW2 image at all (bad magic, version, cluster size,
    too short). A header that engine.format refuses for what its tables contain is re-read
    leniently: QEMU's check opens such images (a reftable past the end of a truncated file,
    no reftable at all, encryption) and we must report on them, not refuse them.
    """
    try:
        file_size = os.fstat(fd).st_size
    except OSError as e:
        raise io_error(e.errno, "cannot stat the image", path=path) from None
    head = _pread(fd, 0, min(file_size, 2 << 20), path)
    if not looks_like_qcow2(head):
        parse_header(head, file_size, path=path)    # raises the precise ImageFormatError
        raise ImageFormatError("not a QCOW2 image", path=path)
    try:
        return parse_header(head, file_size, path=path), head, file_size, None
    except (EngineIOError, InvalidArgument):
        raise
    except (CorruptImage, SafetyLimitExceeded, UnsupportedFeature) as e:
        return read_fixed_fields(head), head, file_size, e
    except EngineError as e:
        return None, head, file_size, e


def _check_once(fd: int, path: str, fix: int) -> _Pass:
    """qcow2_co_check_locked: the snapshot table, the refcounts, then the header bits."""
    p = _Pass(fd, path, fix)
    h, head, file_size, problem = _load(fd, path)
    if h is None:
        # qemu-img cannot open such an image either: "Check failed", exit code 1.
        return p.fail(f"ERROR the image header cannot be used: {problem}")
    img = _Image(fd, path, h, head, file_size)
    if not _validate_open(p, img):
        return p
    snapshots = _read_snapshot_table(p, img)
    if snapshots is None:
        return p
    snapshot_corruptions = p.corruptions
    try:
        if not _check_refcounts(p, img, snapshots):
            return p
    except _Abort:
        return p
    _fix_snapshot_table(p, img, snapshots, snapshot_corruptions)
    if fix and p.check_errors == 0 and p.corruptions == 0:
        _mark_clean(p, img)
    return p


def _validate_open(p: _Pass, img: _Image) -> bool:
    """What qcow2_do_open refuses even in check mode (beyond the basic header checks); a
    failure means qemu-img cannot check the image (a check error, nothing else examined)."""
    C = img.C
    h = img.h
    if img.h.incompatible_features & ~spec.INCOMPAT_MASK:
        p.fail(f"ERROR Unsupported qcow2 feature(s): incompatible bits "
               f"{img.h.incompatible_features & ~spec.INCOMPAT_MASK:#x}")
        return False
    if img.ext and C < spec.EXTL2_MIN_CLUSTER_SIZE:
        p.fail(f"ERROR Unsupported subcluster size: {C // 32}")
        return False
    if img.rorder > spec.MAX_REFCOUNT_ORDER:
        p.fail("ERROR Refcount width can be at most 64 bits")
        return False
    if h.backing_file_offset > C:
        p.fail("ERROR Invalid backing file offset")
        return False
    if img.rt_size * 8 > spec.MAX_REFTABLE_SIZE:
        p.fail("ERROR Reference count table too large")
        return False
    if img.rt_off & (C - 1) or img.rt_off > spec.INT64_MAX - img.rt_size * 8:
        p.fail("ERROR Reference count table offset invalid")
        return False
    if img.l1_size * 8 > spec.MAX_L1_SIZE:
        p.fail("ERROR Active L1 table too large")
        return False
    need = l1_entries_for(img.size, img.cb, img.ext)
    if need > spec.INT_MAX:
        p.fail("ERROR Image is too big")
        return False
    if img.l1_size < need:
        p.fail("ERROR L1 table is too small")
        return False
    if img.l1_off & (C - 1) or img.l1_off > spec.INT64_MAX - img.l1_size * 8:
        p.fail("ERROR Active L1 table offset invalid")
        return False
    if -(-img.file_size // C) > spec.INT_MAX:
        p.fail("ERROR the image file has too many clusters to check")
        return False
    return True


# --- Snapshot table ---------------------------------------------------------------------------

class _Window:
    """Reads of a table that is walked forwards in small pieces, served from 1 MiB reads."""

    def __init__(self, img: _Image, base: int):
        self.img = img
        self.base = base
        self.start = 0
        self.buf = b""

    def read(self, pos: int, n: int) -> bytes:
        if n <= 0:
            return b""
        pos += self.base
        if not (self.start <= pos and pos + n <= self.start + len(self.buf)):
            self.start = pos
            self.buf = self.img.pread(pos, max(n, 1 << 20))
        return self.buf[pos - self.start:pos - self.start + n]


def _read_snapshot_table(p: _Pass, img: _Image) -> list[SnapshotEntry] | None:
    """qcow2_check_read_snapshot_table: the snapshot list, or None when the check cannot go on.
    Sets img.snapshots_size. The table is read by engine.qcow2's one parser, in its lenient
    mode; this decides, as QEMU's check does, which of its problems end the check (without
    repair "all") and which the repair fixes."""
    nb = img.nb_snapshots
    off = img.snapshots_offset
    repair = bool(p.fix & _FIX_ERRORS)
    reduced = dropped = 0
    if nb > spec.MAX_SNAPSHOTS and repair:
        p.findings.add("snapshot", f"Discarding {nb - spec.MAX_SNAPSHOTS} overhanging snapshots")
        reduced += nb - spec.MAX_SNAPSHOTS
        nb = spec.MAX_SNAPSHOTS
    if nb > spec.MAX_SNAPSHOTS:
        p.fail("ERROR snapshot table too large")
        return None
    if spec.INT64_MAX - nb * spec.SNAPSHOT_HEADER_SIZE < off or off & (img.C - 1):
        p.fail("ERROR snapshot table offset invalid")
        return None

    table = read_snapshot_table(_Window(img, off).read, img.h, nb)
    incomplete: list[SnapshotProblem] = []
    for pr in table.problems:
        if pr.kind == "io":
            p.fail("ERROR failed to read the snapshot table: Input/output error")
            return None
        if pr.kind == "incomplete":
            incomplete.append(pr)
        elif not repair:
            p.fail("ERROR failed to read the snapshot table: " + (
                f"Too much extra metadata in snapshot table entry {pr.entry}"
                if pr.kind == "extra" else "Snapshot table is too big"))
            return None
        elif pr.kind == "extra":
            p.findings.add("snapshot", f"Discarding too much extra metadata in snapshot table "
                           f"entry {pr.entry} ({pr.value} > {spec.MAX_SNAPSHOT_EXTRA})")
            dropped += 1
        else:
            p.findings.add("snapshot", f"Discarding {pr.value} overhanging snapshots (snapshot "
                           "table is too big)")
            reduced += pr.value
    snaps = table.entries
    img.snapshots_size = table.size
    p.corruptions += reduced + dropped
    if reduced:
        # As QEMU: shorten the table in the header now (this only leaks clusters).
        img.pwrite(spec.HDR_NB_SNAPSHOTS, spec.U32.pack(len(snaps)))
        img.sync()
        img.nb_snapshots = len(snaps)
        p.corruptions_fixed += reduced
        p.corruptions -= reduced
    p.corruptions += len(incomplete)
    p.findings.add_many("snapshot", len(incomplete), (
        f"{'Repairing' if repair else 'ERROR'} snapshot table entry {pr.entry} is incomplete"
        for pr in incomplete))
    return snaps


def _fix_snapshot_table(p: _Pass, img: _Image, snaps: list[SnapshotEntry],
                        corruptions: int) -> None:
    """qcow2_check_fix_snapshot_table: with repair "all", rewrite a snapshot table that had
    corruptions (incomplete or oversized entries) the way qcow2_write_snapshots does: into the
    first free clusters, which get refcount 1 (fsync), then the 12-byte header pointer at
    offset 60 is switched (write + fsync), then the old table is freed."""
    if not corruptions or not p.fix & _FIX_ERRORS:
        return
    old_off, old_size = img.snapshots_offset, img.snapshots_size
    img = _reload(p, img) or img
    try:
        blob = encode_snapshot_table(snaps, img.h)
    except EngineError as e:            # QEMU's qcow2_write_snapshots refuses it too (EFBIG)
        p.findings.add("snapshot", f"ERROR failed to update snapshot table: {e}")
        return
    n = -(-len(blob) // img.C)
    new_off = 0
    if n:
        # Never inside the old table (a crash before the pointer switch would destroy it)
        # nor on other metadata the refcounts may not account for.
        keep_out = [(old_off, old_size), (img.l1_off, img.l1_size * 8),
                    (img.rt_off, img.rt_size * 8)]
        keep_out += [(sn.l1_table_offset, sn.l1_size * 8) for sn in snaps]
        first = _first_free_run(img, n, keep_out)
        if first is None:
            p.findings.add("snapshot", "ERROR failed to update snapshot table: no refcount "
                           "block covers the free space it needs")
            return
        # The table goes first, then its refcounts (both into clusters nothing references),
        # so a crash in between leaves at worst a leak inside the file, which the next
        # repair frees before it allocates again; both are durable before the switch.
        new_off = first * img.C
        img.pwrite(new_off, blob)
        _write_refcounts(img, np.arange(first, first + n, dtype=np.int64), np.ones(n, np.int64))
    img.pwrite(spec.HDR_NB_SNAPSHOTS, spec.U32.pack(len(snaps)) + spec.U64.pack(new_off))
    img.sync()
    if old_size:
        old = np.arange(old_off >> img.cb, ((old_off + old_size - 1) >> img.cb) + 1,
                        dtype=np.int64)
        rc, ok = _StoredRefcounts(img).get(old)
        if ok.all() and (rc >= 1).all():            # else QEMU's decrement fails as a whole
            _write_refcounts(img, old, rc.astype(np.int64) - 1)
    p.corruptions -= corruptions
    p.corruptions_fixed += corruptions
    p.findings.add("snapshot", f"Rewrote the snapshot table at offset {new_off:#x}")


def _first_free_run(img: _Image, n: int, keep_out):
    """alloc_clusters_noref: the first run of ``n`` clusters whose stored refcount is 0, from
    cluster 0, outside the ``keep_out`` (offset, size) ranges; None when a refblock for it is
    missing (QEMU would grow the refcount structures, which this repair does not do)."""
    nb = -(-img.file_size // img.C)
    ends = [-(-(off + size) // img.C) for off, size in keep_out if size > 0]
    limit = max([nb] + [e for e in ends if e <= nb + (1 << 20)]) + n + 1
    st = _StoredRefcounts(img)
    rc, ok = st.get(np.arange(limit, dtype=np.int64))
    free = (rc == 0) & ok
    free[0] = False
    rb = reftable_offsets(st.rt[st.rt != 0], img.C)[0] >> img.cb
    free[rb[rb < limit]] = False
    for off, size in keep_out:          # per metadata table
        if size > 0 and off < limit * img.C:
            free[off >> img.cb:min(limit, ((off + size - 1) >> img.cb) + 1)] = False
    run = np.convolve(free.astype(np.int64), np.ones(n, np.int64), "valid")
    hits = np.flatnonzero(run == n)
    if not len(hits):
        return None
    first = int(hits[0])
    blocks = np.unique(np.arange(first, first + n) >> img.rb_bits)
    offs = np.zeros(len(blocks), np.int64)
    inrt = blocks < len(st.rt)
    if not inrt.all():
        return None
    offs, unreadable = reftable_offsets(st.rt[blocks], img.C)
    if (offs == 0).any() or unreadable.any():
        return None
    return first


# --- Computing the references -----------------------------------------------------------------

def _bitmap_directory(img: _Image, nb: int, dsize: int, doff: int):
    """bitmap_list_load's checks: the (table offset, table size) of each bitmap, or the reason
    the directory is unusable (a string)."""
    if dsize == 0:
        return "size is zero"
    if dsize > spec.MAX_BITMAP_DIRECTORY_SIZE:
        return "size is too big"
    if doff > spec.MAX_DISK_LENGTH - dsize:
        return "cannot be read"
    d = img.pread(doff, dsize)
    pos = 0
    tables = []
    while pos < dsize:                   # per bitmap directory entry
        if pos + spec.BME_DIR_ENTRY_SIZE > dsize:
            return "broken bitmap directory"
        toff, tsize, flags, btype, gran, name_len, extra = spec.BME_DIR_ENTRY_STRUCT.unpack_from(
            d, pos)
        if len(tables) >= nb:
            return "more bitmaps found than specified in header extension"
        step = (spec.BME_DIR_ENTRY_SIZE + extra + name_len + 7) & ~7
        if pos + step > dsize:
            return "broken bitmap directory"
        if extra:
            return "bitmap extra data is not supported"
        phys = tsize * img.C
        if (tsize == 0 or toff == 0 or toff % img.C or tsize > spec.BME_MAX_TABLE_SIZE
                or not spec.BME_MIN_GRANULARITY_BITS <= gran <= spec.BME_MAX_GRANULARITY_BITS
                or flags & spec.BME_RESERVED_FLAGS or name_len > spec.BME_MAX_NAME_SIZE
                or btype != spec.BITMAP_TYPE_DIRTY_TRACKING or phys > spec.BME_MAX_PHYS_SIZE
                or (not flags & spec.BME_FLAG_IN_USE and img.size > (phys * 8) << gran)):
            return f"bitmap {len(tables)} does not satisfy the constraints"
        tables.append((toff, tsize))
        pos += step
    if len(tables) != nb:
        return "less bitmaps found than specified in header extension"
    return tables


class _L2Rows:
    """A batch of L2 tables (rows of one cluster) decoded once: the entries and, with
    extended L2, the subcluster bitmaps, and the masks both the reference count and the
    COPIED check use (qcow2.txt "Cluster mapping")."""

    def __init__(self, img: _Image, raw: np.ndarray):
        self.words = raw.view(">u8").astype(_U64)      # native copy: the COPIED repair edits it
        if img.ext:
            self.e, self.bm = self.words[:, 0::2], self.words[:, 1::2]
        else:
            self.e, self.bm = self.words, None
        e = self.e
        self.comp = (e & _U64(spec.QCOW_OFLAG_COMPRESSED)) != 0
        self.copied = (e & _U64(spec.QCOW_OFLAG_COPIED)) != 0
        self.off = (e & _U64(spec.L2E_OFFSET_MASK)).astype(np.int64)
        if img.ext:
            self.zero = np.zeros_like(self.comp)
        else:
            self.zero = ((e & _U64(spec.QCOW_OFLAG_ZERO)) != 0) & ~self.comp
        self.has_off = self.off != 0
        if img.data_file:
            self.has_off = self.has_off | self.copied
        self.normal = ~self.comp & self.has_off          # NORMAL or ZERO_ALLOC


class _Calc:
    """calculate_refcounts: the in-memory reference counts and the structural checks."""

    def __init__(self, p: _Pass, img: _Image, snaps: list[SnapshotEntry], fix: int, stats: bool):
        self.p = p
        self.img = img
        self.snaps = snaps
        self.fix = fix
        self.stats = stats
        self.file_size = img.file_size
        self.main = _Refs()          # everything but the refcount structures
        self.rt_refs = _Refs()       # the reftable
        self.rb_refs = _Refs()       # the refblocks
        self.rebuild = False
        # Cluster ranges that something names but that are not counted (pointers past the
        # end of the file, bad reftable entries, skipped snapshot L1 tables): a rebuild must
        # not place its new structures there.
        self.uncounted: list[tuple[np.ndarray, np.ndarray]] = []

    # qcow2_inc_refcounts_imrt, for one range and for many.
    def inc(self, refs: _Refs, offset: int, size: int, weight: int = 1) -> None:
        if size <= 0:
            return
        C = self.img.C
        if offset >= (1 << 62) or offset + size - self.file_size >= C:
            if offset < (1 << 62):
                self.uncounted.append((np.array([offset >> self.img.cb]),
                                       np.array([(offset + size - 1) >> self.img.cb])))
            self.p.corruptions += weight
            self.p.findings.add("eof", "ERROR: counting reference for region exceeding the end "
                                f"of the file by one cluster or more: offset {offset:#x} "
                                f"size {size:#x}")
            return
        first = offset >> self.img.cb
        last = (offset + size - 1) >> self.img.cb
        refs.add(np.arange(first, last + 1, dtype=np.int64), weight)

    def inc_many(self, refs: _Refs, offs: np.ndarray, sizes, weights) -> None:
        if len(offs) == 0:
            return
        img = self.img
        offs = offs.astype(np.int64)
        sizes = np.broadcast_to(np.asarray(sizes, dtype=np.int64), offs.shape)
        weights = np.broadcast_to(np.asarray(weights, dtype=np.int64), offs.shape)
        bad = offs + sizes - self.file_size >= img.C
        if bad.any():
            self.uncounted.append((offs[bad] >> img.cb, (offs[bad] + sizes[bad] - 1) >> img.cb))
            self.p.corruptions += int(weights[bad].sum())
            bo = offs[bad]
            bs = sizes[bad]
            self.p.findings.add_many("eof", int(bad.sum()), (
                "ERROR: counting reference for region exceeding the end of the file by one "
                f"cluster or more: offset {o:#x} size {s:#x}"
                for o, s in zip(bo.tolist(), bs.tolist())))
            good = ~bad
            offs, sizes, weights = offs[good], sizes[good], weights[good]
        first = offs >> img.cb
        n = ((offs + sizes - 1) >> img.cb) - first + 1
        if len(n) and int(n.max()) == 1:
            refs.add(first, weights)
            return
        total = int(n.sum())
        starts = np.repeat(np.cumsum(n) - n, n)
        idx = np.repeat(first, n) + (np.arange(total, dtype=np.int64) - starts)
        refs.add(idx, np.repeat(weights, n))

    def uncount_range(self, offset: int, size: int) -> None:
        if size > 0 and offset < (1 << 62):
            self.uncounted.append((np.array([offset >> self.img.cb]),
                                   np.array([(offset + size - 1) >> self.img.cb])))

    def protected(self, nb: int) -> np.ndarray:
        """The clusters of :attr:`uncounted` and of every reftable entry, up to a little past
        what a rebuild can reach (the rest cannot collide with anything it writes)."""
        limit = nb + nb // 16 + 4096
        rt = self.img.u64_table(self.img.rt_off, self.img.rt_size)
        rb = reftable_offsets(rt[rt != 0], self.img.C)[0] >> self.img.cb
        parts = [rb[rb < limit]]
        for first, last in self.uncounted:
            first = np.minimum(first, limit)
            last = np.minimum(last, limit - 1)
            n = np.maximum(last - first + 1, 0)
            if n.sum():
                starts = np.repeat(np.cumsum(n) - n, n)
                parts.append(np.repeat(first, n) + (np.arange(int(n.sum())) - starts))
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    # The walk.
    def run(self) -> None:
        img = self.img
        p = self.p
        # header
        self.inc(self.main, 0, img.C)
        # L1 tables: the active one, then every snapshot's.
        l1s = [(img.l1_off, img.l1_size, True)]
        if img.data_file and self.snaps:
            p.corruptions += 1
            p.findings.add("snapshot", f"ERROR {len(self.snaps)} snapshots in image with data "
                           "file")
        for s in self.snaps:
            if s.l1_table_offset & (img.C - 1):
                p.corruptions += 1
                p.findings.add("snapshot", f"ERROR snapshot {s.shown_id} ({s.shown_name}) "
                               f"l1_offset={s.l1_table_offset:#x}: L1 table is not cluster "
                               "aligned; snapshot table entry corrupted")
                self.uncount_range(s.l1_table_offset, s.l1_size * 8)
                continue
            if s.l1_size > spec.MAX_L1_SIZE // 8:
                p.corruptions += 1
                p.findings.add("snapshot", f"ERROR snapshot {s.shown_id} ({s.shown_name}) "
                               f"l1_size={s.l1_size:#x}: L1 table is too large; snapshot "
                               "table entry corrupted")
                self.uncount_range(s.l1_table_offset, min(s.l1_size * 8, spec.MAX_L1_SIZE))
                continue
            l1s.append((s.l1_table_offset, s.l1_size, False))
        self.walk_l1s(l1s)
        # snapshot table, reftable, LUKS header, bitmaps
        self.inc(self.main, img.snapshots_offset, img.snapshots_size)
        self.inc(self.rt_refs, img.rt_off, img.rt_size * 8)
        if img.crypto is not None and img.crypto[1]:
            self.inc(self.main, img.crypto[0], img.crypto[1])
        self.count_bitmaps()

    def walk_l1s(self, l1s) -> None:
        """check_refcounts_l1 for every L1 table; identical tables are read once."""
        img = self.img
        p = self.p
        groups: dict[tuple, int] = {}
        for key in l1s:
            groups[key] = groups.get(key, 0) + 1
        l2_offs, l2_w, l2_act = [], [], []
        for (off, size, active), k in groups.items():
            if size == 0:
                continue
            self.inc(self.main, off, size * 8, k)
            if off > spec.MAX_DISK_LENGTH - size * 8:
                # QEMU's read of this table fails (EIO) and so does its whole check.
                p.fail("ERROR: I/O error in check_refcounts_l1")
                raise _Abort()
            e = img.u64_table(off, size, trim=True)     # zero entries carry nothing
            nz = e[e != 0]
            if len(nz) == 0:
                continue
            resv = (nz & _U64(spec.L1E_RESERVED_MASK)) != 0
            if resv.any():
                p.corruptions += int(resv.sum()) * k
                p.findings.add_many("l1", int(resv.sum()), (
                    f"ERROR found L1 entry with reserved bits set: {v:x}"
                    for v in nz[resv].tolist()))
            l2 = (nz & _U64(spec.L1E_OFFSET_MASK)).astype(np.int64)
            self.inc_many(self.main, l2, img.C, k)
            unal = (l2 & (img.C - 1)) != 0
            if unal.any():
                p.corruptions += int(unal.sum()) * k
                p.findings.add_many("l1", int(unal.sum()), (
                    f"ERROR l2_offset={v:x}: Table is not cluster aligned; L1 entry corrupted"
                    for v in l2[unal].tolist()))
            l2_offs.append(l2)
            l2_w.append(np.full(len(l2), k, np.int64))
            l2_act.append(np.full(len(l2), k if active else 0, np.int64))
        if not l2_offs:
            return
        offs = np.concatenate(l2_offs)
        uoffs, inv = np.unique(offs, return_inverse=True)
        m_tot = np.bincount(inv, weights=np.concatenate(l2_w)).astype(np.int64)
        m_act = np.bincount(inv, weights=np.concatenate(l2_act)).astype(np.int64)
        rows = max(1, _BATCH_BYTES // img.C)
        for s in range(0, len(uoffs), rows):
            self.scan_l2(uoffs[s:s + rows], m_tot[s:s + rows], m_act[s:s + rows])

    def scan_l2(self, offs: np.ndarray, m_tot: np.ndarray, m_act: np.ndarray) -> None:
        """check_refcounts_l2 for a batch of distinct L2 tables; each table's counts are
        multiplied by the number of traversals that meet it (m_tot; m_act for the active tree,
        which alone feeds the statistics)."""
        img = self.img
        p = self.p
        C = img.C
        raw = img.read_rows(offs, C)
        rows = _L2Rows(img, raw)
        e, bm, comp, copied, off = rows.e, rows.bm, rows.comp, rows.copied, rows.off
        zero, normal = rows.zero, rows.normal
        W = m_tot[:, None]
        unalloc = ~comp & ~zero & ~rows.has_off

        def count(mask, kind, fmt_line):
            n = int(mask.sum())
            if not n:
                return
            p.corruptions += int((mask * W).sum())
            r, c = np.nonzero(mask)
            p.findings.add_many(kind, n, (fmt_line(int(e[i, j]), i, j)
                                          for i, j in zip(r.tolist(), c.tolist())))

        count(~comp & ((e & _U64(spec.L2E_RESERVED_MASK)) != 0), "l2",
              lambda v, i, j: f"ERROR found l2 entry with reserved bits set: {v:x}")
        if img.version < 3:
            count(zero, "l2", lambda v, i, j: f"ERROR zero flag in a version 2 image: l2_offset="
                  f"{int(offs[i]):x} index {j} entry {v:x}")
        # compressed clusters
        count(comp & copied, "l2", lambda v, i, j: f"ERROR: coffset={v & img.h.compressed_offset_mask:#x}: "
              "copied flag must never be set for compressed clusters")
        good_comp = comp
        if img.data_file:
            count(comp, "l2", lambda v, i, j: f"ERROR compressed cluster {j} with data file, "
                  f"entry={v & ~spec.QCOW_OFLAG_COPIED:#x}")
            good_comp = np.zeros_like(comp)
        elif bm is not None:
            bad = comp & (bm != 0)
            count(bad, "l2", lambda v, i, j: f"ERROR compressed cluster {j} with non-zero "
                  f"subcluster allocation bitmap, entry={v & ~spec.QCOW_OFLAG_COPIED:#x}")
            good_comp = comp & ~bad
        # normal and preallocated-zero clusters
        if bm is not None:
            count(normal & (((bm >> _U64(32)) & bm) != 0), "l2",
                  lambda v, i, j: f"ERROR offset={v & spec.L2E_OFFSET_MASK:x}: Allocated cluster "
                  "has corrupted subcluster allocation bitmap")
            count(unalloc & ((bm & _U64(spec.L2_BITMAP_ALL_ALLOC)) != 0), "l2",
                  lambda v, i, j: "ERROR: Unallocated cluster has non-zero subcluster "
                  "allocation map")
        unal = normal & ((off & (C - 1)) != 0)
        if unal.any():
            if bm is not None:
                has_data = (bm & _U64(spec.L2_BITMAP_ALL_ALLOC)) != 0
            else:
                has_data = ~zero
            prealloc = unal & ~has_data
            fixable = prealloc if (self.fix & _FIX_ERRORS) else np.zeros_like(prealloc)
            count(unal & ~has_data & ~fixable, "l2",
                  lambda v, i, j: f"ERROR offset={v & spec.L2E_OFFSET_MASK:x}: Preallocated "
                  "cluster is not properly aligned; L2 entry corrupted.")
            count(unal & has_data, "l2",
                  lambda v, i, j: f"ERROR offset={v & spec.L2E_OFFSET_MASK:x}: Data cluster is "
                  "not properly aligned; L2 entry corrupted.")
            if fixable.any():
                fixed = self.fix_prealloc(offs, e, bm, raw, fixable)
                normal = normal & ~fixed
        # statistics (active tree only)
        if self.stats and m_act.any():
            A = m_act[:, None]
            self.p.allocated += int(((normal | good_comp) * A).sum())
            self.p.compressed += int((good_comp * A).sum())
            r, c = np.nonzero(normal)
            o = off[r, c]
            same = r[1:] == r[:-1]
            frag = same & (o[1:] != o[:-1] + C)
            self.p.fragmented += int((good_comp * A).sum()) + int(m_act[r[1:][frag]].sum())
        # references
        if not img.data_file:
            r, c = np.nonzero(normal)
            self.inc_many(self.main, off[r, c], C, m_tot[r])
        if good_comp.any():
            r, c = np.nonzero(good_comp)
            v = e[r, c]
            coff = (v & _U64(img.h.compressed_offset_mask)).astype(np.int64)
            nsec = ((v >> _U64(img.h.compressed_size_shift)) & _U64(img.h.compressed_size_mask)).astype(np.int64) + 1
            csize = nsec * spec.COMPRESSED_SECTOR_SIZE - (coff & (spec.COMPRESSED_SECTOR_SIZE - 1))
            self.inc_many(self.main, coff, csize, m_tot[r])

    def fix_prealloc(self, offs, e, bm, raw, fixable) -> np.ndarray:
        """fix_l2_entry_by_zero: misaligned preallocated-zero entries become plain zero entries
        (the data is zeros anyway). Returns the entries fixed (they carry no reference)."""
        img = self.img
        p = self.p
        fixed = np.zeros_like(fixable)
        meta = _Metadata(img, self.snaps)
        for i in np.flatnonzero(fixable.any(axis=1)).tolist():   # per L2 table
            l2_off = int(offs[i])
            cols = np.flatnonzero(fixable[i])
            if meta.overlaps(l2_off, img.C):
                p.check_errors += 1
                p.corruptions += len(cols)
                p.findings.add("l2", "ERROR: Overlap check failed")
                continue
            row = raw[i].view(">u8").copy()
            if img.ext:
                b = bm[i, cols]
                b = (b | (b << _U64(32))) & _U64(0xFFFFFFFF00000000)
                row[2 * cols] = 0
                row[2 * cols + 1] = b
            else:
                row[cols] = spec.QCOW_OFLAG_ZERO
            img.pwrite(l2_off, row.astype(">u8").tobytes())
            img.sync()
            fixed[i, cols] = True
            p.corruptions_fixed += len(cols)
            p.findings.add_many("l2", len(cols), (
                f"Repairing offset={int(e[i, j]) & spec.L2E_OFFSET_MASK:x}: Preallocated cluster is "
                "not properly aligned; L2 entry corrupted." for j in cols.tolist()))
        return fixed

    def count_bitmaps(self) -> None:
        """qcow2_check_bitmaps_refcounts: the directory, each bitmap table, each data cluster.

        As in QEMU, a bitmap directory or table that does not load is a corruption that ends
        the check (qemu-img then reports "Check failed")."""
        img = self.img
        p = self.p
        if img.bitmaps is None or img.bitmaps[0] == 0:
            return
        nb, dsize, doff = img.bitmaps
        self.inc(self.main, doff, dsize)
        tables = _bitmap_directory(img, nb, dsize, doff)
        if isinstance(tables, str):
            p.corruptions += 1
            p.fail(f"ERROR bitmap directory: {tables}")
            raise _Abort()
        for toff, tsize in tables:        # per bitmap: each has its own table
            self.inc(self.main, toff, tsize * 8)
            t = img.u64_table(toff, tsize)
            offs = t & _U64(spec.BME_OFFSET_MASK)
            bad = ((t & _U64(spec.BME_RESERVED_MASK)) != 0) | (
                (offs != 0) & (((t & _U64(spec.BME_ALL_ONES)) != 0) | ((offs & _U64(img.C - 1)) != 0)))
            if bad.any():
                p.corruptions += 1
                p.fail(f"ERROR bitmap table at {toff:#x} has invalid entries")
                raise _Abort()
            data = offs[offs != 0].astype(np.int64)
            self.inc_many(self.main, data, img.C, 1)

    def check_refblocks(self, base_idx: np.ndarray, base_cnt: np.ndarray, nb: int) -> int:
        """check_refblocks: each refcount block must be aligned, inside the file, and counted
        exactly once. Returns the (possibly grown) number of clusters of the file."""
        img = self.img
        p = self.p
        C = img.C
        rt = img.u64_table(img.rt_off, img.rt_size)
        if len(rt) == 0:
            return nb
        idx = np.arange(len(rt), dtype=np.int64)
        resv = (rt & _U64(spec.REFT_RESERVED_MASK)) != 0
        off = reftable_offsets(rt, C)[0]
        unal = ~resv & ((off & (C - 1)) != 0)
        for mask, text in ((resv, "ERROR refcount table entry {} has reserved bits set"),
                           (unal, "ERROR refcount block {} is not cluster aligned; refcount "
                                  "table entry corrupted")):
            n = int(mask.sum())
            if n:
                p.corruptions += n
                self.rebuild = True
                p.findings.add_many("refblock", n, (text.format(i)
                                                    for i in idx[mask].tolist()))
        rest = ~resv & ~unal & (off != 0)
        cl = off >> img.cb
        grow_fix = bool(self.fix & _FIX_ERRORS)
        # With repair "all", a block past the end of the file extends the file to cover it
        # (as QEMU does, but only up to _MAX_EXTEND past the end: beyond that the resize
        # "fails" and the structures are rebuilt); later blocks are judged against the
        # grown file, i.e. against a running maximum of the extensions that succeed.
        reachable = (off + C <= img.file_size + _MAX_EXTEND) if grow_fix else np.zeros(
            len(rt), bool)
        ends = np.where(rest & reachable, cl + 1, 0)
        limit = np.maximum.accumulate(np.concatenate(([nb], ends[:-1])))
        outside = rest & (cl >= limit)
        inside = rest & ~outside
        n_out = int(outside.sum())
        if n_out:
            p.corruptions += n_out
            word = "Repairing" if grow_fix else "ERROR"
            p.findings.add_many("refblock", n_out, (
                f"{word} refcount block {i} is outside image" for i in idx[outside].tolist()))
        grow = outside & reachable
        if grow.any():
            new_size = int((off[grow] + C).max())
            try:
                _core.meta_ftruncate(img.fd, new_size)
            except OSError as e:
                p.findings.add("refblock", f"ERROR could not resize image: "
                               f"{os.strerror(e.errno)}")
                grow[:] = False
                self.rebuild = True
            else:
                img.file_size = self.file_size = new_size
                nb = max(nb, -(-new_size // C))
                p.corruptions -= int(grow.sum())
                p.corruptions_fixed += int(grow.sum())
                self.inc_many(self.rb_refs, off[grow], C, 1)
        failed = outside & ~grow if grow_fix else np.zeros(len(rt), bool)
        if failed.any():
            self.rebuild = True
            p.findings.add_many("refblock", int(failed.sum()), (
                "ERROR could not resize image: the refcount block lies too far past the end "
                "of the file" for _ in range(int(failed.sum()))))
        # The blocks inside the file: counted, and each must then read exactly 1.
        sel = np.flatnonzero(inside)
        if len(sel) == 0:
            return nb
        o = off[sel]
        c = cl[sel]
        good = o + C - self.file_size < C
        if (~good).any():
            p.corruptions += int((~good).sum())
            p.findings.add_many("eof", int((~good).sum()), (
                "ERROR: counting reference for region exceeding the end of the file by one "
                f"cluster or more: offset {v:#x} size {C:#x}" for v in o[~good].tolist()))
        # Sequential semantics: block i sees the references counted before it, including the
        # blocks before it that share its cluster.
        order = np.argsort(c, kind="stable")
        cs = c[order]
        gs = good[order].astype(np.int64)
        starts = np.concatenate(([0], np.flatnonzero(np.diff(cs)) + 1))
        grp = np.repeat(starts, np.diff(np.concatenate((starts, [len(cs)]))))
        csum = np.cumsum(gs)
        k_sorted = csum - np.concatenate(([0], csum))[grp]
        k = np.empty_like(k_sorted)
        k[order] = k_sorted
        base = _lookup(base_idx, base_cnt, c)
        rmax = img.rmax
        if rmax < (1 << 62):
            over = good & (base + k - 1 >= rmax)
            if over.any():
                p.corruptions += int(over.sum())
                p.findings.add_many("overflow", int(over.sum()), (
                    f"ERROR: overflow cluster offset={v:#x}" for v in o[over].tolist()))
            seen = np.minimum(base + k, rmax)
        else:
            seen = base + k
        self.inc_many(self.rb_refs, o[good], C, 1)
        bad = seen != 1
        if bad.any():
            p.corruptions += int(bad.sum())
            self.rebuild = True
            p.findings.add_many("refblock", int(bad.sum()), (
                f"ERROR refcount block {i} refcount={v}"
                for i, v in zip(sel[bad].tolist(), seen[bad].tolist())))
        return nb


class _Metadata:
    """QEMU's metadata overlap check (qcow2_check_metadata_overlap, default "cached" template)
    for repair writes into L2 tables: the clusters of the header, the active L1 table, the
    reftable, the refblocks, the snapshot table, the snapshot L1 tables and the bitmap
    directory, as merged cluster intervals."""

    def __init__(self, img: _Image, snaps):
        C = img.C
        ranges = [(0, C), (img.l1_off, img.l1_size * 8), (img.rt_off, img.rt_size * 8),
                  (img.snapshots_offset, img.snapshots_size)]
        ranges += [(s.l1_table_offset, s.l1_size * 8) for s in snaps]
        if img.bitmaps is not None:
            ranges.append((img.bitmaps[2], img.bitmaps[1]))
        starts = [o >> img.cb for o, n in ranges if n > 0]
        ends = [((o + n - 1) >> img.cb) + 1 for o, n in ranges if n > 0]
        rb = reftable_offsets(img.u64_table(img.rt_off, img.rt_size), C)[0]
        rb = rb[rb != 0] >> img.cb
        st = np.concatenate((np.array(starts, np.int64), rb))
        en = np.concatenate((np.array(ends, np.int64), rb + 1))
        order = np.argsort(st, kind="stable")
        st, en = st[order], np.maximum.accumulate(en[order])
        self.starts, self.ends = st, en      # ends are running maxima: one query suffices
        self.cb = img.cb

    def overlaps(self, offset: int, size: int) -> bool:
        a = offset >> self.cb
        b = ((offset + size - 1) >> self.cb) + 1
        i = int(np.searchsorted(self.starts, b, "left")) - 1
        return i >= 0 and int(self.ends[i]) > a


# --- Comparing with the stored refcounts ------------------------------------------------------

@dataclass
class _Mismatches:
    idx: np.ndarray
    stored: np.ndarray
    computed: np.ndarray
    highest: int
    eio_clusters: int
    eio_blocks: list
    nb: int


def _compare(img: _Image, uidx: np.ndarray, ucnt: np.ndarray, nb: int) -> _Mismatches:
    """compare_refcounts without fixing: every cluster < nb whose stored refcount differs
    from the computed one, the highest cluster in use, and the clusters whose refblock cannot
    be read."""
    C = img.C
    E = img.E
    st = _StoredRefcounts(img)
    rt = st.rt
    n_rb = -(-nb // E)
    n_rt = min(n_rb, len(rt))
    offs, unreadable = reftable_offsets(rt[:n_rt], C)
    present = (offs != 0) & ~unreadable
    eio = (offs != 0) & unreadable
    uidx_nb = uidx < nb
    uidx, ucnt = uidx[uidx_nb], ucnt[uidx_nb]
    rbi = uidx >> img.rb_bits
    out_idx, out_st, out_cp = [], [], []
    highest = -1
    # Ranges without a refblock: every computed reference there mismatches a stored 0.
    absent_rb = np.ones(n_rb, dtype=bool)
    absent_rb[:n_rt] = ~(present | eio)
    sel = absent_rb[rbi] if len(rbi) else np.zeros(0, bool)
    sel &= ucnt > 0
    if sel.any():
        out_idx.append(uidx[sel])
        out_st.append(np.zeros(int(sel.sum()), _U64))
        out_cp.append(ucnt[sel].astype(_U64))
        highest = max(highest, int(uidx[sel].max()))
    # Unreadable refblocks: every cluster of their range is a check error.
    eio_blocks = np.flatnonzero(eio).tolist()
    eio_clusters = 0
    for b in eio_blocks:
        eio_clusters += min(E, nb - b * E)
    # Present refblocks, in batches.
    pres = np.flatnonzero(present)
    rows = max(1, _BATCH_BYTES // C)
    for s in range(0, len(pres), rows):
        blk = pres[s:s + rows]
        boffs = offs[blk]
        order = np.argsort(boffs, kind="stable")
        raw = np.empty((len(blk), C), np.uint8)
        # read_rows wants ascending distinct offsets: read the distinct ones, then scatter.
        ub, uinv = np.unique(boffs, return_inverse=True)
        raw[:] = img.read_rows(ub, C)[uinv]
        del order
        stored = decode_refblocks(raw, img.rorder)
        comp = np.zeros(stored.shape, _U64)
        pos = np.searchsorted(blk, rbi)
        pos_c = np.minimum(pos, len(blk) - 1)
        hit = (len(blk) > 0) & (blk[pos_c] == rbi)
        comp[pos_c[hit], uidx[hit] & (E - 1)] = ucnt[hit].astype(_U64)
        # Clusters at or past nb are not compared (nor counted for the end offset).
        last = int(blk[-1])
        if (last + 1) * E > nb:
            valid = nb - last * E
            stored[-1, valid:] = 0
            comp[-1, valid:] = 0
        nzr, nzc = np.nonzero((stored != 0) | (comp != 0))
        if len(nzr):
            highest = max(highest, int((blk[nzr] * E + nzc).max()))
        mr, mc = np.nonzero(stored != comp)
        if len(mr):
            out_idx.append(blk[mr] * E + mc)
            out_st.append(stored[mr, mc])
            out_cp.append(comp[mr, mc])
    if out_idx:
        idx = np.concatenate(out_idx)
        order = np.argsort(idx, kind="stable")
        mis = _Mismatches(idx[order], np.concatenate(out_st)[order],
                          np.concatenate(out_cp)[order], max(highest, 0), eio_clusters,
                          eio_blocks, nb)
    else:
        mis = _Mismatches(np.zeros(0, np.int64), np.zeros(0, _U64), np.zeros(0, _U64),
                          max(highest, 0), eio_clusters, eio_blocks, nb)
    return mis


def _report_mismatches(p: _Pass, img: _Image, mis: _Mismatches, fix: int):
    """The verdicts of compare_refcounts for one set of mismatches. Returns (rebuild,
    clusters to raise, clusters to lower) and counts what stays unfixed."""
    if mis.eio_clusters:
        p.check_errors += mis.eio_clusters
        p.findings.add_many("eio", len(mis.eio_blocks), (
            f"Can't get refcount for clusters {b * img.E}..{min(b * img.E + img.E, mis.nb) - 1}"
            ": Input/output error (the refcount block cannot be read)"
            for b in mis.eio_blocks))
    st, cp = mis.stored, mis.computed
    rebuild = bool(np.any(st == 0))   # a referenced cluster without refcount
    raise_ = (st != 0) & (st < cp) & bool(fix & _FIX_ERRORS)
    lower = (st > cp) & bool(fix & _FIX_LEAKS)
    fixing = raise_ | lower
    under = st < cp
    p.corruptions += int((under & ~fixing).sum())
    p.leaks += int((~under & ~fixing).sum())
    words = np.where(fixing, "Repairing", np.where(under, "ERROR", "Leaked"))
    p.findings.add_many("refcount", len(st), (
        f"{w} cluster {i} refcount={s} reference={c}"
        for w, i, s, c in zip(words.tolist(), mis.idx.tolist(), st.tolist(), cp.tolist())))
    return rebuild, raise_, lower


def _write_refcounts(img: _Image, clusters: np.ndarray, values: np.ndarray) -> None:
    """Store new refcounts for the given clusters (their refblocks exist and are aligned):
    one read-modify-write per refblock, then fsync."""
    if len(clusters) == 0:
        return
    st = _StoredRefcounts(img)
    rbi = clusters >> img.rb_bits
    for b in np.unique(rbi).tolist():           # per refblock
        sel = rbi == b
        off = int(st.rt[b]) & spec.REFT_OFFSET_MASK
        raw = np.frombuffer(img.pread(off, img.C), np.uint8).reshape(1, -1)
        vals = decode_refblocks(raw, img.rorder)
        vals[0, clusters[sel] & (img.E - 1)] = values[sel].astype(_U64)
        img.pwrite(off, encode_refblocks(vals, img.rorder))
    img.sync()


# --- The refcount check as a whole ------------------------------------------------------------

def _calculate(p: _Pass, img: _Image, snaps, fix: int, stats: bool):
    """calculate_refcounts: returns (calc, sparse counts (idx, cnt), nb_clusters)."""
    calc = _Calc(p, img, snaps, fix, stats)
    calc.run()
    idx, cnt = calc.main.totals()
    ridx, rcnt = calc.rt_refs.totals()
    idx, cnt = _merge(idx, cnt, ridx, rcnt)
    nb = -(-img.file_size // img.C)
    if len(idx):
        nb = max(nb, int(idx[-1]) + 1)
    clamped = _clamp(p, img, idx, cnt)
    nb = calc.check_refblocks(idx, clamped, nb)
    bidx, bcnt = calc.rb_refs.totals()
    idx, cnt = _merge(idx, cnt, bidx, bcnt)
    if len(idx):
        nb = max(nb, int(idx[-1]) + 1)
    cnt = np.minimum(cnt, img.rmax) if img.rmax < (1 << 62) else cnt
    return calc, idx, cnt, nb


def _merge(a_idx, a_cnt, b_idx, b_cnt):
    if len(b_idx) == 0:
        return a_idx, a_cnt
    if len(a_idx) == 0:
        return b_idx, b_cnt
    r = _Refs()
    r.add(a_idx, a_cnt)
    r.add(b_idx, b_cnt)
    return r.totals()


def _clamp(p: _Pass, img: _Image, idx, cnt):
    """Refcounts cannot exceed the maximum: each increment past it is an overflow error."""
    if img.rmax >= (1 << 62) or len(cnt) == 0:
        return cnt
    over = cnt > img.rmax
    if over.any():
        p.corruptions += int((cnt[over] - img.rmax).sum())
        p.findings.add_many("overflow", int((cnt[over] - img.rmax).sum()), (
            f"ERROR: overflow cluster offset={int(i) << img.cb:#x}" for i in idx[over].tolist()))
        return np.minimum(cnt, img.rmax)
    return cnt


def _check_refcounts(p: _Pass, img: _Image, snaps) -> bool:
    """qcow2_check_refcounts (and its repairs), then check_oflag_copied. Returns False when
    the check could not complete (qemu-img then prints no result).

    The counts of the snapshot table check are set aside meanwhile and added back at the
    end, as QEMU keeps them in a separate result (a rebuild resets only the refcount ones)."""
    outer = _counters(p)
    _restore(p, (0, 0, 0, 0, 0))
    ok = _check_refcounts_inner(p, img, snaps)
    p.check_errors += outer[0]
    p.corruptions += outer[1]
    p.leaks += outer[2]
    p.corruptions_fixed += outer[3]
    p.leaks_fixed += outer[4]
    return ok


def _check_refcounts_inner(p: _Pass, img: _Image, snaps) -> bool:
    fix = p.fix
    img.snapshots = snaps
    p.total_clusters = -(-((img.size // 512) * 512) // img.C)
    calc, idx, cnt, nb = _calculate(p, img, snaps, fix, True)
    pre = _counters(p)
    mis = _compare(img, idx, cnt, nb)
    rebuild, _, _ = _report_mismatches(p, img, mis, 0)
    rebuild = rebuild or calc.rebuild
    highest = mis.highest

    if rebuild and fix & _FIX_ERRORS:
        old_corruptions, old_leaks = p.corruptions, p.leaks
        p.findings.add("rebuild", "Rebuilding refcount structure")
        if not _rebuild(p, img, idx, cnt, nb, calc.protected(nb)):
            return False
        p.rebuilt = True
        # Count again against the new structures: what remains are the corruptions a
        # rebuild does not fix. The old structures are now leaks, which are freed.
        img2 = _reload(p, img)
        if img2 is None:
            return False
        img2.snapshots_size = img.snapshots_size
        img2.snapshots = snaps
        q = _Pass(p.fd, p.path, 0)
        calc2, idx2, cnt2, nb2 = _calculate(q, img2, snaps, 0, False)
        mis2 = _compare(img2, idx2, cnt2, nb2)
        r = _Pass(p.fd, p.path, 0)
        rb2, _, lower2 = _report_mismatches(r, img2, mis2, _FIX_LEAKS)
        if rb2 or calc2.rebuild:
            p.findings.add("rebuild", "ERROR rebuilt refcount structure is still broken")
        _write_refcounts(img2, mis2.idx[lower2], mis2.computed[lower2])
        p.corruptions = q.corruptions
        p.leaks = 0
        p.check_errors += q.check_errors
        if p.corruptions < old_corruptions:
            p.corruptions_fixed += old_corruptions - p.corruptions
        if p.leaks < old_leaks:
            p.leaks_fixed += old_leaks - p.leaks
        p.leaks += r.leaks          # leaks the rebuild made and could not free
        highest = mis2.highest
        img = img2
    elif fix:
        if rebuild:
            p.findings.add("fatal", "ERROR need to rebuild refcount structures")
            p.check_errors += 1
            return False
        if p.leaks or p.corruptions:
            _restore(p, pre)
            # The fixes of compare_refcounts, ordered for crash safety: every raise is
            # durable before any refcount is lowered.
            _, raise_, lower = _report_mismatches(p, img, mis, fix)
            _write_refcounts(img, mis.idx[raise_], mis.computed[raise_])
            _write_refcounts(img, mis.idx[lower], mis.computed[lower])
            p.corruptions_fixed += int(raise_.sum())
            p.leaks_fixed += int(lower.sum())
    if not _check_copied(p, img):
        return False
    p.image_end_offset = (highest + 1) * img.C
    return True


def _counters(p: _Pass):
    return (p.check_errors, p.corruptions, p.leaks, p.corruptions_fixed, p.leaks_fixed)


def _restore(p: _Pass, saved) -> None:
    (p.check_errors, p.corruptions, p.leaks, p.corruptions_fixed, p.leaks_fixed) = saved


def _reload(p: _Pass, img: _Image) -> _Image | None:
    """The image as it is on disk after a repair wrote its header."""
    h, head, file_size, problem = _load(img.fd, img.path)
    if h is None:
        p.fail(f"ERROR the repaired header cannot be read: {problem}")
        return None
    return _Image(img.fd, img.path, h, head, file_size)


class _Imrt:
    """QEMU's in-memory refcount table for a rebuild: one refcount per cluster of the file
    (dense, so its size is bounded by the file size, as QEMU's), which can grow at the end.

    Clusters that something names but the count does not include (a refcount block with a bad
    reftable entry, a skipped snapshot L1 table, a pointer past the end of the file) are
    *blocked*: a rebuild never places anything there, so that no new structure can be
    overwritten through such a pointer (QEMU relies on its metadata overlap check, which does
    not cover all of them)."""

    def __init__(self, img: _Image, idx: np.ndarray, cnt: np.ndarray, n: int,
                 protect: np.ndarray):
        self.dtype = {1: np.uint8, 2: np.uint8, 4: np.uint8, 8: np.uint8, 16: np.uint16,
                      32: np.uint32, 64: np.uint64}[img.h.refcount_bits]
        self.n = n
        cap = max(n, 1) + 1024
        self.vals = np.zeros(cap, dtype=self.dtype)
        self.vals[idx] = cnt.astype(self.dtype)
        self.blocked = np.zeros(cap, dtype=bool)
        self.far = np.unique(protect[protect >= 0]) if len(protect) else np.zeros(0, np.int64)
        self._mark_blocked()

    def _mark_blocked(self) -> None:
        inside = self.far[self.far < len(self.vals)]
        self.blocked[inside] = True

    def grow(self, n: int) -> None:
        if n > len(self.vals):
            cap = max(n, 2 * len(self.vals))
            vals = np.zeros(cap, dtype=self.dtype)
            vals[:len(self.vals)] = self.vals
            blocked = np.zeros(cap, dtype=bool)
            blocked[:len(self.blocked)] = self.blocked
            self.vals, self.blocked = vals, blocked
            self._mark_blocked()
        self.n = max(self.n, n)

    def _first(self, start: int, end: int, want_free: bool) -> int:
        """First cluster in [start, end) that is free (or in use); -1 if none. Searches in
        growing windows, so a hit near ``start`` costs little."""
        w = 4096
        while start < end:
            stop = min(end, start + w)
            seg = self.vals[start:stop]
            if want_free:
                hits = np.flatnonzero((seg == 0) & ~self.blocked[start:stop])
            else:
                hits = np.flatnonzero(seg)
            if len(hits):
                return start + int(hits[0])
            start = stop
            w *= 4
        return -1

    def _append_at(self, c: int, count: int) -> int:
        """The first c' >= c where ``count`` unblocked clusters follow (past the table end)."""
        while True:
            self.grow(c + count)
            bad = np.flatnonzero(self.blocked[c:c + count])
            if not len(bad):
                return c
            c += int(bad[-1]) + 1

    def alloc(self, count: int, first_free: int):
        """alloc_clusters_imrt: the first run of ``count`` free clusters at or after
        first_free (growing the table at its end if needed); they get refcount 1.
        Returns (cluster index, updated first_free)."""
        c = -1
        if count == 1:
            c = self._first(first_free, self.n, True)
            if c >= 0:
                first_free = c
        elif first_free < self.n:
            free = np.flatnonzero((self.vals[first_free:self.n] == 0)
                                  & ~self.blocked[first_free:self.n])
            if len(free):
                brk = np.flatnonzero(np.diff(free) != 1) + 1
                starts = free[np.concatenate(([0], brk))]
                ends = free[np.concatenate((brk - 1, [len(free) - 1]))] + 1
                ok = np.flatnonzero(ends - starts >= count)
                if len(ok):
                    c = first_free + int(starts[ok[0]])
                elif first_free + int(ends[-1]) == self.n:     # a free run reaching the end
                    tail = first_free + int(starts[-1])
                    c = self._append_at(tail, count)
                first_free = first_free + int(free[0])
        if c < 0:
            c = self._append_at(max(first_free, self.n), count)
        self.grow(c + count)
        self.vals[c:c + count] = 1
        return c, first_free


def _rebuild(p: _Pass, img: _Image, idx: np.ndarray, cnt: np.ndarray, nb: int,
             protect: np.ndarray) -> bool:
    """rebuild_refcount_structure, step for step as QEMU 7.2 does it, so that the new layout
    is the one ``qemu-img check -r all`` would write: refblocks go into the first free
    clusters (clusters nothing references), each refblock range being written in order, then
    the reftable into the first free run, repeating while the reftable grows; then the header
    pointer is switched. The old structures are then unreferenced: the caller frees them.

    Ordering: every new refblock and the reftable are written to clusters no structure
    references and synced before the 12-byte header pointer is written and synced, so a crash
    at any point leaves either the old structures (and the same repair to do again) or the
    new ones."""
    C, E = img.C, img.E
    imrt = _Imrt(img, idx, cnt, nb, protect)
    reftable = np.zeros(0, dtype=np.int64)

    def write_refblocks(first: int, end: int) -> bool:
        nonlocal reftable
        first_free = 0
        grown = False
        cluster = first
        while cluster < end:
            cluster = imrt._first(cluster, min(end, imrt.n), False)
            if cluster < 0:
                break
            ri = cluster >> img.rb_bits
            rstart = ri << img.rb_bits
            if ri < len(reftable) and reftable[ri]:
                roff = int(reftable[ri])
            else:
                first_free = max(first_free, rstart)
                rc, first_free = imrt.alloc(1, first_free)
                roff = rc * C
                if rc >= end:
                    end = rc + 1           # that refblock's own refcount must be written too
                if ri >= len(reftable):
                    entries = -(-(ri + 1) * 8 // C) * C // 8
                    reftable = np.concatenate((reftable, np.zeros(entries - len(reftable),
                                                                  np.int64)))
                    grown = True
                reftable[ri] = roff
            block = np.zeros((1, E), _U64)
            hi = min(rstart + E, imrt.n)
            if hi > rstart:
                block[0, :hi - rstart] = imrt.vals[rstart:hi]
            img.pwrite(roff, encode_refblocks(block, img.rorder))
            cluster = rstart + E
        return grown

    write_refblocks(0, nb)
    for _ in range(64):
        n_rt = -(-len(reftable) * 8 // C)
        rt_cluster, _ff = imrt.alloc(n_rt, 0)
        if not write_refblocks(rt_cluster, rt_cluster + n_rt):
            break
    else:
        p.fail("ERROR cannot lay out the new refcount structures")
        return False
    rt_off = rt_cluster * C
    if n_rt * C > spec.MAX_REFTABLE_SIZE or (rt_off + n_rt * C) >= spec.MAX_CLUSTER_OFFSET:
        p.fail("ERROR rebuilding the refcount structures would need a refcount table larger "
               "than QEMU allows")
        return False
    img.pwrite(rt_off, reftable.astype(">u8").tobytes())
    img.sync()
    img.pwrite(spec.HDR_REFCOUNT_TABLE_OFFSET, spec.U64.pack(rt_off) + spec.U32.pack(n_rt))
    img.sync()
    return True


def _check_copied(p: _Pass, img: _Image) -> bool:
    """check_oflag_copied: in the active tree, COPIED must be set exactly where the stored
    refcount is 1. Returns False when a repair write was refused (QEMU then fails the check)."""
    fix = p.fix
    if fix & _FIX_ERRORS:
        repair = True
    elif fix & _FIX_LEAKS:
        repair = not (p.check_errors or p.corruptions or p.leaks)
    else:
        repair = False
    word = "Repairing" if repair else "ERROR"
    st = _StoredRefcounts(img)
    l1 = img.u64_table(img.l1_off, img.l1_size)
    l2 = (l1 & _U64(spec.L1E_OFFSET_MASK)).astype(np.int64)
    use = np.flatnonzero(l2 != 0)
    if len(use) == 0:
        return True
    rc, ok = st.get(l2[use] >> img.cb)
    use, rc = use[ok], rc[ok]
    bad = (rc == 1) != ((l1[use] & _U64(spec.QCOW_OFLAG_COPIED)) != 0)
    if bad.any():
        bi = use[bad]
        p.corruptions += len(bi)
        p.findings.add_many("copied", len(bi), (
            f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={int(l1[i]):x} "
            f"refcount={int(r)}" for i, r in zip(bi.tolist(), rc[bad].tolist())))
        if repair:
            new = l1.copy()
            fixed = np.where(rc[bad] == 1, new[bi] | _U64(spec.QCOW_OFLAG_COPIED),
                             new[bi] & _U64(~spec.QCOW_OFLAG_COPIED & (2**64 - 1)))
            new[bi] = fixed
            be = new.astype(">u8")
            for i in bi.tolist():                  # one 8-byte write per fixed L1 entry
                img.pwrite(img.l1_off + 8 * i, be[i:i + 1].tobytes())
            img.sync()
            p.corruptions -= len(bi)
            p.corruptions_fixed += len(bi)
    # The L2 tables of the active tree, each once per L1 entry that points to it.
    uoffs, mult = np.unique(l2[use], return_counts=True)
    meta = _Metadata(img, img.snapshots) if repair else None
    C = img.C
    rows = max(1, _BATCH_BYTES // C)
    for s in range(0, len(uoffs), rows):
        offs = uoffs[s:s + rows]
        m = mult[s:s + rows]
        rows = _L2Rows(img, img.read_rows(offs, C))
        words, e, copied, off = rows.words, rows.e, rows.copied, rows.off
        r, c = np.nonzero(rows.normal)
        if len(r) == 0:
            continue
        if img.data_file:
            rc = np.ones(len(r), _U64)
            ok = np.ones(len(r), bool)
        else:
            rc, ok = st.get(off[r, c] >> img.cb)
        r, c, rc = r[ok], c[ok], rc[ok]
        bad = (rc == 1) != copied[r, c]
        if not bad.any():
            continue
        br, bc, brc = r[bad], c[bad], rc[bad]
        if repair:
            p.corruptions_fixed += len(br)
        else:
            p.corruptions += int(m[br].sum())
        p.findings.add_many("copied", len(br), (
            f"{word} OFLAG_COPIED data cluster: l2_entry={int(e[i, j]):x} refcount={int(v)}"
            for i, j, v in zip(br.tolist(), bc.tolist(), brc.tolist())))
        if repair:
            col = 2 * bc if img.ext else bc
            cur = words[br, col]
            words[br, col] = np.where(brc == 1, cur | _U64(spec.QCOW_OFLAG_COPIED),
                                      cur & _U64(~spec.QCOW_OFLAG_COPIED & (2**64 - 1)))
            for i in np.unique(br).tolist():       # one write per fixed L2 table
                l2_off = int(offs[i])
                if meta.overlaps(l2_off, C):
                    n = int((br == i).sum())
                    p.corruptions_fixed -= n
                    p.corruptions += n
                    p.check_errors += 1
                    p.findings.add("fatal", "ERROR: Could not write L2 table; metadata "
                                   "overlap check failed")
                    img.sync()
                    return False
                img.pwrite(l2_off, words[i].astype(">u8").tobytes())
            img.sync()
    return True


def _mark_clean(p: _Pass, img: _Image) -> None:
    """qcow2_mark_clean + qcow2_mark_consistent: clear the dirty and corrupt bits."""
    if img.version < 3:
        return
    word = _pread(img.fd, spec.HDR_INCOMPATIBLE_FEATURES, 8, img.path)
    if len(word) < 8:
        return
    incompat = spec.U64.unpack(word)[0]
    if incompat & (spec.INCOMPAT_DIRTY | spec.INCOMPAT_CORRUPT):
        img.sync()      # everything repaired is durable before the bits say so
        img.pwrite(spec.HDR_INCOMPATIBLE_FEATURES,
                   spec.U64.pack(incompat & ~(spec.INCOMPAT_DIRTY | spec.INCOMPAT_CORRUPT)))
        img.sync()
        p.findings.add("header", "Cleared the dirty/corrupt bits in the header")
