"""Reliability matrix, training: bad configs and flags, bad resumes, and faults (SIGKILL while a
checkpoint is written, SIGINT while `gptkit train` runs).

Every bad request is one ``Error: ...`` line with exit 1 (2 for usage errors) and leaves an existing
run directory exactly as it was; a killed or interrupted run leaves a checkpoint that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from reliability_helpers import ROOT, digest, gptkit, one_line_error

from gpt_core.checkpoint import load_model, load_training_state, resolve_checkpoint
from gpt_core.config import GPTConfig
from gpt_core.train import TrainConfig, train
from gptkit.cli import cli

TINY = ["--preset", "tiny", "--block-size", "32", "--batch-size", "4", "--vocab-size", "300"]
FAST: dict[str, Any] = {"eval_windows": 4, "sample_tokens": 4, "log_interval": 1}  # cheap evals


pytestmark = pytest.mark.usefixtures("isolated_dirs")


@pytest.fixture
def fast_config(tmp_path: Path) -> Path:
    path = tmp_path / "fast.json"
    path.write_text(json.dumps(FAST))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shakespeare: str) -> Path:
    """A 2-step tiny run (block 32) with its resumable last/ checkpoint."""
    work = tmp_path_factory.mktemp("finished")
    (work / "corpus.txt").write_text(shakespeare[:20_000], encoding="utf-8")
    config = TrainConfig(
        data=[str(work / "corpus.txt")],
        out_dir=str(work / "run"),
        vocab_size=300,
        batch_size=4,
        max_steps=2,
        eval_interval=2,
        device="cpu",
        **FAST,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPTKIT_CACHE_DIR", str(work / "cache"))
        train(GPTConfig.preset("tiny", block_size=32), config)
    return work / "run"


@pytest.fixture
def run_copy(tmp_path: Path, finished_run: Path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run", symlinks=True))


@pytest.fixture
def gptkit_train(runner: CliRunner) -> Callable[..., Result]:
    def invoke(*args: str) -> Result:
        return runner.invoke(cli, ["train", *args])

    return invoke


def assert_run_intact(run: Path, before: str) -> None:
    """Nothing in the run changed, and its checkpoint still loads."""
    assert digest(run) == before
    model, tokenizer = load_model(run)
    assert model.config.block_size == 32 and tokenizer.n_vocab <= 300


# ---- model config: `gptkit train --data corpus.txt ARGS` ----------------------------------------

CONFIG_CASES = [
    ("unknown-preset", ["--preset", "huge"], ["unknown preset 'huge'", "tiny"]),
    ("n-embd-not-divisible", ["--n-embd", "65", "--n-head", "2"], ["n_embd (65) must be divisible by n_head (2)"]),
    ("n-layer-zero", ["--n-layer", "0"], ["n_layer must be positive, got 0"]),
    ("n-head-negative", ["--n-head", "-2"], ["n_head must be positive, got -2"]),
    ("n-embd-zero", ["--n-embd", "0"], ["n_embd must be positive"]),
    ("block-size-zero", ["--block-size", "0"], ["block_size must be positive, got 0"]),
    ("block-size-negative", ["--block-size", "-32"], ["block_size must be positive"]),
    ("dropout-one", ["--dropout", "1.0"], ["dropout must be in [0, 1)"]),
    ("batch-size-zero", ["--batch-size", "0"], ["--batch-size must be positive, got 0"]),
    ("grad-accum-negative", ["--grad-accum", "-1"], ["--grad-accum must be positive"]),
    ("max-steps-zero", ["--max-steps", "0"], ["--max-steps must be positive"]),
    ("eval-interval-zero", ["--eval-interval", "0"], ["--eval-interval must be positive"]),
    ("vocab-size-zero", ["--vocab-size", "0"], ["--vocab-size must be positive"]),
    ("lr-zero", ["--lr", "0"], ["--lr must be positive"]),
    ("epochs-negative", ["--epochs", "-1"], ["--epochs must be positive"]),
    ("device-tpu", ["--device", "tpu"], ["unknown device 'tpu'"]),
    ("tokenizer-missing-path", ["--tokenizer", "no/such/tokenizer.json"], ["unknown tokenizer"]),
    ("init-from-missing", ["--init-from", "no/such/run"], ["no checkpoint at no/such/run"]),
    # these once ended in tracebacks
    ("seed-negative", ["--seed", "-1"], ["seed"]),
    ("lr-nan", ["--lr", "nan"], ["--lr"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "needles"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES]
)
def test_bad_flag_is_one_line_error(tmp_path, corpus, args, needles, gptkit_train):
    result = gptkit_train("--data", str(corpus), *TINY, "--max-steps", "2", "--out", "run", *args)
    one_line_error(result, *needles)
    assert not (tmp_path / "run" / "last").exists()


def test_usage_errors_exit_2(corpus, gptkit_train):
    one_line_error(gptkit_train("--data", str(corpus), "--n-layer", "two"), "two", code=2)


def test_resume_with_init_from_is_the_library_error(corpus: Path, gptkit_train) -> None:
    """train() refuses the pair; the CLI shows its one line (exit 1), with no check of its own."""
    result = gptkit_train("--data", str(corpus), "--resume", "--init-from", "x")
    one_line_error(result, "--resume and --init-from cannot be combined")


def test_out_is_an_existing_file(tmp_path, corpus, gptkit_train):
    """`gptkit train --out notes.txt` where notes.txt is a file: one line naming the path (it once
    ended in a FileExistsError traceback after tokenizing), and the file untouched."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    result = gptkit_train("--data", str(corpus), *TINY, "--max-steps", "1", "--out", str(notes))
    one_line_error(result, "notes.txt")
    assert notes.read_text() == "mine"


