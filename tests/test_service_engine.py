"""The engine and batcher: served numbers equal the offline splice code, mixed-adapter batches equal
one-by-one forwards, concurrent requests share forwards, and a full queue answers 429."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch

from lorasae.models import load_model
from lorasae.saes import load_sae
from lorasae.service.app import create_app
from lorasae.service.batcher import Batcher
from lorasae.service.engine import Row
from lorasae.service.errors import ServiceError
from lorasae.splice import Splice

from service_fixtures import TEXTS, client, engine, register, settings, world  # noqa: F401


def _load(engine, name: str, settings, source: str | None = None) -> None:
    engine.add_adapter(name, engine.validate_adapter(settings.adapter_root / (source or name)))


@pytest.mark.parametrize("adapter", [None, "a1", "a12"])
def test_served_features_equal_offline_splice(client, world, settings, adapter):
    """/v1/features == lorasae.splice.Splice on a fresh model + PeftModel.from_pretrained."""
    from peft import PeftModel

    for name in ("a1", "a2", "a12"):  # several adapters loaded: the served one is picked per row
        assert register(client, name).status_code == 201
    layers = [1] if adapter == "a1" else [1, 2]
    ids = [[1, 5, 9, 12, 7, 30, 3], [1, 40, 41]]
    body = {"inputs": ids, "adapter": adapter, "top_k": 8, "logits": "top_k", "logits_top_k": 3}
    served = client.post("/v1/features", json=body).json()
    assert [s["layer"] for s in served["saes"]] == layers

    lm = load_model(str(world.model), "cpu")
    saes = [load_sae(str(world.saes[layer]), model=lm.model) for layer in layers]
    model = lm.model if adapter is None else PeftModel.from_pretrained(lm.model, str(settings.adapter_root / adapter))
    model.eval()
    for row, result in zip(ids, served["results"]):
        x = torch.tensor([row])
        with torch.inference_mode(), Splice(model, saes, keep_first=True, record=True) as splice:
            logits = model(input_ids=x).logits[0]
        logprobs = torch.log_softmax(logits.float(), -1)
        for t, tok in enumerate(result["tokens"]):
            for sae in saes:
                name = sae.sae_id.rsplit("/", 1)[-1]
                values, indices = splice.records[sae.layer].latents[0, t].topk(8)
                got = tok["features"][name]
                assert [f["index"] for f in got] == indices[values > 0].tolist()
                assert [f["activation"] for f in got] == pytest.approx(values[values > 0].tolist(), abs=1e-4)
                err = float(splice.records[sae.layer].error_sq()[0, t])
                assert tok["recon_error"][name] == pytest.approx(err, rel=1e-4, abs=1e-4)
            if t + 1 < len(row):
                assert tok["loss"] == pytest.approx(float(-logprobs[t, row[t + 1]]), abs=1e-4)
            top = logits[t].topk(3)
            assert [e["id"] for e in tok["top_logits"]] == top.indices.tolist()
            assert [e["logprob"] for e in tok["top_logits"]] == pytest.approx(
                logprobs[t, top.indices].tolist(), abs=1e-4)


def test_mixed_adapter_batch_equals_one_by_one(engine, settings):
    for name in ("a1", "a2"):
        _load(engine, name, settings)
    layers = (1, 2)
    rows = [_row(engine, [1, 5, 9, 12, 7], "a1", layers), Row([1, 40, 41], None, layers),
            _row(engine, [1, 8, 8, 8, 8, 8, 2], "a2", layers), _row(engine, [1, 5, 9], "a1", layers)]
    together = engine.run_batch(rows)
    for row, mixed in zip(rows, together):
        alone = engine.run_batch([row])[0]
        assert alone.ids == mixed.ids
        assert alone.loss == pytest.approx(mixed.loss, abs=1e-4)
        for layer in layers:
            assert alone.features[layer][0] == mixed.features[layer][0]
            for a, b in zip(alone.features[layer][1], mixed.features[layer][1]):
                assert a == pytest.approx(b, abs=1e-4)
            assert alone.recon_error[layer] == pytest.approx(mixed.recon_error[layer], rel=1e-4, abs=1e-4)
    # and the adapters really differ from each other and from the base model
    a1, base, a2 = (engine.run_batch([_row(engine, [1, 5, 9, 12, 7], name, layers)])[0] for name in ("a1", None, "a2"))
    assert a1.loss != base.loss and a2.loss != base.loss and a1.loss != a2.loss


def test_deleted_adapter_row_fails_alone(engine, settings):
    _load(engine, "a1", settings)
    rows = [_row(engine, [1, 5, 9], "a1", (1,)), Row([1, 5, 9], "gone", (1,))]
    ok, err = engine.run_batch(rows)
    assert ok.ids == [1, 5, 9] and isinstance(err, ServiceError) and err.status == 404
    engine.remove_adapter("a1")
    assert engine.peft is None  # the last adapter gone: the plain model again


def test_row_queued_before_delete_and_reregister_is_refused(engine, settings):
    """A row accepted for adapter 'a1' must not run on a different adapter registered under the
    same name while it waited in the queue (the generation id tells them apart)."""
    _load(engine, "a1", settings)
    queued = _row(engine, [1, 5, 9], "a1", (1,))
    engine.remove_adapter("a1")
    _load(engine, "a1", settings, source="a2")
    stale, fresh = engine.run_batch([queued, _row(engine, [1, 5, 9], "a1", (1,))])
    assert isinstance(stale, ServiceError) and stale.status == 404 and "replaced" in stale.message
    assert fresh.ids == [1, 5, 9]
    assert engine.adapters["a1"].generation != queued.generation


def _row(engine, ids: list[int], adapter: str | None, layers: tuple[int, ...]) -> Row:
    """A row as the features route builds it: the adapter's generation captured at acceptance."""
    generation = engine.adapters[adapter].generation if adapter is not None else 0
    return Row(ids, adapter, layers, generation=generation)


