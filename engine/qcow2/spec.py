"""Every on-disk constant, offset, mask and limit of QCOW2, in one place.

Values follow QEMU's public specification (``docs/interop/qcow2.txt``) and QEMU 7.2's
limits; the section numbers in comments (§1.1, ...) refer to the project's
``docs/on-disk.md``, which summarises that specification.  Nothing here does I/O or
computes: the codecs in this package (:mod:`engine.qcow2.header`, ``.snapshots``,
``.refblocks``, ``.layout``) and the check read their rules from these names.  The compiled
core mirrors a few of them (entry masks); ``tests/test_qcow2_units.py`` proves they agree.
"""

from __future__ import annotations

import struct



KiB = 1024
MiB = 1024 * KiB

# --- §1.1 Fixed header -------------------------------------------------------------------
# All integers are big-endian.  The v2 header ends at 72; v3 adds feature words, the
# refcount order, header_length and (since QEMU 5.1) the compression type byte plus padding.
QCOW_MAGIC = 0x514649FB                 # b"QFI\xfb"
QCOW_MAGIC_BYTES = b"QFI\xfb"
HDR_MAGIC = 0                           # u32
HDR_VERSION = 4                         # u32: 2 or 3
HDR_BACKING_FILE_OFFSET = 8             # u64: 0 = no backing file
HDR_BACKING_FILE_SIZE = 16              # u32: name length in bytes, no NUL
HDR_CLUSTER_BITS = 20                   # u32
HDR_SIZE = 24                           # u64: virtual size in bytes
HDR_CRYPT_METHOD = 32                   # u32
HDR_L1_SIZE = 36                        # u32: active L1 entries
HDR_L1_TABLE_OFFSET = 40                # u64
HDR_REFCOUNT_TABLE_OFFSET = 48          # u64
HDR_REFCOUNT_TABLE_CLUSTERS = 56        # u32
HDR_NB_SNAPSHOTS = 60                   # u32
HDR_SNAPSHOTS_OFFSET = 64               # u64
HDR_INCOMPATIBLE_FEATURES = 72          # u64, v3 only
HDR_COMPATIBLE_FEATURES = 80            # u64, v3 only
HDR_AUTOCLEAR_FEATURES = 88             # u64, v3 only
HDR_REFCOUNT_ORDER = 96                 # u32, v3 only (v2: always 4)
HDR_HEADER_LENGTH = 100                 # u32, v3 only (v2: always 72)
HDR_COMPRESSION_TYPE = 104              # u8, present only if header_length > 104
HDR_PADDING = 105                       # 7 bytes, must be zero

V2_HEADER_LENGTH = 72                   # the whole v2 header; its extensions start here
V3_MIN_HEADER_LENGTH = 104              # QEMU refuses shorter v3 headers
V3_HEADER_LENGTH = 112                  # what QEMU >= 5.1 writes (sizeof(QCowHeader))
HEADER_LENGTH_ALIGN = 8                 # spec: v3 header_length is a multiple of 8

# The fixed v2 fields in file order (struct QCowHeader up to snapshots_offset).
V2_STRUCT = struct.Struct(">IIQIIQIIQQIIQ")
# The v3 additions from offset 72 to 104 (features, refcount order, header_length).
V3_STRUCT = struct.Struct(">QQQII")
assert V2_STRUCT.size == V2_HEADER_LENGTH and V3_STRUCT.size == V3_MIN_HEADER_LENGTH - 72

SUPPORTED_VERSIONS = (2, 3)

# cluster_bits: the spec allows >= 9; QEMU accepts only 9..21 (512 B .. 2 MiB).
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

# crypt_method (§1.1).  We implement none of the encryption methods.
CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

