"""Latent dashboards on disk: a manifest and one Parquet file per SAE, readable without lorasae.

Written by ``lorasae dashboards`` (the training package), read by the server. A dashboard folder:

- ``dashboards.json``: the manifest (:class:`DashboardManifest`): model, SAEs and adapter it was
  made with (fingerprints), corpus, tokens, settings, histogram bin edges, files;
- ``latents-L<layer>.parquet``: one row per latent of that SAE (every latent, dead ones
  included), sorted by ``latent``, in row groups of ``rows_per_group`` latents, so one latent is
  read from one small row group (``Dashboard.record``);
- ``tokens.parquet``: ``id`` / ``text`` of every vocabulary entry, so token ids in the latent
  files read as text in pandas or DuckDB without a tokenizer.

Columns of a latent file (see ``LATENT_SCHEMA`` and the README's table):
``latent``, ``fired`` (tokens with activation > 0), ``density`` (fired / tokens), ``mean_activation``
(over firing tokens), ``max_activation``, ``dead``, ``hist_counts`` (counts per bin of
``manifest.hist_edges``: bin 0 is ``(0, edges[0])``, bin i is ``[edges[i-1], edges[i])``, the last
is ``>= edges[-1]``), ``top_contexts`` and ``quantile_contexts`` (lists of windows: ``sequence``,
``position``, ``activation``, ``start``, ``token_ids``, ``activations``; quantile ones also
``interval``), ``lens_*`` (logit lens of the decoder row: promoted / suppressed token ids and
logit values) and ``effect_*`` (mean change of next-token log-probabilities at the top contexts
when the latent alone is removed from the reconstruction there; ``effect_contexts`` = how many).
A context's ``sequence`` is the index of a packed ``[BOS] + ctx-1`` sequence of the corpus split
(``lorasae.data.packed_sequences``), ``position`` the token within it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from lorasae.errors import LorasaeError
from lorasae.files import write_atomic
from lorasae.folder_manifest import FolderManifest

MANIFEST_FILE = "dashboards.json"
TOKENS_FILE = "tokens.parquet"
FORMAT = "lorasae-dashboards"
VERSION = 1
ROWS_PER_GROUP = 64
MAX_MANIFEST_BYTES = 1 << 20


def latents_file(layer: int) -> str:
    return f"latents-L{layer}.parquet"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DashboardSae(_Strict):
    """One SAE covered by a dashboard folder."""

    sae_id: Annotated[str, Field(max_length=4096)]
    hook_name: Annotated[str, Field(max_length=256)]
    layer: Annotated[int, Field(ge=0, le=100_000)]
    d_sae: Annotated[int, Field(ge=1, le=1 << 24)]
    fingerprint: Annotated[str, Field(max_length=128)]
    file: Annotated[str, Field(pattern=r"^latents-L\d{1,6}\.parquet$")]
    dead: Annotated[int, Field(ge=0)]


class DashboardAdapter(_Strict):
    """The adapter a dashboard was made through (null in the manifest: the base model)."""

    path: Annotated[str, Field(max_length=4096)]
    fingerprint: Annotated[str, Field(max_length=128)]


class DashboardSettings(_Strict):
    top_n: Annotated[int, Field(ge=1, le=1000)]
    window_before: Annotated[int, Field(ge=0, le=1000)]
    window_after: Annotated[int, Field(ge=0, le=1000)]
    quantile_intervals: Annotated[list[tuple[float, float]], Field(max_length=64)]
    samples_per_interval: Annotated[int, Field(ge=0, le=1000)]
    logit_top: Annotated[int, Field(ge=1, le=1000)]
    effect_contexts: Annotated[int, Field(ge=0, le=1000)]
    batch_size: Annotated[int, Field(ge=1)]
    shard_sequences: Annotated[int, Field(ge=1)]


class DashboardManifest(FolderManifest):
    FILE = MANIFEST_FILE
    FORMAT = FORMAT
    VERSION = VERSION
    MAX_BYTES = MAX_MANIFEST_BYTES
    KIND = "dashboard"

    format: str = FORMAT
    version: int = VERSION
    model_id: Annotated[str, Field(max_length=4096)]
    model_fingerprint: Annotated[str, Field(max_length=128)]
    adapter: DashboardAdapter | None
    saes: Annotated[list[DashboardSae], Field(min_length=1, max_length=256)]
    corpus: Annotated[str, Field(max_length=4096)]
    split: Annotated[str, Field(pattern=r"^(train|heldout)$")]
    ctx: Annotated[int, Field(ge=2)]
    sequences: Annotated[int, Field(ge=1)]
    tokens: Annotated[int, Field(ge=1)]  # tokens analysed (position 0, BOS, excluded)
    hist_edges: Annotated[list[float], Field(min_length=1, max_length=1000)]
    settings: DashboardSettings
    rows_per_group: Annotated[int, Field(ge=1, le=1 << 16)] = ROWS_PER_GROUP
    processes: Annotated[int, Field(ge=1)] = 1
    seconds: float = 0.0
    created_at: Annotated[str, Field(max_length=64)] = ""


def log_edges(low: float = 1e-2, high: float = 1e3, per_decade: int = 10) -> list[float]:
    """Fixed log-spaced histogram edges (fixed, so histograms of shards add up exactly)."""
    n = round(math.log10(high / low) * per_decade)
    return [float(low * 10 ** (i / per_decade)) for i in range(n + 1)]


def _schema():
    import pyarrow as pa

    window = [
        ("sequence", pa.int32()),
        ("position", pa.int32()),
        ("activation", pa.float32()),
        ("start", pa.int32()),
        ("token_ids", pa.list_(pa.int32())),
        ("activations", pa.list_(pa.float32())),
    ]
    ids, values = pa.list_(pa.int32()), pa.list_(pa.float32())
    return pa.schema(
        [
            ("latent", pa.int32()),
            ("fired", pa.int64()),
            ("density", pa.float64()),
            ("mean_activation", pa.float32()),
            ("max_activation", pa.float32()),
            ("dead", pa.bool_()),
            ("hist_counts", pa.list_(pa.int64())),
            ("top_contexts", pa.list_(pa.struct(window))),
            ("quantile_contexts", pa.list_(pa.struct([("interval", pa.string()), *window]))),
            ("lens_promoted_ids", ids),
            ("lens_promoted_values", values),
            ("lens_suppressed_ids", ids),
            ("lens_suppressed_values", values),
            ("effect_contexts", pa.int32()),
            ("effect_promoted_ids", ids),
            ("effect_promoted_values", values),
            ("effect_suppressed_ids", ids),
            ("effect_suppressed_values", values),
        ]
    )


LATENT_COLUMNS = (
    "latent fired density mean_activation max_activation dead hist_counts top_contexts "
    "quantile_contexts lens_promoted_ids lens_promoted_values lens_suppressed_ids "
    "lens_suppressed_values effect_contexts effect_promoted_ids effect_promoted_values "
    "effect_suppressed_ids effect_suppressed_values"
).split()


def write_latents(path: Path, columns: dict[str, list[Any]], rows_per_group: int = ROWS_PER_GROUP) -> None:
    """Write one SAE's latent table (``columns``: ``LATENT_COLUMNS`` -> one value per latent,
    latents 0..d_sae-1 in order) atomically, in row groups of ``rows_per_group`` latents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if sorted(columns) != sorted(LATENT_COLUMNS):
        raise ValueError(f"latent columns differ: {sorted(set(columns) ^ set(LATENT_COLUMNS))}")
    if columns["latent"] != list(range(len(columns["latent"]))):
        raise ValueError("latents must be 0..d_sae-1 in order")
    table = pa.Table.from_pydict(columns, schema=_schema())
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, row_group_size=rows_per_group))


