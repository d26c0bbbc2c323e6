"""The computed reference counts: QEMU's ``calculate_refcounts``.

:class:`_Calc` walks the metadata (header, L1 and L2 tables of the active tree and of every
snapshot, snapshot table, reftable, LUKS header, bitmaps), counts one reference per use into
sparse :class:`_Refs`, and reports the structural corruptions it meets on the way; its
:meth:`_Calc.check_refblocks` counts the refcount blocks and checks each reads exactly 1.
The work is numpy over whole tables and batches of tables, never per entry.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import numpy as np

from engine import _core
from engine.qcow2 import spec
from engine.qcow2.bitmaps import directory_location_problem, parse_bitmap_directory
from engine.qcow2.refblocks import reftable_offsets
from engine.qcow2.snapshots import SnapshotEntry
from engine.check.result import _FIX_ERRORS, _Abort, _Pass
from engine.check.reader import _BATCH_BYTES, _Image, _L2Rows, _Metadata

# A repair may extend the file to cover a refcount block past its end (as QEMU does), but not
# by more than this: a block pointer far past the end is rebuilt instead of making a huge file.
_MAX_EXTEND = 1 << 30

_U64 = np.uint64
# The zero half of an extended L2 entry's subcluster bitmap (bits 32..63).
_ZERO_HALF = spec.L2_BITMAP_ALL_ALLOC << spec.SUBCLUSTERS_PER_CLUSTER


class _Refs:
    """Computed references, kept sparse: pieces of (cluster index, weight) arrays."""

    def __init__(self) -> None:
        self.idx: list[np.ndarray] = []
        self.w: list[np.ndarray] = []

    def add(self, idx: np.ndarray, w: np.ndarray | int) -> None:
        if len(idx):
            self.idx.append(idx.astype(np.int64))
            self.w.append(np.broadcast_to(np.asarray(w, dtype=np.int64), idx.shape).copy())

    def totals(self) -> tuple[np.ndarray, np.ndarray]:
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


def _bitmap_directory(img: _Image, nb: int, dsize: int, doff: int
                      ) -> list[tuple[int, int]] | str:
    """bitmap_list_load's checks (:mod:`engine.qcow2.bitmaps`): the (table offset, table
    size) of each bitmap, or the reason the directory is unusable (a string)."""
    problem = directory_location_problem(dsize, doff)
    if problem is not None:
        return problem
    entries = parse_bitmap_directory(img.pread(doff, dsize), nb, img.C, img.size)
    if isinstance(entries, str):
        return entries
    return [(e.table_offset, e.table_size) for e in entries]


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

    def inc_many(self, refs: _Refs, offs: np.ndarray, sizes: np.ndarray | int,
                 weights: np.ndarray | int) -> None:
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
                self.uncount_range(s.l1_table_offset, s.l1_size * spec.L1E_SIZE)
                continue
            if s.l1_size > spec.MAX_L1_ENTRIES:
                p.corruptions += 1
                p.findings.add("snapshot", f"ERROR snapshot {s.shown_id} ({s.shown_name}) "
                               f"l1_size={s.l1_size:#x}: L1 table is too large; snapshot "
                               "table entry corrupted")
                self.uncount_range(s.l1_table_offset,
                                   min(s.l1_size * spec.L1E_SIZE, spec.MAX_L1_SIZE))
                continue
            l1s.append((s.l1_table_offset, s.l1_size, False))
        self.walk_l1s(l1s)
        # snapshot table, reftable, LUKS header, bitmaps
        self.inc(self.main, img.snapshots_offset, img.snapshots_size)
        self.inc(self.rt_refs, img.rt_off, img.rt_bytes)
        if img.crypto is not None and img.crypto[1]:
            self.inc(self.main, img.crypto[0], img.crypto[1])
        self.count_bitmaps()

    def walk_l1s(self, l1s: list[tuple[int, int, bool]]) -> None:
        """check_refcounts_l1 for every L1 table; identical tables are read once."""
        img = self.img
        p = self.p
        groups: dict[tuple[int, int, bool], int] = {}
        for key in l1s:
            groups[key] = groups.get(key, 0) + 1
        l2_offs, l2_w, l2_act = [], [], []
        for (off, size, active), k in groups.items():
            if size == 0:
                continue
            self.inc(self.main, off, size * spec.L1E_SIZE, k)
            if off > spec.MAX_DISK_LENGTH - size * spec.L1E_SIZE:
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
        rows = _L2Rows(img, img.read_rows(offs, C))
        e, bm, comp, copied, off = rows.e, rows.bm, rows.comp, rows.copied, rows.off
        zero, normal = rows.zero, rows.normal
        W = m_tot[:, None]
        unalloc = ~comp & ~zero & ~rows.has_off

        def count(mask: np.ndarray, kind: str,
                  fmt_line: Callable[[int, int, int], str]) -> None:
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
            count(normal & (((bm >> _U64(spec.SUBCLUSTERS_PER_CLUSTER)) & bm) != 0), "l2",
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
                fixed = self.fix_prealloc(offs, rows, fixable)
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

    def fix_prealloc(self, offs: np.ndarray, rows: _L2Rows, fixable: np.ndarray) -> np.ndarray:
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
            row = rows.words[i].copy()
            at = rows.entry_cols(cols)
            if rows.bm is not None:
                # every subcluster allocated becomes a zero subcluster, the others stay zero
                b = rows.bm[i, cols]
                row[at] = 0
                row[at + 1] = (b | (b << _U64(spec.SUBCLUSTERS_PER_CLUSTER))) & _U64(_ZERO_HALF)
            else:
                row[at] = spec.QCOW_OFLAG_ZERO
            img.pwrite(l2_off, _L2Rows.encode(row))
            img.sync()
            fixed[i, cols] = True
            p.corruptions_fixed += len(cols)
            p.findings.add_many("l2", len(cols), (
                f"Repairing offset={int(rows.e[i, j]) & spec.L2E_OFFSET_MASK:x}: Preallocated "
                "cluster is not properly aligned; L2 entry corrupted." for j in cols.tolist()))
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
                               f"{os.strerror(e.errno or errno.EIO)}")
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


def _calculate(p: _Pass, img: _Image, snaps: list[SnapshotEntry], fix: int, stats: bool
               ) -> tuple[_Calc, np.ndarray, np.ndarray, int]:
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


def _merge(a_idx: np.ndarray, a_cnt: np.ndarray, b_idx: np.ndarray, b_cnt: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    if len(b_idx) == 0:
        return a_idx, a_cnt
    if len(a_idx) == 0:
        return b_idx, b_cnt
    r = _Refs()
    r.add(a_idx, a_cnt)
    r.add(b_idx, b_cnt)
    return r.totals()


def _clamp(p: _Pass, img: _Image, idx: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    """Refcounts cannot exceed the maximum: each increment past it is an overflow error."""
    if img.rmax >= (1 << 62) or len(cnt) == 0:
        return cnt
    over = cnt > img.rmax
    if over.any():
        p.corruptions += int((cnt[over] - img.rmax).sum())
        p.findings.add_many("overflow", int((cnt[over] - img.rmax).sum()), (
            f"ERROR: overflow cluster offset={int(i) << img.cb:#x}" for i in idx[over].tolist()))
        clamped: np.ndarray = np.minimum(cnt, img.rmax)
        return clamped
    return cnt
