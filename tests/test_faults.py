"""Fault-injection matrix (docs/reliability.md C4).

Every scenario of :data:`reliability.faults.SCENARIOS` (allocating write, copy-up write,
discard, write_zeroes, overlay create, reftable growth, L1 growth, flush) x every injection
point it reaches (the shim's sync/fallocate/ftruncate/pwrite/mremap and every hook) x
{EIO, ENOSPC} x {once, persistent} x N = 1, 2, ... until the operation completes unreached.
The scenarios run in two subprocesses (one JSON object per scenario); each test below judges
one scenario. See reliability/faults.py for what is asserted after each case.

Per PR: N is sampled above 12 for points hit many times (N = 1..8, four random, the last two
and one past the end). Long profile (COWCHAIN_LONG=1): every N.
Replay: ``cd tests && python -m reliability.faults --scenario NAME [--full]``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import engine._core as core
from reliability import summary
from reliability.faults import SCENARIOS
from reliability.killer import TESTS, worker_env
from conftest import LONG

_RESULTS: dict = {}
_TOTAL = {"cases": 0, "delivered": 0, "silent": 0, "untyped": 0, "wrong_errno": 0,
          "sticky_violations": 0, "corruptions": 0, "leak_cases": 0, "max_leak": 0,
          "once_retries": 0, "leaks_after_retry": 0, "data_bad": 0, "recovered": 0,
          "reopen_fail": 0, "qemu_bad": 0, "hooks": set(), "scenarios": 0}


@pytest.fixture(scope="module")
def matrix():
    """Run all scenarios in two subprocess lanes (balanced by expected cost)."""
    names = list(SCENARIOS)
    lanes = [["reftable_grow", "discard", "write_zeroes", "overlay_create"],
             [n for n in names if n not in ("reftable_grow", "discard", "write_zeroes",
                                            "overlay_create")]]
    procs = []
    for lane in lanes:
        args = [sys.executable, "-m", "reliability.faults"]
        for n in lane:
            args += ["--scenario", n]
        if LONG:
            args.append("--full")
        procs.append(subprocess.Popen(args, cwd=TESTS, env=worker_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        so, se = p.communicate(timeout=3600)
        for line in so.decode().splitlines():
            if line.startswith("{"):
                d = json.loads(line)
                _RESULTS[d["scenario"]] = d
        if p.returncode != 0:
            _RESULTS.setdefault("_errors", []).append(
                f"fault lane exited {p.returncode}: {se.decode()[-3000:]}")
    return _RESULTS


def _publish():
    t = _TOTAL
    line = (f"{t['cases']} cases over {t['scenarios']} operations ({t['delivered']} faults "
            f"delivered, {len(t['hooks'])}/{len(core.HOOK_NAMES)} hooks) — {t['silent']} silent "
            f"successes, {t['untyped']} untyped errors, {t['wrong_errno']} wrong errno, "
            f"{t['corruptions']} corruptions, {t['sticky_violations']} sticky-flush "
            f"violations, {t['data_bad']} data losses, {t['reopen_fail']} reopen failures; "
            f"leaks in {t['leak_cases']} cases (max {t['max_leak']} clusters); "
            f"{t['leaks_after_retry']}/{t['once_retries']} once-fault retries left leaks; "
            f"{t['recovered']} fallocate faults recovered by the exact-size retry")
    return summary.publish("faults", line)


@pytest.mark.timeout(4 * 3600 if LONG else 900)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fault_matrix(matrix, name):
    assert "_errors" not in matrix, "\n".join(matrix["_errors"])
    assert name in matrix, f"scenario {name} produced no result"
    d = matrix[name]
    for k in _TOTAL:
        if k == "hooks":
            _TOTAL["hooks"] |= set(d["hooks_hit"])
        elif k == "max_leak":
            _TOTAL[k] = max(_TOTAL[k], d[k])
        elif k == "scenarios":
            _TOTAL[k] += 1
        else:
            _TOTAL[k] += d[k]
    print("\n" + _publish())
    assert not d["never_completed"], f"N loop never completed for {d['never_completed']}"
    fails = d["failures"]
    assert not fails, f"{len(fails)} of {d['cases']} fault cases failed in {name}:\n" + \
        "\n".join(f[:1200] for f in fails[:15])
