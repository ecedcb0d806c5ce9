"""Training throughput: gptkit's GPT next to transformers' GPT2LMHeadModel, same shape and batch.

    .venv/bin/python benchmarks/train_throughput.py                  # small-cpu and gpt2 shapes
    .venv/bin/python benchmarks/train_throughput.py --shapes small-cpu --steps 5

One training step = forward with loss, backward, gradient clipping, AdamW step, on the same
random token batch, on the CPU with 2 threads (override with --threads), in fp32 or, with
``--precision bf16``, under bf16 autocast for both models (what `gptkit train` picks on CPUs with
native bf16). The two models
alternate step by step, so a neighbour's load hits both alike; the table shows the median step.
A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpt_core import schedule
from gpt_core.config import GPTConfig
from gpt_core.model import GPT

# (batch, sequence length) per shape: small-cpu as `gptkit train` runs it, gpt2 one full context.
WORKLOADS = {"small-cpu": (32, 128), "gpt2": (1, 1024), "tiny": (8, 64)}


def hf_model(config: GPTConfig) -> torch.nn.Module:
    import transformers

    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=config.vocab_size - 1,
        eos_token_id=config.vocab_size - 1,
        # the fused attention kernel, as ours uses; a PretrainedConfig keyword that transformers'
        # typed signature leaves out (older releases take it through **kwargs)
        attn_implementation="sdpa",  # type: ignore[call-arg,unused-ignore]
    )
    return transformers.GPT2LMHeadModel(hf_config)


def make_step(model: torch.nn.Module, x: torch.Tensor, hf: bool, precision: str):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    model.train()

    def step() -> float:
        t0 = time.perf_counter()
        with schedule.autocast(precision, torch.device("cpu")):
            if hf:
                loss = model(input_ids=x, labels=x).loss
            else:
                loss = model(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def measure(shape: str, steps: int, precision: str) -> dict[str, float]:
    batch, seq = WORKLOADS[shape]
    config = GPTConfig.preset(shape)
    config = config.replace(block_size=max(config.block_size, seq + 1))
    torch.manual_seed(0)
    # seq + 1 tokens: ours predicts x[1:] from x[:-1]; HF shifts internally, so both see `seq`
    x = torch.randint(0, config.vocab_size, (batch, seq + 1))
    ours = make_step(GPT(config), x, hf=False, precision=precision)
    theirs = make_step(hf_model(config), x[:, :seq], hf=True, precision=precision)
    ours(), theirs()  # warm-up: allocator, optimizer state
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for _ in range(steps):
        times["ours"].append(ours())
        times["hf"].append(theirs())
    tokens = batch * seq
    return {name: tokens / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["small-cpu", "gpt2"], choices=WORKLOADS)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{args.threads} threads, {args.precision}, median of {args.steps} steps"
    )
    print("| shape | batch x seq | gptkit tokens/s | HF tokens/s | ours/HF |")
    print("|---|---|---|---|---|")
    for shape in args.shapes:
        batch, seq = WORKLOADS[shape]
        result = measure(shape, args.steps, args.precision)
        print(
            f"| {shape} | {batch} x {seq} | {result['ours']:,.0f} | {result['hf']:,.0f} | "
            f"{result['ours'] / result['hf']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
