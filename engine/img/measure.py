"""``measure``: ``qemu-img measure [--size N | FILE] -O FMT [-o OPTIONS]`` figures."""

from __future__ import annotations

from typing import Any

from engine.errors import InvalidArgument
from engine.img._open import format_arg, open_image
from engine.img.bitmaps import bitmap_list
from engine.img.create import QCOW2_OPTIONS
from engine.qcow2.spec import BME_DIR_ENTRY_SIZE, L1E_SIZE, MAX_L1_SIZE

SECTOR = 512


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount blocks and table needed to count CLUSTERS clusters plus
    themselves: the fixed point QEMU's ``qcow2_refcount_metadata_size`` computes."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return (blocks + table) * cluster_size


def fully_allocated_size(size: int, cluster_size: int, refcount_order: int,
                         extended_l2: bool) -> int:
    """Bytes of a qcow2 image whose every cluster is allocated (``fully-allocated``): one
    header cluster, L2 tables for the whole disk, the L1 rounded to clusters, the refcount
    metadata, and the disk rounded to clusters (``qcow2_calc_prealloc_size``)."""
    l2e = 16 if extended_l2 else 8
    total = _round_up(size, cluster_size)
    meta = cluster_size
    nl2e = _round_up(total // cluster_size, cluster_size // l2e)
    meta += nl2e * l2e
    nl1e = _round_up(nl2e * l2e // cluster_size, cluster_size // L1E_SIZE)
    meta += nl1e * L1E_SIZE
    meta += refcount_metadata_size((meta + total) // cluster_size, cluster_size, refcount_order)
    return meta + total


def measure(*, size: int | None = None, filename: str | None = None,
            format: str | None = None, out_format: str = "raw",
            options: dict[str, Any] | None = None, force_share: bool = False,
            allow_unsafe_backing: bool = False) -> dict[str, int]:
    """``qemu-img measure --output=json``: the bytes a new image of OUT_FORMAT needs.

    Exactly one of SIZE (an empty disk) and FILENAME (an image, read with its chain) is
    given.  For qcow2, ``required`` counts the clusters the source holds data in (zero and
    unallocated ranges cost nothing), ``fully-allocated`` every cluster; ``bitmaps`` (the
    bytes of the source's persistent bitmaps, :func:`bitmaps_size`) appears when a qcow2 v3
    source is measured for a v3 target, as in qemu-img.  For raw, both are the disk size.

    Raises:
        InvalidArgument: neither or both of SIZE and FILENAME; an L1 table over QEMU's limit.
    """
    out = format_arg(out_format, "output format")
    if (size is None) == (filename is None):
        raise InvalidArgument("Either --size N or one filename must be specified.")
    bitmaps_source = False
    bitmaps: list[dict[str, Any]] = []
    if filename is not None:
        with open_image(filename, format=format, force_share=force_share,
                        allow_unsafe_backing=allow_unsafe_backing) as img:
            disk = img.size
            # qcow2 v3 can hold persistent bitmaps (v2 and raw cannot)
            bitmaps_source = img.header is not None and img.header.version >= 3
            if img.header is not None:
                bitmaps = bitmap_list(img.path, img.header)
            data = _data_clusters_bytes(img, int((options or {}).get("cluster_size", 65536)))
    else:
        disk = _round_up(int(size or 0), SECTOR)
        data = 0
    if out == "raw":
        disk = _round_up(disk, SECTOR)
        return {"required": disk, "fully-allocated": disk}
    opts = dict(QCOW2_OPTIONS)
    opts.update(options or {})
    cs = int(opts["cluster_size"])
    l2e = 16 if opts["extended_l2"] else 8
    if -(-(_round_up(disk, cs) // cs) // (cs // l2e)) * L1E_SIZE > MAX_L1_SIZE:
        raise InvalidArgument("The image size is too large (try using a larger cluster size)")
    full = fully_allocated_size(disk, cs, int(opts["refcount_bits"]).bit_length() - 1,
                                bool(opts["extended_l2"]))
    virtual = _round_up(disk, cs)
    required = virtual if opts.get("backing_file") or opts["preallocation"] in ("full", "falloc") \
        else data
    res = {"required": full - virtual + required, "fully-allocated": full}
    if bitmaps_source and opts["compat"] == "1.1":
        res["bitmaps"] = bitmaps_size(bitmaps, virtual, cs)
    return res


def bitmaps_size(bitmaps: list[dict[str, Any]], virtual: int, cluster_size: int) -> int:
    """Bytes the source's persistent bitmaps take in the new image, as qemu-img measure
    counts them: each bitmap whole (one bit per granule of the disk, in clusters) plus its
    table (8 bytes per data cluster, in clusters), plus the directory (24 bytes and the name
    per entry, 8-byte aligned), rounded to clusters."""
    total = directory = 0
    for b in bitmaps:
        granules = -(-_round_up(virtual, b["granularity"]) // b["granularity"])
        clusters = -(-(-(-granules // 8)) // cluster_size)
        total += clusters * cluster_size + _round_up(clusters * 8, cluster_size)
        directory += _round_up(BME_DIR_ENTRY_SIZE + len(b["name"].encode()), 8)
    return total + _round_up(directory, cluster_size)


def _data_clusters_bytes(img: Any, cluster_size: int) -> int:
    """Bytes of the target clusters that ranges reading data (not zeros) touch, counted as
    qemu-img's measure loop counts them (a data range is extended to its cluster's end)."""
    total = 0
    pos = 0
    for e in img.extents():
        end = e.start + e.length
        if end <= pos:
            continue
        start = max(pos, e.start)
        if e.zero or not (e.data and e.present):
            pos = end
            continue
        new_end = _round_up(end, cluster_size)
        total += start % cluster_size + (new_end - start)
        pos = new_end
    return total
