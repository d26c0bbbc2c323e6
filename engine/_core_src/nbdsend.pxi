# Included by engine/_core.pyx (one compiled module); see the list of rooms there.

# --- NBD read replies sent straight from the mappings ------------------------------------------
#
# A READ reply of the NBD server (engine/nbd) leaves in one sendmsg: the reply's headers, built
# here, interleaved with pieces of the mappings of the layers that own each range (no copy into
# a buffer first), and, in structured mode, OFFSET_HOLE chunks for the ranges that read as zeros
# (NBD protocol specification, doc/proto.md, "Structured reply chunk message types"). The top
# layer's read lock is held from the lookup to the end of the send, so no write can move the
# leaf's mapping under the kernel's copy; to keep a client that stops reading from holding a
# writable leaf's lock, the send waits for room in the socket NBD_WAIT_MS at most: what the
# socket has not taken by then is copied out and sent after the lock is released. (Nothing
# writes a read-only top layer, so its replies wait for the client as long as it takes.) Ranges the mappings cannot serve (compressed clusters, layers read
# with pread) are left to the ordinary read path.

from posix.uio cimport iovec
from libc.string cimport memmove
from libc.errno cimport EAGAIN

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    ssize_t c_send "send"(int fd, const void *buf, size_t n, int flags)
    int MSG_DONTWAIT, MSG_NOSIGNAL

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLOUT

DEF NBD_IOV_MAX = 1024              # Linux's IOV_MAX
DEF NBD_WAIT_MS = 20                # how long a full socket may hold a writable leaf's lock,
DEF NBD_WAITS = 16                  #   and how many times per reply
DEF NBD_ZEROS = 1 << 20             # the shared zero buffer (holes sent as data)
DEF NBD_REQUEST_MAGIC = 0x25609513
DEF NBD_CMD_WRITE = 1                # (with no flags: the flags are the high 16 bits)
DEF NBD_REPLY_MAGIC = 0x67446698
DEF NBD_CHUNK_MAGIC = 0x668e33ef
DEF NBD_CHUNK_DONE = 1
DEF NBD_CHUNK_DATA = 1
DEF NBD_CHUNK_HOLE = 2
DEF E_NBD_FALLBACK = -10000          # not servable from the mappings (never a layer error)

ctypedef struct NbdPiece:
    uint64_t vaddr
    uint64_t n
    const uint8_t *ptr                  # NULL: reads as zeros

ctypedef struct NbdPieces:
    NbdPiece *v
    uint64_t n
    uint64_t cap
    uint64_t floor                      # pieces below this index belong to an earlier reply

cdef uint8_t *_nbd_zeros = NULL

cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void *buf, size_t n, int flags)


cdef int nbd_push(NbdPieces *P, uint64_t vaddr, uint64_t n, const uint8_t *ptr) noexcept nogil:
    """Append a piece, merged with the last one when it continues it (zeros after zeros, or
    the next bytes of the same mapping)."""
    cdef NbdPiece *last
    cdef NbdPiece *p
    if n == 0:
        return 0
    if P.n > P.floor:
        last = &P.v[P.n - 1]
        if last.vaddr + last.n == vaddr and (
                (ptr == NULL and last.ptr == NULL) or
                (ptr != NULL and last.ptr != NULL and last.ptr + last.n == ptr)):
            last.n += n
            return 0
    if P.n == P.cap:
        P.cap = P.cap * 2 if P.cap else 32
        p = <NbdPiece *>realloc(P.v, P.cap * sizeof(NbdPiece))
        if p == NULL:
            return E_NOMEM
        P.v = p
    P.v[P.n].vaddr = vaddr
    P.v[P.n].n = n
    P.v[P.n].ptr = ptr
    P.n += 1
    return 0


