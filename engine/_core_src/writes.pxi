# Included by engine/_core.pyx (one compiled module); see the list of rooms there.

# --- writes -------------------------------------------------------------------------------------

cdef int l2_for_write(Layer *L, uint64_t l1i, uint8_t **out) noexcept nogil:
    """A private, writable copy of the L2 table for l1i, allocating or un-sharing it."""
    cdef uint64_t e, off, newoff
    cdef uint8_t *buf
    cdef int rc
    cdef uint64_t C = L.cluster_size
    if L.l2_cache[l1i] != NULL:
        out[0] = L.l2_cache[l1i]
        return 0
    rc = l2_table(L, l1i, out)
    if rc < 0:
        return rc
    buf = <uint8_t *>malloc(C)
    if buf == NULL:
        return fail(L, E_NOMEM, "out of memory", 0)
    e = L.l1[l1i]
    off = e & L1E_OFFSET_MASK
    if off == 0 or not (e & QCOW_OFLAG_COPIED):
        rc = alloc_cluster(L, &newoff)
        if rc == 0:
            rc = hook(L, L2_ALLOC)
            if rc < 0:
                set_refcount(L, newoff >> L.cluster_bits, 0)   # never linked: no leak
        if rc < 0:
            free(buf)
            return rc
        if off == 0:
            memset(buf, 0, C)
        else:
            memcpy(buf, L.base + off, C)    # shared with a snapshot: copy, drop our reference
            rc = pend_free(L, off >> L.cluster_bits)
            if rc < 0:
                free(buf)
                return rc
        L.l1[l1i] = newoff | QCOW_OFLAG_COPIED
        L.l1_dirty = 1
        L.new_tables = 1
    else:
        if overlaps_fixed_meta(L, off, C):
            free(buf)
            return fail(L, E_CORRUPT, "L2 table overlaps other metadata", off)
        memcpy(buf, L.base + off, C)
    L.l2_cache[l1i] = buf
    L.n_cached += 1
    out[0] = buf
    return 0


cdef int writeback(Layer *L) noexcept nogil:
    """Make every write so far durable in the order of the module docstring."""
    cdef uint64_t i, off, v, idx
    cdef int rc
    cdef int had_frees = 0
    if L.sticky_errno:
        L.err_errno = L.sticky_errno
        return fail(L, E_IO, "an earlier sync failed; reopen and check the image", 0)
    if not (L.data_dirty or L.n_cached or L.l1_dirty or L.n_pend):
        return 0
    if io_sync(L) != 0:
        return fail_io(L, "sync failed", 0)
    rc = hook(L, WB_DATA_SYNCED)
    if rc < 0:
        return rc
    if L.n_cached:
        for i in range(L.l1_size):
            if L.l2_cache[i] != NULL:
                off = L.l1[i] & L1E_OFFSET_MASK
                if overlaps_fixed_meta(L, off, L.cluster_size):
                    return fail(L, E_CORRUPT, "L2 table overlaps other metadata", off)
                rc = ensure_backed(L, off)
                if rc < 0:
                    return rc
                memcpy(L.base + off, L.l2_cache[i], L.cluster_size)
                free(L.l2_cache[i])
                L.l2_cache[i] = NULL
        L.n_cached = 0
        rc = hook(L, WB_L2_WRITTEN)
        if rc < 0:
            return rc
    if L.l1_dirty:
        if L.new_tables:
            if io_sync(L) != 0:
                return fail_io(L, "sync failed", 0)
        rc = ensure_backed(L, L.l1_offset)
        if rc < 0:
            return rc
        for i in range(L.l1_size):
            off = L.l1_offset + i * 8
            if ((off & (L.cluster_size - 1)) == 0) and i:
                rc = ensure_backed(L, off)
                if rc < 0:
                    return rc
            store_be64(L.base + off, L.l1[i])
        L.l1_dirty = 0
        L.new_tables = 0
        rc = hook(L, WB_L1_WRITTEN)
        if rc < 0:
            return rc
    if io_sync(L) != 0:
        return fail_io(L, "sync failed", 0)
    rc = hook(L, WB_SYNCED)
    if rc < 0:
        return rc
    if L.n_pend:
        for i in range(L.n_pend):
            idx = L.pend_free[i]
            rc = get_refcount(L, idx, &v)
            if rc < 0:
                return rc
            if v == 0:
                return fail(L, E_CORRUPT, "refcount underflow while freeing a cluster", idx << L.cluster_bits)
            rc = set_refcount(L, idx, v - 1)
            if rc < 0:
                return rc
            if v == 1 and idx < L.free_hint:
                L.free_hint = idx
        L.n_pend = 0
        had_frees = 1
        rc = hook(L, WB_FREES_APPLIED)
        if rc < 0:
            return rc
    if had_frees and io_sync(L) != 0:
        return fail_io(L, "sync failed", 0)
    L.data_dirty = 0
    return 0


