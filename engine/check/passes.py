"""One check pass, QEMU's ``qcow2_co_check_locked``: the snapshot table, the refcounts
(computed, compared, repaired or rebuilt), the COPIED flags, then the header bits."""

from __future__ import annotations

from engine.qcow2 import spec
from engine.qcow2.snapshots import SnapshotEntry
from engine.check.result import _FIX_ERRORS, _FIX_LEAKS, _Abort, _Pass
from engine.check.reader import _Image, _load, _pread, _reload, _validate_open
from engine.check.stored import _compare, _report_mismatches, _write_refcounts
from engine.check.computed import _calculate
from engine.check.rebuild import _rebuild
from engine.check.copied import _check_copied
from engine.check.snapshot_table import _fix_snapshot_table, _read_snapshot_table


def _check_once(fd: int, path: str, fix: int, cap: int) -> _Pass:
    """qcow2_co_check_locked: the snapshot table, the refcounts, then the header bits."""
    p = _Pass(fd, path, fix, cap)
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


def _check_refcounts(p: _Pass, img: _Image, snaps: list[SnapshotEntry]) -> bool:
    """qcow2_check_refcounts (and its repairs), then check_oflag_copied. Returns False when
    the check could not complete (qemu-img then prints no result).

    The counts of the snapshot table check are set aside meanwhile and added back at the
    end, as QEMU keeps them in a separate result (a rebuild resets only the refcount ones)."""
    outer = p.counters()
    p.restore((0, 0, 0, 0, 0))
    ok = _check_refcounts_inner(p, img, snaps)
    p.check_errors += outer[0]
    p.corruptions += outer[1]
    p.leaks += outer[2]
    p.corruptions_fixed += outer[3]
    p.leaks_fixed += outer[4]
    return ok


def _check_refcounts_inner(p: _Pass, img: _Image, snaps: list[SnapshotEntry]) -> bool:
    fix = p.fix
    img.snapshots = snaps
    p.total_clusters = -(-img.h.disk_size // img.C)
    calc, idx, cnt, nb = _calculate(p, img, snaps, fix, True)
    pre = p.counters()
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
        q = p.scratch()
        calc2, idx2, cnt2, nb2 = _calculate(q, img2, snaps, 0, False)
        mis2 = _compare(img2, idx2, cnt2, nb2)
        r = p.scratch()
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
            p.restore(pre)
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
