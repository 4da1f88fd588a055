"""`lorasae dashboards`: exactly mergeable statistics, an exact causal effect, Parquet that pandas and
DuckDB read without lorasae, resume after an interruption, and 2 processes under
``accelerate launch`` giving the 1-process result. All on the tiny world (tests/tiny_world.py),
checked against independent computations with plain hooks."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import manual_logits, plain_latents
from service_fixtures import make_adapter
from test_train_lora import BIN, SUBPROCESS_TIMEOUT, free_port, subprocess_env
from tiny_world import CTX

from lorasae.cli import main
from lorasae.dashboards import (
    Dashboard,
    DashboardManifest,
    latents_file,
    log_edges,
    write_latents,
)
from lorasae.data import packed_sequences
from lorasae.manifest import adapter_file_fingerprint
from lorasae.models import final_norm, load_model, logits_from_hidden
from lorasae.saes import load_sae
from lorasae.training import dashboards as job_module
from lorasae.training.dashboards import DashboardConfig, run_dashboards
from lorasae.training.shards import WORK_DIR
from lorasae.training.latent_stats import LatentStats

TOKENS = 4096  # 128 sequences of the tiny world's train split at ctx 32
SHARD = 16


@pytest.fixture(scope="module", autouse=True)
def _single_thread(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the accelerate subprocesses run (OMP_NUM_THREADS=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORASAE_HOME", str(tmp_path_factory.mktemp("lorasae_home_dashboards")))
        yield
    torch.set_num_threads(threads)


def config(world, **changes) -> DashboardConfig:
    cfg = DashboardConfig(
        model=str(world.model),
        saes=[str(world.sae1), str(world.sae2)],
        corpus=str(world.corpus),
        ctx=CTX,
        tokens=TOKENS,
        batch_size=8,
        shard_sequences=SHARD,
        device="cpu",
    )
    return dataclasses.replace(cfg, **changes)


def cli_args(cfg: DashboardConfig, out: Path) -> list[str]:
    args = ["--out", str(out), "--model", cfg.model, "--corpus", cfg.corpus, "--ctx", str(cfg.ctx),
            "--tokens", str(cfg.tokens), "--batch-size", str(cfg.batch_size),
            "--shard-sequences", str(cfg.shard_sequences), "--device", "cpu"]
    for spec in cfg.saes:
        args += ["--sae", spec]
    return args


@pytest.fixture(scope="module")
def reference(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("dash") / "ref"
    summary = run_dashboards(config(tiny_world), out)
    return out, summary


@pytest.fixture(scope="module")
def lm(tiny_world):
    return load_model(str(tiny_world.model), "cpu", None)


@pytest.fixture(scope="module")
def saes(tiny_world, lm):
    return [load_sae(str(tiny_world.sae1), model=lm.model), load_sae(str(tiny_world.sae2), model=lm.model)]


@pytest.fixture(scope="module")
def dense(tiny_world, lm, saes):
    """Independently: every sequence's SAE latents [S, ctx, d] per layer, through plain hooks."""
    seqs = packed_sequences(lm.tokenizer, "train", TOKENS, CTX, str(tiny_world.corpus))
    return seqs, plain_latents(lm.model, saes, seqs)


def tables(out: Path) -> dict[str, object]:
    return {p.name: pq.read_table(p) for p in sorted(out.glob("*.parquet"))}


# ---------------------------------------------------------------------- statistics


def _batch(seed: int, b: int = 6, t: int = 10, d: int = 24) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    lat = torch.relu(torch.randn(b, t, d, generator=gen)) * (torch.rand(b, t, d, generator=gen) < 0.3)
    lat[1, 4] = lat[0, 4]  # exact ties between tokens
    return lat


