# Included by engine/_core.pyx (one compiled module); see the list of rooms there.

# --- extended L2: writes, zeroing and discard by subcluster ------------------------------------
#
# qcow2.txt, "Extended L2 Entries": an L2 entry is 128 bits, the usual descriptor followed by
# a bitmap. Bit i (0..31) says subcluster i is allocated (its bytes are in the host cluster),
# bit 32+i that it reads as zeros; with neither it reads from the backing file (zeros without
# one). A compressed entry has no bitmap; an entry without a host cluster has no allocation
# bits. The rules kept here, as QEMU keeps them (block/qcow2-cluster.c):
#
# - A write into a cluster the image owns (COPIED: refcount 1) goes in place; into any other
#   (none, compressed, shared with an internal snapshot) a new cluster is allocated, entry
#   ``offset | COPIED``. Only the subclusters the write touches change: they become allocated
#   and lose their zero bit. The part of a partly written subcluster that the write does not
#   cover is filled with what the image read there before (the backing file's bytes, or
#   zeros), unless that subcluster was allocated already. So a whole-subcluster write copies
#   nothing, and a 4 KiB write into a fresh overlay allocates a cluster and copies nothing:
#   the other subclusters still read from the backing file.
# - A new cluster that replaces a compressed one takes its whole content (all 32 subclusters
#   allocated); one that replaces a shared cluster takes the span from its first to its last
#   allocated subcluster (with the written ones), read through the image.
# - Zeroing whole subclusters sets their zero bits and clears their allocation bits; a whole
#   cluster zeroed gets all 32 zero bits and keeps its host cluster only with ZERO_KEEP on a
#   cluster it owns. Discarding clears both bits, so the backing file shows through. A host
#   cluster left without an allocated subcluster is freed (not by ZERO_KEEP); the zero bits
#   of the other subclusters stay. Part of a compressed cluster is zeroed by writing zero
#   bytes (a new cluster), and never discarded (a discard is advisory).

cdef extern from *:
    """
    static inline int cc_ctz64(uint64_t v) { return __builtin_ctzll(v); }
    static inline int cc_msb64(uint64_t v) { return 63 - __builtin_clzll(v); }
    """
    int ctz64 "cc_ctz64"(uint64_t v) noexcept nogil
    int msb64 "cc_msb64"(uint64_t v) noexcept nogil


cdef inline uint64_t sc_mask(uint64_t first, uint64_t stop) noexcept nogil:
    """Allocation bits of subclusters first .. stop-1 (shift left by 32 for the zero bits)."""
    return ((<uint64_t>1) << stop) - ((<uint64_t>1) << first)


cdef int ext_fill(Layer *L, uint64_t cbase, uint64_t host, uint64_t a, uint64_t in_off,
                  const uint8_t *src, uint64_t chunk, uint64_t b, int fresh) noexcept nogil:
    """Store bytes [a, b) of guest cluster cbase at host + a: chunk bytes of src (NULL: zeros)
    at in_off, and around them ([a, in_off) and [in_off + chunk, b)) what the image reads
    there now (read before any entry changes). fresh: host is a cluster just allocated."""
    cdef uint64_t head = in_off - a
    cdef uint64_t tail = b - in_off - chunk
    cdef iovec iov[3]
    cdef int rc, cnt = 0
    if head:
        rc = layer_read(L, cbase + a, L.scratch, head)
        if rc < 0:
            return rc
        iov[cnt].iov_base = L.scratch
        iov[cnt].iov_len = head
        cnt += 1
    iov[cnt].iov_base = <void *>src
    iov[cnt].iov_len = chunk
    cnt += 1
    if tail:
        rc = layer_read(L, cbase + in_off + chunk, L.scratch + head, tail)
        if rc < 0:
            return rc
        iov[cnt].iov_base = L.scratch + head
        iov[cnt].iov_len = tail
        cnt += 1
    if head or tail:
        rc = hook(L, COW_READ)
        if rc < 0:
            return rc
    return store_pieces(L, host + a, iov, cnt, b - a, fresh)


