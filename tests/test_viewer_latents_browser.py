"""The viewer page's latent view and latent search in a real headless Chromium (Playwright), against a
real ``lorasae serve`` process started with ``--dashboards`` folders that the real ``lorasae
dashboards`` job made over the tiny world: one through the base model and one through adapter ``a1``
(both SAEs each; ``a2`` is registered too, with no dashboard). The numbers on the page must be the
API's JSON.

Screenshots of three latents' views go to ``test-output/latents/``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from service_fixtures import REPO, WORDS, ServerProcess, world  # noqa: F401
from test_viewer_browser import TEXT, _open, _run, browser, page  # noqa: F401

from lorasae_client import LoraSaeClient

SHOTS = REPO / "test-output" / "latents"
CTX, TOKENS = 32, 4096
JOB_TIMEOUT = 900  # s: two dashboard jobs side by side on a slow, shared machine
TOL = dict(rel=1e-4, abs=1e-4)  # for numbers as printed (4 decimals)

# what the page reads back from one column of the latent view (base or adapter)
READ_SIDE = """side => {
  const num = (v) => (v === undefined || v === "" ? null : Number(v));
  const stat = (name) => {
    const dd = side.querySelector(`.stat-${name}`);
    return {value: num(dd.dataset.value), text: dd.querySelector(".value").textContent};
  };
  const contexts = (root) => [...root.querySelectorAll("li.context")].map((li) => ({
    sequence: num(li.dataset.sequence), position: num(li.dataset.position), start: num(li.dataset.start),
    activation: num(li.dataset.activation), shown: li.querySelector(".act").textContent,
    interval: li.dataset.interval ?? null,
    tokens: [...li.querySelectorAll(".ctok")].map((t) => ({
      id: num(t.dataset.id), text: t.textContent, activation: num(t.dataset.activation),
      center: t.classList.contains("center"), coloured: t.style.backgroundColor !== ""})),
  }));
  const effects = (kind, which) => [...side.querySelectorAll(
      `table.effects[data-kind="${kind}"][data-which="${which}"] tbody tr`)].map((tr) => ({
    id: num(tr.dataset.id), value: num(tr.dataset.value), text: tr.cells[0].textContent,
    shown: tr.cells[1].textContent}));
  const svg = side.querySelector("svg.histogram");
  return {
    side: side.dataset.side, sae: side.dataset.sae, index: num(side.dataset.index),
    adapter: side.dataset.adapter, dead: side.dataset.dead === "true",
    dead_badge: side.querySelector("h4 .badge.dead") !== null,
    density: stat("density"), fired: stat("fired"), mean: stat("mean"), max: stat("max"),
    hist_counts: JSON.parse(svg.dataset.counts), hist_edges: JSON.parse(svg.dataset.edges),
    bars: [...svg.querySelectorAll("rect.bin")].map((r) => [num(r.dataset.bin), num(r.dataset.count)]),
    top: contexts(side.querySelector('ol.contexts[data-kind="top"]') || document.createElement("ol")),
    quantile_groups: [...side.querySelectorAll(".quantile")].map((q) => ({
      interval: q.dataset.interval, contexts: contexts(q)})),
    lens_promoted: effects("lens", "promoted"), lens_suppressed: effects("lens", "suppressed"),
    effect_promoted: effects("effect", "promoted"), effect_suppressed: effects("effect", "suppressed"),
  };
}"""


def _job(world, out: Path, saes: list[str], adapter: Path | None,  # noqa: F811
         corpus: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lorasae.cli", "dashboards", "--model", str(world.model),
           *[arg for sae in saes for arg in ("--sae", sae)], "--corpus", str(corpus),
           "--ctx", str(CTX), "--tokens", str(TOKENS), "--device", "cpu", "--out", str(out)]
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    with open(out.with_suffix(".log"), "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


@pytest.fixture(scope="module")
def dashboards(world, tmp_path_factory) -> dict[str, Path]:  # noqa: F811 - the imported fixture
    """The real dashboards job, run twice side by side: through the base model and through adapter
    a1 (LoRA in blocks 2 and 3: sae2, at layer 2, reads what it changed), both SAEs each."""
    tmp = tmp_path_factory.mktemp("latent-dashboards")
    gen = torch.Generator().manual_seed(7)
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (200,),
                                                                              generator=gen))
                                for _ in range(60)))
    sae1, sae2 = str(world.saes[1]), str(world.saes[2])
    outs = {"base": tmp / "base", "a1": tmp / "a1"}
    jobs = {"base": _job(world, outs["base"], [sae1, sae2], None, corpus),
            "a1": _job(world, outs["a1"], [sae1, sae2], world.adapters / "a1", corpus)}
    try:
        for name, job in jobs.items():
            rc = job.wait(timeout=JOB_TIMEOUT)
            log = outs[name].with_suffix(".log").read_text()[-3000:]
            done = rc == 0 and (outs[name] / "dashboards.json").is_file()
            assert done, f"dashboards {name}: rc {rc}\n{log}"
    finally:
        for job in jobs.values():
            if job.poll() is None:
                job.kill()
                job.wait()
    return outs


@pytest.fixture(scope="module")
def server(world, dashboards, tmp_path_factory) -> Iterator[ServerProcess]:  # noqa: F811
    """`lorasae serve` over the tiny world with both dashboards; adapters a1 (a dashboard was made
    through it) and a2 (none) registered."""
    server = ServerProcess(world, tmp_path_factory.mktemp("viewer-latents"), LORASAE_MAX_WAIT_MS="3")
    server.cmd += ["--dashboards", str(dashboards["base"]), "--dashboards", str(dashboards["a1"])]
    with server:
        with LoraSaeClient(server.url) as api:
            api.register_adapter("a1", "a1")
            api.register_adapter("a2", "a2")
        yield server


# ------------------------------------------------------------------ helpers


def _api(server: ServerProcess, path: str, **params) -> httpx.Response:
    params = {k: v for k, v in params.items() if v is not None}
    return httpx.get(server.url + path, params=params, timeout=60)


def _record(server: ServerProcess, sae: str, index: int, adapter: str | None = None) -> dict:
    resp = _api(server, f"/v1/saes/{sae}/latents/{index}", adapter=adapter)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _wait_view(pg, seq: int) -> None:
    """Wait until the pg has finished its ``seq``-th latent load."""
    pg.wait_for_selector(f'#latent-view[data-seq="{seq}"]:not([data-state="loading"])')


def _side(pg, side: str) -> dict:
    return pg.eval_on_selector(f'#latent-view .latent-side[data-side="{side}"]', READ_SIDE)


def _approx(value):
    return pytest.approx(value, **TOL)


def _assert_contexts(shown: list[dict], contexts: list[dict], max_activation: float) -> None:
    assert len(shown) == len(contexts)
    for s, c in zip(shown, contexts):
        assert (s["sequence"], s["position"], s["start"]) == (c["sequence"], c["position"], c["start"])
        assert s["activation"] == c["activation"] and float(s["shown"]) == _approx(c["activation"])
        assert s["interval"] == c.get("interval")
        assert [t["id"] for t in s["tokens"]] == [t["id"] for t in c["tokens"]]
        assert [t["text"] for t in s["tokens"]] == [t["text"] for t in c["tokens"]]
        assert [t["activation"] for t in s["tokens"]] == [t["activation"] for t in c["tokens"]]
        # the context's own token is marked; a token is coloured exactly where the latent fired
        assert [i for i, t in enumerate(s["tokens"]) if t["center"]] == [c["position"] - c["start"]]
        assert [t["coloured"] for t in s["tokens"]] == [
            t["activation"] > 0 and max_activation > 0 for t in c["tokens"]]


def _assert_effects(shown: list[dict], values: list[dict]) -> None:
    assert [(e["id"], e["value"], e["text"]) for e in shown] == [(v["id"], v["value"], v["text"])
                                                                 for v in values]
    assert [float(e["shown"]) for e in shown] == [_approx(v["value"]) for v in values]


def _assert_side(pg, side: str, record: dict) -> None:
    """Every number of one column of the latent view is the record's (data-* exactly, text to 4 decimals)."""
    s = _side(pg, side)
    assert (s["sae"], s["index"], s["adapter"]) == (record["sae"], record["index"], record["adapter"] or "")
    assert s["dead"] == s["dead_badge"] == record["dead"]
    for key, name in (("density", "density"), ("mean", "mean_activation"), ("max", "max_activation")):
        assert s[key]["value"] == record[name], key
        assert float(s[key]["text"]) == _approx(record[name]), key
    assert s["fired"]["value"] == record["fired"] and s["fired"]["text"] == str(record["fired"])
    # histogram: all counts in data-counts; a bar for every non-empty bin, with its count
    hist = record["histogram"]
    assert s["hist_counts"] == hist["counts"] and s["hist_edges"] == hist["edges"]
    bars = dict(s["bars"])
    assert all(count == hist["counts"][i] for i, count in bars.items())
    assert {i for i, c in enumerate(hist["counts"]) if c > 0} <= set(bars)
    _assert_contexts(s["top"], record["top_contexts"], record["max_activation"])
    # quantile samples: grouped by interval label, in the record's order
    intervals = list(dict.fromkeys(c["interval"] for c in record["quantile_contexts"]))
    assert [g["interval"] for g in s["quantile_groups"]] == intervals
    for group in s["quantile_groups"]:
        _assert_contexts(group["contexts"], [c for c in record["quantile_contexts"]
                                             if c["interval"] == group["interval"]],
                         record["max_activation"])
    _assert_effects(s["lens_promoted"], record["logit_lens"]["promoted"])
    _assert_effects(s["lens_suppressed"], record["logit_lens"]["suppressed"])
    _assert_effects(s["effect_promoted"], record["causal_effect"]["promoted"])
    _assert_effects(s["effect_suppressed"], record["causal_effect"]["suppressed"])
    assert record["top_contexts"] and record["logit_lens"]["promoted"]  # something was compared


