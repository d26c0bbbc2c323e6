"""The QCOW2 header and its extensions (cluster 0): parse, validate, build, describe.

- :func:`parse_header` validates cluster 0 the way QEMU does at open, and more where a hostile
  image could hurt us (tables past the end of the file, tables over the header), and returns a
  :class:`Header`.
- :func:`read_fixed_fields` reads the fixed fields only, without validating the tables (the
  check opens images QEMU's check opens: tables past the end of the file, no reftable).
- :func:`encode_header` builds cluster 0 byte for byte as QEMU's ``qcow2_update_header``.
- :func:`info_fields` gives ``format-specific.data`` as ``qemu-img info`` prints it.

Every error raised is an :class:`~engine.errors.EngineError` subclass, whatever the input
bytes: every read is bounds-checked against the buffer first.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, overload

from engine.errors import (
    CorruptImage,
    EngineError,
    ImageFormatError,
    InvalidArgument,
    SafetyLimitExceeded,
    UnsupportedFeature,
)

from engine.qcow2.spec import (
    AUTOCLEAR_BITMAPS,
    AUTOCLEAR_DATA_FILE_RAW,
    BITMAPS_EXT_SIZE,
    BITMAPS_EXT_STRUCT,
    COMPAT_LAZY_REFCOUNTS,
    COMPAT_V2,
    COMPAT_V3,
    COMPRESSION_NAMES,
    COMPRESSION_ZLIB,
    CRYPTO_EXT_SIZE,
    CRYPT_AES,
    CRYPT_LUKS,
    CRYPT_NONE,
    DEFAULT_REFCOUNT_ORDER,
    EXTL2_MIN_CLUSTER_SIZE,
    EXT_ALIGN,
    EXT_HEADER_SIZE,
    EXT_MAGIC_BACKING_FORMAT,
    EXT_MAGIC_BITMAPS,
    EXT_MAGIC_CRYPTO_HEADER,
    EXT_MAGIC_DATA_FILE,
    EXT_MAGIC_END,
    EXT_MAGIC_FEATURE_TABLE,
    FEATURE_ENTRY_SIZE,
    FEATURE_NAME_SIZE,
    FEATURE_TABLE_MIN_CLUSTER_SIZE,
    FEATURE_TYPE_INCOMPATIBLE,
    HDR_CLUSTER_BITS,
    HDR_COMPRESSION_TYPE,
    HDR_PADDING,
    HDR_VERSION,
    HEADER_LENGTH_ALIGN,
    INCOMPAT_COMPRESSION,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    INCOMPAT_MASK,
    INT64_MAX,
    INT_MAX,
    KNOWN_EXTENSIONS,
    L1E_SIZE,
    L2E_SIZE_EXTENDED,
    L2E_SIZE_NORMAL,
    MAX_BACKING_FORMAT_LEN,
    MAX_BACKING_NAME,
    MAX_BITMAPS,
    MAX_BITMAP_DIRECTORY_SIZE,
    MAX_CLUSTER_BITS,
    MAX_L1_SIZE,
    MAX_REFCOUNT_ORDER,
    MAX_REFTABLE_SIZE,
    MAX_SNAPSHOTS,
    MIN_CLUSTER_BITS,
    PATH_MAX,
    QCOW_MAGIC,
    QCOW_MAGIC_BYTES,
    QEMU_FEATURE_TABLE,
    REFTABLE_ENTRY_SIZE,
    SECTOR_SIZE,
    SNAPSHOT_HEADER_SIZE,
    SUBCLUSTERS_PER_CLUSTER,
    SUPPORTED_VERSIONS,
    U32,
    U64,
    V2_HEADER_LENGTH,
    V2_STRUCT,
    V3_HEADER_LENGTH,
    V3_MIN_HEADER_LENGTH,
    V3_STRUCT,
)
from engine.qcow2.args import (
    bool_arg,
    check_uint,
    buffer_arg,
    decode_name,
    encode_name,
    int_arg,
)

# =========================================================================================
# Header
# =========================================================================================

class FeatureBit:
    """One bit of a header's feature words (qcow2.txt, "Header": incompatible, compatible
    and autoclear features), read as a bool: ``Header.dirty`` and its kind."""

    def __init__(self, word: str, mask: int, doc: str) -> None:
        self.word = word
        self.mask = mask
        self.__doc__ = doc

    @overload
    def __get__(self, obj: None, owner: type) -> FeatureBit: ...
    @overload
    def __get__(self, obj: Header, owner: type) -> bool: ...

    def __get__(self, obj: Header | None, owner: type) -> bool | FeatureBit:
        if obj is None:
            return self
        return bool(getattr(obj, self.word) & self.mask)


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
    def disk_size(self) -> int:
        """The disk's size as QEMU sees it: whole 512-byte sectors (bs->total_sectors), so a
        header size that is not a multiple of 512 is rounded down."""
        return self.size // SECTOR_SIZE * SECTOR_SIZE

    @property
    def cluster_size(self) -> int:
        """Cluster size in bytes."""
        return 1 << self.cluster_bits

    extended_l2 = FeatureBit("incompatible_features", INCOMPAT_EXTL2,
                             "True if L2 entries are 128-bit with 32 subclusters "
                             "(incompatible bit 4).")

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

    # -- compressed cluster descriptors (qcow2.txt "Compressed Clusters Descriptor") --------
    @property
    def compressed_size_shift(self) -> int:
        """Bit position of the sector count in a compressed L2 entry (62 - (cluster_bits - 8))."""
        return 62 - (self.cluster_bits - 8)

    @property
    def compressed_size_mask(self) -> int:
        """Mask of the sector count (minus one) after shifting by compressed_size_shift."""
        return (1 << (self.cluster_bits - 8)) - 1

    @property
    def compressed_offset_mask(self) -> int:
        """Mask of the host byte offset in a compressed L2 entry."""
        return (1 << self.compressed_size_shift) - 1

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
    def refblock_bits(self) -> int:
        """log2 of :attr:`refblock_entries`."""
        return self.cluster_bits + 3 - self.refcount_order

    @property
    def reftable_entries(self) -> int:
        """Entries in the refcount table (refcount_table_clusters clusters of u64)."""
        return self.refcount_table_clusters * self.cluster_size // REFTABLE_ENTRY_SIZE

    # -- features ---------------------------------------------------------------------------
    dirty = FeatureBit("incompatible_features", INCOMPAT_DIRTY,
                       "Incompatible bit 0: refcounts may be stale; a read-write open must "
                       "repair.")
    corrupt = FeatureBit("incompatible_features", INCOMPAT_CORRUPT,
                         "Incompatible bit 1: the image may only be opened read-only (or for "
                         "repair).")
    lazy_refcounts = FeatureBit("compatible_features", COMPAT_LAZY_REFCOUNTS,
                                "Compatible bit 0: refcount updates may be deferred behind the "
                                "dirty bit.")
    has_data_file = FeatureBit("incompatible_features", INCOMPAT_DATA_FILE,
                               "Incompatible bit 2: guest data lives in an external data file.")
    data_file_raw = FeatureBit("autoclear_features", AUTOCLEAR_DATA_FILE_RAW,
                               "Autoclear bit 1: the external data file is a valid raw image "
                               "on its own.")

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


def header_arg(value: Any) -> "Header":
    if not isinstance(value, Header):
        raise InvalidArgument(f"h must be a Header, not {type(value).__name__}", value=value)
    return value


class ByteReader:
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
        return int(U32.unpack_from(self.buf, off)[0])

    def u64(self, off: int) -> int:
        self._check(off, 8)
        return int(U64.unpack_from(self.buf, off)[0])

    def bytes(self, off: int, n: int) -> bytes:
        self._check(off, n)
        return bytes(self.buf[off:off + n])


def _format_error(msg: str, path: str | None) -> ImageFormatError:
    return ImageFormatError(msg, path=path)


def table_size_limit(name: str, entries: int, entry_len: int, max_bytes: int,
                     path: str | None = None) -> None:
    """QEMU's ``qcow2_validate_table``, first rule: a table holds at most ``max_bytes``
    (SafetyLimitExceeded).  Also applied when an image is opened only to be checked."""
    if entries > max_bytes // entry_len:
        raise SafetyLimitExceeded(
            f"{name} too large: {entries} entries of {entry_len} bytes, limit {max_bytes} bytes",
            limit=max_bytes, path=path)


def table_offset_limit(name: str, offset: int, entries: int, entry_len: int,
                       cluster_size: int, path: str | None = None) -> None:
    """QEMU's ``qcow2_validate_table``, second rule: the table's end fits in an int64 and its
    offset is cluster-aligned (CorruptImage).  Also applied to an image opened only to be
    checked."""
    nbytes = entries * entry_len
    if INT64_MAX - nbytes < offset:
        raise CorruptImage(f"{name} offset {offset:#x} + {nbytes} bytes overflows",
                           offset=offset, path=path)
    if offset % cluster_size:
        raise CorruptImage(f"{name} offset {offset:#x} is not aligned to the cluster size "
                           f"{cluster_size}", offset=offset, path=path)


def l1_size_limit(size: int, cluster_bits: int, extended_l2: bool, l1_size: int,
                  l1_table_offset: int, path: str | None = None) -> None:
    """QEMU's rules for the active L1 at open (check mode too): the disk needs at most
    INT_MAX entries (SafetyLimitExceeded, "Image is too big"), and the L1 holds at least
    that many (CorruptImage, "L1 table is too small")."""
    l1_needed = l1_entries_for(size, cluster_bits, extended_l2)
    if l1_needed > INT_MAX:
        raise SafetyLimitExceeded(f"image is too big: virtual size {size} bytes",
                                  limit=INT_MAX, path=path)
    if l1_size < l1_needed:
        raise CorruptImage(f"L1 table is too small: {l1_size} entries, virtual size {size} "
                           f"needs {l1_needed}", offset=l1_table_offset, path=path)


def validate_table(name: str, offset: int, entries: int, entry_len: int, max_bytes: int,
                    cluster_size: int, file_size: int, path: str | None,
                    *, check_eof: bool = True) -> None:
    """QEMU's ``qcow2_validate_table`` plus the checks a hostile file needs.

    Order as in QEMU: the size limit first (SafetyLimitExceeded), then offset alignment and
    int64 overflow (CorruptImage).  Then ours: a non-empty table must not overlap the header
    cluster and must lie inside the file.
    """
    table_size_limit(name, entries, entry_len, max_bytes, path)
    table_offset_limit(name, offset, entries, entry_len, cluster_size, path)
    nbytes = entries * entry_len
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


def walk_extensions(c0: ByteReader, start: int, end: int, *, lenient: bool = False
                    ) -> Iterator[tuple[int, bytes]]:
    """The (type, data) of each header extension record between ``start`` and ``end``, up
    to the end marker (§2.1: u32 type, u32 length, data, zero padding to 8 bytes).

    A record running past ``end`` raises ImageFormatError, or with ``lenient`` ends the walk
    quietly (as QEMU's check and its naming of unknown feature bits do).
    """
    off = start
    while off < end:
        if off + EXT_HEADER_SIZE > end:
            if lenient:
                return
            raise _format_error(f"header extension at offset {off} runs past the end of the "
                                f"extension area ({end})", c0.path)
        magic = c0.u32(off)
        length = c0.u32(off + 4)
        off += EXT_HEADER_SIZE
        if length > end - off:
            if lenient:
                return
            raise _format_error(f"header extension {magic:#010x} too large: {length} bytes "
                                f"at offset {off}, area ends at {end}", c0.path)
        if magic == EXT_MAGIC_END:
            return
        data = c0.bytes(off, length)
        off += (length + EXT_ALIGN - 1) & ~(EXT_ALIGN - 1)
        yield magic, data


def _read_extensions(c0: ByteReader, start: int, end: int, h_autoclear: int, crypt_method: int,
                     cluster_size: int, path: str | None, *, lenient: bool = False
                     ) -> _Extensions:
    """Walk the header extensions in cluster 0 between ``start`` and ``end`` (§2.1).

    With ``lenient``, stop quietly at the first problem (used only to fetch the feature
    table for naming unknown incompatible bits, where QEMU ignores extension errors too).
    """
    ext = _Extensions()
    seen: set[int] = set()
    for magic, data in walk_extensions(c0, start, end, lenient=lenient):
        length = len(data)
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
            ext.backing_format = decode_name(data)
        elif magic == EXT_MAGIC_DATA_FILE:
            ext.data_file = decode_name(data)
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
            nb, reserved, dir_size, dir_offset = BITMAPS_EXT_STRUCT.unpack(data)
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


def looks_like_qcow2(head: bytes) -> bool:
    """True if ``head`` (the first bytes of a file) starts with a QCOW2 header whose
    version and cluster size QEMU knows, long enough for its fixed fields."""
    if len(head) < V2_HEADER_LENGTH or head[:len(QCOW_MAGIC_BYTES)] != QCOW_MAGIC_BYTES:
        return False
    version = U32.unpack_from(head, HDR_VERSION)[0]
    cluster_bits = U32.unpack_from(head, HDR_CLUSTER_BITS)[0]
    if version not in SUPPORTED_VERSIONS:
        return False
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        return False
    return bool(version == 2 or len(head) >= V3_MIN_HEADER_LENGTH)


def read_fixed_fields(head: bytes) -> Header:
    """The fixed header fields, without any of :func:`parse_header`'s checks of the tables
    or extensions (QEMU's check opens images with tables past the end of the file, or
    without a refcount table).  ``head`` must pass :func:`looks_like_qcow2`."""
    (_magic, version, bfo, bfs, cb, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
     nb_snap, snap_off) = V2_STRUCT.unpack_from(head)
    h = Header(version=version, backing_file_offset=bfo, backing_file_size=bfs,
               cluster_bits=cb, size=size, crypt_method=crypt, l1_size=l1_size,
               l1_table_offset=l1_off, refcount_table_offset=rt_off,
               refcount_table_clusters=rt_clusters, nb_snapshots=nb_snap,
               snapshots_offset=snap_off, header_length=V2_HEADER_LENGTH)
    if version >= 3:
        (h.incompatible_features, h.compatible_features, h.autoclear_features,
         h.refcount_order, h.header_length) = V3_STRUCT.unpack_from(head, V2_HEADER_LENGTH)
    return h


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
    buf = bytes(buffer_arg(buf, "buf"))

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
     nb_snapshots, snapshots_offset) = V2_STRUCT.unpack_from(buf, 0)
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
        incompat, compat, autoclear, refcount_order, header_length = V3_STRUCT.unpack_from(
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
    c0 = ByteReader(buf[:have].ljust(cluster_size, b"\0"), path)

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
    validate_table("refcount table", refcount_table_offset, refcount_table_clusters,
                    cluster_size, MAX_REFTABLE_SIZE, cluster_size, file_size, path)
    # Snapshot table: only offset and count here; its byte size is variable (§6.1).
    if nb_snapshots > MAX_SNAPSHOTS:
        raise SafetyLimitExceeded(f"{nb_snapshots} snapshots, QEMU's limit is {MAX_SNAPSHOTS}",
                                  limit=MAX_SNAPSHOTS, path=path)
    validate_table("snapshot table", snapshots_offset, nb_snapshots, SNAPSHOT_HEADER_SIZE,
                    SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS, cluster_size, file_size, path)
    validate_table("active L1 table", l1_table_offset, l1_size, L1E_SIZE, MAX_L1_SIZE,
                    cluster_size, file_size, path)
    l1_size_limit(size, cluster_bits, bool(incompat & INCOMPAT_EXTL2), l1_size, l1_table_offset,
                  path)

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
        backing_file = decode_name(c0.bytes(backing_file_offset, backing_file_size))

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

def _ext_record(magic: int, data: bytes) -> bytes:
    """One extension record: type, length, data, zero padding to 8 (QEMU header_ext_add)."""
    padded = (len(data) + EXT_ALIGN - 1) & ~(EXT_ALIGN - 1)
    return U32.pack(magic) + U32.pack(len(data)) + data.ljust(padded, b"\0")


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
    header_arg(h)
    if h.version not in SUPPORTED_VERSIONS:
        raise InvalidArgument(f"version must be 2 or 3, got {h.version!r}")
    check_uint(h.cluster_bits, 32, "cluster_bits")
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
        check_uint(getattr(h, attr), bits, attr)
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
        fmt = encode_name(h.backing_format, "backing format")
        if len(fmt) > MAX_BACKING_FORMAT_LEN:
            raise SafetyLimitExceeded(f"backing format name {h.backing_format!r} is longer "
                                      f"than {MAX_BACKING_FORMAT_LEN} bytes",
                                      limit=MAX_BACKING_FORMAT_LEN)
        body += _ext_record(EXT_MAGIC_BACKING_FORMAT, fmt)
    # QEMU writes the data-file name only when the image really has a data file.
    if h.has_data_file and h.data_file is not None:
        body += _ext_record(EXT_MAGIC_DATA_FILE, encode_name(h.data_file, "data file name"))
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
        check_uint(magic, 32, "extension magic")
        if magic == EXT_MAGIC_END:
            raise InvalidArgument("an unknown extension cannot use the end-marker type 0")
        check_uint(len(data), 32, "extension length")
        body += _ext_record(magic, bytes(data))
    body += _ext_record(EXT_MAGIC_END, b"")

    backing_offset = backing_size = 0
    name = b""
    if h.backing_file is not None:
        name = encode_name(h.backing_file, "backing file name")
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

    V2_STRUCT.pack_into(
        fixed, 0, QCOW_MAGIC, h.version, backing_offset, backing_size, h.cluster_bits,
        h.size, h.crypt_method, h.l1_size, h.l1_table_offset, h.refcount_table_offset,
        h.refcount_table_clusters, h.nb_snapshots, h.snapshots_offset)
    if h.version == 3:
        V3_STRUCT.pack_into(fixed, V2_HEADER_LENGTH, h.incompatible_features,
                             h.compatible_features, h.autoclear_features, h.refcount_order,
                             header_length)
        fixed[HDR_COMPRESSION_TYPE] = h.compression_type
    out = bytearray(cluster_size)
    blob = bytes(fixed) + extra_header + bytes(body) + name
    out[:len(blob)] = blob
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
    header_arg(h)
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
