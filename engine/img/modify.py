"""The verbs that change an image: ``resize``, ``rebase``, ``commit``, ``amend``."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from engine import ops
from engine.errors import InvalidArgument, UnsupportedFeature, io_error
from engine.img._open import format_arg, open_image, parse_size
from engine.ops._copy import Meter, Progress, runs_total
from engine.ops.measure import layer_runs
from engine.img._meta import MetaWriter
from engine.qcow2.header import Header, l1_entries_for
from engine.qcow2.refblocks import decode_refblocks, reftable_offsets
from engine.qcow2.spec import COMPAT_LAZY_REFCOUNTS, L1E_SIZE, V3_HEADER_LENGTH


def resize(path: str, size: int | str, *, format: str | None = None,
           shrink: bool = False) -> int:
    """``qemu-img resize [-f FMT] [--shrink] PATH [+|-]SIZE``: change the virtual size.

    SIZE is absolute, or relative with a leading '+' or '-'.  Growing is
    :meth:`engine.Image.resize`.  Shrinking needs ``shrink`` (``--shrink``, as qemu-img) and
    is done only where it loses no data: the image itself must hold no data from the first
    cluster past the new end (zero clusters may be there); qcow2 images must have no
    internal snapshots.  Then the L1 entries past the new end are cleared, the header gets
    the new size (a :class:`~engine.img._meta.MetaWriter` change: the repair frees the L2
    tables no longer used); a raw file is truncated.  Returns the new size.

    Raises:
        InvalidArgument (a shrink without ``shrink``, a size that is not a multiple of 512),
        UnsupportedFeature (a shrink that would drop data or snapshots), and what
        :meth:`engine.Image.resize` raises.
    """
    with open_image(path, format=format, readonly=False, backing=False) as img:
        text = str(size)
        old: int = img.size
        new: int
        if text[:1] in ("+", "-"):
            delta = parse_size(text[1:])
            new = old + delta if text[0] == "+" else old - delta
        else:
            new = parse_size(size)
        if new < old and not shrink:
            raise InvalidArgument("Use the --shrink option to perform a shrink operation.",
                                  value=new, path=path)
        raw = img.header is None
        if new > old:
            img.resize(new)
        elif new < old:
            _shrink(img, new)
    if new < old and raw:
        # raw: the tail holds nothing (checked above); the lock is released by now, so the
        # file is opened and truncated by name, as qemu-img's raw driver does
        try:
            os.truncate(path, new)
        except OSError as e:
            raise io_error(e.errno or 0, "cannot shrink the image file", path=path) from None
    return new


def _shrink(img: Any, new: int) -> None:
    h = img.header
    cluster = h.cluster_size if h is not None else 512
    if new % 512:
        raise InvalidArgument(f"the new size must be a multiple of 512 bytes, not {new}",
                              value=new, path=img.path)
    tail = -(-new // cluster) * cluster
    held = [e for e in img.extents(tail, img.size - tail)
            if e.present and e.depth == 0 and e.data] if tail < img.size else []
    if held:
        raise UnsupportedFeature("shrinking over data", f"the image holds data at offset "
                                 f"{held[0].start}, past the new end {new}; cowchain shrinks "
                                 "only a tail that holds no data", path=img.path, hint="")
    if h is None:
        return
    if h.nb_snapshots:
        raise UnsupportedFeature("shrinking an image with internal snapshots", path=img.path,
                                 hint="")
    keep = l1_entries_for(new, h.cluster_bits, h.extended_l2)
    with MetaWriter(img) as w:
        def change(hdr: Header) -> None:
            hdr.size = new
        w.publish(change)
        # past the new end now: the L2 tables there (mapping nothing) become leaks
        if keep < h.l1_size:
            w.pwrite(h.l1_table_offset + keep * L1E_SIZE, bytes((h.l1_size - keep) * L1E_SIZE))


def rebase(path: str, backing: str | None, *, backing_format: str | None = None,
           format: str | None = None, unsafe: bool = False,
           allow_unsafe_backing: bool = False, progress: Progress | None = None) -> int:
    """``qemu-img rebase [-f FMT] [-u] -b BACKING -F FMT PATH`` (``backing`` None or "":
    no backing file).

    Safe mode (the default) first copies into PATH every block that reads differently
    through the new backing file than through the old chain, where PATH does not hold the
    range itself, so the disk reads the same afterwards; then the header changes.
    ``unsafe`` (``-u``) only rewrites the header.  Returns the bytes copied.

    Raises:
        InvalidArgument (a backing file without its format), and what
        :meth:`engine.Image.rebase` raises.
    """
    backing = backing or None
    backing_format = format_arg(backing_format, "backing format")
    if backing is not None and backing_format is None:
        raise InvalidArgument("backing format must be specified", path=path,
                              hint="add -F raw or -F qcow2")
    copied = 0
    with open_image(path, format=format, readonly=False, backing=not unsafe,
                    allow_unsafe_backing=allow_unsafe_backing) as img:
        if not unsafe:
            copied = _copy_differences(img, backing, backing_format, allow_unsafe_backing,
                                       progress)
        img.rebase(backing, backing_format, allow_unsafe_backing=allow_unsafe_backing)
    return copied


def _copy_differences(img: Any, backing: str | None, backing_format: str | None,
                      allow_unsafe: bool, progress: Progress | None) -> int:
    runs = [(e.start, e.length) for e in img.extents() if e.depth > 0 or not e.present]
    new = None
    if backing is not None:
        folder = os.path.dirname(img.path) or "."
        new = open_image(os.path.join(folder, backing), format=backing_format,
                         force_share=True, allow_unsafe_backing=allow_unsafe)
    block = img.cluster_size or 65536
    meter = Meter(sum(n for _, n in runs), progress)
    copied = 0
    try:
        for start, length in runs:
            pos, end = start, start + length
            while pos < end:
                n = min(ops.CHUNK, end - pos)
                old = img.read(pos, n)
                now = bytes(n) if new is None else _read_padded(new, pos, n)
                for off in range(0, n, block):
                    if old[off:off + block] != now[off:off + block]:
                        img.write(pos + off, old[off:off + block])
                        copied += min(block, n - off)
                pos += n
                meter.add(n)
        img.flush()
    finally:
        if new is not None:
            new.close()
    meter.finish()
    return copied


def _read_padded(img: Any, pos: int, n: int) -> bytes:
    """N bytes at POS, zeros past the end of a shorter backing disk."""
    have = max(0, min(n, img.size - pos))
    return (img.read(pos, have) if have else b"") + bytes(n - have)


def commit(path: str, *, format: str | None = None, base: str | None = None,
           drop: bool = False, allow_unsafe_backing: bool = False,
           progress: Progress | None = None) -> int:
    """``qemu-img commit [-f FMT] [-b BASE] [-d] PATH``: write what PATH holds into its
    backing file (:func:`engine.ops.commit`), then empty PATH (its clusters are discarded,
    so it reads through to the backing file) unless ``drop`` (``-d``) keeps them.

    With BASE (an image of PATH's backing chain, by file name), everything the layers above
    BASE hold is written into BASE, and, as in qemu-img, ``-b`` implies ``-d``: the images
    between are left as they are (they no longer read right on their own).  Returns the
    bytes committed.
    """
    with open_image(path, format=format, readonly=True, force_share=True,
                    allow_unsafe_backing=allow_unsafe_backing) as probe:
        chain = probe.chain()
        if len(chain) < 2:
            raise InvalidArgument("Image does not have a backing file", path=path)
        depth = 1
        if base is not None:
            real = os.path.realpath(base)
            found = [i for i, im in enumerate(chain) if os.path.realpath(im.path) == real]
            if not found or found[0] == 0:
                raise InvalidArgument(f"'{base}' is not in the backing chain of '{path}'",
                                      value=base, path=path)
            depth, drop = found[0], True
        base_path, base_fmt = chain[depth].path, chain[depth].format
        if depth > 1:
            with open_image(base_path, format=base_fmt, readonly=False, backing=False) as low:
                if low.size < probe.size:
                    low.resize(probe.size)
                runs = layer_runs(probe, depth - 1, min_depth=0)
                meter = Meter(runs_total(runs), progress)
                ops.copy_runs(probe, low, runs, meter)
                low.flush()
                meter.finish()
                return meter.total
    with open_image(path, format=format, readonly=drop, backing=False) as top, \
            open_image(base_path, format=base_fmt, readonly=False, backing=False) as low:
        done = ops.commit(top, low, progress=progress)
        if not drop and top.size:
            top.discard(0, top.size)
            top.flush()
    return done


def amend(path: str, options: dict[str, Any], *, format: str | None = None) -> None:
    """``qemu-img amend -o OPTIONS [-f FMT] PATH``: ``compat`` 0.10 -> 1.1, ``compat`` 1.1 ->
    0.10 when nothing needs v3 (no zero clusters, snapshots, extended L2, lazy refcounts,
    zstd, refcount width other than 16), ``lazy_refcounts`` on/off (v3), ``refcount_bits``
    (v3): wider always, narrower when every stored refcount fits (as qemu-img: internal
    snapshots and compressed clusters share clusters; a refcount too large for the new width
    is refused with qemu-img's message, naming the first such cluster).  A new width is a
    :class:`~engine.img._meta.MetaWriter` change: the refcount table is cleared and the
    header gets the new order, so the repair lays out new refcount structures.  Options
    qemu-img cannot amend (cluster_size, extended_l2, compression_type, preallocation,
    size) are refused as qemu-img refuses them."""
    allowed = {"compat", "lazy_refcounts", "refcount_bits", "backing_file", "backing_fmt"}
    for name in options:
        if name not in allowed:
            raise InvalidArgument(f"Changing the {name} option is not supported", value=name,
                                  path=path)
    with open_image(path, format=format, readonly=False, backing=False) as img:
        if img.header is None:
            raise UnsupportedFeature("amend of raw images", "raw images have no options to "
                                     "amend", path=path)
        h = img.header
        bits = int(options.get("refcount_bits", h.refcount_bits))
        if "backing_file" in options or "backing_fmt" in options:
            raise UnsupportedFeature("backing change by amend", path=path,
                                     hint="use 'rebase -u' instead")
        compat = options.get("compat", h.compat)
        lazy = bool(options.get("lazy_refcounts", h.lazy_refcounts))
        if compat == "0.10":
            _check_downgrade(img, h, lazy)
        if bits != h.refcount_bits:
            _check_width(img, h, bits, compat)
        img.rewrite_header(lambda new: _amend_header(new, compat, lazy))
        if bits != h.refcount_bits:
            _change_width(img, bits)


def _check_width(img: Any, h: Header, bits: int, compat: str) -> None:
    if bits not in (1, 2, 4, 8, 16, 32, 64):
        raise InvalidArgument("Refcount width must be a power of two and may not exceed 64 "
                              "bits", value=bits, path=img.path)
    if compat != "1.1":
        raise InvalidArgument("Different refcount widths than 16 bits require compatibility "
                              "level 1.1 or above (use compat=1.1 or greater)", value=bits,
                              path=img.path)
    if bits < h.refcount_bits:
        found = _first_refcount_over(img, (1 << bits) - 1)
        if found is not None:
            raise InvalidArgument(f"Cannot decrease refcount entry width to {bits} bits: "
                                  f"Cluster at offset {found[0]:#x} has a refcount of "
                                  f"{found[1]}", value=bits, path=img.path,
                                  hint="choose a width that holds every refcount")


def _first_refcount_over(img: Any, limit: int) -> tuple[int, int] | None:
    """(host offset, refcount) of the first cluster, in file order, whose stored refcount
    is over LIMIT (internal snapshots and compressed clusters share clusters), or None.
    The image was opened read-write, so its refcounts are consistent (a dirty image was
    repaired on open)."""
    h = img.header
    C = h.cluster_size
    per_block = C * 8 >> h.refcount_order
    fd = os.open(img.path, os.O_RDONLY)
    try:
        rt = np.frombuffer(os.pread(fd, h.refcount_table_clusters * C,
                                    h.refcount_table_offset), ">u8").astype(np.uint64)
        offsets, unreadable = reftable_offsets(rt, C)
        for i, off in enumerate(offsets.tolist()):
            if not off or unreadable[i]:
                continue
            raw = np.frombuffer(os.pread(fd, C, off), np.uint8)
            if len(raw) < C:
                continue
            vals = decode_refblocks(raw.reshape(1, C), h.refcount_order)[0]
            over = np.flatnonzero(vals > limit)
            if len(over):
                j = int(over[0])
                return (i * per_block + j) * C, int(vals[j])
    except OSError as e:
        raise io_error(e.errno or 0, "cannot read the refcounts", path=img.path) from None
    finally:
        os.close(fd)
    return None


def _change_width(img: Any, bits: int) -> None:
    h = img.header
    with MetaWriter(img) as w:
        w.pwrite(h.refcount_table_offset, bytes(h.refcount_table_clusters * h.cluster_size))

        def change(new: Header) -> None:
            new.refcount_order = bits.bit_length() - 1
        w.publish(change)


def _check_downgrade(img: Any, h: Header, lazy: bool) -> None:
    why = []
    if lazy:
        why.append("lazy refcounts")
    if h.extended_l2:
        why.append("extended L2 entries")
    if h.refcount_bits != 16:
        why.append(f"{h.refcount_bits}-bit refcounts")
    if h.compression_type:
        why.append("zstd compression")
    if h.nb_snapshots:
        why.append("internal snapshots")
    if h.has_bitmaps:
        why.append("persistent bitmaps")
    if any(e.depth == 0 and e.present and e.zero and not e.data for e in img.extents()):
        why.append("zero clusters")
    if why:
        raise UnsupportedFeature("compat=0.10 downgrade", "the image uses "
                                 + ", ".join(why) + ", which compat=0.10 cannot express",
                                 path=img.path)


def _amend_header(h: Header, compat: str, lazy: bool) -> None:
    if compat == "0.10":
        h.version = 2
        h.compatible_features = h.incompatible_features = h.autoclear_features = 0
        return
    if h.version == 2:
        h.version = 3
        h.header_length = V3_HEADER_LENGTH
    if lazy:
        h.compatible_features |= COMPAT_LAZY_REFCOUNTS
    else:
        h.compatible_features &= ~COMPAT_LAZY_REFCOUNTS
