"""A per-machine cache of ONNX Runtime's optimised graph, so a large model loads in a third of the time.

Creating a CPU session for a large model is mostly ONNX Runtime parsing the weights out of the
protobuf, optimising the graph (fusions, constant folding) and copying every initializer, with a
memory peak well above the weights' size. None of that depends on anything but the file, the ONNX
Runtime version and the machine. So the first load saves the optimised graph, with its weights in
an external data file beside it; later loads read the small graph, skip the optimisers and
memory-map the weights (the README's performance section has the load times and peaks).

One entry per model path, under ``$GPTKIT_CACHE_DIR/ort`` (default ``~/.cache/gptkit/ort``),
stamped with the file's size and mtime, the ONNX Runtime version and the CPU architecture; a file
that changes replaces its entry, and entries of files that are gone or changed are removed
whenever a new entry is built. Only CPU sessions at optimisation level "all" over files of at
least ``MIN_BYTES`` use it (small models load in milliseconds anyway). Anything that goes wrong
with the cache (read-only home, full disk, a damaged entry) falls back to a plain load: the cache
can make loading faster, never make it fail. Opt out with ``runtime.load(..., cache=False)``,
``gptkit run --no-cache`` or ``GPTKIT_ORT_CACHE=0``; deleting the directory is always safe.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort

from runtime.files import gptkit_cache_dir

MIN_BYTES = 32 * 2**20
MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
STAMP_NAME = "stamp.json"
DISABLE_ENV = "GPTKIT_ORT_CACHE"


def enabled(path: Path) -> bool:
    """Whether a load of ``path`` should go through the cache (size and the opt-out variable)."""
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        return path.stat().st_size >= MIN_BYTES
    except OSError:
        return False


class Entry:
    """The cache directory for one model path, and the stamp that says what it was built from."""

    def __init__(self, source: Path) -> None:
        real = source.resolve()
        info = real.stat()
        digest: str = _sha256(str(real).encode()).hexdigest()[:20]
        self.dir = gptkit_cache_dir() / "ort" / digest
        self.stamp = {
            "source": str(real),
            "size": info.st_size,
            "mtime_ns": info.st_mtime_ns,
            "onnxruntime": ort.__version__,
            "machine": platform.machine(),
        }

    @property
    def model(self) -> Path:
        return self.dir / MODEL_NAME

    def is_current(self) -> bool:
        try:
            stamp = json.loads((self.dir / STAMP_NAME).read_text())
        except (OSError, ValueError):
            return False
        return stamp == self.stamp and (self.dir / DATA_NAME).is_file() and self.model.is_file()

    def remove(self) -> None:
        _rmtree(self.dir)


def _sha256(data: bytes) -> Any:
    """hashlib.sha256 from CPython's own module: every cached load names its entry, and
    ``import hashlib`` loads OpenSSL (~25 ms, a tenth of an int8 GPT-2 start)."""
    for name in ("_sha2", "_sha256"):  # Python 3.12+, 3.11
        try:
            return importlib.import_module(name).sha256(data)
        except (ImportError, AttributeError):
            pass
    import hashlib

    return hashlib.sha256(data)


def open_session(
    source: Path,
    make_options: Callable[[], ort.SessionOptions],
    providers: list[str],
) -> ort.InferenceSession | None:
    """A CPU session over ``source`` through the cache, or None when the cache cannot be used.

    ``make_options`` returns fresh SessionOptions as the caller wants them (threads, logging);
    the cache sets the optimisation level and the optimised-model output itself.
    """
    try:
        entry = Entry(source)
    except OSError:
        return None
    if entry.is_current():
        options = make_options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(entry.model), options, providers=providers)
        except Exception:  # a damaged entry: rebuild it below
            entry.remove()
    return _build(source, entry, make_options, providers)


def _build(
    source: Path,
    entry: Entry,
    make_options: Callable[[], ort.SessionOptions],
    providers: list[str],
) -> ort.InferenceSession | None:
    """Load ``source`` normally while ONNX Runtime writes the optimised graph into a new entry."""
    import tempfile  # shutil and tempfile only when an entry is built: a hit loads faster

    staging = None
    try:
        entry.dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=entry.dir.parent, prefix=f".{entry.dir.name}."))
        options = make_options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(staging / MODEL_NAME)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", DATA_NAME
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
        session = ort.InferenceSession(str(source), options, providers=providers)
        (staging / STAMP_NAME).write_text(json.dumps(entry.stamp))
        entry.remove()
        os.rename(staging, entry.dir)  # complete entries only: a crash leaves a hidden staging dir
        staging = None
        prune(entry.dir.parent)
        return session
    except Exception:  # no space, read-only cache, a model ORT cannot save: load without cache
        return None
    finally:
        if staging is not None:
            _rmtree(staging)


def prune(root: Path) -> list[Path]:
    """Remove entries whose model file is gone or has changed since; returns what was removed.

    Runs whenever an entry is built, so the cache holds at most one entry per model file that
    still exists. Entries being built by another process (hidden staging dirs) are left alone.
    """
    removed = []
    for directory in root.iterdir():
        if directory.name.startswith(".") or not directory.is_dir():
            continue
        try:
            stamp = json.loads((directory / STAMP_NAME).read_text())
            info = Path(stamp["source"]).stat()
            current = (info.st_size, info.st_mtime_ns) == (stamp["size"], stamp["mtime_ns"])
        except (OSError, ValueError, KeyError, TypeError):
            current = False
        if not current:
            _rmtree(directory)
            removed.append(directory)
    return removed


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
