"""PNG plots of training runs, comparisons and sweeps.

Figures are built with ``matplotlib.figure.Figure`` and written with its ``savefig`` (atomically):
no pyplot and no ``matplotlib.use``, so importing the trainer leaves the caller's backend (e.g. a
notebook's inline plots) alone.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from lorasae.files import write_atomic

DPI = 120


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def plot_training(metrics: dict, path: Path, label: str = "LoRA-SAE") -> Path:
    """Held-out CE against training tokens: spliced before training, the trained run, clean as a line."""
    start, final = metrics["start"], metrics.get("final", {})
    points = [(0, start["heldout_ce"])]
    points += [(h["tokens"], h["heldout_ce"]) for h in metrics.get("history", []) if "heldout_ce" in h]
    if "heldout_ce" in final:
        points.append((metrics["train"]["tokens"], final["heldout_ce"]))
    xs, ys = zip(*points)
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    ax.axhline(start["ce_clean"], color="black", linestyle="--", label="clean (no SAE)")
    ax.axhline(start["ce_spliced"], color="tab:red", linestyle=":", label="SAE spliced, before training")
    ax.plot(xs, ys, marker="o", color="tab:blue", label=f"{label}: SAE spliced, trained")
    if "ce_adapted_clean" in final:
        ax.scatter(
            [xs[-1]],
            [final["ce_adapted_clean"]],
            marker="x",
            color="tab:green",
            label="adapter alone (no SAE)",
            zorder=3,
        )
    gap = final.get("gap_closed")
    title = f"{label}: held-out CE" + (f" (gap closed {gap:.0%})" if gap is not None else "")
    ax.set_title(title)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_compare(result: dict, path: Path) -> Path:
    """`lorasae compare`: both runs' held-out CE against seconds and against tokens, the target."""
    fig = Figure(figsize=(12, 4.4))
    axes = fig.subplots(1, 2)
    for ax, key, label in (
        (axes[0], "seconds", "training wall-clock seconds"),
        (axes[1], "tokens", "training tokens"),
    ):
        for run, colour, name in (
            ("lora", "tab:blue", "LoRA-SAE (model adapted, SAE frozen)"),
            ("e2e", "tab:orange", f"e2e SAE ({result['e2e']['init']}, model frozen)"),
        ):
            pts = result[run]["curve"]
            ax.plot([p[key] for p in pts], [p["ce"] for p in pts], marker="o", ms=3, color=colour, label=name)
            reached = result[run][f"{key}_to_target"]
            if reached is not None:
                ax.axvline(reached, color=colour, alpha=0.4, linestyle="-.")
        ax.axhline(result["target_ce"], color="tab:orange", linestyle=":", label="e2e final CE (target)")
        ax.axhline(result["ce_spliced"], color="tab:red", linestyle=":", label="given SAE spliced")
        ax.axhline(result["ce_clean"], color="black", linestyle="--", label="clean model")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out CE (nats)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    speed = result["speedup"]
    fig.suptitle(
        "LoRA-SAE vs e2e SAE: time to the e2e run's final CE"
        + (f" — speed-up {speed:.1f}x" if speed is not None else " — not reached")
    )
    return _save(fig, path)