def test_latent_stats_merge_in_any_order_equals_one_pass():
    edges = torch.tensor(log_edges(1e-2, 1e2, 5))
    lat = torch.cat([_batch(s) for s in range(4)])
    index = torch.arange(lat.shape[0] * lat.shape[1]).view(lat.shape[:2])
    valid = torch.ones(lat.shape[:2], dtype=torch.bool)
    valid[:, 0] = False

    def fresh() -> LatentStats:
        return LatentStats.empty(24, 5, len(edges) + 1, 2, 7)

    whole = fresh()
    whole.update(lat, index, edges, 4, valid)
    parts = []
    for i in range(4):
        part = fresh()
        part.update(lat[6 * i: 6 * i + 6], index[6 * i: 6 * i + 6], edges, 4, valid[6 * i: 6 * i + 6])
        parts.append(part)
    merged = fresh()
    for part in (parts[2], parts[0], parts[3], parts[1]):
        merged.merge(part)
    for name, value in whole.state_dict().items():
        other = merged.state_dict()[name]
        assert torch.equal(value.nan_to_num(-7.0), other.nan_to_num(-7.0)), name
    # against brute force: fired, max, histogram, top-5 per latent with windows
    x = torch.where(valid[..., None], lat, torch.zeros(()))
    flat = x.reshape(-1, 24)
    assert torch.equal(whole.fired, (flat > 0).sum(0))
    assert torch.allclose(whole.act_max, flat.max(0).values)
    assert torch.equal(whole.hist.sum(1), whole.fired)
    for j in range(24):
        best = sorted(((-float(v), i) for i, v in enumerate(flat[:, j].tolist()) if v > 0))[:5]
        assert [i for _, i in best] == [i for i in whole.top.index[j].tolist() if i >= 0]
        for slot, (_, i) in enumerate(best):
            b, t = divmod(i, lat.shape[1])
            lo = max(0, t - 4)
            window = whole.top.window[j, slot]
            assert torch.equal(window[lo - (t - 4): lo - (t - 4) + min(t + 3, lat.shape[1]) - lo],
                               lat[b, lo: t + 3, j])
    # samples: per (latent, bin) the 2 smallest keys among that bin's activations, and real ones
    kept = whole.samples
    for g in range(kept.index.shape[0]):
        for i, a in zip(kept.index[g].tolist(), kept.act[g].tolist()):
            if i >= 0:
                j = g // whole.hist.shape[1]
                assert flat[i, j] == a and int(torch.bucketize(torch.tensor(a), edges, right=True)) == \
                    g % whole.hist.shape[1]


def test_every_latent_has_a_row_with_numbers_of_an_independent_pass(reference, dense, saes):
    out, summary = reference
    seqs, found = dense
    manifest = DashboardManifest.load(out)
    assert manifest.tokens == seqs.shape[0] * (CTX - 1) == summary["tokens"]
    assert manifest.sequences == seqs.shape[0]
    dash = Dashboard.open(out)
    for sae, entry in zip(saes, summary["saes"]):
        table = pq.read_table(out / latents_file(sae.layer)).to_pydict()
        assert table["latent"] == list(range(sae.d_sae))
        lat = found[sae.layer][:, 1:]  # BOS excluded
        flat = lat.reshape(-1, sae.d_sae)
        fired = (flat > 0).sum(0)
        assert table["fired"] == fired.tolist()
        assert [j for j, d in enumerate(table["dead"]) if d] == entry["dead"] == \
            torch.nonzero(fired == 0).flatten().tolist()
        assert 0 < len(entry["dead"]) < sae.d_sae  # random SAEs: some latents never fire
        assert table["density"] == [f / flat.shape[0] for f in fired.tolist()]
        assert table["max_activation"] == pytest.approx(flat.max(0).values.tolist(), abs=1e-5)
        assert [sum(h) for h in table["hist_counts"]] == table["fired"]
        for j in range(0, sae.d_sae, 5):
            record = dash.record(sae.layer, j)
            column = found[sae.layer][:, :, j].clone()
            column[:, 0] = 0
            values, where = column.reshape(-1).sort(descending=True, stable=True)
            n = min(manifest.settings.top_n, int((values > 0).sum()))
            assert [c["activation"] for c in record["top_contexts"]] == pytest.approx(values[:n].tolist(),
                                                                                       abs=1e-5)
            for c in record["top_contexts"] + record["quantile_contexts"]:
                seq, pos, start = c["sequence"], c["position"], c["start"]
                assert c["activation"] == pytest.approx(float(column[seq, pos]), abs=1e-5)
                assert c["token_ids"] == seqs[seq, start: start + len(c["token_ids"])].tolist()
                full = found[sae.layer][seq, start: start + len(c["token_ids"]), j]
                assert c["activations"] == pytest.approx(full.tolist(), abs=1e-5)
                assert start <= pos < start + len(c["token_ids"])
            top_positions = {(c["sequence"], c["position"]) for c in record["top_contexts"]}
            for c in record["quantile_contexts"]:
                assert c["interval"] in {"0-50%", "50-80%", "80-95%", "95-100%"}
                assert (c["sequence"], c["position"]) not in top_positions


