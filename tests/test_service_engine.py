"""The engine and batcher: served numbers equal the offline splice code, mixed-adapter batches equal
one-by-one forwards, concurrent requests share forwards, and a full queue answers 429."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import torch
from service_fixtures import TEXTS, _tokenizer, client, engine, make_adapter, register, settings, world  # noqa: F401

from lorasae.models import load_model
from lorasae.saes import load_sae
from lorasae.service.app import create_app
from lorasae.service.batcher import Batcher
from lorasae.service.engine import Row
from lorasae.service.errors import ServiceError
from lorasae.splice import Splice

WAIT_S = 120.0  # a bound on waits for events, generous for a slow shared machine (never a delay)


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
    _assert_equals_offline(served, model, saes, ids)


def _assert_equals_offline(served: dict, model: torch.nn.Module, saes: list, ids: list[list[int]]) -> None:
    """Each served row (top_k 8, logits top 3) equals ``model`` run alone on it with the SAEs spliced."""
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
    """With the forward held, one row runs and two wait (max_queue 2): of six single-row requests
    at least three are refused at once (429), and the rest are answered once it is let go."""
    s = world.settings(tmp_path, max_queue=2, max_batch=1, max_wait_ms=0)
    app = create_app(s, engine)
    release = threading.Event()
    real = engine.run_batch

    def held(rows):
        release.wait(timeout=WAIT_S)
        return real(rows)

    engine.run_batch = held

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
                posts = [asyncio.create_task(c.post("/v1/features", json={"inputs": [[1, 5, 9]]}))
                         for _ in range(6)]
                try:  # nothing can succeed while the forward is held: what is done was refused
                    await _until(lambda: sum(p.done() for p in posts) >= 3, "three refusals")
                finally:
                    release.set()
                responses = await asyncio.gather(*posts)
                metrics = (await c.get("/metrics")).text
        return responses, metrics

    responses, metrics = asyncio.run(main())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and codes.count(429) >= 3 and set(codes) <= {200, 429}
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    assert "lorasae_rejected_total" in metrics


async def _until(condition, what: str, timeout: float = WAIT_S) -> None:
    """Poll ``condition`` on the event loop until it holds; fail after a generous ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout} s for {what}")
        await asyncio.sleep(0.01)


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


# ------------------------------------------------------------------ a failed adapter install


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("CUDA out of memory")], ids=["oom-host", "oom-cuda"])
@pytest.mark.parametrize("where", ["wrapping", "weights"])
def test_install_failure_is_not_a_mismatch(engine, settings, monkeypatch, error, where):
    """An error of the server's own while an adapter goes in (out of memory, a bug) propagates as it
    is (the app answers a logged 500, not a 409 blaming the client), and the model is left as it
    was: peft had wrapped some modules (``wrapping``: it fails at the second) or loaded the config
    (``weights``) when it failed."""
    import peft
    from peft.tuners.lora.model import LoraModel

    rows = [Row([1, 5, 9, 12], None, (1,))]
    modules = [name for name, _ in engine.base.named_modules()]
    clean = engine.run_batch(rows)[0].loss
    x = engine.validate_adapter(settings.adapter_root / "a2")

    def install_failing() -> None:
        with monkeypatch.context() as patch:
            if where == "weights":
                patch.setattr(peft, "set_peft_model_state_dict", _raiser(error))
            else:
                patch.setattr(LoraModel, "_create_and_replace", _raiser(error, after=1,
                                                                        real=LoraModel._create_and_replace))
            with pytest.raises(type(error)) as raised:
                engine.add_adapter("x", x)
        assert raised.value is error

    install_failing()  # as the first adapter: peft's model is being built
    assert engine.adapters == {} and engine.peft is None
    assert [name for name, _ in engine.base.named_modules()] == modules
    assert engine.run_batch(rows)[0].loss == clean

    _load(engine, "a1", settings)
    with_a1 = engine.run_batch([_row(engine, [1, 5, 9, 12], "a1", (1,))])[0].loss
    install_failing()  # beside a loaded adapter
    assert set(engine.adapters) == {"a1"} and set(engine.peft.peft_config) == {"a1"}
    assert not [name for name, _ in engine.peft.named_modules() if name.endswith(".x")]
    assert engine.run_batch(rows)[0].loss == clean
    assert engine.run_batch([_row(engine, [1, 5, 9, 12], "a1", (1,))])[0].loss == with_a1

    engine.add_adapter("x", x)  # the same adapter installs fine afterwards
    assert set(engine.adapters) == {"a1", "x"}
    # and an adapter peft finds does not fit (config rank 8, weights rank 4) is still a 409
    wrong_rank = engine.validate_adapter(settings.adapter_root / "a1")
    wrong_rank.config.r = 8
    with pytest.raises(ServiceError) as refused:
        engine.add_adapter("y", wrong_rank)
    assert (refused.value.status, refused.value.code) == (409, "adapter_mismatch")
    assert set(engine.adapters) == {"a1", "x"} and set(engine.peft.peft_config) == {"a1", "x"}


