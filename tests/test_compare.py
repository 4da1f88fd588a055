"""`lorasae compare`: the speed-up arithmetic, the JSON against independent evaluations, reuse of
finished runs, resume of an interrupted one, presets."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
from tiny_world import CTX

from lorasae.cli import main
from lorasae.errors import LorasaeError
from lorasae.training import compare as cmp
from lorasae.training import loop as training_loop
from lorasae.training.compare import (
    CompareConfig,
    format_compare,
    run_compare,
    sae_training_seconds,
    summarise,
    time_to_reach,
)
from lorasae.training.eval import EvalConfig, run_eval
from lorasae.training.loop import LoopConfig
from lorasae.training.plots import _compare_title, compare_figure, plot_compare
from lorasae.training.train_e2e import train_e2e


def _metrics(
    start: float, evals: list[tuple[float, int, float]], final: tuple[float, int, float], **final_extra
) -> dict:
    return {
        "start": {"heldout_ce": start, "ce_clean": 1.0, "ce_spliced": start},
        "history": [{"seconds": s, "tokens": t, "heldout_ce": ce} for s, t, ce in evals],
        "train": {"seconds": final[0], "tokens": final[1]},
        "final": {
            "heldout_ce": final[2],
            "gap_closed": 0.5,
            "ce_adapted_clean": 1.01,
            "l0": 8.0,
            "explained_variance": 0.9,
            **final_extra,
        },
    }


def test_time_to_reach_interpolates_and_reports_never():
    pts = [
        {"seconds": 0, "tokens": 0, "ce": 3.0},
        {"seconds": 10, "tokens": 100, "ce": 2.0},
        {"seconds": 20, "tokens": 200, "ce": 1.5},
    ]
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


def _tiny_loop(tiny_world, **fields) -> LoopConfig:
    """The tiny world's loop settings shared by the runs here (``fields``: the rest)."""
    return LoopConfig(
        model=str(tiny_world.model),
        saes=[str(tiny_world.sae1)],
        corpus=str(tiny_world.corpus),
        ctx=CTX,
        batch_size=4,
        eval_tokens=256,
        lr=1e-2,
        **fields,
    )


@pytest.fixture(scope="module")
def compared(tiny_world, tmp_path_factory):
    loop = _tiny_loop(tiny_world, tokens=4096, max_steps=12, eval_every=3, checkpoint_every=4)
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
    return float(np.interp(target, ce[i - 1 : i + 1][::-1], x[i - 1 : i + 1][::-1]))


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
        assert [p["ce"] for p in pts] == [
            metrics["start"]["heldout_ce"],
            *evals,
            metrics["final"]["heldout_ce"],
        ]
        assert all(a["seconds"] <= b["seconds"] for a, b in zip(pts, pts[1:]))  # 10 ms resolution
        assert pts[-1]["seconds"] > 0

    # the CEs against an independent evaluation of what each run saved
    def evaluate(**what) -> dict:
        return run_eval(EvalConfig(model=str(tiny_world.model), tokens=cfg.loop.eval_tokens, ctx=CTX,
                                   corpus=str(tiny_world.corpus), **what))

    given = evaluate(saes=[str(tiny_world.sae1)])
    e2e_saved = evaluate(saes=[str(out / "e2e")])
    adapter = evaluate(adapter=str(out / "lora"))
    assert result["ce_clean"] == pytest.approx(given["ce_clean"], abs=1e-5)
    assert result["ce_spliced"] == pytest.approx(given["ce_spliced"], abs=1e-5)
    assert e2e["start_ce"] == pytest.approx(given["ce_spliced"], abs=1e-5)  # finetune: the given SAE
    assert result["target_ce"] == pytest.approx(e2e_saved["ce_spliced"], abs=1e-5)
    assert lora["final_ce"] == pytest.approx(adapter["ce_adapted_spliced"], abs=1e-5)
    assert e2e["final_ce"] < given["ce_spliced"] and lora["final_ce"] < given["ce_spliced"]

    # times and tokens to the target, and their ratios, recomputed from the curves
    for key in ("seconds", "tokens"):
        want = {
            name: _crossing(result[name]["curve"], e2e_saved["ce_spliced"], key) for name in ("lora", "e2e")
        }
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
        [p["ce"] for p in result["e2e"]["curve"]], abs=1e-6
    )
    assert resumed["e2e"]["train"]["steps"] == 12


