# C-level declarations of the cowchain core (engine/_core.pyx).
#
# Byte order lives here and nowhere else: QCOW2 is big-endian, and every table entry is decoded
# in place with the load_be*/store_be* helpers below.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t

cdef extern from *:
    """
    #include <string.h>
    #include <stdint.h>
    static inline uint64_t cc_load_be64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return __builtin_bswap64(v); }
    static inline uint32_t cc_load_be32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return __builtin_bswap32(v); }
    static inline uint16_t cc_load_be16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return __builtin_bswap16(v); }
    static inline void cc_store_be64(uint8_t *p, uint64_t v) { v = __builtin_bswap64(v); memcpy(p, &v, 8); }
    static inline void cc_store_be32(uint8_t *p, uint32_t v) { v = __builtin_bswap32(v); memcpy(p, &v, 4); }
    static inline void cc_store_be16(uint8_t *p, uint16_t v) { v = __builtin_bswap16(v); memcpy(p, &v, 2); }
    """
    uint64_t load_be64 "cc_load_be64"(const uint8_t *p) noexcept nogil
    uint32_t load_be32 "cc_load_be32"(const uint8_t *p) noexcept nogil
    uint16_t load_be16 "cc_load_be16"(const uint8_t *p) noexcept nogil
    void store_be64 "cc_store_be64"(uint8_t *p, uint64_t v) noexcept nogil
    void store_be32 "cc_store_be32"(uint8_t *p, uint32_t v) noexcept nogil
    void store_be16 "cc_store_be16"(uint8_t *p, uint16_t v) noexcept nogil

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_rwlock_t:
        pass
    int pthread_rwlock_init(pthread_rwlock_t *, void *)
    int pthread_rwlock_destroy(pthread_rwlock_t *)
    int pthread_rwlock_rdlock(pthread_rwlock_t *)
    int pthread_rwlock_wrlock(pthread_rwlock_t *)
    int pthread_rwlock_unlock(pthread_rwlock_t *)
    ctypedef struct pthread_rwlockattr_t:
        pass
    int pthread_rwlockattr_init(pthread_rwlockattr_t *)
    int pthread_rwlockattr_destroy(pthread_rwlockattr_t *)
    int pthread_rwlockattr_setkind_np(pthread_rwlockattr_t *, int)
    int PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *, void *)
    int pthread_mutex_destroy(pthread_mutex_t *)
    int pthread_mutex_lock(pthread_mutex_t *)
    int pthread_mutex_unlock(pthread_mutex_t *)

ctypedef struct Layer

# The owner map of an immutable backing chain: for each chunk of guest space (the smallest
# cluster or subcluster size in the chain), the index of the layer that answers a read of it.
# Filled lazily one block of chunks at a time, so a leaf miss costs one lookup at any depth.
ctypedef struct OwnerMap:
    Layer **layers              # layers[0] is the top of the immutable part (the leaf's backing)
    int depth
    int gbits                   # log2 of the chunk size
    uint64_t size               # virtual size of layers[0]
    uint64_t nblocks
    uint16_t **blocks           # per block of 2^OMAP_BLOCK_BITS chunks; NULL until filled
    pthread_mutex_t mu          # serialises filling; filled blocks are read without it

# One open image file. The fields of a volume below the leaf never change after open, which
# is what makes the owner map (and lock-free reads of backing files) possible.
ctypedef struct Layer:
    int fd                      # our own descriptor (image.py keeps a second one for locks)
    uint8_t *base               # the mapping, map_len bytes reserved; NULL when nothing is mapped
    uint64_t map_len            # reserved length of the mapping (>= file_size)
    uint64_t file_size          # current st_size: bytes of the mapping that may be touched
    uint64_t alloc_end          # end of the last cluster in use (we trim the file here on close)
    uint64_t safe_clusters      # clusters below the size at open: may be sparse (see backed[])
    uint8_t *backed             # bitmap over safe_clusters: 1 = made non-sparse by fallocate
    int writable
    int raw                     # a raw file: guest byte k is file byte k
    int version                 # qcow2 2 or 3
    int ext_l2                  # extended L2 entries (subclusters)
    int cluster_bits
    int l2_bits
    int entry_shift             # log2 of the L2 entry size: 3, or 4 for extended L2
    uint64_t cluster_size
    uint64_t size               # virtual size in bytes
    uint64_t l1_offset
    uint64_t l1_size            # entries
    uint64_t *l1                # native-endian copy of the active L1
    int l1_dirty                # l1[] differs from the file
    int new_tables              # an L2 table was allocated since the last writeback
    uint8_t **l2_cache          # per L1 index: dirty copy of the L2 table, or NULL
    uint64_t n_cached           # number of non-NULL l2_cache entries
    uint64_t rt_offset          # refcount table
    uint64_t rt_entries
    int refcount_order
    uint64_t rb_shift           # log2(refblock entries)
    uint64_t rc_max
    uint64_t free_hint          # lowest cluster index that may be free
    uint64_t *pend_free         # cluster indexes whose refcount drops after the next writeback
    uint64_t n_pend
    uint64_t cap_pend
    uint64_t meta_lo[4]         # fixed metadata ranges we must never allocate or write over
    uint64_t meta_hi[4]
    int data_dirty              # something was written since the last flush
    int sticky_errno            # a failed sync: every later flush fails (D4)
    int compression_type        # 0 deflate, 1 zstd
    int pread_data              # copy guest data with pread, not from the mapping (tmpfs:
                                #   a read fault on a hole of a full tmpfs is a SIGBUS)
    uint8_t *scratch            # one cluster, for copy-up assembly
    uint8_t *zeros              # one cluster of zeros (calloc: untouched pages cost no memory)
    uint8_t *zbuf               # one decompressed cluster
    uint64_t zbuf_key           # host descriptor held in zbuf (0 = none)
    Layer *backing
    OwnerMap *omap              # set on the leaf's backing when that has a backing of its own
    uint64_t *meta_idx          # sorted cluster indexes of refblocks and L2 tables at open:
    uint64_t n_meta             #   never written as data, never handed out by the allocator
    int err_code                # last error: one of the E_* codes
    int err_errno
    uint64_t err_offset
    const char *err_msg
    Layer *err_layer            # the layer of the chain where the last error happened
    pthread_rwlock_t lock       # readers share, writers exclude (top-level entry points only)
    uint8_t ra_pad0[64]         # the readahead hints are written by every reader: keep them
    uint64_t ra_next            #   off the cache lines of the fields above. Readahead of our
    uint64_t ra_end             #   own (the mapping is MADV_RANDOM): where a sequential read
    uint64_t ra_win             #   would start next, the end of what was asked ahead, and
    uint8_t ra_pad1[64]         #   the window (0 after a random read)
