"""gptkit: train a GPT from scratch, export it to ONNX with a KV cache, run it without PyTorch."""

from runtime.version import VERSION as __version__

__all__ = ["__version__"]
