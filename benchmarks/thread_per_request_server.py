"""The serve benchmark's no-batching baseline: one thread per request over one shared Model.

This was gptkit's example server before the batching engine; benchmarks/serve.py measures it
beside `gptkit serve` to show what continuous batching buys.

    python benchmarks/thread_per_request_server.py --model model.onnx --port 8000
    curl -s localhost:8000/complete -d '{"prompt": "ROMEO:", "max_new_tokens": 40, "seed": 0}'
    curl -sN localhost:8000/complete -d '{"prompt": "ROMEO:", "stream": true}'

POST /complete takes JSON: ``prompt`` plus any sampling option of ``runtime.SamplingConfig``
(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop) and
``"stream": true`` for a plain-text stream of the pieces as they are generated. It answers
``{"text", "finish_reason", "prompt_tokens", "completion_tokens"}``; a bad request gets 400 and
``{"error": "..."}``, the runtime's one-line message. GET /health describes the model.

One loaded model serves every request: the server runs one thread per request, and a
``runtime.Model`` is safe to share between threads. Needs only `pip install gptkit` (no PyTorch).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import runtime

MAX_BODY = 1 << 20  # 1 MiB of JSON is plenty for a prompt


def make_server(
    model: runtime.Model, host: str = "127.0.0.1", port: int = 8000
) -> ThreadingHTTPServer:
    """An HTTP server bound to (host, port) that completes text with ``model``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path != "/health":
                return self._json(
                    HTTPStatus.NOT_FOUND, {"error": "try POST /complete or GET /health"}
                )
            self._json(HTTPStatus.OK, {"model": repr(model), "block_size": model.block_size})

        def do_POST(self) -> None:
            if self.path != "/complete":
                return self._json(HTTPStatus.NOT_FOUND, {"error": "try POST /complete"})
            try:
                length = int(self.headers.get("Content-Length", "0"))
                if not 0 < length <= MAX_BODY:
                    raise ValueError(f"send a JSON body of 1 byte to {MAX_BODY} bytes")
                request = json.loads(self.rfile.read(length))
                if not isinstance(request, dict) or not isinstance(request.get("prompt"), str):
                    raise ValueError('send a JSON object with a "prompt" string')
                prompt = request.pop("prompt")
                stream = bool(request.pop("stream", False))
                if stream:
                    pieces = model.stream(prompt, **request)  # raises here on bad options
                else:
                    result = model.complete(prompt, **request)
            except (ValueError, runtime.GptkitError) as e:  # GptkitError: the runtime's message
                return self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            if stream:
                return self._stream(pieces)
            self._json(
                HTTPStatus.OK,
                {
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": len(result.token_ids),
                },
            )

        def _stream(self, pieces: Iterable[str]) -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for piece in pieces:  # whole UTF-8 characters only: safe to send as they come
                    data = piece.encode("utf-8")
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client left; generation stops with the loop

        def _json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
            pass  # keep the console for errors

    return ThreadingHTTPServer((host, port), Handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="model.onnx", help="exported .onnx file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads per request")
    args = parser.parse_args()
    try:
        model = runtime.load(args.model, threads=args.threads)
    except runtime.GptkitError as e:
        raise SystemExit(f"Error: {e}") from None
    server = make_server(model, args.host, args.port)
    print(f"serving {model} on http://{args.host}:{server.server_port}/complete (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
