"""``info``: the fields and names of ``qemu-img info --output=json`` (QEMU 7.2)."""

from __future__ import annotations

from typing import Any

from engine.img._open import backing_display_name, chain_names, open_image, size_text
from engine.img.snapshot import snapshot_text


def info(path: str, *, format: str | None = None, backing_chain: bool = False,
         force_share: bool = False) -> Any:
    """``qemu-img info --output=json [--backing-chain] [-f FMT] [-U] PATH``.

    Returns one dict (:meth:`engine.Image.info`'s fields, with ``filename`` and
    ``full-backing-filename`` spelled as qemu-img spells them: relative to the name given),
    or with ``backing_chain`` a list of them, top image first.

    Raises:
        what :func:`engine.open` raises (ImageNotFound, ImageFormatError, ImageLocked, ...).
    """
    with open_image(path, format=format, force_share=force_share,
                    backing=bool(backing_chain)) as img:
        images = img.chain() if backing_chain else [img]
        names = chain_names(img, path) if backing_chain else [path]
        out = []
        for one, name in zip(images, names):
            d: dict[str, Any] = one.info()
            d["filename"] = name
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
                shown = str(v).lower() if isinstance(v, bool) else v
                lines.append(f"    {k.replace('-', ' ')}: {shown}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