def test_causal_effect_equals_an_independent_ablation_with_plain_hooks(reference, dense, lm, saes):
    out, _ = reference
    seqs, _ = dense
    dash = Dashboard.open(out)

    def logprobs(ids, ablate=None):
        def make(s):
            def fn(x):
                lat = s.sae.encode(x)
                if ablate is not None and ablate[0] == s.layer:
                    lat = lat.clone()
                    lat[0, ablate[2], ablate[1]] = 0.0
                return s.sae.decode(lat)
            return fn

        return torch.log_softmax(manual_logits(lm.model, ids, {s.layer: make(s) for s in saes}).float(), -1)

    checked = 0
    for sae in saes:
        for j in range(0, sae.d_sae, 9):
            record = dash.record(sae.layer, j)
            if record["dead"]:
                assert record["effect_contexts"] == 0 and record["effect_promoted_ids"] == []
                continue
            n = record["effect_contexts"]
            assert n == min(4, len(record["top_contexts"]))
            diffs = []
            for c in record["top_contexts"][:n]:
                ids = seqs[c["sequence"]][None]
                diffs.append(logprobs(ids)[0, c["position"]]
                             - logprobs(ids, (sae.layer, j, c["position"]))[0, c["position"]])
            mean = torch.stack(diffs).mean(0)
            k = len(record["effect_promoted_ids"])
            assert record["effect_promoted_ids"] == mean.topk(k).indices.tolist()
            assert record["effect_suppressed_ids"] == mean.topk(k, largest=False).indices.tolist()
            assert record["effect_promoted_values"] == pytest.approx(mean.topk(k).values.tolist(), abs=1e-4)
            checked += 1
    assert checked >= 6


def test_logit_lens_is_decoder_row_through_final_norm_and_unembedding(reference, lm, saes):
    out, _ = reference
    dash = Dashboard.open(out)
    for sae in saes:
        with torch.no_grad():
            logits = logits_from_hidden(lm.model, final_norm(lm.model)(sae.sae.W_dec))
        for j in (0, 17, 63):
            record = dash.record(sae.layer, j)
            assert record["lens_promoted_ids"] == logits[j].topk(10).indices.tolist()
            assert record["lens_suppressed_values"] == pytest.approx(
                logits[j].topk(10, largest=False).values.tolist(), abs=1e-5)


# ---------------------------------------------------------------------- storage


def test_pandas_and_duckdb_read_the_files_without_lorasae(reference):
    import duckdb
    import pandas as pd

    out, _ = reference
    frame = pd.read_parquet(out / latents_file(1))
    assert len(frame) == 64 and frame["latent"].tolist() == list(range(64))
    top = duckdb.sql(
        f"""
        SELECT l.latent, c.activation, t.text
        FROM read_parquet('{out / latents_file(1)}') AS l,
             UNNEST(l.top_contexts) AS u(c),
             read_parquet('{out / "tokens.parquet"}') AS t
        WHERE t.id = c.token_ids[c.position - c.start + 1]
        ORDER BY c.activation DESC LIMIT 1
        """
    ).fetchall()[0]
    assert top[1] == pytest.approx(float(frame["max_activation"].max()), abs=1e-6)
    assert isinstance(top[2], str) and top[2]


