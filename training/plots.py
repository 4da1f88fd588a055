"""PNG plots of training runs (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training(metrics: dict, path: Path, label: str = "LoRA-SAE") -> Path:
    """Held-out CE against training tokens: spliced before training, the trained run, clean as a line."""
    start, final = metrics["start"], metrics.get("final", {})
    points = [(0, start["heldout_ce"])]
    points += [(h["tokens"], h["heldout_ce"]) for h in metrics.get("history", []) if "heldout_ce" in h]
    if "heldout_ce" in final:
        points.append((metrics["train"]["tokens"], final["heldout_ce"]))
    xs, ys = zip(*points)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.axhline(start["ce_clean"], color="black", linestyle="--", label="clean (no SAE)")
    ax.axhline(start["ce_spliced"], color="tab:red", linestyle=":", label="SAE spliced, before training")
    ax.plot(xs, ys, marker="o", color="tab:blue", label=f"{label}: SAE spliced, trained")
    if "ce_adapted_clean" in final:
        ax.scatter([xs[-1]], [final["ce_adapted_clean"]], marker="x", color="tab:green",
                   label="adapter alone (no SAE)", zorder=3)
    gap = final.get("gap_closed")
    title = f"{label}: held-out CE" + (f" (gap closed {gap:.0%})" if gap is not None else "")
    ax.set_title(title)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
