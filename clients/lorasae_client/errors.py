"""Typed exceptions: one per HTTP status the server uses, each carrying the server's message."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx


class LoraSaeError(Exception):
    """Base class of every error the client raises."""


class LoraSaeWarning(UserWarning):
    """A server answer carried a warning (``FeaturesResponse.warnings``): the answer is what was asked,
    but maybe not what was meant (e.g. an adapter used with part of the SAE set it was trained with)."""


class APIConnectionError(LoraSaeError):
    """The server could not be reached (after the retries)."""


class APITimeoutError(APIConnectionError):
    """The request timed out."""


class APIStatusError(LoraSaeError):
    """The server answered with an error status; ``code`` and ``message`` come from its JSON body."""

    status_code: int = 0

    def __init__(
        self, message: str, *, status_code: int, code: str = "", response: httpx.Response | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.response = response

    def __str__(self) -> str:
        return (
            f"{self.status_code} {self.code}: {self.message}"
            if self.code
            else f"{self.status_code}: {self.message}"
        )


class BadRequestError(APIStatusError):
    """400: e.g. a path outside the adapter root, a corrupt adapter."""


class AuthenticationError(APIStatusError):
    """401: missing or wrong API key."""


class NotFoundError(APIStatusError):
    """404: unknown adapter or SAE."""


class ConflictError(APIStatusError):
    """409: duplicate adapter name, adapter that does not match the loaded model/SAEs."""


class PayloadTooLargeError(APIStatusError):
    """413: too many tokens or inputs, upload too large."""


class UnprocessableEntityError(APIStatusError):
    """422: the request does not validate (wrong types, empty text, ...)."""


class RateLimitError(APIStatusError):
    """429: the server's queue is full (retried automatically first)."""


class ServiceUnavailableError(APIStatusError):
    """503: the server is loading or stopping (retried automatically first)."""


class InternalServerError(APIStatusError):
    """5xx other than 503."""


_BY_STATUS = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_for_status(status: int) -> type[APIStatusError]:
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return InternalServerError if status >= 500 else APIStatusError
