"""The service's one error type: an HTTP status, a machine-readable code and a message for people.

Every failure a client can cause ends as ``{"error": {"code", "message"}}`` with the right status
(see ``app.py`` for the handlers); a ``LorasaeError`` from the core maps to 400.
"""

from __future__ import annotations


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

    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=headers)


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: names echoed in messages stay short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"
