"""The adapter-archive unpacker (service/archive.py, service/_unpack_worker.py) against hostile uploads.

Every archive is built here (tarfile, zipfile, raw headers); each refusal must give the exact status
and code, leave ``dest`` empty and change nothing outside it. No server, no torch.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import shutil
import stat
import struct
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from lorasae.service.archive import WORKER, remove_tree, unpack_adapter
from lorasae.service.errors import ServiceError

MAX = 1 << 20
ADAPTER = {
    "lorasae.json": b'{"format": "lorasae-adapter", "version": 1}',
    "adapter_config.json": b'{"r": 4, "lora_alpha": 8}',
    "adapter_model.safetensors": bytes(range(256)) * 64,
}


# ------------------------------------------------------------ building archives

def reg(name: str, data: bytes = b"") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, type_: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = type_, linkname
    return info, None


def folder(name: str) -> tuple[tarfile.TarInfo, None]:
    return special(name, tarfile.DIRTYPE)


def adapter_members(prefix: str = "adapter/") -> list:
    return [reg(prefix + name, data) for name, data in ADAPTER.items()]


def tar_bytes(members: list, mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def zip_bytes(members: list, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """``members``: (name or ZipInfo, data) pairs."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def zip_with_mode(name: str, mode: int, data: bytes = b"") -> bytes:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return zip_bytes([*[(f"adapter/{n}", d) for n, d in ADAPTER.items()], (info, data)])


def raw_header(name: bytes, size_field: bytes, typeflag: bytes = b"0") -> bytes:
    """One ustar header block with any size field; the checksum is fixed."""
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"0000644\0"
    block[108:116] = block[116:124] = b"0000000\0"
    block[124:136] = size_field
    block[136:148] = b"00000000000\0"
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[257:265] = b"ustar\x0000"
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def negative_size(n: int) -> bytes:
    """A base-256 size field holding ``-n``."""
    return b"\xff" + (256 ** 11 - n).to_bytes(11, "big")


# ------------------------------------------------------------ running the unpacker

def snapshot(root: Path, skip: Path) -> list[str]:
    """Every path under ``root`` (not following links), except inside ``skip``."""
    found = []
    for here, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(here, d) != skip]
        found += [os.path.relpath(os.path.join(here, name), root) for name in dirs + files]
    return sorted(found)


@pytest.fixture
def place(tmp_path: Path) -> Path:
    """tmp_path with an ``outside`` folder holding a sentinel file next to the upload folder."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "sentinel").write_text("untouched")
    (tmp_path / "incoming").mkdir()
    return tmp_path


def unpack(place: Path, data: bytes, **kwargs) -> tuple[Path, float]:
    """Unpack ``data`` as an upload; check nothing outside dest changed; return dest and seconds."""
    archive = place / "incoming" / "upload.bin"
    archive.write_bytes(data)
    dest = place / "incoming" / "unpacked"
    before = snapshot(place, dest)
    kwargs.setdefault("max_bytes", MAX)
    start = time.monotonic()
    try:
        return unpack_adapter(archive, dest, **kwargs), time.monotonic() - start
    finally:
        assert snapshot(place, dest) == before
        assert (place / "outside" / "sentinel").read_text() == "untouched"


def accepted(place: Path, data: bytes, **kwargs) -> Path:
    dest, _ = unpack(place, data, **kwargs)
    assert dest == place / "incoming" / "unpacked"
    assert sorted(os.listdir(dest)) == sorted(ADAPTER)
    for name, content in ADAPTER.items():
        assert (dest / name).read_bytes() == content
    return dest


def refused(place: Path, data: bytes, status: int, code: str, **kwargs) -> tuple[ServiceError, float]:
    start = time.monotonic()
    with pytest.raises(ServiceError) as info:
        unpack(place, data, **kwargs)
    elapsed = time.monotonic() - start
    err = info.value
    assert (err.status, err.code) == (status, code), err.message
    assert str(place / "incoming") not in err.message  # no server path (names sent may hold any)
    assert os.listdir(place / "incoming" / "unpacked") == []
    return err, elapsed


# ------------------------------------------------------------ accepted archives

def test_tar_gz_with_adapter_folder(place):
    accepted(place, tar_bytes([folder("adapter"), *adapter_members()]))


@pytest.mark.parametrize("at", [0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.97])
def test_corrupt_gzip_never_installs_changed_files(place, at):
    """A byte flipped anywhere in a .tar.gz is refused: the gzip trailer's CRC is verified by
    reading to the end, past the members that are copied (before, a flip after them, or one that
    only changed the weights' bytes, installed the adapter)."""
    readme = os.urandom(20_000).hex().encode()  # compressible bytes after the adapter files
    data = tar_bytes([folder("adapter"), *adapter_members(), reg("adapter/README.md", readme)])
    i = int(len(data) * at)
    flipped = data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:]
    archive = place / "incoming" / "upload.bin"
    archive.write_bytes(flipped)
    dest = place / "incoming" / "unpacked"
    try:
        unpack_adapter(archive, dest, max_bytes=MAX)
    except ServiceError as err:
        assert err.status == 400 and err.code in ("invalid_archive", "invalid_adapter"), err.message
        assert os.listdir(dest) == []
        return
    pytest.fail(f"a tar.gz with a byte flipped at {at:.0%} was accepted")


