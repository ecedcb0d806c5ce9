"""OpenAI's wire format: request models (pydantic), the chat template, and response builders.

Requests are validated strictly: a field this server does not know is a 400 that names it, and a
known field it cannot honour (``best_of`` > 1, ``suffix``, ``echo`` with ``logprobs``) is a 400
that says so, never silently ignored. Defaults are OpenAI's: ``max_tokens`` 16 for completions
(what fits in the context for chat), ``temperature`` 1, ``top_p`` 1, ``n`` 1.

The chat template (these are base models, trained on plain text, not on conversations): each
message becomes ``"{Role}: {content}\\n"`` with Role one of System, User, Assistant (``developer``
renders as System), and the prompt ends with ``"Assistant:"``. Generation stops at ``"\\nUser:"``
(the model starting the user's next turn) besides any ``stop`` the request gives.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from gptkit.server.errors import APIError
from runtime.tokenizer import Tokenizer

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_CHOICES = 128  # OpenAI's limit on n
MAX_STOPS = 16
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions
MAX_CHAT_LOGPROBS = 20  # and for chat's top_logprobs

CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_PROMPT_END = "Assistant:"
CHAT_STOP = "\nUser:"

M = TypeVar("M", bound="BaseModel")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # padding against length side channels: not sent


class _Sampling(_Strict):
    """The sampling fields both endpoints share."""

    # Optional, as in llama.cpp's server and vLLM: one server serves one model. A name that is
    # given must be that model's.
    model: StrictStr | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extras (llama.cpp and vLLM accept them too)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = Field(default=None, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_CHAT_LOGPROBS)


class TokenizeRequest(_Strict):
    content: StrictStr | None = None
    prompt: StrictStr | None = None  # vLLM's name for the same field
    add_special: bool | None = None  # llama.cpp's: gptkit adds no BOS; accepted, no effect


class DetokenizeRequest(_Strict):
    tokens: list[StrictInt]


def parse(model: type[M], body: Any) -> M:
    """``body`` as ``model``; a validation error becomes one 400 naming the field(s)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None


def validation_error(errors: Sequence[Any]) -> APIError:
    """One 400 from pydantic's (or FastAPI's) error list: unknown fields first, all named."""
    unknown = [_loc(e["loc"]) for e in errors if e.get("type") == "extra_forbidden"]
    if unknown:
        return APIError(
            400,
            f"unsupported field{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)} "
            "(this server does not implement it)",
            param=unknown[0],
            code="unsupported_field",
        )
    first = errors[0]
    loc = _loc(first.get("loc", ()))
    message = f"{loc}: {first.get('msg', 'invalid value')}" if loc else first.get("msg", "")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return APIError(400, message, param=loc or None)


def _loc(loc: Sequence[Any]) -> str:
    # pydantic reports which member of a union failed ("str", "list[int]", ...): not a field name
    parts = [
        str(p)
        for p in loc
        if p not in ("body",) and not (isinstance(p, str) and ("[" in p or p in ("str", "int")))
    ]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out


# ---- prompts and sampling ---------------------------------------------------------------------


@dataclass
class Prompt:
    ids: list[int]
    text: str  # for echo


