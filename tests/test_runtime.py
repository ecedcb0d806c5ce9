"""The embedding API against a real exported model: loop, batches, threads, context, streaming.

Runs against ``$GPTKIT_TEST_MODEL`` when set (CI's torch-free venv), else a tiny export built here
(see runtime_helpers). Tests that compare with PyTorch or edit ONNX files skip without torch/onnx.
"""

from __future__ import annotations

import importlib.util
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from runtime_helpers import Exported, export_tiny, prebuilt_or_tiny

import runtime
from runtime.errors import ConfigError, GenerationError, GptkitError, ModelFileError
from runtime.generation import TextTracker
from runtime.model import Model
from runtime.sampling import SamplingConfig
from runtime.session import OnnxSession
from runtime.tokenizer import Tokenizer

PROMPTS = ["ROMEO:", "To be, or not to be", "\n", "What light through yonder window breaks?"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return prebuilt_or_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def model(exported: Exported) -> Model:
    return runtime.load(exported.path, threads=1)


def room(model: Model, prompt: str) -> int:
    """How many new tokens fit after ``prompt`` (at most 24, to keep the tests quick)."""
    return min(24, model.block_size - len(model.tokenizer.encode(prompt) or [0]))


# ---- loading ----------------------------------------------------------------------------------


def test_public_names():
    for name in ("load", "Model", "SamplingConfig", "Tokenizer", "GptkitError", "GenerationResult"):
        assert getattr(runtime, name) is not None
    assert runtime.Tokenizer is Tokenizer


def test_load_reads_everything_from_the_one_file(model: Model):
    assert isinstance(model.tokenizer, Tokenizer)
    assert model.block_size == model.config["block_size"] > 0
    assert model.device == "cpu"
    assert "layers" in repr(model)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: d / "missing.onnx", "not found"),
        (lambda d: d, "is not a file"),
        (lambda d: _write(d / "empty.onnx", b""), "is empty"),
        (lambda d: _write(d / "text.onnx", b"this is not a model"), "is not a readable ONNX model"),
    ],
)
def test_unloadable_files_are_one_line_model_file_errors(tmp_path: Path, make, needle: str):
    with pytest.raises(ModelFileError) as info:
        runtime.load(make(tmp_path))
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_an_onnx_file_without_gptkit_metadata_is_refused(exported: Exported, tmp_path: Path):
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(exported.path))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ModelFileError, match="no gptkit metadata"):
        runtime.load(bare)


def test_bad_session_options(exported: Exported):
    with pytest.raises(ConfigError, match="unknown device"):
        runtime.load(exported.path, device="tpu")
    with pytest.raises(ConfigError, match="threads must be positive"):
        runtime.load(exported.path, threads=0)
    with pytest.raises(ConfigError, match="optimization level"):
        runtime.load(exported.path, optimization="max")


def test_cuda_without_onnxruntime_gpu_says_so_and_falls_back_only_when_asked(exported: Exported):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(ConfigError, match="pip install onnxruntime-gpu"):
        runtime.load(exported.path, device="cuda")
    assert runtime.load(exported.path, device="cuda", allow_fallback=True).device == "cpu"


# ---- generation -------------------------------------------------------------------------------


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(model: Model):
    n = room(model, "ROMEO:")
    assert model.generate("ROMEO:", max_new_tokens=n, temperature=0) == model.generate(
        "ROMEO:", max_new_tokens=n, temperature=0
    )
    a = model.complete("ROMEO:", max_new_tokens=n, temperature=1.0, seed=1, stop_at_eot=False)
    b = model.complete("ROMEO:", max_new_tokens=n, temperature=1.0, seed=1, stop_at_eot=False)
    c = model.complete("ROMEO:", max_new_tokens=n, temperature=1.0, seed=2, stop_at_eot=False)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids
    assert len(a.token_ids) == n and a.finish_reason == "length"


def test_batch_greedy_equals_each_prompt_alone(model: Model):
    n = min(room(model, p) for p in PROMPTS)
    alone = [model.complete(p, max_new_tokens=n, temperature=0, stop_at_eot=False) for p in PROMPTS]
    batch = model.complete(PROMPTS, max_new_tokens=n, temperature=0, stop_at_eot=False)
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    assert [r.text for r in batch] == [r.text for r in alone]
    assert model.generate(PROMPTS, max_new_tokens=n, temperature=0) == model.generate(
        PROMPTS, max_new_tokens=n, temperature=0
    )


