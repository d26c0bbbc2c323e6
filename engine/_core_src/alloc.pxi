# Included by engine/_core.pyx (one compiled module); see the list of rooms there.

# --- file growth and mapping ----------------------------------------------------------------

cdef int ensure_size(Layer *L, uint64_t end) noexcept nogil:
    """Make the file (and the mapping) cover [0, end): fallocate in large steps."""
    cdef uint64_t step, new_size, new_len
    cdef void *p
    if end <= L.file_size:
        return 0
    step = L.file_size // 8
    if step < GROW_MIN:
        step = GROW_MIN
    if step > GROW_MAX:
        step = GROW_MAX
    new_size = end
    if new_size < L.file_size + step:
        new_size = L.file_size + step
    new_size = (new_size + L.cluster_size - 1) & ~(L.cluster_size - 1)
    if new_size > L.map_len:
        new_len = L.map_len * 2
        if new_len < new_size:
            new_len = new_size
        new_len += (1 << 30)
        p = io_mremap(L.base, L.map_len, new_len, MREMAP_MAYMOVE)
        if p == MAP_FAILED:
            return fail_io(L, "cannot extend the mapping", end)
        L.base = <uint8_t *>p
        L.map_len = new_len
    if io_fallocate(L.fd, 0, <off_t>L.file_size, <off_t>(new_size - L.file_size)) != 0:
        if errno == EOPNOTSUPP:
            # Filesystems without fallocate: extend with ftruncate; stores may still fault
            # with SIGBUS on ENOSPC there, which nothing short of pwrite can prevent.
            if io_ftruncate(L.fd, <off_t>new_size) != 0:
                return fail_io(L, "cannot grow the image file", end)
        else:
            # Try the exact size before giving up: the step is only an optimisation.
            if new_size > end and io_fallocate(L.fd, 0, <off_t>L.file_size,
                                             <off_t>(end - L.file_size)) == 0:
                new_size = end
            else:
                return fail_io(L, "cannot grow the image file", end)
    L.file_size = new_size
    return 0


cdef inline int ensure_backed(Layer *L, uint64_t host) noexcept nogil:
    """Before the first store into a cluster that existed at open, make sure it is not a
    hole: a store into a hole on a full disk would raise SIGBUS instead of ENOSPC."""
    cdef uint64_t idx = host >> L.cluster_bits
    if idx >= L.safe_clusters:
        return 0
    if L.backed[idx >> 3] & (1 << (idx & 7)):
        return 0
    if io_fallocate(L.fd, FALLOC_FL_KEEP_SIZE, <off_t>(idx << L.cluster_bits),
                 <off_t>L.cluster_size) != 0:
        if errno != EOPNOTSUPP:
            return fail_io(L, "cannot allocate disk space for a cluster", host)
    L.backed[idx >> 3] |= <uint8_t>(1 << (idx & 7))
    return 0


cdef inline int in_meta_set(Layer *L, uint64_t idx) noexcept nogil:
    cdef uint64_t lo = 0, hi = L.n_meta, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if L.meta_idx[mid] < idx:
            lo = mid + 1
        else:
            hi = mid
    return lo < L.n_meta and L.meta_idx[lo] == idx


cdef inline int overlaps_fixed_meta(Layer *L, uint64_t host, uint64_t length) noexcept nogil:
    """Does [host, host+length) touch the header, L1, reftable or snapshot table?"""
    cdef int i
    for i in range(4):
        if L.meta_hi[i] > L.meta_lo[i] and host < L.meta_hi[i] and host + length > L.meta_lo[i]:
            return 1
    return 0


cdef inline int overlaps_meta(Layer *L, uint64_t host, uint64_t length) noexcept nogil:
    """Also a refblock or L2 table that existed at open (QEMU's metadata overlap check):
    for data stores and the allocator. host..host+length lies in one cluster."""
    if overlaps_fixed_meta(L, host, length):
        return 1
    return L.n_meta != 0 and in_meta_set(L, host >> L.cluster_bits)


