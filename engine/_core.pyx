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

# One compiled module, split into rooms by concern.  Each .pxi below is included textually (so
# the C compiler still sees one translation unit and inlines across rooms); the order matters
# only for compile-time constants, which are defined before their first use.

include "_core_src/structs.pxi"      # cimports, C declarations, entry masks, kinds, flags, modes
include "_core_src/errors.pxi"       # error codes, fail()/take_err(): how a layer records an error
include "_core_src/seams.pxi"        # test seams: I/O shim with injected faults, named hooks, barrier
include "_core_src/alloc.pxi"        # file growth, metadata overlap, refcounts and cluster allocation
include "_core_src/lookup.pxi"       # L1/L2 lookup: what a guest range maps to
include "_core_src/reads.pxi"        # reads (plain, compressed, batched) and the owner map
include "_core_src/writes.pxi"       # L2 cache, writeback, writes, copy-up, zeroing, raw pwrite
include "_core_src/subclusters.pxi"  # extended L2: writes, zeroing and discard by subcluster
include "_core_src/status.pxi"       # block status: extents; the one place runs are coalesced
include "_core_src/coreimage.pxi"    # CoreImage, the Python-facing handle; argument rules
include "_core_src/bgsync.pxi"       # BackgroundSync: fdatasync on a native thread for create()
include "_core_src/copy.pxi"         # bulk copy: runs of a chain into an image (export, commit, pull)
include "_core_src/nbdsend.pxi"      # NBD read replies sent straight from the mappings

_arm_from_env()
