"""Hostile images (docs/reliability.md S1/S2, C5): never a crash, a hang, an untyped error, a
changed file, or an open outside policy.

Each case of hostile_cases.py is built (qemu-img + byte pokes) and then run, in a pool of two
threads that each drive subprocesses:

1. read-only pass, in a subprocess under RLIMIT_AS (2 GiB) and a 5 s limit, faulthandler on:
   ``engine.open(readonly=True)``, a full read (the first 64 MiB and the last 4 MiB of huge
   disks), ``extents()``, ``check()``. Files must be byte-identical afterwards, and a
   "sentinel" file that policy forbids (watched with inotify) must not have been opened;
2. QEMU's verdict on the same bytes: ``qemu-img info`` and ``qemu-io -r -c 'read 0 N'``;
   where QEMU refuses and we accept, we are less strict: that fails unless the case says why
   it is harmless;
3. read-write pass, same limits: open, write three small ranges, flush, close. A typed error
   or success; and if ``qemu-img check`` found the image consistent before, it must not find
   corruption after.

The outcome of every case is printed as a table at the end of the run, with one summary line
"hostile: N cases, C crashes, H hangs, U untyped errors".
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import json
import os
import resource
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import hostile_cases
import poke
import qemu

CASES = hostile_cases.by_name()
AS_LIMIT = 2 << 30          # address space of the engine's worker (measured peak: ~150 MiB)
QEMU_AS_LIMIT = 4 << 30
QEMU_TIMEOUT = 3.0  # QEMU itself hangs on backing loops; it is the witness, not the subject
READ_CAP = 64 << 20
WORKERS = 2
RW_GROWTH_LIMIT = 64 << 20  # a few small writes may allocate clusters, never this much

# --- the open audit: inotify on the sentinel -----------------------------------------------------

class OpenWatch:
    """Records every open of the watched paths (a file, or any entry of a watched folder)."""

    IN_ACCESS, IN_OPEN = 0x1, 0x20

    def __init__(self, paths):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        for p in paths:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(p), self.IN_OPEN | self.IN_ACCESS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {p}")

    def events(self) -> list[str]:
        names = []
        try:
            while True:
                buf = os.read(self.fd, 65536)
                pos = 0
                while pos < len(buf):
                    wd, mask, cookie, ln = struct.unpack_from("iIII", buf, pos)
                    name = buf[pos + 16:pos + 16 + ln].rstrip(b"\0").decode(errors="replace")
                    names.append(f"{name or '<watched path>'}:{mask:#x}")
                    pos += 16 + ln
        except BlockingIOError:
            pass
        return names

    def close(self):
        os.close(self.fd)


# --- running one case --------------------------------------------------------------------------------

@dataclass
class Result:
    name: str
    category: str
    expect: tuple = ()
    build_error: str | None = None
    ro: dict = field(default_factory=dict)
    rw: dict = field(default_factory=dict)
    qemu: str = ""
    qemu_check_before: int | None = None
    qemu_check_after: int | None = None
    qemu_sha256: str | None = None
    changed: list = field(default_factory=list)
    opened: list = field(default_factory=list)
    lenient: str | None = None
    seconds: float = 0.0
    grew: int = 0


def _limit_qemu():
    resource.setrlimit(resource.RLIMIT_AS, (QEMU_AS_LIMIT, QEMU_AS_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


_CTX = None
_CTX_LOCK = threading.Lock()


def _context():
    """A forkserver that imported the engine once; each case forks a fresh child from it
    (a few ms, instead of a new interpreter importing numpy and the engine every time)."""
    global _CTX
    with _CTX_LOCK:     # cases start on several threads; the environment swap is not shareable
        return _CTX or _start_context()


def _start_context():
    global _CTX
    if _CTX is None:
        import multiprocessing
        import engine

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["hostile_cases"])
        saved = dict(os.environ)
        # The server starts with this environment: single-threaded BLAS (no threads to lose
        # across fork), and the same engine this process imported.
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(Path(engine.__file__).resolve().parent.parent), str(Path(__file__).parent)])
        try:
            p = ctx.Process(target=hostile_cases.preload)
            p.start()
            p.join()
            if p.exitcode != 0:
                raise RuntimeError(f"the hostile-case forkserver cannot import the engine ({p.exitcode})")
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _CTX = ctx
    return _CTX


def run_worker(path: Path, fmt: str, timeout: float) -> tuple[dict, dict]:
    """Run the read-only then the read-write pass in one child process; returns their
    results. A pass that did not report is a crash (signal or silent exit) or a hang (time
    limit), attributed to the stage the child last announced."""
    ctx = _context()
    fault_file = str(path.parent.parent / f".{path.parent.name}-{path.name}.faults")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=hostile_cases.worker,
                       args=(str(path), fmt, AS_LIMIT, READ_CAP, send, fault_file))
    proc.start()
    send.close()
    results, stage, hung = [], "start", False
    deadline = time.monotonic() + 2 * timeout
    while len(results) < 2:
        left = deadline - time.monotonic()
        if left <= 0:
            hung = True
            break
        if recv.poll(min(left, 0.25)):
            try:
                tag, value = recv.recv()
            except (EOFError, OSError):
                break
            if tag == "RESULT":
                results.append(value)
            else:
                stage = value
        elif not proc.is_alive() and not recv.poll(0):
            break
    if hung:
        proc.kill()
    proc.join(10)
    recv.close()
    if len(results) < 2:
        try:
            with open(fault_file) as f:
                tail = f.read()[-3000:]
        except OSError:
            tail = ""
        rc = proc.exitcode
        if hung:
            bad = {"kind": "hang", "stage": stage, "detail": f"no result after {2 * timeout} s",
                   "stderr": tail}
        elif rc is not None and rc < 0:
            bad = {"kind": "crash", "stage": stage, "detail": f"killed by signal {-rc}",
                   "stderr": tail}
        else:
            bad = {"kind": "crash", "stage": stage, "detail": f"exited {rc} without a result",
                   "stderr": tail}
        results.append(bad)
        if len(results) < 2:
            results.append({"kind": "not-run"})
    return results[0], results[1]


def qemu_verdict(path: Path, fmt: str) -> str:
    """'ok', 'info-fail: ...', 'read-fail: ...', 'hang' or 'crash' for QEMU on these bytes."""
    def run(argv):
        try:
            p = subprocess.run(argv, capture_output=True, timeout=QEMU_TIMEOUT, cwd=path.parent,
                               preexec_fn=_limit_qemu, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return None
        return p

    p = run([qemu.QEMU_IMG, "info", "-f", fmt, "--output=json", str(path)])
    if p is None:
        return "hang"
    if p.returncode < 0:
        return f"crash (signal {-p.returncode})"
    if p.returncode != 0:
        return "info-fail: " + _first_line(p.stderr)
    size = json.loads(p.stdout).get("virtual-size", 0)
    n = min(size, READ_CAP)
    if n == 0:
        return "ok"
    p = run([qemu.QEMU_IO, "-f", fmt, "-r", "-c", f"read 0 {n}", str(path)])
    if p is None:
        return "hang"
    if p.returncode < 0:
        return f"crash (signal {-p.returncode})"
    text = (p.stdout + p.stderr).decode(errors="replace")
    if p.returncode != 0 or qemu.io_failed(text):
        return "read-fail: " + _first_line((p.stderr or p.stdout))
    return "ok"


def short_qemu(verdict: str) -> str:
    """QEMU's verdict without the file path it quotes."""
    import re
    return re.sub(r"'[^']*/([^/']+)'", r"'\1'", verdict)[:90]


