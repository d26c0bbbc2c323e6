"""Stateful model test (docs/reliability.md C7 without crash steps).

A Hypothesis RuleBasedStateMachine drives a real chain (a base, then overlays made with
``engine.create(backing=...)``) and a pure-Python model: one bytearray per layer holding what
reading the chain at that layer returns. Rules: writes (unaligned and aligned, crossing
clusters), write_zeroes (with and without unmap), discard, reads, flush, reopen and new
overlays. Reads must equal the model at every step.

Model semantics (docs/architecture.md): a write or write_zeroes changes exactly the bytes asked for;
``discard`` drops the mapping of the whole clusters inside the range (a partial last cluster
of the disk counts as whole), so the layer below shows through there, and partial clusters are
left as they are; a layer past the end of its backing file reads zeros there.

Teardown: every layer passes ``qemu-img check`` (exit 0, no leaks), every layer reads in QEMU
exactly as its model (``qemu-img compare`` against a raw file of the model), and no lower layer
changed after an overlay was put on top of it.

One machine per base cluster size (512, 4096, 65536); overlays may use another size.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import qemu

import engine

MAX_LAYERS = 4


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Layer:
    def __init__(self, name: str, fmt: str, cluster: int, data: bytearray):
        self.name = name
        self.fmt = fmt
        self.cluster = cluster
        self.data = data           # what reading the chain at this layer returns
        self.frozen_hash = None    # sha256 of the file once an overlay sits on it


class ChainMachine(RuleBasedStateMachine):
    CLUSTER = 65536
    MIN_CLUSTERS, MAX_CLUSTERS = 4, 40

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="cowchain-model-")
        self.layers: list[Layer] = []
        self.img = None
        self.log: list[str] = []

    # --- helpers -------------------------------------------------------------------------
    @property
    def top(self) -> Layer:
        return self.layers[-1]

    @property
    def size(self) -> int:
        return len(self.top.data)

    def path(self, layer: Layer) -> str:
        return os.path.join(self.dir, layer.name)

    def lower(self, start: int, end: int) -> bytes:
        """What the layer below the top holds over [start, end) (zeros past its end, or
        without one)."""
        if len(self.layers) < 2:
            return bytes(end - start)
        below = self.layers[-2].data
        chunk = bytes(below[start:min(end, len(below))])
        return chunk + bytes(end - start - len(chunk))

    def clip(self, off: int, length: int) -> tuple[int, int]:
        off %= self.size
        return off, max(1, min(length, self.size - off))

    def pick(self, off: int, length: int, aligned: bool) -> tuple[int, int]:
        """A range in the disk from two raw draws: whole clusters of the top layer when
        ALIGNED, else any offset and 1 .. 4 clusters' worth of bytes."""
        c = self.top.cluster
        if aligned:
            return self.clip((off % max(1, self.size // c)) * c, (length % 3 + 1) * c)
        return self.clip(off, length % (4 * c) + 1)

    def expect_equal(self, off: int, got: bytes, what: str):
        want = bytes(self.top.data[off:off + len(got)])
        if got != want:
            i = next(k for k in range(len(got)) if got[k] != want[k])
            raise AssertionError(
                f"{what}: byte {off + i} reads {got[i]:#04x}, model says {want[i]:#04x} "
                f"(layers: {[(l.name, l.cluster, len(l.data)) for l in self.layers]})")

    # --- rules -----------------------------------------------------------------------------
    @initialize(
        compat=st.sampled_from(["1.1", "0.10"]),
        base_fmt=st.sampled_from(["qcow2", "qcow2", "raw"]),
        nclusters=st.integers(1, 1 << 30),
        tail=st.sampled_from([0, 512, 1536, 3584]),
    )
    def create_base(self, compat, base_fmt, nclusters, tail):
        c = self.CLUSTER
        n = self.MIN_CLUSTERS + nclusters % (self.MAX_CLUSTERS - self.MIN_CLUSTERS + 1)
        size = n * c + (tail % c)
        self.compat = compat
        layer = Layer(f"base.{base_fmt}", base_fmt, c, bytearray(size))
        kw = {"cluster_size": c, "compat": compat} if base_fmt == "qcow2" else {}
        self.img = engine.create(self.path(layer), size, format=base_fmt, **kw)
        self.layers.append(layer)
        assert self.img.size == size
        self.log.append(f"create base {base_fmt} compat={compat} cluster={c} size={size}")

    @rule(off=st.integers(0, 1 << 40), length=st.integers(1, 3 * 65536), seed=st.integers(0, 2**32))
    def write(self, off, length, seed):
        off, length = self.clip(off, length % (3 * self.top.cluster) + 1)
        data = random.Random(seed).randbytes(length)
        self.img.write(off, data)
        self.top.data[off:off + length] = data
        self.log.append(f"write({off}, {length})")

    @rule(index=st.integers(0, 1 << 30), count=st.integers(1, 3), seed=st.integers(0, 2**32))
    def write_clusters(self, index, count, seed):
        c = self.top.cluster
        off = (index % max(1, self.size // c)) * c
        length = min(count * c, self.size - off)
        data = random.Random(seed).randbytes(length)
        self.img.write(off, data)
        self.top.data[off:off + length] = data
        self.log.append(f"write_clusters({off}, {length})")

    @rule(off=st.integers(0, 1 << 40), length=st.integers(1, 1 << 20), unmap=st.booleans(),
          aligned=st.booleans())
    def write_zeroes(self, off, length, unmap, aligned):
        off, length = self.pick(off, length, aligned)
        self.img.write_zeroes(off, length, unmap=unmap)
        self.top.data[off:off + length] = bytes(length)
        self.log.append(f"write_zeroes({off}, {length}, unmap={unmap})")

    @rule(off=st.integers(0, 1 << 40), length=st.integers(1, 1 << 20), aligned=st.booleans())
    def discard(self, off, length, aligned):
        c = self.top.cluster
        off, length = self.pick(off, length, aligned)
        self.img.discard(off, length)
        if self.top.fmt == "raw":
            # A raw image has no layer below: discarded bytes read as zeros.
            self.top.data[off:off + length] = bytes(length)
        else:
            start = -(-off // c) * c
            end = off + length if off + length == self.size else (off + length) // c * c
            if end > start:
                self.top.data[start:end] = self.lower(start, end)
        self.log.append(f"discard({off}, {length})")

    @rule(off=st.integers(0, 1 << 40), length=st.integers(1, 1 << 18))
    def read(self, off, length):
        off, length = self.clip(off, length)
        self.expect_equal(off, self.img.read(off, length), f"read({off}, {length})")

    @rule()
    def read_all(self):
        self.expect_equal(0, self.img.read(0, self.size), "read of the whole disk")

    @rule()
    def flush(self):
        self.img.flush()
        self.log.append("flush()")

    @rule()
    def reopen(self):
        self.img.close()
        self.img = engine.open(self.path(self.top), format=self.top.fmt)
        assert self.img.size == self.size
        if self.top.fmt == "qcow2":
            res = self.img.check()
            d = res.to_dict()
            assert res.exit_code == 0 and not d.get("corruptions") and not d.get("leaks"), d
        self.log.append("reopen()")

    @precondition(lambda self: len(self.layers) < MAX_LAYERS)
    @rule(cluster=st.sampled_from([0, 0, 512, 4096, 65536]), grow=st.sampled_from([0, 0, 512, 3 * 65536]))
    def create_overlay(self, cluster, grow):
        c = cluster or self.CLUSTER
        below = self.top
        self.img.close()
        self.img = None
        below.frozen_hash = sha256(self.path(below))
        size = len(below.data) + grow
        layer = Layer(f"layer{len(self.layers)}.qcow2", "qcow2", c,
                      bytearray(below.data) + bytearray(grow))
        self.img = engine.create(self.path(layer), size, cluster_size=c, compat=self.compat,
                                 backing=below.name, backing_format=below.fmt)
        self.layers.append(layer)
        assert self.img.size == size
        assert self.img.backing is not None and self.img.backing.path.endswith(below.name)
        self.log.append(f"create_overlay(cluster={c}, size={size})")

    @invariant()
    def open_and_sized(self):
        if self.img is not None:
            assert not self.img.closed and self.img.size == self.size

    # --- teardown: QEMU's view of every layer ----------------------------------------------
    def teardown(self):
        try:
            if self.img is not None and not self.img.closed:
                self.img.close()
            if not self.layers:
                return
            for i, layer in enumerate(self.layers):
                p = self.path(layer)
                if layer.frozen_hash is not None:
                    assert sha256(p) == layer.frozen_hash, \
                        f"{layer.name} changed after an overlay was put on top of it"
                if layer.fmt == "qcow2":
                    qemu.assert_qemu_clean(p)
                raw = p + ".model"
                with open(raw, "wb") as f:
                    f.write(layer.data)
                code, text = qemu.qemu_compare(p, raw, layer.fmt, "raw")
                if code != 0:
                    got = qemu.convert_to_raw(p, layer.fmt)
                    i = next((k for k in range(min(len(got), len(layer.data)))
                              if got[k] != layer.data[k]), None)
                    raise AssertionError(
                        f"qemu-img compare {layer.name} vs model: exit {code} ({text.strip()}); "
                        f"first difference at byte {i}; steps: {self.log}")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class ChainMachine512(ChainMachine):
    CLUSTER = 512
    MIN_CLUSTERS, MAX_CLUSTERS = 64, 4096


class ChainMachine4K(ChainMachine):
    CLUSTER = 4096
    MIN_CLUSTERS, MAX_CLUSTERS = 8, 600


class ChainMachine64K(ChainMachine):
    CLUSTER = 65536
    MIN_CLUSTERS, MAX_CLUSTERS = 2, 40


TestChain512 = ChainMachine512.TestCase
TestChain4K = ChainMachine4K.TestCase
TestChain64K = ChainMachine64K.TestCase

# Hypothesis machines run as many examples as the active profile says (conftest.py: ``ci`` by
# default, ``long`` with COWCHAIN_PROFILE=long); each example's failure prints its steps.
for _case in (TestChain512, TestChain4K, TestChain64K):
    _case.pytestmark = [pytest.mark.timeout(600)]
del _case
