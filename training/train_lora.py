"""`lorasae train`: fit a LoRA adapter so the model works with frozen SAEs spliced in (the method).

Loss: KL(p_clean || p_adapted+spliced) on next-token distributions, averaged per token (the reference
code sums over positions and divides by the batch: same direction, scale differs by the context
length). ``p_clean`` comes from the same weights with the adapter disabled and no splice, without
gradient. Only LoRA parameters train; the base model and the SAEs are frozen.

The loop (accelerate, checkpoints, exact ``--resume``, progress, metrics.json) is
``lorasae.training.loop``, shared with the e2e SAE baseline; ``accelerate launch ... lorasae train``
runs it under DDP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import torch

from lorasae.errors import LorasaeError
from lorasae.files import publish_dir
from lorasae.manifest import MANIFEST_FILE, AdapterManifest, SaeEntry
from lorasae.metrics import (
    base_key,
    evaluate,
    logprobs_from_hidden,
    mean_kl,
    next_token_logits,
    next_token_logprobs,
    spliced_ce,
)
from lorasae.models import decoder_layers, model_fingerprint
from lorasae.saes import LoadedSAE
from lorasae.splice import SharedPrefix, Splice, skipping

from .loop import LoopConfig, Objective, run_loop

PAPER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


AdaptedLayers = Literal["after", "all"]  # LoRA on the layers after the first SAE, or on all


@dataclass
class LoraTrainConfig(LoopConfig):
    """Every setting of a LoRA-SAE run; saved in metrics.json and the manifest. Defaults: the paper's."""

    rank: int = field(default=64, metadata={"help": "LoRA rank"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scale alpha / rank)"})
    dropout: float = field(default=0.1, metadata={"help": "LoRA dropout"})
    target_modules: list[str] = field(
        default_factory=lambda: list(PAPER_TARGET_MODULES),
        metadata={"sep": ",", "help": "comma list of the module names that get LoRA"},
    )
    layers: AdaptedLayers = field(
        default="after",
        metadata={"help": "adapt only the layers after the first SAE (the paper's main runs) or all"},
    )
    preserve: float = field(
        default=0.0,
        metadata={
            "help": "weight of KL(clean || adapted model without the SAEs) added to the loss: keeps "
            "the model alone close to clean (0: the paper's loss)"
        },
    )

    def validate(self) -> None:
        super().validate()
        if self.layers not in ("after", "all"):
            raise LorasaeError("--layers must be 'after' or 'all'")
        if self.rank < 1:
            raise LorasaeError("--rank must be positive")
        if not 0 <= self.preserve <= 100:
            raise LorasaeError("--preserve must be within [0, 100]")


def lora_layers(cfg: LoraTrainConfig, saes: list[LoadedSAE], n_layers: int) -> list[int] | None:
    """Decoder layers that get LoRA: those after the first SAE, or all (None)."""
    if cfg.layers == "all":
        return None
    first = min(s.layer for s in saes)
    layers = list(range(first + 1, n_layers))
    if not layers:
        raise LorasaeError(f"no layers after layer {first} to adapt; use --layers all")
    return layers


def wrap_with_lora(model: torch.nn.Module, cfg: LoraTrainConfig, saes: list[LoadedSAE]):
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in present]
    if missing:
        raise LorasaeError(f"target modules {missing} not found in the model; pass --target-modules")
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # peft annotates int; it is a float scale (alpha / r)
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        layers_to_transform=lora_layers(cfg, saes, len(decoder_layers(model))),
    )
    return get_peft_model(model, config)


def kl_loss(
    model,
    peft_model,
    saes: list[LoadedSAE],
    ids: torch.Tensor,
    keep_first: bool,
    prefix: SharedPrefix | None = None,
    clean_final: torch.Tensor | None = None,
    preserve: float = 0.0,
) -> torch.Tensor:
    """Mean per-token KL(clean || adapted+spliced); ``model`` may be the DDP-wrapped ``peft_model``.

    With ``prefix`` (the residual after a layer no LoRA precedes) both passes start after it: the
    same loss, without running layers ``0..prefix.layer`` twice (or at all, from the cache). With
    ``clean_final`` (the clean model's cached final hidden states) the teacher is its head alone.
    With ``preserve`` > 0 the loss adds ``preserve`` x KL(clean || adapted without SAEs), from the
    same forward: the batch runs twice side by side, its second copy keeping every activation
    (``Splice``'s ``keep``), so DDP sees one forward."""
    with torch.no_grad(), peft_model.disable_adapter():
        if clean_final is not None:
            clean = logprobs_from_hidden(peft_model, clean_final[:, :-1])
        else:
            with skipping(peft_model, prefix):
                clean = next_token_logprobs(peft_model, ids)
    if not preserve:
        with skipping(peft_model, prefix), Splice(peft_model, saes, keep_first):  # hooks the stand-in
            return mean_kl(clean, next_token_logits(model, ids))
    n = ids.shape[0]
    keep = torch.zeros(2 * n, ids.shape[1], dtype=torch.bool, device=ids.device)
    keep[n:] = True  # the second copy: no SAE anywhere
    keep[:, 0] |= keep_first
    doubled = None if prefix is None else SharedPrefix(prefix.layer, torch.cat([prefix.residual] * 2))
    with skipping(peft_model, doubled), Splice(peft_model, saes, keep_first, keep=keep):
        logits = next_token_logits(model, torch.cat([ids, ids]))
    return mean_kl(clean, logits[:n]) + preserve * mean_kl(clean, logits[n:])


