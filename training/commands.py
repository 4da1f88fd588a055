"""The training package's `lorasae` subcommands: eval, train-sae, train, train-e2e, compare, sweep,
dashboards, ab, merge and demo.

Every flag is a field (``lorasae.cliargs``): of the config the command runs with, or of the small
option classes below for what is not a run setting (where the result goes, ``--resume``,
``--preset``). Progress goes to stderr; the JSON result is the last thing printed on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from lorasae import cliargs
from lorasae.errors import LorasaeError
from lorasae.files import write_json_atomic
from lorasae.models import DEFAULT_MODEL, load_model
from lorasae.saes import load_sae

from .ab import AbConfig, print_table, run_ab
from .compare import PRESETS, CompareConfig, format_compare, run_compare
from .dashboards import DashboardConfig, run_dashboards
from .demo import DemoConfig, run_demo
from .drift import DriftConfig, format_drift, run_drift
from .eval import EvalConfig, run_eval, splice_set_table
from .fields import device_field, dtype_field, model_field
from .loop import LoopConfig
from .merge import MergeConfig, run_merge
from .presets import steps_budget
from .sweep import SweepConfig, format_table, run_sweep
from .train_e2e import E2eTrainConfig, train_e2e
from .train_lora import LoraTrainConfig, train_lora
from .train_sae import SaeTrainingConfig, train_sae


@dataclass
class EvalOptions:
    """Where `eval` writes its JSON."""

    out: str = field(default="lorasae-eval.json", metadata={"help": "where to write the JSON"})


@dataclass
class TrainSaeOptions:
    """The model `train-sae` reads and where the SAE goes (the recipe is ``SaeTrainingConfig``)."""

    model: str = model_field()
    device: str | None = device_field()
    dtype: str | None = dtype_field()
    out: str | None = field(
        default=None, metadata={"help": "output folder (default: the cache folder of the default SAE)"}
    )


@dataclass
class RunOptions:
    """Where a `train` / `train-e2e` run goes."""

    out: str = field(
        metadata={
            "help": "run directory: the peft adapter + lorasae.json (train) or the "
            "SAE in sae-lens format (train-e2e), metrics, checkpoints"
        }
    )
    resume: bool = field(default=False, metadata={"help": "continue from the checkpoint in --out"})


@dataclass
class CompareOptions:
    """A preset under the flags, and where `compare` writes."""

    preset: Literal["paper"] | None = field(
        default=None,
        metadata={
            "help": "paper: rank 64, lr 5e-5, batch 1 x ctx 1024, 15M tokens, LoRA after the SAE "
            "(for a GPU; flags given explicitly still win)"
        },
    )
    out: str = field(default="lorasae-compare", metadata={"help": "folder for both runs, compare.json/.png"})


@dataclass
class DashboardOptions:
    """Where `dashboards` writes, and whether it continues an interrupted run."""

    out: str = field(
        default="lorasae-dashboards",
        metadata={"help": "folder for dashboards.json + one Parquet file per SAE (served with --dashboards)"},
    )
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run in --out"})


@dataclass
class DriftOptions:
    """Where `drift` writes, and whether it continues an interrupted run."""

    out: str = field(
        default="lorasae-drift",
        metadata={"help": "folder for drift.json, drift-L<layer>.parquet, drift.png (served with --drift)"},
    )
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run in --out"})


@dataclass
class AbOptions:
    """Where `ab` writes."""

    out: str = field(
        default="lorasae-ab",
        metadata={"help": "folder for tokens.parquet, ab.json and ab.png (new or empty)"},
    )


@dataclass
class SweepOptions:
    """Which sweeps `sweep` runs, and where."""

    only: list[Literal["rank", "layers", "sparsity", "layer"]] | None = field(
        default=None, metadata={"sep": ",", "help": "comma list of the sweeps to run (default: all)"}
    )
    report: bool = field(
        default=False, metadata={"help": "train nothing: table and plots of the runs finished so far"}
    )
    out: str = field(default="lorasae-sweep", metadata={"help": "folder for every run and sweep.json"})


def _print_json(result: dict, out: str | Path | None = None) -> None:
    """The command's result, last on stdout (and written to ``out``)."""
    if out:
        write_json_atomic(out, result)
    print(json.dumps(result, indent=2), flush=True)


def eval_command(args: argparse.Namespace) -> None:
    result = run_eval(cliargs.build(EvalConfig, args))
    table = splice_set_table(result)
    if table:
        print(table, file=sys.stderr, flush=True)
    _print_json(result, cliargs.build(EvalOptions, args).out)


def train_sae_command(args: argparse.Namespace) -> None:
    """Train the SAE, check that sae-lens loads it, and evaluate it (``eval.json`` beside it)."""
    cfg, opts = cliargs.build(SaeTrainingConfig, args), cliargs.build(TrainSaeOptions, args)
    if opts.out is None and opts.model != DEFAULT_MODEL:
        raise LorasaeError("--out is required with a non-default --model")
    out = Path(opts.out) if opts.out else cfg.default_dir()
    lm = load_model(opts.model, opts.device, opts.dtype)
    train_sae(lm, cfg, out)
    load_sae(str(out), device=lm.device, model=lm.model)  # proves sae-lens loads what we wrote
    del lm
    result = run_eval(
        EvalConfig(
            model=opts.model,
            saes=[str(out)],
            ctx=cfg.ctx,
            corpus=cfg.corpus,
            device=opts.device,
            dtype=opts.dtype,
        )
    )
    _print_json({"sae_dir": str(out), **result}, out / "eval.json")


