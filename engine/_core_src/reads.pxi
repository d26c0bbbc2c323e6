# Included by engine/_core.pyx (one compiled module); see the list of rooms there.

# --- reads --------------------------------------------------------------------------------------

cdef object _decompressor = None

# The exception a Python callback raised, per thread, until the caller's entry point raises
# it unchanged (the C path in between only carries E_PYERR up).
import threading as _threading
_pending = _threading.local()


def set_decompressor(fn):
    """Install the Python callable that inflates one compressed cluster:
    fn(compression_type: int, data: bytes, cluster_size: int) -> bytes of exactly cluster_size.
    Compressed clusters are the one read path that crosses into Python (once per cluster).
    Whatever it raises reaches the caller of the read unchanged."""
    global _decompressor
    _decompressor = fn


cdef int inflate_cluster(Layer *L, uint64_t e, uint8_t *dst) noexcept:
    cdef uint64_t host, nb
    cdef bytes out
    compressed_extent(L, e, &host, &nb)
    if host >= L.file_size:
        return fail(L, E_CORRUPT, "compressed cluster past the end of the file", host)
    if host + nb > L.file_size:
        nb = L.file_size - host
    try:
        out = _decompressor(L.compression_type, (<char *>(L.base + host))[:nb], L.cluster_size)
    except BaseException as exc:
        _pending.exc = exc
        return fail(L, E_PYERR, "compressed cluster does not decompress", host)
    if len(out) != L.cluster_size:
        return fail(L, E_CORRUPT, "compressed cluster does not inflate to one cluster", host)
    memcpy(dst, <char *>out, L.cluster_size)
    return 0


cdef int read_compressed(Layer *L, uint64_t e, uint64_t vaddr, uint8_t *dst, uint64_t n) noexcept with gil:
    """The one cluster cache (zbuf) is shared by every thread reading this layer: the GIL,
    needed anyway to inflate, serialises its use (a hit costs one GIL round trip)."""
    cdef int rc
    if L.zbuf == NULL:
        L.zbuf = <uint8_t *>malloc(L.cluster_size)
        if L.zbuf == NULL:
            return fail(L, E_NOMEM, "out of memory", 0)
        L.zbuf_key = 0
    if L.zbuf_key != e:
        L.zbuf_key = 0
        rc = inflate_cluster(L, e, L.zbuf)
        if rc < 0:
            return rc
        L.zbuf_key = e
    memcpy(dst, L.zbuf + (vaddr & (L.cluster_size - 1)), n)
    return 0


DEF RA_MIN = 128 * 1024       # first readahead window of a sequential stream
DEF RA_MAX = 4 * 1024 * 1024   # largest window
DEF RA_BIG = 64 * 1024         # a single read this large is fetched whole


cdef inline void will_need(Layer *L, uint64_t start, uint64_t end) noexcept nogil:
    """Start reading [start, end) of the file into the page cache, unless its last page is
    there already (then, almost always, all of it is: one cheap mincore instead)."""
    cdef unsigned char inc = 0
    start &= ~(<uint64_t>4095)
    if end > L.file_size:
        end = L.file_size
    if end <= start:
        return
    if mincore(L.base + ((end - 1) & ~(<uint64_t>4095)), 1, &inc) == 0 and (inc & 1):
        return
    madvise(L.base + start, end - start, MADV_WILLNEED)


cdef inline void advise_read(Layer *L, uint64_t host, uint64_t n) noexcept nogil:
    """Readahead for reads through the mapping. The mapping is MADV_RANDOM, so a fault
    reads only its own page (the kernel's fault readahead turned each random 4 KiB read into
    a 256 KiB disk read); reads that continue where the last one ended open a window that
    doubles up to RA_MAX, as read() readahead does, and a large read asks for itself. The
    fields are hints shared by reader threads: relaxed atomics, no lock."""
    cdef uint64_t nxt = ld64(&L.ra_next), end, win
    st64(&L.ra_next, host + n)
    if host == nxt and host != 0:
        win = ld64(&L.ra_win)
        win = RA_MIN if win == 0 else (win * 2 if win < RA_MAX else RA_MAX)
        end = ld64(&L.ra_end)
        if end < host + n:
            end = host
        if end < host + n + win // 2:
            st64(&L.ra_win, win)
            st64(&L.ra_end, host + n + win)
            will_need(L, end, host + n + win)
        return
    st64(&L.ra_win, 0)
    if n >= RA_BIG:
        will_need(L, host, host + n)


cdef inline int copy_host(Layer *L, uint64_t host, uint8_t *dst, uint64_t n) noexcept nogil:
    """Copy n bytes at host offset; bytes past the end of the file read as zeros."""
    cdef uint64_t avail
    cdef ssize_t r
    if host >= L.file_size:
        memset(dst, 0, n)
        return 0
    avail = L.file_size - host
    if avail > n:
        avail = n
    if L.pread_data:
        while avail:
            r = pread(L.fd, dst, avail, <off_t>host)
            if r < 0:
                if errno == EINTR:
                    continue
                return fail_io(L, "read failed", host)
            if r == 0:
                break
            dst += r
            host += <uint64_t>r
            avail -= <uint64_t>r
            n -= <uint64_t>r
        memset(dst, 0, n)
        return 0
    advise_read(L, host, avail)
    memcpy(dst, L.base + host, avail)
    if avail < n:
        memset(dst + avail, 0, n - avail)
    return 0


