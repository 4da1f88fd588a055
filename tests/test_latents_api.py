"""Latent dashboards served (issue #13): ``GET /v1/saes/{sae}/latents/{index}``, the latent search,
the startup checks of ``--dashboards`` folders, and ``POST /v1/features`` with ``latents=``.

Dashboards are synthetic (``dashboard_fixtures.write_dashboard``) over the tiny world; expected
values are read back from the Parquet files with pyarrow, and requested latent activations are
recomputed with plain forward hooks, independently of lorasae.splice.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest
import torch
from dashboard_fixtures import default_dead, write_dashboard
from fastapi.testclient import TestClient
from service_fixtures import TEXTS, client, engine, register, settings, wait_until, world  # noqa: F401

from lorasae.dashboards import MANIFEST_FILE, TOKENS_FILE, DashboardManifest, latents_file
from lorasae.service.app import create_app
from lorasae.service.engine import Row
from lorasae_client.schemas import FeaturesResponse, LatentRecord, LatentSearchResponse

D_SAE = 64  # the tiny world's SAEs


def _error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return body["error"]["message"]


def _serve(world, tmp_path, engine, *folders: Path, **overrides) -> TestClient:
    s = world.settings(tmp_path, dashboards=[str(f) for f in folders], **overrides)
    return TestClient(create_app(s, engine), base_url="http://localhost")


@pytest.fixture
def dashboards(world, engine, tmp_path) -> dict[str, Path]:
    """Both SAEs for the base model (seed 0), and layer 1 through adapter a1 (seed 1)."""
    return {
        "base": write_dashboard(tmp_path / "dash-base", engine),
        "a1": write_dashboard(tmp_path / "dash-a1", engine, [1], adapter=world.adapters / "a1", seed=1),
    }


@pytest.fixture
def dclient(world, tmp_path, engine, dashboards):
    with _serve(world, tmp_path, engine, *dashboards.values()) as c:
        yield c


def _rows(folder: Path, layer: int) -> list[dict]:
    return pq.read_table(folder / latents_file(layer)).to_pylist()


def _texts(folder: Path) -> list[str]:
    return pq.read_table(folder / TOKENS_FILE).column("text").to_pylist()


# ------------------------------------------------------------------ one latent


def _assert_record(record: LatentRecord, row: dict, folder: Path) -> None:
    """Every field of ``record`` equals the Parquet row it was read from."""
    manifest = DashboardManifest.load(folder)
    texts = _texts(folder)
    assert record.index == row["latent"]
    for name in ("dead", "fired", "density", "mean_activation", "max_activation"):
        assert getattr(record, name) == row[name], name
    assert record.histogram.edges == manifest.hist_edges and record.histogram.counts == row["hist_counts"]
    info = record.dashboard
    assert (info.corpus, info.split, info.tokens, info.ctx) == (
        manifest.corpus,
        manifest.split,
        manifest.tokens,
        manifest.ctx,
    )
    for kind in ("top_contexts", "quantile_contexts"):
        got, want = getattr(record, kind), row[kind]
        assert len(got) == len(want)
        for c, w in zip(got, want):
            assert (c.sequence, c.position, c.activation, c.start, c.interval) == (
                w["sequence"],
                w["position"],
                w["activation"],
                w["start"],
                w.get("interval"),
            )
            assert [t.id for t in c.tokens] == w["token_ids"]
            assert [t.activation for t in c.tokens] == w["activations"]
            assert [t.text for t in c.tokens] == [texts[i] for i in w["token_ids"]]
    for effects, prefix in ((record.logit_lens, "lens"), (record.causal_effect, "effect")):
        for direction in ("promoted", "suppressed"):
            entries = getattr(effects, direction)
            assert [e.id for e in entries] == row[f"{prefix}_{direction}_ids"]
            assert [e.value for e in entries] == row[f"{prefix}_{direction}_values"]
            assert [e.text for e in entries] == [texts[i] for i in row[f"{prefix}_{direction}_ids"]]
    assert record.causal_effect.contexts == row["effect_contexts"]


def test_record_equals_parquet_row(dclient, dashboards, engine):
    rows = _rows(dashboards["base"], 2)
    dead = default_dead(D_SAE)[0]
    for index in (0, 17, dead, D_SAE - 1):  # several row groups of 16, a dead latent
        r = dclient.get(f"/v1/saes/sae2/latents/{index}")
        assert r.status_code == 200, r.text
        record = LatentRecord.model_validate(r.json())
        assert (record.sae, record.adapter, record.dashboard.adapter) == ("sae2", None, None)
        _assert_record(record, rows[index], dashboards["base"])
    assert (
        record.dead is False
        and LatentRecord.model_validate(dclient.get(f"/v1/saes/sae2/latents/{dead}").json()).dead is True
    )
    # the SAE named by layer number or by its full id (a path: '/' percent-encoded), as in features
    by_layer = dclient.get("/v1/saes/2/latents/17").json()
    full_id = quote(engine.by_layer[2].sae_id, safe="")
    assert by_layer == dclient.get("/v1/saes/sae2/latents/17").json()
    assert dclient.get(f"/v1/saes/{full_id}/latents/17").json() == by_layer
    assert LatentRecord.model_validate(by_layer).to_pandas().shape[0] == len(rows[17]["top_contexts"]) + len(
        rows[17]["quantile_contexts"]
    )
    spec = dclient.get("/openapi.json").json()
    assert {"/v1/saes/{sae}/latents/{index}", "/v1/saes/{sae}/latents"} <= set(spec["paths"])


def test_adapter_picks_its_dashboard(dclient, dashboards):
    _error(dclient.get("/v1/saes/sae1/latents/3?adapter=a1"), 404, "unknown_adapter")
    assert register(dclient, "a1").status_code == 201
    r = dclient.get("/v1/saes/sae1/latents/3", params={"adapter": "a1"})
    record = LatentRecord.model_validate(r.json())
    assert (record.adapter, record.dashboard.adapter) == ("a1", "a1")
    _assert_record(record, _rows(dashboards["a1"], 1)[3], dashboards["a1"])
    base = LatentRecord.model_validate(dclient.get("/v1/saes/sae1/latents/3").json())
    _assert_record(base, _rows(dashboards["base"], 1)[3], dashboards["base"])
    assert base.max_activation != record.max_activation  # really another dashboard
    # the dashboard is tied to the weights, not the name: the same folder under another name
    assert register(dclient, "again", "a1").status_code == 201
    again = dclient.get("/v1/saes/sae1/latents/3", params={"adapter": "again"}).json()
    assert again == {
        **r.json(),
        "adapter": "again",
        "dashboard": {**r.json()["dashboard"], "adapter": "again"},
    }
    # search through the adapter reads the adapter's dashboard too
    listed = LatentSearchResponse.model_validate(
        dclient.get("/v1/saes/sae1/latents", params={"adapter": "a1", "limit": 1}).json()
    )
    rows = [row for row in _rows(dashboards["a1"], 1) if not row["dead"]]
    assert listed.adapter == "a1" and listed.latents[0].max_activation == max(
        r["max_activation"] for r in rows
    )
    # a1 has no dashboard for sae2, a2 none at all
    message = _error(dclient.get("/v1/saes/sae2/latents/3?adapter=a1"), 404, "no_dashboard")
    assert "'sae2' through adapter 'a1'" in message and "--dashboards DIR" in message
    assert register(dclient, "a2").status_code == 201
    _error(dclient.get("/v1/saes/sae1/latents?adapter=a2"), 404, "no_dashboard")


def test_unknown_sae_latent_and_no_dashboard(dclient, world, tmp_path, engine, dashboards):
    assert "no SAE 'nope'" in _error(dclient.get("/v1/saes/nope/latents/1"), 404, "unknown_sae")
    _error(dclient.get("/v1/saes/nope/latents"), 404, "unknown_sae")
    for index in (D_SAE, -1, 10**30):
        message = _error(dclient.get(f"/v1/saes/sae1/latents/{index}"), 404, "unknown_latent")
        assert f"no latent {index} (0..{D_SAE - 1})" in message
    _error(dclient.get("/v1/saes/sae1/latents/x"), 422, "validation_error")
    _error(dclient.get("/v1/saes/sae1/latents/1?adapter=" + "n" * 129), 422, "validation_error")
    # only the adapter's dashboard served: the base model has none; no dashboards at all: none either
    with _serve(world, tmp_path / "one", engine, dashboards["a1"]) as c:
        message = _error(c.get("/v1/saes/sae1/latents/1"), 404, "no_dashboard")
        assert message.startswith("no dashboard covers SAE 'sae1';") and "lorasae dashboards" in message
    with _serve(world, tmp_path / "none", engine) as c:
        _error(c.get("/v1/saes/sae2/latents"), 404, "no_dashboard")


def _edit_manifest(folder: Path, change) -> None:
    path = folder / MANIFEST_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "case, expected",
    [
        ("model", r"made with model .* \(fingerprint 0123456789abcdef\), but the server's model"),
        ("sae", r"its SAE .* \(layer 2, fingerprint 0123456789abcdef\) is not loaded; loaded: sae1"),
        ("layer", r"its SAE .* \(layer 3, .* is not loaded"),
        (
            "duplicate",
            r"dashboards .*dash-0 and .*dash-1 both cover the SAE at layer 1 through the base model",
        ),
        ("missing", r"no dashboards.json in .*dash-missing"),
        ("damaged", r"cannot read .*latents-L2.parquet"),
    ],
)
def test_startup_refuses_a_dashboard_that_does_not_fit(world, tmp_path, engine, case, expected):
    folders = [write_dashboard(tmp_path / "dash-0", engine)]
    if case == "model":
        _edit_manifest(folders[0], lambda m: m.update(model_fingerprint="0123456789abcdef"))
    elif case == "sae":
        _edit_manifest(folders[0], lambda m: m["saes"][1].update(fingerprint="0123456789abcdef"))
    elif case == "layer":
        _edit_manifest(folders[0], lambda m: m["saes"][1].update(layer=3))
    elif case == "duplicate":
        folders.append(write_dashboard(tmp_path / "dash-1", engine, [1], seed=5))
    elif case == "missing":
        folders = [tmp_path / "dash-missing"]
        folders[0].mkdir()
    elif case == "damaged":
        (folders[0] / latents_file(2)).write_bytes(b"PAR1 not really parquet")
    with pytest.raises(RuntimeError, match=f"startup failed: LorasaeError: .*{expected}"):
        with _serve(world, tmp_path, engine, *folders):
            pass


def test_startup_refusal_without_a_given_engine_is_a_503(world, tmp_path, engine):
    """The model loading in the background (no engine given): the refusal is the startup error."""
    folder = write_dashboard(tmp_path / "dash", engine)
    _edit_manifest(folder, lambda m: m.update(model_fingerprint="0123456789abcdef"))
    app = create_app(world.settings(tmp_path, dashboards=[str(folder)]))
    with TestClient(app, base_url="http://localhost") as c:
        wait_until(lambda: app.state.service.error, "the background start to fail")
        message = _error(c.get("/v1/saes/sae1/latents/1"), 503, "not_ready")
        assert f"dashboard {folder}: made with model" in message


def test_dashboards_setting_from_flags_and_env(monkeypatch):
    from lorasae import cliargs
    from lorasae.cli import build_parser
    from lorasae.service.settings import Settings

    _, args = cliargs.parse_command(build_parser(), ["serve", "--dashboards", "d1", "--dashboards", "d2"])
    assert cliargs.given(args, Settings)["dashboards"] == ["d1", "d2"]
    monkeypatch.setenv("LORASAE_DASHBOARDS", '["d3"]')
    assert Settings().dashboards == ["d3"]


# ------------------------------------------------------------------ search


def _expected_summaries(folder: Path, layer: int) -> dict[int, tuple[list[str], list[str]]]:
    """Per latent, independently of the server: texts of the tokens its top contexts are about
    (most frequent first, ties by first seen, 5 at most) and of its first 5 distinct promoted
    tokens (logit lens, then causal effect)."""
    texts = _texts(folder)
    out = {}
    for row in _rows(folder, layer):
        counts = Counter(c["token_ids"][c["position"] - c["start"]] for c in row["top_contexts"])
        promoted = list(dict.fromkeys(row["lens_promoted_ids"] + row["effect_promoted_ids"]))[:5]
        out[row["latent"]] = ([texts[i] for i, _ in counts.most_common(5)], [texts[i] for i in promoted])
    return out


def _search(c, **params) -> LatentSearchResponse:
    r = c.get("/v1/saes/sae1/latents", params=params)
    assert r.status_code == 200, r.text
    return LatentSearchResponse.model_validate(r.json())


def test_search_lists_sorts_and_filters(dclient, dashboards):
    rows = _rows(dashboards["base"], 1)
    expected = _expected_summaries(dashboards["base"], 1)
    everything = _search(dclient, include_dead="true", limit=500)
    assert everything.sae == "sae1" and everything.adapter is None and everything.total == D_SAE
    for hit in everything.latents:
        row = rows[hit.index]
        assert (hit.density, hit.max_activation, hit.dead, hit.score) == (
            row["density"],
            row["max_activation"],
            row["dead"],
            None,
        )
        assert (hit.top_tokens, hit.promoted) == expected[hit.index]
    by_max = [(-h.max_activation, h.index) for h in everything.latents]
    assert by_max == sorted(by_max)

    live = [row for row in rows if not row["dead"]]
    default = _search(dclient)
    assert default.total == len(live) == D_SAE - len(default_dead(D_SAE)) and len(default.latents) == 50
    assert not any(h.dead for h in default.latents)
    asc = _search(dclient, sort="density", order="asc", limit=500).latents
    assert [(h.density, h.index) for h in asc] == sorted((r["density"], r["latent"]) for r in live)
    desc = _search(dclient, sort="density", limit=3)
    assert [h.index for h in desc.latents] == [
        r["latent"] for r in sorted(live, key=lambda r: (-r["density"], r["latent"]))
    ][:3]
    lo, hi = sorted([live[3]["density"], live[20]["density"]])
    ranged = _search(dclient, min_density=lo, max_density=hi, limit=2)
    assert ranged.total == sum(lo <= r["density"] <= hi for r in live) and len(ranged.latents) == 2
    assert all(lo <= h.density <= hi for h in ranged.latents)
    assert _search(dclient, min_density=0, max_density=0, include_dead="true").total == len(
        default_dead(D_SAE)
    )


def _normal(text: str) -> str:
    return text.replace("\u2581", " ").strip().lower()


def test_search_by_text(dclient, dashboards):
    expected = _expected_summaries(dashboards["base"], 1)
    rows = _rows(dashboards["base"], 1)
    # a latent whose most frequent token is a word of at least 2 letters
    target, word = next(
        (i, _normal(top[0])) for i, (top, _) in expected.items() if top and len(_normal(top[0])) >= 2
    )
    found = _search(dclient, q=word.upper(), limit=500)  # case-insensitive
    assert found == _search(dclient, q=f"  {word} ", limit=500)
    scores = {h.index: h.score for h in found.latents}
    assert scores[target] >= 4.0
    exact_fired = {i for i, (top, _) in expected.items() if word in map(_normal, top) and not rows[i]["dead"]}
    any_match = {
        i
        for i, (top, promoted) in expected.items()
        if any(word in _normal(t) for t in top + promoted) and not rows[i]["dead"]
    }
    assert exact_fired <= set(scores) and set(scores) == any_match and found.total == len(any_match)
    assert all(scores[i] >= 4.0 for i in exact_fired) and all(s > 0 for s in scores.values())
    ranked = [(-h.score, -h.max_activation, h.index) for h in found.latents]
    assert ranked == sorted(ranked)
    # limit cuts the list, not the total
    top2 = _search(dclient, q=word, limit=2)
    assert top2.total == found.total and top2.latents == found.latents[:2]
    # a word no token contains
    assert _search(dclient, q="zzzqqq").total == 0


@pytest.mark.parametrize(
    "params",
    [
        {"q": "a" * 201},
        {"q": " ".join(f"w{i}" for i in range(17))},
        {"limit": 0},
        {"limit": 501},
        {"sort": "name"},
        {"order": "up"},
        {"min_density": -0.1},
        {"max_density": 1.5},
        {"min_density": 0.5, "max_density": 0.1},
        {"include_dead": "maybe"},
    ],
)
def test_search_bad_params_are_422(dclient, params):
    _error(dclient.get("/v1/saes/sae1/latents", params=params), 422, "validation_error")


# ------------------------------------------------------------------ features latents=


def _dense_latents(world, ids: list[int]) -> dict[int, torch.Tensor]:
    """The SAEs' latents at layers 1 and 2 for ``ids``, both SAEs spliced (layer 1's reconstruction
    feeds layer 2; position 0 keeps its clean activation, as served), with plain forward hooks on a
    freshly loaded model: ``{layer: [T, d_sae]}``."""
    from transformers import AutoModelForCausalLM

    from lorasae.saes import load_sae

    model = AutoModelForCausalLM.from_pretrained(world.model).eval()
    saes = {layer: load_sae(str(world.saes[layer]), model=model).sae for layer in (1, 2)}
    latents: dict[int, torch.Tensor] = {}

    def hook(layer: int):
        def replace(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            latents[layer] = saes[layer].encode(hidden)[0]
            recon = saes[layer].decode(saes[layer].encode(hidden))
            recon[:, 0] = hidden[:, 0]
            return (recon, *output[1:]) if isinstance(output, tuple) else recon

        return replace

    handles = [model.model.layers[layer].register_forward_hook(hook(layer)) for layer in (1, 2)]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return latents


def test_features_latents_equal_dense_activations(client, world):
    body = {"inputs": TEXTS[:2], "saes": ["sae1", "sae2"], "top_k": 4}
    first = FeaturesResponse.model_validate(client.post("/v1/features", json=body).json())
    # latents that fire somewhere (TopK SAEs: most are 0 at most tokens), plus one more each
    active = {
        name: sorted({f.index for tok in first.results[0].tokens for f in tok.features[name]})
        for name in ("sae1", "sae2")
    }
    one, two = active["sae1"][:2], active["sae2"][-2:]
    body["latents"] = {"sae1": [one[1], one[0], one[1], 63], "2": [two[0], 0, two[0], two[1]]}
    r = client.post("/v1/features", json=body)
    assert r.status_code == 200, r.text
    resp = FeaturesResponse.model_validate(r.json())
    for result in resp.results:
        ids = [t.id for t in result.tokens]
        dense = _dense_latents(world, ids)
        for t, tok in enumerate(result.tokens):
            assert list(tok.latents) == ["sae1", "sae2"]
            assert list(tok.latents["sae1"]) == [str(i) for i in sorted({*one, 63})]
            assert list(tok.latents["sae2"]) == [str(i) for i in sorted({*two, 0})]
            for name, layer in (("sae1", 1), ("sae2", 2)):
                for index, value in tok.latents[name].items():
                    assert value == pytest.approx(float(dense[layer][t, int(index)]), abs=1e-5)
                # a requested latent among the token's top-k has the same value there
                for f in tok.features[name]:
                    if str(f.index) in tok.latents[name]:
                        assert f.activation == pytest.approx(tok.latents[name][str(f.index)], abs=1e-6)
    assert any(
        v > 0 for result in resp.results for tok in result.tokens for v in tok.latents["sae1"].values()
    )
    frame = resp.latents_frame()
    assert len(frame) == sum(len(res.tokens) for res in resp.results) * (len({*one, 63}) + len({*two, 0}))


def test_features_latents_per_row_in_one_batch(engine):
    """Rows with different requested latents share one forward: each gets its own, equal to its
    forward alone, and a row that asked for none gets none."""
    layers = (1, 2)
    rows = [
        Row([1, 5, 9, 12, 7], None, layers, latents={1: (0, 5)}),
        Row([1, 40, 41], None, layers, latents={1: (5, 9), 2: (1,)}),
        Row([1, 8, 8, 8, 8, 8, 2], None, layers),
        Row([1, 6], None, layers, latents={2: ()}),
    ]
    together = engine.run_batch(rows)
    assert together[2].latents is None and together[3].latents == {2: ((), [[], []])}
    for row, mixed in zip(rows[:2], together[:2]):
        alone = engine.run_batch([row])[0]
        assert set(mixed.latents) == set(row.latents)
        for layer, (indices, values) in mixed.latents.items():
            assert indices == row.latents[layer] and len(values) == len(row.ids)
            assert all(len(v) == len(indices) for v in values)
            for a, b in zip(alone.latents[layer][1], values):
                assert a == pytest.approx(b, abs=1e-5)


def test_features_latents_refusals_and_shape(world, tmp_path, engine):
    with _serve(world, tmp_path, engine, max_response_entries=500) as c:
        plain = c.post("/v1/features", json={"inputs": "the cat"}).json()
        assert all("latents" not in tok for tok in plain["results"][0]["tokens"])
        for latents, want in (({}, {}), ({"sae1": []}, {"sae1": {}})):
            res = c.post("/v1/features", json={"inputs": "the cat", "latents": latents}).json()
            assert all(tok["latents"] == want for tok in res["results"][0]["tokens"])

        def post(latents, **extra):
            return c.post("/v1/features", json={"inputs": "the cat", "latents": latents, **extra})

        assert "no latent 64 (0..63)" in _error(post({"sae1": [1, 64]}), 404, "unknown_latent")
        _error(post({"sae2": [-1]}), 404, "unknown_latent")
        _error(post({"nope": [1]}), 404, "unknown_sae")
        message = _error(post({"sae1": list(range(257))}), 413, "too_many_latents")
        assert "257 distinct latents of SAE 'sae1'; the limit is 256" in message
        message = _error(post({"sae2": [1]}, saes=["sae1"]), 422, "sae_not_spliced")
        assert "'sae2' is not spliced in this request (spliced: sae1); add it to saes" in message
        _error(post({"sae1": ["x"]}), 422, "validation_error")
        # latents count in the answer's budget: 10 tokens x (1 x 1 SAE + 60 latents) > 500
        ids = [[1] + [5] * 9]
        ok = c.post("/v1/features", json={"inputs": ids, "saes": ["sae1"], "top_k": 1})
        assert ok.status_code == 200
        body = {"inputs": ids, "saes": ["sae1"], "top_k": 1, "latents": {"sae1": list(range(60))}}
        message = _error(c.post("/v1/features", json=body), 413, "response_too_large")
        assert "10 tokens x 61 entries" in message and "60 named latents" in message
