"""`lorasae eval`: held-out CE gap and SAE quality for a model, one or several SAEs and an optional adapter."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorasae.data import DEFAULT_CORPUS, packed_sequences
from lorasae.errors import LorasaeError
from lorasae.manifest import AdapterManifest
from lorasae.metrics import evaluate
from lorasae.models import DEFAULT_MODEL, LoadedModel, load_model, model_fingerprint
from lorasae.saes import LoadedSAE, load_sae, sae_fingerprint
from lorasae.training.train_sae import ensure_default_sae


@dataclass
class EvalConfig:
    model: str = DEFAULT_MODEL
    saes: list[str] = field(default_factory=list)  # empty: the adapter's SAEs, else the default SAE
    adapter: str | None = None
    tokens: int = 16_384
    ctx: int = 128
    batch_size: int = 8
    corpus: str = DEFAULT_CORPUS
    keep_first: bool = True
    device: str | None = None
    dtype: str | None = None


def resolve_saes(lm: LoadedModel, specs: list[str], model_spec: str) -> list[LoadedSAE]:
    """Load the SAEs named by ``specs``; with none given, the default SAE of the default model."""
    if not specs:
        if model_spec != DEFAULT_MODEL:
            raise LorasaeError("--sae is required with a non-default --model")
        specs = [str(ensure_default_sae(lm))]
    return [load_sae(spec, device=lm.device, model=lm.model) for spec in specs]


def identities(lm: LoadedModel, saes: list[LoadedSAE]) -> dict:
    return {
        "model": lm.model_id,
        "model_fingerprint": model_fingerprint(lm.model),
        "sae_fingerprints": {s.sae_id: sae_fingerprint(s.sae) for s in saes},
    }


def load_adapter(model: torch.nn.Module, path: str) -> torch.nn.Module:
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
    saes = resolve_saes(lm, specs, cfg.model)
    ids = identities(lm, saes)
    if manifest is not None:
        manifest.check(ids["model_fingerprint"], saes)
    sequences = packed_sequences(lm.tokenizer, "heldout", cfg.tokens, cfg.ctx, cfg.corpus)
    model = lm.model if cfg.adapter is None else load_adapter(lm.model, cfg.adapter)
    result = evaluate(model, saes, sequences, cfg.batch_size, cfg.keep_first,
                      adapter=cfg.adapter is not None)
    for entry in result["saes"]:
        entry["fingerprint"] = ids["sae_fingerprints"][entry["id"]]
    return {**result, "model": ids["model"], "model_fingerprint": ids["model_fingerprint"],
            "adapter": cfg.adapter, "corpus": cfg.corpus, "ctx": cfg.ctx,
            "seconds": round(time.time() - started, 1)}
