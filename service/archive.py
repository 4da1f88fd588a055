"""Unpacking uploaded adapter archives, safely, in a child process; and a tree removal that never raises.

The reading itself (``_unpack_worker.py``) runs in ``python -I -S`` with its own resource limits
(memory, CPU, file size, open files, no child processes), so a hostile archive — a tarfile bug like
CVE-2025-4517 or CVE-2025-8194, a decompression bomb, a header that makes the reader loop — costs at
most ``timeout_s`` and ``memory_mb`` and can write only the three adapter files into ``dest``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

from .errors import ServiceError

log = logging.getLogger("lorasae.service")

WORKER = Path(__file__).with_name("_unpack_worker.py")
ADAPTER_FILES = frozenset({"lorasae.json", "adapter_config.json", "adapter_model.safetensors"})
_REPLY_BYTES = 4096  # only the tail of the child's stdout is parsed
_STDERR_LOG_BYTES = 2000


def unpack_adapter(
    archive: Path, dest: Path, *, max_bytes: int, timeout_s: float = 10.0, memory_mb: int = 512
) -> Path:
    """Unpack the uploaded archive file ``archive`` into the new folder ``dest`` (created here; it
    must not exist) in a child process; return ``dest``, which then holds the adapter files flat
    (``dest/lorasae.json``, ...). Raise ServiceError 400/413 on any refusal; nothing outside
    ``dest`` is ever written. On failure ``dest`` is left in place, emptied."""
    dest = Path(dest)
    dest.mkdir()
    args = {
        "archive": os.path.abspath(archive),
        "dest": os.path.abspath(dest),
        "max_bytes": max_bytes,
        "memory_mb": memory_mb,
        "cpu_s": math.ceil(timeout_s) + 1,
    }
    try:
        reply = _run_worker(args, timeout_s)
        if not reply["ok"]:
            raise ServiceError(reply["status"], reply["code"], reply["message"])
        if sorted(os.listdir(dest)) != sorted(reply["files"]) or not all(
            stat.S_ISREG(os.lstat(dest / name).st_mode) for name in reply["files"]
        ):
            raise ServiceError(
                400, "invalid_archive", "the archive could not be read (the reader left unexpected files)"
            )
    except BaseException:
        _empty(dest)
        raise
    return dest


def _empty(folder: Path) -> None:
    """Remove everything inside ``folder`` (best effort), keeping the folder."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        remove_tree(folder / entry)


def _run_worker(args: dict, timeout_s: float) -> dict:
    """Run the worker; return its checked reply, or raise ServiceError when it gave none."""
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", str(WORKER), json.dumps(args)],
            capture_output=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
            close_fds=True,
            cwd=args["dest"],
            env={"PATH": os.environ.get("PATH", os.defpath)},
        )
    except subprocess.TimeoutExpired:
        raise ServiceError(
            400,
            "invalid_archive",
            f"the archive could not be read within {timeout_s:g} s (malformed header?)",
        ) from None
    reply = _parse_reply(proc.stdout) if proc.returncode == 0 else None
    if reply is None:
        if proc.returncode < 0:
            try:
                how = f"signal {signal.Signals(-proc.returncode).name}"
            except ValueError:
                how = f"signal {-proc.returncode}"
        else:
            how = f"status {proc.returncode}" + ("" if proc.returncode else " but no valid answer")
        log.warning(
            "archive reader failed (%s): %s",
            how,
            proc.stderr[-_STDERR_LOG_BYTES:].decode("utf-8", "replace").strip(),
        )
        raise ServiceError(
            400, "invalid_archive", f"the archive could not be read (reader exited with {how})"
        )
    return reply


def _parse_reply(stdout: bytes) -> dict | None:
    """The worker's JSON line (the last line of at most the last few KB), or None if malformed."""
    lines = stdout[-_REPLY_BYTES:].strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    if not isinstance(reply, dict):
        return None
    if reply.get("ok") is True:
        files = reply.get("files")
        valid = isinstance(files, list) and all(isinstance(f, str) and f in ADAPTER_FILES for f in files)
    else:
        valid = (
            reply.get("ok") is False
            and reply.get("status") in (400, 413)
            and isinstance(reply.get("code"), str)
            and isinstance(reply.get("message"), str)
        )
    return reply if valid else None


def remove_tree(path: Path) -> bool:
    """Remove ``path`` (a folder tree, a file or a symlink) without following symlinks and without
    recursion, so trees of any depth go; never raises. Return True when ``path`` is gone (or was
    never there); otherwise log a warning and return False."""
    top = os.fspath(path)
    errors: list[Exception] = []
    try:
        if stat.S_ISDIR(os.lstat(top).st_mode):
            _remove_folder(top, errors)
        else:
            os.unlink(top)
    except FileNotFoundError:
        pass
    except Exception as exc:
        errors.append(exc)
    if not os.path.lexists(top):
        return True
    log.warning("could not remove %s: %s", top, errors[0] if errors else "it is still there")
    return False


def _remove_folder(top: str, errors: list[Exception]) -> None:
    """Empty and remove the folder ``top`` with an explicit stack; record errors and go on."""
    stack: list[tuple[str, bool]] = [(top, False)]  # (folder, its contents already handled)
    while stack:
        folder, emptied = stack.pop()
        try:
            if emptied:
                os.rmdir(folder)
                continue
            stack.append((folder, True))
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append((os.path.join(folder, entry.name), False))
                        else:
                            _unlink_at(entry.name, fd, errors)
            finally:
                os.close(fd)
        except FileNotFoundError:
            continue
        except OSError as exc:
            errors.append(exc)


def _unlink_at(name: str, dir_fd: int, errors: list[Exception]) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        errors.append(exc)
