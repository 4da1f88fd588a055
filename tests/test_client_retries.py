"""The client's URL quoting, Retry-After handling and retry rule, against scripted servers
(``httpx.MockTransport``, no real server) and recorded sleeps; each case for the sync and async client."""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from lorasae_client import (
    AdapterInfo,
    APIConnectionError,
    APITimeoutError,
    AsyncLoraSaeClient,
    FeaturesResponse,
    LoraSaeClient,
    LoraSaeError,
    RateLimitError,
)

KINDS = ("sync", "async")
BACKOFF, MAX_BACKOFF = 0.25, 5.0
ADAPTER = {"name": "a1", "base_model": "tiny", "saes": [], "created_at": "2024-01-01T00:00:00Z"}
FEATURES = {"model": "tiny", "saes": [], "results": []}

# a script step: an exception class to raise, or (status, headers, json body) to answer
Step = type[Exception] | tuple[int, dict[str, str], Any]


class Server:
    """A scripted server: answers (or fails) with the given steps in turn, then repeats the last."""

    def __init__(self, *steps: Step) -> None:
        self.steps = steps
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps[min(len(self.requests), len(self.steps)) - 1]
        if isinstance(step, type):
            raise step("scripted failure", request=request)
        status, headers, body = step
        return httpx.Response(status, headers=headers, json=body)


