"""Child runner of tests/test_fuzz_replay.py (no atheris needed).

    python -m reliability.fuzzrun replay TARGET FILE...
    python -m reliability.fuzzrun mutate TARGET SEED_DIR COUNT SEED CURRENT_FILE

Both print ``BEGIN id`` before each input and ``OK id`` / ``FAIL id json`` after it, so that
when the process dies by a signal or hangs the parent knows which input did it. ``mutate``
writes each input to CURRENT_FILE before running it (the parent keeps it as the reproducer).
A target raising anything is a FAIL: EngineError is caught inside the targets (fuzz/targets.py),
so what escapes is an untyped exception or a broken target oracle.

Limits (set here, before anything is imported): RLIMIT_DATA 1 GiB (heap and anonymous
memory; the engine's shared file mappings are address-space reservations and do not count),
RLIMIT_CPU per process; faulthandler prints the stack on SIGSEGV/SIGBUS.
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import resource
import struct
import sys
import time
import traceback


def limits():
    resource.setrlimit(resource.RLIMIT_DATA, (1 << 30, 1 << 30))
    faulthandler.enable()


def emit(s: str) -> None:
    os.write(1, (s + "\n").encode())


def targets():
    here = os.path.dirname(os.path.abspath(__file__))
    fuzz = os.path.join(os.path.dirname(os.path.dirname(here)), "fuzz")
    sys.path.insert(0, fuzz)
    import targets as t
    return t


INTERESTING64 = [0, 1, 0x1ff, 0x200, 0x7fffffff, 0x80000000, 0xffffffff, 1 << 32, 1 << 40,
                 (1 << 56) - 512, 1 << 56, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
INTERESTING32 = [0, 1, 2, 3, 8, 9, 12, 16, 21, 22, 31, 32, 64, 72, 104, 112, 0x7fffffff,
                 0x80000000, 0xffffffff]


def mutate(data: bytes, r: random.Random, others: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(r.choice([1, 1, 2, 3, 5])):
        if not b:
            b = bytearray(r.randbytes(r.randint(1, 512)))
        k = r.random()
        hdr = r.random() < 0.6
        span = min(len(b), 512 if hdr else len(b))
        pos = r.randrange(span)
        if k < 0.25:
            b[pos] ^= 1 << r.randrange(8)
        elif k < 0.4:
            b[pos] = r.choice([0, 0xff, 0x7f, 0x80, 0x01, r.randrange(256)])
        elif k < 0.6 and len(b) >= 8:
            p = min(pos - pos % 8, len(b) - 8) if hdr else r.randrange(0, len(b) - 7, 8)
            struct.pack_into(">Q", b, p, r.choice(INTERESTING64) + r.choice([0, 0, 512, -512]) & ((1 << 64) - 1))
        elif k < 0.75 and len(b) >= 4:
            p = min(pos - pos % 4, len(b) - 4)
            struct.pack_into(">I", b, p, r.choice(INTERESTING32))
        elif k < 0.82:
            b = b[:r.randrange(len(b) + 1)]
        elif k < 0.9 and others:
            o = r.choice(others)
            if o:
                a = r.randrange(len(o))
                chunk = o[a:a + r.randint(1, 512)]
                b[pos:pos + len(chunk)] = chunk
        else:
            a = r.randrange(len(b))
            chunk = b[a:a + r.randint(1, 256)]
            p = r.randrange(len(b))
            b[p:p + len(chunk)] = chunk
    return bytes(b[:256 << 10])


def run_one(fn, ident: str, data: bytes, keep: str | None = None) -> None:
    emit(f"BEGIN {ident}")
    t0 = time.monotonic()
    try:
        fn(data)
        emit(f"OK {ident} {time.monotonic() - t0:.3f}")
    except BaseException as e:  # noqa: BLE001 - everything escaping a target is a finding
        if keep:
            with open(keep, "wb") as f:
                f.write(data)
        emit(f"FAIL {ident} " + json.dumps(f"{type(e).__module__}.{type(e).__name__}: {e}\n"
                                          f"{traceback.format_exc()[-2500:]}"
                                          + (f"\n(input kept at {keep})" if keep else "")))


def main() -> int:
    limits()
    t = targets()
    mode, target = sys.argv[1], sys.argv[2]
    fn = t.TARGETS[target]
    if mode == "replay":
        for path in sys.argv[3:]:
            with open(path, "rb") as f:
                run_one(fn, path, f.read())
    elif mode == "mutate":
        seed_dir, count, seed, current = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
        seeds = []
        for name in sorted(os.listdir(seed_dir)):
            with open(os.path.join(seed_dir, name), "rb") as f:
                seeds.append(f.read())
        r = random.Random(seed)
        for i in range(count):
            data = mutate(r.choice(seeds), r, seeds)
            with open(current, "wb") as f:
                f.write(data)
            run_one(fn, str(i), data, keep=f"{current}.fail{i}")
    emit("END")
    return 0


if __name__ == "__main__":
    sys.exit(main())
