"""The `lorasae` command line: one entry point, one subcommand per job.

Progress goes to stderr; the JSON result is the last thing printed on stdout. Errors print one line
(``error: ...``) and exit with status 2; set ``LORASAE_DEBUG=1`` to see a traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lorasae.data import DEFAULT_CORPUS
from lorasae.errors import LorasaeError
from lorasae.models import DEFAULT_MODEL


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id, local HF dir or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--corpus", default=DEFAULT_CORPUS,
                   help="text file/folder or HF dataset id (default: sotu + Wikipedia mix)")
    p.add_argument("--ctx", type=int, default=128, help="context length of packed sequences")


def _write_json(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(path)
    print(text, flush=True)


def cmd_eval(args: argparse.Namespace) -> None:
    from lorasae.training.eval import EvalConfig, run_eval

    cfg = EvalConfig(model=args.model, saes=args.sae or [], adapter=args.adapter,
                     tokens=args.tokens, ctx=args.ctx, batch_size=args.batch_size,
                     corpus=args.corpus, keep_first=not args.splice_first, device=args.device,
                     dtype=args.dtype)
    _write_json(run_eval(cfg), args.out)


def cmd_train_sae(args: argparse.Namespace) -> None:
    from lorasae.models import load_model
    from lorasae.saes import load_sae
    from lorasae.training.eval import EvalConfig, run_eval
    from lorasae.training.train_sae import SaeTrainingConfig, default_sae_dir, train_sae

    cfg = SaeTrainingConfig(layer=args.layer, expansion=args.expansion, k=args.k,
                            tokens=args.tokens, ctx=args.ctx, epochs=args.epochs,
                            batch_size=args.batch_size, lr=args.lr,
                            seed=args.seed, corpus=args.corpus)
    if args.out is None and args.model != DEFAULT_MODEL:
        raise LorasaeError("--out is required with a non-default --model")
    out = Path(args.out) if args.out else default_sae_dir(cfg)
    lm = load_model(args.model, args.device, args.dtype)
    train_sae(lm, cfg, out)
    load_sae(str(out), device=lm.device, model=lm.model)  # proves sae-lens loads what we wrote
    del lm
    result = run_eval(EvalConfig(model=args.model, saes=[str(out)], ctx=args.ctx,
                                 corpus=args.corpus, device=args.device, dtype=args.dtype))
    _write_json({"sae_dir": str(out), **result}, str(out / "eval.json"))


def _loop_fields(args: argparse.Namespace) -> dict:
    """The settings every KL-trained run shares (``LoopConfig``), from the parsed flags."""
    return dict(
        model=args.model, saes=args.sae or [], lr=args.lr, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, ctx=args.ctx, batch_size=args.batch_size,
        grad_accum=args.grad_accum, tokens=args.tokens, max_steps=args.max_steps,
        max_minutes=args.max_minutes, eval_every=args.eval_every, eval_tokens=args.eval_tokens,
        checkpoint_every=args.checkpoint_every, seed=args.seed, corpus=args.corpus,
        keep_first=not args.splice_first, device=args.device, dtype=args.dtype)


def _lora_config(args: argparse.Namespace):
    from lorasae.training.train_lora import LoraTrainConfig

    return LoraTrainConfig(**_loop_fields(args), rank=args.rank, alpha=args.alpha,
                           dropout=args.dropout, target_modules=args.target_modules.split(","),
                           layers=args.layers)


def cmd_train(args: argparse.Namespace) -> None:
    from lorasae.training.train_lora import train_lora

    metrics = train_lora(_lora_config(args), Path(args.out), resume=args.resume)
    if "final" in metrics:
        _write_json({"out": args.out, "train": metrics["train"], "final": metrics["final"]}, None)


def cmd_train_e2e(args: argparse.Namespace) -> None:
    from lorasae.training.train_e2e import E2eTrainConfig, train_e2e

    cfg = E2eTrainConfig(**_loop_fields(args), init=args.init, sparsity_coeff=args.sparsity_coeff)
    metrics = train_e2e(cfg, Path(args.out), resume=args.resume)
    if "final" in metrics:
        _write_json({"out": args.out, "train": metrics["train"], "final": metrics["final"]}, None)


PAPER_PRESET = {"rank": 64, "lr": 5e-5, "ctx": 1024, "batch_size": 1, "tokens": 15_000_000,
                "max_steps": None, "eval_every": 500, "eval_tokens": 1_000_000, "layers": "after"}


def cmd_compare(args: argparse.Namespace) -> None:
    """LoRA-SAE vs e2e SAE; ``--preset paper`` sets the paper's defaults (flags given still win)."""
    from lorasae.training.compare import CompareConfig, run_compare
    from lorasae.training.loop import LoopConfig

    values = {**vars(args)}
    if args.preset == "paper":
        given = set(args.explicit)
        values.update({k: v for k, v in PAPER_PRESET.items() if k not in given})
    loop = LoopConfig(
        model=args.model, saes=args.sae or [], lr=values["lr"], ctx=values["ctx"],
        batch_size=values["batch_size"], grad_accum=args.grad_accum, tokens=values["tokens"],
        max_steps=values["max_steps"], eval_every=values["eval_every"],
        eval_tokens=values["eval_tokens"], seed=args.seed, corpus=args.corpus,
        keep_first=not args.splice_first, device=args.device, dtype=args.dtype)
    cfg = CompareConfig(loop=loop, rank=values["rank"], layers=values["layers"], e2e_lr=args.e2e_lr,
                        e2e_init=args.e2e_init)
    result = run_compare(cfg, Path(args.out))
    _write_json({k: v for k, v in result.items() if k not in ("lora", "e2e")}
                | {run: {k: v for k, v in result[run].items() if k != "curve"} for run in ("lora", "e2e")},
                None)


