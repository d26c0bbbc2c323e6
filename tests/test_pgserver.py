"""The throwaway PostgreSQL server the multi-host tests use: it starts, serves a database
over its unix socket, survives a crash (immediate stop) and restarts."""

import psycopg


def test_pg_server_serves_and_restarts(pg_server, pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1), (2)")
    pg_server.stop("immediate")
    pg_server.start()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT sum(x) FROM t").fetchone()[0] == 3
        assert conn.execute("SHOW fsync").fetchone()[0] == "off"
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
