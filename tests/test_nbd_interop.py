"""``cowchain serve`` against the real NBD clients: qemu-img, qemu-io, qemu-nbd (as the oracle
for maps), nbdinfo, nbdcopy and fio. They are required (Debian's qemu-utils, libnbd-bin,
nbdkit and fio; ``.ci/run`` installs them): a missing tool fails the module, it is never
skipped.

Each test builds a small random chain (base + 2 overlays, seeded by ``COWCHAIN_NBD_SEED``,
default 1), serves it with the command as a user runs it (a subprocess that prints the URI
once listening) and checks what the client sees against QEMU reading the same files.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import time

import pytest

import qemu

TOOLS = {t: shutil.which(t) for t in ("nbdinfo", "nbdcopy", "fio", "qemu-nbd", "openssl")}
_missing = [t for t, p in TOOLS.items() if p is None]
if _missing:
    raise RuntimeError(f"{', '.join(_missing)} not found on PATH: these tests need Debian's "
                       "libnbd-bin, fio, qemu-utils and openssl (.ci/run installs them). They are "
                       "never skipped.")

SEED = int(os.environ.get("COWCHAIN_NBD_SEED", "1"))
MiB = 1 << 20
SIZE = 32 * MiB
TIMEOUT = 60


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, **kw)
    assert p.returncode == 0, f"{argv} exited {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return p


class Served:
    """A ``cowchain serve`` subprocess; ``uri`` is the line it printed."""

    def __init__(self, tmp_path, *args: str, tcp: bool = False):
        self.sock = str(tmp_path / f"s{random.random():.8f}.sock")
        self.pid_file = str(tmp_path / "serve.pid")
        where = ["--bind", "127.0.0.1:0"] if tcp else ["--socket", self.sock]
        argv = [sys.executable, "-m", "engine.cli", "serve", *where,
                "--pid-file", self.pid_file, *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout=TIMEOUT)
        self.uri = self.proc.stdout.readline().strip() if ready else ""
        if not self.uri.startswith("nbd"):
            self.proc.kill()
            raise AssertionError(f"cowchain serve did not start: {self.proc.stderr.read()}")

    def stop(self) -> int:
        """SIGTERM, then the exit code (the server must end by itself)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        code = self.stop()
        err = self.proc.stderr.read()
        if exc[0] is None:
            assert code == 0, f"cowchain serve exited {code}: {err}"