cdef inline int maybe_writeback(Layer *L) noexcept nogil:
    if L.n_cached * L.cluster_size > L2_CACHE_LIMIT_BYTES or L.n_pend > (1 << 20):
        return writeback(L)
    return 0


cdef int store_pieces(Layer *L, uint64_t host, iovec *iov, int cnt, uint64_t n,
                      int fresh=0) noexcept nogil:
    """Store n bytes, given as pieces (iov_base NULL: zeros), at a host offset inside one
    cluster. Stores of 16 KiB and more, and stores into a cluster just allocated (fresh: its
    pages are not in the page cache), go in one pwritev: write() fills the page cache without
    a page fault (and, on most filesystems, a page_mkwrite call and a read of the page) per
    page of the mapping, and stays coherent with it. Other small ones, and zeros alone into
    a cluster in use, go through the mapping."""
    cdef int rc, i
    cdef ssize_t w
    cdef uint64_t pos = host
    if overlaps_meta(L, host, n):
        return fail(L, E_CORRUPT, "data cluster overlaps image metadata", host)
    rc = ensure_backed(L, host)
    if rc < 0:
        return rc
    if not fresh and (n < 16384 or (cnt == 1 and iov[0].iov_base == NULL)):
        for i in range(cnt):
            if iov[i].iov_base == NULL:
                memset(L.base + pos, 0, iov[i].iov_len)
            else:
                memcpy(L.base + pos, iov[i].iov_base, iov[i].iov_len)
            pos += iov[i].iov_len
        return 0
    for i in range(cnt):
        if iov[i].iov_base == NULL:
            iov[i].iov_base = L.zeros
    while cnt > 0:
        w = io_pwritev(L.fd, iov, cnt, <off_t>pos)
        if w <= 0:
            if w < 0 and errno == EINTR:
                continue
            if w == 0:
                set_errno(5)        # no progress on a regular file: never loop on it
            return fail_io(L, "write failed", pos)
        pos += <uint64_t>w
        while cnt > 0 and <size_t>w >= iov[0].iov_len:
            w -= iov[0].iov_len
            iov += 1
            cnt -= 1
        if cnt > 0:
            iov[0].iov_base = <uint8_t *>iov[0].iov_base + w
            iov[0].iov_len -= <size_t>w
    return 0


cdef inline int store(Layer *L, uint64_t host, const uint8_t *src, uint64_t n) noexcept nogil:
    """Store n bytes at a host offset inside one cluster (src NULL: zeros)."""
    cdef iovec one
    one.iov_base = <void *>src
    one.iov_len = n
    return store_pieces(L, host, &one, 1, n)


cdef int span_ptr(Layer *L, uint64_t vaddr, uint64_t n, const uint8_t **out,
                  Layer **src) noexcept nogil:
    """If the guest range [vaddr, vaddr+n) of L's chain reads as one contiguous piece of one
    mapping, or as all zeros, point *out at it (NULL for zeros) and *src at the layer whose
    mapping it is (NULL for zeros), and return 1. Return 0 when the range needs layer_read
    (several runs, compressed data, pread mode); <0 on error."""
    cdef Layer *top = L
    cdef OwnerMap *M
    cdef uint16_t *b
    cdef uint16_t own
    cdef uint64_t host, run, e, c, c_last
    cdef int rc, kind
    while True:
        if vaddr >= L.size:
            out[0] = NULL
            src[0] = NULL
            return 1
        if L.size - vaddr < n:
            return 0
        if L.raw:
            kind = K_DATA
            host = vaddr
        else:
            rc = resolve(L, vaddr, n, &kind, &host, &run, &e)
            if rc < 0:
                break
            if run < n:
                return 0
        if kind == K_DATA:
            if L.pread_data or host >= L.file_size or L.file_size - host < n:
                return 0
            out[0] = L.base + host
            src[0] = L
            return 1
        if kind == K_ZERO:
            out[0] = NULL
            src[0] = NULL
            return 1
        if kind != K_UNALLOC:
            return 0
        if L.backing == NULL:
            out[0] = NULL
            src[0] = NULL
            return 1
        M = L.backing.omap
        if M == NULL:
            L = L.backing
            continue
        # the immutable part: one owner for the whole range, or give up
        if vaddr >= M.size:             # the top grew past its backing: zeros
            out[0] = NULL
            src[0] = NULL
            return 1
        if M.size - vaddr < n:
            return 0
        c = vaddr >> M.gbits
        c_last = (vaddr + n - 1) >> M.gbits
        if (c >> OMAP_BLOCK_BITS) != (c_last >> OMAP_BLOCK_BITS):
            return 0
        rc = omap_block(M, c >> OMAP_BLOCK_BITS, &b)
        if rc < 0:
            L = M.layers[0]
            break
        c &= (1 << OMAP_BLOCK_BITS) - 1
        c_last &= (1 << OMAP_BLOCK_BITS) - 1
        own = b[c]
        while c < c_last:
            c += 1
            if b[c] != own:
                return 0
        if own == OWN_ZERO:
            out[0] = NULL
            src[0] = NULL
            return 1
        if own == OWN_MIXED:
            return 0
        L = M.layers[own]
    if L != top:
        copy_err(top, L)
    return rc


