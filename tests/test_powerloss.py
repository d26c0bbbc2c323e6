"""Power-loss simulator (docs/reliability.md C3).

Lanes of :mod:`reliability.powerloss` run in parallel subprocesses. Each runs seeded workloads
in-process with the core's barrier callback recording the top image's durable content at
every sync; crash images between barrier k and k+1 (and between the last barrier and the
unsynced live file) keep, drop or tear each changed 4 KiB page and take the old, new or an
in-between file size, R = 8 variants per crash point. Each variant: ``qemu-img check`` (exit
0 or 3), RO and RW open with check() (0 corruptions), the oracle for the flushes acknowledged
by then; every 25th also repair('leaks') (0 leaks after) and ``qemu-img convert``.

Per PR: ~2,000 variants. Long profile (COWCHAIN_LONG=1): >= 100,000.
Replay: ``cd tests && python -m reliability.powerloss --seed LANE_SEED --variants N``
(``COWCHAIN_KEEP_FAILED=DIR`` keeps each failing chain with the two durable states).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from reliability import summary
from reliability.killer import TESTS, worker_env

LANES = 2


def run_lanes(base_seed: int, variants: int, lanes: int, deadline: float):
    per = -(-variants // lanes)
    procs = [subprocess.Popen([sys.executable, "-m", "reliability.powerloss", "--seed",
                               str(base_seed + i), "--variants", str(per), "--deadline",
                               str(deadline)], cwd=TESTS, env=worker_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(lanes)]
    out = []
    for p in procs:
        so, se = p.communicate(timeout=deadline + 600)
        assert p.returncode == 0, f"power-loss lane failed ({p.returncode}): {se.decode()[-4000:]}"
        out.append(json.loads(so.decode().strip().splitlines()[-1]))
    return out


def record(results):
    def tot(f):
        return sum(r["totals"].get(f, 0) for r in results)
    leaks = [x for r in results for x in r["leaks"]]
    line = summary.add_crash(
        variants=sum(r["variants"] for r in results),
        crash_points=sum(r["crash_points"] for r in results),
        crashes=len(leaks), crashes_with_leaks=sum(1 for x in leaks if x),
        max_leak=max(leaks or [0]), converts=sum(r["converts"] for r in results),
        corruptions=tot("corruptions") + tot("check_errors"), lost=tot("lost"),
        wrong=tot("wrong") + tot("size_wrong"), reopen_fail=tot("reopen_fail") + tot("untyped"),
        qemu_bad=tot("qemu_corrupt") + tot("qemu_after_repair"),
        leaks_after_repair=tot("leaks_after_repair"), backing_changed=tot("backing_changed"),
        convert_mismatch=tot("convert_mismatch"))
    return line


def _run(seed, variants, deadline, min_variants):
    t0 = time.monotonic()
    results = run_lanes(seed, variants, LANES, deadline)
    line = record(results)
    failures = [f for r in results for f in r["failures"]]
    n = sum(r["variants"] for r in results)
    print(f"\n{line}\n({time.monotonic() - t0:.0f} s)")
    assert not failures, f"{len(failures)} failed power-loss variants:\n" + "\n".join(failures[:20])
    assert n >= min_variants, f"only {n} variants ran within the time limit"


@pytest.mark.timeout(900)
def test_powerloss_per_pr():
    _run(int(os.environ.get("COWCHAIN_PL_SEED", "1")), 2000, deadline=200, min_variants=1500)


@pytest.mark.long
@pytest.mark.timeout(8 * 3600)
def test_powerloss_long():
    _run(int(os.environ.get("COWCHAIN_PL_SEED", "100")), 100000, deadline=6 * 3600,
         min_variants=100000)


# --- C7: the stateful model test with crash and fault steps -----------------------------------

from hypothesis import settings as _settings  # noqa: E402

from conftest import LONG, LONG_EXAMPLES  # noqa: E402
from reliability import stateful as _stateful  # noqa: E402

TestChainModelWithCrashes = _stateful.ChainMachine.TestCase
TestChainModelWithCrashes.pytestmark = [pytest.mark.timeout(12 * 3600 if LONG else 900)]
# Per PR no shrinking: each step costs milliseconds (check() after every step, qemu-img in
# crash steps), and shrinking a failure can take many minutes; the falsifying sequence is
# printed as found. The long profile shrinks.
from hypothesis import Phase  # noqa: E402

TestChainModelWithCrashes.settings = _settings(
    max_examples=(LONG_EXAMPLES or 5000) if LONG else 50, stateful_step_count=80 if LONG else 40, deadline=None,
    phases=list(Phase) if LONG else [Phase.explicit, Phase.reuse, Phase.generate],
    database=None if os.environ.get("COWCHAIN_NO_HYPOTHESIS_DB") else _settings().database)


def test_stateful_summary():
    """Publish the stateful figures (runs after the state machine in file order)."""
    f = _stateful.FIG
    summary.publish("stateful", f"{f['examples']} examples, {f['steps']} steps, deepest chain "
                    f"{f['max_depth']}, {f['crash_steps']} crash steps, {f['fault_steps']} "
                    f"fault steps ({f['faults_delivered']} delivered), {f['mismatches']} model "
                    "mismatches")
