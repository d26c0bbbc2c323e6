"""The fuzz targets of docs/reliability.md C6 as plain functions of one ``bytes`` argument.

Each target either returns normally or raises. Raising an :class:`engine.EngineError` is the
typed outcome the contract allows, so the targets catch it themselves; anything else that
escapes (an untyped exception, an assertion of a target's oracle) is a finding, and so is a
signal (SIGBUS/SIGSEGV), a hang or unbounded memory, which the runner catches (libFuzzer's
-timeout/-rss_limit_mb, or the limits of tests/test_fuzz_replay.py).

The functions need no atheris: the atheris wrappers (fuzz/fuzz_*.py) and the pytest replay
(tests/test_fuzz_replay.py) call the same code. Parameters beyond the image bytes (read
offsets, write ops) are drawn from a ``random.Random`` seeded with the CRC of the input, so
every input replays exactly.

| name           | C6 | input                 | must hold                                          |
|----------------|----|-----------------------|----------------------------------------------------|
| header         | Z1 | the whole file        | parse_header and an RO open (no backing): a valid   |
|                |    |                       | handle or a typed error; info(), snapshots()        |
| read           | Z2 | a (mutated) image     | up to 2048 reads (<= 16 MiB) return exactly the     |
|                |    |                       | requested length or raise typed; extents() too      |
| check          | Z3 | a (mutated) image     | check() never fails untyped; repair('all') on a     |
|                |    |                       | copy ends with a clean re-check or a typed error    |
| write          | Z4 | a (mutated) image     | writes/zeroes/discards on a copy: typed errors      |
|                |    |                       | only; on an image that checked clean, the result   |
|                |    |                       | checks clean and reads back what was written        |
| ext            | Z5 | extension area and    | parse_header/parse_snapshot_table: typed errors     |
|                |    | snapshot table bytes  |                                                     |
| backing        | Z6 | a backing file name   | only plain names inside the overlay's folder open; |
|                |    |                       | no file outside that folder is opened              |
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import tempfile
import zlib

import engine
from engine import format as fmt
from engine.errors import EngineError

MAX_READ_TOTAL = 16 << 20
MAX_READS = 2048


class Finding(AssertionError):
    """A target's oracle failed (not an exception the engine raised)."""


def _rng(data: bytes) -> random.Random:
    return random.Random(zlib.crc32(data) ^ len(data))


class _TmpImage:
    """The input written to a private temporary folder (RAM-backed when /dev/shm exists)."""

    def __init__(self, data: bytes, name: str = "img.qcow2"):
        root = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.dir = tempfile.mkdtemp(prefix="cowchain-fuzz-", dir=root)
        self.path = os.path.join(self.dir, name)
        with open(self.path, "wb") as f:
            f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.dir, ignore_errors=True)


# --- Z1 -------------------------------------------------------------------------------------

def header(data: bytes) -> None:
    try:
        fmt.parse_header(data[:2 << 20], len(data))
    except EngineError:
        pass
    with _TmpImage(data) as t:
        try:
            with engine.open(t.path, format="qcow2", readonly=True, backing=False) as img:
                img.info()
                img.snapshots()
        except EngineError:
            pass


# --- Z2 -------------------------------------------------------------------------------------

def read(data: bytes) -> None:
    r = _rng(data)
    with _TmpImage(data) as t:
        try:
            img = engine.open(t.path, format="qcow2", readonly=True, backing=False)
        except EngineError:
            return
        with img:
            size = img.size
            total = 0
            for _ in range(r.randint(1, MAX_READS)):
                if size == 0 or total >= MAX_READ_TOTAL:
                    break
                off = r.randrange(size) if r.random() < 0.7 else r.randrange(0, size, 512)
                ln = min(size - off, r.choice([1, 512, 4096, 65536, r.randint(1, 1 << 20)]))
                total += ln
                try:
                    got = img.read(off, ln)
                except EngineError:
                    continue
                if len(got) != ln:
                    raise Finding(f"read({off}, {ln}) returned {len(got)} bytes")
            try:
                img.extents(0, min(size, 1 << 30))
            except EngineError:
                pass


# --- Z3 -------------------------------------------------------------------------------------

def check(data: bytes) -> None:
    from engine.check import check_file
    with _TmpImage(data) as t:
        fd = os.open(t.path, os.O_RDONLY)
        try:
            check_file(fd, filename=t.path)
        except EngineError:
            return
        finally:
            os.close(fd)
        fd = os.open(t.path, os.O_RDWR)
        try:
            try:
                res = check_file(fd, filename=t.path, repair="all")
            except EngineError:
                return
            try:
                again = check_file(fd, filename=t.path)
            except EngineError as e:
                raise Finding(f"the check after repair('all') failed: {type(e).__name__}: {e}")
            if res.corruptions == 0 and res.check_errors == 0 and (again.corruptions or
                                                                   again.check_errors):
                raise Finding(f"repair('all') said clean but a re-check finds "
                              f"{again.to_dict()} {again.findings[:5]}")
        finally:
            os.close(fd)


# --- Z4 -------------------------------------------------------------------------------------

