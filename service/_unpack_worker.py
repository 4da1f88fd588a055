"""Unpack one uploaded adapter archive, in a child process that limits itself (stdlib only).

Run as ``python -I -S _unpack_worker.py '<json args>'`` by ``service/archive.py``; the arguments
are ``archive``, ``dest`` (an empty folder the parent made), ``max_bytes``, ``memory_mb`` and
``cpu_s``. It prints exactly one JSON line and exits 0:
``{"ok": true, "files": [...]}`` or ``{"ok": false, "status": 400|413, "code": ..., "message": ...}``.

Nothing is extracted by ``tarfile``/``zipfile``: the members are listed one by one and refused as a
whole archive at the first unsafe one (links, devices, absolute or ``..`` names, too deep or too
many members); only the three adapter files are copied, flat, into ``dest`` with ``O_EXCL`` and
``O_NOFOLLOW``, and every decompressed byte of the archive counts against ``max_bytes``.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import resource
import stat
import struct
import sys
import tarfile
import zipfile
import zlib
from typing import IO, Protocol, cast

ADAPTER_FILES = ("lorasae.json", "adapter_config.json", "adapter_model.safetensors")
MANIFEST = ADAPTER_FILES[0]
ACCEPTED = ".tar.gz/.tgz, .tar or .zip"
MAX_MEMBERS = 64
MAX_DEPTH = 4
MAX_NAME_BYTES = 256
CHUNK = 1 << 20
FSIZE_SLACK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
_OTHER_FORMATS = (  # magic bytes -> the name a refusal gives
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x5d\x00\x00", "lzma"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"Rar!", "rar"),
)
_TAR_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.CONTTYPE: "a contiguous file",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}
_READ_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    RuntimeError,
    MemoryError,
    LookupError,
    struct.error,
)  # RuntimeError: RecursionError too


class _Source(Protocol):
    """What bytes are read from: the archive file, its gzip stream, a tar or zip member."""

    def read(self, size: int, /) -> bytes: ...


class Refusal(Exception):
    """A reason to refuse the whole archive, as the HTTP status, code and message the client gets."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _invalid(message: str) -> Refusal:
    return Refusal(400, "invalid_archive", message)


def _quote(name: str) -> str:
    """A member name for a message: repr'd, at most 80 characters of it."""
    return repr(name[:80] + "...") if len(name) > 80 else repr(name)


def limit_resources(memory_mb: int, cpu_s: int, max_bytes: int) -> None:
    """Lower this process's limits (soft and hard, so they cannot be raised back)."""
    limits = [
        (resource.RLIMIT_AS, memory_mb << 20),
        (resource.RLIMIT_CPU, cpu_s),
        (resource.RLIMIT_FSIZE, max_bytes + FSIZE_SLACK),
        (resource.RLIMIT_NOFILE, 64),
    ]
    limits += [
        (getattr(resource, name), 0) for name in ("RLIMIT_NPROC", "RLIMIT_CORE") if hasattr(resource, name)
    ]
    for which, value in limits:
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))


