"""The client's latent-dashboard calls (issue #13): ``latent``, ``search_latents`` and
``features(..., latents=)``, against scripted servers (``httpx.MockTransport``, no real server): the
URLs and query strings sent, parsing into the wire models, the tables, error mapping; each call for
the sync and async client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, quote

import httpx
import numpy as np
import pandas as pd
import pytest

from lorasae_client import (
    AsyncLoraSaeClient,
    FeaturesRequest,
    FeaturesResponse,
    LatentRecord,
    LatentSearchResponse,
    LoraSaeClient,
    NotFoundError,
    UnprocessableEntityError,
)

KINDS = ("sync", "async")
SAE = "gemma-scope-2b/layer_5/width_16k"  # a release/sae_id style id: slashes must not split the path


def _ctx(sequence: int, position: int, start: int, texts: list[str], acts: list[float],
         interval: str | None = None) -> dict[str, Any]:
    tokens = [{"id": 10 + i, "text": t, "activation": a} for i, (t, a) in enumerate(zip(texts, acts))]
    return {"sequence": sequence, "position": position, "activation": max(acts), "start": start,
            "tokens": tokens, "interval": interval}


RECORD = {
    "sae": SAE,
    "index": 123,
    "adapter": None,
    "dashboard": {"adapter": None, "corpus": "tiny", "split": "val", "tokens": 4096, "ctx": 64},
    "dead": False,
    "fired": 37,
    "density": 37 / 4096,
    "mean_activation": 1.5,
    "max_activation": 4.25,
    "histogram": {"edges": [1.0, 2.0, 4.0], "counts": [5, 10, 20, 2]},
    "top_contexts": [
        _ctx(3, 6, 5, [" the", " cat", " sat"], [0.0, 4.25, 0.5]),
        _ctx(9, 0, 0, ["<bos>", " dog"], [2.0, 0.0]),
    ],
    "quantile_contexts": [_ctx(1, 4, 2, [" a", " b", " c", " d"], [0.0, 0.0, 1.0, 0.0], "q0-25")],
    "logit_lens": {"promoted": [{"id": 5, "text": " mat", "value": 0.75}],
                   "suppressed": [{"id": 6, "text": " dog", "value": -0.5}]},
    "causal_effect": {"promoted": [{"id": 5, "text": " mat", "value": 0.125}], "suppressed": [],
                      "contexts": 16},
    "future_field": "ignored",  # the models ignore fields they do not know
}
SEARCH = {
    "sae": SAE,
    "adapter": "a1",
    "total": 2,
    "latents": [
        {"index": 123, "density": 0.01, "max_activation": 4.25, "dead": False,
         "top_tokens": [" cat", " cats"], "promoted": [" mat"], "score": 2.5},
        {"index": 7, "density": 0.0, "max_activation": 0.0, "dead": True},
    ],
}
SAES = [{"id": SAE, "layer": 5, "d_sae": 16384}, {"id": "blocks.2", "layer": 2, "d_sae": 64}]


def _token(position: int, text: str, latents: dict[str, dict[str, float]] | None) -> dict[str, Any]:
    return {"position": position, "id": 100 + position, "text": text, "loss": None,
            "features": {SAE: [{"index": 123, "activation": 4.0}]}, "recon_error": {SAE: 0.5},
            "latents": latents}


FEATURES = {
    "model": "tiny",
    "adapter": None,
    "saes": SAES,
    "results": [
        {"tokens": [_token(0, "<bos>", {SAE: {"123": 0.0, "7": 1.5}, "blocks.2": {"3": 2.0}}),
                    _token(1, " cat", {SAE: {"123": 4.0, "7": 0.0}, "blocks.2": {"3": 0.0}})]},
        {"tokens": [_token(0, "<bos>", {SAE: {"123": 0.25, "7": 0.0}, "blocks.2": {"3": 1.0}})]},
    ],
}


class Server:
    """A scripted server: answers with the given (status, json body) steps in turn, then repeats
    the last one; records the requests."""

    def __init__(self, *steps: tuple[int, Any] | type[Exception]) -> None:
        self.steps = steps
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps[min(len(self.requests), len(self.steps)) - 1]
        if isinstance(step, type):
            raise step("scripted failure", request=request)
        status, body = step
        return httpx.Response(status, json=body)

    def query(self, i: int = -1) -> list[tuple[str, str]]:
        return parse_qsl(self.requests[i].url.query.decode(), keep_blank_values=True)


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The delays the client asked to sleep (nothing actually sleeps)."""
    recorded: list[float] = []

    async def async_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(time, "sleep", recorded.append)
    monkeypatch.setattr(asyncio, "sleep", async_sleep)
    return recorded


