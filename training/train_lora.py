"""`lorasae train`: fit a LoRA adapter so the model works with frozen SAEs spliced in (the method).

Loss: KL(p_clean || p_adapted+spliced) on next-token distributions, averaged per token (the reference
code sums over positions and divides by the batch: same direction, scale differs by the context
length). ``p_clean`` comes from the same weights with the adapter disabled and no splice, without
gradient. Only LoRA parameters train; the base model and the SAEs are frozen.

The loop runs under Hugging Face ``accelerate`` (``accelerate launch ... lorasae train`` for DDP,
mixed precision, gradient accumulation). ``--batch-size`` is the global number of sequences per
optimizer step whatever the number of processes or accumulation steps, so results do not depend on
the hardware. Checkpoints hold only what is needed to continue (LoRA weights, optimizer, step,
history), are written atomically, and ``--resume`` continues to the same result as an uninterrupted
run: each micro-batch draws its dropout masks from a seed derived from its index.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lorasae.data import DEFAULT_CORPUS, packed_sequences
from lorasae.errors import LorasaeError
from lorasae.manifest import MANIFEST_FILE, AdapterManifest, SaeEntry
from lorasae.metrics import eval_mode, evaluate, kl_per_token, token_ce
from lorasae.models import DEFAULT_MODEL, decoder_layers, load_model, model_fingerprint
from lorasae.saes import LoadedSAE
from lorasae.splice import Splice
from lorasae.training.eval import resolve_saes
from lorasae.training.plots import plot_training

PAPER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
METRICS_FILE = "metrics.json"
PLOT_FILE = "training.png"


@dataclass
class LoraTrainConfig:
    """Every setting of a LoRA-SAE run; saved in metrics.json and the manifest. Defaults: the paper's."""

    model: str = DEFAULT_MODEL
    saes: list[str] = field(default_factory=list)
    rank: int = 64
    alpha: float = 32.0
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: list(PAPER_TARGET_MODULES))
    layers: str = "after"  # "after": only layers after the first SAE; "all"
    lr: float = 5e-5
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ctx: int = 128
    batch_size: int = 8  # sequences per optimizer step, across processes and accumulation
    grad_accum: int = 1
    tokens: int = 300_000  # training token budget (one pass over that many train-split tokens)
    max_steps: int | None = None
    max_minutes: float | None = None
    eval_every: int = 100  # steps between held-out evals of ce_adapted_spliced
    eval_tokens: int = 16_384
    checkpoint_every: int = 25
    seed: int = 0
    corpus: str = DEFAULT_CORPUS
    keep_first: bool = True
    device: str | None = None
    dtype: str | None = None

    def validate(self) -> None:
        if self.layers not in ("after", "all"):
            raise LorasaeError("--layers must be 'after' or 'all'")
        if self.rank < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise LorasaeError("--rank, --batch-size and --grad-accum must be positive")
        if self.batch_size % self.grad_accum:
            raise LorasaeError("--batch-size must be a multiple of --grad-accum")


def lora_layers(cfg: LoraTrainConfig, saes: list[LoadedSAE], n_layers: int) -> list[int] | None:
    """Decoder layers that get LoRA: those after the first SAE, or all (None)."""
    if cfg.layers == "all":
        return None
    first = min(s.layer for s in saes)
    layers = list(range(first + 1, n_layers))
    if not layers:
        raise LorasaeError(f"no layers after layer {first} to adapt; use --layers all")
    return layers


def wrap_with_lora(model: torch.nn.Module, cfg: LoraTrainConfig, saes: list[LoadedSAE]):
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in present]
    if missing:
        raise LorasaeError(f"target modules {missing} not found in the model; pass --target-modules")
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=list(cfg.target_modules), bias="none",
                        layers_to_transform=lora_layers(cfg, saes, len(decoder_layers(model))))
    return get_peft_model(model, config)


def kl_loss(model, peft_model, saes: list[LoadedSAE], ids: torch.Tensor, keep_first: bool) -> torch.Tensor:
    """Mean per-token KL(clean || adapted+spliced); ``model`` may be the DDP-wrapped ``peft_model``."""
    with torch.no_grad(), peft_model.disable_adapter():
        clean = F.log_softmax(peft_model(input_ids=ids).logits[:, :-1].float(), dim=-1)
    with Splice(peft_model, saes, keep_first):
        student = F.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
    return kl_per_token(clean, student).mean()


