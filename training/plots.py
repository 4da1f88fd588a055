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


_TARGET_STYLE = {  # target name: (label, line colour, marker)
    "e2e_final": ("e2e's final CE", "tab:orange", "*"),
    "lora_final": ("LoRA-SAE's final CE", "tab:blue", "D"),
}


def _compare_targets(result: dict) -> list[dict]:
    """``result["targets"]``; for a result without them (older compare.json), its one target."""
    if "targets" in result:
        return result["targets"]
    lora, e2e = result["lora"], result["e2e"]
    return [
        {
            "name": "e2e_final",
            "ce": result["target_ce"],
            "lora_seconds": lora.get("seconds_to_target"),
            "e2e_seconds": e2e.get("seconds_to_target"),
            "lora_tokens": lora.get("tokens_to_target"),
            "e2e_tokens": e2e.get("tokens_to_target"),
            "speedup": result.get("speedup"),
            "speedup_including_sae_training": result.get("speedup_including_sae_training"),
            "lower_bound": False,
            "lora_starts_there": lora.get("seconds_to_target") == 0.0,
        }
    ]


def _compare_title(result: dict, targets: list[dict]) -> str:
    parts = []
    for t in targets:
        label = _TARGET_STYLE[t["name"]][0]
        bound = "≥ " if t["lower_bound"] else ""
        speed, incl = t["speedup"], t.get("speedup_including_sae_training")
        if speed is None and not t.get("lora_starts_there"):
            parts.append(f"to {label}: not reached by LoRA-SAE")
            continue
        text = f"to {label}: " + ("∞x (LoRA-SAE starts there)" if speed is None else f"{bound}{speed:.1f}x")
        if incl is not None:
            text += f" ({bound}{incl:.1f}x incl. SAE training)"
        if t["lower_bound"]:
            text += " (lower bound: e2e not there yet)"
        parts.append(text)
    init = result["e2e"].get("init", "")
    return f"LoRA-SAE vs e2e SAE ({init}), wall-clock speed-up\n" + "; ".join(parts)


