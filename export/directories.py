"""Directory exports (``--format hf``, ``--format genai``): checked early, staged beside the
target, published by rename, so a failed or interrupted export never leaves half a folder where
the user asked for one, and gptkit replaces only folders it wrote itself."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from runtime.errors import ExportError


def check_output_dir(target: Path, *, is_ours: Callable[[Path], bool], kind: str) -> None:
    """Fail in a second, before any work, when ``target`` cannot become the export directory.

    ``is_ours`` says whether a non-empty ``target`` is a previous export of this ``kind`` (say
    "Hugging Face"), the only non-empty directory gptkit replaces.
    """
    if target.is_symlink():
        raise ExportError(f"{target} is a symbolic link; give the real directory's path")
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target} is a file; this format writes a directory, give a new name")
    absolute = Path(os.path.abspath(target))
    if absolute == Path.cwd() or absolute.parent == absolute:
        raise ExportError(f"{target} is the current or root directory; give a new directory name")
    parent = absolute.parent
    if not parent.is_dir():
        raise ExportError(f"directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write to {parent} (permission denied); choose another path")
    if target.is_dir() and any(target.iterdir()) and not is_ours(target):
        raise ExportError(
            f"{target} is not empty and is not a gptkit {kind} export; give a new directory "
            "name (gptkit only replaces its own exports)"
        )


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A hidden directory beside ``target`` (same file system), removed unless published."""
    parent = Path(os.path.abspath(target)).parent
    try:
        staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp"))
    except OSError as e:
        raise ExportError(f"cannot write to {parent}: {e.strerror or e}") from None
    os.chmod(staging, 0o755)  # mkdtemp's 0700 would surprise whoever shares the model
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_directory(staging: Path, target: Path) -> None:
    """Sync ``staging``, then rename it to ``target``; a previous ``target`` is moved aside
    first and deleted after, so a crash leaves the old or the new directory (maybe hidden)."""
    for path in staging.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    if not target.exists():
        os.replace(staging, target)
        return
    old = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.old"
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
