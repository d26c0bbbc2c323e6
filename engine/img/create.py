"""``create``: ``qemu-img create -f FMT -o OPTIONS [-b NAME -F FMT] [-u] FILE [SIZE]``."""

from __future__ import annotations

from typing import Any

import os

from engine import destination as _destination
from engine import image as _image
from engine.errors import InvalidArgument, UnsupportedFeature
from engine.img._open import format_arg, open_image, parse_size, unlink_quietly
from engine.img.prealloc import preallocated_image, write_layout, write_raw
from engine.qcow2.layout import new_image_header
from engine.qcow2.spec import COMPRESSION_ZSTD, INCOMPAT_COMPRESSION

#: ``-o`` options per format, with qemu-img's defaults (the order of its "Formatting" line).
QCOW2_OPTIONS: dict[str, Any] = {"cluster_size": 65536, "extended_l2": False, "preallocation": "off",
                 "compression_type": "zlib", "size": None, "compat": "1.1",
                 "backing_file": None, "backing_fmt": None, "lazy_refcounts": False,
                 "refcount_bits": 16}
RAW_OPTIONS: dict[str, Any] = {"size": None, "preallocation": "off"}
_BOOLS = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}
_COMPAT = {"0.10": "0.10", "v2": "0.10", "1.1": "1.1", "v3": "1.1"}
_SIZES = ("cluster_size", "size")
_PREALLOC = ("off", "metadata", "falloc", "full")


def parse_options(text: str | list[str] | None, format: str = "qcow2") -> dict[str, Any]:
    """``-o`` option strings ("cluster_size=4k,compat=0.10"; several may be given) to a dict
    of typed values, refusing what qemu-img refuses (an unknown name: "Invalid parameter")."""
    known = QCOW2_OPTIONS if format == "qcow2" else RAW_OPTIONS
    out: dict[str, Any] = {}
    parts = [text] if isinstance(text, str) else list(text or [])
    for item in ",".join(parts).split(","):
        if not item:
            continue
        name, eq, value = item.partition("=")
        if name not in known:
            raise InvalidArgument(f"Invalid parameter '{name}' for format {format}", value=name)
        if isinstance(known[name], bool):
            if (value if eq else "on") not in _BOOLS:
                raise InvalidArgument(f"Parameter '{name}' expects 'on' or 'off'", value=value)
            out[name] = _BOOLS[value if eq else "on"]
        elif name in _SIZES:
            out[name] = parse_size(value, name)
        elif name == "refcount_bits":
            out[name] = parse_size(value, name)
        elif name == "compat":
            if value not in _COMPAT:
                raise InvalidArgument(f"Invalid compatibility level: '{value}'", value=value)
            out[name] = _COMPAT[value]
        elif name == "preallocation" and value not in _PREALLOC:
            raise InvalidArgument(f"Parameter 'preallocation' does not accept value '{value}'",
                                  value=value)
        else:
            out[name] = value
    return out