@torch.no_grad()
def adapted_spliced_ce(peft_model, saes: list[LoadedSAE], sequences: torch.Tensor,
                       batch_size: int, keep_first: bool) -> float:
    """Held-out CE with the adapter on and the SAEs spliced: the number to watch during training."""
    device = next(peft_model.parameters()).device
    total, count = 0.0, 0
    with eval_mode(peft_model):
        for start in range(0, sequences.shape[0], batch_size):
            ids = sequences[start:start + batch_size].to(device)
            with Splice(peft_model, saes, keep_first):
                logits = peft_model(input_ids=ids).logits[:, :-1]
            total += float(token_ce(F.log_softmax(logits.float(), -1), ids).sum())
            count += ids.shape[0] * (ids.shape[1] - 1)
    return total / count


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _save_checkpoint(out: Path, state: dict) -> None:
    """One file, written then renamed: a kill at any moment leaves the previous checkpoint intact."""
    directory = out / CHECKPOINT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, directory / CHECKPOINT_FILE)


def _prepare_out(out: Path, resume: bool) -> dict | None:
    """Refuse to overwrite finished or interrupted runs unless resuming; return the checkpoint state."""
    ckpt = out / CHECKPOINT_DIR / CHECKPOINT_FILE
    if resume:
        if ckpt.exists():
            return torch.load(ckpt, map_location="cpu", weights_only=False)
        if (out / MANIFEST_FILE).exists():
            raise LorasaeError(f"{out} holds a finished adapter; nothing to resume")
        return None
    if (out / MANIFEST_FILE).exists() or ckpt.exists():
        raise LorasaeError(f"{out} already holds a run; pass --resume or choose another --out")
    return None


