"""Socket I/O for the NBD server: exact reads through a receive buffer, whole sends.

``Wire`` wraps one connected socket. Reads are served from a 64 KiB receive buffer, so the
28-byte request headers of a pipelining client cost one ``recv`` for many of them; payloads
larger than what is buffered are received straight into their destination. Sends take a list
of buffers and put them on the socket with ``sendmsg`` (one system call for a reply's header
and data together, repeated only when the kernel takes less than all of it).
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import time
from typing import Any, Callable, Sequence


def unix_listener(path: str, backlog: int) -> socket.socket:
    """A Unix socket listening at PATH (an abstract name when it starts with NUL); an old
    socket file at PATH is replaced, any other file is left alone (bind then fails: OSError)."""
    if not path.startswith("\0"):
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class Disconnected(Exception):
    """The peer closed the connection (or it broke) before a whole message arrived."""


#: At most this many buffers per sendmsg call (Linux's IOV_MAX is 1024).
_IOV_MAX = 1000


class Wire:
    """One connected socket. Reads happen on one thread; ``send`` callers serialise
    themselves (the connection's send lock)."""

    def __init__(self, sock: socket.socket, bufsize: int = 64 << 10):
        self.sock = sock
        self._buf = bytearray(bufsize)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self.deadline: float | None = None
        self.tls = isinstance(sock, ssl.SSLSocket)

    def _recv_into(self, view: memoryview) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise Disconnected("the client took too long")
            self.sock.settimeout(left)
        try:
            n = self.sock.recv_into(view)
        except (TimeoutError, socket.timeout):
            raise Disconnected("the client took too long") from None
        except OSError as e:
            raise Disconnected(str(e)) from None
        if n == 0:
            raise Disconnected("the client closed the connection")
        return n

    @property
    def buffered(self) -> int:
        return self._end - self._start

    def peek(self, n: int) -> memoryview:
        """The next N bytes (N <= the buffer size), without consuming them."""
        if self._end - self._start < n:
            if self._start:
                k = self._end - self._start
                self._buf[:k] = self._buf[self._start:self._end]
                self._start, self._end = 0, k
            while self._end - self._start < n:
                self._end += self._recv_into(self._view[self._end:])
        return self._view[self._start:self._start + n]

    def run_on_buffer(self, fn: Callable[[bytearray, int, int], tuple[int, ...]]
                      ) -> tuple[int, ...]:
        """Let FN(buffer, start, end) take requests from the receive buffer (and receive more
        into it) itself: it returns the new (start, end, ...); the rest is returned."""
        start, end, *rest = fn(self._buf, self._start, self._end)
        self._start, self._end = (0, 0) if start == end else (start, end)
        return tuple(rest)

    def consume(self, n: int) -> None:
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0

    def read(self, n: int) -> bytes:
        """Exactly N bytes, as a new bytes object."""
        out = bytearray(n)
        self.read_into(memoryview(out))
        return bytes(out)

    def read_into(self, dest: memoryview) -> None:
        """Fill DEST exactly: buffered bytes first, then straight from the socket."""
        n = len(dest)
        k = min(n, self._end - self._start)
        if k:
            dest[:k] = self._view[self._start:self._start + k]
            self.consume(k)
        while k < n:
            if n - k < len(self._buf) // 4:
                # a small remainder: take it (and what follows) through the buffer
                got = self.peek(min(n - k, len(self._buf)))
                m = len(got)
                dest[k:k + m] = got
                self.consume(m)
                k += m
            else:
                k += self._recv_into(dest[k:])

    def skip(self, n: int) -> None:
        """Read and drop N bytes (a payload the server refuses)."""
        while n:
            got = self.peek(min(n, len(self._buf)))
            self.consume(len(got))
            n -= len(got)

    def send(self, buffers: Sequence[Any]) -> None:
        """Send every buffer, in order (one sendmsg while the kernel takes them whole).
        Buffers are bytes-like objects of unsigned bytes (bytes, bytearray, memoryviews of
        them)."""
        if self.tls:                                  # no sendmsg over TLS
            for b in buffers:
                self.sock.sendall(b)
            return
        bufs = list(buffers)
        while bufs:
            batch = bufs[:_IOV_MAX]
            sent = self.sock.sendmsg(batch)
            if sent == sum(map(len, batch)):
                bufs = bufs[len(batch):]
                continue
            # drop what went out, keep the rest of the partly sent buffer
            i = 0
            while sent >= len(batch[i]):
                sent -= len(batch[i])
                i += 1
            bufs = [memoryview(bufs[i])[sent:]] + bufs[i + 1:]
