"""lorasae.saes (loading, hook mapping, compatibility checks, fingerprints) and model fingerprints."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import D_MODEL, build_model, make_identity_sae, make_topk_sae, peft_wrap, wrap

from lorasae.errors import LorasaeError
from lorasae.models import decoder_layers, hidden_size, model_fingerprint, unwrap
from lorasae.saes import check_compatible, hook_layer, load_sae, sae_fingerprint


@pytest.mark.parametrize("hook, layer", [
    ("blocks.0.hook_resid_post", 0),
    ("blocks.1.hook_resid_post", 1),
    ("blocks.12.hook_resid_post", 12),
    ("blocks.1.hook_resid_pre", 0),
    ("blocks.3.hook_resid_pre", 2),
])
def test_hook_layer(hook, layer):
    assert hook_layer(hook) == layer


@pytest.mark.parametrize("hook", [
    "blocks.1.hook_mlp_out", "blocks.1.attn.hook_z", "blocks.0.hook_resid_pre",
    "blocks.1.hook_resid_mid", "hook_embed", "", "blocks.x.hook_resid_post",
    "blocks.1.hook_resid_post.extra",
])
def test_unsupported_hooks_are_refused(hook):
    with pytest.raises(LorasaeError, match="unsupported SAE hook"):
        hook_layer(hook)


@pytest.mark.parametrize("make", [make_topk_sae, make_identity_sae])
def test_save_load_round_trip(tmp_path, llama, make):
    sae = make(hook_name="blocks.2.hook_resid_post")
    folder = tmp_path / "sae"
    sae.save_model(folder)
    assert (folder / "cfg.json").is_file()
    loaded = load_sae(str(folder), model=llama)
    assert type(loaded.sae) is type(sae)
    assert loaded.hook_name == "blocks.2.hook_resid_post"
    assert loaded.layer == 2
    assert loaded.d_sae == sae.cfg.d_sae
    assert loaded.sae_id == str(folder.resolve())
    assert not any(p.requires_grad for p in loaded.sae.parameters())
    x = torch.randn(3, 5, D_MODEL)
    z = sae.encode(x)
    assert (z != 0).any()
    torch.testing.assert_close(loaded.sae.encode(x), z, atol=0, rtol=0)
    torch.testing.assert_close(loaded.sae.decode(z), sae.decode(z), atol=0, rtol=0)
    assert sae_fingerprint(loaded.sae) == sae_fingerprint(sae)
    assert len(sae_fingerprint(sae)) == 16


def test_load_sae_with_dtype(tmp_path, llama):
    sae = make_topk_sae()
    sae.save_model(tmp_path / "sae")
    loaded = load_sae(str(tmp_path / "sae"), dtype=torch.bfloat16, model=llama)
    assert loaded.sae.W_enc.dtype == torch.bfloat16
    x = torch.randn(4, D_MODEL)
    recon = loaded.sae.decode(loaded.sae.encode(x.to(torch.bfloat16)))
    assert recon.dtype == torch.bfloat16
    # bf16 reconstruction close to the fp32 one (same weights, rounded)
    ref = sae.decode(sae.encode(x))
    assert (recon.float() - ref).norm() / ref.norm() < 0.1


def test_sae_fingerprint_sensitivity():
    sae = make_topk_sae()
    same = make_topk_sae()
    assert sae_fingerprint(sae) == sae_fingerprint(same)
    perturbed = copy.deepcopy(sae)
    with torch.no_grad():
        perturbed.W_dec[3, 4] += 1e-3
    assert sae_fingerprint(perturbed) != sae_fingerprint(sae)
    # same weights, another hook: another fingerprint
    moved = make_topk_sae(hook_name="blocks.2.hook_resid_post")
    assert sae_fingerprint(moved) != sae_fingerprint(sae)
    # other random weights: another fingerprint
    assert sae_fingerprint(make_topk_sae(seed=2)) != sae_fingerprint(sae)


def test_d_in_mismatch_is_refused(tmp_path, llama):
    make_topk_sae(d_in=D_MODEL + 8, d_sae=64).save_model(tmp_path / "wide")
    with pytest.raises(LorasaeError, match="d_in") as info:
        load_sae(str(tmp_path / "wide"), model=llama)
    assert f"d_in={D_MODEL + 8}" in str(info.value) and str(D_MODEL) in str(info.value)
    # without a model there is nothing to check against
    assert load_sae(str(tmp_path / "wide")).sae.cfg.d_in == D_MODEL + 8


def test_unsupported_hook_on_load_is_refused(tmp_path, llama):
    make_topk_sae(hook_name="blocks.1.hook_mlp_out").save_model(tmp_path / "mlp")
    with pytest.raises(LorasaeError, match="hook_mlp_out"):
        load_sae(str(tmp_path / "mlp"), model=llama)


@pytest.mark.parametrize("hook", ["blocks.4.hook_resid_post", "blocks.5.hook_resid_pre",
                                  "blocks.40.hook_resid_post"])
def test_layer_beyond_depth_is_refused(tmp_path, llama, hook):
    assert len(decoder_layers(llama)) == 4
    make_topk_sae(hook_name=hook).save_model(tmp_path / "deep")
    with pytest.raises(LorasaeError, match="4 layers"):
        load_sae(str(tmp_path / "deep"), model=llama)
    with pytest.raises(LorasaeError):
        check_compatible(wrap(make_topk_sae(hook_name=hook)), llama)


def test_last_layer_is_accepted(llama):
    check_compatible(wrap(make_topk_sae(hook_name="blocks.3.hook_resid_post")), llama)
    check_compatible(wrap(make_topk_sae(hook_name="blocks.4.hook_resid_pre")), llama)


def test_bad_sae_specs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LorasaeError, match="cannot load SAE"):
        load_sae(str(empty))
    with pytest.raises(LorasaeError, match="neither a local sae-lens folder"):
        load_sae(str(tmp_path / "missing"))


def test_hidden_size_and_layers(model, arch):
    assert hidden_size(model) == D_MODEL
    assert len(decoder_layers(model)) == (3 if arch == "gpt2" else 4)


def test_model_fingerprint_dtype_independent_and_weight_sensitive(arch):
    fp32 = build_model(arch)
    bf16 = build_model(arch, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    fp = model_fingerprint(fp32)
    assert len(fp) == 16
    assert model_fingerprint(bf16) == fp
    assert model_fingerprint(build_model(arch)) == fp  # deterministic
    assert model_fingerprint(build_model(arch, seed=1)) != fp
    # perturb one (sampled) weight by more than bf16 rounding
    perturbed = copy.deepcopy(fp32)
    with torch.no_grad():
        param = next(p for n, p in perturbed.named_parameters() if "layers.1" in n or ".h.1." in n)
        param.view(-1)[0] += 0.5
    assert model_fingerprint(perturbed) != fp


def test_model_fingerprint_ignores_lora(arch):
    model = build_model(arch)
    fp = model_fingerprint(model)
    peft_model = peft_wrap(model, arch, random_b=True)
    assert any("lora_" in n for n, _ in peft_model.named_parameters())
    assert any(".base_layer." in n for n, _ in unwrap(peft_model).named_parameters())
    assert model_fingerprint(peft_model) == fp
    other = peft_wrap(build_model(arch), arch, random_b=True, seed=99)
    assert model_fingerprint(other) == fp
    # but a change of a base weight under the wrapper is seen
    with torch.no_grad():
        base = next(p for n, p in peft_model.named_parameters() if "base_layer" in n)
        base.view(-1)[0] += 0.5
    assert model_fingerprint(peft_model) != fp
