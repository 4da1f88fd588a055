"""`lorasae compare`: LoRA-SAE vs the e2e SAE baseline, same data, same machine, same process.

Both runs use the same loop (``lorasae.training.loop``), data, batch and context, and record
held-out CE against training seconds and tokens (evaluation time excluded). Two targets, each read
off the curves (the first time a curve reaches the CE, linear interpolation between evaluations):

- ``e2e_final``: the e2e run's final held-out CE, as in the paper. The time each run needs to reach
  it gives the speed-up (``speedup``, ``speedup_tokens``: the top-level keys are this target's).
- ``lora_final``: LoRA-SAE's final held-out CE. An e2e SAE trained from scratch needs far more
  steps than LoRA-SAE and often does not reach it within the time given: then the speed-up is a
  *lower bound* (``lower_bound: true``), e2e's training seconds so far / LoRA-SAE's seconds.

With ``--e2e-init scratch`` the fair LoRA-SAE time also includes training the given SAE (read from
its ``lorasae_sae_training.json`` when `lorasae train-sae` made it): ``speedup_including_sae_training``.

``--e2e-max-steps`` / ``--e2e-max-minutes`` give the e2e run its own, longer, limits. A step limit
is reached with more epochs over LoRA-SAE's tokens (each epoch in its own seeded order), so both
runs see the same data and share one residual cache. ``max_minutes`` is a run's total training time
across re-runs, and a run stopped by it keeps its checkpoint: re-running with a larger
``--e2e-max-minutes`` and the same ``--e2e-max-steps`` continues the e2e run where it stopped
(``reuse_or_train`` in ``loop.py``), so a long from-scratch run (``--e2e-max-steps`` large, minutes
the real limit) can be spread over several invocations, tightening the lower bound each time. A
different ``--e2e-max-steps`` is a different schedule, i.e. another run (another ``--out``).

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
    e2e_max_steps: int | None = field(
        default=None,
        metadata={
            "help": "optimizer steps of the e2e run instead of --max-steps, as more epochs over the "
            "same tokens (keep it when continuing with more minutes): an e2e SAE from scratch needs "
            "far more steps than LoRA-SAE"
        },
    )
    e2e_max_minutes: float | None = field(
        default=None,
        metadata={
            "help": "total training minutes of the e2e run (across re-runs) instead of --max-minutes; "
            "re-run with a larger value to continue an e2e run it stopped from its checkpoint"
        },
    )

    def lora(self) -> LoraTrainConfig:
        return LoraTrainConfig(**asdict(self.loop), rank=self.rank, layers=self.layers)

    def e2e_loop(self) -> LoopConfig:
        """The shared loop with the e2e run's own limits (``e2e_max_steps``, ``e2e_max_minutes``)."""
        loop = self.loop
        if self.e2e_max_steps is not None:  # more epochs over LoRA-SAE's tokens (and residual cache)
            per_epoch = max(1, loop.tokens // loop.ctx // loop.batch_size)
            epochs = -(-self.e2e_max_steps // per_epoch)
            loop = replace(loop, max_steps=self.e2e_max_steps, epochs=max(loop.epochs, epochs))
        if self.e2e_max_minutes is not None:
            loop = replace(loop, max_minutes=self.e2e_max_minutes)
        return loop

    def e2e(self) -> E2eTrainConfig:
        return E2eTrainConfig(**{**asdict(self.e2e_loop()), "lr": self.e2e_lr}, init=self.e2e_init)

    def validate(self) -> None:
        if self.e2e_max_steps is not None and self.e2e_max_steps < 1:
            raise LorasaeError("--e2e-max-steps must be positive")
        if self.e2e_max_minutes is not None and not self.e2e_max_minutes > 0:
            raise LorasaeError("--e2e-max-minutes must be positive")


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
    """``num / den``; None when either is unknown, or when ``den`` is 0 (LoRA-SAE starts at the
    target: the target's ``lora_starts_there`` says so; JSON has no infinity)."""
    if num is None or den is None or den <= 0:
        return None
    return num / den


SAE_SECONDS_KEYS = ("seconds_caching", "seconds_collecting", "seconds_training")


def sae_training_seconds(sae_dir: str) -> float | None:
    """Wall time `lorasae train-sae` spent on the SAE (the sum of whichever of caching, collecting
    and training it recorded), when it recorded any."""
    from .train_sae import SAE_TRAINING_FILE

    record = Path(sae_dir) / SAE_TRAINING_FILE
    if not record.is_file():
        return None
    data = json.loads(record.read_text())
    seconds = [float(data[key]) for key in SAE_SECONDS_KEYS if data.get(key) is not None]
    return sum(seconds) if seconds else None


def _seconds(x: float) -> str:
    return f"{x:.1f} s" if x < 10 else f"{x:.0f} s"


def _target(
    name: str, ce: float, lora_curve: list[dict], e2e_curve: list[dict], sae_seconds: float | None
) -> dict:
    """One target CE: when each run first reached it and the speed-ups. When the e2e run never
    reached it, its training so far is a lower bound on its time to it, and so are the ratios."""
    lora_s, e2e_s = time_to_reach(lora_curve, ce), time_to_reach(e2e_curve, ce)
    lora_t, e2e_t = time_to_reach(lora_curve, ce, "tokens"), time_to_reach(e2e_curve, ce, "tokens")
    lower_bound = e2e_s is None and lora_s is not None
    e2e_at_least = e2e_curve[-1]["seconds"] if lower_bound else e2e_s
    e2e_tokens_at_least = e2e_curve[-1]["tokens"] if lower_bound else e2e_t
    lora_incl = None if lora_s is None or sae_seconds is None else lora_s + sae_seconds
    return {
        "name": name,
        "ce": ce,
        "lora_seconds": lora_s,
        "e2e_seconds": e2e_s,
        "lora_tokens": lora_t,
        "e2e_tokens": e2e_t,
        "speedup": _ratio(e2e_at_least, lora_s),
        "speedup_tokens": _ratio(e2e_tokens_at_least, lora_t),
        "speedup_including_sae_training": _ratio(e2e_at_least, lora_incl),
        "lower_bound": lower_bound,
        "lora_starts_there": lora_s == 0.0,  # the given SAE already is at the target: no finite ratio
    }


def _target_note(target: dict, lora_curve: list[dict], e2e_curve: list[dict], e2e_stop: str | None) -> str:
    """What was and was not reached, in words."""
    what = {"e2e_final": "the e2e run's final CE", "lora_final": "LoRA-SAE's final CE"}[target["name"]]
    ce, lora_s, e2e_s = target["ce"], target["lora_seconds"], target["e2e_seconds"]
    lora_done, e2e_done = lora_curve[-1]["seconds"], e2e_curve[-1]["seconds"]
    lora_best, e2e_best = min(p["ce"] for p in lora_curve), min(p["ce"] for p in e2e_curve)
    if lora_s is None:
        return (
            f"LoRA-SAE did not reach {what} {ce:.4f} within its {_seconds(lora_done)} of training "
            f"(its best: {lora_best:.4f}); no speed-up to this CE (raise --max-steps)"
        )
    if e2e_s is None:
        stop = f", stopped by {e2e_stop}" if e2e_stop else ""
        tighten = (
            "continuing the e2e run (re-run with a larger --e2e-max-minutes, the same --e2e-max-steps)"
            if e2e_stop == "max minutes"
            else "a longer e2e run (a larger --e2e-max-steps, in another --out)"
        )
        return (
            f"the e2e run did not reach {what} {ce:.4f} within its {_seconds(e2e_done)} of training "
            f"(its best: {e2e_best:.4f}{stop}); LoRA-SAE first reached it after {_seconds(lora_s)}. "
            f"The speed-ups are lower bounds: e2e's training seconds so far / LoRA-SAE's (plus the "
            f"SAE's training, where known); {tighten} would tighten them."
        )
    return (
        f"both runs reached {what} {ce:.4f}: LoRA-SAE after {_seconds(lora_s)}, "
        f"the e2e run after {_seconds(e2e_s)}"
    )


def summarise(cfg: CompareConfig, lora: dict, e2e: dict, sae_seconds: float | None) -> dict:
    """The comparison's numbers from the two runs' metrics (pure: tested on its own).

    The top-level ``target_ce``, ``speedup``, ``speedup_tokens``, ``speedup_including_sae_training``
    and the runs' ``seconds_to_target`` / ``tokens_to_target`` are the ``e2e_final`` target's;
    ``targets`` holds both targets (``e2e_final``, ``lora_final``), each with its ``note``."""
    lora_curve, e2e_curve = curve(lora), curve(e2e)
    target = e2e["final"]["heldout_ce"]
    lora_final = lora["final"]["heldout_ce"]
    e2e_stop = e2e["train"].get("stop_reason")
    targets = [
        _target("e2e_final", target, lora_curve, e2e_curve, sae_seconds),
        _target("lora_final", lora_final, lora_curve, e2e_curve, sae_seconds),
    ]
    for t in targets:
        t["note"] = _target_note(t, lora_curve, e2e_curve, e2e_stop)
    at_e2e = targets[0]
    result = {
        "config": asdict(cfg),
        "ce_clean": lora["start"]["ce_clean"],
        "ce_spliced": lora["start"]["ce_spliced"],
        "target_ce": target,
        "lora": {
            "final_ce": lora_final,
            "best_ce": min(p["ce"] for p in lora_curve),
            "gap_closed": lora["final"]["gap_closed"],
            "ce_adapted_clean": lora["final"]["ce_adapted_clean"],
            "train": lora["train"],
            "seconds_to_target": at_e2e["lora_seconds"],
            "tokens_to_target": at_e2e["lora_tokens"],
            "curve": lora_curve,
        },
        "e2e": {
            "init": cfg.e2e_init,
            "final_ce": target,
            "best_ce": min(p["ce"] for p in e2e_curve),
            "start_ce": e2e["start"]["heldout_ce"],
            "l0": e2e["final"]["l0"],
            "explained_variance": e2e["final"]["explained_variance"],
            "train": e2e["train"],
            "seconds_to_target": at_e2e["e2e_seconds"],
            "tokens_to_target": at_e2e["e2e_tokens"],
            "reached_lora_final_ce": targets[1]["e2e_seconds"] is not None,
            "curve": e2e_curve,
        },
        "speedup": at_e2e["speedup"],
        "speedup_tokens": at_e2e["speedup_tokens"],
        "sae_training_seconds": sae_seconds,
        "speedup_including_sae_training": at_e2e["speedup_including_sae_training"],
        "targets": targets,
    }
    if at_e2e["lora_seconds"] is None:
        result["note"] = (
            f"LoRA-SAE did not reach the e2e CE {target:.4f} within its budget "
            f"(its best: {result['lora']['best_ce']:.4f}); raise --max-steps"
        )
    return result


def _speed(x: float | None, bound: bool, starts_there: bool = False) -> str:
    if x is None:
        return "unbounded (LoRA-SAE starts there)" if starts_there else "no speed-up"
    return f"{'>= ' if bound else ''}{x:.1f}x"


def format_compare(result: dict) -> str:
    """The human summary of ``summarise``'s result: one line per target (what `lorasae compare`
    prints on stderr before the JSON)."""
    lora, e2e = result["lora"], result["e2e"]

    def trained(train: dict) -> str:
        steps = f"{train['steps']} steps, " if "steps" in train else ""
        stop = f", stopped by {train['stop_reason']}" if train.get("stop_reason") else ""
        return f"{steps}{_seconds(train['seconds'])}{stop}"

    lines = [
        f"LoRA-SAE ({trained(lora['train'])}) vs e2e SAE ({e2e['init']}, {trained(e2e['train'])}); "
        f"held-out CE: clean {result['ce_clean']:.4f}, given SAE spliced {result['ce_spliced']:.4f}"
    ]
    labels = {"e2e_final": "same CE as e2e's final", "lora_final": "LoRA-SAE's final CE"}
    for t in result.get("targets", []):
        bound = t["lower_bound"]
        if t["lora_seconds"] is None:
            lora_part = f"LoRA-SAE not reached after {_seconds(lora['train']['seconds'])}"
        else:
            lora_part = f"LoRA-SAE {_seconds(t['lora_seconds'])}"
        if t["e2e_seconds"] is None:
            e2e_part = f"e2e not reached after {_seconds(e2e['train']['seconds'])}"
        else:
            e2e_part = f"e2e {_seconds(t['e2e_seconds'])}"
        speed = _speed(t["speedup"], bound, t["lora_starts_there"])
        line = f"{labels[t['name']]} ({t['ce']:.4f}): {lora_part}, {e2e_part} -> {speed}"
        if t["speedup_including_sae_training"] is not None:
            line += f" (incl. SAE training {_speed(t['speedup_including_sae_training'], bound)})"
        if bound:
            line += " (lower bound)"
        lines.append(line)
    if result.get("sae_training_seconds") is None and e2e["init"] == "scratch":
        lines.append(
            "the given SAE's training time is unknown (no lorasae_sae_training.json): no incl.-SAE ratios"
        )
    return "\n".join(lines)


def run_compare(cfg: CompareConfig, out: Path) -> dict:
    if cfg.loop.model == DEFAULT_MODEL and not cfg.loop.saes:
        cfg = replace(cfg, loop=replace(cfg.loop, saes=[str(ensure_default_sae())]))
    if len(cfg.loop.saes) != 1:
        raise LorasaeError("compare takes one --sae (the e2e baseline trains one SAE)")
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lora = reuse_or_train(cfg.lora(), out / "lora", train_lora)
    e2e = reuse_or_train(cfg.e2e(), out / "e2e", train_e2e)
    result = summarise(cfg, lora, e2e, sae_training_seconds(cfg.loop.saes[0]))
    write_json_atomic(out / COMPARE_FILE, result)
    plot_compare(result, out / COMPARE_PLOT)
    return result
