"""Latent drift: ``GET /v1/adapters/{name}/drift``, what a registered adapter changed about each
latent of its SAEs, against the base model or another registered adapter (``against``).

Read from the reports the server was started with (``--drift``, ``service/drift.py``), found by the
adapters' weight fingerprints. ``sae`` is named as in ``POST /v1/features`` (public id, full id or
layer number).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from starlette.concurrency import run_in_threadpool

from lorasae.drift import drifted_sides, evidence
from lorasae_client.schemas import (
    DriftLatent,
    DriftReport,
    DriftSaeInfo,
    DriftSummary,
    DriftThresholds,
    DriftToken,
    ErrorResponse,
)

from ..deps import Service, ready_service
from ..drift import ServedDrift, Side
from ..engine import Engine
from ..errors import ServiceError, not_found, shown

router = APIRouter(tags=["drift"])

MAX_LIMIT = 500
MAX_OFFSET = 1 << 30  # past any report: 256 SAEs of at most 2^24 latents
MAX_NAME = 128  # adapter names are at most 64 characters
MAX_SAE = 512

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (404, 409, 422, 503)}


def _fingerprint(svc: Service, name: str) -> str:
    """The weight fingerprint of registered adapter ``name``: 404 ``unknown_adapter``, 409 for an
    adapter that failed to load."""
    engine, registry, *_ = svc.loaded()
    registry.require_ready(name)
    slot = engine.adapters.get(name)
    if slot is None:  # being deleted right now
        raise not_found("adapter", name)
    return slot.fingerprint


def _report(svc: Service, name: str, against: str | None) -> ServedDrift:
    """The report comparing ``name`` with ``against`` (None: the base model), or 404 ``no_drift``
    saying how to make one."""
    adapter = _fingerprint(svc, name)
    reference = _fingerprint(svc, against) if against is not None else None
    report = svc.drift.find(adapter, reference)
    if report is None:
        with_what = f"adapter {shown(against)}" if against is not None else "the base model"
        option = " --against DIR" if against is not None else ""
        raise ServiceError(
            404,
            "no_drift",
            f"no drift report compares adapter {shown(name)} with {with_what}; make one with "
            f"`lorasae drift --adapter DIR{option} --out DIR` and start the server with --drift DIR",
        )
    return report


def _number(value: float) -> float | None:
    """A statistic as sent: NaN (undefined) and infinities (JSON has neither) become null."""
    return value if math.isfinite(value) else None


def _tokens(engine: Engine, ids: list[int]) -> list[DriftToken]:
    return [DriftToken(id=i, text=engine.piece(i)) for i in ids]


def drift_latent(engine: Engine, report: ServedDrift, layer: int, latent: int) -> DriftLatent:
    """The wire form of one row of a drift table, token texts from the server's tokenizer."""
    table = report.tables[layer]
    row = table.row(latent)
    return DriftLatent(
        sae=engine.names[layer],
        layer=layer,
        latent=row["latent"],
        rank=row["rank"],
        score=_number(row["score"]),
        sides=drifted_sides(row),
        input_drifted=row["input_drifted"],
        output_drifted=row["output_drifted"],
        fired_reference=row["fired_reference"],
        fired_adapted=row["fired_adapted"],
        density_reference=_number(row["density_reference"]),
        density_adapted=_number(row["density_adapted"]),
        density_log_ratio=_number(row["density_log_ratio"]),
        pearson=_number(row["pearson"]),
        top_jaccard=_number(row["top_jaccard"]),
        hist_js=_number(row["hist_js"]),
        effect_contexts=row["effect_contexts"],
        effect_cosine=_number(row["effect_cosine"]),
        effect_norm_ratio=_number(row["effect_norm_ratio"]),
        promoted_overlap=_number(row["promoted_overlap"]),
        promoted_reference=_tokens(engine, row["promoted_reference_ids"]),
        promoted_adapted=_tokens(engine, row["promoted_adapted_ids"]),
        suppressed_reference=_tokens(engine, row["suppressed_reference_ids"]),
        suppressed_adapted=_tokens(engine, row["suppressed_adapted_ids"]),
        evidence=evidence(row, table.entry.thresholds, engine.piece),
    )


@router.get(
    "/v1/adapters/{name}/drift",
    response_model=DriftReport,
    responses=_ERRORS,
    summary="What an adapter changed about its SAEs' latents: the most drifted first",
)
async def drift(
    name: Annotated[str, Path(max_length=MAX_NAME, description="registered adapter")],
    against: str | None = Query(
        None, max_length=MAX_NAME, description="registered adapter compared with (none: the base model)"
    ),
    sae: str | None = Query(
        None, max_length=MAX_SAE, description="one SAE (public id, full id or layer); none: the report's"
    ),
    side: Side = Query(
        "any", description="latents drifted beyond noise on this side (any: either); all: every latent"
    ),
    limit: int = Query(50, ge=1, le=MAX_LIMIT),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    svc: Service = Depends(ready_service),
) -> DriftReport:
    engine = svc.loaded().engine
    selected = engine.select_layers([sae]) if sae is not None else None
    report = _report(svc, name, against)
    layers = sorted(report.tables)
    if selected is not None:
        if selected[0] not in report.tables:
            covered = ", ".join(engine.names[layer] for layer in layers)
            raise ServiceError(
                404,
                "no_drift",
                f"the drift report of adapter {shown(name)} does not cover SAE "
                f"{engine.names[selected[0]]!r} (it covers {covered})",
            )
        layers = list(selected)

    def page() -> DriftReport:
        layer_of, latent_of = report.select(layers, side)
        shown_layers = layer_of[offset : offset + limit].tolist()
        shown_latents = latent_of[offset : offset + limit].tolist()
        m = report.manifest
        return DriftReport(
            adapter=name,
            against=against,
            corpus=m.corpus,
            split=m.split,
            tokens=m.tokens,
            created_at=m.created_at,
            side=side,
            saes=[_sae_info(engine, report, layer) for layer in layers],
            total=len(latent_of),
            offset=offset,
            latents=[
                drift_latent(engine, report, layer, latent)
                for layer, latent in zip(shown_layers, shown_latents)
            ],
        )

    return await run_in_threadpool(page)


def _sae_info(engine: Engine, report: ServedDrift, layer: int) -> DriftSaeInfo:
    entry = report.tables[layer].entry
    return DriftSaeInfo(
        sae=engine.names[layer],
        layer=layer,
        d_sae=entry.d_sae,
        first_adapted_layer=entry.first_adapted_layer,
        input_identical_by_construction=entry.input_identical_by_construction,
        thresholds=DriftThresholds(**entry.thresholds.model_dump()),
        summary=DriftSummary(**entry.summary.model_dump()),
    )