def _train(args: argparse.Namespace, config: type[LoopConfig], train: Callable[..., dict]) -> None:
    opts = cliargs.build(RunOptions, args)
    metrics = train(cliargs.build(config, args), Path(opts.out), resume=opts.resume)
    if "final" in metrics:  # the main process (under DDP the others return without it)
        _print_json({"out": opts.out, "train": metrics["train"], "final": metrics["final"]})


def train_command(args: argparse.Namespace) -> None:
    _train(args, LoraTrainConfig, train_lora)


def train_e2e_command(args: argparse.Namespace) -> None:
    _train(args, E2eTrainConfig, train_e2e)


def compare_config(args: argparse.Namespace) -> CompareConfig:
    """The flags given, over ``--preset``'s values, over CompareConfig's CPU-sized defaults."""
    preset = cliargs.build(CompareOptions, args).preset
    return cliargs.build(CompareConfig, args, PRESETS[preset] if preset else None)


def compare_command(args: argparse.Namespace) -> None:
    result = run_compare(compare_config(args), Path(cliargs.build(CompareOptions, args).out))
    print(format_compare(result), file=sys.stderr, flush=True)
    runs = {run: {k: v for k, v in result[run].items() if k != "curve"} for run in ("lora", "e2e")}
    _print_json({k: v for k, v in result.items() if k not in runs} | runs)


def sweep_command(args: argparse.Namespace) -> None:
    cfg, opts = cliargs.build(SweepConfig, args), cliargs.build(SweepOptions, args)
    cfg = replace(cfg, loop=steps_budget(cfg.loop))  # --steps (and batch, ctx) set the budget
    result = run_sweep(cfg, Path(opts.out), set(opts.only) if opts.only else None, report=opts.report)
    print(format_table(result["rows"]), file=sys.stderr, flush=True)
    _print_json(result)


def dashboards_command(args: argparse.Namespace) -> None:
    opts = cliargs.build(DashboardOptions, args)
    result = run_dashboards(cliargs.build(DashboardConfig, args), Path(opts.out), resume=opts.resume)
    if result is not None:  # the main process (under accelerate launch the others return None)
        _print_json(result)


def drift_command(args: argparse.Namespace) -> None:
    opts = cliargs.build(DriftOptions, args)
    result = run_drift(cliargs.build(DriftConfig, args), Path(opts.out), resume=opts.resume)
    if result is not None:  # the main process (under accelerate launch the others return None)
        print(format_drift(result), file=sys.stderr, flush=True)
        _print_json(result)


def ab_command(args: argparse.Namespace) -> None:
    result = run_ab(cliargs.build(AbConfig, args), Path(cliargs.build(AbOptions, args).out))
    print_table(result)
    _print_json(result)


def merge_command(args: argparse.Namespace) -> None:
    _print_json(run_merge(cliargs.build(MergeConfig, args)))


def demo_command(args: argparse.Namespace) -> None:
    _print_json(run_demo(cliargs.build(DemoConfig, args)))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the training commands to the `lorasae` parser's subcommands."""
    add = cliargs.add_command
    add(
        subparsers,
        "eval",
        eval_command,
        EvalConfig,
        EvalOptions,
        help="held-out CE gap, KL, L0, explained variance (JSON)",
    )
    add(
        subparsers,
        "train-sae",
        train_sae_command,
        TrainSaeOptions,
        SaeTrainingConfig,
        help="train a TopK SAE on a residual stream (sae-lens format)",
    )
    add(
        subparsers,
        "train",
        train_command,
        LoraTrainConfig,
        RunOptions,
        help="train a LoRA adapter around frozen SAE(s) (the method)",
    )
    add(
        subparsers,
        "train-e2e",
        train_e2e_command,
        E2eTrainConfig,
        RunOptions,
        help="e2e SAE baseline: train the SAE on the KL, model frozen",
    )
    add(
        subparsers,
        "compare",
        compare_command,
        CompareConfig,
        CompareOptions,
        help="LoRA-SAE vs the e2e SAE baseline: time to the same CE, curves",
    )
    add(
        subparsers,
        "sweep",
        sweep_command,
        SweepConfig,
        SweepOptions,
        help="rank / adapted layers / sparsity / layer sweeps, Pareto plot",
    )
    add(
        subparsers,
        "dashboards",
        dashboards_command,
        DashboardConfig,
        DashboardOptions,
        help="per-latent dashboards (top contexts, histograms, logit lens, causal effect) as Parquet",
    )
    add(
        subparsers,
        "drift",
        drift_command,
        DriftConfig,
        DriftOptions,
        help="what an adapter changed about each latent (input / output side), beyond noise",
    )
    add(
        subparsers,
        "ab",
        ab_command,
        AbConfig,
        AbOptions,
        help="adapters A/B over a corpus: per-token CE, where each helps / hurts, enriched latents",
    )
    add(
        subparsers,
        "merge",
        merge_command,
        MergeConfig,
        help="merge an adapter into the base weights (HF model dir) + downstream before/after",
    )
    add(
        subparsers,
        "demo",
        demo_command,
        DemoConfig,
        help="default model + default SAE: train (cached) and compare",
    )
