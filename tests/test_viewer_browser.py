"""The viewer page (``GET /``) in a real headless Chromium driven by Playwright, against a real
``lorasae serve`` (uvicorn) process on 127.0.0.1 over the tiny world: what the page renders must be
what the API answers for the same request.

Needs Debian's chromium (Playwright's own browser downloads are not used):
``apt-get install -y chromium chromium-driver`` (``make install`` does it when run as root).
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_fixtures import REPO, ServerProcess, world  # noqa: F401

from lorasae_client import LoraSaeClient

STATIC = REPO / "service" / "static"
SCREENSHOT = REPO / "test-output" / "viewer.png"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
INSTALL_HINT = ("the viewer test needs Debian's chromium and the playwright package: as root run "
                "`apt-get update && apt-get install -y chromium chromium-driver`, and "
                "`pip install -c constraints.txt -e '.[test]'` (`make install` does both)")
TEXT = "the cat sat on the mat and the dog was in the house"
# what the page sends by default (its form's initial values)
TOP_K, LOGITS_TOP_K = 8, 5
TOL = dict(rel=1e-4, abs=1e-4)  # shown with 4 decimals; separate forwards may batch differently


@pytest.fixture(scope="module")
def server(world, tmp_path_factory) -> Iterator[ServerProcess]:  # noqa: F811 - the imported fixture
    """`lorasae serve` with both SAEs of the tiny world and no API key, ready before the test runs."""
    with ServerProcess(world, tmp_path_factory.mktemp("viewer"), LORASAE_MAX_WAIT_MS="3") as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium; a missing browser or package fails with how to install it."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"playwright is not installed: {INSTALL_HINT}")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: {INSTALL_HINT}")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM,
                                      args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    """A fresh browser page (own context) with a desktop-sized viewport; no uncaught JS error allowed."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    js_errors = []
    pg.on("pageerror", lambda exc: js_errors.append(str(exc)))
    yield pg
    context.close()
    assert js_errors == [], f"uncaught errors in the page: {js_errors}"


def _open(page, server: ServerProcess) -> None:
    page.goto(server.url + "/")
    page.wait_for_selector('#status[data-state="ready"]')


def _run(page, runs: int) -> None:
    """Submit the form and wait for the page's ``runs``-th successful rendering."""
    page.click("#run")
    page.wait_for_selector(f'#tokens[data-state="done"][data-run="{runs}"]')


