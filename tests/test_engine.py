"""The continuous-batching engine: outputs independent of the batch, cancel, drain, limits.

Every request's tokens must equal the same request run alone through ``Model.generate_tokens``
(greedy and seeded sampling), for both cache layouts, with requests joining mid-stream, prompts
long enough to force the shared timeline to skip ahead and compact (the tiny model's context is
64 tokens), and more requests than slots.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
from runtime_helpers import export_tiny

import runtime
from runtime.engine import Engine, Event
from runtime.errors import (
    ConfigError,
    ContextLengthError,
    EngineClosedError,
    GenerationError,
    QueueFullError,
)
from runtime.sampling import SamplingConfig

KV_CACHES = ("inplace", "concat")


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("engine")
    return {kv: export_tiny(directory, kv_cache=kv).path for kv in KV_CACHES}


@pytest.fixture(scope="module", params=KV_CACHES)
def path(request: pytest.FixtureRequest, exports: dict[str, Path]) -> Path:
    return exports[request.param]


def _prompts(tokenizer: runtime.Tokenizer, count: int, seed: int) -> list[list[int]]:
    rnd = random.Random(seed)
    words = "the king hath sent for thee and all his lords to tell what news from France".split()
    rows = []
    for _ in range(count):
        text = " ".join(rnd.choice(words) for _ in range(rnd.choice([1, 3, 12, 30])))
        rows.append(tokenizer.encode(text)[: rnd.choice([1, 5, 20, 50, 60])])
    return rows


def test_each_request_gets_what_it_would_get_alone(path: Path) -> None:
    model = runtime.load(path)
    engine = Engine.load(path, max_batch=3)
    with engine:
        rnd = random.Random(1)
        submitted = []
        for i, ids in enumerate(_prompts(engine.tokenizer, 24, seed=2)):
            cfg = SamplingConfig(
                max_new_tokens=rnd.randint(1, engine.block_size - len(ids)),
                temperature=0 if i % 2 else 0.9,
                top_k=0 if i % 3 else 20,
                seed=i,
                stop_at_eot=False,
            )
            submitted.append((ids, cfg, engine.submit(ids, cfg)))
        results = [(ids, cfg, request.result(timeout=120)) for ids, cfg, request in submitted]
    for ids, cfg, result in results:
        alone = [t.id for t in model.generate_tokens(ids, cfg)]
        assert result.token_ids == alone
        assert result.finish_reason == "length"
    if engine.shared_buffer:  # the timeline wrapped around at least once
        assert engine._cache.compactions > 0  # type: ignore[attr-defined]
    assert engine.stats().busy_slots == 0


def test_a_long_prompt_joins_running_streams_without_changing_them(path: Path) -> None:
    model = runtime.load(path)
    tokenizer = model.tokenizer
    short = tokenizer.encode("ROMEO:")
    long = (tokenizer.encode("To be, or not to be, that is the question: " * 20))[:58]
    cfg = SamplingConfig(max_new_tokens=40, temperature=0, stop_at_eot=False)
    with Engine.load(path, max_batch=4) as engine:
        first = [engine.submit(short, cfg) for _ in range(2)]
        next(iter(first[0]))  # streams are running before the long prompt arrives
        late = engine.submit(long, SamplingConfig(max_new_tokens=4, temperature=0))
        outputs = [r.result(timeout=60).token_ids for r in first]
        late_ids = late.result(timeout=60).token_ids
    alone = [t.id for t in model.generate_tokens(short, cfg)]
    assert outputs == [alone, alone]
    assert late_ids == [t.id for t in model.generate_tokens(long, max_new_tokens=4, temperature=0)]


def test_text_events_match_generate_with_stop_strings_and_logprobs(path: Path) -> None:
    model = runtime.load(path)
    ids = model.tokenizer.encode("KING:")
    cfg = SamplingConfig(max_new_tokens=30, temperature=0.8, seed=3, stop=("e",))
    expected = model.complete("KING:", cfg, logprobs=True)
    with Engine.load(path) as engine:
        request = engine.submit(ids, cfg, top_logprobs=3)
        events = list(request)
    assert "".join(e.text for e in events) == expected.text
    assert all("e" not in e.text for e in events)
    assert events[-1].finish_reason in ("stop", "length", "eot")
    assert request.token_ids == expected.token_ids
    assert request.logprobs == pytest.approx(expected.logprobs, abs=1e-5)
    for event in events:
        assert event.token_id is not None and event.logprob is not None
        assert len(event.top_logprobs) == 3
        best = [lp for _, lp in event.top_logprobs]
        assert best == sorted(best, reverse=True)
        assert event.logprob <= best[0] + 1e-9


def test_seed_rows_are_the_rows_of_a_batch(path: Path) -> None:
    """n choices of one prompt: row i samples as row i of Model.generate_tokens's batch."""
    model = runtime.load(path)
    ids = model.tokenizer.encode("JULIET:")
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=7, stop_at_eot=False)
    batch: list[list[int]] = [[], [], []]
    for token in model.generate_tokens([ids, ids, ids], cfg):
        batch[token.row].append(token.id)
    with Engine.load(path) as engine:
        requests = [engine.submit(ids, cfg, seed_row=row) for row in range(3)]
        assert [r.result(timeout=60).token_ids for r in requests] == batch


