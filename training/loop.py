"""The training loop shared by `lorasae train` (LoRA-SAE) and `lorasae train-e2e` (e2e SAE baseline).

Both fit something to ``KL(p_clean || p_spliced)`` on the same packed data with the same schedule;
they differ only in *what* trains (LoRA matrices in the model, or the SAE itself) and in what is
saved at the end. That difference is an ``Objective``; everything else lives here once: accelerate
(DDP, mixed precision, gradient accumulation), the seeded data order, progress, periodic held-out
CE, atomic checkpoints and exact ``--resume``, metrics.json (with ``timings``: where the wall time
went besides training) and the training plot.

Each step starts from the residual after the objective's ``prefix_layer`` when it has one (layers no
training reaches): read from the residual cache (``training.residuals``; built on first use, shared
with `train-sae`) or, with ``residual_cache`` off, computed once per step for both passes. Exact:
the same loss as running the full model twice (tested). The lr follows ``LoopConfig.lr_at``.

``batch_size`` is the global number of sequences per optimizer step whatever the number of
processes or accumulation steps, so results do not depend on the hardware. Checkpoints hold only
what is needed to continue (trained weights, optimizer, step, history), are written atomically,
and ``--resume`` continues to the same result as an uninterrupted run: each micro-batch draws its
random numbers (dropout masks) from a seed derived from its index.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from tqdm.auto import tqdm

from lorasae.data import packed_sequences
from lorasae.errors import LorasaeError
from lorasae.files import write_atomic, write_json_atomic
from lorasae.models import LoadedModel, load_model
from lorasae.saes import LoadedSAE, resolve_saes
from lorasae.splice import SharedPrefix, residual_at

from .fields import (
    corpus_field,
    ctx_field,
    device_field,
    dtype_field,
    keep_first_field,
    model_field,
    saes_field,
)
from .plots import plot_training
from .residuals import ensure_residuals, load_clean_final, load_residuals
from .train_sae import ensure_default_sae

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
METRICS_FILE = "metrics.json"
PLOT_FILE = "training.png"
DONE_MARKERS = ("lorasae.json", "cfg.json")  # an adapter's manifest / a finished SAE's config
# Settings that may differ on --resume: they do not change what a step computes (``max_steps`` does,
# through a decaying schedule's horizon: ``_setup`` refuses that). The cache gives the same steps.
RESUMABLE_CHANGES = {
    "max_steps",
    "max_minutes",
    "eval_every",
    "checkpoint_every",
    "device",
    "dtype",
    "residual_cache",
}
Schedule = Literal["constant", "cosine", "linear"]


@dataclass
class LoopConfig:
    """Settings every KL-trained run shares; subclasses add what they train."""

    model: str = model_field()
    saes: list[str] = saes_field(
        "SAE to splice: sae-lens folder or release/sae_id (repeat for "
        "several layers; default: the embedded default SAE)"
    )
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate (AdamW)"})
    lr_schedule: Schedule = field(
        default="constant",
        metadata={"help": "after warm-up: constant (the paper's), or cosine/linear decay to --lr-end"},
    )
    warmup_steps: int = field(default=0, metadata={"help": "optimizer steps of linear warm-up from 0"})
    lr_end: float = field(
        default=0.1, metadata={"help": "a decaying schedule's last-step lr, as a fraction of --lr"}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    ctx: int = ctx_field()
    batch_size: int = field(
        default=8,
        metadata={"help": "sequences per optimizer step (global, whatever the processes/accumulation)"},
    )
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    tokens: int = field(
        default=300_000,
        metadata={"help": "training token budget (one pass over that many train-split tokens)"},
    )
    epochs: int = field(
        default=1, metadata={"help": "passes over the training tokens, each in its own seeded order"}
    )
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    max_minutes: float | None = field(
        default=None, metadata={"help": "stop after this many minutes of training"}
    )
    eval_every: int = field(
        default=100,
        metadata={"help": "steps between held-out CE evaluations (their time is not training time)"},
    )
    eval_tokens: int = field(default=16_384, metadata={"help": "held-out tokens per evaluation"})
    checkpoint_every: int = field(default=25, metadata={"help": "steps between checkpoints (--resume)"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation, data order and dropout"})
    corpus: str = corpus_field()
    eval_corpus: str | None = field(
        default=None,
        metadata={"help": "evaluate on this corpus's held-out split (out of domain; default: --corpus)"},
    )
    residual_cache: bool = field(
        default=True,
        metadata={
            "help": "without it, steps recompute the shared prefix instead of reading the residual "
            "after the first SAE's layer and the teacher's final states from the cache (exact either "
            "way; training/residuals.py)"
        },
    )
    keep_first: bool = keep_first_field()
    device: str | None = device_field()
    dtype: str | None = dtype_field()

    def validate(self) -> None:
        if self.epochs < 1:
            raise LorasaeError("--epochs must be positive")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise LorasaeError("--batch-size and --grad-accum must be positive")
        if self.batch_size % self.grad_accum:
            raise LorasaeError("--batch-size must be a multiple of --grad-accum")
        if self.eval_every < 1 or self.checkpoint_every < 1:
            raise LorasaeError("--eval-every and --checkpoint-every must be positive")
        if self.lr_schedule not in get_args(Schedule):
            raise LorasaeError(f"--lr-schedule must be one of {', '.join(get_args(Schedule))}")
        if self.warmup_steps < 0 or not 0 <= self.lr_end <= 1:
            raise LorasaeError("--warmup-steps must be >= 0 and --lr-end within [0, 1]")

    def lr_at(self, step: int, total_steps: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``: linear warm-up,
        then constant or a cosine/linear decay reaching ``lr * lr_end`` at the last step. A pure
        function of the step, so ``--resume`` needs no scheduler state."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, total_steps - 1 - self.warmup_steps)
        progress = min(progress, 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.lr_schedule == "cosine" else 1 - progress
        return self.lr * (self.lr_end + (1 - self.lr_end) * shape)


@dataclass
class StepStart:
    """What a step's passes start from besides the token ids: the residual after the objective's
    ``prefix_layer`` (both passes skip the layers up to it) and, from the cache, the clean
    model's final hidden states (the teacher's distribution without its layers)."""

    prefix: SharedPrefix | None = None
    clean_final: torch.Tensor | None = None


class Objective(ABC):
    """What a run trains. Built once the model and SAEs are loaded; owns the trainable module."""

    desc = "training"  # progress bar label

    @property
    @abstractmethod
    def module(self) -> torch.nn.Module:
        """The module accelerate prepares (and DDP wraps): it must own every trainable parameter."""

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @property
    def prefix_layer(self) -> int | None:
        """The last decoder layer whose output training cannot change (the clean and the trained
        pass agree up to it: the step computes it once, or reads it from the residual cache);
        None when training reaches the first layer."""
        return None

    def teacher(self) -> AbstractContextManager[object]:
        """While active, the model computes the clean (teacher) pass: no adapter."""
        return nullcontext()

    @abstractmethod
    def loss(self, prepared: torch.nn.Module, ids: torch.Tensor, start: StepStart) -> torch.Tensor:
        """Mean per-token KL(clean || spliced and trained) on ``ids``; ``prepared`` may be
        DDP-wrapped. ``start``: what the passes start from (see ``StepStart``)."""

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


def _prepare_out(out: Path, resume: bool) -> dict | None:
    """Refuse to overwrite finished or interrupted runs unless resuming; return the checkpoint."""
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
    resuming an interrupted run (what `compare` and `sweep` do with each of their runs). A run
    stopped by ``max_minutes`` keeps its checkpoint: asked again with only resumable settings
    changed (more minutes or steps), it goes on from there."""
    out = Path(out)
    resumable = (out / CHECKPOINT_DIR / CHECKPOINT_FILE).exists()
    if is_finished(out):
        metrics = json.loads((out / METRICS_FILE).read_text())
        if metrics["config"] == asdict(cfg):
            return metrics
        if not resumable or _changed(metrics["config"], cfg) - RESUMABLE_CHANGES:
            raise LorasaeError(f"{out} holds a run with other settings; choose another --out")
    return train(cfg, out, resume=resumable or (out / CHECKPOINT_DIR).exists())


