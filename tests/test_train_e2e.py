"""The e2e SAE baseline (`lorasae train-e2e`): sae-lens training SAEs, KL training, saved SAE."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from tiny_world import CTX

from lorasae.cli import main
from lorasae.data import packed_sequences
from lorasae.metrics import kl_per_token, next_token_logprobs
from lorasae.models import final_norm, load_model
from lorasae.saes import LoadedSAE, load_sae
from lorasae.splice import Splice
from lorasae.training.loop import CHECKPOINT_DIR, StepStart
from lorasae.training.train_e2e import E2eObjective, E2eTrainConfig, trainable_sae

ONE_PROCESS = types.SimpleNamespace(num_processes=1)


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world


def _cfg(world, **overrides) -> E2eTrainConfig:
    fields = dict(model=str(world.model), saes=[str(world.sae1)], corpus=str(world.corpus), ctx=CTX,
                  batch_size=4, tokens=1024, eval_every=4, eval_tokens=256, checkpoint_every=2,
                  lr=1e-2)
    fields.update(overrides)
    return E2eTrainConfig(**fields)


def _jumprelu(d_in: int, layer: int) -> LoadedSAE:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=2 * d_in,
                                        metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post")))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.rand(p.shape, generator=gen) * 0.2 if name == "threshold"
                    else torch.randn(p.shape, generator=gen) * 0.3)
    return LoadedSAE(sae, "jumprelu-test", f"blocks.{layer}.hook_resid_post", layer)


def _standard(d_in: int, layer: int) -> LoadedSAE:
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=2 * d_in,
                                        metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post")))
    return LoadedSAE(sae, "standard-test", f"blocks.{layer}.hook_resid_post", layer)


@pytest.mark.parametrize("kind", ["topk", "jumprelu", "standard"])
def test_finetune_start_reproduces_the_given_sae(world, kind):
    given = {"topk": lambda: load_sae(str(world.sae1)), "jumprelu": lambda: _jumprelu(32, 1),
             "standard": lambda: _standard(32, 1)}[kind]()
    trained = trainable_sae(given, "finetune", coeff=0.01, target_l0=4.0)
    assert trained.cfg.architecture() == kind and trained.cfg.d_sae == given.sae.cfg.d_sae
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        want = given.sae.decode(given.sae.encode(x))
        got = trained.decode(trained.encode(x))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    scratch = trainable_sae(given, "scratch", coeff=0.01, target_l0=4.0)
    assert not torch.allclose(scratch.W_enc, given.sae.W_enc)


@pytest.mark.parametrize("init", ["finetune", "scratch"])
def test_e2e_lowers_the_kl_and_only_sae_weights_change(world, init):
    torch.manual_seed(0)
    cfg = _cfg(world, init=init)
    lm = load_model(cfg.model, "cpu", "float32")
    given = load_sae(str(world.sae1), model=lm.model)
    base_before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    given_before = {k: v.clone() for k, v in given.sae.state_dict().items()}
    objective = E2eObjective(cfg, lm, [given], ONE_PROCESS)
    ids = packed_sequences(lm.tokenizer, "train", 4 * CTX, CTX, cfg.corpus)[:4]

    @torch.no_grad()
    def kl() -> float:
        clean = next_token_logprobs(lm.model, ids)
        with Splice(lm.model, [objective.loaded]):
            spliced = next_token_logprobs(lm.model, ids)
        return float(kl_per_token(clean, spliced).mean())

    before = kl()
    assert float(objective.loss(objective.module, ids, StepStart())) == pytest.approx(before, rel=1e-4)  # TopK: KL only
    trainable = objective.trainable()
    assert {id(p) for p in trainable} == {id(p) for p in objective.sae.parameters()}
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        objective.loss(objective.module, ids, StepStart()).backward()
        optimizer.step()
    after = kl()
    assert after < 0.7 * before, (before, after)
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    for k, v in given.sae.state_dict().items():
        assert torch.equal(v, given_before[k]), k
    assert all(p.grad is None for p in lm.model.parameters())


@pytest.mark.parametrize("kind", ["topk", "jumprelu"])
def test_e2e_step_from_the_shared_prefix_equals_the_full_step(world, kind):
    """Teacher and student both starting after the SAE's layer (the frozen model's residual,
    computed once or cached): the same loss, sparsity term included, and the same SAE gradients."""
    from lorasae.splice import SharedPrefix, residual_at

    cfg = _cfg(world, init="scratch", sparsity_coeff=0.5)
    lm = load_model(cfg.model, "cpu", "float32")
    torch.manual_seed(0)
    given = load_sae(str(world.sae1), model=lm.model) if kind == "topk" else _jumprelu(32, 1)
    objective = E2eObjective(cfg, lm, [given], ONE_PROCESS)
    assert objective.prefix_layer == 1
    ids = packed_sequences(lm.tokenizer, "train", 4 * CTX, CTX, cfg.corpus)[:4]

    def loss_and_grads(prefix):
        loss = objective.loss(objective.module, ids, prefix)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in objective.sae.named_parameters() if p.grad is not None}
        objective.sae.zero_grad()
        return float(loss.detach()), grads

    full, full_grads = loss_and_grads(StepStart())
    prefix = SharedPrefix(1, residual_at(lm.model, 1, ids))
    shared, shared_grads = loss_and_grads(StepStart(prefix))
    finals: list[torch.Tensor] = []  # the teacher's final hidden states, as the cache holds them
    handle = final_norm(lm.model).register_forward_hook(lambda _m, _a, out: finals.append(out))
    with torch.no_grad():
        lm.model(input_ids=ids)
    handle.remove()
    cached, cached_grads = loss_and_grads(StepStart(prefix, finals[0]))
    assert full > 0.1 and shared == pytest.approx(full, rel=1e-6) and cached == pytest.approx(full, rel=1e-6)
    assert full_grads.keys() == shared_grads.keys() == cached_grads.keys() and full_grads
    for name, grad in full_grads.items():
        for other in (shared_grads, cached_grads):
            torch.testing.assert_close(other[name], grad, atol=1e-5 * float(grad.abs().max()) + 1e-9,
                                       rtol=1e-5)


def test_jumprelu_e2e_has_a_sparsity_term_toward_the_given_l0(world):
    cfg = _cfg(world, sparsity_coeff=0.5)
    lm = load_model(cfg.model, "cpu", "float32")
    objective = E2eObjective(cfg, lm, [_jumprelu(32, 1)], ONE_PROCESS)
    assert objective.target_l0 is not None and 0 < objective.target_l0 < 64
    ids = packed_sequences(lm.tokenizer, "train", 4 * CTX, CTX, cfg.corpus)[:4]
    with torch.no_grad():
        objective.sae.threshold.zero_()  # every positive pre-activation fires: L0 far above target
    loss = objective.loss(objective.module, ids, StepStart())
    with torch.no_grad():
        clean = next_token_logprobs(lm.model, ids)
        with Splice(lm.model, [objective.loaded]):
            kl_only = float(kl_per_token(clean, next_token_logprobs(lm.model, ids)).mean())
    assert float(loss) > kl_only + 0.1  # the quadratic L0 penalty is in the loss
    loss.backward()
    assert objective.sae.threshold.grad is not None and objective.sae.threshold.grad.abs().sum() > 0


def test_train_e2e_cli_writes_an_sae_lens_folder_that_eval_takes(world, tmp_path, capsys):
    out = tmp_path / "e2e"
    cfg = _cfg(world)
    args = ["train-e2e", "--model", cfg.model, "--sae", cfg.saes[0], "--corpus", cfg.corpus,
            "--ctx", str(CTX), "--batch-size", "4", "--tokens", "1024", "--eval-every", "4",
            "--eval-tokens", "256", "--checkpoint-every", "2", "--lr", "1e-2", "--out", str(out)]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    names = {p.name for p in out.iterdir()}
    assert {"cfg.json", "sae_weights.safetensors", "lorasae_e2e.json", "metrics.json",
            "training.png"} <= names
    assert CHECKPOINT_DIR not in names and ".sae.tmp" not in names
    start, final = metrics["start"], metrics["final"]
    assert metrics["train"]["steps"] == 1024 // (4 * CTX) and printed["final"] == final
    assert final["ce_spliced"] < start["ce_spliced"] - 0.05  # training works, not just runs
    assert final["ce_clean"] == pytest.approx(start["ce_clean"])  # the model did not change
    assert final["l0"] == pytest.approx(8.0)  # TopK k=8 kept
    assert [h["step"] for h in metrics["history"] if "heldout_ce" in h] == [4]

    # the saved SAE is an ordinary sae-lens SAE at the same hook, and `lorasae eval` takes it
    loaded = load_sae(str(out))
    assert loaded.layer == 1 and loaded.sae.cfg.architecture() == "topk"
    assert main(["eval", "--model", cfg.model, "--sae", str(out), "--corpus", cfg.corpus,
                 "--ctx", str(CTX), "--tokens", "256", "--out", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["ce_spliced"] == pytest.approx(final["ce_spliced"], abs=1e-4)

    # a finished run is never overwritten
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_train_e2e_refuses_several_saes(world, tmp_path, capsys):
    cfg = _cfg(world)
    rc = main(["train-e2e", "--model", cfg.model, "--sae", str(world.sae1), "--sae", str(world.sae2),
               "--corpus", cfg.corpus, "--out", str(tmp_path / "x")])
    assert rc == 2 and "one SAE" in capsys.readouterr().err
    assert not Path(tmp_path / "x").exists()
