# cython: language_level=3
"""The hot path of cowchain: QCOW2 cluster lookup, reads and writes over memory-mapped files.

This module knows bytes and clusters; image.py knows files, headers and policy.  Everything
per cluster runs here in C with the GIL released; Python is crossed once per request.

Data path (docs/architecture.md, "The data path"):

- Each file is mapped once with a reserved length larger than the file; the file grows by
  io_fallocate() before a byte of the new range is touched, so a full disk is a clean ENOSPC, not
  a SIGBUS.  Ranges below the size at open may be sparse (QEMU punches holes): the first write
  into such a cluster fallocates it first (bitmap ``backed``).
- Every table pointer read from the file is checked against the file size before use.

Refcount and write-ordering rules (QEMU's invariant: the on-disk refcount is never lower than
the number of references; a crash may leak, never corrupt):

1. refcount_bits is 1..64 (order 0..6); a refcount never wraps: raising past rc_max is an
   error (E_LIMIT); lowering from 0 is corruption (E_CORRUPT).
2. Raising a refcount is written to the mapping at once (a premature raise only leaks).
3. L2 changes go to a private dirty copy of the table (l2_cache), never to the mapping, until
   writeback; the L1 is a private array, written back last.
4. Writeback (flush): fdatasync [new data, raised refcounts] -> copy dirty L2 tables into the
   mapping -> fdatasync if a new L2 table must be durable before the L1 points to it -> write
   the L1 -> fdatasync -> lower the refcounts of clusters that lost their last reference
   (pend_free) -> fdatasync.
5. A new refblock is written and synced before the reftable entry that points to it; a grown
   reftable is synced before the header points to it, and the old one is freed after.

Thread model: readers of one image may run on many threads at once; writers exclude readers
and each other (a pthread rwlock on the top image).  Volumes below the top are immutable.
Closing and swapping in a re-read state (CoreImage.close, adopt) hold the same lock
exclusively, and every entry point checks under it that the image is still open.  Errors are
copied out of the shared Layer fields before the lock is dropped (ErrInfo).
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memset, memcmp
from libc.stdlib cimport malloc, calloc, free, realloc
from libc.errno cimport errno, ENOMEM, EINVAL, ENOSPC, EOPNOTSUPP, EINTR
from posix.unistd cimport close as c_close, ftruncate, fdatasync, lseek, pwrite, pread
from posix.types cimport off_t

cimport numpy as cnp
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE,
                             PyBUF_C_CONTIGUOUS)
import numpy as np

cnp.import_array()

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
    int munmap(void *addr, size_t length)
    void *mremap(void *old_address, size_t old_size, size_t new_size, int flags, ...)
    int madvise(void *addr, size_t length, int advice)
    int mincore(void *addr, size_t length, unsigned char *vec)
    int MADV_RANDOM, MADV_WILLNEED
    int PROT_READ, PROT_WRITE, MAP_SHARED, MAP_NORESERVE, MREMAP_MAYMOVE
    void *MAP_FAILED

cdef extern from *:
    """
    #define cc_atomic_load_ptr(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
    #define cc_atomic_store_ptr(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
    #define cc_prefetch(p) __builtin_prefetch((p), 0, 3)
    #define cc_ld64(p) __atomic_load_n((p), __ATOMIC_RELAXED)
    #define cc_st64(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
    """
    uint64_t ld64 "cc_ld64"(uint64_t *p) noexcept nogil
    void st64 "cc_st64"(uint64_t *p, uint64_t v) noexcept nogil
    void prefetch "cc_prefetch"(const void *p) noexcept nogil
    uint16_t *atomic_load_ptr "cc_atomic_load_ptr"(uint16_t **p) noexcept nogil
    void atomic_store_ptr "cc_atomic_store_ptr"(uint16_t **p, uint16_t *v) noexcept nogil

cdef extern from "<fcntl.h>" nogil:
    int fallocate(int fd, int mode, off_t offset, off_t len)
    int FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE

cdef extern from "<unistd.h>" nogil:
    int SEEK_DATA, SEEK_HOLE

# --- Error codes (the one translation point is _raise_layer_error) --------------------------
DEF E_OK = 0
DEF E_IO = -1          # err_errno holds the OS error
DEF E_CORRUPT = -2     # err_msg, err_offset
DEF E_NOMEM = -3
DEF E_UNSUPPORTED = -4
DEF E_LIMIT = -5
DEF E_PYERR = -6       # a Python callback raised: the exception waits in _pending (per thread)
DEF E_CLOSED = -7      # the image was closed (checked under the lock)
DEF E_RANGE = -8       # the request reaches past the end of the disk

# --- QCOW2 entry layout (qcow2.txt "Cluster mapping"; docs/on-disk.md section 4) ------------

cdef extern from *:
    """
    #define CC_L1E_OFFSET_MASK ((uint64_t)0x00fffffffffffe00ULL)
    #define CC_L1E_RESERVED ((uint64_t)0x7f000000000001ffULL)
    #define CC_L2E_OFFSET_MASK ((uint64_t)0x00fffffffffffe00ULL)
    #define CC_L2E_RESERVED ((uint64_t)0x3f000000000001feULL)
    #define CC_QCOW_OFLAG_COPIED ((uint64_t)0x8000000000000000ULL)
    #define CC_QCOW_OFLAG_COMPRESSED ((uint64_t)0x4000000000000000ULL)
    #define CC_QCOW_OFLAG_ZERO ((uint64_t)0x1ULL)
    #define CC_RT_OFFSET_MASK ((uint64_t)0xfffffffffffffe00ULL)
    #define CC_RT_RESERVED ((uint64_t)0x1ffULL)
    #define CC_MAX_CLUSTER_OFFSET ((uint64_t)0x0100000000000000ULL)
    """
    const uint64_t L1E_OFFSET_MASK "CC_L1E_OFFSET_MASK"
    const uint64_t L1E_RESERVED "CC_L1E_RESERVED"
    const uint64_t L2E_OFFSET_MASK "CC_L2E_OFFSET_MASK"
    const uint64_t L2E_RESERVED "CC_L2E_RESERVED"
    const uint64_t QCOW_OFLAG_COPIED "CC_QCOW_OFLAG_COPIED"
    const uint64_t QCOW_OFLAG_COMPRESSED "CC_QCOW_OFLAG_COMPRESSED"
    const uint64_t QCOW_OFLAG_ZERO "CC_QCOW_OFLAG_ZERO"
    const uint64_t RT_OFFSET_MASK "CC_RT_OFFSET_MASK"
    const uint64_t RT_RESERVED "CC_RT_RESERVED"
    const uint64_t MAX_CLUSTER_OFFSET "CC_MAX_CLUSTER_OFFSET"

# Cluster kinds as the resolver reports them.
DEF K_UNALLOC = 0
DEF K_ZERO = 1          # reads as zeros (ZERO_PLAIN, or ZERO_ALLOC: host set too)
DEF K_DATA = 2
DEF K_COMPRESSED = 3

# Map flags (extents), same meaning as qemu-img map's JSON booleans.
DEF F_PRESENT = 1
DEF F_ZERO = 2
DEF F_DATA = 4
DEF F_OFFSET = 8
DEF F_COMPRESSED = 16

DEF MAX_DEPTH = 4096

# Write modes
DEF W_DATA = 0
DEF W_ZEROBYTES = 1

# Zero/discard modes
DEF Z_DISCARD = 0
DEF Z_ZERO_UNMAP = 1
DEF Z_ZERO_KEEP = 2

cdef uint64_t LOW32 = 0xffffffff
cdef uint64_t GROW_MIN = 1 << 20
cdef uint64_t GROW_MAX = 64 << 20
cdef uint64_t L2_CACHE_LIMIT_BYTES = 256 << 20

# --- errors ---------------------------------------------------------------------------------

cdef inline int fail(Layer *L, int code, const char *msg, uint64_t off) noexcept nogil:
    L.err_code = code
    L.err_msg = msg
    L.err_offset = off
    L.err_layer = L
    return code

cdef inline void copy_err(Layer *dst, Layer *src) noexcept nogil:
    """Hand an error recorded on a lower layer up to the layer the caller asked; err_layer
    keeps naming the layer where it happened."""
    dst.err_code = src.err_code
    dst.err_errno = src.err_errno
    dst.err_msg = src.err_msg
    dst.err_offset = src.err_offset
    dst.err_layer = src.err_layer if src.err_layer != NULL else src


# An error as the caller's thread saw it, copied out of the shared Layer fields while the
# lock is still held (another thread may record its own error on the same layer after).
ctypedef struct ErrInfo:
    int code
    int eno
    const char *msg
    uint64_t off
    Layer *layer

cdef inline int take_err(Layer *L, int rc, ErrInfo *e) noexcept nogil:
    e.code = rc
    e.eno = L.err_errno
    e.msg = L.err_msg
    e.off = L.err_offset
    e.layer = L.err_layer if L.err_layer != NULL else L
    return rc


cdef inline int fail_io(Layer *L, const char *msg, uint64_t off) noexcept nogil:
    L.err_errno = errno
    return fail(L, E_IO, msg, off)



# --- test seams: I/O shim, named hooks, barrier callback (docs/reliability.md C1) --------------
#
# Every OS call that can fail on the write path goes through io_*: a counter per call kind and
# an optional injected fault (fail the n-th call, once or from then on, with an errno).  Hooks
# sit between the steps of each metadata transition; armed, they raise EIO or SIGKILL the
# process.  The barrier callback sees every successful sync.  Unused, each costs a branch.

cdef extern from *:
    """
    #include <errno.h>
    static inline void cc_set_errno(int e) { errno = e; }
    """
    void set_errno "cc_set_errno"(int e) noexcept nogil

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t pwritev(int fd, const iovec *iov, int cnt, off_t off)

cdef extern from "<signal.h>" nogil:
    int kill(int pid, int sig)
    int SIGKILL
cdef extern from "<unistd.h>" nogil:
    int getpid()

DEF N_IO = 5
DEF IO_SYNC = 0
DEF IO_FALLOCATE = 1
DEF IO_FTRUNCATE = 2
DEF IO_PWRITE = 3
DEF IO_MREMAP = 4
IO_NAMES = ("sync", "fallocate", "ftruncate", "pwrite", "mremap")

cdef uint64_t io_calls[N_IO]
cdef int fault_op = -1
cdef uint64_t fault_nth = 0
cdef int fault_errno = 0
cdef int fault_persistent = 0
cdef uint64_t fault_hits = 0

HOOK_NAMES = (
    "cluster_alloc",          # refcount of a new cluster raised
    "refblock_alloc",         # new refblock written and synced, reftable entry not yet
    "reftable_written",       # grown reftable written and synced, header not yet switched
    "reftable_switched",      # header points at the new reftable, old one not yet freed
    "l2_alloc",               # a new L2 table allocated (in the cache)
    "cow_read",               # copy-up source read, new cluster not yet written
    "cow_write",              # new cluster written, L2 entry not yet updated
    "wb_data_synced",         # writeback: data and refcounts durable, L2 not written back
    "wb_l2_written",          # writeback: L2 tables in the page cache, L1 not yet
    "wb_l1_written",          # writeback: L1 written, not yet synced
    "wb_synced",              # writeback: tables durable, frees not yet applied
    "wb_frees_applied",       # writeback: refcounts of freed clusters lowered, not synced
    "l1_grow_written",        # resize: new L1 written and synced, header not switched
    "l1_grow_switched",       # resize: header points at the new L1, old not freed
)
DEF N_HOOKS = 14
cdef uint64_t hook_hits[N_HOOKS]
cdef int hook_armed = -1
cdef uint64_t hook_nth = 0
cdef int hook_action = 0          # 1: fail with EIO, 2: SIGKILL
cdef object _barrier_cb = None
cdef int have_barrier_cb = 0


cdef inline int io_fault(int op) noexcept nogil:
    global fault_hits
    io_calls[op] += 1
    if fault_op == op and (io_calls[op] == fault_nth or (fault_persistent and io_calls[op] > fault_nth)):
        fault_hits += 1
        set_errno(fault_errno)
        return 1
    return 0


cdef int barrier_notify(int fd) noexcept with gil:
    try:
        _barrier_cb(fd)
    except BaseException:
        pass
    return 0


cdef inline int io_sync(Layer *L) noexcept nogil:
    """The one durability barrier. A failure is sticky (D4): after it every sync of this
    image fails, because the kernel may have dropped the dirty pages it could not write."""
    cdef int e
    if L.sticky_errno:
        set_errno(L.sticky_errno)
        return -1
    if io_fault(IO_SYNC):
        L.sticky_errno = errno
        return -1
    # msync is not needed on Linux: fdatasync writes back pages dirtied through a shared
    # mapping too (they are marked dirty at fault time), which is what msync(MS_SYNC) does.
    if fdatasync(L.fd) != 0:
        e = errno
        L.sticky_errno = e if e else 5
        set_errno(L.sticky_errno)
        return -1
    if have_barrier_cb:
        barrier_notify(L.fd)
    return 0


cdef inline int io_fallocate(int fd, int mode, off_t off, off_t n) noexcept nogil:
    if io_fault(IO_FALLOCATE):
        return -1
    return fallocate(fd, mode, off, n)


cdef inline int io_ftruncate(int fd, off_t n) noexcept nogil:
    if io_fault(IO_FTRUNCATE):
        return -1
    return ftruncate(fd, n)


cdef inline ssize_t io_pwrite(int fd, const void *p, size_t n, off_t off) noexcept nogil:
    if io_fault(IO_PWRITE):
        return -1
    return pwrite(fd, p, n, off)


cdef inline ssize_t io_pwritev(int fd, const iovec *iov, int cnt, off_t off) noexcept nogil:
    if io_fault(IO_PWRITE):
        return -1
    return pwritev(fd, iov, cnt, off)


cdef inline void *io_mremap(void *p, size_t old, size_t new, int flags) noexcept nogil:
    if io_fault(IO_MREMAP):
        return MAP_FAILED
    return mremap(p, old, new, flags)


cdef inline int hook(Layer *L, int hid) noexcept nogil:
    hook_hits[hid] += 1
    if hook_armed == hid and hook_hits[hid] == hook_nth:
        if hook_action == 2:
            kill(getpid(), SIGKILL)
        set_errno(5)    # EIO
        return fail_io(L, "injected fault at a hook point", 0)
    return 0


def set_fault(op, nth=1, err=5, persistent=False):
    """Fail the nth call (counted from now) of I/O kind op ('sync', 'fallocate', 'ftruncate',
    'pwrite', 'mremap') with errno err; persistent: that call and every later one.
    op None disarms. Test seam."""
    global fault_op, fault_nth, fault_errno, fault_persistent, fault_hits
    cdef int i
    for i in range(N_IO):
        io_calls[i] = 0
    fault_hits = 0
    if op is None:
        fault_op = -1
        return
    fault_op = IO_NAMES.index(op)
    fault_nth = nth
    fault_errno = err
    fault_persistent = 1 if persistent else 0


def fault_stats():
    """(calls per I/O kind since set_fault, injected faults delivered)."""
    return {IO_NAMES[i]: io_calls[i] for i in range(N_IO)}, fault_hits


def arm_hook(name, nth=1, action="error"):
    """Arm hook `name` to fail ('error') or SIGKILL ('kill') on its nth hit from now; None
    disarms. Test seam; also set from COWCHAIN_HOOK=name:nth:action at import."""
    global hook_armed, hook_nth, hook_action
    cdef int i
    for i in range(N_HOOKS):
        hook_hits[i] = 0
    if name is None:
        hook_armed = -1
        return
    hook_armed = HOOK_NAMES.index(name)
    hook_nth = nth
    hook_action = 2 if action == "kill" else 1


def hook_counts():
    """Hits per hook since the last arm_hook/reset."""
    return {HOOK_NAMES[i]: hook_hits[i] for i in range(N_HOOKS)}


def set_barrier_callback(fn):
    """Call fn(fd) after every successful sync (None: off). Test seam for the power-loss
    simulator: the file's content at that moment is durable."""
    global _barrier_cb, have_barrier_cb
    _barrier_cb = fn
    have_barrier_cb = 1 if fn is not None else 0


