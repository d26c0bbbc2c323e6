"""``check``: ``qemu-img check`` semantics, JSON and exit codes."""

from __future__ import annotations

from engine.check import CheckResult
from engine.errors import UnsupportedFeature
from engine.img._open import open_image

#: qemu-img check's exit code for a format that has no metadata to check (raw).
EXIT_NO_CHECK = 63
#: The ``feature`` of the UnsupportedFeature a raw image gets (the CLI exits 63 for it).
NO_CHECK = "check of raw images"


def check(path: str, *, format: str | None = None, repair: str | None = None,
          force_share: bool = False) -> CheckResult:
    """``qemu-img check [-f FMT] [-r leaks|all] [-U] PATH``.

    The image is opened without its backing chain (a check looks at one file), read-only
    unless ``repair`` is given.  The result's ``to_dict()`` is qemu-img's JSON, ``to_text()``
    its human output and ``exit_code`` its exit code (0 clean, 1 check errors, 2
    corruptions, 3 only leaks; with a repair, the state after it).

    Raises:
        UnsupportedFeature: a raw image (``feature`` is :data:`NO_CHECK`; qemu-img check
            exits :data:`EXIT_NO_CHECK`).
        what :func:`engine.open` raises.
    """
    with open_image(path, format=format, readonly=repair is None,
                    force_share=force_share, backing=False) as img:
        if img.format == "raw":
            raise UnsupportedFeature(NO_CHECK, "This image format does not support checks",
                                     path=path, hint="")
        res: CheckResult = img.check(repair)
        return res