def cmd_merge(args: argparse.Namespace) -> None:
    from lorasae.training.merge import MergeConfig, run_merge

    _write_json(run_merge(MergeConfig(
        adapter=args.adapter, out=args.out, model=args.model, evaluate=not args.no_eval,
        eval_tokens=args.eval_tokens, ctx=args.ctx, corpus=args.corpus, mc_items=args.mc_items,
        mc_context=args.mc_context, mc_choice=args.mc_choice, mc_file=args.mc_file,
        device=args.device)), None)


def cmd_sweep(args: argparse.Namespace) -> None:
    from lorasae.training.loop import LoopConfig
    from lorasae.training.sweep import SweepConfig, format_table, run_sweep

    loop = LoopConfig(model=args.model, lr=args.lr, ctx=args.ctx, batch_size=args.batch_size,
                      tokens=args.steps * args.batch_size * args.ctx, max_steps=args.steps,
                      eval_every=10**9, eval_tokens=args.eval_tokens, seed=args.seed,
                      corpus=args.corpus, device=args.device, dtype=args.dtype)
    cfg = SweepConfig(loop=loop, sae=args.sae, sparsity_saes=args.sparsity_sae or [],
                      layer_saes=args.layer_sae or [], ranks=[int(r) for r in args.ranks.split(",")],
                      rank=args.rank, e2e_lr=args.e2e_lr, e2e=not args.no_e2e)
    only = set(args.only.split(",")) if args.only else None
    result = run_sweep(cfg, Path(args.out), only, report=args.report)
    print(format_table(result["rows"]), file=sys.stderr, flush=True)
    _write_json(result, None)


def cmd_demo(args: argparse.Namespace) -> None:
    from lorasae.training.demo import run_demo

    _write_json(run_demo(steps=args.steps, max_minutes=args.max_minutes), None)


def cmd_serve(args: argparse.Namespace) -> None:
    import logging

    import uvicorn

    from lorasae.service.app import create_app
    from lorasae.service.engine import Engine
    from lorasae.service.limits import uvicorn_options
    from lorasae.service.settings import Settings

    settings = Settings.load(
        config=args.config, model=args.model, saes=args.sae, device=args.device, dtype=args.dtype,
        host=args.host, port=args.port, adapter_root=args.adapter_root, db_path=args.db,
        api_key_env=args.api_key_env, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        insecure_no_auth=args.insecure_no_auth or None, allowed_hosts=args.allowed_host)
    settings.check_safe()  # fail now, not after loading the model: unset key variable, open bind
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(f"loading {settings.model} ...", file=sys.stderr, flush=True)
    engine = Engine.from_settings(settings)  # load errors end here as `error: ...`, before serving
    uvicorn.run(create_app(settings, engine), **uvicorn_options(settings))


def _add_loop_args(p: argparse.ArgumentParser, d) -> None:
    """Flags of ``LoopConfig`` (shared by train and train-e2e); ``d`` holds the command's defaults."""
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="sequences per optimizer step (global, whatever the processes/accumulation)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--tokens", type=int, default=d.tokens, help="training token budget")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="steps between held-out CE evaluations (their time is not training time)")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--splice-first", action="store_true",
                   help="also splice position 0 (BOS); by default it keeps its clean activation")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")


