"""Golden images: QCOW2 files QEMU made once, checked against the facts QEMU reported then.

``tests/golden/`` holds small images made by ``tests/golden/make_golden.py`` with QEMU 7.2's
qemu-img and qemu-io, and per QCOW2 file a JSON file of what QEMU said about it: ``qemu-img
check``, ``info`` and ``map`` output and the sha256 of the virtual disk (and of a few short
reads) as ``qemu-img convert`` read it.  These tests run no QEMU tool: they open each image
with ``engine.open`` and compare, with the comparison rules of ``test_interop.py``:

- reads: the whole disk and every sample hash as stored;
- ``check()``: clean, and the qemu-img check counts it reports equal the stored ones;
- ``extents()``: the stored map, after the same merge of adjacent runs (``qemu.normalize_map``);
- ``info()``: the stored info on every shared key, no key only QEMU printed (``compare_info``);
- a read-write open of a copy, a few small writes, close: the image checks clean, reads the
  written bytes over the old content, and its backing files are unchanged.

A self-test flips one byte of stored data in a copy and requires the read comparison to
report it, so the comparison cannot pass vacuously.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pathlib

import pytest

import qemu  # for normalize_map only: no QEMU tool runs in this file
from test_interop import compare_info, first_difference

import engine

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"
FACT_FILES = sorted(GOLDEN.glob("*.json"))

#: The qemu-img check fields cowchain reports (the fields test_interop compares).
CHECK_KEYS = ("corruptions", "leaks", "check-errors", "allocated-clusters", "total-clusters",
              "image-end-offset", "fragmented-clusters", "compressed-clusters")

#: info() fields the golden files leave out: they depend on the path or on the host file system.
INFO_HOST_KEYS = ("actual-size",)


def sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def load(fact_file: pathlib.Path) -> dict:
    with open(fact_file) as f:
        return json.load(f)


def stored_bytes(entry: dict) -> bytes:
    """The bytes of one file of a golden chain, uncompressed."""
    path = GOLDEN / entry["stored_as"]
    if entry["stored_as"].endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def unpack(facts: dict, folder: pathlib.Path) -> pathlib.Path:
    """Copy the image and its backing files into FOLDER (uncompressed, under the names the
    chain records) and return the path of the image."""
    for entry in facts["files"]:
        data = stored_bytes(entry)
        assert sha256(data) == entry["sha256"], f"golden file {entry['stored_as']} was changed"
        (folder / entry["file"]).write_bytes(data)
    return folder / facts["image"]


def read_problems(img, facts: dict) -> list[str]:
    """Where IMG's reads differ from the stored hashes (empty when they all match)."""
    problems = []
    if img.size != facts["virtual_size"]:
        return [f"virtual size {img.size} != {facts['virtual_size']}"]
    disk = img.read(0, img.size)
    if sha256(disk) != facts["sha256"]:
        problems.append("sha256 of the whole disk differs")
    for off, length, digest in facts["samples"]:
        if sha256(img.read(off, length)) != digest:
            problems.append(f"sha256 of read({off}, {length}) differs")
        if sha256(disk[off:off + length]) != digest:
            problems.append(f"sha256 of bytes {off}+{length} of the whole-disk read differs")
    return problems


def qemu_style_info(stored: dict, path: pathlib.Path) -> dict:
    """The stored info with the path fields qemu-img would print for PATH put back."""
    theirs = dict(stored)
    theirs["filename"] = str(path)
    if "backing-filename" in theirs:
        theirs["full-backing-filename"] = os.path.join(os.path.dirname(str(path)),
                                                       theirs["backing-filename"])
    return theirs


@pytest.fixture(params=FACT_FILES, ids=[p.stem for p in FACT_FILES])
def golden(request, tmp_path):
    """(facts, path of an unpacked copy of the image and its chain)."""
    facts = load(request.param)
    return facts, unpack(facts, tmp_path)


def test_golden_set_is_complete():
    """The folder holds what make_golden.py makes, and every stored file is described."""
    names = {p.stem for p in FACT_FILES}
    assert len(names) >= 13, names
    described = {e["stored_as"] for p in FACT_FILES for e in load(p)["files"]}
    stored = {p.name for p in GOLDEN.iterdir() if p.suffix in (".qcow2", ".raw", ".gz")}
    assert stored == described
    for p in FACT_FILES:
        facts = load(p)
        assert facts["qemu_img_version"].startswith("qemu-img version 7.2"), p.name
        # QEMU found every golden image clean when it made it.
        assert facts["check"]["check-errors"] == 0
        assert not facts["check"].get("corruptions") and not facts["check"].get("leaks")
    total = sum(p.stat().st_size for p in GOLDEN.iterdir())
    assert total < 3 << 20, f"tests/golden has grown to {total} bytes"


