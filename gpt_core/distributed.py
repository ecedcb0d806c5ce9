"""Data-parallel training under ``torchrun`` (DDP), or a no-op when run as one process.

``torchrun --nproc-per-node N -m gptkit train ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
:meth:`Distributed.from_env` reads them. Every rank builds the same model from the same seed,
takes its own slice of each global batch, and DDP averages the gradients, so N processes train
the same model one process would with the same global batch.

Across machines (``torchrun --nnodes M``, docs/SCALING.md) the same holds with ``RANK`` the
global rank: global rank 0 alone reads a resumed run's checkpoint (:meth:`from_main` hands it
to the others), writes and reports, so the other nodes need the data but not the run directory.
``local_rank`` picks a GPU and ``local_world_size`` splits a machine's cores; nothing else
depends on which node a process runs on, except the token cache (:meth:`main_first`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch

from runtime.errors import ConfigError, GptkitError

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")


class Distributed:
    """The process group this run belongs to (world size 1 when not launched by torchrun)."""

    def __init__(
        self,
        rank: int = 0,
        local_rank: int = 0,
        world_size: int = 1,
        local_world_size: int | None = None,
    ) -> None:
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        # Processes on this machine (torchrun's LOCAL_WORLD_SIZE): world_size on one machine.
        self.local_world_size = world_size if local_world_size is None else local_world_size

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
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        return cls(td.get_rank(), local_rank, world, local_world)

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
        """True on every rank when rank 0 says so."""
        if not self.enabled:
            return flag
        import torch.distributed as td

        tensor = torch.tensor([int(flag)])
        if td.get_backend() == "nccl":
            tensor = tensor.cuda()
        td.broadcast(tensor, src=0)
        return bool(tensor.item())

    def any_flag(self, flag: bool) -> bool:
        """True on every rank when any rank says so (used to stop all ranks together: a signal
        may reach one node's processes and not the others')."""
        if not self.enabled:
            return flag
        import torch.distributed as td

        tensor = torch.tensor([int(flag)])
        if td.get_backend() == "nccl":
            tensor = tensor.cuda()
        td.all_reduce(tensor, op=td.ReduceOp.MAX)
        return bool(tensor.item())

    def from_main(self, make: Callable[[], T]) -> T:
        """``make()`` run on rank 0 alone, its result (picklable) handed to every rank.

        For what only rank 0 can or should read (a resumed run's checkpoint, which need not be
        on the other nodes) or compute (a BPE trained on the data). An exception on rank 0 is
        raised on every rank, so a one-line error stays one line everywhere.
        """
        if not self.enabled:
            return make()
        import torch.distributed as td

        box: list[Any] = [None]
        error: Exception | None = None
        if self.is_main:
            try:
                box[0] = (True, make())
            except Exception as e:
                error = e
                box[0] = (False, _portable(e))
        td.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        ok, value = box[0]
        if not ok:
            raise value
        return cast("T", value)

    def main_first(self, make: Callable[[], T]) -> T:
        """``make()`` on every rank, in turns: rank 0, then the first process of each other
        node, then the rest; for work that leaves a file the next turn finds (the token cache).

        With the cache on shared storage it is built once (by rank 0); on each machine's own
        disk, once per machine; never by two processes of a machine at once. An exception in
        rank 0's turn is raised on every rank.
        """
        if not self.enabled:
            return make()
        turn = 0 if self.is_main else 1 if self.local_rank == 0 else 2
        result: list[T] = []
        self.from_main(lambda: result.append(make()))  # rank 0's turn; its error is everyone's
        if turn == 1:
            result.append(make())
        self.barrier()
        if turn == 2:
            result.append(make())
        return result[0]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as td

            td.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()


def _portable(error: Exception) -> Exception:
    """An error of the same kind and message, rebuilt from its text to reach the other ranks.

    Rebuilding (instead of sending ``error`` itself) keeps whatever else it holds (a report, a
    traceback's objects) off the wire; a kind that takes more than a message becomes its base.
    """
    base = GptkitError if isinstance(error, GptkitError) else RuntimeError
    try:
        return type(error)(str(error)) if isinstance(error, GptkitError) else base(str(error))
    except Exception:  # a constructor that wants more than the message
        return base(str(error))
