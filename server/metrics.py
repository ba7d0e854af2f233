"""Prometheus metrics of the steering server, served on ``/metrics`` beside vLLM's own ``vllm:*`` families.

vLLM's ``AsyncLLM`` (with stats on, its default) registers ``vllm:num_requests_running``,
``vllm:kv_cache_usage_perc``, the token and latency histograms, ... in its Prometheus registry
(``vllm.v1.metrics.prometheus.get_prometheus_registry``); these collectors join that registry:

* ``vllm:lora_requests_info`` — vLLM's gauge for adapter-aware routers (llm-d's scheduler, vLLM's
  production-stack router), with vLLM's label names and meaning (``vllm/v1/metrics/loggers.py``): labels
  ``running_lora_adapters`` / ``waiting_lora_adapters`` = comma-separated names of the adapters that running /
  waiting requests use, ``max_lora`` = adapters the server can hold; value = the time of the reading. Read from
  the engine's own request states at each scrape, so there is exactly one series, always current. A request
  is running once the scheduler has scheduled it (a preempted request still counts as running).
* ``lofit_requests_running`` / ``lofit_requests_waiting`` {adapter}: the same reading, per adapter.
* ``lofit_requests_total`` {adapter, route, outcome}, ``lofit_request_latency_seconds`` {adapter, route},
  ``lofit_time_to_first_token_seconds`` {adapter} (the engine's own first-token latency),
  ``lofit_output_tokens_total`` {adapter}; ``lofit_adapters_loaded``, ``lofit_adapter_loads_total``
  {action, outcome}.

``adapter`` is an adapter's name (a mix counts once under each adapter it uses) or the served model's name for
unsteered requests, so the label set is bounded by the adapters loaded; an adapter's series are removed when it
is unloaded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from server.steering import Steering


class Metrics:
    """The ``lofit_*`` request and adapter series (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry, base_name: str) -> None:
        self.base_name = base_name
        self.requests = Counter("lofit_requests", "Generation requests by adapter, route and outcome "
                                "(finished, aborted, error)", ["adapter", "route", "outcome"], registry=registry)
        self.latency = Histogram("lofit_request_latency_seconds", "End-to-end latency of generation requests",
                                 ["adapter", "route"], registry=registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.first_token = Histogram("lofit_time_to_first_token_seconds", "Time from arrival to the first "
                                     "generated token (the engine's own timing)", ["adapter"], registry=registry,
                                     buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.output_tokens = Counter("lofit_output_tokens", "Generated tokens by adapter", ["adapter"],
                                     registry=registry)
        self.adapters_loaded = Gauge("lofit_adapters_loaded", "Adapters loaded", registry=registry)
        self.adapter_loads = Counter("lofit_adapter_loads", "Adapter loads and unloads by outcome",
                                     ["action", "outcome"], registry=registry)
        self._series: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}  # adapter -> (metric, labels) it has

    def labels_of(self, steering: Steering | None) -> list[str]:
        """The ``adapter`` label values of a request: its adapters, or the served model's name."""
        return sorted(steering.weights) if steering is not None and steering.weights else [self.base_name]

    def start(self, steering: Steering | None, route: str, delta: bool) -> RequestRecord:
        """A record for one request; ``delta``: its outputs carry only new tokens (``RequestOutputKind.DELTA``)."""
        return RequestRecord(self, self.labels_of(steering), route, delta)

    def series(self, metric: Any, adapter: str, *labels: str) -> Any:
        """``metric.labels(adapter, *labels)``, remembered so that :meth:`retire` can remove it."""
        values = (adapter, *labels)
        self._series.setdefault(adapter, set()).add((metric, values))
        return metric.labels(*values)

    def retire(self, adapter: str) -> None:
        """Remove every series of ``adapter`` (it was unloaded)."""
        for metric, values in self._series.pop(adapter, ()):
            with contextlib.suppress(KeyError):
                metric.remove(*values)


class RequestRecord:
    """One request's contribution to :class:`Metrics`, from the ``RequestOutput`` objects the engine yields."""

    def __init__(self, metrics: Metrics, adapters: list[str], route: str, delta: bool) -> None:
        self.metrics, self.adapters, self.route, self.delta = metrics, adapters, route, delta
        self.started = time.monotonic()
        self.tokens: dict[int, int] = {}  # completion index -> tokens so far
        self.first_token: float | None = None
        self.done = False

    def output(self, output: Any) -> None:
        for completion in output.outputs or ():
            count = len(completion.token_ids)
            self.tokens[completion.index] = self.tokens.get(completion.index, 0) + count if self.delta else count
        stats = getattr(output, "metrics", None)
        if stats is not None and getattr(stats, "first_token_latency", 0.0) > 0.0:
            self.first_token = stats.first_token_latency

    def finish(self, outcome: str) -> None:
        if self.done:
            return
        self.done = True
        m, elapsed, tokens = self.metrics, time.monotonic() - self.started, sum(self.tokens.values())
        for adapter in self.adapters:
            m.series(m.requests, adapter, self.route, outcome).inc()
            m.series(m.latency, adapter, self.route).observe(elapsed)
            if tokens:
                m.series(m.output_tokens, adapter).inc(tokens)
            if self.first_token is not None:
                m.series(m.first_token, adapter).observe(self.first_token)


class LiveRequests(Collector):
    """``vllm:lora_requests_info`` and ``lofit_requests_{running,waiting}``, read from the engine at scrape time.

    Args:
        states: returns ``[(adapter names or [], running)]`` for every request in the engine now.
        max_lora: the ``max_lora`` label (adapters the server can hold).
        base_name: the ``adapter`` label of unsteered requests.
    """

    def __init__(self, states: Callable[[], list[tuple[list[str], bool]]], max_lora: int, base_name: str) -> None:
        self.states, self.max_lora, self.base_name = states, max_lora, base_name

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running: dict[str, int] = {}
        waiting: dict[str, int] = {}
        for names, is_running in self.states():
            for name in names or [self.base_name]:
                target = running if is_running else waiting
                target[name] = target.get(name, 0) + 1
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                 labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
        adapters = lambda counts: ",".join(sorted(n for n in counts if n != self.base_name))  # noqa: E731
        info.add_metric([str(self.max_lora), adapters(waiting), adapters(running)], time.time())
        yield info
        for kind, counts in (("running", running), ("waiting", waiting)):
            family = GaugeMetricFamily(f"lofit_requests_{kind}", f"Requests {kind} in the engine, by adapter",
                                       labels=["adapter"])
            for name, count in sorted(counts.items()):
                family.add_metric([name], count)
            yield family
