"""`lorasae demo` (what `make demo` runs): the method end to end on the embedded default model.

Default SAE (trained and cached on first use; its collected activations become the residual cache)
-> LoRA adapter trained around it from that cache (cached) -> held-out before/after table, with the
CPU-sized settings of ``lorasae.training.presets`` (rank 16, a warmed-up, decaying lr well above
the paper's 5e-5), then where the time went. The budget is a number of steps, not minutes, so the
cached adapter and its numbers are the same on any machine.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorasae.manifest import MANIFEST_FILE
from lorasae.paths import data_dir
from lorasae.saes import SAE_CONFIG_FILE, load_sae, sae_fingerprint

from .loop import CHECKPOINT_DIR, METRICS_FILE
from .presets import CPU_RANK, DEMO_EVAL_TOKENS, DEMO_STEPS, cpu_loop
from .train_lora import LoraTrainConfig, train_lora
from .train_sae import SAE_TRAINING_FILE, SaeTrainingConfig, ensure_default_sae


@dataclass
class DemoConfig:
    """Settings of `lorasae demo`."""

    steps: int = field(
        default=DEMO_STEPS, metadata={"help": "optimizer steps (x 1024 tokens) for the demo adapter"}
    )
    max_minutes: float | None = field(default=None, metadata={"help": "stop the demo training early"})


def format_table(start: dict, final: dict) -> str:
    clean = start["ce_clean"]
    rows = [
        ("clean model", clean),
        ("SAE spliced", start["ce_spliced"]),
        ("SAE spliced + LoRA adapter", final["ce_adapted_spliced"]),
        ("LoRA adapter alone (no SAE)", final["ce_adapted_clean"]),
    ]
    lines = [f"{'held-out CE (nats)':<30}{'CE':>8}{'vs clean':>10}"]
    lines += [f"{name:<30}{ce:>8.4f}{ce - clean:>+10.4f}" for name, ce in rows]
    lines.append(
        f"gap closed by the adapter: {final['gap_closed']:.1%}   "
        f"(KL spliced {start['kl_spliced']:.4f} -> {final['kl_adapted_spliced']:.4f})"
    )
    return "\n".join(lines)


def format_timings(rows: list[tuple[str, float | None]], total: float) -> str:
    """Where the demo's wall time went: a line per part (None: done by an earlier run, cached)."""
    lines = ["where the time went (this run):"]
    for name, seconds in rows:
        shown = "cached" if seconds is None else f"{seconds:7.1f} s"
        lines.append(f"  {name:<52}{shown:>10}")
    lines.append(f"  {'total (wall clock, model loading included)':<52}{total:7.1f} s")
    return "\n".join(lines)


def demo_config(cfg: DemoConfig, sae_dir: str) -> LoraTrainConfig:
    return LoraTrainConfig(
        **asdict(
            cpu_loop(
                cfg.steps,
                saes=[sae_dir],
                max_minutes=cfg.max_minutes,
                eval_every=cfg.steps,  # the start and the end only
                eval_tokens=DEMO_EVAL_TOKENS,
            )
        ),
        rank=CPU_RANK,
    )


def adapter_dir(train_cfg: LoraTrainConfig, fingerprint: str) -> Path:
    """The demo adapter's cache folder: the SAE's fingerprint and a hash of the training recipe,
    so a changed recipe never reuses an adapter trained with another one."""
    recipe = {k: v for k, v in asdict(train_cfg).items() if k not in ("saes", "max_minutes")}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    return (
        data_dir() / "adapters" / f"demo-{fingerprint}-r{train_cfg.rank}-{train_cfg.max_steps}steps-{digest}"
    )


def run_demo(cfg: DemoConfig | None = None) -> dict:
    """Train (or reuse) the demo adapter around the default SAE; print and return before/after."""
    cfg = cfg or DemoConfig()
    started = time.time()
    sae_now = not (SaeTrainingConfig().default_dir() / SAE_CONFIG_FILE).exists()  # trained in this run
    sae_dir = ensure_default_sae()
    fingerprint = sae_fingerprint(load_sae(str(sae_dir)).sae)
    train_cfg = demo_config(cfg, str(sae_dir))
    out = adapter_dir(train_cfg, fingerprint)
    trained_now = not (out / MANIFEST_FILE).exists()
    if trained_now:
        train_lora(train_cfg, out, resume=(out / CHECKPOINT_DIR).exists())
    metrics = json.loads((out / METRICS_FILE).read_text())
    print(format_table(metrics["start"], metrics["final"]), flush=True)
    timings = _timings(metrics, sae_dir, sae_now, trained_now)
    print(format_timings(timings, time.time() - started), file=sys.stderr)
    print(f"adapter: {out}\nplot: {out / 'training.png'}", file=sys.stderr)
    return {
        "adapter": str(out),
        "sae": str(sae_dir),
        "train": metrics["train"],
        "timings": dict(timings),
        "seconds": round(time.time() - started, 1),
        "before": metrics["start"],
        "after": metrics["final"],
    }


def _timings(
    metrics: dict, sae_dir: Path, sae_now: bool, adapter_now: bool
) -> list[tuple[str, float | None]]:
    sae = json.loads((sae_dir / SAE_TRAINING_FILE).read_text())
    run = metrics.get("timings", {})

    def now(flag: bool, seconds: float | None) -> float | None:
        return seconds if flag else None

    return [
        ("SAE: collecting activations (= the residual cache)", now(sae_now, sae["seconds_collecting"])),
        ("SAE: training (sae-lens)", now(sae_now, sae["seconds_training"])),
        ("adapter: loading model, data, teacher cache", now(adapter_now, run.get("setup"))),
        ("adapter: base evaluation (clean, spliced, zero-ablated)", now(adapter_now, run.get("start_eval"))),
        ("adapter: training", now(adapter_now, metrics["train"]["seconds"])),
        ("adapter: held-out CE during training", now(adapter_now, run.get("evals_during_training", 0.0))),
        ("adapter: final evaluation", now(adapter_now, run.get("final_eval"))),
    ]
