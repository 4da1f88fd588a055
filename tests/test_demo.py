"""`lorasae demo`'s pure parts: the recipe it trains with, the cache key of its adapter, the timing table.
(The demo itself runs on the default model: `make demo`, measured in the README.)"""

from __future__ import annotations

import dataclasses

from lorasae.training.demo import DemoConfig, adapter_dir, demo_config, format_timings
from lorasae.training.presets import CPU_LR, CPU_RANK, DEMO_EVAL_TOKENS, DEMO_STEPS


def test_demo_recipe_is_the_cpu_preset_with_a_schedule():
    cfg = demo_config(DemoConfig(), "/saes/default")
    assert cfg.max_steps == DEMO_STEPS and cfg.tokens == DEMO_STEPS * cfg.batch_size * cfg.ctx
    assert (cfg.rank, cfg.lr, cfg.lr_schedule) == (CPU_RANK, CPU_LR, "cosine")
    assert cfg.warmup_steps == DEMO_STEPS // 10 and cfg.saes == ["/saes/default"]
    assert cfg.eval_every == DEMO_STEPS  # no held-out evaluation between the start and the end
    assert cfg.eval_tokens == DEMO_EVAL_TOKENS
    assert cfg.residual_cache and cfg.layers == "after"


def test_adapter_cache_key_follows_the_recipe_not_the_time_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASAE_HOME", str(tmp_path))
    cfg = demo_config(DemoConfig(), "/saes/default")
    here = adapter_dir(cfg, "abc123")
    assert here.parent == tmp_path / "adapters" and here.name.startswith(f"demo-abc123-r{CPU_RANK}-")
    assert adapter_dir(dataclasses.replace(cfg, max_minutes=3.0), "abc123") == here
    assert adapter_dir(dataclasses.replace(cfg, saes=["/elsewhere"]), "abc123") == here  # SAE: by fingerprint
    assert adapter_dir(cfg, "def456") != here
    assert adapter_dir(dataclasses.replace(cfg, lr=cfg.lr / 2), "abc123") != here
    assert adapter_dir(dataclasses.replace(cfg, lr_schedule="constant"), "abc123") != here


def test_timing_table_marks_cached_parts_and_sums_nothing_itself():
    text = format_timings([("SAE: training", 12.34), ("adapter: training", None)], 99.0)
    lines = text.splitlines()
    assert lines[0].startswith("where the time went")
    assert lines[1].startswith("  SAE: training") and lines[1].endswith("12.3 s")
    assert lines[2].endswith("cached")
    assert lines[3].startswith("  total") and lines[3].endswith("99.0 s")
