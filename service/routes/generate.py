"""``POST /v1/generate``: generation with the SAEs spliced and latents steered, streamed or not.

The request (``lorasae_client.schemas.GenerateRequest``) becomes one batch of rows
(``lorasae.steering.RowSpec``): per prompt, the treatment (the adapter, the interventions) and in
``compare`` mode its control (unsteered, or the base model) plus a row that follows the
treatment's text under the control's model, for the per-step KL. ``service.generation`` runs it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from lorasae.steering import LatentIntervention, RowSpec
from lorasae_client.schemas import ErrorResponse, GenerateRequest, GenerateResponse

from ..deps import Service, ready_service
from ..engine import Engine
from ..errors import ServiceError, shown
from ..generation import Plan, Reported
from ..settings import Settings
from .features import spliced_layers, token_sequences

router = APIRouter(tags=["generate"])
log = logging.getLogger("lorasae.service")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (404, 409, 413, 422, 429, 503)
}


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    responses=_ERRORS,
    summary="Generate with SAEs spliced and latents steered (Server-Sent Events with stream: true)",
)
async def generate(req: GenerateRequest, request: Request, svc: Service = Depends(ready_service)) -> Response:
    engine, registry, _, generations = svc.loaded()
    settings = svc.settings
    layers, generation_of_adapter, warnings = spliced_layers(engine, registry, req.adapter, req.saes)
    interventions = _interventions(req, engine, layers)
    if req.compare and not interventions and req.adapter is None:
        raise ServiceError(
            422,
            "nothing_to_compare",
            "compare needs interventions (steered vs unsteered) or an adapter (vs base)",
        )
    _check_sizes(req, settings, len(layers))
    prompts = await token_sequences(req.prompt_list(), engine, settings)
    longest = max(len(p) for p in prompts)
    if longest + req.max_new_tokens > settings.max_tokens:
        raise ServiceError(
            413,
            "too_many_tokens",
            f"a prompt of {longest} tokens + {req.max_new_tokens} new tokens is over the limit of "
            f"{settings.max_tokens} tokens per sequence",
        )
    plan = _plan(req, engine, prompts, layers, interventions, generation_of_adapter)
    if len(plan.rows) > settings.max_batch:
        raise ServiceError(
            413,
            "too_many_rows",
            f"{len(prompts)} prompts x {len(plan.rows) // len(prompts)} rows each (compare runs 3) is "
            f"{len(plan.rows)} rows; the limit is {settings.max_batch}",
        )
    head = {"model": engine.model_id, "mode": req.mode, "saes": engine.sae_info(layers), "warnings": warnings}
    if not req.stream:
        async with generations.slot():
            async for kind, event in generations.run(plan, gone=request.is_disconnected):
                if kind == "done":
                    return Response(json.dumps({**head, **event}), media_type="application/json")
        raise AssertionError("a generation ends with its done event")
    generations.admit()  # a full queue is a 429 before the stream starts
    return StreamingResponse(
        _stream(generations, plan, head),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _stream(generations: Any, plan: Plan, head: dict[str, Any]) -> AsyncIterator[str]:
    """Server-Sent Events: ``token`` events, then ``done`` (the whole answer) or ``error``."""
    try:
        async with generations.slot():
            async for kind, event in generations.run(plan):
                body = {**head, **event} if kind == "done" else event
                yield f"event: {kind}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"
    except ServiceError as exc:
        error = {"error": {"code": exc.code, "message": exc.message, "status": exc.status}}
        yield f"event: error\ndata: {json.dumps(error)}\n\n"
    except Exception:  # the headers are sent: the error goes in the stream, the details in the log
        log.exception("generation failed mid-stream")
        error = {
            "error": {
                "code": "internal_error",
                "message": "the generation failed (see the server log)",
                "status": 500,
            }
        }
        yield f"event: error\ndata: {json.dumps(error)}\n\n"


def _interventions(
    req: GenerateRequest, engine: Engine, layers: tuple[int, ...]
) -> tuple[LatentIntervention, ...]:
    """The request's interventions on spliced SAEs (422 ``sae_not_spliced``) and existing latents
    (404 ``unknown_latent``)."""
    out = []
    for i, iv in enumerate(req.interventions):
        (layer,) = engine.select_layers([iv.sae])
        name, d_sae = engine.names[layer], engine.by_layer[layer].d_sae
        if layer not in layers:
            spliced = ", ".join(engine.names[x] for x in layers)
            raise ServiceError(
                422,
                "sae_not_spliced",
                f"interventions.{i}: SAE {name!r} is not spliced in this request (spliced: {spliced}); "
                "add it to saes",
            )
        if iv.latent >= d_sae:
            raise ServiceError(
                404,
                "unknown_latent",
                f"interventions.{i}: SAE {name!r} has no latent {shown(iv.latent)} (0..{d_sae - 1})",
            )
        out.append(LatentIntervention(layer, iv.latent, iv.op, float(iv.value), iv.positions))
    return tuple(out)


def _check_sizes(req: GenerateRequest, settings: Settings, saes: int) -> None:
    if req.max_new_tokens > settings.max_new_tokens:
        raise ServiceError(
            413,
            "too_many_new_tokens",
            f"max_new_tokens {req.max_new_tokens} is over the limit of {settings.max_new_tokens}",
        )
    if req.return_features:
        generations = len(req.prompt_list()) * (2 if req.compare else 1)
        entries = generations * req.max_new_tokens * req.return_features * saes
        if entries > settings.max_response_entries:
            raise ServiceError(
                413,
                "response_too_large",
                f"{entries} feature entries (prompts x generations x new tokens x return_features x SAEs) "
                f"is over the limit of {settings.max_response_entries}",
            )


def _plan(
    req: GenerateRequest,
    engine: Engine,
    prompts: list[list[int]],
    layers: tuple[int, ...],
    interventions: tuple[LatentIntervention, ...],
    adapter_generation: int,
) -> Plan:
    sample = {"temperature": req.temperature, "top_p": req.top_p, "seed": req.seed}
    rows: list[RowSpec] = []
    reported: list[Reported] = []
    for p, ids in enumerate(prompts):
        if interventions:
            treatment = ("steered", req.adapter, interventions)
            control = ("unsteered", req.adapter, ())
        else:
            treatment = ("adapter" if req.adapter else "base", req.adapter, ())
            control = ("base", None, ())
        if req.compare:
            for variant, adapter, ivs in (control, treatment):
                reported.append(Reported(len(rows), p, variant, adapter, bool(ivs), len(ids)))
                rows.append(RowSpec(list(ids), adapter, ivs, **sample))
            shadow = len(rows)
            rows.append(RowSpec(list(ids), control[1], control[2], follows=len(rows) - 1))
            reported[-1].control = shadow
        else:
            variant, adapter, ivs = treatment
            reported.append(Reported(len(rows), p, variant, adapter, bool(ivs), len(ids)))
            rows.append(RowSpec(list(ids), adapter, ivs, **sample))

    def check() -> None:
        if req.adapter is None:
            return
        slot = engine.adapters.get(req.adapter)
        if slot is None or slot.generation != adapter_generation:
            message = f"adapter {shown(req.adapter)} was deleted or replaced while generating"
            raise ServiceError(404, "unknown_adapter", message)

    return Plan(
        rows=rows,
        layers=layers,
        reported=reported,
        max_new_tokens=req.max_new_tokens,
        stop=list(req.stop),
        features_k=req.return_features,
        preserve_error=req.mode == "error-preserving",
        check=check,
    )
