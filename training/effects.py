"""The exact causal effect of single latents, shared by ``lorasae dashboards`` and ``lorasae drift``.

The effect of latent ``j`` of the SAE at layer ``L`` at token ``p`` of a sequence: the next-token
log-probabilities at ``p`` with the SAEs spliced, minus those with ``j`` alone removed from the SAE's
reconstruction at ``p``. Not an attribution estimate: one spliced forward of the sequence fills a
KV cache, then every (latent, token) row is one batched decode step of its token, attending to the
cached earlier positions (a mask hides the later ones), with the edit applied by
``Splice(edit=...)``. Only the final hidden state (the final norm's output) is kept per row; logits
are formed by the caller, so memory does not grow with the vocabulary.

The decode step skips what the edit cannot change: layers ``0..L`` give the clean residual at
``p`` (the edit happens after them), so they are replaced for the step by stubs, the one at ``L``
returning the residual captured in the clean forward; the cache is cropped to the rows' furthest
position and shared by the rows as an expanded view. Same numbers as decoding the full stack
(``tests/test_dashboards.py`` compares with full-forward ablations).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from lorasae.metrics import logprobs_from_hidden
from lorasae.models import (
    cache_kwarg,
    decoder_layers,
    final_norm,
    output_cache,
    output_head,
)
from lorasae.saes import LoadedSAE
from lorasae.splice import Splice, start_after

DECODE_ROWS = 64  # (latent, token) rows per decode step


@dataclass
class EffectRows:
    """(SAE layer, latent, sequence, position) rows whose effect is measured."""

    layer: torch.Tensor  # [R] int64
    latent: torch.Tensor
    sequence: torch.Tensor
    position: torch.Tensor

    def __len__(self) -> int:
        return self.layer.numel()

    def take(self, index: torch.Tensor) -> EffectRows:
        return EffectRows(self.layer[index], self.latent[index], self.sequence[index], self.position[index])

    @classmethod
    def cat(cls, parts: list[EffectRows]) -> EffectRows:
        if not parts:
            empty = torch.zeros(0, dtype=torch.int64)
            return cls(empty, empty, empty, empty)
        names = ("layer", "latent", "sequence", "position")
        return cls(*(torch.cat([getattr(p, name) for p in parts]) for name in names))

    @classmethod
    def of_top(cls, layer: int, top_index: torch.Tensor, ctx: int) -> EffectRows:
        """Rows for the kept contexts of ``top_index`` ([latents, k] global token indices, -1 empty),
        in (latent, rank) order."""
        latent, rank = torch.nonzero(top_index >= 0, as_tuple=True)
        gidx = top_index[latent, rank]
        return cls(torch.full_like(latent, layer), latent, gidx // ctx, gidx % ctx)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def hidden_and_vocab(model: nn.Module) -> tuple[int, int]:
    # cast: nn.Module attributes are typed Tensor | Module; the head's weight is its [vocab, d] matrix
    vocab, hidden = cast(torch.Tensor, output_head(model).weight).shape
    return hidden, vocab


@torch.inference_mode()
def sequence_effects(
    model: nn.Module, saes: list[LoadedSAE], ids: torch.Tensor, rows: EffectRows, keep_first: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows that all belong to the sequence ``ids`` ([ctx]): final hidden states at each row's
    token, clean (spliced, unedited) and with the row's latent removed from its SAE's
    reconstruction at that token. Both ``[R, hidden]`` float32 on the CPU, in row order."""
    device = model_device(model)
    length = int(rows.position.max()) + 1
    layers = decoder_layers(model)
    finals: list[torch.Tensor] = []
    raw: dict[int, torch.Tensor] = {}
    handles = [final_norm(model).register_forward_hook(lambda _m, _a, out: finals.append(out))]
    for sae in saes:  # registered before the splice's hooks: they see each layer's raw output
        handles.append(
            layers[sae.layer].register_forward_hook(
                lambda _m, _a, out, layer=sae.layer: raw.__setitem__(layer, _tensor(out).clone())
            )
        )
    try:
        with Splice(model, saes, keep_first):
            out = model(input_ids=ids[None, :length].to(device), use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
    finally:
        for handle in handles:
            handle.remove()
    clean = finals.pop()[0, rows.position.to(device)].float().cpu()
    ablated = torch.empty_like(clean)
    # decode in (layer, position) order: one skip point per chunk, and cropped caches stay short
    order = torch.argsort(rows.layer * (length + 1) + rows.position, stable=True)
    for layer in rows.layer.unique().tolist():
        mine = order[rows.layer[order] == layer]
        for chunk in torch.split(mine, DECODE_ROWS):
            ablated[chunk] = _decode_ablated(model, saes, ids, rows, chunk, layer, raw[layer], cache)
    return clean, ablated


def _tensor(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _decode_ablated(
    model: nn.Module,
    saes: list[LoadedSAE],
    ids: torch.Tensor,
    rows: EffectRows,
    which: torch.Tensor,
    layer: int,
    raw: torch.Tensor,
    cache: Any,
) -> torch.Tensor:
    """One decode step per row (all of SAE ``layer``): the row's token after the cached clean prefix
    before it, its latent zeroed; layers up to ``layer`` stubbed (see the module docstring)."""
    device = model_device(model)
    n = which.numel()
    positions = rows.position[which]
    crop = int(positions.max())
    step_cache, kept = _step_cache(cache, n, crop)
    seen = torch.arange(kept)[None] < positions[:, None]
    mask = torch.cat([seen, torch.ones(n, 1, dtype=torch.bool)], dim=1).long()
    latent_of = rows.latent[which].to(device)
    batch = torch.arange(n, device=device)
    finals: list[torch.Tensor] = []

    def remove(at: int, latents: torch.Tensor) -> torch.Tensor:
        if at != layer:
            return latents
        latents = latents.clone()
        latents[batch, 0, latent_of] = 0.0
        return latents

    handle = final_norm(model).register_forward_hook(lambda _m, _a, out: finals.append(out))
    try:
        with start_after(model, layer, raw[0, positions.to(raw.device)][:, None]):
            with Splice(model, saes, keep_first=False, edit=remove):  # hooks on the stubs
                model(
                    input_ids=ids[positions][:, None].to(device),
                    attention_mask=mask.to(device),
                    position_ids=positions[:, None].to(device),
                    use_cache=True,
                    logits_to_keep=1,
                    **{cache_kwarg(model): step_cache},
                )
    finally:
        handle.remove()
    return finals.pop()[:, 0].float().cpu()


def _step_cache(cache: Any, n: int, crop: int) -> tuple[Any, int]:
    """The clean cache for ``n`` decode rows and its length: plain dynamic layers are cropped to
    ``crop`` positions and expanded as views (no copy until the step appends to them); any other
    cache (sliding windows, ...) is deep-copied whole and repeated."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers):
        step = copy.copy(cache)
        step.layers = []
        for layer in cast(list[DynamicLayer], cache.layers):
            keys, values = cast(torch.Tensor, layer.keys), cast(torch.Tensor, layer.values)
            view = copy.copy(layer)
            view.keys = keys[:, :, :crop].expand(n, -1, -1, -1)
            view.values = values[:, :, :crop].expand(n, -1, -1, -1)
            step.layers.append(view)
        return step, crop
    step = copy.deepcopy(cache)
    step.batch_repeat_interleave(n)
    return step, int(step.get_seq_length())


@torch.inference_mode()
def mean_effect_blocks(
    model: nn.Module,
    latent_of_rows: torch.Tensor,
    clean: torch.Tensor,
    ablated: torch.Tensor,
    d_sae: int,
    block: int = 128,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per block of latents ``(latents, effects [b, vocab], contexts [b])``: each latent's mean,
    over its rows, of log p(clean) - log p(latent removed) (zeros where it has no row). Rows are
    one SAE's: ``latent_of_rows`` [R] with their final hidden states ``clean`` / ``ablated`` [R, d]."""
    device = model_device(model)
    _, vocab = hidden_and_vocab(model)
    counts = torch.bincount(latent_of_rows, minlength=d_sae)
    for first in range(0, d_sae, block):
        latents = torch.arange(first, min(first + block, d_sae))
        here = torch.nonzero((latent_of_rows >= first) & (latent_of_rows < first + block)).flatten()
        effects = torch.zeros(latents.numel(), vocab)
        if here.numel():
            clean_lp = logprobs_from_hidden(model, clean[here].to(device))
            diff = clean_lp - logprobs_from_hidden(model, ablated[here].to(device))
            effects.index_add_(0, latent_of_rows[here] - first, diff.float().cpu())
        used = counts[latents]
        yield latents, effects / used.clamp(min=1)[:, None], used
