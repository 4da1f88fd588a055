"""`lorasae sweep` on the tiny world: the plan, the table, the plots, reuse of finished runs."""

from __future__ import annotations

import json

import pytest

from lorasae.training import sweep as sw
from lorasae.training.cli import main
from lorasae.training.loop import LoopConfig
from lorasae.training.sweep import SweepConfig, plan
from tiny_world import CTX, D_MODEL


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


def test_plan_shares_runs_between_sweeps(tiny_world, sparse_sae):
    runs = {r.name: r for r in plan(_cfg(tiny_world, sparse_sae))}
    assert set(runs) == {"lora-sae1-r1", "lora-sae1-r4", "lora-k4-r4", "e2e-sae1", "e2e-k4",
                         "lora-sae1-r4-all", "lora-sae2-r4"}
    assert runs["lora-sae1-r4"].sweeps == ["rank", "layers", "layer", "sparsity"]
    assert runs["lora-sae1-r4-all"].cfg.layers == "all" and runs["lora-sae1-r1"].cfg.rank == 1
    assert runs["e2e-k4"].cfg.saes == [str(sparse_sae)] and runs["e2e-k4"].cfg.lr == 1e-2
    # every run sees the same data and schedule
    assert len({(r.cfg.max_steps, r.cfg.ctx, r.cfg.batch_size, r.cfg.seed) for r in runs.values()}) == 1


def test_sweep_table_plots_and_reuse(tiny_world, sparse_sae, tmp_path, capsys, monkeypatch):
    cfg = _cfg(tiny_world, sparse_sae)
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
    assert rows["lora-k4-r4"]["l0"] == pytest.approx(4.0) and rows["lora-sae1-r4"]["l0"] == pytest.approx(8.0)
    assert rows["lora-sae2-r4"]["layer"] == 2 and rows["lora-sae1-r4"]["layer"] == 1
    assert rows["lora-sae1-r4"]["gap_closed"] > 0 and rows["lora-sae1-r1"]["gap_closed"] > 0
    for plot in ("sweep_rank.png", "sweep_pareto.png"):
        assert (tmp_path / plot).stat().st_size > 10_000

    def boom(*_a, **_k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(sw, "train_lora", boom)
    monkeypatch.setattr(sw, "train_e2e", boom)
    assert main(args + ["--only", "rank"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in again["rows"]] == ["lora-sae1-r1", "lora-sae1-r4"]
    assert again["rows"][0] == rows["lora-sae1-r1"]
    # --report tabulates what is finished and trains nothing (rank 8 was never run)
    report_args = [a if a != "1,4" else "1,4,8" for a in args] + ["--only", "rank", "--report"]
    assert main(report_args) == 0
    reported = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in reported["rows"]] == ["lora-sae1-r1", "lora-sae1-r4"]
    assert not (tmp_path / "lora-sae1-r8").exists()
