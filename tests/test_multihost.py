"""Several hosts sharing one repository: one volume folder, one PostgreSQL catalog, per-chain
write leases (``docs/multihost.md``).

- **Random run**: three host processes (different host ids) run random writes, snapshots
  and snapshot deletions on random chains for a fixed time (``COWCHAIN_LONG=1``: longer).
  Every write is tagged with its host and lease epoch in a per-host log, written before
  (attempt) and after it was acknowledged and flushed.  The checker proves that no chain
  had two writers in one epoch, that every acknowledged-and-flushed write is readable at
  the end (or overwritten by a later write), and that the repository check and
  ``qemu-img check`` are clean.
- **Kill and takeover**: a host killed (SIGKILL) in the middle of a snapshot, a snapshot
  deletion (both merge directions), a revert or an import; another host takes the chain
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

import json
import os
import random
import signal
import subprocess
import sys
import time

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

def _host_main(folder: str, url: str, host: str, seed: str, seconds: str, log: str) -> None:
    rnd = random.Random(int(seed))
    repo = _open(folder, url, host)
    end = time.monotonic() + float(seconds)
    seq = 0
    while time.monotonic() < end:
        name = rnd.choice(CHAINS)
        try:
            c = repo.chain(name)
            try:
                for _ in range(rnd.randint(1, 6)):
                    what = rnd.choices(["write", "snapshot", "delete"], [8, 2, 1])[0]
                    if what == "write":
                        seq += 1
                        off = rnd.randrange(SECTORS) * 512
                        tag = f"{host}/{seq}"
                        _log(log, ev="attempt", chain=name, off=off, tag=tag, host=host)
                        c.write(off, _block(tag))
                        c.flush()
                        _log(log, ev="ack", chain=name, off=off, tag=tag, host=host,
                             seq=seq, epoch=c.lease.epoch)
                    elif what == "snapshot":
                        s = c.snapshot(f"{host}")
                        _log(log, ev="op", op="snapshot", chain=name, host=host,
                             epoch=c.lease.epoch, snapshot=s.id)
                    else:
                        snaps = c.snapshots
                        if snaps:
                            r = c.delete_snapshot(rnd.choice(snaps).id)
                            _log(log, ev="op", op="delete_snapshot", chain=name, host=host,
                                 epoch=c.lease.epoch, direction=r.direction)
            finally:
                c.close()                       # flushes and releases the lease
        except ChainLeased:
            _log(log, ev="refused", chain=name, host=host)
        except LeaseLost as e:
            _log(log, ev="lost", chain=name, host=host, epoch=e.epoch)
        except RepositoryError as e:
            # the catalog restarting: the operation failed cleanly (rolled back, or left
            # to recovery, which runs under the chain's lease)
            _log(log, ev="failed", chain=name, host=host, error=type(e).__name__,
                 message=str(e))
            try:
                repo.recover(chains=[name])
            except EngineError as e2:
                _log(log, ev="failed", chain=name, host=host, error=type(e2).__name__,
                     message=str(e2))
        time.sleep(rnd.random() * 0.05)
    repo.close()
    _log(log, ev="done", host=host)


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
    elif op == "revert":
        c.write(0, b"R" * 65536)
        before["target"] = c.snapshot("s1").id
        c.write(4096, b"N" * 65536)
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
    if op == "revert":
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

def _check_logs(events: list[dict]) -> tuple[dict[tuple[str, int], set[str]], int]:
    """No chain had two writers in one epoch; returns the writers and the acks."""
    writers: dict[tuple[str, int], set[str]] = {}
    for e in events:
        if "epoch" in e and e["ev"] in ("ack", "op"):
            writers.setdefault((e["chain"], e["epoch"]), set()).add(e["host"])
    two = {k: v for k, v in writers.items() if len(v) > 1}
    assert not two, f"two writers in one epoch: {two}"
    return writers, sum(e["ev"] == "ack" for e in events)


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
    assert sum(e["ev"] == "done" for e in events) == HOSTS
    writers, acks = _check_logs(events)
    # every acknowledged-and-flushed write is readable: the last one on each sector (in
    # epoch order, then the host's own order) or a write attempted but never acknowledged
    last: dict[tuple[str, int], tuple[int, int, str]] = {}
    unacked: dict[tuple[str, int], set[str]] = {}
    acked = {e["tag"] for e in events if e["ev"] == "ack"}
    for e in events:
        key = (e.get("chain", ""), e.get("off", -1))
        if e["ev"] == "ack":
            cand = (e["epoch"], e["seq"], e["tag"])
            if key not in last or cand[:2] > last[key][:2]:
                last[key] = cand
        elif e["ev"] == "attempt" and e["tag"] not in acked:
            unacked.setdefault(key, set()).add(e["tag"])
    wrong = []
    with _open(folder, url, "checker") as repo:
        for name in CHAINS:        # operations left to recovery are recovered on takeover
            repo.chain(name).take_lease(wait=60.0)
        for name in CHAINS:
            data = repo.chain(name).read(0, DISK)
            for (chain, off), (_, _, tag) in last.items():
                if chain != name:
                    continue
                got = _tag_of(data[off:off + 512])
                if got != tag and got not in unacked.get((chain, off), set()):
                    wrong.append(f"{chain}@{off}: {got!r}, acknowledged {tag!r}")
        result = repo.check()
        assert result.ok, [str(p) for p in result.problems]
    assert not wrong, wrong[:20]
    assert _volumes_clean(folder) == []
    ops = [e for e in events if e["ev"] == "op"]
    refused = sum(e["ev"] == "refused" for e in events)
    lost = sum(e["ev"] == "lost" for e in events)
    failed = [e for e in events if e["ev"] == "failed"]
    if not restart:
        assert not failed, failed[:5]
    assert {e["error"] for e in failed} <= {"CatalogUnavailable", "RepositoryError"}, failed
    handoffs = sum(len({k[1] for k in writers if k[0] == c}) for c in CHAINS)
    assert acks > 0 and handoffs > len(CHAINS), (acks, handoffs)
    summary.append(
        f"multihost: {HOSTS} hosts x {RUN_SECONDS:g} s on {len(CHAINS)} chains"
        f"{', PostgreSQL restarted halfway' if restart else ''} (seed {seed}): {acks} "
        f"acknowledged writes, {len(ops)} snapshot/delete operations, {handoffs} lease "
        f"epochs, {refused} refusals, {lost} leases lost, {len(failed)} operations failed "
        f"cleanly; 0 epochs with two writers, 0 lost writes, repo check and qemu-img check "
        f"clean")


# --- kill -9 in the middle of an operation, then a takeover -----------------------------------

KILLS = [("snapshot", p) for p in ("snapshot.intent", "snapshot.created",
                                   "snapshot.committed")] + \
        [(d, p) for d in ("commit", "pull")
         for p in ("delete_snapshot.intent", "delete_snapshot.copied",
                   "delete_snapshot.rebased", "delete_snapshot.committed")] + \
        [("revert", p) for p in ("revert.intent", "revert.created", "revert.committed")] + \
        [("import", p) for p in ("import_chain.intent", "import.copy",
                                 "import_chain.written")]


def _import_taken_over(folder: str, url: str, before: dict) -> bool:
    """The chain a killed import was making: recovered by another host once the lease
    expired; absent, or present with the source's content. Returns whether present."""
    with _open(folder, url, "h-taker") as repo:
        end = time.monotonic() + 60
        while True:
            try:
                repo.recover(chains=["imp"])
                break
            except ChainLeased:
                assert time.monotonic() < end, "the killed host's lease never expired"
                time.sleep(0.2)
        names = [c.name for c in repo.chains()]
        if "imp" in names:
            assert repo.chain("imp").read(0, DISK).hex() == before["data_after"]
        result = repo.check()
        assert result.ok, [str(p) for p in result.problems]
    return "imp" in names


@pytest.mark.parametrize("op,kill_at", KILLS, ids=[f"{o}-{p.split('.')[1]}" for o, p in KILLS])
def test_a_host_killed_mid_operation_is_taken_over(shared, tmp_path, op, kill_at, summary):
    folder, url = shared
    state = str(tmp_path / "before.json")
    p = _spawn("victim", folder, url, "h-victim", op, kill_at, state)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == -9, f"the victim was not killed at {kill_at}:\n{out[-3000:]}"
    with open(state) as f:
        before = json.load(f)
    if op == "import":
        after = _import_taken_over(folder, url, before)
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