def _arm_from_env():
    import os
    spec = os.environ.get("COWCHAIN_HOOK")
    if spec:
        name, nth, action = (spec.split(":") + ["1", "kill"])[:3]
        arm_hook(name, int(nth), action)


# The same shim for the metadata engine.image and engine.check write from Python (header
# rewrites, repairs): the same counters and injected faults, the same barrier callback, so the
# fault matrix and the power-loss recorder see every write the engine makes.  Each raises
# OSError(errno); the caller turns it into an EngineError.

def meta_pwrite(int fd, const uint8_t[::1] data, uint64_t offset):
    """pwrite all of ``data`` at ``offset`` (retrying short writes) through the shim."""
    cdef Py_ssize_t n = data.shape[0]
    cdef Py_ssize_t done = 0
    cdef ssize_t w
    cdef int e = 0
    if n == 0:
        return
    with nogil:
        while done < n:
            w = io_pwrite(fd, &data[done], <size_t>(n - done), <off_t>(offset + <uint64_t>done))
            if w < 0:
                if errno == EINTR:
                    continue
                e = errno if errno else 5
                break
            if w == 0:
                e = 5
                break
            done += w
    if e:
        import os
        raise OSError(e, os.strerror(e))


def meta_sync(int fd):
    """fdatasync ``fd`` through the shim (fault kind "sync"); the barrier callback sees it."""
    cdef int e = 0
    with nogil:
        if io_fault(IO_SYNC):
            e = errno if errno else 5
        elif fdatasync(fd) != 0:
            e = errno if errno else 5
    if e:
        import os
        raise OSError(e, os.strerror(e))
    if have_barrier_cb:
        barrier_notify(fd)