cdef volatile uint8_t prefault_sink = 0

cdef inline void prefault(const uint8_t *p, uint64_t n) noexcept nogil:
    """Touch one byte per page so the pages are mapped before a write() copies from them:
    a copy that faults part-way makes the kernel zero the new page-cache pages and retry."""
    global prefault_sink
    cdef uint64_t i = 0
    cdef uint8_t acc = 0
    while i < n:
        acc ^= p[i]
        i += 4096
    acc ^= p[n - 1]
    prefault_sink = acc


cdef int copy_up(Layer *L, uint64_t cbase, uint64_t in_off, const uint8_t *src, uint64_t chunk,
                 uint64_t newoff) noexcept nogil:
    """Fill the new cluster at newoff with the old content of guest cluster cbase (read
    through the chain) overlaid with chunk bytes of src (NULL: zeros) at in_off."""
    cdef uint64_t C = L.cluster_size
    cdef uint64_t valid = L.size - cbase       # a partial last cluster: zeros past the disk end
    cdef const uint8_t *sp
    cdef Layer *owner
    cdef iovec iov[4]
    cdef int rc, cnt = 0
    if valid > C:
        valid = C
    rc = span_ptr(L, cbase, valid, &sp, &owner)
    if rc < 0:
        return rc
    if rc == 1:
        # the old bytes are one mapped piece (or zeros): store them from where they live,
        # without assembling the cluster in scratch first
        rc = hook(L, COW_READ)
        if rc < 0:
            return rc
        if sp != NULL:
            advise_read(owner, <uint64_t>(sp - owner.base), valid)
            if C >= 16384:
                prefault(sp, valid)
        if in_off:
            iov[cnt].iov_base = <void *>sp
            iov[cnt].iov_len = in_off
            cnt += 1
        iov[cnt].iov_base = <void *>src
        iov[cnt].iov_len = chunk
        cnt += 1
        if in_off + chunk < valid:
            iov[cnt].iov_base = <void *>(sp + in_off + chunk) if sp != NULL else NULL
            iov[cnt].iov_len = valid - in_off - chunk
            cnt += 1
        if valid < C:
            iov[cnt].iov_base = NULL
            iov[cnt].iov_len = C - valid
            cnt += 1
        return store_pieces(L, newoff, iov, cnt, C)
    rc = layer_read(L, cbase, L.scratch, valid)
    if rc == 0:
        rc = hook(L, COW_READ)
    if rc < 0:
        return rc
    if valid < C:
        memset(L.scratch + valid, 0, C - valid)
    if src == NULL:
        memset(L.scratch + in_off, 0, chunk)
    else:
        memcpy(L.scratch + in_off, src, chunk)
    return store(L, newoff, L.scratch, C)


