"""The ``cowchain`` command line, run as a subprocess (``python -m engine.cli``, which is what
the console script calls): JSON output parsed, exit codes, one-line errors, the progress bar."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest

import engine
from engine import cli
from engine.errors import EX_USAGE
from qemu import assert_qemu_clean, convert_to_raw, qemu_img_json

pytestmark = pytest.mark.qemu

MiB = 1 << 20


def _env(repo=None, **extra):
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))
    env["PYTHONPATH"] = pkg_parent + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("COWCHAIN_REPO", None)
    env.pop("COWCHAIN_DEBUG", None)
    if repo is not None:
        env["COWCHAIN_REPO"] = str(repo)
    env.update(extra)
    return env


def run(*args, repo=None, input=None, stderr_tty=False, **extra):
    """Run cowchain ARGS; returns (exit code, stdout bytes, stderr text)."""
    argv = [sys.executable, "-m", "engine.cli", *map(str, args)]
    if not stderr_tty:
        p = subprocess.run(argv, env=_env(repo, **extra), capture_output=True, input=input,
                           timeout=120)
        return p.returncode, p.stdout, p.stderr.decode()
    master, slave = pty.openpty()
    p = subprocess.Popen(argv, env=_env(repo, **extra), stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        err += chunk
    out = p.stdout.read()
    p.wait(timeout=120)
    os.close(master)
    return p.returncode, out, err.decode(errors="replace")


def ok(*args, **kw):
    code, out, err = run(*args, **kw)
    assert code == 0, (args, code, err)
    return out


def js(*args, **kw):
    return json.loads(ok(*args, "--output", "json", **kw))


def fails(code, *args, **kw) -> str:
    got, out, err = run(*args, **kw)
    assert got == code, (args, got, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err            # one clear line, never a traceback
    assert lines[0].startswith("cowchain"), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def repo(tmp_path):
    path = tmp_path / "repo"
    assert js("repo", "init", path) == {"repository": str(path), "created": True}
    return path


VOLUME_KEYS = {"id", "chain", "path", "format", "role", "parent", "legality", "created"}
SNAPSHOT_KEYS = {"id", "chain", "created", "description", "volume"}
CHAIN_KEYS = {"name", "virtual-size", "cluster-size", "created", "leaf", "previewing", "origin",
              "volumes", "snapshots"}


def test_end_to_end(repo, tmp_path):
    c = js("chain", "create", "vm1", "64M", "--format", "qcow2", repo=repo)
    assert set(c) == CHAIN_KEYS
    assert c["virtual-size"] == 64 * MiB and c["cluster-size"] == 65536
    assert [set(v) for v in c["volumes"]] == [VOLUME_KEYS]
    assert c["volumes"][0]["role"] == "leaf"

    data = tmp_path / "data.bin"
    data.write_bytes(b"A" * MiB)
    assert js("chain", "write", "vm1", "--file", data, repo=repo) == {
        "chain": "vm1", "offset": 0, "length": MiB}
    s1 = js("chain", "snapshot", "vm1", "-d", "clean install", repo=repo)
    assert set(s1) == SNAPSHOT_KEYS and s1["description"] == "clean install"
    # Human output of snapshot is the bare id (for SNAP=$(cowchain chain snapshot vm1)).
    ok("chain", "write", "vm1", "--offset", "2M", "--pattern", "0x42", "--length", "64K",
       repo=repo)
    s2 = ok("chain", "snapshot", "vm1", repo=repo).decode().strip()
    assert len(s2) == 36
    ok("chain", "write", "vm1", "--offset", "4M", "--pattern", "67", "--length", "4K", repo=repo)

    snaps = js("chain", "snapshots", "vm1", repo=repo)
    assert [s["id"] for s in snaps] == [s1["id"], s2]
    info = js("chain", "info", "vm1", repo=repo)
    assert [v["role"] for v in info["volumes"]] == ["base", "internal", "leaf"]
    assert info["snapshots"] == snaps
    human = ok("chain", "info", "vm1", repo=repo).decode()
    assert "clean install" in human and "volumes (base first)" in human

    diff = js("chain", "diff", "vm1", s1["id"][:8], repo=repo)
    assert diff == [{"start": 2 * MiB, "length": 65536, "zero": False, "data": True},
                    {"start": 4 * MiB, "length": 65536, "zero": False, "data": True}]
    assert js("chain", "diff", "vm1", s1["id"], s2, repo=repo) == diff[:1]

    expected = bytearray(64 * MiB)
    expected[:MiB] = b"A" * MiB
    expected[2 * MiB:2 * MiB + 65536] = b"B" * 65536
    expected[4 * MiB:4 * MiB + 4096] = b"C" * 4096
    for fmt in ("raw", "qcow2"):
        out = tmp_path / f"vm1.{fmt}"
        r = js("chain", "export", "vm1", out, "--format", fmt, repo=repo)
        # Data is written in whole 64 KiB blocks: the 4 KiB of C fill one.
        assert r == {"path": str(out), "format": fmt, "virtual-size": 64 * MiB,
                     "snapshot": None, "data-bytes": MiB + 2 * 65536}
        assert convert_to_raw(out, fmt) == bytes(expected)
    r = js("chain", "import", "copy", tmp_path / "vm1.qcow2", "-f", "qcow2", "--format",
           "qcow2", repo=repo)
    assert r["name"] == "copy" and r["virtual-size"] == 64 * MiB and len(r["volumes"]) == 1
    js("chain", "export", "copy", tmp_path / "copy.raw", repo=repo)
    assert convert_to_raw(tmp_path / "copy.raw", "raw") == bytes(expected)
    assert js("chain", "resize", "copy", "96M", repo=repo)["virtual-size"] == 96 * MiB
    assert "shrink" in fails(4, "chain", "resize", "copy", "32M", repo=repo)
    ok("chain", "delete", "copy", repo=repo)
    fails(EX_USAGE, "chain", "import", "copy2", tmp_path / "vm1.qcow2", repo=repo)  # no -f
    fails(12, "chain", "export", "vm1", tmp_path / "vm1.raw", repo=repo)
    r = js("chain", "export", "vm1", tmp_path / "vm1.raw", "--snapshot", s1["id"], "--force",
           repo=repo)
    assert r["snapshot"] == s1["id"]
    assert convert_to_raw(tmp_path / "vm1.raw", "raw") == b"A" * MiB + bytes(63 * MiB)

    # The leaf, as QEMU sees it, is the disk.
    leaf = info["volumes"][-1]["path"]
    chain_info = qemu_img_json("info", "--backing-chain", "-f", "qcow2", leaf)
    assert len(chain_info) == 3
    out = ok("chain", "read", "vm1", "--offset", "2M", "--length", "8", repo=repo)
    assert out == b"B" * 8

    clone = js("chain", "clone", "vm1", s1["id"], "vm2", repo=repo)
    assert clone["origin"] == {"chain": "vm1", "snapshot": s1["id"]}
    assert [v["role"] for v in clone["volumes"]] == ["shared", "leaf"]
    line = fails(15, "chain", "delete-snapshot", "vm1", s1["id"], repo=repo)
    assert "clone 'vm2'" in line

    r = js("chain", "delete-snapshot", "vm1", s2, repo=repo)
    assert set(r) == {"snapshot", "direction", "removed-volume", "kept-volume", "copied-bytes",
                      "commit-bytes", "pull-bytes"}
    assert r["snapshot"] == s2 and r["direction"] in ("commit", "pull")
    chains = js("chain", "list", repo=repo)
    assert chains == [
        {"name": "vm1", "virtual-size": 64 * MiB, "volumes": 2, "snapshots": 1,
         "previewing": None, "origin": None},
        {"name": "vm2", "virtual-size": 64 * MiB, "volumes": 2, "snapshots": 0, "previewing": None,
         "origin": {"chain": "vm1", "snapshot": s1["id"]}}]
    check = js("chain", "check", repo=repo)
    assert check["ok"] is True and check["exit-code"] == 0 and check["problems"] == []
    assert {v["id"] for v in check["volumes"]} >= {v["id"] for v in info["volumes"][:1]}
    for v in check["volumes"]:
        if v["format"] == "qcow2":
            assert v["check"]["check-errors"] == 0
            assert_qemu_clean(v["path"])
    assert ok("chain", "read", "vm1", "--offset", "4M", "--length", "4", repo=repo) == b"CCCC"


def test_revert_preview_and_delete(repo):
    ok("chain", "create", "vm1", "1M", repo=repo)
    ok("chain", "write", "vm1", "--pattern", "1", "--length", "4K", repo=repo)
    s1 = ok("chain", "snapshot", "vm1", repo=repo).decode().strip()
    ok("chain", "write", "vm1", "--pattern", "2", "--length", "4K", repo=repo)
    s2 = ok("chain", "snapshot", "vm1", repo=repo).decode().strip()

    p = js("chain", "preview", "vm1", s1, repo=repo)
    assert p["previewing"] == s1
    assert ok("chain", "read", "vm1", "--length", "1", repo=repo) == b"\1"
    assert "previewing" in fails(15, "chain", "snapshot", "vm1", repo=repo)
    u = js("chain", "undo-preview", "vm1", repo=repo)
    assert u["previewing"] is None
    assert ok("chain", "read", "vm1", "--length", "1", repo=repo) == b"\2"
    ok("chain", "preview", "vm1", s1, repo=repo)
    c = js("chain", "commit-preview", "vm1", repo=repo)
    assert [s["id"] for s in c["snapshots"]] == [s1]
    ok("chain", "write", "vm1", "--pattern", "3", "--length", "4K", repo=repo)
    r = js("chain", "revert", "vm1", s1, repo=repo)
    assert [s["id"] for s in r["snapshots"]] == [s1]
    assert ok("chain", "read", "vm1", "--length", "1", repo=repo) == b"\1"
    fails(16, "chain", "revert", "vm1", s2, repo=repo)
    assert js("chain", "delete", "vm1", repo=repo) == {"deleted": "vm1"}
    assert js("chain", "list", repo=repo) == []
    assert ok("chain", "list", repo=repo) == b"(no chains)\n"


def test_options_before_or_after_the_verb_and_from_the_environment(repo):
    ok("chain", "create", "a", "1M", repo=repo)
    code, out, err = run("--repo", repo, "--output", "json", "chain", "list")
    assert code == 0 and json.loads(out)[0]["name"] == "a"
    code, out, err = run("chain", "list", "--output", "json", "--repo", repo)
    assert code == 0 and json.loads(out)[0]["name"] == "a"
    assert json.loads(ok("chain", "list", "--output", "json", repo=repo))[0]["name"] == "a"
    assert ok("chain", "list", repo=repo).decode().startswith("NAME")


def test_errors_are_one_line_with_stable_exit_codes(repo, tmp_path):
    ok("chain", "create", "a", "1M", repo=repo)
    assert "no repository" in fails(EX_USAGE, "chain", "list")
    assert "no cowchain repository" in fails(16, "chain", "list", "--repo", tmp_path / "none")
    assert "no chain named 'b'" in fails(16, "chain", "info", "b", repo=repo)
    assert "exists already" in fails(15, "chain", "create", "a", "1M", repo=repo)
    assert "invalid size" in fails(EX_USAGE, "chain", "create", "b", "ten", repo=repo)
    assert "multiple of 512" in fails(12, "chain", "create", "b", "1000", repo=repo)
    assert "invalid chain name" in fails(12, "chain", "create", "a/b", "1M", "--repo", repo)
    fails(EX_USAGE, "chain", "frobnicate", repo=repo)
    fails(EX_USAGE, "chain", repo=repo)
    fails(EX_USAGE, "chain", "create", "b", repo=repo)
    assert "has no snapshot" in fails(16, "chain", "revert", "a", "ffff", repo=repo)
    assert "not previewing" in fails(15, "chain", "undo-preview", "a", repo=repo)
    assert "already holds a cowchain repository" in fails(15, "repo", "init", repo)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_bytes(b"")
    assert "exists and is not an empty folder" in fails(15, "repo", "init", tmp_path / "other")
    # a missing file has its own exit code, not a usage error's or check's
    fails(engine.ImageNotFound.exit_code, "chain", "write", "a", "--file",
          tmp_path / "missing", repo=repo)
    with engine.Repository.open(repo):
        # read verbs open the repository read-only: they work beside a writer
        assert [c["name"] for c in js("chain", "list", repo=repo)] == ["a"]
        assert js("chain", "info", "a", repo=repo)["name"] == "a"
        assert "in use by another process" in fails(15, "chain", "snapshot", "a", repo=repo)


def test_internal_errors_are_one_line_too(monkeypatch, capsys, repo):
    from engine import repository

    def boom(*a, **k):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(repository.Repository, "open", classmethod(boom))
    assert cli.main(["--repo", str(repo), "chain", "list"]) == 70
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: RuntimeError: something unexpected" in err


def test_check_reports_and_repairs(repo):
    ok("chain", "create", "a", "1M", "--format", "qcow2", repo=repo)
    (repo / "volumes" / "junk.qcow2").write_bytes(b"junk")
    code, out, err = run("chain", "check", "--output", "json", repo=repo)
    assert code == 2
    d = json.loads(out)
    assert d["ok"] is False and [p["kind"] for p in d["problems"]] == ["stray-file"]
    code, out, err = run("repo", "check", repo=repo)
    assert code == 2 and b"stray-file" in out
    d = js("repo", "check", "--repair", repo=repo)
    assert d["ok"] is True and d["problems"][0]["repaired"] is True
    assert js("chain", "check", "a", repo=repo)["problems"] == []


def test_progress_bar_on_a_tty_only(repo, tmp_path):
    ok("chain", "create", "a", "64M", repo=repo)
    ok("chain", "write", "a", "--pattern", "9", "--length", "24M", repo=repo)
    code, out, err = run("chain", "export", "a", tmp_path / "x.raw", repo=repo, stderr_tty=True)
    assert code == 0, err
    assert "exporting [" in err and "100.0%" in err
    code, out, err = run("chain", "export", "a", tmp_path / "y.raw", repo=repo)
    assert code == 0 and err == ""


@pytest.mark.parametrize("text,value", [("4096", 4096), ("512M", 512 << 20), ("10G", 10 << 30),
                                        ("1T", 1 << 40), ("64k", 65536), ("1.5K", 1536),
                                        ("2GiB", 2 << 30), ("3MB", 3 << 20)])
def test_parse_size(text, value):
    assert cli.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "ten", "1.3K", "-1", "5X"])
def test_parse_size_refuses(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_size(text)
