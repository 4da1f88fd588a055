"""The client names the adapter a request uses in Ray Serve's multiplexed-model header
(``serve_multiplexed_model_id``), so `lorasae serve --ray` routes it to a replica holding that
adapter; requests without an adapter carry no such header."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from lorasae_client import AsyncLoraSaeClient, LoraSaeClient, NotFoundError
from lorasae_client.client import MULTIPLEX_HEADER


def _recorder(seen: list[tuple[str, str | None]]):
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get(MULTIPLEX_HEADER)))
        return httpx.Response(404, json={"error": {"code": "unknown_adapter", "message": "no"}})
    return handler


def _calls(api: LoraSaeClient):
    yield lambda: api.features("the cat", adapter="a1")
    yield lambda: api.features("the cat")
    yield lambda: api.generate("the cat", adapter="a1", max_new_tokens=1)
    yield lambda: list(api.stream("the cat", adapter="a1", max_new_tokens=1))
    yield lambda: api.latent("sae1", 3, adapter="a1")
    yield lambda: api.search_latents("sae1", adapter="a1")
    yield lambda: api.drift("a1")
    yield lambda: api.get_adapter("a1")  # an admin read: no routing hint


def test_sync_client_sends_the_adapter_as_multiplexed_model_id():
    seen: list = []
    api = LoraSaeClient("http://x", transport=httpx.MockTransport(_recorder(seen)), max_retries=0)
    for call in _calls(api):
        with pytest.raises(NotFoundError):
            call()
    assert [header for _, header in seen] == ["a1", None, "a1", "a1", "a1", "a1", "a1", None]


def test_async_client_sends_the_adapter_as_multiplexed_model_id():
    seen: list = []

    async def run() -> None:
        api = AsyncLoraSaeClient("http://x", transport=httpx.MockTransport(_recorder(seen)), max_retries=0)
        for call in (lambda: api.features("the cat", adapter="a1"), lambda: api.features("the cat"),
                     lambda: api.generate("the cat", adapter="a1", max_new_tokens=1),
                     lambda: api.drift("a1")):
            with pytest.raises(NotFoundError):
                await call()
        with pytest.raises(NotFoundError):
            async with api.stream("the cat", adapter="a1", max_new_tokens=1) as events:
                async for _ in events:
                    pass
        await api.aclose()

    asyncio.run(run())
    assert [header for _, header in seen] == ["a1", None, "a1", "a1", "a1"]