def _first_line(b: bytes) -> str:
    text = b.decode(errors="replace").strip()
    return (text.splitlines() or [""])[0][:160]


def qemu_check_rc(path: Path, fmt: str) -> int | None:
    if fmt != "qcow2" or not path.is_file():
        return None
    try:
        p = subprocess.run([qemu.QEMU_IMG, "check", "-f", fmt, "--output=json", str(path)],
                           capture_output=True, timeout=QEMU_TIMEOUT, cwd=path.parent,
                           preexec_fn=_limit_qemu, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None
    return p.returncode


def run_case(case: hostile_cases.Case, folder: Path) -> Result:
    t0 = time.monotonic()
    res = Result(case.name, case.category)
    folder.mkdir(parents=True)
    try:
        made = case.make(folder)
    except Exception as e:  # a bug in the generator, reported as such
        import traceback
        res.build_error = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
        return res
    res.expect = made.expect
    res.lenient = made.lenient
    path = Path(made.path)
    # QEMU first, on the untouched bytes (qemu-img info/check and qemu-io -r never write).
    res.qemu = qemu_verdict(path, made.fmt)
    if res.qemu != "hang":
        res.qemu_check_before = qemu_check_rc(path, made.fmt)
    if res.qemu == "ok" and made.fmt == "qcow2" and path.is_file():
        res.qemu_sha256 = qemu_digest(path, made.fmt)
    watch = OpenWatch([made.sentinel, made.sentinel.parent]) if made.sentinel else None
    try:
        res.ro, res.rw = run_worker(path, made.fmt, made.timeout)
    finally:
        if watch:
            res.opened = watch.events()
            watch.close()
    res.changed = res.ro.get("changed", [])
    res.grew = res.rw.get("grew", 0)
    if res.rw.get("kind") == "ok":
        res.qemu_check_after = qemu_check_rc(path, made.fmt)
    res.seconds = round(time.monotonic() - t0, 2)
    return res


def qemu_digest(path: Path, fmt: str) -> str | None:
    """sha256 of the first READ_CAP bytes of the disk as QEMU reads it (None if QEMU cannot
    convert it, or the disk is larger than READ_CAP, where we do not compare)."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="hostile-raw-") as tmp:
        out = Path(tmp) / "out.raw"
        try:
            info = json.loads(subprocess.run(
                [qemu.QEMU_IMG, "info", "-f", fmt, "--output=json", str(path)],
                capture_output=True, timeout=QEMU_TIMEOUT, cwd=path.parent).stdout)
            if info["virtual-size"] > READ_CAP:
                return None
            p = subprocess.run([qemu.QEMU_IMG, "convert", "-f", fmt, "-O", "raw", str(path),
                                str(out)], capture_output=True, timeout=QEMU_TIMEOUT,
                               cwd=path.parent, preexec_fn=_limit_qemu, stdin=subprocess.DEVNULL)
        except (subprocess.TimeoutExpired, ValueError, KeyError):
            return None
        if p.returncode != 0:
            return None
        h = hashlib.sha256()
        with open(out, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()


def outcome_matches(out: dict, expect: tuple) -> bool:
    kind = out.get("kind")
    if kind in ("ok", "check:leaks", "check:corrupt"):
        return kind in expect
    if kind == "typed":
        names = out.get("mro", [out.get("cls")])
        for e in expect:
            cls, _, stage = e.partition("@")
            if cls in names and (not stage or stage == out.get("stage")):
                return True
    return False


def describe(out: dict) -> str:
    kind = out.get("kind", "?")
    if kind == "typed":
        return f"{out['cls']}@{out['stage']}"
    if kind in ("untyped", "crash", "hang", "invalid"):
        return f"{kind.upper()} {out.get('cls', '')}@{out.get('stage', '')} {out.get('detail', '')}".strip()
    return kind


def failures(r: Result) -> list[str]:
    """Every way this case's result breaks a promise."""
    if r.build_error:
        return [f"generator failed: {r.build_error}"]
    errs = []
    for mode, out in (("read-only", r.ro), ("read-write", r.rw)):
        kind = out.get("kind")
        if kind in ("crash", "hang", "untyped", "invalid"):
            errs.append(f"{mode} pass: {describe(out)} {out.get('msg', '')}\n"
                        f"{out.get('tb', '')}{out.get('stderr', '')}")
    if r.ro.get("kind") not in ("crash", "hang", "untyped", "invalid") and not outcome_matches(r.ro, r.expect):
        errs.append(f"read-only outcome {describe(r.ro)} ({r.ro.get('msg', '')}) "
                    f"is not one of {r.expect}")
    if r.changed:
        errs.append(f"read-only pass changed files: {r.changed}")
    if r.opened:
        errs.append(f"opened a file that policy forbids: {r.opened}")
    if r.grew > RW_GROWTH_LIMIT:
        errs.append(f"read-write pass grew the file by {r.grew} bytes")
    if (r.rw.get("kind") == "ok" and r.qemu_check_before in (0, 3)
            and r.qemu_check_after == 2):
        errs.append("qemu-img check found the image consistent before cowchain's writes and "
                    "corrupt after them")
    if (r.qemu_sha256 and r.ro.get("sha256") and r.ro["sha256"] != r.qemu_sha256):
        errs.append("cowchain and QEMU both read this image but return different bytes")
    if r.qemu_check_before == 2 and r.ro.get("kind") in ("ok", "check:leaks") and not r.lenient:
        errs.append(f"qemu-img check finds corruption, cowchain's check() does not "
                    f"({describe(r.ro)})")
    if less_strict(r) and not r.lenient:
        errs.append(f"QEMU refuses these bytes ({r.qemu}) but cowchain accepted them "
                    f"({describe(r.ro)})")
    return errs


def less_strict(r: Result) -> bool:
    refused = r.qemu.startswith(("info-fail", "read-fail"))
    return refused and r.ro.get("kind") in ("ok", "check:leaks", "check:corrupt")


# --- pytest glue -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    wanted = [item.callspec.params["name"] for item in request.session.items
              if getattr(item, "originalname", None) == "test_hostile" and hasattr(item, "callspec")]
    names = wanted or list(CASES)
    base = tmp_path_factory.mktemp("hostile")
    t0 = time.monotonic()
    out: dict[str, Result] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futs = {pool.submit(run_case, CASES[n], base / n): n for n in names}
        for f in concurrent.futures.as_completed(futs):
            out[futs[f]] = f.result()
    out["__seconds__"] = time.monotonic() - t0
    return out