def _concurrent(app, bodies):
    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
                responses = await asyncio.gather(*(c.post("/v1/features", json=b) for b in bodies))
                metrics = (await c.get("/metrics")).text
        return responses, metrics
    return asyncio.run(main())


def test_concurrent_requests_share_forwards(world, tmp_path, engine):
    s = world.settings(tmp_path, max_wait_ms=200, max_batch=8)
    app = create_app(s, engine)
    bodies = [{"inputs": [[1, 5 + i, 9, 12]], "saes": ["sae1", "sae2"]} for i in range(6)]
    responses, metrics = _concurrent(app, bodies)
    assert all(r.status_code == 200 for r in responses)
    line = next(x for x in metrics.splitlines() if x.startswith("lorasae_batch_rows_count"))
    assert float(line.split()[-1]) < 6  # fewer forwards than requests
    # each equals the same request run alone
    for body, response in zip(bodies, responses):
        row = Row(body["inputs"][0], None, (1, 2))
        alone = engine.run_batch([row])[0]
        tokens = response.json()["results"][0]["tokens"]
        assert [t["loss"] for t in tokens[:-1]] == pytest.approx(alone.loss, abs=1e-4)


def test_queue_full_is_429_with_retry_after(world, tmp_path, engine):
    s = world.settings(tmp_path, max_queue=2, max_batch=1, max_wait_ms=0)
    app = create_app(s, engine)
    real = engine.run_batch

    def slow(rows):
        time.sleep(0.2)
        return real(rows)

    engine.run_batch = slow
    bodies = [{"inputs": [[1, 5, 9]]}] * 6
    responses, metrics = _concurrent(app, bodies)
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    assert "lorasae_rejected_total" in metrics


def test_batcher_groups_by_sae_set_and_limits(engine):
    batcher = Batcher(engine, max_batch=3, max_batch_tokens=12, max_wait_ms=0, max_queue=100)
    seen = []
    real = engine.run_batch

    def spy(rows):
        seen.append([(r.layers, len(r.ids)) for r in rows])
        return real(rows)

    engine.run_batch = spy

    async def main():
        batcher.start()
        rows = [Row([1, 2, 3], None, (1,)), Row([1, 2, 3], None, (2,)), Row([1, 2, 3, 4], None, (1,)),
                Row([1, 2], None, (1,)), Row([1, 2, 3], None, (1,))]
        # submitted together: the first forward takes the compatible rows that fit 12 padded tokens
        results = await batcher.submit(rows)
        await batcher.stop()
        return results

    results = asyncio.run(main())
    assert [len(r.ids) for r in results] == [3, 3, 4, 2, 3]
    assert seen[0] == [((1,), 3), ((1,), 4), ((1,), 2)]  # 3 rows x width 4 = 12 tokens
    assert all(len({layers for layers, _ in batch}) == 1 for batch in seen)
    assert sum(len(b) for b in seen) == 5
