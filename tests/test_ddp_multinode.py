"""DDP across two machines, played on this one: two torchrun launchers with ``--nnodes 2`` meet
through a c10d rendezvous on loopback and train one run with gloo, one process per "node".

Each node has its own directory (its working directory, with its own copy of the corpus and its
own token cache), as machines without shared storage would: node 1 must then never need the run
directory, which proves more than a shared ``--out`` would (there, rank 0 alone writing is the
same files as on one machine, which tests/test_ddp.py covers). docs/SCALING.md describes both.

c10d gives global rank 0 to the node whose ``--local-addr`` sorts first (then the launcher's pid):
node 0 says 127.0.0.1 and node 1 127.0.0.2 (an address only used to order them: node 1 never
hosts anything), so node 0 is rank 0 in every launch, as the same machines would be on a cluster.

Checked: the final weights are a single process's with the same global batch; only node 0 has a
run directory (checkpoints, metrics); a Ctrl-C in node 1's terminal alone (SIGINT to its launcher
and its worker, as a terminal sends it) stops both nodes after one step with a checkpoint on
node 0, and ``--resume`` on both ends bitwise where the uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40  # long enough that a Ctrl-C after the first steps lands well before the end
EVAL_INTERVAL = 16
LAUNCH_TIMEOUT_S = 240  # per two-node launch (about 20 s on a busy 2-core machine)
TRAIN = [
    *("--preset", "tiny", "--block-size", "32", "--dropout", "0", "--vocab-size", "300"),
    *("--batch-size", "8", "--grad-accum", "2"),  # 4 sequences per rank; no_sync on micro-step 1
    *("--max-steps", str(STEPS), "--eval-interval", str(EVAL_INTERVAL), "--device", "cpu"),
    *("--data", "corpus.txt", "--config", "fast.json", "--out", "run"),
]
# fp32: weights compared with a single process; auto may pick bf16 on this CPU.
# AdamW: Muon's bf16 Newton-Schulz magnifies the all-reduce's rounding beyond the 1e-4 bound.
FAST = {
    "eval_windows": 4,
    "sample_tokens": 4,
    "log_interval": 1,
    "threads": 1,
    "precision": "fp32",
    "optimizer": "adamw",
}

NO_GLOO = not torch.distributed.is_available() or not torch.distributed.is_gloo_available()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(
    node_dir: Path, node: int, port: int, run_id: str, *extra: str
) -> subprocess.Popen[bytes]:
    """One node's ``torchrun ... -m gptkit train``, in its own session (so its process group,
    launcher and worker, can be signalled and killed as one)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    command += ["--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    command += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id]
    command += ["--local-addr", f"127.0.0.{node + 1}", "-m", "gptkit", "train", *TRAIN, *extra]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "GPTKIT_CACHE_DIR": str(node_dir / "cache"),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    with open(node_dir / f"{run_id}.out", "w") as out, open(node_dir / f"{run_id}.err", "w") as err:
        return subprocess.Popen(
            command, cwd=node_dir, env=env, stdout=out, stderr=err, start_new_session=True
        )


def _two_nodes(
    nodes: list[Path],
    name: str,
    *extra: str,
    while_running: Callable[[list[subprocess.Popen[bytes]]], None] | None = None,
) -> list[int]:
    """Launch both nodes, optionally act while they train, and return their exit codes; whatever
    happens, nothing outlives this call (the process groups are killed)."""
    port, run_id = _free_port(), f"{name}-{os.getpid()}"
    procs = [_launch(node_dir, i, port, run_id, *extra) for i, node_dir in enumerate(nodes)]
    try:
        if while_running is not None:
            while_running(procs)
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        codes = [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"two-node launch {name} did not finish: {_logs(nodes, run_id)}")
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return codes


def _logs(nodes: list[Path], run_id: str) -> str:
    return "\n".join(
        f"--- node {i} {kind}:\n{(node_dir / f'{run_id}.{kind}').read_text()[-3000:]}"
        for i, node_dir in enumerate(nodes)
        for kind in ("out", "err")
    )


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in _metrics(run)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from gpt_core.checkpoint import load_model, model_state_dict

    model, _ = load_model(run / "last")
    return model_state_dict(model)


def _nodes(root: Path, name: str, corpus: str) -> list[Path]:
    """Two machines' directories, each with the data and the config (no shared storage)."""
    nodes = [root / name / f"node{i}" for i in range(2)]
    for node_dir in nodes:
        node_dir.mkdir(parents=True)
        (node_dir / "corpus.txt").write_text(corpus, encoding="utf-8")
        (node_dir / "fast.json").write_text(json.dumps(FAST))
    return nodes


@pytest.mark.slow  # three two-node launches and a single-process run: about a minute
@pytest.mark.skipif(sys.platform != "linux", reason="loopback gloo is set up for Linux")
@pytest.mark.skipif(NO_GLOO, reason="this PyTorch build has no gloo backend")
def test_two_nodes_match_one_process_and_resume_after_ctrl_c(
    tmp_path: Path, shakespeare: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpt_core.checkpoint import load_training_state, model_state_dict, resolve_checkpoint
    from gpt_core.config import GPTConfig
    from gpt_core.train import TrainConfig, train

    corpus = shakespeare[:30_000]

    # 1. Straight through: both nodes exit 0; only node 0 wrote anything.
    straight = _nodes(tmp_path, "straight", corpus)
    codes = _two_nodes(straight, "straight")
    assert codes == [0, 0], _logs(straight, f"straight-{os.getpid()}")
    run = straight[0] / "run"
    names = {p.name for p in run.iterdir()}
    assert {"best", "last", "metrics.jsonl", f"step-{STEPS:06d}"} <= names, names
    written = names - {"best", "last", "metrics.jsonl", "loss.png"}
    assert all(name.startswith("step-") for name in written), names
    assert [row["step"] for row in _metrics(run)] == list(range(1, STEPS + 1))  # one writer
    assert not (straight[1] / "run").exists()  # rank 1 wrote (and read) no run directory
    assert (straight[1] / f"straight-{os.getpid()}.out").read_text() == ""  # nor printed
    for node_dir in straight:  # each machine tokenized the corpus into its own cache
        assert len(list((node_dir / "cache" / "tokens").glob("*.bin"))) == 1

    # 2. The same global batch in one process: the same weights and losses.
    model = GPTConfig.preset("tiny", block_size=32, dropout=0.0)
    (tmp_path / "corpus.txt").write_text(corpus, encoding="utf-8")
    config = TrainConfig(
        data=[str(tmp_path / "corpus.txt")],
        out_dir=str(tmp_path / "single"),
        vocab_size=300,
        batch_size=8,
        grad_accum=2,
        max_steps=STEPS,
        eval_interval=EVAL_INTERVAL,
        device="cpu",
        **FAST,  # type: ignore[arg-type]
    )
    monkeypatch.setenv("GPTKIT_CACHE_DIR", str(tmp_path / "cache"))
    single = model_state_dict(train(model, config).model)
    two_nodes = _weights(run)
    assert single.keys() == two_nodes.keys()
    # Float sums in another order, through 40 Adam steps: about 3e-5 apart at most.
    assert all(torch.allclose(single[k], two_nodes[k], atol=1e-4) for k in single)
    single_losses = [row["loss"] for row in _metrics(tmp_path / "single")]
    assert [row["loss"] for row in _metrics(run)] == pytest.approx(single_losses, rel=1e-5)

    # 3. Ctrl-C in node 1's terminal only (its launcher relays it to the worker, which also got
    # it straight from the terminal): every rank stops after the step, rank 0 saves on node 0.
    stopped = _nodes(tmp_path, "stopped", corpus)
    stopped_run = stopped[0] / "run"

    def ctrl_c_on_node_1(procs: list[subprocess.Popen[bytes]]) -> None:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        metrics = stopped_run / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert time.monotonic() < deadline and procs[0].poll() is None, "no training"
            time.sleep(0.02)
        os.killpg(procs[1].pid, signal.SIGINT)  # its own session: the group is the launcher's

    codes = _two_nodes(stopped, "stopped", while_running=ctrl_c_on_node_1)
    logs = _logs(stopped, f"stopped-{os.getpid()}")
    at = int(load_training_state(resolve_checkpoint(stopped_run / "last"))["step"])
    assert 2 <= at < STEPS, logs
    # torchrun reports an interrupted job as failed (with its own traceback): node 0's because
    # its worker exited 130, node 1's because it got the signal. No worker died of the relayed
    # second SIGINT (a KeyboardInterrupt), and rank 0 says where to resume.
    assert codes[0] != 0 and codes[1] != 0, logs
    assert "exitcode  : 130" in (stopped[0] / f"stopped-{os.getpid()}.err").read_text(), logs
    assert "KeyboardInterrupt" not in logs and "Interrupted.\n" not in logs, logs
    # the whole of node 0's stderr: torchrun's report after the line can outgrow _logs' tail
    node_0_err = (stopped[0] / f"stopped-{os.getpid()}.err").read_text()
    assert f"Interrupted at step {at}; checkpoint saved in run/last" in node_0_err, logs
    assert not (stopped[1] / "run").exists()

    # 4. --resume on both nodes: bitwise where the straight run ended.
    codes = _two_nodes(stopped, "resumed", "--resume")
    assert codes == [0, 0], _logs(stopped, f"resumed-{os.getpid()}")
    resumed = _weights(stopped_run)
    assert all(torch.equal(resumed[k], two_nodes[k]) for k in two_nodes)
    assert _losses(stopped_run) == _losses(run)  # bitwise too, step by step
    assert not (stopped[1] / "run").exists()


@pytest.mark.parametrize("under_torchrun", [True, False])
def test_torchruns_relayed_ctrl_c_is_the_same_ctrl_c(
    under_torchrun: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun a worker gets a terminal's Ctrl-C twice (from the terminal, and relayed by
    its launcher): the second, soon after, must not stop it at once. Alone, it does. (In the
    test above the two often arrive before Python runs the handler, and count once anyway.)"""
    from gpt_core.run_lock import StopOnSigint

    if under_torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with StopOnSigint() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested
        if under_torchrun:
            signal.raise_signal(signal.SIGINT)  # the relay: still just a request to stop
        else:
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