# compression_type (§1.3).  Byte 104; must agree with incompatible bit 3.
COMPRESSION_ZLIB = 0                    # raw deflate, QEMU's name "zlib"
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# --- §1.2 Feature bits -------------------------------------------------------------------
INCOMPAT_DIRTY_BIT = 0                  # refcounts may be stale (lazy refcounts)
INCOMPAT_CORRUPT_BIT = 1                # read-write open refused except for repair
INCOMPAT_DATA_FILE_BIT = 2              # guest data in an external file
INCOMPAT_COMPRESSION_BIT = 3            # compression_type != 0
INCOMPAT_EXTL2_BIT = 4                  # 128-bit L2 entries with 32 subclusters
INCOMPAT_DIRTY = 1 << INCOMPAT_DIRTY_BIT
INCOMPAT_CORRUPT = 1 << INCOMPAT_CORRUPT_BIT
INCOMPAT_DATA_FILE = 1 << INCOMPAT_DATA_FILE_BIT
INCOMPAT_COMPRESSION = 1 << INCOMPAT_COMPRESSION_BIT
INCOMPAT_EXTL2 = 1 << INCOMPAT_EXTL2_BIT
INCOMPAT_MASK = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                 | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)   # bits QEMU 7.2 knows

COMPAT_LAZY_REFCOUNTS_BIT = 0
COMPAT_LAZY_REFCOUNTS = 1 << COMPAT_LAZY_REFCOUNTS_BIT
COMPAT_MASK = COMPAT_LAZY_REFCOUNTS

AUTOCLEAR_BITMAPS_BIT = 0               # the bitmaps extension is consistent
AUTOCLEAR_DATA_FILE_RAW_BIT = 1         # the data file is a valid raw image (needs incompat 2)
AUTOCLEAR_BITMAPS = 1 << AUTOCLEAR_BITMAPS_BIT
AUTOCLEAR_DATA_FILE_RAW = 1 << AUTOCLEAR_DATA_FILE_RAW_BIT
AUTOCLEAR_MASK = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

FEATURE_TYPE_INCOMPATIBLE = 0
FEATURE_TYPE_COMPATIBLE = 1
FEATURE_TYPE_AUTOCLEAR = 2

# §2.4: the feature-name table QEMU 7.2 writes, in its order: (type, bit, name).
QEMU_FEATURE_TABLE: tuple[tuple[int, int, str], ...] = (
    (FEATURE_TYPE_INCOMPATIBLE, INCOMPAT_DIRTY_BIT, "dirty bit"),
    (FEATURE_TYPE_INCOMPATIBLE, INCOMPAT_CORRUPT_BIT, "corrupt bit"),
    (FEATURE_TYPE_INCOMPATIBLE, INCOMPAT_DATA_FILE_BIT, "external data file"),
    (FEATURE_TYPE_INCOMPATIBLE, INCOMPAT_COMPRESSION_BIT, "compression type"),
    (FEATURE_TYPE_INCOMPATIBLE, INCOMPAT_EXTL2_BIT, "extended L2 entries"),
    (FEATURE_TYPE_COMPATIBLE, COMPAT_LAZY_REFCOUNTS_BIT, "lazy refcounts"),
    (FEATURE_TYPE_AUTOCLEAR, AUTOCLEAR_BITMAPS_BIT, "bitmaps"),
    (FEATURE_TYPE_AUTOCLEAR, AUTOCLEAR_DATA_FILE_RAW_BIT, "raw external data"),
)
FEATURE_ENTRY_SIZE = 48                 # u8 type, u8 bit, 46-byte zero-padded name
FEATURE_NAME_SIZE = 46
# QEMU writes the feature table only for v3 images with clusters larger than this: a 4 KiB
# cluster 0 would otherwise have little room left for the backing name (§2.3, obs 7.2).
FEATURE_TABLE_MIN_CLUSTER_SIZE = 4096

