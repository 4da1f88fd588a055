"""``/healthz`` (the process is up), ``/readyz`` (model loaded, registry restored), ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from lorasae_client.schemas import HealthResponse

from ..deps import Service, get_service
from ..metrics import CONTENT_TYPE_LATEST

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def readyz(svc: Service = Depends(get_service)):
    if not svc.ready.is_set():
        body = HealthResponse(status="error" if svc.error else "loading", detail=svc.error)
        return JSONResponse(
            body.model_dump(), status_code=503, headers={"Retry-After": str(svc.settings.retry_after_s)}
        )
    engine, registry, *_ = svc.loaded()
    return HealthResponse(
        status="ready", model=engine.model_id, saes=engine.sae_info(), adapters=len(registry.list())
    )


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (text format)")
async def metrics(svc: Service = Depends(get_service)) -> Response:
    if svc.batcher is not None:
        svc.metrics.queue_depth.set(svc.batcher.depth)
    if svc.engine is not None:
        svc.metrics.observe_residency(svc.engine.residency.snapshot())
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)
