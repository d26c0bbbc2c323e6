"""``snapshot -l``: internal snapshots as ``qemu-img snapshot -l`` lists them.

Creating, applying and deleting internal snapshots (``-c``/``-a``/``-d``) change refcounts
across the whole tree; they are refused (UnsupportedFeature) until the engine has them.
"""

from __future__ import annotations

import time
from typing import Any

from engine.errors import UnsupportedFeature
from engine.img._open import open_image, size_text


def snapshot_list(path: str, *, format: str | None = None,
                  force_share: bool = False) -> list[dict[str, Any]]:
    """The image's internal snapshots: qemu-img info's ``snapshots`` objects."""
    with open_image(path, format=format, force_share=force_share, backing=False) as img:
        snaps: list[dict[str, Any]] = img.snapshots()
        return snaps


def snapshot_change(path: str, action: str, name: str) -> None:
    """``snapshot -c|-a|-d NAME``: refused for now (see the module docstring)."""
    raise UnsupportedFeature(f"snapshot -{action}", "creating, applying and deleting internal "
                             "snapshots is not supported yet", path=path,
                             hint="use 'qemu-img snapshot' for this step")


def snapshot_text(snaps: list[dict[str, Any]]) -> str:
    """The table ``qemu-img snapshot -l`` and ``info`` print (dates in local time)."""
    lines = [f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        secs = s["vm-clock-sec"]
        clock = (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
                 f"{s['vm-clock-nsec'] // 1000000:03d}")
        icount = str(s["icount"]) if "icount" in s else ""
        lines.append(f"{s['id']:<9} {s['name']:<16} {size_text(s['vm-state-size']):>8}"
                     f"{date:>20}{clock:>13}{icount:>11}")
    return "\n".join(lines) + "\n"
