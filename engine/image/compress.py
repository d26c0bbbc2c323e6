"""Decompression of compressed clusters: the one path of the core that crosses into Python,
once per compressed cluster read (registered with the core at import)."""

from __future__ import annotations

import zlib

from engine import _core
from engine.errors import CorruptImage, UnsupportedFeature


def _decompress(ctype: int, data: bytes, cluster_size: int) -> bytes:
    """Inflate one compressed cluster. Whatever this raises reaches the caller of the read
    as it is (the core adds the volume's path to an EngineError that has none), so every
    failure here is a typed error."""
    if ctype == 0:
        try:
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        except zlib.error as e:
            raise CorruptImage(f"compressed cluster does not decompress ({e})") from None
    elif ctype == 1:
        try:
            import zstandard
        except ImportError:
            raise UnsupportedFeature("zstd", "the image has zstd-compressed clusters and the "
                                     "'zstandard' module is not installed",
                                     hint="pip install zstandard") from None
        try:
            out = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        except zstandard.ZstdError as e:
            raise CorruptImage(f"compressed cluster does not decompress ({e})") from None
    else:
        raise UnsupportedFeature(f"compression type {ctype}")
    if len(out) < cluster_size:
        raise CorruptImage("compressed cluster inflates to less than one cluster")
    return out[:cluster_size]


_core.set_decompressor(_decompress)