# The first test builds the results of all cases (its fixture), so it gets the whole budget.
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(CASES))
def test_hostile(name, results):
    r = results[name]
    errs = failures(r)
    if errs:
        pytest.fail(f"hostile case {name} ({r.category}): " + "\n".join(errs))


@pytest.mark.timeout(900)
def test_hostile_summary(results, summary):
    rs = [r for k, r in results.items() if not k.startswith("__")]
    outs = [o for r in rs for o in (r.ro, r.rw)]
    crashes = sum(o.get("kind") == "crash" for o in outs)
    hangs = sum(o.get("kind") == "hang" for o in outs)
    untyped = sum(o.get("kind") in ("untyped", "invalid") for o in outs)
    stricter = sum(r.qemu == "ok" and r.ro.get("kind") == "typed" for r in rs)
    lenient = [r.name for r in rs if less_strict(r)]
    table = [f"{'case':40} {'cowchain (ro)':30} {'cowchain (rw)':28} {'s':>5}  qemu"]
    for r in sorted(rs, key=lambda r: (r.category, r.name)):
        mark = " *" if less_strict(r) else ""
        table.append(f"{r.name[:40]:40} {describe(r.ro)[:30]:30} {describe(r.rw)[:28]:28} "
                     f"{r.seconds:5.1f}  {short_qemu(r.qemu)}{mark}")
    line = (f"hostile: {len(rs)} cases, {crashes} crashes, {hangs} hangs, "
            f"{untyped} untyped errors")
    summary.append("hostile differential (* = QEMU refuses, cowchain accepts):")
    summary.extend("  " + t for t in table)
    summary.append(f"hostile: cowchain stricter than QEMU in {stricter} cases; less strict in "
                   f"{len(lenient)} ({', '.join(lenient) or 'none'}); "
                   f"{results['__seconds__']:.0f} s")
    summary.append(line)
    print(line)
    assert rs, "no hostile case ran"
    assert (crashes, hangs, untyped) == (0, 0, 0), line


def test_open_watch_sees_an_open(tmp_path):
    """The open audit is not vacuous: an open of the watched file is seen, also through a
    symlink and by a child process (which is how the engine's worker runs)."""
    secret = tmp_path / "secret.qcow2"
    secret.write_bytes(b"x")
    os.symlink(secret, tmp_path / "alias")
    watch = OpenWatch([secret, tmp_path])
    try:
        assert watch.events() == []
        subprocess.run([sys.executable, "-c", f"open({str(tmp_path / 'alias')!r}).close()"],
                       check=True)
        assert any("secret" in e or "watched" in e for e in watch.events())
    finally:
        watch.close()