def test_batch_rows_stop_on_their_own_and_the_others_carry_on(model: Model):
    n = min(room(model, p) for p in PROMPTS[:2])
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, stop_at_eot=False)
    first, second = (model.complete(p, cfg) for p in PROMPTS[:2])
    # A stop string taken from the middle of row 0's continuation that row 1 never produces.
    stop = next(
        (
            first.text[i : i + 2]
            for i in range(1, len(first.text) - 1)
            if first.text[i : i + 2] not in second.text and first.text[i : i + 2].strip()
        ),
        None,
    )
    if stop is None:
        pytest.skip("this model's two greedy continuations share every 2-character piece")
    both = model.complete(PROMPTS[:2], cfg, stop=[stop])
    assert both[0].finish_reason == "stop"
    assert both[0].text == first.text[: first.text.index(stop)]
    assert len(both[0].token_ids) < n
    assert (both[1].text, both[1].finish_reason) == (second.text, "length")


def test_row_zero_of_a_sampled_batch_samples_as_the_prompt_alone(model: Model):
    n = min(room(model, p) for p in PROMPTS)
    cfg = SamplingConfig(max_new_tokens=n, temperature=1.0, seed=11, stop_at_eot=False)
    assert model.complete(PROMPTS, cfg)[0].token_ids == model.complete(PROMPTS[0], cfg).token_ids


def test_io_binding_and_plain_runs_agree(exported: Exported, model: Model):
    plain = Model(OnnxSession(exported.path, threads=1, io_binding=False))
    bound = Model(OnnxSession(exported.path, threads=1, io_binding=True))
    assert (plain._session.io_binding, bound._session.io_binding) == (False, True)
    n = min(room(model, p) for p in PROMPTS)
    kwargs = dict(max_new_tokens=n, temperature=0, stop_at_eot=False, logprobs=True)
    for a, b in zip(
        plain.complete(PROMPTS, **kwargs), bound.complete(PROMPTS, **kwargs), strict=True
    ):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_eight_threads_share_one_model(model: Model):
    n = room(model, PROMPTS[-1])

    def job(i: int) -> tuple[str, list[int], str]:
        prompt = PROMPTS[i % len(PROMPTS)]
        sampled = model.complete(
            prompt, max_new_tokens=n, temperature=1.0, seed=i, stop_at_eot=False
        )
        greedy = "".join(model.stream(prompt, max_new_tokens=n, temperature=0))
        return sampled.text, sampled.token_ids, greedy

    expected = [job(i) for i in range(16)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(job, range(16)))
    assert got == expected


def test_logprobs_of_the_cached_loop_match_a_full_forward_score(model: Model):
    eot = model.tokenizer.eot_token
    if eot < 0:
        pytest.skip("this tokenizer has no <|endoftext|>")
    n = model.block_size - 1 if model.block_size <= 64 else 40
    tokens = list(
        model.generate_tokens(
            [eot], max_new_tokens=n, temperature=0, stop_at_eot=False, logprobs=True
        )
    )
    ids = [t.id for t in tokens]
    scored = model.score(ids)
    assert scored.token_ids == ids
    np.testing.assert_allclose([t.logprob for t in tokens], scored.logprobs, atol=1e-4)
    assert all(lp <= 0 for lp in scored.logprobs)
    assert math.isclose(scored.perplexity, math.exp(-np.mean(scored.logprobs)))


def test_complete_logprobs_on_request_only(model: Model):
    n = room(model, "ROMEO:")
    assert model.complete("ROMEO:", max_new_tokens=n, seed=0).logprobs is None
    result = model.complete("ROMEO:", max_new_tokens=n, seed=0, logprobs=True)
    assert len(result.logprobs) == len(result.token_ids)
    assert all(lp <= 0 for lp in result.logprobs)


def test_empty_prompt_starts_a_new_document(model: Model):
    if model.tokenizer.eot_token < 0:
        pytest.skip("this tokenizer has no <|endoftext|>")
    result = model.complete("", max_new_tokens=5, seed=0)
    assert result.prompt_tokens == 1
    assert 1 <= len(result.token_ids) <= 5


def test_stop_at_eot_ends_the_row_and_hides_the_token(model: Model, monkeypatch):
    eot = model.tokenizer.eot_token
    if eot < 0:
        pytest.skip("this tokenizer has no <|endoftext|>")
    import runtime.generation

    real = runtime.generation.choose_token
    calls = []

    def eot_on_third_call(logits, config, rng, **kwargs):  # row 0 of a batch of 2 ends early
        calls.append(1)
        return eot if len(calls) == 3 else real(logits, config, rng, **kwargs)

    monkeypatch.setattr(runtime.generation, "choose_token", eot_on_third_call)
    n = min(room(model, p) for p in PROMPTS[:2])
    first, second = model.complete(PROMPTS[:2], max_new_tokens=n, temperature=0)
    assert first.finish_reason == "eot"
    assert first.token_ids[-1] == eot and len(first.token_ids) == 2
    assert "<|endoftext|>" not in first.text
    assert second.finish_reason in ("length", "eot") and len(second.token_ids) > 2


