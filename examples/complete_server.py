"""Embedding gptkit's batching engine in another app: a standard-library HTTP service.

    python examples/complete_server.py --model model.onnx --port 8000
    curl -s localhost:8000/complete -d '{"prompt": "ROMEO:", "max_new_tokens": 40, "seed": 0}'

The web framework here is the standard library's, one thread per connection; what matters is
that every handler thread submits to one shared ``runtime.engine.Engine``, whose own thread
decodes all running requests together in one batched step. For an OpenAI-compatible server use
``gptkit serve`` instead; this file shows the few lines an app of your own needs.

POST /complete takes JSON: ``prompt`` plus any ``runtime.SamplingConfig`` field, and answers
``{"text", "finish_reason", "prompt_tokens", "completion_tokens"}``; a bad request gets 400 and
``{"error": "..."}``, the runtime's one-line message.
"""

from __future__ import annotations

import argparse
import json
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from runtime import GptkitError, SamplingConfig
from runtime.engine import Engine

MAX_BODY = 1 << 20


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server on (host, port) whose requests all share ``engine`` (started by the caller)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != "/complete":
                return self._reply(HTTPStatus.NOT_FOUND, {"error": "try POST /complete"})
            try:
                length = int(self.headers.get("Content-Length", "0"))
                if not 0 < length <= MAX_BODY:
                    raise ValueError(f"send a JSON body of 1 to {MAX_BODY} bytes")
                body = json.loads(self.rfile.read(length))
                prompt = body.pop("prompt")
                config = SamplingConfig(**body)  # checks every field, one-line errors
                request = engine.submit(
                    engine.tokenizer.encode(prompt) or [engine.tokenizer.eot_token], config
                )
                result = request.result()  # this thread waits; the engine batches
            except (GptkitError, ValueError, KeyError, TypeError) as e:
                return self._reply(HTTPStatus.BAD_REQUEST, {"error": str(e) or repr(e)})
            self._reply(
                HTTPStatus.OK,
                {
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": len(result.token_ids),
                },
            )

        def _reply(self, status: HTTPStatus, payload: dict[str, object]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # no prompts in the log
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="model.onnx")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args()
    with Engine.load(args.model, max_batch=args.max_batch) as engine:
        server = make_server(engine, args.host, args.port)
        print(f"serving {args.model} on http://{args.host}:{args.port}/complete")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
