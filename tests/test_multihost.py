"""Several hosts sharing one repository: one volume folder, one PostgreSQL catalog, per-chain
write leases (``docs/multihost.md``).

- **Random run**: three host processes (different host ids) run random writes, snapshots,
  snapshot deletions, reverts, previews (kept or undone), clones and resizes on random
  chains for a fixed time (``COWCHAIN_LONG=1``: longer).  Each host logs every operation
  with its lease epoch and the digest of the disk before and after it, before (try) and
  after it was acknowledged (writes flushed).  The checker proves that no chain had two
  writers in one epoch, replays each chain's history (every epoch starts from the disk the
  previous one left, or from the disk before or after the operation in flight when that
  epoch lost its lease or failed; every snapshot, clone and preview reads what the chain
  read when the snapshot was taken), and that the repository check and ``qemu-img check``
  are clean.
- **Kill and takeover**: a host killed (SIGKILL) in the middle of a snapshot, a snapshot
  deletion (both merge directions), a revert, a preview, a clone, a resize or an import;
  another host takes the chain
  over once the lease expired, its recovery leaves the chain as before or after the
  operation, never mixed, and every volume passes ``qemu-img check``.
- **Paused host**: a writer stopped (SIGSTOP) past its lease; another host takes the chain
  over; resumed, the writer acknowledges nothing new (at most the one write in flight when
  it stopped) and its next write fails with ``LeaseLost``; the new holder's data is intact.
- **Operator view**: ``cowchain host list``, the holder in ``chain info``, ``chain release
  --force`` (the old holder's next catalog change is fenced out).

Run as a script, this file is one host process (``_host_main``, ``_victim_main``,
``_writer_main``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

import engine
import engine.testing
from engine.errors import (ChainLeased, EngineError, LeaseLost,
                           RepositoryError)

import qemu

TESTS = os.path.dirname(os.path.abspath(__file__))
LONG = os.environ.get("COWCHAIN_LONG") == "1"
RUN_SECONDS = 180.0 if LONG else 20.0
HOSTS = 3
CHAINS = ["c0", "c1", "c2", "c3"]
DISK = 1 << 20
SECTORS = DISK // 512


def _env() -> dict[str, str]:
    env = dict(os.environ, COWCHAIN_LEASE_PROFILE="test")
    env.pop(engine.testing.KILL_ENV, None)
    return env


def _block(tag: str) -> bytes:
    return tag.encode().ljust(512, b".")


def _tag_of(data: bytes) -> str | None:
    return None if data == bytes(512) else data.rstrip(b".").decode()


def _log(path: str, **event) -> None:
    # one O_APPEND write per line: the line survives a kill right after it
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(event) + "\n").encode())
    finally:
        os.close(fd)


def _open(folder: str, url: str, host: str) -> engine.Repository:
    return engine.Repository.open(folder, catalog=url, host_id=host)


# --- the host processes -----------------------------------------------------------------------

def _digest(data: bytes | bytearray) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


class _Visit:
    """One host's turn on one chain: everything it does is logged with the lease epoch,
    and with the digest of the disk before and after, so the checker can replay the
    chain's history across hosts (``_replay``)."""

    def __init__(self, repo: engine.Repository, c: Any, host: str, log: str,
                 rnd: random.Random):
        self.repo, self.c, self.host, self.log, self.rnd = repo, c, host, log, rnd
        self.epoch = 0
        self.model = bytearray()

    def emit(self, ev: str, **kw: Any) -> None:
        _log(self.log, ev=ev, chain=self.c.name, host=self.host, epoch=self.epoch, **kw)

    def begin(self) -> None:
        lease = self.c.take_lease()               # ChainLeased: another host has it
        assert lease is not None
        self.epoch = lease.epoch
        if self.c.previewing is not None:         # left by a host that lost the chain
            self.c.undo_preview()
            self.emit("leftover", op="undo_preview")
        self.model = bytearray(self.c.read(0, self.c.size))
        self.emit("begin", h=_digest(self.model))

    def _snapshot_data(self, sid: str) -> bytes:
        with self.c.open_snapshot(sid) as img:
            return img.read(0, img.size)

    def run(self, what: str, seq: int) -> None:
        c, h0 = self.c, _digest(self.model)
        if what == "write":
            off = self.rnd.randrange(SECTORS) * 512
            tag = f"{self.host}/{seq}"
            after = bytearray(self.model)
            after[off:off + 512] = _block(tag)
            self.emit("try", op=what, h0=h0, h1=_digest(after), off=off, tag=tag)
            c.write(off, _block(tag))
            c.flush()
            self.model = after
            self.emit("done", op=what, h=_digest(after), off=off, tag=tag)
        elif what == "snapshot":
            self.emit("try", op=what, h0=h0, h1=h0)
            s = c.snapshot(self.host)
            self.emit("done", op=what, h=h0, snapshot=s.id)
        elif what == "resize":
            if len(self.model) >= DISK + 8 * 65536:
                return
            after = self.model + bytes(65536)
            self.emit("try", op=what, h0=h0, h1=_digest(after))
            c.resize(len(after))
            self.model = after
            self.emit("done", op=what, h=_digest(after))
        else:
            snaps = c.snapshots
            if not snaps:
                return
            sid = self.rnd.choice(snaps).id
            if what == "delete":
                self.emit("try", op=what, h0=h0, h1=h0, snapshot=sid)
                r = c.delete_snapshot(sid)
                self.emit("done", op=what, h=h0, snapshot=sid, direction=r.direction)
                return
            data = self._snapshot_data(sid)
            # what the snapshot reads now must be what the chain read when it was taken
            self.emit("snapref", snapshot=sid, h=_digest(data))
            if what == "clone":
                name = f"{c.name}-{self.host}-{seq}"
                self.emit("try", op=what, h0=h0, h1=h0, snapshot=sid, clone=name)
                clone = c.clone(sid, name)
                try:
                    got = clone.read(0, clone.size)
                finally:
                    clone.close()
                self.repo.delete_chain(name)
                self.emit("done", op=what, h=h0, snapshot=sid, clone_h=_digest(got))
            elif what == "revert":
                self.emit("try", op=what, h0=h0, h1=_digest(data), snapshot=sid)
                c.revert(sid)
                self.model = bytearray(data)
                self.emit("done", op=what, h=_digest(data), snapshot=sid)
            else:                                 # preview, then keep it or undo it
                keep = self.rnd.random() < 0.5
                after = bytearray(data) if keep else self.model
                self.emit("try", op=what, h0=h0, h1=_digest(after), snapshot=sid, keep=keep)
                c.preview(sid)
                seen = c.read(0, c.size)
                if keep:
                    c.commit_preview()
                else:
                    c.undo_preview()
                self.model = after
                self.emit("done", op=what, h=_digest(after), snapshot=sid,
                          preview_h=_digest(seen))

    def end(self) -> None:
        self.c.close()                            # flushes and releases the lease
        self.emit("end", h=_digest(self.model))


