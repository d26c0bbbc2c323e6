"""Hostile NBD clients, over raw sockets, against an in-process :class:`engine.nbd.Server`.

Every case ends in the protocol's error reply (the connection going on) or a closed
connection: never a crash, never a hang of another connection, never a change to the image.
After each case a well-behaved client on a second connection must still be served, and the
image must hold what it held before (its file hash for refused writes, ``qemu-img check``
clean at the end). The suite prints one summary line ("nbd: ...").
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
import threading
import time

import pytest

import engine
import qemu
from engine.nbd import Export, Server, proto
from reliability import summary

MiB = 1 << 20
SIZE = 8 * MiB
SEED = 3

_TOTAL = {"cases": 0, "refused": 0, "closed": 0, "served_after": 0, "fuzzed": 0}


def _publish() -> str:
    t = _TOTAL
    return summary.publish(
        "nbd", f"{t['cases']} hostile-client cases ({t['refused']} refused with the "
               f"protocol's error, {t['closed']} closed connections) — 0 crashes, 0 hangs of "
               f"other connections, 0 image changes; a second client served after each "
               f"({t['served_after']} checks); {t['fuzzed']} random requests fuzzed")


def chunks_to_bytes(offset: int, length: int, chunks: list[tuple[int, bytes]]) -> bytes:
    """The bytes of a structured READ reply's chunks (holes read as zeros)."""
    out = bytearray(length)
    for ctype, data in chunks:
        if ctype == proto.REPLY_TYPE_OFFSET_DATA:
            off = struct.unpack(">Q", data[:8])[0] - offset
            out[off:off + len(data) - 8] = data[8:]
    return bytes(out)