cdef int nbd_collect(Layer *L, uint64_t vaddr, uint64_t n, NbdPieces *P) noexcept nogil:
    """The pieces of [vaddr, vaddr+n) through L and its backing chain: where in a mapping
    each range is, or that it reads as zeros (the same cases as layer_read)."""
    cdef int rc, kind
    cdef uint64_t host, run, e, m, avail
    while n > 0:
        if vaddr >= L.size:
            return nbd_push(P, vaddr, n, NULL)
        m = L.size - vaddr
        if m > n:
            m = n
        if L.raw:
            kind = K_DATA
            host = vaddr
            run = m
        else:
            rc = resolve(L, vaddr, m, &kind, &host, &run, &e)
            if rc < 0:
                return rc
        if kind == K_DATA:
            if L.pread_data or L.base == NULL:
                return E_NBD_FALLBACK
            avail = L.file_size - host if host < L.file_size else 0
            if avail > run:
                avail = run
            if avail:
                advise_read(L, host, avail)
            rc = nbd_push(P, vaddr, avail, L.base + host)
            if rc == 0:
                rc = nbd_push(P, vaddr + avail, run - avail, NULL)   # past the end of the file
        elif kind == K_ZERO:
            rc = nbd_push(P, vaddr, run, NULL)
        elif kind == K_UNALLOC:
            if L.backing != NULL:
                if L.backing.omap != NULL:
                    rc = nbd_collect_omap(L.backing.omap, vaddr, run, P)
                else:
                    rc = nbd_collect(L.backing, vaddr, run, P)
                if rc < 0 and rc != E_NBD_FALLBACK:
                    copy_err(L, L.backing)
            else:
                rc = nbd_push(P, vaddr, run, NULL)
        else:
            return E_NBD_FALLBACK                               # compressed
        if rc == E_NOMEM:
            return fail(L, E_NOMEM, "out of memory", 0)
        if rc < 0:
            return rc
        vaddr += run
        n -= run
    return 0


cdef int nbd_collect_omap(OwnerMap *M, uint64_t vaddr, uint64_t n, NbdPieces *P) noexcept nogil:
    """nbd_collect through the immutable part of a chain: one owner lookup per run of
    chunks (as omap_read), then the owner's own lookup."""
    cdef uint64_t chunk, i, run, m, g = 1 << M.gbits, mask = (1 << OMAP_BLOCK_BITS) - 1
    cdef uint16_t *b
    cdef uint16_t own
    cdef int rc
    cdef Layer *src
    while n > 0:
        if vaddr >= M.size:
            return nbd_push(P, vaddr, n, NULL)
        m = M.size - vaddr
        if m > n:
            m = n
        chunk = vaddr >> M.gbits
        rc = omap_block(M, chunk >> OMAP_BLOCK_BITS, &b)
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
            rc = nbd_push(P, vaddr, run, NULL)
        else:
            src = M.layers[0] if own == OWN_MIXED else M.layers[own]
            rc = nbd_collect(src, vaddr, run, P)
            if rc < 0 and rc != E_NBD_FALLBACK and src != M.layers[0]:
                copy_err(M.layers[0], src)
        if rc < 0:
            return rc
        vaddr += run
        n -= run
    return 0


cdef inline void put_be16(uint8_t *p, uint64_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 8)
    p[1] = <uint8_t>v


cdef inline void put_be32(uint8_t *p, uint64_t v) noexcept nogil:
    put_be16(p, v >> 16)
    put_be16(p + 2, v)


cdef inline void put_be64(uint8_t *p, uint64_t v) noexcept nogil:
    put_be32(p, v >> 32)
    put_be32(p + 4, v)


cdef int nbd_iov_data(iovec *iov, int k, int cap, const uint8_t *ptr, uint64_t n) noexcept nogil:
    """Add n bytes at ptr (NULL: zeros, from the shared zero buffer); returns the new count,
    or -1 when cap is reached."""
    cdef uint64_t step
    while n:
        if k == cap:
            return -1
        step = n
        if ptr == NULL and step > NBD_ZEROS:
            step = NBD_ZEROS
        iov[k].iov_base = <void *>(ptr if ptr != NULL else _nbd_zeros)
        iov[k].iov_len = step
        k += 1
        n -= step
        if ptr != NULL:
            ptr += step
    return k


