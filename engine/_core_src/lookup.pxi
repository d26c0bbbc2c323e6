# Included by engine/_core.pyx (one compiled module); see the list of rooms there.

# --- lookup -----------------------------------------------------------------------------------

cdef inline void compressed_extent(Layer *L, uint64_t e, uint64_t *host, uint64_t *nbytes) noexcept nogil:
    cdef int x = 70 - L.cluster_bits
    cdef uint64_t off = e & ((<uint64_t>1 << x) - 1)
    cdef uint64_t nsec = (e >> x) & ((<uint64_t>1 << (L.cluster_bits - 8)) - 1)
    host[0] = off
    nbytes[0] = (nsec + 1) * 512 - (off & 511)


cdef inline int l2_table(Layer *L, uint64_t l1i, uint8_t **out) noexcept nogil:
    """The L2 table for L1 index l1i (dirty copy first), or NULL when unallocated."""
    cdef uint64_t e, off
    if L.l2_cache != NULL and L.l2_cache[l1i] != NULL:
        out[0] = L.l2_cache[l1i]
        return 0
    e = L.l1[l1i]
    if e & L1E_RESERVED:
        return fail(L, E_CORRUPT, "reserved bits set in an L1 entry", L.l1_offset + l1i * 8)
    off = e & L1E_OFFSET_MASK
    if off == 0:
        out[0] = NULL
        return 0
    if (off & (L.cluster_size - 1)) or off + L.cluster_size > L.file_size:
        return fail(L, E_CORRUPT, "L2 table offset unaligned or past the end of the file", off)
    out[0] = L.base + off
    return 0


cdef int resolve(Layer *L, uint64_t vaddr, uint64_t maxlen, int *kind, uint64_t *host,
                 uint64_t *run, uint64_t *entry) noexcept nogil:
    """Classify the guest range starting at vaddr: kind, host offset of vaddr (data/zero-alloc)
    and the run length (<= maxlen) over which kind stays the same and host stays contiguous.
    Runs never cross an L2 table; compressed runs never cross a cluster."""
    cdef uint64_t C = L.cluster_size
    cdef uint64_t l2n = 1 << L.l2_bits
    cdef uint64_t ci = vaddr >> L.cluster_bits
    cdef uint64_t l1i = ci >> L.l2_bits
    cdef uint64_t l2i = ci & (l2n - 1)
    cdef uint64_t in_off = vaddr & (C - 1)
    cdef uint8_t *t
    cdef uint64_t e, e2, off, n, h0, h, bm, sc, scsize, k0, k
    cdef int rc, kd, first = 1
    if l1i >= L.l1_size:
        return fail(L, E_CORRUPT, "L1 table too small for the virtual size", vaddr)
    rc = l2_table(L, l1i, &t)
    if rc < 0:
        return rc
    if t == NULL:
        kind[0] = K_UNALLOC
        host[0] = 0
        entry[0] = 0
        n = (l2n - l2i) * C - in_off
        run[0] = n if n < maxlen else maxlen
        return 0
    if L.ext_l2:
        return resolve_ext(L, t, vaddr, maxlen, kind, host, run, entry)
    n = 0
    h0 = 0
    while l2i < l2n and n < maxlen:
        e = load_be64(t + l2i * 8)
        if e & QCOW_OFLAG_COMPRESSED:
            kd = K_COMPRESSED
            if (e & QCOW_OFLAG_COPIED):
                return fail(L, E_CORRUPT, "compressed L2 entry with the COPIED bit", vaddr)
        else:
            if e & L2E_RESERVED:
                return fail(L, E_CORRUPT, "reserved bits set in an L2 entry", ci << L.cluster_bits)
            off = e & L2E_OFFSET_MASK
            if e & QCOW_OFLAG_ZERO:
                if L.version < 3:
                    return fail(L, E_CORRUPT, "zero flag set in a version 2 image", ci << L.cluster_bits)
                kd = K_ZERO
            elif off == 0:
                kd = K_UNALLOC
            else:
                kd = K_DATA
                if (off & (C - 1)) or off >= L.file_size or off >= MAX_CLUSTER_OFFSET:
                    return fail(L, E_CORRUPT, "data cluster offset unaligned or past the end of the file", off)
        if first:
            kind[0] = kd
            entry[0] = e
            h0 = e & L2E_OFFSET_MASK
            host[0] = h0 + in_off if kd == K_DATA or (kd == K_ZERO and h0) else 0
            n = C - in_off
            first = 0
            if kd == K_COMPRESSED:
                break
        else:
            if kd != kind[0]:
                break
            if kd == K_DATA and (e & L2E_OFFSET_MASK) != h0 + (n + in_off):
                break
            if kd == K_ZERO and (((e & L2E_OFFSET_MASK) == 0) != (h0 == 0) or
                                 (h0 != 0 and (e & L2E_OFFSET_MASK) != h0 + (n + in_off))):
                break
            if kd == K_COMPRESSED:
                break
            n += C
        l2i += 1
        ci += 1
    run[0] = n if n < maxlen else maxlen
    return 0


