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
class LatentStats:
    """Running statistics of ``d_sae`` latents (see the module docstring). ``window`` activations
    are kept around each top / sampled token: ``before`` tokens before it and the rest after."""

    fired: torch.Tensor  # [d] int64
    act_sum: torch.Tensor  # [d] float64
    act_max: torch.Tensor  # [d] float32, 0 for a latent that never fired
    hist: torch.Tensor  # [d, bins] int64
    top_act: torch.Tensor  # [d, N] float32, -inf where empty; sorted desc, ties by index asc
    top_index: torch.Tensor  # [d, N] int64 global token index, -1 where empty
    top_window: torch.Tensor  # [d, N, W] float32 (NaN outside the sequence)
    sample_key: torch.Tensor  # [d, bins, k] int64, max where empty; sorted asc
    sample_act: torch.Tensor  # [d, bins, k] float32
    sample_index: torch.Tensor  # [d, bins, k] int64
    sample_window: torch.Tensor  # [d, bins, k, W] float32

    @classmethod
    def empty(cls, d_sae: int, top_n: int, bins: int, samples_per_bin: int, window: int) -> LatentStats:
        return cls(
            fired=torch.zeros(d_sae, dtype=torch.int64),
            act_sum=torch.zeros(d_sae, dtype=torch.float64),
            act_max=torch.zeros(d_sae),
            hist=torch.zeros(d_sae, bins, dtype=torch.int64),
            top_act=torch.full((d_sae, top_n), float("-inf")),
            top_index=torch.full((d_sae, top_n), -1, dtype=torch.int64),
            top_window=torch.full((d_sae, top_n, window), float("nan")),
            sample_key=torch.full((d_sae, bins, samples_per_bin), _EMPTY_KEY, dtype=torch.int64),
            sample_act=torch.zeros(d_sae, bins, samples_per_bin),
            sample_index=torch.full((d_sae, bins, samples_per_bin), -1, dtype=torch.int64),
            sample_window=torch.full((d_sae, bins, samples_per_bin, window), float("nan")),
        )

    @property
    def d_sae(self) -> int:
        return self.fired.shape[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> LatentStats:
        return cls(**{f.name: state[f.name] for f in fields(cls)})

    # ------------------------------------------------------------------ update

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
        window = self.top_window.shape[-1]
        # windows are cut only for the entries that make it into the kept sets
        padded = torch.nn.functional.pad(latents, (0, 0, before, window - 1 - before), value=float("nan"))

        def windows(sel: torch.Tensor) -> torch.Tensor:
            steps = torch.arange(window)
            return padded[b[sel, None], t[sel, None] + steps, j[sel, None]]

        self._merge_top(j, act, gidx, windows)
        key = sample_key(gidx, j)
        self._merge_samples(j * bins + hbin, key, act, gidx, windows)

    # ------------------------------------------------------------------ merge

    def merge(self, other: LatentStats) -> None:
        """Fold ``other`` (made from other tokens) into this state."""
        self.fired += other.fired
        self.act_sum += other.act_sum
        self.act_max = torch.maximum(self.act_max, other.act_max)
        self.hist += other.hist
        keep = other.top_index.reshape(-1) >= 0
        latent = torch.arange(self.d_sae).repeat_interleave(other.top_act.shape[1])[keep]
        top_windows = other.top_window.reshape(-1, other.top_window.shape[-1])[keep]
        self._merge_top(
            latent,
            other.top_act.reshape(-1)[keep],
            other.top_index.reshape(-1)[keep],
            lambda s: top_windows[s],
        )
        k = other.sample_key.shape[-1]
        keep = other.sample_index.reshape(-1) >= 0
        group = torch.arange(other.sample_key[..., 0].numel()).repeat_interleave(k)[keep]
        sample_windows = other.sample_window.reshape(-1, other.sample_window.shape[-1])[keep]
        self._merge_samples(
            group,
            other.sample_key.reshape(-1)[keep],
            other.sample_act.reshape(-1)[keep],
            other.sample_index.reshape(-1)[keep],
            lambda s: sample_windows[s],
        )

    def _merge_top(self, latent, act, gidx, windows) -> None:
        """Keep per latent the N largest activations of the current entries and the new ones."""
        n = self.top_act.shape[1]
        old = self.top_index.reshape(-1) >= 0
        old_latent = torch.arange(self.d_sae).repeat_interleave(n)[old]
        all_latent = torch.cat([old_latent, latent])
        all_act = torch.cat([self.top_act.reshape(-1)[old], act])
        all_index = torch.cat([self.top_index.reshape(-1)[old], gidx])
        order, rank = _ranked(all_latent, -all_act, all_index)
        order, rank = order[rank < n], rank[rank < n]
        n_old = int(old.sum())
        old_windows = self.top_window.reshape(-1, self.top_window.shape[-1])[old]
        new = order >= n_old
        win = torch.empty(order.numel(), self.top_window.shape[-1])
        win[~new] = old_windows[order[~new]]
        win[new] = windows(order[new] - n_old)
        self.top_act.fill_(float("-inf"))
        self.top_index.fill_(-1)
        self.top_window.fill_(float("nan"))
        slot = all_latent[order], rank
        self.top_act[slot] = all_act[order]
        self.top_index[slot] = all_index[order]
        self.top_window[slot] = win

    def _merge_samples(self, group, key, act, gidx, windows) -> None:
        """Keep per (latent, bin) the k entries of smallest sampling key (ties: smaller index)."""
        d, bins, k = self.sample_key.shape
        flat_key = self.sample_key.reshape(-1)
        old = self.sample_index.reshape(-1) >= 0
        old_group = torch.arange(d * bins).repeat_interleave(k)[old]
        all_group = torch.cat([old_group, group])
        all_key = torch.cat([flat_key[old], key])
        all_act = torch.cat([self.sample_act.reshape(-1)[old], act])
        all_index = torch.cat([self.sample_index.reshape(-1)[old], gidx])
        order, rank = _ranked(all_group, all_key, all_index)
        order, rank = order[rank < k], rank[rank < k]
        n_old = int(old.sum())
        old_windows = self.sample_window.reshape(-1, self.sample_window.shape[-1])[old]
        new = order >= n_old
        win = torch.empty(order.numel(), self.sample_window.shape[-1])
        win[~new] = old_windows[order[~new]]
        win[new] = windows(order[new] - n_old)
        self.sample_key.fill_(_EMPTY_KEY)
        self.sample_index.fill_(-1)
        self.sample_window.fill_(float("nan"))
        g = all_group[order]
        slot = g // bins, g % bins, rank
        self.sample_key[slot] = all_key[order]
        self.sample_act[slot] = all_act[order]
        self.sample_index[slot] = all_index[order]
        self.sample_window[slot] = win
