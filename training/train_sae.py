"""Train a TopK SAE on a model's residual stream with sae-lens's own trainer, saved in sae-lens format.

Activations are collected from the train split of the corpus (forward stopped at the SAE layer, the
BOS position dropped), held in memory, shuffled, and fed to ``sae_lens.training.SAETrainer`` for a few
epochs. The result is an ordinary sae-lens folder (``SAE.load_from_disk``), with the hook name
``blocks.L.hook_resid_post`` that lorasae maps back onto decoder layer ``L``.

``ensure_default_sae`` caches the embedded default model's SAE under the data directory, so the demo,
the eval and the server train it once.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lorasae.data import DEFAULT_CORPUS, packed_sequences
from lorasae.errors import LorasaeError
from lorasae.models import LoadedModel, decoder_layers, hidden_size
from lorasae.paths import data_dir
from lorasae.splice import residual_at

SAE_TRAINING_FILE = "lorasae_sae_training.json"


@dataclass
class SaeTrainingConfig:
    """Every setting of one SAE training run; saved beside the SAE."""

    layer: int | None = None  # None: the middle layer
    expansion: int = 8  # d_sae = expansion * d_model
    k: int = 32  # TopK: active latents per token
    tokens: int = 400_000  # activations collected (BOS positions excluded)
    ctx: int = 128
    epochs: int = 2
    batch_size: int = 4096
    lr: float = 4e-3
    dead_feature_window: int = 40  # steps without firing before the aux loss revives a latent
    seed: int = 0
    corpus: str = DEFAULT_CORPUS

    def resolved_layer(self, n_layers: int) -> int:
        layer = n_layers // 2 if self.layer is None else self.layer
        if not 0 <= layer < n_layers:
            raise LorasaeError(f"layer {layer} is out of range: the model has {n_layers} layers")
        return layer


def collect_activations(lm: LoadedModel, layer: int, sequences: torch.Tensor,
                        batch_size: int = 16) -> torch.Tensor:
    """Residual stream after ``layer`` for every non-BOS position, ``[N * (T-1), d_model]`` float32."""
    chunks = []
    for start in tqdm(range(0, sequences.shape[0], batch_size), desc=f"collecting layer {layer}",
                      unit="batch"):
        ids = sequences[start:start + batch_size].to(lm.device)
        acts = residual_at(lm.model, layer, ids)[:, 1:]
        chunks.append(acts.reshape(-1, acts.shape[-1]).float().cpu())
    return torch.cat(chunks)


def _epochs(acts: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled batches over ``acts``, reshuffled every epoch, forever (sae-lens stops by sample count)."""
    while True:
        order = torch.randperm(acts.shape[0], generator=generator)
        for start in range(0, acts.shape[0] - batch_size + 1, batch_size):
            yield acts[order[start:start + batch_size]]


def train_sae(lm: LoadedModel, cfg: SaeTrainingConfig, out: Path) -> Path:
    """Collect activations, train a TopK SAE with sae-lens, save it to ``out`` (atomically)."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(cfg.seed)
    started = time.time()
    layer = cfg.resolved_layer(len(decoder_layers(lm.model)))
    d_model = hidden_size(lm.model)
    sequences = packed_sequences(lm.tokenizer, "train", cfg.tokens * cfg.ctx // (cfg.ctx - 1),
                                 cfg.ctx, cfg.corpus)
    acts = collect_activations(lm, layer, sequences)
    if acts.shape[0] < cfg.batch_size:
        raise LorasaeError(f"collected {acts.shape[0]} activations, fewer than one batch of "
                           f"{cfg.batch_size}: raise --tokens or lower --batch-size")
    collected = time.time()
    hook_name = f"blocks.{layer}.hook_resid_post"
    sae_cfg = TopKTrainingSAEConfig(
        d_in=d_model, d_sae=cfg.expansion * d_model, k=cfg.k, device=str(lm.device),
        normalize_activations="expected_average_only_in",
        metadata=SAEMetadata(model_name=lm.model_id, hook_name=hook_name, context_size=cfg.ctx,
                             prepend_bos=True, dataset_path=cfg.corpus),
    )
    sae = TopKTrainingSAE(sae_cfg)
    with torch.no_grad():
        # Start the decoder bias at the data mean (in sae-lens's normalised units): with the zero
        # default, the residual stream's large shared mean makes the same few latents win TopK
        # everywhere and about half the latents die (measured: 2559 vs 213 dead of 4608 latents).
        scale = d_model ** 0.5 / acts[:100_000].norm(dim=-1).mean()
        sae.b_dec.copy_((acts.mean(0) * scale).to(sae.b_dec.device))
    n_samples = cfg.epochs * (acts.shape[0] // cfg.batch_size) * cfg.batch_size
    trainer_cfg = SAETrainerConfig(
        total_training_samples=n_samples, train_batch_size_samples=cfg.batch_size, lr=cfg.lr,
        lr_scheduler_name="cosineannealing", lr_end=cfg.lr / 10, device=str(lm.device),
        dead_feature_window=cfg.dead_feature_window, feature_sampling_window=10**9,
        n_batches_for_norm_estimate=20,
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    trainer = SAETrainer(trainer_cfg, sae, _epochs(acts, cfg.batch_size, generator))
    trainer.fit()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sae.save_inference_model(tmp)
    record = {"config": asdict(cfg), "layer": layer, "hook_name": hook_name,
              "model": lm.model_id, "activations": int(acts.shape[0]),
              "seconds_collecting": round(collected - started, 1),
              "seconds_training": round(time.time() - collected, 1)}
    (tmp / SAE_TRAINING_FILE).write_text(json.dumps(record, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def default_sae_dir(cfg: SaeTrainingConfig | None = None) -> Path:
    cfg = cfg or SaeTrainingConfig()
    layer = "mid" if cfg.layer is None else f"L{cfg.layer}"
    return data_dir() / "saes" / f"smollm2-135m-{layer}-topk{cfg.k}-x{cfg.expansion}"


def ensure_default_sae(lm: LoadedModel, cfg: SaeTrainingConfig | None = None) -> Path:
    """The default SAE's folder, training it first if it is not cached yet."""
    cfg = cfg or SaeTrainingConfig()
    out = default_sae_dir(cfg)
    if not (out / "cfg.json").exists():
        train_sae(lm, cfg, out)
    return out
