# Included by engine/_core.pyx (one compiled module); see the list of rooms there.

# --- bulk copy: guest runs of one chain into another image ------------------------------------
#
# The one copy loop of export/convert, import, clone, commit and pull (engine.ops).  Python
# hands over the runs it selected from block status and is called back once per chunk
# (progress, kill points) and once per zero run (the rule for writing zeros lives in
# engine.image).  Inside a chunk everything runs here without the GIL:
#
# - the chunk is split by layer_status (the one place runs are coalesced) into pieces that
#   each live in one layer's file, host-contiguous; such a piece is written from that layer's
#   mapping, with no copy into a buffer.  Pieces that do not (compressed clusters, pread-mode
#   files, data past the end of a file) are read with layer_read into a buffer.
# - with zero_block > 0 (a new destination, which reads zeros already), blocks of that size
#   (aligned to the guest offset) that hold only zero bytes are not written.
# - the writes use the destination's own write path (layer_write for qcow2: allocation,
#   refcounts and L2 updates as for any write; raw_pwrite for raw), all through the I/O shim
#   (fault kind "pwrite").  From a file into a raw destination, the blocks are shared
#   instead (FICLONERANGE: a reflink, no data copied) where the filesystem can (XFS, btrfs,
#   NFS 4.2); elsewhere (ext4, tmpfs, two filesystems) the first attempt says so and plain
#   writes follow.  copy_file_range is not used: where it cannot share blocks it copies in
#   the kernel, measured 10-20% slower than the write from the mapping (ext4).
# - every SYNC_STEP bytes, a helper thread starts writeback of what is written so far
#   (sync_file_range(SYNC_FILE_RANGE_WRITE), a hint that makes nothing durable), so the disk
#   writes while the copy goes on and the caller's final flush waits for the tail, not for
#   the whole copy; the copying thread never blocks in the block layer for it.
# - into a raw destination, two threads copy the two halves of each chunk (raw writes need
#   no lock of their own); into qcow2 one thread copies, as its writes hold the image's lock.

cdef extern from "<fcntl.h>" nogil:
    int sync_file_range(int fd, off_t offset, off_t nbytes, unsigned int flags)
    unsigned int SYNC_FILE_RANGE_WRITE

cdef extern from *:
    """
    #include <sys/ioctl.h>
    #include <stdint.h>
    struct cc_file_clone_range { int64_t src_fd; uint64_t src_offset, src_length, dest_offset; };
    #define CC_FICLONERANGE _IOW(0x94, 13, struct cc_file_clone_range)
    static int cc_clone_range(int src, uint64_t soff, uint64_t n, int dst, uint64_t doff) {
        struct cc_file_clone_range r = { src, soff, n, doff };
        return ioctl(dst, CC_FICLONERANGE, &r);
    }
    """
    int clone_range "cc_clone_range"(int src, uint64_t soff, uint64_t n, int dst,
                                     uint64_t doff) noexcept nogil

from posix.unistd cimport dup as c_dup

cdef extern from "<errno.h>" nogil:
    int EXDEV, ENOSYS, EBADF, ENOTTY, EPERM

cdef uint64_t SYNC_STEP = 64 << 20
cdef uint64_t WRITE_AHEAD = 256 << 10     # scanned bytes written at once (they are still cached)

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_cond_t:
        pass
    int pthread_cond_init(pthread_cond_t *, void *)
    int pthread_cond_destroy(pthread_cond_t *)
    int pthread_cond_wait(pthread_cond_t *, pthread_mutex_t *)
    int pthread_cond_signal(pthread_cond_t *)


ctypedef struct Flusher:
    int fd                  # a dup of the destination's descriptor (the flusher's own)
    pthread_mutex_t mu
    pthread_cond_t cv
    uint64_t asked          # writeback requests so far
    uint64_t done           # requests served
    int stop
    int running
    pthread_t th


cdef void *flusher_main(void *arg) noexcept nogil:
    """Start writeback of the whole file each time asked (requests that pile up while one
    runs are served by the next): the copying thread never waits for the block layer."""
    cdef Flusher *F = <Flusher *>arg
    cdef uint64_t g
    pthread_mutex_lock(&F.mu)
    while True:
        while F.asked == F.done and not F.stop:
            pthread_cond_wait(&F.cv, &F.mu)
        if F.asked == F.done:
            break
        g = F.asked
        pthread_mutex_unlock(&F.mu)
        sync_file_range(F.fd, 0, 0, SYNC_FILE_RANGE_WRITE)
        pthread_mutex_lock(&F.mu)
        F.done = g
    pthread_mutex_unlock(&F.mu)
    return NULL


