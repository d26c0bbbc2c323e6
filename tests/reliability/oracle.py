"""The expected-state oracle (docs/reliability.md C2, after RocksDB's crash test).

Every LBA has a *descriptor*: the seq of the stamped write whose content it must hold, or 0 for
zeros. The oracle keeps

- ``acked``: the descriptors at the last acknowledged flush F;
- ``post``: every operation issued after F, with the descriptors it would leave;
- ``backing``: the descriptors of the chain below the top image (what a discard exposes).

After a crash an LBA may hold its ``acked`` descriptor or the descriptor of any operation
issued after F that touched it; anything else is a *lost flushed write* (zeros or an older
stamp where a flushed one belongs) or *wrong data* (garbage, a torn block, another LBA's
stamp, a stamp that no operation left there).

Arrays are sized for the largest virtual size the run may reach; past the current size an
LBA is zeros (a grown disk reads zeros there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from reliability import stamps


@dataclass
class Verdict:
    """What one comparison found. ``lost`` and ``wrong`` are LBA counts."""
    lost: int = 0
    wrong: int = 0
    torn: int = 0        # unflushed blocks made only of bytes of allowed versions
    size_wrong: bool = False
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.wrong or self.size_wrong)


class Oracle:
    def __init__(self, max_blocks: int, size: int, state=None, backing=None):
        self.max_blocks = max_blocks
        self.cur = np.zeros(max_blocks, dtype=np.int64) if state is None else state.copy()
        self.acked = self.cur.copy()
        self.backing = (np.zeros(max_blocks, dtype=np.int64) if backing is None
                        else backing.copy())
        self.size = size                 # current (issued) virtual size
        self.acked_size = size
        self.post: list[tuple[int, int, np.ndarray]] = []
        self.post_sizes: list[int] = []
        self.last_ack = 0                # seq of the last acknowledged flush
        self.gens: dict[int, int] = {}   # seq -> generation stamped (default 0)

    # -- the operation stream ----------------------------------------------------------------
    def write(self, seq: int, lba: int, n: int) -> None:
        d = np.full(n, seq, dtype=np.int64)
        self.cur[lba:lba + n] = d
        self.post.append((seq, lba, d))

    def zero(self, seq: int, lba: int, n: int) -> None:
        d = np.zeros(n, dtype=np.int64)
        self.cur[lba:lba + n] = d
        self.post.append((seq, lba, d))

    def discard(self, seq: int, lba: int, n: int) -> None:
        d = self.backing[lba:lba + n].copy()
        self.cur[lba:lba + n] = d
        self.post.append((seq, lba, d))

    def resize(self, seq: int, new_size: int) -> None:
        self.size = new_size
        self.post_sizes.append(new_size)

    def ack(self, seq: int) -> None:
        """A flush that started after every op so far returned successfully."""
        self.acked = self.cur.copy()
        self.acked_size = self.size
        self.post = []
        self.post_sizes = []
        self.last_ack = seq

    def new_top(self) -> None:
        """The top was closed (flushed: call ack first) and a new empty overlay put on it."""
        self.backing = self.cur.copy()

    def apply_line(self, line: str) -> None:
        """Apply one protocol line of the worker (see reliability.worker)."""
        p = line.split()
        k = p[0]
        if k == "W":
            self.write(int(p[1]), int(p[2]), int(p[3]))
        elif k == "Z":
            self.zero(int(p[1]), int(p[2]), int(p[3]))
        elif k == "D":
            self.discard(int(p[1]), int(p[2]), int(p[3]))
        elif k == "R":
            self.resize(int(p[1]), int(p[2]))
        elif k == "A":
            self.ack(int(p[1]))

    # -- judging a crash image ------------------------------------------------------------------
    def allowed_sizes(self) -> set[int]:
        return {self.acked_size, *self.post_sizes}

    def _allowed(self, i: int) -> set[int]:
        return {int(self.acked[i])} | {int(d[i - lba]) for _s, lba, d in self.post
                                       if lba <= i < lba + len(d)}

    def _torn(self, i: int, data) -> bool:
        got = np.frombuffer(data, dtype=np.uint8, count=stamps.BLOCK, offset=i * stamps.BLOCK)
        cands = [np.zeros(stamps.BLOCK, dtype=np.uint8) if s == 0 else
                 np.frombuffer(stamps.make(s, i, 1, self.gens.get(s, 0)), dtype=np.uint8)
                 for s in self._allowed(i)]
        if len(cands) < 2:
            return False
        match = np.zeros(stamps.BLOCK, dtype=bool)
        for c in cands:
            match |= got == c
        return bool(match.all())

    def judge(self, obs: np.ndarray, size: int, label: str = "", data=None) -> Verdict:
        """Compare the decoded blocks ``obs`` (stamps.decode of the whole disk) of a crash
        image whose virtual size is ``size``. With the raw bytes ``data`` (kills only), a
        garbage block made only of bytes of its allowed versions counts as ``torn``."""
        v = Verdict()
        if size not in self.allowed_sizes():
            v.size_wrong = True
            v.details.append(f"{label}virtual size {size} not in {sorted(self.allowed_sizes())}")
        n = min(len(obs), self.max_blocks)
        obs = obs[:n]
        ok = obs == self.acked[:n]
        for _seq, lba, d in self.post:
            if lba >= n:
                continue
            m = min(len(d), n - lba)
            ok[lba:lba + m] |= obs[lba:lba + m] == d[:m]
        bad = np.nonzero(~ok)[0]
        if len(bad) and data is not None:
            # A SIGKILL in the middle of an in-place store into the mapping (memcpy) leaves a
            # block whose bytes come partly from the old and partly from the new version.
            # That is no D1 violation (the write was not acknowledged); count it apart.
            keep = []
            for i in bad.tolist():
                if obs[i] == stamps.GARBAGE and self._torn(i, data):
                    v.torn += 1
                    v.details.append(f"{label}lba {i}: torn between allowed versions "
                                     f"{sorted(self._allowed(i))} (unflushed)")
                else:
                    keep.append(i)
            bad = np.array(keep, dtype=np.int64)
        if len(bad):
            exp = self.acked[bad]
            got = obs[bad]
            lost = (got >= 0) & ((got == 0) | (got < exp))
            v.lost = int(lost.sum())
            v.wrong = int(len(bad) - v.lost)
            for i in bad[:8].tolist():
                allowed = {int(self.acked[i])} | {int(d[i - lba]) for _s, lba, d in self.post
                                                    if lba <= i < lba + len(d)}
                v.details.append(f"{label}lba {i}: got {_obs_name(int(obs[i]))}, allowed "
                                 f"{sorted(allowed)} (acked {int(self.acked[i])}, last ack "
                                 f"seq {self.last_ack})")
        return v

    def collapse(self, obs: np.ndarray, size: int) -> None:
        """After a verified crash: the image's actual content becomes the acknowledged state."""
        n = min(len(obs), self.max_blocks)
        self.cur[:] = 0
        self.cur[:n] = obs[:n]
        self.size = size
        self.ack(self.last_ack)


def _obs_name(o: int) -> str:
    if o == stamps.GARBAGE:
        return "garbage/torn"
    if o == stamps.MISPLACED:
        return "another LBA's stamp"
    if o == 0:
        return "zeros"
    return f"stamp seq {o}"
