"""Shared checks for failures: the reliability matrix (test_reliability_*.py) and the CLI tests.

Every failing command must end in exactly one ``Error: ...`` line on stderr, the documented exit
code and no traceback; every library error is one line; and what existed before (a model file, a
checkpoint) must still be intact.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest
    from click.testing import Result

ROOT = Path(__file__).resolve().parent.parent


def one_line_error(result: Result, *needles: str, code: int = 1, only: bool = False) -> str:
    """A CliRunner result that failed with one ``Error: ...`` line holding every needle.

    ``code`` 1 is a GptkitError (the Error line comes last), 2 a click usage error. With
    ``only=True`` the Error line is all the command printed, on stdout and stderr together.
    Returns the line.
    """
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.stderr
    if code == 1:  # library errors: the Error line is the last thing printed
        assert result.stderr.strip().splitlines()[-1] == lines[0], result.stderr
    if only:
        assert result.output.strip() == lines[0], result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def one_line_message(error: pytest.ExceptionInfo[BaseException]) -> str:
    """The message of an exception caught by ``pytest.raises``, which must be one non-empty line."""
    message = str(error.value)
    assert message and "\n" not in message, message
    return message


def subprocess_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 1) -> str:
    """The same check for a real subprocess (text mode)."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    # (an interactive loop prints its "> " prompt on stderr before the error)
    lines = [line.removeprefix("> ") for line in proc.stderr.strip().splitlines()]
    lines = [line for line in lines if line.startswith("Error: ")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def digest(path: Path) -> str:
    """sha256 of a file, or of every file under a directory (names included)."""
    h = hashlib.sha256()
    if path.is_dir():
        for item in sorted(path.rglob("*")):
            if item.is_file():
                h.update(str(item.relative_to(path)).encode())
                h.update(item.read_bytes())
    else:
        h.update(path.read_bytes())
    return h.hexdigest()


def gptkit(*args: str, cwd: Path, env: dict[str, str] | None = None, **kwargs):
    """``python -m gptkit ARGS`` as a real process (what a user's shell runs)."""
    return subprocess.Popen(
        [sys.executable, "-m", "gptkit", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        **kwargs,
    )
