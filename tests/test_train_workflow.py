"""The training workflow: continuing a run past its end, one writer per run directory, TensorBoard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from reliability_helpers import ROOT, one_line_message
from test_train import assert_bitwise_equal, small, weights

from gpt_core import schedule
from gpt_core.checkpoint import load_training_state, resolve_checkpoint
from gpt_core.metrics import read_metrics
from gpt_core.run_lock import LOCK_FILE, RunDirectoryBusyError, RunLock
from gpt_core.train import Event, TrainConfig, train
from runtime.errors import MissingDependencyError

pytestmark = pytest.mark.usefixtures("isolated_dirs")


@pytest.fixture
def corpus(tmp_path: Path, shakespeare: str) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(shakespeare[:30_000], encoding="utf-8")
    return path


@pytest.fixture
def model_config(tiny_config):
    return tiny_config.replace(block_size=32, dropout=0.1)


def lrs(events: list[Event]) -> dict[int, float]:
    """The learning rate each step ran with (event.step is the step count after it)."""
    return {e.step - 1: e.data["lr"] for e in events if e.kind == "step"}


# ---- continuing a run past its end ------------------------------------------------------------


def test_a_replanned_schedule_is_continuous_and_ends_at_the_floor() -> None:
    kw: dict[str, Any] = dict(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    old = [schedule.learning_rate(s, 100, **kw) for s in range(100)]
    restart = schedule.replan(40, 100, **kw)  # stopped at step 40 of 100, now to go to 300
    assert restart == (40, pytest.approx(old[40]))
    new = [schedule.learning_rate(s, 300, restart=restart, **kw) for s in range(300)]
    assert new[40] == pytest.approx(old[40])  # no jump
    assert all(a >= b for a, b in zip(new[40:], new[41:], strict=False))
    ran = old[:40] + new[40:]  # the rates the steps ran with: the old plan, then the new
    old_steps = [abs(a - b) for a, b in zip(old[10:], old[11:], strict=False)]
    assert abs(ran[40] - ran[39]) <= max(old_steps)  # the seam moves no more than a plain step
    assert schedule.learning_rate(300, 300, restart=restart, **kw) == pytest.approx(0.1)
    # a finished run is at the floor and continues there; a second re-plan starts from the first
    assert schedule.replan(100, 100, **kw) == (100, pytest.approx(0.1))
    again = schedule.replan(200, 300, restart=restart, **kw)
    assert again[1] == pytest.approx(new[200])


def test_resume_with_more_steps_continues_a_finished_run(corpus, tmp_path, model_config) -> None:
    run = tmp_path / "run"
    first = train(model_config, small(corpus, run))
    assert first.step == 20
    events: list[Event] = []
    session = TrainConfig(out_dir=str(run), max_steps=30, log_interval=5, threads=1)
    more = train(None, session, callback=events.append, resume=True)
    assert more.step == 30 and not more.interrupted
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["replan", "start"]
    assert events[0].step == 20 and events[0].data == {
        "old_end": 20,
        "new_end": 30,
        "lr": pytest.approx(2e-4),
    }
    # The learning rate goes on from the floor where the first plan ended, without a jump.
    assert list(lrs(events)) == list(range(20, 30))
    assert all(lr == pytest.approx(2e-4) for lr in lrs(events).values())
    # The optimizer's state went on too (AdamW counts its steps), and metrics append.
    state = load_training_state(resolve_checkpoint(run / "last"))
    assert int(state["optimizer"]["state"][0]["step"]) == 30
    assert state["train_config"]["max_steps"] == 30 and state["lr_restart"] == [20, 2e-4]
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps == [5, 10, 15, 20, 25, 30]


def test_an_extended_run_stopped_and_resumed_is_bitwise_the_straight_one(
    corpus, tmp_path, model_config
) -> None:
    """Stopped at 7 of 20, extended to 40 (the rest of the decay stretched), Ctrl-C at 30, plain
    resume: the same weights as stopping at 7 and extending to 40 in one go."""
    for name in ("straight", "split"):
        stopper = _ctrl_c_at(7)
        train(model_config, small(corpus, tmp_path / name), callback=stopper)
    session = TrainConfig(out_dir=str(tmp_path / "straight"), max_steps=40, threads=1)
    events: list[Event] = []
    straight = train(None, session, callback=events.append, resume=True)
    rates = lrs(events)
    kw: dict[str, Any] = dict(lr=2e-3, warmup_steps=5, min_lr_ratio=0.1)
    assert rates[7] == pytest.approx(schedule.learning_rate(7, 20, **kw))  # no jump at the seam
    assert all(rates[s] >= rates[s + 1] for s in range(7, 39))
    assert 2e-4 < rates[39] < 2.1e-4  # the last step, one short of the floor

    split = tmp_path / "split"
    session = TrainConfig(out_dir=str(split), max_steps=40, threads=1)
    stopped = train(None, session, callback=_ctrl_c_at(30), resume=True)
    assert stopped.step == 30 and stopped.interrupted
    resumed = train(None, TrainConfig(out_dir=str(split), threads=1), resume=True)
    assert resumed.step == 40
    assert_bitwise_equal(weights(straight.model), weights(resumed.model))
    steps = [r["step"] for r in read_metrics(split / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def _ctrl_c_at(step: int) -> Any:
    def callback(event: Event) -> None:
        if event.kind == "step" and event.step == step:
            signal.raise_signal(signal.SIGINT)

    return callback


# ---- one writer per run directory -------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from gpt_core.run_lock import RunLock
    lock = RunLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(600)
    """
)


