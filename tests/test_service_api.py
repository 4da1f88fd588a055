"""The HTTP API in-process (FastAPI TestClient) on the tiny world: every endpoint and error status."""

from __future__ import annotations

import io
import sqlite3
import tarfile

import pytest
from fastapi.testclient import TestClient
from service_fixtures import TEXTS, client, engine, register, settings, wait_until, world  # noqa: F401

from lorasae.errors import LorasaeError
from lorasae.service.app import create_app
from lorasae.service.engine import Engine
from lorasae_client.schemas import AdapterInfo, AdapterList, FeaturesResponse


def _error(response, status: int, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]["message"]


# ------------------------------------------------------------------ health, docs, metrics


def test_health_ready_docs_metrics(client):
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and [s["id"] for s in ready["saes"]] == ["sae1", "sae2"]
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/features", "/v1/adapters", "/v1/adapters/{name}"} <= set(spec["paths"])
    assert "FeaturesRequest" in spec["components"]["schemas"]
    client.post("/v1/features", json={"inputs": "the cat"})
    text = client.get("/metrics").text
    assert 'lorasae_requests_total{method="POST",route="/v1/features",status="200"} 1.0' in text
    for name in ("lorasae_request_seconds_bucket", "lorasae_batch_rows_bucket",
                 "lorasae_queue_depth", "lorasae_adapters"):
        assert name in text
    _error(client.get("/nope"), 404, "not_found")


def test_not_ready_is_503_with_retry_after(world, tmp_path):
    app = create_app(world.settings(tmp_path, model=str(tmp_path / "no-such-model")))
    with TestClient(app, base_url="http://localhost") as c:
        assert c.get("/healthz").status_code == 200
        wait_until(lambda: app.state.service.error, "the background load to fail")
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "error" and "Retry-After" in r.headers
        r = c.post("/v1/features", json={"inputs": "the cat"})
        assert "no-such-model" in _error(r, 503, "not_ready") and r.headers["Retry-After"] == "1"


# ------------------------------------------------------------------ features


def test_features_shape_and_fields(client):
    r = client.post("/v1/features", json={"inputs": TEXTS[:2], "top_k": 3, "logits": "top_k",
                                          "logits_top_k": 4})
    assert r.status_code == 200, r.text
    resp = FeaturesResponse.model_validate(r.json())
    assert resp.adapter is None and [s.id for s in resp.saes] == ["sae1", "sae2"]
    assert len(resp.results) == 2
    tokens = resp.results[0].tokens
    assert tokens[0].id == 1 and tokens[0].text == "<s>"  # BOS prepended, as in training
    assert "".join(t.text for t in tokens[1:]).strip() == TEXTS[0]
    for i, tok in enumerate(tokens):
        assert tok.position == i
        assert set(tok.features) == {"sae1", "sae2"} and set(tok.recon_error) == {"sae1", "sae2"}
        acts = [f.activation for f in tok.features["sae1"]]
        assert 0 < len(acts) <= 3 and acts == sorted(acts, reverse=True) and min(acts) > 0
        assert len(tok.top_logits) == 4 and tok.top_logits[0].logprob <= 0
        assert (tok.loss is None) == (i == len(tokens) - 1)
    # the loss at t is -logprob of token t+1; when t+1 is the top prediction it equals -top logprob
    for a, b in zip(tokens, tokens[1:]):
        if a.top_logits[0].id == b.id:
            assert a.loss == pytest.approx(-a.top_logits[0].logprob, abs=1e-5)


def test_features_token_ids_saes_and_full_logits(client, engine):
    r = client.post("/v1/features", json={"inputs": [[1, 5, 6, 7], [1, 9]], "saes": ["2"],
                                          "logits": "full", "top_k": 2})
    resp = FeaturesResponse.model_validate(r.json())
    assert [s.layer for s in resp.saes] == [2]
    assert [t.id for t in resp.results[0].tokens] == [1, 5, 6, 7]
    tok = resp.results[1].tokens[0]
    assert set(tok.features) == {"sae2"} and len(tok.logits) == engine.vocab_size
    by_name = client.post("/v1/features", json={"inputs": [[1, 5]], "saes": ["sae2"]}).json()
    assert [s["id"] for s in by_name["saes"]] == ["sae2"]


