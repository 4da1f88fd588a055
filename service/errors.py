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
    return ServiceError(404, f"unknown_{what}", f"no {what} named {name!r}")
