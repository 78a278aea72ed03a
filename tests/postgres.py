"""A throwaway PostgreSQL cluster for tests: `initdb` and `pg_ctl` under a temporary directory,
on a free loopback port, run as an unprivileged user when the tests run as root (initdb
refuses root). Skipped only where the binaries are absent, never in CI."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

PASSWORD = "pg-secret-pass-7781"  # in every URL: it must never be printed


def _bin_dir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


BIN_DIR = _bin_dir()


def require_postgres() -> Path:
    if BIN_DIR is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries are missing: .ci/run installs Debian's postgresql package")
        pytest.skip("needs PostgreSQL (Debian's postgresql package)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail("psycopg is missing: `make test` installs the [postgres] extra")
    return BIN_DIR


class PostgresServer:
    """One cluster; `url(db)` names a database on it, with a password that must stay hidden."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="proxykit-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user: str | None = None
        if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to an unprivileged user
            self.user = "postgres" if _user_exists("postgres") else "nobody"
            shutil.chown(self.root, self.user)
        self._run("initdb", "-D", str(self.data), "-U", "proxykit", "--auth=trust", "-E", "UTF8", "--no-sync")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://proxykit:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options, "-w", "-t", "60",
                  "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin_dir / program), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer(require_postgres())
    try:
        server.start()
        yield server
    finally:
        server.remove()


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
