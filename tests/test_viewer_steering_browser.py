"""The viewer page's steering panel in a real headless Chromium (Playwright), against a real ``lorasae
serve`` process over the tiny world with one generation slot and no queue: opened from a token's
panel (and from a latent's dashboard, and by its URL), it streams the unsteered and steered
continuations side by side token by token (``POST /v1/generate``, ``stream`` + ``compare``) with the
steered one's KL per step, and what it shows is the API's answer to the same request; Stop aborts
the stream and the server frees the slot.

Screenshots go to ``test-output/steering/``.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from service_fixtures import REPO, ServerProcess, wait_until, world  # noqa: F401
from test_viewer_browser import TEXT, _open, _run, browser, page  # noqa: F401

SHOTS = REPO / "test-output" / "steering"
TOL = dict(rel=1e-4, abs=1e-4)

# what the page shows in one column of the steering output
READ_COLUMN = """col => ({
  tokens: [...col.querySelectorAll(".gtok")].map(t => ({
    index: +t.dataset.index, id: +t.dataset.id, text: t.textContent,
    kl: t.dataset.kl === "" ? null : +t.dataset.kl})),
  bars: [...col.querySelectorAll(".klbar")].map(b => ({index: +b.dataset.index, value: +b.dataset.value,
                                                     height: b.style.height})),
  reason: col.querySelector(".finish").dataset.reason ?? null,
  finish: col.querySelector(".finish").textContent})"""


@pytest.fixture(scope="module")
def server(world, tmp_path_factory) -> Iterator[ServerProcess]:  # noqa: F811 - the imported fixture
    """One generation slot, no queue (a second generation is refused while one runs), and long
    generations allowed, so that one is still streaming when Stop is pressed."""
    env = dict(
        LORASAE_MAX_GENERATIONS="1",
        LORASAE_MAX_GENERATION_QUEUE="0",
        LORASAE_MAX_NEW_TOKENS="4000",
        LORASAE_MAX_TOKENS="4096",
        LORASAE_MAX_WAIT_MS="3",
    )
    with ServerProcess(world, tmp_path_factory.mktemp("steering-viewer"), **env) as server:
        yield server


def _column(pg, variant: str) -> dict:
    return pg.eval_on_selector(f'#steer-output .steer-col[data-variant="{variant}"]', READ_COLUMN)


def _generate(server: ServerProcess, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/generate", json=body, timeout=120)


def _metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    (value,) = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} ")]
    return value


def _screenshot(pg, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    pg.locator("#steering").screenshot(path=str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_steer_a_latent_from_a_token_panel(page, server):  # noqa: F811 - imported fixtures
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/generate") else None)
    _open(page, server)
    assert page.get_attribute("#steer-output", "data-state") == "empty" and page.is_enabled("#steer-run")
    page.select_option("#sae", "sae2")
    page.fill("#text", TEXT)
    _run(page, 1)
    page.hover('#tokens .tok[data-position="3"]')
    page.wait_for_selector('#panel[data-position="3"]')
    latent = int(page.get_attribute("#panel-latents tbody tr:nth-child(1)", "data-index"))
    page.click(f'#panel-latents tr[data-index="{latent}"] button.steer')
    # the panel opens with that SAE and latent (the run's adapter: none), and says so in the URL
    assert (page.input_value("#steer-sae"), page.input_value("#steer-latent")) == ("sae2", str(latent))
    assert page.input_value("#steer-adapter") == "" and page.evaluate("location.hash") == (
        f"#steer?sae=sae2&latent={latent}"
    )
    assert page.evaluate("document.activeElement.id") == "steer-value"
    assert page.input_value("#latent") == ""  # the steer button did not also pick the latent to colour by
    page.fill("#steer-prompt", "the cat sat on the")
    page.select_option("#steer-op", "set")
    page.fill("#steer-value", "50")
    page.fill("#steer-max", "8")
    page.click("#steer-run")
    page.wait_for_selector('#steer-output[data-run="1"]:not([data-state="streaming"])')
    assert page.get_attribute("#steer-output", "data-state") == "done" and page.is_hidden("#error")
    assert page.is_enabled("#steer-run") and page.is_disabled("#steer-stop")

    # the page asked for both continuations, streamed, with the latent set to 50 while generating
    (body,) = sent
    assert body == {
        "prompt": "the cat sat on the",
        "adapter": None,
        "saes": ["sae2"],
        "max_new_tokens": 8,
        "temperature": 0,
        "seed": None,
        "stream": True,
        "compare": True,
        "interventions": [{"sae": "sae2", "latent": latent, "op": "set", "value": 50, "positions": "all"}],
    }
    resp = _generate(server, {**body, "stream": False})
    assert resp.status_code == 200, resp.text
    unsteered, steered = resp.json()["generations"]
    assert (unsteered["variant"], steered["variant"]) == ("unsteered", "steered")
    for variant, generation in (("unsteered", unsteered), ("steered", steered)):
        shown = _column(page, variant)
        assert [(t["index"], t["id"], t["text"]) for t in shown["tokens"]] == [
            (i, t["id"], t["text"]) for i, t in enumerate(generation["tokens"])
        ]
        assert len(shown["tokens"]) > 0 and shown["reason"] == generation["finish_reason"]
        assert generation["finish_reason"] in shown["finish"]
    text = {v: "".join(t["text"] for t in _column(page, v)["tokens"]) for v in ("unsteered", "steered")}
    assert text["steered"] != text["unsteered"]  # the steering shows
    # the steered column's KL per step: on its tokens and as bars scaled to the largest
    shown = _column(page, "steered")
    assert [t["kl"] for t in shown["tokens"]] == [pytest.approx(k, **TOL) for k in steered["kl"]]
    assert [b["value"] for b in shown["bars"]] == [pytest.approx(k, **TOL) for k in steered["kl"]]
    top = max(steered["kl"])
    assert top > 1e-3 and [float(b["height"].rstrip("%")) for b in shown["bars"]] == [
        pytest.approx(max(2.0, 100 * k / top), abs=0.06) for k in steered["kl"]
    ]
    assert all(t["kl"] is None for t in _column(page, "unsteered")["tokens"])
    assert _column(page, "unsteered")["bars"] == []
    mean = sum(steered["kl"]) / len(steered["kl"])
    assert float(page.get_attribute("#steer-output .kl-info", "data-mean")) == pytest.approx(mean, **TOL)
    _screenshot(page, f"sae2-latent{latent}-set50")

    # a latent the SAE does not have: the API's error, on the page
    page.fill("#steer-latent", "64")
    page.click("#steer-run")
    page.wait_for_selector('#steer-output[data-run="2"]:not([data-state="streaming"])')
    error = _generate(
        server, {**body, "stream": False, "interventions": [{**body["interventions"][0], "latent": 64}]}
    ).json()["error"]
    assert page.get_attribute("#steer-output", "data-state") == "error"
    assert page.get_attribute("#error", "data-code") == error["code"] == "unknown_latent"
    assert page.text_content("#error .message") == error["message"]


def test_stop_aborts_the_stream_and_frees_the_slot(page, server):  # noqa: F811 - imported fixtures
    page.goto(f"{server.url}/#steer?sae=sae1&latent=5")
    page.wait_for_selector('#status[data-state="ready"]')
    assert (page.input_value("#steer-sae"), page.input_value("#steer-latent")) == ("sae1", "5")
    generated = _metric(server, "lorasae_generated_tokens_total")
    page.fill("#steer-max", "4000")
    page.select_option("#steer-op", "add")
    page.fill("#steer-value", "20")
    page.click("#steer-run")
    # tokens show up while the generation runs (streamed, not at the end)
    page.wait_for_selector('#steer-output .steer-col[data-variant="steered"] .gtok:nth-child(3)')
    assert page.get_attribute("#steer-output", "data-state") == "streaming"
    assert page.is_disabled("#steer-run") and page.is_enabled("#steer-stop")
    busy = _generate(server, {"prompt": "the cat", "max_new_tokens": 2})
    assert busy.status_code == 429  # the page's generation holds the one slot
    page.click("#steer-stop")
    page.wait_for_selector('#steer-output[data-state="stopped"]')
    assert page.is_enabled("#steer-run") and page.is_disabled("#steer-stop") and page.is_hidden("#error")
    count = page.locator("#steer-output .gtok").count()
    assert 0 < count < 2 * 4000

    # the server saw the client go: the slot comes free and the generation never finished
    def free() -> bool:
        return _generate(server, {"prompt": "the cat", "max_new_tokens": 2}).status_code == 200

    wait_until(free, "the stopped generation's slot to come free", timeout=60)
    assert _metric(server, "lorasae_generations_active") == 0
    assert _metric(server, "lorasae_generated_tokens_total") == generated + 2
    page.wait_for_timeout(500)
    assert page.locator("#steer-output .gtok").count() == count  # nothing arrives after Stop

    # a latent's dashboard view has a steer button too (this server serves no dashboard: said in place)
    page.fill("#latent", "7")
    page.select_option("#sae", "sae2")
    page.dispatch_event("#latent", "change")
    page.wait_for_selector('#latent-view[data-seq="1"]:not([data-state="loading"])')
    page.click("#latent-steer")
    assert (page.input_value("#steer-sae"), page.input_value("#steer-latent")) == ("sae2", "7")
    assert page.evaluate("location.hash") == "#steer?sae=sae2&latent=7"
