"""The fixed-newstyle handshake (NBD protocol specification, ``doc/proto.md`` of the
NetworkBlockDevice/nbd project, section "Fixed newstyle negotiation").

Supported options: ``EXPORT_NAME``, ``ABORT``, ``LIST``, ``STARTTLS`` (when the server has a
TLS context), ``INFO``/``GO`` (replying ``INFO_EXPORT``, ``INFO_NAME``, ``INFO_DESCRIPTION``
and ``INFO_BLOCK_SIZE``), ``STRUCTURED_REPLY``, ``LIST_META_CONTEXT`` and
``SET_META_CONTEXT`` (``base:allocation`` and ``qemu:allocation-depth``). Every other option
gets ``ERR_UNSUP`` and negotiation goes on. A malformed option gets ``ERR_INVALID``; an option
longer than ``proto.MAX_OPTION_DATA``, more than ``max_options`` options, or a handshake not
finished before its deadline ends the connection.
"""

from __future__ import annotations

import ssl
import struct
from dataclasses import dataclass, field
from typing import Callable

from engine.errors import InvalidArgument
from engine.nbd import proto
from engine.nbd.export import CONTEXTS, Export
from engine.nbd.wire import Disconnected, Wire


class ProtocolError(Exception):
    """The client broke the protocol in a way that ends the connection."""


class _BadOption(Exception):
    """An option whose payload does not parse (answered with ERR_INVALID)."""


@dataclass
class Session:
    """What a finished negotiation agreed on."""

    export: Export
    structured: bool
    contexts: list[int] = field(default_factory=list)
    wire: Wire | None = None


