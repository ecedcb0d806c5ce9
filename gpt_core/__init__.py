"""gptkit's PyTorch layer: the GPT model, its config, data, training and checkpoints.

    from gpt_core import GPT, GPTConfig, TrainConfig
    from gpt_core.train import train        # (gpt_core.train is also the module's name)

    model = GPT(GPTConfig.preset("tiny"))
    result = train(GPTConfig.preset("small-cpu"), TrainConfig(data=["my.txt"], max_steps=200))

Names load lazily, so the torch-free modules (``gpt_core.config``, ``gpt_core.train_config``)
import without PyTorch, as the CLI's ``--help`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime.lazy import lazy_attributes

if TYPE_CHECKING:  # pragma: no cover
    from gpt_core.checkpoint import load_model, save_model
    from gpt_core.config import GPTConfig
    from gpt_core.dataset import CustomDataset
    from gpt_core.model import GPT
    from gpt_core.train_config import TrainConfig
    from gpt_core.train_events import TrainResult

__all__ = [
    "GPT",
    "CustomDataset",
    "GPTConfig",
    "TrainConfig",
    "TrainResult",
    "load_model",
    "save_model",
]

_LAZY = {
    "GPT": "gpt_core.model",
    "GPTConfig": "gpt_core.config",
    "CustomDataset": "gpt_core.dataset",
    "TrainConfig": "gpt_core.train_config",
    "TrainResult": "gpt_core.train_events",
    "load_model": "gpt_core.checkpoint",
    "save_model": "gpt_core.checkpoint",
}

__getattr__ = lazy_attributes(__name__, _LAZY)