# --- refcounts --------------------------------------------------------------------------------

cdef inline uint8_t *refblock_ptr(Layer *L, uint64_t rti, int *rc) noexcept nogil:
    """Pointer to refblock rti in the mapping, or NULL if it does not exist; rc<0 on corruption."""
    cdef uint64_t rte, rb
    rc[0] = 0
    if rti >= L.rt_entries:
        return NULL
    rte = load_be64(L.base + L.rt_offset + rti * 8)
    if rte & RT_RESERVED:
        rc[0] = fail(L, E_CORRUPT, "reserved bits set in a refcount table entry", L.rt_offset + rti * 8)
        return NULL
    rb = rte & RT_OFFSET_MASK
    if rb == 0:
        return NULL
    if (rb & (L.cluster_size - 1)) or rb + L.cluster_size > L.file_size or rb >= MAX_CLUSTER_OFFSET:
        rc[0] = fail(L, E_CORRUPT, "refcount block offset unaligned or past the end of the file", rb)
        return NULL
    return L.base + rb


cdef inline uint64_t rb_get(Layer *L, uint8_t *rb, uint64_t i) noexcept nogil:
    cdef int order = L.refcount_order
    cdef uint64_t bits, shift
    if order == 4:
        return load_be16(rb + i * 2)
    if order == 3:
        return rb[i]
    if order == 5:
        return load_be32(rb + i * 4)
    if order == 6:
        return load_be64(rb + i * 8)
    bits = 1 << order
    shift = (i * bits) & 7
    return (rb[(i * bits) >> 3] >> shift) & ((1 << bits) - 1)


cdef inline void rb_set(Layer *L, uint8_t *rb, uint64_t i, uint64_t v) noexcept nogil:
    cdef int order = L.refcount_order
    cdef uint64_t bits, shift, mask
    if order == 4:
        store_be16(rb + i * 2, <uint16_t>v)
    elif order == 3:
        rb[i] = <uint8_t>v
    elif order == 5:
        store_be32(rb + i * 4, <uint32_t>v)
    elif order == 6:
        store_be64(rb + i * 8, v)
    else:
        bits = 1 << order
        shift = (i * bits) & 7
        mask = ((1 << bits) - 1) << shift
        rb[(i * bits) >> 3] = <uint8_t>((rb[(i * bits) >> 3] & ~mask) | ((v << shift) & mask))


cdef int get_refcount(Layer *L, uint64_t idx, uint64_t *out) noexcept nogil:
    cdef int rc
    cdef uint8_t *rb = refblock_ptr(L, idx >> L.rb_shift, &rc)
    if rc < 0:
        return rc
    if rb == NULL:
        out[0] = 0
        return 0
    out[0] = rb_get(L, rb, idx & ((1 << L.rb_shift) - 1))
    return 0


