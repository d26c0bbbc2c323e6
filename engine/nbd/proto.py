"""NBD wire protocol: constants and codecs, in one place.

Everything here follows the NBD protocol specification, ``doc/proto.md`` of the
NetworkBlockDevice/nbd project (sections "Handshake", "Transmission", "Values"), fixed-newstyle
negotiation only. All integers on the wire are big-endian. Nothing here does I/O: the handshake
(``engine.nbd.handshake``) and the transmission loop (``engine.nbd.conn``) pack and unpack
through these functions and structs.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# --- handshake (proto.md "Newstyle negotiation") ------------------------------------------------

NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option reply types
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR + 1
REP_ERR_POLICY = _REP_ERR + 2
REP_ERR_INVALID = _REP_ERR + 3
REP_ERR_PLATFORM = _REP_ERR + 4
REP_ERR_TLS_REQD = _REP_ERR + 5
REP_ERR_UNKNOWN = _REP_ERR + 6
REP_ERR_SHUTDOWN = _REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
REP_ERR_TOO_BIG = _REP_ERR + 9

# information types (NBD_OPT_INFO / NBD_OPT_GO)
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# --- transmission (proto.md "Transmission phase") -----------------------------------------------

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
             CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
             CMD_BLOCK_STATUS: "BLOCK_STATUS"}

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

#: The flags each command accepts (anything else is EINVAL). DF needs structured replies too.
CMD_VALID_FLAGS = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: 0,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}

# structured reply chunk flags and types
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# error values (proto.md "Error values"; the numbers are the protocol's, not the host's errno)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# metadata contexts (proto.md "Metadata querying"; qemu's namespace: docs/interop/nbd.rst)
CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_ALLOCATION_DEPTH = "qemu:allocation-depth"
STATE_HOLE = 1 << 0          # base:allocation
STATE_ZERO = 1 << 1

# --- limits --------------------------------------------------------------------------------------

#: Largest READ or WRITE payload served (and advertised as the maximum block size): 32 MiB,
#: the size the specification says a server should never treat as hostile.
MAX_PAYLOAD = 32 << 20
#: Longest export name or metadata-context name (the specification's limit for names).
MAX_NAME = 4096
#: Largest option payload read during negotiation; a longer one ends the connection.
MAX_OPTION_DATA = 64 << 10
#: Largest DF ("don't fragment") read: the specification's lower bound of what a server
#: must support.
MAX_DF_READ = 64 << 10
#: Most extents in one BLOCK_STATUS chunk (qemu's cap; the specification allows 2^20).
MAX_EXTENTS = 1 << 17

# --- structs and codecs --------------------------------------------------------------------------

GREETING = struct.Struct(">QQH")             # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")        # IHAVEOPT, option, data length
OPTION_REPLY = struct.Struct(">QIII")        # magic, option, reply type, data length
EXPORT_NAME_REPLY = struct.Struct(">QH")     # size, transmission flags (+124 zeros)
REQUEST = struct.Struct(">IHHQQI")           # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")         # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")              # magic, flags, type, cookie, payload length
DATA_CHUNK = struct.Struct(">IHHQIQ")        # CHUNK + the offset of an OFFSET_DATA chunk
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


class Request(NamedTuple):
    """One transmission request header (28 bytes on the wire)."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def greeting(no_zeroes: bool = True) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT,
                         FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if no_zeroes else 0))


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, reply, len(data)) + data


def info_export(size: int, tflags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, tflags)


def info_text(kind: int, text: str) -> bytes:
    return U16.pack(kind) + text.encode()


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def rep_server(name: str, description: str = "") -> bytes:
    raw = name.encode()
    return U32.pack(len(raw)) + raw + description.encode()


def rep_meta_context(context_id: int, name: str) -> bytes:
    return U32.pack(context_id) + name.encode()


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(cookie: int, ctype: int, length: int, done: bool) -> bytes:
    """The 20-byte header of one structured reply chunk whose payload is LENGTH bytes."""
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, ctype, cookie,
                      length)


def chunk_offset_data_header(cookie: int, offset: int, nbytes: int, done: bool) -> bytes:
    """Chunk header plus the offset field of an OFFSET_DATA chunk carrying NBYTES of data."""
    return chunk(cookie, REPLY_TYPE_OFFSET_DATA, 8 + nbytes, done) + U64.pack(offset)


def data_reply_header(cookie: int, offset: int, nbytes: int) -> bytes:
    """The header of a whole READ reply in one OFFSET_DATA chunk (flagged DONE)."""
    return DATA_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
                           cookie, 8 + nbytes, offset)


def chunk_offset_hole(cookie: int, offset: int, nbytes: int, done: bool) -> bytes:
    return chunk(cookie, REPLY_TYPE_OFFSET_HOLE, 12, done) + struct.pack(">QI", offset, nbytes)


def chunk_none(cookie: int) -> bytes:
    return chunk(cookie, REPLY_TYPE_NONE, 0, True)


def chunk_error(cookie: int, error: int, message: str = "") -> bytes:
    text = message.encode()[:4096]
    return (chunk(cookie, REPLY_TYPE_ERROR, 6 + len(text), True)
            + struct.pack(">IH", error, len(text)) + text)


def chunk_block_status(cookie: int, context_id: int, extents: list[tuple[int, int]],
                       done: bool) -> bytes:
    """One BLOCK_STATUS chunk: the context id, then (length, flags) per extent."""
    body = struct.pack(f">I{2 * len(extents)}I", context_id,
                       *[v for ext in extents for v in ext])
    return chunk(cookie, REPLY_TYPE_BLOCK_STATUS, len(body), done) + body


def parse_request(data: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, Request]:
    """(magic, request) from the 28 bytes at POS."""
    magic, flags, ctype, cookie, offset, length = REQUEST.unpack_from(data, pos)
    return magic, Request(flags, ctype, cookie, offset, length)


def pack_request(ctype: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    """A request header, as a client sends it (for tests and tools)."""
    return REQUEST.pack(REQUEST_MAGIC, flags, ctype, cookie, offset, length)
