"""`lorasae train-e2e`: the end-to-end SAE baseline the method is measured against (Braun et al. 2024).

An SAE of the same architecture, width and sparsity as the given one is trained with the *model*
frozen on ``KL(p_clean || p_spliced)`` (the same loss, data, schedule and loop as `lorasae train`),
plus the sparsity term its architecture needs:

- TopK: none (``k`` fixes the sparsity);
- JumpReLU (Gemma Scope): sae-lens's quadratic L0 penalty around the given SAE's measured L0
  (``coeff * 2/L0* * (L0 - L0*)^2``, straight-through gradients), so the e2e SAE keeps its sparsity;
- standard (ReLU): sae-lens's decoder-norm-weighted L1 penalty.

``--init finetune`` starts from the given SAE's weights; ``--init scratch`` from a fresh sae-lens
initialisation (decoder bias at the mean residual). The trainable SAE is sae-lens's own training
class for that architecture, and the result is saved in sae-lens's inference format (``cfg.json``
+ ``sae_weights.safetensors``, written last), so `lorasae eval`, `lorasae train` and the server take
it like any SAE. Runs in one process (the SAE is called from a hook, which DDP cannot follow).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from lorasae.errors import LorasaeError
from lorasae.files import publish_dir, write_json_atomic
from lorasae.metrics import (
    evaluate,
    logprobs_from_hidden,
    mean_kl,
    next_token_logits,
    next_token_logprobs,
    spliced_ce,
)
from lorasae.saes import LoadedSAE
from lorasae.splice import replace_outputs, residual_at, skipping

from .fields import saes_field
from .loop import LoopConfig, Objective, StepStart, run_loop

if TYPE_CHECKING:
    from sae_lens import TrainingSAE

E2E_RECORD_FILE = "lorasae_e2e.json"
DEFAULT_COEFFS = {"topk": None, "jumprelu": 0.01, "standard": 1e-3}


@dataclass
class E2eTrainConfig(LoopConfig):
    """Every setting of an e2e SAE run; saved in metrics.json and beside the SAE."""

    saes: list[str] = saes_field(
        "the SAE whose architecture, width and sparsity to match (and the "
        "start with --init finetune; default: the embedded default SAE)"
    )
    lr: float = field(default=5e-4, metadata={"help": "learning rate of the SAE (AdamW, constant)"})
    init: Literal["finetune", "scratch"] = field(
        default="finetune",
        metadata={"help": "start from the given SAE's weights or from a fresh initialisation"},
    )
    sparsity_coeff: float | None = field(
        default=None,
        metadata={  # None: DEFAULT_COEFFS
            "help": "L0 (JumpReLU) / L1 (standard) penalty; TopK needs none "
            "(default: 0.01 JumpReLU around the given L0, 1e-3 L1)"
        },
    )

    def validate(self) -> None:
        super().validate()
        if self.init not in ("finetune", "scratch"):
            raise LorasaeError("--init must be 'finetune' or 'scratch'")
        if len(self.saes) > 1:
            raise LorasaeError("train-e2e trains one SAE; pass one --sae")


def trainable_sae(
    loaded: LoadedSAE, init: str, coeff: float | None, target_l0: float | None
) -> TrainingSAE[Any]:
    """sae-lens's training SAE of ``loaded``'s architecture and shape, from its weights or fresh."""
    from sae_lens.registry import get_sae_training_class

    sae = loaded.sae
    arch = sae.cfg.architecture()
    if arch not in DEFAULT_COEFFS:
        raise LorasaeError(f"train-e2e supports {sorted(DEFAULT_COEFFS)} SAEs, not {arch!r}")
    sae_cls, cfg_cls = get_sae_training_class(arch)
    extra: dict = {"device": str(sae.W_enc.device), "dtype": "float32"}
    if arch == "topk":
        extra["rescale_acts_by_decoder_norm"] = False  # the inference TopK SAE's encoder, exactly
    elif arch == "jumprelu":
        extra.update(
            l0_coefficient=coeff,
            jumprelu_sparsity_loss_mode="quadratic",
            target_l0=target_l0,
            pre_act_loss_coefficient=None,
        )
    else:
        extra["l1_coefficient"] = coeff
    cfg_dict = {**sae.cfg.to_dict(), **extra}
    cfg_dict["metadata"] = sae.cfg.metadata.to_dict()
    trained = sae_cls(cfg_cls.from_dict(cfg_dict))
    if init == "finetune":
        state = {k: v.detach().float().clone() for k, v in sae.state_dict().items()}
        missing, unexpected = trained.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if k in dict(trained.named_parameters())]:
            raise LorasaeError(f"cannot start from the given SAE: missing {missing}, unexpected {unexpected}")
    trained.train()
    return trained


class E2eObjective(Objective):
    """The SAE trains on the downstream KL; the model (and the given SAE) stay frozen."""

    desc = "e2e SAE"

    def __init__(self, cfg: E2eTrainConfig, lm, saes: list[LoadedSAE], accelerator) -> None:
        if accelerator.num_processes > 1:
            raise LorasaeError("train-e2e runs in one process (the SAE sits in a hook DDP cannot see)")
        self.cfg, self.lm, self.given = cfg, lm, saes[0]
        lm.model.requires_grad_(False)
        lm.model.eval()  # no dropout in the frozen model
        self.given.sae.requires_grad_(False)
        arch = self.given.sae.cfg.architecture()
        self.coeff = DEFAULT_COEFFS.get(arch) if cfg.sparsity_coeff is None else cfg.sparsity_coeff
        self.target_l0 = self._given_l0() if arch == "jumprelu" else None
        self.sae = trainable_sae(self.given, cfg.init, self.coeff, self.target_l0)
        if cfg.init == "scratch":
            with torch.no_grad():  # like `lorasae train-sae`: the decoder bias starts at the mean
                self.sae.b_dec.copy_(self._sample_residuals().mean(0))
        self.loaded = LoadedSAE(self.sae, f"e2e({self.given.sae_id})", self.given.hook_name, self.given.layer)

    def _sample_residuals(self) -> torch.Tensor:
        from lorasae.data import packed_sequences

        ids = packed_sequences(self.lm.tokenizer, "train", 16 * self.cfg.ctx, self.cfg.ctx, self.cfg.corpus)[
            :16
        ].to(self.lm.device)
        acts = residual_at(self.lm.model, self.given.layer, ids)[:, 1:]
        return acts.reshape(-1, acts.shape[-1]).float()

    @torch.no_grad()
    def _given_l0(self) -> float:
        acts = self._sample_residuals().to(self.given.sae.dtype)
        return float((self.given.sae.encode(acts) != 0).float().sum(-1).mean())

    @property
    def module(self) -> torch.nn.Module:
        return self.sae

    def _sparsity(
        self, x: torch.Tensor, acts: torch.Tensor, hidden_pre: torch.Tensor, recon: torch.Tensor
    ) -> torch.Tensor:
        from sae_lens.saes.sae import TrainStepInput

        if self.coeff is None:
            return x.new_zeros(())
        step_input = TrainStepInput(
            sae_in=x,
            coefficients={"l0": self.coeff, "l1": self.coeff},
            dead_neuron_mask=None,
            n_training_steps=0,
            is_logging_step=False,
        )
        losses: torch.Tensor | dict[str, torch.Tensor] = self.sae.calculate_aux_loss(
            step_input, acts, hidden_pre, recon
        )
        # a tensor start keeps the sum a tensor for the type checker (0 + t is t, exactly)
        return sum(losses.values(), x.new_zeros(())) if isinstance(losses, dict) else losses

    @property
    def prefix_layer(self) -> int:
        """The model is frozen: layers up to the SAE's are the same in both passes."""
        return self.given.layer

    def loss(self, prepared: torch.nn.Module, ids: torch.Tensor, start: StepStart) -> torch.Tensor:
        model, prefix = self.lm.model, start.prefix
        with torch.no_grad():
            if start.clean_final is not None:
                clean = logprobs_from_hidden(model, start.clean_final[:, :-1])
            else:
                with skipping(model, prefix):
                    clean = next_token_logprobs(model, ids)
        penalty: list[torch.Tensor] = []
        first = 1 if self.cfg.keep_first else 0

        def reconstruct(x: torch.Tensor) -> torch.Tensor:
            x = x.float()
            acts, hidden_pre = self.sae.encode_with_hidden_pre(x)
            recon = self.sae.decode(acts)
            flat = [t[:, first:].reshape(-1, t.shape[-1]) for t in (x, acts, hidden_pre, recon)]
            penalty.append(self._sparsity(*flat))
            return recon

        with (
            skipping(model, prefix),
            replace_outputs(model, {self.given.layer: reconstruct}, self.cfg.keep_first),
        ):
            student = next_token_logits(model, ids)
        return mean_kl(clean, student) + penalty[0]

    def heldout_ce(self, sequences: torch.Tensor) -> float:
        return spliced_ce(self.lm.model, [self.loaded], sequences, keep_first=self.cfg.keep_first)

    def evaluate(self, sequences: torch.Tensor) -> dict:
        with torch.no_grad():
            result = evaluate(self.lm.model, [self.loaded], sequences, keep_first=self.cfg.keep_first)
        return {**result, "heldout_ce": result["ce_spliced"]}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.sae.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.sae.load_state_dict(state)

    def finish(self, out: Path, metrics: dict) -> None:
        """The SAE in sae-lens format, its record, and ``cfg.json`` last (completion marker)."""
        record = {
            "config": asdict(self.cfg),
            "given_sae": self.given.sae_id,
            "architecture": self.sae.cfg.architecture(),
            "sparsity_coeff": self.coeff,
            "target_l0": self.target_l0,
            "train": metrics["train"],
            "loss": "kl_clean_vs_spliced_token_mean + sparsity",
        }
        with publish_dir(out, marker="cfg.json") as tmp:
            self.sae.save_inference_model(tmp)
            write_json_atomic(tmp / E2E_RECORD_FILE, record)


def train_e2e(cfg: E2eTrainConfig, out: Path, resume: bool = False) -> dict:
    """Train the e2e SAE baseline to ``out`` (an sae-lens folder plus the run's files)."""
    return run_loop(cfg, lambda lm, saes, acc: E2eObjective(cfg, lm, saes, acc), out, resume)
