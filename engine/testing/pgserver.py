"""A throwaway PostgreSQL server for tests and benchmarks: ``initdb`` + ``pg_ctl`` in a
temporary folder, listening on a unix socket only (no TCP port, nothing to clash with).

The server programs refuse to run as root, so when the caller is root they run as the
``postgres`` system user that Debian's ``postgresql`` package creates (``runuser``); the
caller may stay root and connects over the socket with ``trust`` authentication.

>>> with PgServer() as pg:                                    # doctest: +SKIP
...     url = pg.url()            # postgresql:///postgres?host=/tmp/cwpg-.../sock&user=postgres

``fsync=off`` keeps the tests fast and loses nothing when only the server process dies
(``stop(mode="immediate")``): commits stay synchronous (PostgreSQL 15 docs, "Non-Durable
Settings").
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import urllib.parse

from engine.errors import EngineError


def server_bindir() -> str:
    """The folder holding ``initdb``/``pg_ctl`` (Debian keeps them off PATH)."""
    env = os.environ.get("COWCHAIN_PG_BINDIR")
    if env:
        return env
    on_path = shutil.which("pg_ctl")
    if on_path:
        return os.path.dirname(os.path.realpath(on_path))
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        cand = out.stdout.strip()
        if out.returncode == 0 and os.path.exists(os.path.join(cand, "pg_ctl")):
            return cand
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return os.path.dirname(found[-1])
    raise EngineError("PostgreSQL's server programs (initdb, pg_ctl) are not installed",
                      hint="install Debian's 'postgresql' package (.ci/run does)")


class PgServer:
    """One PostgreSQL server in a temporary folder; ``start()``/``stop()``/``restart()``."""

    def __init__(self, *, settings: dict[str, str] | None = None) -> None:
        self.bindir = server_bindir()
        # A short path: the socket path may not exceed 107 bytes.
        self.dir = tempfile.mkdtemp(prefix="cwpg-", dir="/tmp")
        self.data = os.path.join(self.dir, "data")
        self.sock = os.path.join(self.dir, "sock")
        self.log = os.path.join(self.dir, "log")
        os.mkdir(self.sock)
        self.settings = {"fsync": "off", "listen_addresses": "''", "max_connections": "200"}
        self.settings.update(settings or {})
        self._user: str | None = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise EngineError("running as root needs the 'postgres' system user",
                                  hint="install Debian's 'postgresql' package") from None
            self._user = "postgres"
            for p in (self.dir, self.sock):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self.running = False
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync",
                  "-E", "UTF8", "--locale=C")

    def _run(self, prog: str, *args: str) -> str:
        cmd = [os.path.join(self.bindir, prog), *args]
        if self._user is not None:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            log = ""
            if os.path.exists(self.log):
                with open(self.log, errors="replace") as f:
                    log = f.read()[-2000:]
            raise EngineError(f"{prog} failed ({out.returncode}): "
                              f"{(out.stderr or out.stdout).strip()[-800:]} {log}")
        return out.stdout

    def start(self) -> None:
        opts = f"-k {self.sock} " + " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o", opts,
                  "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """``fast``: roll back and disconnect clients; ``immediate``: abort (a crash)."""
        if self.running:
            self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")
            self.running = False

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def url(self, dbname: str = "postgres") -> str:
        q = urllib.parse.urlencode({"host": self.sock, "user": "postgres"})
        return f"postgresql:///{dbname}?{q}"

    def create_database(self, name: str) -> str:
        """A new empty database NAME; returns its URL."""
        self._run("createdb", "-h", self.sock, "-U", "postgres", name)
        return self.url(name)

    def cleanup(self) -> None:
        try:
            self.stop("immediate")
        except EngineError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
