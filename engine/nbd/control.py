"""The control socket of a server that exports a repository chain read-write.

A ``cowchain serve`` of a chain's leaf holds the repository's lock, so no other process can
open the repository to change it. Snapshot creation is the one change that goes on while the
chain is served (as a live snapshot in a virtualization manager does): the server listens on
a Unix socket in the repository folder (:func:`address`), and ``cowchain chain snapshot``,
finding the repository held, asks the server there (:func:`request`). The server drains the
requests in flight on that chain, takes the snapshot with the engine, and goes on against the
new leaf (:meth:`engine.nbd.Export.snapshot`).

The exchange is one JSON object per line each way: ``{"op": "snapshot", "chain": NAME,
"description": TEXT, "force": BOOL}``, answered by ``{"ok": true, "snapshot": {...}}`` (the
snapshot's ``to_dict()``) or ``{"ok": false, "error": CLASS, "message": TEXT, "hint": TEXT}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from typing import Any, Callable

from engine import errors
from engine.errors import EngineError, InvalidArgument, RepositoryError
from engine.nbd.wire import unix_listener

#: The control socket's name in the repository folder.
SOCKET_NAME = "serve.sock"
#: Bytes of one request or reply line at most.
_MAX_LINE = 64 << 10
#: Seconds a peer has to send or take a line (a snapshot itself may take longer).
_LINE_TIMEOUT = 10.0
#: Seconds the client waits for the answer (drain, flush, snapshot).
_ANSWER_TIMEOUT = 120.0


def address(repo_path: str) -> str:
    """The control socket of the server that holds the repository at REPO_PATH: a file in the
    folder, or (when that path is too long for a Unix socket) an abstract name made from it."""
    path = os.path.join(os.path.abspath(repo_path), SOCKET_NAME)
    if len(os.fsencode(path)) < 100:
        return path
    return "\0cowchain-serve-" + hashlib.sha256(os.fsencode(path)).hexdigest()[:32]


def _read_line(sock: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        got = sock.recv(4096)
        if not got:
            break
        data += got
        if len(data) > _MAX_LINE:
            raise InvalidArgument("control message too long")
    try:
        msg = json.loads(data)
    except ValueError:
        raise InvalidArgument("control message is not one JSON object") from None
    if not isinstance(msg, dict):
        raise InvalidArgument("control message is not one JSON object")
    return msg


def _send_line(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.sendall(json.dumps(msg).encode() + b"\n")


def listen(repo_path: str) -> socket.socket:
    """Bind and listen on the control socket of REPO_PATH (an old socket file there is
    replaced: the repository lock, held by the caller, says no other server is alive)."""
    addr = address(repo_path)
    try:
        return unix_listener(addr, 8)
    except OSError as e:
        raise RepositoryError(f"cannot listen on the control socket {addr!r}: {e.strerror}",
                              path=repo_path) from None


def unlink(repo_path: str) -> None:
    """Remove the control socket file (when it is a file)."""
    addr = address(repo_path)
    if not addr.startswith("\0"):
        try:
            os.unlink(addr)
        except OSError:
            pass


def handle(conn: socket.socket, snapshot: Callable[[str, str, bool], Any]) -> None:
    """Answer one control request on CONN (then close it). SNAPSHOT(chain, description,
    force) takes the snapshot and returns it; its EngineError goes back to the client."""
    try:
        conn.settimeout(_LINE_TIMEOUT)
        try:
            msg = _read_line(conn)
            if msg.get("op") != "snapshot":
                raise InvalidArgument(f"unknown control request {msg.get('op')!r} (this "
                                      "server takes snapshots only)")
            chain, desc = msg.get("chain"), msg.get("description", "")
            if not isinstance(chain, str) or not isinstance(desc, str):
                raise InvalidArgument("a snapshot request names a chain and a description")
            snap = snapshot(chain, desc, bool(msg.get("force", False)))
            reply: dict[str, Any] = {"ok": True, "snapshot": snap.to_dict()}
        except EngineError as e:
            reply = {"ok": False, "error": type(e).__name__, "message": e.message,
                     "hint": e.hint}
        _send_line(conn, reply)
    except OSError:
        pass                                    # the client went away: nothing to answer
    finally:
        conn.close()


def request(repo_path: str, chain: str, description: str = "",
            force: bool = False) -> dict[str, Any] | None:
    """Ask the server holding REPO_PATH to snapshot CHAIN. Returns the snapshot's dict, or
    None when no server listens there. Raises the server's error (the same EngineError
    class when it has one, else RepositoryError)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(_LINE_TIMEOUT)
        try:
            sock.connect(address(repo_path))
        except OSError:
            return None
        _send_line(sock, {"op": "snapshot", "chain": chain, "description": description,
                          "force": force})
        sock.settimeout(_ANSWER_TIMEOUT)
        try:
            reply = _read_line(sock)
        except (OSError, InvalidArgument) as e:
            raise RepositoryError(f"the server holding the repository did not answer: {e}",
                                  path=repo_path) from None
    finally:
        sock.close()
    if reply.get("ok"):
        snap: dict[str, Any] = reply["snapshot"]
        return snap
    # the server's own hint goes into the message: it says what to do over there
    message = str(reply.get("message"))
    if reply.get("hint"):
        message += f" ({reply['hint']})"
    server = "the NBD server holding the repository refused it"
    cls = getattr(errors, str(reply.get("error")), None)
    err: EngineError = RepositoryError(message, path=repo_path, hint=server)
    if isinstance(cls, type) and issubclass(cls, EngineError):
        try:
            err = cls(message, path=repo_path, hint=server)
        except TypeError:                   # a class with other arguments: the generic one
            pass
    raise err


def snapshot_chain(open_repo: Callable[[], Any], repo_path: str, chain: str,
                   description: str = "", force: bool = False) -> dict[str, Any]:
    """Snapshot CHAIN of the repository in REPO_PATH and return the snapshot's dict: in
    this process (OPEN_REPO opens the repository read-write), or, when a ``cowchain serve``
    of the chain holds the repository, by that server between two requests (``request``).

    Raises:
        RepositoryError: the repository is held and no server answers for it; and the
            errors of ``Chain.snapshot``.
    """
    try:
        with open_repo() as repo:
            snap: dict[str, Any] = repo.chain(chain).snapshot(description,
                                                              force=force).to_dict()
            return snap
    except RepositoryError:
        served = request(repo_path, chain, description, force)
        if served is None:
            raise
        return served

