"""`lorasae drift`: the input side is exactly identical for an SAE before every adapted layer and
matches an independent computation elsewhere; a planted drift (an adapter built to reverse one
latent's effect) is found at rank 1; base vs base stays below the noise threshold; an interrupted
run resumes to the same report; 2 processes under ``accelerate launch`` give the 1-process report;
the files read in pandas and DuckDB. All on the tiny world (tests/tiny_world.py)."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import plain_latents
from service_fixtures import make_adapter
from test_dashboards import _Interrupt, _interrupt_after
from test_train_lora import BIN, SUBPROCESS_TIMEOUT, free_port, subprocess_env
from tiny_world import CTX

from lorasae.cli import main
from lorasae.data import packed_sequences
from lorasae.drift import DRIFT_COLUMNS, PLOT_FILE, DriftManifest, drift_file, read_drift
from lorasae.manifest import AdapterManifest, SaeEntry, adapter_file_fingerprint
from lorasae.models import load_model, model_fingerprint, output_head
from lorasae.saes import load_sae
from lorasae.training import drift as job_module
from lorasae.training.drift import DriftConfig, run_drift
from lorasae.training.shards import WORK_DIR
from lorasae.training.effects import EffectRows, sequence_effects
from lorasae.training.eval import load_adapter

TOKENS = 2048  # 64 sequences of the tiny world's train split at ctx 32
SHARD = 16


@pytest.fixture(scope="module", autouse=True)
def _single_thread(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the accelerate subprocesses run (OMP_NUM_THREADS=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORASAE_HOME", str(tmp_path_factory.mktemp("lorasae_home_drift")))
        yield
    torch.set_num_threads(threads)


def config(world, adapter: Path, **changes) -> DriftConfig:
    cfg = DriftConfig(adapter=str(adapter), model=str(world.model), corpus=str(world.corpus), ctx=CTX,
                      tokens=TOKENS, batch_size=8, shard_sequences=SHARD, noise_latents=32, device="cpu")
    return dataclasses.replace(cfg, **changes)


def cli_args(cfg: DriftConfig, out: Path) -> list[str]:
    return ["--adapter", cfg.adapter, "--against", cfg.against, "--out", str(out), "--model", cfg.model,
            "--corpus", cfg.corpus, "--ctx", str(cfg.ctx), "--tokens", str(cfg.tokens),
            "--batch-size", str(cfg.batch_size), "--shard-sequences", str(cfg.shard_sequences),
            "--noise-latents", str(cfg.noise_latents), "--device", "cpu"]


def columns(out: Path, layer: int) -> dict[str, list]:
    return read_drift(out, layer).to_pydict()


@pytest.fixture(scope="module")
def after(tiny_world, tmp_path_factory):
    """An adapter on layers 2-3 (random B) trained 'with' both SAEs (layers 1 and 2), and its report."""
    root = tmp_path_factory.mktemp("drift")
    adapter = make_adapter(tiny_world.model, root / "adapter", [tiny_world.sae1, tiny_world.sae2], seed=3,
                           layers=(2, 3))
    out = root / "report"
    summary = run_drift(config(tiny_world, adapter), out)
    return adapter, out, summary


# ---------------------------------------------------------------------- input side


def test_input_side_is_exactly_identical_for_an_sae_before_every_adapted_layer(after):
    _, out, summary = after
    manifest = DriftManifest.load(out)
    l1, l2 = manifest.sae(1), manifest.sae(2)
    assert l1.first_adapted_layer == 2 and l1.input_identical_by_construction
    assert not l2.input_identical_by_construction  # LoRA on layer 2 changes what the layer-2 SAE reads
    c = columns(out, 1)
    alive = [i for i, f in enumerate(c["fired_reference"]) if f > 0]
    assert len(alive) > 40
    assert c["fired_reference"] == c["fired_adapted"]
    assert all(c["pearson"][i] == pytest.approx(1.0, abs=1e-9) for i in alive)
    assert all(c["top_jaccard"][i] == 1.0 for i in alive)
    assert all(c["hist_js"][i] == pytest.approx(0.0, abs=1e-12) for i in alive)
    assert not any(c["input_drifted"]) and l1.summary.input_drifted == 0
    # ... while what those latents do downstream goes through layers 2-3, and changes
    assert l1.summary.output_drifted > 0
    assert summary["saes"][0]["input_identical_by_construction"] is True
    # the SAE at the adapted layer: its input side moves, well beyond noise
    assert l2.summary.input_drifted > l2.summary.alive // 4


def test_input_side_numbers_equal_an_independent_computation(after, tiny_world):
    adapter, out, _ = after
    lm = load_model(str(tiny_world.model), "cpu", None)
    saes = [load_sae(str(tiny_world.sae1), model=lm.model), load_sae(str(tiny_world.sae2), model=lm.model)]
    seqs = packed_sequences(lm.tokenizer, "train", TOKENS, CTX, str(tiny_world.corpus))
    x = plain_latents(lm.model, saes, seqs)[2][:, 1:].reshape(-1, saes[1].d_sae).double()
    y = plain_latents(load_adapter(lm.model, str(adapter)), saes, seqs)[2][:, 1:].reshape(x.shape).double()
    c = columns(out, 2)
    tokens = x.shape[0]
    assert c["fired_reference"] == (x > 0).sum(0).tolist()
    assert c["fired_adapted"] == (y > 0).sum(0).tolist()
    assert c["density_adapted"] == pytest.approx(((y > 0).sum(0) / tokens).tolist())
    checked = 0
    for j in range(x.shape[1]):
        if x[:, j].std() > 0 and y[:, j].std() > 0:
            r = torch.corrcoef(torch.stack([x[:, j], y[:, j]]))[0, 1].item()
            assert c["pearson"][j] == pytest.approx(r, abs=1e-4), j
            checked += 1
    assert checked > 20


# ---------------------------------------------------------------------- output side


def _planted_adapter(world, out: Path, latent: int) -> Path:
    """LoRA on the unembedding only, W' = W (I - 2 u u^T): reflects the direction u in which
    removing ``latent`` (SAE at layer 1) moves the final hidden state at its top contexts, so that
    latent's effect on the next-token distribution is reversed; nothing before the unembedding
    changes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lm = load_model(str(world.model), "cpu", None)
    sae = load_sae(str(world.sae1), model=lm.model)
    seqs = packed_sequences(lm.tokenizer, "train", TOKENS, CTX, str(world.corpus))
    acts = plain_latents(lm.model, [sae], seqs)[1][:, :, latent]
    acts[:, 0] = 0
    top = acts.flatten().topk(8).indices
    diffs = []
    for g in top.tolist():
        seq, pos = divmod(g, CTX)
        rows = EffectRows(*(torch.tensor([v]) for v in (1, latent, seq, pos)))
        clean, ablated = sequence_effects(lm.model, [sae], seqs[seq], rows, keep_first=True)
        diffs.append(clean - ablated)
    u = torch.cat(diffs).mean(0)
    u = u / u.norm()
    model = AutoModelForCausalLM.from_pretrained(world.model)
    w = output_head(model).weight.detach()
    peft_model = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0,
                                                  target_modules=["lm_head"]))
    head = output_head(peft_model)
    with torch.no_grad():
        head.lora_A["default"].weight.copy_(u[None])
        head.lora_B["default"].weight.copy_((-2 * w @ u)[:, None])
    peft_model.save_pretrained(out)
    AdapterManifest(base_model=str(world.model), base_model_fingerprint=model_fingerprint(lm.model),
                    saes=[SaeEntry.of(sae)], lora={"rank": 1, "target_modules": ["lm_head"]},
                    created_at="2025-01-01T00:00:00+00:00").save(out)
    return out


