"""`lorasae ab`: two adapters and the base over the tiny world's held-out split, every number checked
against an independent computation (``lorasae.metrics.evaluate``, pandas on the Parquet file, SAE
latents recounted through plain hooks)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import plain_latents
from service_fixtures import make_adapter
from test_dashboards import lm, saes  # noqa: F401 - the tiny world's model and SAEs, per module
from tiny_world import CTX

from lorasae.cli import main
from lorasae.data import packed_sequences
from lorasae.metrics import evaluate
from lorasae.models import load_model
from lorasae.training.ab import AbConfig, adapter_names, run_ab
from lorasae.training.eval import load_adapter

TOKENS = 512  # the whole held-out split of the tiny world: 16 sequences at ctx 32
TOP = 6


@pytest.fixture(scope="module", autouse=True)
def _single_thread(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORASAE_HOME", str(tmp_path_factory.mktemp("lorasae_home_ab")))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapters(tiny_world, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("ab_adapters")
    saes = [tiny_world.sae1, tiny_world.sae2]
    return [make_adapter(tiny_world.model, root / "alpha", saes, seed=1),
            make_adapter(tiny_world.model, root / "beta", saes, seed=2)]


def config(world, adapters, **changes) -> AbConfig:
    cfg = AbConfig(model=str(world.model), adapters=[str(a) for a in adapters], corpus=str(world.corpus),
                   ctx=CTX, tokens=TOKENS, batch_size=8, top=TOP, device="cpu")
    return dataclasses.replace(cfg, **changes)


@pytest.fixture(scope="module")
def run(tiny_world, adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("ab") / "out"
    summary = run_ab(config(tiny_world, adapters), out)
    return out, summary, json.loads((out / "ab.json").read_text()), pd.read_parquet(out / "tokens.parquet")


@pytest.fixture(scope="module")
def sequences(tiny_world, lm):
    return packed_sequences(lm.tokenizer, "heldout", TOKENS, CTX, str(tiny_world.corpus))


def test_means_equal_evaluate(run, tiny_world, adapters, saes, sequences):
    _, summary, _, _ = run
    assert summary["sequences"] == sequences.shape[0] and summary["tokens"] == sequences.shape[0] * (CTX - 1)
    for path, name in zip(adapters, ("alpha", "beta")):
        model = load_adapter(load_model(str(tiny_world.model), "cpu", None).model, str(path))
        ref = evaluate(model, saes, sequences, 8, True, adapter=True, progress=False)
        assert summary["ce"]["clean"] == pytest.approx(ref["ce_clean"], abs=1e-5)
        assert summary["ce"]["base"] == pytest.approx(ref["ce_spliced"], abs=1e-5)
        assert summary["ce"][name] == pytest.approx(ref["ce_adapted_spliced"], abs=1e-5)
        entry = next(a for a in summary["adapters"] if a["name"] == name)
        assert entry["gap_closed"] == pytest.approx(ref["gap_closed"], abs=1e-4)
        assert entry["sae_set_differs"] is False
    assert summary["ce"]["alpha"] != summary["ce"]["beta"]  # different adapters, different numbers


def test_parquet_rows_reproduce_the_means(run, sequences):
    out, summary, _, df = run
    n, t = sequences.shape
    assert len(df) == n * (t - 1)
    assert list(df.columns[:3]) == ["sequence", "position", "token_id"]
    assert {"ce_clean", "ce_base", "ce_alpha", "ce_beta"} <= set(df.columns)
    expect = sequences[torch.tensor(df["sequence"].to_numpy()), torch.tensor(df["position"].to_numpy()) + 1]
    assert torch.equal(torch.as_tensor(df["token_id"].to_numpy()).long(), expect)
    assert df["position"].min() == 0 and df["position"].max() == t - 2
    for key in ("clean", "base", "alpha", "beta"):
        assert df[f"ce_{key}"].astype("float64").mean() == pytest.approx(summary["ce"][key], abs=1e-6)
    assert summary["files"]["tokens"] == str(out / "tokens.parquet")


def test_top_contexts_are_the_true_top(run):
    _, _, result, df = run
    tokenizer_marks = 0
    for entry in result["adapters"]:
        diff = df["ce_base"] - df[f"ce_{entry['name']}"]
        for direction, values in (("helps", diff[diff > 0].sort_values(ascending=False)),
                                  ("hurts", diff[diff < 0].sort_values())):
            listed = entry["top"][direction]
            assert len(listed) == min(TOP, len(values))
            assert [c["difference"] for c in listed] == pytest.approx(values.iloc[:TOP].tolist(), abs=1e-6)
            for c in listed:
                row = df[(df["sequence"] == c["sequence"]) & (df["position"] == c["position"])].iloc[0]
                assert c["ce_base"] == pytest.approx(row["ce_base"], abs=1e-6)
                assert c["ce_adapter"] == pytest.approx(row[f"ce_{entry['name']}"], abs=1e-6)
                assert c["token_id"] == row["token_id"]
                assert c["text"].endswith(f"[[{c['token']}]]")
                tokenizer_marks += 1
    assert tokenizer_marks > 0


def test_enrichment_equals_a_brute_force_recount(run, lm, saes, sequences):
    _, _, result, _ = run
    found = plain_latents(lm.model, saes, sequences)
    n, t = sequences.shape
    listed = 0
    for entry in result["adapters"]:
        for direction in ("helps", "hurts"):
            places = [(c["sequence"], c["position"]) for c in entry["top"][direction] if c["position"] >= 1]
            for block in entry["latents"][direction]:
                active = found[block["layer"]] > 0  # [S, T, d]
                assert block["tokens"] == len(places)
                density = active[:, 1 : t - 1].sum((0, 1)).double() / (n * (t - 2))
                counts = torch.stack([active[s, p] for s, p in places]).sum(0) if places else None
                expect = []
                if counts is not None:
                    for latent in torch.nonzero(counts >= 2).flatten().tolist():
                        enrich = (int(counts[latent]) / len(places)) / float(density[latent])
                        expect.append((-enrich, -int(counts[latent]), latent))
                expect.sort()
                assert [r["latent"] for r in block["latents"]] == [e[2] for e in expect[:10]]
                for r in block["latents"]:
                    assert r["count"] == int(counts[r["latent"]])
                    assert r["density"] == pytest.approx(float(density[r["latent"]]), rel=1e-9)
                    assert r["enrichment"] == pytest.approx(
                        (r["count"] / len(places)) / float(density[r["latent"]]), rel=1e-9)
                    listed += 1
    assert listed > 0


def test_buckets_equal_a_pandas_groupby(run):
    _, summary, _, df = run
    buckets = summary["buckets"]
    assert sum(b["tokens"] for b in buckets) == len(df)
    counts = df["token_id"].value_counts()
    order = sorted(counts.index, key=lambda tok: (-counts[tok], tok))
    rank = {tok: i + 1 for i, tok in enumerate(order)}
    df = df.assign(rank=df["token_id"].map(rank))
    assert (df["rank"] == df["freq_rank"]).all()
    df["bucket"] = pd.cut(df["rank"], [0, 10, 100, 1000, 10000, float("inf")],
                          labels=["1-10", "11-100", "101-1000", "1001-10000", ">10000"])
    grouped = df.groupby("bucket", observed=True)
    nonempty = 0
    for b in buckets:
        if b["tokens"] == 0:
            assert b["ce_base"] is None and b["bucket"] not in grouped.groups
            continue
        nonempty += 1
        g = grouped.get_group(b["bucket"])
        assert b["tokens"] == len(g) and b["distinct"] == g["token_id"].nunique()
        assert b["ce_base"] == pytest.approx(g["ce_base"].astype("float64").mean(), abs=1e-6)
        for name in ("alpha", "beta"):
            assert b["adapters"][name]["ce"] == pytest.approx(g[f"ce_{name}"].astype("float64").mean(), abs=1e-6)
            gain = (g["ce_base"] - g[f"ce_{name}"]).astype("float64").mean()
            assert b["adapters"][name]["gain"] == pytest.approx(gain, abs=1e-6)
    assert nonempty >= 2


def test_plot_and_json_written(run):
    out, summary, result, _ = run
    assert (out / "ab.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["config"]["adapters"] == [a["path"] for a in summary["adapters"]]
    assert result["ce"] == summary["ce"] and result["buckets"] == summary["buckets"]


def test_adapter_names_are_unique_and_safe():
    assert adapter_names(["runs/a", "other/a", "x/base", "y/a.b"]) == ["a", "a-2", "base-2", "a_b"]


def test_cli_prints_the_summary_last(tiny_world, adapters, tmp_path, capsys):
    out = tmp_path / "ab"
    rc = main(["ab", "--adapter", str(adapters[0]), "--model", str(tiny_world.model), "--corpus",
               str(tiny_world.corpus), "--ctx", str(CTX), "--tokens", str(2 * CTX), "--device", "cpu",
               "--top", "2", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert rc in (0, None)
    result = json.loads(stdout[stdout.index("{"):])
    assert result["tokens"] == 2 * (CTX - 1) and set(result["ce"]) == {"clean", "base", "alpha"}
    assert (out / "tokens.parquet").is_file()


def test_another_sae_set_is_refused_unless_given_explicitly(tiny_world, adapters, tmp_path):
    one = make_adapter(tiny_world.model, tmp_path / "one", [tiny_world.sae1], seed=3)
    with pytest.raises(Exception, match="another SAE set"):
        run_ab(config(tiny_world, [adapters[0], one], tokens=2 * CTX), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    summary = run_ab(config(tiny_world, [adapters[0], one], tokens=2 * CTX,
                            saes=[str(tiny_world.sae1), str(tiny_world.sae2)]), tmp_path / "given")
    assert [a["sae_set_differs"] for a in summary["adapters"]] == [False, True]


def test_adapter_for_another_model_is_one_error_line(tiny_world, adapters, tmp_path, capsys, monkeypatch):
    bad = make_adapter(tiny_world.model, tmp_path / "bad", [tiny_world.sae1, tiny_world.sae2], seed=4,
                       fingerprint="0123456789abcdef")
    out = tmp_path / "out"
    monkeypatch.delenv("LORASAE_DEBUG", raising=False)
    rc = main(["ab", "--adapter", str(adapters[0]), "--adapter", str(bad), "--model", str(tiny_world.model),
               "--corpus", str(tiny_world.corpus), "--ctx", str(CTX), "--tokens", str(2 * CTX),
               "--device", "cpu", "--out", str(out)])
    # stderr also has the model's loading progress bar; one error line, no traceback
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.strip().startswith("error")]
    assert rc == 2 and len(err) == 1 and "0123456789abcdef" in err[0] and "Traceback" not in stderr
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    ([], "at least one --adapter"),
    (["--adapter", "x", "--tokens", "8"], "--tokens must be at least --ctx"),
])
def test_bad_flags_are_one_error_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LORASAE_DEBUG", raising=False)
    rc = main(["ab", *argv, "--ctx", str(CTX), "--out", str(tmp_path / "o")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and message in err[0]