def _screenshot(pg, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    pg.locator("#latents").screenshot(path=str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


# ------------------------------------------------------------------ tests


def test_search_lists_what_the_api_finds_and_opens_a_latent(page, server):  # noqa: F811 - imported fixtures
    _open(page, server)
    page.select_option("#sae", "sae2")
    page.fill("#search-q", "cat")
    page.click("#search-run")
    page.wait_for_selector('#search-results[data-state="done"][data-search="1"]')
    found = _api(server, "/v1/saes/sae2/latents", q="cat", sort="max_activation", order="desc",
                 include_dead="false", limit=50).json()
    assert found["latents"], "the tiny world's sae2 has latents that fire on 'cat'"
    rows = page.eval_on_selector_all("#search-results tbody tr", """rs => rs.map(r => ({
        index: +r.dataset.index, sae: r.dataset.sae,
        density: +r.querySelector('[data-col="density"]').dataset.value,
        max: +r.querySelector('[data-col="max"]').dataset.value,
        score: +r.querySelector('[data-col="score"]').dataset.value,
        shown: [...r.querySelectorAll('td.num')].slice(1).map(c => c.textContent),
        top: [...r.querySelectorAll('[data-col="top-tokens"] .piece')].map(p => p.textContent),
        promoted: [...r.querySelectorAll('[data-col="promoted"] .piece')].map(p => p.textContent)}))""")
    assert [r["index"] for r in rows] == [h["index"] for h in found["latents"]]
    for row, hit in zip(rows, found["latents"]):
        assert row["sae"] == "sae2"
        assert (row["density"], row["max"], row["score"]) == (hit["density"], hit["max_activation"],
                                                              hit["score"])
        assert [float(x) for x in row["shown"]] == [_approx(hit["density"]), _approx(hit["max_activation"]),
                                                    _approx(hit["score"])]
        assert (row["top"], row["promoted"]) == (hit["top_tokens"], hit["promoted"])
    assert page.get_attribute("#search-info", "data-total") == str(found["total"])

    # click a result: its dashboard, base model only (no adapter chosen)
    index = found["latents"][0]["index"]
    page.click(f'#search-results tr[data-index="{index}"]')
    _wait_view(page, 1)
    assert page.get_attribute("#latent-view", "data-state") == "done"
    assert page.locator("#latent-view .latent-side").count() == 1
    _assert_side(page, "base", _record(server, "sae2", index))
    assert page.is_hidden("#error")
    _screenshot(page, f"search-sae2-latent{index}")

    # listing by density, ascending, dead latents included: the API's order
    page.fill("#search-q", "")
    page.select_option("#search-sort", "density")
    page.select_option("#search-order", "asc")
    page.check("#search-dead")
    page.click("#search-run")
    page.wait_for_selector('#search-results[data-state="done"][data-search="2"]')
    listed = _api(server, "/v1/saes/sae2/latents", sort="density", order="asc", include_dead="true",
                  limit=50).json()
    shown = page.eval_on_selector_all("#search-results tbody tr", "rs => rs.map(r => +r.dataset.index)")
    assert shown == [h["index"] for h in listed["latents"]]
    assert page.locator('#search-results th:has-text("score")').count() == 0


def test_token_panel_and_latent_input_open_latents(page, server):  # noqa: F811 - imported fixtures
    _open(page, server)
    page.select_option("#sae", "sae1")
    page.fill("#text", TEXT)
    _run(page, 1)
    position = 3
    page.hover(f'#tokens .tok[data-position="{position}"]')
    page.wait_for_selector(f'#panel[data-position="{position}"]')
    index = int(page.get_attribute("#panel-latents tbody tr:nth-child(2)", "data-index"))
    page.click(f'#panel-latents tr[data-index="{index}"]')
    _wait_view(page, 1)
    assert page.input_value("#latent") == str(index)  # and the tokens are coloured by it, as before
    assert page.get_attribute("#latent-info", "data-latent") == str(index)
    assert page.get_attribute("#latent-view", "data-sae") == "sae1"
    _assert_side(page, "base", _record(server, "sae1", index))
    _screenshot(page, f"panel-sae1-latent{index}")

    # the Latent input opens a latent when left (or on Enter)
    other = next(h["index"] for h in _api(server, "/v1/saes/sae1/latents", sort="density").json()["latents"]
                 if h["index"] != index)
    page.fill("#latent", str(other))
    page.press("#latent", "Tab")
    _wait_view(page, 2)
    _assert_side(page, "base", _record(server, "sae1", other))

    # a latent the SAE does not have: the API's 404, in #error and in place
    page.fill("#latent", "64")
    page.press("#latent", "Tab")
    _wait_view(page, 3)
    api = _api(server, "/v1/saes/sae1/latents/64")
    assert api.status_code == 404 and api.json()["error"]["code"] == "unknown_latent"
    assert page.get_attribute("#latent-view", "data-state") == "error"
    assert page.is_visible("#error")
    assert page.get_attribute("#error", "data-status") == "404"
    assert page.get_attribute("#error", "data-code") == "unknown_latent"
    assert page.text_content("#error .message") == api.json()["error"]["message"]
    assert page.get_attribute('.latent-side[data-side="base"]', "data-code") == "unknown_latent"
    assert page.locator("#latent-view .stats").count() == 0

    # and a good one again clears it
    page.fill("#latent", str(index))
    page.press("#latent", "Tab")
    _wait_view(page, 4)
    assert page.is_hidden("#error") and page.get_attribute("#latent-view", "data-state") == "done"


def test_base_and_adapter_side_by_side(page, server):  # noqa: F811 - imported fixtures
    _open(page, server)
    page.select_option("#adapter", "a1")
    assert page.input_value("#sae") == "sae1"  # the adapter's own SAE
    page.select_option("#sae", "sae2")  # after a1's LoRA in block 2: its latents moved
    # search through the adapter's dashboard
    page.click("#search-run")
    page.wait_for_selector('#search-results[data-state="done"][data-search="1"]')
    found = _api(server, "/v1/saes/sae2/latents", adapter="a1", sort="max_activation").json()
    assert found["adapter"] == "a1"
    shown = page.eval_on_selector_all(
        "#search-results tbody tr", "rs => rs.map(r => [+r.dataset.index, "
        "+r.querySelector('[data-col=\"max\"]').dataset.value])")
    assert shown == [[h["index"], h["max_activation"]] for h in found["latents"]]
    assert "adapter a1" in page.text_content("#search-info")

    # open the live latent whose density moved most under the adapter: the columns differ
    base_all = {h["index"]: h for h in _api(server, "/v1/saes/sae2/latents", include_dead="true",
                                            limit=500).json()["latents"]}
    index = max((h for h in found["latents"] if h["index"] in base_all),
                key=lambda h: abs(h["density"] - base_all[h["index"]]["density"]))["index"]
    page.click(f'#search-results tr[data-index="{index}"]')
    _wait_view(page, 1)
    sides = "ss => ss.map(s => s.dataset.side)"
    assert page.eval_on_selector_all("#latent-view .latent-side", sides) == ["base", "adapter"]
    base, adapted = _record(server, "sae2", index), _record(server, "sae2", index, adapter="a1")
    assert base["adapter"] is None and adapted["adapter"] == "a1"
    assert base["density"] != adapted["density"]
    _assert_side(page, "base", base)
    _assert_side(page, "adapter", adapted)
    labels = page.eval_on_selector_all("#latent-view .latent-side h4", "hs => hs.map(h => h.textContent)")
    assert labels[0].startswith("base model") and labels[1].startswith("adapter a1")
    assert page.is_hidden("#error")
    _screenshot(page, f"side-by-side-sae2-latent{index}-a1")

    # choosing no adapter reopens the latent on the base model alone
    page.select_option("#adapter", "")
    _wait_view(page, 2)
    assert page.eval_on_selector_all("#latent-view .latent-side", sides) == ["base"]
    _assert_side(page, "base", base)

    # a2 has no dashboard: its column says so in place, the base column is shown, #error stays hidden
    page.select_option("#adapter", "a2")  # reopens the latent, base and a2
    _wait_view(page, 3)
    missing = _api(server, f"/v1/saes/sae2/latents/{index}", adapter="a2")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "no_dashboard"
    assert page.eval_on_selector_all("#latent-view .latent-side", sides) == ["base", "adapter"]
    side = '#latent-view .latent-side[data-side="adapter"]'
    assert page.get_attribute(side, "data-code") == "no_dashboard"
    assert page.get_attribute(side, "data-status") == "404"
    assert page.text_content(f"{side} .message .text") == missing.json()["error"]["message"]
    assert page.locator(f"{side} .stats").count() == 0
    _assert_side(page, "base", base)
    assert page.get_attribute("#latent-view", "data-state") == "done"
    assert page.is_hidden("#error")
