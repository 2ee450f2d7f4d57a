"""A throwaway PostgreSQL server for the tests: Debian's ``postgresql`` binaries, a cluster in a temp dir,
listening on a unix socket only (no TCP port), started once per test session, one database per test.

Outside CI the tests that need it skip (with the reason) when PostgreSQL cannot be started here; in CI
(env ``CI`` set, as ``.ci/run`` runs) they fail instead. ``ACE_TEST_PG_URL`` points the tests at an
existing server instead (a database URL whose user may CREATE DATABASE).
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def unavailable(reason: str):
    """Skip with the reason; in CI, fail: PostgreSQL must be there."""
    if in_ci():
        pytest.fail(f"PostgreSQL is required in CI: {reason}")
    pytest.skip(f"PostgreSQL cannot be started here: {reason}")


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return found[-1] if found else shutil.which(name)


class Cluster:
    """initdb + pg_ctl start in a temp dir; as the ``postgres`` user when running as root."""

    def __init__(self):
        initdb, self.pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if not initdb or not self.pg_ctl:
            unavailable("no initdb / pg_ctl (apt-get install postgresql)")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            unavailable('psycopg is not installed (pip install "psycopg[binary]")')
        self.dir = Path(tempfile.mkdtemp(prefix="ace-pg-"))
        self.data, self.sock = self.dir / "data", self.dir / "sock"
        self.sock.mkdir()
        self.user = None
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                unavailable("running as root and there is no 'postgres' user to run the server")
            self.user = "postgres"
            os.chmod(self.dir, 0o755)
            for p in (self.dir, self.sock):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self.port = 5400 + uuid.uuid4().int % 500  # only names the socket file: no TCP listener
        log = self.dir / "initdb.log"
        res = self._run([initdb, "-D", str(self.data), "-A", "trust", "-U", "ace", "-E", "UTF8", "--no-sync"], log)
        if res != 0:
            unavailable(f"initdb failed: {log.read_text()[-800:]}")
        opts = f"-k {self.sock} -c listen_addresses='' -p {self.port} -c fsync=off -c max_connections=60"
        res = self._run([self.pg_ctl, "-D", str(self.data), "-o", opts, "-l", str(self.dir / "server.log"),
                         "-w", "-t", "60", "start"], self.dir / "pg_ctl.log")
        if res != 0:
            text = (self.dir / "server.log").read_text()[-800:] if (self.dir / "server.log").exists() else ""
            unavailable(f"pg_ctl start failed: {(self.dir / 'pg_ctl.log').read_text()[-400:]} {text}")

    def _run(self, cmd: list[str], log: Path) -> int:
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        with open(log, "w") as out:
            return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=120).returncode

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://ace@/{db}?host={self.sock}&port={self.port}"

    def stop(self) -> None:
        self._run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"], self.dir / "stop.log")
        shutil.rmtree(self.dir, ignore_errors=True)


def new_database(admin_url: str) -> str:
    """A fresh, empty database on the server of ``admin_url``; returns its URL."""
    import psycopg

    name = f"ace_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    if "?" in admin_url:
        base, query = admin_url.split("?", 1)
        return f"{base.rsplit('/', 1)[0]}/{name}?{query}"
    return f"{admin_url.rsplit('/', 1)[0]}/{name}"
