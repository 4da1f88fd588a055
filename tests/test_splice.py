"""lorasae.splice against hand-written forward hooks on tiny Llama / Gemma2 / GPT-2 models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    BATCH,
    D_MODEL,
    SEQ,
    VOCAB,
    build_model,
    make_identity_sae,
    make_topk_sae,
    manual_logits,
    peft_wrap,
    sae_fn,
    wrap,
)

from lorasae.errors import LorasaeError
from lorasae.models import decoder_layers
from lorasae.splice import Splice, replace_outputs, residual_at, zero_ablation

ATOL = 1e-5


def hooks(model) -> list[set[int]]:
    """Ids of the forward hooks on each decoder layer (transformers may install its own)."""
    return [set(layer._forward_hooks) for layer in decoder_layers(model)]


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_identity_sae_leaves_logits_unchanged(model, ids):
    clean = logits_of(model, ids)
    assert clean.shape == (BATCH, SEQ, VOCAB)
    sae = wrap(make_identity_sae())
    x = torch.randn(5, D_MODEL)
    assert torch.equal(sae.sae.decode(sae.sae.encode(x)), x)  # the SAE really is the identity
    for keep_first in (True, False):
        with Splice(model, [sae], keep_first=keep_first):
            spliced = logits_of(model, ids)
        torch.testing.assert_close(spliced, clean, atol=ATOL, rtol=0)


def test_topk_splice_matches_manual_hook(model, ids, topk_sae):
    clean = logits_of(model, ids)
    expected = manual_logits(model, ids, {1: sae_fn(topk_sae.sae)})
    with Splice(model, [topk_sae]):
        spliced = logits_of(model, ids)
    torch.testing.assert_close(spliced, expected, atol=ATOL, rtol=0)
    # the splice really changed something, at every position after the first ...
    diff = (spliced - clean).abs().amax(-1)  # [B, T]
    assert (diff[:, 1:] > 1e-3).all()
    # ... and position 0 is kept clean (causal model: its logits are untouched)
    torch.testing.assert_close(spliced[:, 0], clean[:, 0], atol=ATOL, rtol=0)
    # hooks are gone afterwards
    torch.testing.assert_close(logits_of(model, ids), clean, atol=0, rtol=0)


def test_splice_first_position_too(model, ids, topk_sae):
    clean = logits_of(model, ids)
    expected = manual_logits(model, ids, {1: sae_fn(topk_sae.sae)}, keep_first=False)
    with Splice(model, [topk_sae], keep_first=False):
        spliced = logits_of(model, ids)
    torch.testing.assert_close(spliced, expected, atol=ATOL, rtol=0)
    assert (spliced[:, 0] - clean[:, 0]).abs().max() > 1e-3


def test_recorded_latents_are_encode_of_clean_residual(model, ids, topk_sae):
    sae = topk_sae.sae
    resid = residual_at(model, topk_sae.layer, ids)
    assert resid.shape == (BATCH, SEQ, D_MODEL)
    with Splice(model, [topk_sae], record=True) as splice:
        logits_of(model, ids)
    assert set(splice.records) == {1}
    rec = splice.records[1]
    torch.testing.assert_close(rec.sae_in, resid, atol=ATOL, rtol=0)
    torch.testing.assert_close(rec.latents, sae.encode(resid), atol=ATOL, rtol=0)
    torch.testing.assert_close(rec.recon, sae.decode(sae.encode(resid)), atol=ATOL, rtol=0)
    assert rec.latents.shape == (BATCH, SEQ, topk_sae.d_sae)
    l0 = (rec.latents != 0).sum(-1)
    assert (l0 > 0).all() and (l0 <= sae.cfg.k).all()
    expected_err = (resid - sae.decode(sae.encode(resid))).pow(2).sum(-1)
    torch.testing.assert_close(rec.error_sq(), expected_err, atol=1e-4, rtol=1e-5)
    assert rec.error_sq().shape == (BATCH, SEQ)


def test_no_records_without_record_flag(model, ids, topk_sae):
    with Splice(model, [topk_sae]) as splice:
        logits_of(model, ids)
    assert splice.records == {}


def test_multi_layer_splice_matches_two_manual_hooks(model, ids):
    sae0 = wrap(make_topk_sae(hook_name="blocks.0.hook_resid_post", seed=11), "L0")
    sae2 = wrap(make_topk_sae(hook_name="blocks.2.hook_resid_post", seed=12), "L2")
    assert (sae0.layer, sae2.layer) == (0, 2)
    expected = manual_logits(model, ids, {0: sae_fn(sae0.sae), 2: sae_fn(sae2.sae)})
    only0 = manual_logits(model, ids, {0: sae_fn(sae0.sae)})
    with Splice(model, [sae0, sae2], record=True) as splice:
        spliced = logits_of(model, ids)
    torch.testing.assert_close(spliced, expected, atol=ATOL, rtol=0)
    assert (spliced - only0).abs().max() > 1e-3  # the second SAE did act
    assert set(splice.records) == {0, 2}
    # the layer-2 SAE saw the residual of the model already spliced at layer 0
    with Splice(model, [sae0]):
        resid2 = residual_at(model, 2, ids)
    torch.testing.assert_close(splice.records[2].sae_in, resid2, atol=ATOL, rtol=0)


def test_two_saes_on_one_layer_are_refused(llama):
    a = wrap(make_topk_sae(seed=1), "a")
    b = wrap(make_topk_sae(hook_name="blocks.2.hook_resid_pre", seed=2), "b")  # also layer 1
    assert a.layer == b.layer == 1
    before = hooks(llama)
    with pytest.raises(LorasaeError, match="same layer"):
        Splice(llama, [a, b])
    assert hooks(llama) == before


@pytest.mark.parametrize("random_b", [False, True])
def test_splice_through_peft_wrapper(arch, model, ids, topk_sae, random_b):
    base_spliced = manual_logits(model, ids, {1: sae_fn(topk_sae.sae)})
    base_clean = logits_of(model, ids)
    peft_model = peft_wrap(model, arch, random_b=random_b)
    assert len(decoder_layers(peft_model)) == len(decoder_layers(model))
    clean = logits_of(peft_model, ids)
    before = hooks(peft_model)
    expected = manual_logits(peft_model, ids, {1: sae_fn(topk_sae.sae)})
    with Splice(peft_model, [topk_sae]):
        spliced = logits_of(peft_model, ids)
    torch.testing.assert_close(spliced, expected, atol=ATOL, rtol=0)
    assert (spliced - clean).abs().max() > 1e-3
    if random_b:
        assert (clean - base_clean).abs().max() > 1e-3  # the adapter is really on
        with peft_model.disable_adapter(), Splice(peft_model, [topk_sae]):
            disabled_spliced = logits_of(peft_model, ids)
        torch.testing.assert_close(disabled_spliced, base_spliced, atol=ATOL, rtol=0)
    else:  # B = 0: the adapter is a no-op, so the splice matches the bare model's
        torch.testing.assert_close(spliced, base_spliced, atol=ATOL, rtol=0)
    # hooks removed after the context
    torch.testing.assert_close(logits_of(peft_model, ids), clean, atol=0, rtol=0)
    assert hooks(peft_model) == before


def test_hooks_removed_when_forward_raises(llama, ids, topk_sae):
    clean = logits_of(llama, ids)
    before = hooks(llama)
    with pytest.raises(RuntimeError, match="boom"):
        with Splice(llama, [topk_sae]):
            assert all(len(h) == len(b) + (i == 1) for i, (h, b) in enumerate(zip(hooks(llama), before)))
            raise RuntimeError("boom")
    assert hooks(llama) == before
    torch.testing.assert_close(logits_of(llama, ids), clean, atol=0, rtol=0)


@pytest.mark.parametrize("keep_first", [True, False])
def test_zero_ablation_matches_manual_zeroing(model, ids, keep_first):
    clean = logits_of(model, ids)
    expected = manual_logits(model, ids, {1: torch.zeros_like}, keep_first=keep_first)
    with zero_ablation(model, [1], keep_first=keep_first):
        ablated = logits_of(model, ids)
    torch.testing.assert_close(ablated, expected, atol=ATOL, rtol=0)
    assert (ablated[:, 1:] - clean[:, 1:]).abs().max() > 1e-3
    torch.testing.assert_close(logits_of(model, ids), clean, atol=0, rtol=0)


def test_replace_outputs_sees_layer_output(llama, ids):
    seen = []

    def double(x):
        seen.append(x.clone())
        return 2 * x

    with replace_outputs(llama, {1: double}, keep_first=False):
        logits_of(llama, ids)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], residual_at(llama, 1, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("layer", [0, 1])
def test_residual_at_equals_output_hidden_states(model, ids, layer):
    # hidden_states[L + 1] is layer L's output, except for the last layer (final norm applied)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hidden) == len(decoder_layers(model)) + 1
    before = hooks(model)
    resid = residual_at(model, layer, ids)
    assert resid.shape == (BATCH, SEQ, D_MODEL)
    torch.testing.assert_close(resid, hidden[layer + 1], atol=ATOL, rtol=0)
    assert hooks(model) == before


def test_splice_mixed_dtypes(ids, topk_sae):
    """An fp32 SAE in a bf16 model (and a bf16 SAE in an fp32 model) runs in the SAE's dtype and
    hands the model back its own dtype."""
    bf16_model = build_model("llama", dtype=torch.bfloat16)
    expected = manual_logits(bf16_model, ids,
                             {1: lambda x: topk_sae.sae.decode(topk_sae.sae.encode(x.float()))})
    with Splice(bf16_model, [topk_sae], record=True) as splice:
        spliced = logits_of(bf16_model, ids)
    assert spliced.dtype == torch.bfloat16
    assert splice.records[1].latents.dtype == torch.float32
    torch.testing.assert_close(spliced, expected, atol=0, rtol=0)

    fp32_model = build_model("llama")
    bf16_sae = copy.deepcopy(topk_sae)
    bf16_sae.sae.to(dtype=torch.bfloat16)
    expected = manual_logits(fp32_model, ids,
                             {1: lambda x: bf16_sae.sae.decode(bf16_sae.sae.encode(x.bfloat16()))})
    with Splice(fp32_model, [bf16_sae], record=True) as splice:
        spliced = logits_of(fp32_model, ids)
    assert spliced.dtype == torch.float32
    assert splice.records[1].latents.dtype == torch.bfloat16
    torch.testing.assert_close(spliced, expected, atol=ATOL, rtol=0)
