"""Several servers, one registry (PostgreSQL) and one adapter root (issue #17 part 2).

Unit level: the two store backends (insert, duplicate, delete by registration, the ``uid``
migration of an old SQLite table, an unreachable database), the shared-root sweep. Then two real
``lorasae serve`` processes over the tiny world sharing one PostgreSQL database (``postgres_fixtures``:
a real PostgreSQL 15, skipped only when its binaries are missing) and one adapter root: what one
registers or deletes the other sees within the bound (poll interval + validation), with the same
numbers; concurrent registrations of one name have exactly one winner; kill -9 during
registrations leaves both servers agreeing with the database.
"""

from __future__ import annotations

import io
import os
import sqlite3
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from postgres_fixtures import postgres, postgres_url  # noqa: F401
from service_fixtures import TEXTS, ServerProcess, wait_until, world  # noqa: F401

from lorasae.errors import LorasaeError
from lorasae.service.errors import ServiceError
from lorasae.service.registry import INCOMING, UPLOAD_MARK, UPLOADS, sweep
from lorasae.service.registry_store import PostgresStore, Row, SqliteStore, describe, new_uid

POLL_S = 0.5
BOUND_S = POLL_S + 20.0  # poll interval + validating the tiny adapters, generous for a busy machine


def _row(name: str, path: str = "a1", source: str = "path") -> Row:
    return Row(name, path, source, "{}", "2025-01-01T00:00:00+00:00", new_uid())


# ------------------------------------------------------------------ the stores


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        made = SqliteStore(tmp_path / "registry.sqlite3")
    else:
        made = PostgresStore(request.getfixturevalue("postgres_url"))
    yield made
    made.close()


def test_store_insert_duplicate_delete(store):
    first = _row("x")
    store.insert(first)
    store.insert(_row("y", "uploads/y-1", "upload"))
    assert [(r.name, r.path, r.source, r.uid) for r in store.rows()] == [
        ("x", "a1", "path", first.uid),
        ("y", "uploads/y-1", "upload", store.rows()[1].uid),
    ]
    with pytest.raises(ServiceError) as err:
        store.insert(_row("x", "a2"))
    assert err.value.status == 409 and err.value.code == "duplicate_adapter"
    assert [r.path for r in store.rows() if r.name == "x"] == ["a1"]  # the first one stays
    assert not store.delete("x", new_uid())  # another registration of the name: not this one
    assert store.delete("x", first.uid)
    assert not store.delete("x", first.uid)
    again = _row("x", "a2")  # registered again: a new registration (uid)
    store.insert(again)
    assert {r.name: r.uid for r in store.rows()}["x"] == again.uid != first.uid


