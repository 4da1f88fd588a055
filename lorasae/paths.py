"""Where lorasae keeps what it caches (tokenised corpora, the default SAE, the demo adapter)."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The cache root: ``$LORASAE_HOME`` if set, else ``~/.cache/lorasae``."""
    root = os.environ.get("LORASAE_HOME") or Path.home() / ".cache" / "lorasae"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
