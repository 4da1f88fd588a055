"""A real PostgreSQL server for the tests of the shared registry, started once per session.

The binaries come from ``pg_config --bindir`` (PostgreSQL 15 in the dev image, ``make install``);
the tests that need the server are skipped, saying why, only when they are missing. initdb and
postgres refuse to run as root: as root they run as the ``postgres`` user (``runuser``) over a temp
folder it owns. The server listens on 127.0.0.1 on a free port (its unix socket in the temp folder),
with trust authentication, fsync off (test data), and is stopped (``pg_ctl stop -m fast``) and its
folder removed after the session. ``postgres_url`` gives each test a database of its own.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest


def _bindir() -> Path | None:
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    bindir = Path(out.stdout.strip()) if out.returncode == 0 else None
    if bindir is None or not all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
        return None
    return bindir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Postgres:
    port: int
    user: str
    folder: Path
    _names: ClassVar[itertools.count] = itertools.count(1)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, prefix: str = "lorasae_test") -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres():
    bindir = _bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL binaries not found (pg_config --bindir with initdb, pg_ctl, postgres): "
            "install PostgreSQL (make install does, as root) to run the shared-registry tests"
        )
    as_root = os.geteuid() == 0
    folder = Path(tempfile.mkdtemp(prefix="lorasae-pg-"))
    run_as = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(folder, "postgres", "postgres")
    data, log = folder / "data", folder / "server.log"
    user = "postgres" if as_root else (os.environ.get("USER") or "postgres")
    port = _free_port()

    def run(*args: str, timeout: float = 120) -> None:
        done = subprocess.run([*run_as, *args], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr[-2000:]}\n{tail}")

    started = False
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", user, "--no-sync", "-E", "UTF8")
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
        started = True
        yield Postgres(port=port, user=user, folder=folder)
    finally:
        if started:
            subprocess.run(
                [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres) -> str:
    """The URL of a fresh database on the session's server (one per test)."""
    return postgres.create_database()