@pytest.mark.parametrize("body, status, code", [
    ({"inputs": ""}, 422, "validation_error"),
    ({"inputs": "   "}, 422, "validation_error"),
    ({"inputs": []}, 422, "validation_error"),
    ({"inputs": ["ok", ""]}, 422, "validation_error"),
    ({"inputs": [[]]}, 422, "validation_error"),
    ({"inputs": 5}, 422, "validation_error"),
    ({"inputs": [[1, "x"]]}, 422, "validation_error"),
    ({"inputs": "a", "top_k": "many"}, 422, "validation_error"),
    ({"inputs": "a", "top_k": 0}, 422, "validation_error"),
    ({"inputs": "a", "logits": "some"}, 422, "validation_error"),
    ({"inputs": "a", "unknown_field": 1}, 422, "validation_error"),
    ({"text": "a"}, 422, "validation_error"),
    ({"inputs": [[1, 100000]]}, 422, "invalid_token_id"),
    ({"inputs": [[1, -3]]}, 422, "invalid_token_id"),
    ({"inputs": "a", "adapter": "nope"}, 404, "unknown_adapter"),
    ({"inputs": "a", "saes": ["nope"]}, 404, "unknown_sae"),
    ({"inputs": [[1] * 65]}, 413, "too_many_tokens"),
    ({"inputs": ["a"] * 9}, 413, "too_many_inputs"),
    ({"inputs": [[1] * 60] * 8, "logits": "full"}, 413, "too_many_logits"),
])
def test_features_bad_input(world, tmp_path, engine, body, status, code):
    s = world.settings(tmp_path, max_tokens=64, max_inputs=8, max_full_logits=20_000)
    with TestClient(create_app(s, engine), base_url="http://localhost") as c:
        _error(c.post("/v1/features", json=body), status, code)
        assert c.get("/healthz").status_code == 200  # still alive


def test_malformed_json_is_422(client):
    r = client.post("/v1/features", content=b"{not json", headers={"content-type": "application/json"})
    _error(r, 422, "validation_error")


# ------------------------------------------------------------------ adapters


def test_adapter_lifecycle_and_hot_swap(client):
    r = register(client, "a1")
    assert r.status_code == 201, r.text
    info = AdapterInfo.model_validate(r.json())
    assert (info.name, info.rank, info.source, info.status) == ("a1", 4, "path", "ready")
    assert [s.layer for s in info.saes] == [1]
    assert register(client, "a2").status_code == 201
    listed = AdapterList.model_validate(client.get("/v1/adapters").json())
    assert [a.name for a in listed.adapters] == ["a1", "a2"]
    assert client.get("/v1/adapters/a2").json()["rank"] == 8

    def acts(adapter):
        body = {"inputs": TEXTS, "adapter": adapter, "saes": ["sae1", "sae2"], "top_k": 4}
        res = client.post("/v1/features", json=body).json()["results"]
        return [[(f["index"], round(f["activation"], 5)) for f in tok["features"]["sae2"]]
                for out in res for tok in out["tokens"]]

    base, one, two = acts(None), acts("a1"), acts("a2")
    # the adapters act after layer 1, so the layer-2 SAE sees different activations
    assert base != one and one != two and base != two
    assert acts("a1") == one  # and the swap back gives the same numbers
    # by default an adapter's request splices the SAEs it was trained with (layer 1 only)
    default = client.post("/v1/features", json={"inputs": "the cat", "adapter": "a1"}).json()
    assert [s["layer"] for s in default["saes"]] == [1] and default["adapter"] == "a1"

    assert client.delete("/v1/adapters/a1").status_code == 204
    _error(client.get("/v1/adapters/a1"), 404, "unknown_adapter")
    _error(client.delete("/v1/adapters/a1"), 404, "unknown_adapter")
    _error(client.post("/v1/features", json={"inputs": "a", "adapter": "a1"}), 404, "unknown_adapter")
    assert client.delete("/v1/adapters/a2").status_code == 204  # the last one: back to the plain model
    assert acts(None) == base


@pytest.mark.parametrize("name, path, status, code", [
    ("m", "mismatch", 409, "adapter_mismatch"),
    ("c", "corrupt", 400, "invalid_adapter"),
    ("b", "badshape", 409, "adapter_mismatch"),
    ("n", "not-an-adapter", 400, "invalid_adapter"),
    ("x", "does-not-exist", 400, "path_not_found"),
    ("o", "../", 400, "path_outside_root"),
    ("o2", "/etc", 400, "path_outside_root"),
    ("bad name!", "a1", 422, "validation_error"),
    ("__base__", "a1", 422, "validation_error"),
])
def test_register_refusals(client, name, path, status, code):
    _error(register(client, name, path), status, code)
    assert client.get("/v1/adapters").json() == {"adapters": []}


def test_register_wrong_types_and_duplicates(client):
    _error(client.post("/v1/adapters", json={"name": 3, "path": "a1"}), 422, "validation_error")
    _error(client.post("/v1/adapters", json={"name": "a1"}), 422, "validation_error")
    assert register(client, "a1").status_code == 201
    assert "already registered" in _error(register(client, "a1"), 409, "duplicate_adapter")
    assert register(client, "other", "a1").status_code == 201  # same folder, another name: fine


