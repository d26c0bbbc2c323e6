"""README's examples run as a new user would run them, and print what README says.

README.md is read when the tests run (nothing is copied here), so a change of README and of
the code it describes are checked together:

- every ```python block runs in a fresh folder (``python -u``, so its prints and the output of
  the tools it starts come in order) and must exit 0;
- the ```sh block of the command-line section (the one followed by an "Output" block) runs in
  bash in a fresh folder, with the ``cowchain`` of this interpreter first on ``PATH``; every
  command must exit 0, or the code its comment names ("exit 15");
- where README shows an "Output:" block after an example, the printed lines (stdout and stderr,
  in order) must equal it, modulo what varies between runs: ids (UUIDs), timestamps, the folder
  the example runs in, and, in a line that contains ``...``, the ``...`` (any text) and the
  digits (timings such as qemu-io's "00.00 sec").
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"

_FENCE = re.compile(r"^```(\w*)\s*$")
_OUTPUT = re.compile(r"^Output( \([^)]*\))?:\s*$")


class Block:
    def __init__(self, lang: str, code: str, line: int, section: str):
        self.lang, self.code, self.line, self.section = lang, code, line, section
        self.output: str | None = None      # the "Output" block that follows, if any

    def __repr__(self) -> str:
        return f"README.md:{self.line} ({self.section})"


def _blocks() -> list[Block]:
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    section = ""
    i = 0
    want_output = False
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        m = _FENCE.match(line)
        if m:
            start = i + 1
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
            code = "\n".join(lines[start:i]) + "\n"
            if want_output and blocks:
                blocks[-1].output = code
            else:
                blocks.append(Block(m.group(1), code, start, section))
            want_output = False
        elif line.strip():
            # "Output:" right after an example introduces its printed output
            want_output = bool(_OUTPUT.match(line)) and bool(blocks) and blocks[-1].output is None
        i += 1
    return blocks


BLOCKS = _blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]
CLI = [b for b in BLOCKS if b.lang == "sh" and b.output is not None]

_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
_TIME = re.compile(r"\b\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(\.\d+)?Z?\b")


def _normalise(text: str, folder: str | None = None) -> list[str]:
    out = []
    for line in text.splitlines():
        if folder:
            line = line.replace(folder, "<dir>")
        line = _UUID.sub("<id>", line)
        line = _TIME.sub("<time>", line)
        # README's own folder (e.g. /tmp/qs): the directory part of an absolute path
        line = re.sub(r"(?<![\w.<>])/(?:[^\s/'\"]+/)+", "<dir>/", line).rstrip()
        out.append(line)
    while out and not out[-1]:
        out.pop()
    return out


def _matches(expected: str, actual: str) -> bool:
    if "..." not in expected:
        return expected == actual
    pattern = ""
    for part in re.split(r"(\.\.\.|\d+)", expected):
        if part == "...":
            pattern += ".*"
        elif part.isdigit():
            pattern += r"\d+"
        else:
            pattern += re.escape(part)
    return re.fullmatch(pattern, actual) is not None


def _compare(block: Block, printed: str, folder: str) -> None:
    assert block.output is not None
    want = _normalise(block.output)
    got = _normalise(printed, folder)
    bad = [f"line {n + 1}:\n  README: {w!r}\n  actual: {g!r}"
           for n, (w, g) in enumerate(zip(want, got)) if not _matches(w, g)]
    if len(want) != len(got):
        bad.append(f"README shows {len(want)} lines, the example printed {len(got)}")
    assert not bad, (f"{block}: the printed output differs from README's:\n" + "\n".join(bad)
                     + "\n--- printed:\n" + printed)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("COWCHAIN_REPO", None)
    env.pop("COWCHAIN_DEBUG", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_readme_has_the_examples():
    assert len(PYTHON) >= 2, PYTHON                 # the quick start and the chain example
    assert PYTHON[0].output is not None, "the quick start lost its Output block"
    assert len(CLI) == 1, CLI
    assert "cowchain " in CLI[0].code


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: f"line{b.line}")
def test_python_example(block, tmp_path):
    res = subprocess.run([sys.executable, "-u", "-c", block.code], cwd=tmp_path, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=300)
    assert res.returncode == 0, f"{block} exits {res.returncode}:\n{res.stdout}"
    if block.output is not None:
        _compare(block, res.stdout, str(tmp_path))


def _script_with_exit_checks(code: str) -> str:
    """The block's commands, each followed by a check of its exit code (0, or the code its
    comment names), reported on stderr with a marker the test looks for."""
    out = ["set -u"]
    for n, line in enumerate(code.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.search(r"#.*\bexit (\d+)\b", line)
        want = int(m.group(1)) if m else 0
        out.append(line)
        out.append(f'__rc=$?; [ "$__rc" -eq {want} ] || '
                   f'echo "README-EXIT line {n}: exit $__rc, README says {want}" >&2')
    return "\n".join(out) + "\n"


def test_cli_example(tmp_path):
    (block,) = CLI
    script = _script_with_exit_checks(block.code)
    res = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=600)
    wrong = [line for line in res.stdout.splitlines() if line.startswith("README-EXIT")]
    assert not wrong, f"{block}: exit codes differ from README:\n" + "\n".join(wrong) + \
        "\n--- printed:\n" + res.stdout
    _compare(block, res.stdout, str(tmp_path))
