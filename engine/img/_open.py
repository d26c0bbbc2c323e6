"""What every verb shares: opening an image as qemu-img opens it, and qemu-img's names."""

from __future__ import annotations

import os
from fractions import Fraction
from typing import TYPE_CHECKING

from engine import image as _image
from engine.errors import InvalidArgument, UnsupportedFeature

if TYPE_CHECKING:
    from engine.image import Image

#: The formats the verbs read and write (``-f``, ``-F``, ``-O``).
FORMATS = ("qcow2", "raw")


def format_arg(value: str | None, what: str = "format") -> str | None:
    """A format name as given with -f/-F/-O: None (probe the top image), "qcow2" or "raw"."""
    if value is None or value in FORMATS:
        return value
    raise InvalidArgument(f"unknown {what} {value!r}: cowchain reads and writes qcow2 and raw",
                          value=value)


def open_image(path: str, *, format: str | None = None, readonly: bool = True,
               force_share: bool = False, backing: bool = True,
               allow_unsafe_backing: bool = False) -> Image:
    """Open PATH the way a qemu-img verb does: read-only unless it changes the image, with
    its backing chain unless ``backing=False``, sharing every permission with ``force_share``
    (qemu-img ``-U``; read-only opens only).

    A read-write open of an image with persistent bitmaps is refused (UnsupportedFeature)
    before anything is written: the engine does not maintain bitmaps, so its read-write open
    would drop them (and ``qemu-img check`` would then count their clusters as leaks).
    """
    fmt = format_arg(format)
    if not readonly:
        with _image.open(path, format=fmt, readonly=True, force_share=True,
                         backing=False) as peek:
            if peek.header is not None and peek.header.has_bitmaps:
                raise UnsupportedFeature(
                    "writing images with persistent bitmaps", "the image has persistent "
                    "dirty bitmaps, which cowchain does not maintain; a write would drop them",
                    path=path, hint="remove them with 'qemu-img bitmap --remove' first, or "
                    "use qemu-img for this step")
    return _image.open(path, format=fmt, readonly=readonly,
                       force_share=force_share and readonly, backing=backing,
                       allow_unsafe_backing=allow_unsafe_backing)


def backing_display_name(overlay: str, backing: str) -> str:
    """The name qemu-img gives a backing file (``full-backing-filename``): the stored name
    joined to the folder of the overlay *as the overlay was named* (a relative overlay name
    gives a relative backing name); absolute and protocol names stay as stored."""
    if os.path.isabs(backing) or ":" in backing.split("/", 1)[0]:
        return backing
    return os.path.join(os.path.dirname(overlay), backing)


def chain_names(top: Image, name: str) -> list[str]:
    """The name qemu-img shows for each image of TOP's chain, top first (TOP as NAME)."""
    names = [name]
    img = top
    while img.backing is not None:
        stored = img.backing_name
        names.append(backing_display_name(names[-1], stored) if stored else img.backing.path)
        img = img.backing
    return names


def unlink_quietly(path: str) -> None:
    """Remove a temporary file a failed write leaves behind (gone already is fine)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def parse_size(text: str | int, what: str = "size") -> int:
    """A size as qemu-img takes it: bytes, or a number with a K/M/G/T/P/E suffix (powers of
    1024, an optional B). Returns bytes; a bad or fractional size is InvalidArgument."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if s and s[-1] in _SUFFIXES:
        mult = 1 << (10 * (_SUFFIXES.index(s[-1]) + 1))
        s = s[:-1]
    try:
        value = Fraction(s) * mult
    except (ValueError, ZeroDivisionError):
        raise InvalidArgument(f"invalid {what} {text!r} (examples: 4096, 64k, 10G)",
                              value=text) from None
    if value < 0 or value.denominator != 1:
        raise InvalidArgument(f"{what} {text!r} is not a whole number of bytes", value=text)
    return int(value)


_SUFFIXES = "KMGTPE"


def size_text(n: int) -> str:
    """A size as qemu-img prints it in human output (``size_to_str``): '4 MiB', '332 KiB',
    '1.5 GiB' (three significant digits)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    i = 0
    value = float(n)
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    return f"{value:0.3g} {units[i]}"