def _changed(saved: dict, cfg: LoopConfig) -> set[str]:
    """The settings of ``cfg`` that differ from a saved run's."""
    return {k for k, v in asdict(cfg).items() if saved.get(k) != v}


BuildObjective = Callable[[LoadedModel, list[LoadedSAE], object], Objective]


@dataclass
class RunState:
    """A run's progress: what a checkpoint holds besides the weights, and ``--resume`` restores."""

    metrics: dict  # metrics.json so far: config, start evaluation, history
    step: int = 0  # optimizer steps done
    elapsed: float = 0.0  # training seconds so far (evaluations excluded)
    history: list[dict] = field(default_factory=list)

    def to_checkpoint(self, cfg: LoopConfig, weights: dict, optimizer: dict) -> dict:
        """The checkpoint's contents: this state, the settings, the trained weights, the optimizer."""
        return {
            "config": asdict(cfg),
            "step": self.step,
            "elapsed": self.elapsed,
            "history": self.history,
            "metrics": self.metrics,
            "weights": weights,
            "optimizer": optimizer,
        }

    @classmethod
    def from_checkpoint(cls, saved: dict) -> RunState:
        return cls(
            metrics=saved["metrics"], step=saved["step"], elapsed=saved["elapsed"], history=saved["history"]
        )


