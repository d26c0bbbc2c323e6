"""Fault-injection matrix (docs/reliability.md C4).

Every scenario of :data:`reliability.faults.SCENARIOS` (allocating write, copy-up write,
discard, write_zeroes, overlay create, reftable growth, L1 growth, flush; the header rewrites
done from Python: rebase, the autoclear bits a read-write open clears; and compound faults: a
fault during the repair of a crash image, by the read-write open of a dirty image or by
check(repair="all"), after which the next repair must finish the job) x every injection
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
import os
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


def test_metadata_written_from_python_goes_through_the_shim(tmp_path):
    """Header rewrites (rebase, the autoclear bits a read-write open clears) and repairs are
    counted by the shim and their syncs reach the barrier callback, like the core's own."""
    import engine
    from reliability.faults import AUTOCLEAR_UNKNOWN

    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    engine.create(base, 1 << 20).close()
    engine.create(top, None, backing="base.qcow2", backing_format="qcow2").close()
    with open(top, "r+b") as f:
        f.seek(88)
        f.write(AUTOCLEAR_UNKNOWN.to_bytes(8, "big"))
    seen = []
    core.set_barrier_callback(lambda fd: seen.append(os.fstat(fd).st_ino))
    try:
        ino = os.stat(top).st_ino
        for what, action in (("autoclear", lambda: engine.open(top).close()),
                             ("rebase", lambda: _rebase(engine, top)),
                             ("repair", lambda: _repair(engine, top))):
            seen.clear()
            core.set_fault(None)
            action()
            io = core.fault_stats()[0]
            assert io["pwrite"] >= 1 and io["sync"] >= 1, (what, io)
            assert ino in seen, (what, seen)
    finally:
        core.set_barrier_callback(None)
        core.set_fault(None)


def _rebase(engine, top):
    with engine.open(top, backing=False) as img:
        img.rebase(None)


def _repair(engine, top):
    with engine.open(top) as img:
        img.write(0, b"x" * 65536)
        img.flush()
    # leak one cluster: raise the refcount of a cluster past the end of what is used
    from engine import format as fmt
    with open(top, "r+b") as f:
        h = fmt.parse_header(f.read(65536), os.path.getsize(top))
        f.seek(h.refcount_table_offset)
        rb = int.from_bytes(f.read(8), "big")
        end = os.path.getsize(top)
        f.truncate(end + 65536)
        f.seek(rb + 2 * (end // 65536))
        f.write((1).to_bytes(2, "big"))
    with engine.open(top) as img:
        res = img.check(repair="all")
        assert res.leaks_fixed == 1, res.to_dict()
