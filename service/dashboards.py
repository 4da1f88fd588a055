"""Latent dashboards served: the dashboard folders of the settings, checked against the loaded
model and SAEs and indexed by (SAE layer, adapter fingerprint), plus a search index per SAE.

A folder (``lorasae.dashboards``, written by ``lorasae dashboards``) is served only if it was made
with the loaded model (fingerprint) and every SAE it covers is loaded (layer + fingerprint); two
folders covering the same SAE through the same adapter (or both through none) are refused too. A
dashboard made through an adapter is found by the adapter's weight fingerprint
(``lorasae.manifest.adapter_fingerprint``), so it serves whatever name the adapter is registered
under. Everything is checked and indexed once, at startup: a folder that does not fit stops the
server with a message naming it.

The search index keeps, per latent, density, max activation, dead, the texts of the tokens it
fires on most and of the next tokens it promotes; token texts come from the server's tokenizer
(the same model, since the fingerprint matched).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from lorasae.dashboards import Dashboard
from lorasae.errors import LorasaeError
from lorasae_client.schemas import LatentSummary

if TYPE_CHECKING:
    import pyarrow as pa

    from .engine import Engine

TOP_TOKENS = 5  # tokens a latent fires on most, kept for search
PROMOTED_TOKENS = 5  # next tokens it promotes (logit lens, then causal effect)
MAX_QUERY_WORDS = 16
CACHED_RECORDS = 256  # latent records kept in memory (LRU)
# search score of one query word: the best match among the tokens a latent fires on most, plus the
# best among the tokens it promotes (an exact token beats a token containing the word)
EXACT_FIRED, SUBSTRING_FIRED, EXACT_PROMOTED, SUBSTRING_PROMOTED = 4.0, 2.0, 3.0, 1.0
_MARKS = str.maketrans({"\u2581": " ", "\u0120": " "})  # SentencePiece / GPT-2 word marks

Sort = Literal["density", "max_activation"]
Order = Literal["desc", "asc"]


def normalized(text: str) -> str:
    """A token text or query word as matched: lower case, no leading or trailing space marks."""
    return text.translate(_MARKS).strip().lower()


def query_words(q: str) -> list[str]:
    """The distinct words of a search query, normalised (at most ``MAX_QUERY_WORDS``)."""
    words = list(dict.fromkeys(w for w in (normalized(x) for x in q.split()) if w))
    if len(words) > MAX_QUERY_WORDS:
        raise ValueError(f"{len(words)} distinct words; the limit is {MAX_QUERY_WORDS}")
    return words


class SearchIndex:
    """Per-latent summary of one SAE's dashboard, searched by token text or listed by a column."""

    def __init__(
        self,
        density: np.ndarray,
        max_activation: np.ndarray,
        dead: np.ndarray,
        top_tokens: list[tuple[str, ...]],
        promoted: list[tuple[str, ...]],
    ) -> None:
        self.density = density.astype(np.float64)
        self.max_activation = max_activation.astype(np.float64)
        self.dead = dead.astype(bool)
        self.top_tokens = top_tokens
        self.promoted = promoted
        # normalised token text -> latents that have it among their fired-on / promoted tokens
        self._fired = _inverted(top_tokens)
        self._promoted = _inverted(promoted)

    def __len__(self) -> int:
        return len(self.density)

    @classmethod
    def read(cls, dashboard: Dashboard, layer: int, d_sae: int, piece: Callable[[int], str]) -> SearchIndex:
        """Read SAE ``layer``'s latent file in batches (bounded memory however large the SAE) and
        check that it holds latents ``0..d_sae-1`` in order, as records are read by position."""
        import pyarrow.parquet as pq

        path = dashboard.directory / dashboard.manifest.sae(layer).file
        columns = ["latent", "density", "max_activation", "dead", "top_contexts"]
        columns += ["lens_promoted_ids", "effect_promoted_ids"]
        density: list[np.ndarray] = []
        max_activation: list[np.ndarray] = []
        dead: list[np.ndarray] = []
        top_tokens: list[tuple[str, ...]] = []
        promoted: list[tuple[str, ...]] = []
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=columns):
                first = len(top_tokens)
                latents = batch.column("latent").to_numpy(zero_copy_only=False)
                if not np.array_equal(latents, np.arange(first, first + len(latents))):
                    raise LorasaeError(f"{path} does not hold latents 0..{d_sae - 1} in order")
                density.append(batch.column("density").to_numpy(zero_copy_only=False))
                max_activation.append(batch.column("max_activation").to_numpy(zero_copy_only=False))
                dead.append(batch.column("dead").to_numpy(zero_copy_only=False))
                for ids in _top_token_ids(batch.column("top_contexts")):
                    top_tokens.append(tuple(piece(i) for i in ids))
                lens, effect = batch.column("lens_promoted_ids"), batch.column("effect_promoted_ids")
                for a, b in zip(lens.to_pylist(), effect.to_pylist()):
                    ids = list(dict.fromkeys([*(a or ()), *(b or ())]))[:PROMOTED_TOKENS]
                    promoted.append(tuple(piece(i) for i in ids))
        except LorasaeError:
            raise
        except Exception as exc:  # pyarrow: ArrowInvalid / OSError / KeyError for a damaged file
            raise LorasaeError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
        if len(top_tokens) != d_sae:
            raise LorasaeError(f"{path} has {len(top_tokens)} latents; the SAE has {d_sae}")
        return cls(
            np.concatenate(density),
            np.concatenate(max_activation),
            np.concatenate(dead),
            top_tokens,
            promoted,
        )

    def search(
        self,
        words: Sequence[str] = (),
        *,
        sort: Sort = "max_activation",
        order: Order = "desc",
        min_density: float | None = None,
        max_density: float | None = None,
        include_dead: bool = False,
        limit: int = 50,
    ) -> tuple[int, list[LatentSummary]]:
        """Latents within the density range (dead ones only with ``include_dead``): with query
        ``words`` (``query_words``), those matching one ranked by score (ties: higher max
        activation first), else all of them sorted by ``sort`` in ``order``. Returns (how many
        matched, the first ``limit``).

        A word matches a token text equal to it or containing it (case-insensitive, leading
        spaces ignored); see ``EXACT_FIRED`` & co. for the score."""
        keep = np.ones(len(self), dtype=bool) if include_dead else ~self.dead
        if min_density is not None:
            keep &= self.density >= min_density
        if max_density is not None:
            keep &= self.density <= max_density
        index = np.arange(len(self))
        score = None
        if words:
            score = self._scores(words)
            keep &= score > 0
            ranked = np.lexsort((index, -self.max_activation, -score))
        else:
            values = self.density if sort == "density" else self.max_activation
            ranked = np.lexsort((index, -values if order == "desc" else values))
        ranked = ranked[keep[ranked]]
        hits = [
            LatentSummary(
                index=int(i),
                density=float(self.density[i]),
                max_activation=float(self.max_activation[i]),
                dead=bool(self.dead[i]),
                top_tokens=list(self.top_tokens[i]),
                promoted=list(self.promoted[i]),
                score=None if score is None else float(score[i]),
            )
            for i in ranked[:limit]
        ]
        return len(ranked), hits

    def _scores(self, words: Sequence[str]) -> np.ndarray:
        score = np.zeros(len(self))
        for word in words:
            for inverted, exact, substring in (
                (self._fired, EXACT_FIRED, SUBSTRING_FIRED),
                (self._promoted, EXACT_PROMOTED, SUBSTRING_PROMOTED),
            ):
                best = np.zeros(len(self))
                for text, latents in inverted.items():
                    if word in text:
                        best[latents] = np.maximum(best[latents], exact if text == word else substring)
                score += best
        return score