def test_a_second_writer_is_refused_and_a_killed_holder_leaves_no_stale_lock(
    corpus, tmp_path, model_config
) -> None:
    run = tmp_path / "run"
    train(model_config, small(corpus, run, max_steps=2))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        info = json.loads((run / LOCK_FILE).read_text())
        assert info["pid"] == holder.pid
        with pytest.raises(RunDirectoryBusyError) as error:
            train(None, TrainConfig(out_dir=str(run), max_steps=4), resume=True)
        message = one_line_message(error)
        assert message.startswith(f"{run} is in use by another training run (pid {holder.pid} on ")
        assert info["started"] in message and "train into another --out" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    resumed = train(None, TrainConfig(out_dir=str(run), max_steps=4), resume=True)
    assert resumed.step == 4
    assert not (run / LOCK_FILE).exists()  # removed when the run ends


def test_the_lock_is_per_directory_and_released_on_errors(tmp_path) -> None:
    with RunLock(tmp_path / "a"), RunLock(tmp_path / "b"):
        with pytest.raises(RunDirectoryBusyError, match=f"pid {os.getpid()} on "):
            RunLock(tmp_path / "a").acquire()
    assert not (tmp_path / "a").exists()  # made for the lock alone, and left empty: removed
    with RunLock(tmp_path / "a"):
        pass


# ---- TensorBoard ------------------------------------------------------------------------------


def test_log_tensorboard_writes_event_files_beside_the_metrics(
    corpus, tmp_path, model_config
) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(model_config, small(corpus, run, max_steps=10, eval_interval=5, log="tensorboard"))
    assert list(run.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    rows = read_metrics(run / "metrics.jsonl")
    for tag, key in [("train/loss", "loss"), ("val/loss", "val_loss"), ("train/lr", "lr")]:
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert logged == [(r["step"], pytest.approx(r[key])) for r in rows if key in r], tag
    assert [e.step for e in events.Scalars("val/bits_per_char")] == [5, 10]
    assert [e.step for e in events.Scalars("train/tokens_per_s")] == [5, 10]
    samples = events.Tensors("samples/text_summary")
    assert [s.step for s in samples] == [5, 10]
    assert samples[0].tensor_proto.string_val[0].decode().startswith("```\n")


def test_log_tensorboard_without_the_package_is_one_line(
    corpus, tmp_path, model_config, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(MissingDependencyError) as error:
        train(model_config, small(corpus, tmp_path / "run", log="tensorboard"))
    assert "pip install 'gptkit[tensorboard]'" in one_line_message(error)
    assert not (tmp_path / "run").exists()


def test_unknown_tracker_is_one_line(corpus, tmp_path) -> None:
    with pytest.raises(Exception, match="unknown --log 'wandb'; choose one of tensorboard"):
        TrainConfig(log="wandb").validate()
