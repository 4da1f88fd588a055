"""The adapter registry: validation, persistence (SQLite) and the adapters loaded in the engine.

An adapter enters the registry only after every check passed (manifest fingerprints against the
loaded model and SAEs, readable peft config and weights, LoRA module names and shapes) and its
weights are in the model; the SQLite row is written last, in a transaction, and undone in the model
if the write fails. Uploaded archives are unpacked by a child process (``archive.py``: no links,
no paths outside, bounded bytes, time and memory) in ``<root>/.incoming/``, synced to disk and moved
into ``<root>/uploads/`` with one rename, so a half-written adapter is never visible. Both folders
belong to the server: registering a path inside them is refused. At start every row is validated
and loaded again; a row that no longer loads (files changed or gone, another model) stays listed
with ``status: "error"`` and its reason, and can be deleted. One server per adapter root: a lock
file (``.lorasae.lock``) refuses a second one, which would delete the first one's uploads.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import math
import os
import sqlite3
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError

from lorasae.errors import LorasaeError
from lorasae.manifest import MANIFEST_FILE
from lorasae_client.schemas import AdapterInfo

from .archive import remove_tree, unpack_adapter
from .engine import Engine, ValidatedAdapter
from .errors import ServiceError, not_found, shown
from .metrics import Metrics

log = logging.getLogger("lorasae.service")

INCOMING = ".incoming"
ADAPTER_FILES = (MANIFEST_FILE, "adapter_config.json", "adapter_model.safetensors")  # what is read
UPLOADS = "uploads"
RESERVED = (INCOMING, UPLOADS)  # the server's own folders under the root
UPLOAD_MARK = ".lorasae-upload"  # in every folder the server unpacked: only those are swept
LOCK_FILE = ".lorasae.lock"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,          -- relative to the adapter root
    source TEXT NOT NULL,        -- 'path' or 'upload' (uploads are owned: deleted with the row)
    info TEXT NOT NULL,          -- JSON of the AdapterInfo at registration
    created_at TEXT NOT NULL
)
"""


