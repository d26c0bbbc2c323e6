"""The one-line figures of the reliability suites (docs/reliability.md C11).

Each suite records what it ran here; :func:`publish` (re)writes its line in the SUMMARY list of
tests/conftest.py, which pytest prints in the "cowchain summaries" section at the end of the
run (whatever ``-s`` says). The kill harness and the power-loss simulator share the "crash:"
line, as C11's one-line form does.
"""

from __future__ import annotations

import sys

CRASH = {"kills": 0, "blackbox": 0, "whitebox": 0, "variants": 0, "crash_points": 0,
         "hooks": set(), "corruptions": 0, "lost": 0, "wrong": 0, "reopen_fail": 0,
         "crashes_with_leaks": 0, "crashes": 0, "max_leak": 0, "leaks_after_repair": 0,
         "qemu_bad": 0, "backing_changed": 0, "converts": 0, "convert_mismatch": 0,
         "torn": 0}
N_HOOKS = 14


def _summary_list():
    mod = sys.modules.get("conftest")
    if mod is not None and hasattr(mod, "SUMMARY"):
        return mod.SUMMARY
    return None


_OWN: dict[str, str] = {}


def publish(prefix: str, line: str) -> str:
    """Put ``prefix: line`` into the run's summary (replacing the line this module published
    earlier under that prefix, never another suite's line with the same prefix) and return
    it."""
    text = f"{prefix}: {line}"
    lst = _summary_list()
    if lst is not None:
        old = _OWN.get(prefix)
        if old is not None and old in lst:
            lst[lst.index(old)] = text
        else:
            lst.append(text)
    _OWN[prefix] = text
    return text


def add_crash(**counts) -> str:
    for k, v in counts.items():
        if k == "hooks":
            CRASH["hooks"] |= set(v)
        elif k == "max_leak":
            CRASH["max_leak"] = max(CRASH["max_leak"], v)
        else:
            CRASH[k] += v
    c = CRASH
    pct = 100.0 * c["crashes_with_leaks"] / c["crashes"] if c["crashes"] else 0.0
    line = (f"{c['kills']} kills ({c['blackbox']} blackbox, {c['whitebox']} at hooks) + "
            f"{c['variants']} power-loss variants ({c['crash_points']} crash points) over "
            f"{len(c['hooks'])}/{N_HOOKS} hooks — {c['corruptions']} corruptions, "
            f"{c['lost']} lost flushed writes, {c['wrong']} wrong data "
            f"({c['torn']} unflushed blocks torn by a kill mid-store), "
            f"{c['reopen_fail']} reopen failures; leaks in {pct:.1f} % of crashes "
            f"(max {c['max_leak']} clusters), {c['leaks_after_repair']} after repair; "
            f"qemu-img check bad {c['qemu_bad']}, backing changed {c['backing_changed']}, "
            f"qemu-img convert compared {c['converts']} ({c['convert_mismatch']} mismatches)")
    return publish("crash", line)