def call(kind: str, server: Server, op: Callable[[Any], Any], **kwargs: Any) -> Any:
    """``op(client)`` on a sync or async client wired to ``server``; awaited for the async one."""
    transport = httpx.MockTransport(server)
    if kind == "sync":
        with LoraSaeClient("http://test", transport=transport, **kwargs) as api:
            return op(api)

    async def main() -> Any:
        async with AsyncLoraSaeClient("http://test", transport=transport, **kwargs) as api:
            return await op(api)
    return asyncio.run(main())


def _segment(value: str) -> str:
    return quote(value, safe="") if value not in (".", "..") else "%2E" * len(value)


# ------------------------------------------------------------------ client.latent


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sae", [SAE, "blocks.2.hook_resid_post", "a b#?x=1", "..", "ünï"])
def test_latent_url_is_quoted_and_record_parsed(kind, sae, sleeps):
    server = Server((200, RECORD))
    record = call(kind, server, lambda api: api.latent(sae, 123))
    request = server.requests[0]
    assert request.method == "GET"
    assert request.url.raw_path == f"/v1/saes/{_segment(sae)}/latents/123".encode()
    assert request.url.query == b"" and request.url.fragment == ""
    assert isinstance(record, LatentRecord)
    assert (record.sae, record.index, record.dead, record.fired) == (SAE, 123, False, 37)
    assert record.histogram.counts == [5, 10, 20, 2] and record.dashboard.split == "val"
    assert record.top_contexts[0].tokens[1].text == " cat"
    assert record.quantile_contexts[0].interval == "q0-25"
    assert record.logit_lens.promoted[0].value == 0.75 and record.causal_effect.contexts == 16
    assert sleeps == []


def test_slash_in_sae_id_is_one_segment():
    server = Server((200, RECORD))
    call("sync", server, lambda api: api.latent("release/sae_id", 5))
    assert server.requests[0].url.raw_path == b"/v1/saes/release%2Fsae_id/latents/5"


@pytest.mark.parametrize("kind", KINDS)
def test_latent_with_adapter_and_numpy_index(kind):
    server = Server((200, {**RECORD, "adapter": "a/1"}))
    record = call(kind, server, lambda api: api.latent(SAE, np.int64(123), adapter="a/1"))
    assert server.requests[0].url.raw_path.startswith(f"/v1/saes/{quote(SAE, safe='')}/latents/123?".encode())
    assert server.query() == [("adapter", "a/1")]
    assert record.adapter == "a/1"


@pytest.mark.parametrize("index", [True, 1.0, "1", None])
def test_latent_index_must_be_an_integer(index):
    server = Server((200, RECORD))
    with pytest.raises(TypeError):
        call("sync", server, lambda api: api.latent(SAE, index))
    assert server.requests == []


def test_latent_record_to_pandas():
    record = LatentRecord.model_validate(RECORD)
    df = record.to_pandas()
    assert list(df.columns) == ["kind", "interval", "sequence", "position", "activation", "text"]
    assert df.shape == (3, 6)
    assert df["kind"].tolist() == ["top", "top", "quantile"]
    assert df["sequence"].tolist() == [3, 9, 1] and df["position"].tolist() == [6, 0, 4]
    assert df["activation"].tolist() == [4.25, 2.0, 1.0]
    assert df["text"].tolist() == [" the[[ cat]] sat", "[[<bos>]] dog", " a b[[ c]] d"]
    assert df["interval"].tolist()[2] == "q0-25" and df["interval"].isna().tolist()[:2] == [True, True]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("code", ["unknown_sae", "unknown_latent", "no_dashboard", "unknown_adapter"])
