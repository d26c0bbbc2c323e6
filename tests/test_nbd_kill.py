"""kill -9 of ``cowchain serve`` in the middle of client writes (the crash rules, over NBD).

Each round serves a fresh overlay, and a client (raw sockets) writes seeded random runs of
512-byte sectors in pipelined batches, with a FLUSH now and then; the test kills the server
with SIGKILL while a batch is in flight. After a restart, over NBD again:

- every sector whose last write was acknowledged before an acknowledged FLUSH holds it;
- a sector written after the last acknowledged FLUSH holds the flushed content or one of those
  later writes (each sector whole: its stamp names the write);
- ``qemu-img check`` finds no corruption (leaked clusters are allowed after a crash).
"""

from __future__ import annotations

import os
import random
import signal
import struct

import qemu
from engine.nbd import proto
from reliability import summary
from test_nbd_hostile import Client
from test_nbd_interop import Served

SEED = int(os.environ.get("COWCHAIN_NBD_SEED", "1"))
SECTOR = 512
SIZE = 16 << 20
ROUNDS = 4
_TOTAL = {"kills": 0, "flushed": 0, "lost": 0, "wrong": 0, "corruptions": 0, "leaks": 0}


def _sector(write_id: int, sector: int) -> bytes:
    head = struct.pack(">QQ", write_id, sector)
    return head + bytes([write_id % 251 + 1]) * (SECTOR - len(head))


def _payload(write_id: int, first: int, count: int) -> bytes:
    return b"".join(_sector(write_id, first + i) for i in range(count))


def test_kill9_mid_writes_keeps_flushed_writes(tmp_path):
    rng = random.Random(SEED)
    for rnd in range(ROUNDS):
        img = qemu.create(tmp_path / f"k{rnd}.qcow2", SIZE)
        durable: dict[int, int] = {}     # sector -> write id acknowledged before a FLUSH
        acked: dict[int, int] = {}       # sector -> last write id acknowledged
        later: dict[int, set[int]] = {}  # sector -> write ids issued since the last FLUSH
        s = Served(tmp_path, img)
        c = Client(s.sock)
        c.go()
        write_id = 0
        batches = rng.randrange(3, 12)
        for b in range(batches + 1):
            issued = []
            for _ in range(rng.randrange(1, 16)):
                write_id += 1
                first = rng.randrange(0, SIZE // SECTOR - 256)
                count = rng.choice([1, 8, 128, 256])
                c.request(proto.CMD_WRITE, first * SECTOR, count * SECTOR, cookie=write_id,
                          payload=_payload(write_id, first, count))
                issued.append((write_id, first, count))
                for i in range(first, first + count):
                    later.setdefault(i, set()).add(write_id)
            if b == batches:
                break                    # the last batch is in flight when the kill comes
            for _ in issued:
                cookie, err, _ = c.reply()
                assert err == 0
            for wid, first, count in issued:
                for i in range(first, first + count):
                    acked[i] = wid
            if rng.random() < 0.6:
                c.request(proto.CMD_FLUSH, 0, 0, cookie=0)
                assert c.reply()[:2] == (0, 0)
                durable.update(acked)
                later.clear()
        os.kill(s.proc.pid, signal.SIGKILL)
        s.proc.wait(30)
        c.close()
        _TOTAL["kills"] += 1
        _TOTAL["flushed"] += len(durable)

        code, data = qemu.qemu_check(img)
        _TOTAL["corruptions"] += bool(data.get("corruptions"))
        _TOTAL["leaks"] += bool(data.get("leaks"))
        assert code in (0, 3) and not data.get("corruptions"), data
        with Served(tmp_path, "--read-only", img) as s2:
            r = Client(s2.sock)
            r.go()
            disk = b"".join(r.read(off, 1 << 20) for off in range(0, SIZE, 1 << 20))
            r.close()
        for sector in set(durable) | set(later):
            got = disk[sector * SECTOR:(sector + 1) * SECTOR]
            allowed = {_sector(w, sector) for w in later.get(sector, ())}
            base = durable.get(sector)
            allowed.add(_sector(base, sector) if base is not None else bytes(SECTOR))
            if got not in allowed:
                _TOTAL["lost" if sector in durable else "wrong"] += 1
        line = summary.publish(
            "nbd-kill", f"{_TOTAL['kills']} kill -9 of cowchain serve mid-writes — "
                        f"{_TOTAL['lost']} lost flushed sectors (of {_TOTAL['flushed']}), "
                        f"{_TOTAL['wrong']} wrong sectors, {_TOTAL['corruptions']} "
                        f"corruptions; leaks after {_TOTAL['leaks']} kills")
        print("\n" + line)
        assert _TOTAL["lost"] == 0 and _TOTAL["wrong"] == 0, line
