"""`lorasae eval`: held-out CE gap and SAE quality for a model, several SAEs and an adapter."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lorasae.data import packed_sequences
from lorasae.errors import LorasaeError
from lorasae.manifest import AdapterManifest
from lorasae.metrics import base_key, evaluate
from lorasae.models import LoadedModel, load_model, model_fingerprint
from lorasae.saes import LoadedSAE, resolve_saes, sae_fingerprint

from .fields import (
    corpus_field,
    ctx_field,
    device_field,
    dtype_field,
    keep_first_field,
    model_field,
    saes_field,
)
from .train_sae import ensure_default_sae

if TYPE_CHECKING:
    from peft import PeftModel


@dataclass
class EvalConfig:
    model: str = model_field()
    saes: list[str] = saes_field(
        "sae-lens folder or release/sae_id; repeat to splice several at "
        "once (default: the adapter's SAEs, else the embedded default SAE, trained on first use)"
    )
    adapter: str | None = field(default=None, metadata={"help": "peft adapter directory to evaluate"})
    tokens: int = field(default=16_384, metadata={"help": "held-out tokens to evaluate"})
    ctx: int = ctx_field()
    batch_size: int = field(default=8, metadata={"help": "sequences per forward"})
    corpus: str = corpus_field()
    keep_first: bool = keep_first_field()
    splice_sets: bool = field(
        default=False,
        metadata={
            "help": "CE for every subset of the SAEs spliced, with and without the adapter "
            "(default with several SAEs: each alone)"
        },
    )
    device: str | None = device_field()
    dtype: str | None = dtype_field()


def identities(lm: LoadedModel, saes: list[LoadedSAE]) -> dict:
    return {
        "model": lm.model_id,
        "model_fingerprint": model_fingerprint(lm.model),
        "sae_fingerprints": {s.sae_id: sae_fingerprint(s.sae) for s in saes},
    }


def load_adapter(model: torch.nn.Module, path: str) -> PeftModel:
    """Wrap ``model`` with the peft adapter at ``path`` (inference only)."""
    from peft import PeftModel

    if not (Path(path) / "adapter_config.json").is_file():
        raise LorasaeError(f"no peft adapter (adapter_config.json) in {path}")
    peft_model = PeftModel.from_pretrained(model, path, is_trainable=False)
    peft_model.eval()
    return peft_model


def run_eval(cfg: EvalConfig) -> dict:
    started = time.time()
    manifest = AdapterManifest.load(cfg.adapter) if cfg.adapter else None
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    specs = cfg.saes or ([entry.id for entry in manifest.saes] if manifest else [])
    saes = resolve_saes(lm, specs, cfg.model, ensure_default_sae)
    ids = identities(lm, saes)
    if manifest is not None:
        manifest.check(ids["model_fingerprint"], saes)
    sequences = packed_sequences(lm.tokenizer, "heldout", cfg.tokens, cfg.ctx, cfg.corpus)
    model = lm.model if cfg.adapter is None else load_adapter(lm.model, cfg.adapter)
    result = evaluate(
        model,
        saes,
        sequences,
        cfg.batch_size,
        cfg.keep_first,
        adapter=cfg.adapter is not None,
        splice_sets=cfg.splice_sets,
        base_cache=base_key(ids["model_fingerprint"], saes, sequences, cfg.keep_first, cfg.splice_sets),
    )
    for entry in result["saes"]:
        entry["fingerprint"] = ids["sae_fingerprints"][entry["id"]]
    return {
        **result,
        "model": ids["model"],
        "model_fingerprint": ids["model_fingerprint"],
        "adapter": cfg.adapter,
        "corpus": cfg.corpus,
        "ctx": cfg.ctx,
        "seconds": round(time.time() - started, 1),
    }


def splice_set_table(result: dict) -> str:
    """The ``splice_sets`` of an evaluation as a text table (empty without them): which subset of
    the SAEs is spliced, CE without and with the adapter, the fraction of that subset's gap closed;
    a negative fraction means the adapter makes that subset worse than no adapter."""
    rows = result.get("splice_sets") or []
    if not rows:
        return ""
    adapted = "ce_adapted_spliced" in rows[0]
    lines = [
        f"{'SAE layers spliced':<20} {'CE no adapter':>14}"
        + (f" {'CE adapter':>11} {'gap closed':>11}" if adapted else "")
    ]
    for row in rows:
        line = f"{'+'.join(map(str, row['layers'])):<20} {row['ce_spliced']:>14.4f}"
        if adapted:
            closed = row.get("gap_closed")
            shown = "n/a" if closed is None else f"{closed:.3f}"
            flag = "  <- worse than no adapter" if closed is not None and closed < 0 else ""
            line += f" {row['ce_adapted_spliced']:>11.4f} {shown:>11}{flag}"
        lines.append(line)
    return "\n".join(lines)
