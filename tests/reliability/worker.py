"""The kill -9 worker (docs/reliability.md C2): ``python -m reliability.worker ARGS``.

It opens the top image of a chain read-write and runs a seeded workload, reporting on stdout
(unbuffered, one line per event, written *before* the operation is issued, so that the parent
knows every write that may have reached the file when the kill lands):

    READY                        the image is open
    W seq lba n                  stamped write of n blocks
    Z seq lba n                  write_zeroes
    D seq lba n                  discard (whole clusters)
    R seq new_size               resize (grow)
    F seq                        flush (or close before an overlay) starts
    A seq                        ... and returned successfully: every op before it is durable
    O seq index sha256 cluster   the old top (closed) got a new overlay L<index>.qcow2
    H {json}                     hook counts so far (after each flush)
    DONE                         workload finished (the process then exits 0)
    ERR text                     the workload hit an exception (a finding; exit 3)

The parent kills it with SIGKILL at a random time (blackbox), or it kills itself at a hook
(whitebox: COWCHAIN_KILL_AT=name:nth, read by engine._core at import).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import traceback


def emit(line: str) -> None:
    os.write(1, (line + "\n").encode())


def run_workload(folder: str, top: int, seed: int, seq: int, gen: int, ops: int,
                 max_size: int, max_layers: int = 6, p_resize: float = 0.01,
                 p_overlay: float = 0.005, p_flush: float = 0.08, emit=emit) -> int:
    """The seeded workload (deterministic for a given chain state and seed); returns the last
    seq. Exceptions propagate."""
    import engine
    import engine._core as core
    from reliability import stamps
    from reliability.chain import layer_name, sha
    from reliability.workload import OpGen

    rng = random.Random(seed)
    path = os.path.join(folder, layer_name(top))
    img = engine.open(path)
    try:
        emit("READY")
        gen_ = OpGen(rng, size=img.size, max_size=max_size, cluster=img.cluster_size,
                     layers=top + 1, max_layers=max_layers, p_flush=p_flush,
                     p_resize=p_resize, p_overlay=p_overlay)
        for _ in range(ops):
            op = gen_.next()
            seq += 1
            k = op[0]
            if k == "W":
                _, lba, n = op
                data = stamps.make(seq, lba, n, gen)
                emit(f"W {seq} {lba} {n}")
                img.write(lba * 512, data)
            elif k == "Z":
                _, lba, n, unmap = op
                emit(f"Z {seq} {lba} {n}")
                img.write_zeroes(lba * 512, n * 512, unmap=unmap)
            elif k == "D":
                _, lba, n = op
                emit(f"D {seq} {lba} {n}")
                img.discard(lba * 512, n * 512)
            elif k == "R":
                emit(f"R {seq} {op[1]}")
                img.resize(op[1])
            elif k == "F":
                emit(f"F {seq}")
                img.flush()
                emit(f"A {seq}")
                emit("H " + json.dumps(core.hook_counts()))
            elif k == "O":
                emit(f"F {seq}")
                img.close()
                emit(f"A {seq}")
                h = sha(path)
                cluster = rng.choice([512, 1024, 2048, 4096])
                top += 1
                path = os.path.join(folder, layer_name(top))
                img = engine.create(path, None, cluster_size=cluster,
                                    refcount_bits=rng.choice([16, 16, 64, 8]),
                                    backing=layer_name(top - 1), backing_format="qcow2")
                emit(f"O {seq} {top} {h} {cluster}")
                gen_.set_top(cluster)
        seq += 1
        emit(f"F {seq}")
        img.flush()
        emit(f"A {seq}")
        emit("H " + json.dumps(core.hook_counts()))
    finally:
        img.close()
    return seq


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", required=True)
    ap.add_argument("--top", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--gen", type=int, default=0)
    ap.add_argument("--ops", type=int, default=100000)
    ap.add_argument("--max-size", type=int, required=True)
    ap.add_argument("--max-layers", type=int, default=6)
    a = ap.parse_args(argv)
    try:
        run_workload(a.folder, a.top, a.seed, a.seq, a.gen, a.ops, a.max_size, a.max_layers)
        emit("DONE")
        return 0
    except BaseException as e:  # noqa: BLE001 - reported to the parent as a finding
        emit("ERR " + json.dumps(f"{type(e).__module__}.{type(e).__name__}: {e} "
                                 f"{traceback.format_exc()}"))
        return 3


if __name__ == "__main__":
    sys.exit(main())
