"""Where the registry's rows live: a SQLite file (one server) or a PostgreSQL database (several
servers sharing one adapter root).

A row is one registration: ``name`` (the primary key), ``path`` (relative to the adapter root),
``source`` (``path`` or ``upload``), ``info`` (the AdapterInfo JSON at registration),
``created_at`` and ``uid``, unique per registration, so a name deleted and registered again (on
this server or another) is seen as a new registration. The database's PRIMARY KEY decides which
of two concurrent registrations of one name wins: the other gets a 409 ``duplicate_adapter``.

Calls block (they are short and bounded by timeouts): the registry runs them with
``asyncio.to_thread``. A store is used from one thread at a time (its own lock).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lorasae.errors import LorasaeError

from .errors import ServiceError

log = logging.getLogger("lorasae.service")

CONNECT_TIMEOUT_S = 5  # reaching the database
STATEMENT_TIMEOUT_S = 5  # one statement (PostgreSQL), waiting for a write lock (SQLite)

_COLUMNS = "name, path, source, info, created_at, uid"
_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,          -- relative to the adapter root
    source TEXT NOT NULL,        -- 'path' or 'upload' (uploads are owned: deleted with the row)
    info TEXT NOT NULL,          -- JSON of the AdapterInfo at registration
    created_at TEXT NOT NULL,
    uid TEXT                     -- unique per registration (NULL only before a migration fills it)
)
"""
_POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    source TEXT NOT NULL,
    info TEXT NOT NULL,
    created_at TEXT NOT NULL,
    uid TEXT NOT NULL UNIQUE
)
"""
_SCHEMA_LOCK = 0x6C6F7261  # pg advisory lock key: servers starting together create the table once


@dataclass(frozen=True)
class Row:
    name: str
    path: str
    source: str
    info: str  # JSON
    created_at: str
    uid: str


def new_uid() -> str:
    return uuid.uuid4().hex


def duplicate(name: str) -> ServiceError:
    return ServiceError(409, "duplicate_adapter", f"an adapter named {name!r} is already registered")


class RegistryStore(Protocol):
    shared: bool  # several servers read and write it (and share the adapter root)

    def rows(self) -> list[Row]: ...

    def insert(self, row: Row) -> None:
        """Add ``row``; ServiceError 409 ``duplicate_adapter`` when its name is taken."""

    def delete(self, name: str, uid: str) -> bool:
        """Remove registration ``uid`` of ``name``; False when it is no longer there."""

    def close(self) -> None: ...


class SqliteStore:
    """The registry of one server: a SQLite file (the schema of earlier versions, plus ``uid``)."""

    shared = False

    def __init__(self, path: Path) -> None:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        # timeout: how long a statement waits for another connection's write lock
        self._conn = sqlite3.connect(str(path), timeout=STATEMENT_TIMEOUT_S, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._conn:
            self._conn.execute(_SQLITE_SCHEMA)
            self._migrate()

    def _migrate(self) -> None:
        """Tables written before ``uid`` existed get the column, and every row a uid of its own."""
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(adapters)")}
        if "uid" not in columns:
            self._conn.execute("ALTER TABLE adapters ADD COLUMN uid TEXT")
        missing = [name for (name,) in self._conn.execute("SELECT name FROM adapters WHERE uid IS NULL")]
        for name in missing:
            self._conn.execute("UPDATE adapters SET uid = ? WHERE name = ?", (new_uid(), name))
        self._conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS adapters_uid ON adapters (uid)")

    def rows(self) -> list[Row]:
        with self._lock:
            found = self._conn.execute(f"SELECT {_COLUMNS} FROM adapters ORDER BY name").fetchall()
        return [Row(*row) for row in found]

    def insert(self, row: Row) -> None:
        with self._lock:
            try:
                with self._conn:  # one transaction: committed whole or rolled back
                    self._conn.execute(
                        f"INSERT INTO adapters ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                        (row.name, row.path, row.source, row.info, row.created_at, row.uid),
                    )
            except sqlite3.IntegrityError as exc:
                raise duplicate(row.name) from exc

    def delete(self, name: str, uid: str) -> bool:
        with self._lock, self._conn:
            cursor = self._conn.execute("DELETE FROM adapters WHERE name = ? AND uid = ?", (name, uid))
            return cursor.rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresStore:
    """The registry shared by several servers: a PostgreSQL database (psycopg 3).

    One connection (autocommit: each statement is its own transaction), opened again after it
    broke; every connect is bounded by ``connect_timeout`` and every statement by
    ``statement_timeout``. The DSN may hold a password: it is never logged nor put in a message
    (``describe``).
    """

    shared = True

    def __init__(self, dsn: str) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise LorasaeError(
                "--registry needs psycopg 3: pip install 'lorasae[postgres]' (or psycopg[binary])"
            ) from exc
        self._psycopg = psycopg
        self._dsn = dsn
        self.where = describe(dsn)
        self._lock = threading.Lock()
        self._conn: Any = None
        with self._lock:
            try:
                conn = self._connect()
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    conn.execute(_POSTGRES_SCHEMA)
            except psycopg.Error as exc:
                self._drop()
                raise LorasaeError(
                    f"cannot use the registry database {self.where}: {first_line(exc)}"
                ) from None

    def _connect(self) -> Any:
        if self._conn is None or self._conn.closed:
            self._conn = self._psycopg.connect(
                self._dsn, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True, application_name="lorasae"
            )
            self._conn.execute(f"SET statement_timeout = {int(STATEMENT_TIMEOUT_S * 1000)}")
            self._conn.execute(f"SET lock_timeout = {int(STATEMENT_TIMEOUT_S * 1000)}")
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def _run(self, sql: str, params: tuple = ()) -> Any:
        """One statement (autocommit); a broken connection is dropped (the next call reconnects),
        and the error re-raised as a one-line 503 ``registry_unavailable`` without the DSN."""
        psycopg = self._psycopg
        with self._lock:
            try:
                return self._connect().execute(sql, params)
            except psycopg.errors.UniqueViolation:
                raise
            except psycopg.Error as exc:
                if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
                    self._drop()
                raise ServiceError(
                    503, "registry_unavailable", f"registry database {self.where}: {first_line(exc)}"
                ) from None

    def rows(self) -> list[Row]:
        return [Row(*row) for row in self._run(f"SELECT {_COLUMNS} FROM adapters ORDER BY name").fetchall()]

    def insert(self, row: Row) -> None:
        try:
            self._run(
                f"INSERT INTO adapters ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s)",
                (row.name, row.path, row.source, row.info, row.created_at, row.uid),
            )
        except self._psycopg.errors.UniqueViolation as exc:
            raise duplicate(row.name) from exc
        except ServiceError:
            # the connection broke: the INSERT may have committed all the same; look once
            try:
                found = self._run("SELECT 1 FROM adapters WHERE uid = %s", (row.uid,)).fetchone()
            except ServiceError:
                found = None
            if found is None:
                raise

    def delete(self, name: str, uid: str) -> bool:
        cursor = self._run("DELETE FROM adapters WHERE name = %s AND uid = %s", (name, uid))
        return bool(cursor.rowcount)

    def close(self) -> None:
        with self._lock:
            self._drop()


def open_store(settings: Any) -> RegistryStore:
    """The store the settings name: PostgreSQL (``registry``) or the SQLite file (``db_path``)."""
    if settings.registry:
        return PostgresStore(settings.registry)
    assert settings.db_path is not None, "Settings' validator fills db_path"
    return SqliteStore(settings.db_path)


def describe(dsn: str) -> str:
    """``postgresql://user@host:port/dbname`` of a DSN, without its password (or other options)."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(dsn)
    except Exception:
        return "(unparsable PostgreSQL URL)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host') or 'localhost'}{port}/{parts.get('dbname') or ''}"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__