cdef int layer_read(Layer *L, uint64_t vaddr, uint8_t *dst, uint64_t n) noexcept nogil:
    """Read n guest bytes at vaddr through L and its backing chain into dst."""
    cdef int rc, kind
    cdef uint64_t host, run, e, m
    while n > 0:
        if vaddr >= L.size:
            memset(dst, 0, n)
            return 0
        m = L.size - vaddr
        if m > n:
            m = n
        if L.raw:
            rc = copy_host(L, vaddr, dst, m)
            if rc < 0:
                return rc
            dst += m
            vaddr += m
            n -= m
            continue
        rc = resolve(L, vaddr, m, &kind, &host, &run, &e)
        if rc < 0:
            return rc
        if kind == K_DATA:
            rc = copy_host(L, host, dst, run)
            if rc < 0:
                return rc
        elif kind == K_ZERO:
            memset(dst, 0, run)
        elif kind == K_UNALLOC:
            if L.backing != NULL:
                if L.backing.omap != NULL:
                    rc = omap_read(L.backing.omap, vaddr, dst, run)
                else:
                    rc = layer_read(L.backing, vaddr, dst, run)
                if rc < 0:
                    copy_err(L, L.backing)
                    return rc
            else:
                memset(dst, 0, run)
        else:
            rc = read_compressed(L, e, vaddr, dst, run)
            if rc < 0:
                return rc
        dst += run
        vaddr += run
        n -= run
    return 0



DEF BATCH_AHEAD = 8         # reads resolved (and their first bytes prefetched) ahead of the copy


cdef int batch_read(Layer *L, const uint64_t *offs, uint64_t k, uint64_t length,
                    uint8_t *out) noexcept nogil:
    """k reads of length bytes into consecutive slices of out. Small random reads are bound
    by memory latency (a TLB walk and a cache miss per source page), so the batch is a
    pipeline: each read is resolved BATCH_AHEAD reads before it is copied, and its first
    bytes are prefetched then; the copy finds them on the way. Reads that are not one
    mapped piece go through layer_read."""
    cdef const uint8_t *ptr[BATCH_AHEAD]
    cdef Layer *owner
    cdef int ok[BATCH_AHEAD]
    cdef uint64_t i, j, s
    cdef int rc
    if length > 65536:
        for i in range(k):
            rc = layer_read(L, offs[i], out + i * length, length)
            if rc < 0:
                return rc
        return 0
    for i in range(k + BATCH_AHEAD):
        if i >= BATCH_AHEAD:            # copy read j, freeing its slot for read i
            j = i - BATCH_AHEAD
            s = j % BATCH_AHEAD
            if ok[s]:
                if ptr[s] != NULL:
                    memcpy(out + j * length, ptr[s], length)
                else:
                    memset(out + j * length, 0, length)
            else:
                rc = layer_read(L, offs[j], out + j * length, length)
                if rc < 0:
                    return rc
        if i < k:                       # resolve read i and start fetching its bytes
            s = i % BATCH_AHEAD
            rc = span_ptr(L, offs[i], length, &ptr[s], &owner)
            if rc < 0:
                return rc
            ok[s] = rc
            if rc == 1 and ptr[s] != NULL:
                advise_read(owner, <uint64_t>(ptr[s] - owner.base), length)
                prefetch(ptr[s])
                if length > 64:
                    prefetch(ptr[s] + length - 1)
    return 0


# --- owner map ---------------------------------------------------------------------------------

DEF OMAP_BLOCK_BITS = 9
DEF OWN_ZERO = 0xfffe       # no layer holds the chunk: zeros
DEF OWN_MIXED = 0xfffd      # a layer's end falls inside the chunk: resolve layer by layer
DEF OWN_UNKNOWN = 0xffff


cdef OwnerMap *omap_new(Layer *top) noexcept nogil:
    cdef OwnerMap *M
    cdef Layer *p = top
    cdef int depth = 0, i, gbits = 30, g
    while p != NULL:
        if not p.raw:
            g = p.cluster_bits - 5 if p.ext_l2 else p.cluster_bits
            if g < gbits:
                gbits = g
        depth += 1
        p = p.backing
    if depth > OWN_MIXED:
        return NULL
    M = <OwnerMap *>calloc(1, sizeof(OwnerMap))
    if M == NULL:
        return NULL
    M.layers = <Layer **>calloc(depth, sizeof(Layer *))
    M.gbits = gbits
    M.size = top.size
    M.depth = depth
    M.nblocks = ((top.size >> gbits) >> OMAP_BLOCK_BITS) + 1
    M.blocks = <uint16_t **>calloc(M.nblocks, sizeof(uint16_t *))
    if M.layers == NULL or M.blocks == NULL:
        free(M.layers)
        free(M.blocks)
        free(M)
        return NULL
    p = top
    for i in range(depth):
        M.layers[i] = p
        p = p.backing
    pthread_mutex_init(&M.mu, NULL)
    return M


