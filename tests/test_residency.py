"""Adapter residency: registered is not loaded. At most ``max_loaded_adapters`` adapters are in the
model, evicted ones wait in the CPU tier (``max_cpu_adapters``) or on disk, and every path gives the
numbers of an adapter that never left; batches mixing more adapters than fit are split; 200
registered adapters hold no more weights than the bound."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from service_fixtures import settings, world  # noqa: F401

from lorasae.service.app import create_app
from lorasae.service.batcher import Batcher
from lorasae.service.engine import Engine, Row
from lorasae.service.errors import ServiceError
from lorasae.service.residency import Residency

IDS = [1, 5, 9, 12, 7, 30, 3]


def _copies(root: Path, n: int, source: str = "a1") -> list[str]:
    """``n`` adapters under ``root``: ``source`` with its LoRA B matrices scaled differently each."""
    names = []
    state = load_file(str(root / source / "adapter_model.safetensors"))
    for i in range(n):
        name = f"c{i:03d}"
        folder = root / name
        if not folder.exists():
            shutil.copytree(root / source, folder)
            scale = 1.0 + 0.05 * (i + 1)
            save_file(
                {k: v * scale if "lora_B" in k else v for k, v in state.items()},
                str(folder / "adapter_model.safetensors"),
            )
        names.append(name)
    return names


def _engine(settings, **limits) -> Engine:
    eng = Engine.from_settings(settings.model_copy(update=limits))
    return eng


def _add(engine: Engine, root: Path, name: str, hot: bool = True) -> None:
    engine.add_adapter(name, engine.validate_adapter(root / name), hot)


def _loss(engine: Engine, adapter: str | None) -> list[float]:
    slot = engine.adapters.get(adapter) if adapter else None
    row = Row(IDS, adapter, (1,), generation=slot.generation if slot else 0)
    out = engine.run_batch([row])[0]
    assert not isinstance(out, ServiceError), out
    return out.loss


@pytest.fixture
def root(settings) -> Path:
    return Path(settings.adapter_root)


@pytest.fixture
def reference(settings, root):
    """Per-token losses of each copy adapter with every adapter loaded (nothing ever evicted)."""
    names = _copies(root, 5)
    eng = _engine(settings, max_loaded_adapters=16)
    try:
        for name in names:
            _add(eng, root, name)
        yield {name: _loss(eng, name) for name in names} | {None: _loss(eng, None)}
    finally:
        eng.close()


def test_tiers_lru_and_exact_numbers(settings, root, reference):
    """max 2 in the model, 1 in the CPU tier: registering 4 leaves the 2 newest loaded, the third
    newest in host memory and the oldest on disk; using one from each tier loads it (counted) and
    gives the same losses as when nothing was evicted."""
    eng = _engine(settings, max_loaded_adapters=2, max_cpu_adapters=1)
    try:
        for name in ("c000", "c001", "c002", "c003"):
            _add(eng, root, name)
        assert eng.resident() == ["c002", "c003"]
        assert list(eng.residency.cpu) == ["c001"]
        assert len(eng.peft.peft_config) == 2 and len(eng.adapters) == 4

        assert _loss(eng, "c000") == pytest.approx(reference["c000"], abs=1e-5)  # disk
        assert eng.resident() == ["c003", "c000"]  # c002 was least recently used
        assert list(eng.residency.cpu) == ["c002"]  # and c001 fell out of the CPU tier to disk
        assert _loss(eng, "c002") == pytest.approx(reference["c002"], abs=1e-5)  # CPU tier
        assert _loss(eng, "c002") == pytest.approx(reference["c002"], abs=1e-5)  # hot
        assert _loss(eng, None) == pytest.approx(reference[None], abs=1e-5)
        snap = eng.residency.snapshot()
        assert snap["loads"] == {"cpu": 1, "disk": 1} and snap["hits"] == 1
        assert snap["evicted"] == 4  # c000, c001 by registrations; c002, c003 by the loads
        assert eng.resident() == ["c000", "c002"] and list(eng.residency.cpu) == ["c003"]
    finally:
        eng.close()


def test_changed_files_refused_on_reload(settings, root, reference):
    """An evicted adapter whose files changed since registration is not loaded silently: 409."""
    eng = _engine(settings, max_loaded_adapters=1)
    try:
        _add(eng, root, "c000")
        _add(eng, root, "c001")  # evicts c000 to disk (no CPU tier)
        weights = root / "c000" / "adapter_model.safetensors"
        state = load_file(str(weights))
        save_file({k: v + 0.5 for k, v in state.items()}, str(weights))
        row = Row(IDS, "c000", (1,), generation=eng.adapters["c000"].generation)
        out = eng.run_batch([row, Row(IDS, None, (1,))])
        assert isinstance(out[0], ServiceError) and out[0].status == 409
        assert "changed since it was registered" in out[0].message
        assert out[1].loss == pytest.approx(reference[None], abs=1e-5)  # the other row is answered
        assert eng.resident() == ["c001"]
    finally:
        eng.close()


def test_victims_spare_the_batch_then_pinned():
    res: Residency[object] = Residency(max_hot=3)
    for name in ("a", "b", "c"):
        res.hot[name] = None
    res.pin(["a", None])
    assert res.victims(["d"]) == ["b"]  # a is pinned (queued rows), so b, the next oldest
    assert res.victims(["d", "e"]) == ["b", "c"]
    assert res.victims(["b", "c", "d"]) == ["a"]  # pinned, but nothing else can go
    res.unpin(["a"])
    assert res.pinned() == set()
    with pytest.raises(ValueError):
        res.victims(["a", "b", "c", "d"])


def test_mixed_batches_split_to_fit(settings, root, reference):
    """12 rows over 4 adapters (+ base) with room for 2 adapters: every forward mixes at most 2,
    every row is answered with its adapter's numbers."""
    eng = _engine(settings, max_loaded_adapters=2)
    names = ["c000", "c001", "c002", "c003"]
    batches: list[set] = []
    real = eng.run_batch

    def recording(rows):
        batches.append({r.adapter for r in rows} - {None})
        return real(rows)

    eng.run_batch = recording

    async def go():
        batcher = Batcher(eng, max_batch=16, max_batch_tokens=4096, max_wait_ms=50, max_queue=64)
        batcher.start()
        try:
            rows = [
                Row(IDS, a, (1,), generation=eng.adapters[a].generation if a else 0)
                for a in [*names, None] * 3
            ]
            return rows, await batcher.submit(rows)
        finally:
            await batcher.stop()

    try:
        for name in names:
            _add(eng, root, name, hot=False)
        rows, outs = asyncio.run(go())
        assert all(len(b) <= 2 for b in batches) and len(batches) >= 2
        for row, out in zip(rows, outs):
            assert out.loss == pytest.approx(reference[row.adapter], abs=1e-5)
        assert eng.residency.pinned() == set()  # pins released with the answers
    finally:
        eng.close()


