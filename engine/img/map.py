"""``map``: the records of ``qemu-img map --output=json`` (QEMU 7.2), merged the same way."""

from __future__ import annotations

import json
from typing import Any

from engine.errors import UnsupportedFeature
from engine.img._open import chain_names, open_image

#: The keys qemu-img 7.2 prints, in its order (``offset`` only where the data sits raw in a
#: file).  The ``compressed`` key of QEMU 8.2+ is not printed.
KEYS = ("start", "length", "depth", "present", "zero", "data", "offset")


def map_entries(path: str, *, format: str | None = None, start_offset: int = 0,
                max_length: int | None = None, force_share: bool = False,
                allow_unsafe_backing: bool = False) -> list[dict[str, Any]]:
    """``qemu-img map --output=json [-f FMT] [--start-offset S] [--max-length L] [-U] PATH``.

    Returns:
        list of dicts with the keys of :data:`KEYS`, one per run, adjacent runs merged as
        qemu-img merges them (same depth/present/zero/data, contiguous offsets); each dict
        also carries the layer's ``filename`` (qemu-img prints it in human output only).
        An empty range (an empty disk, a start at or past its end, a zero length) gives
        qemu-img's one empty record at START_OFFSET.
    """
    with open_image(path, format=format, force_share=force_share,
                    allow_unsafe_backing=allow_unsafe_backing) as img:
        names = chain_names(img, path)
        out: list[dict[str, Any]] = []
        end = img.size if max_length is None else min(img.size, start_offset + max_length)
        if start_offset >= end:
            # qemu-img maps nothing and prints its empty first record
            return [{"start": start_offset, "length": 0, "depth": 0, "present": False,
                     "zero": False, "data": False, "filename": names[0]}]
        for e in img.extents(start_offset, max_length):
            d: dict[str, Any] = {"start": e.start, "length": e.length, "depth": e.depth,
                                 "present": e.present, "zero": e.zero, "data": e.data}
            if e.offset is not None:
                d["offset"] = e.offset
            prev = out[-1] if out else None
            if prev is not None and _mergeable(prev, d):
                prev["length"] += d["length"]
                continue
            d["filename"] = names[min(e.depth, len(names) - 1)]
            out.append(d)
    return out


def _mergeable(prev: dict[str, Any], d: dict[str, Any]) -> bool:
    if any(prev[k] != d[k] for k in ("depth", "present", "zero", "data")):
        return False
    if ("offset" in prev) != ("offset" in d):
        return False
    return "offset" not in d or prev["offset"] + prev["length"] == d["offset"]


def map_json_text(entries: list[dict[str, Any]]) -> str:
    """The entries printed as qemu-img prints them: one object per line in a JSON array."""
    lines = []
    for d in entries:
        fields = ", ".join(f'"{k}": {json.dumps(d[k])}' for k in KEYS if k in d)
        lines.append("{ " + fields + "}")
    return "[" + ",\n".join(lines) + "]\n"


def map_human(entries: list[dict[str, Any]]) -> str:
    """qemu-img map's human output: the data ranges with their host offsets and files.

    Raises:
        UnsupportedFeature: a data range has no host offset (a compressed cluster), which
            qemu-img's human output cannot show either (use the JSON output).
    """
    out = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for d in entries:
        if not d["data"]:
            continue
        if "offset" not in d:
            raise UnsupportedFeature("human map of compressed data",
                                     "the range at offset " f"{d['start']} has no host offset "
                                     "(compressed)", hint="use --output json")
        out.append(f"{_hex(d['start']):<16}{_hex(d['length']):<16}{_hex(d['offset']):<16}"
                   f"{d['filename']}")
    return "\n".join(out) + "\n"


def _hex(n: int) -> str:
    return f"{n:#x}" if n else "0"