# ---- config files: `gptkit train --config FILE` -------------------------------------------------

CONFIG_FILE_CASES = [
    ("unknown-key", {"n_layers": 2}, ["unknown key(s): n_layers"]),
    ("unknown-nested-key", {"model": {"width": 64}}, ["unknown key(s): width"]),
    ("model-field-wrong-type", {"model": {"n_layer": "2"}}, ["n_layer must be an integer"]),
    ("bias-wrong-type", {"bias": "yes"}, ["bias must be true or false"]),
    ("not-an-object", [1, 2], ["must hold a JSON object"]),
    ("not-json", "{n_layer: 2", ["is not valid JSON"]),
    # these once ended in tracebacks
    ("train-field-wrong-type", {"train": {"lr": "fast"}}, ["lr"]),
    ("warmup-wrong-type", {"warmup_steps": "x"}, ["warmup_steps"]),
    ("model-section-not-an-object", {"model": [1]}, ["model"]),
]


@pytest.mark.parametrize(
    ("content", "needles"),
    [c[1:] for c in CONFIG_FILE_CASES],
    ids=[c[0] for c in CONFIG_FILE_CASES],
)
def test_bad_config_file(tmp_path, corpus, content, needles, gptkit_train):
    path = tmp_path / "run.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    result = gptkit_train("--data", str(corpus), *TINY, "--config", str(path), "--out", "run")
    one_line_error(result, *needles)
    assert not (tmp_path / "run" / "last").exists()


def test_missing_config_file(corpus, gptkit_train):
    one_line_error(
        gptkit_train("--data", str(corpus), "--config", "nope.json"), "nope.json not found"
    )


