"""``lofit-serve`` as a Ray Serve application: N replicas, each running the server's own FastAPI app and engine.

Runs in the Ray Serve replica processes (and, for :func:`app`, wherever Serve builds the application). Start it
with ``serve run deploy/ray/serve.yaml`` (import path ``server.ray_app:app``, ``args`` as :class:`AppArgs`); the
fan-out front is :func:`server.ray_cluster.cluster_app` at ``/cluster``.

Each replica (:class:`LofitReplica`):

* parses ``args.flags`` with ``lofit-serve``'s own parser (:func:`server.cli.parse`; every flag and ``LOFIT_*``
  variable means what it means there) and builds :func:`server.app.create_app` — Serve runs the app's lifespan
  in the replica, so the engine, its self-test and the adapters directory load as in ``lofit-serve``
  (``__serve_build_asgi_app__``, Ray's late-bound ingress: ``ray/serve/_private/replica.py``);
* keeps the adapters it fetches from the shared store (``--adapter-store``, required: replicas are stateless)
  in its own cache folder ``<cache_root>/replica-<rank>`` (a replacement replica takes its predecessor's rank, so
  its cache is warm);
* tells Serve's router which adapters it holds: a request that carries the header
  ``serve_multiplexed_model_id: <adapter>`` and succeeds records that id here through ``serve.multiplexed``
  (``ray/serve/multiplex.py``), so later requests with the same header prefer this replica
  (``ray/serve/_private/request_router/request_router.py``, ``MultiplexMixin``); without the header, or when no
  replica holds the adapter, any replica serves it (load-on-miss); the header is a routing hint only, the body
  still chooses the steering;
* reports unhealthy (Serve replaces it) when its engine has died, instead of killing its own process;
* answers ``local_request`` (an HTTP request replayed against its own app, in process) and ``describe`` for the
  fan-out front's ``handle.broadcast`` (``ray/serve/handle.py``).

A ``from __future__ import annotations`` is left out on purpose: Serve pickles the deployment class by value and
converts builder ``args`` through the builder's *evaluated* annotation (``ray/serve/_private/api.py``).
"""

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

log = logging.getLogger("lofit.server")
DEPLOYMENT = "LofitReplica"
REPLICA_HEADER = "x-lofit-replica"  # every response names the replica that answered


class AppArgs(BaseModel):
    """The ``args`` of ``server.ray_app:app`` in a Serve config (``deploy/ray/serve.yaml``)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails the deploy

    flags: list[str] = Field(default_factory=list, description="lofit-serve's flags; --adapter-store is required")
    num_replicas: int | None = Field(2, description="fixed replica count (leave out with autoscaling_config)")
    autoscaling_config: dict[str, Any] | None = Field(None, description="Serve's autoscaling_config: min_replicas, "
                                                      "max_replicas, target_ongoing_requests, upscale_delay_s, ...")
    max_replicas_per_node: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = Field(64, description="requests a replica takes at once (Serve's default, 5, "
                                      "starves a batching engine); above --max-num-seqs plus a few admin calls")
    max_multiplexed_adapters: int = Field(256, description="adapter ids Serve's router remembers per replica")
    cache_root: str | None = Field(None, description="each replica caches store adapters in "
                                   "<cache_root>/replica-<rank> (default: lofit-serve's --adapter-cache-dir)")
    cpu_cores_per_replica: int | None = Field(None, description="CPU engines only: bind replica r to cores "
                                              "[r*n, (r+1)*n) (VLLM_CPU_OMP_THREADS_BIND)")
    health_check_period_s: float = 10.0
    env_vars: dict[str, str] = Field(default_factory=dict, description="environment of every replica (else the "
                                     "application's runtime_env applies)")


def parse_flags(flags: list[str]) -> Any:
    """``lofit-serve``'s :class:`~server.settings.Settings` for ``flags``; its usage errors raise ``ValueError``
    with the parser's message (Serve shows it where the deployment failed) instead of exiting."""
    from server.cli import parse

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            settings = parse(list(flags))
    except SystemExit:
        raise ValueError(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip()
                         else f"invalid lofit-serve flags {flags}") from None
    if settings.adapter_store is None or settings.adapter_store.startswith("memory:"):
        raise ValueError("lofit-serve on Ray Serve needs a shared --adapter-store (not memory://, which each "
                         "replica would hold alone): replicas are stateless, and an adapter uploaded to one must be "
                         "found by the others")
    return settings


class MultiplexedAdapters:
    """Pure ASGI middleware: names the replica on every response and, when a request that carried
    ``serve_multiplexed_model_id`` succeeded, records that adapter as held here (after the app has admitted it:
    the key check and load-on-miss ran first, so the header alone cannot load anything)."""

    def __init__(self, app: Any, replica: Any) -> None:
        self.app, self.replica = app, replica

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        adapter = serve.get_multiplexed_model_id()

        async def send_named(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REPLICA_HEADER.encode(), self.replica.replica_id.encode())]}
                if adapter and message["status"] < 400:
                    with contextlib.suppress(Exception):  # a routing hint: never fail a request over it
                        await self.replica.hold(adapter)
            await send(message)

        await self.app(scope, receive, send_named)