cdef int nbd_send_all(int sock, iovec *iov, int k, int wait_ms) noexcept nogil:
    """Send the k buffers, waiting for room in the socket WAIT_MS milliseconds at most each
    time it is full, NBD_WAITS times at most (WAIT_MS -1: as long as it takes). Returns the number of buffers left (iov[0]
    advanced past what went out), or -errno."""
    cdef msghdr msg
    cdef ssize_t r
    cdef int i = 0, waits = 0
    cdef pollfd pfd
    memset(&msg, 0, sizeof(msg))
    while i < k:
        msg.msg_iov = iov + i
        msg.msg_iovlen = <size_t>(k - i if k - i < NBD_IOV_MAX else NBD_IOV_MAX)
        r = sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT)
        if r < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:          # (EWOULDBLOCK on Linux)
                pfd.fd = sock
                pfd.events = POLLOUT
                pfd.revents = 0
                if wait_ms >= 0:
                    waits += 1
                    if waits > NBD_WAITS or poll(&pfd, 1, wait_ms) == 0:
                        break            # still full after WAIT_MS, or full too often
                else:
                    poll(&pfd, 1, -1)
                continue
            return -errno
        while r > 0 and i < k:
            if <size_t>r >= iov[i].iov_len:
                r -= iov[i].iov_len
                i += 1
            else:
                iov[i].iov_base = <uint8_t *>iov[i].iov_base + r
                iov[i].iov_len -= r
                r = 0
    # left-justify what is left
    if i and i < k:
        memmove(iov, iov + i, (k - i) * sizeof(iovec))
    return k - i


ctypedef struct NbdReq:
    uint64_t cookie
    uint64_t offset
    uint64_t length
    uint64_t p0                         # its pieces: P.v[p0:p1]
    uint64_t p1
    int mode                            # 0 simple, 1 structured with holes, 2 one data chunk

DEF NBD_BATCH = 64                  # requests answered by one sendmsg at most
DEF NBD_BATCH_BYTES = 1 << 20       # and their payload bytes (one larger read goes alone)
#: For the server's Python side (engine.nbd.conn): the most read bytes one sendmsg answers.
nbd_batch_bytes = NBD_BATCH_BYTES


cdef int nbd_build(NbdPieces *P, NbdReq *q, iovec *iov, int k, int cap,
                   uint8_t **hp) noexcept nogil:
    """Append the reply to Q (headers at *hp, advanced; data pieces P.v[q.p0:q.p1]) to IOV
    from index K; returns the new count."""
    cdef uint8_t *h = hp[0]
    cdef uint64_t i
    cdef bint last
    if q.mode == 0:
        put_be32(h, NBD_REPLY_MAGIC)
        put_be32(h + 4, 0)
        put_be64(h + 8, q.cookie)
        iov[k].iov_base = h
        iov[k].iov_len = 16
        k += 1
        h += 16
        for i in range(q.p0, q.p1):
            k = nbd_iov_data(iov, k, cap, P.v[i].ptr, P.v[i].n)
    elif q.mode == 2:
        put_be32(h, NBD_CHUNK_MAGIC)
        put_be16(h + 4, NBD_CHUNK_DONE)
        put_be16(h + 6, NBD_CHUNK_DATA)
        put_be64(h + 8, q.cookie)
        put_be32(h + 16, 8 + q.length)
        put_be64(h + 20, q.offset)
        iov[k].iov_base = h
        iov[k].iov_len = 28
        k += 1
        h += 32
        for i in range(q.p0, q.p1):
            k = nbd_iov_data(iov, k, cap, P.v[i].ptr, P.v[i].n)
    else:
        for i in range(q.p0, q.p1):
            last = i == q.p1 - 1
            put_be32(h, NBD_CHUNK_MAGIC)
            put_be16(h + 4, NBD_CHUNK_DONE if last else 0)
            put_be64(h + 8, q.cookie)
            put_be64(h + 20, P.v[i].vaddr)
            iov[k].iov_base = h
            if P.v[i].ptr == NULL:
                put_be16(h + 6, NBD_CHUNK_HOLE)
                put_be32(h + 16, 12)
                put_be32(h + 28, P.v[i].n)
                iov[k].iov_len = 32
                k += 1
            else:
                put_be16(h + 6, NBD_CHUNK_DATA)
                put_be32(h + 16, 8 + P.v[i].n)
                iov[k].iov_len = 28
                iov[k + 1].iov_base = <void *>P.v[i].ptr
                iov[k + 1].iov_len = P.v[i].n
                k += 2
            h += 32
    hp[0] = h
    return k