def test_paper_preset_is_one_command_and_explicit_flags_win(tiny_world, tmp_path, capsys):
    """The GPU reproduction command (README), run on the tiny world: the preset supplies the
    paper's settings, the flags given for a tiny model override only what they name."""
    out = tmp_path / "paper"
    rc = main(
        [
            "compare",
            "--preset",
            "paper",
            "--model",
            str(tiny_world.model),
            "--sae",
            str(tiny_world.sae1),
            "--corpus",
            str(tiny_world.corpus),
            "--ctx",
            str(CTX),
            "--max-steps",
            "4",
            "--tokens",
            "1024",
            "--eval-every",
            "2",
            "--eval-tokens",
            "256",
            "--out",
            str(out),
        ]
    )
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


# Both targets: LoRA-SAE reaches the e2e run's final CE, and the e2e run LoRA-SAE's final CE or not.
# LoRA: 3.0 -> 2.2 at 10 s -> 1.5 at 20 s -> final 1.6 at 30 s (first reaches 1.6 at 10 + 0.6/0.7 * 10)
_LORA = _metrics(3.0, [(10, 100, 2.2), (20, 200, 1.5)], (30, 300, 1.6))


def _by_name(result: dict) -> dict:
    assert [t["name"] for t in result["targets"]] == ["e2e_final", "lora_final"]
    return {t["name"]: t for t in result["targets"]}


def test_summarise_both_targets_when_e2e_reaches_both():
    # e2e: 3.0 -> 2.0 at 50 s -> 1.5 at 100 s -> final 1.7 at 150 s: it passes LoRA's final CE (1.6)
    # on the way down (at 50 + 0.4/0.5 * 50 = 90 s) though its own final is above it
    e2e = _metrics(3.0, [(50, 400, 2.0), (100, 800, 1.5)], (150, 1200, 1.7))
    e2e["train"]["stop_reason"] = "max steps"
    result = summarise(CompareConfig(e2e_init="scratch"), _LORA, e2e, sae_seconds=20.0)
    at_e2e, at_lora = _by_name(result)["e2e_final"], _by_name(result)["lora_final"]

    lora_to_17 = 10 + 0.5 / 0.7 * 10  # LoRA reaches e2e's final 1.7
    e2e_to_17 = 50 + 0.3 / 0.5 * 50  # = 80 s
    assert at_e2e["ce"] == 1.7 and at_e2e["lower_bound"] is False
    assert at_e2e["lora_seconds"] == pytest.approx(lora_to_17)
    assert at_e2e["e2e_seconds"] == pytest.approx(80.0) == pytest.approx(e2e_to_17)
    assert at_e2e["speedup"] == pytest.approx(80.0 / lora_to_17)
    assert at_e2e["speedup_including_sae_training"] == pytest.approx(80.0 / (lora_to_17 + 20.0))
    assert at_e2e["lora_tokens"] == pytest.approx(100 + 0.5 / 0.7 * 100)
    assert at_e2e["e2e_tokens"] == pytest.approx(400 + 0.3 / 0.5 * 400)
    assert "both runs reached" in at_e2e["note"]

    lora_to_16 = 10 + 0.6 / 0.7 * 10
    assert at_lora["ce"] == 1.6 and at_lora["lower_bound"] is False
    assert at_lora["lora_seconds"] == pytest.approx(lora_to_16)  # first reached, not the final 30 s
    assert at_lora["e2e_seconds"] == pytest.approx(90.0)
    assert at_lora["speedup"] == pytest.approx(90.0 / lora_to_16)
    assert at_lora["speedup_including_sae_training"] == pytest.approx(90.0 / (lora_to_16 + 20.0))

    # today's keys are the e2e_final target's
    assert result["target_ce"] == 1.7
    assert result["speedup"] == at_e2e["speedup"]
    assert result["speedup_tokens"] == at_e2e["speedup_tokens"]
    assert result["speedup_including_sae_training"] == at_e2e["speedup_including_sae_training"]
    assert result["lora"]["seconds_to_target"] == at_e2e["lora_seconds"]
    assert result["e2e"]["seconds_to_target"] == at_e2e["e2e_seconds"]
    assert (result["lora"]["best_ce"], result["lora"]["final_ce"]) == (1.5, 1.6)
    assert (result["e2e"]["best_ce"], result["e2e"]["final_ce"]) == (1.5, 1.7)
    assert result["e2e"]["reached_lora_final_ce"] is True
    assert "note" not in result
    json.dumps(result, allow_nan=False)  # plain JSON

    text = format_compare(result)
    assert (
        "same CE as e2e's final (1.7000): LoRA-SAE 17 s, e2e 80 s -> 4.7x (incl. SAE training 2.2x)" in text
    )
    assert "LoRA-SAE's final CE (1.6000): LoRA-SAE 19 s, e2e 90 s -> 4.8x (incl. SAE training 2.3x)" in text
    assert "LoRA-SAE's final CE (1.6000)" in text and "lower bound" not in text


