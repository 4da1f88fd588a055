"""Resource bounds at the HTTP edge: which hosts are answered, how many bytes a body may have and
how long it may take to arrive, how long a client may take to send its headers.

Everything here runs before a route sees the request, so a hostile client costs at most a bounded
amount of memory and time: bodies are counted as they arrive (``Content-Length`` or chunked), a
body over its limit is answered 413 without being read further, a stalled body 408, and a
connection whose headers do not arrive within ``header_timeout_s`` is closed (uvicorn itself only
times out idle keep-alive connections).
"""

from __future__ import annotations

import asyncio
from typing import Any, TypedDict

from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import json_error
from .settings import Settings

UPLOAD_OVERHEAD = 1 << 20  # multipart framing and the name field around the archive
MAX_TARGET_BYTES = 8 * 1024  # path + query
MAX_HEADER_BYTES = 64 * 1024  # as h11_max_incomplete_event_size below
UPLOAD_ROUTE = "/v1/adapters"  # POST multipart: an archive; POST JSON: a path
# POST routes whose body is JSON: any other content type is refused (415), so that a web page
# cannot post to them cross-site as a "simple request" (text/plain, form encodings)
JSON_ROUTES = frozenset({"/v1/features", UPLOAD_ROUTE})


class _Refused(Exception):
    """The body broke a limit: the middleware answers with ``response`` instead of the app."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.response = json_error(status, code, message)


class _BodyState(TypedDict):
    read: int  # body bytes received so far
    done: bool  # the whole body is in
    refused: _Refused | None  # the limit it broke, once it broke one
    started: bool  # the app began its answer


def _header(scope: dict, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""


def host_allowed(host: str, patterns: list[str]) -> bool:
    """``host`` (a Host header, port included) against patterns: exact names, ``*``, ``*.domain``."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if not host:
        return False
    for pattern in patterns:
        pattern = pattern.lower()
        if pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


class EdgeMiddleware:
    """Host check, then body size and body time limits (pure ASGI: nothing is buffered here)."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.hosts = settings.trusted_hosts()
        self.max_body = settings.max_body_kb * 1024
        self.max_upload = int(settings.max_upload_mb * 2**20) + UPLOAD_OVERHEAD
        self.body_timeout = settings.body_timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        target = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
        if target > MAX_TARGET_BYTES:  # h11 bounds incomplete requests only; a whole one can be big
            return await json_error(414, "uri_too_long", f"request target over {MAX_TARGET_BYTES} bytes")(
                scope, receive, send
            )
        if sum(len(k) + len(v) for k, v in scope.get("headers", ())) > MAX_HEADER_BYTES:
            return await json_error(
                431, "headers_too_large", f"request headers over {MAX_HEADER_BYTES} bytes"
            )(scope, receive, send)
        if not host_allowed(_header(scope, b"host"), self.hosts):
            return await json_error(
                400,
                "invalid_host",
                "this server does not answer for that Host header (settings: allowed_hosts)",
            )(scope, receive, send)
        upload = _is_upload(scope)
        if scope["method"] == "POST" and scope["path"] in JSON_ROUTES and not upload:
            media = _header(scope, b"content-type").partition(";")[0].strip().lower()
            if media != "application/json" and not (
                media.startswith("application/") and media.endswith("+json")
            ):
                what = f"content type {media!r}" if media else "no content type"
                return await json_error(
                    415, "unsupported_media_type", f"{what}: this route takes 'application/json'"
                )(scope, receive, send)
        limit = self.max_upload if upload else self.max_body
        length = _header(scope, b"content-length")
        if length.isdigit() and int(length) > limit:
            return await _too_large(scope, limit).response(scope, receive, send)
        await self._guarded(scope, receive, send, limit)

    async def _guarded(self, scope: dict, receive: Any, send: Any, limit: int) -> None:
        state: _BodyState = {"read": 0, "done": False, "refused": None, "started": False}

        async def limited_receive() -> dict:
            if state["refused"] is not None:
                return {"type": "http.disconnect"}
            if state["done"]:  # the body is in: only a disconnect can come, waiting is fine
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                refusal = _Refused(
                    408, "request_timeout", f"the request body stalled for {self.body_timeout:g} s"
                )
                state["refused"] = refusal
                raise refusal from None
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                state["done"] = not message.get("more_body", False)
                if state["read"] > limit:
                    refusal = _too_large(scope, limit)
                    state["refused"] = refusal
                    raise refusal
            return message

        async def guarded_send(message: dict) -> None:
            if state["refused"] is not None:
                return  # the app's answer to a body it could not read is replaced by ours
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _Refused:
            pass
        refused = state["refused"]
        if refused is not None and not state["started"]:
            await refused.response(scope, limited_receive, send)


def _is_upload(scope: dict) -> bool:
    multipart = _header(scope, b"content-type").lower().startswith("multipart/form-data")
    return scope["method"] == "POST" and scope["path"] == UPLOAD_ROUTE and multipart


def _too_large(scope: dict, limit: int) -> _Refused:
    if _is_upload(scope):
        return _Refused(
            413,
            "upload_too_large",
            f"upload over the limit of {limit} bytes (max_upload_mb, plus the multipart framing)",
        )
    return _Refused(413, "request_too_large", f"request body over the limit of {limit} bytes (max_body_kb)")


def guarded_h11(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections that do not complete their request headers
    within ``header_timeout`` seconds (slowloris). Armed when a connection opens and whenever it
    waits for the next request; disarmed once a request's headers are parsed."""

    class GuardedH11Protocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _armed_cycle: Any = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._timer is not None and self.cycle is not self._armed_cycle:
                self._disarm()  # a new request's headers arrived

        def on_response_complete(self) -> None:
            super().on_response_complete()
            in_progress = self.cycle is not None and not self.cycle.response_complete
            if not self.transport.is_closing() and not in_progress:
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._armed_cycle = self.cycle
            self._timer = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            if self.cycle is self._armed_cycle and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_options(settings: Settings) -> dict:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` that bound connections and time."""
    return {
        "host": settings.host,
        "port": settings.port,
        "http": guarded_h11(settings.header_timeout_s),
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_s,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "backlog": 512,
        "server_header": False,
        "log_level": "info",
    }