def _features(server: ServerProcess, **body) -> dict:
    body = {"inputs": TEXT, "top_k": TOP_K, "logits": "top_k", "logits_top_k": LOGITS_TOP_K, **body}
    resp = httpx.post(server.url + "/v1/features", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _activation(token: dict, sae: str, latent: int) -> float | None:
    return next((f["activation"] for f in token["features"].get(sae, []) if f["index"] == latent), None)


def _most_active(tokens: list[dict], sae: str) -> int:
    """The page's default latent: highest activation on any token after position 0."""
    best = max(((f["activation"], f["index"]) for t in tokens[1:] for f in t["features"][sae]),
               key=lambda pair: pair[0])
    return best[1]


def _rows(page, selector: str) -> list[list[str]]:
    """The text of every cell of every table row matched by ``selector``."""
    return page.eval_on_selector_all(selector, "rs => rs.map(r => [...r.cells].map(c => c.textContent))")


def _approx(value: float | None):
    return None if value is None else pytest.approx(value, **TOL)


def _shown(text: str) -> float | None:
    """A number as the page prints it (4 decimals, + on positive deltas, an em dash for none)."""
    return None if text == "\u2014" else float(text)


def _assert_token_activations(page, tokens: list[dict], sae: str, latent: int) -> None:
    spans = page.eval_on_selector_all("#tokens .tok", "ss => ss.map(s => s.dataset.activation)")
    expected = [_activation(t, sae, latent) for t in tokens]
    assert [None if a == "" else float(a) for a in spans] == [_approx(e) for e in expected]
    assert any(e is not None for e in expected)  # the latent is active somewhere: colours are shown


def test_page_and_assets_are_served_by_the_service(server):
    index = httpx.get(server.url + "/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert 'src="static/viewer.js"' in index.text and 'href="static/viewer.css"' in index.text
    for name, kind in (("viewer.js", "javascript"), ("viewer.css", "text/css")):
        asset = httpx.get(f"{server.url}/static/{name}")
        assert asset.status_code == 200 and kind in asset.headers["content-type"]
        assert asset.text == (STATIC / name).read_text()
    for path in STATIC.iterdir():  # nothing is fetched from outside the server
        assert not re.search(r"https?://|url\(|@import", path.read_text()), path.name
    missing = httpx.get(server.url + "/static/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert "/" not in httpx.get(server.url + "/openapi.json").json()["paths"]


def test_viewer_renders_what_the_api_answers(page, server):
    with LoraSaeClient(server.url) as api:
        api.register_adapter("a1", "a1")  # trained with sae1; LoRA in blocks 2 and 3
    requested = []
    page.on("request", lambda request: requested.append(request))
    _open(page, server)
    adapters = [""] + [a["name"] for a in httpx.get(server.url + "/v1/adapters").json()["adapters"]]
    assert page.eval_on_selector_all("#adapter option", "os => os.map(o => o.value)") == adapters
    assert "a1" in adapters
    saes = [s["id"] for s in httpx.get(server.url + "/readyz").json()["saes"]]
    shown = page.eval_on_selector_all("#sae option", "os => os.map(o => o.value)")
    assert shown == saes == ["sae1", "sae2"]

    page.select_option("#sae", "sae2")
    page.select_option("#adapter", "a1")
    assert page.input_value("#sae") == "sae1"  # picking an adapter switches to one of its own SAEs
    page.select_option("#sae", "sae2")  # view sae2: spliced with a1's sae1, inside a1's LoRA layers
    page.fill("#text", TEXT)
    _run(page, 1)

    # the page sent the adapter request and the same request on the base model
    sent = sorted((r.post_data_json for r in requested if r.url.endswith("/v1/features")),
                  key=lambda body: body["adapter"] or "")
    body = {"inputs": TEXT, "saes": ["sae1", "sae2"], "top_k": TOP_K, "logits": "top_k",
            "logits_top_k": LOGITS_TOP_K}
    assert sent == [{**body, "adapter": None}, {**body, "adapter": "a1"}]
    assert all(r.url.startswith(server.url + "/") for r in requested)  # nothing from outside

    adapted = _features(server, adapter="a1", saes=["sae1", "sae2"])
    base = _features(server, adapter=None, saes=["sae1", "sae2"])
    tokens, base_tokens = adapted["results"][0]["tokens"], base["results"][0]["tokens"]

    # a1 was trained with sae1 alone: the server's splice-set warning is shown as it came
    (warning,) = adapted["warnings"]
    shown_warnings = page.eval_on_selector_all(
        "#run-warnings .warning", "ws => ws.map(w => [w.dataset.code, w.textContent])")
    assert shown_warnings == [[warning["code"], "warning: " + warning["message"]]]
    assert warning["code"] == "splice_set_differs" and "warnings" not in base  # no adapter: no warning

    # tokens: texts, ids, positions; coloured by the most active latent of sae2
    spans = page.eval_on_selector_all(
        "#tokens .tok", "ss => ss.map(s => [s.textContent, +s.dataset.position, +s.dataset.id])")
    assert spans == [[t["text"], t["position"], t["id"]] for t in tokens]
    assert len(spans) == len(tokens) > 10
    latent = _most_active(tokens, "sae2")
    assert page.get_attribute("#latent-info", "data-latent") == str(latent)
    _assert_token_activations(page, tokens, "sae2", latent)
    peak = max(range(1, len(tokens)), key=lambda i: _activation(tokens[i], "sae2", latent) or -1.0)
    peak_colour = page.eval_on_selector(f'.tok[data-position="{peak}"]', "s => s.style.backgroundColor")
    assert peak_colour.startswith("rgba(234, 88, 12")
    assert float(page.get_attribute("#latent-info", "data-max")) == _approx(
        _activation(tokens[peak], "sae2", latent))

    # hover panel: the token's top-k latents and next-token logits, as the API gives them
    position = 3
    page.hover(f'#tokens .tok[data-position="{position}"]')
    page.wait_for_selector(f'#panel[data-position="{position}"]')
    token = tokens[position]
    assert page.text_content("#panel-text") == token["text"]
    assert page.text_content("#panel-id") == str(token["id"])
    assert _shown(page.text_content("#panel-loss")) == _approx(token["loss"])
    assert _shown(page.text_content("#panel-recon")) == _approx(token["recon_error"]["sae2"])
    rows = _rows(page, "#panel-latents tbody tr")
    assert [int(r[0]) for r in rows] == [f["index"] for f in token["features"]["sae2"]]
    assert [float(r[1]) for r in rows] == [_approx(f["activation"]) for f in token["features"]["sae2"]]
    assert len(rows) == TOP_K  # a TopK SAE with k = 8: all of them active
    logits = _rows(page, "#panel-logits tbody tr")
    ids = page.eval_on_selector_all("#panel-logits tbody tr", "rs => rs.map(r => +r.dataset.id)")
    assert ids == [e["id"] for e in token["top_logits"]]
    assert [r[0] for r in logits] == [e["text"] for e in token["top_logits"]]
    assert [float(r[1]) for r in logits] == [_approx(e["logprob"]) for e in token["top_logits"]]
    assert len(logits) == LOGITS_TOP_K
    assert all(re.fullmatch(r"-?\d+\.\d{4}", r[1]) for r in rows)  # fixed format: 4 decimals

    # base vs adapter, per token and mean, on the same splice
    def column(col: str) -> list[float | None]:
        cells = page.eval_on_selector_all(f'#compare-table tbody td[data-col="{col}"]',
                                          "cs => cs.map(c => c.textContent)")
        return [_shown(c) for c in cells]

    def mean_cell(col: str) -> float | None:
        return _shown(page.text_content(f'#compare-mean td[data-col="{col}"]'))

    base_loss, adapter_loss = [t["loss"] for t in base_tokens], [t["loss"] for t in tokens]
    base_recon = [t["recon_error"]["sae2"] for t in base_tokens]
    adapter_recon = [t["recon_error"]["sae2"] for t in tokens]
    assert column("base-loss") == [_approx(v) for v in base_loss]
    assert column("adapter-loss") == [_approx(v) for v in adapter_loss]
    assert column("delta-loss") == [None if a is None else pytest.approx(a - b, abs=2e-4)
                                    for b, a in zip(base_loss, adapter_loss)]
    assert column("base-recon") == [_approx(v) for v in base_recon]
    assert column("adapter-recon") == [_approx(v) for v in adapter_recon]
    assert column("base-loss")[-1] is None  # nothing to predict after the last token
    # a1's LoRA in block 2 changes the residual stream that sae2 reads
    assert max(abs(a - b) for a, b in zip(base_recon, adapter_recon)) > 1e-3
    loss_mean = [math.fsum(v[:-1]) / (len(v) - 1) for v in (base_loss, adapter_loss)]
    recon_mean = [math.fsum(v[1:]) / (len(v) - 1) for v in (base_recon, adapter_recon)]
    assert [mean_cell("base-loss"), mean_cell("adapter-loss")] == [_approx(v) for v in loss_mean]
    assert [mean_cell("base-recon"), mean_cell("adapter-recon")] == [_approx(v) for v in recon_mean]
    assert mean_cell("delta-loss") == pytest.approx(loss_mean[1] - loss_mean[0], abs=2e-4)

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    data = SCREENSHOT.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000

    # clicking a latent in the panel recolours the tokens by it; focusing a token moves the panel
    other = token["features"]["sae2"][1]["index"]
    page.click(f'#panel-latents tr[data-index="{other}"]')
    assert page.input_value("#latent") == str(other)
    assert page.get_attribute("#latent-info", "data-latent") == str(other)
    _assert_token_activations(page, tokens, "sae2", other)
    page.fill("#latent", "64")  # d_sae = 64: out of range, said on the page
    assert page.get_attribute("#error", "data-code") == "bad_latent" and page.is_visible("#error")
    page.fill("#latent", "")  # empty: back to the most active latent
    assert page.get_attribute("#latent-info", "data-latent") == str(latent) and page.is_hidden("#error")
    page.focus('#tokens .tok[data-position="1"]')
    page.wait_for_selector('#panel[data-position="1"]')
    assert page.text_content("#panel-text") == tokens[1]["text"]


def test_viewer_shows_api_errors(page, server):
    _open(page, server)
    page.fill("#text", TEXT)
    page.fill("#top-k", "0")
    page.click("#run")
    page.wait_for_selector('#tokens[data-state="error"]')
    api = httpx.post(server.url + "/v1/features", json={
        "inputs": TEXT, "adapter": None, "saes": ["sae1"], "top_k": 0, "logits": "top_k",
        "logits_top_k": LOGITS_TOP_K})
    assert api.status_code == 422
    assert page.get_attribute("#error", "data-code") == api.json()["error"]["code"] == "validation_error"
    assert page.text_content("#error .message") == api.json()["error"]["message"]
    assert page.is_visible("#error") and page.locator("#tokens .tok").count() == 0

    # an adapter deleted after the page listed it: the 404 is shown, and cleared by the next good run
    with LoraSaeClient(server.url) as client:
        client.register_adapter("gone", "a2")
        page.reload()
        page.wait_for_selector('#status[data-state="ready"]')
        page.select_option("#adapter", "gone")
        client.delete_adapter("gone")
    page.fill("#text", TEXT)
    page.click("#run")
    page.wait_for_selector('#tokens[data-state="error"]')
    assert page.get_attribute("#error", "data-code") == "unknown_adapter"
    assert page.get_attribute("#error", "data-status") == "404"
    assert "gone" in page.text_content("#error .message")
    page.select_option("#adapter", "")
    _run(page, 1)
    assert page.is_hidden("#error") and page.locator("#tokens .tok").count() > 0
