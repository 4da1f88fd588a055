"""``LoraSaeClient`` (sync) and ``AsyncLoraSaeClient``: one request-building core, two transports.

    from lorasae_client import LoraSaeClient, TokenEvent
    with LoraSaeClient("http://127.0.0.1:8000") as client:
        df = client.features("The cat sat on the mat", adapter="a1", top_k=8).to_pandas()

        # latent dashboards: one latent's record, a search over an SAE's latents, and chosen
        # latents' activations at every token (``latents_frame()``: one row per token and latent)
        record = client.latent("blocks.2", 123)  # .to_pandas(): its top and quantile contexts
        hits = client.search_latents("blocks.2", "legal", limit=20).to_pandas()
        acts = client.features("The cat sat", latents={"blocks.2": [123, 7]}).latents_frame()

        # latent drift: what adapter "a1" changed about its SAEs' latents, most drifted first
        drifted = client.drift("a1", side="output").to_pandas()  # against="a2": vs another adapter

        # generation with the SAEs spliced and a latent steered; compare=True: also the unsteered
        # continuation, and per step the KL of the steered model's next-token distribution from it
        steer = {"sae": "blocks.2", "latent": 123, "op": "set", "value": 8.0}
        answer = client.generate("The cat", interventions=[steer], compare=True, max_new_tokens=20)
        with client.stream("The cat", interventions=[steer]) as events:  # Server-Sent Events
            for event in events:  # TokenEvent per generated token, then the GenerateResponse
                print(event.text if isinstance(event, TokenEvent) else "", end="")

        # in Jupyter, answers show as HTML: display(client.features(...)) gives token strips coloured
        # by each token's top latent, client.latent(...) a small dashboard, list_adapters() a table;
        # progress=True (generate / stream) shows a tqdm bar of the generated tokens
        answer = client.generate("The cat", max_new_tokens=200, progress=True)

429 and 503 answers and transport failures are retried with exponential backoff, honouring the
server's Retry-After (clamped to ``max_backoff``); see ``_Core._should_retry`` for which requests may be
resent after which failure. Other errors raise the typed exceptions of ``lorasae_client.errors`` with
the server's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import importlib
import io
import json
import math
import numbers
import operator
import os
import random
import tarfile
import time
import warnings
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from . import display
from .errors import APIConnectionError, APIStatusError, APITimeoutError, LoraSaeWarning, error_for_status
from .schemas import (
    AdapterInfo,
    AdapterList,
    DriftReport,
    DriftSide,
    FeaturesResponse,
    GenerateResponse,
    GenerationMode,
    HealthResponse,
    Intervention,
    LatentRecord,
    LatentSearchResponse,
    ResponseWarning,
    TokenEvent,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = (429, 503)  # the server refused without acting: safe to resend any request
# transport failures raised before the request reached the server: safe to resend any request
NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
M = TypeVar("M", bound=BaseModel)
LatentSort = Literal["max_activation", "density"]
SortOrder = Literal["desc", "asc"]
STREAM = "text/event-stream"
# the adapter a request uses, as Ray Serve's multiplexed model id: a server run on Ray Serve
# (`lorasae serve --ray`) routes the request to a replica that already holds that adapter; a plain
# server ignores it
MULTIPLEX_HEADER = "serve_multiplexed_model_id"
Params = dict[str, str | int | float]
Prompt = str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]]
InterventionLike = Intervention | Mapping[str, Any]
GenerateEvent = TokenEvent | GenerateResponse  # what a generation stream yields
# the status an ``error`` event of a generation stream stands for (the stream itself was a 200): the
# codes a generation can fail with once it streams (generation_queue_full: two streams admitted at
# once raced for the last place); any other code is taken as a server error (500)
STREAM_ERROR_STATUS = {
    "unknown_adapter": 404,
    "unknown_sae": 404,
    "generation_queue_full": 429,
    "shutting_down": 503,
    "not_ready": 503,
}


def _segment(value: str) -> str:
    """``value`` quoted as one URL path segment (no '/', '#', '?' or '..' can leave it: an SAE id
    such as 'release/sae_id' becomes 'release%2Fsae_id'); "." and ".." are percent-encoded too, as
    URL normalisation would drop them."""
    segment = quote(value, safe="")
    if segment in (".", ".."):
        segment = segment.replace(".", "%2E")
    return segment


def _adapter_path(name: str) -> str:
    """``/v1/adapters/{name}`` with ``name`` quoted as one path segment."""
    return f"/v1/adapters/{_segment(name)}"


def _latents_path(sae: str) -> str:
    """``/v1/saes/{sae}/latents`` with ``sae`` quoted as one path segment."""
    return f"/v1/saes/{_segment(sae)}/latents"


def _index(value: int) -> int:
    """A latent index as a plain int (numpy integers welcome; floats, bools and strings refused)."""
    if isinstance(value, bool):
        raise TypeError(f"a latent index must be an integer, not {value!r}")
    return operator.index(value)


def _token_id(value: Any) -> int:
    """A token id as a plain int (numpy integers welcome; floats, bools and strings refused)."""
    if isinstance(value, bool):
        raise TypeError(f"a token id must be an integer, not {value!r}")
    return operator.index(value)


def _prompt(prompt: Prompt) -> str | list[Any]:
    """A prompt as JSON: a text, token ids, texts, or token-id lists (tuples and numpy arrays welcome)."""
    if isinstance(prompt, str):
        return prompt
    out: list[Any] = []
    for item in prompt:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, (int, numbers.Integral)):  # numpy integers are Integral
            out.append(_token_id(item))
        else:
            out.append([_token_id(x) for x in item])
    return out


def _intervention(value: InterventionLike) -> dict[str, Any]:
    """An ``Intervention`` or a plain mapping as JSON (the server validates: a bad one is a 422);
    numpy numbers in a mapping become plain ones."""
    if isinstance(value, Intervention):
        return value.model_dump(mode="json")
    if not isinstance(value, Mapping):
        raise TypeError(f"an intervention is an Intervention or a mapping, not {type(value).__name__}")
    out = dict(value)
    latent, number = out.get("latent"), out.get("value")
    if isinstance(latent, numbers.Integral) and not isinstance(latent, bool):
        out["latent"] = int(latent)
    if isinstance(number, numbers.Real) and not isinstance(number, (bool, int)):
        out["value"] = float(number)
    return out


class _SseParser:
    """Server-Sent Events, line by line (the WHATWG rules): ``field: value`` lines, one space after
    the colon dropped; ``data`` lines joined with newlines; ``:`` lines are comments; a blank line
    ends an event (one without data is dropped). ``feed`` returns (event type, data) at the end of
    each event; a last event the stream does not end with a blank line is incomplete: dropped."""

    def __init__(self) -> None:
        self.kind = ""
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            kind, data = self.kind or "message", self.data
            self.kind, self.data = "", []
            return (kind, "\n".join(data)) if data else None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self.kind = value
        elif name == "data":
            self.data.append(value)
        return None  # id, retry and unknown fields mean nothing here


def _params(**values: str | int | float | bool | None) -> Params:
    """Query parameters without the ones that are None; booleans as 'true' / 'false'."""
    params: Params = {}
    for key, value in values.items():
        if value is None:
            continue
        params[key] = ("true" if value else "false") if isinstance(value, bool) else value
    return params


@dataclass
class _Request:
    method: str
    path: str
    json: Any = None
    files: dict[str, tuple[str, bytes, str]] | None = None  # name -> (filename, content, content type)
    data: dict[str, str] | None = None
    params: Params | None = None  # the query string
    idempotent: bool = True  # safe to resend after the server may have received it (see _should_retry)
    expect: tuple[int, ...] = field(default=(200,))
    check: str = ""  # for a non-idempotent request: how to find out whether it was carried out
    adapter: str | None = None  # the adapter it uses: sent as MULTIPLEX_HEADER (replica routing)


class AdapterInfoList(list[AdapterInfo]):
    """What ``list_adapters`` returns: a plain list of ``AdapterInfo`` that a notebook shows as a
    table (``_repr_html_``)."""

    def _repr_html_(self) -> str:
        return display.adapters_html(self)


class _ReadyWait:
    """The bookkeeping of ``wait_ready``: the deadline, and what the last tries found, for the
    error raised when the time is up."""

    def __init__(self, base_url: str, timeout: float) -> None:
        self.url = f"{base_url}/readyz"
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.tries = 0
        self.last_error: str | None = None  # the last transport failure ("ConnectError: ...")
        self.last_answer: str | None = None  # the last answer that was not 200, in words
        self.reached_last = False  # whether the last try got an answer

    def request_timeout(self, client_timeout: float) -> float:
        """The timeout of the next try: the client's, cut to the time left (at least 0.1 s), so a
        host that does not answer cannot hold ``wait_ready`` past its deadline."""
        return max(0.1, min(client_timeout, self.deadline - time.monotonic()))

    def answered(self, response: httpx.Response) -> None:
        self.tries += 1
        self.reached_last = True
        self.last_answer = _not_ready(response)

    def failed(self, exc: httpx.TransportError) -> None:
        self.tries += 1
        self.reached_last = False
        self.last_error = f"{type(exc).__name__}: {exc or 'no detail'}"

    def delay(self, interval: float) -> float:
        """Seconds to sleep before the next try; raises the APITimeoutError when time is up."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.error()
        return max(0.0, min(interval, left))

    def error(self) -> APITimeoutError:
        tries = f"{self.tries} {'try' if self.tries == 1 else 'tries'}"
        if self.last_answer is None:
            return APITimeoutError(
                f"{self.url} not reachable within {self.timeout} s ({tries}); last error: {self.last_error}"
                " - is the server running at that address?"
            )
        message = (
            f"{self.url} not ready after {self.timeout} s ({tries}): the server answered {self.last_answer}"
        )
        if not self.reached_last:
            message += f"; the last try failed: {self.last_error}"
        return APITimeoutError(message)


