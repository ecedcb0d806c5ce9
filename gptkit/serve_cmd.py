"""`gptkit serve`: an OpenAI-compatible HTTP server with continuous batching (the serve extra).

The server itself lives in :mod:`gptkit.server` (FastAPI, uvicorn, sse-starlette,
prometheus-client); this module imports it only when the command runs, so ``--help`` stays light.
"""

from __future__ import annotations

import importlib.util
import logging
import signal
from pathlib import Path
from typing import Any

import click

from runtime.files import DEFAULT_MODEL

SERVE_MODULES = ("fastapi", "uvicorn", "sse_starlette", "prometheus_client")
MISSING_EXTRA = "gptkit serve needs the serve extra: pip install 'gptkit[serve]'"
MISSING_RAY = "gptkit serve --ray needs the ray extra: pip install 'gptkit[ray]'"
DEFAULT_MAX_BATCH = 8  # as runtime.engine's defaults (not imported: it loads onnxruntime)
DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_BODY = 1 << 20
DEFAULT_DRAIN_TIMEOUT = 30.0


def _positive(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None and value < 1:
        raise click.BadParameter(f"must be >= 1, got {value}")
    return value


@click.command("serve")
@click.argument("model", default=DEFAULT_MODEL, type=click.Path(dir_okay=False))
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: all)."
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--api-key",
    envvar="GPTKIT_API_KEY",
    help="Require `Authorization: Bearer KEY` on every route but /health [env: GPTKIT_API_KEY].",
)
@click.option(
    "--max-batch",
    default=DEFAULT_MAX_BATCH,
    show_default=True,
    callback=_positive,
    help="Slots: requests decoded together in one step.",
)
@click.option(
    "--max-queue",
    default=DEFAULT_MAX_QUEUE,
    show_default=True,
    callback=_positive,
    help="Requests that may wait for a slot; past it, 429.",
)
@click.option(
    "--threads",
    type=int,
    callback=_positive,
    help="ONNX Runtime threads [default: all cores; with --ray, 1 per replica].",
)
@click.option("--model-name", help="The name clients send as `model` [default: the file's stem].")
@click.option(
    "--cors-origin",
    multiple=True,
    help="Allow this origin (repeatable; '*' for any). CORS is off without it.",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--drain-timeout",
    default=DEFAULT_DRAIN_TIMEOUT,
    show_default=True,
    type=click.FloatRange(min=0),
    help="On SIGTERM/Ctrl-C, seconds requests in flight may run before they are cancelled.",
)
@click.option(
    "--max-body",
    default=DEFAULT_MAX_BODY,
    show_default=True,
    callback=_positive,
    help="Largest request body in bytes (413 past it).",
)
@click.option("--log-level", default="info", show_default=True, help="uvicorn's log level.")
@click.option(
    "--ray",
    "use_ray",
    is_flag=True,
    help="Serve on Ray Serve replicas (the ray extra): a local Ray cluster on loopback, or the "
    "one $RAY_ADDRESS names. The model must be at the same path on every node.",
)
@click.option(
    "--replicas",
    default=1,
    show_default=True,
    callback=_positive,
    help="With --ray: replicas, each its own engine with --threads threads.",
)
@click.option(
    "--autoscale",
    metavar="MIN:MAX",
    help="With --ray: let Ray Serve scale between MIN and MAX replicas (instead of --replicas).",
)
@click.option(
    "--target-ongoing-requests",
    type=click.FloatRange(min=0, min_open=True),
    help="With --autoscale: requests per replica Ray Serve aims at [default: --max-batch].",
)
def serve_command(
    model: str = DEFAULT_MODEL,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_queue: int = DEFAULT_MAX_QUEUE,
    threads: int | None = None,
    model_name: str | None = None,
    cors_origin: tuple[str, ...] = (),
    device: str = "cpu",
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    max_body: int = DEFAULT_MAX_BODY,
    log_level: str = "info",
    use_ray: bool = False,
    replicas: int = 1,
    autoscale: str | None = None,
    target_ongoing_requests: float | None = None,
) -> None:
    """Serve MODEL (default model.onnx) over OpenAI's HTTP API, batching requests.

    \b
      gptkit serve model.onnx
      curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"model": "model", "prompt": "ROMEO:", "max_tokens": 40}'
      open http://127.0.0.1:8000/   # the playground

    Routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, /tokenize,
    /detokenize, and a playground page at /.

    \b
    On Ray Serve (pip install 'gptkit[ray]'), the same routes, flags and port:
      gptkit serve model.onnx --ray --replicas 2 --threads 1
      gptkit serve model.onnx --ray --autoscale 1:4 --threads 2
    """
    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise click.ClickException(MISSING_EXTRA)
    if not use_ray and (replicas != 1 or autoscale or target_ongoing_requests):
        raise click.UsageError("--replicas, --autoscale and --target-ongoing-requests need --ray")
    if use_ray and importlib.util.find_spec("ray") is None:
        raise click.ClickException(MISSING_RAY)
    from runtime.errors import ModelFileError, require

    require("onnxruntime", extra=None, purpose="gptkit serve")
    path = Path(model)
    if not path.is_file():
        raise ModelFileError(
            f"model file {model} not found; export one with `gptkit export {model}`"
        )
    name = model_name or path.stem
    if use_ray:
        _serve_on_ray(
            path,
            name=name,
            host=host,
            port=port,
            api_key=api_key or None,
            max_batch=max_batch,
            max_queue=max_queue,
            threads=threads,
            cors_origin=cors_origin,
            device=device,
            drain_timeout=drain_timeout,
            max_body=max_body,
            log_level=log_level,
            replicas=replicas,
            autoscale=autoscale,
            target_ongoing_requests=target_ongoing_requests,
        )
        return
    import uvicorn

    from gptkit.server import ServerOptions, create_app
    from runtime.engine import Engine

    _log_to_stderr(log_level)
    failures: list[BaseException] = []
    servers: list[Any] = []  # the uvicorn server, once made (load_failed stops it)

    def load() -> Engine:
        engine = Engine.load(
            path, device=device, threads=threads, max_batch=max_batch, max_queue=max_queue
        )
        if engine.metadata.kv_cache != "inplace":
            click.echo(
                f"{path.name} has a concatenated KV cache: `gptkit export --kv-cache inplace` "
                "gives the faster batched cache",
                err=True,
            )
        return engine

    def load_failed(error: BaseException) -> None:
        failures.append(error)
        for server in servers:
            server.should_exit = True

    options = ServerOptions(
        model_name=name,
        api_key=api_key or None,
        cors_origins=tuple(cors_origin),
        max_body=max_body,
        drain_timeout=drain_timeout,
        on_load_error=load_failed,
    )
    app = create_app(load, options)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=int(drain_timeout) + 5,
        server_header=False,
    )
    server = _server_class()(config, app.state.gptkit)
    servers.append(server)
    auth = "an API key" if api_key else "no API key"
    click.echo(
        f"gptkit serve: {path} as '{name}' on http://{host}:{port} ({auth}; {max_batch} slots)",
        err=True,
    )
    server.run()
    if failures:
        error = failures[0]
        from runtime.errors import GptkitError

        if isinstance(error, GptkitError):
            raise error
        raise click.ClickException(f"the model failed to load: {error}")


