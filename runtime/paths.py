"""Where gptkit keeps files it can rebuild: token caches, optimised graphs, the unpacked corpus."""

from __future__ import annotations

import os
from pathlib import Path


def gptkit_cache_dir() -> Path:
    """$GPTKIT_CACHE_DIR, else $XDG_CACHE_HOME/gptkit, else ~/.cache/gptkit."""
    base = os.environ.get("GPTKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gptkit"
    )
    return Path(base)
