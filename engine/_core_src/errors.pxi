# Included by engine/_core.pyx (one compiled module); see the list of rooms there.

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