def test_latent_404_is_not_found(kind, code, sleeps):
    server = Server((404, {"error": {"code": code, "message": f"nope: {code}"}}))
    with pytest.raises(NotFoundError) as exc:
        call(kind, server, lambda api: api.latent(SAE, 99999, adapter="a1"))
    assert exc.value.status_code == 404 and exc.value.code == code
    assert exc.value.message == f"nope: {code}" and code in str(exc.value)
    assert len(server.requests) == 1 and sleeps == []  # a 404 is final


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("failure", [(503, {"error": {"code": "loading", "message": "wait"}}),
                                     httpx.ReadTimeout, httpx.RemoteProtocolError])
def test_latent_gets_are_retried(kind, failure, sleeps):
    """GETs are idempotent: resent after a refusal and after any transport failure."""
    server = Server(failure, (200, RECORD))
    assert call(kind, server, lambda api: api.latent(SAE, 123)).index == 123
    server = Server(failure, (200, SEARCH))
    assert call(kind, server, lambda api: api.search_latents(SAE, "cat")).total == 2
    assert len(server.requests) == 2 and len(sleeps) == 2


# ------------------------------------------------------------------ client.search_latents


@pytest.mark.parametrize("kind", KINDS)
def test_search_latents_defaults(kind):
    server = Server((200, SEARCH))
    result = call(kind, server, lambda api: api.search_latents(SAE))
    request = server.requests[0]
    assert request.method == "GET"
    assert request.url.raw_path.split(b"?")[0] == f"/v1/saes/{quote(SAE, safe='')}/latents".encode()
    # None parameters (q, min_density, max_density, adapter) are not sent
    assert dict(server.query()) == {"sort": "max_activation", "order": "desc", "include_dead": "false",
                                    "limit": "50"}
    assert isinstance(result, LatentSearchResponse)
    assert (result.sae, result.adapter, result.total) == (SAE, "a1", 2)
    assert [h.index for h in result.latents] == [123, 7]
    assert result.latents[0].top_tokens == [" cat", " cats"] and result.latents[0].score == 2.5
    assert result.latents[1].top_tokens == [] and result.latents[1].score is None


@pytest.mark.parametrize("kind", KINDS)
def test_search_latents_all_parameters(kind):
    server = Server((200, SEARCH))
    call(kind, server, lambda api: api.search_latents(
        "release/sae", "cat & dog?#", sort="density", order="asc", min_density=1e-5, max_density=0.5,
        include_dead=True, limit=7, adapter="a 1"))
    request = server.requests[0]
    raw_path, raw_query = request.url.raw_path.split(b"?", 1)
    assert raw_path == b"/v1/saes/release%2Fsae/latents"
    assert b"#" not in raw_query and b"& dog" not in raw_query  # q stays one query value
    assert dict(server.query()) == {"q": "cat & dog?#", "sort": "density", "order": "asc",
                                    "min_density": "1e-05", "max_density": "0.5",
                                    "include_dead": "true", "limit": "7", "adapter": "a 1"}
    assert float(dict(server.query())["min_density"]) == 1e-5


def test_search_latents_zero_density_bounds_are_sent():
    """0.0 is a value, not an absent parameter."""
    server = Server((200, SEARCH))
    call("sync", server, lambda api: api.search_latents(SAE, "", min_density=0.0, max_density=0.0))
    query = dict(server.query())
    assert query["q"] == "" and query["min_density"] == "0.0" and query["max_density"] == "0.0"


@pytest.mark.parametrize("kind", KINDS)
def test_search_latents_errors(kind, sleeps):
    server = Server((404, {"error": {"code": "no_dashboard", "message": "no dashboard for it"}}))
    with pytest.raises(NotFoundError, match="no_dashboard"):
        call(kind, server, lambda api: api.search_latents(SAE, "cat"))
    server = Server((422, {"error": {"code": "invalid_request", "message": "sort: bad"}}))
    with pytest.raises(UnprocessableEntityError) as exc:
        call(kind, server, lambda api: api.search_latents(SAE, sort="nope"))
    assert exc.value.code == "invalid_request" and len(server.requests) == 1 and sleeps == []