cdef void flusher_ask(Flusher *F) noexcept nogil:
    if not F.running:
        sync_file_range(F.fd, 0, 0, SYNC_FILE_RANGE_WRITE)
        return
    pthread_mutex_lock(&F.mu)
    F.asked += 1
    pthread_cond_signal(&F.cv)
    pthread_mutex_unlock(&F.mu)


cdef void flusher_stop(Flusher *F) noexcept nogil:
    if F.running:
        pthread_mutex_lock(&F.mu)
        F.stop = 1
        pthread_cond_signal(&F.cv)
        pthread_mutex_unlock(&F.mu)
        pthread_join(F.th, NULL)
        F.running = 0


ctypedef struct CopyJob:
    Layer *S                # the source (top of its chain)
    Layer *D                # the destination
    uint8_t *buf            # chunk bytes, for pieces that are not written from a mapping
    uint64_t zb             # zero block: 0 writes every byte
    int clone               # a reflink may be tried (raw destination)
    uint64_t written        # bytes written as data
    uint64_t unsynced       # bytes written since writeback was last started
    uint64_t sync_step      # start writeback every this many bytes (0: never)
    Flusher *flusher
    int side                # where an error was recorded: 0 source, 1 destination


cdef inline bint is_zero(const uint8_t *p, uint64_t n) noexcept nogil:
    """Whether n bytes at p are all zero (the first 16 checked, then the rest against them)."""
    cdef uint64_t i
    if n <= 16:
        for i in range(n):
            if p[i]:
                return False
        return True
    for i in range(16):
        if p[i]:
            return False
    return memcmp(p, p + 16, n - 16) == 0


cdef inline int io_clone_range(int src_fd, uint64_t src_off, uint64_t n, int dst_fd,
                               uint64_t dst_off) noexcept nogil:
    if io_fault(IO_PWRITE):
        return -1
    return clone_range(src_fd, src_off, n, dst_fd, dst_off)


cdef int put_data(CopyJob *j, Layer *owner, uint64_t host, uint64_t vaddr, const uint8_t *p,
                  uint64_t n) noexcept nogil:
    """Write n bytes at guest vaddr of the destination from p; for a raw destination and
    bytes of a file (owner, at host offset), share the file's blocks instead where its
    filesystem can (a reflink)."""
    cdef Layer *D = j.D
    if n == 0:
        return 0                        # (a clone of length 0 would mean "to the end")
    j.written += n
    j.unsynced += n
    if not D.raw:
        return layer_write(D, vaddr, p, n)
    if j.clone and owner != NULL:
        if io_clone_range(owner.fd, host, n, D.fd, vaddr) == 0:
            D.data_dirty = 1
            return 0
        if errno == EOPNOTSUPP or errno == ENOTTY or errno == EXDEV or errno == ENOSYS or \
                errno == EBADF or errno == EPERM:
            j.clone = 0                 # no shared blocks between these files: writes
        elif errno != EINVAL:           # (EINVAL: this piece is not block-aligned)
            return fail_io(D, "write failed", vaddr)
    return raw_pwrite(D, vaddr, p, n)


cdef int put_nonzero(CopyJob *j, Layer *owner, uint64_t host, uint64_t vaddr, const uint8_t *p,
                     uint64_t n) noexcept nogil:
    """put_data for every run of blocks of [p, p+n) that is not all zeros (j.zb > 0), or for
    all of it (j.zb == 0). Blocks are aligned to the guest offset."""
    cdef uint64_t zb = j.zb, pos = 0, blk, run_start
    cdef int rc, in_run = 0
    if zb == 0:
        return put_data(j, owner, host, vaddr, p, n)
    run_start = 0
    while pos < n:
        blk = zb - ((vaddr + pos) & (zb - 1))
        if blk > n - pos:
            blk = n - pos
        if in_run and pos - run_start >= WRITE_AHEAD:
            # write what was scanned while it is still in the CPU cache
            rc = put_data(j, owner, host + run_start, vaddr + run_start, p + run_start,
                          pos - run_start)
            if rc < 0:
                return rc
            run_start = pos
        if is_zero(p + pos, blk):
            if in_run and pos > run_start:
                rc = put_data(j, owner, host + run_start, vaddr + run_start, p + run_start,
                              pos - run_start)
                if rc < 0:
                    return rc
            in_run = 0
        elif not in_run:
            run_start = pos
            in_run = 1
        pos += blk
    if in_run:
        return put_data(j, owner, host + run_start, vaddr + run_start, p + run_start,
                        n - run_start)
    return 0


