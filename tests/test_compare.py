"""`lorasae compare`: the speed-up arithmetic, the JSON's consistency, reuse of finished runs, presets."""

from __future__ import annotations

import json

import pytest

from lorasae.training import compare as cmp
from lorasae.training.cli import main
from lorasae.training.compare import CompareConfig, run_compare, summarise, time_to_reach
from lorasae.training.loop import LoopConfig
from tiny_world import CTX


def _metrics(start: float, evals: list[tuple[float, int, float]], final: tuple[float, int, float],
             **final_extra) -> dict:
    return {"start": {"heldout_ce": start, "ce_clean": 1.0, "ce_spliced": start},
            "history": [{"seconds": s, "tokens": t, "heldout_ce": ce} for s, t, ce in evals],
            "train": {"seconds": final[0], "tokens": final[1]},
            "final": {"heldout_ce": final[2], "gap_closed": 0.5, "ce_adapted_clean": 1.01,
                      "l0": 8.0, "explained_variance": 0.9, **final_extra}}


def test_time_to_reach_interpolates_and_reports_never():
    pts = [{"seconds": 0, "tokens": 0, "ce": 3.0}, {"seconds": 10, "tokens": 100, "ce": 2.0},
           {"seconds": 20, "tokens": 200, "ce": 1.5}]
    assert time_to_reach(pts, 2.5) == pytest.approx(5.0)
    assert time_to_reach(pts, 1.75, "tokens") == pytest.approx(150.0)
    assert time_to_reach(pts, 3.5) == 0.0
    assert time_to_reach(pts, 1.0) is None


def test_summarise_speedup_from_synthetic_curves():
    lora = _metrics(3.0, [(10, 100, 2.2), (20, 200, 2.0)], (30, 300, 1.9))
    e2e = _metrics(3.0, [(40, 100, 2.6), (80, 200, 2.3)], (120, 300, 2.2))
    result = summarise(CompareConfig(), lora, e2e, sae_seconds=50.0)
    assert result["target_ce"] == 2.2
    assert result["lora"]["seconds_to_target"] == pytest.approx(10.0)
    assert result["e2e"]["seconds_to_target"] == pytest.approx(120.0)
    assert result["speedup"] == pytest.approx(12.0)
    assert result["speedup_tokens"] == pytest.approx(3.0)
    assert result["speedup_including_sae_training"] == pytest.approx(120 / 60)
    never = summarise(CompareConfig(), _metrics(3.0, [], (30, 300, 2.5)), e2e, None)
    assert never["speedup"] is None and "did not reach" in never["note"]


@pytest.fixture(scope="module")
def compared(tiny_world, tmp_path_factory):
    loop = LoopConfig(model=str(tiny_world.model), saes=[str(tiny_world.sae1)],
                      corpus=str(tiny_world.corpus), ctx=CTX, batch_size=4, tokens=4096,
                      max_steps=12, eval_every=3, eval_tokens=256, lr=1e-2)
    cfg = CompareConfig(loop=loop, rank=4, e2e_lr=1e-2)
    out = tmp_path_factory.mktemp("compare")
    return cfg, out, run_compare(cfg, out)


def test_compare_json_is_consistent(compared):
    cfg, out, result = compared
    on_disk = json.loads((out / "compare.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert (out / "compare.png").stat().st_size > 10_000
    lora, e2e = result["lora"], result["e2e"]
    for run in (lora, e2e):
        pts = run["curve"]
        assert [p["tokens"] for p in pts] == [0, 3 * 4 * CTX, 6 * 4 * CTX, 9 * 4 * CTX, 12 * 4 * CTX]
        assert all(a["seconds"] <= b["seconds"] for a, b in zip(pts, pts[1:]))  # 10 ms resolution
        assert pts[-1]["seconds"] > 0
        assert pts[-1]["seconds"] == run["train"]["seconds"]
    assert result["target_ce"] == e2e["final_ce"] == e2e["curve"][-1]["ce"]
    assert e2e["start_ce"] == pytest.approx(result["ce_spliced"])  # finetune: starts at the given SAE
    assert e2e["final_ce"] < result["ce_spliced"]  # e2e training helps
    assert lora["final_ce"] < result["ce_spliced"]
    assert e2e["seconds_to_target"] is not None and e2e["seconds_to_target"] <= e2e["train"]["seconds"]
    if lora["seconds_to_target"] is not None:
        assert lora["seconds_to_target"] <= lora["train"]["seconds"]
        assert result["speedup"] == pytest.approx(e2e["seconds_to_target"] / lora["seconds_to_target"])
    else:
        assert result["speedup"] is None
    assert result["sae_training_seconds"] is None  # the tiny SAE was not made by train-sae


def test_compare_reuses_finished_runs_and_refuses_other_settings(compared, monkeypatch):
    cfg, out, result = compared

    def boom(*_a, **_k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(cmp, "train_lora", boom)
    monkeypatch.setattr(cmp, "train_e2e", boom)
    assert run_compare(cfg, out) == result
    other = CompareConfig(loop=cfg.loop, rank=8, e2e_lr=cfg.e2e_lr)
    with pytest.raises(Exception, match="other settings"):
        run_compare(other, out)


def test_paper_preset_is_one_command_and_explicit_flags_win(tiny_world, tmp_path, capsys):
    """The GPU reproduction command (README), run on the tiny world: the preset supplies the
    paper's settings, the flags given for a tiny model override only what they name."""
    out = tmp_path / "paper"
    rc = main(["compare", "--preset", "paper", "--model", str(tiny_world.model), "--sae",
               str(tiny_world.sae1), "--corpus", str(tiny_world.corpus), "--ctx", str(CTX),
               "--max-steps", "4", "--tokens", "1024", "--eval-every", "2", "--eval-tokens", "256",
               "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    cfg = printed["config"]
    assert (cfg["rank"], cfg["layers"], cfg["loop"]["lr"], cfg["loop"]["batch_size"]) == (64, "after", 5e-5, 1)
    assert (cfg["loop"]["ctx"], cfg["loop"]["max_steps"], cfg["loop"]["tokens"]) == (CTX, 4, 1024)
    lora = json.loads((out / "lora" / "lorasae.json").read_text())
    assert lora["lora"]["rank"] == 64 and lora["lora"]["alpha"] == 32.0 and lora["lora"]["dropout"] == 0.1
    assert printed["lora"]["train"]["steps"] == 4 and printed["e2e"]["train"]["steps"] == 4
    assert (out / "compare.png").is_file() and (out / "e2e" / "cfg.json").is_file()
