"""A full filesystem during allocation (docs/reliability.md, "Files and resources").

As root, each test mounts a small tmpfs (8 MiB), makes an image there and writes stamped
blocks in a child process until the filesystem is full. Required: a clean
``engine.NoSpace`` (never SIGBUS: the child must not die by a signal), the image reopens
read-only and read-write, check() reports 0 corruptions, ``qemu-img check`` exits 0 or 3, and
every write acknowledged by a flush reads back (the oracle of reliability.oracle). Freeing
space then lets writes and a flush succeed again. The tmpfs is unmounted at teardown.
Without root the tests are skipped with that reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import engine
from reliability import summary
from reliability.chain import qemu_check
from reliability.killer import TESTS, worker_env

ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(not ROOT, reason="mounting a tmpfs needs root")
_FIG = {"runs": 0, "nospace": 0, "sigbus": 0, "corruptions": 0, "lost": 0, "reopen_fail": 0}


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt, leave: int):
    """Fill the filesystem with a filler file, leaving about ``leave`` bytes free."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(mnt / "filler", "wb") as f:
        left = max(0, free - leave)
        while left > 0:
            k = min(left, 1 << 20)
            try:
                f.write(b"\xa5" * k)
                f.flush()
            except OSError:
                break
            left -= k


def _child(*args):
    p = subprocess.run([sys.executable, "-m", "reliability.fullfs", *map(str, args)],
                       cwd=TESTS, env=worker_env(), capture_output=True, timeout=300)
    if p.returncode < 0:
        _FIG["sigbus"] += 1
        _publish()
    assert p.returncode >= 0, (
        f"reliability.fullfs {' '.join(map(str, args[:2]))} died by signal "
        f"{signal.Signals(-p.returncode).name}: {p.stderr.decode()[-1500:]}")
    return p


def _publish():
    summary.publish("fullfs", f"{_FIG['runs']} runs on an 8 MiB tmpfs — {_FIG['nospace']} clean "
                    f"NoSpace, {_FIG['sigbus']} deaths by signal (SIGBUS), "
                    f"{_FIG['corruptions']} corruptions, {_FIG['lost']} lost/wrong flushed "
                    f"blocks, {_FIG['reopen_fail']} reopen failures")


@pytest.mark.parametrize("mode", ["grow", "holes", "chain"])
def test_write_until_enospc(tmpfs, tmp_path, mode):
    path = tmpfs / "disk.qcow2"
    size = 64 << 20
    if mode == "grow":
        engine.create(str(path), size, cluster_size=4096).close()
    elif mode == "holes":
        # a sparse image whose clusters exist below its size, then a full filesystem
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                        "cluster_size=4096,preallocation=metadata", str(path), "6M"],
                       check=True)
        size = 6 << 20
        _fill(tmpfs, 256 << 10)
    else:
        # an overlay (512-byte clusters: every write is a copy-up) over a sparse base whose
        # holes are read through the chain, on a full filesystem
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                        "cluster_size=4096,preallocation=metadata", str(tmpfs / "base.qcow2"),
                        "6M"], check=True)
        engine.create(str(path), None, cluster_size=512, backing="base.qcow2",
                      backing_format="qcow2").close()
        size = 6 << 20
        _fill(tmpfs, 128 << 10)
    _FIG["runs"] += 1
    _publish()
    p = _child(path, mode, 7)
    out = p.stdout.decode()
    lines = out.splitlines()
    nospace = [ln for ln in lines if ln.startswith("NOSPACE")]
    assert nospace, f"no out-of-space error was seen (rc {p.returncode}): " \
                    f"{out[-800:]} {p.stderr.decode()[-2000:]}"
    assert '"NoSpace"' in nospace[0], f"the full filesystem did not give NoSpace: {nospace[0]}"
    _FIG["nospace"] += 1
    _publish()
    # reopen RO (in a child): consistent, flushed data intact
    lines_file = tmp_path / "lines.txt"
    lines_file.write_text("\n".join(lines) + "\n")
    v = json.loads(_child("verify", path, lines_file, size).stdout.decode().splitlines()[-1])
    assert "reopen_error" not in v, v
    _FIG["corruptions"] += int(bool(v["corruptions"]))
    _FIG["lost"] += v["lost"] + v["wrong"]
    _publish()
    assert v["corruptions"] == 0 and v["check_errors"] == 0, v
    assert v["lost"] == 0 and v["wrong"] == 0, v
    code, txt = qemu_check(path)
    assert code in (0, 3), txt
    # free space, then RW reopen: writes and a flush work again
    if (tmpfs / "filler").exists():
        os.unlink(tmpfs / "filler")
    r = json.loads(_child("rewrite", path, mode).stdout.decode().splitlines()[-1])
    assert r["rw_corruptions"] == 0 and r["corruptions_after"] == 0, r
    if mode != "grow":
        assert r["wrote"] and r["readback_ok"], r
