"""Latent dashboards: ``GET /v1/saes/{sae}/latents/{index}`` (one latent's record) and
``GET /v1/saes/{sae}/latents`` (search by token text, or list by density / max activation).

Both read the dashboards the server was started with (``--dashboards``, ``service/dashboards.py``);
with ``adapter=NAME`` the one made through that registered adapter. ``sae`` is named as in
``POST /v1/features`` (public id, full id or layer number); an id with '/' arrives percent-encoded.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from starlette.concurrency import run_in_threadpool

from lorasae.errors import LorasaeError
from lorasae_client.schemas import (
    CausalEffect,
    DashboardInfo,
    ErrorResponse,
    Histogram,
    LatentContext,
    LatentRecord,
    LatentSearchResponse,
    TokenActivation,
    TokenEffects,
    TokenValue,
)

from ..dashboards import MAX_QUERY_WORDS, Covered, Order, Sort, query_words
from ..deps import Service, ready_service
from ..engine import Engine
from ..errors import ServiceError, not_found, shown

router = APIRouter(tags=["latents"])
log = logging.getLogger("lorasae.service")

MAX_QUERY_CHARS = 200
MAX_LIMIT = 500

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (404, 409, 422, 500, 503)
}
AdapterParam = Annotated[
    str | None,
    Query(
        max_length=128,
        description="registered adapter: the dashboard made through it (none: the base model's)",
    ),
]


def _covered(svc: Service, sae: str, adapter: str | None) -> Covered:
    """The dashboard that covers the SAE ``sae`` names through ``adapter``: 404 ``unknown_sae`` /
    ``unknown_adapter`` / ``no_dashboard``, 409 for an adapter that failed to load."""
    engine, registry, *_ = svc.loaded()
    (layer,) = engine.select_layers([sae])
    fingerprint = None
    if adapter is not None:
        registry.require_ready(adapter)
        slot = engine.adapters.get(adapter)
        if slot is None:  # being deleted right now
            raise not_found("adapter", adapter)
        fingerprint = slot.fingerprint
    covered = svc.dashboards.find(layer, fingerprint)
    if covered is None:
        through = f" through adapter {shown(adapter)}" if adapter is not None else ""
        raise ServiceError(
            404,
            "no_dashboard",
            f"no dashboard covers SAE {engine.names[layer]!r}{through}; make one with "
            "`lorasae dashboards` and start the server with --dashboards DIR",
        )
    return covered


@router.get(
    "/v1/saes/{sae:path}/latents/{index}",
    response_model=LatentRecord,
    responses=_ERRORS,
    summary="One latent's dashboard: what it fires on and what it does",
)
async def latent(
    sae: str, index: int, adapter: AdapterParam = None, svc: Service = Depends(ready_service)
) -> LatentRecord:
    covered = _covered(svc, sae, adapter)
    engine = svc.loaded().engine
    name = engine.names[covered.layer]
    if not 0 <= index < covered.d_sae:
        raise ServiceError(
            404, "unknown_latent", f"SAE {name!r} has no latent {shown(index)} (0..{covered.d_sae - 1})"
        )
    try:
        return await run_in_threadpool(
            lambda: latent_record(engine, covered, svc.dashboards.row(covered, index), adapter)
        )
    except LorasaeError as exc:  # a damaged file: the server's problem, and its paths stay private
        log.error("reading latent %d of SAE %s: %s", index, name, exc)
        raise ServiceError(
            500,
            "dashboard_unreadable",
            f"the dashboard of SAE {name!r} could not be read (see the server log)",
        ) from exc


def latent_record(engine: Engine, covered: Covered, row: dict[str, Any], adapter: str | None) -> LatentRecord:
    """The wire form of one row of a latent file (``Dashboard.record``), token texts from the
    server's tokenizer."""
    manifest = covered.dashboard.manifest
    piece = engine.piece

    def context(c: dict[str, Any]) -> LatentContext:
        tokens = [
            TokenActivation(id=t, text=piece(t), activation=a)
            for t, a in zip(c["token_ids"], c["activations"])
        ]
        return LatentContext(
            sequence=c["sequence"],
            position=c["position"],
            activation=c["activation"],
            start=c["start"],
            tokens=tokens,
            interval=c.get("interval"),
        )

    def values(prefix: str) -> list[TokenValue]:
        return [
            TokenValue(id=t, text=piece(t), value=v)
            for t, v in zip(row[f"{prefix}_ids"], row[f"{prefix}_values"])
        ]

    return LatentRecord(
        sae=engine.names[covered.layer],
        index=row["latent"],
        adapter=adapter,
        dashboard=DashboardInfo(
            adapter=adapter,
            corpus=manifest.corpus,
            split=manifest.split,
            tokens=manifest.tokens,
            ctx=manifest.ctx,
        ),
        dead=row["dead"],
        fired=row["fired"],
        density=row["density"],
        mean_activation=row["mean_activation"],
        max_activation=row["max_activation"],
        histogram=Histogram(edges=manifest.hist_edges, counts=row["hist_counts"]),
        top_contexts=[context(c) for c in row["top_contexts"]],
        quantile_contexts=[context(c) for c in row["quantile_contexts"]],
        logit_lens=TokenEffects(promoted=values("lens_promoted"), suppressed=values("lens_suppressed")),
        causal_effect=CausalEffect(
            promoted=values("effect_promoted"),
            suppressed=values("effect_suppressed"),
            contexts=row["effect_contexts"],
        ),
    )


@router.get(
    "/v1/saes/{sae:path}/latents",
    response_model=LatentSearchResponse,
    responses=_ERRORS,
    summary="Search an SAE's latents by the tokens they fire on / promote, or list them",
)
async def search_latents(
    sae: str,
    q: str | None = Query(
        None,
        max_length=MAX_QUERY_CHARS,
        description=f"words matched against the tokens a latent fires on most and the next tokens it "
        f"promotes (case-insensitive; an exact token scores above one containing the word; at most "
        f"{MAX_QUERY_WORDS} words); results ranked by score",
    ),
    sort: Sort = Query("max_activation", description="order without q"),
    order: Order = Query("desc", description="order without q"),
    min_density: float | None = Query(None, ge=0.0, le=1.0),
    max_density: float | None = Query(None, ge=0.0, le=1.0),
    include_dead: bool = Query(False, description="also list latents that never fired"),
    limit: int = Query(50, ge=1, le=MAX_LIMIT),
    adapter: AdapterParam = None,
    svc: Service = Depends(ready_service),
) -> LatentSearchResponse:
    covered = _covered(svc, sae, adapter)
    if min_density is not None and max_density is not None and min_density > max_density:
        raise ServiceError(
            422, "validation_error", f"min_density {min_density} is above max_density {max_density}"
        )
    try:
        words = query_words(q or "")
    except ValueError as exc:
        raise ServiceError(422, "validation_error", f"q: {exc}") from exc
    total, hits = await run_in_threadpool(
        lambda: covered.search.search(
            words,
            sort=sort,
            order=order,
            min_density=min_density,
            max_density=max_density,
            include_dead=include_dead,
            limit=limit,
        )
    )
    engine = svc.loaded().engine
    return LatentSearchResponse(sae=engine.names[covered.layer], adapter=adapter, total=total, latents=hits)
