"""Prometheus metrics: requests and latency per adapter, requests in flight, adapter loads."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("lofit_requests", "Generation requests by adapter, route and HTTP status",
                                ["adapter", "route", "status"], registry=self.registry)
        self.latency = Histogram("lofit_request_latency_seconds", "End-to-end latency of generation requests",
                                 ["adapter", "route"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.first_token = Histogram("lofit_time_to_first_token_seconds", "Time to the first generated token",
                                     ["adapter"], registry=self.registry,
                                     buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.output_tokens = Counter("lofit_output_tokens", "Generated tokens by adapter", ["adapter"],
                                     registry=self.registry)
        self.running = Gauge("lofit_requests_running", "Requests the engine is generating for",
                             registry=self.registry)
        self.waiting = Gauge("lofit_requests_waiting", "Requests admitted but not yet producing tokens",
                             registry=self.registry)
        self.adapters_loaded = Gauge("lofit_adapters_loaded", "Adapters loaded", registry=self.registry)
        self.adapter_loads = Counter("lofit_adapter_loads", "Adapter loads and unloads by outcome",
                                     ["action", "outcome"], registry=self.registry)
