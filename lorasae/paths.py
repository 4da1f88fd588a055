"""Where lorasae keeps what it caches (tokenised corpora, the default SAE, the demo adapter)."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The cache root: ``$LORASAE_HOME`` if set, else ``~/.cache/lorasae`` (not created here:
    whoever writes below it creates the folders it needs)."""
    root = os.environ.get("LORASAE_HOME") or Path.home() / ".cache" / "lorasae"
    return Path(root).expanduser()
