# Included by engine/_core.pyx (one compiled module); see the list of rooms there.

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
