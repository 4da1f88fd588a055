"""The service package's `lorasae` subcommand: ``serve``.

Its flags are the fields of ``Settings`` (``lorasae.cliargs``); a flag not given leaves the field to
the ``LORASAE_*`` environment variables, the config file and the defaults, in that order.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from functools import partial

from lorasae import cliargs
from lorasae.errors import LorasaeError
from lorasae.models import DEFAULT_MODEL
from lorasae.saes import SAE_CONFIG_FILE, DefaultSaeMaker, default_sae_dir

from .settings import Settings


@dataclass
class ServeOptions:
    """Where `serve` reads the settings the flags and env vars leave unset."""

    config: str | None = field(
        default=None,
        metadata={
            "help": "TOML/JSON settings file (also $LORASAE_CONFIG); every setting can also be an env "
            "var LORASAE_<NAME>"
        },
    )
    ray: bool = field(
        default=False,
        metadata={
            "help": "serve through Ray Serve: --replicas copies of the app behind Serve's HTTP proxy on "
            "--host/--port, requests routed to a replica that holds their adapter (needs "
            "pip install 'lorasae[ray]'; $RAY_ADDRESS joins a running cluster)"
        },
    )
    replicas: int = field(
        default=1,
        metadata={
            "help": "with --ray: replicas, each loading the model (more than 1 needs a shared --registry)"
        },
    )
    ray_cpus_per_replica: float = field(
        default=1.0, metadata={"help": "with --ray: CPUs each replica reserves"}
    )
    ray_gpus_per_replica: float = field(
        default=0.0, metadata={"help": "with --ray: GPUs each replica reserves"}
    )


def serve(args: argparse.Namespace, make_default_sae: DefaultSaeMaker | None = None) -> None:
    """Load the model and SAEs the settings name, then serve until stopped. ``make_default_sae``
    makes the default SAE when none is given and it is not cached yet (else that is an error)."""
    import torch
    import uvicorn

    from .app import create_app
    from .dashboards import DashboardIndex
    from .drift import DriftIndex
    from .engine import Engine
    from .limits import uvicorn_options

    options = cliargs.build(ServeOptions, args)
    settings = Settings.load(config=options.config, **cliargs.given(args, Settings))
    settings.check_safe()  # fail now, not after loading the model: unset key variable, open bind
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if options.ray:
        return serve_on_ray(settings, options, make_default_sae)
    if options.replicas != 1:
        raise LorasaeError("--replicas needs --ray (one plain server is one process)")
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    print(f"loading {settings.model} ...", file=sys.stderr, flush=True)
    engine = Engine.from_settings(settings, make_default_sae)  # load errors end as `error: ...`
    dashboards = DashboardIndex.build(engine, settings.dashboards)  # so do dashboards that do not fit
    drift = DriftIndex.build(engine, settings.drift)  # and drift reports
    uvicorn.run(create_app(settings, engine, dashboards, drift), **uvicorn_options(settings))


def serve_on_ray(
    settings: Settings, options: ServeOptions, make_default_sae: DefaultSaeMaker | None = None
) -> None:
    """``serve --ray``: the app as Ray Serve replicas (``ray_serve``; ray is imported only here)."""
    from . import ray_serve  # a one-line error without ray

    ray_options = ray_serve.RayOptions(
        options.replicas, options.ray_cpus_per_replica, options.ray_gpus_per_replica
    )
    ray_serve.deployment(settings, ray_options)  # refuse bad options before anything loads
    if not settings.saes and settings.model == DEFAULT_MODEL and make_default_sae is not None:
        if not (default_sae_dir() / SAE_CONFIG_FILE).exists():  # make it once here, not in every replica
            from lorasae.models import load_model

            print("making the default SAE ...", file=sys.stderr, flush=True)
            make_default_sae(load_model(settings.model, settings.device, settings.dtype))
    ray_serve.run(settings, ray_options)


def register(subparsers: argparse._SubParsersAction, make_default_sae: DefaultSaeMaker | None = None) -> None:
    """Add ``serve`` to the `lorasae` parser's subcommands (``make_default_sae``: see ``serve``)."""
    cliargs.add_command(
        subparsers,
        "serve",
        partial(serve, make_default_sae=make_default_sae),
        Settings,
        ServeOptions,
        help="serve per-token SAE features over HTTP (FastAPI)",
    )
