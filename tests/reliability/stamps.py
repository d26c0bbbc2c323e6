"""Stamped 512-byte blocks: every block written by a reliability workload says who wrote it.

Layout (little endian)::

    0   8  magic b"CCSTAMP1"
    8   8  seq        the operation that wrote it (unique over a whole run, > 0)
    16  8  lba        the 512-byte block address it was written to
    24  8  generation the worker process (epoch) that wrote it
    32 476 payload    derived from (seq, lba), so two stamps never share bytes
    508 4  crc32 of bytes 0..507

A wrong, stale, torn or misplaced block is then detectable: a bad CRC or magic is garbage or a
torn block, a good stamp with another LBA is a misplaced block, a good stamp with an older seq
is a lost write. An all-zero block is "zeros" (descriptor 0).
"""

from __future__ import annotations

import zlib

import numpy as np

BLOCK = 512
MAGIC = b"CCSTAMP1"
_MAGIC_U64 = int.from_bytes(MAGIC, "little")

#: Observation codes returned by :func:`decode` besides seq numbers (> 0) and 0 (zeros).
GARBAGE = -1      # neither zeros nor a valid stamp (bad magic/CRC): torn or random bytes
MISPLACED = -2    # a valid stamp written for another LBA


def make(seq: int, lba: int, nblocks: int, gen: int = 0) -> bytes:
    """nblocks stamped blocks for LBAs lba .. lba+nblocks-1, all written by op ``seq``."""
    n = nblocks
    words = np.empty((n, BLOCK // 8), dtype="<u8")
    lbas = np.arange(lba, lba + n, dtype=np.uint64)
    words[:, 0] = _MAGIC_U64
    words[:, 1] = seq
    words[:, 2] = lbas
    words[:, 3] = gen
    k = np.arange(BLOCK // 8 - 4, dtype=np.uint64)
    with np.errstate(over="ignore"):
        mix = (np.uint64(seq) * np.uint64(0x9E3779B97F4A7C15)) ^ (lbas * np.uint64(0xC2B2AE3D27D4EB4F))
        words[:, 4:] = mix[:, None] + k[None, :] * np.uint64(0x165667B19E3779F9)
    raw = words.view(np.uint8).reshape(n, BLOCK)
    for i in range(n):
        crc = zlib.crc32(raw[i, :508].tobytes())
        raw[i, 508:512] = np.frombuffer(crc.to_bytes(4, "little"), dtype=np.uint8)
    return raw.tobytes()


def decode(buf, first_lba: int = 0) -> np.ndarray:
    """Per 512-byte block of ``buf`` (read at LBA ``first_lba``): the seq of a valid stamp for
    that LBA, 0 for an all-zero block, GARBAGE or MISPLACED. Returns an int64 array."""
    a = np.frombuffer(buf, dtype=np.uint8)
    n = len(a) // BLOCK
    a = a[:n * BLOCK].reshape(n, BLOCK)
    words = a.view("<u8")
    out = np.full(n, GARBAGE, dtype=np.int64)
    zero = ~a.any(axis=1)
    out[zero] = 0
    cand = np.nonzero((words[:, 0] == _MAGIC_U64) & ~zero)[0]
    lbas = np.arange(first_lba, first_lba + n, dtype=np.uint64)
    crcs = a[:, 508:512].copy().view("<u4")[:, 0]
    for i in cand.tolist():
        if zlib.crc32(a[i, :508].tobytes()) != int(crcs[i]):
            continue
        if words[i, 2] != lbas[i]:
            out[i] = MISPLACED
        else:
            out[i] = int(words[i, 1])
    return out


def describe(buf, lba: int) -> str:
    """A short human description of one block (for failure messages)."""
    b = bytes(buf[:BLOCK])
    if not any(b):
        return "zeros"
    if b[:8] != MAGIC:
        return f"garbage {b[:16].hex()}"
    seq, slba, gen = (int.from_bytes(b[o:o + 8], "little") for o in (8, 16, 24))
    ok = zlib.crc32(b[:508]) == int.from_bytes(b[508:512], "little")
    return f"stamp(seq={seq}, lba={slba}, gen={gen}, crc={'ok' if ok else 'BAD'})" + (
        "" if slba == lba else f" MISPLACED (read at lba {lba})")
