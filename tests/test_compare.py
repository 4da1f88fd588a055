"""`lorasae compare`: the speed-up arithmetic, the JSON against independent evaluations, reuse of
finished runs, resume of an interrupted one, presets."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_world import CTX

from lorasae.cli import main
from lorasae.errors import LorasaeError
from lorasae.training import compare as cmp
from lorasae.training import loop as training_loop
from lorasae.training.compare import CompareConfig, run_compare, summarise, time_to_reach
from lorasae.training.eval import EvalConfig, run_eval
from lorasae.training.loop import LoopConfig
from lorasae.training.train_e2e import train_e2e


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
                      max_steps=12, eval_every=3, eval_tokens=256, lr=1e-2, checkpoint_every=4)
    cfg = CompareConfig(loop=loop, rank=4, e2e_lr=1e-2)
    out = tmp_path_factory.mktemp("compare")
    return cfg, out, run_compare(cfg, out)


def _crossing(points: list[dict], target: float, key: str) -> float | None:
    """Where a piecewise-linear CE curve first reaches ``target``, computed with numpy (an
    independent check of ``time_to_reach``)."""
    import numpy as np

    ce = np.array([p["ce"] for p in points])
    x = np.array([p[key] for p in points], dtype=float)
    below = np.flatnonzero(ce <= target)
    if below.size == 0:
        return None
    i = int(below[0])
    if i == 0:
        return 0.0
    # on the segment [i-1, i] CE falls through target: invert CE(x) there
    return float(np.interp(target, ce[i - 1:i + 1][::-1], x[i - 1:i + 1][::-1]))


def _same(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a == pytest.approx(b))


def test_compare_json_is_consistent(compared, tiny_world):
    cfg, out, result = compared
    on_disk = json.loads((out / "compare.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert (out / "compare.png").stat().st_size > 10_000
    lora, e2e = result["lora"], result["e2e"]
    for name, run in (("lora", lora), ("e2e", e2e)):
        metrics = json.loads((out / name / "metrics.json").read_text())  # the run's own record
        pts = run["curve"]
        assert [p["tokens"] for p in pts] == [0, 3 * 4 * CTX, 6 * 4 * CTX, 9 * 4 * CTX, 12 * 4 * CTX]
        evals = [h["heldout_ce"] for h in metrics["history"] if "heldout_ce" in h]
        assert [p["ce"] for p in pts] == [metrics["start"]["heldout_ce"], *evals,
                                          metrics["final"]["heldout_ce"]]
        assert all(a["seconds"] <= b["seconds"] for a, b in zip(pts, pts[1:]))  # 10 ms resolution
        assert pts[-1]["seconds"] > 0

    # the CEs against an independent evaluation of what each run saved
    given = run_eval(EvalConfig(model=str(tiny_world.model), saes=[str(tiny_world.sae1)],
                                tokens=cfg.loop.eval_tokens, ctx=CTX, corpus=str(tiny_world.corpus)))
    e2e_saved = run_eval(EvalConfig(model=str(tiny_world.model), saes=[str(out / "e2e")],
                                    tokens=cfg.loop.eval_tokens, ctx=CTX, corpus=str(tiny_world.corpus)))
    adapter = run_eval(EvalConfig(model=str(tiny_world.model), adapter=str(out / "lora"),
                                  tokens=cfg.loop.eval_tokens, ctx=CTX, corpus=str(tiny_world.corpus)))
    assert result["ce_clean"] == pytest.approx(given["ce_clean"], abs=1e-5)
    assert result["ce_spliced"] == pytest.approx(given["ce_spliced"], abs=1e-5)
    assert e2e["start_ce"] == pytest.approx(given["ce_spliced"], abs=1e-5)  # finetune: the given SAE
    assert result["target_ce"] == pytest.approx(e2e_saved["ce_spliced"], abs=1e-5)
    assert lora["final_ce"] == pytest.approx(adapter["ce_adapted_spliced"], abs=1e-5)
    assert e2e["final_ce"] < given["ce_spliced"] and lora["final_ce"] < given["ce_spliced"]

    # times and tokens to the target, and their ratios, recomputed from the curves
    for key in ("seconds", "tokens"):
        want = {name: _crossing(result[name]["curve"], e2e_saved["ce_spliced"], key)
                for name in ("lora", "e2e")}
        for name in ("lora", "e2e"):
            assert _same(result[name][f"{key}_to_target"], want[name]), (name, key)
        ratio = None if None in want.values() else want["e2e"] / want["lora"]
        assert _same(result["speedup" if key == "seconds" else "speedup_tokens"], ratio)
    assert e2e["seconds_to_target"] is not None  # the e2e run reaches its own final CE
    assert result["sae_training_seconds"] is None  # the tiny SAE was not made by train-sae


def test_compare_reuses_finished_runs_and_refuses_other_settings(compared, monkeypatch):
    cfg, out, result = compared

    def boom(*_a, **_k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(cmp, "train_lora", boom)
    monkeypatch.setattr(cmp, "train_e2e", boom)
    assert run_compare(cfg, out) == result
    other = CompareConfig(loop=cfg.loop, rank=8, e2e_lr=cfg.e2e_lr)
    with pytest.raises(LorasaeError, match="other settings"):
        run_compare(other, out)


def test_compare_resumes_an_interrupted_run(compared, tmp_path, monkeypatch):
    """Killed in its e2e run (the LoRA run finished): run again, the LoRA run is reused, the e2e
    run resumes from its checkpoint, and the results are the uninterrupted run's."""
    cfg, out, result = compared
    again = tmp_path / "again"
    shutil.copytree(out / "lora", again / "lora")
    real_checkpoint = training_loop._checkpoint

    def killed_after_checkpoint(run):
        real_checkpoint(run)
        if run.out.name == "e2e" and run.state.step == 8:
            raise KeyboardInterrupt  # what a kill does to this process: nothing after this point

    def boom(*_a, **_k):
        raise AssertionError("the finished LoRA run was trained again")

    monkeypatch.setattr(cmp, "train_lora", boom)
    monkeypatch.setattr(training_loop, "_checkpoint", killed_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg, again)
    assert (again / "e2e" / "checkpoint").is_dir() and not (again / "e2e" / "cfg.json").exists()

    monkeypatch.setattr(training_loop, "_checkpoint", real_checkpoint)
    calls = []

    def counting_e2e(run_cfg, run_out, resume=False):
        calls.append(resume)
        return train_e2e(run_cfg, run_out, resume)

    monkeypatch.setattr(cmp, "train_e2e", counting_e2e)
    resumed = run_compare(cfg, again)
    assert calls == [True]
    assert resumed["lora"] == result["lora"]  # reused as it was
    for key in ("start_ce", "final_ce", "l0", "explained_variance"):
        assert resumed["e2e"][key] == pytest.approx(result["e2e"][key], abs=1e-6), key
    assert [p["tokens"] for p in resumed["e2e"]["curve"]] == [p["tokens"] for p in result["e2e"]["curve"]]
    assert [p["ce"] for p in resumed["e2e"]["curve"]] == pytest.approx(
        [p["ce"] for p in result["e2e"]["curve"]], abs=1e-6)
    assert resumed["e2e"]["train"]["steps"] == 12


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
    assert (cfg["rank"], cfg["layers"]) == (64, "after")
    assert (cfg["loop"]["lr"], cfg["loop"]["batch_size"]) == (5e-5, 1)
    assert (cfg["loop"]["ctx"], cfg["loop"]["max_steps"], cfg["loop"]["tokens"]) == (CTX, 4, 1024)
    lora = json.loads((out / "lora" / "lorasae.json").read_text())
    assert lora["lora"]["rank"] == 64 and lora["lora"]["alpha"] == 32.0 and lora["lora"]["dropout"] == 0.1
    assert printed["lora"]["train"]["steps"] == 4 and printed["e2e"]["train"]["steps"] == 4
    assert (out / "compare.png").is_file() and (out / "e2e" / "cfg.json").is_file()
