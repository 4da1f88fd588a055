"""``/v1/adapters``: register (a folder under the adapter root, or an uploaded archive), list, get, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, status
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from lorasae_client.schemas import AdapterInfo, AdapterList, ErrorResponse, RegisterAdapterRequest

from ..deps import Service, ready_service, require_admin
from ..errors import ServiceError

router = APIRouter(tags=["adapters"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 409, 413, 415, 422, 503)
}
_REGISTER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": RegisterAdapterRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "file"],
                    "properties": {
                        "name": {"type": "string"},
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": ".tar.gz, .tar or .zip of the adapter folder",
                        },
                    },
                }
            },
        },
    }
}


@router.post(
    "/v1/adapters",
    status_code=status.HTTP_201_CREATED,
    response_model=AdapterInfo,
    responses=_ERRORS,
    openapi_extra=_REGISTER_BODY,
    dependencies=[Depends(require_admin)],
    summary="Register an adapter (JSON {name, path} or multipart {name, file})",
)
async def register_adapter(request: Request, svc: Service = Depends(ready_service)) -> AdapterInfo:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return AdapterInfo(**await _register_upload(request, svc))
    try:
        raw = await request.body()
        req = RegisterAdapterRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise _validation_error(exc) from exc
    return AdapterInfo(**await svc.loaded().registry.register_path(req.name, req.path))


async def _register_upload(request: Request, svc: Service) -> dict:
    # the body's size and pace are bounded before this (limits.EdgeMiddleware)
    async with request.form(max_files=1, max_fields=4) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ServiceError(422, "validation_error", "multipart upload needs a 'file' part (the archive)")
        try:
            name = RegisterAdapterRequest.model_validate(
                {"name": form.get("name"), "path": upload.filename or "upload"}
            ).name
        except ValidationError as exc:
            raise _validation_error(exc) from exc
        return await svc.loaded().registry.register_upload(name, upload.file, upload.filename or "")


def _validation_error(exc: ValidationError) -> ServiceError:
    parts = [f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()]
    return ServiceError(422, "validation_error", "; ".join(parts))


@router.get("/v1/adapters", response_model=AdapterList, responses=_ERRORS)
async def list_adapters(svc: Service = Depends(ready_service)) -> AdapterList:
    return AdapterList(adapters=[AdapterInfo(**info) for info in svc.loaded().registry.list()])


@router.get("/v1/adapters/{name}", response_model=AdapterInfo, responses=_ERRORS)
async def get_adapter(name: str, svc: Service = Depends(ready_service)) -> AdapterInfo:
    return AdapterInfo(**svc.loaded().registry.get(name))


@router.delete(
    "/v1/adapters/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_ERRORS,
    dependencies=[Depends(require_admin)],
)
async def delete_adapter(name: str, svc: Service = Depends(ready_service)) -> Response:
    await svc.loaded().registry.delete(name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
