"""The client in Jupyter (issue #18): the HTML views (``_repr_html_``) and one-line reprs of what the
client's calls return, built from real answers of an in-process server over the tiny world
(features, a served latent dashboard, the adapter list, a drift report); tqdm progress of a
generation (``progress=True``); and ``wait_ready``'s errors (a closed port, a server that is not
ready)."""

from __future__ import annotations

import asyncio
import html
import re
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from dashboard_fixtures import default_dead, write_dashboard
from drift_fixtures import write_drift_report
from fastapi.testclient import TestClient
from service_fixtures import TEXTS, client, engine, register, settings, world  # noqa: F401

from lorasae_client import (
    AdapterInfoList,
    APITimeoutError,
    AsyncLoraSaeClient,
    FeaturesResponse,
    GenerateResponse,
    LoraSaeClient,
    TokenEvent,
)
from lorasae_client import display as display_module
from lorasae_client.schemas import AdapterList

SPAN = re.compile(r'<span class="lsae-tok"([^>]*)>([^<]*)</span>')
STRIP = re.compile(r'<div class="lsae-strip" data-input="(\d+)" data-sae="([^"]*)">(.*?)</div>', re.S)
HUE = re.compile(r"background:hsla\(([\d.]+),80%,55%,([\d.]+)\)")
PROMPT = "the cat sat on the"
STEER = {"sae": "sae2", "latent": 3, "op": "set", "value": 6.0}
INJECTED = "<script>alert('x')</script>"


def _attr(attrs: str, name: str) -> str | None:
    found = re.search(rf'{name}="([^"]*)"', attrs)
    return None if found is None else found.group(1)


def _one_line(text: str, start: str) -> None:
    assert text.startswith(start), text
    assert "\n" not in text and len(text) < 240, text


def _html_formats(obj: Any) -> None:
    """IPython's display machinery finds the HTML (what ``display(obj)`` in a notebook shows)."""
    formatters = pytest.importorskip("IPython.core.formatters")
    data, _ = formatters.DisplayFormatter().format(obj)
    assert data["text/html"] == obj._repr_html_()
    assert data["text/plain"]


@pytest.fixture
def api(client) -> LoraSaeClient:  # noqa: F811 - the imported fixture
    return LoraSaeClient(http_client=client)


# ------------------------------------------------------------------ features


def test_features_html_one_span_per_token_escaped_and_coloured(api):
    inputs = [*TEXTS, f"the cat {INJECTED} sat"]
    resp = api.features(inputs, top_k=4, saes=["sae1", "sae2"])
    page = resp._repr_html_()
    _html_formats(resp)

    strips = STRIP.findall(page)
    assert [(int(i), sae) for i, sae, _ in strips] == [
        (i, sae) for sae in ("sae1", "sae2") for i in range(len(inputs))
    ]
    hues: dict[str, set[str]] = {}
    for i, sae, body in strips:
        tokens = resp.results[int(i)].tokens
        spans = SPAN.findall(body)
        assert len(spans) == len(tokens)  # one span per token
        # the text of each span is the token's text, escaped
        assert [html.unescape(text) for _, text in spans] == [t.text for t in tokens]
        assert [text for _, text in spans] == [html.escape(t.text) for t in tokens]
        alphas = []
        for (attrs, _), tok in zip(spans, tokens):
            feats = tok.features.get(sae, [])
            top = max(feats, key=lambda f: f.activation) if feats else None
            assert _attr(attrs, "data-position") == str(tok.position)
            title = html.unescape(_attr(attrs, "title") or "")
            assert "next-token loss" in title
            if top is None:
                assert _attr(attrs, "data-latent") == "" and "style" not in attrs
                continue
            assert _attr(attrs, "data-latent") == str(top.index)
            assert f"latent {top.index}: " in title
            hue, alpha = HUE.search(attrs).groups()  # type: ignore[union-attr]
            hues.setdefault(str(top.index), set()).add(hue)
            alphas.append(float(alpha))
        if len(alphas) > 1:  # the strongest top activation after position 0 is fully coloured
            assert max(alphas[1:]) == pytest.approx(0.85)
    assert all(len(h) == 1 for h in hues.values())  # a latent has one colour
    assert len(hues) >= 3
    distinct = {next(iter(h)) for h in hues.values()}
    assert len(distinct) == len(hues)  # different top latents, different colours

    # untrusted text never reaches the page raw: the BOS token "<s>" and a token of the injection
    assert "<s>" not in page and "<script" not in page
    bad = resp.model_copy(deep=True)
    bad.results[0].tokens[1].text = INJECTED
    bad.model = '"><img src=x onerror=alert(1)>'
    shown = bad._repr_html_()
    assert "<script>" not in shown and "<img" not in shown
    assert html.escape(INJECTED) in shown

    _one_line(repr(resp), "FeaturesResponse(model=")
    assert f"{len(inputs)} inputs" in repr(resp)
    assert f"{sum(len(r.tokens) for r in resp.results)} tokens" in repr(resp)
    assert "SAEs ['sae1', 'sae2']" in repr(resp)


