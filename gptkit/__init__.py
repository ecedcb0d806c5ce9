"""gptkit: train a GPT from scratch, export it to ONNX with a KV cache, run it without PyTorch."""

__version__ = "0.1.0"
