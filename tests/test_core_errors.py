"""Errors that come up from the core: which volume they name, and callback exceptions.

- An error met while reading (or copying up) through a backing chain names the volume where
  it happened (``path``, and the message), and the image the call was made on (``image``).
- An exception raised by a Python callback of the core (the decompressor) reaches the caller
  as it was raised: a zstd image read without the zstandard module is unsupported, not
  corrupt.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import engine
import poke
import qemu
from engine import _core
from engine import image as image_mod
from engine.errors import CorruptImage, UnsupportedFeature

C = 65536


def _chain_with_damaged_base(tmp_path):
    """base <- mid <- top (top's backing has a backing: reads use the owner map); base's L2
    entry for guest cluster 0 gets a reserved bit, which the core refuses as corruption."""
    base, mid, top = (str(tmp_path / n) for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    with engine.create(base, 4 << 20) as img:
        img.write(0, b"B" * 2 * C)
    with engine.create(mid, None, backing="base.qcow2", backing_format="qcow2") as img:
        img.write(4 * C, b"M" * C)
    engine.create(top, None, backing="mid.qcow2", backing_format="qcow2").close()
    at = poke.l2_entry_offset(base, 0)
    poke.write_be(base, at, 8, poke.read_be(base, at, 8) | 2)
    return base, mid, top


@pytest.mark.parametrize("how", ["readinto", "read", "readv", "extents", "copy-up",
                                 "mid-readinto"])
def test_error_names_the_damaged_volume(tmp_path, how):
    base, mid, top = _chain_with_damaged_base(tmp_path)
    asked = mid if how.startswith("mid-") else top
    with engine.open(asked) as img:
        with pytest.raises(CorruptImage) as ei:
            if how in ("readinto", "mid-readinto"):
                img.readinto(0, bytearray(4096))
            elif how == "read":
                img.read(0, 3 * C)
            elif how == "readv":
                img.readv(np.array([C, 0], dtype=np.uint64), 512)
            elif how == "extents":
                img.extents()
            else:
                img.write(100, b"x")            # a partial cluster: copy-up reads the base
        e = ei.value
        assert e.path == base and e.image == asked
        assert str(e).startswith(base + ":"), str(e)
        # the undamaged part of the chain still reads
        assert img.read(4 * C, 4) == (b"M" * 4 if asked == mid else b"MMMM")


def test_error_in_the_top_names_the_top(tmp_path):
    base, mid, top = _chain_with_damaged_base(tmp_path)
    with engine.open(base) as img:
        with pytest.raises(CorruptImage) as ei:
            img.readinto(0, bytearray(512))
    assert ei.value.path == base and ei.value.image == base


def test_cli_error_names_the_damaged_volume(tmp_path):
    """Through a repository and the command line: the message names the damaged base
    volume, not the leaf that was read."""
    from test_cli import js, run
    repo = tmp_path / "repo"
    js("repo", "init", repo)
    js("chain", "create", "vm", "4M", "--format", "qcow2", repo=repo)
    js("chain", "write", "vm", "--offset", "0", "--pattern", "0x41", "--length", "64K",
       repo=repo)
    js("chain", "snapshot", "vm", repo=repo)
    vols = js("chain", "info", "vm", repo=repo)["volumes"]
    base, leaf = vols[0]["path"], vols[-1]["path"]
    at = poke.l2_entry_offset(base, 0)
    poke.write_be(base, at, 8, poke.read_be(base, at, 8) | 2)
    code, out, err = run("chain", "read", "vm", "--offset", "0", "--length", "8", repo=repo)
    assert code == CorruptImage.exit_code, err
    assert base in err and leaf not in err, err


def _zstd_image(tmp_path) -> str:
    raw = tmp_path / "plain.raw"
    raw.write_bytes(bytes(range(256)) * 1024)
    path = str(tmp_path / "z.qcow2")
    qemu.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd",
                  str(raw), path)
    return path


def test_zstd_without_the_module_is_unsupported_not_corrupt(tmp_path):
    """A child process where ``import zstandard`` fails: the read raises the decompressor's
    UnsupportedFeature (type, feature and message intact), not CorruptImage."""
    path = _zstd_image(tmp_path)
    code = textwrap.dedent("""
        import sys
        sys.modules["zstandard"] = None         # import zstandard -> ImportError
        import engine
        from engine.errors import UnsupportedFeature
        with engine.open(sys.argv[1], readonly=True) as img:
            try:
                img.read(0, 4096)
            except UnsupportedFeature as e:
                print("UnsupportedFeature", e.feature, "|", e)
            except Exception as e:
                print("WRONG", type(e).__name__, e)
            else:
                print("WRONG: read succeeded")
    """)
    proc = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("UnsupportedFeature zstd |"), proc.stdout
    assert "'zstandard' module is not installed" in proc.stdout


def test_zstd_reads_in_a_default_install(tmp_path):
    """zstandard is a dependency of the package (the old ``zstd`` extra is kept as an
    alias), so a default install reads QEMU's zstd images."""
    requires = importlib.metadata.requires("cowchain") or []
    plain = [r for r in requires if r.split(";")[0].strip().startswith("zstandard")
             and "extra" not in r]
    assert plain, requires
    assert "zstd" in (importlib.metadata.metadata("cowchain").get_all("Provides-Extra") or [])
    with engine.open(_zstd_image(tmp_path), readonly=True) as img:
        assert img.read(0, 1024) == bytes(range(256)) * 4


class _Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [_Boom("kaboom"), MemoryError("no room"),
                                 CorruptImage("said by the callback", offset=7)],
                         ids=lambda e: type(e).__name__)
def test_callback_exception_reaches_the_caller_unchanged(tmp_path, exc):
    path = _zstd_image(tmp_path)

    def decompressor(ctype, data, cluster_size):
        raise exc

    with engine.open(path, readonly=True) as img:
        _core.set_decompressor(decompressor)
        try:
            for call in (lambda: img.readinto(0, bytearray(4096)),
                         lambda: img.readv([0, 4096], 16),
                         lambda: img.read(C, 10)):
                with pytest.raises(type(exc)) as ei:
                    call()
                assert ei.value is exc
        finally:
            _core.set_decompressor(image_mod._decompress)
        # nothing left pending: the next read, with the real decompressor, works
        assert img.read(0, 256) == bytes(range(256))


def test_damaged_compressed_cluster_is_corrupt_and_located(tmp_path):
    """The decompressor's own typed error for a cluster that does not inflate, told the
    volume and offset by the core (a library error never reaches the caller untyped)."""
    raw = tmp_path / "plain.raw"
    raw.write_bytes(bytes(range(256)) * 1024)
    path = str(tmp_path / "c.qcow2")
    qemu.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), path)
    entry = poke.l2_entry(path, 0)
    host = entry & ((1 << (70 - 16)) - 1)               # a compressed entry's host offset
    poke.write_bytes(path, host, b"\xff" * 64)         # not a deflate stream any more
    with engine.open(path, readonly=True) as img:
        with pytest.raises(CorruptImage) as ei:
            img.read(0, 512)
    e = ei.value
    assert e.path == path and e.image == path and e.offset == host
    assert str(e).startswith(path + ": compressed cluster does not decompress")
