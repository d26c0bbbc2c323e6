"""``snapshot -l|-c|-a|-d``: internal snapshots as QEMU keeps them.

- ``-c`` copies the active L1 table into new clusters and writes a whole new snapshot
  table (id: 1 + the largest numeric id; date from the wall clock with QEMU's microsecond
  resolution; VM state 0; VM clock 0; icount 0; the disk size), then switches the header to
  it.  ``-a`` writes the snapshot's L1 table over the active one (in place, grown first if
  the snapshot's disk was larger).  ``-d`` writes the table without the entry.
- Each is a :class:`~engine.img._meta.MetaWriter` change: the refcount increments and
  decrements and the COPIED flags QEMU maintains come from the repair pass that ends it,
  so the image afterwards is what ``qemu-img check`` calls clean, every cluster the
  snapshot shares has refcount 2 and no COPIED flag, and later writes copy them.
- A snapshot is found by id first, then by name, as QEMU finds it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from engine.errors import CorruptImage, InvalidArgument, NotFound, UnsupportedFeature, io_error
from engine.img._meta import MetaWriter
from engine.img._open import open_image, size_text
from engine.qcow2.header import Header
from engine.qcow2.snapshots import SnapshotEntry, encode_snapshot_table, parse_snapshot_table
from engine.qcow2.spec import L1E_SIZE, MAX_SNAPSHOTS, MAX_SNAPSHOTS_SIZE

if TYPE_CHECKING:
    from engine.image import Image


def snapshot_list(path: str, *, format: str | None = None,
                  force_share: bool = False) -> list[dict[str, Any]]:
    """The image's internal snapshots: qemu-img info's ``snapshots`` objects."""
    with open_image(path, format=format, force_share=force_share, backing=False) as img:
        snaps: list[dict[str, Any]] = img.snapshots()
        return snaps


def _entries(img: Image, h: Header) -> list[SnapshotEntry]:
    """IMG's snapshot table, parsed with the rules of QEMU's open."""
    if not h.nb_snapshots:
        return []
    try:
        with open(img.path, "rb") as f:
            f.seek(h.snapshots_offset)
            buf = f.read(MAX_SNAPSHOTS_SIZE)
    except OSError as e:
        raise io_error(e.errno or 0, "cannot read the snapshot table", path=img.path) from None
    return parse_snapshot_table(buf, h, path=img.path)


def _find(entries: list[SnapshotEntry], name: str, path: str) -> int:
    for key in ("id", "name"):
        for i, e in enumerate(entries):
            if getattr(e, key) == name:
                return i
    raise NotFound(f"Could not find snapshot '{name}'", path=path)


def _qcow2(img: Image, what: str) -> Header:
    h = img.header
    if h is None:
        raise UnsupportedFeature(f"snapshot {what} on raw images", "raw images have no "
                                 "internal snapshots", path=img.path, hint="")
    if h.refcount_bits < 2:
        raise UnsupportedFeature("internal snapshots with 1-bit refcounts", "a cluster shared "
                                 "by a snapshot needs a refcount of 2", path=img.path, hint="")
    return h


def _write_table(w: MetaWriter, h: Header, entries: list[SnapshotEntry]) -> None:
    """Write ENTRIES as a new table and switch the header to it (count and offset)."""
    table = encode_snapshot_table(entries, h) if entries else b""
    offset = w.alloc(len(table)) if table else 0
    if table:
        w.pwrite(offset, table)

    def switch(new: Header) -> None:
        new.nb_snapshots, new.snapshots_offset = len(entries), offset
    w.publish(switch)


def snapshot_create(path: str, name: str, *, format: str | None = None) -> dict[str, Any]:
    """``qemu-img snapshot -c NAME PATH``.  Returns the new SnapshotInfo object.

    Raises:
        UnsupportedFeature (raw image, 1-bit refcounts), SafetyLimitExceeded (65536
        snapshots), and what :func:`engine.open` raises.
    """
    with open_image(path, format=format, readonly=False, backing=False) as img:
        h = _qcow2(img, "-c")
        entries = _entries(img, h)
        if len(entries) >= MAX_SNAPSHOTS:
            raise InvalidArgument(f"the image has {len(entries)} snapshots, QEMU's limit",
                                  path=path)
        with MetaWriter(img) as w:
            ids = [int(e.id) for e in entries if e.id.isdigit()]
            now = time.time_ns() // 1000
            l1 = w.pread(h.l1_table_offset, h.l1_size * L1E_SIZE)
            l1_copy = w.alloc(len(l1))
            w.pwrite(l1_copy, l1)
            entry = SnapshotEntry(id=str(max(ids, default=0) + 1), name=name,
                                  l1_table_offset=l1_copy, l1_size=h.l1_size,
                                  date_sec=now // 10**6, date_nsec=now % 10**6 * 1000,
                                  vm_clock_nsec=0, vm_state_size=0, disk_size=h.size, icount=0)
            _write_table(w, h, entries + [entry])
        made: dict[str, Any] = [s for s in img.snapshots() if s["id"] == entry.id][0]
        return made


def snapshot_delete(path: str, name: str, *, format: str | None = None) -> None:
    """``qemu-img snapshot -d NAME PATH``: remove the snapshot (by id, then by name); the
    clusters only it used are freed."""
    with open_image(path, format=format, readonly=False, backing=False) as img:
        h = _qcow2(img, "-d")
        entries = _entries(img, h)
        del entries[_find(entries, name, path)]
        with MetaWriter(img) as w:
            _write_table(w, h, entries)


def snapshot_apply(path: str, name: str, *, format: str | None = None) -> None:
    """``qemu-img snapshot -a NAME PATH``: make the disk read what it read when the
    snapshot was taken (the active L1 becomes a copy of the snapshot's; the disk takes the
    snapshot's size).  A snapshot of a smaller disk is refused (UnsupportedFeature: the
    engine does not shrink)."""
    with open_image(path, format=format, readonly=False, backing=False) as img:
        h = _qcow2(img, "-a")
        entries = _entries(img, h)
        sn = entries[_find(entries, name, path)]
        disk = h.size if sn.disk_size is None else sn.disk_size
        if disk > h.size:
            img.resize(disk)
        elif disk < h.size:
            raise UnsupportedFeature("applying a snapshot of a smaller disk", path=path,
                                     hint="")
        h = _qcow2(img, "-a")
        if sn.l1_size > h.l1_size:
            raise CorruptImage(f"snapshot {sn.shown_id} has a larger L1 table than its disk "
                               "size needs", path=path)
        with MetaWriter(img) as w:
            table = w.pread(sn.l1_table_offset, sn.l1_size * L1E_SIZE)
            w.pwrite(h.l1_table_offset, table + bytes((h.l1_size - sn.l1_size) * L1E_SIZE))


def snapshot_text(snaps: list[dict[str, Any]]) -> str:
    """The table ``qemu-img snapshot -l`` and ``info`` print (dates in local time)."""
    lines = [f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        secs = s["vm-clock-sec"]
        clock = (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
                 f"{s['vm-clock-nsec'] // 1000000:03d}")
        icount = str(s["icount"]) if "icount" in s else ""
        lines.append(f"{s['id']:<9} {s['name']:<16} {size_text(s['vm-state-size']):>8}"
                     f"{date:>20}{clock:>13}{icount:>11}")
    return "\n".join(lines) + "\n"
