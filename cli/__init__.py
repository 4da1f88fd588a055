"""The `lorasae` command line: one entry point, one subcommand per job.

The composition root, and the only module that imports both ``lorasae.training`` and
``lorasae.service``: each package contributes its subcommands (``register``), and ``serve`` gets
the training package's trainer of the default SAE, so a fresh machine can serve the default model.
Progress goes to stderr; the JSON result is the last thing printed on stdout. Errors print one line
(``error: ...``) and exit with status 2; set ``LORASAE_DEBUG=1`` to see a traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from lorasae import cliargs
from lorasae.errors import LorasaeError
from lorasae.service import commands as service_commands
from lorasae.training import commands as training_commands
from lorasae.training.train_sae import ensure_default_sae


def build_parser() -> argparse.ArgumentParser:
    """The `lorasae` parser: every package's subcommands (abbreviated flags refused)."""
    parser = argparse.ArgumentParser(prog="lorasae", description=__doc__.splitlines()[0], allow_abbrev=False)
    subparsers = parser.add_subparsers(metavar="COMMAND", required=True)
    training_commands.register(subparsers)
    service_commands.register(subparsers, make_default_sae=ensure_default_sae)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `lorasae` command; the process exit status."""
    handler, args = cliargs.parse_command(build_parser(), argv)
    try:
        handler(args)
    except LorasaeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("LORASAE_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {exc} (LORASAE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0