class Budget:
    """The decompressed bytes the archive may still produce; past ``max_bytes`` it refuses (413)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    def left(self) -> int:
        return self.max_bytes - self.used

    def charge(self, n: int) -> None:
        self.used += n
        if self.used > self.max_bytes:
            raise self.too_large()

    def too_large(self) -> Refusal:
        return Refusal(413, "upload_too_large", f"archive unpacks to more than {self.max_bytes} bytes")


class CountingReader:
    """A forward-only view of a (decompressed) stream for ``tarfile`` that charges every byte read
    or skipped to the budget; a negative read or a backward seek (a negative member size,
    CVE-2025-8194) is an error instead of a loop."""

    def __init__(self, raw: _Source, budget: Budget) -> None:
        self._raw = raw
        self._budget = budget
        self._pos = 0

    def tell(self) -> int:
        return self._pos

    def read(self, n: int) -> bytes:
        if n is None or n < 0:
            raise tarfile.ReadError("negative size in a header")
        parts = []
        while n > 0:
            chunk = self._raw.read(min(n, CHUNK))
            if not chunk:
                break
            self._budget.charge(len(chunk))
            self._pos += len(chunk)
            n -= len(chunk)
            parts.append(chunk)
        return b"".join(parts)

    def seek(self, target: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or target < self._pos:
            raise tarfile.ReadError("backward seek (negative size in a header)")
        while self._pos < target:
            if not self.read(min(target - self._pos, CHUNK)):
                raise tarfile.ReadError("unexpected end of data")
        return self._pos


def _parts(name: str) -> list[str]:
    """The path parts of a member name, refusing every unsafe shape; ``.`` and empty parts drop."""
    if not name:
        raise _invalid("a member has an empty name")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise _invalid(f"member name {_quote(name)} is longer than {MAX_NAME_BYTES} bytes")
    if "\x00" in name:
        raise _invalid(f"member name {_quote(name)} contains a NUL byte")
    if "\\" in name:
        raise _invalid(f"member name {_quote(name)} contains a backslash")
    if name.startswith("/") or _DRIVE.match(name):
        raise _invalid(f"member name {_quote(name)} is absolute")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _invalid(f"member name {_quote(name)} contains '..'")
    if len(parts) > MAX_DEPTH:
        raise _invalid(f"member {_quote(name)} is more than {MAX_DEPTH} folders deep")
    return parts


class Unpacker:
    """Checks members one at a time and copies the adapter files of one folder into ``dest``."""

    def __init__(self, dest: str, budget: Budget) -> None:
        self.dest_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.budget = budget
        self.members = 0
        self.written: list[str] = []
        self.seen: set[tuple[str, str]] = set()
        self.folders: list[str] = []  # folders holding adapter files, in order of appearance
        self.manifest_folders: set[str] = set()

    def member(self, name: str, kind: str | None, size: int) -> str | None:
        """Check one member (``kind``: None for a regular file, "folder", or what else it is);
        return the adapter file name to ``copy`` its content to now, or None to skip it."""
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise _invalid(f"the archive has more than {MAX_MEMBERS} members")
        parts = _parts(name)
        if kind == "folder":
            return None
        if kind is not None:
            raise _invalid(f"member {_quote(name)} is {kind}: only regular files and folders are accepted")
        if size < 0:
            raise _invalid(f"member {_quote(name)} has a negative size")
        if size > self.budget.left():
            raise self.budget.too_large()
        if not parts or parts[-1] not in ADAPTER_FILES:
            return None
        folder, filename = "/".join(parts[:-1]), parts[-1]
        if (folder, filename) in self.seen:
            raise _invalid(f"the archive holds {_quote(name)} twice")
        self.seen.add((folder, filename))
        if folder not in self.folders:
            self.folders.append(folder)
        if filename == MANIFEST:
            self.manifest_folders.add(folder)
        return filename if len(parts) <= 2 and folder == self.folders[0] else None

    def copy(self, filename: str, src: _Source) -> None:
        """Write one adapter file flat into dest, charging what is read from ``src`` to the budget."""
        fd = os.open(
            filename,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o644,
            dir_fd=self.dest_fd,
        )
        self.written.append(filename)
        try:
            while chunk := src.read(CHUNK):
                self.budget.charge(len(chunk))
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def finish(self) -> list[str]:
        """Check that exactly one adapter folder was found, sync dest; return the files written."""
        found = len(self.folders) if self.manifest_folders else 0
        if found != 1:
            raise Refusal(
                400,
                "invalid_adapter",
                f"the archive must hold exactly one adapter folder with {MANIFEST} (found {found})",
            )
        if self.folders[0].count("/"):
            raise Refusal(
                400,
                "invalid_adapter",
                "the adapter files must be at the top level of the "
                f"archive or inside one top folder (found them in {_quote(self.folders[0])})",
            )
        os.fsync(self.dest_fd)
        return sorted(self.written)

    def discard(self) -> None:
        """Remove what was written (the archive is refused)."""
        for filename in self.written:
            try:
                os.unlink(filename, dir_fd=self.dest_fd)
            except OSError:
                pass


def _tar(unpacker: Unpacker, stream: CountingReader) -> None:
    # cast: typeshed's fileobj protocol also asks for write() and close(), which tarfile never calls
    # on a caller's file object opened for reading ("r:"); CountingReader has read, tell and seek
    fileobj = cast("IO[bytes]", stream)
    with tarfile.open(fileobj=fileobj, mode="r:", encoding="utf-8", errors="surrogateescape") as tf:
        for info in tf:
            if info.sparse is not None:
                kind: str | None = "a sparse file"
            elif info.type == tarfile.DIRTYPE:
                kind = "folder"
            elif info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                kind = None
            else:
                kind = _TAR_KINDS.get(info.type, f"of unsupported type {info.type!r}")
            if filename := unpacker.member(info.name, kind, info.size):
                src = tf.extractfile(info)
                assert src is not None, "member() accepts regular files only, which extractfile() opens"
                unpacker.copy(filename, src)
        # read on to the end: the gzip trailer's CRC and length are checked only there, and a flipped
        # byte in the copied files' compressed data must be refused, not installed (counted too)
        while stream.read(1 << 20):
            pass


def _zip(unpacker: Unpacker, path: str) -> None:
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise _invalid(f"the archive has more than {MAX_MEMBERS} members")
        for info in infos:
            mode_type = stat.S_IFMT(info.external_attr >> 16)
            if info.is_dir() or mode_type == stat.S_IFDIR:
                kind: str | None = "folder"
            elif mode_type == stat.S_IFLNK:
                kind = "a symbolic link"
            elif mode_type not in (0, stat.S_IFREG):
                kind = f"a special file (mode {oct(mode_type)})"
            elif info.flag_bits & 0x1:
                kind = "an encrypted file"
            else:
                kind = None
            # orig_filename: the name as stored (zipfile's filename stops at a NUL byte)
            if filename := unpacker.member(info.orig_filename, kind, info.file_size):
                with zf.open(info) as src:
                    unpacker.copy(filename, src)


def _format(head: bytes) -> str:
    """'tar.gz', 'tar' or 'zip' from the first bytes; anything else is refused."""
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head[257:262] == b"ustar":
        return "tar"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if not head:
        raise _invalid(f"the upload is empty; send the adapter folder as {ACCEPTED}")
    found = next((name for magic, name in _OTHER_FORMATS if head.startswith(magic)), "unrecognized")
    raise _invalid(f"unsupported archive format ({found}); send the adapter folder as {ACCEPTED}")


def unpack(archive: str, dest: str, max_bytes: int) -> list[str]:
    """Unpack the adapter files of ``archive`` into ``dest``; raise Refusal or a read error."""
    budget = Budget(max_bytes)
    with open(archive, "rb") as raw:
        kind = _format(raw.read(512))
        raw.seek(0)
        unpacker = Unpacker(dest, budget)
        try:
            if kind == "zip":
                _zip(unpacker, archive)
            elif kind == "tar":
                _tar(unpacker, CountingReader(raw, budget))
            else:
                with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                    _tar(unpacker, CountingReader(gz, budget))
            return unpacker.finish()
        except BaseException:
            unpacker.discard()
            raise
        finally:
            os.close(unpacker.dest_fd)


def _describe(exc: BaseException, paths: tuple[str, ...]) -> str:
    """An exception as text for the client: no server paths, bounded length."""
    if isinstance(exc, MemoryError):
        text = "out of memory"
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    for path in paths:
        text = text.replace(path, "<path>")
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # no lone surrogates
    return text[:200] + "..." if len(text) > 200 else text


def main(argv: list[str]) -> int:
    args = json.loads(argv[1])
    limit_resources(int(args["memory_mb"]), int(args["cpu_s"]), int(args["max_bytes"]))
    try:
        files = unpack(args["archive"], args["dest"], int(args["max_bytes"]))
        result: dict = {"ok": True, "files": files}
    except Refusal as exc:
        result = {"ok": False, "status": exc.status, "code": exc.code, "message": exc.message}
    except _READ_ERRORS as exc:
        message = f"cannot read the archive: {_describe(exc, (args['archive'], args['dest']))}"
        result = {"ok": False, "status": 400, "code": "invalid_archive", "message": message}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