def compare_figure(result: dict) -> Figure:
    """The figure ``plot_compare`` writes (separate so tests can inspect its axes)."""
    targets = _compare_targets(result)
    curves = {run: result[run]["curve"] for run in ("lora", "e2e")}
    sae_s = result.get("sae_training_seconds")
    positive = [p["seconds"] for c in curves.values() for p in c if p["seconds"] > 0]
    x0 = min(positive) / 2 if positive else 0.01  # where 0 s is drawn on the log axis

    def at(seconds: float) -> float:
        return seconds if seconds > 0 else x0

    runs = (
        ("lora", "tab:blue", "LoRA-SAE (model adapted, SAE frozen)"),
        ("e2e", "tab:orange", f"e2e SAE ({result['e2e'].get('init', '')}, model frozen)"),
    )
    fig = Figure(figsize=(14.5, 5))
    by_time, by_tokens, legend_ax = fig.subplots(1, 3, width_ratios=[5, 5, 2.2])

    # held-out CE vs training seconds, log x
    for run, colour, name in runs:
        pts = curves[run]
        by_time.plot(
            [at(p["seconds"]) for p in pts],
            [p["ce"] for p in pts],
            marker="o",
            ms=3,
            color=colour,
            label=name,
        )
    if sae_s is not None:
        pts = curves["lora"]
        by_time.plot(
            [at(p["seconds"] + sae_s) for p in pts],
            [p["ce"] for p in pts],
            linestyle="--",
            color="tab:blue",
            alpha=0.5,
            label=f"LoRA-SAE incl. SAE training (+{sae_s:.0f} s)",
        )
    for t in targets:
        label, colour, marker = _TARGET_STYLE[t["name"]]
        by_time.axhline(
            t["ce"], color=colour, linestyle=":", alpha=0.8, label=f"target: {label} ({t['ce']:.4f})"
        )
        if t["lora_seconds"] is not None:
            by_time.scatter(
                [at(t["lora_seconds"])], [t["ce"]], marker=marker, s=70, color="tab:blue", zorder=4
            )
            if sae_s is not None:
                by_time.scatter(
                    [at(t["lora_seconds"] + sae_s)],
                    [t["ce"]],
                    marker=marker,
                    s=70,
                    facecolors="none",
                    edgecolors="tab:blue",
                    zorder=4,
                )
        if t["e2e_seconds"] is not None:
            by_time.scatter(
                [at(t["e2e_seconds"])], [t["ce"]], marker=marker, s=70, color="tab:orange", zorder=4
            )
        elif t["lora_seconds"] is not None:  # e2e not there yet: how far it still is
            last = curves["e2e"][-1]
            by_time.vlines(at(last["seconds"]), t["ce"], last["ce"], color="tab:orange", linestyle="--", lw=1)
            by_time.annotate(
                f"e2e: not reached after {last['seconds']:.0f} s →",
                xy=(at(last["seconds"]), t["ce"]),
                xytext=(-6, 6),
                textcoords="offset points",
                ha="right",
                fontsize=8,
                color="tab:orange",
            )
    by_time.set_xscale("log")
    by_time.set_xlabel(f"training wall-clock seconds (log; the start, 0 s, drawn at {x0:.2g} s)")

    # held-out CE vs training tokens
    for run, colour, name in runs:
        pts = curves[run]
        by_tokens.plot(
            [p["tokens"] for p in pts], [p["ce"] for p in pts], marker="o", ms=3, color=colour, label=name
        )
    for t in targets:
        label, colour, marker = _TARGET_STYLE[t["name"]]
        by_tokens.axhline(t["ce"], color=colour, linestyle=":", alpha=0.8)
        for key, run_colour in (("lora_tokens", "tab:blue"), ("e2e_tokens", "tab:orange")):
            if t.get(key) is not None:
                by_tokens.scatter([t[key]], [t["ce"]], marker=marker, s=70, color=run_colour, zorder=4)
    by_tokens.set_xlabel("training tokens")

    for ax in (by_time, by_tokens):
        ax.axhline(result["ce_spliced"], color="tab:red", linestyle=":", label="given SAE spliced")
        ax.axhline(result["ce_clean"], color="black", linestyle="--", label="clean model")
        ax.set_ylabel("held-out CE (nats)")
        ax.grid(alpha=0.3, which="both")
    handles, labels = by_time.get_legend_handles_labels()
    for name, (label, _, marker) in _TARGET_STYLE.items():
        if any(t["name"] == name for t in targets):
            handles.append(by_time.scatter([], [], marker=marker, s=70, color="grey"))
            labels.append(f"reaches {label}")
    if sae_s is not None:
        handles.append(by_time.scatter([], [], marker="o", s=50, facecolors="none", edgecolors="tab:blue"))
        labels.append("hollow: LoRA-SAE incl. SAE training")
    legend_ax.axis("off")
    legend_ax.legend(handles, labels, fontsize=8, loc="center left")
    fig.suptitle(_compare_title(result, targets), fontsize=10)
    return fig


def plot_compare(result: dict, path: Path) -> Path:
    """`lorasae compare`: both runs' held-out CE against training seconds (log x-axis) and against
    tokens, with both targets (the e2e run's final CE, LoRA-SAE's final CE) as horizontal lines and
    a marker where each run reaches each (★ e2e's final, ◆ LoRA-SAE's final; hollow: LoRA-SAE
    counting the SAE's training, whose curve is drawn shifted right by it when known); the legend
    has a panel of its own. A log axis
    cannot show 0 s: every point at 0 s (the start) is drawn at half the smallest positive time of
    either curve, as the x label says. Where the e2e run never reached a target, its last point is
    labelled "not reached after N s" (a dashed line down to the target shows the CE still to go) and
    the title's speed-up reads "≥ Nx (lower bound)"."""
    return _save(compare_figure(result), path)


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
