"""Argument checks shared by the public API, and the name codec of on-disk strings.

A bad argument is an :class:`~engine.errors.InvalidArgument` carrying the value passed,
never a TypeError from deep inside, and never a silent coercion: a bool is not an int, a
float is not an offset, and a truthy string is not True.
"""

from __future__ import annotations

from typing import Any

from engine.errors import InvalidArgument

from engine.qcow2.spec import (
    KiB,
    MAX_CLUSTER_BITS,
    MAX_U64,
    MIN_CLUSTER_BITS,
    MiB,
)

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


def buffer_arg(value: Any, name: str) -> Any:
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


def decode_name(raw: bytes) -> str:
    # surrogateescape: a name that is not UTF-8 still round-trips to the same bytes.
    return raw.decode("utf-8", "surrogateescape")


def encode_name(name: str, what: str) -> bytes:
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise InvalidArgument(f"{what} {name!r} cannot be encoded: {e}") from None


def check_uint(value: object, bits: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise InvalidArgument(f"{what} must be an unsigned {bits}-bit integer, got {value!r}")
    return value