cdef int nbd_replies(Layer *L, bint *is_open, int sock, NbdReq *R, int nreq, int wait_ms,
                     int *done, ErrInfo *err, int *serr) noexcept nogil:
    """Send the replies to the READs R[0:nreq] (see nbd_send_read) in one sendmsg while the
    socket takes them whole, under one hold of L's read lock. Stops before the first request
    the mappings cannot serve or whose lookup fails: *done is the number of replies sent (or
    whose send failed, *serr set to the errno). Returns 0, or, when not even the first could
    be served, E_NBD_FALLBACK or the layer error (in *err; nothing sent)."""
    cdef NbdPieces P
    cdef iovec *iov = NULL
    cdef uint8_t *hdr = NULL
    cdef uint8_t *rest = NULL
    cdef uint8_t *h
    cdef uint64_t i, total = 0, done_b, niov = 0
    cdef int k = 0, cap, left = 0, rc = 0, j, nok = 0
    P.v = NULL
    P.n = P.cap = P.floor = 0
    serr[0] = 0
    done[0] = 0
    pthread_rwlock_rdlock(&L.lock)
    if not is_open[0]:
        rc = E_CLOSED
    for j in range(nreq):
        if rc < 0:
            break
        if R[j].offset > L.size or L.size - R[j].offset < R[j].length:
            rc = E_RANGE
            break
        P.floor = P.n                   # no piece of this reply merges into the last one's
        R[j].p0 = P.n
        rc = nbd_collect(L, R[j].offset, R[j].length, &P)
        if rc < 0:
            break
        R[j].p1 = P.n
        niov += 2 * (P.n - R[j].p0) + R[j].length // NBD_ZEROS + 2
        nok += 1
    if nok == 0:
        if rc != E_NBD_FALLBACK:
            take_err(L, rc, err)
    else:
        rc = 0
        # worst case: a header and a data buffer per piece, plus zero-buffer splits
        cap = <int>niov
        iov = <iovec *>malloc(cap * sizeof(iovec))
        hdr = <uint8_t *>malloc(32 * (P.n + nok))
        if iov == NULL or hdr == NULL:
            rc = fail(L, E_NOMEM, "out of memory", 0)
            take_err(L, rc, err)
    if rc == 0 and nok:
        h = hdr
        for j in range(nok):
            k = nbd_build(&P, &R[j], iov, k, cap, &h)
        # a read-only top layer never moves its mapping: wait for the client as long as it
        # takes; a writable one waits a little, then the rest is copied out
        if wait_ms == -2:
            wait_ms = NBD_WAIT_MS if L.writable else -1
        left = nbd_send_all(sock, iov, k, wait_ms)
        done[0] = nok
        if left < 0:
            serr[0] = -left
            left = 0
        elif left:
            # the socket is full: copy out the rest, send it after the lock is released
            for i in range(<uint64_t>left):
                total += iov[i].iov_len
            rest = <uint8_t *>malloc(total)
            if rest == NULL:
                serr[0] = ENOMEM
            else:
                done_b = 0
                for i in range(<uint64_t>left):
                    memcpy(rest + done_b, iov[i].iov_base, iov[i].iov_len)
                    done_b += iov[i].iov_len
    pthread_rwlock_unlock(&L.lock)
    if rest != NULL and serr[0] == 0:
        iov[0].iov_base = rest
        iov[0].iov_len = total
        left = nbd_send_all(sock, iov, 1, -1)
        if left < 0:
            serr[0] = -left
    free(rest)
    free(iov)
    free(hdr)
    free(P.v)
    return rc


cdef int nbd_zeros_ready() except -1:
    global _nbd_zeros
    if _nbd_zeros == NULL:
        _nbd_zeros = <uint8_t *>calloc(NBD_ZEROS, 1)
        if _nbd_zeros == NULL:
            raise MemoryError()
    return 0