def test_flat_plain_tar(place):
    accepted(place, tar_bytes(adapter_members(""), mode="w"))


def test_dot_slash_names(place):
    accepted(place, tar_bytes([folder("."), *adapter_members("./adapter/")]))


def test_zip_with_folder(place):
    accepted(place, zip_bytes([("adapter/", b""), *[(f"adapter/{n}", d) for n, d in ADAPTER.items()]]))


def test_other_members_are_not_written(place):
    extra = [reg("adapter/README.md", b"# hi"), folder("adapter/checkpoint"),
             reg("adapter/checkpoint/optimizer.pt", b"x" * 1000), reg("adapter/checkpoint/lorasae.txt")]
    accepted(place, tar_bytes([*adapter_members(), *extra]))
    zipped = zip_bytes([*[(f"a/{n}", d) for n, d in ADAPTER.items()], ("a/README.md", b"hi"),
                        ("a/checkpoint/optimizer.pt", b"x" * 1000)])
    shutil.rmtree(place / "incoming" / "unpacked")
    accepted(place, zipped)


# ------------------------------------------------------------ links, devices, CVE-2025-4517

def cve_2025_4517_tar(dest: Path) -> bytes:
    """The published shape (CPython's test_realpath_limit_attack): folders reached through
    symlinks, sized so that the last symlink overflows PATH_MAX in realpath(), which then stops
    checking; ``escape`` points at dest's parent, a hard link to ``escape/flag`` and two writes
    through it follow."""
    steps = "abcdefghijklmnop"
    component = "d" * ((os.pathconf(dest.parent, "PC_PATH_MAX") - len(str(dest)) - 1) // (len(steps) + 1))
    path, members = "", []
    for step in steps:
        members += [folder(os.path.join(path, component)),
                    special(os.path.join(path, step), tarfile.SYMTYPE, component)]
        path = os.path.join(path, component)
    linkpath = os.path.join(*steps, "l" * 254)
    members += [special(linkpath, tarfile.SYMTYPE, os.path.join(*[".."] * len(steps))),
                special("escape", tarfile.SYMTYPE, os.path.join(linkpath, "..")),
                special("flaglink", tarfile.LNKTYPE, "escape/flag"),
                reg("flaglink", b"overwrite"), reg("escape/newfile", b"new")]
    return tar_bytes(members)


def test_cve_2025_4517_chain(place):
    flag = place / "incoming" / "flag"
    flag.write_text("flag")
    refused(place, cve_2025_4517_tar(place / "incoming" / "unpacked"), 400, "invalid_archive")
    assert flag.read_text() == "flag"


def test_short_link_chain(place):
    members = [special("a", tarfile.SYMTYPE, "."), special("b", tarfile.SYMTYPE, "a/../../outside"),
               special("lorasae.json", tarfile.LNKTYPE, "b/sentinel"), reg("b/pwned", b"owned")]
    err, _ = refused(place, tar_bytes([*adapter_members(), *members]), 400, "invalid_archive")
    assert "symbolic link" in err.message


@pytest.mark.parametrize("type_, words", [
    (tarfile.SYMTYPE, "symbolic link"), (tarfile.LNKTYPE, "hard link"), (tarfile.FIFOTYPE, "FIFO"),
    (tarfile.CHRTYPE, "character device"), (tarfile.BLKTYPE, "block device"),
    (tarfile.CONTTYPE, "contiguous"), (tarfile.GNUTYPE_SPARSE, "sparse"),
])
def test_tar_special_members(place, type_, words):
    member = special("adapter/other", type_, "../outside/sentinel")
    if type_ in (tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE):
        member = reg("adapter/other", b"abc")
        member[0].type = type_
    err, _ = refused(place, tar_bytes([*adapter_members(), member]), 400, "invalid_archive")
    assert words in err.message


@pytest.mark.parametrize("mode, words", [
    (stat.S_IFLNK | 0o777, "symbolic link"), (stat.S_IFIFO | 0o644, "special file"),
    (stat.S_IFCHR | 0o644, "special file"), (stat.S_IFSOCK | 0o644, "special file"),
])
def test_zip_special_members(place, mode, words):
    err, _ = refused(place, zip_with_mode("adapter/link", mode, b"../../outside"), 400, "invalid_archive")
    assert words in err.message


def test_zip_symlink_named_like_an_adapter_file(place):
    info = zipfile.ZipInfo("lorasae.json")
    info.create_system, info.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
    refused(place, zip_bytes([(info, b"../outside/sentinel")]), 400, "invalid_archive")


# ------------------------------------------------------------ names

BAD_NAMES = {
    "absolute": "{outside}/pwned",
    "backslash_absolute": "\\outside\\pwned",
    "drive": "C:/outside/pwned",
    "dotdot": "adapter/../../outside/pwned",
    "backslash": "adapter\\..\\pwned",
    "too_long": "adapter/" + "x" * 300,
    "too_deep": "a/b/c/d/e",
    "very_deep": "d/" * 1100 + "f",
}


@pytest.mark.parametrize("kind", sorted(BAD_NAMES))
def test_bad_names_tar(place, kind):
    name = BAD_NAMES[kind].format(outside=place / "outside")
    refused(place, tar_bytes([*adapter_members(), reg(name, b"owned")]), 400, "invalid_archive")


@pytest.mark.parametrize("kind", sorted(BAD_NAMES))
def test_bad_names_zip(place, kind):
    name = BAD_NAMES[kind].format(outside=place / "outside")
    data = zip_bytes([*[(f"adapter/{n}", d) for n, d in ADAPTER.items()], (name, b"owned")])
    refused(place, data, 400, "invalid_archive")


def test_deep_folder_members_tar(place):
    members = [folder("/".join(["d"] * depth)) for depth in range(1, 40)]
    refused(place, tar_bytes([*adapter_members(), *members]), 400, "invalid_archive")


def test_nul_in_names(place):
    info, data = reg("adapter/pwned", b"x")
    info.pax_headers = {"path": "adapter/lorasae.json\x00/../../x"}
    refused(place, tar_bytes([*adapter_members(), (info, data)]), 400, "invalid_archive")
    zipped = zip_bytes([*[(f"adapter/{n}", d) for n, d in ADAPTER.items()], ("adapter/lorasaeZjson", b"x")])
    shutil.rmtree(place / "incoming" / "unpacked")
    err, _ = refused(place, zipped.replace(b"lorasaeZjson", b"lorasae\0json"), 400, "invalid_archive")
    assert "NUL" in err.message


def test_long_names_are_truncated_in_messages(place):
    err, _ = refused(place, tar_bytes([reg("a/" + "y" * 200 + "/../x")]), 400, "invalid_archive")
    assert "y" * 81 not in err.message and "..." in err.message


def test_duplicate_adapter_file(place):
    members = [*adapter_members(), reg("adapter/lorasae.json", b"{}")]
    refused(place, tar_bytes(members), 400, "invalid_archive")


# ------------------------------------------------------------ member count, formats

@pytest.fixture(scope="module")
def many_members_tar() -> bytes:
    blocks = [tarfile.TarInfo(f"f/{i}").tobuf(tarfile.USTAR_FORMAT) for i in range(40_000)]
    return b"".join(blocks) + bytes(1024)


def test_40000_member_tar_is_refused_quickly(place, many_members_tar):
    err, elapsed = refused(place, many_members_tar, 400, "invalid_archive")
    assert "more than 64 members" in err.message
    assert elapsed < 5


def test_65_member_zip(place):
    members = [*[(f"adapter/{n}", d) for n, d in ADAPTER.items()], *[(f"f/{i}", b"") for i in range(62)]]
    refused(place, zip_bytes(members), 400, "invalid_archive")


@pytest.mark.parametrize("mode", ["w:bz2", "w:xz"])
def test_other_compressions_are_refused(place, mode):
    err, _ = refused(place, tar_bytes(adapter_members(), mode=mode), 400, "invalid_archive")
    assert ".tar.gz" in err.message and ".zip" in err.message and ".tar" in err.message


def test_format_is_detected_by_content(place):
    """A zip is accepted by its magic bytes whatever the upload was called; text is not."""
    accepted(place, zip_bytes([(n, d) for n, d in ADAPTER.items()]))
    shutil.rmtree(place / "incoming" / "unpacked")
    refused(place, b"lorasae.json adapter_config.json\n" * 20, 400, "invalid_archive")


@pytest.mark.parametrize("data", [b"", bytes(range(256)) * 16, b"\x1f\x8b\x08\x00" + b"\xa5" * 600,
                                  b"PK\x03\x04" + b"\xa5" * 600],
                         ids=["empty", "garbage", "bad_gzip", "bad_zip"])
def test_unreadable(place, data):
    refused(place, data, 400, "invalid_archive")


def test_truncated_tar_gz(place):
    data = tar_bytes([*adapter_members(), reg("adapter/blob", os.urandom(200_000))])
    refused(place, data[: len(data) // 2], 400, "invalid_archive")


def test_truncated_plain_tar(place):
    data = tar_bytes([*adapter_members(), reg("adapter/blob", os.urandom(20_000))], mode="w")
    refused(place, data[:3000], 400, "invalid_archive")


# ------------------------------------------------------------ CVE-2025-8194: negative sizes

@pytest.mark.parametrize("typeflag", [b"0", b"x", b"L"], ids=["member", "pax_header", "gnu_longname"])
@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_negative_size_header(place, typeflag, gz):
    """Unpatched, tarfile loops forever on the ``member`` shape (the offset goes back one header)."""
    zero = b"00000000000\0"
    data = (raw_header(b"adapter/README", zero) + raw_header(b"adapter/x", negative_size(512), typeflag)
            + raw_header(b"adapter/lorasae.json", zero) + bytes(1024))
    if gz:
        data = gzip.compress(data)
    _, elapsed = refused(place, data, 400, "invalid_archive", timeout_s=5)
    assert elapsed < 8


# ------------------------------------------------------------ bombs

def test_gzip_bomb_in_a_skipped_member(place):
    data = tar_bytes([*adapter_members(), reg("adapter/checkpoint/zeros.bin", bytes(10 * MAX))])
    err, elapsed = refused(place, data, 413, "upload_too_large")
    assert f"more than {MAX} bytes" in err.message
    assert elapsed < 5


def test_gzip_bomb_in_a_pax_header(place):
    """Header data is decompressed too: counted, although no member declares a large size."""
    info, data = reg("adapter/README.md", b"hi")
    info.pax_headers = {"comment": "0" * (3 * MAX)}
    refused(place, tar_bytes([*adapter_members(), (info, data)]), 413, "upload_too_large")


def test_total_of_members_counts(place):
    half = bytes(MAX // 2 + 1)
    members = [reg("a/lorasae.json", b"{}"), reg("a/adapter_model.safetensors", half),
               reg("a/other.bin", half)]
    refused(place, tar_bytes(members), 413, "upload_too_large")


def test_zip_bomb(place):
    data = zip_bytes([("adapter/lorasae.json", b"{}"),
                      ("adapter/adapter_model.safetensors", bytes(10 * MAX))])
    assert len(data) < MAX // 20
    _, elapsed = refused(place, data, 413, "upload_too_large")
    assert elapsed < 5


def test_zip_bomb_with_lying_sizes(place):
    """The headers claim 100 bytes for 10 MiB of deflated zeros: zipfile stops at the declared
    size, so at most 100 bytes are ever read and the CRC check refuses the member."""
    big = bytes(10 * MAX)
    data = bytearray(zip_bytes([("lorasae.json", b"{}"), ("adapter_model.safetensors", big)]))
    for signature, offset in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):  # file_size field
        at = data.find(signature, data.find(b"lorasae.json"))
        at = data.find(signature, at + 4) if signature == b"PK\x01\x02" else at
        assert struct.unpack_from("<I", data, at + offset)[0] == len(big)
        struct.pack_into("<I", data, at + offset, 100)
    err, elapsed = refused(place, bytes(data), 400, "invalid_archive")
    assert "CRC" in err.message and elapsed < 5


# ------------------------------------------------------------ adapter layout

def test_two_adapter_folders(place):
    err, _ = refused(place, tar_bytes([*adapter_members("one/"), *adapter_members("two/")]),
                     400, "invalid_adapter")
    assert "(found 2)" in err.message


def test_adapter_files_split_between_folders(place):
    members = [reg("lorasae.json", b"{}"), reg("adapter/adapter_config.json", b"{}")]
    refused(place, tar_bytes(members), 400, "invalid_adapter")


def test_no_manifest(place):
    members = [m for m in adapter_members() if not m[0].name.endswith("lorasae.json")]
    err, _ = refused(place, tar_bytes(members), 400, "invalid_adapter")
    assert "(found 0)" in err.message


def test_adapter_too_deep(place):
    refused(place, tar_bytes(adapter_members("a/b/")), 400, "invalid_adapter")


def test_empty_zip(place):
    refused(place, zip_bytes([]), 400, "invalid_adapter")


def test_dest_must_be_new(place):
    (place / "incoming" / "unpacked").mkdir()
    with pytest.raises(FileExistsError):
        unpack(place, tar_bytes(adapter_members()))


# ------------------------------------------------------------ the child process itself

@pytest.fixture
def fake_worker(tmp_path, monkeypatch):
    """Replace the worker with a script; return a function taking its source."""
    def install(source: str) -> None:
        script = tmp_path / "fake_worker.py"
        script.write_text(source)
        monkeypatch.setattr("lorasae.service.archive.WORKER", script)
    return install


@pytest.mark.parametrize("source, words", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "signal SIGKILL"),
    ("raise SystemExit(3)", "status 3"),
    ("print('x' * 100000)", "no valid answer"),
    ('print(\'{"ok": false, "status": 500, "code": "x", "message": "y"}\')', "no valid answer"),
], ids=["killed", "exit_3", "garbage", "bad_status"])
def test_reader_that_dies(place, fake_worker, source, words):
    fake_worker(source)
    err, _ = refused(place, tar_bytes(adapter_members()), 400, "invalid_archive")
    assert words in err.message


def test_reader_timeout(place, fake_worker):
    fake_worker("import time; time.sleep(30)")
    err, elapsed = refused(place, tar_bytes(adapter_members()), 400, "invalid_archive", timeout_s=1)
    assert "within 1 s" in err.message and elapsed < 5


def test_reader_leaving_other_files(place, fake_worker):
    fake_worker("import json, sys, os\nd = json.loads(sys.argv[1])['dest']\n"
                "for name in ('lorasae.json', 'x'):\n    open(os.path.join(d, name), 'w').close()\n"
                "print(json.dumps({'ok': True, 'files': ['lorasae.json']}))")
    refused(place, tar_bytes(adapter_members()), 400, "invalid_archive")


def test_reader_limits_itself(place, fake_worker):
    """The worker's limits hold in the child: lowered for good, and a large allocation fails."""
    fake_worker(f"""
import os, resource, sys
sys.path.insert(0, {str(WORKER.parent)!r})
from _unpack_worker import limit_resources
limit_resources(64, 5, 1000)
assert resource.getrlimit(resource.RLIMIT_AS) == (64 << 20, 64 << 20)
assert resource.getrlimit(resource.RLIMIT_FSIZE) == (1000 + (1 << 20),) * 2
assert resource.getrlimit(resource.RLIMIT_NOFILE)[1] <= 64
assert resource.getrlimit(resource.RLIMIT_NPROC) == (0, 0)
try:
    bytearray(256 << 20)
except MemoryError:
    os._exit(7)
""")
    err, _ = refused(place, tar_bytes(adapter_members()), 400, "invalid_archive")
    assert "status 7" in err.message


# ------------------------------------------------------------ remove_tree

def test_remove_tree_deeper_than_the_recursion_limit(tmp_path):
    root = tmp_path / "deep"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    for _ in range(1100):  # relative to the last folder: fast, and no path length limit
        os.mkdir("d", dir_fd=fd)
        fd, parent = os.open("d", os.O_RDONLY, dir_fd=fd), fd
        os.close(parent)
    os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    os.close(fd)
    assert remove_tree(root) is True
    assert not root.exists()


def test_remove_tree_does_not_follow_symlinks(tmp_path):
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "keep").write_text("keep")
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    (tree / "a" / "file").write_text("x")
    (tree / "to_dir").symlink_to(outside)
    (tree / "a" / "to_file").symlink_to(outside / "keep")
    (tree / "a" / "dangling").symlink_to(tmp_path / "nowhere")
    assert remove_tree(tree) is True
    assert not os.path.lexists(tree)
    assert (outside / "keep").read_text() == "keep" and (outside / "sub").is_dir()


def test_remove_tree_file_symlink_and_missing(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    assert remove_tree(tmp_path / "file") is True
    assert remove_tree(tmp_path / "link") is True and (tmp_path / "dir").is_dir()
    assert remove_tree(tmp_path / "missing") is True


def test_remove_tree_failure_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    (tmp_path / "tree" / "sub").mkdir(parents=True)

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(os, "rmdir", refuse)
    with caplog.at_level(logging.WARNING, logger="lorasae.service"):
        assert remove_tree(tmp_path / "tree") is False
    assert "could not remove" in caplog.text
