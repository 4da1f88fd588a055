"""lorasae.metrics.evaluate checked against direct computations, and lorasae.data on a tmp corpus."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    StubTokenizer,
    build_model,
    make_identity_sae,
    make_topk_sae,
    manual_logits,
    peft_wrap,
    sae_fn,
    sample_sequences,
    wrap,
)

from lorasae import data
from lorasae.data import Document, packed_sequences, split_of, token_stream
from lorasae.errors import LorasaeError
from lorasae.metrics import evaluate
from lorasae.splice import residual_at

N_SEQ, T = 5, 12
K = 8


@pytest.fixture(scope="module")
def seqs() -> torch.Tensor:
    """Sequences sampled from the tiny Llama itself, so that any splice raises CE (ce_gap > 0)."""
    return sample_sequences(build_model("llama"), n=N_SEQ, seq=T)


def ce_of(logits: torch.Tensor, ids: torch.Tensor) -> float:
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v).double(), ids[:, 1:].reshape(-1)).item()


def kl_of(clean: torch.Tensor, other: torch.Tensor) -> float:
    """KL(clean || other) per predicted token."""
    logp = F.log_softmax(clean[:, :-1].double(), -1)
    logq = F.log_softmax(other[:, :-1].double(), -1)
    return F.kl_div(logq, logp, log_target=True, reduction="sum").item() / logp[..., 0].numel()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def run(model, saes, ids, **kw):
    return evaluate(model, saes, ids, batch_size=2, progress=False, **kw)


def sae_stats(model, sae, ids, skip_first=True):
    """l0, explained variance, dead latents, mse of ``sae`` on the clean residual, by hand."""
    x = residual_at(model, sae.layer, ids)
    z = sae.sae.encode(x)
    recon = sae.sae.decode(z)
    s = 1 if skip_first else 0
    x, z, recon = x[:, s:].reshape(-1, x.shape[-1]), z[:, s:].reshape(-1, z.shape[-1]), recon[:, s:]
    err = (x - recon.reshape(x.shape)).double().pow(2).sum()
    total = (x.double() - x.double().mean(0)).pow(2).sum()
    return {"l0": (z != 0).sum(-1).double().mean().item(),
            "explained_variance": 1 - (err / total).item(),
            "dead_latents": int(z.shape[-1] - (z != 0).any(0).sum()),
            "mse_per_token": (err / x.shape[0]).item()}


# ------------------------------------------------------------------ evaluate


@pytest.mark.parametrize("keep_first", [True, False])
def test_evaluate_one_topk_sae(llama, seqs, keep_first):
    sae = wrap(make_topk_sae(k=K), "topk")
    r = run(llama, [sae], seqs, keep_first=keep_first)

    assert r["tokens"] == N_SEQ * (T - 1)
    assert r["keep_first_position"] is keep_first
    assert r["ce_gap"] == pytest.approx(r["ce_spliced"] - r["ce_clean"], abs=1e-9)
    assert r["ce_gap"] > 0
    score = (r["ce_zero_ablation"] - r["ce_spliced"]) / (r["ce_zero_ablation"] - r["ce_clean"])
    assert r["ce_loss_score"] == pytest.approx(score, abs=1e-9)
    assert r["kl_spliced"] > 0
    assert "gap_closed" not in r and "ce_adapted_spliced" not in r

    # every CE / KL number against a direct computation on the model's logits
    clean = logits(llama, seqs)
    spliced = manual_logits(llama, seqs, {1: sae_fn(sae.sae)}, keep_first=keep_first)
    zeroed = manual_logits(llama, seqs, {1: torch.zeros_like}, keep_first=keep_first)
    assert r["ce_clean"] == pytest.approx(ce_of(clean, seqs), abs=1e-5)
    assert 0 < r["ce_clean"] < 2 * math.log(256)
    assert r["ce_spliced"] == pytest.approx(ce_of(spliced, seqs), abs=1e-5)
    assert r["ce_zero_ablation"] == pytest.approx(ce_of(zeroed, seqs), abs=1e-5)
    assert r["kl_spliced"] == pytest.approx(kl_of(clean, spliced), abs=1e-5)

    # SAE statistics
    (entry,) = r["saes"]
    assert entry["id"] == "topk" and entry["layer"] == 1 and entry["d_sae"] == sae.d_sae
    assert entry["hook_name"] == "blocks.1.hook_resid_post"
    assert "ce_spliced" not in entry  # single SAE: the top-level numbers are its numbers
    assert 0 < entry["l0"] <= K
    assert 0 <= entry["dead_latents"] <= sae.d_sae
    expected = sae_stats(llama, sae, seqs, skip_first=keep_first)
    for key in ("l0", "explained_variance", "mse_per_token"):
        assert entry[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert entry["dead_latents"] == expected["dead_latents"]
    assert r["l0"] == entry["l0"] and r["dead_latents"] == entry["dead_latents"]
    assert r["explained_variance"] == entry["explained_variance"]


def test_topk_l0_is_k_when_all_top_latents_fire(llama, seqs):
    # a large positive encoder bias makes every pre-activation positive: exactly k latents fire
    sae = wrap(make_topk_sae(k=K, enc_bias=100.0))
    r = run(llama, [sae], seqs)
    assert r["l0"] == K
    assert r["saes"][0]["l0"] == K


def test_evaluate_identity_sae(llama, seqs):
    sae = wrap(make_identity_sae())
    r = run(llama, [sae], seqs)
    assert r["ce_spliced"] == pytest.approx(r["ce_clean"], abs=1e-5)
    assert abs(r["ce_gap"]) < 1e-5
    assert abs(r["kl_spliced"]) < 1e-6
    assert r["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert r["saes"][0]["mse_per_token"] < 1e-10
    assert r["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert r["ce_zero_ablation"] > r["ce_clean"]
    # each coordinate fires as relu(x) or relu(-x): exactly d_in latents per token, none dead
    assert r["l0"] == pytest.approx(sae.sae.cfg.d_in, abs=1e-9)
    assert r["dead_latents"] == 0


def test_evaluate_is_independent_of_batch_size(llama, seqs):
    sae = wrap(make_topk_sae())
    a = evaluate(llama, [sae], seqs, batch_size=2, progress=False)
    b = evaluate(llama, [sae], seqs, batch_size=N_SEQ, progress=False)
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablation", "kl_spliced", "l0",
                "explained_variance", "dead_latents", "tokens"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_evaluate_two_saes(llama, seqs):
    sae0 = wrap(make_topk_sae(hook_name="blocks.0.hook_resid_post", seed=3), "L0")
    sae2 = wrap(make_topk_sae(hook_name="blocks.2.hook_resid_post", seed=4), "L2")
    r = run(llama, [sae0, sae2], seqs)
    assert [e["layer"] for e in r["saes"]] == [0, 2]
    both = manual_logits(llama, seqs, {0: sae_fn(sae0.sae), 2: sae_fn(sae2.sae)})
    assert r["ce_spliced"] == pytest.approx(ce_of(both, seqs), abs=1e-5)
    zeroed = manual_logits(llama, seqs, {0: torch.zeros_like, 2: torch.zeros_like})
    assert r["ce_zero_ablation"] == pytest.approx(ce_of(zeroed, seqs), abs=1e-5)
    for entry, sae in zip(r["saes"], (sae0, sae2)):
        single = run(llama, [sae], seqs)
        assert entry["ce_spliced"] == pytest.approx(single["ce_spliced"], abs=1e-9)
        assert entry["ce_gap"] == pytest.approx(entry["ce_spliced"] - r["ce_clean"], abs=1e-9)
        assert "ce_adapted_spliced" not in entry
        assert 0 < entry["l0"] <= sae.sae.cfg.k
    # the layer-0 SAE sees the clean residual; its stats equal the single-SAE run's
    assert r["saes"][0]["l0"] == pytest.approx(sae_stats(llama, sae0, seqs)["l0"], abs=1e-9)
    assert r["l0"] == pytest.approx((r["saes"][0]["l0"] + r["saes"][1]["l0"]) / 2, abs=1e-12)
    assert r["dead_latents"] == r["saes"][0]["dead_latents"] + r["saes"][1]["dead_latents"]
    assert r["tokens"] == N_SEQ * (T - 1)


def test_evaluate_with_adapter(seqs):
    model = build_model("llama")
    sae = wrap(make_topk_sae())
    plain = run(model, [sae], seqs)
    base_logits = logits(model, seqs)
    peft_model = peft_wrap(model, "llama", random_b=True)
    adapted_logits = logits(peft_model, seqs)
    assert (adapted_logits - base_logits).abs().max() > 1e-2  # the adapter does something

    r = run(peft_model, [sae], seqs, adapter=True)
    # clean / spliced / zero-ablation numbers come from the same weights with the adapter disabled
    for key in ("ce_clean", "ce_spliced", "ce_gap", "ce_zero_ablation", "kl_spliced", "l0",
                "explained_variance", "dead_latents"):
        assert r[key] == pytest.approx(plain[key], abs=1e-6), key
    adapted_spliced = manual_logits(peft_model, seqs, {1: sae_fn(sae.sae)})
    assert r["ce_adapted_spliced"] == pytest.approx(ce_of(adapted_spliced, seqs), abs=1e-5)
    assert r["ce_adapted_clean"] == pytest.approx(ce_of(adapted_logits, seqs), abs=1e-5)
    assert r["kl_adapted_spliced"] == pytest.approx(kl_of(base_logits, adapted_spliced), abs=1e-5)
    assert r["ce_gap"] > 0
    expected = (r["ce_spliced"] - r["ce_adapted_spliced"]) / r["ce_gap"]
    assert r["gap_closed"] == pytest.approx(expected, abs=1e-9)
    assert r["ce_adapted_spliced"] != pytest.approx(r["ce_spliced"], abs=1e-4)


def test_evaluate_with_adapter_two_saes(seqs):
    model = build_model("llama")
    sae0 = wrap(make_topk_sae(hook_name="blocks.0.hook_resid_post", seed=3), "L0")
    sae2 = wrap(make_topk_sae(hook_name="blocks.2.hook_resid_post", seed=4), "L2")
    peft_model = peft_wrap(model, "llama", random_b=True)
    r = run(peft_model, [sae0, sae2], seqs, adapter=True)
    both = manual_logits(peft_model, seqs, {0: sae_fn(sae0.sae), 2: sae_fn(sae2.sae)})
    assert r["ce_adapted_spliced"] == pytest.approx(ce_of(both, seqs), abs=1e-5)
    assert r["ce_gap"] > 0
    closed = (r["ce_spliced"] - r["ce_adapted_spliced"]) / r["ce_gap"]
    assert r["gap_closed"] == pytest.approx(closed, abs=1e-9)
    for entry, sae in zip(r["saes"], (sae0, sae2)):
        adapted = manual_logits(peft_model, seqs, {sae.layer: sae_fn(sae.sae)})
        assert entry["ce_adapted_spliced"] == pytest.approx(ce_of(adapted, seqs), abs=1e-5)
        assert entry["ce_gap"] > 0
        closed = (entry["ce_spliced"] - entry["ce_adapted_spliced"]) / entry["ce_gap"]
        assert entry["gap_closed"] == pytest.approx(closed, abs=1e-9)


def test_gap_closed_undefined_without_gap(seqs):
    peft_model = peft_wrap(build_model("llama"), "llama", random_b=True)
    r = run(peft_model, [wrap(make_identity_sae())], seqs, adapter=True)
    assert abs(r["ce_gap"]) < 1e-5
    assert r["gap_closed"] is None
    # identity SAE: adapted + spliced is just the adapted model
    assert r["ce_adapted_spliced"] == pytest.approx(r["ce_adapted_clean"], abs=1e-5)


# ------------------------------------------------------------------ data


DOC_LEN = 7


def doc_tokens(i: int) -> list[int]:
    """Document ``i`` is the only one with tokens in ``[1000 i, 1000 i + DOC_LEN)``."""
    return [1000 * (i + 1) + j for j in range(DOC_LEN)]


@pytest.fixture
def corpus(tmp_path):
    """A folder of .txt documents with at least 3 in the held-out split."""
    root = tmp_path / "corpus"
    root.mkdir()
    n_heldout, i = 0, 0
    while i < 60 or n_heldout < 3:
        path = root / f"doc{i:04d}.txt"
        path.write_text(" ".join(map(str, doc_tokens(i))) + "\n")
        n_heldout += split_of(path.name) == "heldout"
        i += 1
    return root


def expected_stream(root, split: str) -> list[int]:
    out = []
    for path in sorted(root.glob("*.txt")):
        if split_of(path.name) == split:
            out += [int(w) for w in path.read_text().split()] + [StubTokenizer.eos_token_id]
    return out


def test_split_of_is_deterministic_and_about_five_percent():
    ids = [f"doc/{i}" for i in range(20_000)]
    splits = [split_of(d) for d in ids]
    assert splits == [split_of(d) for d in ids]
    assert set(splits) == {"train", "heldout"}
    frac = splits.count("heldout") / len(ids)
    assert 0.04 < frac < 0.06


@pytest.mark.parametrize("ctx", [2, 5, 16])
def test_packed_sequences_shape_bos_and_content(corpus, ctx):
    tok = StubTokenizer()
    n_tokens = 30 * ctx
    for split in ("train", "heldout"):
        seqs = packed_sequences(tok, split, n_tokens, ctx, corpus=str(corpus))
        stream = expected_stream(corpus, split)
        n_seq = min(n_tokens // ctx, len(stream) // (ctx - 1))
        assert seqs.shape == (n_seq, ctx)
        assert seqs.dtype == torch.long
        assert (seqs[:, 0] == 0).all()
        assert seqs[:, 1:].reshape(-1).tolist() == stream[: n_seq * (ctx - 1)]


def test_train_and_heldout_share_no_document(corpus):
    tok = StubTokenizer()
    docs = {}
    for split in ("train", "heldout"):
        seqs = packed_sequences(tok, split, 10_000, 8, corpus=str(corpus))
        body = seqs[:, 1:].reshape(-1)
        docs[split] = {t // 1000 - 1 for t in body.tolist() if t >= 1000}
        for i in docs[split]:
            assert split_of(f"doc{i:04d}.txt") == split
    assert len(docs["heldout"]) >= 2 and len(docs["train"]) >= 40
    assert not docs["train"] & docs["heldout"]


def test_token_stream_budget_and_errors(corpus, tmp_path):
    tok = StubTokenizer()
    stream = token_stream(tok, "train", 20, corpus=str(corpus))
    assert stream.tolist() == expected_stream(corpus, "train")[:20]
    with pytest.raises(LorasaeError, match="unknown split"):
        token_stream(tok, "test", 20, corpus=str(corpus))
    with pytest.raises(LorasaeError, match="at least 2"):
        packed_sequences(tok, "train", 100, 1, corpus=str(corpus))
    with pytest.raises(LorasaeError, match="not found"):
        packed_sequences(tok, "train", 100, 8, corpus=str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    with pytest.raises(LorasaeError, match="no text"):
        packed_sequences(tok, "train", 100, 8, corpus=str(empty))


def test_packed_sequences_jsonl(tmp_path):
    tok = StubTokenizer()
    path = tmp_path / "docs.jsonl"
    lines = [f'{{"text": "{" ".join(map(str, doc_tokens(i)))}"}}' for i in range(200)]
    path.write_text("\n".join(lines) + "\n")
    held = [i for i in range(200) if split_of(f"{path.name}:{i}") == "heldout"]
    assert held
    seqs = packed_sequences(tok, "heldout", 10_000, 4, corpus=str(path))
    found = {t // 1000 - 1 for t in seqs[:, 1:].reshape(-1).tolist() if t >= 1000}
    assert found <= set(held) and found


def test_default_corpus_is_tokenised_once_and_cached(monkeypatch):
    """The default corpus is cached per tokenizer under $LORASAE_HOME (set to a tmp dir)."""
    docs = [Document(f"fake/{i}", " ".join(map(str, doc_tokens(i)))) for i in range(100)]
    calls = []
    monkeypatch.setattr(data, "default_documents", lambda: calls.append(1) or docs)
    tok = StubTokenizer()
    first = packed_sequences(tok, "train", 40, 8)  # corpus=None: the default
    assert len(calls) == 1
    cache = data.data_dir() / "corpus" / f"default-{data.tokenizer_key(tok)}-train.pt"
    assert cache.is_file() and str(cache).startswith(os.environ["LORASAE_HOME"])
    expected = []
    for doc in docs:
        if split_of(doc.doc_id) == "train":
            expected += [int(w) for w in doc.text.split()] + [1]
    assert torch.load(cache).tolist() == expected  # the whole split, not just the 35 tokens asked
    second = packed_sequences(tok, "train", 40, 8)
    assert len(calls) == 1  # served from the cache
    assert torch.equal(first, second)
    assert first.shape == (5, 8) and first[:, 1:].reshape(-1).tolist() == expected[:35]


def test_hf_dataset_corpus_is_streamed_by_row(tmp_path, monkeypatch):
    """``--corpus user/name`` streams a Hugging Face dataset with ``datasets``; a local JSON-lines
    dataset (``load_dataset("json", ...)``) stands in for the hub here: no network."""
    import datasets

    rows = [{"text": " ".join(map(str, doc_tokens(i)))} for i in range(120)]
    rows[3]["text"] = "  "  # blank rows are skipped; ids stay the row index
    local = tmp_path / "rows.jsonl"
    datasets.Dataset.from_list(rows).to_json(str(local))
    real_load_dataset = datasets.load_dataset
    asked = []

    def from_local_file(dataset_id, split, streaming):
        asked.append((dataset_id, split, streaming))
        return real_load_dataset("json", data_files=str(local), split=split, streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", from_local_file)
    tok = StubTokenizer()
    dataset_id = "someone/tiny-corpus"
    for split in ("train", "heldout"):
        want = []
        for i, row in enumerate(rows):
            if row["text"].strip() and split_of(f"{dataset_id}:{i}") == split:
                want += [int(w) for w in row["text"].split()] + [StubTokenizer.eos_token_id]
        assert want  # both splits have rows
        assert token_stream(tok, split, None, corpus=dataset_id).tolist() == want
    assert asked == [(dataset_id, "train", True)] * 2
    assert packed_sequences(tok, "train", 40, 8, corpus=dataset_id)[:, 1:].reshape(-1).tolist() == \
        token_stream(tok, "train", 35, corpus=dataset_id).tolist()

    def missing(dataset_id, split, streaming):
        return real_load_dataset("json", data_files=str(tmp_path / "missing.jsonl"), split=split,
                                 streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(LorasaeError, match="cannot stream corpus 'someone/gone'"):
        token_stream(tok, "train", 10, corpus="someone/gone")


def test_evaluate_splice_sets_reports_every_subset_with_and_without_the_adapter(seqs):
    model = build_model("llama")
    saes = [wrap(make_topk_sae(hook_name=f"blocks.{layer}.hook_resid_post", seed=3 + layer), f"L{layer}")
            for layer in (0, 1, 2)]
    peft_model = peft_wrap(model, "llama", random_b=True)
    r = evaluate(peft_model, saes, seqs, adapter=True, progress=False, splice_sets=True)
    sets = {tuple(row["layers"]): row for row in r["splice_sets"]}
    assert list(sets) == [(0, 1, 2), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2)]  # whole set first
    assert sets[(0, 1, 2)]["ce_adapted_spliced"] == r["ce_adapted_spliced"]
    for layers, row in sets.items():
        subset = [s for s in saes if s.layer in layers]
        fns = {s.layer: sae_fn(s.sae) for s in subset}
        assert row["ce_adapted_spliced"] == pytest.approx(ce_of(manual_logits(peft_model, seqs, fns), seqs),
                                                          abs=1e-5), layers
        with peft_model.disable_adapter():
            base = ce_of(manual_logits(peft_model, seqs, fns), seqs)
        assert row["ce_spliced"] == pytest.approx(base, abs=1e-5), layers
        assert row["gap_closed"] == pytest.approx(
            (row["ce_spliced"] - row["ce_adapted_spliced"]) / (row["ce_spliced"] - r["ce_clean"]), abs=1e-9)
    # without the flag: the whole set and each SAE alone (what training records in its manifest)
    plain = evaluate(peft_model, saes[:2], seqs, adapter=True, progress=False)
    assert [row["layers"] for row in plain["splice_sets"]] == [[0, 1], [0], [1]]
    assert "splice_sets" not in evaluate(peft_model, saes[:1], seqs, adapter=True, progress=False)
    with pytest.raises(LorasaeError, match="limit"):
        evaluate(peft_model, saes * 3, seqs, adapter=True, progress=False, splice_sets=True)


def _count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("splice_sets", [False, True])
def test_base_numbers_are_cached_and_an_identity_adapter_needs_no_forward(seqs, splice_sets):
    """The base numbers of an evaluation are the same from the cache as computed; with them
    cached, an adapter's evaluation runs only its own forwards, and a zero-B adapter none."""
    from lorasae.metrics import base_key
    from lorasae.models import model_fingerprint

    model = build_model("llama")
    saes = [wrap(make_topk_sae(hook_name=f"blocks.{layer}.hook_resid_post", seed=3 + layer), f"L{layer}")
            for layer in (0, 2)]
    fingerprint = model_fingerprint(model)
    key = base_key(fingerprint, saes, seqs, True, splice_sets)
    assert key != base_key(fingerprint, saes, seqs[:4], True, splice_sets)  # other tokens
    assert key != base_key(fingerprint, saes[:1], seqs, True, splice_sets)  # other SAEs
    assert key != base_key(fingerprint, saes, seqs, False, splice_sets)
    peft_model = peft_wrap(model, "llama", random_b=True)
    calls = _count_forwards(peft_model)
    fresh = run(peft_model, saes, seqs, adapter=True, splice_sets=splice_sets)
    computed = calls[0]
    cached = run(peft_model, saes, seqs, adapter=True, splice_sets=splice_sets, base_cache=key)  # writes
    assert calls[0] - computed == computed
    calls[0] = 0
    again = run(peft_model, saes, seqs, adapter=True, splice_sets=splice_sets, base_cache=key)  # reads
    n_batches = math.ceil(N_SEQ / 2)
    # the shared prefix (stopped at the first SAE), clean, adapted spliced, adapted clean, and each
    # SAE alone adapted (2 SAEs: every proper subset)
    assert calls[0] == n_batches * (1 + 3 + 2)
    assert calls[0] < computed
    for result in (cached, again):
        for name in ("ce_clean", "ce_spliced", "ce_zero_ablation", "kl_spliced", "ce_adapted_spliced",
                     "kl_adapted_spliced", "ce_adapted_clean", "gap_closed", "explained_variance", "l0"):
            assert result[name] == pytest.approx(fresh[name], abs=1e-6), name
        for got, want in zip(result["splice_sets"], fresh["splice_sets"], strict=True):
            assert got["layers"] == want["layers"]
            assert got["ce_adapted_spliced"] == pytest.approx(want["ce_adapted_spliced"], abs=1e-6)
            assert got["ce_spliced"] == pytest.approx(want["ce_spliced"], abs=1e-6)
        assert [e["dead_latents"] for e in result["saes"]] == [e["dead_latents"] for e in fresh["saes"]]

    # a zero-B adapter is the base model: its numbers without a forward, equal to measured ones
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.zero_()
    calls[0] = 0
    identity = run(peft_model, saes, seqs, adapter=True, splice_sets=splice_sets, base_cache=key,
                   identity_adapter=True)
    assert calls[0] == 0
    measured = run(peft_model, saes, seqs, adapter=True, splice_sets=splice_sets)
    for name in ("ce_adapted_spliced", "ce_adapted_clean", "kl_adapted_spliced", "gap_closed"):
        assert identity[name] == pytest.approx(measured[name], abs=1e-6), name
    assert identity["gap_closed"] == 0.0
    for got, want in zip(identity["saes"], measured["saes"]):
        assert got["ce_adapted_spliced"] == pytest.approx(want["ce_adapted_spliced"], abs=1e-6)


def test_splice_set_table_flags_subsets_worse_than_no_adapter():
    from lorasae.training.eval import splice_set_table

    table = splice_set_table({"splice_sets": [
        {"layers": [8, 15], "ce_spliced": 3.818, "ce_adapted_spliced": 3.667, "gap_closed": 0.36},
        {"layers": [8], "ce_spliced": 3.541, "ce_adapted_spliced": 3.639, "gap_closed": -0.685}]})
    lines = table.splitlines()
    assert len(lines) == 3 and lines[1].startswith("8+15") and "0.360" in lines[1]
    assert "worse than no adapter" in lines[2] and "-0.685" in lines[2]
    assert "worse" not in lines[1] and splice_set_table({}) == ""