def _random_writes(rng: random.Random, n: int, zero_share: float) -> list[str]:
    cmds = []
    for _ in range(n):
        off = rng.randrange(0, SIZE // 512) * 512
        ln = min(rng.choice([512, 4096, 65536, 3 * 65536 + 512, MiB]), SIZE - off)
        if rng.random() < zero_share:
            cmds.append(f"write -z {off} {ln}")
        else:
            cmds.append(f"write -P {rng.randrange(1, 256)} {off} {ln}")
    return cmds


@pytest.fixture
def chain(tmp_path):
    """base.qcow2 <- l1.qcow2 <- l2.qcow2 with random data and zero writes; returns the leaf
    path and a raw copy of its disk as QEMU reads it."""
    rng = random.Random(SEED)
    base = qemu.create(tmp_path / "base.qcow2", SIZE)
    qemu.qemu_io(base, *_random_writes(rng, 12, 0.0))
    l1 = qemu.create(tmp_path / "l1.qcow2", SIZE, backing="base.qcow2")
    qemu.qemu_io(l1, *_random_writes(rng, 12, 0.3))
    l2 = qemu.create(tmp_path / "l2.qcow2", SIZE, backing="l1.qcow2")
    qemu.qemu_io(l2, *_random_writes(rng, 8, 0.3))
    ref = tmp_path / "ref.raw"
    qemu.qemu_img("convert", "-f", "qcow2", "-O", "raw", l2, ref)
    return l2, str(ref)


def _runs(entries, key) -> list[tuple[int, int, object]]:
    """(start, length, value) runs with equal neighbours merged."""
    out: list[list] = []
    for start, length, value in ((e[0], e[1], key(e[2])) for e in entries):
        if out and out[-1][2] == value and out[-1][0] + out[-1][1] == start:
            out[-1][1] += length
        else:
            out.append([start, length, value])
    return [tuple(r) for r in out]


def _nbdinfo_map(uri: str, context: str) -> list[tuple[int, int, object]]:
    p = _run([TOOLS["nbdinfo"], "--json", f"--map={context}", uri])
    return _runs([(e["offset"], e["length"], e["type"]) for e in json.loads(p.stdout)],
                 lambda t: t)


def test_qemu_img_compare_convert_map(chain, tmp_path):
    leaf, ref = chain
    with Served(tmp_path, "--read-only", leaf) as s:
        code, text = qemu.qemu_compare(s.uri, ref, fmt_a="raw")
        assert code == 0, text
        out = tmp_path / "out.raw"
        qemu.qemu_img("convert", "-f", "raw", "-O", "raw", s.uri, out)
        assert open(out, "rb").read() == open(ref, "rb").read()
        over_nbd = qemu.qemu_img_json("map", "-f", "raw", s.uri)
    on_file = qemu.qemu_map(leaf)

    def status(e):
        return e["data"], e["zero"]

    assert _runs([(e["start"], e["length"], e) for e in over_nbd], status) == \
        _runs([(e["start"], e["length"], e) for e in on_file], status)


def test_nbdinfo_list_and_maps_agree_with_qemu(chain, tmp_path):
    leaf, _ = chain
    on_file = qemu.qemu_map(leaf)
    want_base = _runs([(e["start"], e["length"], e) for e in on_file],
                      lambda e: (0 if e["data"] else 1) | (2 if e["zero"] else 0))
    want_depth = _runs([(e["start"], e["length"], e) for e in on_file],
                       lambda e: e["depth"] + 1 if e.get("present", True) else 0)
    with Served(tmp_path, "--read-only", "--export-name", "disk", "--description",
                "the test disk", leaf) as s:
        assert s.uri.startswith("nbd+unix:///disk?socket=")
        listing = _run([TOOLS["nbdinfo"], "--list", "--json", s.uri]).stdout
        exports = json.loads(listing)["exports"]
        assert [(e["export-name"], e["description"]) for e in exports] == \
            [("disk", "the test disk")]
        assert exports[0]["can_multi_conn"] is True and exports[0]["is_read_only"] is True
        assert _nbdinfo_map(s.uri, "base:allocation") == want_base
        ours_depth = _nbdinfo_map(s.uri, "qemu:allocation-depth")
    assert ours_depth == want_depth
    # qemu-nbd -A on the same chain reports the same owners
    qsock = str(tmp_path / "q.sock")
    q = subprocess.Popen([TOOLS["qemu-nbd"], "-r", "-A", "-t", "-k", qsock, "-f", "qcow2",
                          leaf], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(qsock):
            assert q.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.05)
        assert _nbdinfo_map(f"nbd+unix:///?socket={qsock}", "qemu:allocation-depth") == \
            ours_depth
    finally:
        q.terminate()
        q.wait(TIMEOUT)


def test_qemu_io_writes_then_leaf_checks_clean(chain, tmp_path):
    leaf, _ = chain
    rng = random.Random(SEED + 1)
    top = qemu.create(tmp_path / "top.qcow2", SIZE, backing="l2.qcow2")
    twin = qemu.create(tmp_path / "twin.qcow2", SIZE, backing="l2.qcow2")
    cmds = []
    for c in _random_writes(rng, 30, 0.25):
        if rng.random() < 0.3:
            c = c.replace("write ", "write -f ", 1)     # FUA
        cmds.append(c)
    cmds.append("flush")
    cmds += [c.replace("write -f", "write").replace("write -z", "write -P 0")
             .replace("write", "read", 1) for c in cmds[-6:-1]]
    with Served(tmp_path, top) as s:
        qemu.qemu_io(s.uri, *cmds, fmt="raw")
    qemu.assert_qemu_clean(top)
    qemu.qemu_io(twin, *cmds)
    code, text = qemu.qemu_compare(top, twin, fmt_b="qcow2")
    assert code == 0, text
    # TRIM leaves the range undefined by the protocol: only the image's health is checked
    with Served(tmp_path, top) as s:
        qemu.qemu_io(s.uri, "discard 0 1M", "discard 1536k 64k", "flush", fmt="raw")
    qemu.assert_qemu_clean(top)


def test_nbdcopy_both_directions_multi_conn(chain, tmp_path):
    leaf, ref = chain
    out = tmp_path / "copy.raw"
    with Served(tmp_path, "--read-only", leaf) as s:
        _run([TOOLS["nbdcopy"], "--connections=4", s.uri, str(out)])
    assert open(out, "rb").read() == open(ref, "rb").read()
    dest = qemu.create(tmp_path / "dest.qcow2", SIZE, backing="base.qcow2")
    with Served(tmp_path, dest) as s:
        _run([TOOLS["nbdcopy"], "--connections=4", "--flush", ref, s.uri])
    qemu.assert_qemu_clean(dest)
    code, text = qemu.qemu_compare(dest, ref)
    assert code == 0, text


def test_fio_randrw_with_verify(tmp_path):
    img = qemu.create(tmp_path / "fio.qcow2", 64 * MiB)
    with Served(tmp_path, img) as s:
        p = _run([TOOLS["fio"], "--name=nbd", "--ioengine=nbd", f"--uri={s.uri}",
                  "--rw=randrw", "--bs=4k", "--iodepth=16", "--size=64M", "--io_size=12M",
                  "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0",
                  f"--randseed={SEED}",
                  "--output-format=json"])
        result = json.loads(p.stdout[p.stdout.index("{"):])
    job = result["jobs"][0]
    assert job["error"] == 0
    assert job["read"]["io_bytes"] > 0 and job["write"]["io_bytes"] > 0
    qemu.assert_qemu_clean(img)


def test_serve_command_lifecycle(chain, tmp_path):
    """URI on stdout, pid file while listening, a read-only export refuses writes, and
    SIGTERM ends the server with exit 0, the socket and pid file gone, the image unlocked."""
    leaf, _ = chain
    s = Served(tmp_path, "--read-only", leaf)
    try:
        assert int(open(s.pid_file).read()) == s.proc.pid
        assert s.uri == f"nbd+unix:///?socket={s.sock}"
        p = qemu.qemu_io(s.uri, "write -P 1 0 4096", fmt="raw", check=False)
        assert qemu.io_failed((p.stdout + p.stderr).decode())
    finally:
        assert s.stop() == 0
    assert not os.path.exists(s.sock) and not os.path.exists(s.pid_file)
    qemu.qemu_io(leaf, "write -P 7 0 4096")          # the write lock is free again
    qemu.assert_qemu_clean(leaf)


def test_repository_leaf_and_snapshot_exports(tmp_path):
    """``cowchain --repo DIR serve --chain NAME`` serves the leaf read-write (the writes land
    in the leaf, snapshots keep their content); ``--snapshot ID`` serves a snapshot
    read-only; while the leaf is served, another process cannot change the repository (but
    for snapshots, see test_nbd_snapshot.py): the error names the server."""
    from engine.repository import Repository

    repo_dir = str(tmp_path / "repo")
    rng = random.Random(SEED + 2)
    first = bytes(rng.randrange(256) for _ in range(4096)) * 16
    with Repository.create(repo_dir) as r:
        c = r.create_chain("vm", SIZE)
        c.write(0, first)
        snap = c.snapshot("one").id
    with Served(tmp_path, "--repo", repo_dir, "--chain", "vm") as s:
        qemu.qemu_io(s.uri, "write -P 0x5a 1M 64k", "write -z 0 4096", "flush",
                     "read -P 0x5a 1M 64k", fmt="raw")
        p = subprocess.run([sys.executable, "-m", "engine.cli", "--repo", repo_dir, "chain",
                            "resize", "vm", str(2 * SIZE)], capture_output=True, text=True,
                           timeout=TIMEOUT)
        assert p.returncode != 0 and "in use by another process" in p.stderr
        assert "cowchain serve of chain 'vm'" in p.stderr
    with Served(tmp_path, "--repo", repo_dir, "--chain", "vm", "--snapshot", snap[:8]) as s:
        assert "is_read_only: true" in _run([TOOLS["nbdinfo"], s.uri]).stdout
        out = tmp_path / "snap.raw"
        qemu.qemu_img("convert", "-f", "raw", "-O", "raw", s.uri, out)
    data = open(out, "rb").read()
    assert data[:len(first)] == first and data[len(first):] == bytes(SIZE - len(first))
    with Repository.open(repo_dir) as r:
        c = r.chain("vm")
        assert c.read(MiB, 65536) == b"\x5a" * 65536
        assert c.read(0, 4096) == bytes(4096) and c.read(4096, 4096) == first[4096:8192]
        res = r.check()
        assert res.ok and res.exit_code == 0, res


def _make_certs(folder) -> str:
    """A CA and a server certificate for localhost, made with openssl (files named as qemu's
    tls-creds-x509 and libnbd's tls-certificates expect)."""
    folder.mkdir()
    d = str(folder)

    def ssl(*args: str) -> None:
        _run([TOOLS["openssl"], *args], cwd=d)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out",
        "ca-cert.pem", "-days", "2", "-subj", "/CN=cowchain test CA")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server-key.pem", "-out",
        "server.csr", "-subj", "/CN=localhost")
    (folder / "ext.cnf").write_text("subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n"
                                    "extendedKeyUsage=serverAuth\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
        "-CAcreateserial", "-out", "server-cert.pem", "-days", "2", "-extfile", "ext.cnf")
    return d


