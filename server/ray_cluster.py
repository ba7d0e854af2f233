"""The fan-out front of the Ray Serve application: one call reaches every ``lofit-serve`` replica.

Runs in its own small Serve application (``server.ray_cluster:cluster_app``, route prefix ``/cluster``, no CPU
reserved). Behind Serve's proxy a request reaches *one* replica; these routes reach all of them through
``handle.broadcast`` (``ray/serve/handle.py``), which calls :class:`server.ray_app.LofitReplica`'s methods on every
running replica. It is a separate application because a replica that broadcast to its own deployment would hold
one of its request slots while waiting for another (``max_ongoing_requests``).

* ``GET /cluster/replicas`` — every replica's id, rank, node, cache folder and loaded adapters (the inference key,
  as ``GET /adapters``);
* ``GET /cluster/metrics`` — every replica's ``/metrics`` in one Prometheus page, each series labelled
  ``replica="<id>"`` (``?format=json``: ``{replica: page}``), so no replica hides behind the proxy;
* ``PUT|POST|DELETE /cluster/<path>`` — the request replayed on every replica's own app (its keys checked there):
  ``DELETE /cluster/adapters/x`` unloads ``x`` everywhere, ``POST /cluster/adapters/x/reload`` reloads it
  everywhere (adapter calls only); 200 when every replica answered < 400, the replicas' status when they all
  answered the same (a missing key: 401), else 502; the body gives each replica's status and answer.
"""

import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict
from ray import serve

from server.ray_app import DEPLOYMENT

FAN_OUT_PATHS = ("/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
FORWARDED_HEADERS = ("authorization", "x-api-key", "content-type", "x-request-id")
TIMEOUT_S = 120.0


def merge_metrics(pages: dict[str, str]) -> str:
    """One Prometheus text page from ``{replica id: page}``: each family once, each series with a ``replica``
    label (parsed and written by ``prometheus_client``)."""
    families: dict[str, Metric] = {}
    for replica, page in sorted(pages.items()):
        for family in text_string_to_metric_families(page):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value,
                                  sample.timestamp, sample.exemplar)

    class Pages:
        def collect(self) -> Any:
            yield from families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Pages())
    return generate_latest(registry).decode()


def cluster_api(handle: Callable[[], Any]) -> FastAPI:
    """The front's routes over ``handle()``, the replicas' deployment handle (module level: Serve pickles the
    deployment class by value, and routes defined in its methods would lose their annotations)."""
    api = FastAPI(title="LoFiT steering server: every replica")

    async def everywhere(method: str, *args: Any) -> list[Any]:
        return await handle().broadcast(method, *args).results_async(timeout_s=TIMEOUT_S, return_exceptions=True)

    @api.get("/replicas")
    async def replicas(request: Request) -> JSONResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        found = await everywhere("describe", headers)
        refused = [r["refused"] for r in found if isinstance(r, dict) and "refused" in r]
        if refused:
            status, message = refused[0]
            return JSONResponse({"error": {"message": message, "type": "Unauthorized" if status == 401 else
                                           "Forbidden", "param": None, "code": status}}, status_code=status)
        return JSONResponse({"replicas": sorted((r for r in found if isinstance(r, dict)), key=lambda r: r["rank"]),
                             "errors": [repr(r) for r in found if not isinstance(r, dict)]})

    @api.get("/metrics")
    async def metrics(format: str = "prometheus") -> Any:
        found = await everywhere("local_request", "GET", "/metrics")
        pages = {r["replica"]: r["body"] for r in found if isinstance(r, dict) and r["status"] == 200}
        if format == "json":
            return pages
        return PlainTextResponse(merge_metrics(pages), media_type="text/plain; version=0.0.4")

    @api.api_route("/{path:path}", methods=["PUT", "POST", "DELETE"])
    async def fan_out(path: str, request: Request) -> JSONResponse:
        if not ("/" + path).startswith(FAN_OUT_PATHS):
            return JSONResponse({"error": {"message": f"/cluster/{path} is not an adapter call; /cluster fans out "
                                           f"{', '.join(FAN_OUT_PATHS)} only", "type": "NotFoundError",
                                           "param": None, "code": 404}}, status_code=404)
        started = time.perf_counter()
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        target = "/" + path + (f"?{request.url.query}" if request.url.query else "")
        found = await everywhere("local_request", request.method, target, await request.body(), headers)
        results = {r["replica"]: {"status": r["status"], "body": r["body"]} for r in found if isinstance(r, dict)}
        errors = [repr(r) for r in found if not isinstance(r, dict)]
        ok = not errors and all(r["status"] < 400 for r in results.values())
        statuses = {r["status"] for r in results.values()}
        status = 200 if ok else statuses.pop() if len(statuses) == 1 and not errors else 502
        return JSONResponse({"ok": ok, "replicas": results, "errors": errors,
                             "ms": round((time.perf_counter() - started) * 1000, 1)}, status_code=status)

    return api


@serve.deployment(name="LofitCluster", num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class LofitCluster:
    """The fan-out front (see the module docstring)."""

    def __init__(self, target_app: str) -> None:
        self.target = (DEPLOYMENT, target_app)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return cluster_api(lambda: serve.get_deployment_handle(*self.target))


class ClusterArgs(BaseModel):
    """The ``args`` of ``server.ray_cluster:cluster_app``."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails the deploy

    target_app: str = "lofit"  # the Serve application name of server.ray_app:app


def cluster_app(args: ClusterArgs) -> serve.Application:
    """Serve's application builder for ``server.ray_cluster:cluster_app``."""
    if isinstance(args, dict):
        args = ClusterArgs(**args)
    return LofitCluster.bind(args.target_app)