# ---- context limit ----------------------------------------------------------------------------


def test_past_the_context_is_an_error_with_the_numbers(model: Model):
    block = model.block_size
    with pytest.raises(GenerationError) as info:
        model.generate("ROMEO:", max_new_tokens=block)
    message = str(info.value)
    n_prompt = len(model.tokenizer.encode("ROMEO:"))
    assert f"{n_prompt} tokens + max_new_tokens {block}" in message
    assert f"context of {block} tokens" in message
    assert "truncate" in message
    with pytest.raises(GenerationError, match="prompt 2 of 2"):
        model.generate(["a", "ROMEO: " * block], max_new_tokens=1)


def next_greedy(session: OnnxSession, ids: list[int], n_vocab: int) -> int:
    """Greedy next token after ``ids`` from one full forward pass: the reference for truncation."""
    n = len(ids)
    logits, _ = session.run(
        np.array([ids]), np.ones((1, n)), np.arange(n)[None], session.empty_cache(1)
    )
    return int(np.argmax(logits[0, -1, :n_vocab]))


def test_truncate_keeps_the_most_recent_tokens(exported: Exported, model: Model):
    block, n_vocab = model.block_size, model.tokenizer.n_vocab
    session = OnnxSession(exported.path, threads=1)
    ids = model.tokenizer.encode("ROMEO: O, she doth teach the torches to burn bright! " * block)
    long_ids = ids[: block + 10]
    cfg = SamplingConfig(max_new_tokens=2, temperature=0, stop_at_eot=False)
    first, second = (t.id for t in model.generate_tokens(long_ids, cfg, context="truncate"))
    assert first == next_greedy(session, long_ids[-block:], n_vocab)
    # The window was full: the cache is rebuilt from the most recent 3/4 of a context.
    keep = block - block // 4
    assert second == next_greedy(session, (long_ids + [first])[-keep:], n_vocab)
    n = block + block // 2  # several re-prefills in the middle of the generation
    tokens = list(model.generate_tokens(long_ids, cfg, max_new_tokens=n, context="truncate"))
    assert len(tokens) == n
    with pytest.raises(ConfigError, match="context mode"):
        model.generate("x", context="slide")


def test_score_refuses_texts_longer_than_the_context(model: Model):
    with pytest.raises(GenerationError, match=f"context is {model.block_size}"):
        model.score("ROMEO: " * (model.block_size + 1))
    assert math.isnan(model.score("").perplexity)


# ---- options ----------------------------------------------------------------------------------


def test_options_are_checked_before_anything_runs(model: Model):
    # A type checker rejects an unknown keyword (SamplingOptions); untyped callers get this.
    with pytest.raises(ConfigError, match="unknown generation option 'temprature'"):
        model.generate("x", temprature=0.5)
    with pytest.raises(ConfigError, match="unknown generation option 'topk'"):
        model.stream("x", topk=5)
    with pytest.raises(ConfigError, match="unknown generation option 'seeds'"):
        model.generate_tokens([1, 2], seeds=3)
    with pytest.raises(ConfigError, match="top_p"):
        model.stream("x", top_p=0)
    with pytest.raises(ConfigError, match="one prompt string"):
        model.stream(["a", "b"])
    with pytest.raises(GptkitError, match="outside"):
        model.generate_tokens([model.tokenizer.n_vocab + 5])
    assert model.complete([]) == []


# ---- streaming and text -----------------------------------------------------------------------


def test_stream_pieces_join_to_the_complete_text(model: Model):
    n = room(model, "ROMEO:")
    stream = model.stream("ROMEO:", max_new_tokens=n, temperature=1.0, seed=3)
    pieces = list(stream)
    whole = model.complete("ROMEO:", max_new_tokens=n, temperature=1.0, seed=3)
    assert "".join(pieces) == whole.text == stream.result.text
    assert stream.result.token_ids == whole.token_ids
    assert all(pieces)
    # Decoding incrementally must give what decoding all the ids at once gives: a split UTF-8
    # character emitted early would show up here as two U+FFFD instead of the character.
    ids = [t for t in whole.token_ids if t != model.tokenizer.eot_token]
    assert "".join(pieces) == model.tokenizer.decode(ids)


def byte_tokenizer() -> Tokenizer:
    return Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, name="bytes")


