"""Fault-injection matrix (docs/reliability.md C4; SQLite's I/O-error loop and QEMU's iotest 026).

For each operation of :data:`SCENARIOS`, each injection point (every I/O kind of the core's
shim: sync, fallocate, ftruncate, pwrite, mremap; and every hook point the operation
reaches), each errno (EIO, ENOSPC; hooks fail with EIO) and each mode (once, persistent):
fail the N-th call for N = 1, 2, ... until the operation completes without reaching the
fault. After each case:

1. a fault that was delivered surfaced as a typed EngineError with the injected errno
   (a silent success is a failure of the case);
2. after a failed sync every later flush on the handle fails (D4, sticky);
3. disarmed, closed and reopened: check() 0 corruptions (leaks counted), ``qemu-img check``
   exit 0 or 3, acknowledged data intact (each LBA holds its acknowledged content or what the
   failed operation wrote there);
4. once-mode: the operation retried (on the same handle; after a sticky sync failure on a
   reopened handle after repair('leaks')) succeeds, and the image is then fully clean (0
   leaks) with exactly the expected content.

``python -m reliability.faults --scenario NAME [--full]`` runs one scenario and prints JSON.
"""

from __future__ import annotations

import argparse
import errno as E
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import engine
import engine._core as core
from engine.errors import EngineError, EngineIOError, NoSpace
from reliability import chain as C
from reliability import stamps
from reliability.oracle import Oracle

BLOCK = 512
IO_KINDS = ("sync", "fallocate", "ftruncate", "pwrite", "mremap")


@dataclass
class Scenario:
    name: str
    cluster: int
    refbits: int
    size: int
    layers: int             # images in the template (the op works on the top)
    prefill: int            # stamped blocks written (and flushed) into every layer
    top_prefill: int = -1   # ... into the top (-1: prefill)
    lazy: bool = False      # lazy_refcounts images
    opens: bool = False     # the operation opens the top itself (the case does not)
    crash: bool = False     # pre() leaves a crash image (unflushed writes, then "power off")


SCENARIOS = {
    "alloc_write": Scenario("alloc_write", 4096, 16, 4 << 20, 1, 64),
    "alloc_write_512": Scenario("alloc_write_512", 512, 16, 4 << 20, 1, 64),
    "cow_write": Scenario("cow_write", 4096, 16, 4 << 20, 2, 2048, 0),
    "discard": Scenario("discard", 4096, 16, 4 << 20, 1, 2048),
    "write_zeroes": Scenario("write_zeroes", 2048, 16, 4 << 20, 2, 2048, 256),
    "overlay_create": Scenario("overlay_create", 1024, 16, 2 << 20, 1, 512),
    "reftable_grow": Scenario("reftable_grow", 512, 64, 8 << 20, 1, 0),
    "l1_grow": Scenario("l1_grow", 512, 16, 2 << 20, 1, 256),
    "flush": Scenario("flush", 1024, 16, 4 << 20, 2, 1024),
    # header rewrites done from Python, through the core's shim
    "rebase": Scenario("rebase", 4096, 16, 2 << 20, 2, 256),
    "autoclear_open": Scenario("autoclear_open", 4096, 16, 2 << 20, 1, 256, opens=True),
    # compound: a fault during the repair of a crash image, by a read-write open (the dirty
    # bit of lazy refcounts) or by check(repair="all") (leaked clusters)
    "reopen_crash": Scenario("reopen_crash", 4096, 16, 4 << 20, 1, 512, lazy=True, opens=True,
                             crash=True),
    "repair_crash": Scenario("repair_crash", 4096, 16, 4 << 20, 1, 512, opens=True, crash=True),
}