class _Held:
    """What Serve's multiplexing keeps per adapter id (it evicts ids beyond its limit; the registry keeps its own
    limit, ``--max-adapters``, so nothing is unloaded here)."""

    def __init__(self, name: str) -> None:
        self.name = name


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class LofitReplica:
    """One ``lofit-serve`` replica (see the module docstring)."""

    def __init__(self, flags: list[str], cache_root: str | None, max_multiplexed: int,
                 cpu_cores_per_replica: int | None) -> None:
        import ray

        context = serve.get_replica_context()
        self.replica_id = context.replica_tag
        self.rank = context.rank.rank if context.rank is not None else 0
        self.node_id = ray.get_runtime_context().get_node_id()
        if cpu_cores_per_replica:
            first = self.rank * cpu_cores_per_replica
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"{first}-{first + cpu_cores_per_replica - 1}"
        self.settings = parse_flags(flags)
        root = Path(cache_root) if cache_root else self.settings.adapter_cache_dir
        self.settings.adapter_cache_dir = root / f"replica-{self.rank}"

        async def held(adapter: str) -> _Held:
            if adapter not in self.app.state.lofit.registry.records:
                raise KeyError(adapter)  # not recorded: only what this replica really holds
            return _Held(adapter)

        self.hold = serve.multiplexed(max_num_models_per_replica=max_multiplexed)(held)

    def __serve_build_asgi_app__(self) -> Any:
        from server.app import create_app
        from server.cli import own_log_handler

        app = create_app(self.settings)
        own_log_handler()
        app.state.lofit.stop_server = lambda: None  # an engine death is reported by check_health instead
        app.add_middleware(MultiplexedAdapters, replica=self)
        return app

    async def check_health(self) -> None:
        """Serve's health check: unhealthy once the engine has died (Serve then replaces the replica)."""
        state = self.app.state.lofit
        if state.dead or (state.engine is not None and state.engine.errored):
            raise RuntimeError(f"replica {self.replica_id}: the vLLM engine has stopped")

    async def local_request(self, method: str, path: str, body: bytes = b"",
                            headers: dict[str, str] | None = None) -> dict[str, Any]:
        """Replay one HTTP request against this replica's own app, in process (the fan-out front's target)."""
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica", timeout=600) as client:
            answer = await client.request(method, path, content=body, headers=headers or {})
        return {"replica": self.replica_id, "status": answer.status_code, "body": answer.text,
                "content_type": answer.headers.get("content-type", "")}

    async def describe(self, headers: dict[str, str] | None = None) -> dict[str, Any]:
        """This replica: its id, rank, node, cache folder and the adapters it has loaded — for a caller whose
        ``headers`` carry the inference (or admin) key, as ``GET /adapters`` needs; else ``{"refused": [status,
        message]}``."""
        from server.auth import INFERENCE, check, presented_key

        lowered = {k.lower(): v for k, v in (headers or {}).items()}
        refused = check(INFERENCE, presented_key(lowered), self.settings.api_key, self.settings.admin_key)
        if refused is not None:
            return {"replica": self.replica_id, "refused": list(refused)}
        registry = self.app.state.lofit.registry
        return {"replica": self.replica_id, "rank": self.rank, "node": self.node_id, "pid": os.getpid(),
                "cache_dir": str(self.settings.adapter_cache_dir),
                "adapters": sorted(registry.records) if registry is not None else [],
                "store_fetches": getattr(self.app.state.lofit.store_loader, "fetches", 0)}


def app(args: AppArgs) -> serve.Application:
    """Serve's application builder for ``server.ray_app:app``: checks the flags here (a bad one fails the deploy
    at once, with the parser's message) and binds :class:`LofitReplica` with the args' placement and scaling."""
    if isinstance(args, dict):
        args = AppArgs(**args)
    parse_flags(args.flags)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus,
                              **({"runtime_env": {"env_vars": dict(args.env_vars)}} if args.env_vars else {})},
        "max_ongoing_requests": args.max_ongoing_requests,
        "health_check_period_s": args.health_check_period_s,
    }
    if args.max_replicas_per_node:
        options["max_replicas_per_node"] = args.max_replicas_per_node
    if args.autoscaling_config:
        options["autoscaling_config"] = args.autoscaling_config  # Serve refuses it beside num_replicas
    else:
        options["num_replicas"] = args.num_replicas
    return LofitReplica.options(**options).bind(list(args.flags), args.cache_root, args.max_multiplexed_adapters,
                                                args.cpu_cores_per_replica)
