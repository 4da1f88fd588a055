"""`lorasae compare`: LoRA-SAE vs the e2e SAE baseline, same data, same machine, same process.

Both runs use the same loop (``lorasae.training.loop``), data order, batch and context, and record
held-out CE against training seconds and tokens (evaluation time excluded). The e2e run's final
held-out CE is the target; the time each run needs to first reach it (linear interpolation between
evaluations) gives the speed-up, as in the paper. With ``--e2e-init scratch`` the fair LoRA-SAE
time also includes training the given SAE (read from its ``lorasae_sae_training.json`` when
`lorasae train-sae` made it), and that ratio is reported too.

Runs go to ``<out>/lora`` and ``<out>/e2e``; a finished run is reused, an interrupted one resumed,
so the command can be re-run after a kill. Results: ``<out>/compare.json`` and ``<out>/compare.png``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from lorasae.errors import LorasaeError
from lorasae.files import write_json_atomic
from lorasae.models import DEFAULT_MODEL

from .loop import LoopConfig, reuse_or_train
from .plots import plot_compare
from .presets import CPU_RANK, cpu_loop
from .train_e2e import E2eTrainConfig, train_e2e
from .train_lora import AdaptedLayers, LoraTrainConfig, train_lora
from .train_sae import ensure_default_sae

COMPARE_FILE = "compare.json"
COMPARE_PLOT = "compare.png"


@dataclass
class CompareConfig:
    """The shared data/schedule (``loop``) plus what differs between the two runs."""

    loop: LoopConfig = field(default_factory=lambda: cpu_loop(150, eval_every=10, eval_tokens=8192))
    rank: int = field(default=CPU_RANK, metadata={"help": "LoRA rank"})
    layers: AdaptedLayers = field(
        default="after",
        metadata={"help": "adapt only the layers after the SAE (the paper's main runs) or all"},
    )
    e2e_lr: float = field(default=5e-4, metadata={"help": "e2e SAE learning rate"})
    e2e_init: Literal["finetune", "scratch"] = field(
        default="finetune",
        metadata={"help": "the e2e SAE starts from the given SAE's weights or from a fresh initialisation"},
    )

    def lora(self) -> LoraTrainConfig:
        return LoraTrainConfig(**asdict(self.loop), rank=self.rank, layers=self.layers)

    def e2e(self) -> E2eTrainConfig:
        return E2eTrainConfig(**{**asdict(self.loop), "lr": self.e2e_lr}, init=self.e2e_init)


# `--preset paper`: the paper's run (rank 64, lr 5e-5, batch 1 x ctx 1024, 15M tokens, LoRA after the
# SAE; for a GPU), by field path of CompareConfig; fields given on the command line win over it.
PAPER_PRESET: dict[str, Any] = {
    "rank": 64,
    "layers": "after",
    "loop.lr": 5e-5,
    "loop.ctx": 1024,
    "loop.batch_size": 1,
    "loop.tokens": 15_000_000,
    "loop.max_steps": None,
    "loop.eval_every": 500,
    "loop.eval_tokens": 1_000_000,
}
PRESETS = {"paper": PAPER_PRESET}


def curve(metrics: dict) -> list[dict]:
    """Held-out CE of the trained, spliced model at 0 s, at every evaluation, and at the end."""
    points = [{"seconds": 0.0, "tokens": 0, "ce": metrics["start"]["heldout_ce"]}]
    points += [
        {"seconds": h["seconds"], "tokens": h["tokens"], "ce": h["heldout_ce"]}
        for h in metrics["history"]
        if "heldout_ce" in h
    ]
    points.append(
        {
            "seconds": metrics["train"]["seconds"],
            "tokens": metrics["train"]["tokens"],
            "ce": metrics["final"]["heldout_ce"],
        }
    )
    return points


def time_to_reach(points: list[dict], target: float, key: str = "seconds") -> float | None:
    """First ``key`` at which the curve reaches ``target`` (linear between points); None if never."""
    if points[0]["ce"] <= target:
        return 0.0
    for a, b in zip(points, points[1:]):
        if b["ce"] <= target:
            frac = (a["ce"] - target) / (a["ce"] - b["ce"])
            return a[key] + frac * (b[key] - a[key])
    return None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None:
        return None
    return num / den if den > 0 else float("inf")


def sae_training_seconds(sae_dir: str) -> float | None:
    """Wall time `lorasae train-sae` spent on the SAE (collecting + training), when it recorded it."""
    from .train_sae import SAE_TRAINING_FILE

    record = Path(sae_dir) / SAE_TRAINING_FILE
    if not record.is_file():
        return None
    data = json.loads(record.read_text())
    return float(data["seconds_collecting"]) + float(data["seconds_training"])


def summarise(cfg: CompareConfig, lora: dict, e2e: dict, sae_seconds: float | None) -> dict:
    """The comparison's numbers from the two runs' metrics (pure: tested on its own)."""
    lora_curve, e2e_curve = curve(lora), curve(e2e)
    target = e2e["final"]["heldout_ce"]
    lora_s, e2e_s = time_to_reach(lora_curve, target), time_to_reach(e2e_curve, target)
    lora_t = time_to_reach(lora_curve, target, "tokens")
    e2e_t = time_to_reach(e2e_curve, target, "tokens")
    result = {
        "config": asdict(cfg),
        "ce_clean": lora["start"]["ce_clean"],
        "ce_spliced": lora["start"]["ce_spliced"],
        "target_ce": target,
        "lora": {
            "final_ce": lora["final"]["heldout_ce"],
            "gap_closed": lora["final"]["gap_closed"],
            "ce_adapted_clean": lora["final"]["ce_adapted_clean"],
            "train": lora["train"],
            "seconds_to_target": lora_s,
            "tokens_to_target": lora_t,
            "curve": lora_curve,
        },
        "e2e": {
            "init": cfg.e2e_init,
            "final_ce": target,
            "start_ce": e2e["start"]["heldout_ce"],
            "l0": e2e["final"]["l0"],
            "explained_variance": e2e["final"]["explained_variance"],
            "train": e2e["train"],
            "seconds_to_target": e2e_s,
            "tokens_to_target": e2e_t,
            "curve": e2e_curve,
        },
        "speedup": _ratio(e2e_s, lora_s),
        "speedup_tokens": _ratio(e2e_t, lora_t),
        "sae_training_seconds": sae_seconds,
        "speedup_including_sae_training": _ratio(
            e2e_s, None if lora_s is None or sae_seconds is None else lora_s + sae_seconds
        ),
    }
    if lora_s is None:
        result["note"] = (
            f"LoRA-SAE did not reach the e2e CE {target:.4f} within its budget "
            f"(its best: {min(p['ce'] for p in lora_curve):.4f}); raise --max-steps"
        )
    return result


def run_compare(cfg: CompareConfig, out: Path) -> dict:
    if cfg.loop.model == DEFAULT_MODEL and not cfg.loop.saes:
        cfg = replace(cfg, loop=replace(cfg.loop, saes=[str(ensure_default_sae())]))
    if len(cfg.loop.saes) != 1:
        raise LorasaeError("compare takes one --sae (the e2e baseline trains one SAE)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lora = reuse_or_train(cfg.lora(), out / "lora", train_lora)
    e2e = reuse_or_train(cfg.e2e(), out / "e2e", train_e2e)
    result = summarise(cfg, lora, e2e, sae_training_seconds(cfg.loop.saes[0]))
    write_json_atomic(out / COMPARE_FILE, result)
    plot_compare(result, out / COMPARE_PLOT)
    return result
