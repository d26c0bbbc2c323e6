"""The COPIED flags: QEMU's ``check_oflag_copied`` and its repair.

In the active tree, an L1 or standard L2 entry carries COPIED exactly where the stored
refcount of what it points to is 1 (qcow2.txt "Cluster mapping").
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from engine.qcow2 import spec
from engine.check.result import _FIX_ERRORS, _FIX_LEAKS, _Pass
from engine.check.reader import _BATCH_BYTES, _Image, _L2Rows, _Metadata
from engine.check.stored import _StoredRefcounts

_U64 = np.uint64


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
            be = _with_copied(l1[bi], rc[bad] == 1).astype(">u8")
            for k, i in enumerate(bi.tolist()):    # one 8-byte write per fixed L1 entry
                img.pwrite(img.l1_off + spec.L1E_SIZE * i, be[k:k + 1].tobytes())
            img.sync()
            p.corruptions -= len(bi)
            p.corruptions_fixed += len(bi)
    # The L2 tables of the active tree, each once per L1 entry that points to it.
    uoffs, mult = np.unique(l2[use], return_counts=True)
    meta = _Metadata(img, img.snapshots) if repair else None
    C = img.C
    per = max(1, _BATCH_BYTES // C)
    for s in range(0, len(uoffs), per):
        offs = uoffs[s:s + per]
        m = mult[s:s + per]
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
            col = rows.entry_cols(bc)
            words[br, col] = _with_copied(words[br, col], brc == 1)
            for i in np.unique(br).tolist():       # one write per fixed L2 table
                l2_off = int(offs[i])
                if meta is not None and meta.overlaps(l2_off, C):
                    n = int((br == i).sum())
                    p.corruptions_fixed -= n
                    p.corruptions += n
                    p.check_errors += 1
                    p.findings.add("fatal", "ERROR: Could not write L2 table; metadata "
                                   "overlap check failed")
                    img.sync()
                    return False
                img.pwrite(l2_off, _L2Rows.encode(words[i]))
            img.sync()
    return True


def _with_copied(entries: npt.NDArray[np.uint64], on: npt.NDArray[np.bool_]
                 ) -> npt.NDArray[np.uint64]:
    """L1 or standard L2 entries with COPIED set where ``on`` and cleared elsewhere."""
    return np.where(on, entries | _U64(spec.QCOW_OFLAG_COPIED),
                    entries & _U64(spec.MAX_U64 ^ spec.QCOW_OFLAG_COPIED))
