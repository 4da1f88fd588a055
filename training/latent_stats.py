"""Per-latent statistics of one SAE over a token stream, in bounded memory and exactly mergeable.

``LatentStats`` holds, for every latent: how many tokens it fired on, the sum and max of its
activations, a histogram over fixed log-spaced bins, its top-N activations (each with the window of
its own activations around the token) and a few sampled activations per histogram bin (bottom-k of
a hash of (token, latent): a uniform sample within each bin that does not depend on the order the
tokens come in). Its size depends on the SAE and the settings, never on the number of tokens.

Merging is exact: two states made from disjoint token sets merge into the state of their union,
whatever the order (ties between equal activations are broken by the token's global index), so a
corpus split into shards, over processes or interrupted runs, gives the one-process result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

_EMPTY_KEY = torch.iinfo(torch.int64).max


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 63-bit integer hash (splitmix64's finaliser, computed with wrapping int64 arithmetic)."""
    x = x ^ (x >> 31)
    x = x * 0x7FB5D329728EA185
    x = x ^ (x >> 27)
    x = x * (0x81DADEF4BC2DD44D - (1 << 64))  # the constant as a signed int64
    x = x ^ (x >> 33)
    return x & 0x7FFFFFFFFFFFFFFF


def sample_key(index: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """The sampling key of (global token index, latent): pseudo-random, deterministic."""
    return _mix(index * 1_000_003 + latent * 0x9E3779B1 + 1)


def _ranked(group: torch.Tensor, *keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order entries by ``group`` then by ``keys`` (first key most significant, all ascending);
    return the order and each entry's rank within its group (in that order)."""
    order = torch.arange(group.numel())
    for key in reversed((group, *keys)):
        order = order[torch.sort(key[order], stable=True).indices]
    g = group[order]
    starts = torch.ones_like(g, dtype=torch.bool)
    starts[1:] = g[1:] != g[:-1]
    first = torch.cummax(torch.where(starts, torch.arange(g.numel()), 0), 0).values
    return order, torch.arange(g.numel()) - first


@dataclass
class Kept:
    """Per group (a latent, or a latent's histogram bin), the ``K`` entries of smallest
    ``(rank_key, index)``, in that order; each with its activation and activation window."""

    rank_key: torch.Tensor  # [G, K] float32 or int64; +inf / int64 max where empty
    index: torch.Tensor  # [G, K] int64 global token index, -1 where empty
    act: torch.Tensor  # [G, K] float32
    window: torch.Tensor  # [G, K, W] float32 (NaN outside the sequence)

    @classmethod
    def empty(cls, groups: int, k: int, window: int, key_dtype: torch.dtype) -> Kept:
        worst = float("inf") if key_dtype.is_floating_point else _EMPTY_KEY
        return cls(
            rank_key=torch.full((groups, k), worst, dtype=key_dtype),
            index=torch.full((groups, k), -1, dtype=torch.int64),
            act=torch.zeros(groups, k),
            window=torch.full((groups, k, window), float("nan")),
        )

    def offer(
        self,
        group: torch.Tensor,
        rank_key: torch.Tensor,
        index: torch.Tensor,
        act: torch.Tensor,
        windows: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """Add candidate entries (1-D tensors); ``windows(i)`` gives the windows of candidates
        ``i`` and is asked only for those that are kept."""
        k = self.index.shape[1]
        worst_key, worst_index = self.rank_key[group, -1], self.index[group, -1]
        enters = (
            (worst_index < 0) | (rank_key < worst_key) | ((rank_key == worst_key) & (index < worst_index))
        )
        cand = torch.nonzero(enters).flatten()
        if cand.numel() == 0:
            return
        group, rank_key, index, act = group[cand], rank_key[cand], index[cand], act[cand]
        affected = torch.unique(group)
        old_index = self.index[affected].reshape(-1)
        old = old_index >= 0
        old_group = affected.repeat_interleave(k)[old]
        all_group = torch.cat([old_group, group])
        all_key = torch.cat([self.rank_key[affected].reshape(-1)[old], rank_key])
        all_index = torch.cat([old_index[old], index])
        all_act = torch.cat([self.act[affected].reshape(-1)[old], act])
        order, rank = _ranked(all_group, all_key, all_index)
        order, rank = order[rank < k], rank[rank < k]
        n_old = int(old.sum())
        new = order >= n_old
        win = torch.empty(order.numel(), self.window.shape[-1])
        win[~new] = self.window[affected].reshape(-1, self.window.shape[-1])[old][order[~new]]
        win[new] = windows(cand[order[new] - n_old])
        fresh = Kept.empty(affected.numel(), k, self.window.shape[-1], self.rank_key.dtype)
        slot = torch.searchsorted(affected, all_group[order]), rank
        fresh.rank_key[slot], fresh.index[slot] = all_key[order], all_index[order]
        fresh.act[slot], fresh.window[slot] = all_act[order], win
        self.rank_key[affected], self.index[affected] = fresh.rank_key, fresh.index
        self.act[affected], self.window[affected] = fresh.act, fresh.window

    def merge(self, other: Kept) -> None:
        k = other.index.shape[1]
        valid = other.index.reshape(-1) >= 0
        group = torch.arange(other.index.shape[0]).repeat_interleave(k)[valid]
        windows = other.window.reshape(-1, other.window.shape[-1])[valid]
        self.offer(
            group,
            other.rank_key.reshape(-1)[valid],
            other.index.reshape(-1)[valid],
            other.act.reshape(-1)[valid],
            lambda i: windows[i],
        )


@dataclass
class LatentStats:
    """Running statistics of ``d_sae`` latents (see the module docstring). ``window`` activations
    are kept around each top / sampled token: ``before`` tokens before it and the rest after."""

    fired: torch.Tensor  # [d] int64
    act_sum: torch.Tensor  # [d] float64
    act_max: torch.Tensor  # [d] float32, 0 for a latent that never fired
    hist: torch.Tensor  # [d, bins] int64
    top: Kept  # per latent: rank key -activation (largest first, ties by smaller index)
    samples: Kept  # per (latent, bin) as group latent * bins + bin: rank key sample_key()

    @classmethod
    def empty(cls, d_sae: int, top_n: int, bins: int, samples_per_bin: int, window: int) -> LatentStats:
        return cls(
            fired=torch.zeros(d_sae, dtype=torch.int64),
            act_sum=torch.zeros(d_sae, dtype=torch.float64),
            act_max=torch.zeros(d_sae),
            hist=torch.zeros(d_sae, bins, dtype=torch.int64),
            top=Kept.empty(d_sae, top_n, window, torch.float32),
            samples=Kept.empty(d_sae * bins, samples_per_bin, window, torch.int64),
        )

    @property
    def d_sae(self) -> int:
        return self.fired.shape[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {name: getattr(self, name) for name in ("fired", "act_sum", "act_max", "hist")}
        for part in ("top", "samples"):
            kept = getattr(self, part)
            state |= {f"{part}.{f.name}": getattr(kept, f.name) for f in fields(Kept)}
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> LatentStats:
        def kept(part: str) -> Kept:
            return Kept(**{f.name: state[f"{part}.{f.name}"] for f in fields(Kept)})

        return cls(
            fired=state["fired"],
            act_sum=state["act_sum"],
            act_max=state["act_max"],
            hist=state["hist"],
            top=kept("top"),
            samples=kept("samples"),
        )

    def update(
        self,
        latents: torch.Tensor,
        index: torch.Tensor,
        edges: torch.Tensor,
        before: int,
        valid: torch.Tensor,
    ) -> None:
        """Add a batch: ``latents`` [B, T, d] activations, ``index`` [B, T] global token indices,
        ``valid`` [B, T] which tokens count (position 0 does not), ``edges`` the histogram edges."""
        latents = latents.detach().float().cpu()
        b, t, j = torch.nonzero((latents > 0) & valid.cpu()[..., None], as_tuple=True)
        act = latents[b, t, j]
        gidx = index.cpu()[b, t]
        bins = self.hist.shape[1]
        self.fired += torch.bincount(j, minlength=self.d_sae)
        self.act_sum.index_add_(0, j, act.double())
        self.act_max = torch.maximum(
            self.act_max, torch.zeros_like(self.act_max).scatter_reduce(0, j, act, "amax")
        )
        hbin = torch.bucketize(act, edges, right=True)
        self.hist.view(-1).index_add_(0, j * bins + hbin, torch.ones_like(j))
        steps = torch.arange(self.top.window.shape[-1]) - before
        length = latents.shape[1]

        def windows(sel: torch.Tensor) -> torch.Tensor:
            pos = t[sel, None] + steps
            inside = (pos >= 0) & (pos < length)
            values = latents[b[sel, None], pos.clamp(0, length - 1), j[sel, None]]
            return values.masked_fill(~inside, float("nan"))

        self.top.offer(j, -act, gidx, act, windows)
        if self.samples.index.shape[1]:  # samples_per_bin 0: no samples kept
            self.samples.offer(j * bins + hbin, sample_key(gidx, j), gidx, act, windows)

    def merge(self, other: LatentStats) -> None:
        """Fold ``other`` (made from other tokens) into this state."""
        self.fired += other.fired
        self.act_sum += other.act_sum
        self.act_max = torch.maximum(self.act_max, other.act_max)
        self.hist += other.hist
        self.top.merge(other.top)
        if self.samples.index.shape[1]:
            self.samples.merge(other.samples)
