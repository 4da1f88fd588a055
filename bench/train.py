"""Training throughput of a `lorasae train` optimizer step vs plain training steps of the same model on
the same batch; prints a table of ratios, then JSON.

    python bench/train.py                                     # embedded default model + default SAE
    python bench/train.py --model DIR --sae SAE_DIR --quick   # a tiny model, a short run

Five steps are timed in one process on one batch of --batch-size x --ctx tokens (BOS + random ids),
interleaved (one of each per round, the order rotating between rounds) and repeated; tokens/s is the
batch's tokens over the median step time:
1. lora_sae: the LoRA-SAE optimizer step as it was before the exact speed-ups, from
   lorasae.training.train_lora's own pieces: ``wrap_with_lora`` with ``LoraTrainConfig``'s defaults
   (the paper's: rank 64, alpha 32, dropout 0.1, q/k/v/o/gate/up/down of the layers after the first
   SAE; --rank overrides the rank) and ``kl_loss`` without a prefix (a full clean forward without
   grad, then the full adapted forward with the SAEs spliced), backward, grad clipping, AdamW on the
   LoRA weights (the model in train mode, as in the loop);
2. lora_sae_shared: the same step with the shared prefix: layers 0..L (L: the first SAE's layer, no
   LoRA before it) run once without grad, then both passes start after L (`--no-residual-cache`);
3. lora_sae_cached: the same step from the residual cache (`lorasae train`'s default): the layer-L
   residual of the batch and the clean model's final hidden states (the teacher: its next-token
   distribution is then one head matmul) are read from the on-disk cache, built once before
   timing (a run builds it once for all its epochs, and sweeps/compare share it); the reads are
   timed;
4. full_fwd_bwd: a plain forward + backward of the base model (adapter disabled, no SAE) with a
   next-token CE loss and *every* base weight requiring grad: the gradient work of a full
   fine-tune step, without the optimizer update;
5. lora_ce: an ordinary LoRA fine-tuning step on the same adapter (CE, no SAE, no clean pass,
   backward + clip + AdamW on the LoRA weights only): lora_sae / lora_ce is what the method itself
   costs (the clean teacher pass and the splice).
The three LoRA-SAE variants give the same loss (printed: their largest difference), so their
ratios are pure speed-ups.
On CUDA every step runs under bf16 autocast with fp32 weights, as `lorasae train` does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

STEPS = ("lora_sae", "lora_sae_shared", "lora_sae_cached", "full_fwd_bwd", "lora_ce")


def run(args) -> dict:
    import torch
    import torch.nn.functional as F

    from lorasae.models import decoder_layers, load_model
    from lorasae.saes import resolve_saes
    from lorasae.splice import SharedPrefix, residual_at
    from lorasae.training.residuals import ensure_residuals, load_clean_final, load_residuals
    from lorasae.training.train_lora import LoraTrainConfig, kl_loss, lora_layers, wrap_with_lora
    from lorasae.training.train_sae import ensure_default_sae

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"loading {args.model or 'the embedded default model'} ...", file=sys.stderr)
    lm = load_model(args.model, args.device, "float32")  # training weights are fp32, as in the loop
    saes = resolve_saes(lm, args.sae or [], args.model, ensure_default_sae)
    specs = [s.sae_id for s in saes]
    cfg = LoraTrainConfig(saes=specs, **({"rank": args.rank} if args.rank else {}))
    model = wrap_with_lora(lm.model, cfg, saes)
    model.train()
    lora = [p for p in model.parameters() if p.requires_grad]
    base = [p for name, p in model.named_parameters() if "lora_" not in name]
    optimizer = torch.optim.AdamW(lora, lr=cfg.lr, weight_decay=cfg.weight_decay)
    device = lm.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def autocast():
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    gen = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (args.batch_size, args.ctx), generator=gen)
    if lm.tokenizer.bos_token_id is not None:
        ids[:, 0] = lm.tokenizer.bos_token_id
    ids = ids.to(device)

    def ce() -> torch.Tensor:
        logits = model(input_ids=ids).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(lora, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad()

    first = min(s.layer for s in saes)
    with model.disable_adapter():
        folder = ensure_residuals(lm, first, ids.cpu(), "bench-random-ids", clean_final=True)
    cache, finals = load_residuals(folder, ids.shape[0]), load_clean_final(folder, ids.shape[0])
    rows = torch.arange(ids.shape[0])
    losses: dict[str, list[float]] = {name: [] for name in STEPS[:3]}

    # where each LoRA-SAE variant starts: (prefix, teacher's final hidden states), per batch
    starts = {
        "lora_sae": lambda: (None, None),
        "lora_sae_shared": lambda: (SharedPrefix(first, residual_at(model, first, ids)), None),
        "lora_sae_cached": lambda: (SharedPrefix(first, cache[rows].to(device)), finals[rows].to(device)),
    }

    def kl_loss_of(name: str) -> torch.Tensor:
        prefix, final = starts[name]()
        with autocast():
            return kl_loss(model, model, saes, ids, cfg.keep_first, prefix, final)

    def kl_step(name: str) -> None:
        loss = kl_loss_of(name)
        loss.backward()
        losses[name].append(float(loss.detach()))
        update()

    def full_fwd_bwd() -> None:
        for p in base:
            p.requires_grad_(True)
        try:
            with model.disable_adapter(), autocast():
                loss = ce()
            loss.backward()
        finally:
            for p in base:
                p.requires_grad_(False)
                p.grad = None

    def lora_ce() -> None:
        with autocast():
            loss = ce()
        loss.backward()
        update()

    steps = {name: partial(kl_step, name) for name in starts}
    steps |= {"full_fwd_bwd": full_fwd_bwd, "lora_ce": lora_ce}
    # the exactness check, before timing: one batch, no update in between, the same dropout masks
    exact = []
    for name in starts:
        torch.manual_seed(7)
        with torch.no_grad():
            exact.append(float(kl_loss_of(name)))
    times: dict[str, list[float]] = {name: [] for name in STEPS}
    for round_ in range(args.warmup + args.rounds):
        order = STEPS[round_ % len(STEPS):] + STEPS[:round_ % len(STEPS)]
        for name in order:
            sync()
            started = time.perf_counter()
            steps[name]()
            sync()
            if round_ >= args.warmup:
                times[name].append((time.perf_counter() - started) * 1000)
        print(f"round {round_ + 1}/{args.warmup + args.rounds}"
              f"{' (warm-up)' if round_ < args.warmup else ''}", file=sys.stderr)

    tokens = args.batch_size * args.ctx
    median = {name: statistics.median(values) for name, values in times.items()}
    tps = {name: tokens / (ms / 1000) for name, ms in median.items()}
    return {
        "model": lm.model_id, "saes": [s.sae_id for s in saes], "device": str(device),
        "dtype": "float32" + (" + bf16 autocast" if device.type == "cuda" else ""),
        "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size, "ctx": args.ctx,
        "tokens_per_step": tokens, "rank": cfg.rank,
        "lora_layers": lora_layers(cfg, saes, len(decoder_layers(model))),
        "lora_params": sum(p.numel() for p in lora), "base_params": sum(p.numel() for p in base),
        "rounds": args.rounds, "warmup_rounds": args.warmup,
        "step_ms_median": {name: round(ms, 3) for name, ms in median.items()},
        "step_ms_all": {name: [round(ms, 3) for ms in values] for name, values in times.items()},
        "same_loss_max_abs_diff": max(abs(x - exact[0]) for x in exact),
        "loss_of_each_variant": exact,
        "lora_sae_tokens_per_s": round(tps["lora_sae"], 1),
        "lora_sae_shared_tokens_per_s": round(tps["lora_sae_shared"], 1),
        "lora_sae_cached_tokens_per_s": round(tps["lora_sae_cached"], 1),
        "shared_prefix_speedup": round(tps["lora_sae_shared"] / tps["lora_sae"], 3),
        "residual_cache_speedup": round(tps["lora_sae_cached"] / tps["lora_sae"], 3),
        "prefix_layer": first,
        "full_fwd_bwd_tokens_per_s": round(tps["full_fwd_bwd"], 1),
        "lora_ce_tokens_per_s": round(tps["lora_ce"], 1),
        "lora_sae_vs_full_fwd_bwd": round(tps["lora_sae"] / tps["full_fwd_bwd"], 3),
        "lora_sae_vs_lora_ce": round(tps["lora_sae"] / tps["lora_ce"], 3),
        "lora_sae_cached_vs_lora_ce": round(tps["lora_sae_cached"] / tps["lora_ce"], 3),
        "lora_ce_vs_full_fwd_bwd": round(tps["lora_ce"] / tps["full_fwd_bwd"], 3),
    }


def print_table(r: dict) -> None:
    rows = [
        ("LoRA-SAE step, full passes (before), tokens/s", f"{r['lora_sae_tokens_per_s']:.1f}"),
        ("LoRA-SAE step, shared prefix, tokens/s", f"{r['lora_sae_shared_tokens_per_s']:.1f}"),
        ("LoRA-SAE step, residual cache (default), tokens/s", f"{r['lora_sae_cached_tokens_per_s']:.1f}"),
        ("shared prefix / full passes", f"{r['shared_prefix_speedup']:.2f}x"),
        ("residual cache / full passes", f"{r['residual_cache_speedup']:.2f}x"),
        ("plain fwd+bwd, all weights with grad (CE), tokens/s", f"{r['full_fwd_bwd_tokens_per_s']:.1f}"),
        ("LoRA fine-tune step (CE, no SAE), tokens/s", f"{r['lora_ce_tokens_per_s']:.1f}"),
        ("LoRA-SAE full passes / plain fwd+bwd", f"{r['lora_sae_vs_full_fwd_bwd']:.2f}x"),
        ("LoRA-SAE full passes / LoRA fine-tune step", f"{r['lora_sae_vs_lora_ce']:.2f}x"),
        ("LoRA-SAE residual cache / LoRA fine-tune step", f"{r['lora_sae_cached_vs_lora_ce']:.2f}x"),
        ("LoRA fine-tune step / plain fwd+bwd", f"{r['lora_ce_vs_full_fwd_bwd']:.2f}x"),
    ]
    print(f"model {r['model']} on {r['device']} ({r['dtype']}, {r['torch_threads']} threads), SAEs "
          f"{r['saes']}; batch {r['batch_size']} x {r['ctx']} tokens, LoRA rank {r['rank']} "
          f"({r['lora_params']:,} trainable of {r['base_params']:,}); median of {r['rounds']} "
          f"interleaved rounds")
    print(f"the three LoRA-SAE steps give the same loss: largest difference {r['same_loss_max_abs_diff']:.2e}")
    width = max(len(name) for name, _ in rows)
    print(f"{'metric':<{width}}  {'value':>10}")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>10}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2)")
    p.add_argument("--sae", action="append", help="SAE spec (repeat; default: the default SAE)")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 8; 2 quick)")
    p.add_argument("--ctx", type=int, default=None, help="tokens per sequence (default 128; 32 quick)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: lorasae train's, 64)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; 3 quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="short run (tiny models, smoke checks)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.model is not None and not args.sae:
        p.error("--sae is required with --model (the default SAE belongs to the default model)")
    args.batch_size = args.batch_size or (2 if args.quick else 8)
    args.ctx = args.ctx or (32 if args.quick else 128)
    args.rounds = args.rounds or (3 if args.quick else 5)
    result = run(args)
    print_table(result)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