cdef int layer_write(Layer *L, uint64_t vaddr, const uint8_t *src, uint64_t n) noexcept nogil:
    """Write n bytes (src NULL: zeros) at vaddr into L, copying clusters up as needed."""
    cdef uint64_t C = L.cluster_size
    cdef uint64_t l2n = 1 << L.l2_bits
    cdef uint64_t ci, l1i, l2i, in_off, chunk, e, off, newoff, cbase, valid
    cdef uint8_t *t
    cdef int rc, kind
    cdef uint64_t h, r, ee
    if L.ext_l2:
        return layer_write_ext(L, vaddr, src, n)
    while n > 0:
        ci = vaddr >> L.cluster_bits
        l1i = ci >> L.l2_bits
        l2i = ci & (l2n - 1)
        in_off = vaddr & (C - 1)
        chunk = C - in_off
        if chunk > n:
            chunk = n
        if l1i >= L.l1_size:
            return fail(L, E_CORRUPT, "L1 table too small for the virtual size", vaddr)
        rc = l2_for_write(L, l1i, &t)
        if rc < 0:
            return rc
        e = load_be64(t + l2i * 8)
        off = e & L2E_OFFSET_MASK
        if (e & QCOW_OFLAG_COPIED) and not (e & QCOW_OFLAG_COMPRESSED) and off != 0:
            if (e & L2E_RESERVED) or (off & (C - 1)) or off + C > L.file_size:
                return fail(L, E_CORRUPT, "data cluster offset unaligned or past the end of the file", off)
            if e & QCOW_OFLAG_ZERO:
                # preallocated zero cluster we own: zero what the write does not cover
                if in_off:
                    rc = store(L, off, NULL, in_off)
                    if rc < 0:
                        return rc
                if in_off + chunk < C:
                    rc = store(L, off + in_off + chunk, NULL, C - in_off - chunk)
                    if rc < 0:
                        return rc
                store_be64(t + l2i * 8, off | QCOW_OFLAG_COPIED)
            rc = store(L, off + in_off, src, chunk)
            if rc < 0:
                return rc
        else:
            rc = alloc_cluster(L, &newoff)
            if rc < 0:
                return rc
            if chunk < C:
                rc = copy_up(L, vaddr - in_off, in_off, src, chunk, newoff)
            else:
                rc = store(L, newoff, src, C)
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
            store_be64(t + l2i * 8, newoff | QCOW_OFLAG_COPIED)
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


cdef int layer_zero(Layer *L, uint64_t vaddr, uint64_t n, int mode) noexcept nogil:
    """Discard or zero whole clusters [vaddr, vaddr+n) (both cluster-aligned, or n reaching
    the end of the disk) by rewriting L2 entries only."""
    cdef uint64_t C = L.cluster_size
    cdef uint64_t l2n = 1 << L.l2_bits
    cdef uint64_t ci, l1i, l2i, e, off, ne, end = vaddr + n
    cdef uint8_t *t
    cdef int rc
    if L.ext_l2:
        return layer_zero_ext(L, vaddr, n, mode)
    while vaddr < end:
        ci = vaddr >> L.cluster_bits
        l1i = ci >> L.l2_bits
        l2i = ci & (l2n - 1)
        if mode == Z_DISCARD and L.l2_cache[l1i] == NULL and (L.l1[l1i] & L1E_OFFSET_MASK) == 0:
            vaddr = (l1i + 1) << (L.l2_bits + L.cluster_bits)     # nothing mapped in this table
            continue
        rc = l2_for_write(L, l1i, &t)
        if rc < 0:
            return rc
        e = load_be64(t + l2i * 8)
        off = e & L2E_OFFSET_MASK
        if mode == Z_DISCARD:
            ne = 0
        elif mode == Z_ZERO_KEEP and (e & QCOW_OFLAG_COPIED) and off != 0 and not (e & QCOW_OFLAG_COMPRESSED):
            ne = off | QCOW_OFLAG_COPIED | QCOW_OFLAG_ZERO
        else:
            ne = QCOW_OFLAG_ZERO
        if ne != e:
            if e & QCOW_OFLAG_COMPRESSED:
                rc = pend_free_compressed(L, e)
                if L.zbuf_key == e:
                    L.zbuf_key = 0
            elif off != 0 and (ne & L2E_OFFSET_MASK) != off:
                if (off & (C - 1)) or off >= L.file_size:
                    return fail(L, E_CORRUPT, "data cluster offset unaligned or past the end of the file", off)
                rc = pend_free(L, off >> L.cluster_bits)
            else:
                rc = 0
            if rc < 0:
                return rc
            store_be64(t + l2i * 8, ne)
            L.data_dirty = 1
        vaddr += C
        rc = maybe_writeback(L)
        if rc < 0:
            return rc
    return 0



cdef int raw_pwrite(Layer *L, uint64_t offset, const uint8_t *p, uint64_t n) noexcept nogil:
    """Raw files are written with pwrite, never through the mapping: a store into a sparse
    raw file on a full disk would be a SIGBUS; pwrite says ENOSPC. Caller holds the lock."""
    cdef ssize_t w
    cdef uint64_t done = 0
    L.data_dirty = 1
    while done < n:
        w = io_pwrite(L.fd, p + done, n - done, <off_t>(offset + done))
        if w < 0 and errno == EINTR:
            continue
        if w <= 0:
            if w == 0:
                set_errno(5)            # no progress: never loop on it
            return fail_io(L, "write failed", offset + done)
        done += <uint64_t>w
    return 0
