"""One kill lane (docs/reliability.md C2): ``python -m reliability.killer --seed S --kills K``.

The lane builds a chain, then repeatedly starts :mod:`reliability.worker` on its top image and
kills it:

- *blackbox*: SIGKILL from here after a random delay once the worker is READY;
- *whitebox*: the worker kills itself at hook H on its n-th hit (COWCHAIN_KILL_AT=H:n); H
  goes round the whole registry, n is drawn from the hook's hit rate seen so far, so every
  hook is covered; a chain flavour with 512-byte clusters and 64-bit refcounts makes the
  refcount table grow, resizes make the L1 grow.

After every kill (and every run that ends without one) :func:`reliability.chain.verify` runs;
the oracle then collapses to what the image holds and the next worker goes on with the same
chain (so later crashes also hit images that earlier crashes and repairs left). Each chain
takes ``--per-chain`` kills, then a new chain starts.

The lane prints one JSON object on stdout: counts, per-hook kills, leaks per crash and the
failure reports (each with the seed and crash point that replay it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)


def worker_env(hook: str | None = None) -> dict:
    import engine
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([TESTS, root] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("COWCHAIN_KILL_AT", None)
    if hook:
        env["COWCHAIN_KILL_AT"] = hook
    return env


class Run:
    """One worker process: its protocol lines, applied to the oracle as they arrive."""

    def __init__(self, lines, rc, killed_by_us, elapsed):
        self.lines = lines
        self.rc = rc
        self.killed_by_us = killed_by_us
        self.elapsed = elapsed


def run_worker(args: list[str], env: dict, kill_after: float | None, timeout: float,
               on_line) -> Run:
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "reliability.worker", *args], cwd=TESTS,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fd = p.stdout.fileno()
    buf = b""
    lines = []
    ready_at = None
    killed = False
    deadline = t0 + timeout
    eof = False
    while not eof:
        now = time.monotonic()
        if not killed and ready_at is not None and kill_after is not None and \
                now >= ready_at + kill_after:
            os.kill(p.pid, signal.SIGKILL)
            killed = True
        if not killed and now >= deadline:
            os.kill(p.pid, signal.SIGKILL)
            killed = True
            lines.append("TIMEOUT")
        wait = 0.5
        if not killed and ready_at is not None and kill_after is not None:
            wait = max(0.0, ready_at + kill_after - now)
        r, _, _ = select.select([fd], [], [], min(wait, 0.5))
        if r:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                eof = True
                break
            buf += chunk
            while b"\n" in buf:
                ln, buf = buf.split(b"\n", 1)
                s = ln.decode()
                lines.append(s)
                if s == "READY" and ready_at is None:
                    ready_at = time.monotonic()
                on_line(s)
    err = p.stderr.read()
    rc = p.wait()
    if err and rc not in (0, -9):
        lines.append("STDERR " + err.decode(errors="replace")[-3000:])
    return Run(lines, rc, killed, time.monotonic() - t0)


def dry_run(ch, tmp: str, seed: int, gen: int, ops: int) -> dict:
    """Hook hits of the worker's workload on a copy of the chain (deterministic)."""
    import engine._core as core
    from reliability.worker import run_workload
    scratch = os.path.join(tmp, "dry")
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(ch.folder, scratch)
    core.arm_hook(None)
    try:
        run_workload(scratch, ch.top, seed, ch.seq, gen, ops, ch.cfg.max_size,
                     emit=lambda s: None)
    finally:
        counts = core.hook_counts()
        shutil.rmtree(scratch, ignore_errors=True)
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--kills", type=int, required=True)
    ap.add_argument("--per-chain", type=int, default=10)
    ap.add_argument("--convert-every", type=int, default=20)
    ap.add_argument("--deadline", type=float, default=1e9, help="stop after this many seconds")
    ap.add_argument("--whitebox-ops", type=int, default=400)
    ap.add_argument("--hook-offset", type=int, default=0)
    ap.add_argument("--keep-failed", default=os.environ.get("COWCHAIN_KEEP_FAILED"),
                    help="copy failed chains here (default: $COWCHAIN_KEEP_FAILED)")
    a = ap.parse_args(argv)

    import engine._core as core
    from reliability import chain as C

    hooks = list(core.HOOK_NAMES)
    t_start = time.monotonic()
    rng = random.Random(a.seed)
    tmp = tempfile.mkdtemp(prefix="cowchain-kill-", dir=C.scratch_root())
    stats = {"seed": a.seed, "kills": 0, "blackbox": 0, "whitebox": 0, "completed": 0,
             "hook_misses": 0, "hook_kills": {h: 0 for h in hooks}, "leaks": [],
             "reports": 0, "converts": 0, "failures": [], "chains": 0, "worker_errors": 0,
             "timeouts": 0, "totals": {}, "torn": 0, "torn_cases": []}
    ch = None
    chain_kills = 0
    chain_idx = 0
    gen = 0
    try:
        while stats["kills"] < a.kills and time.monotonic() - t_start < a.deadline:
            if ch is None or chain_kills >= a.per_chain:
                if ch is not None:
                    shutil.rmtree(ch.folder, ignore_errors=True)
                chain_idx += 1
                cseed = a.seed * 100003 + chain_idx
                force = None
                if chain_idx % 3 == 0:
                    # the "small" flavour: the refcount table must grow
                    force = {"clusters": [512] * 6, "refbits": [64] * 6,
                             "compat": ["1.1"] * 6, "size": 4 << 20, "max_size": 8 << 20}
                cfg = C.ChainConfig.random(cseed, force=force)
                folder = os.path.join(tmp, f"chain{chain_idx}")
                os.makedirs(folder)
                ch = C.build_chain(folder, cfg)
                stats["chains"] += 1
                chain_kills = 0
            whitebox = (stats["blackbox"] + stats["whitebox"]) % 2 == 1
            gen += 1
            wseed = rng.randrange(1 << 30)
            hook = None
            kill_after = None
            ops = 100000
            if whitebox:
                # Dry run of the same (deterministic) workload on a copy, in this process,
                # to count the hits of every hook; then kill at a hit drawn from them.
                ops = a.whitebox_ops
                counts = dry_run(ch, tmp, wseed, gen, ops)
                # the least-killed hook this workload reaches (rare ones first: reftable
                # growth and L1 growth happen in few windows)
                hit = [h for h in hooks if counts.get(h, 0) > 0]
                if not hit:
                    stats["failures"].append(f"dry run reached no hook: {counts}")
                    continue
                want = min(hit, key=lambda h: (stats["hook_kills"][h], rng.random()))
                nth = rng.randint(1, counts[want])
                hook = f"{want}:{nth}"
            else:
                kill_after = rng.choice([rng.uniform(0, 0.05), rng.uniform(0, 0.5)])
            args = ["--folder", ch.folder, "--top", str(ch.top), "--seed", str(wseed),
                    "--seq", str(ch.seq), "--gen", str(gen), "--ops", str(ops),
                    "--max-size", str(ch.cfg.max_size)]
            state = {"ops": 0, "overlay": None, "err": None, "max_seq": ch.seq}
            oracle = ch.oracle

            def on_line(s, state=state, oracle=oracle):
                k = s.split(" ", 1)[0]
                if k in ("W", "Z", "D", "R", "F", "A"):
                    state["ops"] += 1
                    oracle.apply_line(s)
                    if k == "W":
                        oracle.gens[int(s.split()[1])] = gen
                    state["max_seq"] = max(state["max_seq"], int(s.split()[1]))
                elif k == "O":
                    _, seq, idx, h, _cl = s.split()
                    state["overlay"] = (int(idx), h)
                    ch.hashes[C.layer_name(int(idx) - 1)] = h
                    ch.top = int(idx)
                    oracle.new_top()
                elif k == "H":
                    counts = json.loads(s[2:])
                    for name, v in counts.items():
                        state.setdefault("hooks", {})[name] = v
                    state["hook_ops"] = state["ops"]
                elif k == "ERR":
                    state["err"] = s

            label = (f"lane seed {a.seed} chain[{cfg.short()}] top=L{ch.top} worker seed "
                     f"{wseed} gen {gen} " + (f"hook {hook}" if hook else
                                              f"blackbox kill after {kill_after:.3f}s"))
            run = run_worker(args, worker_env(hook), kill_after, 60.0, on_line)
            ch.seq = state["max_seq"] + 1
            if state["err"] or (run.rc not in (0, -9)):
                stats["worker_errors"] += 1
                stats["failures"].append(f"{label}: worker failed rc={run.rc}: "
                                         f"{state['err'] or run.lines[-3:]}")
            if "TIMEOUT" in run.lines:
                stats["timeouts"] += 1
                stats["failures"].append(f"{label}: worker timed out")
            if run.rc == -9 and not ("TIMEOUT" in run.lines):
                stats["kills"] += 1
                chain_kills += 1
                if whitebox:
                    stats["whitebox"] += 1
                    stats["hook_kills"][hook.split(":")[0]] += 1
                else:
                    stats["blackbox"] += 1
            elif run.rc == 0:
                stats["completed"] += 1
                if whitebox:
                    stats["hook_misses"] += 1
                    stats["whitebox"] += 1
                    stats["failures"].append(f"{label}: the hook was not reached although "
                                             "the dry run reached it (non-deterministic "
                                             "workload?)")
                else:
                    stats["blackbox"] += 1
            # an overlay file the worker made but did not report is not part of the chain
            nxt = os.path.join(ch.folder, C.layer_name(ch.top + 1))
            if os.path.exists(nxt):
                os.unlink(nxt)
            if state["overlay"] is not None:
                lower = os.path.join(ch.folder, C.layer_name(ch.top - 1))
                code, out = C.qemu_check(lower)
                if code != 0:
                    stats["failures"].append(f"{label}: new backing image {lower} fails "
                                             f"qemu-img check ({code}): {out}")
            convert = stats["reports"] % a.convert_every == a.convert_every - 1
            rep = C.verify(ch.top_path, oracle, hashes=ch.hashes, label=label,
                           convert=convert, tmpdir=tmp, allow_torn=True)
            stats["torn"] += rep.torn
            if rep.torn:
                stats["torn_cases"].append(label + ": " + "; ".join(
                    d for d in rep.details if "torn" in d)[:600])
            stats["reports"] += 1
            for f in C.Report.FAIL_FIELDS:
                v = int(getattr(rep, f))
                # LBA counts for lost/wrong data (C11), case counts for everything else
                stats["totals"][f] = stats["totals"].get(f, 0) + (
                    v if f in ("lost", "wrong") else int(bool(v)))
            stats["converts"] += int(rep.converted)
            if run.rc == -9:
                stats["leaks"].append(rep.leaks)
            if rep.failed:
                stats["failures"].append(rep.summary())
                if a.keep_failed:
                    dst = os.path.join(a.keep_failed, f"seed{a.seed}-chain{chain_idx}-gen{gen}")
                    shutil.copytree(ch.folder, dst, dirs_exist_ok=True)
                ch = None      # the chain is no longer trustworthy: start a new one
                continue
            # the image's content becomes the new acknowledged state
            with __import__("engine").open(ch.top_path, readonly=True) as img:
                from reliability import stamps
                obs = stamps.decode(img.read(0, img.size))
                oracle.collapse(obs, img.size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stats["elapsed"] = time.monotonic() - t_start
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