cdef int check_ext_entry(Layer *L, uint64_t e, uint64_t bm, uint64_t vaddr) noexcept nogil:
    """The rules of an extended L2 entry (qcow2.txt, "Extended L2 Entries") for the cluster
    holding vaddr: the one check of readers and writers."""
    cdef uint64_t off = e & L2E_OFFSET_MASK
    cdef uint64_t cv = vaddr & ~(L.cluster_size - 1)
    if e & QCOW_OFLAG_COMPRESSED:
        if bm != 0:
            return fail(L, E_CORRUPT, "compressed extended L2 entry with a non-zero bitmap", vaddr)
        return 0
    if e & (L2E_RESERVED | QCOW_OFLAG_ZERO):
        return fail(L, E_CORRUPT, "reserved bits set in an extended L2 entry", cv)
    if off != 0 and ((off & (L.cluster_size - 1)) or off >= L.file_size):
        return fail(L, E_CORRUPT, "data cluster offset unaligned or past the end of the file", off)
    if (bm & LOW32) & (bm >> 32):
        return fail(L, E_CORRUPT, "subcluster both allocated and zero", cv)
    if off == 0 and (bm & LOW32):
        return fail(L, E_CORRUPT, "allocated subclusters without a host cluster", cv)
    return 0


cdef int resolve_ext(Layer *L, uint8_t *t, uint64_t vaddr, uint64_t maxlen, int *kind,
                     uint64_t *host, uint64_t *run, uint64_t *entry) noexcept nogil:
    """Extended L2 (subclusters): classify within one cluster, subcluster by subcluster."""
    cdef uint64_t C = L.cluster_size
    cdef uint64_t scsize = C >> 5
    cdef uint64_t ci = vaddr >> L.cluster_bits
    cdef uint64_t l2i = ci & ((1 << L.l2_bits) - 1)
    cdef uint64_t in_off = vaddr & (C - 1)
    cdef uint64_t e = load_be64(t + l2i * 16)
    cdef uint64_t bm = load_be64(t + l2i * 16 + 8)
    cdef uint64_t off = e & L2E_OFFSET_MASK
    cdef uint64_t sc, n
    cdef int kd, k0 = -1
    cdef int rc = check_ext_entry(L, e, bm, vaddr)
    entry[0] = e
    if rc < 0:
        return rc
    if e & QCOW_OFLAG_COMPRESSED:
        kind[0] = K_COMPRESSED
        host[0] = 0
        n = C - in_off
        run[0] = n if n < maxlen else maxlen
        return 0
    sc = in_off // scsize
    n = 0
    while sc < 32:
        if (bm >> sc) & 1:
            kd = K_DATA
        elif (bm >> (32 + sc)) & 1:
            kd = K_ZERO
        else:
            kd = K_UNALLOC
        if k0 < 0:
            k0 = kd
            n = (sc + 1) * scsize - in_off
        elif kd != k0:
            break
        else:
            n += scsize
        if n >= maxlen:
            break
        sc += 1
    kind[0] = k0
    host[0] = off + in_off if off != 0 else 0     # ZERO_ALLOC / UNALLOCATED_ALLOC keep it
    run[0] = n if n < maxlen else maxlen
    return 0
