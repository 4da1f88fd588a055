"""The training loop shared by `lorasae train` (LoRA-SAE) and `lorasae train-e2e` (e2e SAE baseline).

Both fit something to ``KL(p_clean || p_spliced)`` on the same packed data with the same schedule;
they differ only in *what* trains (LoRA matrices in the model, or the SAE itself) and in what is
saved at the end. That difference is an ``Objective``; everything else lives here once: accelerate
(DDP, mixed precision, gradient accumulation), the seeded data order, progress, periodic held-out
CE, atomic checkpoints and exact ``--resume``, metrics.json and the training plot.

``batch_size`` is the global number of sequences per optimizer step whatever the number of
processes or accumulation steps, so results do not depend on the hardware. Checkpoints hold only
what is needed to continue (trained weights, optimizer, step, history), are written atomically,
and ``--resume`` continues to the same result as an uninterrupted run: each micro-batch draws its
random numbers (dropout masks) from a seed derived from its index.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lorasae.data import DEFAULT_CORPUS, packed_sequences
from lorasae.errors import LorasaeError
from lorasae.models import DEFAULT_MODEL, LoadedModel, load_model
from lorasae.saes import LoadedSAE
from lorasae.training.eval import resolve_saes
from lorasae.training.plots import plot_training

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
METRICS_FILE = "metrics.json"
PLOT_FILE = "training.png"
DONE_MARKERS = ("lorasae.json", "cfg.json")  # an adapter's manifest / a finished SAE's config
# Settings that may differ on --resume: they do not change what a step computes.
RESUMABLE_CHANGES = {"max_steps", "max_minutes", "eval_every", "checkpoint_every", "device", "dtype"}


@dataclass
class LoopConfig:
    """Settings every KL-trained run shares; subclasses add what they train."""

    model: str = DEFAULT_MODEL
    saes: list[str] = field(default_factory=list)
    lr: float = 5e-5
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ctx: int = 128
    batch_size: int = 8  # sequences per optimizer step, across processes and accumulation
    grad_accum: int = 1
    tokens: int = 300_000  # training token budget (one pass over that many train-split tokens)
    max_steps: int | None = None
    max_minutes: float | None = None
    eval_every: int = 100  # steps between held-out CE evals of the spliced, trained model
    eval_tokens: int = 16_384
    checkpoint_every: int = 25
    seed: int = 0
    corpus: str = DEFAULT_CORPUS
    keep_first: bool = True
    device: str | None = None
    dtype: str | None = None

    def validate(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1:
            raise LorasaeError("--batch-size and --grad-accum must be positive")
        if self.batch_size % self.grad_accum:
            raise LorasaeError("--batch-size must be a multiple of --grad-accum")
        if self.eval_every < 1 or self.checkpoint_every < 1:
            raise LorasaeError("--eval-every and --checkpoint-every must be positive")


class Objective(ABC):
    """What a run trains. Built once the model and SAEs are loaded; owns the trainable module."""

    desc = "training"  # progress bar label

    @property
    @abstractmethod
    def module(self) -> torch.nn.Module:
        """The module accelerate prepares (and DDP wraps): it must own every trainable parameter."""

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @abstractmethod
    def loss(self, prepared: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Mean per-token KL(clean || spliced and trained) on ``ids``; ``prepared`` may be DDP-wrapped."""

    @abstractmethod
    def heldout_ce(self, sequences: torch.Tensor) -> float:
        """Held-out CE of the spliced, trained model: the number to watch during training."""

    @abstractmethod
    def evaluate(self, sequences: torch.Tensor) -> dict:
        """The full held-out evaluation (start and end of the run); its ``heldout_ce`` is the same
        number as ``heldout_ce()``."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights, for checkpoints."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    @abstractmethod
    def finish(self, out: Path, metrics: dict) -> None:
        """Write the result; the file that marks completion (see ``DONE_MARKERS``) goes last."""


def write_json_atomic(path: Path, data: dict) -> None:
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
    done = is_finished(out)
    if resume:
        if ckpt.exists():
            return torch.load(ckpt, map_location="cpu", weights_only=False)
        if done:
            raise LorasaeError(f"{out} holds a finished run; nothing to resume")
        return None
    if done or ckpt.exists():
        raise LorasaeError(f"{out} already holds a run; pass --resume or choose another --out")
    return None


def is_finished(out: Path) -> bool:
    return any((Path(out) / marker).exists() for marker in DONE_MARKERS)


def reuse_or_train(cfg: LoopConfig, out: Path, train: Callable[..., dict]) -> dict:
    """A finished run's metrics when ``out`` holds one with these settings; else ``train`` it,
    resuming an interrupted run (what `compare` and `sweep` do with each of their runs)."""
    out = Path(out)
    if is_finished(out):
        metrics = json.loads((out / METRICS_FILE).read_text())
        if metrics["config"] != asdict(cfg):
            raise LorasaeError(f"{out} holds a run with other settings; choose another --out")
        return metrics
    return train(cfg, out, resume=(out / CHECKPOINT_DIR).exists())


BuildObjective = Callable[[LoadedModel, list[LoadedSAE], object], Objective]


def run_loop(cfg: LoopConfig, build: BuildObjective, out: Path, resume: bool = False) -> dict:
    """Train ``build(lm, saes, accelerator)``'s objective on ``cfg``'s data; returns metrics.json's dict."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    cfg.validate()
    out = Path(out)
    state = _prepare_out(out, resume)
    if state is not None and state["config"] != asdict(cfg):
        changed = {k for k, v in asdict(cfg).items() if state["config"].get(k) != v}
        if changed - RESUMABLE_CHANGES:
            raise LorasaeError(f"--resume with different settings: {sorted(changed - RESUMABLE_CHANGES)}")
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
    torch.manual_seed(cfg.seed)  # initialisations draw from the global RNG
    objective = build(lm, saes, accelerator)
    if state is not None:
        objective.load_state_dict(state["weights"])
    trainable = objective.trainable()
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)

    train = packed_sequences(lm.tokenizer, "train", cfg.tokens, cfg.ctx, cfg.corpus)
    heldout = packed_sequences(lm.tokenizer, "heldout", cfg.eval_tokens, cfg.ctx, cfg.corpus)
    prepared, optimizer = accelerator.prepare(objective.module, optimizer)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    total_steps = train.shape[0] // micro // cfg.grad_accum
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
        metrics["start"] = objective.evaluate(heldout)
        write_json_atomic(out / METRICS_FILE, metrics)

    def checkpoint() -> None:
        if main:
            _save_checkpoint(out, {
                "config": asdict(cfg), "step": step, "elapsed": elapsed, "history": history,
                "metrics": metrics, "weights": objective.state_dict(),
                "optimizer": optimizer.state_dict()})
        accelerator.wait_for_everyone()

    prepared.train()
    bar = tqdm(total=total_steps, initial=step, desc=objective.desc, unit="step", disable=not main)
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
        with accelerator.accumulate(prepared), accelerator.autocast():
            loss = objective.loss(prepared, ids)
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
            eval_started = time.time()
            entry["heldout_ce"] = objective.heldout_ce(heldout)
            started += time.time() - eval_started  # evals are not training time
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
        metrics["final"] = objective.evaluate(heldout)
        metrics["train"] = {"steps": step, "tokens": step * tokens_per_step,
                            "seconds": round(elapsed, 2), "stop_reason": stop_reason,
                            "tokens_per_second": round(step * tokens_per_step / max(elapsed, 1e-9), 1),
                            "processes": accelerator.num_processes}
        write_json_atomic(out / METRICS_FILE, metrics)
        plot_training(metrics, out / PLOT_FILE, objective.desc)
        objective.finish(out, metrics)  # writes its completion marker last
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    accelerator.wait_for_everyone()
    return metrics
