"""The client's ``generate()`` and ``stream()`` (``POST /v1/generate``): against an in-process server
over the tiny world (the typed answer equals the JSON the server sends; the streamed events agree
with the final answer and with ``generate``; errors and warnings are typed), against scripted servers
(``httpx.MockTransport``: the body sent, the SSE parsing rules, ``error`` events, retries before the
stream starts, a stream cut short), and against a real ``lorasae serve`` process with one generation
slot and no queue: leaving a stream early (``break``, ``with``, ``close()``, ``async with``) closes
the response and frees the slot, so the next generation runs instead of getting 429."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from service_fixtures import ServerProcess, client, engine, register, settings, wait_until, world  # noqa: F401

from lorasae_client import (
    APIConnectionError,
    AsyncLoraSaeClient,
    GenerateResponse,
    GenerationStream,
    InternalServerError,
    Intervention,
    LoraSaeClient,
    LoraSaeWarning,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    TokenEvent,
    UnprocessableEntityError,
)

PROMPT = "the cat sat on the"
STEER = {"sae": "sae2", "latent": 3, "op": "set", "value": 6.0}
KINDS = ("sync", "async")


@pytest.fixture
def api(client) -> LoraSaeClient:  # noqa: F811 - the imported fixture
    return LoraSaeClient(http_client=client)


def _without_timing(body: dict[str, Any]) -> dict[str, Any]:
    """An answer without the wall-clock fields of its usage (two runs differ only there)."""
    usage = {k: v for k, v in body["usage"].items() if k not in ("seconds", "tokens_per_second")}
    return {**body, "usage": usage}


def _by_generation(events: list[TokenEvent]) -> dict[int, list[TokenEvent]]:
    out: dict[int, list[TokenEvent]] = {}
    for event in events:
        out.setdefault(event.generation, []).append(event)
    return out


# ------------------------------------------------------------------ a real (in-process) server


def test_generate_parses_what_the_server_sends(api, client):  # noqa: F811
    body = {"prompt": PROMPT, "max_new_tokens": 5, "interventions": [STEER], "compare": True}
    raw = client.post("/v1/generate", json=body)
    assert raw.status_code == 200, raw.text
    answer = api.generate(PROMPT, max_new_tokens=5, interventions=[STEER], compare=True)
    assert isinstance(answer, GenerateResponse)
    sent = raw.json()
    assert _without_timing(answer.model_dump()) == _without_timing(
        GenerateResponse.model_validate(sent).model_dump()
    )
    assert [[t.id for t in g.tokens] for g in answer.generations] == [
        [t["id"] for t in g["tokens"]] for g in sent["generations"]
    ]
    assert [g.kl for g in answer.generations] == [g["kl"] for g in sent["generations"]]
    control, treatment = answer.generations
    assert (control.variant, treatment.variant) == ("unsteered", "steered")
    assert control.kl is None and len(treatment.kl) == len(treatment.tokens) == 5
    assert [t.id for t in control.tokens] != [t.id for t in treatment.tokens]  # the steering bites
    frame = answer.to_pandas()
    assert frame.shape == (10, 6) and frame["token_id"].tolist() == [
        t.id for g in answer.generations for t in g.tokens
    ]
    # the same request written with an Intervention, numpy numbers and token ids: the same answer
    ids = np.array(client.app.state.service.engine.tokenize(PROMPT), dtype=np.int64)
    steer = Intervention(sae="sae2", latent=3, op="set", value=6.0)
    again = api.generate(ids, max_new_tokens=5, interventions=[steer], compare=True)
    assert again.generations == answer.generations
    numpy_dict = {**STEER, "latent": np.int64(3), "value": np.float32(6.0)}
    (alone,) = api.generate(list(ids), max_new_tokens=5, interventions=[numpy_dict]).generations
    assert (alone.tokens, alone.text, alone.kl) == (
        treatment.tokens,
        treatment.text,
        None,
    )  # no compare, no KL


def test_stream_yields_token_events_then_the_answer(api):
    kwargs: dict[str, Any] = dict(
        prompt=[PROMPT, "a dog was"], max_new_tokens=4, interventions=[STEER], compare=True, return_features=2
    )
    with api.stream(**kwargs) as stream:
        assert isinstance(stream, GenerationStream)
        events = list(stream)
    *tokens, final = events
    assert all(isinstance(e, TokenEvent) for e in tokens) and isinstance(final, GenerateResponse)
    assert len(tokens) == 4 * 4  # 2 prompts x (unsteered, steered) x 4 tokens
    grouped = _by_generation(tokens)
    assert sorted(grouped) == [0, 1, 2, 3]
    for g, generation in enumerate(final.generations):
        streamed = grouped[g]
        assert [e.index for e in streamed] == list(range(4))
        assert {(e.prompt, e.variant) for e in streamed} == {(generation.prompt, generation.variant)}
        assert [(e.id, e.text, e.features) for e in streamed] == [
            (t.id, t.text, t.features) for t in generation.tokens
        ]
        assert all(set(e.features) == {"sae1", "sae2"} for e in streamed)
        kl = [e.kl for e in streamed]
        assert kl == (generation.kl if generation.steered else [None] * 4)
    assert [g.variant for g in final.generations] == ["unsteered", "steered"] * 2
    # the streamed answer is the non-streamed one (greedy)
    assert api.generate(**kwargs).generations == final.generations


def test_errors_and_warnings_are_typed(api, client):  # noqa: F811
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"interventions": [{**STEER, "sae": "nope"}]}, NotFoundError, "unknown_sae"),
        ({"interventions": [{**STEER, "latent": 64}]}, NotFoundError, "unknown_latent"),
        ({"adapter": "nope"}, NotFoundError, "unknown_adapter"),
        ({"saes": ["sae1"], "interventions": [STEER]}, UnprocessableEntityError, "sae_not_spliced"),
        ({"compare": True}, UnprocessableEntityError, "nothing_to_compare"),
        ({"interventions": [{**STEER, "op": "mul"}]}, UnprocessableEntityError, "validation_error"),
        ({"temperature": -1.0}, UnprocessableEntityError, "validation_error"),
        ({"max_new_tokens": 300}, PayloadTooLargeError, "too_many_new_tokens"),
    ]
    for kwargs, cls, code in cases:
        with pytest.raises(cls) as exc:
            api.generate(PROMPT, **kwargs)
        assert exc.value.code == code, kwargs
        message = client.post("/v1/generate", json={"prompt": PROMPT, **kwargs}).json()["error"]["message"]
        assert exc.value.message == message
        with pytest.raises(cls) as streamed:  # refused before the stream starts: the same error
            next(iter(api.stream(PROMPT, **kwargs)))
        assert (streamed.value.code, streamed.value.message) == (code, message)
    # an adapter with another SAE set than it was trained with: the server's warning, as a Python one
    assert register(client, "a1").status_code == 201
    with pytest.warns(LoraSaeWarning, match="splice_set_differs"):
        answer = api.generate(PROMPT, adapter="a1", saes=["sae1", "sae2"], max_new_tokens=2)
    assert [w.code for w in answer.warnings] == ["splice_set_differs"]
    assert answer.generations[0].variant == "adapter"


# ------------------------------------------------------------------ scripted servers

ANSWER: dict[str, Any] = {
    "model": "tiny",
    "mode": "spliced",
    "saes": [{"id": "sae2", "layer": 2, "d_sae": 64}],
    "generations": [
        {
            "prompt": 0,
            "variant": "steered",
            "adapter": None,
            "steered": True,
            "prompt_tokens": 3,
            "text": " a\nb",
            "tokens": [{"id": 7, "text": " a"}, {"id": 8, "text": "\nb"}],
            "finish_reason": "length",
            "kl": None,
        },
    ],
    "usage": {
        "prompt_tokens": 3,
        "generated_tokens": 2,
        "steps": 2,
        "seconds": 0.5,
        "tokens_per_second": 4.0,
    },
    "future_field": "ignored",
}


def _token(index: int, tid: int, text: str) -> dict[str, Any]:
    return {"generation": 0, "prompt": 0, "variant": "steered", "index": index, "id": tid, "text": text}


# every SSE rule the parser must follow: comments, CRLF, data split over lines, a field without a
# space after the colon, id/retry fields, an event type this client does not know, an event without
# data, and nothing after the done event
SSE = (
    ": a comment line\r\n"
    "retry: 1000\r\n"
    "event: token\r\n"
    f"data: {json.dumps(_token(0, 7, ' a'))}\r\n"
    "\r\n"
    "event: progress\n"
    'data: {"whatever": 1}\n'
    "\n"
    "event: token\n"
    "id: 2\n"
    'data:{"generation": 0, "prompt": 0, "variant": "steered",\n'
    'data:  "index": 1, "id": 8, "text": "\\nb"}\n'
    "\n"
    "event: token\n"
    "\n"
    "event: done\n"
    f"data: {json.dumps(ANSWER)}\n"
    "\n"
    "event: token\n"
    f"data: {json.dumps(_token(2, 9, 'never'))}\n"
    "\n"
)


class Server:
    """Answers with the given (status, headers, body) steps in turn, then repeats the last one;
    records the requests."""

    def __init__(self, *steps: tuple[int, dict[str, str], str | dict[str, Any]]) -> None:
        self.steps = steps
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, headers, body = self.steps[min(len(self.requests), len(self.steps)) - 1]
        if isinstance(body, dict):
            return httpx.Response(status, headers=headers, json=body)
        return httpx.Response(
            status, headers={"content-type": "text/event-stream", **headers}, content=body.encode()
        )


def call(
    kind: str, server: Callable[[httpx.Request], httpx.Response], op: Callable[[Any], Any], **options: Any
) -> Any:
    """``op(client)`` on a sync or async client over ``server``; an async stream is collected."""
    transport = httpx.MockTransport(server)
    if kind == "sync":
        with LoraSaeClient("http://test", transport=transport, backoff=0.0, **options) as c:
            result = op(c)
            return list(result) if isinstance(result, GenerationStream) else result

    async def main() -> Any:
        async with AsyncLoraSaeClient("http://test", transport=transport, backoff=0.0, **options) as c:
            result = op(c)
            if hasattr(result, "__aiter__"):
                async with result as events:
                    return [event async for event in events]
            return await result

    return asyncio.run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_the_body_sent(kind):
    server = Server((200, {}, ANSWER))
    steer = Intervention(sae="sae2", latent=3, op="scale", value=2.0, positions="generated")
    answer = call(
        kind,
        server,
        lambda c: c.generate(
            (np.int64(1), 5, 9),
            adapter="a1",
            saes=("sae2",),
            max_new_tokens=2,
            temperature=0.7,
            top_p=0.9,
            seed=11,
            stop="\n",
            interventions=[steer, {**STEER, "latent": np.int32(4)}],
            mode="error-preserving",
            compare=True,
            return_features=3,
        ),
    )
    assert isinstance(answer, GenerateResponse) and answer.generations[0].tokens[1].text == "\nb"
    (request,) = server.requests
    assert (request.method, request.url.path) == ("POST", "/v1/generate")
    assert request.headers["accept"] == "application/json"
    assert json.loads(request.content) == {
        "prompt": [1, 5, 9],
        "adapter": "a1",
        "saes": ["sae2"],
        "max_new_tokens": 2,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 11,
        "stop": ["\n"],
        "stream": False,
        "mode": "error-preserving",
        "compare": True,
        "return_features": 3,
        "interventions": [
            {"sae": "sae2", "latent": 3, "op": "scale", "value": 2.0, "positions": "generated"},
            {**STEER, "latent": 4},
        ],
    }
    server = Server((200, {}, SSE))
    call(kind, server, lambda c: c.stream([[1, 2], [3]], stop=["a", "b"]))
    body = json.loads(server.requests[0].content)
    assert (body["prompt"], body["stop"], body["stream"], body["interventions"]) == (
        [[1, 2], [3]],
        ["a", "b"],
        True,
        [],
    )
    assert server.requests[0].headers["accept"] == "text/event-stream"


@pytest.mark.parametrize("kind", KINDS)
def test_sse_parsing(kind):
    events = call(kind, Server((200, {}, SSE)), lambda c: c.stream(PROMPT))
    assert events[:2] == [
        TokenEvent.model_validate(_token(0, 7, " a")),
        TokenEvent.model_validate(_token(1, 8, "\nb")),
    ]
    assert isinstance(events[2], GenerateResponse) and len(events) == 3  # nothing after done
    assert events[2] == GenerateResponse.model_validate(ANSWER)


@pytest.mark.parametrize("kind", KINDS)
def test_error_events_and_cut_streams_raise(kind):
    gone = {
        "error": {
            "code": "unknown_adapter",
            "message": "adapter 'a1' was deleted or replaced while generating",
        }
    }
    stream = (
        f"event: token\ndata: {json.dumps(_token(0, 7, ' a'))}\n\nevent: error\ndata: {json.dumps(gone)}\n\n"
    )
    seen: list[Any] = []

    def collect(c: Any) -> Any:
        if kind == "sync":
            for event in c.stream(PROMPT):
                seen.append(event)
            return None

        async def run() -> None:
            async with c.stream(PROMPT) as events:
                async for event in events:
                    seen.append(event)

        return run()

    with pytest.raises(NotFoundError) as exc:
        call(kind, Server((200, {}, stream)), collect)
    assert (exc.value.code, exc.value.message, exc.value.status_code) == (
        "unknown_adapter",
        gone["error"]["message"],
        404,
    )
    assert [e.id for e in seen] == [7]  # the token before the error was delivered
    odd = {"error": {"code": "internal_error", "message": "forward failed"}}
    with pytest.raises(InternalServerError) as internal:
        call(
            kind, Server((200, {}, f"event: error\ndata: {json.dumps(odd)}\n\n")), lambda c: c.stream(PROMPT)
        )
    assert (internal.value.code, internal.value.status_code) == ("internal_error", 500)
    # a stream that ends without its done event (the connection closed) is an error, not a short answer
    cut = f'event: token\ndata: {json.dumps(_token(0, 7, " a"))}\n\nevent: done\ndata: {{"model"'
    with pytest.raises(APIConnectionError, match="ended before its done event"):
        call(kind, Server((200, {}, cut)), lambda c: c.stream(PROMPT))


@pytest.mark.parametrize("kind", KINDS)
def test_refusals_before_the_stream_are_retried(kind):
    full = {"error": {"code": "generation_queue_full", "message": "1 generations running and 0 waiting"}}
    server = Server((429, {"retry-after": "0"}, full), (200, {}, SSE))
    events = call(kind, server, lambda c: c.stream(PROMPT))
    assert len(server.requests) == 2 and isinstance(events[-1], GenerateResponse)
    server = Server((429, {"retry-after": "0"}, full))
    with pytest.raises(RateLimitError) as exc:
        call(kind, server, lambda c: c.stream(PROMPT), max_retries=2)
    assert exc.value.code == "generation_queue_full" and len(server.requests) == 3
    server = Server((429, {"retry-after": "0"}, full), (200, {}, ANSWER))
    assert call(kind, server, lambda c: c.generate(PROMPT)).model == "tiny" and len(server.requests) == 2


@pytest.mark.parametrize("kind", KINDS)
def test_a_generation_is_not_resent_after_a_read_timeout(kind):
    """The server may be running it (a resend would run it twice); a refused connection is resent."""
    requests: list[httpx.Request] = []

    def timeout(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        raise httpx.ReadTimeout("scripted", request=request)

    for op in (lambda c: c.generate(PROMPT), lambda c: c.stream(PROMPT)):
        requests.clear()
        with pytest.raises(APIConnectionError, match="may have been carried out"):
            call(kind, timeout, op)
        assert len(requests) == 1
    attempts: list[int] = []

    def refused_once(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) == 1:
            raise httpx.ConnectError("scripted", request=request)
        return httpx.Response(200, json=ANSWER)

    assert call(kind, refused_once, lambda c: c.generate(PROMPT)).model == "tiny"
    assert len(attempts) == 2


# ------------------------------------------------------------------ a real server process, one slot


@pytest.fixture(scope="module")
def server(world, tmp_path_factory) -> Iterator[ServerProcess]:  # noqa: F811 - the imported fixture
    """``lorasae serve`` with one generation slot and no queue: a second generation gets 429 while a
    first one runs; long generations allowed (4000 new tokens) so one is still running when left."""
    env = dict(
        LORASAE_MAX_GENERATIONS="1",
        LORASAE_MAX_GENERATION_QUEUE="0",
        LORASAE_MAX_NEW_TOKENS="4000",
        LORASAE_MAX_TOKENS="4096",
    )
    with ServerProcess(world, tmp_path_factory.mktemp("generate-client"), **env) as server:
        yield server


def _metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    (value,) = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} ")]
    return value


def _assert_busy(server: ServerProcess) -> None:
    """The slot is taken: a generation is refused at once (no retry)."""
    with LoraSaeClient(server.url, max_retries=0) as other, pytest.raises(RateLimitError) as exc:
        other.generate(PROMPT, max_new_tokens=2)
    assert exc.value.code == "generation_queue_full" and exc.value.response.headers["retry-after"]
    assert _metric(server, "lorasae_generations_active") == 1


def _assert_freed(server: ServerProcess, generated_before: float) -> None:
    """The slot comes free (the next generation runs instead of getting 429) and the left generation
    never finished: only the 2 tokens of the next one were counted."""
    answers: list[GenerateResponse] = []

    def runs() -> bool:
        try:
            with LoraSaeClient(server.url, max_retries=0) as other:
                answers.append(other.generate(PROMPT, max_new_tokens=2))
            return True
        except RateLimitError:
            return False

    started = time.monotonic()
    wait_until(runs, "the slot of the generation left early to come free", timeout=60)
    assert time.monotonic() - started < 30  # freed at its next step, not at its 4000th
    assert answers[0].usage.generated_tokens == 2
    assert _metric(server, "lorasae_generated_tokens_total") == generated_before + 2
    assert _metric(server, "lorasae_generations_active") == 0


def test_leaving_a_stream_early_frees_the_slot(server):
    with LoraSaeClient(server.url) as api:
        done = _metric(server, "lorasae_generated_tokens_total")
        # break out of a for loop over the stream itself
        for n, event in enumerate(api.stream(PROMPT, max_new_tokens=4000), 1):
            assert isinstance(event, TokenEvent) and event.index == n - 1
            if n == 3:
                _assert_busy(server)
                break
        _assert_freed(server, done)
        # leave a with block
        with api.stream(PROMPT, max_new_tokens=4000, interventions=[STEER]) as events:
            assert next(events).variant == "steered"
            _assert_busy(server)
        _assert_freed(server, done + 2)
        # close() a stream held in a variable
        events = api.stream(PROMPT, max_new_tokens=4000)
        next(events)
        _assert_busy(server)
        events.close()
        _assert_freed(server, done + 4)
        with pytest.raises(StopIteration):
            next(events)


def test_async_twins(server):
    async def main() -> tuple[GenerateResponse, list[Any], float]:
        async with AsyncLoraSaeClient(server.url) as api:
            answer = await api.generate(PROMPT, max_new_tokens=4, interventions=[STEER], compare=True)
            async with api.stream(PROMPT, max_new_tokens=4, interventions=[STEER], compare=True) as events:
                streamed = [event async for event in events]
            done = _metric(server, "lorasae_generated_tokens_total")
            async with api.stream(PROMPT, max_new_tokens=4000) as events:
                async for event in events:
                    assert isinstance(event, TokenEvent)
                    if event.index == 2:
                        _assert_busy(server)
                        break
            return answer, streamed, done

    answer, streamed, done = asyncio.run(main())
    _assert_freed(server, done)
    with LoraSaeClient(server.url) as api:
        sync = api.generate(PROMPT, max_new_tokens=4, interventions=[STEER], compare=True)
    assert answer.generations == sync.generations and [g.variant for g in answer.generations] == [
        "unsteered",
        "steered",
    ]
    *tokens, final = streamed
    assert final.generations == answer.generations
    grouped = _by_generation(tokens)
    for g, generation in enumerate(final.generations):
        assert [e.id for e in grouped[g]] == [t.id for t in generation.tokens]
    assert [e.kl for e in grouped[1]] == final.generations[1].kl

    async def missing() -> None:
        async with AsyncLoraSaeClient(server.url) as api:
            with pytest.raises(NotFoundError) as exc:
                await api.generate(PROMPT, interventions=[{**STEER, "latent": 64}])
            assert exc.value.code == "unknown_latent"
            with pytest.raises(UnprocessableEntityError) as exc2:
                async with api.stream(PROMPT, compare=True) as events:
                    await events.__anext__()
            assert exc2.value.code == "nothing_to_compare"

    asyncio.run(missing())
