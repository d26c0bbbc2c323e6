# Included by engine/_core.pyx (one compiled module); see the list of rooms there.

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



cdef class Geometry:
    """The header fields the core needs to map a QCOW2 image, typed (built by engine.image
    from a header engine.format has validated)."""

    cdef readonly int cluster_bits
    cdef readonly uint64_t size                      # virtual size in bytes
    cdef readonly int version
    cdef readonly uint64_t l1_table_offset
    cdef readonly uint64_t l1_size
    cdef readonly uint64_t refcount_table_offset
    cdef readonly uint64_t refcount_table_clusters
    cdef readonly int refcount_order
    cdef readonly bint extended_l2
    cdef readonly int compression_type
    cdef readonly uint64_t snapshots_offset          # 0: no snapshot table
    cdef readonly uint64_t snapshots_size

    def __init__(self, *, int cluster_bits, uint64_t size, int version,
                 uint64_t l1_table_offset, uint64_t l1_size, uint64_t refcount_table_offset,
                 uint64_t refcount_table_clusters, int refcount_order, bint extended_l2,
                 int compression_type=0, uint64_t snapshots_offset=0,
                 uint64_t snapshots_size=0):
        self.cluster_bits = cluster_bits
        self.size = size
        self.version = version
        self.l1_table_offset = l1_table_offset
        self.l1_size = l1_size
        self.refcount_table_offset = refcount_table_offset
        self.refcount_table_clusters = refcount_table_clusters
        self.refcount_order = refcount_order
        self.extended_l2 = extended_l2
        self.compression_type = compression_type
        self.snapshots_offset = snapshots_offset
        self.snapshots_size = snapshots_size


