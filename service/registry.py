"""The adapter registry: validation, persistence (SQLite) and the adapters loaded in the engine.

An adapter enters the registry only after every check passed (manifest fingerprints against the
loaded model and SAEs, readable peft config and weights, LoRA module names and shapes) and its
weights are in the model; the SQLite row is written last, in a transaction, and undone in the model
if the write fails. Uploaded archives are unpacked in ``<root>/.incoming/`` and moved into
``<root>/uploads/`` with one rename, so a half-written adapter is never visible. At start every row
is validated and loaded again; a row that no longer loads (files changed or gone, another model)
stays listed with ``status: "error"`` and its reason, and can be deleted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sqlite3
import tarfile
import threading
import uuid
import zipfile
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from lorasae.manifest import MANIFEST_FILE

from .engine import Engine, ValidatedAdapter
from .errors import ServiceError, not_found
from .metrics import Metrics

log = logging.getLogger("lorasae.service")

INCOMING = ".incoming"
ADAPTER_FILES = (MANIFEST_FILE, "adapter_config.json", "adapter_model.safetensors")  # what is read
UPLOADS = "uploads"
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
    def __init__(self, engine: Engine, adapter_root: Path, db_path: Path,
                 max_upload_bytes: int = 1 << 30, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.root = Path(adapter_root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = max_upload_bytes
        self.metrics = metrics
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
            raise ServiceError(409, "adapter_unavailable",
                               f"adapter {name!r} is registered but could not be loaded: {info['error']}")
        return info

    # ------------------------------------------------------------ paths

    def resolve(self, relative: str) -> Path:
        """The adapter folder ``relative`` names, refused unless it lies inside the adapter root,
        and so do (after symlinks) the files of it the server reads."""
        try:
            target = (self.root / Path(relative).expanduser()).resolve()
            outside = not self._inside(target)
            is_dir = not outside and target.is_dir()
            linked_out = [name for name in ADAPTER_FILES
                          if is_dir and not self._inside((target / name).resolve())]
        except (OSError, ValueError, RuntimeError) as exc:  # NUL byte, name too long, symlink loop
            raise ServiceError(400, "invalid_path", f"{relative!r} is not a usable path: {exc}") from exc
        if outside or linked_out:
            what = f"{relative!r}" + (f" (its {linked_out[0]} links there)" if linked_out else "")
            raise ServiceError(400, "path_outside_root",
                               f"{what} is outside the adapter root; register adapters from "
                               "inside it (paths are relative to the root)")
        if not is_dir:
            raise ServiceError(400, "path_not_found", f"no adapter folder {relative!r} in the adapter root")
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
                adapter_dir = await asyncio.to_thread(self._unpack, fileobj, filename, incoming)
                validated = await asyncio.to_thread(self.engine.validate_adapter, adapter_dir)
                final = self.root / UPLOADS / f"{name}-{uuid.uuid4().hex[:8]}"
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(adapter_dir, final)  # one rename: the adapter appears whole or not at all
                return await self._install(name, final, "upload", validated)
            except BaseException:
                if final is not None:
                    shutil.rmtree(final, ignore_errors=True)
                raise
            finally:
                shutil.rmtree(incoming, ignore_errors=True)

    async def delete(self, name: str) -> None:
        async with self._admin:
            info = self.get(name)
            await asyncio.to_thread(self._db_delete, name)
            self._infos.pop(name)
            if name in self.engine.adapters:
                await self.engine.call(self.engine.remove_adapter, name)
            if info["source"] == "upload":
                shutil.rmtree(self.root / info["path"], ignore_errors=True)
            self._count()

    async def restore(self) -> None:
        """Load every registered adapter again (called at start), and sweep away what a killed
        server left half-done: unpacked uploads never committed (``.incoming``) and upload folders
        no row refers to (the server owns both folders; nothing else is touched)."""
        with self._db_lock:
            rows = self._conn.execute("SELECT name, path, source, info FROM adapters ORDER BY name").fetchall()
        shutil.rmtree(self.root / INCOMING, ignore_errors=True)
        referenced = {path for _, path, source, _ in rows if source == "upload"}
        uploads = self.root / UPLOADS
        for leftover in sorted(uploads.iterdir()) if uploads.is_dir() else []:
            if f"{UPLOADS}/{leftover.name}" not in referenced:
                log.warning("removing %s: an upload no registration refers to", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        for name, path, source, info_json in rows:
            info = json.loads(info_json)
            try:
                directory = self.resolve(path)
                validated = await asyncio.to_thread(self.engine.validate_adapter, directory)
                await self.engine.call(self.engine.add_adapter, name, validated)
                info.update(status="ready", error=None)
            except Exception as exc:  # noqa: BLE001 - a stale row must not stop the server
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
            raise ServiceError(409, "duplicate_adapter", f"an adapter named {name!r} is already "
                               "registered; delete it first or choose another name")

    async def _install(self, name: str, directory: Path, source: str,
                       validated: ValidatedAdapter) -> dict:
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
            "saes": [{"id": self.engine.names.get(e.layer, e.id), "layer": e.layer, "d_sae": e.d_sae,
                      "hook_name": e.hook_name} for e in manifest.saes],
            "rank": int(cfg.r),
            "alpha": float(cfg.lora_alpha),
            "target_modules": targets,
            "layers_to_transform": layers,
            "source": source,
            "path": str(directory.relative_to(self.root)),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "status": "ready",
            "error": None,
            "eval_after": manifest.eval_after,
        }

    def _db_insert(self, info: dict) -> None:
        with self._db_lock:
            try:
                with self._conn:  # one transaction: committed whole or rolled back
                    self._conn.execute(
                        "INSERT INTO adapters (name, path, source, info, created_at) VALUES (?, ?, ?, ?, ?)",
                        (info["name"], info["path"], info["source"], json.dumps(info), info["created_at"]))
            except sqlite3.IntegrityError as exc:
                raise ServiceError(409, "duplicate_adapter",
                                   f"an adapter named {info['name']!r} is already registered") from exc

    def _db_delete(self, name: str) -> None:
        with self._db_lock, self._conn:
            self._conn.execute("DELETE FROM adapters WHERE name = ?", (name,))

    def _unpack(self, fileobj: BinaryIO, filename: str, incoming: Path) -> Path:
        """Copy the upload (size-checked), unpack it safely, return the folder holding the adapter."""
        incoming.mkdir(parents=True, exist_ok=True)
        archive = incoming / "upload.bin"
        size = 0
        with open(archive, "wb") as out:
            while chunk := fileobj.read(1 << 20):
                size += len(chunk)
                if size > self.max_upload_bytes:
                    raise ServiceError(413, "upload_too_large",
                                       f"archive larger than {self.max_upload_bytes} bytes")
                out.write(chunk)
        dest = incoming / "unpacked"
        dest.mkdir()
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as zf:
                    total = 0
                    for member in zf.infolist():
                        parts = Path(member.filename).parts
                        if member.filename.startswith("/") or ".." in parts:
                            raise ServiceError(400, "invalid_archive", f"unsafe path {member.filename!r}")
                        total += member.file_size
                    if total > 4 * self.max_upload_bytes:
                        raise ServiceError(413, "upload_too_large", "archive unpacks too large")
                    zf.extractall(dest)
            else:
                with tarfile.open(archive) as tf:
                    members = tf.getmembers()
                    if sum(m.size for m in members) > 4 * self.max_upload_bytes:
                        raise ServiceError(413, "upload_too_large", "archive unpacks too large")
                    tf.extractall(dest, members=members, filter="data")
        except ServiceError:
            raise
        except (tarfile.TarError, zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
            raise ServiceError(400, "invalid_archive", f"cannot unpack {filename or 'the upload'}: "
                               f"{exc} (send a .tar.gz, .tar or .zip of the adapter folder)") from exc
        found = sorted(p.parent for p in dest.rglob(MANIFEST_FILE))
        if len(found) != 1:
            raise ServiceError(400, "invalid_adapter",
                               f"the archive must hold exactly one adapter folder with {MANIFEST_FILE} "
                               f"(found {len(found)})")
        return found[0]
