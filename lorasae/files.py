"""Crash-safe writes: a file or a folder appears complete or not at all.

- ``write_atomic`` / ``write_json_atomic``: one file, written under a temporary name beside it,
  fsynced, then renamed over the target (checkpoints, metrics, results, plots, the corpus cache).
  Temporary names are unique per write, so two processes writing the same file (e.g. DDP ranks
  caching the same corpus) never interleave their bytes.
- ``publish_dir``: a folder written under ``<out>.tmp`` and published when complete: renamed to
  ``out`` in one step, or, when ``out`` is already a run folder (metrics, checkpoints), its files
  moved in one by one with the completion marker last.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_atomic(path: Path | str, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to a fresh temporary file beside ``path``, fsync it, rename it over ``path``:
    a kill at any moment leaves the previous file or the new one. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: Path | str, obj: Any, indent: int | None = 2) -> Path:
    """``obj`` as JSON (plus a final newline) at ``path``, atomically (see ``write_atomic``)."""
    text = json.dumps(obj, indent=indent) + "\n"
    return write_atomic(path, lambda tmp: tmp.write_text(text))


@contextmanager
def publish_dir(out: Path | str, marker: str | None = None, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty ``<out>.tmp`` folder to write into; when the block ends without error, its
    files are fsynced and published:

    - ``out`` missing: the folder is renamed to ``out`` in one step;
    - ``out`` present and ``overwrite``: it is swapped for the new folder (old one removed after);
    - ``out`` present otherwise (a run folder): the files move into it, ``marker`` last, so the
      marker's presence means everything else is there.

    On error the temporary folder is removed and ``out`` is left as it was.
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists() and overwrite:
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    elif not out.exists():
        os.replace(tmp, out)
    else:
        names = sorted(p.name for p in tmp.iterdir())
        if marker in names:
            names.remove(marker)
            names.append(marker)
        for name in names:
            os.replace(tmp / name, out / name)
        tmp.rmdir()
