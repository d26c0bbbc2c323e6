"""QCOW2 header, header extensions and snapshot table: parse, validate and build.

This is the cold path of the engine, in pure Python: it runs once per open or per metadata
update, never per cluster.  Everything here follows QEMU 7.2 (``block/qcow2.c``,
``block/qcow2-snapshot.c``, ``block/qcow2-refcount.c``) and the summary in
``docs/on-disk.md``; section numbers in comments (§1.1, ...) refer to that file.

Public functions:

- :func:`parse_header` validates cluster 0 the way QEMU does at open, and more where a hostile
  image could hurt us (tables past the end of the file, tables over the header), and returns a
  :class:`Header`.
- :func:`encode_header` builds cluster 0 byte for byte as QEMU's ``qcow2_update_header``.
- :func:`new_image_layout` returns the exact bytes ``qemu-img create -f qcow2`` writes for a new
  empty image (it replays QEMU's cluster allocator, see :class:`_CreateAllocator`).
- :func:`parse_snapshot_table`, :func:`snapshot_table_size`, :func:`encode_snapshot_table`
  read and build the internal-snapshot table (§6.1).
- :func:`info_fields` gives ``format-specific.data`` as ``qemu-img info`` prints it (§10.1).

Every error raised is an :class:`~engine.errors.EngineError` subclass, whatever the input
bytes: every read is bounds-checked against the buffer first.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field
from typing import Any

from engine.errors import (
    CorruptImage,
    EngineError,
    ImageFormatError,
    InvalidArgument,
    SafetyLimitExceeded,
    UnsupportedFeature,
)

__all__ = [
    "Header",
    "SnapshotEntry",
    "parse_header",
    "encode_header",
    "new_image_layout",
    "parse_snapshot_table",
    "snapshot_table_size",
    "encode_snapshot_table",
    "info_fields",
    "l1_entries_for",
]

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
_V2_STRUCT = struct.Struct(">IIQIIQIIQQIIQ")
# The v3 additions from offset 72 to 104 (features, refcount order, header_length).
_V3_STRUCT = struct.Struct(">QQQII")
assert _V2_STRUCT.size == V2_HEADER_LENGTH and _V3_STRUCT.size == V3_MIN_HEADER_LENGTH - 72

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
_BITMAPS_EXT = struct.Struct(">IIQQ")
CRYPTO_EXT_SIZE = 16                    # u64 offset, u64 length
MAX_BITMAPS = 65535                     # QCOW2_MAX_BITMAPS
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS  # QCOW2_MAX_BITMAP_DIRECTORY_SIZE

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
_SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")
assert _SNAPSHOT_HEADER.size == SNAPSHOT_HEADER_SIZE
SNAPSHOT_EXTRA_SIZE = 24                # QCowSnapshotExtraData QEMU 7.2 writes
_SNAPSHOT_EXTRA = struct.Struct(">QQQ")
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
MAX_DISK_LENGTH = INT64_MAX // (1 << 30) * (1 << 30)

# --- qemu-img create ---------------------------------------------------------------------
SECTOR_SIZE = 512                       # qemu-img create rounds the size up to this
DEFAULT_CLUSTER_SIZE = 64 * KiB
COMPAT_V2 = "0.10"
COMPAT_V3 = "1.1"
COMPAT_VERSIONS = {COMPAT_V2: 2, COMPAT_V3: 3, "v2": 2, "v3": 3}
# qemu-img create lays out: header, one reftable cluster, the first refblock (§1.4).
CREATE_HEADER_CLUSTERS = 3


_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


# =========================================================================================
# Header
# =========================================================================================

@dataclass
class Header:
    """The parsed QCOW2 header and its extensions (§1, §2, §3).

    Integer fields are the raw on-disk values: offsets and sizes in bytes, except where the
    name says clusters or entries.  v2 images read as ``refcount_order=4``,
    ``header_length=72`` and no feature bits.  Derived values (cluster size, L2 geometry,
    refcount width, feature flags) are properties.
    """

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int                           # virtual size, bytes
    crypt_method: int
    l1_size: int                        # entries
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = DEFAULT_REFCOUNT_ORDER
    header_length: int = V3_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    # Bytes from 112 up to header_length: unknown newer fields, kept and written back.
    extra_header: bytes = b""
    # Names are decoded as UTF-8 with surrogateescape, so any byte string round-trips.
    backing_file: str | None = None
    backing_format: str | None = None   # extension 0xE2792ACA
    data_file: str | None = None        # extension 0x44415441
    # Raw 24 bytes of the bitmaps extension; kept only when autoclear bit 0 is set, as QEMU
    # does (a clear bit means a program without bitmap support touched the image).
    bitmaps_ext: bytes | None = None
    fde_ext: bytes | None = None        # raw 16 bytes of 0x0537BE77 (LUKS only)
    # (type, bit, name) as read; informational: encode_header writes QEMU's own table.
    feature_table: list[tuple[int, int, str]] = field(default_factory=list)
    # (magic, data) of extensions we do not know, in file order; written back.
    unknown_extensions: list[tuple[int, bytes]] = field(default_factory=list)

    # -- geometry ---------------------------------------------------------------------------
    @property
    def cluster_size(self) -> int:
        """Cluster size in bytes."""
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        """True if L2 entries are 128-bit with 32 subclusters (incompatible bit 4)."""
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        """Bytes per L2 entry: 8, or 16 with extended L2."""
        return L2E_SIZE_EXTENDED if self.extended_l2 else L2E_SIZE_NORMAL

    @property
    def l2_bits(self) -> int:
        """log2 of the entries in one L2 table (one cluster)."""
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def l2_entries(self) -> int:
        """Entries in one L2 table."""
        return 1 << self.l2_bits

    @property
    def subcluster_size(self) -> int:
        """Bytes per subcluster (the cluster size without extended L2)."""
        return self.cluster_size // (SUBCLUSTERS_PER_CLUSTER if self.extended_l2 else 1)

    def l1_entries_needed(self, size: int | None = None) -> int:
        """Minimum L1 entries for a virtual size in bytes (default: this image's size)."""
        return l1_entries_for(self.size if size is None else size, self.cluster_bits,
                              self.extended_l2)

    # -- refcounts ----------------------------------------------------------------------------
    @property
    def refcount_bits(self) -> int:
        """Width of one refcount entry in bits (1..64)."""
        return 1 << self.refcount_order

    @property
    def refcount_max(self) -> int:
        """Largest refcount value an entry can hold."""
        return (1 << self.refcount_bits) - 1

    @property
    def refblock_entries(self) -> int:
        """Refcount entries in one refcount block (one cluster)."""
        return (self.cluster_size * 8) >> self.refcount_order

    @property
    def reftable_entries(self) -> int:
        """Entries in the refcount table (refcount_table_clusters clusters of u64)."""
        return self.refcount_table_clusters * self.cluster_size // REFTABLE_ENTRY_SIZE

    # -- features ---------------------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        """Incompatible bit 0: refcounts may be stale; a read-write open must repair."""
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        """Incompatible bit 1: the image may only be opened read-only (or for repair)."""
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        """Compatible bit 0: refcount updates may be deferred behind the dirty bit."""
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    @property
    def has_data_file(self) -> bool:
        """Incompatible bit 2: guest data lives in an external data file."""
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        """Autoclear bit 1: the external data file is a valid raw image on its own."""
        return bool(self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    @property
    def has_bitmaps(self) -> bool:
        """True if a consistent bitmaps extension is present."""
        return self.bitmaps_ext is not None

    @property
    def compat(self) -> str:
        """qemu-img's name of the version: "0.10" for v2, "1.1" for v3."""
        return COMPAT_V2 if self.version == 2 else COMPAT_V3

    @property
    def compression_name(self) -> str:
        """"zlib" or "zstd" (QEMU's names)."""
        return COMPRESSION_NAMES.get(self.compression_type, f"unknown-{self.compression_type}")

    @property
    def extension_area_start(self) -> int:
        """Offset in cluster 0 where the header extensions start."""
        return V2_HEADER_LENGTH if self.version == 2 else self.header_length


def l1_entries_for(size: int, cluster_bits: int, extended_l2: bool = False) -> int:
    """Number of L1 entries needed to map ``size`` bytes (QEMU's ``size_to_l1``).

    Arguments:
        size (int): virtual size in bytes.
        cluster_bits (int): log2 of the cluster size.
        extended_l2 (bool): 16-byte L2 entries (half as many per table).
    """
    size = int_arg(size, "size")
    cluster_bits = int_arg(cluster_bits, "cluster_bits", minimum=MIN_CLUSTER_BITS,
                           maximum=MAX_CLUSTER_BITS)
    shift = cluster_bits + cluster_bits - (4 if bool_arg(extended_l2, "extended_l2") else 3)
    return (size + (1 << shift) - 1) >> shift


FORMATS = ("qcow2", "raw")


# --- argument checks shared by the public API (engine.image and this module) ----------------
# A bad argument is an InvalidArgument carrying the value passed, never a TypeError from deep
# inside, and never a silent coercion: a bool is not an int, a float is not an offset, and a
# truthy string is not True.

def int_arg(value: Any, name: str, *, minimum: int = 0, maximum: int = MAX_U64) -> int:
    """``value`` as a Python int: any integer type (numpy's too), never a bool or a float,
    within [minimum, maximum]."""
    try:
        if isinstance(value, bool):
            raise TypeError
        n = int(value.__index__())  # a numpy array has __index__, and raises TypeError
    except (TypeError, AttributeError):
        raise InvalidArgument(f"{name} must be an integer, not {value!r}",
                              value=value) from None
    if not minimum <= n <= maximum:
        raise InvalidArgument(f"{name} must be between {minimum} and {maximum}, not {n}",
                              value=value)
    return n


def bool_arg(value: Any, name: str) -> bool:
    """``value`` if it is True or False (no truthiness: readonly="no" is refused)."""
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be True or False, not {value!r}", value=value)
    return value


def choice_arg(value: Any, name: str, choices: tuple[str, ...], *,
               optional: bool = False) -> Any:
    """``value`` if it is one of ``choices`` (strings), or None when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgument(f"unknown {name} {value!r} (use "
                              f"{' or '.join(repr(c) for c in choices)})", value=value)
    return value


def cluster_size_arg(value: Any) -> int:
    """A cluster size: a power of two from 512 bytes to 2 MiB."""
    n = int_arg(value, "cluster_size")
    if n & (n - 1) or not 1 << MIN_CLUSTER_BITS <= n <= 1 << MAX_CLUSTER_BITS:
        raise InvalidArgument(f"cluster size must be a power of two between "
                              f"{1 << MIN_CLUSTER_BITS} and {1 << MAX_CLUSTER_BITS} bytes, "
                              f"got {n}", value=value)
    return n


def _buffer_arg(value: Any, name: str) -> Any:
    """``value`` itself if it exports the buffer protocol (a str or an int does not count:
    bytes(5) would be five zero bytes)."""
    if isinstance(value, (bytes, bytearray)):
        return value
    try:
        if isinstance(value, (str, int)):
            raise TypeError
        memoryview(value)
    except TypeError:
        raise InvalidArgument(f"{name} must be a bytes-like object, not "
                              f"{type(value).__name__}", value=value) from None
    return value


def _header_arg(value: Any) -> "Header":
    if not isinstance(value, Header):
        raise InvalidArgument(f"h must be a Header, not {type(value).__name__}", value=value)
    return value


def size_text(n: int) -> str:
    """Bytes as people write them: "16 EiB", "64 KiB", "1536 bytes"; a size that is not a
    whole number of its unit also shows the exact byte count."""
    for shift, unit in ((60, "EiB"), (50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB"),
                        (10, "KiB")):
        if n >= 1 << shift:
            if n % (1 << shift) == 0:
                return f"{n >> shift} {unit}"
            return f"{n} bytes (~{n / (1 << shift):.1f} {unit})"
    return f"{n} bytes"


def max_virtual_size(format: str = "qcow2", cluster_size: int = DEFAULT_CLUSTER_SIZE,
                     extended_l2: bool = False) -> int:
    """The largest virtual size QEMU accepts for an image of this format and geometry.

    qcow2: the L1 table may hold at most ``QCOW_MAX_L1_SIZE`` (32 MiB) of entries, each
    mapping one L2 table of ``cluster_size / 8`` clusters (``/ 16`` with extended L2), so
    64 KiB clusters reach 2 PiB and 2 MiB clusters 2 EiB (QEMU's ``qcow2_grow_l1_table``
    refuses more with EFBIG).  Every format: the block layer's ``BDRV_MAX_LENGTH``
    (2^63 - 1 GiB).

    Arguments:
        format (str): "qcow2" or "raw".
        cluster_size (int): bytes (qcow2 only).
        extended_l2 (bool): 16-byte L2 entries (qcow2 only).

    Returns:
        int: bytes.
    """
    if choice_arg(format, "format", FORMATS) == "raw":
        return MAX_DISK_LENGTH
    cluster_bits = cluster_size_arg(cluster_size).bit_length() - 1
    bool_arg(extended_l2, "extended_l2")
    per_l1_entry = 1 << (2 * cluster_bits - (4 if extended_l2 else 3))
    return min(MAX_L1_ENTRIES * per_l1_entry, MAX_DISK_LENGTH)


def check_virtual_size(size: Any, format: str = "qcow2", *, cluster_size: int = DEFAULT_CLUSTER_SIZE,
                       extended_l2: bool = False, what: str = "virtual size") -> int:
    """The one rule for a disk size a caller asks for (create, resize, a new chain): a
    non-negative integer (``bool`` is not one) no larger than :func:`max_virtual_size`.
    A qcow2 size is taken as rounded up to 512 bytes, as ``qemu-img create`` rounds it.

    Arguments:
        size (int): bytes; any integer type (numpy integers too), never a float or a string.
        format, cluster_size, extended_l2: as for :func:`max_virtual_size`.
        what (str): how the message names the size.

    Returns:
        int: ``size`` as a Python int.

    Raises:
        InvalidArgument: not an integer, negative, or over the limit; the message states the
            limit and ``value`` holds the size passed.
    """
    if isinstance(size, bool) or not hasattr(size, "__index__"):
        raise InvalidArgument(f"{what} must be an integer number of bytes, not {size!r}",
                              value=size)
    n = int(size.__index__())
    if n < 0:
        raise InvalidArgument(f"{what} must not be negative, got {n}", value=size)
    limit = max_virtual_size(format, cluster_size, extended_l2)
    rounded = -(-n // SECTOR_SIZE) * SECTOR_SIZE if format == "qcow2" else n
    if rounded > limit:
        if format == "qcow2":
            geometry = f" for {size_text(cluster_size)} clusters" + (
                " with extended L2 entries" if extended_l2 else "")
            hint = ("use a smaller size" if cluster_size >= 1 << MAX_CLUSTER_BITS else
                    f"use a smaller size, or larger clusters: 2 MiB clusters allow up to "
                    f"{size_text(max_virtual_size('qcow2', 1 << MAX_CLUSTER_BITS, extended_l2))}")
        else:
            geometry, hint = "", "use a smaller size"
        raise InvalidArgument(f"{what} {size_text(n)} is over the {format} maximum of "
                              f"{size_text(limit)}{geometry}", value=size, hint=hint)
    return n


def _decode_name(raw: bytes) -> str:
    # surrogateescape: a name that is not UTF-8 still round-trips to the same bytes.
    return raw.decode("utf-8", "surrogateescape")


def _encode_name(name: str, what: str) -> bytes:
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise InvalidArgument(f"{what} {name!r} cannot be encoded: {e}") from None


class _Reader:
    """Bounds-checked big-endian reads from a bytes object.

    A read outside the buffer raises ``error_class`` (a programming slip here must still
    surface as an EngineError, never as struct.error or IndexError).
    """

    __slots__ = ("buf", "path", "error_class")

    def __init__(self, buf: bytes, path: str | None,
                 error_class: type[EngineError] = ImageFormatError) -> None:
        self.buf = buf
        self.path = path
        self.error_class = error_class

    def _check(self, off: int, n: int) -> None:
        if off < 0 or n < 0 or off + n > len(self.buf):
            raise self.error_class(f"read of {n} bytes at offset {off} is outside the "
                                   f"{len(self.buf)}-byte buffer", path=self.path)

    def u8(self, off: int) -> int:
        self._check(off, 1)
        return self.buf[off]

    def u32(self, off: int) -> int:
        self._check(off, 4)
        return int(_U32.unpack_from(self.buf, off)[0])

    def u64(self, off: int) -> int:
        self._check(off, 8)
        return int(_U64.unpack_from(self.buf, off)[0])

    def bytes(self, off: int, n: int) -> bytes:
        self._check(off, n)
        return bytes(self.buf[off:off + n])


def _format_error(msg: str, path: str | None) -> ImageFormatError:
    return ImageFormatError(msg, path=path)


def _validate_table(name: str, offset: int, entries: int, entry_len: int, max_bytes: int,
                    cluster_size: int, file_size: int, path: str | None,
                    *, check_eof: bool = True) -> None:
    """QEMU's ``qcow2_validate_table`` plus the checks a hostile file needs.

    Order as in QEMU: the size limit first (SafetyLimitExceeded), then offset alignment and
    int64 overflow (CorruptImage).  Then ours: a non-empty table must not overlap the header
    cluster and must lie inside the file.
    """
    if entries > max_bytes // entry_len:
        raise SafetyLimitExceeded(
            f"{name} too large: {entries} entries of {entry_len} bytes, limit {max_bytes} bytes",
            limit=max_bytes, path=path)
    nbytes = entries * entry_len
    if INT64_MAX - nbytes < offset:
        raise CorruptImage(f"{name} offset {offset:#x} + {nbytes} bytes overflows",
                           offset=offset, path=path)
    if offset % cluster_size:
        raise CorruptImage(f"{name} offset {offset:#x} is not aligned to the cluster size "
                           f"{cluster_size}", offset=offset, path=path)
    if entries == 0:
        return
    if offset < cluster_size:
        raise CorruptImage(f"{name} at offset {offset:#x} overlaps the image header",
                           offset=offset, path=path)
    if check_eof and offset + nbytes > file_size:
        raise CorruptImage(f"{name} at {offset:#x} ({nbytes} bytes) lies past the end of the "
                           f"file ({file_size} bytes)", offset=offset, path=path)


def _unsupported_incompat_names(bits: int, table: list[tuple[int, int, str]]) -> list[str]:
    """Names for unknown incompatible bits, from the image's own table where it has them
    (as QEMU's report_unsupported_feature does)."""
    names = []
    for bit in range(64):
        if not bits >> bit & 1:
            continue
        name = next((n for t, b, n in table if t == FEATURE_TYPE_INCOMPATIBLE and b == bit
                     and n), None)
        names.append(name if name else f"unknown incompatible feature bit {bit}")
    return names


@dataclass
class _Extensions:
    backing_format: str | None = None
    data_file: str | None = None
    bitmaps_ext: bytes | None = None
    fde_ext: bytes | None = None
    feature_table: list[tuple[int, int, str]] = field(default_factory=list)
    unknown: list[tuple[int, bytes]] = field(default_factory=list)


def _parse_feature_table(data: bytes) -> list[tuple[int, int, str]]:
    # QEMU uses the table only to name bits; it does not reject odd lengths, so neither do
    # we: a trailing partial entry is ignored.
    table = []
    for off in range(0, len(data) - FEATURE_ENTRY_SIZE + 1, FEATURE_ENTRY_SIZE):
        ftype, bit = data[off], data[off + 1]
        raw = data[off + 2:off + FEATURE_ENTRY_SIZE].split(b"\0", 1)[0]
        table.append((ftype, bit, raw.decode("utf-8", "replace")))
    return table


def _read_extensions(c0: _Reader, start: int, end: int, h_autoclear: int, crypt_method: int,
                     cluster_size: int, path: str | None, *, lenient: bool = False
                     ) -> _Extensions:
    """Walk the header extensions in cluster 0 between ``start`` and ``end`` (§2.1).

    With ``lenient``, stop quietly at the first problem (used only to fetch the feature
    table for naming unknown incompatible bits, where QEMU ignores extension errors too).
    """
    ext = _Extensions()
    seen: set[int] = set()
    off = start
    while off < end:
        if off + EXT_HEADER_SIZE > end:
            if lenient:
                break
            raise _format_error(f"header extension at offset {off} runs past the end of the "
                                f"extension area ({end})", path)
        magic = c0.u32(off)
        length = c0.u32(off + 4)
        off += EXT_HEADER_SIZE
        if length > end - off:
            if lenient:
                break
            raise _format_error(f"header extension {magic:#010x} too large: {length} bytes "
                                f"at offset {off}, area ends at {end}", path)
        if magic == EXT_MAGIC_END:
            break
        data = c0.bytes(off, length)
        off += (length + EXT_ALIGN - 1) & ~(EXT_ALIGN - 1)
        if magic in KNOWN_EXTENSIONS:
            if magic in seen and not lenient:
                raise _format_error(f"duplicate header extension {magic:#010x} "
                                    f"({KNOWN_EXTENSIONS[magic]})", path)
            seen.add(magic)
        if magic == EXT_MAGIC_FEATURE_TABLE:
            # (lenient: every table counts for naming bits)
            ext.feature_table += _parse_feature_table(data)
        elif lenient:
            continue
        elif magic == EXT_MAGIC_BACKING_FORMAT:
            if length > MAX_BACKING_FORMAT_LEN:
                raise _format_error(f"backing format extension too long: {length} bytes "
                                    f"(at most {MAX_BACKING_FORMAT_LEN})", path)
            ext.backing_format = _decode_name(data)
        elif magic == EXT_MAGIC_DATA_FILE:
            ext.data_file = _decode_name(data)
        elif magic == EXT_MAGIC_CRYPTO_HEADER:
            if crypt_method != CRYPT_LUKS:
                raise _format_error("full disk encryption header extension is only expected "
                                    "with LUKS encryption", path)
            if length != CRYPTO_EXT_SIZE:
                raise _format_error(f"full disk encryption header extension is {length} "
                                    f"bytes, expected {CRYPTO_EXT_SIZE}", path)
            ext.fde_ext = data
        elif magic == EXT_MAGIC_BITMAPS:
            if length != BITMAPS_EXT_SIZE:
                raise _format_error(f"bitmaps extension is {length} bytes, expected "
                                    f"{BITMAPS_EXT_SIZE}", path)
            if not h_autoclear & AUTOCLEAR_BITMAPS:
                # A program without bitmap support modified the image: QEMU treats every
                # bitmap as inconsistent and drops the extension on the next header write.
                continue
            nb, reserved, dir_size, dir_offset = _BITMAPS_EXT.unpack(data)
            if reserved:
                raise _format_error("bitmaps extension: reserved field is not zero", path)
            if nb > MAX_BITMAPS:
                raise SafetyLimitExceeded(f"image has {nb} bitmaps, more than QEMU's maximum "
                                          f"of {MAX_BITMAPS}", limit=MAX_BITMAPS, path=path)
            if nb == 0:
                raise _format_error("bitmaps extension with zero bitmaps", path)
            if dir_offset % cluster_size:
                raise CorruptImage(f"bitmap directory offset {dir_offset:#x} is not "
                                   "cluster-aligned", offset=dir_offset, path=path)
            if dir_size > MAX_BITMAP_DIRECTORY_SIZE:
                raise SafetyLimitExceeded(
                    f"bitmap directory size {dir_size} exceeds the maximum "
                    f"{MAX_BITMAP_DIRECTORY_SIZE}", limit=MAX_BITMAP_DIRECTORY_SIZE, path=path)
            ext.bitmaps_ext = data
        else:
            ext.unknown.append((magic, data))
    return ext


def parse_header(buf: bytes, file_size: int, *, path: str | None = None) -> Header:
    """Parse and validate cluster 0 of a QCOW2 file, as QEMU does at open (and a bit more).

    Arguments:
        buf (bytes-like): the first ``min(file_size, 2 MiB)`` bytes of the file (at least the
            whole of cluster 0 when the file is that long).
        file_size (int): the length of the file in bytes; tables must lie inside it.
        path (str | None): file name for error messages.

    Returns:
        Header: the validated header.  The dirty and corrupt bits are *not* refused; the
        caller reads them from ``Header.dirty`` / ``Header.corrupt``.

    Raises:
        ImageFormatError: not a QCOW2 image or a malformed header (magic, version, short
            file, cluster_bits, header_length, padding, extensions, backing name, compression
            type flags).
        UnsupportedFeature: unknown incompatible bits, encryption, an external data file, an
            unknown compression type.
        SafetyLimitExceeded: an L1, refcount table, snapshot count or bitmap count over
            QEMU's limits.
        CorruptImage: misaligned, overflowing or out-of-file tables; no refcount table; an L1
            too small for the virtual size; refcount_order over 6.
        InvalidArgument: ``buf`` holds fewer bytes than ``file_size`` says are needed.
    """
    try:
        return _parse_header(buf, file_size, path)
    except EngineError:
        raise
    except Exception as e:  # pragma: no cover - defence in depth against hostile bytes
        raise ImageFormatError(f"malformed header ({type(e).__name__}: {e})",
                               path=path) from e


def _parse_header(buf: object, file_size: int, path: str | None) -> Header:
    file_size = int_arg(file_size, "file_size")
    buf = bytes(_buffer_arg(buf, "buf"))

    def need(n: int, what: str) -> None:
        if n > file_size:
            raise ImageFormatError(f"file too short for {what}: {file_size} bytes, need {n}",
                                   path=path)
        if n > len(buf):
            raise InvalidArgument(f"buffer too short for {what}: {len(buf)} bytes given, "
                                  f"need {n}", path=path)

    need(len(QCOW_MAGIC_BYTES), "the magic")
    if buf[:len(QCOW_MAGIC_BYTES)] != QCOW_MAGIC_BYTES:
        raise ImageFormatError("bad magic: not a QCOW2 image", path=path)
    need(V2_HEADER_LENGTH, "the header")
    (magic, version, backing_file_offset, backing_file_size, cluster_bits, size,
     crypt_method, l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters,
     nb_snapshots, snapshots_offset) = _V2_STRUCT.unpack_from(buf, 0)
    if version not in SUPPORTED_VERSIONS:
        raise ImageFormatError(f"unsupported QCOW version {version}", path=path,
                               hint="only QCOW2 versions 2 and 3 are supported")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageFormatError(f"cluster_bits {cluster_bits} outside "
                               f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}", path=path)
    cluster_size = 1 << cluster_bits

    if version == 2:
        incompat = compat = autoclear = 0
        refcount_order = DEFAULT_REFCOUNT_ORDER
        header_length = V2_HEADER_LENGTH
    else:
        need(V3_MIN_HEADER_LENGTH, "the v3 header")
        incompat, compat, autoclear, refcount_order, header_length = _V3_STRUCT.unpack_from(
            buf, V2_HEADER_LENGTH)
        if header_length < V3_MIN_HEADER_LENGTH:
            raise ImageFormatError(f"header_length {header_length} too short (v3 needs at "
                                   f"least {V3_MIN_HEADER_LENGTH})", path=path)
        if header_length % HEADER_LENGTH_ALIGN:
            raise ImageFormatError(f"header_length {header_length} is not a multiple of "
                                   f"{HEADER_LENGTH_ALIGN}", path=path)
    if header_length > cluster_size:
        raise ImageFormatError(f"header_length {header_length} exceeds the cluster size "
                               f"{cluster_size}", path=path)
    need(header_length, "header_length")

    # Cluster 0 as QEMU sees it: a read past the end of the file returns zeros.
    have = min(cluster_size, file_size)
    if len(buf) < have:
        raise InvalidArgument(f"buffer too short: {len(buf)} bytes given, cluster 0 needs "
                              f"{have}", path=path)
    c0 = _Reader(buf[:have].ljust(cluster_size, b"\0"), path)

    compression_type = COMPRESSION_ZLIB
    extra_header = b""
    if version == 3:
        if header_length > HDR_COMPRESSION_TYPE:
            compression_type = c0.u8(HDR_COMPRESSION_TYPE)
            padding = c0.bytes(HDR_PADDING, min(header_length, V3_HEADER_LENGTH) - HDR_PADDING)
            if any(padding):
                raise ImageFormatError("header padding bytes 105..111 are not zero",
                                       path=path)
        if header_length > V3_HEADER_LENGTH:
            extra_header = c0.bytes(V3_HEADER_LENGTH, header_length - V3_HEADER_LENGTH)

    if backing_file_offset > cluster_size:
        raise ImageFormatError(f"invalid backing file offset {backing_file_offset} (past "
                               f"cluster 0)", path=path)
    ext_start = header_length
    ext_end = backing_file_offset if backing_file_offset else cluster_size

    if incompat & ~INCOMPAT_MASK:
        ext = _read_extensions(c0, ext_start, ext_end, autoclear, crypt_method, cluster_size,
                               path, lenient=True)
        names = _unsupported_incompat_names(incompat & ~INCOMPAT_MASK, ext.feature_table)
        raise UnsupportedFeature(", ".join(names),
                                 f"unsupported incompatible feature(s): {', '.join(names)}",
                                 path=path)
    if incompat & INCOMPAT_DATA_FILE:
        raise UnsupportedFeature("external data file", path=path)
    if incompat & INCOMPAT_EXTL2 and cluster_size < EXTL2_MIN_CLUSTER_SIZE:
        raise ImageFormatError(f"unsupported subcluster size {cluster_size // 32} (extended "
                               f"L2 needs clusters of at least {EXTL2_MIN_CLUSTER_SIZE})",
                               path=path)
    if refcount_order > MAX_REFCOUNT_ORDER:
        raise CorruptImage(f"refcount_order {refcount_order} too large (refcounts may not "
                           f"exceed 64 bits)", path=path)
    if crypt_method != CRYPT_NONE:
        name = {CRYPT_AES: "AES encryption", CRYPT_LUKS: "LUKS encryption"}.get(
            crypt_method, f"encryption method {crypt_method}")
        raise UnsupportedFeature(name, path=path)
    if compression_type not in COMPRESSION_NAMES:
        raise UnsupportedFeature(f"compression type {compression_type}",
                                 f"unknown compression type {compression_type}", path=path)
    if compression_type == COMPRESSION_ZLIB and incompat & INCOMPAT_COMPRESSION:
        raise ImageFormatError("compression type incompatible bit is set but the "
                               "compression type is zlib", path=path)
    if compression_type != COMPRESSION_ZLIB and not incompat & INCOMPAT_COMPRESSION:
        raise ImageFormatError("compression type incompatible bit must be set for "
                               f"compression type {compression_type}", path=path)

    # Refcount table.  QEMU refuses an image without one except in check mode.
    if refcount_table_clusters == 0:
        raise CorruptImage("image does not contain a reference count table", path=path)
    _validate_table("refcount table", refcount_table_offset, refcount_table_clusters,
                    cluster_size, MAX_REFTABLE_SIZE, cluster_size, file_size, path)
    # Snapshot table: only offset and count here; its byte size is variable (§6.1).
    if nb_snapshots > MAX_SNAPSHOTS:
        raise SafetyLimitExceeded(f"{nb_snapshots} snapshots, QEMU's limit is {MAX_SNAPSHOTS}",
                                  limit=MAX_SNAPSHOTS, path=path)
    _validate_table("snapshot table", snapshots_offset, nb_snapshots, SNAPSHOT_HEADER_SIZE,
                    SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS, cluster_size, file_size, path)
    _validate_table("active L1 table", l1_table_offset, l1_size, L1E_SIZE, MAX_L1_SIZE,
                    cluster_size, file_size, path)
    l1_needed = l1_entries_for(size, cluster_bits, bool(incompat & INCOMPAT_EXTL2))
    if l1_needed > INT_MAX:
        raise SafetyLimitExceeded(f"image is too big: virtual size {size} bytes",
                                  limit=INT_MAX, path=path)
    if l1_size < l1_needed:
        raise CorruptImage(f"L1 table is too small: {l1_size} entries, virtual size {size} "
                           f"needs {l1_needed}", offset=l1_table_offset, path=path)

    ext = _read_extensions(c0, ext_start, ext_end, autoclear, crypt_method, cluster_size, path)
    if autoclear & AUTOCLEAR_DATA_FILE_RAW and not incompat & INCOMPAT_DATA_FILE:
        raise ImageFormatError("data-file-raw is set but the image has no data file",
                               path=path)

    backing_file = None
    if backing_file_offset:
        if (backing_file_size > min(MAX_BACKING_NAME, cluster_size - backing_file_offset)
                or backing_file_size >= PATH_MAX):
            raise ImageFormatError(f"backing file name too long: {backing_file_size} bytes "
                                   f"at offset {backing_file_offset}", path=path)
        backing_file = _decode_name(c0.bytes(backing_file_offset, backing_file_size))

    return Header(
        version=version, backing_file_offset=backing_file_offset,
        backing_file_size=backing_file_size, cluster_bits=cluster_bits, size=size,
        crypt_method=crypt_method, l1_size=l1_size, l1_table_offset=l1_table_offset,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters, nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset, incompatible_features=incompat,
        compatible_features=compat, autoclear_features=autoclear,
        refcount_order=refcount_order, header_length=header_length,
        compression_type=compression_type, extra_header=extra_header,
        backing_file=backing_file, backing_format=ext.backing_format,
        data_file=ext.data_file, bitmaps_ext=ext.bitmaps_ext, fde_ext=ext.fde_ext,
        feature_table=ext.feature_table, unknown_extensions=ext.unknown)


# =========================================================================================
# Encoding cluster 0
# =========================================================================================

def _check_uint(value: object, bits: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise InvalidArgument(f"{what} must be an unsigned {bits}-bit integer, got {value!r}")
    return value


def _ext_record(magic: int, data: bytes) -> bytes:
    """One extension record: type, length, data, zero padding to 8 (QEMU header_ext_add)."""
    padded = (len(data) + EXT_ALIGN - 1) & ~(EXT_ALIGN - 1)
    return _U32.pack(magic) + _U32.pack(len(data)) + data.ljust(padded, b"\0")


def _feature_table_bytes() -> bytes:
    out = bytearray()
    for ftype, bit, name in QEMU_FEATURE_TABLE:
        out += bytes((ftype, bit)) + name.encode("ascii").ljust(FEATURE_NAME_SIZE, b"\0")
    return bytes(out)


_QEMU_FEATURE_TABLE_BYTES = _feature_table_bytes()


def encode_header(h: Header) -> bytes:
    """Build the whole of cluster 0 exactly as QEMU 7.2's ``qcow2_update_header`` does.

    Order (§2.3): the fixed header (72 bytes for v2, 112 for v3), the kept ``extra_header``
    bytes, the backing-format, data-file and FDE extensions, QEMU's feature-name table (v3
    with clusters over 4 KiB only), the bitmaps extension, the unknown extensions, the end
    marker, then the backing file name.  ``backing_file_offset``/``backing_file_size`` and
    ``header_length`` are computed here; the values in ``h`` are ignored (``h`` is not
    modified).  A v3 header is always written 112 bytes long plus the kept extra bytes,
    as QEMU does, even when it was read with header_length 104.

    Arguments:
        h (Header): the header to write.

    Returns:
        bytes: ``h.cluster_size`` bytes.

    Raises:
        SafetyLimitExceeded: the backing name is over 1023 bytes, the backing format over 15
            bytes, or everything does not fit in cluster 0.
        InvalidArgument: a field is out of range for its on-disk width, or a v2 header has
            v3-only features.
    """
    _header_arg(h)
    if h.version not in SUPPORTED_VERSIONS:
        raise InvalidArgument(f"version must be 2 or 3, got {h.version!r}")
    _check_uint(h.cluster_bits, 32, "cluster_bits")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise InvalidArgument(f"cluster_bits {h.cluster_bits} outside "
                              f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
    cluster_size = h.cluster_size
    for attr, bits in (("size", 64), ("crypt_method", 32), ("l1_size", 32),
                       ("l1_table_offset", 64), ("refcount_table_offset", 64),
                       ("refcount_table_clusters", 32), ("nb_snapshots", 32),
                       ("snapshots_offset", 64), ("incompatible_features", 64),
                       ("compatible_features", 64), ("autoclear_features", 64),
                       ("refcount_order", 32), ("compression_type", 8)):
        _check_uint(getattr(h, attr), bits, attr)
    extra_header = bytes(h.extra_header or b"")
    if h.version == 2:
        if (h.incompatible_features or h.compatible_features or h.autoclear_features
                or h.refcount_order != DEFAULT_REFCOUNT_ORDER or h.compression_type
                or extra_header):
            raise InvalidArgument("a v2 (compat 0.10) header cannot carry feature bits, a "
                                  "refcount order other than 4, a compression type or extra "
                                  "header bytes")
        fixed = bytearray(V2_HEADER_LENGTH)
        header_length = V2_HEADER_LENGTH
    else:
        if len(extra_header) % HEADER_LENGTH_ALIGN:
            raise InvalidArgument(f"extra_header must be a multiple of {HEADER_LENGTH_ALIGN} "
                                  f"bytes, got {len(extra_header)}")
        fixed = bytearray(V3_HEADER_LENGTH)
        header_length = V3_HEADER_LENGTH + len(extra_header)

    body = bytearray()
    if h.backing_format is not None:
        fmt = _encode_name(h.backing_format, "backing format")
        if len(fmt) > MAX_BACKING_FORMAT_LEN:
            raise SafetyLimitExceeded(f"backing format name {h.backing_format!r} is longer "
                                      f"than {MAX_BACKING_FORMAT_LEN} bytes",
                                      limit=MAX_BACKING_FORMAT_LEN)
        body += _ext_record(EXT_MAGIC_BACKING_FORMAT, fmt)
    # QEMU writes the data-file name only when the image really has a data file.
    if h.has_data_file and h.data_file is not None:
        body += _ext_record(EXT_MAGIC_DATA_FILE, _encode_name(h.data_file, "data file name"))
    if h.fde_ext is not None:
        if len(h.fde_ext) != CRYPTO_EXT_SIZE:
            raise InvalidArgument(f"fde_ext must be {CRYPTO_EXT_SIZE} bytes")
        body += _ext_record(EXT_MAGIC_CRYPTO_HEADER, bytes(h.fde_ext))
    if h.version >= 3 and cluster_size > FEATURE_TABLE_MIN_CLUSTER_SIZE:
        body += _ext_record(EXT_MAGIC_FEATURE_TABLE, _QEMU_FEATURE_TABLE_BYTES)
    if h.bitmaps_ext is not None:
        if len(h.bitmaps_ext) != BITMAPS_EXT_SIZE:
            raise InvalidArgument(f"bitmaps_ext must be {BITMAPS_EXT_SIZE} bytes")
        body += _ext_record(EXT_MAGIC_BITMAPS, bytes(h.bitmaps_ext))
    # QEMU keeps unknown extensions in a head-inserted list, so each of its header rewrites
    # reverses their order.  We keep file order: stable across our own rewrites, and
    # identical to QEMU whenever there is at most one unknown extension.
    for magic, data in h.unknown_extensions:
        _check_uint(magic, 32, "extension magic")
        if magic == EXT_MAGIC_END:
            raise InvalidArgument("an unknown extension cannot use the end-marker type 0")
        _check_uint(len(data), 32, "extension length")
        body += _ext_record(magic, bytes(data))
    body += _ext_record(EXT_MAGIC_END, b"")

    backing_offset = backing_size = 0
    name = b""
    if h.backing_file is not None:
        name = _encode_name(h.backing_file, "backing file name")
        if len(name) > MAX_BACKING_NAME:
            raise SafetyLimitExceeded(f"backing file name is {len(name)} bytes, more than "
                                      f"{MAX_BACKING_NAME}", limit=MAX_BACKING_NAME)
        backing_offset = header_length + len(body)
        backing_size = len(name)
    total = header_length + len(body) + len(name)
    if total > cluster_size:
        raise SafetyLimitExceeded(f"header, extensions and backing name need {total} bytes, "
                                  f"more than the {cluster_size}-byte cluster 0",
                                  limit=cluster_size)

    _V2_STRUCT.pack_into(
        fixed, 0, QCOW_MAGIC, h.version, backing_offset, backing_size, h.cluster_bits,
        h.size, h.crypt_method, h.l1_size, h.l1_table_offset, h.refcount_table_offset,
        h.refcount_table_clusters, h.nb_snapshots, h.snapshots_offset)
    if h.version == 3:
        _V3_STRUCT.pack_into(fixed, V2_HEADER_LENGTH, h.incompatible_features,
                             h.compatible_features, h.autoclear_features, h.refcount_order,
                             header_length)
        fixed[HDR_COMPRESSION_TYPE] = h.compression_type
    out = bytearray(cluster_size)
    blob = bytes(fixed) + extra_header + bytes(body) + name
    out[:len(blob)] = blob
    return bytes(out)


# =========================================================================================
# New image layout: a replay of QEMU's cluster allocator during qemu-img create
# =========================================================================================

def _internal(what: str) -> EngineError:
    # A broken invariant of the replay below: a bug here, never a property of user input.
    return EngineError(f"internal error in the qemu-img create replay: {what}")


class _Again(Exception):
    """QEMU's -EAGAIN: a new refcount block was allocated, restart the free-space search."""


class _IntervalSet:
    """Disjoint half-open integer intervals (cluster indexes with refcount 1).

    During create every refcount is 0 or 1, so the refcount state is just the set of used
    clusters; intervals keep the work per table, not per cluster.
    """

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def first_overlap(self, a: int, b: int) -> tuple[int, int] | None:
        """The first interval meeting [a, b), or None."""
        i = bisect.bisect_right(self.ends, a)
        if i < len(self.starts) and self.starts[i] < b:
            return self.starts[i], self.ends[i]
        return None

    def covers(self, a: int, b: int) -> bool:
        i = bisect.bisect_right(self.starts, a) - 1
        return i >= 0 and self.ends[i] >= b

    def add(self, a: int, b: int) -> None:
        if a >= b:
            return
        if self.first_overlap(a, b) is not None:
            raise _internal("refcount overflow")
        i = bisect.bisect_left(self.starts, a)
        # merge with neighbours that touch
        if i > 0 and self.ends[i - 1] == a:
            i -= 1
            a = self.starts[i]
            del self.starts[i], self.ends[i]
        if i < len(self.starts) and self.starts[i] == b:
            b = self.ends[i]
            del self.starts[i], self.ends[i]
        self.starts.insert(i, a)
        self.ends.insert(i, b)

    def remove(self, a: int, b: int) -> None:
        if a >= b:
            return
        if not self.covers(a, b):
            raise _internal("refcount underflow")
        i = bisect.bisect_right(self.starts, a) - 1
        s, e = self.starts[i], self.ends[i]
        del self.starts[i], self.ends[i]
        for x, y in ((b, e), (s, a)):
            if x < y:
                self.starts.insert(i, x)
                self.ends.insert(i, y)

    def clip(self, a: int, b: int) -> list[tuple[int, int]]:
        """The parts of the set inside [a, b)."""
        out = []
        i = bisect.bisect_right(self.ends, a)
        while i < len(self.starts) and self.starts[i] < b:
            out.append((max(a, self.starts[i]), min(b, self.ends[i])))
            i += 1
        return out


def _refcount_metadata_blocks(clusters: int, cluster_size: int, refcount_order: int,
                              generous_increase: bool) -> int:
    """QEMU's ``qcow2_refcount_metadata_size``: refblocks needed to count ``clusters``
    clusters plus the refcount structures themselves (a fixed point); returns the number of
    refblocks."""
    blocks_per_table_cluster = cluster_size // REFTABLE_ENTRY_SIZE
    refcounts_per_block = cluster_size * 8 >> refcount_order
    table = blocks = 0
    n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // refcounts_per_block)
        table = -(-blocks // blocks_per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous_increase:
            clusters += -(-table // 2)
            n = 0
            generous_increase = False
        if n == last:
            return blocks


class _CreateAllocator:
    """A replay of QEMU 7.2's qcow2 cluster allocator, limited to what ``qemu-img create``
    (preallocation off) does: allocate the header area, grow the L1 to its exact size.

    Mirrors ``alloc_clusters_noref``, ``update_refcount`` (with its undo on -EAGAIN),
    ``alloc_refcount_block`` and ``qcow2_refcount_area`` in ``block/qcow2-refcount.c``,
    including the order of writes to the file: a freed refcount table keeps its old bytes,
    and a later, shorter write (the L1) over that cluster leaves the rest of them in place.
    Work is per refcount block or table, never per cluster.
    """

    def __init__(self, cluster_bits: int, refcount_order: int):
        self.cb = cluster_bits
        self.C = 1 << cluster_bits
        self.order = refcount_order
        self.rb_bits = cluster_bits + 3 - refcount_order     # log2(refblock entries)
        self.E = 1 << self.rb_bits
        self.used = _IntervalSet()
        self.free_cluster_index = 0
        self.file = bytearray()
        # qcow2_co_create: cluster 0 (header), cluster 1 (reftable with one entry pointing at
        # cluster 2), cluster 2 (an empty refblock).  No refcounts are set yet.
        self.reftable = [0] * (self.C // REFTABLE_ENTRY_SIZE)
        self.reftable[0] = 2 * self.C
        self.reftable_offset = self.C
        self.max_index = 0
        self._write(0, bytes(self.C))
        self._write(self.C, _U64.pack(2 * self.C) + bytes(2 * self.C - REFTABLE_ENTRY_SIZE))

    def _write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > len(self.file):
            self.file.extend(bytes(end - len(self.file)))
        self.file[offset:end] = data

    # -- QEMU functions ----------------------------------------------------------------
    def alloc_noref(self, nbytes: int) -> int:
        n = -(-nbytes // self.C)
        p = self.free_cluster_index
        while True:
            hit = self.used.first_overlap(p, p + n)
            if hit is None:
                break
            p = hit[1]          # QEMU restarts counting just past each used cluster
        self.free_cluster_index = p + n
        if p + n - 1 > (MAX_CLUSTER_OFFSET - 1) >> self.cb:
            raise SafetyLimitExceeded("image would need host offsets beyond 2^56",
                                      limit=MAX_CLUSTER_OFFSET)
        return p << self.cb

    def update_refcount(self, offset: int, length: int, decrease: bool) -> None:
        if length <= 0:
            return
        first = offset >> self.cb
        last = (offset + length - 1) >> self.cb
        cur = first
        try:
            while cur <= last:
                # QEMU walks cluster by cluster and calls alloc_refcount_block at each new
                # refblock; we jump over every refblock that already exists in one step
                # (QEMU restarts the whole range after each new refblock, so a per-refblock
                # walk here would be quadratic in Python).
                ti = cur >> self.rb_bits
                lim = min((last >> self.rb_bits) + 1, len(self.reftable))
                try:
                    missing = self.reftable.index(0, ti, lim) if ti < lim else ti
                except ValueError:
                    missing = lim
                if missing > ti:
                    chunk_end = min(last + 1, missing << self.rb_bits)
                else:
                    self.alloc_refcount_block(cur)
                    chunk_end = min(last + 1, (ti + 1) << self.rb_bits)
                if decrease:
                    self.used.remove(cur, chunk_end)
                    self.free_cluster_index = min(self.free_cluster_index, cur)
                else:
                    self.used.add(cur, chunk_end)
                cur = chunk_end
        except _Again:
            self.free_cluster_index = min(self.free_cluster_index, first)
            # undo the part already done, as QEMU's fail path does
            self.update_refcount(offset, (cur << self.cb) - offset, not decrease)
            raise

    def alloc(self, nbytes: int) -> int:
        """qcow2_alloc_clusters: find free clusters and take a reference, retrying on
        -EAGAIN."""
        while True:
            offset = self.alloc_noref(nbytes)
            try:
                self.update_refcount(offset, nbytes, False)
                return offset
            except _Again:
                continue

    def free(self, offset: int, nbytes: int) -> None:
        self.update_refcount(offset, nbytes, True)

    def alloc_refcount_block(self, cluster_index: int) -> None:
        ti = cluster_index >> self.rb_bits
        if ti < len(self.reftable) and self.reftable[ti]:
            return
        new_block = self.alloc_noref(self.C)
        nb_index = new_block >> self.cb
        if new_block == 0:
            raise _internal("refblock allocated at offset 0")
        if nb_index >> self.rb_bits == ti:
            self.used.add(nb_index, nb_index + 1)      # the block describes itself
        else:
            self.update_refcount(new_block, self.C, False)   # may recurse; may raise _Again
        if ti < len(self.reftable):
            self.reftable[ti] = new_block
            self._write(self.reftable_offset + ti * REFTABLE_ENTRY_SIZE, _U64.pack(new_block))
            self.max_index = max(self.max_index, ti)
            raise _Again
        blocks_used = -(-max(cluster_index + 1, nb_index + 1) // self.E)
        self.refcount_area(blocks_used * self.E * self.C, ti, new_block)
        raise _Again

    def refcount_area(self, start_offset: int, new_index: int, new_block: int) -> int:
        """qcow2_refcount_area with additional_clusters=0, exact_size=false: new refblocks
        and a new, larger reftable at ``start_offset``, all describing themselves."""
        C, E = self.C, self.E
        total = _refcount_metadata_blocks(start_offset // C, C, self.order, True)
        if total > MAX_REFTABLE_SIZE:
            raise SafetyLimitExceeded("refcount table would exceed QEMU's limit",
                                      limit=MAX_REFTABLE_SIZE)
        area_index = (start_offset // C) // E
        per_cluster = C // REFTABLE_ENTRY_SIZE
        table_size = total + -(-total // 2)
        table_size = -(-table_size // per_cluster) * per_cluster
        table_clusters = table_size * REFTABLE_ENTRY_SIZE // C
        if table_size > MAX_REFTABLE_SIZE:
            raise SafetyLimitExceeded("refcount table would exceed QEMU's limit",
                                      limit=MAX_REFTABLE_SIZE)
        new_table = [0] * table_size
        keep = self.max_index + 1 if table_size > self.max_index else table_size
        new_table[:keep] = self.reftable[:keep]
        if new_block:
            new_table[new_index] = new_block
        additional = sum(1 for i in range(area_index, total) if not new_table[i])
        table_offset = start_offset + additional * C
        end_offset = table_offset + table_clusters * C
        block_offset = start_offset
        for i in range(area_index, total):
            if not new_table[i]:
                new_table[i] = block_offset
                block_offset += C
            first_covered = i * E * C
            if first_covered < end_offset:
                j = (start_offset - first_covered) // C if first_covered < start_offset else 0
                end_index = min((end_offset - first_covered) // C, E)
                base = first_covered // C
                self.used.add(base + j, base + end_index)
        table_bytes = b"".join(_U64.pack(e) for e in new_table)
        self._write(table_offset, table_bytes)
        old_offset, old_entries = self.reftable_offset, len(self.reftable)
        self.reftable = new_table
        self.reftable_offset = table_offset
        self.max_index = max((i for i, e in enumerate(new_table) if e), default=0)
        self.free(old_offset, old_entries * REFTABLE_ENTRY_SIZE)
        return end_offset

    # -- output ---------------------------------------------------------------------------
    @property
    def reftable_clusters(self) -> int:
        return len(self.reftable) * REFTABLE_ENTRY_SIZE // self.C

    def write_refblocks(self) -> None:
        """Write every refblock with its final content (QEMU's cache flush at close).

        Refblocks are full clusters that nothing else writes to once they are live, so
        writing them last gives the same bytes as QEMU's several flushes."""
        table = self.reftable
        for i in range(min(self.max_index + 1, len(table))):    # entries past it are 0
            if not table[i]:
                continue
            first = i * self.E
            runs = [(a - first, b - first) for a, b in self.used.clip(first, first + self.E)]
            self._write(table[i], _refblock_bytes(runs, self.order, self.C))


def _refblock_bytes(runs: list[tuple[int, int]], refcount_order: int, cluster_size: int
                    ) -> bytes:
    """A refcount block with refcount 1 for the entries in ``runs`` (block-relative
    [start, end) entry indexes) and 0 elsewhere (§5.1 packing)."""
    blk = bytearray(cluster_size)
    bits = 1 << refcount_order
    if bits >= 8:
        width = bits // 8
        one = _U64.pack(1)[-width:]
        for a, b in runs:
            blk[a * width:b * width] = one * (b - a)
        return bytes(blk)
    per_byte = 8 // bits
    full = sum(1 << (bits * k) for k in range(per_byte))   # every entry of the byte = 1
    for a, b in runs:
        # head and tail entries that share a byte with entries outside the run
        while a < b and a % per_byte:
            blk[a // per_byte] |= 1 << (bits * (a % per_byte))
            a += 1
        while a < b and b % per_byte:
            b -= 1
            blk[b // per_byte] |= 1 << (bits * (b % per_byte))
        if a < b:
            blk[a // per_byte:b // per_byte] = bytes((full,)) * ((b - a) // per_byte)
    return bytes(blk)


def new_image_layout(size: int, *, cluster_size: int = DEFAULT_CLUSTER_SIZE,
                     compat: str = COMPAT_V3, refcount_bits: int = 16,
                     lazy_refcounts: bool = False, backing_file: str | None = None,
                     backing_format: str | None = None, extended_l2: bool = False,
                     compression_type: str = "zlib") -> tuple[Header, bytes]:
    """The complete initial content of a new, empty QCOW2 file.

    Byte-identical to ``qemu-img create -f qcow2 -o cluster_size=..,compat=..,
    refcount_bits=..,lazy_refcounts=..,extended_l2=..,compression_type=.. [-b NAME -F FMT]
    FILE SIZE`` from QEMU 7.2 (preallocation off), file length included: header cluster,
    refcount table and blocks, and a zeroed L1 whose last cluster is not padded.  For most
    images that is 3 clusters plus the L1; when the L1 needs more refcount blocks than the
    first reftable cluster holds, QEMU's self-describing reftable growth is replayed.

    Arguments:
        size (int): virtual size in bytes; rounded up to a multiple of 512 as qemu-img does.
        cluster_size (int): bytes, a power of two from 512 to 2 MiB.
        compat (str): "1.1" (v3) or "0.10" (v2).
        refcount_bits (int): 1, 2, 4, 8, 16, 32 or 64 (v2: 16 only).
        lazy_refcounts (bool): set compatible bit 0 (v3 only).
        backing_file (str | None): backing file name stored as given (not resolved).
        backing_format (str | None): the backing file's format; required with a backing file
            (qemu-img 7.2 refuses to create an overlay without it).
        extended_l2 (bool): 128-bit L2 entries (v3, clusters of at least 16 KiB).
        compression_type (str): "zlib" or "zstd" (v3 only for zstd).

    Returns:
        (Header, bytes): the parsed header of the new image and the whole file content.

    Raises:
        InvalidArgument: an option is out of range or the options conflict, or the size is
            over :func:`max_virtual_size` (an L1 over 32 MiB).
        SafetyLimitExceeded: the backing name or format is too long for the header.
    """
    cluster_bits = cluster_size_arg(cluster_size).bit_length() - 1
    version = COMPAT_VERSIONS[choice_arg(compat, "compat", (COMPAT_V2, COMPAT_V3, "v2", "v3"))]
    refcount_bits = int_arg(refcount_bits, "refcount_bits", minimum=1, maximum=64)
    if refcount_bits & (refcount_bits - 1):
        raise InvalidArgument(f"refcount_bits must be a power of two from 1 to 64, got "
                              f"{refcount_bits!r}", value=refcount_bits)
    refcount_order = refcount_bits.bit_length() - 1
    compression = {v: k for k, v in COMPRESSION_NAMES.items()}[
        choice_arg(compression_type, "compression_type", tuple(COMPRESSION_NAMES.values()))]
    bool_arg(lazy_refcounts, "lazy_refcounts")
    bool_arg(extended_l2, "extended_l2")
    if version == 2:
        if refcount_bits != 16:
            raise InvalidArgument("compat 0.10 requires refcount_bits=16")
        if lazy_refcounts:
            raise InvalidArgument("lazy refcounts require compat 1.1 or later")
        if extended_l2:
            raise InvalidArgument("extended L2 entries require compat 1.1 or later")
        if compression != COMPRESSION_ZLIB:
            raise InvalidArgument("compression_type zstd requires compat 1.1 or later")
    if extended_l2 and cluster_size < EXTL2_MIN_CLUSTER_SIZE:
        raise InvalidArgument(f"extended L2 entries are only supported with cluster sizes of "
                              f"at least {EXTL2_MIN_CLUSTER_SIZE} bytes")
    if backing_file is not None:
        if not isinstance(backing_file, str) or not backing_file:
            raise InvalidArgument("backing_file must be a non-empty string", value=backing_file)
        if backing_format is None:
            raise InvalidArgument("backing file specified without backing format",
                                  hint="pass backing_format ('raw' or 'qcow2'); formats are "
                                       "never probed")
    if backing_format is not None:
        if backing_file is None:
            raise InvalidArgument("backing format cannot be used without a backing file")
        if not isinstance(backing_format, str) or not backing_format:
            raise InvalidArgument("backing_format must be a non-empty string",
                                  value=backing_format)

    size = check_virtual_size(size, "qcow2", cluster_size=cluster_size,
                              extended_l2=extended_l2)
    size = -(-size // SECTOR_SIZE) * SECTOR_SIZE
    l1_size = l1_entries_for(size, cluster_bits, extended_l2)

    incompat = 0
    if extended_l2:
        incompat |= INCOMPAT_EXTL2
    if compression != COMPRESSION_ZLIB:
        incompat |= INCOMPAT_COMPRESSION
    h = Header(
        version=version, backing_file_offset=0, backing_file_size=0,
        cluster_bits=cluster_bits, size=size, crypt_method=CRYPT_NONE, l1_size=l1_size,
        l1_table_offset=0, refcount_table_offset=0, refcount_table_clusters=0,
        nb_snapshots=0, snapshots_offset=0, incompatible_features=incompat,
        compatible_features=COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
        refcount_order=refcount_order,
        header_length=V3_HEADER_LENGTH if version == 3 else V2_HEADER_LENGTH,
        compression_type=compression, backing_file=backing_file,
        backing_format=backing_format)
    # Fail on a too-long backing name before doing any work.
    encode_header(h)

    sim = _CreateAllocator(cluster_bits, refcount_order)
    # qcow2_co_create: open the new image and take references on the first three clusters.
    if sim.alloc(CREATE_HEADER_CLUSTERS * cluster_size) != 0:
        raise _internal("header clusters not at offset 0")
    # blk_truncate -> qcow2_grow_l1_table(exact): a zeroed L1 of exactly l1_size entries,
    # written with its byte length (the file is not padded to a cluster).
    if l1_size:
        h.l1_table_offset = sim.alloc(l1_size * L1E_SIZE)
        sim._write(h.l1_table_offset, bytes(l1_size * L1E_SIZE))
    sim.write_refblocks()
    h.refcount_table_offset = sim.reftable_offset
    h.refcount_table_clusters = sim.reftable_clusters
    sim._write(0, encode_header(h))
    data = bytes(sim.file)
    return parse_header(data[:min(len(data), 1 << MAX_CLUSTER_BITS)], len(data)), data


# =========================================================================================
# Snapshot table (§6.1)
# =========================================================================================

@dataclass
class SnapshotEntry:
    """One internal snapshot.

    ``extra_data`` is the raw extra data as stored.  Its first 24 bytes are also decoded into
    ``vm_state_size`` (64-bit copy), ``disk_size`` (None when absent: QEMU then uses the
    current virtual size) and ``icount`` (None when absent or all-ones).  On encode the
    decoded fields win for those 24 bytes and the bytes after them are kept verbatim.
    """

    id: str
    name: str
    l1_table_offset: int
    l1_size: int                        # entries
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int                  # bytes
    extra_data: bytes = b""
    disk_size: int | None = None        # bytes
    icount: int | None = None


def _snapshot_walk(buf: bytes, h: Header, entries: list[SnapshotEntry] | None, strict: bool, path: str | None,
                   file_size: int | None) -> tuple[bool, int]:
    """Walk ``h.nb_snapshots`` entries of ``buf`` (bytes from snapshots_offset).

    Returns (complete, n): when complete, n is the table size in bytes (up to the end of
    the last name, without trailing padding, as QEMU counts it); otherwise n > len(buf) is
    the number of bytes needed to make progress.
    """
    mv = memoryview(bytes(buf)) if not isinstance(buf, (bytes, bytearray)) else buf
    cluster_size = h.cluster_size
    off = 0

    def short(needed: int) -> tuple[bool, int]:
        # Whatever the rest of the entry holds, it would end past the limit.
        if needed > MAX_SNAPSHOTS_SIZE:
            raise SafetyLimitExceeded(f"snapshot table is too big (over {MAX_SNAPSHOTS_SIZE} "
                                      "bytes)", limit=MAX_SNAPSHOTS_SIZE, path=path)
        return False, needed

    for i in range(h.nb_snapshots):
        off = (off + SNAPSHOT_ENTRY_ALIGN - 1) & ~(SNAPSHOT_ENTRY_ALIGN - 1)
        if off + SNAPSHOT_HEADER_SIZE > len(mv):
            return short(off + SNAPSHOT_HEADER_SIZE)
        (l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state32,
         extra_size) = _SNAPSHOT_HEADER.unpack_from(mv, off)
        if extra_size > MAX_SNAPSHOT_EXTRA:
            raise SafetyLimitExceeded(f"too much extra metadata in snapshot table entry {i} "
                                      f"({extra_size} > {MAX_SNAPSHOT_EXTRA} bytes)",
                                      limit=MAX_SNAPSHOT_EXTRA, path=path)
        if strict and h.version >= 3 and extra_size < SNAPSHOT_EXTRA_DISK_SIZE_END:
            raise CorruptImage(f"snapshot table entry {i} is incomplete: {extra_size} bytes "
                               f"of extra data, v3 needs {SNAPSHOT_EXTRA_DISK_SIZE_END}",
                               offset=h.snapshots_offset + off, path=path)
        end = off + SNAPSHOT_HEADER_SIZE + extra_size + id_len + name_len
        if end > MAX_SNAPSHOTS_SIZE:
            raise SafetyLimitExceeded(f"snapshot table is too big (over {MAX_SNAPSHOTS_SIZE} "
                                      "bytes)", limit=MAX_SNAPSHOTS_SIZE, path=path)
        if end > len(mv):
            return short(end)
        # The snapshot's L1 is checked as QEMU checks it before any use (§8.1).
        name_of = f"L1 table of snapshot entry {i}"
        _validate_table(name_of, l1_offset, l1_size, L1E_SIZE, MAX_L1_SIZE, cluster_size,
                        file_size or 0, path, check_eof=file_size is not None)
        if entries is not None:
            p = off + SNAPSHOT_HEADER_SIZE
            extra = bytes(mv[p:p + extra_size])
            vm_state = vm_state32
            disk_size = icount = None
            if extra_size >= SNAPSHOT_EXTRA_VM_STATE_END:
                vm_state = _U64.unpack_from(extra, 0)[0]
            if extra_size >= SNAPSHOT_EXTRA_DISK_SIZE_END:
                disk_size = _U64.unpack_from(extra, SNAPSHOT_EXTRA_VM_STATE_END)[0]
            if extra_size >= SNAPSHOT_EXTRA_ICOUNT_END:
                icount = _U64.unpack_from(extra, SNAPSHOT_EXTRA_DISK_SIZE_END)[0]
                if icount == SNAPSHOT_ICOUNT_NONE:
                    icount = None
            p += extra_size
            sid = _decode_name(bytes(mv[p:p + id_len]))
            p += id_len
            sname = _decode_name(bytes(mv[p:p + name_len]))
            entries.append(SnapshotEntry(
                id=sid, name=sname, l1_table_offset=l1_offset, l1_size=l1_size,
                date_sec=date_sec, date_nsec=date_nsec, vm_clock_nsec=vm_clock,
                vm_state_size=vm_state, extra_data=extra, disk_size=disk_size, icount=icount))
        off = end
    return True, off


def snapshot_table_size(buf: bytes, h: Header, *, path: str | None = None) -> int:
    """How many bytes of the snapshot table to read.

    Arguments:
        buf (bytes-like): bytes from ``h.snapshots_offset`` (possibly only a prefix).
        h (Header): the image header.

    Returns:
        int: if ``buf`` holds the whole table, its exact size in bytes (up to the end of the
        last entry's name; 0 without snapshots).  Otherwise a number larger than
        ``len(buf)``: read at least that many bytes and call again.  The answer never
        exceeds QEMU's 64 MiB limit, so a caller can read incrementally with bounded memory.

    Raises:
        SafetyLimitExceeded: the table or one entry's extra data is over QEMU's limits.
        CorruptImage: an entry is malformed (see :func:`parse_snapshot_table`).
    """
    buf = _buffer_arg(buf, "buf")
    _header_arg(h)
    try:
        return _snapshot_walk(buf, h, None, False, path, None)[1]
    except EngineError:
        raise
    except Exception as e:  # pragma: no cover - defence in depth
        raise CorruptImage(f"malformed snapshot table ({type(e).__name__}: {e})",
                           path=path) from e


def parse_snapshot_table(buf: bytes, h: Header, *, file_size: int | None = None,
                         strict: bool = True, path: str | None = None
                         ) -> list[SnapshotEntry]:
    """Parse and validate the internal snapshot table.

    Arguments:
        buf (bytes-like): bytes from ``h.snapshots_offset`` to at most the end of the file
            (the table is at most 64 MiB; see :func:`snapshot_table_size`).
        h (Header): the image header (nb_snapshots, version, cluster size).
        file_size (int | None): when given, snapshot L1 tables must lie inside the file.
        strict (bool): refuse v3 entries with less than 16 bytes of extra data (qemu-img
            check reports them as corrupt).  Pass False for check/repair.
        path (str | None): file name for error messages.

    Returns:
        list[SnapshotEntry]: the entries in table order.

    Raises:
        SafetyLimitExceeded: extra data over 1024 bytes, a table over 64 MiB, a snapshot L1
            over 32 MiB.
        CorruptImage: entries running past ``buf`` (the end of the file), a misaligned or
            overflowing snapshot L1 offset, an incomplete v3 entry (``strict``).
    """
    buf = _buffer_arg(buf, "buf")
    _header_arg(h)
    if file_size is not None:
        file_size = int_arg(file_size, "file_size")
    bool_arg(strict, "strict")
    entries: list[SnapshotEntry] = []
    try:
        complete, n = _snapshot_walk(buf, h, entries, strict, path, file_size)
    except EngineError:
        raise
    except Exception as e:  # pragma: no cover - defence in depth
        raise CorruptImage(f"malformed snapshot table ({type(e).__name__}: {e})",
                           path=path) from e
    if not complete:
        raise CorruptImage(f"snapshot table runs past the end of the file: entry "
                           f"{len(entries)} needs {n} bytes, only {len(buf)} available",
                           offset=h.snapshots_offset, path=path)
    return entries


def encode_snapshot_table(entries: list[SnapshotEntry], h: Header) -> bytes:
    """Build the snapshot table as QEMU's ``qcow2_write_snapshots`` does.

    Each entry starts at a multiple of 8 (zero padding); extra_data_size is
    ``max(24, len(entry.extra_data))``; the 32-bit vm_state_size is 0 when the size does not
    fit; a missing disk_size is written as ``h.size`` and a missing icount as all-ones.  The
    result has no trailing padding (QEMU allocates and writes exactly this many bytes).

    Raises:
        SafetyLimitExceeded: too many entries, extra data over 1024 bytes, or a table over
            64 MiB.
        InvalidArgument: a field does not fit its on-disk width.
    """
    _header_arg(h)
    if not isinstance(entries, (list, tuple)) or not all(
            isinstance(e, SnapshotEntry) for e in entries):
        raise InvalidArgument("entries must be a list of SnapshotEntry", value=entries)
    if len(entries) > MAX_SNAPSHOTS:
        raise SafetyLimitExceeded(f"{len(entries)} snapshots, QEMU's limit is {MAX_SNAPSHOTS}",
                                  limit=MAX_SNAPSHOTS)
    out = bytearray()
    for i, sn in enumerate(entries):
        sid = _encode_name(sn.id, "snapshot id")
        sname = _encode_name(sn.name, "snapshot name")
        if len(sid) > MAX_U16 or len(sname) > MAX_U16:
            raise InvalidArgument(f"snapshot entry {i}: id or name longer than {MAX_U16} bytes")
        extra_in = bytes(sn.extra_data or b"")
        if len(extra_in) > MAX_SNAPSHOT_EXTRA:
            raise SafetyLimitExceeded(f"snapshot entry {i}: {len(extra_in)} bytes of extra "
                                      f"data, limit {MAX_SNAPSHOT_EXTRA}",
                                      limit=MAX_SNAPSHOT_EXTRA)
        for name, bits in (("l1_table_offset", 64), ("l1_size", 32), ("date_sec", 32),
                           ("date_nsec", 32), ("vm_clock_nsec", 64), ("vm_state_size", 64)):
            _check_uint(getattr(sn, name), bits, f"snapshot entry {i} {name}")
        disk_size = h.size if sn.disk_size is None else sn.disk_size
        icount = SNAPSHOT_ICOUNT_NONE if sn.icount is None else sn.icount
        _check_uint(disk_size, 64, f"snapshot entry {i} disk_size")
        _check_uint(icount, 64, f"snapshot entry {i} icount")
        extra = (_SNAPSHOT_EXTRA.pack(sn.vm_state_size, disk_size, icount)
                 + extra_in[SNAPSHOT_EXTRA_SIZE:])
        vm_state32 = sn.vm_state_size if sn.vm_state_size <= MAX_U32 else 0
        out += bytes(-len(out) % SNAPSHOT_ENTRY_ALIGN)
        out += _SNAPSHOT_HEADER.pack(sn.l1_table_offset, sn.l1_size, len(sid), len(sname),
                                     sn.date_sec, sn.date_nsec, sn.vm_clock_nsec, vm_state32,
                                     len(extra))
        out += extra + sid + sname
        if len(out) > MAX_SNAPSHOTS_SIZE:
            raise SafetyLimitExceeded(f"snapshot table is too big (over {MAX_SNAPSHOTS_SIZE} "
                                      "bytes)", limit=MAX_SNAPSHOTS_SIZE)
    return bytes(out)


# =========================================================================================
# qemu-img info
# =========================================================================================

def info_fields(h: Header) -> dict[str, object]:
    """``format-specific.data`` of ``qemu-img info --output=json`` 7.2 for this header.

    v2: compat, refcount-bits, compression-type.  v3 adds lazy-refcounts, corrupt,
    extended-l2, and data-file / data-file-raw when there is a data file.  Bitmaps and
    encryption details need more than the header and are left to the caller.
    """
    _header_arg(h)
    if h.version == 2:
        return {"compat": COMPAT_V2, "compression-type": h.compression_name,
                "refcount-bits": h.refcount_bits}
    data = {
        "compat": COMPAT_V3,
        "compression-type": h.compression_name,
        "lazy-refcounts": h.lazy_refcounts,
        "refcount-bits": h.refcount_bits,
        "corrupt": h.corrupt,
        "extended-l2": h.extended_l2,
    }
    if h.data_file is not None:
        data["data-file"] = h.data_file
    if h.has_data_file:
        data["data-file-raw"] = h.data_file_raw
    return data
