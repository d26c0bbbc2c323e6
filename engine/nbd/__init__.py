"""An NBD server over the engine: ``cowchain serve``, and :class:`Server` for Python callers.

Any tool that speaks NBD (qemu-img, qemu-io, nbdinfo, nbdcopy, fio, the kernel client, libnbd
based backup tools) can then read and write a cowchain disk through the engine's own rules.
The wire protocol is the NBD protocol specification (``doc/proto.md`` of the
NetworkBlockDevice/nbd project); ``proto`` holds its constants and codecs, ``handshake`` the
fixed-newstyle negotiation, ``conn`` the transmission phase, ``export`` the mapping of NBD
commands to engine calls, ``server`` the listening sockets and ``run`` the command.
"""

from engine.nbd.export import Export
from engine.nbd.server import Server

__all__ = ["Export", "Server"]
