"""DDP under torchrun on CPU (gloo, 2 processes): identical ranks, and the single-process result.

The test launches this same file with ``torchrun``; run as a script it is the worker.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS = 6


def run_config(corpus: Path, out: Path):
    from gpt_core.config import GPTConfig
    from gpt_core.train import TrainConfig

    # No dropout: the ranks' masks cannot match a single process's, the gradients can.
    model = GPTConfig.preset("tiny", block_size=32, dropout=0.0)
    train = TrainConfig(
        data=[str(corpus)],
        out_dir=str(out),
        vocab_size=300,
        batch_size=8,  # the global micro-batch: 4 sequences per rank
        grad_accum=2,  # exercises no_sync on the first micro-step
        max_steps=STEPS,
        eval_interval=3,
        eval_windows=4,
        sample_tokens=4,
        log_interval=1,
        threads=1,
        precision="fp32",  # gradients compared across ranks; auto may pick bf16 on this CPU
        optimizer="adamw",  # Muon's bf16 Newton-Schulz magnifies the all-reduce's rounding
    )
    return model, train


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


@pytest.mark.slow  # torchrun: two worker processes, plus a single-process run
def test_two_processes_match_one(tmp_path: Path, shakespeare: str) -> None:
    pytest.importorskip("torch.distributed")
    if not torch.distributed.is_gloo_available():
        pytest.skip("this PyTorch build has no gloo backend")
    from safetensors.torch import load_file

    from gpt_core.checkpoint import model_state_dict
    from gpt_core.train import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare[:30_000], encoding="utf-8")
    env = {**os.environ, "GPTKIT_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += [__file__, str(corpus), str(tmp_path / "ddp")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == ""  # the library never prints, on any rank
    rank0 = load_file(tmp_path / "ddp" / "rank0.safetensors")
    rank1 = load_file(tmp_path / "ddp" / "rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # only rank 0 wrote checkpoints
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "best",
        "last",
        *(["loss.png"] if importlib.util.find_spec("matplotlib") else []),
        "metrics.jsonl",
        "rank0.safetensors",
        "rank1.safetensors",
        f"step-{STEPS:06d}",
    ]

    os.environ["GPTKIT_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        single = train(*run_config(corpus, tmp_path / "single"))
    finally:
        del os.environ["GPTKIT_CACHE_DIR"]
    reference = model_state_dict(single.model)
    assert all(torch.allclose(reference[k], rank0[k], atol=1e-5) for k in reference)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)


def _worker(corpus: str, out: str) -> None:
    from safetensors.torch import save_file

    from gpt_core.checkpoint import model_state_dict
    from gpt_core.train import train

    rank = int(os.environ["RANK"])
    result = train(*run_config(Path(corpus), Path(out)))
    state = {k: v.contiguous() for k, v in model_state_dict(result.model).items()}
    save_file(state, Path(out) / f"rank{rank}.safetensors")


if __name__ == "__main__":
    _worker(*sys.argv[1:3])


def test_rank_zero_errors_reach_the_others_as_their_kind_and_message() -> None:
    """What rank 0 raises is rebuilt from its text (never the object itself) for the other ranks."""
    from gpt_core.distributed import _portable
    from runtime.errors import CheckpointError, ContextLengthError, GptkitError

    missing = _portable(CheckpointError("no checkpoint in runs/x; train first"))
    assert (
        type(missing) is CheckpointError and str(missing) == "no checkpoint in runs/x; train first"
    )
    odd = ContextLengthError(10, 5, 12)  # its constructor wants numbers: sent as its base kind
    rebuilt = _portable(odd)
    assert type(rebuilt) is GptkitError and str(rebuilt) == str(odd)
    assert type(_portable(KeyError("k"))) is RuntimeError