def _serve_on_ray(
    path: Path,
    *,
    name: str,
    host: str,
    port: int,
    api_key: str | None,
    max_batch: int,
    max_queue: int,
    threads: int | None,
    cors_origin: tuple[str, ...],
    device: str,
    drain_timeout: float,
    max_body: int,
    log_level: str,
    replicas: int,
    autoscale: str | None,
    target_ongoing_requests: float | None,
) -> None:
    """`gptkit serve --ray`: the same app in Ray Serve replicas (gptkit.server.ray_serve)."""
    from gptkit.server import ServerOptions
    from gptkit.server import ray_serve as rs

    scale_range = None
    if autoscale is not None:
        try:
            scale_range = rs.parse_autoscale(autoscale)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--autoscale'") from None
    elif target_ongoing_requests is not None:
        raise click.UsageError("--target-ongoing-requests needs --autoscale")
    _log_to_stderr(log_level)
    spec = rs.EngineSpec(
        model=str(path.resolve()),  # the same path on every node (shared storage)
        device=device,
        threads=threads or rs.DEFAULT_THREADS,
        max_batch=max_batch,
        max_queue=max_queue,
    )
    options = ServerOptions(
        model_name=name,
        api_key=api_key,
        cors_origins=tuple(cors_origin),
        max_body=max_body,
        drain_timeout=drain_timeout,
    )
    scaling = rs.Scaling(
        replicas=replicas, autoscale=scale_range, target_ongoing_requests=target_ongoing_requests
    )
    rs.run(
        spec,
        options,
        scaling,
        host=host,
        port=port,
        log_level=log_level,
        echo=lambda line: click.echo(line, err=True),
    )


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, draining the engine on SIGTERM / Ctrl-C and exiting 0 after it.

        uvicorn re-raises a caught signal once it has shut down (so a SIGTERM'd process would
        die of it); gptkit finishes its work and exits normally instead.
        """

        def __init__(self, config: uvicorn.Config, state: Any) -> None:
            super().__init__(config)
            self.gptkit_state = state

        def handle_exit(self, sig: int, frame: Any) -> None:
            self.gptkit_state.begin_drain()  # new requests 503; running ones get drain_timeout
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    return Server


def _log_to_stderr(level: str) -> None:
    """The server's own log lines (errors with their tracebacks; never prompts) on stderr,
    formatted as uvicorn's."""
    logger = logging.getLogger("gptkit")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper() if level.upper() in logging._nameToLevel else "INFO")