cdef int layer_write_ext(Layer *L, uint64_t vaddr, const uint8_t *src, uint64_t n) noexcept nogil:
    """layer_write for extended L2 entries: n bytes (src NULL: zeros) at vaddr, subcluster by
    subcluster (the rules above)."""
    cdef uint64_t C = L.cluster_size
    cdef int sbits = L.cluster_bits - 5
    cdef uint64_t l2n = 1 << L.l2_bits
    cdef uint64_t ci, l1i, in_off, cbase, chunk, e, bm, nbm, off, newoff, a, b, alloc, r
    cdef uint64_t sc0, sc1
    cdef uint8_t *p
    cdef int rc
    while n > 0:
        ci = vaddr >> L.cluster_bits
        l1i = ci >> L.l2_bits
        in_off = vaddr & (C - 1)
        cbase = vaddr - in_off
        chunk = C - in_off
        if chunk > n:
            chunk = n
        if l1i >= L.l1_size:
            return fail(L, E_CORRUPT, "L1 table too small for the virtual size", vaddr)
        rc = l2_for_write(L, l1i, &p)
        if rc < 0:
            return rc
        p += (ci & (l2n - 1)) * 16
        e = load_be64(p)
        bm = load_be64(p + 8)
        rc = check_ext_entry(L, e, bm, vaddr)
        if rc < 0:
            return rc
        off = e & L2E_OFFSET_MASK
        sc0 = in_off >> sbits
        sc1 = (in_off + chunk - 1) >> sbits         # the last subcluster written
        a = sc0 << sbits
        b = (sc1 + 1) << sbits
        if (e & QCOW_OFLAG_COPIED) and not (e & QCOW_OFLAG_COMPRESSED) and off != 0:
            if off + C > L.file_size:
                # QEMU writes only the subclusters it allocates: its file may end inside this
                # cluster (check_ext_entry saw it start inside the file). Cover the rest.
                rc = ensure_size(L, off + C)
                if rc < 0:
                    return rc
            if (bm >> sc0) & 1:         # allocated subclusters hold their own bytes
                a = in_off
            if (bm >> sc1) & 1:
                b = in_off + chunk
            rc = ext_fill(L, cbase, off, a, in_off, src, chunk, b, 0)
            if rc < 0:
                return rc
            r = sc_mask(sc0, sc1 + 1)
            nbm = (bm | r) & ~(r << 32)
            if nbm != bm:
                store_be64(p + 8, nbm)
        else:
            if e & QCOW_OFLAG_COMPRESSED:
                a = 0
                b = C
            elif off != 0:
                alloc = bm & LOW32
                if alloc:
                    if <uint64_t>ctz64(alloc) < sc0:
                        a = <uint64_t>ctz64(alloc) << sbits
                    if <uint64_t>msb64(alloc) > sc1:
                        b = (<uint64_t>msb64(alloc) + 1) << sbits
            rc = alloc_cluster(L, &newoff)
            if rc < 0:
                return rc
            rc = ext_fill(L, cbase, newoff, a, in_off, src, chunk, b, 1)
            if rc == 0:
                rc = hook(L, COW_WRITE)
            if rc < 0:
                set_refcount(L, newoff >> L.cluster_bits, 0)
                return rc
            if e & QCOW_OFLAG_COMPRESSED:
                rc = pend_free_compressed(L, e)
            elif off != 0:
                rc = pend_free(L, off >> L.cluster_bits)
            if rc < 0:
                return rc
            r = sc_mask(a >> sbits, b >> sbits)
            store_be64(p, newoff | QCOW_OFLAG_COPIED)
            store_be64(p + 8, (bm | r) & ~(r << 32))
            if L.zbuf_key == e:
                L.zbuf_key = 0
        L.data_dirty = 1
        vaddr += chunk
        if src != NULL:
            src += chunk
        n -= chunk
        rc = maybe_writeback(L)
        if rc < 0:
            return rc
    return 0


cdef int layer_zero_ext(Layer *L, uint64_t vaddr, uint64_t n, int mode) noexcept nogil:
    """layer_zero for extended L2 entries: discard or zero whole subclusters [vaddr, vaddr+n)
    (both subcluster-aligned, or n reaching the end of the disk) by rewriting L2 entries."""
    cdef uint64_t C = L.cluster_size
    cdef int sbits = L.cluster_bits - 5
    cdef uint64_t l2n = 1 << L.l2_bits
    cdef uint64_t ci, l1i, in_off, cbase, stop, e, bm, ne, nbm, off, r, end = vaddr + n
    cdef uint64_t sc0, sc1
    cdef uint8_t *p
    cdef int rc
    while vaddr < end:
        ci = vaddr >> L.cluster_bits
        l1i = ci >> L.l2_bits
        in_off = vaddr & (C - 1)
        cbase = vaddr - in_off
        stop = end - cbase if end - cbase < C else C
        sc0 = in_off >> sbits
        sc1 = (stop + (C >> 5) - 1) >> sbits        # a partial one at the disk end counts whole
        if mode == Z_DISCARD and L.l2_cache[l1i] == NULL and (L.l1[l1i] & L1E_OFFSET_MASK) == 0:
            vaddr = (l1i + 1) << (L.l2_bits + L.cluster_bits)     # nothing mapped in this table
            continue
        rc = l2_for_write(L, l1i, &p)
        if rc < 0:
            return rc
        p += (ci & (l2n - 1)) * 16
        e = load_be64(p)
        bm = load_be64(p + 8)
        rc = check_ext_entry(L, e, bm, vaddr)
        if rc < 0:
            return rc
        off = e & L2E_OFFSET_MASK
        r = sc_mask(sc0, sc1)
        if r == LOW32:
            ne = 0
            nbm = 0 if mode == Z_DISCARD else LOW32 << 32
            if (mode == Z_ZERO_KEEP and (e & QCOW_OFLAG_COPIED) and off != 0 and
                    not (e & QCOW_OFLAG_COMPRESSED)):
                ne = e
        elif e & QCOW_OFLAG_COMPRESSED:
            if mode != Z_DISCARD:
                rc = layer_write_ext(L, vaddr, NULL, stop - in_off)
                if rc < 0:
                    return rc
            vaddr = cbase + C
            continue
        else:
            ne = e
            nbm = bm & ~r
            if mode == Z_DISCARD:
                nbm &= ~(r << 32)
            else:
                nbm |= r << 32
            if off != 0 and (nbm & LOW32) == 0 and mode != Z_ZERO_KEEP:
                ne = 0
        if ne != e or nbm != bm:
            rc = 0
            if ne != e:
                if e & QCOW_OFLAG_COMPRESSED:
                    rc = pend_free_compressed(L, e)
                    if L.zbuf_key == e:
                        L.zbuf_key = 0
                elif off != 0:
                    rc = pend_free(L, off >> L.cluster_bits)
                if rc < 0:
                    return rc
            store_be64(p, ne)
            store_be64(p + 8, nbm)
            L.data_dirty = 1
        vaddr = cbase + (sc1 << sbits)
        rc = maybe_writeback(L)
        if rc < 0:
            return rc
    return 0
