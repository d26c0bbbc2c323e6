"""Arguments of the I/O methods: every bad one is refused with InvalidArgument carrying it.

The rule: offsets and lengths are Python ints or numpy integers (integer dtypes only; bool
is not an integer here and a float is refused, never truncated), 0 <= value < 2**64, and the
range lies inside the disk; buffers are C-contiguous, and writable where the method fills
them. A refused call changes nothing.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

import engine
from engine.errors import InvalidArgument

C = 65536
SIZE = 1 << 20

SAME = object()         # the error's value is the bad argument itself

# (value, label): offsets and lengths that are not integers in range
BAD_INTS = [
    (-1, "neg"), (-(2**63), "neg-2^63"), (2**63, "2^63"), (2**64, "2^64"), (2**64 + 1, "2^64+1"),
    (2**64 - 1, "2^64-1"), (1.9, "float"), (0.0, "float-zero"), (math.nan, "nan"),
    (math.inf, "inf"), (True, "bool"), (False, "bool-false"), ("0", "str"), (None, "none"),
    (1j, "complex"), ([0], "list"), (np.float64(1.0), "np-float"), (np.bool_(True), "np-bool"),
    (np.int64(-1), "np-neg"), (np.uint64(2**63), "np-2^63"), (np.array(0.5), "np-0d-float"),
]

# buffers that cannot receive a read
ro = np.zeros(4096, dtype=np.uint8)
ro.flags.writeable = False
BAD_OUT = [
    (np.zeros(8192, dtype=np.uint8)[::2], "non-contiguous"),
    (np.zeros((64, 128), dtype=np.uint8)[:, :64], "non-contiguous-2d"),
    (bytes(4096), "bytes"), (ro, "read-only-array"), (memoryview(bytes(4096)), "ro-memoryview"),
    (None, "none"), (5, "int"), ("abcd", "str"), ([0] * 16, "list"),
]
# buffers that cannot be written from
BAD_DATA = [b for b in BAD_OUT if b[1] not in ("bytes", "read-only-array", "ro-memoryview")]

# offsets for readv / writev: (value, label, the value the error carries)
BAD_OFFSETS = [
    (np.array([0.0, 512.0]), "float-array", SAME), (np.array([True, False]), "bool-array", SAME),
    (np.array([0, -512], dtype=np.int64), "negative-array", -512), ([0, -1], "negative-list", -1),
    ([0, 0.9], "float-in-list", 0.9), ([True, 0], "bool-in-list", True),
    ([0, None], "none-in-list", None), ([2**64], "2^64-in-list", 2**64),
    ([2**63], "past-end", 2**63), (np.array([2**63], dtype=np.uint64), "past-end-array", 2**63),
    (np.zeros((2, 2), dtype=np.uint64), "2-d", SAME),
    (np.array([0, 1], dtype=object), "object", SAME),
    (None, "none", SAME), (5, "int", SAME), ("abc", "str", SAME), (b"\0" * 8, "bytes", SAME),
    (0.5, "float", SAME),
]


def _cases():
    """(method, args builder, label, value the error must carry) for every argument of
    every I/O method."""
    cases = []
    for v, lab in BAD_INTS:
        cases += [
            ("readinto", lambda v=v: (v, bytearray(512)), f"offset-{lab}", v),
            ("read", lambda v=v: (v, 16), f"offset-{lab}", v),
            ("read", lambda v=v: (0, v), f"length-{lab}", v),
            ("write", lambda v=v: (v, b"x" * 16), f"offset-{lab}", v),
            ("write_zeroes", lambda v=v: (v, 512), f"offset-{lab}", v),
            ("write_zeroes", lambda v=v: (0, v), f"length-{lab}", v),
            ("discard", lambda v=v: (v, C), f"offset-{lab}", v),
            ("discard", lambda v=v: (0, v), f"length-{lab}", v),
            ("extents", lambda v=v: (v, 512), f"offset-{lab}", v),
            ("extents", lambda v=v: (0, v), f"length-{lab}", v),
            ("readv", lambda v=v: ([0], v), f"length-{lab}", v),
            ("writev", lambda v=v: ([0], v, bytes(C)), f"length-{lab}", v),
            ("readv", lambda v=v: ([v], 16), f"offset-in-list-{lab}", v),
            ("writev", lambda v=v: ([v], 16, bytes(16)), f"offset-in-list-{lab}", v),
        ]
    for b, lab in BAD_OUT:
        cases += [
            ("readinto", lambda b=b: (0, b), f"buffer-{lab}", b),
            ("readv", lambda b=b: ([0, 16], 16, b), f"out-{lab}", b),
        ]
    for b, lab in BAD_DATA:
        cases += [
            ("write", lambda b=b: (0, b), f"data-{lab}", b),
            ("writev", lambda b=b: ([0], 16, b), f"data-{lab}", b),
        ]
    for o, lab, want in BAD_OFFSETS:
        cases += [
            ("readv", lambda o=o: (o, 16), f"offsets-{lab}", o if want is SAME else want),
            ("writev", lambda o=o: (o, 16, bytes(64)), f"offsets-{lab}",
             o if want is SAME else want),
        ]
    small_out, short_data = bytearray(31), bytes(31)
    cases += [
        ("readinto", lambda: (SIZE - 100, bytearray(512)), "past-end", 512),
        ("readinto", lambda: (SIZE + 1, bytearray(0)), "offset-past-end", SIZE + 1),
        ("write", lambda: (SIZE - 1, b"ab"), "past-end", 2),
        ("readv", lambda: ([0, 16], 16, small_out), "out-too-small", small_out),
        ("writev", lambda: ([0, 16], 16, short_data), "data-too-short", short_data),
        ("readv", lambda: ([0, 0], 2**63), "length-2^63-two-reads", 2**63),
        ("writev", lambda: ([0, 0], 2**63, b""), "length-2^63-two-writes", 2**63),
    ]
    # None is a valid choice there: extents(length=None) runs to the end, readv(out=None)
    # allocates the output
    return [c for c in cases if (c[0], c[2]) not in (("extents", "length-none"),
                                                      ("readv", "out-none"))]


CASES = _cases()


def _same(got, want) -> bool:
    """The very object, or the same number (a numpy integer may come back as an int)."""
    if got is want:
        return True
    number = (int, float, np.integer, np.floating)
    if isinstance(got, number) and isinstance(want, number) and \
            isinstance(got, (bool, np.bool_)) == isinstance(want, (bool, np.bool_)):
        return bool(got == want)
    return False


def _open(folder, fmt):
    path = str(folder / f"disk.{fmt}")
    with engine.create(path, SIZE, format=fmt) as im:
        im.write(0, bytes(range(256)) * (SIZE // 256))
    return engine.open(path, format=fmt)


@pytest.fixture(scope="module", params=["qcow2", "raw"])
def shared(request, tmp_path_factory):
    """One image per format for the whole sweep: each case checks that it changed nothing."""
    im = _open(tmp_path_factory.mktemp("sweep"), request.param)
    yield im
    im.close()


@pytest.fixture(params=["qcow2", "raw"])
def img(request, tmp_path):
    im = _open(tmp_path, request.param)
    yield im
    im.close()


def _digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("method,args,label,want", CASES,
                         ids=[f"{m}-{lab}" for m, _, lab, _ in CASES])
def test_bad_argument_is_refused_with_its_value(shared, method, args, label, want):
    img = shared
    img.flush()
    before = _digest(img.path)
    with pytest.raises(InvalidArgument) as ei:
        getattr(img, method)(*args())
    assert _same(ei.value.value, want), (ei.value.value, want)
    assert str(ei.value)                            # a message
    img.flush()
    assert _digest(img.path) == before              # nothing changed
    assert img.read(256, 4) == bytes([0, 1, 2, 3])  # and the image still works


GOOD_INTS = [4096, np.int64(4096), np.uint64(4096), np.int32(4096), np.uint16(4096)]


@pytest.mark.parametrize("v", GOOD_INTS, ids=lambda v: type(v).__name__)
def test_integer_types_are_accepted(img, v):
    buf = bytearray(4)                                     # the disk: bytes(range(256))...
    assert img.readinto(v, buf) == 4 and buf == bytes([0, 1, 2, 3])
    assert img.read(v, 4) == bytes([0, 1, 2, 3])
    assert bytes(img.readv([v, 1], 2)) == bytes([0, 1, 1, 2])
    assert bytes(img.readv(np.array([4096, 1], dtype=type(v)), v)[:2]) == bytes([0, 1])
    assert img.write(v, b"\xff") == 1
    img.writev([v], 1, b"\xfe")
    img.write_zeroes(v, 1)
    assert img.read(4096, 2) == b"\0\x01"
    assert img.extents(v, v)


def test_float_offsets_are_not_truncated(img):
    """The defect that made this rule: readinto(1.9, buf) read at 1, readv([0.9]) at 0."""
    with pytest.raises(InvalidArgument):
        img.readinto(1.9, bytearray(4))
    with pytest.raises(InvalidArgument):
        img.readv([0.9], 4)
    with pytest.raises(InvalidArgument):
        img.readv(np.array([0.9]), 4)