def test_store_concurrent_inserts_have_one_winner(store, tmp_path):
    # a second connection to the same database (another server)
    other = (
        SqliteStore(tmp_path / "registry.sqlite3")
        if isinstance(store, SqliteStore)
        else PostgresStore(store._dsn)
    )
    try:
        for round_ in range(5):
            outcomes: list[str] = []
            barrier = threading.Barrier(2)

            def insert(target, path, name=f"n{round_}", outcomes=outcomes, barrier=barrier):
                barrier.wait()
                try:
                    target.insert(_row(name, path))
                    outcomes.append(path)
                except ServiceError as exc:
                    outcomes.append(exc.code)

            threads = [
                threading.Thread(target=insert, args=(s, p)) for s, p in ((store, "a1"), (other, "a2"))
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(outcomes, key=len)[1] == "duplicate_adapter" and len(outcomes) == 2
            winner = sorted(outcomes, key=len)[0]
            assert [(r.name, r.path) for r in other.rows() if r.name == f"n{round_}"] == [
                (f"n{round_}", winner)
            ]
    finally:
        other.close()


def test_sqlite_migrates_a_table_without_uid(tmp_path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:  # the schema before uid
        db.execute(
            "CREATE TABLE adapters (name TEXT PRIMARY KEY, path TEXT NOT NULL, source TEXT NOT NULL, "
            "info TEXT NOT NULL, created_at TEXT NOT NULL)"
        )
        db.executemany(
            "INSERT INTO adapters VALUES (?, ?, ?, ?, ?)",
            [("a", "a1", "path", "{}", "t0"), ("b", "uploads/b-1", "upload", "{}", "t1")],
        )
    db.close()
    store = SqliteStore(path)
    rows = store.rows()
    assert [(r.name, r.path, r.source, r.created_at) for r in rows] == [
        ("a", "a1", "path", "t0"),
        ("b", "uploads/b-1", "upload", "t1"),
    ]
    assert all(r.uid for r in rows) and len({r.uid for r in rows}) == 2
    store.close()
    reopened = SqliteStore(path)  # migrated once: the uids stay
    assert [r.uid for r in reopened.rows()] == [r.uid for r in rows]
    assert reopened.delete("a", rows[0].uid)
    reopened.close()


def test_unreachable_postgres_is_a_one_line_error_without_the_password():
    with socket_port() as port:
        dsn = f"postgresql://lorasae:s3cret-pw@127.0.0.1:{port}/registry"
        started = time.monotonic()
        with pytest.raises(LorasaeError) as err:
            PostgresStore(dsn)
    message = str(err.value)
    assert time.monotonic() - started < 30
    assert "s3cret" not in message and "\n" not in message
    assert message.startswith(
        f"cannot use the registry database postgresql://lorasae@127.0.0.1:{port}/registry:"
    )
    assert "s3cret" not in describe("host=db user=u password=s3cret-pw dbname=r")


class socket_port:
    """A local port nothing listens on (bound, not listening, while the test runs)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


def test_shared_sweep_keeps_young_leftovers(tmp_path):
    root = tmp_path
    old = time.time() - 7200

    def folder(relative: str, mark: bool = True, age: float | None = old) -> Path:
        path = root / relative
        path.mkdir(parents=True)
        (path / "adapter_config.json").write_text("{}")
        if mark:
            (path / UPLOAD_MARK).write_text("x")
        if age is not None:
            for p in [*path.iterdir(), path]:
                os.utime(p, (age, age))
        return path

    old_incoming, young_incoming = folder(f"{INCOMING}/old"), folder(f"{INCOMING}/young", age=None)
    old_upload, young_upload = folder(f"{UPLOADS}/old-1"), folder(f"{UPLOADS}/young-1", age=None)
    kept, foreign = folder(f"{UPLOADS}/kept-1"), folder(f"{UPLOADS}/foreign", mark=False)
    sweep(root, {f"{UPLOADS}/kept-1"}, grace_s=3600)
    assert not old_incoming.exists() and not old_upload.exists()
    assert young_incoming.exists() and young_upload.exists() and kept.exists() and foreign.exists()
    sweep(root, {f"{UPLOADS}/kept-1"})  # one server: everything it made and no row refers to
    assert not (root / INCOMING).exists() and not young_upload.exists()
    assert kept.exists() and foreign.exists()


# ------------------------------------------------------------------ two real servers


@pytest.fixture(scope="module")
def pair(world, postgres, tmp_path_factory):  # noqa: F811
    """Two servers sharing one PostgreSQL database and one adapter root (started together)."""
    tmp = tmp_path_factory.mktemp("shared-registry")
    url = postgres.create_database("lorasae_shared")
    root = world.adapter_root(tmp)
    servers = []
    for name in ("s1", "s2"):
        (tmp / name).mkdir()
        servers.append(
            ServerProcess(
                world,
                tmp / name,
                registry=url,
                registry_poll_s=POLL_S,
                adapter_root=root,
                LORASAE_TORCH_THREADS="1",
            )
        )
    errors: list[BaseException] = []

    def start(server: ServerProcess) -> None:
        try:
            server.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield servers
    finally:
        for server in servers:
            server.stop()


def _listing(server: ServerProcess) -> dict[str, dict]:
    r = httpx.get(f"{server.url}/v1/adapters", timeout=30)
    assert r.status_code == 200, r.text
    return {a["name"]: a for a in r.json()["adapters"]}


def _wait_seen(server: ServerProcess, name: str, present: bool = True, path: str | None = None) -> float:
    """Seconds until ``server`` lists ``name`` (with ``path``) or, present=False, answers 404."""
    started = time.monotonic()

    def seen() -> bool:
        r = httpx.get(f"{server.url}/v1/adapters/{name}", timeout=30)
        if not present:
            return r.status_code == 404 and r.json()["error"]["code"] == "unknown_adapter"
        return r.status_code == 200 and (path is None or r.json()["path"] == path)

    wait_until(seen, f"{name} {'listed' if present else 'gone'} on {server.url}", timeout=BOUND_S + 30)
    elapsed = time.monotonic() - started
    assert elapsed < BOUND_S, f"{name} took {elapsed:.1f} s (bound {BOUND_S} s)"
    return elapsed


def _features(server: ServerProcess, adapter: str | None) -> dict:
    r = httpx.post(
        f"{server.url}/v1/features",
        timeout=60,
        json={"inputs": TEXTS[:2], "adapter": adapter, "top_k": 4, "logits": "top_k"},
    )
    assert r.status_code == 200, r.text
    return r.json()


def _assert_close(a, b, where: str = "") -> None:
    if isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= 1e-5, f"{where}: {a} != {b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _same_numbers(servers: list[ServerProcess], adapter: str | None) -> None:
    first, *others = [_features(s, adapter) for s in servers]
    for other in others:
        _assert_close(first, other)


def _tar(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname="adapter")
    return buffer.getvalue()


def test_registration_is_seen_and_served_by_the_other(pair):
    s1, s2 = pair
    r = httpx.post(f"{s1.url}/v1/adapters", json={"name": "shared-a1", "path": "a1"}, timeout=60)
    assert r.status_code == 201, r.text
    _wait_seen(s2, "shared-a1", path="a1")
    assert _listing(s2)["shared-a1"]["status"] == "ready"
    _same_numbers(pair, "shared-a1")
    base = _features(s1, None)
    assert base["results"] != _features(s1, "shared-a1")["results"]  # the adapter changes the numbers

    r = httpx.post(
        f"{s2.url}/v1/adapters",
        data={"name": "shared-up"},
        files={"file": ("a2.tar.gz", _tar(s2.adapter_root / "a2"))},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    path = r.json()["path"]
    assert path.startswith("uploads/shared-up-")
    _wait_seen(s1, "shared-up", path=path)
    _same_numbers(pair, "shared-up")


def test_deletion_is_seen_by_the_other(pair):
    s1, s2 = pair
    r = httpx.post(
        f"{s2.url}/v1/adapters",
        data={"name": "gone-up"},
        files={"file": ("a12.tar.gz", _tar(s2.adapter_root / "a12"))},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    folder = s1.adapter_root / r.json()["path"]
    _wait_seen(s1, "gone-up")
    assert httpx.delete(f"{s1.url}/v1/adapters/gone-up", timeout=60).status_code == 204
    assert not folder.exists()  # the deleting server removed the owned upload
    _wait_seen(s2, "gone-up", present=False)
    r = httpx.post(f"{s2.url}/v1/features", json={"inputs": "the cat", "adapter": "gone-up"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_adapter"
    # deleted and registered again under the same name (another registration): the other follows
    assert (
        httpx.post(f"{s1.url}/v1/adapters", json={"name": "again", "path": "a1"}, timeout=60).status_code
        == 201
    )
    _wait_seen(s2, "again", path="a1")
    assert httpx.delete(f"{s1.url}/v1/adapters/again", timeout=60).status_code == 204
    assert (
        httpx.post(f"{s1.url}/v1/adapters", json={"name": "again", "path": "a2"}, timeout=60).status_code
        == 201
    )
    _wait_seen(s2, "again", path="a2")
    _same_numbers(pair, "again")
    assert httpx.delete(f"{s2.url}/v1/adapters/again", timeout=60).status_code == 204
    _wait_seen(s1, "again", present=False)


def test_concurrent_registrations_of_one_name_have_one_winner(pair):
    s1, s2 = pair
    for round_ in range(5):
        name = f"race-{round_}"
        results: dict[str, httpx.Response] = {}
        barrier = threading.Barrier(2)

        def post(server: ServerProcess, path: str, name=name, results=results, barrier=barrier) -> None:
            barrier.wait()
            results[path] = httpx.post(
                f"{server.url}/v1/adapters", json={"name": name, "path": path}, timeout=120
            )

        threads = [
            threading.Thread(target=post, args=(s1, "a1")),
            threading.Thread(target=post, args=(s2, "a2")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(r.status_code for r in results.values())
        assert statuses == [201, 409], {p: r.text for p, r in results.items()}
        loser = next(r for r in results.values() if r.status_code == 409)
        assert loser.json()["error"]["code"] == "duplicate_adapter"
        winner = next(p for p, r in results.items() if r.status_code == 201)
        for server in pair:
            _wait_seen(server, name, path=winner)
    listings = [_listing(s) for s in pair]
    assert {n: a["path"] for n, a in listings[0].items()} == {n: a["path"] for n, a in listings[1].items()}
    _same_numbers(pair, "race-0")


def _slow_upload(
    url: str, name: str, data: bytes, sent: threading.Event, pause_s: float, chunks: int, outcome: list
) -> None:
    """A multipart upload streamed in ``chunks`` pieces ``pause_s`` apart; ``sent`` is set once the
    whole body is out (then the answer is awaited); ``outcome`` gets the response or the error."""
    boundary = "lorasae-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.tar.gz"\r\n'
        "Content-Type: application/gzip\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    step = max(1, len(data) // chunks)

    def body():
        yield head
        for i in range(0, len(data), step):
            time.sleep(pause_s)
            yield data[i : i + step]
        yield tail
        sent.set()

    try:
        outcome.append(
            httpx.post(
                f"{url}/v1/adapters",
                content=body(),
                timeout=120,
                headers={"content-type": f"multipart/form-data; boundary={boundary}"},
            )
        )
    except httpx.HTTPError as exc:
        outcome.append(exc)
    finally:
        sent.set()


def test_kill9_during_registrations_leaves_the_servers_agreeing(pair):
    s1, s2 = pair
    data = _tar(s1.adapter_root / "a2")
    slow_sent, fast_sent = threading.Event(), threading.Event()
    slow_out: list = []
    fast_out: list = []
    # one upload streamed slowly (the kill lands mid-body), one whose body is all sent (the kill
    # lands while it is unpacked, validated or committed), and a path registration
    slow = threading.Thread(target=_slow_upload, args=(s1.url, "k-slow", data, slow_sent, 0.5, 40, slow_out))
    fast = threading.Thread(target=_slow_upload, args=(s1.url, "k-fast", data, fast_sent, 0.0, 4, fast_out))
    slow.start()
    time.sleep(1.0)
    path_reg = threading.Thread(
        target=lambda: _try(
            lambda: httpx.post(f"{s1.url}/v1/adapters", json={"name": "k-path", "path": "a12"}, timeout=120)
        )
    )
    path_reg.start()
    fast.start()
    assert fast_sent.wait(60)
    s1.kill9()
    for t in (slow, fast, path_reg):
        t.join(timeout=180)
    assert isinstance(slow_out[0], httpx.HTTPError)  # cut off mid-body
    s1.start()

    def agree() -> bool:
        rows = {row[0]: row[1] for row in s1.db_rows()}
        return all({n: a["path"] for n, a in _listing(s).items()} == rows for s in pair)

    wait_until(agree, "both servers to list exactly the database's rows", timeout=BOUND_S + 30)
    rows = s1.db_rows()
    assert "k-slow" not in {row[0] for row in rows}  # killed mid-body: never registered
    for name, *_ in rows:
        assert all(_listing(s)[name]["status"] == "ready" for s in pair), name
        _same_numbers(pair, name)
    referenced = {row[1] for row in rows if row[2] == "upload"}
    for folder in (s1.adapter_root / UPLOADS).iterdir():
        # a leftover younger than the grace period stays (it could be a live server's work in
        # progress): it is marked as the server's and no server lists it
        assert f"{UPLOADS}/{folder.name}" in referenced or (folder / UPLOAD_MARK).is_file(), folder
    assert s1.unexpected_errors() == 0 and s2.unexpected_errors() == 0


def _try(fn) -> None:
    try:
        fn()
    except httpx.HTTPError:
        pass