def _add_lora_args(p: argparse.ArgumentParser) -> None:
    from lorasae.training.train_lora import LoraTrainConfig

    d = LoraTrainConfig()
    p.add_argument("--sae", action="append",
                   help="SAE to splice and adapt around (repeat for several layers; "
                        "default: the embedded default SAE)")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--target-modules", default=",".join(d.target_modules))
    p.add_argument("--layers", choices=["after", "all"], default=d.layers,
                   help="adapt only the layers after the first SAE (paper's main runs) or all")
    _add_loop_args(p, d)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorasae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="held-out CE gap, KL, L0, explained variance (JSON)")
    _add_model_args(p)
    p.add_argument("--sae", action="append",
                   help="sae-lens folder or release/sae_id; repeat to splice several at once "
                        "(default: the embedded default SAE, trained on first use)")
    p.add_argument("--adapter", default=None, help="peft adapter directory to evaluate")
    p.add_argument("--tokens", type=int, default=16_384, help="held-out tokens to evaluate")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--splice-first", action="store_true",
                   help="also splice position 0 (BOS); by default it keeps its clean activation")
    p.add_argument("--out", default="lorasae-eval.json", help="where to write the JSON")
    p.set_defaults(func=cmd_eval)

    from lorasae.training.train_sae import SaeTrainingConfig

    p = sub.add_parser("train-sae", help="train a TopK SAE on a residual stream (sae-lens format)")
    _add_model_args(p)
    p.add_argument("--layer", type=int, default=None, help="decoder layer (default: middle)")
    p.add_argument("--expansion", type=int, default=SaeTrainingConfig.expansion, help="d_sae / d_model")
    p.add_argument("--k", type=int, default=SaeTrainingConfig.k, help="active latents per token (TopK)")
    p.add_argument("--tokens", type=int, default=SaeTrainingConfig.tokens, help="training activations")
    p.add_argument("--epochs", type=int, default=SaeTrainingConfig.epochs)
    p.add_argument("--batch-size", type=int, default=SaeTrainingConfig.batch_size,
                   help="activations per SAE optimizer step")
    p.add_argument("--lr", type=float, default=SaeTrainingConfig.lr)
    p.add_argument("--seed", type=int, default=SaeTrainingConfig.seed)
    p.add_argument("--out", default=None,
                   help="output folder (default: the cache folder of the default SAE)")
    p.set_defaults(func=cmd_train_sae)

    p = sub.add_parser("train", help="train a LoRA adapter around frozen SAE(s) (the method)")
    _add_model_args(p)
    _add_lora_args(p)
    p.add_argument("--out", required=True, help="adapter directory (peft files + lorasae.json)")
    p.set_defaults(func=cmd_train)

    from lorasae.training.train_e2e import E2eTrainConfig

    d = E2eTrainConfig()
    p = sub.add_parser("train-e2e", help="e2e SAE baseline: train the SAE on the KL, model frozen")
    _add_model_args(p)
    p.add_argument("--sae", action="append",
                   help="the SAE whose architecture, width and sparsity to match (and the start "
                        "with --init finetune; default: the embedded default SAE)")
    p.add_argument("--init", choices=["finetune", "scratch"], default=d.init,
                   help="start from the given SAE's weights or from a fresh initialisation")
    p.add_argument("--sparsity-coeff", type=float, default=None,
                   help="L0 (JumpReLU) / L1 (standard) penalty; TopK needs none "
                        "(default: 0.01 JumpReLU around the given L0, 1e-3 L1)")
    _add_loop_args(p, d)
    p.add_argument("--out", required=True, help="run directory; the SAE is saved there in sae-lens format")
    p.set_defaults(func=cmd_train_e2e)

    from lorasae.training.compare import CompareConfig

    c = CompareConfig()
    p = sub.add_parser("compare", help="LoRA-SAE vs the e2e SAE baseline: time to the same CE, curves")
    _add_model_args(p)
    p.add_argument("--sae", action="append", help="the SAE (default: the embedded default SAE)")
    p.add_argument("--preset", choices=["paper"], default=None,
                   help="paper: rank 64, lr 5e-5, batch 1 x ctx 1024, 15M tokens, LoRA after the SAE "
                        "(for a GPU; flags given explicitly still win)")
    p.add_argument("--rank", type=int, default=c.rank)
    p.add_argument("--layers", choices=["after", "all"], default=c.layers)
    p.add_argument("--lr", type=float, default=c.loop.lr, help="LoRA learning rate")
    p.add_argument("--e2e-lr", type=float, default=c.e2e_lr, help="e2e SAE learning rate")
    p.add_argument("--e2e-init", choices=["finetune", "scratch"], default=c.e2e_init)
    p.add_argument("--batch-size", type=int, default=c.loop.batch_size)
    p.add_argument("--grad-accum", type=int, default=c.loop.grad_accum)
    p.add_argument("--tokens", type=int, default=c.loop.tokens, help="training token budget per run")
    p.add_argument("--max-steps", type=int, default=c.loop.max_steps)
    p.add_argument("--eval-every", type=int, default=c.loop.eval_every)
    p.add_argument("--eval-tokens", type=int, default=c.loop.eval_tokens)
    p.add_argument("--seed", type=int, default=c.loop.seed)
    p.add_argument("--splice-first", action="store_true")
    p.add_argument("--out", default="lorasae-compare", help="folder for both runs, compare.json/.png")
    p.set_defaults(func=cmd_compare)

    from lorasae.training.sweep import SweepConfig

    w = SweepConfig()
    p = sub.add_parser("sweep", help="rank / adapted layers / sparsity / layer sweeps, Pareto plot")
    _add_model_args(p)
    p.add_argument("--sae", default=None, help="base SAE (default: the embedded default SAE)")
    p.add_argument("--sparsity-sae", action="append",
                   help="SAEs of other L0 at the same layer (repeat; default model: TopK k16, k64)")
    p.add_argument("--layer-sae", action="append",
                   help="SAEs at other layers (repeat; default model: layer 8)")
    p.add_argument("--ranks", default=",".join(map(str, w.ranks)))
    p.add_argument("--rank", type=int, default=w.rank, help="rank of the other sweeps")
    p.add_argument("--steps", type=int, default=w.loop.max_steps, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=w.loop.batch_size)
    p.add_argument("--lr", type=float, default=w.loop.lr, help="LoRA learning rate")
    p.add_argument("--e2e-lr", type=float, default=w.e2e_lr)
    p.add_argument("--no-e2e", action="store_true", help="skip the e2e SAEs of the Pareto plot")
    p.add_argument("--eval-tokens", type=int, default=w.loop.eval_tokens)
    p.add_argument("--seed", type=int, default=w.loop.seed)
    p.add_argument("--only", default=None, help="comma list of sweeps: rank,layers,sparsity,layer")
    p.add_argument("--report", action="store_true",
                   help="train nothing: table and plots of the runs finished so far")
    p.add_argument("--out", default="lorasae-sweep", help="folder for every run and sweep.json")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("merge", help="merge an adapter into the base weights (HF model dir) + "
                                     "downstream before/after")
    _add_model_args(p)
    p.add_argument("--adapter", required=True, help="adapter directory (peft files + lorasae.json)")
    p.add_argument("--out", required=True, help="new Hugging Face model directory")
    p.add_argument("--no-eval", action="store_true", help="only merge; skip the before/after report")
    p.add_argument("--eval-tokens", type=int, default=16_384, help="held-out tokens for the CE")
    p.add_argument("--mc-items", type=int, default=300,
                   help="items of the heldout-continuation-4way task")
    p.add_argument("--mc-context", type=int, default=48, help="context tokens of a continuation item")
    p.add_argument("--mc-choice", type=int, default=12, help="tokens of each candidate continuation")
    p.add_argument("--mc-file", default=None,
                   help='JSONL multiple-choice task instead: {"context", "choices", "label"} per line')
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("serve", help="serve per-token SAE features over HTTP (FastAPI)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--model", default=None, help="hub id, local HF dir or .gguf (default: embedded SmolLM2)")
    p.add_argument("--sae", action="append", default=None,
                   help="SAE to splice (repeat; default: the embedded default SAE)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--adapter-root", default=None,
                   help="adapters register from inside this folder (default: $LORASAE_HOME/adapters)")
    p.add_argument("--db", default=None, help="SQLite registry (default: <adapter root>/registry.sqlite3)")
    p.add_argument("--api-key-env", default=None,
                   help="env var holding the bearer key that register/delete need (required to "
                        "bind a non-loopback address)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="bind a non-loopback address without an API key (anyone reaching the "
                        "port can register and delete adapters)")
    p.add_argument("--allowed-host", action="append", default=None,
                   help="Host header to answer (repeat; '*.example.org', '*'); default: loopback "
                        "names when bound to loopback, else any")
    p.add_argument("--max-batch", type=int, default=None, help="sequences per forward (default 16)")
    p.add_argument("--max-wait-ms", type=float, default=None, help="batching wait (default 5)")
    p.add_argument("--config", default=None, help="TOML/JSON settings file (also $LORASAE_CONFIG); "
                   "every setting can also be an env var LORASAE_<NAME>")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="default model + default SAE: train (cached) and compare")
    p.add_argument("--steps", type=int, default=100,
                   help="optimizer steps (x 1024 tokens) for the demo adapter")
    p.add_argument("--max-minutes", type=float, default=None, help="stop the demo training early")
    p.set_defaults(func=cmd_demo)
    return parser


def _explicit_flags(argv: list[str]) -> list[str]:
    """Destination names of the flags written on the command line (presets never override them)."""
    return [a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.explicit = _explicit_flags(argv)
    try:
        args.func(args)
    except LorasaeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI promises one line, not a traceback
        if os.environ.get("LORASAE_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {exc} (LORASAE_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