def nbd_send_read(CoreImage img not None, int sock, uint64_t offset, uint64_t length,
                  uint64_t cookie, int mode, int wait_ms=-2):
    """Send the reply to an NBD READ of [offset, offset+length) of IMG's disk on the
    connected socket SOCK (blocking mode), in one sendmsg when the socket takes it whole.
    MODE 0: a simple reply (zeros sent as data); 1: structured, zero ranges as OFFSET_HOLE
    chunks; 2: structured, one OFFSET_DATA chunk (the DF flag). The caller holds the
    connection's send lock and has checked the range. Returns False, having sent nothing,
    when the range cannot be sent from the mappings (compressed clusters, a layer read with
    pread): the caller then reads it into a buffer. Raises OSError when the socket fails
    (part of the reply may have gone out: the connection is broken) and the engine's error
    when a lookup fails (nothing sent)."""
    cdef int rc, serr = 0, done = 0
    cdef ErrInfo err
    cdef NbdReq q
    if not img._open:
        img._closed_error()
    nbd_zeros_ready()
    q.cookie = cookie
    q.offset = offset
    q.length = length
    q.mode = mode
    with nogil:
        rc = nbd_replies(&img.L, &img._open, sock, &q, 1, wait_ms, &done, &err, &serr)
    if rc == E_NBD_FALLBACK:
        return False
    if rc < 0:
        img._fail(rc, &err, offset, length)
    if serr:
        raise OSError(serr, "cannot send the reply")
    return True


cdef inline uint64_t get_be(const uint8_t *p, int n) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(n):
        v = (v << 8) | p[i]
    return v


cdef int nbd_flush_acks(int sock, uint8_t *acks, int *nacks) noexcept nogil:
    """Send the NACKS simple replies gathered in ACKS; 0 or an errno."""
    cdef iovec one
    cdef int left
    if nacks[0] == 0:
        return 0
    one.iov_base = acks
    one.iov_len = 16 * nacks[0]
    nacks[0] = 0
    left = nbd_send_all(sock, &one, 1, -1)
    return -left if left < 0 else 0