def test_config_file_may_name_the_data(tmp_path, corpus, gptkit_train):
    """`data` is a documented training field: a config file may hold it, and the run trains on it
    (it once crashed with "TrainConfig() got multiple values for keyword argument 'data'", as
    did out_dir, precision, device and compile)."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"data": [str(corpus)], "max_steps": 1, **FAST}))
    result = gptkit_train(*TINY, "--config", str(path), "--out", "run")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "last" / "config.json").read_text())["train"]["data"] == [
        str(corpus)
    ]


# ---- resuming ---------------------------------------------------------------------------------


def test_resume_without_a_run(tmp_path, gptkit_train):
    one_line_error(gptkit_train("--out", "nowhere", "--resume"), "nothing to resume in nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_resume_from_a_checkpoint_without_state(run_copy, gptkit_train):
    (resolve_checkpoint(run_copy / "last") / "state.pt").unlink()
    before = digest(run_copy)
    result = gptkit_train("--out", str(run_copy), "--resume")
    one_line_error(result, "has no training state (state.pt)", "--init-from")
    assert_run_intact(run_copy, before)


@pytest.mark.parametrize("kind", ["truncated", "malicious-pickle"])
def test_resume_from_a_bad_state_file(run_copy, tmp_path, kind, gptkit_train):
    """A state.pt that is cut short, or that would run code when unpickled: one line, nothing
    executed (weights_only=True), the checkpoint untouched and still loadable."""
    state = resolve_checkpoint(run_copy / "last") / "state.pt"
    marker = tmp_path / "pwned"
    if kind == "truncated":
        state.write_bytes(state.read_bytes()[:200])
    else:

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        torch.save({"step": Payload()}, state)
    before = digest(run_copy)
    result = gptkit_train("--out", str(run_copy), "--resume")
    one_line_error(result, "state.pt is corrupt or truncated")
    assert not marker.exists()
    assert_run_intact(run_copy, before)


def test_resume_with_a_larger_block_size(run_copy, gptkit_train):
    """`gptkit train --out RUN --resume --block-size 64` on a run trained with block_size 32: one
    line saying the run's block_size is 32 (a resumed run keeps its shape, and the library
    refuses the flag rather than ignoring it); the run untouched."""
    before = digest(run_copy)
    result = gptkit_train("--out", str(run_copy), "--resume", "--block-size", "64")
    one_line_error(result, "block_size", "32")
    assert_run_intact(run_copy, before)


# ---- faults -----------------------------------------------------------------------------------

KILLER = textwrap.dedent(
    """
    import os, shutil, signal, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from gpt_core.checkpoint import save_checkpoint
    from gpt_core.config import GPTConfig
    from gpt_core.model import GPT
    from runtime.tokenizer import Tokenizer

    root = Path(sys.argv[1])
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, name="bytes")
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny"))
    def save(run, step):
        with torch.no_grad():
            model.transformer.wte.weight.fill_(float(step))
        save_checkpoint(run, step, model, tok, train_config={}, state={"step": step},
                        is_best=step == 1)

    # Every file-system effect save_checkpoint has; SIGKILL just before the k-th one.
    calls = [0]
    def lethal(fn):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == int(os.environ["KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return wrapper

    k = 1
    while True:
        run = root / f"kill-{k:02d}"
        save(run, 1)
        pid = os.fork()
        if pid == 0:
            os.environ["KILL_AT"] = str(k)
            for mod, name in [(os, "replace"), (os, "symlink"), (os, "fsync"), (os, "mkdir"),
                              (shutil, "rmtree"), (os, "unlink")]:
                setattr(mod, name, lethal(getattr(mod, name)))
            save(run, 2)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        print(k, "killed" if killed else "finished", flush=True)
        if not killed:
            break
        k += 1
    """
)


@pytest.mark.slow
def test_sigkill_at_every_point_of_a_checkpoint_write(tmp_path):
    """A process SIGKILLed before each file-system call of save_checkpoint (write, fsync, rename,
    symlink, delete) leaves a run whose checkpoint loads: the previous one or the new one, whole,
    with training state that matches; and the next save into that run works."""
    from gpt_core.checkpoint import save_checkpoint
    from runtime.tokenizer import Tokenizer

    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    outcomes = [line.split() for line in proc.stdout.splitlines()]
    assert len(outcomes) > 10 and outcomes[-1][1] == "finished"
    assert all(o[1] == "killed" for o in outcomes[:-1])
    seen = set()
    for k, _ in outcomes:
        run = tmp_path / f"kill-{int(k):02d}"
        model, _ = load_model(run)  # best, else last
        last = resolve_checkpoint(run / "last")
        step = int(load_training_state(last)["step"])
        last_model, _ = load_model(last)
        assert float(last_model.transformer.wte.weight[0, 0].detach()) == step, (
            k
        )  # state matches weights
        assert float(model.transformer.wte.weight[0, 0].detach()) in (1.0, 2.0)
        seen.add(step)
        tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, name="bytes")
        save_checkpoint(run, 3, last_model, tok, train_config={}, state={"step": 3}, is_best=True)
        assert int(load_training_state(resolve_checkpoint(run / "last"))["step"]) == 3
    assert seen == {1, 2}  # killed early: the old checkpoint; late: the new one


@pytest.mark.slow
def test_sigint_during_training_then_resume(tmp_path, corpus, fast_config, gptkit_train):
    """`gptkit train ... --max-steps 60` in a real process, SIGINT after a few steps: exit 130,
    the message says how to resume, last/ holds a resumable checkpoint; `--resume` finishes the
    run from there (metrics continue without repeating a step)."""
    run = tmp_path / "run"
    proc = gptkit(
        *("train", "--data", str(corpus), *TINY, "--max-steps", "60", "--eval-interval", "1000"),
        *("--config", str(fast_config), "--out", str(run), "--device", "cpu"),
        cwd=tmp_path,
        env={"GPTKIT_CACHE_DIR": str(tmp_path / "cache")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"Resume with: gptkit train --out {run} --resume" in err
    stopped_at = int(load_training_state(resolve_checkpoint(run / "last"))["step"])
    assert 3 <= stopped_at < 60 and f"Interrupted at step {stopped_at}" in err
    load_model(run)

    result = gptkit_train("--out", str(run), "--resume")
    assert result.exit_code == 0, result.output
    assert int(load_training_state(resolve_checkpoint(run / "last"))["step"]) == 60
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 60


@pytest.mark.slow
def test_a_second_train_into_a_running_run_is_refused_and_sigkill_leaves_it_resumable(
    tmp_path, corpus, fast_config, gptkit_train
):
    """Two `gptkit train --out same`: the second refuses at once with one line naming the first
    (pid, host, start time) and writes nothing; after SIGKILL of the first, `--resume` goes on
    straight away (the kernel dropped the lock with its holder)."""
    run = tmp_path / "run"
    proc = gptkit(
        *("train", "--data", str(corpus), *TINY, "--max-steps", "400", "--eval-interval", "2"),
        *("--config", str(fast_config), "--out", str(run), "--device", "cpu"),
        cwd=tmp_path,
        env={"GPTKIT_CACHE_DIR": str(tmp_path / "cache")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / "last").exists():
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        metrics = (run / "metrics.jsonl").read_text()
        second = gptkit_train("--data", str(corpus), *TINY, "--out", str(run), "--max-steps", "2")
        line = one_line_error(second, f"{run} is in use by another training run (pid {proc.pid} on")
        assert "started " in line
        assert (run / "metrics.jsonl").read_text().startswith(metrics)  # nothing of the second's
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stopped_at = int(load_training_state(resolve_checkpoint(run / "last"))["step"])
    result = gptkit_train("--out", str(run), "--resume", "--max-steps", str(stopped_at + 3))
    assert result.exit_code == 0, result.output
    assert int(load_training_state(resolve_checkpoint(run / "last"))["step"]) == stopped_at + 3
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == stopped_at + 3
