"""The real embedded default: SmolLM2-135M-Instruct (GGUF) + the default SAE, on held-out prose.

Slow (the default SAE is trained once, ~10 minutes on 2 CPU cores, then cached under
$LORASAE_HOME); `make test` runs it, `make test-fast` skips it.
"""

from __future__ import annotations

import json

import pytest

from lorasae.cli import main
from lorasae.data import packed_sequences, token_stream
from lorasae.metrics import evaluate
from lorasae.models import DEFAULT_MODEL_NAME, load_model
from lorasae.saes import load_sae
from lorasae.training.train_sae import ensure_default_sae

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_lm():
    return load_model()


@pytest.fixture(scope="module")
def default_sae(default_lm):
    return load_sae(str(ensure_default_sae(default_lm)), model=default_lm.model)


def test_default_model_is_a_real_language_model(default_lm):
    lm = default_lm
    assert lm.model_id == DEFAULT_MODEL_NAME
    assert lm.model.config.num_hidden_layers == 30 and lm.model.config.hidden_size == 576
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = lm.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, ids.shape[1]:])


def test_default_model_saves_as_a_plain_hf_model(default_lm, tmp_path):
    """Read from GGUF into fp32, it is an ordinary model: `lorasae merge` can save it, and the saved
    folder loads back to the same weights (same fingerprint, so adapters still match)."""
    from lorasae.models import model_fingerprint

    assert getattr(default_lm.model, "hf_quantizer", None) is None and not default_lm.model.is_quantized
    default_lm.model.save_pretrained(tmp_path)
    default_lm.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert model_fingerprint(again.model) == model_fingerprint(default_lm.model)


def test_default_corpus_splits_are_large_and_disjoint(default_lm):
    train = token_stream(default_lm.tokenizer, "train")
    heldout = token_stream(default_lm.tokenizer, "heldout")
    assert train.numel() > 3_000_000 and 100_000 < heldout.numel() < train.numel() / 10


def test_default_sae_splice_opens_a_clear_ce_gap(default_lm, default_sae):
    assert default_sae.layer == 15 and default_sae.d_sae == 8 * 576
    sequences = packed_sequences(default_lm.tokenizer, "heldout", 4096, 128)
    result = evaluate(default_lm.model, [default_sae], sequences, progress=False)
    assert 2.5 < result["ce_clean"] < 4.0
    assert result["ce_gap"] > 0.1
    assert result["ce_zero_ablation"] > result["ce_spliced"] + 5
    assert result["explained_variance"] >= 0.8
    assert 16 <= result["l0"] <= 128
    # Never active on these ~4k tokens (rare latents included): a loose bound; latents dead over the
    # last 164k training activations (sae-lens's own count, saved with the SAE) must be very few.
    assert result["dead_latents"] < 0.10 * default_sae.d_sae
    assert default_sae.sae.cfg.metadata.num_dead_features < 0.01 * default_sae.d_sae


def test_eval_cli_prints_json_last(default_sae, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--tokens", "1024", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["saes"][0]["fingerprint"] and printed["model"] == DEFAULT_MODEL_NAME
    assert abs(printed["ce_gap"] - (printed["ce_spliced"] - printed["ce_clean"])) < 1e-9
