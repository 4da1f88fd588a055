"""The service's one error type: an HTTP status, a machine-readable code and a message for people.

Every failure a client can cause ends as ``{"error": {"code", "message"}}`` with the right status
(``install_handlers`` puts the handlers on the app); a ``LorasaeError`` from the core maps to 400,
anything unexpected to a logged 500.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError

log = logging.getLogger("lorasae.service")


class ServiceError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def not_found(what: str, name: str) -> ServiceError:
    return ServiceError(404, f"unknown_{what}", f"no {what} named {shown(name)}")


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None):
    """The wire form of an error: ``{"error": {"code", "message"}}`` with ``status``."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: names echoed in messages stay short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def install_handlers(app: FastAPI) -> None:
    """Answer every exception that leaves a route in the wire form, with its status and code."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from lorasae.errors import LorasaeError

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError):
        return json_error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(LorasaeError)
    async def _lorasae_error(_request: Request, exc: LorasaeError):
        return json_error(400, "bad_request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError):
        return json_error(422, "validation_error", validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and isinstance(exc.__cause__, (ValueError, RecursionError)):
            # FastAPI's body parsing failed beyond a JSON syntax error (bytes that are not UTF-8,
            # nesting too deep): malformed JSON all the same, answered like any other (422)
            return json_error(
                422, "validation_error", f"body: not valid JSON ({type(exc.__cause__).__name__})"
            )
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return json_error(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        log.exception("unexpected error")
        return json_error(500, "internal_error", f"{type(exc).__name__} (see the server log)")


def validation_message(exc: RequestValidationError) -> str:
    """pydantic's validation errors in one short line: ``field.path: message; ...`` (at most 5)."""
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # pydantic reports every branch of a union; the first is enough to act on
        where = ".".join(x for x in loc if not x.startswith(("str", "list[", "function-")))
        parts.append(f"{where or 'body'}: {err.get('msg')}")
    seen = list(dict.fromkeys(parts))
    return "; ".join(seen[:5])
