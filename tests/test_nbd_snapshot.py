"""A live snapshot of a chain served read-write by ``cowchain serve``.

While fio writes through NBD, ``cowchain chain snapshot`` from another process is forwarded
to the server (it holds the repository), which takes the snapshot between two requests: the
snapshot holds exactly the writes acknowledged before it (a prefix of fio's sequential
writes), the leaf holds all of them, and every volume checks clean with qemu-img.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from engine.errors import RepositoryError
from engine.nbd import Export, Server
from engine.repository import Repository
from test_nbd_interop import TIMEOUT, Served

MiB = 1 << 20
SIZE = 32 * MiB
BLOCK = 64 << 10
OLD, NEW = 0x11, 0x5A


def _cli(repo_dir: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", "--repo", repo_dir, *args],
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_snapshot_while_fio_writes(tmp_path):
    repo_dir = str(tmp_path / "repo")
    with Repository.create(repo_dir) as r:
        c = r.create_chain("vm", SIZE)
        c.write(0, bytes([OLD]) * SIZE)
    with Served(tmp_path, "--repo", repo_dir, "--chain", "vm") as s:
        # sequential 64 KiB writes, one at a time, about 4 s in all
        fio = subprocess.Popen(
            ["fio", "--name=w", "--ioengine=nbd", f"--uri={s.uri}", "--rw=write",
             f"--bs={BLOCK}", "--iodepth=1", f"--size={SIZE}", "--rate=8m",
             f"--buffer_pattern={NEW:#x}", "--output-format=json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        p = _cli(repo_dir, "chain", "snapshot", "vm", "--description", "live", "--output", "json")
        out, err = fio.communicate(timeout=TIMEOUT)
        assert fio.returncode == 0, err
        assert p.returncode == 0, p.stderr
        snap = json.loads(p.stdout)
        assert snap["description"] == "live"
        # other changes are still refused, naming the server
        q = _cli(repo_dir, "chain", "resize", "vm", str(2 * SIZE))
        assert q.returncode != 0 and "cowchain serve of chain 'vm'" in q.stderr
    with Repository.open(repo_dir) as r:
        c = r.chain("vm")
        assert c.read(0, SIZE) == bytes([NEW]) * SIZE       # the leaf: every write
        with c.open_snapshot(snap["id"]) as img:
            data = img.read(0, SIZE)
            blocks = [data[i:i + BLOCK] for i in range(0, SIZE, BLOCK)]
            # each block whole, old or new; the new ones a prefix: a point between requests
            kinds = [b[0] if b in (bytes([OLD]) * BLOCK, bytes([NEW]) * BLOCK) else None
                     for b in blocks]
            assert None not in kinds
            k = kinds.index(OLD) if OLD in kinds else len(kinds)
            assert kinds == [NEW] * k + [OLD] * (len(kinds) - k)
            assert 0 < k < len(kinds), "the snapshot was not taken while fio wrote"
            paths = [v.path for v in r.chain("vm").volumes if v.format == "qcow2"]
        assert r.check().ok
    assert len(paths) == 1                     # the new leaf (the snapshot is the raw base)
    for path in paths:
        full = path if os.path.isabs(path) else os.path.join(repo_dir, path)
        subprocess.run(["qemu-img", "check", "-q", full], check=True, timeout=TIMEOUT)


def test_snapshot_through_the_server_object(tmp_path):
    """In one process: Server.snapshot on the repository's thread switches the export to the
    new leaf; a chain that is not served read-write is refused by name."""
    repo_dir = str(tmp_path / "repo")
    with Repository.create(repo_dir) as r:
        r.create_chain("vm", 4 * MiB)
    with Repository.open(repo_dir) as r:
        c = r.chain("vm")
        c.read(0, 0)
        srv = Server([Export("", c, close=False)], socket_path=str(tmp_path / "s.sock"))
        srv.listen()
        try:
            snap = srv.snapshot("vm", "one")
            assert [x.id for x in c.snapshots] == [snap.id]
            c.write(0, b"\x22" * 4096)
            with pytest.raises(RepositoryError, match="'other' is not exported read-write"):
                srv.snapshot("other")
        finally:
            srv.close()
        with c.open_snapshot(snap.id) as img:
            assert img.read(0, 4096) == bytes(4096)
        assert c.read(0, 4096) == b"\x22" * 4096
