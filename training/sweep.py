"""`lorasae sweep`: the paper's comparisons on one machine: rank, adapted layers, SAE sparsity, layer.

Every run is an ordinary `lorasae train` (or `train-e2e`) run in ``<out>/<name>`` (e.g.
``lora-canonical-3f2a1b-r16``: the SAE's slug, see ``sae_slug``), with the same data, schedule and
learning rate; only the swept setting changes:

- ``rank``: LoRA rank over ``--ranks`` (default 1, 4, 16, 64) around the base SAE;
- ``layers``: LoRA on all layers vs only the layers after the SAE (the paper's main setting);
- ``sparsity``: the base SAE and ``--sparsity-sae`` SAEs of other L0 (on the default model: TopK
  k = 16, 32, 64 trained by `lorasae train-sae`), each adapted, each also trained e2e
  (``--init finetune``) for the Pareto plot of held-out CE vs L0;
- ``layer``: ``--layer-sae`` SAEs at other layers (default model: layer 8).

Finished runs are reused and interrupted ones resumed, so a killed sweep continues where it
stopped. Results: ``sweep.json`` (one row per run), ``sweep_rank.png`` (gap closed vs rank) and
``sweep_pareto.png`` (held-out CE vs L0: spliced, adapted + spliced, e2e, clean).
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from lorasae.errors import LorasaeError
from lorasae.files import write_json_atomic
from lorasae.models import DEFAULT_MODEL, load_model
from lorasae.saes import SAE_CONFIG_FILE

from .loop import LoopConfig, is_finished, reuse_or_train
from .plots import plot_sweep
from .presets import CPU_RANK, cpu_loop
from .train_e2e import E2eTrainConfig, train_e2e
from .train_lora import AdaptedLayers, LoraTrainConfig, train_lora
from .train_sae import SaeTrainingConfig, ensure_default_sae

SWEEP_FILE = "sweep.json"


@dataclass
class SweepConfig:
    """The data/schedule every run shares (``loop``: a budget in steps, no evaluation while
    training; each run's SAE comes from the fields below) and what the sweeps vary."""

    loop: LoopConfig = field(
        default_factory=lambda: cpu_loop(50, eval_every=10**9, eval_tokens=8192),
        metadata={"flags": {"max_steps": "--steps", "saes": None, "tokens": None, "eval_every": None}},
    )
    sae: str | None = field(
        default=None, metadata={"help": "base SAE (default model: the embedded default SAE)"}
    )
    sparsity_saes: list[str] = field(
        default_factory=list,
        metadata={
            "flag": "--sparsity-sae",
            "help": "SAEs of other L0 at the same layer (repeat; default model: TopK k16, k64)",
        },
    )
    layer_saes: list[str] = field(
        default_factory=list,
        metadata={"flag": "--layer-sae", "help": "SAEs at other layers (repeat; default model: layer 8)"},
    )
    ranks: list[int] = field(
        default_factory=lambda: [1, 4, 16, 64], metadata={"sep": ",", "help": "ranks of the rank sweep"}
    )
    rank: int = field(default=CPU_RANK, metadata={"help": "rank of the layers/sparsity/layer sweeps"})
    e2e_lr: float = field(default=5e-4, metadata={"help": "e2e SAE learning rate"})
    e2e: bool = field(default=True, metadata={"help": "skip the e2e SAEs of the Pareto plot"})


@dataclass
class Run:
    name: str
    sweeps: list[str]
    kind: str  # "lora" | "e2e"
    cfg: LoraTrainConfig | E2eTrainConfig


def default_saes(cfg: SweepConfig, only: set[str] | None = None, train: bool = True) -> SweepConfig:
    """On the default model, fill in the SAEs not given with default SAEs (trained by `train-sae`
    and cached if missing, and only those the selected sweeps need)."""
    if cfg.loop.model != DEFAULT_MODEL:
        if cfg.sae is None:
            raise LorasaeError("--sae is required with a non-default --model")
        return cfg

    def wanted(sweep: str, given) -> bool:
        return not given and (only is None or sweep in only)

    needed = {}
    if cfg.sae is None:
        needed["sae"] = [SaeTrainingConfig()]
    if wanted("sparsity", cfg.sparsity_saes):
        needed["sparsity_saes"] = [SaeTrainingConfig(k=16), SaeTrainingConfig(k=64)]
    if wanted("layer", cfg.layer_saes):
        needed["layer_saes"] = [SaeTrainingConfig(layer=8)]
    missing = [c for cs in needed.values() for c in cs if not (c.default_dir() / SAE_CONFIG_FILE).exists()]
    if missing and train:
        lm = load_model()
        for c in missing:
            ensure_default_sae(lm, c)
    paths = {k: [str(c.default_dir()) for c in cs] for k, cs in needed.items()}
    return replace(
        cfg,
        sae=paths["sae"][0] if "sae" in paths else cfg.sae,
        sparsity_saes=paths.get("sparsity_saes", cfg.sparsity_saes),
        layer_saes=paths.get("layer_saes", cfg.layer_saes),
    )


def plan(cfg: SweepConfig) -> list[Run]:
    """The runs, most informative first. A run is what it trains (SAE spec, rank, adapted layers):
    one shared by several sweeps appears once."""
    if cfg.sae is None:
        raise LorasaeError("the sweep needs a base SAE (--sae)")
    base_sae, base = cfg.sae, asdict(cfg.loop)
    runs: dict[tuple, Run] = {}

    def lora(sweep: str, sae: str, rank: int, layers: AdaptedLayers = "after") -> None:
        key = ("lora", sae, rank, layers)
        if key in runs:
            runs[key].sweeps.append(sweep)
            return
        name = f"lora-{sae_slug(sae)}-r{rank}" + ("" if layers == "after" else f"-{layers}")
        runs[key] = Run(
            name, [sweep], "lora", LoraTrainConfig(**{**base, "saes": [sae]}, rank=rank, layers=layers)
        )

    for rank in cfg.ranks:
        lora("rank", base_sae, rank)
    lora("layers", base_sae, cfg.rank)
    lora("layers", base_sae, cfg.rank, "all")
    for sae in [base_sae, *cfg.layer_saes]:
        lora("layer", sae, cfg.rank)
    for sae in [base_sae, *cfg.sparsity_saes]:
        lora("sparsity", sae, cfg.rank)
    for sae in [base_sae, *cfg.sparsity_saes] if cfg.e2e else []:  # the costliest runs last
        runs[("e2e", sae)] = Run(
            f"e2e-{sae_slug(sae)}",
            ["sparsity"],
            "e2e",
            E2eTrainConfig(**{**base, "saes": [sae], "lr": cfg.e2e_lr}),
        )
    return list(runs.values())


def sae_slug(spec: str) -> str:
    """A folder name for an SAE spec: its last path part (readable) plus a short hash of the whole
    spec, since many specs share a last part (every Gemma Scope canonical id ends in ``canonical``)."""
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(spec).name)[:40].strip("._") or "sae"
    return f"{tail}-{hashlib.sha1(spec.encode()).hexdigest()[:6]}"


