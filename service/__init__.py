"""The lorasae feature server (FastAPI): ``create_app(settings, engine=None)``; ``lorasae serve`` runs it."""

from __future__ import annotations


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
