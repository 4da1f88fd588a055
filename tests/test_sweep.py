"""`lorasae sweep` on the tiny world: the plan (run names), the table, the plots, reuse of finished
runs, resume of an interrupted one."""

from __future__ import annotations

import dataclasses
import json

import pytest
from tiny_world import CTX, D_MODEL

from lorasae.cli import main
from lorasae.training import loop as training_loop
from lorasae.training import sweep as sw
from lorasae.training.loop import LoopConfig
from lorasae.training.sweep import SweepConfig, plan, sae_slug
from lorasae.training.train_lora import train_lora


@pytest.fixture(scope="module")
def sparse_sae(tiny_world, tmp_path_factory):
    """A second TopK SAE at layer 1 with another k (the sparsity sweep needs two L0s)."""
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = TopKSAE(TopKSAEConfig(d_in=D_MODEL, d_sae=2 * D_MODEL, k=4,
                                metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    path = tmp_path_factory.mktemp("saes") / "k4"
    sae.save_model(str(path))
    return path


def _cfg(world, sparse) -> SweepConfig:
    loop = LoopConfig(model=str(world.model), corpus=str(world.corpus), ctx=CTX, batch_size=4,
                      tokens=6 * 4 * CTX, max_steps=6, eval_every=10**9, eval_tokens=256, lr=1e-2)
    return SweepConfig(loop=loop, sae=str(world.sae1), sparsity_saes=[str(sparse)],
                       layer_saes=[str(world.sae2)], ranks=[1, 4], rank=4, e2e_lr=1e-2)


def _names(world, sparse) -> dict[str, str]:
    """Short names of the planned runs -> their folder names (SAE slug: last path part + hash)."""
    slug = {"sae1": sae_slug(str(world.sae1)), "k4": sae_slug(str(sparse)),
            "sae2": sae_slug(str(world.sae2))}
    assert all(slug[short].startswith(short + "-") for short in slug)
    return {"lora-sae1-r1": f"lora-{slug['sae1']}-r1", "lora-sae1-r4": f"lora-{slug['sae1']}-r4",
            "lora-sae1-r4-all": f"lora-{slug['sae1']}-r4-all", "lora-k4-r4": f"lora-{slug['k4']}-r4",
            "lora-sae2-r4": f"lora-{slug['sae2']}-r4", "e2e-sae1": f"e2e-{slug['sae1']}",
            "e2e-k4": f"e2e-{slug['k4']}"}


def test_plan_shares_runs_between_sweeps(tiny_world, sparse_sae):
    n = _names(tiny_world, sparse_sae)
    runs = {r.name: r for r in plan(_cfg(tiny_world, sparse_sae))}
    assert set(runs) == set(n.values())
    assert runs[n["lora-sae1-r4"]].sweeps == ["rank", "layers", "layer", "sparsity"]
    assert runs[n["lora-sae1-r4-all"]].cfg.layers == "all" and runs[n["lora-sae1-r1"]].cfg.rank == 1
    assert runs[n["e2e-k4"]].cfg.saes == [str(sparse_sae)] and runs[n["e2e-k4"]].cfg.lr == 1e-2
    # every run sees the same data and schedule
    assert len({(r.cfg.max_steps, r.cfg.ctx, r.cfg.batch_size, r.cfg.seed) for r in runs.values()}) == 1


def test_plan_keeps_saes_with_the_same_last_path_part_apart(tiny_world, sparse_sae):
    """Regression: runs were named by the spec's last path part, so every Gemma Scope canonical id
    (``.../canonical``) collided and the ``--layer-sae`` run was merged into the base run."""
    base = "gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical"
    other = "gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical"
    cfg = dataclasses.replace(_cfg(tiny_world, sparse_sae), sae=base, layer_saes=[other],
                              sparsity_saes=[other], ranks=[4], e2e=False)
    runs = plan(cfg)
    assert len({r.name for r in runs}) == len(runs) == 3  # base r4, base r4 all, other r4
    by_spec = {(r.cfg.saes[0], r.cfg.layers): r for r in runs}
    assert by_spec[(other, "after")].sweeps == ["layer", "sparsity"]  # one run, shared
    assert by_spec[(base, "after")].sweeps == ["rank", "layers", "layer", "sparsity"]
    names = {r.name for r in runs}
    assert all(name.startswith("lora-canonical-") for name in names)
    assert by_spec[(base, "after")].name != by_spec[(other, "after")].name


def test_sweep_table_plots_and_reuse(tiny_world, sparse_sae, tmp_path, capsys, monkeypatch):
    cfg = _cfg(tiny_world, sparse_sae)
    n = _names(tiny_world, sparse_sae)
    args = ["sweep", "--model", cfg.loop.model, "--corpus", cfg.loop.corpus, "--ctx", str(CTX),
            "--batch-size", "4", "--steps", "6", "--eval-tokens", "256", "--lr", "1e-2",
            "--e2e-lr", "1e-2", "--sae", cfg.sae, "--sparsity-sae", cfg.sparsity_saes[0],
            "--layer-sae", cfg.layer_saes[0], "--ranks", "1,4", "--rank", "4", "--out", str(tmp_path)]
    assert main(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "gap closed" in captured.err  # the printed table
    rows = {r["name"]: r for r in result["rows"]}
    assert len(rows) == 7 and result == json.loads((tmp_path / "sweep.json").read_text())
    for name, r in rows.items():
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert r["steps"] == 6
        if r["kind"] == "lora":
            assert r["gap_closed"] == pytest.approx(metrics["final"]["gap_closed"])
            assert r["gap_closed"] == pytest.approx(
                (r["ce_spliced"] - r["ce_adapted_spliced"]) / (r["ce_spliced"] - r["ce_clean"]))
        else:
            assert r["ce_e2e"] == pytest.approx(metrics["final"]["ce_spliced"])
            assert r["ce_e2e"] < r["ce_spliced_given"]
    assert rows[n["lora-k4-r4"]]["l0"] == pytest.approx(4.0)
    assert rows[n["lora-sae1-r4"]]["l0"] == pytest.approx(8.0)
    assert rows[n["lora-sae2-r4"]]["layer"] == 2 and rows[n["lora-sae1-r4"]]["layer"] == 1
    assert rows[n["lora-sae1-r4"]]["gap_closed"] > 0 and rows[n["lora-sae1-r1"]]["gap_closed"] > 0
    for plot in ("sweep_rank.png", "sweep_pareto.png"):
        assert (tmp_path / plot).stat().st_size > 10_000

    def boom(*_a, **_k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(sw, "train_lora", boom)
    monkeypatch.setattr(sw, "train_e2e", boom)
    assert main(args + ["--only", "rank"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in again["rows"]] == [n["lora-sae1-r1"], n["lora-sae1-r4"]]
    assert again["rows"][0] == rows[n["lora-sae1-r1"]]
    # --report tabulates what is finished and trains nothing (rank 8 was never run)
    report_args = [a if a != "1,4" else "1,4,8" for a in args] + ["--only", "rank", "--report"]
    assert main(report_args) == 0
    reported = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in reported["rows"]] == [n["lora-sae1-r1"], n["lora-sae1-r4"]]
    assert not (tmp_path / f"lora-{sae_slug(cfg.sae)}-r8").exists()


def test_sweep_resumes_an_interrupted_run_and_reuses_the_finished_one(tiny_world, sparse_sae,
                                                                       tmp_path, monkeypatch):
    """A sweep killed in its second run: run again, it reuses the first run (no training) and
    resumes the second from its checkpoint instead of starting it over."""
    cfg = dataclasses.replace(_cfg(tiny_world, sparse_sae), ranks=[1, 2], e2e=False)
    first, second = (f"lora-{sae_slug(cfg.sae)}-r{rank}" for rank in (1, 2))
    real_checkpoint = training_loop._checkpoint

    def killed_after_checkpoint(run):
        real_checkpoint(run)
        if run.out.name == second and run.state.step == 3:
            raise KeyboardInterrupt  # what a kill does to this process: nothing after this point

    cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, checkpoint_every=3))
    monkeypatch.setattr(training_loop, "_checkpoint", killed_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        sw.run_sweep(cfg, tmp_path, only={"rank"})
    assert (tmp_path / first / "lorasae.json").is_file()
    assert (tmp_path / second / "checkpoint").is_dir() and not (tmp_path / second / "lorasae.json").exists()
    first_mtime = (tmp_path / first / "adapter_model.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(training_loop, "_checkpoint", real_checkpoint)
    calls = []

    def counting_train(run_cfg, out, resume=False):
        calls.append((out.name, resume))
        return train_lora(run_cfg, out, resume)

    monkeypatch.setattr(sw, "train_lora", counting_train)
    result = sw.run_sweep(cfg, tmp_path, only={"rank"})
    assert calls == [(second, True)]  # the finished run is not trained again
    assert (tmp_path / first / "adapter_model.safetensors").stat().st_mtime_ns == first_mtime
    assert [r["name"] for r in result["rows"]] == [first, second]
    assert all(r["steps"] == 6 for r in result["rows"])
    history = json.loads((tmp_path / second / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 7))  # steps 1-3 restored, 4-6 resumed