def test_cancel_frees_the_slot_and_ends_with_a_cancelled_event(path: Path) -> None:
    events: list[Event] = []
    got_one = threading.Event()

    def collect(event: Event) -> None:
        events.append(event)
        got_one.set()

    with Engine.load(path, max_batch=1) as engine:
        ids = engine.tokenizer.encode("ROMEO:")
        cfg = SamplingConfig(max_new_tokens=engine.block_size - len(ids), stop_at_eot=False)
        request = engine.submit(ids, cfg, on_event=collect)
        queued = engine.submit(ids, cfg)  # waits for the only slot
        assert got_one.wait(30)
        request.cancel()
        queued.cancel()
        assert request.result(timeout=30).finish_reason == "cancelled"
        assert queued.result(timeout=30).finish_reason == "cancelled"
        assert events[-1].finish_reason == "cancelled"
        assert len(request.token_ids) < cfg.max_new_tokens
        assert engine.stats().busy_slots == 0
        after = engine.submit(ids, SamplingConfig(max_new_tokens=3, temperature=0))
        assert len(after.result(timeout=30).token_ids) <= 3


def test_close_drains_then_refuses(path: Path) -> None:
    engine = Engine.load(path, max_batch=2)
    engine.start()
    ids = engine.tokenizer.encode("ROMEO:")
    running = engine.submit(ids, SamplingConfig(max_new_tokens=20, temperature=0))
    engine.close(drain_timeout=60)
    assert running.result(timeout=0).finish_reason in ("length", "eot")
    with pytest.raises(EngineClosedError):
        engine.submit(ids, SamplingConfig(max_new_tokens=2))


def test_close_without_drain_cancels_what_is_left(path: Path) -> None:
    engine = Engine.load(path, max_batch=1)
    ids = engine.tokenizer.encode("ROMEO:")
    cfg = SamplingConfig(max_new_tokens=engine.block_size - len(ids), stop_at_eot=False)
    requests = [engine.submit(ids, cfg) for _ in range(3)]
    engine.start()
    engine.close()
    assert {r.result(timeout=30).finish_reason for r in requests} <= {"cancelled", "length"}
    assert requests[-1].finish_reason == "cancelled"


def test_submit_refuses_what_cannot_be_served(exports: dict[str, Path]) -> None:
    engine = Engine.load(exports["inplace"], max_batch=1, max_queue=2)  # not started: all queue
    ids = engine.tokenizer.encode("ROMEO:")
    with pytest.raises(ContextLengthError) as error:
        engine.submit(ids, SamplingConfig(max_new_tokens=engine.block_size))
    assert (error.value.prompt_tokens, error.value.context) == (len(ids), engine.block_size)
    assert str(engine.block_size) in str(error.value)
    with pytest.raises(GenerationError, match="no tokens"):
        engine.submit([], SamplingConfig())
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        engine.submit([engine.tokenizer.n_vocab], SamplingConfig())
    with pytest.raises(ConfigError, match="top_logprobs"):
        engine.submit(ids, SamplingConfig(), top_logprobs=99)
    engine.submit(ids, SamplingConfig(max_new_tokens=2))
    engine.submit(ids, SamplingConfig(max_new_tokens=2))
    with pytest.raises(QueueFullError, match="max_queue 2"):
        engine.submit(ids, SamplingConfig(max_new_tokens=2))
    engine.close()
    with pytest.raises(ConfigError, match="max_batch"):
        Engine.load(exports["inplace"], max_batch=0)


def test_a_failing_consumer_cancels_only_its_request(path: Path) -> None:
    def explode(event: Event) -> None:
        raise RuntimeError("consumer bug")

    with Engine.load(path) as engine:
        ids = engine.tokenizer.encode("ROMEO:")
        cfg = SamplingConfig(max_new_tokens=10, temperature=0, stop_at_eot=False)
        bad = engine.submit(ids, cfg, on_event=explode)
        good = engine.submit(ids, cfg)
        assert len(good.result(timeout=30).token_ids) == 10
        assert bad.result(timeout=30).finish_reason == "cancelled"


def test_penalties_and_logit_bias_act_on_the_engine(path: Path) -> None:
    model = runtime.load(path)
    ids = model.tokenizer.encode("ROMEO:")
    with Engine.load(path) as engine:
        forced = SamplingConfig(max_new_tokens=5, temperature=0, logit_bias={7: 100})
        assert engine.submit(ids, forced).result(timeout=30).token_ids == [7] * 5
        plain = SamplingConfig(max_new_tokens=30, temperature=0, stop_at_eot=False)
        penalised = SamplingConfig(
            max_new_tokens=30, temperature=0, stop_at_eot=False, frequency_penalty=2.0
        )
        got = [engine.submit(ids, c).result(timeout=30).token_ids for c in (plain, penalised)]
    # The engine hands the sampler the generated tokens as Model.generate_tokens does.
    assert got == [[t.id for t in model.generate_tokens(ids, c)] for c in (plain, penalised)]
    assert len(set(got[1])) >= len(set(got[0]))


def test_readme_engine_example_runs(
    exports: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import re
    import shutil

    readme = Path(__file__).resolve().parent.parent / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(encoding="utf-8"), flags=re.S)
    (source,) = [b for b in blocks if "Engine.load" in b]
    shutil.copy(exports["inplace"], tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    exec(compile(source, f"{readme}:engine", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip().endswith(("length", "eot", "stop"))
