"""``engine.img`` and ``cowchain img`` without a second tool: README's example, typing,
argument errors, QEMU's measure arithmetic, and refused operations that leave files as they
were.  (The differential suite against qemu-img is ``test_img_diff.py``.)"""

from __future__ import annotations

import hashlib
import pathlib
import re
import subprocess
import sys

import pytest

import engine
from engine import img
from engine.errors import EngineError, InvalidArgument, NotFound, UnsupportedFeature
from qemu import qemu_img, qemu_io

import test_readme

HERE = pathlib.Path(__file__).resolve().parent
PKG = pathlib.Path(engine.__file__).resolve().parent
SECTION = "## `cowchain img`"


def _readme_example() -> tuple[str, str]:
    text = test_readme.README.read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", 10)]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, re.S)
    (lang, code), (_, printed) = blocks[0], blocks[1]
    assert lang == "sh"
    return code, printed


def test_readme_img_example(tmp_path):
    code, printed = _readme_example()
    script = test_readme._script_with_exit_checks(code)
    res = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=test_readme._env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=300)
    assert "README-EXIT" not in res.stdout, res.stdout
    block = test_readme.Block("sh", code, 0, SECTION)
    block.output = printed
    test_readme._compare(block, res.stdout, str(tmp_path))


@pytest.mark.parametrize("text,value", [("4096", 4096), ("64k", 65536), ("1.5M", 3 << 19),
                                        ("2G", 2 << 30), ("10GiB", 10 << 30), (512, 512)])
def test_parse_size(text, value):
    from engine.img._open import parse_size
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "x", "1.3", "-5", "5Q"])
def test_parse_size_refuses(text):
    from engine.img._open import parse_size
    with pytest.raises(InvalidArgument):
        parse_size(text)


@pytest.mark.parametrize("opts", ["bogus=1", "compat=2.0", "lazy_refcounts=maybe",
                                  "preallocation=sometimes", "cluster_size=abc"])
def test_parse_options_refuses_what_qemu_img_refuses(opts):
    with pytest.raises(InvalidArgument):
        img.parse_options(opts)


def test_parse_options_types():
    o = img.parse_options(["cluster_size=4k,compat=v2", "lazy_refcounts", "refcount_bits=8"])
    assert o == {"cluster_size": 4096, "compat": "0.10", "lazy_refcounts": True,
                 "refcount_bits": 8}


def test_measure_matches_qemus_published_arithmetic():
    # qemu-img 7.2: measure --size 10G -O qcow2 -> required 1900544, fully-allocated
    # 10739318784 (1 441 792 bytes of header/L1/L2 + 458 752 of refcounts + 10 GiB)
    assert img.measure(size=10 << 30, out_format="qcow2") == {
        "required": 1900544, "fully-allocated": 10739318784}
    with pytest.raises(InvalidArgument):
        img.measure(out_format="qcow2")