def test_tls_with_x509_certificates(chain, tmp_path):
    leaf, ref = chain
    certs = _make_certs(tmp_path / "certs")
    with Served(tmp_path, "--read-only", "--tls-certs", certs, "--tls", "require", leaf) as s:
        assert s.uri.startswith("nbds+unix://")
        tls_uri = f"{s.uri}&tls-certificates={certs}"
        assert "with TLS" in _run([TOOLS["nbdinfo"], tls_uri]).stdout
        out = tmp_path / "tls.raw"
        _run([TOOLS["nbdcopy"], "--connections=2", tls_uri, str(out)])
        assert open(out, "rb").read() == open(ref, "rb").read()
        qemu.qemu_img("convert", "--object",
                      f"tls-creds-x509,id=tls0,dir={certs},endpoint=client", "--image-opts",
                      f"driver=raw,file.driver=nbd,file.server.type=unix,"
                      f"file.server.path={s.sock},file.tls-creds=tls0,"
                      f"file.tls-hostname=localhost", "-O", "raw", tmp_path / "q.raw")
        assert open(tmp_path / "q.raw", "rb").read() == open(ref, "rb").read()
        plain = subprocess.run([TOOLS["nbdinfo"], f"nbd+unix:///?socket={s.sock}"],
                               capture_output=True, text=True, timeout=TIMEOUT)
        assert plain.returncode != 0          # TLS is required: no plain-text session


