"""lorasae.training.train_sae end to end on a tiny model: collect, train with sae-lens, save, reload."""

from __future__ import annotations

import json

import torch
from conftest import D_MODEL, StubTokenizer, build_model

from lorasae.models import LoadedModel
from lorasae.saes import load_sae
from lorasae.splice import Splice
from lorasae.training.train_sae import SAE_TRAINING_FILE, SaeTrainingConfig, train_sae


def test_train_sae_writes_a_loadable_sae(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(30):
        tokens = torch.randint(2, 256, (100,), generator=gen).tolist()
        (corpus / f"d{i:02d}.txt").write_text(" ".join(map(str, tokens)))
    model = build_model("llama")
    lm = LoadedModel(model=model, tokenizer=StubTokenizer(), model_id="tiny-llama",
                     device=torch.device("cpu"), dtype=torch.float32)
    cfg = SaeTrainingConfig(layer=2, expansion=2, k=4, tokens=600, ctx=16, epochs=1,
                            batch_size=100, corpus=str(corpus))
    out = train_sae(lm, cfg, tmp_path / "sae")
    assert out == tmp_path / "sae"
    assert not (tmp_path / "sae.tmp").exists()
    record = json.loads((out / SAE_TRAINING_FILE).read_text())
    assert record["layer"] == 2 and record["hook_name"] == "blocks.2.hook_resid_post"
    assert record["activations"] == 600  # 40 sequences x 15 non-BOS positions
    assert record["config"]["k"] == 4

    loaded = load_sae(str(out), model=model)
    assert loaded.layer == 2 and loaded.d_sae == 2 * D_MODEL
    assert loaded.sae.cfg.k == 4
    ids = torch.randint(2, 256, (2, 10), generator=gen)
    with Splice(model, [loaded], record=True) as splice:
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    l0 = (splice.records[2].latents != 0).sum(-1)
    assert (l0 <= 4).all() and (l0 > 0).all()