def test_features_html_is_bounded(api, monkeypatch):
    resp = api.features(TEXTS, top_k=2, saes=["sae1"])
    tokens = [len(r.tokens) for r in resp.results]
    monkeypatch.setattr(display_module, "MAX_TOKENS", tokens[0] + 2)  # one SAE: all of input 0, 2 more
    page = resp._repr_html_()
    assert len(SPAN.findall(page)) == tokens[0] + 2
    assert f"… {tokens[1] - 2} more tokens not shown" in page
    assert f"… 1 more input ({tokens[2]} tokens) not shown" in page

    # a big answer: 40 inputs of 900 tokens, 2 SAEs, 8 latents each
    monkeypatch.undo()
    feats = [{"index": j * 7 % 64, "activation": 1.0 + j} for j in range(8)]
    big = FeaturesResponse.model_validate(
        {
            "model": "m",
            "saes": [{"id": "s1", "layer": 1, "d_sae": 64}, {"id": "s2", "layer": 2, "d_sae": 64}],
            "results": [
                {
                    "tokens": [
                        {
                            "position": p,
                            "id": p,
                            "text": f" t{p}",
                            "loss": 1.0,
                            "features": {"s1": feats, "s2": feats},
                        }
                        for p in range(900)
                    ]
                }
                for _ in range(40)
            ],
        }
    )
    started = time.monotonic()
    page = big._repr_html_()
    assert time.monotonic() - started < 5
    assert len(SPAN.findall(page)) == display_module.MAX_TOKENS
    assert len(page) < display_module.MAX_TOKENS * 500 + 20_000
    notes, left = [], display_module.MAX_TOKENS // 2  # each SAE gets half
    for i in range(40):
        if left <= 0:
            notes.append(f"… {40 - i} more inputs ({(40 - i) * 900} tokens) not shown")
            break
        shown = min(display_module.MAX_TOKENS_PER_INPUT, left, 900)
        left -= shown
        if shown < 900:
            notes.append(f"… {900 - shown} more tokens not shown")
    assert notes and notes[-1].startswith("… ") and "inputs" in notes[-1]
    for note in notes:
        assert page.count(note) == 2 * notes.count(note)  # once per SAE
    _one_line(repr(big), "FeaturesResponse(model='m', adapter=None, 40 inputs, 36000 tokens")


# ------------------------------------------------------------------ adapters


