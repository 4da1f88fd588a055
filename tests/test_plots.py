"""Plots (lorasae.training.plots): no import side effects on matplotlib, and each figure is written."""

from __future__ import annotations

import subprocess
import sys

from lorasae.training.plots import plot_compare, plot_sweep, plot_training

_IMPORT_CHECK = """
import sys
import matplotlib
backend = dict.__getitem__(matplotlib.rcParams, "backend")  # read without resolving it
import lorasae.training.train_lora, lorasae.training.train_e2e, lorasae.training.compare
import lorasae.training.sweep, lorasae.training.plots, lorasae.training.loop
assert dict.__getitem__(matplotlib.rcParams, "backend") is backend, "the backend was switched"
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
print("ok")
"""


def test_importing_the_trainers_leaves_matplotlib_alone():
    """A notebook importing the trainer keeps its backend (inline plots): nothing calls
    ``matplotlib.use`` or imports pyplot at import time."""
    done = subprocess.run([sys.executable, "-c", _IMPORT_CHECK], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def _curve(start: float, end: float, n: int = 4) -> list[dict]:
    return [
        {"seconds": 10.0 * i, "tokens": 512 * i, "ce": start + (end - start) * i / (n - 1)} for i in range(n)
    ]


def test_each_plot_writes_a_png(tmp_path):
    png = b"\x89PNG\r\n\x1a\n"
    metrics = {
        "start": {"heldout_ce": 3.0, "ce_clean": 2.0, "ce_spliced": 3.0},
        "history": [{"tokens": 512, "heldout_ce": 2.6}, {"tokens": 1024}],
        "train": {"tokens": 2048},
        "final": {"heldout_ce": 2.3, "ce_adapted_clean": 2.05, "gap_closed": 0.7},
    }
    assert plot_training(metrics, tmp_path / "training.png") == tmp_path / "training.png"

    result = {
        "target_ce": 2.4,
        "ce_spliced": 3.0,
        "ce_clean": 2.0,
        "speedup": 3.0,
        "lora": {"curve": _curve(3.0, 2.2), "seconds_to_target": 10.0, "tokens_to_target": 512},
        "e2e": {
            "curve": _curve(3.0, 2.4),
            "init": "finetune",
            "seconds_to_target": 30.0,
            "tokens_to_target": 1536,
        },
    }
    plot_compare(result, tmp_path / "compare.png")

    rows = [
        {
            "sweeps": ["rank", "sparsity"],
            "kind": "lora",
            "rank": r,
            "gap_closed": g,
            "steps": 6,
            "layer": 1,
            "l0": 8.0,
            "ce_spliced": 3.0,
            "ce_adapted_spliced": 3.0 - g,
            "ce_clean": 2.0,
        }
        for r, g in ((1, 0.2), (4, 0.4))
    ]
    rows.append({"sweeps": ["sparsity"], "kind": "e2e", "l0": 8.0, "ce_e2e": 2.7})
    assert plot_sweep(rows, tmp_path) == [tmp_path / "sweep_rank.png", tmp_path / "sweep_pareto.png"]
    assert plot_sweep([], tmp_path / "none") == []  # nothing to plot: nothing written

    for name in ("training.png", "compare.png", "sweep_rank.png", "sweep_pareto.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(png) and len(data) > 10_000, name
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "compare.png",
        "sweep_pareto.png",
        "sweep_rank.png",
        "training.png",
    ]  # no temporary files