def test_search_to_pandas():
    df = LatentSearchResponse.model_validate(SEARCH).to_pandas()
    assert list(df.columns) == ["latent", "density", "max_activation", "dead", "top_tokens", "promoted",
                                "score"]
    assert df.shape == (2, 7)
    assert df["latent"].tolist() == [123, 7] and df["dead"].tolist() == [False, True]
    assert df["top_tokens"].tolist() == [" cat  cats", ""] and df["promoted"].tolist() == [" mat", ""]
    assert df["score"].iloc[0] == 2.5 and pd.isna(df["score"].iloc[1])
    empty = LatentSearchResponse(sae=SAE, total=0, latents=[]).to_pandas()
    assert empty.shape == (0, 7) and list(empty.columns) == list(df.columns)


# ------------------------------------------------------------------ features(..., latents=)


@pytest.mark.parametrize("kind", KINDS)
def test_features_sends_latents(kind):
    server = Server((200, FEATURES))
    latents = {SAE: [123, np.int64(7)], "blocks.2": np.array([3])}
    response = call(kind, server, lambda api: api.features(["the cat", "a"], saes=[SAE, "blocks.2"],
                                                           latents=latents))
    request = server.requests[0]
    assert (request.method, request.url.path) == ("POST", "/v1/features")
    body = json.loads(request.content)
    assert body["latents"] == {SAE: [123, 7], "blocks.2": [3]}
    assert FeaturesRequest.model_validate(body).latents == {SAE: [123, 7], "blocks.2": [3]}
    assert isinstance(response, FeaturesResponse)
    assert response.results[0].tokens[1].latents == {SAE: {"123": 4.0, "7": 0.0}, "blocks.2": {"3": 0.0}}


@pytest.mark.parametrize("kind", KINDS)
def test_features_without_latents_leaves_the_field_out(kind):
    """A server from before latents= (its request model forbids unknown fields) still accepts it."""
    server = Server((200, {**FEATURES, "results": []}))
    call(kind, server, lambda api: api.features("the cat"))
    body = json.loads(server.requests[0].content)
    assert "latents" not in body
    assert set(body) == {"inputs", "adapter", "saes", "top_k", "logits", "logits_top_k"}


def test_features_latent_indices_must_be_integers():
    server = Server((200, FEATURES))
    with pytest.raises(TypeError):
        call("sync", server, lambda api: api.features("x", latents={SAE: [1.5]}))
    assert server.requests == []


def test_latents_frame():
    response = FeaturesResponse.model_validate(FEATURES)
    df = response.latents_frame()
    assert list(df.columns) == ["input", "position", "token_id", "token", "sae", "layer", "latent",
                                "activation"]
    assert df.shape == (9, 8)  # 3 tokens x 3 requested latents, zeros included
    assert df.dtypes["latent"] == np.int64 and df.dtypes["activation"] == np.float64
    assert df["input"].tolist() == [0] * 6 + [1] * 3
    assert df["position"].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert df["token"].tolist()[:4] == ["<bos>", "<bos>", "<bos>", " cat"]
    assert df["token_id"].tolist()[3] == 101
    assert df["sae"].tolist()[:3] == [SAE, SAE, "blocks.2"] and df["layer"].tolist()[:3] == [5, 5, 2]
    assert df["latent"].tolist()[:3] == [123, 7, 3]
    assert df["activation"].tolist() == [0.0, 1.5, 2.0, 4.0, 0.0, 0.0, 0.25, 0.0, 1.0]
    wide = df.pivot_table(index=["input", "position"], columns=["sae", "latent"], values="activation")
    assert wide.shape == (3, 3) and wide.loc[(0, 1), (SAE, 123)] == 4.0


def test_latents_frame_without_requested_latents_is_empty():
    response = FeaturesResponse.model_validate(
        {**FEATURES, "results": [{"tokens": [_token(0, "<bos>", None)]}]})
    df = response.latents_frame()
    assert df.shape == (0, 8) and df.dtypes["activation"] == np.float64
    assert list(df.columns) == ["input", "position", "token_id", "token", "sae", "layer", "latent",
                                "activation"]


def test_to_pandas_columns_are_unchanged_by_latents():
    df = FeaturesResponse.model_validate(FEATURES).to_pandas()
    assert list(df.columns) == ["input", "position", "token_id", "token", "loss", "sae", "layer", "latent",
                                "activation", "recon_error"]
    assert df.shape == (3, 10) and df["latent"].tolist() == [123] * 3