def test_adapter_table_rows_are_the_registered_adapters(api, client, settings):  # noqa: F811
    assert api.wait_ready(timeout=10).status == "ready"
    empty = api.list_adapters()
    assert empty == [] and "no adapters registered" in empty._repr_html_()
    api.register_adapter("a1", "a1")
    api.register_adapter("up", upload=settings.adapter_root / "a2")
    assert register(client, "a12").status_code == 201

    adapters = api.list_adapters()
    assert isinstance(adapters, AdapterInfoList) and isinstance(adapters, list)
    page = adapters._repr_html_()
    _html_formats(adapters)
    rows = re.findall(r'<tr data-adapter="([^"]*)">(.*?)</tr>', page, re.S)
    assert [name for name, _ in rows] == [a.name for a in adapters]
    assert sorted(a.name for a in adapters) == ["a1", "a12", "up"]
    headers = re.findall(r"<th>([^<]*)</th>", page)
    assert headers == ["name", "status", "rank", "SAEs", "source", "created", "error"]
    for (_, row), info in zip(rows, adapters):
        cells = [html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td>(.*?)</td>", row, re.S)]
        assert cells[0] == info.name and cells[1] == info.status == "ready"
        assert cells[2] == str(info.rank) and cells[3] == ", ".join(s.id for s in info.saes)
        assert cells[4].startswith(info.source) and cells[5] == info.created_at and cells[6] == ""

    listing = AdapterList(adapters=list(adapters))
    assert re.findall(r'<tr data-adapter="([^"]*)">', listing._repr_html_()) == [a.name for a in adapters]
    _one_line(repr(listing), "AdapterList(3 adapters: [")
    one = api.get_adapter("up")
    _one_line(repr(one), "AdapterInfo(name='up', status='ready', rank=8, SAEs ['sae1'], source='upload'")
    assert re.findall(r'<tr data-adapter="([^"]*)">', one._repr_html_()) == ["up"]

    broken = one.model_copy(update={"name": "x<b>", "status": "error", "error": "weights <missing>"})
    page = broken._repr_html_()
    assert "x&lt;b&gt;" in page and "weights &lt;missing&gt;" in page and "<b>" not in page
    assert "error='weights <missing>'" in repr(broken)


# ------------------------------------------------------------------ latent records and drift


@pytest.fixture
def served(world, tmp_path, engine) -> Iterator[LoraSaeClient]:  # noqa: F811 - the imported fixtures
    """An in-process server with a dashboard of both SAEs and a drift report of a1 (registered)."""
    dashboard = write_dashboard(tmp_path / "dash", engine)
    drift = write_drift_report(tmp_path / "drift-a1", engine, world.adapters / "a1")
    s = world.settings(tmp_path, dashboards=[str(dashboard)], drift=[str(drift)])
    from lorasae.service.app import create_app

    with TestClient(create_app(s, engine), base_url="http://localhost") as test_client:
        assert register(test_client, "a1").status_code == 201
        yield LoraSaeClient(http_client=test_client)


def test_latent_record_and_drift_report_html(served):
    alive = next(i for i in range(64) if i not in default_dead(64))
    record = served.latent("sae1", alive)
    page = record._repr_html_()
    _html_formats(record)
    assert f'data-sae="sae1" data-index="{alive}"' in page
    assert f"density {record.density:.3%}" in page and 'lsae-error">dead' not in page

    # the histogram: one bar per bin from one before the first non-empty bin to one after the last
    counts = record.histogram.counts
    nonzero = [i for i, c in enumerate(counts) if c > 0]
    first, last = max(0, nonzero[0] - 1), min(len(counts) - 1, nonzero[-1] + 1)
    bars = re.findall(r'<rect [^>]*data-bin="(\d+)" data-count="(\d+)"', page)
    assert [(int(b), int(c)) for b, c in bars] == [(i, counts[i]) for i in range(first, last + 1)]

    # top contexts: one row each, the context's token outlined, every token's text escaped
    top = re.search(r'<ol class="lsae-contexts" data-kind="top">(.*?)</ol>', page, re.S).group(1)  # type: ignore[union-attr]
    rows = re.findall(r"<li (.*?)</li>", top, re.S)
    assert len(rows) == min(len(record.top_contexts), display_module.MAX_CONTEXTS) > 0
    for row, context in zip(rows, record.top_contexts):
        marked = re.findall(r'<span class="lsae-tok lsae-max"[^>]*>([^<]*)</span>', row)
        assert marked == [html.escape(context.tokens[context.position - context.start].text)]
        texts = re.findall(r'<span class="lsae-tok[^"]*"[^>]*>([^<]*)</span>', row)
        assert texts == [html.escape(t.text) for t in context.tokens][: display_module.MAX_CONTEXT_TOKENS]
    chips = re.findall(r'<span class="lsae-chip"[^>]*>([^<]*) <small>', page)
    expected = [*record.logit_lens.promoted, *record.logit_lens.suppressed]
    expected += [*record.causal_effect.promoted, *record.causal_effect.suppressed]
    assert chips == [html.escape(v.text) for v in expected]
    assert "<s>" not in page  # BOS in the windows, escaped
    _one_line(repr(record), f"LatentRecord(sae='sae1', index={alive}, adapter=None, density=")

    dead = served.latent("sae1", default_dead(64)[0])
    assert dead.dead and '<span class="lsae-error">dead</span>' in dead._repr_html_()
    assert "histogram: no activation" in dead._repr_html_()
    assert repr(dead).endswith(", dead)")

    report = served.drift("a1", side="all", limit=20)
    page = report._repr_html_()
    _html_formats(report)
    latents = re.findall(r'<tr data-sae="([^"]*)" data-latent="(\d+)">', page)
    assert latents == [(x.sae, str(x.latent)) for x in report.latents] and len(latents) == 20
    assert re.findall(r'<tr data-sae="([^"]*)">', page) == [s.sae for s in report.saes]
    assert "against the base model" in page
    _one_line(repr(report), "DriftReport(adapter='a1', against=None, side='all', SAEs [")
    assert f"20 of {report.total} latents)" in repr(report)

    hits = served.search_latents("sae1", limit=5)
    assert len(re.findall(r'<tr data-latent="(\d+)">', hits._repr_html_())) == len(hits.latents)
    _one_line(repr(hits), "LatentSearchResponse(sae='sae1'")


# ------------------------------------------------------------------ progress


class Recorder:
    """Stands in for ``tqdm.auto.tqdm``: records what a bar is told."""

    bars: list[Recorder] = []

    def __init__(self, total: int | None = None, **kwargs: Any) -> None:
        self.total = total
        self.initial_total = total
        self.kwargs = kwargs
        self.n = 0
        self.updates = 0
        self.closed = False
        Recorder.bars.append(self)

    def update(self, n: int = 1) -> None:
        assert not self.closed
        self.n += n
        self.updates += 1

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def recorder(monkeypatch) -> type[Recorder]:
    import tqdm.auto

    Recorder.bars = []
    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    return Recorder


def test_progress_counts_the_generated_tokens(api, recorder):
    with api.stream(PROMPT, max_new_tokens=6, progress=True) as events:
        got = list(events)
    (bar,) = recorder.bars
    tokens = [e for e in got if isinstance(e, TokenEvent)]
    answer = got[-1]
    assert isinstance(answer, GenerateResponse)
    assert bar.initial_total == 6 and bar.kwargs["unit"] == "tok"
    assert bar.n == bar.updates == len(tokens) == answer.usage.generated_tokens > 0
    assert bar.total == bar.n and bar.closed

    # generate(progress=True): streamed under the hood, the same answer as without
    answer = api.generate(
        [PROMPT, "a dog"], max_new_tokens=4, interventions=[STEER], compare=True, progress=True
    )
    bar = recorder.bars[-1]
    assert bar.initial_total == 2 * 2 * 4  # prompts x (control, treatment) x max_new_tokens
    assert bar.n == answer.usage.generated_tokens == sum(len(g.tokens) for g in answer.generations)
    assert bar.closed and len(answer.generations) == 4
    plain = api.generate([PROMPT, "a dog"], max_new_tokens=4, interventions=[STEER], compare=True)
    assert [g.tokens for g in plain.generations] == [g.tokens for g in answer.generations]
    assert len(recorder.bars) == 2  # no bar without progress=True

    # leaving a stream early closes its bar
    with api.stream(PROMPT, max_new_tokens=8, progress=True) as events:
        next(events)
    assert recorder.bars[-1].closed and recorder.bars[-1].n == 1


def test_async_progress(world, tmp_path, engine, recorder):  # noqa: F811
    from lorasae.service.app import create_app

    app = create_app(world.settings(tmp_path), engine)

    async def main() -> tuple[list[Any], GenerateResponse]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with AsyncLoraSaeClient("http://localhost", transport=transport) as api:
                async with api.stream(PROMPT, max_new_tokens=5, progress=True) as events:
                    streamed = [event async for event in events]
                return streamed, await api.generate([PROMPT, "a dog"], max_new_tokens=3, progress=True)

    streamed, answer = asyncio.run(main())
    first, second = recorder.bars
    assert first.initial_total == 5 and first.closed
    assert first.n == sum(isinstance(e, TokenEvent) for e in streamed) == streamed[-1].usage.generated_tokens
    assert second.initial_total == 2 * 3 and second.n == answer.usage.generated_tokens and second.closed


def test_progress_without_tqdm_says_how_to_get_it(monkeypatch):
    sent: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500)

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import tqdm.auto fails
    api = LoraSaeClient("http://test", transport=httpx.MockTransport(server))
    with pytest.raises(ImportError, match="pip install tqdm"):
        api.stream(PROMPT, progress=True)
    with pytest.raises(ImportError, match="pip install tqdm"):
        api.generate(PROMPT, progress=True)
    assert sent == []  # refused before anything was sent


