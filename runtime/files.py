"""File helpers every layer uses: crash-safe writes and the cache directory.

Torch-free and dependency-free, at the bottom of the stack, so checkpoints, token caches, metrics,
exports and the runtime's graph cache all write and place files the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "model.onnx"  # what `gptkit export` writes and `gptkit run` loads by default


def gptkit_cache_dir() -> Path:
    """Where gptkit keeps files it can rebuild (token caches, optimised graphs).

    $GPTKIT_CACHE_DIR, else $XDG_CACHE_HOME/gptkit, else ~/.cache/gptkit.
    """
    base = os.environ.get("GPTKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gptkit"
    )
    return Path(base)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory, then rename.

    A crash at any moment leaves either the old file or the new one, never half of either.
    """
    import tempfile  # here, not at the top: loading a model never writes

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a saved file should read like any other
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
