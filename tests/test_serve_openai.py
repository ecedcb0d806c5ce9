"""The official ``openai`` client against `gptkit serve`: what real applications see.

Completions and chat, stream and not, ``n`` > 1, several prompts, logprobs, stop strings, seeds
(choice 0 with seed s is ``runtime.load(path).generate(seed=s)``; greedy text is the runtime's
greedy text), and the errors as the client's exception types.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from serve_helpers import LiveServer, live_server, serve_model

import runtime
from gptkit.server import ServerOptions, create_app
from gptkit.server.openai_api import CHAT_STOP, ChatMessage, render_chat
from runtime.engine import Engine

KEY = "sk-test"
NAME = "tiny"
PROMPT = "ROMEO:"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return serve_model(tmp_path_factory)


@pytest.fixture(scope="module")
def model(model_path: Path) -> runtime.Model:
    return runtime.load(model_path, threads=1)


@pytest.fixture(scope="module")
def live(model_path: Path) -> Iterator[LiveServer]:
    app = create_app(
        lambda: Engine.load(model_path, threads=1, max_batch=4),
        ServerOptions(model_name=NAME, api_key=KEY),
    )
    with live_server(app) as server:
        yield server


@pytest.fixture(scope="module")
def client(live: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0) as c:
        yield c


def test_greedy_completion_is_the_runtimes(client: openai.OpenAI, model: runtime.Model) -> None:
    completion = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0)
    (choice,) = completion.choices
    assert choice.text == model.generate(PROMPT, temperature=0, max_new_tokens=20)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(model.tokenizer.encode(PROMPT))


def test_seeded_choices(client: openai.OpenAI, model: runtime.Model) -> None:
    def run() -> list[str]:
        completion = client.completions.create(
            model=NAME, prompt=PROMPT, max_tokens=20, n=3, seed=7
        )
        return [c.text for c in sorted(completion.choices, key=lambda c: c.index)]

    first = run()
    assert run() == first  # the same seed gives the same choices
    assert first[0] == model.generate(PROMPT, temperature=1.0, max_new_tokens=20, seed=7)
    assert len(set(first)) > 1  # choices draw from different streams


def test_several_prompts_times_n(client: openai.OpenAI, model: runtime.Model) -> None:
    ids = model.tokenizer.encode("JULIET:")
    completion = client.completions.create(
        model=NAME, prompt=[[*ids], model.tokenizer.encode(PROMPT)], max_tokens=6, n=2, seed=3
    )
    assert sorted(c.index for c in completion.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in completion.choices}
    assert by_index[0] == model.generate("JULIET:", max_new_tokens=6, temperature=1.0, seed=3)
    assert by_index[2] == model.generate(PROMPT, max_new_tokens=6, temperature=1.0, seed=3)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(ids) + len(model.tokenizer.encode(PROMPT))


def test_stream_equals_non_stream(client: openai.OpenAI) -> None:
    args = {"model": NAME, "prompt": PROMPT, "max_tokens": 20, "seed": 11, "n": 2}
    whole = client.completions.create(**args)  # type: ignore[call-overload]
    pieces: dict[int, str] = {0: "", 1: ""}
    finish: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(
        **args, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert pieces == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert usage == whole.usage


def test_logprobs(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3
    )
    (choice,) = completion.choices
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert completion.usage is not None
    n = completion.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert lp.text_offset is not None and lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob is not None and logprob <= 0
        assert len(top) == 3
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the best token is chosen
        assert token in top


def test_echo(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=5, temperature=0)
    echoed = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=5, temperature=0, echo=True
    )
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text


def test_stop_strings(client: openai.OpenAI) -> None:
    args = {"model": NAME, "prompt": PROMPT, "max_tokens": 40, "seed": 5}
    text = client.completions.create(**args).choices[0].text  # type: ignore[call-overload]
    window = next(
        (text[i : i + 2] for i in range(3, len(text) - 2) if text[i : i + 2].isascii()), None
    )
    if window is None:
        pytest.skip("no ASCII pair to stop at in this sample")
    stopped = client.completions.create(**args, stop=[window, "\x00never"]).choices[0]
    assert stopped.text == text[: text.index(window)]
    assert stopped.finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(**args, stop=window, stream=True)
        if c.choices
    )
    assert streamed == stopped.text


def test_chat(client: openai.OpenAI, model: runtime.Model) -> None:
    messages = [
        {"role": "system", "content": "You are Shakespeare."},
        {"role": "user", "content": "Speak, Romeo."},
    ]
    completion = client.chat.completions.create(
        model=NAME,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
    )
    (choice,) = completion.choices
    assert completion.object == "chat.completion"
    assert choice.message.role == "assistant"
    prompt = render_chat([ChatMessage.model_validate(m) for m in messages])
    assert prompt == "System: You are Shakespeare.\nUser: Speak, Romeo.\nAssistant:"
    expected = model.generate(prompt, temperature=0, max_new_tokens=12, stop=[CHAT_STOP])
    assert choice.message.content == expected
    stream = client.chat.completions.create(
        model=NAME,
        messages=messages,  # type: ignore[arg-type]
        max_completion_tokens=12,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_chat_logprobs_and_n(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=5,
        n=2,
        seed=1,
        logprobs=True,
        top_logprobs=2,
    )
    assert sorted(c.index for c in completion.choices) == [0, 1]
    for choice in completion.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        for item in choice.logprobs.content:
            assert item.logprob <= 0 and len(item.top_logprobs) == 2
            assert item.bytes is not None


def test_errors_as_the_client_sees_them(client: openai.OpenAI, live: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=1000)
    assert too_long.value.code == "context_length_exceeded"
    assert "64" in str(too_long.value)
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.completions.create(model=NAME, prompt=PROMPT, best_of=2)
    assert "best_of" in str(unsupported.value)
    with pytest.raises(openai.BadRequestError) as unknown:
        client.completions.create(model=NAME, prompt=PROMPT, extra_body={"mirostat": 2})
    assert "mirostat" in str(unknown.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=NAME, prompt=PROMPT)


def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