def plot_sweep(rows: list[dict], out: Path) -> list[Path]:
    """`lorasae sweep`: ``sweep_rank.png`` (gap closed vs rank) and ``sweep_pareto.png`` (held-out
    CE vs L0), each when its sweep has rows; returns the paths written."""
    paths = []
    rank_rows = sorted((r for r in rows if "rank" in r["sweeps"]), key=lambda r: r["rank"])
    if rank_rows:
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        ax.plot([r["rank"] for r in rank_rows], [r["gap_closed"] for r in rank_rows], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRA rank")
        ax.set_ylabel("CE gap closed")
        ax.set_title(f"Gap closed vs rank ({rank_rows[0]['steps']} steps, layer {rank_rows[0]['layer']})")
        ax.grid(alpha=0.3)
        paths.append(_save(fig, Path(out) / "sweep_rank.png"))
    lora = sorted(
        (r for r in rows if "sparsity" in r["sweeps"] and r["kind"] == "lora"), key=lambda r: r["l0"]
    )
    e2e = sorted((r for r in rows if r["kind"] == "e2e"), key=lambda r: r["l0"])
    if lora:
        fig = Figure(figsize=(6.5, 4.2))
        ax = fig.subplots()
        ax.plot(
            [r["l0"] for r in lora],
            [r["ce_spliced"] for r in lora],
            marker="o",
            color="tab:red",
            label="SAE spliced",
        )
        ax.plot(
            [r["l0"] for r in lora],
            [r["ce_adapted_spliced"] for r in lora],
            marker="o",
            color="tab:blue",
            label=f"SAE spliced + LoRA (r{lora[0]['rank']})",
        )
        if e2e:
            ax.plot(
                [r["l0"] for r in e2e],
                [r["ce_e2e"] for r in e2e],
                marker="s",
                color="tab:orange",
                label="e2e SAE (fine-tuned on KL)",
            )
        ax.axhline(lora[0]["ce_clean"], color="black", linestyle="--", label="clean model")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel("held-out CE (nats)")
        ax.set_title("Held-out CE vs sparsity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(_save(fig, Path(out) / "sweep_pareto.png"))
    return paths


def plot_densities(densities: dict[str, list[float]], path: Path) -> Path:
    """Distribution of latent firing densities per SAE (log10 scale; dead latents counted apart)."""
    import math

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for label, values in densities.items():
        live = [math.log10(v) for v in values if v > 0]
        dead = len(values) - len(live)
        ax.hist(
            live, bins=40, histtype="step", linewidth=1.5, label=f"{label} ({dead} dead of {len(values)})"
        )
    ax.set_xlabel("log10 firing density (fraction of tokens with activation > 0)")
    ax.set_ylabel("latents")
    ax.set_title("Latent densities")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_ab(buckets: list[dict], names: list[str], path: Path) -> Path:
    """`lorasae ab`: mean CE gain (``ce_base - ce_adapter``, nats) per token-frequency bucket,
    grouped bars with one colour per adapter; the base model (SAEs spliced, no adapter) is 0."""
    rows = [b for b in buckets if b["tokens"]]
    fig = Figure(figsize=(max(6.0, 1.6 * len(rows) + 2), 4.2))
    ax = fig.subplots()
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [b["adapters"][name]["gain"] for b in rows], width=width, label=name)
    ax.axhline(0.0, color="black", linewidth=1, label="base (SAEs spliced, no adapter)")
    ax.set_xticks(range(len(rows)), [f"{b['bucket']}\n({b['tokens']} tok)" for b in rows])
    ax.set_xlabel("rank of the predicted token's frequency")
    ax.set_ylabel("mean CE gain over base (nats)")
    ax.set_title("Adapter CE gain by token frequency (SAEs spliced)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_drift(saes: dict[str, dict], path: Path) -> Path:
    """`lorasae drift`, one row per SAE: left, the effect cosine (reference vs adapted) of every
    measured latent against the half-vs-half cosines of the noise floor, with the threshold; right,
    each latent's density under the reference vs the adapted model (log-log), input-drifted ones
    in colour."""
    import math

    fig = Figure(figsize=(11, 3.8 * len(saes)))
    axes = fig.subplots(len(saes), 2, squeeze=False)
    for (label, d), (left, right) in zip(saes.items(), axes):
        bins = [i / 50 for i in range(-50, 51)]
        left.hist(
            d["cosine"], bins=bins, alpha=0.7, label=f"reference vs adapted ({len(d['cosine'])} latents)"
        )
        left.hist(
            d["noise"],
            bins=bins,
            histtype="step",
            linewidth=1.5,
            color="black",
            label=f"noise: half vs half ({len(d['noise'])} latents)",
        )
        left.axvline(d["threshold"], color="red", linestyle="--", label=f"threshold {d['threshold']:.3f}")
        left.set_yscale("log")
        left.set_xlabel("cosine of causal-effect vectors")
        left.set_ylabel("latents")
        left.set_title(f"{label}: output side")
        left.legend(fontsize=7)
        pairs = [
            (math.log10(r), math.log10(a), drifted)
            for r, a, drifted in zip(d["density_reference"], d["density_adapted"], d["input_drifted"])
            if r > 0 and a > 0
        ]
        for drifted, colour, name in ((False, "tab:gray", "within noise"), (True, "tab:red", "drifted")):
            xs = [p[0] for p in pairs if p[2] == drifted]
            ys = [p[1] for p in pairs if p[2] == drifted]
            right.scatter(xs, ys, s=4, alpha=0.6, color=colour, label=f"{name} ({len(xs)})")
        if pairs:
            lo, hi = min(min(p[0], p[1]) for p in pairs), max(max(p[0], p[1]) for p in pairs)
            right.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
        right.set_xlabel("log10 density, reference")
        right.set_ylabel("log10 density, adapted")
        right.set_title(f"{label}: input side")
        right.legend(fontsize=7)
    return _save(fig, path)
