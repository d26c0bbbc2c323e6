"""Races between threads of one process on one open image.

Every method that closes the image or swaps its core (``close``, ``resize``, ``rebase``,
``check(repair=...)``) runs while other threads are inside ``readinto``, ``readv``, ``write``,
``writev``, ``write_zeroes``, ``discard``, ``extents`` and ``flush``, and while a thread reads
the backing file's own Image. A call racing a close must complete or raise ImageClosed; a
call racing a reload must see the old or the new state (reads through the chain never fall
back to zeros for want of a backing file). The workload runs in a child process, so that a
crash is a test failure and not a dead test run.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import threading

import numpy as np

import engine
import qemu

WORKER = textwrap.dedent(r'''
    import os, random, sys, threading, time, traceback
    import numpy as np
    import engine
    from engine.errors import ImageClosed

    folder, rounds, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    stop = threading.Event()
    top = os.path.join(folder, "top.qcow2")
    size = 8 << 20                      # the first 6 MiB are only ever read: they must match
    CHECKED = 6 << 20
    expect = np.fromfile(os.path.join(folder, "expect.bin"), dtype=np.uint8)
    problems = []
    lock = threading.Lock()

    def problem(what):
        with lock:
            problems.append(what)

    def worker(name, img, body):
        r = random.Random(name)
        try:
            while not stop.is_set():
                body(img, r)
        except ImageClosed:
            pass
        except BaseException:
            problem(f"{name}: {traceback.format_exc()}")

    def big_reads(img, r):
        buf = np.empty(2 << 20, dtype=np.uint8)
        off = r.randrange(0, CHECKED - len(buf), 4096)
        img.readinto(off, buf)
        if not np.array_equal(buf, expect[off:off + len(buf)]):
            bad = int(np.flatnonzero(buf != expect[off:off + len(buf)])[0]) + off
            problem(f"readinto: wrong bytes at {bad}")

    def small_reads(img, r):
        buf = bytearray(4096)
        for _ in range(64):
            off = r.randrange(0, CHECKED - 4096)
            img.readinto(off, buf)
            if buf != expect[off:off + 4096].tobytes():
                problem(f"readinto 4k: wrong bytes at {off}")

    def batches(img, r):
        offs = np.array([r.randrange(0, CHECKED - 512) for _ in range(256)], dtype=np.uint64)
        out = img.readv(offs, 512)
        want = np.concatenate([expect[int(o):int(o) + 512] for o in offs])
        if not np.array_equal(out, want):
            problem("readv: wrong bytes")

    def mapper(img, r):
        img.extents(0, CHECKED)

    def writer(img, r):
        off = CHECKED + r.randrange(0, (size - CHECKED) // 4096 - 8) * 4096
        k = r.randrange(5)
        if k == 0:
            img.write(off, os.urandom(8192))
        elif k == 1:
            img.writev(np.array([off, off + 8192], dtype=np.uint64), 4096, bytes(8192))
        elif k == 2:
            img.write_zeroes(off, 65536 if off + 65536 <= size else 4096)
        elif k == 3:
            img.discard(off, 4096)
        else:
            img.flush()

    def backing_reads(img, r):
        buf = bytearray(65536)
        off = r.randrange(0, CHECKED - len(buf))
        img.readinto(off, buf)      # the backing alone: the middle layer's view

    for rnd in range(rounds):
        stop.clear()
        img = engine.open(top)
        threads = [threading.Thread(target=worker, args=(f"{fn.__name__}{i}", img, fn))
                   for i, fn in enumerate([big_reads, big_reads, small_reads, batches,
                                           mapper, writer])]
        threads.append(threading.Thread(target=worker, args=("backing", img.backing,
                                                               backing_reads)))
        for t in threads:
            t.start()
        r = random.Random(rnd)
        for op in r.sample(["resize", "rebase", "repair", "flush", "none"], 3):
            time.sleep(r.uniform(0, 0.004))
            if op == "resize":
                img.resize(img.size + 65536)
            elif op == "rebase":
                img.rebase("mid.qcow2", "qcow2")        # the same backing: same content
            elif op == "repair":
                res = img.check(repair="leaks")
                if res.corruptions:
                    problem(f"check: {res.corruptions} corruptions")
            elif op == "flush":
                img.flush()
        time.sleep(r.uniform(0, 0.004))
        if mode == "reload":                # only the reloads raced: stop the threads first
            stop.set()
            for t in threads:
                t.join(60)
        img.close()
        for t in threads:
            t.join(60)
            if t.is_alive():
                problem(f"{t.name} still running 60 s after close")
                os._exit(3)
        if problems:
            break
    for p in problems[:10]:
        print(p)
    print("problems:", len(problems))
    sys.exit(1 if problems else 0)
''')


def _chain(tmp_path):
    """base (compressed clusters, read by every thread at once) <- mid <- top."""
    size = 8 << 20
    rng = __import__("random").Random(7)
    plain = str(tmp_path / "plain.raw")
    data = bytearray(size)
    for blk in range(0, size, 65536):
        if rng.random() < 0.8:
            data[blk:blk + 65536] = bytes([rng.randrange(1, 256)]) * 4096 * 8 + \
                rng.randbytes(4096) * 8
    with open(plain, "wb") as f:
        f.write(data)
    qemu.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", plain,
                  str(tmp_path / "base.qcow2"))
    qemu.qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                  str(tmp_path / "mid.qcow2"))
    mid_data = rng.randbytes(3 << 20)
    with open(tmp_path / "mid.bin", "wb") as f:
        f.write(mid_data)
    qemu.qemu_io(str(tmp_path / "mid.qcow2"), f"write -s {tmp_path / 'mid.bin'} 1M 3M")
    data[1 << 20:4 << 20] = mid_data
    qemu.qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
                  str(tmp_path / "top.qcow2"), str(size))
    with open(tmp_path / "expect.bin", "wb") as f:
        f.write(data)


def _run_worker(tmp_path, mode, rounds):
    _chain(tmp_path)
    proc = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path), str(rounds), mode],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"worker exited {proc.returncode} (-11 / 139: a segfault)\n"
        f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    qemu.assert_qemu_clean(str(tmp_path / "top.qcow2"))


def test_close_and_reload_race_readers_and_writers(tmp_path):
    """Every round closes the image while all the threads are still at work."""
    _run_worker(tmp_path, "close", 25)


def test_reload_races_readers_and_writers(tmp_path):
    """Only the reloads race the threads: reads through the chain must keep seeing the
    backing files' bytes across resize, rebase and repair, never zeros or a failure."""
    _run_worker(tmp_path, "reload", 10)


def test_threads_read_compressed_clusters(tmp_path):
    """Several threads reading compressed clusters of one layer at once each get their own
    cluster's bytes (the layer's one-cluster inflate cache is shared by the threads)."""
    size = 4 << 20
    rng = random.Random(3)
    data = b"".join(rng.randbytes(4096) * 16 for _ in range(size // 65536))
    (tmp_path / "plain.raw").write_bytes(data)
    path = str(tmp_path / "c.qcow2")
    qemu.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(tmp_path / "plain.raw"), path)
    expect = np.frombuffer(data, dtype=np.uint8)
    bad = []
    with engine.open(path, readonly=True) as img:
        def reader(seed):
            r = random.Random(seed)
            buf = np.empty(4096, dtype=np.uint8)
            for _ in range(3000):
                off = r.randrange(0, size - 4096)
                img.readinto(off, buf)
                if not np.array_equal(buf, expect[off:off + 4096]):
                    bad.append(off)
                    return

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not bad, f"wrong bytes read at {bad}"
