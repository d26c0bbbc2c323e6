"""The engine's READ reply path for the NBD server (``engine._core.nbd_send_read``).

A reply built from the mappings of the owning layers must say exactly what ``readinto`` says,
in each reply form (simple, structured with holes, structured with one data chunk); ranges it
cannot serve from the mappings (compressed clusters) are refused with nothing sent; and a
client that stops taking its replies must not hold the engine's lock (a write on another
thread completes while the reply waits for the socket).
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading

import pytest

import engine
from engine._core import nbd_send_read, nbd_serve_reads
from engine.nbd import proto

MiB = 1 << 20
C = 65536


def _qemu_io(path: str, *cmds: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run(argv + [path], check=True, capture_output=True)


@pytest.fixture
def chain(tmp_path):
    """base: data at [0, 1M); mid: data [256K, 320K), a zero cluster at 512K; top: data at
    [64K, 128K) and [2M, 2M+64K); the rest (2M+64K .. 4M) allocated nowhere."""
    base, mid, top = (str(tmp_path / n) for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "4M"], check=True)
    _qemu_io(base, "write -P 0x11 0 1M")
    for lower, upper in ((base, mid), (mid, top)):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b",
                        lower.rsplit("/", 1)[1], "-F", "qcow2", upper], check=True)
    _qemu_io(mid, "write -P 0x22 256k 64k", "write -z 512k 64k")
    _qemu_io(top, "write -P 0x33 64k 64k", "write -P 0x44 2M 64k")
    return top


def _recv(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = s.recv(n - len(out))
        assert got, "the reply ended early"
        out += got
    return bytes(out)


def _read_reply(s: socket.socket, offset: int, length: int, structured: bool
                ) -> tuple[bytes, list[int]]:
    """The data a reply carries (holes filled with zeros) and its chunk types in order."""
    if not structured:
        magic, err, _ = proto.SIMPLE_REPLY.unpack(_recv(s, proto.SIMPLE_REPLY.size))
        assert (magic, err) == (proto.SIMPLE_REPLY_MAGIC, 0)
        return _recv(s, length), []
    buf = bytearray(length)
    kinds: list[int] = []
    covered = 0
    while True:
        magic, flags, kind, _, n = proto.CHUNK.unpack(_recv(s, proto.CHUNK.size))
        assert magic == proto.STRUCTURED_REPLY_MAGIC
        payload = _recv(s, n)
        kinds.append(kind)
        (start,) = struct.unpack(">Q", payload[:8])
        if kind == proto.REPLY_TYPE_OFFSET_DATA:
            data = payload[8:]
        else:
            assert kind == proto.REPLY_TYPE_OFFSET_HOLE
            (size,) = struct.unpack(">I", payload[8:12])
            data = bytes(size)
        buf[start - offset:start - offset + len(data)] = data
        covered += len(data)
        if flags & proto.REPLY_FLAG_DONE:
            break
    assert covered == length
    return bytes(buf), kinds


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("offset,length", [(0, 4 * MiB), (60 * 1024, 200 * 1024),
                                           (3 * MiB + 5, 1000), (2 * MiB - 7, 64 * 1024 + 9)])
def test_reply_matches_readinto(chain, mode, offset, length):
    with engine.open(chain, readonly=True) as img:
        expected = bytearray(length)
        img.readinto(offset, expected)
        a, b = socket.socketpair()
        got: list = []
        t = threading.Thread(target=lambda: got.append(_read_reply(b, offset, length,
                                                                   mode != 0)))
        t.start()
        assert nbd_send_read(img._core, a.fileno(), offset, length, 7, mode) is True
        t.join(10)
        data, kinds = got[0]
        assert data == bytes(expected)
        if mode == 2:
            assert kinds == [proto.REPLY_TYPE_OFFSET_DATA]        # DF: one data chunk
        if mode == 1 and (offset, length) == (0, 4 * MiB):
            # the zero cluster and the unallocated tail travel as holes, not as bytes
            assert proto.REPLY_TYPE_OFFSET_HOLE in kinds
        a.close()
        b.close()


def test_compressed_clusters_are_left_to_the_buffered_path(tmp_path):
    raw, comp = str(tmp_path / "d.raw"), str(tmp_path / "c.qcow2")
    with open(raw, "wb") as f:
        f.write(bytes(range(256)) * 4096)
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, comp],
                   check=True)
    with engine.open(comp, readonly=True) as img:
        a, b = socket.socketpair()
        assert nbd_send_read(img._core, a.fileno(), 0, C, 1, 1) is False
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)                                      # nothing was sent
        a.close()
        b.close()


def test_a_client_that_does_not_read_holds_no_engine_lock(chain):
    """The reply is larger than the socket takes; until the client reads, the sender waits,
    but a write to the same image (which needs the engine's exclusive lock) completes."""
    with engine.open(chain) as img:
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sent = threading.Event()

        def send() -> None:
            nbd_send_read(img._core, a.fileno(), 0, 4 * MiB, 9, 0)
            sent.set()

        t = threading.Thread(target=send, daemon=True)
        t.start()
        wrote = threading.Event()
        w = threading.Thread(target=lambda: (img.write(3 * MiB, b"\x55" * C), wrote.set()),
                             daemon=True)
        w.start()
        assert wrote.wait(10), "a write waited for a client that does not read"
        assert not sent.is_set()
        data, _ = _read_reply(b, 0, 4 * MiB, False)
        t.join(10)
        assert sent.is_set()
        assert data[:C] == b"\x11" * C and data[C:2 * C] == b"\x33" * C
        a.close()
        b.close()


def _req(t: int, offset: int, length: int, cookie: int, flags: int = 0) -> bytes:
    return proto.REQUEST.pack(proto.REQUEST_MAGIC, flags, t, cookie, offset, length)


@pytest.mark.parametrize("readonly", [True, False])
def test_serve_reads_stops_before_what_it_does_not_serve(chain, readonly):
    """The engine's loop, on a read-only and on a writable top layer alike: plain reads of
    any size are answered from the buffer in order (a read shorter than SPARSE_MIN as one
    data chunk); it stops before anything else (here a WRITE header, then a read with a
    flag) and leaves that request in the buffer for the connection."""
    with engine.open(chain, readonly=readonly) as img:
        expected = bytearray(4 * MiB)
        img.readinto(0, expected)
        stream = (_req(proto.CMD_READ, 0, C, 1) + _req(proto.CMD_READ, 2 * MiB, 2 * MiB, 2)
                  + _req(proto.CMD_READ, 3 * MiB + 7, 512, 3)
                  + _req(proto.CMD_WRITE, 0, 512, 4)
                  + _req(proto.CMD_READ, 0, 512, 5, proto.CMD_FLAG_DF))
        buf = bytearray(1 << 16)
        buf[:28] = stream[:28]                     # one request buffered, the rest to recv
        a, b = socket.socketpair()
        b.sendall(stream[28:])
        got: list = []
        t = threading.Thread(target=lambda: got.extend(
            [_read_reply(b, 0, C, True), _read_reply(b, 2 * MiB, 2 * MiB, True),
             _read_reply(b, 3 * MiB + 7, 512, True)]))
        t.start()
        start, end, served, err = nbd_serve_reads(img._core, a.fileno(), buf, 0, 28,
                                                  img.size, 1, C, 32 * MiB, 64)
        t.join(10)
        assert (served, err) == (3, 0)
        assert bytes(buf[start:end]) == stream[84:]       # the WRITE and the DF read
        assert got[0][0] == bytes(expected[:C])
        assert got[1][0] == bytes(expected[2 * MiB:])
        assert proto.REPLY_TYPE_OFFSET_HOLE in got[1][1]  # the unallocated tail
        assert got[2] == (bytes(expected[3 * MiB + 7:3 * MiB + 519]),
                          [proto.REPLY_TYPE_OFFSET_DATA])  # small: one data chunk
        a.close()
        b.close()


def test_serve_reads_batches_replies_in_one_send(chain):
    """Reads that arrived together are answered together (one sendmsg per batch): the
    replies of 40 small reads on a writable image (and only they) are on the socket after
    one call, in request order, each matching readinto."""
    with engine.open(chain) as img:
        expected = bytearray(4 * MiB)
        img.readinto(0, expected)
        offs = [(i * 97 * 1024 + i) % (4 * MiB - 4096) for i in range(40)]
        stream = b"".join(_req(proto.CMD_READ, o, 4096, 100 + i) for i, o in enumerate(offs))
        buf = bytearray(1 << 16)
        buf[:len(stream)] = stream
        a, b = socket.socketpair()
        start, end, served, err = nbd_serve_reads(img._core, a.fileno(), buf, 0, len(stream),
                                                  img.size, 0, C, 32 * MiB, 64)
        assert (served, err, start, end) == (40, 0, 0, 0)      # the buffer is drained
        for i, o in enumerate(offs):
            magic, e, cookie = proto.SIMPLE_REPLY.unpack(_recv(b, proto.SIMPLE_REPLY.size))
            assert (magic, e, cookie) == (proto.SIMPLE_REPLY_MAGIC, 0, 100 + i)
            assert _recv(b, 4096) == bytes(expected[o:o + 4096])
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)
        a.close()
        b.close()
