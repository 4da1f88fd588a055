"""Smoke test of bench/train.py (``make bench``'s training benchmark) on the tiny world: it runs,
and its JSON holds the three timed steps and positive, finite throughputs and ratios. CI does not
gate on absolute times."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_train_bench_quick(tiny_world, tmp_path):
    out = tmp_path / "bench-output" / "train.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "train.py"), "--quick", "--model", str(tiny_world.model),
         "--sae", str(tiny_world.sae1), "--rank", "4", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout[proc.stdout.index("{"):]) == result  # the table, then the same JSON
    assert "lorasae train / plain fwd+bwd" in proc.stdout
    assert result["model"] == str(tiny_world.model) and result["rank"] == 4
    assert result["tokens_per_step"] == result["batch_size"] * result["ctx"] == 2 * 32
    assert result["lora_layers"] == [2, 3]  # the layers after the layer-1 SAE, as `lorasae train`
    assert 0 < result["lora_params"] and 0 < result["base_params"]
    for step in ("lora_sae", "full_fwd_bwd", "lora_ce"):
        assert len(result["step_ms_all"][step]) == result["rounds"] == 3
        assert result["step_ms_median"][step] > 0
    for key in ("lora_sae_tokens_per_s", "full_fwd_bwd_tokens_per_s", "lora_ce_tokens_per_s",
                "lora_sae_vs_full_fwd_bwd", "lora_sae_vs_lora_ce", "lora_ce_vs_full_fwd_bwd"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    ratio = result["lora_sae_tokens_per_s"] / result["full_fwd_bwd_tokens_per_s"]
    assert result["lora_sae_vs_full_fwd_bwd"] == round(ratio, 3)