def create(path: str, size: int | str | None = None, *, format: str = "qcow2",
           options: dict[str, Any] | None = None, backing: str | None = None,
           backing_format: str | None = None, unsafe: bool = False,
           allow_unsafe_backing: bool = False) -> str:
    """Create an image as ``qemu-img create`` does (same layout, byte for byte, for what
    :func:`engine.create` lays out), and return qemu-img's "Formatting ..." line.

    Arguments:
        path (str): the new file (an existing file is replaced, as qemu-img does).
        size (int | str | None): bytes or a size with a suffix; None takes the backing
            file's size (not with ``unsafe``).
        format (str): "qcow2" or "raw".
        options (dict): :func:`parse_options` output; ``preallocation`` "metadata" (qcow2),
            "falloc" or "full" lays the image out as qemu-img does
            (:mod:`engine.img.prealloc`).
        backing, backing_format: ``-b``/``-F`` (a backing file needs its format).
        unsafe (bool): ``-u``: record the backing file without opening it (a size is then
            required).
        allow_unsafe_backing (bool): follow absolute and out-of-folder backing names.

    Raises:
        InvalidArgument, UnsupportedFeature, and what :func:`engine.create` raises.
    """
    fmt = format_arg(format) or "qcow2"
    opts = dict(QCOW2_OPTIONS if fmt == "qcow2" else RAW_OPTIONS)
    opts.update(options or {})
    backing = backing if backing is not None else opts.get("backing_file")
    backing_format = format_arg(backing_format if backing_format is not None
                                else opts.get("backing_fmt"), "backing format")
    if size is not None:
        opts["size"] = parse_size(size)
    prealloc = opts["preallocation"]
    if fmt == "raw" and prealloc == "metadata":
        raise InvalidArgument("Unsupported preallocation mode: metadata", path=path,
                              hint="raw images take the preallocation modes off, falloc and full")
    if fmt == "qcow2" and prealloc != "off" and backing is not None \
            and not opts["extended_l2"]:
        raise InvalidArgument("Backing file and preallocation can only be used at the same "
                              "time if extended_l2 is on", path=path)
    if backing is not None and backing_format is None:
        raise InvalidArgument("Backing file specified without backing format", path=path,
                              hint="add -F raw or -F qcow2")
    if unsafe and opts["size"] is None:
        raise InvalidArgument("Image creation needs a size parameter", path=path)
    kw: dict[str, Any] = {}
    if fmt == "qcow2":
        if opts["compression_type"] not in ("zlib", "zstd"):
            raise InvalidArgument(f"Invalid compression type '{opts['compression_type']}'",
                                  value=opts["compression_type"], path=path)
        if opts["compression_type"] == "zstd" and opts["compat"] != "1.1":
            raise InvalidArgument("compression_type zstd requires compat 1.1 or later", path=path)
        kw = {"cluster_size": opts["cluster_size"], "compat": opts["compat"],
              "refcount_bits": opts["refcount_bits"], "lazy_refcounts": opts["lazy_refcounts"],
              "extended_l2": opts["extended_l2"]}
    elif backing is not None:
        raise InvalidArgument("raw images cannot have a backing file", path=path)
    on_create = None if unsafe else backing
    img = _image.create(path, opts["size"], format=fmt, overwrite=True,
                        backing=on_create, backing_format=backing_format if on_create else None,
                        allow_unsafe_backing=allow_unsafe_backing, **kw)
    opts["size"] = img.size if opts["size"] is None else opts["size"]
    img.close()
    if prealloc != "off":
        _preallocate(path, fmt, prealloc, opts["size"], kw, opts["compression_type"]
                     if fmt == "qcow2" else "zlib", backing, backing_format)
    elif fmt == "qcow2" and (opts["compression_type"] == "zstd" or (unsafe and backing)):
        with open_image(path, readonly=False, backing=False) as again:
            def change(h: Any) -> None:
                if opts["compression_type"] == "zstd":
                    h.compression_type = COMPRESSION_ZSTD
                    h.incompatible_features |= INCOMPAT_COMPRESSION
                if unsafe and backing:
                    h.backing_file, h.backing_format = backing, backing_format
            again.rewrite_header(change)
    opts["backing_file"], opts["backing_fmt"] = backing, backing_format
    return formatting_line(path, fmt, opts, given=set(options or {}))


def _preallocate(path: str, fmt: str, mode: str, size: int, kw: dict[str, Any],
                 compression_type: str, backing: str | None,
                 backing_format: str | None) -> None:
    """Replace the image just made at PATH (every check of :func:`engine.image.create`
    passed) by its preallocated form (:mod:`engine.img.prealloc`), written under a
    temporary name and renamed over it."""
    d = _destination.check(path, overwrite=True)
    tmp = d.temp_path()
    try:
        if fmt == "raw":
            sim = None
        else:
            h = new_image_header(size, compression_type=compression_type,
                                 backing_file=backing, backing_format=backing_format, **kw)
            sim = preallocated_image(h, mode)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if sim is None:
                write_raw(fd, size, mode, path)
            else:
                write_layout(fd, sim, mode, path)
        finally:
            os.close(fd)
        d.commit(tmp)
    except BaseException:
        unlink_quietly(tmp)
        raise


def formatting_line(path: str, fmt: str, opts: dict[str, Any], given: set[str]) -> str:
    """qemu-img create's first line: "Formatting 'PATH', fmt=FMT name=value ..."."""
    words = [f"Formatting '{path}', fmt={fmt}"]
    for name, default in (QCOW2_OPTIONS if fmt == "qcow2" else RAW_OPTIONS).items():
        value = opts.get(name)
        if value is None or (name in ("compat", "preallocation") and name not in given):
            continue
        if isinstance(default, bool):
            value = "on" if value else "off"
        words.append(f"{name}={value}")
    return " ".join(words)
