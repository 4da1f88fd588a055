"""The client's ``drift()``: against an in-process server with synthetic drift reports (the typed
answer equals the JSON the server sends; errors are typed), and against scripted servers
(``httpx.MockTransport``) for the URL and query string sent, retries and the async twin;
``DriftReport.to_pandas()``."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl

import httpx
import numpy as np
import pytest
from drift_fixtures import default_dead, write_drift_report
from fastapi.testclient import TestClient
from service_fixtures import engine, settings, world  # noqa: F401

from lorasae.service.app import create_app
from lorasae_client import (
    AsyncLoraSaeClient,
    DriftLatent,
    DriftReport,
    LoraSaeClient,
    NotFoundError,
    UnprocessableEntityError,
)

KINDS = ("sync", "async")
D_SAE = 64


@pytest.fixture
def http(world, tmp_path, engine) -> Iterator[TestClient]:  # noqa: F811 - the imported fixtures
    """An in-process server with a1 vs base and a1 vs a12 reports; a1, a12, a2 registered."""
    folders = [
        write_drift_report(tmp_path / "drift-a1", engine, world.adapters / "a1"),
        write_drift_report(
            tmp_path / "drift-a1-a12", engine, world.adapters / "a1", reference=world.adapters / "a12", seed=1
        ),
    ]
    s = world.settings(tmp_path, drift=[str(f) for f in folders])
    with TestClient(create_app(s, engine), base_url="http://localhost") as test_client:
        for name in ("a1", "a12", "a2"):
            assert test_client.post("/v1/adapters", json={"name": name, "path": name}).status_code == 201
        yield test_client


@pytest.fixture
def api(http) -> LoraSaeClient:
    return LoraSaeClient(http_client=http)


# ------------------------------------------------------------------ a real (in-process) server


def test_drift_parses_what_the_server_sends(api, http):
    report = api.drift("a1")
    assert isinstance(report, DriftReport)
    assert report.model_dump() == http.get("/v1/adapters/a1/drift").json()
    assert (report.adapter, report.against, report.side, report.offset) == ("a1", None, "any", 0)
    assert [s.sae for s in report.saes] == ["sae1", "sae2"] and len(report.latents) == 50
    assert report.total == sum(1 for x in api.drift("a1", side="all", limit=500).latents if x.sides)
    page = api.drift("a1", against="a12", sae="sae2", side="output", limit=3, offset=1)
    params = {"against": "a12", "sae": "sae2", "side": "output", "limit": 3, "offset": 1}
    assert page.model_dump() == http.get("/v1/adapters/a1/drift", params=params).json()
    assert (page.against, page.side, page.offset, len(page.latents)) == ("a12", "output", 1, 3)
    assert all("output" in x.sides and x.sae == "sae2" for x in page.latents)
    whole = api.drift("a1", against="a12", sae="sae2", side="output", limit=500)
    assert page.latents == whole.latents[1:4] and page.total == whole.total


def test_drift_errors_are_typed(api):
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: api.drift("nope"), "unknown_adapter"),
        (lambda: api.drift("a1", against="nope"), "unknown_adapter"),
        (lambda: api.drift("a1", sae="nope"), "unknown_sae"),
        (lambda: api.drift("a2"), "no_drift"),
        (lambda: api.drift("a1", against="a2"), "no_drift"),
    ]
    for call_, code in cases:
        with pytest.raises(NotFoundError) as exc:
            call_()
        assert exc.value.status_code == 404 and exc.value.code == code
    with pytest.raises(NotFoundError, match="lorasae drift --adapter DIR --out DIR"):
        api.drift("a2")
    for kwargs in ({"limit": 0}, {"limit": 501}, {"offset": -1}, {"side": "both"}):
        with pytest.raises(UnprocessableEntityError) as unprocessable:
            api.drift("a1", **kwargs)
        assert unprocessable.value.code == "validation_error"


def test_to_pandas_one_row_per_latent(api):
    report = api.drift("a1", side="all", limit=500)
    df = report.to_pandas()
    assert list(df.columns) == list(DriftLatent.model_fields) and df.shape == (2 * D_SAE, len(df.columns))
    assert df["latent"].tolist() == [x.latent for x in report.latents]
    assert df["layer"].tolist() == [x.layer for x in report.latents]
    assert df["sides"].tolist() == ["+".join(x.sides) for x in report.latents]
    assert set(df["sides"]) <= {"", "input", "output", "input+output"}
    assert df["promoted_adapted"].tolist() == [[t.text for t in x.promoted_adapted] for x in report.latents]
    for name in ("score", "pearson", "effect_cosine", "density_reference"):
        assert df.dtypes[name] == np.float64
        values = [getattr(x, name) for x in report.latents]
        assert [None if math.isnan(v) else v for v in df[name]] == values, name
    dead = df[df["latent"].isin(default_dead(D_SAE))]
    assert len(dead) == 2 * len(default_dead(D_SAE))
    assert dead["score"].isna().all() and dead["pearson"].isna().all() and (dead["fired_adapted"] == 0).all()
    # the most drifted first, as the report lists them: scores fall, undefined last
    scores = df["score"].dropna().tolist()
    assert scores == sorted(scores, reverse=True) and df["score"].tail(len(dead)).isna().all()
    empty = api.drift("a1", offset=10_000).to_pandas()
    assert empty.shape == (0, len(df.columns)) and list(empty.columns) == list(df.columns)


# ------------------------------------------------------------------ scripted servers

REPORT: dict[str, Any] = {
    "adapter": "a b/c",
    "against": None,
    "corpus": "tiny",
    "split": "heldout",
    "tokens": 120,
    "created_at": "2025-01-02T00:00:00+00:00",
    "side": "any",
    "saes": [],
    "total": 0,
    "offset": 0,
    "latents": [],
    "future_field": "ignored",
}


class Server:
    """Answers with the given (status, body) steps in turn, then repeats the last; records requests."""

    def __init__(self, *steps: tuple[int, Any]) -> None:
        self.steps = steps
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, body = self.steps[min(len(self.requests), len(self.steps)) - 1]
        return httpx.Response(status, json=body)


def call(kind: str, server: Server, op: Callable[[Any], Any]) -> Any:
    transport = httpx.MockTransport(server)
    if kind == "sync":
        with LoraSaeClient("http://test", transport=transport, backoff=0.0) as client:
            return op(client)

    async def main() -> Any:
        async with AsyncLoraSaeClient("http://test", transport=transport, backoff=0.0) as client:
            return await op(client)

    return asyncio.run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_url_and_default_query(kind):
    server = Server((200, REPORT))
    report = call(kind, server, lambda c: c.drift("a b/c"))
    request = server.requests[0]
    assert request.method == "GET" and request.url.raw_path.split(b"?")[0] == b"/v1/adapters/a%20b%2Fc/drift"
    assert parse_qsl(request.url.query.decode()) == [("side", "any"), ("limit", "50"), ("offset", "0")]
    assert isinstance(report, DriftReport) and report.adapter == "a b/c" and report.latents == []


@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_is_sent(kind):
    server = Server((200, REPORT))
    call(
        kind,
        server,
        lambda c: c.drift("..", against="x&y=1", sae="release/id", side="all", limit=7, offset=9),
    )
    request = server.requests[0]
    assert request.url.raw_path.split(b"?")[0] == b"/v1/adapters/%2E%2E/drift"
    assert dict(parse_qsl(request.url.query.decode())) == {
        "against": "x&y=1",
        "sae": "release/id",
        "side": "all",
        "limit": "7",
        "offset": "9",
    }


@pytest.mark.parametrize("kind", KINDS)
def test_refusals_are_retried_and_not_found_is_final(kind):
    server = Server((503, {"error": {"code": "not_ready", "message": "loading"}}), (200, REPORT))
    assert call(kind, server, lambda c: c.drift("a1")).total == 0 and len(server.requests) == 2
    server = Server((404, {"error": {"code": "no_drift", "message": "no drift report compares ..."}}))
    with pytest.raises(NotFoundError) as exc:
        call(kind, server, lambda c: c.drift("a1"))
    assert exc.value.code == "no_drift" and len(server.requests) == 1