def test_text_tracker_never_releases_half_a_character():
    tok = byte_tokenizer()
    text = "héllo 🙂 世界, ça va?"
    tracker = TextTracker(tok, SamplingConfig())
    pieces = []
    for token in tok.encode(text):  # one byte per token: every multi-byte character is split
        tracker.add(token)
        pieces.append(tracker.take_ready())
    pieces.append(tracker.take_rest())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "🙂" in pieces  # released whole, once its fourth byte arrived


def test_text_tracker_holds_back_a_possible_stop_string():
    tok = byte_tokenizer()
    tracker = TextTracker(tok, SamplingConfig(stop=["\n\n", "END"]))
    released = []
    for token in tok.encode("ab\nc\nEN\n\nnever"):
        tracker.add(token)
        released.append(tracker.take_ready())
        if tracker.finished:
            break
    released.append(tracker.take_rest())
    assert "".join(released) == "ab\nc\nEN"
    assert tracker.reason == "stop"
    assert released[2] == ""  # "\n" could start "\n\n": held until "c" arrived


def test_eot_never_appears_as_text():
    tok = byte_tokenizer()
    tracker = TextTracker(tok, SamplingConfig())
    for token in [*tok.encode("hi"), tok.eot_token, *tok.encode("there")]:
        tracker.add(token)
    assert (tracker.take_rest(), tracker.reason) == ("hi", "eot")


# ---- parity with PyTorch ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_pair(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return export_tiny(tmp_path_factory.mktemp("parity"))


@pytest.mark.torch
def test_greedy_tokens_equal_pytorch_greedy(torch_pair: Exported):
    import torch

    model = runtime.load(torch_pair.path, threads=1)
    gpt = torch_pair.torch_model
    n = 30
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        seq = torch.tensor([ids])
        with torch.no_grad():
            for _ in range(n):  # no cache: a full forward per token, the plainest reference
                logits = gpt(seq).logits[0, -1, : model.tokenizer.n_vocab]
                seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
        expected = seq[0, len(ids) :].tolist()
        got = model.complete(prompt, max_new_tokens=n, temperature=0, stop_at_eot=False).token_ids
        assert got == expected, prompt


@pytest.mark.torch
def test_fp16_export_runs_with_an_fp16_cache(tmp_path: Path):
    fp16 = export_tiny(tmp_path, dtype="fp16")
    model = runtime.load(fp16.path, threads=1)
    assert model._session.kv_dtype == np.float16
    result = model.complete(PROMPTS, max_new_tokens=8, temperature=0, stop_at_eot=False)
    assert all(len(r.token_ids) == 8 for r in result)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---- examples/ --------------------------------------------------------------------------------


def load_example(name: str):
    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_complete_lines_example_batches_like_generate(model: Model):
    example = load_example("complete_lines")
    lines = PROMPTS * 3  # 12 lines: batches of 5, 5 and 2
    n = min(room(model, p) for p in PROMPTS)
    got = example.complete_lines(model, lines, batch=5, max_new_tokens=n, temperature=0)
    assert got == [model.generate(line, max_new_tokens=n, temperature=0) for line in lines]


def test_complete_server_example_batches_through_the_engine(model: Model, exported: Exported):
    """The example embeds the engine: concurrent requests get what each gets alone."""
    import json
    import threading
    import urllib.error
    import urllib.request

    from runtime.engine import Engine

    example = load_example("complete_server")
    with Engine.load(exported.path, max_batch=4) as engine:
        server = example.make_server(engine, port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}/complete"

        def post(body: dict) -> tuple[int, bytes]:
            request = urllib.request.Request(url, data=json.dumps(body).encode())
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()

        try:
            n = room(model, "ROMEO:")
            replies: dict[int, tuple[int, bytes]] = {}
            body = {"prompt": "ROMEO:", "max_new_tokens": n}
            threads = [
                threading.Thread(target=lambda s=s: replies.update({s: post({**body, "seed": s})}))
                for s in range(4)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for seed, (status, reply) in replies.items():
                expected = model.complete("ROMEO:", max_new_tokens=n, seed=seed)
                assert status == 200
                assert json.loads(reply) == {
                    "text": expected.text,
                    "finish_reason": expected.finish_reason,
                    "prompt_tokens": expected.prompt_tokens,
                    "completion_tokens": len(expected.token_ids),
                }
            status, reply = post({"prompt": "ROMEO:", "top_p": 2})
            assert status == 400 and "top_p must be in (0, 1]" in json.loads(reply)["error"]
        finally:
            server.shutdown()
            server.server_close()
