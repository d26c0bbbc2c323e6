"""The seeded operation stream shared by the kill worker, the power-loss simulator and the
fault matrix.

An operation is a tuple:

- ``("W", lba, n)``: write n stamped blocks (1..64) at LBA lba;
- ``("Z", lba, n, unmap)``: write_zeroes;
- ``("D", lba, n)``: discard (whole clusters of the top image: lba and n cluster-aligned);
- ``("F",)``: flush;
- ``("R", new_size)``: grow the virtual disk (resize, which grows the L1 table);
- ``("O",)``: close the top and put a new overlay on it.

The generator keeps a few hot regions so that overwrites, copy-ups of partly written clusters,
zeroes over data and discards of data all happen often on small disks.
"""

from __future__ import annotations

import random

BLOCK = 512


class OpGen:
    def __init__(self, rng: random.Random, *, size: int, max_size: int, cluster: int,
                 layers: int, max_layers: int, p_flush: float = 0.08,
                 p_resize: float = 0.01, p_overlay: float = 0.01, max_n: int = 64):
        self.rng = rng
        self.size = size
        self.max_size = max_size
        self.cluster = cluster
        self.layers = layers
        self.max_layers = max_layers
        self.p_flush = p_flush
        self.p_resize = p_resize
        self.p_overlay = p_overlay
        self.max_n = max_n
        nb = size // BLOCK
        self.hot = [rng.randrange(nb) for _ in range(4)]

    def _lba(self, n: int) -> int:
        nb = self.size // BLOCK
        r = self.rng
        if r.random() < 0.5:
            c = r.choice(self.hot)
            lba = c + r.randrange(-64, 64)
        else:
            lba = r.randrange(nb)
        return max(0, min(lba, nb - n))

    def _n(self) -> int:
        r = self.rng
        x = r.random()
        if x < 0.4:
            n = r.randint(1, 4)
        elif x < 0.8:
            n = r.randint(1, 16)
        else:
            n = r.randint(1, self.max_n)
        return min(n, self.size // BLOCK)

    def next(self):
        r = self.rng
        x = r.random()
        if x < self.p_flush:
            return ("F",)
        x -= self.p_flush
        if x < self.p_overlay:
            if self.layers < self.max_layers:
                self.layers += 1
                return ("O",)
            return ("F",)
        x -= self.p_overlay
        if x < self.p_resize:
            if self.size < self.max_size:
                C = self.cluster
                step = r.choice([C, 8 * C, C * (C // 8), 2 * C * (C // 8)])
                new = min(self.max_size, self.size + step)
                new -= new % C
                if new > self.size:
                    self.size = new
                    return ("R", new)
            return ("F",)
        y = r.random()
        if y < 0.70:
            n = self._n()
            return ("W", self._lba(n), n)
        if y < 0.85:
            n = self._n()
            return ("Z", self._lba(n), n, r.random() < 0.5)
        # discard: whole clusters of the top image
        cb = self.cluster // BLOCK
        ncl = r.randint(1, 8)
        n = min(ncl * cb, self.size // BLOCK)
        lba = self._lba(n)
        lba -= lba % cb
        n -= n % cb
        if n == 0:
            return ("F",)
        return ("D", lba, n)

    def set_top(self, cluster: int) -> None:
        self.cluster = cluster
