"""Latent drift served: ``GET /v1/adapters/{name}/drift`` and the startup checks of ``--drift``
folders.

Reports are synthetic (``drift_fixtures.write_drift_report``) over the tiny world; the expected
answers are computed here from the Parquet files read back with pyarrow (order, filters, pages,
every number), independently of the server's index.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from drift_fixtures import default_dead, default_no_effect, write_drift_report
from fastapi.testclient import TestClient
from service_fixtures import engine, register, settings, wait_until, world  # noqa: F401

from lorasae.drift import MANIFEST_FILE, DriftManifest, drift_file, evidence, write_drift
from lorasae.service.app import create_app
from lorasae.service.drift import DriftIndex
from lorasae.service.engine import Engine
from lorasae_client.schemas import DriftReport

D_SAE = 64  # the tiny world's SAEs
SAES = {1: "sae1", 2: "sae2"}
NUMBERS = (
    "fired_reference fired_adapted density_reference density_adapted density_log_ratio pearson "
    "top_jaccard hist_js effect_contexts effect_cosine effect_norm_ratio promoted_overlap score rank"
).split()


def _error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return body["error"]["message"]


def _serve(world, tmp_path, engine, *folders: Path, **overrides) -> TestClient:  # noqa: F811
    s = world.settings(tmp_path, drift=[str(f) for f in folders], **overrides)
    return TestClient(create_app(s, engine), base_url="http://localhost")


@pytest.fixture
def reports(world, engine, tmp_path) -> dict[str, Path]:  # noqa: F811
    """a1 vs the base model and a1 vs a12 (both SAEs each), a2 vs the base model (sae1 only)."""
    adapters = world.adapters
    return {
        "a1": write_drift_report(tmp_path / "drift-a1", engine, adapters / "a1"),
        "a1-a12": write_drift_report(
            tmp_path / "drift-a1-a12", engine, adapters / "a1", reference=adapters / "a12", seed=1
        ),
        "a2": write_drift_report(tmp_path / "drift-a2", engine, adapters / "a2", layers=[1], seed=2),
    }


@pytest.fixture
def dclient(world, tmp_path, engine, reports):  # noqa: F811
    with _serve(world, tmp_path, engine, *reports.values()) as c:
        for name in ("a1", "a12", "a2"):
            assert register(c, name).status_code == 201
        yield c


def _rows(folder: Path, layer: int) -> list[dict]:
    return pq.read_table(folder / drift_file(layer)).to_pylist()


def _get(c, name: str = "a1", **params) -> DriftReport:
    r = c.get(f"/v1/adapters/{name}/drift", params=params)
    assert r.status_code == 200, r.text
    assert "NaN" not in r.text and "Infinity" not in r.text
    return DriftReport.model_validate(r.json())


def _finite(value):
    return value if value is None or math.isfinite(value) else None


def _assert_latent(latent, row: dict, layer: int, folder: Path, engine) -> None:  # noqa: F811
    """Every field of one listed latent equals its Parquet row (non-finite numbers as None)."""
    thresholds = DriftManifest.load(folder).sae(layer).thresholds
    assert (latent.sae, latent.layer, latent.latent) == (SAES[layer], layer, row["latent"])
    for name in NUMBERS:
        assert getattr(latent, name) == _finite(row[name]), name
    assert (latent.input_drifted, latent.output_drifted) == (row["input_drifted"], row["output_drifted"])
    assert latent.sides == [s for s in ("input", "output") if row[f"{s}_drifted"]]
    for name in ("promoted_reference", "promoted_adapted", "suppressed_reference", "suppressed_adapted"):
        tokens = getattr(latent, name)
        assert [t.id for t in tokens] == row[f"{name}_ids"], name
        assert [t.text for t in tokens] == [engine.piece(i) for i in row[f"{name}_ids"]], name
    assert latent.evidence == evidence(row, thresholds, engine.piece)


def _drifted(row: dict, side: str) -> bool:
    if side == "all":
        return True
    if side == "any":
        return row["input_drifted"] or row["output_drifted"]
    return row[f"{side}_drifted"]


# ------------------------------------------------------------------ the report


def test_one_sae_lists_its_drifted_latents_by_rank(dclient, reports, engine):  # noqa: F811
    rows = _rows(reports["a1"], 2)
    expected = sorted((r for r in rows if r["input_drifted"] or r["output_drifted"]), key=lambda r: r["rank"])
    assert 0 < len(expected) < D_SAE
    report = _get(dclient, sae="sae2", limit=500)
    manifest = DriftManifest.load(reports["a1"])
    assert (report.adapter, report.against, report.side, report.offset) == ("a1", None, "any", 0)
    assert (report.corpus, report.split, report.tokens, report.created_at) == (
        manifest.corpus,
        manifest.split,
        manifest.tokens,
        manifest.created_at,
    )
    assert report.total == len(expected) == len(report.latents)
    assert [x.latent for x in report.latents] == [r["latent"] for r in expected]
    for latent, row in zip(report.latents, expected):
        _assert_latent(latent, row, 2, reports["a1"], engine)
    # rank 1 is the most drifted: scores fall along the ranks, and every listed latent is above noise
    scores = [x.score for x in report.latents]
    assert scores == sorted(scores, reverse=True) and min(scores) > 1
    (info,) = report.saes
    entry = manifest.sae(2)
    assert (info.sae, info.layer, info.d_sae, info.first_adapted_layer) == ("sae2", 2, D_SAE, 2)
    assert info.input_identical_by_construction is False
    assert info.thresholds.model_dump() == entry.thresholds.model_dump()
    assert info.summary.model_dump() == entry.summary.model_dump()
    # the SAE named by layer number or by its full id ('/' percent-encoded), as in /v1/features
    full_id = quote(engine.by_layer[2].sae_id, safe="")
    by_id = dclient.get(f"/v1/adapters/a1/drift?sae={full_id}&limit=500").json()
    assert by_id == dclient.get("/v1/adapters/a1/drift?sae=2&limit=500").json() == report.model_dump()
    assert "/v1/adapters/{name}/drift" in dclient.get("/openapi.json").json()["paths"]


def test_several_saes_are_sorted_by_score_then_layer_and_latent(dclient, reports, engine):  # noqa: F811
    rows = {layer: _rows(reports["a1"], layer) for layer in (1, 2)}

    def key(item: tuple[int, dict]) -> tuple:
        layer, row = item
        return (-row["score"] if math.isfinite(row["score"]) else math.inf, layer, row["latent"])

    everything = sorted(((layer, row) for layer in (1, 2) for row in rows[layer]), key=key)
    report = _get(dclient, side="all", limit=500)
    assert [s.sae for s in report.saes] == ["sae1", "sae2"] and report.total == 2 * D_SAE
    assert [(x.layer, x.latent) for x in report.latents] == [(lay, r["latent"]) for lay, r in everything]
    for latent, (layer, row) in zip(report.latents, everything):
        _assert_latent(latent, row, layer, reports["a1"], engine)
    # the dead latents have no score: last, by layer then latent
    dead = [(layer, i) for layer in (1, 2) for i in default_dead(D_SAE)]
    assert [(x.layer, x.latent) for x in report.latents[-len(dead) :]] == dead
    assert all(x.score is None for x in report.latents[-len(dead) :])
    assert all(x.score is not None for x in report.latents[: -len(dead)])
    # pages: offset / limit cut the same list; total counts all
    pages = [_get(dclient, side="all", limit=50, offset=offset) for offset in (0, 50, 100)]
    assert [p.total for p in pages] == [2 * D_SAE] * 3 and [p.offset for p in pages] == [0, 50, 100]
    assert [x for p in pages for x in p.latents] == report.latents
    beyond = _get(dclient, side="all", offset=1000)
    assert beyond.total == 2 * D_SAE and beyond.latents == []
    # default side "any": the drifted latents of both SAEs, default limit 50
    drifted = [(lay, r["latent"]) for lay, r in everything if r["input_drifted"] or r["output_drifted"]]
    default = _get(dclient)
    assert default.total == len(drifted) > 50 and len(default.latents) == 50
    assert [(x.layer, x.latent) for x in default.latents] == drifted[:50]


@pytest.mark.parametrize("side", ["any", "input", "output", "all"])
def test_side_filters_agree_with_the_tables_and_summary(dclient, reports, side):
    manifest = DriftManifest.load(reports["a1"])
    for layer in (1, 2):
        rows = _rows(reports["a1"], layer)
        report = _get(dclient, sae=SAES[layer], side=side, limit=500)
        expected = [r["latent"] for r in sorted(rows, key=lambda r: r["rank"]) if _drifted(r, side)]
        assert report.side == side and [x.latent for x in report.latents] == expected
        summary = manifest.sae(layer).summary
        want = {"input": summary.input_drifted, "output": summary.output_drifted, "all": D_SAE}
        assert report.total == want.get(side, len(expected))
        if side in ("input", "output"):
            assert all(side in x.sides for x in report.latents)
    # sae1 sits before a1's first adapted layer (2): its input cannot drift
    sae1 = _get(dclient, sae="sae1", side="input")
    assert sae1.total == 0 and sae1.saes[0].input_identical_by_construction is True
    assert sae1.saes[0].first_adapted_layer == 2 and sae1.saes[0].summary.input_fraction == 0.0


def test_undefined_statistics_are_null(dclient):
    dead, no_effect = default_dead(D_SAE)[0], default_no_effect(D_SAE)[0]
    body = dclient.get("/v1/adapters/a1/drift", params={"sae": "sae1", "side": "all", "limit": 500}).json()
    latents = {x["latent"]: x for x in body["latents"]}
    for name in ("density_log_ratio", "pearson", "top_jaccard", "hist_js", "effect_cosine", "score"):
        assert latents[dead][name] is None, name
    assert latents[dead]["fired_reference"] == latents[dead]["fired_adapted"] == 0
    assert latents[dead]["promoted_reference"] == [] and latents[dead]["sides"] == []
    assert latents[dead]["evidence"].startswith("input: density 0.00e+00 -> 0.00e+00, Pearson nan")
    # measured on the input side, no effect under both models: output statistics null, no output words
    effectless = latents[no_effect]
    assert effectless["effect_contexts"] == 0 and effectless["effect_cosine"] is None
    assert effectless["pearson"] is not None and effectless["promoted_adapted"] == []
    assert len(effectless["promoted_reference"]) == 4 and "output:" not in effectless["evidence"]


def test_infinities_are_null(world, tmp_path, engine):  # noqa: F811
    """A statistic over a zero threshold may be infinite: null on the wire, never a 500."""
    folder = write_drift_report(tmp_path / "drift", engine, world.adapters / "a1", layers=[1])
    columns = pq.read_table(folder / drift_file(1)).to_pydict()
    columns["effect_norm_ratio"][0] = math.inf
    columns["score"][1] = -math.inf
    write_drift(folder / drift_file(1), columns)
    with _serve(world, tmp_path, engine, folder) as c:
        assert register(c, "a1").status_code == 201
        latents = {x.latent: x for x in _get(c, sae="sae1", side="all", limit=500).latents}
        assert latents[0].effect_norm_ratio is None and latents[1].score is None
        assert latents[2].effect_norm_ratio == columns["effect_norm_ratio"][2]


def test_the_report_follows_the_weights_and_against(dclient, reports, engine):  # noqa: F811
    base = _get(dclient, sae="sae2", side="all", limit=500)
    versus = _get(dclient, against="a12", sae="sae2", side="all", limit=500)
    assert versus.adapter == "a1" and versus.against == "a12"
    rows = {r["latent"]: r for r in _rows(reports["a1-a12"], 2)}
    for latent in versus.latents:
        _assert_latent(latent, rows[latent.latent], 2, reports["a1-a12"], engine)
    assert [x.score for x in versus.latents] != [x.score for x in base.latents]  # another report
    # a12 changes layer 3 only: with a1 (layer 2 first) the first adapted layer is 2
    assert versus.saes[0].first_adapted_layer == 2
    # the report is tied to the weights, not the name: the same folder registered again
    assert register(dclient, "again", "a1").status_code == 201
    again = _get(dclient, "again", sae="sae2", side="all", limit=500)
    assert again.model_dump() == {**base.model_dump(), "adapter": "again"}
    # no report for the pair / for the SAE: 404 no_drift, saying how to make one
    message = _error(dclient.get("/v1/adapters/a1/drift?against=a2"), 404, "no_drift")
    assert message == (
        "no drift report compares adapter 'a1' with adapter 'a2'; make one with `lorasae drift "
        "--adapter DIR --against DIR --out DIR` and start the server with --drift DIR"
    )
    message = _error(dclient.get("/v1/adapters/a12/drift"), 404, "no_drift")
    assert (
        "adapter 'a12' with the base model;" in message
        and "`lorasae drift --adapter DIR --out DIR`" in message
    )
    message = _error(dclient.get("/v1/adapters/a2/drift?sae=sae2"), 404, "no_drift")
    assert message == "the drift report of adapter 'a2' does not cover SAE 'sae2' (it covers sae1)"
    assert [s.sae for s in _get(dclient, "a2").saes] == ["sae1"]


def test_unknown_names(dclient):
    assert "no adapter named 'nope'" in _error(dclient.get("/v1/adapters/nope/drift"), 404, "unknown_adapter")
    _error(dclient.get("/v1/adapters/a1/drift?against=nope"), 404, "unknown_adapter")
    assert "no SAE 'nope'" in _error(dclient.get("/v1/adapters/a1/drift?sae=nope"), 404, "unknown_sae")
    # path-like and control-character names are names like any other
    _error(dclient.get("/v1/adapters/a1/drift?sae=..%2F..%2Fetc%2Fpasswd"), 404, "unknown_sae")
    _error(dclient.get("/v1/adapters/a1/drift?against=..%2Fa1"), 404, "unknown_adapter")
    _error(dclient.get("/v1/adapters/a1%00/drift"), 404, "unknown_adapter")
    _error(dclient.get("/v1/adapters/..%2Fa1/drift"), 404, "not_found")  # '/' in a name: no such route
    # a long unknown name is not echoed in full
    message = _error(dclient.get("/v1/adapters/a1/drift?sae=" + "s" * 500), 404, "unknown_sae")
    assert len(message) < 300


def test_no_reports_served(world, tmp_path, engine):  # noqa: F811
    with _serve(world, tmp_path, engine) as c:
        assert register(c, "a1").status_code == 201
        _error(c.get("/v1/adapters/a1/drift"), 404, "no_drift")


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=501",
        "limit=x",
        "limit=1e3",
        "offset=-1",
        f"offset={2**31}",
        "side=both",
        "side=ALL",
        "side=",
        "sae=" + "s" * 513,
        "against=" + "a" * 129,
    ],
)
def test_bad_params_are_422(dclient, query):
    _error(dclient.get(f"/v1/adapters/a1/drift?{query}"), 422, "validation_error")


def test_long_adapter_name_is_422(dclient):
    _error(dclient.get(f"/v1/adapters/{'n' * 129}/drift"), 422, "validation_error")


def test_an_adapter_that_failed_to_load_is_409(world, tmp_path, engine, reports):  # noqa: F811
    s = world.settings(tmp_path, drift=[str(reports["a1"]), str(reports["a1-a12"])])
    with TestClient(create_app(s, engine), base_url="http://localhost") as c:
        assert register(c, "a1").status_code == 201 and register(c, "a12").status_code == 201
    weights = s.adapter_root / "a1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    second = Engine.from_settings(s)  # a restart: a1's files went bad while the server was down
    try:
        with TestClient(create_app(s, second), base_url="http://localhost") as c:
            message = _error(c.get("/v1/adapters/a1/drift"), 409, "adapter_unavailable")
            assert "'a1' is registered but could not be loaded" in message
            _error(c.get("/v1/adapters/a12/drift?against=a1"), 409, "adapter_unavailable")
    finally:
        second.close()


# ------------------------------------------------------------------ startup


def _edit_manifest(folder: Path, change) -> None:
    path = folder / MANIFEST_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "case, expected",
    [
        ("model", r"drift report .*drift-0: made with model .* \(fingerprint 0123456789abcdef\)"),
        ("sae", r"drift-0: its SAE .* \(layer 2, fingerprint 0123456789abcdef\) is not loaded; loaded: sae1"),
        ("layer", r"drift-0: its SAE .* \(layer 3, .* is not loaded"),
        ("width", r"drift-0: its manifest gives the SAE at layer 1 32 latents; the loaded one has 64"),
        (
            "duplicate",
            r"drift reports .*drift-0 and .*drift-1 both compare adapter fingerprint \w+ with "
            r"the base model",
        ),
        ("missing", r"no drift.json in .*drift-missing"),
        ("damaged", r"cannot read .*drift-L2.parquet"),
        ("column type", r"drift-L1.parquet: column score is string"),
        ("missing rank", r"drift-L1.parquet: column rank has 1 missing values"),
    ],
)
def test_startup_refuses_a_report_that_does_not_fit(world, tmp_path, engine, case, expected):  # noqa: F811
    folders = [write_drift_report(tmp_path / "drift-0", engine, world.adapters / "a1")]
    if case == "model":
        _edit_manifest(folders[0], lambda m: m.update(model_fingerprint="0123456789abcdef"))
    elif case == "sae":
        _edit_manifest(folders[0], lambda m: m["saes"][1].update(fingerprint="0123456789abcdef"))
    elif case == "layer":
        _edit_manifest(folders[0], lambda m: m["saes"][1].update(layer=3))
    elif case == "width":
        _edit_manifest(folders[0], lambda m: m["saes"][0].update(d_sae=32))
    elif case == "duplicate":  # the same pair, even covering other SAEs
        folders.append(write_drift_report(tmp_path / "drift-1", engine, world.adapters / "a1", layers=[1]))
    elif case == "missing":
        folders = [tmp_path / "drift-missing"]
        folders[0].mkdir()
    elif case == "damaged":
        (folders[0] / drift_file(2)).write_bytes(b"PAR1 not really parquet")
    else:  # a table of other types than write_drift's, written with pyarrow directly
        path = folders[0] / drift_file(1)
        table = pq.read_table(path)
        name = "score" if case == "column type" else "rank"
        values = table.column(name).to_pylist()
        new = pa.array([str(v) for v in values]) if case == "column type" else pa.array([None, *values[1:]])
        pq.write_table(table.set_column(table.schema.get_field_index(name), name, new), path)
    with pytest.raises(RuntimeError, match=f"startup failed: LorasaeError: .*{expected}"):
        with _serve(world, tmp_path, engine, *folders):
            pass


def test_startup_refusal_without_a_given_engine_is_a_503(world, tmp_path, engine):  # noqa: F811
    """The model loading in the background (no engine given): the refusal is the startup error."""
    folder = write_drift_report(tmp_path / "drift", engine, world.adapters / "a1")
    _edit_manifest(folder, lambda m: m.update(model_fingerprint="0123456789abcdef"))
    app = create_app(world.settings(tmp_path, drift=[str(folder)]))
    with TestClient(app, base_url="http://localhost") as c:
        wait_until(lambda: app.state.service.error, "the background start to fail")
        message = _error(c.get("/v1/adapters/a1/drift"), 503, "not_ready")
        assert f"drift report {folder}: made with model" in message


def test_an_index_built_before_the_app_is_served(world, tmp_path, engine, reports):  # noqa: F811
    """As `lorasae serve` does: the index built first (refusals before uvicorn starts), then handed over."""
    index = DriftIndex.build(engine, [reports["a2"]])
    assert len(index) == 1
    with TestClient(
        create_app(world.settings(tmp_path), engine, None, index), base_url="http://localhost"
    ) as c:
        assert register(c, "a2").status_code == 201
        report = _get(c, "a2", side="all")
        assert [s.sae for s in report.saes] == ["sae1"] and report.total == D_SAE


def test_drift_setting_from_flags_and_env(monkeypatch):
    from lorasae import cliargs
    from lorasae.cli import build_parser
    from lorasae.service.settings import Settings

    _, args = cliargs.parse_command(build_parser(), ["serve", "--drift", "d1", "--drift", "d2"])
    assert cliargs.given(args, Settings)["drift"] == ["d1", "d2"]
    monkeypatch.setenv("LORASAE_DRIFT", '["d3"]')
    assert Settings().drift == ["d3"]
