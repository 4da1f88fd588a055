"""The lorasae feature server (FastAPI): ``create_app(settings, engine=None)``; ``lorasae serve`` runs it."""

from __future__ import annotations

if __name__ != "lorasae.service":  # e.g. `import service` from the repo root: a second copy of the code
    raise ImportError(
        f"import lorasae.service, not {__name__}: the service/ folder is installed as "
        "lorasae.service (pip install -e .)"
    )


def __getattr__(name: str):
    # Lazy: `import lorasae.service` stays cheap; the app pulls in torch and the core.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "Settings":
        from .settings import Settings

        return Settings
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["create_app", "Settings", "Engine"]
