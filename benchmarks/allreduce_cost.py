"""Data-parallel training cost: tokens/s per process, and what the gradient all-reduce adds.

    .venv/bin/python benchmarks/allreduce_cost.py                      # tiny and small-cpu
    .venv/bin/python benchmarks/allreduce_cost.py --presets tiny --steps 10

Measured, on this machine, for each preset at ``gptkit train``'s global batch (32 sequences of
the preset's block size), fp32 on the CPU:

- 1 process with the whole batch, on 1 thread and on every core;
- 1 process with half the batch on 1 thread: one process's compute in a two-process run;
- 2 processes under DDP over gloo on loopback, half the batch each, the cores split between them
  (what ``torchrun --nproc-per-node 2 -m gptkit train`` does); the all-reduce of a gradient-sized
  buffer over that loopback is timed too.

One step = forward with loss, backward (with DDP's all-reduce), gradient clipping, AdamW step,
on random tokens; the median step is shown. Computed, not measured: the time a ring all-reduce
of the fp32 gradients (parameters x 4 bytes; each process sends and receives 2(N-1)/N of that
per step) takes over 10 and 100 Gbit/s links between N=2 machines, at the link's full rate and
without latency, against the measured compute step of one machine's half batch. DDP overlaps
the all-reduce with the backward pass, so that is the most it adds. Asserts nothing.

On a machine shared with other work, more threads than free cores is slower, not faster (the
threads wait on each other): compare the 1-thread rows.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as td
import torch.multiprocessing as mp

from gpt_core.config import GPTConfig
from gpt_core.model import GPT

GLOBAL_BATCH = 32  # TrainConfig's default batch_size
LINKS_GBIT = (10, 100)


def _steps(preset: str, batch: int, steps: int, ddp: bool) -> list[float]:
    config = GPTConfig.preset(preset, dropout=0.0)
    torch.manual_seed(0)
    model: torch.nn.Module = GPT(config)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    x = torch.randint(0, config.vocab_size, (batch, config.block_size + 1))
    times = []
    for _ in range(steps + 2):  # two warm-up steps: allocator, optimizer state, DDP buckets
        t0 = time.perf_counter()
        loss = model(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times[2:]


def _allreduce(numel: int, reps: int) -> list[float]:
    buffer = torch.ones(numel)
    td.all_reduce(buffer)  # warm-up
    times = []
    for _ in range(reps):
        td.barrier()
        t0 = time.perf_counter()
        td.all_reduce(buffer)
        times.append(time.perf_counter() - t0)
    return times


def _worker(rank: int, world: int, port: int, preset: str, steps: int, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    step_times = _steps(preset, GLOBAL_BATCH // world, steps, ddp=True)
    numel = GPT(GPTConfig.preset(preset)).num_params()
    reduce_times = _allreduce(numel, steps)
    if rank == 0:
        out.put((statistics.median(step_times), statistics.median(reduce_times)))
    td.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _single(preset: str, batch: int, steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    return statistics.median(_steps(preset, batch, steps, ddp=False))


def measure(preset: str, steps: int) -> dict[str, Any]:
    config = GPTConfig.preset(preset)
    cores = os.cpu_count() or 1
    full_1 = _single(preset, GLOBAL_BATCH, steps, 1)
    full = _single(preset, GLOBAL_BATCH, steps, cores)
    half = _single(preset, GLOBAL_BATCH // 2, steps, 1)
    queue = mp.get_context("spawn").SimpleQueue()
    spawn_args = (2, _free_port(), preset, steps, queue)
    mp.spawn(_worker, args=spawn_args, nprocs=2, join=True)  # type: ignore[no-untyped-call]
    ddp_step, loopback = queue.get()
    params = GPT(config).num_params()
    return {
        "preset": preset,
        "params": params,
        "tokens": config.block_size,
        "full_1": full_1,
        "full": full,
        "half": half,
        "ddp": ddp_step,
        "loopback": loopback,
    }


def report(rows: list[dict[str, Any]]) -> str:
    cores = os.cpu_count() or 1
    lines = [
        f"Measured ({cores} cores; fp32; global batch {GLOBAL_BATCH}; median step):",
        "",
        "| preset | params | run | batch per process | step ms | tokens/s per process "
        "| tokens/s total |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        runs = [
            ("1 process, 1 thread", GLOBAL_BATCH, r["full_1"], 1),
            (f"1 process, {cores} threads", GLOBAL_BATCH, r["full"], 1),
            ("1 process, 1 thread", GLOBAL_BATCH // 2, r["half"], 1),
            (
                f"2 processes (DDP, gloo), {max(1, cores // 2)} thread each",
                GLOBAL_BATCH // 2,
                r["ddp"],
                2,
            ),
        ]
        for name, batch, step, procs in runs:
            per = batch * r["tokens"] / step
            lines.append(
                f"| {r['preset']} | {r['params'] / 1e6:.2f}M | {name} | {batch} | "
                f"{step * 1e3:.1f} | {per:,.0f} | {per * procs:,.0f} |"
            )
    lines += [
        "",
        "All-reduce of the gradients (fp32) per step between 2 processes: measured on loopback "
        "(gloo), computed for links at full rate (2 x (N-1)/N x bytes, N=2), against the "
        f"measured compute step of half the batch ({GLOBAL_BATCH // 2} sequences, 1 thread):",
        "",
        "| preset | gradient MB | loopback ms (measured) | "
        + " | ".join(f"{g} Gbit/s ms (computed)" for g in LINKS_GBIT)
        + " | compute step ms (measured) | "
        + " | ".join(f"added at {g} Gbit/s" for g in LINKS_GBIT)
        + " |",
        "|---|---:|---:|" + "---:|" * len(LINKS_GBIT) + "---:|" + "---:|" * len(LINKS_GBIT),
    ]
    for r in rows:
        nbytes = r["params"] * 4
        moved = 2 * (2 - 1) / 2 * nbytes
        link_s = [moved * 8 / (g * 1e9) for g in LINKS_GBIT]
        lines.append(
            f"| {r['preset']} | {nbytes / 1e6:.2f} | {r['loopback'] * 1e3:.2f} | "
            + " | ".join(f"{t * 1e3:.2f}" for t in link_s)
            + f" | {r['half'] * 1e3:.1f} | "
            + " | ".join(f"{t / r['half']:.1%}" for t in link_s)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small-cpu"])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(report([measure(preset, args.steps) for preset in args.presets]))


if __name__ == "__main__":
    main()