def _digest(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("action", ["amend-refcount", "amend-narrow-shared", "amend-downgrade", "apply-missing",
                                    "delete-missing", "snapshot-rc1", "resize-shrink",
                                    "commit-no-backing", "convert-c-raw"])
def test_refused_operations_leave_the_file_as_it_was(tmp_path, monkeypatch, action):
    monkeypatch.chdir(tmp_path)
    opts = "refcount_bits=1" if action == "snapshot-rc1" else "refcount_bits=16"
    qemu_img("create", "-f", "qcow2", "-o", opts, "a.qcow2", "4M")
    qemu_io("a.qcow2", "write -P 5 0 64k", "write -z 1M 64k")
    if action == "amend-narrow-shared":
        qemu_img("snapshot", "-c", "s", "a.qcow2")
    before = _digest("a.qcow2")
    calls = {
        "amend-refcount": lambda: img.amend("a.qcow2", {"refcount_bits": 3}),
        "amend-downgrade": lambda: img.amend("a.qcow2", {"compat": "0.10"}),
        "amend-narrow-shared": lambda: img.amend("a.qcow2", {"refcount_bits": 1}),
        "apply-missing": lambda: img.snapshot_apply("a.qcow2", "nope"),
        "delete-missing": lambda: img.snapshot_delete("a.qcow2", "nope"),
        "snapshot-rc1": lambda: img.snapshot_create("a.qcow2", "s"),
        "resize-shrink": lambda: img.resize("a.qcow2", "-4M", shrink=True),
        "commit-no-backing": lambda: img.commit("a.qcow2"),
        "convert-c-raw": lambda: img.convert("a.qcow2", "b.raw", out_format="raw",
                                             compress=True),
    }
    with pytest.raises(EngineError) as info:
        calls[action]()
    assert isinstance(info.value, (InvalidArgument, UnsupportedFeature, NotFound))
    assert _digest("a.qcow2") == before
    assert not pathlib.Path("b.raw").exists()


def test_snapshot_ids_and_table_as_qemu_keeps_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-f", "qcow2", "a.qcow2", "4M")
    qemu_io("a.qcow2", "write -P 5 0 128k")
    qemu_img("snapshot", "-c", "q1", "a.qcow2")
    made = img.snapshot_create("a.qcow2", "c2")
    assert (made["id"], made["name"], made["vm-state-size"], made["icount"]) == ("2", "c2", 0, 0)
    assert made["date-nsec"] % 1000 == 0
    with engine.open("a.qcow2", readonly=True) as im:
        l1 = im.extents()
        assert l1[0].data
    # every cluster the snapshots share: refcount 3 (active + 2 snapshots), no COPIED flag
    res = qemu_img("check", "--output=json", "a.qcow2")
    assert b'"check-errors": 0' in res.stdout
    img.snapshot_delete("a.qcow2", "q1")
    img.snapshot_delete("a.qcow2", "2")
    assert img.snapshot_list("a.qcow2") == []
    assert qemu_img("check", "a.qcow2", check=False).returncode == 0


SWITCHED = ["img.meta.dirty", "img.meta.written", "img.meta.published", "img.meta.synced"]
IN_PLACE = ["img.meta.dirty", "img.meta.synced"]      # changes without a header switch
KILLS = ([(["snapshot", "-c", "new"], p) for p in SWITCHED]
         + [(["snapshot", "-d", "old"], p) for p in SWITCHED]
         + [(["snapshot", "-a", "old"], p) for p in IN_PLACE]
         + [(["convert", "-c", "-O", "qcow2", "a.qcow2", "packed.qcow2"], p) for p in IN_PLACE])


@pytest.mark.parametrize("verb,point", KILLS, ids=lambda v: v if isinstance(v, str) else v[1])
def test_kill_during_a_metadata_change(tmp_path, monkeypatch, point, verb):
    """SIGKILL at each step of a MetaWriter change: the image is the old one or, once
    repaired the way QEMU repairs a dirty image on its read-write open, the new one;
    qemu-img check is clean either way and the disk reads the same."""
    import os

    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-f", "qcow2", "a.qcow2", "4M")
    qemu_io("a.qcow2", "write -P 5 0 192k", "write -z 1M 64k")
    qemu_img("snapshot", "-c", "old", "a.qcow2")
    qemu_io("a.qcow2", "write -P 6 64k 64k")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", "a.qcow2", "now.raw")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", "-l", "old", "a.qcow2", "old.raw")
    args = verb if verb[0] == "convert" else [*verb, "a.qcow2"]
    env = dict(os.environ, COWCHAIN_KILL_AT=f"{point}:1")
    res = subprocess.run([sys.executable, "-m", "engine.cli", "img", *args], env=env,
                         capture_output=True, timeout=120)
    assert res.returncode == -9, res.stderr
    engine.open("a.qcow2").close()          # a read-write open repairs a dirty image
    assert qemu_img("check", "a.qcow2", check=False).returncode == 0
    names = [s["name"] for s in img.snapshot_list("a.qcow2")]
    want = "old.raw" if verb[:2] == ["snapshot", "-a"] and "old" in names else "now.raw"
    done = qemu_img("compare", "-f", "qcow2", "-F", "raw", "a.qcow2", want, check=False)
    other = qemu_img("compare", "-f", "qcow2", "-F", "raw", "a.qcow2", "now.raw", check=False)
    assert done.returncode == 0 or other.returncode == 0
    assert "old" in names or verb[:2] == ["snapshot", "-d"]
    assert not os.path.exists("packed.qcow2")


def test_header_changes_go_through_the_public_rewrite(tmp_path):
    """Image.rewrite_header is the one way to change header fields: what the header cannot
    hold raises before a byte is written; a raw image has no header to change."""
    import engine
    from engine.errors import EngineError, UnsupportedFeature
    path = str(tmp_path / "a.qcow2")
    img = engine.create(path, 1 << 20)
    before = open(path, "rb").read()
    with pytest.raises(EngineError):
        img.rewrite_header(lambda h: setattr(h, "backing_file", "x" * 5000))
    assert open(path, "rb").read() == before
    img.rewrite_header(lambda h: setattr(h, "compatible_features", 1))
    assert img.header.lazy_refcounts
    img.close()
    raw = engine.create(str(tmp_path / "r.raw"), 1 << 20, format="raw")
    with pytest.raises(UnsupportedFeature):
        raw.rewrite_header(lambda h: None)
    raw.close()