class Client:
    """A bare NBD client: the handshake and requests as bytes, nothing checked for us."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = self.s.recv(n - len(out))
            if not got:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += got
        return out

    def closed(self) -> bool:
        """True when the server has closed the connection (EOF within the timeout)."""
        try:
            while True:
                if not self.s.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def greet(self) -> None:
        magic, opt, flags = proto.GREETING.unpack(self.recv(18))
        assert (magic, opt) == (proto.NBDMAGIC, proto.IHAVEOPT)
        assert flags & proto.FLAG_FIXED_NEWSTYLE
        self.s.sendall(proto.CLIENT_FLAGS.pack(proto.FLAG_C_FIXED_NEWSTYLE
                                               | proto.FLAG_C_NO_ZEROES))

    def option(self, option: int, data: bytes = b"") -> None:
        self.s.sendall(proto.OPTION_HEADER.pack(proto.IHAVEOPT, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, rtype, ln = proto.OPTION_REPLY.unpack(self.recv(20))
        assert magic == proto.OPT_REPLY_MAGIC
        return option, rtype, self.recv(ln)

    def go(self, name: str = "", structured: bool = True, contexts: tuple[str, ...] = ()) -> int:
        """Negotiate to transmission; returns the transmission flags."""
        self.greet()
        if structured:
            self.option(proto.OPT_STRUCTURED_REPLY)
            assert self.option_reply()[1] == proto.REP_ACK
        if contexts:
            q = b"".join(struct.pack(">I", len(c)) + c.encode() for c in contexts)
            self.option(proto.OPT_SET_META_CONTEXT, struct.pack(">I", len(name)) + name.encode()
                        + struct.pack(">I", len(contexts)) + q)
            while self.option_reply()[1] != proto.REP_ACK:
                pass
        self.option(proto.OPT_GO, struct.pack(">I", len(name)) + name.encode()
                    + struct.pack(">H", 0))
        tflags = None
        while True:
            _, rtype, data = self.option_reply()
            if rtype == proto.REP_ACK:
                break
            assert rtype == proto.REP_INFO, rtype
            if struct.unpack(">H", data[:2])[0] == proto.INFO_EXPORT:
                tflags = struct.unpack(">QH", data[2:])[1]
        assert tflags is not None
        return tflags

    def request(self, ctype: int, offset: int, length: int, flags: int = 0,
                cookie: int = 1, payload: bytes = b"") -> None:
        self.s.sendall(proto.pack_request(ctype, cookie, offset, length, flags) + payload)

    def reply(self) -> tuple[int, int, list[tuple[int, bytes]]]:
        """(cookie, error, [(chunk type, payload)...]) of one reply, simple or structured."""
        magic = struct.unpack(">I", self.recv(4))[0]
        if magic == proto.SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", self.recv(12))
            return cookie, err, []
        assert magic == proto.STRUCTURED_REPLY_MAGIC, hex(magic)
        chunks, err = [], 0
        while True:
            flags, ctype, cookie, ln = struct.unpack(">HHQI", self.recv(16))
            data = self.recv(ln)
            chunks.append((ctype, data))
            if ctype & (1 << 15):
                err = struct.unpack(">I", data[:4])[0]
            if flags & proto.REPLY_FLAG_DONE:
                return cookie, err, chunks
            magic = struct.unpack(">I", self.recv(4))[0]

    def read(self, offset: int, length: int) -> bytes:
        self.request(proto.CMD_READ, offset, length)
        _, err, chunks = self.reply()
        assert err == 0, err
        return chunks_to_bytes(offset, length, chunks)

    def close(self) -> None:
        self.s.close()


@pytest.fixture
def image(tmp_path):
    rng = random.Random(SEED)
    path = str(tmp_path / "disk.qcow2")
    qemu.create(path, SIZE)
    qemu.qemu_io(path, *[f"write -P {rng.randrange(1, 255)} {rng.randrange(0, 120) * 65536} "
                         f"{rng.choice([4096, 65536, 200000])}" for _ in range(20)])
    return path


def _hash(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def served(image, tmp_path):
    """(server, socket path, image path, expected disk bytes): a read-write export."""
    sock = str(tmp_path / "nbd.sock")
    img = engine.open(image)
    expected = img.read(0, SIZE)
    srv = Server([Export("", img)], socket_path=sock, max_connections=8,
                 handshake_timeout=2.0, max_options=64, max_inflight_bytes=8 * MiB)
    srv.start()
    yield srv, sock, image, expected
    srv.close()
    qemu.assert_qemu_clean(image)


def _outcome(kind: str) -> None:
    _TOTAL["cases"] += 1
    _TOTAL[kind] += 1


def _second_client_ok(sock: str, expected: bytes) -> None:
    c = Client(sock)
    c.go()
    off = random.Random(SEED).randrange(0, SIZE - 70000)
    assert c.read(off, 70000) == expected[off:off + 70000]
    c.request(proto.CMD_DISC, 0, 0)
    assert c.closed()
    c.close()
    _TOTAL["served_after"] += 1
    print("\n" + _publish())


def _refused(c: Client, want: int, cookie: int = 1) -> None:
    got_cookie, err, _ = c.reply()
    assert (got_cookie, err) == (cookie, want)
    _outcome("refused")


@pytest.mark.parametrize("case", [
    "oversized_read", "past_end_read", "past_end_write", "past_end_zero", "past_end_trim",
    "offset_overflow", "unknown_command", "bad_flags", "df_without_structured",
    "status_without_context", "zero_length_status"])
def test_refused_requests_keep_the_connection(served, case):
    srv, sock, path, expected = served
    c = Client(sock)
    c.go(structured=case != "df_without_structured")
    if case == "oversized_read":
        c.request(proto.CMD_READ, 0, proto.MAX_PAYLOAD + 1)
        _refused(c, proto.EINVAL)
    elif case == "past_end_read":
        c.request(proto.CMD_READ, SIZE - 10, 11)
        _refused(c, proto.EINVAL)
    elif case == "past_end_write":
        c.request(proto.CMD_WRITE, SIZE - 10, 4096, payload=b"\xee" * 4096)
        _refused(c, proto.ENOSPC)
    elif case == "past_end_zero":
        c.request(proto.CMD_WRITE_ZEROES, SIZE, 1)
        _refused(c, proto.ENOSPC)
    elif case == "past_end_trim":
        c.request(proto.CMD_TRIM, 0, SIZE + 65536)
        _refused(c, proto.EINVAL)
    elif case == "offset_overflow":
        c.request(proto.CMD_READ, (1 << 64) - 512, 4096)
        _refused(c, proto.EINVAL)
    elif case == "unknown_command":
        c.request(99, 0, 4096)
        _refused(c, proto.EINVAL)
    elif case == "bad_flags":
        c.request(proto.CMD_WRITE, 0, 512, flags=proto.CMD_FLAG_REQ_ONE, payload=b"\xee" * 512)
        _refused(c, proto.EINVAL)
    elif case == "df_without_structured":
        c.request(proto.CMD_READ, 0, 512, flags=proto.CMD_FLAG_DF)
        _refused(c, proto.EINVAL)
    elif case == "status_without_context":
        c.request(proto.CMD_BLOCK_STATUS, 0, 4096)
        _refused(c, proto.EINVAL)
    elif case == "zero_length_status":
        c.close()
        c = Client(sock)
        c.go(contexts=(proto.CONTEXT_BASE_ALLOCATION,))
        c.request(proto.CMD_BLOCK_STATUS, 0, 0)
        _refused(c, proto.EINVAL)
    # the same connection still serves
    assert c.read(4096, 8192) == expected[4096:4096 + 8192]
    c.close()
    _second_client_ok(sock, expected)
    _assert_unchanged(path, expected)


def _assert_unchanged(path: str, expected: bytes) -> None:
    with engine.open(path, readonly=True, force_share=True) as img:
        assert img.read(0, SIZE) == expected


def test_read_only_export_refuses_writes_with_eperm(image, tmp_path):
    sock = str(tmp_path / "ro.sock")
    before = _hash(image)
    with Server([Export("", engine.open(image, readonly=True))], socket_path=sock) as srv:
        srv.start()
        c = Client(sock)
        tflags = c.go()
        assert tflags & proto.TF_READ_ONLY
        for cookie, (ctype, payload) in enumerate([(proto.CMD_WRITE, b"x" * 512),
                                                   (proto.CMD_TRIM, b""),
                                                   (proto.CMD_WRITE_ZEROES, b"")], 1):
            c.request(ctype, 0, 512, cookie=cookie, payload=payload)
            _refused(c, proto.EPERM, cookie)
        c.request(proto.CMD_FLUSH, 0, 0, cookie=9)
        assert c.reply()[:2] == (9, 0)
        c.close()
    assert _hash(image) == before


def test_misaligned_requests_are_served(served):
    """The export advertises a minimum block size of 1, as qemu-nbd 7.2 does for a qcow2
    image (README "Serving over NBD": why): odd offsets and lengths are served by every
    command, not refused, and what they write is exactly what reads back."""
    srv, sock, path, expected = served
    c = Client(sock)
    c.go()
    assert c.read(1, 3) == expected[1:4]
    c.request(proto.CMD_WRITE, 65535, 3, payload=b"abc")
    assert c.reply()[1] == 0
    assert c.read(65534, 5) == expected[65534:65535] + b"abc" + expected[65538:65539]
    c.request(proto.CMD_WRITE_ZEROES, 65535, 3, flags=proto.CMD_FLAG_FAST_ZERO)
    _refused(c, proto.ENOTSUP)     # would need data writes: FAST_ZERO fails at once
    c.request(proto.CMD_WRITE_ZEROES, 131073, 70001, cookie=5)
    assert c.reply()[:2] == (5, 0)
    c.request(proto.CMD_CACHE, 7, 100003, cookie=6)
    assert c.reply()[:2] == (6, 0)
    assert c.read(131071, 70005) == (expected[131071:131073] + bytes(70001)
                                     + expected[201074:201076])
    c.close()
    expected = (expected[:65535] + b"abc" + expected[65538:131073] + bytes(70001)
                + expected[201074:])
    _second_client_ok(sock, expected)


def test_oversized_write_closes_the_connection(served):
    srv, sock, path, expected = served
    c = Client(sock)
    c.go()
    c.request(proto.CMD_WRITE, 0, proto.MAX_PAYLOAD + 1, payload=b"\xee" * 65536)
    _, err, _ = c.reply()
    assert err == proto.EINVAL
    assert c.closed()
    _outcome("closed")
    _second_client_ok(sock, expected)


@pytest.mark.parametrize("case", ["bad_magic", "mid_payload", "mid_header"])
def test_broken_streams_close_only_their_connection(served, case):
    srv, sock, path, expected = served
    other = Client(sock)
    other.go()
    c = Client(sock)
    c.go()
    if case == "bad_magic":
        c.s.sendall(b"\x00" * 28)
        assert c.closed()
    elif case == "mid_payload":
        c.request(proto.CMD_WRITE, 0, MiB, payload=b"\xee" * (MiB // 2))
        c.s.shutdown(socket.SHUT_WR)
    else:
        c.s.sendall(proto.pack_request(proto.CMD_READ, 1, 0, 4096)[:13])
        c.s.shutdown(socket.SHUT_WR)
    assert c.closed()
    c.close()
    _outcome("closed")
    assert other.read(0, 4096) == expected[:4096]     # the other connection never noticed
    other.close()
    _second_client_ok(sock, expected)
    _assert_unchanged(path, expected)


@pytest.mark.parametrize("case", ["flood", "huge_option", "bad_client_flags", "silence",
                                  "export_name_unknown", "garbage_info", "starttls_no_tls"])
def test_hostile_negotiation(served, case):
    srv, sock, path, expected = served
    c = Client(sock)
    if case == "silence":
        c.recv(18)
        t = time.monotonic()
        assert c.closed()        # the handshake deadline (2 s here) ends it
        assert time.monotonic() - t < 9
    elif case == "bad_client_flags":
        c.recv(18)
        c.s.sendall(struct.pack(">I", 0xFFFF))
        assert c.closed()
    else:
        c.greet()
        if case == "flood":
            replies = 0
            try:
                for _ in range(1000):
                    c.option(200, b"")
                    assert c.option_reply()[1] == proto.REP_ERR_UNSUP
                    replies += 1
            except (EOFError, BrokenPipeError, ConnectionResetError):
                pass
            assert replies == 64          # max_options, then the server hung up
        elif case == "huge_option":
            c.s.sendall(proto.OPTION_HEADER.pack(proto.IHAVEOPT, proto.OPT_GO, 1 << 31))
            assert c.closed()
        elif case == "export_name_unknown":
            c.option(proto.OPT_EXPORT_NAME, b"nope")
            assert c.closed()
        elif case == "garbage_info":
            c.option(proto.OPT_GO, b"\xff\xff\xff\xff")          # name length past the end
            assert c.option_reply()[1] == proto.REP_ERR_INVALID
            c.option(proto.OPT_GO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
            assert c.option_reply()[1] == proto.REP_ERR_UNKNOWN
            c.option(proto.OPT_SET_META_CONTEXT, b"")
            assert c.option_reply()[1] == proto.REP_ERR_INVALID   # no structured replies
            c.option(proto.OPT_LIST, b"junk")
            assert c.option_reply()[1] == proto.REP_ERR_INVALID
            c.option(proto.OPT_ABORT)
            assert c.option_reply()[1] == proto.REP_ACK
        elif case == "starttls_no_tls":
            c.option(proto.OPT_STARTTLS)
            assert c.option_reply()[1] == proto.REP_ERR_POLICY     # no TLS configured
            c.s.sendall(b"\x16\x03\x01" + bytes(100))               # a ClientHello anyway
        assert c.closed()
    c.close()
    _outcome("closed")
    _second_client_ok(sock, expected)


def test_huge_block_status_is_bounded(tmp_path):
    """A 4 GiB block-status request over a disk of 2^16 alternating 512-byte clusters: one
    reply of at most 2^17 extents, covering no more than asked, never past the end."""
    path = str(tmp_path / "many.qcow2")
    qemu.create(path, 8 << 30, cluster_size=512)
    with engine.open(path) as img:
        n = 1 << 15
        img.writev([2 * i * 512 for i in range(n)], 512, b"\x01" * (512 * n))
    sock = str(tmp_path / "bs.sock")
    with Server([Export("", engine.open(path, readonly=True))], socket_path=sock) as srv:
        srv.start()
        c = Client(sock, timeout=60)
        c.go(contexts=(proto.CONTEXT_BASE_ALLOCATION, proto.CONTEXT_ALLOCATION_DEPTH))
        c.request(proto.CMD_BLOCK_STATUS, 0, 0xFFFFFFFF)
        _, err, chunks = c.reply()
        assert err == 0 and len(chunks) == 2
        for ctype, data in chunks:
            assert ctype == proto.REPLY_TYPE_BLOCK_STATUS
            pairs = struct.unpack(f">{(len(data) - 4) // 4}I", data[4:])
            lengths = pairs[0::2]
            assert 1 <= len(lengths) <= proto.MAX_EXTENTS
            assert sum(lengths[:-1]) < 0xFFFFFFFF
            assert len(lengths) >= 2 * n - 1        # the alternation is all there
        c.request(proto.CMD_BLOCK_STATUS, 0, 0xFFFFFFFF, flags=proto.CMD_FLAG_REQ_ONE,
                  cookie=2)
        _, err, chunks = c.reply()
        assert err == 0 and all(len(d) == 12 for _, d in chunks)
        c.request(proto.CMD_BLOCK_STATUS, (8 << 30) - 512, 0xFFFFFFFF, cookie=3)
        _refused(c, proto.EINVAL, 3)
        c.close()
    _outcome("refused")
    print("\n" + _publish())


def test_connection_limit(served):
    srv, sock, path, expected = served
    held = []
    for _ in range(srv.max_connections):
        c = Client(sock)
        c.recv(18)
        held.append(c)
    extra = Client(sock)
    assert extra.closed()            # accepted and closed at once, nothing sent
    extra.close()
    assert srv.refused >= 1
    held.pop().close()
    deadline = time.monotonic() + 10
    while srv.connections >= srv.max_connections:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for c in held:
        c.close()
    _outcome("closed")
    _second_client_ok(sock, expected)


def test_memory_per_connection_is_bounded(served):
    """A client that pipelines 64 MiB of 1 MiB reads and never reads the replies: the server
    queues at most max_inflight_bytes for it and stops reading; others are served."""
    srv, sock, path, expected = served
    c = Client(sock)
    c.go()
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    stop = threading.Event()

    def flood():
        try:
            for i in range(64):
                if stop.is_set():
                    return
                c.request(proto.CMD_READ, (i % 8) * MiB, MiB, cookie=i)
        except OSError:
            pass

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while srv.peak_inflight_bytes < MiB:       # the flood has reached the server (a reply waits)
        assert time.monotonic() < deadline, srv.peak_inflight_bytes
        time.sleep(0.05)
    time.sleep(0.5)
    _second_client_ok(sock, expected)
    assert srv.peak_inflight_bytes <= srv.max_inflight_bytes
    stop.set()
    c.close()
    t.join(10)
    _outcome("closed")


def test_shutdown_cuts_off_a_client_that_never_reads(image, tmp_path):
    """close() ends even while a client holds the server by never taking its replies (the
    reader waits on the memory bound, workers on the socket): past the grace period the
    connection is cut, the image is flushed and closed."""
    sock = str(tmp_path / "stuck.sock")
    srv = Server([Export("", engine.open(image))], socket_path=sock,
                 max_inflight_bytes=4 * MiB)
    srv.start()
    c = Client(sock)
    c.go()
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    c.s.settimeout(2)
    try:
        for i in range(64):
            c.request(proto.CMD_READ, (i % 8) * MiB, MiB, cookie=i)
    except OSError:
        pass                              # the server stopped reading: the send buffer is full
    closer = threading.Thread(target=srv.close, kwargs={"grace": 0.5})
    closer.start()
    closer.join(30)
    assert not closer.is_alive(), "close() hung on a client that never reads"
    c.close()
    assert engine.open(image).close() is None        # the write lock is free again
    _outcome("closed")
    print("\n" + _publish())


def test_commands_map_to_the_engine(served):
    """What each command leaves in the image, read back through the engine: FUA writes,
    WRITE_ZEROES (FAST_ZERO on whole clusters, NO_HOLE keeping the allocation), TRIM, CACHE,
    DF reads, READ holes as OFFSET_HOLE chunks, and block status in both contexts."""
    srv, sock, path, expected = served
    c = Client(sock)
    tflags = c.go(contexts=(proto.CONTEXT_BASE_ALLOCATION, proto.CONTEXT_ALLOCATION_DEPTH))
    want = (proto.TF_SEND_FLUSH | proto.TF_SEND_FUA | proto.TF_SEND_TRIM | proto.TF_SEND_DF
            | proto.TF_SEND_WRITE_ZEROES | proto.TF_SEND_FAST_ZERO | proto.TF_CAN_MULTI_CONN
            | proto.TF_SEND_CACHE)
    assert tflags & want == want and not tflags & proto.TF_READ_ONLY
    C = 65536
    c.request(proto.CMD_WRITE, 2 * C, C, flags=proto.CMD_FLAG_FUA, payload=b"\x42" * C)
    assert c.reply()[1] == 0
    c.request(proto.CMD_WRITE_ZEROES, 4 * C, 2 * C, flags=proto.CMD_FLAG_FAST_ZERO)
    assert c.reply()[1] == 0
    c.request(proto.CMD_WRITE_ZEROES, 2 * C, C, flags=proto.CMD_FLAG_NO_HOLE)
    assert c.reply()[1] == 0
    c.request(proto.CMD_CACHE, 0, SIZE)
    assert c.reply()[1] == 0
    c.request(proto.CMD_READ, 0, 8 * C, flags=proto.CMD_FLAG_DF)
    _, err, chunks = c.reply()
    assert err == 0 and [t for t, _ in chunks] == [proto.REPLY_TYPE_OFFSET_DATA]
    c.request(proto.CMD_READ, 4 * C, 2 * C)          # zeros: one hole chunk, no data
    _, err, chunks = c.reply()
    assert err == 0 and chunks == [(proto.REPLY_TYPE_OFFSET_HOLE,
                                    struct.pack(">QI", 4 * C, 2 * C))]
    c.request(proto.CMD_BLOCK_STATUS, 4 * C, 2 * C)
    _, err, chunks = c.reply()
    status = {struct.unpack(">I", d[:4])[0]: struct.unpack(">II", d[4:12]) for _, d in chunks}
    assert status[1] == (2 * C, proto.STATE_HOLE | proto.STATE_ZERO)
    assert status[2] == (2 * C, 1)                   # zero clusters owned by the top layer
    c.request(proto.CMD_TRIM, 6 * C, C)
    assert c.reply()[1] == 0
    c.request(proto.CMD_FLUSH, 0, 0)
    assert c.reply()[1] == 0
    c.close()
    with engine.open(path, readonly=True, force_share=True) as img:
        assert img.read(2 * C, C) == bytes(C) and img.read(4 * C, 2 * C) == bytes(2 * C)
        kept, _, zeroed, trimmed = img.extents(2 * C, 5 * C)
    assert (kept.start, kept.zero, kept.offset is not None) == (2 * C, True, True)   # NO_HOLE
    assert (zeroed.start, zeroed.zero, zeroed.present, zeroed.offset) == (4 * C, True, True,
                                                                         None)
    assert (trimmed.start, trimmed.present) == (6 * C, False)


def test_random_requests_fuzz(image, tmp_path):
    """Seeded random request headers (any type, flags, offset and length, now and then a
    bad magic or a DISC) on a read-only export: each gets a reply or a closed connection,
    the server keeps serving new clients, and the file does not change."""
    rng = random.Random(SEED)
    sock = str(tmp_path / "fuzz.sock")
    before = _hash(image)
    with engine.open(image, readonly=True) as img:
        expected = img.read(0, SIZE)
    offsets = [0, 1, 511, SIZE - 1, SIZE, SIZE + 1, (1 << 63), (1 << 64) - 1]
    lengths = [0, 1, 512, 4096, 65536, SIZE, (1 << 32) - 1, proto.MAX_PAYLOAD + 1]
    replies = closes = 0
    with Server([Export("", engine.open(image, readonly=True))], socket_path=sock,
                max_options=16) as srv:
        srv.start()
        c = None
        for i in range(300):
            if c is None:
                c = Client(sock)
                structured = rng.random() < 0.8
                c.go(structured=structured,
                     contexts=(proto.CONTEXT_BASE_ALLOCATION,)
                     if structured and rng.random() < 0.5 else ())
            ctype = rng.choice([0, 0, 1, 3, 4, 5, 6, 7, 7, 8, 99, 2])
            offset = rng.choice(offsets + [rng.randrange(SIZE)])
            length = rng.choice(lengths + [rng.randrange(1, 1 << 20)])
            payload = b""
            if ctype == proto.CMD_WRITE and length <= proto.MAX_PAYLOAD:
                length = min(length, 1 << 20)
                payload = bytes([i % 256]) * length
            head = proto.pack_request(ctype, i, offset, length, rng.randrange(0, 64))
            if rng.random() < 0.03:
                head = b"\xde\xad" + head[2:]
            try:
                c.s.sendall(head + payload)
                cookie, err, _ = c.reply()
                assert cookie == i
                replies += 1
            except (EOFError, ConnectionResetError, BrokenPipeError):
                c.close()
                c = None
                closes += 1
        if c is not None:
            c.close()
        _second_client_ok(sock, expected)
    assert _hash(image) == before
    assert replies > 200 and closes > 0
    _TOTAL["fuzzed"] += replies + closes
    print("\n" + _publish())