def busy(status: int = 503, retry_after: str | None = "0") -> tuple[int, dict[str, str], Any]:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    return status, headers, {"error": {"code": "busy", "message": f"busy {status}"}}


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The delays the client asked to sleep, in order (nothing actually sleeps)."""
    recorded: list[float] = []

    async def async_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(time, "sleep", recorded.append)
    monkeypatch.setattr(asyncio, "sleep", async_sleep)
    return recorded


def call(kind: str, server: Server, op: Callable[[Any], Any], **client_kwargs: Any) -> Any:
    """``op(client)`` on a sync or async client wired to ``server``; awaited for the async one."""
    client_kwargs = {"backoff": BACKOFF, "max_backoff": MAX_BACKOFF, **client_kwargs}
    transport = httpx.MockTransport(server)
    if kind == "sync":
        with LoraSaeClient("http://test", transport=transport, **client_kwargs) as api:
            return op(api)

    async def main() -> Any:
        async with AsyncLoraSaeClient("http://test", transport=transport, **client_kwargs) as api:
            return await op(api)
    return asyncio.run(main())


# ------------------------------------------------------------------ adapter names in URL paths

NAMES = ["a1#x", "../x", "..", ".", "a b", "50%", "100%2F", "a?b=1", "a/b", "a;b", "ünï-côdé", "日本"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_adapter_names_are_one_quoted_path_segment(kind, name, sleeps):
    server = Server((200, {}, ADAPTER), (204, {}, None))
    call(kind, server, lambda api: api.get_adapter(name))
    call(kind, server, lambda api: api.delete_adapter(name))
    segment = quote(name, safe="") if name not in (".", "..") else "%2E" * len(name)
    assert [(r.method, r.url.raw_path) for r in server.requests] == [
        ("GET", b"/v1/adapters/" + segment.encode()), ("DELETE", b"/v1/adapters/" + segment.encode())]
    assert all(r.url.fragment == "" and r.url.query == b"" for r in server.requests)


# ------------------------------------------------------------------ Retry-After


def _http_date(offset_s: float) -> str:
    return email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=offset_s),
                                       usegmt=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("retry_after, expected", [
    ("2", (2.0, 2.0)),
    ("0", (0.0, 0.0)),
    ("-5", (0.0, 0.0)),
    ("1e308", (MAX_BACKOFF, MAX_BACKOFF)),
    ("past-date", (0.0, 0.0)),
    ("future-date", (1.0, 3.0)),
    # unusable: the jittered exponential backoff of the first retry, backoff * [0.5, 1.5)
    ("nan", (BACKOFF * 0.5, BACKOFF * 1.5)),
    ("inf", (BACKOFF * 0.5, BACKOFF * 1.5)),
    ("-inf", (BACKOFF * 0.5, BACKOFF * 1.5)),
    ("abc", (BACKOFF * 0.5, BACKOFF * 1.5)),
    ("", (BACKOFF * 0.5, BACKOFF * 1.5)),
    (None, (BACKOFF * 0.5, BACKOFF * 1.5)),
])
def test_retry_after_is_parsed_and_clamped(kind, retry_after, expected, sleeps):
    value = {"past-date": _http_date(-3600), "future-date": _http_date(3)}.get(retry_after, retry_after)
    server = Server(busy(503, value), (200, {}, {"adapters": []}))
    assert call(kind, server, lambda api: api.list_adapters()) == []
    assert len(server.requests) == 2 and len(sleeps) == 1
    delay = sleeps[0]
    assert isinstance(delay, float) and math.isfinite(delay) and 0.0 <= delay <= MAX_BACKOFF
    assert expected[0] <= delay <= expected[1], (retry_after, delay)


@pytest.mark.parametrize("kind", KINDS)
def test_total_sleep_is_bounded(kind, sleeps):
    server = Server(busy(429, "1e308"))
    with pytest.raises(RateLimitError, match="busy 429"):
        call(kind, server, lambda api: api.list_adapters(), max_retries=3)
    assert len(server.requests) == 4 and sleeps == [MAX_BACKOFF] * 3


@pytest.mark.parametrize("kind", KINDS)
def test_exponential_backoff_is_capped(kind, sleeps):
    server = Server(httpx.ConnectError)
    with pytest.raises(APIConnectionError, match="cannot reach"):
        call(kind, server, lambda api: api.list_adapters(), max_retries=12, backoff=1.0)
    assert len(server.requests) == 13 and len(sleeps) == 12
    assert all(0.0 <= s <= MAX_BACKOFF for s in sleeps) and sleeps[-1] == MAX_BACKOFF


# ------------------------------------------------------------------ what is resent after what


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("error, raised", [
    (httpx.ReadTimeout, APITimeoutError),
    (httpx.WriteTimeout, APITimeoutError),
    (httpx.ReadError, APIConnectionError),
    (httpx.RemoteProtocolError, APIConnectionError),
])
@pytest.mark.parametrize("source", ["path", "upload"])
def test_registration_is_not_resent_once_it_may_have_reached_the_server(kind, error, raised, source,
                                                                       sleeps):
    server = Server(error, (201, {}, ADAPTER))
    args = {"path": "a1"} if source == "path" else {"upload": b"not really a tar.gz"}
    with pytest.raises(raised) as exc:
        call(kind, server, lambda api: api.register_adapter("a1", **args))
    assert type(exc.value) is raised and isinstance(exc.value.__cause__, error)
    assert "may have been carried out" in str(exc.value)
    assert "GET /v1/adapters/a1" in str(exc.value)
    assert len(server.requests) == 1 and sleeps == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout])
def test_registration_is_resent_when_it_never_reached_the_server(kind, error, sleeps):
    server = Server(error, (201, {}, ADAPTER))
    info = call(kind, server, lambda api: api.register_adapter("a1", "a1"))
    assert isinstance(info, AdapterInfo) and info.name == "a1"
    assert len(server.requests) == 2 and len(sleeps) == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [429, 503])
def test_registration_is_resent_after_a_refusal(kind, status, sleeps):
    server = Server(busy(status, "1"), (201, {}, ADAPTER))
    assert call(kind, server, lambda api: api.register_adapter("a1", "a1")).name == "a1"
    assert len(server.requests) == 2 and sleeps == [1.0]


@pytest.mark.parametrize("kind", KINDS)
def test_registration_connect_failure_message_has_no_hint(kind, sleeps):
    server = Server(httpx.ConnectError)
    with pytest.raises(APIConnectionError, match="cannot reach") as exc:
        call(kind, server, lambda api: api.register_adapter("a1", "a1"), max_retries=1)
    assert "may have been carried out" not in str(exc.value) and len(server.requests) == 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("error", [httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError])
def test_idempotent_requests_are_resent_after_any_transport_error(kind, error, sleeps):
    server = Server(error, (200, {}, FEATURES))
    resp = call(kind, server, lambda api: api.features("the cat"))
    assert isinstance(resp, FeaturesResponse)
    assert [r.url.path for r in server.requests] == ["/v1/features"] * 2 and len(sleeps) == 1

    server = Server(error, (204, {}, None))
    call(kind, server, lambda api: api.delete_adapter("a1"))
    assert [r.method for r in server.requests] == ["DELETE"] * 2


@pytest.mark.parametrize("kind", KINDS)
def test_idempotent_timeout_is_typed_after_the_retries(kind, sleeps):
    server = Server(httpx.ReadTimeout)
    with pytest.raises(APITimeoutError, match="timed out") as exc:
        call(kind, server, lambda api: api.features("the cat"), max_retries=2)
    assert "may have been carried out" not in str(exc.value)
    assert len(server.requests) == 3 and len(sleeps) == 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("failure", [busy(503), busy(429), httpx.ConnectError, httpx.ReadTimeout])
def test_max_retries_zero_is_one_attempt(kind, failure, sleeps):
    server = Server(failure, (200, {}, {"adapters": []}))
    with pytest.raises(LoraSaeError):
        call(kind, server, lambda api: api.list_adapters(), max_retries=0)
    assert len(server.requests) == 1 and sleeps == []


@pytest.mark.parametrize("kind", KINDS)
def test_http_client_answers_need_not_be_httpx_responses(kind, sleeps):
    """An httpx-compatible ``http_client`` (Starlette's TestClient may be built on another httpx
    distribution) answers with its own response class: a 200 from it is final, not retried."""
    calls: list[str] = []

    def answer(method: str, path: str, **kwargs: Any) -> SimpleNamespace:
        calls.append(f"{method} {path}")
        return SimpleNamespace(status_code=200, headers={}, content=b'{"adapters": []}')

    async def answer_async(method: str, path: str, **kwargs: Any) -> SimpleNamespace:
        return answer(method, path, **kwargs)

    if kind == "sync":
        result = LoraSaeClient(http_client=SimpleNamespace(request=answer)).list_adapters()
    else:
        api = AsyncLoraSaeClient(http_client=SimpleNamespace(request=answer_async))
        result = asyncio.run(api.list_adapters())
    assert result == [] and calls == ["GET /v1/adapters"] and sleeps == []