def nbd_serve_reads(CoreImage img not None, int sock, bytearray buf, Py_ssize_t start,
                    Py_ssize_t end, uint64_t size, int mode, uint64_t sparse_min,
                    uint64_t max_len, int max_requests, bint writes=False):
    """Serve a run of plain READ requests of one connection without the GIL: requests are
    parsed from BUF[start:end] (the connection's receive buffer; more is received into it
    without blocking), and each READ with no flags, of 1..MAX_LEN bytes, inside SIZE, is
    answered as nbd_send_read answers it (MODE 0 or 1; in mode 1 a read shorter than
    SPARSE_MIN goes as one data chunk, as mode 2). The replies to the reads that arrived
    together leave in one sendmsg (NBD_BATCH of them, NBD_BATCH_BYTES of data at most).
    With WRITES (the caller has made the checks of a write: a chain's lease), a WRITE with no
    flags that nbd_write_in_place can take is served too, and the replies of such writes
    that arrived together leave in one send, before the replies of any read after them.
    Stops before any other request, before a read the mappings cannot serve (or whose lookup
    fails: the caller serves it, or sends its error), before a write that must take the
    ordinary path, when no whole request can be had without waiting, or after MAX_REQUESTS.
    Returns (start, end, served, errno): the buffer's new window, the requests answered, and
    the errno of a failed send or receive (0: none; the connection is broken then)."""
    cdef uint8_t *b = <uint8_t *>(<char *>buf)
    cdef Py_ssize_t cap = len(buf), pos
    cdef ssize_t r
    cdef int rc, serr = 0, served = 0, n, done, nacks = 0
    cdef uint64_t flags_type, length, offset, nbytes, have
    cdef ErrInfo err
    cdef NbdReq R[NBD_BATCH]
    cdef uint8_t acks[16 * NBD_BATCH]
    if not img._open:
        img._closed_error()
    if not 0 <= start <= end <= cap:
        raise ValueError("the buffer window is outside the buffer")
    nbd_zeros_ready()
    with nogil:
        while served < max_requests:
            if end - start < 28:
                if start:
                    memmove(b, b + start, end - start)
                    end -= start
                    start = 0
                r = recv(sock, b + end, cap - end, MSG_DONTWAIT)
                if r < 0 and errno == EINTR:
                    continue
                if r <= 0:
                    break                 # nothing more now, EOF or an error: for the caller
                end += r
                continue
            if (writes and get_be(b + start, 4) == NBD_REQUEST_MAGIC
                    and get_be(b + start + 4, 4) == NBD_CMD_WRITE):
                # a small rewrite, straight into place; its reply joins the others
                offset = get_be(b + start + 16, 8)
                length = get_be(b + start + 24, 4)
                if offset > size or size - offset < length:
                    break
                have = <uint64_t>(end - start - 28)
                if have > length:
                    have = length
                if not nbd_write_in_place(&img.L, &img._open, sock, b + start + 28, have,
                                          offset, length, &serr):
                    break
                if serr:
                    break
                put_be32(acks + 16 * nacks, NBD_REPLY_MAGIC)
                put_be32(acks + 16 * nacks + 4, 0)
                memcpy(acks + 16 * nacks + 8, b + start + 8, 8)     # the cookie, as sent
                nacks += 1
                start += 28 + <Py_ssize_t>have
                served += 1
                if nacks == NBD_BATCH:
                    serr = nbd_flush_acks(sock, acks, &nacks)
                    if serr:
                        break
                continue
            # the batch: the plain reads that are here, in order
            n = 0
            nbytes = 0
            pos = start
            while (end - pos >= 28 and n < NBD_BATCH and served + n < max_requests
                   and get_be(b + pos, 4) == NBD_REQUEST_MAGIC):
                flags_type = get_be(b + pos + 4, 4)
                offset = get_be(b + pos + 16, 8)
                length = get_be(b + pos + 24, 4)
                if (flags_type != 0 or length == 0 or length > max_len or offset > size
                        or size - offset < length):
                    break                 # not a plain READ in range: for the caller
                if n and nbytes + length > NBD_BATCH_BYTES:
                    break
                R[n].cookie = get_be(b + pos + 8, 8)
                R[n].offset = offset
                R[n].length = length
                R[n].mode = 2 if mode == 1 and length < sparse_min else mode
                nbytes += length
                n += 1
                pos += 28
            if n == 0:
                break
            serr = nbd_flush_acks(sock, acks, &nacks)
            if serr:
                break
            done = 0
            rc = nbd_replies(&img.L, &img._open, sock, R, n, -2, &done, &err, &serr)
            start += 28 * done
            served += done
            if done < n or serr:
                break                     # the caller serves what is left (or its error)
        if serr == 0:
            serr = nbd_flush_acks(sock, acks, &nacks)
    if start == end:
        start = end = 0
    return start, end, served, serr


# --- NBD WRITE payloads received straight into place ------------------------------------------
#
# A WRITE that rewrites clusters the top layer already owns (allocated there with the COPIED
# flag: no copy-up, no allocation, no metadata change) takes its payload from the connection's
# receive buffer and the socket straight into the layer's mapping, with no buffer in between.
# The rule that keeps this as safe as the buffered path: the payload lands only once it has
# wholly arrived. Bytes still on their way are waited for before the layer's lock is taken
# (FIONREAD must count all of them), so a client that disconnects mid-payload leaves the image
# untouched, and a slow client never holds the lock. The stores are those of the ordinary
# rewrite (the same mapping, the same dirty flag, made durable by the next flush), so the crash
# rules and QEMU's locks are unchanged. Only small pieces go this way, as in store_pieces: a
# larger rewrite goes through a buffer and pwrite, which fills the page cache without a page
# fault per page (what a receive into the mapping would take).

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)
    unsigned long FIONREAD

DEF NBD_INPLACE_MAX = 16384             # as store_pieces: smaller stores go through the mapping
#: For the server's Python side: writes shorter than this may be received in place.
nbd_inplace_max = NBD_INPLACE_MAX