def test_one_latent_of_a_16k_sae_loads_from_one_row_group_within_50ms(tmp_path):
    d_sae, n = 16_384, 20
    window = {"sequence": 1, "position": 5, "activation": 1.5, "start": 0,
              "token_ids": list(range(17)), "activations": [0.5] * 17}
    ids = list(range(10))
    columns = {
        "latent": list(range(d_sae)), "fired": [3] * d_sae, "density": [1e-3] * d_sae,
        "mean_activation": [1.0] * d_sae, "max_activation": [2.0] * d_sae, "dead": [False] * d_sae,
        "hist_counts": [[1] * 51] * d_sae, "top_contexts": [[window] * n] * d_sae,
        "quantile_contexts": [[{"interval": "0-50%", **window}] * 16] * d_sae,
        "effect_contexts": [4] * d_sae,
        **{f"{p}_{w}_ids": [ids] * d_sae for p in ("lens", "effect") for w in ("promoted", "suppressed")},
        **{f"{p}_{w}_values": [[0.5] * 10] * d_sae for p in ("lens", "effect")
           for w in ("promoted", "suppressed")},
    }
    write_latents(tmp_path / latents_file(3), columns)
    meta = pq.ParquetFile(tmp_path / latents_file(3)).metadata
    assert meta.num_row_groups == d_sae // 64
    from lorasae.dashboards import Dashboard as D
    manifest = DashboardManifest.model_validate({
        "model_id": "m", "model_fingerprint": "f", "adapter": None, "corpus": "c", "split": "train",
        "ctx": 32, "sequences": 1, "tokens": 31, "hist_edges": log_edges(),
        "saes": [{"sae_id": "s", "hook_name": "blocks.3.hook_resid_post", "layer": 3, "d_sae": d_sae,
                  "fingerprint": "x", "file": latents_file(3), "dead": 0}],
        "settings": {"top_n": 20, "window_before": 12, "window_after": 4, "quantile_intervals": [[0, 1]],
                     "samples_per_interval": 4, "logit_top": 10, "effect_contexts": 4, "batch_size": 1,
                     "shard_sequences": 1},
    })
    manifest.save(tmp_path)
    dash = D.open(tmp_path)
    dash.record(3, 0)  # opens the file
    times = []
    for index in (5, 4_000, 9_999, 16_383, 12_345, 77, 8_191, 15_000, 3, 11_111):
        started = time.perf_counter()
        record = dash.record(3, index)
        times.append(time.perf_counter() - started)
        assert record["latent"] == index and len(record["top_contexts"]) == n
    assert sorted(times)[len(times) // 2] < 0.05, times


# ---------------------------------------------------------------------- resume, processes, CLI


class _Interrupt(Exception):
    pass


def _interrupt_after(mp: pytest.MonkeyPatch, owner: object, name: str, calls: int) -> None:
    """``owner.name`` raises (as a kill would stop the run) once it has been called ``calls`` times."""
    real = getattr(owner, name)
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise _Interrupt
        return real(*args, **kwargs)

    mp.setattr(owner, name, wrapped)


def test_resume_after_interruptions_in_both_passes_equals_one_run(reference, tiny_world, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "resumed"
    cfg = config(tiny_world)
    batches_per_shard = SHARD // cfg.batch_size
    with monkeypatch.context() as mp:  # killed in the statistics pass, in the 4th of 8 shards
        _interrupt_after(mp, LatentStats, "update", 2 * (3 * batches_per_shard + 1))  # 2 SAEs
        with pytest.raises(_Interrupt):
            run_dashboards(cfg, out)
    assert len(list((out / WORK_DIR).glob("stats-*.pt"))) == 3
    with pytest.raises(Exception, match="--resume"):
        run_dashboards(cfg, out)  # a non-empty folder is never overwritten silently
    with monkeypatch.context() as mp:  # killed in the effect pass, in the 3rd shard
        _interrupt_after(mp, job_module, "sequence_effects", 2 * SHARD + 1)
        with pytest.raises(_Interrupt):
            run_dashboards(cfg, out, resume=True)
    assert len(list((out / WORK_DIR).glob("effect-*.pt"))) == 2
    run_dashboards(cfg, out, resume=True)
    assert not (out / WORK_DIR).exists()
    ref_out, _ = reference
    assert tables(out).keys() == tables(ref_out).keys()
    for name, table in tables(out).items():
        assert table.equals(tables(ref_out)[name]), name
    with pytest.raises(Exception, match="already holds finished dashboards"):
        run_dashboards(cfg, out, resume=True)


def test_resume_with_other_settings_is_one_error_line(tiny_world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "d"
    (out / WORK_DIR).mkdir(parents=True)
    (out / WORK_DIR / "config.json").write_text('{"top_n": 3}')
    monkeypatch.delenv("LORASAE_DEBUG", raising=False)
    rc = main(["dashboards", *cli_args(config(tiny_world), out), "--resume"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "different settings" in lines[0] and "top_n" in lines[0]


def test_accelerate_two_processes_equal_one(reference, tiny_world, tmp_path):
    out = tmp_path / "ddp"
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           "-m", "lorasae.cli", "dashboards", *cli_args(config(tiny_world), out)]
    env = subprocess_env()
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert DashboardManifest.load(out).processes == 2
    ref_out, _ = reference
    for name, table in tables(out).items():
        assert table.equals(tables(ref_out)[name]), name


def test_dashboards_through_an_adapter_record_its_fingerprint(tiny_world, tmp_path):
    adapter = make_adapter(tiny_world.model, tmp_path / "adapter", [tiny_world.sae1], seed=3, layers=(2, 3))
    base, adapted = tmp_path / "base", tmp_path / "adapted"
    run_dashboards(config(tiny_world, saes=[str(tiny_world.sae1)]), base)
    run_dashboards(config(tiny_world, saes=[], adapter=str(adapter)), adapted)  # the adapter's SAE set
    manifest = DashboardManifest.load(adapted)
    assert manifest.adapter is not None and DashboardManifest.load(base).adapter is None
    assert manifest.adapter.fingerprint == adapter_file_fingerprint(adapter)
    assert [s.layer for s in manifest.saes] == [1]
    # LoRA on layers 2-3, the SAE at layer 1: where its latents fire cannot change ...
    for column in ("fired", "max_activation", "hist_counts", "top_contexts"):
        assert pq.read_table(adapted / latents_file(1)).column(column).equals(
            pq.read_table(base / latents_file(1)).column(column)), column
    # ... what they do downstream goes through the adapted layers, and does
    changed = pq.read_table(adapted / latents_file(1)).column("effect_promoted_values").to_pylist()
    same = pq.read_table(base / latents_file(1)).column("effect_promoted_values").to_pylist()
    assert sum(a != b for a, b in zip(changed, same)) > len([a for a in same if a]) // 2


# ---------------------------------------------------------------------- served


def test_served_record_and_features_latents_reproduce_the_stored_contexts(reference, tiny_world, tmp_path):
    """A stored top context, sent through POST /v1/features with latents=, gives the stored
    activation at the stored position; GET .../latents/{index} serves the stored record."""
    from fastapi.testclient import TestClient

    from lorasae.service.app import create_app
    from lorasae.service.engine import Engine
    from lorasae.service.settings import Settings

    out, _ = reference
    settings = Settings(model=str(tiny_world.model), saes=[str(tiny_world.sae1), str(tiny_world.sae2)],
                        adapter_root=tmp_path / "adapters", db_path=tmp_path / "registry.sqlite3",
                        device="cpu", dashboards=[str(out)])
    (tmp_path / "adapters").mkdir()
    engine = Engine.from_settings(settings)
    seqs = packed_sequences(engine.lm.tokenizer, "train", TOKENS, CTX, str(tiny_world.corpus))
    dash = Dashboard.open(out)
    checked = 0
    try:
        with TestClient(create_app(settings, engine), base_url="http://localhost") as client:
            for layer in (1, 2):
                sae = engine.names[layer]
                for j in (3, 20, 41):
                    stored = dash.record(layer, j)
                    served = client.get(f"/v1/saes/{layer}/latents/{j}")
                    assert served.status_code == 200, served.text
                    body = served.json()
                    assert body["sae"] == sae and body["index"] == j and body["fired"] == stored["fired"]
                    contexts = stored["top_contexts"] + stored["quantile_contexts"]
                    assert [c["activation"] for c in body["top_contexts"] + body["quantile_contexts"]] == \
                        [c["activation"] for c in contexts]
                    for c in contexts[:3]:
                        ids = seqs[c["sequence"]].tolist()
                        answer = client.post("/v1/features", json={
                            "inputs": [ids], "latents": {sae: [j]}, "top_k": 1})
                        assert answer.status_code == 200, answer.text
                        tokens = answer.json()["results"][0]["tokens"]
                        assert tokens[c["position"]]["latents"][sae][str(j)] == \
                            pytest.approx(c["activation"], abs=1e-4)
                        window = [t["latents"][sae][str(j)] for t in
                                  tokens[c["start"]: c["start"] + len(c["activations"])]]
                        assert window == pytest.approx(c["activations"], abs=1e-4)
                        checked += 1
    finally:
        engine.close()
    assert checked >= 10


def test_a_run_that_fails_to_load_leaves_out_untouched(tiny_world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "d"
    monkeypatch.delenv("LORASAE_DEBUG", raising=False)
    rc = main(["dashboards", *cli_args(config(tiny_world, saes=[str(tmp_path / "no-such-sae")]), out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip().startswith("error")]
    assert rc == 2 and len(err) == 1 and "no-such-sae" in err[0]
    assert not out.exists()  # so the corrected command runs without --resume