def _not_ready(response: httpx.Response) -> str:
    """What a /readyz answer other than 200 says: the server's status and detail (503 while it loads
    or after its startup failed), else the status code and the start of the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and response.status_code == 503 and "status" in body:
        detail = body.get("detail")
        if body.get("status") == "error":
            return f"503, startup failed: {detail or 'no detail'}"
        if body.get("status") == "loading":
            return "503, still loading the model" + (f" ({detail})" if detail else "")
        return f"503, status {body.get('status')!r}" + (f": {detail}" if detail else "")
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return f"{response.status_code} {err.get('code', '')}: {err.get('message', '')}"
    text = (response.text or response.reason_phrase or "").strip()
    return f"{response.status_code}: {text[:200]}"


def _tqdm() -> Any:
    """``tqdm.auto.tqdm`` (a widget in Jupyter, text elsewhere), imported when asked for."""
    try:
        module = importlib.import_module("tqdm.auto")
    except ImportError as exc:
        raise ImportError("progress=True needs tqdm: pip install tqdm") from exc
    return module.tqdm


def _advance(bar: Any, event: GenerateEvent) -> None:
    """One event on the progress bar: a token counts one; the final answer sets the total to the
    count (a generation that stopped early, at a stop string or end of sequence, shows complete)."""
    if isinstance(event, TokenEvent):
        bar.update(1)
    else:
        bar.total = bar.n
        bar.refresh()


def _with_progress(
    events: Generator[GenerateEvent, None, None], bar_class: Any, total: int
) -> Generator[GenerateEvent, None, None]:
    """``events`` passed through, counted on a ``bar_class`` bar (opened with the first event asked
    for, closed with the stream)."""
    bar = bar_class(total=total, unit="tok", desc="generating")
    try:
        for event in events:
            _advance(bar, event)
            yield event
    finally:
        events.close()
        bar.close()


async def _with_progress_async(
    events: AsyncGenerator[GenerateEvent, None], bar_class: Any, total: int
) -> AsyncGenerator[GenerateEvent, None]:
    bar = bar_class(total=total, unit="tok", desc="generating")
    try:
        async for event in events:
            _advance(bar, event)
            yield event
    finally:
        await events.aclose()
        bar.close()


def _final(events: Iterable[GenerateEvent]) -> GenerateResponse:
    """The answer at the end of a generation's events."""
    for event in events:
        if isinstance(event, GenerateResponse):
            return event
    raise APIConnectionError("the generation stream ended before its done event")