def test_summarise_lower_bound_when_e2e_never_reaches_lora_final():
    # e2e: 3.0 -> 2.6 at 40 s -> 2.3 at 80 s -> final 2.2 at 120 s, stopped by time: never 1.6
    e2e = _metrics(3.0, [(40, 100, 2.6), (80, 200, 2.3)], (120, 300, 2.2))
    e2e["train"]["stop_reason"] = "max minutes"
    result = summarise(CompareConfig(e2e_init="scratch"), _LORA, e2e, sae_seconds=40.0)
    at_e2e, at_lora = _by_name(result)["e2e_final"], _by_name(result)["lora_final"]

    assert at_e2e["lora_seconds"] == pytest.approx(10.0)  # 2.2 is LoRA's 10 s point
    assert at_e2e["e2e_seconds"] == pytest.approx(120.0)
    assert at_e2e["speedup"] == pytest.approx(12.0) and at_e2e["lower_bound"] is False
    assert at_e2e["speedup_including_sae_training"] == pytest.approx(120 / 50)

    lora_to_16 = 10 + 0.6 / 0.7 * 10  # 18.571... s
    assert at_lora["ce"] == 1.6
    assert at_lora["lora_seconds"] == pytest.approx(lora_to_16)
    assert at_lora["e2e_seconds"] is None and at_lora["e2e_tokens"] is None
    assert at_lora["lower_bound"] is True
    assert at_lora["speedup"] == pytest.approx(120.0 / lora_to_16)  # 6.46x at least
    assert at_lora["speedup_including_sae_training"] == pytest.approx(120.0 / (lora_to_16 + 40.0))
    assert at_lora["speedup_tokens"] == pytest.approx(300 / (100 + 0.6 / 0.7 * 100))
    assert "did not reach LoRA-SAE's final CE 1.6000" in at_lora["note"]
    assert "lower bounds" in at_lora["note"] and "max minutes" in at_lora["note"]
    assert "--e2e-max-minutes" in at_lora["note"]
    assert result["e2e"]["reached_lora_final_ce"] is False
    assert result["e2e"]["best_ce"] == result["e2e"]["final_ce"] == 2.2

    text = format_compare(result)
    assert (
        "LoRA-SAE's final CE (1.6000): LoRA-SAE 19 s, e2e not reached after 120 s "
        "-> >= 6.5x (incl. SAE training >= 2.0x) (lower bound)"
    ) in text
    assert (
        "same CE as e2e's final (2.2000): LoRA-SAE 10 s, e2e 120 s -> 12.0x (incl. SAE training 2.4x)" in text
    )


def test_summarise_without_sae_seconds_has_no_including_ratios():
    e2e = _metrics(3.0, [(40, 100, 2.6)], (120, 300, 2.2))
    result = summarise(CompareConfig(e2e_init="scratch"), _LORA, e2e, sae_seconds=None)
    assert result["sae_training_seconds"] is None
    assert result["speedup_including_sae_training"] is None
    for t in result["targets"]:
        assert t["speedup_including_sae_training"] is None
        assert t["speedup"] is not None
    assert _by_name(result)["lora_final"]["speedup"] == pytest.approx(120.0 / (10 + 0.6 / 0.7 * 10))
    text = format_compare(result)
    assert "incl. SAE training" not in text and "training time is unknown" in text


