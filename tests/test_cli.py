"""The CLI's promise: a user error prints one ``error:`` line on stderr and exits 2, no traceback."""

from __future__ import annotations

import pytest

from lorasae.training.cli import build_parser, main


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_missing_gguf_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORASAE_DEBUG", raising=False)
    rc = main(["eval", "--model", "/nonexistent/x.gguf"])
    out, err = capsys.readouterr()
    assert rc == 2
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    assert "/nonexistent/x.gguf" in lines[0]
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "lorasae-eval.json").exists()  # nothing written on failure


def test_non_default_model_requires_out_for_train_sae(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["train-sae", "--model", "/nonexistent/x.gguf"])
    _, err = capsys.readouterr()
    assert rc == 2
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error:") and "--out" in lines[0]


def test_parser_defaults():
    args = build_parser().parse_args(["eval", "--sae", "a", "--sae", "b", "--splice-first"])
    assert args.sae == ["a", "b"]
    assert args.splice_first is True
    assert args.tokens == 16_384 and args.ctx == 128 and args.batch_size == 8
    with pytest.raises(SystemExit):
        build_parser().parse_args([])