cdef void omap_free(OwnerMap *M) noexcept nogil:
    cdef uint64_t i
    if M == NULL:
        return
    for i in range(M.nblocks):
        free(M.blocks[i])
    free(M.blocks)
    free(M.layers)
    pthread_mutex_destroy(&M.mu)
    free(M)


cdef int omap_fill(OwnerMap *M, uint64_t blk, uint16_t **out) noexcept nogil:
    """Work out the owner of every chunk of block blk, walking the layers top-down by runs."""
    cdef uint64_t nch = 1 << OMAP_BLOCK_BITS
    cdef uint64_t g = 1 << M.gbits
    cdef uint64_t start = blk << (OMAP_BLOCK_BITS + M.gbits)
    cdef uint64_t end = start + (nch << M.gbits)
    cdef uint64_t v, stop, run, host, e, c, c0, c1
    cdef uint16_t *b
    cdef Layer *Lz
    cdef int d, kind, rc
    if end > M.size:
        end = M.size
    b = <uint16_t *>malloc(nch * 2)
    if b == NULL:
        return E_NOMEM
    for c in range(nch):
        b[c] = OWN_UNKNOWN
    for d in range(M.depth):
        Lz = M.layers[d]
        if Lz.size > start and Lz.size < end and (Lz.size & (g - 1)):
            c = (Lz.size - start) >> M.gbits
            if b[c] == OWN_UNKNOWN:
                b[c] = OWN_MIXED
    for d in range(M.depth):
        Lz = M.layers[d]
        v = start
        while v < end:
            stop = end if Lz.size > end else Lz.size
            if v >= stop:
                run = end - v       # past this layer's end: it answers with zeros
                kind = K_ZERO
            elif Lz.raw:
                run = stop - v
                kind = K_DATA
            else:
                rc = resolve(Lz, v, stop - v, &kind, &host, &run, &e)
                if rc < 0:
                    # damage stays local: this chunk is read layer by layer (and fails there,
                    # naming the layer); the rest of the block keeps its owners
                    c = (v - start) >> M.gbits
                    if b[c] == OWN_UNKNOWN:
                        b[c] = OWN_MIXED
                    v = start + ((c + 1) << M.gbits)
                    continue
            if kind != K_UNALLOC:
                c0 = (v - start) >> M.gbits
                c1 = (v + run - start + g - 1) >> M.gbits
                for c in range(c0, c1):
                    if b[c] == OWN_UNKNOWN:
                        b[c] = <uint16_t>d
            v += run
    for c in range(nch):
        if b[c] == OWN_UNKNOWN:
            b[c] = OWN_ZERO
    out[0] = b
    return 0


cdef inline int omap_block(OwnerMap *M, uint64_t blk, uint16_t **out) noexcept nogil:
    """The owners of block blk, filled on first use (filled blocks are read without a lock)."""
    cdef uint16_t *b = atomic_load_ptr(&M.blocks[blk])
    cdef int rc = 0
    if b == NULL:
        pthread_mutex_lock(&M.mu)
        b = M.blocks[blk]
        if b == NULL:
            rc = omap_fill(M, blk, &b)
            if rc == 0:
                atomic_store_ptr(&M.blocks[blk], b)
        pthread_mutex_unlock(&M.mu)
    out[0] = b
    return rc


cdef int omap_read(OwnerMap *M, uint64_t vaddr, uint8_t *dst, uint64_t n) noexcept nogil:
    """Read through the immutable chain: one owner lookup per run of chunks."""
    cdef uint64_t chunk, blk, i, run, m, g = 1 << M.gbits, mask = (1 << OMAP_BLOCK_BITS) - 1
    cdef uint16_t *b
    cdef uint16_t own
    cdef int rc
    cdef Layer *src
    while n > 0:
        if vaddr >= M.size:
            memset(dst, 0, n)
            return 0
        m = M.size - vaddr
        if m > n:
            m = n
        chunk = vaddr >> M.gbits
        blk = chunk >> OMAP_BLOCK_BITS
        rc = omap_block(M, blk, &b)
        if rc < 0:
            return rc
        i = chunk & mask
        own = b[i]
        run = ((chunk + 1) << M.gbits) - vaddr
        i += 1
        while run < m and i <= mask and b[i] == own:
            run += g
            i += 1
        if run > m:
            run = m
        if own == OWN_ZERO:
            memset(dst, 0, run)
        else:
            src = M.layers[0] if own == OWN_MIXED else M.layers[own]
            rc = layer_read(src, vaddr, dst, run)
            if rc < 0:
                if src != M.layers[0]:
                    copy_err(M.layers[0], src)
                return rc
        dst += run
        vaddr += run
        n -= run
    return 0
