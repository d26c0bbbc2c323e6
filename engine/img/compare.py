"""``compare``: ``qemu-img compare [-s] [-f FMT] [-F FMT] A B`` and its exit codes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from engine.img._open import open_image

if TYPE_CHECKING:
    from engine.image import Image

#: Bytes read per step while comparing data.
STEP = 4 << 20
#: qemu-img compares data in 512-byte sectors: a mismatch is reported at the start of the
#: first sector that differs (or, against an unallocated range, holds a non-zero byte).
SECTOR = 512


@dataclass
class CompareResult:
    """What ``qemu-img compare`` finds.

    Attributes:
        identical (bool): the two disks read the same (exit 0); otherwise exit 1.
        offset (int | None): the first differing offset, when contents differ.
        message (str): qemu-img's line ("Images are identical.", "Content mismatch at
            offset N!", "Strict mode: Image size mismatch!", ...).
        size_warning (bool): sizes differ (non-strict mode still compares).
    """

    identical: bool
    offset: int | None
    message: str
    size_warning: bool = False

    @property
    def exit_code(self) -> int:
        return 0 if self.identical else 1

    def to_text(self) -> str:
        return ("Warning: Image size mismatch!\n" if self.size_warning else "") + self.message + "\n"


def compare(path_a: str, path_b: str, *, format_a: str | None = None,
            format_b: str | None = None, strict: bool = False,
            force_share: bool = False, allow_unsafe_backing: bool = False) -> CompareResult:
    """Compare the disks two images (with their backing chains) read.

    As qemu-img: where both are unallocated or zero nothing is read; where one is allocated
    and the other not, the allocated one must read zeros (the first non-zero byte is the
    mismatch); where both are allocated the data is compared sector by sector.  Past the
    smaller disk, the larger must read zeros.  ``strict`` also fails on a size difference
    and on ranges whose allocation differs.

    Raises:
        what :func:`engine.open` raises (qemu-img compare exits 2 for those).
    """
    opts = {"force_share": force_share, "allow_unsafe_backing": allow_unsafe_backing}
    with open_image(path_a, format=format_a, **opts) as a, \
            open_image(path_b, format=format_b, **opts) as b:
        warn = a.size != b.size
        if strict and warn:
            return CompareResult(False, None, "Strict mode: Image size mismatch!")
        common = min(a.size, b.size)
        found = _compare_common(a, b, common, strict)
        if found is not None:
            return _with(found, warn)
        big = a if a.size > b.size else b
        for start, end, zero, _present in _runs(big, common, big.size):
            if not zero:
                off = _first_nonzero(big, start, end)
                if off is not None:
                    return CompareResult(False, off, f"Content mismatch at offset {off}!", warn)
    return CompareResult(True, None, "Images are identical.", warn)


def _with(r: CompareResult, warn: bool) -> CompareResult:
    r.size_warning = warn
    return r


def _runs(img: Image, start: int, end: int) -> list[tuple[int, int, bool, bool]]:
    """(start, end, reads-zero, allocated) runs of IMG over [start, end)."""
    if end <= start:
        return []
    return [(e.start, e.start + e.length, bool(e.zero) and not e.data, e.present)
            for e in img.extents(start, end - start)]


def _compare_common(a: Image, b: Image, size: int, strict: bool) -> CompareResult | None:
    ra, rb = _runs(a, 0, size), _runs(b, 0, size)
    i = j = 0
    pos = 0
    while pos < size:
        while ra[i][1] <= pos:
            i += 1
        while rb[j][1] <= pos:
            j += 1
        end = min(ra[i][1], rb[j][1])
        za, pa = ra[i][2], ra[i][3]
        zb, pb = rb[j][2], rb[j][3]
        if strict and (za, pa) != (zb, pb):
            return CompareResult(False, pos, f"Strict mode: Offset {pos} block status mismatch!")
        if za and zb:
            pass
        elif pa != pb:
            img = a if pa else b
            off = _first_nonzero(img, pos, end)
            if off is not None:
                return CompareResult(False, off, f"Content mismatch at offset {off}!")
        else:
            off = _first_difference(a, b, pos, end)
            if off is not None:
                return CompareResult(False, off, f"Content mismatch at offset {off}!")
        pos = end
    return None


def _first_nonzero(img: Image, start: int, end: int) -> int | None:
    pos = start
    while pos < end:
        n = min(STEP, end - pos)
        buf = np.frombuffer(img.read(pos, n), dtype=np.uint8)
        nz = np.flatnonzero(buf)
        if len(nz):
            return _sector_start(start, pos + int(nz[0]))
        pos += n
    return None


def _first_difference(a: Image, b: Image, start: int, end: int) -> int | None:
    pos = start
    while pos < end:
        n = min(STEP, end - pos)
        x = np.frombuffer(a.read(pos, n), dtype=np.uint8)
        y = np.frombuffer(b.read(pos, n), dtype=np.uint8)
        diff = np.flatnonzero(x != y)
        if len(diff):
            return _sector_start(start, pos + int(diff[0]))
        pos += n
    return None


def _sector_start(start: int, off: int) -> int:
    """The start of the 512-byte sector (counted from START) holding OFF: qemu-img reports
    a mismatch at the sector that differs, not at the byte."""
    return max(start, off - (off - start) % SECTOR)
