"""``lorasae serve --ray``: the same FastAPI app as N Ray Serve replicas behind Serve's HTTP proxy.

Each replica builds the app itself (``create_app(settings)`` in Serve's ingress builder, so the
model and SAEs load in the replica, in the background: ``/readyz`` says 503 until they are in) and
keeps lorasae's own batcher. Requests name their adapter in the ``serve_multiplexed_model_id``
header (the Python client sends it); Serve routes a request to a replica that already holds that
adapter. Inside a replica ``ReplicaMiddleware`` awaits the replica's ``@serve.multiplexed`` loader
for it, which makes the adapter resident in the replica's engine and returns a ``ResidentAdapter``
whose ``__del__`` (called when Serve's per-replica LRU drops it) evicts it again: the engine's
residency cache is Serve's multiplexing cache, both ``max_loaded_adapters`` long. Every answer
carries ``x-lorasae-replica: <replica id>``.

Ray is imported here only; this module is imported only for ``--ray`` (or ``serve run
lorasae.service.ray_serve:build_app``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasae.errors import LorasaeError
from lorasae_client.client import MULTIPLEX_HEADER

from .errors import ServiceError
from .settings import Settings

try:
    from ray import serve
except ImportError as exc:  # an optional extra
    raise LorasaeError(f"--ray needs Ray Serve: pip install 'lorasae[ray]' ({exc})") from None

log = logging.getLogger("lorasae.service")

REPLICA_HEADER = "x-lorasae-replica"
DEPLOYMENT = "lorasae"
_pending: set[asyncio.Task] = set()  # evictions in flight (a task nobody references may be collected)

__all__ = ["MULTIPLEX_HEADER", "REPLICA_HEADER", "RayOptions", "build_app", "deployment", "run"]


@dataclass
class RayOptions:
    """How many replicas and what each one reserves on the Ray cluster."""

    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0


class ResidentAdapter:
    """An adapter this replica made resident for Serve's multiplexing. Serve calls ``__del__`` when
    its LRU unloads the adapter (in a worker thread): that hands ``engine.evict(name)`` to the
    engine thread without waiting. Never raises; a second call (the garbage collector's) does
    nothing."""

    def __init__(self, engine: Any, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.name = name
        self.loop = loop
        self._evicted = False

    def __del__(self) -> None:
        try:
            if getattr(self, "_evicted", True):
                return
            self._evicted = True
            self.loop.call_soon_threadsafe(_evict, self.engine, self.name)
        except Exception:  # a closed loop: the replica, and its engine, are going away
            pass


def _evict(engine: Any, name: str) -> None:
    """On the replica's event loop: queue ``engine.evict(name)`` on the engine thread."""
    try:
        task = asyncio.ensure_future(engine.call(engine.evict, name))
    except Exception:
        log.warning("could not evict adapter %r", name, exc_info=True)
        return
    _pending.add(task)

    def done(task: asyncio.Task) -> None:
        _pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("evicting adapter %r failed: %s", name, task.exception())

    task.add_done_callback(done)


class ReplicaMiddleware:
    """Pure ASGI, outermost: before the app sees a request whose ``serve_multiplexed_model_id``
    names a registered adapter, loads it through Serve's multiplexing (so Serve routes the next
    requests for it here); tags every answer with ``x-lorasae-replica``. A name the registry does
    not know, or an adapter that does not load, is left to the route (its usual 404 / 409)."""

    def __init__(self, app: Any, service: Any, max_adapters: int) -> None:
        self.app = app
        self.service = service
        self._replica_id: bytes | None = None

        async def load(name: str) -> ResidentAdapter:  # a closure: serve.multiplexed keeps state on it
            engine = self.service.loaded().engine
            await engine.call(engine.make_resident, [name])
            return ResidentAdapter(engine, name, asyncio.get_running_loop())

        self.load_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(load)

    @property
    def replica_id(self) -> bytes:
        if self._replica_id is None:
            try:
                self._replica_id = str(serve.get_replica_context().replica_id.unique_id).encode()
            except Exception:  # outside a replica (the app run by something else)
                self._replica_id = b"local"
        return self._replica_id

    async def make_resident(self, name: str) -> None:
        svc = self.service
        if not svc.ready.is_set():
            return  # the route answers 503
        try:
            svc.loaded().registry.require_ready(name)  # unknown: 404, unloadable: 409, by the route
            await self.load_adapter(name)
        except ServiceError as exc:
            log.info("adapter %r not made resident: %s", name, exc.message)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        name = serve.get_multiplexed_model_id()
        if name:
            await self.make_resident(name)
        replica = self.replica_id

        async def send_tagged(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", ()), (REPLICA_HEADER.encode(), replica)],
                }
            await send(message)

        await self.app(scope, receive, send_tagged)


def replica_app(settings: Settings) -> Any:
    """The app one replica serves: ``create_app(settings)`` (loading in the background) inside
    ``ReplicaMiddleware``. Runs on the replica."""
    import torch

    from .app import create_app

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    logging.getLogger("lorasae").setLevel(logging.INFO)
    app = create_app(settings)
    app.add_middleware(
        ReplicaMiddleware, service=app.state.service, max_adapters=settings.max_loaded_adapters
    )
    return app


def _absolute(settings: Settings) -> Settings:
    """``settings`` with local paths made absolute: replicas run in other processes (and folders).
    The admin key travels resolved (a replica may not see the driver's environment)."""

    def local(spec: str) -> str:
        path = Path(spec).expanduser()
        return str(path.resolve()) if path.exists() else spec

    update: dict[str, Any] = {
        "model": local(settings.model),
        "saes": [local(s) for s in settings.saes],
        "dashboards": [local(s) for s in settings.dashboards],
        "drift": [local(s) for s in settings.drift],
    }
    for name in ("adapter_root", "db_path"):
        value = getattr(settings, name)
        update[name] = Path(value).expanduser().absolute() if value is not None else None
    key = settings.check_safe()
    if key is not None:
        from pydantic import SecretStr

        update["api_key"], update["api_key_env"] = SecretStr(key), None
    return settings.model_copy(update=update)


def deployment(settings: Settings, options: RayOptions) -> Any:
    """The Serve application: ``options.replicas`` replicas of the app (``serve.run`` it)."""
    if options.replicas < 1:
        raise LorasaeError("--replicas must be at least 1")
    if options.replicas > 1 and not settings.shared_registry:
        raise LorasaeError(
            f"--replicas {options.replicas} needs a registry the replicas share: pass --registry "
            "postgresql://... (the SQLite --db allows one server per adapter root)"
        )
    settings = _absolute(settings)

    def build() -> Any:  # evaluated on each replica
        return replica_app(settings)

    actor: dict[str, Any] = {"num_cpus": options.cpus_per_replica}
    if options.gpus_per_replica:
        actor["num_gpus"] = options.gpus_per_replica
    replicas = serve.deployment(
        name=DEPLOYMENT,
        num_replicas=options.replicas,
        ray_actor_options=actor,
        # lorasae batches and bounds its own queue (429 past max_queue): let requests reach it
        max_ongoing_requests=settings.max_connections,
    )
    return replicas(serve.ingress(build)()).bind()


def build_app(args: dict[str, str]) -> Any:
    """For ``serve run lorasae.service.ray_serve:build_app [config=FILE] [replicas=N]
    [cpus_per_replica=X]``: settings from the config file and the ``LORASAE_*`` env vars."""
    settings = Settings.load(config=args.get("config"))
    options = RayOptions(
        replicas=int(args.get("replicas", 1)),
        cpus_per_replica=float(args.get("cpus_per_replica", 1.0)),
        gpus_per_replica=float(args.get("gpus_per_replica", 0.0)),
    )
    return deployment(settings, options)


def run(settings: Settings, options: RayOptions) -> None:
    """Start (or join: ``$RAY_ADDRESS``) a Ray cluster, serve the app on ``settings.host:port``
    through Serve's proxy with ``options.replicas`` replicas, and block until interrupted."""
    import ray

    app = deployment(settings, options)  # refuses bad options before starting anything
    signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl-C: Serve and Ray shut down
    ray.init()
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(app, name=DEPLOYMENT, route_prefix="/")
        print(
            f"serving {options.replicas} replica(s) on http://{settings.host}:{settings.port} "
            "(each loads the model in the background: /readyz; Ctrl-C stops)",
            file=sys.stderr,
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr, flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
