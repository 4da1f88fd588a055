"""`lorasae serve --ray` on a 2-CPU Ray cluster: two replicas of the tiny world sharing one
PostgreSQL registry and adapter root, behind Serve's HTTP proxy.

Shows: every answer names its replica (``x-lorasae-replica``); requests that name an adapter in the
multiplexed-model header (the Python client sends it) land on the replica that loaded it; another
adapter goes to the other replica; an unknown adapter is the usual 404; the answers equal the
offline splice (``lorasae.splice.Splice`` + peft) to 1e-4.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest
from postgres_fixtures import postgres, postgres_url  # noqa: F401
from service_fixtures import _free_port, engine, settings, wait_until, world  # noqa: F401
from test_service_engine import _assert_equals_offline

from lorasae.models import load_model
from lorasae.saes import load_sae
from lorasae_client import LoraSaeClient
from lorasae_client.client import MULTIPLEX_HEADER

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'lorasae[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'lorasae[ray]')")

REPLICA = "x-lorasae-replica"
IDS = [[1, 5, 9, 12, 7, 30, 3], [1, 40, 41]]

@pytest.fixture
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def _replicas_seen(url: str, path: str, want: int, headers: dict | None = None, timeout: float = 300.0):
    """Replica ids that answered ``path`` with 200, polled until ``want`` distinct ones did."""
    seen: set[str] = set()

    def enough() -> bool:
        try:
            r = httpx.get(url + path, headers=headers, timeout=10)
        except httpx.TransportError:
            return False
        if r.status_code == 200:
            seen.add(r.headers[REPLICA])
        return len(seen) >= want

    wait_until(enough, f"{want} replicas answering {path} with 200", timeout)
    return seen


def test_two_replicas_route_by_adapter_and_equal_offline(world, tmp_path, postgres_url, ray_cluster):  # noqa: F811
    from lorasae.service.ray_serve import RayOptions, deployment

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    shared = world.settings(tmp_path, registry=postgres_url, registry_poll_s=0.2, torch_threads=1,
                              port=port, max_loaded_adapters=2)
    started = time.monotonic()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deployment(shared, RayOptions(replicas=2, cpus_per_replica=0.5)), name="lorasae",
              route_prefix="/")
    replicas = _replicas_seen(url, "/readyz", 2)  # both loaded the model (each in the background)
    print(f"2 replicas ready in {time.monotonic() - started:.1f} s")

    answered: list[str] = []
    http = httpx.Client(base_url=url, timeout=60,
                        event_hooks={"response": [lambda r: answered.append(r.headers.get(REPLICA))]})
    api = LoraSaeClient(http_client=http)
    for name in ("a1", "a12"):
        assert api.register_adapter(name, path=name).name == name  # on one replica ...
    for name in ("a1", "a12"):  # ... and on the other within a poll interval
        _replicas_seen(url, f"/v1/adapters/{name}", 2, timeout=60)

    # the first a1 request loads it on one replica; Serve learns that and routes the others there
    api.features(IDS[:1], adapter="a1")
    home = answered[-1]
    assert home in replicas
    time.sleep(1.0)  # the replica's loaded-model list reaches the proxy (pushed every 0.1 s)
    answered.clear()
    for _ in range(20):
        api.features(IDS[:1], adapter="a1")
    assert answered == [home] * 20

    # another adapter goes to the replica holding fewer, then stays there
    api.features(IDS[:1], adapter="a12")
    other = answered[-1]
    assert other != home and other in replicas
    time.sleep(1.0)
    answered.clear()
    for _ in range(10):
        api.features(IDS[:1], adapter="a12")
        api.features(IDS[:1], adapter="a1")
    assert answered == [other, home] * 10

    # an unknown adapter is the usual 404 (not a failed multiplexed load), from some replica
    r = httpx.post(f"{url}/v1/features", json={"inputs": "the cat", "adapter": "nope"},
                   headers={MULTIPLEX_HEADER: "nope"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_adapter", r.text
    assert r.headers[REPLICA] in replicas
    # without the header a request is served too (any replica loads the adapter on first use)
    r = httpx.post(f"{url}/v1/features", json={"inputs": "the cat", "adapter": "a1"}, timeout=60)
    assert r.status_code == 200 and r.headers[REPLICA] in replicas

    # the answers equal the offline splice
    from peft import PeftModel

    body = {"inputs": IDS, "top_k": 8, "logits": "top_k", "logits_top_k": 3}
    for adapter, layers in ((None, [1, 2]), ("a1", [1]), ("a12", [1, 2])):
        headers = {MULTIPLEX_HEADER: adapter} if adapter else {}
        r = httpx.post(f"{url}/v1/features", json={**body, "adapter": adapter}, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        lm = load_model(str(world.model), "cpu")
        saes = [load_sae(str(world.saes[layer]), model=lm.model) for layer in layers]
        model = lm.model if adapter is None else PeftModel.from_pretrained(
            lm.model, str(shared.adapter_root / adapter))
        _assert_equals_offline(r.json(), model, saes, IDS)
    http.close()


def test_replicas_need_a_shared_registry(world, tmp_path):  # noqa: F811
    from lorasae.errors import LorasaeError
    from lorasae.service.ray_serve import RayOptions, deployment

    with pytest.raises(LorasaeError, match="--registry"):
        deployment(world.settings(tmp_path), RayOptions(replicas=2))


def test_serve_unloading_an_adapter_evicts_it_from_the_engine(engine, settings):  # noqa: F811
    """The multiplexed loader's handle: Serve calls its ``__del__`` (in a worker thread) when its
    LRU drops the adapter; that evicts it from the engine. A second call, or one after the loop
    closed, does nothing and never raises."""
    from lorasae.service.ray_serve import ResidentAdapter

    engine.add_adapter("a1", engine.validate_adapter(settings.adapter_root / "a1"), hot=False)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        await engine.call(engine.make_resident, ["a1"])
        assert await engine.call(engine.resident) == ["a1"]
        handle = ResidentAdapter(engine, "a1", loop)
        await loop.run_in_executor(None, handle.__del__)  # as Serve's multiplexer does
        for _ in range(1000):
            if not await engine.call(engine.resident):
                break
            await asyncio.sleep(0.01)
        assert await engine.call(engine.resident) == []
        handle.__del__()  # the garbage collector's call: nothing happens
        await engine.call(engine.make_resident, ["a1"])
        return handle

    asyncio.run(scenario())
    closed = asyncio.new_event_loop()
    closed.close()
    ResidentAdapter(engine, "a1", closed).__del__()  # the replica is going away: no error
    assert engine.resident() == ["a1"]


def test_serve_ray_cli_errors_are_one_line(world, capsys, monkeypatch):  # noqa: F811
    import sys

    import lorasae.service
    from lorasae.cli import main

    base = ["serve", "--model", str(world.model), "--sae", str(world.saes[1])]
    assert main([*base, "--replicas", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --replicas needs --ray (one plain server is one process)")
    assert main([*base, "--ray", "--replicas", "2"]) == 2
    assert "error: --replicas 2 needs a registry the replicas share" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # ray not installed
    monkeypatch.delitem(sys.modules, "lorasae.service.ray_serve", raising=False)
    monkeypatch.delattr(lorasae.service, "ray_serve", raising=False)  # imported above: import it again
    assert main([*base, "--ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --ray needs Ray Serve: pip install 'lorasae[ray]'") and "\n" not in err