def _inverted(texts: list[tuple[str, ...]]) -> dict[str, np.ndarray]:
    lists: dict[str, list[int]] = {}
    for latent, tokens in enumerate(texts):
        for text in tokens:
            key = normalized(text)
            if key:
                lists.setdefault(key, []).append(latent)
    return {key: np.array(latents, dtype=np.int64) for key, latents in lists.items()}


def _top_token_ids(contexts: pa.Array) -> list[list[int]]:
    """Per latent (row), the token ids its top contexts are about (``token_ids[position - start]``),
    most frequent first (ties: the earlier context's), at most ``TOP_TOKENS``. Vectorised: the
    windows' token ids are never turned into Python objects."""
    import pyarrow.compute as pc

    rows = pc.list_parent_indices(contexts).to_numpy(zero_copy_only=False)
    windows = pc.list_flatten(contexts)
    position = pc.fill_null(pc.struct_field(windows, "position"), -1).to_numpy(zero_copy_only=False)
    start = pc.fill_null(pc.struct_field(windows, "start"), 0).to_numpy(zero_copy_only=False)
    token_ids = pc.struct_field(windows, "token_ids")
    lengths = pc.fill_null(pc.list_value_length(token_ids), 0).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(token_ids).to_numpy(zero_copy_only=False)
    center = position.astype(np.int64) - start
    inside = (center >= 0) & (center < lengths)
    firsts = np.cumsum(lengths) - lengths
    ids = flat[(firsts + center)[inside]]
    counts: list[Counter[int]] = [Counter() for _ in range(len(contexts))]
    for row, token in zip(rows[inside].tolist(), ids.tolist()):
        counts[row][token] += 1
    return [[token for token, _ in c.most_common(TOP_TOKENS)] for c in counts]