def write_tokens(directory: Path, pieces: list[str]) -> None:
    """``tokens.parquet``: the text of every token id (``pieces[i]`` is id i)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": pa.array(range(len(pieces)), pa.int32()), "text": pa.array(pieces, pa.string())})
    write_atomic(Path(directory) / TOKENS_FILE, lambda tmp: pq.write_table(table, tmp))


@dataclass
class Dashboard:
    """A dashboard folder opened for reading: manifest checked, latent files opened lazily."""

    directory: Path
    manifest: DashboardManifest
    _files: dict[int, Any] = field(default_factory=dict, repr=False)  # layer -> pyarrow ParquetFile

    @classmethod
    def open(cls, directory: Path | str) -> Dashboard:
        directory = Path(directory)
        manifest = DashboardManifest.load(directory)
        for entry in manifest.saes:
            if not (directory / entry.file).is_file():
                raise LorasaeError(f"dashboard {directory}: {entry.file} is missing")
        return cls(directory, manifest)

    def _file(self, layer: int):
        import pyarrow.parquet as pq

        if layer not in self._files:
            path = self.directory / self.manifest.sae(layer).file
            try:
                self._files[layer] = pq.ParquetFile(path)
            except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a damaged file
                raise LorasaeError(f"cannot read {path}: {exc}") from exc
        return self._files[layer]

    def record(self, layer: int, index: int) -> dict[str, Any]:
        """Latent ``index`` of the SAE at ``layer``: one row as plain Python values (reads one
        row group)."""
        entry = self.manifest.sae(layer)
        if not 0 <= index < entry.d_sae:
            raise LorasaeError(f"latent {index} is outside 0..{entry.d_sae - 1}")
        group, offset = divmod(index, self.manifest.rows_per_group)
        table = self._file(layer).read_row_group(group)
        row = table.slice(offset, 1).to_pylist()[0]
        if row["latent"] != index:
            raise LorasaeError(f"{entry.file} is not sorted by latent (row {index} holds {row['latent']})")
        return row