cdef int grow_reftable(Layer *L, uint64_t need_entries) noexcept nogil:
    """Move the refcount table to a new, larger, self-describing area past everything the
    old table covers (docs/on-disk.md §5.3): [new refblocks][new reftable], synced, then the header
    pointer is switched (synced), then the old table clusters are freed."""
    cdef uint64_t C = L.cluster_size
    cdef uint64_t rbe = 1 << L.rb_shift
    cdef uint64_t start, n_rb, n_rt, new_entries, end, i, j, k, first_rti, old_off, old_clusters
    cdef uint64_t covered = L.rt_entries * rbe
    cdef uint8_t *rb
    cdef uint8_t *hdr
    cdef int rc
    start = L.alloc_end >> L.cluster_bits
    if start < covered:
        start = covered
    new_entries = need_entries
    if new_entries < L.rt_entries:
        new_entries = L.rt_entries
    new_entries = new_entries + new_entries // 2 + 1
    n_rb = 1
    while True:
        n_rt = (new_entries * 8 + C - 1) // C
        end = start + n_rb + n_rt
        k = (end - 1) // rbe - start // rbe + 1
        if (end - 1) // rbe + 1 > new_entries:
            new_entries = (end - 1) // rbe + 1
            new_entries += new_entries // 2
            continue
        if k == n_rb:
            break
        n_rb = k
    if n_rt * C > (8 << 20):
        return fail(L, E_LIMIT, "the refcount table would exceed QEMU's 8 MiB limit", n_rt * C)
    rc = ensure_size(L, end * C)
    if rc < 0:
        return rc
    # new refblocks at start .. start+n_rb-1, reftable at start+n_rb ..
    memset(L.base + start * C, 0, (n_rb + n_rt) * C)
    first_rti = start // rbe
    for i in range(start, end):
        rb = L.base + (start + (i // rbe - first_rti)) * C
        rb_set(L, rb, i & (rbe - 1), 1)
    memcpy(L.base + (start + n_rb) * C, L.base + L.rt_offset, L.rt_entries * 8)
    for j in range(n_rb):
        store_be64(L.base + (start + n_rb) * C + (first_rti + j) * 8, (start + j) * C)
    if end * C > L.alloc_end:
        L.alloc_end = end * C
    if io_sync(L) != 0:
        return fail_io(L, "sync failed while growing the refcount table", 0)
    rc = hook(L, REFTABLE_WRITTEN)
    if rc < 0:
        return rc
    old_off = L.rt_offset
    old_clusters = (L.rt_entries * 8 + C - 1) // C
    hdr = L.base
    store_be64(hdr + 48, (start + n_rb) * C)
    store_be32(hdr + 56, <uint32_t>n_rt)
    if io_sync(L) != 0:
        return fail_io(L, "sync failed while switching the refcount table", 0)
    L.rt_offset = (start + n_rb) * C
    L.rt_entries = n_rt * C // 8
    L.meta_lo[2] = L.rt_offset
    L.meta_hi[2] = L.rt_offset + n_rt * C
    for i in range(old_clusters):
        rc = pend_free(L, (old_off >> L.cluster_bits) + i)
        if rc < 0:
            return rc
    return hook(L, REFTABLE_SWITCHED)


cdef int find_free(Layer *L, uint64_t *out) noexcept nogil:
    """Lowest cluster index >= free_hint with refcount 0 that is not fixed metadata."""
    cdef uint64_t idx = L.free_hint
    cdef uint64_t v, rti, rbe = 1 << L.rb_shift
    cdef uint8_t *rb
    cdef int rc
    if idx == 0:
        idx = 1
    while True:
        rti = idx >> L.rb_shift
        rb = refblock_ptr(L, rti, &rc)
        if rc < 0:
            return rc
        if rb == NULL:
            if not overlaps_meta(L, idx << L.cluster_bits, L.cluster_size):
                out[0] = idx
                return 0
            idx += 1
            continue
        v = rb_get(L, rb, idx & (rbe - 1))
        if v == 0 and not overlaps_meta(L, idx << L.cluster_bits, L.cluster_size):
            out[0] = idx
            return 0
        idx += 1
        if idx >= MAX_CLUSTER_OFFSET >> L.cluster_bits:
            return fail(L, E_LIMIT, "no free cluster below the 2^56 host offset limit", 0)


cdef int ensure_refblock(Layer *L, uint64_t rti, int *created) noexcept nogil:
    """Make refblock rti exist. A new refblock is zeroed, counts itself when it lies in its own
    range, and is synced before the reftable entry that points to it."""
    cdef int rc
    cdef uint64_t j, C = L.cluster_size
    cdef uint8_t *rb
    created[0] = 0
    if rti >= L.rt_entries:
        rc = grow_reftable(L, rti + 1)
        if rc < 0:
            return rc
        created[0] = 1
    rb = refblock_ptr(L, rti, &rc)
    if rc < 0:
        return rc
    if rb != NULL:
        return 0
    created[0] = 1
    rc = find_free(L, &j)
    if rc < 0:
        return rc
    rc = ensure_size(L, (j + 1) * C)
    if rc < 0:
        return rc
    rc = ensure_backed(L, j * C)
    if rc < 0:
        return rc
    memset(L.base + j * C, 0, C)
    if (j + 1) * C > L.alloc_end:
        L.alloc_end = (j + 1) * C
    if L.free_hint <= j:
        L.free_hint = j + 1      # j's refcount is 0 until counted below: never hand it out
    if (j >> L.rb_shift) == rti:
        rb_set(L, L.base + j * C, j & ((1 << L.rb_shift) - 1), 1)
    else:
        # The block lives in another block's range: count it there first (may recurse), so
        # that its refcount is durable no later than the reftable entry naming it.
        rc = set_refcount(L, j, 1)
        if rc < 0:
            return rc
    if io_sync(L) != 0:
        return fail_io(L, "sync failed while adding a refcount block", j * C)
    rc = hook(L, REFBLOCK_ALLOC)
    if rc < 0:
        if (j >> L.rb_shift) != rti:
            set_refcount(L, j, 0)
        return rc
    store_be64(L.base + L.rt_offset + rti * 8, j * C)
    return 0


cdef int set_refcount(Layer *L, uint64_t idx, uint64_t value) noexcept nogil:
    cdef int rc, created
    cdef uint8_t *rb
    if value > L.rc_max:
        return fail(L, E_LIMIT, "refcount would overflow the image's refcount width", idx << L.cluster_bits)
    rc = ensure_refblock(L, idx >> L.rb_shift, &created)
    if rc < 0:
        return rc
    rb = refblock_ptr(L, idx >> L.rb_shift, &rc)
    if rc < 0:
        return rc
    rc = ensure_backed(L, <uint64_t>(rb - L.base))
    if rc < 0:
        return rc
    rb_set(L, rb, idx & ((1 << L.rb_shift) - 1), value)
    return 0


cdef int alloc_cluster(Layer *L, uint64_t *host) noexcept nogil:
    """Allocate one cluster (refcount 1) and return its host offset; the file covers it."""
    cdef uint64_t idx, v
    cdef int rc, created
    while True:
        rc = find_free(L, &idx)
        if rc < 0:
            return rc
        rc = ensure_refblock(L, idx >> L.rb_shift, &created)
        if rc < 0:
            return rc
        if created:
            continue     # the new refblock may have taken idx: look again
        break
    rc = ensure_size(L, (idx + 1) << L.cluster_bits)
    if rc < 0:
        return rc
    rc = ensure_backed(L, idx << L.cluster_bits)
    if rc < 0:
        return rc
    rc = set_refcount(L, idx, 1)
    if rc < 0:
        return rc
    L.free_hint = idx + 1
    rc = hook(L, CLUSTER_ALLOC)
    if rc < 0:
        set_refcount(L, idx, 0)
        return rc
    if (idx + 1) << L.cluster_bits > L.alloc_end:
        L.alloc_end = (idx + 1) << L.cluster_bits
    host[0] = idx << L.cluster_bits
    return 0


cdef int pend_free(Layer *L, uint64_t idx) noexcept nogil:
    cdef uint64_t *p
    cdef uint64_t cap
    if L.n_pend == L.cap_pend:
        cap = L.cap_pend * 2 if L.cap_pend else 256
        p = <uint64_t *>realloc(L.pend_free, cap * 8)
        if p == NULL:
            return fail(L, E_NOMEM, "out of memory", 0)
        L.pend_free = p
        L.cap_pend = cap
    L.pend_free[L.n_pend] = idx
    L.n_pend += 1
    return 0


cdef int pend_free_compressed(Layer *L, uint64_t entry) noexcept nogil:
    cdef uint64_t host, nb, first, last, i
    cdef int rc
    compressed_extent(L, entry, &host, &nb)
    first = host >> L.cluster_bits
    last = (host + nb - 1) >> L.cluster_bits
    for i in range(first, last + 1):
        rc = pend_free(L, i)
        if rc < 0:
            return rc
    return 0
