"""Smoke test of the side-by-side benchmark: ``bench/compare_qemu.py --quick`` runs to the end
and prints a row for every figure of README's Performance table.

No timing is asserted here (speed is never asserted in the test suite): a row may say met,
MISSED, info or N/A.  The full run and its numbers are in bench/RESULTS.md.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "compare_qemu.py"

pytestmark = pytest.mark.qemu


def _figures() -> list[str]:
    """FIGURES of the script, read without importing it."""
    tree = ast.parse(SCRIPT.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "FIGURES"
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("compare_qemu.py defines no FIGURES list")


def test_compare_qemu_quick(tmp_path):
    import engine

    env = dict(os.environ)
    # the script must measure the engine this test run imports (installed in CI)
    env["COWCHAIN_ENGINE_PATH"] = str(pathlib.Path(engine.__file__).resolve().parent.parent)
    out_json = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out_json),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"

    figures = _figures()
    assert len(figures) >= 14
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"\|\s*([a-z0-9_]+):", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in line.strip().strip("|").split("|")]
    for key in figures:
        assert key in rows, f"no table row for {key!r}:\n{proc.stdout}"
        result = rows[key][-1]
        assert result in ("met", "MISSED", "info") or result.startswith("N/A"), rows[key]
    assert "targets met:" in proc.stdout

    data = json.loads(out_json.read_text())
    assert [r["key"] for r in data["rows"]] == figures
    assert data["meta"]["qemu"].startswith("qemu-img version")