async def _final_async(events: AsyncIterable[GenerateEvent]) -> GenerateResponse:
    async for event in events:
        if isinstance(event, GenerateResponse):
            return event
    raise APIConnectionError("the generation stream ended before its done event")


class _Core:
    """Everything but the I/O: settings, request building, retry delays, response parsing."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.25,
        max_backoff: float = 10.0,
    ) -> None:
        self.base_url = (base_url or os.environ.get("LORASAE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("LORASAE_API_KEY")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff

    def _headers(self, accept: str = "application/json", adapter: str | None = None) -> dict[str, str]:
        headers = {"Accept": accept, "User-Agent": "lorasae-client"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if adapter:
            headers[MULTIPLEX_HEADER] = adapter
        return headers

    # ------------------------------------------------------------ request builders

    @staticmethod
    def _features(
        inputs: str | Sequence[str] | Sequence[Sequence[int]],
        adapter: str | None,
        saes: Sequence[str] | None,
        top_k: int,
        logits: str,
        logits_top_k: int,
        latents: Mapping[str, Sequence[int]] | None = None,
    ) -> _Request:
        if isinstance(inputs, tuple):
            inputs = list(inputs)
        body: dict[str, Any] = {
            "inputs": inputs,
            "adapter": adapter,
            "saes": list(saes) if saes is not None else None,
            "top_k": top_k,
            "logits": logits,
            "logits_top_k": logits_top_k,
        }
        if latents is not None:  # left out otherwise: a server without latents= accepts the request
            body["latents"] = {sae: [_index(i) for i in indices] for sae, indices in latents.items()}
        return _Request("POST", "/v1/features", json=body, adapter=adapter)

    @staticmethod
    def _latent(sae: str, index: int, adapter: str | None) -> _Request:
        path = f"{_latents_path(sae)}/{_index(index)}"
        return _Request("GET", path, params=_params(adapter=adapter) or None, adapter=adapter)

    @staticmethod
    def _search_latents(
        sae: str,
        q: str | None,
        sort: LatentSort,
        order: SortOrder,
        min_density: float | None,
        max_density: float | None,
        include_dead: bool,
        limit: int,
        adapter: str | None,
    ) -> _Request:
        params = _params(
            q=q,
            sort=sort,
            order=order,
            min_density=min_density,
            max_density=max_density,
            include_dead=include_dead,
            limit=limit,
            adapter=adapter,
        )
        return _Request("GET", _latents_path(sae), params=params, adapter=adapter)

    @staticmethod
    def _drift(
        adapter: str, against: str | None, sae: str | None, side: DriftSide, limit: int, offset: int
    ) -> _Request:
        params = _params(against=against, sae=sae, side=side, limit=limit, offset=offset)
        return _Request("GET", f"{_adapter_path(adapter)}/drift", params=params, adapter=adapter)

    @staticmethod
    def _generate(
        prompt: Prompt,
        *,
        adapter: str | None,
        saes: Sequence[str] | None,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: str | Sequence[str] | None,
        interventions: Sequence[InterventionLike] | None,
        mode: GenerationMode,
        compare: bool,
        return_features: int | None,
        stream: bool,
    ) -> _Request:
        body: dict[str, Any] = {
            "prompt": _prompt(prompt),
            "adapter": adapter,
            "saes": list(saes) if saes is not None else None,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "stop": [stop] if isinstance(stop, str) else list(stop or ()),
            "interventions": [_intervention(x) for x in interventions or ()],
            "mode": mode,
            "compare": compare,
            "return_features": return_features,
            "stream": stream,
        }
        # not resent after a failure that may have reached the server (a read timeout, a dropped
        # connection): the server does not stop a generation whose client went away before the
        # stream started or without one, so a resend would run it again beside the first
        return _Request(
            "POST",
            "/v1/generate",
            json=body,
            idempotent=False,
            check="GET /metrics (lorasae_generations_active)",
            adapter=adapter,
        )

    @staticmethod
    def _generation_total(req: _Request) -> int:
        """The most tokens a ``_generate`` request can produce: max_new_tokens x generations (one per
        prompt, two with compare)."""
        body = req.json
        prompt = body["prompt"]
        single = isinstance(prompt, str) or all(isinstance(x, int) for x in prompt)
        prompts = 1 if single else len(prompt)
        return prompts * (2 if body["compare"] else 1) * int(body["max_new_tokens"])

    @staticmethod
    def _register(name: str, path: str | None, upload: str | os.PathLike[str] | bytes | None) -> _Request:
        if (path is None) == (upload is None):
            raise ValueError(
                "pass exactly one of path= (a folder under the server's adapter root) "
                "or upload= (a local adapter folder or archive)"
            )
        if upload is None:  # so path is set
            return _Request(
                "POST",
                "/v1/adapters",
                json={"name": name, "path": str(path)},
                idempotent=False,
                expect=(201,),
                check=f"GET {_adapter_path(name)}",
            )
        filename, content = _archive(upload)
        return _Request(
            "POST",
            "/v1/adapters",
            files={"file": (filename, content, "application/octet-stream")},
            data={"name": name},
            idempotent=False,
            expect=(201,),
            check=f"GET {_adapter_path(name)}",
        )

    # ------------------------------------------------------------ retries

    def _should_retry(
        self, req: _Request, attempt: int, outcome: httpx.Response | httpx.TransportError
    ) -> bool:
        """Whether to resend ``req`` after ``attempt`` (0 = the first try) ended in ``outcome``.

        A 429/503 answer is retried for every request (the server refused without acting). A
        transport failure is retried for an idempotent request; a non-idempotent one (a registration)
        only when it provably never reached the server (``NOT_SENT_ERRORS``): after a read timeout or
        a dropped connection the server may already have carried it out. At most ``max_retries``
        resends, so ``max_retries=0`` is exactly one attempt."""
        if attempt >= self.max_retries:
            return False
        # test for the error, not for httpx.Response: an ``http_client`` may be httpx-compatible only
        # (Starlette's TestClient answers with httpx2 responses)
        if isinstance(outcome, httpx.TransportError):
            return req.idempotent or isinstance(outcome, NOT_SENT_ERRORS)
        return outcome.status_code in RETRY_STATUSES

    def _retry_delay(self, attempt: int, outcome: httpx.Response | httpx.TransportError) -> float:
        """Seconds to wait before resend number ``attempt + 1``: the answer's Retry-After if it has a
        usable one, else jittered exponential backoff; always within [0, max_backoff]."""
        if not isinstance(outcome, httpx.TransportError):
            retry_after = _retry_after_seconds(outcome.headers.get("retry-after"))
            if retry_after is not None:
                return self._clamp(retry_after)
        delay = self.backoff * 2.0 ** min(attempt, 60)
        return self._clamp(delay * (0.5 + random.random()))

    def _clamp(self, seconds: float) -> float:
        return max(0.0, min(seconds, self.max_backoff))

    def _result(self, req: _Request, outcome: httpx.Response | httpx.TransportError) -> httpx.Response:
        """The final outcome of ``req`` (no retry left): the response, or the typed error raised."""
        if isinstance(outcome, httpx.TransportError):
            raise self._transport_error(req, outcome) from outcome
        self._raise_for(outcome, req.expect)
        return outcome

    def _transport_error(self, req: _Request, exc: httpx.TransportError) -> APIConnectionError:
        """APITimeoutError / APIConnectionError for ``exc``; for a non-idempotent request that may
        have reached the server, the message says so and how to check."""
        cls: type[APIConnectionError]
        if isinstance(exc, httpx.TimeoutException):
            cls, message = APITimeoutError, f"{req.method} {req.path} timed out: {exc}"
        elif isinstance(exc, NOT_SENT_ERRORS):
            cls, message = APIConnectionError, f"cannot reach {self.base_url}: {exc}"
        else:
            cls, message = APIConnectionError, f"{req.method} {req.path} to {self.base_url} failed: {exc}"
        if not req.idempotent and not isinstance(exc, NOT_SENT_ERRORS):
            message += (
                "; the request may have been carried out by the server and was not resent"
                f" - check with {req.check or 'the server'} before retrying"
            )
        return cls(message)

    # ------------------------------------------------------------ responses

    @staticmethod
    def _raise_for(response: httpx.Response, expect: tuple[int, ...]) -> None:
        if response.status_code in expect:
            return
        code, message = "", response.text or response.reason_phrase
        try:
            err = response.json().get("error", {})
            code, message = err.get("code", ""), err.get("message", message)
        except (ValueError, AttributeError):
            pass
        cls = error_for_status(response.status_code)
        raise cls(message, status_code=response.status_code, code=code, response=response)

    @staticmethod
    def _parse(response: httpx.Response, model: type[M]) -> M:
        return model.model_validate_json(response.content)

    @staticmethod
    def _features_response(response: httpx.Response) -> FeaturesResponse:
        """The parsed answer; each server warning (e.g. an adapter used with other SAEs than it was
        trained with) is also raised as a Python ``LoraSaeWarning``, so a notebook shows it."""
        parsed = FeaturesResponse.model_validate_json(response.content)
        for warning in parsed.warnings:
            warnings.warn(f"{warning.code}: {warning.message}", LoraSaeWarning, stacklevel=3)
        return parsed

    @staticmethod
    def _generate_response(content: str | bytes) -> GenerateResponse:
        """The parsed answer of a generation; its warnings are raised as ``LoraSaeWarning``s too."""
        parsed = GenerateResponse.model_validate_json(content)
        _warn(parsed.warnings)
        return parsed

    def _stream_event(self, kind: str, data: str, response: httpx.Response) -> GenerateEvent | None:
        """One event of a generation stream: a ``TokenEvent``, the final ``GenerateResponse``, or
        the typed error of an ``error`` event raised; None for an event type this client does not
        know (a newer server's), which is skipped."""
        if kind == "token":
            return TokenEvent.model_validate_json(data)
        if kind == "done":
            return self._generate_response(data)
        if kind == "error":
            raise _stream_error(data, response)
        return None

    def _ended_early(self, req: _Request) -> APIConnectionError:
        return APIConnectionError(f"{req.method} {req.path}: the stream ended before its done event")


def _warn(found: list[ResponseWarning]) -> None:
    for warning in found:
        warnings.warn(f"{warning.code}: {warning.message}", LoraSaeWarning, stacklevel=4)


def _stream_error(data: str, response: httpx.Response) -> APIStatusError:
    """The typed error of an ``error`` event (``{"error": {"code", "message"}}``): the class of the
    status it stands for (its ``status`` when the event has one, else ``STREAM_ERROR_STATUS``)."""
    code, message, status = "", data, 500
    try:
        err = json.loads(data).get("error", {})
        code, message = str(err.get("code", "")), str(err.get("message", data))
        given = err.get("status")
        status = given if isinstance(given, int) else STREAM_ERROR_STATUS.get(code, 500)
    except (ValueError, AttributeError):
        pass
    return error_for_status(status)(message, status_code=status, code=code, response=response)


class GenerationStream:
    """The events of a streamed generation (``LoraSaeClient.stream``): a ``TokenEvent`` per
    generated token, in order, then the whole answer (``GenerateResponse``) as the last item. The
    request is sent when the first event is asked for; an error before the stream starts, or an
    ``error`` event in it, raises the client's typed exception.

    Leaving early closes the HTTP response, so the server sees the client go and frees the
    generation's slot at its next step: leave a ``with`` block, call ``close()``, or break out of a
    ``for`` loop over ``client.stream(...)`` itself (CPython closes the stream as soon as nothing
    refers to it; hold it in a variable and it stays open until ``close()``)."""

    def __init__(self, events: Generator[GenerateEvent, None, None]) -> None:
        self._events = events

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> GenerateEvent:
        return next(self._events)

    def close(self) -> None:
        """End the stream now (nothing happens if it has not started or has ended)."""
        self._events.close()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGenerationStream:
    """The asyncio twin of ``GenerationStream`` (``AsyncLoraSaeClient.stream``): ``async for`` over
    it. Leaving early must close it: use ``async with client.stream(...) as events:`` (or ``await
    events.aclose()``); an async generator left by ``break`` is only closed when the event loop
    collects it, and until then the server keeps generating."""

    def __init__(self, events: AsyncGenerator[GenerateEvent, None]) -> None:
        self._events = events

    def __aiter__(self) -> AsyncGenerationStream:
        return self

    async def __anext__(self) -> GenerateEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        """End the stream now (nothing happens if it has not started or has ended)."""
        await self._events.aclose()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header as seconds from now: delay-seconds or an HTTP-date (RFC 9110); None
    when absent, unparsable or not finite."""
    if not value or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # "-0000": UTC by RFC 5322
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return seconds if math.isfinite(seconds) else None


def _archive(upload: str | os.PathLike[str] | bytes) -> tuple[str, bytes]:
    """(filename, bytes) for an upload: raw bytes, an archive file, or a folder packed as .tar.gz."""
    if isinstance(upload, (bytes, bytearray)):
        return "adapter.tar.gz", bytes(upload)
    path = Path(upload).expanduser()
    if path.is_file():
        return path.name, path.read_bytes()
    if not path.is_dir():
        raise FileNotFoundError(f"no adapter folder or archive at {path}")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for item in sorted(path.rglob("*")):
            rel = item.relative_to(path)
            if item.is_file() and "checkpoint" not in rel.parts:
                tar.add(item, arcname=str(Path(path.name) / rel))
    return f"{path.name}.tar.gz", buffer.getvalue()


class LoraSaeClient(_Core):
    """Synchronous client. ``base_url`` defaults to ``$LORASAE_URL`` or http://127.0.0.1:8000 and
    ``api_key`` (needed for register/delete when the server has one) to ``$LORASAE_API_KEY``."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.25,
        max_backoff: float = 10.0,
        http_client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, backoff, max_backoff)
        self._http = http_client or httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)
        self._owns_http = http_client is None

    def _send(self, req: _Request) -> httpx.Response:
        attempt = 0
        while True:
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = self._http.request(
                    req.method,
                    req.path,
                    json=req.json,
                    files=req.files,
                    data=req.data,
                    params=req.params,
                    headers=self._headers(adapter=req.adapter),
                )
            except httpx.TransportError as exc:
                outcome = exc
            if not self._should_retry(req, attempt, outcome):
                return self._result(req, outcome)
            time.sleep(self._retry_delay(attempt, outcome))
            attempt += 1

    def _open(self, req: _Request) -> httpx.Response:
        """``req`` sent for a streamed answer, retried as in ``_send``: the open response once the
        server answers with an expected status (the caller closes it), else the typed error."""
        attempt = 0
        while True:
            outcome: httpx.Response | httpx.TransportError
            try:
                request = self._http.build_request(
                    req.method,
                    req.path,
                    json=req.json,
                    params=req.params,
                    headers=self._headers(STREAM, req.adapter),
                )
                outcome = self._http.send(request, stream=True)
            except httpx.TransportError as exc:
                outcome = exc
            if not isinstance(outcome, httpx.TransportError):
                if outcome.status_code in req.expect:
                    return outcome
                response = outcome
                try:
                    response.read()  # the error's JSON body, for its code and message
                except httpx.TransportError as exc:
                    outcome = exc
                finally:
                    response.close()
            if not self._should_retry(req, attempt, outcome):
                return self._result(req, outcome)  # raises: the status was not expected
            time.sleep(self._retry_delay(attempt, outcome))
            attempt += 1

    def _events(self, req: _Request) -> Generator[GenerateEvent, None, None]:
        """The events of a streamed generation; the response is closed however this ends."""
        response = self._open(req)
        try:
            parser = _SseParser()
            for line in response.iter_lines():
                found = parser.feed(line)
                event = None if found is None else self._stream_event(*found, response)
                if event is not None:
                    yield event
                    if isinstance(event, GenerateResponse):
                        return
        except httpx.TransportError as exc:  # mid-stream: never resent (events were delivered)
            raise self._transport_error(req, exc) from exc
        finally:
            response.close()
        raise self._ended_early(req)

    def _streamed(self, req: _Request, progress: bool) -> Generator[GenerateEvent, None, None]:
        """``_events``, counted on a tqdm bar with ``progress`` (ImportError now if tqdm is missing)."""
        if not progress:
            return self._events(req)
        return _with_progress(self._events(req), _tqdm(), self._generation_total(req))

    def features(
        self,
        inputs: str | Sequence[str] | Sequence[Sequence[int]],
        *,
        adapter: str | None = None,
        saes: Sequence[str] | None = None,
        top_k: int = 8,
        logits: str = "none",
        logits_top_k: int = 5,
        latents: Mapping[str, Sequence[int]] | None = None,
    ) -> FeaturesResponse:
        """Per-token SAE features of ``inputs`` (a text, texts, or token-id lists).

        ``latents`` ({SAE id: [latent indices]}) also returns those latents' activations at every
        token, top-k or not: ``TokenResult.latents``, or as a table ``latents_frame()``."""
        req = self._features(inputs, adapter, saes, top_k, logits, logits_top_k, latents)
        return self._features_response(self._send(req))

    def latent(self, sae: str, index: int, adapter: str | None = None) -> LatentRecord:
        """The dashboard record of latent ``index`` of SAE ``sae`` (with ``adapter``: the one
        computed with that adapter applied). ``.to_pandas()`` lists its contexts. Raises
        NotFoundError (``code``: unknown_sae, unknown_latent, no_dashboard or unknown_adapter)."""
        return self._parse(self._send(self._latent(sae, index, adapter)), LatentRecord)

    def search_latents(
        self,
        sae: str,
        q: str | None = None,
        *,
        sort: LatentSort = "max_activation",
        order: SortOrder = "desc",
        min_density: float | None = None,
        max_density: float | None = None,
        include_dead: bool = False,
        limit: int = 50,
        adapter: str | None = None,
    ) -> LatentSearchResponse:
        """Latents of SAE ``sae`` matching the text ``q`` (ranked by match score), or without ``q``
        listed by ``sort`` in ``order``; filtered by density, dead latents left out unless
        ``include_dead``; at most ``limit``. ``.to_pandas()``: one row per latent."""
        req = self._search_latents(
            sae, q, sort, order, min_density, max_density, include_dead, limit, adapter
        )
        return self._parse(self._send(req), LatentSearchResponse)

    def drift(
        self,
        adapter: str,
        *,
        against: str | None = None,
        sae: str | None = None,
        side: DriftSide = "any",
        limit: int = 50,
        offset: int = 0,
    ) -> DriftReport:
        """What registered adapter ``adapter`` changed about its SAEs' latents, against the base
        model (or registered adapter ``against``), from the server's drift reports (``--drift``):
        per SAE the noise thresholds and how many latents drifted, and a page (``offset``, at most
        ``limit``) of the latents that drifted on ``side`` ("input", "output", "any"; "all": every
        latent), most drifted first; ``sae`` keeps one SAE. ``.to_pandas()``: one row per latent.
        Raises NotFoundError (``code``: unknown_adapter, unknown_sae or no_drift)."""
        req = self._drift(adapter, against, sae, side, limit, offset)
        return self._parse(self._send(req), DriftReport)

    def generate(
        self,
        prompt: Prompt,
        *,
        adapter: str | None = None,
        saes: Sequence[str] | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        interventions: Sequence[InterventionLike] | None = None,
        mode: GenerationMode = "spliced",
        compare: bool = False,
        return_features: int | None = None,
        progress: bool = False,
    ) -> GenerateResponse:
        """Continue ``prompt`` (a text, token ids, or a list of either) with the SAEs spliced
        (``saes`` as in ``features``; None: all loaded, or the adapter's own) and ``interventions``
        applied: ``Intervention``s or mappings ``{"sae", "latent", "op": "set" | "add" | "scale",
        "value", "positions": "all" | "prompt" | "generated"}``. Greedy at ``temperature`` 0, else
        sampled from the ``top_p`` nucleus, reproducible with ``seed``; stops after
        ``max_new_tokens``, at end of sequence, or at a ``stop`` string. ``mode="error-preserving"``
        adds only the edit to the model's own activation. ``compare``: also the control (unsteered,
        or the base model next to ``adapter``) and the treatment's per-step KL from it.
        ``return_features``: the top latents of each generated token. ``.to_pandas()``: one row per
        generated token. The whole answer comes at the end: the client's ``timeout`` must cover the
        generation (``stream`` shows tokens as they come). Raises NotFoundError (unknown_adapter,
        unknown_sae, unknown_latent), UnprocessableEntityError (sae_not_spliced, nothing_to_compare,
        validation_error), PayloadTooLargeError, RateLimitError (every slot and the queue taken,
        after the retries). ``progress=True``: a progress bar of the generated tokens (``tqdm.auto``:
        a widget in Jupyter; needs tqdm), the answer streamed under the hood (so ``timeout`` then
        bounds each wait for a token, not the whole generation)."""
        req = self._generate(
            prompt,
            adapter=adapter,
            saes=saes,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            interventions=interventions,
            mode=mode,
            compare=compare,
            return_features=return_features,
            stream=progress,
        )
        if progress:  # streamed, to count the tokens as they come
            with contextlib.closing(self._streamed(req, progress)) as events:
                return _final(events)
        return self._generate_response(self._send(req).content)

    def stream(
        self,
        prompt: Prompt,
        *,
        adapter: str | None = None,
        saes: Sequence[str] | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        interventions: Sequence[InterventionLike] | None = None,
        mode: GenerationMode = "spliced",
        compare: bool = False,
        return_features: int | None = None,
        progress: bool = False,
    ) -> GenerationStream:
        """``generate`` streamed (Server-Sent Events): a ``TokenEvent`` per generated token as the
        server produces it (``generation`` indexes the final answer's ``generations``; ``kl`` on the
        treatment with ``compare``), then the ``GenerateResponse`` as the last item. The request is
        sent on the first ``next()`` (a refusal before the stream starts is retried as usual; nothing
        is resent once events arrived). Leave early with ``with client.stream(...) as events:`` or
        ``events.close()``: the response is closed and the server frees the generation's slot.
        ``progress=True``: the events also drive a progress bar of the generated tokens (``tqdm.auto``,
        needs tqdm; total max_new_tokens x generations, set to the count at the end)."""
        req = self._generate(
            prompt,
            adapter=adapter,
            saes=saes,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            interventions=interventions,
            mode=mode,
            compare=compare,
            return_features=return_features,
            stream=True,
        )
        return GenerationStream(self._streamed(req, progress))

    def register_adapter(
        self, name: str, path: str | None = None, *, upload: str | os.PathLike[str] | bytes | None = None
    ) -> AdapterInfo:
        """Register ``path`` (a folder inside the server's adapter root) or ``upload`` (a local
        adapter folder, packed for you, or a .tar.gz/.tar/.zip archive) under ``name``."""
        return self._parse(self._send(self._register(name, path, upload)), AdapterInfo)

    def list_adapters(self) -> AdapterInfoList:
        """The registered adapters: a list of ``AdapterInfo`` (a table in a notebook)."""
        return AdapterInfoList(self._parse(self._send(_Request("GET", "/v1/adapters")), AdapterList).adapters)

    def get_adapter(self, name: str) -> AdapterInfo:
        return self._parse(self._send(_Request("GET", _adapter_path(name))), AdapterInfo)

    def delete_adapter(self, name: str) -> None:
        self._send(_Request("DELETE", _adapter_path(name), expect=(204,)))

    def health(self) -> HealthResponse:
        """``/readyz``: raises ServiceUnavailableError while the server loads (after retries)."""
        return self._parse(self._send(_Request("GET", "/readyz")), HealthResponse)

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.25) -> HealthResponse:
        """Poll ``/readyz`` every ``interval`` seconds until the server is ready; its answer.
        Raises APITimeoutError after ``timeout`` seconds, saying which URL was tried and either the
        last connection error (refused, unknown host, timed out) or, when the server answered, what
        it said (still loading, or why its startup failed)."""
        wait = _ReadyWait(self.base_url, timeout)
        while True:
            try:
                if self._owns_http:  # each try within the time left; a given http_client: its timeouts
                    timeout_s = wait.request_timeout(self.timeout)
                    response = self._http.get("/readyz", headers=self._headers(), timeout=timeout_s)
                else:
                    response = self._http.get("/readyz", headers=self._headers())
                if response.status_code == 200:
                    return self._parse(response, HealthResponse)
                wait.answered(response)
            except httpx.TransportError as exc:
                wait.failed(exc)
            time.sleep(wait.delay(interval))

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> LoraSaeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncLoraSaeClient(_Core):
    """The asyncio twin of ``LoraSaeClient`` (same arguments, awaitable methods)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.25,
        max_backoff: float = 10.0,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, backoff, max_backoff)
        self._http = http_client or httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, transport=transport
        )
        self._owns_http = http_client is None

    async def _send(self, req: _Request) -> httpx.Response:
        attempt = 0
        while True:
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = await self._http.request(
                    req.method,
                    req.path,
                    json=req.json,
                    files=req.files,
                    data=req.data,
                    params=req.params,
                    headers=self._headers(adapter=req.adapter),
                )
            except httpx.TransportError as exc:
                outcome = exc
            if not self._should_retry(req, attempt, outcome):
                return self._result(req, outcome)
            await asyncio.sleep(self._retry_delay(attempt, outcome))
            attempt += 1

    async def _open(self, req: _Request) -> httpx.Response:
        attempt = 0
        while True:
            outcome: httpx.Response | httpx.TransportError
            try:
                request = self._http.build_request(
                    req.method,
                    req.path,
                    json=req.json,
                    params=req.params,
                    headers=self._headers(STREAM, req.adapter),
                )
                outcome = await self._http.send(request, stream=True)
            except httpx.TransportError as exc:
                outcome = exc
            if not isinstance(outcome, httpx.TransportError):
                if outcome.status_code in req.expect:
                    return outcome
                response = outcome
                try:
                    await response.aread()
                except httpx.TransportError as exc:
                    outcome = exc
                finally:
                    await response.aclose()
            if not self._should_retry(req, attempt, outcome):
                return self._result(req, outcome)
            await asyncio.sleep(self._retry_delay(attempt, outcome))
            attempt += 1

    async def _events(self, req: _Request) -> AsyncGenerator[GenerateEvent, None]:
        response = await self._open(req)
        try:
            parser = _SseParser()
            lines: AsyncIterator[str] = response.aiter_lines()
            async for line in lines:
                found = parser.feed(line)
                event = None if found is None else self._stream_event(*found, response)
                if event is not None:
                    yield event
                    if isinstance(event, GenerateResponse):
                        return
        except httpx.TransportError as exc:
            raise self._transport_error(req, exc) from exc
        finally:
            await response.aclose()
        raise self._ended_early(req)

    def _streamed(self, req: _Request, progress: bool) -> AsyncGenerator[GenerateEvent, None]:
        if not progress:
            return self._events(req)
        return _with_progress_async(self._events(req), _tqdm(), self._generation_total(req))

    async def features(
        self,
        inputs: str | Sequence[str] | Sequence[Sequence[int]],
        *,
        adapter: str | None = None,
        saes: Sequence[str] | None = None,
        top_k: int = 8,
        logits: str = "none",
        logits_top_k: int = 5,
        latents: Mapping[str, Sequence[int]] | None = None,
    ) -> FeaturesResponse:
        req = self._features(inputs, adapter, saes, top_k, logits, logits_top_k, latents)
        return self._features_response(await self._send(req))

    async def latent(self, sae: str, index: int, adapter: str | None = None) -> LatentRecord:
        return self._parse(await self._send(self._latent(sae, index, adapter)), LatentRecord)

    async def search_latents(
        self,
        sae: str,
        q: str | None = None,
        *,
        sort: LatentSort = "max_activation",
        order: SortOrder = "desc",
        min_density: float | None = None,
        max_density: float | None = None,
        include_dead: bool = False,
        limit: int = 50,
        adapter: str | None = None,
    ) -> LatentSearchResponse:
        req = self._search_latents(
            sae, q, sort, order, min_density, max_density, include_dead, limit, adapter
        )
        return self._parse(await self._send(req), LatentSearchResponse)

    async def drift(
        self,
        adapter: str,
        *,
        against: str | None = None,
        sae: str | None = None,
        side: DriftSide = "any",
        limit: int = 50,
        offset: int = 0,
    ) -> DriftReport:
        req = self._drift(adapter, against, sae, side, limit, offset)
        return self._parse(await self._send(req), DriftReport)

    async def generate(
        self,
        prompt: Prompt,
        *,
        adapter: str | None = None,
        saes: Sequence[str] | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        interventions: Sequence[InterventionLike] | None = None,
        mode: GenerationMode = "spliced",
        compare: bool = False,
        return_features: int | None = None,
        progress: bool = False,
    ) -> GenerateResponse:
        req = self._generate(
            prompt,
            adapter=adapter,
            saes=saes,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            interventions=interventions,
            mode=mode,
            compare=compare,
            return_features=return_features,
            stream=progress,
        )
        if progress:  # streamed, to count the tokens as they come
            async with contextlib.aclosing(self._streamed(req, progress)) as events:
                return await _final_async(events)
        return self._generate_response((await self._send(req)).content)

    def stream(
        self,
        prompt: Prompt,
        *,
        adapter: str | None = None,
        saes: Sequence[str] | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        interventions: Sequence[InterventionLike] | None = None,
        mode: GenerationMode = "spliced",
        compare: bool = False,
        return_features: int | None = None,
        progress: bool = False,
    ) -> AsyncGenerationStream:
        """``LoraSaeClient.stream`` for ``async for``; leave early inside ``async with
        client.stream(...) as events:`` (or ``await events.aclose()``) so the response is closed."""
        req = self._generate(
            prompt,
            adapter=adapter,
            saes=saes,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            interventions=interventions,
            mode=mode,
            compare=compare,
            return_features=return_features,
            stream=True,
        )
        return AsyncGenerationStream(self._streamed(req, progress))

    async def register_adapter(
        self, name: str, path: str | None = None, *, upload: str | os.PathLike[str] | bytes | None = None
    ) -> AdapterInfo:
        return self._parse(await self._send(self._register(name, path, upload)), AdapterInfo)

    async def list_adapters(self) -> AdapterInfoList:
        response = await self._send(_Request("GET", "/v1/adapters"))
        return AdapterInfoList(self._parse(response, AdapterList).adapters)

    async def get_adapter(self, name: str) -> AdapterInfo:
        return self._parse(await self._send(_Request("GET", _adapter_path(name))), AdapterInfo)

    async def delete_adapter(self, name: str) -> None:
        await self._send(_Request("DELETE", _adapter_path(name), expect=(204,)))

    async def health(self) -> HealthResponse:
        return self._parse(await self._send(_Request("GET", "/readyz")), HealthResponse)

    async def wait_ready(self, timeout: float = 120.0, interval: float = 0.25) -> HealthResponse:
        """``LoraSaeClient.wait_ready``, awaitable."""
        wait = _ReadyWait(self.base_url, timeout)
        while True:
            try:
                if self._owns_http:
                    timeout_s = wait.request_timeout(self.timeout)
                    response = await self._http.get("/readyz", headers=self._headers(), timeout=timeout_s)
                else:
                    response = await self._http.get("/readyz", headers=self._headers())
                if response.status_code == 200:
                    return self._parse(response, HealthResponse)
                wait.answered(response)
            except httpx.TransportError as exc:
                wait.failed(exc)
            await asyncio.sleep(wait.delay(interval))

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncLoraSaeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