OPS = {"write": 16, "snapshot": 4, "delete": 2, "revert": 1, "preview": 1, "clone": 1,
       "resize": 1}


def _host_main(folder: str, url: str, host: str, seed: str, seconds: str, log: str) -> None:
    rnd = random.Random(int(seed))
    repo = _open(folder, url, host)
    end = time.monotonic() + float(seconds)
    seq = 0
    while time.monotonic() < end:
        name = rnd.choice(CHAINS)
        c = repo.chain(name)
        v = _Visit(repo, c, host, log, rnd)
        try:
            v.begin()
            for _ in range(rnd.randint(1, 6)):
                seq += 1
                v.run(rnd.choices(list(OPS), list(OPS.values()))[0], seq)
            v.end()
        except ChainLeased:
            _log(log, ev="refused", chain=name, host=host)
        except LeaseLost as e:
            _log(log, ev="lost", chain=name, host=host, epoch=e.epoch)
        except RepositoryError as e:
            # the catalog restarting: the operation failed cleanly (rolled back, or left
            # to recovery, which runs under the chain's lease)
            _log(log, ev="failed", chain=name, host=host, epoch=v.epoch,
                 error=type(e).__name__, message=str(e))
            try:
                repo.recover(chains=[name])
            except EngineError as e2:
                _log(log, ev="failed", chain=name, host=host, epoch=v.epoch,
                     error=type(e2).__name__, message=str(e2))
        finally:
            if not c.closed:
                try:
                    c.close()
                except EngineError:
                    pass
        time.sleep(rnd.random() * 0.05)
    repo.close()
    _log(log, ev="finished", host=host)


