"""`lorasae merge` and the zero-shot multiple-choice check (lorasae.downstream)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_world import CTX

from lorasae.cli import main
from lorasae.data import token_stream
from lorasae.downstream import McItem, continuation_items, jsonl_items, mc_accuracy
from lorasae.errors import LorasaeError
from lorasae.models import load_model
from lorasae.training.eval import EvalConfig, load_adapter, run_eval
from lorasae.training.train_lora import LoraTrainConfig, train_lora


@pytest.fixture(scope="module")
def adapter(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "adapter"
    cfg = LoraTrainConfig(model=str(tiny_world.model), saes=[str(tiny_world.sae1)],
                          corpus=str(tiny_world.corpus), ctx=CTX, batch_size=4, tokens=1024,
                          rank=4, lr=1e-2, eval_every=100, eval_tokens=256)
    train_lora(cfg, out)
    return out


def test_continuation_items_are_deterministic_and_well_formed(tiny_world):
    lm = load_model(str(tiny_world.model))
    items = continuation_items(lm.tokenizer, 12, 8, 4, corpus=str(tiny_world.corpus))
    again = continuation_items(lm.tokenizer, 12, 8, 4, corpus=str(tiny_world.corpus))
    assert items == again and len(items) == 12
    stream = token_stream(lm.tokenizer, "heldout", None, str(tiny_world.corpus)).tolist()
    text = " ".join(map(str, stream))
    labels = set()
    for item in items:
        assert item.context[0] == lm.tokenizer.bos_token_id and len(item.context) == 9
        assert len(item.choices) == 4 and all(len(c) == 4 for c in item.choices)
        true = item.context[1:] + item.choices[item.label]
        assert " ".join(map(str, true)) in text  # the true continuation follows the context
        assert lm.tokenizer.eos_token_id not in true
        labels.add(item.label)
    assert len(labels) > 1  # the answer is not always in the same slot
    with pytest.raises(LorasaeError, match="fewer than"):
        continuation_items(lm.tokenizer, 10_000, 8, 4, corpus=str(tiny_world.corpus))


def test_mc_accuracy_scores_summed_logprobs(tiny_world):
    lm = load_model(str(tiny_world.model))
    items = continuation_items(lm.tokenizer, 20, 8, 4, corpus=str(tiny_world.corpus))
    result = mc_accuracy(lm.model, items, batch_size=7)
    # the corpus was sampled from this model: it recognises its own continuations
    assert result["items"] == 20 and result["chance"] == 0.25
    assert result["accuracy"] >= 0.4  # chance is 0.25 (measured: 0.5)
    # by hand for one item: the chosen candidate has the highest summed log-probability
    item = items[0]
    scores = []
    for choice in item.choices:
        ids = torch.tensor([item.context + choice])
        logp = torch.log_softmax(lm.model(input_ids=ids).logits.float(), -1)[0]
        scores.append(sum(float(logp[len(item.context) - 1 + j, t]) for j, t in enumerate(choice)))
    one = mc_accuracy(lm.model, [item, item, item, item], batch_size=3)
    assert one["accuracy"] == float(max(range(4), key=scores.__getitem__) == item.label)
    best = max(range(4), key=scores.__getitem__)
    relabelled = McItem(item.context, item.choices, best)
    assert mc_accuracy(lm.model, [relabelled] * 4)["accuracy"] == 1.0


def test_jsonl_items_and_bad_file(tiny_world, tmp_path):
    lm = load_model(str(tiny_world.model))
    good = tmp_path / "task.jsonl"
    good.write_text(json.dumps({"context": "ban ben", "choices": ["bin", "bon bun"], "label": 1}) + "\n\n")
    (item,) = jsonl_items(good, lm.tokenizer)
    assert item.label == 1 and len(item.choices) == 2 and len(item.choices[1]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "x", "choices": ["a"], "label": 3}) + "\n")
    with pytest.raises(LorasaeError, match="out of range"):
        jsonl_items(bad, lm.tokenizer)


def test_merge_writes_an_hf_model_equal_to_the_adapter(tiny_world, adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    args = ["merge", "--model", str(tiny_world.model), "--adapter", str(adapter), "--out", str(out),
            "--corpus", str(tiny_world.corpus), "--ctx", str(CTX), "--eval-tokens", "256",
            "--mc-items", "12", "--mc-context", "8", "--mc-choice", "4"]  # 31-token documents
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "lorasae_merge.json"} <= names
    assert any(n.startswith("tokenizer") for n in names)
    assert not (tmp_path / "merged.tmp").exists()

    # the merged directory is a plain HF model: same logits as base + adapter through peft
    merged = load_model(str(out))
    base = load_model(str(tiny_world.model))
    peft_model = load_adapter(base.model, str(adapter))
    ids = torch.randint(3, 99, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = merged.model(input_ids=ids).logits
        plain = load_model(str(tiny_world.model)).model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-3  # the adapter did change the model

    down = printed["downstream"]
    evaluated = run_eval(EvalConfig(model=str(tiny_world.model), adapter=str(adapter), tokens=256,
                                    ctx=CTX, corpus=str(tiny_world.corpus)))
    assert down["before"]["ce"] == pytest.approx(evaluated["ce_clean"], abs=1e-4)
    assert down["after"]["ce"] == pytest.approx(evaluated["ce_adapted_clean"], abs=1e-3)
    assert down["after"]["ce_spliced"] == pytest.approx(evaluated["ce_adapted_spliced"], abs=1e-3)
    assert down["ce_delta"] == pytest.approx(down["after"]["ce"] - down["before"]["ce"])
    for side in ("before", "after"):
        assert down[side]["mc"]["items"] == 12 and 0 <= down[side]["mc"]["accuracy"] <= 1
    assert json.loads((out / "lorasae_merge.json").read_text())["downstream"] == down

    # never overwrites
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


def test_merge_dtype_is_honoured(tiny_world, adapter, tmp_path, capsys):
    """Regression: `--dtype` was accepted and ignored (always fp32). The weights on disk, the
    saved config and the record follow it; without it the merge stays fp32."""
    from safetensors.torch import load_file

    merged = {}
    for dtype in (None, "bfloat16"):
        out = tmp_path / f"merged-{dtype}"
        args = ["merge", "--model", str(tiny_world.model), "--adapter", str(adapter), "--out",
                str(out), "--no-eval"] + (["--dtype", dtype] if dtype else [])
        assert main(args) == 0
        printed = json.loads(capsys.readouterr().out)
        want = dtype or "float32"
        merged[want] = load_file(str(out / "model.safetensors"))
        assert {t.dtype for t in merged[want].values()} == {getattr(torch, want)}
        config = json.loads((out / "config.json").read_text())
        assert config.get("dtype", config.get("torch_dtype")) == want
        assert printed["dtype"] == want
    # the bf16 merge is the fp32 merge to bf16 precision (not, say, the base weights)
    fp32, bf16 = merged["float32"], merged["bfloat16"]
    assert fp32.keys() == bf16.keys()
    for name in fp32:
        torch.testing.assert_close(bf16[name].float(), fp32[name], rtol=2 ** -7, atol=1e-3)
    base = load_model(str(tiny_world.model)).model.state_dict()
    changed = [k for k in fp32 if k in base and (fp32[k] - base[k]).abs().max() > 1e-3]
    assert changed and all((bf16[k].float() - base[k]).abs().max() > 1e-3 for k in changed)


def test_merge_refuses_an_adapter_for_another_model(tiny_world, adapter, tmp_path, capsys):
    from conftest import build_model

    other = tmp_path / "other"
    model = build_model("llama", seed=9)
    model.save_pretrained(other)
    load_model(str(tiny_world.model)).tokenizer.save_pretrained(other)
    rc = main(["merge", "--model", str(other), "--adapter", str(adapter), "--out", str(tmp_path / "m"),
               "--no-eval"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert rc == 2 and len(lines) == 1, lines
    assert not (tmp_path / "m").exists()