@dataclass
class _Run:
    """A run in progress: what ``run_loop``'s phases share."""

    cfg: LoopConfig
    out: Path
    accelerator: Any
    lm: LoadedModel  # its model is the one training changes (peft wraps it in place)
    objective: Objective
    prepared: torch.nn.Module  # the objective's module as accelerate prepared it (maybe DDP)
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    train: torch.Tensor  # packed training sequences
    heldout: torch.Tensor  # packed held-out sequences
    order: torch.Tensor  # the seeded order in which training sequences are drawn
    total_steps: int
    state: RunState
    residuals: torch.Tensor | None  # the residual cache of ``train`` (memory-mapped), when used
    finals: torch.Tensor | None  # and the clean final hidden states of ``train``
    started: float = 0.0  # the wall-clock time at which training time would be 0

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.ctx

    def start(self, rows: torch.Tensor, ids: torch.Tensor) -> StepStart:
        """What the step's passes share: the residual after the objective's ``prefix_layer`` and the
        teacher's final hidden states, read from the cache; or the residual computed once, without
        grad; or nothing (training reaches the first layer)."""
        layer = self.objective.prefix_layer
        if layer is None:
            return StepStart()
        if self.residuals is not None and self.finals is not None:
            residual, final = self.residuals[rows].to(ids.device), self.finals[rows].to(ids.device)
            return StepStart(SharedPrefix(layer, residual), final)
        return StepStart(SharedPrefix(layer, residual_at(self.lm.model, layer, ids)))