def test_generation_survives_eviction_between_steps(settings, root):
    """A generation with an adapter, while feature requests for other adapters keep evicting it
    (room for one): it is loaded again before each step and generates what it generates alone."""
    from fastapi.testclient import TestClient

    _copies(root, 3)
    body = {"prompt": "the cat sat", "adapter": "c000", "max_new_tokens": 12}

    def run(limit: int, churn: bool) -> dict:
        limits = {"max_loaded_adapters": limit, "db_path": root.parent / f"registry-{limit}.sqlite3"}
        eng = _engine(settings, **limits)
        app = create_app(settings.model_copy(update=limits), eng)
        try:
            with TestClient(app, base_url="http://localhost") as client:
                for name in ("c000", "c001", "c002"):
                    assert client.post("/v1/adapters", json={"name": name, "path": name}).status_code == 201
                stop = threading.Event()

                def other() -> None:
                    while not stop.is_set():
                        for name in ("c001", "c002"):
                            r = client.post("/v1/features", json={"inputs": ["the dog"], "adapter": name})
                            assert r.status_code == 200

                thread = threading.Thread(target=other)
                if churn:
                    thread.start()
                try:
                    answer = client.post("/v1/generate", json=body)
                finally:
                    stop.set()
                    if churn:
                        thread.join()
                assert answer.status_code == 200, answer.text
                return {"answer": answer.json(), "stats": eng.residency.snapshot(),
                        "metrics": client.get("/metrics").text}
        finally:
            eng.close()

    alone = run(16, churn=False)
    churned = run(1, churn=True)
    assert churned["stats"]["loads"]["disk"] >= 2  # c000 really was evicted and loaded again
    disk_loads = f'lorasae_adapter_loads{{tier="disk"}} {float(churned["stats"]["loads"]["disk"])}'
    assert disk_loads in churned["metrics"] and 'lorasae_adapters_held{tier="hot"} 1.0' in churned["metrics"]
    tokens = [[t["id"] for t in g["tokens"]] for g in alone["answer"]["generations"]]
    assert [[t["id"] for t in g["tokens"]] for g in churned["answer"]["generations"]] == tokens


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_200_adapters_memory_within_the_bound(settings, root):
    """200 registered adapters, 4 in the model and 8 in the CPU tier: the model holds exactly 4
    adapters' LoRA weights, host memory 8 more, and nothing else keeps weights."""
    names = _copies(root, 200)
    eng = _engine(settings, max_loaded_adapters=4, max_cpu_adapters=8)
    try:
        per_adapter = _bytes(load_file(str(root / names[0] / "adapter_model.safetensors")).values())
        for name in names:
            _add(eng, root, name)
        assert len(eng.adapters) == 200
        assert len(eng.peft.peft_config) == 4 and eng.resident() == names[-4:]
        lora = [p for n, p in eng.peft.named_parameters() if "lora_" in n]
        assert _bytes(lora) == 4 * per_adapter
        assert list(eng.residency.cpu) == names[-12:-4]
        assert _bytes(t for a in eng.residency.cpu.values() for t in a.state_dict.values()) == 8 * per_adapter
        assert all(not a.state_dict for a in eng._loaded.values())
        # and using an adapter from disk keeps the bound
        _loss(eng, names[0])
        assert _bytes(p for n, p in eng.peft.named_parameters() if "lora_" in n) == 4 * per_adapter
        assert len(eng.residency.cpu) == 8
        assert torch.isfinite(torch.tensor(_loss(eng, names[100]))).all()
    finally:
        eng.close()
