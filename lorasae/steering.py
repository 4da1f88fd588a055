"""Generation with SAEs spliced and latents steered, one forward per call, KV-cached.

``BatchGeneration`` continues a batch of prompts (left-padded, with an attention mask and position
ids, so rows of different lengths share each forward). Every forward, the prefill and each cached
decode step alike, splices the SAEs with ``lorasae.splice.Splice`` (the code training and the
feature server use) and applies each row's ``LatentIntervention``s to the latents before they are
decoded: an intervention is never silently limited to the prompt. Rows may run different
adapters (peft ``adapter_names``) and differ in interventions, so a steered row and its unsteered
control share the forwards.

One ``advance()`` is one forward: the caller (the server's engine thread) interleaves other work
between steps. A row can *follow* another (``RowSpec.follows``): it is fed the other row's tokens
instead of its own, so that the KL divergence between the two models' next-token distributions is
measured on the same text (``kl_pairs``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lorasae.models import cache_kwarg, output_cache
from lorasae.saes import LoadedSAE
from lorasae.splice import Splice

Op = Literal["set", "add", "scale"]
Positions = Literal["all", "prompt", "generated"]
Phase = Literal["prompt", "generated"]


@dataclass(frozen=True)
class LatentIntervention:
    """Latent ``latent`` of the SAE at ``layer``: set to / add / multiply by ``value`` at the
    prompt's positions, the generated ones (as they are fed back in), or all."""

    layer: int
    latent: int
    op: Op
    value: float
    positions: Positions = "all"

    def apply(self, column: torch.Tensor) -> torch.Tensor:
        if self.op == "set":
            return torch.full_like(column, self.value)
        if self.op == "add":
            return column + self.value
        return column * self.value


def intervene(
    latents: torch.Tensor, layer: int, per_row: Sequence[Sequence[LatentIntervention]], phase: Phase
) -> torch.Tensor:
    """``latents`` [B, T, d] of the SAE at ``layer`` with each row's interventions for ``phase``
    applied (the same tensor when none applies)."""
    out = latents
    for b, interventions in enumerate(per_row):
        for iv in interventions:
            if iv.layer == layer and iv.positions in ("all", phase):
                if out is latents:
                    out = latents.clone()
                out[b, :, iv.latent] = iv.apply(out[b, :, iv.latent])
    return out


@dataclass
class RowSpec:
    """One row of a generation batch."""

    prompt: list[int]
    adapter: str | None = None  # peft adapter name (None: the base model)
    interventions: tuple[LatentIntervention, ...] = ()
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    follows: int | None = None  # fed the tokens of that row, not its own (see the module docstring)


@dataclass
class StepOutput:
    """What one forward produced, per row: the token sampled (None once the row finished, and for
    the forward after the last token), the top latents at the row's input token of this forward
    (``{layer: (indices, values)}``, after the interventions; empty unless ``features_k``), and the
    KL divergence of each ``kl_pairs`` pair, keyed by its first row."""

    tokens: list[int | None]
    features: list[dict[int, tuple[list[int], list[float]]]]
    kl: dict[int, float] = field(default_factory=dict)