class LoraObjective(Objective):
    """LoRA matrices in the model train; the SAEs and the base weights stay frozen."""

    desc = "LoRA-SAE"

    def __init__(self, cfg: LoraTrainConfig, lm, saes: list[LoadedSAE]) -> None:
        self.cfg, self.lm, self.saes = cfg, lm, saes
        self.base_fingerprint = model_fingerprint(lm.model)
        self.peft_model = wrap_with_lora(lm.model, cfg, saes)

    @property
    def module(self) -> torch.nn.Module:
        return self.peft_model

    @property
    def prefix_layer(self) -> int | None:
        """With LoRA only after the first SAE, layers up to it are the base model's in both passes."""
        return None if self.cfg.layers == "all" else min(s.layer for s in self.saes)

    def teacher(self):
        return self.peft_model.disable_adapter()

    def loss(self, prepared, ids, start):
        return kl_loss(
            prepared,
            self.peft_model,
            self.saes,
            ids,
            self.cfg.keep_first,
            start.prefix,
            start.clean_final,
            self.cfg.preserve,
        )

    def heldout_ce(self, sequences):
        return spliced_ce(self.peft_model, self.saes, sequences, keep_first=self.cfg.keep_first)

    def evaluate(self, sequences):
        """Held-out metrics; the base numbers come from the evaluation cache when an earlier run
        computed them, and a fresh adapter (LoRA B = 0) needs no forward of its own."""
        result = evaluate(
            self.peft_model,
            self.saes,
            sequences,
            keep_first=self.cfg.keep_first,
            adapter=True,
            base_cache=base_key(self.base_fingerprint, self.saes, sequences, self.cfg.keep_first),
            identity_adapter=self.adapter_is_identity(),
            unadapted_prefix=self.prefix_layer is not None,
        )
        return {**result, "heldout_ce": result["ce_adapted_spliced"]}

    def adapter_is_identity(self) -> bool:
        """Every LoRA B matrix is zero (peft's initialisation): the adapter adds exactly nothing."""
        return all(not p.any() for name, p in self.peft_model.named_parameters() if "lora_B" in name)

    def state_dict(self):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.peft_model)

    def load_state_dict(self, state):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.peft_model, state)

    def finish(self, out, metrics):
        _finish(out, self.peft_model, self.lm, self.saes, self.base_fingerprint, self.cfg, metrics)


def train_lora(cfg: LoraTrainConfig, out: Path, resume: bool = False) -> dict:
    """Train, evaluate and save an adapter to ``out``; returns the metrics dict."""
    return run_loop(cfg, lambda lm, saes, _acc: LoraObjective(cfg, lm, saes), out, resume)


def _finish(
    out: Path,
    peft_model,
    lm,
    saes: list[LoadedSAE],
    base_fingerprint: str,
    cfg: LoraTrainConfig,
    metrics: dict,
) -> None:
    """Write the peft files, then the manifest last (its presence marks completion)."""
    lora = {
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "layers": cfg.layers,
        "layers_to_transform": lora_layers(cfg, saes, len(decoder_layers(lm.model))),
    }
    manifest = AdapterManifest(
        base_model=lm.model_id,
        base_model_fingerprint=base_fingerprint,
        saes=[SaeEntry.of(s) for s in saes],
        lora=lora,
        training={
            **metrics["train"],
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "ctx": cfg.ctx,
            "seed": cfg.seed,
            "corpus": cfg.corpus,
            "loss": "kl_clean_vs_adapted_spliced_token_mean"
            + (f" + {cfg.preserve} x kl_clean_vs_adapted_token_mean" if cfg.preserve else ""),
            "lr_schedule": cfg.lr_schedule,
            "warmup_steps": cfg.warmup_steps,
        },
        eval_before=_headline(metrics["start"]),
        eval_after=_headline(metrics["final"]),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    with publish_dir(out, marker=MANIFEST_FILE) as tmp:
        peft_model.save_pretrained(tmp)
        manifest.save(tmp)


def _headline(result: dict) -> dict:
    keys = (
        "ce_clean",
        "ce_spliced",
        "ce_adapted_spliced",
        "ce_adapted_clean",
        "gap_closed",
        "ce_gap",
        "kl_spliced",
        "kl_adapted_spliced",
        "tokens",
        "splice_sets",  # several SAEs: each subset with and without the adapter (the server warns with it)
    )
    return {
        k: result[k]
        for k in keys
        if k in result and not (isinstance(result[k], float) and math.isnan(result[k]))
    }
