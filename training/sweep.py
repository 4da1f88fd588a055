"""`lorasae sweep`: the paper's comparisons on one machine: rank, adapted layers, SAE sparsity, layer.

Every run is an ordinary `lorasae train` (or `train-e2e`) run in ``<out>/<name>``, with the same
data, schedule and learning rate; only the swept setting changes:

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

import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from lorasae.errors import LorasaeError
from lorasae.models import DEFAULT_MODEL
from lorasae.training.loop import LoopConfig, is_finished, reuse_or_train, write_json_atomic
from lorasae.training.train_e2e import E2eTrainConfig, train_e2e
from lorasae.training.train_lora import LoraTrainConfig, train_lora

SWEEP_FILE = "sweep.json"


@dataclass
class SweepConfig:
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(
        lr=1e-3, max_steps=50, tokens=50 * 8 * 128, eval_every=10**9, eval_tokens=8192))
    sae: str | None = None  # the base SAE (default model: the default SAE)
    sparsity_saes: list[str] = field(default_factory=list)
    layer_saes: list[str] = field(default_factory=list)
    ranks: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    rank: int = 16  # the rank of the layers / sparsity / layer sweeps
    e2e_lr: float = 5e-4
    e2e: bool = True


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
    from lorasae.models import load_model
    from lorasae.training.train_sae import SaeTrainingConfig, default_sae_dir, ensure_default_sae

    def wanted(sweep: str, given) -> bool:
        return not given and (only is None or sweep in only)

    needed = {}
    if cfg.sae is None:
        needed["sae"] = [SaeTrainingConfig()]
    if wanted("sparsity", cfg.sparsity_saes):
        needed["sparsity_saes"] = [SaeTrainingConfig(k=16), SaeTrainingConfig(k=64)]
    if wanted("layer", cfg.layer_saes):
        needed["layer_saes"] = [SaeTrainingConfig(layer=8)]
    missing = [c for cs in needed.values() for c in cs if not (default_sae_dir(c) / "cfg.json").exists()]
    if missing and train:
        lm = load_model()
        for c in missing:
            ensure_default_sae(lm, c)
    paths = {k: [str(default_sae_dir(c)) for c in cs] for k, cs in needed.items()}
    return replace(cfg, sae=paths["sae"][0] if "sae" in paths else cfg.sae,
                   sparsity_saes=paths.get("sparsity_saes", cfg.sparsity_saes),
                   layer_saes=paths.get("layer_saes", cfg.layer_saes))


def plan(cfg: SweepConfig) -> list[Run]:
    """The runs, most informative first; a run shared by several sweeps appears once."""
    base = asdict(cfg.loop)
    runs: dict[str, Run] = {}

    def lora(name: str, sweep: str, sae: str, rank: int, layers: str = "after") -> None:
        if name in runs:
            runs[name].sweeps.append(sweep)
            return
        runs[name] = Run(name, [sweep], "lora",
                         LoraTrainConfig(**{**base, "saes": [sae]}, rank=rank, layers=layers))

    for rank in cfg.ranks:
        lora(f"lora-{_short(cfg.sae)}-r{rank}", "rank", cfg.sae, rank)
    lora(f"lora-{_short(cfg.sae)}-r{cfg.rank}", "layers", cfg.sae, cfg.rank)
    lora(f"lora-{_short(cfg.sae)}-r{cfg.rank}-all", "layers", cfg.sae, cfg.rank, "all")
    for sae in [cfg.sae, *cfg.layer_saes]:
        lora(f"lora-{_short(sae)}-r{cfg.rank}", "layer", sae, cfg.rank)
    for sae in [cfg.sae, *cfg.sparsity_saes]:
        lora(f"lora-{_short(sae)}-r{cfg.rank}", "sparsity", sae, cfg.rank)
    for sae in [cfg.sae, *cfg.sparsity_saes] if cfg.e2e else []:  # the costliest runs last
        name = f"e2e-{_short(sae)}"
        runs[name] = Run(name, ["sparsity"], "e2e",
                         E2eTrainConfig(**{**base, "saes": [sae], "lr": cfg.e2e_lr}))
    return list(runs.values())


def _short(spec: str) -> str:
    return Path(spec).name.replace("/", "_") or spec


def row(run: Run, metrics: dict) -> dict:
    """One table row: what was swept and what it gave."""
    start, final = metrics["start"], metrics["final"]
    sae = final["saes"][0]
    out = {"name": run.name, "sweeps": run.sweeps, "kind": run.kind, "sae": run.cfg.saes[0],
           "layer": sae["layer"], "ce_clean": final["ce_clean"], "steps": metrics["train"]["steps"],
           "seconds": metrics["train"]["seconds"]}
    if run.kind == "lora":
        out.update(rank=run.cfg.rank, layers=run.cfg.layers, l0=sae["l0"],
                   ce_spliced=final["ce_spliced"], ce_adapted_spliced=final["ce_adapted_spliced"],
                   gap_closed=final["gap_closed"], ce_adapted_clean=final["ce_adapted_clean"],
                   explained_variance=sae["explained_variance"])
    else:
        out.update(l0=sae["l0"], ce_spliced_given=start["ce_spliced"], ce_e2e=final["ce_spliced"],
                   gap_closed=(start["ce_spliced"] - final["ce_spliced"]) /
                   (start["ce_spliced"] - start["ce_clean"]),
                   explained_variance=sae["explained_variance"])
    return out


def plot_sweep(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rank_rows = sorted((r for r in rows if "rank" in r["sweeps"]), key=lambda r: r["rank"])
    if rank_rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["rank"] for r in rank_rows], [r["gap_closed"] for r in rank_rows], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRA rank")
        ax.set_ylabel("CE gap closed")
        ax.set_title(f"Gap closed vs rank ({rank_rows[0]['steps']} steps, layer {rank_rows[0]['layer']})")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / "sweep_rank.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    lora = sorted((r for r in rows if "sparsity" in r["sweeps"] and r["kind"] == "lora"),
                  key=lambda r: r["l0"])
    e2e = sorted((r for r in rows if r["kind"] == "e2e"), key=lambda r: r["l0"])
    if lora:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        ax.plot([r["l0"] for r in lora], [r["ce_spliced"] for r in lora], marker="o",
                color="tab:red", label="SAE spliced")
        ax.plot([r["l0"] for r in lora], [r["ce_adapted_spliced"] for r in lora], marker="o",
                color="tab:blue", label=f"SAE spliced + LoRA (r{lora[0]['rank']})")
        if e2e:
            ax.plot([r["l0"] for r in e2e], [r["ce_e2e"] for r in e2e], marker="s",
                    color="tab:orange", label="e2e SAE (fine-tuned on KL)")
        ax.axhline(lora[0]["ce_clean"], color="black", linestyle="--", label="clean model")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel("held-out CE (nats)")
        ax.set_title("Held-out CE vs sparsity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "sweep_pareto.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def run_sweep(cfg: SweepConfig, out: Path, only: set[str] | None = None,
              report: bool = False) -> dict:
    """Run (or reuse) the planned runs; with ``report`` train nothing: tabulate and plot the
    finished ones (e.g. while a long sweep is still going)."""
    cfg = default_saes(cfg, only, train=not report)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [r for r in plan(cfg) if only is None or set(r.sweeps) & only]
    if report:
        runs = [r for r in runs if is_finished(out / r.name)]
    rows = []
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
        lines.append(f"{r['name']:<44}{r['l0']:>7.1f}{spliced:>9.4f}{trained:>9.4f}"
                     f"{r['gap_closed']:>12.1%}" + (f"{alone - r['ce_clean']:>+15.4f}" if alone else ""))
    return "\n".join(lines)