class Registry:
    def __init__(
        self,
        engine: Engine,
        adapter_root: Path,
        db_path: Path,
        max_upload_bytes: int = 1 << 30,
        metrics: Metrics | None = None,
        unpack_timeout_s: float = 30.0,
    ) -> None:
        self.engine = engine
        self.root = Path(adapter_root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = max_upload_bytes
        self.unpack_timeout_s = unpack_timeout_s
        self.metrics = metrics
        self._lock = _lock_root(self.root)
        db_path = Path(db_path).expanduser()
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(db_path), check_same_thread=False)
        self._db_lock = threading.Lock()
        with self._db_lock, self._conn:
            self._conn.execute(_SCHEMA)
        self._admin = asyncio.Lock()
        self._infos: dict[str, dict] = {}

    def close(self) -> None:
        with self._db_lock:
            self._conn.close()
        self._lock.close()  # releases the flock

    # ------------------------------------------------------------ reads

    def list(self) -> list[dict]:
        return [self._infos[name] for name in sorted(self._infos)]

    def get(self, name: str) -> dict:
        if name not in self._infos:
            raise not_found("adapter", name)
        return self._infos[name]

    def require_ready(self, name: str) -> dict:
        info = self.get(name)
        if info["status"] != "ready":
            raise ServiceError(
                409,
                "adapter_unavailable",
                f"adapter {name!r} is registered but could not be loaded: {info['error']}",
            )
        return info

    # ------------------------------------------------------------ paths

    def resolve(self, relative: str) -> Path:
        """The adapter folder ``relative`` names, refused unless it lies inside the adapter root
        (and outside the server's own folders), and so do (after symlinks) the files of it the
        server reads. Messages name the path as given, never the server's absolute paths."""
        given = shown(relative)
        try:
            target = (self.root / Path(relative).expanduser()).resolve()
            outside = not self._inside(target)
            is_dir = not outside and target.is_dir()
            linked_out = [
                name for name in ADAPTER_FILES if is_dir and not self._inside((target / name).resolve())
            ]
        except (OSError, ValueError, RuntimeError) as exc:  # NUL byte, name too long, symlink loop
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise ServiceError(400, "invalid_path", f"{given} is not a usable path: {reason}") from exc
        if outside or linked_out:
            what = given + (f" (its {linked_out[0]} links there)" if linked_out else "")
            raise ServiceError(
                400,
                "path_outside_root",
                f"{what} is outside the adapter root; register adapters from "
                "inside it (paths are relative to the root)",
            )
        parts = target.relative_to(self.root).parts
        if parts and parts[0] in RESERVED:
            raise ServiceError(
                400,
                "path_reserved",
                f"{given} is inside the server's own {parts[0]}/ folder; register uploads by uploading them",
            )
        if not is_dir:
            raise ServiceError(400, "path_not_found", f"no adapter folder {given} in the adapter root")
        return target

    def _inside(self, path: Path) -> bool:
        return path == self.root or path.is_relative_to(self.root)

    # ------------------------------------------------------------ writes

    async def register_path(self, name: str, relative: str) -> dict:
        async with self._admin:
            self._check_new(name)
            directory = self.resolve(relative)
            validated = await asyncio.to_thread(self.engine.validate_adapter, directory)
            return await self._install(name, directory, "path", validated)

    async def register_upload(self, name: str, fileobj: BinaryIO, filename: str = "") -> dict:
        async with self._admin:
            self._check_new(name)
            incoming = self.root / INCOMING / uuid.uuid4().hex
            final = None
            try:
                adapter_dir = await asyncio.to_thread(self._unpack, fileobj, incoming)
                validated = await asyncio.to_thread(self.engine.validate_adapter, adapter_dir)
                final = self.root / UPLOADS / f"{name}-{uuid.uuid4().hex[:8]}"
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(adapter_dir, final)  # one rename: the adapter appears whole or not at all
                _fsync_dir(final.parent)  # the rename is on disk before the row that refers to it
                return await self._install(name, final, "upload", validated)
            except BaseException:
                if final is not None:
                    remove_tree(final)
                raise
            finally:
                remove_tree(incoming)

    async def delete(self, name: str) -> None:
        async with self._admin:
            info = self.get(name)
            await asyncio.to_thread(self._db_delete, name)
            self._infos.pop(name)
            if name in self.engine.adapters:
                await self.engine.call(self.engine.remove_adapter, name)
            if info["source"] == "upload":
                remove_tree(self.root / info["path"])
            self._count()

    async def restore(self) -> None:
        """Load every registered adapter again (called at start), and sweep away what a killed
        server left half-done: unpacked uploads never committed (``.incoming``) and upload folders
        no row refers to. Only folders the server made are removed (``.incoming`` and uploads
        carrying its mark); the sweep is best-effort: what cannot be removed is logged and left."""
        with self._db_lock:
            rows = self._conn.execute(
                "SELECT name, path, source, info FROM adapters ORDER BY name"
            ).fetchall()
        remove_tree(self.root / INCOMING)
        referenced = {path for _, path, source, _ in rows if source == "upload"}
        uploads = self.root / UPLOADS
        try:
            leftovers = sorted(uploads.iterdir()) if uploads.is_dir() else []
        except OSError as exc:
            log.warning("cannot list %s: %s", uploads, exc)
            leftovers = []
        for leftover in leftovers:
            if f"{UPLOADS}/{leftover.name}" in referenced:
                continue
            if (leftover / UPLOAD_MARK).is_file():
                log.warning("removing %s: an upload no registration refers to", leftover)
                remove_tree(leftover)
            else:
                log.warning(
                    "leaving %s alone: not made by this server (uploads/ is the server's; "
                    "keep adapters elsewhere in the root)",
                    leftover,
                )
        for name, path, source, info_json in rows:
            info = _row_info(name, path, source, info_json)
            try:
                directory = self.resolve(path) if source == "path" else self._owned(path)
                validated = await asyncio.to_thread(self.engine.validate_adapter, directory)
                await self.engine.call(self.engine.add_adapter, name, validated)
                # described from the files as loaded now (the row only keeps its creation time)
                info = {
                    **self._info(name, directory, source, validated),
                    "created_at": info["created_at"] or _now(),
                }
            except Exception as exc:
                message = exc.message if isinstance(exc, ServiceError) else str(exc)
                log.warning("adapter %r not restored: %s", name, message)
                info.update(status="error", error=message)
            self._infos[name] = info
        self._count()

    # ------------------------------------------------------------ helpers

    def _count(self) -> None:
        if self.metrics:
            self.metrics.adapters.set(len(self._infos))

    def _check_new(self, name: str) -> None:
        if name in self._infos:
            raise ServiceError(
                409,
                "duplicate_adapter",
                f"an adapter named {name!r} is already registered; delete it first or choose another name",
            )

    async def _install(self, name: str, directory: Path, source: str, validated: ValidatedAdapter) -> dict:
        info = self._info(name, directory, source, validated)
        await self.engine.call(self.engine.add_adapter, name, validated)
        try:
            await asyncio.to_thread(self._db_insert, info)
        except BaseException:
            await self.engine.call(self.engine.remove_adapter, name)
            raise
        self._infos[name] = info
        self._count()
        log.info("registered adapter %r (%s)", name, info["path"])
        return info

    def _info(self, name: str, directory: Path, source: str, validated: ValidatedAdapter) -> dict:
        cfg, manifest = validated.config, validated.manifest
        targets = cfg.target_modules
        targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else [str(targets)]
        layers = cfg.layers_to_transform
        layers = [layers] if isinstance(layers, int) else (list(layers) if layers else None)
        return {
            "name": name,
            "base_model": manifest.base_model,
            "base_model_fingerprint": manifest.base_model_fingerprint,
            "saes": [
                {
                    "id": self.engine.names.get(e.layer, e.id),
                    "layer": e.layer,
                    "d_sae": e.d_sae,
                    "hook_name": e.hook_name,
                }
                for e in manifest.saes
            ],
            "rank": int(cfg.r),
            "alpha": float(cfg.lora_alpha),
            "target_modules": targets,
            "layers_to_transform": layers,
            "source": source,
            "path": str(directory.relative_to(self.root)),
            "created_at": _now(),
            "status": "ready",
            "error": None,
            "eval_after": finite_json(manifest.eval_after),
        }

    def _db_insert(self, info: dict) -> None:
        with self._db_lock:
            try:
                with self._conn:  # one transaction: committed whole or rolled back
                    self._conn.execute(
                        "INSERT INTO adapters (name, path, source, info, created_at) VALUES (?, ?, ?, ?, ?)",
                        (info["name"], info["path"], info["source"], json.dumps(info), info["created_at"]),
                    )
            except sqlite3.IntegrityError as exc:
                raise ServiceError(
                    409, "duplicate_adapter", f"an adapter named {info['name']!r} is already registered"
                ) from exc

    def _db_delete(self, name: str) -> None:
        with self._db_lock, self._conn:
            self._conn.execute("DELETE FROM adapters WHERE name = ?", (name,))

    def _owned(self, relative: str) -> Path:
        """An upload folder the server made (rows of source 'upload'), checked like any path."""
        target = (self.root / relative).resolve()
        if not self._inside(target) or not target.is_dir():
            raise ServiceError(400, "path_not_found", f"the uploaded files of {shown(relative)} are gone")
        return target

    def _unpack(self, fileobj: BinaryIO, incoming: Path) -> Path:
        """Copy the upload (size-checked) and unpack it in a child process; returns the folder
        holding the adapter's files, marked as the server's and synced to disk."""
        incoming.mkdir(parents=True)
        archive = incoming / "upload.bin"
        size = 0
        with open(archive, "wb") as out:
            while chunk := fileobj.read(1 << 20):
                size += len(chunk)
                if size > self.max_upload_bytes:
                    raise ServiceError(
                        413, "upload_too_large", f"archive larger than {self.max_upload_bytes} bytes"
                    )
                out.write(chunk)
        adapter_dir = unpack_adapter(
            archive, incoming / "adapter", max_bytes=self.max_upload_bytes, timeout_s=self.unpack_timeout_s
        )
        mark = adapter_dir / UPLOAD_MARK
        mark.write_text("unpacked by lorasae serve; removed with its registration\n")
        _fsync_file(mark)
        _fsync_dir(adapter_dir)
        return adapter_dir


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock_root(root: Path):
    """An exclusive, non-blocking flock on ``<root>/.lorasae.lock``, held while the server runs
    (the kernel drops it when the process dies, also on kill -9)."""
    handle = open(root / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        raise LorasaeError(
            f"the adapter root {root} is in use by another lorasae server "
            "(one server per adapter root: give each its own --adapter-root)"
        ) from exc
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _row_info(name: str, path: str, source: str, info_json: str) -> dict:
    """A row's stored AdapterInfo, re-validated: a row written by an older server (or edited by
    hand) that no longer fits the schema is listed as an error instead of breaking the listing."""
    try:
        return AdapterInfo.model_validate_json(info_json).model_dump()
    except ValidationError as exc:
        log.warning("registry row %r unreadable: %s", name, exc)
        return AdapterInfo(
            name=name,
            base_model="unknown",
            saes=[],
            created_at="",
            source="upload" if source == "upload" else "path",
            path=path,
            status="error",
            error="registry row unreadable",
        ).model_dump()


def finite_json(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (they are not JSON; a response holding
    one would fail to render)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    return value