# --- §2 Header extensions ----------------------------------------------------------------
# Record: u32 type, u32 length, data, zero padding to a multiple of 8.
EXT_HEADER_SIZE = 8
EXT_ALIGN = 8
EXT_MAGIC_END = 0x00000000
EXT_MAGIC_BACKING_FORMAT = 0xE2792ACA
EXT_MAGIC_FEATURE_TABLE = 0x6803F857
EXT_MAGIC_BITMAPS = 0x23852875
EXT_MAGIC_CRYPTO_HEADER = 0x0537BE77
EXT_MAGIC_DATA_FILE = 0x44415441
KNOWN_EXTENSIONS = {
    EXT_MAGIC_BACKING_FORMAT: "backing file format",
    EXT_MAGIC_FEATURE_TABLE: "feature name table",
    EXT_MAGIC_BITMAPS: "bitmaps",
    EXT_MAGIC_CRYPTO_HEADER: "full disk encryption header pointer",
    EXT_MAGIC_DATA_FILE: "external data file name",
}
MAX_BACKING_FORMAT_LEN = 15             # QEMU: len < sizeof(bs->backing_format) == 16
BITMAPS_EXT_SIZE = 24                   # u32 nb_bitmaps, u32 reserved, u64 dir size, u64 dir offset
BITMAPS_EXT_STRUCT = struct.Struct(">IIQQ")
CRYPTO_EXT_SIZE = 16                    # u64 offset, u64 length
CRYPTO_EXT_STRUCT = struct.Struct(">QQ")
MAX_BITMAPS = 65535                     # QCOW2_MAX_BITMAPS
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS  # QCOW2_MAX_BITMAP_DIRECTORY_SIZE
# The bitmap directory and bitmap tables (qcow2.txt "Bitmaps"), as QEMU's bitmap_list_load
# checks them.
BME_DIR_ENTRY_SIZE = 24                 # fixed part of a bitmap directory entry
# table offset, table size, flags, type, granularity bits, name size, extra data size
BME_DIR_ENTRY_STRUCT = struct.Struct(">QIIBBHI")
BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00    # bitmap table entry: bits 9..55, data cluster offset
BME_RESERVED_MASK = 0xFF000000000001FE  # bitmap table entry: reserved bits
BME_ALL_ONES = 1                        # bitmap table entry: the cluster reads as all ones
BME_MAX_TABLE_SIZE = 0x8000000          # entries of one bitmap table
BME_MAX_PHYS_SIZE = 0x20000000          # bytes of bitmap data
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_NAME_SIZE = 1023
BME_FLAG_IN_USE = 1
BME_RESERVED_FLAGS = 0xFFFFFFFC
BITMAP_TYPE_DIRTY_TRACKING = 1

# --- §3 Backing file name ----------------------------------------------------------------
MAX_BACKING_NAME = 1023                 # QEMU refuses longer names on open and on write
PATH_MAX = 4096                         # QEMU also requires len < sizeof(bs->backing_file)

# --- §4 L1 and L2 tables -----------------------------------------------------------------
L1E_SIZE = 8
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00    # bits 9..55: L2 table offset
L1E_RESERVED_MASK = 0x7F000000000001FF  # bits 0..8 and 56..62 must be zero
QCOW_OFLAG_COPIED = 1 << 63             # refcount is exactly 1 (L1 and standard L2 entries)
QCOW_OFLAG_COMPRESSED = 1 << 62         # L2: compressed cluster descriptor
QCOW_OFLAG_ZERO = 1                     # L2: reads as zeros (v3, standard L2 only)
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00    # bits 9..55: host cluster offset
L2E_RESERVED_MASK = 0x3F000000000001FE  # bits 1..8 and 56..61 of a standard entry
L2E_SIZE_NORMAL = 8
L2E_SIZE_EXTENDED = 16                  # u64 entry + u64 subcluster bitmap
SUBCLUSTERS_PER_CLUSTER = 32            # extended L2
L2_BITMAP_ALL_ALLOC = 0xFFFFFFFF        # extended L2 bitmap: low half allocated, high half zero
COMPRESSED_SECTOR_SIZE = 512            # compressed descriptors count 512-byte sectors
MIN_SUBCLUSTER_SIZE = 1 << MIN_CLUSTER_BITS  # so extended L2 needs 16 KiB clusters
EXTL2_MIN_CLUSTER_SIZE = SUBCLUSTERS_PER_CLUSTER * MIN_SUBCLUSTER_SIZE

