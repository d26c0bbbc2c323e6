# Included by engine/_core.pyx (one compiled module); see the list of rooms there.

# --- block status (extents) --------------------------------------------------------------------

ctypedef struct RunBuf:
    uint64_t *v        # 5 words per run: start, length, depth, flags, offset
    uint64_t n
    uint64_t cap


cdef int runs_push(RunBuf *rb, uint64_t start, uint64_t length, uint64_t depth,
                   uint64_t flags, uint64_t offset) noexcept nogil:
    cdef uint64_t *p
    cdef uint64_t *last
    if rb.n:
        last = rb.v + (rb.n - 1) * 5
        if (last[2] == depth and last[3] == flags and last[0] + last[1] == start and
                (not (flags & F_OFFSET) or last[4] + last[1] == offset)):
            last[1] += length
            return 0
    if rb.n == rb.cap:
        rb.cap = rb.cap * 2 if rb.cap else 64
        p = <uint64_t *>realloc(rb.v, rb.cap * 5 * 8)
        if p == NULL:
            return E_NOMEM
        rb.v = p
    p = rb.v + rb.n * 5
    p[0] = start
    p[1] = length
    p[2] = depth
    p[3] = flags
    p[4] = offset
    rb.n += 1
    return 0


cdef int raw_status(Layer *L, uint64_t vaddr, uint64_t n, uint64_t depth, RunBuf *out) noexcept nogil:
    """Data and holes of a raw file (SEEK_DATA/SEEK_HOLE), as qemu's file driver reports them."""
    cdef off_t d, h
    cdef uint64_t end = vaddr + n, run
    cdef int rc
    while vaddr < end:
        if vaddr >= L.file_size:
            return runs_push(out, vaddr, end - vaddr, depth, F_PRESENT | F_ZERO | F_OFFSET, vaddr)
        d = lseek(L.fd, <off_t>vaddr, SEEK_DATA)
        if d < 0 or <uint64_t>d > vaddr:
            # a hole up to d (or to EOF)
            run = (<uint64_t>d if d >= 0 else L.file_size) - vaddr
            if run > end - vaddr:
                run = end - vaddr
            rc = runs_push(out, vaddr, run, depth, F_PRESENT | F_ZERO | F_OFFSET, vaddr)
        else:
            h = lseek(L.fd, <off_t>vaddr, SEEK_HOLE)
            run = (<uint64_t>h if h >= 0 else L.file_size) - vaddr
            if run == 0:
                run = L.file_size - vaddr
            if run > end - vaddr:
                run = end - vaddr
            rc = runs_push(out, vaddr, run, depth, F_PRESENT | F_DATA | F_OFFSET, vaddr)
        if rc < 0:
            return rc
        vaddr += run
    return 0


cdef int layer_status(Layer *L, uint64_t vaddr, uint64_t n, uint64_t depth, RunBuf *out) noexcept nogil:
    cdef int rc, kind
    cdef uint64_t host, run, e, m, flags
    while n > 0:
        if vaddr >= L.size:
            # past the end of a shorter backing file: reads as zeros
            return runs_push(out, vaddr, n, depth, F_ZERO, 0)
        m = L.size - vaddr
        if m > n:
            m = n
        if L.raw:
            rc = raw_status(L, vaddr, m, depth, out)
            if rc < 0:
                return rc
            vaddr += m
            n -= m
            continue
        rc = resolve(L, vaddr, m, &kind, &host, &run, &e)
        if rc < 0:
            return rc
        if kind == K_UNALLOC:
            if L.backing != NULL and vaddr < L.backing.size:
                m = L.backing.size - vaddr
                if m > run:
                    m = run
                rc = layer_status(L.backing, vaddr, m, depth + 1, out)
                if rc < 0:
                    copy_err(L, L.backing)
                    return rc
                if m < run:
                    # past the end of a shorter backing file: qemu-img map reports this layer
                    rc = runs_push(out, vaddr + m, run - m, depth, F_ZERO, 0)
            elif host and L.backing == NULL:
                rc = runs_push(out, vaddr, run, depth, F_ZERO | F_OFFSET, host)
            else:
                rc = runs_push(out, vaddr, run, depth, F_ZERO, 0)
        elif kind == K_ZERO:
            if host:
                rc = runs_push(out, vaddr, run, depth, F_PRESENT | F_ZERO | F_OFFSET, host)
            else:
                rc = runs_push(out, vaddr, run, depth, F_PRESENT | F_ZERO, 0)
        elif kind == K_DATA:
            rc = runs_push(out, vaddr, run, depth, F_PRESENT | F_DATA | F_OFFSET, host)
        else:
            rc = runs_push(out, vaddr, run, depth, F_PRESENT | F_DATA | F_COMPRESSED, 0)
        if rc < 0:
            return fail(L, E_NOMEM, "out of memory", 0)
        vaddr += run
        n -= run
    return 0
