"""Held-out metrics of a model with SAEs spliced in (and optionally a LoRA adapter): CE, KL, L0, FVU.

Definitions (see METHOD.md):
- ``ce_*`` mean next-token cross-entropy in nats over all predicted positions;
- ``ce_gap = ce_spliced - ce_clean``; ``gap_closed = (ce_spliced - ce_adapted_spliced) / ce_gap``;
- ``ce_loss_score = (ce_zero_ablation - ce_spliced) / (ce_zero_ablation - ce_clean)`` (sae-lens);
- ``kl_spliced``: KL(clean || spliced) of next-token distributions, mean per token;
- per SAE: ``l0`` (mean non-zero latents per token), ``explained_variance`` (1 - FVU over all spliced
  tokens, i.e. every position but the kept first/BOS one), ``dead_latents`` (never active on the
  evaluated tokens).
With several SAEs, the top-level CE numbers splice all of them at once; each SAE's entry also has its
own ``ce_spliced`` (only that SAE spliced) and, with an adapter, its own ``ce_adapted_spliced``/
``gap_closed``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorasae.errors import LorasaeError
from lorasae.files import write_json_atomic
from lorasae.models import logits_from_hidden
from lorasae.paths import data_dir
from lorasae.saes import LoadedSAE, sae_fingerprint
from lorasae.splice import SharedPrefix, Splice, residual_at, skipping, zero_ablation

if TYPE_CHECKING:
    from peft import PeftModel


def next_token_logprobs(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-softmax of the logits at positions 0..T-2 (those that predict a next token), float32."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    return F.log_softmax(logits.float(), dim=-1)


def logprobs_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities from final-norm outputs (what the head reads), float32: the
    same numbers as the forward's, for a teacher whose final hidden states are cached."""
    return F.log_softmax(logits_from_hidden(model, hidden), dim=-1)