def write(data: bytes) -> None:
    from engine.check import check_file
    r = _rng(data)
    with _TmpImage(data) as t:
        fd = os.open(t.path, os.O_RDONLY)
        try:
            before = check_file(fd, filename=t.path)
            clean = before.corruptions == 0 and before.check_errors == 0
        except EngineError:
            clean = False
        finally:
            os.close(fd)
        try:
            img = engine.open(t.path, format="qcow2", backing=False)
        except EngineError:
            return
        written = {}
        failed = False
        try:
            size = img.size
            if size == 0:
                return
            for _ in range(r.randint(1, 12)):
                off = r.randrange(0, size, 512)
                ln = min(size - off, r.choice([512, 4096, 65536, r.randint(1, 64) * 512]))
                k = r.random()
                try:
                    if k < 0.6:
                        buf = r.randbytes(ln)
                        img.write(off, buf)
                        _note(written, off, buf)
                    elif k < 0.8:
                        img.write_zeroes(off, ln, unmap=r.random() < 0.5)
                        _note(written, off, bytes(ln))
                    else:
                        img.discard(off, ln)
                        _forget(written, off, ln)
                except EngineError:
                    failed = True
                    break
            try:
                img.flush()
            except EngineError:
                failed = True
            if not failed and clean:
                for off, buf in written.items():
                    got = img.read(off, len(buf))
                    if got != buf:
                        raise Finding(f"a write at {off} (len {len(buf)}) on an image that "
                                      "checked clean does not read back")
        except EngineError:
            failed = True
        finally:
            try:
                img.close()
            except EngineError:
                failed = True
        if clean and not failed:
            fd = os.open(t.path, os.O_RDONLY)
            try:
                after = check_file(fd, filename=t.path)
            finally:
                os.close(fd)
            if after.corruptions or after.check_errors:
                raise Finding(f"writes to an image that checked clean left it corrupt: "
                              f"{after.to_dict()} {after.findings[:5]}")


def _note(written: dict, off: int, buf: bytes) -> None:
    # keep whole 512-byte sectors: sector -> bytes
    for i in range(0, len(buf), 512):
        written[off + i] = buf[i:i + 512]


def _forget(written: dict, off: int, ln: int) -> None:
    for k in [k for k in written if off <= k < off + ln]:
        del written[k]


# --- Z5 -------------------------------------------------------------------------------------

def _base_header(cluster_bits: int = 16) -> bytes:
    h, blob = fmt.new_image_layout(1 << 20, cluster_size=1 << cluster_bits)
    return blob


_BASE = None


def ext(data: bytes) -> None:
    """The first byte picks the area: even -> the header extension area (after byte 104 of
    a fresh v3 header), odd -> a snapshot table with nb_snapshots from the next byte."""
    global _BASE
    if _BASE is None:
        _BASE = _base_header()
    if not data:
        return
    if data[0] % 2 == 0:
        body = data[1:65536 - 112]
        blob = bytearray(_BASE[:65536])
        hl = struct.unpack_from(">I", blob, 100)[0]
        blob[hl:hl + len(body)] = body
        blob[hl + len(body):65536] = bytes(65536 - hl - len(body))
        try:
            fmt.parse_header(bytes(blob) + _BASE[65536:], len(_BASE))
        except EngineError:
            pass
    else:
        h = fmt.parse_header(_BASE, len(_BASE))
        h.nb_snapshots = data[1] if len(data) > 1 else 1
        h.snapshots_offset = 3 << 16
        try:
            fmt.snapshot_table_size(data[2:], h)
        except EngineError:
            pass
        try:
            fmt.parse_snapshot_table(data[2:], h, file_size=16 << 20)
        except EngineError:
            pass


# --- Z6 -------------------------------------------------------------------------------------

def backing(data: bytes) -> None:
    """The input is a backing file name (bytes; NUL allowed). An overlay with that name is
    written in a folder holding: base.qcow2 (a valid image), sub/inner.qcow2, link-in ->
    base.qcow2, link-out -> an image outside the folder, loop.qcow2 (backed by itself). The
    open must give a typed error or open only files inside the folder."""
    import engine.image.chain as image_mod
    name = data[:1023]
    root = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    top = tempfile.mkdtemp(prefix="cowchain-fuzzb-", dir=root)
    try:
        d = os.path.join(top, "repo")
        outside = os.path.join(top, "outside.qcow2")
        os.makedirs(os.path.join(d, "sub"))
        blob = _base_header(9)
        for p in (os.path.join(d, "base.qcow2"), os.path.join(d, "sub", "inner.qcow2"),
                  outside):
            with open(p, "wb") as f:
                f.write(blob)
        os.symlink(os.path.join(d, "base.qcow2"), os.path.join(d, "link-in"))
        os.symlink(outside, os.path.join(d, "link-out"))
        os.symlink("../outside.qcow2", os.path.join(d, "link-rel-out"))
        h = fmt.parse_header(blob, len(blob))
        try:
            bname = name.decode("utf-8")
        except UnicodeDecodeError:
            return
        h.backing_file = bname
        h.backing_format = "qcow2" if not data[:1] == b"\xff" else "raw"
        try:
            hdr = fmt.encode_header(h)
        except EngineError:
            return
        except (ValueError, struct.error):
            return    # a name the encoder refuses (format's concern, not the open's)
        ov = os.path.join(d, "overlay.qcow2")
        with open(ov, "wb") as f:
            f.write(hdr + blob[len(hdr):])
        opened = []
        real_open = image_mod._os_open

        def audit(path, flags):
            opened.append(os.path.realpath(path))
            return real_open(path, flags)

        image_mod._os_open = audit
        try:
            with engine.open(ov, readonly=True):
                pass
        except EngineError:
            pass
        finally:
            image_mod._os_open = real_open
        inside = os.path.realpath(d) + os.sep
        bad = [p for p in opened if not p.startswith(inside)]
        if bad:
            raise Finding(f"backing name {bname!r} made the open touch {bad}")
    finally:
        shutil.rmtree(top, ignore_errors=True)


TARGETS = {"header": header, "read": read, "check": check, "write": write, "ext": ext,
           "backing": backing}
