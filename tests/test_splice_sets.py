"""Splice-set check (issue #14, part 3): an adapter used with other SAEs than it was trained with
gets a ``splice_set_differs`` warning on ``POST /v1/features``, with the held-out CE its training
measured for that subset (``lorasae.json`` ``eval_after.splice_sets``) when there is one."""

from __future__ import annotations

import json
import shutil

import pytest
from service_fixtures import TEXTS, client, engine, register, settings, world  # noqa: F401

from lorasae.manifest import MANIFEST_FILE
from lorasae.service.engine import measured_splice_sets

MEASURED = [
    {"layers": [1, 2], "ce_spliced": 4.1, "ce_adapted_spliced": 3.9, "gap_closed": 0.36},
    {"layers": [1], "ce_spliced": 3.6, "ce_adapted_spliced": 3.7, "gap_closed": -0.685},
    {"layers": [2], "ce_spliced": 3.8, "ce_adapted_spliced": 3.7, "gap_closed": 0.3},
]


@pytest.fixture
def measured_adapter(world, tmp_path):  # noqa: F811 - the imported fixture
    """Adapter a12 (trained with the SAEs at layers 1 and 2) whose manifest carries splice sets."""
    root = world.adapter_root(tmp_path)
    shutil.copytree(root / "a12", root / "a12m")
    manifest = json.loads((root / "a12m" / MANIFEST_FILE).read_text())
    manifest["eval_after"] = {"ce_clean": 3.4, "splice_sets": MEASURED}
    (root / "a12m" / MANIFEST_FILE).write_text(json.dumps(manifest))
    return "a12m"


def _features(client, **body):  # noqa: F811
    response = client.post("/v1/features", json={"inputs": TEXTS[0], **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_the_trained_set_has_no_warning_and_a_subset_warns_with_the_measured_ce(client, measured_adapter,  # noqa: F811
                                                                                 engine):  # noqa: F811
    assert register(client, measured_adapter).status_code == 201
    names = engine.names
    assert "warnings" not in _features(client, adapter=measured_adapter)  # its own set: as before
    assert "warnings" not in _features(client)  # no adapter: nothing to warn about
    body = _features(client, adapter=measured_adapter, saes=[names[1]])
    (warning,) = body["warnings"]
    assert warning["code"] == "splice_set_differs"
    assert warning["measured"] == {"ce_spliced": 3.6, "ce_adapted_spliced": 3.7, "gap_closed": -0.685}
    assert "3.700 with the adapter vs 3.600 without" in warning["message"]
    assert names[1] in warning["message"] and names[2] in warning["message"]
    # the answer itself is still what was asked: only the layer-1 SAE spliced
    assert [s["layer"] for s in body["saes"]] == [1]


def test_an_adapter_without_measurements_still_warns(client, engine):  # noqa: F811
    assert register(client, "a12").status_code == 201
    (warning,) = _features(client, adapter="a12", saes=[engine.names[2]])["warnings"]
    assert warning["measured"] is None and "worse than no adapter" in warning["message"]
    assert register(client, "a1").status_code == 201  # trained with the layer-1 SAE only
    (warning,) = _features(client, adapter="a1", saes=[engine.names[1], engine.names[2]])["warnings"]
    assert "never seen in training" in warning["message"]


@pytest.mark.parametrize("eval_after", [
    None, {}, {"splice_sets": "x"}, {"splice_sets": [1, "a", None]},
    {"splice_sets": [{"layers": "1"}, {"layers": [True]}, {"layers": []}, {"layers": [1], "ce_spliced": "3"}]},
    {"splice_sets": [{"layers": [1], "ce_spliced": float("nan")}]},
    {"splice_sets": [{"layers": list(range(65))}]},
])
def test_malformed_measurements_from_an_uploaded_manifest_are_ignored(eval_after):
    assert measured_splice_sets(eval_after) == {}


def test_measurements_are_keyed_by_sorted_layers():
    found = measured_splice_sets({"splice_sets": [{"layers": [2, 1], "ce_spliced": 3, "gap_closed": None}]})
    assert found == {(1, 2): {"ce_spliced": 3.0, "ce_adapted_spliced": None, "gap_closed": None}}


def test_the_client_raises_server_warnings_as_python_warnings():
    import httpx

    from lorasae_client import LoraSaeClient, LoraSaeWarning

    body = {"model": "m", "adapter": "a", "saes": [], "results": [],
            "warnings": [{"code": "splice_set_differs", "message": "trained with {x, y}", "measured": None}]}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
    client = LoraSaeClient("http://test", transport=transport)
    with pytest.warns(LoraSaeWarning, match="splice_set_differs: trained with"):
        response = client.features("text", adapter="a", saes=["x"])
    assert response.warnings[0].code == "splice_set_differs"
    body.pop("warnings")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert client.features("text").warnings == []
