"""gptkit's runtime: run an exported gptkit .onnx file with numpy, onnxruntime and tiktoken only.

Public API:

>>> import runtime
>>> model = runtime.load("model.onnx")  # weights, config and tokenizer from one file
>>> text = model.generate("ROMEO:", max_new_tokens=50, seed=0)  # a str
>>> texts = model.generate(["ROMEO:", "JULIET:"], temperature=0)  # a batch: a list of str
>>> result = model.complete("ROMEO:", logprobs=True)  # a GenerationResult: ids, finish reason, ...
>>> pieces = list(model.stream("ROMEO:"))  # the text as it is generated
>>> perplexity = model.score("To be, or not to be").perplexity

Options are the fields of the frozen ``SamplingConfig`` (pass one, or keywords). Every problem a
caller can fix raises a one-line ``GptkitError``. One ``Model`` serves many threads at once.

This package never imports PyTorch. Names load lazily, so importing ``runtime.errors`` (as the CLI
does to print errors) does not import onnxruntime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime.errors import GptkitError
from runtime.lazy import lazy_attributes
from runtime.version import VERSION as __version__

if TYPE_CHECKING:  # pragma: no cover
    from runtime.model import GenerationResult, Model, ScoreResult, load
    from runtime.sampling import SamplingConfig
    from runtime.tokenizer import Tokenizer

__all__ = [
    "GenerationResult",
    "GptkitError",
    "Model",
    "SamplingConfig",
    "ScoreResult",
    "Tokenizer",
    "__version__",
    "load",
]

_LAZY = {
    "load": "runtime.model",
    "Model": "runtime.model",
    "GenerationResult": "runtime.model",
    "ScoreResult": "runtime.model",
    "SamplingConfig": "runtime.sampling",
    "Tokenizer": "runtime.tokenizer",
}

__getattr__ = lazy_attributes(__name__, _LAZY)
