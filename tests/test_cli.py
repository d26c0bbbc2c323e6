"""The ``cowchain`` command line, run as a subprocess (``python -m engine.cli``, which is what
the console script calls): JSON output parsed, exit codes, one-line errors, the progress bar."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest

import engine
from engine import cli
from engine.errors import EX_USAGE
from qemu import assert_qemu_clean, convert_to_raw, qemu_img_json

pytestmark = pytest.mark.qemu

MiB = 1 << 20


def _env(repo=None, **extra):
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))
    env["PYTHONPATH"] = pkg_parent + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("COWCHAIN_REPO", None)
    env.pop("COWCHAIN_DEBUG", None)
    if repo is not None:
        env["COWCHAIN_REPO"] = str(repo)
    env.update(extra)
    return env


def run(*args, repo=None, input=None, stderr_tty=False, **extra):
    """Run cowchain ARGS; returns (exit code, stdout bytes, stderr text)."""
    argv = [sys.executable, "-m", "engine.cli", *map(str, args)]
    if not stderr_tty:
        p = subprocess.run(argv, env=_env(repo, **extra), capture_output=True, input=input,
                           timeout=120)
        return p.returncode, p.stdout, p.stderr.decode()
    master, slave = pty.openpty()
    p = subprocess.Popen(argv, env=_env(repo, **extra), stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        err += chunk
    out = p.stdout.read()
    p.wait(timeout=120)
    os.close(master)
    return p.returncode, out, err.decode(errors="replace")


def ok(*args, **kw):
    code, out, err = run(*args, **kw)
    assert code == 0, (args, code, err)
    return out


def js(*args, **kw):
    return json.loads(ok(*args, "--output", "json", **kw))


def fails(code, *args, **kw) -> str:
    got, out, err = run(*args, **kw)
    assert got == code, (args, got, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err            # one clear line, never a traceback
    assert lines[0].startswith("cowchain"), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def repo(tmp_path):
    path = tmp_path / "repo"
    assert js("repo", "init", path) == {"repository": str(path), "created": True}
    return path


VOLUME_KEYS = {"id", "chain", "path", "format", "role", "parent", "legality", "created"}
SNAPSHOT_KEYS = {"id", "chain", "created", "description", "volume"}
CHAIN_KEYS = {"name", "virtual-size", "cluster-size", "created", "leaf", "previewing", "origin",
              "volumes", "snapshots"}


def test_end_to_end(repo, tmp_path):
    c = js("chain", "create", "vm1", "64M", "--format", "qcow2", repo=repo)
    assert set(c) == CHAIN_KEYS
    assert c["virtual-size"] == 64 * MiB and c["cluster-size"] == 65536
    assert [set(v) for v in c["volumes"]] == [VOLUME_KEYS]
    assert c["volumes"][0]["role"] == "leaf"

    data = tmp_path / "data.bin"
    data.write_bytes(b"A" * MiB)
    assert js("chain", "write", "vm1", "--file", data, repo=repo) == {
        "chain": "vm1", "offset": 0, "length": MiB}
    s1 = js("chain", "snapshot", "vm1", "-d", "clean install", repo=repo)
    assert set(s1) == SNAPSHOT_KEYS and s1["description"] == "clean install"
    # Human output of snapshot is the bare id (for SNAP=$(cowchain chain snapshot vm1)).
    ok("chain", "write", "vm1", "--offset", "2M", "--pattern", "0x42", "--length", "64K",
       repo=repo)
    s2 = ok("chain", "snapshot", "vm1", repo=repo).decode().strip()
    assert len(s2) == 36
    ok("chain", "write", "vm1", "--offset", "4M", "--pattern", "67", "--length", "4K", repo=repo)

    snaps = js("chain", "snapshots", "vm1", repo=repo)
    assert [s["id"] for s in snaps] == [s1["id"], s2]
    info = js("chain", "info", "vm1", repo=repo)
    assert [v["role"] for v in info["volumes"]] == ["base", "internal", "leaf"]
    assert info["snapshots"] == snaps
    human = ok("chain", "info", "vm1", repo=repo).decode()
    assert "clean install" in human and "volumes (base first)" in human

    diff = js("chain", "diff", "vm1", s1["id"][:8], repo=repo)
    assert diff == [{"start": 2 * MiB, "length": 65536, "zero": False, "data": True},
                    {"start": 4 * MiB, "length": 65536, "zero": False, "data": True}]
    assert js("chain", "diff", "vm1", s1["id"], s2, repo=repo) == diff[:1]

    expected = bytearray(64 * MiB)
    expected[:MiB] = b"A" * MiB
    expected[2 * MiB:2 * MiB + 65536] = b"B" * 65536
    expected[4 * MiB:4 * MiB + 4096] = b"C" * 4096
    for fmt in ("raw", "qcow2"):
        out = tmp_path / f"vm1.{fmt}"
        r = js("chain", "export", "vm1", out, "--format", fmt, repo=repo)
        # Data is written in whole 64 KiB blocks: the 4 KiB of C fill one.
        assert r == {"path": str(out), "format": fmt, "virtual-size": 64 * MiB,
                     "snapshot": None, "data-bytes": MiB + 2 * 65536}
        assert convert_to_raw(out, fmt) == bytes(expected)
    r = js("chain", "import", "copy", tmp_path / "vm1.qcow2", "-f", "qcow2", "--format",
           "qcow2", repo=repo)
    assert r["name"] == "copy" and r["virtual-size"] == 64 * MiB and len(r["volumes"]) == 1
    js("chain", "export", "copy", tmp_path / "copy.raw", repo=repo)
    assert convert_to_raw(tmp_path / "copy.raw", "raw") == bytes(expected)
    assert js("chain", "resize", "copy", "96M", repo=repo)["virtual-size"] == 96 * MiB
    assert "shrink" in fails(4, "chain", "resize", "copy", "32M", repo=repo)
    ok("chain", "delete", "copy", repo=repo)
    fails(EX_USAGE, "chain", "import", "copy2", tmp_path / "vm1.qcow2", repo=repo)  # no -f
    fails(12, "chain", "export", "vm1", tmp_path / "vm1.raw", repo=repo)
    r = js("chain", "export", "vm1", tmp_path / "vm1.raw", "--snapshot", s1["id"], "--force",
           repo=repo)
    assert r["snapshot"] == s1["id"]
    assert convert_to_raw(tmp_path / "vm1.raw", "raw") == b"A" * MiB + bytes(63 * MiB)

    # The leaf, as QEMU sees it, is the disk.
    leaf = info["volumes"][-1]["path"]
    chain_info = qemu_img_json("info", "--backing-chain", "-f", "qcow2", leaf)
    assert len(chain_info) == 3
    out = ok("chain", "read", "vm1", "--offset", "2M", "--length", "8", repo=repo)
    assert out == b"B" * 8

    clone = js("chain", "clone", "vm1", s1["id"], "vm2", repo=repo)
    assert clone["origin"] == {"chain": "vm1", "snapshot": s1["id"]}
    assert [v["role"] for v in clone["volumes"]] == ["shared", "leaf"]
    line = fails(15, "chain", "delete-snapshot", "vm1", s1["id"], repo=repo)
    assert "clone 'vm2'" in line

    r = js("chain", "delete-snapshot", "vm1", s2, repo=repo)
    assert set(r) == {"snapshot", "direction", "removed-volume", "kept-volume", "copied-bytes",
                      "commit-bytes", "pull-bytes"}
    assert r["snapshot"] == s2 and r["direction"] in ("commit", "pull")
    chains = js("chain", "list", repo=repo)
    assert chains == [
        {"name": "vm1", "virtual-size": 64 * MiB, "volumes": 2, "snapshots": 1,
         "previewing": None, "origin": None},
        {"name": "vm2", "virtual-size": 64 * MiB, "volumes": 2, "snapshots": 0, "previewing": None,
         "origin": {"chain": "vm1", "snapshot": s1["id"]}}]
    check = js("chain", "check", repo=repo)
    assert check["ok"] is True and check["exit-code"] == 0 and check["problems"] == []
    assert {v["id"] for v in check["volumes"]} >= {v["id"] for v in info["volumes"][:1]}
    for v in check["volumes"]:
        if v["format"] == "qcow2":
            assert v["check"]["check-errors"] == 0
            assert_qemu_clean(v["path"])
    assert ok("chain", "read", "vm1", "--offset", "4M", "--length", "4", repo=repo) == b"CCCC"


def test_revert_preview_and_delete(repo):
    ok("chain", "create", "vm1", "1M", repo=repo)
    ok("chain", "write", "vm1", "--pattern", "1", "--length", "4K", repo=repo)
    s1 = ok("chain", "snapshot", "vm1", repo=repo).decode().strip()
    ok("chain", "write", "vm1", "--pattern", "2", "--length", "4K", repo=repo)
    s2 = ok("chain", "snapshot", "vm1", repo=repo).decode().strip()

    p = js("chain", "preview", "vm1", s1, repo=repo)
    assert p["previewing"] == s1
    assert ok("chain", "read", "vm1", "--length", "1", repo=repo) == b"\1"
    assert "previewing" in fails(15, "chain", "snapshot", "vm1", repo=repo)
    u = js("chain", "undo-preview", "vm1", repo=repo)
    assert u["previewing"] is None
    assert ok("chain", "read", "vm1", "--length", "1", repo=repo) == b"\2"
    ok("chain", "preview", "vm1", s1, repo=repo)
    c = js("chain", "commit-preview", "vm1", repo=repo)
    assert [s["id"] for s in c["snapshots"]] == [s1]
    ok("chain", "write", "vm1", "--pattern", "3", "--length", "4K", repo=repo)
    r = js("chain", "revert", "vm1", s1, repo=repo)
    assert [s["id"] for s in r["snapshots"]] == [s1]
    assert ok("chain", "read", "vm1", "--length", "1", repo=repo) == b"\1"
    fails(16, "chain", "revert", "vm1", s2, repo=repo)
    assert js("chain", "delete", "vm1", repo=repo) == {"deleted": "vm1"}
    assert js("chain", "list", repo=repo) == []
    assert ok("chain", "list", repo=repo) == b"(no chains)\n"


def test_options_before_or_after_the_verb_and_from_the_environment(repo):
    ok("chain", "create", "a", "1M", repo=repo)
    code, out, err = run("--repo", repo, "--output", "json", "chain", "list")
    assert code == 0 and json.loads(out)[0]["name"] == "a"
    code, out, err = run("chain", "list", "--output", "json", "--repo", repo)
    assert code == 0 and json.loads(out)[0]["name"] == "a"
    assert json.loads(ok("chain", "list", "--output", "json", repo=repo))[0]["name"] == "a"
    assert ok("chain", "list", repo=repo).decode().startswith("NAME")


def test_errors_are_one_line_with_stable_exit_codes(repo, tmp_path):
    ok("chain", "create", "a", "1M", repo=repo)
    assert "no repository" in fails(EX_USAGE, "chain", "list")
    assert "no cowchain repository" in fails(16, "chain", "list", "--repo", tmp_path / "none")
    assert "no chain named 'b'" in fails(16, "chain", "info", "b", repo=repo)
    assert "exists already" in fails(15, "chain", "create", "a", "1M", repo=repo)
    assert "invalid size" in fails(EX_USAGE, "chain", "create", "b", "ten", repo=repo)
    assert "multiple of 512" in fails(12, "chain", "create", "b", "1000", repo=repo)
    assert "invalid chain name" in fails(12, "chain", "create", "a/b", "1M", "--repo", repo)
    fails(EX_USAGE, "chain", "frobnicate", repo=repo)
    fails(EX_USAGE, "chain", repo=repo)
    fails(EX_USAGE, "chain", "create", "b", repo=repo)
    assert "has no snapshot" in fails(16, "chain", "revert", "a", "ffff", repo=repo)
    assert "not previewing" in fails(15, "chain", "undo-preview", "a", repo=repo)
    assert "already holds a cowchain repository" in fails(15, "repo", "init", repo)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_bytes(b"")
    assert "exists and is not an empty folder" in fails(15, "repo", "init", tmp_path / "other")
    # a missing file has its own exit code, not a usage error's or check's
    fails(engine.ImageNotFound.exit_code, "chain", "write", "a", "--file",
          tmp_path / "missing", repo=repo)
    with engine.Repository.open(repo):
        # read verbs open the repository read-only: they work beside a writer
        assert [c["name"] for c in js("chain", "list", repo=repo)] == ["a"]
        assert js("chain", "info", "a", repo=repo)["name"] == "a"
        assert "in use by another process" in fails(15, "chain", "snapshot", "a", repo=repo)


def test_internal_errors_are_one_line_too(monkeypatch, capsys, repo):
    from engine import repository

    def boom(*a, **k):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(repository.Repository, "open", classmethod(boom))
    assert cli.main(["--repo", str(repo), "chain", "list"]) == 70
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: RuntimeError: something unexpected" in err


def test_check_reports_and_repairs(repo):
    ok("chain", "create", "a", "1M", "--format", "qcow2", repo=repo)
    (repo / "volumes" / "junk.qcow2").write_bytes(b"junk")
    code, out, err = run("chain", "check", "--output", "json", repo=repo)
    assert code == 2
    d = json.loads(out)
    assert d["ok"] is False and [p["kind"] for p in d["problems"]] == ["stray-file"]
    code, out, err = run("repo", "check", repo=repo)
    assert code == 2 and b"stray-file" in out
    d = js("repo", "check", "--repair", repo=repo)
    assert d["ok"] is True and d["problems"][0]["repaired"] is True
    assert js("chain", "check", "a", repo=repo)["problems"] == []


def test_progress_bar_on_a_tty_only(repo, tmp_path):
    ok("chain", "create", "a", "64M", repo=repo)
    ok("chain", "write", "a", "--pattern", "9", "--length", "24M", repo=repo)
    code, out, err = run("chain", "export", "a", tmp_path / "x.raw", repo=repo, stderr_tty=True)
    assert code == 0, err
    assert "exporting [" in err and "100.0%" in err
    code, out, err = run("chain", "export", "a", tmp_path / "y.raw", repo=repo)
    assert code == 0 and err == ""


@pytest.mark.parametrize("text,value", [("4096", 4096), ("512M", 512 << 20), ("10G", 10 << 30),
                                        ("1T", 1 << 40), ("64k", 65536), ("1.5K", 1536),
                                        ("2GiB", 2 << 30), ("3MB", 3 << 20)])
def test_parse_size(text, value):
    assert cli.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "ten", "1.3K", "-1", "5X"])
def test_parse_size_refuses(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_size(text)


# --- exit codes, hints, help (one table, the command's own words) ---------------------------

def test_exit_codes_are_one_table_without_collisions():
    from engine import errors

    codes = [code for code, _ in errors.exit_codes()]
    assert len(codes) == len(set(codes)), errors.exit_code_table()
    classes = errors._error_classes()
    assert {c.__name__ for c in classes} >= {n for n in errors.__all__ if n != "io_error"}
    by_code = {}
    for cls in classes:
        assert "exit_code" in cls.__dict__, f"{cls.__name__} has no exit code of its own"
        assert cls.exit_code not in by_code, (cls, by_code.get(cls.exit_code))
        by_code[cls.exit_code] = cls
    # check's codes are qemu-img check's, and nothing else uses 1-3
    reserved = {errors.EX_CHECK_INCOMPLETE: 1, errors.EX_CHECK_CORRUPT: 2,
                errors.EX_CHECK_LEAKS: 3}
    assert all(k == v for k, v in reserved.items())
    assert not set(by_code) & {0, 1, 2, 3, errors.EX_USAGE, errors.EX_SOFTWARE,
                               errors.EX_IOERR, errors.EX_INTERRUPTED}
    assert errors.EX_USAGE not in (1, 2, 3)
    # the missing-file code is its own
    assert [c for c in classes if c.exit_code == engine.ImageNotFound.exit_code] == \
        [engine.ImageNotFound]


def test_help_and_readme_show_the_exit_code_table():
    from engine import errors

    table = errors.exit_code_table()
    code, out, err = run("--help")
    assert code == 0 and table in out.decode()
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert f"```\n{table}\n```" in readme, "README's exit code table is not the generated one"


def test_usage_errors_do_not_share_check_codes(repo, tmp_path):
    code, out, err = run("chain", "frobnicate", repo=repo)
    assert code == cli.EX_USAGE == 64
    assert fails(64, "chain", "create", "b", "99999999999999999999999E", repo=repo)
    assert "64 bits" in fails(64, "chain", "create", "b", "16E", repo=repo)
    ok("chain", "create", "a", "1M", "--format", "qcow2", repo=repo)
    (repo / "volumes" / "junk.qcow2").write_bytes(b"junk")
    code, out, err = run("chain", "check", repo=repo)
    assert code == 2 and b"1 volume checked" in out and b"1 problem left" in out


def _text(node) -> str:
    """A string literal or f-string as text, its fields as X."""
    import ast

    if isinstance(node, ast.Constant):
        return node.value
    return "".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values)


def _outer_strings(node) -> list:
    """The string literals and f-strings in NODE, not the pieces inside an f-string."""
    import ast

    if isinstance(node, (ast.Constant, ast.JoinedStr)):
        return [node]
    return [n for child in ast.iter_child_nodes(node) for n in _outer_strings(child)]


def _engine_hints() -> tuple[list[str], list[str]]:
    """Every hint an engine error can carry: (Python hints, which the CLI maps through
    CLI_HINTS: the classes' defaults and every literal hint= argument in the engine's source;
    command-line hints given as cli_hint=, shown as they are).  F-strings have their fields
    as X.  A hint built in a variable is allowed beside a cli_hint= variable; every
    string assigned to that variable in the function counts as a command-line hint (a hint
    variable without a cli_hint: its strings count as Python hints)."""
    import ast

    from engine import errors

    hints = [c.default_hint for c in errors._error_classes() if c.default_hint]
    cli_hints: list[str] = []
    strings = (ast.Constant, ast.JoinedStr)
    root = os.path.dirname(os.path.abspath(engine.__file__))
    for top, _dirs, files in os.walk(root):
        for f in files:
            if not f.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(top, f)).read())
            for func in ast.walk(tree):
                if not isinstance(func, (ast.FunctionDef, ast.Module)):
                    continue
                assigned: dict[str, list[str]] = {}
                for node in ast.walk(func):
                    if isinstance(node, (ast.Assign, ast.AugAssign)):
                        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                        parts = _outer_strings(node.value)
                        for t in targets:
                            if isinstance(t, ast.Name):
                                assigned.setdefault(t.id, []).extend(
                                    _text(n) for n in parts
                                    if not isinstance(n, ast.Constant) or isinstance(n.value, str))
                for node in ast.walk(func):
                    if not isinstance(node, ast.Call):
                        continue
                    kws = {kw.arg: kw.value for kw in node.keywords}
                    value = kws.get("hint")
                    if value is None or (isinstance(value, ast.Constant) and value.value is None):
                        continue
                    if isinstance(value, strings):
                        hints.append(_text(value))
                        continue
                    cli = kws.get("cli_hint")
                    if cli is None:      # a hint chosen among literals held in a variable
                        assert isinstance(value, ast.Name) and assigned.get(value.id), \
                            (f, "a hint must be a literal or a variable of literals",
                             ast.dump(value))
                        hints.extend(assigned[value.id])
                        continue
                    assert isinstance(cli, ast.Name) and assigned.get(cli.id), \
                        (f, "a cli_hint must be a variable of literals", ast.dump(cli))
                    cli_hints.extend(assigned[cli.id])
    return hints, cli_hints


def _parser_commands():
    """{('chain', 'export'): {'--force', ...}, ...} and all flags, from build_parser()."""
    import argparse

    def subparsers(p):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                return a.choices
        return {}

    commands = {}
    top = cli.build_parser()
    top_flags = {o for a in top._actions for o in a.option_strings}
    for g, gp in subparsers(top).items():
        for v, vp in subparsers(gp).items():
            commands[(g, v)] = {o for a in vp._actions for o in a.option_strings} | top_flags
    return commands


def test_every_cli_hint_names_real_verbs_and_flags_and_no_python():
    import re

    commands = _parser_commands()
    all_flags = set().union(*commands.values())
    hints, cli_hints = _engine_hints()
    assert len(hints) > 20 and cli_hints
    for hint, shown in [(h, cli.cli_hint(h)) for h in hints] + [(h, h) for h in cli_hints]:
        # QEMU's own commands ('qemu-img amend -o compat=1.1') are not Python
        python_words = re.sub(r"'qemu-(img|io) [^']*'", "", shown)
        assert not re.search(r"\w=|\w\(|\b(Image|Repository|Chain)\.", python_words), \
            f"hint names Python: {shown!r} (from {hint!r})"
        quoted = re.findall(r"(?<!\w)'(cowchain [^']*)'", shown)
        for cmd in quoted:
            words = cmd.split()
            assert (words[1], words[2]) in commands, f"no command {cmd!r} in {shown!r}"
            for w in words[3:]:
                if w.startswith("-"):
                    assert w in commands[(words[1], words[2])], f"{w} is not a flag of {cmd!r}"
        rest = re.sub(r"(?<!\w)'[a-z][\w.-]* [^']*'", "", shown)    # quoted commands
        assert "cowchain " not in rest.replace("cowchain never", ""), shown
        for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest):
            assert flag in all_flags, f"{flag} in {shown!r} is not a flag of cowchain"
    # the mapping has no stale entries
    assert set(cli.CLI_HINTS) <= set(hints), set(cli.CLI_HINTS) - set(hints)


def test_hints_on_the_command_line_are_cli_flags(repo, tmp_path):
    ok("chain", "create", "a", "1M", repo=repo)
    ok("chain", "snapshot", "a", repo=repo)
    (tmp_path / "x").write_bytes(b"")
    line = fails(12, "chain", "export", "a", tmp_path / "x", repo=repo)
    assert "--force" in line and "overwrite" not in line
    snap = js("chain", "snapshots", "a", repo=repo)[0]["id"]
    ok("chain", "preview", "a", snap, repo=repo)
    line = fails(15, "chain", "revert", "a", snap, repo=repo)
    assert "'cowchain chain commit-preview NAME'" in line and "()" not in line
    # chain import --allow-unsafe-backing: the escape hatch Python has, on the command line
    base = tmp_path / "base.qcow2"
    engine.create(base, 1 << 20).close()
    sub = tmp_path / "sub"
    sub.mkdir()
    top = sub / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    line = fails(8, "chain", "import", "u", top, "-f", "qcow2", repo=repo)
    assert "--allow-unsafe-backing" in line and "allow_unsafe_backing" not in line
    ok("chain", "import", "u", top, "-f", "qcow2", "--allow-unsafe-backing", repo=repo)


def test_every_option_has_help_and_every_verb_a_description():
    import argparse

    def walk(p, path):
        yield path, p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    yield from walk(sp, path + [name])

    for path, p in walk(cli.build_parser(), ["cowchain"]):
        assert p.description, f"{' '.join(path)} has no description"
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                continue
            assert a.help and a.help != argparse.SUPPRESS, \
                f"{' '.join(path)} {a.option_strings or a.dest} has no help"


def test_version_and_small_usage_rules(repo, tmp_path):
    code, out, err = run("--version")
    assert code == 0 and out.decode().strip() == f"cowchain {engine.__version__}"
    ok("chain", "create", "a", "1M", repo=repo)
    (tmp_path / "f").write_bytes(b"xyz")
    line = fails(64, "chain", "write", "a", "--file", tmp_path / "f", "--pattern", "1",
                 repo=repo)
    assert "not allowed" in line
    assert ok("chain", "read", "a", "--length", "3", repo=repo) == bytes(3)


def test_messages_echo_full_ids_and_plurals(repo):
    ok("chain", "create", "a", "1M", repo=repo)
    assert b"(1 volume checked)" in ok("chain", "check", "a", repo=repo)
    snap = ok("chain", "snapshot", "a", repo=repo).decode().strip()
    out = ok("chain", "revert", "a", snap[:6], repo=repo).decode()
    assert f"snapshot {snap} " in out
    out = ok("chain", "preview", "a", snap[:6], repo=repo).decode()
    assert f"snapshot {snap} " in out
    ok("chain", "undo-preview", "a", repo=repo)
    r = js("chain", "read", "a", "--length", "1", "--snapshot", snap[:6], repo=repo)
    assert r["snapshot"] == snap
    ok("chain", "write", "a", "--pattern", "1", "--length", "4K", repo=repo)
    assert b"\n1 range, 64 KiB changed" in ok("chain", "diff", "a", snap, repo=repo)


def test_json_keys_are_hyphenated_everywhere(repo, tmp_path):
    ok("chain", "create", "a", "1M", "--format", "qcow2", repo=repo)
    snap = ok("chain", "snapshot", "a", repo=repo).decode().strip()
    outputs = [js("chain", "info", "a", repo=repo), js("chain", "list", repo=repo),
               js("chain", "check", repo=repo), js("chain", "snapshots", "a", repo=repo),
               js("chain", "export", "a", tmp_path / "e.raw", repo=repo),
               js("chain", "delete-snapshot", "a", snap, repo=repo)]

    def keys(o):
        if isinstance(o, dict):
            for k, v in o.items():
                yield k
                yield from keys(v)
        elif isinstance(o, list):
            for v in o:
                yield from keys(v)

    found = {k for o in outputs for k in keys(o)}
    assert {"virtual-size", "cluster-size", "exit-code", "data-bytes"} <= found
    assert not [k for k in found if "_" in k or k == "size"], found


def test_source_tree_without_the_core_says_how_to_build_it(tmp_path):
    import shutil

    src = os.path.dirname(os.path.abspath(engine.__file__))
    shutil.copytree(src, tmp_path / "engine",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "*.c"))
    # a plain source checkout: no editable-install finder that would find the built core
    plain = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in "
             "getattr(f, '__name__', type(f).__name__)]; ")
    for code in ("import engine; engine.open", "import engine.image",
                 "import engine.cli; engine.cli.main(['repo', 'init', 'r']); "
                 "sys.exit(engine.cli.main(['--repo', 'r', 'chain', 'create', 'a', '1M']))"):
        p = subprocess.run([sys.executable, "-c", plain + code], cwd=tmp_path,
                           capture_output=True,
                           text=True, env={k: v for k, v in os.environ.items()
                                           if k != "PYTHONPATH"}, timeout=60)
        assert p.returncode != 0
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith(("ImportError", "cowchain: error:")), p.stderr
        assert "python setup.py build_ext --inplace" in last and "pip install" in last, last
