"""Child process of tests/test_fullfs.py: ``python -m reliability.fullfs PATH MODE SEED``.

Writes stamped blocks into the image at PATH (on a small tmpfs) until the filesystem is full,
reporting on stdout with the worker protocol (W/F/A lines, see reliability.worker), then:

    NOSPACE <exception type> <message>   the write/flush that hit the full filesystem
    AFTER flush:<result> close:<result>  what the later flush and close did
    DONE

``verify PATH LINES SIZE`` and ``rewrite PATH MODE`` do the checks after it, also in a
child (a read through the mapping can fault too). Run as a child so that a SIGBUS (a store into an unbacked page of a full tmpfs) shows as the
child's death by signal instead of killing pytest. MODE "grow": the image grows until ENOSPC;
"holes": an existing sparse image, the filesystem filled by another file first, writes into
holes that exist below the image's size.
"""

from __future__ import annotations

import json
import os
import random
import sys


def emit(s: str) -> None:
    os.write(1, (s + "\n").encode())


def verify(path: str, lines_file: str, size: int) -> int:
    """RO reopen: check() and the oracle over every LBA; prints one JSON line."""
    import engine
    from reliability import stamps
    from reliability.oracle import Oracle
    o = Oracle(size // 512, size)
    with open(lines_file) as f:
        for ln in f:
            if ln[:1] in "WFA":
                o.apply_line(ln.strip())
    out = {}
    try:
        with engine.open(path, readonly=True) as img:
            res = img.check()
            obs = stamps.decode(img.read(0, img.size))
            v = o.judge(obs, img.size)
        out = {"corruptions": res.corruptions, "check_errors": res.check_errors,
               "leaks": res.leaks, "lost": v.lost, "wrong": v.wrong,
               "details": v.details[:5] + res.findings[:5]}
    except engine.EngineError as e:
        out = {"reopen_error": f"{type(e).__name__}: {e}"}
    emit(json.dumps(out))
    return 0


def rewrite(path: str, holes: bool) -> int:
    """RW reopen (after space was freed): repair leaks, write, flush, re-check."""
    import engine
    from reliability import stamps
    out = {}
    with engine.open(path) as img:
        r = img.check()
        out["rw_corruptions"] = r.corruptions
        img.check(repair="leaks")
        try:
            img.write(0, stamps.make(999999, 0, 8, 2))
            img.flush()
            out["wrote"] = True
        except engine.NoSpace:
            out["wrote"] = False
    with engine.open(path, readonly=True) as img:
        out["corruptions_after"] = img.check().corruptions
        out["readback_ok"] = stamps.decode(img.read(0, 8 * 512)).tolist() == [999999] * 8
    emit(json.dumps(out))
    return 0


def main() -> int:
    if sys.argv[1] == "verify":
        return verify(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    if sys.argv[1] == "rewrite":
        return rewrite(sys.argv[2], sys.argv[3] == "holes")
    path, mode, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    import engine
    from engine.errors import EngineError, NoSpace
    from reliability import stamps
    rng = random.Random(seed)
    img = engine.open(path)
    nb = img.size // 512
    seq = 0
    err = None
    try:
        for i in range(100000):
            seq += 1
            if rng.random() < 0.1:
                emit(f"F {seq}")
                img.flush()
                emit(f"A {seq}")
                continue
            n = rng.randint(1, 64)
            lba = rng.randrange(0, nb - n) if mode != "grow" or rng.random() < 0.3 else \
                min(nb - n, (i * 37) % (nb - n))
            emit(f"W {seq} {lba} {n}")
            img.write(lba * 512, stamps.make(seq, lba, n, 1))
    except NoSpace as e:
        err = e
        emit("NOSPACE " + json.dumps([type(e).__name__, str(e)]))
    except EngineError as e:
        emit("NOSPACE " + json.dumps([type(e).__name__, str(e)]))
        err = e
    res = []
    for what, fn in (("flush", img.flush), ("close", img.close)):
        try:
            fn()
            res.append(f"{what}:ok")
        except EngineError as e:
            res.append(f"{what}:{type(e).__name__}")
    emit("AFTER " + " ".join(res))
    emit("DONE")
    return 0 if err is not None else 4


if __name__ == "__main__":
    sys.exit(main())