def _victim_main(folder: str, url: str, host: str, op: str, kill_at: str,
                 state: str) -> None:
    """Prepare chain c0 for OP, record the state before it, then run OP killed at
    KILL_AT."""
    repo = _open(folder, url, host)
    c = repo.chain("c0")
    before: dict[str, object] = {}
    if op == "import":
        src = os.path.join(os.path.dirname(state), "source.raw")
        with open(src, "wb") as f:
            f.write(bytes(range(256)) * (DISK // 256))
        before["source"] = src
        before["data_after"] = (bytes(range(256)) * (DISK // 256)).hex()
    elif op == "snapshot":
        c.write(0, b"A" * 65536)
    elif op in ("revert", "preview", "clone"):
        c.write(0, b"R" * 65536)
        before["target"] = c.snapshot("s1").id
        c.write(4096, b"N" * 65536)
    elif op == "resize":
        c.write(DISK - 65536, b"E" * 65536)
        before["data_after"] = (c.read(0, DISK) + bytes(DISK)).hex()
    else:
        # 'commit': the snapshot's volume holds more than its child; 'pull': the reverse
        big, small = (b"B" * 262144, b"s" * 4096)
        first, second = (big, small) if op == "commit" else (small, big)
        c.write(0, first)
        s1 = c.snapshot("s1")
        c.write(65536 * 8, second)
        c.snapshot("s2")
        c.write(512, b"leaf" * 128)
        before["target"] = s1.id
    c.flush()
    before["snapshots"] = [s.id for s in c.snapshots]
    before["data"] = c.read(0, DISK).hex()
    if op in ("revert", "preview", "clone"):
        with c.open_snapshot(str(before["target"])) as img:
            before["data_after"] = img.read(0, DISK).hex()
    with open(state, "w") as f:
        json.dump(before, f)
    os.environ[engine.testing.KILL_ENV] = kill_at
    engine.testing.configure()
    if op == "import":
        repo.import_chain("imp", str(before["source"]), format="raw", base_format="qcow2")
    elif op == "snapshot":
        c.snapshot("killed")
    elif op == "revert":
        c.revert(str(before["target"]))
    elif op == "preview":
        c.preview(str(before["target"]))
    elif op == "clone":
        c.clone(str(before["target"]), "cl")
    elif op == "resize":
        c.resize(2 * DISK)
    else:
        c.delete_snapshot(str(before["target"]))
    print("the operation finished: the kill point was not reached", flush=True)
    sys.exit(3)


def _writer_main(folder: str, url: str, host: str, log: str) -> None:
    """Write tagged blocks into c0 (each flushed, then logged) until the lease is lost;
    then try once more (another host holds the chain by then)."""
    repo = _open(folder, url, host)
    c = repo.chain("c0")
    seq = 0
    try:
        while True:
            seq += 1
            off = (seq % 64) * 512
            _log(log, ev="attempt", off=off, tag=f"{host}/{seq}")
            c.write(off, _block(f"{host}/{seq}"))
            c.flush()
            _log(log, ev="ack", off=off, tag=f"{host}/{seq}", epoch=c.lease.epoch)
    except LeaseLost as e:
        _log(log, ev="lost", error=str(e))
    try:
        c.write(0, _block(f"{host}/late"))
        _log(log, ev="late write accepted")
    except (ChainLeased, LeaseLost) as e:
        _log(log, ev="refused", error=type(e).__name__)
    repo.close()


# --- helpers of the tests ---------------------------------------------------------------------

@pytest.fixture
def shared(tmp_path, pg_url, monkeypatch):
    """A repository folder and its PostgreSQL catalog, with the chains made."""
    monkeypatch.setenv("COWCHAIN_LEASE_PROFILE", "test")
    folder = str(tmp_path / "repo")
    with engine.Repository.create(folder, catalog=pg_url, host_id="setup") as repo:
        for name in CHAINS:
            repo.create_chain(name, DISK, base_format="qcow2")
    return folder, pg_url


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, os.path.join(TESTS, "test_multihost.py"),
                             *args], env=_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def _volumes_clean(folder: str) -> list[str]:
    vols = os.path.join(folder, "volumes")
    bad = []
    for name in sorted(os.listdir(vols)):
        path = os.path.join(vols, name)
        if name.endswith(".qcow2"):
            out = subprocess.run(["qemu-img", "check", "-U", path], capture_output=True,
                                 text=True)
            if out.returncode != 0:
                bad.append(f"{name}: {out.stdout.strip()} {out.stderr.strip()}")
    return bad


# --- the operator's view ----------------------------------------------------------------------

def _cli(folder: str, url: str, *argv: str) -> tuple[int, str, str]:
    out = subprocess.run([sys.executable, "-m", "engine.cli", "--repo", folder, "--catalog",
                          url, *argv], capture_output=True, text=True, timeout=120,
                         env=_env())
    return out.returncode, out.stdout, out.stderr


def test_host_list_chain_holder_and_forced_release(shared):
    folder, url = shared
    with _open(folder, url, "h1") as repo:
        c = repo.chain("c0")
        c.write(0, b"one")
        epoch = c.lease.epoch
        code, out, err = _cli(folder, url, "host", "list", "--output", "json")
        assert code == 0, err
        [h1] = [h for h in json.loads(out) if h["host-id"] == "h1"]
        assert (h1["pid"], h1["alive"], h1["leases"]) == (os.getpid(), True, 1)
        code, out, err = _cli(folder, url, "host", "list")
        assert code == 0 and "h1" in out and "alive" in out, (out, err)
        code, out, err = _cli(folder, url, "chain", "info", "c0", "--output", "json")
        assert code == 0, err
        holder = json.loads(out)["holder"]
        assert (holder["host"], holder["epoch"], holder["live"]) == ("h1", epoch, True)
        code, out, _ = _cli(folder, url, "chain", "info", "c0")
        assert f"holder:     h1 (epoch {epoch}" in out
        code, out, err = _cli(folder, url, "chain", "release", "c0")
        assert code == 64 and "--force" in err
        code, out, err = _cli(folder, url, "chain", "release", "--force", "c0", "--output",
                              "json")
        assert code == 0 and json.loads(out)["epoch"] == epoch + 1, err
        # the old holder's next catalog change is fenced out; nothing of it is recorded
        with pytest.raises(LeaseLost):
            c.snapshot("late")
        assert c.snapshots == []
        c.write(0, b"two")                           # a new lease, a new epoch
        assert c.lease.epoch == epoch + 2 and c.read(0, 3) == b"two"
        code, out, _ = _cli(folder, url, "chain", "info", "c0")
        assert f"holder:     h1 (epoch {epoch + 2}" in out
    code, out, _ = _cli(folder, url, "chain", "info", "c0")
    assert f"holder:     none (epoch {epoch + 2})" in out
    code, out, err = subprocess.run(
        [sys.executable, "-m", "engine.cli", "--repo", folder, "host", "list"],
        capture_output=True, text=True).returncode, "", ""
    assert code != 0                                 # a local catalog has no hosts


# --- a host paused past its lease -------------------------------------------------------------

def test_a_host_paused_past_its_lease_writes_nothing_after_resume(shared, tmp_path):
    folder, url = shared
    log = str(tmp_path / "writer.log")
    p = _spawn("writer", folder, url, "h-paused", log)
    try:
        _until_lines(log, 30)
        os.kill(p.pid, signal.SIGSTOP)
        with _open(folder, url, "h-new") as repo:
            c = repo.chain("c0")
            lease = c.take_lease(wait=60.0)           # after expiry + grace
            assert lease is not None and lease.taken_over
            before = _events(log)
            in_flight = [e["tag"] for e in before if e["ev"] == "attempt"][-1]
            os.kill(p.pid, signal.SIGCONT)
            out = p.communicate(timeout=120)[0]
            assert p.returncode == 0, out[-3000:]
            events = _events(log)
            # after the resume nothing new is acknowledged: at most the write that was in
            # flight when the process stopped completes (the check-then-write window); the
            # next one fails with LeaseLost, and a retry with ChainLeased
            new = events[len(before):]
            assert [e["tag"] for e in new if e["ev"] == "ack"] in ([], [in_flight])
            assert [e["ev"] for e in events[-2:]] == ["lost", "refused"], events[-3:]
            assert events[-1]["error"] == "ChainLeased"
            acked_before = [e for e in events if e["ev"] == "ack"]
            # the new holder writes; its data and everything acknowledged before is there
            c.write(64 * 512, _block("h-new/1"))
            c.flush()
            data = c.read(0, 65 * 512)
            assert _tag_of(data[64 * 512:]) == "h-new/1"
            last = {e["off"]: e["tag"] for e in acked_before}
            unacked = {e["tag"] for e in events if e["ev"] == "attempt"} - \
                {e["tag"] for e in acked_before}
            for off, tag in last.items():
                got = _tag_of(data[off:off + 512])
                assert got == tag or got in unacked, (off, got, tag)
            assert repo.check().ok
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
            p.wait()
    assert _volumes_clean(folder) == []


def _events(log: str) -> list[dict]:
    with open(log) as f:
        return [json.loads(line) for line in f]


def _until_lines(log: str, n: int, limit: float = 60.0) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if os.path.exists(log) and sum(e["ev"] == "ack" for e in _events(log)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the writer did not acknowledge {n} writes")


# --- the random run ---------------------------------------------------------------------------

def _check_logs(events: list[dict]) -> dict[tuple[str, int], set[str]]:
    """No chain had two writers in one epoch; returns the writers of each epoch."""
    writers: dict[tuple[str, int], set[str]] = {}
    for e in events:
        if e.get("epoch") and e["ev"] in ("begin", "try", "done", "end"):
            writers.setdefault((e["chain"], e["epoch"]), set()).add(e["host"])
    two = {k: v for k, v in writers.items() if len(v) > 1}
    assert not two, f"two writers in one epoch: {two}"
    return writers


def _replay(name: str, events: list[dict]) -> tuple[set[str], list[str]]:
    """Replay one chain's history from the hosts' logs, epoch by epoch.

    Each epoch must start (``begin``) from a disk the previous epoch could have left: its
    final disk, or, when it ended by losing the lease or by a failed operation, the disk
    before or after the operation in flight (an unacknowledged write may or may not have
    landed; recovery rolls an operation back or forward).  Every snapshot must read what the
    chain read when it was taken, a clone what its snapshot reads, a preview its snapshot.
    Returns the digests the disk may have at the end, and the problems found."""
    by_epoch: dict[int, list[dict]] = {}
    for e in events:
        if e.get("chain") == name and e.get("epoch"):
            by_epoch.setdefault(e["epoch"], []).append(e)
    cand = {_digest(bytes(DISK))}
    snaps: dict[str, str] = {}          # snapshot id -> digest of the disk when taken
    maybe: set[str] = set()             # digests of snapshots whose creation failed
    refs: list[tuple[str, str]] = []
    bad: list[str] = []
    for epoch in sorted(by_epoch):
        evs = by_epoch[epoch]
        cur: str | None = None
        pending: dict | None = None
        ended = False
        for e in evs:
            if e["ev"] == "begin":
                if e["h"] not in cand:
                    bad.append(f"{name} epoch {epoch}: starts from {e['h']}, the previous "
                               f"epoch left one of {sorted(cand)}")
                cur = e["h"]
            elif e["ev"] == "try":
                if cur is not None and e["h0"] != cur:
                    bad.append(f"{name} epoch {epoch}: {e['op']} from {e['h0']}, not {cur}")
                pending = e
                if e["op"] == "snapshot":
                    maybe.add(e["h0"])
            elif e["ev"] == "done":
                assert pending is not None and pending["op"] == e["op"], e
                if e["h"] != pending["h1"]:
                    bad.append(f"{name} epoch {epoch}: {e['op']} gave {e['h']}, "
                               f"expected {pending['h1']}")
                if e["op"] == "snapshot":
                    snaps[e["snapshot"]] = e["h"]
                if e["op"] == "clone" and e["clone_h"] != snaps.get(e["snapshot"],
                                                                    e["clone_h"]):
                    bad.append(f"{name}: clone of {e['snapshot']} reads {e['clone_h']}")
                if e["op"] == "preview":
                    refs.append((e["snapshot"], e["preview_h"]))
                cur, pending = e["h"], None
            elif e["ev"] == "snapref":
                refs.append((e["snapshot"], e["h"]))
            elif e["ev"] == "end":
                ended = True
                cand = {e["h"]}
        if not ended and cur is not None:
            cand = {cur} | ({pending["h1"]} if pending is not None else set())
        elif not ended and pending is not None:
            cand = cand | {pending["h1"]}
    for sid, h in refs:
        if h != snaps.get(sid, h) or (sid not in snaps and h not in maybe):
            bad.append(f"{name}: snapshot {sid} reads {h}, taken as "
                       f"{snaps.get(sid, 'a failed snapshot')}")
    return cand, bad


@pytest.mark.parametrize("restart", [False, True], ids=["steady", "server-restart"])
def test_hosts_share_a_repository_random_operations(shared, tmp_path, summary, pg_server,
                                                     restart):
    folder, url = shared
    logs = [str(tmp_path / f"host{i}.log") for i in range(HOSTS)]
    seed = int(os.environ.get("COWCHAIN_SEED", "0")) or random.randrange(1 << 30)
    procs = [_spawn("host", folder, url, f"h{i}", str(seed + i), str(RUN_SECONDS), logs[i])
             for i in range(HOSTS)]
    if restart:                               # PostgreSQL restarted in the middle of the run
        time.sleep(RUN_SECONDS / 2)
        try:
            pg_server.restart()
        finally:
            if not pg_server.running:
                pg_server.start()
    outs = [p.communicate(timeout=RUN_SECONDS + 300)[0] for p in procs]
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"host h{i} (seed {seed + i}) failed:\n{outs[i][-3000:]}"
    events = [json.loads(line) for log in logs for line in open(log)]
    assert sum(e["ev"] == "finished" for e in events) == HOSTS
    writers = _check_logs(events)
    wrong = []
    with _open(folder, url, "checker") as repo:
        for name in CHAINS:        # operations left to recovery are recovered on takeover
            c = repo.chain(name)
            c.take_lease(wait=60.0)
            if c.previewing is not None:           # a preview left by a lost lease
                c.undo_preview()
        for name in CHAINS:
            cand, bad = _replay(name, events)
            wrong += bad
            c = repo.chain(name)
            got = _digest(c.read(0, c.size))
            if got not in cand:
                wrong.append(f"{name}: the disk reads {got} at the end, expected one of "
                             f"{sorted(cand)}")
        result = repo.check()
        assert result.ok, [str(p) for p in result.problems]
    assert not wrong, wrong[:20]
    assert _volumes_clean(folder) == []
    done = [e for e in events if e["ev"] == "done" and "op" in e]
    kinds = {k: sum(e["op"] == k for e in done) for k in OPS}
    refused = sum(e["ev"] == "refused" for e in events)
    lost = sum(e["ev"] == "lost" for e in events)
    failed = [e for e in events if e["ev"] == "failed"]
    if not restart:
        assert not failed, failed[:5]
    assert {e["error"] for e in failed} <= {"CatalogUnavailable", "RepositoryError"}, failed
    handoffs = sum(len({k[1] for k in writers if k[0] == c}) for c in CHAINS)
    assert kinds["write"] > 0 and handoffs > len(CHAINS), (kinds, handoffs)
    summary.append(
        f"multihost: {HOSTS} hosts x {RUN_SECONDS:g} s on {len(CHAINS)} chains"
        f"{', PostgreSQL restarted halfway' if restart else ''} (seed {seed}): "
        + ", ".join(f"{n} {k}" for k, n in kinds.items())
        + f" acknowledged; {handoffs} lease epochs, {refused} refusals, {lost} leases lost, "
        f"{len(failed)} operations failed cleanly; 0 epochs with two writers, every epoch "
        f"began from the disk the one before left, every snapshot, clone and preview read "
        f"its snapshot, repo check and qemu-img check clean")


# --- kill -9 in the middle of an operation, then a takeover -----------------------------------

KILLS = [("snapshot", p) for p in ("snapshot.intent", "snapshot.created",
                                   "snapshot.committed")] + \
        [(d, p) for d in ("commit", "pull")
         for p in ("delete_snapshot.intent", "delete_snapshot.copied",
                   "delete_snapshot.rebased", "delete_snapshot.committed")] + \
        [("revert", p) for p in ("revert.intent", "revert.created", "revert.committed")] + \
        [("import", p) for p in ("import_chain.intent", "import.copy",
                                 "import_chain.written")] + \
        [(o, f"{o}.{p}") for o, steps in (("preview", ("intent", "created", "committed")),
                                           ("clone", ("intent", "created", "committed")),
                                           ("resize", ("intent", "resized", "committed")))
         for p in steps]


def _new_chain_taken_over(folder: str, url: str, name: str, before: dict) -> bool:
    """The chain a killed import or clone was making: recovered by another host once the
    lease expired; absent, or present with the content it was to have (the source's, the
    snapshot's). Returns whether present."""
    with _open(folder, url, "h-taker") as repo:
        end = time.monotonic() + 60
        while True:
            try:
                repo.recover(chains=[name])
                break
            except ChainLeased:
                assert time.monotonic() < end, "the killed host's lease never expired"
                time.sleep(0.2)
        names = [c.name for c in repo.chains()]
        if name in names:
            assert repo.chain(name).read(0, DISK).hex() == before["data_after"]
        result = repo.check()
        assert result.ok, [str(p) for p in result.problems]
    return name in names


@pytest.mark.parametrize("op,kill_at", KILLS, ids=[f"{o}-{p.split('.')[1]}" for o, p in KILLS])
def test_a_host_killed_mid_operation_is_taken_over(shared, tmp_path, op, kill_at, summary):
    folder, url = shared
    state = str(tmp_path / "before.json")
    p = _spawn("victim", folder, url, "h-victim", op, kill_at, state)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == -9, f"the victim was not killed at {kill_at}:\n{out[-3000:]}"
    with open(state) as f:
        before = json.load(f)
    if op in ("import", "clone"):
        after = _new_chain_taken_over(folder, url, "imp" if op == "import" else "cl", before)
        assert _volumes_clean(folder) == []
        summary.append(f"multihost: kill -9 at {kill_at} ({op}), takeover by another host: "
                       f"chain {'after' if after else 'before'} the operation, check clean")
        return
    with _open(folder, url, "h-taker") as repo:
        c = repo.chain("c0")
        with pytest.raises(ChainLeased):          # the victim's lease is still live
            c.take_lease()
        lease = c.take_lease(wait=60.0)           # after expiry + grace: recovery runs
        assert lease is not None and lease.taken_over
        snaps = [s.id for s in c.snapshots]
        data = c.read(0, DISK).hex()
        if op == "revert":
            assert snaps == before["snapshots"]
            assert data in (before["data"], before["data_after"]), "a mixed disk"
            after = data == before["data_after"]
        elif op == "preview":
            assert snaps == before["snapshots"]
            after = c.previewing is not None
            assert data == before["data_after" if after else "data"], "a mixed disk"
            if after:
                assert c.previewing.id == before["target"]
        elif op == "resize":
            assert snaps == before["snapshots"]
            after = c.size == 2 * DISK
            assert c.size in (DISK, 2 * DISK), c.size
            assert c.read(0, c.size).hex() == before["data_after"][:2 * c.size]
        elif op == "snapshot":
            assert data == before["data"], "the disk changed"
            assert snaps[:len(before["snapshots"])] == before["snapshots"]
            assert len(snaps) - len(before["snapshots"]) in (0, 1), snaps
            after = len(snaps) > len(before["snapshots"])
        else:
            assert data == before["data"], "the disk changed"
            assert snaps in (before["snapshots"],
                             [s for s in before["snapshots"] if s != before["target"]]), snaps
            after = before["target"] not in snaps
        c.write(0, b"T" * 512)                    # the taker writes under its own epoch
        c.flush()
        result = repo.check()
        assert result.ok, [str(p) for p in result.problems]
    assert _volumes_clean(folder) == []
    summary.append(f"multihost: kill -9 at {kill_at} ({op}), takeover by another host: "
                   f"chain {'after' if after else 'before'} the operation, check clean")


if __name__ == "__main__":
    {"host": _host_main, "victim": _victim_main,
     "writer": _writer_main}[sys.argv[1]](*sys.argv[2:])


# --- serving a chain of a shared repository -----------------------------------------------------

def test_serve_read_write_holds_the_chain_lease(shared, tmp_path):
    """``cowchain serve --chain`` on a shared repository takes the chain's write lease before
    it listens: writes over NBD land in the leaf, another host is refused the chain while the
    server runs (ChainLeased), and after SIGTERM the lease is free and the other host reads
    what the client wrote."""
    folder, url = shared
    sock = str(tmp_path / "s.sock")
    env = dict(_env(), COWCHAIN_REPO=folder, COWCHAIN_CATALOG=url, COWCHAIN_HOST_ID="server")
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--socket", sock,
                             "--chain", CHAINS[0]], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        uri = proc.stdout.readline().strip()
        assert uri.startswith("nbd+unix://"), proc.stderr.read()
        out = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 65536 131072",
                              "-c", "flush", uri], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "wrote 131072" in out.stdout, out.stdout + out.stderr
        with _open(folder, url, "other") as repo:
            with pytest.raises(ChainLeased):
                repo.chain(CHAINS[0]).write(0, b"x" * 512)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    with _open(folder, url, "other") as repo:
        c = repo.chain(CHAINS[0])
        assert c.read(65536, 131072) == b"\x5a" * 131072
        c.write(0, b"y" * 512)                          # the lease was released: free
        c.flush()
    assert _volumes_clean(folder) == []