def train_lora(cfg: LoraTrainConfig, out: Path, resume: bool = False) -> dict:
    """Train, evaluate and save an adapter to ``out``; returns the metrics dict."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    cfg.validate()
    out = Path(out)
    state = _prepare_out(out, resume)
    if state is not None and state["config"] != asdict(cfg):
        changed = [k for k, v in asdict(cfg).items() if state["config"].get(k) != v]
        allowed = {"max_steps", "max_minutes", "eval_every", "checkpoint_every", "device", "dtype"}
        if set(changed) - allowed:
            raise LorasaeError(f"--resume with different settings: {sorted(set(changed) - allowed)}")
    out.mkdir(parents=True, exist_ok=True)

    device = None if cfg.device is None else torch.device(cfg.device)
    use_cuda = (device or torch.device("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum, mixed_precision="bf16" if use_cuda else "no",
        cpu=not use_cuda, dataloader_config=DataLoaderConfiguration(split_batches=True))
    main = accelerator.is_main_process
    micro = cfg.batch_size // cfg.grad_accum
    if micro % accelerator.num_processes:
        raise LorasaeError(f"--batch-size/--grad-accum ({micro}) must be a multiple of the "
                           f"{accelerator.num_processes} processes")

    # Weights stay fp32 for training (bf16 autocast on CUDA comes from accelerate).
    lm = load_model(cfg.model, accelerator.device, cfg.dtype or "float32")
    saes = resolve_saes(lm, cfg.saes, cfg.model)
    base_fingerprint = model_fingerprint(lm.model)
    torch.manual_seed(cfg.seed)  # LoRA A matrices are initialised from the global RNG
    peft_model = wrap_with_lora(lm.model, cfg, saes)
    if state is not None:
        set_peft_model_state_dict(peft_model, state["lora"])
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)

    train = packed_sequences(lm.tokenizer, "train", cfg.tokens, cfg.ctx, cfg.corpus)
    heldout = packed_sequences(lm.tokenizer, "heldout", cfg.eval_tokens, cfg.ctx, cfg.corpus)
    model, optimizer = accelerator.prepare(peft_model, optimizer)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    n_micro = train.shape[0] // micro
    total_steps = n_micro // cfg.grad_accum
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    if total_steps < 1:
        raise LorasaeError("the token budget gives no full optimizer step; raise --tokens")

    step = state["step"] if state else 0
    elapsed = state["elapsed"] if state else 0.0
    history: list[dict] = state["history"] if state else []
    tokens_per_step = cfg.batch_size * cfg.ctx
    metrics: dict = state["metrics"] if state else {"config": asdict(cfg)}
    if main and "start" not in metrics:
        metrics["start"] = evaluate(peft_model, saes, heldout, keep_first=cfg.keep_first,
                                    adapter=True)
        _write_json_atomic(out / METRICS_FILE, metrics)

    def checkpoint() -> None:
        if main:
            _save_checkpoint(out, {
                "config": asdict(cfg), "step": step, "elapsed": elapsed, "history": history,
                "metrics": metrics, "lora": get_peft_model_state_dict(peft_model),
                "optimizer": optimizer.state_dict()})
        accelerator.wait_for_everyone()

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="LoRA-SAE", unit="step", disable=not main)
    running = None
    started = time.time() - elapsed
    stop_reason = "max steps" if cfg.max_steps is not None and total_steps == cfg.max_steps \
        else "token budget"
    per_process = micro // accelerator.num_processes
    step_loss = 0.0  # mean over the step's micro-batches
    for micro_index in range(step * cfg.grad_accum, total_steps * cfg.grad_accum):
        # The global micro-batch i is fixed by the seed; each process takes its slice of it.
        rows = order[micro_index * micro:(micro_index + 1) * micro]
        rows = rows[accelerator.process_index * per_process:(accelerator.process_index + 1) * per_process]
        ids = train[rows].to(accelerator.device)
        torch.manual_seed(cfg.seed * 1_000_003 + micro_index * accelerator.num_processes
                          + accelerator.process_index)
        with accelerator.accumulate(model), accelerator.autocast():
            loss = kl_loss(model, peft_model, saes, ids, cfg.keep_first)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad()
        step_loss += float(accelerator.reduce(loss.detach(), reduction="mean")) / cfg.grad_accum
        if not accelerator.sync_gradients:
            continue
        value, step_loss = step_loss, 0.0
        step += 1
        elapsed = time.time() - started
        running = value if running is None else 0.9 * running + 0.1 * value
        entry = {"step": step, "tokens": step * tokens_per_step, "seconds": round(elapsed, 2),
                 "train_kl": value}
        bar.set_postfix(kl=f"{running:.4f}")
        bar.update(1)
        if main and (step % cfg.eval_every == 0) and step < total_steps:
            entry["ce_adapted_spliced"] = adapted_spliced_ce(peft_model, saes, heldout,
                                                             8, cfg.keep_first)
        history.append(entry)
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            metrics["history"] = history
            checkpoint()
        if cfg.max_minutes is not None and elapsed >= cfg.max_minutes * 60:
            stop_reason = "max minutes"
            break
    bar.close()
    metrics["history"] = history
    if step == 0:
        raise LorasaeError("no training step ran")
    checkpoint()
    if main:
        metrics["final"] = evaluate(peft_model, saes, heldout, keep_first=cfg.keep_first,
                                    adapter=True)
        metrics["train"] = {"steps": step, "tokens": step * tokens_per_step,
                            "seconds": round(elapsed, 1), "stop_reason": stop_reason,
                            "tokens_per_second": round(step * tokens_per_step / max(elapsed, 1e-9), 1),
                            "processes": accelerator.num_processes}
        _finish(out, peft_model, lm, saes, base_fingerprint, cfg, metrics)
    accelerator.wait_for_everyone()
    return metrics


def _finish(out: Path, peft_model, lm, saes: list[LoadedSAE], base_fingerprint: str,
            cfg: LoraTrainConfig, metrics: dict) -> None:
    """Write the peft files, metrics, plot, then the manifest last (its presence marks completion)."""
    tmp = out / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()
    _write_json_atomic(out / METRICS_FILE, metrics)
    plot_training(metrics, out / PLOT_FILE)
    lora = {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout,
            "target_modules": cfg.target_modules, "layers": cfg.layers,
            "layers_to_transform": lora_layers(cfg, saes, len(decoder_layers(lm.model)))}
    AdapterManifest(
        base_model=lm.model_id, base_model_fingerprint=base_fingerprint,
        saes=[SaeEntry.of(s) for s in saes], lora=lora,
        training={**metrics["train"], "lr": cfg.lr, "batch_size": cfg.batch_size, "ctx": cfg.ctx,
                  "seed": cfg.seed, "corpus": cfg.corpus, "loss": "kl_clean_vs_adapted_spliced_token_mean"},
        eval_before=_headline(metrics["start"]), eval_after=_headline(metrics["final"]),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    ).save(out)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)


def _headline(result: dict) -> dict:
    keys = ("ce_clean", "ce_spliced", "ce_adapted_spliced", "ce_adapted_clean", "gap_closed",
            "ce_gap", "kl_spliced", "kl_adapted_spliced", "tokens")
    return {k: result[k] for k in keys if k in result and not (
        isinstance(result[k], float) and math.isnan(result[k]))}