def meta_ftruncate(int fd, uint64_t size):
    """ftruncate ``fd`` to ``size`` bytes through the shim."""
    cdef int e = 0
    with nogil:
        if io_ftruncate(fd, <off_t>size) != 0:
            e = errno if errno else 5
    if e:
        import os
        raise OSError(e, os.strerror(e))


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
    rc = hook(L, 2)
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
    return hook(L, 3)


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
    rc = hook(L, 1)
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
    rc = hook(L, 0)
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
    entry[0] = e
    if e & QCOW_OFLAG_COMPRESSED:
        if bm != 0:
            return fail(L, E_CORRUPT, "compressed extended L2 entry with a non-zero bitmap", vaddr)
        kind[0] = K_COMPRESSED
        host[0] = 0
        n = C - in_off
        run[0] = n if n < maxlen else maxlen
        return 0
    if e & (L2E_RESERVED | QCOW_OFLAG_ZERO):
        return fail(L, E_CORRUPT, "reserved bits set in an extended L2 entry", ci << L.cluster_bits)
    if off != 0 and ((off & (C - 1)) or off >= L.file_size):
        return fail(L, E_CORRUPT, "data cluster offset unaligned or past the end of the file", off)
    if (bm & LOW32) & (bm >> 32):
        return fail(L, E_CORRUPT, "subcluster both allocated and zero", ci << L.cluster_bits)
    if off == 0 and (bm & LOW32):
        return fail(L, E_CORRUPT, "allocated subclusters without a host cluster", ci << L.cluster_bits)
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
            rc = hook(L, 4)
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
    rc = hook(L, 7)
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
        rc = hook(L, 8)
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
        rc = hook(L, 9)
        if rc < 0:
            return rc
    if io_sync(L) != 0:
        return fail_io(L, "sync failed", 0)
    rc = hook(L, 10)
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
        rc = hook(L, 11)
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


cdef int store_pieces(Layer *L, uint64_t host, iovec *iov, int cnt, uint64_t n) noexcept nogil:
    """Store n bytes, given as pieces (iov_base NULL: zeros), at a host offset inside one
    cluster. Stores of 16 KiB and more go in one pwritev: write() fills the page cache without
    a page fault (and, on most filesystems, a page_mkwrite call) per page of the mapping, and
    stays coherent with it. Smaller ones, and zeros alone, go through the mapping."""
    cdef int rc, i
    cdef ssize_t w
    cdef uint64_t pos = host
    if overlaps_meta(L, host, n):
        return fail(L, E_CORRUPT, "data cluster overlaps image metadata", host)
    rc = ensure_backed(L, host)
    if rc < 0:
        return rc
    if n < 16384 or (cnt == 1 and iov[0].iov_base == NULL):
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
        rc = hook(L, 5)
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
        rc = hook(L, 5)
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
                rc = hook(L, 6)
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


# --- the Python-facing handle -------------------------------------------------------------------

cdef extern from "<sys/vfs.h>" nogil:
    struct statfs:
        long f_type
    int fstatfs(int fd, statfs *buf)


cdef int _on_tmpfs(int fd) noexcept:
    cdef statfs st
    if fstatfs(fd, &st) != 0:
        return 0
    return st.f_type == 0x01021994      # TMPFS_MAGIC


# --- arguments: offsets and lengths follow engine.format.int_arg ------------------------------

cdef object _int_arg = None


cdef object int_arg(object value, object what):
    """engine.format.int_arg (the one rule for integer arguments), imported on first use."""
    global _int_arg
    if _int_arg is None:
        from engine.format import int_arg as f
        _int_arg = f
    return _int_arg(value, what)