def test_corrupt_adapter_never_enters_registry(client, settings):
    _error(register(client, "c", "corrupt"), 400, "invalid_adapter")
    with sqlite3.connect(settings.db_path) as db:
        assert db.execute("SELECT COUNT(*) FROM adapters").fetchone()[0] == 0
    assert client.app.state.service.engine.peft is None  # nothing was loaded into the model


def test_install_error_is_a_logged_500(world, tmp_path, engine, monkeypatch, caplog):
    """Running out of memory while an adapter goes into the model is the server's failure (500,
    logged), not the client's (409); nothing is registered and a later registration works."""
    import peft

    def out_of_memory(*_args, **_kwargs):
        raise MemoryError

    monkeypatch.setattr(peft, "set_peft_model_state_dict", out_of_memory)
    app = create_app(world.settings(tmp_path), engine)
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as c:
        _error(register(c, "a1"), 500, "internal_error")
        assert "unexpected error" in caplog.text and "MemoryError" in caplog.text
        assert c.get("/v1/adapters").json() == {"adapters": []} and engine.peft is None
        monkeypatch.undo()
        assert register(c, "a1").status_code == 201


def _tar(folder, arcname: str = "adapter") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return buffer.getvalue()


def test_upload_archive(client, settings):
    data = _tar(settings.adapter_root / "a2")
    r = client.post("/v1/adapters", data={"name": "up"}, files={"file": ("a2.tar.gz", data)})
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["source"] == "upload" and info["path"].startswith("uploads/up-") and info["rank"] == 8
    stored = settings.adapter_root / info["path"]
    assert (stored / "lorasae.json").is_file()
    assert not any((settings.adapter_root / ".incoming").iterdir())
    assert client.post("/v1/features", json={"inputs": "the cat", "adapter": "up"}).status_code == 200
    assert client.delete("/v1/adapters/up").status_code == 204
    assert not stored.exists()  # the server owned the upload


def test_upload_refusals(client, settings):
    post = lambda name, data: client.post("/v1/adapters", data={"name": name},  # noqa: E731
                                          files={"file": ("x.tar.gz", data)})
    _error(post("g", b"not an archive at all"), 400, "invalid_archive")
    _error(post("c", _tar(settings.adapter_root / "corrupt")), 400, "invalid_adapter")
    _error(post("m", _tar(settings.adapter_root / "mismatch")), 409, "adapter_mismatch")
    _error(post("bad name", _tar(settings.adapter_root / "a1")), 422, "validation_error")
    _error(client.post("/v1/adapters", data={"name": "nofile"}, files={"other": ("x", b"1")}),
           422, "validation_error")
    assert client.get("/v1/adapters").json() == {"adapters": []}
    assert not (settings.adapter_root / "uploads").exists() or \
        not any((settings.adapter_root / "uploads").iterdir())


def test_upload_too_large(world, tmp_path, engine):
    s = world.settings(tmp_path, max_upload_mb=0.001)
    with TestClient(create_app(s, engine), base_url="http://localhost") as c:
        data = _tar(s.adapter_root / "a1")
        assert len(data) > 0.001 * 2**20
        r = c.post("/v1/adapters", data={"name": "big"}, files={"file": ("a.tar.gz", data)})
        _error(r, 413, "upload_too_large")


