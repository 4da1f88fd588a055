"""lorasae.files: atomic file writes and folders published complete, completion marker last."""

from __future__ import annotations

import json
import os

import pytest

from lorasae import files
from lorasae.files import publish_dir, write_atomic, write_json_atomic


def test_write_json_atomic_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "deep" / "result.json"
    assert write_json_atomic(path, {"a": 1}) == path  # creates the parent
    write_json_atomic(path, {"a": [1, 2]}, indent=None)
    assert path.read_text() == '{"a": [1, 2]}\n'
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_write_atomic_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.pt"
    path.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_publish_dir_renames_a_new_folder_in_one_step(tmp_path):
    out = tmp_path / "model"
    with publish_dir(out) as tmp:
        assert tmp != out and not out.exists()
        (tmp / "weights").write_text("w")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("x")
    assert (out / "weights").read_text() == "w" and (out / "sub" / "x").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_publish_dir_into_a_run_folder_moves_the_marker_last(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(
        files.os, "replace", lambda a, b: moved.append(os.path.basename(b)) or real_replace(a, b)
    )
    with publish_dir(out, marker="lorasae.json") as tmp:
        for name in ("lorasae.json", "adapter.safetensors", "zz_config.json"):
            (tmp / name).write_text(name)
    assert moved == ["adapter.safetensors", "zz_config.json", "lorasae.json"]
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter.safetensors",
        "lorasae.json",
        "metrics.json",
        "zz_config.json",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_publish_dir_overwrite_and_failure(tmp_path):
    out = tmp_path / "sae"
    with publish_dir(out) as tmp:
        (tmp / "old_only").write_text("1")
    with pytest.raises(RuntimeError):
        with publish_dir(out, overwrite=True) as tmp:
            (tmp / "cfg.json").write_text("new")
            raise RuntimeError("training failed")
    assert [p.name for p in out.iterdir()] == ["old_only"]  # untouched by the failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    with publish_dir(out, overwrite=True) as tmp:
        (tmp / "cfg.json").write_text("new")
    assert [p.name for p in out.iterdir()] == ["cfg.json"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
