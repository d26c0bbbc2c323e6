"""Stateful model test with crash and fault steps (docs/reliability.md C7).

A Hypothesis RuleBasedStateMachine over a chain (base + overlays made by the create_overlay
rule). The model is the oracle of reliability.oracle (a descriptor per 512-byte LBA: the seq
of the stamped write it holds, or 0 for zeros; the state at the last acknowledged flush; the
operations issued since). Rules: write, write_zeroes, discard, read (compared exactly with
the model), flush, reopen, create_overlay, resize, and

- ``crash``: a power-loss variant built from the barrier recordings of the top image since
  the last flush, crash or fault step (reliability.powerloss): the top file is replaced by
  the variant, reopened and verified like C2/C3 (qemu-img check, RO/RW open, check(), the
  oracle as of that crash point, repair of leaks); the model then collapses to what the image
  holds;
- ``inject_fault``: a once-fault at an I/O kind or a hook during a write + flush: a delivered
  fault must raise a typed error; after a failed sync a second flush must fail too (D4);
  then reopen, check() 0 corruptions, every LBA within what the model allows, collapse.

Invariants after every step: engine.check.check_file on the top's file as it is (no write-back
first: between flushes the file may only leak) reports 0 corruptions, no corrupt bit, no dirty bit (no lazy refcounts here), and
the backing images are byte-identical to when they became read-only. After a flush or a clean
close nothing leaks, except on an image that went through a crash step (refcounts past the end
of a shortened file cannot be seen or repaired until the file grows over them). Teardown:
qemu-img check (exit 0; 3 allowed on images that went through a crash step) on every image and ``qemu-img convert -O raw`` of the top equals the model.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import engine
import engine._core as core
from engine.errors import EngineError, EngineIOError
from reliability import chain as C
from reliability import stamps
from reliability.oracle import Oracle
from reliability.powerloss import Recorder, variants

BLOCK = 512
#: Triage knob (never off in the suite): assert D4's sticky flush in fault steps.
CHECK_STICKY = True

FIG = {"examples": 0, "steps": 0, "crash_steps": 0, "fault_steps": 0, "faults_delivered": 0,
       "max_depth": 0, "mismatches": 0}


class ChainMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="cowchain-model-", dir=C.scratch_root())
        self.img = None
        self.rec = Recorder()
        self.hashes = {}
        # A power-loss image may be shorter than the refcounts it carries: refcounts of
        # clusters past the end of the file are invisible to check() and qemu-img check (so
        # repair('leaks') cannot drop them) and turn into leaks once the file grows over
        # them. After a crash step the "nothing leaks after a flush/close" checks are off.
        self.crashed_layers = set()
        FIG["examples"] += 1

    # -- set-up ---------------------------------------------------------------------------------
    @initialize(cluster=st.sampled_from([512, 1024, 4096]), size_kb=st.sampled_from([256, 512, 1024]),
                compat=st.sampled_from(["1.1", "1.1", "0.10"]),
                refbits=st.sampled_from([16, 16, 1, 64]))
    def setup(self, cluster, size_kb, compat, refbits):
        if compat == "0.10":
            refbits = 16
        self.size = size_kb << 10
        self.max_size = self.size * 2
        self.top = 0
        self.seq = 0
        self.oracle = Oracle(self.max_size // BLOCK, self.size)
        self.img = engine.create(self.path(0), self.size, cluster_size=cluster, compat=compat,
                                 refcount_bits=refbits)
        self._watch()

    def path(self, i=None):
        return os.path.join(self.dir, C.layer_name(self.top if i is None else i))

    def _watch(self):
        """Reset the barrier history: the current file content is the durable state 0."""
        self.img.flush()
        self.oracle.ack(self.seq)
        self.rec.watch(self.path())
        core.set_barrier_callback(self.rec)
        self.hist_flushes = [(0, self.seq, self.oracle.acked.copy(), self.oracle.acked_size)]
        self.hist_ops = []
        self.states = []          # (count, bytes) durable states since the watch
        self.base_state = self.rec.last
        self.base_count = 0

    def _collect(self):
        self.states += self.rec.states
        self.rec.states = []
        if len(self.states) > 24:
            # the oldest kept state becomes the base of the crash points
            cut = len(self.states) - 24
            self.base_state = self.states[cut - 1][1]
            self.base_count = self.states[cut - 1][0]
            self.states = self.states[cut:]

    def _issue(self, kind, lba, n):
        self.seq += 1
        o = self.oracle
        getattr(o, {"W": "write", "Z": "zero", "D": "discard"}[kind])(self.seq, lba, n)
        self.hist_ops.append((self.seq, self.rec.count, lba, o.post[-1][2]))
        return self.seq

    # -- rules (each wrapped by _steps: a failed step skips the teardown comparisons) -----------
    def _draw_blocks(self, data, most: int) -> tuple[int, int]:
        """(lba, n): 1..most blocks inside the disk."""
        nb = self.oracle.size // BLOCK
        n = data.draw(st.integers(1, min(most, nb)))
        return data.draw(st.integers(0, nb - n)), n

    @rule(data=st.data())
    def write(self, data):
        self._ok = False
        lba, n = self._draw_blocks(data, 64)
        seq = self._issue("W", lba, n)
        self.img.write(lba * BLOCK, stamps.make(seq, lba, n, 3))
        self._collect()

    @rule(data=st.data(), unmap=st.booleans())
    def write_zeroes(self, data, unmap):
        self._ok = False
        lba, n = self._draw_blocks(data, 64)
        self._issue("Z", lba, n)
        self.img.write_zeroes(lba * BLOCK, n * BLOCK, unmap=unmap)
        self._collect()

    @rule(data=st.data())
    def discard(self, data):
        self._ok = False
        cb = self.img.cluster_size // BLOCK
        ncl = self.oracle.size // self.img.cluster_size
        k = data.draw(st.integers(1, min(8, ncl)))
        c = data.draw(st.integers(0, ncl - k))
        self._issue("D", c * cb, k * cb)
        self.img.discard(c * cb * BLOCK, k * cb * BLOCK)
        self._collect()

    @rule(data=st.data())
    def read(self, data):
        self._ok = False
        lba, n = self._draw_blocks(data, 128)
        obs = stamps.decode(self.img.read(lba * BLOCK, n * BLOCK), lba)
        exp = self.oracle.cur[lba:lba + n]
        if not (obs == exp).all():
            FIG["mismatches"] += 1
            i = int(np.nonzero(obs != exp)[0][0])
            raise AssertionError(f"read at lba {lba + i}: got {int(obs[i])}, model "
                                 f"{int(exp[i])}")

    @rule()
    def flush(self):
        self._ok = False
        self.img.flush()
        # after a successful flush every raised refcount is referenced and every freed
        # cluster released: nothing may leak (crash and fault steps repair their leaks)
        res = self.img.check()
        assert res.leaks == 0 or self.top in self.crashed_layers, \
            f"{res.leaks} leaked clusters right after a flush: {res.findings[:4]}"
        self.seq += 1
        self.oracle.ack(self.seq)
        self._collect()
        self.hist_flushes.append((self.rec.count, self.seq, self.oracle.acked.copy(),
                                  self.oracle.acked_size))

    def _closed_clean(self, path):
        """A clean close leaves nothing leaked (crash and fault steps repair their leaks)."""
        with engine.open(path, readonly=True) as img:
            res = img.check()
        assert res.corruptions == 0 and (res.leaks == 0 or self.top in self.crashed_layers), \
            f"after a clean close: {res.to_dict()} {res.findings[:4]}"

    @rule()
    def reopen(self):
        self._ok = False
        self.img.close()
        self._closed_clean(self.path())
        self.img = engine.open(self.path())
        self._watch()

    @precondition(lambda self: self.img is not None and self.top < 4)
    @rule(cluster=st.sampled_from([512, 1024, 4096]))
    def create_overlay(self, cluster):
        self._ok = False
        self.img.close()
        self._closed_clean(self.path())
        self.hashes[C.layer_name(self.top)] = C.sha(self.path())
        self.oracle.ack(self.seq)
        self.oracle.new_top()
        self.top += 1
        FIG["max_depth"] = max(FIG["max_depth"], self.top + 1)
        self.img = engine.create(self.path(), None, cluster_size=cluster,
                                 backing=C.layer_name(self.top - 1), backing_format="qcow2")
        self._watch()

    @precondition(lambda self: self.img is not None and self.oracle.size < self.max_size)
    @rule(grow_kb=st.sampled_from([4, 64, 256]))
    def resize(self, grow_kb):
        self._ok = False
        c = self.img.cluster_size
        new = min(self.max_size, self.oracle.size + (grow_kb << 10))
        new -= new % c
        if new <= self.oracle.size:
            return
        self.seq += 1
        self.oracle.resize(self.seq, new)
        self.hist_ops.append((self.seq, self.rec.count, -1, new))
        self.img.resize(new)
        self._collect()

    def _oracle_at(self, k):
        cnt, fseq, acked, size = [f for f in self.hist_flushes if f[0] <= k][-1]
        o = Oracle(self.oracle.max_blocks, size, state=acked, backing=self.oracle.backing)
        o.acked_size = size
        o.last_ack = fseq
        for seq, c, lba, d in self.hist_ops:
            if seq > fseq and c <= k:
                if lba < 0:
                    o.post_sizes.append(d)
                else:
                    o.post.append((seq, lba, d))
        return o

    @precondition(lambda self: self.img is not None)
    @rule(which=st.integers(0, 1000), vseed=st.integers(0, 2 ** 16))
    def crash(self, which, vseed):
        """Power loss: the top becomes a C3 variant between two recorded durable states."""
        self._ok = False
        FIG["crash_steps"] += 1
        self.crashed_layers.add(self.top)
        self._collect()
        with open(self.path(), "rb") as f:
            live = f.read()
        chain = [(self.base_count, self.base_state)] + self.states + [(self.rec.count + 1, live)]
        i = 1 + which % (len(chain) - 1)
        k = chain[i - 1][0]
        oracle = self._oracle_at(k)
        vs = variants(chain[i - 1][1], chain[i][1], random.Random(vseed), 1)
        core.set_barrier_callback(None)
        # the process "dies": drop the handle without letting it write anything more
        self.img._core.close()
        self.img._closed = True
        os.close(self.img._fd)
        self.img._lock.release()
        if self.img._backing is not None:
            self.img._backing.close()
        self.img = None
        with open(self.path(), "wb") as f:
            f.write(vs[0][0])
        rep = C.verify(self.path(), oracle, hashes=self.hashes,
                       label=f"crash at barrier {k} ({vs[0][1]})", tmpdir=self.dir)
        if rep.failed:
            FIG["mismatches"] += int(bool(rep.lost or rep.wrong))
            raise AssertionError(rep.summary())
        with engine.open(self.path(), readonly=True) as img:
            obs = stamps.decode(img.read(0, img.size))
            size = img.size
        self.oracle.collapse(obs, size)
        self.img = engine.open(self.path())
        self._watch()

    @precondition(lambda self: self.img is not None)
    @rule(point=st.sampled_from(["sync", "fallocate"] + list(core.HOOK_NAMES)),
          err=st.sampled_from([5, 28]), nth=st.integers(1, 3), data=st.data())
    def inject_fault(self, point, err, nth, data):
        self._ok = False
        FIG["fault_steps"] += 1
        lba, n = self._draw_blocks(data, 64)
        seq = self._issue("W", lba, n)
        if point in ("sync", "fallocate"):
            core.set_fault(point, nth, err, False)
        else:
            core.arm_hook(point, nth, "error")
        raised = None
        try:
            self.img.write(lba * BLOCK, stamps.make(seq, lba, n, 3))
            self.img.flush()
        except EngineError as e:
            raised = e
        finally:
            if point in ("sync", "fallocate"):
                delivered = core.fault_stats()[1] > 0
            else:
                delivered = core.hook_counts()[point] >= nth
            core.set_fault(None)
            core.arm_hook(None)
        if not delivered:
            assert raised is None, f"error without a fault: {raised!r}"
            self.seq += 1
            self.oracle.ack(self.seq)
            self._collect()
            self.hist_flushes.append((self.rec.count, self.seq, self.oracle.acked.copy(),
                                      self.oracle.acked_size))
            return
        FIG["faults_delivered"] += 1
        if raised is None:
            assert point == "fallocate", f"a fault at {point} (errno {err}) was swallowed"
            self.seq += 1
            self.oracle.ack(self.seq)
            self._watch()
            return
        assert isinstance(raised, EngineIOError), repr(raised)
        if point == "sync" and CHECK_STICKY:
            try:
                self.img.flush()
                raise AssertionError("a flush succeeded after a failed sync (D4)")
            except EngineError:
                pass
        try:
            self.img.close()
        except EngineError:
            pass
        self.img = None
        with engine.open(self.path(), readonly=True) as img:
            res = img.check()
            assert res.corruptions == 0 and res.check_errors == 0, (res.to_dict(), res.findings[:6])
            obs = stamps.decode(img.read(0, img.size))
            v = self.oracle.judge(obs, img.size)
            assert v.ok, v.details
            size = img.size
        self.oracle.collapse(obs, size)
        self.img = engine.open(self.path())
        if res.leaks:
            self.img.check(repair="leaks")
        self._watch()

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def consistent_on_disk(self):
        if self.img is None:
            return
        FIG["steps"] += 1
        # the file as it is between flushes (Image.check() would write back first)
        from engine.check import check_file
        res = check_file(self.img._fd, filename=self.path())
        assert res.corruptions == 0 and res.check_errors == 0, \
            f"on-disk state between steps: {res.to_dict()} {res.findings[:5]}"
        h = self.img.header
        assert not h.corrupt, "corrupt bit set"
        assert not h.dirty, "dirty bit set without lazy refcounts"

    @invariant()
    def backing_unchanged(self):
        for name, h in self.hashes.items():
            assert C.sha(os.path.join(self.dir, name)) == h, f"backing image {name} changed"
        self._ok = True

    def teardown(self):
        ok = getattr(self, "_ok", True)
        core.set_barrier_callback(None)
        core.set_fault(None)
        core.arm_hook(None)
        try:
            if self.img is not None:
                self.img.close()
            if self.img is not None and ok:
                for i in range(self.top + 1):
                    code, out = C.qemu_check(self.path(i))
                    ok_codes = (0, 3) if i in self.crashed_layers else (0,)
                    assert code in ok_codes, \
                        f"qemu-img check {C.layer_name(i)} exited {code}: {out}"
                raw = C.qemu_raw(self.path(), self.dir)
                obs = stamps.decode(raw)
                exp = self.oracle.cur[:len(obs)]
                assert len(raw) == self.oracle.size, (len(raw), self.oracle.size)
                if not (obs == exp).all():
                    FIG["mismatches"] += 1
                    i = int(np.nonzero(obs != exp)[0][0])
                    raise AssertionError(f"qemu-img convert of the top differs from the model "
                                         f"at lba {i}: {int(obs[i])} vs {int(exp[i])}")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

