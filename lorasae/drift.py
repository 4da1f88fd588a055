"""Latent drift reports on disk: what an adapter changed about each latent of its SAEs.

Written by ``lorasae drift`` (the training package), read by the server and by pandas / DuckDB
without lorasae. A drift folder:

- ``drift.json``: the manifest (:class:`DriftManifest`): model, the adapter and what it is
  compared against (the base model or another adapter, by weight fingerprint), corpus, tokens,
  settings, and per SAE the noise thresholds and the summary (how many latents drifted beyond
  noise on each side), plus the ranked list of the most drifted latents with their evidence;
- ``drift-L<layer>.parquet``: one row per latent of that SAE, sorted by ``latent`` (columns in
  ``DRIFT_COLUMNS``, described in the README);
- ``drift.png``: the plot.

Two sides, "reference" (base or ``--against``) vs "adapted":

- **input side** (what the latent fires on): densities, the Pearson correlation of its
  activations on the same tokens, the Jaccard overlap of its top-N contexts and the Jensen-Shannon
  divergence of its activation histograms. For an SAE that sits before every adapted layer they
  are identical by construction (``DriftSae.input_identical_by_construction``).
- **output side** (what it does): its causal effect (mean change of next-token log-probabilities
  when it alone is removed from the reconstruction, on the reference's top contexts: the
  dashboards' measure) under both models: cosine of the two effect vectors, ratio of their norms,
  overlap of their top promoted tokens.

"Drifted" means beyond noise: each statistic has a threshold measured by the same statistic
between two disjoint halves of the tokens (even / odd sequences) under the reference model, at
``noise_quantile`` over latents (``DriftThresholds``). A latent's ``score`` is its largest
statistic divided by that statistic's threshold: above 1 it drifted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from lorasae.errors import LorasaeError
from lorasae.files import write_atomic
from lorasae.folder_manifest import FolderManifest

MANIFEST_FILE = "drift.json"
PLOT_FILE = "drift.png"
FORMAT = "lorasae-drift"
VERSION = 1
ROWS_PER_GROUP = 256
MAX_MANIFEST_BYTES = 4 << 20
RANKED = 50  # latents listed, most drifted first, in the manifest
SIDES = ("input", "output")

DRIFT_COLUMNS = (
    "latent fired_reference fired_adapted density_reference density_adapted density_log_ratio "
    "pearson top_jaccard hist_js effect_contexts effect_cosine effect_norm_ratio "
    "promoted_reference_ids promoted_adapted_ids suppressed_reference_ids suppressed_adapted_ids "
    "promoted_overlap input_drifted output_drifted score rank"
).split()


def drift_file(layer: int) -> str:
    return f"drift-L{layer}.parquet"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_Text = Annotated[str, Field(max_length=4096)]
_Fingerprint = Annotated[str, Field(max_length=128)]


class DriftModel(_Strict):
    """One side of the comparison: an adapter folder (its weight fingerprint); null = the base model."""

    path: _Text
    fingerprint: _Fingerprint


class DriftThresholds(_Strict):
    """Noise thresholds: the ``noise_quantile`` of each statistic between two halves of the tokens
    under the reference model (the cosine's is its lower quantile: below it, drifted)."""

    density_log_ratio: Annotated[float, Field(ge=0)]  # |ln(density ratio)|
    hist_js: Annotated[float, Field(ge=0)]  # Jensen-Shannon divergence (nats) of activation histograms
    pearson: Annotated[float, Field(ge=0)]  # 1 - Pearson: split-half variability of the paired correlation
    effect_cosine: Annotated[float, Field(ge=-1, le=1)]


class DriftSummary(_Strict):
    latents: Annotated[int, Field(ge=0)]
    alive: Annotated[int, Field(ge=0)]  # fired under the reference or the adapted model
    measured: Annotated[int, Field(ge=0)]  # with an effect measured under both models
    input_drifted: Annotated[int, Field(ge=0)]
    output_drifted: Annotated[int, Field(ge=0)]
    input_fraction: Annotated[float, Field(ge=0, le=1)]  # of alive latents
    output_fraction: Annotated[float, Field(ge=0, le=1)]  # of measured latents


class DriftSae(_Strict):
    sae_id: _Text
    hook_name: Annotated[str, Field(max_length=256)]
    layer: Annotated[int, Field(ge=0, le=100_000)]
    d_sae: Annotated[int, Field(ge=1, le=1 << 24)]
    fingerprint: _Fingerprint
    file: Annotated[str, Field(pattern=r"^drift-L\d{1,6}\.parquet$")]
    first_adapted_layer: Annotated[int | None, Field(ge=0)]  # None: nothing inside the decoder layers
    input_identical_by_construction: bool
    thresholds: DriftThresholds
    noise_latents: Annotated[int, Field(ge=0)]  # latents whose effect was measured in both halves
    summary: DriftSummary


class RankedLatent(_Strict):
    """One entry of the ranked list: the numbers and the evidence in words."""

    layer: Annotated[int, Field(ge=0)]
    latent: Annotated[int, Field(ge=0)]
    rank: Annotated[int, Field(ge=1)]
    score: float
    sides: Annotated[list[str], Field(max_length=2)]
    evidence: Annotated[str, Field(max_length=4096)]


class DriftSettings(_Strict):
    top_n: Annotated[int, Field(ge=1, le=1000)]
    effect_contexts: Annotated[int, Field(ge=1, le=1000)]
    noise_latents: Annotated[int, Field(ge=0)]
    noise_quantile: Annotated[float, Field(gt=0.5, lt=1)]
    logit_top: Annotated[int, Field(ge=1, le=1000)]
    batch_size: Annotated[int, Field(ge=1)]
    shard_sequences: Annotated[int, Field(ge=1)]


class DriftManifest(FolderManifest):
    FILE = MANIFEST_FILE
    FORMAT = FORMAT
    VERSION = VERSION
    MAX_BYTES = MAX_MANIFEST_BYTES
    KIND = "drift report"

    format: str = FORMAT
    version: int = VERSION
    model_id: _Text
    model_fingerprint: _Fingerprint
    adapter: DriftModel
    reference: DriftModel | None  # None: the base model
    saes: Annotated[list[DriftSae], Field(min_length=1, max_length=256)]
    ranked: Annotated[list[RankedLatent], Field(max_length=1000)]
    corpus: _Text
    split: Annotated[str, Field(pattern=r"^(train|heldout)$")]
    ctx: Annotated[int, Field(ge=2)]
    sequences: Annotated[int, Field(ge=2)]
    tokens: Annotated[int, Field(ge=1)]
    settings: DriftSettings
    rows_per_group: Annotated[int, Field(ge=1, le=1 << 16)] = ROWS_PER_GROUP
    processes: Annotated[int, Field(ge=1)] = 1
    seconds: float = 0.0
    created_at: Annotated[str, Field(max_length=64)] = ""

    @classmethod
    def load(cls, directory: Path | str) -> DriftManifest:
        manifest = super().load(directory)
        for entry in manifest.saes:
            if not (Path(directory) / entry.file).is_file():
                raise LorasaeError(f"drift report {directory}: {entry.file} is missing")
        return manifest


def _schema():
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    f64, f32 = pa.float64(), pa.float32()
    return pa.schema(
        [
            ("latent", pa.int32()),
            ("fired_reference", pa.int64()),
            ("fired_adapted", pa.int64()),
            ("density_reference", f64),
            ("density_adapted", f64),
            ("density_log_ratio", f32),
            ("pearson", f32),
            ("top_jaccard", f32),
            ("hist_js", f32),
            ("effect_contexts", pa.int32()),
            ("effect_cosine", f32),
            ("effect_norm_ratio", f32),
            ("promoted_reference_ids", ids),
            ("promoted_adapted_ids", ids),
            ("suppressed_reference_ids", ids),
            ("suppressed_adapted_ids", ids),
            ("promoted_overlap", f32),
            ("input_drifted", pa.bool_()),
            ("output_drifted", pa.bool_()),
            ("score", f32),
            ("rank", pa.int32()),
        ]
    )


def write_drift(path: Path, columns: dict[str, list[Any]], rows_per_group: int = ROWS_PER_GROUP) -> None:
    """Write one SAE's drift table (``DRIFT_COLUMNS`` -> one value per latent, latents 0..d-1 in
    order; NaN where a statistic is undefined, e.g. the Pearson of a latent that never fired)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if sorted(columns) != sorted(DRIFT_COLUMNS):
        raise ValueError(f"drift columns differ: {sorted(set(columns) ^ set(DRIFT_COLUMNS))}")
    if columns["latent"] != list(range(len(columns["latent"]))):
        raise ValueError("latents must be 0..d_sae-1 in order")
    table = pa.Table.from_pydict(columns, schema=_schema())
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, row_group_size=rows_per_group))


def read_drift(directory: Path | str, layer: int, manifest: DriftManifest | None = None):
    """One SAE's drift table as a pyarrow Table (checked: latents 0..d_sae-1 in order)."""
    import numpy as np
    import pyarrow.parquet as pq

    manifest = manifest or DriftManifest.load(directory)
    entry = manifest.sae(layer)
    path = Path(directory) / entry.file
    try:
        table = pq.read_table(path, columns=DRIFT_COLUMNS)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError / KeyError for a damaged file
        raise LorasaeError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    latents = table.column("latent").to_numpy()
    if not np.array_equal(latents, np.arange(entry.d_sae)):
        raise LorasaeError(f"{path} does not hold latents 0..{entry.d_sae - 1} in order")
    return table


def _tokens(ids: list[int] | None, piece: Callable[[int], str], n: int = 3) -> str:
    return ", ".join(repr(piece(i)) for i in (ids or [])[:n]) or "-"


def evidence(row: dict[str, Any], thresholds: DriftThresholds, piece: Callable[[int], str]) -> str:
    """One latent's drift in words, from its row (``DRIFT_COLUMNS``): the side(s) that moved beyond
    noise first, each with its numbers against the thresholds."""
    parts: dict[str, str] = {}
    if row["effect_contexts"]:
        vanished = " (its effect vanished there)" if row["effect_norm_ratio"] < 0.05 else ""
        moved = {
            f"{kind}_{side}": _tokens(row[f"{kind}_{side}_ids"], piece)
            for kind in ("promoted", "suppressed")
            for side in ("reference", "adapted")
        }
        parts["output"] = (
            f"output: effect cosine {row['effect_cosine']:.2f} (noise below {thresholds.effect_cosine:.2f}), "
            f"norm x{row['effect_norm_ratio']:.2f}{vanished}; promotes {moved['promoted_reference']} -> "
            f"{moved['promoted_adapted']}; suppresses {moved['suppressed_reference']} -> "
            f"{moved['suppressed_adapted']}"
        )
    parts["input"] = (
        f"input: density {row['density_reference']:.2e} -> {row['density_adapted']:.2e}, "
        f"Pearson {row['pearson']:.3f}, top contexts shared {row['top_jaccard']:.2f}, "
        f"histogram JS {row['hist_js']:.3f} (noise {thresholds.hist_js:.3f})"
    )
    first = [side for side in SIDES if row[f"{side}_drifted"] and side in parts]
    return "; ".join(parts[side] for side in [*first, *(s for s in SIDES if s not in first and s in parts)])


def drifted_sides(row: dict[str, Any]) -> list[str]:
    return [side for side in SIDES if row[f"{side}_drifted"]]
