"""Security regression suite (issue #11): every class of the audit, against real ``lorasae serve``
processes (tiny random Llama + two tiny SAEs from ``service_fixtures``).

One main server (admin key, small limits through ``LORASAE_*`` env vars) answers most classes, in
the order of the tests below; its adapter root is seeded before its first start with the leftovers
of class 3. A second server binds 0.0.0.0 with ``--insecure-no-auth`` (class 8a, started beside the
main one), a third is started on the main one's adapter root and must refuse (class 12b), and the
main server is restarted at the end and must come back with the same registry.

For every refused request: the documented status and code, ``{"error": {"code", "message"}}``, an
answer (no hang), no 5xx; around every batch of refusals the registry (``GET /v1/adapters`` and the
SQLite rows) is unchanged and nothing is written outside the adapter root (the root's parent
folder, a sentinel folder, a victim folder, an absolute /tmp target) nor left in ``uploads/`` or
``.incoming/``. The per-class summary is printed (``pytest -s``) and written to
``test-output/security_summary.json``.

Classes: 1 archive uploads, 2 negative-size tar header, 3 deep trees and leftovers at start,
4 wrongly typed adapter JSON, 5 regular expressions in adapter_config.json, 6 response budget,
7 body limits, 8 unsafe defaults (a: bind without a key, b: media types, c: Host header),
9 slow clients, 10 metrics cardinality, 11 server-owned folders, 12 smaller items (a: no server
paths and no long echoes in errors, b: one server per adapter root), 13 latent queries, 14 drift
queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import uuid
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from test_archive import negative_size, raw_header
from service_fixtures import REPO, ServerProcess, _free_port, world  # noqa: F401
from test_load_fault import _tar_dir

SUMMARY_PATH = REPO / "test-output" / "security_summary.json"
API_KEY = "security-suite-secret"
ADMIN = {"Authorization": f"Bearer {API_KEY}"}
JSON = {"content-type": "application/json"}
UPLOAD_MB = 0.25
UPLOAD_LIMIT = int(UPLOAD_MB * 2**20)
BODY_KB = 64
UNPACK_TIMEOUT_S = 3.0
BODY_TIMEOUT_S = 2.0
HEADER_TIMEOUT_S = 2.0
MAX_RESPONSE_ENTRIES = 5000
MAX_FULL_LOGITS = 500_000
MAIN_ENV = {
    "LORASAE_TORCH_THREADS": "1", "LORASAE_MAX_BODY_KB": str(BODY_KB),
    "LORASAE_MAX_UPLOAD_MB": str(UPLOAD_MB), "LORASAE_UNPACK_TIMEOUT_S": str(UNPACK_TIMEOUT_S),
    "LORASAE_MAX_RESPONSE_ENTRIES": str(MAX_RESPONSE_ENTRIES),
    "LORASAE_MAX_FULL_LOGITS": str(MAX_FULL_LOGITS), "LORASAE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    "LORASAE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
}
# the 0.0.0.0 server (no key) takes the 20 MB 40,000-member plain tar to its unpacker
OPEN_ENV = {"LORASAE_TORCH_THREADS": "1", "LORASAE_MAX_UPLOAD_MB": "32"}
DEPTH = 1100
RSS_BOUND_MB = 20.0
KNOWN_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
ADAPTER_FILES = ("lorasae.json", "adapter_config.json", "adapter_model.safetensors")
UPLOAD_MARK = ".lorasae-upload"
CLASSES = {
    "1": "archive_uploads", "2": "negative_size_tar_header", "3": "deep_trees_and_restarts",
    "4": "wrongly_typed_adapter_json", "5": "regex_in_adapter_config", "6": "response_budget",
    "7": "body_limits", "8a": "unsafe_bind", "8b": "media_types", "8c": "host_header",
    "9": "slow_clients", "10": "metrics_cardinality", "11": "server_owned_folders",
    "12a": "no_paths_no_long_echoes", "12b": "one_server_per_root", "13": "latent_queries",
    "14": "drift_queries", "15": "generate_requests",
    "restart": "final_restart",
}


# ------------------------------------------------------------------ bookkeeping


@dataclass
class Tally:
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    fivexx: int = 0
    hangs: int = 0
    outside_writes: int = 0
    registry_unchanged: bool = True
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"cases": self.cases, "statuses": dict(sorted(self.statuses.items())), "5xx": self.fivexx,
                "hangs": self.hangs, "outside_writes": self.outside_writes,
                "registry_unchanged": self.registry_unchanged, "seconds": round(self.seconds, 1),
                "problems": len(self.problems), **self.extra}


@dataclass
class Req:
    """One request and what must come back: ``expect`` (a status or several), ``code`` (the
    error code), ``mentions`` (regexes the error message must match), ``within`` (seconds)."""

    label: str
    method: str
    path: str
    expect: int | tuple[int, ...]
    code: str | tuple[str, ...] | None = None
    kwargs: dict = field(default_factory=dict)
    within: float | None = None
    mentions: tuple[str, ...] = ()


def _walk(top: Path) -> set[str]:
    """Every path under ``top``, relative, links not followed; iterative (trees of any depth)."""
    found: set[str] = set()
    stack = [str(top)]
    while stack:
        here = stack.pop()
        try:
            with os.scandir(here) as entries:
                for entry in entries:
                    found.add(os.path.relpath(entry.path, top))
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except OSError:
            continue
    return found


def _digest_tree(top: Path) -> dict[str, str]:
    out = {}
    for rel in _walk(top):
        path = top / rel
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def _volatile(rel: str) -> bool:
    """Entries of a server's workdir that change without meaning a write by a request: logs, the
    SQLite journal, the ``.incoming`` folder itself (its contents are not volatile)."""
    name = os.path.basename(rel)
    return name.endswith(".log") or name.startswith("registry.sqlite3-") or rel == "adapter-root/.incoming"


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except Exception:
        return response.text


class Lab:
    """The main server, the folders watched for writes, and the per-class tallies."""

    def __init__(self, world, base: Path) -> None:
        self.world = world
        self.base = base
        self.sentinel = base / "sentinel"
        self.victim = base / "victim"
        self.abs_target = Path(f"/tmp/lorasae-security-{uuid.uuid4().hex[:12]}")
        (base / "main").mkdir()
        self.main = ServerProcess(world, base / "main", api_key=API_KEY, **MAIN_ENV)
        (base / "open").mkdir()
        self.open = ServerProcess(world, base / "open", **OPEN_ENV)
        host = self.open.cmd.index("--host")
        self.open.cmd[host + 1] = "0.0.0.0"
        self.open.cmd.append("--insecure-no-auth")
        self.open_error: BaseException | None = None
        self.tallies: dict[str, Tally] = {}
        self.refused_texts: list[tuple[str, str, str]] = []  # (class, label, answer text)
        self.started = time.monotonic()

    @property
    def url(self) -> str:
        return self.main.url

    @property
    def root(self) -> Path:
        return self.main.adapter_root

    def tally(self, cls: str) -> Tally:
        return self.tallies.setdefault(cls, Tally())

    # -------------------------------------------------------------- state snapshots

    def registry(self) -> tuple:
        r = httpx.get(f"{self.url}/v1/adapters", timeout=30)
        assert r.status_code == 200, r.text
        return r.json(), self.main.db_rows()

    def outside(self) -> dict[str, object]:
        return {"workdir": {p for p in _walk(self.main.workdir) if not _volatile(p)},
                "sentinel": _digest_tree(self.sentinel), "victim": _digest_tree(self.victim),
                "base": set(os.listdir(self.base)), "abs_target": self.abs_target.exists()}

    @contextlib.contextmanager
    def refusals(self, cls: str):
        """Around refused requests only: the registry and everything on disk stay as they were
        (``.incoming`` empty again once every answer is in)."""
        t = self.tally(cls)
        registry, outside = self.registry(), self.outside()
        yield
        registry_after, outside_after = self.registry(), self.outside()
        if registry_after != registry:
            t.registry_unchanged = False
            t.problems.append(f"registry changed: {registry[0]} -> {registry_after[0]}")
        for key, before in outside.items():
            after = outside_after[key]
            if before == after:
                continue
            if isinstance(before, set):
                changed = sorted(before ^ after)
            elif isinstance(before, dict):
                changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            else:
                changed = [key]
            t.outside_writes += len(changed)
            t.problems.append(f"{key} changed: {changed[:10]}")
        incoming = self.root / ".incoming"
        left = sorted(os.listdir(incoming)) if incoming.is_dir() else []
        if left:
            t.problems.append(f".incoming not empty: {left}")

    # -------------------------------------------------------------- sending and judging

    def send(self, cls: str, reqs: list[Req], concurrency: int = 8, timeout: float = 60,
             url: str | None = None) -> list:
        """Send concurrently (each on its own connection), then judge every answer."""
        results = asyncio.run(_send_async(url or self.url, reqs, concurrency, timeout))
        for req, (response, seconds) in zip(reqs, results):
            self.judge(cls, req, response, seconds)
        return [response for response, _ in results]

    def judge(self, cls: str, req: Req, response, seconds: float) -> None:
        t = self.tally(cls)
        t.cases += 1
        if isinstance(response, Exception):
            t.statuses["no answer"] += 1
            if isinstance(response, httpx.TimeoutException):
                t.hangs += 1
            t.problems.append(f"{req.label}: no answer ({type(response).__name__}: {response})")
            return
        status = response.status_code
        t.statuses[str(status)] += 1
        if status >= 500:
            t.fivexx += 1
        expect = req.expect if isinstance(req.expect, tuple) else (req.expect,)
        wrong = []
        if status not in expect:
            wrong.append(f"status {status} not in {expect}")
        if status >= 400:
            self.refused_texts.append((cls, req.label, response.text))
        if status >= 400:  # every refusal: {"error": {"code", "message"}}, with the expected code
            try:
                error = response.json()["error"]
                codes = req.code if isinstance(req.code, tuple) else (req.code,)
                if set(error) != {"code", "message"} or (req.code is not None and error["code"] not in codes):
                    wrong.append(f"error {error} (expected code {req.code})")
            except Exception:
                wrong.append("not a JSON error body")
        message = _message(response)
        for pattern in req.mentions:
            if not re.search(pattern, message):
                wrong.append(f"message does not name {pattern!r}")
        if req.within is not None and seconds > req.within:
            wrong.append(f"took {seconds:.1f} s (limit {req.within} s)")
        if wrong:
            t.problems.append(f"{req.label}: {'; '.join(wrong)} -- {response.text[:300]}")

    def check(self, cls: str) -> None:
        """Fail the test with every problem this class collected; no 500 logged so far."""
        t = self.tally(cls)
        errors = self.main.unexpected_errors()
        if errors:
            t.problems.append(f"{errors} unexpected errors (500s) in the server log")
        assert not t.problems, f"class {cls} ({CLASSES[cls]}):\n" + "\n".join(t.problems[:40])
        assert t.fivexx == 0 and t.hangs == 0 and t.outside_writes == 0 and t.registry_unchanged


async def _send_async(url: str, reqs: list[Req], concurrency: int, timeout: float) -> list:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)

    async def one(http: httpx.AsyncClient, req: Req):
        async with gate:
            started = time.monotonic()
            try:
                response = await http.request(req.method, req.path, **req.kwargs)
            except httpx.HTTPError as exc:
                response = exc
            return response, time.monotonic() - started

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        return await asyncio.gather(*(one(http, req) for req in reqs))


def _upload(label: str, data: bytes, expect, code=None, filename: str = "adapter.tar.gz",
            name: str | None = None, **kw) -> Req:
    name = name or "u-" + uuid.uuid4().hex[:10]
    return Req(label, "POST", "/v1/adapters", expect, code,
               {"data": {"name": name}, "files": {"file": (filename, data, "application/octet-stream")},
                "headers": ADMIN}, **kw)


def _register(label: str, path: str, expect, code=None, name: str | None = None, **kw) -> Req:
    name = name or "p-" + uuid.uuid4().hex[:10]
    return Req(label, "POST", "/v1/adapters", expect, code,
               {"json": {"name": name, "path": path}, "headers": ADMIN}, **kw)


def _raw(port: int, data: bytes, wait: float = 8.0) -> tuple[bytes, bool, float]:
    """Send raw bytes, read until the server closes or ``wait`` passes (a little after the first
    answer bytes); return (bytes read, closed by the server, seconds to the answer or close)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=wait)
    started = time.monotonic()
    chunks: list[bytes] = []
    closed, first = False, None
    try:
        sock.sendall(data)
        deadline = started + wait
        while time.monotonic() < deadline:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
            if first is None:
                first = time.monotonic()
                deadline = min(deadline, first + 0.5)
    finally:
        sock.close()
    end = first if first is not None else time.monotonic()
    return b"".join(chunks), closed, end - started


