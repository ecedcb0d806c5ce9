"""`gptkit serve --ray`: the same server as Ray Serve replicas (the ``ray`` extra).

Each replica is a ``@serve.deployment`` whose ingress is the app :func:`gptkit.server.create_app`
builds, around its own :class:`~runtime.engine.Engine`; Ray Serve's HTTP proxy listens on
``--host``/``--port`` and spreads requests over the replicas. So the routes, the API key, CORS,
the errors, the metrics and the cancellation of a request whose client went away are those of
plain ``gptkit serve``; every response also carries ``x-gptkit-replica: <replica id>``.

The model file reaches a replica by path: every node that may run a replica must see the same
file at the same absolute path (shared storage, or a copy at that path), with gptkit installed.

Two ways in:

* ``gptkit serve MODEL --ray --replicas N`` (or ``--autoscale MIN:MAX``): starts a local Ray
  cluster on loopback (no dashboard), or joins the cluster ``RAY_ADDRESS`` names, deploys, and
  serves until SIGTERM / Ctrl-C, then shuts Serve and Ray down and exits 0. :func:`run`.
* ``serve run examples/ray_serve.yaml`` on a cluster: the config names :func:`app_builder`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from gptkit.server.options import DEFAULT_DRAIN_TIMEOUT, DEFAULT_MAX_BODY, ServerOptions

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from runtime.engine import Engine

APP_NAME = "gptkit"
DEPLOYMENT_NAME = "gptkit"
REPLICA_HEADER = "x-gptkit-replica"
DEFAULT_THREADS = 1  # ONNX Runtime threads per replica (and the CPUs Ray reserves for it)
DEFAULT_MAX_BATCH = 8  # as runtime.engine's defaults
DEFAULT_MAX_QUEUE = 64

log = logging.getLogger("gptkit.server")


@dataclass(frozen=True)
class EngineSpec:
    """What each replica loads: the model by path (shared storage) and the engine's settings."""

    model: str  # an absolute path, the same on every node
    device: str = "cpu"
    threads: int = DEFAULT_THREADS
    max_batch: int = DEFAULT_MAX_BATCH
    max_queue: int = DEFAULT_MAX_QUEUE

    def load(self) -> Engine:
        from runtime.engine import Engine

        return Engine.load(
            self.model,
            device=self.device,
            threads=self.threads,
            max_batch=self.max_batch,
            max_queue=self.max_queue,
        )


@dataclass(frozen=True)
class Scaling:
    """A fixed replica count, or Ray Serve's autoscaling between ``autoscale`` = (min, max).

    target_ongoing_requests: the requests (running and queued) per replica the autoscaler aims
    at; by default the engine's slots (``--max-batch``), so replicas are added once every slot
    of every replica is busy.
    """

    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    target_ongoing_requests: float | None = None


def deployment_options(
    spec: EngineSpec, scaling: Scaling, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
) -> dict[str, Any]:
    """The ``@serve.deployment`` options of the gptkit replicas."""
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        # the CPUs Ray reserves for a replica: its ONNX Runtime threads
        "ray_actor_options": {"num_cpus": spec.threads} if spec.device == "cpu" else {},
        # a replica takes what its engine takes (slots + queue; past it, the engine's 429), and
        # Ray's router picks the less busy of two replicas for each request
        "max_ongoing_requests": spec.max_batch + spec.max_queue,
        # on shutdown, requests in flight get the drain timeout (the engine then cancels them)
        "graceful_shutdown_timeout_s": drain_timeout + 5,
    }
    if spec.device == "cuda":
        options["ray_actor_options"] = {"num_cpus": spec.threads, "num_gpus": 1}
    if scaling.autoscale is not None:
        low, high = scaling.autoscale
        options["autoscaling_config"] = {
            "min_replicas": low,
            "initial_replicas": max(low, 1),
            "max_replicas": high,
            "target_ongoing_requests": scaling.target_ongoing_requests or spec.max_batch,
        }
    else:
        options["num_replicas"] = scaling.replicas
    return options


def replica_id() -> str:
    """This replica's id in Ray Serve (its actor's name ends with it); "" outside a replica."""
    try:
        from ray import serve

        context = serve.get_replica_context()
    except Exception:
        return ""
    rid = getattr(context, "replica_id", None)
    if rid is not None:
        return str(getattr(rid, "unique_id", rid))
    return str(getattr(context, "replica_tag", ""))