def as_offsets(offsets, path=None):
    """The offsets of a batch (readv, writev) as a C-contiguous uint64 array: a 1-D numpy
    array of an integer dtype, or a sequence of values that each pass int_arg."""
    from engine.errors import InvalidArgument
    if isinstance(offsets, np.ndarray):
        if offsets.dtype.kind not in "iu" or offsets.ndim != 1:
            raise InvalidArgument(f"offsets must be a 1-D array of an integer dtype, not a "
                                  f"{offsets.ndim}-D {offsets.dtype} array", value=offsets,
                                  path=path)
        if offsets.dtype.kind == "i" and offsets.size and offsets.min() < 0:
            bad = int(offsets[np.flatnonzero(offsets < 0)[0]])
            raise InvalidArgument(f"offset {bad} is negative", value=bad, path=path)
        return np.ascontiguousarray(offsets, dtype=np.uint64)
    if isinstance(offsets, (str, bytes, bytearray, memoryview)):
        seq = None
    else:
        try:
            seq = list(offsets)
        except TypeError:
            seq = None
    if seq is None:
        raise InvalidArgument(f"offsets must be a sequence or array of integers, not "
                              f"{type(offsets).__name__}", value=offsets, path=path)
    if not seq:
        return np.empty(0, dtype=np.uint64)
    if set(map(type, seq)) == {int}:
        arr = np.array(seq)
        if arr.dtype.kind in "iu":
            return as_offsets(arr, path)
    return np.array([int_arg(x, "offset") for x in seq], dtype=np.uint64)


cdef void swap_layers(Layer *a, Layer *b) noexcept nogil:
    """Exchange the state of two layers, all but their locks (a lock is never moved)."""
    cdef Layer t
    cdef size_t lo = <size_t>(<char *>&a.lock - <char *>a)
    cdef size_t hi = lo + sizeof(pthread_rwlock_t)
    memcpy(&t, a, sizeof(Layer))
    memcpy(a, b, lo)
    memcpy(<char *>a + hi, <char *>b + hi, sizeof(Layer) - hi)
    memcpy(b, &t, lo)
    memcpy(<char *>b + hi, <char *>&t + hi, sizeof(Layer) - hi)


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