def test_several_exports_by_name(chain, tmp_path):
    """``--export NAME=IMAGE`` serves more images from the same process, each under its
    name; ``nbdinfo --list`` lists them all and each reads as its own image."""
    leaf, ref = chain
    other = tmp_path / "other.raw"
    other.write_bytes(bytes(range(256)) * 4096)
    with Served(tmp_path, "--read-only", "--export-name", "chain", leaf,
                "--export", f"plain={other}") as s:
        names = [e["export-name"] for e in json.loads(
            _run([TOOLS["nbdinfo"], "--list", "--json", s.uri]).stdout)["exports"]]
        assert names == ["chain", "plain"]
        code, text = qemu.qemu_compare(s.uri, ref, fmt_a="raw")
        assert code == 0, text
        code, text = qemu.qemu_compare(f"nbd+unix:///plain?socket={s.sock}", other,
                                       fmt_a="raw")
        assert code == 0, text
        missing = subprocess.run([TOOLS["nbdinfo"], f"nbd+unix:///nope?socket={s.sock}"],
                                 capture_output=True, text=True, timeout=TIMEOUT)
        assert missing.returncode != 0 and "nope" in missing.stderr


def test_tcp_bind(chain, tmp_path):
    """--bind HOST:PORT (port 0: any free port; the URI names the one taken)."""
    leaf, ref = chain
    with Served(tmp_path, "--read-only", "--export-name", "d", leaf, tcp=True) as s:
        assert s.uri.startswith("nbd://127.0.0.1:") and s.uri.endswith("/d")
        assert int(s.uri.split(":")[2].split("/")[0]) > 0
        code, text = qemu.qemu_compare(s.uri, ref, fmt_a="raw")
        assert code == 0, text
        out = tmp_path / "tcp.raw"
        _run([TOOLS["nbdcopy"], "--connections=2", s.uri, str(out)])
        assert open(out, "rb").read() == open(ref, "rb").read()
