"""The CLI's promises: a user error prints one ``error:`` line on stderr and exits 2, no traceback;
every subcommand's flags come from its config fields (``lorasae.cliargs``), abbreviations are
refused, presets never override a flag that was given."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import Field
from pydantic_settings import BaseSettings
from tiny_world import CTX

from lorasae import cliargs
from lorasae.cli import build_parser, main
from lorasae.training.commands import compare_config
from lorasae.training.compare import PAPER_PRESET, CompareConfig
from lorasae.training.eval import EvalConfig


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


def parse(argv: list[str]) -> argparse.Namespace:
    return cliargs.parse_command(build_parser(), argv)[1]


def test_parser_defaults():
    args = parse(["eval", "--sae", "a", "--sae", "b", "--splice-first"])
    assert cliargs.explicit(args) == {"saes", "keep_first"}
    cfg = cliargs.build(EvalConfig, args)
    assert cfg.saes == ["a", "b"] and cfg.keep_first is False
    assert cfg.tokens == 16_384 and cfg.ctx == 128 and cfg.batch_size == 8
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


# Every subcommand with the flags the README and service/README document for it.
DOCUMENTED_FLAGS = {
    "eval": "--model --sae --adapter --tokens --ctx --batch-size --corpus --splice-first --splice-sets --device "
            "--dtype --out",
    "train-sae": "--model --device --dtype --layer --k --expansion --tokens --ctx --epochs "
                 "--batch-size --lr --seed --corpus --out",
    "train": "--model --sae --out --rank --alpha --dropout --target-modules --layers --lr "
             "--weight-decay --grad-clip --batch-size --grad-accum --tokens --max-steps "
             "--max-minutes --eval-every --eval-tokens --checkpoint-every --seed --splice-first "
             "--resume --corpus --ctx --device --dtype --lr-schedule --warmup-steps --lr-end --epochs "
             "--eval-corpus --no-residual-cache --preserve",
    "train-e2e": "--model --sae --init --sparsity-coeff --out --resume --lr --tokens --max-steps "
                 "--max-minutes --eval-every --corpus --ctx --lr-schedule --warmup-steps --epochs "
                 "--eval-corpus --no-residual-cache",
    "compare": "--model --sae --preset --rank --layers --lr --e2e-lr --e2e-init --batch-size "
               "--grad-accum --tokens --max-steps --eval-every --eval-tokens --seed --splice-first "
               "--corpus --ctx --out --e2e-max-steps --e2e-max-minutes --lr-schedule --warmup-steps "
               "--eval-corpus",
    "sweep": "--model --sae --sparsity-sae --layer-sae --ranks --rank --steps --batch-size --lr "
             "--e2e-lr --no-e2e --eval-tokens --seed --only --report --corpus --ctx --out",
    "merge": "--model --adapter --out --no-eval --eval-tokens --mc-items --mc-context --mc-choice "
             "--mc-file --corpus --ctx --device",
    "demo": "--steps --max-minutes",
    "dashboards": "--model --sae --adapter --corpus --split --tokens --ctx --batch-size --top-n "
                  "--window-before --window-after --samples-per-interval --logit-top --effect-contexts "
                  "--shard-sequences --splice-first --device --dtype --out --resume",
    "ab": "--model --adapter --sae --corpus --split --tokens --ctx --batch-size --top --window "
          "--splice-first --device --dtype --out",
    "drift": "--adapter --against --model --corpus --split --tokens --ctx --batch-size --top-n "
             "--effect-contexts --noise-latents --noise-quantile --logit-top --shard-sequences --seed "
             "--splice-first --device --dtype --out --resume",
    "serve": "--host --port --model --sae --device --dtype --adapter-root --db --api-key-env "
             "--insecure-no-auth --allowed-host --max-batch --max-wait-ms --dashboards --drift "
             "--max-new-tokens --max-generations --max-generation-queue --config",
}


@pytest.mark.parametrize("command", sorted(DOCUMENTED_FLAGS))
def test_every_subcommand_has_help_listing_its_flags(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", capsys.readouterr().out))
    assert set(DOCUMENTED_FLAGS[command].split()) <= shown


def test_every_subcommand_is_covered():
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(DOCUMENTED_FLAGS)


def test_python_m_lorasae_cli_runs_the_command():
    result = subprocess.run([sys.executable, "-m", "lorasae.cli", "demo", "--help"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and "--max-minutes" in result.stdout


def test_abbreviated_flags_are_refused(capsys):
    """`--token 2000000 --preset paper` once parsed as --tokens and was then overwritten."""
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--token", "2000000", "--preset", "paper"])
    assert exit_.value.code == 2
    assert "--token" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["serve", "--max-b", "3"])  # --max-batch / --max-batch-tokens: no guessing either


def test_paper_preset_fills_only_the_fields_not_given():
    cfg = compare_config(parse(["compare", "--tokens", "2000000", "--preset", "paper"]))
    assert cfg.loop.tokens == 2_000_000  # given: kept
    assert (cfg.rank, cfg.loop.lr, cfg.loop.batch_size, cfg.loop.ctx) == (64, 5e-5, 1, 1024)
    assert cfg.loop.max_steps is None and cfg.loop.eval_every == 500
    assert cfg.loop.eval_tokens == 1_000_000
    # the order of the flags does not matter, and fields the preset does not name keep their defaults
    again = compare_config(parse(["compare", "--preset", "paper", "--lr", "1e-4", "--tokens", "2000000"]))
    assert again.loop.lr == 1e-4 and again.loop.tokens == 2_000_000 and again.rank == 64
    assert again.e2e_lr == CompareConfig().e2e_lr and again.loop.seed == CompareConfig().loop.seed
    # every preset key is a field of CompareConfig, and without --preset the defaults stand
    assert cliargs.updated(CompareConfig, PAPER_PRESET).rank == 64
    assert compare_config(parse(["compare"])) == CompareConfig()


def test_sweep_budget_is_steps_and_its_runs_saes_are_not_flags():
    from lorasae.training.sweep import SweepConfig

    cfg = cliargs.build(SweepConfig, parse(["sweep", "--steps", "6", "--batch-size", "4",
                                            "--ranks", "1,4", "--no-e2e", "--only", "rank,layer"]))
    assert (cfg.loop.max_steps, cfg.loop.batch_size, cfg.ranks, cfg.e2e) == (6, 4, [1, 4], False)
    for refused in (["--tokens", "10"], ["--eval-every", "3"], ["--only", "rank,speed"]):
        with pytest.raises(SystemExit):
            parse(["sweep", *refused])


# ---------------------------------------------------------------- the adapter on its own


@dataclass
class _Inner:
    lr: float = field(default=0.1, metadata={"help": "step size"})
    steps: int | None = field(default=None, metadata={"help": "limit"})
    hidden: str = "x"


@dataclass
class _Outer:
    name: str = field(metadata={"help": "required"})
    inner: _Inner = field(default_factory=lambda: _Inner(lr=0.5),
                          metadata={"flags": {"steps": "--max-steps", "hidden": None}})
    mode: Literal["a", "b"] = "a"
    tags: list[str] = field(default_factory=list, metadata={"flag": "--tag"})
    sizes: list[int] = field(default_factory=lambda: [1, 2], metadata={"sep": ","})
    fast: bool = False
    check: bool = True


def _outer_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    cliargs.add_fields(parser, _Outer)
    return parser


def test_adapter_types_names_and_nesting():
    args = _outer_parser().parse_args(["--name", "n", "--lr", "0.2", "--max-steps", "3", "--mode", "b",
                                       "--tag", "x", "--tag", "y", "--sizes", "4,8", "--fast",
                                       "--no-check"])
    assert cliargs.explicit(args) == {"name", "inner.lr", "inner.steps", "mode", "tags", "sizes",
                                      "fast", "check"}
    assert cliargs.build(_Outer, args) == _Outer(name="n", inner=_Inner(lr=0.2, steps=3), mode="b",
                                                 tags=["x", "y"], sizes=[4, 8], fast=True, check=False)
    only_name = _outer_parser().parse_args(["--name", "n"])
    assert cliargs.explicit(only_name) == {"name"}
    assert cliargs.build(_Outer, only_name) == _Outer(name="n")  # the nested default factory's lr 0.5
    assert cliargs.build(_Outer, only_name, {"inner.lr": 0.9, "fast": True}).inner.lr == 0.9
    for bad in (["--name", "n", "--mode", "c"], ["--name", "n", "--hidden", "z"], [],
                ["--name", "n", "--sizes", "1,x"]):
        with pytest.raises(SystemExit):
            _outer_parser().parse_args(bad)
    with pytest.raises(KeyError, match="nope"):
        cliargs.updated(_Outer(name="n"), {"nope": 1})


def test_adapter_help_shows_defaults_of_the_instance_given(capsys):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    cliargs.add_fields(parser, _Outer(name="n", inner=_Inner(lr=0.25)))
    parser.print_help()
    text = " ".join(capsys.readouterr().out.split())
    assert "step size (default: 0.25)" in text and "(default: 1,2)" in text and "--no-check" in text


class _Settings(BaseSettings):
    port: int = Field(8000, description="port")
    hosts: list[str] | None = Field(None, json_schema_extra={"flag": "--host"}, description="host")
    secret: str | None = Field(None, json_schema_extra={"flag": None})
    quiet: bool = False


def test_adapter_reads_pydantic_fields_and_leaves_the_rest_unset():
    parser = argparse.ArgumentParser(allow_abbrev=False)
    cliargs.add_fields(parser, _Settings)
    args = parser.parse_args(["--host", "a", "--host", "b", "--quiet"])
    assert cliargs.given(args, _Settings) == {"hosts": ["a", "b"], "quiet": True}  # port: unset
    with pytest.raises(SystemExit):
        parser.parse_args(["--secret", "s"])


# ---------------------------------------------------------------- one real run per package


def test_eval_runs_on_the_tiny_world(tiny_world, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_world.model), "--sae", str(tiny_world.sae1),
                 "--corpus", str(tiny_world.corpus), "--ctx", str(CTX), "--tokens", "256",
                 "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["ctx"] == CTX and printed["ce_spliced"] > printed["ce_clean"]


def test_serve_runs_on_the_tiny_world(tiny_world, tmp_path, monkeypatch, capsys):
    """`lorasae serve` up to uvicorn: flags reach the settings (env and file for the rest), the
    thread count is applied, the engine gets the training package's default-SAE trainer."""
    import uvicorn

    from lorasae.service.engine import Engine
    from lorasae.training.train_sae import ensure_default_sae

    served, makers = {}, []
    real_from_settings = Engine.from_settings.__func__

    def from_settings(cls, settings, make_default_sae=None):
        makers.append(make_default_sae)
        return real_from_settings(cls, settings, make_default_sae)

    monkeypatch.setattr(Engine, "from_settings", classmethod(from_settings))
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    monkeypatch.setenv("LORASAE_MAX_QUEUE", "7")
    threads = torch.get_num_threads()
    try:
        assert main(["serve", "--model", str(tiny_world.model), "--sae", str(tiny_world.sae1),
                     "--device", "cpu", "--port", "8123", "--max-batch", "3", "--torch-threads", "1",
                     "--adapter-root", str(tmp_path / "adapters"), "--db", str(tmp_path / "r.db")]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    service = served["app"].state.service
    settings = service.settings
    assert (settings.max_batch, settings.port, settings.max_queue) == (3, 8123, 7)
    assert settings.db_path == tmp_path / "r.db" and settings.keep_first is True
    assert served["port"] == 8123 and makers == [ensure_default_sae]
    assert Path(settings.saes[0]) == tiny_world.sae1 and service.engine.saes[0].layer == 1
    service.engine.close()
