"""The snapshot table: QEMU's ``qcow2_check_read_snapshot_table`` and
``qcow2_check_fix_snapshot_table``.

The table is parsed and encoded only by :mod:`engine.qcow2.snapshots` (its lenient mode and
its encoder); this module decides, as QEMU's check does, which problems end the check and
which the repair fixes, and rewrites a bad table crash-safely.
"""

from __future__ import annotations

import numpy as np

from engine.qcow2 import spec
from engine.qcow2.refblocks import first_free_run, reftable_offsets
from engine.qcow2.snapshots import (
    SnapshotEntry,
    SnapshotProblem,
    encode_snapshot_table,
    read_snapshot_table,
)
from engine.errors import EngineError
from engine.check.result import _FIX_ERRORS, _Pass
from engine.check.reader import _Image, _reload
from engine.check.stored import _StoredRefcounts, _write_refcounts


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
    nb = img.h.nb_snapshots
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
        img.h.nb_snapshots = len(snaps)
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
        keep_out = [(old_off, old_size), (img.l1_off, img.l1_bytes),
                    (img.rt_off, img.rt_bytes)]
        keep_out += [(sn.l1_table_offset, sn.l1_size * spec.L1E_SIZE) for sn in snaps]
        first = _place_table(img, n, keep_out)
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


def _place_table(img: _Image, n: int, keep_out: list[tuple[int, int]]) -> int | None:
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
    first = first_free_run(lambda a, b: free[a:b], limit, n)
    if first + n > limit:
        return None
    blocks = np.unique(np.arange(first, first + n) >> img.rb_bits)
    offs = np.zeros(len(blocks), np.int64)
    inrt = blocks < len(st.rt)
    if not inrt.all():
        return None
    offs, unreadable = reftable_offsets(st.rt[blocks], img.C)
    if (offs == 0).any() or unreadable.any():
        return None
    return first