@pytest.fixture(scope="module")
def planted(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    lm = load_model(str(tiny_world.model), "cpu", None)
    sae = load_sae(str(tiny_world.sae1), model=lm.model)
    seqs = packed_sequences(lm.tokenizer, "train", TOKENS, CTX, str(tiny_world.corpus))
    fired = (plain_latents(lm.model, [sae], seqs)[1][:, 1:] > 0).sum((0, 1))
    latent = int(fired.argsort(descending=True)[3])  # a well-measured latent, not the densest
    return latent, _planted_adapter(tiny_world, root / "planted", latent)


def test_a_planted_drift_is_found_at_rank_1(planted, tiny_world, tmp_path):
    latent, adapter = planted
    out = tmp_path / "report"
    summary = run_drift(config(tiny_world, adapter), out)
    manifest = DriftManifest.load(out)
    first = manifest.ranked[0]
    assert (first.layer, first.latent, first.rank) == (1, latent, 1)
    assert "output" in first.sides and "input" not in first.sides
    assert first.evidence.startswith("output: effect cosine -")
    assert summary["most_drifted"][0]["latent"] == latent
    c = columns(out, 1)
    assert c["effect_cosine"][latent] < -0.5  # reversed
    assert c["effect_cosine"][latent] < manifest.sae(1).thresholds.effect_cosine
    assert c["rank"][latent] == 1
    # the unembedding is after every layer: the input side is identical by construction, and is
    assert manifest.sae(1).input_identical_by_construction and manifest.sae(1).first_adapted_layer is None
    assert not any(c["input_drifted"])
    assert manifest.adapter.fingerprint == adapter_file_fingerprint(adapter)


def test_base_vs_base_stays_below_the_noise_threshold(planted, tiny_world, tmp_path):
    """The same model on both sides: every statistic at its no-drift value, under every threshold
    (and the thresholds measure real noise: the halves differ)."""
    _, adapter = planted
    out = tmp_path / "self"
    run_drift(config(tiny_world, adapter, against=str(adapter)), out)
    manifest = DriftManifest.load(out)
    entry = manifest.sae(1)
    assert manifest.reference is not None and manifest.reference.fingerprint == manifest.adapter.fingerprint
    assert entry.summary.input_drifted == 0 and entry.summary.output_drifted == 0 and manifest.ranked == []
    th = entry.thresholds
    assert 0 < th.effect_cosine < 0.999 and th.hist_js > 0.01 and th.density_log_ratio > 0.1
    c = columns(out, 1)
    measured = [i for i, n in enumerate(c["effect_contexts"]) if n]
    assert len(measured) > 40
    assert all(c["effect_cosine"][i] == pytest.approx(1.0, abs=1e-5) for i in measured)
    assert all(c["effect_cosine"][i] > th.effect_cosine for i in measured)
    assert all(c["promoted_overlap"][i] == 1.0 for i in measured)
    assert max(c["score"]) < 1e-3


# ---------------------------------------------------------------------- runs, files


def tables(out: Path) -> dict[str, object]:
    return {p.name: pq.read_table(p) for p in sorted(out.glob("*.parquet"))}


def assert_same_tables(out: Path, ref_out: Path) -> None:
    """Equal values, NaN (undefined statistics) where the other has NaN too."""
    import pandas as pd

    mine, theirs = tables(out), tables(ref_out)
    assert mine.keys() == theirs.keys() == {drift_file(1), drift_file(2)}
    for name, table in mine.items():
        pd.testing.assert_frame_equal(table.to_pandas(), theirs[name].to_pandas(), check_exact=True, obj=name)


def test_resume_after_interruptions_in_both_passes_equals_one_run(after, tiny_world, tmp_path, monkeypatch):
    adapter, ref_out, _ = after
    cfg = config(tiny_world, adapter)
    out = tmp_path / "resumed"
    with monkeypatch.context() as mp:  # killed in the statistics pass, in the 3rd of 4 shards
        _interrupt_after(mp, job_module, "_latents", 2 * (2 * SHARD // cfg.batch_size + 1))
        with pytest.raises(_Interrupt):
            run_drift(cfg, out)
    assert len(list((out / WORK_DIR).glob("stats-*.pt"))) == 2
    with pytest.raises(Exception, match="--resume"):
        run_drift(cfg, out)
    with monkeypatch.context() as mp:  # killed in the effect pass, after 2 shards
        calls = {"n": 0}
        real = job_module.sequence_effects

        def counted(*args, **kwargs):
            calls["n"] += 1
            return real(*args, **kwargs)

        mp.setattr(job_module, "sequence_effects", counted)
        run_drift(dataclasses.replace(cfg), tmp_path / "count")  # how many calls a whole run makes
        total = calls["n"]
        _interrupt_after(mp, job_module, "sequence_effects", total // 2)
        with pytest.raises(_Interrupt):
            run_drift(cfg, out, resume=True)
    done = len(list((out / WORK_DIR).glob("effect-*.pt")))
    assert 0 < done < 4
    run_drift(cfg, out, resume=True)
    assert not (out / WORK_DIR).exists()
    assert_same_tables(out, ref_out)
    assert DriftManifest.load(out).ranked == DriftManifest.load(ref_out).ranked


def test_accelerate_two_processes_equal_one(after, tiny_world, tmp_path):
    adapter, ref_out, _ = after
    out = tmp_path / "ddp"
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           "-m", "lorasae.cli", "drift", *cli_args(config(tiny_world, adapter), out)]
    env = subprocess_env()
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert DriftManifest.load(out).processes == 2
    assert_same_tables(out, ref_out)
    assert "layer 1: input side 0/" in proc.stderr and "(identical by construction)" in proc.stderr


def test_files_read_in_pandas_and_duckdb_without_lorasae(after):
    import duckdb
    import pandas as pd

    _, out, _ = after
    frame = pd.read_parquet(out / drift_file(2))
    assert list(frame.columns) == DRIFT_COLUMNS and len(frame) == 64
    assert frame["rank"].sort_values().tolist() == list(range(1, 65))
    top = duckdb.sql(f"SELECT latent, score FROM '{out / drift_file(2)}' ORDER BY rank LIMIT 3").fetchall()
    assert [row[1] for row in top] == sorted(frame["score"], reverse=True)[:3]
    assert (out / PLOT_FILE).stat().st_size > 10_000
    nan = frame.loc[frame["fired_reference"] == 0, "pearson"]
    assert nan.isna().all()  # undefined, not 0


def test_bad_input_is_one_error_line_and_leaves_out_untouched(after, tiny_world, tmp_path, capsys,
                                                               monkeypatch):
    adapter, _, _ = after
    monkeypatch.delenv("LORASAE_DEBUG", raising=False)
    out = tmp_path / "d"
    for args, message in (
        (cli_args(config(tiny_world, adapter, against=str(tmp_path / "nope")), out), "nope"),
        (cli_args(config(tiny_world, tmp_path / "missing"), out), "missing"),
        (cli_args(config(tiny_world, adapter, noise_latents=-1), out), "--noise-latents"),
    ):
        rc = main(["drift", *args])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip().startswith("error")]
        assert rc == 2 and len(err) == 1 and message in err[0], err
        assert not out.exists()
    with pytest.raises(SystemExit):
        main(["drift", "--out", str(out)])  # --adapter is required
    assert "--adapter" in capsys.readouterr().err
