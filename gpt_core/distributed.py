"""Data-parallel training under ``torchrun`` (DDP), or a no-op when run as one process.

``torchrun --nproc-per-node N -m gptkit train ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
:meth:`Distributed.from_env` reads them. Every rank builds the same model from the same seed,
takes its own slice of each global batch, and DDP averages the gradients, so N processes train
the same model one process would with the same global batch. Rank 0 alone writes and reports.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

import torch

from runtime.errors import ConfigError

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel


class Distributed:
    """The process group this run belongs to (world size 1 when not launched by torchrun)."""

    def __init__(self, rank: int = 0, local_rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        return cls(td.get_rank(), local_rank, world)

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ConfigError(
                f"batch size {batch_size} does not split over {self.world_size} processes; "
                f"use a multiple of {self.world_size}"
            )

    def shard(self, items):
        """This rank's share of a micro-batch (every world_size-th item)."""
        return items[self.rank :: self.world_size]

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    @contextlib.contextmanager
    def sync_gradients(self, model: torch.nn.Module, sync: bool) -> Iterator[None]:
        """Skip DDP's gradient all-reduce unless ``sync`` (the last micro-step of a batch)."""
        if self.enabled and not sync:
            ddp = cast("DistributedDataParallel", model)  # enabled: wrap() made it one
            with ddp.no_sync():
                yield
        else:
            yield

    def mean(self, value: float) -> float:
        """The mean of ``value`` over all ranks (for reporting the global loss)."""
        if not self.enabled:
            return value
        import torch.distributed as td

        tensor = torch.tensor([value], dtype=torch.float64)
        if td.get_backend() == "nccl":
            tensor = tensor.cuda()
        td.all_reduce(tensor)
        return float(tensor.item()) / self.world_size

    def broadcast_flag(self, flag: bool) -> bool:
        """True on every rank when rank 0 says so (used to stop all ranks together)."""
        if not self.enabled:
            return flag
        import torch.distributed as td

        tensor = torch.tensor([int(flag)])
        if td.get_backend() == "nccl":
            tensor = tensor.cuda()
        td.broadcast(tensor, src=0)
        return bool(tensor.item())

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as td

            td.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()
