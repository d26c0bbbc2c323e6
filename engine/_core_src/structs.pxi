# Included by engine/_core.pyx (one compiled module); see the list of rooms there.

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

# Zero/discard modes of CoreImage.zero_clusters (exported below for engine.image).
cdef enum:
    Z_DISCARD = 0       # drop the clusters: reads fall through to the backing file
    Z_ZERO_UNMAP = 1    # zero flag, data cluster freed
    Z_ZERO_KEEP = 2     # zero flag, an allocated cluster stays allocated
ZERO_DISCARD = Z_DISCARD
ZERO_UNMAP = Z_ZERO_UNMAP
ZERO_KEEP = Z_ZERO_KEEP

cdef uint64_t LOW32 = 0xffffffff
cdef uint64_t GROW_MIN = 1 << 20
cdef uint64_t GROW_MAX = 64 << 20
cdef uint64_t L2_CACHE_LIMIT_BYTES = 256 << 20


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
