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
from lorasae.saes import DefaultSaeMaker

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

    settings = Settings.load(config=cliargs.build(ServeOptions, args).config, **cliargs.given(args, Settings))
    settings.check_safe()  # fail now, not after loading the model: unset key variable, open bind
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    print(f"loading {settings.model} ...", file=sys.stderr, flush=True)
    engine = Engine.from_settings(settings, make_default_sae)  # load errors end as `error: ...`
    dashboards = DashboardIndex.build(engine, settings.dashboards)  # so do dashboards that do not fit
    drift = DriftIndex.build(engine, settings.drift)  # and drift reports
    uvicorn.run(create_app(settings, engine, dashboards, drift), **uvicorn_options(settings))


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