def token_ce(logprobs: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position CE ``[B, T-1]`` of the next tokens under ``logprobs``."""
    return -logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def kl_per_token(logp_ref: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || q) per position, ``[B, T-1]``."""
    return (logp_ref.exp() * (logp_ref - logq)).sum(-1)


def next_token_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits at positions 0..T-2, float32 (a student's side of ``mean_kl``)."""
    return model(input_ids=input_ids).logits[:, :-1].float()


def mean_kl(logp_ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(p_ref || softmax(logits)), for training: the soft-target cross-entropy
    minus p_ref's entropy (the same number as ``kl_per_token(...).mean()``), which lets the
    student's side be one fused op and ~10% cheaper than log-softmax, difference and product.
    ``logp_ref`` carries no gradient."""
    vocab = logits.shape[-1]
    with torch.no_grad():
        p_ref = logp_ref.exp()
        neg_entropy = (p_ref * logp_ref).sum(-1).mean()
    return F.cross_entropy(logits.reshape(-1, vocab), p_ref.reshape(-1, vocab)) + neg_entropy


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """No (LoRA) dropout while measuring; the previous train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def spliced_ce(
    model: nn.Module,
    saes: Sequence[LoadedSAE],
    sequences: torch.Tensor,
    batch_size: int = 8,
    keep_first: bool = True,
) -> float:
    """Held-out CE with ``saes`` spliced into ``model`` as it is (adapter on, if it has one): the
    one number a training run watches."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, sequences.shape[0], batch_size):
            ids = sequences[start : start + batch_size].to(device)
            with Splice(model, saes, keep_first):
                total += float(token_ce(next_token_logprobs(model, ids), ids).sum())
            count += ids.shape[0] * (ids.shape[1] - 1)
    return total / count


@dataclass
class _SaeStats:
    """Running sums for one SAE over evaluated tokens (excluding the kept first position)."""

    d_sae: int
    tokens: int = 0
    l0_sum: float = 0.0
    err_sum: float = 0.0
    x_sum: torch.Tensor | None = None
    x_sq_sum: float = 0.0
    fired: torch.Tensor | None = None

    def update(self, record, skip_first: bool) -> None:
        start = 1 if skip_first else 0
        x = record.sae_in[:, start:].float().reshape(-1, record.sae_in.shape[-1])
        z = record.latents[:, start:].reshape(-1, record.latents.shape[-1])
        err = record.error_sq()[:, start:].float()
        self.tokens += x.shape[0]
        self.l0_sum += float((z != 0).sum())
        self.err_sum += float(err.sum())
        self.x_sq_sum += float(x.pow(2).sum())
        self.x_sum = x.sum(0) if self.x_sum is None else self.x_sum + x.sum(0)
        fired = (z != 0).any(0)
        self.fired = fired if self.fired is None else self.fired | fired

    def result(self) -> dict:
        assert self.x_sum is not None and self.fired is not None, "result() needs at least one update()"
        mean = self.x_sum / self.tokens
        total_var = self.x_sq_sum - self.tokens * float(mean.pow(2).sum())
        return {
            "l0": self.l0_sum / self.tokens,
            "explained_variance": 1.0 - self.err_sum / total_var,
            "dead_latents": int(self.d_sae - int(self.fired.sum())),
            "mse_per_token": self.err_sum / self.tokens,
        }


@dataclass
class _Sums:
    values: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.values[key] = self.values.get(key, 0.0) + float(tensor.sum())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    saes: Sequence[LoadedSAE],
    sequences: torch.Tensor,
    batch_size: int = 8,
    keep_first: bool = True,
    adapter: bool = False,
    progress: bool = True,
    splice_sets: bool = False,
    base_cache: str | None = None,
    identity_adapter: bool = False,
    unadapted_prefix: bool = False,
) -> dict:
    """Held-out metrics on ``sequences`` (``[N, T]`` token ids; each row a packed sequence).

    With ``adapter`` the model is a peft model whose active adapter is evaluated; clean, spliced and
    zero-ablation numbers are taken with the adapter disabled, so everything comes from one copy of
    the weights. With several SAEs each is also spliced alone; with ``splice_sets`` every non-empty
    subset of them is (``result["splice_sets"]``): an adapter trained for a set of SAEs can make CE
    worse than no adapter when used with part of it.

    The base numbers (everything but the adapter's) do not depend on the adapter: with
    ``base_cache`` (a ``base_key``) they are read from, or else computed and written to, the data
    directory's ``eval-base/`` (so an adapter's evaluation costs its own forwards only). With
    ``identity_adapter`` the caller knows the adapter changes nothing (LoRA's B matrices are zero
    at initialisation): its numbers are the base ones, without forwards.

    Layers up to the first SAE's run once per batch and every pass starts after them (exact: no
    pass changes them); with ``unadapted_prefix`` (the adapter has no LoRA there, as with LoRA
    after the SAE) the adapted passes too.
    """
    if splice_sets and len(saes) > MAX_SPLICE_SET_SAES:
        raise LorasaeError(
            f"splice sets of {len(saes)} SAEs are {2 ** len(saes) - 1} evaluations; "
            f"the limit is {MAX_SPLICE_SET_SAES} SAEs"
        )
    subsets = _subsets(saes, splice_sets)
    with eval_mode(model):
        return _evaluate(
            model,
            saes,
            sequences,
            batch_size,
            keep_first,
            adapter,
            progress,
            subsets,
            base_cache,
            identity_adapter,
            unadapted_prefix,
        )


MAX_SPLICE_SET_SAES = 6


def _subsets(saes: Sequence[LoadedSAE], every: bool) -> list[tuple[LoadedSAE, ...]]:
    """The proper subsets of ``saes`` evaluated besides the whole set: all of them with ``every``,
    else each SAE alone (none for a single SAE)."""
    if len(saes) < 2:
        return []
    if not every:
        return [(s,) for s in saes]
    return [c for n in range(1, len(saes)) for c in itertools.combinations(saes, n)]


def _set_key(subset: Sequence[LoadedSAE]) -> str:
    return "+".join(str(s.layer) for s in subset)


# what an adapter that changes nothing gives: each adapted number is its base counterpart
IDENTITY_ADAPTER = {
    "ce_spliced": "ce_adapted_spliced",
    "ce_clean": "ce_adapted_clean",
    "kl_spliced": "kl_adapted_spliced",
}


def base_key(
    model_fingerprint: str,
    saes: Sequence[LoadedSAE],
    sequences: torch.Tensor,
    keep_first: bool,
    splice_sets: bool = False,
) -> str:
    """The key of an evaluation's base numbers (clean, spliced, zero-ablated CE, KL, SAE stats),
    which no adapter changes: the base model's and the SAEs' fingerprints, the held-out token ids
    themselves (so corpus, split, count and context), the first-position rule and the subsets."""
    digest = hashlib.sha256()
    fields = {
        "model": model_fingerprint,
        "saes": [(s.layer, sae_fingerprint(s.sae)) for s in saes],
        "shape": list(sequences.shape),
        "keep_first": keep_first,
        "splice_sets": splice_sets,
    }
    digest.update(json.dumps(fields).encode())
    digest.update(sequences.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:24]


def _base_file(key: str) -> Path:
    return data_dir() / "eval-base" / f"{key}.json"


def _load_base(key: str | None) -> dict | None:
    """The cached base numbers under ``key``; None when absent or unreadable (then recomputed)."""
    if key is None or not _base_file(key).is_file():
        return None
    try:
        base = json.loads(_base_file(key).read_text())
        return {"means": dict(base["means"]), "saes": {int(k): v for k, v in base["saes"].items()}}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _evaluate(
    model: nn.Module,
    saes: Sequence[LoadedSAE],
    sequences: torch.Tensor,
    batch_size: int,
    keep_first: bool,
    adapter: bool,
    progress: bool,
    subsets: list[tuple[LoadedSAE, ...]],
    base_cache: str | None,
    identity_adapter: bool,
    unadapted_prefix: bool,
) -> dict:
    device = next(model.parameters()).device
    # with ``adapter`` the model is a peft model (nn.Module.__getattr__ types its methods as Tensor | Module)
    disabled: Callable[[], contextlib.AbstractContextManager[object]] = (
        cast("PeftModel", model).disable_adapter if adapter else contextlib.nullcontext
    )
    base = _load_base(base_cache)
    need_adapted = adapter and not identity_adapter
    sums, adapted = _Sums(), _Sums()
    stats = {s.layer: _SaeStats(s.d_sae) for s in saes}
    n_pred = sequences.shape[0] * (sequences.shape[1] - 1)
    batches = range(0, sequences.shape[0], batch_size) if base is None or need_adapted else range(0)
    first = min(s.layer for s in saes)
    for start in tqdm(batches, desc="evaluating", leave=False, disable=not progress):
        ids = sequences[start : start + batch_size].to(device)
        with disabled():  # layers up to the first SAE's run once for the clean, spliced, ablated passes
            prefix = SharedPrefix(first, residual_at(model, first, ids))
            with skipping(model, prefix):
                clean = next_token_logprobs(model, ids)
            if base is None:
                _add_base(sums, stats, model, saes, subsets, ids, clean, keep_first, prefix)
        if need_adapted:
            shared = prefix if unadapted_prefix else None
            with skipping(model, shared), Splice(model, saes, keep_first):
                spliced = next_token_logprobs(model, ids)
            adapted.add("ce_adapted_spliced", token_ce(spliced, ids))
            adapted.add("kl_adapted_spliced", kl_per_token(clean, spliced))
            del spliced
            with skipping(model, shared):
                adapted.add("ce_adapted_clean", token_ce(next_token_logprobs(model, ids), ids))
            _add_subset_ce(adapted, "ce_adapted_spliced", model, subsets, ids, keep_first, shared)
    if base is None:
        base = {
            "means": {k: v / n_pred for k, v in sums.values.items()},
            "saes": {layer: stat.result() for layer, stat in stats.items()},
        }
        if base_cache is not None:
            write_json_atomic(_base_file(base_cache), base)
    mean = dict(base["means"])
    mean.update({k: v / n_pred for k, v in adapted.values.items()})
    if adapter and identity_adapter:
        for key, value in base["means"].items():
            stem, _, name = key.rpartition("/")
            if name in IDENTITY_ADAPTER:
                mean[f"{stem}/{IDENTITY_ADAPTER[name]}" if stem else IDENTITY_ADAPTER[name]] = value
    return _summarise(mean, saes, base["saes"], n_pred, adapter, keep_first, subsets)


def _add_base(
    sums: _Sums,
    stats: dict[int, _SaeStats],
    model: nn.Module,
    saes: Sequence[LoadedSAE],
    subsets: list[tuple[LoadedSAE, ...]],
    ids: torch.Tensor,
    clean: torch.Tensor,
    keep_first: bool,
    prefix: SharedPrefix,
) -> None:
    """One batch's base numbers (the model as it is called: the caller disables any adapter), every
    pass starting after the shared ``prefix``."""
    sums.add("ce_clean", token_ce(clean, ids))
    with skipping(model, prefix), Splice(model, saes, keep_first, record=True) as splice:
        spliced = next_token_logprobs(model, ids)
    for layer, record in splice.records.items():
        stats[layer].update(record, keep_first)
    sums.add("ce_spliced", token_ce(spliced, ids))
    sums.add("kl_spliced", kl_per_token(clean, spliced))
    del spliced
    with skipping(model, prefix), zero_ablation(model, [s.layer for s in saes], keep_first):
        sums.add("ce_zero_ablation", token_ce(next_token_logprobs(model, ids), ids))
    _add_subset_ce(sums, "ce_spliced", model, subsets, ids, keep_first, prefix)


def _add_subset_ce(
    sums: _Sums,
    key: str,
    model: nn.Module,
    subsets: list[tuple[LoadedSAE, ...]],
    ids: torch.Tensor,
    keep_first: bool,
    prefix: SharedPrefix | None,
) -> None:
    """CE with each subset of the SAEs spliced, summed under ``"<layers>/<key>"`` (layers joined by +)."""
    for subset in subsets:
        with skipping(model, prefix), Splice(model, subset, keep_first):
            sums.add(f"{_set_key(subset)}/{key}", token_ce(next_token_logprobs(model, ids), ids))


def _gap_fields(ce_clean: float, ce_spliced: float, ce_adapted: float | None) -> dict:
    out: dict[str, float | None] = {"ce_spliced": ce_spliced, "ce_gap": ce_spliced - ce_clean}
    if ce_adapted is not None:
        out["ce_adapted_spliced"] = ce_adapted
        gap = ce_spliced - ce_clean
        out["gap_closed"] = (ce_spliced - ce_adapted) / gap if gap > 0 else None
    return out


def _summarise(
    mean: dict,
    saes: Sequence[LoadedSAE],
    stats: dict[int, dict],
    n_pred: int,
    adapter: bool,
    keep_first: bool,
    subsets: list[tuple[LoadedSAE, ...]],
) -> dict:
    ce_clean, ce_zero = mean["ce_clean"], mean["ce_zero_ablation"]
    out: dict = {"ce_clean": ce_clean}
    out.update(_gap_fields(ce_clean, mean["ce_spliced"], mean.get("ce_adapted_spliced")))
    if adapter:
        out["ce_adapted_clean"] = mean["ce_adapted_clean"]
        out["kl_adapted_spliced"] = mean["kl_adapted_spliced"]
    out["ce_zero_ablation"] = ce_zero
    denom = ce_zero - ce_clean
    out["ce_loss_score"] = (ce_zero - mean["ce_spliced"]) / denom if denom else None
    out["kl_spliced"] = mean["kl_spliced"]
    per_sae = []
    for sae in saes:
        entry = {
            "id": sae.sae_id,
            "hook_name": sae.hook_name,
            "layer": sae.layer,
            "d_sae": sae.d_sae,
            **stats[sae.layer],
        }
        if len(saes) > 1:
            entry.update(
                _gap_fields(
                    ce_clean, mean[f"{sae.layer}/ce_spliced"], mean.get(f"{sae.layer}/ce_adapted_spliced")
                )
            )
        per_sae.append(entry)
    out["l0"] = sum(e["l0"] for e in per_sae) / len(per_sae)
    out["explained_variance"] = sum(e["explained_variance"] for e in per_sae) / len(per_sae)
    out["dead_latents"] = sum(e["dead_latents"] for e in per_sae)
    out["tokens"] = n_pred
    out["keep_first_position"] = keep_first
    out["saes"] = per_sae
    if subsets:  # several SAEs: the whole set, then each subset evaluated
        whole = {
            "layers": [s.layer for s in saes],
            **_gap_fields(ce_clean, mean["ce_spliced"], mean.get("ce_adapted_spliced")),
        }
        out["splice_sets"] = [whole] + [
            {
                "layers": [s.layer for s in subset],
                **_gap_fields(
                    ce_clean,
                    mean[f"{_set_key(subset)}/ce_spliced"],
                    mean.get(f"{_set_key(subset)}/ce_adapted_spliced"),
                ),
            }
            for subset in subsets
        ]
    return out