class Ctx:
    """The open top image, its folder and the oracle, for one case."""

    def __init__(self, folder: str, top: int, oracle: Oracle, seq: int, sc: Scenario):
        self.folder = folder
        self.top = top
        self.oracle = oracle
        self.seq = seq
        self.sc = sc
        self.img = None

    @property
    def path(self):
        return os.path.join(self.folder, C.layer_name(self.top))

    def open(self):
        if self.img is not None and not self.img.closed:
            self.img.close()
        self.img = None
        self.img = engine.open(self.path)
        return self.img

    def w(self, lba: int, n: int):
        self.seq += 1
        self.oracle.write(self.seq, lba, n)
        self.img.write(lba * BLOCK, stamps.make(self.seq, lba, n, 7))

    def z(self, lba: int, n: int, unmap: bool):
        self.seq += 1
        self.oracle.zero(self.seq, lba, n)
        self.img.write_zeroes(lba * BLOCK, n * BLOCK, unmap=unmap)

    def d(self, lba: int, n: int):
        self.seq += 1
        self.oracle.discard(self.seq, lba, n)
        self.img.discard(lba * BLOCK, n * BLOCK)

    def flush(self):
        self.seq += 1
        self.img.flush()
        self.oracle.ack(self.seq)


# --- the operations: pre (before arming, same handle) and op (armed) ------------------------