def test_golden_reads(golden):
    facts, path = golden
    with engine.open(str(path), readonly=True) as img:
        problems = read_problems(img, facts)
    assert not problems, f"{facts['image']}: {problems}"


def test_golden_check(golden):
    facts, path = golden
    with engine.open(str(path), readonly=True) as img:
        res = img.check()
    ours = res.to_dict()
    assert res.exit_code == 0 and not res.findings, f"{facts['image']}: {ours} {res.findings}"
    theirs = facts["check"]
    for k in CHECK_KEYS:
        assert ours.get(k, 0) == theirs.get(k, 0), f"check field {k}: {ours} vs {theirs}"
    assert ours["format"] == theirs["format"]


def test_golden_extents(golden):
    facts, path = golden
    with engine.open(str(path), readonly=True) as img:
        ours = qemu.normalize_map(img.extents())
    theirs = qemu.normalize_map(facts["map"])
    assert ours == theirs, f"{facts['image']}: extents() differ from the stored qemu-img map"


def test_golden_info(golden):
    facts, path = golden
    with engine.open(str(path), readonly=True) as img:
        ours = img.info()
    for k in INFO_HOST_KEYS:
        ours.pop(k, None)
    compare_info(ours, qemu_style_info(facts["info"], path), facts["image"])
    json.dumps(ours)


def _probe_offsets(facts: dict) -> list[int]:
    """Where the read-write test writes: both ends, the middle, and the start of the first
    compressed run, zero run and data run of the stored map (when there is one)."""
    size = facts["virtual_size"]
    offs = {0, size // 2 + 3, size - 5}
    runs = facts["map"]
    for pick in (lambda e: e["data"] and "offset" not in e and e["depth"] == 0,  # compressed
                 lambda e: e["zero"] and e["present"],
                 lambda e: e["data"] and e["depth"] > 0):
        e = next((e for e in runs if pick(e)), None)
        if e is not None:
            offs.add(min(e["start"] + 1, size - 5))
    return sorted(offs)


def test_golden_write_then_check(golden):
    """A read-write open of a copy, a few 5-byte writes, close: engine check() finds the image
    clean, it reads the old content with the new bytes on top, and its backing files are
    byte for byte as they were (extended L2 images too, written subcluster by subcluster)."""
    facts, path = golden
    with engine.open(str(path)) as img:
        expected = bytearray(img.read(0, img.size))
        assert sha256(expected) == facts["sha256"]
        for i, off in enumerate(_probe_offsets(facts)):
            data = bytes([0xA5, i, 0x5A, i, 0xFF])
            img.write(off, data)
            expected[off:off + 5] = data
    with engine.open(str(path), readonly=True) as img:
        got = img.read(0, img.size)
        res = img.check()
        assert img.info()["dirty-flag"] is False
    if got != bytes(expected):
        pytest.fail(f"{facts['image']} after writes: {first_difference(got, bytes(expected))}")
    assert res.exit_code == 0 and not res.findings, f"{res.to_dict()} {res.findings}"
    for entry in facts["files"][1:]:
        assert sha256((path.parent / entry["file"]).read_bytes()) == entry["sha256"], \
            f"backing file {entry['file']} changed"


# --- self-test of the comparison ---------------------------------------------------------------

def _raw_data_run(facts: dict) -> dict | None:
    """A run of the stored map whose data sits uncompressed in the image file itself."""
    return next((e for e in facts["map"] if e["data"] and e["depth"] == 0 and "offset" in e),
                None)


@pytest.mark.parametrize("fact_file", FACT_FILES, ids=[p.stem for p in FACT_FILES])
def test_golden_detects_flipped_byte(tmp_path, fact_file):
    """Flip one byte of stored guest data in a copy: read_problems must report it."""
    facts = load(fact_file)
    run = _raw_data_run(facts)
    assert run is not None, f"{facts['image']} has no uncompressed data run at depth 0"
    path = unpack(facts, tmp_path)
    guest = run["start"] + run["length"] // 2
    host = run["offset"] + run["length"] // 2
    with open(path, "r+b") as f:
        f.seek(host)
        old = f.read(1)
        f.seek(host)
        f.write(bytes([old[0] ^ 0x01]))
    with engine.open(str(path), readonly=True) as img:
        assert img.read(guest, 1) == bytes([old[0] ^ 0x01]), "the flip missed the guest byte"
        problems = read_problems(img, facts)
    assert "sha256 of the whole disk differs" in problems, problems
