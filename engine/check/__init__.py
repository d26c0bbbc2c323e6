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

The package, one room per concern (each imports only those listed before it):

- :mod:`~engine.check.result`: :class:`CheckResult`, the counters and findings of a pass;
- :mod:`~engine.check.reader`: the image as the check reads it (header, I/O, open rules,
  decoded L2 tables, the metadata overlap check);
- :mod:`~engine.check.stored`: the stored refcounts, their comparison and writes;
- :mod:`~engine.check.computed`: the computed refcounts and the structural checks;
- :mod:`~engine.check.rebuild`: the rebuild of the refcount structures;
- :mod:`~engine.check.copied`: the COPIED flags;
- :mod:`~engine.check.snapshot_table`: the snapshot table check and rewrite;
- :mod:`~engine.check.passes`: one pass, in QEMU's order.

The format rules (header, snapshot table, refcount blocks, every mask and limit) come from
:mod:`engine.qcow2`; nothing here re-derives them.
"""

from __future__ import annotations

from engine.errors import InvalidArgument
from engine.check.result import _MODES, MAX_FINDINGS_PER_KIND, CheckResult
from engine.check.passes import _check_once

__all__ = ["CheckResult", "check_file", "MAX_FINDINGS_PER_KIND"]


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

    A corrupt image never raises: every inconsistency is reported in the result. Findings
    are capped at this module's :data:`MAX_FINDINGS_PER_KIND`, read at each call.
    """
    if repair not in _MODES:
        raise InvalidArgument(f"repair must be None, 'leaks' or 'all', not {repair!r}",
                              path=filename)
    fix = _MODES[repair]
    first = _check_once(fd, filename, fix, MAX_FINDINGS_PER_KIND)
    if not (first.corruptions_fixed or first.leaks_fixed):
        return first.result(filename)
    # As qemu-img: report the state of the repaired image, plus what the repair fixed.
    second = _check_once(fd, filename, 0, MAX_FINDINGS_PER_KIND)
    res = second.result(filename)
    res.corruptions_fixed = first.corruptions_fixed
    res.leaks_fixed = first.leaks_fixed
    res.rebuilt = first.rebuilt
    res.findings = (first.findings.lines() + ["Double checking the fixed image now..."]
                    + res.findings)
    return res