class BatchGeneration:
    def __init__(
        self,
        model: nn.Module,
        saes: Sequence[LoadedSAE],
        rows: Sequence[RowSpec],
        *,
        max_new_tokens: int,
        pad_id: int,
        eos_ids: Sequence[int] = (),
        keep_first: bool = True,
        preserve_error: bool = False,
        features_k: int | None = None,
        kl_pairs: Sequence[tuple[int, int]] = (),
        adapter_names: Callable[[list[RowSpec]], list[str]] | None = None,
    ) -> None:
        """``adapter_names`` turns the rows into peft's per-row ``adapter_names`` (None: the model
        is not a peft model with several adapters, and no row names one)."""
        self.model = model
        self.saes = list(saes)
        self.rows = list(rows)
        self.max_new_tokens = max_new_tokens
        self.pad_id = pad_id
        self.eos_ids = set(eos_ids)
        self.keep_first = keep_first
        self.preserve_error = preserve_error
        self.features_k = features_k
        self.kl_pairs = list(kl_pairs)
        self.adapter_names = adapter_names
        self.generated: list[list[int]] = [[] for _ in self.rows]
        self.finished = [False] * len(self.rows)
        self.finish_reason: list[str | None] = [None] * len(self.rows)
        self.steps = 0
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._generators = []
        for row in self.rows:
            gen = torch.Generator()
            if row.seed is not None:
                gen.manual_seed(row.seed)
            else:
                gen.seed()
            self._generators.append(gen)

    @property
    def done(self) -> bool:
        return all(self.finished)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def finish(self, row: int, reason: str) -> None:
        """Stop row ``row`` (and the rows that follow it), e.g. at a stop string."""
        for b, spec in enumerate(self.rows):
            if (b == row or spec.follows == row) and not self.finished[b]:
                self.finished[b], self.finish_reason[b] = True, reason

    @torch.inference_mode()
    def advance(self) -> StepOutput:
        """One forward: the prompts' (first call) or the last tokens'; samples the next tokens."""
        phase: Phase = "prompt" if self._cache is None else "generated"
        ids, positions, keep = self._inputs(phase)
        logprobs, features = self._forward(ids, positions, keep, phase)
        self.steps += 1
        tokens: list[int | None] = [None] * len(self.rows)
        for b, row in enumerate(self.rows):
            if self.finished[b] or row.follows is not None:
                continue
            tokens[b] = _sample(logprobs[b], row.temperature, row.top_p, self._generators[b])
        for b, row in enumerate(self.rows):
            if row.follows is not None and not self.finished[b]:
                tokens[b] = tokens[row.follows]
        kl = {
            a: float((logprobs[a].exp() * (logprobs[a] - logprobs[c])).sum())
            for a, c in self.kl_pairs
            if tokens[a] is not None
        }
        for b, token in enumerate(tokens):
            if token is None:
                continue
            self.generated[b].append(token)
            if token in self.eos_ids:
                self.finish(b, "eos")
            elif len(self.generated[b]) >= self.max_new_tokens:
                self.finish(b, "length")
        return StepOutput(tokens, features, kl)

    @torch.inference_mode()
    def final_features(self) -> list[dict[int, tuple[list[int], list[float]]]]:
        """The top latents at each row's last generated token: one more forward, nothing sampled."""
        ids, positions, keep = self._inputs("generated")
        return self._forward(ids, positions, keep, "generated")[1]

    def _inputs(self, phase: Phase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Input ids [B, T], position ids [B, T] and the positions that keep their clean activation
        (the first real token when ``keep_first``, prefill only); the attention mask is extended."""
        if phase == "prompt":
            width = max(len(r.prompt) for r in self.rows)
            ids = torch.full((len(self.rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros(len(self.rows), width, dtype=torch.long)
            for b, row in enumerate(self.rows):
                ids[b, width - len(row.prompt) :] = torch.tensor(row.prompt, dtype=torch.long)
                mask[b, width - len(row.prompt) :] = 1
            self._mask = mask
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            first = torch.tensor([width - len(r.prompt) for r in self.rows])
            keep = (torch.arange(width)[None] == first[:, None]) if self.keep_first else None
            return ids, positions, keep
        assert self._mask is not None
        last = [self.generated[b][-1] if self.generated[b] else self.pad_id for b in range(len(self.rows))]
        ids = torch.tensor(last, dtype=torch.long)[:, None]
        positions = self._mask.sum(-1, keepdim=True)
        self._mask = torch.cat([self._mask, torch.ones(len(self.rows), 1, dtype=torch.long)], dim=1)
        return ids, positions, None

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor | None, phase: Phase
    ) -> tuple[torch.Tensor, list[dict[int, tuple[list[int], list[float]]]]]:
        assert self._mask is not None
        device = self.device
        per_row = [row.interventions for row in self.rows]
        features: list[dict[int, tuple[list[int], list[float]]]] = [{} for _ in self.rows]

        def edit(layer: int, latents: torch.Tensor) -> torch.Tensor:
            edited = intervene(latents, layer, per_row, phase)
            if self.features_k:
                values, indices = edited[:, -1].float().topk(min(self.features_k, edited.shape[-1]), dim=-1)
                for b, (i, v) in enumerate(zip(indices.tolist(), values.tolist())):
                    features[b][layer] = (i, v)
            return edited

        kwargs: dict[str, Any] = {
            "input_ids": ids.to(device),
            "attention_mask": self._mask.to(device),
            "position_ids": positions.to(device),
            "use_cache": True,
            "logits_to_keep": 1,
        }
        if self._cache is not None:
            kwargs[cache_kwarg(self.model)] = self._cache
        if self.adapter_names is not None:
            kwargs["adapter_names"] = self.adapter_names(self.rows)
        splice = Splice(
            self.model,
            self.saes,
            keep_first=False,
            edit=edit,
            preserve_error=self.preserve_error,
            keep=keep,
        )
        with splice:
            out = self.model(**kwargs)
        self._cache = output_cache(out)
        logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()
        return logprobs, features


def _sample(logprobs: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy at temperature 0; else a draw from softmax(logprobs / temperature) restricted to the
    smallest set of most likely tokens whose probability reaches ``top_p``."""
    if temperature == 0:
        return int(logprobs.argmax())
    probs = torch.softmax(logprobs.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs[before >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
