"""A synthetic but self-consistent latent drift report for tests (server, viewer, client).

``write_drift_report(directory, engine, adapter_dir)`` writes what ``lorasae drift`` would
(``drift.json``, ``drift-L<layer>.parquet`` per SAE) for the engine's model and SAEs, with seeded
random numbers instead of measured ones: readable by ``lorasae.drift`` and passing the server's
startup checks (model and SAE fingerprints, widths; adapter fingerprints from the adapter folders).

What holds, so tests can rely on it: latents in ``dead`` never fired under either model (zero
counts and densities, every statistic NaN, no tokens, score NaN, ranked last); every other latent
has its statistics, ``input_drifted`` exactly when a statistic of the input side is beyond its
threshold (never for an SAE whose input is identical by construction: it sits before the first
adapted layer, read from the adapters' ``adapter_config.json``), ``output_drifted`` exactly when
it has an effect (``effect_contexts > 0``; not the ``no_effect`` latents) and its effect cosine is
below the threshold; ``score`` is the largest statistic over its threshold (above 1 exactly when
drifted); ``rank`` is 1..d_sae by score, highest first (ties and NaN: by latent). The summary
counts and the manifest's ``ranked`` list (with ``lorasae.drift.evidence``) agree with the tables.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorasae.drift import (
    DRIFT_COLUMNS,
    RANKED,
    DriftManifest,
    DriftModel,
    DriftSae,
    DriftSettings,
    DriftSummary,
    DriftThresholds,
    RankedLatent,
    drift_file,
    drifted_sides,
    evidence,
    write_drift,
)

CTX = 16
SEQUENCES = 8
TOKENS = SEQUENCES * (CTX - 1)
TOP = 4  # promoted / suppressed tokens per side
ROWS_PER_GROUP = 16
THRESHOLDS = DriftThresholds(density_log_ratio=0.4, hist_js=0.05, pearson=0.15, effect_cosine=0.8)


def default_dead(d_sae: int) -> list[int]:
    """The latents ``write_drift_report`` makes dead unless told: every 16th, from 5."""
    return list(range(5, d_sae, 16))


def default_no_effect(d_sae: int) -> list[int]:
    """Live latents with no effect measured under both models unless told: every 16th, from 11."""
    return list(range(11, d_sae, 16))


def first_adapted_layer(*adapters: Path) -> int:
    """The first decoder layer any of ``adapters`` changes (peft's ``layers_to_transform``; none
    given: every layer, so 0)."""
    firsts = []
    for adapter in adapters:
        config = json.loads((Path(adapter) / "adapter_config.json").read_text())
        layers = config.get("layers_to_transform")
        firsts.append(min(layers) if layers else 0)
    return min(firsts)


def write_drift_report(
    directory: Path,
    engine: Any,
    adapter_dir: Path,
    *,
    reference: Path | None = None,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    dead: Sequence[int] | None = None,
    no_effect: Sequence[int] | None = None,
    corpus: str = "synthetic-corpus",
) -> Path:
    """Write a drift folder for ``engine`` (a ``lorasae.service.engine.Engine``: model, SAE
    fingerprints, tokenizer) comparing adapter folder ``adapter_dir`` with the base model, or with
    adapter folder ``reference``, into ``directory``; return it.

    ``layers``: the SAEs covered (default: all loaded); ``seed`` picks the numbers; ``dead`` and
    ``no_effect``: those latents of every SAE (defaults ``default_dead``, ``default_no_effect``)."""
    from lorasae.manifest import adapter_file_fingerprint

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = list(engine.by_layer) if layers is None else list(layers)
    vocab = len(engine.lm.tokenizer)
    first = first_adapted_layer(adapter_dir, *([reference] if reference is not None else []))
    saes, ranked = [], []
    for layer in layers:
        d_sae = engine.by_layer[layer].d_sae
        identical = first > layer
        rng = np.random.default_rng([seed, layer])
        dead_set = set(default_dead(d_sae) if dead is None else dead)
        no_effect_set = set(default_no_effect(d_sae) if no_effect is None else no_effect) - dead_set
        columns = _columns(rng, d_sae, dead_set, no_effect_set, identical, vocab)
        write_drift(directory / drift_file(layer), columns, rows_per_group=ROWS_PER_GROUP)
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        saes.append(
            DriftSae(
                sae_id=engine.by_layer[layer].sae_id,
                hook_name=engine.by_layer[layer].hook_name,
                layer=layer,
                d_sae=d_sae,
                fingerprint=engine.sae_fingerprints[layer],
                file=drift_file(layer),
                first_adapted_layer=first,
                input_identical_by_construction=identical,
                thresholds=THRESHOLDS,
                noise_latents=d_sae - len(dead_set) - len(no_effect_set),
                summary=_summary(rows),
            )
        )
        ranked += [
            RankedLatent(
                layer=layer,
                latent=row["latent"],
                rank=row["rank"],
                score=row["score"],
                sides=drifted_sides(row),
                evidence=evidence(row, THRESHOLDS, engine.piece),
            )
            for row in sorted(rows, key=lambda r: r["rank"])[:RANKED]
        ]
    ranked.sort(key=lambda r: (-r.score if math.isfinite(r.score) else math.inf, r.layer, r.latent))
    DriftManifest(
        model_id=engine.model_id,
        model_fingerprint=engine.model_fingerprint,
        adapter=DriftModel(path=str(adapter_dir), fingerprint=adapter_file_fingerprint(adapter_dir)),
        reference=None
        if reference is None
        else DriftModel(path=str(reference), fingerprint=adapter_file_fingerprint(reference)),
        saes=saes,
        ranked=ranked[:RANKED],
        corpus=corpus,
        split="heldout",
        ctx=CTX,
        sequences=SEQUENCES,
        tokens=TOKENS,
        settings=DriftSettings(
            top_n=6,
            effect_contexts=4,
            noise_latents=64,
            noise_quantile=0.95,
            logit_top=TOP,
            batch_size=4,
            shard_sequences=SEQUENCES,
        ),
        rows_per_group=ROWS_PER_GROUP,
        created_at="2025-01-02T00:00:00+00:00",
    ).save(directory)
    return directory


def _ids(rng: np.random.Generator, vocab: int) -> list[int]:
    return rng.choice(np.arange(3, vocab), TOP, replace=False).astype(int).tolist()  # 0-2: specials


def _columns(
    rng: np.random.Generator,
    d_sae: int,
    dead: set[int],
    no_effect: set[int],
    identical: bool,
    vocab: int,
) -> dict[str, list[Any]]:
    """One SAE's table: every column of ``DRIFT_COLUMNS``, then ``score`` and ``rank`` from them."""
    nan = math.nan
    columns: dict[str, list[Any]] = {name: [] for name in DRIFT_COLUMNS}
    t = THRESHOLDS
    for latent in range(d_sae):
        row: dict[str, Any] = {"latent": latent}
        if latent in dead:
            row.update(fired_reference=0, fired_adapted=0, density_reference=0.0, density_adapted=0.0)
            row.update(density_log_ratio=nan, pearson=nan, top_jaccard=nan, hist_js=nan)
        else:
            fired = int(rng.integers(1, TOKENS // 2))
            # input identical by construction: the adapted model fires exactly as the reference
            adapted = fired if identical else int(np.clip(fired * rng.lognormal(0, 0.3), 1, TOKENS))
            row.update(fired_reference=fired, fired_adapted=adapted)
            row.update(density_reference=fired / TOKENS, density_adapted=adapted / TOKENS)
            row["density_log_ratio"] = float(np.float32(abs(math.log(adapted / fired))))
            row["pearson"] = 1.0 if identical else float(np.float32(1 - rng.random() * 0.2))
            row["top_jaccard"] = 1.0 if identical else float(np.float32(rng.random()))
            row["hist_js"] = 0.0 if identical else float(np.float32(rng.random() * 0.06))
        if latent in dead or latent in no_effect:
            row.update(effect_contexts=0, effect_cosine=nan, effect_norm_ratio=nan, promoted_overlap=nan)
            for name in ("promoted", "suppressed"):
                row[f"{name}_reference_ids"] = [] if latent in dead else _ids(rng, vocab)
                row[f"{name}_adapted_ids"] = []
        else:
            row["effect_contexts"] = int(rng.integers(1, 5))
            row["effect_cosine"] = float(np.float32(1 - rng.random() * 0.3))
            row["effect_norm_ratio"] = float(np.float32(rng.lognormal(0, 0.3)))
            row["promoted_overlap"] = float(np.float32(rng.integers(0, TOP + 1) / TOP))
            for name in ("promoted", "suppressed"):
                row[f"{name}_reference_ids"] = _ids(rng, vocab)
                row[f"{name}_adapted_ids"] = _ids(rng, vocab)
        ratios = [
            row["density_log_ratio"] / t.density_log_ratio,
            row["hist_js"] / t.hist_js,
            (1 - row["pearson"]) / t.pearson,
        ]
        row["input_drifted"] = any(r > 1 for r in ratios)
        if row["effect_contexts"]:
            ratios.append((1 - row["effect_cosine"]) / (1 - t.effect_cosine))
        row["output_drifted"] = bool(row["effect_contexts"]) and row["effect_cosine"] < t.effect_cosine
        defined = [r for r in ratios if not math.isnan(r)]
        row["score"] = float(np.float32(max(defined))) if defined else nan
        for name in DRIFT_COLUMNS:
            if name != "rank":
                columns[name].append(row[name])
    score = np.array(columns["score"], dtype=np.float64)
    order = np.lexsort((np.arange(d_sae), np.where(np.isnan(score), np.inf, -score)))
    rank = np.empty(d_sae, dtype=int)
    rank[order] = np.arange(1, d_sae + 1)
    columns["rank"] = rank.tolist()
    return columns


def _summary(rows: list[dict[str, Any]]) -> DriftSummary:
    alive = sum(r["fired_reference"] > 0 or r["fired_adapted"] > 0 for r in rows)
    measured = sum(r["effect_contexts"] > 0 for r in rows)
    inputs = sum(r["input_drifted"] for r in rows)
    outputs = sum(r["output_drifted"] for r in rows)
    return DriftSummary(
        latents=len(rows),
        alive=alive,
        measured=measured,
        input_drifted=inputs,
        output_drifted=outputs,
        input_fraction=inputs / alive if alive else 0.0,
        output_fraction=outputs / measured if measured else 0.0,
    )
