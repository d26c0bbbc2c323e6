"""``convert -c``: a new qcow2 image whose data clusters are compressed, as QEMU writes them.

Layout (qcow2.txt, "Compressed Clusters Descriptor"): each guest cluster that holds a
non-zero byte is compressed (deflate with QEMU's parameters — raw stream, 4 KiB window,
memLevel 9, default level — or zstd, by the image's compression type) and the streams are
packed back to back at byte granularity after the image's initial metadata; a stream may
run into the next host cluster.  A cluster whose stream would not be smaller than the
cluster (QEMU's "could not compress" case) is stored as a normal, cluster-aligned cluster.
A host cluster takes no more compressed pieces than its refcount can count.  The
L2 tables come first, the L1 entries last (see :func:`write_compressed` for the refcounts);
the file is new, under a temporary name, until it is complete.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Callable

import numpy as np

from engine.img._meta import MetaWriter
from engine.ops._copy import CHUNK, Meter, Progress
from engine.qcow2.header import Header
from engine.qcow2.refblocks import decode_refblocks, encode_refblocks, reftable_offsets
from engine.qcow2.spec import (COMPRESSED_SECTOR_SIZE, COMPRESSION_ZSTD, L1E_SIZE,
                               QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED,
                               SUBCLUSTERS_PER_CLUSTER)

if TYPE_CHECKING:
    from engine.image import Image

#: deflate parameters QEMU's qcow2_compress uses: raw stream (no zlib header), 4 KiB window.
DEFLATE_WBITS = -12
DEFLATE_MEMLEVEL = 9


def compressor(h: Header) -> Callable[[bytes], bytes]:
    """The function that compresses one cluster for an image with header H."""
    if h.compression_type == COMPRESSION_ZSTD:
        import zstandard

        zc = zstandard.ZstdCompressor()
        return zc.compress

    def deflate(data: bytes) -> bytes:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, DEFLATE_WBITS,
                             DEFLATE_MEMLEVEL)
        return c.compress(data) + c.flush()
    return deflate


def write_compressed(src: Image, out: Image, progress: Progress | None = None) -> int:
    """Fill OUT, a new empty qcow2 image of SRC's size opened read-write, with SRC's disk
    in compressed clusters.  Returns the bytes of compressed (or normal) data written.

    As QEMU lays it out: the L2 tables first, then the data; the file ends at the sector
    that holds the last compressed byte.  Where the image's first refcount block covers the
    whole new file (2 GiB at 64 KiB clusters and 16-bit refcounts), the refcounts of the new
    clusters are written into it too (one per L2 table or normal cluster, one per
    compressed piece in a host cluster); the repair pass that ends the change then finds
    nothing to do.  Otherwise it computes them (and lays out new refcount structures).
    """
    h = out.header
    assert h is not None
    cs = h.cluster_size
    compress = compressor(h)
    ext = h.extended_l2
    per_l2 = h.l2_entries
    shift = h.compressed_size_shift
    clusters = _data_clusters(src, cs)
    refs: dict[int, int] = {}           # host cluster index -> references added
    meter = Meter(len(clusters) * cs, progress)
    written = 0
    with MetaWriter(out) as w:
        l2_off = {i: w.alloc(cs) for i in sorted({c // per_l2 for c in clusters})}
        l2 = {i: np.zeros(per_l2 * (2 if ext else 1), dtype=">u8") for i in l2_off}
        for off in l2_off.values():
            refs[off // cs] = 1
        pos = w.end
        for first, count in _spans(clusters, max(1, CHUNK // cs)):
            buf = src.read(first * cs, min(count * cs, src.size - first * cs))
            buf += bytes(count * cs - len(buf))
            for k in range(count):
                data = buf[k * cs:(k + 1) * cs]
                meter.add(cs)
                if not any(data):
                    continue
                stream = compress(data)
                if len(stream) >= cs:
                    pos = -(-pos // cs) * cs
                    w.pwrite(pos, data)
                    refs[pos // cs] = 1
                    entry, bitmap = pos | QCOW_OFLAG_COPIED, (1 << SUBCLUSTERS_PER_CLUSTER) - 1
                    pos += cs
                    written += cs
                else:
                    hosts = range(pos // cs, (pos + len(stream) - 1) // cs + 1)
                    if any(refs.get(c, 0) >= h.refcount_max for c in hosts):
                        pos = -(-pos // cs) * cs
                        hosts = range(pos // cs, (pos + len(stream) - 1) // cs + 1)
                    for c in hosts:
                        refs[c] = refs.get(c, 0) + 1
                    w.pwrite(pos, stream)
                    sectors = ((pos + len(stream) - 1) // COMPRESSED_SECTOR_SIZE
                               - pos // COMPRESSED_SECTOR_SIZE)
                    entry, bitmap = QCOW_OFLAG_COMPRESSED | (sectors << shift) | pos, 0
                    pos += len(stream)
                    written += len(stream)
                index = first + k
                table, slot = l2[index // per_l2], index % per_l2
                if ext:
                    table[2 * slot], table[2 * slot + 1] = entry, bitmap
                else:
                    table[slot] = entry
        # QEMU reads whole sectors of a compressed stream: the file ends on a sector
        w.reserve_to(-(-pos // COMPRESSED_SECTOR_SIZE) * COMPRESSED_SECTOR_SIZE)
        l1 = np.frombuffer(w.pread(h.l1_table_offset, h.l1_size * L1E_SIZE), dtype=">u8").copy()
        for i, off in l2_off.items():
            w.pwrite(off, l2[i].tobytes())
            l1[i] = off | QCOW_OFLAG_COPIED
        w.pwrite(h.l1_table_offset, l1.tobytes())
        _add_refcounts(w, h, refs)
    meter.finish()
    return written


def _add_refcounts(w: MetaWriter, h: Header, refs: dict[int, int]) -> None:
    """Add REFS to the first refcount block, when it covers every cluster in REFS (else
    leave them to the repair pass)."""
    if not refs or max(refs) >= h.refblock_entries:
        return
    rt0 = int(np.frombuffer(w.pread(h.refcount_table_offset, 8), dtype=">u8")[0])
    block_off = int(reftable_offsets(np.array([rt0], dtype=np.uint64), h.cluster_size)[0][0])
    if block_off == 0:
        return
    raw = np.frombuffer(w.pread(block_off, h.cluster_size), dtype=np.uint8).reshape(1, -1)
    vals = decode_refblocks(raw, h.refcount_order).copy()
    for c, n in refs.items():
        vals[0, c] += n
    w.pwrite(block_off, encode_refblocks(vals, h.refcount_order))


def _data_clusters(src: Image, cs: int) -> list[int]:
    """Indexes of the clusters (of size CS) that SRC's chain maps as data."""
    out: list[int] = []
    for e in src.extents():
        if not e.data or e.zero:
            continue
        first = max(e.start // cs, out[-1] + 1 if out else 0)
        out.extend(range(first, -(-(e.start + e.length) // cs)))
    return out


def _spans(indexes: list[int], most: int) -> list[tuple[int, int]]:
    """Consecutive runs of INDEXES as (first, count), each at most MOST long."""
    spans: list[tuple[int, int]] = []
    for i in indexes:
        if spans and spans[-1][0] + spans[-1][1] == i and spans[-1][1] < most:
            spans[-1] = (spans[-1][0], spans[-1][1] + 1)
        else:
            spans.append((i, 1))
    return spans