def _raiser(error: BaseException, after: int = 0, real=None):
    """A stand-in that calls ``real`` ``after`` times, then raises ``error``."""
    calls = []

    def fn(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise error
        return real(*args, **kwargs)
    return fn


# ------------------------------------------------------------------ GPT-2-style (Conv1D) adapters


@pytest.fixture(scope="module")
def gpt2_world(tmp_path_factory):
    """A tiny random GPT-2 (Conv1D layers: weight ``[in, out]``) with the tiny world's tokenizer,
    a TopK SAE on layer 1 and a LoRA adapter on ``c_attn``/``c_proj`` (``fan_in_fan_out``)."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from service_fixtures import WORDS
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2-world")
    gen = torch.Generator().manual_seed(0)
    corpus = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (200,), generator=gen))
              for _ in range(40)]
    tokenizer = _tokenizer(corpus)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=256,
                        bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    model_dir = root / "model"
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=8,
                                metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    sae.save_model(root / "sae1")
    make_adapter(model_dir, root / "adapters" / "g1", [root / "sae1"], seed=7,
                 targets=("c_attn", "c_proj"), layers=(1, 2), fan_in_fan_out=True)
    return root


def test_conv1d_adapter_served_equals_offline_splice(gpt2_world, tmp_path):
    """A LoRA adapter on GPT-2's Conv1D layers, registered over HTTP, serves the numbers of
    lorasae.splice.Splice on PeftModel.from_pretrained (and they differ from the base model's)."""
    from fastapi.testclient import TestClient
    from peft import PeftModel

    from lorasae.service.engine import Engine
    from lorasae.service.settings import Settings

    settings = Settings(model=str(gpt2_world / "model"), saes=[str(gpt2_world / "sae1")],
                        adapter_root=gpt2_world / "adapters", db_path=tmp_path / "registry.sqlite3",
                        device="cpu", max_wait_ms=2.0)
    engine = Engine.from_settings(settings)
    ids = [[1, 5, 9, 12, 7, 30, 3], [1, 40, 41]]
    body = {"inputs": ids, "top_k": 8, "logits": "top_k", "logits_top_k": 3}
    try:
        with TestClient(create_app(settings, engine), base_url="http://localhost") as client:
            assert register(client, "g1").status_code == 201
            served = client.post("/v1/features", json={**body, "adapter": "g1"}).json()
            base = client.post("/v1/features", json=body).json()
    finally:
        engine.close()
    lm = load_model(str(gpt2_world / "model"), "cpu")
    saes = [load_sae(str(gpt2_world / "sae1"), model=lm.model)]
    _assert_equals_offline(base, lm.model, saes, ids)
    _assert_equals_offline(served, PeftModel.from_pretrained(lm.model, str(gpt2_world / "adapters" / "g1")),
                           saes, ids)
    def losses(response: dict) -> list[list[float | None]]:
        return [[t["loss"] for t in result["tokens"]] for result in response["results"]]
    assert losses(served) != losses(base)