# ------------------------------------------------------------------ wait_ready


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_wait_ready_on_a_closed_port_names_the_url():
    url = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(APITimeoutError) as exc:
        LoraSaeClient(url).wait_ready(timeout=1.0, interval=0.1)
    assert time.monotonic() - started < 1.0 + 2.0
    message = str(exc.value)
    assert f"{url}/readyz not reachable within 1.0 s" in message
    assert "ConnectError" in message and "last error" in message

    async def main() -> None:
        async with AsyncLoraSaeClient(url) as api:
            await api.wait_ready(timeout=0.5, interval=0.1)

    started = time.monotonic()
    with pytest.raises(APITimeoutError, match=re.escape(f"{url}/readyz not reachable within 0.5 s")):
        asyncio.run(main())
    assert time.monotonic() - started < 0.5 + 2.0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"status": "loading"}, "the server answered 503, still loading the model"),
        (
            {"status": "error", "detail": "no model at /x"},
            "the server answered 503, startup failed: no model at /x",
        ),
    ],
)
def test_wait_ready_on_a_server_that_is_not_ready(body, expected):
    def server(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/readyz"
        return httpx.Response(503, json=body, headers={"Retry-After": "1"})

    transport = httpx.MockTransport(server)
    with pytest.raises(APITimeoutError) as exc:
        LoraSaeClient("http://svc:9", transport=transport).wait_ready(timeout=0.3, interval=0.05)
    assert "http://svc:9/readyz not ready after 0.3 s" in str(exc.value) and expected in str(exc.value)

    async def main() -> None:
        async with AsyncLoraSaeClient("http://svc:9", transport=transport) as api:
            await api.wait_ready(timeout=0.3, interval=0.05)

    with pytest.raises(APITimeoutError, match=re.escape(expected)):
        asyncio.run(main())


def test_wait_ready_returns_once_ready():
    answers = iter([503, 503, 200])

    def server(request: httpx.Request) -> httpx.Response:
        status = next(answers)
        if status == 503:
            return httpx.Response(503, json={"status": "loading"})
        return httpx.Response(200, json={"status": "ready", "model": "m"})

    health = LoraSaeClient("http://svc", transport=httpx.MockTransport(server)).wait_ready(5, interval=0.01)
    assert health.status == "ready" and health.model == "m"
