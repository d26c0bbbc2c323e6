"""Helpers that run QEMU's own tools (qemu-img, qemu-io) as oracles for the tests.

QEMU is not optional for this test suite: `.ci/run` installs Debian's ``qemu-utils``. If the
tools are missing, importing this module raises a RuntimeError that names the package, so
every test module that uses QEMU fails loudly at collection instead of being skipped.

Every helper passes the image format explicitly (``-f``/``-F``): the tests never let QEMU
probe a format.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

if QEMU_IMG is None or QEMU_IO is None:
    raise RuntimeError(
        "qemu-img/qemu-io not found on PATH: these tests need Debian's 'qemu-utils' "
        "(apt-get install -y qemu-utils; .ci/run installs it). They are never skipped."
    )

# A hard ceiling for one QEMU tool run, so that a hung qemu-img fails a test instead of the
# whole CI job.
TOOL_TIMEOUT = 120


class QemuError(AssertionError):
    """A QEMU tool failed where the test expected success (carries argv, exit code, stderr)."""


def _run(argv: list[str], check: bool, timeout: float | None = None,
         input: bytes | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, timeout=timeout or TOOL_TIMEOUT,
                          input=input, env=_env())
    if check and proc.returncode != 0:
        raise QemuError(
            f"{' '.join(argv)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout.decode(errors='replace')[-2000:]}\n"
            f"stderr: {proc.stderr.decode(errors='replace')[-2000:]}"
        )
    return proc


def _env() -> dict:
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    return env


def version() -> str:
    """qemu-img's version line, e.g. 'qemu-img version 7.2.22 (...)'."""
    return _run([QEMU_IMG, "--version"], True).stdout.decode().splitlines()[0]


