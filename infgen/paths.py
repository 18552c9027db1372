"""Where infgen keeps what it makes once per machine (the fitted offline VAEs, the wallpaper photos)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$INFGEN_CACHE`, or `~/.cache/infgen`."""
    return Path(os.environ.get("INFGEN_CACHE", Path.home() / ".cache" / "infgen"))
