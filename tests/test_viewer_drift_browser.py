"""The viewer page's drift view in a real headless Chromium (Playwright), against a real ``lorasae
serve`` process started with synthetic ``--dashboards`` folders (``dashboard_fixtures``: the base
model for both SAEs, adapter a1 for sae1 only) and a synthetic ``--drift`` report of a1 vs the base
model (``drift_fixtures``), over the tiny world; a1 and a2 (no report) registered. What the page
shows must be the API's JSON.

Screenshots go to ``test-output/drift/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from dashboard_fixtures import write_dashboard
from drift_fixtures import write_drift_report
from service_fixtures import REPO, ServerProcess, world  # noqa: F401
from test_viewer_browser import _open, browser, page  # noqa: F401

from lorasae_client import LoraSaeClient

SHOTS = REPO / "test-output" / "drift"
TOL = dict(rel=1e-4, abs=1e-4)  # for numbers as printed (4 decimals)

# what the page reads back from the drift view's ranked list and per-SAE table
READ_ROWS = """rs => rs.map(r => ({
  sae: r.dataset.sae, layer: +r.dataset.layer, latent: +r.dataset.latent, rank: +r.dataset.rank,
  rank_shown: r.querySelector('[data-col="rank"]').textContent,
  score: r.querySelector('[data-col="score"]').dataset.value,
  score_shown: r.querySelector('[data-col="score"]').textContent,
  sides: [...r.querySelectorAll('[data-col="sides"] .badge')].map(b => b.textContent),
  evidence: r.querySelector('[data-col="evidence"]').textContent}))"""
READ_SAES = """rs => rs.map(r => ({
  sae: r.dataset.sae, layer: +r.dataset.layer, identical: r.dataset.identical === "true",
  latents: +r.querySelector('[data-col="latents"]').dataset.value,
  input: +r.querySelector('[data-col="input-drifted"]').dataset.value,
  input_fraction: +r.querySelector('[data-col="input-drifted"]').dataset.fraction,
  output: +r.querySelector('[data-col="output-drifted"]').dataset.value,
  output_fraction: +r.querySelector('[data-col="output-drifted"]').dataset.fraction,
  thresholds: Object.fromEntries(["densityLogRatio", "histJs", "pearson", "effectCosine"].map(
    k => [k, +r.querySelector('[data-col="thresholds"]').dataset[k]])),
  note: r.querySelector('[data-col="note"]').textContent}))"""
READ_SIDE = """s => ({
  side: s.dataset.side, state: s.dataset.state, sae: s.dataset.sae, index: s.dataset.index,
  adapter: s.dataset.adapter, code: s.dataset.code ?? null,
  density: s.querySelector(".stat-density")?.dataset.value ?? null,
  max: s.querySelector(".stat-max")?.dataset.value ?? null,
  top: s.querySelectorAll('ol.contexts[data-kind="top"] li.context').length,
  message: s.querySelector(".message .text")?.textContent ?? null})"""


@pytest.fixture(scope="module")
def folders(world, tmp_path_factory) -> dict[str, Path]:  # noqa: F811 - the imported fixture
    from lorasae.service.engine import Engine

    tmp = tmp_path_factory.mktemp("drift-viewer-data")
    engine = Engine.from_settings(world.settings(tmp))
    try:
        return {
            "base": write_dashboard(tmp / "dash-base", engine),
            "a1": write_dashboard(tmp / "dash-a1", engine, [1], adapter=world.adapters / "a1", seed=1),
            "drift": write_drift_report(tmp / "drift-a1", engine, world.adapters / "a1", seed=3),
        }
    finally:
        engine.close()


@pytest.fixture(scope="module")
def server(world, folders, tmp_path_factory) -> Iterator[ServerProcess]:  # noqa: F811
    server = ServerProcess(world, tmp_path_factory.mktemp("viewer-drift"), LORASAE_MAX_WAIT_MS="3")
    server.cmd += ["--dashboards", str(folders["base"]), "--dashboards", str(folders["a1"])]
    server.cmd += ["--drift", str(folders["drift"])]
    with server:
        with LoraSaeClient(server.url) as api:
            api.register_adapter("a1", "a1")
            api.register_adapter("a2", "a2")
        yield server


def _api(server: ServerProcess, path: str, **params) -> httpx.Response:
    return httpx.get(server.url + path, params={k: v for k, v in params.items() if v is not None}, timeout=60)


def _report(server: ServerProcess, **params) -> dict:
    resp = _api(server, "/v1/adapters/a1/drift", **{"limit": 50, "offset": 0, "side": "any", **params})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _approx(value):
    return pytest.approx(value, **TOL)


def _wait_report(pg, load: int) -> None:
    pg.wait_for_selector(f'#drift-results[data-load="{load}"]:not([data-state="loading"])', state="attached")


def _wait_latent(pg, seq: int) -> None:
    pg.wait_for_selector(f'#drift-latent[data-seq="{seq}"]:not([data-state="loading"])')


def _assert_rows(pg, report: dict) -> None:
    rows = pg.eval_on_selector_all("#drift-results tbody tr", READ_ROWS)
    assert [(r["sae"], r["latent"]) for r in rows] == [(x["sae"], x["latent"]) for x in report["latents"]]
    for row, x in zip(rows, report["latents"]):
        assert (row["layer"], row["rank"], row["rank_shown"]) == (x["layer"], x["rank"], str(x["rank"]))
        if x["score"] is None:  # a latent that never fired: no score, an em dash
            assert (row["score"], row["score_shown"]) == ("", "\u2014")
        else:
            assert float(row["score"]) == x["score"] and float(row["score_shown"]) == _approx(x["score"])
        assert row["sides"] == x["sides"] and row["evidence"] == x["evidence"]
    assert pg.get_attribute("#drift-info", "data-total") == str(report["total"])
    assert pg.get_attribute("#drift-info", "data-offset") == str(report["offset"])


def _assert_numbers(pg, x: dict) -> None:
    """The latent's drift numbers shown are the API's (data-value exactly; text to 4 decimals)."""
    root = "#drift-latent .drift-numbers"
    assert pg.get_attribute(root, "data-latent") == str(x["latent"])
    for name in ("score", "pearson", "hist_js", "effect_cosine", "density_log_ratio", "top_jaccard"):
        value = pg.get_attribute(f"{root} dd.drift-{name}", "data-value")
        shown = pg.text_content(f"{root} dd.drift-{name}")
        if x[name] is None:  # null: no value, an em dash
            assert (value, shown) == ("", "\u2014"), name
        else:
            assert float(value) == x[name] and float(shown) == _approx(x[name]), name
    fired = pg.get_attribute(f"{root} dd.drift-fired", "data-value")
    assert fired == f"{x['fired_reference']} {x['fired_adapted']}"
    for which in ("promoted_reference", "promoted_adapted", "suppressed_reference", "suppressed_adapted"):
        pieces = pg.eval_on_selector_all(
            f'{root} [data-which="{which}"] .piece', "ps => ps.map(p => [+p.dataset.id, p.textContent])"
        )
        assert pieces == [[t["id"], t["text"]] for t in x[which]], which
    assert x["evidence"] in pg.text_content(f"{root} .evidence")


def _side(pg, side: str) -> dict:
    return pg.eval_on_selector(f'#drift-latent .latent-side[data-side="{side}"]', READ_SIDE)


def _assert_page(pg, side: str, record: dict) -> None:
    s = _side(pg, side)
    assert (s["state"], s["sae"], s["index"]) == ("done", record["sae"], str(record["index"]))
    assert s["adapter"] == (record["adapter"] or "")
    assert float(s["density"]) == record["density"] and float(s["max"]) == record["max_activation"]
    assert s["top"] == len(record["top_contexts"])


def _record(server: ServerProcess, sae: str, index: int, adapter: str | None = None) -> dict:
    resp = _api(server, f"/v1/saes/{sae}/latents/{index}", adapter=adapter)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _screenshot(pg, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    pg.locator("#drift").screenshot(path=str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ tests


def test_report_and_a_latent_side_by_side(page, server):  # noqa: F811 - imported fixtures
    _open(page, server)
    assert page.input_value("#drift-adapter") == "a1"
    assert page.eval_on_selector_all("#drift-against option", "os => os.map(o => o.value)") == [
        "",
        "a1",
        "a2",
    ]
    page.select_option("#drift-sae", "sae1")
    page.click("#drift-run")
    _wait_report(page, 1)
    report = _report(server, sae="sae1")
    assert report["latents"], "the synthetic report has drifted latents in sae1"
    _assert_rows(page, report)
    # the per-SAE summary: counts, fractions, thresholds, and sae1's input identical by construction
    (shown,) = page.eval_on_selector_all("#drift-sae-table tbody tr", READ_SAES)
    (info,) = report["saes"]
    summary, t = info["summary"], info["thresholds"]
    assert (shown["sae"], shown["layer"], shown["latents"]) == ("sae1", 1, summary["latents"])
    assert (shown["input"], shown["input_fraction"]) == (summary["input_drifted"], summary["input_fraction"])
    assert (shown["output"], shown["output_fraction"]) == (
        summary["output_drifted"],
        summary["output_fraction"],
    )
    assert shown["thresholds"] == {
        "densityLogRatio": t["density_log_ratio"],
        "histJs": t["hist_js"],
        "pearson": t["pearson"],
        "effectCosine": t["effect_cosine"],
    }
    assert shown["identical"] is info["input_identical_by_construction"] is True
    assert shown["note"].startswith("input identical by construction") and "(2)" in shown["note"]
    # the most drifted latent: its drift, the base model's page and a1's page side by side
    x = report["latents"][0]
    page.click(f'#drift-results tr[data-latent="{x["latent"]}"]')
    _wait_latent(page, 1)
    assert page.get_attribute("#drift-latent", "data-state") == "done"
    sides = page.eval_on_selector_all("#drift-latent .latent-side", "ss => ss.map(s => s.dataset.side)")
    assert sides == ["reference", "adapted"]
    base, adapted = _record(server, "sae1", x["latent"]), _record(server, "sae1", x["latent"], "a1")
    assert base["density"] != adapted["density"]  # really two dashboards
    _assert_page(page, "reference", base)
    _assert_page(page, "adapted", adapted)
    _assert_numbers(page, x)
    assert page.get_attribute("#drift-latent", "data-missing") == ""
    assert page.locator("#drift-latent .drift-note").count() == 0 and page.is_hidden("#error")
    hash_ = page.evaluate("location.hash")
    assert hash_ == f"#drift?adapter=a1&sae=sae1&side=any&latent_sae=sae1&latent={x['latent']}"
    _screenshot(page, f"a1-sae1-latent{x['latent']}")


def test_missing_adapted_dashboard_shows_the_reference_and_a_note(page, server):  # noqa: F811
    _open(page, server)
    page.select_option("#drift-sae", "sae2")
    page.select_option("#drift-side", "output")
    page.click("#drift-run")
    _wait_report(page, 1)
    report = _report(server, sae="sae2", side="output")
    _assert_rows(page, report)
    assert all("output" in x["sides"] for x in report["latents"])
    x = report["latents"][1]
    page.click(f'#drift-results tr[data-latent="{x["latent"]}"]')
    _wait_latent(page, 1)
    # a1's dashboards cover sae1 only: the adapted page is missing, said in place and in a note
    missing = _api(server, f"/v1/saes/sae2/latents/{x['latent']}", adapter="a1")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "no_dashboard"
    _assert_page(page, "reference", _record(server, "sae2", x["latent"]))
    adapted = _side(page, "adapted")
    assert (adapted["state"], adapted["code"]) == ("error", "no_dashboard")
    assert adapted["message"] == missing.json()["error"]["message"] and adapted["density"] is None
    note = page.text_content('#drift-latent .drift-note[data-missing="adapted"]')
    assert note.startswith(
        "No dashboard of sae2 through adapter a1 is served: only the reference page is shown"
    )
    assert "lorasae dashboards --adapter DIR --out DIR" in note and "--dashboards DIR" in note
    assert page.get_attribute("#drift-latent", "data-missing") == "adapted"
    assert page.get_attribute("#drift-latent", "data-state") == "done" and page.is_hidden("#error")
    _assert_numbers(page, x)
    _screenshot(page, f"a1-sae2-latent{x['latent']}-no-adapted-dashboard")


def test_the_url_hash_opens_a_view_and_pages(page, server):  # noqa: F811 - imported fixtures
    report = _report(server, side="all", offset=50)
    x = report["latents"][3]
    page.goto(f"{server.url}/#drift?adapter=a1&side=all&offset=50&latent_sae={x['sae']}&latent={x['latent']}")
    page.wait_for_selector('#status[data-state="ready"]')
    _wait_report(page, 1)
    _wait_latent(page, 1)
    assert (page.input_value("#drift-side"), page.input_value("#drift-sae")) == ("all", "")
    _assert_rows(page, report)
    assert [s["sae"] for s in report["saes"]] == ["sae1", "sae2"]
    assert page.locator("#drift-results th", has_text="SAE").count() == 1  # several SAEs: a column
    _assert_numbers(page, x)
    assert page.get_attribute("#drift-latent", "data-sae") == x["sae"]
    # pages: 128 latents, 50 a page
    assert page.is_enabled("#drift-prev") and page.is_enabled("#drift-next")
    page.click("#drift-next")
    _wait_report(page, 2)
    last = _report(server, side="all", offset=100)
    assert any(x["score"] is None for x in last["latents"])  # the dead latents, last
    _assert_rows(page, last)
    assert page.is_disabled("#drift-next")
    page.click("#drift-prev")
    _wait_report(page, 3)
    _assert_rows(page, report)
    # a hash naming an adapter without a report: the API's 404, in #error
    page.evaluate("location.hash = '#drift?adapter=a2&side=any'")
    _wait_report(page, 4)
    message = _api(server, "/v1/adapters/a2/drift").json()["error"]["message"]
    assert page.get_attribute("#drift-results", "data-state") == "error"
    assert page.get_attribute("#error", "data-code") == "no_drift"
    assert page.text_content("#error .message") == message
    assert page.input_value("#drift-adapter") == "a2"
    assert page.get_attribute("#drift-latent", "data-state") == "empty"  # a1's latent is gone
    assert page.locator("#drift-latent .latent-side").count() == 0