cdef int nbd_rewrite_host(Layer *L, uint64_t vaddr, uint64_t n, uint64_t *host) noexcept nogil:
    """1 and the host offset when [vaddr, vaddr+n) lies in one cluster the top layer owns
    (data, COPIED, not a preallocated zero cluster) that the mapping covers; 0 when not
    (a write that allocates, copies up, or needs pwrite); <0 on a lookup error."""
    cdef int rc, kind
    cdef uint64_t run, e
    if L.raw or L.ext_l2 or L.pread_data or L.base == NULL or not L.writable:
        return 0
    if (vaddr >> L.cluster_bits) != ((vaddr + n - 1) >> L.cluster_bits):
        return 0
    rc = resolve(L, vaddr, n, &kind, host, &run, &e)
    if rc < 0:
        return rc
    if kind != K_DATA or run < n or not (e & QCOW_OFLAG_COPIED) or e & QCOW_OFLAG_ZERO:
        return 0
    if host[0] + n > L.file_size or overlaps_meta(L, host[0], n):
        return 0                                # the ordinary path says what is wrong
    return 1


cdef int nbd_write_in_place(Layer *L, bint *is_open, int sock, const uint8_t *have_p,
                            uint64_t have, uint64_t offset, uint64_t length,
                            int *serr) noexcept nogil:
    """The in-place WRITE (see above): HAVE bytes of the payload at HAVE_P (the receive
    buffer), the rest from SOCK once FIONREAD counts it. Returns 1 when the write is done,
    0 when it must take the ordinary path (nothing consumed or written); *serr is set when
    the socket failed part-way (see nbd_recv_write)."""
    cdef uint64_t host = 0, got
    cdef int q = 0, rc = 0
    cdef ssize_t r
    serr[0] = 0
    if length == 0 or length >= NBD_INPLACE_MAX or have > length:
        return 0
    if have < length and (ioctl(sock, FIONREAD, &q) < 0 or <uint64_t>q < length - have):
        return 0                                # not all here yet: the ordinary path
    pthread_rwlock_wrlock(&L.lock)
    if is_open[0] and offset <= L.size and L.size - offset >= length:
        rc = nbd_rewrite_host(L, offset, length, &host)
    if rc == 1 and ensure_backed(L, host) == 0:
        memcpy(L.base + host, have_p, have)
        got = have
        while got < length:
            r = recv(sock, L.base + host + got, length - got, MSG_DONTWAIT)
            if r < 0 and errno == EINTR:
                continue
            if r <= 0:
                serr[0] = errno if r < 0 else 104      # ECONNRESET
                break
            got += <uint64_t>r
        L.data_dirty = 1
    else:
        rc = 0
    pthread_rwlock_unlock(&L.lock)
    return rc


def nbd_recv_write(CoreImage img not None, int sock, bytearray buf, Py_ssize_t start,
                   Py_ssize_t end, uint64_t offset, uint64_t length):
    """Take the payload of an NBD WRITE of LENGTH bytes at OFFSET straight into IMG's top
    layer when that is a rewrite of one cluster it owns and LENGTH is under NBD_INPLACE_MAX:
    the payload's first bytes from BUF[start:end] (the connection's receive buffer), the rest
    received from SOCK into the mapping, once FIONREAD counts all of it. Returns (start, end,
    taken): the buffer's new window and True when the write is done (not yet durable: as any
    write, until a flush), or the window unchanged and False, nothing consumed or written,
    when the write must take the ordinary path. Raises OSError when the socket fails after the
    payload was counted in it (the range may hold part of it then, as a torn write on a disk:
    the write is never acknowledged and the connection ends)."""
    cdef uint8_t *b = <uint8_t *>(<char *>buf)
    cdef Py_ssize_t cap = len(buf)
    cdef uint64_t have
    cdef int rc, serr = 0
    if not img._open:
        img._closed_error()
    if not 0 <= start <= end <= cap:
        raise ValueError("the buffer window is outside the buffer")
    have = <uint64_t>(end - start)
    if have > length:
        have = length
    with nogil:
        rc = nbd_write_in_place(&img.L, &img._open, sock, b + start, have, offset, length,
                                &serr)
    if serr:
        raise OSError(serr, "the WRITE payload did not arrive whole")
    if not rc:
        return start, end, False
    start += <Py_ssize_t>have
    if start == end:
        start = end = 0
    return start, end, True