def _setup(cfg: LoopConfig, build: BuildObjective, out: Path, resume: bool) -> _Run:
    """Check ``out`` (and a checkpoint's settings), load the model, SAEs and data, build the
    objective and optimizer, restore the checkpoint; evaluate the start unless it is restored."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    called = time.time()
    cfg.validate()
    saved = _prepare_out(out, resume)
    if saved is not None and saved["config"] != asdict(cfg):
        changed = _changed(saved["config"], cfg)
        if changed - RESUMABLE_CHANGES:
            raise LorasaeError(f"--resume with different settings: {sorted(changed - RESUMABLE_CHANGES)}")
        if "max_steps" in changed and (cfg.lr_schedule != "constant" or cfg.warmup_steps):
            raise LorasaeError("--max-steps sets the lr schedule's length: it cannot change on --resume")
    out.mkdir(parents=True, exist_ok=True)

    device = None if cfg.device is None else torch.device(cfg.device)
    use_cuda = (device or torch.device("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision="bf16" if use_cuda else "no",
        cpu=not use_cuda,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    micro = cfg.batch_size // cfg.grad_accum
    if micro % accelerator.num_processes:
        raise LorasaeError(
            f"--batch-size/--grad-accum ({micro}) must be a multiple of the "
            f"{accelerator.num_processes} processes"
        )

    # Weights stay fp32 for training (bf16 autocast on CUDA comes from accelerate).
    lm = load_model(cfg.model, accelerator.device, cfg.dtype or "float32")
    saes = resolve_saes(lm, cfg.saes, cfg.model, ensure_default_sae)
    torch.manual_seed(cfg.seed)  # initialisations draw from the global RNG
    objective = build(lm, saes, accelerator)
    if saved is not None:
        objective.load_state_dict(saved["weights"])
    trainable = objective.trainable()
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)

    train = packed_sequences(lm.tokenizer, "train", cfg.tokens, cfg.ctx, cfg.corpus)
    heldout = packed_sequences(
        lm.tokenizer, "heldout", cfg.eval_tokens, cfg.ctx, cfg.eval_corpus or cfg.corpus
    )
    residuals = finals = None
    if objective.prefix_layer is not None and cfg.residual_cache:
        # the main process builds the cache, the others read it; the teacher is the clean model
        with accelerator.main_process_first(), objective.teacher():
            cached = ensure_residuals(lm, objective.prefix_layer, train, cfg.corpus, clean_final=True)
        residuals = load_residuals(cached, train.shape[0])
        finals = load_clean_final(cached, train.shape[0])
    prepared, optimizer = accelerator.prepare(objective.module, optimizer)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
    per_epoch = train.shape[0] // micro // cfg.grad_accum  # steps; the remainder rows sit out
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.cat(
        [
            torch.randperm(train.shape[0], generator=generator)[: per_epoch * cfg.batch_size]
            for _ in range(cfg.epochs)
        ]
    )
    total_steps = per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    if total_steps < 1:
        raise LorasaeError("the token budget gives no full optimizer step; raise --tokens")

    state = RunState.from_checkpoint(saved) if saved else RunState(metrics={})
    state.metrics["config"] = asdict(cfg)  # resumed: the settings it goes on with (resumable ones)
    run = _Run(
        cfg,
        out,
        accelerator,
        lm,
        objective,
        prepared,
        trainable,
        optimizer,
        train,
        heldout,
        order,
        total_steps,
        state,
        residuals,
        finals,
    )
    timings = state.metrics.setdefault("timings", {})
    timings["setup"] = round(time.time() - called, 1)  # loading, data, residual cache (this call)
    if run.main and "start" not in state.metrics:
        eval_started = time.time()
        state.metrics["start"] = objective.evaluate(heldout)
        timings["start_eval"] = round(time.time() - eval_started, 1)
        write_json_atomic(out / METRICS_FILE, state.metrics)
    return run


def _train_step(run: _Run) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; returns its loss (mean over them).

    The global micro-batch ``i`` and its random numbers are fixed by the seed, whatever the
    number of processes (each takes its slice) and whether the run was resumed."""
    cfg, accelerator = run.cfg, run.accelerator
    micro = cfg.batch_size // cfg.grad_accum
    per_process = micro // accelerator.num_processes
    first = accelerator.process_index * per_process
    step_loss = 0.0
    for group in run.optimizer.param_groups:
        group["lr"] = cfg.lr_at(run.state.step, run.total_steps)
    for micro_index in range(run.state.step * cfg.grad_accum, (run.state.step + 1) * cfg.grad_accum):
        rows = run.order[micro_index * micro : (micro_index + 1) * micro][first : first + per_process]
        ids = run.train[rows].to(accelerator.device)
        torch.manual_seed(
            cfg.seed * 1_000_003 + micro_index * accelerator.num_processes + accelerator.process_index
        )
        with accelerator.accumulate(run.prepared), accelerator.autocast():
            loss = run.objective.loss(run.prepared, ids, run.start(rows, ids))
            accelerator.backward(loss)
            if accelerator.sync_gradients:  # the step's last micro-batch
                accelerator.clip_grad_norm_(run.trainable, cfg.grad_clip)
            run.optimizer.step()
            run.optimizer.zero_grad()
        step_loss += float(accelerator.reduce(loss.detach(), reduction="mean")) / cfg.grad_accum
    run.state.step += 1
    run.state.elapsed = time.time() - run.started
    return step_loss


