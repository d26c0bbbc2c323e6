"""Seeded chain configurations, building a chain, and the checks run after every crash.

A chain is base + 0..3 overlays in one folder (``L0.qcow2`` is the base), with cluster sizes
of 512 B..4 KiB, QCOW2 v2 or v3 and various refcount widths, so that a few MiB of writes run
through every metadata step (L2 allocation, refblock allocation, reftable growth, L1 growth).
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import traceback
from dataclasses import dataclass, field

import numpy as np

import engine
from engine.errors import EngineError
from reliability import stamps
from reliability.oracle import Oracle
from reliability.workload import OpGen

BLOCK = 512
QEMU_IMG = "qemu-img"


@dataclass
class ChainConfig:
    seed: int
    layers: int                 # images at the start (1 = base only)
    clusters: list[int]         # per image, base first (room for overlays made later)
    compat: list[str]
    refbits: list[int]
    size: int
    max_size: int
    max_layers: int
    base_by_qemu: bool

    @classmethod
    def random(cls, seed: int, *, force: dict | None = None) -> "ChainConfig":
        r = random.Random(seed)
        max_layers = 6
        clusters = [r.choice([512, 512, 1024, 2048, 4096]) for _ in range(max_layers)]
        compat = ["0.10" if r.random() < 0.15 else "1.1" for _ in range(max_layers)]
        refbits = [16 if c == "0.10" else r.choice([16, 16, 16, 1, 2, 4, 8, 32, 64])
                   for c in compat]
        size = r.choice([1, 2, 2, 3, 4]) << 20
        cfg = cls(seed=seed, layers=r.randint(1, 4), clusters=clusters, compat=compat,
                  refbits=refbits, size=size, max_size=size * 2, max_layers=max_layers,
                  base_by_qemu=r.random() < 0.3)
        for k, v in (force or {}).items():
            setattr(cfg, k, v)
        return cfg

    def short(self) -> str:
        n = self.layers
        return (f"seed={self.seed} layers={n} clusters={self.clusters[:n]} "
                f"compat={self.compat[:n]} refbits={self.refbits[:n]} size={self.size}")


def layer_name(i: int) -> str:
    return f"L{i}.qcow2"


def sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def create_layer(folder: str, i: int, cfg: ChainConfig, size: int, *, by_qemu: bool = False):
    path = os.path.join(folder, layer_name(i))
    backing = layer_name(i - 1) if i else None
    if by_qemu:
        args = [QEMU_IMG, "create", "-q", "-f", "qcow2", "-o",
                f"cluster_size={cfg.clusters[i]},compat={cfg.compat[i]},"
                f"refcount_bits={cfg.refbits[i]}"]
        if backing:
            args += ["-b", backing, "-F", "qcow2"]
        subprocess.run(args + [path, str(size)], check=True, capture_output=True)
        return engine.open(path)
    return engine.create(path, size, cluster_size=cfg.clusters[i], compat=cfg.compat[i],
                         refcount_bits=cfg.refbits[i], backing=backing,
                         backing_format="qcow2" if backing else None)


@dataclass
class Chain:
    folder: str
    cfg: ChainConfig
    oracle: Oracle
    top: int                        # index of the top image
    seq: int                        # next unused seq
    hashes: dict = field(default_factory=dict)    # lower image name -> sha256

    @property
    def top_path(self) -> str:
        return os.path.join(self.folder, layer_name(self.top))

    def lower_paths(self) -> list[str]:
        return [os.path.join(self.folder, layer_name(i)) for i in range(self.top)]


def run_ops(img, ops, oracle: Oracle, seq: int, gen: int = 0) -> int:
    """Apply W/Z/D/F ops to an open image with the oracle (used when building chains)."""
    for op in ops:
        seq += 1
        k = op[0]
        if k == "W":
            _, lba, n = op
            oracle.write(seq, lba, n)
            img.write(lba * BLOCK, stamps.make(seq, lba, n, gen))
        elif k == "Z":
            _, lba, n, unmap = op
            oracle.zero(seq, lba, n)
            img.write_zeroes(lba * BLOCK, n * BLOCK, unmap=unmap)
        elif k == "D":
            _, lba, n = op
            oracle.discard(seq, lba, n)
            img.discard(lba * BLOCK, n * BLOCK)
        elif k == "F":
            img.flush()
            oracle.ack(seq)
    return seq


def build_chain(folder: str, cfg: ChainConfig, *, fill_ops: int = 60) -> Chain:
    """Create the chain's images with some stamped content in each; all closed on return,
    every image but the top recorded by hash (and checked once by qemu-img)."""
    r = random.Random(cfg.seed * 7919 + 1)
    oracle = Oracle(cfg.max_size // BLOCK, cfg.size)
    seq = 0
    for i in range(cfg.layers):
        img = create_layer(folder, i, cfg, cfg.size, by_qemu=(i == 0 and cfg.base_by_qemu))
        try:
            gen = OpGen(r, size=cfg.size, max_size=cfg.size, cluster=cfg.clusters[i],
                        layers=1, max_layers=1, p_flush=0.05, p_resize=0, p_overlay=0)
            ops = [gen.next() for _ in range(fill_ops)]
            seq = run_ops(img, ops, oracle, seq)
            seq += 1
            img.flush()
            oracle.ack(seq)
        finally:
            img.close()
        if i < cfg.layers - 1:
            oracle.new_top()
    ch = Chain(folder=folder, cfg=cfg, oracle=oracle, top=cfg.layers - 1, seq=seq + 1)
    for p in ch.lower_paths():
        ch.hashes[os.path.basename(p)] = sha(p)
        code, out = qemu_check(p)
        if code != 0:
            raise AssertionError(f"{cfg.short()}: qemu-img check of freshly built {p} "
                                 f"exited {code}: {out}")
    return ch


def qemu_check(path: str) -> tuple[int, str]:
    p = subprocess.run([QEMU_IMG, "check", "-f", "qcow2", "--output=json", path],
                       capture_output=True, timeout=120)
    return p.returncode, (p.stdout + p.stderr).decode(errors="replace")[-1500:]


def qemu_raw(path: str, tmpdir: str) -> bytes:
    out = os.path.join(tmpdir, "convert.raw")
    subprocess.run([QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", path, out], check=True,
                   capture_output=True, timeout=120)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


@dataclass
class Report:
    """The outcome of verifying one crash image (all counts per image)."""
    label: str
    reopen_fail: int = 0
    corruptions: int = 0          # engine check (RO or RW, max)
    check_errors: int = 0
    qemu_corrupt: int = 0         # qemu-img check exit not in (0, 3)
    qemu_after_repair: int = 0    # qemu-img check exit != 0 after repair('leaks') + close
    leaks: int = 0                # engine check, before repair
    leaks_after_repair: int = 0
    lost: int = 0
    wrong: int = 0
    size_wrong: int = 0
    rw_changed: int = 0           # RW open reads differently from RO open
    backing_changed: int = 0
    convert_mismatch: int = 0
    untyped: int = 0              # an exception outside EngineError
    torn: int = 0                 # unflushed blocks torn by a kill mid-store (not a failure)
    converted: bool = False
    details: list[str] = field(default_factory=list)

    FAIL_FIELDS = ("reopen_fail", "corruptions", "check_errors", "qemu_corrupt",
                   "qemu_after_repair", "leaks_after_repair", "lost", "wrong", "size_wrong",
                   "rw_changed", "backing_changed", "convert_mismatch", "untyped")

    @property
    def failed(self) -> bool:
        return any(getattr(self, f) for f in self.FAIL_FIELDS)

    def summary(self) -> str:
        bad = {f: getattr(self, f) for f in self.FAIL_FIELDS if getattr(self, f)}
        return f"{self.label}: {bad} leaks={self.leaks}\n    " + "\n    ".join(self.details[:12])


def read_all(img) -> tuple[bytes, np.ndarray]:
    data = img.read(0, img.size)
    return data, stamps.decode(data)


def verify(top_path: str, oracle: Oracle, *, hashes: dict | None = None, label: str = "",
           convert: bool = False, rw: bool = True, repair: bool = True,
           qemu: bool = True, qemu_after: bool = True, tmpdir: str | None = None,
           allow_torn: bool = False) -> Report:
    """Everything C2 asks after a crash, on the image file ``top_path`` (its backing files
    beside it): qemu-img check (exit 0 or 3), RO open + check() + oracle, RW open + check() +
    oracle + repair('leaks') (then 0 leaks, qemu-img check exit 0), backing hashes, and with
    ``convert`` our reads against ``qemu-img convert -O raw``."""
    rep = Report(label)
    folder = os.path.dirname(top_path)
    if qemu:
        code, out = qemu_check(top_path)
        if code not in (0, 3):
            rep.qemu_corrupt = 1
            rep.details.append(f"qemu-img check exited {code}: {out}")
    ro_data = None
    try:
        with engine.open(top_path, readonly=True) as img:
            ro_data, obs = read_all(img)
            size = img.size
            res = img.check()
            rep.corruptions = res.corruptions
            rep.check_errors = res.check_errors
            rep.leaks = res.leaks
            if res.corruptions or res.check_errors:
                rep.details.append(f"RO check: {res.to_dict()} {res.findings[:6]}")
        v = oracle.judge(obs, size, label="RO ", data=ro_data if allow_torn else None)
        rep.lost, rep.wrong, rep.size_wrong = v.lost, v.wrong, int(v.size_wrong)
        rep.torn = v.torn
        rep.details += v.details
    except EngineError as e:
        rep.reopen_fail = 1
        rep.details.append(f"RO open/read failed: {type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - an untyped error is a finding
        rep.untyped = 1
        rep.details.append(f"RO: untyped {type(e).__name__}: {e}\n{traceback.format_exc()}")
    if rw:
        try:
            with engine.open(top_path) as img:
                data = img.read(0, img.size)
                if ro_data is not None and data != ro_data:
                    rep.rw_changed = 1
                    rep.details.append("RW open reads differently from the RO open")
                obs2 = stamps.decode(data) if ro_data is None else None
                res = img.check()
                if res.corruptions or res.check_errors:
                    rep.corruptions = max(rep.corruptions, res.corruptions)
                    rep.check_errors = max(rep.check_errors, res.check_errors)
                    rep.details.append(f"RW check: {res.to_dict()} {res.findings[:6]}")
                if ro_data is None:
                    v = oracle.judge(obs2, img.size, label="RW ")
                    rep.lost, rep.wrong, rep.size_wrong = v.lost, v.wrong, int(v.size_wrong)
                    rep.details += v.details
                if repair and res.leaks and not res.corruptions:
                    res2 = img.check(repair="leaks")
                    rep.leaks_after_repair = res2.leaks
                    if res2.leaks or res2.corruptions:
                        rep.details.append(f"after repair('leaks'): {res2.to_dict()}")
                    if img.read(0, img.size) != data:
                        rep.rw_changed = 1
                        rep.details.append("repair('leaks') changed the guest content")
        except EngineError as e:
            rep.reopen_fail = 1
            rep.details.append(f"RW open/check failed: {type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001
            rep.untyped = 1
            rep.details.append(f"RW: untyped {type(e).__name__}: {e}\n{traceback.format_exc()}")
        if qemu and qemu_after and repair and not rep.failed:
            code, out = qemu_check(top_path)
            if code != 0:
                rep.qemu_after_repair = 1
                rep.details.append(f"qemu-img check after repair + close exited {code}: {out}")
    for name, h in (hashes or {}).items():
        if sha(os.path.join(folder, name)) != h:
            rep.backing_changed += 1
            rep.details.append(f"backing file {name} changed")
    if convert and ro_data is not None:
        rep.converted = True
        try:
            raw = qemu_raw(top_path, tmpdir or folder)
            if raw != ro_data:
                rep.convert_mismatch = 1
                diff = next(i for i in range(min(len(raw), len(ro_data)))
                            if raw[i] != ro_data[i]) if len(raw) == len(ro_data) else -1
                rep.details.append(f"qemu-img convert differs from our read (first byte "
                                   f"{diff}, sizes {len(raw)}/{len(ro_data)})")
        except subprocess.CalledProcessError as e:
            rep.convert_mismatch = 1
            rep.details.append(f"qemu-img convert failed: {e.stderr!r}")
    return rep


def scratch_root() -> str | None:
    """A RAM-backed folder for crash scratch images when there is one (fdatasync is ~5 ms on
    the CI disk and ~0 on tmpfs; the kill harness loses nothing in the page cache either way,
    and the power-loss simulator builds its crash images itself)."""
    d = os.environ.get("COWCHAIN_SCRATCH") or "/dev/shm"
    try:
        st = os.statvfs(d)
        if os.access(d, os.W_OK) and st.f_bavail * st.f_frsize > (1 << 30):
            return d
    except OSError:
        pass
    return None