cdef inline Layer *layer_at(Layer *L, uint64_t depth) noexcept nogil:
    while depth and L != NULL:
        L = L.backing
        depth -= 1
    return L


cdef int copy_chunk(CopyJob *j, uint64_t vaddr, uint64_t n) noexcept nogil:
    """Copy guest [vaddr, vaddr+n) of the source into the destination (the caller holds the
    locks). Errors are recorded on the side j.side names."""
    cdef RunBuf rb
    cdef uint64_t i, start, length, flags, host
    cdef uint64_t *r
    cdef Layer *owner
    cdef const uint8_t *p
    cdef int rc = 0
    rb.v = NULL
    rb.n = rb.cap = 0
    j.side = 0
    rc = layer_status(j.S, vaddr, n, 0, &rb)
    i = 0
    while rc == 0 and i < rb.n:
        r = rb.v + i * 5
        start = r[0]
        length = r[1]
        flags = r[3]
        host = r[4]
        i += 1
        owner = NULL
        if (flags & F_DATA) and (flags & F_OFFSET) and not (flags & F_COMPRESSED):
            owner = layer_at(j.S, r[2])
            if (owner == NULL or owner.pread_data or owner.base == NULL or
                    host >= owner.file_size or owner.file_size - host < length):
                owner = NULL
        if owner != NULL:
            p = owner.base + host
            advise_read(owner, host, length)
            if j.zb == 0 and length >= 16384:
                prefault(p, length)         # is_zero touches the pages otherwise
        elif j.zb and not (flags & F_DATA):
            continue                        # reads as zeros: a new destination has them
        else:
            j.side = 0
            rc = layer_read(j.S, start, j.buf, length)
            if rc < 0:
                break
            p = j.buf
        j.side = 1
        rc = put_nonzero(j, owner, host, start, p, length)
    free(rb.v)
    if rc == 0 and j.sync_step and j.unsynced >= j.sync_step:
        # start writeback of what is written; durability stays with the caller's flush
        flusher_ask(j.flusher)
        j.unsynced = 0
    return rc


ctypedef struct Half:
    CopyJob *j
    uint64_t vaddr
    uint64_t n
    int rc


cdef void *half_main(void *arg) noexcept nogil:
    cdef Half *h = <Half *>arg
    h.rc = copy_chunk(h.j, h.vaddr, h.n)
    return NULL