def _crash(ctx: Ctx):
    """Unflushed writes on the open top, then a power loss: the file as it is now (page
    cache included) is what the next open finds; with lazy refcounts it is marked dirty, as
    QEMU leaves it.  The model then takes the crash image's content as acknowledged."""
    ctx.open()
    r = random.Random(11)
    for _ in range(40):
        ctx.w(r.randrange(0, ctx.sc.size // BLOCK - 16), r.randint(1, 16))
    crash = ctx.path + ".crash"
    shutil.copyfile(ctx.path, crash)
    ctx.img.close()                             # (flushes the original, which is replaced)
    ctx.img = None
    os.replace(crash, ctx.path)
    if ctx.sc.lazy:
        with open(ctx.path, "r+b") as f:
            f.seek(72)                          # incompatible features: set the dirty bit
            bits = int.from_bytes(f.read(8), "big")
            f.seek(72)
            f.write((bits | 1).to_bytes(8, "big"))
    with engine.open(ctx.path, readonly=True) as img:
        size = img.size
        obs = stamps.decode(img.read(0, size))
    v = ctx.oracle.judge(obs, size)
    if not v.ok:
        raise AssertionError(f"the crash image itself is wrong: {v.details[:4]}")
    ctx.oracle.collapse(obs, size)


def pre(ctx: Ctx):
    name = ctx.sc.name
    if ctx.sc.crash:
        _crash(ctx)
    elif name == "flush":
        # a dirty state with everything writeback does: new data, new L2 tables, COW, frees
        r = random.Random(5)
        for _ in range(60):
            ctx.w(r.randrange(0, 8000), r.randint(1, 16))
        ctx.z(4096, 64, True)
        ctx.d(2048, 64)
        ctx.w(7000, 3)


def op(ctx: Ctx):
    name = ctx.sc.name
    cb = ctx.sc.cluster // BLOCK
    if name in ("alloc_write", "alloc_write_512"):
        ctx.w(4096, 64)                           # unallocated: new L2 table, new clusters
        ctx.flush()
    elif name == "cow_write":
        for c in (10, 11, 40, 200):               # partial clusters over backing data
            ctx.w(c * cb + 1, 2)
        ctx.flush()
    elif name == "discard":
        ctx.d(16 * cb, 32 * cb)
        ctx.flush()
    elif name == "write_zeroes":
        ctx.z(3 * cb + 1, 20 * cb, True)
        ctx.z(100 * cb, 8 * cb, False)
        ctx.flush()
    elif name == "overlay_create":
        ctx.img.close()
        ctx.oracle.ack(ctx.seq)
        ctx.oracle.new_top()
        ctx.top += 1
        ctx.img = engine.create(ctx.path, None, cluster_size=512,
                                backing=C.layer_name(ctx.top - 1), backing_format="qcow2")
        ctx.w(5, 9)
        ctx.flush()
    elif name == "reftable_grow":
        # 512-byte clusters with 64-bit refcounts: a reftable cluster covers 2 MiB of file,
        # so this large write makes the refcount table grow
        ctx.w(0, 5000)
        ctx.flush()
    elif name == "l1_grow":
        new = ctx.sc.size * 2
        ctx.seq += 1
        ctx.oracle.resize(ctx.seq, new)
        ctx.img.resize(new)
        ctx.w(new // BLOCK - 10, 10)
        ctx.flush()
    elif name == "flush":
        ctx.flush()
    elif name == "rebase":
        # onto a byte copy of the layer below: the disk reads the same either way
        ctx.img.rebase(ALT_BACKING, "qcow2")
        ctx.w(7, 5)
        ctx.flush()
    elif name in ("autoclear_open", "reopen_crash"):
        ctx.open()                              # header rewrite / repair of the dirty image
        ctx.w(9, 3)
        ctx.flush()
    elif name == "repair_crash":
        ctx.open()
        ctx.img.check(repair="all")
        ctx.w(9, 3)
        ctx.flush()
    else:
        raise ValueError(name)


ALT_BACKING = "alt.qcow2"
AUTOCLEAR_UNKNOWN = 1 << 5          # an autoclear bit we do not maintain: cleared on RW open


# --- templates ------------------------------------------------------------------------------

class Template:
    def __init__(self, sc: Scenario, root: str):
        self.sc = sc
        self.folder = os.path.join(root, "template-" + sc.name)
        os.makedirs(self.folder)
        self.oracle = Oracle((sc.size * 2) // BLOCK, sc.size)
        seq = 0
        r = random.Random(hash(sc.name) & 0xffff)
        for i in range(sc.layers):
            backing = C.layer_name(i - 1) if i else None
            img = engine.create(os.path.join(self.folder, C.layer_name(i)), sc.size,
                                cluster_size=sc.cluster, refcount_bits=sc.refbits,
                                backing=backing, backing_format="qcow2" if backing else None,
                                lazy_refcounts=sc.lazy)
            with img:
                left = sc.prefill if (i < sc.layers - 1 or sc.top_prefill < 0) else sc.top_prefill
                total = left
                while left > 0:
                    n = min(left, 64)
                    lba = r.randrange(0, sc.size // BLOCK - n)
                    if total >= 1024:
                        lba = (total - left) % (sc.size // BLOCK - 64)
                    seq += 1
                    self.oracle.write(seq, lba, n)
                    img.write(lba * BLOCK, stamps.make(seq, lba, n, 0))
                    left -= n
                seq += 1
                img.flush()
                self.oracle.ack(seq)
            if i < sc.layers - 1:
                self.oracle.new_top()
        self.seq = seq + 1
        self.top = sc.layers - 1
        if sc.name == "rebase":
            shutil.copyfile(os.path.join(self.folder, C.layer_name(sc.layers - 2)),
                            os.path.join(self.folder, ALT_BACKING))
        if sc.name == "autoclear_open":
            with open(os.path.join(self.folder, C.layer_name(self.top)), "r+b") as f:
                f.seek(88)
                f.write(AUTOCLEAR_UNKNOWN.to_bytes(8, "big"))

    def ctx(self, folder: str) -> Ctx:
        shutil.copytree(self.folder, folder)
        o = Oracle(self.oracle.max_blocks, self.oracle.size, state=self.oracle.cur,
                   backing=self.oracle.backing)
        o.last_ack = self.oracle.last_ack
        return Ctx(folder, self.top, o, self.seq, self.sc)


# --- one case ---------------------------------------------------------------------------------

@dataclass
class Outcome:
    delivered: bool = False
    recovered: bool = False
    raised: str | None = None
    silent: bool = False
    untyped: bool = False
    wrong_errno: bool = False
    unexpected_error: bool = False
    sticky_violation: bool = False
    corruptions: int = 0
    leaks: int = 0
    leaks_after_retry: int = 0
    retry_failed: bool = False
    data_bad: bool = False
    qemu_bad: bool = False
    reopen_fail: bool = False
    details: str = ""

    def failed(self) -> bool:
        return any((self.silent, self.untyped, self.wrong_errno, self.unexpected_error,
                    self.sticky_violation, self.corruptions, self.leaks_after_retry,
                    self.retry_failed, self.data_bad, self.qemu_bad, self.reopen_fail))


def disarm():
    core.set_fault(None)
    core.arm_hook(None)


def arm(point: str, nth: int, err: int, persistent: bool):
    disarm()
    if point in IO_KINDS:
        core.set_fault(point, nth, err, persistent)
    else:
        core.arm_hook(point, nth, "error")


def delivered(point: str, nth: int) -> bool:
    if point in IO_KINDS:
        return core.fault_stats()[1] > 0
    return core.hook_counts()[point] >= nth


def _verify(ctx: Ctx, out: Outcome, exact: bool) -> tuple[int, int]:
    """Reopen RO: check(), oracle (exact: the content must equal the model's current state)."""
    with engine.open(ctx.path, readonly=True) as img:
        res = img.check()
        data = img.read(0, img.size)
        size = img.size
    obs = stamps.decode(data)
    if exact:
        o = ctx.oracle
        exp = o.cur[:len(obs)]
        if size != o.size or not (obs == exp).all():
            bad = [int(i) for i in (obs != exp).nonzero()[0][:5]]
            out.data_bad = True
            out.details += f" content differs from the model after the retry at lbas {bad}" \
                           f" (size {size}/{o.size});"
    else:
        v = ctx.oracle.judge(obs, size)
        if not v.ok:
            out.data_bad = True
            out.details += " " + "; ".join(v.details[:4])
    if res.corruptions or res.check_errors:
        out.details += f" check: {res.to_dict()} {res.findings[:4]};"
    return res.corruptions + res.check_errors, res.leaks


def run_case(t: Template, folder: str, point: str, nth: int, err: int, persistent: bool,
             qemu_check: bool = True) -> Outcome:
    out = Outcome()
    ctx = t.ctx(folder)
    if not t.sc.opens:
        ctx.open()
    try:
        before_pre = (ctx.oracle.cur.copy(), ctx.oracle.size)
        pre(ctx)
        snapshot = (ctx.oracle.cur.copy(), ctx.oracle.size, ctx.seq)
        arm(point, nth, err, persistent)
        try:
            op(ctx)
        except EngineError as e:
            out.raised = f"{type(e).__name__}: {e}"
            if point in IO_KINDS:
                want = NoSpace if err == E.ENOSPC else EngineIOError
                if not isinstance(e, want) or getattr(e, "errno", None) != err:
                    out.wrong_errno = True
                    out.details += f" expected {want.__name__}(errno {err});"
            elif not isinstance(e, EngineIOError):
                out.wrong_errno = True
                out.details += " a hook fault must surface as EngineIOError;"
        except Exception as e:  # noqa: BLE001
            out.untyped = True
            out.raised = f"{type(e).__name__}: {e}"
            out.details += " " + traceback.format_exc()[-1500:]
        out.delivered = delivered(point, nth)
        disarm()
        if out.delivered and out.raised is None:
            # A fallocate that failed for the growth step and then succeeded for the exact
            # size (ensure_size's fallback) is a recovery, judged by the exact content check
            # below; any other delivered fault that vanished is a silent success.
            if point == "fallocate" and not persistent:
                out.recovered = True
            else:
                out.silent = True
        if not out.delivered and out.raised is not None:
            out.unexpected_error = True
        if out.raised is None:
            # completed: everything it did is flushed
            ctx.img.close()
            c, lk = _verify(ctx, out, exact=True)
            out.corruptions, out.leaks = c, lk
            if qemu_check:
                code, txt = C.qemu_check(ctx.path)
                if code != 0:
                    out.qemu_bad = True
                    out.details += f" qemu-img check {code}: {txt};"
            return out
        sync_failed = point == "sync"
        # D4: after a failed sync every later flush on the handle fails
        if sync_failed and ctx.img is not None and not ctx.img.closed:
            for _ in range(2):
                try:
                    ctx.img.flush()
                    out.sticky_violation = True
                    out.details += " a flush succeeded after a failed sync;"
                except EngineError:
                    pass
        retry_on_handle = not persistent and not sync_failed
        if retry_on_handle:
            # the op failed part-way: start again from the state before it (the model: the
            # failed op's writes are superseded by the retry's)
            cur, size, seq = snapshot
            ctx.oracle.cur[:] = cur
            ctx.oracle.size = size
            ctx.seq = seq
            try:
                if ctx.sc.name == "overlay_create" and ctx.img.closed is False and \
                        ctx.top == t.top + 1:
                    # the overlay exists and is open: retry its first write and flush
                    ctx.w(5, 9)
                    ctx.flush()
                else:
                    if ctx.sc.name == "overlay_create" and ctx.top == t.top + 1:
                        os.unlink(ctx.path)
                        ctx.top -= 1
                        ctx.open()
                    op(ctx)
            except Exception as e:  # noqa: BLE001
                out.retry_failed = True
                out.details += f" retry on the same handle failed: {type(e).__name__}: {e};"
        try:
            if ctx.img is not None:
                ctx.img.close()
        except EngineError:
            pass
        # reopen and check (acknowledged data intact; leaks counted)
        try:
            if ctx.sc.crash and not (retry_on_handle and not out.retry_failed):
                # a repair the fault stopped part-way: the next repair must finish it
                with engine.open(ctx.path) as img:
                    img.check(repair="all")
            if retry_on_handle and not out.retry_failed:
                c, lk = _verify(ctx, out, exact=True)
                out.corruptions, out.leaks_after_retry = c, lk
                out.leaks = lk
            else:
                c, lk = _verify(ctx, out, exact=False)
                out.corruptions, out.leaks = c, lk
        except EngineError as e:
            out.reopen_fail = True
            out.details += f" reopen failed: {type(e).__name__}: {e};"
            return out
        if qemu_check:
            code, txt = C.qemu_check(ctx.path)
            if code not in (0, 3) or (retry_on_handle and not out.retry_failed and code != 0):
                out.qemu_bad = True
                out.details += f" qemu-img check {code}: {txt};"
        if not persistent and sync_failed:
            # once-mode sync failure: reopen, repair leaks (the "reopened and checked" of
            # D4), retry the operation: then fully clean
            try:
                with engine.open(ctx.path) as img:
                    img.check(repair="leaks")
                ctx.oracle.collapse(stamps.decode(engine.open(ctx.path, readonly=True).read(
                    0, ctx.oracle.size)), ctx.oracle.size) if False else None
                if ctx.sc.name == "overlay_create" and ctx.top == t.top + 1:
                    ctx.open()
                    ctx.w(5, 9)
                    ctx.flush()
                else:
                    ctx.open()
                    # The failed sync lost what the handle had not made durable (the
                    # unflushed writes of pre() too): the application issues everything
                    # again, which rewrites every LBA the first attempt may have touched.
                    ctx.oracle.cur[:] = before_pre[0]
                    ctx.oracle.size = before_pre[1]
                    pre(ctx)
                    op(ctx)
                ctx.img.close()
                c, lk = _verify(ctx, out, exact=True)
                out.corruptions = max(out.corruptions, c)
                out.leaks_after_retry = lk
            except Exception as e:  # noqa: BLE001
                out.retry_failed = True
                out.details += f" retry after reopen failed: {type(e).__name__}: {e};"
    finally:
        disarm()
        try:
            if ctx.img is not None:
                ctx.img.close()
        except Exception:  # noqa: BLE001
            pass
        shutil.rmtree(folder, ignore_errors=True)
    return out


def dry_counts(t: Template, folder: str) -> tuple[dict, dict]:
    ctx = t.ctx(folder)
    if not t.sc.opens:
        ctx.open()
    try:
        pre(ctx)
        disarm()
        op(ctx)
        io = dict(core.fault_stats()[0])
        hooks = dict(core.hook_counts())
        ctx.img.close()
    finally:
        disarm()
        shutil.rmtree(folder, ignore_errors=True)
    return io, hooks


def n_values(count: int, full: bool, rng: random.Random) -> list[int]:
    """N = 1..count+1 (the last must complete unreached); sampled above 12 unless full."""
    if full or count <= 12:
        return list(range(1, count + 2))
    picks = set(range(1, 9)) | {count - 1, count, count + 1}
    picks |= {rng.randint(9, count) for _ in range(4)}
    return sorted(p for p in picks if p >= 1)


def run_scenario(name: str, *, full: bool = False, persistent_share: int = 1,
                 seed: int = 0) -> dict:
    sc = SCENARIOS[name]
    rng = random.Random(seed)
    root = tempfile.mkdtemp(prefix=f"cowchain-fault-{name}-", dir=C.scratch_root())
    stats = {"scenario": name, "cases": 0, "delivered": 0, "silent": 0, "untyped": 0,
             "wrong_errno": 0, "unexpected_error": 0, "sticky_violations": 0, "corruptions": 0,
             "leak_cases": 0, "max_leak": 0, "once_retries": 0, "leaks_after_retry": 0,
             "retry_failed": 0, "data_bad": 0, "qemu_bad": 0, "reopen_fail": 0,
             "recovered": 0, "points": {}, "hooks_hit": [], "failures": [], "never_completed": []}
    t0 = time.monotonic()
    try:
        t = Template(sc, root)
        io, hooks = dry_counts(t, os.path.join(root, "dry"))
        stats["dry_io"] = io
        stats["dry_hooks"] = {h: n for h, n in hooks.items() if n}
        stats["hooks_hit"] = [h for h, n in hooks.items() if n]
        points = [(k, io[k]) for k in IO_KINDS] + [(h, n) for h, n in hooks.items() if n]
        k = 0
        for point, count in points:
            errs = (E.EIO, E.ENOSPC) if point in IO_KINDS else (E.EIO,)
            modes = (False, True) if point in IO_KINDS else (False,)
            for err in errs:
                for persistent in modes:
                    if persistent and persistent_share > 1:
                        k += 1
                        if k % persistent_share:
                            continue
                    completed = False
                    for nth in n_values(count, full, rng):
                        o = run_case(t, os.path.join(root, "case"), point, nth, err, persistent)
                        stats["cases"] += 1
                        key = f"{point}/{E.errorcode[err]}/{'persistent' if persistent else 'once'}"
                        stats["points"][key] = stats["points"].get(key, 0) + 1
                        stats["delivered"] += int(o.delivered)
                        stats["recovered"] += int(o.recovered)
                        for f in ("silent", "untyped", "wrong_errno", "unexpected_error",
                                  "retry_failed", "data_bad", "qemu_bad", "reopen_fail"):
                            stats[f] += int(bool(getattr(o, f)))
                        stats["sticky_violations"] += int(o.sticky_violation)
                        stats["corruptions"] += int(bool(o.corruptions))
                        stats["leak_cases"] += int(bool(o.leaks))
                        stats["max_leak"] = max(stats["max_leak"], o.leaks)
                        if not persistent and o.delivered:
                            stats["once_retries"] += 1
                            stats["leaks_after_retry"] += int(bool(o.leaks_after_retry))
                        if o.failed():
                            stats["failures"].append(
                                f"fault {name} {key} N={nth}: raised={o.raised!r} "
                                f"delivered={o.delivered} {o.details[:1500]} "
                                f"[{', '.join(f for f in ('silent', 'untyped', 'wrong_errno', 'unexpected_error', 'sticky_violation', 'retry_failed', 'data_bad', 'qemu_bad', 'reopen_fail') if getattr(o, f))}"
                                f"{' corruptions' if o.corruptions else ''}"
                                f"{' leaks_after_retry=' + str(o.leaks_after_retry) if o.leaks_after_retry else ''}]")
                        if not o.delivered:
                            completed = True
                            break
                    if not completed:
                        stats["never_completed"].append(key)
    finally:
        disarm()
        shutil.rmtree(root, ignore_errors=True)
    stats["elapsed"] = time.monotonic() - t0
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", action="append", required=True)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--persistent-share", type=int, default=1)
    a = ap.parse_args(argv)
    for s in a.scenario:
        print(json.dumps(run_scenario(s, full=a.full, persistent_share=a.persistent_share)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
