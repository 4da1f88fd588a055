"""Latent drift reports served: the drift folders of the settings (``lorasae drift``, format in
``lorasae.drift``), checked against the loaded model and SAEs and indexed by the pair they compare:
(adapter weight fingerprint, reference adapter weight fingerprint or None for the base model).

A report is tied to adapters by their weights (``lorasae.manifest.adapter_fingerprint``, the same
fingerprint as ``AdapterSlot.fingerprint``), so it serves whatever names the adapters are
registered under, as dashboards do (``service/dashboards.py``). Everything is checked and read once,
at startup: a folder made with another model, covering an SAE that is not loaded (layer,
fingerprint, width), or comparing the same pair as another folder stops the server with a message
naming it. Each SAE's table is small (one row per latent: 4,608 rows for the default SAE) and kept
in memory as numpy arrays, plus pyarrow list arrays for the token ids, read by row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from lorasae.drift import DRIFT_COLUMNS, DriftManifest, DriftSae, read_drift
from lorasae.errors import LorasaeError

from .dashboards import check_loaded_sae

if TYPE_CHECKING:
    import pyarrow as pa

    from .engine import Engine

Side = Literal["any", "input", "output", "all"]
TOKEN_COLUMNS = (
    "promoted_reference_ids",
    "promoted_adapted_ids",
    "suppressed_reference_ids",
    "suppressed_adapted_ids",
)
NUMERIC_COLUMNS = tuple(c for c in DRIFT_COLUMNS if c not in TOKEN_COLUMNS)
# no missing values allowed: counts, flags and ranks (statistics may be null / NaN: undefined)
REQUIRED_COLUMNS = (
    "latent",
    "fired_reference",
    "fired_adapted",
    "effect_contexts",
    "input_drifted",
    "output_drifted",
    "rank",
)


@dataclass
class DriftTable:
    """One SAE of a drift report: its manifest entry and its table, column by column."""

    entry: DriftSae
    values: dict[str, np.ndarray]  # NUMERIC_COLUMNS (latent, counts, statistics, flags, score, rank)
    tokens: dict[str, pa.Array]  # TOKEN_COLUMNS: list<int32> per latent

    def row(self, latent: int) -> dict[str, Any]:
        """Latent ``latent``'s row as plain Python (``DRIFT_COLUMNS`` -> value; lists of ids never None)."""
        row: dict[str, Any] = {name: self.values[name][latent].item() for name in NUMERIC_COLUMNS}
        for name in TOKEN_COLUMNS:
            row[name] = self.tokens[name][latent].as_py() or []
        return row


@dataclass
class ServedDrift:
    """One drift folder, as served: its manifest, and its SAEs' tables by layer."""

    directory: Path
    manifest: DriftManifest
    tables: dict[int, DriftTable]

    def select(self, layers: Sequence[int], side: Side) -> tuple[np.ndarray, np.ndarray]:
        """Layers and latents (two arrays) of the latents of SAEs ``layers`` drifted on ``side``
        ("any": either; "all": every latent), most drifted first: by rank within one SAE; across
        several SAEs (ranks are per SAE) by score, highest first (undefined scores last), then
        layer, latent."""
        layer_parts, latent_parts, score_parts, rank_parts = [], [], [], []
        for layer in layers:
            v = self.tables[layer].values
            if side == "all":
                latents = np.arange(len(v["latent"]))
            elif side == "any":
                latents = np.flatnonzero(v["input_drifted"] | v["output_drifted"])
            else:
                latents = np.flatnonzero(v[f"{side}_drifted"])
            layer_parts.append(np.full(len(latents), layer, dtype=np.int64))
            latent_parts.append(latents)
            score_parts.append(v["score"][latents].astype(np.float64))
            rank_parts.append(v["rank"][latents])
        layer_of, latent_of = np.concatenate(layer_parts), np.concatenate(latent_parts)
        if len(layers) == 1:
            order = np.lexsort((latent_of, np.concatenate(rank_parts)))
        else:
            score = np.concatenate(score_parts)
            order = np.lexsort((latent_of, layer_of, np.where(np.isnan(score), np.inf, -score)))
        return layer_of[order], latent_of[order]


class DriftIndex:
    """The served drift reports by (adapter fingerprint, reference fingerprint or None)."""

    def __init__(self, reports: dict[tuple[str, str | None], ServedDrift] | None = None) -> None:
        self._reports = reports or {}

    def __len__(self) -> int:
        return len(self._reports)

    @classmethod
    def build(cls, engine: Engine, folders: Sequence[str | Path]) -> DriftIndex:
        """Open and check every folder against the engine and read its tables (LorasaeError naming
        the folder and what differs when one does not fit)."""
        reports: dict[tuple[str, str | None], ServedDrift] = {}
        for folder in folders:
            directory = Path(folder).expanduser()
            m = DriftManifest.load(directory)
            if m.model_fingerprint != engine.model_fingerprint:
                raise LorasaeError(
                    f"drift report {folder}: made with model {m.model_id!r} (fingerprint "
                    f"{m.model_fingerprint}), but the server's model {engine.model_id!r} has "
                    f"fingerprint {engine.model_fingerprint}"
                )
            tables = {}
            for entry in m.saes:
                check_loaded_sae(engine, f"drift report {folder}", entry)
                tables[entry.layer] = _read_table(directory, entry, m)
            key = (m.adapter.fingerprint, m.reference.fingerprint if m.reference is not None else None)
            if key in reports:
                against = f"adapter fingerprint {key[1]}" if key[1] else "the base model"
                raise LorasaeError(
                    f"drift reports {reports[key].directory} and {folder} both compare adapter "
                    f"fingerprint {key[0]} with {against}; serve one of them"
                )
            reports[key] = ServedDrift(directory, m, tables)
        return cls(reports)

    def find(self, adapter_fingerprint: str, reference_fingerprint: str | None) -> ServedDrift | None:
        return self._reports.get((adapter_fingerprint, reference_fingerprint))


def _read_table(directory: Path, entry: DriftSae, manifest: DriftManifest) -> DriftTable:
    """SAE ``entry``'s table (``read_drift`` checks latents 0..d_sae-1 in order), column by column,
    checked here so that a file not written by ``lorasae.drift.write_drift`` stops the server at
    start rather than failing requests: numbers where numbers go, lists of ids, no missing counts,
    flags or ranks."""
    import pyarrow as pa

    path = directory / entry.file
    table = read_drift(directory, entry.layer, manifest)
    for name in DRIFT_COLUMNS:
        column = table.column(name)
        kind = column.type
        if name in TOKEN_COLUMNS:
            fits = pa.types.is_list(kind) and pa.types.is_integer(kind.value_type)
        else:
            fits = pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
        if not fits:
            raise LorasaeError(f"{path}: column {name} is {kind}, not what lorasae drift writes")
        if name in REQUIRED_COLUMNS and column.null_count:
            raise LorasaeError(f"{path}: column {name} has {column.null_count} missing values")
    values = {name: table.column(name).to_numpy(zero_copy_only=False) for name in NUMERIC_COLUMNS}
    tokens = {name: table.column(name).combine_chunks() for name in TOKEN_COLUMNS}
    return DriftTable(entry, values, tokens)
