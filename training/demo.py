"""`lorasae demo` (what `make demo` runs): the method end to end on the embedded default model.

Default SAE (trained and cached on first use) -> LoRA adapter trained around it (cached) -> held-out
before/after table, with the CPU-sized settings of ``lorasae.training.presets`` (rank 16, lr 1e-3
rather than the paper's rank 64 / lr 5e-5). The budget is a number of steps, not minutes, so the
cached adapter and its numbers are the same on any machine.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field

from lorasae.manifest import MANIFEST_FILE
from lorasae.paths import data_dir
from lorasae.saes import load_sae, sae_fingerprint

from .loop import CHECKPOINT_DIR, METRICS_FILE
from .presets import CPU_RANK, cpu_loop
from .train_lora import LoraTrainConfig, train_lora
from .train_sae import ensure_default_sae


@dataclass
class DemoConfig:
    """Settings of `lorasae demo`."""

    steps: int = field(
        default=100,
        metadata={  # 102,400 tokens: ~7 minutes on 2 CPU cores
            "help": "optimizer steps (x 1024 tokens) for the demo adapter"
        },
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


def run_demo(cfg: DemoConfig | None = None) -> dict:
    """Train (or reuse) the demo adapter around the default SAE; print and return before/after."""
    cfg = cfg or DemoConfig()
    sae_dir = str(ensure_default_sae())
    fingerprint = sae_fingerprint(load_sae(sae_dir).sae)
    out = data_dir() / "adapters" / f"demo-{fingerprint}-r{CPU_RANK}-{cfg.steps}steps"
    if not (out / MANIFEST_FILE).exists():
        loop = cpu_loop(cfg.steps, saes=[sae_dir], max_minutes=cfg.max_minutes, eval_every=25)
        train_lora(
            LoraTrainConfig(**asdict(loop), rank=CPU_RANK), out, resume=(out / CHECKPOINT_DIR).exists()
        )
    metrics = json.loads((out / METRICS_FILE).read_text())
    print(format_table(metrics["start"], metrics["final"]), flush=True)
    print(f"adapter: {out}\nplot: {out / 'training.png'}", file=sys.stderr)
    return {
        "adapter": str(out),
        "sae": sae_dir,
        "train": metrics["train"],
        "before": metrics["start"],
        "after": metrics["final"],
    }
