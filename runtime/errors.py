"""The one exception family gptkit raises.

Every layer raises a subclass of :class:`GptkitError` for problems a user can fix (bad input, a
missing file, a missing extra). The CLI turns these into a one-line ``Error: ...`` and a non-zero
exit; embedding applications catch ``GptkitError``. Messages name the problem and the fix.
"""

from __future__ import annotations


class GptkitError(Exception):
    """Base class of every error gptkit raises on purpose."""


class ConfigError(GptkitError, ValueError):
    """An invalid configuration or argument value (sizes, presets, sampling options)."""


class TokenizerError(GptkitError, ValueError):
    """A tokenizer that cannot be built, loaded or used."""


class DataError(GptkitError, ValueError):
    """A training corpus that cannot be read or is unusable."""


class CheckpointError(GptkitError):
    """A missing, corrupt or mismatched checkpoint."""


class ModelFileError(GptkitError):
    """An exported model file that is missing, unreadable or not a gptkit export."""


class ExportError(GptkitError):
    """An export that could not be completed."""


class ParityError(ExportError):
    """ONNX Runtime and PyTorch disagree beyond tolerance; ``report`` says where and by how much.

    ``report`` is the exporter's ``export.parity.ParityReport`` (typed loosely: this module sits
    below the exporter and does not import it).
    """

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class GenerationError(GptkitError, ValueError):
    """A generation request that cannot be served (for example, past the context limit)."""


class ContextLengthError(GenerationError):
    """A prompt plus the tokens asked for do not fit the model's context; the numbers are kept."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context: int) -> None:
        super().__init__(
            f"the prompt is {prompt_tokens} tokens + max_tokens {max_new_tokens} = "
            f"{prompt_tokens + max_new_tokens}, over the model's context of {context} tokens; "
            "shorten the prompt or lower max_tokens"
        )
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context = context


class QueueFullError(GptkitError):
    """The engine already holds as many waiting requests as it may; retry later."""


class EngineClosedError(GptkitError):
    """The engine is shutting down and takes no new requests."""


class MissingDependencyError(GptkitError, ImportError):
    """An optional dependency is not installed; the message names the install command."""


def require(module: str, *, extra: str | None, purpose: str) -> None:
    """Raise MissingDependencyError naming the pip command when ``module`` is not importable.

    ``extra=None`` means a base dependency. Checked with ``find_spec`` so nothing is imported.
    """
    import importlib.util

    if importlib.util.find_spec(module) is None:
        target = f"'gptkit[{extra}]'" if extra else "gptkit"
        raise MissingDependencyError(
            f"{purpose} needs {module}, which is not installed; install it with: pip install {target}"
        )
