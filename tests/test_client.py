"""The Python client: typed responses and exceptions, retries, to_pandas, the async twin, and one
real ``lorasae serve`` (uvicorn) process on 127.0.0.1 driven over the network."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest
from service_fixtures import REPO, TEXTS, ServerProcess, client, engine, settings, world  # noqa: F401

from lorasae_client import (
    APIConnectionError,
    AsyncLoraSaeClient,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    FeaturesResponse,
    LoraSaeClient,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)


def test_client_without_torch():
    code = "import sys, lorasae_client; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_sync_client_in_process(client, settings):
    api = LoraSaeClient(http_client=client)
    info = api.register_adapter("a1", "a1")
    assert info.name == "a1" and info.rank == 4
    uploaded = api.register_adapter("up", upload=settings.adapter_root / "a2")  # a folder, packed
    assert uploaded.source == "upload" and uploaded.rank == 8
    assert [a.name for a in api.list_adapters()] == ["a1", "up"]
    assert api.get_adapter("up").target_modules == ["down_proj", "q_proj"]

    resp = api.features(TEXTS[:2], adapter="a1", top_k=3, logits="top_k", logits_top_k=2)
    assert isinstance(resp, FeaturesResponse) and resp.adapter == "a1"
    assert len(resp.results) == 2 and resp.results[0].tokens[1].features["sae1"][0].activation > 0

    df = resp.to_pandas()
    n_rows = sum(len(f) for r in resp.results for t in r.tokens for f in t.features.values())
    assert len(df) == n_rows
    assert list(df.columns) == ["input", "position", "token_id", "token", "loss", "sae", "layer",
                                "latent", "activation", "recon_error"]
    assert set(df["input"]) == {0, 1} and set(df["sae"]) == {"sae1"} and (df["activation"] > 0).all()

    with pytest.raises(NotFoundError) as exc:
        api.features("the cat", adapter="nope")
    assert exc.value.status_code == 404 and exc.value.code == "unknown_adapter"
    assert "nope" in exc.value.message
    with pytest.raises(ConflictError, match="already registered"):
        api.register_adapter("a1", "a1")
    with pytest.raises(ConflictError, match="fingerprint"):
        api.register_adapter("m", "mismatch")
    with pytest.raises(BadRequestError, match="outside the adapter root"):
        api.register_adapter("o", "../..")
    with pytest.raises(UnprocessableEntityError, match="empty text"):
        api.features("")
    with pytest.raises(PayloadTooLargeError):
        api.features([[1] * 5000])
    with pytest.raises(ValueError):
        api.register_adapter("x")  # neither path nor upload
    api.delete_adapter("up")
    with pytest.raises(NotFoundError):
        api.delete_adapter("up")


def test_auth_error_is_typed(world, tmp_path, engine, monkeypatch):
    from fastapi.testclient import TestClient

    from lorasae.service.app import create_app

    monkeypatch.setenv("TEST_LORASAE_KEY", "k3y")
    s = world.settings(tmp_path, api_key_env="TEST_LORASAE_KEY")
    with TestClient(create_app(s, engine), base_url="http://localhost") as c:
        with pytest.raises(AuthenticationError, match="API key"):
            LoraSaeClient(http_client=c, api_key="").register_adapter("a1", "a1")
        with pytest.raises(AuthenticationError, match="invalid"):
            LoraSaeClient(http_client=c, api_key="bad").register_adapter("a1", "a1")
        assert LoraSaeClient(http_client=c, api_key="k3y").register_adapter("a1", "a1").name == "a1"


def _flaky(statuses: list[int], calls: list):
    """A mock transport answering the given statuses in turn, then a valid empty adapter list."""
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) <= len(statuses):
            status = statuses[len(calls) - 1]
            return httpx.Response(status, headers={"Retry-After": "0"},
                                  json={"error": {"code": "busy", "message": f"busy {status}"}})
        return httpx.Response(200, json={"adapters": []})
    return handler


def test_retries_on_429_and_503():
    calls: list = []
    api = LoraSaeClient("http://x", transport=httpx.MockTransport(_flaky([429, 503, 429], calls)),
                        max_retries=3)
    assert api.list_adapters() == [] and len(calls) == 4
    calls.clear()
    api = LoraSaeClient("http://x", transport=httpx.MockTransport(_flaky([429] * 5, calls)),
                        max_retries=2)
    with pytest.raises(RateLimitError, match="busy 429") as exc:
        api.list_adapters()
    assert exc.value.status_code == 429 and len(calls) == 3
    calls.clear()
    api = LoraSaeClient("http://x", transport=httpx.MockTransport(_flaky([503] * 5, calls)),
                        max_retries=1)
    with pytest.raises(ServiceUnavailableError):
        api.list_adapters()


def test_connection_error_and_timeout_are_typed():
    def refuse(request):
        raise httpx.ConnectError("refused", request=request)
    api = LoraSaeClient("http://x", transport=httpx.MockTransport(refuse), max_retries=1, backoff=0.001)
    with pytest.raises(APIConnectionError, match="cannot reach"):
        api.features("the cat")


def test_async_client(world, tmp_path, engine):
    from lorasae.service.app import create_app

    s = world.settings(tmp_path)
    app = create_app(s, engine)

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with AsyncLoraSaeClient("http://localhost", transport=transport) as api:
                await api.register_adapter("a1", "a1")
                one, base = await asyncio.gather(api.features(TEXTS, adapter="a1"), api.features(TEXTS))
                with pytest.raises(NotFoundError):
                    await api.get_adapter("nope")
                health = await api.health()
                await api.delete_adapter("a1")
                return one, base, health, await api.list_adapters()

    one, base, health, left = asyncio.run(main())
    assert one.adapter == "a1" and base.adapter is None and len(one.results) == 3
    assert health.status == "ready" and health.adapters == 1 and left == []


def test_real_uvicorn_server(world, tmp_path):
    """`lorasae serve` in a subprocess on 127.0.0.1, driven by LoraSaeClient over TCP."""
    with ServerProcess(world, tmp_path, api_key="topsecret", LORASAE_MAX_WAIT_MS="3") as server, \
            LoraSaeClient(server.url, api_key="topsecret", timeout=30) as api:
        api.wait_ready(timeout=90)  # the client's own wait (with the key) on a server already up
        assert api.register_adapter("a1", "a1").name == "a1"
        assert api.register_adapter("up", upload=server.adapter_root / "a2").source == "upload"
        with LoraSaeClient(server.url) as anonymous:
            with pytest.raises(AuthenticationError):
                anonymous.delete_adapter("a1")
            resp = anonymous.features(TEXTS, adapter="up", top_k=4, logits="top_k")
        assert resp.adapter == "up" and len(resp.results) == 3
        assert len(resp.to_pandas()) > 0
        with pytest.raises(NotFoundError):
            api.features("the cat", adapter="nope")
        api.delete_adapter("a1")
        assert [a.name for a in api.list_adapters()] == ["up"]
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'route="/v1/features",status="200"' in metrics
    assert "topsecret" not in server.log_text()  # the key is never logged
