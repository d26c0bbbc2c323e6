"""Reads and writes interleaved on a writable export, over several connections with many
requests in flight on each.

Every 4 KiB block of the disk holds a pattern naming its block and a version; each
connection writes only its own blocks (so their versions only grow), and any connection
reads any block. A read must return, for every block, a whole pattern of that block whose
version is at least the one whose WRITE reply had arrived (on any connection) before the
read was sent: the promise that an acknowledged write is seen by every later read, now that
the reads of a writable export are served by the engine's loop while the writes go through
the engine's write path (copy-up from the backing file, the reader thread, the workers, or
straight into the mapping for a small rewrite).

And the rule of the in-place path: a WRITE payload lands only once it has wholly arrived,
so a client that disconnects mid-payload leaves the image as it was.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

import engine
import engine.nbd.conn as nbd_conn
from engine._core import nbd_recv_write, nbd_serve_reads
import qemu
from engine.nbd import Export, Server, proto
from engine.repository import Repository
from test_nbd_hostile import Client, chunks_to_bytes

MiB = 1 << 20
SIZE = 8 * MiB
B = 4096
NBLOCKS = SIZE // B
CONNS = 4
STRIPE = 64             # blocks; connection i writes the stripes s with s % CONNS == i


def _pattern(block: int, version: int) -> bytes:
    return struct.pack(">QQ", block, version) * (B // 16)


def _decode(data: bytes, first: int) -> list[int]:
    """The version of each block in DATA (starting at block FIRST); a torn or foreign block
    fails the test."""
    out = []
    for i in range(len(data) // B):
        blk = data[i * B:(i + 1) * B]
        block, version = struct.unpack(">QQ", blk[:16])
        assert block == first + i and blk == _pattern(block, version), \
            f"block {first + i} holds something no write put there"
        out.append(version)
    return out


def _join_and_look(sock: str, threads: list[threading.Thread], errors: list[BaseException],
                   acked: list[int]) -> None:
    """Wait for the clients, then a last look over a new connection: every block holds
    exactly its last acknowledged version."""
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    if errors:
        raise errors[0]
    c = Client(sock)
    c.go()
    assert _decode(c.read(0, SIZE), 0) == acked
    c.close()


def _worker(sock: str, me: int, seed: int, acked: list[int], lock: threading.Lock,
            errors: list[BaseException], rounds: int = 30) -> None:
    rng = random.Random(seed)
    version = 0
    c = Client(sock, timeout=30)
    try:
        c.go()
        for _ in range(rounds):
            reqs: dict[int, tuple] = {}
            out = b""
            written: set[int] = set()
            for cookie in range(1, 25):
                if rng.random() < 0.4:
                    # a write of 1..64 blocks inside one of my stripes, all a new version
                    n = rng.choice([1, 1, 2, 16, 40, 64])
                    stripe = rng.randrange(0, NBLOCKS // STRIPE // CONNS) * CONNS + me
                    first = stripe * STRIPE + rng.randrange(0, STRIPE - n + 1)
                    blocks = set(range(first, first + n))
                    if written & blocks:
                        continue                     # one write per block in flight
                    written |= blocks
                    version += 1
                    flags = proto.CMD_FLAG_FUA if rng.random() < 0.1 else 0
                    reqs[cookie] = ("w", first, n, version)
                    out += proto.pack_request(proto.CMD_WRITE, cookie, first * B, n * B, flags)
                    out += b"".join(_pattern(b, version) for b in range(first, first + n))
                elif rng.random() < 0.05:
                    reqs[cookie] = ("f",)
                    out += proto.pack_request(proto.CMD_FLUSH, cookie, 0, 0)
                else:
                    n = rng.choice([1, 1, 1, 4, 32, 48])
                    first = rng.randrange(0, NBLOCKS - n)
                    with lock:
                        floor = acked[first:first + n]
                    reqs[cookie] = ("r", first, n, floor)
                    out += proto.pack_request(proto.CMD_READ, cookie, first * B, n * B)
            # sent while the replies are read (as a real client does: the server's replies
            # must not wait for the client to finish sending)
            sender = threading.Thread(target=c.s.sendall, args=(out,))
            sender.start()
            for _ in range(len(reqs)):
                cookie, err, chunks = c.reply()
                assert err == 0, (cookie, err)
                r = reqs.pop(cookie)
                if r[0] == "w":
                    _, first, n, v = r
                    with lock:
                        for b in range(first, first + n):
                            acked[b] = max(acked[b], v)
                elif r[0] == "r":
                    _, first, n, floor = r
                    got = _decode(chunks_to_bytes(first * B, n * B, chunks), first)
                    for i, (v, f) in enumerate(zip(got, floor)):
                        assert v >= f, (f"block {first + i}: read version {v} after version "
                                        f"{f} was acknowledged")
            sender.join()
            assert not reqs
        c.request(proto.CMD_DISC, 0, 0)
    except BaseException as e:  # noqa: BLE001  (reported by the main thread)
        errors.append(e)
    finally:
        c.close()


def test_reads_see_acknowledged_writes_across_connections(tmp_path, monkeypatch):
    base, top = str(tmp_path / "base.raw"), str(tmp_path / "top.qcow2")
    with open(base, "wb") as f:
        f.write(b"".join(_pattern(b, 0) for b in range(NBLOCKS)))
    qemu.create(top, SIZE, backing="base.raw", backing_fmt="raw")
    served = [0]
    real = nbd_conn.nbd_serve_reads

    def counting(*a):  # type: ignore[no-untyped-def]
        r = real(*a)
        served[0] += r[2]
        return r

    monkeypatch.setattr(nbd_conn, "nbd_serve_reads", counting)
    sock = str(tmp_path / "nbd.sock")
    img = engine.open(top)
    srv = Server([Export("", img)], socket_path=sock)
    srv.start()
    acked = [0] * NBLOCKS
    lock = threading.Lock()
    errors: list[BaseException] = []
    try:
        threads = [threading.Thread(target=_worker, args=(sock, i, 11 + i, acked, lock, errors))
                   for i in range(CONNS)]
        for t in threads:
            t.start()
        _join_and_look(sock, threads, errors, acked)
        # the requests of this writable export went through the engine's loop
        assert served[0] > 0
    finally:
        srv.close()
    qemu.assert_qemu_clean(top)


def _rewrite_fixture(tmp_path):  # type: ignore[no-untyped-def]
    path = str(tmp_path / "d.qcow2")
    qemu.create(path, SIZE)
    qemu.qemu_io(path, "write -P 0x5a 0 1M")
    return path


def test_in_place_write_takes_a_whole_payload_only(tmp_path):
    """nbd_recv_write: a rewrite of an owned cluster is taken from the buffer and the
    socket straight into the image; a payload not wholly arrived, a cluster not yet
    allocated (copy-up), or a range across two clusters is left to the buffered path with
    nothing consumed and nothing written."""
    path = _rewrite_fixture(tmp_path)
    with engine.open(path) as img:
        a, b = socket.socketpair()
        buf = bytearray(1 << 16)
        buf[:1000] = b"\x01" * 1000                 # the payload's first bytes, buffered
        b.sendall(b"\x01" * (B - 1000))
        assert nbd_recv_write(img._core, a.fileno(), buf, 0, 1000, 8192, B) == (0, 0, True)
        assert img.read(8192, B) == b"\x01" * B
        assert img.read(8192 - 1, 1) == b"\x5a" and img.read(8192 + B, 1) == b"\x5a"
        # half a payload: nothing taken, the bytes stay where they were
        b.sendall(b"\x02" * 1000)
        buf[:500] = b"\x02" * 500
        assert nbd_recv_write(img._core, a.fileno(), buf, 0, 500, 0, B) == (0, 500, False)
        assert img.read(0, B) == b"\x5a" * B
        assert a.recv(4096) == b"\x02" * 1000
        # whole payloads the ordinary path must take
        buf[:B] = b"\x03" * B
        for offset in (2 * MiB, 64 * 1024 - 100):        # unallocated; two clusters
            assert nbd_recv_write(img._core, a.fileno(), buf, 0, B, offset, B) == \
                (0, B, False)
        assert img.read(2 * MiB, B) == bytes(B)
        a.close()
        b.close()
    qemu.assert_qemu_clean(path)


def test_disconnect_mid_write_payload_leaves_the_image(tmp_path):
    """A client that sends a small rewrite's header and part of its payload, then hangs up:
    the image reads as before and checks clean."""
    path = _rewrite_fixture(tmp_path)
    sock = str(tmp_path / "nbd.sock")
    img = engine.open(path)
    before = img.read(0, SIZE)
    srv = Server([Export("", img)], socket_path=sock)
    srv.start()
    try:
        for sent in (0, 1, 2000, B - 1):
            c = Client(sock)
            c.go()
            c.s.sendall(proto.pack_request(proto.CMD_WRITE, 1, 4096, B) + b"\x77" * sent)
            time.sleep(0.05)
            c.close()
        c = Client(sock)
        c.go()
        assert c.read(0, SIZE) == before
        c.close()
    finally:
        srv.close()
    qemu.assert_qemu_clean(path)
    with engine.open(path, readonly=True) as img2:
        assert img2.read(0, SIZE) == before


def test_live_snapshots_while_clients_read_and_write(tmp_path):
    """The same clients against a repository chain while the server takes three live
    snapshots (each switches the export to a new, empty leaf between two requests): reads
    still see every acknowledged write, rewrites after a switch copy up into the new leaf,
    and the repository and every volume check clean."""
    repo_dir = str(tmp_path / "repo")
    with Repository.create(repo_dir) as r:
        r.create_chain("vm", SIZE).write(0, b"".join(_pattern(b, 0) for b in range(NBLOCKS)))
    acked = [0] * NBLOCKS
    lock = threading.Lock()
    errors: list[BaseException] = []
    sock = str(tmp_path / "nbd.sock")
    with Repository.open(repo_dir) as r:
        c = r.chain("vm")
        c.read(0, 0)
        srv = Server([Export("", c, close=False)], socket_path=sock)
        srv.start()
        try:
            threads = [threading.Thread(target=_worker,
                                        args=(sock, i, 31 + i, acked, lock, errors, 60))
                       for i in range(CONNS)]
            for t in threads:
                t.start()
            snaps = []
            for _ in range(3):
                time.sleep(0.2)
                snaps.append(srv.snapshot("vm", "live"))
            assert all(t.is_alive() for t in threads), "the snapshots came after the clients"
            _join_and_look(sock, threads, errors, acked)
        finally:
            srv.close()
        assert len({s.id for s in snaps}) == 3
        assert _decode(c.read(0, SIZE), 0) == acked
        assert r.check().ok
        paths = [v.path for v in c.volumes if v.format == "qcow2"]
    for path in paths:
        qemu.assert_qemu_clean(path if path.startswith("/") else f"{repo_dir}/{path}")


def test_serve_loop_takes_rewrites_in_place(tmp_path):
    """nbd_serve_reads with writes: a run of small WRITEs that rewrite owned clusters and
    READs is served in order (a read after a write sees it), the writes' replies leave
    before the reads' and carry their cookies; it stops before a write that needs copy-up
    (left whole in the buffer for the ordinary path)."""
    path = _rewrite_fixture(tmp_path)

    def req(t: int, offset: int, length: int, cookie: int) -> bytes:
        return proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, t, cookie, offset, length)

    with engine.open(path) as img:
        stream = (req(proto.CMD_WRITE, 4096, 512, 0xAAAA) + b"\x61" * 512
                  + req(proto.CMD_WRITE, 70000, 100, 0xBBBB) + b"\x62" * 100
                  + req(proto.CMD_READ, 4000, 1024, 0xCCCC))
        tail = req(proto.CMD_WRITE, 2 * MiB, 512, 0xDDDD) + b"\x63" * 512
        buf = bytearray(1 << 16)
        buf[:len(stream + tail)] = stream + tail
        a, b = socket.socketpair()
        start, end, served, err = nbd_serve_reads(img._core, a.fileno(), buf, 0,
                                                  len(stream + tail), img.size, 0, 65536,
                                                  32 * MiB, 64, True)
        assert (served, err) == (3, 0)
        assert bytes(buf[start:end]) == tail
        got = b""
        b.settimeout(5)
        while len(got) < 16 * 3 + 1024:
            got += b.recv(65536)
        replies = [proto.SIMPLE_REPLY.unpack(got[i:i + 16]) for i in (0, 16, 32)]
        assert [r[2] for r in replies] == [0xAAAA, 0xBBBB, 0xCCCC]
        assert all(r[:2] == (proto.SIMPLE_REPLY_MAGIC, 0) for r in replies)
        assert got[48:] == b"\x5a" * 96 + b"\x61" * 512 + b"\x5a" * 416
        assert img.read(70000, 100) == b"\x62" * 100
        assert img.read(2 * MiB, 512) == bytes(512)       # the copy-up write: not taken
        a.close()
        b.close()
    qemu.assert_qemu_clean(path)
