"""The transmission phase of one connection (NBD protocol specification, ``doc/proto.md`` of
the NetworkBlockDevice/nbd project, section "Transmission phase").

One thread reads requests. Reads run on it at once: small ones are copied from the engine
into an arena and the replies of a batch leave in one ``sendmsg``; larger ones leave in one
``sendmsg`` built by the engine (``engine._core.nbd_send_read``): the reply's headers and the
pieces of the owning layers' mappings, no copy in between, ranges that read as zeros as
``OFFSET_HOLE`` chunks. A run of plain reads, on read-only and writable exports alike, is
served by the engine's own loop (``engine._core.nbd_serve_reads``: parse, look up, send the
replies of the reads that arrived together in one ``sendmsg``, without the GIL), which hands
back to this thread at the first other request; on a writable export the loop also takes a
WRITE under ``INPLACE_MAX`` that rewrites a cluster the top layer owns, straight into its
mapping once the whole payload has arrived. Other small writes without FUA run on the reader
too; everything else goes to the connection's worker threads, so several requests are in flight and replies leave in
completion order, matched by cookie. Each reply (header and data, or all chunks of a
structured reply) leaves whole under the connection's send lock. The engine releases the GIL
while it copies and sends, and the socket calls release it too, so the threads overlap.

Memory per connection is bounded: at most ``max_inflight`` requests and ``max_inflight_bytes``
payload bytes wait for a worker or for the socket (a read reply the client is slow to take is
copied out of the mapping, so no engine lock waits on a client); past that the reader stops
reading until replies go out.

Errors: a request the server refuses (bad flags, past the end, read-only export, too large)
gets the protocol's error value and the connection goes on; a broken request stream (bad
magic, a WRITE payload too large to read) ends the connection. An engine failure while serving
a request becomes EIO (or ENOSPC, EPERM, EINVAL when the engine error says so), never a crash.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine._core import nbd_batch_bytes, nbd_inplace_max, nbd_send_read, nbd_serve_reads
from engine.nbd import proto
from engine.nbd.export import CONTEXTS, Export, RequestError, nbd_error
from engine.nbd.handshake import ProtocolError, Session
from engine.nbd.wire import Disconnected, Wire

#: Reads and writes up to this size run on the reader thread (a copy costs less than a
#: handoff to a worker).
INLINE_MAX = 128 << 10
#: Writes shorter than this that rewrite one cluster the top layer owns are received straight
#: into its mapping (the engine's rule; larger ones go through a buffer and pwrite).
INPLACE_MAX = nbd_inplace_max
#: Reads at least this large ask the engine where the zeros are and send those as holes.
SPARSE_READ_MIN = 64 << 10
#: The reader's arena for the replies to a batch of small reads.
_ARENA = 1 << 20
#: The engine's loop answers at most this many bytes of reads in one sendmsg (a single
#: larger read goes alone).
_BATCH_BYTES = nbd_batch_bytes
#: Bytes of WRITE payload buffers kept for reuse per size class (at least one buffer).
_KEEP_PAYLOADS = 16 << 20
#: Read buffers up to this size are kept per thread and reused.
_KEEP_BUFFER = 2 << 20

_WRITES = (proto.CMD_WRITE, proto.CMD_TRIM, proto.CMD_WRITE_ZEROES)
_RANGED = (proto.CMD_READ, proto.CMD_WRITE, proto.CMD_TRIM, proto.CMD_WRITE_ZEROES,
           proto.CMD_CACHE, proto.CMD_BLOCK_STATUS)


class _Budget:
    """Requests and payload bytes in flight on one connection, with a ceiling for each."""

    def __init__(self, max_requests: int, max_bytes: int):
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.requests = self.bytes = self.peak = 0
        self.cond = threading.Condition()

    def take(self, nbytes: int, wait: bool = True) -> None:
        """Count a request of NBYTES in; with WAIT, first wait while the ceilings are
        reached (without: the caller is inside the export's gate, where waiting for requests
        that may be held at the gate could deadlock a live snapshot)."""
        with self.cond:
            while wait and self.requests and (self.requests >= self.max_requests
                                              or self.bytes + nbytes > self.max_bytes):
                self.cond.wait()
            self.requests += 1
            self.bytes += nbytes
            self.peak = max(self.peak, self.bytes)

    def give(self, nbytes: int) -> None:
        with self.cond:
            self.requests -= 1
            self.bytes -= nbytes
            self.cond.notify_all()


class Connection:
    """Serve transmission requests for one negotiated SESSION until DISC, EOF or error."""

    def __init__(self, session: Session, *, workers: int = 4, max_inflight: int = 64,
                 max_inflight_bytes: int = 64 << 20):
        if session.wire is None:
            raise ValueError("the session has no wire")
        self.wire: Wire = session.wire
        self.export: Export = session.export
        self.structured = session.structured
        self.contexts = session.contexts
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._budget = _Budget(max_inflight, max_inflight_bytes)
        self._send_lock = threading.Lock()
        self._local = threading.local()
        self._wbuf = bytearray(INLINE_MAX)
        self._free: dict[int, list[bytearray]] = {}        # WRITE payload buffers, by size
        self.broken = False
        # read replies go out from the engine's mappings, unless TLS must wrap them
        self._fd = -1 if self.wire.tls else self.wire.sock.fileno()

    @property
    def peak_inflight_bytes(self) -> int:
        """The most payload bytes this connection held queued for its workers at once."""
        return self._budget.peak

    # --- sending --------------------------------------------------------------------------

    def _send(self, buffers: list[Any]) -> None:
        if self.broken:
            return
        try:
            with self._send_lock:
                self.wire.send(buffers)
        except OSError:
            # the client is gone: stop reading too, so the connection winds down
            self.broken = True
            self.shutdown()

    def _ok(self, cookie: int) -> None:
        self._send([proto.simple_reply(cookie)])

    def _fail(self, cookie: int, error: int, message: str) -> None:
        if self.structured:
            self._send([proto.chunk_error(cookie, error, message)])
        else:
            self._send([proto.simple_reply(cookie, error)])

    def shutdown(self) -> None:
        """Stop reading requests (the ones in flight still get their replies)."""
        try:
            self.wire.sock.shutdown(0)      # SHUT_RD
        except OSError:
            pass

    # --- the request loop -----------------------------------------------------------------

    def serve(self) -> None:
        try:
            self._loop()
        except (Disconnected, ProtocolError):
            pass
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _loop(self) -> None:
        """Read requests until DISC. Plain reads and small rewrites go to the engine's loop
        (:meth:`_stream_reads`). Small writes (the common case of a pipelining client) that
        the engine's loop leaves here, and small reads over TLS, take a fast path on this
        thread: a read is copied from the engine into the next slice of a reader-owned
        arena, a write's payload is received into a reader-owned buffer and handed to the
        engine, and the replies of all the requests that arrived together leave in one
        sendmsg."""
        wire, ex = self.wire, self.export
        size, readinto, write = ex.size, ex.readinto, ex.disk.write
        enter, leave = ex.gate.enter, ex.gate.leave
        writable = not ex.readonly
        wbuf = memoryview(self._wbuf)
        arena = memoryview(bytearray(_ARENA))
        pending: list[Any] = []
        used = 0
        small = min(INLINE_MAX, SPARSE_READ_MIN - 1)
        structured = self.structured
        # plain reads are served by the engine's own loop, on read-only and writable exports
        # alike (not over TLS: its records are built here)
        streaming = self._fd >= 0
        while True:
            if pending and wire.buffered < proto.REQUEST.size:
                self._send(pending)         # nothing more has arrived: answer the batch
                pending, used = [], 0
            magic, flags, t, cookie, offset, length = proto.REQUEST.unpack(
                wire.peek(proto.REQUEST.size))
            if magic != proto.REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            if streaming and not flags and not self.broken and offset + length <= size and (
                    (t == proto.CMD_READ and 0 < length <= proto.MAX_PAYLOAD)
                    or (t == proto.CMD_WRITE and writable and 0 < length < INPLACE_MAX)):
                if pending:
                    self._send(pending)
                    pending, used = [], 0
                if self._stream_reads(length):
                    continue
            wire.consume(proto.REQUEST.size)
            is_read = t == proto.CMD_READ and not flags and 0 < length <= small \
                and offset + length <= size
            if is_read or (t == proto.CMD_WRITE and not flags and length <= INLINE_MAX
                           and writable and offset + length <= size):
                if not is_read:
                    wire.read_into(wbuf[:length])
                elif used + length > _ARENA:
                    self._send(pending)
                    pending, used = [], 0
                enter()
                try:
                    if is_read:
                        view = arena[used:used + length]
                        readinto(offset, view)
                        used += length
                        pending += [proto.data_reply_header(cookie, offset, length)
                                    if structured else proto.simple_reply(cookie), view]
                    else:
                        write(offset, wbuf[:length])
                        pending.append(proto.simple_reply(cookie))
                except Exception as e:      # noqa: BLE001  (an error reply, as below)
                    self._send(pending)
                    pending, used = [], 0
                    self._fail(cookie, nbd_error(e), str(e))
                finally:
                    leave()
                continue
            if pending:
                self._send(pending)
                pending, used = [], 0
            if t == proto.CMD_DISC:
                return
            self._dispatch(proto.Request(flags, t, cookie, offset, length))

    def _stream_reads(self, first: int) -> int:
        """Serve the plain READs at the head of the receive buffer in the engine's loop
        (``nbd_serve_reads``: parse, look up, send the replies of a batch in one sendmsg,
        without the GIL), and on a writable export the small WRITEs among them that rewrite
        a cluster the top layer owns (received straight into its mapping once the whole
        payload has arrived; a chain's write lease is checked when the run starts, and a
        run never waits); returns how many it served (0: the first one is for the ordinary
        path).

        Ordering with writes: a write's reply leaves only once the engine has applied it,
        and each batch of replies is built under the top layer's read lock, so a read that
        arrives after the client saw a write's reply sees the write. The loop runs inside
        the export's gate with the top layer of that moment (``Export.core``): a live
        snapshot waits for it to hand back (it never waits for the client to send more:
        it stops when no whole request is buffered), and the next run starts from the
        new leaf. A reply the socket does not take within the engine's short wait (a
        writable top layer's lock must not wait on a client) is copied out, one batch at a
        time, and sent after the lock is released: the run counts the most that can be
        (a batch, or the FIRST read alone when larger) in the connection's memory budget,
        and hands back at a read larger than that."""
        ex, wire, fd = self.export, self.wire, self._fd
        mode = 1 if self.structured else 0
        most = max(first, _BATCH_BYTES)
        self._budget.take(most, wait=False)
        ex.gate.enter()
        try:
            writes = not ex.readonly
            try:
                try:
                    core = ex.write_core() if writes else ex.core()
                except Exception:   # noqa: BLE001  (writes take the ordinary path, which
                    writes = False  # sends their error reply)
                    core = ex.core()
            except Exception:       # noqa: BLE001  (the ordinary path sends the error reply)
                return 0
            with self._send_lock:
                served, err = wire.run_on_buffer(lambda buf, start, end: nbd_serve_reads(
                    core, fd, buf, start, end, ex.size, mode, SPARSE_READ_MIN, most, 256,
                    writes))
        finally:
            ex.gate.leave()
            self._budget.give(most)
        if err:
            self.broken = True
            raise Disconnected(f"cannot send a reply: errno {err}")
        return served

    def _refusal(self, req: proto.Request) -> RequestError | None:
        """Why REQ cannot be served, checked before any payload is used."""
        ex = self.export
        valid = proto.CMD_VALID_FLAGS.get(req.type)
        if valid is None:
            return RequestError(proto.EINVAL, f"unknown command {req.type}")
        if not self.structured:
            valid &= ~proto.CMD_FLAG_DF
        if req.flags & ~valid:
            return RequestError(proto.EINVAL, f"flags {req.flags:#x} not valid for "
                                              f"{proto.CMD_NAMES[req.type]}")
        if req.type in _WRITES and ex.readonly:
            return RequestError(proto.EPERM, "the export is read-only")
        if req.type in _RANGED and req.offset + req.length > ex.size:
            err = proto.ENOSPC if req.type in (proto.CMD_WRITE, proto.CMD_WRITE_ZEROES) \
                else proto.EINVAL
            return RequestError(err, f"request [{req.offset}, +{req.length}) runs past the "
                                     f"end of the export ({ex.size} bytes)")
        if req.type == proto.CMD_READ and req.length > proto.MAX_PAYLOAD:
            return RequestError(proto.EINVAL, f"read of {req.length} bytes is over the "
                                              f"{proto.MAX_PAYLOAD}-byte limit")
        if req.type == proto.CMD_BLOCK_STATUS:
            if not self.contexts:
                return RequestError(proto.EINVAL, "no metadata context was negotiated")
            if req.length == 0:
                return RequestError(proto.EINVAL, "block status of zero bytes")
        return None

    def _dispatch(self, req: proto.Request) -> None:
        if req.type == proto.CMD_WRITE and req.length > proto.MAX_PAYLOAD:
            # the payload cannot be taken in; say why, then hang up (as qemu-nbd does)
            self._fail(req.cookie, proto.EINVAL, f"write of {req.length} bytes is over the "
                                                 f"{proto.MAX_PAYLOAD}-byte limit")
            raise ProtocolError("write payload too large")
        refusal = self._refusal(req)
        if refusal is not None:
            if req.type == proto.CMD_WRITE:
                self.wire.skip(req.length)
            self._fail(req.cookie, refusal.error, str(refusal))
            return
        inline = (req.type == proto.CMD_WRITE and req.length <= INLINE_MAX
                  and not req.flags & proto.CMD_FLAG_FUA) \
            or req.type in (proto.CMD_READ, proto.CMD_CACHE)
        payload: Any = None
        if inline:
            if req.type == proto.CMD_WRITE:
                payload = memoryview(self._wbuf)[:req.length]
                self.wire.read_into(payload)
            self._run(req, payload)
            return
        nbytes = req.length if req.type in (proto.CMD_READ, proto.CMD_WRITE) else 0
        self._budget.take(nbytes)
        try:
            if req.type == proto.CMD_WRITE:
                payload = self._payload(req.length)
                self.wire.read_into(payload)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, "cowchain-nbd")
            self._pool.submit(self._run_pooled, req, payload, nbytes)
        except BaseException:
            self._budget.give(nbytes)
            raise

    def _payload(self, n: int) -> memoryview:
        """A buffer for a WRITE payload of N bytes, from the free list of its size class
        (a power of two): a new buffer costs an mmap and a page fault per page."""
        size = 1 << max(n - 1, 1).bit_length()
        free = self._free.get(size)
        buf = free.pop() if free else bytearray(size)
        return memoryview(buf)[:n]

    def _run_pooled(self, req: proto.Request, payload: Any, nbytes: int) -> None:
        try:
            self._run(req, payload)
            if payload is not None:
                buf = payload.obj
                payload.release()
                free = self._free.setdefault(len(buf), [])
                if len(free) * len(buf) < _KEEP_PAYLOADS:
                    free.append(buf)
        finally:
            self._budget.give(nbytes)

    def _run(self, req: proto.Request, payload: Any) -> None:
        self.export.gate.enter()
        try:
            self._execute(req, payload)
        except Exception as e:      # noqa: BLE001  (every failure becomes an NBD error reply)
            self._fail(req.cookie, nbd_error(e), str(e))
        finally:
            self.export.gate.leave()

    # --- commands -------------------------------------------------------------------------

    def _execute(self, req: proto.Request, payload: Any) -> None:
        ex, t = self.export, req.type
        fua = bool(req.flags & proto.CMD_FLAG_FUA)
        if t == proto.CMD_READ:
            self._read(req)
            return
        if t == proto.CMD_WRITE:
            ex.write(req.offset, payload, fua)
        elif t == proto.CMD_FLUSH:
            ex.flush()
        elif t == proto.CMD_TRIM:
            ex.trim(req.offset, req.length, fua)
        elif t == proto.CMD_WRITE_ZEROES:
            ex.write_zeroes(req.offset, req.length,
                            no_hole=bool(req.flags & proto.CMD_FLAG_NO_HOLE),
                            fast=bool(req.flags & proto.CMD_FLAG_FAST_ZERO), fua=fua)
        elif t == proto.CMD_BLOCK_STATUS:
            self._block_status(req)
            return
        # CACHE: a hint with no effect on what reads return
        self._ok(req.cookie)

    def _buffer(self, n: int) -> memoryview:
        if n > _KEEP_BUFFER:
            return memoryview(bytearray(n))
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < n:
            buf = self._local.buf = bytearray(max(n, 64 << 10))
        return memoryview(buf)[:n]

    def _read(self, req: proto.Request) -> None:
        off, n, cookie = req.offset, req.length, req.cookie
        ex = self.export
        if n and self._fd >= 0:
            mode = 0 if not self.structured else 2 if req.flags & proto.CMD_FLAG_DF else 1
            # what the socket does not take soon is copied out: count it in the budget (one
            # reply at a time: reads run on the reader thread)
            self._budget.take(n, wait=False)
            try:
                with self._send_lock:
                    if self.broken:
                        return
                    # one sendmsg: headers, pieces of the owning layers' mappings, holes
                    if nbd_send_read(ex.core(), self._fd, off, n, cookie, mode):
                        return
            except OSError:
                self.broken = True
                self.shutdown()
                return
            finally:
                self._budget.give(n)
            # compressed clusters or a layer read with pread: through a buffer, below
        if not self.structured:
            buf = self._buffer(n)
            if n:
                ex.readinto(off, buf)
            self._send([proto.simple_reply(cookie), buf])
            return
        if n == 0:
            self._send([proto.chunk_none(cookie)])
            return
        if n >= SPARSE_READ_MIN and not req.flags & proto.CMD_FLAG_DF:
            runs = ex.read_runs(off, n)
        else:
            runs = [(off, n, False)]
        buf = self._buffer(n)
        out: list[Any] = []
        last = len(runs) - 1
        for i, (start, length, zero) in enumerate(runs):
            if zero:
                out.append(proto.chunk_offset_hole(cookie, start, length, i == last))
            else:
                view = buf[start - off:start - off + length]
                ex.readinto(start, view)
                out.append(proto.chunk_offset_data_header(cookie, start, length, i == last))
                out.append(view)
        self._send(out)

    def _block_status(self, req: proto.Request) -> None:
        ex = self.export
        # one reply covers at most 2^16 clusters; the client asks again from where it ends
        length = min(req.length, (ex.cluster_size or 65536) << 16)
        status = ex.block_status(req.offset, length, self.contexts,
                                 bool(req.flags & proto.CMD_FLAG_REQ_ONE))
        ids = list(status)
        self._send([proto.chunk_block_status(req.cookie, cid, status[cid], i == len(ids) - 1)
                    for i, cid in enumerate(ids)])


__all__ = ["Connection", "CONTEXTS"]
