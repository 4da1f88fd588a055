"""The adapter registry: validation, persistence (``registry_store``: SQLite, or PostgreSQL shared by
several servers) and the adapters loaded in the engine.

An adapter enters the registry only after every check passed (manifest fingerprints against the
loaded model and SAEs, readable peft config and weights, LoRA module names and shapes) and its
weights are in the model; the row is written last, in a transaction, and undone in the model if the
write fails (also when another server registered the name first: the database's PRIMARY KEY decides,
so of two concurrent registrations of one name exactly one wins and the other gets a 409).
Uploaded archives are unpacked by a child process (``archive.py``: no links, no paths outside,
bounded bytes, time and memory) in ``<root>/.incoming/``, synced to disk and moved into
``<root>/uploads/`` with one rename, so a half-written adapter is never visible. Both folders belong
to the server(s): registering a path inside them is refused. A deletion removes the row first (the
commit point), then unloads the adapter, then removes its upload folder. At start every row is
validated and loaded again; a row that no longer loads (files changed or gone, another model) stays
listed with ``status: "error"`` and its reason, and can be deleted.

One server (SQLite, the default): it owns the adapter root; a lock file (``.lorasae.lock``, an
exclusive flock) refuses a second one, which would delete the first one's uploads, and the start-up
sweep removes every unfinished upload.

Several servers (``--registry postgresql://...``): they share one database and one adapter root (a
shared folder: NFS or alike), each holding a shared flock on ``.lorasae.lock`` (so a single-server
one cannot start there while they run, nor they while it runs). Each server reads the rows every
``--registry-poll-s`` seconds (``poll``): rows it does not have are validated and added (loaded on
first use), rows gone or replaced (another ``uid``: deleted and registered again) are removed, a row
that does not load here is listed with ``status: "error"`` (tried again every ``ERROR_RETRY_S``).
So a registration or deletion on one server is seen on the others within one poll interval plus
the time to validate the new adapters (reading their files), plus any registration or deletion the
other server is running at that moment (they hold the same lock). Until then a deleted adapter
may still be listed there (a request using it may fail: its uploaded files are gone). The sweep
(at start and every ``SWEEP_EVERY_S``) must not take another live server's work in progress: it
removes only ``.incoming`` entries and unreferenced marked upload folders untouched for
``SWEEP_GRACE_S``.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Sequence
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
from .registry_store import RegistryStore, Row, new_uid

log = logging.getLogger("lorasae.service")

INCOMING = ".incoming"
ADAPTER_FILES = (MANIFEST_FILE, "adapter_config.json", "adapter_model.safetensors")  # what is read
UPLOADS = "uploads"
RESERVED = (INCOMING, UPLOADS)  # the server's own folders under the root
UPLOAD_MARK = ".lorasae-upload"  # in every folder the server unpacked: only those are swept
LOCK_FILE = ".lorasae.lock"
SWEEP_GRACE_S = 3600.0  # shared root: leftovers younger than this may be another server's work
SWEEP_EVERY_S = 600.0  # shared root: how often a running server sweeps
ERROR_RETRY_S = 30.0  # shared registry: how often a row that did not load here is tried again


class Registry:
    def __init__(
        self,
        engine: Engine,
        adapter_root: Path,
        store: RegistryStore,
        max_upload_bytes: int = 1 << 30,
        metrics: Metrics | None = None,
        unpack_timeout_s: float = 30.0,
    ) -> None:
        """``store``: where the rows live (``registry_store.open_store``); the registry closes it."""
        self.engine = engine
        self.store = store
        self.shared = store.shared  # several servers share the rows and the adapter root
        self.max_upload_bytes = max_upload_bytes
        self.unpack_timeout_s = unpack_timeout_s
        self.metrics = metrics
        try:
            self.root = Path(adapter_root).expanduser().resolve()
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = _lock_root(self.root, shared=self.shared)
        except BaseException:
            store.close()
            raise
        self._admin = asyncio.Lock()  # one change at a time: registrations, deletions, syncs
        self._infos: dict[str, dict] = {}
        self._uids: dict[str, str] = {}  # name -> uid of the registration loaded here
        self._failed_at: dict[str, float] = {}  # name -> when its row last failed to load here
        self._swept_at = 0.0

    def close(self) -> None:
        try:
            self.store.close()
        finally:
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
            # the commit point: the row goes first, then the adapter, then its files
            deleted = await asyncio.to_thread(self.store.delete, name, self._uids[name])
            await self._forget(name)
            self._count()
            if self.shared and not deleted:  # another server deleted (or replaced) it meanwhile
                raise ServiceError(
                    404,
                    "unknown_adapter",
                    f"no adapter named {shown(name)}: it was deleted or replaced on another server",
                )
            if info["source"] == "upload":
                remove_tree(self.root / info["path"])

    async def restore(self) -> None:
        """Load every registered adapter again (called at start), and sweep away what a killed
        server left half-done: unpacked uploads never committed (``.incoming``) and upload folders
        no row refers to. Only folders the server made are removed (``.incoming`` and uploads
        carrying its mark), and with a shared root only those untouched for ``SWEEP_GRACE_S``;
        the sweep is best-effort: what cannot be removed is logged and left."""
        async with self._admin:
            rows = await asyncio.to_thread(self.store.rows)
            await self._sweep(rows)
            await self._apply(rows, "restored")

    async def sync(self) -> None:
        """Catch up with the rows (shared registry: other servers' registrations and deletions)."""
        async with self._admin:
            rows = await asyncio.to_thread(self.store.rows)
            if time.monotonic() - self._swept_at >= SWEEP_EVERY_S:
                await self._sweep(rows)
            await self._apply(rows, "loaded")

    async def poll(self, interval_s: float) -> None:
        """``sync`` every ``interval_s`` seconds until cancelled (a background task of a server
        sharing its registry); a failing sync is logged (once until it works again) and retried."""
        failing: str | None = None
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sync()
            except Exception as exc:
                message = exc.message if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
                if message != failing:
                    log.warning("cannot read the registry (retrying every %g s): %s", interval_s, message)
                failing = message
            else:
                if failing is not None:
                    log.info("reading the registry again")
                failing = None

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
        row = Row(name, info["path"], source, json.dumps(info), info["created_at"], new_uid())
        await self._add(name, validated, hot=True)
        try:
            await asyncio.to_thread(self.store.insert, row)
        except BaseException:
            await self.engine.call(self.engine.remove_adapter, name)
            raise
        self._infos[name], self._uids[name] = info, row.uid
        self._count()
        log.info("registered adapter %r (%s)", name, info["path"])
        return info

    async def _add(self, name: str, validated: ValidatedAdapter, hot: bool) -> None:
        """Into the engine: ``hot`` loads it into the model now (a user's registration), else it
        loads on first use (restored or registered on another server)."""
        await self.engine.call(self.engine.add_adapter, name, validated, hot)

    async def _apply(self, rows: Sequence[Row], done: str) -> None:
        """Make the registry here what ``rows`` say (under ``_admin``): registrations gone or
        replaced are removed, new ones (and, shared, ones that failed ``ERROR_RETRY_S`` ago) are
        validated and added (loaded on first use); one that does not load is listed as an error."""
        wanted = {row.name: row for row in rows}
        for name in sorted(self._infos):
            row = wanted.get(name)
            if row is None or row.uid != self._uids.get(name):
                await self._forget(name)
                log.info("adapter %r %s in the registry", name, "deleted" if row is None else "replaced")
        now = time.monotonic()
        for row in rows:
            failed = self._failed_at.get(row.name)
            if row.name in self._infos and (failed is None or now - failed < ERROR_RETRY_S):
                continue
            await self._forget(row.name)  # a failed one, tried again
            self._infos[row.name] = await self._load_row(row, done)
            self._uids[row.name] = row.uid
        self._count()

    async def _load_row(self, row: Row, done: str) -> dict:
        """The info of a registered adapter, validated and added to the engine (not loaded into
        the model yet), or listed with ``status: "error"`` and why."""
        name = row.name
        info = _row_info(name, row.path, row.source, row.info)
        try:
            directory = self.resolve(row.path) if row.source == "path" else self._owned(row.path)
            validated = await asyncio.to_thread(self.engine.validate_adapter, directory)
            await self._add(name, validated, hot=False)
        except Exception as exc:
            message = exc.message if isinstance(exc, ServiceError) else str(exc)
            log.warning("adapter %r not %s: %s", name, done, message)
            self._failed_at[name] = time.monotonic()
            return {**info, "status": "error", "error": message}
        self._failed_at.pop(name, None)
        # described from the files as loaded now (the row only keeps its creation time)
        return {
            **self._info(name, directory, row.source, validated),
            "created_at": info["created_at"] or _now(),
        }

    async def _forget(self, name: str) -> None:
        """Take ``name`` out of this server (its row and files are someone else's business)."""
        info = self._infos.pop(name, None)
        self._uids.pop(name, None)
        self._failed_at.pop(name, None)
        if info is not None and info["status"] == "ready":  # in the engine (loaded or not)
            await self.engine.call(self.engine.remove_adapter, name)

    async def _sweep(self, rows: Sequence[Row]) -> None:
        referenced = {row.path for row in rows if row.source == "upload"}
        grace = SWEEP_GRACE_S if self.shared else None
        await asyncio.to_thread(sweep, self.root, referenced, grace)
        self._swept_at = time.monotonic()

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


def sweep(root: Path, referenced: set[str], grace_s: float | None = None) -> None:
    """Remove what a killed server left half-done under ``root``: ``.incoming`` entries and marked
    upload folders no row refers to (``referenced``: ``uploads/<name>`` paths). ``grace_s``: only
    those untouched for that long (a shared root: younger ones may be another live server's work
    in progress); None: all (one server owns the root). Best-effort: failures are logged."""
    now = time.time()

    def old(path: Path) -> bool:
        if grace_s is None:
            return True
        try:  # the entry and what is directly in it (a streamed upload's archive grows in there)
            newest = max([path.lstat().st_mtime] + [p.lstat().st_mtime for p in path.iterdir()])
        except OSError:
            return False
        return now - newest > grace_s

    incoming = root / INCOMING
    if grace_s is None:
        remove_tree(incoming)
    else:
        for entry in _entries(incoming):
            if old(entry):
                log.warning("removing %s: an upload left unfinished", entry)
                remove_tree(entry)
    for leftover in _entries(root / UPLOADS):
        if f"{UPLOADS}/{leftover.name}" in referenced:
            continue
        if (leftover / UPLOAD_MARK).is_file():
            if old(leftover):
                log.warning("removing %s: an upload no registration refers to", leftover)
                remove_tree(leftover)
        else:
            log.warning(
                "leaving %s alone: not made by this server (uploads/ is the server's; "
                "keep adapters elsewhere in the root)",
                leftover,
            )


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir()) if folder.is_dir() else []
    except OSError as exc:
        log.warning("cannot list %s: %s", folder, exc)
        return []


def _lock_root(root: Path, shared: bool = False):
    """A non-blocking flock on ``<root>/.lorasae.lock``, held while the server runs (the kernel
    drops it when the process dies, also on kill -9): exclusive for the one server of a SQLite
    registry, shared by the servers of a PostgreSQL one."""
    handle = open(root / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        if shared and not isinstance(exc, BlockingIOError):  # a network file system without locks
            log.warning("cannot lock the shared adapter root %s (%s): going on without", root, exc)
            return handle
        handle.close()
        if shared:
            raise LorasaeError(
                f"the adapter root {root} is in use by a lorasae server with its own (SQLite) "
                "registry; servers sharing a root all need the same --registry"
            ) from exc
        raise LorasaeError(
            f"the adapter root {root} is in use by another lorasae server "
            "(one server per adapter root: give each its own --adapter-root)"
        ) from exc
    if not shared:
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