cdef int copy_chunk_2(CopyJob *j, CopyJob *j2, uint64_t vaddr, uint64_t n) noexcept nogil:
    """copy_chunk with the upper half of the chunk on a second thread (a raw destination:
    its writes need no lock of their own; the caller holds both images' locks for the two
    threads). The halves' byte counts are merged into j; an error of either is returned,
    the lower half's first."""
    cdef Half h
    cdef pthread_t th
    cdef uint64_t half = (n // 2) & ~(<uint64_t>(1 << 20) - 1)
    cdef int rc
    if half == 0:
        return copy_chunk(j, vaddr, n)
    j2.written = j2.unsynced = 0
    j2.clone = j.clone
    h.j = j2
    h.vaddr = vaddr + half
    h.n = n - half
    if pthread_create(&th, NULL, half_main, &h) != 0:
        rc = copy_chunk(j, vaddr, n)
    else:
        rc = copy_chunk(j, vaddr, half)
        pthread_join(th, NULL)
        j.written += j2.written
        j.clone = j.clone and j2.clone
        if rc == 0 and h.rc < 0:
            rc = h.rc
            j.side = j2.side
    return rc


def copy_runs(CoreImage dst not None, CoreImage src not None, runs, uint64_t zero_block=0,
              uint64_t chunk=8 << 20, step=None):
    """Copy guest runs of ``src`` (read through its chain) into ``dst`` at the same offsets.

    runs: (n, 3) array-like of (start, length, zero), in guest order.  Data runs are copied
    here, at most ``chunk`` bytes per step, without the GIL; zero runs are only handed to
    ``step(start, length, True)`` (the caller writes them: the zero rule of each format lives
    in engine.image).  After each data chunk, ``step(start, length, False)``; an exception
    from step stops the copy and is raised as it is.  With ``zero_block`` (a power of two;
    the destination is new and reads zeros), all-zero blocks are not written.  Returns the
    bytes written as data.  Nothing is flushed: the caller's flush makes the copy durable."""
    cdef CopyJob j, j2
    cdef Flusher F
    cdef cnp.ndarray arr
    cdef const uint64_t *rv
    cdef uint64_t i, k, start, length, pos, end, m
    cdef int rc = 0
    cdef ErrInfo err
    cdef bint same = dst is src
    cdef bint two
    dst._check_writable()
    src._check_open()
    if zero_block & (zero_block - 1):
        from engine.errors import InvalidArgument
        raise InvalidArgument(f"zero_block {zero_block} is not a power of two", value=zero_block)
    if chunk == 0:
        chunk = 8 << 20
    arr = np.ascontiguousarray(np.asarray(runs, dtype=np.uint64).reshape(-1, 3))
    k = <uint64_t>arr.shape[0]
    rv = <const uint64_t *>cnp.PyArray_DATA(arr)
    for i in range(k):
        start = rv[i * 3]
        length = rv[i * 3 + 1]
        if start > src.L.size or src.L.size - start < length:
            src._range_error(start, length)
        if start > dst.L.size or dst.L.size - start < length:
            dst._range_error(start, length)
    memset(&j, 0, sizeof(CopyJob))
    memset(&j2, 0, sizeof(CopyJob))
    j.S = &src.L
    j.D = &dst.L
    j.zb = zero_block
    j.clone = dst.L.raw
    j.sync_step = SYNC_STEP
    # Two copying threads into a raw destination (measured on a shared 2-CPU machine: 0.93 s
    # against 1.55 s for 1 GiB); one into qcow2, whose writes hold the image's lock.  Not
    # while a fault is armed: the shim's call counts must name one call.
    two = dst.L.raw and not same and fault_op < 0
    j.buf = <uint8_t *>malloc(chunk)
    j2.buf = <uint8_t *>malloc(chunk) if two else NULL
    if j.buf == NULL or (two and j2.buf == NULL):
        free(j.buf)
        free(j2.buf)
        raise MemoryError()
    memset(&F, 0, sizeof(Flusher))
    F.fd = c_dup(dst.L.fd)
    pthread_mutex_init(&F.mu, NULL)
    pthread_cond_init(&F.cv, NULL)
    j.flusher = &F
    if two:
        j2.S, j2.D, j2.zb, j2.sync_step, j2.flusher = j.S, j.D, j.zb, j.sync_step, j.flusher
    if F.fd >= 0 and pthread_create(&F.th, NULL, flusher_main, &F) == 0:
        F.running = 1
    try:
        for i in range(k):
            start = rv[i * 3]
            length = rv[i * 3 + 1]
            if rv[i * 3 + 2]:
                if step is not None:
                    step(start, length, True)
                continue
            pos = start
            end = start + length
            while pos < end:
                m = end - pos
                if m > chunk:
                    m = chunk
                with nogil:
                    # reads and writes under the locks: the source's shared (unless it is the
                    # destination itself: a pull reads its own backing chain), then ours
                    if not same:
                        pthread_rwlock_rdlock(&src.L.lock)
                    pthread_rwlock_wrlock(&dst.L.lock)
                    if not (src._open and dst._open):
                        rc = E_CLOSED
                    else:
                        if two:
                            rc = copy_chunk_2(&j, &j2, pos, m)
                        else:
                            rc = copy_chunk(&j, pos, m)
                        if rc < 0:
                            take_err(j.D if j.side else j.S, rc, &err)
                    pthread_rwlock_unlock(&dst.L.lock)
                    if not same:
                        pthread_rwlock_unlock(&src.L.lock)
                if rc < 0:
                    if rc == E_CLOSED:
                        (src if not src._open else dst)._closed_error()
                    (dst if j.side else src)._fail(rc, &err, pos, m)
                if step is not None:
                    step(pos, m, False)
                pos += m
    finally:
        with nogil:
            flusher_stop(&F)
        pthread_cond_destroy(&F.cv)
        pthread_mutex_destroy(&F.mu)
        if F.fd >= 0:
            c_close(F.fd)
        free(j.buf)
        free(j2.buf)
    return j.written
