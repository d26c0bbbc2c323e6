"""Fuzz regression replay and a bounded random-mutation loop (docs/reliability.md C6),
without atheris.

- Every file in tests/corpus/regress/ goes through its target (the file name starts with
  the target's name and a dash, e.g. ``read-1234abcd``; a name without a known prefix goes
  through every target).
- Then, per target, a seeded mutation loop over the seed corpus (built by fuzz/make_corpus.py
  with qemu-img into a temporary folder): bit flips, interesting values in header fields and
  table entries, truncation, splices.

Each runs in child processes (reliability.fuzzrun) with a 1 GiB data limit and a time limit;
the test fails on a death by signal (SIGSEGV/SIGBUS...), a hang, an exception outside the
EngineError hierarchy or a broken target oracle, and names the input (the mutation loop
copies a crashing input into the pytest tmp folder; add it to tests/corpus/regress/ once
minimised: SQLite's rule, a bug is fixed only when its input is in the suite).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import LONG
from reliability import summary
from reliability.killer import TESTS, worker_env

REPO = os.path.dirname(TESTS)
REGRESS = os.path.join(TESTS, "corpus", "regress")
TARGETS = ["header", "read", "check", "write", "ext", "backing"]
MUTATIONS = {"header": 300, "read": 250, "check": 200, "write": 150, "ext": 400,
             "backing": 150}
PER_INPUT_TIMEOUT = 20.0
#: A regression input's child is killed after this (a hang).
REGRESS_TIMEOUT = 10.0
#: ... and the target itself (not counting interpreter start-up) must finish within this:
#: the inputs are small (<= 256 KiB) and fixed, so a slow one is a regression too (C6's
#: budget for Z1 is 50 ms; this is generous for loaded CI machines: check of the
#: 65,536-entry snapshot table in check-snapshot-table-slow takes ~1 s unloaded, ~4 s on a
#: busy 2-core machine).
REGRESS_SLOW = 6.0
_FIG = {"regress": 0, "mutations": 0, "crashes": 0, "hangs": 0, "untyped": 0, "slow": 0}


def _publish():
    summary.publish("fuzz", f"{_FIG['regress']} regression inputs replayed + "
                    f"{_FIG['mutations']} random mutations over {len(TARGETS)} targets — "
                    f"{_FIG['crashes']} crashes (signals), {_FIG['hangs']} hangs, {_FIG['slow']} slow, "
                    f"{_FIG['untyped']} untyped errors/oracle failures "
                    "(atheris runs: see fuzz/README.md)")


def _run(args: list[str], timeout: float):
    """Run the child; return (lines, returncode or None on timeout)."""
    p = subprocess.Popen([sys.executable, "-m", "reliability.fuzzrun", *args], cwd=TESTS,
                         env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        so, se = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        p.kill()
        so, se = p.communicate()
        rc = None
    return so.decode(errors="replace").splitlines(), rc, se.decode(errors="replace")


def _judge(lines, rc, stderr, what: str) -> list[str]:
    problems = []
    last = None
    for ln in lines:
        if ln.startswith("BEGIN "):
            last = ln[6:]
        elif ln.startswith("OK "):
            last = None
        elif ln.startswith("FAIL "):
            ident, _, msg = ln[5:].partition(" ")
            _FIG["untyped"] += 1
            problems.append(f"{what} input {ident}: {msg[:2000]}")
            last = None
    if rc is None:
        _FIG["hangs"] += 1
        problems.append(f"{what}: input {last} hung (no answer within the time limit)")
    elif rc < 0:
        _FIG["crashes"] += 1
        problems.append(f"{what}: input {last} killed the process with "
                        f"{signal.Signals(-rc).name}: {stderr[-2000:]}")
    elif rc != 0 or (lines and lines[-1] != "END"):
        problems.append(f"{what}: runner exited {rc}: {stderr[-2000:]}")
    return problems


def _regress_files():
    if not os.path.isdir(REGRESS):
        return []
    return sorted(os.path.join(REGRESS, f) for f in os.listdir(REGRESS)
                  if not f.startswith(".") and f != "README.md")


def test_replay_regress_corpus():
    files = _regress_files()
    problems = []
    for target in TARGETS:
        mine = [f for f in files if os.path.basename(f).split("-", 1)[0] == target or
                os.path.basename(f).split("-", 1)[0] not in TARGETS]
        # one input per child: a crash then names its input, and one cannot hide another
        for f in mine:
            lines, rc, err = _run(["replay", target, f], REGRESS_TIMEOUT)
            _FIG["regress"] += 1
            problems += _judge(lines, rc, err, f"replay {target}")
            for ln in lines:
                if ln.startswith("OK ") and float(ln.rsplit(" ", 1)[1]) > REGRESS_SLOW:
                    _FIG["slow"] += 1
                    problems.append(f"replay {target} input {f}: took {ln.rsplit(' ', 1)[1]} s "
                                    f"(limit {REGRESS_SLOW} s)")
    _publish()
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    sys.path.insert(0, os.path.join(REPO, "fuzz"))
    try:
        import make_corpus
    finally:
        sys.path.pop(0)
    make_corpus.build(str(out))
    return out


@pytest.mark.timeout(4 * 3600 if LONG else 600)
@pytest.mark.parametrize("target", TARGETS)
def test_random_mutations(seeds, tmp_path, target):
    sub = {"ext": "ext", "backing": "backing"}.get(target, "images")
    seed_dir = os.path.join(seeds, sub)
    count = MUTATIONS[target] * (20 if LONG else 1)
    done = 0
    problems = []
    batch = 0
    while done < count:
        n = min(100, count - done)
        current = tmp_path / f"current-{batch}"
        lines, rc, err = _run(["mutate", target, seed_dir, str(n), str(1000 * batch + 7),
                               str(current)], PER_INPUT_TIMEOUT * n / 10 + 30)
        ran = sum(1 for ln in lines if ln.startswith(("OK ", "FAIL ")))
        _FIG["mutations"] += ran
        p = _judge(lines, rc, err, f"mutate {target} batch {batch} (seed {1000 * batch + 7})")
        if p and (rc is None or rc < 0) and current.exists():
            keep = tmp_path / f"{target}-crash-batch{batch}"
            shutil.copy(current, keep)
            p[-1] += f" (input kept at {keep})"
        problems += p
        done += n
        batch += 1
    _publish()
    assert not problems, "\n".join(problems[:10])