def test_sae_training_seconds_sums_the_recorded_parts(tmp_path):
    from lorasae.training.train_sae import SAE_TRAINING_FILE

    assert sae_training_seconds(str(tmp_path)) is None
    (tmp_path / SAE_TRAINING_FILE).write_text(
        json.dumps({"seconds_collecting": 12.5, "seconds_training": 30.0})
    )
    assert sae_training_seconds(str(tmp_path)) == pytest.approx(42.5)
    (tmp_path / SAE_TRAINING_FILE).write_text(
        json.dumps({"seconds_caching": 7.0, "seconds_collecting": 12.5, "seconds_training": 30.0})
    )
    assert sae_training_seconds(str(tmp_path)) == pytest.approx(49.5)
    (tmp_path / SAE_TRAINING_FILE).write_text(json.dumps({"model": "m"}))
    assert sae_training_seconds(str(tmp_path)) is None


def test_plot_compare_lower_bound_and_sparse_curves(tmp_path):
    e2e = _metrics(3.0, [(40, 100, 2.6), (80, 200, 2.3)], (120, 300, 2.2))
    e2e["train"]["stop_reason"] = "max minutes"
    result = summarise(CompareConfig(e2e_init="scratch"), _LORA, e2e, sae_seconds=50.0)
    fig = compare_figure(result)
    by_time, by_tokens = fig.axes[:2]
    assert by_time.get_xscale() == "log" and by_tokens.get_xscale() == "linear"
    # both runs plus LoRA shifted by the SAE's 50 s; the start (0 s) drawn at half of 10 s
    xs = [list(line.get_xdata()) for line in by_time.get_lines() if len(line.get_xdata()) > 2]
    assert [5.0, 10, 20, 30] in xs and [5.0, 40, 80, 120] in xs and [50, 60, 70, 80] in xs
    title = fig._suptitle.get_text()
    assert f"≥ {120 / (10 + 0.6 / 0.7 * 10):.1f}x" in title and "lower bound" in title
    assert "to e2e's final CE: 12.0x (2.0x incl. SAE training)" in title
    path = plot_compare(result, tmp_path / "compare.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000

    # only start and final points, e2e never reaching LoRA's final, no SAE seconds: still a plot
    sparse = summarise(
        CompareConfig(), _metrics(3.0, [], (0.0, 300, 2.0)), _metrics(3.0, [], (5.0, 300, 2.9)), None
    )
    assert _by_name(sparse)["lora_final"]["lower_bound"] is True
    # LoRA's 0 s: an unbounded ratio, written as null + a flag (compare.json stays strict JSON)
    assert _by_name(sparse)["lora_final"]["speedup"] is None
    assert _by_name(sparse)["lora_final"]["lora_starts_there"] is True
    json.dumps(sparse, allow_nan=False)
    assert "unbounded (LoRA-SAE starts there)" in format_compare(sparse)
    assert "∞x (LoRA-SAE starts there)" in _compare_title(sparse, sparse["targets"])
    assert plot_compare(sparse, tmp_path / "sparse.png").stat().st_size > 10_000


def _tiny_args(tiny_world, out, *extra: str) -> list[str]:
    return [
        "compare",
        "--model", str(tiny_world.model),
        "--sae", str(tiny_world.sae1),
        "--corpus", str(tiny_world.corpus),
        "--ctx", str(CTX),
        "--batch-size", "4",
        "--lr", "1e-2",
        "--e2e-lr", "1e-2",
        "--rank", "4",
        "--eval-every", "2",
        "--eval-tokens", "256",
        "--out", str(out),
        *extra,
    ]  # fmt: skip


def test_e2e_max_steps_makes_the_e2e_run_longer(tiny_world, tmp_path, capsys):
    out = tmp_path / "longer"
    rc = main(
        _tiny_args(
            tiny_world,
            out,
            "--max-steps",
            "3",
            "--tokens",
            "512",
            "--e2e-init",
            "scratch",
            "--e2e-max-steps",
            "7",
        )
    )
    assert rc == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    lora = json.loads((out / "lora" / "metrics.json").read_text())
    e2e = json.loads((out / "e2e" / "metrics.json").read_text())
    assert lora["train"]["steps"] == 3 and e2e["train"]["steps"] == 7
    assert (lora["config"]["max_steps"], lora["config"]["tokens"]) == (3, 512)  # the LoRA run as given
    # 512 tokens are 4 steps of 4 x 32: the e2e run's 7 steps are 2 epochs over the same tokens
    assert (e2e["config"]["max_steps"], e2e["config"]["tokens"], e2e["config"]["epochs"]) == (7, 512, 2)
    assert e2e["train"]["tokens"] == 7 * 4 * CTX and e2e["train"]["seconds"] > 0
    assert printed["config"]["e2e_max_steps"] == 7 and printed["config"]["e2e_max_minutes"] is None
    assert printed["e2e"]["train"]["steps"] == 7

    # compare.json's targets agree with the curves (recomputed independently) and the run records
    result = json.loads((out / "compare.json").read_text())
    targets = {t["name"]: t for t in result["targets"]}
    assert targets["e2e_final"]["ce"] == e2e["final"]["heldout_ce"]
    assert targets["lora_final"]["ce"] == lora["final"]["heldout_ce"]
    for t in targets.values():
        lora_s = _crossing(result["lora"]["curve"], t["ce"], "seconds")
        e2e_s = _crossing(result["e2e"]["curve"], t["ce"], "seconds")
        assert _same(t["lora_seconds"], lora_s) and _same(t["e2e_seconds"], e2e_s), t["name"]
        assert t["lower_bound"] is (e2e_s is None and lora_s is not None)
        e2e_cost = e2e["train"]["seconds"] if t["lower_bound"] else e2e_s
        assert _same(t["speedup"], None if lora_s is None else e2e_cost / lora_s)
    assert result["e2e"]["reached_lora_final_ce"] is (targets["lora_final"]["e2e_seconds"] is not None)
    assert result["e2e"]["best_ce"] == min(p["ce"] for p in result["e2e"]["curve"])
    assert (out / "compare.png").stat().st_size > 10_000
    # the human summary on stderr: one line per target
    assert "same CE as e2e's final (" in captured.err and "LoRA-SAE's final CE (" in captured.err


def test_compare_continues_an_e2e_run_stopped_by_time(tiny_world, tmp_path, monkeypatch):
    """--e2e-max-minutes stops the e2e run (after its first step here) and keeps its checkpoint;
    run again with more time and the e2e run goes on from step 1 to its step limit, the LoRA run
    reused."""
    loop = _tiny_loop(tiny_world, tokens=1024, max_steps=2, eval_every=1, checkpoint_every=10)
    out = tmp_path / "continued"
    first_cfg = CompareConfig(
        loop=loop, rank=4, e2e_lr=1e-2, e2e_init="scratch", e2e_max_steps=3, e2e_max_minutes=1e-6
    )
    first = run_compare(first_cfg, out)
    assert first["lora"]["train"]["steps"] == 2
    assert first["e2e"]["train"]["steps"] == 1 and first["e2e"]["train"]["stop_reason"] == "max minutes"
    assert (out / "e2e" / "checkpoint" / "state.pt").is_file()  # kept: the run can go on
    history_1 = json.loads((out / "e2e" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history_1] == [1]

    def boom(*_a, **_k):
        raise AssertionError("the finished LoRA run was trained again")

    calls = []

    def counting_e2e(run_cfg, run_out, resume=False):
        calls.append(resume)
        return train_e2e(run_cfg, run_out, resume)

    monkeypatch.setattr(cmp, "train_lora", boom)
    monkeypatch.setattr(cmp, "train_e2e", counting_e2e)
    again = run_compare(replace(first_cfg, e2e_max_minutes=None), out)
    assert calls == [True]
    assert again["lora"] == first["lora"]
    e2e = json.loads((out / "e2e" / "metrics.json").read_text())
    assert e2e["train"]["steps"] == 3 and e2e["train"]["stop_reason"] == "max steps"
    assert e2e["train"]["tokens"] == 3 * 4 * CTX
    assert [h["step"] for h in e2e["history"]] == [1, 2, 3]
    assert e2e["history"][0] == history_1[0]  # the first step is the first run's, not redone
    assert e2e["history"][-1]["seconds"] >= history_1[0]["seconds"]
    assert again["e2e"]["start_ce"] == first["e2e"]["start_ce"]
    assert [p["tokens"] for p in again["e2e"]["curve"]] == [0, 4 * CTX, 2 * 4 * CTX, 3 * 4 * CTX]
    assert again["config"]["e2e_max_minutes"] is None
    assert json.loads((out / "compare.json").read_text())["e2e"]["train"]["steps"] == 3
    assert not (out / "e2e" / "checkpoint").exists()  # finished by its step limit: nothing to go on from
