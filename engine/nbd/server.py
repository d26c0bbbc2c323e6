"""Server: listening sockets, one thread per client connection, orderly shutdown."""

from __future__ import annotations

import os
import selectors
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Iterable

from engine.errors import EngineError, InvalidArgument, RepositoryError
from engine.nbd import control
from engine.nbd.conn import Connection
from engine.nbd.export import Export
from engine.nbd.handshake import Negotiation, Policy, ProtocolError
from engine.nbd.wire import Disconnected, Wire, unix_listener


class Server:
    """An NBD server for one or more :class:`~engine.nbd.Export` objects.

    Every connection to an export shares the export's one engine handle, so the server
    advertises multi-connection consistency (``NBD_FLAG_CAN_MULTI_CONN``): a FLUSH on any
    connection makes every write already acknowledged on any connection durable.

    Arguments:
        exports: the exports, by their names (the first one's name goes into :attr:`uri`).
        socket_path (str | None): listen on this Unix socket (created; an old socket file at
            that path is replaced, any other file is refused).
        bind (tuple[str, int] | None): listen on this TCP address instead (port 0: any free
            port).
        max_connections (int): clients served at once; more are accepted and closed at once.
        workers (int): worker threads per connection (requests in flight at once).
        max_inflight_bytes (int): payload bytes queued per connection before the server
            stops reading from it (its memory bound).
        handshake_timeout (float): seconds a client has to finish negotiating.
        max_options (int): options one client may send before the server hangs up.
        tls (ssl.SSLContext | None): offer TLS (``NBD_OPT_STARTTLS``) with this context.
        tls_required (bool): refuse clients that do not start TLS.
        control_repo (str | None): the folder of the repository whose chains are exported
            read-write: listen on its control socket (:mod:`engine.nbd.control`) for
            snapshot requests from other processes, served by the thread that runs
            :meth:`serve_forever` (which must be the thread that opened the repository).

    Use::

        with engine.open("disk.qcow2") as img:
            with Server([Export("", img, close=False)], socket_path="/run/d.sock") as srv:
                print(srv.uri)          # nbd+unix:///?socket=/run/d.sock
                srv.serve_forever()     # until srv.shutdown() from another thread

    ``start()`` runs the accept loop in a background thread instead. ``close()`` (or leaving
    the ``with`` block) stops accepting, lets every connection finish the requests it has in
    flight, hangs up, then flushes and closes the exports (releasing their locks).
    """

    def __init__(self, exports: Iterable[Export], *, socket_path: str | None = None,
                 bind: tuple[str, int] | None = None, max_connections: int = 64,
                 workers: int = 4, max_inflight_bytes: int = 64 << 20,
                 handshake_timeout: float = 30.0, max_options: int = 256,
                 tls: ssl.SSLContext | None = None, tls_required: bool = False,
                 control_repo: str | None = None):
        self.exports: dict[str, Export] = {}
        for ex in exports:
            if ex.name in self.exports:
                raise InvalidArgument(f"two exports are named {ex.name!r}")
            self.exports[ex.name] = ex
        if not self.exports:
            raise InvalidArgument("a server needs at least one export")
        if (socket_path is None) == (bind is None):
            raise InvalidArgument("give exactly one of socket_path and bind")
        self.policy = Policy(max_options, tls, tls_required)
        self.socket_path = socket_path
        self.bind = bind
        self.max_connections = max_connections
        self.workers = workers
        self.max_inflight_bytes = max_inflight_bytes
        self.handshake_timeout = handshake_timeout
        self._listener: socket.socket | None = None
        self.control_repo = control_repo
        self._control: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = threading.Event()
        # re-entrant: shutdown() may run in a signal handler on a thread that holds it
        self._lock = threading.RLock()
        self._clients: dict[socket.socket, Connection | None] = {}
        self._threads: set[threading.Thread] = set()
        self._accept_thread: threading.Thread | None = None
        self._closed = False
        #: connections served so far, and those refused over max_connections
        self.accepted = 0
        self.refused = 0
        self._peak = 0

    # --- listening ---------------------------------------------------------------------------

    def listen(self) -> str:
        """Bind and listen (once); returns :attr:`uri`."""
        if self._listener is not None:
            return self.uri
        if self.socket_path is not None:
            path = self.socket_path
            try:
                sock = unix_listener(path, min(self.max_connections, 128))
            except OSError as e:
                raise InvalidArgument(f"cannot listen on {path}: {e.strerror} (is it an "
                                      "existing file, or a folder that does not exist?)",
                                      value=path) from None
        else:
            assert self.bind is not None
            host, port = self.bind
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, _, _, _, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError as e:
                sock.close()
                raise InvalidArgument(f"cannot listen on {host}:{port}: {e.strerror}",
                                      value=self.bind) from None
        sock.listen(min(self.max_connections, 128))
        self._listener = sock
        if self.control_repo is not None:
            self._control = control.listen(self.control_repo)
        return self.uri

    @property
    def uri(self) -> str:
        """The NBD URI of the first export (``nbd+unix:///NAME?socket=PATH`` or
        ``nbd://HOST:PORT/NAME``; ``nbds`` schemes when TLS is required)."""
        name = urllib.parse.quote(next(iter(self.exports)), safe="")
        tls = "s" if self.policy.tls_required else ""
        if self.socket_path is not None:
            return f"nbd{tls}+unix:///{name}?socket={urllib.parse.quote(self.socket_path)}"
        if self._listener is None:
            raise InvalidArgument("the server is not listening yet (call listen())")
        host, port = self._listener.getsockname()[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"nbd{tls}://{host}:{port}/{name}"

    def start(self) -> str:
        """Listen and run the accept loop in a background thread; returns :attr:`uri`."""
        uri = self.listen()
        if self._accept_thread is None:
            self._accept_thread = threading.Thread(target=self.serve_forever,
                                                   name="cowchain-nbd-accept", daemon=True)
            self._accept_thread.start()
        return uri

    def serve_forever(self) -> None:
        """Accept and serve clients until :meth:`shutdown`."""
        self.listen()
        assert self._listener is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            if self._control is not None:
                sel.register(self._control, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select():
                    if self._stop.is_set():
                        break
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._control:
                        self._control_request()

    def _control_request(self) -> None:
        assert self._control is not None
        try:
            conn, _ = self._control.accept()
        except OSError:
            return
        control.handle(conn, self.snapshot)

    def snapshot(self, chain: str, description: str = "", force: bool = False) -> object:
        """Take a snapshot of CHAIN, exported read-write here, while it is served
        (:meth:`Export.snapshot`); returns the Snapshot."""
        for ex in self.exports.values():
            if ex.chain_name == chain:
                return ex.snapshot(description, force=force)
        raise RepositoryError(f"chain {chain!r} is not exported read-write by this server "
                              f"(pid {os.getpid()}); it serves "
                              + ", ".join(repr(n) for n in self.exports),
                              hint="stop the server to change the repository otherwise")

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        with self._lock:
            if len(self._clients) >= self.max_connections or self._stop.is_set():
                self.refused += 1
                sock.close()
                return
            self.accepted += 1
            self._clients[sock] = None
            t = threading.Thread(target=self._client, args=(sock,), daemon=True,
                                 name="cowchain-nbd-conn")
            self._threads.add(t)
        t.start()

    def _client(self, sock: socket.socket) -> None:
        try:
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # the kernel's default send buffer: a larger one (4 MiB was tried) keeps megabytes
            # of replies in flight, out of the CPU caches by the time the client copies them,
            # and made nbdcopy about half as fast here
            wire = Wire(sock)
            wire.deadline = time.monotonic() + self.handshake_timeout
            session = Negotiation(wire, lambda: self.exports, self.policy).run()
            if session is None or self._stop.is_set():
                return
            assert session.wire is not None
            session.wire.deadline = None
            session.wire.sock.settimeout(None)
            conn = Connection(session, workers=self.workers,
                              max_inflight_bytes=self.max_inflight_bytes)
            with self._lock:
                self._clients[sock] = conn
            if self._stop.is_set():
                return
            conn.serve()
        except (Disconnected, ProtocolError, OSError, EngineError):
            pass
        finally:
            with self._lock:
                ended = self._clients.pop(sock, None)
                if ended is not None:
                    self._peak = max(self._peak, ended.peak_inflight_bytes)
                self._threads.discard(threading.current_thread())
            try:
                sock.close()
            except OSError:
                pass

    # --- stopping ----------------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Clients connected now."""
        with self._lock:
            return len(self._clients)

    @property
    def peak_inflight_bytes(self) -> int:
        """The most payload bytes one connection has held queued at once (its memory bound
        is ``max_inflight_bytes``)."""
        with self._lock:
            live = [c.peak_inflight_bytes for c in self._clients.values() if c is not None]
        return max([self._peak, *live])

    def shutdown(self) -> None:
        """Stop accepting; connections finish their in-flight requests and are closed.
        Safe to call from a signal handler or another thread; returns at once."""
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        with self._lock:
            clients = list(self._clients)
        for sock in clients:
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def close(self, grace: float = 10.0) -> None:
        """Shut down, wait for the connections to end, then flush and close the exports
        (releasing their image locks). Idempotent. A client that does not take its replies
        within GRACE seconds is cut off (its pending replies are dropped)."""
        if self._closed:
            return
        self.shutdown()
        if self._accept_thread is not None and self._accept_thread is not \
                threading.current_thread():
            self._accept_thread.join()
        deadline = time.monotonic() + grace
        while True:
            with self._lock:
                threads = list(self._threads)
                late = time.monotonic() > deadline
                clients = list(self._clients) if late else []
            if not threads:
                break
            for sock in clients:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            for t in threads:
                t.join(0.2)
        self._closed = True
        if self._listener is not None:
            self._listener.close()
            if self.socket_path is not None:
                try:
                    os.unlink(self.socket_path)
                except OSError:
                    pass
        if self._control is not None:
            self._control.close()
            assert self.control_repo is not None
            control.unlink(self.control_repo)
        self._wake_r.close()
        self._wake_w.close()
        err: EngineError | None = None
        for ex in self.exports.values():
            try:
                ex.close()
            except EngineError as e:
                err = err or e
        if err is not None:
            raise err

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