def completion_prompts(req: CompletionRequest, tokenizer: Tokenizer) -> list[Prompt]:
    """The request's prompts as token ids: a string, strings, ids or lists of ids."""
    raw = req.prompt
    if isinstance(raw, str):
        items: list[str | list[int]] = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [list(raw)]  # type: ignore[arg-type]  # list[int], checked above
    else:
        items = list(raw)  # type: ignore[arg-type]  # list[str] or list[list[int]]
    if not items:
        raise APIError(400, "prompt must not be empty", param="prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            prompts.append(Prompt(text_ids(tokenizer, item), item))
        else:
            if not item:
                raise APIError(400, "a prompt of token ids must not be empty", param="prompt")
            bad = [i for i in item if not 0 <= i < tokenizer.n_vocab]
            if bad:
                raise APIError(
                    400,
                    f"token id {bad[0]} is outside this model's vocabulary "
                    f"(0..{tokenizer.n_vocab - 1})",
                    param="prompt",
                )
            prompts.append(Prompt(list(item), tokenizer.decode(item)))
    return prompts


def text_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a text prompt; an empty prompt starts a new document (<|endoftext|>), as in
    ``gptkit run``."""
    ids = tokenizer.encode(text)
    if ids:
        return ids
    if tokenizer.eot_token < 0:
        raise APIError(400, "prompt is empty and this model has no <|endoftext|>", param="prompt")
    return [tokenizer.eot_token]


def check_unsupported(req: CompletionRequest) -> None:
    """Known OpenAI fields this server cannot honour: a 400 naming each."""
    if req.best_of not in (None, 1):
        raise APIError(400, "best_of other than 1 is not supported", param="best_of")
    if req.suffix:
        raise APIError(
            400, "suffix is not supported (these are left-to-right models)", param="suffix"
        )
    if req.echo and req.logprobs is not None:
        raise APIError(
            400,
            "echo with logprobs is not supported (the engine does not score the prompt)",
            param="echo",
        )


def check_stream_options(req: _Sampling) -> None:
    if req.stream_options is not None and not req.stream:
        raise APIError(
            400, "stream_options is only allowed when stream is true", param="stream_options"
        )


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop takes at most {MAX_STOPS} strings", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    return tuple(stops)


def sampling_kwargs(
    req: _Sampling, *, max_new_tokens: int | None, stop: tuple[str, ...], n_vocab: int
) -> dict[str, Any]:
    """Keyword arguments of ``runtime.sampling.SamplingConfig`` for the request.

    The penalties and the logit bias are passed only when they change something, so an engine
    whose SamplingConfig lacks them still serves requests that do not use them.
    """
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "seed": req.seed,
        "stop": stop,
    }
    if req.top_k is not None:
        kwargs["top_k"] = req.top_k
    if req.min_p is not None:
        kwargs["min_p"] = req.min_p
    if req.repetition_penalty is not None:
        kwargs["repetition_penalty"] = req.repetition_penalty
    if req.presence_penalty:
        kwargs["presence_penalty"] = req.presence_penalty
    if req.frequency_penalty:
        kwargs["frequency_penalty"] = req.frequency_penalty
    if req.logit_bias:
        kwargs["logit_bias"] = logit_bias(req.logit_bias, n_vocab)
    return kwargs


def logit_bias(bias: dict[str, float], n_vocab: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` as sorted (id, bias) pairs, checked."""
    pairs = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(
                400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
        if not 0 <= token < n_vocab:
            raise APIError(
                400,
                f"logit_bias token id {token} is outside this model's vocabulary (0..{n_vocab - 1})",
                param="logit_bias",
            )
        if not -100 <= value <= 100:
            raise APIError(
                400, f"logit_bias values must be in [-100, 100], got {value}", param="logit_bias"
            )
        pairs.append((token, float(value)))
    return tuple(sorted(pairs))


def render_chat(messages: Sequence[ChatMessage]) -> str:
    """The documented plain-text chat template (see the module docstring)."""
    lines = [f"{CHAT_ROLES[m.role]}: {m.text()}\n" for m in messages]
    return "".join(lines) + CHAT_PROMPT_END


# ---- responses ----------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def token_string(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as text for logprobs: its UTF-8 text, or ``bytes:\\xNN...`` when its bytes are
    not whole characters (so different partial tokens never share a key)."""
    data = tokenizer.token_bytes(token_id)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


@dataclass
class ChoiceState:
    """What one choice has produced so far (the non-stream responses and the usage count)."""

    index: int
    prompt_index: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # characters of text before each token
    finish_reason: str | None = None


def finish_reason(engine_reason: str | None) -> str | None:
    """OpenAI's finish_reason from the engine's: eot and stop strings are both "stop"."""
    if engine_reason in ("stop", "eot"):
        return "stop"
    return engine_reason


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(
    tokenizer: Tokenizer, choice: ChoiceState, start: int = 0, offset_base: int = 0
) -> dict[str, Any]:
    """OpenAI's completions ``logprobs`` object for the choice's tokens from ``start`` on."""
    ids = choice.tokens[start:]
    return {
        "tokens": [token_string(tokenizer, t) for t in ids],
        "token_logprobs": choice.logprobs[start:],
        "top_logprobs": [
            {token_string(tokenizer, t): lp for t, lp in top} for top in choice.top_logprobs[start:]
        ],
        "text_offset": [offset_base + o for o in choice.offsets[start:]],
    }


def chat_logprobs(tokenizer: Tokenizer, choice: ChoiceState, start: int = 0) -> dict[str, Any]:
    """OpenAI's chat ``logprobs`` object (``content``: one entry per token)."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {
            "token": token_string(tokenizer, token_id),
            "logprob": logprob,
            "bytes": list(tokenizer.token_bytes(token_id)),
        }

    content = []
    for t, lp, top in zip(
        choice.tokens[start:], choice.logprobs[start:], choice.top_logprobs[start:], strict=True
    ):
        item = entry(t, lp)
        item["top_logprobs"] = [entry(i, v) for i, v in top]
        content.append(item)
    return {"content": content, "refusal": None}
