"""Kill -9 harness (docs/reliability.md C2).

Lanes of :mod:`reliability.killer` run in parallel subprocesses; each starts
:mod:`reliability.worker` on a chain (base + 0..3 overlays, 512 B..4 KiB clusters, stamped
blocks) and SIGKILLs it at random times (blackbox) or lets it kill itself at a hook
(whitebox, every hook of ``engine._core.HOOK_NAMES`` in turn). After every kill: ``qemu-img
check`` (exit 0 or 3), reopen RO and RW with check() (0 corruptions), the oracle over every
LBA, repair('leaks') then 0 leaks and ``qemu-img check`` exit 0, backing files unchanged;
every 20th also ``qemu-img convert -O raw`` against our reads.

Per PR: ~200 kills. Long profile (COWCHAIN_LONG=1): >= 10,000 kills.
Replay a failure: ``cd tests && python -m reliability.killer --seed LANE_SEED --kills N``
(the failure line names the lane seed, the chain seed and the worker seed / hook).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import engine._core as core
from reliability import summary
from reliability.killer import TESTS, worker_env

LANES = 3


def run_lanes(base_seed: int, kills: int, lanes: int, deadline: float, per_chain: int = 10):
    per = -(-kills // lanes)
    procs = []
    for i in range(lanes):
        args = [sys.executable, "-m", "reliability.killer", "--seed", str(base_seed + i),
                "--kills", str(per), "--per-chain", str(per_chain), "--deadline",
                str(deadline)]
        procs.append(subprocess.Popen(args, cwd=TESTS, env=worker_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    out = []
    for p in procs:
        so, se = p.communicate(timeout=deadline + 600)
        assert p.returncode == 0, f"kill lane failed ({p.returncode}): {se.decode()[-4000:]}"
        out.append(json.loads(so.decode().strip().splitlines()[-1]))
    return out


def _record(results):
    hooks = set()
    leaks = []
    for r in results:
        hooks |= {h for h, n in r["hook_kills"].items() if n}
        leaks += r["leaks"]
    failures = [f for r in results for f in r["failures"]]

    def tot(field):
        return sum(r["totals"].get(field, 0) for r in results)

    kills = sum(r["kills"] for r in results)
    whitebox = sum(n for r in results for n in r["hook_kills"].values())
    line = summary.add_crash(
        kills=kills, blackbox=kills - whitebox, whitebox=whitebox,
        hooks=hooks, crashes=len(leaks), crashes_with_leaks=sum(1 for x in leaks if x),
        max_leak=max(leaks or [0]), converts=sum(r["converts"] for r in results),
        corruptions=tot("corruptions") + tot("check_errors"), lost=tot("lost"),
        wrong=tot("wrong") + tot("size_wrong"), reopen_fail=tot("reopen_fail") + tot("untyped"),
        qemu_bad=tot("qemu_corrupt") + tot("qemu_after_repair"),
        leaks_after_repair=tot("leaks_after_repair"), backing_changed=tot("backing_changed"),
        convert_mismatch=tot("convert_mismatch"), torn=sum(r["torn"] for r in results))
    return kills, hooks, failures, line


def _run(base_seed, kills, deadline, min_kills):
    t0 = time.monotonic()
    results = run_lanes(base_seed, kills, LANES, deadline)
    n, hooks, failures, line = _record(results)
    for r in results:
        for c in r["torn_cases"]:
            print(f"torn unflushed block (not counted as wrong data; D1 covers flushed "
                  f"writes only): {c}")
    print(f"\n{line}\n({time.monotonic() - t0:.0f} s, lanes: "
          f"{[(r['seed'], r['kills'], round(r['elapsed'])) for r in results]})")
    assert not failures, f"{len(failures)} failed crash cases:\n" + "\n".join(failures[:20])
    assert n >= min_kills, f"only {n} kills ran within the time limit"
    return hooks


@pytest.mark.timeout(900)
def test_kill9_per_pr():
    seed = int(os.environ.get("COWCHAIN_KILL_SEED", "1000"))
    hooks = _run(seed, 200, deadline=240, min_kills=150)
    missing = set(core.HOOK_NAMES) - hooks
    assert len(missing) <= 2, f"hooks never killed at: {sorted(missing)}"


@pytest.mark.long
@pytest.mark.timeout(6 * 3600)
def test_kill9_long():
    seed = int(os.environ.get("COWCHAIN_KILL_SEED", "5000"))
    hooks = _run(seed, 10000, deadline=4 * 3600, min_kills=10000)
    assert hooks == set(core.HOOK_NAMES), f"hooks never killed at: {set(core.HOOK_NAMES) - hooks}"
