"""Splicing: replace the residual stream after chosen decoder layers during a forward pass.

One mechanism serves training, evaluation and the service: forward hooks on the decoder blocks
(found through a peft wrapper too) that swap the block's hidden-state output for
``sae.decode(sae.encode(x))`` (or zeros, for zero ablation). Position 0 (BOS) can be kept unspliced,
as Gemma Scope's evaluation and the reference code do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorasae.models import decoder_layers
from lorasae.saes import LoadedSAE, check_distinct_layers

Replacement = Callable[[torch.Tensor], torch.Tensor]
# Edits an SAE's latents before they are decoded: (layer of the SAE, latents [batch, seq, d_sae]) -> latents
LatentEdit = Callable[[int, torch.Tensor], torch.Tensor]


def _hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """Decoder blocks return a tensor (transformers 5.x) or a tuple whose first item is the hidden state."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _with_hidden(output: torch.Tensor | tuple, hidden: torch.Tensor) -> torch.Tensor | tuple:
    return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])


@contextmanager
def replace_outputs(
    model: nn.Module,
    replacements: Mapping[int, Replacement],
    keep_first: bool = True,
    keep: torch.Tensor | None = None,
) -> Iterator[None]:
    """While active, the hidden output ``x`` of layer ``L`` becomes ``replacements[L](x)``.

    With ``keep_first`` the original activation at position 0 is kept; ``keep`` ([batch, seq]
    bool) names the positions that keep it instead (e.g. each row's first real token in a
    left-padded batch).
    """
    layers = decoder_layers(model)
    handles = []

    def make_hook(fn: Replacement):
        def hook(_module: nn.Module, _args: tuple, output):
            x = _hidden(output)
            new = fn(x).to(x.dtype)
            if keep is not None:
                new = torch.where(keep.to(new.device)[..., None], x, new)
            elif keep_first and new.shape[1] > 0:
                new = torch.cat([x[:, :1], new[:, 1:]], dim=1)
            return _with_hidden(output, new)

        return hook

    try:
        for layer, fn in replacements.items():
            handles.append(layers[layer].register_forward_hook(make_hook(fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class SpliceRecord:
    """What one SAE saw and produced in the last forward: ``[batch, seq, ...]`` tensors."""

    sae_in: torch.Tensor
    latents: torch.Tensor
    recon: torch.Tensor

    def error_sq(self) -> torch.Tensor:
        """Squared L2 reconstruction error per token, ``[batch, seq]``."""
        return (self.sae_in - self.recon).pow(2).sum(-1)


class Splice:
    """Context manager that splices SAEs into a model; optionally records latents per SAE.

    ``with Splice(model, saes, record=True) as s: model(ids)`` then ``s.records[layer]``.
    ``edit`` changes the latents before they are decoded (ablating or steering a latent); records
    keep the latents as encoded. With ``preserve_error`` the layer's output is its own activation
    plus decode(edited) - decode(encoded): the edit's effect without the reconstruction error (the
    activation itself when nothing is edited). ``keep``: see ``replace_outputs``.
    """

    def __init__(
        self,
        model: nn.Module,
        saes: Sequence[LoadedSAE],
        keep_first: bool = True,
        record: bool = False,
        edit: LatentEdit | None = None,
        preserve_error: bool = False,
        keep: torch.Tensor | None = None,
    ) -> None:
        check_distinct_layers(list(saes))
        self.model = model
        self.saes = list(saes)
        self.keep_first = keep_first
        self.record = record
        self.edit = edit
        self.preserve_error = preserve_error
        self.keep = keep
        self.records: dict[int, SpliceRecord] = {}
        self._ctx: AbstractContextManager[None] | None = None

    def _reconstruct(self, loaded: LoadedSAE) -> Replacement:
        sae = loaded.sae

        def fn(x: torch.Tensor) -> torch.Tensor:
            sae_in = x.to(sae.dtype)
            latents = sae.encode(sae_in)
            edited = latents if self.edit is None else self.edit(loaded.layer, latents)
            recon = sae.decode(edited)
            if self.record:
                self.records[loaded.layer] = SpliceRecord(sae_in.detach(), latents.detach(), recon.detach())
            if self.preserve_error:
                return x if edited is latents else x + (recon - sae.decode(latents)).to(x.dtype)
            return recon

        return fn

    def __enter__(self) -> Splice:
        self._ctx = replace_outputs(
            self.model, {s.layer: self._reconstruct(s) for s in self.saes}, self.keep_first, self.keep
        )
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        assert self._ctx is not None, "Splice.__exit__ without __enter__"
        self._ctx.__exit__(*exc)
        self._ctx = None


def zero_ablation(model: nn.Module, layers: Sequence[int], keep_first: bool = True):
    """Context manager replacing the output of ``layers`` by zeros (sae-lens's CE-score baseline)."""
    return replace_outputs(model, {layer: torch.zeros_like for layer in layers}, keep_first)


class _Stub(nn.Module):
    """Stands in for a decoder layer of a skipped prefix: passes its input through, or returns
    ``value`` (the residual after that layer, computed earlier)."""

    def __init__(self, original: nn.Module, value: torch.Tensor | None) -> None:
        super().__init__()
        self.value = value
        if hasattr(original, "attention_type"):  # models that pick a mask per layer type read it
            self.attention_type = original.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states if self.value is None else self.value.to(hidden_states.dtype)


@contextmanager
def start_after(model: nn.Module, layer: int, residual: torch.Tensor) -> Iterator[None]:
    """While active, a forward of ``model`` skips decoder layers ``0..layer``: their outputs are
    taken as given, ``residual`` (``[batch, seq, d_model]``, what ``residual_at`` returns) being the
    output of ``layer``. The embeddings and the layers after ``layer`` run as usual.

    Exact whenever the skipped layers would compute ``residual`` in this forward: the training step
    shares the prefix between the clean and the adapted pass (no LoRA in it), the decode steps of
    ``training.effects`` reuse the clean forward's. Splice hooks entered *inside* this context
    attach to the stand-in for ``layer`` and see ``residual`` as its output."""
    layers = decoder_layers(model)
    originals = [layers[i] for i in range(layer + 1)]
    try:
        for i, original in enumerate(originals):
            layers[i] = _Stub(original, residual if i == layer else None)
        yield
    finally:
        for i, original in enumerate(originals):
            layers[i] = original


@dataclass
class SharedPrefix:
    """The output of decoder layer ``layer`` for a batch, computed once (or read from a cache) and
    shared by every forward of that batch that skips layers ``0..layer`` (``skip``)."""

    layer: int
    residual: torch.Tensor

    def skip(self, model: nn.Module) -> AbstractContextManager[None]:
        return start_after(model, self.layer, self.residual)


def skipping(model: nn.Module, prefix: SharedPrefix | None) -> AbstractContextManager[None]:
    """``prefix.skip(model)``, or nothing to skip."""
    return nullcontext() if prefix is None else prefix.skip(model)


class _Stop(Exception):
    pass


@contextmanager
def stop_after(model: nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """While active, a forward of ``model`` ends after decoder layer ``layer`` (hooks registered
    before this one, e.g. a splice, still run): call the model with ``run_until``. Yields the list
    that receives that layer's output."""
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: tuple, output):
        captured.append(_hidden(output))
        raise _Stop

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def run_until(model: nn.Module, **inputs) -> None:
    """Call ``model(**inputs)`` inside ``stop_after``: the early end is not an error."""
    try:
        model(**inputs)
    except _Stop:
        pass


@torch.no_grad()
def residual_at(
    model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The output of decoder layer ``layer``; the forward stops there (~2x faster for middle layers)."""
    with stop_after(model, layer) as captured:
        run_until(model, input_ids=input_ids, attention_mask=attention_mask)
    return captured[0]