cdef class CoreImage:
    """One mapped image file (internal; use engine.open / engine.create).

    Arguments of the constructor:
        fd (int): a descriptor open O_RDWR (writable) or O_RDONLY; the core dups it.
        writable (bool), raw (bool)
        geometry (dict): for qcow2, the header fields cluster_bits, size, version,
            l1_table_offset, l1_size, refcount_table_offset, refcount_table_clusters,
            refcount_order, extended_l2, compression_type, snapshots_offset,
            snapshots_size; all validated by engine.format first.

    Lifetime and threads: every entry point takes the image's lock (readers share it) and
    checks under it that the image is open, so close() and adopt() -- which hold it
    exclusively -- wait for the calls in progress, and later calls raise ImageClosed. A
    core that is the backing file of another (set_backing) is read through that one without
    its own lock: closing it refuses direct use at once, and its memory goes when the last
    core that reads through it is released.
    """

    cdef Layer L
    cdef CoreImage _backing    # keeps the backing CoreImage alive
    cdef bint _open            # direct use allowed (checked under the lock)
    cdef bint _excl            # lock_exclusive() holds the lock
    cdef int _linked           # upper cores whose L.backing points at this one
    cdef public object path    # the file's name, for error messages (set by engine.image)

    def __cinit__(self):
        cdef pthread_rwlockattr_t attr
        memset(&self.L, 0, sizeof(Layer))
        self.L.fd = -1
        self._open = False
        self._excl = False
        self._linked = 0
        # Writers first: a close or a metadata change must not wait behind an endless stream
        # of overlapping readers (no entry point takes the lock twice on one thread).
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP)
        pthread_rwlock_init(&self.L.lock, &attr)
        pthread_rwlockattr_destroy(&attr)

    def __init__(self, int fd, bint writable, bint raw, dict geometry):
        import os
        cdef Layer *L = &self.L
        cdef uint64_t fsize = os.fstat(fd).st_size
        cdef uint64_t C, reserve, i
        cdef int prot
        cdef void *p
        L.fd = os.dup(fd)
        L.writable = writable
        L.raw = raw
        L.file_size = fsize
        L.pread_data = _on_tmpfs(L.fd)
        if raw:
            L.size = fsize
            L.cluster_bits = 16
        else:
            L.cluster_bits = geometry["cluster_bits"]
            L.size = geometry["size"]
            L.version = geometry["version"]
            L.ext_l2 = geometry["extended_l2"]
            L.entry_shift = 4 if L.ext_l2 else 3
            L.l2_bits = L.cluster_bits - L.entry_shift
            L.l1_offset = geometry["l1_table_offset"]
            L.l1_size = geometry["l1_size"]
            L.rt_offset = geometry["refcount_table_offset"]
            L.rt_entries = (<uint64_t>geometry["refcount_table_clusters"] << L.cluster_bits) // 8
            L.refcount_order = geometry["refcount_order"]
            L.rb_shift = L.cluster_bits + 3 - L.refcount_order
            L.rc_max = 0xffffffffffffffff if L.refcount_order == 6 else ((<uint64_t>1 << (1 << L.refcount_order)) - 1)
            L.compression_type = geometry.get("compression_type", 0)
        C = <uint64_t>1 << L.cluster_bits
        L.cluster_size = C
        L.alloc_end = (fsize + C - 1) & ~(C - 1)
        # fixed metadata: header cluster, L1, reftable, snapshot table
        if not raw:
            L.meta_lo[0] = 0
            L.meta_hi[0] = C
            L.meta_lo[1] = L.l1_offset & ~(C - 1)
            L.meta_hi[1] = (L.l1_offset + L.l1_size * 8 + C - 1) & ~(C - 1)
            L.meta_lo[2] = L.rt_offset
            L.meta_hi[2] = L.rt_offset + L.rt_entries * 8
            L.meta_lo[3] = geometry.get("snapshots_offset", 0) & ~(C - 1)
            L.meta_hi[3] = (geometry.get("snapshots_offset", 0) + geometry.get("snapshots_size", 0) + C - 1) & ~(C - 1)
        # map
        if writable:
            reserve = fsize + (fsize // 2) + (<uint64_t>1 << 30)
            if not raw:
                reserve += L.size + L.size // 4
            if reserve > (<uint64_t>1 << 46):
                reserve = <uint64_t>1 << 46
            prot = PROT_READ | PROT_WRITE
        else:
            reserve = fsize
            prot = PROT_READ
        reserve = (reserve + 4095) & ~(<uint64_t>4095)
        if reserve:
            p = mmap(NULL, reserve, prot, MAP_SHARED | MAP_NORESERVE, L.fd, 0)
            if p == MAP_FAILED:
                err = errno
                c_close(L.fd)
                L.fd = -1
                raise OSError(err, "cannot map the image file")
            L.base = <uint8_t *>p
            L.map_len = reserve
            # no readahead on faults: advise_read() does it for reads that need it
            madvise(p, reserve, MADV_RANDOM)
        self._open = True
        if raw:
            return
        if L.l1_offset + L.l1_size * 8 > fsize or L.rt_offset + L.rt_entries * 8 > fsize:
            self.close()
            raise ValueError("tables past the end of the file")
        L.l1 = <uint64_t *>malloc(max(L.l1_size, 1) * 8)
        if L.l1 == NULL:
            self.close()
            raise MemoryError()
        for i in range(L.l1_size):
            L.l1[i] = load_be64(L.base + L.l1_offset + i * 8)
        if writable:
            L.l2_cache = <uint8_t **>calloc(max(L.l1_size, 1), sizeof(uint8_t *))
            L.scratch = <uint8_t *>malloc(C)
            L.zeros = <uint8_t *>calloc(1, C)
            L.safe_clusters = L.alloc_end >> L.cluster_bits
            L.backed = <uint8_t *>calloc((L.safe_clusters >> 3) + 1, 1)
            if L.l2_cache == NULL or L.scratch == NULL or L.zeros == NULL or L.backed == NULL:
                self.close()
                raise MemoryError()
            self._build_meta_set()

    cdef _build_meta_set(self):
        # Refblocks and active L2 tables at open, sorted: the allocator skips them and no data
        # store may land on them, whatever a (hostile) L2 entry or refcount says.
        cdef Layer *L = &self.L
        cdef uint64_t i, n = 0, e
        idx = []
        for i in range(L.rt_entries):
            e = load_be64(L.base + L.rt_offset + i * 8) & RT_OFFSET_MASK
            if e:
                idx.append(e >> L.cluster_bits)
        for i in range(L.l1_size):
            e = L.l1[i] & L1E_OFFSET_MASK
            if e:
                idx.append(e >> L.cluster_bits)
        if not idx:
            return
        arr = np.unique(np.array(idx, dtype=np.uint64))
        L.meta_idx = <uint64_t *>malloc(len(arr) * 8)
        if L.meta_idx == NULL:
            raise MemoryError()
        for i in range(<uint64_t>len(arr)):
            L.meta_idx[i] = arr[i]
        L.n_meta = len(arr)

    def __dealloc__(self):
        self._release()
        pthread_rwlock_destroy(&self.L.lock)

    cdef void _release(self) noexcept nogil:
        """Free the mapping, tables and descriptor. Only with no other user: under the
        exclusive lock once closed and unlinked, or at deallocation."""
        cdef Layer *L = &self.L
        cdef uint64_t i
        if L.l2_cache != NULL:
            for i in range(L.l1_size):
                if L.l2_cache[i] != NULL:
                    free(L.l2_cache[i])
            free(L.l2_cache)
            L.l2_cache = NULL
        free(L.l1); L.l1 = NULL
        free(L.scratch); L.scratch = NULL
        free(L.zeros); L.zeros = NULL
        free(L.zbuf); L.zbuf = NULL
        free(L.backed); L.backed = NULL
        free(L.pend_free); L.pend_free = NULL
        omap_free(L.omap); L.omap = NULL
        free(L.meta_idx); L.meta_idx = NULL
        L.n_meta = 0
        L.n_pend = L.cap_pend = 0
        if L.base != NULL:
            munmap(L.base, L.map_len)
            L.base = NULL
        if L.fd >= 0:
            c_close(L.fd)
            L.fd = -1
        self._open = False

    cdef void _release_chain(self):
        """Release this core if it is closed and nothing reads through it, then its backing
        if that is now in the same state, and so on down (a loop: chains may be deep)."""
        cdef CoreImage c = self, b
        while c is not None and not c._open and c._linked == 0:
            with nogil:
                pthread_rwlock_wrlock(&c.L.lock)
                c._release()
                c.L.backing = NULL
                pthread_rwlock_unlock(&c.L.lock)
            b = c._backing
            c._backing = None
            if b is not None:
                b._linked -= 1
            c = b

    # -- error translation: the one place codes become exceptions --------------------------
    cdef object _layer_path(self, Layer *p):
        """The file of the layer of this chain at p (compared, never dereferenced: the chain
        may have been swapped since the error was recorded)."""
        cdef CoreImage c = self
        while c is not None:
            if &c.L == p:
                return c.path
            c = c._backing
        return self.path

    cdef int _fail(self, int rc, ErrInfo *e, uint64_t off=0, uint64_t n=0) except -1:
        """Raise the error of rc. e was filled by take_err() under the lock; the exception
        names the layer where it happened (path) and the image that was asked (image)."""
        from engine import errors
        if rc == E_CLOSED:
            raise errors.ImageClosed("image is closed", path=self.path)
        if rc == E_RANGE:
            self._range_error(off, n)
        if rc == E_NOMEM:
            raise MemoryError("out of memory")
        path = self._layer_path(e.layer)
        if rc == E_PYERR:
            exc = getattr(_pending, "exc", None)
            _pending.exc = None
            if exc is not None:
                # a callback's own exception, its type and message unchanged; an EngineError
                # that names no file is told the volume (and offset) where it happened
                if isinstance(exc, errors.EngineError) and exc.path is None:
                    exc.path = path
                    exc.image = self.path
                    if isinstance(exc, errors.CorruptImage) and exc.offset is None:
                        exc.offset = e.off
                    if exc.args and isinstance(exc.args[0], str):
                        exc.args = (f"{path}: {exc.args[0]}",) + exc.args[1:]
                raise exc
        msg = (<bytes>e.msg).decode() if e.msg != NULL else "error"
        if rc == E_IO:
            exc = errors.io_error(e.eno, msg, path=path)
        elif rc == E_CORRUPT or rc == E_PYERR:
            exc = errors.CorruptImage(f"{msg} (offset {e.off:#x})", offset=e.off, path=path)
        elif rc == E_LIMIT:
            exc = errors.SafetyLimitExceeded(msg, path=path)
        else:
            exc = errors.EngineError(msg, path=path)
        exc.image = self.path
        raise exc

    cdef int _range_error(self, uint64_t offset, uint64_t n) except -1:
        from engine.errors import InvalidArgument
        raise InvalidArgument(f"range {offset}+{n} is past the end of the disk "
                              f"({self.L.size} bytes)",
                              value=offset if offset > self.L.size else n, path=self.path)

    cdef int _closed_error(self) except -1:
        from engine.errors import ImageClosed
        raise ImageClosed("image is closed", path=self.path)

    cdef inline void _check_open(self) except *:
        if not self._open:
            self._closed_error()

    cdef int _check_writable(self) except -1:
        if not self._open:
            self._closed_error()
        if not self.L.writable:
            from engine.errors import ReadOnlyImage
            raise ReadOnlyImage("image is open read-only", path=self.path)
        if self.L.ext_l2:
            from engine.errors import UnsupportedFeature
            raise UnsupportedFeature("extended L2 writes", "writing to images with "
                                     "extended L2 entries (subclusters) is not supported yet",
                                     path=self.path)
        return 0

    # -- public (internal) API ---------------------------------------------------------------
    def set_backing(self, CoreImage backing):
        """Link the backing image (opened read-only by the caller) or None."""
        cdef CoreImage old = self._backing
        cdef Layer *p = &backing.L if backing is not None else NULL
        if backing is not None:
            backing._linked += 1
        with nogil:
            pthread_rwlock_wrlock(&self.L.lock)
            self.L.backing = p
            pthread_rwlock_unlock(&self.L.lock)
        self._backing = backing
        if old is not None:
            old._linked -= 1
            old._release_chain()

    def enable_owner_map(self):
        """Keep an owner map over this image's backing chain (call on the top image of an
        open chain, once it is complete)."""
        if self.L.backing != NULL and self.L.backing.backing != NULL and self.L.backing.omap == NULL:
            self.L.backing.omap = omap_new(self.L.backing)

    @property
    def file_size(self):
        return self.L.file_size

    @property
    def alloc_end(self):
        return self.L.alloc_end

    @property
    def l1_table_offset(self):
        return self.L.l1_offset

    @property
    def refcount_table_offset(self):
        return self.L.rt_offset

    @property
    def refcount_table_clusters(self):
        return (self.L.rt_entries * 8) >> self.L.cluster_bits

    @property
    def dirty(self):
        return bool(self.L.data_dirty or self.L.n_cached or self.L.l1_dirty or self.L.n_pend)

    cdef uint64_t _u64(self, object value, what) except? 0xffffffffffffffff:
        """An offset or length by engine.format.int_arg (a plain int in range takes the
        short way, without a call)."""
        if type(value) is int:
            try:
                return value
            except OverflowError:
                pass
        return int_arg(value, what)

    cdef int _buffer(self, object buf, Py_buffer *view, bint writable) except -1:
        """Acquire any C-contiguous buffer (bytes, bytearray, memoryview, numpy of any dtype)
        as raw bytes; a typed error for anything else."""
        try:
            PyObject_GetBuffer(buf, view, (PyBUF_WRITABLE if writable else PyBUF_SIMPLE)
                               | PyBUF_C_CONTIGUOUS)
        except (TypeError, BufferError, ValueError) as e:
            from engine.errors import InvalidArgument
            what = "a writable" if writable else "a"
            raise InvalidArgument(f"expected {what} contiguous buffer (bytearray, memoryview, "
                                  f"numpy array), got {type(buf).__name__}: {e}",
                                  value=buf, path=self.path) from None
        return 0

    def readinto(self, offset, buf):
        """Read len(buf) guest bytes (its size in bytes, whatever its item type) at offset
        through the chain into buf, any writable C-contiguous buffer. Returns that count.
        Image.readinto is this method (bound at open): every check is here."""
        cdef Py_buffer view
        cdef uint64_t off, n
        cdef int rc = 0
        cdef ErrInfo err
        if not self._open:
            self._closed_error()
        off = self._u64(offset, "offset")
        self._buffer(buf, &view, True)
        n = <uint64_t>view.len
        with nogil:
            pthread_rwlock_rdlock(&self.L.lock)
            if not self._open:
                rc = E_CLOSED
            elif off > self.L.size or self.L.size - off < n:
                rc = E_RANGE
            elif n:
                rc = layer_read(&self.L, off, <uint8_t *>view.buf, n)
                if rc < 0:
                    take_err(&self.L, rc, &err)
            pthread_rwlock_unlock(&self.L.lock)
        PyBuffer_Release(&view)
        if rc < 0:
            self._fail(rc, &err, off, n)
        return n

    def readv(self, offsets, length, out=None):
        """Batch read: for each offset, `length` bytes into consecutive slices of out, any
        writable C-contiguous buffer of at least len(offsets) * length bytes (allocated, as
        uint8, when None). One crossing for the whole batch. Returns out."""
        cdef Py_buffer view
        cdef cnp.ndarray offs
        cdef const uint64_t *op
        cdef uint64_t i, k, ln, bad = 0
        cdef int rc = 0
        cdef ErrInfo err
        self._check_open()
        offs = as_offsets(offsets, self.path)
        ln = self._u64(length, "length")
        k = <uint64_t>offs.shape[0]
        op = <const uint64_t *>cnp.PyArray_DATA(offs)
        for i in range(k):          # first, so that a bad range is named before the buffer
            if op[i] > self.L.size or self.L.size - op[i] < ln:
                self._range_error(op[i], ln)
        if out is None:
            out = np.empty(k * ln, dtype=np.uint8)
        self._buffer(out, &view, True)
        if ln and k > <uint64_t>view.len // ln:
            PyBuffer_Release(&view)
            from engine.errors import InvalidArgument
            raise InvalidArgument(f"output buffer of {view.len} bytes too small for "
                                  f"{k} reads of {ln} bytes", value=out, path=self.path)
        with nogil:
            pthread_rwlock_rdlock(&self.L.lock)
            if not self._open:
                rc = E_CLOSED
            else:
                for i in range(k):
                    if op[i] > self.L.size or self.L.size - op[i] < ln:
                        bad = i
                        rc = E_RANGE
                        break
            if rc == 0 and k and ln:
                rc = batch_read(&self.L, op, k, ln, <uint8_t *>view.buf)
                if rc < 0:
                    take_err(&self.L, rc, &err)
            pthread_rwlock_unlock(&self.L.lock)
        PyBuffer_Release(&view)
        if rc < 0:
            self._fail(rc, &err, op[bad] if k else 0, ln)
        return out

    def write(self, offset, data):
        """Write data (any C-contiguous buffer, taken as raw bytes) at offset into this (top)
        image. Returns its size in bytes. Image.write is this method (bound at open)."""
        cdef Py_buffer view
        cdef uint64_t off, n
        cdef int rc = 0
        cdef ErrInfo err
        if not self._open:
            self._closed_error()
        off = self._u64(offset, "offset")
        self._check_writable()
        self._buffer(data, &view, False)
        n = <uint64_t>view.len
        with nogil:
            pthread_rwlock_wrlock(&self.L.lock)
            if not self._open:
                rc = E_CLOSED
            elif off > self.L.size or self.L.size - off < n:
                rc = E_RANGE
            elif n:
                if self.L.raw:
                    rc = raw_pwrite(&self.L, off, <const uint8_t *>view.buf, n)
                else:
                    rc = layer_write(&self.L, off, <const uint8_t *>view.buf, n)
                if rc < 0:
                    take_err(&self.L, rc, &err)
            pthread_rwlock_unlock(&self.L.lock)
        PyBuffer_Release(&view)
        if rc < 0:
            self._fail(rc, &err, off, n)
        return n

    def writev(self, offsets, length, data):
        """Batch write: consecutive `length`-byte slices of data (any C-contiguous buffer) to
        each offset, in order, under one lock and one crossing."""
        cdef Py_buffer view
        cdef cnp.ndarray offs
        cdef const uint64_t *op
        cdef const uint8_t *src
        cdef uint64_t i, k, ln, bad = 0
        cdef int rc = 0
        cdef ErrInfo err
        self._check_writable()
        offs = as_offsets(offsets, self.path)
        ln = self._u64(length, "length")
        k = <uint64_t>offs.shape[0]
        op = <const uint64_t *>cnp.PyArray_DATA(offs)
        for i in range(k):          # first, so that a bad range is named before the buffer
            if op[i] > self.L.size or self.L.size - op[i] < ln:
                self._range_error(op[i], ln)
        self._buffer(data, &view, False)
        if ln and k > <uint64_t>view.len // ln:
            PyBuffer_Release(&view)
            from engine.errors import InvalidArgument
            raise InvalidArgument(f"data of {view.len} bytes shorter than len(offsets) * "
                                  f"length ({k} * {ln})", value=data, path=self.path)
        src = <const uint8_t *>view.buf
        with nogil:
            pthread_rwlock_wrlock(&self.L.lock)
            if not self._open:
                rc = E_CLOSED
            else:
                for i in range(k):
                    if op[i] > self.L.size or self.L.size - op[i] < ln:
                        bad = i
                        rc = E_RANGE
                        break
            if rc == 0 and ln:
                for i in range(k):
                    if self.L.raw:
                        rc = raw_pwrite(&self.L, op[i], src + i * ln, ln)
                    else:
                        rc = layer_write(&self.L, op[i], src + i * ln, ln)
                    if rc < 0:
                        take_err(&self.L, rc, &err)
                        break
            pthread_rwlock_unlock(&self.L.lock)
        PyBuffer_Release(&view)
        if rc < 0:
            self._fail(rc, &err, op[bad] if k else 0, ln)
        return k * ln

    def write_zero_bytes(self, uint64_t offset, uint64_t length):
        """Write zero bytes over [offset, offset+length) (allocating; used for partial clusters)."""
        cdef int rc = 0
        cdef ErrInfo err
        cdef bytes z = None
        cdef const uint8_t *zp = NULL
        cdef uint64_t zn = 0, k
        self._check_open()
        if length == 0:
            return
        if self.L.raw:
            zn = min(length, 1 << 20)
            z = bytes(zn)
            zp = <const uint8_t *><char *>z
        with nogil:
            pthread_rwlock_wrlock(&self.L.lock)
            if not self._open:
                rc = E_CLOSED
            elif self.L.raw:
                while length and rc == 0:
                    k = length if length < zn else zn
                    rc = raw_pwrite(&self.L, offset, zp, k)
                    offset += k
                    length -= k
            else:
                rc = layer_write(&self.L, offset, NULL, length)
            if rc < 0 and rc != E_CLOSED:
                take_err(&self.L, rc, &err)
            pthread_rwlock_unlock(&self.L.lock)
        if rc < 0:
            self._fail(rc, &err)

    def zero_clusters(self, uint64_t offset, uint64_t length, int mode):
        """mode 0: discard (drop the mapping), 1: zero flag and free, 2: zero flag, keep the
        allocation. offset and length must be cluster-aligned (or reach the end of the disk)."""
        cdef int rc = 0
        cdef ErrInfo err
        self._check_open()
        with nogil:
            pthread_rwlock_wrlock(&self.L.lock)
            if not self._open:
                rc = E_CLOSED
            else:
                rc = layer_zero(&self.L, offset, length, mode)
                if rc < 0:
                    take_err(&self.L, rc, &err)
            pthread_rwlock_unlock(&self.L.lock)
        if rc < 0:
            self._fail(rc, &err)

    def raw_punch(self, uint64_t offset, uint64_t length):
        """Raw files: deallocate a range so it reads as zeros."""
        cdef int r = 0, closed = 0
        self._check_open()
        with nogil:
            pthread_rwlock_wrlock(&self.L.lock)
            if not self._open:
                closed = 1
            else:
                r = io_fallocate(self.L.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                 <off_t>offset, <off_t>length)
            pthread_rwlock_unlock(&self.L.lock)
        if closed:
            self._closed_error()
        if r != 0:
            self.write_zero_bytes(offset, length)

    cdef int _flush_locked(self, ErrInfo *err) noexcept nogil:
        """Write back caches and sync (the caller holds the lock exclusively)."""
        cdef Layer *L = &self.L
        cdef int rc = 0, e
        if L.raw:
            if L.sticky_errno:
                L.err_errno = L.sticky_errno
                rc = fail(L, E_IO, "sync failed", 0)
            elif L.data_dirty:
                if io_sync(L) != 0:
                    e = errno
                    L.sticky_errno = e
                    L.err_errno = e
                    rc = fail(L, E_IO, "sync failed", 0)
                else:
                    L.data_dirty = 0
        elif L.writable:
            rc = writeback(L)
        if rc < 0:
            take_err(L, rc, err)
        return rc

    cdef void _trim_locked(self) noexcept nogil:
        """Shrink the file to the end of the last cluster in use (after a flush)."""
        if self.L.writable and not self.L.raw and self.L.alloc_end < self.L.file_size:
            if io_ftruncate(self.L.fd, <off_t>self.L.alloc_end) == 0:
                self.L.file_size = self.L.alloc_end

    def flush(self):
        """Write back caches and make every write before this call durable."""
        cdef int rc = 0
        cdef ErrInfo err
        self._check_open()
        with nogil:
            pthread_rwlock_wrlock(&self.L.lock)
            if not self._open:
                rc = E_CLOSED
            else:
                rc = self._flush_locked(&err)
            pthread_rwlock_unlock(&self.L.lock)
        if rc < 0:
            self._fail(rc, &err)

    def poison(self, int err):
        """Fail every later flush with ``err``, as a failed sync of this image does: for a
        write or sync of metadata done beside the core (a header rewrite, a repair) that
        failed, after which the kernel may have dropped pages we count on."""
        if not self.L.sticky_errno:
            self.L.sticky_errno = err if err else 5

    def trim(self):
        """Shrink the file to the end of the last cluster in use (after a flush)."""
        with nogil:
            pthread_rwlock_wrlock(&self.L.lock)
            if self._open:
                self._trim_locked()
            pthread_rwlock_unlock(&self.L.lock)

    def block_status(self, uint64_t offset, uint64_t length):
        """Coalesced runs over [offset, offset+length) through the chain, as an (n, 5) uint64
        array: start, length, depth, flags (1 present, 2 zero, 4 data, 8 offset valid,
        16 compressed), host offset."""
        cdef RunBuf rb
        cdef int rc = 0
        cdef ErrInfo err
        self._check_open()
        rb.v = NULL
        rb.n = rb.cap = 0
        with nogil:
            pthread_rwlock_rdlock(&self.L.lock)
            if not self._open:
                rc = E_CLOSED
            else:
                rc = layer_status(&self.L, offset, length, 0, &rb)
                if rc < 0:
                    take_err(&self.L, rc, &err)
            pthread_rwlock_unlock(&self.L.lock)
        try:
            if rc < 0:
                self._fail(rc, &err)
            arr = np.empty((rb.n, 5), dtype=np.uint64)
            if rb.n:
                memcpy(cnp.PyArray_DATA(arr), rb.v, rb.n * 5 * 8)
            return arr
        finally:
            free(rb.v)

    def get_refcount(self, uint64_t cluster_index):
        """Stored refcount of a host cluster (test and check helper)."""
        cdef uint64_t v = 0
        cdef int rc = 0
        cdef ErrInfo err
        self._check_open()
        with nogil:
            pthread_rwlock_rdlock(&self.L.lock)
            if not self._open:
                rc = E_CLOSED
            else:
                rc = get_refcount(&self.L, cluster_index, &v)
                if rc < 0:
                    take_err(&self.L, rc, &err)
            pthread_rwlock_unlock(&self.L.lock)
        if rc < 0:
            self._fail(rc, &err)
        return v

    def grow_l1(self, uint64_t new_l1_size, uint64_t new_size):
        """Resize support: move the L1 to a new, larger table and set the virtual size
        (header fields at 24 and 36..47 updated with a sync around each step)."""
        self._check_open()
        cdef Layer *L = &self.L
        cdef uint64_t C = L.cluster_size, n_cl, first, i, host, old_off = L.l1_offset
        cdef uint64_t old_clusters = (L.l1_size * 8 + C - 1) // C
        cdef uint64_t *nl1
        cdef uint8_t **ncache
        cdef int rc = 0, created = 0
        cdef ErrInfo err
        if new_l1_size <= L.l1_size:
            with nogil:
                pthread_rwlock_wrlock(&L.lock)
                rc = writeback(L) if self._open else E_CLOSED
                if rc == 0:
                    store_be64(L.base + 24, new_size)
                    if io_sync(L) != 0:
                        rc = fail_io(L, "sync failed", 0)
                    else:
                        L.size = new_size
                if rc < 0 and rc != E_CLOSED:
                    take_err(L, rc, &err)
                pthread_rwlock_unlock(&L.lock)
            if rc < 0:
                self._fail(rc, &err)
            return
        n_cl = (new_l1_size * 8 + C - 1) // C
        nl1 = <uint64_t *>calloc(new_l1_size, 8)
        ncache = <uint8_t **>calloc(new_l1_size, sizeof(uint8_t *))
        if nl1 == NULL or ncache == NULL:
            free(nl1); free(ncache)
            raise MemoryError()
        with nogil:
            pthread_rwlock_wrlock(&L.lock)
            rc = writeback(L) if self._open else E_CLOSED
            if rc == 0:
                # n_cl contiguous clusters at the end of the file
                first = L.alloc_end >> L.cluster_bits
                for i in range(n_cl):
                    rc = ensure_refblock(L, (first + i) >> L.rb_shift, &created)
                    if rc < 0:
                        break
                if rc == 0:
                    first = L.alloc_end >> L.cluster_bits
                    rc = ensure_size(L, (first + n_cl) * C)
                if rc == 0:
                    for i in range(n_cl):
                        rc = set_refcount(L, first + i, 1)
                        if rc < 0:
                            break
                if rc == 0:
                    L.alloc_end = (first + n_cl) * C
                    memset(L.base + first * C, 0, n_cl * C)
                    memcpy(nl1, L.l1, L.l1_size * 8)
                    for i in range(L.l1_size):
                        store_be64(L.base + first * C + i * 8, L.l1[i])
                    if io_sync(L) != 0:
                        rc = fail_io(L, "sync failed", 0)
                    else:
                        rc = hook(L, 12)
                    if rc < 0:
                        for i in range(n_cl):       # never referenced: give them back
                            set_refcount(L, first + i, 0)
                if rc == 0:
                    store_be64(L.base + 24, new_size)
                    store_be32(L.base + 36, <uint32_t>new_l1_size)
                    store_be64(L.base + 40, first * C)
                    if io_sync(L) != 0:
                        rc = fail_io(L, "sync failed", 0)
                if rc == 0:
                    free(L.l1)
                    free(L.l2_cache)
                    L.l1 = nl1
                    L.l2_cache = ncache
                    nl1 = NULL
                    ncache = NULL
                    L.l1_size = new_l1_size
                    L.l1_offset = first * C
                    L.size = new_size
                    L.meta_lo[1] = L.l1_offset
                    L.meta_hi[1] = L.l1_offset + n_cl * C
                    for i in range(old_clusters):
                        if rc < 0:
                            break
                        rc = pend_free(L, (old_off >> L.cluster_bits) + i)
                    if rc == 0:
                        rc = hook(L, 13)
                if rc == 0:
                    rc = writeback(L)
            if rc < 0 and rc != E_CLOSED:
                take_err(L, rc, &err)
            pthread_rwlock_unlock(&L.lock)
        free(nl1)
        free(ncache)
        if rc < 0:
            self._fail(rc, &err)

    def close(self, bint flush=False):
        """Close: with flush=True write back and trim first, under the same exclusive hold,
        so no write slips in between. Waits for calls in progress on other threads; later
        calls raise ImageClosed. The mapping and descriptor go at once, or -- while another
        core reads through this one -- when that one is released. Idempotent. A failed flush
        is raised after closing."""
        cdef int rc = 0
        cdef ErrInfo err
        with nogil:
            pthread_rwlock_wrlock(&self.L.lock)
            if self._open:
                if flush:
                    rc = self._flush_locked(&err)
                    if rc == 0:
                        self._trim_locked()
                self._open = False
            pthread_rwlock_unlock(&self.L.lock)
        self._release_chain()
        if rc < 0:
            self._fail(rc, &err)

    def lock_exclusive(self, bint flush=True, bint trim=False):
        """Hold the image's lock exclusively (after writing back and syncing, and trimming
        with trim=True) for a metadata change made outside the core; calls from other
        threads wait. Until unlock_exclusive(), this thread may only call adopt() on this
        core (any other call would wait for itself)."""
        cdef int rc = 0
        cdef ErrInfo err
        with nogil:
            pthread_rwlock_wrlock(&self.L.lock)
            if not self._open:
                rc = E_CLOSED
            elif flush:
                rc = self._flush_locked(&err)
                if rc == 0 and trim:
                    self._trim_locked()
            if rc < 0:
                pthread_rwlock_unlock(&self.L.lock)
        if rc < 0:
            self._fail(rc, &err)
        self._excl = True

    def unlock_exclusive(self):
        if self._excl:
            self._excl = False
            pthread_rwlock_unlock(&self.L.lock)

    def adopt(self, CoreImage new not None):
        """Take over the state of `new` (a fresh core of the same file, its backing chain
        linked) in one step, under lock_exclusive(): calls before see the old state, calls
        after the new one, none a mix. The old state is released (through `new`, which ends
        closed)."""
        if not self._excl:
            raise RuntimeError("adopt() needs lock_exclusive()")
        if new._linked or self._linked or not new._open or new is self:
            raise RuntimeError("adopt() takes a fresh, open, unlinked core")
        swap_layers(&self.L, &new.L)
        self._backing, new._backing = new._backing, self._backing
        new.close()

    @property
    def closed(self):
        return not self._open


# --- background sync for create() ----------------------------------------------------------

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    int pthread_create(pthread_t *th, void *attr, void *(*fn)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t th, void **ret)

cdef extern from "<unistd.h>" nogil:
    int fsync(int fd)


ctypedef struct SyncArgs:
    int fd
    int dfd
    int err


cdef void *sync_main(void *arg) noexcept nogil:
    cdef SyncArgs *a = <SyncArgs *>arg
    if fdatasync(a.fd) != 0:
        a.err = errno if errno else 5
    elif a.dfd >= 0:
        fsync(a.dfd)        # a folder that refuses fsync: the file itself is durable
    return NULL


cdef class BackgroundSync:
    """fdatasync(fd) and then fsync(dir_fd) on a native thread, so that the caller can do
    CPU work meanwhile without the GIL in the way. wait() joins and returns 0 or the errno
    of the fdatasync. The descriptors stay the caller's."""
    cdef SyncArgs a
    cdef pthread_t th
    cdef bint running

    def __cinit__(self, int fd, int dir_fd):
        self.a.fd = fd
        self.a.dfd = dir_fd
        self.a.err = 0
        self.running = False
        if pthread_create(&self.th, NULL, sync_main, &self.a) != 0:
            sync_main(&self.a)          # no thread: do it here
        else:
            self.running = True

    def wait(self):
        if self.running:
            with nogil:
                pthread_join(self.th, NULL)
            self.running = False
        return self.a.err

    def __dealloc__(self):
        if self.running:
            with nogil:
                pthread_join(self.th, NULL)


def selftest():
    """A tiny fixed set of checks that catch a broken build (byte order, masks)."""
    cdef uint8_t buf[8]
    store_be64(buf, 0x0102030405060708)
    if buf[0] != 1 or buf[7] != 8 or load_be64(buf) != 0x0102030405060708:
        raise AssertionError("byte order helpers are broken")
    store_be16(buf, 0xabcd)
    if load_be16(buf) != 0xabcd:
        raise AssertionError("16-bit byte order helpers are broken")
    if (0x8000000000050000 & L2E_OFFSET_MASK) != 0x50000:
        raise AssertionError("L2 offset mask is broken")
    return True


_arm_from_env()