# --- §5 Refcounts ------------------------------------------------------------------------
REFTABLE_ENTRY_SIZE = 8
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00   # bits 9..63: refblock offset
REFT_RESERVED_MASK = 0x1FF
MAX_REFCOUNT_ORDER = 6                  # 64-bit refcounts
DEFAULT_REFCOUNT_ORDER = 4              # 16-bit; the only width v2 allows

# --- §6 Snapshot table -------------------------------------------------------------------
SNAPSHOT_HEADER_SIZE = 40               # fixed part of QCowSnapshotHeader
SNAPSHOT_HEADER_STRUCT = struct.Struct(">QIHHIIQII")
assert SNAPSHOT_HEADER_STRUCT.size == SNAPSHOT_HEADER_SIZE
SNAPSHOT_EXTRA_SIZE = 24                # QCowSnapshotExtraData QEMU 7.2 writes
SNAPSHOT_EXTRA_STRUCT = struct.Struct(">QQQ")
SNAPSHOT_EXTRA_VM_STATE_END = 8         # extra_data_size needed for vm_state_size_large
SNAPSHOT_EXTRA_DISK_SIZE_END = 16       # ... for disk_size (v3 minimum)
SNAPSHOT_EXTRA_ICOUNT_END = 24          # ... for icount
SNAPSHOT_ENTRY_ALIGN = 8
SNAPSHOT_ICOUNT_NONE = 0xFFFFFFFFFFFFFFFF
MAX_U32 = 0xFFFFFFFF
MAX_U16 = 0xFFFF
MAX_U64 = 0xFFFFFFFFFFFFFFFF

# --- §8.1 QEMU limits against hostile images ---------------------------------------------
MAX_L1_SIZE = 32 * MiB                  # QCOW_MAX_L1_SIZE, bytes of the active/snapshot L1
MAX_L1_ENTRIES = MAX_L1_SIZE // L1E_SIZE
MAX_REFTABLE_SIZE = 8 * MiB             # QCOW_MAX_REFTABLE_SIZE, bytes
MAX_SNAPSHOTS = 65536                   # QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOT_EXTRA = 1024               # QCOW_MAX_SNAPSHOT_EXTRA_DATA, bytes per entry
MAX_SNAPSHOTS_SIZE = 1024 * MAX_SNAPSHOTS  # QCOW_MAX_SNAPSHOTS_SIZE: 64 MiB of table
MAX_CLUSTER_OFFSET = 1 << 56            # host offsets must be below this
INT64_MAX = (1 << 63) - 1               # QEMU validates offset + size against int64
INT_MAX = (1 << 31) - 1                 # l1_vm_state_index must fit in an int
# The block layer's largest disk, whatever the format (BDRV_MAX_LENGTH: INT64_MAX aligned
# down to the largest request alignment, 1 GiB).  A qcow2 disk is further bounded by its L1
# (MAX_L1_ENTRIES tables of one cluster each): see max_virtual_size().
MAX_DISK_LENGTH = INT64_MAX // (1 << 30) * (1 << 30)   # also: a read past it is an EIO

# --- qemu-img create ---------------------------------------------------------------------
SECTOR_SIZE = 512                       # qemu-img create rounds the size up to this
DEFAULT_CLUSTER_SIZE = 64 * KiB
COMPAT_V2 = "0.10"
COMPAT_V3 = "1.1"
COMPAT_VERSIONS = {COMPAT_V2: 2, COMPAT_V3: 3, "v2": 2, "v3": 3}
# qemu-img create lays out: header, one reftable cluster, the first refblock (§1.4).
CREATE_HEADER_CLUSTERS = 3


U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

FORMATS = ("qcow2", "raw")
