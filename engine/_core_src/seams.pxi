# Included by engine/_core.pyx (one compiled module); see the list of rooms there.

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

# Hook points, named once here: C code calls hook(L, CLUSTER_ALLOC) and so on; HOOK_NAMES (the
# names arm_hook and COWCHAIN_KILL_AT take) is generated from this enum, in its order.
cpdef enum Hook:
    CLUSTER_ALLOC           # refcount of a new cluster raised
    REFBLOCK_ALLOC          # new refblock written and synced, reftable entry not yet
    REFTABLE_WRITTEN        # grown reftable written and synced, header not yet switched
    REFTABLE_SWITCHED       # header points at the new reftable, old one not yet freed
    L2_ALLOC                # a new L2 table allocated (in the cache)
    COW_READ                # copy-up source read, new cluster not yet written
    COW_WRITE               # new cluster written, L2 entry not yet updated
    WB_DATA_SYNCED          # writeback: data and refcounts durable, L2 not written back
    WB_L2_WRITTEN           # writeback: L2 tables in the page cache, L1 not yet
    WB_L1_WRITTEN           # writeback: L1 written, not yet synced
    WB_SYNCED               # writeback: tables durable, frees not yet applied
    WB_FREES_APPLIED        # writeback: refcounts of freed clusters lowered, not synced
    L1_GROW_WRITTEN         # resize: new L1 written and synced, header not switched
    L1_GROW_SWITCHED        # resize: header points at the new L1, old not freed

cdef enum:
    N_HOOKS = L1_GROW_SWITCHED + 1      # the last member above, plus one

HOOK_NAMES = tuple(h.name.lower() for h in Hook)
if len(HOOK_NAMES) != N_HOOKS:
    raise ImportError("engine._core: N_HOOKS does not follow the Hook enum")
cdef uint64_t hook_hits[N_HOOKS]
cdef int hook_armed = -1
cdef uint64_t hook_nth = 0
cdef enum:
    HOOK_ERROR = 1                  # an armed hook fails with EIO
    HOOK_KILL = 2                   # an armed hook SIGKILLs the process
cdef int hook_action = 0
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


cdef inline int hook(Layer *L, Hook h) noexcept nogil:
    cdef int hid = <int>h
    hook_hits[hid] += 1
    if hook_armed == hid and hook_hits[hid] == hook_nth:
        if hook_action == HOOK_KILL:
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
    disarms. Test seam; also armed (to kill) by COWCHAIN_KILL_AT=name:nth at import."""
    global hook_armed, hook_nth, hook_action
    cdef int i
    for i in range(N_HOOKS):
        hook_hits[i] = 0
    if name is None:
        hook_armed = -1
        return
    hook_armed = HOOK_NAMES.index(name)
    hook_nth = nth
    hook_action = HOOK_KILL if action == "kill" else HOOK_ERROR


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
    """COWCHAIN_KILL_AT=NAME:N (N defaults to 1), the one variable of the kill tests: when NAME
    is a hook of HOOK_NAMES, the process SIGKILLs itself on its N-th hit. Any other NAME is a
    repository kill point (engine.testing) and leaves the hooks unarmed."""
    import os
    spec = os.environ.get("COWCHAIN_KILL_AT")
    if spec:
        name, _, n = spec.rpartition(":")
        if not (name and n.isdigit()):
            name, n = spec, "1"
        if name in HOOK_NAMES:
            arm_hook(name, int(n), "kill")


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
