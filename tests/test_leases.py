"""Chain write leases on a real PostgreSQL server (``engine.repository.leases``).

Acquire, renew, release and the epoch; a second host refused while the lease is live and
taking it over after expiry + grace; the SQL fence refusing a transaction of an old epoch;
a holder process paused (SIGSTOP) past its expiry that commits nothing after it resumes;
the server restarted under the renewal thread.  No timing is asserted: the tests wait for
states (with generous limits), never measure durations.

Run as a script, this file is the holder process of the pause test (``_holder_main``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest

from engine.errors import ChainLeased, InvalidArgument, LeaseLost
from engine.repository.leases import (LEASE_DDL, LeaseManager, LeaseSettings, _broken,
                                      connect)

TESTS = os.path.dirname(os.path.abspath(__file__))
WRITES_DDL = ("CREATE TABLE writes (id BIGSERIAL PRIMARY KEY, host TEXT NOT NULL, "
              "epoch BIGINT NOT NULL, n INTEGER NOT NULL)")


def _schema(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for ddl in [*LEASE_DDL, WRITES_DDL]:
            conn.execute(ddl)


@pytest.fixture
def url(pg_url):
    _schema(pg_url)
    return pg_url


@pytest.fixture
def managers(url):
    made: list[LeaseManager] = []

    def make(host: str, settings: LeaseSettings | None = None) -> LeaseManager:
        lm = LeaseManager(url, host, settings or LeaseSettings.for_tests())
        lm.join()
        made.append(lm)
        return lm

    yield make
    for lm in made:
        lm.close(release=False)


def _until(pred, limit: float = 30.0, what: str = "condition"):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def _write(url: str, settings: LeaseSettings, fence, host: str, epoch: int, n: int) -> None:
    with connect(url, settings) as conn:
        with conn.transaction():
            fence(conn)
            conn.execute("INSERT INTO writes (host, epoch, n) VALUES (%s, %s, %s)",
                         (host, epoch, n))


def _rows(url: str) -> list[tuple[int, str, int, int]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT id, host, epoch, n FROM writes ORDER BY id").fetchall()


# --- settings -------------------------------------------------------------------------------

def test_settings_profiles_are_valid_and_unsafe_timings_refused():
    prod, test = LeaseSettings(), LeaseSettings.for_tests()
    assert (prod.lease, prod.renew_interval, prod.renew_deadline, prod.grace) == (30, 5, 18, 30)
    assert (test.lease, test.renew_interval, test.renew_deadline, test.grace) == (3, .5, 1.8, .5)
    # R*(1+rho) + W <= L + G - delta, broken by each term in turn
    with pytest.raises(InvalidArgument, match="unsafe lease timing"):
        LeaseSettings(write_window=45.0)
    with pytest.raises(InvalidArgument, match="unsafe lease timing"):
        LeaseSettings.for_tests(grace=0.0, renew_deadline=2.9)
    with pytest.raises(InvalidArgument, match="unsafe lease timing"):
        LeaseSettings(clock_step=10.0)
    with pytest.raises(InvalidArgument, match="shorter than the lease"):
        LeaseSettings(renew_deadline=30.0, grace=60.0)
    with pytest.raises(InvalidArgument, match="fewer than two renewals"):
        LeaseSettings(renew_interval=10.0)
    with pytest.raises(InvalidArgument, match="idle_in_transaction_timeout"):
        LeaseSettings(idle_in_transaction_timeout=31.0)
    with pytest.raises(InvalidArgument):
        LeaseSettings(lease=-1.0)


def test_settings_profile_from_the_environment(monkeypatch):
    monkeypatch.delenv("COWCHAIN_LEASE_PROFILE", raising=False)
    assert LeaseSettings.from_env() == LeaseSettings()
    monkeypatch.setenv("COWCHAIN_LEASE_PROFILE", "test")
    assert LeaseSettings.from_env() == LeaseSettings.for_tests()
    monkeypatch.setenv("COWCHAIN_LEASE_PROFILE", "fast")
    with pytest.raises(InvalidArgument, match="COWCHAIN_LEASE_PROFILE"):
        LeaseSettings.from_env()


def test_every_connection_sets_the_session_timeouts(url):
    s = LeaseSettings.for_tests()
    with connect(url, s) as conn:
        got = {k: conn.execute(f"SHOW {k}").fetchone()[0] for k in
               ("idle_in_transaction_session_timeout", "lock_timeout", "statement_timeout")}
    assert got == {"idle_in_transaction_session_timeout": "2s", "lock_timeout": "1s",
                   "statement_timeout": "2s"}


# --- acquire, renew, release ------------------------------------------------------------------

def test_acquire_renew_release_and_the_epoch_grows(url, managers):
    a = managers("host-a")
    lease = a.acquire("c1")
    assert (lease.chain, lease.holder, lease.epoch, lease.taken_over) == ("c1", "host-a", 1,
                                                                           False)
    assert a.acquire("c1") is lease                       # held by us: the same lease
    lease.check()
    first = a.lease_of("c1").expires_at
    # the renewal thread moves the expiry (and the deadline) on, never the epoch
    _until(lambda: a.lease_of("c1").expires_at > first, what="a renewal")
    deadline = lease.deadline
    _until(lambda: lease.deadline > deadline, what="the local deadline to move")
    info = a.lease_of("c1")
    assert (info.holder, info.epoch, info.live) == ("host-a", 1, True)
    a.release("c1")
    assert lease.lost
    with pytest.raises(LeaseLost):
        lease.check()
    info = a.lease_of("c1")
    assert (info.holder, info.epoch, info.live) == (None, 1, False)
    epochs = [a.acquire("c1").epoch]
    for _ in range(3):
        a.release("c1")
        epochs.append(a.acquire("c1").epoch)
    assert epochs == [2, 3, 4, 5]
    hosts = a.hosts()
    assert [(h.host_id, h.pid, h.alive, h.leases) for h in hosts] == [
        ("host-a", os.getpid(), True, 1)]


def test_second_host_refused_while_live_takes_over_after_expiry(url, managers):
    s = LeaseSettings.for_tests(lease=6.0)
    a, b = managers("host-a", s), managers("host-b", s)
    la = a.acquire("c1")
    with pytest.raises(ChainLeased) as e:
        b.acquire("c1")
    assert (e.value.chain, e.value.holder) == ("c1", "host-a")
    assert e.value.exit_code == 22 and "release --force" in str(e.value)
    a.close(release=False)                      # host-a dies: no release, no renewal
    assert la.lost
    with pytest.raises(ChainLeased):           # still live on the server's clock
        b.acquire("c1")
    lb = b.acquire("c1", wait=30.0)             # after expiry + grace
    assert (lb.holder, lb.epoch, lb.taken_over) == ("host-b", la.epoch + 1, True)
    info = b.lease_of("c1")
    assert (info.holder, info.epoch, info.live) == ("host-b", la.epoch + 1, True)
    # and the new holder's lease is renewed as usual
    first = info.expires_at
    _until(lambda: b.lease_of("c1").expires_at > first, what="a renewal by host-b")
    lb.check()


def test_the_sql_fence_rejects_a_transaction_of_the_old_epoch(url, managers):
    s = LeaseSettings.for_tests()
    a, op = managers("host-a"), managers("operator")
    la = a.acquire("c1")
    fence = a.fence_for(la)
    _write(url, s, fence, "host-a", la.epoch, 1)
    assert op.force_release("c1") == la.epoch + 1
    # the local check may still pass (the renewal thread has not looked yet): the SQL fence
    # refuses anyway, and the insert of that transaction is rolled back
    with pytest.raises(LeaseLost) as e:
        _write(url, s, fence, "host-a", la.epoch, 2)
    assert e.value.epoch == la.epoch and e.value.exit_code == 23
    assert la.lost
    with pytest.raises(LeaseLost):
        la.check()
    assert [r[1:] for r in _rows(url)] == [("host-a", la.epoch, 1)]
    # the holder takes a new lease (a new epoch) and may write again
    la2 = a.acquire("c1")
    assert la2.epoch == la.epoch + 2
    _write(url, s, a.fence_for(la2), "host-a", la2.epoch, 3)
    with pytest.raises(LeaseLost):
        _write(url, s, fence, "host-a", la.epoch, 4)


def test_a_fenced_transaction_left_open_never_commits_after_a_takeover(url, managers):
    """A holder stalled inside a fenced transaction (its row lock FOR SHARE held): the
    takeover goes through only once the server cut that session off
    (idle_in_transaction_session_timeout), and the stalled insert never lands."""
    s = LeaseSettings.for_tests()
    a, b = managers("host-a", s), managers("host-b", s)
    la = a.acquire("c1")
    conn = connect(url, s)
    try:
        conn.execute("BEGIN")
        a.fence_for(la)(conn)
        conn.execute("INSERT INTO writes (host, epoch, n) VALUES ('host-a', %s, 1)",
                     (la.epoch,))
        a.close(release=False)                  # the holder stalls and stops renewing
        lb = b.acquire("c1", wait=30.0)
        assert lb.epoch == la.epoch + 1
        with pytest.raises(psycopg.Error):      # its session was terminated
            conn.execute("COMMIT")
    finally:
        conn.close()
    assert _rows(url) == []


# --- a paused holder (SIGSTOP) ----------------------------------------------------------------

def _holder_main(url: str, host: str, chain: str) -> None:
    """The holder process: writes tagged rows under its lease until it loses it."""
    s = LeaseSettings.for_tests()
    lm = LeaseManager(url, host, s)
    lm.join()
    lease = lm.acquire(chain)
    fence = lm.fence_for(lease)
    conn = None
    print(json.dumps({"ready": lease.epoch}), flush=True)
    n = 0
    while True:
        try:
            if _broken(conn):
                conn = connect(url, s)
            with conn.transaction():
                fence(conn)
                conn.execute("INSERT INTO writes (host, epoch, n) VALUES (%s, %s, %s)",
                             (host, lease.epoch, n + 1))
            n += 1
        except LeaseLost as e:
            out = {"lost": str(e), "committed": n}
            try:
                lease.check()
                out["check"] = "passed"
            except LeaseLost:
                out["check"] = "LeaseLost"
            print(json.dumps(out), flush=True)
            lm.close(release=False)
            return
        except psycopg.Error as e:         # the session was cut off while paused
            print(json.dumps({"dberror": e.sqlstate}), flush=True)
        time.sleep(0.005)


def test_a_holder_paused_past_expiry_commits_nothing_after_resume(url, managers):
    proc = subprocess.Popen([sys.executable, os.path.join(TESTS, "test_leases.py"), url,
                             "host-a", "c1"], stdout=subprocess.PIPE, text=True)
    try:
        ready = json.loads(proc.stdout.readline())
        epoch = ready["ready"]
        _until(lambda: len(_rows(url)) >= 20, what="the holder's writes")
        os.kill(proc.pid, signal.SIGSTOP)
        b = managers("host-b")
        lb = b.acquire("c1", wait=30.0)            # after expiry + grace, epoch + 1
        assert lb.epoch == epoch + 1
        before = [r for r in _rows(url) if r[1] == "host-a"]
        s = LeaseSettings.for_tests()
        for n in range(1, 6):
            _write(url, s, b.fence_for(lb), "host-b", lb.epoch, n)
        os.kill(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
    lines = [json.loads(x) for x in out.splitlines()]
    last = lines[-1]
    assert last["check"] == "LeaseLost", lines
    assert f"epoch {epoch}" in last["lost"]
    rows = _rows(url)
    a_rows = [r for r in rows if r[1] == "host-a"]
    b_rows = [r for r in rows if r[1] == "host-b"]
    # nothing of host-a committed after the takeover; what it acknowledged is there
    assert a_rows == before and len(a_rows) == last["committed"]
    assert {r[2] for r in a_rows} == {epoch}
    assert [(r[2], r[3]) for r in b_rows] == [(epoch + 1, n) for n in range(1, 6)]
    assert max(r[0] for r in a_rows) < min(r[0] for r in b_rows)
    # no epoch ever had two writers
    writers: dict[int, set[str]] = {}
    for r in rows:
        writers.setdefault(r[2], set()).add(r[1])
    assert all(len(w) == 1 for w in writers.values()), writers


# --- the server restarted under the renewal thread ---------------------------------------------

def test_server_restart_shorter_than_the_deadline_keeps_the_lease(url, managers, pg_server):
    s = LeaseSettings.for_tests(lease=20.0, renew_deadline=12.0)
    a = managers("host-a", s)
    lease = a.acquire("c1")
    try:
        pg_server.restart()                      # drops every connection
    finally:
        if not pg_server.running:
            pg_server.start()
    seen = a.renewals
    _until(lambda: a.renewals >= seen + 2, what="renewals after the restart")
    assert not lease.lost
    lease.check()
    _write(url, s, a.fence_for(lease), "host-a", lease.epoch, 1)   # the row survived
    info = a.lease_of("c1")
    assert (info.holder, info.epoch, info.live) == ("host-a", lease.epoch, True)


def test_server_down_longer_than_the_deadline_loses_the_lease_cleanly(url, managers,
                                                                    pg_server):
    s = LeaseSettings.for_tests()
    a = managers("host-a", s)
    lease = a.acquire("c1")
    fence = a.fence_for(lease)
    pg_server.stop()
    try:
        _until(lambda: lease.lost, what="the lease to be lost while the server is down")
    finally:
        pg_server.start()
    with pytest.raises(LeaseLost):
        lease.check()
    seen = a.renewals
    _until(lambda: a.renewals >= seen + 2, what="renewals after the restart")
    assert lease.lost                            # never resurrected
    with pytest.raises(LeaseLost):
        _write(url, s, fence, "host-a", lease.epoch, 1)
    again = a.acquire("c1")                      # taken again, with a new epoch
    assert again.epoch == lease.epoch + 1 and not again.lost
    _write(url, s, a.fence_for(again), "host-a", again.epoch, 2)
    assert [r[1:] for r in _rows(url)] == [("host-a", again.epoch, 2)]


if __name__ == "__main__":
    _holder_main(*sys.argv[1:4])