class ReplicaHeaderMiddleware:
    """Adds ``x-gptkit-replica: <id>`` to every HTTP response (which replica answered)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, sending)


def replica_app(spec: EngineSpec, server: ServerOptions) -> Any:
    """What one replica serves: the engine, loaded here (a bad file fails the replica's start,
    so Ray reports it), inside the app ``create_app`` builds."""
    from gptkit.server.app import create_app

    engine = spec.load()
    app = create_app(engine, server)
    app.add_middleware(ReplicaHeaderMiddleware, replica=replica_id())
    return app


def build_app(
    spec: EngineSpec,
    server: ServerOptions,
    scaling: Scaling,
) -> Any:
    """The Ray Serve application (``serve.run`` it, or return it from a ``serve run`` builder)."""
    from ray import serve

    if server.on_load_error is not None:  # runs in the driver only; replicas fail on their own
        server = ServerOptions(**{**server.__dict__, "on_load_error": None})

    def build() -> Any:  # on the replica, when it starts (cloudpickled with spec and server)
        return replica_app(spec, server)

    class GptkitReplica:
        """One engine behind the gptkit app; Ray restarts a replica whose engine is gone."""

        def check_health(self) -> None:
            app: Any = getattr(self, "app", None)
            state = app.state.gptkit if app is not None else None
            if state is not None and state.load_error is not None:
                raise RuntimeError(f"the engine failed to start: {state.load_error}")

    ingress = serve.ingress(build)(GptkitReplica)
    deployment: Any = serve.deployment(**deployment_options(spec, scaling, server.drain_timeout))
    return deployment(ingress).bind()


def app_builder(args: dict[str, Any]) -> Any:
    """For ``serve run`` config files (``import_path: gptkit.server.ray_serve:app_builder``).

    ``args`` takes the flags of ``gptkit serve`` with underscores: model (required; the same
    path on every node), model_name, api_key (or $GPTKIT_API_KEY on the replicas), threads,
    max_batch, max_queue, device, cors_origin (a list), max_body, drain_timeout, replicas,
    autoscale ("MIN:MAX") and target_ongoing_requests.
    """
    known = {
        "model",
        "model_name",
        "api_key",
        "threads",
        "max_batch",
        "max_queue",
        "device",
        "cors_origin",
        "max_body",
        "drain_timeout",
        "replicas",
        "autoscale",
        "target_ongoing_requests",
    }
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown gptkit args: {', '.join(unknown)} (known: {sorted(known)})")
    if "model" not in args:
        raise ValueError("args.model is required: the model file's path on every node")
    model = str(Path(args["model"]).expanduser().resolve())
    spec = EngineSpec(
        model=model,
        device=str(args.get("device", "cpu")),
        threads=int(args.get("threads", DEFAULT_THREADS)),
        max_batch=int(args.get("max_batch", DEFAULT_MAX_BATCH)),
        max_queue=int(args.get("max_queue", DEFAULT_MAX_QUEUE)),
    )
    origins = args.get("cors_origin") or ()
    server = ServerOptions(
        model_name=str(args.get("model_name") or Path(model).stem),
        api_key=args.get("api_key") or os.environ.get("GPTKIT_API_KEY") or None,
        cors_origins=(origins,) if isinstance(origins, str) else tuple(origins),
        max_body=int(args.get("max_body", DEFAULT_MAX_BODY)),
        drain_timeout=float(args.get("drain_timeout", DEFAULT_DRAIN_TIMEOUT)),
    )
    autoscale = args.get("autoscale")
    target = args.get("target_ongoing_requests")
    scaling = Scaling(
        replicas=int(args.get("replicas", 1)),
        autoscale=parse_autoscale(str(autoscale)) if autoscale else None,
        target_ongoing_requests=float(target) if target is not None else None,
    )
    return build_app(spec, server, scaling)


def parse_autoscale(value: str) -> tuple[int, int]:
    """``MIN:MAX`` replicas, 0 <= MIN <= MAX, MAX >= 1."""
    low_s, sep, high_s = value.partition(":")
    try:
        if not sep:
            raise ValueError
        low, high = int(low_s), int(high_s)
    except ValueError:
        raise ValueError(f"expected MIN:MAX replicas, e.g. 1:4; got {value!r}") from None
    if low < 0 or high < max(low, 1):
        raise ValueError(f"need 0 <= MIN <= MAX and MAX >= 1; got {value!r}")
    return low, high


# ---- the command: a cluster, the deployment, and a clean exit ---------------------------------


def run(
    spec: EngineSpec,
    server: ServerOptions,
    scaling: Scaling,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    echo: Callable[[str], None] = print,
) -> None:
    """Deploy on Ray Serve and serve until SIGTERM / Ctrl-C (then shut down and return).

    Without ``RAY_ADDRESS``, a local single-node cluster on loopback (no dashboard), with as many
    CPUs as the machine has or as the replicas reserve, whichever is more (the replicas then
    share the cores). With it, the cluster there: only the gptkit app is removed at the end.
    """
    import ray
    from ray import serve

    address = os.environ.get("RAY_ADDRESS")
    replicas = scaling.autoscale[1] if scaling.autoscale else scaling.replicas
    level = logging.WARNING if log_level.lower() not in ("debug", "trace") else logging.INFO
    if address:
        ray.init(address=address, logging_level=level, log_to_driver=True)
        echo(f"gptkit serve --ray: joined the Ray cluster at {address}")
    else:
        cores = os.cpu_count() or 1
        needed = replicas * spec.threads
        if needed > cores:
            echo(
                f"gptkit serve --ray: {replicas} replicas x {spec.threads} threads on {cores} "
                "cores: they share the cores"
            )
        context = ray.init(
            include_dashboard=False,
            num_cpus=max(cores, needed),
            object_store_memory=128 * 1024 * 1024,  # requests never pass through it
            logging_level=level,
            log_to_driver=True,
        )
        gcs = getattr(context, "address_info", {}).get("gcs_address", "?")
        echo(f"gptkit serve --ray: started a local Ray cluster (GCS at {gcs})")

    stop = threading.Event()

    def on_signal(sig: int, frame: FrameType | None) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: abort

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(spec, server, scaling), name=APP_NAME, route_prefix="/", blocking=False)
        how = (
            f"autoscaling {scaling.autoscale[0]}..{scaling.autoscale[1]} replicas"
            if scaling.autoscale
            else f"{scaling.replicas} replica{'s' if scaling.replicas != 1 else ''}"
        )
        auth = "an API key" if server.api_key else "no API key"
        echo(
            f"gptkit serve --ray: {spec.model} as '{server.model_name}' on http://{host}:{port} "
            f"({how}, {spec.threads} thread{'s' if spec.threads != 1 else ''} and "
            f"{spec.max_batch} slots each; {auth})"
        )
        while not stop.wait(0.5):
            pass
        echo("gptkit serve --ray: shutting down")
    finally:
        try:
            if address:
                serve.delete(APP_NAME)
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
