"""lorasae.steering: KV-cached generation with SAEs spliced and latents steered, checked against
uncached recomputation with plain hooks; neutral interventions change nothing; an intervention is
active at every generated position; left-padded batches equal rows run alone; seeds reproduce."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, make_topk_sae, manual_logits, peft_wrap, wrap

from lorasae.steering import BatchGeneration, LatentIntervention, RowSpec, intervene

PROMPTS = [[0, 17, 33, 5, 90, 41], [0, 250, 3], [0, 9, 9, 120, 64, 77, 12, 200]]
NEW = 8


@pytest.fixture(scope="module")
def llama():
    return build_model("llama")


@pytest.fixture(scope="module")
def sae():
    return wrap(make_topk_sae(hook_name="blocks.1.hook_resid_post"))


def generate(model, saes, rows, **kwargs) -> BatchGeneration:
    gen = BatchGeneration(model, saes, rows, max_new_tokens=kwargs.pop("max_new_tokens", NEW), pad_id=2,
                          **kwargs)
    while not gen.done:
        gen.advance()
    return gen


def recompute(model, sae, prompt: list[int], generated: list[int], interventions) -> list[int]:
    """Greedy tokens of an uncached forward over prompt + generated, SAE spliced through plain hooks
    (position 0 keeps its clean activation), each position's interventions by its phase."""
    ids = torch.tensor([prompt + generated])
    phase = torch.tensor([0] * len(prompt) + [1] * len(generated))

    def splice(x: torch.Tensor) -> torch.Tensor:
        latents = sae.sae.encode(x)
        prompt_part = intervene(latents, sae.layer, [interventions], "prompt")
        generated_part = intervene(latents, sae.layer, [interventions], "generated")
        edited = torch.where(phase[None, :, None] == 0, prompt_part, generated_part)
        return sae.sae.decode(edited)

    logits = manual_logits(model, ids, {sae.layer: splice})
    return logits[0, len(prompt) - 1 :].argmax(-1).tolist()


@pytest.mark.parametrize("positions", ["all", "generated", "prompt"])
def test_cached_generation_equals_uncached_recomputation_with_an_intervention(llama, sae, positions):
    iv = (LatentIntervention(sae.layer, 5, "set", 4.0, positions),)
    gen = generate(llama, [sae], [RowSpec(p, interventions=iv) for p in PROMPTS])
    for prompt, tokens in zip(PROMPTS, gen.generated):
        assert len(tokens) == NEW
        assert tokens == recompute(llama, sae, prompt, tokens[:-1], iv)


def test_the_intervention_changes_the_text_and_neutral_ones_do_not(llama, sae):
    plain = generate(llama, [sae], [RowSpec(p) for p in PROMPTS]).generated
    steered = generate(llama, [sae], [RowSpec(p, interventions=(LatentIntervention(sae.layer, 5, "set", 8.0),))
                                      for p in PROMPTS]).generated
    assert steered != plain
    # the latent's own value: scale 1, add 0, and set 0 on a latent that never fires here
    silent = _never_firing(llama, sae)
    for iv in (LatentIntervention(sae.layer, 5, "scale", 1.0), LatentIntervention(sae.layer, 5, "add", 0.0),
               LatentIntervention(sae.layer, silent, "set", 0.0)):
        same = generate(llama, [sae], [RowSpec(p, interventions=(iv,)) for p in PROMPTS]).generated
        assert same == plain, iv


def _never_firing(model, sae) -> int:
    seen = torch.zeros(sae.sae.cfg.d_sae, dtype=torch.bool)
    gen = generate(model, [sae], [RowSpec(p) for p in PROMPTS], features_k=sae.sae.cfg.d_sae)
    for prompt, tokens in zip(PROMPTS, gen.generated):
        ids = torch.tensor([prompt + tokens])
        latents = {}

        def grab(x: torch.Tensor) -> torch.Tensor:
            latents["z"] = sae.sae.encode(x)
            return sae.sae.decode(latents["z"])

        manual_logits(model, ids, {sae.layer: grab})
        seen |= (latents["z"][0] > 0).any(0)
    assert not seen.all()
    return int(torch.nonzero(~seen)[0])


