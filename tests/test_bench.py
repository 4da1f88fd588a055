"""Smoke tests of bench/train.py and bench/generate.py (``make bench``'s training and generation
benchmarks) on the tiny world: each runs, and its JSON holds the timed paths and positive, finite
throughputs and ratios. CI does not gate on absolute times."""

from __future__ import annotations

import json
import os
import math
import subprocess
import sys
from pathlib import Path

from service_fixtures import world  # noqa: F401

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
    assert "residual cache / full passes" in proc.stdout
    assert result["same_loss_max_abs_diff"] < 1e-5 and result["loss_of_each_variant"][0] > 0
    assert result["prefix_layer"] == 1
    assert result["model"] == str(tiny_world.model) and result["rank"] == 4
    assert result["tokens_per_step"] == result["batch_size"] * result["ctx"] == 2 * 32
    assert result["lora_layers"] == [2, 3]  # the layers after the layer-1 SAE, as `lorasae train`
    assert 0 < result["lora_params"] and 0 < result["base_params"]
    for step in ("lora_sae", "lora_sae_shared", "lora_sae_cached", "full_fwd_bwd", "lora_ce"):
        assert len(result["step_ms_all"][step]) == result["rounds"] == 3
        assert result["step_ms_median"][step] > 0
    for key in ("lora_sae_tokens_per_s", "full_fwd_bwd_tokens_per_s", "lora_ce_tokens_per_s",
                "lora_sae_vs_full_fwd_bwd", "lora_sae_vs_lora_ce", "lora_ce_vs_full_fwd_bwd",
                "shared_prefix_speedup", "residual_cache_speedup", "lora_sae_cached_vs_lora_ce"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    ratio = result["lora_sae_tokens_per_s"] / result["full_fwd_bwd_tokens_per_s"]
    assert result["lora_sae_vs_full_fwd_bwd"] == round(ratio, 3)
    cached = result["lora_sae_cached_tokens_per_s"] / result["lora_sae_tokens_per_s"]
    assert result["residual_cache_speedup"] == round(cached, 3)


def test_generate_bench_quick(tiny_world, tmp_path):
    out = tmp_path / "bench-output" / "generate.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "generate.py"), "--quick", "--model", str(tiny_world.model),
         "--sae", str(tiny_world.sae1), "--threads", "1", "--rounds", "2", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout[proc.stdout.index("{"):]) == result  # the table, then the same JSON
    assert "served POST /v1/generate (spliced, 1 intervention)" in proc.stdout
    assert result["model"] == str(tiny_world.model) and result["saes"] == ["sae1"]
    assert result["new_tokens"] == 8 and result["prompts"] == 8
    assert result["intervention"] == {"sae": "sae1", "latent": 0, "op": "add", "value": 2.0}
    assert set(result["batches"]) == {"1", "8"}
    for entry in result["batches"].values():
        assert entry["baseline"]["tokens"] == [8 * 8] * 2  # eos suppressed: exactly 8 new tokens each
        assert sum(entry["finish_reasons"].values()) == 8 * 2
        for path in ("baseline", "served", "loop_spliced", "loop_plain"):
            tps = entry[path]["tokens_per_s"]
            assert isinstance(tps, float) and math.isfinite(tps) and tps > 0, path
            assert all(0 < n <= 64 for n in entry[path]["tokens"]), path
        ratio = entry["served_vs_baseline"]
        assert math.isfinite(ratio) and ratio > 0
        assert ratio == round(entry["served"]["tokens_per_s"] / entry["baseline"]["tokens_per_s"], 3)
        assert result["goal"] == 0.8 and entry["pass"] == (ratio >= 0.8)
        assert len(entry["served"]["vs_baseline_rounds"]) == 2
        assert 0 < entry["served"]["server_seconds_median"] <= entry["served"]["seconds_median"]


def test_serve_bench_quick(world, tmp_path):
    """bench/serve.py on the tiny world: the naive server and every timed forward answer rows (a
    refused row would time nothing), and the residency rows time a load from each tier."""
    out = tmp_path / "serve.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "serve.py"), "--quick", "--model", str(world.model),
         "--sae", str(world.saes[1]), "--device", "cpu", "--threads", "1", "--requests", "24",
         "--swap-reps", "8", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "one-row forward, adapter on disk (ms)" in proc.stdout
    for key in ("served_tokens_per_s", "bare_tokens_per_s", "naive_tokens_per_s", "reload_from_disk_ms"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    first = result["first_request_ms"]
    assert set(first) == {"hot", "cpu", "disk"} and all(v > 0 for v in first.values())


def test_scale_bench_small(tmp_path):
    """bench/scale.py (``make bench-gpu``'s script) end to end on a tiny model on CPU: every
    measured path and tier is in its JSON with positive numbers, so the GPU run has no surprise."""
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "scale.py"), "--small", "--device", "cpu", "--mixes", "1,8",
         "--rounds", "1", "--client-procs", "1", "--clients", "8", "--requests-per-client", "2",
         "--swap-reps", "2", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert not result["partial"] and result["config"]["residency_api"]
    for mix in ("1", "8"):
        entry = result["mixes"][mix]
        for key in ("bare_tokens_per_s", "served_tokens_per_s", "naive_tokens_per_s", "served_vs_bare",
                    "served_vs_naive"):
            assert math.isfinite(entry[key]) and entry[key] > 0, (mix, key)
        assert 1 <= entry["served_mean_adapters_per_batch"] <= int(mix)
    swap = result["swap"]
    assert all(swap[tier]["first_request_ms"] > 0 and swap[tier]["n"] == 2 for tier in ("hot", "cpu", "disk"))
    assert swap["hot"]["load_ms"] == 0 and swap["disk"]["load_ms"] > 0 and swap["cpu"]["load_ms"] > 0
    assert swap["residency"]["loads"] == {"cpu": 2, "disk": 2}