def test_api_key(world, tmp_path, engine, monkeypatch):
    monkeypatch.setenv("TEST_LORASAE_KEY", "s3cret")
    s = world.settings(tmp_path, api_key_env="TEST_LORASAE_KEY")
    with TestClient(create_app(s, engine), base_url="http://localhost") as c:
        _error(register(c, "a1"), 401, "unauthorized")
        _error(register(c, "a1", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
        _error(register(c, "a1", headers={"Authorization": "Basic s3cret"}), 401, "unauthorized")
        ok = {"Authorization": "Bearer s3cret"}
        assert register(c, "a1", headers=ok).status_code == 201
        _error(c.delete("/v1/adapters/a1"), 401, "unauthorized")
        # reads need no key
        assert c.get("/v1/adapters").status_code == 200
        assert c.post("/v1/features", json={"inputs": "a", "adapter": "a1"}).status_code == 200
        assert c.delete("/v1/adapters/a1", headers=ok).status_code == 204


def test_registry_survives_restart(world, tmp_path):
    s = world.settings(tmp_path)
    first = Engine.from_settings(s)
    with TestClient(create_app(s, first), base_url="http://localhost") as c:
        assert register(c, "a1").status_code == 201
        r = c.post("/v1/adapters", data={"name": "up"},
                   files={"file": ("a.tar.gz", _tar(s.adapter_root / "a2"))})
        assert r.status_code == 201
        before = c.post("/v1/features", json={"inputs": TEXTS, "adapter": "up"}).json()
    first.close()
    # a new app (new engine, same database): both adapters come back and give the same numbers
    second = Engine.from_settings(s)
    with TestClient(create_app(s, second), base_url="http://localhost") as c:
        names = [a["name"] for a in c.get("/v1/adapters").json()["adapters"]]
        assert names == ["a1", "up"]
        after = c.post("/v1/features", json={"inputs": TEXTS, "adapter": "up"}).json()
        assert after == before
        assert c.get("/readyz").json()["adapters"] == 2
    second.close()
    # an adapter whose files went bad while the server was down is listed as an error, not loaded
    weights = s.adapter_root / "a1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    third = Engine.from_settings(s)
    with TestClient(create_app(s, third), base_url="http://localhost") as c:
        info = c.get("/v1/adapters/a1").json()
        assert info["status"] == "error" and "corrupt" in info["error"]
        _error(c.post("/v1/features", json={"inputs": "a", "adapter": "a1"}), 409, "adapter_unavailable")
        assert c.post("/v1/features", json={"inputs": "a", "adapter": "up"}).status_code == 200
        assert c.delete("/v1/adapters/a1").status_code == 204
    third.close()


def test_settings_sources(tmp_path, monkeypatch):
    """Flags (keyword arguments) > LORASAE_* env vars > config file > defaults."""
    from lorasae.service.settings import Settings

    config = tmp_path / "serve.toml"
    config.write_text('model = "from-file"\nmax_batch = 3\nport = 9000\nsaes = ["s1", "s2"]\n')
    monkeypatch.setenv("LORASAE_PORT", "9100")
    s = Settings.load(config=config, max_batch=None, host="0.0.0.0")
    assert (s.model, s.max_batch, s.port, s.host, s.saes) == ("from-file", 3, 9100, "0.0.0.0", ["s1", "s2"])
    assert Settings.load(config=config, port=1).port == 1
    monkeypatch.setenv("LORASAE_SAES", '["x"]')
    monkeypatch.setenv("LORASAE_CONFIG", str(config))
    s = Settings()
    assert s.saes == ["x"] and s.model == "from-file"
    assert s.db_path == s.adapter_root / "registry.sqlite3"
    json_config = tmp_path / "serve.json"
    json_config.write_text('{"max_wait_ms": 7.5}')
    assert Settings.load(config=json_config).max_wait_ms == 7.5
    monkeypatch.delenv("LORASAE_CONFIG")
    with pytest.raises(LorasaeError, match="config file not found"):
        Settings.load(config=tmp_path / "missing.toml")
    monkeypatch.setenv("LORASAE_API_KEY_ENV", "UNSET_LORASAE_TEST_KEY")
    with pytest.raises(LorasaeError, match="UNSET_LORASAE_TEST_KEY"):
        Settings().resolved_api_key()


def test_serve_cli_errors_are_one_line(world, capsys, monkeypatch):
    from lorasae.cli import main

    monkeypatch.delenv("UNSET_LORASAE_TEST_KEY", raising=False)
    assert main(["serve", "--model", str(world.model), "--api-key-env", "UNSET_LORASAE_TEST_KEY"]) == 2
    assert "error: --api-key-env UNSET_LORASAE_TEST_KEY" in capsys.readouterr().err
    assert main(["serve", "--model", str(world.model / "missing"), "--sae", str(world.saes[1])]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")


def test_edge_bounds_request_target_headers_host_and_media_type(client):
    """The edge middleware's refusals, each with its JSON error (uvicorn only bounds requests that
    are still incomplete; a whole one can arrive in one read)."""
    _error(client.get("/v1/adapters/" + "n" * 9000), 414, "uri_too_long")
    assert client.get("/v1/adapters/" + "n" * 8000).status_code == 404
    many = {f"x-h{i}": "v" * 1000 for i in range(70)}
    _error(client.get("/healthz", headers=many), 431, "headers_too_large")
    _error(client.get("/healthz", headers={"host": "evil.example"}), 400, "invalid_host")
    assert client.get("/healthz", headers={"host": "127.0.0.1:9"}).status_code == 200
    _error(client.post("/v1/features", content=b'{"inputs": "a"}',
                             headers={"content-type": "text/plain"}), 415, "unsupported_media_type")
    assert client.post("/v1/features", content=b'{"inputs": "a"}',
                       headers={"content-type": "application/json; charset=utf-8"}).status_code == 200
