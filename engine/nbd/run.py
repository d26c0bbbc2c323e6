"""``cowchain serve``: open the disk, serve it until SIGTERM or SIGINT, shut down cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import sys
from typing import Any, TextIO

from engine.errors import InvalidArgument
from engine.image import open as open_image
from engine.nbd.export import Export
from engine.nbd.server import Server
from engine.repository import Repository

#: The files ``--tls-certs DIR`` reads, named as qemu's tls-creds-x509 and nbdkit's
#: --tls-certificates name them.
TLS_CERT, TLS_KEY = "server-cert.pem", "server-key.pem"


def tls_context(folder: str) -> ssl.SSLContext:
    """A server TLS context from DIR/server-cert.pem and DIR/server-key.pem (TLS 1.2 or
    later, as the NBD specification requires)."""
    cert, key = os.path.join(folder, TLS_CERT), os.path.join(folder, TLS_KEY)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise InvalidArgument(f"cannot load the TLS certificate {cert} and key {key}: {e}",
                              value=folder) from None
    return ctx


def serve(*, image: str | None = None, repo: str | None = None, chain: str | None = None,
          snapshot: str | None = None, readonly: bool = False, socket_path: str | None = None,
          bind: tuple[str, int] | None = None, export_name: str = "", description: str = "",
          pid_file: str | None = None, tls_certs: str | None = None,
          tls_required: bool = False, more: list[tuple[str, str]] | None = None,
          out: TextIO | None = None, catalog: str | None = None,
          host_id: str | None = None, **server_opts: Any) -> int:
    """Serve IMAGE (a file and its backing chain), or CHAIN of the repository REPO (its leaf
    read-write, or SNAPSHOT read-only), as the export EXPORT_NAME, and the images of MORE
    ((name, path) pairs) under their names, until SIGTERM or SIGINT. Prints the NBD URI on OUT
    (default stdout) once listening, writes PID_FILE then; on the signal, finishes the
    requests in flight, flushes, closes (releasing the image and repository locks) and
    returns 0.

    CATALOG/HOST_ID: the repository's PostgreSQL catalog and this host's id (a repository
    shared by several hosts). Serving the leaf read-write takes the chain's write lease
    before listening (ChainLeased when another live host holds it) and holds it, renewed,
    until the server ends; a lease lost while serving fails every later write (the client
    sees EIO) and nothing more is written: restart the server to take a new lease."""
    out = out or sys.stdout
    tls = tls_context(tls_certs) if tls_certs else None
    with contextlib.ExitStack() as stack:
        written: list[str] = []
        # the pid file goes last, once the disk is flushed and closed: its absence means done
        stack.callback(_unlink, written)
        if image is not None:
            disk: Any = stack.enter_context(open_image(image, readonly=readonly))
            default_desc = os.path.basename(image)
        else:
            if repo is None or chain is None:
                raise InvalidArgument("give an image, or a repository and a chain")
            ro = readonly or snapshot is not None
            r = stack.enter_context(Repository.open(repo, readonly=ro, catalog=catalog,
                                                    host_id=host_id))
            if not ro:
                r.note_holder(f"cowchain serve of chain {chain!r}")
            c = r.chain(chain)
            stack.callback(c.close)
            if not ro:
                c.take_lease()    # on this thread, before any client (None: one host)
            if snapshot is not None:
                disk = stack.enter_context(c.open_snapshot(snapshot))
                default_desc = f"{chain} at snapshot {c.get_snapshot(snapshot).id}"
            else:
                c.read(0, 0)      # opens the leaf now, on this thread
                disk = c
                default_desc = chain
            readonly = ro
        exports = [Export(export_name, disk, readonly=readonly, close=False,
                          description=description or default_desc)]
        for name, path in more or ():
            exports.append(Export(name, stack.enter_context(open_image(path,
                                                                        readonly=readonly)),
                                  readonly=readonly, close=False,
                                  description=os.path.basename(path)))
        # a chain's leaf served read-write: snapshots of it come in on the control socket
        ctl = repo if repo is not None and not readonly else None
        server = Server(exports, socket_path=socket_path, bind=bind, tls=tls,
                        tls_required=tls_required, control_repo=ctl, **server_opts)
        stack.callback(server.close)
        uri = server.listen()
        if pid_file:
            with open(pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
            written.append(pid_file)
        old = {s: signal.signal(s, lambda *_: server.shutdown())
               for s in (signal.SIGTERM, signal.SIGINT)}
        for s, h in old.items():
            stack.callback(signal.signal, s, h)
        print(uri, file=out, flush=True)
        server.serve_forever()
    return 0


def _unlink(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)
