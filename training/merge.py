"""`lorasae merge`: fold a LoRA-SAE adapter into the base weights, and check what it does downstream.

Writes a standard Hugging Face model directory (``save_pretrained`` of peft's ``merge_and_unload``,
plus the tokenizer) that any transformers code loads without peft or lorasae, in ``--dtype``
(default float32: the base is loaded, merged and saved in that dtype). Then, unless
``--no-eval``, reports before/after on held-out text and a zero-shot multiple-choice task:

- ``ce``: held-out CE of the base model vs the merged model, both *without* the SAE (the merged
  model's is the adapter's ``ce_adapted_clean``: what the adapter does to the model alone);
- ``ce_spliced``: the same with the adapter's SAEs spliced (merged + SAE = ``ce_adapted_spliced``);
- ``mc``: accuracy on ``heldout-continuation-4way`` (``lorasae.downstream``) or a JSONL task file.

The directory appears only once complete (written under a temporary name, then renamed), with
``lorasae_merge.json`` beside the weights.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from lorasae.data import packed_sequences
from lorasae.downstream import TASK_NAME, continuation_items, jsonl_items, mc_accuracy
from lorasae.errors import LorasaeError
from lorasae.files import publish_dir, write_json_atomic
from lorasae.manifest import AdapterManifest
from lorasae.metrics import spliced_ce
from lorasae.models import load_model, model_fingerprint
from lorasae.saes import resolve_saes

from .eval import load_adapter
from .fields import corpus_field, ctx_field, device_field, model_field

MERGE_RECORD = "lorasae_merge.json"


@dataclass
class MergeConfig:
    adapter: str = field(metadata={"help": "adapter directory (peft files + lorasae.json)"})
    out: str = field(metadata={"help": "new Hugging Face model directory"})
    model: str = model_field()
    evaluate: bool = field(
        default=True, metadata={"flag": "--no-eval", "help": "only merge; skip the before/after report"}
    )
    eval_tokens: int = field(default=16_384, metadata={"help": "held-out tokens for the CE"})
    ctx: int = ctx_field()
    corpus: str = corpus_field()
    mc_items: int = field(default=300, metadata={"help": "items of the heldout-continuation-4way task"})
    mc_context: int = field(default=48, metadata={"help": "context tokens of a continuation item"})
    mc_choice: int = field(default=12, metadata={"help": "tokens of each candidate continuation"})
    mc_file: str | None = field(
        default=None,
        metadata={"help": 'JSONL multiple-choice task instead: {"context", "choices", "label"} per line'},
    )
    device: str | None = device_field()
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "float32 / bfloat16 / float16: load, merge and save in this dtype (default: float32)"
        },
    )


def _downstream(model: torch.nn.Module, saes, sequences, items, pad: int) -> dict:
    return {
        "ce": spliced_ce(model, [], sequences),
        "ce_spliced": spliced_ce(model, saes, sequences),
        "mc": mc_accuracy(model, items, pad_id=pad),
    }


def run_merge(cfg: MergeConfig) -> dict:
    started = time.time()
    out = Path(cfg.out)
    if out.exists():
        raise LorasaeError(f"{out} already exists; choose another --out")
    manifest = AdapterManifest.load(cfg.adapter)
    lm = load_model(cfg.model, cfg.device, cfg.dtype or "float32")  # the saved model's dtype
    saes = resolve_saes(lm, [entry.id for entry in manifest.saes], cfg.model)
    manifest.check(model_fingerprint(lm.model), saes)
    record: dict = {
        "adapter": str(cfg.adapter),
        "base_model": lm.model_id,
        "base_model_fingerprint": manifest.base_model_fingerprint,
        "saes": [asdict(e) for e in manifest.saes],
        "lora": manifest.lora,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if cfg.evaluate:
        sequences = packed_sequences(lm.tokenizer, "heldout", cfg.eval_tokens, cfg.ctx, cfg.corpus)
        items = (
            jsonl_items(cfg.mc_file, lm.tokenizer)
            if cfg.mc_file
            else continuation_items(
                lm.tokenizer, cfg.mc_items, cfg.mc_context, cfg.mc_choice, corpus=cfg.corpus
            )
        )
        pad = lm.tokenizer.pad_token_id or lm.tokenizer.eos_token_id or 0
        before = _downstream(lm.model, saes, sequences, items, pad)

    merged = load_adapter(lm.model, cfg.adapter).merge_and_unload()
    merged.eval()
    record["dtype"] = str(next(merged.parameters()).dtype).removeprefix("torch.")
    with publish_dir(out) as tmp:
        merged.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        if cfg.evaluate:
            after = _downstream(merged, saes, sequences, items, pad)
            record["downstream"] = {
                "task": cfg.mc_file or TASK_NAME,
                "eval_tokens": int(sequences[:, 1:].numel()),
                "before": before,
                "after": after,
                "ce_delta": after["ce"] - before["ce"],
                "ce_spliced_delta": after["ce_spliced"] - before["ce_spliced"],
                "mc_accuracy_delta": after["mc"]["accuracy"] - before["mc"]["accuracy"],
            }
        record["seconds"] = round(time.time() - started, 1)
        write_json_atomic(tmp / MERGE_RECORD, record)
    return {"out": str(out), **record}