def row(run: Run, metrics: dict) -> dict:
    """One table row: what was swept and what it gave."""
    start, final = metrics["start"], metrics["final"]
    sae = final["saes"][0]
    out = {
        "name": run.name,
        "sweeps": run.sweeps,
        "kind": run.kind,
        "sae": run.cfg.saes[0],
        "layer": sae["layer"],
        "ce_clean": final["ce_clean"],
        "steps": metrics["train"]["steps"],
        "seconds": metrics["train"]["seconds"],
    }
    if isinstance(run.cfg, LoraTrainConfig):
        out.update(
            rank=run.cfg.rank,
            layers=run.cfg.layers,
            l0=sae["l0"],
            ce_spliced=final["ce_spliced"],
            ce_adapted_spliced=final["ce_adapted_spliced"],
            gap_closed=final["gap_closed"],
            ce_adapted_clean=final["ce_adapted_clean"],
            explained_variance=sae["explained_variance"],
        )
    else:
        out.update(
            l0=sae["l0"],
            ce_spliced_given=start["ce_spliced"],
            ce_e2e=final["ce_spliced"],
            gap_closed=(start["ce_spliced"] - final["ce_spliced"])
            / (start["ce_spliced"] - start["ce_clean"]),
            explained_variance=sae["explained_variance"],
        )
    return out


def run_sweep(cfg: SweepConfig, out: Path, only: set[str] | None = None, report: bool = False) -> dict:
    """Run (or reuse) the planned runs; with ``report`` train nothing: tabulate and plot the
    finished ones (e.g. while a long sweep is still going)."""
    cfg = default_saes(cfg, only, train=not report)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [r for r in plan(cfg) if only is None or set(r.sweeps) & only]
    if report:
        runs = [r for r in runs if is_finished(out / r.name)]
    rows: list[dict] = []
    result = {"config": asdict(cfg), "rows": rows}
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.name} ({', '.join(run.sweeps)})", file=sys.stderr, flush=True)
        train = train_lora if run.kind == "lora" else train_e2e
        rows.append(row(run, reuse_or_train(run.cfg, out / run.name, train)))
        write_json_atomic(out / SWEEP_FILE, result)  # partial results survive a kill
    result["plots"] = [str(p) for p in plot_sweep(rows, out)]
    write_json_atomic(out / SWEEP_FILE, result)
    return result


def format_table(rows: list[dict]) -> str:
    lines = [f"{'run':<44}{'L0':>7}{'spliced':>9}{'trained':>9}{'gap closed':>12}{'adapter alone':>15}"]
    for r in rows:
        trained = r.get("ce_adapted_spliced", r.get("ce_e2e"))
        spliced = r.get("ce_spliced", r.get("ce_spliced_given"))
        alone = r.get("ce_adapted_clean")
        lines.append(
            f"{r['name']:<44}{r['l0']:>7.1f}{spliced:>9.4f}{trained:>9.4f}"
            f"{r['gap_closed']:>12.1%}" + (f"{alone - r['ce_clean']:>+15.4f}" if alone else "")
        )
    return "\n".join(lines)