def qemu_img(*args, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``qemu-img ARGS``; with check=True a non-zero exit raises QemuError."""
    return _run([QEMU_IMG, *map(str, args)], check, timeout)


def qemu_img_json(*args, timeout: float | None = None):
    """Run ``qemu-img ARGS --output=json`` (exit 0 required) and return the parsed JSON."""
    proc = qemu_img(*args, "--output=json", timeout=timeout)
    return json.loads(proc.stdout)


def qemu_io(path, *cmds: str, fmt: str = "qcow2", readonly: bool = False, check: bool = True,
            force_share: bool = False, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``qemu-io -f FMT [-r] [-U] -c CMD ... PATH``.

    qemu-io exits 0 even when a command fails in some versions, so with check=True the output
    is also scanned for the failure phrases qemu-io prints ("failed", "error"): a test that asks
    for success gets it for real.
    """
    argv = [QEMU_IO, "-f", fmt]
    if readonly:
        argv.append("-r")
    if force_share:
        argv.append("-U")
    for c in cmds:
        argv += ["-c", c]
    argv.append(str(path))
    proc = _run(argv, False, timeout)
    if check:
        text = (proc.stdout + proc.stderr).decode(errors="replace")
        if proc.returncode != 0 or io_failed(text):
            raise QemuError(f"{' '.join(argv)} exited {proc.returncode}\n{text[-3000:]}")
    return proc


def io_failed(text: str) -> bool:
    """True if qemu-io's output reports a failed command or open."""
    low = text.lower()
    return any(w in low for w in ("failed", "error", "pattern verification", "can't open",
                                  "could not open"))


def qemu_check(path, fmt: str = "qcow2", repair: str | None = None) -> tuple[int, dict]:
    """``qemu-img check --output=json``: (exit code, parsed JSON or {} when none was printed)."""
    args = ["check", "-f", fmt, "--output=json"]
    if repair:
        args += ["-r", repair]
    proc = qemu_img(*args, path, check=False)
    try:
        data = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        data = {"unparsed": proc.stdout.decode(errors="replace")}
    if proc.stderr:
        data.setdefault("stderr", proc.stderr.decode(errors="replace"))
    return proc.returncode, data


def assert_qemu_clean(path, fmt: str = "qcow2") -> dict:
    """``qemu-img check`` must exit 0: no corruption, no leak, no check error."""
    code, data = qemu_check(path, fmt)
    if code != 0 or data.get("corruptions") or data.get("leaks") or data.get("check-errors"):
        raise QemuError(f"qemu-img check {path} exited {code}: {json.dumps(data, indent=1)}")
    return data


def qemu_info(path, fmt: str = "qcow2", force_share: bool = False) -> dict:
    args = ["info", "-f", fmt]
    if force_share:
        args.append("-U")
    return qemu_img_json(*args, path)


def qemu_map(path, fmt: str = "qcow2") -> list[dict]:
    """``qemu-img map --output=json`` of the whole chain above PATH."""
    return qemu_img_json("map", "-f", fmt, path)


def qemu_compare(a, b, fmt_a: str = "qcow2", fmt_b: str = "raw", strict: bool = False) -> tuple[int, str]:
    """``qemu-img compare`` (exit 0 identical, 1 different, 2+ errors) with its message.

    Content only by default; strict=True adds ``-s``, which also requires equal sizes and
    equal allocation status (so it is not a content comparison against a raw file).
    """
    args = ["compare", "-f", fmt_a, "-F", fmt_b]
    if strict:
        args.append("-s")
    proc = qemu_img(*args, a, b, check=False)
    return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")


def convert_to_raw(path, fmt: str = "qcow2") -> bytes:
    """The whole virtual disk of PATH (through its backing chain) as QEMU reads it."""
    with tempfile.TemporaryDirectory(prefix="cowchain-raw-") as d:
        out = os.path.join(d, "out.raw")
        qemu_img("convert", "-f", fmt, "-O", "raw", path, out)
        with open(out, "rb") as f:
            return f.read()


def create(path, size, fmt: str = "qcow2", backing=None, backing_fmt=None, **opts) -> str:
    """``qemu-img create`` with -o options from keyword arguments (underscores kept, since
    qemu's option names use them: cluster_size, refcount_bits, extended_l2, ...)."""
    args = ["create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", str(backing), "-F", backing_fmt or "qcow2"]
    if opts:
        args += ["-o", ",".join(f"{k}={_optval(v)}" for k, v in opts.items())]
    args += [str(path), str(size)]
    qemu_img(*args)
    return str(path)


def _optval(v) -> str:
    if v is True:
        return "on"
    if v is False:
        return "off"
    return str(v)


def normalize_map(entries) -> list[dict]:
    """Merge adjacent map entries that agree on every field and whose offsets are contiguous.

    qemu-img already merges like this; applying the same rule to both sides makes a
    comparison about meaning, not about where either tool happened to split a run. Accepts
    qemu-img map dicts or engine Extent objects (anything with the field attributes).
    """
    out: list[dict] = []
    for e in entries:
        d = _extent_dict(e)
        if d["length"] == 0:
            continue
        if out:
            p = out[-1]
            same = all(p[k] == d[k] for k in ("depth", "present", "zero", "data"))
            contiguous = p["start"] + p["length"] == d["start"]
            if p["offset"] is None or d["offset"] is None:
                off_ok = p["offset"] is None and d["offset"] is None
            else:
                off_ok = p["offset"] + p["length"] == d["offset"]
            if same and contiguous and off_ok:
                p["length"] += d["length"]
                continue
        out.append(d)
    return out


def _extent_dict(e) -> dict:
    if isinstance(e, dict):
        get = e.get
    elif hasattr(e, "to_dict"):
        get = e.to_dict().get
    else:
        def get(k, default=None):
            return getattr(e, k, default)
    return {
        "start": int(get("start")),
        "length": int(get("length")),
        "depth": int(get("depth")),
        "present": bool(get("present")),
        "zero": bool(get("zero")),
        "data": bool(get("data")),
        "offset": None if get("offset") is None else int(get("offset")),
    }


class HeldOpen:
    """A qemu-io process that keeps an image open (and so its lock bytes taken) until closed.

    qemu-io reads commands from stdin when it gets no -c, so a pipe that stays open keeps it
    alive. ``wait_ready`` runs a harmless command and waits for its answer, which proves the
    image is open (and locked) before the test goes on.
    """

    def __init__(self, path, fmt: str = "qcow2", readonly: bool = False):
        argv = [QEMU_IO, "-f", fmt]
        if readonly:
            argv.append("-r")
        argv.append(str(path))
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=_env())
        self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> None:
        import select
        import time

        self.proc.stdin.write(b"read 0 512\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        while b"read 512/512" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.close()
                raise QemuError(f"qemu-io did not come up holding the image: {buf!r}")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    continue
                buf += chunk

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=20)
            except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
