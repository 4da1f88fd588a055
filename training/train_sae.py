"""Train a TopK SAE on a model's residual stream with sae-lens's own trainer, saved in sae-lens format.

Activations are collected from the train split of the corpus (forward stopped at the SAE layer) into
the residual cache (``lorasae.training.residuals``, which `train` and `train-e2e` then start from),
read without the BOS position, held in memory, shuffled, and fed to ``sae_lens.training.SAETrainer``
for a few epochs. The result is an ordinary sae-lens folder (``SAE.load_from_disk``), with the hook name
``blocks.L.hook_resid_post`` that lorasae maps back onto decoder layer ``L``.

``ensure_default_sae`` caches the embedded default model's SAE under the data directory, so the demo,
the eval and the server train it once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorasae.data import packed_sequences
from lorasae.errors import LorasaeError
from lorasae.files import publish_dir, write_json_atomic
from lorasae.models import LoadedModel, decoder_layers, hidden_size, load_model
from lorasae.saes import (
    DEFAULT_SAE_EXPANSION,
    DEFAULT_SAE_K,
    DEFAULT_SAE_TOKENS,
    SAE_CONFIG_FILE,
    default_sae_dir,
)

from .fields import corpus_field, ctx_field
from .residuals import cache_seconds, ensure_residuals, load_residuals

SAE_TRAINING_FILE = "lorasae_sae_training.json"


@dataclass
class SaeTrainingConfig:
    """Every setting of one SAE training run; saved beside the SAE."""

    layer: int | None = field(default=None, metadata={"help": "decoder layer (default: middle)"})
    expansion: int = field(default=DEFAULT_SAE_EXPANSION, metadata={"help": "d_sae / d_model"})
    k: int = field(default=DEFAULT_SAE_K, metadata={"help": "active latents per token (TopK)"})
    tokens: int = field(
        default=DEFAULT_SAE_TOKENS,
        metadata={"help": "training activations collected (BOS positions excluded)"},
    )
    ctx: int = ctx_field()
    epochs: int = field(default=2, metadata={"help": "passes over the collected activations"})
    batch_size: int = field(default=4096, metadata={"help": "activations per SAE optimizer step"})
    lr: float = field(default=4e-3, metadata={"help": "peak learning rate (cosine to a tenth)"})
    dead_feature_window: int = field(
        default=40, metadata={"help": "steps without firing before the auxiliary loss revives a latent"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the SAE's initialisation and data order"})
    corpus: str = corpus_field()

    def resolved_layer(self, n_layers: int) -> int:
        layer = n_layers // 2 if self.layer is None else self.layer
        if not 0 <= layer < n_layers:
            raise LorasaeError(f"layer {layer} is out of range: the model has {n_layers} layers")
        return layer

    def default_dir(self) -> Path:
        """Where the embedded default model's SAE trained with this recipe is cached."""
        return default_sae_dir(self.layer, self.k, self.expansion, self.tokens)


def _epochs(acts: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled batches over ``acts``, reshuffled every epoch, forever (sae-lens stops by sample count)."""
    while True:
        order = torch.randperm(acts.shape[0], generator=generator)
        for start in range(0, acts.shape[0] - batch_size + 1, batch_size):
            yield acts[order[start : start + batch_size]]


def train_sae(lm: LoadedModel, cfg: SaeTrainingConfig, out: Path) -> Path:
    """Collect activations, train a TopK SAE with sae-lens, save it to ``out`` (atomically)."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(cfg.seed)
    layer = cfg.resolved_layer(len(decoder_layers(lm.model)))
    d_model = hidden_size(lm.model)
    sequences = packed_sequences(
        lm.tokenizer, "train", cfg.tokens * cfg.ctx // (cfg.ctx - 1), cfg.ctx, cfg.corpus
    )
    # the collected residuals (BOS included) are the residual cache `train`/`train-e2e` start from
    cached = ensure_residuals(lm, layer, sequences, cfg.corpus)
    loaded = time.time()
    acts = load_residuals(cached, sequences.shape[0])[:, 1:].reshape(-1, d_model)  # BOS dropped: a copy
    if acts.shape[0] < cfg.batch_size:
        raise LorasaeError(
            f"collected {acts.shape[0]} activations, fewer than one batch of "
            f"{cfg.batch_size}: raise --tokens or lower --batch-size"
        )
    collected = time.time()
    hook_name = f"blocks.{layer}.hook_resid_post"
    sae_cfg = TopKTrainingSAEConfig(
        d_in=d_model,
        d_sae=cfg.expansion * d_model,
        k=cfg.k,
        device=str(lm.device),
        normalize_activations="expected_average_only_in",
        metadata=SAEMetadata(
            model_name=lm.model_id,
            hook_name=hook_name,
            context_size=cfg.ctx,
            prepend_bos=True,
            dataset_path=cfg.corpus,
        ),
    )
    sae = TopKTrainingSAE(sae_cfg)
    with torch.no_grad():
        # Start the decoder bias at the data mean (in sae-lens's normalised units): with the zero
        # default, the residual stream's large shared mean makes the same few latents win TopK
        # everywhere and about half the latents die (measured: 2559 vs 213 dead of 4608 latents).
        scale = d_model**0.5 / acts[:100_000].norm(dim=-1).mean()
        sae.b_dec.copy_((acts.mean(0) * scale).to(sae.b_dec.device))
    n_samples = cfg.epochs * (acts.shape[0] // cfg.batch_size) * cfg.batch_size
    trainer_cfg = SAETrainerConfig(
        total_training_samples=n_samples,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_scheduler_name="cosineannealing",
        lr_end=cfg.lr / 10,
        device=str(lm.device),
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=10**9,
        n_batches_for_norm_estimate=20,
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    trainer = SAETrainer(trainer_cfg, sae, _epochs(acts, cfg.batch_size, generator))
    trainer.fit()
    record = {
        "config": asdict(cfg),
        "layer": layer,
        "hook_name": hook_name,
        "model": lm.model_id,
        "activations": int(acts.shape[0]),
        # building the cache is the collection, whichever run built it
        "seconds_collecting": round(cache_seconds(cached) + collected - loaded, 1),
        "seconds_training": round(time.time() - collected, 1),
    }
    with publish_dir(out, overwrite=True) as tmp:
        sae.save_inference_model(tmp)
        write_json_atomic(tmp / SAE_TRAINING_FILE, record)
    return out


def ensure_default_sae(lm: LoadedModel | None = None, cfg: SaeTrainingConfig | None = None) -> Path:
    """The embedded default model's SAE (``cfg``: its recipe, default the default SAE's), trained
    first and cached if it is not yet; ``lm`` is that model, loaded here only when needed."""
    cfg = cfg or SaeTrainingConfig()
    out = cfg.default_dir()
    if not (out / SAE_CONFIG_FILE).exists():
        train_sae(lm or load_model(), cfg, out)
    return out
