"""``info``: the fields and names of ``qemu-img info --output=json`` (QEMU 7.2)."""

from __future__ import annotations

from typing import Any

from engine.img.bitmaps import bitmap_list
from engine.img._open import backing_display_name, chain_names, open_image, size_text
from engine.img.snapshot import snapshot_text


def info(path: str, *, format: str | None = None, backing_chain: bool = False,
         force_share: bool = False, allow_unsafe_backing: bool = False) -> Any:
    """``qemu-img info --output=json [--backing-chain] [-f FMT] [-U] PATH``.

    Returns one dict (:meth:`engine.Image.info`'s fields, with ``filename`` and
    ``full-backing-filename`` spelled as qemu-img spells them: relative to the name given),
    or with ``backing_chain`` a list of them, top image first.

    Raises:
        what :func:`engine.open` raises (ImageNotFound, ImageFormatError, ImageLocked, ...).
    """
    with open_image(path, format=format, force_share=force_share,
                    backing=bool(backing_chain), allow_unsafe_backing=allow_unsafe_backing) as img:
        images = img.chain() if backing_chain else [img]
        names = chain_names(img, path) if backing_chain else [path]
        out = []
        for one, name in zip(images, names):
            d: dict[str, Any] = one.info()
            d["filename"] = name
            bitmaps = bitmap_list(one.path, one.header) if one.header is not None else []
            if bitmaps:
                data = d["format-specific"]["data"]
                # where qemu-img 7.2 prints it: after lazy-refcounts
                keys = list(data)
                at = keys.index("lazy-refcounts") + 1 if "lazy-refcounts" in keys else len(keys)
                d["format-specific"]["data"] = dict(
                    [(k, data[k]) for k in keys[:at]] + [("bitmaps", bitmaps)]
                    + [(k, data[k]) for k in keys[at:]])
            if "backing-filename" in d:
                d["full-backing-filename"] = backing_display_name(name, d["backing-filename"])
            out.append(d)
    return out if backing_chain else out[0]


def info_text(result: Any) -> str:
    """The human output of ``qemu-img info`` for what :func:`info` returned."""
    blocks = []
    for d in result if isinstance(result, list) else [result]:
        lines = [f"image: {d['filename']}", f"file format: {d['format']}",
                 f"virtual size: {size_text(d['virtual-size'])} ({d['virtual-size']} bytes)",
                 f"disk size: {size_text(d['actual-size'])}"]
        if "cluster-size" in d:
            lines.append(f"cluster_size: {d['cluster-size']}")
        if "backing-filename" in d:
            name, full = d["backing-filename"], d["full-backing-filename"]
            lines.append(f"backing file: {name}" + (f" (actual path: {full})" if full != name else ""))
        if "backing-filename-format" in d:
            lines.append(f"backing file format: {d['backing-filename-format']}")
        if d.get("snapshots"):
            lines.append("Snapshot list:")
            lines.append(snapshot_text(d["snapshots"]).rstrip("\n"))
        spec = d.get("format-specific")
        if spec:
            lines.append("Format specific information:")
            for k, v in spec["data"].items():
                _human(lines, k.replace("-", " "), v, 1)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _human(lines: list[str], key: str, value: Any, depth: int) -> None:
    """One value as qemu-img's human output nests it (lists as [i]:, four spaces a level)."""
    pad = "    " * depth
    if isinstance(value, dict):
        lines.append(f"{pad}{key}:")
        for k, v in value.items():
            _human(lines, k.replace("-", " "), v, depth + 1)
    elif isinstance(value, list):
        lines.append(f"{pad}{key}:")
        for i, v in enumerate(value):
            _human(lines, f"[{i}]", v, depth + 1)
    else:
        lines.append(f"{pad}{key}: {str(value).lower() if isinstance(value, bool) else value}")
