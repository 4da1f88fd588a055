"""A synthetic but self-consistent latent dashboard folder for tests (server, viewer, client).

``write_dashboard(directory, engine)`` writes what ``lorasae dashboards`` would (manifest,
``latents-L<layer>.parquet`` per SAE, ``tokens.parquet``) for the engine's model and SAEs, with
seeded random numbers instead of measured ones: every latent file is readable by
``lorasae.dashboards.Dashboard`` and passes the server's startup checks (fingerprints).

What holds, so tests can rely on it: latents listed in ``dead`` have zero counts, no contexts and
``dead=True``; every other latent fired on ``fired >= 1`` tokens, ``density = fired / tokens``,
``hist_counts`` sum to ``fired``, its top contexts are sorted by activation (the first one's is
``max_activation``) and each window holds real token ids of the tokenizer with the context's
activation at ``position - start``; logit lens / effect lists are ``logit_top`` long, promoted
values positive and descending, suppressed ones negative and ascending.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorasae.dashboards import (
    LATENT_COLUMNS,
    DashboardAdapter,
    DashboardManifest,
    DashboardSae,
    DashboardSettings,
    latents_file,
    log_edges,
    write_latents,
    write_tokens,
)

CTX = 16
SEQUENCES = 8
TOP_N = 6
WINDOW_BEFORE, WINDOW_AFTER = 3, 2
LOGIT_TOP = 4
ROWS_PER_GROUP = 16  # small, so a 64-latent SAE spans several row groups
QUANTILES = [(0.0, 0.5), (0.5, 1.0)]


def default_dead(d_sae: int) -> list[int]:
    """The latents ``write_dashboard`` makes dead unless told: every 16th, from 7."""
    return list(range(7, d_sae, 16))


def write_dashboard(
    directory: Path,
    engine: Any,
    layers: Sequence[int] | None = None,
    *,
    adapter: Path | None = None,
    seed: int = 0,
    dead: Sequence[int] | None = None,
    corpus: str = "synthetic-corpus",
) -> Path:
    """Write a dashboard folder for ``engine`` (a ``lorasae.service.engine.Engine``: model,
    fingerprints, tokenizer) into ``directory`` and return it.

    ``layers``: the SAEs covered (default: all loaded). ``adapter``: an adapter folder the
    dashboard claims to be made through (its weight fingerprint goes into the manifest, so it
    serves under whatever name that adapter is registered). ``seed`` picks the numbers; ``dead``
    the dead latents of every SAE (default ``default_dead``)."""
    from lorasae.manifest import adapter_file_fingerprint

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = list(engine.by_layer) if layers is None else list(layers)
    vocab = len(engine.lm.tokenizer)
    tokens = SEQUENCES * (CTX - 1)
    saes = []
    for layer in layers:
        d_sae = engine.by_layer[layer].d_sae
        dead_set = set(default_dead(d_sae) if dead is None else dead)
        rng = np.random.default_rng([seed, layer])
        columns = _latent_columns(rng, d_sae, dead_set, vocab, tokens)
        write_latents(directory / latents_file(layer), columns, rows_per_group=ROWS_PER_GROUP)
        saes.append(
            DashboardSae(
                sae_id=engine.by_layer[layer].sae_id,
                hook_name=engine.by_layer[layer].hook_name,
                layer=layer,
                d_sae=d_sae,
                fingerprint=engine.sae_fingerprints[layer],
                file=latents_file(layer),
                dead=len(dead_set),
            )
        )
    write_tokens(directory, [engine.piece(i) for i in range(vocab)])
    DashboardManifest(
        model_id=engine.model_id,
        model_fingerprint=engine.model_fingerprint,
        adapter=None
        if adapter is None
        else DashboardAdapter(path=str(adapter), fingerprint=adapter_file_fingerprint(adapter)),
        saes=saes,
        corpus=corpus,
        split="heldout",
        ctx=CTX,
        sequences=SEQUENCES,
        tokens=tokens,
        hist_edges=log_edges(),
        settings=DashboardSettings(
            top_n=TOP_N,
            window_before=WINDOW_BEFORE,
            window_after=WINDOW_AFTER,
            quantile_intervals=QUANTILES,
            samples_per_interval=1,
            logit_top=LOGIT_TOP,
            effect_contexts=TOP_N,
            batch_size=4,
            shard_sequences=SEQUENCES,
        ),
        rows_per_group=ROWS_PER_GROUP,
        created_at="2025-01-01T00:00:00+00:00",
    ).save(directory)
    return directory


def _window(rng: np.random.Generator, vocab: int, activation: float, center_id: int) -> dict[str, Any]:
    position = int(rng.integers(1, CTX))
    start = max(0, position - WINDOW_BEFORE)
    end = min(CTX, position + WINDOW_AFTER + 1)
    ids = rng.integers(3, vocab, end - start).astype(int).tolist()  # 0-2: <unk>, <s>, </s>
    acts = (rng.random(end - start) * activation * 0.5).astype(np.float32).tolist()
    ids[position - start], acts[position - start] = center_id, activation
    return {
        "sequence": int(rng.integers(0, SEQUENCES)),
        "position": position,
        "activation": activation,
        "start": start,
        "token_ids": ids,
        "activations": acts,
    }


def _effects(rng: np.random.Generator, vocab: int) -> tuple[list[int], list[float], list[int], list[float]]:
    ids = rng.choice(np.arange(3, vocab), 2 * LOGIT_TOP, replace=False).astype(int).tolist()
    up = np.sort(rng.random(LOGIT_TOP) + 0.1)[::-1].astype(np.float32).tolist()
    down = np.sort(-(rng.random(LOGIT_TOP) + 0.1)).astype(np.float32).tolist()
    return ids[:LOGIT_TOP], up, ids[LOGIT_TOP:], down


def _latent_columns(
    rng: np.random.Generator, d_sae: int, dead: set[int], vocab: int, tokens: int
) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {name: [] for name in LATENT_COLUMNS}
    bins = len(log_edges()) + 1
    for latent in range(d_sae):
        for prefix in ("lens", "effect"):  # the logit lens exists for dead latents too
            up_ids, up, down_ids, down = _effects(rng, vocab)
            columns[f"{prefix}_promoted_ids"].append(up_ids)
            columns[f"{prefix}_promoted_values"].append(up)
            columns[f"{prefix}_suppressed_ids"].append(down_ids)
            columns[f"{prefix}_suppressed_values"].append(down)
        if latent in dead:
            fired, max_act, mean_act, hist, top, quantile = 0, 0.0, 0.0, [0] * bins, [], []
        else:
            fired = int(rng.integers(1, tokens // 2))
            max_act = float(np.float32(rng.random() * 5 + 0.5))
            mean_act = float(np.float32(max_act * (0.2 + 0.5 * rng.random())))
            hist = rng.multinomial(fired, np.full(bins, 1 / bins)).astype(int).tolist()
            # a few favourite tokens, so "the token it fires on most" means something
            favourites = rng.choice(np.arange(3, vocab), 3, replace=False).astype(int).tolist()
            n = min(TOP_N, fired)
            acts = [max_act] + sorted((rng.random(n - 1) * max_act).astype(np.float32).tolist(), reverse=True)
            top = [_window(rng, vocab, float(a), favourites[int(rng.integers(0, 3))]) for a in acts]
            quantile = [
                {"interval": f"{lo:g}-{hi:g}", **_window(rng, vocab, float(a), favourites[0])}
                for (lo, hi), a in zip(QUANTILES, sorted(acts)[:2])
            ]
        columns["latent"].append(latent)
        columns["fired"].append(fired)
        columns["density"].append(fired / tokens)
        columns["mean_activation"].append(mean_act)
        columns["max_activation"].append(max_act)
        columns["dead"].append(latent in dead)
        columns["hist_counts"].append(hist)
        columns["top_contexts"].append(top)
        columns["quantile_contexts"].append(quantile)
        columns["effect_contexts"].append(len(top))
    return columns