cdef class CoreImage:
    """One mapped image file (internal; use engine.open / engine.create).

    Arguments of the constructor:
        fd (int): a descriptor open O_RDWR (writable) or O_RDONLY; the core dups it.
        writable (bool)
        geometry (Geometry or None): for qcow2, the header fields the core needs, validated
            by engine.format first; None for a raw file.
        fresh (tuple of int or None): the file was just laid out by engine.image.create
            (writable, qcow2): the cluster indexes of its refcount blocks, sorted; its L1 is
            all zero.  Nothing is then read from the file at construction (reading the new
            file's not yet written table pages costs more than the rest of an open).

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

    def __init__(self, int fd, bint writable, Geometry geometry, tuple fresh=None):
        import os
        cdef Layer *L = &self.L
        cdef uint64_t fsize = os.fstat(fd).st_size
        cdef uint64_t C, reserve, i
        cdef int prot
        cdef void *p
        cdef bint raw = geometry is None
        L.fd = os.dup(fd)
        L.writable = writable
        L.raw = raw
        L.file_size = fsize
        L.pread_data = _on_tmpfs(L.fd)
        if raw:
            L.size = fsize
            L.cluster_bits = 16
        else:
            L.cluster_bits = geometry.cluster_bits
            L.size = geometry.size
            L.version = geometry.version
            L.ext_l2 = geometry.extended_l2
            L.entry_shift = 4 if L.ext_l2 else 3
            L.l2_bits = L.cluster_bits - L.entry_shift
            L.l1_offset = geometry.l1_table_offset
            L.l1_size = geometry.l1_size
            L.rt_offset = geometry.refcount_table_offset
            L.rt_entries = (geometry.refcount_table_clusters << L.cluster_bits) // 8
            L.refcount_order = geometry.refcount_order
            L.rb_shift = L.cluster_bits + 3 - L.refcount_order
            L.rc_max = 0xffffffffffffffff if L.refcount_order == 6 else ((<uint64_t>1 << (1 << L.refcount_order)) - 1)
            L.compression_type = geometry.compression_type
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
            L.meta_lo[3] = geometry.snapshots_offset & ~(C - 1)
            L.meta_hi[3] = (geometry.snapshots_offset + geometry.snapshots_size + C - 1) & ~(C - 1)
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
        if fresh is not None and not writable:
            self.close()
            raise ValueError("fresh is for a writable image")
        if fresh is not None:
            L.l1 = <uint64_t *>calloc(max(L.l1_size, 1), 8)
        else:
            L.l1 = <uint64_t *>malloc(max(L.l1_size, 1) * 8)
        if L.l1 == NULL:
            self.close()
            raise MemoryError()
        if fresh is None:
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
            if fresh is not None:
                self._set_meta(fresh)
            else:
                self._build_meta_set()

    cdef _set_meta(self, tuple idx):
        """The metadata set from a known, sorted list of cluster indexes."""
        cdef Layer *L = &self.L
        cdef uint64_t i, n = len(idx)
        if n == 0:
            return
        L.meta_idx = <uint64_t *>malloc(n * 8)
        if L.meta_idx == NULL:
            self.close()
            raise MemoryError()
        for i in range(n):
            L.meta_idx[i] = idx[i]
            if i and L.meta_idx[i] <= L.meta_idx[i - 1]:
                self.close()
                raise ValueError("fresh: cluster indexes must be sorted and distinct")
        L.n_meta = n

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
        return 0

    # -- public (internal) API ---------------------------------------------------------------
    def check_range(self, offset, length, bint write=False):
        """The checks of an I/O call, for engine.image's calls that split or size a request
        before reaching the core: open (and, with write, writable),
        offset and length by engine.format.int_arg, inside the disk. Returns them as ints."""
        cdef uint64_t off, n
        if write:
            self._check_writable()
        else:
            self._check_open()
        off = self._u64(offset, "offset")
        n = self._u64(length, "length")
        if off > self.L.size or self.L.size - off < n:
            self._range_error(off, n)
        return off, n

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
    def refcount_table_offset(self):
        return self.L.rt_offset



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
        """mode ZERO_DISCARD: drop the mapping; ZERO_UNMAP: zero flag and free; ZERO_KEEP: zero
        flag, keep the allocation. offset and length must be cluster-aligned (subcluster-aligned
        with extended L2 entries), or reach the end of the disk."""
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

    cdef void _shrink_map_locked(self) noexcept nogil:
        """Give back the address space reserved for growth: map the file as it is, read-only,
        as a read-only open maps it, and drop the old mapping (a chain of many former leaves
        of a large disk would otherwise run out of address space).  A new mapping, not the
        old one cut short: a small mapping left at the start of each freed reservation
        splits the address space until no reservation fits.  If the new mapping cannot be
        made, the old one is cut short."""
        cdef Layer *L = &self.L
        cdef uint64_t keep = (L.file_size + 4095) & ~(<uint64_t>4095)
        cdef void *p
        if L.base == NULL or keep >= L.map_len:
            return
        p = MAP_FAILED
        if keep:
            p = mmap(NULL, keep, PROT_READ, MAP_SHARED | MAP_NORESERVE, L.fd, 0)
        if p == MAP_FAILED:
            munmap(L.base + keep, L.map_len - keep)
            if keep == 0:
                L.base = NULL
        else:
            madvise(p, keep, MADV_RANDOM)
            munmap(L.base, L.map_len)
            L.base = <uint8_t *>p
        L.map_len = keep

    def make_readonly(self):
        """Write back, sync and trim (as close(flush=True) does), then serve reads only, from
        the same mapping: what a read-only reopen of the file gives, without one.  A failed
        flush raises and leaves the image writable."""
        cdef int rc = 0
        cdef ErrInfo err
        self._check_open()
        with nogil:
            pthread_rwlock_wrlock(&self.L.lock)
            if not self._open:
                rc = E_CLOSED
            elif self.L.writable:
                rc = self._flush_locked(&err)
                if rc == 0:
                    self._trim_locked()
                    self._shrink_map_locked()
                    self.L.writable = 0
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
                        rc = hook(L, L1_GROW_WRITTEN)
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
                        rc = hook(L, L1_GROW_SWITCHED)
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