def check_loaded_sae(engine: Engine, where: str, entry: Any) -> None:
    """A result folder's SAE ``entry`` (``sae_id``, ``layer``, ``fingerprint``, ``d_sae``) is the
    one the server loaded at that layer (LorasaeError starting with ``where`` otherwise)."""
    loaded_sae = engine.by_layer.get(entry.layer)
    if loaded_sae is None or engine.sae_fingerprints[entry.layer] != entry.fingerprint:
        loaded = ", ".join(
            f"{engine.names[layer]} (layer {layer}, fingerprint {fp})"
            for layer, fp in engine.sae_fingerprints.items()
        )
        raise LorasaeError(
            f"{where}: its SAE {entry.sae_id!r} (layer {entry.layer}, fingerprint {entry.fingerprint}) is "
            f"not loaded; loaded: {loaded}. Start the server with that SAE (--sae) or leave this folder out"
        )
    if entry.d_sae != loaded_sae.d_sae:
        raise LorasaeError(
            f"{where}: its manifest gives the SAE at layer {entry.layer} {entry.d_sae} latents; the "
            f"loaded one has {loaded_sae.d_sae}"
        )


@dataclass
class Covered:
    """One SAE of one dashboard folder, as served."""

    dashboard: Dashboard
    layer: int
    d_sae: int
    adapter_fingerprint: str | None
    search: SearchIndex
    # pyarrow's ParquetFile is not documented thread-safe: one reader at a time per file
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class DashboardIndex:
    """The served dashboards by (SAE layer, adapter fingerprint or None), and a small LRU cache of
    latent records read from them (any thread)."""

    def __init__(self, covered: dict[tuple[int, str | None], Covered] | None = None) -> None:
        self._covered = covered or {}
        self._cache: OrderedDict[tuple[int, str | None, int], dict[str, Any]] = OrderedDict()
        self._cache_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._covered)

    @classmethod
    def build(cls, engine: Engine, folders: Sequence[str | Path]) -> DashboardIndex:
        """Open and check every folder against the engine and index it (LorasaeError naming the
        folder and what differs when one does not fit)."""
        covered: dict[tuple[int, str | None], Covered] = {}
        for folder in folders:
            dashboard = Dashboard.open(Path(folder).expanduser())
            m = dashboard.manifest
            if m.model_fingerprint != engine.model_fingerprint:
                raise LorasaeError(
                    f"dashboard {folder}: made with model {m.model_id!r} (fingerprint "
                    f"{m.model_fingerprint}), but the server's model {engine.model_id!r} has "
                    f"fingerprint {engine.model_fingerprint}"
                )
            adapter = m.adapter.fingerprint if m.adapter is not None else None
            for entry in m.saes:
                check_loaded_sae(engine, f"dashboard {folder}", entry)
                key = (entry.layer, adapter)
                if key in covered:
                    through = f"adapter fingerprint {adapter}" if adapter else "the base model"
                    raise LorasaeError(
                        f"dashboards {covered[key].dashboard.directory} and {folder} both cover "
                        f"the SAE at layer {entry.layer} through {through}; serve one of them"
                    )
                search = SearchIndex.read(dashboard, entry.layer, entry.d_sae, engine.piece)
                covered[key] = Covered(dashboard, entry.layer, entry.d_sae, adapter, search)
        return cls(covered)

    def find(self, layer: int, adapter_fingerprint: str | None) -> Covered | None:
        return self._covered.get((layer, adapter_fingerprint))

    def row(self, covered: Covered, index: int) -> dict[str, Any]:
        """Latent ``index`` of ``covered`` as ``Dashboard.record`` reads it (blocking: call off the
        event loop); the ``CACHED_RECORDS`` latest are kept. The row is shared: do not change it."""
        key = (covered.layer, covered.adapter_fingerprint, index)
        with self._cache_lock:
            row = self._cache.get(key)
            if row is not None:
                self._cache.move_to_end(key)
                return row
        with covered.lock:
            row = covered.dashboard.record(covered.layer, index)
        with self._cache_lock:
            self._cache[key] = row
            while len(self._cache) > CACHED_RECORDS:
                self._cache.popitem(last=False)
        return row
