"""The refcounts stored on disk: lookup, comparison with the computed ones, writes.

:class:`_StoredRefcounts` is QEMU's ``qcow2_get_refcount`` over whole arrays of clusters;
:func:`_compare` and :func:`_report_mismatches` are ``compare_refcounts`` (the verdicts, and
which refcounts a repair raises or lowers); :func:`_write_refcounts` stores new values, one
read-modify-write per refcount block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.qcow2 import spec
from engine.qcow2.refblocks import decode_refblocks, encode_refblocks, reftable_offsets
from engine.check.result import _FIX_ERRORS, _FIX_LEAKS, _Pass
from engine.check.reader import _BATCH_BYTES, _Image

_U64 = np.uint64


class _StoredRefcounts:
    """The refcounts stored on disk, looked up through the reftable (qcow2_get_refcount)."""

    def __init__(self, img: _Image) -> None:
        self.img = img
        self.rt = img.u64_table(img.rt_off, img.rt_size)

    def get(self, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


@dataclass
class _Mismatches:
    idx: np.ndarray
    stored: np.ndarray
    computed: np.ndarray
    highest: int
    eio_clusters: int
    eio_blocks: list[int]
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


def _report_mismatches(p: _Pass, img: _Image, mis: _Mismatches, fix: int
                       ) -> tuple[bool, np.ndarray, np.ndarray]:
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