class _Reader:
    """Walks an option's payload; any overrun is a malformed option."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise _BadOption("option payload too short")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def text(self, n: int) -> str:
        if n > proto.MAX_NAME:
            raise _BadOption(f"name longer than {proto.MAX_NAME} bytes")
        try:
            return self.take(n).decode()
        except UnicodeDecodeError:
            raise _BadOption("name is not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _BadOption("option payload has trailing bytes")


def _matches(query: str, name: str) -> bool:
    # an exact name, or a namespace ("base:", "qemu:") standing for all its names
    return query == name or (query.endswith(":") and name.startswith(query))


@dataclass(frozen=True)
class Policy:
    """What a server allows in the handshake, given to each client's :class:`Negotiation`.

    Arguments:
        max_options: options a client may send before the server hangs up.
        tls: a server-side SSLContext for STARTTLS, or None (STARTTLS gets ERR_POLICY).
        tls_required: refuse every option but STARTTLS and ABORT until TLS is up.
    """

    max_options: int = 256
    tls: ssl.SSLContext | None = None
    tls_required: bool = False

    def __post_init__(self) -> None:
        if self.tls_required and self.tls is None:
            raise InvalidArgument("tls_required needs a TLS context")


class Negotiation:
    """One client's handshake over WIRE, against the server's EXPORTS, under POLICY."""

    def __init__(self, wire: Wire, exports: Callable[[], dict[str, Export]],
                 policy: Policy = Policy()):
        self.wire = wire
        self.exports = exports
        self.policy = policy
        self.tls_active = False
        self.structured = False
        self.meta: tuple[str, list[int]] | None = None
        self.no_zeroes = False

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self.wire.send([proto.option_reply(option, reply, data)])

    def _error(self, option: int, reply: int, message: str) -> None:
        self._reply(option, reply, message.encode())

    def run(self) -> Session | None:
        """Negotiate; the agreed Session, or None when the client aborted."""
        self.wire.send([proto.greeting()])
        (cflags,) = proto.CLIENT_FLAGS.unpack(self.wire.read(4))
        if cflags & ~(proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES) \
                or not cflags & proto.FLAG_C_FIXED_NEWSTYLE:
            raise ProtocolError(f"client flags {cflags:#x} are not fixed newstyle")
        self.no_zeroes = bool(cflags & proto.FLAG_C_NO_ZEROES)
        for _ in range(self.policy.max_options):
            magic, option, length = proto.OPTION_HEADER.unpack(self.wire.read(16))
            if magic != proto.IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > proto.MAX_OPTION_DATA:
                raise ProtocolError(f"option {option} carries {length} bytes (the limit is "
                                    f"{proto.MAX_OPTION_DATA})")
            data = self.wire.read(length)
            if self.policy.tls_required and not self.tls_active and option not in (
                    proto.OPT_STARTTLS, proto.OPT_ABORT):
                if option == proto.OPT_EXPORT_NAME:
                    raise ProtocolError("EXPORT_NAME before TLS")
                self._error(option, proto.REP_ERR_TLS_REQD, "this server requires TLS")
                continue
            try:
                done = self._option(option, data)
            except _BadOption as e:
                self._error(option, proto.REP_ERR_INVALID, str(e))
                continue
            if isinstance(done, Session):
                done.wire = self.wire
                return done
            if done is not None:
                return None
        raise ProtocolError(f"more than {self.policy.max_options} options")

    def _option(self, option: int, data: bytes) -> Session | bool | None:
        if option == proto.OPT_EXPORT_NAME:
            return self._export_name(data)
        if option == proto.OPT_ABORT:
            try:
                self._reply(option, proto.REP_ACK)
            except OSError:
                pass
            return False
        if option == proto.OPT_LIST:
            _Reader(data).end()
            for ex in self.exports().values():
                self._reply(option, proto.REP_SERVER, proto.rep_server(ex.name, ex.description))
            self._reply(option, proto.REP_ACK)
        elif option == proto.OPT_STARTTLS:
            self._starttls(data)
        elif option in (proto.OPT_INFO, proto.OPT_GO):
            return self._info(option, data)
        elif option == proto.OPT_STRUCTURED_REPLY:
            _Reader(data).end()
            if self.structured:
                self._error(option, proto.REP_ERR_INVALID, "structured replies already on")
            else:
                self.structured = True
                self._reply(option, proto.REP_ACK)
        elif option in (proto.OPT_LIST_META_CONTEXT, proto.OPT_SET_META_CONTEXT):
            self._meta_context(option, data)
        else:
            self._error(option, proto.REP_ERR_UNSUP, f"option {option} is not supported")
        return None

    def _export(self, option: int, name: str) -> Export | None:
        ex = self.exports().get(name)
        if ex is None:
            self._error(option, proto.REP_ERR_UNKNOWN, f"export {name!r} not present")
        return ex

    def _export_name(self, data: bytes) -> Session:
        try:
            name = data.decode()
        except UnicodeDecodeError:
            raise ProtocolError("export name is not UTF-8") from None
        ex = self.exports().get(name)
        if ex is None:
            raise ProtocolError(f"export {name!r} not present")   # no way to say so: hang up
        tail = b"" if self.no_zeroes else bytes(124)
        self.wire.send([proto.EXPORT_NAME_REPLY.pack(ex.size, self._tflags(ex)) + tail])
        return Session(ex, self.structured, self._contexts_for(name))

    def _tflags(self, ex: Export) -> int:
        return ex.transmission_flags | (proto.TF_SEND_DF if self.structured else 0)

    def _contexts_for(self, name: str) -> list[int]:
        if self.meta is None or self.meta[0] != name:
            return []
        return self.meta[1]

    def _info(self, option: int, data: bytes) -> Session | None:
        r = _Reader(data)
        name = r.text(r.u32())
        wanted = [r.u16() for _ in range(r.u16())]
        r.end()
        ex = self._export(option, name)
        if ex is None:
            return None
        infos = [proto.info_export(ex.size, self._tflags(ex)),
                 proto.info_block_size(1, ex.preferred_block_size, proto.MAX_PAYLOAD)]
        if proto.INFO_NAME in wanted:
            infos.append(proto.info_text(proto.INFO_NAME, ex.name))
        if proto.INFO_DESCRIPTION in wanted and ex.description:
            infos.append(proto.info_text(proto.INFO_DESCRIPTION, ex.description))
        self.wire.send([proto.option_reply(option, proto.REP_INFO, i) for i in infos]
                       + [proto.option_reply(option, proto.REP_ACK)])
        if option == proto.OPT_GO:
            return Session(ex, self.structured, self._contexts_for(name))
        return None

    def _meta_context(self, option: int, data: bytes) -> None:
        r = _Reader(data)
        name = r.text(r.u32())
        queries = [r.text(r.u32()) for _ in range(r.u32())]
        r.end()
        setting = option == proto.OPT_SET_META_CONTEXT
        if setting and not self.structured:
            self._error(option, proto.REP_ERR_INVALID, "negotiate structured replies first")
            return
        if self._export(option, name) is None:
            return
        if setting:
            chosen = [c for c in CONTEXTS if c in queries]
        else:
            chosen = [c for c in CONTEXTS if not queries or any(_matches(q, c) for q in queries)]
        self.wire.send([proto.option_reply(option, proto.REP_META_CONTEXT,
                                           proto.rep_meta_context(CONTEXTS[c] if setting else 0,
                                                                  c))
                        for c in chosen] + [proto.option_reply(option, proto.REP_ACK)])
        if setting:
            self.meta = (name, [CONTEXTS[c] for c in chosen])

    def _starttls(self, data: bytes) -> None:
        _Reader(data).end()
        if self.policy.tls is None:
            self._error(proto.OPT_STARTTLS, proto.REP_ERR_POLICY, "this server has no TLS")
            return
        if self.tls_active:
            self._error(proto.OPT_STARTTLS, proto.REP_ERR_INVALID, "TLS is already on")
            return
        if self.wire.buffered:
            raise ProtocolError("data sent after STARTTLS before the TLS handshake")
        self._reply(proto.OPT_STARTTLS, proto.REP_ACK)
        try:
            tls_sock = self.policy.tls.wrap_socket(self.wire.sock, server_side=True)
        except (ssl.SSLError, OSError) as e:
            raise Disconnected(f"TLS handshake failed: {e}") from None
        deadline = self.wire.deadline
        self.wire = Wire(tls_sock)
        self.wire.deadline = deadline
        # everything negotiated before TLS is forgotten
        self.tls_active = True
        self.structured = False
        self.meta = None