def test_the_intervention_is_active_at_every_generated_position(llama, sae):
    iv = (LatentIntervention(sae.layer, 5, "set", 50.0, "generated"),)
    gen = BatchGeneration(llama, [sae], [RowSpec(p, interventions=iv) for p in PROMPTS], max_new_tokens=NEW,
                          pad_id=2, features_k=4)
    first = gen.advance()  # the prompt: not steered (positions "generated")
    assert all(5 not in f[sae.layer][0] or f[sae.layer][1][f[sae.layer][0].index(5)] != 50.0
               for f in first.features)
    recorded = [[] for _ in PROMPTS]
    while not gen.done:
        out = gen.advance()
        for b, f in enumerate(out.features):
            recorded[b].append(f[sae.layer])
    for b, f in enumerate(gen.final_features()):
        recorded[b].append(f[sae.layer])
    for b, per_token in enumerate(recorded):
        assert len(per_token) == NEW  # one per generated token
        for indices, values in per_token:
            assert indices[0] == 5 and values[0] == 50.0


def test_a_left_padded_batch_equals_each_prompt_alone(llama, sae):
    iv = (LatentIntervention(sae.layer, 7, "add", 3.0),)
    batch = generate(llama, [sae], [RowSpec(p, interventions=iv) for p in PROMPTS]).generated
    alone = [generate(llama, [sae], [RowSpec(p, interventions=iv)]).generated[0] for p in PROMPTS]
    assert batch == alone


def test_seeds_make_sampling_reproducible(llama, sae):
    def run(seed):
        rows = [RowSpec(p, temperature=1.0, top_p=0.9, seed=seed) for p in PROMPTS]
        return generate(llama, [sae], rows, max_new_tokens=16).generated

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_error_preserving_without_interventions_is_the_clean_model(llama, sae):
    clean = generate(llama, [], [RowSpec(p) for p in PROMPTS]).generated
    preserved = generate(llama, [sae], [RowSpec(p) for p in PROMPTS], preserve_error=True).generated
    spliced = generate(llama, [sae], [RowSpec(p) for p in PROMPTS]).generated
    assert preserved == clean and spliced != clean
    iv = (LatentIntervention(sae.layer, 5, "set", 8.0),)
    steered = generate(llama, [sae], [RowSpec(p, interventions=iv) for p in PROMPTS], preserve_error=True)
    assert steered.generated != clean


def test_kl_to_a_follower_is_zero_for_the_same_model_and_positive_when_steered(llama, sae):
    iv = (LatentIntervention(sae.layer, 5, "set", 8.0),)
    rows = [RowSpec(PROMPTS[0]), RowSpec(PROMPTS[0], interventions=iv), RowSpec(PROMPTS[0], follows=1),
            RowSpec(PROMPTS[0], interventions=iv, follows=1)]
    gen = BatchGeneration(llama, [sae], rows, max_new_tokens=NEW, pad_id=2, kl_pairs=[(1, 2)])
    kls: dict[int, list[float]] = {1: [], 3: []}
    while not gen.done:
        out = gen.advance()
        kls[1].append(out.kl[1])
    assert gen.generated[2] == gen.generated[1] == gen.generated[3]  # followers are fed row 1's text
    assert gen.generated[0] != gen.generated[1]
    assert len(kls[1]) == NEW and all(k > 1e-3 for k in kls[1])
    # row 3 is row 1's own model on row 1's text: the same distributions
    gen2 = BatchGeneration(llama, [sae], rows, max_new_tokens=NEW, pad_id=2, kl_pairs=[(1, 3)])
    while not gen2.done:
        assert abs(gen2.advance().kl[1]) < 1e-6


def test_rows_with_different_adapters_share_forwards(sae):
    model = peft_wrap(build_model("llama"), "llama", random_b=True)
    names = lambda rows: [r.adapter or "__base__" for r in rows]  # noqa: E731
    rows = [RowSpec(p, adapter=a) for p in PROMPTS for a in (None, "default")]
    mixed = generate(model, [sae], rows, adapter_names=names).generated
    with model.disable_adapter():
        base = generate(model, [sae], [RowSpec(p) for p in PROMPTS]).generated
    adapted = generate(model, [sae], [RowSpec(p) for p in PROMPTS]).generated
    assert mixed[0::2] == base and mixed[1::2] == adapted and base != adapted


def test_eos_and_finish_stop_rows(llama, sae):
    gen = BatchGeneration(llama, [sae], [RowSpec(p) for p in PROMPTS], max_new_tokens=NEW, pad_id=2)
    first = gen.advance()
    gen.finish(0, "stop")
    while not gen.done:
        gen.advance()
    assert gen.generated[0] == [first.tokens[0]] and gen.finish_reason[0] == "stop"
    assert gen.finish_reason[1] == "length"
    eos = gen.generated[1][2]
    stopped = generate(llama, [sae], [RowSpec(PROMPTS[1])], eos_ids=[eos])
    assert stopped.generated[0][-1] == eos and stopped.finish_reason[0] == "eos"
    assert len(stopped.generated[0]) <= 3
