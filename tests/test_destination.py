"""The destination rule (engine.destination): export and ``chain read --out`` never write into
a repository, onto a file in use, or through a link; --force replaces only a regular file,
atomically; a device or standard output is an explicit choice."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

import engine
from engine import destination, ops
from engine.errors import EX_USAGE, InvalidArgument, UnsafeDestination
from test_cli import _env, fails, js, ok, run

MiB = 1 << 20
REFUSED = UnsafeDestination.exit_code


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _tree(repo) -> dict:
    """Every file of the repository folder and its hash (what must not change)."""
    out = {}
    for top, _dirs, files in os.walk(repo):
        for f in files:
            p = os.path.join(top, f)
            if f.startswith("catalog.db-") or f == "repository.lock":
                continue        # SQLite's WAL and the lock file are touched by any open
            out[os.path.relpath(p, repo)] = _digest(p)
    return out


@pytest.fixture
def repo(tmp_path):
    path = tmp_path / "repo"
    ok("repo", "init", path)
    ok("chain", "create", "vm1", "4M", "--format", "qcow2", repo=path)
    ok("chain", "write", "vm1", "--pattern", "0x61", "--length", "64K", repo=path)
    ok("chain", "snapshot", "vm1", repo=path)
    ok("chain", "write", "vm1", "--offset", "1M", "--pattern", "0x62", "--length", "64K",
       repo=path)
    return path


def _volumes(repo) -> list[str]:
    return sorted(str(p) for p in (repo / "volumes").iterdir())


def test_export_never_writes_into_the_repository(repo, tmp_path):
    before = _tree(repo)
    leaf = js("chain", "info", "vm1", repo=repo)["volumes"][-1]["path"]
    base = _volumes(repo)[0]
    (tmp_path / "link-to-repo").symlink_to(repo)
    os.link(base, tmp_path / "hardlink.qcow2")
    targets = [
        repo / "catalog.db",                                  # the catalog itself
        leaf,                                                 # the live leaf
        base,                                                 # a snapshot's volume
        repo / "volumes" / ".." / "catalog.db",               # '..'
        tmp_path / "link-to-repo" / "catalog.db",             # a symlinked folder
        tmp_path / "link-to-repo" / "volumes" / "new.img",    # a new name inside
        repo / "new.img",
        tmp_path / "hardlink.qcow2",                          # a hard link to a volume
    ]
    for target in targets:
        for force in ([], ["--force"]):
            line = fails(REFUSED, "chain", "export", "vm1", target, *force, repo=repo)
            assert "repository" in line, line
    for target in targets[:3]:
        line = fails(REFUSED, "chain", "read", "vm1", "--length", "4K", "--out", target,
                     "--force", repo=repo)
    assert _tree(repo) == before
    assert _digest(tmp_path / "hardlink.qcow2") == _digest(base)
    assert [f for f in os.listdir(repo / "volumes") if f.endswith(".part")] == []
    # ... and the repository still works
    assert ok("chain", "read", "vm1", "--length", "2", repo=repo) == b"aa"
    assert js("chain", "check", repo=repo)["ok"] is True


def test_force_never_follows_or_replaces_links_devices_or_fifos(repo, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me")
    link = tmp_path / "link.img"
    link.symlink_to(victim)
    stdout_link = tmp_path / "stdout"
    stdout_link.symlink_to("/dev/stdout")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target, what in [(link, "symbolic link"), (stdout_link, "symbolic link"),
                         ("/dev/null", "character device"), (fifo, "FIFO"),
                         (tmp_path, "folder")]:
        for verb in (["chain", "export", "vm1", target, "--force"],
                     ["chain", "read", "vm1", "--length", "4K", "--out", target, "--force"]):
            line = fails(REFUSED, *verb, repo=repo)
            assert what in line, line
    assert os.path.islink(link) and os.readlink(stdout_link) == "/dev/stdout"
    assert victim.read_bytes() == b"keep me"
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    # --output-device is for block devices only
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"x")
    assert "not a block device" in fails(REFUSED, "chain", "export", "vm1", plain,
                                         "--output-device", repo=repo)
    assert plain.read_bytes() == b"x"


def test_force_replaces_a_regular_file_atomically(repo, tmp_path):
    dest = tmp_path / "out.raw"
    dest.write_bytes(b"old")
    line = fails(InvalidArgument.exit_code, "chain", "export", "vm1", dest, repo=repo)
    assert "file exists" in line and "--force" in line and "overwrite" not in line
    assert dest.read_bytes() == b"old"
    old_ino = os.stat(dest).st_ino
    other = tmp_path / "other-name"
    os.link(dest, other)                           # a second name for the old file
    r = js("chain", "export", "vm1", dest, "--force", repo=repo)
    assert r["path"] == str(dest)
    data = dest.read_bytes()
    assert len(data) == 4 * MiB and data[:2] == b"aa" and data[MiB:MiB + 2] == b"bb"
    assert os.stat(dest).st_ino != old_ino          # a new file renamed over the name
    assert other.read_bytes() == b"old"             # the other name keeps the old data
    assert [f for f in os.listdir(tmp_path) if f.endswith(".part")] == []


def test_read_out_refuses_an_existing_file_without_force(repo, tmp_path):
    out = tmp_path / "bytes.bin"
    out.write_bytes(b"old")
    line = fails(InvalidArgument.exit_code, "chain", "read", "vm1", "--length", "2",
                 "--out", out, repo=repo)
    assert "--force" in line and out.read_bytes() == b"old"
    r = js("chain", "read", "vm1", "--length", "2", "--out", out, "--force", repo=repo)
    assert r["out"] == str(out) and out.read_bytes() == b"aa"
    fresh = tmp_path / "fresh.bin"
    ok("chain", "read", "vm1", "--offset", "1M", "--length", "3", "--out", fresh, repo=repo)
    assert fresh.read_bytes() == b"bbb"
    fails(EX_USAGE, "chain", "read", "vm1", "--length", "2", "--force", repo=repo)


def test_export_to_stdout_is_explicit(repo, tmp_path):
    code, out, err = run("chain", "export", "vm1", "-", repo=repo)
    assert code == 0, err
    assert len(out) == 4 * MiB and out[:2] == b"aa" and out[MiB:MiB + 2] == b"bb"
    assert out == open(_export_file(repo, tmp_path), "rb").read()
    fails(EX_USAGE, "chain", "export", "vm1", "-", "--format", "qcow2", repo=repo)
    # standard output redirected into the repository is refused, not written
    catalog = repo / "catalog.db"
    before = _digest(catalog)
    with open(catalog, "ab") as f:
        p = subprocess.run([sys.executable, "-m", "engine.cli", "chain", "export", "vm1", "-"],
                           env=_env(repo), stdout=f, stderr=subprocess.PIPE, timeout=120)
    assert p.returncode == REFUSED, p.stderr
    assert _digest(catalog) == before


def _export_file(repo, tmp_path) -> str:
    path = tmp_path / "ref.raw"
    ok("chain", "export", "vm1", path, repo=repo)
    return str(path)


def test_python_export_and_convert_follow_the_same_rule(repo, tmp_path):
    with engine.Repository.open(repo) as r:
        c = r.chain("vm1")
        for target in (repo / "catalog.db", _volumes(repo)[0], repo / "new.raw"):
            with pytest.raises(UnsafeDestination):
                c.export(target, overwrite=True)
        link = tmp_path / "l"
        link.symlink_to(tmp_path / "nowhere")
        with pytest.raises(UnsafeDestination):
            c.export(link, overwrite=True)
        assert not os.path.exists(tmp_path / "nowhere")
    # ops.convert: an image open anywhere in the process is a file in use, even by a hard
    # link from outside any repository
    src_path = tmp_path / "src.qcow2"
    other = tmp_path / "other.qcow2"
    with engine.create(src_path, MiB) as src, engine.create(other, MiB) as busy:
        src.write(0, b"z" * 512)
        os.link(other, tmp_path / "alias.qcow2")
        before = _digest(other)
        for target in (src_path, other, tmp_path / "alias.qcow2"):
            with pytest.raises(UnsafeDestination):
                ops.convert(src, target, overwrite=True)
        assert _digest(other) == before
        out = tmp_path / "flat.raw"
        ops.convert(src, out)
        assert open(out, "rb").read(512) == b"z" * 512
        with pytest.raises(InvalidArgument):
            ops.convert(src, out)                 # exists: needs overwrite
        ops.convert(src, out, overwrite=True, format="qcow2")
        with engine.open(out, readonly=True) as back:
            assert back.format == "qcow2" and back.read(0, 512) == b"z" * 512
        busy.write(0, b"q")
    # closed images are no longer in use
    assert (os.stat(other).st_dev, os.stat(other).st_ino) not in destination._files