# ------------------------------------------------------------------ archives


def _reg(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, type_: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = type_, linkname
    return info, None


def _tar(members: list, mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _zip(entries: list, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buffer.getvalue()


def _adapter_files(world) -> dict[str, bytes]:
    return {name: (world.adapters / "a1" / name).read_bytes() for name in ADAPTER_FILES}


def _adapter_members(world, prefix: str = "adapter/") -> list:
    return [_reg(prefix + name, data) for name, data in _adapter_files(world).items()]




def _negative_size_tar(typeflag: bytes = b"0", gz: bool = True) -> bytes:
    data = (raw_header(b"adapter/README", b"00000000000\0")
            + raw_header(b"adapter/x", negative_size(512), typeflag)
            + raw_header(b"adapter/lorasae.json", b"00000000000\0") + bytes(1024))
    return gzip.compress(data) if gz else data


def _cve_2025_4517(world, target: Path) -> bytes:
    """The published CVE-2025-4517 shape: nested long folders reached through symlinks, a symlink
    climbing out with ``../`` past PATH_MAX resolution, then a symlink to ``target``, a hard link
    through it and a file written through it; a valid adapter besides."""
    comp, steps, path, members = "d" * 247, "abcdefghijklmnop", "", []
    for step in steps:
        members += [_special(os.path.join(path, comp), tarfile.DIRTYPE),
                    _special(os.path.join(path, step), tarfile.SYMTYPE, comp)]
        path = os.path.join(path, comp)
    linkpath = os.path.join(*steps, "l" * 254)
    members.append(_special(linkpath, tarfile.SYMTYPE, "../" * len(steps)))
    outside = "../" * 24 + str(target).lstrip("/")  # past the root, then down to the target
    members.append(_special("escape", tarfile.SYMTYPE, os.path.join(linkpath, "..", outside)))
    members.append(_special("adapter/lorasae.json", tarfile.LNKTYPE, "escape/keep.txt"))
    members.append(_reg("escape/pwned", b"owned"))
    return _tar([*members, *_adapter_members(world, "x/")])


def _many_members_tar(n: int = 40_000, same_name: bool = False) -> bytes:
    blocks = [tarfile.TarInfo("f/x" if same_name else f"f/{i}").tobuf(tarfile.USTAR_FORMAT)
              for i in range(n)]
    return b"".join(blocks) + bytes(1024)


def _multipart(name: str, filename: str, data: bytes, boundary: str = "sec-boundary") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n{name}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()


# ------------------------------------------------------------------ the servers


def _deep_tree(top: Path, depth: int = DEPTH) -> Path:
    top.mkdir(parents=True, exist_ok=True)
    bottom = str(top)
    for _ in range(depth):  # one level at a time (Path.mkdir(parents=True) recurses)
        bottom = os.path.join(bottom, "d")
        os.mkdir(bottom)
    bottom = Path(bottom)
    (bottom / "leaf.bin").write_bytes(b"deep")
    return bottom


@pytest.fixture(scope="module")
def lab(world, tmp_path_factory):
    """The main server (seeded with class 3's leftovers before its first start) and the 0.0.0.0
    server (class 8a), started side by side; the summary is written when the module ends."""
    base = tmp_path_factory.mktemp("security")
    lab = Lab(world, base)
    lab.sentinel.mkdir()
    (lab.sentinel / "keep.txt").write_text("untouched")
    lab.victim.mkdir()
    (lab.victim / UPLOAD_MARK).write_text("a mark in a folder outside the root")
    (lab.victim / "precious.txt").write_text("operator data outside the root")
    root = lab.root
    # class 3: what a crashed server and an operator left in the root
    _deep_tree(root / ".incoming" / "crashed-upload")
    marked = root / "uploads" / "someleftover"
    _deep_tree(marked)
    (marked / UPLOAD_MARK).write_text("unpacked by lorasae serve; removed with its registration\n")
    owned = root / "uploads" / "operator-owned"
    shutil.copytree(world.adapters / "a1", owned)
    (owned / "notes").mkdir()
    (owned / "notes" / "data.txt").write_text("operator data")
    lab.operator_files = _digest_tree(owned)
    (root / "uploads" / "evil-link").symlink_to(lab.victim, target_is_directory=True)

    def start_open() -> None:
        try:
            lab.open.start()
        except BaseException as exc:
            lab.open_error = exc

    opener = threading.Thread(target=start_open, daemon=True)
    opener.start()
    started = time.monotonic()
    try:
        lab.main.start()
        lab.main_start_seconds = time.monotonic() - started
        opener.join(timeout=300)
        yield lab
    finally:
        lab.main.stop()
        lab.open.stop()
        _write_summary(lab)
        shutil.rmtree(lab.abs_target, ignore_errors=True)


def _write_summary(lab: Lab) -> None:
    data = {"runtime_s": round(time.monotonic() - lab.started, 1), "classes": {}}
    for cls, name in CLASSES.items():
        if cls in lab.tallies:
            data["classes"][f"{cls} {name}"] = lab.tallies[cls].as_dict()
    SUMMARY_PATH.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY_PATH.write_text(json.dumps(data, indent=2) + "\n")
    print("\n==== security summary ====")
    for cls, values in data["classes"].items():
        print(f"{cls}: {json.dumps(values)}")
    print(f"runtime: {data['runtime_s']} s (written to {SUMMARY_PATH})")


@contextlib.contextmanager
def _timed(lab: Lab, cls: str):
    started = time.monotonic()
    try:
        yield lab.tally(cls)
    finally:
        lab.tally(cls).seconds += time.monotonic() - started


# ------------------------------------------------------------------ 3. deep trees and leftovers


def test_03_start_sweeps_deep_leftovers(lab):
    """Seeded before the first start: a 1,100-deep tree in .incoming, a 1,100-deep marked orphan
    upload, an unmarked operator folder in uploads/, and a marked-looking symlink to a folder
    outside the root. The server started and is ready (the fixture waited for /readyz)."""
    with _timed(lab, "3") as t:
        root = lab.root
        checks = {
            "ready": httpx.get(f"{lab.url}/readyz").json().get("status") == "ready",
            ".incoming leftovers removed": not any((root / ".incoming").iterdir())
            if (root / ".incoming").exists() else True,
            "marked orphan upload removed": not os.path.lexists(root / "uploads" / "someleftover"),
            "operator folder untouched": _digest_tree(root / "uploads" / "operator-owned") == lab.operator_files,
            "victim outside the root untouched": sorted(os.listdir(lab.victim)) == [UPLOAD_MARK, "precious.txt"],
            "started in time": lab.main_start_seconds < 150,
        }
        t.cases += len(checks)
        for what, ok in checks.items():
            t.statuses["ok" if ok else "failed"] += 1
            if not ok:
                t.problems.append(what)
        t.outside_writes += 0 if checks["victim outside the root untouched"] else 1
        t.extra = {"first_start_s": round(lab.main_start_seconds, 1)}
        log = lab.main.log_text()
        if "operator-owned" not in log:
            t.problems.append("the server did not log that it left uploads/operator-owned alone")
    lab.check("3")


# ------------------------------------------------------------------ 10. metrics cardinality


def _request_series(text: str) -> list[dict[str, str]]:
    series = []
    for line in text.splitlines():
        if line.startswith("lorasae_requests_total{"):
            labels = line[line.index("{") + 1:line.rindex("}")]
            series.append(dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels)))
    return series


def test_10_metrics_cardinality(lab):
    with _timed(lab, "10"), lab.refusals("10"):
        rng = random.Random(10)
        paths = ["/v1/features", "/healthz", "/v1/adapters", "/v1/adapters/a1", "/metrics", "/nope"]
        reqs = [Req(f"method FOO{i}", f"FOO{i}X{rng.randrange(10**6)}", rng.choice(paths), (404, 405, 501))
                for i in range(200)]
        tokens = [uuid.uuid4().hex for _ in range(200)]
        reqs += [Req(f"path {i}", "GET", f"/{token}/{i}", 404, "not_found")
                 for i, token in enumerate(tokens)]
        lab.send("10", reqs, concurrency=16)
        r = httpx.get(f"{lab.url}/metrics")
        assert r.status_code == 200
        series = _request_series(r.text)
        t = lab.tally("10")
        methods = {s.get("method") for s in series}
        if len(series) >= 20:
            t.problems.append(f"{len(series)} lorasae_requests_total series: {series}")
        if not methods <= KNOWN_METHODS | {"other"}:
            t.problems.append(f"methods in metrics: {sorted(methods)}")
        if "other" not in methods:
            t.problems.append("invented methods not counted as 'other'")
        leaked = [token for token in tokens if token in r.text] + (["FOO"] if "FOO" in r.text else [])
        if leaked:
            t.problems.append(f"client-chosen values in /metrics: {leaked[:5]}")
        t.extra = {"series": len(series)}
    lab.check("10")


# ------------------------------------------------------------------ 1. archive uploads


def test_01_archive_uploads(lab, world):
    cls = "1"
    adapter = _adapter_members(world)
    files = _adapter_files(world)
    abs_name = str(lab.abs_target / "pwned")
    sentinel_file = str(lab.sentinel / "keep.txt")
    zeros = bytes(16 << 20)  # 16 MiB: a few KB compressed, 64 x the unpacked limit
    invalid = (400, "invalid_archive")
    cases: list[tuple[str, bytes, str, tuple[int, str]]] = [
        ("CVE-2025-4517 chain", _cve_2025_4517(world, lab.sentinel), "a.tar.gz", invalid),
        ("hardlink through a symlinked path", _tar([
            *adapter, _special("a", tarfile.SYMTYPE, "."),
            _special("b", tarfile.SYMTYPE, "a/" + "../" * 24 + str(lab.sentinel).lstrip("/")),
            _special("adapter/lorasae2.json", tarfile.LNKTYPE, "b/keep.txt"), _reg("b/pwned", b"owned")]),
         "a.tar.gz", invalid),
        ("symlink to /etc/passwd", _tar([*adapter, _special("adapter/link", tarfile.SYMTYPE, "/etc/passwd")]),
         "a.tar.gz", invalid),
        ("relative symlink out", _tar([*adapter, _special("adapter/up", tarfile.SYMTYPE, "../../../../..")]),
         "a.tar.gz", invalid),
        ("symlink named like an adapter file", _tar([
            *adapter[:2], _special("adapter/adapter_model.safetensors", tarfile.SYMTYPE, sentinel_file)]),
         "a.tar.gz", invalid),
        ("folder symlink then a file through it", _tar([
            _special("adapter", tarfile.SYMTYPE, str(lab.sentinel)), _reg("adapter/pwned", b"owned"),
            *_adapter_members(world, "real/")]), "a.tar.gz", invalid),
        ("hardlink to /etc/passwd", _tar([*adapter, _special("adapter/hard", tarfile.LNKTYPE, "/etc/passwd")]),
         "a.tar.gz", invalid),
        ("hardlink to a sentinel file", _tar([*adapter, _special("adapter/hard", tarfile.LNKTYPE, sentinel_file)]),
         "a.tar.gz", invalid),
        ("hardlink inside the archive", _tar([
            *adapter, _special("adapter/copy.json", tarfile.LNKTYPE, "adapter/lorasae.json")]),
         "a.tar.gz", invalid),
        ("fifo", _tar([*adapter, _special("adapter/fifo", tarfile.FIFOTYPE)]), "a.tar.gz", invalid),
        ("character device", _tar([*adapter, _special("adapter/null", tarfile.CHRTYPE)]), "a.tar.gz", invalid),
        ("block device", _tar([*adapter, _special("adapter/sda", tarfile.BLKTYPE)]), "a.tar.gz", invalid),
        ("absolute name (tar)", _tar([*adapter, _reg(abs_name, b"owned")]), "a.tar.gz", invalid),
        ("absolute adapter file (tar)", _tar([*adapter[:2], _reg(abs_name + "/adapter_model.safetensors",
                                                                  files["adapter_model.safetensors"])]),
         "a.tar.gz", invalid),
        ("absolute name (plain tar)", _tar([*adapter, _reg(abs_name, b"owned")], mode="w"), "a.tar", invalid),
        ("absolute name (zip)", _zip([*[(f"adapter/{n}", d) for n, d in files.items()], (abs_name, b"owned")]),
         "a.zip", invalid),
        ("'..' name (tar)", _tar([*adapter, _reg("../escape", b"owned")]), "a.tar.gz", invalid),
        ("'..' deep name (tar)", _tar([*adapter, _reg("adapter/../../../escape", b"owned")]), "a.tar.gz", invalid),
        ("'..' name (zip)", _zip([*[(f"adapter/{n}", d) for n, d in files.items()], ("../escape", b"owned")]),
         "a.zip", invalid),
        ("'..' adapter file (zip)", _zip([(f"adapter/../{n}", d) for n, d in files.items()]), "a.zip", invalid),
        ("1,100-deep file (tar)", _tar([*adapter, _reg("d/" * DEPTH + "f", b"deep")]), "a.tar.gz", invalid),
        ("1,100-deep folder (tar)", _tar([*adapter, _special("d/" * DEPTH, tarfile.DIRTYPE)]), "a.tar.gz", invalid),
        ("1,100-deep file (zip)", _zip([*[(f"adapter/{n}", d) for n, d in files.items()],
                                       ("d/" * DEPTH + "f", b"deep")]), "a.zip", invalid),
        ("1,100-deep adapter (zip)", _zip([("d/" * DEPTH + n, d) for n, d in files.items()]), "a.zip", invalid),
        ("40,000 members (tar.gz)", gzip.compress(_many_members_tar(same_name=True)), "a.tar.gz", invalid),
        (".tar.bz2", _tar(adapter, mode="w:bz2"), "a.tar.bz2", invalid),
        (".tar.xz", _tar(adapter, mode="w:xz"), "a.tar.xz", invalid),
        (".tar.bz2 named .tar.gz", _tar(adapter, mode="w:bz2"), "a.tar.gz", invalid),
        ("gzip bomb (skipped member)", _tar([*adapter, _reg("adapter/checkpoint/zeros.bin", zeros)]),
         "a.tar.gz", (413, "upload_too_large")),
        ("gzip bomb (adapter file)", _tar([*adapter[:2], _reg("adapter/adapter_model.safetensors", zeros)]),
         "a.tar.gz", (413, "upload_too_large")),
        ("zip bomb", _zip([*[(f"adapter/{n}", d) for n, d in files.items()], ("adapter/zeros.bin", zeros)]),
         "a.zip", (413, "upload_too_large")),
        ("zip bomb (adapter file)", _zip([("adapter/lorasae.json", files["lorasae.json"]),
                                          ("adapter/adapter_config.json", files["adapter_config.json"]),
                                          ("adapter/adapter_model.safetensors", zeros)]),
         "a.zip", (413, "upload_too_large")),
        ("compressed size over max_upload_mb", os.urandom(2 * UPLOAD_LIMIT), "a.tar.gz", (413, "upload_too_large")),
    ]
    many_plain = _many_members_tar()
    with _timed(lab, cls), lab.refusals(cls):
        reqs = [_upload(label, data, status, code, filename=filename, within=30)
                for label, data, filename, (status, code) in cases]
        # each hostile archive holds a valid adapter too: the refusal must be for the hostile member
        reasons = {"CVE": "symbolic link", "symlink": "symbolic link", "hardlink": "symbolic link|hard link",
                   "fifo": "FIFO", "device": "device", "absolute": "absolute", "'..'": r"'\.\.'",
                   "1,100-deep": "deep|longer", "40,000": "64 members", ".tar.": r"\.tar\.gz.*\.zip"}
        for req in reqs:
            req.mentions = tuple({reason for key, reason in reasons.items() if key in req.label})
            if "40,000" in req.label:
                req.within = 10
        # 20 MB: over this server's upload limit, refused at the edge before anything is stored
        reqs.append(_upload("40,000 members (plain tar, 20 MB)", many_plain, 413, "upload_too_large",
                            filename="a.tar", within=10))
        lab.send(cls, reqs)
        assert not lab.abs_target.exists()
        assert (lab.sentinel / "keep.txt").read_text() == "untouched"

    # good uploads: each 201, stored as exactly the adapter files + the server's mark
    with _timed(lab, cls):
        uploads_before = set(os.listdir(lab.root / "uploads"))
        good = [
            ("a1 folder (.tar.gz)", _tar_dir(world.adapters / "a1"), "a1.tar.gz"),
            ("flat files (.tgz)", _tar(_adapter_members(world, "")), "a1.tgz"),
            ("zip", _zip([(f"adapter/{n}", d) for n, d in files.items()]), "a1.zip"),
            ("extra README and docs", _tar([*adapter, _reg("adapter/README.md", b"# readme\n"),
                                            _reg("adapter/docs/notes.md", b"notes")]), "a1.tar.gz"),
            ("plain .tar", _tar(adapter, mode="w"), "a1.tar"),
        ]
        reqs = [_upload(label, data, 201, filename=filename, name=f"good-{i}", within=60)
                for i, (label, data, filename) in enumerate(good)]
        lab.send(cls, reqs, concurrency=2)
        listed = {a["name"]: a for a in httpx.get(f"{lab.url}/v1/adapters").json()["adapters"]}
        t = lab.tally(cls)
        new = set(os.listdir(lab.root / "uploads")) - uploads_before
        for i in range(len(good)):
            info = listed.get(f"good-{i}")
            if info is None or info["status"] != "ready" or info["source"] != "upload":
                t.problems.append(f"good-{i} not listed ready as an upload: {info}")
                continue
            folder = lab.root / info["path"]
            if sorted(os.listdir(folder)) != sorted([*ADAPTER_FILES, UPLOAD_MARK]):
                t.problems.append(f"good-{i} stored {sorted(os.listdir(folder))}")
        if len(new) != len(good):
            t.problems.append(f"uploads/ gained {sorted(new)}")
        r = httpx.post(f"{lab.url}/v1/features", json={"inputs": "the cat sat", "adapter": "good-0"})
        if r.status_code != 200:
            t.problems.append(f"features through an uploaded adapter: {r.status_code} {r.text[:200]}")
    lab.check(cls)


# ------------------------------------------------------------------ 2. negative-size header


def test_02_negative_size_header(lab, world):
    cls = "2"
    within = UNPACK_TIMEOUT_S + 5
    with _timed(lab, cls):
        with lab.refusals(cls):
            for typeflag, gz in ((b"0", True), (b"0", False), (b"x", True), (b"L", True)):
                label = f"negative size, typeflag {typeflag.decode()}, {'tar.gz' if gz else 'tar'}"
                lab.send(cls, [_upload(label, _negative_size_tar(typeflag, gz), 400, "invalid_archive",
                                       within=within)])
        # right after: registrations go through (the registry lock is not wedged)
        lab.send(cls, [_register("path registration right after", "a1", 201, name="after-negative",
                                 within=30)])
        lab.send(cls, [_upload("upload right after", _tar_dir(world.adapters / "a2"), 201,
                               name="after-negative-upload", within=30)])
        # and concurrently with one
        lab.send(cls, [_upload("negative size beside a registration", _negative_size_tar(), 400,
                               "invalid_archive", within=within),
                       _register("registration beside it", "a12", 201, name="beside-negative",
                                 within=within + 10)], concurrency=2)
    lab.check(cls)


# ------------------------------------------------------------------ 4. wrongly typed adapter JSON


def _variant(root: Path, world, label: str, manifest=None, config=None, raw_config: str | None = None) -> str:
    folder = root / f"typed-{re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')}"
    shutil.copytree(world.adapters / "a1", folder)
    if manifest is not None:
        data = json.loads((folder / "lorasae.json").read_text())
        manifest(data)
        (folder / "lorasae.json").write_text(json.dumps(data))
    if config is not None:
        data = json.loads((folder / "adapter_config.json").read_text())
        config(data)
        (folder / "adapter_config.json").write_text(json.dumps(data))
    if raw_config is not None:
        (folder / "adapter_config.json").write_text(raw_config)
    return folder.name


def _no_constant(name: str):
    raise ValueError(f"{name} in a JSON answer")


def _set(**changes):
    return lambda data: data.update(changes)


def _set_sae(**changes):
    return lambda data: data["saes"][0].update(changes)


def test_04_wrongly_typed_adapter_json(lab, world):
    cls = "4"
    manifest_cases = [
        ("eval_after a string", _set(eval_after="x"), "eval_after"),
        ("eval_after a list", _set(eval_after=[1, 2]), "eval_after"),
        ("base_model a number", _set(base_model=5), "base_model"),
        ("base_model_fingerprint null", _set(base_model_fingerprint=None), "base_model_fingerprint"),
        ("hook_name a number", _set_sae(hook_name=5), "hook_name"),
        ("saes an object", lambda d: d.update(saes={"0": d["saes"][0]}), "saes"),
        ("saes empty", _set(saes=[]), "saes"),
        ("layer a float", _set_sae(layer=1.5), "layer"),
        ("layer an integral float", _set_sae(layer=1.0), "layer"),
        ("layer a string", _set_sae(layer="1"), "layer"),
        ("d_sae a string", _set_sae(d_sae="64"), "d_sae"),
        ("lora a list", _set(lora=[]), "lora"),
        ("training a string", _set(training="x"), "training"),
        ("created_at a number", _set(created_at=5), "created_at"),
        ("version a string", _set(version="1"), "version"),
    ]
    config_cases = [
        ("layers_to_transform strings", _set(layers_to_transform=["x"]), "layers_to_transform"),
        ("layers_to_transform a float", _set(layers_to_transform=2.5), "layers_to_transform"),
        ("r a string", _set(r="4"), r"\br\b"),
        ("r a float", _set(r=4.0), r"\br\b"),
        ("lora_alpha a string", _set(lora_alpha="x"), "lora_alpha"),
        ("lora_dropout a string", _set(lora_dropout="0.1"), "lora_dropout"),
        ("target_modules a number", _set(target_modules=5), "target_modules"),
        ("target_modules numbers", _set(target_modules=[5]), "target_modules"),
        ("bias all", _set(bias="all"), "bias"),
        ("init_lora_weights pissa", _set(init_lora_weights="pissa"), "init_lora_weights"),
        ("init_lora_weights loftq", _set(init_lora_weights="loftq"), "init_lora_weights"),
        ("modules_to_save lm_head", _set(modules_to_save=["lm_head"]), "modules_to_save"),
        ("layer_replication", _set(layer_replication=[[0, 1]]), "layer_replication"),
        ("use_dora true", _set(use_dora=True), "use_dora"),
        ("fan_in_fan_out a string", _set(fan_in_fan_out="yes"), "fan_in_fan_out"),
        ("peft_type IA3", _set(peft_type="IA3"), "peft_type"),
        ("rank_pattern value a string", _set(rank_pattern={"q_proj": "4"}), "rank_pattern"),
        ("alpha_pattern value a string", _set(alpha_pattern={"q_proj": "x"}), "alpha_pattern"),
        ("loftq_config set", _set(loftq_config={"loftq_bits": 4}), "loftq_config"),
        ("unknown option set", _set(some_future_option={"x": 1}), "some_future_option"),
    ]
    reqs = []
    for label, edit, mentions in manifest_cases:
        path = _variant(lab.root, world, "man " + label, manifest=edit)
        reqs.append(_register(f"lorasae.json: {label}", path, 400, "invalid_adapter", mentions=(mentions,)))
    for label, edit, mentions in config_cases:
        path = _variant(lab.root, world, "cfg " + label, config=edit)
        reqs.append(_register(f"adapter_config.json: {label}", path, 400, "invalid_adapter",
                              mentions=(mentions,)))
    text = (world.adapters / "a1" / "adapter_config.json").read_text()
    nan_config = re.sub(r'"lora_alpha":\s*[0-9.]+', '"lora_alpha": NaN', text)
    assert "NaN" in nan_config
    path = _variant(lab.root, world, "cfg lora_alpha NaN", raw_config=nan_config)
    reqs.append(_register("adapter_config.json: lora_alpha NaN", path, 400, "invalid_adapter"))
    with _timed(lab, cls):
        with lab.refusals(cls):
            lab.send(cls, reqs)
        # NaN / Infinity inside free-form manifest fields: accepted or refused, never a broken listing
        for label, edit in (("eval_after NaN", _set(eval_after={"ce": float("nan"), "kl": float("inf")})),
                            ("training Infinity", _set(training={"lr": float("-inf")}))):
            path = _variant(lab.root, world, "man " + label, manifest=edit)
            lab.send(cls, [_register(f"lorasae.json: {label}", path, (201, 400), name=f"nan-{label[:4]}")])
        t = lab.tally(cls)
        r = httpx.get(f"{lab.url}/v1/adapters")
        t.cases += 1
        t.statuses[f"list {r.status_code}"] += 1
        try:
            json.loads(r.text, parse_constant=_no_constant)
        except ValueError as exc:
            t.problems.append(f"GET /v1/adapters is not strict JSON: {exc}")
        if r.status_code != 200:
            t.problems.append(f"GET /v1/adapters answered {r.status_code}")
        for info in r.json()["adapters"]:
            r2 = httpx.get(f"{lab.url}/v1/adapters/{info['name']}")
            if r2.status_code != 200:
                t.problems.append(f"GET /v1/adapters/{info['name']}: {r2.status_code}")
    lab.check(cls)


# ------------------------------------------------------------------ 5. regular expressions


def test_05_regex_in_adapter_config(lab, world):
    cls = "5"
    cases = [
        ("target_modules a catastrophic regex", _set(target_modules="(a+)+$"), "target_modules"),
        ("target_modules a regex", _set(target_modules=".*q_proj"), "target_modules"),
        ("target_modules a plain string", _set(target_modules="q_proj"), "target_modules"),
        ("target_modules list with a regex", _set(target_modules=["q_proj", "(a+)+$"]), "target_modules"),
        ("exclude_modules a regex", _set(exclude_modules="(x+x+)+y"), "exclude_modules"),
        ("exclude_modules list with a regex", _set(exclude_modules=["(x+x+)+y"]), "exclude_modules"),
        ("rank_pattern regex key", _set(rank_pattern={"(a+)+": 4}), "rank_pattern"),
        ("alpha_pattern regex key", _set(alpha_pattern={"(a+)+$": 8}), "alpha_pattern"),
        ("layers_pattern a regex", _set(layers_pattern="(a|a)*"), "layers_pattern"),
        ("layers_pattern list with a regex", _set(layers_pattern=["(a|a)*"]), "layers_pattern"),
    ]
    reqs = [_register(label, _variant(lab.root, world, "re " + label, config=edit), 400, "invalid_adapter",
                      within=5, mentions=(mentions,)) for label, edit, mentions in cases]
    with _timed(lab, cls), lab.refusals(cls):
        for req in reqs:  # one at a time: each answer timed on its own
            lab.send(cls, [req])
    lab.check(cls)


# ------------------------------------------------------------------ 6. response budget


def _ids(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [1] + [rng.randrange(3, vocab) for _ in range(n - 1)]


def test_06_response_budget(lab):
    cls = "6"
    rng = random.Random(6)
    vocab = httpx.post(f"{lab.url}/v1/features", json={"inputs": [[1, 3]], "logits": "full"}).json()
    vocab = len(vocab["results"][0]["tokens"][0]["logits"])
    budget = MAX_RESPONSE_ENTRIES  # tokens x (top_k x SAEs + logits_top_k)
    just_under = budget // (2 * 32)  # 78 tokens x 32 x 2 SAEs = 4992
    over_logits = MAX_FULL_LOGITS // vocab + 1
    over_per_input = over_logits // 8 + 1

    def feats(label: str, body: dict, expect: int, code: str | None = None) -> Req:
        return Req(label, "POST", "/v1/features", expect, code, {"json": body})

    def seqs(*lengths: int) -> list[list[int]]:
        return [_ids(rng, vocab, n) for n in lengths]

    reqs = [
        feats("8 x 100 tokens, top_k 64", {"inputs": seqs(*[100] * 8), "top_k": 64}, 413, "response_too_large"),
        feats(f"{just_under + 1} tokens, top_k 32 (one over)", {"inputs": seqs(just_under + 1), "top_k": 32},
              413, "response_too_large"),
        feats("top_k 1024, 8 tokens", {"inputs": seqs(8), "top_k": 1024}, 413, "response_too_large"),
        feats("logits_top_k 1000, 50 tokens", {"inputs": seqs(50), "logits": "top_k", "logits_top_k": 1000},
              413, "response_too_large"),
        feats(f"full logits, {8 * over_per_input} tokens (just over)",
              {"inputs": seqs(*[over_per_input] * 8), "logits": "full", "top_k": 1, "saes": ["sae1"]},
              413, "too_many_logits"),
        feats("full logits, 8 x 1000 tokens", {"inputs": seqs(*[1000] * 8), "logits": "full"},
              413, "too_many_logits"),
    ]
    with _timed(lab, cls):
        with lab.refusals(cls):
            lab.send(cls, reqs)
        lab.send(cls, [feats(f"{just_under} tokens, top_k 32 (just under)",
                             {"inputs": seqs(just_under // 2, just_under - just_under // 2), "top_k": 32}, 200)])
        # /healthz keeps answering while a large-but-allowed answer is computed and rendered
        big = {"inputs": seqs(*[1000] * 5), "top_k": 1, "saes": ["sae1"], "logits": "full"}
        assert 5000 * 1 <= budget and 5000 * vocab <= MAX_FULL_LOGITS
        holder: dict = {}

        def fire() -> None:
            started = time.monotonic()
            try:
                holder["response"] = httpx.post(f"{lab.url}/v1/features", json=big, timeout=120)
            except httpx.HTTPError as exc:
                holder["response"] = exc
            holder["seconds"] = time.monotonic() - started

        worker = threading.Thread(target=fire)
        worker.start()
        latencies = []
        while worker.is_alive():
            started = time.monotonic()
            try:
                status = httpx.get(f"{lab.url}/healthz", timeout=5).status_code
            except httpx.HTTPError:
                status = -1
            latencies.append((status, time.monotonic() - started))
            time.sleep(0.05)
        worker.join()
        lab.judge(cls, Req("large-but-allowed answer (5,000 tokens x full logits)", "POST", "/v1/features",
                           200), holder["response"], holder["seconds"])
        t = lab.tally(cls)
        for status, seconds in latencies:
            t.cases += 1
            t.statuses[f"healthz {status}"] += 1
            if status != 200 or seconds >= 1.0:
                t.problems.append(f"/healthz during the large answer: {status} in {seconds:.2f} s")
        response = holder["response"]
        if isinstance(response, httpx.Response) and response.status_code == 200:
            tokens = [tok for res in response.json()["results"] for tok in res["tokens"]]
            if len(tokens) != 5000 or any(len(tok["logits"]) != vocab for tok in tokens[:50]):
                t.problems.append("the large answer is not 5,000 tokens of full logits")
        if len(latencies) < 2:
            t.problems.append(f"only {len(latencies)} /healthz probes while the large answer was built "
                              f"({holder['seconds']:.2f} s)")
        t.extra = {"large_answer_s": round(holder["seconds"], 2), "healthz_probes": len(latencies),
                   "healthz_max_s": round(max((s for _, s in latencies), default=0), 3)}
    lab.check(cls)


# ------------------------------------------------------------------ 7. body limits


class RssPeak:
    """Samples the server's RSS in a thread; ``growth`` = peak - baseline."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.baseline = server.rss_mb()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss_mb())
            time.sleep(0.01)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.server.rss_mb())

    @property
    def growth(self) -> float:
        return self.peak - self.baseline


def _chunks(data: bytes, size: int = 64 * 1024):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def test_07_body_limits(lab, world):
    cls = "7"
    t = lab.tally(cls)
    big = b'{"inputs": "' + b"a" * (50 << 20) + b'"}'
    register_big = b'{"name": "big", "path": "' + b"a" * (50 << 20) + b'"}'
    good = _tar_dir(world.adapters / "a1")
    over_upload = _multipart("big-upload", "a.tar.gz", good + os.urandom(2 * UPLOAD_LIMIT))  # > 0.25 MB
    over_edge = _multipart("bigger-upload", "a.tar.gz", good + os.urandom(5 << 20))  # > 0.25 MB + 1 MB
    multipart_ct = {"content-type": "multipart/form-data; boundary=sec-boundary"}
    sends = [
        ("50 MiB features (Content-Length)", "/v1/features", big, JSON, 413, "request_too_large"),
        ("50 MiB features (chunked)", "/v1/features", _chunks(big), JSON, 413, "request_too_large"),
        ("50 MiB register JSON (Content-Length)", "/v1/adapters", register_big, {**JSON, **ADMIN},
         413, "request_too_large"),
        ("50 MiB register JSON (chunked)", "/v1/adapters", _chunks(register_big), {**JSON, **ADMIN},
         413, "request_too_large"),
        ("5 MiB upload (Content-Length)", "/v1/adapters", over_edge, {**multipart_ct, **ADMIN},
         413, "upload_too_large"),
        ("5 MiB upload (chunked)", "/v1/adapters", _chunks(over_edge), {**multipart_ct, **ADMIN},
         413, "upload_too_large"),
        ("0.5 MiB upload over max_upload_mb (chunked)", "/v1/adapters", _chunks(over_upload),
         {**multipart_ct, **ADMIN}, 413, "upload_too_large"),
        ("100 KiB features body", "/v1/features", b'{"inputs": "the cat"}' + b" " * (100 << 10), JSON,
         413, "request_too_large"),
    ]
    with _timed(lab, cls):
        with lab.refusals(cls):
            # warm the paths first, so that the baseline holds the allocator's working size
            for _ in range(3):
                httpx.post(f"{lab.url}/v1/features", content=b'{"inputs": "the cat"}', headers=JSON)
            with RssPeak(lab.main) as rss, httpx.Client(
                    base_url=lab.url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as http:
                for label, path, content, headers, expect, code in sends:
                    started = time.monotonic()
                    try:
                        response = http.post(path, content=content, headers=headers)
                    except httpx.HTTPError as exc:
                        response = exc
                    lab.judge(cls, Req(label, "POST", path, expect, code, within=30), response,
                              time.monotonic() - started)
            t.cases += 1
            t.statuses["rss bounded" if rss.growth < RSS_BOUND_MB else "rss grew"] += 1
            if rss.growth >= RSS_BOUND_MB:
                t.problems.append(f"server RSS grew by {rss.growth:.1f} MB ({rss.baseline:.0f} -> {rss.peak:.0f})")
            t.extra = {"rss_baseline_mb": round(rss.baseline, 1), "rss_growth_mb": round(rss.growth, 1)}
            # a body that stalls: 408 or the connection closed, within the body timeout + slack
            port = lab.main.port
            head = (f"POST {{path}} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{{extra}}"
                    "Content-Length: 1000\r\n\r\n")
            stalls = [
                ("stalled features body", head.format(path="/v1/features",
                                                     extra="Content-Type: application/json\r\n"),
                 b'{"inputs":'),
                ("stalled register body", head.format(
                    path="/v1/adapters", extra=f"Content-Type: application/json\r\n"
                                               f"Authorization: Bearer {API_KEY}\r\n"), b'{"name": "'),
                ("stalled upload", head.format(
                    path="/v1/adapters", extra="Content-Type: multipart/form-data; boundary=sec-boundary\r\n"
                                               f"Authorization: Bearer {API_KEY}\r\n"),
                 _multipart("stalled", "a.tar.gz", good)[:200]),
                ("stalled chunked body", f"POST /v1/features HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                         "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
                 b"a\r\n{\"inputs\":\r\n"),
            ]
            results: list = [None] * len(stalls)

            def stall(i: int, header: str, body: bytes) -> None:
                results[i] = _raw(port, header.encode() + body, wait=BODY_TIMEOUT_S + 6)

            threads = [threading.Thread(target=stall, args=(i, h, b)) for i, (_, h, b) in enumerate(stalls)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for (label, _, _), (data, closed, seconds) in zip(stalls, results):
                t.cases += 1
                status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else ""
                t.statuses[status or ("closed" if closed else "no answer")] += 1
                if data:
                    lab.refused_texts.append((cls, label, data.decode("latin-1")))
                if status == "408":
                    if b"request_timeout" not in data:
                        t.problems.append(f"{label}: 408 without the request_timeout code: {data[:300]!r}")
                elif not (closed and not data):
                    if not status:
                        t.hangs += 1
                    t.problems.append(f"{label}: expected 408 or a close, got {data[:200]!r} closed={closed}")
                if seconds > BODY_TIMEOUT_S + 3:
                    t.problems.append(f"{label}: answered after {seconds:.1f} s")
    lab.check(cls)


# ------------------------------------------------------------------ 8b. media types


def test_08b_media_types(lab):
    cls = "8b"
    body = b'{"inputs": "the cat"}'
    register = b'{"name": "by-415", "path": "a1"}'
    boundary = "multipart/form-data; boundary=xyz"
    multipart = b'--xyz\r\nContent-Disposition: form-data; name="inputs"\r\n\r\nthe cat\r\n--xyz--\r\n'
    reqs = []
    for label, ctype, content in (("text/plain", "text/plain", body),
                                  ("text/plain;charset=utf-8", "text/plain;charset=UTF-8", body),
                                  ("form-urlencoded", "application/x-www-form-urlencoded", b"inputs=the+cat"),
                                  ("multipart to features", boundary, multipart),
                                  ("text/json", "text/json", body), ("application/jsonx", "application/jsonx", body),
                                  ("no content type", None, body)):
        headers = {"content-type": ctype} if ctype else {}
        reqs.append(Req(f"features: {label}", "POST", "/v1/features", 415, "unsupported_media_type",
                        {"content": content, "headers": headers}))
    for label, ctype, content in (("text/plain", "text/plain", register),
                                  ("form-urlencoded", "application/x-www-form-urlencoded",
                                   b"name=by-415&path=a1"),
                                  ("no content type", None, register)):
        for auth in (ADMIN, {}):
            headers = {**({"content-type": ctype} if ctype else {}), **auth}
            reqs.append(Req(f"register: {label}{' (admin)' if auth else ''}", "POST", "/v1/adapters", 415,
                            "unsupported_media_type", {"content": content, "headers": headers}))
    with _timed(lab, cls):
        with lab.refusals(cls):
            lab.send(cls, reqs)
        lab.send(cls, [Req("features: application/json; charset=utf-8", "POST", "/v1/features", 200, None,
                           {"content": body, "headers": {"content-type": "application/json; charset=utf-8"}})])
    lab.check(cls)


# ------------------------------------------------------------------ 8c. Host header


def test_08c_host_header(lab):
    cls = "8c"
    port = lab.main.port
    refused = ["evil.example", "attacker.com:8000", f"evil.example:{port}", "localhost.evil.com",
               f"127.0.0.1.nip.io:{port}", "0.0.0.0", "[::2]:8000", "evil.example:80@localhost"]
    accepted = [f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost", f"LOCALHOST:{port}",
                f"app.localhost:{port}"]
    reqs = [Req(f"healthz Host {h!r}", "GET", "/healthz", 400, "invalid_host", {"headers": {"Host": h}})
            for h in refused]
    reqs.append(Req("register with Host evil.example", "POST", "/v1/adapters", 400, "invalid_host",
                    {"json": {"name": "by-host", "path": "a1"}, "headers": {**ADMIN, "Host": "evil.example"}}))
    reqs.append(Req("delete with Host evil.example", "DELETE", "/v1/adapters/good-0", 400, "invalid_host",
                    {"headers": {**ADMIN, "Host": "evil.example"}}))
    reqs.append(Req("features with Host evil.example", "POST", "/v1/features", 400, "invalid_host",
                    {"json": {"inputs": "the cat"}, "headers": {"Host": "evil.example"}}))
    with _timed(lab, cls):
        with lab.refusals(cls):
            lab.send(cls, reqs)
            data, _, seconds = _raw(port, b"GET /healthz HTTP/1.0\r\n\r\n", wait=5)
            lab.tally(cls).cases += 1
            status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "no answer"
            lab.tally(cls).statuses[status] += 1
            if status != "400" or b"invalid_host" not in data:
                lab.tally(cls).problems.append(f"HTTP/1.0 without Host: {data[:200]!r}")
        lab.send(cls, [Req(f"healthz Host {h!r}", "GET", "/healthz", 200, None, {"headers": {"Host": h}})
                       for h in accepted])
    lab.check(cls)


# ------------------------------------------------------------------ 9. slow clients


def test_09_slow_clients(lab):
    cls = "9"
    t = lab.tally(cls)
    port = lab.main.port
    n = 200
    with _timed(lab, cls), lab.refusals(cls):
        socks = []
        for i in range(n):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            kind = i % 4
            if kind == 0:
                sock.sendall(b"GET /healthz HT")
            elif kind == 1:
                sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ".encode())
            elif kind == 3:
                sock.sendall(b"GET /")  # then a byte every 0.3 s (slowloris)
            socks.append(sock)
        opened = time.monotonic()
        started = time.monotonic()
        try:
            r = httpx.get(f"{lab.url}/healthz", timeout=5)
            healthz = (r.status_code, time.monotonic() - started)
        except httpx.HTTPError as exc:
            healthz = (repr(exc), time.monotonic() - started)
        t.cases += 1
        t.statuses[f"healthz {healthz[0]}"] += 1
        if healthz[0] != 200 or healthz[1] > 2:
            t.problems.append(f"/healthz beside {n} slow clients: {healthz}")
        closed: dict[int, float] = {}
        answered = Counter()
        last_drip = time.monotonic()
        deadline = opened + HEADER_TIMEOUT_S + 4
        while time.monotonic() < deadline and len(closed) < n:
            drip = time.monotonic() - last_drip > 0.3
            if drip:
                last_drip = time.monotonic()
            for i, sock in enumerate(socks):
                if i in closed:
                    continue
                if i % 4 == 3 and drip:
                    try:
                        sock.send(b"a")
                    except OSError:
                        closed[i] = time.monotonic() - opened
                        continue
                sock.setblocking(False)
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    closed[i] = time.monotonic() - opened
                    continue
                if data:
                    answered[data.split(b"\r\n", 1)[0].decode("latin-1")] += 1
                else:
                    closed[i] = time.monotonic() - opened
            time.sleep(0.05)
        for sock in socks:
            sock.close()
        t.cases += n
        t.statuses["closed by the server"] += len(closed)
        t.statuses["still open"] += n - len(closed)
        for line, count in answered.items():
            t.statuses[f"answered {line[:40]}"] += count
        if len(closed) < n:
            t.hangs += n - len(closed)
            t.problems.append(f"{n - len(closed)} of {n} slow connections still open after "
                              f"{deadline - opened:.0f} s (kinds: {Counter(i % 4 for i in range(n) if i not in closed)})")
        latest = max(closed.values(), default=0)
        if latest > HEADER_TIMEOUT_S + 3:
            t.problems.append(f"the last slow connection closed after {latest:.1f} s")
        t.extra = {"last_closed_s": round(latest, 2)}
        # no leak: fresh requests are answered
        for path in ("/healthz", "/readyz"):
            r = httpx.get(f"{lab.url}{path}", timeout=5)
            t.cases += 1
            t.statuses[f"after {r.status_code}"] += 1
            if r.status_code != 200:
                t.problems.append(f"{path} after the slow clients: {r.status_code}")
        r = httpx.post(f"{lab.url}/v1/features", json={"inputs": "the cat"}, timeout=30)
        if r.status_code != 200:
            t.problems.append(f"features after the slow clients: {r.status_code}")
    lab.check(cls)


# ------------------------------------------------------------------ 11. server-owned folders


def test_11_server_owned_folders(lab):
    cls = "11"
    listed = httpx.get(f"{lab.url}/v1/adapters").json()["adapters"]
    uploaded = next(a["path"] for a in listed if a["source"] == "upload")
    assert uploaded.startswith("uploads/")
    folder = uploaded.split("/", 1)[1]
    link = lab.root / "sneaky-link"
    link.symlink_to(lab.root / uploaded, target_is_directory=True)
    paths = [uploaded, "uploads", "uploads/", "./uploads", f"./{uploaded}", f"uploads/../{uploaded}",
             f"a1/../{uploaded}", f"uploads//{folder}", "uploads/operator-owned", ".incoming",
             ".incoming/anything", ".incoming/../.incoming", "sneaky-link"]
    reqs = [_register(f"path {p!r}", p, 400, "path_reserved") for p in paths]
    with _timed(lab, cls), lab.refusals(cls):
        lab.send(cls, reqs)
    lab.check(cls)


# ------------------------------------------------------------------ 12a. no server paths, no long echoes


def _check_answers(lab: Lab, cls: str, answers: list[tuple[str, str, str]]) -> None:
    """No answer names the server's own folders (the model path may appear: it is the model's id,
    and adapter manifests carry the base_model they were trained on); no error message of 1,000
    characters or more (names sent are not echoed whole)."""
    t = lab.tally(cls)
    forbidden = {str(lab.root), str(lab.root.resolve()), str(lab.main.workdir), str(lab.base)}
    for where, label, text in answers:
        message = text
        try:
            message = json.loads(text)["error"]["message"]
        except Exception:
            pass
        leaked = [p for p in forbidden if p in text]
        if leaked:
            t.problems.append(f"class {where} {label}: the answer names {leaked[0]}: {text[:300]}")
        if len(message) >= 1000 and "(listing, 200)" not in label:
            t.problems.append(f"class {where} {label}: a message of {len(message)} characters: "
                              f"{message[:120]}...")
    t.cases += len(answers)
    t.statuses["answers checked for paths and echoes"] += len(answers)


def test_12a_no_server_paths_in_answers(lab):
    """Refusals naming paths, and every refused answer of the classes before this one."""
    cls = "12a"
    reqs = [
        _register("register, 10,000-char path", "p" * 10_000, 400),
        _register("register, 10,000-char missing path", "/".join(["p" * 200] * 40), 400),
        _register("register, 10,000-char name", "a1", 422, "validation_error", name="n" * 10_000),
        _register("register, absolute path outside", "/etc", 400, "path_outside_root"),
        _register("register, absolute path of the root", str(lab.root / "a1"), (201, 400), name="abs-root"),
        _register("register, path outside", "../main", 400, "path_outside_root"),
        _register("register, missing", "does-not-exist", 400, "path_not_found"),
        _register("register, not an adapter", "not-an-adapter", 400, "invalid_adapter"),
        _register("register, corrupt", "corrupt", 400, "invalid_adapter"),
        _register("register, mismatch", "mismatch", 409, "adapter_mismatch"),
        _register("register, duplicate", "a1", 409, "duplicate_adapter", name="good-0"),
        _upload("upload, broken archive", b"\x1f\x8b" + os.urandom(600), 400, "invalid_archive"),
        _upload("upload, corrupt weights", _tar_dir(lab.world.adapters / "corrupt"), 400, "invalid_adapter"),
        Req("features, 1 MiB adapter name", "POST", "/v1/features", 413, "request_too_large",
            {"json": {"inputs": "the cat", "adapter": "n" * (1 << 20)}}),
    ]
    with _timed(lab, cls):
        registry = lab.registry()
        with lab.refusals(cls):
            answers = lab.send(cls, reqs[:4])
        answers += lab.send(cls, reqs[4:5])  # an absolute path inside the root may be accepted
        with lab.refusals(cls):
            answers += lab.send(cls, reqs[5:])
        accepted = answers[4]
        if isinstance(accepted, httpx.Response) and accepted.status_code == 201:
            lab.refused_texts.append((cls, "register, absolute path of the root (201)", accepted.text))
            assert httpx.delete(f"{lab.url}/v1/adapters/abs-root", headers=ADMIN).status_code == 204
        if lab.registry() != registry:
            lab.tally(cls).problems.append("registry changed")
        r = httpx.get(f"{lab.url}/v1/adapters")
        _check_answers(lab, cls, [*lab.refused_texts, (cls, "GET /v1/adapters (listing, 200)", r.text)])
    lab.check(cls)


# ------------------------------------------------------------------ 12b. one server per adapter root


def test_12b_second_server_on_the_same_root(lab, world):
    cls = "12b"
    t = lab.tally(cls)
    workdir = lab.base / "second"
    workdir.mkdir()
    second = ServerProcess(world, workdir, api_key=API_KEY, **MAIN_ENV)
    cmd = second.cmd
    cmd[cmd.index("--adapter-root") + 1] = str(lab.root)
    cmd[cmd.index("--db") + 1] = str(lab.main.db)
    second.adapter_root, second.db = lab.root, lab.main.db
    uploads = _digest_tree(lab.root / "uploads")
    with _timed(lab, cls), lab.refusals(cls):
        started = time.monotonic()
        try:
            with pytest.raises(AssertionError, match="server exited"):
                second.start(timeout=150)
        finally:
            second.stop()
        t.cases += 1
        code = second.proc.returncode
        t.statuses[f"exit {code}"] += 1
        log = second.log_text()
        if code in (0, None):
            t.problems.append(f"the second server exited with {code}")
        if "in use" not in log:
            t.problems.append(f"the second server's log does not say the root is in use:\n{log[-2000:]}")
        if _digest_tree(lab.root / "uploads") != uploads:
            t.outside_writes += 1
            t.problems.append("the first server's uploads changed")
        r = httpx.get(f"{lab.url}/readyz")
        if r.status_code != 200:
            t.problems.append(f"the first server after the second one's attempt: {r.status_code}")
        t.extra = {"second_server_exit_s": round(time.monotonic() - started, 1)}
    lab.check(cls)


# ------------------------------------------------------------------ 8a. unsafe bind


def test_08a_unsafe_bind(lab, world):
    cls = "8a"
    t = lab.tally(cls)
    base = [sys.executable, "-m", "lorasae.cli", "serve", "--model", str(world.model),
            *[arg for path in world.saes.values() for arg in ("--sae", str(path))], "--device", "cpu",
            "--adapter-root", str(lab.base / "never-root"), "--db", str(lab.base / "never.sqlite3")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASAE_")}
    runs = [
        ("--host 0.0.0.0 without a key", ["--host", "0.0.0.0"], {}, r"API key"),
        ("LORASAE_HOST=0.0.0.0 without a key", [], {"LORASAE_HOST": "0.0.0.0"}, r"API key"),
        ("--host :: without a key", ["--host", "::"], {}, r"API key"),
        ("--host 0.0.0.0, key variable unset", ["--host", "0.0.0.0", "--api-key-env", "LORASAE_SEC_UNSET"], {},
         r"LORASAE_SEC_UNSET"),
    ]
    with _timed(lab, cls):
        procs = []
        for label, args, extra, _ in runs:
            cmd = [*base, *args, "--port", str(_free_port())]
            procs.append((time.monotonic(), subprocess.Popen(cmd, env={**env, **extra}, cwd=REPO,
                                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
        for (label, _, _, pattern), (started, proc) in zip(runs, procs):
            try:
                out, err = proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            seconds = time.monotonic() - started
            text = (out + err).decode(errors="replace")
            lines = [line for line in text.splitlines() if line.strip()]
            t.cases += 1
            t.statuses[f"exit {proc.returncode}"] += 1
            if proc.returncode in (0, None):
                t.problems.append(f"{label}: exit {proc.returncode}")
            if len(lines) != 1 or not lines[0].startswith("error: ") or not re.search(pattern, lines[0]):
                t.problems.append(f"{label}: expected one 'error: ...' line naming {pattern!r}, got {text[-1000:]!r}")
            if "loading" in text or seconds > 60:
                t.problems.append(f"{label}: not refused before loading the model ({seconds:.1f} s)")
        if (lab.base / "never-root").exists():
            t.problems.append("a refused server created its adapter root")
        # --insecure-no-auth: it starts (started beside the main server) and answers any Host
        t.cases += 1
        if lab.open_error is not None or not lab.open.alive():
            t.statuses["insecure start failed"] += 1
            t.problems.append(f"--host 0.0.0.0 --insecure-no-auth did not start: {lab.open_error}")
        else:
            t.statuses["insecure started"] += 1
            for host in (None, "evil.example"):
                r = httpx.get(f"{lab.open.url}/healthz", headers={"Host": host} if host else {}, timeout=10)
                t.cases += 1
                t.statuses[f"open healthz {r.status_code}"] += 1
                if r.status_code != 200:
                    t.problems.append(f"0.0.0.0 server, Host {host}: {r.status_code}")
            # and its larger upload limit lets a 20 MB 40,000-member plain tar reach the unpacker
            before = {p for p in _walk(lab.open.workdir) if not _volatile(p)}
            rows = lab.open.db_rows()
            [response] = lab.send("1", [_upload("40,000 members (plain tar, 20 MB, on the 0.0.0.0 server)",
                                                _many_members_tar(), 400, "invalid_archive", filename="a.tar",
                                                within=10)], url=lab.open.url)
            after = {p for p in _walk(lab.open.workdir) if not _volatile(p)}
            incoming = lab.open.adapter_root / ".incoming"
            if after != before or lab.open.db_rows() != rows or (incoming.exists() and any(incoming.iterdir())):
                lab.tally("1").problems.append(f"the 40,000-member tar left {sorted(after ^ before)[:5]}")
            if isinstance(response, httpx.Response) and "64 members" not in response.text:
                lab.tally("1").problems.append(f"40,000-member tar: {response.text[:200]}")
            if lab.open.unexpected_errors():
                t.problems.append("500s on the 0.0.0.0 server")
            lab.open.stop()
    lab.check(cls)
    lab.check("1")


# ------------------------------------------------------------------ the restart


def test_99_restart_keeps_the_registry(lab):
    cls = "restart"
    t = lab.tally(cls)
    with _timed(lab, cls):
        registry = lab.registry()
        operator = _digest_tree(lab.root / "uploads" / "operator-owned")
        uploads = {a["path"] for a in registry[0]["adapters"] if a["source"] == "upload"}
        lab.main.stop()
        started = time.monotonic()
        lab.main.start()
        t.extra = {"restart_s": round(time.monotonic() - started, 1)}
        after = lab.registry()
        t.cases += 1
        t.statuses["listing 200"] += 1
        if after != registry:
            t.registry_unchanged = False
            t.problems.append(f"registry after the restart: {after[0]} (was {registry[0]})")
        not_ready = [a["name"] for a in after[0]["adapters"] if a["status"] != "ready"]
        if not_ready:
            t.problems.append(f"not ready after the restart: {not_ready}")
        if _digest_tree(lab.root / "uploads" / "operator-owned") != operator:
            t.outside_writes += 1
            t.problems.append("the operator's folder in uploads/ changed at the restart")
        kept = {f"uploads/{name}" for name in os.listdir(lab.root / "uploads")}
        if not uploads <= kept:
            t.problems.append(f"uploaded adapters lost at the restart: {sorted(uploads - kept)}")
        incoming = lab.root / ".incoming"
        if incoming.exists() and any(incoming.iterdir()):
            t.problems.append(".incoming not empty after the restart")
        for name in ("good-0", "good-2", "after-negative"):
            r = httpx.post(f"{lab.url}/v1/features", json={"inputs": "the cat sat", "adapter": name}, timeout=30)
            t.cases += 1
            t.statuses[f"features {r.status_code}"] += 1
            if r.status_code != 200:
                t.problems.append(f"features through {name} after the restart: {r.status_code} {r.text[:200]}")
    lab.check(cls)


# ------------------------------------------------------------------ 12a (on the restarted server)


def test_13_latent_queries(lab):
    """The latent routes and ``latents=`` of /v1/features: hostile query parameters, SAE names that
    look like paths, indices outside the SAE or of the wrong type, and more latents than allowed are
    refused with a 4xx before any work (nothing stored changes); a valid request still answers.
    The main server runs without --dashboards, so a well-formed latent query is a 404 no_dashboard."""
    cls = "13"
    q = "/v1/saes/sae1/latents"

    def get(label: str, path: str, expect: int, code: str | None) -> Req:
        return Req(label, "GET", path, expect, code, within=10)

    def feats(label: str, latents: object, expect: int | tuple[int, ...], code: str | tuple[str, ...] | None,
              **extra: object) -> Req:
        return Req(label, "POST", "/v1/features", expect, code,
                   {"json": {"inputs": "the cat sat", "latents": latents, **extra}}, within=10)

    reqs = [
        get("latent, no dashboard", f"{q}/0", 404, "no_dashboard"),
        get("SAE name as a path", "/v1/saes/..%2F..%2Fetc%2Fpasswd/latents/0", 404, "unknown_sae"),
        get("SAE name with NUL", "/v1/saes/sae1%00/latents/0", 404, "unknown_sae"),
        get("index not an int", f"{q}/abc", 422, "validation_error"),
        get("q of 5,000 chars", f"{q}?q={'x' * 5000}", 422, "validation_error"),
        get("limit 10^9", f"{q}?limit=1000000000", 422, "validation_error"),
        get("negative density", f"{q}?min_density=-1", 422, "validation_error"),
        get("density NaN", f"{q}?max_density=nan", 422, "validation_error"),
        get("unknown sort", f"{q}?sort=__class__", 422, "validation_error"),
        get("adapter of 500 chars", f"{q}?adapter={'a' * 500}", 422, "validation_error"),
        feats("300 latents of one SAE", {"sae1": list(range(300))}, 413, "too_many_latents"),
        feats("200,000 latents (body over its limit)", {"sae1": list(range(200_000))}, 413,
              "request_too_large"),
        feats("negative latent", {"sae1": [-1]}, 404, "unknown_latent"),
        feats("latent 2^62", {"sae1": [2 ** 62]}, 404, "unknown_latent"),
        feats("latent as a string", {"sae1": ["1"]}, 422, "validation_error"),
        feats("unknown SAE", {"../sae1": [1]}, 404, "unknown_sae"),
        feats("2,000 unknown SAEs", {f"s{i}": [0] for i in range(2000)}, 404, "unknown_sae"),
        feats("SAE not spliced", {"sae2": [1]}, 422, "sae_not_spliced", saes=["sae1"]),
    ]
    with _timed(lab, cls):
        answers = []
        with lab.refusals(cls):
            for req, response in zip(reqs, lab.send(cls, reqs)):
                if isinstance(response, httpx.Response):
                    answers.append((cls, req.label, response.text))
        ok = lab.send(cls, [feats("valid latents", {"sae1": [0, 5, 5]}, 200, None)])[0]
        t = lab.tally(cls)
        if isinstance(ok, httpx.Response) and ok.status_code == 200:
            values = ok.json()["results"][0]["tokens"][1]["latents"]["sae1"]
            if sorted(values) != ["0", "5"]:
                t.problems.append(f"valid latents request answered {values}")
        _check_answers(lab, cls, answers)
    lab.check(cls)


def test_14_drift_queries(lab):
    """``GET /v1/adapters/{name}/drift``: hostile adapter, ``against``, ``sae``, ``side``, ``limit`` and
    ``offset`` values are refused with a 4xx before any work, nothing stored changes, and no answer
    echoes them whole. The main server runs without --drift."""
    cls = "14"
    d = "/v1/adapters/no-such-adapter/drift"

    def get(label: str, path: str, expect: int, code: str | tuple[str, ...]) -> Req:
        return Req(label, "GET", path, expect, code, within=10)

    reqs = [
        get("unknown adapter", d, 404, "unknown_adapter"),
        get("adapter name as a path", "/v1/adapters/..%2F..%2Fetc%2Fpasswd/drift", 404,
            ("not_found", "unknown_adapter")),
        get("adapter name with NUL", "/v1/adapters/a1%00/drift", 404, "unknown_adapter"),
        get("adapter name of 8,000 chars", f"/v1/adapters/{'n' * 8000}/drift", 422, "validation_error"),
        get("SAE name as a path", f"{d}?sae=..%2F..%2Fetc%2Fpasswd", 404, "unknown_sae"),
        get("SAE name of 5,000 chars", f"{d}?sae={'s' * 5000}", 422, "validation_error"),
        get("against of 500 chars", f"{d}?against={'a' * 500}", 422, "validation_error"),
        get("against as a path", f"{d}?against=..%2F..%2Fetc", 404, "unknown_adapter"),
        get("limit 10^9", f"{d}?limit=1000000000", 422, "validation_error"),
        get("limit NaN", f"{d}?limit=nan", 422, "validation_error"),
        get("offset 2^62", f"{d}?offset={2 ** 62}", 422, "validation_error"),
        get("negative offset", f"{d}?offset=-1", 422, "validation_error"),
        get("unknown side", f"{d}?side=__class__", 422, "validation_error"),
    ]
    with _timed(lab, cls):
        answers = []
        with lab.refusals(cls):
            for req, response in zip(reqs, lab.send(cls, reqs)):
                if isinstance(response, httpx.Response):
                    answers.append((cls, req.label, response.text))
        _check_answers(lab, cls, answers)
    lab.check(cls)


def test_15_generate_requests(lab):
    """``POST /v1/generate``: hostile prompts, budgets, interventions and sampling settings are
    refused with a 4xx before any forward, nothing stored changes, no answer echoes them whole; a
    valid steered generation still answers."""
    cls = "15"
    iv = {"sae": "sae1", "latent": 1, "op": "add", "value": 1.0}

    def post(label: str, body: dict, expect: int, code: str | tuple[str, ...] | None) -> Req:
        return Req(label, "POST", "/v1/generate", expect, code, {"json": body}, within=20)

    reqs = [
        post("max_new_tokens 10^9", {"prompt": "a", "max_new_tokens": 10**9}, 422, "validation_error"),
        post("max_new_tokens over the setting", {"prompt": "a", "max_new_tokens": 4000}, 413,
             "too_many_new_tokens"),
        post("1,000 prompts", {"prompt": ["a"] * 1000}, 413, "too_many_inputs"),
        post("prompt of 60,000 chars", {"prompt": "a " * 30_000}, 413, "too_many_tokens"),
        post("token id out of the vocabulary", {"prompt": [[0, 2**40]]}, 422, ("invalid_token_id",
                                                                               "validation_error")),
        Req("lone surrogate", "POST", "/v1/generate", 422, "validation_error",
            {"content": b'{"prompt": "\\ud800 cat"}', "headers": {"content-type": "application/json"}}, within=20),
        post("intervention on a path-like SAE", {"prompt": "a", "interventions": [{**iv, "sae": "../../etc"}]},
             404, "unknown_sae"),
        post("intervention latent 2^40", {"prompt": "a", "interventions": [{**iv, "latent": 2**40}]}, 422,
             "validation_error"),
        post("intervention value 1e300", {"prompt": "a", "interventions": [{**iv, "value": 1e300}]}, 422,
             "validation_error"),
        post("10,000 interventions", {"prompt": "a", "interventions": [iv] * 10_000}, (413, 422),
             ("validation_error", "request_too_large")),
        post("intervention with extra keys", {"prompt": "a", "interventions": [{**iv, "__class__": 1}]}, 422,
             "validation_error"),
        post("temperature 1e9", {"prompt": "a", "temperature": 1e9}, 422, "validation_error"),
        post("top_p 0", {"prompt": "a", "top_p": 0}, 422, "validation_error"),
        post("seed -1", {"prompt": "a", "seed": -1}, 422, "validation_error"),
        post("stop of 10,000 chars", {"prompt": "a", "stop": ["s" * 10_000]}, 422, "validation_error"),
        post("100 stop strings", {"prompt": "a", "stop": ["x"] * 100}, 422, "validation_error"),
        post("return_features 10^6", {"prompt": "a", "return_features": 10**6}, 422, "validation_error"),
        post("unknown mode", {"prompt": "a", "mode": "__import__"}, 422, "validation_error"),
        post("compare with nothing to compare", {"prompt": "a", "compare": True}, 422, "nothing_to_compare"),
        post("unknown adapter of 5,000 chars", {"prompt": "a", "adapter": "n" * 5000}, 404, "unknown_adapter"),
    ]
    with _timed(lab, cls):
        answers = []
        with lab.refusals(cls):
            for req, response in zip(reqs, lab.send(cls, reqs)):
                if isinstance(response, httpx.Response):
                    answers.append((cls, req.label, response.text))
        _check_answers(lab, cls, answers)
        t = lab.tally(cls)
        ok = httpx.post(f"{lab.url}/v1/generate", timeout=120,
                        json={"prompt": "the cat", "max_new_tokens": 3, "interventions": [iv]})
        t.cases += 1
        t.statuses[f"valid generation {ok.status_code}"] += 1
        if ok.status_code != 200 or len(ok.json()["generations"][0]["tokens"]) != 3:
            t.problems.append(f"a valid generation answered {ok.status_code}: {ok.text[:300]}")
    lab.check(cls)


def test_12a_long_names_not_echoed(lab):
    """Unknown names of 10,000 and 100,000 characters: refused with a short message (last, on the
    restarted server)."""
    cls = "12a"
    long_name = "n" * 10_000
    path_name = "n" * 8_000  # under the 8 KiB request-target bound: reaches the route
    reqs = [
        Req("GET adapter, 8,000-char name", "GET", f"/v1/adapters/{path_name}", 404, "unknown_adapter"),
        Req("DELETE adapter, 8,000-char name", "DELETE", f"/v1/adapters/{path_name}", 404,
            "unknown_adapter", {"headers": ADMIN}),
        Req("GET adapter, 10,000-char name", "GET", f"/v1/adapters/{long_name}", 414, "uri_too_long"),

        Req("features, 10,000-char adapter", "POST", "/v1/features", (404, 422), None,
            {"json": {"inputs": "the cat", "adapter": long_name}}),
        Req("features, 10,000-char SAE", "POST", "/v1/features", (404, 422), None,
            {"json": {"inputs": "the cat", "saes": [long_name]}}),
        _register("register, 10,000-char name", "a1", 422, "validation_error", name=long_name),
    ]
    with _timed(lab, cls):
        answers = []
        with lab.refusals(cls):
            for req, response in zip(reqs, lab.send(cls, reqs)):
                if isinstance(response, httpx.Response):
                    answers.append((cls, req.label, response.text))
            # past httpx's URL limit: a raw request line of 100,000 characters; a 4xx (not echoing
            # the name) or the connection closed
            line = f"GET /v1/adapters/{'n' * 100_000} HTTP/1.1\r\nHost: 127.0.0.1:{lab.main.port}\r\n\r\n"
            data, closed, _ = _raw(lab.main.port, line.encode(), wait=10)
            t = lab.tally(cls)
            t.cases += 1
            status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else ""
            t.statuses[status or ("closed" if closed else "no answer")] += 1
            if data:
                answers.append((cls, "GET adapter, 100,000-char name (raw)",
                                data.partition(b"\r\n\r\n")[2].decode("latin-1")))
            if not (status.startswith("4") or (closed and not data)):
                t.problems.append(f"GET with a 100,000-char name: {data[:300]!r} closed={closed}")
        _check_answers(lab, cls, answers)
    lab.check(cls)
