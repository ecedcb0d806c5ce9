"""The ASGI app: OpenAI's routes on top of the continuous-batching engine.

``create_app(engine, options)`` takes an engine, or a function that builds one (called on a
background thread at startup, so ``/health`` answers 503 while the model loads and 200 once it is
ready). Any ASGI server runs the result; ``gptkit serve`` runs it under uvicorn, and a Ray Serve
replica can wrap the same app.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics``, ``POST /tokenize``, ``POST /detokenize``, and the playground
page at ``GET /``. Every error is OpenAI's envelope; an unexpected exception is a 500 with a
generic message (the traceback goes to the server's log, never to the client). Prompts are never
logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gptkit.server import openai_api as oa
from gptkit.server.bridge import Generation, engine_error, error_event
from gptkit.server.errors import APIError, error_body
from gptkit.server.metrics import CONTENT_TYPE, Metrics
from gptkit.server.options import ServerOptions
from runtime.sampling import SamplingConfig

if TYPE_CHECKING:
    from runtime.engine import Engine

log = logging.getLogger("gptkit.server")

ROUTES = (
    "/",
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
    "/detokenize",
)
OPEN_ROUTES = frozenset({"/health", "/"})  # no API key: the probe, and the static page
CLIENT_GONE = 499  # nginx's "client closed request": recorded in the metrics, sent to nobody


class ServerState:
    """The engine's life: loading (on a thread), ready, draining, closed."""

    def __init__(self, engine: Engine | Callable[[], Engine], options: ServerOptions) -> None:
        self.options = options
        self._source = engine
        self.engine: Engine | None = None
        self.load_error: BaseException | None = None
        self.draining = False
        self._lock = threading.Lock()
        self._loader: threading.Thread | None = None
        self._closer: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def start_loading(self) -> None:
        self._loader = threading.Thread(target=self._load, name="gptkit-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            source = self._source
            engine: Engine = source() if callable(source) else source
            engine.start()
        except BaseException as e:
            log.error("the model failed to load: %s", e)
            self.load_error = e
            if self.options.on_load_error is not None:
                self.options.on_load_error(e)
            return
        with self._lock:
            self.engine = engine
            draining = self.draining
        if draining:  # shut down while loading
            engine.close(0.0)
        else:
            log.info("model ready")

    def begin_drain(self) -> None:
        """Stop accepting requests; the engine finishes those in flight within the drain timeout
        (then cancels the rest). Returns at once; safe to call more than once."""
        with self._lock:
            if self.draining:
                return
            self.draining = True
            engine = self.engine
        if engine is not None:
            self._closer = threading.Thread(
                target=engine.close, args=(self.options.drain_timeout,), name="gptkit-drain"
            )
            self._closer.start()

    def close(self) -> None:
        """Drain (if not begun) and wait for the engine to stop (and for a load in progress,
        whose engine is closed as soon as it is made)."""
        self.begin_drain()
        if self._loader is not None:
            self._loader.join()
        if self._closer is not None:
            self._closer.join()

    # ---- per request --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def require_engine(self) -> Engine:
        engine = self.engine
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if engine is None:
            if self.load_error is not None:
                raise APIError(503, "the model failed to load; see the server's log")
            raise APIError(
                503,
                "the model is loading; retry when /health answers 200",
                code="loading",
                headers={"Retry-After": "1"},
            )
        return engine

    def stats(self) -> Any:
        engine = self.engine
        return engine.stats() if engine is not None else None


def create_app(engine: Engine | Callable[[], Engine], options: ServerOptions) -> FastAPI:
    """An OpenAI-compatible ASGI app serving ``engine`` (or what the factory builds)."""
    state = ServerState(engine, options)
    metrics = Metrics(state.stats)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        yield
        await asyncio.to_thread(state.close)

    app = FastAPI(
        title="gptkit",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.gptkit = state
    app.state.metrics = metrics

    # Middleware, innermost first: the API key, the metrics (so 401s are counted), then CORS
    # outermost (browsers' preflight requests carry no key).
    if options.api_key:
        app.add_middleware(ApiKeyMiddleware, key=options.api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if options.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(options.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    _add_error_handlers(app)

    # ---- routes -------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        if state.ready:
            return JSONResponse({"status": "ok"})
        try:
            state.require_engine()
        except APIError as e:
            return _error_response(e)
        raise AssertionError("unreachable")  # pragma: no cover

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> Response:
        _check_model(options, name)
        return JSONResponse(_model_card(state))

    @app.get("/", response_model=None)
    async def playground() -> Response:
        if options.playground.is_file():
            return FileResponse(options.playground, media_type="text/html")
        return HTMLResponse(
            "<!doctype html><title>gptkit</title><p>The playground page is not installed. "
            "The API is at <code>/v1/completions</code>.</p>",
            status_code=404,
        )

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        req = oa.parse(oa.TokenizeRequest, await read_json(request, options.max_body))
        text = req.content if req.content is not None else req.prompt
        if text is None:
            raise APIError(400, "send the text as 'content'", param="content")
        engine = state.require_engine()
        return JSONResponse({"tokens": engine.tokenizer.encode(text)})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        req = oa.parse(oa.DetokenizeRequest, await read_json(request, options.max_body))
        tokenizer = state.require_engine().tokenizer
        bad = [t for t in req.tokens if not 0 <= t < tokenizer.n_vocab]
        if bad:
            raise APIError(
                400,
                f"token id {bad[0]} is outside this model's vocabulary (0..{tokenizer.n_vocab - 1})",
                param="tokens",
            )
        return JSONResponse({"content": tokenizer.decode(req.tokens)})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = oa.parse(oa.CompletionRequest, await read_json(request, options.max_body))
        _check_model(options, req.model)
        oa.check_unsupported(req)
        oa.check_stream_options(req)
        engine = state.require_engine()
        prompts = oa.completion_prompts(req, engine.tokenizer)
        config = _sampling(
            req,
            max_new_tokens=req.max_tokens or oa.DEFAULT_COMPLETION_TOKENS,
            stop=oa.stop_strings(req.stop),
            n_vocab=engine.tokenizer.n_vocab,
        )
        n = req.n or 1
        gen = Generation(engine, metrics)
        for prompt in prompts:
            for i in range(n):
                gen.submit(prompt.ids, config, top_logprobs=req.logprobs, seed_row=i)
        call = _Call(
            kind="completion",
            id=oa.new_id("cmpl"),
            model=options.model_name,
            prompts=prompts,
            n=n,
            echo=bool(req.echo),
            logprobs=req.logprobs is not None,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            tokenizer=engine.tokenizer,
        )
        if req.stream:
            return _sse(call.stream(gen), options)
        return await _respond(request, gen, call)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = oa.parse(oa.ChatCompletionRequest, await read_json(request, options.max_body))
        _check_model(options, req.model)
        oa.check_stream_options(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        engine = state.require_engine()
        text = oa.render_chat(req.messages)
        prompt = oa.Prompt(oa.text_ids(engine.tokenizer, text), text)
        config = _sampling(
            req,
            max_new_tokens=req.max_completion_tokens or req.max_tokens,
            stop=(oa.CHAT_STOP, *oa.stop_strings(req.stop)),
            n_vocab=engine.tokenizer.n_vocab,
        )
        n = req.n or 1
        gen = Generation(engine, metrics, param="messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        for i in range(n):
            gen.submit(prompt.ids, config, top_logprobs=top, seed_row=i)
        call = _Call(
            kind="chat",
            id=oa.new_id("chatcmpl"),
            model=options.model_name,
            prompts=[prompt],
            n=n,
            echo=False,
            logprobs=top is not None,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            tokenizer=engine.tokenizer,
        )
        if req.stream:
            return _sse(call.stream(gen), options)
        return await _respond(request, gen, call)

    return app


# ---- the two generation routes' shared work -------------------------------------------------


def _sampling(req: Any, *, max_new_tokens: int | None, stop: tuple[str, ...], n_vocab: int) -> Any:
    kwargs = oa.sampling_kwargs(req, max_new_tokens=max_new_tokens, stop=stop, n_vocab=n_vocab)
    try:
        return SamplingConfig(**kwargs)
    except Exception as e:  # ConfigError: a value out of range; TypeError: an unknown field
        raise engine_error(e) from None


class _Call:
    """One completion or chat call: turns engine events into OpenAI's responses or chunks."""

    def __init__(
        self,
        *,
        kind: str,
        id: str,
        model: str,
        prompts: list[oa.Prompt],
        n: int,
        echo: bool,
        logprobs: bool,
        include_usage: bool,
        tokenizer: Any,
    ) -> None:
        self.kind, self.id, self.model = kind, id, model
        self.created = oa.now()
        self.prompts, self.n, self.echo, self.logprobs = prompts, n, echo, logprobs
        self.include_usage = include_usage
        self.tokenizer = tokenizer
        self.choices = [
            oa.ChoiceState(index=p * n + i, prompt_index=p)
            for p in range(len(prompts))
            for i in range(n)
        ]

    @property
    def object(self) -> str:
        return "text_completion" if self.kind == "completion" else "chat.completion"

    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)

    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

    def usage(self) -> dict[str, int]:
        return oa.usage(self.prompt_tokens(), self.completion_tokens())

    def record(self, index: int, event: Any) -> oa.ChoiceState:
        choice = self.choices[index]
        if event.token_id is not None:
            choice.offsets.append(len(choice.text))
            choice.tokens.append(event.token_id)
            if self.logprobs:
                choice.logprobs.append(event.logprob)
                choice.top_logprobs.append(tuple(event.top_logprobs))
        choice.text += event.text
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
        return choice

    # ---- whole responses ----------------------------------------------------------------------

    def response(self) -> dict[str, Any]:
        choices = []
        for c in self.choices:
            if self.kind == "completion":
                prefix = self.prompts[c.prompt_index].text if self.echo else ""
                choices.append(
                    {
                        "text": prefix + c.text,
                        "index": c.index,
                        "logprobs": oa.completion_logprobs(self.tokenizer, c)
                        if self.logprobs
                        else None,
                        "finish_reason": oa.finish_reason(c.finish_reason),
                    }
                )
            else:
                choices.append(
                    {
                        "index": c.index,
                        "message": {"role": "assistant", "content": c.text, "refusal": None},
                        "logprobs": oa.chat_logprobs(self.tokenizer, c) if self.logprobs else None,
                        "finish_reason": oa.finish_reason(c.finish_reason),
                    }
                )
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
            "usage": self.usage(),
        }

    # ---- streams ------------------------------------------------------------------------------

    def _chunk(self, choice: dict[str, Any]) -> str:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion" if self.kind == "completion" else "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [choice],
        }
        if self.include_usage:
            chunk["usage"] = None
        return json.dumps(chunk)

    def _piece(
        self, c: oa.ChoiceState, text: str, start: int, finish: str | None
    ) -> dict[str, Any]:
        """One choice's delta: ``text`` and the tokens from ``start`` on."""
        has_tokens = self.logprobs and start < len(c.tokens)
        if self.kind == "completion":
            return {
                "text": text,
                "index": c.index,
                "logprobs": oa.completion_logprobs(self.tokenizer, c, start)
                if has_tokens
                else None,
                "finish_reason": finish,
            }
        return {
            "index": c.index,
            "delta": {"content": text} if text or has_tokens else {},
            "logprobs": oa.chat_logprobs(self.tokenizer, c, start) if has_tokens else None,
            "finish_reason": finish,
        }

    async def stream(self, gen: Generation) -> AsyncIterator[str]:
        """SSE data lines: chunks as tokens come, usage (if asked), then ``[DONE]``."""
        try:
            for c in self.choices:  # opening chunks: chat's role, completions' echoed prompt
                if self.kind == "chat":
                    yield self._chunk(
                        {
                            "index": c.index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    )
                elif self.echo:
                    yield self._chunk(
                        self._piece(c, self.prompts[c.prompt_index].text, len(c.tokens), None)
                    )
            sent = [0] * len(self.choices)  # tokens of each choice already sent (logprobs)
            async for index, event in gen.events():
                c = self.record(index, event)
                if event.finish_reason in ("cancelled", "error"):
                    gen.cancel()
                    yield json.dumps(_stream_failure(event))
                    yield "[DONE]"
                    return
                if event.text:  # a token whose text is held back goes out with the next text
                    yield self._chunk(self._piece(c, event.text, sent[index], None))
                    sent[index] = len(c.tokens)
                if event.finish_reason is not None:
                    finish = oa.finish_reason(event.finish_reason)
                    yield self._chunk(self._piece(c, "", sent[index], finish))
                    sent[index] = len(c.tokens)
            if self.include_usage:
                yield json.dumps(
                    {
                        "id": self.id,
                        "object": "text_completion"
                        if self.kind == "completion"
                        else "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "system_fingerprint": None,
                        "choices": [],
                        "usage": self.usage(),
                    }
                )
            yield "[DONE]"
        except Exception:
            log.exception("a stream failed")
            yield json.dumps(error_event())
            yield "[DONE]"
        finally:
            gen.cancel()  # the client went away, or an error: free the slots


def _stream_failure(event: Any) -> dict[str, Any]:
    if event.finish_reason == "cancelled":
        return APIError(503, "the request was cancelled: the server is shutting down").body()
    log.error("generation failed: %s", event.error)
    return error_event()


def _sse(lines: AsyncIterator[str], options: ServerOptions) -> EventSourceResponse:
    async def events() -> AsyncIterator[ServerSentEvent]:
        async for line in lines:
            yield ServerSentEvent(data=line)

    # The grace period lets a stream finish while the server drains (the engine ends it in time).
    return EventSourceResponse(
        events(), sep="\n", ping=15, shutdown_grace_period=options.drain_timeout + 1
    )


async def _respond(request: Request, gen: Generation, call: _Call) -> Response:
    """Collect a non-stream call's events; a client that goes away cancels its requests."""

    async def collect() -> None:
        async for index, event in gen.events():
            call.record(index, event)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    collecting = asyncio.ensure_future(collect())
    watching = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not collecting.done():
            collecting.cancel()
            gen.cancel()
    if not collecting.done() or collecting.cancelled():
        return Response(status_code=CLIENT_GONE)
    collecting.result()
    reasons = {c.finish_reason for c in call.choices}
    if "cancelled" in reasons:
        raise APIError(503, "the request was cancelled: the server is shutting down")
    if "error" in reasons:
        raise RuntimeError("the engine reported a generation error")
    return JSONResponse(call.response())


# ---- requests in, errors out ------------------------------------------------------------------


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 413 past ``limit`` bytes (by Content-Length, or counted as it streams),
    400 for anything that is not JSON."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    if not body:
        raise APIError(400, "the request needs a JSON body")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the body is not valid JSON ({type(e).__name__})") from None


def _too_large(limit: int) -> APIError:
    return APIError(
        413, f"the request body is larger than {limit} bytes (--max-body)", code="body_too_large"
    )


def _check_model(options: ServerOptions, name: str | None) -> None:
    if name is not None and name != options.model_name:
        raise APIError(
            404,
            f"The model '{name}' does not exist; this server serves '{options.model_name}'",
            param="model",
            code="model_not_found",
        )


def _model_card(state: ServerState) -> dict[str, Any]:
    card: dict[str, Any] = {
        "id": state.options.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "gptkit",
    }
    engine = state.engine
    if engine is not None:
        card["max_model_len"] = engine.block_size
        card["meta"] = {
            "n_vocab": engine.tokenizer.n_vocab,
            "n_ctx": engine.block_size,
            "slots": engine.max_batch,
            "kv_cache": engine.metadata.kv_cache,
        }
    return card


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return _error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        message = {
            404: f"no route {request.url.path}",
            405: f"method {request.method} is not allowed on {request.url.path}",
        }.get(status, str(exc.detail))
        headers = dict(exc.headers) if exc.headers else None
        return _error_response(APIError(status, message, headers=headers))

    async def validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return _error_response(oa.validation_error(list(exc.errors())))

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected error on %s", request.url.path, exc_info=exc)
        return JSONResponse(
            error_body("internal server error; see the server's log", type="server_error"),
            status_code=500,
        )

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(Exception, unexpected)


# ---- ASGI middleware (plain ASGI: no buffering, streams pass straight through) ----------------


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: list[Any]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class ApiKeyMiddleware:
    """``Authorization: Bearer KEY`` on every route but the open ones (constant-time compare)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_ROUTES:
            header = Headers(scope=scope).get("authorization", "")
            scheme, _, token = header.partition(" ")
            good = scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode(), self.key
            )
            if not good:
                message = (
                    "invalid API key" if header else "missing API key (Authorization: Bearer KEY)"
                )
                body = error_body(message, type="invalid_request_error", code="invalid_api_key")
                await _send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class MetricsMiddleware:
    """Counts every HTTP response by route (unknown paths as "other") and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = (
            path
            if path in ROUTES
            else ("/v1/models" if path.startswith("/v1/models/") else "other")
        )
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(route=route, status=str(status[0])).inc()