def _record(run: _Run, train_kl: float) -> None:
    """The step's history entry; every ``eval_every`` steps (but the last, which ``_finish``
    evaluates in full) with the held-out CE, whose time does not count as training time."""
    state = run.state
    entry = {
        "step": state.step,
        "tokens": state.step * run.tokens_per_step,
        "seconds": round(state.elapsed, 2),
        "train_kl": train_kl,
        "lr": run.cfg.lr_at(state.step - 1, run.total_steps),
    }
    if run.main and state.step % run.cfg.eval_every == 0 and state.step < run.total_steps:
        eval_started = time.time()
        entry["heldout_ce"] = run.objective.heldout_ce(run.heldout)
        run.started += time.time() - eval_started
        timings = state.metrics["timings"]
        timings["evals_during_training"] = round(
            timings.get("evals_during_training", 0.0) + time.time() - eval_started, 1
        )
    state.history.append(entry)


def _checkpoint(run: _Run) -> None:
    """What ``--resume`` needs, in one file written atomically: a kill at any moment leaves the
    previous checkpoint intact."""
    state = run.state
    state.metrics["history"] = state.history
    if run.main:
        saved = state.to_checkpoint(run.cfg, run.objective.state_dict(), run.optimizer.state_dict())
        write_atomic(run.out / CHECKPOINT_DIR / CHECKPOINT_FILE, lambda tmp: torch.save(saved, tmp))
    run.accelerator.wait_for_everyone()


def _finish(run: _Run, stop_reason: str) -> dict:
    """The final evaluation, metrics.json, the plot, the objective's result (its completion marker
    last); then the checkpoint goes."""
    state, metrics = run.state, run.state.metrics
    if run.main:
        tokens = state.step * run.tokens_per_step
        eval_started = time.time()
        metrics["final"] = run.objective.evaluate(run.heldout)
        metrics["timings"]["final_eval"] = round(time.time() - eval_started, 1)
        metrics["train"] = {
            "steps": state.step,
            "tokens": tokens,
            "seconds": round(state.elapsed, 2),
            "stop_reason": stop_reason,
            "tokens_per_second": round(tokens / max(state.elapsed, 1e-9), 1),
            "processes": run.accelerator.num_processes,
        }
        write_json_atomic(run.out / METRICS_FILE, metrics)
        plot_training(metrics, run.out / PLOT_FILE, run.objective.desc)
        run.objective.finish(run.out, metrics)
        if stop_reason != "max minutes":  # a run stopped by time can go on (`--resume`, more minutes)
            shutil.rmtree(run.out / CHECKPOINT_DIR, ignore_errors=True)
    run.accelerator.wait_for_everyone()
    return metrics


def run_loop(cfg: LoopConfig, build: BuildObjective, out: Path, resume: bool = False) -> dict:
    """Train ``build(lm, saes, accelerator)``'s objective on ``cfg``'s data; returns metrics.json's
    dict. Stops at the token budget, ``max_steps`` or ``max_minutes`` (``train.stop_reason``)."""
    run = _setup(cfg, build, Path(out), resume)
    state = run.state
    stop_reason = (
        "max steps" if cfg.max_steps is not None and run.total_steps == cfg.max_steps else "token budget"
    )
    run.prepared.train()
    bar = tqdm(
        total=run.total_steps, initial=state.step, desc=run.objective.desc, unit="step", disable=not run.main
    )
    running = None
    run.started = time.time() - state.elapsed
    while state.step < run.total_steps:
        if cfg.max_minutes is not None and state.elapsed >= cfg.max_minutes * 60:
            stop_reason = "max minutes"
            break
        train_kl = _train_step(run)
        running = train_kl if running is None else 0.9 * running + 0.1 * train_kl
        bar.set_postfix(kl=f"{running:.4f}")
        bar.update(1)
        _record(run, train_kl)
        if state.step % cfg.checkpoint_every == 0 or state.step == run.total_steps:
            _checkpoint(run)
    bar.close()
    _checkpoint(run)  # a finish cut short by a kill resumes from here
    return _finish(run, stop_reason)
