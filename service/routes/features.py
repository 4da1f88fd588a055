"""``POST /v1/features``: per-token SAE features (optionally through a registered adapter)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from lorasae_client.schemas import ErrorResponse, FeaturesRequest, FeaturesResponse

from ..deps import Service, ready_service
from ..engine import AdapterSlot, Engine, Row, RowOutput
from ..errors import ServiceError, shown
from ..registry import Registry
from ..settings import Settings

router = APIRouter(tags=["features"])

MAX_LATENTS_PER_SAE = 256  # distinct latents ``latents=`` may name per SAE

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 408, 409, 413, 414, 415, 422, 429, 431, 503)
}


@router.post(
    "/v1/features",
    response_model=FeaturesResponse,
    responses=_ERRORS,
    summary="Per-token SAE features, losses and logits",
)
async def features(req: FeaturesRequest, svc: Service = Depends(ready_service)) -> Response:
    engine, registry, batcher, _ = svc.loaded()
    settings = svc.settings
    layers, generation, warnings = spliced_layers(engine, registry, req.adapter, req.saes)
    latents = requested_latents(req, engine, layers)
    sequences = await input_sequences(req, engine, settings)
    check_response_size(
        req,
        sum(len(ids) for ids in sequences),
        len(layers),
        engine.vocab_size,
        settings,
        latents=sum(len(indices) for indices in (latents or {}).values()),
    )
    rows = [
        Row(
            ids=list(ids),
            adapter=req.adapter,
            layers=layers,
            top_k=req.top_k,
            logits=req.logits,
            logits_top_k=req.logits_top_k,
            generation=generation,
            latents=latents,
        )
        for ids in sequences
    ]
    outputs = await batcher.submit(rows)
    # built off the event loop, so /healthz and other requests keep being answered meanwhile
    body = await run_in_threadpool(render_body, engine, req, layers, outputs, warnings)
    return Response(body, media_type="application/json")


def spliced_layers(
    engine: Engine, registry: Registry, adapter: str | None, saes: list[str] | None
) -> tuple[tuple[int, ...], int, list[dict]]:
    """The SAE layers a request splices (``saes``, else the adapter's trained set, else all), the
    adapter's registration generation (0 without one) and the ``splice_set_differs`` warning when
    the set is not the adapter's. 404 / 409 for an adapter that is unknown or not ready."""
    if adapter is None:
        return engine.select_layers(saes), 0, []
    registry.require_ready(adapter)
    slot = engine.adapters[adapter]
    layers = engine.select_layers(saes, slot.layers)
    warnings = [splice_set_warning(engine, adapter, slot, layers)] if layers != slot.layers else []
    return layers, slot.generation, warnings


def splice_set_warning(engine: Engine, adapter: str, slot: AdapterSlot, layers: tuple[int, ...]) -> dict:
    """The ``splice_set_differs`` warning: the request splices other SAEs than ``adapter`` was
    trained with; with the held-out CE its training measured for that subset, when it did."""

    def names(of: tuple[int, ...]) -> str:
        return "{" + ", ".join(engine.names[layer] for layer in of) + "}" if of else "{}"

    trained = slot.layers
    message = (
        f"adapter {adapter!r} was trained with the SAEs {names(trained)} spliced together; this request "
        f"splices {names(layers)}. An adapter used with part of its SAE set corrects for errors that "
        "are not there and can make CE worse than no adapter"
    )
    measured = slot.splice_sets.get(layers) if set(layers) < set(trained) else None
    if measured is not None and measured.get("ce_adapted_spliced") is not None:
        closed = measured.get("gap_closed")
        message += (
            f"; measured after training: CE {measured['ce_adapted_spliced']:.3f} with the adapter vs "
            f"{measured['ce_spliced']:.3f} without"
            + ("" if closed is None else f" ({closed:.0%} of this subset's gap closed)")
        )
    elif set(layers) - set(trained):
        message += "; SAEs outside its set were never seen in training"
    return {"code": "splice_set_differs", "message": message, "measured": measured}


def requested_latents(
    req: FeaturesRequest, engine: Engine, layers: tuple[int, ...]
) -> dict[int, tuple[int, ...]] | None:
    """``req.latents`` by layer, each SAE's distinct indices ascending (None: not requested).

    The SAEs are named like ``saes`` (404 ``unknown_sae``) and must be spliced in this request
    (422); indices must lie in ``0..d_sae-1`` (404 ``unknown_latent``), at most
    ``MAX_LATENTS_PER_SAE`` distinct ones per SAE (413)."""
    if req.latents is None:
        return None
    by_layer: dict[int, set[int]] = {}
    for selector, indices in req.latents.items():
        (layer,) = engine.select_layers([selector])
        if layer not in layers:
            spliced = ", ".join(engine.names[x] for x in layers)
            raise ServiceError(
                422,
                "sae_not_spliced",
                f"latents: SAE {engine.names[layer]!r} is not spliced in this request "
                f"(spliced: {spliced}); add it to saes",
            )
        by_layer.setdefault(layer, set()).update(indices)
    out = {}
    for layer, wanted in sorted(by_layer.items()):
        name, d_sae = engine.names[layer], engine.by_layer[layer].d_sae
        if len(wanted) > MAX_LATENTS_PER_SAE:
            raise ServiceError(
                413,
                "too_many_latents",
                f"latents: {len(wanted)} distinct latents of SAE {name!r}; "
                f"the limit is {MAX_LATENTS_PER_SAE} per SAE",
            )
        bad = next((i for i in sorted(wanted) if not 0 <= i < d_sae), None)
        if bad is not None:
            raise ServiceError(
                404, "unknown_latent", f"latents: SAE {name!r} has no latent {shown(bad)} (0..{d_sae - 1})"
            )
        out[layer] = tuple(sorted(wanted))
    return out


async def input_sequences(req: FeaturesRequest, engine: Engine, settings: Settings) -> list[list[int]]:
    """The request's inputs as token sequences (``token_sequences``)."""
    return await token_sequences(req.input_list(), engine, settings)


async def token_sequences(
    inputs: list[str] | list[list[int]], engine: Engine, settings: Settings
) -> list[list[int]]:
    """Inputs (all texts or all id lists) as token sequences, each checked against the limits and
    the vocabulary: 413 past ``max_inputs`` / ``max_tokens``, 422 for text that is not valid Unicode
    or an id outside the vocabulary. Texts are tokenised off the event loop."""
    if len(inputs) > settings.max_inputs:
        raise ServiceError(
            413, "too_many_inputs", f"{len(inputs)} inputs in one request; the limit is {settings.max_inputs}"
        )
    if isinstance(inputs[0], str):
        texts = [x for x in inputs if isinstance(x, str)]  # all texts or all id lists (the schema)
        check_texts(texts, settings)
        sequences = await run_in_threadpool(lambda: [engine.tokenize(text) for text in texts])
    else:
        sequences = [x for x in inputs if isinstance(x, list)]
    check_token_ids(sequences, engine.vocab_size, settings)
    return sequences


def check_texts(texts: list[str], settings: Settings) -> None:
    """Refuse texts no tokenizer should see: far over the token limit (413, judged by length
    before tokenising) or carrying lone surrogates (422)."""
    longest = max(len(text) for text in texts)
    if longest > settings.max_tokens * 64:  # clearly over the token limit: do not even tokenise
        raise ServiceError(
            413,
            "too_many_tokens",
            f"a text of {longest} characters is over the limit of {settings.max_tokens} tokens",
        )
    for i, text in enumerate(texts):
        try:  # JSON escapes (and raw bytes) can carry lone surrogates, which no tokenizer takes
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ServiceError(
                422,
                "validation_error",
                f"inputs.{i}: not valid Unicode text ({exc.reason} at character {exc.start})",
            ) from exc


def check_token_ids(sequences: list[list[int]], vocab_size: int, settings: Settings) -> None:
    """Each sequence at most ``max_tokens`` long (413) and every id in ``[0, vocab_size)`` (422)."""
    for i, ids in enumerate(sequences):
        if len(ids) > settings.max_tokens:
            raise ServiceError(
                413, "too_many_tokens", f"input {i} has {len(ids)} tokens; the limit is {settings.max_tokens}"
            )
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ServiceError(
                422,
                "invalid_token_id",
                f"input {i}: token id {bad} is outside the vocabulary [0, {vocab_size})",
            )


def check_response_size(
    req: FeaturesRequest, tokens: int, saes: int, vocab: int, settings: Settings, latents: int = 0
) -> None:
    """Refuse (413) a request whose answer would exceed the documented bounds: per token
    ``top_k`` latents for each SAE plus ``logits_top_k`` logits plus the ``latents`` the request
    names (``max_response_entries`` in all), and with ``logits="full"`` a whole vocabulary row
    (``max_full_logits`` in all)."""
    if req.logits == "full" and tokens * vocab > settings.max_full_logits:
        raise ServiceError(
            413,
            "too_many_logits",
            f"logits='full' for {tokens} tokens x {vocab} vocabulary entries "
            f"exceeds the limit of {settings.max_full_logits} values; use 'top_k'",
        )
    per_token = req.top_k * saes + (req.logits_top_k if req.logits == "top_k" else 0) + latents
    if tokens * per_token > settings.max_response_entries:
        raise ServiceError(
            413,
            "response_too_large",
            f"{tokens} tokens x {per_token} entries (top_k x {saes} SAEs + logits + {latents} "
            f"named latents) is over the limit of {settings.max_response_entries} entries per "
            "request; send fewer tokens, a smaller top_k / logits_top_k or fewer latents",
        )


def render_body(
    engine: Engine,
    req: FeaturesRequest,
    layers: tuple[int, ...],
    outputs: list[RowOutput],
    warnings: list[dict] | None = None,
) -> str:
    """The JSON answer (see ``lorasae_client.schemas.FeaturesResponse``); ``warnings`` only when any."""
    body: dict[str, Any] = {
        "model": engine.model_id,
        "adapter": req.adapter,
        "saes": engine.sae_info(layers),
        "results": [{"tokens": render_tokens(engine, out)} for out in outputs],
    }
    if warnings:
        body["warnings"] = warnings
    return json.dumps(body, separators=(",", ":"))


def render_tokens(engine: Engine, out: RowOutput) -> list[dict]:
    """The wire form of one row (see ``lorasae_client.schemas.TokenResult``)."""
    names = engine.names
    tokens = []
    n = len(out.ids)
    for t, token_id in enumerate(out.ids):
        features = {}
        for layer, (indices, values) in out.features.items():
            features[names[layer]] = [
                {"index": i, "activation": v} for i, v in zip(indices[t], values[t]) if v != 0.0
            ]
        token = {
            "position": t,
            "id": token_id,
            "text": engine.piece(token_id),
            "loss": out.loss[t] if t < n - 1 else None,
            "features": features,
            "recon_error": {names[layer]: err[t] for layer, err in out.recon_error.items()},
        }
        if out.top_logits is not None:
            ids, logits, logprobs = out.top_logits
            token["top_logits"] = [
                {"id": i, "text": engine.piece(i), "logit": lg, "logprob": lp}
                for i, lg, lp in zip(ids[t], logits[t], logprobs[t])
            ]
        if out.full_logits is not None:
            token["logits"] = out.full_logits[t]
        if out.latents is not None:
            token["latents"] = {
                names[layer]: {str(i): v for i, v in zip(indices, values[t])}
                for layer, (indices, values) in out.latents.items()
            }
        tokens.append(token)
    return tokens
